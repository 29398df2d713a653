//! The run kinds. Each kind is one file here, named as its `kind = "..."`, that owns everything
//! about it: its options and their resolution (every problem named), its checks against the
//! model and the prompts, what it reads, what it captures in the shared passes, its jobs, its
//! rows and manifest note, and any job-key input of its own. `registry!` below is the only list
//! of kinds: adding one is its file, its module line and its registry line here, and its row in
//! docs/spec-reference.md (docs/architecture.md walks through it). The passes every kind shares
//! live in `shared/`.
//!
//! The modules are declared here rather than by `registry!` so that rustfmt (and an editor)
//! sees their files; a file here that is not registered fails `kinds::tests`.
pub mod ablation;
pub mod activation_patching;
pub mod attribution_patching;
pub mod direct_logit_attribution;
pub mod edge_attribution;
pub mod head_scores;
pub mod logit_lens;
pub mod options;
mod run;
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
use crate::spec::SpecErrors;

pub use run::RunSpec;

/// A resolved spec: its sections and its runs.
pub type Spec = crate::spec::Spec<RunSpec>;

/// Declares the kinds: the `RunKind` enum of their options (one variant each, serialized as
/// `{"Variant": options}` in manifests), `KINDS`, their table, and the dispatch on the kind's name.
macro_rules! registry {
    ($($variant:ident => $module:ident),* $(,)?) => {
        /// A resolved run's kind with its options (each kind's `Options`).
        #[derive(Debug, Clone, serde::Serialize)]
        pub enum RunKind {
            $($variant($module::Options),)*
        }

        impl RunKind {
            /// The `kind = "..."` it was resolved from.
            pub fn name(&self) -> &'static str {
                match self {
                    $(RunKind::$variant(_) => $module::KIND.name,)*
                }
            }
        }

        /// Every kind, in the order `plan` and errors list them.
        pub static KINDS: &[KindInfo] = &[$($module::KIND),*];

        /// A run's options as written: its kind's `Raw`.
        #[derive(Debug)]
        pub enum RawOptions {
            $($variant($module::Raw),)*
        }

        /// Reads one [[run]] table as the options of kind `.0` (nothing for an unknown kind).
        struct ReadAs<'a>(&'a str);

        impl<'de> serde::de::DeserializeSeed<'de> for ReadAs<'_> {
            type Value = Option<RawOptions>;
            fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> std::result::Result<Self::Value, D::Error> {
                use serde::Deserialize;
                $(if self.0 == $module::KIND.name {
                    return $module::Raw::deserialize(d).map(|r| Some(RawOptions::$variant(r)));
                })*
                serde::de::IgnoredAny::deserialize(d).map(|_| None)
            }
        }

        /// The [[run]] keys kind `name` reads besides `name` and `kind`: its `Raw`'s fields.
        pub fn option_keys(name: &str) -> Vec<&'static str> {
            $(if name == $module::KIND.name {
                let fields = crate::spec::raw::field_names::<$module::Raw>();
                return fields.iter().copied().filter(|k| *k != "name" && *k != "kind").collect();
            })*
            Vec::new()
        }

        /// Resolves options as their kind does.
        fn resolve_options(
            cx: &mut Ctx,
            options: &RawOptions,
            located: &mut options::Located,
            i: usize,
            base: &Path,
        ) -> Option<RunKind> {
            match options {
                $(RawOptions::$variant(r) => $module::resolve(cx, r, located, i, base),)*
            }
        }
    };
}

registry! {
    ActivationPatching => activation_patching,
    AttributionPatching => attribution_patching,
    LogitLens => logit_lens,
    DirectLogitAttribution => direct_logit_attribution,
    HeadScores => head_scores,
    Ablation => ablation,
    EdgeAttribution => edge_attribution,
}

impl RunKind {
    /// What the run reads, as its kind declares it.
    pub fn needs(&self) -> Needs {
        needs(self)
    }
}

/// Reads and resolves a spec file (relative paths in it are relative to the file), with the
/// prompts of `prompts_file` instead of the spec's own when given (`--prompts`).
pub fn resolve_file_with_prompts(path: &Path, prompts_file: Option<&Path>) -> std::result::Result<Spec, SpecErrors> {
    crate::spec::resolve::resolve_file(path, prompts_file, &Registry)
}

/// Reads and resolves a spec file.
pub fn resolve_file(path: &Path) -> std::result::Result<Spec, SpecErrors> {
    resolve_file_with_prompts(path, None)
}

/// Resolves a spec's text (`file` names it in errors; relative paths are relative to `base`).
pub fn resolve_text(text: &str, file: &str, base: &Path) -> std::result::Result<Spec, SpecErrors> {
    crate::spec::resolve::resolve_text(text, file, base, None, &Registry)
}

/// The kinds as spec resolution sees them.
struct Registry;

impl crate::spec::RunKinds for Registry {
    type Run = RunSpec;
    type Options = Option<RawOptions>;

    fn read(&self, text: &str, runs: &[RawRun]) -> std::result::Result<Vec<Option<RawOptions>>, toml::de::Error> {
        crate::spec::raw::read_runs(text, runs.iter().map(|r| ReadAs(r.kind.get_ref())).collect())
    }

    fn resolve(
        &self,
        cx: &mut Ctx,
        r: &RawRun,
        options: &Option<RawOptions>,
        i: usize,
        base: &Path,
    ) -> Option<RunSpec> {
        options::resolve_run(cx, r, options.as_ref(), i, base)
    }
}

