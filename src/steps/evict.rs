//! Held step results make room for model buffers: when a model step cannot reserve its
//! buffers, the held results it does not read move to scratch files ([`super::spill`]), largest
//! first. Held results are a cache; a model step that cannot get its buffers fails the run.

use std::path::PathBuf;

use datafusion::catalog::TableProvider;
use datafusion::prelude::SessionContext;

use super::spill::{SpillFile, register_spilled};
use crate::engine::scratch::ResultSpace;
use crate::error::{Error, Result};

/// Takes `bytes` of the memory pool for a model step's buffers (as `what`), like
/// [`crate::engine::memory::reserve`]; when the pool is full, first moves step results held in
/// memory to scratch files, largest first, until the buffers fit. Held results are a cache: a
/// result that a later step reads costs a scratch write and read, while a model step that
/// cannot get its buffers fails the run. `keep` names the tables the step reads (those stay,
/// since the step holds their batches already). Fails as `reserve` when nothing is left to move.
pub async fn reserve_evicting(
    ctx: &SessionContext,
    what: String,
    bytes: usize,
    keep: &[&str],
) -> datafusion::error::Result<datafusion::execution::memory_pool::MemoryReservation> {
    use datafusion::error::DataFusionError;
    loop {
        let err = match crate::engine::memory::reserve(ctx, what.clone(), bytes) {
            Ok(r) => return Ok(r),
            Err(e) => e,
        };
        if !matches!(err.find_root(), DataFusionError::ResourcesExhausted(_))
            || ResultSpace::of(ctx).is_none()
        {
            return Err(err);
        }
        let Some((name, held)) = largest_held(ctx, keep).await? else {
            return Err(err);
        };
        tracing::info!(table = %name, mib = held >> 20, needed_mib = bytes >> 20, by = %what,
                       "memory pool full: moving a held step result to scratch files");
        evict(ctx, &name)
            .await
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
    }
}

/// The held step result with the most bytes, not one of `keep`.
async fn largest_held(
    ctx: &SessionContext,
    keep: &[&str],
) -> datafusion::error::Result<Option<(String, usize)>> {
    let state = ctx.state();
    let options = &state.config().options().catalog;
    let Some(schema) = ctx
        .catalog(&options.default_catalog)
        .and_then(|c| c.schema(&options.default_schema))
    else {
        return Ok(None);
    };
    let mut best: Option<(String, usize)> = None;
    for name in schema.table_names() {
        if keep.iter().any(|k| k.eq_ignore_ascii_case(&name)) {
            continue;
        }
        let Some(provider) = schema.table(&name).await? else {
            continue;
        };
        if let Some(t) = provider.downcast_ref::<super::rows::HeldTable>() {
            let bytes = t.bytes();
            if bytes > 0 && best.as_ref().is_none_or(|(_, b)| bytes > *b) {
                best = Some((name, bytes));
            }
        }
    }
    Ok(best)
}

/// Writes held table `name` to scratch files, one per partition, and registers it over them in
/// its place (its memory goes back to the pool when the last reader lets go).
async fn evict(ctx: &SessionContext, name: &str) -> Result<()> {
    let err = |e| Error::df(format!("move step result `{name}` to scratch"), e);
    let space = ResultSpace::of(ctx)
        .ok_or_else(|| Error::Internal("no scratch space to move a result to".into()))?;
    let provider = ctx.table_provider(name).await.map_err(err)?;
    let Some(held) = provider.downcast_ref::<super::rows::HeldTable>() else {
        return Ok(());
    };
    let (schema, parts, bytes) = (held.schema(), held.parts().to_vec(), held.bytes());
    drop(provider);
    let rows = parts.iter().flatten().map(|b| b.num_rows()).sum();
    let dir = space.folder(name)?;
    let folder = dir.path().to_path_buf();
    let file_schema = schema.clone();
    // The parts are encoded on every core, taken from a shared counter (parts differ in size):
    // at 33M customers `clusters` first moved the held `clv_discounted` result (747 MiB) on one
    // thread while the other core idled.
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(parts.len())
        .max(1);
    let paths = tokio::task::spawn_blocking(move || -> Result<Vec<PathBuf>> {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let write = |i: usize| -> Result<PathBuf> {
            let mut f = SpillFile::create(&folder, i, file_schema.clone())?;
            for b in &parts[i] {
                f.write(b)?;
            }
            f.close()
        };
        let done: Vec<Result<Vec<(usize, PathBuf)>>> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    scope.spawn(|| {
                        let mut mine = Vec::new();
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            if i >= parts.len() {
                                return Ok(mine);
                            }
                            mine.push((i, write(i)?));
                        }
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| {
                    w.join().unwrap_or_else(|_| {
                        Err(Error::Internal("a scratch writer thread panicked".into()))
                    })
                })
                .collect()
        });
        let mut paths: Vec<(usize, PathBuf)> = Vec::with_capacity(parts.len());
        for d in done {
            paths.extend(d?);
        }
        paths.sort_by_key(|(i, _)| *i);
        Ok(paths.into_iter().map(|(_, p)| p).collect())
    })
    .await
    .map_err(|e| Error::Internal(format!("the scratch write task failed: {e}")))??;
    register_spilled(ctx, name, schema, dir, paths, rows, bytes).await
}

#[cfg(test)]
mod tests {
    use super::super::rows::HeldTable;
    use super::super::spill::tests::{ints, session};
    use super::super::spill::{SpilledTable, collect_or_spill};
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_model_step_that_needs_the_memory_moves_held_results_to_scratch() {
        let base = std::env::temp_dir().join(format!("clvflow-evict-test-{}", std::process::id()));
        // Two held results of 1.6 MB each in an 8 MB pool (4 MB for results).
        let ctx = session(8 << 20, &base);
        for (name, n) in [("a", 200_000), ("b", 190_000)] {
            let sql = format!("SELECT value AS v FROM generate_series(1, {n})");
            let df = ctx.sql(&sql).await.unwrap();
            let kept = collect_or_spill(&ctx, "r", name, df).await.unwrap();
            assert!(kept.held > 1_500_000, "{kept:?}");
        }
        let held = ctx.runtime_env().memory_pool.reserved();
        // 5 MB of buffers fit once one result (the larger, `a`) has moved; `b` is read by the
        // step and stays.
        let r = reserve_evicting(&ctx, "model".into(), 5 << 20, &["B"])
            .await
            .unwrap();
        let kind = |name: &'static str| {
            let ctx = ctx.clone();
            async move {
                let p = ctx.table_provider(name).await.unwrap();
                (
                    p.downcast_ref::<HeldTable>().is_some(),
                    p.downcast_ref::<SpilledTable>().is_some(),
                )
            }
        };
        assert_eq!(kind("a").await, (false, true));
        assert_eq!(kind("b").await, (true, false));
        assert!(ctx.runtime_env().memory_pool.reserved() < held + (5 << 20) - 1_500_000);
        assert_eq!(
            ints(&ctx, "SELECT v FROM a"),
            (1..=200_000).collect::<Vec<i64>>()
        );
        // Nothing else may move: the pool's error, naming the consumers.
        let err = reserve_evicting(&ctx, "model 2".into(), 5 << 20, &["b"])
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("Resources exhausted") && err.contains("model 2"),
            "{err}"
        );
        drop(r);
        drop(ctx);
        let _ = std::fs::remove_dir_all(&base);
    }
}
