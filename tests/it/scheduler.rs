//! Scheduling logic with an injected clock (catch-up computed at a chosen "now") and a scripted
//! executor (no real jobs, no waiting for cron times): dependencies, overlap, retries, timeouts,
//! backfill resume, two daemons on one state store (local folder and S3), and the daemon process
//! under SIGTERM.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use clvflow::job::JobPlan;
use clvflow::project::Project;
use clvflow::run::RunReport;
use clvflow::scheduler::execute::{Executor, Outcome, Request, RunContext};
use clvflow::scheduler::metrics::Metrics;
use clvflow::scheduler::{self, Dispatcher};
use clvflow::state::{Renewal, RunRecord, StateStore, Status, Trigger};
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::common::*;

/// What the scripted executor does for a run.
#[derive(Clone, Copy, Debug)]
enum Act {
    Ok,
    Fail,
    /// Sleep (cancellable), then succeed.
    Sleep(Duration),
}

#[derive(Default)]
struct Scripted {
    script: Mutex<HashMap<(String, NaiveDate), Vec<Act>>>,
    default_sleep: Duration,
    runs: Mutex<Vec<(String, NaiveDate, std::time::Instant, std::time::Instant)>>,
    running: Mutex<HashMap<String, usize>>,
    max_parallel_same_job: AtomicUsize,
}

impl Scripted {
    fn new(default_sleep: Duration) -> Arc<Self> {
        Arc::new(Self {
            default_sleep,
            ..Default::default()
        })
    }
    fn script(&self, job: &str, date: NaiveDate, acts: &[Act]) {
        self.script
            .lock()
            .unwrap()
            .insert((job.into(), date), acts.to_vec());
    }
    fn count(&self, job: &str, date: NaiveDate) -> usize {
        self.runs
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.0 == job && r.1 == date)
            .count()
    }
}

impl Executor for Scripted {
    fn run<'a>(
        &'a self,
        job: &'a JobPlan,
        date: NaiveDate,
        run_id: &'a str,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, clvflow::Result<RunReport>> {
        Box::pin(async move {
            let act = {
                let mut s = self.script.lock().unwrap();
                match s.get_mut(&(job.name.clone(), date)) {
                    Some(v) if !v.is_empty() => v.remove(0),
                    _ => Act::Sleep(self.default_sleep),
                }
            };
            {
                let mut r = self.running.lock().unwrap();
                let n = r.entry(job.name.clone()).or_default();
                *n += 1;
                self.max_parallel_same_job.fetch_max(*n, Ordering::SeqCst);
            }
            let start = std::time::Instant::now();
            let report = RunReport {
                run_id: run_id.to_string(),
                job: job.name.clone(),
                run_date: date,
                inputs: vec![],
                steps: vec![],
                outputs: vec![],
                elapsed: Duration::ZERO,
                engine: "scripted".into(),
                report_url: None,
            };
            let result = match act {
                Act::Ok => Ok(report),
                Act::Fail => Err(clvflow::Error::Internal("scripted failure".into())),
                Act::Sleep(d) => tokio::select! {
                    _ = tokio::time::sleep(d) => Ok(report),
                    _ = cancel.cancelled() => Err(clvflow::Error::Cancelled("scripted run".into())),
                },
            };
            *self.running.lock().unwrap().get_mut(&job.name).unwrap() -= 1;
            self.runs.lock().unwrap().push((
                job.name.clone(),
                date,
                start,
                std::time::Instant::now(),
            ));
            result
        })
    }
}

fn d(s: &str) -> NaiveDate {
    s.parse().unwrap()
}

