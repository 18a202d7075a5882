//! Pareto/NBD (Schmittlein, Morrison & Colombo 1987), in the form of Fader & Hardie's notes
//! ("A Note on Deriving the Pareto/NBD Model and Related Expressions", 2005): purchases at rate
//! λ ~ Gamma(r, α) while alive, lifetime exponential with rate μ ~ Gamma(s, β); a customer can
//! die at any time, so a one-time buyer's P(alive) falls with the time since the purchase.
//!
//! The likelihood of (x, t_x, T) is
//!   Γ(r+x) α^r β^s / Γ(r) · [ (α+T)^−(r+x) (β+T)^−s + s/(r+s+x) · (F(t_x) − F(T)) ],
//!   F(t) = 2F1(r+s+x, b₂; r+s+x+1; z(t)) / (M+t)^(r+s+x),  z(t) = |α−β| / (M+t),
//! with M = max(α, β) and b₂ = s+1 when α ≥ β, else r+x. Where other implementations overflow
//! or return NaN:
//! - everything is summed in logs (the powers underflow for x in the hundreds);
//! - F(t_x) − F(T) is taken as F(t_x) · (1 − e^(ln F(T) − ln F(t_x))) with `exp_m1`, exact
//!   when t_x is close to T;
//! - the hypergeometric series is used after Euler's transformation,
//!   2F1(a, b₂; a+1; z) = (1−z)^(1−b₂) Σₙ (a+1−b₂)ₙ/(a+1)ₙ zⁿ: every term is positive (no
//!   cancellation), the ratio of terms is below z (geometric convergence, with a bound on the
//!   rest), and no power of (1−z)^−a builds up.
//!
//! The log-likelihood is written on [`Dual`] numbers, so its gradient is exact. F depends on a
//! customer only through (x, t), so it is computed once per distinct (x, t_x) and (x, T), not
//! per customer: a few tens of thousands of series per iteration on millions of customers.

use std::collections::HashMap;

use super::bgnbd::{FitError, History};
use super::dual::Dual;
use super::special::SeriesError;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    pub r: f64,
    pub alpha: f64,
    pub s: f64,
    pub beta: f64,
}

pub type Fit = super::Fit<Params>;

/// Terms of the series summed at most (z = 0.9999 needs about 400,000 for full precision).
const MAX_TERMS: usize = 1_000_000;

/// The parameters as dual numbers (derivatives with respect to r, α, s, β in that order).
#[derive(Clone, Copy)]
struct DualParams {
    r: Dual,
    alpha: Dual,
    s: Dual,
    beta: Dual,
}

impl DualParams {
    fn of(p: &Params) -> Self {
        Self {
            r: Dual::var(p.r, 0),
            alpha: Dual::var(p.alpha, 1),
            s: Dual::var(p.s, 2),
            beta: Dual::var(p.beta, 3),
        }
    }
}

/// ln F(t) for repeat purchases `x` (see the module notes).
fn ln_f(p: &DualParams, x: f64, t: f64) -> Result<Dual, SeriesError> {
    let a = p.r + p.s + x;
    let (m, d, b2) = if p.alpha.v >= p.beta.v {
        (p.alpha, p.alpha - p.beta, p.s + 1.0)
    } else {
        (p.beta, p.beta - p.alpha, p.r + x)
    };
    let mt = m + t;
    let z = d / mt;
    let e = a + 1.0 - b2;
    let g = a + 1.0;
    let err = |why| SeriesError {
        a: a.v,
        b: b2.v,
        c: g.v,
        z: z.v,
        why,
    };
    let mut sum = Dual::c(1.0);
    if z.v > 0.0 {
        if z.v >= 1.0 || !z.v.is_finite() {
            return Err(err("is outside its domain z < 1"));
        }
        let mut term = Dual::c(1.0);
        let rest = z.v / (1.0 - z.v);
        let mut n = 0usize;
        loop {
            let k = n as f64;
            term = term * (e + k) / (g + k) * z;
            sum = sum + term;
            n += 1;
            // Every later term is below the last times z: the rest is below term · z/(1−z).
            if term.v * rest <= 1e-17 * sum.v {
                break;
            }
            if n > MAX_TERMS {
                return Err(err("does not converge (z too close to 1)"));
            }
        }
    }
    let one_minus_z = (-z + 1.0).ln();
    Ok((-b2 + 1.0) * one_minus_z + sum.ln() - a * mt.ln())
}

