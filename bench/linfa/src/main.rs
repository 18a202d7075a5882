// Times linfa-clustering's KMeans on data shaped like clvflow's K-means step input: 3.3M customers,
// 3 features (log1p + z-score of recency, frequency, monetary drawn like the generator's).
use linfa::prelude::*;
use linfa_clustering::KMeans;
use ndarray::Array2;
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256Plus;
use std::time::Instant;

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(3_300_000);
    let mut rng = Xoshiro256Plus::seed_from_u64(7);
    let mut x = Array2::<f64>::zeros((n, 3));
    for i in 0..n {
        let g = rng.gen_range(0..4) as f64;
        x[[i, 0]] = (1.0 + rng.gen_range(0.0..700.0) * (1.0 + g)).ln();
        x[[i, 1]] = (1.0 + (1.0 + rng.gen_range(0.0..3.0) * g).floor()).ln();
        x[[i, 2]] = (1.0 + rng.gen_range(5.0..200.0) * (1.0 + g)).ln();
    }
    for j in 0..3 {
        let col = x.column(j);
        let m = col.mean().unwrap();
        let s = col.std(0.0);
        x.column_mut(j).mapv_inplace(|v| (v - m) / s);
    }
    let ds = DatasetBase::from(x);
    for k in [4usize, 6, 8] {
        let t = Instant::now();
        let model = KMeans::params_with_rng(k, Xoshiro256Plus::seed_from_u64(7))
            .n_runs(1)
            .max_n_iterations(100)
            .tolerance(1e-4)
            .fit(&ds)
            .expect("fit");
        let fit = t.elapsed();
        let t = Instant::now();
        let labels = model.predict(&ds);
        println!("linfa KMeans k={k} n={n}: fit {:.2} s (n_runs 1, k-means++ init), predict {:.2} s, {} labels", fit.as_secs_f64(), t.elapsed().as_secs_f64(), labels.len());
    }
}
