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

use super::rows::{Rows, appended_schema, date32, register};
use super::source::Source;
use super::spill::ResultWriter;
use super::{CheckContext, StepContext, StepOutcome};
use crate::config::Diagnostic;
use crate::config::steps::{KmeansK, KmeansSpec};
use crate::error::{Error, Result};
use algorithm::{Points, kmeans, lloyd_threads, prepare, silhouette};
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

    /// The features of `source` as raw points (row-major, in the source's order), each checked
    /// to be ≥ 0 and finite; the raw values of the `value` feature; and the seeded sample of
    /// rows (by id). One pass, holding only these.
    fn raw_points(
        &self,
        cx: &StepContext<'_>,
        source: &Source,
    ) -> Result<(Points, Vec<f64>, Vec<usize>)> {
        let spec = &self.spec;
        let input_err = |e: super::rows::ColumnError| {
            cx.model_err(format!("`{}`: {e}; fill or filter them first", spec.from))
        };
        let dims = spec.features.len();
        let n = source.rows();
        let value_col = self.value_col();
        let mut data = Vec::with_capacity(n * dims);
        let mut value = Vec::with_capacity(n);
        let mut sample = algorithm::SampleById::new(spec.sample, spec.seed);
        let mut seen = 0usize;
        let columns: Vec<&str> = std::iter::once(spec.id.as_str())
            .chain(spec.features.iter().map(String::as_str))
            .collect();
        source.each_rows(&columns, |rows| {
            for id in rows.integers(&spec.id).map_err(input_err)? {
                sample.push(id, seen);
                seen += 1;
            }
            let features = spec
                .features
                .iter()
                .map(|f| rows.floats(f, None).map_err(input_err))
                .collect::<Result<Vec<_>>>()?;
            for (f, values) in spec.features.iter().zip(&features) {
                if let Some(v) = values.iter().find(|v| !(**v >= 0.0 && v.is_finite())) {
                    return Err(cx.model_err(format!(
                        "feature `{f}` has the value {v}; the log transform needs values ≥ 0"
                    )));
                }
            }
            for i in 0..rows.len() {
                data.extend(features.iter().map(|f| f[i]));
            }
            value.extend_from_slice(&features[value_col]);
            Ok(())
        })?;
        Ok((Points::new(data, dims), value, sample.finish()))
    }

    /// The index of the `value` feature among the features.
    fn value_col(&self) -> usize {
        let spec = &self.spec;
        spec.features
            .iter()
            .position(|f| *f == spec.value)
            .unwrap_or(0)
    }

    /// Runs the step.
    pub async fn run(&self, cx: &StepContext<'_>) -> Result<StepOutcome> {
        let started = Instant::now();
        let spec = &self.spec;
        let source = Source::open(cx.session, &spec.from)
            .await
            .map_err(|e| cx.df_err(e))?;
        // The points (standardised in place), the raw value feature and the assignment: the
        // step's large buffers. The input itself is a step result held or spilled already.
        let buffers = source.rows() * (spec.features.len() * size_of::<f64>() + 8 + 8);
        let _memory = crate::steps::evict::reserve_evicting(
            cx.session,
            format!("kmeans step `{}`", cx.step.name),
            buffers,
            &[&spec.from],
        )
        .await
        .map_err(|e| cx.df_err(e))?;
        let (raw, value, sample_idx) = self.raw_points(cx, &source)?;
        let t_read = started.elapsed();
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
        let points = prepare(raw);
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
        let threads = std::thread::available_parallelism()
            .map_or(1, usize::from)
            .min(cx.session.state().config().target_partitions());
        let clustering = lloyd_threads(&points, seeds, threads);
        drop(points);
        let sample_assign: Vec<usize> = sample_idx
            .iter()
            .map(|i| clustering.assignment[*i])
            .collect();
        let sil = silhouette(&sample, &sample_assign, k);

        // Order clusters by the mean of the value feature, highest first.
        let mut value_sums = vec![crate::steps::exact::ExactSum::default(); k];
        let mut sizes = vec![0usize; k];
        for (a, v) in clustering.assignment.iter().zip(&value) {
            sizes[*a] += 1;
            value_sums[*a].add(*v);
        }
        drop(value);
        let value_means: Vec<f64> = value_sums
            .iter()
            .zip(&sizes)
            .map(|(s, n)| s.value() / (*n).max(1) as f64)
            .collect();
        let mut by_value: Vec<usize> = (0..k).collect();
        by_value.sort_by(|a, b| {
            value_means[*b]
                .partial_cmp(&value_means[*a])
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(a.cmp(b))
        });
        let mut rank = vec![0i64; k];
        for (pos, c) in by_value.iter().enumerate() {
            rank[*c] = pos as i64 + 1;
        }

        let t_fit = started.elapsed() - t_read;
        // Second pass: every row with its cluster appended, in the order of the first, and
        // each feature's sum per cluster for the profile.
        let day = date32(cx.run_date);
        let n = clustering.assignment.len();
        let schema = appended_schema(source.schema(), &[cluster_field()])
            .map_err(|e| cx.model_err(format!("`{}`: {e}", spec.from)))?;
        let mut sums = vec![vec![crate::steps::exact::ExactSum::default(); spec.features.len()]; k];
        let mut writer = ResultWriter::appending(cx, &source, schema)?;
        let features: Vec<&str> = spec.features.iter().map(String::as_str).collect();
        // When only the cluster is written, the features (for the profile) are all it reads.
        let read = writer.appends().then_some(features.as_slice());
        let mut offset = 0;
        source.scan(read, |part, b| {
            let m = b.num_rows();
            let assigned = clustering
                .assignment
                .get(offset..offset + m)
                .ok_or_else(|| {
                    Error::Internal(format!("`{}` gave more rows on the second read", spec.from))
                })?;
            let rows = Rows {
                schema: b.schema(),
                parts: vec![vec![b.clone()]],
            };
            for (j, f) in spec.features.iter().enumerate() {
                let values = rows
                    .floats(f, None)
                    .map_err(|e| cx.model_err(format!("`{}`: {e}", spec.from)))?;
                for (a, v) in assigned.iter().zip(values) {
                    sums[*a][j].add(v);
                }
            }
            let cluster: ArrayRef = Arc::new(Int64Array::from_iter_values(
                assigned.iter().map(|a| rank[*a]),
            ));
            offset += m;
            writer.push_appended(part, &b, day, vec![cluster])
        })?;
        if offset != n {
            return Err(Error::Internal(format!(
                "`{}` gave {offset} rows on the second read, {n} on the first",
                spec.from
            )));
        }
        drop(clustering);
        let kept = writer.finish().await?;
        let t_write = started.elapsed() - t_read - t_fit;
        let means: Vec<Vec<f64>> = sums
            .iter()
            .zip(&sizes)
            .map(|(s, n)| s.iter().map(|v| v.value() / (*n).max(1) as f64).collect())
            .collect();

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
            bytes: kept.held,
            spilled: kept.spilled,
            elapsed: started.elapsed(),
            timings: vec![
                ("read_ms", t_read),
                ("fit_ms", t_fit),
                ("write_ms", t_write),
            ],
        })
    }
}
