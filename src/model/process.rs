//! TransformerLens's load-time weight processing, in its order and in f32:
//! fold_ln → center_writing_weights → center_unembed → fold_value_biases.
//! Each step leaves the model computing the same function (up to a constant per position in the
//! logits for center_unembed); what changes is the coordinate system researchers read hooks in.
use tch::{Kind, Tensor};

use crate::model::config::{ModelConfig, NormKind, Processing};
use crate::model::weights::{BlockWeights, NormWeights, Weights};

/// Where a finished weight goes: a block's device, the embedding's or the output side's.
#[derive(Debug, Clone, Copy)]
pub enum Place {
    Block(usize),
    Input,
    Output,
}

/// Processes the weights in f32 and hands every finished tensor to `place` (the cast to the
/// run's device and dtype). It goes block by block — each block upcast, processed, placed —
/// so a bf16 checkpoint is never held whole in f32: every step of TransformerLens's order
/// either stays inside one block or touches only the embedding/unembedding, so doing the blocks
/// one at a time computes the same weights.
///
/// Weights are changed in place wherever they own their memory: an f32 checkpoint read from
/// disk is processed without allocating a second copy of it (fresh allocations, page-faulted
/// in, were most of the loading time). The tensors handed in are therefore consumed: a caller
/// must not keep its own handles on them. The one shared storage a converter creates, a tied
/// unembedding viewing the embedding, gets its own copy before either is changed.
pub fn process(w: &mut Weights, cfg: &ModelConfig, p: Processing, place: &(dyn Fn(Place, &Tensor) -> Tensor + Sync)) {
    let layer_norm = cfg.norm.kind == NormKind::LayerNorm;
    let f32 = |t: &Tensor| t.to_kind(Kind::Float);
    let process_block = |l: usize, b: &mut BlockWeights| {
        *b = b.map(&f32);
        if p.fold_ln {
            fold_block_norms(b, layer_norm, cfg.shared_norm);
        }
        // Centering a vector that a LayerNorm will centre anyway changes no output; under RMSNorm it
        // would, so TransformerLens skips it there and so do we.
        if p.center_writing_weights && layer_norm {
            center_block_writes(b);
        }
        if p.fold_value_biases {
            fold_value_biases(b, cfg);
        }
        *b = b.map(&|t: &Tensor| place(Place::Block(l), t));
    };
    // Blocks are independent here, and of the embedding and unembedding. An f32 checkpoint's are
    // processed in place on all cores, the ends beside them (their ops are too small for
    // libtorch's own threads to fill the cores); a bf16 or f16 one's block by block, then the
    // ends, so that only one block or the unembedding is ever held in f32.
    let Weights { blocks, w_e, w_pos, w_u, b_u, ln_final, ln_embed } = w;
    let mut ends = move || process_ends(Ends { w_e, w_pos, w_u, b_u, ln_final, ln_embed }, cfg, p, place);
    if blocks.iter().all(|b| b.attn.w_q.kind() == Kind::Float) {
        use rayon::prelude::*;
        rayon::join(|| blocks.par_iter_mut().enumerate().for_each(|(l, b)| process_block(l, b)), ends);
    } else {
        blocks.iter_mut().enumerate().for_each(|(l, b)| process_block(l, b));
        ends();
    }
}

/// The weights outside the blocks.
struct Ends<'a> {
    w_e: &'a mut Tensor,
    w_pos: &'a mut Option<Tensor>,
    w_u: &'a mut Tensor,
    b_u: &'a mut Tensor,
    ln_final: &'a mut NormWeights,
    ln_embed: &'a mut Option<NormWeights>,
}

/// The final norm folded into the unembedding, the embeddings centred, the unembedding centred,
/// each then placed.
fn process_ends(e: Ends, cfg: &ModelConfig, p: Processing, place: &(dyn Fn(Place, &Tensor) -> Tensor + Sync)) {
    let layer_norm = cfg.norm.kind == NormKind::LayerNorm;
    let f32 = |t: &Tensor| t.to_kind(Kind::Float);
    // The unembedding is the largest matrix (d_model × vocab): it is processed in place, in f32,
    // so loading holds one f32 unembedding at a time rather than three.
    *e.w_u = own_f32(e.w_u, e.w_e);
    *e.b_u = own_f32(e.b_u, e.w_e);
    if p.fold_ln {
        fold_norm_into(e.ln_final, vec![(e.w_u, Some(e.b_u))], layer_norm);
    }
    if p.center_writing_weights && layer_norm {
        // In place: the unembedding no longer shares the embedding's storage (own_f32 above).
        *e.w_e = f32(e.w_e);
        center_in_place(e.w_e);
        if let Some(p) = e.w_pos.as_mut() {
            *p = f32(p);
            center_in_place(p);
        }
    }
    // Under a final-logit softcap a constant shift of the logits is no longer harmless, so
    // TransformerLens leaves the unembedding alone there (Gemma 2) and so do we.
    if p.center_unembed && cfg.final_softcap.is_none() {
        center_in_place(e.w_u);
        center_in_place(e.b_u);
    }
    let input = |t: &Tensor| place(Place::Input, t);
    let output = |t: &Tensor| place(Place::Output, t);
    *e.w_e = input(e.w_e);
    *e.w_pos = e.w_pos.as_ref().map(input);
    *e.w_u = output(e.w_u);
    *e.b_u = output(e.b_u);
    *e.ln_final = NormWeights { w: e.ln_final.w.as_ref().map(output), b: e.ln_final.b.as_ref().map(output) };
    *e.ln_embed = e.ln_embed.as_ref().map(|n| NormWeights { w: n.w.as_ref().map(input), b: n.b.as_ref().map(input) });
}