fn utc(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

const INPUT: &str = "inputs:\n  customers: { url: file://./data/exports/customers/, columns: { customer_id: int64 } }\nsteps:\n  - { name: x, sql: sql/x.sql }\n";

/// A project with small jobs `a` and `b` (b depends on a), state in `state_url`.
fn project(state_url: &str, extra_store: &str, a: &str, b: &str) -> (TestProject, Project) {
    let p = TestProject::shipped();
    p.write("config.yaml", &format!("stores:\n  local: {{ url: file://./data }}\n{extra_store}state: {{ url: {state_url} }}\n"));
    std::fs::remove_dir_all(p.file("jobs")).unwrap();
    p.write("jobs/a.yaml", &format!("{a}{INPUT}"));
    p.write("jobs/b.yaml", &format!("depends_on: [a]\n{b}{INPUT}"));
    p.write("sql/x.sql", "select customer_id from customers");
    let project = Project::load(&p.file("config.yaml")).unwrap();
    (p, project)
}

async fn context(project: &Project, exec: Arc<Scripted>, owner: &str) -> Arc<RunContext> {
    let jobs = scheduler::load_jobs(project).await.unwrap();
    Arc::new(RunContext {
        state: StateStore::open(project).unwrap(),
        executor: exec,
        jobs,
        lease_ttl: Duration::from_secs(30),
        owner: owner.into(),
        metrics: Arc::new(Metrics::default()),
    })
}

/// A request as the daemon or a backfill makes it (a manual one does not wait for upstream).
fn req(job: &str, date: NaiveDate) -> Request {
    Request::new(job, date, Trigger::Backfill)
}

fn statuses(records: &[RunRecord], job: &str) -> Vec<Status> {
    records
        .iter()
        .filter(|r| r.job == job)
        .map(|r| r.status)
        .collect()
}

async fn drain(
    ctx: &Arc<RunContext>,
    max_active: usize,
    reqs: Vec<Request>,
) -> Vec<(Request, clvflow::Result<Outcome>)> {
    let order = vec!["a".to_string(), "b".to_string()];
    let mut dispatcher = Dispatcher::new(ctx.clone(), &order, max_active);
    scheduler::drain(&mut dispatcher, reqs, Duration::from_millis(20)).await
}

#[tokio::test]
async fn catch_up_runs_the_most_recent_missed_dates_oldest_first() {
    let (_p, project) = project(
        "file://./state",
        "",
        "schedule: \"30 2 * * *\"\n",
        "schedule: \"30 2 * * *\"\ncatchup: false\n",
    );
    let ctx = context(&project, Scripted::new(Duration::ZERO), "t").await;
    let now = utc("2026-11-22T03:00:00Z");
    // No history yet: nothing to catch up (a first deployment does not replay the past).
    assert!(
        scheduler::daemon::catchup_requests(&ctx.state, &ctx.jobs, now, 3)
            .await
            .unwrap()
            .is_empty()
    );
    for job in ["a", "b"] {
        let rec = RunRecord {
            run_id: format!("r-{job}"),
            job: job.into(),
            run_date: d("2026-11-18"),
            attempt: 1,
            max_attempts: 1,
            trigger: Trigger::Schedule,
            scheduled_for: Some(utc("2026-11-18T02:30:00Z")),
            started_at: utc("2026-11-18T02:30:00Z"),
            ended_at: Some(utc("2026-11-18T02:31:00Z")),
            status: Status::Succeeded,
            rows: 1,
            files: 1,
            error: None,
            host: "h".into(),
            facts: None,
        };
        ctx.state.put(&rec).await.unwrap();
    }
    // Down from the 18th 02:31 to the 22nd 03:00: fires on the 19th..22nd were missed.
    let reqs = scheduler::daemon::catchup_requests(&ctx.state, &ctx.jobs, now, 3)
        .await
        .unwrap();
    let got: Vec<(String, String)> = reqs
        .iter()
        .map(|r| (r.job.clone(), r.run_date.to_string()))
        .collect();
    assert_eq!(
        got,
        [
            ("a".into(), "2026-11-20".into()),
            ("a".into(), "2026-11-21".into()),
            ("a".into(), "2026-11-22".into())
        ]
    );
    assert!(reqs.iter().all(|r| r.trigger == Trigger::Catchup));
    assert_eq!(reqs[0].scheduled_for, Some(utc("2026-11-20T02:30:00Z")));
}

#[tokio::test]
async fn downstream_waits_for_upstream_and_is_skipped_when_it_fails() {
    let (_p, project) = project("file://./state", "", "", "");
    let exec = Scripted::new(Duration::from_millis(50));
    let ctx = context(&project, exec.clone(), "t").await;
    let (ok_day, bad_day) = (d("2026-11-20"), d("2026-11-21"));
    exec.script("a", bad_day, &[Act::Fail]);
    // b is queued first; the dispatcher still starts a first, and b only after a committed.
    let done = drain(
        &ctx,
        2,
        vec![
            req("b", ok_day),
            req("a", ok_day),
            req("b", bad_day),
            req("a", bad_day),
        ],
    )
    .await;
    let outcome = |job: &str, date| {
        done.iter()
            .find(|(r, _)| r.job == job && r.run_date == date)
            .map(|(_, o)| o.as_ref().unwrap().clone())
            .unwrap()
    };
    assert_eq!(outcome("a", ok_day), Outcome::Finished(Status::Succeeded));
    assert_eq!(outcome("b", ok_day), Outcome::Finished(Status::Succeeded));
    assert_eq!(outcome("a", bad_day), Outcome::Finished(Status::Failed));
    assert!(
        matches!(outcome("b", bad_day), Outcome::Skipped(ref why) if why.contains("upstream job `a`"))
    );
    let runs = exec.runs.lock().unwrap().clone();
    let a_end = runs.iter().find(|r| r.0 == "a" && r.1 == ok_day).unwrap().3;
    let b_start = runs.iter().find(|r| r.0 == "b" && r.1 == ok_day).unwrap().2;
    assert!(b_start >= a_end, "b started before a finished");
    assert_eq!(exec.count("b", bad_day), 0);
    let history = ctx.state.history(Some("b")).await.unwrap();
    assert!(history.iter().any(|r| r.run_date == bad_day
        && r.status == Status::Skipped
        && r.error.as_deref().unwrap_or("").contains("upstream")));
}

#[tokio::test]
async fn one_job_never_runs_twice_at_once() {
    let (_p, project) = project("file://./state", "", "", "");
    let exec = Scripted::new(Duration::from_millis(60));
    let ctx = context(&project, exec.clone(), "t").await;
    let reqs = (20..24)
        .map(|day| req("a", d(&format!("2026-11-{day}"))))
        .collect();
    let done = drain(&ctx, 4, reqs).await;
    assert_eq!(done.len(), 4);
    assert_eq!(exec.max_parallel_same_job.load(Ordering::SeqCst), 1);
    // The dispatcher ran them one after another, oldest date first.
    let runs = exec.runs.lock().unwrap().clone();
    let dates: Vec<String> = runs.iter().map(|r| r.1.to_string()).collect();
    assert_eq!(
        dates,
        ["2026-11-20", "2026-11-21", "2026-11-22", "2026-11-23"]
    );
}

#[tokio::test]
async fn retries_back_off_and_timeouts_cancel() {
    let (_p, project) = project(
        "file://./state",
        "",
        "retries: { max: 2, backoff: 100ms }\n",
        "timeout: 200ms\n",
    );
    let exec = Scripted::new(Duration::from_millis(10));
    let ctx = context(&project, exec.clone(), "t").await;
    let day = d("2026-11-20");
    exec.script("a", day, &[Act::Fail, Act::Fail, Act::Ok]);
    let started = std::time::Instant::now();
    let out = ctx
        .execute(&req("a", day), &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(out, Outcome::Finished(Status::Succeeded));
    // Backoff 100 ms then 200 ms.
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
    let hist = ctx.state.runs_on("a", day).await.unwrap();
    assert_eq!(
        statuses(&hist, "a"),
        [Status::Failed, Status::Failed, Status::Succeeded]
    );
    assert_eq!(
        hist.iter().map(|r| r.attempt).collect::<Vec<_>>(),
        [1, 2, 3]
    );

    // b: no retries, 200 ms timeout, a run that would take 10 s.
    exec.script("b", day, &[Act::Sleep(Duration::from_secs(10))]);
    let started = std::time::Instant::now();
    let out = ctx
        .execute(&req("b", day), &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(out, Outcome::Finished(Status::TimedOut));
    assert!(started.elapsed() < Duration::from_secs(5));
    let hist = ctx.state.runs_on("b", day).await.unwrap();
    assert_eq!(statuses(&hist, "b"), [Status::TimedOut]);
    assert!(
        hist[0]
            .error
            .as_deref()
            .unwrap()
            .contains("nothing was published")
    );
}

#[tokio::test]
async fn backfill_resumes_where_it_stopped() {
    let (_p, project) = project("file://./state", "", "", "");
    let exec = Scripted::new(Duration::from_millis(5));
    let ctx = context(&project, exec.clone(), "t").await;
    exec.script("a", d("2026-11-03"), &[Act::Fail]);
    let reqs = scheduler::backfill_requests("a", d("2026-11-01"), d("2026-11-05"), false);
    let first = drain(&ctx, 1, reqs.clone()).await;
    let failed: Vec<String> = first
        .iter()
        .filter(|(_, o)| !matches!(o, Ok(Outcome::Finished(Status::Succeeded))))
        .map(|(r, _)| r.run_date.to_string())
        .collect();
    assert_eq!(failed, ["2026-11-03"]);
    let second = drain(&ctx, 1, reqs.clone()).await;
    for (r, o) in &second {
        let want = if r.run_date == d("2026-11-03") {
            Outcome::Finished(Status::Succeeded)
        } else {
            Outcome::AlreadyDone
        };
        assert_eq!(o.as_ref().unwrap(), &want, "{}", r.run_date);
    }
    assert_eq!(exec.count("a", d("2026-11-01")), 1);
    assert_eq!(exec.count("a", d("2026-11-03")), 2);
    // --force runs a succeeded date again.
    let forced: Vec<Request> =
        scheduler::backfill_requests("a", d("2026-11-01"), d("2026-11-01"), true);
    drain(&ctx, 1, forced).await;
    assert_eq!(exec.count("a", d("2026-11-01")), 2);
}

/// A backfill whose job is running in another process (its lease held for longer than a few
/// polls) waits for that run instead of giving the date up.
#[tokio::test]
async fn a_backfill_waits_while_another_process_runs_the_job() {
    let (_p, project) = project("file://./state", "", "", "");
    let exec = Scripted::new(Duration::from_millis(5));
    let ctx = context(&project, exec.clone(), "backfill").await;
    let other = StateStore::open(&project).unwrap();
    let held = (other.acquire("a", "daemon", Duration::from_secs(30)).await)
        .unwrap()
        .unwrap();
    // About 20 polls of 20 ms while the lease is held.
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(400)).await;
        held.release().await;
    });
    let done = drain(&ctx, 1, vec![req("a", d("2026-11-10"))]).await;
    release.await.unwrap();
    assert_eq!(done.len(), 1, "{done:?}");
    assert_eq!(
        done[0].1.as_ref().unwrap(),
        &Outcome::Finished(Status::Succeeded),
        "{done:?}"
    );
    assert_eq!(exec.count("a", d("2026-11-10")), 1);
}

