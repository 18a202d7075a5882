//! BG/NBD (Fader, Hardie & Lee 2005, "Counting Your Customers the Easy Way"): the number of
//! future purchases and the probability a customer is still alive.
//!
//! Per customer: x = repeat purchases, t_x = time of the last purchase, T = age, all measured
//! from the first purchase in one time unit (clvflow uses weeks). Parameters r, α (purchase rate
//! ~ Gamma(r, α)) and a, b (drop-out probability ~ Beta(a, b)) are fitted by maximum likelihood
//! with analytic gradients, by L-BFGS on log-parameters. Identical (x, t_x, T) rows are merged
//! with weights, so the fit costs O(distinct histories), not O(customers).

use super::optimize::{Minimum, lbfgs};
use super::special::{SeriesError, digamma, hyp2f1_many, ln_gamma};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    pub r: f64,
    pub alpha: f64,
    pub a: f64,
    pub b: f64,
}

/// One customer's history.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct History {
    pub x: f64,
    pub t_x: f64,
    pub t: f64,
}

/// A fitted BG/NBD model and how the fit went.
pub type Fit = super::Fit<Params>;

/// Why a fit is refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FitError {
    #[error("no customers to fit")]
    Empty,
    #[error(
        "no customer made a repeat purchase: the model cannot be fitted (it needs repeat purchases to learn purchase rates and drop-out)"
    )]
    NoRepeats,
    #[error("invalid history: {0}")]
    Invalid(String),
    #[error("the data do not identify the model: {0}")]
    NotIdentified(String),
}

/// Log-likelihood of one history and its gradient with respect to (r, α, a, b).
pub fn ll_one(p: &Params, h: &History) -> (f64, [f64; 4]) {
    let Params { r, alpha, a, b } = *p;
    let History { x, t_x, t } = *h;
    let a1 = ln_gamma(r + x) - ln_gamma(r) + r * alpha.ln();
    let a2 = ln_gamma(a + b) + ln_gamma(b + x) - ln_gamma(b) - ln_gamma(a + b + x);
    let a3 = -(r + x) * (alpha + t).ln();
    let mut grad = [
        digamma(r + x) - digamma(r) + alpha.ln(),
        r / alpha,
        digamma(a + b) - digamma(a + b + x),
        digamma(a + b) + digamma(b + x) - digamma(b) - digamma(a + b + x),
    ];
    let d3 = [-(alpha + t).ln(), -(r + x) / (alpha + t), 0.0, 0.0];
    if x > 0.0 {
        let a4 = a.ln() - (b + x - 1.0).ln() - (r + x) * (alpha + t_x).ln();
        let d4 = [
            -(alpha + t_x).ln(),
            -(r + x) / (alpha + t_x),
            1.0 / a,
            -1.0 / (b + x - 1.0),
        ];
        let m = a3.max(a4);
        let (e3, e4) = ((a3 - m).exp(), (a4 - m).exp());
        let (w3, w4) = (e3 / (e3 + e4), e4 / (e3 + e4));
        for i in 0..4 {
            grad[i] += w3 * d3[i] + w4 * d4[i];
        }
        (a1 + a2 + m + (e3 + e4).ln(), grad)
    } else {
        for i in 0..4 {
            grad[i] += d3[i];
        }
        (a1 + a2 + a3, grad)
    }
}

/// The terms of the log-likelihood and gradient that depend on x only.
struct XTerms {
    x: f64,
    base: f64,
    grad: [f64; 4],
    ln_a_over_bx1: f64,
    inv_bx1: f64,
}

fn x_terms(p: &Params, x: f64) -> XTerms {
    let Params { r, alpha, a, b } = *p;
    XTerms {
        x,
        base: ln_gamma(r + x) - ln_gamma(r) + r * alpha.ln() + ln_gamma(a + b) + ln_gamma(b + x)
            - ln_gamma(b)
            - ln_gamma(a + b + x),
        grad: [
            digamma(r + x) - digamma(r) + alpha.ln(),
            r / alpha,
            digamma(a + b) - digamma(a + b + x),
            digamma(a + b) + digamma(b + x) - digamma(b) - digamma(a + b + x),
        ],
        ln_a_over_bx1: if x > 0.0 {
            a.ln() - (b + x - 1.0).ln()
        } else {
            0.0
        },
        inv_bx1: if x > 0.0 { 1.0 / (b + x - 1.0) } else { 0.0 },
    }
}

