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

use ballista_core::config::TaskSchedulingPolicy;
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
use ballista_scheduler::scheduler_process::{create_scheduler, start_grpc_service};
use ballista_scheduler::scheduler_server::SchedulerServer;
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::TaskContext;
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::execution::session_state::SessionState;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::metrics::MetricsSet;
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion_proto::protobuf::{LogicalPlanNode, PhysicalPlanNode};

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

/// Tasks are pulled by the executors (`PullStaged`), not pushed by the scheduler: with push
/// scheduling, Ballista 55's scheduler counts each executor's free slots itself and gives a
/// slot back only for a task status it can match to a running stage. When an executor dies,
/// the stages reading its shuffle files are rolled back, and the statuses of their tasks that
/// then finish elsewhere match nothing: those slots are never given back, and once an
/// executor's slots are all lost no task is ever offered again (the job hung, seen in the
/// executor-kill test). A pulling executor reports its own free slots on every poll.
///
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
        scheduling_policy: TaskSchedulingPolicy::PullStaged,
        override_session_builder: Some(Arc::new(move |config: SessionConfig| {
            Ok(session_state(config, runtime.clone()))
        })),
        ..Default::default()
    };
    let cluster = BallistaCluster::new_from_config(&config)
        .await
        .map_err(|e| cluster_err("start the scheduler", e))?;
    let config = Arc::new(config);
    config
        .validate()
        .map_err(|e| cluster_err("scheduler settings", e))?;
    let server = create_scheduler::<LogicalPlanNode, PhysicalPlanNode>(cluster, config)
        .await
        .map_err(|e| cluster_err("start the scheduler", e))?;
    let stall = stalled_job_timeout(std::time::Duration::from_secs(timeout));
    tokio::spawn(watch_stalled_jobs(server.clone(), stall));
    tracing::info!(%bind, stalled_job_timeout = %humantime::format_duration(stall),
        "Ballista scheduler with clvflow's functions and stores listening");
    tokio::select! {
        r = start_grpc_service(bind, server) => r.map_err(|e| cluster_err(&format!("scheduler on {bind}"), e)),
        _ = shutdown() => {
            tracing::info!("scheduler stopped");
            Ok(())
        }
    }
}

/// How long a job may stay stuck ([`JobProgress::stuck`]) before the scheduler cancels it:
/// long enough for a dead executor to be noticed (`executor_timeout` plus one expiry check)
/// and its tasks to be given out again, with a margin.
fn stalled_job_timeout(executor_timeout: std::time::Duration) -> std::time::Duration {
    2 * executor_timeout + std::time::Duration::from_secs(30)
}

/// What the watchdog sees of a running job: stages done, tasks that can be given out, and
/// tasks running on executors that are alive (a heartbeat within the executor timeout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct JobProgress {
    completed_stages: usize,
    available_tasks: usize,
    live_tasks: usize,
}

impl JobProgress {
    /// The job cannot finish by itself: nothing of it runs and nothing of it can be run, or it
    /// has tasks to run but no task of any job runs on a cluster that has live executors.
    fn stuck(&self, cluster_busy: bool, executors_alive: bool) -> bool {
        self.live_tasks == 0 && (self.available_tasks == 0 || (!cluster_busy && executors_alive))
    }
}

