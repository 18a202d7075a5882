//! The typed shape of `config.yaml`, exactly as users write it: stores, engine, state, scheduler.
//! Unknown keys are rejected everywhere. `crate::project` checks it and builds the stores.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::types::{ByteSize, DurationSpec};

/// `config.yaml`: where data lives, which engine runs the SQL, where run state is kept.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Named object stores. A job URL belongs to the store whose `url` is its longest prefix.
    #[serde(default)]
    pub stores: BTreeMap<String, StoreSpec>,
    /// The query engine.
    #[serde(default)]
    pub engine: EngineSpec,
    /// Where run history and leases are kept (used by the scheduler).
    #[serde(default)]
    pub state: Option<StateSpec>,
    /// Default IANA time zone of schedules, e.g. `Europe/Berlin`.
    #[serde(default = "default_timezone")]
    pub timezone: String,
    /// Folder of job files, relative to this file.
    #[serde(default = "default_jobs_dir")]
    pub jobs_dir: String,
    /// How `clvflow schedule` runs jobs.
    #[serde(default)]
    pub scheduler: SchedulerSpec,
}

/// Daemon settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerSpec {
    /// Runs executing at once, across all jobs (one job never runs twice at once).
    #[serde(default = "default_max_active_runs")]
    pub max_active_runs: usize,
    /// Run, on start, the runs missed while the daemon was down.
    #[serde(default = "default_true")]
    pub catchup: bool,
    /// At most this many missed runs per job (the most recent ones), oldest first.
    #[serde(default = "default_max_catchup")]
    pub max_catchup: usize,
    /// A lease not renewed for this long is considered abandoned (its holder died).
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl: DurationSpec,
    /// On SIGTERM/SIGINT, how long running runs may go on before they are cancelled.
    #[serde(default = "default_grace_period")]
    pub grace_period: DurationSpec,
    /// How often runs waiting for an upstream job or a lease are looked at again.
    #[serde(default = "default_poll_interval")]
    pub poll_interval: DurationSpec,
}

