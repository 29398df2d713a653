//! activation_patching: TransformerLens's patching.py targets, one job per target and layer,
//! each cell the metric after patching the clean activation into the corrupted run.
use std::time::Instant;

use crate::analysis::patching::cannot_change;
use crate::analysis::patching::Axes;
use crate::analysis::patching::{cells_with_roles, sweep_together, Schedule, Target};
use crate::error::{Error, Result};
use crate::kinds::options::{check_sites, resolve_patch_targets, Located};
use crate::kinds::shared::context::{per_prompt, with_prompts, CellRows, RunContext};
use crate::kinds::{
    no_prompt_check, whole_job_key, Captures, JobDraft, JobOutput, KindInfo, Needs, Part, RunKind, RunSpec, Sizing,
};
use crate::model::config::ModelConfig;
use crate::model::hook_point::Site;
use crate::model::Model;
use crate::output::figure::{patching_figures, Figure, RunFacts};
use crate::output::table::Row;
use crate::spec::resolve::Ctx;
use toml::Spanned;

pub const KIND: KindInfo = KindInfo {
    name: "activation_patching",
    needs,
    captures,
    check_model,
    check_prompts: no_prompt_check,
    jobs,
    run,
    note,
    key,
    figures,
    pattern_heads: true,
};

/// An activation_patching [[run]]'s keys as written.
#[derive(Debug, serde::Deserialize)]
pub struct Raw {
    pub kind: Spanned<String>,
    #[serde(default)]
    pub hooks: Vec<Spanned<String>>,
    pub over: Option<Spanned<Vec<String>>>,
    pub layers: Option<Spanned<Vec<i64>>>,
    /// Each cell restores this many consecutive layers centred on its own (ROME's window).
    pub window: Option<Spanned<i64>>,
    /// Cells patched together in one forward (multi-site): [[layer, head], ...] over
    /// [layer, head], [[layer, pos], ...] over [layer, pos].
    pub units: Option<Spanned<Vec<Vec<i64>>>>,
}

/// An activation_patching run's options: its patch targets.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Options {
    pub targets: Vec<(Site, Axes)>,
    /// Recorded (and keyed) only when over 1, so runs without one read as before windows existed.
    #[serde(skip_serializing_if = "is_one")]
    pub window: usize,
    /// Multi-site: these (layer, head or pos) cells of the one target patched together.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub units: Option<Vec<(usize, i64)>>,
}

fn is_one(w: &usize) -> bool {
    *w == 1
}

fn needs(_: &RunKind) -> Needs {
    Needs { prompts: true, corruption: true, answers: true, clean_corrupted: true, ..Needs::default() }
}

/// A job patches one target at one layer: its key names those, not the run's other targets, so
/// a spec that adds a target reuses the stored jobs of the others.
fn key(run: &RunSpec, part: Part) -> Result<serde_json::Value> {
    let (RunKind::ActivationPatching(Options { targets, window, .. }), Part::TargetLayer { target, layer }) =
        (&run.kind, part)
    else {
        return whole_job_key(run, part);
    };
    Ok(match window {
        1 => serde_json::json!({"task": "patch", "target": targets[target], "layer": layer}),
        w => serde_json::json!({"task": "patch", "target": targets[target], "layer": layer, "window": w}),
    })
}

/// Targets at sites the model has.
fn check_model(run: &RunSpec, cfg: &ModelConfig, file: &str, problems: &mut Vec<String>) {
    if let RunKind::ActivationPatching(o) = &run.kind {
        check_sites(run, &o.targets, cfg, file, problems);
        let heads = |s: Site| if matches!(s, Site::K | Site::V) { cfg.n_kv_heads } else { cfg.n_heads } as i64;
        for &(layer, index) in o.units.iter().flatten() {
            let (site, axes) = o.targets[0];
            if layer >= cfg.n_layers || (axes == Axes::LayerHead && index >= heads(site)) {
                problems.push(format!(
                    "{}: run '{}': unit [{layer}, {index}] is out of range: the model has {} layers (0-{}){}",
                    run.key_at("units", file),
                    run.name,
                    cfg.n_layers,
                    cfg.n_layers - 1,
                    if axes == Axes::LayerHead { format!(" of {} heads", heads(site)) } else { String::new() }
                ));
            }
        }
        if o.window > cfg.n_layers {
            problems.push(format!(
                "{file}: run '{}': window = {} is larger than the model's {} layers; use at most {}",
                run.name, o.window, cfg.n_layers, cfg.n_layers
            ));
        }
    }
}

