//! Resolving one [[run]] table: its kind and the options of that kind, every problem reported
//! with its line, key, the bad value and what is valid.
use std::path::Path;

use toml::Spanned;

use crate::analysis::ablation::AblationSpec;
use crate::analysis::patching::{Axes, Target};
use crate::analysis::attribution::AtpOptions;
use crate::analysis::activation_cache::{DlaOver, LensPositions};
use crate::analysis::head_detector::{DetectOptions, Detection};
use crate::kinds;
use crate::model::hook_point::{nearest, Site};
use crate::spec::raw::RawRun;
use crate::spec::resolve::Ctx;

const PATCH_HOOKS: &[&str] = &[
    "resid_pre",
    "resid_mid",
    "resid_post",
    "attn_out",
    "mlp_out",
    "z",
    "q",
    "k",
    "v",
    "pattern",
    "block_every",
    "all_pos_every",
    "by_pos_every",
];

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

    /// What the run reads, as its kind declares it (experiments/kinds/).
    pub fn needs(&self) -> kinds::Needs {
        kinds::needs(self)
    }

    /// Whether the run reads the spec's prompts (repeated random tokens need none).
    pub fn needs_prompts(&self) -> bool {
        self.needs().prompts
    }

    /// Whether the run needs corrupted prompts.
    pub fn needs_corruption(&self) -> bool {
        self.needs().corruption
    }

    /// Whether the run reads the metric's answers.
    pub fn needs_answers(&self) -> bool {
        self.needs().answers
    }
}

