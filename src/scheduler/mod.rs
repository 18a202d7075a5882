//! `clvflow schedule` and `clvflow backfill`.
//!
//! tokio-cron-scheduler is only the timer: for each job the daemon computes the next fire itself
//! ([`calendar`], DST-correct) and asks the timer for a one-shot wake-up at that instant. Run
//! state, overlap control, dependencies, retries, timeouts, catch-up and leases are ours
//! ([`execute`], [`crate::state`]), because the timer alone freezes the UTC offset, overlaps runs,
//! forgets missed runs and does not wait for running jobs on shutdown.
//!
//! Rules:
//! - a run is (job, run date); the run date of a fire is its wall-clock date in the job's zone;
//!   a date that succeeded is never run again by the daemon (only `backfill --force` does);
//! - one job never runs twice at once; at most `max_active_runs` runs at once in all;
//! - runs queued for the same date start in dependency order; a run whose upstream job has not
//!   committed the date waits, and is skipped (recorded) once the upstream gave up;
//! - on start, missed fires since the job's last recorded run are run, oldest first, at most
//!   `max_catchup` per job (the most recent ones); `catchup: false` skips them. A job with no
//!   history at all is not caught up (use `backfill`).

pub mod calendar;
pub mod execute;
pub mod metrics;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_cron_scheduler::{Job as TimerJob, JobScheduler};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::error::{Error, Result};
use crate::job::{JobPlan, Project};
use crate::state::{StateStore, Trigger};
use calendar::{Fire, Schedule};
use execute::{Outcome, Request, RunContext};

/// A job with a schedule.
#[derive(Debug, Clone)]
pub struct Scheduled {
    pub job: String,
    pub schedule: Schedule,
    pub catchup: bool,
}

/// Loads and validates every job; returns them and the scheduled ones.
pub async fn load_jobs(project: &Project) -> Result<(BTreeMap<String, JobPlan>, Vec<Scheduled>)> {
    let mut jobs = BTreeMap::new();
    let mut scheduled = Vec::new();
    let mut diags = Vec::new();
    let cfg = &project.config.value;
    for name in crate::deps::run_order(project)? {
        match crate::runner::validate_job(project, &name).await {
            Ok(plan) => {
                if let Some(expr) = &plan.doc.value.schedule {
                    let tz = plan
                        .doc
                        .value
                        .timezone
                        .clone()
                        .unwrap_or_else(|| cfg.timezone.clone());
                    match Schedule::parse(expr, &tz) {
                        Ok(schedule) => scheduled.push(Scheduled {
                            job: name.clone(),
                            schedule,
                            catchup: plan.doc.value.catchup.unwrap_or(cfg.scheduler.catchup),
                        }),
                        Err(m) => diags.push(plan.doc.diag("schedule", m)),
                    }
                }
                jobs.insert(name, plan);
            }
            Err(Error::Config(d)) => diags.extend(d),
            Err(e) => return Err(e),
        }
    }
    let names: Vec<String> = jobs.keys().cloned().collect();
    if let Some(d) = crate::deps::find_cycle(project, &names)? {
        diags.push(d);
    }
    if diags.is_empty() {
        Ok((jobs, scheduled))
    } else {
        Err(Error::Config(diags))
    }
}

/// Missed runs to make up at `now`: for each job with catch-up on, the fires after its last
/// recorded scheduled run, the most recent `max_catchup` of them, oldest first.
pub async fn catchup_requests(
    state: &StateStore,
    scheduled: &[Scheduled],
    now: DateTime<Utc>,
    max_catchup: usize,
) -> Result<Vec<Request>> {
    let mut out = Vec::new();
    for s in scheduled.iter().filter(|s| s.catchup) {
        let history = state.history(Some(&s.job)).await?;
        let Some(last) = history.iter().filter_map(|r| r.scheduled_for).max() else {
            continue;
        };
        let missed = s.schedule.fires_between(last, now);
        let keep = missed.len().saturating_sub(max_catchup);
        for f in &missed[keep..] {
            out.push(request(&s.job, *f, Trigger::Catchup));
        }
    }
    out.sort_by_key(|r| (r.scheduled_for, r.job.clone()));
    Ok(out)
}

fn request(job: &str, fire: Fire, trigger: Trigger) -> Request {
    Request {
        job: job.to_string(),
        run_date: fire.run_date,
        trigger,
        scheduled_for: Some(fire.at),
        force: false,
    }
}

/// Starts runs from a queue under the daemon's rules: dependency order within a date, no job
/// twice at once, at most `max_active` at once.
pub struct Dispatcher {
    ctx: Arc<RunContext>,
    order: HashMap<String, usize>,
    max_active: usize,
    queue: Vec<(Request, Instant)>,
    active: HashSet<String>,
    tasks: JoinSet<(Request, Result<Outcome>)>,
    /// Cancels running attempts (shutdown after the grace period).
    pub cancel: CancellationToken,
}

