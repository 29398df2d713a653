//! Content keys of work jobs. A key is the sha256 of everything a job's rows depend on: the
//! model's files (weights, config, tokenizer) by digest, the weight processing, dtype and
//! attention kernel, those of the tokens, answers, corruption and metric its kind reads, whether
//! it writes per-prompt rows, the job's own intervention (kind, options, target, layer) and the
//! engine (tl-run version, commit and binary). Two jobs with one key
//! produce identical rows, so a stored result can stand in for running the job. The run's name
//! is not part of it: a renamed run reuses its rows.
use std::path::PathBuf;
use std::sync::OnceLock;

use sha2::Digest;

use crate::error::Result;
use crate::graph::{Plan, Task};
use crate::kinds::shared::inputs::Tokenized;
use crate::kinds::{Part, Spec};

/// What identifies the code computing a result: the version and commit it was built from, and
/// the binary itself (its size and modification time), so a rebuilt development binary never
/// reads results an earlier build stored. `TL_RUN_ENGINE_ID` replaces it, to compare the keys
/// two builds give (scripts/output_digests.sh); a run with it set may read results another build
/// stored, so it is for that comparison only.
pub fn engine_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        if let Ok(id) = std::env::var("TL_RUN_ENGINE_ID") {
            return id;
        }
        let exe = std::env::current_exe().ok().and_then(|p| std::fs::metadata(p).ok()).map(|m| {
            let mtime = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            format!("{}-{mtime}", m.len())
        });
        format!(
            "{}+{}+{}",
            env!("CARGO_PKG_VERSION"),
            option_env!("TL_RUN_GIT_COMMIT").unwrap_or("unknown"),
            exe.unwrap_or_default()
        )
    })
}

/// The answers as keys read them: one token per prompt as the ids alone (the keys of before token
/// sets), else every set and whether it is a multi-token answer.
fn answers_key(t: &Tokenized) -> serde_json::Value {
    let singles = t.correct.iter().chain(&t.incorrect).all(|s| s.len() <= 1) && !t.sequence.iter().any(|s| *s);
    if singles {
        let flat = |sets: &[Vec<i64>]| sets.iter().flatten().copied().collect::<Vec<i64>>();
        serde_json::json!((flat(&t.correct), flat(&t.incorrect)))
    } else {
        serde_json::json!({"correct": t.correct, "incorrect": t.incorrect, "sequence": t.sequence})
    }
}

fn sha256_json(v: &serde_json::Value) -> String {
    format!("{:x}", sha2::Sha256::digest(v.to_string().as_bytes()))
}

/// Sets the key of every work job of `plan`.
pub fn assign(plan: &mut Plan, spec: &Spec, toks: Option<&Tokenized>, digests: &[(PathBuf, String)]) -> Result<()> {
    let model = serde_json::json!({
        "engine": engine_id(),
        "model_files": digests.iter().map(|(_, d)| d).collect::<Vec<_>>(),
        "processing": spec.model.processing,
        "dtype": format!("{:?}", spec.model.kind()?),
        "attention": spec.model.attention,
    });
    for job in plan.jobs.iter_mut().filter(|j| j.task.is_work()) {
        let (run, part) = match job.task {
            Task::Patch { run, target, layer } => (run, Part::TargetLayer { target, layer }),
            task => (task.run().expect("work jobs belong to a run"), Part::Whole),
        };
        let r = &spec.runs[run];
        // Only the sections the job's kind reads: a changed metric does not invalidate head
        // scores on random tokens, nor changed prompts a run that reads none.
        let needs = r.kind.needs();
        let metric = &spec.metric;
        let reads = serde_json::json!({
            "tokens": toks.filter(|_| needs.prompts).map(|t| &t.record),
            "answers": toks.filter(|_| needs.answers).map(answers_key),
            "corruption": needs.corruption.then_some(&spec.corruption),
            "metric": needs.answers.then(|| serde_json::json!([metric.kind, metric.normalize, metric.wrong, metric.position])),
            "per_prompt": r.per_prompt.unwrap_or(metric.per_prompt),
        });
        let what = crate::kinds::job_key(r, part)?;
        job.key = Some(sha256_json(&serde_json::json!({"model": model, "reads": reads, "job": what})));
    }
    Ok(())
}
