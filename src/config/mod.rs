//! Reading `config.yaml` and `jobs/*.yaml` into typed specs: [`project`] (config.yaml), [`job`]
//! (a job file) and [`steps`] (the step kinds, a tagged enum). This is the only module that
//! touches the YAML crates, so the (archived) serde_yaml can be swapped without changes
//! elsewhere. Meaning (stores resolved, files read, names cross-checked) is given to the specs by
//! `crate::project` and `crate::job`.
//!
//! Invariants:
//! - documents are deserialized from their text into typed structs; unknown keys are errors;
//! - every problem becomes a [`Diagnostic`] with file, 1-based line and column, field path and a
//!   message saying what to change;
//! - a document with several mistakes reports all of them: after a failure the offending node is
//!   pruned and the document is checked again, until it parses or nothing is left to prune.

pub mod job;
mod locate;
pub mod project;
pub mod steps;
pub mod types;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;

pub use crate::error::{Diagnostic, Problem};
use locate::{Locator, Pos};

/// Where a parsed document came from, to point at its fields after parsing (a missing SQL
/// file, an unknown partition column): the file and the position of every key and item.
#[derive(Debug, Clone)]
pub struct Source {
    pub file: PathBuf,
    locator: Arc<Locator>,
}

impl Source {
    /// A diagnostic pointing at `field` (or its nearest written parent).
    pub fn diag(&self, field: &str, message: impl Into<String>) -> Diagnostic {
        let Pos { line, col } = self.locator.locate(field);
        Diagnostic {
            file: self.file.clone(),
            line,
            col,
            field: locate::normalize(field),
            message: message.into(),
        }
    }

    /// The diagnostics of a component's problems, their fields taken as relative to `base`.
    pub fn problems(&self, base: &str, problems: Vec<Problem>) -> Vec<Diagnostic> {
        problems
            .into_iter()
            .map(|p| {
                let field = match (base.is_empty(), p.field.is_empty()) {
                    (_, true) => base.to_string(),
                    (true, false) => p.field,
                    (false, false) if p.field.starts_with('[') => format!("{base}{}", p.field),
                    (false, false) => format!("{base}.{}", p.field),
                };
                self.diag(&field, p.message)
            })
            .collect()
    }
}

/// A parsed document with what is needed to point at its fields later.
#[derive(Debug, Clone)]
pub struct Document<T> {
    pub value: T,
    /// Structural problems already found. When not empty, `value` is what remained after the
    /// offending fields were dropped: good enough to look for further problems, never to run.
    pub problems: Vec<Diagnostic>,
    pub source: Source,
}

impl<T> Document<T> {
    /// A diagnostic pointing at `field` (or its nearest written parent).
    pub fn diag(&self, field: &str, message: impl Into<String>) -> Diagnostic {
        self.source.diag(field, message)
    }
}

/// Reads and parses `file`; all problems are returned at once.
pub fn load<T: DeserializeOwned>(file: &Path) -> Result<Document<T>, Vec<Diagnostic>> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        vec![Diagnostic {
            file: file.to_path_buf(),
            line: 1,
            col: 1,
            field: String::new(),
            message: format!("cannot read file: {e}"),
        }]
    })?;
    parse(file, &text)
}

/// Parses `text` (the contents of `file`); all problems are returned at once.
pub fn parse<T: DeserializeOwned>(file: &Path, text: &str) -> Result<Document<T>, Vec<Diagnostic>> {
    let locator = Locator::build(text).map_err(|e| {
        vec![Diagnostic {
            file: file.to_path_buf(),
            line: e.pos.line,
            col: e.pos.col,
            field: String::new(),
            message: format!("invalid YAML: {}", e.message),
        }]
    })?;
    let de = serde_yaml::Deserializer::from_str(text);
    let source = Source {
        file: file.to_path_buf(),
        locator: Arc::new(locator),
    };
    match serde_path_to_error::deserialize::<_, T>(de) {
        Ok(value) => Ok(Document {
            value,
            problems: Vec::new(),
            source,
        }),
        Err(first) => {
            let (found, rest) = collect_errors::<T>(text, first);
            let problems: Vec<Diagnostic> = found
                .into_iter()
                .map(|(path, message)| source.diag(&path, message))
                .collect();
            match rest {
                Some(value) => Ok(Document {
                    value,
                    problems,
                    source,
                }),
                None => Err(problems),
            }
        }
    }
}

