//! Run history and leases, kept in the state store of `config.yaml` (`state.url`), so they
//! survive restarts and are shared by every daemon pointed at the same store.
//!
//! ```text
//! <state>/history/<job>/<run_date>/<attempt>-<run id>.json   one record per attempt
//! <state>/leases/<job>.json                                   object stores: lease object
//! <state>/leases/<job>.lock                                   local folder: OS file lock
//! ```
//!
//! A lease is per job: while one process holds it, no other runs that job (no overlap, even
//! across daemons). On object stores it is created only if absent and renewed only if unchanged
//! (conditional puts), and it expires, so a crashed holder blocks others for at most one TTL. On
//! a local folder it is an OS file lock, which the OS releases when its holder dies.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, NaiveDate, Utc};
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use serde::{Deserialize, Serialize};

use crate::catalog::stores::{Location, Store};
use crate::error::{Error, Result};
use crate::job::Project;

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
}

/// The state store.
#[derive(Debug, Clone)]
pub struct StateStore {
    loc: Location,
}

fn io_err(e: impl std::fmt::Display) -> Error {
    Error::Internal(format!("state store: {e}"))
}

impl StateStore {
    /// The store named by `state.url` (default `file://./data/_clvflow`).
    pub fn open(project: &Project) -> Result<Self> {
        let url = project
            .config
            .value
            .state
            .as_ref()
            .map(|s| s.url.clone())
            .unwrap_or_else(|| "file://./data/_clvflow".to_string());
        let loc = if let Some(rel) = url.strip_prefix("file://") {
            let dir = project.root.join(rel);
            std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, "create state folder", e))?;
            local_location(&dir)?
        } else {
            project
                .stores
                .resolve(&url)
                .map_err(|m| Error::Config(vec![project.config.diag("state.url", m)]))?
        };
        Ok(Self { loc })
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

    fn record_key(r: &RunRecord) -> String {
        format!(
            "history/{}/{}/{:04}-{}.json",
            r.job, r.run_date, r.attempt, r.run_id
        )
    }

    /// Writes (or rewrites) one attempt's record.
    pub async fn put(&self, r: &RunRecord) -> Result<()> {
        let body = serde_json::to_vec_pretty(r).map_err(io_err)?;
        self.store()
            .put(
                &self.path(&Self::record_key(r)),
                PutPayload::from(Bytes::from(body)),
            )
            .await
            .map_err(|e| self.err("write run history", e))?;
        Ok(())
    }

    async fn read_all(&self, prefix: &str) -> Result<Vec<RunRecord>> {
        let metas: Vec<_> = self
            .store()
            .list(Some(&self.path(prefix)))
            .try_collect()
            .await
            .map_err(|e| self.err("list run history", e))?;
        let store = self.loc.store.object_store.clone();
        let mut out: Vec<RunRecord> = futures::stream::iter(
            metas
                .into_iter()
                .filter(|m| m.location.as_ref().ends_with(".json")),
        )
        .map(|m| {
            let store = store.clone();
            async move {
                let bytes = store.get(&m.location).await?.bytes().await?;
                Ok::<_, object_store::Error>(serde_json::from_slice::<RunRecord>(&bytes).ok())
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await
        .map_err(|e| self.err("read run history", e))?
        .into_iter()
        .flatten()
        .collect();
        out.sort_by_key(|a| (a.started_at, a.attempt));
        Ok(out)
    }

    /// All records, oldest first; only `job`'s when given.
    pub async fn history(&self, job: Option<&str>) -> Result<Vec<RunRecord>> {
        match job {
            Some(j) => self.read_all(&format!("history/{j}")).await,
            None => self.read_all("history").await,
        }
    }

    /// Records of one run date of one job, oldest first.
    pub async fn runs_on(&self, job: &str, date: NaiveDate) -> Result<Vec<RunRecord>> {
        self.read_all(&format!("history/{job}/{date}")).await
    }

    /// Whether `job` has a succeeded run for `date`.
    pub async fn succeeded(&self, job: &str, date: NaiveDate) -> Result<bool> {
        Ok(self
            .runs_on(job, date)
            .await?
            .iter()
            .any(|r| r.status == Status::Succeeded))
    }

    /// Takes the lease of `job`, or None when another process holds it.
    pub async fn acquire(&self, job: &str, owner: &str, ttl: Duration) -> Result<Option<Lease>> {
        if self.loc.store.root.scheme() == "file" {
            return self.acquire_local(job);
        }
        let path = self.path(&format!("leases/{job}.json"));
        let body = lease_body(owner, ttl)?;
        let create = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        let version = match self.store().put_opts(&path, body.clone(), create).await {
            Ok(r) => UpdateVersion {
                e_tag: r.e_tag,
                version: r.version,
            },
            Err(object_store::Error::AlreadyExists { .. }) => {
                let current = match self.store().get(&path).await {
                    Ok(g) => g,
                    Err(object_store::Error::NotFound { .. }) => return Ok(None), // released meanwhile: next try
                    Err(e) => return Err(self.err("read lease", e)),
                };
                let seen = UpdateVersion {
                    e_tag: current.meta.e_tag.clone(),
                    version: current.meta.version.clone(),
                };
                let bytes = current
                    .bytes()
                    .await
                    .map_err(|e| self.err("read lease", e))?;
                let held: Option<LeaseBody> = serde_json::from_slice(&bytes).ok();
                if held.is_some_and(|h| h.expires_at > Utc::now()) {
                    return Ok(None);
                }
                // Expired (its holder died): take it over, unless someone else just did.
                let update = PutOptions {
                    mode: PutMode::Update(seen),
                    ..Default::default()
                };
                match self.store().put_opts(&path, body, update).await {
                    Ok(r) => UpdateVersion {
                        e_tag: r.e_tag,
                        version: r.version,
                    },
                    Err(object_store::Error::Precondition { .. })
                    | Err(object_store::Error::AlreadyExists { .. }) => return Ok(None),
                    Err(e) => return Err(self.err("take over expired lease", e)),
                }
            }
            Err(e) => return Err(self.err("create lease", e)),
        };
        let remote = RemoteLease {
            store: self.loc.store.object_store.clone(),
            path,
            owner: owner.to_string(),
            ttl,
            version: tokio::sync::Mutex::new(version),
        };
        Ok(Some(Lease::Remote(Arc::new(remote))))
    }

    fn acquire_local(&self, job: &str) -> Result<Option<Lease>> {
        let dir = std::path::PathBuf::from(format!("/{}", self.loc.path.as_ref())).join("leases");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, "create lease folder", e))?;
        let file_path = dir.join(format!("{job}.lock"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&file_path)
            .map_err(|e| Error::io(&file_path, "open lease file", e))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(Lease::Local(Arc::new(file)))),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => {
                Err(Error::io(&file_path, "lock lease file", e))
            }
        }
    }
}

