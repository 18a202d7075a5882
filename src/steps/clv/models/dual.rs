//! Forward-mode automatic differentiation in four variables: a value with its gradient. The
//! models whose likelihood has no gradient in closed form worth writing out (Pareto/NBD, whose
//! terms are hypergeometric series in all four parameters) are written once on [`Dual`] and
//! give value and exact gradient together, instead of finite differences (four or eight more
//! evaluations per step, and only approximate).

use std::ops::{Add, Div, Mul, Neg, Sub};

use super::special::{digamma, ln_gamma};

/// A value and its partial derivatives with respect to the four parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dual {
    pub v: f64,
    pub d: [f64; 4],
}

impl Dual {
    /// A constant (no derivative).
    pub const fn c(v: f64) -> Self {
        Self { v, d: [0.0; 4] }
    }

    /// Parameter number `i` with value `v`.
    pub fn var(v: f64, i: usize) -> Self {
        let mut d = [0.0; 4];
        d[i] = 1.0;
        Self { v, d }
    }

    /// The value f(v) with derivative `df` = f'(v): the chain rule.
    fn chain(self, v: f64, df: f64) -> Self {
        Self {
            v,
            d: self.d.map(|x| x * df),
        }
    }

    pub fn ln(self) -> Self {
        self.chain(self.v.ln(), 1.0 / self.v)
    }

    pub fn exp(self) -> Self {
        let e = self.v.exp();
        self.chain(e, e)
    }

    pub fn ln_gamma(self) -> Self {
        self.chain(ln_gamma(self.v), digamma(self.v))
    }

    /// ln(1 − e^self) for self < 0, accurate when self is near 0.
    pub fn ln_one_minus_exp(self) -> Self {
        let m = self.v.exp_m1();
        self.chain((-m).ln(), self.v.exp() / m)
    }

    /// ln(e^self + e^other), without overflow.
    pub fn log_add_exp(self, other: Self) -> Self {
        if other.v == f64::NEG_INFINITY {
            return self;
        }
        if self.v == f64::NEG_INFINITY {
            return other;
        }
        let m = self.v.max(other.v);
        let (ea, eb) = ((self.v - m).exp(), (other.v - m).exp());
        let (wa, wb) = (ea / (ea + eb), eb / (ea + eb));
        let mut d = [0.0; 4];
        for (i, di) in d.iter_mut().enumerate() {
            *di = wa * self.d[i] + wb * other.d[i];
        }
        Self {
            v: m + (ea + eb).ln(),
            d,
        }
    }

    pub fn scale(self, k: f64) -> Self {
        Self {
            v: self.v * k,
            d: self.d.map(|x| x * k),
        }
    }
}

impl Add for Dual {
    type Output = Self;
    fn add(self, o: Self) -> Self {
        let mut d = self.d;
        for (a, b) in d.iter_mut().zip(o.d) {
            *a += b;
        }
        Self { v: self.v + o.v, d }
    }
}

impl Add<f64> for Dual {
    type Output = Self;
    fn add(self, o: f64) -> Self {
        Self {
            v: self.v + o,
            d: self.d,
        }
    }
}

impl Sub for Dual {
    type Output = Self;
    fn sub(self, o: Self) -> Self {
        self + (-o)
    }
}

impl Sub<f64> for Dual {
    type Output = Self;
    fn sub(self, o: f64) -> Self {
        self + (-o)
    }
}

impl Neg for Dual {
    type Output = Self;
    fn neg(self) -> Self {
        self.scale(-1.0)
    }
}

impl Mul for Dual {
    type Output = Self;
    fn mul(self, o: Self) -> Self {
        let mut d = [0.0; 4];
        for (i, di) in d.iter_mut().enumerate() {
            *di = self.d[i] * o.v + self.v * o.d[i];
        }
        Self { v: self.v * o.v, d }
    }
}

impl Mul<f64> for Dual {
    type Output = Self;
    fn mul(self, o: f64) -> Self {
        self.scale(o)
    }
}

impl Div for Dual {
    type Output = Self;
    fn div(self, o: Self) -> Self {
        let q = self.v / o.v;
        let mut d = [0.0; 4];
        for (i, di) in d.iter_mut().enumerate() {
            *di = (self.d[i] - q * o.d[i]) / o.v;
        }
        Self { v: q, d }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each operation's derivative against a central difference of its value.
    #[test]
    fn derivatives_match_finite_differences() {
        let f = |x: [f64; 4]| -> Dual {
            let [a, b, c, e] = [0, 1, 2, 3].map(|i| Dual::var(x[i], i));
            let u = (a * b + c).ln() - (e / a).exp() + (b + 2.0).ln_gamma();
            let w = (-(c * e)).ln_one_minus_exp();
            u.log_add_exp(w * 3.0) / (e - 0.5)
        };
        let x = [0.7, 1.3, 0.4, 2.2];
        let got = f(x);
        for i in 0..4 {
            let h = 1e-6;
            let (mut up, mut down) = (x, x);
            up[i] += h;
            down[i] -= h;
            let fd = (f(up).v - f(down).v) / (2.0 * h);
            assert!(
                (got.d[i] - fd).abs() < 1e-7 * fd.abs().max(1.0),
                "d{i}: {} vs {fd}",
                got.d[i]
            );
        }
    }
}
