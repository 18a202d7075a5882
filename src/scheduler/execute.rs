//! Executing one run request — (job, run date) — with everything the daemon promises around it:
//! upstream jobs checked, the job's lease held and renewed (no overlap, even across daemons),
//! exactly once per run date (history checked under the lease), retries with exponential
//! backoff, a timeout per attempt that cancels without publishing, and every attempt recorded
//! in the history. Scheduled runs, catch-up, backfills and `clvflow run` all come through
//! [`RunContext::execute_reporting`]: there is one way a run happens.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::metrics::Metrics;
use crate::error::{Error, Result, chain};
use crate::job::JobPlan;
use crate::project::Project;
use crate::run::{self, RunReport};
use crate::state::{Lease, Renewal, RunRecord, StateStore, Status, Trigger};

/// Runs a job for a date. The real one is [`JobExecutor`]; tests script outcomes.
pub trait Executor: Send + Sync + 'static {
    fn run<'a>(
        &'a self,
        job: &'a JobPlan,
        date: NaiveDate,
        run_id: &'a str,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, Result<RunReport>>;
}

/// Runs jobs with [`run::run_job`] on the project's engine (one memory pool for all runs).
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
    ) -> BoxFuture<'a, Result<RunReport>> {
        Box::pin(async move { run::run_job(&self.project, job, date, run_id, &cancel).await })
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
    /// Retries instead of the job's `retries.max` (`clvflow run --retries N`).
    pub retries: Option<u32>,
    /// Backoff instead of the job's `retries.backoff` (`clvflow run --backoff D`).
    pub backoff: Option<Duration>,
}

