//! Ablations: replace a head's output (z), a layer's attention or MLP output, or single neurons
//! with zeros, the mean over a prompt set, or the activations of the corrupted prompts
//! (resample), at all or given positions; then measure the metric, the next-token loss, or the
//! direct logit attribution of the ablated run (knock out, then measure: the backup name movers).
use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::model::hook_point::Site;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AblationMethod {
    Zero,
    /// The mean over the prompt set (or the `dataset` prompts), per position.
    Mean,
    /// The activation of the corrupted prompt.
    Resample,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Measure {
    /// The spec's metric (mean over prompts).
    Metric,
    /// Mean next-token cross-entropy over every real position.
    Loss,
    /// Direct logit attribution per head of the ablated run.
    DirectLogitAttribution,
}

/// What one ablation unit is: a head of z, a whole attn_out/mlp_out, or a neuron of mlp_post.
pub fn unit_axes(site: Site) -> Result<&'static [&'static str]> {
    Ok(match site {
        Site::Z => &["layer", "head"],
        Site::AttnOut | Site::MlpOut => &["layer"],
        Site::MlpPost => &["layer", "neuron"],
        other => {
            return Err(Error::Config(format!(
                "{} cannot be ablated (valid: z, attn_out, mlp_out, mlp_post)",
                other.name()
            )))
        }
    })
}

/// One ablated unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Unit {
    pub layer: usize,
    /// Head of z or neuron of mlp_post; None for a whole layer output.
    pub index: Option<i64>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct AblationSpec {
    pub site: Site,
    pub method: AblationMethod,
    /// Units ablated together; None = each unit of the site in turn (a sweep).
    pub units: Option<Vec<Unit>>,
    /// Ablate together the heads with the largest direct logit attribution on the clean run
    /// (the top name movers, whatever the model): resolved into `units` before running.
    pub top_dla_heads: Option<usize>,
    /// Token positions (None = all).
    pub positions: Option<Vec<i64>>,
    pub measure: Measure,
    /// Prompts the mean is taken over (None = the spec's prompts).
    pub dataset: Option<std::path::PathBuf>,
}

/// Mean next-token cross-entropy of `logits` [b, p, V] predicting `tokens` [b, p], over real
/// (unmasked) positions, per row.
pub fn next_token_loss(logits: &Tensor, tokens: &Tensor, mask: Option<&Tensor>) -> Tensor {
    let seq = tokens.size()[1];
    let logp = logits.narrow(1, 0, seq - 1).log_softmax(-1, Kind::Float);
    let next = tokens.narrow(1, 1, seq - 1).to_device(logits.device());
    let nll = -logp.gather(2, &next.unsqueeze(-1), false).squeeze_dim(-1); // [b, p-1]
    match mask {
        None => nll.mean_dim(1, false, Kind::Float),
        Some(m) => {
            // A prediction counts when the token it predicts from and the one predicted are real.
            let m = m.to_device(logits.device()).to_kind(Kind::Float);
            let w = m.narrow(1, 0, seq - 1) * m.narrow(1, 1, seq - 1);
            (nll * &w).sum_dim_intlist(1, false, Kind::Float) / w.sum_dim_intlist(1, false, Kind::Float)
        }
    }
}

/// Every unit of `site` in a model: each head of z, each layer of attn_out/mlp_out, each neuron
/// of mlp_post, layer-major.
pub fn all_units(cfg: &crate::model::config::ModelConfig, site: Site) -> Vec<Unit> {
    let per_layer: Option<i64> = match site {
        Site::Z => Some(cfg.n_heads as i64),
        Site::MlpPost => Some(cfg.mlp.d_mlp as i64),
        _ => None,
    };
    (0..cfg.n_layers)
        .flat_map(|layer| match per_layer {
            Some(k) => (0..k).map(|i| Unit { layer, index: Some(i) }).collect::<Vec<_>>(),
            None => vec![Unit { layer, index: None }],
        })
        .collect()
}

