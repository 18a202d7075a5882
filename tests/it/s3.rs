//! The S3 path over HTTP: a real S3-compatible server (moto, started by scripts/test on
//! 127.0.0.1) and object_store's real S3 client. Outputs are read back with pyarrow's own S3
//! client and checked with DuckDB against the raw exports.

use serde_json::Value;

use crate::common::*;

pub(crate) fn endpoint() -> String {
    std::env::var("CLVFLOW_TEST_S3_ENDPOINT")
        .unwrap_or_else(|_| panic!("CLVFLOW_TEST_S3_ENDPOINT is not set: run the tests with ./scripts/test (it starts the S3 server)"))
}

/// A project whose store, inputs and outputs are in a fresh bucket.
fn s3_project() -> (TestProject, String) {
    s3_project_via("data", &endpoint())
}

/// Like [`s3_project`], the bucket's name tagged `tag` and the store reached at `via` (the
/// server itself, or the fault proxy). `config-clean.yaml` reaches the same bucket directly.
pub(crate) fn s3_project_via(tag: &str, via: &str) -> (TestProject, String) {
    let bucket = format!("clvflow-{tag}-{}", uuid::Uuid::new_v4().simple());
    py_json(
        "import boto3, sys, json; boto3.client('s3', endpoint_url=sys.argv[1], region_name='us-east-1').create_bucket(Bucket=sys.argv[2]); print(json.dumps(True))",
        &[&endpoint(), &bucket],
    );
    let p = TestProject::shipped();
    let shipped = p.read("config.yaml");
    let store = |ep: &str| {
        shipped.replace(
            "stores:\n",
            &format!("stores:\n  warehouse: {{ url: s3://{bucket}, endpoint: \"{ep}\", region: us-east-1, allow_http: true }}\n"),
        )
    };
    p.write("config.yaml", &store(via));
    p.write("config-clean.yaml", &store(&endpoint()));
    let job = p
        .read("jobs/customer_value.yaml")
        .replace("file://./data/", &format!("s3://{bucket}/"));
    p.write("jobs/customer_value.yaml", &job);
    (p, bucket)
}

const READ_BACK: &str = r#"
import json, sys
import duckdb, pyarrow.dataset as ds, pyarrow.fs as fs
from urllib.parse import urlparse
ep = urlparse(sys.argv[1]); bucket = sys.argv[2]; run_date = sys.argv[3]
s3 = fs.S3FileSystem(endpoint_override=ep.netloc, scheme=ep.scheme, region='us-east-1', access_key='testing', secret_key='testing')
summary = ds.dataset(f'{bucket}/marts/customer_value', filesystem=s3, format='parquet', partitioning='hive').to_table()
orders = ds.dataset(f'{bucket}/exports/orders', filesystem=s3, format='parquet', partitioning='hive').to_table()
con = duckdb.connect()
con.register('summary', summary); con.register('orders', orders)
got = con.execute("select count(*), round(sum(monetary), 2), count(distinct run_date) from summary").fetchone()
want = con.execute(f"""
  with s as (select distinct customer_id, order_id, order_ts, amount, channel from orders),
       i as (select * from s where customer_id is not null and order_ts < timestamp '{run_date}'),
       n as (select customer_id, order_id, sum(amount) as net from i group by customer_id, order_id having sum(amount) > 0),
       c as (select customer_id, round(sum(net), 2) as revenue from n group by customer_id)
  select count(*), round(sum(revenue), 2) from c""").fetchone()
files = [f.path for f in s3.get_file_info(fs.FileSelector(f'{bucket}/marts/customer_value', recursive=True)) if f.type == fs.FileType.File]
print(json.dumps({"got": list(got), "want": list(want), "files": len(files)}, default=str))
"#;

fn read_back(bucket: &str) -> Value {
    py_json(READ_BACK, &[&endpoint(), bucket, RUN_DATE])
}

#[test]
fn the_job_runs_against_s3_and_reruns_replace() {
    let (p, bucket) = s3_project();
    generate_in(&p, &bucket, "config.yaml", 1200);
    p.ok(&["run", "customer_value", "--date", RUN_DATE]);
    let first = read_back(&bucket);
    let (got, want) = (&first["got"], &first["want"]);
    assert_eq!(got[0], want[0], "{first}");
    assert!((f64_of(&got[1]) - f64_of(&want[1])).abs() < 0.01, "{first}");
    assert_eq!(got[2].as_i64(), Some(1), "{first}");

    p.ok(&["run", "customer_value", "--date", RUN_DATE]);
    let second = read_back(&bucket);
    assert_eq!(second, first, "a rerun must replace, not duplicate");

    // The run report went through the same store.
    let page = py_json(
        "import boto3, sys, json\nb = boto3.client('s3', endpoint_url=sys.argv[1], region_name='us-east-1').get_object(Bucket=sys.argv[2], Key=sys.argv[3])['Body'].read().decode()\nprint(json.dumps([b.startswith('<!DOCTYPE html>'), 'RFM segments' in b, 'http://' in b]))",
        &[
            &endpoint(),
            &bucket,
            "reports/customer_value/run_date=2026-11-22/report.html",
        ],
    );
    assert_eq!(
        page,
        serde_json::json!([true, true, false]),
        "the report on S3"
    );
}

