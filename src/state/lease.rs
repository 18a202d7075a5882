//! Leases: while one process holds a job's lease, no other runs that job (no overlap, even
//! across daemons). On object stores the lease is an object created only if absent
//! (`If-None-Match`), renewed only if unchanged (`If-Match`), and taken over only once it
//! expired (`If-Match` on the expired version), so a crashed holder blocks others for at most
//! one TTL. On a local folder it is an OS file lock, which the OS releases when its holder dies.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use serde::{Deserialize, Serialize};

use super::StateStore;
use crate::error::{Error, Result};

/// What a renewal of a lease came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Renewal {
    Renewed,
    /// Another process holds it now (the lease object changed or went): never ours again.
    Lost,
    /// The store did not answer or refused for another reason; the lease is still ours until
    /// its TTL runs out since the last renewal.
    Failed(String),
}

impl StateStore {
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

#[derive(Debug, Serialize, Deserialize)]
struct LeaseBody {
    owner: String,
    expires_at: DateTime<Utc>,
}

fn lease_body(owner: &str, ttl: Duration) -> Result<PutPayload> {
    let ttl = chrono::Duration::from_std(ttl)
        .map_err(|_| Error::Usage(format!("scheduler.lease_ttl {ttl:?} is too long")))?;
    let body = LeaseBody {
        owner: owner.to_string(),
        expires_at: Utc::now() + ttl,
    };
    let json = serde_json::to_vec(&body)
        .map_err(|e| Error::Internal(format!("serialise a lease: {e}")))?;
    Ok(PutPayload::from(Bytes::from(json)))
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
    pub async fn renew(&self) -> Renewal {
        let Lease::Remote(r) = self else {
            return Renewal::Renewed;
        };
        let body = match lease_body(&r.owner, r.ttl) {
            Ok(b) => b,
            Err(e) => return Renewal::Failed(e.to_string()),
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
                Renewal::Renewed
            }
            // Changed since our last write: another process took the lease over.
            Err(
                object_store::Error::Precondition { .. } | object_store::Error::NotFound { .. },
            ) => Renewal::Lost,
            Err(e) => Renewal::Failed(e.to_string()),
        }
    }

    /// The lease's time to live (how long it is ours without a renewal).
    pub fn ttl(&self) -> Option<Duration> {
        match self {
            Lease::Local(_) => None,
            Lease::Remote(r) => Some(r.ttl),
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
