//! `clvflow cluster scheduler` and `clvflow cluster executor`: Ballista 55's scheduler and
//! executor embedded in the clvflow binary. A stock Ballista executor cannot run clvflow's
//! plans: it knows neither clvflow's SQL functions (`arg_min`, `arg_max`, the partition-value
//! check) nor the object stores of config.yaml. Here both processes get them:
//! - the scheduler plans every client session with a session state that has clvflow's
//!   functions and a runtime with every configured store (it lists the files of the scans);
//! - the executors decode plans with a function registry holding clvflow's functions, and run
//!   them on a runtime with every configured store, spilling into `--work-dir`.
//!
//! Credentials come from the environment, as for every other command (the stores are the ones
//! `config.yaml` declares). Both run until SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;

use ballista_core::registry::BallistaFunctionRegistry;
use ballista_core::serde::protobuf::{
    RuntimeStatsReport, ShuffleWritePartition, TaskColumnStats, WindowStateReport,
};
use ballista_executor::execution_engine::{
    DefaultExecutionEngine, ExecutionEngine, QueryStageExecutor,
};
use ballista_executor::executor_process::{ExecutorProcessConfig, start_executor_process};
use ballista_scheduler::cluster::BallistaCluster;
use ballista_scheduler::config::SchedulerConfig;
use ballista_scheduler::scheduler_process::start_server;
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::TaskContext;
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::execution::session_state::SessionState;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::metrics::MetricsSet;
use datafusion::prelude::{SessionConfig, SessionContext};

use crate::error::{Error, Result};
use crate::storage::Stores;

/// The functions and stores of a clvflow session, on a session state made from `config`.
fn session_state(config: SessionConfig, runtime: Arc<RuntimeEnv>) -> SessionState {
    use ballista_core::extension::{
        ballista_aggregate_functions, ballista_scalar_functions, ballista_window_functions,
    };
    let state = SessionStateBuilder::new()
        .with_default_features()
        .with_config(config)
        .with_runtime_env(runtime)
        .with_optimizer_rules(ballista_core::optimizer::ballista_default_optimizer_rules())
        .with_scalar_functions(ballista_scalar_functions())
        .with_aggregate_functions(ballista_aggregate_functions())
        .with_window_functions(ballista_window_functions())
        .build();
    let ctx = SessionContext::new_with_state(state);
    super::functions::register(&ctx);
    ctx.state()
}

/// A runtime with every store of config.yaml; temporary (spill) files under `temp`.
fn runtime(stores: &Stores, temp: Option<&str>) -> datafusion::error::Result<Arc<RuntimeEnv>> {
    let mut builder = RuntimeEnvBuilder::new();
    if let Some(dir) = temp {
        builder = builder.with_temp_file_path(dir);
    }
    let runtime = builder.build_arc()?;
    for store in &stores.stores {
        runtime.register_object_store(&store.registry_url, store.object_store.clone());
    }
    Ok(runtime)
}

/// How often an executor tells the scheduler it is alive (Ballista's default is a minute, which
/// leaves a dead executor's tasks waiting minutes).
pub const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(5);

fn cluster_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Cluster(format!("{what}: {e}"))
}

/// Runs the scheduler on `bind` until the process is stopped.
/// An executor that has not sent a heartbeat for `executor_timeout` is taken for dead: its
/// tasks are run again elsewhere (executors send one every [`HEARTBEAT`]).
pub async fn scheduler(
    stores: &Stores,
    bind: SocketAddr,
    external_host: Option<String>,
    executor_timeout: std::time::Duration,
) -> Result<()> {
    let runtime = runtime(stores, None).map_err(|e| cluster_err("scheduler runtime", e))?;
    let timeout = executor_timeout.as_secs().max(2 * HEARTBEAT.as_secs());
    let config = SchedulerConfig {
        bind_host: bind.ip().to_string(),
        bind_port: bind.port(),
        external_host: external_host.unwrap_or_else(|| bind.ip().to_string()),
        executor_timeout_seconds: timeout,
        expire_dead_executor_interval_seconds: (timeout / 3).max(1),
        no_executors_grace_period_seconds: timeout,
        override_session_builder: Some(Arc::new(move |config: SessionConfig| {
            Ok(session_state(config, runtime.clone()))
        })),
        ..Default::default()
    };
    let cluster = BallistaCluster::new_from_config(&config)
        .await
        .map_err(|e| cluster_err("start the scheduler", e))?;
    tracing::info!(%bind, "Ballista scheduler with clvflow's functions and stores listening");
    tokio::select! {
        r = start_server(cluster, bind, Arc::new(config)) => r.map_err(|e| cluster_err(&format!("scheduler on {bind}"), e)),
        _ = shutdown() => {
            tracing::info!("scheduler stopped");
            Ok(())
        }
    }
}

