//! The Llama layout (`model.layers.{l}.self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`,
//! nn.Linear weights stored [out, in]) and the families that share it, each with its own
//! config parser: Llama 1/2/3 (rope scaling "linear" and "llama3"), Mistral (sliding window),
//! Qwen2 (q/k/v biases), Qwen3 (per-head q/k RMSNorm, head_dim independent of d_model),
//! Gemma (1 + w RMSNorm, embedding × sqrt(d_model), gated GELU, MQA), Gemma 2 (post norms,
//! softcaps, alternating windows, query_pre_attn_scalar), StableLM (LayerNorm with bias,
//! partial rotary) and Phi-3 (fused qkv_proj and gate_up_proj).
use serde::Deserialize;
use serde_json::Value;

use super::convert::{self, bias_or_zeros, linear_per_head_in, linear_per_head_out, linear_t, norm, parse};
use crate::error::{Error, Result};
use crate::model::checkpoint::StateDict;
use crate::model::config::{Activation, ModelConfig, NormKind};
use crate::model::weights::{AttnWeights, BlockWeights, MlpWeights, NormWeights, Weights};

#[derive(Debug, Deserialize)]
struct RawConfig {
    num_hidden_layers: usize,
    hidden_size: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    intermediate_size: usize,
    vocab_size: usize,
    #[serde(default = "default_ctx")]
    max_position_embeddings: usize,
    rms_norm_eps: Option<f64>,
    layer_norm_eps: Option<f64>,
    hidden_act: Option<String>,
    hidden_activation: Option<String>,
    sliding_window: Option<usize>,
    #[serde(default)]
    use_sliding_window: bool,
    attn_logit_softcapping: Option<f64>,
    final_logit_softcapping: Option<f64>,
    query_pre_attn_scalar: Option<f64>,
    #[serde(default)]
    use_parallel_residual: bool,
    #[serde(default)]
    qk_layernorm: bool,
}

fn default_ctx() -> usize {
    2048
}

/// Which tensors and norms a family of the Llama layout has.
#[derive(Debug, Clone, Copy, Default)]
struct Layout {
    /// LayerNorm with bias instead of RMSNorm (StableLM).
    layer_norm: bool,
    /// Norm weights stored as w, applied as 1 + w (Gemma).
    norm_offset: bool,
    /// qkv_proj and gate_up_proj (Phi-3).
    fused: bool,
    /// post_attention_layernorm is the attention output's norm, pre_feedforward_layernorm the
    /// MLP's input norm, post_feedforward_layernorm the MLP output's norm (Gemma 2).
    sandwich_norms: bool,
    qk_norm: bool,
    /// W_E multiplied by sqrt(d_model), as TransformerLens folds Gemma's embedding scale.
    scale_embedding: bool,
}

fn layout(family: &str) -> Layout {
    match family {
        "gemma" => Layout { norm_offset: true, scale_embedding: true, ..Layout::default() },
        "gemma2" => Layout { norm_offset: true, scale_embedding: true, sandwich_norms: true, ..Layout::default() },
        "qwen3" => Layout { qk_norm: true, ..Layout::default() },
        "stablelm" => Layout { layer_norm: true, ..Layout::default() },
        "phi3" => Layout { fused: true, ..Layout::default() },
        _ => Layout::default(),
    }
}