/// The per-customer log-likelihood from its parts: `base` = ln Γ(r+x) − ln Γ(r) + r ln α +
/// s ln β, `alive` = −(r+x) ln(α+T) − s ln(β+T), and ln F at t_x and T.
fn combine(p: &DualParams, x: f64, same_time: bool, alive: Dual, lf_tx: Dual, lf_t: Dual) -> Dual {
    // Died between t_x and T: s/(r+s+x) · (F(t_x) − F(T)); nothing when t_x = T.
    if same_time || lf_t.v >= lf_tx.v {
        return alive;
    }
    let died = p.s.ln() - (p.r + p.s + x).ln() + lf_tx + (lf_t - lf_tx).ln_one_minus_exp();
    alive.log_add_exp(died)
}

fn base(p: &DualParams, x: f64) -> Dual {
    (p.r + x).ln_gamma() - p.r.ln_gamma() + p.r * p.alpha.ln() + p.s * p.beta.ln()
}

fn alive_term(p: &DualParams, x: f64, t: f64) -> Dual {
    -((p.r + x) * (p.alpha + t).ln()) - p.s * (p.beta + t).ln()
}

/// Log-likelihood of one history and its gradient with respect to (r, α, s, β).
pub fn ll_one(p: &Params, h: &History) -> Result<(f64, [f64; 4]), SeriesError> {
    let d = DualParams::of(p);
    let lf_tx = ln_f(&d, h.x, h.t_x)?;
    let lf_t = ln_f(&d, h.x, h.t)?;
    let l = base(&d, h.x) + combine(&d, h.x, h.t_x == h.t, alive_term(&d, h.x, h.t), lf_tx, lf_t);
    Ok((l.v, l.d))
}

/// The distinct (x, t) points of weighted histories, and per history the indexes of its
/// (x, t_x) and (x, T) points: F is computed once per point.
pub struct Points {
    points: Vec<(f64, f64)>,
    of: Vec<(u32, u32)>,
}

impl Points {
    pub fn of(data: &[(History, f64)]) -> Self {
        let mut index: HashMap<(u64, u64), u32> = HashMap::new();
        let mut points = Vec::new();
        let mut id = |x: f64, t: f64| {
            *index.entry((x.to_bits(), t.to_bits())).or_insert_with(|| {
                points.push((x, t));
                (points.len() - 1) as u32
            })
        };
        let of = data
            .iter()
            .map(|(h, _)| (id(h.x, h.t_x), id(h.x, h.t)))
            .collect();
        Self { points, of }
    }
}

/// Total log-likelihood of weighted histories and its gradient; `points` from [`Points::of`]
/// on the same data.
pub fn log_likelihood(
    p: &Params,
    data: &[(History, f64)],
    points: &Points,
) -> Result<(f64, [f64; 4]), SeriesError> {
    let d = DualParams::of(p);
    let per_point = super::par_map(&points.points, |(x, t)| {
        Ok::<_, SeriesError>((ln_f(&d, *x, *t)?, alive_term(&d, *x, *t)))
    })
    .ok_or(SeriesError {
        a: f64::NAN,
        b: f64::NAN,
        c: f64::NAN,
        z: f64::NAN,
        why: "failed: a thread panicked",
    })?
    .into_iter()
    .collect::<Result<Vec<(Dual, Dual)>, SeriesError>>()?;
    let indexed: Vec<(usize, f64)> = (0..data.len()).map(|i| (i, data[i].1)).collect();
    let (ll, g) = super::par_sum(&indexed, |chunk| {
        let mut total = Dual::c(0.0);
        let mut last_x = f64::NAN;
        let mut b = Dual::c(0.0);
        for (i, w) in chunk {
            let (h, _) = &data[*i];
            if h.x != last_x {
                b = base(&d, h.x);
                last_x = h.x;
            }
            let (itx, it) = points.of[*i];
            let (lf_tx, _) = per_point[itx as usize];
            let (lf_t, alive) = per_point[it as usize];
            let l = b + combine(&d, h.x, h.t_x == h.t, alive, lf_tx, lf_t);
            total = total + l.scale(*w);
        }
        (total.v, total.d)
    });
    Ok((ll, g))
}

