//! Scratch files in layers: a model step that appends columns to a spilled input (`clusters`
//! appends `cluster` to `rfm`, `clv` its predictions to `clusters`) writes only the columns it
//! adds, one file per file of its input and row for row with it, and its result is the input's
//! files zipped with those ([`SpilledFiles`]). At 33M customers the wide table is ~5 GB: before
//! layers each of the two steps read it and wrote it again whole.
//!
//! Every scratch file is written by [`super::SpillFile`] with row groups of exactly
//! [`super::ROW_GROUP_ROWS`] rows (the last one shorter), so files of the same index in two
//! layers have the same row groups, and a reader of the same row groups with the same batch size
//! gives batches of the same lengths from each. [`SpilledFiles::append`] checks the row groups
//! of a new layer against the first; a reader checks every batch's length.

use std::fmt;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, RecordBatch, RecordBatchOptions};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::Statistics;
use datafusion::common::stats::Precision;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::DataFusionError;
use datafusion::execution::TaskContext;
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType, SchedulingType};
use datafusion::physical_plan::statistics::StatisticsArgs;
use datafusion::physical_plan::stream::RecordBatchReceiverStreamBuilder;
use datafusion::physical_plan::{
    ChildrenPropertiesMode, DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning,
    PlanProperties, ReplaceChildrenOptions, SendableRecordBatchStream,
};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::file::metadata::ParquetMetaDataReader;

use crate::engine::scratch::ScratchDir;
use crate::error::{Error, Result};

/// Rows per batch read from scratch files (DataFusion's default batch size).
pub const BATCH_ROWS: usize = 8192;

/// One layer: a folder of scratch files (one per file index) with some of a result's columns.
#[derive(Debug)]
pub struct Layer {
    files: Vec<PathBuf>,
    _dir: ScratchDir,
}

impl Layer {
    pub fn new(dir: ScratchDir, files: Vec<PathBuf>) -> Self {
        Self { files, _dir: dir }
    }
}

/// A step result in scratch files: the first layer's files, and the layers appended to them.
/// Cloning shares the files; they are removed when the last clone goes.
#[derive(Debug, Clone)]
pub struct SpilledFiles {
    schema: SchemaRef,
    layers: Vec<Arc<Layer>>,
    /// For every column of `schema`: its layer and its index in that layer's files.
    columns: Vec<(usize, usize)>,
    /// The rows of every row group of every file (the same in every layer).
    groups: Arc<Vec<Vec<usize>>>,
    rows: usize,
    bytes: usize,
    /// Set when file k holds exactly the rows of bucket k of a column ([`Self::split_by`]).
    split: Option<(String, usize)>,
}

fn read_err(path: &Path, e: impl fmt::Display) -> Error {
    Error::Internal(format!("read scratch file {}: {e}", path.display()))
}

/// The rows of each row group of each of `files`, from their footers.
fn row_groups(files: &[PathBuf]) -> Result<Vec<Vec<usize>>> {
    files
        .iter()
        .map(|path| {
            let file = File::open(path).map_err(|e| Error::io(path, "open a scratch file", e))?;
            let meta = ParquetMetaDataReader::new()
                .parse_and_finish(&file)
                .map_err(|e| read_err(path, e))?;
            Ok(meta
                .row_groups()
                .iter()
                .map(|g| g.num_rows() as usize)
                .collect())
        })
        .collect()
}

impl SpilledFiles {
    /// One layer: `files` in `dir`, holding every column of `schema` in order.
    pub fn new(
        schema: SchemaRef,
        dir: ScratchDir,
        files: Vec<PathBuf>,
        rows: usize,
        bytes: usize,
    ) -> Result<Self> {
        let groups = row_groups(&files)?;
        let columns = (0..schema.fields().len()).map(|i| (0, i)).collect();
        Ok(Self {
            schema,
            layers: vec![Arc::new(Layer::new(dir, files))],
            columns,
            groups: Arc::new(groups),
            rows,
            bytes,
            split: None,
        })
    }

