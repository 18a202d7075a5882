//! The `kmeans` step: customer segments from chosen numeric features.
//!
//! Features are log-transformed (ln(1 + x); they must be ≥ 0) and standardised (z-score), then
//! clustered by k-means++ seeded from `seed` (same input and seed → same clusters) with Lloyd
//! iterations, best of 3 starts ([`algorithm`]). With `k: auto`, k in 2..=k_max is chosen by the
//! mean silhouette on a seeded sample of up to `sample` rows. Clusters are numbered 1..k by the
//! mean of the `value` feature, highest first, so cluster 1 is the most valuable in every run.
//!
//! Registers `<step>`: the rows of `from` with `cluster` appended (and `run_date` when `from` has
//! none; the input's buffers are shared, not copied), and `<step>_profile` (run_date, cluster,
//! size, share, mean of every feature in its original units, silhouette of the chosen k).

pub mod algorithm;

use std::sync::Arc;
use std::time::Instant;

use super::rows::{Rows, append_columns, appended_schema, date32, register};
use super::{CheckContext, StepContext, StepOutcome};
use crate::config::Diagnostic;
use crate::config::steps::{KmeansK, KmeansSpec};
use crate::error::{Error, Result};
use algorithm::{Points, kmeans, lloyd, prepare, silhouette};
use datafusion::arrow::array::{ArrayRef, Date32Array, Float64Array, Int64Array, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};

/// A checked K-means step (`value` filled in: the last feature when not given).
#[derive(Debug, Clone, PartialEq)]
pub struct KmeansStep {
    pub spec: KmeansSpec,
}

fn cluster_field() -> Field {
    Field::new("cluster", DataType::Int64, false)
}

impl KmeansStep {
    pub fn check(
        spec: &KmeansSpec,
        cx: &CheckContext,
    ) -> std::result::Result<Self, Vec<Diagnostic>> {
        let mut diags = Vec::new();
        diags.extend(cx.check_table("kmeans.from", &spec.from));
        if spec.features.is_empty() {
            diags.push(cx.diag("kmeans.features", "list at least one feature column"));
        }
        if let KmeansK::Fixed(k) = spec.k
            && !(2..=50).contains(&k)
        {
            diags.push(cx.diag("kmeans.k", "`auto` or a number from 2 to 50"));
        }
        if !(2..=20).contains(&spec.k_max) {
            diags.push(cx.diag("kmeans.k_max", "a number from 2 to 20"));
        }
        if !spec.value.is_empty() && !spec.features.contains(&spec.value) {
            diags.push(cx.diag(
                "kmeans.value",
                format!("`{}` is not one of the features", spec.value),
            ));
        }
        if spec.sample < 100 {
            diags.push(cx.diag("kmeans.sample", "at least 100"));
        }
        if !diags.is_empty() {
            return Err(diags);
        }
        let mut spec = spec.clone();
        if spec.value.is_empty() {
            spec.value = spec.features.last().cloned().unwrap_or_default();
        }
        Ok(Self { spec })
    }

    fn profile_schema(&self) -> SchemaRef {
        let mut fields = vec![
            Field::new("run_date", DataType::Date32, false),
            Field::new("cluster", DataType::Int64, false),
            Field::new("size", DataType::Int64, false),
            Field::new("share", DataType::Float64, false),
        ];
        fields.extend(
            self.spec
                .features
                .iter()
                .map(|f| Field::new(format!("mean_{f}"), DataType::Float64, false)),
        );
        fields.push(Field::new("silhouette", DataType::Float64, false));
        Arc::new(Schema::new(fields))
    }

    /// For `validate`: checks `from` has the columns, registers empty result tables and returns
    /// them with their schemas.
    pub async fn declare(
        &self,
        cx: &StepContext<'_>,
    ) -> std::result::Result<Vec<(String, SchemaRef)>, String> {
        let spec = &self.spec;
        let columns: Vec<&str> = std::iter::once(spec.id.as_str())
            .chain(spec.features.iter().map(String::as_str))
            .collect();
        let schema =
            super::require_columns(cx.session, &spec.from, &columns, "the id and every feature")
                .await?;
        let out = appended_schema(&schema, &[cluster_field()])
            .map_err(|e| format!("`{}`: {e}", spec.from))?;
        let name = &cx.step.name;
        let tables = vec![
            (name.clone(), out),
            (format!("{name}_profile"), self.profile_schema()),
        ];
        for (table, schema) in &tables {
            register(cx.session, table, schema.clone(), vec![]).map_err(|e| e.to_string())?;
        }
        Ok(tables)
    }

