//! The cluster engine's client side (`engine: { kind: ballista }`): sessions whose queries are
//! planned here and executed by a Ballista scheduler's executors, and the run's scratch folder
//! through which step results reach the cluster.
//!
//! What runs where:
//! - a SQL step's query runs on the executors; its result is written by them as Parquet into
//!   the run's scratch folder ([`write_result`]) and registered as a table over those files,
//!   so later steps and outputs read it on the cluster too;
//! - a model step runs in this process: it reads its input from the cluster (the rows come
//!   back over Arrow Flight) and its results are uploaded to the scratch folder ([`share`]):
//!   Ballista ships plans, not in-memory tables;
//! - outputs are written by the executors into the output's staging folder; staging, commit
//!   and publish stay in this process, as on the local engine.
//!
//! Invariants:
//! - every table a run registers for the cluster to read is a plain `ListingTable` over files
//!   that every executor can reach (an object store of config.yaml), never a table in memory;
//! - a run's scratch files are under `<scratch>/<job>/run-<run id>/` and are removed when the
//!   run ends, failed or not; a run that was killed leaves them, and the job's next run (which
//!   holds the job's lease, so no other run of the job is alive) removes every `run-*` folder
//!   of the job before it starts.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::config::TableParquetOptions;
use datafusion::dataframe::DataFrameWriteOptions;
use datafusion::execution::session_state::SessionState;
use datafusion::prelude::{DataFrame, SessionContext};
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStore;
use object_store::buffered::BufWriter;
use object_store::path::Path;
use parquet::arrow::async_writer::AsyncArrowWriter;

use crate::error::{Error, Result};
use crate::storage::Location;
use crate::storage::listing;

/// Where the scheduler listens: `df://host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerAddr {
    pub host: String,
    pub port: u16,
}

impl SchedulerAddr {
    /// Parses `df://host:port` (the port defaults to Ballista's 50050).
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        let bad = || {
            format!(
                "`{s}` is not a scheduler address; write df://host:port (e.g. df://127.0.0.1:50050)"
            )
        };
        let rest = s.strip_prefix("df://").ok_or_else(bad)?;
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<u16>().map_err(|_| bad())?),
            None => (rest, 50050),
        };
        if host.is_empty() || host.contains('/') {
            return Err(bad());
        }
        Ok(Self {
            host: host.to_string(),
            port,
        })
    }

    /// `http://host:port`, as Ballista's client wants it.
    fn http(&self) -> String {
        format!("http://{}:{}", self.host, self.port)
    }
}

impl std::fmt::Display for SchedulerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "df://{}:{}", self.host, self.port)
    }
}

/// The cluster an engine sends its queries to.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub scheduler: SchedulerAddr,
    /// `engine.scratch`: the folder of run scratch folders.
    pub scratch: Location,
    pub connect_timeout: Duration,
}

impl Cluster {
    /// The client session state for this cluster: `base` (our config, runtime, object stores)
    /// with Ballista's query planner, which sends every physical plan to the scheduler.
    /// Ballista replaces the state's function lists: clvflow's functions are registered on the
    /// context made from it (`Engine::session`).
    pub fn client_state(&self, base: SessionState) -> Result<SessionState> {
        use ballista_core::extension::SessionStateExt;
        base.upgrade_for_ballista(self.scheduler.http())
            .map_err(|e| Error::df("set up the Ballista client session", e))
    }

    /// Fails at once, naming the address, when the scheduler does not accept connections
    /// (rather than at the first query, deep inside a step).
    pub async fn check_reachable(&self) -> Result<()> {
        let addr = format!("{}:{}", self.scheduler.host, self.scheduler.port);
        let unreachable = |why: String| {
            Error::Cluster(format!(
                "the Ballista scheduler at {} is not reachable ({why}); start it (`clvflow cluster scheduler`) or fix engine.scheduler in config.yaml",
                self.scheduler
            ))
        };
        match tokio::time::timeout(self.connect_timeout, tokio::net::TcpStream::connect(&addr))
            .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(unreachable(e.to_string())),
            Err(_) => Err(unreachable(format!(
                "no answer within {}",
                humantime::format_duration(self.connect_timeout)
            ))),
        }
    }

    /// Starts the scratch folder of a run of `job` and registers it on `ctx`. With
    /// `remove_stale` (the caller holds the job's lease), the scratch folders that earlier runs
    /// of the job left (killed runs) are removed first.
    pub async fn begin_run(
        &self,
        ctx: &SessionContext,
        job: &str,
        run_id: &str,
        remove_stale: bool,
    ) -> Result<Arc<RunScratch>> {
        let job_dir = self.scratch.child(&safe(job, 80));
        if remove_stale {
            remove_stale_runs(&job_dir).await?;
        }
        let scratch = Arc::new(RunScratch {
            loc: job_dir.child(&format!("run-{run_id}")),
            next: AtomicU64::new(0),
        });
        ctx.state_ref()
            .write()
            .config_mut()
            .set_extension(scratch.clone());
        Ok(scratch)
    }
}

