use super::*;
use crate::steps::clv::models::bgnbd::compress;
use crate::steps::clv::models::simulate::simulate;
use crate::steps::clv::models::transaction::{Model, Params as AnyParams};

/// lifetimes 0.11.3's fit on CDNOW (weeks), as the issue gives it.
const CDNOW: Params = Params {
    r: 0.553278,
    alpha: 10.577823,
    s: 0.606236,
    beta: 11.668713,
};

fn h(x: f64, t_x: f64, t: f64) -> History {
    History { x, t_x, t }
}

/// The likelihood written as the integral it comes from, summed by Simpson's rule on a log
/// scale of the time: C · [(α+T)^−(r+x) (β+T)^−s + s ∫_{t_x}^T (α+τ)^−(r+x) (β+τ)^−(s+1) dτ].
/// Independent of the hypergeometric algebra (both branches, Euler's transformation).
fn likelihood_by_integration(p: &Params, h: &History) -> f64 {
    let Params { r, alpha, s, beta } = *p;
    let (x, t_x, t) = (h.x, h.t_x, h.t);
    let c = super::super::special::ln_gamma(r + x) - super::super::special::ln_gamma(r)
        + r * alpha.ln()
        + s * beta.ln();
    let alive = -(r + x) * (alpha + t).ln() - s * (beta + t).ln();
    // τ = e^u − α, u from ln(α+t_x) to ln(α+T): dτ = e^u du.
    let (u0, u1) = ((alpha + t_x).ln(), (alpha + t).ln());
    let f = |u: f64| {
        let tau = u.exp() - alpha;
        (-(r + x) * u - (s + 1.0) * (beta + tau).ln() + u).exp()
    };
    let n = 400_000;
    let step = (u1 - u0) / n as f64;
    let mut sum = f(u0) + f(u1);
    for i in 1..n {
        sum += f(u0 + i as f64 * step) * if i % 2 == 1 { 4.0 } else { 2.0 };
    }
    let integral = sum * step / 3.0;
    (c + (alive.exp() + s * integral).ln()).exp()
}

fn close(got: f64, want: f64, rel: f64) {
    assert!(
        ((got - want) / want).abs() < rel,
        "got {got}, want {want} (relative {:.2e})",
        ((got - want) / want).abs()
    );
}

#[test]
fn published_values() {
    let c = h(26.0, 30.85714, 31.0);
    // 4 significant digits, as published.
    close(expected_purchases(&CDNOW, &c, 52.0).unwrap(), 25.455, 5e-5);
    close(p_alive(&CDNOW, &c).unwrap(), 0.99787, 5e-6);
}

#[test]
fn likelihood_equals_its_integral_form_on_both_branches_and_near_z_one() {
    let cases = [
        (CDNOW, h(2.0, 30.43, 38.86)),
        (CDNOW, h(0.0, 0.0, 38.86)),
        (CDNOW, h(26.0, 30.85714, 31.0)),
        // α > β: the other branch.
        (
            Params {
                r: 0.8,
                alpha: 20.0,
                s: 0.5,
                beta: 3.0,
            },
            h(4.0, 10.0, 60.0),
        ),
        // z = (β − α)/(β + t_x) near 1: a slow series.
        (
            Params {
                r: 1.2,
                alpha: 0.5,
                s: 0.9,
                beta: 80.0,
            },
            h(1.0, 0.2, 50.0),
        ),
        (
            Params {
                r: 0.3,
                alpha: 60.0,
                s: 2.0,
                beta: 0.4,
            },
            h(0.0, 0.0, 100.0),
        ),
    ];
    for (p, c) in cases {
        let (ll, _) = ll_one(&p, &c).unwrap();
        close(ll.exp(), likelihood_by_integration(&p, &c), 1e-9);
    }
}

#[test]
fn gradient_matches_finite_differences() {
    for (p, c) in [
        (CDNOW, h(3.0, 20.5, 38.0)),
        (CDNOW, h(0.0, 0.0, 30.0)),
        (
            Params {
                r: 0.8,
                alpha: 20.0,
                s: 0.5,
                beta: 3.0,
            },
            h(4.0, 10.0, 60.0),
        ),
    ] {
        let (_, g) = ll_one(&p, &c).unwrap();
        let v = [p.r, p.alpha, p.s, p.beta];
        for i in 0..4 {
            let step = 1e-6 * v[i];
            let at = |d: f64| {
                let mut w = v;
                w[i] += d;
                ll_one(
                    &Params {
                        r: w[0],
                        alpha: w[1],
                        s: w[2],
                        beta: w[3],
                    },
                    &c,
                )
                .unwrap()
                .0
            };
            let fd = (at(step) - at(-step)) / (2.0 * step);
            assert!(
                (g[i] - fd).abs() < 1e-6 * fd.abs().max(1.0),
                "{i}: {} vs {fd}",
                g[i]
            );
        }
    }
}

