//! Command line: `validate`, `run`, `generate`, `demo`, `files`. Errors reach `main` as anyhow
//! chains; user mistakes exit 2, failed jobs exit 1.

use std::path::PathBuf;

use anyhow::{Context, anyhow};
use chrono::NaiveDate;
use clap::{Parser, Subcommand, ValueEnum};

use crate::error::Error;
use crate::generate;
use crate::job::Project;
use crate::runner;
use crate::sink::log::TableLog;

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
            let report = runner::run_job(&project, &plan, date, &runner::new_run_id()).await?;
            print_report(&report);
            Ok(())
        }
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
