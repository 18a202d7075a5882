//! K-means on standardised points: k-means++ seeding from a seed (same input and seed, same
//! clusters), Lloyd iterations, best of several starts, the mean silhouette, and the
//! log-transform + z-score of raw features. Pure functions on flat vectors, no I/O.
//!
//! Nothing here depends on the order of the points: sums over all points are exact
//! ([`ExactSum`]), and the sample is chosen by the points' ids ([`sample_by_id`]).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::steps::exact::ExactSum;

/// The positions of `n` of the ids, chosen by a seeded hash of each id (the same customers are
/// chosen whatever the order of the rows), in the order of their ids. All when there are no
/// more than `n`.
pub fn sample_by_id(ids: &[i64], n: usize, seed: u64) -> Vec<usize> {
    let mut sample = SampleById::new(n, seed);
    for (i, id) in ids.iter().enumerate() {
        sample.push(*id, i);
    }
    sample.finish()
}

/// [`sample_by_id`] as the ids arrive, holding only the `n` chosen so far (the `n` smallest
/// (hash, id, position) keys, in a max-heap).
pub struct SampleById {
    n: usize,
    seed: u64,
    heap: std::collections::BinaryHeap<(u64, i64, usize)>,
}

impl SampleById {
    pub fn new(n: usize, seed: u64) -> Self {
        Self {
            n,
            seed,
            heap: std::collections::BinaryHeap::with_capacity(n.min(1 << 20) + 1),
        }
    }

    /// Offers the id at `position`.
    pub fn push(&mut self, id: i64, position: usize) {
        // splitmix64 of the id and the seed.
        let mut z = (id as u64) ^ self.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        let key = (z ^ (z >> 31), id, position);
        if self.heap.len() < self.n {
            self.heap.push(key);
        } else if self.heap.peek().is_some_and(|top| key < *top) {
            self.heap.pop();
            self.heap.push(key);
        }
    }

    /// The chosen positions, in the order of their ids.
    pub fn finish(self) -> Vec<usize> {
        let mut keyed = self.heap.into_vec();
        keyed.sort_unstable_by_key(|(_, id, i)| (*id, *i));
        keyed.into_iter().map(|(_, _, i)| i).collect()
    }
}

/// Points in d dimensions, row-major in one flat vector (no allocation per point).
#[derive(Debug, Clone, PartialEq)]
pub struct Points {
    pub data: Vec<f64>,
    pub dims: usize,
}

impl Points {
    pub fn new(data: Vec<f64>, dims: usize) -> Self {
        Self { data, dims }
    }

