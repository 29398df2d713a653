//! Attention: q, k and v with their norms and rotary embedding, then z either step by step
//! (scores, mask, softmax, pattern, each hookable, as TransformerLens computes them) or, in f32
//! forwards that capture nothing (the patching and ablation sweeps), by libtorch's fused kernel.
use tch::{Kind, Tensor};

use crate::engine::forward::{affine, last_position, Context, Queries};
use crate::engine::hooks::Hooks;
use crate::error::Result;
use crate::model::config::Positional;
use crate::model::hook_point::{HookPoint, NormHook, Site};
use crate::model::weights::NormWeights;
use crate::model::{AttentionKernel, Model};

/// What attention computes q, k and v from: ln1's output, or (TransformerLens's split inputs)
/// ln1 applied to a copy of the residual per head, [b, pos, heads, d_model] for q and per
/// key-value head for k and v.
pub(super) enum AttnIn<'a> {
    Shared(&'a Tensor),
    PerHead { q: Tensor, k: Tensor, v: Tensor },
}

impl Model {
    /// The attention sublayer of block `l`: its output [b, q, d_model] from ln1's output.
    ///
    /// Over 80 lines: TransformerLens's attention step by step (q, k, v with their norms and
    /// rotary, scores, mask, softmax, pattern, z, result), each a hook point in its place.
    pub(super) fn attention(
        &self,
        l: usize,
        input: AttnIn<'_>,
        ctx: &Context<'_>,
        hooks: &mut Hooks,
        queries: Queries,
    ) -> Result<Tensor> {
        let at = |s: Site| HookPoint::Block(l, s);
        let (aw, fw) = (&self.weights.blocks[l].attn, &self.fused[l]);
        let (h, kv, e) = (self.cfg.n_heads as i64, self.cfg.n_kv_heads as i64, self.cfg.d_head as i64);
        let (q, k, v) = match &input {
            AttnIn::Shared(x) => {
                let (b, p) = (x.size()[0], x.size()[1]);
                // Queries at the positions this block goes on with; keys and values at all of them.
                let (x_q, p_q) = match queries {
                    Queries::All => (x.shallow_clone(), p),
                    Queries::Last => (last_position(x), 1),
                };
                (
                    x_q.linear(&fw.w_q, Some(&fw.b_q)).view([b, p_q, h, e]),
                    x.linear(&fw.w_k, Some(&fw.b_k)).view([b, p, kv, e]),
                    x.linear(&fw.w_v, Some(&fw.b_v)).view([b, p, kv, e]),
                )
            }
            AttnIn::PerHead { q, k, v } => {
                // Head j's projection of head j's own input: the fused [heads·d_head, d_model]
                // weights seen per head.
                let per_head = |x: &Tensor, w: &Tensor, bias: &Tensor, n: i64| {
                    let d = x.size()[3];
                    Tensor::einsum("bpnd,ned->bpne", &[x, &w.view([n, e, d])], None::<&[i64]>) + bias.view([n, e])
                };
                let x_q = match queries {
                    Queries::All => q.shallow_clone(),
                    Queries::Last => last_position(q),
                };
                (
                    per_head(&x_q, &fw.w_q, &fw.b_q, h),
                    per_head(k, &fw.w_k, &fw.b_k, kv),
                    per_head(v, &fw.w_v, &fw.b_v, kv),
                )
            }
        };
        let (b, p_q) = (k.size()[0], q.size()[1]);
        let q = hooks.at(at(Site::Q), q)?;
        let k = hooks.at(at(Site::K), k)?;
        let v = hooks.at(at(Site::V), v)?;
        let (q, k) = match (&aw.q_norm, &aw.k_norm) {
            (Some(qn), Some(kn)) => (
                self.head_norm(
                    q,
                    qn,
                    (at(Site::QNorm(NormHook::Scale)), at(Site::QNorm(NormHook::Normalized)), at(Site::QNormed)),
                    hooks,
                )?,
                self.head_norm(
                    k,
                    kn,
                    (at(Site::KNorm(NormHook::Scale)), at(Site::KNorm(NormHook::Normalized)), at(Site::KNormed)),
                    hooks,
                )?,
            ),
            _ => (q, k),
        };
        let (q, k) = match &ctx.rotary {
            Some(t) => {
                let t_q = match queries {
                    Queries::All => (t.0.shallow_clone(), t.1.shallow_clone()),
                    Queries::Last => (last_position(&t.0), last_position(&t.1)),
                };
                (hooks.at(at(Site::RotQ), self.rotate(&q, &t_q))?, hooks.at(at(Site::RotK), self.rotate(&k, t))?)
            }
            None => (q, k),
        };
        let (k, v) = match ctx.prefix {
            Some(p) => (Tensor::cat(&[&p.keys[l], &k], 1), Tensor::cat(&[&p.values[l], &v], 1)),
            None => (k, v),
        };
        let window = self.cfg.attn_windows[l];
        let z = match &ctx.fused {
            None => self.explicit_z(l, (&q, &k, &v), ctx, hooks, queries)?.0,
            Some(masks) => {
                // Square and purely causal: the kernel's own causal mask (flash attention on CUDA).
                let causal = ctx.prefix.is_none() && queries == Queries::All && window.is_none() && !ctx.padded;
                let z = self.fused_z(&q, &k, &v, &masks.additive(window, queries), causal);
                let z = match &masks.pad_queries {
                    // A padded query sees no key: TransformerLens zeroes its pattern row, so its z is 0.
                    Some(pad) => z.masked_fill(&queries.select(pad), 0.0),
                    None => z,
                };
                if hooks.edits(at(Site::AttnScores)) || hooks.edits(at(Site::Pattern)) {
                    // Where an edit changed a row's scores or pattern, that row's z is the
                    // explicit steps' (through the edited values); the other rows keep the fused
                    // z. Decided by each row's own values, so a row's result never depends on
                    // which other cells share its forward.
                    match self.explicit_z(l, (&q, &k, &v), ctx, hooks, queries)? {
                        (explicit, Some(edited)) => explicit.where_self(&edited.view([-1, 1, 1, 1]), &z),
                        (_, None) => z,
                    }
                } else {
                    z
                }
            }
        };
        let z = hooks.at(at(Site::Z), z)?;
        if hooks.wants(at(Site::Result)) {
            let result = Tensor::einsum("bphe,hed->bphd", &[&z, &aw.w_o], None::<&[i64]>);
            let result = hooks.at(at(Site::Result), result)?;
            Ok(result.sum_dim_intlist(2, false, None) + &aw.b_o)
        } else {
            Ok(affine(&z.view([b, p_q, h * e]), &fw.w_o, Some(&aw.b_o)))
        }
    }