/// `t` in f32, changeable in place without touching `tied` (the embedding): converters give the
/// unembedding storage of its own, but a degenerate shape can make the transpose a view.
fn own_f32(t: &Tensor, tied: &Tensor) -> Tensor {
    match t.kind() {
        Kind::Float if t.data_ptr() == tied.data_ptr() => t.copy(),
        Kind::Float => t.shallow_clone(),
        _ => t.to_kind(Kind::Float),
    }
}

/// Folds a norm's weight (and, for LayerNorm, bias) into the matrices that read its output.
/// `reading` are [.., d_model, out] matrices whose d_model axis is `-2`; their biases [.., out].
fn fold_norm_into(norm: &mut NormWeights, reading: Vec<(&mut Tensor, Option<&mut Tensor>)>, layer_norm: bool) {
    let (Some(nw), nb) = (norm.w.take(), norm.b.take()) else {
        return; // already folded
    };
    for (w, bias) in reading {
        if let (true, Some(bias), Some(nb)) = (layer_norm, bias, nb.as_ref()) {
            // Bias first, with the unscaled weight: (x̂·γ + β)·W = x̂·(γW) + βW. Summed as
            // TransformerLens sums it (broadcast multiply, then sum), not as a vector-matrix
            // product: the same sum in another order moves normalised results on small random
            // fixtures past the regression gate's goldens.
            *bias = &*bias + (&*w * nb.unsqueeze(-1)).sum_dim_intlist(-2, false, None);
        }
        let _ = w.g_mul_(&nw.unsqueeze(-1));
        if layer_norm {
            // The folded norm's output has zero mean over d_model, so the mean of W over d_model
            // contributes nothing; removing it is TransformerLens's canonical form.
            let mean = w.mean_dim(-2, true, None);
            let _ = w.g_sub_(&mean);
        }
    }
}

/// Post-norms (Gemma 2), q/k norms (Qwen3) and the embedding norm (Bloom) are not folded: no
/// linear map reads their output directly.
fn fold_block_norms(b: &mut BlockWeights, layer_norm: bool, shared_norm: bool) {
    let a = &mut b.attn;
    let mut attn_reading = vec![(&mut a.w_q, Some(&mut a.b_q)), (&mut a.w_k, Some(&mut a.b_k)), (&mut a.w_v, Some(&mut a.b_v))];
    let m = &mut b.mlp;
    if layer_norm && m.w_gate.is_some() && m.b_gate.is_none() {
        // The norm's bias reaches the gate as β·W_gate: it needs a bias to land in.
        m.b_gate = Some(m.b_in.zeros_like());
    }
    let mut mlp_reading = vec![(&mut m.w_in, Some(&mut m.b_in))];
    if let Some(g) = m.w_gate.as_mut() {
        mlp_reading.push((g, m.b_gate.as_mut()));
    }
    if shared_norm {
        // One norm feeds attention and the MLP (GPT-J, Phi): fold it into both.
        attn_reading.extend(mlp_reading);
        fold_norm_into(&mut b.ln1, attn_reading, layer_norm);
    } else {
        fold_norm_into(&mut b.ln1, attn_reading, layer_norm);
        fold_norm_into(&mut b.ln2, mlp_reading, layer_norm);
    }
}

/// Removes the mean over the last axis (d_model for every matrix writing to the residual).
fn center_in_place(t: &mut Tensor) {
    let mean = t.mean_dim(-1, true, None);
    let _ = t.g_sub_(&mean);
}

fn center_block_writes(b: &mut BlockWeights) {
    for t in [&mut b.attn.w_o, &mut b.attn.b_o, &mut b.mlp.w_out, &mut b.mlp.b_out] {
        center_in_place(t);
    }
}

/// Attention patterns sum to one over keys, so a constant added to every value vector reaches
/// the output as b_V·W_O: move it into b_O.
fn fold_value_biases(b: &mut BlockWeights, cfg: &ModelConfig) {
    let a = &mut b.attn;
    let b_v = a.b_v.repeat_interleave_self_int(cfg.kv_group() as i64, 0, None);
    a.b_o = &a.b_o + (b_v.unsqueeze(-1) * &a.w_o).sum_dim_intlist([0i64, 1].as_slice(), false, None);
    a.b_v = a.b_v.zeros_like();
}
