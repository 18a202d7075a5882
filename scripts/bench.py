"""Driver of scripts/bench: runs clvflow and DuckDB on the same data in the same run and prints
the figures. Usage: bench.py CLVFLOW_BINARY CUSTOMERS [RUNS] [--job-only]

Every timed command runs RUNS times (default 3); medians are reported with the range. Peak
memory is sampled from outside (VmRSS in /proc/<pid>/status every 10 ms) as well as read from
clvflow's own log (per step, and for the whole run), so the two can be compared. With
--job-only only the shipped customer_value job and DuckDB's RFM SQL run (the figures at 10x the
data, where each further section would take minutes).
"""
import json, os, shutil, statistics, subprocess, sys, threading, time

args = [a for a in sys.argv[1:] if a != "--job-only"]
job_only = "--job-only" in sys.argv[1:]
binary, customers = args[0], int(args[1])
runs = int(args[2]) if len(args) > 2 else 3
root = os.path.abspath(os.path.dirname(__file__) + "/..")
work = os.path.join(root, ".bench", f"c{customers}")
run_date = "2026-11-22"
os.makedirs(work, exist_ok=True)
shutil.copy(os.path.join(root, "config.yaml"), work)
for folder in ["jobs", "sql", "reference"]:
    shutil.rmtree(os.path.join(work, folder), ignore_errors=True)
    shutil.copytree(os.path.join(root, folder), os.path.join(work, folder))


def sample_rss(pid, out):
    """Largest VmRSS of `pid` (MiB) until it exits, into out[0]."""
    while True:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        out[0] = max(out[0], int(line.split()[1]) / 1024)
        except (FileNotFoundError, ProcessLookupError, ValueError):
            return
        time.sleep(0.01)


def clvflow(args, config=None, may_fail=False, cgroup=None):
    """Runs clvflow (inside the memory cgroup folder `cgroup`, if given); returns (seconds, peak
    RSS MiB sampled from outside, JSON log records). A failure ends the benchmark unless
    `may_fail`: then the records end with {"failed": line} (or the signal that killed it)."""
    cmd = [binary, "--log-format", "json"] + (["--config", config] if config else []) + args
    start = time.perf_counter()

    def enter_cgroup():
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))

    p = subprocess.Popen(cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=enter_cgroup if cgroup else None)
    peak = [0.0]
    sampler = threading.Thread(target=sample_rss, args=(p.pid, peak))
    sampler.start()
    out, err = p.communicate()
    secs = time.perf_counter() - start
    sampler.join()
    # The last run's step log (JSON lines: per step its time, pool and heap figures, RSS).
    with open(os.path.join(work, "last-run.log"), "w") as f:
        f.write(err)
    if p.returncode < 0 and may_fail:
        how = " (SIGKILL: the kernel's OOM killer, in a memory cgroup)" if p.returncode == -9 else ""
        return secs, peak[0], [{"failed": f"killed by signal {-p.returncode}{how}"}]
    if p.returncode != 0 and may_fail:
        first = next((l for l in err.splitlines() if l.startswith("error: ")), err[-400:])
        return secs, peak[0], [{"failed": first}]
    if p.returncode != 0:
        sys.exit(f"clvflow {' '.join(args)} failed (exit {p.returncode}):\n{out}\n{err[-4000:]}")
    logs = [json.loads(l)["fields"] for l in err.splitlines() if l.startswith("{")]
    return secs, peak[0], logs


def med(values):
    return statistics.median(values)


def spread(values, fmt="{:.2f}"):
    return f"{fmt.format(med(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


if not os.path.exists(os.path.join(work, "data/exports/customers")):
    t = time.perf_counter()
    out = subprocess.run([binary, "generate", "--customers", str(customers), "--end", run_date],
                         cwd=work, check=True, capture_output=True, text=True).stdout
    print(f"generate: {out.strip()} in {time.perf_counter() - t:.1f} s")
