//! Command line: `validate`, `run`, `explain`, `generate`, `demo`, `files`, `schedule`,
//! `backfill`, `history`. Errors reach `main` as anyhow
//! chains; user mistakes exit 2, failed jobs exit 1.

use std::path::PathBuf;

use anyhow::{Context, anyhow};
use chrono::NaiveDate;
use clap::{Parser, Subcommand, ValueEnum};

use crate::error::Error;
use crate::generate;
use crate::job::Project;
use crate::runner;
use crate::scheduler::execute::{JobExecutor, Outcome, RunContext};
use crate::scheduler::metrics::Metrics;
use crate::scheduler::{self, DaemonOptions, Dispatcher};
use crate::sink::log::TableLog;
use crate::state::StateStore;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

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
    /// Run one job for one date and commit its outputs.
    Run {
        job: String,
        /// Run date (YYYY-MM-DD); defaults to today (UTC).
        #[arg(long)]
        date: Option<NaiveDate>,
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
            ..generate::Options::default()
        }
    }
}

/// Sets up logging and runs the command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    init_logging(cli.log_format);
    let project = Project::load(&cli.config)?;
    match cli.command {
        Command::Validate { jobs } => validate(&project, jobs).await,
        Command::Run { job, date } => {
            let date = date.unwrap_or_else(|| chrono::Utc::now().date_naive());
            let plan = runner::validate_job(&project, &job).await?;
            manual_run(&project, &plan, date).await
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
                .map_err(|m| anyhow!("--url: {m}"))?;
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
            let plan = runner::validate_job(&project, &job).await?;
            print!(
                "{}",
                runner::explain_step(&project, &plan, &step, date, analyze).await?
            );
            Ok(())
        }
        Command::Demo { date, customers } => crate::demo::run(&project, date, customers).await,
        Command::Files { url } => {
            let loc = project.stores.resolve(&url).map_err(|m| anyhow!("{m}"))?;
            let log = TableLog::new(loc)?;
            let v = log.published().await?;
            if v == 0 {
                return Err(anyhow!("{url} has no published commit yet"));
            }
            let commit = log.read_commit(v).await?;
            for f in &commit.files {
                println!("{}", log.table.child(&f.path).url);
            }
            Ok(())
        }
    }
}

/// Identifies this process in leases and history.
fn owner() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
    format!(
        "{host}:{}:{}",
        std::process::id(),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// `clvflow run`: holds the job's lease (so it never overlaps a scheduled run of the same job)
/// and records the run in the history.
async fn manual_run(
    project: &Project,
    plan: &crate::job::JobPlan,
    date: NaiveDate,
) -> anyhow::Result<()> {
    use crate::state::{RunRecord, Status, Trigger};
    let state = StateStore::open(project)?;
    let ttl = project.config.value.scheduler.lease_ttl.0;
    let Some(lease) = state.acquire(&plan.name, &owner(), ttl).await? else {
        return Err(anyhow!(
            "job `{}` is running in another process (its lease in {} is held); try again when it ends",
            plan.name,
            state.url()
        ));
    };
    let run_id = runner::new_run_id();
    let mut record = RunRecord {
        run_id: run_id.clone(),
        job: plan.name.clone(),
        run_date: date,
        attempt: 1,
        max_attempts: 1,
        trigger: Trigger::Manual,
        scheduled_for: None,
        started_at: chrono::Utc::now(),
        ended_at: None,
        status: Status::Running,
        rows: 0,
        files: 0,
        error: None,
        host: std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into()),
    };
    state.put(&record).await?;
    let result = runner::run_job(project, plan, date, &run_id).await;
    record.ended_at = Some(chrono::Utc::now());
    match &result {
        Ok(r) => {
            record.status = Status::Succeeded;
            record.rows = r.outputs.iter().map(|o| o.rows).sum();
            record.files = r.outputs.iter().map(|o| o.files as u64).sum();
        }
        Err(e) => {
            record.status = Status::Failed;
            record.error = Some(format!("{e:#}"));
        }
    }
    let recorded = state.put(&record).await;
    lease.release().await;
    let report = result?;
    recorded?;
    print_report(&report);
    Ok(())
}

async fn run_context(
    project: &Project,
) -> anyhow::Result<(Arc<RunContext>, Vec<scheduler::Scheduled>, Vec<String>)> {
    let (jobs, scheduled) = scheduler::load_jobs(project).await?;
    let order = crate::deps::run_order(project)?;
    let ctx = RunContext {
        state: StateStore::open(project)?,
        executor: Arc::new(JobExecutor {
            project: project.clone(),
        }),
        jobs,
        lease_ttl: project.config.value.scheduler.lease_ttl.0,
        owner: owner(),
        metrics: Arc::new(Metrics::default()),
    };
    Ok((Arc::new(ctx), scheduled, order))
}