    /// Whether a forward with these hooks computes z by the fused kernel. Only in forwards that
    /// capture nothing (the patching and ablation sweeps): a forward that captures (the clean
    /// and corrupted runs, caches, attribution) computes every value it keeps as TransformerLens
    /// does, and since what those runs capture depends on the jobs pending, their baselines
    /// would otherwise depend on which jobs share a shard. Only in f32 (or f64): the sweeps'
    /// metric is compared with baselines from those runs, and in half precision the two
    /// kernels' rounding differs by ~1e-2 relative, which a normalised metric would mix into
    /// every cell; in f32 it is ~1e-7. Never with ALiBi or an attention softcap.
    pub(super) fn fuses_attention(&self, hooks: &Hooks) -> bool {
        self.attention_kernel == AttentionKernel::Fused
            && matches!(self.kind, Kind::Float | Kind::Double)
            && self.cfg.attn_softcap.is_none()
            && self.cfg.positional != Positional::Alibi
            && !hooks.captures_any()
    }

    /// z [b, q, h, e] step by step: scores, mask, softmax and the pattern's product, each hooked
    /// (the only way in forwards that capture, for models with ALiBi or an attention softcap,
    /// and for the rows whose scores or pattern an edit changed). Where the scores or the
    /// pattern are edited, also the [b] rows the edits changed.
    fn explicit_z(
        &self,
        l: usize,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        ctx: &Context<'_>,
        hooks: &mut Hooks,
        queries: Queries,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let at = |s: Site| HookPoint::Block(l, s);
        let mut edited: Option<Tensor> = None;
        let mut hook = |point: HookPoint, x: Tensor, hooks: &mut Hooks| -> Result<Tensor> {
            if !hooks.edits(point) {
                return hooks.at(point, x);
            }
            let after = hooks.at(point, x.shallow_clone())?;
            let rows = x.ne_tensor(&after).flatten(1, -1).any_dim(1, false);
            edited = Some(match edited.take() {
                Some(e) => e.logical_or(&rows),
                None => rows,
            });
            Ok(after)
        };
        let mut scores = self.attention_scores(q, k);
        if let Some(alibi) = &ctx.alibi {
            scores = scores + alibi;
        }
        let blocked = ctx.blocked(self.cfg.attn_windows[l], queries);
        let scores = hook(at(Site::AttnScores), scores.masked_fill(&blocked, f64::NEG_INFINITY), hooks)?;
        // Softmax accumulates in f32 whatever the run dtype, then returns to it.
        let pattern = scores.softmax(-1, Kind::Float);
        // Rows with every key masked (padding queries) are NaN after softmax; TL zeroes them.
        // Without padding every query sees at least itself, so no row is NaN.
        let pattern = if ctx.padded { pattern.masked_fill(&pattern.isnan(), 0.0) } else { pattern };
        let pattern = hook(at(Site::Pattern), pattern.to_kind(self.kind), hooks)?;
        // Grouped-query attention: the `group` query heads a key-value head serves are one
        // batch of rows against its values (no copy of the values per query head).
        let pk = v.size()[1];
        let (b, h, e) = (q.size()[0], q.size()[2], q.size()[3]);
        let (kv, p_q) = (k.size()[2], q.size()[1]);
        let z = pattern
            .view([b, kv, -1, pk])
            .matmul(&v.permute([0, 2, 1, 3]))
            .view([b, h, p_q, e])
            .permute([0, 2, 1, 3])
            .contiguous();
        Ok((z, edited))
    }