#[test]
fn grouped_likelihood_equals_the_sum_of_single_ones() {
    let data = compress(simulate(&AnyParams::ParetoNbd(CDNOW), 30_000, 3));
    let (ll, g) = log_likelihood(&CDNOW, &data, &Points::of(&data)).unwrap();
    let (mut ll0, mut g0) = (0.0, [0.0; 4]);
    for (c, w) in &data {
        let (l, gi) = ll_one(&CDNOW, c).unwrap();
        ll0 += w * l;
        for i in 0..4 {
            g0[i] += w * gi[i];
        }
    }
    close(ll, ll0, 1e-12);
    for i in 0..4 {
        assert!(
            (g[i] - g0[i]).abs() <= 1e-8 * g0[i].abs().max(1.0),
            "{g:?} vs {g0:?}"
        );
    }
}

#[test]
fn fitting_recovers_simulated_parameters() {
    let truth = Params {
        r: 0.55,
        alpha: 10.0,
        s: 0.6,
        beta: 12.0,
    };
    let data = compress(simulate(&AnyParams::ParetoNbd(truth), 20_000, 11));
    let fit = fit(&data).unwrap();
    let fitted = AnyParams::ParetoNbd(fit.params);
    let se = fitted.standard_errors(&data).unwrap();
    let got = fitted.values();
    let want = [truth.r, truth.alpha, truth.s, truth.beta];
    for i in 0..4 {
        assert!(
            (got[i] - want[i]).abs() < 4.0 * se[i],
            "{}: fitted {} ± {}, true {} ({fit:?})",
            Model::ParetoNbd.param_names()[i],
            got[i],
            se[i],
            want[i]
        );
    }
    let at_truth = log_likelihood(&truth, &data, &Points::of(&data)).unwrap().0;
    assert!(
        fit.log_likelihood >= at_truth - 1e-6,
        "{} < {at_truth}",
        fit.log_likelihood
    );
}

#[test]
fn extreme_histories_give_numbers_never_nan() {
    for c in [
        h(3000.0, 1039.0, 1040.0), // x in the thousands, T of 20 years
        h(0.0, 0.0, 1040.0),
        h(5.0, 1.0, 1040.0),
        h(1.0, 0.01, 0.02),
    ] {
        let (ll, g) = ll_one(&CDNOW, &c).unwrap();
        assert!(
            ll.is_finite() && g.iter().all(|v| v.is_finite()),
            "{c:?}: {ll} {g:?}"
        );
        let pa = p_alive(&CDNOW, &c).unwrap();
        assert!((0.0..=1.0).contains(&pa), "{c:?}: {pa}");
        let e = expected_purchases(&CDNOW, &c, 52.0).unwrap();
        assert!(e.is_finite() && e >= 0.0, "{c:?}: {e}");
    }
    // s = 1 exactly: the limit, not 0/0.
    let p1 = Params { s: 1.0, ..CDNOW };
    let near = Params {
        s: 1.0 + 1e-6,
        ..CDNOW
    };
    let c = h(4.0, 20.0, 30.0);
    close(
        expected_purchases(&p1, &c, 52.0).unwrap(),
        expected_purchases(&near, &c, 52.0).unwrap(),
        1e-5,
    );
}

#[test]
fn data_that_cannot_be_fitted_is_refused_or_fitted_never_nan() {
    assert_eq!(fit(&[]).unwrap_err(), FitError::Empty);
    let one_timers = compress((0..100).map(|i| h(0.0, 0.0, 10.0 + i as f64)));
    assert_eq!(fit(&one_timers).unwrap_err(), FitError::NoRepeats);
    match fit(&compress([h(3.0, 20.0, 30.0)])) {
        Ok(f) => assert!(f.log_likelihood.is_finite()),
        Err(e) => assert!(matches!(e, FitError::NotIdentified(_)), "{e}"),
    }
}