/// Cancels jobs that cannot finish, so that their clients fail with an error instead of
/// polling the job's status for ever (Ballista's client has no bound of its own). Ballista 55
/// has lost jobs after an executor died mid-run (slots never given back under push scheduling,
/// see [`scheduler`]; its adaptive planner's "Can't find active stage to update stage
/// outputs"). A job that stays stuck ([`JobProgress::stuck`]) with nothing changing for
/// `stall` is cancelled. A job waiting for slots that other jobs hold, or for an executor to
/// (re)start, is left alone.
async fn watch_stalled_jobs(
    server: SchedulerServer<LogicalPlanNode, PhysicalPlanNode>,
    stall: std::time::Duration,
) {
    use std::collections::HashMap;
    use std::time::Instant;
    let every = HEARTBEAT.min(stall / 4);
    let mut seen: HashMap<String, (JobProgress, Instant)> = HashMap::new();
    loop {
        tokio::time::sleep(every).await;
        let jobs = server.state.task_manager.get_running_job_cache();
        seen.retain(|id, _| jobs.keys().any(|j| j.as_str() == id));
        let now_secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let alive = |executor: &str| {
            server
                .state
                .executor_manager
                .get_executor_hearbeat(executor)
                .is_some_and(|h| {
                    now_secs.saturating_sub(h.timestamp)
                        < server.state.config.executor_timeout_seconds
                })
        };
        // Unknown executors count as none alive: then only a job with nothing left to run is
        // taken for stuck, never one that may be waiting for an executor.
        let executors_alive = match server.state.executor_manager.get_executors_state().await {
            Ok(executors) => executors.iter().any(|(m, _, _)| alive(&m.id)),
            Err(e) => {
                tracing::warn!(error = %e, "stalled-job watchdog: could not list the executors");
                false
            }
        };
        let mut progress_of = Vec::with_capacity(jobs.len());
        for (job_id, job) in jobs.iter() {
            let progress = {
                let graph = job.execution_graph.read().await;
                JobProgress {
                    completed_stages: graph.completed_stages(),
                    available_tasks: graph.available_tasks(),
                    live_tasks: graph
                        .running_tasks()
                        .iter()
                        .filter(|t| alive(&t.executor_id))
                        .count(),
                }
            };
            progress_of.push((job_id, progress));
        }
        let cluster_busy = progress_of.iter().any(|(_, p)| p.live_tasks > 0);
        for (job_id, progress) in progress_of {
            let now = Instant::now();
            let entry = seen
                .entry(job_id.as_str().to_string())
                .or_insert((progress, now));
            if entry.0 != progress {
                *entry = (progress, now);
            }
            if progress.stuck(cluster_busy, executors_alive) && now.duration_since(entry.1) >= stall
            {
                tracing::error!(job = %job_id, ?progress, stuck_for = %humantime::format_duration(stall),
                    "no task of the job has run for this long although the cluster could run it \
                     (the scheduler lost track of it, usually after an executor died); \
                     cancelling it so that its client fails instead of waiting");
                if let Err(e) = server.cancel_job(job_id.clone()).await {
                    tracing::error!(job = %job_id, error = %e, "could not cancel a stalled job");
                }
                seen.remove(job_id.as_str());
            }
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
        task_scheduling_policy: TaskSchedulingPolicy::PullStaged,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_is_stuck_only_when_nothing_of_it_can_run_or_an_idle_cluster_does_not_run_it() {
        let p = |available_tasks, live_tasks| JobProgress {
            completed_stages: 3,
            available_tasks,
            live_tasks,
        };
        // Running tasks: never stuck.
        for (busy, alive) in [(true, true), (false, true), (true, false), (false, false)] {
            assert!(!p(0, 1).stuck(busy, alive));
            assert!(!p(5, 2).stuck(busy, alive));
        }
        // Nothing running and nothing to run: stuck whatever the cluster does.
        assert!(p(0, 0).stuck(true, true));
        assert!(p(0, 0).stuck(false, false));
        // Tasks to run: waiting for slots other jobs hold, or for an executor, is not stuck.
        assert!(!p(4, 0).stuck(true, true));
        assert!(!p(4, 0).stuck(false, false));
        // ... but an idle cluster with live executors that runs none of them is.
        assert!(p(4, 0).stuck(false, true));
        // The bound outlasts the detection of a dead executor.
        let t = std::time::Duration::from_secs(10);
        assert!(stalled_job_timeout(t) > t + t / 3 + HEARTBEAT);
    }
}
