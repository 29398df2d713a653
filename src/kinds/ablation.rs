//! ablation: zero, mean or resample ablation of heads, neurons or whole sites, each unit in turn
//! or a set together, measured by the metric, the loss or DLA per head.
use std::path::Path;
use std::time::Instant;

use crate::analysis::ablation::{
    run_ablation, unit_axes, AblationInputs, AblationMethod, AblationOutcome, AblationSpec, Measure, Unit,
};
use crate::analysis::activation_cache::{self, Component, DlaOver};
use crate::analysis::mean;
use crate::error::{Error, Result};
use crate::kinds::shared::context::{component_rows, with_prompts, RunContext};
use crate::kinds::{only_note, Captures, JobDraft, JobOutput, KindInfo, Needs, Part, RunKind, RunSpec, Sizing};
use crate::model::config::ModelConfig;
use crate::model::hook_point::{nearest, HookPoint, Site};
use crate::model::Model;
use crate::output::figure::{cell_name, Bars, Figure, RunFacts};
use crate::output::table::Row;
use toml::Spanned;

use crate::kinds::options::Located;
use crate::spec::resolve::choice;
use crate::spec::resolve::Ctx;

pub const KIND: KindInfo = KindInfo {
    name: "ablation",
    needs,
    captures,
    check_model,
    check_prompts,
    jobs,
    run,
    note: only_note,
    key,
    figures,
    pattern_heads: false,
};

/// An ablation [[run]]'s keys as written.
#[derive(Debug, serde::Deserialize)]
pub struct Raw {
    pub kind: Spanned<String>,
    #[serde(default)]
    pub hooks: Vec<Spanned<String>>,
    pub method: Option<Spanned<String>>,
    pub units: Option<Spanned<Vec<Vec<i64>>>>,
    pub top_dla_heads: Option<Spanned<i64>>,
    pub positions: Option<Spanned<Vec<i64>>>,
    pub measure: Option<Spanned<String>>,
    pub dataset: Option<Spanned<String>>,
}

/// An ablation run's options.
pub type Options = AblationSpec;

/// Seconds per cost unit relative to patching, measured: whole forwards, every layer.
const COST_SCALE: f64 = 1.8;

/// Resample ablation reads the corrupted prompts; the loss needs no answers.
fn needs(kind: &RunKind) -> Needs {
    let RunKind::Ablation(a) = kind else { return Needs::default() };
    Needs {
        prompts: true,
        corruption: a.method == AblationMethod::Resample,
        answers: a.measure != Measure::Loss,
        ..Needs::default()
    }
}

/// A mean ablation over a dataset file depends on that file's contents.
fn key(run: &RunSpec, _: Part) -> Result<serde_json::Value> {
    let RunKind::Ablation(a) = &run.kind else { return Ok(serde_json::Value::Null) };
    let dataset = a.dataset.as_deref().map(crate::model::digest::file_digest).transpose()?;
    Ok(serde_json::json!({"task": "whole", "kind": run.kind, "layers": run.layers, "dataset": dataset}))
}

/// Units within the model's layers, heads and neurons.
fn check_model(run: &RunSpec, cfg: &ModelConfig, file: &str, problems: &mut Vec<String>) {
    let RunKind::Ablation(a) = &run.kind else { return };
    let (max, what) = crate::analysis::ablation::units_per_layer(cfg, a.site);
    for u in a.units.iter().flatten() {
        if !crate::analysis::ablation::unit_in_range(cfg, a.site, u) {
            let unit = u.index.map(|i| format!("[{}, {i}]", u.layer)).unwrap_or_else(|| format!("[{}]", u.layer));
            let per = if what.is_empty() { String::new() } else { format!(" of {max} {what} (0-{})", max - 1) };
            problems.push(format!(
                "{}: run '{}': unit {unit} is out of range: the model has {} layers (0-{}){per}",
                run.key_at("units", file),
                run.name,
                cfg.n_layers,
                cfg.n_layers - 1
            ));
        }
    }
}

/// Positions within the prompts.
fn check_prompts(run: &RunSpec, seq: usize, _: &[usize], file: &str) -> Vec<String> {
    let RunKind::Ablation(a) = &run.kind else { return Vec::new() };
    let bad: Vec<i64> = a.positions.iter().flatten().copied().filter(|&p| p < 0 || p as usize >= seq).collect();
    if bad.is_empty() {
        return Vec::new();
    }
    vec![format!(
        "{}: run '{}': positions {bad:?} are out of range: the prompts have {seq} tokens (0-{})",
        run.key_at("positions", file),
        run.name,
        seq.saturating_sub(1)
    )]
}