    /// These files, marked as split: file k holds exactly the rows whose `column` is in bucket
    /// k of `count` (`crate::steps::sql::split`).
    pub fn with_split(mut self, column: String, count: usize) -> Result<Self> {
        if self.file_count() != count || self.layers.len() != 1 {
            return Err(Error::Internal(format!(
                "{} files in {} layers marked as split in {count} buckets",
                self.file_count(),
                self.layers.len()
            )));
        }
        self.split = Some((column, count));
        Ok(self)
    }

    /// The column and bucket count when these files are split by a column (a split step's
    /// result): file k holds bucket k.
    pub fn split_by(&self) -> Option<(&str, usize)> {
        self.split.as_ref().map(|(c, n)| (c.as_str(), *n))
    }

    /// The files, when they are one layer.
    pub fn single_layer(&self) -> Option<&[PathBuf]> {
        (self.layers.len() == 1).then(|| self.layers[0].files.as_slice())
    }

    /// The rows of file `file`.
    pub fn file_rows(&self, file: usize) -> usize {
        self.groups.get(file).map_or(0, |g| g.iter().sum())
    }

    /// These files with a layer appended: `files` in `dir`, one per file of these and row for
    /// row with them, holding the columns past the first `self.schema()`'s in `full` (the
    /// schema of these columns and the appended ones). The result has the columns `kept` of
    /// `full` (by index; `None`: all). `bytes`: what the result's rows take in memory.
    pub fn append(
        &self,
        full: &SchemaRef,
        kept: Option<&[usize]>,
        dir: ScratchDir,
        files: Vec<PathBuf>,
        bytes: usize,
    ) -> Result<Self> {
        let groups = row_groups(&files)?;
        if groups != *self.groups {
            return Err(Error::Internal(format!(
                "the appended scratch files in {} do not line up with the row groups of their input",
                dir.path().display()
            )));
        }
        let base = self.schema.fields().len();
        let layer = self.layers.len();
        let all: Vec<usize> = (0..full.fields().len()).collect();
        let kept = kept.unwrap_or(&all);
        let columns = kept
            .iter()
            .map(|&i| {
                if i < base {
                    self.columns[i]
                } else {
                    (layer, i - base)
                }
            })
            .collect();
        let schema = Arc::new(
            full.project(kept)
                .map_err(|e| Error::arrow("project a step result", e))?,
        );
        let mut layers = self.layers.clone();
        layers.push(Arc::new(Layer::new(dir, files)));
        Ok(Self {
            schema,
            layers,
            columns,
            groups: self.groups.clone(),
            rows: self.rows,
            bytes,
            // Appended layers keep the rows' order, but a bucket is read as one file.
            split: None,
        })
    }

    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// How many files each layer has.
    pub fn file_count(&self) -> usize {
        self.groups.len()
    }

    pub fn layers(&self) -> usize {
        self.layers.len()
    }

    /// The first layer's files.
    #[cfg(test)]
    pub fn first_files(&self) -> &[PathBuf] {
        &self.layers[0].files
    }