impl Dispatcher {
    pub fn new(ctx: Arc<RunContext>, order: &[String], max_active: usize) -> Self {
        Self {
            ctx,
            order: order
                .iter()
                .enumerate()
                .map(|(i, n)| (n.clone(), i))
                .collect(),
            max_active: max_active.max(1),
            queue: Vec::new(),
            active: HashSet::new(),
            tasks: JoinSet::new(),
            cancel: CancellationToken::new(),
        }
    }

    /// Queues `req` unless the same run is already queued or running.
    pub fn push(&mut self, req: Request, not_before: Instant) {
        let dup = self
            .queue
            .iter()
            .any(|(q, _)| q.job == req.job && q.run_date == req.run_date);
        if !dup {
            self.queue.push((req, not_before));
        }
    }

    pub fn running(&self) -> usize {
        self.tasks.len()
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Starts every queued run that may start now.
    pub fn dispatch(&mut self) {
        let now = Instant::now();
        let order = &self.order;
        self.queue.sort_by_key(|(r, _)| {
            (
                r.run_date,
                order.get(&r.job).copied().unwrap_or(usize::MAX),
                r.job.clone(),
            )
        });
        let mut i = 0;
        while i < self.queue.len() && self.tasks.len() < self.max_active {
            let (req, not_before) = &self.queue[i];
            if *not_before > now || self.active.contains(&req.job) {
                i += 1;
                continue;
            }
            let (req, _) = self.queue.remove(i);
            self.active.insert(req.job.clone());
            let (ctx, cancel) = (self.ctx.clone(), self.cancel.clone());
            self.tasks.spawn(async move {
                let outcome = ctx.execute(&req, &cancel).await;
                (req, outcome)
            });
        }
    }

    /// Waits for the next run to end (None when none is running).
    pub async fn next_done(&mut self) -> Option<(Request, Result<Outcome>)> {
        let joined = self.tasks.join_next().await?;
        match joined {
            Ok((req, outcome)) => {
                self.active.remove(&req.job);
                Some((req, outcome))
            }
            Err(e) => {
                error!(error = %e, "a run task panicked");
                // The job name is lost with the task; free every slot that no task holds.
                self.active.clear();
                None
            }
        }
    }
}

/// Runs `requests` to the end (backfill, tests): waits and lease conflicts are retried after
/// `poll`; a run still waiting for an upstream job when nothing else can run is given up.
pub async fn drain(
    dispatcher: &mut Dispatcher,
    requests: Vec<Request>,
    poll: Duration,
) -> Vec<(Request, Result<Outcome>)> {
    let now = Instant::now();
    for r in requests {
        dispatcher.push(r, now);
    }
    let mut done = Vec::new();
    let mut stalled = 0usize;
    loop {
        dispatcher.dispatch();
        if dispatcher.running() == 0 {
            if dispatcher.queued() == 0 {
                break;
            }
            tokio::time::sleep(poll).await;
            continue;
        }
        let Some((req, outcome)) = dispatcher.next_done().await else {
            continue;
        };
        match outcome {
            Ok(Outcome::Waiting(_)) | Ok(Outcome::Busy) if stalled <= dispatcher.queued() + 1 => {
                stalled += 1;
                dispatcher.push(req, Instant::now() + poll);
            }
            other => {
                if !matches!(other, Ok(Outcome::Waiting(_)) | Ok(Outcome::Busy)) {
                    stalled = 0;
                }
                done.push((req, other));
            }
        }
    }
    done
}

/// Daemon settings (from `config.yaml` `scheduler:`).
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    pub max_active_runs: usize,
    pub max_catchup: usize,
    pub grace: Duration,
    pub poll: Duration,
    pub listen: Option<SocketAddr>,
}

