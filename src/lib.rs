//! clvflow: batch ETL and scheduled jobs for customer value analytics on Apache DataFusion.
//!
//! A job (`jobs/<name>.yaml`) reads Parquet inputs from object storage, runs SQL steps, and
//! commits Hive-partitioned Parquet outputs with a protocol that never exposes a half-written
//! table (see [`sink`]).

pub mod catalog;
pub mod cli;
pub mod config;
pub mod cron;
pub mod demo;
pub mod deps;
pub mod engine;
pub mod error;
pub mod failpoint;
pub mod functions;
pub mod generate;
pub mod job;
pub mod lifetimes;
pub mod memstat;
pub mod runner;
pub mod scheduler;
pub mod sink;
pub mod state;
pub mod steps;

pub use error::{Error, Result};