    /// The features of `rows` as raw points (row-major, in the rows' order), each checked to be
    /// ≥ 0 and finite, and the ids.
    fn raw_points(&self, cx: &StepContext<'_>, rows: &Rows) -> Result<(Points, Vec<i64>)> {
        let spec = &self.spec;
        let input_err = |e: super::rows::ColumnError| {
            cx.model_err(format!("`{}`: {e}; fill or filter them first", spec.from))
        };
        let ids = rows.integers(&spec.id).map_err(input_err)?;
        let dims = spec.features.len();
        let mut data = vec![0.0; rows.len() * dims];
        for (j, f) in spec.features.iter().enumerate() {
            for (i, v) in rows
                .floats(f, None)
                .map_err(input_err)?
                .into_iter()
                .enumerate()
            {
                if v < 0.0 || !v.is_finite() {
                    return Err(cx.model_err(format!(
                        "feature `{f}` has the value {v}; the log transform needs values ≥ 0"
                    )));
                }
                data[i * dims + j] = v;
            }
        }
        Ok((Points::new(data, dims), ids))
    }

    /// Runs the step.
    pub async fn run(&self, cx: &StepContext<'_>) -> Result<StepOutcome> {
        let started = Instant::now();
        let spec = &self.spec;
        let rows = Rows::read(cx.session, &spec.from)
            .await
            .map_err(|e| cx.df_err(e))?;
        // The raw and the standardised points, the ids and the assignment: the step's large
        // buffers.
        let buffers = rows.len() * (2 * spec.features.len() * size_of::<f64>() + 8 + 8 + 8);
        let _memory = crate::engine::memory::reserve(
            cx.session,
            format!("kmeans step `{}`", cx.step.name),
            buffers,
        )
        .map_err(|e| cx.df_err(e))?;
        let (raw, ids) = self.raw_points(cx, &rows)?;
        let k_max = match spec.k {
            KmeansK::Fixed(k) => k,
            KmeansK::Auto(_) => spec.k_max,
        };
        if raw.len() < k_max.max(2) {
            return Err(cx.model_err(format!(
                "{} rows cannot make {} clusters",
                raw.len(),
                k_max.max(2)
            )));
        }
        let points = prepare(&raw);
        // A seeded sample for choosing k and scoring the silhouette, chosen by the ids (not the
        // rows' order, which changes from run to run) and taken in id order.
        let sample_idx = algorithm::sample_by_id(&ids, spec.sample, spec.seed);
        drop(ids);
        let sample = points.select(&sample_idx);
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
        // All rows start from the best centroids found on the sample (3 seeded k-means++
        // starts), so the full data needs few Lloyd passes.
        let seeds = kmeans(&sample, k, spec.seed, 3).centroids;
        let clustering = lloyd(&points, seeds);
        drop(points);
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
        let mut sums = vec![vec![crate::steps::exact::ExactSum::default(); spec.features.len()]; k];
        let mut sizes = vec![0usize; k];
        for (a, r) in clustering.assignment.iter().zip(raw.rows()) {
            sizes[*a] += 1;
            for (s, v) in sums[*a].iter_mut().zip(r) {
                s.add(*v);
            }
        }
        let means: Vec<Vec<f64>> = sums
            .iter()
            .zip(&sizes)
            .map(|(s, n)| s.iter().map(|v| v.value() / (*n).max(1) as f64).collect())
            .collect();
        let mut by_value: Vec<usize> = (0..k).collect();
        by_value.sort_by(|a, b| {
            means[*b][value_col]
                .partial_cmp(&means[*a][value_col])
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(a.cmp(b))
        });
        let mut rank = vec![0i64; k];
        for (pos, c) in by_value.iter().enumerate() {
            rank[*c] = pos as i64 + 1;
        }

        let day = date32(cx.run_date);
        let n = raw.len();
        let cluster: ArrayRef = Arc::new(Int64Array::from_iter_values(
            clustering.assignment.iter().map(|a| rank[*a]),
        ));
        let (schema, parts) = append_columns(&rows, day, vec![(cluster_field(), cluster)])?;
        let bytes = register(cx.session, &cx.step.name, schema, parts)?;

        let mut cols: Vec<ArrayRef> = vec![
            Arc::new(Date32Array::from(vec![day; k])),
            Arc::new(Int64Array::from_iter_values(1..=k as i64)),
            Arc::new(Int64Array::from_iter_values(
                by_value.iter().map(|c| sizes[*c] as i64),
            )),
            Arc::new(Float64Array::from_iter_values(
                by_value.iter().map(|c| sizes[*c] as f64 / n as f64),
            )),
        ];
        #[allow(clippy::needless_range_loop)] // f indexes the inner vectors, one column per feature
        for f in 0..spec.features.len() {
            cols.push(Arc::new(Float64Array::from_iter_values(
                by_value.iter().map(|c| means[*c][f]),
            )));
        }
        cols.push(Arc::new(Float64Array::from(vec![sil; k])));
        let profile = RecordBatch::try_new(self.profile_schema(), cols)
            .map_err(|e| Error::arrow("build the cluster profile", e))?;
        register(
            cx.session,
            &format!("{}_profile", cx.step.name),
            self.profile_schema(),
            vec![vec![profile]],
        )?;
        Ok(StepOutcome {
            rows: n,
            bytes,
            elapsed: started.elapsed(),
            timings: Vec::new(),
        })
    }
}
