//! Sums that do not depend on the order of their terms. The rows of a step's input come in an
//! order that changes from run to run (DataFusion's partitions); every sum clvflow's own steps
//! compute from them uses [`ExactSum`], so the same customers give the same bits.

/// A sum of floats that does not depend on the order of its terms: each term is taken exactly
/// as a fixed-point number of 2^-50 units (amounts up to 2^77 are exact to 2^-50, far below a
/// cent) and the integers are added. Rows reach the models in an order that changes from run
/// to run (DataFusion's partitions), and a float sum in that order could round a value such as
/// 52.755 either way; this one gives the same bits every run. (The likelihood sums of the CLV
/// models need none: they run over sorted, grouped data in fixed chunks.)
#[derive(Clone, Copy, Default)]
pub struct ExactSum(i128);

impl ExactSum {
    const SCALE: f64 = (1u64 << 50) as f64;

    pub fn add(&mut self, v: f64) {
        // Multiplying by a power of two is exact; the cast truncates (and saturates) the same
        // way for the same value.
        self.0 = self.0.saturating_add((v * Self::SCALE) as i128);
    }

    pub fn value(self) -> f64 {
        self.0 as f64 / Self::SCALE
    }
}

#[cfg(test)]
mod tests {
    use super::ExactSum;

    /// The same numbers in another order give the same bits; a plain float sum does not.
    #[test]
    fn sums_do_not_depend_on_the_order_of_the_terms() {
        use rand::seq::SliceRandom;
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut amounts: Vec<f64> = (0..10_000)
            .map(|_| (rng.random_range(1..100_000) as f64) / 100.0)
            .collect();
        let sum = |v: &[f64]| {
            let mut s = ExactSum::default();
            v.iter().for_each(|a| s.add(*a));
            s.value()
        };
        let once = sum(&amounts);
        let plain: f64 = amounts.iter().sum();
        let mut plain_differs = false;
        for _ in 0..20 {
            amounts.shuffle(&mut rng);
            assert_eq!(sum(&amounts).to_bits(), once.to_bits());
            plain_differs |= amounts.iter().sum::<f64>().to_bits() != plain.to_bits();
        }
        assert!(
            plain_differs,
            "the plain float sum should depend on the order"
        );
        assert!((once - plain).abs() < 1e-6, "{once} vs {plain}");
        // Negative terms, and a sum that cancels.
        let mut s = ExactSum::default();
        [0.1, -0.3, 0.2].iter().for_each(|v| s.add(*v));
        assert!(s.value().abs() < 1e-15);
    }
}
