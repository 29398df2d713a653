//! GPT-J (GPTJForCausalLM): attention and MLP in parallel under one LayerNorm (no ln2, no
//! resid_mid), rotary on the first `rotary_dim` dimensions of each head in interleaved (2i, 2i+1)
//! pairs, no q/k/v/out biases, and an lm_head bias.
use serde::Deserialize;
use serde_json::Value;

use super::convert::{self, norm, parse};
use crate::error::Result;
use crate::model::checkpoint::StateDict;
use crate::model::config::{Activation, ModelConfig, NormKind};
use crate::model::weights::{BlockWeights, NormWeights, Weights};

#[derive(Debug, Deserialize)]
struct RawConfig {
    n_layer: usize,
    n_embd: usize,
    n_head: usize,
    vocab_size: usize,
    n_positions: usize,
    n_inner: Option<usize>,
    rotary_dim: Option<usize>,
    #[serde(default = "default_eps")]
    layer_norm_epsilon: f64,
    #[serde(default = "default_act")]
    activation_function: String,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_act() -> String {
    "gelu_new".into()
}

pub fn config(json: &Value) -> Result<ModelConfig> {
    let raw: RawConfig = parse(json, "GPT-J")?;
    let d_head = convert::head_dim(raw.n_embd, raw.n_head)?;
    let rope = convert::rope(json)?;
    Ok(ModelConfig::new(raw.n_layer, raw.n_embd, raw.n_head, d_head, raw.vocab_size, raw.n_positions)?
        .with_norm(NormKind::LayerNorm, raw.layer_norm_epsilon)?
        .with_rotary(raw.rotary_dim.unwrap_or(d_head), rope.base, true)?
        .with_mlp(raw.n_inner.unwrap_or(4 * raw.n_embd), Activation::from_hf(&raw.activation_function)?, false)?
        .with_shared_norm_parallel_block()
        .with_family("gptj", true))
}

pub fn weights(sd: StateDict, cfg: &ModelConfig) -> Result<Weights> {
    let mut sd = sd.with_optional_prefix("transformer.", "wte.weight");
    let (h, e, d, m, v) =
        (cfg.n_heads as i64, cfg.d_head as i64, cfg.d_model as i64, cfg.mlp.d_mlp as i64, cfg.d_vocab as i64);
    let mut blocks = Vec::with_capacity(cfg.n_layers);
    for l in 0..cfg.n_layers {
        let p = |s: &str| format!("h.{l}.{s}");
        let attn = convert::linear_attn(
            &mut sd,
            [&p("attn.q_proj"), &p("attn.k_proj"), &p("attn.v_proj"), &p("attn.out_proj")],
            h,
            h,
            e,
            d,
        )?;
        let mlp = convert::linear_mlp(&mut sd, &p("mlp.fc_in"), &p("mlp.fc_out"), d, m)?;
        blocks.push(BlockWeights::new(norm(&mut sd, &p("ln_1"), true)?, attn, NormWeights { w: None, b: None }, mlp));
    }
    let w_e = sd.take_shaped("wte.weight", &[v, d])?;
    let (w_u, b_u) = convert::unembed(&mut sd, "lm_head", &w_e, v)?;
    Ok(Weights { w_e, ln_embed: None, w_pos: None, blocks, ln_final: norm(&mut sd, "ln_f", true)?, w_u, b_u })
}
