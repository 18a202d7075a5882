//! clvflow: batch ETL and scheduled jobs for customer value analytics on Apache DataFusion.
//!
//! A job (`jobs/<name>.yaml`) reads Parquet inputs from object storage, runs SQL and model
//! steps, and commits Hive-partitioned Parquet outputs with a protocol that never exposes a
//! half-written table (see [`sink`]). Modules, lowest first (none imports one above it):
//! [`error`] → [`config`] → [`storage`] → [`engine`] → [`project`] → [`inputs`] → [`steps`],
//! [`sink`] → [`job`] → [`run`] → [`state`] → [`scheduler`] → [`demo`] → [`cli`]. The README's
//! "Code map" says what each owns.

pub mod cli;
pub(crate) mod config;
pub mod demo;
pub mod engine;
pub mod error;
pub(crate) mod inputs;
pub mod job;
pub mod project;
pub mod report;
pub mod run;
pub mod scheduler;
pub mod sink;
pub mod state;
pub mod steps;
pub(crate) mod storage;

pub use error::{Error, Result};
