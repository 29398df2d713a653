//! A resolved [[run]]: its name, its kind's options, its layers, and where its keys were given
//! (for errors found later against the model or the prompts).
use std::collections::BTreeMap;

use crate::kinds::RunKind;
use crate::model::config::ModelConfig;
use crate::spec::{Reads, Run};

#[derive(Debug, Clone, serde::Serialize)]
pub struct RunSpec {
    pub name: String,
    pub kind: RunKind,
    /// Only these layers (all when None), with the spec line and column they were given at.
    pub layers: Option<Vec<usize>>,
    pub layers_at: Option<(usize, usize)>,
    /// Where the options checked against the model were given (top_k, units, seq_len,
    /// token_range), by key, as (line, column).
    pub keys_at: BTreeMap<&'static str, (usize, usize)>,
    /// `per_prompt` of the [[run]] (None: [metric] per_prompt decides).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_prompt: Option<bool>,
}

impl RunSpec {
    /// Checks the run's layers against a model with `n_layers` layers.
    pub fn check_layers(&self, n_layers: usize, file: &str) -> Result<(), String> {
        let Some(layers) = &self.layers else { return Ok(()) };
        if let Some(bad) = layers.iter().find(|&&l| l >= n_layers) {
            let (line, col) = self.layers_at.unwrap_or((0, 0));
            return Err(format!(
                "{file}:{line}:{col}: run '{}': layer {bad} is out of range: the model has {n_layers} layers: 0-{}",
                self.name,
                n_layers - 1
            ));
        }
        Ok(())
    }

    /// `file:line:col` of one of the run's keys, or the file alone when the key was not given.
    pub(crate) fn key_at(&self, key: &str, file: &str) -> String {
        self.keys_at.get(key).map(|(l, c)| format!("{file}:{l}:{c}")).unwrap_or_else(|| file.to_string())
    }

    /// Checks the run against the model's config, before any weights are loaded: its layers,
    /// logit_lens's top_k against the vocabulary, ablation units against the layers, heads and
    /// neurons, and repeated random tokens against the context and the vocabulary. Every
    /// problem, one per line.
    pub fn check_model(&self, cfg: &ModelConfig, file: &str) -> Result<(), String> {
        let mut problems = Vec::new();
        if let Err(e) = self.check_layers(cfg.n_layers, file) {
            problems.push(e);
        }
        if let Some(kind) = super::by_name(self.kind_name()) {
            (kind.check_model)(self, cfg, file, &mut problems);
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("\n"))
        }
    }

    /// Checks the run against the prompts' token lengths (`seq` the longest, `lengths` each
    /// prompt's), as its kind does (ablation positions, custom detection matrices). One problem
    /// per line.
    pub fn check_positions(&self, seq: usize, lengths: &[usize], file: &str) -> Result<(), String> {
        let problems =
            super::by_name(self.kind_name()).map_or_else(Vec::new, |k| (k.check_prompts)(self, seq, lengths, file));
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("\n"))
        }
    }

    /// The layers the run covers: its `layers`, else all `n_layers`.
    pub fn layers_or_all(&self, n_layers: usize) -> Vec<usize> {
        self.layers.clone().unwrap_or_else(|| (0..n_layers).collect())
    }

    pub fn kind_name(&self) -> &'static str {
        self.kind.name()
    }
}

impl Run for RunSpec {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind_name(&self) -> &'static str {
        self.kind.name()
    }

    fn reads(&self) -> Reads {
        let n = self.kind.needs();
        Reads { prompts: n.prompts, corruption: n.corruption, answers: n.answers, metric_direction: n.metric_direction }
    }
}