/// [`ll_one`] with the x-only terms given: the same value, a few logs and exps per history.
fn ll_fast(p: &Params, h: &History, xt: &XTerms) -> (f64, [f64; 4]) {
    let (r, alpha, a) = (p.r, p.alpha, p.a);
    let rx = r + h.x;
    let la_t = (alpha + h.t).ln();
    let a3 = -rx * la_t;
    let d3 = [-la_t, -rx / (alpha + h.t)];
    let mut grad = xt.grad;
    if h.x > 0.0 {
        let la_tx = (alpha + h.t_x).ln();
        let a4 = xt.ln_a_over_bx1 - rx * la_tx;
        let d4 = [-la_tx, -rx / (alpha + h.t_x), 1.0 / a, -xt.inv_bx1];
        let m = a3.max(a4);
        let (e3, e4) = ((a3 - m).exp(), (a4 - m).exp());
        let (w3, w4) = (e3 / (e3 + e4), e4 / (e3 + e4));
        grad[0] += w3 * d3[0] + w4 * d4[0];
        grad[1] += w3 * d3[1] + w4 * d4[1];
        grad[2] += w4 * d4[2];
        grad[3] += w4 * d4[3];
        (xt.base + m + (e3 + e4).ln(), grad)
    } else {
        grad[0] += d3[0];
        grad[1] += d3[1];
        (xt.base + a3, grad)
    }
}

/// Total log-likelihood of weighted histories and its gradient. The x-only terms are computed
/// once per run of equal x (data from [`compress`] are sorted by x), and the sum runs on
/// several threads for large data.
pub fn log_likelihood(p: &Params, data: &[(History, f64)]) -> (f64, [f64; 4]) {
    super::par_sum(data, |chunk| {
        let mut ll = 0.0;
        let mut g = [0.0; 4];
        let mut xt = x_terms(p, chunk.first().map_or(0.0, |(h, _)| h.x));
        for (h, w) in chunk {
            if h.x != xt.x {
                xt = x_terms(p, h.x);
            }
            let (l, gi) = ll_fast(p, h, &xt);
            ll += w * l;
            for i in 0..4 {
                g[i] += w * gi[i];
            }
        }
        (ll, g)
    })
}

/// Merges identical histories into (history, count), sorted by (x, t_x, T).
pub fn compress(histories: impl IntoIterator<Item = History>) -> Vec<(History, f64)> {
    let all: Vec<History> = histories.into_iter().collect();
    compress_indexed(&all).0
}

/// Like [`compress`], also giving for every input history the index of its merged row.
pub fn compress_indexed(histories: &[History]) -> (Vec<(History, f64)>, Vec<u32>) {
    let mut g = HistoryGrouper::with_capacity(histories.len() / 2);
    for h in histories {
        g.push(h);
    }
    g.finish()
}

/// [`compress_indexed`] as the histories arrive, without holding them all: the same result.
pub struct HistoryGrouper(super::Grouper<3>);

impl HistoryGrouper {
    /// Room for `groups` distinct histories before the map grows.
    pub fn with_capacity(groups: usize) -> Self {
        Self(super::Grouper::with_capacity(groups))
    }

    pub fn push(&mut self, h: &History) {
        self.0.push([h.x, h.t_x, h.t]);
    }

    /// The distinct histories with their counts, sorted, and every history's index among them.
    pub fn finish(self) -> (Vec<(History, f64)>, Vec<u32>) {
        let (distinct, index) = self.0.finish();
        let data = distinct
            .into_iter()
            .map(|([x, t_x, t], w)| (History { x, t_x, t }, w))
            .collect();
        (data, index)
    }
}

/// Fits the model by maximum likelihood.
pub fn fit(data: &[(History, f64)]) -> Result<Fit, FitError> {
    fit_from(data, None)
}

/// Fits the model by maximum likelihood, starting from `start` when given (a fit of similar
/// data, e.g. the full history for a calibration-period refit: fewer iterations to converge).
pub fn fit_from(data: &[(History, f64)], start: Option<&Params>) -> Result<Fit, FitError> {
    let fit = fit_r_alpha_a_b(
        data,
        start.map(|p| [p.r, p.alpha, p.a, p.b]),
        |[r, alpha, a, b]| log_likelihood(&Params { r, alpha, a, b }, data),
    )?;
    Ok(fit.map(|[r, alpha, a, b]| Params { r, alpha, a, b }))
}