/// A `file://` location for a local folder outside the configured stores.
fn local_location(dir: &std::path::Path) -> Result<Location> {
    let dir = std::path::absolute(dir).map_err(|e| Error::io(dir, "resolve state folder", e))?;
    let url = url::Url::from_directory_path(&dir)
        .map_err(|_| io_err(format!("{} is not a folder path", dir.display())))?;
    let registry_url = url::Url::parse("file://").map_err(io_err)?;
    let store = Store {
        name: "state".into(),
        root: url.clone(),
        registry_url,
        object_store: Arc::new(object_store::local::LocalFileSystem::new()),
    };
    Ok(Location {
        store,
        path: Path::from_absolute_path(&dir).map_err(io_err)?,
        url: url.to_string(),
    })
}

#[derive(Debug, Serialize, Deserialize)]
struct LeaseBody {
    owner: String,
    expires_at: DateTime<Utc>,
}

fn lease_body(owner: &str, ttl: Duration) -> Result<PutPayload> {
    let body = LeaseBody {
        owner: owner.to_string(),
        expires_at: Utc::now() + chrono::Duration::from_std(ttl).map_err(io_err)?,
    };
    Ok(PutPayload::from(Bytes::from(
        serde_json::to_vec(&body).map_err(io_err)?,
    )))
}

/// A held lease. Dropping it without `release` leaves an object-store lease to expire.
#[derive(Debug, Clone)]
pub enum Lease {
    Local(Arc<std::fs::File>),
    Remote(Arc<RemoteLease>),
}

#[derive(Debug)]
pub struct RemoteLease {
    store: Arc<dyn ObjectStore>,
    path: Path,
    owner: String,
    ttl: Duration,
    version: tokio::sync::Mutex<UpdateVersion>,
}

impl Lease {
    /// Extends the lease; false if it was lost (taken over after it expired).
    pub async fn renew(&self) -> bool {
        let Lease::Remote(r) = self else { return true };
        let Ok(body) = lease_body(&r.owner, r.ttl) else {
            return false;
        };
        let mut v = r.version.lock().await;
        let opts = PutOptions {
            mode: PutMode::Update(v.clone()),
            ..Default::default()
        };
        match r.store.put_opts(&r.path, body, opts).await {
            Ok(res) => {
                *v = UpdateVersion {
                    e_tag: res.e_tag,
                    version: res.version,
                };
                true
            }
            Err(_) => false,
        }
    }

    /// How often to renew.
    pub fn renew_every(&self) -> Option<Duration> {
        match self {
            Lease::Local(_) => None,
            Lease::Remote(r) => Some(r.ttl / 3),
        }
    }

    /// Gives the lease up.
    pub async fn release(self) {
        match self {
            Lease::Local(file) => {
                let _ = file.unlock();
            }
            Lease::Remote(r) => {
                let _ = r.store.delete(&r.path).await;
            }
        }
    }
}
