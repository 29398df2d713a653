//! GPT-Neo (GPTNeoForCausalLM): GPT-2's block with nn.Linear projections, q/k/v without bias,
//! no 1/sqrt(d_head) score scaling, and layers alternating global and local attention (a window
//! of `window_size` keys).
use serde::Deserialize;
use serde_json::Value;

use super::convert::{self, norm, parse};
use crate::error::{Error, Result};
use crate::model::checkpoint::StateDict;
use crate::model::config::{Activation, ModelConfig, NormKind};
use crate::model::weights::{BlockWeights, Weights};

#[derive(Debug, Deserialize)]
struct RawConfig {
    num_layers: usize,
    hidden_size: usize,
    num_heads: usize,
    vocab_size: usize,
    max_position_embeddings: usize,
    intermediate_size: Option<usize>,
    #[serde(default = "default_eps")]
    layer_norm_epsilon: f64,
    #[serde(default = "default_act")]
    activation_function: String,
    window_size: usize,
    attention_layers: Option<Vec<String>>,
    /// [[["global", "local"], 12]]: a pattern repeated n times.
    attention_types: Option<Vec<(Vec<String>, usize)>>,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_act() -> String {
    "gelu_new".into()
}

pub fn config(json: &Value) -> Result<ModelConfig> {
    let raw: RawConfig = parse(json, "GPT-Neo")?;
    let layers = match (raw.attention_layers, raw.attention_types) {
        (Some(l), _) => l,
        (None, Some(types)) => {
            types.into_iter().flat_map(|(pattern, n)| std::iter::repeat_n(pattern, n).flatten()).collect()
        }
        (None, None) => {
            return Err(Error::Config("GPT-Neo config.json has neither attention_layers nor attention_types".into()))
        }
    };
    if layers.len() != raw.num_layers {
        return Err(Error::Config(format!(
            "GPT-Neo attention_layers lists {} layers, num_layers is {}",
            layers.len(),
            raw.num_layers
        )));
    }
    let windows = layers
        .iter()
        .map(|t| match t.as_str() {
            "global" => Ok(None),
            "local" => Ok(Some(raw.window_size)),
            other => Err(Error::Config(format!("GPT-Neo attention type '{other}' (expected global or local)"))),
        })
        .collect::<Result<Vec<_>>>()?;
    let d_head = convert::head_dim(raw.hidden_size, raw.num_heads)?;
    Ok(ModelConfig::new(
        raw.num_layers,
        raw.hidden_size,
        raw.num_heads,
        d_head,
        raw.vocab_size,
        raw.max_position_embeddings,
    )?
    .with_norm(NormKind::LayerNorm, raw.layer_norm_epsilon)?
    .with_mlp(
        raw.intermediate_size.unwrap_or(4 * raw.hidden_size),
        Activation::from_hf(&raw.activation_function)?,
        false,
    )?
    // GPT-Neo does not scale attention scores.
    .with_attn_scale(1.0)?
    .with_attn_windows(windows)?
    .with_family("gpt_neo", true))
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
            [
                &p("attn.attention.q_proj"),
                &p("attn.attention.k_proj"),
                &p("attn.attention.v_proj"),
                &p("attn.attention.out_proj"),
            ],
            h,
            h,
            e,
            d,
        )?;
        let mlp = convert::linear_mlp(&mut sd, &p("mlp.c_fc"), &p("mlp.c_proj"), d, m)?;
        blocks.push(BlockWeights::new(norm(&mut sd, &p("ln_1"), true)?, attn, norm(&mut sd, &p("ln_2"), true)?, mlp));
    }
    let w_e = sd.take_shaped("wte.weight", &[v, d])?;
    let (w_u, b_u) = convert::unembed(&mut sd, "lm_head", &w_e, v)?;
    Ok(Weights {
        w_e,
        ln_embed: None,
        w_pos: Some(sd.take("wpe.weight")?),
        blocks,
        ln_final: norm(&mut sd, "ln_f", true)?,
        w_u,
        b_u,
    })
}
