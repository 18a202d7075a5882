//! `datafusion.execution.target_partitions: auto` in a step's `settings`: the step's number of
//! partitions derived from the data it reads, so that one job file serves the benchmark's 10M
//! order rows and ten times that.
//!
//! DataFusion splits a hash aggregation, a hash join and the repartitions before them into as
//! many parts as there are partitions. Two effects pull in opposite directions:
//! - while the step's data fits in memory, more partitions are faster: each hash table holds
//!   fewer groups and stays in the CPU caches. About [`ROWS_PER_PARTITION`] rows per partition
//!   measured best on 9.6M order rows (64 partitions; 32 and 128 were slower, README "Step
//!   settings");
//! - when the data does not fit, every partition spills, and each spilling partition holds
//!   buffers outside the memory pool (its scan's decoded pages, the merge of its spill files):
//!   at 96M order rows under a 2 GiB pool, `orders_clean` peaked at 3.1–3.6 GiB RSS with 64
//!   partitions and 2.4 GiB with 16. There the count gives each partition at least
//!   [`SHARE_WHEN_SPILLING`] of the pool.
//!
//! "Does not fit" is an estimate made before the step runs: the bytes of the tables the step
//! reads (held and spilled step results: what they hold in memory; Parquet inputs: their
//! uncompressed size, from the footers read when the run checks them) above half of
//! `engine.memory_limit`. The count never goes below the session's `target_partitions`
//! (`engine.target_partitions`, default the cores) nor above [`MAX_PARTITIONS`].
//!
//! The same sizes decide how a SQL step joins ([`resolve`]): an equi-join whose smaller side
//! reads tables above a quarter of the limit ([`JOIN_SHARE`]; inputs, held or spilled results,
//! results read back from their staged outputs) makes the step plan sort-merge joins, which
//! spill, instead of hash joins, which do not.

use std::borrow::Cow;
use std::collections::BTreeMap;

use datafusion::execution::memory_pool::MemoryLimit;
use datafusion::prelude::SessionContext;

use crate::inputs::InputSummary;
use crate::steps::{Step, StepKind};

/// The value of the setting that asks for it.
pub const AUTO: &str = "auto";
/// The setting.
pub const KEY: &str = "datafusion.execution.target_partitions";
/// Rows per partition while the data fits (cache-sized hash tables).
pub const ROWS_PER_PARTITION: u64 = 150_000;
/// The most partitions `auto` gives.
pub const MAX_PARTITIONS: usize = 64;
/// The least share of the memory pool per partition when the step's data does not fit.
pub const SHARE_WHEN_SPILLING: u64 = 128 << 20;
/// On the cluster engine `auto` gives at most this many partitions (= tasks of each stage) per
/// slot of `engine.target_partitions` (which is the cluster's total slots there). A task costs
/// a round trip to the scheduler and its own shuffle files, so the cache-sized partitions of
/// one process are far too many: at 3.3M customers on 2 slots (`./scripts/bench --cluster`,
/// 2026-12-07, one run each) 64 partitions took `orders_clean` 9.7 s and `customer_features`
/// 10.0 s, 8 (4 a slot) 6.9 and 4.8 s, 4 (2 a slot) 7.6 and 6.6 s.
pub const CLUSTER_TASKS_PER_SLOT: usize = 4;

/// What `auto` chose, and from what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    pub partitions: usize,
    /// Rows of the largest table the step reads.
    pub rows: u64,
    /// Bytes of all the tables the step reads (an estimate for inputs).
    pub bytes: u64,
    /// Whether those bytes were above half the memory limit.
    pub spills: bool,
}

/// The partitions for a step reading `bytes` in all, `rows` in its largest table, under a pool of
/// `limit` bytes (`None`: unlimited), never fewer than `floor` nor more than `max`.
pub fn choose(rows: u64, bytes: u64, limit: Option<u64>, floor: usize, max: usize) -> Choice {
    let floor = floor.max(1);
    let by_rows = usize::try_from(rows.div_ceil(ROWS_PER_PARTITION).max(1))
        .unwrap_or(usize::MAX)
        .checked_next_power_of_two()
        .unwrap_or(usize::MAX)
        .min(max);
    let spills = limit.is_some_and(|l| bytes > l / 2);
    let cap = match limit {
        Some(l) if spills => usize::try_from(l / SHARE_WHEN_SPILLING).unwrap_or(usize::MAX),
        _ => usize::MAX,
    };
    Choice {
        partitions: by_rows.min(cap).max(floor),
        rows,
        bytes,
        spills,
    }
}