/// Where the ablation values replace the activation, for `groups.len()` stacked copies of an
/// n-row batch (copy j ablates the units indexed in groups[j]): [copies·n, seq, ...] bool,
/// broadcastable against the activation of `site`.
fn edit_mask(site: Site, act: &[i64], groups: &[Vec<Option<i64>>], positions: Option<&[i64]>) -> Tensor {
    let (n, seq) = (act[0], act[1]);
    // Size of the unit axis (heads or neurons; 1 for whole-layer outputs) and trailing 1s.
    let (units, shape_tail): (i64, Vec<i64>) = match site {
        Site::Z => (act[2], vec![act[2], 1]),
        Site::MlpPost => (act[2], vec![act[2]]),
        _ => (1, vec![1]),
    };
    let rows = groups.len() as i64 * n;
    let mut m = vec![false; (rows * seq * units) as usize];
    for (j, group) in groups.iter().enumerate() {
        for r in 0..n {
            let row = j as i64 * n + r;
            for p in 0..seq {
                if positions.is_some_and(|ps| !ps.contains(&p)) {
                    continue;
                }
                for idx in group {
                    let u = idx.unwrap_or(0);
                    m[((row * seq + p) * units + u) as usize] = true;
                }
            }
        }
    }
    let mut shape = vec![rows, seq];
    shape.extend(shape_tail);
    Tensor::from_slice(&m).view(shape.as_slice())
}

/// What an ablation run measured: per prompt, without ablation and for each ablated cell (each
/// unit in a sweep, or one cell for units ablated together), or the knocked-out run's DLA.
pub struct AblationOutcome {
    pub baseline: Vec<f64>,
    pub cells: Vec<(Vec<Unit>, Vec<f64>)>,
    pub dla: Option<Vec<crate::analysis::activation_cache::Component>>,
    pub forwards: usize,
}

/// The inputs of an ablation: the prompts, the metric, and for resample the corrupted tokens,
/// for a mean over another prompt set that set's tokens.
pub struct AblationInputs<'a> {
    pub tokens: &'a Tensor,
    pub mask: Option<&'a Tensor>,
    pub metric: &'a crate::engine::metric::Metric,
    pub corrupted: Option<&'a Tensor>,
    pub dataset: Option<(&'a Tensor, Option<&'a Tensor>)>,
}

/// How many units of `site` a layer has and what they are called (one unit per layer for a
/// layer-wide site).
pub fn units_per_layer(cfg: &crate::model::config::ModelConfig, site: Site) -> (i64, &'static str) {
    match site {
        Site::Z => (cfg.n_heads as i64, "heads"),
        Site::MlpPost => (cfg.mlp.d_mlp as i64, "neurons"),
        _ => (1, ""),
    }
}

/// Whether `u` is a unit of the model (kinds::ablation checks the spec with it before loading).
pub fn unit_in_range(cfg: &crate::model::config::ModelConfig, site: Site, u: &Unit) -> bool {
    let (max, _) = units_per_layer(cfg, site);
    u.layer < cfg.n_layers && u.index.is_none_or(|i| (0..max).contains(&i))
}

/// Every unit within the model and every position within the prompts (of `seq` tokens).
fn check_units_and_positions(
    cfg: &crate::model::config::ModelConfig,
    spec: &AblationSpec,
    units: &[Unit],
    seq: i64,
) -> Result<()> {
    let (max, what) = units_per_layer(cfg, spec.site);
    if let Some(u) = units.iter().find(|u| !unit_in_range(cfg, spec.site, u)) {
        let unit = match u.index {
            Some(i) => format!("[{}, {i}]", u.layer),
            None => format!("[{}]", u.layer),
        };
        let per_layer = if what.is_empty() { String::new() } else { format!(" of {max} {what}") };
        return Err(Error::Config(format!(
            "unit {unit} is out of range: the model has {} layers{per_layer}",
            cfg.n_layers
        )));
    }
    if let Some(ps) = &spec.positions {
        if let Some(bad) = ps.iter().find(|&&p| p >= seq) {
            return Err(Error::Config(format!("position {bad} is out of range: the prompts have {seq} positions")));
        }
    }
    Ok(())
}

