//! Attribution patching (AtP): the first-order estimate of every activation-patching cell from one
//! forward and one backward pass on the corrupted run, (clean − corrupted) · ∂metric/∂activation,
//! summed over the feature axis and the axes a cell covers (TransformerLens's Attribution Patching
//! demo). AtP* (Kramár et al. 2024) options: `qk_fix` recomputes the attention softmax exactly for
//! query and key cells; `grad_drop` re-estimates with each layer's gradient path cut.
use std::collections::HashMap;

use tch::{Kind, Tensor};

use crate::analysis::clean_corrupted::CleanCorrupted;
use crate::analysis::patching::{cells_at, Axes, Cell, Target};
use crate::engine::hooks::{Edit, Intervention};
use crate::error::{Error, Result};
use crate::model::hook_point::{HookPoint, Site};
use crate::{Hooks, Input, Model, Stop};

#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct AtpOptions {
    pub qk_fix: bool,
    pub grad_drop: bool,
}

/// One target's estimates: cells in the order of activation patching, per prompt, in raw metric
/// units (the estimated change of the metric from the corrupted run).
pub struct Attribution {
    pub target: Target,
    pub cells: Vec<Cell>,
    /// Each cell's estimates per prompt; empty unless asked for (the metric's per_prompt), as
    /// copying [cells, prompts] off the device was most of the time of a large pattern target.
    pub per_prompt: Vec<Vec<f64>>,
    /// The estimate for the whole prompt set (the mean over prompts, except under GradDrop,
    /// whose absolute values are taken of the prompt-set estimates).
    pub mean: Vec<f64>,
}

/// The post-rotary query and key sites (the ones attention scores are computed from).
pub fn score_sites(model: &Model) -> (Site, Site) {
    if model.cfg.is_rotary() {
        (Site::RotQ, Site::RotK)
    } else {
        (Site::Q, Site::K)
    }
}

/// The clean-run sites attribution needs for `targets`.
pub fn clean_sites(model: &Model, targets: &[Target], opts: AtpOptions) -> Vec<Site> {
    let mut sites: Vec<Site> = targets.iter().map(|t| t.site).collect();
    if opts.qk_fix && targets.iter().any(|t| matches!(t.site, Site::Q | Site::K)) {
        let (q, k) = score_sites(model);
        sites.extend([q, k]);
    }
    sites
}

/// A stop-gradient that keeps the tensor in the graph (with zero gradient), so activations
/// upstream of it still have a (zero) gradient instead of none.
fn stop_gradient(x: &Tensor) -> Result<Tensor> {
    let d = x.detach();
    Ok(&d + (x - &d) * 0.0)
}

/// Corrupted activations and the gradient of Σ_prompts metric at `points`, with the gradient path
/// through the outputs of `cut_layer` (attn_out and mlp_out) stopped when given.
fn forward_backward(
    model: &Model,
    prep: &CleanCorrupted,
    points: &[HookPoint],
    cut_layer: Option<usize>,
) -> Result<(HashMap<HookPoint, Tensor>, HashMap<HookPoint, Tensor>)> {
    let mut hooks = Hooks::capture(points.iter().copied()).with_grad();
    prep.corrupt(&mut hooks);
    if let Some(l) = cut_layer {
        for s in [Site::AttnOut, Site::MlpOut] {
            hooks.add_intervention(HookPoint::Block(l, s), Intervention::new(Edit::Func(Box::new(stop_gradient))));
        }
    }
    let out = model.run(Input::Tokens(&prep.corrupted_tokens), prep.mask.as_ref(), &mut hooks, Stop::FinalNorm)?;
    // Σ over prompts: the gradient at prompt p is that of prompt p's own metric.
    let total = prep.metric.per_row(model, &out).sum(Kind::Float);
    backward(&total, points, &hooks.cache)
}

