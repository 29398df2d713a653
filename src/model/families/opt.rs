//! OPT (OPTForCausalLM): pre-LayerNorm blocks like GPT-2 with nn.Linear projections, ReLU MLP,
//! and learned positions stored with an offset of 2 (rows 0 and 1 are never used).
use serde::Deserialize;
use serde_json::Value;

use super::convert::{self, norm, parse};
use crate::error::{Error, Result};
use crate::model::checkpoint::StateDict;
use crate::model::config::{Activation, ModelConfig, NormKind};
use crate::model::weights::{BlockWeights, Weights};

/// OPT's position table starts this many rows in.
const POSITION_OFFSET: i64 = 2;

#[derive(Debug, Deserialize)]
struct RawConfig {
    num_hidden_layers: usize,
    hidden_size: usize,
    num_attention_heads: usize,
    ffn_dim: usize,
    vocab_size: usize,
    max_position_embeddings: usize,
    #[serde(default = "default_act")]
    activation_function: String,
    #[serde(default = "yes")]
    do_layer_norm_before: bool,
    word_embed_proj_dim: Option<usize>,
    #[serde(default = "yes")]
    enable_bias: bool,
    #[serde(default = "yes")]
    layer_norm_elementwise_affine: bool,
}

fn default_act() -> String {
    "relu".into()
}
fn yes() -> bool {
    true
}

pub fn config(json: &Value) -> Result<ModelConfig> {
    let raw: RawConfig = parse(json, "OPT")?;
    if !raw.do_layer_norm_before {
        return Err(Error::Config(
            "OPT with do_layer_norm_before = false (opt-350m's post-LN layout) is not supported".into(),
        ));
    }
    if raw.word_embed_proj_dim.is_some_and(|p| p != raw.hidden_size) {
        return Err(Error::Config(
            "OPT with word_embed_proj_dim != hidden_size (project_in/out) is not supported".into(),
        ));
    }
    if !raw.enable_bias || !raw.layer_norm_elementwise_affine {
        return Err(Error::Config("OPT without biases or LayerNorm affine parameters is not supported".into()));
    }
    let d_head = convert::head_dim(raw.hidden_size, raw.num_attention_heads)?;
    Ok(ModelConfig::new(
        raw.num_hidden_layers,
        raw.hidden_size,
        raw.num_attention_heads,
        d_head,
        raw.vocab_size,
        raw.max_position_embeddings,
    )?
    .with_norm(NormKind::LayerNorm, 1e-5)?
    .with_mlp(raw.ffn_dim, Activation::from_hf(&raw.activation_function)?, false)?
    .with_family("opt", true))
}

pub fn weights(sd: StateDict, cfg: &ModelConfig) -> Result<Weights> {
    let mut sd = sd.with_optional_prefix("model.decoder.", "embed_tokens.weight");
    let (h, e, d, m, v) =
        (cfg.n_heads as i64, cfg.d_head as i64, cfg.d_model as i64, cfg.mlp.d_mlp as i64, cfg.d_vocab as i64);
    let mut blocks = Vec::with_capacity(cfg.n_layers);
    for l in 0..cfg.n_layers {
        let p = |s: &str| format!("layers.{l}.{s}");
        let attn = convert::linear_attn(
            &mut sd,
            [&p("self_attn.q_proj"), &p("self_attn.k_proj"), &p("self_attn.v_proj"), &p("self_attn.out_proj")],
            h,
            h,
            e,
            d,
        )?;
        let mlp = convert::linear_mlp(&mut sd, &p("fc1"), &p("fc2"), d, m)?;
        blocks.push(BlockWeights::new(
            norm(&mut sd, &p("self_attn_layer_norm"), true)?,
            attn,
            norm(&mut sd, &p("final_layer_norm"), true)?,
            mlp,
        ));
    }
    let w_e = sd.take_shaped("embed_tokens.weight", &[v, d])?;
    let positions = sd.take_shaped("embed_positions.weight", &[cfg.n_ctx as i64 + POSITION_OFFSET, d])?;
    let (w_u, b_u) = convert::unembed(&mut sd, "lm_head", &w_e, v)?;
    Ok(Weights {
        w_e,
        ln_embed: None,
        w_pos: Some(positions.narrow(0, POSITION_OFFSET, cfg.n_ctx as i64).contiguous()),
        blocks,
        ln_final: norm(&mut sd, "final_layer_norm", true)?,
        w_u,
        b_u,
    })
}
