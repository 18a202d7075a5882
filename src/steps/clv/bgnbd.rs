//! BG/NBD (Fader, Hardie & Lee 2005, "Counting Your Customers the Easy Way"): the number of
//! future purchases and the probability a customer is still alive.
//!
//! Per customer: x = repeat purchases, t_x = time of the last purchase, T = age, all measured
//! from the first purchase in one time unit (clvflow uses weeks). Parameters r, α (purchase rate
//! ~ Gamma(r, α)) and a, b (drop-out probability ~ Beta(a, b)) are fitted by maximum likelihood
//! with analytic gradients, by L-BFGS on log-parameters. Identical (x, t_x, T) rows are merged
//! with weights, so the fit costs O(distinct histories), not O(customers).

use super::optimize::{Minimum, lbfgs};
use super::special::{digamma, hyp2f1, ln_gamma};

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

/// A fitted model and how the fit went.
#[derive(Debug, Clone)]
pub struct Fit {
    pub params: Params,
    /// Total log-likelihood of the data at `params`.
    pub log_likelihood: f64,
    pub iterations: usize,
    pub customers: u64,
}

/// Why a fit is refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FitError {
    #[error("no customers to fit")]
    Empty,
    #[error(
        "no customer made a repeat purchase: BG/NBD cannot be fitted (it needs repeat purchases to learn purchase rates and drop-out)"
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
    let rows: Vec<[f64; 3]> = histories.iter().map(|h| [h.x, h.t_x, h.t]).collect();
    let (distinct, index) = super::group(&rows);
    let data = distinct
        .into_iter()
        .map(|([x, t_x, t], w)| (History { x, t_x, t }, w))
        .collect();
    (data, index)
}

/// Fits the model by maximum likelihood.
pub fn fit(data: &[(History, f64)]) -> Result<Fit, FitError> {
    fit_from(data, None)
}

