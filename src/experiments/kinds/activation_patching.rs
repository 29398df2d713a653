//! activation_patching: TransformerLens's patching.py targets, one job per target and layer,
//! each cell the metric after patching the clean activation into the corrupted run.
use std::time::Instant;

use crate::error::{Error, Result};
use crate::experiments::activation_patching::{cells_at, sweep_layers, Axes, Target};
use crate::experiments::context::{cell_row, per_prompt, with_prompts, RunContext};
use crate::experiments::activation_patching::cannot_change;
use crate::experiments::kinds::{Captures, JobDraft, KindInfo, Needs, Part, Sizing};
use crate::model::Model;
use crate::model::hook_point::Site;
use crate::output::table::Row;
use crate::spec::raw::RawRun;
use crate::spec::resolve::Ctx;
use crate::spec::runs::resolve_patch_targets;
use crate::spec::{RunKind, RunSpec};

pub const KIND: KindInfo = KindInfo { name: "activation_patching", keys: &["hooks", "over", "layers"], resolve, needs, captures, jobs, run, note };

fn needs(_: &RunKind) -> Needs {
    Needs { prompts: true, corruption: true, answers: true, clean_and_corrupted: true, ..Needs::default() }
}

fn resolve(cx: &mut Ctx, r: &RawRun, i: usize, _: &std::path::Path) -> Option<RunKind> {
    resolve_patch_targets(cx, r, i).map(|targets| RunKind::ActivationPatching { targets })
}

/// The clean run caches every patched site.
fn captures(run: &RunSpec, _: &Model) -> Result<Captures> {
    let RunKind::ActivationPatching { targets } = &run.kind else { return Ok(Captures::default()) };
    Ok(Captures { clean_sites: targets.iter().map(|(s, _)| *s).collect(), ..Captures::default() })
}

/// One job per target and layer: cells that provably cannot change are filled, the rest run in
/// batches from the patched layer on.
fn jobs(run: &RunSpec, z: &Sizing) -> Vec<JobDraft> {
    let RunKind::ActivationPatching { targets } = &run.kind else { return vec![] };
    let mut out = Vec::new();
    for (t, (site, axes)) in targets.iter().enumerate() {
        for &layer in &z.layers {
            let at = cells_at(z.cfg, Target { site: *site, axes: *axes }, layer, z.seq as i64);
            let filled = at.iter().filter(|c| cannot_change(c, z.first_diff)).count();
            let todo = at.len() - filled;
            out.push(JobDraft {
                name: format!("{}: patch {} over [{}] at layer {layer}", run.name, site.name(), axes.names().join(", ")),
                part: Part::TargetLayer { target: t, layer },
                cells: at.len(),
                filled,
                forwards: todo.div_ceil(z.chunk),
                tl_forwards: at.len(),
                cost: z.patch_cost(todo, layer),
            });
        }
    }
    out
}

fn run(cx: &RunContext, run: &RunSpec, part: Part) -> Result<(Vec<Row>, serde_json::Value)> {
    let (RunKind::ActivationPatching { targets }, Part::TargetLayer { target, layer }) = (&run.kind, part) else {
        return Err(Error::Other(format!("run '{}': activation patching runs one target at one layer per job", run.name)));
    };
    let (site, axes) = targets.get(target).ok_or_else(|| Error::Other(format!("run '{}' has no target {target}", run.name)))?;
    patch_layer(cx, run, *site, *axes, layer)
}

/// Activation patching of one target at one layer: the cells of that layer, in
/// TransformerLens's order, each batch of patches run from this layer on.
fn patch_layer(cx: &RunContext, run: &RunSpec, site: Site, axes: Axes, layer: usize) -> Result<(Vec<Row>, serde_json::Value)> {
    let (model, prep) = (cx.model, cx.prep()?);
    let n = cx.toks()?.n_prompts();
    let (clean_b, corr_b) = (prep.clean_baseline(), prep.corrupted_baseline());
    let norm = |v: f64| if cx.spec.metric.normalize { (v - corr_b) / (clean_b - corr_b) } else { v };
    let target = Target::new(site, axes)?;
    let total = cells_at(&model.cfg, target, layer, prep.seq_len()).len();
    let pb = cx.bar(total, format!("{}: {} [{}] layer {layer}", run.name, site.name(), axes.names().join(",")));
    let t = Instant::now();
    let s = sweep_layers(model, prep, target, &[layer], |k| pb.inc(k as u64)).map_err(|e| Error::Other(format!("{}: {e}", site.name())))?;
    pb.finish_and_clear();
    let mut rows = Vec::new();
    for (i, c) in s.cells.iter().enumerate() {
        let values: Vec<f64> = per_prompt(&s.per_prompt[i], n).into_iter().map(norm).collect();
        let base = Row { computed: !s.skipped[i], ..cell_row(&run.name, "activation_patching", site, c) };
        with_prompts(cx, base, &values, norm(s.mean(i)), c.pos.or(c.dest), &mut rows);
    }
    let note = serde_json::json!({
        "hook": site.name(), "over": axes.names(), "layer": layer, "cells": s.cells.len(), "batched_forwards": s.forwards,
        "filled_without_compute": s.skipped.iter().filter(|k| **k).count(), "seconds": t.elapsed().as_secs_f64(),
        "cells_per_forward": s.cells_per_forward, "oom_halvings": s.oom_halvings, "first_diff": prep.first_diff,
    });
    Ok((rows, note))
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
            }
            None => {
                let mut s = (*n).clone();
                if let Some(o) = s.as_object_mut() {
                    o.remove("layer");
                    o.remove("first_diff");
                }
                sweeps.push(s);
            }
        }
    }
    let rule = first_diff.map(|f| format!("positions before {f} (the first token where clean and corrupted differ) cannot change under causal attention; pattern entries with src > dest are masked; filled with the corrupted baseline"));
    serde_json::json!({"sweeps": sweeps, "fill_rule": rule})
}

