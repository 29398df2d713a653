//! The work every patching run of a spec shares: clean and corrupted tokens, the clean cache,
//! the corrupted residual stream entering every layer, and the metric's baselines.
use std::collections::HashMap;

use tch::Tensor;

use crate::analysis::mean;
use crate::analysis::patching::Schedule;
use crate::engine::forward::Prefix;
use crate::engine::hooks::{Edit, Intervention};
use crate::engine::metric::Metric;
use crate::error::{Error, Result};
use crate::model::hook_point::{HookPoint, Site};
use crate::{Hooks, Input, Model, Stop};

/// How the corrupted run differs from the clean one.
pub enum Corrupt {
    /// Other tokens (same length).
    Tokens(Tensor),
    /// The clean tokens with this added to the token embeddings (hook_embed), [batch, pos,
    /// d_model]; `first` is the first position any of it is non-zero.
    EmbedNoise { noise: Tensor, first: i64 },
}

pub struct CleanCorrupted {
    pub clean_tokens: Tensor,
    pub corrupted_tokens: Tensor,
    /// Added to the corrupted run's token embeddings (noise corruption).
    pub corrupt_embed: Option<Tensor>,
    /// Shared attention mask of both batches (None = no padding).
    pub mask: Option<Tensor>,
    pub metric: Metric,
    /// Clean activations at every hook the runs patch.
    pub clean: HashMap<HookPoint, Tensor>,
    /// Corrupted residual entering each layer (index n_layers unused).
    pub corrupted_resid_pre: Vec<Tensor>,
    /// Per-prompt metric on the clean and the corrupted run.
    pub clean_per_prompt: Vec<f64>,
    pub corrupted_per_prompt: Vec<f64>,
    /// Every position before this one holds the same tokens in every clean/corrupted pair, so
    /// under causal attention nothing computed there can differ.
    pub first_diff: i64,
    /// The corrupted run's keys and values before `first_diff`, so patched forwards compute only
    /// the positions from `first_diff` on (None when first_diff is 0).
    pub prefix: Option<Prefix>,
    /// The corrupted run's keys and values at every position, kept for the by-position schedule
    /// (a forward for the cells at position p reuses them before p); None under the others.
    pub corrupted_kv: Option<Prefix>,
    /// Template prompts: each role's position in every row ([role][row], rows = the prompts
    /// repeated per noise sample), read by role cells.
    pub role_positions: Vec<Vec<i64>>,
    /// The corrupted run kept for the attribution pass's backward (when one follows), which
    /// then needs no forward of its own; taken by the first pass it covers.
    pending_backward: std::sync::Mutex<Option<PendingBackward>>,
}

/// A corrupted forward run with its autograd graph: Σ over prompts of the metric, and the
/// activations at the attribution pass's points (in the graph, differentiable).
pub struct PendingBackward {
    pub total: Tensor,
    pub acts: HashMap<HookPoint, Tensor>,
}

impl CleanCorrupted {
    /// Runs the clean and corrupted batches once, caching what the sweeps need.
    pub fn new(
        model: &Model,
        clean_tokens: Tensor,
        corrupt: Corrupt,
        mask: Option<Tensor>,
        metric: Metric,
        sites: &[Site],
    ) -> Result<Self> {
        Self::keeping_gradients(model, clean_tokens, corrupt, mask, metric, sites, &[])
    }

