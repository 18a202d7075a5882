//! Histories drawn from each transaction model's own story with known parameters: the
//! references the fits, standard errors and model selection are tested against.

use rand::{Rng, SeedableRng};
use rand_distr::{Beta, Distribution, Exp, Gamma};

use super::bgnbd::History;
use super::transaction::{Model, Params};

/// `n` customers of `model` with parameters `p` (in its order: r, α, a, b or r, α, s, β), ages
/// between 20 and 80 weeks in whole days.
pub fn simulate(p: &Params, n: usize, seed: u64) -> Vec<History> {
    simulate_split(p, n, seed, 0.0)
        .into_iter()
        .map(|(h, _)| h)
        .collect()
}

/// Like [`simulate`], each customer also followed for `holdout` more weeks: the calibration
/// history (up to its age T) and the purchases in (T, T + holdout].
pub fn simulate_split(p: &Params, n: usize, seed: u64, holdout: f64) -> Vec<(History, f64)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let [r, alpha, c, d] = p.values();
    let lam = Gamma::new(r, 1.0 / alpha).unwrap();
    (0..n)
        .map(|_| {
            let t = (rng.random_range(140..560) as f64) / 7.0;
            let l = lam.sample(&mut rng).max(1e-12);
            let gap = Exp::new(l).unwrap();
            // Purchase times after the first (at 0), up to T + holdout.
            let mut times = Vec::new();
            let mut now = 0.0;
            let end = t + holdout;
            match p.model() {
                Model::BgNbd | Model::MbgNbd => {
                    let q = Beta::new(c, d).unwrap().sample(&mut rng);
                    // MBG/NBD: the customer may drop out right after the first purchase.
                    let dead_at_once = p.model() == Model::MbgNbd && rng.random::<f64>() < q;
                    if !dead_at_once {
                        loop {
                            now += gap.sample(&mut rng);
                            if now > end {
                                break;
                            }
                            times.push(now);
                            if rng.random::<f64>() < q {
                                break;
                            }
                        }
                    }
                }
                Model::ParetoNbd => {
                    let mu = Gamma::new(c, 1.0 / d).unwrap().sample(&mut rng).max(1e-12);
                    let death = Exp::new(mu).unwrap().sample(&mut rng).min(end);
                    loop {
                        now += gap.sample(&mut rng);
                        if now > death {
                            break;
                        }
                        times.push(now);
                    }
                }
            }
            let before: Vec<f64> = times.iter().copied().filter(|x| *x <= t).collect();
            let x = before.len() as f64;
            let t_x = before.last().copied().unwrap_or(0.0);
            (History { x, t_x, t }, (times.len() - before.len()) as f64)
        })
        .collect()
}
