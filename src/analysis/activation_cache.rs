//! Reading a cached run the way TransformerLens's ActivationCache does: the logit lens
//! (accumulated_resid with the final norm recomputed per component) and direct logit attribution
//! (decompose_resid / stack_head_results / stack_neuron_results through apply_ln_to_stack and
//! logit_attrs), along each prompt's answer direction at the last position.
use tch::{Kind, Tensor};

use crate::engine::metric::{Metric, MetricKind};
use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::model::config::NormKind;
use crate::model::hook_point::{HookPoint, NormHook, Site};
use crate::{Hooks, Input, Model, Stop};

/// One labelled component with its value per prompt.
#[derive(Debug, Clone)]
pub struct Component {
    pub label: String,
    pub hook: String,
    pub layer: Option<usize>,
    pub head: Option<i64>,
    pub neuron: Option<i64>,
    pub per_prompt: Vec<f64>,
}

impl Component {
    pub fn mean(&self) -> f64 {
        crate::analysis::mean(&self.per_prompt)
    }
}

/// One of the logit lens's top-k tokens at one label, prompt and position.
#[derive(Debug, Clone)]
pub struct TopToken {
    pub component: usize,
    pub prompt: usize,
    pub pos: i64,
    pub rank: usize,
    pub token_id: i64,
    pub prob: f64,
}

/// Each prompt's answer direction in the residual stream, [n, d_model]: W_U[:, correct] −
/// W_U[:, incorrect] for a logit or probability difference, W_U[:, correct] otherwise (b_U
/// excluded, as logit_attrs); a token set's direction is the mean of its columns. (kl_divergence
/// has none: the spec refuses runs that read one with it.)
pub fn answer_directions(model: &Model, metric: &Metric) -> Tensor {
    // In f32 whatever the run dtype: every value reported from it accumulates in f32.
    let col = |sets: &[Vec<i64>]| {
        let dirs: Vec<Tensor> = sets
            .iter()
            .map(|s| {
                let cols = model.weights.unembed_columns(&Tensor::from_slice(s).to_device(model.device));
                cols.to_kind(Kind::Float).mean_dim(0, false, Kind::Float)
            })
            .collect();
        Tensor::stack(&dirs, 0)
    };
    match metric.kind {
        MetricKind::LogitDiff | MetricKind::ProbDiff => col(&metric.correct) - col(&metric.incorrect),
        MetricKind::Logprob | MetricKind::Prob | MetricKind::KlDivergence => col(&metric.correct),
    }
}

fn rows_dot(x: &Tensor, dir: &Tensor) -> Result<Vec<f64>> {
    Ok(Vec::<f64>::try_from((x * dir).sum_dim_intlist(-1, false, None).to_kind(Kind::Double))?)
}

/// Where the logit lens reports its top-k tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LensPositions {
    Last,
    All,
}

/// The logit lens's components: (label, hook point, layer), in TransformerLens's order.
pub fn lens_components(model: &Model, incl_mid: bool) -> Vec<(String, HookPoint, usize)> {
    let n_layers = model.cfg.n_layers;
    let mut labelled = Vec::new();
    for l in 0..n_layers {
        labelled.push((format!("{l}_pre"), HookPoint::Block(l, Site::ResidPre), l));
        if incl_mid && !model.cfg.parallel_block {
            labelled.push((format!("{l}_mid"), HookPoint::Block(l, Site::ResidMid), l));
        }
    }
    labelled.push(("final_post".into(), HookPoint::Block(n_layers - 1, Site::ResidPost), n_layers));
    labelled
}