pub(crate) fn resolve(cx: &mut Ctx, r: &Raw, at: &mut Located, i: usize, _: &std::path::Path) -> Option<RunKind> {
    at.layers(cx, &r.layers, i);
    let window = crate::spec::resolve::positive(cx, &r.window, format!("run[{i}].window"), 1, 1) as usize;
    at.key(cx, "units", r.units.as_ref());
    let targets = resolve_patch_targets(cx, &r.kind, &r.hooks, &r.over, i)?;
    let units = match &r.units {
        None => None,
        Some(u) => {
            let key = format!("run[{i}].units");
            let single = matches!(targets.as_slice(), [(_, Axes::LayerHead | Axes::LayerPos)]);
            if !single {
                cx.at(u, key, "units are cells of one target patched together: give one hook over [layer, head] (heads) or [layer, pos] (positions)");
                return None;
            }
            if u.get_ref().is_empty() || u.get_ref().iter().any(|c| c.len() != 2 || c.iter().any(|&x| x < 0)) {
                let what = if targets[0].1 == Axes::LayerHead { "[layer, head]" } else { "[layer, pos]" };
                cx.at(
                    u,
                    key,
                    format!("give at least one unit, each {what} of non-negative integers, got {:?}", u.get_ref()),
                );
                return None;
            }
            Some(u.get_ref().iter().map(|c| (c[0] as usize, c[1])).collect())
        }
    };
    Some(RunKind::ActivationPatching(Options { targets, window, units }))
}

/// The clean run caches every patched site.
fn captures(run: &RunSpec, _: &Model) -> Result<Captures> {
    let RunKind::ActivationPatching(Options { targets, .. }) = &run.kind else { return Ok(Captures::default()) };
    Ok(Captures { clean_sites: targets.iter().map(|(s, _)| *s).collect(), ..Captures::default() })
}

/// One job per target and layer: cells that provably cannot change are filled, the rest run in
/// batches from the patched layer on.
fn jobs(run: &RunSpec, z: &Sizing) -> Vec<JobDraft> {
    let RunKind::ActivationPatching(Options { targets, window, units }) = &run.kind else { return vec![] };
    if let Some(units) = units {
        let first = units.iter().map(|u| u.0).min().unwrap_or(0);
        return vec![JobDraft {
            name: format!("{}: patch {} units of {} together", run.name, units.len(), targets[0].0.name()),
            part: Part::Whole,
            cells: 1,
            filled: 0,
            forwards: 1,
            tl_forwards: 1,
            cost: z.patch_cost(1, first),
        }];
    }
    let mut out = Vec::new();
    for (t, (site, axes)) in targets.iter().enumerate() {
        for &layer in &z.layers {
            let target = Target { site: *site, axes: *axes, window: *window };
            let at = cells_with_roles(z.cfg, target, layer, z.seq as i64, z.roles);
            // A window's forwards start at its first layer.
            let from = target.window_layers(layer, z.cfg.n_layers).start;
            let filled = at.iter().filter(|c| cannot_change(c, z.first_diff)).count();
            let todo = at.len() - filled;
            out.push(JobDraft {
                name: format!(
                    "{}: patch {} over [{}] at layer {layer}",
                    run.name,
                    site.name(),
                    axes.names().join(", ")
                ),
                part: Part::TargetLayer { target: t, layer },
                cells: at.len(),
                filled,
                forwards: todo.div_ceil(z.chunk),
                tl_forwards: at.len(),
                cost: z.patch_cost(todo, from),
            });
        }
    }
    out
}

fn run(cx: &RunContext, run: &RunSpec, part: Part) -> Result<JobOutput> {
    if let (RunKind::ActivationPatching(Options { targets, units: Some(units), .. }), Part::Whole) = (&run.kind, part) {
        return patch_units(cx, run, targets[0], units);
    }
    let mut out = patch_together(cx, &[(run, part)])?;
    Ok(out.pop().expect("one result per job"))
}