/// Fits the model by maximum likelihood (L-BFGS on log-parameters), starting from `start`
/// when given.
pub fn fit_from(data: &[(History, f64)], start: Option<&Params>) -> Result<Fit, FitError> {
    let n = super::bgnbd::check_histories(data)?;
    let points = Points::of(data);
    let mean_t = data.iter().map(|(h, w)| h.t * w).sum::<f64>() / n;
    let fit = super::bgnbd::fit_positive(
        n,
        start.map(|p| [p.r, p.alpha, p.s, p.beta]),
        [1.0, mean_t.max(1e-3), 1.0, mean_t.max(1e-3)],
        ["r", "alpha", "s", "beta"],
        // A series that does not converge (too far out): the line search steps back.
        |[r, alpha, s, beta]| log_likelihood(&Params { r, alpha, s, beta }, data, &points).ok(),
    )?;
    let [r, alpha, s, beta] = fit.params;
    Ok(Fit {
        params: Params { r, alpha, s, beta },
        log_likelihood: fit.log_likelihood,
        iterations: fit.iterations,
        customers: fit.customers,
    })
}

pub fn fit(data: &[(History, f64)]) -> Result<Fit, FitError> {
    fit_from(data, None)
}

/// P(alive | x, t_x, T) = 1 / (1 + s/(r+s+x) (α+T)^(r+x) (β+T)^s (F(t_x) − F(T))).
pub fn p_alive(p: &Params, h: &History) -> Result<f64, SeriesError> {
    let d = DualParams::of(p);
    let alive = alive_term(&d, h.x, h.t);
    let all = combine(
        &d,
        h.x,
        h.t_x == h.t,
        alive,
        ln_f(&d, h.x, h.t_x)?,
        ln_f(&d, h.x, h.t)?,
    );
    Ok((alive.v - all.v).exp())
}

/// E[Y(t) | x, t_x, T] for several horizons `ts`, written to `out`:
/// (r+x)(β+T) / ((α+T)(s−1)) · (1 − ((β+T)/(β+T+t))^(s−1)) · P(alive), whose s = 1 limit is
/// (r+x)(β+T)/(α+T) · ln((β+T+t)/(β+T)); written as one expression that is exact at and near it.
pub fn expected_purchases_many(
    p: &Params,
    h: &History,
    ts: &[f64],
    out: &mut [f64],
) -> Result<(), SeriesError> {
    predict_many(p, h, ts, out).map(|_| ())
}

/// [`expected_purchases_many`], returning P(alive) too: both come from the same two series,
/// which are summed once.
pub fn predict_many(
    p: &Params,
    h: &History,
    ts: &[f64],
    out: &mut [f64],
) -> Result<f64, SeriesError> {
    let alive = p_alive(p, h)?;
    let k = p.s - 1.0;
    let lead = (p.r + h.x) * (p.beta + h.t) / (p.alpha + h.t);
    for (o, t) in out.iter_mut().zip(ts) {
        let l = (t / (p.beta + h.t)).ln_1p();
        // (1 − e^(−k l)) / k, and its limit l at k = 0.
        let g = if (k * l).abs() < 1e-8 {
            l * (1.0 - 0.5 * k * l)
        } else {
            -(-k * l).exp_m1() / k
        };
        *o = lead * g * alive;
    }
    Ok(alive)
}

pub fn expected_purchases(p: &Params, h: &History, t: f64) -> Result<f64, SeriesError> {
    let mut out = [0.0];
    expected_purchases_many(p, h, &[t], &mut out)?;
    Ok(out[0])
}

#[cfg(test)]
mod tests;
