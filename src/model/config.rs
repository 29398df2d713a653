//! The resolved model configuration, built by composition: a constructor with the required
//! dimensions, then `with_*` calls that each set one feature and refuse impossible combinations.
//! Family parsers (gpt2.rs, llama.rs) translate an HF config.json into these calls; the forward
//! pass reads only features, never a family name.
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NormKind {
    /// Centre, divide by sqrt(var + eps), then weight and bias.
    LayerNorm,
    /// Divide by sqrt(mean(x²) + eps), then weight.
    RmsNorm,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Norm {
    pub kind: NormKind,
    pub eps: f64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Positional {
    /// A learned position embedding table added to the token embedding (hook_pos_embed).
    Learned,
    /// Rotary embeddings applied to q and k (hook_rot_q / hook_rot_k).
    Rotary {
        /// How many of each head's dimensions rotate (the rest pass through).
        dim: usize,
        base: f64,
        /// GPT-J style (2i, 2i+1) pairs; false = GPT-NeoX/Llama style (i, i + dim/2).
        adjacent_pairs: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// GPT-2's tanh approximation ("gelu_new").
    GeluNew,
    Gelu,
    Relu,
    Silu,
}

impl Activation {
    pub fn from_hf(name: &str) -> Result<Self> {
        match name {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluNew),
            "gelu" => Ok(Activation::Gelu),
            "relu" => Ok(Activation::Relu),
            "silu" | "swish" => Ok(Activation::Silu),
            other => Err(Error::Config(format!(
                "unsupported activation '{other}' (supported: gelu_new, gelu_pytorch_tanh, gelu, relu, silu)"
            ))),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mlp {
    pub d_mlp: usize,
    pub act: Activation,
    /// post = act(x·W_gate) * (x·W_in) (SwiGLU and friends).
    pub gated: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub n_layers: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub d_head: usize,
    pub d_vocab: usize,
    pub n_ctx: usize,
    /// Key-value heads; equal to n_heads without grouped-query attention.
    pub n_kv_heads: usize,
    pub norm: Norm,
    pub positional: Positional,
    pub mlp: Mlp,
    /// Attention scores are q·k divided by this (sqrt(d_head) unless a family says otherwise).
    pub attn_scale: f64,
    /// Attention and MLP both read resid_pre and add into resid_post (no resid_mid).
    pub parallel_block: bool,
}

impl ModelConfig {
    /// The required dimensions; every feature starts at the GPT-2 choice and is changed by `with_*`.
    pub fn new(n_layers: usize, d_model: usize, n_heads: usize, d_head: usize, d_vocab: usize, n_ctx: usize) -> Result<Self> {
        for (name, v) in [("n_layers", n_layers), ("d_model", d_model), ("n_heads", n_heads), ("d_head", d_head), ("d_vocab", d_vocab), ("n_ctx", n_ctx)] {
            if v == 0 {
                return Err(Error::Config(format!("{name} must be positive")));
            }
        }
        Ok(ModelConfig {
            n_layers,
            d_model,
            n_heads,
            d_head,
            d_vocab,
            n_ctx,
            n_kv_heads: n_heads,
            norm: Norm { kind: NormKind::LayerNorm, eps: 1e-5 },
            positional: Positional::Learned,
            mlp: Mlp { d_mlp: 4 * d_model, act: Activation::GeluNew, gated: false },
            attn_scale: (d_head as f64).sqrt(),
            parallel_block: false,
        })
    }

    pub fn with_norm(mut self, kind: NormKind, eps: f64) -> Result<Self> {
        if !(eps > 0.0 && eps.is_finite()) {
            return Err(Error::Config(format!("norm eps must be a positive number, got {eps}")));
        }
        self.norm = Norm { kind, eps };
        Ok(self)
    }

    pub fn with_rotary(mut self, dim: usize, base: f64, adjacent_pairs: bool) -> Result<Self> {
        if dim == 0 || dim > self.d_head || dim % 2 != 0 {
            return Err(Error::Config(format!("rotary dim must be even and in 2..={}, got {dim}", self.d_head)));
        }
        if !(base > 0.0 && base.is_finite()) {
            return Err(Error::Config(format!("rotary base must be positive, got {base}")));
        }
        self.positional = Positional::Rotary { dim, base, adjacent_pairs };
        Ok(self)
    }

    pub fn with_kv_heads(mut self, n_kv_heads: usize) -> Result<Self> {
        if n_kv_heads == 0 || self.n_heads % n_kv_heads != 0 {
            return Err(Error::Config(format!(
                "{} query heads cannot be grouped over {n_kv_heads} key-value heads", self.n_heads
            )));
        }
        self.n_kv_heads = n_kv_heads;
        Ok(self)
    }

    pub fn with_mlp(mut self, d_mlp: usize, act: Activation, gated: bool) -> Result<Self> {
        if d_mlp == 0 {
            return Err(Error::Config("d_mlp must be positive".into()));
        }
        self.mlp = Mlp { d_mlp, act, gated };
        Ok(self)
    }

    pub fn with_attn_scale(mut self, scale: f64) -> Result<Self> {
        if !(scale > 0.0 && scale.is_finite()) {
            return Err(Error::Config(format!("attention scale must be positive, got {scale}")));
        }
        self.attn_scale = scale;
        Ok(self)
    }

    pub fn with_parallel_block(mut self, parallel: bool) -> Self {
        self.parallel_block = parallel;
        self
    }

    pub fn is_rotary(&self) -> bool {
        matches!(self.positional, Positional::Rotary { .. })
    }

    pub fn kv_group(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }
}

/// TransformerLens's load-time weight processing; `from_pretrained` turns all four on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Processing {
    pub fold_ln: bool,
    pub center_writing_weights: bool,
    pub center_unembed: bool,
    pub fold_value_biases: bool,
}

impl Processing {
    /// HookedTransformer.from_pretrained defaults.
    pub const TRANSFORMER_LENS: Processing =
        Processing { fold_ln: true, center_writing_weights: true, center_unembed: true, fold_value_biases: true };
    /// from_pretrained_no_processing: the numerics of HF transformers.
    pub const NONE: Processing =
        Processing { fold_ln: false, center_writing_weights: false, center_unembed: false, fold_value_biases: false };
}

impl Default for Processing {
    fn default() -> Self {
        Processing::TRANSFORMER_LENS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn impossible_combinations_are_refused() {
        let base = ModelConfig::new(2, 64, 8, 8, 100, 32).unwrap();
        assert!(base.clone().with_kv_heads(3).is_err());
        assert!(base.clone().with_rotary(9, 1e4, false).is_err());
        assert!(base.clone().with_rotary(16, 1e4, false).is_err());
        assert!(base.clone().with_norm(NormKind::RmsNorm, 0.0).is_err());
        assert!(ModelConfig::new(0, 64, 8, 8, 100, 32).is_err());
        assert_eq!(base.with_kv_heads(4).unwrap().kv_group(), 2);
    }
}
