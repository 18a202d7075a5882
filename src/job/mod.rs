//! From parsed files to a validated [`JobPlan`]: stores resolved, SQL files read and their
//! templates checked, names cross-checked. Every problem found is collected (never only the
//! first) as a [`Diagnostic`] pointing into the job or SQL file.

pub mod template;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::catalog::stores::{self, Location, Stores};
use crate::config::types::{ColumnType, Compression};
use crate::config::{self, ConfigFile, Diagnostic, Document, JobSpec, Partitioning};
use crate::error::{Error, Result};

/// config.yaml and the stores it names.
#[derive(Debug, Clone)]
pub struct Project {
    /// Folder of config.yaml; relative paths (SQL files, jobs, file:// URLs) start here.
    pub root: PathBuf,
    pub config: Document<ConfigFile>,
    pub stores: Stores,
}

impl Project {
    /// Loads `config.yaml` and builds its stores (nothing is contacted yet).
    pub fn load(config_path: &Path) -> Result<Self> {
        let config: Document<ConfigFile> =
            config::load_strict(config_path).map_err(Error::Config)?;
        let root = config_path
            .parent()
            .map(Path::to_path_buf)
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from("."));
        let root = std::path::absolute(&root).map_err(|e| Error::io(&root, "resolve folder", e))?;
        let mut diags = Vec::new();
        let mut built = Vec::new();
        for (name, spec) in &config.value.stores {
            match stores::build(name, spec, &root) {
                Ok(s) => built.push(s),
                Err(e) => diags.push(config.diag(&format!("stores.{name}.{}", e.field), e.message)),
            }
        }
        if let config::EngineSpec::Local { settings, .. } = &config.value.engine {
            for (key, value) in settings {
                if let Err(m) = check_setting(key, value) {
                    diags.push(config.diag("engine.settings", m));
                }
            }
        }
        if let config::EngineSpec::Ballista { .. } = &config.value.engine {
            diags.push(config.diag(
                "engine.kind",
                "this build runs SQL in-process only; set `kind: local` (Ballista support is not built in yet)",
            ));
        }
        if config.value.timezone.parse::<chrono_tz::Tz>().is_err() {
            diags.push(config.diag(
                "timezone",
                format!(
                    "unknown time zone `{}`; use an IANA name such as UTC or Europe/Berlin",
                    config.value.timezone
                ),
            ));
        }
        if !diags.is_empty() {
            return Err(Error::Config(diags));
        }
        let stores = Stores::new(built, root.clone());
        Ok(Self {
            root,
            config,
            stores,
        })
    }

    pub fn jobs_dir(&self) -> PathBuf {
        self.root.join(&self.config.value.jobs_dir)
    }

    /// Names of all jobs (`jobs/*.yaml` file stems), sorted.
    pub fn job_names(&self) -> Result<Vec<String>> {
        let dir = self.jobs_dir();
        let entries = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, "list job files", e))?;
        let mut names = BTreeSet::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&dir, "list job files", e))?;
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

    pub fn job_file_exists(&self, name: &str) -> bool {
        self.job_file(name).exists()
    }

    fn job_file(&self, name: &str) -> PathBuf {
        let dir = self.jobs_dir();
        let yml = dir.join(format!("{name}.yml"));
        if yml.exists() {
            yml
        } else {
            dir.join(format!("{name}.yaml"))
        }
    }

    /// Loads and checks job `name` (everything but SQL planning, see [`crate::validate`]).
    pub fn load_job(&self, name: &str) -> Result<JobPlan> {
        let file = self.job_file(name);
        if !file.exists() {
            let known = self.job_names().unwrap_or_default().join(", ");
            return Err(Error::Config(vec![Diagnostic {
                file,
                line: 1,
                col: 1,
                field: String::new(),
                message: format!("no such job `{name}`; jobs: {known}"),
            }]));
        }
        let doc: Document<JobSpec> = config::load(&file).map_err(Error::Config)?;
        let known_jobs: BTreeSet<String> = self.job_names()?.into_iter().collect();
        let (plan, diags) = JobPlan::build(name, doc, self, &known_jobs);
        if diags.is_empty() {
            Ok(plan)
        } else {
            Err(Error::Config(diags))
        }
    }

    /// Loads job `name` as far as it goes: the plan holds every part that checked out, and the
    /// diagnostics every problem (for `validate`, which goes on to plan the SQL that it can).
    pub fn check_job(&self, name: &str) -> Result<(JobPlan, Vec<Diagnostic>)> {
        let file = self.job_file(name);
        match config::load::<JobSpec>(&file) {
            Ok(doc) => {
                let known_jobs: BTreeSet<String> = self.job_names()?.into_iter().collect();
                Ok(JobPlan::build(name, doc, self, &known_jobs))
            }
            Err(d) => Err(Error::Config(d)),
        }
    }
}