/// A name as one path segment: letters, digits, `_`, `-` and `.` kept, the rest `_`.
fn safe(name: &str, max: usize) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .take(max)
        .collect()
}

/// Removes every `run-*` folder under `job_dir`.
async fn remove_stale_runs(job_dir: &Location) -> Result<()> {
    let store = &job_dir.store.object_store;
    let listed = store
        .list_with_delimiter(Some(&job_dir.path))
        .await
        .map_err(|e| {
            Error::store(
                &job_dir.written,
                "list the scratch folders of earlier runs",
                e,
            )
        })?;
    for prefix in listed.common_prefixes {
        if prefix.filename().is_some_and(|n| n.starts_with("run-")) {
            let n = delete_prefix(job_dir, &prefix).await.map_err(|e| {
                Error::store(
                    job_dir.show(&prefix),
                    "remove the scratch files of an earlier run",
                    e,
                )
            })?;
            tracing::info!(folder = %job_dir.show(&prefix), files = n,
                "removed the scratch files of an earlier run that ended without cleaning up");
        }
    }
    Ok(())
}

/// Deletes every object under `prefix` of `loc`'s store; returns how many. On a local folder
/// the emptied folders go too (object stores have none).
async fn delete_prefix(loc: &Location, prefix: &Path) -> object_store::Result<usize> {
    let store = &loc.store.object_store;
    let paths = store.list(Some(prefix)).map_ok(|m| m.location).boxed();
    let deleted: Vec<Path> = store.delete_stream(paths).try_collect().await?;
    if loc.store.root.scheme() == "file" {
        let dir = std::path::PathBuf::from(format!("/{prefix}"));
        if let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(folder = %dir.display(), error = %e, "could not remove a scratch folder");
        }
    }
    Ok(deleted.len())
}

/// The scratch folder of one run on the cluster (a session config extension).
#[derive(Debug)]
pub struct RunScratch {
    loc: Location,
    next: AtomicU64,
}

impl RunScratch {
    /// The run's scratch of `ctx`; `None` on the local engine.
    pub fn of(ctx: &SessionContext) -> Option<Arc<Self>> {
        ctx.state_ref().read().config().get_extension::<Self>()
    }

    /// A new folder for the files of table `name`.
    fn folder(&self, name: &str) -> Location {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.loc.child(&format!("{n:04}-{}", safe(name, 40)))
    }

    /// Removes the run's scratch files (when the run ends, failed or not). A failure is
    /// logged, not returned: the job's next run removes what is left.
    pub async fn remove(&self) {
        match delete_prefix(&self.loc, &self.loc.path).await {
            Ok(n) => {
                tracing::debug!(folder = %self.loc.written, files = n, "removed the run's scratch files")
            }
            Err(e) => tracing::warn!(folder = %self.loc.written, error = %e,
                "could not remove the run's scratch files; the job's next run removes them"),
        }
    }
}

/// Registers `name` as a table over the Parquet files in `folder` with `schema`.
async fn register_folder(
    ctx: &SessionContext,
    name: &str,
    folder: &Location,
    schema: SchemaRef,
) -> Result<()> {
    let err = |e| Error::df(format!("register the scratch files of `{name}`"), e);
    let table = listing::table(
        &ctx.state(),
        &folder.dir_url(),
        listing::Format::Parquet,
        Some(schema),
        vec![],
    )
    .await
    .map_err(err)?;
    ctx.deregister_table(name).map_err(err)?;
    ctx.register_table(name, table).map_err(err)?;
    Ok(())
}

/// Runs a SQL step's query on the cluster, its result written by the executors into the run's
/// scratch folder, and registers the result as `name`. Returns the rows written.
pub async fn write_result(
    ctx: &SessionContext,
    scratch: &RunScratch,
    name: &str,
    df: DataFrame,
) -> Result<usize> {
    let folder = scratch.folder(name);
    let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
    let mut options = TableParquetOptions::default();
    // Written once, read once or twice, deleted: cheap to write.
    options.global.compression = Some("snappy".into());
    let written = df
        .write_parquet(
            &folder.dir_url(),
            DataFrameWriteOptions::new(),
            Some(options),
        )
        .await
        .map_err(|e| Error::df(format!("step `{name}` on the cluster"), e))?;
    let rows = count_rows(&written);
    register_folder(ctx, name, &folder, schema).await?;
    let (files, bytes) = folder_size(&folder).await;
    tracing::info!(table = name, rows, files, bytes, folder = %folder.written,
        "step result written to scratch by the cluster");
    Ok(rows)
}

