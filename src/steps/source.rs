//! A table as a model step reads it: every batch of a held or spilled step result in one
//! fixed order, as often as the step needs (once for the columns a fit needs, once more to
//! append the results to every row), so the step never holds its whole input at once.
//!
//! Invariant: the order [`Source::scan`] gives is the same on every call for the same table;
//! model steps line their computed columns up with the rows by that order.

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::TableProvider;
use datafusion::error::DataFusionError;
use datafusion::prelude::SessionContext;

use super::rows::{HeldTable, Rows};
use super::spill::{SpilledFiles, SpilledTable};
use crate::error::{Error, Result};

/// A step result (or any table) as a model step reads it: every batch, in one fixed order.
pub enum Source {
    /// Batches in memory, per partition.
    Held {
        schema: SchemaRef,
        parts: Vec<Vec<RecordBatch>>,
    },
    /// Scratch files, in order (a file's index is its partition).
    Spilled(SpilledFiles),
}

impl Source {
    /// The rows of `table`: a held or spilled step result as it is; any other table (an input)
    /// read into memory.
    pub async fn open(
        ctx: &SessionContext,
        table: &str,
    ) -> std::result::Result<Self, DataFusionError> {
        let provider = ctx.table_provider(table).await?;
        if let Some(t) = provider.downcast_ref::<HeldTable>() {
            return Ok(Source::Held {
                schema: t.schema(),
                parts: t.parts().to_vec(),
            });
        }
        if let Some(t) = provider.downcast_ref::<SpilledTable>() {
            return Ok(Source::Spilled(t.files().clone()));
        }
        let rows = Rows::read(ctx, table).await?;
        Ok(Source::Held {
            schema: rows.schema,
            parts: rows.parts,
        })
    }

    /// The rows of `table` without reading them when it is a step result (else counted by
    /// DataFusion).
    pub async fn count(
        ctx: &SessionContext,
        table: &str,
    ) -> std::result::Result<usize, DataFusionError> {
        let provider = ctx.table_provider(table).await?;
        if let Some(t) = provider.downcast_ref::<HeldTable>() {
            return Ok(t.parts().iter().flatten().map(|b| b.num_rows()).sum());
        }
        if let Some(t) = provider.downcast_ref::<SpilledTable>() {
            return Ok(t.rows());
        }
        ctx.table(table).await?.count().await
    }

    pub fn schema(&self) -> &SchemaRef {
        match self {
            Source::Held { schema, .. } => schema,
            Source::Spilled(files) => files.schema(),
        }
    }

    /// Rows in all.
    pub fn rows(&self) -> usize {
        match self {
            Source::Held { parts, .. } => parts.iter().flatten().map(|b| b.num_rows()).sum(),
            Source::Spilled(files) => files.rows(),
        }
    }

    /// Calls `f(partition, batch)` for every batch in order, with only `columns` (by name;
    /// `None`: all). A missing column is [`super::rows::ColumnError::Missing`]-style error.
    pub fn scan(
        &self,
        columns: Option<&[&str]>,
        mut f: impl FnMut(usize, RecordBatch) -> Result<()>,
    ) -> Result<()> {
        let schema = self.schema();
        let indices = match columns {
            Some(cols) => Some(
                cols.iter()
                    .map(|c| {
                        schema.index_of(c).map_err(|_| {
                            Error::Internal(format!("a model step's input lacks column `{c}`"))
                        })
                    })
                    .collect::<Result<Vec<usize>>>()?,
            ),
            None => None,
        };
        match self {
            Source::Held { parts, .. } => {
                for (i, part) in parts.iter().enumerate() {
                    for b in part {
                        let b = match &indices {
                            Some(ix) => b
                                .project(ix)
                                .map_err(|e| Error::arrow("project a step result", e))?,
                            None => b.clone(),
                        };
                        f(i, b)?;
                    }
                }
            }
            Source::Spilled(files) => {
                let all: Vec<usize>;
                let cols = match &indices {
                    Some(ix) => ix.as_slice(),
                    None => {
                        all = (0..schema.fields().len()).collect();
                        &all
                    }
                };
                for i in 0..files.file_count() {
                    for b in files.read(i, None, cols)? {
                        f(i, b?)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The rows of `columns`, in order, as [`Rows`] (one partition): for the columns a fit
    /// needs, converted batch by batch with `f`.
    pub fn each_rows(
        &self,
        columns: &[&str],
        mut f: impl FnMut(&Rows) -> Result<()>,
    ) -> Result<()> {
        self.scan(Some(columns), |_, b| {
            let rows = Rows {
                schema: b.schema(),
                parts: vec![vec![b]],
            };
            f(&rows)
        })
    }
}
