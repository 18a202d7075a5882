//! SQL steps: a file with one query, templated (`{{ run_date }}`, `{{ params.x }}`,
//! [`template`]), planned by DataFusion against the inputs and earlier steps, and materialised
//! once so outputs and later steps do not recompute it — or, when its result goes to one output
//! only, registered as a view that the output's write computes while it streams.

pub mod partitions;
pub mod split;
pub mod template;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::datasource::MemTable;
use datafusion::error::DataFusionError;
use datafusion::prelude::{DataFrame, SessionContext};

use super::{CheckContext, StepContext, StepOutcome};
use crate::config::Diagnostic;
use crate::error::{Error, Result};
use template::{Rendered, Template, TemplateError};

/// A checked SQL step.
#[derive(Debug, Clone)]
pub struct SqlStep {
    /// The SQL file (absolute), for diagnostics.
    pub file: PathBuf,
    pub template: Template,
}

fn template_diags(
    file: &std::path::Path,
    field: &str,
    errors: Vec<TemplateError>,
) -> Vec<Diagnostic> {
    errors
        .into_iter()
        .map(|e| Diagnostic {
            file: file.to_path_buf(),
            line: e.line,
            col: e.col,
            field: field.to_string(),
            message: e.message,
        })
        .collect()
}

impl SqlStep {
    /// Reads and parses the SQL file `path` (relative to the project folder); every template
    /// name must be defined.
    pub fn check(path: &str, cx: &CheckContext) -> std::result::Result<Self, Vec<Diagnostic>> {
        let file = cx.root.join(path);
        let field = format!("{}.sql", cx.field);
        let text = std::fs::read_to_string(&file).map_err(|e| {
            vec![cx.diag(
                "sql",
                format!(
                    "cannot read SQL file `{path}`: {e}; the path is relative to {}",
                    cx.root.display()
                ),
            )]
        })?;
        let template =
            Template::parse(&text).map_err(|e| template_diags(&file, &field, vec![e]))?;
        let undefined = template.undefined(cx.template_names);
        if !undefined.is_empty() {
            return Err(template_diags(&file, &field, undefined));
        }
        Ok(Self { file, template })
    }

    fn render(&self, vars: &BTreeMap<String, String>, field: &str) -> Result<Rendered> {
        self.template.render(vars).map_err(|errs| {
            Error::Config(template_diags(&self.file, &format!("{field}.sql"), errs))
        })
    }

    /// The step's query, planned on [`Self::session`].
    pub async fn dataframe(&self, cx: &StepContext<'_>) -> Result<DataFrame> {
        let sql = self.render(cx.vars, &cx.step.field)?;
        cx.session.sql(&sql.sql).await.map_err(|e| cx.df_err(e))
    }

    /// The columns the query reads of each table (lower-cased), from its optimized plan on
    /// `session`: the columns of every table scan after DataFusion's projection pushdown, and
    /// those of filters pushed into the scans. `None` when it does not plan.
    pub async fn column_reads(
        &self,
        session: &SessionContext,
        vars: &BTreeMap<String, String>,
    ) -> Option<super::ColumnReads> {
        use datafusion::common::tree_node::TreeNodeRecursion;
        use datafusion::logical_expr::LogicalPlan;
        let plan = self.optimized_plan(session, vars).await?;
        let mut reads = super::ColumnReads::new();
        plan.apply_with_subqueries(|node| {
            if let LogicalPlan::TableScan(scan) = node {
                let mut cols: BTreeSet<String> = scan
                    .projected_schema
                    .fields()
                    .iter()
                    .map(|f| f.name().to_lowercase())
                    .collect();
                for filter in &scan.filters {
                    cols.extend(filter.column_refs().iter().map(|c| c.name.to_lowercase()));
                }
                let entry = reads
                    .entry(scan.table_name.table().to_lowercase())
                    .or_insert_with(|| Some(BTreeSet::new()));
                if let Some(set) = entry {
                    set.extend(cols);
                }
            }
            Ok(TreeNodeRecursion::Continue)
        })
        .ok()?;
        Some(reads)
    }

    /// The query's optimized logical plan on `session`; `None` when it does not plan.
    async fn optimized_plan(
        &self,
        session: &SessionContext,
        vars: &BTreeMap<String, String>,
    ) -> Option<datafusion::logical_expr::LogicalPlan> {
        let sql = self.template.render(vars).ok()?.sql;
        session.sql(&sql).await.ok()?.into_optimized_plan().ok()
    }

