//! Customer lifetime value models: BG/NBD purchases and P(alive) ([`bgnbd`]), Gamma-Gamma
//! spend ([`gamma_gamma`]), on the special functions and optimiser they share.

pub mod bgnbd;
pub mod gamma_gamma;
pub mod optimize;
pub mod rules;
pub mod special;
pub mod step;

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