/// Activation patching of several (run, target, layer) jobs, each the cells of one target at one
/// layer in TransformerLens's order: the jobs at one layer share their forwards
/// (analysis::patching::sweep_together). One (rows, note) per job, in the order given.
pub fn patch_together(cx: &RunContext, jobs: &[(&RunSpec, Part)]) -> Result<Vec<JobOutput>> {
    let (model, prep) = (cx.model, cx.clean_corrupted()?);
    let n = cx.toks()?.n_prompts();
    let (clean_b, corr_b) = (prep.clean_baseline(), prep.corrupted_baseline());
    let norm = |v: f64| if cx.spec.metric.normalize { (v - corr_b) / (clean_b - corr_b) } else { v };
    let mut parts = Vec::with_capacity(jobs.len());
    let mut sites = Vec::with_capacity(jobs.len());
    for (run, part) in jobs {
        let (RunKind::ActivationPatching(Options { targets, window, .. }), Part::TargetLayer { target, layer }) =
            (&run.kind, *part)
        else {
            return Err(Error::Other(format!(
                "run '{}': activation patching runs one target at one layer per job",
                run.name
            )));
        };
        let (site, axes) =
            *targets.get(target).ok_or_else(|| Error::Other(format!("run '{}' has no target {target}", run.name)))?;
        let t = Target::new(site, axes)?.with_window(*window);
        if axes.by_role() && prep.role_positions.is_empty() {
            return Err(Error::Config(format!(
                "run '{}' patches over roles (over = [{}]), and the prompts have none: roles come from [prompts] templates",
                run.name,
                axes.names().join(", ")
            )));
        }
        parts.push((t, cells_with_roles(&model.cfg, t, layer, prep.seq_len(), &prep.role_positions)));
        sites.push((site, axes, layer));
    }
    let total: usize = parts.iter().map(|(_, c)| c.len()).sum();
    let label = match jobs {
        [(run, _)] => {
            format!("{}: {} [{}] layer {}", run.name, sites[0].0.name(), sites[0].1.names().join(","), sites[0].2)
        }
        _ => format!("{} patching jobs together", jobs.len()),
    };
    let pb = cx.bar(total, label);
    let t = Instant::now();
    let sweeps = sweep_together(model, prep, &parts, |k| pb.inc(k as u64)).map_err(|e| {
        let names: Vec<&str> = sites.iter().map(|(s, _, _)| s.name()).collect();
        Error::Other(format!("{}: {e}", names.join(", ")))
    })?;
    pb.finish_and_clear();
    // The shared time, shared out by computed cells.
    let seconds = t.elapsed().as_secs_f64();
    let computed: Vec<usize> = sweeps.iter().map(|s| s.skipped.iter().filter(|k| !**k).count()).collect();
    let all_computed = computed.iter().sum::<usize>().max(1) as f64;
    let mut out = Vec::with_capacity(jobs.len());
    for (j, s) in sweeps.iter().enumerate() {
        let ((run, _), (site, axes, layer)) = (&jobs[j], sites[j]);
        let mut rows = Vec::with_capacity(s.cells.len() * if cx.per_prompt(&run.name) { n + 1 } else { 1 });
        let mut cell_rows = CellRows::new(&run.name, "activation_patching", site);
        let toks = cx.toks()?;
        for (i, c) in s.cells.iter().enumerate() {
            let values: Vec<f64> = per_prompt(&s.per_prompt[i], n).into_iter().map(norm).collect();
            let base = Row { computed: !s.skipped[i], ..cell_rows.row(c) };
            match c.role {
                Some(r) => role_rows(cx, toks, base, r, &values, norm(s.mean(i)), &mut rows),
                None => with_prompts(cx, base, &values, norm(s.mean(i)), c.pos.or(c.dest), &mut rows),
            }
        }
        let note = serde_json::json!({
            "hook": site.name(), "over": axes.names(), "layer": layer, "cells": s.cells.len(), "batched_forwards": s.forwards,
            "filled_without_compute": s.skipped.iter().filter(|k| **k).count(), "seconds": seconds * computed[j] as f64 / all_computed,
            "cells_per_forward": s.cells_per_forward, "oom_halvings": s.oom_halvings, "first_diff": prep.first_diff,
            "forwards_shared_with_jobs": jobs.len() - 1, "schedule": Schedule::for_device(model.device).name(),
            "row_position_layers": s.computed,
        });
        let mut note = note;
        if parts[j].0.window > 1 {
            let w = parts[j].0.window_layers(layer, model.cfg.n_layers);
            note["window"] = parts[j].0.window.into();
            note["window_layers"] = serde_json::json!([w.start, w.end - 1]);
        }
        out.push((rows, note));
    }
    Ok(out)
}