    /// The query's equi-joins (the joins DataFusion plans as hash or sort-merge joins), each as
    /// the tables scanned under its two sides (lower-cased; a table read twice on a side is
    /// listed twice), from its optimized plan on `session`, subqueries included. `None` when
    /// it does not plan.
    pub async fn equi_joins(
        &self,
        session: &SessionContext,
        vars: &BTreeMap<String, String>,
    ) -> Option<Vec<[Vec<String>; 2]>> {
        use datafusion::common::tree_node::TreeNodeRecursion;
        use datafusion::logical_expr::LogicalPlan;
        fn scans(plan: &LogicalPlan) -> Vec<String> {
            let mut names = Vec::new();
            let _ = plan.apply_with_subqueries(|node| {
                if let LogicalPlan::TableScan(scan) = node {
                    names.push(scan.table_name.table().to_lowercase());
                }
                Ok(TreeNodeRecursion::Continue)
            });
            names
        }
        let plan = self.optimized_plan(session, vars).await?;
        let mut joins = Vec::new();
        plan.apply_with_subqueries(|node| {
            if let LogicalPlan::Join(join) = node
                && !join.on.is_empty()
            {
                joins.push([scans(&join.left), scans(&join.right)]);
            }
            Ok(TreeNodeRecursion::Continue)
        })
        .ok()?;
        Some(joins)
    }

    /// The tables the query reads (CTE names excluded), lower-cased, from DataFusion's parser.
    pub fn reads(
        &self,
        session: &SessionContext,
        vars: &BTreeMap<String, String>,
    ) -> Option<BTreeSet<String>> {
        let sql = self.template.render(vars).ok()?.sql;
        let state = session.state();
        let dialect = state.config().options().sql_parser.dialect;
        let statement = state.sql_to_statement(&sql, &dialect).ok()?;
        let refs = state.resolve_table_references(&statement).ok()?;
        Some(refs.iter().map(|r| r.table().to_lowercase()).collect())
    }

    /// Runs the query and registers its (materialised) result under the step's name: in memory
    /// while it fits the share for results, else in scratch files. With `cx.keep` only the
    /// columns later steps read are kept; DataFusion then does not compute the others either
    /// where it can leave them out.
    pub async fn run(&self, cx: &StepContext<'_>) -> Result<StepOutcome> {
        if let Some(buckets) = cx.split {
            return split::run(self, cx, buckets).await;
        }
        let started = Instant::now();
        let mut df = self.dataframe(cx).await?;
        let names: Vec<String> = (df.schema().fields().iter())
            .map(|f| f.name().clone())
            .collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        if let Some(kept) = cx.kept_columns(&names) {
            let kept: Vec<&str> = kept.iter().map(|&i| names[i]).collect();
            df = df.select_columns(&kept).map_err(|e| cx.df_err(e))?;
        }
        // Kept in the plan's output partitions: later steps scan them in parallel as they are.
        let what = format!("step `{}`: its result", cx.step.name);
        let kept = super::spill::collect_or_spill(cx.session, &what, &cx.step.name, df)
            .await
            .map_err(|e| match e {
                Error::DataFusion { source, .. } => cx.df_err(source),
                e => e,
            })?;
        Ok(StepOutcome {
            rows: kept.rows,
            bytes: kept.held,
            spilled: kept.spilled,
            elapsed: started.elapsed(),
            timings: Vec::new(),
        })
    }

    /// Registers the query as a view on `cx.session` (planned now, run when read): for a step
    /// whose result streams straight into its output's files; the write runs on that session.
    pub async fn register_view(&self, cx: &StepContext<'_>) -> Result<()> {
        let df = self.dataframe(cx).await?;
        cx.session
            .register_table(&cx.step.name, df.into_view())
            .map_err(|e| cx.df_err(e))?;
        Ok(())
    }

    /// Plans the query without reading data and registers an empty table of its result schema,
    /// so later steps can be planned too. Problems point into the SQL file as written.
    pub async fn declare(
        &self,
        cx: &StepContext<'_>,
    ) -> std::result::Result<Vec<(String, SchemaRef)>, Vec<Diagnostic>> {
        let field = format!("{}.sql", cx.step.field);
        let rendered = self
            .template
            .render(cx.vars)
            .map_err(|errs| template_diags(&self.file, &field, errs))?;
        let diag = |e: DataFusionError| vec![self.plan_diagnostic(&rendered, &field, &e)];
        let df = cx.session.sql(&rendered.sql).await.map_err(diag)?;
        let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
        let table = MemTable::try_new(schema.clone(), vec![vec![]]).map_err(diag)?;
        cx.session
            .register_table(&cx.step.name, Arc::new(table))
            .map_err(diag)?;
        Ok(vec![(cx.step.name.clone(), schema)])
    }

    /// "SQL does not plan" at the place in the file the error is about (1:1 when DataFusion
    /// gives no place). The parser's own " at Line: l, Column: c" (of the rendered text) is
    /// dropped from the message: the position in front is the right one.
    fn plan_diagnostic(&self, rendered: &Rendered, field: &str, e: &DataFusionError) -> Diagnostic {
        let (line, col) = e
            .diagnostic()
            .and_then(|d| d.span)
            .map(|s| rendered.original(s.start.line as usize, s.start.column as usize))
            .unwrap_or((1, 1));
        let message = e.strip_backtrace();
        let mut first = message.lines().next().unwrap_or_default().to_string();
        if let Some(i) = first.find(" at Line: ") {
            first.truncate(i);
        }
        Diagnostic {
            file: self.file.clone(),
            line: line.max(1),
            col: col.max(1),
            field: field.to_string(),
            message: format!("SQL does not plan: {first}"),
        }
    }
}
