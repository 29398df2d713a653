//! attribution_patching: AtP (and AtP* with qk_fix / grad_drop), one forward+backward shared by
//! every attribution run, the estimate for every cell, and the top cells patched for real.
use std::time::Instant;

use crate::analysis::attribution::{attribute_with, correlations, largest_first, AtpOptions};
use crate::analysis::attribution::{clean_sites, points_for};
use crate::analysis::patching::cells_at;
use crate::analysis::patching::{sweep_cells, Axes, Cell, Target};
use crate::error::{Error, Result};
use crate::kinds::options::{check_sites, resolve_patch_targets, Located};
use crate::kinds::shared::context::{per_prompt, CellRows, RunContext};
use crate::kinds::shared::inputs::token_at;
use crate::kinds::{
    no_prompt_check, only_note, whole_job_key, Captures, JobDraft, JobOutput, KindInfo, Needs, Part, RunKind, RunSpec,
    Sizing,
};
use crate::model::config::ModelConfig;
use crate::model::hook_point::Site;
use crate::model::Model;
use crate::output::figure::{patching_figures, Figure, RunFacts};
use crate::output::table::Row;
use crate::spec::resolve::positive;
use crate::spec::resolve::Ctx;
use toml::Spanned;

pub const KIND: KindInfo = KindInfo {
    name: "attribution_patching",
    needs,
    captures,
    check_model,
    check_prompts: no_prompt_check,
    jobs,
    run,
    note: only_note,
    key: whole_job_key,
    figures,
    pattern_heads: true,
};

/// An attribution_patching [[run]]'s keys as written.
#[derive(Debug, serde::Deserialize)]
pub struct Raw {
    pub kind: Spanned<String>,
    #[serde(default)]
    pub hooks: Vec<Spanned<String>>,
    pub over: Option<Spanned<Vec<String>>>,
    pub layers: Option<Spanned<Vec<i64>>>,
    pub verify_top: Option<Spanned<i64>>,
    pub qk_fix: Option<bool>,
    pub grad_drop: Option<bool>,
}

/// An attribution_patching run's options.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Options {
    pub targets: Vec<(Site, Axes)>,
    pub options: AtpOptions,
    /// The largest estimates patched for real.
    pub verify_top: usize,
}

/// Seconds per cost unit relative to patching, measured (GPT-2-small-shaped IOI run): the job
/// multiplies gradients over every cell besides its verify patches.
const COST_SCALE: f64 = 1.7;

fn needs(kind: &RunKind) -> Needs {
    Needs {
        prompts: true,
        corruption: true,
        answers: true,
        clean_corrupted: true,
        attribution_pass: true,
        attribution_pass_per_layer: matches!(kind, RunKind::AttributionPatching(o) if o.options.grad_drop),
        ..Needs::default()
    }
}

/// Targets at sites the model has.
fn check_model(run: &RunSpec, cfg: &ModelConfig, file: &str, problems: &mut Vec<String>) {
    if let RunKind::AttributionPatching(o) = &run.kind {
        check_sites(run, &o.targets, cfg, file, problems);
    }
}

pub(crate) fn resolve(cx: &mut Ctx, r: &Raw, at: &mut Located, i: usize, _: &std::path::Path) -> Option<RunKind> {
    at.layers(cx, &r.layers, i);
    let targets = resolve_patch_targets(cx, &r.kind, &r.hooks, &r.over, i)?;
    if let (Some(over), true) = (&r.over, targets.iter().any(|(_, a)| a.by_role())) {
        cx.at(over, format!("run[{i}].over"), "attribution_patching runs over positions, not roles: use over = [\"layer\", \"pos\"] (activation_patching patches by role)");
        return None;
    }
    Some(targets).map(|targets| {
        let verify_top = positive(cx, &r.verify_top, format!("run[{i}].verify_top"), 0, 0) as usize;
        RunKind::AttributionPatching(Options {
            targets,
            options: AtpOptions { qk_fix: r.qk_fix.unwrap_or(false), grad_drop: r.grad_drop.unwrap_or(false) },
            verify_top,
        })
    })
}

