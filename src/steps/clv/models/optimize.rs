//! A small L-BFGS minimiser with a backtracking (Armijo) line search that treats a non-finite
//! value as "too far" and shortens the step. Used on log-parameters, so every parameter stays
//! positive, and the models never see NaN from a wild step.
//!
//! The models have 3-4 parameters, so the minimiser starts from the inverse of a finite-
//! difference Hessian (n extra gradient evaluations) when that is positive definite: from a good
//! start (a refit on similar data) the first steps are then nearly Newton steps. Otherwise it
//! starts with a cautious steepest-descent step, as plain L-BFGS does.

/// The result of a minimisation.
#[derive(Debug, Clone)]
pub struct Minimum {
    pub x: Vec<f64>,
    pub value: f64,
    pub gradient_norm: f64,
    pub iterations: usize,
    pub converged: bool,
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn norm_inf(a: &[f64]) -> f64 {
    a.iter().fold(0.0, |m, v| m.max(v.abs()))
}

/// Minimises `f` (returning value and gradient) from `x0`.
pub fn lbfgs(
    f: impl Fn(&[f64]) -> (f64, Vec<f64>),
    x0: Vec<f64>,
    max_iter: usize,
    tol: f64,
) -> Minimum {
    const MEMORY: usize = 8;
    let n = x0.len();
    let mut x = x0;
    let (mut fx, mut g) = f(&x);
    let h0 = if fx.is_finite() {
        inverse_hessian(&f, &x, &g)
    } else {
        None
    };
    let mut s_hist: Vec<Vec<f64>> = Vec::new();
    let mut y_hist: Vec<Vec<f64>> = Vec::new();
    let mut iterations = 0;
    let mut converged = false;
    while iterations < max_iter {
        if !fx.is_finite() {
            break;
        }
        if norm_inf(&g) < tol {
            converged = true;
            break;
        }
        iterations += 1;
        // Two-loop recursion: d = −H g.
        let mut q = g.clone();
        let mut alphas = Vec::with_capacity(s_hist.len());
        for (s, y) in s_hist.iter().zip(&y_hist).rev() {
            let rho = 1.0 / dot(y, s);
            let a = rho * dot(s, &q);
            for i in 0..n {
                q[i] -= a * y[i];
            }
            alphas.push((a, rho));
        }
        if let Some(h) = &h0 {
            q = h.iter().map(|row| dot(row, &q)).collect();
        } else if let (Some(s), Some(y)) = (s_hist.last(), y_hist.last()) {
            let gamma = dot(s, y) / dot(y, y);
            for v in q.iter_mut() {
                *v *= gamma;
            }
        } else {
            // First step: a cautious steepest descent.
            let scale = 1.0 / norm_inf(&g).max(1.0);
            for v in q.iter_mut() {
                *v *= scale;
            }
        }
        for ((s, y), (a, rho)) in s_hist.iter().zip(&y_hist).zip(alphas.into_iter().rev()) {
            let b = rho * dot(y, &q);
            for i in 0..n {
                q[i] += s[i] * (a - b);
            }
        }
        let mut d: Vec<f64> = q.iter().map(|v| -v).collect();
        let mut slope = dot(&g, &d);
        if slope >= 0.0 || !slope.is_finite() {
            // Not a descent direction: reset the memory and go downhill.
            s_hist.clear();
            y_hist.clear();
            d = g.iter().map(|v| -v / norm_inf(&g).max(1.0)).collect();
            slope = dot(&g, &d);
        }
        // Backtracking line search.
        let mut step = 1.0;
        let mut accepted = None;
        for _ in 0..60 {
            let xn: Vec<f64> = x.iter().zip(&d).map(|(a, b)| a + step * b).collect();
            let (fn_, gn) = f(&xn);
            if fn_.is_finite()
                && gn.iter().all(|v| v.is_finite())
                && fn_ <= fx + 1e-4 * step * slope
            {
                accepted = Some((xn, fn_, gn));
                break;
            }
            step *= 0.5;
        }
        let Some((xn, fn_, gn)) = accepted else {
            // No decrease is possible along any step: we are at the minimum to machine precision.
            converged = norm_inf(&g) < tol.sqrt();
            break;
        };
        let s: Vec<f64> = xn.iter().zip(&x).map(|(a, b)| a - b).collect();
        let y: Vec<f64> = gn.iter().zip(&g).map(|(a, b)| a - b).collect();
        let improvement = fx - fn_;
        if dot(&s, &y) > 1e-12 {
            s_hist.push(s);
            y_hist.push(y);
            if s_hist.len() > MEMORY {
                s_hist.remove(0);
                y_hist.remove(0);
            }
        }
        x = xn;
        fx = fn_;
        g = gn;
        if improvement.abs() <= 1e-15 * (1.0 + fx.abs()) && norm_inf(&g) < tol.sqrt() {
            converged = true;
            break;
        }
    }
    Minimum {
        gradient_norm: norm_inf(&g),
        x,
        value: fx,
        iterations,
        converged,
    }
}

/// The inverse of the finite-difference Hessian of `f` at `x` (gradient `g`), if that is
/// finite and positive definite.
#[allow(clippy::needless_range_loop)] // matrix code reads best with indices
fn inverse_hessian(
    f: &impl Fn(&[f64]) -> (f64, Vec<f64>),
    x: &[f64],
    g: &[f64],
) -> Option<Vec<Vec<f64>>> {
    let n = x.len();
    let mut h = vec![vec![0.0; n]; n];
    for j in 0..n {
        let step = 1e-5 * x[j].abs().max(1.0);
        let mut xj = x.to_vec();
        xj[j] += step;
        let (_, gj) = f(&xj);
        for i in 0..n {
            h[i][j] = (gj.get(i)? - g[i]) / step;
        }
    }
    symmetric_inverse(h)
}

/// The inverse of `h` made symmetric (the mean of it and its transpose), if that is finite and
/// positive definite.
#[allow(clippy::needless_range_loop)] // matrix code reads best with indices
fn symmetric_inverse(mut h: Vec<Vec<f64>>) -> Option<Vec<Vec<f64>>> {
    let n = h.len();
    for i in 0..n {
        for j in 0..i {
            let m = 0.5 * (h[i][j] + h[j][i]);
            h[i][j] = m;
            h[j][i] = m;
        }
    }
    // Cholesky H = L Lᵀ; fails (None) unless positive definite.
    let mut l = vec![vec![0.0; n]; n];
    for i in 0..n {
        for j in 0..=i {
            let sum: f64 = (0..j).map(|k| l[i][k] * l[j][k]).sum();
            if i == j {
                let d = h[i][i] - sum;
                if !(d > 0.0 && d.is_finite()) {
                    return None;
                }
                l[i][j] = d.sqrt();
            } else {
                l[i][j] = (h[i][j] - sum) / l[j][j];
            }
        }
    }
    // H⁻¹ column by column: solve L y = e_c, then Lᵀ z = y.
    let mut inv = vec![vec![0.0; n]; n];
    for c in 0..n {
        let mut y = vec![0.0; n];
        for i in 0..n {
            let e = if i == c { 1.0 } else { 0.0 };
            y[i] = (e - (0..i).map(|k| l[i][k] * y[k]).sum::<f64>()) / l[i][i];
        }
        let mut z = vec![0.0; n];
        for i in (0..n).rev() {
            z[i] = (y[i] - (i + 1..n).map(|k| l[k][i] * z[k]).sum::<f64>()) / l[i][i];
        }
        for i in 0..n {
            inv[i][c] = z[i];
        }
    }
    inv.iter().flatten().all(|v| v.is_finite()).then_some(inv)
}

/// Standard errors of the maximum-likelihood estimates `theta`: the square roots of the
/// diagonal of the inverse observed information −∇²ℓ(θ). The Hessian is taken by central
/// differences of `grad`, the analytic gradient of the total log-likelihood in these
/// (natural) parameters (`None` where it cannot be computed). An information matrix that is
/// not positive definite (a flat direction, or not a maximum) is an error, never hidden.
pub fn standard_errors(
    grad: impl Fn(&[f64]) -> Option<Vec<f64>>,
    theta: &[f64],
) -> Result<Vec<f64>, String> {
    let n = theta.len();
    let mut info = vec![vec![0.0; n]; n];
    for j in 0..n {
        let step = 1e-4 * theta[j].abs().max(1e-8);
        let (mut up, mut down) = (theta.to_vec(), theta.to_vec());
        up[j] += step;
        down[j] -= step;
        let (gu, gd) = match (grad(&up), grad(&down)) {
            (Some(u), Some(d)) if u.len() == n && d.len() == n => (u, d),
            _ => return Err("the gradient could not be computed next to the optimum".into()),
        };
        for i in 0..n {
            info[i][j] = -(gu[i] - gd[i]) / (2.0 * step);
        }
    }
    let inv = symmetric_inverse(info).ok_or_else(|| {
        "the observed information matrix is not positive definite (the likelihood is flat, or not at a maximum, in some direction): no standard errors".to_string()
    })?;
    Ok((0..n).map(|i| inv[i][i].sqrt()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rosenbrock() {
        let f = |x: &[f64]| {
            let (a, b) = (x[0], x[1]);
            let v = (1.0 - a).powi(2) + 100.0 * (b - a * a).powi(2);
            let g = vec![
                -2.0 * (1.0 - a) - 400.0 * a * (b - a * a),
                200.0 * (b - a * a),
            ];
            (v, g)
        };
        let m = lbfgs(f, vec![-1.2, 1.0], 500, 1e-10);
        assert!(m.converged, "{m:?}");
        assert!(
            (m.x[0] - 1.0).abs() < 1e-6 && (m.x[1] - 1.0).abs() < 1e-6,
            "{m:?}"
        );
        // From near the minimum the Hessian start makes it a few Newton-like steps.
        let m = lbfgs(f, vec![1.01, 1.02], 500, 1e-10);
        assert!(m.converged && m.iterations <= 6, "{m:?}");
        assert!(
            (m.x[0] - 1.0).abs() < 1e-6 && (m.x[1] - 1.0).abs() < 1e-6,
            "{m:?}"
        );
    }
}