/// Whether the setting `key: value` is `auto` partitions (to be chosen when the step runs).
pub fn is_auto(key: &str, value: &str) -> bool {
    key == KEY && value.trim() == AUTO
}

/// Whether `settings` ask for `auto`.
pub fn wants_auto(settings: &BTreeMap<String, String>) -> bool {
    settings.get(KEY).is_some_and(|v| is_auto(KEY, v))
}

/// The setting that plans equi-joins as sort-merge joins when `false`.
pub const HASH_JOIN_KEY: &str = "datafusion.optimizer.prefer_hash_join";

/// A hash join's build side (the smaller side) may read at most `memory_limit / JOIN_SHARE`
/// bytes of tables. A quarter, not the half that makes a step's partitions spill: an input's
/// size is its Parquet pages' uncompressed size, which understates Arrow's (dictionary-encoded
/// strings decode to full strings: at 3.3M customers the customers export is 59 MiB
/// uncompressed and 114 MiB in Arrow), the hash map comes on top, and the probe side's buffers
/// share the pool.
pub const JOIN_SHARE: u64 = 4;

/// Marks a session whose `engine.settings` set [`HASH_JOIN_KEY`]: the user's choice for every
/// step, which [`resolve`] leaves alone.
#[derive(Debug, Clone, Copy)]
pub struct JoinsSetByEngine;

/// `step`'s settings with what depends on the size of the tables it reads filled in (each
/// logged with what it came from); unchanged when nothing does:
/// - `auto` partitions replaced by the count [`choose`] gives;
/// - a SQL step with an equi-join whose smaller side reads tables that would fill a quarter of
///   the memory pool ([`JOIN_SHARE`]) plans its joins as sort-merge joins (DataFusion's sorts spill to disk; its
///   hash joins hold the whole build side, the smaller one, in memory and fail when it does
///   not fit), unless its settings or `engine.settings` say how to join. A join of a large
///   table to a small one (a lookup) stays a hash join. The setting is the session's, so in a
///   step with one large and one small join both are sort-merge joins.
///
/// `known` has the sizes of the run's inputs and of the step results read back from their
/// staged output files. On the cluster engine the memory limit is this process's, not the
/// executors': the count there comes from the rows alone, at most [`CLUSTER_TASKS_PER_SLOT`]
/// per slot, and joins are left as they are.
pub async fn resolve<'a>(
    ctx: &SessionContext,
    job: &str,
    step: &'a Step,
    vars: &BTreeMap<String, String>,
    known: &[(String, InputSummary)],
) -> Cow<'a, BTreeMap<String, String>> {
    let auto = wants_auto(&step.settings);
    let sql = match &step.kind {
        StepKind::Sql(sql)
            if !step.settings.contains_key(HASH_JOIN_KEY)
                && ctx
                    .state()
                    .config()
                    .get_extension::<JoinsSetByEngine>()
                    .is_none() =>
        {
            Some(sql)
        }
        _ => None,
    };
    if !auto && sql.is_none() {
        return Cow::Borrowed(&step.settings);
    }
    let on_cluster = crate::engine::cluster::RunScratch::of(ctx).is_some();
    let limit = match ctx.runtime_env().memory_pool.memory_limit() {
        MemoryLimit::Finite(l) if !on_cluster => Some(l as u64),
        _ => None,
    };
    let (mut rows, mut bytes) = (0u64, 0u64);
    let mut sizes = BTreeMap::new();
    for table in step.kind.reads(ctx, vars).unwrap_or_default() {
        if let Some((r, b)) = table_size(ctx, &table, known).await {
            rows = rows.max(r);
            bytes = bytes.saturating_add(b);
            sizes.insert(table, b);
        }
    }
    let mut settings = step.settings.clone();
    if auto {
        let floor = ctx.state().config().target_partitions();
        let max = if on_cluster {
            floor.saturating_mul(CLUSTER_TASKS_PER_SLOT)
        } else {
            MAX_PARTITIONS
        };
        let c = choose(rows, bytes, limit, floor, max);
        tracing::info!(job, step = %step.name, partitions = c.partitions, rows = c.rows,
                       bytes = c.bytes, spills = c.spills, "partitions chosen from the data");
        settings.insert(KEY.to_string(), c.partitions.to_string());
    }
    if let (Some(sql), Some(limit)) = (sql, limit)
        && sizes.values().any(|&b| b > limit / JOIN_SHARE)
    {
        let joins = sql.equi_joins(ctx, vars).await.unwrap_or_default();
        let large = large_joins(&joins, &sizes, limit / JOIN_SHARE);
        if !large.is_empty() {
            tracing::info!(job, step = %step.name, joins = %large.join("; "),
                           "joins planned as sort-merge joins: a hash table of the smaller side would not fit the memory limit");
            settings.insert(HASH_JOIN_KEY.to_string(), "false".to_string());
        }
    }
    if settings == step.settings {
        return Cow::Borrowed(&step.settings);
    }
    Cow::Owned(settings)
}

