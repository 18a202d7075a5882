//! A seeded generator of realistic order and customer exports, of any size.
//!
//! Purchasing follows the BG/NBD story (Fader, Hardie & Lee 2005): each customer buys at a
//! Poisson rate λ ~ Gamma(r, α) per week while alive, and after each repeat purchase drops out
//! with probability p ~ Beta(a, b). Spend is lognormal around a per-customer lognormal mean.
//! A small, controllable share of rows are returns (a negative line for an earlier order),
//! exact duplicates, or rows with a NULL customer id. Same options and seed: same bytes.
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

#[derive(Default)]
struct Orders {
    customer_id: Vec<Option<i64>>,
    order_id: Vec<String>,
    ts: Vec<i64>,
    amount: Vec<f64>,
    channel: Vec<&'static str>,
}

impl Orders {
    fn push(&mut self, c: Option<i64>, id: &str, ts: i64, amount: f64, ch: &'static str) {
        self.customer_id.push(c);
        self.order_id.push(id.to_string());
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
                self.order_id[from..to].iter(),
            )),
            Arc::new(TimestampMicrosecondArray::from(self.ts[from..to].to_vec())),
            Arc::new(Float64Array::from(self.amount[from..to].to_vec())),
            Arc::new(StringArray::from_iter_values(self.channel[from..to].iter())),
        ];
        RecordBatch::try_new(orders_schema(), cols).map_err(|e| Error::arrow("build orders", e))
    }
}

fn pick<'a, T>(rng: &mut StdRng, items: &'a [T], weight: impl Fn(&T) -> f64) -> &'a T {
    let mut u: f64 = rng.random();
    for it in items {
        u -= weight(it);
        if u <= 0.0 {
            return it;
        }
    }
    &items[items.len() - 1]
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

    let mut by_month: BTreeMap<(i32, u32), Orders> = BTreeMap::new();
    let mut cust_id = Vec::new();
    let mut cust_signup = Vec::new();
    let mut cust_channel = Vec::new();
    let mut cust_cost = Vec::new();
    let mut order_seq: u64 = 0;

    for id in 1..=opts.customers as i64 {
        let signup = start + ChronoDuration::seconds((rng.random::<f64>() * span_secs) as i64);
        let (channel, share, cac) = *pick(&mut rng, &ACQUISITION, |a| a.1);
        let _ = share;
        cust_id.push(id);
        cust_signup.push(micros(signup));
        cust_channel.push(channel);
        cust_cost.push((cac * cac_noise.sample(&mut rng) * 100.0).round() / 100.0);

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
            let oid = format!("o{order_seq:010}");
            let amount = ((m * spend_noise.sample(&mut rng)) * 100.0).round() / 100.0;
            let ch = pick(&mut rng, &ORDER_CHANNELS, |c| c.1).0;
            let cid = if rng.random::<f64>() < opts.null_id_rate {
                None
            } else {
                Some(id)
            };
            let month = by_month.entry((t.year(), t.month())).or_default();
            month.push(cid, &oid, micros(t), amount.max(0.01), ch);
            if rng.random::<f64>() < opts.duplicate_rate {
                month.push(cid, &oid, micros(t), amount.max(0.01), ch);
            }
            if rng.random::<f64>() < opts.return_rate {
                let back = t + ChronoDuration::days(rng.random_range(1..30));
                if back < end {
                    let rm = by_month.entry((back.year(), back.month())).or_default();
                    rm.push(Some(id), &oid, micros(back), -amount.max(0.01), ch);
                }
            }
            if n > 0 && rng.random::<f64>() < p {
                break;
            }
        }
    }

    let mut summary = Summary {
        customers: opts.customers,
        ..Default::default()
    };
    for ((y, mo), orders) in &by_month {
        let mut part = 0;
        let mut from = 0;
        while from < orders.len() {
            let to = (from + opts.rows_per_file.max(1)).min(orders.len());
            let batch = orders.batch(from, to)?;
            let rel = format!("orders/order_month={y:04}-{mo:02}/part-{part:05}.parquet");
            summary.bytes += put_parquet(target, &rel, &batch).await?;
            summary.files += 1;
            summary.order_rows += (to - from) as u64;
            part += 1;
            from = to;
        }
    }
    let n = cust_id.len();
    let mut from = 0;
    let mut part = 0;
    while from < n {
        let to = (from + opts.rows_per_file.max(1)).min(n);
        let cols: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from(cust_id[from..to].to_vec())),
            Arc::new(TimestampMicrosecondArray::from(
                cust_signup[from..to].to_vec(),
            )),
            Arc::new(StringArray::from_iter_values(cust_channel[from..to].iter())),
            Arc::new(Float64Array::from(cust_cost[from..to].to_vec())),
        ];
        let batch = RecordBatch::try_new(customers_schema(), cols)
            .map_err(|e| Error::arrow("build customers", e))?;
        summary.bytes +=
            put_parquet(target, &format!("customers/part-{part:05}.parquet"), &batch).await?;
        summary.files += 1;
        part += 1;
        from = to;
    }
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
