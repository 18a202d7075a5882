//! The engine seam: where SQL runs. One [`Engine`] per process, built from the validated
//! `engine:` of `config.yaml`; every run (and `validate`, `explain`) takes a fresh session from
//! it. The engine is in-process DataFusion (`kind: local`) or a Ballista cluster
//! (`kind: ballista`, [`cluster`]): the cluster's client session is the local one with
//! Ballista's query planner, so everything below holds for the client process there too.
//!
//! Invariants:
//! - the process has ONE memory pool and one spill folder, shared by every session: runs that
//!   execute at once (`scheduler.max_active_runs`) share `memory_limit`, they do not get one
//!   each; model steps take their large buffers from the same pool ([`memory::reserve`]);
//! - step results held in memory take at most three quarters of that pool (`result_memory`);
//!   larger ones go to scratch
//!   Parquet files ([`scratch`]);
//! - every session has clvflow's SQL functions ([`functions`]) and every configured object
//!   store, and the DataFusion settings of `engine.settings` (a step's own `settings` are
//!   applied on a copy of the session, [`session_for_settings`]).

pub mod cluster;
pub mod functions;
pub mod heap;
pub mod memory;
pub mod pool;
pub mod processes;
pub mod scratch;

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::{
    FairSpillPool, GreedyMemoryPool, MemoryPool, TrackConsumersPool,
};
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::prelude::{SessionConfig, SessionContext};

use crate::config::Problem;
use crate::config::project::{EngineSpec, MemoryPoolKind};
use crate::error::{Error, Result};
use crate::storage::Stores;
use cluster::{Cluster, SchedulerAddr};

/// The checked `engine:` of `config.yaml`.
#[derive(Debug, Clone)]
pub enum EngineConfig {
    /// In-process DataFusion.
    Local(LocalEngine),
    /// A Ballista cluster; `client` is this process's own part (model steps, memory).
    Ballista {
        client: LocalEngine,
        cluster: Box<Cluster>,
    },
}

/// The in-process engine's settings.
#[derive(Debug, Clone)]
pub struct LocalEngine {
    pub target_partitions: Option<usize>,
    /// Bytes of the process's memory pool; `None`: unlimited.
    pub memory_limit: Option<u64>,
    /// Bytes of the pool step results held in memory may take; `None`: three quarters of it.
    pub result_memory: Option<u64>,
    /// Bytes of tables above which a `split_by` step runs split; `None`: half the memory limit.
    pub split_above: Option<u64>,
    pub memory_pool: MemoryPoolKind,
    /// Absolute folder for spill files; `None`: the OS temp folder.
    pub spill_dir: Option<PathBuf>,
    pub batch_size: Option<usize>,
    /// DataFusion options by full key, each checked.
    pub settings: BTreeMap<String, String>,
    pub transparent_huge_pages: bool,
}

