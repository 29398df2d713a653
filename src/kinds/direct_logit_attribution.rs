//! direct_logit_attribution: the final residual decomposed into layers, heads or neurons, each
//! along the answer direction (apply_ln_to_stack).
use crate::analysis::activation_cache::{self, Component, DlaOver};
use crate::error::{Error, Result};
use crate::kinds::shared::context::{component_rows, RunContext};
use crate::kinds::{
    no_model_check, no_prompt_check, only_note, whole_job_key, Captures, JobDraft, JobOutput, KindInfo, Needs, Part,
    RunKind, RunSpec, Sizing,
};
use crate::model::Model;
use crate::output::figure::{cell_name, layer_by_head, Bars, Figure, RunFacts};
use crate::output::table::Row;
use std::path::Path;

use toml::Spanned;

use crate::kinds::options::Located;
use crate::spec::resolve::Ctx;

pub const KIND: KindInfo = KindInfo {
    name: "direct_logit_attribution",
    needs,
    captures,
    check_model: no_model_check,
    check_prompts: no_prompt_check,
    jobs,
    run,
    note: only_note,
    key: whole_job_key,
    figures,
    pattern_heads: false,
};

/// A direct_logit_attribution [[run]]'s keys as written.
#[derive(Debug, serde::Deserialize)]
pub struct Raw {
    pub over: Option<Spanned<Vec<String>>>,
}

/// A direct_logit_attribution run's options.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Options {
    pub over: DlaOver,
}

/// Seconds per cost unit relative to patching, measured: it only decomposes the cached run.
const COST_SCALE: f64 = 0.25;

fn needs(_: &RunKind) -> Needs {
    Needs { prompts: true, answers: true, analysis_cache: true, metric_direction: true, ..Needs::default() }
}

pub(crate) fn resolve(cx: &mut Ctx, r: &Raw, _: &mut Located, i: usize, _: &Path) -> Option<RunKind> {
    resolve_dla(cx, r, i)
}

fn captures(run: &RunSpec, model: &Model) -> Result<Captures> {
    let RunKind::DirectLogitAttribution(Options { over }) = &run.kind else { return Ok(Captures::default()) };
    Ok(Captures { analysis_points: activation_cache::dla_points(model, *over), ..Captures::default() })
}

fn jobs(run: &RunSpec, z: &Sizing) -> Vec<JobDraft> {
    vec![JobDraft::whole(
        format!("{}: direct_logit_attribution from the cached clean run", run.name),
        COST_SCALE * z.full(1),
    )]
}

fn run(cx: &RunContext, run: &RunSpec, _: Part) -> Result<JobOutput> {
    let RunKind::DirectLogitAttribution(Options { over }) = &run.kind else {
        return Err(Error::Other(format!("run '{}' is not a direct_logit_attribution run", run.name)));
    };
    dla(cx, run, *over)
}

fn resolve_dla(cx: &mut Ctx, r: &Raw, i: usize) -> Option<RunKind> {
    let over = match r.over.as_ref().map(|o| o.get_ref().iter().map(String::as_str).collect::<Vec<_>>()) {
        None => DlaOver::Layer,
        Some(o) => match o.as_slice() {
            ["layer"] => DlaOver::Layer,
            ["layer", "head"] => DlaOver::Head,
            ["layer", "neuron"] => DlaOver::Neuron,
            _ => {
                cx.at(
                    r.over.as_ref()?,
                    format!("run[{i}].over"),
                    format!("unknown axes {o:?} (valid: [layer], [layer, head], [layer, neuron])"),
                );
                return None;
            }
        },
    };
    Some(RunKind::DirectLogitAttribution(Options { over }))
}

fn dla(cx: &RunContext, run: &RunSpec, over: DlaOver) -> Result<JobOutput> {
    let toks = cx.toks()?;
    let metric = cx.metric()?;
    let comps = activation_cache::dla_from(cx.model, cx.analysis_cache()?, &metric, over)?;
    let mut rows = Vec::new();
    component_rows(cx, &run.name, "direct_logit_attribution", &comps, toks.clean.size()[1] - 1, &mut rows);
    let total: f64 = comps.iter().map(Component::mean).sum();
    Ok((rows, serde_json::json!({"over": over, "components": comps.len(), "sum_of_components": total})))
}

/// Bars per component, a layer × head grid, the 20 largest neurons.
fn figures(run: &str, rows: &[&Row], _: &RunFacts, _: &str, suffix: &str) -> Vec<Figure> {
    let neurons: Vec<&Row> = rows.iter().copied().filter(|r| r.neuron.is_some()).collect();
    let heads: Vec<&Row> = rows.iter().copied().filter(|r| r.neuron.is_none() && r.head.is_some()).collect();
    let rest: Vec<&Row> = rows.iter().copied().filter(|r| r.neuron.is_none() && r.head.is_none()).collect();
    let mut out = Vec::new();
    if !rest.is_empty() {
        out.push(Figure::Bars(Bars {
            title: format!("{run}: direct logit attribution per component{suffix}"),
            labels: rest.iter().map(|r| r.label.clone().unwrap_or_else(|| cell_name(r))).collect(),
            values: rest.iter().map(|r| r.value).collect(),
            baseline: None,
            value_label: "logit difference".into(),
        }));
    }
    if !heads.is_empty() {
        out.push(layer_by_head(
            &format!("{run}: direct logit attribution per head{suffix}"),
            &heads,
            "logit difference",
        ));
    }
    if !neurons.is_empty() {
        let mut top = neurons.clone();
        top.sort_by(|a, b| b.value.abs().total_cmp(&a.value.abs()));
        top.truncate(20);
        out.push(Figure::Bars(Bars {
            title: format!("{run}: the 20 neurons with the largest |direct logit attribution|{suffix}"),
            labels: top.iter().map(|r| r.label.clone().unwrap_or_else(|| cell_name(r))).collect(),
            values: top.iter().map(|r| r.value).collect(),
            baseline: None,
            value_label: "logit difference".into(),
        }));
    }
    out
}
