//! logit_lens: the accumulated residual stream at every layer read through the final norm, along
//! the answer direction, with the top-k next tokens per label.
use crate::analysis::activation_cache::{self, LensPositions};
use crate::error::{Error, Result};
use crate::kinds::shared::context::{component_rows, RunContext};
use crate::kinds::{
    no_prompt_check, only_note, whole_job_key, Captures, JobDraft, JobOutput, KindInfo, Needs, Part, RunKind, RunSpec,
    Sizing,
};
use crate::model::config::ModelConfig;
use crate::model::Model;
use crate::output::figure::{cell_name, group_by, Figure, Lines, RunFacts, Table};
use crate::output::table::Row;
use crate::output::token_label::token_label;
use std::path::Path;

use toml::Spanned;

use crate::kinds::options::Located;
use crate::spec::resolve::Ctx;
use crate::spec::resolve::{choice, positive};

pub const KIND: KindInfo = KindInfo {
    name: "logit_lens",
    needs,
    captures,
    check_model,
    check_prompts: no_prompt_check,
    jobs,
    run,
    note: only_note,
    key: whole_job_key,
    figures,
    pattern_heads: false,
};

/// A logit_lens [[run]]'s keys as written.
#[derive(Debug, serde::Deserialize)]
pub struct Raw {
    pub top_k: Option<Spanned<i64>>,
    pub top_k_at: Option<Spanned<String>>,
    pub incl_mid: Option<bool>,
}

/// A logit_lens run's options.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Options {
    pub incl_mid: bool,
    pub top_k: usize,
    pub top_k_at: LensPositions,
}

/// Seconds per cost unit relative to patching, measured: every label is unembedded at every
/// position for its top-k.
const COST_SCALE: f64 = 4.0;

fn needs(_: &RunKind) -> Needs {
    Needs { prompts: true, answers: true, analysis_cache: true, metric_direction: true, ..Needs::default() }
}

pub(crate) fn resolve(cx: &mut Ctx, r: &Raw, at: &mut Located, i: usize, _: &Path) -> Option<RunKind> {
    at.key(cx, "top_k", r.top_k.as_ref());
    Some(RunKind::LogitLens(Options {
        incl_mid: r.incl_mid.unwrap_or(false),
        top_k: positive(cx, &r.top_k, format!("run[{i}].top_k"), 0, 0) as usize,
        top_k_at: choice(
            cx,
            &r.top_k_at,
            format!("run[{i}].top_k_at"),
            &[("last", LensPositions::Last), ("all", LensPositions::All)],
            LensPositions::Last,
        ),
    }))
}

/// top_k within the vocabulary.
fn check_model(run: &RunSpec, cfg: &ModelConfig, file: &str, problems: &mut Vec<String>) {
    let RunKind::LogitLens(Options { top_k, .. }) = &run.kind else { return };
    if *top_k > cfg.d_vocab {
        problems.push(format!(
            "{}: run '{}': top_k = {top_k} is more tokens than the model's vocabulary of {}; use at most {}",
            run.key_at("top_k", file),
            run.name,
            cfg.d_vocab,
            cfg.d_vocab
        ));
    }
}

/// The accumulated residual at every label's hook.
fn captures(run: &RunSpec, model: &Model) -> Result<Captures> {
    let RunKind::LogitLens(Options { incl_mid, .. }) = &run.kind else { return Ok(Captures::default()) };
    Ok(Captures {
        analysis_points: activation_cache::lens_components(model, *incl_mid).into_iter().map(|(_, p, _)| p).collect(),
        ..Captures::default()
    })
}

fn jobs(run: &RunSpec, z: &Sizing) -> Vec<JobDraft> {
    vec![JobDraft::whole(format!("{}: logit_lens from the cached clean run", run.name), COST_SCALE * z.full(1))]
}