/// Multi-site patching: the units of one target patched together in one forward; one row (and
/// one per prompt), named by its units.
fn patch_units(
    cx: &RunContext,
    run: &RunSpec,
    (site, axes): (Site, Axes),
    units: &[(usize, i64)],
) -> Result<JobOutput> {
    let (model, prep) = (cx.model, cx.clean_corrupted()?);
    let n = cx.toks()?.n_prompts();
    let (clean_b, corr_b) = (prep.clean_baseline(), prep.corrupted_baseline());
    let norm = |v: f64| if cx.spec.metric.normalize { (v - corr_b) / (clean_b - corr_b) } else { v };
    if let Some(&(l, p)) = units.iter().find(|u| axes == Axes::LayerPos && u.1 >= prep.seq_len()) {
        return Err(Error::Config(format!(
            "run '{}': unit [{l}, {p}] is past the prompts' {} positions",
            run.name,
            prep.seq_len()
        )));
    }
    let cells: Vec<crate::analysis::patching::Cell> =
        units.iter().map(|&(layer, i)| crate::analysis::patching::Cell::unit(layer, axes, i)).collect();
    let t = Instant::now();
    let per_row = crate::analysis::patching::patch_jointly(model, prep, Target::new(site, axes)?, &cells)?;
    let values: Vec<f64> = per_prompt(&per_row, n).into_iter().map(norm).collect();
    let names: Vec<String> = units
        .iter()
        .map(|&(l, i)| if axes == Axes::LayerHead { format!("L{l}H{i}") } else { format!("L{l}P{i}") })
        .collect();
    let unit = names.join("+");
    let base = Row {
        run: run.name.clone(),
        kind: "activation_patching".into(),
        hook: site.name().to_string(),
        label: Some(format!("patched {unit}")),
        unit: Some(unit),
        computed: true,
        ..Row::default()
    };
    let mut rows = Vec::new();
    with_prompts(cx, base, &values, crate::analysis::mean(&values), None, &mut rows);
    let note = serde_json::json!({"hook": site.name(), "over": axes.names(), "units": units, "batched_forwards": 1,
        "seconds": t.elapsed().as_secs_f64(), "first_diff": prep.first_diff});
    Ok((rows, note))
}

/// A role cell's rows: the mean names the role (its position differs between prompts); a
/// prompt's row also has the role's position in that prompt's own tokens and the token there.
fn role_rows(
    cx: &RunContext,
    toks: &crate::kinds::shared::inputs::Tokenized,
    base: Row,
    role: usize,
    values: &[f64],
    mean: f64,
    rows: &mut Vec<Row>,
) {
    let (name, at) = &toks.roles[role];
    let base = Row { role: Some(name.clone()), pos: None, ..base };
    if cx.per_prompt(&base.run) {
        for (p, v) in values.iter().enumerate() {
            let padded = at[p];
            let pos = padded - toks.padding(p);
            let token = toks.token(p, Some(padded));
            rows.push(Row { prompt: Some(p as i32), value: *v, pos: Some(pos as i32), token, ..base.clone() });
        }
    }
    rows.push(Row { value: mean, ..base });
}

/// The note of an activation-patching run: its per-layer jobs' notes summed per target.
fn note(job_notes: &[&serde_json::Value]) -> serde_json::Value {
    let first_diff = job_notes.iter().find_map(|n| n["first_diff"].as_i64());
    let mut sweeps: Vec<serde_json::Value> = Vec::new();
    for n in job_notes {
        match sweeps.iter_mut().find(|s| s["hook"] == n["hook"] && s["over"] == n["over"]) {
            Some(s) => {
                for k in ["cells", "batched_forwards", "filled_without_compute", "oom_halvings"] {
                    s[k] = (s[k].as_u64().unwrap_or(0) + n[k].as_u64().unwrap_or(0)).into();
                }
                s["seconds"] = (s["seconds"].as_f64().unwrap_or(0.0) + n["seconds"].as_f64().unwrap_or(0.0)).into();
                // The most jobs any of this target's forwards were shared with.
                s["forwards_shared_with_jobs"] = s["forwards_shared_with_jobs"]
                    .as_u64()
                    .unwrap_or(0)
                    .max(n["forwards_shared_with_jobs"].as_u64().unwrap_or(0))
                    .into();
            }
            None => {
                let mut s = (*n).clone();
                if let Some(o) = s.as_object_mut() {
                    o.remove("layer");
                    o.remove("first_diff");
                    o.remove("window_layers");
                }
                sweeps.push(s);
            }
        }
    }
    let rule = first_diff.map(|f| format!("positions before {f} (the first token where clean and corrupted differ) cannot change under causal attention; pattern entries with src > dest are masked; filled with the corrupted baseline"));
    serde_json::json!({"sweeps": sweeps, "fill_rule": rule})
}

/// A heatmap per hook.
fn figures(run: &str, rows: &[&Row], facts: &RunFacts, metric: &str, suffix: &str) -> Vec<Figure> {
    // The values are the patched metric itself: white where patching restores nothing.
    patching_figures(run, rows, facts, metric, suffix, facts.metric_centre.unwrap_or(0.0))
}