pub(crate) fn resolve(cx: &mut Ctx, r: &Raw, at: &mut Located, i: usize, base: &Path) -> Option<RunKind> {
    at.key(cx, "units", r.units.as_ref());
    at.key(cx, "positions", r.positions.as_ref());
    resolve_ablation(cx, r, i, base).map(RunKind::Ablation)
}

fn captures(_: &RunSpec, _: &Model) -> Result<Captures> {
    Ok(Captures::default())
}

/// One job: the baseline, then each unit in turn (batched) or the units together.
fn jobs(run: &RunSpec, z: &Sizing) -> Vec<JobDraft> {
    let RunKind::Ablation(a) = &run.kind else { return vec![] };
    let together = a.units.is_some() || a.top_dla_heads.is_some();
    let units = if together { 1 } else { crate::analysis::ablation::all_units(z.cfg, a.site).len() };
    let what = if together { "units together".to_string() } else { format!("each of {units} units in turn") };
    vec![JobDraft {
        cells: units,
        forwards: 1 + if together { 1 } else { units.div_ceil(z.chunk) },
        tl_forwards: 1 + units,
        ..JobDraft::whole(
            format!("{}: {:?} ablation of {}, {what}", run.name, a.method, a.site.name()),
            COST_SCALE * (z.full(1) + (units * z.n * z.cfg.n_layers) as f64),
        )
    }]
}

fn run(cx: &RunContext, run: &RunSpec, _: Part) -> Result<JobOutput> {
    let RunKind::Ablation(a) = &run.kind else {
        return Err(Error::Other(format!("run '{}' is not an ablation run", run.name)));
    };
    ablation(cx, run, a)
}

/// The ablation's site, method, units, positions, measure and dataset, each key checked with its
/// line; over 80 lines, one key after another.
fn resolve_ablation(cx: &mut Ctx, r: &Raw, i: usize, base: &Path) -> Option<AblationSpec> {
    let key = |k: &str| format!("run[{i}].{k}");
    const HOOKS: &[&str] = &["z", "attn_out", "mlp_out", "mlp_post"];
    let site = match r.hooks.as_slice() {
        [h] if HOOKS.contains(&h.get_ref().as_str()) => Site::from_short(h.get_ref())?,
        [h] => {
            cx.at(
                h,
                key("hooks"),
                format!(
                    "unknown hook '{}' for ablation (valid: {}); did you mean '{}'?",
                    h.get_ref(),
                    HOOKS.join(", "),
                    nearest(h.get_ref(), HOOKS.iter().copied())[0]
                ),
            );
            return None;
        }
        _ => {
            cx.at(
                &r.kind,
                key("hooks"),
                format!("ablation needs exactly one hook, hooks = [\"z\"] (valid: {})", HOOKS.join(", ")),
            );
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
                    cx.at(
                        u,
                        key("units"),
                        format!("each unit of {} is [{}], got {unit:?}", site.name(), axes.join(", ")),
                    );
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
            cx.at(
                t,
                key("top_dla_heads"),
                "top_dla_heads = N (N >= 1) picks the heads to ablate, instead of units, for hooks = [\"z\"]",
            );
            None
        }
        Some(t) => Some(*t.get_ref() as usize),
    };
    let measure = choice(
        cx,
        &r.measure,
        key("measure"),
        &[
            ("metric", Measure::Metric),
            ("loss", Measure::Loss),
            ("direct_logit_attribution", Measure::DirectLogitAttribution),
        ],
        Measure::Metric,
    );
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
    let method = choice(
        cx,
        &r.method,
        key("method"),
        &[("zero", AblationMethod::Zero), ("mean", AblationMethod::Mean), ("resample", AblationMethod::Resample)],
        AblationMethod::Mean,
    );
    if r.dataset.is_some() && method != AblationMethod::Mean {
        cx.at(
            r.dataset.as_ref()?,
            key("dataset"),
            "dataset is the prompt set of a mean ablation; set method = \"mean\"",
        );
    }
    Some(AblationSpec {
        site,
        method,
        units,
        top_dla_heads,
        positions,
        measure,
        dataset: r.dataset.as_ref().map(|d| base.join(d.get_ref())),
    })
}

