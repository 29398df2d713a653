//! Bloom (BloomForCausalLM): ALiBi instead of positions, a LayerNorm on the embedding (its output
//! is hook_embed), a fused query_key_value projection grouped per head as [q, k, v], biases
//! throughout, tied unembedding.
use serde::Deserialize;
use serde_json::Value;

use super::convert::{self, linear_per_head_out, linear_t, norm, parse, split_per_head_qkv};
use crate::error::{Error, Result};
use crate::model::checkpoint::StateDict;
use crate::model::config::{Activation, ModelConfig, NormKind};
use crate::model::weights::{AttnWeights, BlockWeights, MlpWeights, Weights};

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
        return Err(Error::Config("Bloom with apply_residual_connection_post_layernorm = true is not supported".into()));
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
    let (h, e, d, m, v) = (cfg.n_heads as i64, cfg.d_head as i64, cfg.d_model as i64, cfg.mlp.d_mlp as i64, cfg.d_vocab as i64);
    let mut blocks = Vec::with_capacity(cfg.n_layers);
    for l in 0..cfg.n_layers {
        let p = |s: &str| format!("h.{l}.{s}");
        let w = sd.take_shaped(&p("self_attention.query_key_value.weight"), &[3 * d, d])?;
        let b = sd.take_shaped(&p("self_attention.query_key_value.bias"), &[3 * d])?;
        let [(w_q, b_q), (w_k, b_k), (w_v, b_v)] = split_per_head_qkv(&w, &b, h, e);
        let attn = AttnWeights {
            w_q,
            b_q,
            w_k,
            b_k,
            w_v,
            b_v,
            w_o: linear_per_head_out(&sd.take_shaped(&p("self_attention.dense.weight"), &[d, d])?, h, e),
            b_o: sd.take(&p("self_attention.dense.bias"))?,
            q_norm: None,
            k_norm: None,
        };
        let mlp = MlpWeights {
            w_in: linear_t(sd.take_shaped(&p("mlp.dense_h_to_4h.weight"), &[m, d])?),
            b_in: sd.take(&p("mlp.dense_h_to_4h.bias"))?,
            w_gate: None,
            b_gate: None,
            w_out: linear_t(sd.take_shaped(&p("mlp.dense_4h_to_h.weight"), &[d, m])?),
            b_out: sd.take(&p("mlp.dense_4h_to_h.bias"))?,
        };
        blocks.push(BlockWeights::new(norm(&mut sd, &p("input_layernorm"), true)?, attn, norm(&mut sd, &p("post_attention_layernorm"), true)?, mlp));
    }
    let w_e = sd.take_shaped("word_embeddings.weight", &[v, d])?;
    let (w_u, b_u) = convert::unembed(&mut sd, "lm_head", &w_e, v);
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