/// The [[run]] keys given, with where: a key the run's kind does not read is an error, not
/// ignored (the registry says which keys each kind reads).
fn given_options(r: &RawRun) -> Vec<(&'static str, usize)> {
    let at = r.kind.span().start;
    let present: Vec<(&'static str, Option<usize>)> = vec![
        ("hooks", r.hooks.first().map(|h| h.span().start)),
        ("over", r.over.as_ref().map(|v| v.span().start)),
        ("layers", r.layers.as_ref().map(|v| v.span().start)),
        ("verify_top", r.verify_top.as_ref().map(|v| v.span().start)),
        ("top_k", r.top_k.as_ref().map(|v| v.span().start)),
        ("top_k_at", r.top_k_at.as_ref().map(|v| v.span().start)),
        ("patterns", r.patterns.as_ref().map(|v| v.span().start)),
        ("error_measure", r.error_measure.as_ref().map(|v| v.span().start)),
        ("source", r.source.as_ref().map(|v| v.span().start)),
        ("seq_len", r.seq_len.as_ref().map(|v| v.span().start)),
        ("batch", r.batch.as_ref().map(|v| v.span().start)),
        ("seed", r.seed.as_ref().map(|v| v.span().start)),
        ("token_range", r.token_range.as_ref().map(|v| v.span().start)),
        ("method", r.method.as_ref().map(|v| v.span().start)),
        ("units", r.units.as_ref().map(|v| v.span().start)),
        ("top_dla_heads", r.top_dla_heads.as_ref().map(|v| v.span().start)),
        ("positions", r.positions.as_ref().map(|v| v.span().start)),
        ("measure", r.measure.as_ref().map(|v| v.span().start)),
        ("dataset", r.dataset.as_ref().map(|v| v.span().start)),
        ("qk_fix", r.qk_fix.map(|_| at)),
        ("grad_drop", r.grad_drop.map(|_| at)),
        ("incl_mid", r.incl_mid.map(|_| at)),
        ("exclude_bos", r.exclude_bos.map(|_| at)),
        ("exclude_current_token", r.exclude_current_token.map(|_| at)),
        ("custom", r.custom.first().map(|c| c.name.span().start)),
    ];
    present.into_iter().filter_map(|(n, at)| Some((n, at?))).collect()
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

pub(crate) fn choice<T: Copy>(
    cx: &mut Ctx,
    v: &Option<Spanned<String>>,
    key: String,
    options: &[(&str, T)],
    default: T,
) -> T {
    let Some(v) = v else { return default };
    match options.iter().find(|(n, _)| *n == v.get_ref()) {
        Some((_, t)) => *t,
        None => {
            let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
            cx.at(
                v,
                key,
                format!(
                    "unknown value '{}' (valid: {}); did you mean '{}'?",
                    v.get_ref(),
                    names.join(", "),
                    nearest(v.get_ref(), names.iter().copied())[0]
                ),
            );
            default
        }
    }
}

pub(crate) fn positive(cx: &mut Ctx, v: &Option<Spanned<i64>>, key: String, default: i64, min: i64) -> i64 {
    match v {
        None => default,
        Some(x) if *x.get_ref() < min => {
            cx.at(x, key, format!("must be at least {min}, got {}", x.get_ref()));
            default
        }
        Some(x) => *x.get_ref(),
    }
}

/// Resolves run `i` through its kind's resolver; None when it has errors (already reported).
pub(crate) fn resolve_kind(cx: &mut Ctx, r: &RawRun, i: usize, base: &Path) -> Option<RunKind> {
    let key = |k: &str| format!("run[{i}].{k}");
    let kind = r.kind.get_ref().as_str();
    let Some(info) = kinds::by_name(kind) else {
        let names = kinds::names();
        cx.at(
            &r.kind,
            key("kind"),
            format!(
                "unknown run kind '{kind}' (valid: {}); did you mean '{}'?",
                names.join(", "),
                nearest(kind, names.iter().copied())[0]
            ),
        );
        return None;
    };
    let before = cx.diags.len();
    for (name, at) in given_options(r) {
        if !info.keys.contains(&name) {
            cx.at_offset(at, key(name), format!("'{name}' is not an option of {kind} runs"));
        }
    }
    let out = (info.resolve)(cx, r, i, base);
    if out.is_none() && cx.diags.len() == before {
        cx.at(&r.kind, key("kind"), format!("this {kind} run could not be resolved"));
    }
    let out = out?;
    (cx.diags.len() == before).then_some(out)
}

pub(crate) fn resolve_patch_targets(cx: &mut Ctx, r: &RawRun, i: usize) -> Option<Vec<(Site, Axes)>> {
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
        cx.at(
            &r.kind,
            key("hooks"),
            format!("{} needs hooks = [...] (valid: {})", r.kind.get_ref(), PATCH_HOOKS.join(", ")),
        );
        return None;
    }
    let mut targets = Vec::new();
    for (j, h) in r.hooks.iter().enumerate() {
        let name = h.get_ref().as_str();
        let group: Vec<(Site, Axes)> = match name {
            "block_every" => [Site::ResidPre, Site::AttnOut, Site::MlpOut].map(|s| (s, Axes::LayerPos)).to_vec(),
            "all_pos_every" => {
                [Site::Z, Site::Q, Site::K, Site::V, Site::Pattern].map(|s| (s, Axes::LayerHead)).to_vec()
            }
            "by_pos_every" => {
                let mut v: Vec<_> = [Site::Z, Site::Q, Site::K, Site::V].map(|s| (s, Axes::LayerPosHead)).to_vec();
                v.push((Site::Pattern, Axes::LayerHeadDest));
                v
            }
            _ => {
                let site = if PATCH_HOOKS.contains(&name) { Site::from_short(name) } else { None };
                let Some(site) = site else {
                    cx.at(
                        h,
                        format!("run[{i}].hooks[{j}]"),
                        format!(
                            "unknown hook '{name}'; did you mean {}? (valid: {})",
                            nearest(name, PATCH_HOOKS.iter().copied())
                                .iter()
                                .map(|s| format!("'{s}'"))
                                .collect::<Vec<_>>()
                                .join(" or "),
                            PATCH_HOOKS.join(", ")
                        ),
                    );
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
