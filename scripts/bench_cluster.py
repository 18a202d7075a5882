"""Cluster mode of scripts/bench: the shipped customer_value job on the local engine and on a
local Ballista cluster (one `clvflow cluster scheduler`, two `clvflow cluster executor`, all on
this machine), same data, same run, printed side by side. Usage:
bench_cluster.py CLVFLOW_BINARY CUSTOMERS [RUNS]

The cluster's scratch and the outputs are on the local filesystem store (every process is on
this machine), so the figures are the cost of Ballista's planning, task scheduling, shuffles
(Arrow IPC files fetched over Flight) and the scratch Parquet between steps; on 2 cores a
cluster cannot be faster than one process, the question is the overhead.
"""
import json, os, shutil, socket, statistics, subprocess, sys, time

binary, customers = sys.argv[1], int(sys.argv[2])
runs = int(sys.argv[3]) if len(sys.argv) > 3 else 3
root = os.path.abspath(os.path.dirname(__file__) + "/..")
work = os.path.join(root, ".bench", f"c{customers}")
run_date = "2026-11-22"
os.makedirs(work, exist_ok=True)
shutil.copy(os.path.join(root, "config.yaml"), work)
for folder in ["jobs", "sql", "reference"]:
    shutil.rmtree(os.path.join(work, folder), ignore_errors=True)
    shutil.copytree(os.path.join(root, folder), os.path.join(work, folder))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, proc, what):
    start = time.time()
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None:
                sys.exit(f"{what} exited ({proc.returncode}); see {work}/cluster-*.log")
            if time.time() - start > 60:
                sys.exit(f"{what} does not listen on {port}")
            time.sleep(0.1)


def run(config):
    cmd = [binary, "--log-format", "json", "--config", config, "run", "customer_value", "--date", run_date]
    start = time.perf_counter()
    p = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    secs = time.perf_counter() - start
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr[-4000:]}")
    steps = {}
    scratch = 0
    for line in p.stderr.splitlines():
        if not line.startswith("{"):
            continue
        f = json.loads(line)["fields"]
        if f.get("message", "").startswith("step result written to scratch") or f.get("message", "").startswith("step result uploaded to scratch"):
            scratch += f.get("bytes", 0)
        if f.get("message") == "step done":
            steps[f["step"]] = f["ms"]
        elif f.get("message") == "output staged":
            steps["write " + f["output"]] = f["ms"]
    steps["(scratch MiB)"] = scratch / 2**20
    return secs, steps


if not os.path.exists(os.path.join(work, "data/exports/customers")):
    t = time.perf_counter()
    out = subprocess.run([binary, "generate", "--customers", str(customers), "--end", run_date],
                         cwd=work, check=True, capture_output=True, text=True).stdout
    print(f"generate: {out.strip()} in {time.perf_counter() - t:.1f} s")

with open(os.path.join(work, "config.yaml")) as f:
    shipped = f.read()
start = shipped.index("engine:")
end = shipped.index("\n", start)
sched_port = free_port()
cluster_cfg = (shipped[:start]
               + f'engine: {{ kind: ballista, scheduler: "df://127.0.0.1:{sched_port}", '
                 f'scratch: "file://./data/_clvflow/scratch/", target_partitions: 2, memory_limit: 2GiB, spill_dir: data/_spill }}'
               + shipped[end:])
with open(os.path.join(work, "config-cluster.yaml"), "w") as f:
    f.write(cluster_cfg)

procs = []
def spawn(args, log):
    p = subprocess.Popen([binary, "--config", "config-cluster.yaml", "cluster"] + args, cwd=work,
                         stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, log), "w"))
    procs.append(p)
    return p

try:
    s = spawn(["scheduler", "--bind", f"127.0.0.1:{sched_port}"], "cluster-scheduler.log")
    wait_port(sched_port, s, "the scheduler")
    for i in range(2):
        flight, grpc = free_port(), free_port()
        e = spawn(["executor", "--scheduler", f"127.0.0.1:{sched_port}", "--bind", f"127.0.0.1:{flight}",
                   "--grpc-port", str(grpc), "--slots", "1", "--memory-pool-size", "1GiB",
                   "--work-dir", os.path.join(work, f"data/_executor{i}")], f"cluster-executor-{i}.log")
        wait_port(flight, e, f"executor {i}")
    time.sleep(2)
    print(f"data: {customers} customers, run date {run_date}, {os.cpu_count()} cores, {runs} runs per figure (median)")
    print("cluster: 1 scheduler + 2 executors (1 slot, 1 GiB each) on this machine; scratch and outputs on the local filesystem\n")
    local, cluster = [], []
    for _ in range(runs):
        local.append(run("config.yaml"))
        cluster.append(run("config-cluster.yaml"))
    names = list(local[0][1].keys())
    for n in cluster[0][1]:
        if n not in names:
            names.append(n)
    print(f"  {'step / output':<28} {'local ms':>10} {'cluster ms':>11} {'ratio':>7}")
    for n in names:
        l = statistics.median([r[1].get(n, 0) for r in local])
        c = statistics.median([r[1].get(n, 0) for r in cluster])
        ratio = f"{c / l:.2f}" if l else "-"
        print(f"  {n:<28} {l:>10.0f} {c:>11.0f} {ratio:>7}")
    lw = statistics.median([r[0] for r in local])
    cw = statistics.median([r[0] for r in cluster])
    print(f"\n  end to end: local {lw:.2f} s, cluster {cw:.2f} s: cluster / local = {cw / lw:.2f}")
finally:
    for p in procs:
        p.kill()
        p.wait()
