//! Running one work job on a context: a panic in it becomes an error naming its prompts, and its
//! result is stored under its key at once (the executor, the patch groups and each device's
//! replica run jobs through this).
use crate::engine::nonfinite;
use crate::error::{Error, Result};
use crate::graph::store::Store;
use crate::kinds::shared::context::RunContext;
use crate::kinds::shared::inputs::Tokenized;
use crate::kinds::JobOutput;

/// Runs work job `job` (a panic in it becomes an error naming its prompts) and stores its
/// result under its key at once.
pub(crate) fn run_and_store(cx: &RunContext, job: &crate::graph::Job, store: Option<&Store>) -> Result<JobOutput> {
    let run =
        &cx.spec.runs[job.task.run().ok_or_else(|| Error::Other(format!("job [{}] is not a work job", job.id)))?];
    let (rows, note) = crate::panics::guarded(&prompts_of(cx.toks), || {
        crate::panics::injected(&job.name);
        crate::kinds::run_job(cx, run, job.task.part())
    })?;
    if let (Some(store), Some(key)) = (store, &job.key) {
        store.put(key, &rows, &note)?;
    }
    Ok((rows, note))
}

/// The prompts a job computes on, for a failure's message (jobs batch every prompt).
pub(crate) fn prompts_of(toks: Option<&Tokenized>) -> String {
    match toks.map(Tokenized::n_prompts) {
        Some(0) | None => "no prompts".into(),
        Some(1) => "prompt 0".into(),
        Some(n) => format!("prompts 0-{} (one batch)", n - 1),
    }
}

/// A NaN baseline: the first hook of the clean (or corrupted) run it comes from.
pub(crate) fn baseline_finding(cx: &RunContext) -> Result<Option<nonfinite::Finding>> {
    let (Some(p), Some(t)) = (cx.clean_corrupted_if_made(), cx.toks) else { return Ok(None) };
    let bad_clean = p.clean_per_prompt.iter().any(|v| !v.is_finite());
    if !bad_clean && p.corrupted_per_prompt.iter().all(|v| v.is_finite()) {
        return Ok(None);
    }
    let (which, tokens) = if bad_clean { ("clean", Some(&t.clean)) } else { ("corrupted", t.corrupted.as_ref()) };
    let found = match tokens {
        Some(tokens) => nonfinite::first_in_activations(cx.model, tokens, t.mask.as_ref())?,
        None => None,
    };
    Ok(Some(found.unwrap_or_else(|| nonfinite::Finding {
        kind: "baseline".into(),
        at: format!("the {which} run's metric"),
        count: 1,
        prompt: None,
        position: None,
    })))
}
