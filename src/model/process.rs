//! TransformerLens's load-time weight processing, in its order and in f32:
//! fold_ln → center_writing_weights → center_unembed → fold_value_biases.
//! Each step leaves the model computing the same function (up to a constant per position in the
//! logits for center_unembed); what changes is the coordinate system researchers read hooks in.
use tch::{Device, Kind, Tensor};

use crate::model::config::{ModelConfig, NormKind, Processing};
use crate::model::weights::{BlockWeights, NormWeights, Weights};

/// Where a finished weight goes: a block's device, the embedding's or the output side's.
#[derive(Debug, Clone, Copy)]
pub enum Place {
    Block(usize),
    Input,
    Output,
}

/// Processes the weights in f32, each on the device `device` names for its place, and casts every
/// finished tensor to `kind`. It goes block by block — each block upcast, processed, cast —
/// so a bf16 checkpoint is never held whole in f32: every step of TransformerLens's order
/// either stays inside one block or touches only the embedding/unembedding, so doing the blocks
/// one at a time computes the same weights.
///
/// Weights are changed in place wherever they own their memory: an f32 checkpoint read from
/// disk is processed without allocating a second copy of it (fresh allocations, page-faulted
/// in, were most of the loading time). The tensors handed in are therefore consumed: a caller
/// must not keep its own handles on them. The one shared storage a converter creates, a tied
/// unembedding viewing the embedding, gets its own copy before either is changed.
///
/// Each weight is processed on the device it will live on (`device`): a half-precision
/// checkpoint bound for a GPU crosses to it in its stored dtype and is upcast and processed
/// there, rather than upcast and processed block by block on the host (10.5 s of the 27 s load
/// of an 8B bf16 checkpoint on an H200 machine, the GPU idle).
pub fn process(
    w: &mut Weights,
    cfg: &ModelConfig,
    p: Processing,
    device: &(dyn Fn(Place) -> Device + Sync),
    kind: Kind,
) {
    let layer_norm = cfg.norm.kind == NormKind::LayerNorm;
    let process_block = |l: usize, b: &mut BlockWeights| {
        let on = device(Place::Block(l));
        contiguous_mlp(b, on);
        *b = b.map(&|t: &Tensor| t.to_device(on).to_kind(Kind::Float));
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
        *b = b.map(&|t: &Tensor| t.to_kind(kind));
    };
    // Blocks are independent here, and of the embedding and unembedding. An f32 checkpoint's are
    // processed in place on all cores, the ends beside them (their ops are too small for
    // libtorch's own threads to fill the cores); a bf16 or f16 one's block by block, then the
    // ends, so that only one block or the unembedding is ever held in f32.
    let Weights { blocks, w_e, w_pos, w_u, b_u, ln_final, ln_embed } = w;
    {
        // The host's share of `contiguous_mlp` on all cores first: in the block-by-block path
        // below it would run on one.
        use rayon::prelude::*;
        blocks
            .par_iter_mut()
            .enumerate()
            .filter(|(l, _)| device(Place::Block(*l)) == Device::Cpu)
            .for_each(|(_, b)| contiguous_mlp(b, Device::Cpu));
    }
    let mut ends = move || process_ends(Ends { w_e, w_pos, w_u, b_u, ln_final, ln_embed }, cfg, p, device, kind);
    if blocks.iter().all(|b| b.attn.w_q.kind() == Kind::Float) {
        use rayon::prelude::*;
        rayon::join(|| blocks.par_iter_mut().enumerate().for_each(|(l, b)| process_block(l, b)), ends);
    } else {
        blocks.iter_mut().enumerate().for_each(|(l, b)| process_block(l, b));
        ends();
    }
}

