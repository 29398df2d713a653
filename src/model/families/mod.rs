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

/// Every supported model_type, for messages and README.
pub const MODEL_TYPES: &[&str] = &[
    "gpt2", "gpt_neo", "gptj", "gpt_neox", "opt", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi",
    "phi3", "stablelm", "bloom",
];

/// The family parser for a config.json, chosen by its model_type.
pub fn family(json: &serde_json::Value) -> Result<(ModelConfig, Converter)> {
    let model_type = json.get("model_type").and_then(|v| v.as_str()).unwrap_or("");
    let (cfg, convert): (Result<ModelConfig>, Converter) = match model_type {
        "gpt2" => (gpt2::config(json), gpt2::weights),
        "gpt_neo" => (gpt_neo::config(json), gpt_neo::weights),
        "gptj" => (gptj::config(json), gptj::weights),
        "gpt_neox" => (neox::config(json), neox::weights),
        "opt" => (opt::config(json), opt::weights),
        "phi" => (phi::config(json), phi::weights),
        "bloom" => (bloom::config(json), bloom::weights),
        t if llama::FAMILIES.contains(&t) => (llama::config(json), llama::weights),
        other => {
            return Err(Error::Config(format!(
                "model_type '{other}' is not supported (supported: {})",
                MODEL_TYPES.join(", ")
            )));
        }
    };
    Ok((cfg?, convert))
}
