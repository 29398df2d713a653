//! Bloom (BloomForCausalLM): ALiBi instead of positions, a LayerNorm on the embedding (its output
//! is hook_embed), a fused query_key_value projection grouped per head as [q, k, v], biases
//! throughout, tied unembedding.
use serde::Deserialize;
use serde_json::Value;

use super::convert::{self, norm, parse};
use crate::error::{Error, Result};
use crate::model::checkpoint::StateDict;
use crate::model::config::{Activation, ModelConfig, NormKind};
use crate::model::weights::{BlockWeights, Weights};

/// ALiBi has no position table; TransformerLens gives Bloom this context.
const CONTEXT: usize = 2048;

#[derive(Debug, Deserialize)]
struct RawConfig {
    n_layer: usize,
    hidden_size: usize,
    n_head: usize,
    vocab_size: usize,
    #[serde(default = "default_eps")]
    layer_norm_epsilon: f64,
    #[serde(default)]
    apply_residual_connection_post_layernorm: bool,
}

fn default_eps() -> f64 {
    1e-5
}

pub fn config(json: &Value) -> Result<ModelConfig> {
    let raw: RawConfig = parse(json, "Bloom")?;
    if raw.apply_residual_connection_post_layernorm {
        return Err(Error::Config(
            "Bloom with apply_residual_connection_post_layernorm = true is not supported".into(),
        ));
    }
    let d_head = convert::head_dim(raw.hidden_size, raw.n_head)?;
    Ok(ModelConfig::new(raw.n_layer, raw.hidden_size, raw.n_head, d_head, raw.vocab_size, CONTEXT)?
        .with_norm(NormKind::LayerNorm, raw.layer_norm_epsilon)?
        // Bloom's GELU is the tanh approximation.
        .with_mlp(4 * raw.hidden_size, Activation::GeluNew, false)?
        .with_alibi()
        .with_embed_norm()
        // TransformerLens's to_tokens prepends no BOS for Bloom by default.
        .with_family("bloom", false))
}

pub fn weights(sd: StateDict, cfg: &ModelConfig) -> Result<Weights> {
    let mut sd = sd.with_optional_prefix("transformer.", "word_embeddings.weight");
    let (h, e, d, m, v) =
        (cfg.n_heads as i64, cfg.d_head as i64, cfg.d_model as i64, cfg.mlp.d_mlp as i64, cfg.d_vocab as i64);
    let mut blocks = Vec::with_capacity(cfg.n_layers);
    for l in 0..cfg.n_layers {
        let p = |s: &str| format!("h.{l}.{s}");
        let attn = convert::fused_per_head_attn(
            &mut sd,
            &p("self_attention.query_key_value"),
            &p("self_attention.dense"),
            h,
            e,
            d,
        )?;
        let mlp = convert::linear_mlp(&mut sd, &p("mlp.dense_h_to_4h"), &p("mlp.dense_4h_to_h"), d, m)?;
        blocks.push(BlockWeights::new(
            norm(&mut sd, &p("input_layernorm"), true)?,
            attn,
            norm(&mut sd, &p("post_attention_layernorm"), true)?,
            mlp,
        ));
    }
    let w_e = sd.take_shaped("word_embeddings.weight", &[v, d])?;
    let (w_u, b_u) = convert::unembed(&mut sd, "lm_head", &w_e, v)?;
    Ok(Weights {
        w_e,
        ln_embed: Some(norm(&mut sd, "word_embeddings_layernorm", true)?),
        w_pos: None,
        blocks,
        ln_final: norm(&mut sd, "ln_f", true)?,
        w_u,
        b_u,
    })
}
