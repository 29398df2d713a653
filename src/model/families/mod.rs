//! One parser/converter per decoder family, chosen by config.json's model_type. Each translates
//! HF config fields into `ModelConfig` feature calls and the checkpoint into TransformerLens's
//! weight layout; nothing downstream knows which family a model came from.
pub mod bloom;
pub mod convert;
pub mod gpt2;
pub mod gpt_neo;
pub mod gptj;
pub mod llama;
pub mod neox;
pub mod opt;
pub mod phi;

use crate::error::{Error, Result};
use crate::model::checkpoint::StateDict;
use crate::model::config::ModelConfig;
use crate::model::weights::Weights;

pub type Converter = fn(StateDict, &ModelConfig) -> Result<Weights>;

/// How a family's block reads the residual stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Attention, then the MLP on the residual after it (resid_mid exists).
    Sequential,
    /// Attention and MLP both read the block's input (GPT-J, Phi: no resid_mid).
    Parallel,
    /// Either, as config.json's `use_parallel_residual` says (GPT-NeoX).
    ParallelIfConfigured,
}

/// One decoder family: the model_types it reads, its config.json parser, its checkpoint →
/// TransformerLens weight map, and its block layout.
pub struct Family {
    pub model_types: &'static [&'static str],
    pub config: fn(&serde_json::Value) -> Result<ModelConfig>,
    pub weights: Converter,
    pub layout: Layout,
}

/// Every supported family: the only list (adding one is its file and its line here;
/// docs/architecture.md).
pub static FAMILIES: &[Family] = &[
    Family { model_types: &["gpt2"], config: gpt2::config, weights: gpt2::weights, layout: Layout::Sequential },
    Family {
        model_types: &["gpt_neo"],
        config: gpt_neo::config,
        weights: gpt_neo::weights,
        layout: Layout::Sequential,
    },
    Family { model_types: &["gptj"], config: gptj::config, weights: gptj::weights, layout: Layout::Parallel },
    Family {
        model_types: &["gpt_neox"],
        config: neox::config,
        weights: neox::weights,
        layout: Layout::ParallelIfConfigured,
    },
    Family { model_types: &["opt"], config: opt::config, weights: opt::weights, layout: Layout::Sequential },
    Family { model_types: llama::FAMILIES, config: llama::config, weights: llama::weights, layout: Layout::Sequential },
    Family { model_types: &["phi"], config: phi::config, weights: phi::weights, layout: Layout::Parallel },
    Family { model_types: &["bloom"], config: bloom::config, weights: bloom::weights, layout: Layout::Sequential },
];

/// Every supported model_type, for messages and docs.
pub fn model_types() -> Vec<&'static str> {
    FAMILIES.iter().flat_map(|f| f.model_types.iter().copied()).collect()
}

/// The family of a config.json, by its model_type.
pub fn of(json: &serde_json::Value) -> Result<&'static Family> {
    let model_type = json.get("model_type").and_then(|v| v.as_str()).unwrap_or("");
    FAMILIES.iter().find(|f| f.model_types.contains(&model_type)).ok_or_else(|| {
        Error::Config(format!("model_type '{model_type}' is not supported (supported: {})", model_types().join(", ")))
    })
}

/// The family parser for a config.json, chosen by its model_type.
pub fn family(json: &serde_json::Value) -> Result<(ModelConfig, Converter)> {
    let f = of(json)?;
    Ok(((f.config)(json)?, f.weights))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_model_type_belongs_to_one_family() {
        let mut types = model_types();
        let n = types.len();
        types.sort();
        types.dedup();
        assert_eq!(types.len(), n, "a model_type is listed by two families");
        for t in ["gpt2", "gpt_neox", "llama", "gemma2", "phi3", "bloom"] {
            assert!(of(&serde_json::json!({ "model_type": t })).is_ok(), "{t}");
        }
        let e = of(&serde_json::json!({"model_type": "mamba"})).err().unwrap().to_string();
        assert!(e.contains("model_type 'mamba' is not supported (supported: gpt2, gpt_neo"), "{e}");
    }
}
