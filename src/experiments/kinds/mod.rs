//! The registry of experiment kinds. Each kind is one file here that owns its name, the [[run]]
//! keys it accepts, its resolver (TOML to typed options, every problem named) and its run (the
//! rows of a job); the kind list, the accepted keys per kind and the dispatch come from this
//! table. Adding a kind: its file, its line below, its RunKind variant, README.
pub mod ablation;
pub mod activation_patching;
pub mod attribution_patching;
pub mod direct_logit_attribution;
pub mod head_scores;
pub mod logit_lens;

use std::path::Path;

use crate::error::{Error, Result};
use crate::experiments::context::RunContext;
use crate::output::table::Row;
use crate::spec::raw::RawRun;
use crate::spec::resolve::Ctx;
use crate::spec::{RunKind, RunSpec};

/// One experiment kind.
pub struct KindInfo {
    /// The `kind = "..."` of a [[run]].
    pub name: &'static str,
    /// The [[run]] keys this kind reads besides `name` and `kind`; others are errors.
    pub keys: &'static [&'static str],
    /// Run `i` of the spec as typed options; None when it has errors (reported on `Ctx`).
    pub(crate) resolve: fn(&mut Ctx, &RawRun, usize, &Path) -> Option<RunKind>,
    /// What a run of this kind reads: the job graph adds those inputs and shared passes.
    pub needs: fn(&RunKind) -> Needs,
    /// The rows and manifest note of one job of a run of this kind.
    pub run: fn(&RunContext, &RunSpec, Part) -> Result<(Vec<Row>, serde_json::Value)>,
}

/// What a run reads; declared once per kind, read by validation, tokenizing and the job graph.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Needs {
    /// The spec's prompts (tokenized).
    pub prompts: bool,
    /// Corrupted prompts (or noise).
    pub corruption: bool,
    /// The metric's answers, single tokens.
    pub answers: bool,
    /// The shared clean and corrupted runs (caching the patched hooks).
    pub clean_and_corrupted: bool,
    /// The shared corrupted forward+backward.
    pub attribution_pass: bool,
    /// The shared clean run caching the analysis hooks.
    pub analysis_cache: bool,
}

/// Which part of a run one job computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Whole,
    /// One patch target at one layer (activation patching).
    TargetLayer { target: usize, layer: usize },
}

pub static KINDS: &[KindInfo] = &[activation_patching::KIND, attribution_patching::KIND, logit_lens::KIND, direct_logit_attribution::KIND, head_scores::KIND, ablation::KIND];

pub fn by_name(name: &str) -> Option<&'static KindInfo> {
    KINDS.iter().find(|k| k.name == name)
}

/// What a run of this kind reads.
pub fn needs(kind: &RunKind) -> Needs {
    by_name(kind.name()).map_or(Needs::default(), |k| (k.needs)(kind))
}

pub fn names() -> Vec<&'static str> {
    KINDS.iter().map(|k| k.name).collect()
}

/// Runs one job of `run`.
pub fn run_job(cx: &RunContext, run: &RunSpec, part: Part) -> Result<(Vec<Row>, serde_json::Value)> {
    let kind = by_name(run.kind_name()).ok_or_else(|| Error::Other(format!("run '{}': kind {} is not registered", run.name, run.kind_name())))?;
    (kind.run)(cx, run, part)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_is_registered_once_and_the_readme_documents_it() {
        let names = names();
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), names.len(), "a kind is registered twice: {names:?}");
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
        for k in KINDS {
            assert!(by_name(k.name).is_some_and(|f| std::ptr::eq(f, k)));
            assert!(!k.keys.contains(&"name") && !k.keys.contains(&"kind"), "{}: name and kind are every run's", k.name);
            assert!(readme.contains(&format!("`{}`", k.name)), "README does not document the {} kind", k.name);
        }
    }
}