/// The rows a write reports (its one `count` column).
fn count_rows(batches: &[datafusion::arrow::array::RecordBatch]) -> usize {
    use datafusion::arrow::array::{AsArray, UInt64Array};
    batches
        .iter()
        .filter_map(|b| {
            b.column_by_name("count")
                .and_then(|c| c.as_primitive_opt::<datafusion::arrow::datatypes::UInt64Type>())
                .map(|a: &UInt64Array| a.iter().flatten().sum::<u64>() as usize)
        })
        .sum()
}

/// Makes table `name` readable by the cluster: a step result this process holds (in memory or
/// in local scratch files) is uploaded into the run's scratch folder and registered over
/// those files instead. A table already on the cluster's stores is left as it is.
pub async fn share(ctx: &SessionContext, scratch: &RunScratch, name: &str) -> Result<()> {
    use crate::steps::source::Source;
    let provider = ctx
        .table_provider(name)
        .await
        .map_err(|e| Error::df(format!("step result `{name}`"), e))?;
    let local = provider
        .downcast_ref::<crate::steps::rows::HeldTable>()
        .is_some()
        || provider
            .downcast_ref::<crate::steps::spill::SpilledTable>()
            .is_some();
    drop(provider);
    if !local {
        return Ok(());
    }
    let source = Source::open(ctx, name)
        .await
        .map_err(|e| Error::df(format!("step result `{name}`"), e))?;
    let schema = source.schema().clone();
    let folder = scratch.folder(name);
    let store = folder.store.object_store.clone();
    // The batches go to the uploader through a small channel: one file per partition of the
    // result, in order, so a model result keeps its rows' order.
    let (tx, mut rx) =
        tokio::sync::mpsc::channel::<(usize, datafusion::arrow::array::RecordBatch)>(4);
    let upload = {
        let (folder, schema) = (folder.clone(), schema.clone());
        tokio::spawn(async move {
            let mut current: Option<(usize, AsyncArrowWriter<BufWriter>)> = None;
            let mut files = 0usize;
            let mut rows = 0usize;
            let open = |i: usize| {
                let path = folder.child(&format!("part-{i:05}.parquet")).path;
                let props = parquet::file::properties::WriterProperties::builder()
                    .set_compression(parquet::basic::Compression::SNAPPY)
                    .build();
                AsyncArrowWriter::try_new(
                    BufWriter::new(store.clone(), path),
                    schema.clone(),
                    Some(props),
                )
            };
            let perr = |e: parquet::errors::ParquetError| {
                Error::Internal(format!("upload a step result to {}: {e}", folder.written))
            };
            while let Some((i, batch)) = rx.recv().await {
                if current.as_ref().is_none_or(|(p, _)| *p != i) {
                    if let Some((_, w)) = current.take() {
                        w.close().await.map_err(perr)?;
                    }
                    current = Some((i, open(i).map_err(perr)?));
                    files += 1;
                }
                rows += batch.num_rows();
                if let Some((_, w)) = &mut current {
                    w.write(&batch).await.map_err(perr)?;
                }
            }
            if let Some((_, w)) = current.take() {
                w.close().await.map_err(perr)?;
            }
            Ok::<_, Error>((files, rows))
        })
    };
    let handle = tokio::runtime::Handle::current();
    let scanned = tokio::task::block_in_place(|| {
        source.scan(None, |i, b| {
            handle
                .block_on(tx.send((i, b)))
                .map_err(|_| Error::Internal("the scratch upload stopped".into()))
        })
    });
    drop(tx);
    let uploaded = upload
        .await
        .map_err(|e| Error::Internal(format!("the scratch upload failed: {e}")))?;
    // The upload's own error says more than the send that it stopped.
    let (files, rows) = uploaded?;
    scanned?;
    drop(source);
    register_folder(ctx, name, &folder, schema).await?;
    crate::engine::memory::release();
    let (_, bytes) = folder_size(&folder).await;
    tracing::info!(table = name, files, rows, bytes, folder = %folder.written,
        "step result uploaded to scratch for the cluster");
    Ok(())
}

/// Files and bytes under `folder` (for the log; 0 when it cannot be listed).
async fn folder_size(folder: &Location) -> (usize, u64) {
    let listed: Vec<object_store::ObjectMeta> = folder
        .store
        .object_store
        .list(Some(&folder.path))
        .try_collect()
        .await
        .unwrap_or_default();
    (listed.len(), listed.iter().map(|m| m.size).sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheduler_addresses_are_df_urls() {
        let a = SchedulerAddr::parse("df://127.0.0.1:50051").unwrap();
        assert_eq!((a.host.as_str(), a.port), ("127.0.0.1", 50051));
        assert_eq!(a.to_string(), "df://127.0.0.1:50051");
        assert_eq!(SchedulerAddr::parse("df://sched").unwrap().port, 50050);
        for bad in ["http://x:1", "df://:1", "df://x:port", "x:1", "df://a/b:1"] {
            let e = SchedulerAddr::parse(bad).unwrap_err();
            assert!(e.contains("df://host:port"), "{bad}: {e}");
        }
    }
}
