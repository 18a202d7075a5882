"""Driver of scripts/bench: runs clvflow and DuckDB on the same data and prints the figures."""
import json, os, shutil, subprocess, sys, time

binary, customers = sys.argv[1], int(sys.argv[2])
root = os.path.abspath(os.path.dirname(__file__) + "/..")
work = os.path.join(root, ".bench", f"c{customers}")
run_date = "2026-11-22"
os.makedirs(work, exist_ok=True)
for name in ["config.yaml"]:
    shutil.copy(os.path.join(root, name), work)
for folder in ["jobs", "sql", "reference"]:
    shutil.copytree(os.path.join(root, folder), os.path.join(work, folder), dirs_exist_ok=True)

def run(args, env=None):
    """Runs clvflow; returns (seconds, JSON log lines)."""
    start = time.perf_counter()
    p = subprocess.Popen([binary, "--log-format", "json", *args], cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, **(env or {})})
    out, err = p.communicate()
    secs = time.perf_counter() - start
    if p.returncode != 0:
        sys.exit(f"clvflow {' '.join(args)} failed:\n{out}\n{err}")
    logs = [json.loads(l) for l in err.splitlines() if l.startswith("{")]
    return secs, logs

def peak_rss(args):
    r = subprocess.run(["/usr/bin/time", "-f", "%M", binary, *args], cwd=work, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(r.stderr)
    return int(r.stderr.strip().splitlines()[-1]) / 1024

if not os.path.exists(os.path.join(work, "data/exports/customers")):
    t = time.perf_counter()
    out = subprocess.run([binary, "generate", "--customers", str(customers), "--end", run_date], cwd=work, check=True, capture_output=True, text=True).stdout
    print(f"generate: {out.strip()} in {time.perf_counter() - t:.1f} s")
rows = subprocess.run([sys.executable, "-c", "import duckdb,sys; print(duckdb.connect().execute(\"select count(*) from read_parquet('data/exports/orders/*/*.parquet')\").fetchall()[0][0])"],
                      cwd=work, capture_output=True, text=True, check=True).stdout.strip()
print(f"data: {customers} customers, {rows} order rows, run date {run_date}, {os.cpu_count()} cores\n")

for job in ["customer_value", "customer_clv"]:
    secs, logs = run(["run", job, "--date", run_date])
    print(f"clvflow {job}: {secs:.2f} s end to end")
    for l in logs:
        f = l.get("fields", {})
        msg = f.get("message", "")
        if msg in ("input checked", "step done", "output committed", "models fitted"):
            what = f.get("input") or f.get("step") or f.get("output")
            extra = ""
            if msg == "models fitted":
                extra = f"  (BG/NBD fit {f['bgnbd_ms']} ms, Gamma-Gamma fit {f['gamma_gamma_ms']} ms, predict {f['predict_ms']} ms)"
            else:
                extra = f"  {f.get('rows', '')} rows"
            print(f"  {msg:<17} {what:<18} {f.get('ms', ''):>7} ms{extra}")
    print(f"  peak RSS: {peak_rss(['run', job, '--date', run_date]):.0f} MiB (a second run, measured by /usr/bin/time)")
    print()

# DuckDB: the same SQL files (orders_clean, rfm_features, rfm) on the same files, same machine,
# same run; each step's result is a table, as clvflow materialises each step.
code = r'''
import duckdb, sys, time
run_date = sys.argv[1]
sql = lambda name: open(f"sql/{name}.sql").read().replace("{{ run_date }}", run_date)
con = duckdb.connect()
con.execute("set enable_progress_bar = false")
con.execute("create view orders as select * from read_parquet('data/exports/orders/*/*.parquet', hive_partitioning = true)")
con.execute("create view rfm_segment_map as select * from read_csv('reference/rfm_segment_map.csv', header = true)")
t = time.perf_counter(); con.execute("create table orders_clean as " + sql("orders_clean")); a = time.perf_counter() - t
t = time.perf_counter(); con.execute("create table rfm_features as " + sql("rfm_features")); con.execute("create table rfm as " + sql("rfm")); b = time.perf_counter() - t
print(a, b, con.execute("select count(*) from rfm").fetchone()[0])
'''
out = subprocess.run([sys.executable, "-c", code, run_date], cwd=work, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1].split()
duck_clean, duck_rfm, duck_rows = float(out[0]), float(out[1]), int(out[2])
_, logs = run(["run", "customer_value", "--date", run_date])
ms = {l["fields"].get("step"): l["fields"]["ms"] for l in logs if l.get("fields", {}).get("message") == "step done"}
ours_clean, ours_rfm = ms["orders_clean"] / 1000, (ms["rfm_features"] + ms["rfm"]) / 1000
print("RFM SQL, same files, same run (orders_clean.sql, then rfm_features.sql + rfm.sql):")
print(f"  DuckDB   orders_clean {duck_clean:6.2f} s   rfm {duck_rfm:6.2f} s   total {duck_clean + duck_rfm:6.2f} s   ({duck_rows} customers)")
print(f"  clvflow  orders_clean {ours_clean:6.2f} s   rfm {ours_rfm:6.2f} s   total {ours_clean + ours_rfm:6.2f} s")
print(f"  ratio clvflow / DuckDB: {(ours_clean + ours_rfm) / (duck_clean + duck_rfm):.2f} (target <= 0.8)")