/// The model_types this file reads.
pub const FAMILIES: &[&str] = &["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "stablelm", "phi3"];

pub fn config(json: &Value) -> Result<ModelConfig> {
    let family = json.get("model_type").and_then(Value::as_str).unwrap_or("llama");
    let raw: RawConfig = parse(json, family)?;
    let lay = layout(family);
    let d_head = match raw.head_dim {
        Some(e) => e,
        None => convert::head_dim(raw.hidden_size, raw.num_attention_heads)?,
    };
    let rope = convert::rope(json)?;
    let act = raw
        .hidden_activation
        .as_deref()
        .or(raw.hidden_act.as_deref())
        .unwrap_or(if family.starts_with("gemma") { "gelu_pytorch_tanh" } else { "silu" });
    let (norm_kind, eps) = if lay.layer_norm {
        (NormKind::LayerNorm, raw.layer_norm_eps.unwrap_or(1e-5))
    } else {
        (NormKind::RmsNorm, raw.rms_norm_eps.unwrap_or(1e-6))
    };
    if raw.use_parallel_residual {
        return Err(Error::Config(format!("{family} with use_parallel_residual = true is not supported")));
    }
    if raw.qk_layernorm {
        return Err(Error::Config(format!("{family} with qk_layernorm = true is not supported")));
    }
    let n_layers = raw.num_hidden_layers;
    let windows = match family {
        "mistral" | "phi3" => vec![raw.sliding_window; n_layers],
        // Gemma 2 checkpoints from before layer_types slide on even layers.
        "gemma2" => convert::layer_windows(json, n_layers, raw.sliding_window, |l| l % 2 == 0)?,
        "qwen2" | "qwen3" if raw.use_sliding_window => {
            return Err(Error::Config(format!("{family} with use_sliding_window = true is not supported")));
        }
        _ => convert::layer_windows(json, n_layers, raw.sliding_window, |_| false)?,
    };
    // TransformerLens's to_tokens prepends no BOS for the Qwen families by default.
    let prepend_bos = !matches!(family, "qwen2" | "qwen3");
    let mut cfg = ModelConfig::new(
        n_layers,
        raw.hidden_size,
        raw.num_attention_heads,
        d_head,
        raw.vocab_size,
        raw.max_position_embeddings,
    )?
    .with_norm(norm_kind, eps)?
    .with_rotary(convert::rotary_dim(d_head, rope.partial), rope.base, false)?
    .with_rope_scaling(rope.scaling)?
    .with_kv_heads(raw.num_key_value_heads.unwrap_or(raw.num_attention_heads))?
    .with_mlp(raw.intermediate_size, Activation::from_hf(act)?, true)?
    .with_attn_windows(windows)?
    .with_family(family, prepend_bos);
    if lay.scale_embedding {
        cfg.embed_scale = (raw.hidden_size as f64).sqrt();
    }
    if family == "gemma2" {
        cfg = cfg
            .with_attn_scale(raw.query_pre_attn_scalar.unwrap_or(d_head as f64).sqrt())?
            .with_softcaps(raw.attn_logit_softcapping, raw.final_logit_softcapping)?
            .with_post_norms();
    }
    if lay.qk_norm {
        cfg = cfg.with_qk_norm();
    }
    Ok(cfg)
}

/// The checkpoint in TransformerLens's layout; over 80 lines because it is the weight map of the
/// Llama-style families, one tensor after another in the checkpoint's order.
pub fn weights(sd: StateDict, cfg: &ModelConfig) -> Result<Weights> {
    let lay = layout(&cfg.family);
    let mut sd = sd.with_optional_prefix("model.", "embed_tokens.weight");
    let (h, kv, e, d, m, v) = (
        cfg.n_heads as i64,
        cfg.n_kv_heads as i64,
        cfg.d_head as i64,
        cfg.d_model as i64,
        cfg.mlp.d_mlp as i64,
        cfg.d_vocab as i64,
    );
    // Gemma stores RMSNorm weights as an offset from 1; TransformerLens adds the 1 at conversion.
    let offset = |n: NormWeights| {
        if lay.norm_offset {
            NormWeights { w: n.w.map(|w| w.to_kind(tch::Kind::Float) + 1.0), b: n.b }
        } else {
            n
        }
    };
    let norm_at = |sd: &mut StateDict, name: &str| norm(sd, name, lay.layer_norm).map(offset);
    let mut blocks = Vec::with_capacity(cfg.n_layers);
    for l in 0..cfg.n_layers {
        let p = |s: &str| format!("layers.{l}.{s}");
        let (w_q, w_k, w_v) = if lay.fused {
            let qkv = sd.take_shaped(&p("self_attn.qkv_proj.weight"), &[(h + 2 * kv) * e, d])?;
            let parts = qkv.split_with_sizes([h * e, kv * e, kv * e], 0);
            (parts[0].shallow_clone(), parts[1].shallow_clone(), parts[2].shallow_clone())
        } else {
            (
                sd.take_shaped(&p("self_attn.q_proj.weight"), &[h * e, d])?,
                sd.take_shaped(&p("self_attn.k_proj.weight"), &[kv * e, d])?,
                sd.take_shaped(&p("self_attn.v_proj.weight"), &[kv * e, d])?,
            )
        };
        let attn = AttnWeights {
            w_q: linear_per_head_in(&w_q, h, e),
            b_q: bias_or_zeros(&mut sd, &p("self_attn.q_proj.bias"), &[h, e])?,
            w_k: linear_per_head_in(&w_k, kv, e),
            b_k: bias_or_zeros(&mut sd, &p("self_attn.k_proj.bias"), &[kv, e])?,
            w_v: linear_per_head_in(&w_v, kv, e),
            b_v: bias_or_zeros(&mut sd, &p("self_attn.v_proj.bias"), &[kv, e])?,
            w_o: linear_per_head_out(&sd.take_shaped(&p("self_attn.o_proj.weight"), &[d, h * e])?, h, e),
            b_o: bias_or_zeros(&mut sd, &p("self_attn.o_proj.bias"), &[d])?,
            q_norm: if lay.qk_norm { Some(sd.take_shaped(&p("self_attn.q_norm.weight"), &[e])?) } else { None },
            k_norm: if lay.qk_norm { Some(sd.take_shaped(&p("self_attn.k_norm.weight"), &[e])?) } else { None },
        };
        let (gate, up) = if lay.fused {
            let gu = sd.take_shaped(&p("mlp.gate_up_proj.weight"), &[2 * m, d])?;
            let parts = gu.split(m, 0);
            (parts[0].shallow_clone(), parts[1].shallow_clone())
        } else {
            (sd.take_shaped(&p("mlp.gate_proj.weight"), &[m, d])?, sd.take_shaped(&p("mlp.up_proj.weight"), &[m, d])?)
        };
        if sd.contains(&p("mlp.gate_proj.bias")) {
            return Err(Error::Config("gated MLPs with a gate bias are not supported".into()));
        }
        let mlp = MlpWeights {
            w_in: linear_t(up),
            b_in: bias_or_zeros(&mut sd, &p("mlp.up_proj.bias"), &[m])?,
            w_gate: Some(linear_t(gate)),
            b_gate: None,
            w_out: linear_t(sd.take_shaped(&p("mlp.down_proj.weight"), &[d, m])?),
            b_out: bias_or_zeros(&mut sd, &p("mlp.down_proj.bias"), &[d])?,
        };
        let ln1 = norm_at(&mut sd, &p("input_layernorm"))?;
        let block = if lay.sandwich_norms {
            let mut b = BlockWeights::new(ln1, attn, norm_at(&mut sd, &p("pre_feedforward_layernorm"))?, mlp);
            b.ln1_post = Some(norm_at(&mut sd, &p("post_attention_layernorm"))?);
            b.ln2_post = Some(norm_at(&mut sd, &p("post_feedforward_layernorm"))?);
            b
        } else {
            BlockWeights::new(ln1, attn, norm_at(&mut sd, &p("post_attention_layernorm"))?, mlp)
        };
        blocks.push(block);
    }
    let mut w_e = sd.take_shaped("embed_tokens.weight", &[v, d])?;
    let (w_u, b_u) = convert::unembed(&mut sd, "lm_head", &w_e, v)?;
    if lay.scale_embedding {
        w_e = w_e.to_kind(tch::Kind::Float) * cfg.embed_scale;
    }
    Ok(Weights { w_e, ln_embed: None, w_pos: None, blocks, ln_final: norm_at(&mut sd, "norm")?, w_u, b_u })
}
