//! Weights in TransformerLens's layout, shared by every family: attention stored per head
//! (W_Q [head, d_model, d_head], W_O [head, d_head, d_model]) so that hook_z, per-head results and
//! weight processing fall out directly. Family files convert a checkpoint into this; the forward
//! pass and the processing steps only ever see this.
use tch::Tensor;

use crate::error::{Error, Result};
use crate::model::config::ModelConfig;

/// A norm's affine parameters; both `None` once folded into the next layer (TL's LNPre/RMSPre).
#[derive(Debug)]
pub struct NormWeights {
    pub w: Option<Tensor>,
    pub b: Option<Tensor>,
}

#[derive(Debug)]
pub struct AttnWeights {
    pub w_q: Tensor, // [n_heads, d_model, d_head]
    pub b_q: Tensor, // [n_heads, d_head]
    pub w_k: Tensor, // [n_kv_heads, d_model, d_head]
    pub b_k: Tensor, // [n_kv_heads, d_head]
    pub w_v: Tensor, // [n_kv_heads, d_model, d_head]
    pub b_v: Tensor, // [n_kv_heads, d_head]
    pub w_o: Tensor, // [n_heads, d_head, d_model]
    pub b_o: Tensor, // [d_model]
    /// Per-head RMSNorm weights on queries and keys [d_head] (Qwen3).
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
}

#[derive(Debug)]
pub struct MlpWeights {
    pub w_in: Tensor,           // [d_model, d_mlp]
    pub b_in: Tensor,           // [d_mlp]
    pub w_gate: Option<Tensor>, // [d_model, d_mlp], gated MLPs only
    /// [d_mlp]: a gated MLP under a LayerNorm gets one when the norm's bias is folded (StableLM).
    pub b_gate: Option<Tensor>,
    pub w_out: Tensor, // [d_mlp, d_model]
    pub b_out: Tensor, // [d_model]
}

#[derive(Debug)]
pub struct BlockWeights {
    pub ln1: NormWeights,
    pub attn: AttnWeights,
    /// Both None when the MLP reads ln1's output (shared-norm parallel blocks).
    pub ln2: NormWeights,
    pub mlp: MlpWeights,
    /// Norms on the attention and MLP outputs (Gemma 2), never folded.
    pub ln1_post: Option<NormWeights>,
    pub ln2_post: Option<NormWeights>,
}

impl BlockWeights {
    /// A block without post-norms.
    pub fn new(ln1: NormWeights, attn: AttnWeights, ln2: NormWeights, mlp: MlpWeights) -> Self {
        BlockWeights { ln1, attn, ln2, mlp, ln1_post: None, ln2_post: None }
    }
}

#[derive(Debug)]
pub struct Weights {
    pub w_e: Tensor, // [d_vocab, d_model]
    /// The norm right after the embedding (Bloom's embed_ln).
    pub ln_embed: Option<NormWeights>,
    pub w_pos: Option<Tensor>, // [n_ctx, d_model], learned positions only
    pub blocks: Vec<BlockWeights>,
    pub ln_final: NormWeights,
    pub w_u: Tensor, // [d_model, d_vocab]
    pub b_u: Tensor, // [d_vocab]
}

/// Fused matrices for the forward pass, derived once from the per-head weights: one matmul per
/// projection instead of an einsum over heads.
#[derive(Debug)]
pub struct FusedAttn {
    pub w_q: Tensor, // [n_heads * d_head, d_model]
    pub b_q: Tensor, // [n_heads * d_head]
    pub w_k: Tensor,
    pub b_k: Tensor,
    pub w_v: Tensor,
    pub b_v: Tensor,
    pub w_o: Tensor, // [n_heads * d_head, d_model]
}

impl AttnWeights {
    pub fn fused(&self) -> FusedAttn {
        // [out, in] like nn.Linear, used through `linear` (addmm), as HF computes projections.
        // A view where the checkpoint's layout allows one (GPT-2's Conv1D [in, out] gives rows of
        // stride 1 and columns of stride 3·d_model, which BLAS reads as they are), else a copy.
        let flat_in = |w: &Tensor| {
            let (h, d, e) = w.size3().expect("per-head weight is 3-d");
            w.permute([0, 2, 1]).reshape([h * e, d])
        };
        FusedAttn {
            w_q: flat_in(&self.w_q),
            b_q: self.b_q.reshape([-1]),
            w_k: flat_in(&self.w_k),
            b_k: self.b_k.reshape([-1]),
            w_v: flat_in(&self.w_v),
            b_v: self.b_v.reshape([-1]),
            w_o: self.w_o.reshape([-1, self.w_o.size()[2]]),
        }
    }
}

fn expect_shape(name: &str, t: &Tensor, want: &[i64]) -> Result<()> {
    if t.size() != want {
        return Err(Error::Config(format!("weight {name} has shape {:?}, expected {want:?}", t.size())));
    }
    Ok(())
}