/// The activations at `points` (detached) and the gradients of `total` there; a point `total`
/// does not depend on gets a zero gradient.
fn backward(
    total: &Tensor,
    points: &[HookPoint],
    cache: &HashMap<HookPoint, Tensor>,
) -> Result<(HashMap<HookPoint, Tensor>, HashMap<HookPoint, Tensor>)> {
    let acts: Vec<Tensor> = points.iter().map(|p| cache[p].shallow_clone()).collect();
    let grads = Tensor::f_run_backward(&[total], &acts, false, false)?;
    let mut g = HashMap::new();
    for (p, t) in points.iter().zip(grads) {
        let t = if t.defined() { t } else { cache[p].zeros_like() };
        g.insert(*p, t);
    }
    let a = points.iter().map(|p| (*p, cache[p].detach())).collect();
    Ok((a, g))
}

/// The per-prompt estimate of every cell of `target` at one layer: [n, cells] in cells_at order.
fn linear_estimate(target: Target, delta_times_grad: &Tensor) -> Tensor {
    let x = delta_times_grad;
    let n = x.size()[0];
    let reduced = match (target.axes, target.site == Site::Pattern) {
        (Axes::LayerPos, _) => x.sum_dim_intlist(-1, false, Kind::Float),
        (Axes::LayerPosHead, _) => x.sum_dim_intlist(-1, false, Kind::Float),
        (Axes::LayerHead, false) => x.sum_dim_intlist(&[1i64, 3][..], false, Kind::Float),
        (Axes::LayerHead, true) => x.sum_dim_intlist(&[2i64, 3][..], false, Kind::Float),
        (Axes::LayerHeadDest, _) => x.sum_dim_intlist(-1, false, Kind::Float),
        (Axes::LayerHeadDestSrc, _) => x.shallow_clone(),
        // Refused when the spec is read (kinds::attribution_patching): a role is a different
        // position in each prompt.
        (Axes::LayerRole | Axes::LayerRoleHead, _) => unreachable!("attribution by role"),
    };
    reduced.reshape([n, -1])
}

/// AtP*'s query/key fix at one layer: the attention pattern recomputed exactly with the clean
/// query (or key) of each cell, then linearised from the pattern on: Σ (P' − P) ⊙ ∂metric/∂P.
fn qk_fixed_estimate(
    model: &Model,
    target: Target,
    q: (&Tensor, &Tensor),
    k: (&Tensor, &Tensor),
    scores: &Tensor,
    pattern: &Tensor,
    grad_pattern: &Tensor,
) -> Result<Tensor> {
    // q.0/k.0 clean, q.1/k.1 corrupted; post-rotary q [n, pos, heads, d_head], k [n, pos, kv_heads, d_head].
    let group = model.cfg.kv_group() as i64;
    let masked = scores.isneginf();
    // Whatever the run added to the scores that depends on positions only (ALiBi) is the same
    // for every cell: recover it from the corrupted run's scores.
    let position_bias = (scores - model.attention_scores(q.1, k.1)).masked_fill(&masked, 0.0);
    // The model's own score function (scale and softcap), that bias, then the run's mask.
    let scores_of = |q: &Tensor, k: &Tensor| {
        (model.attention_scores(q, k) + &position_bias).masked_fill(&masked, f64::NEG_INFINITY)
    };
    let softmax = |s: &Tensor| {
        let p = s.softmax(-1, Kind::Float);
        p.masked_fill(&p.isnan(), 0.0)
    };
    let n = pattern.size()[0];
    let kv = model.cfg.n_kv_heads as i64;
    let to_kv = |x: &Tensor| {
        // [n, heads, ..] -> [n, kv_heads, ..]: sum the query heads each key-value head serves.
        let mut shape = x.size();
        shape[1] = kv;
        shape.insert(2, group);
        x.view(shape.as_slice()).sum_dim_intlist(2, false, Kind::Float)
    };
    let out = match (target.site, target.axes) {
        // A clean query changes only its own row: all rows at once are every cell at once.
        (Site::Q, axes) => {
            let per_row =
                ((softmax(&scores_of(q.0, k.1)) - pattern) * grad_pattern).sum_dim_intlist(-1, false, Kind::Float); // [n, h, dest]
            match axes {
                Axes::LayerPosHead => per_row.permute([0, 2, 1]).reshape([n, -1]),
                _ => per_row.sum_dim_intlist(-1, false, Kind::Float),
            }
        }
        (Site::K, Axes::LayerHead) => {
            let d = ((softmax(&scores_of(q.1, k.0)) - pattern) * grad_pattern).sum_dim_intlist(
                &[2i64, 3][..],
                false,
                Kind::Float,
            );
            to_kv(&d)
        }
        (Site::K, _) => {
            // A clean key at source s changes entry s of every row: the row's softmax in closed
            // form, P'_j = P_j / (1 + c), P'_s = P_s·r / (1 + c) with r = exp(S'_s − S_s) and
            // c = P_s (r − 1), so Σ_j (P'_j − P_j) G_j = c (G_s − Σ_j P_j G_j) / (1 + c).
            let s_new = scores_of(q.1, k.0);
            let r = (&s_new - scores).exp();
            let c = (pattern * (r - 1.0)).masked_fill(&masked, 0.0);
            let a = (pattern * grad_pattern).sum_dim_intlist(-1, true, Kind::Float);
            let per_entry: Tensor = &c * (grad_pattern - a) / (&c + 1.0);
            let per_src = to_kv(&per_entry.sum_dim_intlist(2, false, Kind::Float)); // [n, kv, src]
            per_src.permute([0, 2, 1]).reshape([n, -1])
        }
        _ => return Err(Error::Other(format!("qk_fix applies to q and k, not {}", target.site.name()))),
    };
    Ok(out)
}

