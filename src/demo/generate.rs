//! A seeded generator of realistic order and customer exports, of any size.
//!
//! Purchasing follows the BG/NBD story (Fader, Hardie & Lee 2005): each customer buys at a
//! Poisson rate λ ~ Gamma(r, α) per week while alive, and after each repeat purchase drops out
//! with probability p ~ Beta(a, b). Spend is lognormal around a per-customer lognormal mean.
//! A small, controllable share of rows are returns (a negative line for an earlier order),
//! exact duplicates, or rows with a NULL customer id. Same options and seed: same bytes.
//!
//! It streams: customers are written as they are drawn, and a month's orders are written (as
//! files of at most `rows_per_file` rows) whenever the orders held reach `buffer_rows`, so its
//! memory does not grow with `--customers` (about 45 bytes a held row).
//!
//! Layout written under the target URL:
//! `orders/order_month=YYYY-MM/part-NNNNN.parquet` and `customers/part-NNNNN.parquet`.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use chrono::{Datelike, Duration as ChronoDuration, NaiveDate, NaiveDateTime};
use datafusion::arrow::array::{
    ArrayRef, Float64Array, Int64Array, StringArray, TimestampMicrosecondArray,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::arrow::record_batch::RecordBatch;
use object_store::{ObjectStoreExt, PutPayload};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Beta, Distribution, Exp, Gamma, LogNormal};

use crate::error::{Error, Result};
use crate::storage::Location;

/// What to generate. Rates are per order row.
#[derive(Debug, Clone)]
pub struct Options {
    pub customers: u64,
    pub seed: u64,
    /// First possible signup.
    pub start: NaiveDate,
    /// The export date: nothing happens on or after it.
    pub end: NaiveDate,
    /// BG/NBD parameters (rates per week).
    pub r: f64,
    pub alpha: f64,
    pub a: f64,
    pub b: f64,
    pub return_rate: f64,
    pub duplicate_rate: f64,
    pub null_id_rate: f64,
    pub rows_per_file: usize,
    /// Order rows held in memory before they are written.
    pub buffer_rows: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            customers: 20_000,
            seed: 42,
            start: NaiveDate::from_ymd_opt(2024, 1, 1).unwrap_or_default(),
            end: NaiveDate::from_ymd_opt(2026, 11, 22).unwrap_or_default(),
            r: 0.25,
            alpha: 4.0,
            a: 0.8,
            b: 2.5,
            return_rate: 0.02,
            duplicate_rate: 0.005,
            null_id_rate: 0.001,
            rows_per_file: 1_000_000,
            buffer_rows: 4_000_000,
        }
    }
}

/// What was written.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub customers: u64,
    pub order_rows: u64,
    pub files: usize,
    pub bytes: u64,
}

const ORDER_CHANNELS: [(&str, f64); 3] = [("web", 0.55), ("app", 0.35), ("store", 0.10)];
const ACQUISITION: [(&str, f64, f64); 5] = [
    ("paid_search", 0.30, 45.0),
    ("social", 0.25, 30.0),
    ("affiliate", 0.15, 25.0),
    ("referral", 0.10, 12.0),
    ("organic", 0.20, 2.0),
];

fn orders_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("customer_id", DataType::Int64, true),
        Field::new("order_id", DataType::Utf8, false),
        Field::new(
            "order_ts",
            DataType::Timestamp(TimeUnit::Microsecond, None),
            false,
        ),
        Field::new("amount", DataType::Float64, false),
        Field::new("channel", DataType::Utf8, false),
    ]))
}

fn customers_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("customer_id", DataType::Int64, false),
        Field::new(
            "signup_ts",
            DataType::Timestamp(TimeUnit::Microsecond, None),
            false,
        ),
        Field::new("acquisition_channel", DataType::Utf8, false),
        Field::new("acquisition_cost", DataType::Float64, false),
    ]))
}

/// One month's orders not written yet, and how many files of it were written.
#[derive(Default)]
struct Orders {
    customer_id: Vec<Option<i64>>,
    /// `o` and ten digits: formatted when written.
    order_seq: Vec<u64>,
    ts: Vec<i64>,
    amount: Vec<f64>,
    channel: Vec<u8>,
    files: usize,
}