impl EngineConfig {
    /// Checks `spec`; relative folders are taken from `root` (the folder of config.yaml), URLs
    /// resolved against `stores`. Problems are at fields under `engine`.
    pub fn from_spec(
        spec: &EngineSpec,
        root: &Path,
        stores: &Stores,
    ) -> std::result::Result<Self, Vec<Problem>> {
        match spec {
            EngineSpec::Local {
                target_partitions,
                memory_limit,
                result_memory,
                split_above,
                spill_dir,
                batch_size,
                memory_pool,
                settings,
                transparent_huge_pages,
            } => {
                let local = LocalEngine {
                    target_partitions: *target_partitions,
                    memory_limit: memory_limit.map(|b| b.0),
                    result_memory: result_memory.map(|b| b.0),
                    split_above: split_above.map(|b| b.0),
                    memory_pool: *memory_pool,
                    spill_dir: spill_dir.as_ref().map(|d| root.join(d)),
                    batch_size: *batch_size,
                    settings: settings.clone(),
                    transparent_huge_pages: *transparent_huge_pages,
                };
                let mut problems = local.problems();
                problems.extend(local.settings.keys().filter(|k| is_ballista_key(k)).map(|k| {
                    Problem::new(
                        "settings",
                        format!("`{k}` is a setting of the cluster engine (engine.kind: ballista); the local engine has no use for it"),
                    )
                }));
                if problems.is_empty() {
                    Ok(Self::Local(local))
                } else {
                    Err(problems)
                }
            }
            EngineSpec::Ballista {
                scheduler,
                scratch,
                target_partitions,
                memory_limit,
                result_memory,
                spill_dir,
                batch_size,
                memory_pool,
                settings,
                connect_timeout,
            } => {
                let client = LocalEngine {
                    target_partitions: *target_partitions,
                    memory_limit: memory_limit.map(|b| b.0),
                    result_memory: result_memory.map(|b| b.0),
                    split_above: None,
                    memory_pool: *memory_pool,
                    spill_dir: spill_dir.as_ref().map(|d| root.join(d)),
                    batch_size: *batch_size,
                    settings: settings.clone(),
                    transparent_huge_pages: false,
                };
                let mut problems = client.problems();
                let scheduler = SchedulerAddr::parse(scheduler)
                    .map_err(|m| problems.push(Problem::new("scheduler", m)))
                    .ok();
                let scratch = match stores.resolve(scratch) {
                    Ok(loc) => Some(loc),
                    Err(m) => {
                        problems.push(Problem::new("scratch", m));
                        None
                    }
                };
                match (scheduler, scratch) {
                    (Some(scheduler), Some(scratch)) if problems.is_empty() => Ok(Self::Ballista {
                        client,
                        cluster: Box::new(Cluster {
                            scheduler,
                            scratch,
                            connect_timeout: connect_timeout.0,
                        }),
                    }),
                    _ => Err(problems),
                }
            }
        }
    }

    /// The cluster, on the cluster engine.
    pub fn cluster(&self) -> Option<&Cluster> {
        match self {
            EngineConfig::Local(_) => None,
            EngineConfig::Ballista { cluster, .. } => Some(cluster.as_ref()),
        }
    }
}

impl LocalEngine {
    fn problems(&self) -> Vec<Problem> {
        let mut problems: Vec<Problem> = self
            .settings
            .iter()
            .filter_map(|(k, v)| setting_problem(k, v))
            .map(|m| Problem::new("settings", m))
            .collect();
        match (self.result_memory, self.memory_limit) {
            (Some(r), Some(l)) if r > l => problems.push(Problem::new(
                "result_memory",
                "at most memory_limit: it is the share of memory_limit that step results held between steps may take",
            )),
            (Some(_), None) => problems.push(Problem::new(
                "result_memory",
                "a share of memory_limit: set memory_limit too",
            )),
            _ => {}
        }
        problems
    }
}

/// `ident` as a quoted SQL identifier (a table or column name clvflow puts into SQL it writes):
/// any name works, including ones with spaces, capitals or quotes.
pub fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// The process's engine: session settings and the runtime (memory pool, spill folder, object
/// stores) that every session shares.
#[derive(Debug)]
pub struct Engine {
    config: SessionConfig,
    runtime: Arc<RuntimeEnv>,
    description: String,
    /// On the cluster engine: the cluster its sessions send their queries to.
    cluster: Option<Cluster>,
    /// `engine.settings` (set again on each cluster session, after Ballista's upgrade).
    settings: BTreeMap<String, String>,
}

impl Engine {
    /// Builds the engine from the checked config, with `stores` registered. Call once per
    /// process (`crate::project::Project::engine` does): each call makes a new memory pool.
    pub fn new(config: &EngineConfig, stores: &Stores) -> Result<Arc<Self>> {
        match config {
            EngineConfig::Local(local) => Self::local(local, stores).map(Arc::new),
            EngineConfig::Ballista { client, cluster } => {
                let mut engine = Self::local(client, stores)?;
                engine.description = format!(
                    "ballista (scheduler {}, scratch {}, {} partitions; this process: memory {})",
                    cluster.scheduler,
                    cluster.scratch.written,
                    engine.config.target_partitions(),
                    client
                        .memory_limit
                        .map_or("unlimited".to_string(), |l| format!("{} MiB", l >> 20))
                );
                engine.cluster = Some(cluster.as_ref().clone());
                Ok(Arc::new(engine))
            }
        }
    }