/// The fit of the models with parameters (r, α, a, b) (BG/NBD, MBG/NBD): the histories checked,
/// the default start (1, mean T, 1, 1), and [`fit_positive`] on `ll`.
pub fn fit_r_alpha_a_b(
    data: &[(History, f64)],
    start: Option<[f64; 4]>,
    ll: impl Fn([f64; 4]) -> (f64, [f64; 4]),
) -> Result<super::Fit<[f64; 4]>, FitError> {
    let n = check_histories(data)?;
    let mean_t = data.iter().map(|(h, w)| h.t * w).sum::<f64>() / n;
    fit_positive(
        n,
        start,
        [1.0, mean_t.max(1e-3), 1.0, 1.0],
        ["r", "alpha", "a", "b"],
        |theta| Some(ll(theta)),
    )
}

/// Maximum likelihood over four positive parameters, shared by the transaction models: L-BFGS
/// on their logs (so they stay positive) of the mean negative log-likelihood. `ll` gives the
/// total log-likelihood of the `n` customers and its gradient in the natural parameters (`None`:
/// not computable there, and the line search steps back). Starts from `start` when it is
/// finite and positive, else from `default_start`.
pub fn fit_positive(
    n: f64,
    start: Option<[f64; 4]>,
    default_start: [f64; 4],
    names: [&str; 4],
    ll: impl Fn([f64; 4]) -> Option<(f64, [f64; 4])>,
) -> Result<super::Fit<[f64; 4]>, FitError> {
    let objective = |phi: &[f64]| {
        let theta = [phi[0].exp(), phi[1].exp(), phi[2].exp(), phi[3].exp()];
        match ll(theta) {
            Some((l, g)) => {
                let grad: Vec<f64> = (0..4).map(|i| -g[i] * theta[i] / n).collect();
                (-l / n, grad)
            }
            None => (f64::INFINITY, vec![0.0; 4]),
        }
    };
    let x0 = start
        .filter(|v| v.iter().all(|x| x.is_finite() && *x > 0.0))
        .unwrap_or(default_start)
        .map(f64::ln)
        .to_vec();
    let m: Minimum = lbfgs(objective, x0, 1000, 1e-9);
    Ok(super::Fit {
        params: checked_params(&m, names)?,
        log_likelihood: -m.value * n,
        iterations: m.iterations,
        customers: n as u64,
    })
}

/// The checks every transaction model makes of its data before a fit: some customers, valid
/// histories (whole x ≥ 0, 0 ≤ t_x ≤ T, T > 0), at least one repeat purchase. Returns the
/// number of customers (the sum of the weights).
pub fn check_histories(data: &[(History, f64)]) -> Result<f64, FitError> {
    let n: f64 = data.iter().map(|(_, w)| w).sum();
    if n <= 0.0 {
        return Err(FitError::Empty);
    }
    if let Some((h, _)) = data.iter().find(|(h, _)| {
        !(h.x >= 0.0 && h.t_x >= 0.0 && h.t > 0.0 && h.t_x <= h.t && h.x.fract() == 0.0)
    }) {
        return Err(FitError::Invalid(format!(
            "x = {}, t_x = {}, T = {} (need whole x ≥ 0 and 0 ≤ t_x ≤ T, T > 0)",
            h.x, h.t_x, h.t
        )));
    }
    if data.iter().all(|(h, _)| h.x == 0.0) {
        return Err(FitError::NoRepeats);
    }
    Ok(n)
}

/// The parameters at a minimum over log-parameters, refused when one ran off (the data do not
/// identify it) or the likelihood is not finite.
pub fn checked_params<const N: usize>(m: &Minimum, names: [&str; N]) -> Result<[f64; N], FitError> {
    if let Some((i, v)) =
        m.x.iter()
            .enumerate()
            .find(|(_, v)| v.abs() > 25.0 || !v.is_finite())
    {
        return Err(FitError::NotIdentified(format!(
            "{} ran off to {:.3e}",
            names[i],
            v.exp()
        )));
    }
    if !m.value.is_finite() {
        return Err(FitError::NotIdentified(
            "the likelihood is not finite".into(),
        ));
    }
    let mut out = [0.0; N];
    for (o, v) in out.iter_mut().zip(&m.x) {
        *o = v.exp();
    }
    Ok(out)
}

/// P(alive | x, t_x, T).
pub fn p_alive(p: &Params, h: &History) -> f64 {
    if h.x == 0.0 {
        return 1.0;
    }
    let ln_ratio = (p.r + h.x) * ((p.alpha + h.t).ln() - (p.alpha + h.t_x).ln());
    1.0 / (1.0 + p.a / (p.b + h.x - 1.0) * ln_ratio.exp())
}

