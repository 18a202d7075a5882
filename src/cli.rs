//! Command line: `validate`, `run`, `explain`, `generate`, `demo`, `files`, `schedule`,
//! `backfill`, `history`, `report`. The binary's edge: parsing, dispatch and printing; errors reach
//! `main` as anyhow chains; user mistakes exit 2, failed jobs exit 1.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, anyhow};
use chrono::NaiveDate;
use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use crate::demo::{self, generate};
use crate::error::Error;
use crate::job::{self, graph};
use crate::project::Project;
use crate::run::explain;
use crate::scheduler::daemon::{self, DaemonOptions};
use crate::scheduler::execute::{self, JobExecutor, Outcome, Request, RunContext};
use crate::scheduler::metrics::Metrics;
use crate::scheduler::{self, Dispatcher};
use crate::state::{StateStore, Status, Trigger};

mod cluster;
mod tables;

#[derive(Debug, Parser)]
#[command(
    name = "clvflow",
    version,
    about = "Customer value analytics jobs on DataFusion"
)]
pub struct Cli {
    /// Path of config.yaml.
    #[arg(
        long,
        global = true,
        default_value = "config.yaml",
        env = "CLVFLOW_CONFIG"
    )]
    pub config: PathBuf,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check jobs without running them: config, SQL planned against declared inputs, outputs.
    Validate {
        /// Jobs to check (default: all in the jobs folder).
        jobs: Vec<String>,
    },
    /// Run one job for one date and commit its outputs (holding the job's lease, recorded in
    /// the history, like a scheduled run; it does not wait for `depends_on`).
    Run {
        job: String,
        /// Run date (YYYY-MM-DD); defaults to today (UTC).
        #[arg(long)]
        date: Option<NaiveDate>,
        /// Attempts after the first when one fails, waiting `--backoff`, then twice as long
        /// each time. Default 0.
        #[arg(long, default_value_t = 0)]
        retries: u32,
        /// The wait before the first retry (e.g. 30s); default: the job's `retries.backoff`,
        /// else 1m.
        #[arg(long, value_parser = parse_duration)]
        backoff: Option<std::time::Duration>,
    },
    /// Generate realistic, seeded sample exports (orders, customers).
    Generate(GenerateArgs),
    /// Generate sample data if missing, run every job, and show what was written.
    Demo {
        /// Run date; the sample data ends the day before.
        #[arg(long, default_value = "2026-11-22")]
        date: NaiveDate,
        #[arg(long, default_value_t = 20_000)]
        customers: u64,
    },
    /// Run every scheduled job on its cron schedule until SIGTERM/SIGINT.
    Schedule {
        /// Serve /healthz and Prometheus /metrics here, e.g. 127.0.0.1:9464.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
    },
    /// Run a job for every date in a range, in order; dates that already succeeded are skipped.
    Backfill {
        /// One or more jobs; for a date, a job runs after the jobs it depends on.
        #[arg(required = true)]
        jobs: Vec<String>,
        #[arg(long)]
        from: NaiveDate,
        #[arg(long)]
        to: NaiveDate,
        /// Run dates that already succeeded again.
        #[arg(long)]
        force: bool,
        /// Runs at once across the given jobs (each job still runs one date at a time).
        #[arg(long, default_value_t = 1)]
        parallel: usize,
    },
    /// Show run history (newest first).
    History {
        job: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Show how DataFusion runs one SQL step: runs the job's earlier steps for the date, then
    /// prints the step's physical plan; with --analyze it also runs the step and shows each
    /// operator's rows, time and memory (for tuning SQL).
    Explain {
        job: String,
        step: String,
        /// Run date (YYYY-MM-DD); defaults to today (UTC).
        #[arg(long)]
        date: Option<NaiveDate>,
        /// Run the step and show metrics (EXPLAIN ANALYZE).
        #[arg(long)]
        analyze: bool,
    },
    /// Print the committed data files of an output table (for readers that want only
    /// committed data, e.g. DuckDB `read_parquet([...])`).
    Files {
        /// The output table URL as written in the job.
        url: String,
    },
    /// Delete the files of a Delta output table (`format: delta`) that no version inside the
    /// retention window needs: files replaced longer ago than the window, and files of runs
    /// that died before their commit (older than the window and a day).
    Vacuum {
        /// The table URL as written in the job.
        url: String,
        /// The retention window (e.g. 7d, 36h); default the table's own
        /// (`delta.deletedFileRetentionDuration`, set by the output's `retention:`).
        #[arg(long, value_parser = parse_duration)]
        retain: Option<std::time::Duration>,
        /// Only print what would be deleted.
        #[arg(long)]
        dry_run: bool,
    },
    /// (Re)build a run's HTML report from the job's committed output tables (and the run's
    /// history record), without running the job; writes it under the job's `report.url`, or
    /// to --out.
    Report {
        job: String,
        /// Run date (YYYY-MM-DD).
        #[arg(long)]
        date: NaiveDate,
        /// Write the page to this local file instead.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Run a Ballista scheduler or executor with clvflow's SQL functions and the stores of
    /// config.yaml (for `engine: { kind: ballista }`).
    Cluster {
        #[command(subcommand)]
        process: ClusterCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// The scheduler: clients (`clvflow run` with `kind: ballista`) send it their plans.
    Scheduler {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:50050")]
        bind: std::net::SocketAddr,
        /// The host name clients and executors reach it at (default: the bind address).
        #[arg(long)]
        external_host: Option<String>,
        /// An executor silent this long is taken for dead and its tasks run elsewhere; a job
        /// none of whose tasks has run for twice this plus 30 s, although the cluster could run
        /// them, is cancelled (its run fails instead of waiting).
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        executor_timeout: std::time::Duration,
    },
    /// An executor: runs the tasks the scheduler gives it.
    Executor {
        /// The scheduler, HOST:PORT.
        #[arg(long, default_value = "127.0.0.1:50050")]
        scheduler: String,
        /// Address of its Arrow Flight service (others fetch results and shuffle data here).
        #[arg(long, default_value = "127.0.0.1:50051")]
        bind: std::net::SocketAddr,
        /// Its gRPC port (default: the bind port + 1).
        #[arg(long)]
        grpc_port: Option<u16>,
        /// The host name others reach it at (default: the bind address).
        #[arg(long)]
        external_host: Option<String>,
        /// Tasks at once (default: the number of cores).
        #[arg(long, default_value_t = 0)]
        slots: usize,
        /// Folder for shuffle and spill files (default: a temporary folder).
        #[arg(long)]
        work_dir: Option<String>,
        /// Memory its tasks share, e.g. 4GiB; they spill above it (default: Ballista's share
        /// of the machine's or cgroup's memory).
        #[arg(long)]
        memory_pool_size: Option<crate::config::types::ByteSize>,
    },
}

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// Where to write (a folder in a configured store).
    #[arg(long, default_value = "file://./data/exports/")]
    pub url: String,
    #[arg(long, default_value_t = 20_000)]
    pub customers: u64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Export date: no activity on or after it.
    #[arg(long, default_value = "2026-11-22")]
    pub end: NaiveDate,
    #[arg(long, default_value = "2024-01-01")]
    pub start: NaiveDate,
    #[arg(long, default_value_t = 0.02)]
    pub return_rate: f64,
    #[arg(long, default_value_t = 0.005)]
    pub duplicate_rate: f64,
    #[arg(long, default_value_t = 0.001)]
    pub null_id_rate: f64,
    #[arg(long, default_value_t = 1_000_000)]
    pub rows_per_file: usize,
    /// Order rows held in memory before they are written (about 45 bytes each): the
    /// generator's memory, whatever `--customers` is.
    #[arg(long, default_value_t = 4_000_000)]
    pub buffer_rows: usize,
}

impl GenerateArgs {
    fn options(&self) -> generate::Options {
        generate::Options {
            customers: self.customers,
            seed: self.seed,
            start: self.start,
            end: self.end,
            return_rate: self.return_rate,
            duplicate_rate: self.duplicate_rate,
            null_id_rate: self.null_id_rate,
            rows_per_file: self.rows_per_file,
            buffer_rows: self.buffer_rows,
            ..generate::Options::default()
        }
    }
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    s.parse::<crate::config::types::DurationSpec>().map(|d| d.0)
}

/// Sets up logging and runs the command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    init_logging(cli.log_format);
    let project = Project::load(&cli.config)?;
    match cli.command {
        Command::Validate { jobs } => validate(&project, jobs).await,
        Command::Run {
            job,
            date,
            retries,
            backoff,
        } => {
            let date = date.unwrap_or_else(|| chrono::Utc::now().date_naive());
            manual_run(&project, &job, date, retries, backoff).await
        }
        Command::Schedule { listen } => schedule(&project, listen).await,
        Command::Backfill {
            jobs,
            from,
            to,
            force,
            parallel,
        } => backfill(&project, &jobs, from, to, force, parallel).await,
        Command::History { job, limit } => history(&project, job.as_deref(), limit).await,
        Command::Generate(args) => {
            let loc = project
                .stores
                .resolve(&args.url)
                .map_err(|m| Error::Usage(format!("--url: {m}")))?;
            let s = generate::generate(&args.options(), &loc).await?;
            println!(
                "generated {} customers, {} order rows in {} files ({} bytes) under {}",
                s.customers, s.order_rows, s.files, s.bytes, loc.url
            );
            Ok(())
        }
        Command::Explain {
            job,
            step,
            date,
            analyze,
        } => {
            let date = date.unwrap_or_else(|| chrono::Utc::now().date_naive());
            let plan = job::validate(&project, &job).await?;
            print!(
                "{}",
                explain::explain_step(&project, &plan, &step, date, analyze).await?
            );
            Ok(())
        }
        Command::Report { job, date, out } => {
            let plan = job::validate(&project, &job).await?;
            // The run that wrote the date's tables: its latest succeeded attempt.
            let record = StateStore::open(&project)?
                .runs_on(&job, date)
                .await?
                .into_iter()
                .filter(|r| r.status == Status::Succeeded)
                .max_by_key(|r| r.started_at);
            let run = record.as_ref().map(|r| crate::report::RunRef {
                run_id: &r.run_id,
                facts: r.facts.as_ref(),
            });
            let at = crate::report::rebuild(
                &project,
                &plan.subject(),
                plan.report.as_ref(),
                date,
                run,
                out.as_deref(),
            )
            .await?;
            println!("report of job {job} for {date}: {at}");
            Ok(())
        }
        Command::Demo { date, customers } => Ok(demo::run(&project, date, customers).await?),
        Command::Cluster { process } => cluster::run(&project, process).await,
        Command::Vacuum {
            url,
            retain,
            dry_run,
        } => tables::vacuum(&project, &url, retain, dry_run).await,
        Command::Files { url } => tables::files(&project, &url).await,
    }
}

