//! What becomes of each job of a run: it runs, its result comes from the store, another shard
//! owns it, or (a shared pass) no job that runs reads it.
use std::collections::HashMap;

use crate::graph::patch_groups::SharedOutput;
use crate::graph::store::Store;
use crate::graph::Plan;
use crate::kinds::Spec;
use crate::output::table::Row;

/// A job's status, as the manifest records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum JobStatus {
    #[serde(rename = "ran")]
    Ran,
    /// Its result read from the store.
    #[serde(rename = "stored")]
    Stored,
    /// A shared pass no job that reads it had to run.
    #[serde(rename = "skipped")]
    Skipped,
    /// A work job another shard owns.
    #[serde(rename = "other shard")]
    OtherShard,
}

/// Work jobs' results stored from an earlier run (unless `fresh`), and every job's status:
/// stored, other shard (a work job another shard owns) or, for now, ran.
pub(crate) fn work_status(
    spec: &Spec,
    plan: &Plan,
    store: Option<&Store>,
    fresh: bool,
    owned: impl Fn(usize) -> bool,
) -> (Vec<JobStatus>, HashMap<usize, SharedOutput>) {
    let mut results = HashMap::new();
    let mut status = vec![JobStatus::Ran; plan.jobs.len()];
    for j in plan.work() {
        if !owned(j.id) {
            status[j.id] = JobStatus::OtherShard;
        } else if let (Some(store), false, Some(key)) = (store, fresh, &j.key) {
            if let Some(s) = store.get(key) {
                let run_name = &spec.runs[j.task.run().expect("work jobs have a run")].name;
                let rows = s.rows.into_iter().map(|r| Row { run: run_name.clone(), ..r }).collect();
                results.insert(j.id, (std::sync::Arc::new(rows), s.note));
                status[j.id] = JobStatus::Stored;
            }
        }
    }
    (status, results)
}

/// The jobs that some running work job reads, directly or not (a shared pass runs only then);
/// shared passes no running job reads are skipped.
pub(crate) fn needed_by_running_jobs(plan: &Plan, status: &mut [JobStatus]) -> Vec<bool> {
    let mut needed = vec![false; plan.jobs.len()];
    for j in plan.work().filter(|j| status[j.id] == JobStatus::Ran) {
        let mut stack = vec![j.id];
        while let Some(id) = stack.pop() {
            if !needed[id] {
                needed[id] = true;
                stack.extend(&plan.jobs[id].deps);
            }
        }
    }
    for j in plan.jobs.iter().filter(|j| j.task.is_shared() && !needed[j.id]) {
        status[j.id] = JobStatus::Skipped;
    }
    needed
}
