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
    let folder = spilled.files().first_files()[0]
        .parent()
        .unwrap()
        .to_path_buf();
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

/// Columns appended to a spilled result as a layer of their own read back row for row with it,
/// through DataFusion (any projection, row counts alone) and through a model step's source; a
/// layer whose row groups do not line up with its input is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appended_layers_read_back_row_for_row_with_their_input() {
    use datafusion::arrow::array::{ArrayRef, Int64Array};
    use datafusion::arrow::datatypes::{Field, Schema};
    let base = std::env::temp_dir().join(format!("clvflow-zip-test-{}", std::process::id()));
    let ctx = session(64 << 20, &base);
    let space = ResultSpace::of(&ctx).unwrap();
    let field = |n: &str| Field::new(n, DataType::Int64, false);
    let input = Arc::new(Schema::new(vec![field("id"), field("v")]));
    let added = Arc::new(Schema::new(vec![field("w")]));
    // Three files: 150,000 rows (row groups 65,536 + 65,536 + 18,928), none, 70,000; ids go
    // on across files.
    let sizes = [150_000i64, 0, 70_000];
    let write = |dir: &ScratchDir,
                 schema: &SchemaRef,
                 cols: &dyn Fn(i64, i64) -> Vec<ArrayRef>,
                 sizes: &[i64]| {
        let mut start = 0;
        let mut paths = Vec::new();
        for (i, n) in sizes.iter().enumerate() {
            let mut f = SpillFile::open(dir, i, schema.clone()).unwrap();
            // Batches of 10,000 rows: the writer cuts row groups at 65,536 whatever comes.
            let mut at = start;
            while at < start + n {
                let m = (start + n - at).min(10_000);
                f.write(&RecordBatch::try_new(schema.clone(), cols(at, m)).unwrap())
                    .unwrap();
                at += m;
            }
            start += n;
            paths.push(f.close().unwrap());
        }
        paths
    };
    let ids = |at: i64, m: i64, k: i64| -> ArrayRef {
        Arc::new(Int64Array::from_iter_values((at..at + m).map(|i| i * k)))
    };
    let dir = space.folder("input").unwrap();
    let paths = write(
        &dir,
        &input,
        &|at, m| vec![ids(at, m, 1), ids(at, m, 2)],
        &sizes,
    );
    register_spilled(&ctx, "input", input.clone(), dir, paths, 220_000, 1 << 20)
        .await
        .unwrap();
    let Source::Spilled(files) = Source::open(&ctx, "input").await.unwrap() else {
        panic!("not spilled");
    };
    let full = Arc::new(Schema::new(vec![field("id"), field("v"), field("w")]));
    let dir = space.folder("appended").unwrap();
    let paths = write(&dir, &added, &|at, m| vec![ids(at, m, 3)], &sizes);
    // Keeps `w` and `id` (in that order), lets `v` go.
    let zipped = files
        .append(&full, Some(&[2, 0]), dir, paths, 2 << 20)
        .unwrap();
    assert_eq!((zipped.rows(), zipped.layers()), (220_000, 2));
    register_files(&ctx, "zipped", zipped, None).unwrap();
    let all: Vec<i64> = (0..220_000).collect();
    assert_eq!(ints(&ctx, "SELECT id FROM zipped WHERE w = 3 * id"), all);
    assert_eq!(ints(&ctx, "SELECT w / 3 FROM zipped"), all);
    assert_eq!(ints(&ctx, "SELECT count(*) FROM zipped"), vec![220_000]);
    assert!(ctx.sql("SELECT v FROM zipped").await.is_err());
    // Exact row counts, so that a join builds its hash table on the smaller side.
    let provider = ctx.table_provider("zipped").await.unwrap();
    let stats = provider.statistics().unwrap();
    assert_eq!(
        stats.num_rows,
        datafusion::common::stats::Precision::Exact(220_000)
    );
    assert_eq!(stats.column_statistics.len(), 2);
    drop(provider);
    // A model step reads it file by file: the file's index is the partition.
    let source = Source::open(&ctx, "zipped").await.unwrap();
    let mut seen = Vec::new();
    source
        .scan(Some(&["id", "w"]), |part, b| {
            let id = b.column(0).as_primitive::<Int64Type>().values();
            let w = b.column(1).as_primitive::<Int64Type>().values();
            assert!(id.iter().zip(w.iter()).all(|(i, w)| *w == 3 * i));
            assert!(part == 0 && id[0] < 150_000 || part == 2 && id[0] >= 150_000);
            seen.extend_from_slice(id);
            Ok(())
        })
        .unwrap();
    assert_eq!(seen, all);
    // A layer with other row groups than its input (one row short) does not line up.
    let dir = space.folder("short").unwrap();
    let paths = write(
        &dir,
        &added,
        &|at, m| vec![ids(at, m, 3)],
        &[150_000, 0, 69_999],
    );
    let err = files.append(&full, None, dir, paths, 0).unwrap_err();
    assert!(err.to_string().contains("do not line up"), "{err}");
    drop((files, source, space, ctx));
    let _ = std::fs::remove_dir_all(&base);
}