    /// The batches of file `file` (row groups `groups`; `None`: all), with the columns `cols`
    /// of [`Self::schema`] (by index, in that order), in the rows' order.
    pub fn read(
        &self,
        file: usize,
        groups: Option<Range<usize>>,
        cols: &[usize],
    ) -> Result<ZipReader> {
        // The file columns each layer gives, in file order (a projection reads them so).
        let mut per_layer: Vec<Vec<usize>> = vec![Vec::new(); self.layers.len()];
        for &c in cols {
            let (layer, at) = self.columns[c];
            if !per_layer[layer].contains(&at) {
                per_layer[layer].push(at);
            }
        }
        let mut readers = Vec::new();
        let mut layer_reader = vec![usize::MAX; self.layers.len()];
        for (layer, at) in per_layer.iter_mut().enumerate() {
            // No columns at all (row counts only): the first layer with none.
            if at.is_empty() && !(cols.is_empty() && layer == 0) {
                continue;
            }
            at.sort_unstable();
            let path = &self.layers[layer].files[file];
            let f = File::open(path).map_err(|e| Error::io(path, "open a scratch file", e))?;
            let mut builder =
                ParquetRecordBatchReaderBuilder::try_new(f).map_err(|e| read_err(path, e))?;
            let mask = ProjectionMask::roots(builder.parquet_schema(), at.iter().copied());
            builder = builder.with_projection(mask).with_batch_size(BATCH_ROWS);
            if let Some(g) = &groups {
                builder = builder.with_row_groups(g.clone().collect());
            }
            layer_reader[layer] = readers.len();
            readers.push((
                builder.build().map_err(|e| read_err(path, e))?,
                path.clone(),
            ));
        }
        // Every layer a column is in was opened above, with that column in its projection.
        let map = cols
            .iter()
            .map(|&c| {
                let (layer, at) = self.columns[c];
                let pos = per_layer[layer].iter().position(|x| *x == at);
                pos.map(|p| (layer_reader[layer], p)).ok_or_else(|| {
                    Error::Internal(format!("column {c} of a spilled result was not read"))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let schema = Arc::new(
            self.schema
                .project(cols)
                .map_err(|e| Error::arrow("project a step result", e))?,
        );
        Ok(ZipReader {
            readers,
            map,
            schema,
        })
    }

    /// Statistics of `rows` of these rows with the columns `cols`: rows exact, bytes as the
    /// rows took in memory when written, in proportion to the columns.
    pub fn statistics(&self, rows: usize, cols: &[usize]) -> Result<Statistics> {
        let width = self.schema.fields().len().max(1);
        let bytes = self.bytes as f64 * (rows as f64 / self.rows.max(1) as f64) * cols.len() as f64
            / width as f64;
        let schema = self
            .schema
            .project(cols)
            .map_err(|e| Error::arrow("project a step result", e))?;
        Ok(Statistics::new_unknown(&schema)
            .with_num_rows(Precision::Exact(rows))
            .with_total_byte_size(Precision::Inexact(bytes as usize)))
    }

    /// The row groups of all files split into at most `n` runs of about the same number of
    /// row groups, each run a list of (file, row groups) in order.
    fn split(&self, n: usize) -> Vec<Vec<(usize, Range<usize>)>> {
        let total: usize = self.groups.iter().map(Vec::len).sum();
        let per = total.div_ceil(n.max(1)).max(1);
        let mut runs = Vec::new();
        let mut run: Vec<(usize, Range<usize>)> = Vec::new();
        let mut in_run = 0;
        for (file, groups) in self.groups.iter().enumerate() {
            let mut start = 0;
            while start < groups.len() {
                let end = (start + per - in_run).min(groups.len());
                run.push((file, start..end));
                in_run += end - start;
                start = end;
                if in_run == per {
                    runs.push(std::mem::take(&mut run));
                    in_run = 0;
                }
            }
        }
        if !run.is_empty() {
            runs.push(run);
        }
        runs
    }
}

/// The batches of one file of a [`SpilledFiles`], its layers read side by side.
pub struct ZipReader {
    readers: Vec<(ParquetRecordBatchReader, PathBuf)>,
    /// For each output column: its reader and its index in that reader's batches.
    map: Vec<(usize, usize)>,
    schema: SchemaRef,
}

impl Iterator for ZipReader {
    type Item = Result<RecordBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut batches = Vec::with_capacity(self.readers.len());
        for (reader, path) in &mut self.readers {
            match reader.next() {
                Some(Ok(b)) => batches.push(Some(b)),
                Some(Err(e)) => return Some(Err(read_err(path, e))),
                None => batches.push(None),
            }
        }
        let len = |b: &Option<RecordBatch>| b.as_ref().map_or(0, RecordBatch::num_rows);
        let rows = batches.first().map_or(0, len);
        if let Some((b, (_, path))) = batches
            .iter()
            .zip(&self.readers)
            .find(|(b, _)| len(b) != rows)
        {
            return Some(Err(Error::Internal(format!(
                "scratch file {} gave {} rows where its first layer gave {rows}",
                path.display(),
                len(b)
            ))));
        }
        if batches.iter().all(Option::is_none) {
            return None;
        }
        let batches: Vec<RecordBatch> = batches.into_iter().flatten().collect();
        let columns: Vec<ArrayRef> = self
            .map
            .iter()
            .map(|(r, i)| batches[*r].column(*i).clone())
            .collect();
        let options = RecordBatchOptions::new().with_row_count(Some(rows));
        Some(
            RecordBatch::try_new_with_options(self.schema.clone(), columns, &options)
                .map_err(|e| Error::arrow("read a scratch file", e)),
        )
    }
}

/// Scans a layered [`SpilledFiles`]: each partition reads a run of row groups, every layer's
/// file side by side, on a blocking thread.
#[derive(Debug)]
pub struct ZipExec {
    files: SpilledFiles,
    cols: Vec<usize>,
    runs: Vec<Vec<(usize, Range<usize>)>>,
    schema: SchemaRef,
    cache: Arc<PlanProperties>,
}

impl ZipExec {
    /// A scan of the columns `cols` of `files` in at most `partitions` partitions.
    pub fn new(files: SpilledFiles, cols: Vec<usize>, partitions: usize) -> Result<Self> {
        let runs = files.split(partitions);
        let schema = Arc::new(
            files
                .schema
                .project(&cols)
                .map_err(|e| Error::arrow("project a step result", e))?,
        );
        let cache = PlanProperties::new(
            EquivalenceProperties::new(schema.clone()),
            Partitioning::UnknownPartitioning(runs.len().max(1)),
            EmissionType::Incremental,
            Boundedness::Bounded,
        )
        .with_scheduling_type(SchedulingType::Cooperative);
        Ok(Self {
            files,
            cols,
            runs,
            schema,
            cache: Arc::new(cache),
        })
    }
}

impl DisplayAs for ZipExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "ScratchZipExec: files={}, layers={}, partitions={}",
            self.files.file_count(),
            self.files.layers(),
            self.runs.len()
        )
    }
}

