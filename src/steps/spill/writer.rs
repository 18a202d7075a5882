//! A model step's result, pushed batch by batch in its rows' order: held while it fits, else
//! written to a scratch file, or, when it appends columns to a spilled input, only those columns
//! beside the input's files ([`super::zip`]).

use std::path::PathBuf;
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, Date32Array, RecordBatch};
use datafusion::arrow::datatypes::{Schema, SchemaRef};
use datafusion::execution::memory_pool::MemoryConsumer;
use datafusion::prelude::SessionContext;

use super::{Kept, SpillFile, SpilledFiles, register_files, register_spilled, slice_bytes};
use crate::engine::memory::BufferCounter;
use crate::engine::scratch::{ResultSpace, ScratchDir};
use crate::error::{Error, Result};

/// A model step's result, pushed batch by batch (with the index of the input partition it
/// belongs to): held while the pool and the share for results take it, else written to one
/// scratch file in the order pushed.
pub struct ResultWriter {
    ctx: SessionContext,
    name: String,
    schema: SchemaRef,
    space: Option<Arc<ResultSpace>>,
    counter: BufferCounter,
    bytes: usize,
    rows: usize,
    reservation: datafusion::execution::memory_pool::MemoryReservation,
    parts: Vec<Vec<RecordBatch>>,
    spill: Option<(ScratchDir, SpillFile)>,
    /// The columns of each pushed batch that the result keeps (by index); `None`: all.
    projection: Option<Vec<usize>>,
    /// For [`Self::push_appended`]: the input's columns and the appended ones, all of them.
    extended: Option<SchemaRef>,
    /// Appending to an input in scratch files: only the appended columns are written.
    append: Option<Appending>,
}

/// The layer a [`ResultWriter`] appends to a spilled input ([`super::zip`]).
struct Appending {
    input: SpilledFiles,
    /// The appended columns (with `run_date` first when the input has none).
    schema: SchemaRef,
    dir: ScratchDir,
    /// Closed files, one per file of the input so far.
    files: Vec<PathBuf>,
    current: Option<(usize, SpillFile)>,
}

impl Appending {
    /// Closes the open file and writes empty ones up to file index `upto` (exclusive).
    fn close_upto(&mut self, upto: usize) -> Result<()> {
        if let Some((_, f)) = self.current.take() {
            self.files.push(f.close()?);
        }
        while self.files.len() < upto {
            let f = SpillFile::open(&self.dir, self.files.len(), self.schema.clone())?;
            self.files.push(f.close()?);
        }
        Ok(())
    }

    fn write(&mut self, part: usize, batch: &RecordBatch) -> Result<()> {
        let open = self.current.as_ref().map(|(i, _)| *i);
        if open != Some(part) {
            if part < self.files.len() || open.is_some_and(|i| part < i) {
                return Err(Error::Internal(format!(
                    "a model step gave rows of its input's file {part} out of order"
                )));
            }
            self.close_upto(part)?;
            let f = SpillFile::open(&self.dir, part, self.schema.clone())?;
            self.current = Some((part, f));
        }
        match &mut self.current {
            Some((_, f)) => f.write(batch),
            None => Err(Error::Internal("no appended scratch file open".into())),
        }
    }
}

impl ResultWriter {
    pub fn new(ctx: &SessionContext, name: &str, schema: SchemaRef) -> Self {
        let pool = &ctx.runtime_env().memory_pool;
        Self {
            ctx: ctx.clone(),
            name: name.to_string(),
            schema,
            space: ResultSpace::of(ctx),
            counter: BufferCounter::default(),
            bytes: 0,
            rows: 0,
            reservation: MemoryConsumer::new(format!("step result `{name}`")).register(pool),
            parts: Vec::new(),
            spill: None,
            projection: None,
            extended: None,
            append: None,
        }
    }

    /// The writer of a step whose result is every row of `source` (its input, read in
    /// [`crate::steps::source::Source::scan`]'s order) with columns appended; `schema`: the input's
    /// columns and the appended ones ([`crate::steps::rows::appended_schema`]). Batches come through
    /// [`Self::push_appended`]. When the input is in scratch files, only the appended columns
    /// are written, file by file beside the input's ([`super::zip`]): the input is not copied.
    pub fn appending(
        cx: &crate::steps::StepContext<'_>,
        source: &crate::steps::source::Source,
        schema: SchemaRef,
    ) -> Result<Self> {
        let mut writer = Self::for_step(cx, schema.clone())?;
        writer.extended = Some(schema.clone());
        if let (crate::steps::source::Source::Spilled(input), Some(space)) = (source, &writer.space)
        {
            let base = input.schema().fields().len();
            let layer = Arc::new(Schema::new(schema.fields()[base..].to_vec()));
            writer.append = Some(Appending {
                input: input.clone(),
                schema: layer,
                dir: space.folder(&cx.step.name)?,
                files: Vec::new(),
                current: None,
            });
        }
        Ok(writer)
    }

    /// Whether only the appended columns are written: [`Self::push_appended`] then needs the
    /// input's batches for their lengths only (read just the columns the step itself needs).
    pub fn appends(&self) -> bool {
        self.append.is_some()
    }

