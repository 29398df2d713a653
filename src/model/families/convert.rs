//! What the family converters share: reading config.json fields that several families spell
//! differently (rotary settings, windows), and turning HF nn.Linear / Conv1D tensors into
//! TransformerLens's per-head layout.
use serde_json::Value;
use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::model::checkpoint::StateDict;
use crate::model::config::RopeScaling;
use crate::model::weights::{AttnWeights, MlpWeights, NormWeights};

/// Parses a family's config.json into its typed fields, naming the family in the error.
pub fn parse<T: serde::de::DeserializeOwned>(json: &Value, family: &str) -> Result<T> {
    serde_json::from_value(json.clone()).map_err(|e| Error::Config(format!("{family} config.json: {e}")))
}

/// d_model / n_heads, refusing a head count that does not divide it.
pub fn head_dim(d_model: usize, n_heads: usize) -> Result<usize> {
    if n_heads == 0 || !d_model.is_multiple_of(n_heads) {
        return Err(Error::Config(format!("hidden size {d_model} is not divisible by {n_heads} attention heads")));
    }
    Ok(d_model / n_heads)
}

/// Rotary settings, from `rope_parameters` (transformers ≥ 5) or the older top-level
/// `rope_theta` / `rotary_emb_base` / `rope_scaling` / `partial_rotary_factor` / `rotary_pct`.
pub struct Rope {
    pub base: f64,
    pub partial: f64,
    pub scaling: RopeScaling,
}

pub fn rope(json: &Value) -> Result<Rope> {
    let params = json.get("rope_parameters").filter(|v| v.is_object());
    let scaling_obj = params.or_else(|| json.get("rope_scaling").filter(|v| v.is_object()));
    let num = |v: Option<&Value>| v.and_then(Value::as_f64);
    let base = num(params.and_then(|p| p.get("rope_theta")))
        .or(num(json.get("rope_theta")))
        .or(num(json.get("rotary_emb_base")))
        .unwrap_or(10000.0);
    let partial = num(params.and_then(|p| p.get("partial_rotary_factor")))
        .or(num(json.get("partial_rotary_factor")))
        .or(num(json.get("rotary_pct")))
        .unwrap_or(1.0);
    let kind = scaling_obj
        .and_then(|s| s.get("rope_type").or_else(|| s.get("type")))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let field = |name: &str| -> Result<f64> {
        num(scaling_obj.and_then(|s| s.get(name)))
            .ok_or_else(|| Error::Config(format!("rope scaling '{kind}' needs '{name}'")))
    };
    let scaling = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: field("factor")? },
        "llama3" => RopeScaling::Llama3 {
            factor: field("factor")?,
            low_freq_factor: field("low_freq_factor")?,
            high_freq_factor: field("high_freq_factor")?,
            original_max_position: field("original_max_position_embeddings")?,
        },
        other => {
            return Err(Error::Config(format!(
                "rope scaling type '{other}' is not supported (supported: default, linear, llama3)"
            )))
        }
    };
    Ok(Rope { base, partial, scaling })
}

/// The rotary dimension for a partial factor, as HF computes it: int(d_head · factor).
pub fn rotary_dim(d_head: usize, partial: f64) -> usize {
    (d_head as f64 * partial) as usize
}

/// Per-layer windows from `layer_types` ("sliding_attention" gets `window`), else `fallback`.
pub fn layer_windows(
    json: &Value,
    n_layers: usize,
    window: Option<usize>,
    fallback: impl Fn(usize) -> bool,
) -> Result<Vec<Option<usize>>> {
    let sliding: Vec<bool> = match json.get("layer_types").and_then(Value::as_array) {
        Some(types) => {
            if types.len() != n_layers {
                return Err(Error::Config(format!("layer_types has {} entries for {n_layers} layers", types.len())));
            }
            types.iter().map(|t| t.as_str() == Some("sliding_attention")).collect()
        }
        None => (0..n_layers).map(fallback).collect(),
    };
    Ok(sliding.into_iter().map(|s| if s { window } else { None }).collect())
}

// The attention layout changes below are views, not copies: the forward multiplies through
// fused q/k/v/o projections, which are the checkpoint's own layouts again, so a contiguous
// TransformerLens layout would cost two transposes of every attention matrix. The MLP matrices
// are the exception (`linear_t`): contiguous once processed.

/// nn.Linear weight [n*d_head, d_model] -> [n, d_model, d_head] (a view).
pub fn linear_per_head_in(w: &Tensor, n: i64, d_head: i64) -> Tensor {
    let d = w.size()[1];
    w.view([n, d_head, d]).transpose(1, 2)
}

/// nn.Linear output projection [d_model, n*d_head] -> [n, d_head, d_model] (a view).
pub fn linear_per_head_out(w: &Tensor, n: i64, d_head: i64) -> Tensor {
    let d = w.size()[0];
    w.view([d, n, d_head]).permute([1, 2, 0])
}

/// nn.Linear [out, in] -> TransformerLens [in, out], a view. The forward multiplies by the MLP
/// matrices directly, and on the CPU (MKL) the transposed view made SmolLM2's patching sweeps
/// about 20% slower than a one-off copy, so `process` makes them contiguous on their device; a
/// shape check (`Model::inspect`, `tl-run hooks`) copies nothing.
pub fn linear_t(w: Tensor) -> Tensor {
    w.tr()
}

pub fn zeros(shape: &[i64]) -> Tensor {
    Tensor::zeros(shape, (Kind::Float, tch::Device::Cpu))
}

