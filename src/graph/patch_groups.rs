//! Activation-patching jobs that share forwards: on one device, a patching job runs together
//! with the later patching jobs at its layer (at any layer for the staircase schedule) that are
//! ready, one batched group of forwards for all of them. The others' results are stored the
//! moment the group finishes (a kill loses no finished job) and wait until the executor's loop
//! reaches their jobs, which record them as their own.
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::analysis::patching::Schedule;
use crate::error::{Error, Result};
use crate::graph::job::{prompts_of, run_and_store};
use crate::graph::status::JobStatus;
use crate::graph::{Job, Plan, Task};
use crate::kinds::shared::context::RunContext;
use crate::kinds::JobOutput;
use crate::output::table::Row;

/// A work job's rows (shared with the store's writer, not copied) and its manifest note.
pub(crate) type SharedOutput = (Arc<Vec<Row>>, serde_json::Value);

/// Patching jobs run together on this device: results of a group's later jobs (already stored),
/// waiting for the loop to reach them, and the jobs of groups that failed (they run alone).
#[derive(Default)]
pub(crate) struct PatchGroups {
    done: HashMap<usize, SharedOutput>,
    alone: HashSet<usize>,
}

/// Runs work job `job` on this device: its result from an earlier group if there is one, else
/// with the patching jobs at its layer that are still to run (they share its forwards), else
/// alone. Every job's result goes to `store` the moment it exists (a group's other jobs when the
/// group finishes, before the loop reaches them). A failed group runs its jobs one by one, so
/// that a failure is its own job's (named, and the others' rows kept).
pub(crate) fn run_here(
    c: &RunContext,
    plan: &Plan,
    job: &Job,
    status: &[JobStatus],
    groups: &mut PatchGroups,
    store: &mut dyn FnMut(&Job, &SharedOutput) -> Result<()>,
) -> Result<SharedOutput> {
    // Stored when its group finished.
    if let Some(done) = groups.done.remove(&job.id) {
        return Ok(done);
    }
    let mut stored = |j: &Job, (rows, note): JobOutput| -> Result<SharedOutput> {
        let output = (Arc::new(rows), note);
        store(j, &output)?;
        Ok(output)
    };
    let across_layers = Schedule::for_device(c.model.device).across_layers();
    let group = patch_group(plan, job, status, &groups.alone, across_layers);
    match (group.len() > 1).then(|| run_patch_group(c, plan, &group)) {
        Some(Ok(done)) => {
            let mut done = done.into_iter();
            let first = done.next().expect("one result per job");
            for (&id, output) in group[1..].iter().zip(done) {
                let output = stored(&plan.jobs[id], output)?;
                groups.done.insert(id, output);
            }
            stored(job, first)
        }
        Some(Err(e)) => {
            tracing::debug!(error = %e, jobs = ?group, "a group of patching jobs failed: running them one by one");
            groups.alone.extend(group.iter().copied());
            stored(job, run_and_store(c, job, None)?)
        }
        None => stored(job, run_and_store(c, job, None)?),
    }
}

/// `job` and the activation-patching jobs at its layer (at any layer with `across_layers`, for
/// the staircase schedule) that are still to run (status "ran", later in the plan, their inputs
/// ready, not in a group that failed): one group of forwards (patch_together). Any other job
/// alone.
fn patch_group(
    plan: &Plan,
    job: &Job,
    status: &[JobStatus],
    alone: &HashSet<usize>,
    across_layers: bool,
) -> Vec<usize> {
    let Task::Patch { layer, .. } = job.task else { return vec![job.id] };
    if alone.contains(&job.id) {
        return vec![job.id];
    }
    let mut group = vec![job.id];
    for other in plan.jobs.iter().skip(job.id + 1) {
        let ready = other.deps.iter().all(|&d| d < job.id) && !alone.contains(&other.id);
        if matches!(other.task, Task::Patch { layer: l, .. } if l == layer || across_layers)
            && status[other.id] == JobStatus::Ran
            && ready
        {
            group.push(other.id);
        }
    }
    group
}

/// Runs a group of patching jobs together.
fn run_patch_group(cx: &RunContext, plan: &Plan, group: &[usize]) -> Result<Vec<JobOutput>> {
    let jobs: Vec<(&crate::kinds::RunSpec, crate::kinds::Part)> = group
        .iter()
        .map(|&id| {
            let task = plan.jobs[id].task;
            let run = task.run().ok_or_else(|| Error::Other(format!("job [{id}] is not a work job")))?;
            Ok((&cx.spec.runs[run], task.part()))
        })
        .collect::<Result<_>>()?;
    crate::panics::guarded(&prompts_of(cx.toks), || {
        for &id in group {
            crate::panics::injected(&plan.jobs[id].name);
        }
        crate::kinds::activation_patching::patch_together(cx, &jobs)
    })
}