#[test]
fn commit_markers_are_create_only_on_s3() {
    let (p, bucket) = s3_project();
    generate_in(&p, &bucket, "config.yaml", 300);
    p.ok(&["run", "customer_value", "--date", RUN_DATE]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let project = clvflow::project::Project::load(&p.file("config.yaml")).unwrap();
        let loc = project
            .stores
            .resolve(&format!("s3://{bucket}/marts/customer_value/"))
            .unwrap();
        let log = clvflow::sink::log::TableLog::new(loc).unwrap();
        let latest = log.latest().await.unwrap().unwrap();
        assert_eq!(latest.version, 1);
        assert_eq!(log.published().await.unwrap(), 1);
        // A second writer racing for the same version loses, through the server's If-None-Match.
        let mut rival = latest.clone();
        rival.run_id = "rival".into();
        let err = log.create_commit(&rival).await.unwrap_err().to_string();
        assert!(err.contains("another run committed version 1"), "{err}");
        assert_eq!(log.read_commit(1).await.unwrap().run_id, latest.run_id);
    });
}

#[test]
fn a_killed_run_on_s3_leaves_the_output_intact() {
    let (p, bucket) = s3_project();
    generate_in(&p, &bucket, "config.yaml", 300);
    p.ok(&["run", "customer_value", "--date", RUN_DATE]);
    let before = read_back(&bucket);
    let out = p
        .command(&["run", "customer_value", "--date", RUN_DATE])
        .env("CLVFLOW_FAILPOINT", "after-commit:abort")
        .output()
        .unwrap();
    assert!(!out.status.success());
    // Committed but not yet published: readers of the folder still see the previous run.
    assert_eq!(read_back(&bucket), before);
    p.ok(&["run", "customer_value", "--date", RUN_DATE]);
    assert_eq!(read_back(&bucket), before);
}

fn faulty_endpoint() -> String {
    std::env::var("CLVFLOW_TEST_FAULTY_S3_ENDPOINT").unwrap_or_else(|_| {
        panic!("CLVFLOW_TEST_FAULTY_S3_ENDPOINT is not set: run the tests with ./scripts/test (it starts the fault proxy)")
    })
}

/// What the fault proxy injected for `bucket`, by kind.
fn injected(bucket: &str) -> Value {
    let faults = py_json(
        "import json, sys, urllib.request; print(urllib.request.urlopen(sys.argv[1] + '/_faults').read().decode())",
        &[&faulty_endpoint()],
    );
    faults.get(bucket).cloned().unwrap_or(Value::Null)
}

/// Sample exports of `customers` customers in `bucket`, written through `config`'s store.
pub(crate) fn generate_in(p: &TestProject, bucket: &str, config: &str, customers: u32) {
    p.ok(&[
        "--config",
        config,
        "generate",
        "--customers",
        &customers.to_string(),
        "--end",
        RUN_DATE,
        "--url",
        &format!("s3://{bucket}/exports/"),
    ]);
}

/// Runs the job through `config-clean.yaml` (the S3 server without the proxy).
fn run_without_faults(p: &TestProject) {
    p.ok(&[
        "--config",
        "config-clean.yaml",
        "run",
        "customer_value",
        "--date",
        RUN_DATE,
    ]);
}