/// The MLP matrices of nn.Linear checkpoints arrive as transposed views (`linear_t`): made
/// contiguous on their device `on`, in their stored dtype, before anything reads them in order
/// (the folds and the centring sum over their rows). A no-op for those already contiguous.
fn contiguous_mlp(b: &mut BlockWeights, on: Device) {
    for t in [&mut b.mlp.w_in, &mut b.mlp.w_out].into_iter().chain(b.mlp.w_gate.as_mut()) {
        *t = t.to_device(on).contiguous();
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
/// each then cast to `kind` on its device.
fn process_ends(e: Ends, cfg: &ModelConfig, p: Processing, device: &(dyn Fn(Place) -> Device + Sync), kind: Kind) {
    let layer_norm = cfg.norm.kind == NormKind::LayerNorm;
    let (input, output) = (device(Place::Input), device(Place::Output));
    let f32 = |t: &Tensor| t.to_device(input).to_kind(Kind::Float);
    // The output side moves first, in its stored dtype. A tied unembedding that crosses to
    // another device is a copy there, so no longer the embedding's storage.
    let on_output = |t: &mut Tensor| *t = t.to_device(output);
    on_output(e.w_u);
    on_output(e.b_u);
    if let Some(w) = e.ln_final.w.as_mut() {
        on_output(w);
    }
    if let Some(b) = e.ln_final.b.as_mut() {
        on_output(b);
    }
    // The unembedding is the largest matrix (d_model × vocab): it is made f32 and given storage
    // of its own (a tied one shares the embedding's) and has the final norm folded in one band
    // of vocabulary columns at a time, on all cores, while the band is in cache. Whole, each
    // step was a pass over 154 MB for GPT-2, and the bias fold's broadcast product a fresh
    // 154 MB temporary.
    let norm = if p.fold_ln { (e.ln_final.w.take(), e.ln_final.b.take()) } else { (None, None) };
    (*e.w_u, *e.b_u) = unembed_folded(e.w_u, e.b_u, e.w_e, norm, layer_norm);
    if p.center_writing_weights && layer_norm {
        // In place: the unembedding no longer shares the embedding's storage (unembed_folded above).
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
    let to_input = |t: &Tensor| t.to_device(input).to_kind(kind);
    let to_output = |t: &Tensor| t.to_device(output).to_kind(kind);
    *e.w_e = to_input(e.w_e);
    *e.w_pos = e.w_pos.as_ref().map(to_input);
    *e.w_u = to_output(e.w_u);
    *e.b_u = to_output(e.b_u);
    *e.ln_final = NormWeights { w: e.ln_final.w.as_ref().map(to_output), b: e.ln_final.b.as_ref().map(to_output) };
    *e.ln_embed =
        e.ln_embed.as_ref().map(|n| NormWeights { w: n.w.as_ref().map(to_input), b: n.b.as_ref().map(to_input) });
}

/// Vocabulary columns per band of the unembedding: 1024 × d_model f32 is 3 MB at GPT-2's width.
const UNEMBED_BAND: i64 = 1024;

/// The unembedding and its bias in f32, in storage of their own (never the tied embedding's,
/// which is centred separately), with the final norm `(weight, bias)` folded in when given.
/// Column bands are independent in every step here, and each step computes every column exactly
/// as on the whole matrix, so the result is bit-identical to folding it whole.
fn unembed_folded(
    w_u: &Tensor,
    b_u: &Tensor,
    tied: &Tensor,
    norm: (Option<Tensor>, Option<Tensor>),
    layer_norm: bool,
) -> (Tensor, Tensor) {
    use rayon::prelude::*;
    let fresh = |t: &Tensor| t.kind() != Kind::Float || t.data_ptr() == tied.data_ptr();
    let (w, copy_w) = if fresh(w_u) { (empty_f32_like(w_u), true) } else { (w_u.shallow_clone(), false) };
    // The bias is small (one number per token) and folded in place: always a copy of its own.
    let b = b_u.to_kind(Kind::Float).copy();
    let vocab = w.size()[1];
    // Bands are for the host's caches and cores; a GPU takes the matrix whole.
    let band = if w.device().is_cuda() { vocab.max(1) } else { UNEMBED_BAND };
    let bands: Vec<_> = (0..vocab)
        .step_by(band as usize)
        .map(|s| {
            let n = band.min(vocab - s);
            let src = copy_w.then(|| w_u.narrow(1, s, n));
            let f = |t: &Option<Tensor>| t.as_ref().map(Tensor::shallow_clone);
            (w.narrow(1, s, n), b.narrow(0, s, n), src, f(&norm.0), f(&norm.1))
        })
        .collect();
    bands.into_par_iter().for_each(|(mut w, mut b, src, nw, nb)| {
        if let Some(src) = src {
            w.copy_(&src);
        }
        if let Some(nw) = nw {
            fold_norm_columns(&mut w, Some(&mut b), &nw, nb.as_ref(), layer_norm);
        }
    });
    (w, b)
}

/// An uninitialised f32 tensor with `t`'s shape and, when `t` is a transposed matrix, its
/// layout: a band of the unembedding's columns then stays a band of rows of the checkpoint's
/// [vocab, d_model] storage.
fn empty_f32_like(t: &Tensor) -> Tensor {
    let opts = (Kind::Float, t.device());
    if t.dim() == 2 && !t.is_contiguous() && t.tr().is_contiguous() {
        Tensor::empty(t.tr().size(), opts).tr()
    } else {
        Tensor::empty(t.size(), opts)
    }
}

/// Folds a norm's weight (and, for LayerNorm, bias) into the matrices that read its output.
/// `reading` are [.., d_model, out] matrices whose d_model axis is `-2`; their biases [.., out].
fn fold_norm_into(norm: &mut NormWeights, reading: Vec<(&mut Tensor, Option<&mut Tensor>)>, layer_norm: bool) {
    let (Some(nw), nb) = (norm.w.take(), norm.b.take()) else {
        return; // already folded
    };
    for (w, bias) in reading {
        fold_norm_columns(w, bias, &nw, nb.as_ref(), layer_norm);
    }
}

/// Folds norm weight `nw` and bias `nb` into `w` and its bias, both in place (converters give
/// every bias storage of its own). Every output column is computed on its own, so `w` may be
/// any band of a matrix's columns.
fn fold_norm_columns(w: &mut Tensor, bias: Option<&mut Tensor>, nw: &Tensor, nb: Option<&Tensor>, layer_norm: bool) {
    if let (true, Some(bias), Some(nb)) = (layer_norm, bias, nb) {
        // Bias first, with the unscaled weight: (x̂·γ + β)·W = x̂·(γW) + βW. Summed as
        // TransformerLens sums it (broadcast multiply, then sum), not as a vector-matrix
        // product: the same sum in another order moves normalised results on small random
        // fixtures past the regression gate's goldens.
        let _ = bias.g_add_(&(&*w * nb.unsqueeze(-1)).sum_dim_intlist(-2, false, None));
    }
    let _ = w.g_mul_(&nw.unsqueeze(-1));
    if layer_norm {
        // The folded norm's output has zero mean over d_model, so the mean of W over d_model
        // contributes nothing; removing it is TransformerLens's canonical form.
        let mean = w.mean_dim(-2, true, None);
        let _ = w.g_sub_(&mean);
    }
}

/// Post-norms (Gemma 2), q/k norms (Qwen3) and the embedding norm (Bloom) are not folded: no
/// linear map reads their output directly.
fn fold_block_norms(b: &mut BlockWeights, layer_norm: bool, shared_norm: bool) {
    let a = &mut b.attn;
    let mut attn_reading =
        vec![(&mut a.w_q, Some(&mut a.b_q)), (&mut a.w_k, Some(&mut a.b_k)), (&mut a.w_v, Some(&mut a.b_v))];
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