    fn local(local: &LocalEngine, stores: &Stores) -> Result<Self> {
        // Process-wide, like the engine.
        if !memory::set_huge_pages(local.transparent_huge_pages) && cfg!(target_os = "linux") {
            tracing::warn!(
                on = local.transparent_huge_pages,
                "the kernel did not take engine.transparent_huge_pages (prctl PR_SET_THP_DISABLE); memory uses its default"
            );
        }
        let mut config = SessionConfig::new()
            .with_information_schema(true)
            // Writes: one file per partition folder and output stream, not one per core.
            .set_usize("datafusion.execution.minimum_parallel_output_files", 1);
        if let Some(n) = local.target_partitions {
            config = config.with_target_partitions(n.max(1));
        }
        if let Some(n) = local.batch_size {
            config = config.with_batch_size(n.max(1));
        }
        apply_settings(&mut config, &local.settings, "engine.settings")?;
        let mut runtime = RuntimeEnvBuilder::new();
        let mut balanced = None;
        if let Some(limit) = local.memory_limit {
            memory::watch_pressure(limit);
            let limit = usize::try_from(limit).unwrap_or(usize::MAX);
            // Tracked: an error names the consumers that hold the most memory.
            let top = NonZeroUsize::MIN.saturating_add(4);
            let pool: Arc<dyn MemoryPool> = match local.memory_pool {
                MemoryPoolKind::Balanced => {
                    let pool = pool::BalancedPool::new(limit);
                    balanced = Some(pool.clone());
                    Arc::new(TrackConsumersPool::new(pool, top))
                }
                MemoryPoolKind::Greedy => {
                    Arc::new(TrackConsumersPool::new(GreedyMemoryPool::new(limit), top))
                }
                MemoryPoolKind::Fair => {
                    Arc::new(TrackConsumersPool::new(FairSpillPool::new(limit), top))
                }
            };
            runtime = runtime.with_memory_pool(pool);
        }
        if let Some(dir) = &local.spill_dir {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, "create spill folder", e))?;
            runtime = runtime.with_disk_manager_builder(
                DiskManagerBuilder::default()
                    .with_mode(DiskManagerMode::Directories(vec![dir.clone()])),
            );
        }
        let runtime = runtime
            .build_arc()
            .map_err(|e| Error::df("build the DataFusion runtime", e))?;
        let scratch_base = local.spill_dir.clone().unwrap_or_else(std::env::temp_dir);
        let bytes = |b: u64| usize::try_from(b).unwrap_or(usize::MAX);
        let hold = local
            .result_memory
            .map(bytes)
            .or(local.memory_limit.map(|l| bytes(l) / 4 * 3));
        let split_above = local
            .split_above
            .map(bytes)
            .or(local.memory_limit.map(|l| bytes(l) / 2));
        let space = scratch::ResultSpace::new(hold, &scratch_base).with_split_above(split_above);
        let mut config = config.with_extension(Arc::new(space));
        if local
            .settings
            .contains_key(crate::steps::sql::partitions::HASH_JOIN_KEY)
        {
            // The user chose how every step joins: not chosen per step from the data.
            config =
                config.with_extension(Arc::new(crate::steps::sql::partitions::JoinsSetByEngine));
        }
        if let Some(pool) = balanced {
            config = config.with_extension(Arc::new(pool::PoolPeak(pool)));
        }
        for store in &stores.stores {
            runtime.register_object_store(&store.registry_url, store.object_store.clone());
        }
        let description = format!(
            "local ({} partitions, memory {})",
            config.target_partitions(),
            local
                .memory_limit
                .map_or("unlimited".to_string(), |l| format!("{} MiB", l >> 20))
        );
        Ok(Self {
            config,
            runtime,
            description,
            cluster: None,
            settings: local.settings.clone(),
        })
    }

    /// A new session on the process's runtime, with clvflow's SQL functions. On the cluster
    /// engine its queries run on the cluster (each session is its own session there).
    /// Each session has its own tables (its own catalog), also on the cluster engine.
    pub fn session(&self) -> Result<SessionContext> {
        let ctx = match &self.cluster {
            None => SessionContext::new_with_config_rt(self.config.clone(), self.runtime.clone()),
            Some(cluster) => {
                let base = datafusion::execution::SessionStateBuilder::new()
                    .with_default_features()
                    .with_config(self.config.clone())
                    .with_runtime_env(self.runtime.clone())
                    .build();
                let mut state = cluster.client_state(base)?;
                // `ballista.*` keys exist only once the state is Ballista's; the others are
                // set again so that the user's values win over Ballista's defaults.
                apply_settings(state.config_mut(), &self.settings, "engine.settings")?;
                SessionContext::new_with_state(state)
            }
        };
        functions::register(&ctx);
        Ok(ctx)
    }

    /// The cluster, on the cluster engine.
    pub fn cluster(&self) -> Option<&Cluster> {
        self.cluster.as_ref()
    }

    /// What the engine is, for logs and reports (`local (2 partitions, memory 2048 MiB)`).
    pub fn describe(&self) -> &str {
        &self.description
    }
}