/// The clean run caches what the estimates read; the corrupted forward+backward captures the
/// targets' points (and what AtP* needs).
fn captures(run: &RunSpec, model: &Model) -> Result<Captures> {
    let RunKind::AttributionPatching(Options { targets, options, .. }) = &run.kind else {
        return Ok(Captures::default());
    };
    let t: Vec<Target> = targets.iter().map(|(s, a)| Target::new(*s, *a)).collect::<Result<_>>()?;
    let layers = run.layers_or_all(model.cfg.n_layers);
    Ok(Captures {
        clean_sites: clean_sites(model, &t, *options),
        gradient_points: points_for(model, &t, &layers, *options),
        ..Captures::default()
    })
}

/// One job: every target's estimates from the shared pass, then the verify_top patches.
fn jobs(run: &RunSpec, z: &Sizing) -> Vec<JobDraft> {
    let RunKind::AttributionPatching(Options { targets, verify_top, .. }) = &run.kind else { return vec![] };
    let cells: usize = targets
        .iter()
        .map(|(s, a)| {
            z.layers
                .iter()
                .map(|&l| cells_at(z.cfg, Target { site: *s, axes: *a, window: 1 }, l, z.seq as i64).len())
                .sum::<usize>()
        })
        .sum();
    let verify = targets.len() * verify_top;
    let also = if *verify_top > 0 { format!(", patch the top {verify_top} per target") } else { String::new() };
    vec![JobDraft {
        cells,
        forwards: targets.len() * verify_top.div_ceil(z.chunk),
        tl_forwards: verify,
        ..JobDraft::whole(
            format!("{}: attribution of {} targets{also}", run.name, targets.len()),
            COST_SCALE * (z.full(1) + z.patch_cost(verify, z.cfg.n_layers / 2)),
        )
    }]
}

fn run(cx: &RunContext, run: &RunSpec, _: Part) -> Result<JobOutput> {
    let RunKind::AttributionPatching(Options { targets, options, verify_top }) = &run.kind else {
        return Err(Error::Other(format!("run '{}' is not an attribution_patching run", run.name)));
    };
    attribution_patching(cx, run, targets, *options, *verify_top)
}

fn attribution_patching(
    cx: &RunContext,
    run: &RunSpec,
    targets: &[(Site, Axes)],
    options: AtpOptions,
    verify_top: usize,
) -> Result<JobOutput> {
    let (model, prep) = (cx.model, cx.clean_corrupted()?);
    let n = cx.toks()?.n_prompts();
    let (clean_b, corr_b) = (prep.clean_baseline(), prep.corrupted_baseline());
    // Attribution estimates a change from the corrupted run: normalising divides by the gap.
    let scale = if cx.spec.metric.normalize { 1.0 / (clean_b - corr_b) } else { 1.0 };
    let targets: Vec<Target> = targets.iter().map(|(s, a)| Target::new(*s, *a)).collect::<Result<_>>()?;
    let layers = run.layers_or_all(cx.model.cfg.n_layers);
    let t = Instant::now();
    let atts = attribute_with(model, prep, cx.atp_pass()?, &targets, &layers, options, cx.per_prompt(&run.name))?;
    let atp_secs = t.elapsed().as_secs_f64();
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for a in &atts {
        // The real patching effect of the cells with the largest |estimate|.
        let top = largest_first(&a.mean, verify_top);
        // The real change per cell: the mean, and per prompt (each against its own baseline).
        let mut patched: Vec<Option<(f64, Vec<f64>)>> = vec![None; a.cells.len()];
        let mut verify_note = serde_json::Value::Null;
        if !top.is_empty() {
            let cells: Vec<Cell> = top.iter().map(|&i| a.cells[i]).collect();
            let pb = cx.bar(cells.len(), format!("{}: verify {} top cells", run.name, a.target.site.name()));
            let s = sweep_cells(model, prep, a.target, &cells, |k| pb.inc(k as u64))?;
            pb.finish_and_clear();
            let corr_pp = per_prompt(&prep.corrupted_per_prompt, n);
            for (j, &i) in top.iter().enumerate() {
                let pp = per_prompt(&s.per_prompt[j], n).iter().zip(&corr_pp).map(|(v, c)| (v - c) * scale).collect();
                patched[i] = Some(((s.mean(j) - corr_b) * scale, pp));
            }
            let est: Vec<f64> = top.iter().map(|&i| a.mean[i] * scale).collect();
            let real: Vec<f64> = top.iter().map(|&i| patched[i].as_ref().expect("set").0).collect();
            let (pearson, spearman) = correlations(&est, &real);
            verify_note = serde_json::json!({"cells": top.len(), "batched_forwards": s.forwards, "pearson": pearson, "spearman": spearman});
        }
        notes.push(serde_json::json!({"hook": a.target.site.name(), "over": a.target.axes.names(), "cells": a.cells.len(), "verify_top": verify_note}));
        push_cell_rows(&mut rows, run, a, &patched, scale, n, cx.toks.map(|t| &t.clean_strs));
    }
    let passes = 1 + if options.grad_drop { model.cfg.n_layers } else { 0 };
    Ok((
        rows,
        serde_json::json!({
            "targets": notes, "options": options, "forward_backward_passes": passes, "seconds": atp_secs,
            "value": "estimated change of the metric from the corrupted run (normalised by clean - corrupted when metric.normalize); patched: the real change"
        }),
    ))
}

