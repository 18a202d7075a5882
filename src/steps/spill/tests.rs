//! Tests of step results on scratch disk (held, spilled, read back, encoded).

use super::super::rows::HeldTable;
use super::super::source::Source;
use super::*;
use datafusion::arrow::array::AsArray;
use datafusion::arrow::datatypes::Int64Type;

/// A session like an engine's, whose pool holds `limit` bytes (results: half of it), with
/// scratch under `base`.
pub(in crate::steps) fn session(limit: usize, base: &Path) -> SessionContext {
    use datafusion::execution::memory_pool::GreedyMemoryPool;
    use datafusion::execution::runtime_env::RuntimeEnvBuilder;
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_pool(Arc::new(GreedyMemoryPool::new(limit)))
        .build_arc()
        .unwrap();
    let config = datafusion::prelude::SessionConfig::new()
        .with_target_partitions(4)
        .with_extension(Arc::new(ResultSpace::new(Some(limit / 2), base)));
    SessionContext::new_with_config_rt(config, runtime)
}

pub(in crate::steps) fn ints(ctx: &SessionContext, sql: &str) -> Vec<i64> {
    let rt = tokio::runtime::Handle::current();
    let batches = tokio::task::block_in_place(|| {
        rt.block_on(async { ctx.sql(sql).await.unwrap().collect().await.unwrap() })
    });
    let mut v: Vec<i64> = batches
        .iter()
        .flat_map(|b| b.column(0).as_primitive::<Int64Type>().values().to_vec())
        .collect();
    v.sort();
    v
}

/// A scratch file's numbers are plain-encoded, its text dictionary-encoded, and the rows
/// read back the same (read from the file's own metadata, not from the properties).
#[test]
fn scratch_files_take_dictionaries_for_text_only() {
    use datafusion::arrow::array::{Float64Array, Int64Array, StringArray};
    use datafusion::arrow::datatypes::{Field, Schema};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use parquet::basic::Encoding;
    let dir = std::env::temp_dir().join(format!("clvflow-scratch-enc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("v", DataType::Float64, false),
        Field::new("segment", DataType::Utf8, true),
    ]));
    let n = 10_000;
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(Int64Array::from_iter_values(0..n)),
            Arc::new(Float64Array::from_iter_values(
                (0..n).map(|i| i as f64 / 7.0),
            )),
            Arc::new(StringArray::from_iter(
                (0..n).map(|i| (i % 5 != 0).then(|| ["a", "b"][i as usize % 2])),
            )),
        ],
    )
    .unwrap();
    let mut file = SpillFile::create(&dir, 0, schema).unwrap();
    file.writer.write(&batch).unwrap();
    file.writer.close().unwrap();
    let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(&file.path).unwrap()).unwrap();
    let column = |i: usize| reader.metadata().row_group(0).column(i).clone();
    for i in [0, 1] {
        let c = column(i);
        assert!(
            !c.encodings().any(|e| e == Encoding::RLE_DICTIONARY),
            "{:?}",
            c.column_path()
        );
        assert!(c.statistics().is_some());
    }
    assert!(column(2).encodings().any(|e| e == Encoding::RLE_DICTIONARY));
    let read: Vec<RecordBatch> = reader.build().unwrap().map(|b| b.unwrap()).collect();
    assert_eq!(
        datafusion::arrow::compute::concat_batches(&batch.schema(), &read).unwrap(),
        batch
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_larger_than_the_share_for_results_goes_to_scratch_and_reads_the_same() {
    let base = std::env::temp_dir().join(format!("clvflow-spill-test-{}", std::process::id()));
    // 400,000 integers (3.2 MB) against 2 MB for results: spilled.
    let ctx = session(4 << 20, &base);
    let df = ctx
        .sql("SELECT value * 3 AS v FROM generate_series(1, 400000)")
        .await
        .unwrap();
    let kept = collect_or_spill(&ctx, "step `big`: its result", "big", df)
        .await
        .unwrap();
    assert_eq!((kept.rows, kept.held), (400_000, 0));
    assert!(kept.spilled >= 2_000_000, "{kept:?}");
    assert_eq!(ctx.runtime_env().memory_pool.reserved(), 0);
    let provider = ctx.table_provider("big").await.unwrap();
    let spilled = provider.downcast_ref::<SpilledTable>().unwrap();
    let folder = spilled.files[0].parent().unwrap().to_path_buf();
    assert!(folder.is_dir());
    let want: Vec<i64> = (1..=400_000).map(|v| v * 3).collect();
    assert_eq!(ints(&ctx, "SELECT v FROM big"), want);
    // A model step reads it in one order, twice the same.
    let source = Source::open(&ctx, "big").await.unwrap();
    assert_eq!(source.rows(), 400_000);
    let read = |s: &Source| {
        let mut v = Vec::new();
        s.scan(Some(&["v"]), |_, b| {
            v.extend_from_slice(b.column(0).as_primitive::<Int64Type>().values());
            Ok(())
        })
        .unwrap();
        v
    };
    let first = read(&source);
    assert_eq!(first, read(&source));
    let mut sorted = first.clone();
    sorted.sort();
    assert_eq!(sorted, want);
    // Its model result, pushed in that order, spills too and keeps the order.
    let schema = source.schema().clone();
    let mut w = ResultWriter::new(&ctx, "copy", schema);
    source.scan(None, |i, b| w.push(i, b)).unwrap();
    let kept = w.finish().await.unwrap();
    assert_eq!((kept.rows, kept.held), (400_000, 0));
    assert_eq!(read(&Source::open(&ctx, "copy").await.unwrap()), first);
    // Dropping the table removes its files.
    ctx.deregister_table("big").unwrap();
    drop((provider, source));
    assert!(!folder.exists());

    // A small result stays in memory.
    let df = ctx
        .sql("SELECT value AS v FROM generate_series(1, 1000)")
        .await
        .unwrap();
    let kept = collect_or_spill(&ctx, "step `small`", "small", df)
        .await
        .unwrap();
    assert!(kept.held > 0 && kept.spilled == 0, "{kept:?}");
    let provider = ctx.table_provider("small").await.unwrap();
    assert!(provider.downcast_ref::<HeldTable>().is_some());
    assert_eq!(
        ints(&ctx, "SELECT v FROM small"),
        (1..=1000).collect::<Vec<i64>>()
    );
    drop(ctx);
    let _ = std::fs::remove_dir_all(&base);
}
