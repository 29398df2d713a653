//! The one forward pass every family runs, reading only config features. It can start at any
//! layer from a given residual, stop before any layer, capture any hook and intervene at any hook,
//! and keeps the autograd graph so gradients with respect to captured activations are available.
use tch::{Kind, Tensor};

use crate::engine::attention::AttnIn;
use crate::engine::hooks::Hooks;
pub use crate::engine::positions::Positions;
use crate::error::{Error, Result};
use crate::model::config::{Activation, NormKind};
use crate::model::hook_point::{HookPoint, NormHook, Site};
use crate::model::weights::NormWeights;
use crate::model::Model;

/// Where a forward pass begins.
pub enum Input<'a> {
    /// Token ids [batch, pos].
    Tokens(&'a Tensor),
    /// The residual stream entering block `layer` ([batch, pos, d_model]); the pass continues
    /// from `blocks.{layer}.hook_resid_pre` (whose hooks still fire).
    Residual { layer: usize, resid: &'a Tensor },
}

/// Where it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Logits,
    /// Return the input of the unembedding (ln_final's output), [batch, pos, d_model]: metrics
    /// that read a few logits at one position take them from here instead of the full vocabulary.
    FinalNorm,
    /// Return ln_final's output at the last position only, [batch, d_model] (where every metric
    /// reads). Nothing after the last block reads its other positions, so that block computes
    /// keys and values at every position but queries, attention output and MLP at the last one
    /// alone; when a hook in that block past its keys and values (or at ln_final) is set, every
    /// position is computed as for `FinalNorm` and the last one returned.
    LastPosition,
    /// Return the residual entering block `l` (blocks.{l}.hook_resid_pre; l = n_layers gives the
    /// last resid_post) without running it.
    BeforeLayer(usize),
}

/// Keys and values of the first `len` positions at every layer, computed once and reused: when
/// those positions cannot change (they precede every edit, under causal attention), a forward
/// recomputes only the positions after them. keys[l] is post-rotary, [batch, len, kv_heads, d_head].
pub struct Prefix {
    pub len: i64,
    pub keys: Vec<Tensor>,
    pub values: Vec<Tensor>,
}

impl Prefix {
    /// The first `len` positions (views).
    pub fn first(&self, len: i64) -> Prefix {
        let narrow = |ts: &[Tensor]| ts.iter().map(|t| t.narrow(1, 0, len)).collect();
        Prefix { len, keys: narrow(&self.keys), values: narrow(&self.values) }
    }

    /// The same prefix for `k` stacked copies of the batch (patch cells as the batch axis).
    pub fn repeat(&self, k: i64) -> Prefix {
        self.repeat_layers(k, 0..self.keys.len())
    }

    /// `repeat` for a forward that starts at `layer`: the layers before it are never read.
    pub fn repeat_from(&self, k: i64, layer: usize) -> Prefix {
        self.repeat_layers(k, layer..self.keys.len())
    }

    /// `repeat` of the layers in `layers` only (a forward that runs just those); the others stay
    /// as they are and must not be read.
    pub fn repeat_layers(&self, k: i64, layers: std::ops::Range<usize>) -> Prefix {
        let rep =
            |(l, t): (usize, &Tensor)| if layers.contains(&l) { t.repeat([k, 1, 1, 1]) } else { t.shallow_clone() };
        Prefix {
            len: self.len,
            keys: self.keys.iter().enumerate().map(rep).collect(),
            values: self.values.iter().enumerate().map(rep).collect(),
        }
    }
}

/// Which query positions a block computes past its keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Queries {
    All,
    /// The last position only (the last block of a `Stop::LastPosition` forward).
    Last,
}

impl Queries {
    /// These queries of a tensor whose axis `dim` holds every query position.
    fn of(self, t: &Tensor, dim: i64) -> Tensor {
        match self {
            Queries::All => t.shallow_clone(),
            Queries::Last => t.narrow(dim, t.size()[dim as usize] - 1, 1),
        }
    }

