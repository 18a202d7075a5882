//! Executing one run request — (job, run date) — with everything the daemon promises around it:
//! upstream jobs checked, the job's lease held (no overlap, even across daemons), exactly once
//! per run date (history checked under the lease), retries with exponential backoff, a timeout
//! per attempt that cancels without publishing, and every attempt recorded in the history.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::metrics::Metrics;
use crate::error::{Error, Result};
use crate::job::{JobPlan, Project};
use crate::runner;
use crate::state::{RunRecord, StateStore, Status, Trigger};

/// What an executed run produced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunTotals {
    pub rows: u64,
    pub files: u64,
}

/// Runs a job for a date. The real one is [`JobExecutor`]; tests script outcomes.
pub trait Executor: Send + Sync + 'static {
    fn run<'a>(
        &'a self,
        job: &'a JobPlan,
        date: NaiveDate,
        run_id: &'a str,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, Result<RunTotals>>;
}

/// Runs jobs with [`runner::run_job_cancellable`].
pub struct JobExecutor {
    pub project: Project,
}

impl Executor for JobExecutor {
    fn run<'a>(
        &'a self,
        job: &'a JobPlan,
        date: NaiveDate,
        run_id: &'a str,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, Result<RunTotals>> {
        Box::pin(async move {
            let r = runner::run_job_cancellable(&self.project, job, date, run_id, &cancel).await?;
            Ok(RunTotals {
                rows: r.outputs.iter().map(|o| o.rows).sum(),
                files: r.outputs.iter().map(|o| o.files as u64).sum(),
            })
        })
    }
}

/// A run to execute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub job: String,
    pub run_date: NaiveDate,
    pub trigger: Trigger,
    pub scheduled_for: Option<DateTime<Utc>>,
    /// Run even if the date already succeeded.
    pub force: bool,
}

/// How a request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Attempts were made; the last one ended so.
    Finished(Status),
    /// Skipped: an upstream job failed for the date (recorded in the history).
    Skipped(String),
    /// An upstream job has not committed the date yet: try again later.
    Waiting(String),
    /// Another process holds the job's lease: try again later.
    Busy,
    /// The date already succeeded (nothing done).
    AlreadyDone,
}

/// Shared by every run of a daemon (or a backfill).
pub struct RunContext {
    pub state: StateStore,
    pub executor: Arc<dyn Executor>,
    pub jobs: BTreeMap<String, JobPlan>,
    pub lease_ttl: Duration,
    /// Identifies this process in leases and history.
    pub owner: String,
    pub metrics: Arc<Metrics>,
}

fn host() -> String {
    std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into())
}