fn store_retries(out: &std::process::Output) -> u64 {
    let err = stderr(out);
    err.split("store_retries_in_process=")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The latest commit of `customer_value` in `bucket` loses nothing: each of its files exists
/// with its size, in the table or (a committed run whose publish was cut short, which the next
/// run finishes) still staged. `published`: `published.json` names it, every file is in place
/// and the files it replaced are gone.
const LATEST_COMMIT_FILES: &str = r#"
import json, sys, boto3
s3 = boto3.client('s3', endpoint_url=sys.argv[1], region_name='us-east-1')
bucket, table, log = sys.argv[2], 'marts/customer_value', 'marts/_clvflow/customer_value'
pages = s3.get_paginator('list_objects_v2').paginate(Bucket=bucket, Prefix=log + '/commits/')
markers = sorted(o['Key'] for p in pages for o in p.get('Contents', []))
commit = json.loads(s3.get_object(Bucket=bucket, Key=markers[-1])['Body'].read())
def size(key):
    try:
        return s3.head_object(Bucket=bucket, Key=key)['ContentLength']
    except Exception:
        return None
staged = {a['path']: a['staged'] for a in commit['added']}
missing, unpublished = [], 0
for f in commit['files']:
    if size(f'{table}/{f["path"]}') == f['bytes']:
        continue
    if f['path'] in staged and size(f'{log}/{staged[f["path"]]}') == f['bytes']:
        unpublished += 1
        continue
    missing.append(f['path'])
left = [r for r in commit['removed'] if size(f'{table}/{r}') is not None]
published = json.loads(s3.get_object(Bucket=bucket, Key=log + '/published.json')['Body'].read())
print(json.dumps({"version": commit['version'], "missing": missing, "replaced_left": len(left),
                  "published": published['version'] == commit['version'] and unpublished == 0 and not left}))
"#;

/// [`LATEST_COMMIT_FILES`] holds; when the commit is fully published, a plain folder reader
/// also sees exactly the complete run (the sums of the raw exports). Returns that state.
fn committed_state_is_consistent(bucket: &str) -> Value {
    let state = py_json(LATEST_COMMIT_FILES, &[&endpoint(), bucket]);
    assert_eq!(state["missing"], Value::Array(vec![]), "{state}");
    if state["published"] == Value::Bool(true) {
        let back = read_back(bucket);
        assert_eq!(back["got"][0], back["want"][0], "{back}");
        assert!(
            (f64_of(&back["got"][1]) - f64_of(&back["want"][1])).abs() < 0.01,
            "{back}"
        );
        assert_eq!(back["got"][2].as_i64(), Some(1), "{back}");
    }
    state
}

/// After a successful run the commit is published and the folder is the complete run.
fn published_and_complete(bucket: &str) {
    let state = committed_state_is_consistent(bucket);
    assert_eq!(state["published"], Value::Bool(true), "{state}");
}

/// 5 % of the requests fail (503s, dropped connections, lost answers, bodies cut off half-way):
/// every run succeeds, with the same result as a store without faults.
#[test]
fn every_run_succeeds_through_five_percent_transient_s3_faults() {
    let (p, bucket) = s3_project_via("f5", &faulty_endpoint());
    generate_in(&p, &bucket, "config.yaml", 300);
    let mut retries = 0;
    for _ in 0..10 {
        let out = p.ok(&["run", "customer_value", "--date", RUN_DATE]);
        retries += store_retries(&out);
        published_and_complete(&bucket);
    }
    let faults = injected(&bucket);
    let total: u64 = faults
        .as_object()
        .map(|m| m.values().filter_map(Value::as_u64).sum())
        .unwrap_or(0);
    assert!(total >= 20, "too few faults to mean anything: {faults}");
    assert!(retries > 0, "faults {faults}, but no retry was counted");
}

/// At 20 % a run may run out of retries: then it fails cleanly (exit 1, one error line), the
/// committed state stays consistent, and the next run without faults succeeds.
#[test]
fn at_twenty_percent_faults_a_run_succeeds_or_fails_cleanly() {
    let (p, bucket) = s3_project_via("f20", &faulty_endpoint());
    generate_in(&p, &bucket, "config-clean.yaml", 300);
    run_without_faults(&p);
    p.edit(
        "config.yaml",
        "allow_http: true",
        "allow_http: true, max_retries: 2",
    );
    let mut failed = 0;
    for _ in 0..4 {
        let out = p.clvflow(&["run", "customer_value", "--date", RUN_DATE]);
        if !out.status.success() {
            failed += 1;
            assert_eq!(out.status.code(), Some(1), "{}", show(&out));
            let err = stderr(&out);
            let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error: ")).collect();
            assert_eq!(errors.len(), 1, "{err}");
            eprintln!("20 % faults, a run failed: {}", errors[0]);
            committed_state_is_consistent(&bucket);
        } else {
            published_and_complete(&bucket);
        }
    }
    run_without_faults(&p);
    published_and_complete(&bucket);
    eprintln!(
        "20 % faults: {failed} of 4 runs failed cleanly; injected {}",
        injected(&bucket)
    );
    assert!(!injected(&bucket).is_null());
}

/// The first create-only put to each key (commit markers, the run's lease) and the first
/// update of each key (the lease's renewals) reach the server and their answers are lost: the
/// retry finds the object holding its own bytes and goes on.
#[test]
fn a_conditional_put_whose_answer_was_lost_is_recognised_as_our_own() {
    let (p, bucket) = s3_project_via("lost", &faulty_endpoint());
    let config = p.read("config.yaml").replace(
        "state: { url: file://./data/_clvflow }",
        // Renewed every third of a second: runs renew their lease (If-Match) several times.
        &format!("state: {{ url: s3://{bucket}/_clvflow }}\nscheduler: {{ lease_ttl: 1s }}"),
    );
    p.write("config.yaml", &config);
    generate_in(&p, &bucket, "config-clean.yaml", 300);
    for _ in 0..2 {
        let out = p.ok(&["run", "customer_value", "--date", RUN_DATE]);
        // A renewal taken for a conflict would have given the lease up.
        assert!(
            !stderr(&out).contains("lost the job's lease"),
            "{}",
            show(&out)
        );
        published_and_complete(&bucket);
    }
    let faults = injected(&bucket);
    let lost = faults["lost_answer"].as_u64().unwrap_or(0);
    assert!(lost >= 4, "{faults}");
    // The lease renewal whose answer was lost was recognised too (else the run had lost its
    // lease and failed).
    assert!(
        faults["lost_update_answer"].as_u64().unwrap_or(0) >= 1,
        "{faults}"
    );
}

/// Waits for the run's lease object and overwrites it, as a process taking it over would.
const TAKE_OVER_LEASE: &str = r#"
import json, sys, time, boto3
s3 = boto3.client('s3', endpoint_url=sys.argv[1], region_name='us-east-1')
key = '_clvflow/leases/customer_value.json'
deadline = time.time() + 60
while True:
    try:
        s3.head_object(Bucket=sys.argv[2], Key=key)
        break
    except Exception:
        if time.time() > deadline:
            print(json.dumps(False)); sys.exit()
        time.sleep(0.05)
s3.put_object(Bucket=sys.argv[2], Key=key, Body=json.dumps({"owner": "intruder", "expires": "2999-01-01T00:00:00Z"}).encode())
print(json.dumps(True))
"#;

/// Before, a lease that could not be renewed was only logged and the run went on to commit
/// while another process could be running the same job.
#[test]
fn a_run_whose_lease_is_taken_over_is_cancelled_before_it_commits() {
    let (p, bucket) = s3_project();
    let config = p.read("config.yaml").replace(
        "state: { url: file://./data/_clvflow }",
        &format!("state: {{ url: s3://{bucket}/_clvflow }}\nscheduler: {{ lease_ttl: 1s }}"),
    );
    p.write("config.yaml", &config);
    generate_in(&p, &bucket, "config.yaml", 300);
    // Held after staging its outputs, renewing its lease every third of a second.
    let mut run = p
        .command(&["run", "customer_value", "--date", RUN_DATE])
        .env("CLVFLOW_FAILPOINT", "after-staging:sleep")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let taken = py_json(TAKE_OVER_LEASE, &[&endpoint(), &bucket]);
    let started = std::time::Instant::now();
    while run.try_wait().unwrap().is_none() {
        if started.elapsed() > std::time::Duration::from_secs(60) {
            run.kill().unwrap();
            panic!("the run went on for 60 s after its lease was taken over");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(taken, Value::Bool(true), "the run never took its lease");
    let out = run.wait_with_output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("lost the job's lease") && err.contains("another process took it over"),
        "{err}"
    );
    // Nothing of it was committed.
    let committed = py_json(
        "import json, sys, boto3; s3 = boto3.client('s3', endpoint_url=sys.argv[1], region_name='us-east-1'); r = s3.list_objects_v2(Bucket=sys.argv[2], Prefix='marts/'); print(json.dumps([o['Key'] for o in r.get('Contents', []) if '/commits/' in o['Key'] or o['Key'].endswith('published.json')]))",
        &[&endpoint(), &bucket],
    );
    assert_eq!(committed, Value::Array(vec![]), "{err}");
}

/// A plain folder reader of `marts/customer_value/`: lists the folder every few milliseconds
/// until the file `argv[3]` exists, then prints what it saw. A listing is *mixed* when a
/// partition folder holds files of two runs (the publish window, or a publish cut short by a
/// kill that the next run finishes); *missing* when a partition folder it saw before has no
/// file left.
const FOLDER_READER: &str = r#"
import json, os, re, sys, time, boto3
s3 = boto3.client('s3', endpoint_url=sys.argv[1], region_name='us-east-1')
bucket, stop, prefix = sys.argv[2], sys.argv[3], 'marts/customer_value/'
seen, lists, mixed, missing, stretches, start = set(), 0, 0, 0, [], None
while not os.path.exists(stop):
    t = time.monotonic()
    runs = {}
    for page in s3.get_paginator('list_objects_v2').paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get('Contents', []):
            folder, name = o['Key'].rsplit('/', 1)
            m = re.match(r'part-(.+)-\d+\.parquet$', name)
            if m:
                runs.setdefault(folder, set()).add(m.group(1))
    lists += 1
    missing += bool(seen - set(runs))
    seen |= set(runs)
    if any(len(r) > 1 for r in runs.values()):
        mixed += 1
        start = t if start is None else start
    elif start is not None:
        stretches.append(time.monotonic() - start)
        start = None
    time.sleep(0.005)
if start is not None:
    stretches.append(time.monotonic() - start)
print(json.dumps({"listings": lists, "mixed": mixed, "missing": missing, "partitions": len(seen),
                  "windows_s": sorted(round(s, 3) for s in stretches)}))
"#;

/// 20 SIGKILLs at random points of runs on S3 (at each failpoint of the commit protocol, and
/// at random moments), with a plain folder reader listing the table all along: after every
/// kill the latest commit loses nothing, the reader never finds a partition without files, and
/// the next run finishes what a killed one left. Prints how often and how long the reader saw
/// a partition between two commits.
#[test]
fn sigkill_at_random_points_of_runs_on_s3_keeps_the_committed_state_consistent() {
    let (p, bucket) = s3_project_via("kill", &endpoint());
    generate_in(&p, &bucket, "config.yaml", 300);
    p.ok(&["run", "customer_value", "--date", RUN_DATE]);
    published_and_complete(&bucket);
    let good = read_back(&bucket);
    // Uninterrupted runs first: how long their publish window is.
    let reader = FolderReader::start(&p, &bucket, "clean");
    let t = std::time::Instant::now();
    for _ in 0..3 {
        p.ok(&["run", "customer_value", "--date", RUN_DATE]);
    }
    let whole = t.elapsed() / 3;
    let clean = reader.stop();
    let reader = FolderReader::start(&p, &bucket, "kills");
    let mut next = xorshift(0x2545_f491_4f6c_dd1d);
    let points = [
        Some("after-staging"),
        Some("after-commit"),
        Some("mid-publish"),
        Some("after-published"),
        None,
    ];
    let mut unpublished = 0;
    for i in 0..20 {
        let point = points[i % points.len()];
        // At a failpoint: up to 50 ms after it; else anywhere in the run.
        let after = match point {
            Some(_) => std::time::Duration::from_millis(next() % 50),
            None => whole.mul_f64((next() % 1000) as f64 / 1000.0),
        };
        p.kill_run(point, after);
        eprintln!("kill {i}: {point:?}, {after:?} after it");
        let state = committed_state_is_consistent(&bucket);
        unpublished += usize::from(state["published"] != Value::Bool(true));
        if i % 4 == 3 {
            p.ok(&["run", "customer_value", "--date", RUN_DATE]);
            published_and_complete(&bucket);
        }
    }
    p.ok(&["run", "customer_value", "--date", RUN_DATE]);
    published_and_complete(&bucket);
    assert_eq!(read_back(&bucket)["got"], good["got"]);
    let killed = reader.stop();
    eprintln!(
        "S3 publish window, folder reader: 3 uninterrupted runs {clean}; 20 kills ({unpublished} \
         left a commit unpublished, which the next run published) {killed}"
    );
    for seen in [clean, killed] {
        assert!(seen["listings"].as_u64().unwrap_or(0) > 50, "{seen}");
        assert_eq!(seen["missing"].as_u64(), Some(0), "{seen}");
        assert_eq!(seen["partitions"].as_u64(), Some(5), "{seen}");
    }
}

/// [`FOLDER_READER`] running in the background.
struct FolderReader {
    child: std::process::Child,
    stop: std::path::PathBuf,
}

impl FolderReader {
    fn start(p: &TestProject, bucket: &str, tag: &str) -> Self {
        let stop = p.file(&format!("reader-{tag}.stop"));
        let child = std::process::Command::new(python())
            .arg("-c")
            .arg(FOLDER_READER)
            .args([&endpoint(), bucket, stop.to_str().unwrap()])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        FolderReader { child, stop }
    }

    /// What it saw.
    fn stop(self) -> Value {
        std::fs::write(&self.stop, "").unwrap();
        let out = self.child.wait_with_output().unwrap();
        serde_json::from_slice(&out.stdout).unwrap()
    }
}