/// The context runs of this process execute in: the state store, the real executor, the jobs.
fn run_context(
    project: &Project,
    jobs: Vec<crate::job::JobPlan>,
) -> anyhow::Result<Arc<RunContext>> {
    Ok(Arc::new(RunContext {
        state: StateStore::open(project)?,
        executor: Arc::new(JobExecutor {
            project: project.clone(),
        }),
        jobs: jobs.into_iter().map(|p| (p.name.clone(), p)).collect(),
        lease_ttl: project.scheduler.lease_ttl,
        owner: execute::owner(),
        metrics: Arc::new(Metrics::default()),
    }))
}

/// `clvflow run`: the scheduler's execution path for one request (lease held and renewed,
/// history recorded, `--retries` more attempts), forced (a date that succeeded runs again).
async fn manual_run(
    project: &Project,
    name: &str,
    date: NaiveDate,
    retries: u32,
    backoff: Option<std::time::Duration>,
) -> anyhow::Result<()> {
    let plan = job::validate(project, name).await?;
    let ctx = run_context(project, vec![plan])?;
    let req = Request {
        force: true,
        retries: Some(retries),
        backoff,
        ..Request::new(name, date, Trigger::Manual)
    };
    match ctx
        .execute_reporting(&req, &CancellationToken::new())
        .await?
    {
        (Outcome::Finished(Status::Succeeded), Some(report)) => {
            print!("{report}");
            Ok(())
        }
        (Outcome::Busy, _) => Err(anyhow!(
            "job `{name}` is running in another process (its lease in {} is held); try again when it ends",
            ctx.state.url()
        )),
        (other, _) => Err(anyhow!("job `{name}` for {date}: {other:?}")),
    }
}

