//! The per-customer passes of the rule-based models: how the customers are split over threads
//! ([`Layout`]), their sums ([`Acc`]) and one shard's passes over the orders ([`run_shard`]).

use std::collections::HashMap;
use std::hash::BuildHasherDefault;

use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::datatypes::{Float64Type, Int64Type};

use super::YEAR_SECONDS;
use crate::error::{Error, Result};
use crate::steps::clv::models::{ExactSum, KeyHasher};

/// How the customers are split over the threads and found by id.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Layout {
    /// Any ids: a shard owns the ids of a multiplicative hash's range and finds a customer's
    /// sums through a hash map (one lookup per row in the first pass, an index per row kept
    /// for the second).
    Hashed,
    /// Ids `lo, lo + stride, lo + 2 stride, ...` (auto-increment keys, the generator's 1..n;
    /// `stride` is the number of buckets when the step takes its customers in buckets by id
    /// modulo, see `bucket_filter`), no more of them than half the rows: shard `k` owns the
    /// `k`-th of `shards` contiguous blocks of the `width` slots and keeps one for every id of
    /// its block, so a customer's sums are at `(id - lo) / stride - start` without a lookup.
    Dense { lo: i64, width: u64, stride: u64 },
}

impl Layout {
    /// The dense layout where the non-NULL ids of `orders` are all `lo` plus a multiple of
    /// `stride` (else of 1) and span at most half as many slots as there are rows, else hashed.
    pub(super) fn of(orders: &[RecordBatch], stride: u64) -> Result<Layout> {
        let (mut lo, mut hi, mut rows) = (i64::MAX, i64::MIN, 0u64);
        for b in orders {
            let (id, _, _) = order_cols(b)?;
            rows += b.num_rows() as u64;
            if let (Some(l), Some(h)) = (
                datafusion::arrow::compute::min(id),
                datafusion::arrow::compute::max(id),
            ) {
                lo = lo.min(l);
                hi = hi.max(h);
            }
        }
        if lo > hi {
            return Ok(Layout::Hashed);
        }
        let mut stride = stride.max(1);
        if stride > 1 {
            let congruent = |b: &RecordBatch| {
                order_cols(b).map(|(id, _, _)| {
                    id.iter()
                        .flatten()
                        .all(|c| (c.wrapping_sub(lo) as u64).is_multiple_of(stride))
                })
            };
            for b in orders {
                if !congruent(b)? {
                    stride = 1;
                    break;
                }
            }
        }
        let span = (i128::from(hi) - i128::from(lo)) as u128;
        let width = span / u128::from(stride) + 1;
        Ok(if width <= u128::from(rows / 2) {
            Layout::Dense {
                lo,
                width: width as u64,
                stride,
            }
        } else {
            Layout::Hashed
        })
    }

    /// The first slot of shard `k`'s block.
    fn block_start(width: u64, shards: usize, k: usize) -> u64 {
        ((u128::from(width) * k as u128).div_ceil(shards as u128)) as u64
    }

    /// Hashed: which of `shards` threads owns customer `id` (the high bits of a multiplicative
    /// hash; the id map's own hash is different, so its buckets stay spread within a shard).
    #[inline]
    fn hashed_owner(id: i64, shards: usize) -> usize {
        let h = (id as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32;
        ((h * shards as u64) >> 32) as usize
    }
}

/// One customer's sums, together in one cache line (64 bytes, aligned): customers come in random
/// order, so each row then costs one miss for its customer's sums, not one per array of sums.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(super) struct Acc {
    pub(super) revenue: ExactSum,
    /// Discounted: the discounted profit, the acquisition cost, the last relationship year
    /// counted.
    pub(super) discounted: ExactSum,
    pub(super) orders: i64,
    pub(super) first_e: f64,
    pub(super) cost: f64,
    pub(super) years: i32,
    pub(super) has_cost: bool,
    /// Retention: ordered in the year before last / in the last year.
    pub(super) before_last: bool,
    pub(super) last: bool,
}

const _: () = assert!(size_of::<Acc>() == 64);

impl Acc {
    const EMPTY: Acc = Acc {
        orders: 0,
        revenue: ExactSum::ZERO,
        first_e: f64::INFINITY,
        discounted: ExactSum::ZERO,
        cost: 0.0,
        years: 0,
        has_cost: false,
        before_last: false,
        last: false,
    };