/// The logit lens from a run's cache (holding at least `lens_components`): every accumulated
/// residual ("{l}_pre", "{l}_mid" with `incl_mid`, "final_post") through ln_final with its own
/// statistics, projected on the answer direction at the last position; and with `top_k` > 0 the
/// most probable next tokens at `positions`.
pub fn logit_lens_from(
    model: &Model,
    cache: &HashMap<HookPoint, Tensor>,
    metric: &Metric,
    incl_mid: bool,
    top_k: usize,
    positions: LensPositions,
) -> Result<(Vec<Component>, Vec<TopToken>)> {
    let labelled = lens_components(model, incl_mid);
    let dir = answer_directions(model, metric);
    let mut components = Vec::new();
    let mut top = Vec::new();
    for (ci, (label, point, layer)) in labelled.iter().enumerate() {
        let resid = cache.get(point).ok_or_else(|| Error::Other(format!("{point} was not cached")))?;
        let seq = resid.size()[1];
        let normed = model.final_norm(resid)?; // [n, seq, d]
        components.push(Component {
            label: label.clone(),
            hook: point.to_string(),
            layer: Some(*layer),
            head: None,
            neuron: None,
            per_prompt: rows_dot(&normed.select(1, -1), &dir)?,
        });
        if top_k == 0 {
            continue;
        }
        let first = if positions == LensPositions::Last { seq - 1 } else { 0 };
        let probs = model.unembed(&normed.narrow(1, first, seq - first)).softmax(-1, Kind::Float);
        let (p, ix) = probs.topk(top_k as i64, -1, true, true); // [n, positions, k]
        let p: Vec<f64> = Vec::try_from(p.flatten(0, -1).to_kind(Kind::Double))?;
        let ix: Vec<i64> = Vec::try_from(ix.flatten(0, -1))?;
        let npos = (seq - first) as usize;
        for (j, (prob, id)) in p.iter().zip(&ix).enumerate() {
            let (prompt, rest) = (j / (npos * top_k), j % (npos * top_k));
            top.push(TopToken {
                component: ci,
                prompt,
                pos: first + (rest / top_k) as i64,
                rank: rest % top_k,
                token_id: *id,
                prob: *prob,
            });
        }
    }
    Ok((components, top))
}

/// What direct logit attribution decomposes the final residual into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DlaOver {
    /// embed, pos_embed, {l}_attn_out, {l}_mlp_out (decompose_resid).
    Layer,
    /// L{l}H{h}: each head's z·W_O, without b_O (stack_head_results).
    Head,
    /// L{l}N{n}: each neuron's post-activation times its W_out row (stack_neuron_results).
    Neuron,
}

/// The activations direct logit attribution over `over` reads.
pub fn dla_points(model: &Model, over: DlaOver) -> Vec<HookPoint> {
    let per_layer: Vec<Site> = match over {
        DlaOver::Layer => vec![Site::AttnOut, Site::MlpOut],
        DlaOver::Head => vec![Site::Z],
        DlaOver::Neuron => vec![Site::MlpPost],
    };
    let mut points = vec![HookPoint::LnFinal(NormHook::Scale), HookPoint::Embed, HookPoint::PosEmbed];
    points.extend((0..model.cfg.n_layers).flat_map(|l| per_layer.iter().map(move |s| HookPoint::Block(l, *s))));
    points
}

/// Direct logit attribution of the run `hooks` describes (interventions in it, e.g. ablations,
/// apply), at the last position.
pub fn direct_logit_attribution(
    model: &Model,
    tokens: &Tensor,
    mask: Option<&Tensor>,
    metric: &Metric,
    over: DlaOver,
    mut hooks: Hooks,
) -> Result<Vec<Component>> {
    hooks.add_captures(dla_points(model, over));
    let _ = model.run(Input::Tokens(tokens), mask, &mut hooks, Stop::FinalNorm)?;
    dla_from(model, &hooks.cache, metric, over)
}