impl Orders {
    fn push(&mut self, c: Option<i64>, seq: u64, ts: i64, amount: f64, ch: u8) {
        self.customer_id.push(c);
        self.order_seq.push(seq);
        self.ts.push(ts);
        self.amount.push(amount);
        self.channel.push(ch);
    }
    fn len(&self) -> usize {
        self.ts.len()
    }
    fn batch(&self, from: usize, to: usize) -> Result<RecordBatch> {
        let cols: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from(self.customer_id[from..to].to_vec())),
            Arc::new(StringArray::from_iter_values(
                self.order_seq[from..to].iter().map(|s| format!("o{s:010}")),
            )),
            Arc::new(TimestampMicrosecondArray::from(self.ts[from..to].to_vec())),
            Arc::new(Float64Array::from(self.amount[from..to].to_vec())),
            Arc::new(StringArray::from_iter_values(
                self.channel[from..to]
                    .iter()
                    .map(|&c| ORDER_CHANNELS[usize::from(c)].0),
            )),
        ];
        RecordBatch::try_new(orders_schema(), cols).map_err(|e| Error::arrow("build orders", e))
    }
    /// Writes the first `n` rows held, in files of at most `per_file` rows, and drops them.
    async fn write(
        &mut self,
        (y, mo): (i32, u32),
        n: usize,
        per_file: usize,
        target: &Location,
        summary: &mut Summary,
    ) -> Result<()> {
        let mut from = 0;
        while from < n {
            let to = (from + per_file).min(n);
            let batch = self.batch(from, to)?;
            let rel = format!(
                "orders/order_month={y:04}-{mo:02}/part-{:05}.parquet",
                self.files
            );
            summary.bytes += put_parquet(target, &rel, &batch).await?;
            summary.files += 1;
            summary.order_rows += (to - from) as u64;
            self.files += 1;
            from = to;
        }
        self.customer_id.drain(..n);
        self.order_seq.drain(..n);
        self.ts.drain(..n);
        self.amount.drain(..n);
        self.channel.drain(..n);
        Ok(())
    }
}

/// The customers drawn and not written yet, and how many files of them were written.
#[derive(Default)]
struct Customers {
    id: Vec<i64>,
    signup: Vec<i64>,
    channel: Vec<&'static str>,
    cost: Vec<f64>,
    files: usize,
}

impl Customers {
    async fn write(&mut self, target: &Location, summary: &mut Summary) -> Result<()> {
        if self.id.is_empty() {
            return Ok(());
        }
        let cols: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from(std::mem::take(&mut self.id))),
            Arc::new(TimestampMicrosecondArray::from(std::mem::take(
                &mut self.signup,
            ))),
            Arc::new(StringArray::from_iter_values(self.channel.drain(..))),
            Arc::new(Float64Array::from(std::mem::take(&mut self.cost))),
        ];
        let batch = RecordBatch::try_new(customers_schema(), cols)
            .map_err(|e| Error::arrow("build customers", e))?;
        let rel = format!("customers/part-{:05}.parquet", self.files);
        summary.bytes += put_parquet(target, &rel, &batch).await?;
        summary.files += 1;
        self.files += 1;
        Ok(())
    }
}

/// Writes held orders once `budget` rows are held: first every month's full files, then, if
/// more than half the budget is still held, everything.
async fn flush(
    by_month: &mut BTreeMap<(i32, u32), Orders>,
    budget: usize,
    per_file: usize,
    target: &Location,
    summary: &mut Summary,
) -> Result<()> {
    let held = |m: &BTreeMap<(i32, u32), Orders>| m.values().map(Orders::len).sum::<usize>();
    if held(by_month) < budget {
        return Ok(());
    }
    for (month, orders) in by_month.iter_mut() {
        let full = orders.len() / per_file * per_file;
        orders
            .write(*month, full, per_file, target, summary)
            .await?;
    }
    if held(by_month) > budget / 2 {
        for (month, orders) in by_month.iter_mut() {
            let n = orders.len();
            orders.write(*month, n, per_file, target, summary).await?;
        }
    }
    Ok(())
}