    /// The first pass: an order at `t` (epoch seconds) of `a`.
    #[inline]
    fn count(&mut self, t: f64, a: f64, s: &Settings) {
        self.orders += 1;
        self.revenue.add(a);
        self.first_e = self.first_e.min(t);
        if s.retention {
            let before = s.now_e - t;
            self.before_last |= before > YEAR_SECONDS && before <= 2.0 * YEAR_SECONDS;
            self.last |= before <= YEAR_SECONDS;
        }
    }

    /// The second pass (discounted): the order's relationship year, from the first order.
    #[inline]
    fn discount(&mut self, t: f64, a: f64, s: &Settings) {
        // t is at or after the first order, so the floor is a truncation (one instruction;
        // `floor` is a libm call here), and the growth factor of the first years comes from a
        // table of the same `powi`: the same bits as computed per row.
        let q = (t - self.first_e) / YEAR_SECONDS;
        let year = if q >= 0.0 { q as i64 } else { q.floor() as i64 } + 1;
        if s.years.is_some_and(|cap| year > cap) {
            return;
        }
        self.years = self.years.max(year.clamp(0, i32::MAX.into()) as i32);
        let growth = match usize::try_from(year).ok().and_then(|y| s.growth.get(y)) {
            Some(g) => *g,
            None => (1.0 + s.discount_rate).powi(year as i32),
        };
        self.discounted.add(a * s.margin / growth);
    }

    /// A customer's acquisition cost: the largest given (customers without one cost 0).
    fn add_cost(&mut self, v: f64) {
        self.cost = if self.has_cost { self.cost.max(v) } else { v };
        self.has_cost = true;
    }
}

/// Customer id to its index in [`Shard::accs`].
type IdMap = HashMap<i64, u32, BuildHasherDefault<KeyHasher>>;

/// One shard's customers with their sums: hashed, in the order of their first row; dense, by id.
pub(super) struct Shard {
    pub(super) ids: Vec<i64>,
    pub(super) accs: Vec<Acc>,
}

/// The run's settings a shard needs.
pub(super) struct Settings {
    pub(super) now_e: f64,
    pub(super) margin: f64,
    pub(super) discount_rate: f64,
    pub(super) years: Option<i64>,
    pub(super) retention: bool,
    pub(super) discounted: bool,
    /// `(1 + discount_rate)^y` for the first years `y` ([`Settings::growth_table`]).
    pub(super) growth: [f64; 64],
    /// Dense: log2 of the customers per block ([`BUCKET_SHIFT`]; tests take small blocks).
    pub(super) bucket_shift: u32,
}

impl Settings {
    /// `(1 + discount_rate)^y` for y = 0..64, by the `powi` the discount would call per row.
    pub(super) fn growth_table(discount_rate: f64) -> [f64; 64] {
        std::array::from_fn(|y| (1.0 + discount_rate).powi(y as i32))
    }
}

/// The (customer_id, e, amount) columns of one batch of [`super::orders_sql`].
type OrderCols<'a> = (
    &'a datafusion::arrow::array::PrimitiveArray<Int64Type>,
    &'a datafusion::arrow::array::PrimitiveArray<Float64Type>,
    &'a datafusion::arrow::array::PrimitiveArray<Float64Type>,
);

fn order_cols(b: &RecordBatch) -> Result<OrderCols<'_>> {
    let id = b.column(0).as_primitive_opt::<Int64Type>();
    let e = b.column(1).as_primitive_opt::<Float64Type>();
    let amount = b.column(2).as_primitive_opt::<Float64Type>();
    match (id, e, amount) {
        (Some(id), Some(e), Some(amount)) => Ok((id, e, amount)),
        _ => Err(Error::Internal(
            "the orders query did not return (BIGINT, DOUBLE, DOUBLE)".into(),
        )),
    }
}