    /// Rows `input` (a batch of the input, from partition or file `part`; only its length is
    /// used when [`Self::appends`]) with the columns `added` appended, and `run_date` = `day`
    /// when the input has none.
    pub fn push_appended(
        &mut self,
        part: usize,
        input: &RecordBatch,
        day: i32,
        added: Vec<ArrayRef>,
    ) -> Result<()> {
        let Some(append) = &mut self.append else {
            let Some(schema) = &self.extended else {
                return Err(Error::Internal(
                    "push_appended on a writer not made by `appending`".into(),
                ));
            };
            let batch = crate::steps::rows::extend_batch(schema, input, day, added)?;
            return self.push(part, batch);
        };
        let n = input.num_rows();
        let mut cols: Vec<ArrayRef> = Vec::with_capacity(append.schema.fields().len());
        if append.schema.fields().len() > added.len() {
            cols.push(Arc::new(Date32Array::from(vec![day; n])));
        }
        cols.extend(added);
        let batch = RecordBatch::try_new(append.schema.clone(), cols)
            .map_err(|e| Error::arrow("append the step's columns", e))?;
        self.rows += n;
        self.bytes += slice_bytes(&batch);
        append.write(part, &batch)
    }

    /// The writer of the step's own result (named after the step), holding only the columns
    /// of `schema` that later steps read ([`crate::steps::StepContext::keep`]): the columns a
    /// model step passes through from its input and nobody reads are let go batch by batch,
    /// in memory and in scratch files alike.
    pub fn for_step(cx: &crate::steps::StepContext<'_>, schema: SchemaRef) -> Result<Self> {
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        let Some(kept) = cx.kept_columns(&names) else {
            return Ok(Self::new(cx.session, &cx.step.name, schema));
        };
        let projected = schema
            .project(&kept)
            .map_err(|e| Error::Internal(format!("project `{}`: {e}", cx.step.name)))?;
        let mut writer = Self::new(cx.session, &cx.step.name, Arc::new(projected));
        writer.projection = Some(kept);
        Ok(writer)
    }

    pub fn push(&mut self, part: usize, batch: RecordBatch) -> Result<()> {
        if self.append.is_some() {
            return Err(Error::Internal(format!(
                "`{}`: a writer that appends takes its batches through push_appended",
                self.name
            )));
        }
        let batch = match &self.projection {
            Some(kept) => batch
                .project(kept)
                .map_err(|e| Error::Internal(format!("project `{}`: {e}", self.name)))?,
            None => batch,
        };
        self.rows += batch.num_rows();
        if let Some((_, file)) = &mut self.spill {
            // See `collect_or_spill`: written batches are counted by their own size.
            self.bytes += slice_bytes(&batch);
            return file.write(&batch);
        }
        let add = self.counter.add(&batch) as usize;
        self.bytes += add;
        let fits = self.space.as_ref().is_none_or(|s| s.may_hold(self.bytes));
        if fits {
            match self.reservation.try_grow(add) {
                Ok(()) => {
                    if self.parts.len() <= part {
                        self.parts.resize_with(part + 1, Vec::new);
                    }
                    self.parts[part].push(batch);
                    return Ok(());
                }
                // No scratch space (a session not made by an engine): as before, the pool
                // decides, and a full pool is the error.
                Err(e) if self.space.is_none() => {
                    return Err(Error::df(
                        format!("step `{}`: keeping its result in memory", self.name),
                        e,
                    ));
                }
                Err(_) => {}
            }
        }
        let Some(space) = &self.space else {
            return Err(Error::Internal(
                "a result without scratch space always fits its share".into(),
            ));
        };
        let dir = space.folder(&self.name)?;
        let mut file = SpillFile::open(&dir, 0, self.schema.clone())?;
        for b in self.parts.drain(..).flatten() {
            file.write(&b)?;
        }
        file.write(&batch)?;
        self.reservation.free();
        self.spill = Some((dir, file));
        Ok(())
    }

    /// Registers the result; returns how it was kept.
    pub async fn finish(self) -> Result<Kept> {
        let Self {
            ctx,
            name,
            schema,
            bytes,
            rows,
            reservation,
            parts,
            spill,
            projection,
            extended,
            append,
            ..
        } = self;
        if let (Some(mut append), Some(full)) = (append, extended) {
            append.close_upto(append.input.file_count())?;
            let bytes = append.input.bytes() + bytes;
            let folder = append.dir.path().display().to_string();
            let files = append.input.append(
                &full,
                projection.as_deref(),
                append.dir,
                append.files,
                bytes,
            )?;
            tracing::info!(table = name.as_str(), rows, folder = %folder,
                           "step result: its columns appended to the scratch files of its input");
            register_files(&ctx, &name, files, None)?;
            return Ok(Kept {
                rows,
                held: 0,
                spilled: bytes,
            });
        }
        match spill {
            None => {
                let held = crate::steps::rows::register_counted(
                    &ctx,
                    &name,
                    schema,
                    parts,
                    vec![reservation],
                )?;
                Ok(Kept {
                    rows,
                    held,
                    spilled: 0,
                })
            }
            Some((dir, file)) => {
                let path = file.close()?;
                register_spilled(&ctx, &name, schema, dir, vec![path], rows, bytes).await?;
                Ok(Kept {
                    rows,
                    held: 0,
                    spilled: bytes,
                })
            }
        }
    }
}
