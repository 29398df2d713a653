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
        scaling: RopeScaling,
    },
    /// ALiBi (Bloom): no position embedding; a per-head bias slope·key_position on the scores.
    Alibi,
}

/// How rotary frequencies are rescaled for long contexts (HF `rope_scaling` / `rope_parameters`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    None,
    /// Every frequency divided by `factor` (positions interpolated).
    Linear {
        factor: f64,
    },
    /// Llama 3.1/3.2: low frequencies divided by `factor`, high ones kept, a smooth blend between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position: f64,
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
    /// In a parallel block, the MLP reads ln1's output (GPT-J, Phi-1/2: one norm, no ln2 hooks).
    pub shared_norm: bool,
    /// Per layer: each query sees only the last `w` keys, itself included (GPT-Neo local layers,
    /// Mistral and Gemma 2 sliding windows); None = global causal attention.
    pub attn_windows: Vec<Option<usize>>,
    /// Scores become c·tanh(s/c) before masking (Gemma 2).
    pub attn_softcap: Option<f64>,
    /// Logits become c·tanh(l/c) (Gemma 2).
    pub final_softcap: Option<f64>,
    /// A norm (embed_ln) right after the token embedding (Bloom); hook_embed is its output.
    pub embed_norm: bool,
    /// Norms on the attention and MLP outputs before they join the residual (Gemma 2: ln1_post,
    /// ln2_post).
    pub post_norms: bool,
    /// Per-head RMSNorm on queries and keys before rotary (Qwen3: attn.q_norm / attn.k_norm).
    pub qk_norm: bool,
    /// What TransformerLens's to_tokens does by default for this family (spec prepend_bos overrides).
    pub default_prepend_bos: bool,
    /// The HF model_type this config came from (for the manifest and messages only: the forward
    /// pass never reads it).
    pub family: String,
    /// What W_E was multiplied by when converted (Gemma: sqrt(d_model), folded in so the forward
    /// needs no extra op). TransformerLens 4.3's W_E is the unscaled matrix, so statistics "of
    /// W_E" (the noise scale of causal tracing) divide by this.
    pub embed_scale: f64,
}

