//! The S3 path over HTTP: a real S3-compatible server (moto, started by scripts/test on
//! 127.0.0.1) and object_store's real S3 client. Outputs are read back with pyarrow's own S3
//! client and checked with DuckDB against the raw exports.

use serde_json::Value;

use crate::common::*;

fn endpoint() -> String {
    std::env::var("CLVFLOW_TEST_S3_ENDPOINT")
        .unwrap_or_else(|_| panic!("CLVFLOW_TEST_S3_ENDPOINT is not set: run the tests with ./scripts/test (it starts the S3 server)"))
}

/// A project whose store, inputs and outputs are in a fresh bucket.
fn s3_project() -> (TestProject, String) {
    let bucket = format!("clvflow-{}", uuid::Uuid::new_v4().simple());
    py_json(
        "import boto3, sys, json; boto3.client('s3', endpoint_url=sys.argv[1], region_name='us-east-1').create_bucket(Bucket=sys.argv[2]); print(json.dumps(True))",
        &[&endpoint(), &bucket],
    );
    let p = TestProject::shipped();
    let config = p.read("config.yaml").replace(
        "stores:\n",
        &format!("stores:\n  warehouse: {{ url: s3://{bucket}, endpoint: \"{}\", region: us-east-1, allow_http: true }}\n", endpoint()),
    );
    p.write("config.yaml", &config);
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
    p.ok(&[
        "generate",
        "--customers",
        "1200",
        "--end",
        RUN_DATE,
        "--url",
        &format!("s3://{bucket}/exports/"),
    ]);
    p.ok(&["run", "customer_value", "--date", RUN_DATE]);
    let first = read_back(&bucket);
    let (got, want) = (&first["got"], &first["want"]);
    assert_eq!(got[0], want[0], "{first}");
    assert!((f64_of(&got[1]) - f64_of(&want[1])).abs() < 0.01, "{first}");
    assert_eq!(got[2].as_i64(), Some(1), "{first}");

    p.ok(&["run", "customer_value", "--date", RUN_DATE]);
    let second = read_back(&bucket);
    assert_eq!(second, first, "a rerun must replace, not duplicate");
}

#[test]
fn commit_markers_are_create_only_on_s3() {
    let (p, bucket) = s3_project();
    p.ok(&[
        "generate",
        "--customers",
        "300",
        "--end",
        RUN_DATE,
        "--url",
        &format!("s3://{bucket}/exports/"),
    ]);
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
    p.ok(&[
        "generate",
        "--customers",
        "300",
        "--end",
        RUN_DATE,
        "--url",
        &format!("s3://{bucket}/exports/"),
    ]);
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
