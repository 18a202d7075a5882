//! The outputs of a run, staged while its steps go on: after each step, what no later step
//! reads is dropped, the outputs the step produced are written to staging, and a streamed step
//! (a view until then) is computed by that write. Nothing here touches a table folder; the
//! commit comes once every output is staged (`super`).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use datafusion::prelude::SessionContext;
use tracing::info;

use super::results::ResultLifetimes;
use crate::engine::memory;
use crate::error::{Error, Result};
use crate::inputs::InputSummary;
use crate::job::JobPlan;
use crate::sink::{self, RunInfo, Staged};

/// Outputs staged by a run while its steps go on.
pub(super) struct Staging<'a> {
    pub run: &'a RunInfo,
    pub lifetimes: ResultLifetimes,
    /// (output index, time staging took, staged output).
    staged: Mutex<Vec<(usize, Duration, Staged)>>,
    /// Step results that later steps read back from their staged files, with their sizes.
    read_back: Mutex<Vec<(String, InputSummary)>>,
}

fn mib(bytes: u64) -> u64 {
    bytes >> 20
}

impl<'a> Staging<'a> {
    pub fn new(run: &'a RunInfo, lifetimes: ResultLifetimes) -> Self {
        Self {
            run,
            lifetimes,
            staged: Mutex::new(Vec::new()),
            read_back: Mutex::new(Vec::new()),
        }
    }

    /// The step results read back from their staged files so far, with their sizes (for
    /// planning the steps that read them, like inputs).
    pub fn read_back(&self) -> Vec<(String, InputSummary)> {
        self.read_back
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn take(&self) -> Vec<(usize, Duration, Staged)> {
        std::mem::take(&mut *self.staged.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The columns step `step`'s result is held with (`None`: all).
    pub fn keep_columns(&self, step: usize) -> Option<&std::collections::BTreeSet<String>> {
        self.lifetimes.keep_columns.get(step)?.as_ref()
    }

    pub fn streamed(&self, step: usize) -> bool {
        self.lifetimes.streamed.get(step) == Some(&true)
    }

    /// After step `i`: drops what no later step reads (tables being staged now excepted), then
    /// stages the outputs the step produced, then drops those too if nothing else reads them.
    /// A streamed step (a view until now) is computed by its staging; if later steps read it,
    /// they read its staged files. Returns the rows staged from step `i` itself.
    pub async fn after_step(&self, ctx: &SessionContext, job: &JobPlan, i: usize) -> Result<u64> {
        let step = &job.steps[i];
        let streamed = self.streamed(i);
        let mut written = 0;
        let stage_now: &[usize] = self.lifetimes.stage_after.get(i).map_or(&[], Vec::as_slice);
        let staging: Vec<&str> = stage_now
            .iter()
            .map(|&o| job.outputs[o].from.as_str())
            .collect();
        let done: Vec<&String> = self
            .lifetimes
            .drop_after
            .get(i)
            .into_iter()
            .flatten()
            .collect();
        let (later, now): (Vec<&String>, Vec<&String>) = done
            .into_iter()
            .partition(|t| staging.iter().any(|s| s.eq_ignore_ascii_case(t)));
        drop_tables(ctx, &now)?;
        // Staged here first, then added to the run's list (also when a later one fails, so
        // that the run abandons them): a second output of the step may copy a first one's files.
        let mut this_step: Vec<(usize, Duration, Staged)> = Vec::new();
        let staged_all = async {
            for (k, &o) in stage_now.iter().enumerate() {
                let out = &job.outputs[o];
                let t = Instant::now();
                memory::reset_peak();
                crate::engine::pool::take_peak(ctx);
                let twin = this_step.iter().find(|(_, _, s)| sink::same_files(out, s));
                let staged = match twin {
                    Some((_, _, first)) => sink::stage_copy(ctx, out, self.run, first).await?,
                    None => sink::stage(ctx, out, self.run).await?,
                };
                let took = t.elapsed();
                let peak = crate::engine::pool::take_peak(ctx);
                info!(job = %job.name, output = %out.from, format = out.format.name(), ms = took.as_millis() as u64,
                      rows = staged.rows(), bytes = staged.bytes(), copied = twin.is_some(),
                      peak_rss_mb = memory::peak_rss().map(mib),
                      pool_peak_mb = peak.map(|p| mib(p.pool as u64)), heap_peak_mb = peak.map(|p| mib(p.process as u64)), "output staged");
                if out.from.eq_ignore_ascii_case(&step.name) && twin.is_none() {
                    written = staged.rows();
                    let read_later = !later.iter().any(|t| t.eq_ignore_ascii_case(&step.name));
                    // A second output of the same step (the table as Parquet and as Delta)
                    // copies these files or, when it cannot (other settings or store), reads
                    // them instead of computing the step again; either way it plans the step's
                    // table, which must then be these files, not the consumed stream.
                    let written_again = stage_now[k + 1..]
                        .iter()
                        .any(|&o2| job.outputs[o2].from.eq_ignore_ascii_case(&step.name));
                    if streamed && (read_later || written_again) {
                        ctx.deregister_table(step.name.as_str())
                            .map_err(|e| Error::df(format!("replace `{}`", step.name), e))?;
                        ctx.register_table(step.name.as_str(), staged.as_table(ctx).await?)
                            .map_err(|e| Error::df(format!("read back `{}`", step.name), e))?;
                        self.read_back
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((step.name.clone(), staged.summary()));
                    }
                }
                this_step.push((o, took, staged));
            }
            Ok::<_, Error>(())
        }
        .await;
        self.staged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(this_step);
        staged_all?;
        drop_tables(ctx, &later)?;
        memory::release();
        Ok(written)
    }
}

fn drop_tables(ctx: &SessionContext, tables: &[&String]) -> Result<()> {
    for table in tables {
        ctx.deregister_table(table.as_str())
            .map_err(|e| Error::df(format!("drop step result `{table}`"), e))?;
    }
    Ok(())
}
