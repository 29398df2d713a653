//! Phi-1/1.5/2 (PhiForCausalLM): attention and MLP in parallel under one LayerNorm, rotary on
//! a fraction of each head (rotate-half), biases on every projection and on lm_head.
//! Phi-3 shares the Llama layout and lives in llama.rs.
use serde::Deserialize;
use serde_json::Value;

use super::convert::{self, norm, parse};
use crate::error::{Error, Result};
use crate::model::checkpoint::StateDict;
use crate::model::config::{Activation, ModelConfig, NormKind};
use crate::model::weights::{BlockWeights, NormWeights, Weights};

#[derive(Debug, Deserialize)]
struct RawConfig {
    num_hidden_layers: usize,
    hidden_size: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    intermediate_size: usize,
    vocab_size: usize,
    max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    layer_norm_eps: f64,
    #[serde(default = "default_act")]
    hidden_act: String,
    #[serde(default)]
    qk_layernorm: bool,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_act() -> String {
    "gelu_new".into()
}

pub fn config(json: &Value) -> Result<ModelConfig> {
    let raw: RawConfig = parse(json, "Phi")?;
    if raw.qk_layernorm {
        return Err(Error::Config("Phi with qk_layernorm = true is not supported".into()));
    }
    let d_head = convert::head_dim(raw.hidden_size, raw.num_attention_heads)?;
    let rope = convert::rope(json)?;
    Ok(ModelConfig::new(
        raw.num_hidden_layers,
        raw.hidden_size,
        raw.num_attention_heads,
        d_head,
        raw.vocab_size,
        raw.max_position_embeddings,
    )?
    .with_norm(NormKind::LayerNorm, raw.layer_norm_eps)?
    .with_rotary(convert::rotary_dim(d_head, rope.partial), rope.base, false)?
    .with_rope_scaling(rope.scaling)?
    .with_kv_heads(raw.num_key_value_heads.unwrap_or(raw.num_attention_heads))?
    .with_mlp(raw.intermediate_size, Activation::from_hf(&raw.hidden_act)?, false)?
    .with_shared_norm_parallel_block()
    // TransformerLens's to_tokens prepends no BOS for Phi by default.
    .with_family("phi", false))
}

pub fn weights(sd: StateDict, cfg: &ModelConfig) -> Result<Weights> {
    let mut sd = sd.with_optional_prefix("model.", "embed_tokens.weight");
    let (h, kv, e, d, m, v) = (
        cfg.n_heads as i64,
        cfg.n_kv_heads as i64,
        cfg.d_head as i64,
        cfg.d_model as i64,
        cfg.mlp.d_mlp as i64,
        cfg.d_vocab as i64,
    );
    let mut blocks = Vec::with_capacity(cfg.n_layers);
    for l in 0..cfg.n_layers {
        let p = |s: &str| format!("layers.{l}.{s}");
        let attn = convert::linear_attn(
            &mut sd,
            [&p("self_attn.q_proj"), &p("self_attn.k_proj"), &p("self_attn.v_proj"), &p("self_attn.dense")],
            h,
            kv,
            e,
            d,
        )?;
        let mlp = convert::linear_mlp(&mut sd, &p("mlp.fc1"), &p("mlp.fc2"), d, m)?;
        blocks.push(BlockWeights::new(
            norm(&mut sd, &p("input_layernorm"), true)?,
            attn,
            NormWeights { w: None, b: None },
            mlp,
        ));
    }
    let w_e = sd.take_shaped("embed_tokens.weight", &[v, d])?;
    let (w_u, b_u) = convert::unembed(&mut sd, "lm_head", &w_e, v)?;
    Ok(Weights {
        w_e,
        ln_embed: None,
        w_pos: None,
        blocks,
        ln_final: norm(&mut sd, "final_layernorm", true)?,
        w_u,
        b_u,
    })
}