    /// These queries of a [batch, query, 1, 1] per-query mask.
    pub(super) fn select(self, per_query: &Tensor) -> Tensor {
        self.of(per_query, 1)
    }
}

/// Hook sites of a block that see every position when it computes only the last query: those
/// its keys and values are computed from.
fn feeds_keys_and_values(site: Site) -> bool {
    matches!(site, Site::ResidPre | Site::Ln1(_) | Site::K | Site::V | Site::KNorm(_) | Site::KNormed | Site::RotK)
}

/// What every layer of one forward shares.
pub(super) struct Context<'a> {
    /// [batch|1, 1, query, key] true where attention is NOT allowed (the explicit scores'
    /// masked_fill mask, inverted once per forward rather than in every layer), per distinct
    /// window size (None = global causal attention).
    blocked: Vec<(Option<usize>, Tensor)>,
    /// The fused kernel's masks, where this forward uses it (`Model::fuses_attention`).
    pub(super) fused: Option<FusedMasks>,
    pub(super) rotary: Option<(Tensor, Tensor)>,
    /// ALiBi biases [batch|1, heads, 1, key].
    pub(super) alibi: Option<Tensor>,
    pub(super) prefix: Option<&'a Prefix>,
    /// Whether the batch is left-padded (only then can a query see no key at all).
    pub(super) padded: bool,
}

/// What the fused attention kernel needs of the batch's masks.
pub(super) struct FusedMasks {
    /// Per window, `blocked` as an additive mask in the run's dtype (0 where a query may see a
    /// key, −inf elsewhere; a boolean mask would be converted to this in every call), with a
    /// padded query's row open to every key, so the kernel never meets a row with nothing to
    /// attend to (its z is zeroed instead).
    additive: Vec<(Option<usize>, Tensor)>,
    /// [batch, query, 1, 1] true at padded query positions; None when nothing is padded.
    pub(super) pad_queries: Option<Tensor>,
}

impl FusedMasks {
    /// The additive mask for these queries.
    pub(super) fn additive(&self, window: Option<usize>, queries: Queries) -> Tensor {
        queries.of(
            &self
                .additive
                .iter()
                .find(|(w, _)| *w == window)
                .expect("a mask is built for every window of the config")
                .1,
            2,
        )
    }
}

impl Context<'_> {
    /// The explicit path's mask (true = masked) for these queries.
    pub(super) fn blocked(&self, window: Option<usize>, queries: Queries) -> Tensor {
        queries.of(
            &self.blocked.iter().find(|(w, _)| *w == window).expect("a mask is built for every window of the config").1,
            2,
        )
    }
}

impl Model {
    /// Runs the model. `mask` is the [batch, pos] attention mask of a left-padded batch.
    pub fn run(&self, input: Input<'_>, mask: Option<&Tensor>, hooks: &mut Hooks, stop: Stop) -> Result<Tensor> {
        self.run_with_prefix(input, mask, hooks, stop, None)
    }