/// A checked job, ready to validate against schemas or to run.
#[derive(Debug, Clone)]
pub struct JobPlan {
    pub name: String,
    pub doc: Document<JobSpec>,
    pub params: BTreeMap<String, String>,
    pub inputs: Vec<InputPlan>,
    pub steps: Vec<StepPlan>,
    pub outputs: Vec<OutputPlan>,
}

#[derive(Debug, Clone)]
pub struct InputPlan {
    pub name: String,
    pub location: Location,
    pub partition_columns: Vec<(String, ColumnType)>,
    pub columns: Vec<(String, ColumnType)>,
    pub allow_empty: bool,
    pub format: config::InputFormat,
    /// Field path in the job file, for diagnostics.
    pub field: String,
}

#[derive(Debug, Clone)]
pub struct StepPlan {
    pub name: String,
    pub kind: StepKind,
    pub field: String,
    /// DataFusion settings for this step only (checked).
    pub settings: BTreeMap<String, String>,
}

impl StepPlan {
    /// The tables the step registers: its own and, for clv (`<name>_fit`, `<name>_backtest`)
    /// and kmeans (`<name>_profile`), the extra result tables.
    pub fn produces(&self) -> Vec<String> {
        let mut tables = vec![self.name.clone()];
        match &self.kind {
            StepKind::Sql { .. } => {}
            StepKind::Kmeans(_) => tables.push(format!("{}_profile", self.name)),
            StepKind::Clv(spec) => {
                tables.push(format!("{}_fit", self.name));
                if spec.backtest.is_some() {
                    tables.push(format!("{}_backtest", self.name));
                }
            }
        }
        tables
    }
}

#[derive(Debug, Clone)]
pub enum StepKind {
    Sql { file: PathBuf, text: String },
    Clv(config::ClvSpec),
    Kmeans(config::KmeansSpec),
}

#[derive(Debug, Clone)]
pub struct OutputPlan {
    pub from: String,
    pub location: Location,
    pub partition_by: Vec<String>,
    pub compression: Compression,
    pub row_group_size: usize,
    pub null_partition_value: Option<String>,
    pub field: String,
}

/// Checks one DataFusion setting (`engine.settings`, a step's `settings`).
fn check_setting(key: &str, value: &str) -> std::result::Result<(), String> {
    let mut options = datafusion::config::ConfigOptions::new();
    options.set(key, value).map_err(|e| {
        // DataFusion's message and its first cause ("Error parsing 'x' as usize").
        let message = e.strip_backtrace();
        let lines: Vec<&str> = message
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && *l != "caused by")
            .take(2)
            .collect();
        format!("`{key}: {value}`: {} (keys are DataFusion configuration keys such as datafusion.execution.batch_size)", lines.join(": "))
    })
}

/// Names a step or input may have: SQL identifiers that need no quoting.
fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

