//! The transaction models of the predictive CLV, behind one interface: BG/NBD, MBG/NBD and
//! Pareto/NBD all take (x, t_x, T) histories, have four parameters, and give P(alive) and
//! E[Y(t) | x, t_x, T]. The `clv` step and its backtest use them through [`Model`] and
//! [`Params`], and `model: auto` compares them on the same holdout.

use super::bgnbd::{self, FitError, History};
use super::optimize::standard_errors;
use super::special::SeriesError;
use super::{Fit, mbgnbd, pareto_nbd};

/// Which transaction model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Model {
    BgNbd,
    MbgNbd,
    ParetoNbd,
}

impl Model {
    pub const ALL: [Model; 3] = [Model::BgNbd, Model::MbgNbd, Model::ParetoNbd];

    /// The name in the fit report (`component` column).
    pub fn name(self) -> &'static str {
        match self {
            Model::BgNbd => "bgnbd",
            Model::MbgNbd => "mbgnbd",
            Model::ParetoNbd => "pareto_nbd",
        }
    }

    /// The fit report's component for this model as a candidate of `model: auto`.
    pub fn candidate_name(self) -> &'static str {
        match self {
            Model::BgNbd => "candidate_bgnbd",
            Model::MbgNbd => "candidate_mbgnbd",
            Model::ParetoNbd => "candidate_pareto_nbd",
        }
    }

    /// For messages.
    pub fn title(self) -> &'static str {
        match self {
            Model::BgNbd => "BG/NBD",
            Model::MbgNbd => "MBG/NBD",
            Model::ParetoNbd => "Pareto/NBD",
        }
    }

    pub fn param_names(self) -> [&'static str; 4] {
        match self {
            Model::BgNbd | Model::MbgNbd => ["r", "alpha", "a", "b"],
            Model::ParetoNbd => ["r", "alpha", "s", "beta"],
        }
    }

    /// Fits the model, starting from `start` when it is a fit of the same model.
    pub fn fit(
        self,
        data: &[(History, f64)],
        start: Option<&Params>,
    ) -> Result<Fit<Params>, FitError> {
        let start = start.filter(|p| p.model() == self).map(|p| p.values());
        let v = |a: [f64; 4]| (a[0], a[1], a[2], a[3]);
        match self {
            Model::BgNbd => {
                let s = start
                    .map(v)
                    .map(|(r, alpha, a, b)| bgnbd::Params { r, alpha, a, b });
                bgnbd::fit_from(data, s.as_ref()).map(|f| wrap(f, Params::BgNbd))
            }
            Model::MbgNbd => {
                let s = start
                    .map(v)
                    .map(|(r, alpha, a, b)| mbgnbd::Params { r, alpha, a, b });
                mbgnbd::fit_from(data, s.as_ref()).map(|f| wrap(f, Params::MbgNbd))
            }
            Model::ParetoNbd => {
                let s = start.map(v).map(|(r, alpha, s, beta)| pareto_nbd::Params {
                    r,
                    alpha,
                    s,
                    beta,
                });
                pareto_nbd::fit_from(data, s.as_ref()).map(|f| wrap(f, Params::ParetoNbd))
            }
        }
    }
}

fn wrap<P>(f: Fit<P>, to: impl Fn(P) -> Params) -> Fit<Params> {
    Fit {
        params: to(f.params),
        log_likelihood: f.log_likelihood,
        iterations: f.iterations,
        customers: f.customers,
    }
}

/// Fitted parameters of one of the models.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Params {
    BgNbd(bgnbd::Params),
    MbgNbd(mbgnbd::Params),
    ParetoNbd(pareto_nbd::Params),
}

impl Params {
    pub fn model(&self) -> Model {
        match self {
            Params::BgNbd(_) => Model::BgNbd,
            Params::MbgNbd(_) => Model::MbgNbd,
            Params::ParetoNbd(_) => Model::ParetoNbd,
        }
    }