/// Two daemons (two contexts, two owners) execute the same runs at the same time.
async fn two_daemons_run_each_date_once(state_url: &str, extra_store: &str) {
    let (_p, project) = project(state_url, extra_store, "", "");
    let exec = Scripted::new(Duration::from_millis(150));
    let one = context(&project, exec.clone(), "daemon-1").await;
    let two = context(&project, exec.clone(), "daemon-2").await;
    let reqs: Vec<Request> = (10..14)
        .map(|day| req("a", d(&format!("2026-11-{day}"))))
        .collect();
    let (r1, r2) = tokio::join!(drain(&one, 2, reqs.clone()), drain(&two, 2, reqs.clone()));
    assert_eq!(r1.len() + r2.len(), 8, "{r1:?} {r2:?}");
    for day in 10..14 {
        let date = d(&format!("2026-11-{day}"));
        assert_eq!(
            exec.count("a", date),
            1,
            "{date} ran {} times",
            exec.count("a", date)
        );
        let hist = one.state.runs_on("a", date).await.unwrap();
        assert_eq!(
            statuses(&hist, "a"),
            [Status::Succeeded],
            "{date}: {hist:?}"
        );
    }
    assert_eq!(exec.max_parallel_same_job.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn two_daemons_on_a_local_state_folder_run_each_date_once() {
    two_daemons_run_each_date_once("file://./state", "").await;
}

#[tokio::test]
async fn two_daemons_on_an_s3_state_store_run_each_date_once() {
    let endpoint = std::env::var("CLVFLOW_TEST_S3_ENDPOINT").expect("run through ./scripts/test");
    let bucket = format!("clvflow-state-{}", uuid::Uuid::new_v4().simple());
    py_json(
        "import boto3, sys, json; boto3.client('s3', endpoint_url=sys.argv[1], region_name='us-east-1').create_bucket(Bucket=sys.argv[2]); print(json.dumps(True))",
        &[&endpoint, &bucket],
    );
    let store = format!(
        "  state: {{ url: s3://{bucket}, endpoint: \"{endpoint}\", region: us-east-1, allow_http: true }}\n"
    );
    two_daemons_run_each_date_once(&format!("s3://{bucket}/clvflow"), &store).await;
}

#[tokio::test]
async fn an_expired_s3_lease_is_taken_over_and_a_live_one_is_not() {
    let endpoint = std::env::var("CLVFLOW_TEST_S3_ENDPOINT").expect("run through ./scripts/test");
    let bucket = format!("clvflow-lease-{}", uuid::Uuid::new_v4().simple());
    py_json(
        "import boto3, sys, json; boto3.client('s3', endpoint_url=sys.argv[1], region_name='us-east-1').create_bucket(Bucket=sys.argv[2]); print(json.dumps(True))",
        &[&endpoint, &bucket],
    );
    let store = format!(
        "  state: {{ url: s3://{bucket}, endpoint: \"{endpoint}\", region: us-east-1, allow_http: true }}\n"
    );
    let (_p, project) = project(&format!("s3://{bucket}/clvflow"), &store, "", "");
    let state = StateStore::open(&project).unwrap();
    let held = state
        .acquire("a", "crashed", Duration::from_millis(300))
        .await
        .unwrap()
        .unwrap();
    assert!(
        state
            .acquire("a", "other", Duration::from_secs(30))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(held.renew().await, Renewal::Renewed, "the holder can renew");
    tokio::time::sleep(Duration::from_millis(500)).await; // the holder "crashed": no renewal
    let taken = state
        .acquire("a", "other", Duration::from_secs(30))
        .await
        .unwrap();
    assert!(taken.is_some(), "an expired lease must be taken over");
    assert_eq!(
        held.renew().await,
        Renewal::Lost,
        "the old holder has lost it (If-Match fails)"
    );
    assert!(
        state
            .acquire("a", "third", Duration::from_secs(30))
            .await
            .unwrap()
            .is_none()
    );
}

#[test]
fn the_daemon_fires_on_schedule_and_sigterm_cancels_without_publishing() {
    let p = TestProject::shipped();
    p.generate(300);
    // A manual run for another date: the daemon's run is for today's date.
    p.ok(&["run", "customer_value", "--date", "2026-11-01"]);
    let before = p.snapshot("data/marts/customer_value");
    // Every 2 seconds; the run stalls in staging (failpoint) until SIGTERM and the grace period.
    p.edit(
        "jobs/customer_value.yaml",
        "schedule: \"30 2 * * *\"",
        "schedule: \"*/2 * * * * *\"",
    );
    p.edit(
        "config.yaml",
        "timezone: UTC",
        "timezone: UTC\nscheduler: { grace_period: 1s, poll_interval: 1s }",
    );
    let mut child = p
        .command(&["schedule", "--listen", "127.0.0.1:0"])
        .env("CLVFLOW_FAILPOINT", "after-staging:sleep")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut seen = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    use std::io::BufRead;
    let mut lines = std::io::BufReader::new(stderr).lines();
    while let Some(Ok(line)) = lines.next() {
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("failpoint after-staging reached") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon never started the run:\n{seen}"
        );
    }
    assert!(seen.contains("schedule fired"), "{seen}");
    // The operability endpoint answers while the run is in flight.
    let addr = seen
        .split("bound=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("no bound address logged")
        .to_string();
    let get = |path: &str| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body
    };
    assert!(get("/healthz").ends_with("ok\n"));
    let metrics = get("/metrics");
    assert!(
        metrics.contains("clvflow_runs_running{job=\"customer_value\"} 1"),
        "{metrics}"
    );
    // The run read its inputs and staged its outputs through the counted stores.
    let count = |op: &str| {
        metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!("clvflow_store_operations_total{{op=\"{op}\"}} "))
            })
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {op} count: {metrics}"))
    };
    assert!(
        count("list") > 0 && count("get") > 0 && count("put") > 0,
        "{metrics}"
    );
    let pid = child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let t = std::time::Instant::now();
    let rest: Vec<String> = lines.map_while(|l| l.ok()).collect();
    let status = child.wait().unwrap();
    let rest = rest.join("\n");
    assert!(status.success(), "exit {status:?}\n{seen}{rest}");
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "shutdown took {:?}",
        t.elapsed()
    );
    assert!(rest.contains("grace period over"), "{rest}");
    assert_eq!(
        p.snapshot("data/marts/customer_value"),
        before,
        "a cancelled run published something"
    );
    let history = p.ok(&["history", "customer_value"]);
    let text = String::from_utf8_lossy(&history.stdout);
    let newest = text.lines().nth(1).unwrap_or_default();
    assert!(
        newest.contains("schedule") && newest.contains("cancelled"),
        "{text}"
    );
    assert!(
        text.contains("manual") && text.contains("succeeded"),
        "{text}"
    );
}

