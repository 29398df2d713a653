//! GPT-NeoX / Pythia (GPTNeoXForCausalLM): parallel residual with two LayerNorms (no
//! resid_mid), rotary on a fraction (`rotary_pct`) of each head in rotate-half style, a fused
//! query_key_value projection whose rows are grouped per head as [q, k, v], biases throughout.
use serde::Deserialize;
use serde_json::Value;

use super::convert::{self, norm, parse};
use crate::error::{Error, Result};
use crate::model::checkpoint::StateDict;
use crate::model::config::{Activation, ModelConfig, NormKind};
use crate::model::weights::{BlockWeights, Weights};

#[derive(Debug, Deserialize)]
struct RawConfig {
    num_hidden_layers: usize,
    hidden_size: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    vocab_size: usize,
    max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    layer_norm_eps: f64,
    #[serde(default = "default_act")]
    hidden_act: String,
    #[serde(default = "yes")]
    use_parallel_residual: bool,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_act() -> String {
    "gelu".into()
}
fn yes() -> bool {
    true
}

pub fn config(json: &Value) -> Result<ModelConfig> {
    let raw: RawConfig = parse(json, "GPT-NeoX")?;
    let d_head = convert::head_dim(raw.hidden_size, raw.num_attention_heads)?;
    let rope = convert::rope(json)?;
    let dim = convert::rotary_dim(d_head, rope.partial);
    if dim == 0 {
        return Err(Error::Config(format!(
            "GPT-NeoX rotary_pct {} leaves no rotary dimensions of {d_head}",
            rope.partial
        )));
    }
    Ok(ModelConfig::new(
        raw.num_hidden_layers,
        raw.hidden_size,
        raw.num_attention_heads,
        d_head,
        raw.vocab_size,
        raw.max_position_embeddings,
    )?
    .with_norm(NormKind::LayerNorm, raw.layer_norm_eps)?
    .with_rotary(dim, rope.base, false)?
    .with_rope_scaling(rope.scaling)?
    .with_mlp(raw.intermediate_size, Activation::from_hf(&raw.hidden_act)?, false)?
    .with_parallel_block(raw.use_parallel_residual)
    // TransformerLens's to_tokens prepends no BOS for GPT-NeoX / Pythia by default.
    .with_family("gpt_neox", false))
}

pub fn weights(sd: StateDict, cfg: &ModelConfig) -> Result<Weights> {
    let mut sd = sd.with_optional_prefix("gpt_neox.", "embed_in.weight");
    let (h, e, d, m, v) =
        (cfg.n_heads as i64, cfg.d_head as i64, cfg.d_model as i64, cfg.mlp.d_mlp as i64, cfg.d_vocab as i64);
    let mut blocks = Vec::with_capacity(cfg.n_layers);
    for l in 0..cfg.n_layers {
        let p = |s: &str| format!("layers.{l}.{s}");
        let attn =
            convert::fused_per_head_attn(&mut sd, &p("attention.query_key_value"), &p("attention.dense"), h, e, d)?;
        let mlp = convert::linear_mlp(&mut sd, &p("mlp.dense_h_to_4h"), &p("mlp.dense_4h_to_h"), d, m)?;
        blocks.push(BlockWeights::new(
            norm(&mut sd, &p("input_layernorm"), true)?,
            attn,
            norm(&mut sd, &p("post_attention_layernorm"), true)?,
            mlp,
        ));
    }
    let w_e = sd.take_shaped("embed_in.weight", &[v, d])?;
    let (w_u, b_u) = convert::unembed(&mut sd, "embed_out", &w_e, v)?;
    Ok(Weights {
        w_e,
        ln_embed: None,
        w_pos: None,
        blocks,
        ln_final: norm(&mut sd, "final_layer_norm", true)?,
        w_u,
        b_u,
    })
}