/// Fits the model by maximum likelihood, starting from `start` when given (a fit of similar
/// data, e.g. the full history for a calibration-period refit: fewer iterations to converge).
pub fn fit_from(data: &[(History, f64)], start: Option<&Params>) -> Result<Fit, FitError> {
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
    let mean_t = data.iter().map(|(h, w)| h.t * w).sum::<f64>() / n;
    // Minimise the mean negative log-likelihood over log-parameters.
    let objective = |phi: &[f64]| {
        let p = Params {
            r: phi[0].exp(),
            alpha: phi[1].exp(),
            a: phi[2].exp(),
            b: phi[3].exp(),
        };
        let (ll, g) = log_likelihood(&p, data);
        let theta = [p.r, p.alpha, p.a, p.b];
        let grad: Vec<f64> = (0..4).map(|i| -g[i] * theta[i] / n).collect();
        (-ll / n, grad)
    };
    let x0 = match start {
        Some(p)
            if [p.r, p.alpha, p.a, p.b]
                .iter()
                .all(|v| v.is_finite() && *v > 0.0) =>
        {
            vec![p.r.ln(), p.alpha.ln(), p.a.ln(), p.b.ln()]
        }
        _ => vec![0.0, mean_t.max(1e-3).ln(), 0.0, 0.0],
    };
    let m: Minimum = lbfgs(objective, x0, 1000, 1e-9);
    let names = ["r", "alpha", "a", "b"];
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
    let params = Params {
        r: m.x[0].exp(),
        alpha: m.x[1].exp(),
        a: m.x[2].exp(),
        b: m.x[3].exp(),
    };
    Ok(Fit {
        params,
        log_likelihood: -m.value * n,
        iterations: m.iterations,
        customers: n as u64,
    })
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
pub fn expected_purchases(p: &Params, h: &History, t: f64) -> f64 {
    let mut out = [0.0];
    expected_purchases_many(p, h, &[t], &mut out);
    out[0]
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

/// E[Y(t) | x, t_x, T] for several horizons `ts` at once, written to `out`: the hypergeometric
/// series is shared between them (see [`super::special::hyp2f1_many`]).
pub fn expected_purchases_many(p: &Params, h: &History, ts: &[f64], out: &mut [f64]) {
    let Params { r, alpha, b, .. } = *p;
    let a = off_one(p.a);
    let History { x, t_x, t: big_t } = *h;
    let zs: Vec<f64> = ts.iter().map(|t| t / (alpha + big_t + t)).collect();
    super::special::hyp2f1_many(r + x, b + x, a + b + x - 1.0, &zs, out);
    let den = if x > 0.0 {
        1.0 + a / (b + x - 1.0) * ((alpha + big_t) / (alpha + t_x)).powf(r + x)
    } else {
        1.0
    };
    let lead = (a + b + x - 1.0) / (a - 1.0);
    for (f, t) in out.iter_mut().zip(ts) {
        let shrink = ((r + x) * ((alpha + big_t) / (alpha + big_t + t)).ln()).exp();
        *f = lead * (1.0 - shrink * *f) / den;
    }
}

/// The old one-horizon form, kept as the reference the shared-series version is tested against.
#[cfg(test)]
fn expected_purchases_direct(p: &Params, h: &History, t: f64) -> f64 {
    let Params { r, alpha, a, b } = *p;
    let History { x, t_x, t: big_t } = *h;
    let z = t / (alpha + big_t + t);
    let f = hyp2f1(r + x, b + x, a + b + x - 1.0, z);
    let num = (a + b + x - 1.0) / (a - 1.0)
        * (1.0 - ((alpha + big_t) / (alpha + big_t + t)).powf(r + x) * f);
    let den = if x > 0.0 {
        1.0 + a / (b + x - 1.0) * ((alpha + big_t) / (alpha + t_x)).powf(r + x)
    } else {
        1.0
    };
    num / den
}

/// E[X(t)]: expected purchases of a new customer in its first `t` time units.
pub fn population_expected(p: &Params, t: f64) -> f64 {
    let Params { r, alpha, b, .. } = *p;
    let a = off_one(p.a);
    (a + b - 1.0) / (a - 1.0)
        * (1.0 - (alpha / (alpha + t)).powf(r) * hyp2f1(r, b, a + b - 1.0, t / (alpha + t)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fader, Hardie & Lee (2005), CDNOW sample, time in weeks.
    const PUBLISHED: Params = Params {
        r: 0.2425982,
        alpha: 4.413684,
        a: 0.7929899,
        b: 2.426167,
    };

    fn close(got: f64, want: f64) {
        assert!(
            ((got - want) / want).abs() < 5e-5,
            "got {got}, published {want}"
        );
    }

    #[test]
    fn grouped_parallel_likelihood_equals_the_direct_sum() {
        // 60,000 histories (above the threading threshold), many x values, odd weights.
        let data: Vec<(History, f64)> = (0..60_000)
            .map(|i| {
                let x = (i % 17) as f64;
                let t = 5.0 + (i % 101) as f64 * 0.7;
                let t_x = if x > 0.0 {
                    t * ((i % 13) as f64 / 13.0)
                } else {
                    0.0
                };
                (History { x, t_x, t }, 1.0 + (i % 3) as f64)
            })
            .collect();
        let mut sorted = data.clone();
        sorted.sort_by(|a, b| a.0.x.total_cmp(&b.0.x));
        let (ll, g) = log_likelihood(&PUBLISHED, &sorted);
        let (mut ll0, mut g0) = (0.0, [0.0; 4]);
        for (h, w) in &data {
            let (l, gi) = ll_one(&PUBLISHED, h);
            ll0 += w * l;
            for i in 0..4 {
                g0[i] += w * gi[i];
            }
        }
        assert!(((ll - ll0) / ll0).abs() < 1e-12, "{ll} vs {ll0}");
        for i in 0..4 {
            assert!(
                (g[i] - g0[i]).abs() <= 1e-9 * g0[i].abs().max(1.0),
                "{g:?} vs {g0:?}"
            );
        }
    }

    #[test]
    fn several_horizons_at_once_equal_one_at_a_time() {
        let ts: Vec<f64> = (1..=12).map(|m| f64::from(m) * 4.348).collect();
        for h in [
            History {
                x: 0.0,
                t_x: 0.0,
                t: 3.0,
            },
            History {
                x: 2.0,
                t_x: 30.43,
                t: 38.86,
            },
            History {
                x: 26.0,
                t_x: 30.85714,
                t: 31.0,
            },
            History {
                x: 120.0,
                t_x: 100.0,
                t: 150.0,
            },
        ] {
            let mut out = vec![0.0; ts.len()];
            expected_purchases_many(&PUBLISHED, &h, &ts, &mut out);
            for (t, got) in ts.iter().zip(&out) {
                let want = expected_purchases_direct(&PUBLISHED, &h, *t);
                assert!(
                    ((got - want) / want).abs() < 1e-12,
                    "{h:?} t={t}: {got} vs {want}"
                );
            }
        }
        // At a = 1 exactly the formula is 0/0; the value is the limit, not NaN.
        let at_one = Params {
            a: 1.0,
            ..PUBLISHED
        };
        let near = Params {
            a: 1.0 + 1e-4,
            ..PUBLISHED
        };
        let h = History {
            x: 3.0,
            t_x: 20.0,
            t: 30.0,
        };
        let (v1, v2) = (
            expected_purchases(&at_one, &h, 52.0),
            expected_purchases(&near, &h, 52.0),
        );
        assert!(
            v1.is_finite() && ((v1 - v2) / v2).abs() < 1e-3,
            "{v1} vs {v2}"
        );
        assert!(population_expected(&at_one, 52.0).is_finite());
    }

    #[test]
    fn a_warm_start_reaches_the_same_optimum_in_fewer_iterations() {
        let truth = Params {
            r: 0.25,
            alpha: 4.0,
            a: 0.8,
            b: 2.5,
        };
        let data = compress(simulate(&truth, 20_000, 3));
        let cold = fit(&data).unwrap();
        let warm = fit_from(
            &data,
            Some(&Params {
                r: 0.26,
                alpha: 4.1,
                a: 0.78,
                b: 2.4,
            }),
        )
        .unwrap();
        assert!(warm.iterations < cold.iterations, "{warm:?} vs {cold:?}");
        assert!(
            (warm.log_likelihood - cold.log_likelihood).abs() < 1e-6 * cold.log_likelihood.abs()
        );
    }

    #[test]
    fn published_values() {
        let h = History {
            x: 26.0,
            t_x: 30.85714,
            t: 31.0,
        };
        close(expected_purchases(&PUBLISHED, &h, 52.0), 25.75659);
        close(p_alive(&PUBLISHED, &h), 0.9688523);
        close(population_expected(&PUBLISHED, 52.0), 1.444004);
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let data = compress([
            History {
                x: 0.0,
                t_x: 0.0,
                t: 38.0,
            },
            History {
                x: 3.0,
                t_x: 20.5,
                t: 38.0,
            },
            History {
                x: 12.0,
                t_x: 37.0,
                t: 39.0,
            },
        ]);
        let (_, g) = log_likelihood(&PUBLISHED, &data);
        let f = |p: Params| log_likelihood(&p, &data).0;
        let h = 1e-6;
        let bump = |i: usize, d: f64| {
            let mut p = PUBLISHED;
            match i {
                0 => p.r += d,
                1 => p.alpha += d,
                2 => p.a += d,
                _ => p.b += d,
            }
            p
        };
        for (i, gi) in g.iter().enumerate() {
            let numeric = (f(bump(i, h)) - f(bump(i, -h))) / (2.0 * h);
            assert!(
                (numeric - gi).abs() < 1e-5 * (1.0 + gi.abs()),
                "param {i}: analytic {gi}, numeric {numeric}"
            );
        }
    }

    /// Draws histories from the BG/NBD story itself with known parameters.
    fn simulate(p: &Params, n: usize, seed: u64) -> Vec<History> {
        use rand::{Rng, SeedableRng};
        use rand_distr::{Beta, Distribution, Exp, Gamma};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let lam = Gamma::new(p.r, 1.0 / p.alpha).unwrap();
        let drop = Beta::new(p.a, p.b).unwrap();
        (0..n)
            .map(|_| {
                // Ages between 20 and 80 weeks, whole days.
                let t = (rng.random_range(140..560) as f64) / 7.0;
                let (l, q) = (lam.sample(&mut rng).max(1e-12), drop.sample(&mut rng));
                let gap = Exp::new(l).unwrap();
                let (mut now, mut x, mut t_x) = (0.0, 0.0, 0.0);
                loop {
                    now += gap.sample(&mut rng);
                    if now > t {
                        break;
                    }
                    x += 1.0;
                    t_x = now;
                    if rng.random::<f64>() < q {
                        break;
                    }
                }
                History { x, t_x, t }
            })
            .collect()
    }

    #[test]
    fn fitting_recovers_simulated_parameters() {
        let truth = Params {
            r: 0.25,
            alpha: 4.0,
            a: 0.8,
            b: 2.5,
        };
        let data = compress(simulate(&truth, 20_000, 7));
        let fit = fit(&data).unwrap();
        let p = fit.params;
        // With 20 000 customers the standard errors are a few percent (a, b: about 10 %).
        for (name, got, want, tol) in [
            ("r", p.r, truth.r, 0.10),
            ("alpha", p.alpha, truth.alpha, 0.15),
            ("a", p.a, truth.a, 0.30),
            ("b", p.b, truth.b, 0.35),
        ] {
            assert!(
                ((got - want) / want).abs() < tol,
                "{name}: fitted {got}, true {want} ({fit:?})"
            );
        }
        let at_truth = log_likelihood(&truth, &data).0;
        assert!(
            fit.log_likelihood >= at_truth - 1e-6,
            "LL at the optimum {} < LL at the truth {at_truth}",
            fit.log_likelihood
        );
        // And the fitted model predicts the sample's own repeat purchases in aggregate.
        let n: f64 = data.iter().map(|(_, w)| w).sum();
        let observed: f64 = data.iter().map(|(h, w)| h.x * w).sum::<f64>() / n;
        let predicted: f64 = data
            .iter()
            .map(|(h, w)| population_expected(&p, h.t) * w)
            .sum::<f64>()
            / n;
        assert!(
            ((predicted - observed) / observed).abs() < 0.05,
            "predicted {predicted}, observed {observed}"
        );
    }

    #[test]
    fn refuses_data_that_cannot_be_fitted() {
        assert_eq!(fit(&[]).unwrap_err(), FitError::Empty);
        let one_timers = compress((0..100).map(|i| History {
            x: 0.0,
            t_x: 0.0,
            t: 10.0 + i as f64,
        }));
        assert_eq!(fit(&one_timers).unwrap_err(), FitError::NoRepeats);
        let bad = compress([History {
            x: 2.0,
            t_x: 40.0,
            t: 30.0,
        }]);
        assert!(matches!(fit(&bad).unwrap_err(), FitError::Invalid(_)));
    }

    #[test]
    fn a_single_customer_gives_an_answer_or_a_clear_error_never_nan() {
        let one = compress([History {
            x: 3.0,
            t_x: 20.0,
            t: 30.0,
        }]);
        match fit(&one) {
            Ok(f) => assert!(
                f.log_likelihood.is_finite()
                    && [f.params.r, f.params.alpha, f.params.a, f.params.b]
                        .iter()
                        .all(|v| v.is_finite() && *v > 0.0)
            ),
            Err(e) => assert!(matches!(e, FitError::NotIdentified(_)), "{e}"),
        }
    }
}