impl JobPlan {
    fn build(
        name: &str,
        doc: Document<JobSpec>,
        project: &Project,
        known_jobs: &BTreeSet<String>,
    ) -> (Self, Vec<Diagnostic>) {
        let spec = doc.value.clone();
        // Structural problems first; the checks below still run on what parsed.
        let mut diags = doc.problems.clone();
        let mut params = BTreeMap::new();
        for (k, v) in spec.params.iter() {
            params.insert(format!("params.{k}"), v.to_string());
        }
        params.insert("job".into(), name.to_string());

        let mut names = BTreeSet::new();
        let mut inputs = Vec::new();
        for (i, (iname, ispec)) in spec.inputs.iter().enumerate() {
            let field = format!("inputs.{iname}");
            if !valid_name(iname) {
                diags.push(doc.diag(
                    &field,
                    format!(
                        "input name `{iname}` must be lower_snake_case (it is a SQL table name)"
                    ),
                ));
            }
            names.insert(iname.clone());
            let _ = i;
            let location = match project.stores.resolve(&ispec.url) {
                Ok(l) => Some(l),
                Err(m) => {
                    diags.push(doc.diag(&format!("{field}.url"), m));
                    None
                }
            };
            if ispec.columns.is_empty() {
                diags.push(doc.diag(
                    &format!("{field}.columns"),
                    "declare at least one column with its type",
                ));
            }
            match (ispec.partitioning, ispec.partition_columns.is_empty()) {
                (Partitioning::Hive, true) => diags.push(doc.diag(
                    &format!("{field}.partition_columns"),
                    "`partitioning: hive` needs `partition_columns:` (the folder keys and their types)",
                )),
                (Partitioning::None, false) => diags.push(doc.diag(
                    &format!("{field}.partitioning"),
                    "`partition_columns:` is set: add `partitioning: hive`",
                )),
                _ => {}
            }
            for k in ispec.partition_columns.keys() {
                if ispec.columns.get(k).is_some() {
                    diags.push(doc.diag(
                        &format!("{field}.columns.{k}"),
                        format!(
                            "`{k}` is a partition column; list it only under `partition_columns`"
                        ),
                    ));
                }
            }
            if let Some(location) = location {
                inputs.push(InputPlan {
                    name: iname.clone(),
                    location,
                    partition_columns: ispec.partition_columns.0.clone(),
                    columns: ispec.columns.0.clone(),
                    allow_empty: ispec.allow_empty,
                    format: ispec.format,
                    field,
                });
            }
        }

        let mut steps = Vec::new();
        // The job's gross margin, the default of its CLV steps' `margin`: (the value as
        // written, the share if it is one). Reported once, if a step without `margin` needs it.
        let gross_margin = spec.params.get("gross_margin").map(|v| {
            let share = v.to_string().parse::<f64>().ok();
            (v.to_string(), share.filter(|m| (0.0..=1.0).contains(m)))
        });
        let mut bad_gross_margin_used = false;
        for (i, s) in spec.steps.iter().enumerate() {
            let field = format!("steps[{i}]");
            if !valid_name(&s.name) {
                diags.push(doc.diag(
                    &format!("{field}.name"),
                    format!(
                        "step name `{}` must be lower_snake_case (it is a SQL table name)",
                        s.name
                    ),
                ));
            }
            if !names.insert(s.name.clone()) {
                diags.push(doc.diag(
                    &format!("{field}.name"),
                    format!(
                        "`{}` is already the name of an input or earlier step; pick another",
                        s.name
                    ),
                ));
            }
            for (key, value) in &s.settings {
                if let Err(m) = check_setting(key, value) {
                    diags.push(doc.diag(&format!("{field}.settings.{key}"), m));
                }
            }
            let tables: BTreeSet<&String> = names.iter().collect();
            let kinds = usize::from(s.sql.is_some())
                + usize::from(s.clv.is_some())
                + usize::from(s.kmeans.is_some());
            if let Some(km) = &s.kmeans
                && kinds == 1
            {
                if !tables.contains(&km.from) || km.from == s.name {
                    diags.push(doc.diag(
                        &format!("{field}.kmeans.from"),
                        format!("no input or earlier step named `{}`", km.from),
                    ));
                }
                if km.features.is_empty() {
                    diags.push(doc.diag(
                        &format!("{field}.kmeans.features"),
                        "list at least one feature column",
                    ));
                }
                if let config::KmeansK::Fixed(k) = km.k
                    && !(2..=50).contains(&k)
                {
                    diags.push(doc.diag(
                        &format!("{field}.kmeans.k"),
                        "`auto` or a number from 2 to 50",
                    ));
                }
                if !(2..=20).contains(&km.k_max) {
                    diags.push(doc.diag(&format!("{field}.kmeans.k_max"), "a number from 2 to 20"));
                }
                if !km.value.is_empty() && !km.features.contains(&km.value) {
                    diags.push(doc.diag(
                        &format!("{field}.kmeans.value"),
                        format!("`{}` is not one of the features", km.value),
                    ));
                }
                if km.sample < 100 {
                    diags.push(doc.diag(&format!("{field}.kmeans.sample"), "at least 100"));
                }
                let profile = format!("{}_profile", s.name);
                if !names.insert(profile.clone()) {
                    diags.push(doc.diag(
                        &format!("{field}.name"),
                        format!("`{profile}` (this step's profile) is already a table name"),
                    ));
                }
                let mut km = km.clone();
                if km.value.is_empty() {
                    km.value = km.features.last().cloned().unwrap_or_default();
                }
                steps.push(StepPlan {
                    name: s.name.clone(),
                    kind: StepKind::Kmeans(km),
                    field,
                    settings: s.settings.clone(),
                });
                continue;
            }
            match (&s.sql, &s.clv) {
                _ if kinds != 1 => {
                    diags.push(doc.diag(&field, "a step needs exactly one kind: `sql: sql/<file>.sql`, `clv: { from: <step> }` or `kmeans: { from: <step>, features: [...] }`"));
                }
                (None, Some(clv)) => {
                    if !tables.contains(&clv.from) || clv.from == s.name {
                        diags.push(doc.diag(
                            &format!("{field}.clv.from"),
                            format!("no input or earlier step named `{}`", clv.from),
                        ));
                    }
                    if clv.horizon_months == 0 || clv.horizon_months > 600 {
                        diags.push(doc.diag(
                            &format!("{field}.clv.horizon_months"),
                            "must be between 1 and 600",
                        ));
                    }
                    if !(0.0..1.0).contains(&clv.discount_rate) {
                        diags.push(doc.diag(
                            &format!("{field}.clv.discount_rate"),
                            "an annual rate: at least 0 and below 1 (0.10 = 10 %)",
                        ));
                    }
                    // Unset: the margin the job's SQL uses, when it declares one.
                    let mut clv = clv.clone();
                    if clv.margin.is_none()
                        && let Some((_, share)) = &gross_margin
                    {
                        clv.margin = *share;
                        bad_gross_margin_used |= share.is_none();
                    }
                    if !(0.0..=1.0).contains(&clv.margin()) {
                        diags.push(doc.diag(
                            &format!("{field}.clv.margin"),
                            "a share of spend: between 0 and 1",
                        ));
                    }
                    let clv = &clv;
                    use config::ClvModel as M;
                    let model = clv.model;
                    let predictive = model == M::BgnbdGammaGamma;
                    // Options that only some models read: a stray one is a mistake, not a no-op.
                    let only = [
                        (
                            "expected_years",
                            clv.expected_years.is_some(),
                            model == M::Formula,
                        ),
                        (
                            "purchases_per_year",
                            clv.purchases_per_year.is_some(),
                            matches!(model, M::Formula | M::FormulaRetention),
                        ),
                        (
                            "retention_rate",
                            clv.retention_rate.is_some(),
                            model == M::FormulaRetention,
                        ),
                        (
                            "acquisition_costs",
                            clv.acquisition_costs.is_some(),
                            model == M::Discounted,
                        ),
                        ("years", clv.years.is_some(), model == M::Discounted),
                        ("backtest", clv.backtest.is_some(), predictive),
                    ];
                    for (key, given, read) in only {
                        if given && !read {
                            diags.push(doc.diag(
                                &format!("{field}.clv.{key}"),
                                format!("not used by the `{}` model; remove it", model.name()),
                            ));
                        }
                    }
                    if model == M::Formula && clv.expected_years.is_none() {
                        diags.push(doc.diag(
                            &format!("{field}.clv"),
                            "the `formula` model needs `expected_years` (the expected relationship length in years)",
                        ));
                    }
                    if let Some(y) = clv.expected_years
                        && !(y > 0.0 && y <= 100.0)
                    {
                        diags.push(doc.diag(
                            &format!("{field}.clv.expected_years"),
                            "a number of years above 0 and at most 100",
                        ));
                    }
                    if let Some(v) = clv.purchases_per_year
                        && !(v > 0.0 && v.is_finite())
                    {
                        diags.push(doc.diag(
                            &format!("{field}.clv.purchases_per_year"),
                            "a positive number",
                        ));
                    }
                    if let Some(r) = clv.retention_rate
                        && !(0.0..=1.0).contains(&r)
                    {
                        diags.push(doc.diag(
                            &format!("{field}.clv.retention_rate"),
                            "a yearly rate between 0 and 1",
                        ));
                    }
                    if clv.years == Some(0) {
                        diags.push(doc.diag(&format!("{field}.clv.years"), "at least 1"));
                    }
                    for (key, table) in [
                        ("backtest", &clv.backtest),
                        ("acquisition_costs", &clv.acquisition_costs),
                    ] {
                        if let Some(t) = table
                            && (!tables.contains(t) || *t == s.name)
                        {
                            diags.push(doc.diag(
                                &format!("{field}.clv.{key}"),
                                format!("no input or earlier step named `{t}`"),
                            ));
                        }
                    }
                    let mut extra = vec![format!("{}_fit", s.name)];
                    if clv.backtest.is_some() {
                        extra.push(format!("{}_backtest", s.name));
                    }
                    for t in extra {
                        if !names.insert(t.clone()) {
                            diags.push(doc.diag(
                                &format!("{field}.name"),
                                format!(
                                    "`{t}` (a table this step registers) is already a table name"
                                ),
                            ));
                        }
                    }
                    steps.push(StepPlan {
                        name: s.name.clone(),
                        kind: StepKind::Clv(clv.clone()),
                        field,
                        settings: s.settings.clone(),
                    });
                }
                (Some(sql), None) => {
                    let file = project.root.join(sql);
                    match std::fs::read_to_string(&file) {
                        Ok(text) => steps.push(StepPlan {
                            name: s.name.clone(),
                            kind: StepKind::Sql { file, text },
                            field,
                            settings: s.settings.clone(),
                        }),
                        Err(e) => diags.push(doc.diag(
                            &format!("{field}.sql"),
                            format!(
                                "cannot read SQL file `{}`: {e}; the path is relative to {}",
                                sql,
                                project.root.display()
                            ),
                        )),
                    }
                }
                // Covered by the guard above (exactly one kind is set).
                _ => {}
            }
        }
        if bad_gross_margin_used && let Some((v, _)) = &gross_margin {
            diags.push(doc.diag(
                "params.gross_margin",
                format!("`{v}`: the CLV steps without `margin` use it as theirs; a share of spend between 0 and 1"),
            ));
        }
        if spec.steps.is_empty() {
            diags.push(doc.diag("steps", "a job needs at least one step"));
        }

        let mut outputs = Vec::new();
        let mut out_urls = BTreeSet::new();
        for (i, o) in spec.outputs.iter().enumerate() {
            let field = format!("outputs[{i}]");
            // Tables steps register besides their own: clv (`<name>_fit`, `<name>_backtest`),
            // kmeans (`<name>_profile`).
            let fit_tables: Vec<String> = spec
                .steps
                .iter()
                .flat_map(|s| match (&s.clv, &s.kmeans) {
                    (Some(c), _) if c.backtest.is_some() => {
                        vec![format!("{}_fit", s.name), format!("{}_backtest", s.name)]
                    }
                    (Some(_), _) => vec![format!("{}_fit", s.name)],
                    (_, Some(_)) => vec![format!("{}_profile", s.name)],
                    _ => vec![],
                })
                .collect();
            if !spec.steps.iter().any(|s| s.name == o.from) && !fit_tables.contains(&o.from) {
                let known: Vec<&str> = spec
                    .steps
                    .iter()
                    .map(|s| s.name.as_str())
                    .chain(fit_tables.iter().map(String::as_str))
                    .collect();
                diags.push(doc.diag(
                    &format!("{field}.from"),
                    format!("no step named `{}`; steps: {}", o.from, known.join(", ")),
                ));
            }
            if !out_urls.insert(o.url.trim_end_matches('/').to_string()) {
                diags.push(doc.diag(
                    &format!("{field}.url"),
                    "two outputs write the same table; give each its own url",
                ));
            }
            let mut seen = BTreeSet::new();
            for (j, c) in o.partition_by.iter().enumerate() {
                if !seen.insert(c) {
                    diags.push(doc.diag(
                        &format!("{field}.partition_by[{j}]"),
                        format!("`{c}` is listed twice"),
                    ));
                }
            }
            if o.null_partition_value
                .as_deref()
                .is_some_and(|v| v.is_empty() || v.contains('/'))
            {
                diags.push(doc.diag(
                    &format!("{field}.null_partition_value"),
                    "must be a non-empty folder name without `/`",
                ));
            }
            if o.row_group_size == 0 {
                diags.push(doc.diag(&format!("{field}.row_group_size"), "must be at least 1"));
            }
            match project.stores.resolve(&o.url) {
                Ok(location) if location.split_last().is_none() => diags.push(doc.diag(
                    &format!("{field}.url"),
                    "an output must be a folder below the store root (its commit log lives beside it)",
                )),
                Ok(location) => outputs.push(OutputPlan {
                    from: o.from.clone(),
                    location,
                    partition_by: o.partition_by.clone(),
                    compression: o.compression,
                    row_group_size: o.row_group_size,
                    null_partition_value: o.null_partition_value.clone(),
                    field,
                }),
                Err(m) => diags.push(doc.diag(&format!("{field}.url"), m)),
            }
        }

        for (i, d) in spec.depends_on.iter().enumerate() {
            if d == name {
                diags.push(doc.diag(&format!("depends_on[{i}]"), "a job cannot depend on itself"));
            } else if !known_jobs.contains(d) {
                diags.push(doc.diag(
                    &format!("depends_on[{i}]"),
                    format!("no job named `{d}` in the jobs folder"),
                ));
            }
        }
        if let Some(tz) = &spec.timezone
            && tz.parse::<chrono_tz::Tz>().is_err()
        {
            diags.push(doc.diag(
                "timezone",
                format!("unknown time zone `{tz}`; use an IANA name such as Europe/Berlin"),
            ));
        }
        if let Some(s) = &spec.schedule
            && let Err(m) = crate::cron::check(s)
        {
            diags.push(doc.diag("schedule", m));
        }

        let plan = Self {
            name: name.to_string(),
            doc,
            params,
            inputs,
            steps,
            outputs,
        };
        (plan, diags)
    }

    /// Template variables for a run date.
    pub fn vars(&self, run_date: chrono::NaiveDate) -> BTreeMap<String, String> {
        let mut v = self.params.clone();
        v.insert("run_date".into(), run_date.format("%Y-%m-%d").to_string());
        v.insert(
            "run_date_nodash".into(),
            run_date.format("%Y%m%d").to_string(),
        );
        v
    }

    /// The SQL of step `step` for `run_date`, or diagnostics pointing into the SQL file.
    pub fn render_sql(
        &self,
        step: &StepPlan,
        run_date: chrono::NaiveDate,
    ) -> std::result::Result<String, Vec<Diagnostic>> {
        let StepKind::Sql { file, text } = &step.kind else {
            return Err(vec![self.doc.diag(&step.field, "not a SQL step")]);
        };
        template::render(text, &self.vars(run_date)).map_err(|errs| {
            errs.into_iter()
                .map(|e| Diagnostic {
                    file: file.clone(),
                    line: e.line,
                    col: e.col,
                    field: format!("{}.sql", step.field),
                    message: e.message,
                })
                .collect()
        })
    }
}
