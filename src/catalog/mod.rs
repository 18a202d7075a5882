//! Where data lives: configured object stores ([`stores`]) and the input tables a job reads
//! ([`inputs`]).

pub mod footer;
pub mod inputs;
pub mod stores;