impl Request {
    /// A request for `job` on `run_date`, not forced, with the job's retries.
    pub fn new(job: &str, run_date: NaiveDate, trigger: Trigger) -> Self {
        Self {
            job: job.to_string(),
            run_date,
            trigger,
            scheduled_for: None,
            force: false,
            retries: None,
            backoff: None,
        }
    }
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

/// Shared by every run of a daemon (or a backfill, or a manual run).
pub struct RunContext {
    pub state: StateStore,
    pub executor: Arc<dyn Executor>,
    pub jobs: BTreeMap<String, JobPlan>,
    pub lease_ttl: Duration,
    /// Identifies this process in leases and history.
    pub owner: String,
    pub metrics: Arc<Metrics>,
}

/// Identifies this process in leases and history: host, pid and a random part.
pub fn owner() -> String {
    format!(
        "{}:{}:{}",
        crate::state::host(),
        std::process::id(),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

impl RunContext {
    /// Executes `req`. `cancel` is the daemon's shutdown: it ends a running attempt without
    /// publishing and stops further retries.
    pub async fn execute(&self, req: &Request, cancel: &CancellationToken) -> Result<Outcome> {
        self.execute_reporting(req, cancel).await.map(|(o, _)| o)
    }

    /// [`Self::execute`], also returning the report of the attempt that succeeded.
    pub async fn execute_reporting(
        &self,
        req: &Request,
        cancel: &CancellationToken,
    ) -> Result<(Outcome, Option<RunReport>)> {
        let job = self
            .jobs
            .get(&req.job)
            .ok_or_else(|| Error::Internal(format!("no loaded job `{}`", req.job)))?;
        // A manual run is the user's explicit call: it does not wait for upstream jobs.
        if req.trigger != Trigger::Manual
            && let Some(outcome) = self.check_upstream(job, req).await?
        {
            return Ok((outcome, None));
        }
        let Some(lease) = self
            .state
            .acquire(&job.name, &self.owner, self.lease_ttl)
            .await?
        else {
            return Ok((Outcome::Busy, None));
        };
        // Cancelled with `cancel`, and when the lease is lost.
        let cancel = &cancel.child_token();
        let renewing = renew_while_held(&lease, &job.name, cancel.clone());
        let result = async {
            if !req.force && self.state.succeeded(&job.name, req.run_date).await? {
                info!(job = %job.name, run_date = %req.run_date, "already succeeded; not run again");
                return Ok((Outcome::AlreadyDone, None));
            }
            let (status, report) = self.attempts(job, req, cancel).await?;
            Ok((Outcome::Finished(status), report))
        }
        .await;
        renewing.cancel();
        lease.release().await;
        result
    }

    /// None when every upstream job committed the date; otherwise skip or wait.
    async fn check_upstream(&self, job: &JobPlan, req: &Request) -> Result<Option<Outcome>> {
        for dep in &job.depends_on {
            let runs = self.state.runs_on(dep, req.run_date).await?;
            if runs.iter().any(|r| r.status == Status::Succeeded) {
                continue;
            }
            let given_up = runs.last().is_some_and(|r| {
                r.status.is_final() && (r.attempt >= r.max_attempts || r.status == Status::Skipped)
            });
            if given_up {
                let reason = format!("upstream job `{dep}` did not succeed for {}", req.run_date);
                let mut record = RunRecord::start(
                    &run::new_run_id(),
                    &job.name,
                    req.run_date,
                    (1, 1),
                    req.trigger,
                    req.scheduled_for,
                );
                record.end(Status::Skipped, Some(reason.clone()));
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
    ) -> Result<(Status, Option<RunReport>)> {
        let max_attempts = 1 + req.retries.unwrap_or(job.retries.max);
        let backoff = req.backoff.unwrap_or(job.retries.backoff);
        let mut status = Status::Failed;
        let mut last_error = None;
        for attempt in 1..=max_attempts {
            let run_id = run::new_run_id();
            let mut record = RunRecord::start(
                &run_id,
                &job.name,
                req.run_date,
                (attempt, max_attempts),
                req.trigger,
                req.scheduled_for,
            );
            self.state.put(&record).await?;
            self.metrics.started(&job.name);
            let started = tokio::time::Instant::now();
            let attempt_cancel = cancel.child_token();
            let run = self
                .executor
                .run(job, req.run_date, &run_id, attempt_cancel.clone());
            tokio::pin!(run);
            let limit = async {
                match job.timeout {
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
            // A run that finished its commit before the timeout hit still succeeded.
            status = match &result {
                Ok(_) => Status::Succeeded,
                Err(_) if timed_out => Status::TimedOut,
                Err(Error::Cancelled(_)) if cancel.is_cancelled() => Status::Cancelled,
                Err(_) => Status::Failed,
            };
            let error = match (&result, status) {
                (_, Status::TimedOut) => Some(format!(
                    "timed out after {:?}; nothing was published",
                    job.timeout.unwrap_or_default()
                )),
                (Err(e), _) => Some(chain(e)),
                _ => None,
            };
            if let Ok(report) = &result {
                (record.rows, record.files) = report.totals();
                record.facts = Some(report.facts());
            }
            record.end(status, error);
            self.state.put(&record).await?;
            self.metrics.finished(&job.name, status, started.elapsed());
            info!(job = %job.name, run_date = %req.run_date, attempt, max_attempts, %status,
                  error = record.error.as_deref().unwrap_or(""), "attempt finished");
            match result {
                Ok(report) => return Ok((status, Some(report))),
                Err(e) => last_error = Some(e),
            }
            if status == Status::Cancelled || attempt == max_attempts {
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
        // The last attempt's error stays in its record (and the log); a manual run shows it.
        if let Some(e) = last_error
            && req.trigger == Trigger::Manual
        {
            return Err(e);
        }
        Ok((status, None))
    }
}

/// Renews `lease` every third of its TTL until the returned token is cancelled. When the lease
/// is lost — another process took it over, or no renewal succeeded for a whole TTL, after which
/// another process may take it — `run` is cancelled: a run without the lease must not go on to
/// commit, since another process may be running the same job (the commit protocol would keep the
/// outputs consistent, but two runs would race for them).
fn renew_while_held(lease: &Lease, job: &str, run: CancellationToken) -> CancellationToken {
    let stop = CancellationToken::new();
    if let (Some(every), Some(ttl)) = (lease.renew_every(), lease.ttl()) {
        let (lease, stop, job) = (lease.clone(), stop.clone(), job.to_string());
        tokio::spawn(async move {
            let mut renewed = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(every) => {
                        let why = match lease.renew().await {
                            Renewal::Renewed => {
                                renewed = tokio::time::Instant::now();
                                continue;
                            }
                            Renewal::Lost => "another process took it over".to_string(),
                            Renewal::Failed(e) if renewed.elapsed() + every / 2 >= ttl => {
                                format!("no renewal succeeded for {ttl:?}; the last error: {e}")
                            }
                            Renewal::Failed(e) => {
                                warn!(job = %job, error = %e, "could not renew the job's lease; trying again");
                                continue;
                            }
                        };
                        tracing::error!(job = %job, reason = %why,
                            "lost the job's lease: the run is cancelled (nothing it has not committed is published)");
                        run.cancel();
                        break;
                    }
                }
            }
        });
    }
    stop
}
