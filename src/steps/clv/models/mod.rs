//! The fitting code of the predictive CLV models, free of tables and sessions: BG/NBD purchases
//! and P(alive) ([`bgnbd`]), Gamma-Gamma spend ([`gamma_gamma`]), on the special functions
//! ([`special`]) and optimiser ([`optimize`]) they share, plus the helpers that make them fast
//! on millions of customers: grouping identical rows ([`group`]) and deterministic parallel
//! sums and maps ([`par_sum`], [`par_map`]).

pub use crate::steps::exact::ExactSum;

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A fitted model (parameters `P`) and how the fit went.
#[derive(Debug, Clone)]
pub struct Fit<P> {
    pub params: P,
    /// Total log-likelihood of the data at `params`.
    pub log_likelihood: f64,
    pub iterations: usize,
    pub customers: u64,
}

impl<P> Fit<P> {
    /// The same fit with its parameters in another form.
    pub fn map<Q>(self, f: impl FnOnce(P) -> Q) -> Fit<Q> {
        Fit {
            params: f(self.params),
            log_likelihood: self.log_likelihood,
            iterations: self.iterations,
            customers: self.customers,
        }
    }
}

pub mod bgnbd;
pub mod dual;
pub mod gamma_gamma;
pub mod mbgnbd;
pub mod optimize;
pub mod pareto_nbd;
#[cfg(test)]
pub mod simulate;
pub mod special;
pub mod transaction;

/// Sums `f` over 8 fixed chunks of `data`, on scoped threads when the data are large. The chunks
/// and the order of the sum do not depend on the machine, so results are identical everywhere.
pub fn par_sum<T: Sync, const N: usize>(
    data: &[T],
    f: impl Fn(&[T]) -> (f64, [f64; N]) + Sync,
) -> (f64, [f64; N]) {
    const CHUNKS: usize = 8;
    let size = data.len().div_ceil(CHUNKS).max(1);
    let parts: Vec<(f64, [f64; N])> = if data.len() < 20_000 {
        data.chunks(size).map(&f).collect()
    } else {
        std::thread::scope(|s| {
            let handles: Vec<_> = data.chunks(size).map(|c| s.spawn(|| f(c))).collect();
            handles
                .into_iter()
                // A panicking chunk gives NaN: the optimiser then reports a non-finite likelihood.
                .map(|h| h.join().unwrap_or((f64::NAN, [f64::NAN; N])))
                .collect()
        })
    };
    let mut total = (0.0, [0.0; N]);
    for (l, g) in parts {
        total.0 += l;
        for (t, v) in total.1.iter_mut().zip(g) {
            *t += v;
        }
    }
    total
}

/// Applies `f` to every item, on scoped threads in 8 fixed chunks when the data are large.
/// Results are in input order. `None` if a thread panicked.
pub fn par_map<T: Sync, U: Send>(data: &[T], f: impl Fn(&T) -> U + Sync) -> Option<Vec<U>> {
    const CHUNKS: usize = 8;
    if data.len() < 20_000 {
        return Some(data.iter().map(&f).collect());
    }
    let size = data.len().div_ceil(CHUNKS).max(1);
    let f = &f;
    let parts: Vec<Option<Vec<U>>> = std::thread::scope(|s| {
        let handles: Vec<_> = data
            .chunks(size)
            .map(|c| s.spawn(move || c.iter().map(f).collect::<Vec<U>>()))
            .collect();
        handles.into_iter().map(|h| h.join().ok()).collect()
    });
    let mut out = Vec::with_capacity(data.len());
    for part in parts {
        out.extend(part?);
    }
    Some(out)
}