impl ModelConfig {
    /// The required dimensions; every feature starts at the GPT-2 choice and is changed by `with_*`.
    pub fn new(
        n_layers: usize,
        d_model: usize,
        n_heads: usize,
        d_head: usize,
        d_vocab: usize,
        n_ctx: usize,
    ) -> Result<Self> {
        for (name, v) in [
            ("n_layers", n_layers),
            ("d_model", d_model),
            ("n_heads", n_heads),
            ("d_head", d_head),
            ("d_vocab", d_vocab),
            ("n_ctx", n_ctx),
        ] {
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
            shared_norm: false,
            attn_windows: vec![None; n_layers],
            attn_softcap: None,
            final_softcap: None,
            embed_norm: false,
            post_norms: false,
            qk_norm: false,
            default_prepend_bos: true,
            embed_scale: 1.0,
            family: String::new(),
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
        if dim == 0 || dim > self.d_head || !dim.is_multiple_of(2) {
            return Err(Error::Config(format!("rotary dim must be even and in 2..={}, got {dim}", self.d_head)));
        }
        if !(base > 0.0 && base.is_finite()) {
            return Err(Error::Config(format!("rotary base must be positive, got {base}")));
        }
        self.positional = Positional::Rotary { dim, base, adjacent_pairs, scaling: RopeScaling::None };
        Ok(self)
    }

    /// Rescales the rotary frequencies (after `with_rotary`).
    pub fn with_rope_scaling(mut self, scaling: RopeScaling) -> Result<Self> {
        let Positional::Rotary { dim, base, adjacent_pairs, .. } = self.positional else {
            return Err(Error::Config("rope scaling needs rotary positions".into()));
        };
        let positive = |name: &str, v: f64| {
            if v > 0.0 && v.is_finite() {
                Ok(())
            } else {
                Err(Error::Config(format!("rope scaling {name} must be positive, got {v}")))
            }
        };
        match scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => positive("factor", factor)?,
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position } => {
                for (n, v) in [
                    ("factor", factor),
                    ("low_freq_factor", low_freq_factor),
                    ("high_freq_factor", high_freq_factor),
                    ("original_max_position_embeddings", original_max_position),
                ] {
                    positive(n, v)?;
                }
                if high_freq_factor <= low_freq_factor {
                    return Err(Error::Config(format!("rope scaling needs high_freq_factor > low_freq_factor, got {high_freq_factor} and {low_freq_factor}")));
                }
            }
        }
        self.positional = Positional::Rotary { dim, base, adjacent_pairs, scaling };
        Ok(self)
    }

    pub fn with_alibi(mut self) -> Self {
        self.positional = Positional::Alibi;
        self
    }

    /// Sliding-window sizes per layer (None = global).
    pub fn with_attn_windows(mut self, windows: Vec<Option<usize>>) -> Result<Self> {
        if windows.len() != self.n_layers {
            return Err(Error::Config(format!("{} attention windows for {} layers", windows.len(), self.n_layers)));
        }
        if windows.contains(&Some(0)) {
            return Err(Error::Config("an attention window must be at least 1".into()));
        }
        self.attn_windows = windows;
        Ok(self)
    }

    pub fn with_softcaps(mut self, attn: Option<f64>, final_logits: Option<f64>) -> Result<Self> {
        for c in [attn, final_logits].into_iter().flatten() {
            if !(c > 0.0 && c.is_finite()) {
                return Err(Error::Config(format!("softcap must be positive, got {c}")));
            }
        }
        self.attn_softcap = attn;
        self.final_softcap = final_logits;
        Ok(self)
    }

    /// Whether this architecture's forward has `site` at all (known from the config alone).
    pub fn has_site(&self, site: crate::model::hook_point::Site) -> bool {
        use crate::model::hook_point::Site;
        match site {
            Site::RotQ | Site::RotK => self.is_rotary(),
            Site::ResidMid => !self.parallel_block,
            Site::Ln2(_) => !self.shared_norm,
            Site::MlpPreLinear => self.mlp.gated,
            Site::QNorm(_) | Site::QNormed | Site::KNorm(_) | Site::KNormed => self.qk_norm,
            Site::Ln1Post(_) | Site::Ln2Post(_) => self.post_norms,
            _ => true,
        }
    }

    pub fn with_family(mut self, family: &str, default_prepend_bos: bool) -> Self {
        self.family = family.to_string();
        self.default_prepend_bos = default_prepend_bos;
        self
    }

    pub fn with_kv_heads(mut self, n_kv_heads: usize) -> Result<Self> {
        if n_kv_heads == 0 || !self.n_heads.is_multiple_of(n_kv_heads) {
            return Err(Error::Config(format!(
                "{} query heads cannot be grouped over {n_kv_heads} key-value heads",
                self.n_heads
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

    /// Parallel attention + MLP reading one norm's output.
    pub fn with_shared_norm_parallel_block(mut self) -> Self {
        self.parallel_block = true;
        self.shared_norm = true;
        self
    }

    pub fn with_embed_norm(mut self) -> Self {
        self.embed_norm = true;
        self
    }

    pub fn with_post_norms(mut self) -> Self {
        self.post_norms = true;
        self
    }

    pub fn with_qk_norm(mut self) -> Self {
        self.qk_norm = true;
        self
    }

    pub fn is_rotary(&self) -> bool {
        matches!(self.positional, Positional::Rotary { .. })
    }

    pub fn has_pos_embed(&self) -> bool {
        self.positional == Positional::Learned
    }

    pub fn kv_group(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }
}

/// The run dtype for a spec or command-line name (None for an unknown name).
pub fn parse_dtype(name: &str) -> Option<tch::Kind> {
    match name {
        "float32" | "f32" => Some(tch::Kind::Float),
        "bfloat16" | "bf16" => Some(tch::Kind::BFloat16),
        "float16" | "f16" | "half" => Some(tch::Kind::Half),
        _ => None,
    }
}

pub const DTYPES: &str = "float32, bfloat16, float16";

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
