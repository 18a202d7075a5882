//! MBG/NBD (Batislam, Denizel & Filiztekin 2007): BG/NBD in which a customer may also drop out
//! right after the first purchase, at time 0, so one-time buyers get P(alive) < 1 (in BG/NBD
//! they are alive for sure, the model's best-known flaw).
//!
//! Per customer (x, t_x, T as in BG/NBD; parameters r, α of the purchase rate, a, b of the
//! drop-out probability):
//!   L = B(a, b+x+1)/B(a, b) · Γ(r+x) α^r / Γ(r) · [ (α+T)^−(r+x) + a/(b+x) · (α+t_x)^−(r+x) ]
//! for every x, x = 0 included. Its expectations are BG/NBD's with b + 1 in place of b and the
//! drop-out term present for x = 0 too ([`super::bgnbd`] computes both).

use super::bgnbd::{self, FitError, History};
use super::dual::Dual;
use super::special::SeriesError;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    pub r: f64,
    pub alpha: f64,
    pub a: f64,
    pub b: f64,
}

pub type Fit = super::Fit<Params>;

fn duals(p: &Params) -> [Dual; 4] {
    [
        Dual::var(p.r, 0),
        Dual::var(p.alpha, 1),
        Dual::var(p.a, 2),
        Dual::var(p.b, 3),
    ]
}

/// The terms that depend on x only: ln Γ(r+x) − ln Γ(r) + r ln α + ln B(a, b+x+1) − ln B(a, b)
/// and ln a − ln(b+x).
fn x_terms(d: &[Dual; 4], x: f64) -> (Dual, Dual) {
    let [r, alpha, a, b] = *d;
    let base = (r + x).ln_gamma() - r.ln_gamma()
        + r * alpha.ln()
        + (a + b).ln_gamma()
        + (b + x + 1.0).ln_gamma()
        - b.ln_gamma()
        - (a + b + x + 1.0).ln_gamma();
    (base, a.ln() - (b + x).ln())
}

fn ll_with(d: &[Dual; 4], h: &History, (base, drop): (Dual, Dual)) -> Dual {
    let [r, alpha, ..] = *d;
    let rx = r + h.x;
    let alive = -(rx * (alpha + h.t).ln());
    let dropped = drop - rx * (alpha + h.t_x).ln();
    base + alive.log_add_exp(dropped)
}

/// Log-likelihood of one history and its gradient with respect to (r, α, a, b).
pub fn ll_one(p: &Params, h: &History) -> (f64, [f64; 4]) {
    let d = duals(p);
    let l = ll_with(&d, h, x_terms(&d, h.x));
    (l.v, l.d)
}

/// Total log-likelihood of weighted histories (sorted by x, as [`bgnbd::compress`] gives them)
/// and its gradient.
pub fn log_likelihood(p: &Params, data: &[(History, f64)]) -> (f64, [f64; 4]) {
    let d = duals(p);
    super::par_sum(data, |chunk| {
        let mut total = Dual::c(0.0);
        let mut last_x = f64::NAN;
        let mut xt = (Dual::c(0.0), Dual::c(0.0));
        for (h, w) in chunk {
            if h.x != last_x {
                xt = x_terms(&d, h.x);
                last_x = h.x;
            }
            total = total + ll_with(&d, h, xt).scale(*w);
        }
        (total.v, total.d)
    })
}

/// Fits the model by maximum likelihood, starting from `start` when given.
pub fn fit_from(data: &[(History, f64)], start: Option<&Params>) -> Result<Fit, FitError> {
    let fit = bgnbd::fit_r_alpha_a_b(
        data,
        start.map(|p| [p.r, p.alpha, p.a, p.b]),
        |[r, alpha, a, b]| log_likelihood(&Params { r, alpha, a, b }, data),
    )?;
    Ok(fit.map(|[r, alpha, a, b]| Params { r, alpha, a, b }))
}

pub fn fit(data: &[(History, f64)]) -> Result<Fit, FitError> {
    fit_from(data, None)
}

