//! Llama family (LlamaForCausalLM; also the layout of Mistral and Qwen2): RMSNorm, rotary
//! embeddings in the rotate-half style, SwiGLU gated MLP, grouped-query attention, nn.Linear
//! weights stored [out, in].
use serde::Deserialize;
use tch::Tensor;

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
    max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_act")]
    hidden_act: String,
    rope_theta: Option<f64>,
    rope_parameters: Option<RopeParameters>,
    rope_scaling: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct RopeParameters {
    rope_theta: Option<f64>,
    rope_type: Option<String>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_act() -> String {
    "silu".into()
}

pub fn config(json: &serde_json::Value) -> Result<ModelConfig> {
    let raw: RawConfig = serde_json::from_value(json.clone()).map_err(|e| Error::Config(format!("Llama config.json: {e}")))?;
    let rope_type = raw.rope_parameters.as_ref().and_then(|r| r.rope_type.clone()).unwrap_or_else(|| "default".into());
    if rope_type != "default" || raw.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(Error::Config(format!("rope scaling ('{rope_type}' / rope_scaling) is not supported yet")));
    }
    let base = raw.rope_parameters.as_ref().and_then(|r| r.rope_theta).or(raw.rope_theta).unwrap_or(10000.0);
    let d_head = raw.head_dim.unwrap_or(raw.hidden_size / raw.num_attention_heads);
    ModelConfig::new(raw.num_hidden_layers, raw.hidden_size, raw.num_attention_heads, d_head, raw.vocab_size, raw.max_position_embeddings)?
        .with_norm(NormKind::RmsNorm, raw.rms_norm_eps)?
        .with_rotary(d_head, base, false)?
        .with_kv_heads(raw.num_key_value_heads.unwrap_or(raw.num_attention_heads))?
        .with_mlp(raw.intermediate_size, Activation::from_hf(&raw.hidden_act)?, true)
}

/// nn.Linear weight [n*d_head, d_model] -> [n, d_model, d_head].
fn per_head_in(w: &Tensor, n: i64, d_head: i64) -> Tensor {
    let d = w.size()[1];
    w.view([n, d_head, d]).transpose(1, 2).contiguous()
}

fn bias_or_zeros(sd: &mut StateDict, name: &str, shape: &[i64]) -> Tensor {
    sd.take_opt(name).map(|b| b.view(shape)).unwrap_or_else(|| Tensor::zeros(shape, (tch::Kind::Float, tch::Device::Cpu)))
}

pub fn weights(sd: StateDict, cfg: &ModelConfig) -> Result<Weights> {
    let mut sd = sd.with_optional_prefix("model.", "embed_tokens.weight");
    let (h, kv, e, d, m) = (cfg.n_heads as i64, cfg.n_kv_heads as i64, cfg.d_head as i64, cfg.d_model as i64, cfg.mlp.d_mlp as i64);
    let mut blocks = Vec::with_capacity(cfg.n_layers);
    for l in 0..cfg.n_layers {
        let p = |s: &str| format!("layers.{l}.{s}");
        let attn = AttnWeights {
            w_q: per_head_in(&sd.take(&p("self_attn.q_proj.weight"))?, h, e),
            b_q: bias_or_zeros(&mut sd, &p("self_attn.q_proj.bias"), &[h, e]),
            w_k: per_head_in(&sd.take(&p("self_attn.k_proj.weight"))?, kv, e),
            b_k: bias_or_zeros(&mut sd, &p("self_attn.k_proj.bias"), &[kv, e]),
            w_v: per_head_in(&sd.take(&p("self_attn.v_proj.weight"))?, kv, e),
            b_v: bias_or_zeros(&mut sd, &p("self_attn.v_proj.bias"), &[kv, e]),
            // o_proj [d_model, n*d_head] -> [n, d_head, d_model]
            w_o: sd.take(&p("self_attn.o_proj.weight"))?.tr().contiguous().view([h, e, d]),
            b_o: bias_or_zeros(&mut sd, &p("self_attn.o_proj.bias"), &[d]),
        };
        let mlp = MlpWeights {
            w_in: sd.take(&p("mlp.up_proj.weight"))?.tr().contiguous(),
            b_in: bias_or_zeros(&mut sd, &p("mlp.up_proj.bias"), &[m]),
            w_gate: Some(sd.take(&p("mlp.gate_proj.weight"))?.tr().contiguous()),
            w_out: sd.take(&p("mlp.down_proj.weight"))?.tr().contiguous(),
            b_out: bias_or_zeros(&mut sd, &p("mlp.down_proj.bias"), &[d]),
        };
        if sd.contains(&p("mlp.gate_proj.bias")) {
            return Err(Error::Config("gated MLPs with a gate bias are not supported".into()));
        }
        let ln1 = NormWeights { w: Some(sd.take(&p("input_layernorm.weight"))?), b: None };
        let ln2 = NormWeights { w: Some(sd.take(&p("post_attention_layernorm.weight"))?), b: None };
        blocks.push(BlockWeights { ln1, attn, ln2, mlp });
    }
    let w_e = sd.take("embed_tokens.weight")?;
    // Tied models (stories260K) have no lm_head: the unembedding is the embedding's transpose.
    let w_u = sd.take_opt("lm_head.weight").unwrap_or_else(|| w_e.copy()).tr().contiguous();
    Ok(Weights {
        w_pos: None,
        blocks,
        ln_final: NormWeights { w: Some(sd.take("norm.weight")?), b: None },
        b_u: Tensor::zeros([cfg.d_vocab as i64], (tch::Kind::Float, tch::Device::Cpu)),
        w_u,
        w_e,
    })
}