    pub fn len(&self) -> usize {
        self.data.len().checked_div(self.dims).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn row(&self, i: usize) -> &[f64] {
        &self.data[i * self.dims..(i + 1) * self.dims]
    }

    pub fn rows(&self) -> impl Iterator<Item = &[f64]> {
        self.data.chunks_exact(self.dims.max(1))
    }

    /// The rows at `idx`, in that order.
    pub fn select(&self, idx: &[usize]) -> Points {
        let mut data = Vec::with_capacity(idx.len() * self.dims);
        for i in idx {
            data.extend_from_slice(self.row(*i));
        }
        Points::new(data, self.dims)
    }
}

/// Clustering of standardised points.
#[derive(Debug, Clone)]
pub struct Clustering {
    pub assignment: Vec<usize>,
    pub centroids: Vec<Vec<f64>>,
    pub inertia: f64,
}

fn dist2(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// k-means++ then Lloyd iterations; best of `starts` by inertia. Deterministic for a seed.
pub fn kmeans(points: &Points, k: usize, seed: u64, starts: usize) -> Clustering {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut best: Option<Clustering> = None;
    for _ in 0..starts.max(1) {
        let c = lloyd(points, plus_plus(points, k, &mut rng));
        if best.as_ref().is_none_or(|b| c.inertia < b.inertia) {
            best = Some(c);
        }
    }
    best.unwrap_or(Clustering {
        assignment: vec![0; points.len()],
        centroids: vec![],
        inertia: 0.0,
    })
}

fn plus_plus(points: &Points, k: usize, rng: &mut StdRng) -> Vec<Vec<f64>> {
    let n = points.len();
    let mut centroids = vec![points.row(rng.random_range(0..n)).to_vec()];
    let mut d: Vec<f64> = points.rows().map(|p| dist2(p, &centroids[0])).collect();
    while centroids.len() < k {
        let total: f64 = d.iter().sum();
        let next = if total <= 0.0 {
            rng.random_range(0..n)
        } else {
            let mut u = rng.random::<f64>() * total;
            let mut pick = n - 1;
            for (i, di) in d.iter().enumerate() {
                u -= di;
                if u <= 0.0 {
                    pick = i;
                    break;
                }
            }
            pick
        };
        centroids.push(points.row(next).to_vec());
        let c = &centroids[centroids.len() - 1];
        for (di, p) in d.iter_mut().zip(points.rows()) {
            *di = di.min(dist2(p, c));
        }
    }
    centroids
}

fn nearest(p: &[f64], centroids: &[Vec<f64>]) -> (usize, f64) {
    let mut best = (0, f64::INFINITY);
    for (j, c) in centroids.iter().enumerate() {
        let d = dist2(p, c);
        if d < best.1 {
            best = (j, d);
        }
    }
    best
}

/// Lloyd iterations from `centroids` on one thread (the sample's fits).
pub fn lloyd(points: &Points, centroids: Vec<Vec<f64>>) -> Clustering {
    lloyd_threads(points, centroids, 1)
}

/// Points a thread takes at least in [`lloyd_threads`]: below it a thread costs more to start
/// than it saves (an iteration spawns them anew).
pub const POINTS_PER_THREAD: usize = 1 << 16;

/// One thread's share of a Lloyd iteration: its points' sums per cluster (`k × dims`, exact,
/// so the threads' shares add up to the same bits as one pass), counts, and changes.
struct Share {
    sums: Vec<ExactSum>,
    counts: Vec<usize>,
    changed: usize,
    inertia: f64,
}

/// Assigns each point of `data` (rows of `dims`) to its nearest centroid, in `assignment`.
fn assign(data: &[f64], dims: usize, assignment: &mut [usize], centroids: &[Vec<f64>]) -> Share {
    let k = centroids.len();
    let mut share = Share {
        sums: vec![ExactSum::ZERO; k * dims],
        counts: vec![0; k],
        changed: 0,
        inertia: 0.0,
    };
    for (a, p) in assignment.iter_mut().zip(data.chunks_exact(dims.max(1))) {
        let (j, d) = nearest(p, centroids);
        share.inertia += d;
        if *a != j {
            *a = j;
            share.changed += 1;
        }
        share.counts[j] += 1;
        for (s, v) in share.sums[j * dims..(j + 1) * dims].iter_mut().zip(p) {
            s.add(*v);
        }
    }
    share
}

/// Lloyd iterations from `centroids` with the points split over up to `threads` threads (at
/// least [`POINTS_PER_THREAD`] points each). The assignment and centroids do not depend on the
/// number of threads: each point's nearest centroid is its own, the sums are exact.
pub fn lloyd_threads(points: &Points, mut centroids: Vec<Vec<f64>>, threads: usize) -> Clustering {
    let (dims, n) = (points.dims, points.len());
    let threads = threads.min(n / POINTS_PER_THREAD).max(1);
    let per = n.div_ceil(threads).max(1);
    let mut assignment = vec![usize::MAX; n];
    let mut inertia = 0.0;
    for _ in 0..100 {
        let shares: Vec<Share> = if threads == 1 {
            vec![assign(&points.data, dims, &mut assignment, &centroids)]
        } else {
            let centroids = &centroids;
            std::thread::scope(|scope| {
                let handles: Vec<_> = points
                    .data
                    .chunks(per * dims.max(1))
                    .zip(assignment.chunks_mut(per))
                    .map(|(data, a)| scope.spawn(move || assign(data, dims, a, centroids)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                    .collect()
            })
        };
        let k = centroids.len();
        let mut sums = vec![ExactSum::ZERO; k * dims];
        let mut counts = vec![0usize; k];
        let mut changed = 0usize;
        inertia = 0.0;
        for share in shares {
            for (s, t) in sums.iter_mut().zip(share.sums) {
                s.merge(t);
            }
            for (c, t) in counts.iter_mut().zip(share.counts) {
                *c += t;
            }
            changed += share.changed;
            inertia += share.inertia;
        }
        for (j, c) in centroids.iter_mut().enumerate() {
            if counts[j] > 0 {
                for (cv, s) in c.iter_mut().zip(&sums[j * dims..(j + 1) * dims]) {
                    *cv = s.value() / counts[j] as f64;
                }
            }
        }
        // Converged: no point (or, on large data, fewer than 1 in 10,000) changed cluster.
        if changed <= n / 10_000 {
            break;
        }
    }
    Clustering {
        assignment,
        centroids,
        inertia,
    }
}

/// Mean silhouette of a clustering (O(n²): used on samples).
pub fn silhouette(points: &Points, assignment: &[usize], k: usize) -> f64 {
    let n = points.len();
    if n < 2 || k < 2 {
        return 0.0;
    }
    let mut total = 0.0;
    let mut sum = vec![0.0; k];
    let mut cnt = vec![0usize; k];
    for i in 0..n {
        sum.fill(0.0);
        cnt.fill(0);
        let pi = points.row(i);
        for (j, pj) in points.rows().enumerate() {
            if i != j {
                sum[assignment[j]] += dist2(pi, pj).sqrt();
                cnt[assignment[j]] += 1;
            }
        }
        let own = assignment[i];
        if cnt[own] == 0 {
            continue; // a singleton scores 0
        }
        let a = sum[own] / cnt[own] as f64;
        let b = (0..k)
            .filter(|c| *c != own && cnt[*c] > 0)
            .map(|c| sum[c] / cnt[c] as f64)
            .fold(f64::INFINITY, f64::min);
        if b.is_finite() {
            total += (b - a) / a.max(b).max(f64::MIN_POSITIVE);
        }
    }
    total / n as f64
}

/// Log-transforms (ln(1 + x)) and standardises (z-score per feature) the raw feature values,
/// in place.
pub fn prepare(raw: Points) -> Points {
    let (n, dims) = (raw.len().max(1) as f64, raw.dims);
    let mut data = raw.data;
    for v in &mut data {
        *v = v.ln_1p();
    }
    let mut sums = vec![ExactSum::default(); dims];
    for r in data.chunks_exact(dims) {
        for (m, v) in sums.iter_mut().zip(r) {
            m.add(*v);
        }
    }
    let mean: Vec<f64> = sums.iter().map(|s| s.value() / n).collect();
    let mut squares = vec![ExactSum::default(); dims];
    for r in data.chunks_exact(dims) {
        for ((s, v), m) in squares.iter_mut().zip(r).zip(&mean) {
            s.add((v - m) * (v - m));
        }
    }
    let sd: Vec<f64> = squares
        .iter()
        .map(|s| s.value() / n)
        .map(|v| if v > 0.0 { v.sqrt() } else { 1.0 })
        .collect();
    for r in data.chunks_exact_mut(dims) {
        for ((v, m), s) in r.iter_mut().zip(&mean).zip(&sd) {
            *v = (*v - m) / s;
        }
    }
    Points::new(data, dims)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three well-separated blobs in 2-D.
    fn blobs(seed: u64) -> (Points, Vec<usize>) {
        let mut rng = StdRng::seed_from_u64(seed);
        let centres = [(0.0, 0.0), (10.0, 10.0), (-10.0, 10.0)];
        let mut pts = Vec::new();
        let mut truth = Vec::new();
        for i in 0..300 {
            let c = i % 3;
            pts.push(centres[c].0 + rng.random::<f64>() - 0.5);
            pts.push(centres[c].1 + rng.random::<f64>() - 0.5);
            truth.push(c);
        }
        (Points::new(pts, 2), truth)
    }

    #[test]
    fn separable_blobs_are_recovered_exactly_and_k_is_found() {
        let (pts, truth) = blobs(1);
        let c = kmeans(&pts, 3, 7, 3);
        // Same partition up to renaming.
        for i in 0..pts.len() {
            for j in 0..pts.len() {
                assert_eq!(truth[i] == truth[j], c.assignment[i] == c.assignment[j]);
            }
        }
        let best = (2..=6).max_by(|a, b| {
            let sa = silhouette(&pts, &kmeans(&pts, *a, 7, 3).assignment, *a);
            let sb = silhouette(&pts, &kmeans(&pts, *b, 7, 3).assignment, *b);
            sa.partial_cmp(&sb).unwrap()
        });
        assert_eq!(best, Some(3));
    }

    /// The sample and the clustering are the same whatever the order of the rows.
    #[test]
    fn row_order_does_not_change_the_sample_or_the_clusters() {
        use rand::seq::SliceRandom;
        let ids: Vec<i64> = (0..5000).map(|i| i * 13 + 7).collect();
        let chosen: Vec<i64> = sample_by_id(&ids, 300, 9).iter().map(|i| ids[*i]).collect();
        assert_eq!(chosen.len(), 300);
        assert!(chosen.windows(2).all(|w| w[0] < w[1]));
        let mut rng = StdRng::seed_from_u64(4);
        let mut shuffled = ids.clone();
        shuffled.shuffle(&mut rng);
        let again: Vec<i64> = sample_by_id(&shuffled, 300, 9)
            .iter()
            .map(|i| shuffled[*i])
            .collect();
        assert_eq!(chosen, again);
        // prepare + lloyd on shuffled points: the same centroids to the bit.
        let (blobs, _) = blobs(3);
        // Features are ≥ 0 (they are log-transformed).
        let pts = Points::new(blobs.data.iter().map(|v| v + 20.0).collect(), 2);
        let mut order: Vec<usize> = (0..pts.len()).collect();
        order.shuffle(&mut rng);
        let (a, b) = (prepare(pts.clone()), prepare(pts.select(&order)));
        let seeds = kmeans(&a, 3, 1, 1).centroids;
        let (ca, cb) = (lloyd(&a, seeds.clone()), lloyd(&b, seeds));
        assert!(ca.centroids.iter().flatten().all(|v| v.is_finite()));
        assert_eq!(ca.centroids, cb.centroids);
    }

    /// Split over threads, Lloyd gives the same assignment and centroids to the bit as on one.
    #[test]
    fn threads_do_not_change_the_clusters() {
        let mut rng = StdRng::seed_from_u64(5);
        let n = 4 * POINTS_PER_THREAD + 123;
        let raw: Vec<f64> = (0..n * 3)
            .map(|i| rng.random::<f64>() * 100.0 * (1 + i % 3) as f64)
            .collect();
        let pts = prepare(Points::new(raw, 3));
        let seeds = kmeans(&pts.select(&(0..2000).collect::<Vec<_>>()), 5, 3, 1).centroids;
        let one = lloyd_threads(&pts, seeds.clone(), 1);
        for threads in [2, 3, 4] {
            let many = lloyd_threads(&pts, seeds.clone(), threads);
            assert_eq!(one.assignment, many.assignment, "{threads} threads");
            assert_eq!(one.centroids, many.centroids, "{threads} threads");
        }
        assert!(one.assignment.iter().all(|a| *a < 5));
    }

    #[test]
    fn same_seed_same_clusters() {
        let (pts, _) = blobs(2);
        let a = kmeans(&pts, 4, 11, 3);
        let b = kmeans(&pts, 4, 11, 3);
        assert_eq!(a.assignment, b.assignment);
    }
}
