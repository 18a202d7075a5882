//! Gamma-Gamma spend model (Fader, Hardie & Lee 2005, "RFM and CLV: Using Iso-Value Curves for
//! Customer Base Analysis"; Fader & Hardie's note on the Gamma-Gamma model): a customer's spend
//! per transaction is Gamma(p, ν) with ν ~ Gamma(q, γ). Fitted on customers with x ≥ 1 repeat
//! purchases and their mean repeat spend m_x, by maximum likelihood on log-parameters.

use super::optimize::lbfgs;
use super::special::{digamma, ln_gamma};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    pub p: f64,
    pub q: f64,
    pub gamma: f64,
}

/// A fitted Gamma-Gamma model and how the fit went.
pub type Fit = super::Fit<Params>;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FitError {
    #[error(
        "no customer with a repeat purchase and positive mean spend: Gamma-Gamma cannot be fitted"
    )]
    Empty,
    #[error(
        "the fitted q = {0:.4} is not above 1, so the mean spend is infinite; the spend data do not suit the Gamma-Gamma model"
    )]
    InfiniteMean(f64),
    #[error("the data do not identify the model: {0}")]
    NotIdentified(String),
}

/// Log-likelihood of one customer (x repeat purchases, mean spend m) and its gradient in (p, q, γ).
pub fn ll_one(pr: &Params, x: f64, m: f64) -> (f64, [f64; 3]) {
    let Params { p, q, gamma } = *pr;
    let px = p * x;
    let ll = ln_gamma(px + q) - ln_gamma(px) - ln_gamma(q)
        + q * gamma.ln()
        + (px - 1.0) * m.ln()
        + px * x.ln()
        - (px + q) * (gamma + m * x).ln();
    let dp = x * (digamma(px + q) - digamma(px) + m.ln() + x.ln() - (gamma + m * x).ln());
    let dq = digamma(px + q) - digamma(q) + gamma.ln() - (gamma + m * x).ln();
    let dg = q / gamma - (px + q) / (gamma + m * x);
    (ll, [dp, dq, dg])
}

/// Weighted sum of [`ll_one`] over rows `[x, m, ln m, ln x, weight]` sorted by x.
fn chunk_ll(pr: &Params, rows: &[[f64; 5]]) -> (f64, [f64; 3]) {
    let Params { p, q, gamma } = *pr;
    let (ln_gamma_q, digamma_q, ln_g) = (ln_gamma(q), digamma(q), gamma.ln());
    let mut cur = f64::NAN;
    let (mut lg, mut dg_pq, mut dg_px) = (0.0, 0.0, 0.0);
    let mut ll = 0.0;
    let mut g = [0.0; 3];
    for &[x, m, ln_m, ln_x, w] in rows {
        let px = p * x;
        if x != cur {
            cur = x;
            lg = ln_gamma(px + q) - ln_gamma(px) - ln_gamma_q;
            dg_pq = digamma(px + q);
            dg_px = digamma(px);
        }
        let gm = gamma + m * x;
        let ln_gm = gm.ln();
        ll += w * (lg + q * ln_g + (px - 1.0) * ln_m + px * ln_x - (px + q) * ln_gm);
        g[0] += w * x * (dg_pq - dg_px + ln_m + ln_x - ln_gm);
        g[1] += w * (dg_pq - digamma_q + ln_g - ln_gm);
        g[2] += w * (q / gamma - (px + q) / gm);
    }
    (ll, g)
}

/// Whether [`fit`] uses a customer with `x` repeat purchases of mean value `m` (the others
/// have no repeat spend to fit).
pub fn used(x: f64, m: f64) -> bool {
    x >= 1.0 && m > 0.0 && m.is_finite()
}

/// Fits the model on (x, mean spend) pairs; customers with x = 0 or m ≤ 0 are ignored.
pub fn fit(data: &[(f64, f64)]) -> Result<Fit, FitError> {
    let rows = rows_of(data);
    if rows.is_empty() {
        return Err(FitError::Empty);
    }
    let n: f64 = rows.iter().map(|r| r[4]).sum();
    // From the sorted rows, not the input's order (which changes from run to run): the start,
    // and so the optimum found, is the same for the same customers.
    let mean_m = rows.iter().map(|r| r[1] * r[4]).sum::<f64>() / n;
    let objective = |phi: &[f64]| {
        let pr = Params {
            p: phi[0].exp(),
            q: phi[1].exp(),
            gamma: phi[2].exp(),
        };
        let (ll, g) = super::par_sum(&rows, |chunk| chunk_ll(&pr, chunk));
        let theta = [pr.p, pr.q, pr.gamma];
        ((-ll / n), (0..3).map(|i| -g[i] * theta[i] / n).collect())
    };
    let m = lbfgs(
        objective,
        vec![0.0, 1f64.ln() + 1.0, mean_m.ln()],
        1000,
        1e-9,
    );
    if let Some(v) = m.x.iter().find(|v| v.abs() > 30.0 || !v.is_finite()) {
        return Err(FitError::NotIdentified(format!(
            "a parameter ran off to {:.3e}",
            v.exp()
        )));
    }
    let params = Params {
        p: m.x[0].exp(),
        q: m.x[1].exp(),
        gamma: m.x[2].exp(),
    };
    if params.q <= 1.0 {
        return Err(FitError::InfiniteMean(params.q));
    }
    Ok(Fit {
        params,
        log_likelihood: -m.value * n,
        iterations: m.iterations,
        customers: n as u64,
    })
}