async fn all_jobs(project: &Project) -> anyhow::Result<(Arc<RunContext>, Vec<String>)> {
    let jobs = scheduler::load_jobs(project).await?;
    let order = graph::run_order(&jobs);
    Ok((run_context(project, jobs.into_values().collect())?, order))
}

async fn schedule(project: &Project, listen: Option<std::net::SocketAddr>) -> anyhow::Result<()> {
    let (ctx, order) = all_jobs(project).await?;
    let cfg = &project.scheduler;
    let opts = DaemonOptions {
        max_active_runs: cfg.max_active_runs,
        max_catchup: cfg.max_catchup,
        grace: cfg.grace_period,
        poll: cfg.poll_interval,
        listen,
    };
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        }
        trigger.cancel();
    });
    daemon::run_daemon(ctx, order, opts, shutdown).await?;
    Ok(())
}

async fn backfill(
    project: &Project,
    jobs: &[String],
    from: NaiveDate,
    to: NaiveDate,
    force: bool,
    parallel: usize,
) -> anyhow::Result<()> {
    if to < from {
        return Err(Error::Usage(format!("--to {to} is before --from {from}")).into());
    }
    let (ctx, order) = all_jobs(project).await?;
    if let Some(unknown) = jobs.iter().find(|j| !ctx.jobs.contains_key(*j)) {
        return Err(project.no_such_job(unknown).into());
    }
    // Runs of different jobs go in parallel (up to --parallel); one job's dates run one after
    // another, oldest first (its output tables have one writer).
    let mut dispatcher = Dispatcher::new(ctx.clone(), &order, parallel);
    let requests: Vec<_> = jobs
        .iter()
        .flat_map(|job| scheduler::backfill_requests(job, from, to, force))
        .collect();
    let mut failed = 0;
    for (req, outcome) in
        scheduler::drain(&mut dispatcher, requests, project.scheduler.poll_interval).await
    {
        let shown = match &outcome {
            Ok(Outcome::Finished(s)) => s.to_string(),
            Ok(Outcome::AlreadyDone) => {
                "already succeeded (skipped; --force runs it again)".to_string()
            }
            Ok(Outcome::Skipped(why)) | Ok(Outcome::Waiting(why)) => why.clone(),
            Ok(Outcome::Busy) => "the job is running in another process".to_string(),
            Err(e) => format!("error: {}", crate::error::chain(e)),
        };
        if !matches!(
            outcome,
            Ok(Outcome::Finished(Status::Succeeded)) | Ok(Outcome::AlreadyDone)
        ) {
            failed += 1;
        }
        println!("{} {}  {}", req.job, req.run_date, shown);
    }
    if failed > 0 {
        return Err(anyhow!(
            "{failed} date(s) did not succeed; run the same backfill again to resume"
        ));
    }
    Ok(())
}