/// The joins of `joins` (the tables under each side) whose smaller side reads more than
/// `above` bytes by `sizes` (tables of unknown size count nothing), each described as
/// `a (n MiB) ⋈ b (m MiB) + c (k MiB)`.
fn large_joins(
    joins: &[[Vec<String>; 2]],
    sizes: &BTreeMap<String, u64>,
    above: u64,
) -> Vec<String> {
    let side = |names: &[String]| -> u64 {
        (names.iter().filter_map(|n| sizes.get(n))).fold(0u64, |a, &b| a.saturating_add(b))
    };
    let describe = |names: &[String]| -> String {
        let mut seen = Vec::new();
        for n in names {
            if !seen.contains(&n) {
                seen.push(n);
            }
        }
        let parts: Vec<String> = seen
            .iter()
            .map(|n| match sizes.get(*n) {
                Some(b) => format!("{n} ({} MiB)", b >> 20),
                None => n.to_string(),
            })
            .collect();
        if parts.is_empty() {
            "(no table)".to_string()
        } else {
            parts.join(" + ")
        }
    };
    joins
        .iter()
        .filter(|[l, r]| side(l).min(side(r)) > above)
        .map(|[l, r]| format!("{} ⋈ {}", describe(l), describe(r)))
        .collect()
}

/// Rows and bytes of table `name` on `ctx`: a held or spilled step result's own figures, an
/// input's from the run's check of its files and a result read back from its staged output's
/// files from their footers (`known`); `None` for anything else.
pub async fn table_size(
    ctx: &SessionContext,
    name: &str,
    known: &[(String, InputSummary)],
) -> Option<(u64, u64)> {
    if let Some((_, s)) = known.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)) {
        return Some((s.rows, s.memory_bytes));
    }
    let provider = ctx.table_provider(name).await.ok()?;
    if let Some(t) = provider.downcast_ref::<crate::steps::rows::HeldTable>() {
        let rows = t
            .parts()
            .iter()
            .flatten()
            .map(|b| b.num_rows() as u64)
            .sum();
        return Some((rows, t.bytes() as u64));
    }
    if let Some(t) = provider.downcast_ref::<crate::steps::spill::SpilledTable>() {
        return Some((t.rows() as u64, t.bytes() as u64));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn fitting_data_gets_cache_sized_partitions_and_spilling_data_a_share_of_the_pool_each() {
        // The benchmark: 9.6M order rows (~0.45 GB) under 2 GiB: 64 partitions, as measured best.
        let c = choose(9_638_391, 450 << 20, Some(2 * GIB), 2, MAX_PARTITIONS);
        assert_eq!((c.partitions, c.spills), (64, false));
        // Ten times that (4.5 GB) under 2 GiB: 16 partitions of at least 128 MiB each.
        let c = choose(96_478_703, 4500 << 20, Some(2 * GIB), 2, MAX_PARTITIONS);
        assert_eq!((c.partitions, c.spills), (16, true));
        // Under 8 GiB the same data fits only in part: 64 share it.
        assert_eq!(
            choose(96_478_703, 4500 << 20, Some(8 * GIB), 2, MAX_PARTITIONS).partitions,
            64
        );
        assert_eq!(
            choose(96_478_703, 4500 << 20, Some(32 * GIB), 2, MAX_PARTITIONS).partitions,
            64
        );
        assert!(!choose(96_478_703, 4500 << 20, Some(32 * GIB), 2, MAX_PARTITIONS).spills);
        // No limit: by rows alone.
        assert_eq!(
            choose(96_478_703, 4500 << 20, None, 2, MAX_PARTITIONS).partitions,
            64
        );
        // Small data: the floor (the cores, or what the session has).
        assert_eq!(
            choose(3_000, 1 << 20, Some(2 * GIB), 2, MAX_PARTITIONS).partitions,
            2
        );
        assert_eq!(choose(0, 0, Some(2 * GIB), 8, MAX_PARTITIONS).partitions, 8);
        assert_eq!(
            choose(1_000_000, 50 << 20, Some(2 * GIB), 2, MAX_PARTITIONS).partitions,
            8
        );
        // On the cluster (no limit there; floor = the cluster's slots): a few tasks per slot.
        let on_cluster = |rows, slots: usize| {
            choose(rows, 0, None, slots, slots * CLUSTER_TASKS_PER_SLOT).partitions
        };
        assert_eq!(on_cluster(9_638_391, 2), 8);
        assert_eq!(on_cluster(96_478_703, 16), 64);
        assert_eq!(on_cluster(3_000, 8), 8);
        // A tiny pool: never below the floor.
        assert_eq!(
            choose(96_478_703, 4500 << 20, Some(64 << 20), 2, MAX_PARTITIONS).partitions,
            2
        );
        // Extremes do not overflow.
        assert_eq!(
            choose(u64::MAX, u64::MAX, Some(u64::MAX), 2, MAX_PARTITIONS).partitions,
            64
        );
        assert_eq!(
            choose(u64::MAX, u64::MAX, None, 100, MAX_PARTITIONS).partitions,
            100
        );
    }

    #[test]
    fn a_join_is_large_when_its_smaller_side_is() {
        let sizes = BTreeMap::from([
            ("orders".to_string(), 3000 << 20),
            ("customers".to_string(), 700 << 20),
            ("segment_map".to_string(), 1 << 10),
        ]);
        let j = |l: &[&str], r: &[&str]| -> [Vec<String>; 2] {
            [
                l.iter().map(|s| s.to_string()).collect(),
                r.iter().map(|s| s.to_string()).collect(),
            ]
        };
        let above = 1 << 30;
        // A lookup joined to the largest table: the hash table is the lookup's.
        assert!(large_joins(&[j(&["orders"], &["segment_map"])], &sizes, above).is_empty());
        // Both sides above the limit: a sort-merge join, named with its sizes.
        assert_eq!(
            large_joins(&[j(&["orders"], &["customers", "orders"])], &sizes, above),
            ["orders (3000 MiB) ⋈ customers (700 MiB) + orders (3000 MiB)"]
        );
        // A side's tables add up; unknown tables count nothing.
        assert!(large_joins(&[j(&["orders"], &["customers", "x"])], &sizes, above).is_empty());
        assert_eq!(
            large_joins(
                &[j(&["orders"], &["customers", "customers"])],
                &sizes,
                above
            )
            .len(),
            1
        );
        assert!(large_joins(&[j(&[], &["orders"])], &sizes, 0).is_empty());
    }

    #[test]
    fn only_the_word_auto_asks_for_it() {
        let s = |v: &str| BTreeMap::from([(KEY.to_string(), v.to_string())]);
        assert!(wants_auto(&s("auto")) && wants_auto(&s(" auto ")));
        assert!(!wants_auto(&s("64")) && !wants_auto(&BTreeMap::new()));
        assert!(!is_auto("datafusion.execution.batch_size", "auto"));
    }
}
