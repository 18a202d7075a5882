//! Shared test helpers: a throw-away copy of the project, the clvflow binary, and independent
//! readers (DuckDB and pyarrow, from the venv `scripts/test` prepares).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const RUN_DATE: &str = "2026-11-22";

/// A copy of config.yaml, jobs/ and sql/ in a temporary folder.
pub struct TestProject {
    dir: tempfile::TempDir,
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

impl TestProject {
    /// Starts a run of `customer_value` that stalls at `failpoint` (if any), waits until it is
    /// there, and SIGKILLs it `after` later (the run may have finished by then).
    pub fn kill_run(&self, failpoint: Option<&str>, after: Duration) {
        let mut cmd = self.command(&["run", "customer_value", "--date", RUN_DATE]);
        if let Some(f) = failpoint {
            cmd.env("CLVFLOW_FAILPOINT", format!("{f}:sleep"));
        }
        let mut child = cmd
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("failpoint") && line.contains("reached") {
                    return true;
                }
            }
            false
        });
        if failpoint.is_some() {
            let deadline = Instant::now() + Duration::from_secs(120);
            while !reader.is_finished() {
                assert!(Instant::now() < deadline, "failpoint not reached");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        std::thread::sleep(after);
        let _ = child.kill(); // SIGKILL (may have finished already)
        child.wait().unwrap();
    }

    /// The shipped project (config, jobs, SQL) in a fresh folder, no data.
    pub fn shipped() -> Self {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(root.join("config.yaml"), dir.path().join("config.yaml")).unwrap();
        copy_dir(&root.join("jobs"), &dir.path().join("jobs"));
        copy_dir(&root.join("sql"), &dir.path().join("sql"));
        copy_dir(&root.join("reference"), &dir.path().join("reference"));
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn file(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn write(&self, rel: &str, text: &str) {
        let p = self.file(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.file(rel)).unwrap()
    }

    /// Replaces `from` with `to` in a project file (the test fails if `from` is not there).
    pub fn edit(&self, rel: &str, from: &str, to: &str) {
        let text = self.read(rel);
        assert!(text.contains(from), "{rel} does not contain {from:?}");
        self.write(rel, &text.replacen(from, to, 1));
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_clvflow"));
        c.args(args)
            .current_dir(self.path())
            .env("CLVFLOW_CONFIG", self.file("config.yaml"))
            .env_remove("CLVFLOW_FAILPOINT")
            .env("CLVFLOW_LOG", "clvflow=info,warn");
        c
    }

    pub fn clvflow(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// Runs clvflow and asserts success.
    pub fn ok(&self, args: &[&str]) -> Output {
        let out = self.clvflow(args);
        assert!(
            out.status.success(),
            "clvflow {args:?} failed:\n{}",
            show(&out)
        );
        out
    }

    /// Sample exports with `customers` customers in the local store.
    pub fn generate(&self, customers: u64) {
        self.ok(&[
            "generate",
            "--customers",
            &customers.to_string(),
            "--end",
            RUN_DATE,
        ]);
    }

    pub fn run(&self) -> Output {
        self.clvflow(&["run", "customer_value", "--date", RUN_DATE])
    }

    /// Every file under `rel` with its size, sorted: a fingerprint of a folder's contents.
    pub fn snapshot(&self, rel: &str) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        walk(&self.file(rel), &self.file(rel), &mut out);
        out.sort();
        out
    }
}

fn walk(base: &Path, dir: &Path, out: &mut Vec<(String, u64)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(base, &p, out);
        } else {
            let rel = p.strip_prefix(base).unwrap().to_string_lossy().to_string();
            out.push((rel, e.metadata().unwrap().len()));
        }
    }
}

/// A seeded xorshift64 generator: a test's random schedule (kill points, delays) is the same on
/// every run of it.
pub fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

pub fn show(out: &Output) -> String {
    format!(
        "exit: {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// The Python of the test venv. The tests need it; `scripts/test` sets it up.
pub fn python() -> String {
    std::env::var("CLVFLOW_TEST_PYTHON").unwrap_or_else(|_| {
        panic!("CLVFLOW_TEST_PYTHON is not set: run the tests with ./scripts/test (it installs DuckDB, pyarrow and the S3 test server)")
    })
}

/// Runs a Python snippet that prints one JSON value; returns it.
pub fn py_json(code: &str, args: &[&str]) -> Value {
    py_json_in(&python(), code, args)
}

/// [`py_json`] with another Python (the Delta readers' venv).
pub fn py_json_in(python: &str, code: &str, args: &[&str]) -> Value {
    let out = Command::new(python)
        .arg("-c")
        .arg(code)
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "python failed:\n{}", show(&out));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("python printed no JSON ({e}):\n{}", show(&out)))
}

/// Runs `sql` in DuckDB (in `dir`), returns the rows as JSON arrays.
pub fn duckdb(dir: &Path, sql: &str) -> Vec<Vec<Value>> {
    let code = r#"
import duckdb, json, os, sys
os.chdir(sys.argv[1])
rows = duckdb.connect().execute(sys.argv[2]).fetchall()
print(json.dumps([list(r) for r in rows], default=str))
"#;
    let v = py_json(code, &[dir.to_str().unwrap(), sql]);
    serde_json::from_value(v).unwrap()
}

pub fn f64_of(v: &Value) -> f64 {
    v.as_f64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        .unwrap_or_else(|| panic!("not a number: {v}"))
}

/// Customers and net revenue (sum of monetary) of customer_value as DuckDB reads the committed Hive folders.
pub fn summary_totals(p: &TestProject) -> (i64, f64) {
    let rows = duckdb(
        p.path(),
        "select count(*), round(coalesce(sum(monetary), 0), 2), count(distinct run_date) from read_parquet('data/marts/customer_value/*/*/*.parquet', hive_partitioning = true)",
    );
    (rows[0][0].as_i64().unwrap(), f64_of(&rows[0][1]))
}

/// The same totals computed by DuckDB straight from the raw exports, following the cleaning
/// rules documented in sql/orders_clean.sql (an independent implementation of them).
pub fn expected_totals(p: &TestProject, run_date: &str) -> (i64, f64) {
    let sql = format!(
        "with s as (select distinct customer_id, order_id, order_ts, amount, channel from read_parquet('data/exports/orders/*/*.parquet')),
              i as (select * from s where customer_id is not null and order_ts < timestamp '{run_date}'),
              n as (select customer_id, order_id, sum(amount) as net from i group by customer_id, order_id having sum(amount) > 0),
              c as (select customer_id, round(sum(net), 2) as revenue from n group by customer_id)
         select count(*), round(sum(revenue), 2) from c"
    );
    let rows = duckdb(p.path(), &sql);
    (rows[0][0].as_i64().unwrap(), f64_of(&rows[0][1]))
}