impl Weights {
    /// W_U[:, ids] as rows, [ids, d_model]: the unembedding directions of those tokens. The
    /// gather runs along W_U's storage (its transpose is the checkpoint's [vocab, d_model]
    /// layout): on a strided view, index_select first copies the whole matrix, which on
    /// GPT-2-small made every metric read cost a 154 MB transpose.
    pub fn unembed_columns(&self, ids: &Tensor) -> Tensor {
        if self.w_u.tr().is_contiguous() {
            self.w_u.tr().index_select(0, ids)
        } else {
            self.w_u.index_select(1, ids).tr()
        }
    }

    /// Checks every shape against the config, so the forward pass cannot meet a mismatch later.
    pub fn validate(&self, cfg: &ModelConfig) -> Result<()> {
        let (d, v, h, kv, e, m) = (
            cfg.d_model as i64,
            cfg.d_vocab as i64,
            cfg.n_heads as i64,
            cfg.n_kv_heads as i64,
            cfg.d_head as i64,
            cfg.mlp.d_mlp as i64,
        );
        expect_shape("W_E", &self.w_e, &[v, d])?;
        match (&self.w_pos, cfg.has_pos_embed()) {
            (Some(p), true) => expect_shape("W_pos", p, &[cfg.n_ctx as i64, d])?,
            (None, false) => {}
            _ => return Err(Error::Config("position embedding table does not match the positional scheme".into())),
        }
        match (&self.ln_embed, cfg.embed_norm) {
            (Some(n), true) => n.validate("embed_ln", d)?,
            (None, false) => {}
            _ => return Err(Error::Config("embedding norm does not match the config".into())),
        }
        if self.blocks.len() != cfg.n_layers {
            return Err(Error::Config(format!("{} blocks of weights for {} layers", self.blocks.len(), cfg.n_layers)));
        }
        for (l, b) in self.blocks.iter().enumerate() {
            let n = |s: &str| format!("blocks.{l}.{s}");
            expect_shape(&n("attn.W_Q"), &b.attn.w_q, &[h, d, e])?;
            expect_shape(&n("attn.b_Q"), &b.attn.b_q, &[h, e])?;
            expect_shape(&n("attn.W_K"), &b.attn.w_k, &[kv, d, e])?;
            expect_shape(&n("attn.b_K"), &b.attn.b_k, &[kv, e])?;
            expect_shape(&n("attn.W_V"), &b.attn.w_v, &[kv, d, e])?;
            expect_shape(&n("attn.b_V"), &b.attn.b_v, &[kv, e])?;
            expect_shape(&n("attn.W_O"), &b.attn.w_o, &[h, e, d])?;
            expect_shape(&n("attn.b_O"), &b.attn.b_o, &[d])?;
            expect_shape(&n("mlp.W_in"), &b.mlp.w_in, &[d, m])?;
            expect_shape(&n("mlp.b_in"), &b.mlp.b_in, &[m])?;
            match (&b.mlp.w_gate, cfg.mlp.gated) {
                (Some(g), true) => {
                    expect_shape(&n("mlp.W_gate"), g, &[d, m])?;
                    if let Some(bg) = &b.mlp.b_gate {
                        expect_shape(&n("mlp.b_gate"), bg, &[m])?;
                    }
                }
                (None, false) => {}
                _ => return Err(Error::Config(format!("block {l}: gate weight does not match the MLP kind"))),
            }
            expect_shape(&n("mlp.W_out"), &b.mlp.w_out, &[m, d])?;
            expect_shape(&n("mlp.b_out"), &b.mlp.b_out, &[d])?;
            for (name, norm) in [
                ("ln1", Some(&b.ln1)),
                ("ln2", Some(&b.ln2)),
                ("ln1_post", b.ln1_post.as_ref()),
                ("ln2_post", b.ln2_post.as_ref()),
            ] {
                if let Some(norm) = norm {
                    norm.validate(&n(name), d)?;
                }
            }
            if b.ln1_post.is_some() != cfg.post_norms || b.ln2_post.is_some() != cfg.post_norms {
                return Err(Error::Config(format!("block {l}: post-attention/MLP norms do not match the config")));
            }
            for (name, w) in [("attn.q_norm.w", &b.attn.q_norm), ("attn.k_norm.w", &b.attn.k_norm)] {
                match (w, cfg.qk_norm) {
                    (Some(w), true) => expect_shape(&n(name), w, &[e])?,
                    (None, false) => {}
                    _ => return Err(Error::Config(format!("block {l}: {name} does not match the config's q/k norm"))),
                }
            }
        }
        self.ln_final.validate("ln_final", d)?;
        expect_shape("W_U", &self.w_u, &[d, v])?;
        expect_shape("b_U", &self.b_u, &[v])?;
        Ok(())
    }

