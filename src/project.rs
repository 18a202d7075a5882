//! A project: the folder of `config.yaml`, its checked settings (stores, engine, state,
//! scheduler, time zone) and its job files. Loading one checks the whole config file and reports
//! every problem at once; nothing is contacted until a store is used.
//!
//! The project also owns the process's [`Engine`] ([`Project::engine`]): built on first use and
//! shared by every run, validate and explain of the process, so its memory pool is one.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono_tz::Tz;

use crate::config::project::ConfigFile;
use crate::config::{self, Diagnostic, Document, Source};
use crate::engine::{Engine, EngineConfig};
use crate::error::{Error, Result};
use crate::storage::{self, Stores};

/// The checked `scheduler:` of config.yaml.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Runs executing at once, across all jobs.
    pub max_active_runs: usize,
    /// Whether jobs catch up missed runs by default.
    pub catchup: bool,
    /// At most this many missed runs per job.
    pub max_catchup: usize,
    pub lease_ttl: Duration,
    pub grace_period: Duration,
    pub poll_interval: Duration,
}

/// config.yaml, checked, and what it names.
#[derive(Debug, Clone)]
pub struct Project {
    /// Folder of config.yaml; relative paths (SQL files, jobs, file:// URLs) start here.
    pub root: PathBuf,
    /// config.yaml itself, to point diagnostics into it.
    pub source: Source,
    pub stores: Stores,
    pub engine_config: EngineConfig,
    /// Where run history and leases are kept (`state.url`).
    pub state_url: String,
    pub scheduler: SchedulerConfig,
    /// The default time zone of schedules.
    pub timezone: Tz,
    pub jobs_dir: PathBuf,
    engine: Arc<Mutex<Option<Arc<Engine>>>>,
}

impl Project {
    /// Loads `config.yaml` and builds its stores (nothing is contacted yet).
    pub fn load(config_path: &Path) -> Result<Self> {
        let doc: Document<ConfigFile> = config::load(config_path).map_err(Error::Config)?;
        let root = config_path
            .parent()
            .map(Path::to_path_buf)
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from("."));
        let root = std::path::absolute(&root).map_err(|e| Error::io(&root, "resolve folder", e))?;
        let mut diags = doc.problems.clone();
        let cfg = &doc.value;
        let mut built = Vec::new();
        for (name, spec) in &cfg.stores {
            match storage::build(name, spec, &root) {
                Ok(s) => built.push(s),
                Err(p) => diags.extend(doc.source.problems(&format!("stores.{name}"), vec![p])),
            }
        }
        let resolver = Stores::new(built.clone(), root.clone());
        let engine_config = match EngineConfig::from_spec(&cfg.engine, &root, &resolver) {
            Ok(e) => Some(e),
            Err(problems) => {
                diags.extend(doc.source.problems("engine", problems));
                None
            }
        };
        let timezone = match cfg.timezone.parse::<Tz>() {
            Ok(tz) => Some(tz),
            Err(_) => {
                diags.push(doc.diag(
                    "timezone",
                    format!(
                        "unknown time zone `{}`; use an IANA name such as UTC or Europe/Berlin",
                        cfg.timezone
                    ),
                ));
                None
            }
        };
        let s = &cfg.scheduler;
        if s.max_active_runs == 0 {
            diags.push(doc.diag("scheduler.max_active_runs", "at least 1"));
        }
        if s.lease_ttl.0 < Duration::from_secs(1) {
            diags.push(doc.diag(
                "scheduler.lease_ttl",
                "at least 1s (it is renewed every third of it)",
            ));
        }
        let (Some(engine_config), Some(timezone), true) =
            (engine_config, timezone, diags.is_empty())
        else {
            return Err(Error::Config(diags));
        };
        let scheduler = SchedulerConfig {
            max_active_runs: s.max_active_runs,
            catchup: s.catchup,
            max_catchup: s.max_catchup,
            lease_ttl: s.lease_ttl.0,
            grace_period: s.grace_period.0,
            poll_interval: s.poll_interval.0,
        };
        Ok(Self {
            stores: Stores::new(built, root.clone()),
            jobs_dir: root.join(&cfg.jobs_dir),
            state_url: cfg
                .state
                .as_ref()
                .map_or_else(|| "file://./data/_clvflow".to_string(), |s| s.url.clone()),
            root,
            source: doc.source.clone(),
            engine_config,
            scheduler,
            timezone,
            engine: Arc::default(),
        })
    }

    /// The process's engine, built on first use; every later call returns the same one.
    pub fn engine(&self) -> Result<Arc<Engine>> {
        let mut slot = self.engine.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = slot.as_ref() {
            return Ok(e.clone());
        }
        let engine = Engine::new(&self.engine_config, &self.stores)?;
        *slot = Some(engine.clone());
        Ok(engine)
    }

    /// Names of all jobs (`jobs/*.yaml` file stems), sorted.
    pub fn job_names(&self) -> Result<Vec<String>> {
        let dir = &self.jobs_dir;
        let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, "list job files", e))?;
        let mut names = BTreeSet::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(dir, "list job files", e))?;
            let path = entry.path();
            let is_yaml = matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml")
            );
            if let (true, Some(stem)) = (is_yaml, path.file_stem().and_then(|s| s.to_str())) {
                names.insert(stem.to_string());
            }
        }
        Ok(names.into_iter().collect())
    }

    /// The file of job `name` (`jobs/<name>.yml` if it exists, else `.yaml`).
    pub fn job_file(&self, name: &str) -> PathBuf {
        let yml = self.jobs_dir.join(format!("{name}.yml"));
        if yml.exists() {
            yml
        } else {
            self.jobs_dir.join(format!("{name}.yaml"))
        }
    }

    /// The "no such job" diagnostic, listing the jobs there are.
    pub fn no_such_job(&self, name: &str) -> Error {
        let known = self.job_names().unwrap_or_default().join(", ");
        Error::Config(vec![Diagnostic {
            file: self.job_file(name),
            line: 1,
            col: 1,
            field: String::new(),
            message: format!("no such job `{name}`; jobs: {known}"),
        }])
    }
}
