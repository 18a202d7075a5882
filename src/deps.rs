//! `depends_on` between jobs: cycle detection (for `validate`) and a run order.

use std::collections::{BTreeMap, BTreeSet};

use crate::config::Diagnostic;
use crate::error::Result;
use crate::job::Project;

/// The `depends_on` lists of the jobs that load; jobs that do not load are left out (their own
/// problems are reported by validate).
fn graph(project: &Project, jobs: &[String]) -> Result<BTreeMap<String, Vec<String>>> {
    let mut g = BTreeMap::new();
    let all: BTreeSet<String> = project
        .job_names()?
        .into_iter()
        .chain(jobs.iter().cloned())
        .collect();
    for name in all {
        if let Ok(plan) = project.load_job(&name) {
            g.insert(name, plan.doc.value.depends_on.clone());
        }
    }
    Ok(g)
}

/// A dependency cycle through any of `jobs`, as a diagnostic on the first job's `depends_on`.
pub fn find_cycle(project: &Project, jobs: &[String]) -> Result<Option<Diagnostic>> {
    let g = graph(project, jobs)?;
    for start in jobs {
        let mut path = vec![start.clone()];
        if let Some(cycle) = dfs(&g, start, &mut path, &mut BTreeSet::new()) {
            let plan = project.load_job(start)?;
            return Ok(Some(plan.doc.diag(
                "depends_on",
                format!(
                    "dependency cycle: {}; remove one of these depends_on entries",
                    cycle.join(" -> ")
                ),
            )));
        }
    }
    Ok(None)
}

fn dfs(
    g: &BTreeMap<String, Vec<String>>,
    node: &str,
    path: &mut Vec<String>,
    done: &mut BTreeSet<String>,
) -> Option<Vec<String>> {
    for next in g.get(node).into_iter().flatten() {
        if let Some(i) = path.iter().position(|p| p == next) {
            let mut cycle = path[i..].to_vec();
            cycle.push(next.clone());
            return Some(cycle);
        }
        if done.contains(next) {
            continue;
        }
        path.push(next.clone());
        if let Some(c) = dfs(g, next, path, done) {
            return Some(c);
        }
        path.pop();
        done.insert(next.clone());
    }
    None
}

/// All jobs ordered so that each comes after the jobs it depends on (ties by name).
pub fn run_order(project: &Project) -> Result<Vec<String>> {
    let g = graph(project, &[])?;
    let mut order: Vec<String> = Vec::new();
    let mut placed = BTreeSet::new();
    while placed.len() < g.len() {
        let ready: Vec<String> = g
            .iter()
            .filter(|(n, deps)| {
                !placed.contains(*n)
                    && deps
                        .iter()
                        .all(|d| placed.contains(d) || !g.contains_key(d))
            })
            .map(|(n, _)| n.clone())
            .collect();
        if ready.is_empty() {
            break; // a cycle: validate reports it
        }
        for n in ready {
            placed.insert(n.clone());
            order.push(n);
        }
    }
    Ok(order)
}