fn run(cx: &RunContext, run: &RunSpec, _: Part) -> Result<JobOutput> {
    let RunKind::LogitLens(Options { incl_mid, top_k, top_k_at }) = &run.kind else {
        return Err(Error::Other(format!("run '{}' is not a logit_lens run", run.name)));
    };
    logit_lens(cx, run, *incl_mid, *top_k, *top_k_at)
}

fn logit_lens(cx: &RunContext, run: &RunSpec, incl_mid: bool, top_k: usize, at: LensPositions) -> Result<JobOutput> {
    let toks = cx.toks()?;
    let metric = cx.metric()?;
    let (comps, top) = activation_cache::logit_lens_from(cx.model, cx.analysis_cache()?, &metric, incl_mid, top_k, at)?;
    let last = toks.clean.size()[1] - 1;
    let mut rows = Vec::new();
    component_rows(cx, &run.name, "logit_lens", &comps, last, &mut rows);
    let tok = cx.model.tokenizer()?;
    // Left padding is not the prompt: no predictions are written at pad positions.
    let pads: Vec<i64> = (0..toks.n_prompts()).map(|p| toks.padding(p)).collect();
    for t in top.iter().filter(|t| t.pos >= pads[t.prompt % pads.len()]) {
        let c = &comps[t.component];
        rows.push(Row {
            run: run.name.clone(),
            kind: "logit_lens".into(),
            hook: c.hook.clone(),
            layer: c.layer.map(|l| l as i32),
            pos: Some(t.pos as i32),
            prompt: Some(t.prompt as i32),
            label: Some(c.label.clone()),
            rank: Some(t.rank as i32),
            token_id: Some(t.token_id as i32),
            token: Some(tok.token_str(t.token_id)),
            value: t.prob,
            computed: true,
            ..Row::default()
        });
    }
    Ok((
        rows,
        serde_json::json!({"labels": comps.iter().map(|c| c.label.clone()).collect::<Vec<_>>(), "incl_mid": incl_mid, "top_k": top_k,
        "value": "mean over prompts of the final-norm'd accumulated residual at the last position along the answer direction; top-k rows: probability"}),
    ))
}

/// The lens along the answer direction, and the top-k tokens per label.
fn figures(run: &str, rows: &[&Row], _: &RunFacts, _: &str, suffix: &str) -> Vec<Figure> {
    let lens: Vec<&Row> = rows.iter().copied().filter(|r| r.rank.is_none()).collect();
    let mut out = Vec::new();
    if !lens.is_empty() {
        out.push(Figure::Lines(Lines {
            title: format!("{run}: accumulated residual along the answer direction{suffix}"),
            x_ticks: lens.iter().map(|r| r.label.clone().unwrap_or_else(|| cell_name(r))).collect(),
            series: vec![("logit difference".into(), lens.iter().map(|r| r.value).collect())],
            value_label: "logit difference".into(),
        }));
    }
    // The table shows the last position (top_k_at = "all" writes every position's rows: the
    // Parquet file holds them; one table row per label cannot).
    let last = rows.iter().filter(|r| r.rank.is_some()).filter_map(|r| r.pos).max();
    let top: Vec<&Row> = rows.iter().copied().filter(|r| r.rank.is_some() && r.pos == last).collect();
    if !top.is_empty() {
        let mut rows_out = Vec::new();
        for (label, rs) in group_by(&top, |r| r.label.clone().unwrap_or_default()) {
            let mut rs = rs;
            rs.sort_by_key(|r| r.rank);
            let cell = |r: &&Row| format!("{} {:.3}", token_label(r.token.as_deref().unwrap_or("")), r.value);
            rows_out.push(std::iter::once(label).chain(rs.iter().map(cell)).collect());
        }
        let k = top.iter().filter_map(|r| r.rank).max().unwrap_or(0) + 1;
        out.push(Figure::Table(Table {
            title: format!("{run}: most probable next tokens at the last position{suffix}"),
            header: std::iter::once("label".to_string()).chain((1..=k).map(|i| format!("#{i}"))).collect(),
            rows: rows_out,
        }));
    }
    out
}
