//! The crate's error type, and [`Diagnostic`]: one problem located in a user's file.
//!
//! User mistakes (config, SQL, input data, unreachable stores, a corrupt state object) are kept
//! apart from bugs ([`Error::Internal`]); every variant says what it is about (job, step, input,
//! file, URL) and keeps its source error as a source, never flattened into a string. The
//! constructors at the bottom are the way to build the common ones.

use std::fmt;
use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One problem in a config, job or SQL file: `file:line:col: field: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: usize,
    pub col: usize,
    /// Field path such as `steps[1].sql`; empty for the whole document.
    pub field: String,
    pub message: String,
}

/// A path for a message: relative to the working folder when it is inside it (what the user
/// would type), else as it is.
pub fn shown_path(path: &std::path::Path) -> String {
    let relative = std::env::current_dir().ok().and_then(|cwd| {
        path.strip_prefix(cwd)
            .ok()
            .map(std::path::Path::to_path_buf)
    });
    relative
        .unwrap_or_else(|| path.to_path_buf())
        .display()
        .to_string()
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let field = if self.field.is_empty() {
            "(document)"
        } else {
            &self.field
        };
        write!(
            f,
            "{}:{}:{}: {}: {}",
            shown_path(&self.file),
            self.line,
            self.col,
            field,
            self.message
        )
    }
}

/// A problem found by a component's checks, at a field path relative to what it checked
/// (`k_max`, `partition_by[1]`); the caller places it in the file ([`crate::config::Source`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub field: String,
    pub message: String,
}

impl Problem {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// One or more problems in config, job or SQL files (exit code 2).
    #[error("{}", render_diagnostics(.0))]
    Config(Vec<Diagnostic>),

    /// A command-line argument that names nothing or cannot be used (exit code 2).
    #[error("{0}")]
    Usage(String),

    #[error("job `{job}`: input `{input}`: {message}")]
    Input {
        job: String,
        input: String,
        message: String,
    },

    #[error("job `{job}`: input `{input}`: file {file}: {message}")]
    InputFile {
        job: String,
        input: String,
        file: String,
        message: String,
    },

    #[error("job `{job}`: step `{step}` failed")]
    Step {
        job: String,
        step: String,
        #[source]
        source: datafusion::error::DataFusionError,
    },

    /// A step that ran out of the memory pool (`engine.memory_limit`): says what to set.
    #[error(
        "{what}: memory budget exceeded: it needs more memory than engine.memory_limit ({limit}) gives it: {hint}"
    )]
    OutOfMemory {
        /// `job `j`: step `s``, or `write output `o` to URL`.
        what: String,
        limit: String,
        /// What to set.
        hint: &'static str,
        #[source]
        source: datafusion::error::DataFusionError,
    },

    /// A model step that the data cannot support (no repeat buyers, a feature with NULLs, ...).
    #[error("job `{job}`: step `{step}`: {message}")]
    Model {
        job: String,
        step: String,
        message: String,
    },

    #[error("job `{job}`: output `{output}`: {message}")]
    Output {
        job: String,
        output: String,
        message: String,
    },

    #[error("object store {url}: {action}")]
    Store {
        url: String,
        action: String,
        #[source]
        source: object_store::Error,
    },

    /// A Delta Lake table that cannot be read or committed to (deltalake's error below).
    #[error("Delta table {url}: {action}")]
    Delta {
        url: String,
        action: String,
        #[source]
        source: Box<deltalake_core::DeltaTableError>,
    },

    /// One of clvflow's own objects (a commit marker, a lease, a history record) that is not
    /// what clvflow writes: edited or damaged by hand.
    #[error("{url}: {what} is not valid (was it edited by hand?)")]
    Corrupt {
        url: String,
        what: String,
        #[source]
        source: serde_json::Error,
    },

    #[error("{context}")]
    DataFusion {
        context: String,
        #[source]
        source: datafusion::error::DataFusionError,
    },

    #[error("{context}")]
    Arrow {
        context: String,
        #[source]
        source: datafusion::arrow::error::ArrowError,
    },

    #[error("{path}: {action}")]
    Io {
        path: PathBuf,
        action: String,
        #[source]
        source: std::io::Error,
    },

    /// The cluster engine: the scheduler cannot be reached, or the cluster refused the work.
    #[error("cluster: {0}")]
    Cluster(String),

    #[error("run cancelled: {0}")]
    Cancelled(String),

    #[error("internal error (a bug in clvflow, please report it): {0}")]
    Internal(String),
}

fn render_diagnostics(diags: &[Diagnostic]) -> String {
    let lines: Vec<String> = diags.iter().map(Diagnostic::to_string).collect();
    lines.join("\n")
}

/// `e` and every source below it, joined with ": " (what `anyhow`'s `{:#}` shows), for a
/// run record or a log line that must carry the cause.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut next = e.source();
    while let Some(s) = next {
        let text = s.to_string();
        if !parts.last().is_some_and(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = s.source();
    }
    parts.join(": ")
}

impl Error {
    /// True when the user's config or job files, or the command line, are at fault (exit code 2).
    pub fn is_config(&self) -> bool {
        matches!(self, Error::Config(_) | Error::Usage(_))
    }

    pub fn store(
        url: impl Into<String>,
        action: impl Into<String>,
        source: object_store::Error,
    ) -> Self {
        Error::Store {
            url: url.into(),
            action: action.into(),
            source,
        }
    }

    pub fn df(context: impl Into<String>, source: datafusion::error::DataFusionError) -> Self {
        Error::DataFusion {
            context: context.into(),
            source,
        }
    }

    /// This error as [`Error::OutOfMemory`] when DataFusion ran out of `pool` (it then says
    /// what to set); otherwise unchanged.
    pub fn out_of_memory(self, pool: &dyn datafusion::execution::memory_pool::MemoryPool) -> Self {
        use datafusion::error::DataFusionError;
        use datafusion::execution::memory_pool::MemoryLimit;
        let exhausted =
            |e: &DataFusionError| matches!(e.find_root(), DataFusionError::ResourcesExhausted(_));
        let (what, source) = match self {
            Error::Step { job, step, source } if exhausted(&source) => {
                (format!("job `{job}`: step `{step}`"), source)
            }
            Error::DataFusion { context, source } if exhausted(&source) => (context, source),
            other => return other,
        };
        let limit = match pool.memory_limit() {
            MemoryLimit::Finite(b) => format!("{} MiB", b >> 20),
            MemoryLimit::Infinite => "no limit".into(),
            MemoryLimit::Unknown => "unknown".into(),
        };
        // The pool's kind is only visible in its debug form (DataFusion's pools are opaque).
        let hint = if format!("{pool:?}").contains("GreedyMemoryPool") {
            "raise engine.memory_limit, or set engine.memory_pool: balanced (the default) so that \
             aggregations and sorts share the limit and spill to engine.spill_dir when it is \
             short (DataFusion's hash joins cannot spill)"
        } else {
            "raise engine.memory_limit (aggregations and sorts already spill to engine.spill_dir; \
             step results, model buffers and DataFusion's hash joins cannot), or lower the \
             step's datafusion.execution.target_partitions (each partition reads and buffers \
             its own data outside the pool)"
        };
        Error::OutOfMemory {
            what,
            limit,
            hint,
            source,
        }
    }

    pub fn arrow(context: impl Into<String>, source: datafusion::arrow::error::ArrowError) -> Self {
        Error::Arrow {
            context: context.into(),
            source,
        }
    }

    pub fn io(path: impl Into<PathBuf>, action: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            action: action.into(),
            source,
        }
    }

    pub fn corrupt(
        url: impl Into<String>,
        what: impl Into<String>,
        source: serde_json::Error,
    ) -> Self {
        Error::Corrupt {
            url: url.into(),
            what: what.into(),
            source,
        }
    }

    pub fn step(
        job: impl Into<String>,
        step: impl Into<String>,
        source: datafusion::error::DataFusionError,
    ) -> Self {
        Error::Step {
            job: job.into(),
            step: step.into(),
            source,
        }
    }

    pub fn model(
        job: impl Into<String>,
        step: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Error::Model {
            job: job.into(),
            step: step.into(),
            message: message.into(),
        }
    }

    pub fn output(
        job: impl Into<String>,
        output: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Error::Output {
            job: job.into(),
            output: output.into(),
            message: message.into(),
        }
    }

    pub fn input(
        job: impl Into<String>,
        input: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Error::Input {
            job: job.into(),
            input: input.into(),
            message: message.into(),
        }
    }
}
