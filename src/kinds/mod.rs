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
pub mod options;
pub mod shared;

use std::path::Path;

use crate::error::{Error, Result};
use crate::kinds::shared::context::RunContext;
use crate::model::config::ModelConfig;
use crate::model::hook_point::{HookPoint, Site};
use crate::model::Model;
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
    /// The hook points its runs capture in the shared passes.
    pub captures: fn(&RunSpec, &Model) -> Result<Captures>,
    /// The jobs a run of this kind is split into, with their sizes and costs.
    pub jobs: fn(&RunSpec, &Sizing) -> Vec<JobDraft>,
    /// The rows and manifest note of one job of a run of this kind.
    pub run: fn(&RunContext, &RunSpec, Part) -> Result<JobOutput>,
    /// The run's manifest note from its jobs' notes.
    pub note: fn(&[&serde_json::Value]) -> serde_json::Value,
}

/// What one job returns: its rows and its manifest note.
pub type JobOutput = (Vec<Row>, serde_json::Value);

/// The note of a run that is one job: that job's.
pub fn only_note(notes: &[&serde_json::Value]) -> serde_json::Value {
    notes.first().map(|n| (*n).clone()).unwrap_or(serde_json::Value::Null)
}

/// The hook points a run captures in the shared passes (the graph makes each pass once, for
/// the union over runs).
#[derive(Debug, Clone, Default)]
pub struct Captures {
    /// Sites the clean run caches at every layer (patch sources).
    pub clean_sites: Vec<Site>,
    /// Points of the corrupted forward+backward (activations and gradients).
    pub gradient_points: Vec<HookPoint>,
    /// Points of the clean run cached for analysis.
    pub analysis_points: Vec<HookPoint>,
}

/// What a kind sizes its jobs with.
pub struct Sizing<'a> {
    pub cfg: &'a ModelConfig,
    /// The prompts' token length.
    pub seq: usize,
    /// The first position where clean and corrupted differ.
    pub first_diff: i64,
    /// Rows per batch: prompts × noise samples.
    pub n: usize,
    /// Cells per batched forward.
    pub chunk: usize,
    /// The run's layers.
    pub layers: Vec<usize>,
}

impl Sizing<'_> {
    /// Work of `forwards` whole forward passes, in layer-rows.
    pub fn full(&self, forwards: usize) -> f64 {
        (forwards * self.n * self.cfg.n_layers) as f64
    }

    /// Work of patched forwards of `cells` at `layer`: batches of cells × n prompts, from the
    /// patched layer on, over the positions after the shared prefix.
    pub fn patch_cost(&self, cells: usize, layer: usize) -> f64 {
        let skip = crate::analysis::clean_corrupted::shared_prefix_len(self.first_diff, self.seq as i64).unwrap_or(0);
        let rows = (cells * self.n) as f64;
        rows * (self.cfg.n_layers - layer.min(self.cfg.n_layers)) as f64
            * ((self.seq - skip).max(1) as f64 / self.seq.max(1) as f64)
    }
}

/// One job of a run, before the graph places it.
#[derive(Debug, Clone)]
pub struct JobDraft {
    pub name: String,
    pub part: Part,
    pub cells: usize,
    pub filled: usize,
    pub forwards: usize,
    pub tl_forwards: usize,
    /// Estimated work in layer-rows (what shards are balanced on).
    pub cost: f64,
}

impl JobDraft {
    pub fn whole(name: String, cost: f64) -> JobDraft {
        JobDraft { name, part: Part::Whole, cells: 0, filled: 0, forwards: 0, tl_forwards: 0, cost }
    }
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
    TargetLayer {
        target: usize,
        layer: usize,
    },
}

pub static KINDS: &[KindInfo] = &[
    activation_patching::KIND,
    attribution_patching::KIND,
    logit_lens::KIND,
    direct_logit_attribution::KIND,
    head_scores::KIND,
    ablation::KIND,
];

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

/// The hook points `run` captures in the shared passes.
pub fn captures(run: &RunSpec, model: &Model) -> Result<Captures> {
    by_name(run.kind_name()).map_or(Ok(Captures::default()), |k| (k.captures)(run, model))
}

/// The manifest note of `run` from its jobs' notes.
pub fn run_note(run: &RunSpec, notes: &[&serde_json::Value]) -> serde_json::Value {
    by_name(run.kind_name()).map_or_else(|| only_note(notes), |k| (k.note)(notes))
}

/// Runs one job of `run`.
pub fn run_job(cx: &RunContext, run: &RunSpec, part: Part) -> Result<JobOutput> {
    let kind = by_name(run.kind_name())
        .ok_or_else(|| Error::Other(format!("run '{}': kind {} is not registered", run.name, run.kind_name())))?;
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
            assert!(
                !k.keys.contains(&"name") && !k.keys.contains(&"kind"),
                "{}: name and kind are every run's",
                k.name
            );
            assert!(readme.contains(&format!("`{}`", k.name)), "README does not document the {} kind", k.name);
        }
    }

    #[test]
    fn patch_cost_counts_the_positions_after_the_prefix_the_run_reuses() {
        let cfg = crate::model::config::ModelConfig::new(4, 8, 2, 4, 16, 32).unwrap();
        let z = |first_diff| Sizing { cfg: &cfg, seq: 10, first_diff, n: 2, chunk: 1, layers: vec![0, 1, 2, 3] };
        // 3 cells × 2 prompts, layers 1..4, all 10 positions when nothing is reused.
        assert_eq!(z(0).patch_cost(3, 1), 18.0);
        assert_eq!(z(10).patch_cost(3, 1), 18.0);
        // A prefix of 4 positions: 6 of 10 computed.
        assert_eq!(z(4).patch_cost(3, 1), 18.0 * 0.6);
        for (first_diff, reused) in [(0, None), (4, Some(4)), (9, Some(9)), (10, None)] {
            assert_eq!(crate::analysis::clean_corrupted::shared_prefix_len(first_diff, 10), reused);
        }
    }
}