/// E[Y(t) | x, t_x, T]: expected purchases in the next `t` time units.
pub fn expected_purchases(p: &Params, h: &History, t: f64) -> Result<f64, SeriesError> {
    let mut out = [0.0];
    expected_purchases_many(p, h, &[t], &mut out)?;
    Ok(out[0])
}

/// `a` moved off 1 by a hair: the expectations have a removable singularity at a = 1 (a 0/0),
/// and are continuous in a, so this gives their value there to ~1e-7 instead of NaN.
fn off_one(a: f64) -> f64 {
    if (a - 1.0).abs() < 1e-7 {
        1.0 + 1e-7
    } else {
        a
    }
}

/// E[Y(t) | x, t_x, T] for several horizons `ts` at once, written to `out`.
///
/// Fader, Hardie & Lee's (10): (a+b+x−1)/(a−1) · [1 − ((α+T)/(α+T+t))^(r+x) · 2F1(r+x, b+x;
/// a+b+x−1; z)] / (1 + δ(x>0) a/(b+x−1) ((α+T)/(α+t_x))^(r+x)), z = t/(α+T+t). By Euler's
/// transformation the product in the bracket is (1−z)^(a−1) · 2F1(a+b−1−r, a−1; a+b+x−1; z):
/// the same value without the factor (1−z)^(−(r+x)) that the direct series builds up and that
/// overflows for frequent buyers (x in the thousands), and with terms that fall like 1/(a+b+x−1)_n.
/// The series is shared between the horizons ([`super::special::hyp2f1_many`]).
pub fn expected_purchases_many(
    p: &Params,
    h: &History,
    ts: &[f64],
    out: &mut [f64],
) -> Result<(), SeriesError> {
    expected_purchases_with(p, h, ts, out, false)
}

/// [`expected_purchases_many`]; with `dropout_at_zero`, the drop-out term of the denominator is
/// there for x = 0 too (MBG/NBD, whose expressions are these with b + 1 for b).
pub(super) fn expected_purchases_with(
    p: &Params,
    h: &History,
    ts: &[f64],
    out: &mut [f64],
    dropout_at_zero: bool,
) -> Result<(), SeriesError> {
    let Params { r, alpha, b, .. } = *p;
    let a = off_one(p.a);
    let History { x, t_x, t: big_t } = *h;
    let zs: Vec<f64> = ts.iter().map(|t| t / (alpha + big_t + t)).collect();
    hyp2f1_many(a + b - 1.0 - r, a - 1.0, a + b + x - 1.0, &zs, out)?;
    let den = if x > 0.0 || dropout_at_zero {
        1.0 + a / (b + x - 1.0) * ((alpha + big_t) / (alpha + t_x)).powf(r + x)
    } else {
        1.0
    };
    let lead = (a + b + x - 1.0) / (a - 1.0);
    for (g, t) in out.iter_mut().zip(ts) {
        let shrink = ((a - 1.0) * ((alpha + big_t) / (alpha + big_t + t)).ln()).exp();
        *g = lead * (1.0 - shrink * *g) / den;
    }
    Ok(())
}

/// E[X(t)]: expected purchases of a new customer in its first `t` time units (the conditional
/// expectation of a customer with no history yet: x = t_x = T = 0).
pub fn population_expected(p: &Params, t: f64) -> Result<f64, SeriesError> {
    let new = History {
        x: 0.0,
        t_x: 0.0,
        t: 0.0,
    };
    expected_purchases(p, &new, t)
}

/// The direct form of (10), summed as written: the reference the transformed one is tested
/// against.
#[cfg(test)]
fn expected_purchases_direct(p: &Params, h: &History, t: f64) -> f64 {
    let Params { r, alpha, a, b } = *p;
    let History { x, t_x, t: big_t } = *h;
    let z = t / (alpha + big_t + t);
    // The direct series overflows for frequent buyers: NaN then.
    let f = super::special::hyp2f1(r + x, b + x, a + b + x - 1.0, z).unwrap_or(f64::NAN);
    let num = (a + b + x - 1.0) / (a - 1.0)
        * (1.0 - ((alpha + big_t) / (alpha + big_t + t)).powf(r + x) * f);
    let den = if x > 0.0 {
        1.0 + a / (b + x - 1.0) * ((alpha + big_t) / (alpha + t_x)).powf(r + x)
    } else {
        1.0
    };
    num / den
}

#[cfg(test)]
mod tests;