/// A fast hasher for grouping rows of floats by their bit patterns (the standard SipHash costs
/// more than the work it guards here). Multiply-rotate per word, then a full avalanche, so keys
/// whose low bits are all zero (round numbers) still spread over the table.
#[derive(Default, Clone, Copy)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x517c_c1b7_2722_0a95);
    }

    fn write_i64(&mut self, v: i64) {
        self.write_u64(v as u64);
    }

    fn finish(&self) -> u64 {
        // splitmix64's finaliser.
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// Groups identical rows: returns the distinct rows, sorted, with how many times each occurs,
/// and for every input row the index of its group. Rows are compared by their bits (so -0.0
/// and 0.0 differ, which never matters for the counts and times grouped here).
pub fn group<const N: usize>(rows: &[[f64; N]]) -> (Vec<([f64; N], f64)>, Vec<u32>) {
    let mut g = Grouper::with_capacity(rows.len() / 2);
    for row in rows {
        g.push(*row);
    }
    g.finish()
}

/// [`group`] as the rows arrive (without a copy of all of them first): the same result.
pub struct Grouper<const N: usize> {
    slots: HashMap<[u64; N], u32, BuildHasherDefault<KeyHasher>>,
    distinct: Vec<([f64; N], f64)>,
    index: Vec<u32>,
}

impl<const N: usize> Default for Grouper<N> {
    fn default() -> Self {
        Self::with_capacity(0)
    }
}

impl<const N: usize> Grouper<N> {
    /// Room for `groups` distinct rows before the map grows.
    pub fn with_capacity(groups: usize) -> Self {
        Self {
            slots: HashMap::with_capacity_and_hasher(groups, Default::default()),
            distinct: Vec::new(),
            index: Vec::new(),
        }
    }

    pub fn push(&mut self, row: [f64; N]) {
        let key = row.map(f64::to_bits);
        let next = self.distinct.len() as u32;
        let slot = *self.slots.entry(key).or_insert(next);
        if slot == next {
            self.distinct.push((row, 0.0));
        }
        self.distinct[slot as usize].1 += 1.0;
        self.index.push(slot);
    }

    /// The distinct rows, sorted, with their counts, and every row's group.
    pub fn finish(self) -> (Vec<([f64; N], f64)>, Vec<u32>) {
        let Self {
            slots,
            distinct,
            mut index,
        } = self;
        drop(slots);
        // Sorted, so results never depend on hashing and runs of equal leading values are
        // adjacent.
        let mut order: Vec<u32> = (0..distinct.len() as u32).collect();
        order.sort_unstable_by(|a, b| {
            let (ra, rb) = (&distinct[*a as usize].0, &distinct[*b as usize].0);
            ra.iter()
                .zip(rb)
                .map(|(x, y)| x.total_cmp(y))
                .find(|o| o.is_ne())
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        let mut new_slot = vec![0u32; distinct.len()];
        for (pos, old) in order.iter().enumerate() {
            new_slot[*old as usize] = pos as u32;
        }
        let sorted = order.iter().map(|o| distinct[*o as usize]).collect();
        for i in index.iter_mut() {
            *i = new_slot[*i as usize];
        }
        (sorted, index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouping_counts_rows_and_points_back_to_their_group() {
        let rows = [
            [2.0, 1.0],
            [0.0, 7.0],
            [2.0, 1.0],
            [0.0, 7.0],
            [2.0, 1.0],
            [1.0, 0.0],
        ];
        let (distinct, index) = group(&rows);
        assert_eq!(
            distinct,
            vec![([0.0, 7.0], 2.0), ([1.0, 0.0], 1.0), ([2.0, 1.0], 3.0)]
        );
        for (row, i) in rows.iter().zip(&index) {
            assert_eq!(distinct[*i as usize].0, *row);
        }
        // Many round numbers (zero low bits) stay fast and exact.
        let many: Vec<[f64; 3]> = (0..200_000)
            .map(|i| [(i % 50) as f64, (i % 1000) as f64 / 7.0, 8.0])
            .collect();
        let (d, idx) = group(&many);
        assert_eq!(d.len(), 1000);
        assert_eq!(d.iter().map(|r| r.1).sum::<f64>(), 200_000.0);
        assert!(many.iter().zip(&idx).all(|(r, i)| d[*i as usize].0 == *r));
    }

    #[test]
    fn par_map_keeps_order() {
        let v: Vec<u64> = (0..100_000).collect();
        assert_eq!(
            par_map(&v, |x| x * 2),
            Some(v.iter().map(|x| x * 2).collect())
        );
    }
}
