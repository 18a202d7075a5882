//! Across jobs: `depends_on` cycles, the order jobs run in for a date, and one writer per table
//! (two jobs whose outputs are the same table, or one inside the other, would replace each
//! other's rows and, running at once, delete each other's staged files).
//!
//! Works on the plans of the jobs that load (structurally: no SQL is planned); a job that does
//! not load is left out, its own problems are reported by `validate`.

use std::collections::{BTreeMap, BTreeSet};

use super::JobPlan;
use crate::config::Diagnostic;
use crate::error::Result;
use crate::project::Project;

/// Every job of the jobs folder that loads, by name.
pub fn load_all(project: &Project) -> Result<BTreeMap<String, JobPlan>> {
    let mut plans = BTreeMap::new();
    for name in project.job_names()? {
        if let Ok(plan) = super::load(project, &name) {
            plans.insert(name, plan);
        }
    }
    Ok(plans)
}

/// A dependency cycle through any of `jobs`, as a diagnostic on the `depends_on` of the first
/// job of the cycle (by name) among `jobs`.
pub fn cycle(plans: &BTreeMap<String, JobPlan>, jobs: &[String]) -> Option<Diagnostic> {
    for start in jobs {
        let mut path = vec![start.clone()];
        if let Some(cycle) = dfs(plans, start, &mut path, &mut BTreeSet::new()) {
            let at = cycle
                .iter()
                .filter(|j| jobs.contains(j))
                .min()
                .unwrap_or(start);
            let plan = plans.get(at)?;
            // Rotate the cycle to start (and end) at the job it is reported on.
            let mut ring: Vec<String> = cycle[..cycle.len() - 1].to_vec();
            if let Some(i) = ring.iter().position(|j| j == at) {
                ring.rotate_left(i);
            }
            ring.push(at.clone());
            return Some(plan.source.diag(
                "depends_on",
                format!(
                    "dependency cycle: {}; remove one of these depends_on entries",
                    ring.join(" -> ")
                ),
            ));
        }
    }
    None
}

fn dfs(
    plans: &BTreeMap<String, JobPlan>,
    node: &str,
    path: &mut Vec<String>,
    done: &mut BTreeSet<String>,
) -> Option<Vec<String>> {
    for next in plans.get(node).map(|p| &p.depends_on).into_iter().flatten() {
        if let Some(i) = path.iter().position(|p| p == next) {
            let mut cycle = path[i..].to_vec();
            cycle.push(next.clone());
            return Some(cycle);
        }
        if done.contains(next) {
            continue;
        }
        path.push(next.clone());
        if let Some(c) = dfs(plans, next, path, done) {
            return Some(c);
        }
        path.pop();
        done.insert(next.clone());
    }
    None
}

/// All jobs ordered so that each comes after the jobs it depends on (ties by name).
pub fn run_order(plans: &BTreeMap<String, JobPlan>) -> Vec<String> {
    let mut order: Vec<String> = Vec::new();
    let mut placed = BTreeSet::new();
    while placed.len() < plans.len() {
        let ready: Vec<String> = plans
            .iter()
            .filter(|(n, p)| {
                !placed.contains(*n)
                    && p.depends_on
                        .iter()
                        .all(|d| placed.contains(d) || !plans.contains_key(d))
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
    order
}

/// Outputs of two different jobs that are the same table or one inside the other, for every
/// pair that involves one of `jobs`. Each pair is reported once, on the output of the job that
/// is checked (the later one by name when both are), naming the other job's file and line.
pub fn shared_tables(plans: &BTreeMap<String, JobPlan>, jobs: &[String]) -> Vec<Diagnostic> {
    let mut diags = Vec::new();
    for (a, pa) in plans {
        for (b, pb) in plans.range::<String, _>((
            std::ops::Bound::Excluded(a.clone()),
            std::ops::Bound::Unbounded,
        )) {
            let (checked_a, checked_b) = (jobs.contains(a), jobs.contains(b));
            if !checked_a && !checked_b {
                continue;
            }
            for (i, oa) in pa.outputs.iter().enumerate() {
                for (j, ob) in pb.outputs.iter().enumerate() {
                    if !oa.location.overlaps(&ob.location) {
                        continue;
                    }
                    // Reported on b's output unless only a is checked.
                    let (here, i_here, other, j_other, o_other) = if checked_b {
                        (pb, j, pa, i, oa)
                    } else {
                        (pa, i, pb, j, ob)
                    };
                    let there = other.source.diag(&format!("outputs[{j_other}].url"), "");
                    diags.push(here.source.diag(
                        &format!("outputs[{i_here}].url"),
                        format!(
                            "job `{}` writes the same table or one inside it ({}:{}:{}: outputs[{j_other}] `{}`); a table has one writer: give one of them its own folder",
                            other.name,
                            crate::error::shown_path(&there.file),
                            there.line,
                            there.col,
                            o_other.location.written
                        ),
                    ));
                }
            }
        }
    }
    diags
}