/// Calls `f(id, e, amount)` for every row of `orders` whose id `mine` accepts, batch by batch
/// (a NULL amount is 0; rows with a NULL id or time, which the query filters out, are skipped).
/// The shard's rows of a batch are picked first without a branch, so the loop that calls `f`
/// (whose memory accesses are random) is not interrupted by a mispredicted branch every other
/// row.
fn for_rows(
    orders: &[RecordBatch],
    mine: impl Fn(i64) -> bool,
    mut f: impl FnMut(i64, f64, f64),
) -> Result<()> {
    let mut picked: Vec<u32> = Vec::new();
    for b in orders {
        let (id, e, amount) = order_cols(b)?;
        let checked = id.null_count() + e.null_count() + amount.null_count() > 0;
        let (ids, es, amounts) = (id.values(), e.values(), amount.values());
        picked.clear();
        picked.resize(ids.len(), 0);
        let mut n = 0;
        for (i, c) in ids.iter().enumerate() {
            picked[n] = i as u32;
            n += usize::from(mine(*c));
        }
        for &i in &picked[..n] {
            let i = i as usize;
            if checked && (id.is_null(i) || e.is_null(i)) {
                continue;
            }
            let a = if checked && amount.is_null(i) {
                0.0
            } else {
                amounts[i]
            };
            f(ids[i], es[i], a);
        }
    }
    Ok(())
}

/// Calls `f(id, cost)` for every row of `costs` (batches of [`super::costs_sql`]) with both set.
fn for_costs(costs: &[RecordBatch], mut f: impl FnMut(i64, f64)) -> Result<()> {
    for b in costs {
        let id = b.column(0).as_primitive_opt::<Int64Type>();
        let cost = b.column(1).as_primitive_opt::<Float64Type>();
        let (Some(id), Some(cost)) = (id, cost) else {
            return Err(Error::Internal(
                "the acquisition cost query did not return (BIGINT, DOUBLE)".into(),
            ));
        };
        for i in 0..b.num_rows() {
            if id.is_valid(i) && cost.is_valid(i) {
                f(id.value(i), cost.value(i));
            }
        }
    }
    Ok(())
}

/// Dense: a shard's customers are taken in blocks of `1 << bucket_shift` ids whose sums
/// (64 bytes each) fit the core's L2 cache, 32768 of them (2 MiB). The shard's rows are first
/// copied in block order (a counting sort: one pass to count, one to place, both sequential
/// reads), then both passes run block by block over rows whose customers' sums are in cache.
/// Read straight from the batches instead, every row's sums were a random access into the
/// shard's whole array (100 MiB at 3.3M customers): about 1 s of the step's 1.1 s there.
pub(super) const BUCKET_SHIFT: u32 = 15;

/// Dense: the parts each thread takes its customers in, one after the other (`compute`). Each
/// part scans every order twice (count, place) and every cost once, so 4 parts cost 6 more
/// scans per thread than one: at 3.3M customers the sums took 725-735 ms in 4 parts and
/// 518-541 ms in one, but one copy of all orders put the step's RSS at 1661 MiB, over the
/// shipped config's 1536 MiB target (4 parts: 1500 MiB).
pub(super) const SUB_SHARDS: usize = 4;

/// One order of a shard, placed in its block: the customer's slot, time and amount.
#[derive(Clone, Copy, Default)]
struct Row {
    slot: usize,
    t: f64,
    a: f64,
}

/// The rows `mine` accepts, ordered by block (`slot >> shift`), and where each block starts
/// (`bounds[b]..bounds[b + 1]`).
fn by_block(
    orders: &[RecordBatch],
    mine: impl Fn(i64) -> bool + Copy,
    slot: impl Fn(i64) -> usize,
    slots: usize,
    shift: u32,
) -> Result<(Vec<Row>, Vec<usize>)> {
    let blocks = (slots >> shift) + 1;
    let mut bounds = vec![0usize; blocks + 1];
    for_rows(orders, mine, |c, _, _| bounds[(slot(c) >> shift) + 1] += 1)?;
    for b in 1..bounds.len() {
        bounds[b] += bounds[b - 1];
    }
    let mut rows = vec![Row::default(); bounds[blocks]];
    let mut next = bounds.clone();
    let mut lost = false;
    for_rows(orders, mine, |c, t, a| {
        let slot = slot(c);
        let b = slot >> shift;
        match rows.get_mut(next[b]) {
            Some(row) if next[b] < bounds[b + 1] => {
                *row = Row { slot, t, a };
                next[b] += 1;
            }
            _ => lost = true,
        }
    })?;
    if lost {
        return Err(Error::Internal(
            "the orders changed between counting and placing them".into(),
        ));
    }
    Ok((rows, bounds))
}