/// The activations (and gradients) attribution of `targets` at `layers` reads.
pub fn points_for(model: &Model, targets: &[Target], layers: &[usize], opts: AtpOptions) -> Vec<HookPoint> {
    let (q_site, k_site) = score_sites(model);
    let mut points: Vec<HookPoint> = Vec::new();
    for &l in layers {
        for t in targets {
            points.push(HookPoint::Block(l, t.site));
            if opts.qk_fix && matches!(t.site, Site::Q | Site::K) {
                points.extend([Site::Pattern, Site::AttnScores, q_site, k_site].map(|s| HookPoint::Block(l, s)));
            }
        }
    }
    points.sort_by_key(|p| p.to_string());
    points.dedup();
    points
}

/// One forward and backward pass on the corrupted run: activations and gradients of Σ metric at
/// some points. Attribution runs of a spec share one (made for the union of their points).
pub struct Pass {
    pub acts: HashMap<HookPoint, Tensor>,
    pub grads: HashMap<HookPoint, Tensor>,
}

impl Pass {
    pub fn new(model: &Model, prep: &CleanCorrupted, points: &[HookPoint]) -> Result<Pass> {
        let (acts, grads) = match prep.take_pending_backward(points) {
            // The clean and corrupted runs kept the corrupted forward's graph for this pass.
            Some(kept) => backward(&kept.total, points, &kept.acts)?,
            None => forward_backward(model, prep, points, None)?,
        };
        Ok(Pass { acts, grads })
    }

    fn covers(&self, points: &[HookPoint]) -> bool {
        points.iter().all(|p| self.acts.contains_key(p))
    }
}

