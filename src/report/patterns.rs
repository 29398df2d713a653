//! Attention patterns of a run's top heads, for the report's dest × src small multiples. Results
//! hold patching values, not patterns, so the report recomputes them the way the TransformerLens
//! demos show them: one clean forward of prompt 0 (its token ids from the manifest) through the
//! model the manifest names, its weights checked against the manifest's sha256 first, so a
//! pattern is never drawn from other weights than the run's.
use std::cell::OnceCell;

use serde_json::Value;
use tch::Tensor;

use crate::engine::forward::{Input, Stop};
use crate::engine::hooks::Hooks;
use crate::model::hook_point::{HookPoint, Site};
use crate::model::{LoadOptions, Model};

/// One head's pattern on prompt 0: probabilities[dest][src].
pub struct HeadPattern {
    pub layer: usize,
    pub head: usize,
    pub probabilities: Vec<Vec<f64>>,
}

/// Loads the manifest's model the first time a run asks for patterns, and only then.
pub struct PatternSource<'a> {
    manifest: &'a Value,
    model: OnceCell<std::result::Result<Model, String>>,
}

impl<'a> PatternSource<'a> {
    pub fn new(manifest: &'a Value) -> Self {
        PatternSource { manifest, model: OnceCell::new() }
    }

    /// Prompt 0's clean token labels and the patterns of `heads` (layer, head). Err says why
    /// there are none (the model is not here, its weights differ from the run's, ...), for the
    /// page to show in their place.
    pub fn patterns(&self, heads: &[(usize, usize)]) -> std::result::Result<(Vec<String>, Vec<HeadPattern>), String> {
        let model = self.model.get_or_init(|| load(self.manifest)).as_ref().map_err(Clone::clone)?;
        let ids: Vec<i64> = self
            .manifest
            .pointer("/tokens/clean/0")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_i64).collect())
            .filter(|ids: &Vec<i64>| !ids.is_empty())
            .ok_or("the manifest records no tokens for prompt 0")?;
        if let Some(&bad) = ids.iter().find(|&&t| t < 0 || t >= model.cfg.d_vocab as i64) {
            return Err(format!(
                "token id {bad} of prompt 0 is outside the model's vocabulary of {}",
                model.cfg.d_vocab
            ));
        }
        if let Some(&(l, h)) = heads.iter().find(|&&(l, h)| l >= model.cfg.n_layers || h >= model.cfg.n_heads) {
            return Err(format!(
                "head L{l}H{h} is not in this {}-layer, {}-head model",
                model.cfg.n_layers, model.cfg.n_heads
            ));
        }
        let labels = match model.tokenizer() {
            Ok(t) => ids.iter().map(|&id| t.token_str(id)).collect(),
            Err(_) => ids.iter().map(|id| format!("#{id}")).collect(),
        };
        let points: Vec<HookPoint> = heads.iter().map(|&(l, _)| HookPoint::Block(l, Site::Pattern)).collect();
        let last = heads.iter().map(|&(l, _)| l).max().unwrap_or(0);
        let mut hooks = Hooks::capture(points.iter().copied());
        let tokens = Tensor::from_slice(&ids).unsqueeze(0).to_device(model.input_device());
        // Patterns of layer `last` are complete once it has run: stop before the next layer.
        let stop = if last + 1 < model.cfg.n_layers { Stop::BeforeLayer(last + 1) } else { Stop::FinalNorm };
        let _ = model
            .run(Input::Tokens(&tokens), None, &mut hooks, stop)
            .map_err(|e| format!("the clean forward of prompt 0 failed: {e}"))?;
        let mut out = Vec::new();
        for &(layer, head) in heads {
            let p = hooks
                .cache
                .get(&HookPoint::Block(layer, Site::Pattern))
                .ok_or_else(|| format!("blocks.{layer}.attn.hook_pattern was not captured"))?;
            let m = p.get(0).get(head as i64).to_kind(tch::Kind::Double).to_device(tch::Device::Cpu);
            let probabilities: Vec<Vec<f64>> = Vec::<Vec<f64>>::try_from(m).map_err(|e| e.to_string())?;
            out.push(HeadPattern { layer, head, probabilities });
        }
        Ok((labels, out))
    }
}

/// The manifest's model with its processing, dtype and device, once its weight files' digests
/// equal the ones the run recorded.
fn load(m: &Value) -> std::result::Result<Model, String> {
    let id = m.pointer("/model/id").and_then(Value::as_str).ok_or("the manifest names no model")?;
    let revision = m.pointer("/spec/model/revision").and_then(Value::as_str).map(str::to_string);
    let processing = m
        .pointer("/model/processing")
        .and_then(|p| serde_json::from_value(p.clone()).ok())
        .unwrap_or(crate::model::config::Processing::TRANSFORMER_LENS);
    let dtype = m.pointer("/spec/model/dtype").and_then(Value::as_str).unwrap_or("float32");
    let kind = crate::model::config::parse_dtype(dtype).unwrap_or(tch::Kind::Float);
    let device = m
        .pointer("/spec/model/device")
        .and_then(Value::as_str)
        .and_then(|d| crate::engine::device::parse(d).ok())
        .unwrap_or(tch::Device::Cpu);
    let not_here = |e: crate::error::Error| format!("model {id} could not be loaded here: {e}");
    let described = crate::model::Described::read(id, revision.as_deref(), false).map_err(not_here)?;
    let files = &described.files;
    let recorded: Vec<&str> = m
        .pointer("/model/weights")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|w| w.get("sha256").and_then(Value::as_str))
        .collect();
    let here = crate::model::digest::model_digests(files).map_err(not_here)?;
    let differ = files
        .weights
        .iter()
        .any(|w| here.iter().find(|(p, _)| p == w).is_none_or(|(_, d)| !recorded.contains(&d.as_str())));
    if differ || recorded.len() != files.weights.len() {
        return Err(format!(
            "the weights of {id} here are not the ones the run used (sha256 differs from the manifest's)"
        ));
    }
    let opts = LoadOptions { revision, processing, device, kind, ..LoadOptions::default() };
    Model::load_described(&described, &opts).map_err(not_here)
}