impl Default for SchedulerSpec {
    fn default() -> Self {
        Self {
            max_active_runs: default_max_active_runs(),
            catchup: true,
            max_catchup: default_max_catchup(),
            lease_ttl: default_lease_ttl(),
            grace_period: default_grace_period(),
            poll_interval: default_poll_interval(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_max_active_runs() -> usize {
    2
}
fn default_max_catchup() -> usize {
    3
}
fn default_lease_ttl() -> DurationSpec {
    DurationSpec(std::time::Duration::from_secs(300))
}
fn default_grace_period() -> DurationSpec {
    DurationSpec(std::time::Duration::from_secs(60))
}
fn default_poll_interval() -> DurationSpec {
    DurationSpec(std::time::Duration::from_secs(30))
}

fn default_timezone() -> String {
    "UTC".into()
}

fn default_jobs_dir() -> String {
    "jobs".into()
}

/// One object store: `file://./data`, `s3://bucket`, `gs://bucket`, `az://container`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSpec {
    /// Root URL of the store. `file://` paths are relative to the config file.
    pub url: String,
    /// S3-compatible endpoint, e.g. `http://127.0.0.1:9000`.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Region (S3).
    #[serde(default)]
    pub region: Option<String>,
    /// Allow plain-HTTP endpoints (local S3-compatible servers). Off by default.
    #[serde(default)]
    pub allow_http: bool,
    /// Retries of a failed request (object_store backs off exponentially between them).
    #[serde(default = "default_max_retries")]
    pub max_retries: usize,
    /// Give up retrying a request after this long.
    #[serde(default = "default_retry_timeout")]
    pub retry_timeout: DurationSpec,
    /// Extra builder options passed to object_store, e.g. `aws_virtual_hosted_style_request: "false"`.
    /// Credentials come from the standard environment (`AWS_ACCESS_KEY_ID`, ...), never from here.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

fn default_max_retries() -> usize {
    10
}

fn default_retry_timeout() -> DurationSpec {
    DurationSpec(std::time::Duration::from_secs(180))
}

/// Which engine executes SQL.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum EngineSpec {
    /// In-process DataFusion.
    Local {
        /// Parallelism of scans and joins; defaults to the number of cores.
        #[serde(default)]
        target_partitions: Option<usize>,
        /// Memory for query execution; operators that can spill do so above it.
        #[serde(default)]
        memory_limit: Option<ByteSize>,
        /// Of `memory_limit`, what step results held between steps may take together (default:
        /// three quarters); a result beyond it is written to scratch files in `spill_dir`.
        #[serde(default)]
        result_memory: Option<ByteSize>,
        /// A step with `split_by` whose tables take more than this runs bucket by bucket of
        /// that column, buckets of a quarter of it (default: half of `memory_limit`).
        #[serde(default)]
        split_above: Option<ByteSize>,
        /// Folder for spill files; defaults to the OS temp folder.
        #[serde(default)]
        spill_dir: Option<String>,
        /// Rows per Arrow batch.
        #[serde(default)]
        batch_size: Option<usize>,
        /// How `memory_limit` is shared between operators that hold memory at the same time.
        #[serde(default)]
        memory_pool: MemoryPoolKind,
        /// Any DataFusion setting by its full key, e.g.
        /// `datafusion.optimizer.repartition_joins: "false"` (values quoted); unknown keys and
        /// bad values are config errors.
        #[serde(default)]
        settings: BTreeMap<String, String>,
        /// Let the kernel back clvflow's memory with transparent huge pages (Linux). Off by
        /// default: a run allocates gigabytes of fresh hash tables, and the first touch of a
        /// huge page clears 2 MiB at once, which on virtual machines cost 2-5 s of kernel time
        /// per run against ~1 s with normal pages (see README, Benchmarks).
        #[serde(default)]
        transparent_huge_pages: bool,
    },
    /// A DataFusion Ballista cluster: SQL steps run on its executors; model steps, the
    /// commit protocol and every setting below stay in the `clvflow run` process.
    Ballista {
        /// The scheduler, `df://host:50050` (`clvflow cluster scheduler`).
        scheduler: String,
        /// Where step results go that the cluster or later steps read (Parquet, one folder per
        /// run, removed when the run ends; what a killed run left is removed by the job's next
        /// run). Must be in a store of this file that every executor can reach.
        scratch: String,
        /// Partitions of the cluster's plans (default: DataFusion's, the cores of the client).
        #[serde(default)]
        target_partitions: Option<usize>,
        /// Memory of this process (model steps' buffers and the step results they read);
        /// the executors have their own (`clvflow cluster executor --memory-pool-size`).
        #[serde(default)]
        memory_limit: Option<ByteSize>,
        /// As for `kind: local`.
        #[serde(default)]
        result_memory: Option<ByteSize>,
        /// Folder for this process's spill and scratch files.
        #[serde(default)]
        spill_dir: Option<String>,
        #[serde(default)]
        batch_size: Option<usize>,
        #[serde(default)]
        memory_pool: MemoryPoolKind,
        /// DataFusion settings, sent with every query to the cluster.
        #[serde(default)]
        settings: BTreeMap<String, String>,
        /// Seconds to wait for the scheduler to answer before the run fails.
        #[serde(default = "default_connect_timeout")]
        connect_timeout: DurationSpec,
    },
}

fn default_connect_timeout() -> DurationSpec {
    DurationSpec(std::time::Duration::from_secs(10))
}

impl Default for EngineSpec {
    fn default() -> Self {
        Self::Local {
            target_partitions: None,
            memory_limit: None,
            result_memory: None,
            split_above: None,
            spill_dir: None,
            batch_size: None,
            memory_pool: MemoryPoolKind::default(),
            settings: BTreeMap::new(),
            transparent_huge_pages: false,
        }
    }
}

/// How the memory limit is shared.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemoryPoolKind {
    /// Greedy while the pool is below three quarters of the limit, fair above it: as fast as
    /// greedy while the data fits, and no spilling operator starves the others when it does not
    /// (`engine/pool.rs`).
    #[default]
    Balanced,
    /// First come, first served up to the limit; an operator that cannot grow spills (or, if it
    /// cannot spill, fails). Best when one large operator runs at a time; when the data does not
    /// fit, partitions of one operator starve each other.
    Greedy,
    /// Each spilling operator gets an equal share of the limit: several operators running at
    /// once never starve each other, at the price of spilling earlier.
    Fair,
}

/// Run history and leases.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateSpec {
    pub url: String,
}
