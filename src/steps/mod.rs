//! Job steps. Each step's result is registered on the session under the step's name, so later
//! steps (and outputs) refer to it like any table. One file per step kind.

pub mod clv;
pub mod kmeans;
pub mod sql;