    /// `new`, with the corrupted run also capturing `grad_points` and keeping its autograd graph
    /// (when there are any), so the attribution pass that follows is a backward alone: AtP then
    /// costs one clean forward and one corrupted forward + backward, as TransformerLens's AtP
    /// does, instead of a second corrupted forward.
    ///
    /// Over 80 lines: the clean and the corrupted runs (prefix reuse, noise samples, gradient
    /// capture) and the baselines, which the patching sweeps read together.
    pub fn keeping_gradients(
        model: &Model,
        clean_tokens: Tensor,
        corrupt: Corrupt,
        mask: Option<Tensor>,
        mut metric: Metric,
        sites: &[Site],
        grad_points: &[HookPoint],
    ) -> Result<Self> {
        let (corrupted_tokens, corrupt_embed, noise_first, copies) = match corrupt {
            Corrupt::Tokens(t) => (t, None, None, 1),
            Corrupt::EmbedNoise { noise, first } => {
                let copies = noise.size()[0] / clean_tokens.size()[0].max(1);
                let tiled = clean_tokens.repeat([copies, 1]);
                (tiled, Some(noise.to_device(model.device).to_kind(model.kind)), Some(first), copies)
            }
        };
        // The rows every later pass runs: the prompts once per noise sample.
        let tile = |t: &Tensor| t.repeat(repeat_rows(copies, t.dim()));
        let (clean_rows, mask_rows) = match copies {
            1 => (clean_tokens.shallow_clone(), mask.as_ref().map(Tensor::shallow_clone)),
            _ => (tile(&clean_tokens), mask.as_ref().map(tile)),
        };
        if clean_rows.size() != corrupted_tokens.size() {
            return Err(Error::Other(format!(
                "patching needs clean and corrupted prompts of equal token length: clean {:?} vs corrupted {:?}",
                clean_rows.size(),
                corrupted_tokens.size()
            )));
        }
        let n_layers = model.cfg.n_layers;
        let clean_points: Vec<HookPoint> =
            (0..n_layers).flat_map(|l| sites.iter().map(move |s| HookPoint::Block(l, *s))).collect();
        let mut clean_hooks = Hooks::capture(clean_points.iter().copied());
        let started = std::time::Instant::now();
        // Noise samples are copies of the clean prompts: the clean run is made once per prompt
        // and its activations repeated for every sample (row s·n + p is prompt p).
        let clean_final = model.run(Input::Tokens(&clean_tokens), mask.as_ref(), &mut clean_hooks, Stop::FinalNorm)?;
        let clean_final = if copies > 1 { tile(&clean_final) } else { clean_final };
        if copies > 1 {
            for t in clean_hooks.cache.values_mut() {
                *t = tile(t);
            }
        }
        tracing::debug!(seconds = started.elapsed().as_secs_f64(), captured = clean_points.len(), copies, "clean run");
        metric.set_clean_reference(model, &clean_final);
        let corr_points: Vec<HookPoint> = (0..n_layers).map(|l| HookPoint::Block(l, Site::ResidPre)).collect();
        let key_site = if model.cfg.is_rotary() { Site::RotK } else { Site::K };
        let kv_points: Vec<HookPoint> =
            (0..n_layers).flat_map(|l| [HookPoint::Block(l, key_site), HookPoint::Block(l, Site::V)]).collect();
        let mut corr_hooks = Hooks::capture(corr_points.iter().chain(&kv_points).chain(grad_points).copied());
        let keep_graph = !grad_points.is_empty();
        if keep_graph {
            corr_hooks = corr_hooks.with_grad();
        }
        if let Some(noise) = &corrupt_embed {
            corr_hooks.add_intervention(HookPoint::Embed, Intervention::new(Edit::Add(noise.shallow_clone())));
        }
        let started = std::time::Instant::now();
        let corr_final =
            model.run(Input::Tokens(&corrupted_tokens), mask_rows.as_ref(), &mut corr_hooks, Stop::FinalNorm)?;
        tracing::debug!(seconds = started.elapsed().as_secs_f64(), keep_graph, "corrupted run");
        let values = |t: &Tensor| -> Result<Vec<f64>> {
            Ok(Vec::<f64>::try_from(metric.per_row(model, t).to_kind(tch::Kind::Double))?)
        };
        let clean_per_prompt = values(&clean_final)?;
        let corr_rows = metric.per_row(model, &corr_final);
        let corrupted_per_prompt = Vec::<f64>::try_from(corr_rows.detach().to_kind(tch::Kind::Double))?;
        // Σ over prompts: the gradient at prompt p is that of prompt p's own metric.
        let pending = keep_graph.then(|| PendingBackward {
            total: corr_rows.sum(tch::Kind::Float),
            acts: grad_points.iter().map(|p| (*p, corr_hooks.cache[p].shallow_clone())).collect(),
        });
        // What the sweeps read from the corrupted run carries no graph.
        let mut corr_cache: HashMap<HookPoint, Tensor> =
            corr_hooks.cache.drain().map(|(p, t)| (p, if keep_graph { t.detach() } else { t })).collect();
        let corrupted_resid_pre = corr_points.iter().map(|p| corr_cache.remove(p).expect("captured")).collect();
        let first_diff = noise_first.unwrap_or_else(|| first_difference(&clean_rows, &corrupted_tokens));
        let seq = clean_rows.size()[1];
        // Positions the metric reads are computed, whatever the prefix could skip.
        let mut take = |l: usize, s: Site| corr_cache.remove(&HookPoint::Block(l, s)).expect("captured");
        let keys = (0..n_layers).map(|l| take(l, key_site)).collect();
        let values = (0..n_layers).map(|l| take(l, Site::V)).collect();
        let kv = Prefix { len: seq, keys, values };
        let prefix = shared_prefix_len(first_diff.min(metric.earliest_position(seq)), seq).map(|len| {
            let first = kv.first(len as i64);
            Prefix { len: first.len, keys: contiguous(first.keys), values: contiguous(first.values) }
        });
        let corrupted_kv = (Schedule::for_device(model.device) == Schedule::ByPosition).then_some(kv);
        Ok(CleanCorrupted {
            clean_tokens: clean_rows,
            corrupted_tokens,
            corrupt_embed,
            mask: mask_rows,
            metric,
            clean: clean_hooks.cache,
            corrupted_resid_pre,
            clean_per_prompt,
            corrupted_per_prompt,
            first_diff,
            prefix,
            corrupted_kv,
            role_positions: Vec::new(),
            pending_backward: std::sync::Mutex::new(pending),
        })
    }