/// Finds every structural error: reports one, prunes the node it is about, checks again.
/// Sequence items are removed when pruned, so later paths are translated back to the indices
/// the user wrote. Also returns what parses once everything wrong is pruned, if anything does.
fn collect_errors<T: DeserializeOwned>(
    text: &str,
    first: serde_path_to_error::Error<serde_yaml::Error>,
) -> (Vec<(String, String)>, Option<T>) {
    let mut found = vec![describe(first.path().to_string(), first.inner())];
    let Ok(mut doc) = serde_yaml::from_str::<serde_yaml::Value>(text) else {
        return (found, None);
    };
    let mut current = prune_target(&found[0]);
    let mut removed: Vec<(String, usize)> = Vec::new();
    for _ in 0..64 {
        if !prune(&mut doc, &current, &mut removed) {
            break;
        }
        match serde_path_to_error::deserialize::<_, T>(doc.clone()) {
            Ok(value) => return (found, Some(value)),
            Err(e) => {
                let (cur_path, msg) = describe(e.path().to_string(), e.inner());
                let original = to_original(&cur_path, &removed);
                if found.iter().any(|(p, m)| *p == original && *m == msg) {
                    break;
                }
                current = prune_target(&(cur_path, msg.clone()));
                found.push((original, msg));
            }
        }
    }
    (found, None)
}

/// What to remove to get past an error: the node itself, or for a missing field its parent.
fn prune_target((path, msg): &(String, String)) -> String {
    let p = locate::normalize(path);
    if msg.starts_with("missing field") {
        match p.rfind(['.', '[']) {
            Some(i) => p[..i].to_string(),
            None => String::new(),
        }
    } else {
        p
    }
}

/// The field path and a message for one serde error. A missing field is reported at the path
/// where it should be; serde_yaml's own " at line N column M" suffix is dropped (we add ours).
fn describe(path: String, err: &serde_yaml::Error) -> (String, String) {
    let mut msg = err.to_string();
    if let Some(i) = msg.find(" at line ") {
        msg.truncate(i);
    }
    // serde_yaml starts messages with its own path ("inputs.orders: missing field ..."): we
    // report the path separately.
    if let Some((head, rest)) = msg.split_once(": ")
        && !head.contains([' ', '`'])
    {
        msg = rest.to_string();
    }
    let base = locate::normalize(&path);
    if let Some(name) = msg
        .strip_prefix("missing field `")
        .and_then(|r| r.strip_suffix('`'))
    {
        let full = if base.is_empty() {
            name.to_string()
        } else {
            format!("{base}.{name}")
        };
        return (full, format!("missing field `{name}`: add it"));
    }
    if msg.starts_with("unknown field") {
        msg.push_str(" (remove it or fix its spelling)");
    }
    (base, msg)
}

/// Removes the node at `path` (current coordinates). Returns false when there is nothing to
/// remove (the root, or a path that does not exist), which ends the search.
fn prune(doc: &mut serde_yaml::Value, path: &str, removed: &mut Vec<(String, usize)>) -> bool {
    use serde_yaml::Value;
    let segments = split_path(path);
    let Some((last, parents)) = segments.split_last() else {
        return false;
    };
    let mut node = doc;
    let mut walked = String::new();
    for seg in parents {
        let next = match (node, seg) {
            (Value::Mapping(m), Seg::Key(k)) => m.get_mut(k.as_str()),
            (Value::Sequence(s), Seg::Index(i)) => s.get_mut(*i),
            _ => None,
        };
        walked = seg.append_to(&walked);
        match next {
            Some(n) => node = n,
            None => return false,
        }
    }
    match (node, last) {
        (Value::Mapping(m), Seg::Key(k)) => m.remove(k.as_str()).is_some(),
        (Value::Sequence(s), Seg::Index(i)) if *i < s.len() => {
            s.remove(*i);
            let seq = to_original(&walked, removed);
            let original = original_index(&seq, *i, removed);
            removed.push((seq, original));
            true
        }
        _ => false,
    }
}

/// Index `i` of the (current) sequence at original path `seq`, in the user's numbering.
fn original_index(seq: &str, i: usize, removed: &[(String, usize)]) -> usize {
    let mut gone: Vec<usize> = removed
        .iter()
        .filter(|(p, _)| p == seq)
        .map(|(_, r)| *r)
        .collect();
    gone.sort_unstable();
    let mut orig = i;
    for r in gone {
        if r <= orig {
            orig += 1;
        }
    }
    orig
}

