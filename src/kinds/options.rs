//! Resolving one [[run]] table: what every run has (name, layers), then its kind's options
//! through the kind's resolver, every problem reported with its line, key, the bad value and
//! what is valid; and the option parsers kinds share (patch targets).
use std::collections::BTreeMap;
use std::path::Path;

use toml::Spanned;

use crate::analysis::patching::{Axes, Target};
use crate::kinds::{self, RunSpec};
use crate::model::config::ModelConfig;
use crate::model::hook_point::{nearest, Site};
use crate::spec::line_col;
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

fn axes_of(over: &[String]) -> Option<Axes> {
    let o: Vec<&str> = over.iter().map(String::as_str).collect();
    Some(match o.as_slice() {
        ["layer", "pos"] => Axes::LayerPos,
        ["layer", "pos", "head"] | ["layer", "head", "pos"] => Axes::LayerPosHead,
        ["layer", "head"] => Axes::LayerHead,
        ["layer", "head", "dest"] => Axes::LayerHeadDest,
        ["layer", "head", "dest", "src"] => Axes::LayerHeadDestSrc,
        ["layer", "role"] => Axes::LayerRole,
        ["layer", "role", "head"] | ["layer", "head", "role"] => Axes::LayerRoleHead,
        _ => return None,
    })
}

/// Where a run's options were given, as its kind resolves them: its layers (for the check
/// against the model) and the keys its checks cite.
#[derive(Debug, Default)]
pub struct Located {
    pub layers: Option<Vec<usize>>,
    pub layers_at: Option<(usize, usize)>,
    pub keys_at: BTreeMap<&'static str, (usize, usize)>,
}

impl Located {
    /// The run's layers: non-negative, else an error.
    pub fn layers(&mut self, cx: &mut Ctx, v: &Option<Spanned<Vec<i64>>>, i: usize) {
        let Some(l) = v else { return };
        self.layers_at = Some(line_col(cx.text, l.span().start));
        if l.get_ref().iter().any(|&x| x < 0) {
            cx.at(l, format!("run[{i}].layers"), format!("layers must be non-negative, got {:?}", l.get_ref()));
        } else {
            self.layers = Some(l.get_ref().iter().map(|&x| x as usize).collect());
        }
    }

    /// Where `key` was given (when it was), for the checks against the model or the prompts
    /// that cite it.
    pub fn key<T>(&mut self, cx: &Ctx, key: &'static str, v: Option<&Spanned<T>>) {
        if let Some(v) = v {
            self.keys_at.insert(key, line_col(cx.text, v.span().start));
        }
    }
}

/// Run `i` resolved from its table (`head`) and its options as its kind read them (None: the
/// kind is unknown); None when it has errors (reported on `cx`).
pub(crate) fn resolve_run(
    cx: &mut Ctx,
    head: &RawRun,
    options: Option<&kinds::RawOptions>,
    i: usize,
    base: &Path,
) -> Option<RunSpec> {
    let key = |k: &str| format!("run[{i}].{k}");
    let kind = head.kind.get_ref().as_str();
    let Some(options) = options.filter(|_| kinds::by_name(kind).is_some()) else {
        let names = kinds::names();
        cx.at(
            &head.kind,
            key("kind"),
            format!(
                "unknown run kind '{kind}' (valid: {}); did you mean '{}'?",
                names.join(", "),
                nearest(kind, names.iter().copied())[0]
            ),
        );
        // Keys no kind reads are reported now; the rest once the kind is known.
        for (name, at) in &head.keys {
            if !names.iter().any(|k| kinds::option_keys(k).contains(&name.as_str())) {
                cx.at_offset(*at, key(name), format!("'{name}' is not an option of any run kind"));
            }
        }
        return None;
    };
    let before = cx.diags.len();
    let known = kinds::option_keys(kind);
    for (name, at) in &head.keys {
        if !known.contains(&name.as_str()) {
            let hint = match known.as_slice() {
                [] => format!("; {kind} runs take no options"),
                _ => format!(
                    " (valid: {}); did you mean '{}'?",
                    known.join(", "),
                    nearest(name, known.iter().copied())[0]
                ),
            };
            cx.at_offset(*at, key(name), format!("'{name}' is not an option of {kind} runs{hint}"));
        }
    }
    let mut located = Located::default();
    let out = kinds::resolve_options(cx, options, &mut located, i, base);
    if out.is_none() && cx.diags.len() == before {
        cx.at(&head.kind, key("kind"), format!("this {kind} run could not be resolved"));
    }
    let kind = out?;
    let Located { layers, layers_at, keys_at } = located;
    (cx.diags.len() == before).then(|| RunSpec {
        name: head.name.get_ref().clone(),
        kind,
        layers,
        layers_at,
        keys_at,
        per_prompt: head.per_prompt,
    })
}

/// The patch targets of `hooks` over `over` (patching.py's names and its grouped targets).
pub(crate) fn resolve_patch_targets(
    cx: &mut Ctx,
    kind: &Spanned<String>,
    hooks: &[Spanned<String>],
    over: &Option<Spanned<Vec<String>>>,
    i: usize,
) -> Option<Vec<(Site, Axes)>> {
    let key = |k: &str| format!("run[{i}].{k}");
    let axes = match &over {
        None => None,
        Some(over) => match axes_of(over.get_ref()) {
            Some(a) => Some(a),
            None => {
                cx.at(over, key("over"), format!(
                    "unknown axes {:?} (valid: [layer, pos], [layer, pos, head], [layer, head], [layer, head, dest], [layer, head, dest, src], [layer, role], [layer, role, head])",
                    over.get_ref()
                ));
                return None;
            }
        },
    };
    if hooks.is_empty() {
        cx.at(
            kind,
            key("hooks"),
            format!("{} needs hooks = [...] (valid: {})", kind.get_ref(), PATCH_HOOKS.join(", ")),
        );
        return None;
    }
    let mut targets = Vec::new();
    for (j, h) in hooks.iter().enumerate() {
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
                    cx.at(over.as_ref().expect("axes came from over"), key("over"), e.to_string());
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

/// Patch targets at sites the model has (a parallel-attention block has no resid_mid).
pub(crate) fn check_sites(
    run: &RunSpec,
    targets: &[(Site, Axes)],
    cfg: &ModelConfig,
    file: &str,
    problems: &mut Vec<String>,
) {
    for (site, _) in targets.iter().filter(|(s, _)| !cfg.has_site(*s)) {
        problems.push(format!(
            "{file}: run '{}': a {} model has no {} (its attention and MLP read the same residual)",
            run.name,
            cfg.family,
            site.name()
        ));
    }
}