impl RunContext {
    /// Executes `req`. `cancel` is the daemon's shutdown: it ends a running attempt without
    /// publishing and stops further retries.
    pub async fn execute(&self, req: &Request, cancel: &CancellationToken) -> Result<Outcome> {
        let job = self
            .jobs
            .get(&req.job)
            .ok_or_else(|| Error::Internal(format!("no loaded job `{}`", req.job)))?;
        if let Some(outcome) = self.check_upstream(job, req).await? {
            return Ok(outcome);
        }
        let Some(lease) = self
            .state
            .acquire(&job.name, &self.owner, self.lease_ttl)
            .await?
        else {
            return Ok(Outcome::Busy);
        };
        let renewing = CancellationToken::new();
        if let Some(every) = lease.renew_every() {
            let (lease, stop, name) = (lease.clone(), renewing.clone(), job.name.clone());
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(every) => {
                            if !lease.renew().await {
                                warn!(job = %name, "lost the job's lease (not renewed in time)");
                                break;
                            }
                        }
                    }
                }
            });
        }
        let result = async {
            if !req.force && self.state.succeeded(&job.name, req.run_date).await? {
                info!(job = %job.name, run_date = %req.run_date, "already succeeded; not run again");
                return Ok(Outcome::AlreadyDone);
            }
            self.attempts(job, req, cancel).await.map(Outcome::Finished)
        }
        .await;
        renewing.cancel();
        lease.release().await;
        result
    }

    /// None when every upstream job committed the date; otherwise skip or wait.
    async fn check_upstream(&self, job: &JobPlan, req: &Request) -> Result<Option<Outcome>> {
        for dep in &job.doc.value.depends_on {
            let runs = self.state.runs_on(dep, req.run_date).await?;
            if runs.iter().any(|r| r.status == Status::Succeeded) {
                continue;
            }
            let given_up = runs.last().is_some_and(|r| {
                r.status.is_final() && (r.attempt >= r.max_attempts || r.status == Status::Skipped)
            });
            if given_up {
                let reason = format!("upstream job `{dep}` did not succeed for {}", req.run_date);
                let now = Utc::now();
                let record = RunRecord {
                    run_id: runner::new_run_id(),
                    job: job.name.clone(),
                    run_date: req.run_date,
                    attempt: 1,
                    max_attempts: 1,
                    trigger: req.trigger,
                    scheduled_for: req.scheduled_for,
                    started_at: now,
                    ended_at: Some(now),
                    status: Status::Skipped,
                    rows: 0,
                    files: 0,
                    error: Some(reason.clone()),
                    host: host(),
                };
                self.state.put(&record).await?;
                self.metrics
                    .finished(&job.name, Status::Skipped, Duration::ZERO);
                warn!(job = %job.name, run_date = %req.run_date, %reason, "run skipped");
                return Ok(Some(Outcome::Skipped(reason)));
            }
            return Ok(Some(Outcome::Waiting(format!(
                "waiting for `{dep}` to commit {}",
                req.run_date
            ))));
        }
        Ok(None)
    }

    async fn attempts(
        &self,
        job: &JobPlan,
        req: &Request,
        cancel: &CancellationToken,
    ) -> Result<Status> {
        let retries = job.doc.value.retries.as_ref();
        let max_attempts = 1 + retries.map_or(0, |r| r.max);
        let backoff = retries.map_or(Duration::from_secs(60), |r| r.backoff.0);
        let timeout = job.doc.value.timeout.map(|t| t.0);
        let mut status = Status::Failed;
        for attempt in 1..=max_attempts {
            let run_id = runner::new_run_id();
            let mut record = RunRecord {
                run_id: run_id.clone(),
                job: job.name.clone(),
                run_date: req.run_date,
                attempt,
                max_attempts,
                trigger: req.trigger,
                scheduled_for: req.scheduled_for,
                started_at: Utc::now(),
                ended_at: None,
                status: Status::Running,
                rows: 0,
                files: 0,
                error: None,
                host: host(),
            };
            self.state.put(&record).await?;
            self.metrics.started(&job.name);
            let started = tokio::time::Instant::now();
            let attempt_cancel = cancel.child_token();
            let run = self
                .executor
                .run(job, req.run_date, &run_id, attempt_cancel.clone());
            tokio::pin!(run);
            let limit = async {
                match timeout {
                    Some(t) => tokio::time::sleep(t).await,
                    None => std::future::pending().await,
                }
            };
            let (result, timed_out) = tokio::select! {
                r = &mut run => (r, false),
                _ = limit => {
                    attempt_cancel.cancel();
                    (run.await, true)
                }
            };
            status = match &result {
                Ok(_) => Status::Succeeded,
                Err(_) if timed_out => Status::TimedOut,
                Err(Error::Cancelled(_)) if cancel.is_cancelled() => Status::Cancelled,
                Err(_) => Status::Failed,
            };
            if let Ok(t) = &result {
                record.rows = t.rows;
                record.files = t.files;
            }
            // A run that finished its commit before the timeout hit still succeeded.
            if timed_out && result.is_ok() {
                status = Status::Succeeded;
            }
            record.error = match (&result, status) {
                (_, Status::TimedOut) => Some(format!(
                    "timed out after {:?}; nothing was published",
                    timeout.unwrap_or_default()
                )),
                (Err(e), _) => Some(format!("{e:#}")),
                _ => None,
            };
            record.status = status;
            record.ended_at = Some(Utc::now());
            self.state.put(&record).await?;
            self.metrics.finished(&job.name, status, started.elapsed());
            info!(job = %job.name, run_date = %req.run_date, attempt, max_attempts, %status,
                  error = record.error.as_deref().unwrap_or(""), "attempt finished");
            if matches!(status, Status::Succeeded | Status::Cancelled) || attempt == max_attempts {
                break;
            }
            let wait = backoff.saturating_mul(1 << (attempt - 1).min(16));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = cancel.cancelled() => {
                    status = Status::Cancelled;
                    break;
                }
            }
        }
        Ok(status)
    }
}
