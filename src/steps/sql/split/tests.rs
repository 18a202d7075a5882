//! Tests of split steps: buckets, and a split run against the same query run whole.

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::arrow::array::{
    Float64Array, Int32Array, Int64Array, RecordBatch, StringArray, StringViewArray,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;

use super::*;
use crate::steps::sql::template::Template;
use crate::steps::{Step, StepContext};

#[test]
fn integer_buckets_are_euclidean_remainders_and_text_buckets_a_hash() {
    let values = [
        Some(-7i64),
        Some(-1),
        Some(0),
        Some(1),
        Some(7),
        None,
        Some(i64::MIN),
    ];
    let ints = Int64Array::from(values.to_vec());
    let got = bucket_of(&ints, 3).unwrap();
    // The rule-based CLV models' bucket filter, as its SQL writes it: ((id % n) + n) % n; NULL in
    // bucket 0.
    #[allow(clippy::manual_rem_euclid)]
    let want: Vec<u32> = (values.iter())
        .map(|v| v.map_or(0, |v| (((v % 3) + 3) % 3) as u32))
        .collect();
    assert_eq!(got, want);
    assert_eq!(got[..6], [2, 2, 0, 1, 1, 0]);
    // Without NULLs (the fast path) the same; a narrower integer type gives the same buckets.
    let dense = Int64Array::from_iter_values(-50..50);
    let narrow = Int32Array::from_iter_values(-50..50);
    assert_eq!(
        bucket_of(&dense, 8).unwrap(),
        bucket_of(&narrow, 8).unwrap()
    );
    assert_eq!(
        bucket_of(&dense, 8).unwrap()[0],
        (-50i64).rem_euclid(8) as u32
    );
    // Text: plain and view arrays agree, every bucket is in range and all of them are used.
    let words: Vec<String> = (0..1000).map(|i| format!("customer-{i}")).collect();
    let plain = StringArray::from_iter_values(&words);
    let view = StringViewArray::from_iter_values(&words);
    let b = bucket_of(&plain, 16).unwrap();
    assert_eq!(b, bucket_of(&view, 16).unwrap());
    assert!(b.iter().all(|&k| k < 16));
    assert!((0..16).all(|k| b.contains(&k)));
    assert_eq!(
        bucket_of(&StringArray::from(vec![None::<&str>]), 16).unwrap(),
        [0]
    );
    // A float column is no key.
    let err = bucket_of(&Float64Array::from(vec![1.0]), 4).unwrap_err();
    assert!(
        err.contains("integer or text") && err.contains("Float64"),
        "{err}"
    );
}

#[test]
fn bucket_counts_come_from_the_data_and_the_limit() {
    const GIB: u64 = 1 << 30;
    // 96M order rows (~4.5 GB of columns) under 2 GiB (split above 1 GiB): buckets of at most
    // 256 MiB, a power of two.
    assert_eq!(count_for(4500 << 20, GIB), 32);
    assert_eq!(count_for(2 * GIB, GIB), 8);
    assert_eq!(count_for(1, GIB), 2);
    assert_eq!(count_for(u64::MAX, 1), MAX_BUCKETS);
    assert_eq!(count_for(3 * GIB, GIB), 16);
    assert_eq!(count_for(u64::MAX, u64::MAX), 8);
}

#[test]
fn validate_names_what_a_split_column_lacks() {
    let schema = |cols: &[(&str, DataType)]| {
        Arc::new(Schema::new(
            (cols.iter())
                .map(|(n, t)| Field::new(*n, t.clone(), true))
                .collect::<Vec<_>>(),
        ))
    };
    let diag = |m: String| crate::config::Diagnostic {
        file: "job.yaml".into(),
        line: 3,
        col: 5,
        field: "steps[0].split_by".into(),
        message: m,
    };
    let orders = schema(&[
        ("customer_id", DataType::Int64),
        ("amount", DataType::Float64),
    ]);
    let lookup = schema(&[("channel", DataType::Utf8)]);
    let ok = check(
        "customer_id",
        SplitResult::Whole,
        &orders,
        &[
            ("orders".into(), orders.clone()),
            ("lookup".into(), lookup.clone()),
        ],
        diag,
    );
    assert!(ok.is_empty(), "{ok:?}");
    let bad = check(
        "amount",
        SplitResult::Whole,
        &orders,
        &[("orders".into(), orders.clone())],
        diag,
    );
    assert!(
        bad.len() == 2 && bad[0].message.contains("`amount` as Float64"),
        "{bad:?}"
    );
    let missing = check(
        "customer_id",
        SplitResult::Whole,
        &lookup,
        &[("lookup".into(), lookup.clone())],
        diag,
    );
    let text: Vec<&str> = missing.iter().map(|d| d.message.as_str()).collect();
    assert_eq!(missing.len(), 2, "{text:?}");
    assert!(
        text[0].contains("result has no column `customer_id`"),
        "{text:?}"
    );
    assert!(text[1].contains("no table the step reads") && text[1].contains("lookup"));
    // A partial result (sums per group of each bucket) need not have the column; a table read
    // still must.
    let partial = |tables: &[(String, SchemaRef)]| {
        check("customer_id", SplitResult::Partial, &lookup, tables, diag)
    };
    let ok = partial(&[("orders".into(), orders.clone())]);
    assert!(ok.is_empty(), "{ok:?}");
    let none = partial(&[("lookup".into(), lookup.clone())]);
    assert!(
        none.len() == 1 && none[0].message.contains("no table the step reads"),
        "{none:?}"
    );
}

/// Orders with duplicate lines, returns, NULL and negative customer ids; customers, some of them
/// without orders; a lookup without the key.
async fn tables(ctx: &SessionContext) {
    let orders = Arc::new(Schema::new(vec![
        Field::new("customer_id", DataType::Int64, true),
        Field::new("order_id", DataType::Utf8View, true),
        Field::new("amount", DataType::Float64, true),
        Field::new("channel", DataType::Utf8, true),
    ]));
    let n = 20_000i64;
    let id = |i: i64| match i % 97 {
        0 => None,
        r if r % 5 == 0 => Some(-(i % 701)),
        _ => Some(i % 1301),
    };
    let ids: Vec<Option<i64>> = (0..n).map(|i| id(i / 2 * 2)).collect();
    let order_ids: Vec<String> = (0..n).map(|i| format!("o{}", i / 3)).collect();
    let amounts: Vec<f64> = (0..n)
        .map(|i| {
            if i % 11 == 0 {
                -5.0
            } else {
                (i % 37) as f64 + 0.25
            }
        })
        .collect();
    let channels: Vec<&str> = (0..n)
        .map(|i| ["web", "app", "store"][i as usize % 3])
        .collect();
    let batch = |r: std::ops::Range<usize>| {
        RecordBatch::try_new(
            orders.clone(),
            vec![
                Arc::new(Int64Array::from(ids[r.clone()].to_vec())),
                Arc::new(StringViewArray::from_iter_values(&order_ids[r.clone()])),
                Arc::new(Float64Array::from(amounts[r.clone()].to_vec())),
                Arc::new(StringArray::from(channels[r].to_vec())),
            ],
        )
        .unwrap()
    };
    // Every line twice (exact duplicates), in three partitions.
    let parts = vec![
        vec![batch(0..7000), batch(0..7000)],
        vec![batch(7000..15000)],
        vec![batch(15000..20000), batch(7000..15000), batch(15000..20000)],
    ];
    let table = MemTable::try_new(orders, parts).unwrap();
    ctx.register_table("orders", Arc::new(table)).unwrap();
    let customers = Arc::new(Schema::new(vec![
        Field::new("customer_id", DataType::Int32, false),
        Field::new("channel", DataType::Utf8, false),
    ]));
    let batch = RecordBatch::try_new(
        customers.clone(),
        vec![
            Arc::new(Int32Array::from_iter_values(-800..1500)),
            Arc::new(StringArray::from_iter_values(
                (0..2300).map(|i| ["web", "app"][i % 2]),
            )),
        ],
    )
    .unwrap();
    let table = MemTable::try_new(customers, vec![vec![batch]]).unwrap();
    ctx.register_table("customers", Arc::new(table)).unwrap();
    ctx.sql("create table lookup as select * from (values ('web', 1.5), ('app', 2.0)) as t(channel, weight)")
        .await
        .unwrap();
}

const CLEAN: &str = "
with source as (select distinct customer_id, order_id, amount, channel from orders),
netted as (
    select customer_id, order_id, sum(amount) as net_amount, count(*) as lines
    from source where customer_id is not null group by customer_id, order_id
)
select * from netted where net_amount > 0";

const FEATURES: &str = "
with per as (
    select customer_id, count(*) as orders, sum(net_amount) as revenue from clean group by customer_id
)
select c.customer_id, c.channel, coalesce(p.orders, 0) as orders,
       coalesce(p.revenue, 0) * l.weight as weighted
from customers c
left join per p on p.customer_id = c.customer_id
join lookup l on l.channel = c.channel";

/// Partial sums per channel (`split_result: partial`); [`COMBINE`] sums them again.
const PER_CHANNEL: &str = "
select c.channel, count(*) as orders, sum(k.net_amount) as revenue, max(k.lines) as most_lines
from clean k join customers c on c.customer_id = k.customer_id
group by c.channel";

const COMBINE: &str = "
select channel, sum(orders) as orders, sum(revenue) as revenue, max(most_lines) as most_lines
from {t} group by channel";

fn step(name: &str, sql: &str) -> Step {
    Step {
        name: name.into(),
        field: "steps[0]".into(),
        settings: BTreeMap::from([(partitions::KEY.to_string(), partitions::AUTO.to_string())]),
        split_by: Some("customer_id".into()),
        split_result: Default::default(),
        kind: StepKind::Sql(SqlStep {
            file: format!("{name}.sql").into(),
            template: Template::parse(sql).unwrap(),
        }),
    }
}

/// The context of `step` in job `j` on 2026-01-01, run whole (no buckets, every column kept).
fn whole_context<'a>(
    ctx: &'a SessionContext,
    step: &'a Step,
    vars: &'a BTreeMap<String, String>,
) -> StepContext<'a> {
    StepContext {
        session: ctx,
        job: "j",
        step,
        run_date: chrono::NaiveDate::from_ymd_opt(2026, 1, 1).unwrap(),
        vars,
        keep: None,
        split: None,
    }
}

