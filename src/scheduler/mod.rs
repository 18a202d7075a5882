//! `clvflow schedule`, `clvflow backfill`, and the execution of every run.
//!
//! tokio-cron-scheduler is only the timer ([`daemon`]): for each job the daemon computes the next
//! fire itself (`crate::job::schedule`, DST-correct) and asks the timer for a one-shot wake-up at
//! that instant. Run state, overlap control, dependencies, retries, timeouts, catch-up and
//! leases are ours ([`execute`], `crate::state`), because the timer alone freezes the UTC
//! offset, overlaps runs, forgets missed runs and does not wait for running jobs on shutdown.
//!
//! Rules:
//! - a run is (job, run date); the run date of a fire is its wall-clock date in the job's zone;
//!   a date that succeeded is never run again by the daemon (only `backfill --force` does);
//! - one job never runs twice at once; at most `max_active_runs` runs at once in all;
//! - runs queued for the same date start in dependency order; a run whose upstream job has not
//!   committed the date waits, is started again as soon as the upstream commits in this process
//!   (else after `poll_interval`), and is skipped (recorded) once the upstream gave up;
//! - on start, missed fires since the job's last recorded fire are run, oldest first, at most
//!   `max_catchup` per job (the most recent ones); `catchup: false` skips them. A job with no
//!   history at all is not caught up (use `backfill`).

pub mod daemon;
pub mod execute;
pub mod metrics;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::NaiveDate;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::error;

use crate::error::{Error, Result};
use crate::job::{self, JobPlan};
use crate::project::Project;
use crate::state::{Status, Trigger};
use execute::{Outcome, Request, RunContext};

/// Loads and validates every job of the project, in run order.
pub async fn load_jobs(project: &Project) -> Result<BTreeMap<String, JobPlan>> {
    let names = project.job_names()?;
    let (plans, diags) = job::validate_jobs(project, &names).await?;
    if !diags.is_empty() {
        return Err(Error::Config(diags));
    }
    Ok(plans.into_iter().map(|p| (p.name.clone(), p)).collect())
}

/// Starts runs from a queue under the daemon's rules: dependency order within a date, no job
/// twice at once, at most `max_active` at once, and a run waiting for an upstream job woken
/// when that job commits the date here.
pub struct Dispatcher {
    ctx: Arc<RunContext>,
    order: HashMap<String, usize>,
    max_active: usize,
    queue: Vec<(Request, Instant)>,
    active: HashSet<String>,
    tasks: JoinSet<(Request, Result<Outcome>)>,
    /// Counts the commits seen; a (job, date) maps to the count when it was last started.
    commits: u64,
    started_at: HashMap<(String, NaiveDate), u64>,
    committed_at: HashMap<(String, NaiveDate), u64>,
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
            commits: 0,
            started_at: HashMap::new(),
            committed_at: HashMap::new(),
            cancel: CancellationToken::new(),
        }
    }

    fn depends_on(&self, job: &str) -> &[String] {
        self.ctx
            .jobs
            .get(job)
            .map_or(&[], |p| p.depends_on.as_slice())
    }

    /// Queues `req` unless the same run is already queued. A run that waited for an upstream
    /// job that has committed the date since the run was last started goes at once.
    pub fn push(&mut self, req: Request, not_before: Instant) {
        let dup = self
            .queue
            .iter()
            .any(|(q, _)| q.job == req.job && q.run_date == req.run_date);
        if dup {
            return;
        }
        let key = (req.job.clone(), req.run_date);
        let upstream_since = self.started_at.get(&key).is_some_and(|started| {
            self.depends_on(&req.job).iter().any(|d| {
                self.committed_at
                    .get(&(d.clone(), req.run_date))
                    .is_some_and(|c| c > started)
            })
        });
        let at = if upstream_since {
            Instant::now()
        } else {
            not_before
        };
        self.queue.push((req, at));
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
            self.started_at
                .insert((req.job.clone(), req.run_date), self.commits);
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
                if matches!(
                    outcome,
                    Ok(Outcome::Finished(Status::Succeeded)) | Ok(Outcome::AlreadyDone)
                ) {
                    self.committed(&req);
                }
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

    /// `req` committed its date: runs queued for that date that depend on its job go now.
    fn committed(&mut self, req: &Request) {
        self.commits += 1;
        self.committed_at
            .insert((req.job.clone(), req.run_date), self.commits);
        let now = Instant::now();
        let deps: HashMap<String, Vec<String>> = self
            .ctx
            .jobs
            .iter()
            .map(|(n, p)| (n.clone(), p.depends_on.clone()))
            .collect();
        for (q, at) in &mut self.queue {
            if q.run_date == req.run_date && deps.get(&q.job).is_some_and(|d| d.contains(&req.job))
            {
                *at = now;
            }
        }
    }
}

/// Runs `requests` to the end (backfill, tests): waits and lease conflicts are retried after
/// `poll` (a wait sooner, when its upstream commits here); a run still waiting for an upstream
/// job when nothing else can run is given up. A lease conflict is always retried: another
/// process is running the job (or its lease expires within `lease_ttl`), so the date can run
/// once that run ends; giving up on it made two processes each skip a date the other had left.
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
            let next = dispatcher
                .queue
                .iter()
                .map(|(_, at)| *at)
                .min()
                .unwrap_or_else(Instant::now);
            tokio::time::sleep_until(next.max(Instant::now() + Duration::from_millis(1))).await;
            continue;
        }
        let Some((req, outcome)) = dispatcher.next_done().await else {
            continue;
        };
        match outcome {
            Ok(Outcome::Busy) => {
                tracing::info!(job = %req.job, run_date = %req.run_date,
                               "the job is running in another process: retried when its lease is free");
                dispatcher.push(req, Instant::now() + poll);
            }
            Ok(Outcome::Waiting(_)) if stalled <= dispatcher.queued() + 1 => {
                stalled += 1;
                dispatcher.push(req, Instant::now() + poll);
            }
            other => {
                if !matches!(other, Ok(Outcome::Waiting(_))) {
                    stalled = 0;
                }
                done.push((req, other));
            }
        }
    }
    done
}

/// Requests for `job` on every date in `[from, to]`, in order.
pub fn backfill_requests(job: &str, from: NaiveDate, to: NaiveDate, force: bool) -> Vec<Request> {
    from.iter_days()
        .take_while(|d| *d <= to)
        .map(|d| Request {
            force,
            ..Request::new(job, d, Trigger::Backfill)
        })
        .collect()
}