/// Estimates for every target at `layers` from a corrupted forward+backward `pass` covering
/// `points_for` them (plus one pass per layer with grad_drop); with `per_prompt`, each cell's
/// estimate per prompt too.
///
/// Over 80 lines because it is the Attribution Patching demo's computation in order (per target:
/// clean − corrupted times the gradient, summed over the axes a cell covers; AtP*'s q/k fix and
/// GradDrop at the step they replace), reading one shared pass.
pub fn attribute_with(
    model: &Model,
    prep: &CleanCorrupted,
    pass: &Pass,
    targets: &[Target],
    layers: &[usize],
    opts: AtpOptions,
    per_prompt: bool,
) -> Result<Vec<Attribution>> {
    let (q_site, k_site) = score_sites(model);
    let needs_qk = |t: &Target| opts.qk_fix && matches!(t.site, Site::Q | Site::K);
    let points = points_for(model, targets, layers, opts);
    if !pass.covers(&points) {
        return Err(Error::Other("the attribution pass does not cover this run's hook points".into()));
    }
    let estimate = |acts: &HashMap<HookPoint, Tensor>,
                    grads: &HashMap<HookPoint, Tensor>,
                    t: Target,
                    l: usize|
     -> Result<Tensor> {
        let at = |s: Site| HookPoint::Block(l, s);
        if needs_qk(&t) {
            let clean = |s: Site| {
                prep.clean.get(&at(s)).ok_or_else(|| Error::Other(format!("{} was not cached on the clean run", at(s))))
            };
            return qk_fixed_estimate(
                model,
                t,
                (clean(q_site)?, &acts[&at(q_site)]),
                (clean(k_site)?, &acts[&at(k_site)]),
                &acts[&at(Site::AttnScores)],
                &acts[&at(Site::Pattern)],
                &grads[&at(Site::Pattern)],
            );
        }
        let clean = prep
            .clean
            .get(&at(t.site))
            .ok_or_else(|| Error::Other(format!("{} was not cached on the clean run", at(t.site))))?;
        Ok(linear_estimate(t, &((clean - &acts[&at(t.site)]) * &grads[&at(t.site)])))
    };
    let (acts, grads) = (&pass.acts, &pass.grads);
    let mut per_target: Vec<Vec<Tensor>> = Vec::new();
    for t in targets {
        per_target.push(layers.iter().map(|&l| estimate(acts, grads, *t, l)).collect::<Result<_>>()?);
    }
    // The prompt-set estimate of each layer's cells, [cells].
    let mut means: Vec<Vec<Tensor>> =
        per_target.iter().map(|v| v.iter().map(|x| x.mean_dim(0, false, Kind::Float)).collect()).collect();
    if opts.grad_drop {
        // GradDrop: Σ_ℓ |AtP with layer ℓ's gradient path cut − AtP| / (L − 1), unsigned; per
        // prompt, and for the prompt set from its (mean) estimates.
        let n_layers = model.cfg.n_layers;
        let zeros = |v: &Vec<Vec<Tensor>>| -> Vec<Vec<Tensor>> {
            v.iter().map(|x| x.iter().map(|t| t.zeros_like()).collect()).collect()
        };
        let (mut spread, mut spread_mean) = (zeros(&per_target), zeros(&means));
        for cut in 0..n_layers {
            let (_, g) = forward_backward(model, prep, &points, Some(cut))?;
            for (ti, t) in targets.iter().enumerate() {
                for (li, &l) in layers.iter().enumerate() {
                    let e = estimate(acts, &g, *t, l)?;
                    spread_mean[ti][li] =
                        &spread_mean[ti][li] + (e.mean_dim(0, false, Kind::Float) - &means[ti][li]).abs();
                    spread[ti][li] = &spread[ti][li] + (e - &per_target[ti][li]).abs();
                }
            }
        }
        let denom = (n_layers.max(2) - 1) as f64;
        let scale = |v: Vec<Vec<Tensor>>| -> Vec<Vec<Tensor>> {
            v.into_iter().map(|x| x.into_iter().map(|t| t / denom).collect()).collect()
        };
        per_target = scale(spread);
        means = scale(spread_mean);
    }
    let seq = prep.seq_len();
    let mut out = Vec::new();
    for ((t, per_layer), mean_layer) in targets.iter().zip(per_target).zip(means) {
        let mut cells = Vec::new();
        let mut by_prompt = Vec::new();
        let mut mean = Vec::new();
        // Every layer's means in one copy off the device (one per layer was a synchronisation
        // each: 32 layers x 10 targets on an 8B model).
        let all_means = if mean_layer.is_empty() {
            Vec::new()
        } else {
            Vec::<f64>::try_from(Tensor::cat(&mean_layer, 0).to_kind(Kind::Double))?
        };
        let mut at = 0;
        for (&l, est) in layers.iter().zip(per_layer) {
            let layer_cells = cells_at(&model.cfg, *t, l, seq);
            let layer_mean = all_means.get(at..at + layer_cells.len()).ok_or_else(|| {
                Error::Other(format!(
                    "{}: {} estimates for {} cells",
                    t.site.name(),
                    all_means.len() - at.min(all_means.len()),
                    layer_cells.len()
                ))
            })?;
            at += layer_cells.len();
            if per_prompt {
                // [cells, n] so each cell's prompts are contiguous.
                let v: Vec<f64> = Vec::try_from(est.tr().contiguous().flatten(0, -1).to_kind(Kind::Double))?;
                let n = prep.n_prompts() as usize;
                by_prompt.extend(v.chunks(n).map(|c| c.to_vec()));
            }
            mean.extend_from_slice(layer_mean);
            cells.extend(layer_cells);
        }
        if at != all_means.len() {
            return Err(Error::Other(format!("{}: {} estimates for {at} cells", t.site.name(), all_means.len())));
        }
        out.push(Attribution { target: *t, cells, per_prompt: by_prompt, mean });
    }
    Ok(out)
}