fn ablation(cx: &RunContext, run: &RunSpec, a: &AblationSpec) -> Result<JobOutput> {
    let (model, toks) = (cx.model, cx.toks()?);
    let metric = cx.metric()?;
    let dataset = match &a.dataset {
        Some(path) => {
            let prompts = crate::spec::prompts::read(path)
                .map_err(|e| Error::Config(format!("dataset {}: {e}", path.display())))?;
            let texts: Vec<&str> = prompts.iter().map(|p| p.clean.as_str()).collect();
            Some(model.tokenizer()?.batch(&texts, cx.spec.model.prepend_bos_for(&model.cfg))?)
        }
        None => None,
    };
    let inputs = AblationInputs {
        tokens: &toks.clean,
        mask: toks.mask.as_ref(),
        metric: &metric,
        corrupted: toks.corrupted.as_ref(),
        dataset: dataset.as_ref().map(|d| (&d.tokens, d.mask.as_ref())),
    };
    // The top name movers of this model: the heads with the largest clean-run DLA.
    let mut a = a.clone();
    if let Some(k) = a.top_dla_heads {
        let comps = activation_cache::direct_logit_attribution(
            model,
            &toks.clean,
            toks.mask.as_ref(),
            &metric,
            DlaOver::Head,
            crate::Hooks::new(),
        )?;
        let mut order: Vec<&Component> = comps.iter().collect();
        order.sort_by(|x, y| y.mean().total_cmp(&x.mean()));
        a.units = Some(order.iter().take(k).map(|c| Unit { layer: c.layer.unwrap_or(0), index: c.head }).collect());
    }
    let a = &a;
    let total = if a.units.is_some() { 1 } else { crate::analysis::ablation::all_units(&model.cfg, a.site).len() };
    let pb = cx.bar(total, format!("{}: ablate {}", run.name, a.site.name()));
    let t = Instant::now();
    let out: AblationOutcome = run_ablation(model, a, &inputs, |k| pb.inc(k as u64))?;
    pb.finish_and_clear();
    let mut rows = Vec::new();
    let base = Row { run: run.name.clone(), kind: "ablation".into(), computed: true, ..Row::default() };
    let hook_of = |u: &Unit| HookPoint::Block(u.layer, a.site).to_string();
    with_prompts(
        cx,
        Row { label: Some("baseline".into()), hook: "-".into(), ..base.clone() },
        &out.baseline,
        mean(&out.baseline),
        None,
        &mut rows,
    );
    for (units, values) in &out.cells {
        let row = if let [u] = units.as_slice() {
            let (h, k) = unit_index(a, u);
            let unit = Some(unit_label(a, u));
            Row { hook: hook_of(u), layer: Some(u.layer as i32), head: h, neuron: k, unit, ..base.clone() }
        } else {
            let label = units.iter().map(|u| unit_label(a, u)).collect::<Vec<_>>().join("+");
            let unit = Some(label.clone());
            Row { hook: a.site.name().to_string(), label: Some(format!("ablated {label}")), unit, ..base.clone() }
        };
        with_prompts(cx, row, values, mean(values), None, &mut rows);
    }
    if let Some(comps) = &out.dla {
        component_rows(cx, &run.name, "ablation", comps, toks.clean.size()[1] - 1, &mut rows);
    }
    let measure = match a.measure {
        Measure::Metric => serde_json::json!(cx.spec.metric.kind),
        Measure::Loss => "next-token cross-entropy".into(),
        Measure::DirectLogitAttribution => "direct logit attribution per head of the ablated run".into(),
    };
    Ok((
        rows,
        serde_json::json!({"ablation": a, "measure": measure, "baseline": mean(&out.baseline), "forwards": out.forwards, "seconds": t.elapsed().as_secs_f64()}),
    ))
}

fn unit_index(a: &AblationSpec, u: &Unit) -> (Option<i32>, Option<i32>) {
    match a.site {
        Site::Z => (u.index.map(|i| i as i32), None),
        Site::MlpPost => (None, u.index.map(|i| i as i32)),
        _ => (None, None),
    }
}

fn unit_label(a: &AblationSpec, u: &Unit) -> String {
    match (a.site, u.index) {
        (Site::Z, Some(h)) => format!("L{}H{h}", u.layer),
        (Site::MlpPost, Some(k)) => format!("L{}N{k}", u.layer),
        (s, _) => format!("{}.{}", u.layer, s.name()),
    }
}

/// The metric with each unit ablated, beside the baseline.
fn figures(run: &str, rows: &[&Row], _: &RunFacts, metric: &str, suffix: &str) -> Vec<Figure> {
    let baseline = rows.iter().find(|r| r.label.as_deref() == Some("baseline")).map(|r| r.value);
    let units: Vec<&&Row> = rows.iter().filter(|r| r.label.as_deref() != Some("baseline")).collect();
    vec![Figure::Bars(Bars {
        title: format!("{run}: ablated units{suffix}"),
        labels: units.iter().map(|r| r.label.clone().unwrap_or_else(|| cell_name(r))).collect(),
        values: units.iter().map(|r| r.value).collect(),
        baseline,
        value_label: metric.to_string(),
    })]
}
