//! When a run can write each output and forget each step result (the lifetimes of step
//! results).
//!
//! Step results live in memory (DataFusion `MemTable`s). Holding every one until the end of a
//! run makes its peak memory the sum of all of them; instead the runner stages an output as soon
//! as the step that produces it is done, and drops a step result after the last step that reads
//! it. Which tables a SQL step reads comes from DataFusion's own parser (CTE names excluded); for
//! model steps it is their `from`, `backtest` and `acquisition_costs`.
//!
//! Invariant: a table is dropped only after every step that reads it has run and every output
//! that writes it has been staged. When a SQL step cannot be parsed here, nothing is dropped
//! (the step itself then fails with the real error).

use std::collections::{BTreeMap, BTreeSet};

use datafusion::prelude::SessionContext;

use crate::job::JobPlan;

/// Per step (by index): outputs to stage, then tables to drop, once the step is done.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResultLifetimes {
    /// Indexes into `job.outputs`, per step.
    pub stage_after: Vec<Vec<usize>>,
    /// Step tables, per step.
    pub drop_after: Vec<Vec<String>>,
    /// Steps whose result goes straight to its one output, never held in memory: SQL steps that
    /// exactly one output writes (and that maps no NULL partition values). Later steps that read
    /// such a result read the staged files.
    pub streamed: Vec<bool>,
    /// Per step, the columns of its result (the table named after the step) that later steps
    /// read (lower-cased), when that is known and no output writes the result: the step then
    /// holds only those (SQL steps compute only those; model steps let go of the columns they
    /// pass through from their input). `None`: all.
    pub keep_columns: Vec<Option<BTreeSet<String>>>,
}

impl ResultLifetimes {
    /// Works out the lifetimes of `job`'s step results for a run with template variables `vars`.
    pub fn compute(ctx: &SessionContext, job: &JobPlan, vars: &BTreeMap<String, String>) -> Self {
        let n = job.steps.len();
        let mut out = ResultLifetimes {
            stage_after: vec![Vec::new(); n],
            drop_after: vec![Vec::new(); n],
            streamed: vec![false; n],
            keep_columns: vec![None; n],
        };
        let Some(last) = n.checked_sub(1) else {
            return out;
        };
        let mut all_reads = Vec::with_capacity(n);
        for step in &job.steps {
            match step.kind.reads(ctx, vars) {
                Some(r) => all_reads.push(r),
                // Unknown reads: stage everything at the end and drop nothing.
                None => {
                    out.stage_after[last] = (0..job.outputs.len()).collect();
                    return out;
                }
            }
        }
        // Who produces each table, and the last step that reads it.
        // Keyed lower-case (as SQL refers to them); the registered name is kept for dropping.
        let mut producer: BTreeMap<String, (String, usize)> = BTreeMap::new();
        for (i, step) in job.steps.iter().enumerate() {
            for t in step.kind.produces(&step.name) {
                producer.insert(t.to_lowercase(), (t, i));
            }
        }
        let mut last_read: BTreeMap<String, usize> = BTreeMap::new();
        for (i, r) in all_reads.iter().enumerate() {
            for t in r {
                last_read.insert(t.clone(), i);
            }
        }
        for (o, output) in job.outputs.iter().enumerate() {
            let at = producer
                .get(&output.from.to_lowercase())
                .map_or(last, |(_, i)| *i);
            out.stage_after[at].push(o);
        }
        for (key, (table, made)) in &producer {
            let until = last_read.get(key).copied().unwrap_or(*made).max(*made);
            out.drop_after[until].push(table.clone());
        }
        for (i, step) in job.steps.iter().enumerate() {
            let writers: Vec<_> = job
                .outputs
                .iter()
                .filter(|o| o.from.eq_ignore_ascii_case(&step.name))
                .collect();
            // With several outputs (the table as Parquet and as Delta), the first one computes
            // the step into its files and the others read those (`staging`).
            out.streamed[i] = step.kind.is_sql()
                && !writers.is_empty()
                && writers.iter().all(|o| o.null_partition_value.is_none());
            if writers.is_empty() && job.column_reads.len() == n {
                out.keep_columns[i] = later_column_reads(job, i);
            }
        }
        out
    }
}

/// The columns of step `i`'s result that the steps after it read, if every one of them is
/// known.
fn later_column_reads(job: &JobPlan, i: usize) -> Option<BTreeSet<String>> {
    let table = job.steps[i].name.to_lowercase();
    let mut cols = BTreeSet::new();
    for reads in &job.column_reads[i + 1..] {
        if let Some(read) = reads.as_ref()?.get(&table) {
            cols.extend(read.as_ref()?.iter().cloned());
        }
    }
    Some(cols)
}