/// The index of an item drawn with probability `weight(item)` (the weights sum to 1).
fn pick<T>(rng: &mut StdRng, items: &[T], weight: impl Fn(&T) -> f64) -> usize {
    let mut u: f64 = rng.random();
    for (i, it) in items.iter().enumerate() {
        u -= weight(it);
        if u <= 0.0 {
            return i;
        }
    }
    items.len() - 1
}

fn micros(t: NaiveDateTime) -> i64 {
    t.and_utc().timestamp_micros()
}

fn dist_err(e: impl std::fmt::Display) -> Error {
    Error::Usage(format!("generator parameters: {e}"))
}

/// Generates the exports and writes them under `target`.
pub async fn generate(opts: &Options, target: &Location) -> Result<Summary> {
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let lambda = Gamma::new(opts.r, 1.0 / opts.alpha).map_err(dist_err)?;
    let drop = Beta::new(opts.a, opts.b).map_err(dist_err)?;
    let mean_spend = LogNormal::new(40f64.ln(), 0.6).map_err(dist_err)?;
    let spend_noise = LogNormal::new(-0.5 * 0.35f64.powi(2), 0.35).map_err(dist_err)?;
    let cac_noise = LogNormal::new(0.0, 0.3).map_err(dist_err)?;
    let start = opts.start.and_hms_opt(0, 0, 0).unwrap_or_default();
    let end = opts.end.and_hms_opt(0, 0, 0).unwrap_or_default();
    let span_secs = (end - start).num_seconds().max(1) as f64;
    let week = 7.0 * 86_400.0;

    let per_file = opts.rows_per_file.max(1);
    let budget = opts.buffer_rows.max(1);
    let mut summary = Summary {
        customers: opts.customers,
        ..Default::default()
    };
    let mut by_month: BTreeMap<(i32, u32), Orders> = BTreeMap::new();
    let mut customers = Customers::default();
    let mut order_seq: u64 = 0;

    for id in 1..=opts.customers as i64 {
        let signup = start + ChronoDuration::seconds((rng.random::<f64>() * span_secs) as i64);
        let (channel, _share, cac) = ACQUISITION[pick(&mut rng, &ACQUISITION, |a| a.1)];
        customers.id.push(id);
        customers.signup.push(micros(signup));
        customers.channel.push(channel);
        customers
            .cost
            .push((cac * cac_noise.sample(&mut rng) * 100.0).round() / 100.0);
        if customers.id.len() >= per_file {
            customers.write(target, &mut summary).await?;
        }

        let lam = lambda.sample(&mut rng).max(1e-9);
        let p = drop.sample(&mut rng);
        let m = mean_spend.sample(&mut rng);
        let gap = Exp::new(lam).map_err(dist_err)?;
        let mut t = signup;
        for n in 0..1000 {
            if n > 0 {
                // Compare before adding: a tiny rate draws gaps of millions of years.
                let gap_secs = gap.sample(&mut rng) * week;
                if gap_secs >= (end - t).num_seconds() as f64 {
                    break;
                }
                t += ChronoDuration::seconds(gap_secs as i64);
            }
            order_seq += 1;
            let amount = ((m * spend_noise.sample(&mut rng)) * 100.0).round() / 100.0;
            let ch = pick(&mut rng, &ORDER_CHANNELS, |c| c.1) as u8;
            let cid = if rng.random::<f64>() < opts.null_id_rate {
                None
            } else {
                Some(id)
            };
            let month = by_month.entry((t.year(), t.month())).or_default();
            month.push(cid, order_seq, micros(t), amount.max(0.01), ch);
            if rng.random::<f64>() < opts.duplicate_rate {
                month.push(cid, order_seq, micros(t), amount.max(0.01), ch);
            }
            if rng.random::<f64>() < opts.return_rate {
                let back = t + ChronoDuration::days(rng.random_range(1..30));
                if back < end {
                    let rm = by_month.entry((back.year(), back.month())).or_default();
                    rm.push(Some(id), order_seq, micros(back), -amount.max(0.01), ch);
                }
            }
            if n > 0 && rng.random::<f64>() < p {
                break;
            }
        }
        flush(&mut by_month, budget, per_file, target, &mut summary).await?;
    }
    for (month, orders) in by_month.iter_mut() {
        let n = orders.len();
        orders
            .write(*month, n, per_file, target, &mut summary)
            .await?;
    }
    customers.write(target, &mut summary).await?;
    Ok(summary)
}