/// Defect: a run waiting for its upstream was looked at again only every `poll_interval`. It is
/// started as soon as the upstream commits the date in the same process.
#[tokio::test]
async fn a_waiting_downstream_run_starts_when_its_upstream_commits() {
    let (_p, project) = project("file://./state", "", "", "");
    let exec = Scripted::new(Duration::from_millis(300));
    let ctx = context(&project, exec.clone(), "t").await;
    let day = d("2026-11-20");
    let started = std::time::Instant::now();
    let order = vec!["a".to_string(), "b".to_string()];
    let mut dispatcher = Dispatcher::new(ctx.clone(), &order, 2);
    // b starts with a (two slots), finds a not committed yet and waits; the poll is 60 s.
    let done = scheduler::drain(
        &mut dispatcher,
        vec![req("b", day), req("a", day)],
        Duration::from_secs(60),
    )
    .await;
    let b = done.iter().find(|(r, _)| r.job == "b").unwrap();
    assert_eq!(b.1.as_ref().unwrap(), &Outcome::Finished(Status::Succeeded));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "b waited for the poll: {:?}",
        started.elapsed()
    );
    assert_eq!(exec.count("b", day), 1);
}

/// Defect: `clvflow run` kept its lease only for one `lease_ttl` (no renewal), so a daemon
/// sharing the state store could take it over and run the job a second time; and it had no
/// retries. It now goes through the daemon's execution path.
#[test]
fn a_manual_run_renews_its_lease_and_retries_when_asked() {
    let endpoint = std::env::var("CLVFLOW_TEST_S3_ENDPOINT").expect("run through ./scripts/test");
    let bucket = format!("clvflow-manual-{}", uuid::Uuid::new_v4().simple());
    py_json(
        "import boto3, sys, json; boto3.client('s3', endpoint_url=sys.argv[1], region_name='us-east-1').create_bucket(Bucket=sys.argv[2]); print(json.dumps(True))",
        &[&endpoint, &bucket],
    );
    let p = TestProject::shipped();
    p.generate(300);
    let config = p.read("config.yaml").replace(
        "stores:\n",
        &format!("stores:\n  state: {{ url: s3://{bucket}, endpoint: \"{endpoint}\", region: us-east-1, allow_http: true }}\n"),
    );
    let config = config.replace(
        "state: { url: file://./data/_clvflow }",
        &format!("state: {{ url: s3://{bucket}/clvflow }}\nscheduler: {{ lease_ttl: 1s }}"),
    );
    p.write("config.yaml", &config);
    let mut child = p
        .command(&["run", "customer_value", "--date", RUN_DATE])
        .env("CLVFLOW_FAILPOINT", "after-staging:sleep")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    use std::io::BufRead;
    let mut lines = std::io::BufReader::new(stderr).lines();
    let mut seen = String::new();
    while let Some(Ok(line)) = lines.next() {
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("failpoint after-staging reached") {
            break;
        }
    }
    assert!(seen.contains("failpoint after-staging reached"), "{seen}");
    // Three TTLs later the lease is still held (renewed every third of a TTL).
    std::thread::sleep(Duration::from_secs(3));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let taken = rt.block_on(async {
        let project = Project::load(&p.file("config.yaml")).unwrap();
        let state = StateStore::open(&project).unwrap();
        state
            .acquire("customer_value", "a daemon", Duration::from_secs(30))
            .await
            .unwrap()
            .is_some()
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        !taken,
        "another process took the lease of a running manual run"
    );
    std::thread::sleep(Duration::from_millis(1500)); // the killed run's lease expires

    // --retries: a failing attempt is recorded and retried; the history shows both.
    let out = p
        .command(&[
            "run",
            "customer_value",
            "--date",
            RUN_DATE,
            "--retries",
            "1",
            "--backoff",
            "100ms",
        ])
        .env("CLVFLOW_FAILPOINT", "after-staging:error")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let history = String::from_utf8_lossy(&p.ok(&["history", "customer_value"]).stdout).to_string();
    let attempts: Vec<&str> = history.lines().filter(|l| l.contains("manual")).collect();
    assert!(
        attempts
            .iter()
            .any(|l| l.contains("1/2") && l.contains("failed"))
            && attempts
                .iter()
                .any(|l| l.contains("2/2") && l.contains("failed")),
        "{history}"
    );
}

/// Defect: an address that cannot be bound was reported as an internal error (exit 1).
#[test]
fn an_address_that_cannot_be_bound_is_a_usage_error() {
    let p = TestProject::shipped();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = p.clvflow(&["schedule", "--listen", &addr]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&addr) && err.contains("--listen") && !err.contains("internal error"),
        "{err}"
    );
}
