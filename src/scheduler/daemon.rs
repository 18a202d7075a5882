//! The daemon (`clvflow schedule`): arms a one-shot timer per scheduled job at its next fire,
//! queues fired runs (and on start the runs missed while it was down) on a [`Dispatcher`],
//! serves `/healthz` and `/metrics`, and on SIGTERM/SIGINT starts no new run, lets running ones
//! finish for the grace period, then cancels them (nothing half-published).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_cron_scheduler::{Job as TimerJob, JobScheduler};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::Dispatcher;
use super::execute::{Outcome, Request, RunContext};
use super::metrics;
use crate::error::{Error, Result, chain};
use crate::job::JobPlan;
use crate::job::schedule::{Fire, Schedule};
use crate::state::{StateStore, Trigger};

/// Missed runs to make up at `now`: for each job with catch-up on, the fires after its last
/// recorded scheduled run, the most recent `max_catchup` of them, oldest first.
pub async fn catchup_requests(
    state: &StateStore,
    jobs: &BTreeMap<String, JobPlan>,
    now: DateTime<Utc>,
    max_catchup: usize,
) -> Result<Vec<Request>> {
    let mut out = Vec::new();
    for job in jobs.values().filter(|j| j.catchup) {
        let Some(schedule) = &job.schedule else {
            continue;
        };
        let Some(last) = state.last_scheduled(&job.name).await? else {
            continue;
        };
        let missed = schedule.fires_between(last, now);
        let keep = missed.len().saturating_sub(max_catchup);
        for f in &missed[keep..] {
            out.push(request(&job.name, *f, Trigger::Catchup));
        }
    }
    out.sort_by_key(|r| (r.scheduled_for, r.job.clone()));
    Ok(out)
}

fn request(job: &str, fire: Fire, trigger: Trigger) -> Request {
    Request {
        scheduled_for: Some(fire.at),
        ..Request::new(job, fire.run_date, trigger)
    }
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
    order: Vec<String>,
    opts: DaemonOptions,
    shutdown: CancellationToken,
) -> Result<()> {
    let stop_http = CancellationToken::new();
    if let Some(addr) = opts.listen {
        // The address is the user's: one in use or not ours is a usage error (exit 2).
        let bound = metrics::serve(addr, ctx.metrics.clone(), stop_http.clone())
            .await
            .map_err(|e| Error::Usage(format!("--listen {addr}: cannot listen there: {e}")))?;
        info!(%bound, "serving /healthz and /metrics");
    }
    let scheduled: Vec<(String, Schedule)> = ctx
        .jobs
        .values()
        .filter_map(|p| p.schedule.clone().map(|s| (p.name.clone(), s)))
        .collect();
    let mut dispatcher = Dispatcher::new(ctx.clone(), &order, opts.max_active_runs);
    for r in catchup_requests(&ctx.state, &ctx.jobs, Utc::now(), opts.max_catchup).await? {
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
        let (timer, tx) = (timer.clone(), tx.clone());
        let (name, schedule) = scheduled[idx].clone();
        async move {
            let Some(fire) = schedule.next_after(after) else {
                warn!(job = %name, "schedule never fires again");
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
                        error!(job = %name, error = %e, "cannot arm the timer");
                    }
                }
                Err(e) => error!(job = %name, error = %e, "cannot arm the timer"),
            }
            info!(job = %name, next = %fire.at, run_date = %fire.run_date, "next run");
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
                let job = &scheduled[idx].0;
                info!(job = %job, run_date = %fire.run_date, "schedule fired");
                dispatcher.push(request(job, fire, Trigger::Schedule), Instant::now());
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
                        error!(job = %req.job, run_date = %req.run_date, error = %chain(&e), "run could not be executed; will try again");
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