/// The activations that replace each layer's, where they come from other prompts: the
/// corrupted prompts' (resample) or a dataset's (mean over it); None when they come from the
/// clean run itself (zero, mean over the prompts).
fn replacement_cache(
    model: &crate::Model,
    spec: &AblationSpec,
    inp: &AblationInputs<'_>,
    seq: i64,
) -> Result<Option<std::collections::HashMap<crate::model::hook_point::HookPoint, Tensor>>> {
    use crate::model::hook_point::HookPoint;
    use crate::{Hooks, Input, Stop};
    let n_layers = model.cfg.n_layers;
    let point = |l: usize| HookPoint::Block(l, spec.site);
    Ok(match spec.method {
        AblationMethod::Resample => {
            let c = inp.corrupted.ok_or_else(|| Error::Config("resample ablation takes its activations from corrupted prompts: give a [corruption] of kind swap_pairs, prompts or replace_tokens (noise corrupts embeddings, not prompts)".into()))?;
            let mut h = Hooks::capture((0..n_layers).map(point));
            let _ = model.run(Input::Tokens(c), inp.mask, &mut h, Stop::BeforeLayer(n_layers))?;
            Some(h.cache)
        }
        AblationMethod::Mean if inp.dataset.is_some() => {
            let (d, dm) = inp.dataset.expect("checked");
            if d.size()[1] != seq {
                return Err(Error::Config(format!("the mean-ablation dataset has {} token positions and the prompts {seq}: a mean per position needs equal lengths", d.size()[1])));
            }
            let mut h = Hooks::capture((0..n_layers).map(point));
            let _ = model.run(Input::Tokens(d), dm, &mut h, Stop::BeforeLayer(n_layers))?;
            Some(h.cache)
        }
        _ => None,
    })
}

