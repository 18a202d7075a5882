//! The one place a DataFusion session is built from `config.yaml`: parallelism, a memory limit
//! enforced by a spilling pool (greedy or fair), DataFusion settings, the spill folder, the SQL
//! functions clvflow adds, and every configured object store registered.
//! Another engine (a Ballista cluster) is a new arm of [`EngineSpec`] here, nothing else.

use std::num::NonZeroUsize;
use std::sync::Arc;

use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::{
    FairSpillPool, GreedyMemoryPool, MemoryPool, TrackConsumersPool,
};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{SessionConfig, SessionContext};

use crate::config::{EngineSpec, MemoryPoolKind};
use crate::error::{Error, Result};
use crate::job::Project;

/// `ident` as a quoted SQL identifier (a table or column name clvflow puts into SQL it writes):
/// any name works, including ones with spaces, capitals or quotes.
pub fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// Builds a session for `project`.
pub fn session(project: &Project) -> Result<SessionContext> {
    let EngineSpec::Local {
        target_partitions,
        memory_limit,
        spill_dir,
        batch_size,
        memory_pool,
        settings,
        transparent_huge_pages,
    } = &project.config.value.engine
    else {
        return Err(Error::Internal(
            "non-local engine passed config checks".into(),
        ));
    };
    // Process-wide, so the last session built decides (all sessions share config.yaml).
    if !crate::memstat::set_huge_pages(*transparent_huge_pages) && cfg!(target_os = "linux") {
        tracing::warn!(
            on = *transparent_huge_pages,
            "the kernel did not take engine.transparent_huge_pages (prctl PR_SET_THP_DISABLE); memory uses its default"
        );
    }
    let mut config = SessionConfig::new()
        .with_information_schema(true)
        // Writes: one file per partition folder and output stream, not one per core.
        .set_usize("datafusion.execution.minimum_parallel_output_files", 1);
    if let Some(n) = target_partitions {
        config = config.with_target_partitions((*n).max(1));
    }
    if let Some(n) = batch_size {
        config = config.with_batch_size((*n).max(1));
    }
    for (key, value) in settings {
        // Checked when the config was loaded.
        config
            .options_mut()
            .set(key, value)
            .map_err(|e| Error::df(format!("engine.settings: {key}"), e))?;
    }
    let mut runtime = RuntimeEnvBuilder::new();
    if let Some(limit) = memory_limit {
        let limit = limit.0 as usize;
        // Tracked: an error names the operators that hold the most memory.
        let top = NonZeroUsize::MIN.saturating_add(4);
        let pool: Arc<dyn MemoryPool> = match memory_pool {
            MemoryPoolKind::Greedy => {
                Arc::new(TrackConsumersPool::new(GreedyMemoryPool::new(limit), top))
            }
            MemoryPoolKind::Fair => {
                Arc::new(TrackConsumersPool::new(FairSpillPool::new(limit), top))
            }
        };
        runtime = runtime.with_memory_pool(pool);
    }
    if let Some(dir) = spill_dir {
        let dir = project.root.join(dir);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, "create spill folder", e))?;
        runtime = runtime.with_disk_manager_builder(
            DiskManagerBuilder::default().with_mode(DiskManagerMode::Directories(vec![dir])),
        );
    }
    let runtime = runtime
        .build_arc()
        .map_err(|e| Error::df("build the DataFusion runtime", e))?;
    let ctx = SessionContext::new_with_config_rt(config, runtime);
    crate::functions::register(&ctx);
    for store in &project.stores.stores {
        ctx.register_object_store(&store.registry_url, store.object_store.clone());
    }
    Ok(ctx)
}