    /// Like `run`, continuing after `prefix`: a residual input then holds only the positions
    /// after the prefix (and so does every hook), while `mask` covers all positions.
    ///
    /// One function, over 80 lines: it is the forward pass in TransformerLens's order (embed,
    /// each block's hook points, final norm, unembed) with the prefix, stop and split-device
    /// branches at the step they concern; split up, each step would take the whole state.
    pub fn run_with_prefix(
        &self,
        input: Input<'_>,
        mask: Option<&Tensor>,
        hooks: &mut Hooks,
        stop: Stop,
        prefix: Option<&Prefix>,
    ) -> Result<Tensor> {
        if prefix.is_some() && matches!(input, Input::Tokens(_)) {
            return Err(Error::Other("a key-value prefix needs a residual input".into()));
        }
        let _guard = if hooks.grad() { None } else { Some(tch::no_grad_guard()) };
        let skip = prefix.map(|p| p.len).unwrap_or(0);
        let (start, mut x, pos) = match input {
            Input::Tokens(tokens) => {
                let size = tokens.size();
                if size.len() != 2 {
                    return Err(Error::Other(format!("tokens must be [batch, pos], got {size:?}")));
                }
                let input = self.input_device();
                let pos = Positions::new(size[0], size[1], mask, input);
                (0, self.embed(&tokens.to_device(input), &pos, hooks)?, pos)
            }
            Input::Residual { layer, resid } => {
                let size = resid.size();
                if layer > self.cfg.n_layers || size.len() != 3 || size[2] != self.cfg.d_model as i64 {
                    return Err(Error::Other(format!(
                        "residual start needs layer <= {} and [batch, pos, {}], got layer {layer} and {size:?}",
                        self.cfg.n_layers, self.cfg.d_model
                    )));
                }
                let device = self.device_of(layer);
                let full = Positions::new(size[0], size[1] + skip, mask, device);
                // Only the positions after the prefix are computed (keys still cover all).
                let pos = Positions { ids: full.ids.narrow(1, skip, size[1]), key_ids: full.key_ids, mask: full.mask };
                (layer, resid.to_device(device).to_kind(self.kind), pos)
            }
        };
        let (end, logits) = match stop {
            Stop::Logits | Stop::FinalNorm | Stop::LastPosition => (self.cfg.n_layers, true),
            Stop::BeforeLayer(l) if l >= start && l <= self.cfg.n_layers => (l, false),
            Stop::BeforeLayer(l) => {
                return Err(Error::Other(format!(
                    "cannot stop before layer {l} when starting at layer {start} (model has {} layers)",
                    self.cfg.n_layers
                )))
            }
        };
        let mut windows: Vec<Option<usize>> = self.cfg.attn_windows[start..end.max(start)].to_vec();
        windows.sort_unstable();
        windows.dedup();
        // Masks and position tables per device the layers run on (one unless split by layers);
        // the residual moves to a layer's device at the split points.
        let fuses = self.fuses_attention(hooks);
        let context = |device: tch::Device| {
            let moved = (pos.ids.device() != device).then(|| pos.on(device));
            let p = moved.as_ref().unwrap_or(&pos);
            let blocked: Vec<(Option<usize>, Tensor)> =
                windows.iter().map(|&w| (w, self.attention_mask(p, skip, w).logical_not())).collect();
            let fused = fuses.then(|| {
                let (batch, queries) = p.batch_seq();
                let pad_queries =
                    p.mask.as_ref().map(|m| m.narrow(1, skip, queries).eq(0).view([batch, queries, 1, 1]));
                let additive = blocked
                    .iter()
                    .map(|(w, blocked)| {
                        let shut = match &pad_queries {
                            Some(pad) => blocked.logical_and(&pad.view([batch, 1, queries, 1]).logical_not()),
                            None => blocked.shallow_clone(),
                        };
                        (
                            *w,
                            Tensor::zeros(shut.size(), (self.kind, shut.device()))
                                .masked_fill(&shut, f64::NEG_INFINITY),
                        )
                    })
                    .collect();
                FusedMasks { additive, pad_queries }
            });
            Context {
                blocked,
                fused,
                rotary: self.rotary_tables(p),
                alibi: self.alibi(p),
                prefix,
                padded: p.mask.is_some(),
            }
        };
        let mut contexts: Vec<(tch::Device, Context)> = Vec::new();
        let last_block = self.cfg.n_layers - 1;
        let last_query_only = stop == Stop::LastPosition
            && start <= last_block
            && !hooks.any_at(|p| match p {
                HookPoint::Block(l, site) => l == last_block && !feeds_keys_and_values(site),
                HookPoint::LnFinal(_) => true,
                _ => false,
            });
        for l in start..end {
            let device = self.device_of(l);
            if x.device() != device {
                x = x.to_device(device);
            }
            if !contexts.iter().any(|(d, _)| *d == device) {
                contexts.push((device, context(device)));
            }
            let ctx = &contexts.iter().find(|(d, _)| *d == device).expect("built above").1;
            let queries = if last_query_only && l == last_block { Queries::Last } else { Queries::All };
            x = self.block(l, x, ctx, hooks, queries)?;
        }
        if !logits {
            if end < self.cfg.n_layers && end > start {
                x = hooks.at(HookPoint::Block(end, Site::ResidPre), x.to_device(self.device_of(end)))?;
            }
            return Ok(x);
        }
        let x = self.norm(
            x.to_device(self.device),
            &self.weights.ln_final,
            HookPoint::LnFinal(NormHook::Scale),
            HookPoint::LnFinal(NormHook::Normalized),
            hooks,
        )?;
        match stop {
            Stop::FinalNorm => return Ok(x),
            Stop::LastPosition => return Ok(x.select(1, -1)),
            _ => {}
        }
        Ok(self.unembed(&x))
    }