    /// The corrupted run's graph for a backward at `points`, if it was kept and captured them
    /// all (taken: a second pass runs its own forward).
    pub fn take_pending_backward(&self, points: &[HookPoint]) -> Option<PendingBackward> {
        let mut pending = self.pending_backward.lock().unwrap_or_else(|e| e.into_inner());
        if pending.as_ref().is_some_and(|p| points.iter().all(|q| p.acts.contains_key(q))) {
            pending.take()
        } else {
            None
        }
    }

    /// Plans the corruption on `hooks` (a corrupted forward from tokens).
    pub fn corrupt(&self, hooks: &mut Hooks) {
        if let Some(noise) = &self.corrupt_embed {
            hooks.add_intervention(HookPoint::Embed, Intervention::new(Edit::Add(noise.shallow_clone())));
        }
    }

    /// The corrupted run's keys and values before position `len` (None for 0): the shared prefix,
    /// or, under the by-position schedule, any length.
    pub fn kv_before(&self, len: i64) -> Option<Prefix> {
        match (&self.prefix, &self.corrupted_kv) {
            _ if len == 0 => None,
            (Some(p), _) if p.len == len => Some(p.first(len)),
            (_, Some(kv)) => Some(kv.first(len)),
            _ => panic!("the corrupted keys and values before position {len} were not kept"),
        }
    }

    pub fn n_prompts(&self) -> i64 {
        self.clean_tokens.size()[0]
    }

    pub fn seq_len(&self) -> i64 {
        self.clean_tokens.size()[1]
    }

    pub fn clean_baseline(&self) -> f64 {
        mean(&self.clean_per_prompt)
    }

    pub fn corrupted_baseline(&self) -> f64 {
        mean(&self.corrupted_per_prompt)
    }
}

fn contiguous(ts: Vec<Tensor>) -> Vec<Tensor> {
    ts.into_iter().map(|t| t.contiguous()).collect()
}

/// Repeat counts that tile a tensor of `dim` dimensions `copies` times along rows.
fn repeat_rows(copies: i64, dim: usize) -> Vec<i64> {
    let mut r = vec![1; dim];
    r[0] = copies;
    r
}

/// How many leading positions the patched forwards take from the corrupted run's keys and values:
/// those before the first difference, when that leaves something to compute and something to
/// reuse (none when the runs differ at position 0 or nowhere). The plan's cost model and the run
/// both ask this one function, so the estimate assumes the prefix exactly when the run uses it.
pub fn shared_prefix_len(first_diff: i64, seq: i64) -> Option<usize> {
    (first_diff > 0 && first_diff < seq).then_some(first_diff as usize)
}

/// The first position at which any clean/corrupted pair differs (seq_len if none does).
pub fn first_difference(a: &Tensor, b: &Tensor) -> i64 {
    let differs = a.ne_tensor(b).any_dims(&[0i64][..], false); // [pos]
    let v: Vec<bool> = Vec::try_from(differs).unwrap_or_default();
    v.iter().position(|d| *d).map(|p| p as i64).unwrap_or(a.size()[1])
}