async fn sorted(ctx: &SessionContext, table: &str) -> String {
    let df = ctx.table(table).await.unwrap();
    let cols: Vec<datafusion::logical_expr::SortExpr> = (df.schema().fields().iter())
        .map(|f| datafusion::prelude::col(format!("\"{}\"", f.name())).sort(true, true))
        .collect();
    let batches = df.sort(cols).unwrap().collect().await.unwrap();
    datafusion::arrow::util::pretty::pretty_format_batches(&batches)
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_step_gives_the_rows_of_the_whole_query() {
    let base = std::env::temp_dir().join(format!("clvflow-split-{}", std::process::id()));
    let ctx = crate::steps::spill::tests::session(256 << 20, &base);
    tables(&ctx).await;
    let vars = BTreeMap::new();
    let buckets = |count| Buckets {
        column: "customer_id".into(),
        count,
        floor: 2,
        limit: Some(256 << 20),
    };
    for (name, sql, whole) in [
        ("clean", CLEAN, "clean_whole"),
        ("features", FEATURES, "features_whole"),
    ] {
        let s = step(name, sql);
        // Whole, as the step runs when its data fits.
        let cx = whole_context(&ctx, &s, &vars);
        let df = match &s.kind {
            StepKind::Sql(q) => q.dataframe(&cx).await.unwrap(),
            _ => unreachable!(),
        };
        ctx.register_table(whole, df.into_view()).unwrap();
        let want = sorted(&ctx, whole).await;
        // Split in 4 buckets (features reads clean's buckets as they are).
        let b = buckets(4);
        let cx = StepContext {
            split: Some(&b),
            ..cx
        };
        let out = s.kind.run(&cx).await.unwrap();
        let got = sorted(&ctx, name).await;
        assert_eq!(got, want, "{name}");
        assert!(out.rows > 0 && out.spilled > 0 && out.bytes == 0);
        let provider = ctx.table_provider(name).await.unwrap();
        let t = provider.downcast_ref::<SpilledTable>().unwrap();
        assert_eq!(t.files().split_by(), Some(("customer_id", 4)));
        assert_eq!(t.rows(), out.rows);
        // File k holds bucket k.
        for k in 0..4 {
            let file = &t.files().single_layer().unwrap()[k];
            let f = std::fs::File::open(file).unwrap();
            let reader =
                parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(f, 1024).unwrap();
            for batch in reader {
                let batch = batch.unwrap();
                let b = bucket_of(batch.column(0).as_ref(), 4).unwrap();
                assert!(b.iter().all(|&x| x as usize == k), "{name} file {k}");
            }
        }
        // The same schema as the whole query's (views stay views).
        assert_eq!(
            t.schema().fields(),
            ctx.table(whole).await.unwrap().schema().as_arrow().fields()
        );
    }
    // A partial step: sums per channel over each bucket's customers (one row per channel and
    // bucket), which a later query sums again, equal to the same sums over all the rows.
    let mut s = step("per_channel", PER_CHANNEL);
    s.split_result = SplitResult::Partial;
    let cx = whole_context(&ctx, &s, &vars);
    let StepKind::Sql(q) = &s.kind else {
        unreachable!()
    };
    let whole = q.dataframe(&cx).await.unwrap();
    ctx.register_table("per_channel_whole", whole.into_view())
        .unwrap();
    let once = ctx
        .sql(&COMBINE.replace("{t}", "per_channel_whole"))
        .await
        .unwrap();
    ctx.register_table("combined_whole", once.into_view())
        .unwrap();
    let want = sorted(&ctx, "combined_whole").await;
    let b = buckets(4);
    let out = s
        .kind
        .run(&StepContext {
            split: Some(&b),
            ..cx
        })
        .await
        .unwrap();
    let combined = ctx
        .sql(&COMBINE.replace("{t}", "per_channel"))
        .await
        .unwrap();
    ctx.register_table("combined", combined.into_view())
        .unwrap();
    assert_eq!(sorted(&ctx, "combined").await, want);
    // One row per channel and bucket: a customer's channel follows the parity of its id, so
    // each of the 4 buckets (id mod 4) holds one channel: 4 rows where the whole query gives 2.
    // Not registered as split.
    assert_eq!(out.rows, 4);
    {
        let provider = ctx.table_provider("per_channel").await.unwrap();
        let t = provider.downcast_ref::<SpilledTable>().unwrap();
        assert_eq!(t.files().split_by(), None);
        assert_eq!(t.files().single_layer().unwrap().len(), 4);
    }
    // Read in 2 coarser buckets (the rule-based CLV models' way): files 0 and 2, then 1 and 3.
    let all = crate::steps::spill::tests::ints(&ctx, "select customer_id from clean");
    let coarse = CoarseBuckets::of(&ctx, "clean", "customer_id", 2)
        .await
        .unwrap()
        .unwrap();
    let mut seen = Vec::new();
    for k in 0..2 {
        let session = coarse.bucket(k).await.unwrap();
        let ids = crate::steps::spill::tests::ints(session, "select customer_id from clean");
        assert!(!ids.is_empty() && ids.iter().all(|v| v.rem_euclid(2) == k as i64));
        seen.extend(ids);
    }
    seen.sort();
    assert_eq!(seen, all);
    // The run's own table is untouched; 3 does not divide 4; a table that is not split is none.
    assert_eq!(
        crate::steps::spill::tests::ints(&ctx, "select customer_id from clean"),
        all
    );
    assert!(
        CoarseBuckets::of(&ctx, "clean", "customer_id", 3)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        CoarseBuckets::of(&ctx, "clean", "order_id", 2)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        CoarseBuckets::of(&ctx, "orders", "customer_id", 2)
            .await
            .unwrap()
            .is_none()
    );
    drop(coarse);
    // Scratch: the buckets of the scatter are gone, the two results' files remain until dropped.
    // (The views of the whole queries hold the tables they read.)
    for t in [
        "clean",
        "features",
        "clean_whole",
        "features_whole",
        "per_channel",
        "per_channel_whole",
        "combined",
        "combined_whole",
    ] {
        ctx.deregister_table(t).unwrap();
    }
    let left: Vec<_> = walk(&base);
    assert!(left.is_empty(), "{left:?}");
    let _ = std::fs::remove_dir_all(&base);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