/// How an executor runs.
#[derive(Debug, Clone)]
pub struct ExecutorOptions {
    pub scheduler_host: String,
    pub scheduler_port: u16,
    /// Host and port of its Arrow Flight service (results and shuffle files are fetched here).
    pub bind: SocketAddr,
    /// Its gRPC port (the scheduler's task calls).
    pub grpc_port: u16,
    /// The host others reach it at (default: the bind host).
    pub external_host: Option<String>,
    /// Tasks at once (0: the cores).
    pub slots: usize,
    pub work_dir: Option<String>,
    /// Bytes of memory its tasks share (spilling above it); `None`: Ballista's default share
    /// of the machine's (or cgroup's) memory.
    pub memory_pool_size: Option<u64>,
}

/// Runs an executor until the process is stopped.
pub async fn executor(stores: &Stores, opts: ExecutorOptions) -> Result<()> {
    let work_dir = opts.work_dir.clone();
    if let Some(dir) = &work_dir {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(dir, "create the executor's work folder", e))?;
    }
    let probe = runtime(stores, None).map_err(|e| cluster_err("executor runtime", e))?;
    let registry = BallistaFunctionRegistry::from(&session_state(SessionConfig::new(), probe));
    let stores = stores.clone();
    let temp = work_dir.clone();
    let config = ExecutorProcessConfig {
        bind_host: opts.bind.ip().to_string(),
        port: opts.bind.port(),
        grpc_port: opts.grpc_port,
        external_host: Some(
            opts.external_host
                .clone()
                .unwrap_or_else(|| opts.bind.ip().to_string()),
        ),
        scheduler_host: opts.scheduler_host.clone(),
        scheduler_port: opts.scheduler_port,
        vcores: opts.slots,
        work_dir: work_dir.clone(),
        memory_pool_size: opts.memory_pool_size,
        executor_heartbeat_interval_seconds: HEARTBEAT.as_secs(),
        override_function_registry: Some(Arc::new(registry)),
        override_execution_engine: Some(Arc::new(WithoutOperatorMetrics(
            DefaultExecutionEngine::new(),
        ))),
        override_runtime_producer: Some(Arc::new(move |_config: &SessionConfig| {
            runtime(&stores, temp.as_deref())
        })),
        ..Default::default()
    };
    tracing::info!(bind = %opts.bind, scheduler = %format!("{}:{}", opts.scheduler_host, opts.scheduler_port),
        "Ballista executor with clvflow's functions and stores starting");
    tokio::select! {
        r = start_executor_process(Arc::new(config)) => r.map_err(|e| cluster_err(
            &format!("executor on {} (scheduler {}:{})", opts.bind, opts.scheduler_host, opts.scheduler_port), e)),
        _ = shutdown() => {
            tracing::info!("executor stopped");
            Ok(())
        }
    }
}

/// Ballista's execution engine, except that tasks report no per-operator metrics to the
/// scheduler. Ballista 55.0.0's scheduler fails a task's status update when its metrics list
/// is not as long as the first task's of the stage, and the per-task plan rewrite (a task's
/// slice of a union can be empty) makes that happen: the task is never marked done and the
/// query hangs (seen on `rfm.sql`). An empty list is accepted ("metrics not set"). Shuffle
/// outputs, runtime statistics, window state and column statistics still go to the scheduler.
struct WithoutOperatorMetrics(DefaultExecutionEngine);

impl ExecutionEngine for WithoutOperatorMetrics {
    fn create_query_stage_exec(
        &self,
        job_id: ballista_core::ids::JobId,
        stage_id: usize,
        task_id: usize,
        global_output_partition_ids: Vec<usize>,
        plan: Arc<dyn ExecutionPlan>,
        work_dir: &str,
        config: &SessionConfig,
    ) -> datafusion::error::Result<Arc<dyn QueryStageExecutor>> {
        let inner = self.0.create_query_stage_exec(
            job_id,
            stage_id,
            task_id,
            global_output_partition_ids,
            plan,
            work_dir,
            config,
        )?;
        Ok(Arc::new(StageWithoutMetrics(inner)))
    }
}

#[derive(Debug)]
struct StageWithoutMetrics(Arc<dyn QueryStageExecutor>);

impl std::fmt::Display for StageWithoutMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

#[async_trait::async_trait]
impl QueryStageExecutor for StageWithoutMetrics {
    async fn execute_query_stage(
        &self,
        task_id: usize,
        context: Arc<TaskContext>,
    ) -> datafusion::error::Result<Vec<ShuffleWritePartition>> {
        self.0.execute_query_stage(task_id, context).await
    }

    fn collect_plan_metrics(&self) -> Vec<MetricsSet> {
        Vec::new()
    }

    fn collect_runtime_stats_reports(&self) -> Vec<RuntimeStatsReport> {
        self.0.collect_runtime_stats_reports()
    }

    fn collect_window_state_reports(&self) -> datafusion::error::Result<Vec<WindowStateReport>> {
        self.0.collect_window_state_reports()
    }

    fn collect_column_stats(&self) -> Vec<TaskColumnStats> {
        self.0.collect_column_stats()
    }
}

async fn shutdown() {
    let term = async {
        #[cfg(unix)]
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
            return;
        }
        std::future::pending::<()>().await
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