    /// z [b, q, h, e] from libtorch's scaled_dot_product_attention: on CUDA one flash or
    /// memory-efficient kernel where the explicit steps launch five or more (patched forwards on
    /// a GPU are bound by launches), on the CPU a fused loop. `mask` is [batch|1, 1, q, k],
    /// added to the scores (0 or −inf); `causal` uses the kernel's own mask instead.
    fn fused_z(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, causal: bool) -> Tensor {
        let (qs, kv) = (q.size(), k.size()[2]);
        let (b, p, h, e) = (qs[0], qs[1], qs[2], qs[3]);
        let (k, v) = (k.permute([0, 2, 1, 3]), v.permute([0, 2, 1, 3]));
        // Multiplied by 1/scale, as the explicit scores are.
        let scale = 1.0 / self.cfg.attn_scale;
        let z = if kv == h {
            Tensor::scaled_dot_product_attention(
                &q.permute([0, 2, 1, 3]),
                &k,
                &v,
                (!causal).then_some(mask),
                0.0,
                causal,
                scale,
                false,
            )
        } else {
            // Grouped-query attention as in the explicit path: the query heads a key-value head
            // serves are one batch of rows against it, so keys and values are never copied per
            // query head (the kernel's own `enable_gqa` copies them outside flash attention);
            // the mask is tiled to those rows.
            let tiled = mask.repeat([1, 1, h / kv, 1]);
            Tensor::scaled_dot_product_attention(
                &grouped_queries(q, kv),
                &k,
                &v,
                Some(&tiled),
                0.0,
                false,
                scale,
                false,
            )
            .view([b, h, p, e])
        };
        z.permute([0, 2, 1, 3]).contiguous()
    }

    /// Unmasked scores [batch, head, query, key] from post-rotary q [b, q, h, e] and k
    /// [b, k, kv_heads, e]: q·k / scale, then the softcap. With grouped-query attention each
    /// key-value head serves `h / kv_heads` consecutive query heads; their queries are one batch
    /// of rows against its keys, so the keys are never copied per query head.
    pub fn attention_scores(&self, q: &Tensor, k: &Tensor) -> Tensor {
        let (qs, kv) = (q.size(), k.size()[2]);
        let (b, p, h) = (qs[0], qs[1], qs[2]);
        let raw = if kv == h {
            q.permute([0, 2, 1, 3]).matmul(&k.permute([0, 2, 3, 1]))
        } else {
            grouped_queries(q, kv).matmul(&k.permute([0, 2, 3, 1])).view([b, h, p, -1])
        };
        // Multiplied by 1/scale (HF's and the bridge's order of operations), not divided.
        let scores = raw * (1.0 / self.cfg.attn_scale);
        match self.cfg.attn_softcap {
            Some(c) => (scores / c).tanh() * c,
            None => scores,
        }
    }

    /// Qwen3's per-head RMSNorm of q or k [b, p, heads, e], hooked head-major as
    /// TransformerLens does ([b, heads, p, ..]): scale, normalized, then the weighted output.
    fn head_norm(
        &self,
        x: Tensor,
        w: &Tensor,
        points: (HookPoint, HookPoint, HookPoint),
        hooks: &mut Hooks,
    ) -> Result<Tensor> {
        let weights = NormWeights { w: Some(w.shallow_clone()), b: None };
        let y = self.norm(x.transpose(1, 2), &weights, points.0, points.1, hooks)?;
        Ok(hooks.at(points.2, y)?.transpose(1, 2))
    }
}

/// q [b, p, h, e] as [b, kv_heads, (h / kv_heads)·p, e]: the query heads one key-value head
/// serves (consecutive heads, as HF groups them), one batch of rows against its keys and values.
fn grouped_queries(q: &Tensor, kv_heads: i64) -> Tensor {
    let s = q.size();
    let (b, p, h, e) = (s[0], s[1], s[2], s[3]);
    q.view([b, p, kv_heads, h / kv_heads, e]).permute([0, 2, 3, 1, 4]).reshape([b, kv_heads, -1, e])
}