/// Translates a path in current coordinates back to the indices the user wrote.
fn to_original(path: &str, removed: &[(String, usize)]) -> String {
    let mut out = String::new();
    for seg in split_path(path) {
        out = match seg {
            Seg::Key(_) => seg.append_to(&out),
            Seg::Index(i) => {
                let orig = original_index(&out, i, removed);
                Seg::Index(orig).append_to(&out)
            }
        };
    }
    out
}

enum Seg {
    Key(String),
    Index(usize),
}

impl Seg {
    fn append_to(&self, base: &str) -> String {
        match self {
            Seg::Key(k) if base.is_empty() => k.clone(),
            Seg::Key(k) => format!("{base}.{k}"),
            Seg::Index(i) => format!("{base}[{i}]"),
        }
    }
}

fn split_path(path: &str) -> Vec<Seg> {
    let mut out = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let mut rest = part;
        if let Some(b) = rest.find('[') {
            if b > 0 {
                out.push(Seg::Key(rest[..b].to_string()));
            }
            rest = &rest[b..];
            while let Some(r) = rest.strip_prefix('[') {
                let Some(end) = r.find(']') else { break };
                if let Ok(i) = r[..end].parse() {
                    out.push(Seg::Index(i));
                }
                rest = &r[end + 1..];
            }
        } else {
            out.push(Seg::Key(rest.to_string()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::job::JobSpec;
    use super::*;

    fn job(text: &str) -> Result<Document<JobSpec>, Vec<Diagnostic>> {
        let doc = parse(Path::new("jobs/x.yaml"), text)?;
        if doc.problems.is_empty() {
            Ok(doc)
        } else {
            Err(doc.problems)
        }
    }

    const GOOD: &str = "inputs:\n  orders:\n    url: file://./data/orders/\n    columns: { id: int64 }\nsteps:\n  - { name: a, sql: sql/a.sql }\n";

    #[test]
    fn a_good_job_parses() {
        let doc = job(GOOD).unwrap();
        assert_eq!(doc.value.steps[0].name, "a");
        assert!(
            matches!(&doc.value.steps[0].kind, steps::StepKindSpec::Sql(f) if f == "sql/a.sql")
        );
        assert_eq!(doc.diag("steps[0].sql", "m").line, 6);
    }

    #[test]
    fn several_mistakes_are_all_reported_with_positions() {
        let text = "inputs:\n  orders:\n    url: file://./data/orders/\n    colums: { id: int64 }\n    columns: { id: integer64 }\nsteps:\n  - { name: a, sql: sql/a.sql, kind: x }\noutputs:\n  - { from: a, url: file://./o/, row_group_size: lots }\n";
        let errs = job(text).unwrap_err();
        let shown: Vec<String> = errs.iter().map(|d| d.to_string()).collect();
        assert_eq!(errs.len(), 4, "{shown:#?}");
        assert!(
            shown[0].starts_with("jobs/x.yaml:4:5: inputs.orders.colums: unknown field `colums`"),
            "{shown:#?}"
        );
        assert!(
            shown.iter().any(|s| s.starts_with("jobs/x.yaml:5:")
                && s.contains("inputs.orders.columns.id")
                && s.contains("unknown column type `integer64`")),
            "{shown:#?}"
        );
        assert!(
            shown
                .iter()
                .any(|s| s.starts_with("jobs/x.yaml:7:") && s.contains("steps[0].kind")),
            "{shown:#?}"
        );
        assert!(shown.iter().any(|s| s.starts_with("jobs/x.yaml:9:") && s.contains("outputs[0].row_group_size")), "{shown:#?}");
    }

    #[test]
    fn malformed_yaml_has_a_position() {
        let errs = job("inputs:\n  orders: [a, b\nsteps: []\n").unwrap_err();
        assert_eq!(errs.len(), 1);
        assert!(errs[0].message.starts_with("invalid YAML"), "{:?}", errs[0]);
        assert!(errs[0].line >= 2);
    }

    #[test]
    fn a_missing_field_names_the_field() {
        let errs = job("inputs:\n  orders:\n    columns: { id: int64 }\nsteps: []\n").unwrap_err();
        assert_eq!(errs[0].field, "inputs.orders.url", "{errs:?}");
        assert_eq!((errs[0].line, errs[0].col), (2, 3));
    }

    #[test]
    fn duplicate_columns_are_rejected() {
        let errs =
            job("inputs:\n  o:\n    url: x\n    columns: { id: int64, id: utf8 }\nsteps: []\n")
                .unwrap_err();
        assert!(errs[0].message.contains("duplicate"), "{errs:?}");
    }
}
