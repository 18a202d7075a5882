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
        expected_purchases_many(&PUBLISHED, &h, &ts, &mut out).unwrap();
        for (t, got) in ts.iter().zip(&out) {
            let want = expected_purchases_direct(&PUBLISHED, &h, *t);
            assert!(
                ((got - want) / want).abs() < 1e-10,
                "{h:?} t={t}: {got} vs {want}"
            );
            let one = expected_purchases(&PUBLISHED, &h, *t).unwrap();
            assert!(((one - got) / got).abs() < 1e-13, "{one} vs {got}");
        }
    }
    // A buyer with thousands of purchases: the old direct series overflowed (its terms
    // build up (1−z)^(−(r+x)) ≈ e^1700 here); the transformed one matches mpmath's 50-digit evaluation of the
    // direct formula (78.585458423372086...: a 10-a-week buyer silent for a week is alive
    // with probability about 1/6).
    let frequent = History {
        x: 3000.0,
        t_x: 299.0,
        t: 300.0,
    };
    let e = expected_purchases(&PUBLISHED, &frequent, 52.0).unwrap();
    assert!(((e - 78.585_458_423_372_09) / e).abs() < 1e-9, "{e}");
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
        expected_purchases(&at_one, &h, 52.0).unwrap(),
        expected_purchases(&near, &h, 52.0).unwrap(),
    );
    assert!(
        v1.is_finite() && ((v1 - v2) / v2).abs() < 1e-3,
        "{v1} vs {v2}"
    );
    assert!(population_expected(&at_one, 52.0).unwrap().is_finite());
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
    assert!((warm.log_likelihood - cold.log_likelihood).abs() < 1e-6 * cold.log_likelihood.abs());
}

#[test]
fn published_values() {
    let h = History {
        x: 26.0,
        t_x: 30.85714,
        t: 31.0,
    };
    close(expected_purchases(&PUBLISHED, &h, 52.0).unwrap(), 25.75659);
    close(p_alive(&PUBLISHED, &h), 0.9688523);
    close(population_expected(&PUBLISHED, 52.0).unwrap(), 1.444004);
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
        .map(|(h, w)| population_expected(&p, h.t).unwrap() * w)
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
