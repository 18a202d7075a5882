//! SQL functions clvflow adds to DataFusion: [`arg_extreme`] (`arg_min` / `arg_max`, so the SQL
//! library runs unchanged on DuckDB), [`second_min`] (a group's second smallest value, DuckDB's
//! `min(x, 2)[2]`) and [`partition_value`] (the output writer's check of Hive partition values). Registered on every session the engine makes, and, on a cluster, on the
//! scheduler and executors too.

mod arg_extreme;
mod partition_value;
mod second_min;

use datafusion::logical_expr::{AggregateUDF, ScalarUDF};
use datafusion::prelude::SessionContext;

pub use partition_value::{PARTITION_VALUE, date_folder_type};

/// Registers every clvflow SQL function on `ctx`.
pub fn register(ctx: &SessionContext) {
    for f in aggregate_functions() {
        ctx.register_udaf(f);
    }
    for f in scalar_functions() {
        ctx.register_udf(f);
    }
}

/// clvflow's aggregate functions.
pub fn aggregate_functions() -> Vec<AggregateUDF> {
    vec![
        AggregateUDF::from(arg_extreme::ArgExtreme::new(arg_extreme::Extreme::Min)),
        AggregateUDF::from(arg_extreme::ArgExtreme::new(arg_extreme::Extreme::Max)),
        AggregateUDF::from(second_min::SecondMin::new()),
    ]
}

/// clvflow's scalar functions.
pub fn scalar_functions() -> Vec<ScalarUDF> {
    vec![ScalarUDF::from(partition_value::PartitionValue::new())]
}

/// A session for the functions' unit tests: `partitions` target partitions, clvflow's functions
/// registered, and with `skip_partial` the partial aggregation skipped from the first row (so
/// input rows become states through `convert_to_state`).
#[cfg(test)]
fn test_session(partitions: usize, skip_partial: bool) -> SessionContext {
    let mut config = datafusion::prelude::SessionConfig::new().with_target_partitions(partitions);
    if skip_partial {
        config = config
            .set_usize(
                "datafusion.execution.skip_partial_aggregation_probe_rows_threshold",
                1,
            )
            .set_str(
                "datafusion.execution.skip_partial_aggregation_probe_ratio_threshold",
                "0.0",
            );
    }
    let ctx = SessionContext::new_with_config(config);
    register(&ctx);
    ctx
}
