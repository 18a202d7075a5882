//! The scatter of a split step: every table it reads that has the split column, in one scan,
//! into one folder of Arrow IPC files per bucket.

use super::*;
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(FNV_OFFSET, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(FNV_PRIME)
    })
}

/// The bucket (of `count`) of every value of `key`.
pub fn bucket_of(key: &dyn Array, count: usize) -> std::result::Result<Vec<u32>, String> {
    let n = count as u64;
    macro_rules! signed {
        ($t:ty) => {
            key.as_primitive::<$t>()
                .iter()
                .map(|v| v.map_or(0, |v| i64::from(v).rem_euclid(n as i64) as u32))
                .collect()
        };
    }
    macro_rules! unsigned {
        ($t:ty) => {
            key.as_primitive::<$t>()
                .iter()
                .map(|v| v.map_or(0, |v| (u64::from(v) % n) as u32))
                .collect()
        };
    }
    let text = |v: Option<&str>| v.map_or(0, |s| (fnv1a(s.as_bytes()) % n) as u32);
    Ok(match key.data_type() {
        DataType::Int64 => {
            let a = key.as_primitive::<Int64Type>();
            if a.null_count() == 0 {
                (a.values().iter())
                    .map(|&v| v.rem_euclid(n as i64) as u32)
                    .collect()
            } else {
                signed!(Int64Type)
            }
        }
        DataType::Int32 => signed!(Int32Type),
        DataType::Int16 => signed!(Int16Type),
        DataType::Int8 => signed!(Int8Type),
        DataType::UInt64 => unsigned!(UInt64Type),
        DataType::UInt32 => unsigned!(UInt32Type),
        DataType::UInt16 => unsigned!(UInt16Type),
        DataType::UInt8 => unsigned!(UInt8Type),
        DataType::Utf8 => key.as_string::<i32>().iter().map(text).collect(),
        DataType::LargeUtf8 => key.as_string::<i64>().iter().map(text).collect(),
        DataType::Utf8View => key.as_string_view().iter().map(text).collect(),
        t => return Err(format!("a split column is an integer or text, not {t}")),
    })
}

/// The type a column is scattered as: views and dictionaries as their plain type (an IPC file
/// holds one dictionary per column, and a slice of a view array would carry all its buffers).
fn plain(t: &DataType) -> DataType {
    match t {
        DataType::Utf8View => DataType::Utf8,
        DataType::BinaryView => DataType::Binary,
        DataType::Dictionary(_, v) => plain(v),
        t => t.clone(),
    }
}

/// A table split into buckets: where bucket k's rows are, and how many there are.
pub(super) struct SplitTable {
    pub(super) name: String,
    pub(super) schema: SchemaRef,
    /// Per bucket: a folder of Arrow IPC files, or one Parquet scratch file.
    pub(super) buckets: Vec<(PathBuf, crate::storage::listing::Format)>,
    pub(super) rows: Vec<u64>,
    pub(super) bytes: Vec<u64>,
}