    /// ln_final applied to any residual-stream tensor [.., d_model] with its own statistics
    /// (TransformerLens's logit lens recomputes the final norm this way for every layer).
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        let mut none = Hooks::new();
        self.norm(
            x.to_device(self.device),
            &self.weights.ln_final,
            HookPoint::LnFinal(NormHook::Scale),
            HookPoint::LnFinal(NormHook::Normalized),
            &mut none,
        )
    }

    /// Logits from ln_final's output.
    pub fn unembed(&self, x: &Tensor) -> Tensor {
        self.final_softcap(affine(x, &self.weights.w_u, Some(&self.weights.b_u)))
    }

    /// c·tanh(logits/c) for models with a final-logit softcap (Gemma 2); identity otherwise.
    /// Every path from the final norm to logits goes through here.
    pub fn final_softcap(&self, logits: Tensor) -> Tensor {
        match self.cfg.final_softcap {
            Some(c) => (logits / c).tanh() * c,
            None => logits,
        }
    }

    fn embed(&self, tokens: &Tensor, pos: &Positions, hooks: &mut Hooks) -> Result<Tensor> {
        let max = tokens.max().int64_value(&[]);
        let min = tokens.min().int64_value(&[]);
        if min < 0 || max >= self.cfg.d_vocab as i64 {
            return Err(Error::Other(format!("token ids must be in 0..{}, got {min}..={max}", self.cfg.d_vocab)));
        }
        let mut embed =
            self.weights.w_e.index_select(0, &tokens.reshape([-1])).view([tokens.size()[0], tokens.size()[1], -1]);
        if let Some(ln) = &self.weights.ln_embed {
            embed = self.norm(
                embed,
                ln,
                HookPoint::EmbedLn(NormHook::Scale),
                HookPoint::EmbedLn(NormHook::Normalized),
                hooks,
            )?;
        }
        let embed = hooks.at(HookPoint::Embed, embed)?;
        let Some(w_pos) = &self.weights.w_pos else { return Ok(embed) };
        let (_, seq) = pos.batch_seq();
        if seq > self.cfg.n_ctx as i64 {
            return Err(Error::Other(format!("{seq} positions exceed the model's context of {}", self.cfg.n_ctx)));
        }
        let mut pe = w_pos.index_select(0, &pos.ids.reshape([-1])).view([pos.ids.size()[0], seq, -1]);
        if let Some(m) = &pos.mask {
            let k = pe.kind();
            pe = pe * m.unsqueeze(-1).to_kind(k); // padding positions get no position embedding
        }
        let pe = hooks.at(HookPoint::PosEmbed, pe)?;
        Ok(embed + pe)
    }

    pub(super) fn norm(
        &self,
        x: Tensor,
        w: &NormWeights,
        scale_point: HookPoint,
        norm_point: HookPoint,
        hooks: &mut Hooks,
    ) -> Result<Tensor> {
        let kind = x.kind();
        // Half-precision models normalise in f32 and cast back before the affine (as TL).
        let x = if kind == Kind::Float || kind == Kind::Double { x } else { x.to_kind(Kind::Float) };
        if !hooks.wants(scale_point) && !hooks.wants(norm_point) {
            // Nothing reads or edits the scale or the normalized value: libtorch's own norm,
            // one kernel where the steps below are six or seven (a GPU's patched forwards are
            // bound by launches). Same arithmetic; it differs from the steps in rounding only.
            let d = [*x.size().last().expect("a norm's input has a feature axis")];
            let normalized = match self.cfg.norm.kind {
                NormKind::LayerNorm => x.layer_norm(d, None::<&Tensor>, None::<&Tensor>, self.cfg.norm.eps, true),
                NormKind::RmsNorm => x.rms_norm(d, None::<&Tensor>, self.cfg.norm.eps),
            };
            return Ok(affine_norm(normalized.to_kind(kind), w));
        }
        let x = match self.cfg.norm.kind {
            NormKind::LayerNorm => &x - x.mean_dim(-1, true, None),
            NormKind::RmsNorm => x,
        };
        let variance = x.square().mean_dim(-1, true, None) + self.cfg.norm.eps;
        // x * rsqrt(var + eps), as HF and the TL bridge compute it; an edited scale is divided
        // by instead, so the edit reaches hook_normalized. The scale itself is computed only
        // when hooked (a kernel per norm that a GPU's patched forwards otherwise launch).
        let normalized = if hooks.wants(scale_point) {
            let scale = hooks.at(scale_point, variance.sqrt())?;
            if hooks.edits(scale_point) {
                x / scale
            } else {
                x * variance.rsqrt()
            }
        } else {
            x * variance.rsqrt()
        };
        // TL 4.x hooks the normalized value before the affine (HookedTransformer 2.x hooked
        // LayerNorm's after it); with fold_ln there is no affine and both agree.
        Ok(affine_norm(hooks.at(norm_point, normalized.to_kind(kind))?, w))
    }

    fn block(
        &self,
        l: usize,
        resid_pre: Tensor,
        ctx: &Context<'_>,
        hooks: &mut Hooks,
        queries: Queries,
    ) -> Result<Tensor> {
        let at = |s: Site| HookPoint::Block(l, s);
        let bw = &self.weights.blocks[l];
        let resid_pre = hooks.at(at(Site::ResidPre), resid_pre)?;
        let x = self.norm(
            resid_pre.shallow_clone(),
            &bw.ln1,
            at(Site::Ln1(NormHook::Scale)),
            at(Site::Ln1(NormHook::Normalized)),
            hooks,
        )?;
        let split = [Site::QInput, Site::KInput, Site::VInput].iter().any(|&s| hooks.requests(at(s)));
        let mut attn_out = if split {
            // TransformerLens's split inputs: the residual copied per head (hookable one head at
            // a time), then ln1 per head, so a head's q, k or v reads only its own copy.
            let (h, kv) = (self.cfg.n_heads as i64, self.cfg.n_kv_heads as i64);
            let mut per_head = |site: Site, n: i64| -> Result<Tensor> {
                let (b, p, d) = (resid_pre.size()[0], resid_pre.size()[1], resid_pre.size()[2]);
                let copy = hooks.at(at(site), resid_pre.unsqueeze(2).expand([b, p, n, d], false).contiguous())?;
                // The per-head norms are ln1's arithmetic, unhooked (ln1's own hooks see the
                // shared input, as TransformerLens's do).
                self.norm(
                    copy,
                    &bw.ln1,
                    at(Site::Ln1(NormHook::Scale)),
                    at(Site::Ln1(NormHook::Normalized)),
                    &mut Hooks::new(),
                )
            };
            let (q, k, v) = (per_head(Site::QInput, h)?, per_head(Site::KInput, kv)?, per_head(Site::VInput, kv)?);
            self.attention(l, AttnIn::PerHead { q, k, v }, ctx, hooks, queries)?
        } else {
            self.attention(l, AttnIn::Shared(&x), ctx, hooks, queries)?
        };
        // From here on only the computed queries' positions go on.
        let (resid_pre, x) = match queries {
            Queries::All => (resid_pre, x),
            Queries::Last => (last_position(&resid_pre), last_position(&x)),
        };
        if let Some(post) = &bw.ln1_post {
            attn_out = self.norm(
                attn_out,
                post,
                at(Site::Ln1Post(NormHook::Scale)),
                at(Site::Ln1Post(NormHook::Normalized)),
                hooks,
            )?;
        }
        let attn_out = hooks.at(at(Site::AttnOut), attn_out)?;
        let (mlp_in_resid, resid_mid) = if self.cfg.parallel_block {
            (resid_pre.shallow_clone(), None)
        } else {
            let mid = hooks.at(at(Site::ResidMid), &resid_pre + &attn_out)?;
            (mid.shallow_clone(), Some(mid))
        };
        // hook_mlp_in: the residual the MLP's norm reads, its own copy (editing it changes the MLP
        // alone, not the residual stream).
        let mlp_in = hooks.requests(at(Site::MlpIn));
        let mlp_in_resid = if mlp_in { hooks.at(at(Site::MlpIn), mlp_in_resid.copy())? } else { mlp_in_resid };
        // GPT-J and Phi: the MLP reads the same normalised input as attention (recomputed from
        // hook_mlp_in's copy when that is edited).
        let x = if self.cfg.shared_norm && mlp_in {
            self.norm(
                mlp_in_resid,
                &bw.ln1,
                at(Site::Ln1(NormHook::Scale)),
                at(Site::Ln1(NormHook::Normalized)),
                &mut Hooks::new(),
            )?
        } else if self.cfg.shared_norm {
            x
        } else {
            self.norm(
                mlp_in_resid,
                &bw.ln2,
                at(Site::Ln2(NormHook::Scale)),
                at(Site::Ln2(NormHook::Normalized)),
                hooks,
            )?
        };
        let mut mlp_out = self.mlp(l, &x, hooks)?;
        if let Some(post) = &bw.ln2_post {
            mlp_out = self.norm(
                mlp_out,
                post,
                at(Site::Ln2Post(NormHook::Scale)),
                at(Site::Ln2Post(NormHook::Normalized)),
                hooks,
            )?;
        }
        let mlp_out = hooks.at(at(Site::MlpOut), mlp_out)?;
        let resid_post = match resid_mid {
            Some(mid) => mid + mlp_out,
            None => resid_pre + attn_out + mlp_out,
        };
        hooks.at(at(Site::ResidPost), resid_post)
    }

    fn mlp(&self, l: usize, x: &Tensor, hooks: &mut Hooks) -> Result<Tensor> {
        let at = |s: Site| HookPoint::Block(l, s);
        let mw = &self.weights.blocks[l].mlp;
        let act = |t: &Tensor| match self.cfg.mlp.act {
            Activation::GeluNew => t.gelu("tanh"),
            Activation::Gelu => t.gelu("none"),
            Activation::Relu => t.relu(),
            Activation::Silu => t.silu(),
        };
        let post = match &mw.w_gate {
            Some(w_gate) => {
                let pre = hooks.at(at(Site::MlpPre), affine(x, w_gate, mw.b_gate.as_ref()))?;
                let pre_linear = hooks.at(at(Site::MlpPreLinear), affine(x, &mw.w_in, Some(&mw.b_in)))?;
                act(&pre) * pre_linear
            }
            None => act(&hooks.at(at(Site::MlpPre), affine(x, &mw.w_in, Some(&mw.b_in)))?),
        };
        let post = hooks.at(at(Site::MlpPost), post)?;
        Ok(affine(&post, &mw.w_out, Some(&mw.b_out)))
    }
}

/// A norm's affine (weight, then bias) where the model has one (not folded into what follows).
fn affine_norm(mut y: Tensor, w: &NormWeights) -> Tensor {
    if let Some(g) = &w.w {
        y = y * g;
    }
    if let Some(b) = &w.b {
        y = y + b;
    }
    y
}

/// x @ w + b for w stored [in, out] (TransformerLens's layout): as `linear` of w's transposed
/// view, so that libtorch runs one GEMM with the bias added in it (addmm) rather than a GEMM
/// and then a pass over its output to add the bias.
pub(super) fn affine(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Tensor {
    x.linear(&w.tr(), b)
}

/// The last position of a [batch, pos, ..] tensor, keeping the axis.
pub(super) fn last_position(x: &Tensor) -> Tensor {
    x.narrow(1, x.size()[1] - 1, 1)
}
