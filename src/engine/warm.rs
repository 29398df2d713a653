//! Warming a CUDA device while the model loads. The first use of each kernel in a process costs
//! milliseconds (its module is loaded on first launch, cuBLAS picks and loads a GEMM kernel per
//! shape class, the caching allocator makes its first blocks): on an H200 the clean and corrupted
//! runs of the IOI set on GPT-2-small took 0.29-0.35 s where their arithmetic takes a few
//! milliseconds, and starting CUDA and cuBLAS alone beside the load did not move that. So a
//! miniature of the model itself (one block, zero weights, the run's dtype, processing and batch
//! shape) runs forward, and backward where the spec needs gradients, on a thread beside the load:
//! the same kernels meet the same shape classes there, hidden by the read and processing of the
//! real weights.
use tch::{Device, Kind, Tensor};

use crate::engine::forward::{Input, Stop};
use crate::engine::hooks::Hooks;
use crate::error::Result;
use crate::model::config::{ModelConfig, NormKind, Processing};
use crate::model::weights::{AttnWeights, BlockWeights, MlpWeights, NormWeights, Weights};
use crate::model::{LoadOptions, Model};

/// What the warm-up runs: the token batch of the clean run and whether a backward follows.
pub struct WarmUp {
    pub tokens: Tensor,
    pub mask: Option<Tensor>,
    pub backward: bool,
}

/// Whether warming `device` beside loading `cfg` in `kind` leaves room for the model: the
/// model, the miniature's f32 weights twice over (made, then cast) and its logits must fit in
/// 90% of the device's free memory. A device that cannot say is not warmed.
pub fn fits(cfg: &ModelConfig, kind: Kind, device: Device, run: &WarmUp) -> bool {
    let Device::Cuda(i) = device else { return false };
    let Some(free) = crate::engine::memory::cuda_free_bytes(i) else { return false };
    let (d, v, h, kv, e, m) = (cfg.d_model, cfg.d_vocab, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.mlp.d_mlp);
    let layer = d * e * (2 * h + 2 * kv) + d * m * if cfg.mlp.gated { 3 } else { 2 };
    let ends = 2 * v * d + if cfg.has_pos_embed() { cfg.n_ctx * d } else { 0 };
    let width = if kind == Kind::Float { 4 } else { 2 };
    let model = (cfg.n_layers * layer + ends) * width;
    let miniature = 2 * (layer + ends) * 4;
    let logits = run.tokens.numel() * v * 4;
    ((model + miniature + logits) as f64) < 0.9 * free as f64
}

/// `cfg` cut to its first layer.
fn one_layer(cfg: &ModelConfig) -> ModelConfig {
    let mut c = cfg.clone();
    c.n_layers = 1;
    c.attn_windows.truncate(1);
    c
}

/// Zero weights of `cfg`'s shapes on `device`, in the form TransformerLens processing leaves
/// them: norms that `processing` folds are already folded (absent), so the miniature's forward
/// takes the real model's branches.
fn zero_weights(cfg: &ModelConfig, processing: Processing, device: Device) -> Weights {
    let z = |shape: &[i64]| Tensor::zeros(shape, (Kind::Float, device));
    let (d, v, h, kv, e, m) = (
        cfg.d_model as i64,
        cfg.d_vocab as i64,
        cfg.n_heads as i64,
        cfg.n_kv_heads as i64,
        cfg.d_head as i64,
        cfg.mlp.d_mlp as i64,
    );
    let layer_norm = cfg.norm.kind == NormKind::LayerNorm;
    let norm = |folded: bool| {
        if folded {
            NormWeights { w: None, b: None }
        } else {
            NormWeights { w: Some(z(&[d]) + 1.0), b: layer_norm.then(|| z(&[d])) }
        }
    };
    let folded = processing.fold_ln;
    let blocks = (0..cfg.n_layers)
        .map(|_| BlockWeights {
            ln1: norm(folded),
            attn: AttnWeights {
                w_q: z(&[h, d, e]),
                b_q: z(&[h, e]),
                w_k: z(&[kv, d, e]),
                b_k: z(&[kv, e]),
                w_v: z(&[kv, d, e]),
                b_v: z(&[kv, e]),
                w_o: z(&[h, e, d]),
                b_o: z(&[d]),
                q_norm: cfg.qk_norm.then(|| z(&[e]) + 1.0),
                k_norm: cfg.qk_norm.then(|| z(&[e]) + 1.0),
            },
            // A shared-norm block (GPT-J, Phi) has no ln2 at all.
            ln2: norm(folded || cfg.shared_norm),
            mlp: MlpWeights {
                w_in: z(&[d, m]),
                b_in: z(&[m]),
                w_gate: cfg.mlp.gated.then(|| z(&[d, m])),
                b_gate: (cfg.mlp.gated && folded && layer_norm).then(|| z(&[m])),
                w_out: z(&[m, d]),
                b_out: z(&[d]),
            },
            ln1_post: cfg.post_norms.then(|| norm(false)),
            ln2_post: cfg.post_norms.then(|| norm(false)),
        })
        .collect();
    Weights {
        w_e: z(&[v, d]),
        ln_embed: cfg.embed_norm.then(|| norm(false)),
        w_pos: cfg.has_pos_embed().then(|| z(&[cfg.n_ctx as i64, d])),
        blocks,
        ln_final: norm(folded),
        w_u: z(&[d, v]),
        b_u: z(&[v]),
    }
}

/// The one-layer miniature of `cfg` with zero weights, loaded as `opts` says.
pub fn miniature(cfg: &ModelConfig, opts: &LoadOptions) -> Result<Model> {
    let cfg = one_layer(cfg);
    let weights = zero_weights(&cfg, opts.processing, opts.device);
    // The weights are already in processed form: processing them again would fold nothing, and
    // the model records the processing asked for.
    let mut model = Model::from_weights(
        cfg,
        weights,
        &LoadOptions { processing: Processing::NONE, split: Vec::new(), ..opts.clone() },
    )?;
    model.processing = opts.processing;
    Ok(model)
}

/// Runs the one-layer miniature of `cfg` on `opts.device` as `run` says, and returns its
/// seconds. Its results are discarded; only the device's warmed state remains.
pub fn warm_up(cfg: &ModelConfig, opts: &LoadOptions, run: WarmUp) -> Result<f64> {
    let started = std::time::Instant::now();
    let model = miniature(cfg, opts)?;
    let tokens = run.tokens.to_device(opts.device);
    let mask = run.mask.as_ref().map(|m| m.to_device(opts.device));
    let points = model.hook_points();
    let mut hooks = Hooks::capture(points.iter().copied());
    if run.backward {
        hooks = hooks.with_grad();
    }
    let logits = model.run(Input::Tokens(&tokens), mask.as_ref(), &mut hooks, Stop::Logits)?;
    let total = logits.select(1, -1).log_softmax(-1, Kind::Float).sum(Kind::Float);
    if run.backward {
        let acts: Vec<Tensor> = points.iter().filter_map(|p| hooks.cache.get(p).map(Tensor::shallow_clone)).collect();
        let _ = Tensor::f_run_backward(&[&total], &acts, false, false)?;
    }
    // And a forward that captures nothing, as the sweeps run: attention's fused kernel.
    let _guard = tch::no_grad_guard();
    let last = model.run(Input::Tokens(&tokens), mask.as_ref(), &mut Hooks::new(), Stop::LastPosition)?;
    let _ = (total.double_value(&[]), last.sum(Kind::Float).double_value(&[]));
    Ok(started.elapsed().as_secs_f64())
}