/// One experiment kind.
pub struct KindInfo {
    /// The `kind = "..."` of a [[run]].
    pub name: &'static str,
    /// What a run of this kind reads: the job graph adds those inputs and shared passes.
    pub needs: fn(&RunKind) -> Needs,
    /// The hook points its runs capture in the shared passes.
    pub captures: fn(&RunSpec, &Model) -> Result<Captures>,
    /// The jobs a run of this kind is split into, with their sizes and costs.
    pub jobs: fn(&RunSpec, &Sizing) -> Vec<JobDraft>,
    /// Problems of a run against the model's config, before weights load, added to `problems`
    /// (`file` is the spec's; `RunSpec::key_at` locates a key in it).
    pub check_model: fn(&RunSpec, &ModelConfig, file: &str, problems: &mut Vec<String>),
    /// Problems of a run against the prompts' token lengths (the longest, each prompt's).
    pub check_prompts: fn(&RunSpec, usize, &[usize], file: &str) -> Vec<String>,
    /// The rows and manifest note of one job of a run of this kind.
    pub run: fn(&RunContext, &RunSpec, Part) -> Result<JobOutput>,
    /// The run's manifest note from its jobs' notes.
    pub note: fn(&[&serde_json::Value]) -> serde_json::Value,
    /// What one job's result depends on beyond the model, inputs and metric (its content key's
    /// own part): `whole_job_key` for most kinds.
    pub key: fn(&RunSpec, Part) -> Result<serde_json::Value>,
    /// The report's figures of a run's rows (all of them, then each prompt's).
    pub figures: crate::output::figure::KindFigures,
    /// Whether the report draws the attention patterns of the run's top heads by |value|.
    pub pattern_heads: bool,
}

/// The key part of a job that computes a whole run: the run's options and layers.
pub fn whole_job_key(run: &RunSpec, _: Part) -> Result<serde_json::Value> {
    Ok(serde_json::json!({"task": "whole", "kind": run.kind, "layers": run.layers, "dataset": null}))
}

/// The key part of job `part` of `run`.
pub fn job_key(run: &RunSpec, part: Part) -> Result<serde_json::Value> {
    by_name(run.kind_name()).map_or_else(|| whole_job_key(run, part), |k| (k.key)(run, part))
}

/// A kind with no checks against the model beyond its layers.
pub fn no_model_check(_: &RunSpec, _: &ModelConfig, _: &str, _: &mut Vec<String>) {}

/// A kind with no checks against the prompts' lengths.
pub fn no_prompt_check(_: &RunSpec, _: usize, _: &[usize], _: &str) -> Vec<String> {
    Vec::new()
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
    /// Template prompts' roles: each role's position in every prompt.
    pub roles: &'a [Vec<i64>],
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
    pub clean_corrupted: bool,
    /// The shared corrupted forward+backward.
    pub attribution_pass: bool,
    /// ... and a forward+backward per layer after it (GradDrop).
    pub attribution_pass_per_layer: bool,
    /// The shared clean run caching the analysis hooks.
    pub analysis_cache: bool,
    /// The metric as a direction in the residual stream (W_U's answer columns), which only a
    /// linear metric has.
    pub metric_direction: bool,
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

    /// The registry is the only list of kinds: every file here is a registered kind of its
    /// name (and every kind a file), each documented in README and docs/spec-reference.md.
    #[test]
    fn every_kind_is_a_file_here_registered_once_and_documented() {
        let names = names();
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), names.len(), "a kind is registered twice: {names:?}");
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut files: Vec<String> = std::fs::read_dir(root.join("src/kinds"))
            .unwrap()
            .filter_map(|e| {
                let p = e.unwrap().path();
                let stem = p.file_stem()?.to_str()?.to_string();
                (p.extension()? == "rs" && !["mod", "options", "run"].contains(&stem.as_str())).then_some(stem)
            })
            .collect();
        files.sort();
        assert_eq!(files, unique, "src/kinds/<kind>.rs and the registry! list must name the same kinds");
        let docs = [
            ("README.md", std::fs::read_to_string(root.join("README.md")).unwrap()),
            ("docs/spec-reference.md", std::fs::read_to_string(root.join("docs/spec-reference.md")).unwrap()),
        ];
        for k in KINDS {
            assert!(by_name(k.name).is_some_and(|f| std::ptr::eq(f, k)));
            let keys = option_keys(k.name);
            assert!(!keys.contains(&"name") && !keys.contains(&"kind"), "{}: name and kind are every run's", k.name);
            for (doc, text) in &docs {
                assert!(text.contains(&format!("`{}`", k.name)), "{doc} does not document the {} kind", k.name);
            }
        }
    }

    #[test]
    fn a_kinds_option_keys_are_its_raw_structs_fields() {
        assert_eq!(option_keys("logit_lens"), ["top_k", "top_k_at", "incl_mid"]);
        assert_eq!(option_keys("activation_patching"), ["hooks", "over", "layers", "window", "units"]);
        assert!(option_keys("no_such_kind").is_empty());
    }

    #[test]
    fn patch_cost_counts_the_positions_after_the_prefix_the_run_reuses() {
        let cfg = crate::model::config::ModelConfig::new(4, 8, 2, 4, 16, 32).unwrap();
        let z = |first_diff| Sizing {
            cfg: &cfg,
            seq: 10,
            first_diff,
            n: 2,
            chunk: 1,
            layers: vec![0, 1, 2, 3],
            roles: &[],
        };
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
