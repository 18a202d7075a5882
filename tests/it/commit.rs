//! The commit protocol under failure: an error before the commit, SIGKILL while staging, and
//! SIGKILL in the middle of publishing. The last committed output is never damaged and the next
//! run cleans up (or finishes the interrupted publish) and leaves exactly one copy.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::*;

fn committed() -> TestProject {
    let p = TestProject::shipped();
    p.generate(800);
    p.ok(&["run", "customer_value", "--date", RUN_DATE]);
    p
}

/// historical_clv / monetary per channel, as DuckDB reads the table (the margin used).
fn margins(p: &TestProject) -> Vec<f64> {
    duckdb(
        p.path(),
        "select distinct round(sum(historical_clv) / sum(monetary), 2) from read_parquet('data/marts/customer_value/*/*/*.parquet', hive_partitioning = true) group by acquisition_channel",
    )
    .iter()
    .map(|r| f64_of(&r[0]))
    .collect()
}

fn set_margin(p: &TestProject, m: &str) {
    // The job's gross margin, which the historical CLV model uses (historical_clv = margin x
    // monetary).
    let job = p.read("jobs/customer_value.yaml");
    let line = "  gross_margin: ";
    let start = job.find(line).unwrap() + line.len();
    let end = start + job[start..].find(' ').unwrap();
    p.write(
        "jobs/customer_value.yaml",
        &format!("{}{m}{}", &job[..start], &job[end..]),
    );
}

/// Starts a run that stops at `failpoint`, waits until it is there, then SIGKILLs it.
fn kill_at(p: &TestProject, failpoint: &str) {
    let mut child = p
        .command(&["run", "customer_value", "--date", RUN_DATE])
        .env("CLVFLOW_FAILPOINT", format!("{failpoint}:sleep"))
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = String::new();
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains(&format!("failpoint {failpoint} reached")) {
            break;
        }
        assert!(Instant::now() < deadline, "failpoint not reached:\n{seen}");
    }
    assert!(
        seen.contains("reached"),
        "the run ended before the failpoint:\n{seen}"
    );
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}

#[test]
fn an_error_before_commit_changes_nothing_and_leaves_nothing() {
    let p = committed();
    let before = p.snapshot("data/marts");
    set_margin(&p, "0.5");
    let out = p
        .command(&["run", "customer_value", "--date", RUN_DATE])
        .env("CLVFLOW_FAILPOINT", "after-staging:error")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert_eq!(p.snapshot("data/marts"), before);
    assert_eq!(margins(&p), vec![0.3]);
}

#[test]
fn sigkill_while_staging_keeps_the_last_output_and_the_next_run_cleans_up() {
    let p = committed();
    let before = p.snapshot("data/marts/customer_value");
    let totals = summary_totals(&p);
    set_margin(&p, "0.5");
    kill_at(&p, "after-staging");
    assert_eq!(
        p.snapshot("data/marts/customer_value"),
        before,
        "the table changed"
    );
    assert_eq!(summary_totals(&p), totals);
    assert_eq!(margins(&p), vec![0.3]);
    let staged = p.snapshot("data/marts/_clvflow/customer_value/staging");
    assert!(
        !staged.is_empty(),
        "the killed run should have left staged files"
    );

    set_margin(&p, "0.4");
    p.ok(&["run", "customer_value", "--date", RUN_DATE]);
    assert!(
        p.snapshot("data/marts/_clvflow/customer_value/staging")
            .is_empty(),
        "leftovers not cleaned"
    );
    assert_eq!(margins(&p), vec![0.4]);
    assert_eq!(summary_totals(&p).0, totals.0);
    assert_eq!(p.snapshot("data/marts/customer_value").len(), before.len());
}

#[test]
fn sigkill_during_publish_is_rolled_forward_by_the_next_run() {
    let p = committed();
    let files = p.snapshot("data/marts/customer_value").len();
    let totals = summary_totals(&p);
    set_margin(&p, "0.5");
    kill_at(&p, "mid-publish");
    // Committed but half published: the commit marker exists, published.json is behind.
    let log = p.read("data/marts/_clvflow/customer_value/published.json");
    assert!(log.contains("\"version\":1"), "{log}");
    assert!(
        p.file("data/marts/_clvflow/customer_value/commits/00000000000000000002.json")
            .exists()
    );

    // `files` still lists the last fully published version only.
    let listed = p.ok(&["files", "file://./data/marts/customer_value/"]);
    assert_eq!(
        String::from_utf8_lossy(&listed.stdout).lines().count(),
        files
    );

    set_margin(&p, "0.4");
    let out = p.ok(&["run", "customer_value", "--date", RUN_DATE]);
    assert!(
        stderr(&out).contains("finished publishing an interrupted earlier run"),
        "{}",
        show(&out)
    );
    assert_eq!(margins(&p), vec![0.4]);
    assert_eq!(summary_totals(&p).0, totals.0);
    assert_eq!(p.snapshot("data/marts/customer_value").len(), files);
    assert!(
        p.snapshot("data/marts/_clvflow/customer_value/staging")
            .is_empty()
    );
    assert!(
        p.read("data/marts/_clvflow/customer_value/published.json")
            .contains("\"version\":3")
    );
}

#[test]
fn sigkill_after_the_switch_leaves_every_published_file_readable_and_the_next_run_deletes_the_old()
{
    let p = committed();
    let files = p.snapshot("data/marts/customer_value").len();
    let totals = summary_totals(&p);
    set_margin(&p, "0.5");
    kill_at(&p, "after-published");
    // published.json names the new version, and every file it lists is there (a manifest
    // reader never meets a missing file); the replaced files are still in the folder.
    assert!(
        p.read("data/marts/_clvflow/customer_value/published.json")
            .contains("\"version\":2")
    );
    let listed = p.ok(&["files", "file://./data/marts/customer_value/"]);
    let listed: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(
        listed.len(),
        files,
        "{listed:?}\n{}",
        p.read("data/marts/_clvflow/customer_value/commits/00000000000000000002.json")
    );
    for f in &listed {
        let rel = f.trim_start_matches("file://");
        assert!(
            std::path::Path::new(rel).exists(),
            "{f} is listed but missing"
        );
    }
    assert!(p.snapshot("data/marts/customer_value").len() > files);
    // Read through the manifest: exactly the new run.
    let list = listed
        .iter()
        .map(|f| format!("'{}'", f.trim_start_matches("file://")))
        .collect::<Vec<_>>()
        .join(",");
    let through_manifest = duckdb(
        p.path(),
        &format!(
            "select distinct round(sum(historical_clv) / sum(monetary), 2) from read_parquet([{list}], hive_partitioning = true) group by acquisition_channel"
        ),
    );
    assert_eq!(
        through_manifest
            .iter()
            .map(|r| f64_of(&r[0]))
            .collect::<Vec<_>>(),
        vec![0.5]
    );

    // The next run deletes what the killed one left, then writes its own.
    set_margin(&p, "0.4");
    p.ok(&["run", "customer_value", "--date", RUN_DATE]);
    assert_eq!(p.snapshot("data/marts/customer_value").len(), files);
    assert_eq!(summary_totals(&p).0, totals.0);
    assert_eq!(margins(&p), vec![0.4]);
    assert!(
        p.snapshot("data/marts/_clvflow/customer_value/staging")
            .is_empty()
    );
}