rows = subprocess.run([sys.executable, "-c",
                       "import duckdb; print(duckdb.connect().execute(\"select count(*) from read_parquet('data/exports/orders/*/*.parquet')\").fetchall()[0][0])"],
                      cwd=work, capture_output=True, text=True, check=True).stdout.strip()
print(f"data: {customers} customers, {rows} order rows, run date {run_date}, {os.cpu_count()} cores, {runs} runs per figure (median, range)\n")

# --- clvflow: the nightly customer_value job ------------------------------------------------
walls, peaks, logged_peaks, step_ms, step_rss, models = [], [], [], {}, {}, []
for _ in range(runs):
    secs, peak, logs = clvflow(["run", "customer_value", "--date", run_date])
    walls.append(secs)
    peaks.append(peak)
    for l in logs:
        msg = l.get("message")
        if msg == "step done":
            step_ms.setdefault(l["step"], []).append(l["ms"])
            step_rss.setdefault(l["step"], []).append(l.get("peak_rss_mb") or 0)
        elif msg == "output staged":
            key = "write " + l["output"] + (" (delta)" if l.get("format") == "delta" else "")
            step_ms.setdefault(key, []).append(l["ms"])
            step_rss.setdefault(key, []).append(l.get("peak_rss_mb") or 0)
        elif msg == "models fitted" and l.get("step") == "clv":
            models.append({k: float(v) for k, v in (t.split("=") for t in l["timings"].split())})
        elif msg == "report written":
            step_ms.setdefault("report.html (after commit)", []).append(l["ms"])
            step_rss.setdefault("report.html (after commit)", []).append(0)
        elif msg == "run succeeded":
            logged_peaks.append(l.get("max_rss_mb") or 0)
print(f"clvflow customer_value ({'release' if '/release/' in binary else 'NOT a release'} build, config.yaml as shipped):")
print(f"  {'step / output':<28} {'time ms':>22} {'peak RSS MiB':>13}")
for name, ms in step_ms.items():
    print(f"  {name:<28} {spread(ms, '{:.0f}'):>22} {max(step_rss[name]):>13.0f}")
print(f"  end to end: {spread(walls)} s; peak RSS {max(peaks):.0f} MiB sampled from outside, "
      f"{max(logged_peaks):.0f} MiB by clvflow's own count")


def memory_limit_mib(config_file="config.yaml"):
    import yaml
    with open(os.path.join(work, config_file)) as f:
        text = str(yaml.safe_load(f)["engine"]["memory_limit"])
    # src/config/types.rs ByteSize: B, KiB, MiB, GiB, KB, MB, GB or a plain number of bytes
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "KB": 1e3, "MB": 1e6, "GB": 1e9, "B": 1}
    for unit, size in units.items():
        if text.endswith(unit):
            return float(text[: -len(unit)].strip()) * size / (1 << 20)
    return float(text) / (1 << 20)


limit_mib = memory_limit_mib()
print(f"  peak RSS / memory_limit ({limit_mib:.0f} MiB): {max(peaks) / limit_mib:.2f} (target <= 1.25; "
      f"and <= 1536 MiB with the shipped config)")
fit = {k: [m[k] for m in models] for k in ["transaction_model_ms", "gamma_gamma_ms", "predict_ms", "backtest_ms"]}
print(f"  models: BG/NBD fit {spread(fit['transaction_model_ms'], '{:.0f}')} ms, Gamma-Gamma fit "
      f"{spread(fit['gamma_gamma_ms'], '{:.0f}')} ms, 12-month CLV for all {spread(fit['predict_ms'], '{:.0f}')} ms, "
      f"backtest refit + holdout prediction {spread(fit['backtest_ms'], '{:.0f}')} ms")
print(f"  K-means step (read, choose k by silhouette on a sample, cluster all): {spread(step_ms['clusters'], '{:.0f}')} ms\n")