/// BG/NBD's parameters whose expressions are this model's (b + 1 for b).
fn shifted(p: &Params) -> bgnbd::Params {
    bgnbd::Params {
        r: p.r,
        alpha: p.alpha,
        a: p.a,
        b: p.b + 1.0,
    }
}

/// P(alive | x, t_x, T) = 1 / (1 + a/(b+x) · ((α+T)/(α+t_x))^(r+x)), for x = 0 too.
pub fn p_alive(p: &Params, h: &History) -> f64 {
    let ln_ratio = (p.r + h.x) * ((p.alpha + h.t).ln() - (p.alpha + h.t_x).ln());
    1.0 / (1.0 + p.a / (p.b + h.x) * ln_ratio.exp())
}

/// E[Y(t) | x, t_x, T] for several horizons `ts`, written to `out`.
pub fn expected_purchases_many(
    p: &Params,
    h: &History,
    ts: &[f64],
    out: &mut [f64],
) -> Result<(), SeriesError> {
    bgnbd::expected_purchases_with(&shifted(p), h, ts, out, true)
}

pub fn expected_purchases(p: &Params, h: &History, t: f64) -> Result<f64, SeriesError> {
    let mut out = [0.0];
    expected_purchases_many(p, h, &[t], &mut out)?;
    Ok(out[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// lifetimes 0.11's `ModifiedBetaGeoFitter` expressions, written out independently (the
    /// direct hypergeometric form, not the transformed one used here).
    fn expected_direct(p: &Params, h: &History, t: f64) -> f64 {
        let Params { r, alpha, a, b } = *p;
        let History { x, t_x, t: big_t } = *h;
        let hyp =
            super::super::special::hyp2f1(r + x, b + x + 1.0, a + b + x, t / (alpha + big_t + t))
                .unwrap();
        let first = (a + b + x) / (a - 1.0);
        let second = 1.0 - hyp * ((alpha + big_t) / (alpha + t + big_t)).powf(r + x);
        first * second / (1.0 + a / (b + x) * ((alpha + big_t) / (alpha + t_x)).powf(r + x))
    }

    const P: Params = Params {
        r: 0.525,
        alpha: 6.183,
        a: 0.891,
        b: 1.614,
    };

    #[test]
    fn expectations_equal_the_direct_formula() {
        for h in [
            History {
                x: 0.0,
                t_x: 0.0,
                t: 38.86,
            },
            History {
                x: 2.0,
                t_x: 30.43,
                t: 38.86,
            },
            History {
                x: 7.0,
                t_x: 35.0,
                t: 38.0,
            },
        ] {
            for t in [1.0, 10.0, 39.0, 52.0] {
                let got = expected_purchases(&P, &h, t).unwrap();
                let want = expected_direct(&P, &h, t);
                assert!(
                    ((got - want) / want).abs() < 1e-10,
                    "{h:?} t={t}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn one_time_buyers_can_be_dead() {
        let h = History {
            x: 0.0,
            t_x: 0.0,
            t: 40.0,
        };
        let p = p_alive(&P, &h);
        // 1 / (1 + a/b · ((α+T)/α)^r)
        let want = 1.0 / (1.0 + P.a / P.b * ((P.alpha + 40.0) / P.alpha).powf(P.r));
        assert!((p - want).abs() < 1e-15 && p < 1.0, "{p}");
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let h = History {
            x: 3.0,
            t_x: 20.0,
            t: 35.0,
        };
        let (_, g) = ll_one(&P, &h);
        let v = [P.r, P.alpha, P.a, P.b];
        for i in 0..4 {
            let step = 1e-6 * v[i];
            let (mut up, mut down) = (v, v);
            up[i] += step;
            down[i] -= step;
            let at = |v: [f64; 4]| {
                ll_one(
                    &Params {
                        r: v[0],
                        alpha: v[1],
                        a: v[2],
                        b: v[3],
                    },
                    &h,
                )
                .0
            };
            let fd = (at(up) - at(down)) / (2.0 * step);
            assert!(
                (g[i] - fd).abs() < 1e-6 * fd.abs().max(1.0),
                "{i}: {} vs {fd}",
                g[i]
            );
        }
    }
}