    /// The four parameters, in the order of [`Model::param_names`].
    pub fn values(&self) -> [f64; 4] {
        match self {
            Params::BgNbd(p) => [p.r, p.alpha, p.a, p.b],
            Params::MbgNbd(p) => [p.r, p.alpha, p.a, p.b],
            Params::ParetoNbd(p) => [p.r, p.alpha, p.s, p.beta],
        }
    }

    pub fn with_values(model: Model, v: [f64; 4]) -> Self {
        let [r, alpha, c, d] = v;
        match model {
            Model::BgNbd => Params::BgNbd(bgnbd::Params {
                r,
                alpha,
                a: c,
                b: d,
            }),
            Model::MbgNbd => Params::MbgNbd(mbgnbd::Params {
                r,
                alpha,
                a: c,
                b: d,
            }),
            Model::ParetoNbd => Params::ParetoNbd(pareto_nbd::Params {
                r,
                alpha,
                s: c,
                beta: d,
            }),
        }
    }

    pub fn p_alive(&self, h: &History) -> Result<f64, SeriesError> {
        match self {
            Params::BgNbd(p) => Ok(bgnbd::p_alive(p, h)),
            Params::MbgNbd(p) => Ok(mbgnbd::p_alive(p, h)),
            Params::ParetoNbd(p) => pareto_nbd::p_alive(p, h),
        }
    }

    /// E[Y(t) | x, t_x, T] for the horizons `ts`, written to `out`.
    pub fn expected_purchases_many(
        &self,
        h: &History,
        ts: &[f64],
        out: &mut [f64],
    ) -> Result<(), SeriesError> {
        match self {
            Params::BgNbd(p) => bgnbd::expected_purchases_many(p, h, ts, out),
            Params::MbgNbd(p) => mbgnbd::expected_purchases_many(p, h, ts, out),
            Params::ParetoNbd(p) => pareto_nbd::expected_purchases_many(p, h, ts, out),
        }
    }

    /// E[Y(t) | x, t_x, T] for the horizons `ts` (into `out`) and P(alive), computing what the
    /// two share once (Pareto/NBD: both come from the same hypergeometric series).
    pub fn predict_many(
        &self,
        h: &History,
        ts: &[f64],
        out: &mut [f64],
    ) -> Result<f64, SeriesError> {
        match self {
            Params::ParetoNbd(p) => pareto_nbd::predict_many(p, h, ts, out),
            _ => {
                self.expected_purchases_many(h, ts, out)?;
                self.p_alive(h)
            }
        }
    }

    pub fn expected_purchases(&self, h: &History, t: f64) -> Result<f64, SeriesError> {
        let mut out = [0.0];
        self.expected_purchases_many(h, &[t], &mut out)?;
        Ok(out[0])
    }

    /// The total log-likelihood of `data` and its gradient at these parameters.
    pub fn log_likelihood(&self, data: &[(History, f64)]) -> Option<(f64, [f64; 4])> {
        match self {
            Params::BgNbd(p) => Some(bgnbd::log_likelihood(p, data)),
            Params::MbgNbd(p) => Some(mbgnbd::log_likelihood(p, data)),
            Params::ParetoNbd(p) => {
                pareto_nbd::log_likelihood(p, data, &pareto_nbd::Points::of(data)).ok()
            }
        }
    }

    /// Standard errors of these (fitted) parameters on `data`, from the observed information.
    pub fn standard_errors(&self, data: &[(History, f64)]) -> Result<[f64; 4], String> {
        let model = self.model();
        let points = (model == Model::ParetoNbd).then(|| pareto_nbd::Points::of(data));
        let grad = |v: &[f64]| {
            let v: [f64; 4] = v.try_into().ok()?;
            if !v.iter().all(|x| *x > 0.0) {
                return None;
            }
            let g = match Params::with_values(model, v) {
                Params::BgNbd(p) => bgnbd::log_likelihood(&p, data).1,
                Params::MbgNbd(p) => mbgnbd::log_likelihood(&p, data).1,
                Params::ParetoNbd(p) => {
                    pareto_nbd::log_likelihood(&p, data, points.as_ref()?)
                        .ok()?
                        .1
                }
            };
            Some(g.to_vec())
        };
        let se = standard_errors(grad, &self.values())?;
        Ok([se[0], se[1], se[2], se[3]])
    }
}