/// Scatters the columns `columns` (lower-cased; `None`: all) of table `name` on `session` into
/// `count` buckets by `column`, one folder of Arrow IPC files per bucket under `dir`, in one scan
/// with `partitions` partitions (each writes its own file of each bucket).
pub(super) async fn scatter(
    session: &SessionContext,
    name: &str,
    columns: Option<&BTreeSet<String>>,
    column: &str,
    count: usize,
    partitions: usize,
    dir: &Path,
) -> Result<SplitTable> {
    let err = |e| Error::df(format!("split table `{name}` into buckets"), e);
    let schema = (session.table(name).await.map_err(err)?)
        .schema()
        .as_arrow()
        .clone();
    let key = find_field(&schema, column)
        .ok_or_else(|| Error::Internal(format!("`{name}` has no column `{column}`")))?
        .name()
        .clone();
    let fields: Vec<&Field> = (schema.fields().iter())
        .filter(|f| {
            *f.name() == key || columns.is_none_or(|c| c.contains(&f.name().to_lowercase()))
        })
        .map(|f| f.as_ref())
        .collect();
    let names: Vec<&str> = fields.iter().map(|f| f.name().as_str()).collect();
    let out: SchemaRef = Arc::new(Schema::new(
        (fields.iter())
            .map(|f| Field::new(f.name(), plain(f.data_type()), f.is_nullable()))
            .collect::<Vec<_>>(),
    ));
    let key_index = names.iter().position(|n| *n == key).unwrap_or(0);
    let mut dirs = Vec::with_capacity(count);
    for k in 0..count {
        let d = dir.join(format!("{name}-b{k:04}"));
        std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, "create a bucket folder", e))?;
        dirs.push(d);
    }
    // Large scan batches: each bucket's slice of one is a batch of its files.
    let mut state = session.state();
    let options = state.config_mut().options_mut();
    options.execution.target_partitions = partitions.min(MAX_OPEN_FILES / count).max(1);
    options.execution.batch_size =
        datafusion::config::ConfigNonZeroUsize::try_new((8192 * count).clamp(8192, 1 << 17))
            .map_err(err)?;
    let scan = SessionContext::new_with_state(state);
    let df = scan.table(name).await.map_err(err)?;
    let df = df.select_columns(&names).map_err(err)?;
    let streams = df.execute_stream_partitioned().await.map_err(err)?;
    let dirs = Arc::new(dirs);
    let mut tasks = tokio::task::JoinSet::new();
    for (i, mut stream) in streams.into_iter().enumerate() {
        let (dirs, out) = (dirs.clone(), out.clone());
        let name = name.to_string();
        tasks.spawn(async move {
            let mut writers: Vec<Option<(PathBuf, FileWriter<std::io::BufWriter<File>>)>> =
                (0..count).map(|_| None).collect();
            let (mut rows, mut bytes) = (vec![0u64; count], vec![0u64; count]);
            let ipc = |path: &Path, e: datafusion::arrow::error::ArrowError| {
                Error::Internal(format!("write bucket file {}: {e}", path.display()))
            };
            while let Some(batch) = stream.next().await {
                let batch = batch.map_err(|e| Error::df(format!("read `{name}`"), e))?;
                let batch = conform(batch, &out)?;
                let of =
                    bucket_of(batch.column(key_index).as_ref(), count).map_err(Error::Internal)?;
                // A counting sort of the row numbers by bucket, then one take: each bucket's
                // rows are a slice of the taken batch.
                let mut starts = vec![0usize; count + 1];
                for &b in &of {
                    starts[b as usize + 1] += 1;
                }
                for k in 0..count {
                    starts[k + 1] += starts[k];
                }
                let mut next = starts.clone();
                let mut order = vec![0u32; of.len()];
                for (row, &b) in of.iter().enumerate() {
                    order[next[b as usize]] = row as u32;
                    next[b as usize] += 1;
                }
                let taken = take_record_batch(&batch, &UInt32Array::from(order))
                    .map_err(|e| Error::arrow("scatter a batch into buckets", e))?;
                for k in 0..count {
                    let len = starts[k + 1] - starts[k];
                    if len == 0 {
                        continue;
                    }
                    let part = taken.slice(starts[k], len);
                    let (path, w) = match &mut writers[k] {
                        Some(w) => w,
                        None => {
                            let path = dirs[k].join(format!("part-{i:03}.arrow"));
                            let file = File::create(&path)
                                .map_err(|e| Error::io(&path, "create a bucket file", e))?;
                            let w = FileWriter::try_new_buffered(file, &out)
                                .map_err(|e| ipc(&path, e))?;
                            writers[k].insert((path, w))
                        }
                    };
                    w.write(&part).map_err(|e| ipc(path, e))?;
                    rows[k] += len as u64;
                    bytes[k] += crate::steps::spill::slice_bytes(&part) as u64;
                }
            }
            for (path, mut w) in writers.into_iter().flatten() {
                w.finish().map_err(|e| ipc(&path, e))?;
            }
            Ok::<_, Error>((rows, bytes))
        });
    }
    let (mut rows, mut bytes) = (vec![0u64; count], vec![0u64; count]);
    while let Some(done) = tasks.join_next().await {
        let (r, b) = done.map_err(|e| Error::Internal(format!("a scatter task failed: {e}")))??;
        for k in 0..count {
            rows[k] += r[k];
            bytes[k] += b[k];
        }
    }
    let dirs = Arc::try_unwrap(dirs).unwrap_or_else(|d| d.as_ref().clone());
    Ok(SplitTable {
        name: name.to_string(),
        schema: out,
        buckets: (dirs.into_iter())
            .map(|d| (d, crate::storage::listing::Format::Arrow))
            .collect(),
        rows,
        bytes,
    })
}

/// A split step result, bucket by bucket as it is: file k holds bucket k.
pub(super) fn as_split(name: &str, t: &SpilledTable) -> Option<SplitTable> {
    let files = t.files();
    let paths = files.single_layer()?;
    let rows: Vec<u64> = (0..paths.len())
        .map(|k| files.file_rows(k) as u64)
        .collect();
    let total = files.rows().max(1) as u64;
    let bytes = (rows.iter())
        .map(|r| (files.bytes() as u64).saturating_mul(*r) / total)
        .collect();
    Some(SplitTable {
        name: name.to_string(),
        schema: files.schema().clone(),
        buckets: (paths.iter())
            .map(|p| (p.clone(), crate::storage::listing::Format::Parquet))
            .collect(),
        rows,
        bytes,
    })
}

/// `batch` with the columns of `schema`: cast where the types differ (the scatter writes views
/// and dictionaries plain; a bucket's plan may then type text as plain strings where the whole
/// query has views).
pub(super) fn conform(batch: RecordBatch, schema: &SchemaRef) -> Result<RecordBatch> {
    if batch.schema().fields() == schema.fields() {
        return Ok(batch);
    }
    let cols = (batch.columns().iter().zip(schema.fields()))
        .map(|(c, f)| match c.data_type() == f.data_type() {
            true => Ok(c.clone()),
            false => cast(c, f.data_type()),
        })
        .collect::<std::result::Result<Vec<ArrayRef>, _>>()
        .map_err(|e| Error::arrow("cast a batch to its bucket schema", e))?;
    RecordBatch::try_new(schema.clone(), cols)
        .map_err(|e| Error::arrow("cast a batch to its bucket schema", e))
}
