//! Sums that do not depend on the order of their terms. The rows of a step's input come in an
//! order that changes from run to run (DataFusion's partitions); every sum clvflow's own steps
//! compute from them uses [`ExactSum`], so the same customers give the same bits.

/// A sum of floats that does not depend on the order of its terms: each term is taken as a
/// fixed-point number of 2^-40 units (truncated: the same value always gives the same integer,
/// ~1e-12 apart from the float) and the integers are added exactly. A float sum in the order
/// rows happen to arrive could round a value such as 52.755 either way; this one gives the same
/// bits every run.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExactSum(i128);

impl ExactSum {
    /// The empty sum.
    pub const ZERO: ExactSum = ExactSum(0);
    const SCALE: f64 = (1u64 << 40) as f64;
    /// Scaled terms below this convert to i64 in one instruction (`f64 as i128` is a software
    /// routine, several times slower: it showed in every per-row sum).
    const FAST: f64 = (1u64 << 62) as f64;

    pub fn add(&mut self, v: f64) {
        let x = v * Self::SCALE;
        let term = if x.abs() < Self::FAST {
            i128::from(x as i64)
        } else {
            // Beyond 2^22 per term (a multi-million order), and saturating at ±2^127.
            x as i128
        };
        self.0 = self.0.saturating_add(term);
    }

    /// Adds the terms of `other` (a sum over other rows: how per-thread sums are combined, with
    /// the same result as one sum over all the rows).
    pub fn merge(&mut self, other: ExactSum) {
        self.0 = self.0.saturating_add(other.0);
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
        assert!(s.value().abs() < 1e-11);
        // Large terms take the other path and still add up exactly on the same grid.
        let mut big = ExactSum::default();
        [5e9, 0.25, -5e9].iter().for_each(|v| big.add(*v));
        assert_eq!(big.value(), 0.25);
    }
}