async fn history(project: &Project, job: Option<&str>, limit: usize) -> anyhow::Result<()> {
    let state = StateStore::open(project)?;
    let records = state.recent(job, limit).await?;
    println!(
        "{:<16} {:<10} {:<8} {:<9} {:<20} {:>8} {:>9} {:>6}  status / error",
        "job", "run_date", "attempt", "trigger", "started", "seconds", "rows", "files"
    );
    for r in &records {
        let secs = r
            .ended_at
            .map(|e| {
                format!(
                    "{:.1}",
                    (e - r.started_at).num_milliseconds() as f64 / 1000.0
                )
            })
            .unwrap_or_else(|| "-".into());
        let status = match &r.error {
            Some(e) => format!("{} ({})", r.status, e.lines().next().unwrap_or_default()),
            None => r.status.to_string(),
        };
        println!(
            "{:<16} {:<10} {:<8} {:<9} {:<20} {:>8} {:>9} {:>6}  {}",
            r.job,
            r.run_date.to_string(),
            format!("{}/{}", r.attempt, r.max_attempts),
            r.trigger.to_string(),
            r.started_at.format("%Y-%m-%d %H:%M:%S").to_string(),
            secs,
            r.rows,
            r.files,
            status
        );
    }
    Ok(())
}

async fn validate(project: &Project, jobs: Vec<String>) -> anyhow::Result<()> {
    let jobs = if jobs.is_empty() {
        project.job_names()?
    } else {
        jobs
    };
    let (plans, diags) = job::validate_jobs(project, &jobs)
        .await
        .context("validate")?;
    for plan in &plans {
        println!(
            "ok: {} ({} inputs, {} steps, {} outputs)",
            plan.name,
            plan.inputs.len(),
            plan.steps.len(),
            plan.outputs.len()
        );
    }
    if diags.is_empty() {
        Ok(())
    } else {
        Err(Error::Config(diags).into())
    }
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("CLVFLOW_LOG")
        .unwrap_or_else(|_| EnvFilter::new("clvflow=info,warn"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
