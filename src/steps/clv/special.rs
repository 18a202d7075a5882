//! Special functions the BTYD models need: ln Γ, digamma ψ, and the Gauss hypergeometric 2F1
//! for |z| < 1. Plain f64 implementations with known accuracy (tests compare with exact values).

use std::f64::consts::PI;

/// ln Γ(x) for x > 0 (Lanczos, g = 7, n = 9; relative error ~1e-15).
pub fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection.
        return (PI / (PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + G + 0.5;
    for (i, c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// ψ(x) = d/dx ln Γ(x) for x > 0 (recurrence to x ≥ 10, then the asymptotic series; ~1e-13).
pub fn digamma(mut x: f64) -> f64 {
    let mut acc = 0.0;
    while x < 10.0 {
        acc -= 1.0 / x;
        x += 1.0;
    }
    let inv = 1.0 / x;
    let inv2 = inv * inv;
    acc + x.ln()
        - 0.5 * inv
        - inv2
            * (1.0 / 12.0
                - inv2 * (1.0 / 120.0 - inv2 * (1.0 / 252.0 - inv2 * (1.0 / 240.0 - inv2 / 132.0))))
}

/// ln B(a, b).
pub fn ln_beta(a: f64, b: f64) -> f64 {
    ln_gamma(a) + ln_gamma(b) - ln_gamma(a + b)
}

/// 2F1(a, b; c; z) for 0 ≤ z < 1 by its power series (terms are summed until they no longer
/// change the sum; at most 100 000 terms, enough for z up to ~0.9999).
pub fn hyp2f1(a: f64, b: f64, c: f64, z: f64) -> f64 {
    let mut term = 1.0;
    let mut sum = 1.0;
    for n in 0..100_000 {
        let n = n as f64;
        term *= (a + n) * (b + n) / ((c + n) * (n + 1.0)) * z;
        sum += term;
        if term.abs() <= 1e-15 * sum.abs() {
            break;
        }
    }
    sum
}

/// 2F1(a, b; c; z) for several z at once (each 0 ≤ z < 1), written to `out`. The series' term
/// ratios depend on a, b and c only, so they are computed once for all z; the sum stops when
/// every z's term no longer changes its sum (the rule of [`hyp2f1`]).
pub fn hyp2f1_many(a: f64, b: f64, c: f64, zs: &[f64], out: &mut [f64]) {
    let mut term = vec![1.0; zs.len()];
    out.fill(1.0);
    for n in 0..100_000 {
        let n = n as f64;
        let ratio = (a + n) * (b + n) / ((c + n) * (n + 1.0));
        let mut done = true;
        for ((t, s), z) in term.iter_mut().zip(out.iter_mut()).zip(zs) {
            *t *= ratio * z;
            *s += *t;
            done &= t.abs() <= 1e-15 * s.abs();
        }
        if done {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_values() {
        assert!((ln_gamma(1.0)).abs() < 1e-14);
        assert!((ln_gamma(5.0) - 24f64.ln()).abs() < 1e-13);
        assert!((ln_gamma(0.5) - PI.sqrt().ln()).abs() < 1e-13);
        // ψ(1) = −γ (Euler–Mascheroni), ψ(1/2) = −γ − 2 ln 2.
        let euler = 0.577_215_664_901_532_9;
        assert!(
            (digamma(1.0) + euler).abs() < 1e-12,
            "{}",
            digamma(1.0) + euler
        );
        assert!((digamma(0.5) + euler + 2.0 * 2f64.ln()).abs() < 1e-12);
        // 2F1(1, 1; 2; z) = −ln(1 − z) / z.
        let z: f64 = 0.7;
        assert!((hyp2f1(1.0, 1.0, 2.0, z) + (1.0 - z).ln() / z).abs() < 1e-12);
        // 2F1(a, b; b; z) = (1 − z)^(−a).
        assert!((hyp2f1(0.7, 2.5, 2.5, 0.9) - 0.1f64.powf(-0.7)).abs() < 1e-11);
    }

    #[test]
    fn many_z_at_once_equal_one_at_a_time() {
        let zs = [0.01, 0.3, 0.5, 0.8, 0.95, 0.99];
        for (a, b, c) in [
            (0.25, 2.5, 2.3),
            (26.2, 28.4, 28.2),
            (1.0, 1.0, 2.0),
            (0.7, 2.5, 2.5),
        ] {
            let mut out = [0.0; 6];
            hyp2f1_many(a, b, c, &zs, &mut out);
            for (z, got) in zs.iter().zip(out) {
                let want = hyp2f1(a, b, c, *z);
                assert!(
                    ((got - want) / want).abs() < 1e-13,
                    "{a} {b} {c} {z}: {got} vs {want}"
                );
            }
        }
    }
}