/// One row per cell (the prompt-set estimate) and, with per-prompt metrics, one per prompt
/// before it, appended to `rows` on all cores: a pattern target's rows (230,400 on an 8B model's
/// 100 prompts) took longer to build one by one than its estimates took on the GPU. Each row is
/// written in its place, so none is moved after it is built.
fn push_cell_rows(
    rows: &mut Vec<Row>,
    run: &RunSpec,
    a: &crate::analysis::attribution::Attribution,
    patched: &[Option<(f64, Vec<f64>)>],
    scale: f64,
    n: usize,
    tokens: Option<&Vec<Vec<String>>>,
) {
    use rayon::prelude::*;
    // Estimates per prompt are there when the metric asked for them.
    let per_prompts = !a.per_prompt.is_empty();
    let token = |prompt: usize, pos: Option<i64>| tokens.and_then(|t| token_at(t, prompt, pos));
    let per_cell = if per_prompts { n + 1 } else { 1 };
    let start = rows.len();
    rows.resize(start + a.cells.len() * per_cell, Row::default());
    rows[start..].par_chunks_mut(per_cell).zip(a.cells.par_iter()).enumerate().for_each_init(
        // One per rayon task: a task's cells are consecutive, so each layer's hook name is
        // formatted about once.
        || CellRows::new(&run.name, "attribution_patching", a.target.site),
        |cell_rows, (i, (out, c))| {
            let base = cell_rows.row(c);
            let token_pos = c.pos.or(c.dest);
            if per_prompts {
                for (p, v) in per_prompt(&a.per_prompt[i], n).into_iter().enumerate() {
                    let real = patched[i].as_ref().map(|(_, pp)| pp[p]);
                    out[p] = Row {
                        prompt: Some(p as i32),
                        value: v * scale,
                        patched: real,
                        token: token(p, token_pos),
                        ..base.clone()
                    };
                }
            }
            out[per_cell - 1] = Row {
                value: a.mean[i] * scale,
                patched: patched[i].as_ref().map(|(m, _)| *m),
                token: token(0, token_pos),
                ..base
            };
        },
    );
}

/// A heatmap of the estimates per hook, and the verified cells against real patching.
fn figures(run: &str, rows: &[&Row], facts: &RunFacts, metric: &str, suffix: &str) -> Vec<Figure> {
    // The values are changes of the metric: white where there is none, whatever the baseline.
    patching_figures(run, rows, facts, &format!("estimated change of {metric}"), suffix, 0.0)
}
