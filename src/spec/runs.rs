//! Resolving one [[run]] table: its kind and the options of that kind, every problem reported
//! with its line, key, the bad value and what is valid.
use std::path::Path;

use toml::Spanned;

use crate::experiments::ablation::{unit_axes, AblationMethod, AblationSpec, Measure, Unit};
use crate::experiments::activation_patching::{Axes, Target};
use crate::experiments::attribution::AtpOptions;
use crate::experiments::cache_analysis::{DlaOver, LensPositions};
use crate::experiments::head_scores::{DetectOptions, Detection, ErrorMeasure};
use crate::model::hook_point::{nearest, Site};
use crate::spec::raw::RawRun;
use crate::spec::resolve::Ctx;

pub const RUN_KINDS: &[&str] = &["activation_patching", "attribution_patching", "logit_lens", "direct_logit_attribution", "head_scores", "ablation"];

const PATCH_HOOKS: &[&str] = &["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z", "q", "k", "v", "pattern", "block_every", "all_pos_every", "by_pos_every"];

/// Where head_scores reads attention from.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadSource {
    /// The spec's clean prompts, scored with head_detector's patterns.
    Prompts,
    /// The Exploratory Analysis demo: `batch` rows of `seq_len` random tokens in [lo, hi),
    /// repeated twice, scored by attention stripes.
    RepeatedRandom { seq_len: i64, batch: i64, seed: u64, token_range: Option<(i64, i64)> },
}

#[derive(Debug, Clone, serde::Serialize)]
pub enum RunKind {
    ActivationPatching { targets: Vec<(Site, Axes)> },
    AttributionPatching { targets: Vec<(Site, Axes)>, options: AtpOptions, verify_top: usize },
    LogitLens { incl_mid: bool, top_k: usize, top_k_at: LensPositions },
    DirectLogitAttribution { over: DlaOver },
    HeadScores { detections: Vec<(String, Detection)>, options: DetectOptions, source: HeadSource },
    Ablation(AblationSpec),
}

impl RunKind {
    pub fn name(&self) -> &'static str {
        match self {
            RunKind::ActivationPatching { .. } => "activation_patching",
            RunKind::AttributionPatching { .. } => "attribution_patching",
            RunKind::LogitLens { .. } => "logit_lens",
            RunKind::DirectLogitAttribution { .. } => "direct_logit_attribution",
            RunKind::HeadScores { .. } => "head_scores",
            RunKind::Ablation(_) => "ablation",
        }
    }

    /// Whether the run reads the spec's prompts (repeated random tokens need none).
    pub fn needs_prompts(&self) -> bool {
        !matches!(self, RunKind::HeadScores { source: HeadSource::RepeatedRandom { .. }, .. })
    }

    /// Whether the run needs corrupted prompts.
    pub fn needs_corruption(&self) -> bool {
        match self {
            RunKind::ActivationPatching { .. } | RunKind::AttributionPatching { .. } => true,
            RunKind::Ablation(a) => a.method == AblationMethod::Resample,
            _ => false,
        }
    }

    /// Whether the run reads the metric's answers.
    pub fn needs_answers(&self) -> bool {
        match self {
            RunKind::HeadScores { .. } => false,
            RunKind::Ablation(a) => a.measure != Measure::Loss,
            _ => true,
        }
    }

    pub fn patch_targets(&self) -> Option<&[(Site, Axes)]> {
        match self {
            RunKind::ActivationPatching { targets } | RunKind::AttributionPatching { targets, .. } => Some(targets),
            _ => None,
        }
    }
}

