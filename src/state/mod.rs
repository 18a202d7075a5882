//! Run history and leases, kept in the state store of `config.yaml` (`state.url`), so they
//! survive restarts and are shared by every daemon pointed at the same store.
//!
//! ```text
//! <state>/history/<job>/<run_date>/<attempt>-<run id>.json   one record per attempt
//! <state>/scheduled/<job>.json                                the latest fire run (catch-up)
//! <state>/leases/<job>.json                                   object stores: lease object
//! <state>/leases/<job>.lock                                   local folder: OS file lock
//! ```
//!
//! Run ids begin with their start time (`20261122T023000-…`), so the newest records are found
//! from a listing of keys alone and only those are read ([`history`]). A lease is per job: while
//! one process holds it, no other runs that job (no overlap, even across daemons) ([`lease`]).

pub mod history;
pub mod lease;

use chrono::{DateTime, NaiveDate, Utc};
use object_store::ObjectStore;
use object_store::path::Path;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::project::Project;
use crate::storage::Location;
pub use lease::{Lease, Renewal};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Running,
    Succeeded,
    Failed,
    TimedOut,
    Cancelled,
    Skipped,
}

impl Status {
    /// Whether a run in this state will not change any more.
    pub fn is_final(self) -> bool {
        !matches!(self, Status::Running)
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Status::Running => "running",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::TimedOut => "timed_out",
            Status::Cancelled => "cancelled",
            Status::Skipped => "skipped",
        };
        f.write_str(s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    Schedule,
    Catchup,
    Backfill,
    Manual,
}

impl std::fmt::Display for Trigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Trigger::Schedule => "schedule",
            Trigger::Catchup => "catchup",
            Trigger::Backfill => "backfill",
            Trigger::Manual => "manual",
        })
    }
}

/// One attempt of one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub run_id: String,
    pub job: String,
    pub run_date: NaiveDate,
    pub attempt: u32,
    /// Attempts allowed in all (1 + retries).
    pub max_attempts: u32,
    pub trigger: Trigger,
    /// The schedule time this run is for (None for manual runs and backfills).
    pub scheduled_for: Option<DateTime<Utc>>,
    pub started_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
    pub status: Status,
    pub rows: u64,
    pub files: u64,
    pub error: Option<String>,
    pub host: String,
    /// Rows and times per input, step and output of a succeeded run (for its report).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub facts: Option<crate::report::RunFacts>,
}

/// This machine's name for run records.
pub fn host() -> String {
    std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into())
}

impl RunRecord {
    /// The record of an attempt that starts now.
    pub fn start(
        run_id: &str,
        job: &str,
        run_date: NaiveDate,
        (attempt, max_attempts): (u32, u32),
        trigger: Trigger,
        scheduled_for: Option<DateTime<Utc>>,
    ) -> Self {
        Self {
            run_id: run_id.to_string(),
            job: job.to_string(),
            run_date,
            attempt,
            max_attempts,
            trigger,
            scheduled_for,
            started_at: Utc::now(),
            ended_at: None,
            status: Status::Running,
            rows: 0,
            files: 0,
            error: None,
            host: host(),
            facts: None,
        }
    }

    /// Marks the record ended now with `status`.
    pub fn end(&mut self, status: Status, error: Option<String>) {
        self.status = status;
        self.error = error;
        self.ended_at = Some(Utc::now());
    }
}

/// The state store.
#[derive(Debug, Clone)]
pub struct StateStore {
    loc: Location,
}

impl StateStore {
    /// The store named by `state.url`.
    pub fn open(project: &Project) -> Result<Self> {
        let url = &project.state_url;
        let loc = if let Some(rel) = url.strip_prefix("file://") {
            let dir = project.root.join(rel);
            std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, "create state folder", e))?;
            let dir = std::path::absolute(&dir)
                .map_err(|e| Error::io(&dir, "resolve state folder", e))?;
            Location::local_folder(&dir)?
        } else {
            project
                .stores
                .resolve(url)
                .map_err(|m| Error::Config(vec![project.source.diag("state.url", m)]))?
        };
        Ok(Self { loc })
    }

    /// The state store at `loc` (tests).
    pub fn at(loc: Location) -> Self {
        Self { loc }
    }

    pub fn url(&self) -> &str {
        &self.loc.url
    }

    fn store(&self) -> &dyn ObjectStore {
        self.loc.store.object_store.as_ref()
    }

    fn path(&self, rel: &str) -> Path {
        self.loc.child(rel).path
    }

    fn err(&self, action: &str, e: object_store::Error) -> Error {
        Error::store(self.loc.url.clone(), action.to_string(), e)
    }
}