/// The rows the fit uses: identical (x, m) pairs of the customers it uses merged with weights,
/// sorted by x, with ln m and ln x precomputed (the x-only terms are computed once per x).
fn rows_of(data: &[(f64, f64)]) -> Vec<[f64; 5]> {
    let used: Vec<[f64; 2]> = data
        .iter()
        .filter(|(x, m)| used(*x, *m))
        .map(|(x, m)| [*x, *m])
        .collect();
    super::group(&used)
        .0
        .into_iter()
        .map(|([x, m], w)| [x, m, m.ln(), x.ln(), w])
        .collect()
}

/// Standard errors of fitted parameters `pr` on `data` (as given to [`fit`]), from the
/// observed information.
pub fn standard_errors(pr: &Params, data: &[(f64, f64)]) -> Result<[f64; 3], String> {
    let rows = rows_of(data);
    let grad = |v: &[f64]| {
        if v.len() != 3 || !v.iter().all(|x| *x > 0.0) {
            return None;
        }
        let pr = Params {
            p: v[0],
            q: v[1],
            gamma: v[2],
        };
        Some(
            super::par_sum(&rows, |chunk| chunk_ll(&pr, chunk))
                .1
                .to_vec(),
        )
    };
    let se = super::optimize::standard_errors(grad, &[pr.p, pr.q, pr.gamma])?;
    Ok([se[0], se[1], se[2]])
}

/// E[spend per transaction | x, m_x]; the population mean for x = 0.
pub fn expected_spend(pr: &Params, x: f64, m: f64) -> f64 {
    let Params { p, q, gamma } = *pr;
    if x <= 0.0 || m <= 0.0 {
        return population_mean(pr);
    }
    (gamma + m * x) * p / (p * x + q - 1.0)
}

/// E[spend per transaction] of a new customer: pγ/(q − 1).
pub fn population_mean(pr: &Params) -> f64 {
    pr.p * pr.gamma / (pr.q - 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_population_mean() {
        // Fader & Hardie's CDNOW Gamma-Gamma estimates.
        let pr = Params {
            p: 6.25,
            q: 3.74,
            gamma: 15.44,
        };
        assert!(
            (population_mean(&pr) - 35.2190).abs() < 1e-3,
            "{}",
            population_mean(&pr)
        );
        // The conditional expectation is a weighted mean of the population mean and m_x.
        let (x, m) = (4.0, 50.0);
        let w = (q_weight(&pr, x), 1.0 - q_weight(&pr, x));
        assert!((expected_spend(&pr, x, m) - (w.0 * population_mean(&pr) + w.1 * m)).abs() < 1e-9);
    }

    fn q_weight(pr: &Params, x: f64) -> f64 {
        (pr.q - 1.0) / (pr.p * x + pr.q - 1.0)
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let pr = Params {
            p: 6.25,
            q: 3.74,
            gamma: 15.44,
        };
        let (_, g) = ll_one(&pr, 3.0, 42.0);
        let h = 1e-6;
        let f = |p: Params| ll_one(&p, 3.0, 42.0).0;
        let numeric = [
            (f(Params { p: pr.p + h, ..pr }) - f(Params { p: pr.p - h, ..pr })) / (2.0 * h),
            (f(Params { q: pr.q + h, ..pr }) - f(Params { q: pr.q - h, ..pr })) / (2.0 * h),
            (f(Params {
                gamma: pr.gamma + h,
                ..pr
            }) - f(Params {
                gamma: pr.gamma - h,
                ..pr
            })) / (2.0 * h),
        ];
        for i in 0..3 {
            assert!(
                (numeric[i] - g[i]).abs() < 1e-5 * (1.0 + g[i].abs()),
                "{i}: {} vs {}",
                g[i],
                numeric[i]
            );
        }
    }

    #[test]
    fn grouped_likelihood_equals_the_direct_sum() {
        let pr = Params {
            p: 6.25,
            q: 3.74,
            gamma: 15.44,
        };
        // 5000 customers, (x, m) repeating every 873: merged into 873 weighted rows.
        let raw: Vec<[f64; 2]> = (0..5000)
            .map(|i| [1.0 + (i % 9) as f64, 3.0 + (i % 97) as f64 * 1.3])
            .collect();
        let rows: Vec<[f64; 5]> = super::super::group(&raw)
            .0
            .into_iter()
            .map(|([x, m], w)| [x, m, m.ln(), x.ln(), w])
            .collect();
        assert_eq!(rows.len(), 873);
        let (ll, g) = chunk_ll(&pr, &rows);
        let (mut ll0, mut g0) = (0.0, [0.0; 3]);
        for r in &raw {
            let (l, gi) = ll_one(&pr, r[0], r[1]);
            ll0 += l;
            for i in 0..3 {
                g0[i] += gi[i];
            }
        }
        assert!(((ll - ll0) / ll0).abs() < 1e-12, "{ll} vs {ll0}");
        for i in 0..3 {
            assert!(
                (g[i] - g0[i]).abs() <= 1e-9 * g0[i].abs().max(1.0),
                "{g:?} vs {g0:?}"
            );
        }
    }

    #[test]
    fn no_repeat_buyers_is_a_clear_error() {
        assert_eq!(
            fit(&[(0.0, 10.0), (0.0, 5.0)]).unwrap_err(),
            FitError::Empty
        );
    }
}