/// Pearson and Spearman correlation of two equally long series (None with fewer than 2 points
/// or no variance).
pub fn correlations(a: &[f64], b: &[f64]) -> (Option<f64>, Option<f64>) {
    fn pearson(a: &[f64], b: &[f64]) -> Option<f64> {
        let n = a.len() as f64;
        if a.len() < 2 {
            return None;
        }
        let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
        let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
        let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
        let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
        (va > 0.0 && vb > 0.0).then(|| cov / (va * vb).sqrt())
    }
    // Average ranks (ties share the mean of their ranks), as scipy.stats.spearmanr.
    fn ranks(v: &[f64]) -> Vec<f64> {
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.sort_by(|&i, &j| v[i].total_cmp(&v[j]));
        let mut r = vec![0.0; v.len()];
        let mut i = 0;
        while i < idx.len() {
            let mut j = i;
            while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
                j += 1;
            }
            for &k in &idx[i..=j] {
                r[k] = (i + j) as f64 / 2.0;
            }
            i = j + 1;
        }
        r
    }
    (pearson(a, b), pearson(&ranks(a), &ranks(b)))
}

/// The indices of the `k` largest |values|, largest first (ties in index order). Only these are
/// sorted: a pattern target has hundreds of thousands of cells and usually verifies a few.
pub fn largest_first(values: &[f64], k: usize) -> Vec<usize> {
    if k == 0 {
        return Vec::new();
    }
    let by_size = |&i: &usize, &j: &usize| values[j].abs().total_cmp(&values[i].abs()).then(i.cmp(&j));
    let mut order: Vec<usize> = (0..values.len()).collect();
    if k < order.len() {
        order.select_nth_unstable_by(k - 1, by_size);
        order.truncate(k);
    }
    order.sort_by(by_size);
    order
}

#[cfg(test)]
mod tests {
    use super::largest_first;

    #[test]
    fn largest_first_takes_the_k_largest_magnitudes_in_order() {
        let v = [0.5, -3.0, 2.0, 0.0, -2.0, 7.0];
        assert_eq!(largest_first(&v, 0), Vec::<usize>::new());
        assert_eq!(largest_first(&v, 1), vec![5]);
        // |2.0| = |-2.0|: the lower index first, as a stable sort of all cells would give.
        assert_eq!(largest_first(&v, 3), vec![5, 1, 2]);
        assert_eq!(largest_first(&v, 4), vec![5, 1, 2, 4]);
        assert_eq!(largest_first(&v, 10), vec![5, 1, 2, 4, 0, 3]);
    }
}