/// Options that belong to other kinds: named so a misplaced one is an error, not ignored.
fn foreign_options(r: &RawRun, kind: &str) -> Vec<(&'static str, Option<usize>)> {
    let span = |s: Option<usize>| s;
    let mut present: Vec<(&'static str, &'static [&'static str], Option<usize>)> = vec![
        ("hooks", &["activation_patching", "attribution_patching", "ablation"], r.hooks.first().map(|h| h.span().start)),
        ("over", &["activation_patching", "attribution_patching", "direct_logit_attribution"], r.over.as_ref().map(|v| v.span().start)),
        ("layers", &["activation_patching", "attribution_patching"], r.layers.as_ref().map(|v| v.span().start)),
        ("verify_top", &["attribution_patching"], r.verify_top.as_ref().map(|v| v.span().start)),
        ("top_k", &["logit_lens"], r.top_k.as_ref().map(|v| v.span().start)),
        ("top_k_at", &["logit_lens"], r.top_k_at.as_ref().map(|v| v.span().start)),
        ("patterns", &["head_scores"], r.patterns.as_ref().map(|v| v.span().start)),
        ("error_measure", &["head_scores"], r.error_measure.as_ref().map(|v| v.span().start)),
        ("source", &["head_scores"], r.source.as_ref().map(|v| v.span().start)),
        ("seq_len", &["head_scores"], r.seq_len.as_ref().map(|v| v.span().start)),
        ("batch", &["head_scores"], r.batch.as_ref().map(|v| v.span().start)),
        ("seed", &["head_scores"], r.seed.as_ref().map(|v| v.span().start)),
        ("token_range", &["head_scores"], r.token_range.as_ref().map(|v| v.span().start)),
        ("method", &["ablation"], r.method.as_ref().map(|v| v.span().start)),
        ("units", &["ablation"], r.units.as_ref().map(|v| v.span().start)),
        ("top_dla_heads", &["ablation"], r.top_dla_heads.as_ref().map(|v| v.span().start)),
        ("positions", &["ablation"], r.positions.as_ref().map(|v| v.span().start)),
        ("measure", &["ablation"], r.measure.as_ref().map(|v| v.span().start)),
        ("dataset", &["ablation"], r.dataset.as_ref().map(|v| v.span().start)),
    ];
    for (name, flag) in [("qk_fix", r.qk_fix.is_some()), ("grad_drop", r.grad_drop.is_some())] {
        present.push((name, &["attribution_patching"], flag.then_some(r.kind.span().start)));
    }
    present.push(("incl_mid", &["logit_lens"], r.incl_mid.map(|_| r.kind.span().start)));
    present.push(("exclude_bos", &["head_scores"], r.exclude_bos.map(|_| r.kind.span().start)));
    present.push(("exclude_current_token", &["head_scores"], r.exclude_current_token.map(|_| r.kind.span().start)));
    present.push(("custom", &["head_scores"], r.custom.first().map(|c| c.name.span().start)));
    present.into_iter().filter(|(_, kinds, at)| at.is_some() && !kinds.contains(&kind)).map(|(n, _, at)| (n, span(at))).collect()
}

fn axes_of(over: &[String]) -> Option<Axes> {
    let o: Vec<&str> = over.iter().map(String::as_str).collect();
    Some(match o.as_slice() {
        ["layer", "pos"] => Axes::LayerPos,
        ["layer", "pos", "head"] | ["layer", "head", "pos"] => Axes::LayerPosHead,
        ["layer", "head"] => Axes::LayerHead,
        ["layer", "head", "dest"] => Axes::LayerHeadDest,
        ["layer", "head", "dest", "src"] => Axes::LayerHeadDestSrc,
        _ => return None,
    })
}

fn choice<T: Copy>(cx: &mut Ctx, v: &Option<Spanned<String>>, key: String, options: &[(&str, T)], default: T) -> T {
    let Some(v) = v else { return default };
    match options.iter().find(|(n, _)| *n == v.get_ref()) {
        Some((_, t)) => *t,
        None => {
            let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
            cx.at(v, key, format!("unknown value '{}' (valid: {}); did you mean '{}'?", v.get_ref(), names.join(", "), nearest(v.get_ref(), names.iter().copied())[0]));
            default
        }
    }
}

fn positive(cx: &mut Ctx, v: &Option<Spanned<i64>>, key: String, default: i64, min: i64) -> i64 {
    match v {
        None => default,
        Some(x) if *x.get_ref() < min => {
            cx.at(x, key, format!("must be at least {min}, got {}", x.get_ref()));
            default
        }
        Some(x) => *x.get_ref(),
    }
}

/// Resolves run `i`; None when it has errors (already reported).
pub(crate) fn resolve_kind(cx: &mut Ctx, r: &RawRun, i: usize, base: &Path) -> Option<RunKind> {
    let key = |k: &str| format!("run[{i}].{k}");
    let kind = r.kind.get_ref().as_str();
    if !RUN_KINDS.contains(&kind) {
        cx.at(&r.kind, key("kind"), format!("unknown run kind '{kind}' (valid: {}); did you mean '{}'?", RUN_KINDS.join(", "), nearest(kind, RUN_KINDS.iter().copied())[0]));
        return None;
    }
    let before = cx.diags.len();
    for (name, at) in foreign_options(r, kind) {
        cx.at_offset(at.unwrap_or(0), key(name), format!("'{name}' is not an option of {kind} runs"));
    }
    let out: Option<RunKind> = match kind {
        "activation_patching" => resolve_patch_targets(cx, r, i).map(|targets| RunKind::ActivationPatching { targets }),
        "attribution_patching" => resolve_patch_targets(cx, r, i).map(|targets| {
            let verify_top = positive(cx, &r.verify_top, key("verify_top"), 0, 0) as usize;
            RunKind::AttributionPatching { targets, options: AtpOptions { qk_fix: r.qk_fix.unwrap_or(false), grad_drop: r.grad_drop.unwrap_or(false) }, verify_top }
        }),
        "logit_lens" => Some(RunKind::LogitLens {
            incl_mid: r.incl_mid.unwrap_or(false),
            top_k: positive(cx, &r.top_k, key("top_k"), 0, 0) as usize,
            top_k_at: choice(cx, &r.top_k_at, key("top_k_at"), &[("last", LensPositions::Last), ("all", LensPositions::All)], LensPositions::Last),
        }),
        "direct_logit_attribution" => resolve_dla(cx, r, i),
        "head_scores" => resolve_head_scores(cx, r, i),
        "ablation" => resolve_ablation(cx, r, i, base).map(RunKind::Ablation),
        _ => unreachable!("checked against RUN_KINDS"),
    };
    if out.is_none() && cx.diags.len() == before {
        cx.at(&r.kind, key("kind"), format!("this {kind} run could not be resolved"));
    }
    let out = out?;
    (cx.diags.len() == before).then_some(out)
}

fn resolve_dla(cx: &mut Ctx, r: &RawRun, i: usize) -> Option<RunKind> {
    let over = match r.over.as_ref().map(|o| o.get_ref().iter().map(String::as_str).collect::<Vec<_>>()) {
        None => DlaOver::Layer,
        Some(o) => match o.as_slice() {
            ["layer"] => DlaOver::Layer,
            ["layer", "head"] => DlaOver::Head,
            ["layer", "neuron"] => DlaOver::Neuron,
            _ => {
                cx.at(r.over.as_ref()?, format!("run[{i}].over"), format!("unknown axes {o:?} (valid: [layer], [layer, head], [layer, neuron])"));
                return None;
            }
        },
    };
    Some(RunKind::DirectLogitAttribution { over })
}

fn resolve_head_scores(cx: &mut Ctx, r: &RawRun, i: usize) -> Option<RunKind> {
    let key = |k: &str| format!("run[{i}].{k}");
    const NAMED: &[&str] = &["previous_token", "duplicate_token", "induction"];
    let source = match r.source.as_ref().map(|s| s.get_ref().as_str()) {
        None | Some("prompts") => HeadSource::Prompts,
        Some("repeated_random") => {
            let range = match &r.token_range {
                None => None,
                Some(v) if v.get_ref().len() == 2 && v.get_ref()[0] >= 0 && v.get_ref()[0] < v.get_ref()[1] => Some((v.get_ref()[0], v.get_ref()[1])),
                Some(v) => {
                    cx.at(v, key("token_range"), format!("give [low, high) with 0 <= low < high, got {:?}", v.get_ref()));
                    None
                }
            };
            HeadSource::RepeatedRandom {
                seq_len: positive(cx, &r.seq_len, key("seq_len"), 50, 2),
                batch: positive(cx, &r.batch, key("batch"), 4, 1),
                seed: positive(cx, &r.seed, key("seed"), 0, 0) as u64,
                token_range: range,
            }
        }
        Some(other) => {
            let s = r.source.as_ref()?;
            cx.at(s, key("source"), format!("unknown source '{other}' (valid: prompts, repeated_random)"));
            return None;
        }
    };
    let mut detections = Vec::new();
    let named: Vec<Spanned<String>> = match &r.patterns {
        Some(p) => p.get_ref().clone(),
        None => vec![],
    };
    let default_named = r.patterns.is_none() && r.custom.is_empty();
    for name in if default_named { NAMED.iter().map(|s| s.to_string()).collect() } else { named.iter().map(|s| s.get_ref().clone()).collect::<Vec<_>>() } {
        let d = match name.as_str() {
            "previous_token" => Detection::PreviousToken,
            "duplicate_token" => Detection::DuplicateToken,
            "induction" => Detection::Induction,
            other => {
                let at = named.iter().find(|s| s.get_ref() == other)?;
                cx.at(at, key("patterns"), format!("unknown pattern '{other}' (valid: {}; or give [[run.custom]] patterns); did you mean '{}'?", NAMED.join(", "), nearest(other, NAMED.iter().copied())[0]));
                continue;
            }
        };
        detections.push((name, d));
    }
    if matches!(source, HeadSource::RepeatedRandom { .. }) && !r.custom.is_empty() {
        cx.at(&r.custom[0].name, key("custom"), "repeated_random scores the demo's stripes (previous_token, duplicate_token, induction); custom patterns need source = \"prompts\"");
    }
    for (j, c) in r.custom.iter().enumerate() {
        let ck = |k: &str| format!("run[{i}].custom[{j}].{k}");
        let d = match (&c.matrix, &c.rule) {
            (Some(m), None) => Detection::Matrix(m.get_ref().clone()),
            (None, Some(rule)) => {
                let offset = positive(cx, &c.offset, ck("offset"), 1, 0) as usize;
                match rule.get_ref().as_str() {
                    "same_token" => Detection::SameToken { offset },
                    "relative" => Detection::Relative { offset },
                    other => {
                        cx.at(rule, ck("rule"), format!("unknown rule '{other}' (valid: same_token, relative)"));
                        continue;
                    }
                }
            }
            _ => {
                cx.at(&c.name, ck("matrix"), "give either matrix = [[...]] or rule = \"same_token\" | \"relative\" (with offset)");
                continue;
            }
        };
        detections.push((c.name.get_ref().clone(), d));
    }
    let options = DetectOptions {
        measure: choice(cx, &r.error_measure, key("error_measure"), &[("mul", ErrorMeasure::Mul), ("abs", ErrorMeasure::Abs)], ErrorMeasure::Mul),
        exclude_bos: r.exclude_bos.unwrap_or(false),
        exclude_current_token: r.exclude_current_token.unwrap_or(false),
    };
    Some(RunKind::HeadScores { detections, options, source })
}

fn resolve_ablation(cx: &mut Ctx, r: &RawRun, i: usize, base: &Path) -> Option<AblationSpec> {
    let key = |k: &str| format!("run[{i}].{k}");
    const HOOKS: &[&str] = &["z", "attn_out", "mlp_out", "mlp_post"];
    let site = match r.hooks.as_slice() {
        [h] if HOOKS.contains(&h.get_ref().as_str()) => Site::from_short(h.get_ref())?,
        [h] => {
            cx.at(h, key("hooks"), format!("unknown hook '{}' for ablation (valid: {}); did you mean '{}'?", h.get_ref(), HOOKS.join(", "), nearest(h.get_ref(), HOOKS.iter().copied())[0]));
            return None;
        }
        _ => {
            cx.at(&r.kind, key("hooks"), format!("ablation needs exactly one hook, hooks = [\"z\"] (valid: {})", HOOKS.join(", ")));
            return None;
        }
    };
    let axes = unit_axes(site).ok()?;
    let units = match &r.units {
        None => None,
        Some(u) => {
            let mut out = Vec::new();
            for unit in u.get_ref() {
                if unit.len() != axes.len() || unit.iter().any(|&x| x < 0) {
                    cx.at(u, key("units"), format!("each unit of {} is [{}], got {unit:?}", site.name(), axes.join(", ")));
                    return None;
                }
                out.push(Unit { layer: unit[0] as usize, index: unit.get(1).copied() });
            }
            Some(out)
        }
    };
    let top_dla_heads = match &r.top_dla_heads {
        None => None,
        Some(t) if *t.get_ref() < 1 || units.is_some() || site != Site::Z => {
            cx.at(t, key("top_dla_heads"), "top_dla_heads = N (N >= 1) picks the heads to ablate, instead of units, for hooks = [\"z\"]");
            None
        }
        Some(t) => Some(*t.get_ref() as usize),
    };
    let measure = choice(cx, &r.measure, key("measure"), &[("metric", Measure::Metric), ("loss", Measure::Loss), ("direct_logit_attribution", Measure::DirectLogitAttribution)], Measure::Metric);
    if measure == Measure::DirectLogitAttribution && units.is_none() && top_dla_heads.is_none() {
        cx.at(r.measure.as_ref()?, key("units"), "measure = \"direct_logit_attribution\" needs the heads to knock out: units = [[layer, head], ...] or top_dla_heads = N");
    }
    let positions = match &r.positions {
        Some(p) if p.get_ref().iter().any(|&x| x < 0) => {
            cx.at(p, key("positions"), format!("positions must be non-negative, got {:?}", p.get_ref()));
            None
        }
        Some(p) => Some(p.get_ref().clone()),
        None => None,
    };
    let method = choice(cx, &r.method, key("method"), &[("zero", AblationMethod::Zero), ("mean", AblationMethod::Mean), ("resample", AblationMethod::Resample)], AblationMethod::Mean);
    if r.dataset.is_some() && method != AblationMethod::Mean {
        cx.at(r.dataset.as_ref()?, key("dataset"), "dataset is the prompt set of a mean ablation; set method = \"mean\"");
    }
    Some(AblationSpec { site, method, units, top_dla_heads, positions, measure, dataset: r.dataset.as_ref().map(|d| base.join(d.get_ref())) })
}

fn resolve_patch_targets(cx: &mut Ctx, r: &RawRun, i: usize) -> Option<Vec<(Site, Axes)>> {
    let key = |k: &str| format!("run[{i}].{k}");
    let axes = match &r.over {
        None => None,
        Some(over) => match axes_of(over.get_ref()) {
            Some(a) => Some(a),
            None => {
                cx.at(over, key("over"), format!(
                    "unknown axes {:?} (valid: [layer, pos], [layer, pos, head], [layer, head], [layer, head, dest], [layer, head, dest, src])",
                    over.get_ref()
                ));
                return None;
            }
        },
    };
    if r.hooks.is_empty() {
        cx.at(&r.kind, key("hooks"), format!("{} needs hooks = [...] (valid: {})", r.kind.get_ref(), PATCH_HOOKS.join(", ")));
        return None;
    }
    let mut targets = Vec::new();
    for (j, h) in r.hooks.iter().enumerate() {
        let name = h.get_ref().as_str();
        let group: Vec<(Site, Axes)> = match name {
            "block_every" => [Site::ResidPre, Site::AttnOut, Site::MlpOut].map(|s| (s, Axes::LayerPos)).to_vec(),
            "all_pos_every" => [Site::Z, Site::Q, Site::K, Site::V, Site::Pattern].map(|s| (s, Axes::LayerHead)).to_vec(),
            "by_pos_every" => {
                let mut v: Vec<_> = [Site::Z, Site::Q, Site::K, Site::V].map(|s| (s, Axes::LayerPosHead)).to_vec();
                v.push((Site::Pattern, Axes::LayerHeadDest));
                v
            }
            _ => {
                let site = if PATCH_HOOKS.contains(&name) { Site::from_short(name) } else { None };
                let Some(site) = site else {
                    cx.at(h, format!("run[{i}].hooks[{j}]"), format!("unknown hook '{name}'; did you mean {}? (valid: {})",
                        nearest(name, PATCH_HOOKS.iter().copied()).iter().map(|s| format!("'{s}'")).collect::<Vec<_>>().join(" or "), PATCH_HOOKS.join(", ")));
                    continue;
                };
                let Some(axes) = axes else {
                    cx.at(h, key("over"), format!("hook '{name}' needs over = [...] axes"));
                    continue;
                };
                if let Err(e) = Target::new(site, axes) {
                    cx.at(r.over.as_ref().expect("axes came from over"), key("over"), e.to_string());
                    continue;
                }
                vec![(site, axes)]
            }
        };
        for t in group {
            if !targets.contains(&t) {
                targets.push(t);
            }
        }
    }
    Some(targets)
}