pub(super) fn run_shard(
    shard: usize,
    shards: usize,
    layout: Layout,
    orders: &[RecordBatch],
    costs: &[RecordBatch],
    s: &Settings,
) -> Result<Shard> {
    let Layout::Dense { lo, width, stride } = layout else {
        let mine = |c: i64| Layout::hashed_owner(c, shards) == shard;
        return run_hashed(orders, costs, s, shards, mine);
    };
    let start = Layout::block_start(width, shards, shard);
    let len = Layout::block_start(width, shards, shard + 1) - start;
    // The shard's ids differ from `lo` by `start * stride` up to (not including) `end`: a
    // comparison per row, no division, decides which rows are the shard's. An id outside the
    // orders' range (an acquisition cost of a customer without orders) is nobody's.
    let (from, to) = (
        u128::from(start) * u128::from(stride),
        u128::from(start + len) * u128::from(stride),
    );
    let diff = move |c: i64| c.wrapping_sub(lo) as u64;
    let mine = move |c: i64| c >= lo && (from..to).contains(&u128::from(diff(c)));
    let slot = move |c: i64| {
        let d = diff(c);
        (if stride == 1 { d } else { d / stride } - start) as usize
    };
    let mut accs = vec![Acc::EMPTY; len as usize];
    let (rows, bounds) = by_block(orders, mine, slot, accs.len(), s.bucket_shift)?;
    for block in bounds.windows(2) {
        let block = &rows[block[0]..block[1]];
        for r in block {
            accs[r.slot].count(r.t, r.a, s);
        }
        if s.discounted {
            for r in block {
                accs[r.slot].discount(r.t, r.a, s);
            }
        }
    }
    drop(rows);
    if s.discounted {
        for_costs(costs, |c, v| {
            if mine(c)
                && (stride == 1 || diff(c).is_multiple_of(stride))
                && accs[slot(c)].orders > 0
            {
                accs[slot(c)].add_cost(v);
            }
        })?;
    }
    // Keep the ids that have orders, in id order.
    let mut ids = Vec::new();
    let mut offset = start;
    accs.retain(|acc| {
        if acc.orders > 0 {
            ids.push((i128::from(lo) + i128::from(offset) * i128::from(stride)) as i64);
        }
        offset += 1;
        acc.orders > 0
    });
    Ok(Shard { ids, accs })
}

fn run_hashed(
    orders: &[RecordBatch],
    costs: &[RecordBatch],
    s: &Settings,
    shards: usize,
    mine: impl Fn(i64) -> bool + Copy,
) -> Result<Shard> {
    let rows: usize = orders.iter().map(|b| b.num_rows()).sum();
    // Sized for about three orders a customer (growing costs a copy of everything so far).
    let customers = rows / shards / 3 + 16;
    let mut map = IdMap::with_capacity_and_hasher(customers, Default::default());
    let mut out = Shard {
        ids: Vec::with_capacity(customers),
        accs: Vec::with_capacity(customers),
    };
    // Each of this shard's rows' customer, for the second pass.
    let mut row_index: Vec<u32> = Vec::with_capacity(if s.discounted { rows / shards } else { 0 });
    for_rows(orders, mine, |c, t, a| {
        let next = out.ids.len() as u32;
        let k = *map.entry(c).or_insert(next);
        if k == next {
            out.ids.push(c);
            out.accs.push(Acc::EMPTY);
        }
        out.accs[k as usize].count(t, a, s);
        if s.discounted {
            row_index.push(k);
        }
    })?;
    if !s.discounted {
        return Ok(out);
    }
    let mut next = row_index.iter();
    let mut lost = false;
    for_rows(orders, mine, |_, t, a| {
        let Some(&k) = next.next() else {
            lost = true;
            return;
        };
        out.accs[k as usize].discount(t, a, s);
    })?;
    if lost {
        return Err(Error::Internal(
            "the orders changed between the two passes".into(),
        ));
    }
    drop(row_index);
    for_costs(costs, |c, v| {
        if mine(c)
            && let Some(&k) = map.get(&c)
        {
            out.accs[k as usize].add_cost(v);
        }
    })?;
    Ok(out)
}
