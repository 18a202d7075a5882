//! The crate's error type. User mistakes (config, SQL, input data, unreachable stores) are kept
//! apart from bugs (`Internal`), and every variant says what it is about (job, input, file, URL).

use std::path::PathBuf;

use crate::config::Diagnostic;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// One or more problems in config, job or SQL files.
    #[error("{}", render_diagnostics(.0))]
    Config(Vec<Diagnostic>),

    /// A command-line argument that names nothing (an unknown step, say).
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

    #[error("{context}")]
    DataFusion {
        context: String,
        #[source]
        source: datafusion::error::DataFusionError,
    },

    #[error("{path}: {action}")]
    Io {
        path: PathBuf,
        action: String,
        #[source]
        source: std::io::Error,
    },

    #[error("run cancelled: {0}")]
    Cancelled(String),

    #[error("internal error (a bug in clvflow, please report it): {0}")]
    Internal(String),
}

fn render_diagnostics(diags: &[Diagnostic]) -> String {
    let mut s = String::new();
    for (i, d) in diags.iter().enumerate() {
        if i > 0 {
            s.push('\n');
        }
        s.push_str(&d.to_string());
    }
    s
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

    pub fn io(path: impl Into<PathBuf>, action: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            action: action.into(),
            source,
        }
    }
}
