//! The one integration test binary (every extra binary links DataFusion again).

mod bad_input;
mod cluster;
mod commit;
mod common;
mod delta;
mod golden;
mod joins;
mod local;
mod report;
mod s3;
mod scheduler;
mod validate;