# --- DuckDB: the same SQL files on the same files, same machine, same run -------------------
# Each step's result becomes a table, as clvflow materialises each step.
rfm_steps = ["orders_clean", "customer_features", "rfm"]
code = r'''
import duckdb, json, re, sys, time, yaml
run_date, steps = sys.argv[1], sys.argv[2].split(",")
params = yaml.safe_load(open("jobs/customer_value.yaml"))["params"]
def sql(name):
    text = open(f"sql/{name}.sql").read().replace("{{ run_date }}", run_date)
    return re.sub(r"\{\{ params\.(\w+) \}\}", lambda m: str(params[m.group(1)]), text)
con = duckdb.connect()
con.execute("set enable_progress_bar = false")
con.execute("create view orders as select * from read_parquet('data/exports/orders/*/*.parquet', hive_partitioning = true)")
con.execute("create view rfm_segment_map as select * from read_csv('reference/rfm_segment_map.csv', header = true)")
out = {}
for name in steps:
    t = time.perf_counter()
    con.execute(f"create table {name} as " + sql(name))
    out[name] = time.perf_counter() - t
out["rows"] = con.execute("select count(*) from rfm").fetchone()[0]
print(json.dumps(out))
'''
duck = {s: [] for s in rfm_steps}
for _ in range(runs):
    r = subprocess.run([sys.executable, "-c", code, run_date, ",".join(rfm_steps)], cwd=work,
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"DuckDB failed:\n{r.stderr}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    for s in rfm_steps:
        duck[s].append(res[s])
ours = {s: [v / 1000 for v in step_ms[s]] for s in rfm_steps}
print("RFM SQL (sql/orders_clean.sql, customer_features.sql, rfm.sql), same files, same run, each step a table:")
print(f"  {'step':<20} {'DuckDB s':>20} {'clvflow s':>20}")
for s in rfm_steps:
    print(f"  {s:<20} {spread(duck[s]):>20} {spread(ours[s]):>20}")
duck_total = [sum(duck[s][i] for s in rfm_steps) for i in range(runs)]
ours_total = [sum(ours[s][i] for s in rfm_steps) for i in range(runs)]
print(f"  {'total':<20} {spread(duck_total):>20} {spread(ours_total):>20}")
print(f"  ratio clvflow / DuckDB (medians): {med(ours_total) / med(duck_total):.2f} (target <= 0.8)")

# --- The whole job against DuckDB's RFM SQL, and where the orders pass goes -----------------
job_ratio = med(walls) / med(duck_total)
print(f"\nwhole customer_value job / DuckDB's RFM SQL alone (medians): {job_ratio:.2f} (target <= 2.0)")
rules = [step_ms["clv_discounted"][i] / 1000 for i in range(runs)]
print(f"  the rule-based CLV models (clv_discounted, which also gives historical_clv) add "
      f"{med(rules):.2f} s to orders_clean's {med(ours['orders_clean']):.2f} s: "
      f"{100 * med(rules) / med(ours['orders_clean']):.0f} % (target <= 15 %)")


# --- --job-only: the shipped job and DuckDB's RFM SQL, nothing else (e.g. at 10x the data) ---
if job_only:
    sys.exit(0)

# --- the other transaction models, and model: auto -----------------------------------------
job_file = os.path.join(work, "jobs", "customer_value.yaml")
with open(job_file) as f:
    shipped_job = f.read()
print("transaction models in the clv step (one run each; fit = on all customers, with standard errors):")
try:
    for model in ["mbgnbd_gamma_gamma", "pareto_nbd_gamma_gamma", "auto"]:
        variant = shipped_job.replace("model: bgnbd_gamma_gamma,", f"model: {model},")
        assert variant != shipped_job, "jobs/customer_value.yaml has no `model: bgnbd_gamma_gamma,`"
        with open(job_file, "w") as f:
            f.write(variant)
        secs, peak, logs = clvflow(["run", "customer_value", "--date", run_date])
        t = next({k: float(v) for k, v in (x.split("=") for x in l["timings"].split())}
                 for l in logs if l.get("message") == "models fitted" and l.get("step") == "clv")
        chosen = next((l["model"] for l in logs if l.get("message", "").startswith("model: auto: chose")), None)
        if model == "auto":
            print(f"  auto: 3 calibration fits + holdout scoring {t['backtest_ms']:.0f} ms, refit of the chosen "
                  f"({chosen}) {t['transaction_model_ms']:.0f} ms: {t['backtest_ms'] + t['transaction_model_ms']:.0f} ms "
                  f"(target <= 8000); job {secs:.2f} s")
        else:
            target = " (target <= 3000)" if model.startswith("pareto") else ""
            print(f"  {model}: fit {t['transaction_model_ms']:.0f} ms{target}, backtest refit "
                  f"{t['backtest_ms']:.0f} ms; job {secs:.2f} s")
finally:
    with open(job_file, "w") as f:
        f.write(shipped_job)
print()

# --- the same job under a 1 GiB memory limit ----------------------------------------------
with open(os.path.join(work, "config.yaml")) as f:
    text = f.read()
limited = text.replace("memory_limit: 2GiB", "memory_limit: 1GiB")
assert limited != text, "config.yaml has no `memory_limit: 2GiB` to lower"
with open(os.path.join(work, "config-1gib.yaml"), "w") as f:
    f.write(limited)
# Step results count against the limit: this either completes inside it or fails at once.
secs, peak, logs = clvflow(["run", "customer_value", "--date", run_date], config="config-1gib.yaml", may_fail=True)
if logs and "failed" in logs[-1]:
    print(f"customer_value with memory_limit: 1GiB: failed after {secs:.2f} s (peak RSS {peak:.0f} MiB):\n  {logs[-1]['failed'][:400]}\n")
else:
    print(f"customer_value with memory_limit: 1GiB: completed in {secs:.2f} s, peak RSS {peak:.0f} MiB sampled\n")

# --- a hard memory limit of the kernel: memory_limit + the stated overhead ------------------
# README "Memory": the pool counts the process's whole live heap (src/engine/heap.rs), so what
# the process holds beyond memory_limit is the program itself (~110 MiB resident) and the pages
# the allocator holds beyond the live heap (kept for reuse, given back at once while the process
# is near its limit: src/engine/memory.rs; or fragmented). Stated for this benchmark's size as a
# quarter of memory_limit, at least 256 MiB (also at 96M order rows since the pool leaves an
# eighth of the limit to the allocator: README
# "Configuration reference"). A memory cgroup (v2,
# or v1 as on our VMs) with that hard limit: the job must complete inside it, and with a far
# too small memory_limit fail with clvflow's clear error, never be OOM-killed. Skipped, saying
# so, where no cgroup can be created (not root, no memory controller).
def overhead_mib(memory_limit_mib):
    return max(memory_limit_mib // 4, 256)


def make_cgroup(limit_mib):
    """A fresh memory cgroup limited to `limit_mib` (folder, kind), or (None, reason)."""
    name = f"clvflow-bench-{os.getpid()}-{limit_mib}"
    v2, v1 = "/sys/fs/cgroup", "/sys/fs/cgroup/memory"
    try:
        if os.path.exists(os.path.join(v2, "cgroup.controllers")):
            with open(os.path.join(v2, "cgroup.subtree_control")) as f:
                if "memory" not in f.read().split():
                    return None, "the cgroup v2 root does not delegate the memory controller"
            folder = os.path.join(v2, name)
            os.mkdir(folder)
            with open(os.path.join(folder, "memory.max"), "w") as f:
                f.write(str(limit_mib << 20))
            try:  # absent where swap is not accounted: then there is none to forbid
                with open(os.path.join(folder, "memory.swap.max"), "w") as f:
                    f.write("0")
            except OSError:
                pass
            return folder, "v2"
        if os.path.isdir(v1):
            folder = os.path.join(v1, name)
            os.mkdir(folder)
            with open(os.path.join(folder, "memory.limit_in_bytes"), "w") as f:
                f.write(str(limit_mib << 20))
            return folder, "v1"
        return None, "no memory cgroup controller is mounted"
    except OSError as e:
        return None, f"cannot create a memory cgroup ({e})"


def cgroup_peak_mib(folder, kind):
    name = "memory.peak" if kind == "v2" else "memory.max_usage_in_bytes"
    try:
        with open(os.path.join(folder, name)) as f:
            return int(f.read()) / (1 << 20)
    except (OSError, ValueError):
        return float("nan")


def in_cgroup(label, config_file, memory_limit_mib):
    overhead = overhead_mib(memory_limit_mib)
    limit = memory_limit_mib + overhead
    folder, kind = make_cgroup(limit)
    if folder is None:
        print(f"{label}: not measured: {kind}")
        return
    try:
        secs, peak, logs = clvflow(["run", "customer_value", "--date", run_date], config=config_file,
                                   may_fail=True, cgroup=folder)
        used = cgroup_peak_mib(folder, kind)
    finally:
        os.rmdir(folder)
    head = (f"{label}, in a memory cgroup ({kind}) with a hard limit of {limit} MiB "
            f"(memory_limit {memory_limit_mib} MiB + {overhead} MiB stated overhead)")
    if logs and "failed" in logs[-1]:
        print(f"{head}: failed after {secs:.2f} s, cgroup peak {used:.0f} MiB, RSS {peak:.0f} MiB:\n  {logs[-1]['failed'][:300]}")
    else:
        print(f"{head}: completed in {secs:.2f} s, cgroup peak {used:.0f} MiB (page cache included), RSS {peak:.0f} MiB")


in_cgroup("customer_value with memory_limit: 1GiB", "config-1gib.yaml", 1024)
with open(os.path.join(work, "config-tiny.yaml"), "w") as f:
    f.write(text.replace("memory_limit: 2GiB", "memory_limit: 64MiB"))
in_cgroup("customer_value with memory_limit: 64MiB (far too small: must fail with a clear error)",
          "config-tiny.yaml", 64)
print()

# --- clvflow: the customer_clv job --------------------------------------------------------
secs, peak, logs = clvflow(["run", "customer_clv", "--date", run_date])
print(f"customer_clv: {secs:.2f} s end to end, peak RSS {peak:.0f} MiB\n")

# --- Writing the wide table: DuckDB writes the same rows, same partitioning and compression --
# The rows are clvflow's committed customer_value output, loaded into DuckDB's memory first;
# only the COPY is timed (zstd level 1 as the shipped output, Hive folders by run_date and
# acquisition_channel). clvflow's figure is its `write customer_value`, which also runs the
# step's SQL (the rows are streamed from the joins into the files, never held).
code = r'''
import duckdb, json, shutil, sys, time
run_date, runs = sys.argv[1], int(sys.argv[2])
con = duckdb.connect()
con.execute("set enable_progress_bar = false")
con.execute(f"create table cv as select * from read_parquet('data/marts/customer_value/run_date={run_date}/*/*.parquet', hive_partitioning = true)")
rows = con.execute("select count(*), count(*) - count(acquisition_channel) from cv").fetchone()
times = []
for _ in range(runs):
    shutil.rmtree("duckdb-customer-value", ignore_errors=True)
    t = time.perf_counter()
    con.execute("copy cv to 'duckdb-customer-value' (format parquet, partition_by (run_date, acquisition_channel), compression zstd, compression_level 1)")
    times.append(time.perf_counter() - t)
shutil.rmtree("duckdb-customer-value", ignore_errors=True)
print(json.dumps({"times": times, "rows": rows[0], "columns": len(con.execute("select * from cv limit 0").description)}))
'''
r = subprocess.run([sys.executable, "-c", code, run_date, str(runs)], cwd=work, capture_output=True, text=True)
if r.returncode != 0:
    sys.exit(f"DuckDB write failed:\n{r.stderr}")
res = json.loads(r.stdout.strip().splitlines()[-1])
ours_write = [v / 1000 for v in step_ms["write customer_value"]]
print(f"\nwriting customer_value ({res['rows']} rows x {res['columns']} columns, zstd(1), by run_date, acquisition_channel):")
print(f"  DuckDB COPY of the same rows from memory {spread(res['times'])} s; clvflow SQL + write "
      f"{spread(ours_write)} s; ratio {med(ours_write) / med(res['times']):.2f} (target <= 1.0)")

# --- The wide table as Parquet and as Delta: the same committed rows read by the same input, ----
# written once per format by a one-step job (SELECT * of the run date). Each figure is the
# output's stage (read + write + footer check) plus its commit (Parquet: commit marker and
# publish; Delta: moving the files into the table and the Delta commit).
code = r'''
import duckdb, json, sys
run_date = sys.argv[1]
rows = duckdb.connect().execute(f"describe select * from read_parquet('data/marts/customer_value/run_date={run_date}/*/*.parquet')").fetchall()
print(json.dumps([[r[0], r[1]] for r in rows]))
'''
r = subprocess.run([sys.executable, "-c", code, run_date], cwd=work, capture_output=True, text=True, check=True)
types = {"BIGINT": "int64", "INTEGER": "int32", "DOUBLE": "float64", "FLOAT": "float32", "VARCHAR": "utf8",
         "DATE": "date", "TIMESTAMP": "timestamp", "BOOLEAN": "bool"}
columns = []
for name, t in json.loads(r.stdout):
    if name in ("run_date", "acquisition_channel"):  # the Hive folders, declared as partition columns
        continue
    if t not in types:
        sys.exit(f"bench: no clvflow column type for {name} {t}")
    columns.append(f"{name}: {types[t]}")
with open(os.path.join(work, "sql", "bench_write.sql"), "w") as f:
    f.write(f"SELECT * FROM cv WHERE run_date = DATE '{run_date}'\n")
for fmt in ["parquet", "delta"]:
    shutil.rmtree(os.path.join(work, "data", "bench_write"), ignore_errors=True)
    with open(os.path.join(work, "jobs", f"bench_write_{fmt}.yaml"), "w") as f:
        f.write(f"""inputs:
  cv:
    url: file://./data/marts/customer_value/
    partitioning: hive
    partition_columns: {{ run_date: date, acquisition_channel: utf8 }}
    columns: {{ {", ".join(columns)} }}
steps:
  - name: wide
    sql: sql/bench_write.sql
outputs:
  - from: wide
    url: file://./data/bench_write/{fmt}/
    format: {fmt}
    partition_by: [run_date, acquisition_channel]
    compression: zstd(1)
""")
writes = {"parquet": [], "delta": []}
for _ in range(runs):
    for fmt in writes:
        secs, peak, logs = clvflow(["run", f"bench_write_{fmt}", "--date", run_date])
        c = next(l for l in logs if l.get("message") == "output committed")
        writes[fmt].append((c["stage_ms"] + c["commit_ms"]) / 1000)
        wrote = c["rows"]
for fmt in writes:
    os.remove(os.path.join(work, "jobs", f"bench_write_{fmt}.yaml"))
shutil.rmtree(os.path.join(work, "data", "bench_write"), ignore_errors=True)
print(f"\nwriting customer_value as Parquet and as Delta ({wrote} rows of one run date, read from its committed files):")
print(f"  Parquet (clvflow commit log) {spread(writes['parquet'])} s; Delta {spread(writes['delta'])} s; "
      f"ratio {med(writes['delta']) / med(writes['parquet']):.2f} (target <= 1.2)")