    /// Every tensor with its TransformerLens parameter name, in forward order.
    pub fn named(&self) -> Vec<(String, &Tensor)> {
        let mut v: Vec<(String, &Tensor)> = vec![("embed.W_E".into(), &self.w_e)];
        fn push_norm<'a>(v: &mut Vec<(String, &'a Tensor)>, name: &str, n: &'a NormWeights) {
            if let Some(w) = &n.w {
                v.push((format!("{name}.w"), w));
            }
            if let Some(b) = &n.b {
                v.push((format!("{name}.b"), b));
            }
        }
        if let Some(n) = &self.ln_embed {
            push_norm(&mut v, "embed_ln", n);
        }
        if let Some(p) = &self.w_pos {
            v.push(("pos_embed.W_pos".into(), p));
        }
        for (l, b) in self.blocks.iter().enumerate() {
            let name = |s: &str| format!("blocks.{l}.{s}");
            push_norm(&mut v, &name("ln1"), &b.ln1);
            let a = &b.attn;
            for (n, t) in [
                ("W_Q", &a.w_q),
                ("b_Q", &a.b_q),
                ("W_K", &a.w_k),
                ("b_K", &a.b_k),
                ("W_V", &a.w_v),
                ("b_V", &a.b_v),
                ("W_O", &a.w_o),
                ("b_O", &a.b_o),
            ] {
                v.push((name(&format!("attn.{n}")), t));
            }
            for (n, t) in [("q_norm.w", &a.q_norm), ("k_norm.w", &a.k_norm)] {
                if let Some(t) = t {
                    v.push((name(&format!("attn.{n}")), t));
                }
            }
            if let Some(n) = &b.ln1_post {
                push_norm(&mut v, &name("ln1_post"), n);
            }
            push_norm(&mut v, &name("ln2"), &b.ln2);
            let m = &b.mlp;
            for (n, t) in [
                ("W_in", Some(&m.w_in)),
                ("b_in", Some(&m.b_in)),
                ("W_gate", m.w_gate.as_ref()),
                ("b_gate", m.b_gate.as_ref()),
                ("W_out", Some(&m.w_out)),
                ("b_out", Some(&m.b_out)),
            ] {
                if let Some(t) = t {
                    v.push((name(&format!("mlp.{n}")), t));
                }
            }
            if let Some(n) = &b.ln2_post {
                push_norm(&mut v, &name("ln2_post"), n);
            }
        }
        push_norm(&mut v, "ln_final", &self.ln_final);
        v.push(("unembed.W_U".into(), &self.w_u));
        v.push(("unembed.b_U".into(), &self.b_u));
        v
    }

    /// The same weights with `f` applied to every tensor.
    pub fn map(&self, f: &dyn Fn(&Tensor) -> Tensor) -> Weights {
        Weights {
            w_e: f(&self.w_e),
            ln_embed: self.ln_embed.as_ref().map(|n| n.map(f)),
            w_pos: self.w_pos.as_ref().map(f),
            blocks: self.blocks.iter().map(|b| b.map(f)).collect(),
            ln_final: self.ln_final.map(f),
            w_u: f(&self.w_u),
            b_u: f(&self.b_u),
        }
    }
}

impl BlockWeights {
    /// The same block with `f` applied to every tensor.
    pub fn map(&self, f: &dyn Fn(&Tensor) -> Tensor) -> BlockWeights {
        let o = |x: &Option<Tensor>| x.as_ref().map(f);
        BlockWeights {
            ln1: self.ln1.map(f),
            attn: AttnWeights {
                w_q: f(&self.attn.w_q),
                b_q: f(&self.attn.b_q),
                w_k: f(&self.attn.w_k),
                b_k: f(&self.attn.b_k),
                w_v: f(&self.attn.w_v),
                b_v: f(&self.attn.b_v),
                w_o: f(&self.attn.w_o),
                b_o: f(&self.attn.b_o),
                q_norm: o(&self.attn.q_norm),
                k_norm: o(&self.attn.k_norm),
            },
            ln2: self.ln2.map(f),
            mlp: MlpWeights {
                w_in: f(&self.mlp.w_in),
                b_in: f(&self.mlp.b_in),
                w_gate: o(&self.mlp.w_gate),
                b_gate: o(&self.mlp.b_gate),
                w_out: f(&self.mlp.w_out),
                b_out: f(&self.mlp.b_out),
            },
            ln1_post: self.ln1_post.as_ref().map(|n| n.map(f)),
            ln2_post: self.ln2_post.as_ref().map(|n| n.map(f)),
        }
    }
}

impl NormWeights {
    pub fn map(&self, f: &dyn Fn(&Tensor) -> Tensor) -> NormWeights {
        NormWeights { w: self.w.as_ref().map(f), b: self.b.as_ref().map(f) }
    }

    fn validate(&self, name: &str, d: i64) -> Result<()> {
        if let Some(w) = &self.w {
            expect_shape(&format!("{name}.w"), w, &[d])?;
        }
        if let Some(b) = &self.b {
            expect_shape(&format!("{name}.b"), b, &[d])?;
        }
        Ok(())
    }
}
