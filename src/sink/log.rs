//! The commit log of one output table, kept beside it (never inside it, so BI tools that scan
//! the table folder see only data files):
//!
//! ```text
//! <parent>/<table>/                           the table (Hive folders of Parquet files)
//! <parent>/_clvflow/<table>/commits/<v>.json  commit markers, v = 00000000000000000001, ...
//! <parent>/_clvflow/<table>/published.json    {"version": v}: commit v is fully published
//! <parent>/_clvflow/<table>/staging/<run>/    data files of a run that is not yet published
//! ```
//!
//! A commit marker is created only if absent (`PutMode::Create`): two writers can never both
//! commit version v, and a marker is never rewritten.

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::storage::Location;

/// One data file of the table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataFile {
    /// Path relative to the table folder, e.g. `run_date=2026-11-22/part-1a2b-0.parquet`.
    pub path: String,
    pub rows: u64,
    pub bytes: u64,
}

/// A file this commit adds, and where it waits until published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddedFile {
    #[serde(flatten)]
    pub file: DataFile,
    /// Path relative to the log folder, e.g. `staging/<run>/run_date=.../x.parquet`.
    pub staged: String,
}

/// A column of the written table (partition columns included, marked).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnInfo {
    pub name: String,
    pub data_type: String,
    pub partition: bool,
}

/// The commit marker: everything a reader or the next run needs to know about one run's output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Commit {
    pub version: u64,
    pub run_id: String,
    pub job: String,
    pub run_date: String,
    pub output: String,
    pub table_url: String,
    pub committed_at: String,
    pub schema: Vec<ColumnInfo>,
    pub partition_by: Vec<String>,
    /// Folders (relative to the table) this run replaced: partition folders, or `""` (the
    /// table folder itself) for an unpartitioned table.
    pub replaced: Vec<String>,
    pub rows: u64,
    pub added: Vec<AddedFile>,
    /// Files (relative to the table) that the run's partitions held before and that go away.
    pub removed: Vec<String>,
    /// Every data file of the table once this commit is published.
    pub files: Vec<DataFile>,
}

/// The log folder of a table and the operations on it.
#[derive(Debug, Clone)]
pub struct TableLog {
    pub table: Location,
    pub log: Location,
}

#[derive(Debug, Serialize, Deserialize)]
struct Published {
    version: u64,
}

/// Joins a relative, already-encoded path to `base` without encoding it again.
pub fn join(base: &Path, rel: &str) -> Path {
    let rel = rel.trim_matches('/');
    let joined = if base.as_ref().is_empty() {
        rel.to_string()
    } else {
        format!("{base}/{rel}")
    };
    Path::parse(&joined).unwrap_or_else(|_| Path::from(joined.as_str()))
}

pub fn version_name(v: u64) -> String {
    format!("{v:020}.json")
}

impl TableLog {
    /// The log of the table at `table` (a folder below the store root).
    pub fn new(table: Location) -> Result<Self> {
        let (parent, name) = table
            .split_last()
            .ok_or_else(|| Error::Internal(format!("output {} has no parent folder", table.url)))?;
        let log = parent.child(&format!("_clvflow/{name}"));
        Ok(Self { table, log })
    }

    fn store(&self) -> &dyn ObjectStore {
        self.table.store.object_store.as_ref()
    }

    /// `rel` (as listed from the store, already encoded) below the log folder.
    pub fn log_path(&self, rel: &str) -> Path {
        join(&self.log.path, rel)
    }

    /// `rel` (as listed from the store, already encoded) below the table folder.
    pub fn table_path(&self, rel: &str) -> Path {
        join(&self.table.path, rel)
    }

    fn store_err(&self, action: &str, e: object_store::Error) -> Error {
        Error::store(self.log.url.clone(), action.to_string(), e)
    }

    /// Versions of all commit markers, ascending.
    pub async fn versions(&self) -> Result<Vec<u64>> {
        let prefix = self.log_path("commits");
        let metas: Vec<_> = self
            .store()
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| self.store_err("list commits", e))?;
        let mut v: Vec<u64> = metas
            .iter()
            .filter_map(|m| m.location.filename()?.strip_suffix(".json")?.parse().ok())
            .collect();
        v.sort_unstable();
        Ok(v)
    }

    pub async fn read_commit(&self, version: u64) -> Result<Commit> {
        let path = self.log_path(&format!("commits/{}", version_name(version)));
        let bytes = self
            .store()
            .get(&path)
            .await
            .map_err(|e| self.store_err("read commit marker", e))?
            .bytes()
            .await
            .map_err(|e| self.store_err("read commit marker", e))?;
        serde_json::from_slice(&bytes).map_err(|e| {
            Error::corrupt(
                self.log
                    .child(&format!("commits/{}", version_name(version)))
                    .url,
                "the commit marker",
                e,
            )
        })
    }

    /// The newest commit, if any.
    pub async fn latest(&self) -> Result<Option<Commit>> {
        match self.versions().await?.last() {
            Some(v) => Ok(Some(self.read_commit(*v).await?)),
            None => Ok(None),
        }
    }

    /// Creates the marker of `commit.version`; fails if any writer created it first.
    pub async fn create_commit(&self, commit: &Commit) -> Result<()> {
        let path = self.log_path(&format!("commits/{}", version_name(commit.version)));
        let body = serde_json::to_vec_pretty(commit).map_err(|e| Error::Internal(e.to_string()))?;
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store()
            .put_opts(&path, PutPayload::from(Bytes::from(body)), opts)
            .await
        {
            Ok(_) => Ok(()),
            Err(object_store::Error::AlreadyExists { .. }) => Err(Error::Output {
                job: commit.job.clone(),
                output: commit.output.clone(),
                message: format!(
                    "another run committed version {} of {} at the same time; nothing of this run was published, run it again",
                    commit.version, self.table.url
                ),
            }),
            Err(e) => Err(self.store_err("create commit marker", e)),
        }
    }

    /// The version known to be fully published (0 if none).
    pub async fn published(&self) -> Result<u64> {
        match self.store().get(&self.log_path("published.json")).await {
            Ok(r) => {
                let bytes = r
                    .bytes()
                    .await
                    .map_err(|e| self.store_err("read published.json", e))?;
                let p: Published = serde_json::from_slice(&bytes).map_err(|e| {
                    Error::corrupt(self.log.child("published.json").url, "published.json", e)
                })?;
                Ok(p.version)
            }
            Err(object_store::Error::NotFound { .. }) => Ok(0),
            Err(e) => Err(self.store_err("read published.json", e)),
        }
    }

    pub async fn set_published(&self, version: u64) -> Result<()> {
        let body = serde_json::to_vec(&Published { version })
            .map_err(|e| Error::Internal(e.to_string()))?;
        self.store()
            .put(
                &self.log_path("published.json"),
                PutPayload::from(Bytes::from(body)),
            )
            .await
            .map_err(|e| self.store_err("write published.json", e))?;
        Ok(())
    }

    /// Every object under `prefix`.
    pub async fn list(&self, prefix: &Path) -> Result<Vec<object_store::ObjectMeta>> {
        self.store()
            .list(Some(prefix))
            .try_collect()
            .await
            .map_err(|e| Error::store(self.table.url.clone(), format!("list {prefix}"), e))
    }
}