/// The number of parameters (for AIC and BIC).
pub const PARAMETERS: f64 = 4.0;

/// Akaike's and Schwarz's information criteria of a fit.
pub fn aic_bic(log_likelihood: f64, customers: u64) -> (f64, f64) {
    (
        2.0 * PARAMETERS - 2.0 * log_likelihood,
        PARAMETERS * (customers.max(1) as f64).ln() - 2.0 * log_likelihood,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::steps::clv::models::bgnbd::compress;
    use crate::steps::clv::models::simulate::simulate;

    fn truths() -> [Params; 3] {
        [
            Params::BgNbd(bgnbd::Params {
                r: 0.25,
                alpha: 4.0,
                a: 0.8,
                b: 2.5,
            }),
            Params::MbgNbd(mbgnbd::Params {
                r: 0.5,
                alpha: 6.0,
                a: 0.9,
                b: 1.6,
            }),
            Params::ParetoNbd(pareto_nbd::Params {
                r: 0.55,
                alpha: 10.0,
                s: 0.6,
                beta: 12.0,
            }),
        ]
    }

    /// The inverse of a small symmetric matrix by Gauss-Jordan elimination (independent of the
    /// Cholesky code under test).
    fn inverse(mut m: Vec<Vec<f64>>) -> Vec<Vec<f64>> {
        let n = m.len();
        let mut inv: Vec<Vec<f64>> = (0..n)
            .map(|i| (0..n).map(|j| if i == j { 1.0 } else { 0.0 }).collect())
            .collect();
        for c in 0..n {
            let p = (c..n)
                .max_by(|a, b| m[*a][c].abs().total_cmp(&m[*b][c].abs()))
                .unwrap();
            m.swap(c, p);
            inv.swap(c, p);
            let d = m[c][c];
            for j in 0..n {
                m[c][j] /= d;
                inv[c][j] /= d;
            }
            for i in 0..n {
                if i != c {
                    let f = m[i][c];
                    for j in 0..n {
                        m[i][j] -= f * m[c][j];
                        inv[i][j] -= f * inv[c][j];
                    }
                }
            }
        }
        inv
    }

    /// Standard errors from second differences of the log-likelihood's value alone (no
    /// gradient), against the ones from differences of the analytic gradient.
    #[test]
    fn standard_errors_equal_the_observed_information_from_likelihood_values() {
        for (k, truth) in truths().iter().enumerate() {
            let data = compress(simulate(truth, 8_000, 20 + k as u64));
            let fit = truth.model().fit(&data, None).unwrap();
            let se = fit.params.standard_errors(&data).unwrap();
            let theta = fit.params.values();
            let ll = |v: [f64; 4]| {
                Params::with_values(truth.model(), v)
                    .log_likelihood(&data)
                    .unwrap()
                    .0
            };
            let h: Vec<f64> = theta.iter().map(|t| 1e-3 * t).collect();
            let mut info = vec![vec![0.0; 4]; 4];
            for i in 0..4 {
                for j in 0..4 {
                    let at = |di: f64, dj: f64| {
                        let mut v = theta;
                        v[i] += di * h[i];
                        v[j] += dj * h[j];
                        ll(v)
                    };
                    info[i][j] = -(at(1.0, 1.0) - at(1.0, -1.0) - at(-1.0, 1.0) + at(-1.0, -1.0))
                        / (4.0 * h[i] * h[j]);
                }
            }
            let inv = inverse(info);
            for i in 0..4 {
                let want = inv[i][i].sqrt();
                assert!(
                    ((se[i] - want) / want).abs() < 2e-3,
                    "{} {}: {} vs {want}",
                    truth.model().title(),
                    truth.model().param_names()[i],
                    se[i]
                );
            }
        }
    }

    /// Over repeated simulations the estimates spread as the standard errors say.
    #[test]
    fn standard_errors_match_the_spread_of_estimates_over_simulations() {
        for (k, truth) in truths().iter().enumerate() {
            let reps = 30;
            let mut estimates = Vec::new();
            let mut errors = Vec::new();
            for rep in 0..reps {
                let data = compress(simulate(truth, 4_000, 1000 * (k as u64 + 1) + rep));
                let fit = truth.model().fit(&data, None).unwrap();
                errors.push(fit.params.standard_errors(&data).unwrap());
                estimates.push(fit.params.values());
            }
            for i in 0..4 {
                let mean = estimates.iter().map(|e| e[i]).sum::<f64>() / reps as f64;
                let sd = (estimates.iter().map(|e| (e[i] - mean).powi(2)).sum::<f64>()
                    / (reps - 1) as f64)
                    .sqrt();
                let se = errors.iter().map(|e| e[i]).sum::<f64>() / reps as f64;
                // 30 draws: the sample SD is within about ±35 % of the truth at 95 %.
                assert!(
                    (0.6..1.6).contains(&(sd / se)),
                    "{} {}: spread {sd}, mean standard error {se}",
                    truth.model().title(),
                    truth.model().param_names()[i]
                );
            }
        }
    }

    #[test]
    fn every_model_recovers_its_parameters_and_beats_the_truths_likelihood() {
        for (k, truth) in truths().iter().enumerate() {
            let data = compress(simulate(truth, 20_000, 40 + k as u64));
            let fit = truth.model().fit(&data, None).unwrap();
            let se = fit.params.standard_errors(&data).unwrap();
            let (got, want) = (fit.params.values(), truth.values());
            for i in 0..4 {
                assert!(
                    (got[i] - want[i]).abs() < 4.0 * se[i],
                    "{} {}: {} ± {}, true {}",
                    truth.model().title(),
                    truth.model().param_names()[i],
                    got[i],
                    se[i],
                    want[i]
                );
            }
            let at_truth = truth.log_likelihood(&data).unwrap().0;
            assert!(fit.log_likelihood >= at_truth - 1e-6);
        }
    }

    /// The shared prediction gives exactly what P(alive) and the expectations give alone.
    #[test]
    fn predict_many_equals_p_alive_and_expected_purchases_alone() {
        let ts = [4.0, 26.0, 52.0];
        for truth in truths() {
            for h in [
                History {
                    x: 0.0,
                    t_x: 0.0,
                    t: 30.0,
                },
                History {
                    x: 4.0,
                    t_x: 21.0,
                    t: 40.0,
                },
            ] {
                let (mut shared, mut alone) = ([0.0; 3], [0.0; 3]);
                let alive = truth.predict_many(&h, &ts, &mut shared).unwrap();
                truth.expected_purchases_many(&h, &ts, &mut alone).unwrap();
                assert_eq!(
                    alive,
                    truth.p_alive(&h).unwrap(),
                    "{}",
                    truth.model().title()
                );
                assert_eq!(shared, alone, "{}", truth.model().title());
            }
        }
    }

    #[test]
    fn all_one_time_buyers_and_one_customer_are_clear_errors_or_numbers() {
        let one_timers = compress((0..50).map(|i| History {
            x: 0.0,
            t_x: 0.0,
            t: 5.0 + i as f64,
        }));
        for model in Model::ALL {
            assert_eq!(
                model.fit(&one_timers, None).unwrap_err(),
                FitError::NoRepeats
            );
            match model.fit(
                &compress([History {
                    x: 2.0,
                    t_x: 9.0,
                    t: 20.0,
                }]),
                None,
            ) {
                Ok(f) => assert!(f.log_likelihood.is_finite(), "{}", model.title()),
                Err(e) => assert!(
                    matches!(e, FitError::NotIdentified(_)),
                    "{}: {e}",
                    model.title()
                ),
            }
        }
    }
}