/// The metric (or loss, or per-head DLA) with units replaced: the clean run, then each unit in
/// turn (batched, from the unit's layer) or the units together. Over 80 lines because the sweep
/// and the joint ablation read the clean run's cache and the replacements through the same
/// closures.
pub fn run_ablation(
    model: &crate::Model,
    spec: &AblationSpec,
    inp: &AblationInputs<'_>,
    mut progress: impl FnMut(usize),
) -> Result<AblationOutcome> {
    use crate::engine::hooks::{Edit, Intervention};
    use crate::model::hook_point::HookPoint;
    use crate::{Hooks, Input, Stop};
    let n_layers = model.cfg.n_layers;
    let (n, seq) = (inp.tokens.size()[0], inp.tokens.size()[1]);
    let units = spec.units.clone().unwrap_or_else(|| all_units(&model.cfg, spec.site));
    check_units_and_positions(&model.cfg, spec, &units, seq)?;
    let point = |l: usize| HookPoint::Block(l, spec.site);
    // The clean run: the activations ablated, the residual entering every layer, the baseline.
    let mut clean_hooks = Hooks::capture((0..n_layers).flat_map(|l| [point(l), HookPoint::Block(l, Site::ResidPre)]));
    let measure_of = |out: &Tensor, rows: i64| -> Result<Vec<f64>> {
        let v = match spec.measure {
            Measure::Loss => next_token_loss(
                out,
                &inp.tokens.repeat([rows / n, 1]),
                inp.mask.map(|m| m.repeat([rows / n, 1])).as_ref(),
            ),
            // ln_final's output at every position, or (a sweep's `Stop::LastPosition`) the last.
            _ => inp.metric.per_row(model, out),
        };
        Ok(Vec::try_from(v.to_kind(Kind::Double))?)
    };
    let stop = if spec.measure == Measure::Loss { Stop::Logits } else { Stop::FinalNorm };
    let out = model.run(Input::Tokens(inp.tokens), inp.mask, &mut clean_hooks, stop)?;
    let baseline = measure_of(&out, n)?;
    // The values put in place of each layer's activation, broadcastable to [n, seq, ...].
    let source_cache = replacement_cache(model, spec, inp, seq)?;
    let values = |l: usize| -> Tensor {
        let act = &clean_hooks.cache[&point(l)];
        match spec.method {
            AblationMethod::Zero => act.zeros_like().narrow(0, 0, 1),
            AblationMethod::Mean => {
                source_cache.as_ref().map_or(act, |c| &c[&point(l)]).mean_dim(0, true, Kind::Float).to_kind(act.kind())
            }
            AblationMethod::Resample => source_cache.as_ref().expect("resample cache")[&point(l)].shallow_clone(),
        }
    };
    let mut cells = Vec::new();
    let mut forwards = 0;
    let positions = spec.positions.as_deref();
    if spec.units.is_none() {
        // Sweep: each unit in turn, many per forward, each forward from the unit's layer.
        let budget = crate::analysis::patching::cells_per_forward(&model.cfg, n, seq, model.device);
        let per_forward = if spec.measure == Measure::Loss { (budget / 8).max(1) } else { budget };
        for l in 0..n_layers {
            let layer_units: Vec<Unit> = units.iter().filter(|u| u.layer == l).copied().collect();
            let act_size = clean_hooks.cache[&point(l)].size();
            let v = values(l);
            for chunk in layer_units.chunks(per_forward) {
                let k = chunk.len() as i64;
                let groups: Vec<Vec<Option<i64>>> = chunk.iter().map(|u| vec![u.index]).collect();
                let mask = edit_mask(spec.site, &act_size, &groups, positions).to_device(model.device);
                let source = if v.size()[0] == 1 {
                    v.shallow_clone()
                } else {
                    v.repeat(crate::analysis::patching::repeat_dims(k, v.dim()))
                };
                let mut hooks = Hooks::new().intervene(point(l), Intervention::new(Edit::Where { mask, source }));
                let resid = clean_hooks.cache[&HookPoint::Block(l, Site::ResidPre)].repeat([k, 1, 1]);
                let attn_mask = inp.mask.map(|m| m.repeat([k, 1]));
                let sweep_stop =
                    if stop == Stop::FinalNorm && inp.metric.reads_last_only() { Stop::LastPosition } else { stop };
                let out = model.run(
                    Input::Residual { layer: l, resid: &resid },
                    attn_mask.as_ref(),
                    &mut hooks,
                    sweep_stop,
                )?;
                forwards += 1;
                let vals = measure_of(&out, k * n)?;
                for (j, u) in chunk.iter().enumerate() {
                    cells.push((vec![*u], vals[j * n as usize..(j + 1) * n as usize].to_vec()));
                }
                progress(chunk.len());
            }
        }
        return Ok(AblationOutcome { baseline, cells, dla: None, forwards });
    }
    // Units ablated together: one forward with every layer's units replaced.
    let mut hooks = Hooks::new();
    for l in 0..n_layers {
        let group: Vec<Option<i64>> = units.iter().filter(|u| u.layer == l).map(|u| u.index).collect();
        if group.is_empty() {
            continue;
        }
        let act_size = clean_hooks.cache[&point(l)].size();
        let mask = edit_mask(spec.site, &act_size, &[group], positions).to_device(model.device);
        hooks.add_intervention(point(l), Intervention::new(Edit::Where { mask, source: values(l) }));
    }
    if spec.measure == Measure::DirectLogitAttribution {
        let dla = crate::analysis::activation_cache::direct_logit_attribution(
            model,
            inp.tokens,
            inp.mask,
            inp.metric,
            crate::analysis::activation_cache::DlaOver::Head,
            hooks,
        )?;
        progress(1);
        return Ok(AblationOutcome { baseline, cells, dla: Some(dla), forwards: 1 });
    }
    let out = model.run(Input::Tokens(inp.tokens), inp.mask, &mut hooks, stop)?;
    cells.push((units, measure_of(&out, n)?));
    progress(1);
    Ok(AblationOutcome { baseline, cells, dla: None, forwards: 1 })
}