/// Sets `settings` on `config`. `ballista.*` keys are the cluster's: on a session that is not
/// a Ballista client's (the local engine, or before the upgrade) they are left out.
fn apply_settings(
    config: &mut SessionConfig,
    settings: &BTreeMap<String, String>,
    field: &str,
) -> Result<()> {
    let ballista = config
        .options()
        .extensions
        .get::<ballista_core::config::BallistaConfig>()
        .is_some();
    for (key, value) in settings {
        if is_ballista_key(key) && !ballista {
            tracing::debug!(key = %key, "a ballista.* setting: it takes effect on the cluster engine only");
            continue;
        }
        // A step's `auto` partitions not yet chosen (planning without data, as `validate`
        // does): the session's own count.
        if crate::steps::sql::partitions::is_auto(key, value) {
            continue;
        }
        // Checked when the config was loaded.
        config
            .options_mut()
            .set(key, value)
            .map_err(|e| Error::df(format!("{field}: {key}"), e))?;
    }
    Ok(())
}

/// The session a step with its own `settings` runs on: `ctx` itself when there are none, else a
/// session over the same tables, functions, object stores and memory pool (DataFusion shares
/// them between copies of a session state) whose options are changed for this step only.
pub fn session_for_settings(
    ctx: &SessionContext,
    settings: &BTreeMap<String, String>,
    field: &str,
) -> Result<SessionContext> {
    if settings.is_empty() {
        return Ok(ctx.clone());
    }
    let mut state = ctx.state();
    apply_settings(state.config_mut(), settings, field)?;
    Ok(SessionContext::new_with_state(state))
}

/// What is wrong with the DataFusion setting `key: value` (`engine.settings`, a step's
/// `settings`), if anything: DataFusion's message and its first cause.
/// Whether `key` is one of Ballista's settings (`ballista.shuffle.compression.codec`, ...).
fn is_ballista_key(key: &str) -> bool {
    key.starts_with("ballista.")
}