/// Direct logit attribution from a run's cache (holding at least `dla_points`). Each component
/// is normalised as apply_ln_to_stack: centred for LayerNorm models, divided by the run's
/// ln_final scale of that prompt.
///
/// Over 80 lines: decompose_resid, stack_head_results and stack_neuron_results, one branch each,
/// sharing the scale and answer direction computed first.
pub fn dla_from(
    model: &Model,
    cache: &HashMap<HookPoint, Tensor>,
    metric: &Metric,
    over: DlaOver,
) -> Result<Vec<Component>> {
    let n_layers = model.cfg.n_layers;
    let scale_point = HookPoint::LnFinal(NormHook::Scale);
    // Everything meets on the output device (a model split by layers caches each layer on its own).
    let last = |p: HookPoint| cache.get(&p).map(|t| t.select(1, -1).to_device(model.device).to_kind(Kind::Float));
    let missing = |p: HookPoint| Error::Other(format!("{p} was not cached"));
    let scale = last(scale_point).ok_or_else(|| missing(scale_point))?; // [n, 1]
    let n = scale.size()[0] as usize;
    let dir = answer_directions(model, metric);
    // (x - mean x)·d = x·(d - mean d): centre the direction once instead of every component.
    let dir = if model.cfg.norm.kind == NormKind::LayerNorm { &dir - dir.mean_dim(-1, true, None) } else { dir };
    let dir = dir / &scale; // [n, d]
    let mut out = Vec::new();
    let mut push = |label: String,
                    hook: HookPoint,
                    layer: Option<usize>,
                    head: Option<i64>,
                    neuron: Option<i64>,
                    per_prompt: Vec<f64>| {
        out.push(Component { label, hook: hook.to_string(), layer, head, neuron, per_prompt });
    };
    match over {
        DlaOver::Layer => {
            push(
                "embed".into(),
                HookPoint::Embed,
                None,
                None,
                None,
                rows_dot(&last(HookPoint::Embed).ok_or_else(|| missing(HookPoint::Embed))?, &dir)?,
            );
            if let Some(pe) = last(HookPoint::PosEmbed) {
                push("pos_embed".into(), HookPoint::PosEmbed, None, None, None, rows_dot(&pe, &dir)?);
            }
            for l in 0..n_layers {
                for (site, name) in [(Site::AttnOut, "attn_out"), (Site::MlpOut, "mlp_out")] {
                    let p = HookPoint::Block(l, site);
                    push(
                        format!("{l}_{name}"),
                        p,
                        Some(l),
                        None,
                        None,
                        rows_dot(&last(p).ok_or_else(|| missing(p))?, &dir)?,
                    );
                }
            }
        }
        DlaOver::Head => {
            for l in 0..n_layers {
                let z = last(HookPoint::Block(l, Site::Z)).ok_or_else(|| missing(HookPoint::Block(l, Site::Z)))?; // [n, h, e]
                                                                                                                  // Each head's direction through W_O: [h, e, d]·[n, d] -> [n, h, e].
                let through = Tensor::einsum(
                    "hed,nd->nhe",
                    &[&model.weights.blocks[l].attn.w_o.to_device(model.device).to_kind(Kind::Float), &dir],
                    None::<&[i64]>,
                );
                let per_head = (z * through).sum_dim_intlist(-1, false, None).to_kind(Kind::Double); // [n, h]
                for h in 0..model.cfg.n_heads as i64 {
                    push(
                        format!("L{l}H{h}"),
                        HookPoint::Block(l, Site::Result),
                        Some(l),
                        Some(h),
                        None,
                        Vec::try_from(per_head.select(1, h))?,
                    );
                }
            }
        }
        DlaOver::Neuron => {
            for l in 0..n_layers {
                let post = last(HookPoint::Block(l, Site::MlpPost))
                    .ok_or_else(|| missing(HookPoint::Block(l, Site::MlpPost)))?; // [n, m]
                let through =
                    dir.matmul(&model.weights.blocks[l].mlp.w_out.tr().to_device(model.device).to_kind(Kind::Float)); // [n, m]
                                                                                                                      // Transposed to [m, n] so each neuron's prompts are contiguous.
                let per_neuron: Vec<f64> =
                    Vec::try_from((post * through).tr().contiguous().flatten(0, -1).to_kind(Kind::Double))?;
                for (k, v) in per_neuron.chunks(n).enumerate() {
                    push(
                        format!("L{l}N{k}"),
                        HookPoint::Block(l, Site::MlpPost),
                        Some(l),
                        None,
                        Some(k as i64),
                        v.to_vec(),
                    );
                }
            }
        }
    }
    Ok(out)
}
