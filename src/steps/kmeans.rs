//! The `kmeans` step: customer segments from chosen numeric features.
//!
//! Features are log-transformed (ln(1 + x); they must be ≥ 0) and standardised (z-score), then
//! clustered by k-means++ seeded from `seed` (same input and seed → same clusters) with Lloyd
//! iterations, best of 3 starts. With `k: auto`, k in 2..=k_max is chosen by the mean silhouette
//! on a seeded sample of up to `sample` rows. Clusters are numbered 1..k by the mean of the
//! `value` feature, highest first, so cluster 1 is the most valuable in every run.
//!
//! Registers `<step>` (run_date, id, cluster) and `<step>_profile` (run_date, cluster, size,
//! share, mean of every feature in its original units, silhouette of the chosen k).

use std::sync::Arc;
use std::time::Instant;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, Date32Array, Float64Array, Int64Array, RecordBatch,
};
use datafusion::arrow::datatypes::{DataType, Field, Float64Type, Int64Type, Schema, SchemaRef};
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::config::{KmeansK, KmeansSpec};
use crate::error::{Error, Result};
use crate::steps::sql::StepOutcome;

pub fn output_schema(spec: &KmeansSpec) -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("run_date", DataType::Date32, false),
        Field::new(&spec.id, DataType::Int64, false),
        Field::new("cluster", DataType::Int64, false),
    ]))
}

pub fn profile_schema(spec: &KmeansSpec) -> SchemaRef {
    let mut fields = vec![
        Field::new("run_date", DataType::Date32, false),
        Field::new("cluster", DataType::Int64, false),
        Field::new("size", DataType::Int64, false),
        Field::new("share", DataType::Float64, false),
    ];
    fields.extend(
        spec.features
            .iter()
            .map(|f| Field::new(format!("mean_{f}"), DataType::Float64, false)),
    );
    fields.push(Field::new("silhouette", DataType::Float64, false));
    Arc::new(Schema::new(fields))
}

fn register(
    ctx: &SessionContext,
    name: &str,
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
) -> Result<()> {
    let parts = if batches.is_empty() {
        vec![vec![]]
    } else {
        vec![batches]
    };
    let table =
        MemTable::try_new(schema, parts).map_err(|e| Error::df(format!("register `{name}`"), e))?;
    ctx.register_table(name, Arc::new(table))
        .map_err(|e| Error::df(format!("register `{name}`"), e))?;
    Ok(())
}

/// For `validate`: checks `from` has the columns, registers empty result tables.
pub async fn plan(
    ctx: &SessionContext,
    name: &str,
    spec: &KmeansSpec,
) -> std::result::Result<(), String> {
    let table = ctx
        .table(spec.from.as_str())
        .await
        .map_err(|e| format!("`{}`: {e}", spec.from))?;
    let schema = table.schema();
    let missing: Vec<&str> = std::iter::once(&spec.id)
        .chain(&spec.features)
        .filter(|c| schema.field_with_unqualified_name(c).is_err())
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "`{}` has no column(s) {}",
            spec.from,
            missing.join(", ")
        ));
    }
    register(ctx, name, output_schema(spec), vec![]).map_err(|e| e.to_string())?;
    register(
        ctx,
        &format!("{name}_profile"),
        profile_schema(spec),
        vec![],
    )
    .map_err(|e| e.to_string())?;
    Ok(())
}

/// Clustering of standardised points.
#[derive(Debug, Clone)]
pub struct Clustering {
    pub assignment: Vec<usize>,
    pub centroids: Vec<Vec<f64>>,
    pub inertia: f64,
}