/// Runs the daemon until `shutdown` is cancelled (SIGTERM/SIGINT in the CLI).
pub async fn run_daemon(
    ctx: Arc<RunContext>,
    scheduled: Vec<Scheduled>,
    order: Vec<String>,
    opts: DaemonOptions,
    shutdown: CancellationToken,
) -> Result<()> {
    let stop_http = CancellationToken::new();
    if let Some(addr) = opts.listen {
        let bound = metrics::serve(addr, ctx.metrics.clone(), stop_http.clone())
            .await
            .map_err(|e| Error::Internal(format!("cannot listen on {addr}: {e}")))?;
        info!(%bound, "serving /healthz and /metrics");
    }
    let mut dispatcher = Dispatcher::new(ctx.clone(), &order, opts.max_active_runs);
    for r in catchup_requests(&ctx.state, &scheduled, Utc::now(), opts.max_catchup).await? {
        info!(job = %r.job, run_date = %r.run_date, "catching up a run missed while the daemon was down");
        dispatcher.push(r, Instant::now());
    }

    let timer = JobScheduler::new()
        .await
        .map_err(|e| Error::Internal(format!("timer: {e}")))?;
    timer
        .start()
        .await
        .map_err(|e| Error::Internal(format!("timer: {e}")))?;
    let (tx, mut rx) = mpsc::channel::<(usize, Fire)>(64);
    let arm = |idx: usize, after: DateTime<Utc>| {
        let (timer, tx, s) = (timer.clone(), tx.clone(), scheduled[idx].clone());
        async move {
            let Some(fire) = s.schedule.next_after(after) else {
                warn!(job = %s.job, "schedule never fires again");
                return;
            };
            let wait = (fire.at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
            let job = TimerJob::new_one_shot_async(wait, move |_, _| {
                let tx = tx.clone();
                Box::pin(async move {
                    // The timer ticks coarsely and may wake a little early: never start early.
                    if let Ok(early) = (fire.at - Utc::now()).to_std() {
                        tokio::time::sleep(early).await;
                    }
                    let _ = tx.send((idx, fire)).await;
                })
            });
            match job {
                Ok(j) => {
                    if let Err(e) = timer.add(j).await {
                        error!(job = %s.job, error = %e, "cannot arm the timer");
                    }
                }
                Err(e) => error!(job = %s.job, error = %e, "cannot arm the timer"),
            }
            info!(job = %s.job, next = %fire.at, run_date = %fire.run_date, "next run");
        }
    };
    for idx in 0..scheduled.len() {
        arm(idx, Utc::now()).await;
    }
    info!(
        jobs = scheduled.len(),
        state = ctx.state.url(),
        "scheduler started"
    );

    loop {
        dispatcher.dispatch();
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some((idx, fire)) = rx.recv() => {
                let s = &scheduled[idx];
                info!(job = %s.job, run_date = %fire.run_date, "schedule fired");
                dispatcher.push(request(&s.job, fire, Trigger::Schedule), Instant::now());
                arm(idx, fire.at).await;
            }
            Some((req, outcome)) = dispatcher.next_done(), if dispatcher.running() > 0 => {
                match outcome {
                    Ok(Outcome::Waiting(why)) => {
                        info!(job = %req.job, run_date = %req.run_date, %why, "waiting");
                        dispatcher.push(req, Instant::now() + opts.poll);
                    }
                    Ok(Outcome::Busy) => {
                        info!(job = %req.job, run_date = %req.run_date, "another process holds the job's lease; will look again");
                        dispatcher.push(req, Instant::now() + opts.poll);
                    }
                    Ok(o) => info!(job = %req.job, run_date = %req.run_date, outcome = ?o, "run ended"),
                    Err(e) => {
                        error!(job = %req.job, run_date = %req.run_date, error = %format!("{e:#}"), "run could not be executed; will try again");
                        dispatcher.push(req, Instant::now() + opts.poll);
                    }
                }
            }
            _ = tokio::time::sleep(opts.poll.min(Duration::from_secs(5))) => {}
        }
    }

    info!(running = dispatcher.running(), grace = ?opts.grace, "shutting down: no new runs; waiting for running ones");
    let mut timer = timer;
    let _ = timer.shutdown().await;
    let deadline = tokio::time::sleep(opts.grace);
    tokio::pin!(deadline);
    while dispatcher.running() > 0 {
        tokio::select! {
            _ = &mut deadline => {
                warn!(running = dispatcher.running(), "grace period over: cancelling running runs (nothing half-published)");
                dispatcher.cancel.cancel();
                break;
            }
            d = dispatcher.next_done() => if let Some((req, o)) = d {
                info!(job = %req.job, run_date = %req.run_date, outcome = ?o, "run ended");
            }
        }
    }
    while let Some((req, o)) = dispatcher.next_done().await {
        info!(job = %req.job, run_date = %req.run_date, outcome = ?o, "run ended");
    }
    stop_http.cancel();
    info!("scheduler stopped");
    Ok(())
}

/// Requests for `job` on every date in `[from, to]`, in order.
pub fn backfill_requests(job: &str, from: NaiveDate, to: NaiveDate, force: bool) -> Vec<Request> {
    from.iter_days()
        .take_while(|d| *d <= to)
        .map(|d| Request {
            job: job.to_string(),
            run_date: d,
            trigger: Trigger::Backfill,
            scheduled_for: None,
            force,
        })
        .collect()
}
