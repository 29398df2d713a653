//! GPT-2 family (GPT2LMHeadModel): learned positions, LayerNorm, GELU MLP, Conv1D weights stored
//! [in, out]. Translates config.json into feature calls and the checkpoint into TL weights.
use serde::Deserialize;
use tch::Tensor;

use crate::error::Result;
use crate::model::checkpoint::StateDict;
use crate::model::config::{Activation, ModelConfig, NormKind};
use crate::model::weights::{AttnWeights, BlockWeights, MlpWeights, NormWeights, Weights};

#[derive(Debug, Deserialize)]
struct RawConfig {
    n_layer: usize,
    n_embd: usize,
    n_head: usize,
    vocab_size: usize,
    n_positions: usize,
    n_inner: Option<usize>,
    #[serde(default = "default_eps")]
    layer_norm_epsilon: f64,
    #[serde(default = "default_act")]
    activation_function: String,
    #[serde(default = "yes")]
    scale_attn_weights: bool,
    #[serde(default)]
    scale_attn_by_inverse_layer_idx: bool,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_act() -> String {
    "gelu_new".into()
}
fn yes() -> bool {
    true
}

pub fn config(json: &serde_json::Value) -> Result<ModelConfig> {
    let raw: RawConfig = serde_json::from_value(json.clone())
        .map_err(|e| crate::error::Error::Config(format!("GPT-2 config.json: {e}")))?;
    if !raw.scale_attn_weights || raw.scale_attn_by_inverse_layer_idx {
        return Err(crate::error::Error::Config(
            "GPT-2 configs with scale_attn_weights=false or scale_attn_by_inverse_layer_idx=true are not supported"
                .into(),
        ));
    }
    let d_head = super::convert::head_dim(raw.n_embd, raw.n_head)?;
    ModelConfig::new(raw.n_layer, raw.n_embd, raw.n_head, d_head, raw.vocab_size, raw.n_positions)?
        .with_norm(NormKind::LayerNorm, raw.layer_norm_epsilon)?
        .with_mlp(raw.n_inner.unwrap_or(4 * raw.n_embd), Activation::from_hf(&raw.activation_function)?, false)
        .map(|c| c.with_family("gpt2", true))
}

/// [d_model, n*d_head] (Conv1D, in x out) -> [n, d_model, d_head] (a view; see convert.rs).
fn per_head_in(w: &Tensor, n: i64, d_head: i64) -> Tensor {
    let d = w.size()[0];
    w.view([d, n, d_head]).permute([1, 0, 2])
}

pub fn weights(sd: StateDict, cfg: &ModelConfig) -> Result<Weights> {
    let mut sd = sd.with_optional_prefix("transformer.", "wte.weight");
    let (h, e, d) = (cfg.n_heads as i64, cfg.d_head as i64, cfg.d_model as i64);
    let mut blocks = Vec::with_capacity(cfg.n_layers);
    for l in 0..cfg.n_layers {
        let p = |s: &str| format!("h.{l}.{s}");
        let qkv_w = sd.take_shaped(&p("attn.c_attn.weight"), &[d, 3 * d])?;
        let qkv_b = sd.take_shaped(&p("attn.c_attn.bias"), &[3 * d])?;
        let ws = qkv_w.split(d, 1);
        let bs = qkv_b.split(d, 0);
        let attn = AttnWeights {
            w_q: per_head_in(&ws[0], h, e),
            b_q: bs[0].view([h, e]),
            w_k: per_head_in(&ws[1], h, e),
            b_k: bs[1].view([h, e]),
            w_v: per_head_in(&ws[2], h, e),
            b_v: bs[2].view([h, e]),
            w_o: sd.take_shaped(&p("attn.c_proj.weight"), &[d, d])?.view([h, e, d]),
            b_o: sd.take(&p("attn.c_proj.bias"))?,
            q_norm: None,
            k_norm: None,
        };
        let mlp = MlpWeights {
            w_in: sd.take(&p("mlp.c_fc.weight"))?,
            b_in: sd.take(&p("mlp.c_fc.bias"))?,
            w_gate: None,
            b_gate: None,
            w_out: sd.take(&p("mlp.c_proj.weight"))?,
            b_out: sd.take(&p("mlp.c_proj.bias"))?,
        };
        let ln1 = NormWeights { w: Some(sd.take(&p("ln_1.weight"))?), b: Some(sd.take(&p("ln_1.bias"))?) };
        let ln2 = NormWeights { w: Some(sd.take(&p("ln_2.weight"))?), b: Some(sd.take(&p("ln_2.bias"))?) };
        blocks.push(BlockWeights::new(ln1, attn, ln2, mlp));
    }
    let w_e = sd.take("wte.weight")?;
    // GPT-2 ties the unembedding to the embedding unless the checkpoint has its own lm_head.
    let w_u = super::convert::unembed_layout(sd.take_opt("lm_head.weight")?.as_ref().unwrap_or(&w_e));
    Ok(Weights {
        ln_embed: None,
        w_pos: Some(sd.take("wpe.weight")?),
        blocks,
        ln_final: NormWeights { w: Some(sd.take("ln_f.weight")?), b: Some(sd.take("ln_f.bias")?) },
        b_u: Tensor::zeros([cfg.d_vocab as i64], (tch::Kind::Float, w_u.device())),
        w_u,
        w_e,
    })
}
