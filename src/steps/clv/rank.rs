//! The CLV rank of the predictive model: each customer's position by `clv`, as
//! `row_number() over (order by clv desc, customer_id)` gives it, without a sort of the whole
//! table in SQL.

/// Customers up to which the CLV rank is sorted on all cores (see [`clv_ranks`]).
pub(super) const PARALLEL_RANK_MAX: usize = 8_000_000;

/// Each customer's rank by `clv`: 1 = the highest, ties broken by the smaller `customer_id`
/// (what `row_number() over (order by clv desc, customer_id)` gives, without a sort of the
/// whole table in SQL). Floats are ordered as Arrow and DataFusion sort them (IEEE total
/// order: -0.0 below 0.0). `ids` are the customers' ids in the order of `clv`.
#[cfg(test)]
fn clv_ranks(clv: &[f64], ids: impl IntoIterator<Item = i64>) -> Vec<u32> {
    ranks_sorted(rank_keys(clv, ids), PARALLEL_RANK_MAX)
}

/// The sort keys of [`clv_ranks`]: ascending keys = descending CLV (the float's bits made
/// order-preserving, then inverted), then the id, then the position.
pub(super) fn rank_keys(clv: &[f64], ids: impl IntoIterator<Item = i64>) -> Vec<(u64, i64, u32)> {
    let key = |v: f64| {
        let bits = v.to_bits();
        let ordered = if bits >> 63 == 1 {
            !bits
        } else {
            bits | 1 << 63
        };
        !ordered
    };
    clv.iter()
        .zip(ids)
        .enumerate()
        .map(|(i, (v, id))| (key(*v), id, i as u32))
        .collect()
}

/// The ranks from the keys, sorted on all cores up to `parallel_max` customers.
pub(super) fn ranks_sorted(mut order: Vec<(u64, i64, u32)>, parallel_max: usize) -> Vec<u32> {
    // Up to a few million: sorted in chunks on all cores, then merged (the standard stable
    // sort finds the sorted runs and merges them in linear time per run, with a buffer of half
    // the keys). Beyond: sorted in place on one core, without that buffer. The keys are
    // distinct (the position is in them), so both give the same order.
    if order.len() <= parallel_max {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
        let chunk = order.len().div_ceil(threads).max(50_000);
        std::thread::scope(|s| {
            for part in order.chunks_mut(chunk) {
                s.spawn(|| part.sort_unstable());
            }
        });
        order.sort();
    } else {
        order.sort_unstable();
    }
    let mut rank = vec![0u32; order.len()];
    for (r, (_, _, i)) in order.iter().enumerate() {
        rank[*i as usize] = r as u32 + 1;
    }
    rank
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{AsArray, Float64Array, Int64Array, RecordBatch};
    use datafusion::arrow::datatypes::{DataType, Field, Int64Type, Schema};
    use datafusion::prelude::SessionContext;
    use std::collections::HashMap;
    use std::sync::Arc;

    /// The rank equals DataFusion's `row_number() over (order by clv desc, customer_id)` on
    /// values with many ties, 0.0 and -0.0 (which Arrow orders apart), negatives and customer
    /// ids in random order.
    #[tokio::test]
    async fn clv_rank_is_row_number_by_clv_desc_then_customer_id() {
        use rand::seq::SliceRandom;
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        // Enough rows for the sort to run in chunks on several threads.
        let mut ids: Vec<i64> = (1..=120_000).map(|i| i * 7 - 5000).collect();
        ids.shuffle(&mut rng);
        let clv: Vec<f64> = ids
            .iter()
            .map(|_| match rng.random_range(0..4) {
                0 => 0.0,
                1 => -0.0,
                2 => f64::from(rng.random_range(-3..20)),
                _ => rng.random_range(-50.0..5000.0),
            })
            .collect();
        let got = clv_ranks(&clv, ids.iter().copied());
        // The one-core sort for many customers gives the same ranks.
        assert_eq!(ranks_sorted(rank_keys(&clv, ids.iter().copied()), 0), got);

        let schema = Arc::new(Schema::new(vec![
            Field::new("customer_id", DataType::Int64, false),
            Field::new("clv", DataType::Float64, false),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from(ids.clone())),
                Arc::new(Float64Array::from(clv.clone())),
            ],
        )
        .unwrap();
        let ctx = SessionContext::new();
        crate::steps::rows::register(&ctx, "clv", schema, vec![vec![batch]]).unwrap();
        let sql = "SELECT customer_id, CAST(row_number() OVER (ORDER BY clv DESC, customer_id) AS BIGINT) FROM clv";
        let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
        let mut want: HashMap<i64, i64> = HashMap::new();
        for b in &batches {
            let id = b.column(0).as_primitive::<Int64Type>();
            let rank = b.column(1).as_primitive::<Int64Type>();
            want.extend(
                id.values()
                    .iter()
                    .copied()
                    .zip(rank.values().iter().copied()),
            );
        }
        assert_eq!(want.len(), ids.len());
        for (id, rank) in ids.iter().zip(&got) {
            assert_eq!(Some(&i64::from(*rank)), want.get(id), "customer {id}");
        }
    }
}