/// A bias of `shape` (any layout of as many numbers), or zeros where the checkpoint has none.
pub fn bias_or_zeros(sd: &mut StateDict, name: &str, shape: &[i64]) -> Result<Tensor> {
    match sd.take_opt(name)? {
        Some(b) if b.numel() as i64 == shape.iter().product::<i64>() => Ok(b.reshape(shape)),
        Some(b) => {
            Err(Error::Config(format!("bias '{name}' has shape {:?}, but config.json implies {shape:?}", b.size())))
        }
        None => Ok(zeros(shape)),
    }
}

/// `{prefix}.weight` and, for LayerNorm, `{prefix}.bias`.
pub fn norm(sd: &mut StateDict, prefix: &str, with_bias: bool) -> Result<NormWeights> {
    Ok(NormWeights {
        w: Some(sd.take(&format!("{prefix}.weight"))?),
        b: if with_bias { Some(sd.take(&format!("{prefix}.bias"))?) } else { None },
    })
}

/// An [d_vocab, d_model] head (or the tied embedding) as TransformerLens's W_U [d_model, d_vocab]:
/// a transposed view, like the attention weights (`Weights::unembed_columns` reads it along its
/// storage). Tied, it shares W_E's storage until weight processing gives it its own.
pub fn unembed_layout(head: &Tensor) -> Tensor {
    head.tr()
}

/// The unembedding [d_model, d_vocab]: `lm_head.weight` or, for tied models, W_E's transpose;
/// with its bias (GPT-J, Phi) or zeros.
pub fn unembed(sd: &mut StateDict, head: &str, w_e: &Tensor, d_vocab: i64) -> Result<(Tensor, Tensor)> {
    let w_u = unembed_layout(sd.take_opt(&format!("{head}.weight"))?.as_ref().unwrap_or(w_e));
    let b_u = bias_or_zeros(sd, &format!("{head}.bias"), &[d_vocab])?;
    Ok((w_u, b_u))
}

/// A fused [n*3*d_head, d_model] projection whose rows are grouped per head as [q, k, v]
/// (GPT-NeoX, Bloom) -> three [n, d_model, d_head] matrices and three [n, d_head] biases.
pub fn split_per_head_qkv(w: &Tensor, b: &Tensor, n: i64, e: i64) -> [(Tensor, Tensor); 3] {
    let d = w.size()[1];
    let w = w.view([n, 3, e, d]);
    let b = b.view([n, 3, e]);
    [0, 1, 2].map(|i| (w.select(1, i).transpose(1, 2), b.select(1, i)))
}

/// A non-gated MLP of two nn.Linear layers with biases (`{up}.weight` [m, d], `{down}.weight` [d, m]).
pub fn linear_mlp(sd: &mut StateDict, up: &str, down: &str, d: i64, m: i64) -> Result<MlpWeights> {
    Ok(MlpWeights {
        w_in: linear_t(sd.take_shaped(&format!("{up}.weight"), &[m, d])?),
        b_in: sd.take_shaped(&format!("{up}.bias"), &[m])?,
        w_gate: None,
        b_gate: None,
        w_out: linear_t(sd.take_shaped(&format!("{down}.weight"), &[d, m])?),
        b_out: sd.take_shaped(&format!("{down}.bias"), &[d])?,
    })
}

/// Attention with a fused per-head [q, k, v] projection `{qkv}` and an output projection
/// `{out}`, all with biases (GPT-NeoX, Bloom).
pub fn fused_per_head_attn(sd: &mut StateDict, qkv: &str, out: &str, h: i64, e: i64, d: i64) -> Result<AttnWeights> {
    let w = sd.take_shaped(&format!("{qkv}.weight"), &[3 * h * e, d])?;
    let b = sd.take_shaped(&format!("{qkv}.bias"), &[3 * h * e])?;
    let [(w_q, b_q), (w_k, b_k), (w_v, b_v)] = split_per_head_qkv(&w, &b, h, e);
    Ok(AttnWeights {
        w_q,
        b_q,
        w_k,
        b_k,
        w_v,
        b_v,
        w_o: linear_per_head_out(&sd.take_shaped(&format!("{out}.weight"), &[d, h * e])?, h, e),
        b_o: sd.take_shaped(&format!("{out}.bias"), &[d])?,
        q_norm: None,
        k_norm: None,
    })
}

/// Attention from separate nn.Linear q/k/v/out projections named by `names` (each + ".weight"
/// and, where the checkpoint has one, ".bias"), over `kv` key-value heads.
pub fn linear_attn(sd: &mut StateDict, names: [&str; 4], h: i64, kv: i64, e: i64, d: i64) -> Result<AttnWeights> {
    let [q, k, v, o] = names;
    let w = |sd: &mut StateDict, n: &str, rows: i64| sd.take_shaped(&format!("{n}.weight"), &[rows * e, d]);
    Ok(AttnWeights {
        w_q: linear_per_head_in(&w(sd, q, h)?, h, e),
        b_q: bias_or_zeros(sd, &format!("{q}.bias"), &[h, e])?,
        w_k: linear_per_head_in(&w(sd, k, kv)?, kv, e),
        b_k: bias_or_zeros(sd, &format!("{k}.bias"), &[kv, e])?,
        w_v: linear_per_head_in(&w(sd, v, kv)?, kv, e),
        b_v: bias_or_zeros(sd, &format!("{v}.bias"), &[kv, e])?,
        w_o: linear_per_head_out(&sd.take_shaped(&format!("{o}.weight"), &[d, h * e])?, h, e),
        b_o: bias_or_zeros(sd, &format!("{o}.bias"), &[d])?,
        q_norm: None,
        k_norm: None,
    })
}