fn dist2(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// k-means++ then Lloyd iterations; best of `starts` by inertia. Deterministic for a seed.
pub fn kmeans(points: &[Vec<f64>], k: usize, seed: u64, starts: usize) -> Clustering {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut best: Option<Clustering> = None;
    for _ in 0..starts.max(1) {
        let c = lloyd(points, plus_plus(points, k, &mut rng));
        if best.as_ref().is_none_or(|b| c.inertia < b.inertia) {
            best = Some(c);
        }
    }
    best.unwrap_or(Clustering {
        assignment: vec![0; points.len()],
        centroids: vec![],
        inertia: 0.0,
    })
}

fn plus_plus(points: &[Vec<f64>], k: usize, rng: &mut StdRng) -> Vec<Vec<f64>> {
    let mut centroids = vec![points[rng.random_range(0..points.len())].clone()];
    let mut d: Vec<f64> = points.iter().map(|p| dist2(p, &centroids[0])).collect();
    while centroids.len() < k {
        let total: f64 = d.iter().sum();
        let next = if total <= 0.0 {
            rng.random_range(0..points.len())
        } else {
            let mut u = rng.random::<f64>() * total;
            let mut pick = points.len() - 1;
            for (i, di) in d.iter().enumerate() {
                u -= di;
                if u <= 0.0 {
                    pick = i;
                    break;
                }
            }
            pick
        };
        centroids.push(points[next].clone());
        let c = &centroids[centroids.len() - 1];
        for (di, p) in d.iter_mut().zip(points) {
            *di = di.min(dist2(p, c));
        }
    }
    centroids
}

fn nearest(p: &[f64], centroids: &[Vec<f64>]) -> (usize, f64) {
    let mut best = (0, f64::INFINITY);
    for (j, c) in centroids.iter().enumerate() {
        let d = dist2(p, c);
        if d < best.1 {
            best = (j, d);
        }
    }
    best
}

fn lloyd(points: &[Vec<f64>], mut centroids: Vec<Vec<f64>>) -> Clustering {
    let dims = points.first().map_or(0, Vec::len);
    let mut assignment = vec![usize::MAX; points.len()];
    let mut inertia = 0.0;
    for _ in 0..100 {
        let mut changed = 0usize;
        inertia = 0.0;
        for (a, p) in assignment.iter_mut().zip(points) {
            let (j, d) = nearest(p, &centroids);
            inertia += d;
            if *a != j {
                *a = j;
                changed += 1;
            }
        }
        let mut sums = vec![vec![0.0; dims]; centroids.len()];
        let mut counts = vec![0usize; centroids.len()];
        for (a, p) in assignment.iter().zip(points) {
            counts[*a] += 1;
            for (s, v) in sums[*a].iter_mut().zip(p) {
                *s += v;
            }
        }
        for (j, c) in centroids.iter_mut().enumerate() {
            if counts[j] > 0 {
                for (cv, s) in c.iter_mut().zip(&sums[j]) {
                    *cv = s / counts[j] as f64;
                }
            }
        }
        // Converged: no point (or, on large data, fewer than 1 in 10,000) changed cluster.
        if changed <= points.len() / 10_000 {
            break;
        }
    }
    Clustering {
        assignment,
        centroids,
        inertia,
    }
}

/// Mean silhouette of a clustering (O(n²): used on samples).
pub fn silhouette(points: &[Vec<f64>], assignment: &[usize], k: usize) -> f64 {
    let n = points.len();
    if n < 2 || k < 2 {
        return 0.0;
    }
    let mut total = 0.0;
    for i in 0..n {
        let mut sum = vec![0.0; k];
        let mut cnt = vec![0usize; k];
        for j in 0..n {
            if i != j {
                sum[assignment[j]] += dist2(&points[i], &points[j]).sqrt();
                cnt[assignment[j]] += 1;
            }
        }
        let own = assignment[i];
        if cnt[own] == 0 {
            continue; // a singleton scores 0
        }
        let a = sum[own] / cnt[own] as f64;
        let b = (0..k)
            .filter(|c| *c != own && cnt[*c] > 0)
            .map(|c| sum[c] / cnt[c] as f64)
            .fold(f64::INFINITY, f64::min);
        if b.is_finite() {
            total += (b - a) / a.max(b).max(f64::MIN_POSITIVE);
        }
    }
    total / n as f64
}

/// Standardises log-transformed features; returns points and what is needed to undo nothing
/// (profiles are computed from the original values).
pub fn prepare(raw: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let n = raw.len().max(1) as f64;
    let dims = raw.first().map_or(0, Vec::len);
    let logged: Vec<Vec<f64>> = raw
        .iter()
        .map(|r| r.iter().map(|v| v.ln_1p()).collect())
        .collect();
    let mut mean = vec![0.0; dims];
    for r in &logged {
        for (m, v) in mean.iter_mut().zip(r) {
            *m += v / n;
        }
    }
    let mut sd = vec![0.0; dims];
    for r in &logged {
        for ((s, v), m) in sd.iter_mut().zip(r).zip(&mean) {
            *s += (v - m) * (v - m) / n;
        }
    }
    let sd: Vec<f64> = sd
        .into_iter()
        .map(|v| if v > 0.0 { v.sqrt() } else { 1.0 })
        .collect();
    logged
        .iter()
        .map(|r| {
            r.iter()
                .zip(&mean)
                .zip(&sd)
                .map(|((v, m), s)| (v - m) / s)
                .collect()
        })
        .collect()
}

/// Runs the step.
pub async fn run(
    ctx: &SessionContext,
    job: &str,
    name: &str,
    spec: &KmeansSpec,
    run_date: chrono::NaiveDate,
) -> Result<StepOutcome> {
    let started = Instant::now();
    let model_err = |message: String| Error::Model {
        job: job.to_string(),
        step: name.to_string(),
        message,
    };
    let cols: Vec<String> = spec
        .features
        .iter()
        .map(|f| format!("CAST(\"{f}\" AS DOUBLE)"))
        .collect();
    let sql = format!(
        "SELECT CAST(\"{}\" AS BIGINT), {} FROM \"{}\"",
        spec.id,
        cols.join(", "),
        spec.from
    );
    let step_err = |source| Error::Step {
        job: job.to_string(),
        step: name.to_string(),
        source,
    };
    let batches = ctx
        .sql(&sql)
        .await
        .map_err(step_err)?
        .collect()
        .await
        .map_err(step_err)?;
    let mut ids = Vec::new();
    let mut raw: Vec<Vec<f64>> = Vec::new();
    for b in &batches {
        let id = b.column(0).as_primitive::<Int64Type>();
        let feats: Vec<_> = (1..=spec.features.len())
            .map(|i| b.column(i).as_primitive::<Float64Type>())
            .collect();
        for i in 0..b.num_rows() {
            if id.is_null(i) || feats.iter().any(|f| f.is_null(i)) {
                return Err(model_err(format!(
                    "`{}` has a NULL id or feature; fill or filter it first",
                    spec.from
                )));
            }
            let row: Vec<f64> = feats.iter().map(|f| f.value(i)).collect();
            if let Some((j, v)) = row
                .iter()
                .enumerate()
                .find(|(_, v)| **v < 0.0 || !v.is_finite())
            {
                return Err(model_err(format!(
                    "feature `{}` has the value {v}; the log transform needs values ≥ 0",
                    spec.features[j]
                )));
            }
            ids.push(id.value(i));
            raw.push(row);
        }
    }
    let k_max = match spec.k {
        KmeansK::Fixed(k) => k,
        KmeansK::Auto(_) => spec.k_max,
    };
    if raw.len() < k_max.max(2) {
        return Err(model_err(format!(
            "{} rows cannot make {} clusters",
            raw.len(),
            k_max.max(2)
        )));
    }
    let points = prepare(&raw);
    // A seeded sample for choosing k and scoring the silhouette.
    let mut rng = StdRng::seed_from_u64(spec.seed ^ 0x5eed);
    let sample_idx: Vec<usize> = if points.len() <= spec.sample {
        (0..points.len()).collect()
    } else {
        let mut idx: Vec<usize> = (0..points.len()).collect();
        for i in 0..spec.sample {
            let j = rng.random_range(i..idx.len());
            idx.swap(i, j);
        }
        idx.truncate(spec.sample);
        idx.sort_unstable();
        idx
    };
    let sample: Vec<Vec<f64>> = sample_idx.iter().map(|i| points[*i].clone()).collect();
    let k = match spec.k {
        KmeansK::Fixed(k) => k,
        KmeansK::Auto(_) => {
            let mut best = (2, f64::NEG_INFINITY);
            for k in 2..=spec.k_max {
                let c = kmeans(&sample, k, spec.seed, 3);
                let s = silhouette(&sample, &c.assignment, k);
                if s > best.1 + 1e-12 {
                    best = (k, s);
                }
            }
            best.0
        }
    };
    // All rows start from the best centroids found on the sample (3 seeded k-means++ starts),
    // so the full data needs few Lloyd passes.
    let seeds = kmeans(&sample, k, spec.seed, 3).centroids;
    let clustering = lloyd(&points, seeds);
    let sample_assign: Vec<usize> = sample_idx
        .iter()
        .map(|i| clustering.assignment[*i])
        .collect();
    let sil = silhouette(&sample, &sample_assign, k);

    // Order clusters by the mean of the value feature, highest first.
    let value_col = spec
        .features
        .iter()
        .position(|f| *f == spec.value)
        .unwrap_or(0);
    let mut sums = vec![vec![0.0; spec.features.len()]; k];
    let mut sizes = vec![0usize; k];
    for (a, r) in clustering.assignment.iter().zip(&raw) {
        sizes[*a] += 1;
        for (s, v) in sums[*a].iter_mut().zip(r) {
            *s += v;
        }
    }
    let means: Vec<Vec<f64>> = sums
        .iter()
        .zip(&sizes)
        .map(|(s, n)| s.iter().map(|v| v / (*n).max(1) as f64).collect())
        .collect();
    let mut order: Vec<usize> = (0..k).collect();
    order.sort_by(|a, b| {
        means[*b][value_col]
            .partial_cmp(&means[*a][value_col])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(b))
    });
    let mut rank = vec![0i64; k];
    for (pos, c) in order.iter().enumerate() {
        rank[*c] = pos as i64 + 1;
    }

    let day = (run_date - chrono::NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default())
        .num_days() as i32;
    let n = ids.len();
    let out = RecordBatch::try_new(
        output_schema(spec),
        vec![
            Arc::new(Date32Array::from(vec![day; n])),
            Arc::new(Int64Array::from(ids)),
            Arc::new(Int64Array::from_iter_values(
                clustering.assignment.iter().map(|a| rank[*a]),
            )),
        ],
    )
    .map_err(|e| Error::Internal(e.to_string()))?;
    let bytes = out.get_array_memory_size();
    register(ctx, name, output_schema(spec), vec![out])?;

    let mut cols: Vec<ArrayRef> = vec![
        Arc::new(Date32Array::from(vec![day; k])),
        Arc::new(Int64Array::from_iter_values(1..=k as i64)),
        Arc::new(Int64Array::from_iter_values(
            order.iter().map(|c| sizes[*c] as i64),
        )),
        Arc::new(Float64Array::from_iter_values(
            order.iter().map(|c| sizes[*c] as f64 / n as f64),
        )),
    ];
    #[allow(clippy::needless_range_loop)] // f indexes the inner vectors, one column per feature
    for f in 0..spec.features.len() {
        cols.push(Arc::new(Float64Array::from_iter_values(
            order.iter().map(|c| means[*c][f]),
        )));
    }
    cols.push(Arc::new(Float64Array::from(vec![sil; k])));
    let profile = RecordBatch::try_new(profile_schema(spec), cols)
        .map_err(|e| Error::Internal(e.to_string()))?;
    register(
        ctx,
        &format!("{name}_profile"),
        profile_schema(spec),
        vec![profile],
    )?;
    Ok(StepOutcome {
        rows: n,
        bytes,
        elapsed: started.elapsed(),
        schema: output_schema(spec),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three well-separated blobs in 2-D.
    fn blobs(seed: u64) -> (Vec<Vec<f64>>, Vec<usize>) {
        let mut rng = StdRng::seed_from_u64(seed);
        let centres = [(0.0, 0.0), (10.0, 10.0), (-10.0, 10.0)];
        let mut pts = Vec::new();
        let mut truth = Vec::new();
        for i in 0..300 {
            let c = i % 3;
            pts.push(vec![
                centres[c].0 + rng.random::<f64>() - 0.5,
                centres[c].1 + rng.random::<f64>() - 0.5,
            ]);
            truth.push(c);
        }
        (pts, truth)
    }

    #[test]
    fn separable_blobs_are_recovered_exactly_and_k_is_found() {
        let (pts, truth) = blobs(1);
        let c = kmeans(&pts, 3, 7, 3);
        // Same partition up to renaming.
        for i in 0..pts.len() {
            for j in 0..pts.len() {
                assert_eq!(truth[i] == truth[j], c.assignment[i] == c.assignment[j]);
            }
        }
        let best = (2..=6).max_by(|a, b| {
            let sa = silhouette(&pts, &kmeans(&pts, *a, 7, 3).assignment, *a);
            let sb = silhouette(&pts, &kmeans(&pts, *b, 7, 3).assignment, *b);
            sa.partial_cmp(&sb).unwrap()
        });
        assert_eq!(best, Some(3));
    }

    #[test]
    fn same_seed_same_clusters() {
        let (pts, _) = blobs(2);
        let a = kmeans(&pts, 4, 11, 3);
        let b = kmeans(&pts, 4, 11, 3);
        assert_eq!(a.assignment, b.assignment);
    }
}