pub fn setting_problem(key: &str, value: &str) -> Option<String> {
    if is_ballista_key(key) {
        use ballista_core::config::BallistaConfig;
        // Ballista keeps its values as text and parses them when it reads them: check both here.
        return match BallistaConfig::valid_entries().get(key) {
            None => Some(format!(
                "`{key}: {value}`: Ballista has no such setting (see ballista_core::config for its keys)"
            )),
            Some(entry) => BallistaConfig::parse_value(value, entry.data_type().clone())
                .err()
                .map(|e| format!("`{key}: {value}`: {e}")),
        };
    }
    let mut options = datafusion::config::ConfigOptions::new();
    let e = options.set(key, value).err()?;
    let message = e.strip_backtrace();
    let lines: Vec<&str> = message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && *l != "caused by")
        .take(2)
        .collect();
    Some(format!(
        "`{key}: {value}`: {} (keys are DataFusion configuration keys such as datafusion.execution.batch_size, or on the cluster engine Ballista's, such as ballista.shuffle.compression.codec)",
        lines.join(": ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine(limit: u64) -> Arc<Engine> {
        let config = EngineConfig::Local(LocalEngine {
            target_partitions: Some(2),
            memory_limit: Some(limit),
            result_memory: None,
            split_above: None,
            memory_pool: MemoryPoolKind::Greedy,
            spill_dir: None,
            batch_size: None,
            settings: BTreeMap::new(),
            transparent_huge_pages: false,
        });
        Engine::new(&config, &Stores::default()).unwrap()
    }

    /// Before, each run built its own pool: two runs at once could use twice `memory_limit`.
    #[test]
    fn sessions_of_one_engine_share_one_memory_limit() {
        let engine = engine(64 << 20);
        let (a, b) = (engine.session().unwrap(), engine.session().unwrap());
        let held = memory::reserve(&a, "run a".into(), 40 << 20).unwrap();
        assert!(b.runtime_env().memory_pool.reserved() >= 40 << 20);
        let err = memory::reserve(&b, "run b".into(), 40 << 20).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("run b") && text.contains("run a"), "{text}");
        drop(held);
        memory::reserve(&b, "run b".into(), 40 << 20).unwrap();
    }
}

#[cfg(test)]
mod settings_tests {
    use super::*;

    #[test]
    fn ballista_settings_are_checked_against_ballistas_own_keys() {
        assert_eq!(
            setting_problem("ballista.shuffle.compression.codec", "none"),
            None
        );
        assert_eq!(
            setting_problem("ballista.planner.adaptive.enabled", "false"),
            None
        );
        let bad = setting_problem("ballista.no.such.key", "1").unwrap();
        assert!(bad.contains("ballista.no.such.key"), "{bad}");
        let bad = setting_problem("ballista.planner.adaptive.enabled", "perhaps").unwrap();
        assert!(bad.contains("perhaps"), "{bad}");
    }

    #[test]
    fn a_ballista_setting_on_the_local_engine_is_a_problem_and_skipped_by_sessions() {
        let settings: BTreeMap<String, String> =
            [("ballista.shuffle.compression.codec".into(), "none".into())].into();
        let mut config = SessionConfig::new();
        apply_settings(&mut config, &settings, "engine.settings").unwrap();
        let mut upgraded = SessionConfig::new()
            .with_option_extension(ballista_core::config::BallistaConfig::default());
        apply_settings(&mut upgraded, &settings, "engine.settings").unwrap();
        let codec = upgraded
            .options()
            .extensions
            .get::<ballista_core::config::BallistaConfig>()
            .map(|c| c.shuffle_compression_codec().map_err(|e| e.to_string()));
        assert_eq!(codec, Some(Ok(None)), "the codec is set to none");

        let mut spec = crate::config::project::EngineSpec::default();
        if let crate::config::project::EngineSpec::Local { settings: s, .. } = &mut spec {
            *s = settings.clone();
        }
        let problems = EngineConfig::from_spec(&spec, Path::new("."), &Stores::default())
            .err()
            .unwrap_or_default();
        assert!(
            problems.iter().any(|p| p.field == "settings"
                && p.message.contains("ballista.shuffle.compression.codec")),
            "{problems:?}"
        );
    }
}