/// Writes one batch as a Parquet file at `rel` below `target`; returns its size.
pub async fn put_parquet(target: &Location, rel: &str, batch: &RecordBatch) -> Result<u64> {
    let parquet_err =
        |e: parquet::errors::ParquetError| Error::Internal(format!("encode {rel}: {e}"));
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(3).map_err(parquet_err)?,
        ))
        .build();
    let mut buf = Vec::new();
    let mut w = ArrowWriter::try_new(&mut buf, batch.schema(), Some(props)).map_err(parquet_err)?;
    w.write(batch).map_err(parquet_err)?;
    w.close().map_err(parquet_err)?;
    let size = buf.len() as u64;
    let loc = target.child(rel);
    loc.store
        .object_store
        .put(&loc.path, PutPayload::from(Bytes::from(buf)))
        .await
        .map_err(|e| Error::store(loc.url.clone(), "write generated file", e))?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::compute::concat_batches;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    /// Every file under `dir/sub`, in name order (the part numbers keep the rows' order).
    fn read_all(dir: &std::path::Path, sub: &str) -> Vec<(String, RecordBatch)> {
        let mut out = Vec::new();
        let mut folders = vec![dir.join(sub)];
        while let Some(folder) = folders.pop() {
            for entry in std::fs::read_dir(&folder).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    folders.push(path);
                    continue;
                }
                let file = std::fs::File::open(&path).unwrap();
                let reader = ParquetRecordBatchReaderBuilder::try_new(file)
                    .unwrap()
                    .build()
                    .unwrap();
                let batches: Vec<RecordBatch> = reader.map(|b| b.unwrap()).collect();
                let rel = path.strip_prefix(dir).unwrap().display().to_string();
                out.push((rel, concat_batches(&batches[0].schema(), &batches).unwrap()));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Per folder, all rows of its files in order.
    fn by_folder(files: &[(String, RecordBatch)]) -> BTreeMap<String, RecordBatch> {
        let mut groups: BTreeMap<String, Vec<RecordBatch>> = BTreeMap::new();
        for (rel, b) in files {
            let folder = rel.rsplit_once('/').map_or("", |x| x.0).to_string();
            groups.entry(folder).or_default().push(b.clone());
        }
        groups
            .into_iter()
            .map(|(k, v)| (k, concat_batches(&v[0].schema(), &v).unwrap()))
            .collect()
    }

    async fn run(opts: &Options) -> (tempfile::TempDir, Summary) {
        let dir = tempfile::tempdir().unwrap();
        let loc = Location::local_folder(dir.path()).unwrap();
        let summary = generate(opts, &loc).await.unwrap();
        (dir, summary)
    }

    /// A small buffer writes more, smaller files, but the same rows in the same order: the
    /// output does not depend on how much the generator holds.
    #[tokio::test]
    async fn a_small_buffer_writes_the_same_rows_in_more_files() {
        let big = Options {
            customers: 3000,
            ..Options::default()
        };
        let small = Options {
            buffer_rows: 500,
            rows_per_file: 300,
            ..big.clone()
        };
        let (a_dir, a) = run(&big).await;
        let (b_dir, b) = run(&small).await;
        assert_eq!(a.order_rows, b.order_rows);
        assert!(a.order_rows > 5000, "{a:?}");
        assert!(b.files > 3 * a.files, "{a:?} {b:?}");
        let (fa, fb) = (read_all(a_dir.path(), ""), read_all(b_dir.path(), ""));
        assert!(fb.iter().all(|(_, x)| x.num_rows() <= 300));
        let (ga, gb) = (by_folder(&fa), by_folder(&fb));
        assert_eq!(ga.keys().collect::<Vec<_>>(), gb.keys().collect::<Vec<_>>());
        for (folder, rows) in &ga {
            assert_eq!(rows, &gb[folder], "{folder}");
        }
        // Order ids are unique per order, returns and duplicates share their order's id.
        let orders: usize = ga
            .iter()
            .filter(|(k, _)| k.starts_with("orders/"))
            .map(|(_, b)| b.num_rows())
            .sum();
        assert_eq!(orders as u64, a.order_rows);
        assert_eq!(ga["customers"].num_rows(), 3000);
    }
}