async fn schedule(project: &Project, listen: Option<std::net::SocketAddr>) -> anyhow::Result<()> {
    let (ctx, scheduled, order) = run_context(project).await?;
    let cfg = &project.config.value.scheduler;
    let opts = DaemonOptions {
        max_active_runs: cfg.max_active_runs,
        max_catchup: cfg.max_catchup,
        grace: cfg.grace_period.0,
        poll: cfg.poll_interval.0,
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
    scheduler::run_daemon(ctx, scheduled, order, opts, shutdown).await?;
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
        return Err(anyhow!("--to {to} is before --from {from}"));
    }
    let (ctx, _, order) = run_context(project).await?;
    if let Some(unknown) = jobs.iter().find(|j| !ctx.jobs.contains_key(*j)) {
        return Err(anyhow!("no job named `{unknown}`"));
    }
    // Runs of different jobs go in parallel (up to --parallel); one job's dates run one after
    // another, oldest first (its output tables have one writer).
    let mut dispatcher = Dispatcher::new(ctx.clone(), &order, parallel);
    let requests: Vec<_> = jobs
        .iter()
        .flat_map(|job| scheduler::backfill_requests(job, from, to, force))
        .collect();
    let poll = project.config.value.scheduler.poll_interval.0;
    let mut failed = 0;
    for (req, outcome) in scheduler::drain(&mut dispatcher, requests, poll).await {
        let shown = match &outcome {
            Ok(Outcome::Finished(s)) => s.to_string(),
            Ok(Outcome::AlreadyDone) => {
                "already succeeded (skipped; --force runs it again)".to_string()
            }
            Ok(Outcome::Skipped(why)) | Ok(Outcome::Waiting(why)) => why.clone(),
            Ok(Outcome::Busy) => "the job is running in another process".to_string(),
            Err(e) => format!("error: {e:#}"),
        };
        if !matches!(
            outcome,
            Ok(Outcome::Finished(crate::state::Status::Succeeded)) | Ok(Outcome::AlreadyDone)
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
    let mut records = state.history(job).await?;
    records.reverse();
    println!(
        "{:<16} {:<10} {:<8} {:<9} {:<20} {:>8} {:>9} {:>6}  status / error",
        "job", "run_date", "attempt", "trigger", "started", "seconds", "rows", "files"
    );
    for r in records.iter().take(limit) {
        let secs = r
            .ended_at
            .map(|e| {
                format!(
                    "{:.1}",
                    (e - r.started_at).num_milliseconds() as f64 / 1000.0
                )
            })
            .unwrap_or_else(|| "-".into());
        let trigger = format!("{:?}", r.trigger).to_lowercase();
        let status = match &r.error {
            Some(e) => format!("{} ({})", r.status, e.lines().next().unwrap_or_default()),
            None => r.status.to_string(),
        };
        println!(
            "{:<16} {:<10} {:<8} {:<9} {:<20} {:>8} {:>9} {:>6}  {}",
            r.job,
            r.run_date.to_string(),
            format!("{}/{}", r.attempt, r.max_attempts),
            trigger,
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
    let mut diags = Vec::new();
    for name in &jobs {
        match runner::validate_job(project, name).await {
            Ok(plan) => println!(
                "ok: {name} ({} inputs, {} steps, {} outputs)",
                plan.inputs.len(),
                plan.steps.len(),
                plan.outputs.len()
            ),
            Err(Error::Config(d)) => diags.extend(d),
            Err(e) => return Err(e).with_context(|| format!("validate job `{name}`")),
        }
    }
    if let Some(cycle) = crate::deps::find_cycle(project, &jobs)? {
        diags.push(cycle);
    }
    if diags.is_empty() {
        Ok(())
    } else {
        Err(Error::Config(diags).into())
    }
}

pub fn print_report(r: &runner::RunReport) {
    println!(
        "run {} of job {} for {} succeeded in {:.2}s",
        r.run_id,
        r.job,
        r.run_date,
        r.elapsed.as_secs_f64()
    );
    for (name, s) in &r.inputs {
        println!(
            "  input  {name:<20} {:>10} rows in {:>4} files",
            s.rows, s.files
        );
    }
    for (name, s) in &r.steps {
        println!(
            "  step   {name:<20} {:>10} rows  {:>8.0} ms",
            s.rows,
            s.elapsed.as_secs_f64() * 1000.0
        );
    }
    for o in &r.outputs {
        println!(
            "  output {:<60} v{} {:>8} rows in {} files, replaced {}",
            o.table_url,
            o.version,
            o.rows,
            o.files,
            if o.replaced == [String::new()] {
                "the whole table".to_string()
            } else {
                o.replaced.join(", ")
            }
        );
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