impl ExecutionPlan for ZipExec {
    fn name(&self) -> &'static str {
        "ScratchZipExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.cache
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> datafusion::error::Result<TreeNodeRecursion>,
    ) -> datafusion::error::Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn replace_children(
        self: Arc<Self>,
        _: Vec<Arc<dyn ExecutionPlan>>,
        _: ReplaceChildrenOptions,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        self.replace_children(
            children,
            ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
        )
    }

    /// Rows exactly (from the files' footers), bytes as the rows took in memory when written,
    /// in proportion to the columns read: joins build on the smaller side by these.
    fn statistics_from_inputs(
        &self,
        _input_stats: &[Arc<Statistics>],
        args: &StatisticsArgs,
    ) -> datafusion::error::Result<Arc<Statistics>> {
        let rows = match args.partition() {
            Some(p) => self
                .runs
                .get(p)
                .map(|run| {
                    run.iter()
                        .map(|(file, groups)| {
                            self.files.groups[*file][groups.clone()]
                                .iter()
                                .sum::<usize>()
                        })
                        .sum()
                })
                .unwrap_or(0),
            None => self.files.rows,
        };
        let stats = self
            .files
            .statistics(rows, &self.cols)
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        Ok(Arc::new(stats))
    }

    fn execute(
        &self,
        partition: usize,
        _context: Arc<TaskContext>,
    ) -> datafusion::error::Result<SendableRecordBatchStream> {
        let mut builder = RecordBatchReceiverStreamBuilder::new(self.schema.clone(), 2);
        let tx = builder.tx();
        let run = self.runs.get(partition).cloned().unwrap_or_default();
        let (files, cols) = (self.files.clone(), self.cols.clone());
        builder.spawn_blocking(move || {
            for (file, groups) in run {
                let reader = files
                    .read(file, Some(groups), &cols)
                    .map_err(|e| DataFusionError::External(Box::new(e)))?;
                for batch in reader {
                    let batch = batch.map_err(|e| DataFusionError::External(Box::new(e)));
                    if tx.blocking_send(batch).is_err() {
                        return Ok(()); // the consumer is gone
                    }
                }
            }
            Ok(())
        });
        Ok(builder.build())
    }
}
