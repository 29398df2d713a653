//! Each run kind: compute with the experiments/ module of that kind, then lay the result out as
//! tidy rows and a manifest note.
use std::cell::OnceCell;
use std::collections::HashMap;
use std::time::Instant;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tch::Tensor;

use crate::engine::metric::Metric;
use crate::error::{Error, Result};
use crate::experiments::ablation::{run_ablation, AblationInputs, AblationOutcome, AblationSpec, Measure, Unit};
use crate::experiments::activation_patching::{cells_at, sweep_cells, sweep_layers, Cell, Target};
use crate::experiments::attribution::{attribute_with, correlations, points_for, AtpOptions, Pass};
use crate::experiments::cache_analysis::{self, Component, DlaOver, LensPositions};
use crate::experiments::head_scores::{self, DetectOptions, Detection};
use crate::experiments::mean;
use crate::experiments::prepared::Prepared;
use crate::experiments::inputs::Tokenized;
use crate::graph::Task;
use crate::model::hook_point::{HookPoint, Site};
use crate::model::Model;
use crate::output::table::Row;
use crate::spec::runs::HeadSource;
use crate::spec::{RunKind, RunSpec, Spec};

/// What every job reads: the spec, the model, the tokenized prompts and the shared passes, each
/// made when its job in the graph runs (or on first use).
pub struct RunContext<'a> {
    pub spec: &'a Spec,
    pub model: &'a Model,
    pub toks: Option<&'a Tokenized>,
    /// Where job progress bars go (None: no bars).
    pub progress: Option<MultiProgress>,
    /// The clean and corrupted runs every patching run shares.
    prep: OnceCell<Prepared>,
    /// The corrupted forward+backward every attribution run reads, made on first use for the
    /// union of their hook points.
    atp_pass: OnceCell<Pass>,
    /// The clean run's cache every logit-lens, DLA and head-score run reads, likewise.
    analysis_cache: OnceCell<HashMap<HookPoint, Tensor>>,
}

impl<'a> RunContext<'a> {
    pub fn new(spec: &'a Spec, model: &'a Model, toks: Option<&'a Tokenized>, progress: Option<MultiProgress>) -> Self {
        RunContext { spec, model, toks, progress, prep: OnceCell::new(), atp_pass: OnceCell::new(), analysis_cache: OnceCell::new() }
    }

    /// Runs a shared pass now (its job in the graph).
    pub fn force(&self, task: Task) -> Result<()> {
        match task {
            Task::Prepare => self.prep().map(|_| ()),
            Task::AttributionPass => self.atp_pass().map(|_| ()),
            Task::AnalysisCache => self.analysis_cache().map(|_| ()),
            _ => Ok(()),
        }
    }

    /// The shared clean and corrupted runs, if made.
    pub fn prepared(&self) -> Option<&Prepared> {
        self.prep.get()
    }

    fn atp_pass(&self) -> Result<&Pass> {
        if self.atp_pass.get().is_none() {
            let mut points: Vec<HookPoint> = Vec::new();
            for r in &self.spec.runs {
                if let RunKind::AttributionPatching { targets, options, .. } = &r.kind {
                    let t: Vec<Target> = targets.iter().map(|(s, a)| Target::new(*s, *a)).collect::<Result<_>>()?;
                    points.extend(points_for(self.model, &t, &layers_of(self, r), *options));
                }
            }
            points.sort_by_key(|p| p.to_string());
            points.dedup();
            let _ = self.atp_pass.set(Pass::new(self.model, self.prep()?, &points)?);
        }
        Ok(self.atp_pass.get().expect("set above"))
    }

    fn analysis_cache(&self) -> Result<&HashMap<HookPoint, Tensor>> {
        if self.analysis_cache.get().is_none() {
            let model = self.model;
            let mut points: Vec<HookPoint> = Vec::new();
            for r in &self.spec.runs {
                match &r.kind {
                    RunKind::LogitLens { incl_mid, .. } => points.extend(cache_analysis::lens_components(model, *incl_mid).into_iter().map(|(_, p, _)| p)),
                    RunKind::DirectLogitAttribution { over } => points.extend(cache_analysis::dla_points(model, *over)),
                    RunKind::HeadScores { source: HeadSource::Prompts, .. } => points.extend(head_scores::pattern_points(model)),
                    _ => {}
                }
            }
            let toks = self.toks()?;
            let mut hooks = crate::Hooks::capture(points);
            let _ = model.run(crate::Input::Tokens(&toks.clean), toks.mask.as_ref(), &mut hooks, crate::Stop::FinalNorm)?;
            let _ = self.analysis_cache.set(hooks.cache);
        }
        Ok(self.analysis_cache.get().expect("set above"))
    }

    fn toks(&self) -> Result<&Tokenized> {
        self.toks.ok_or_else(|| Error::Other("this run needs prompts".into()))
    }
    pub fn prep(&self) -> Result<&Prepared> {
        if self.prep.get().is_none() {
            let p = crate::panics::guarded("the clean and corrupted runs", || crate::experiments::inputs::prepare(self.spec, self.model, self.toks()?))?;
            tracing::info!(clean = p.clean_baseline(), corrupted = p.corrupted_baseline(), first_diff = p.first_diff, "baselines");
            let _ = self.prep.set(p);
        }
        Ok(self.prep.get().expect("set above"))
    }
    fn metric(&self) -> Result<Metric> {
        let t = self.toks()?;
        Ok(Metric { kind: self.spec.metric.kind, correct: t.correct.clone(), incorrect: t.incorrect.clone() })
    }
    fn bar(&self, len: usize, msg: String) -> ProgressBar {
        let Some(multi) = &self.progress else { return ProgressBar::hidden() };
        let b = multi.add(ProgressBar::new(len as u64));
        b.set_style(ProgressStyle::with_template("{msg:40} [{bar:30}] {pos}/{len} {elapsed}").unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("=> "));
        b.set_message(msg);
        b
    }
    /// The string of prompt p's token at `pos`.
    fn token(&self, prompt: usize, pos: Option<i64>) -> Option<String> {
        let t = self.toks?;
        pos.and_then(|p| t.clean_strs.get(prompt % t.n_prompts())?.get(p as usize).cloned())
    }
}

/// Values over samples·n rows (noise corruption) folded to one per prompt (mean over samples).
fn per_prompt(v: &[f64], n: usize) -> Vec<f64> {
    if v.len() <= n {
        return v.to_vec();
    }
    let samples = (v.len() / n) as f64;
    (0..n).map(|p| v.iter().skip(p).step_by(n).sum::<f64>() / samples).collect()
}

/// The mean row, and with metric.per_prompt one row per prompt (value from `values`).
fn with_prompts(cx: &RunContext, base: Row, values: &[f64], mean_value: f64, token_pos: Option<i64>, out: &mut Vec<Row>) {
    if cx.spec.metric.per_prompt {
        for (p, v) in values.iter().enumerate() {
            out.push(Row { prompt: Some(p as i32), value: *v, token: cx.token(p, token_pos), ..base.clone() });
        }
    }
    out.push(Row { value: mean_value, token: cx.token(0, token_pos), ..base });
}

fn cell_row(run: &str, kind: &str, site: Site, c: &Cell) -> Row {
    Row {
        run: run.into(),
        kind: kind.into(),
        hook: HookPoint::Block(c.layer, site).to_string(),
        layer: Some(c.layer as i32),
        head: c.head.map(|h| h as i32),
        pos: c.pos.map(|p| p as i32),
        dest_pos: c.dest.map(|p| p as i32),
        src_pos: c.src.map(|p| p as i32),
        computed: true,
        ..Row::default()
    }
}

/// Runs one work job: its rows (with the run's name) and a note for the manifest.
pub fn run_job(cx: &RunContext, task: Task) -> Result<(Vec<Row>, serde_json::Value)> {
    let run = &cx.spec.runs[task.run().ok_or_else(|| Error::Other(format!("{task:?} is not a work job")))?];
    match (&run.kind, task) {
        (RunKind::ActivationPatching { targets }, Task::Patch { target, layer, .. }) => {
            let (site, axes) = targets.get(target).ok_or_else(|| Error::Other(format!("run '{}' has no target {target}", run.name)))?;
            patch_layer(cx, run, *site, *axes, layer)
        }
        (RunKind::AttributionPatching { targets, options, verify_top }, _) => attribution_patching(cx, run, targets, *options, *verify_top),
        (RunKind::LogitLens { incl_mid, top_k, top_k_at }, _) => logit_lens(cx, run, *incl_mid, *top_k, *top_k_at),
        (RunKind::DirectLogitAttribution { over }, _) => dla(cx, run, *over),
        (RunKind::HeadScores { detections, options, source }, _) => head_score_rows(cx, run, detections, *options, source),
        (RunKind::Ablation(a), _) => ablation(cx, run, a),
        (kind, task) => Err(Error::Other(format!("{task:?} does not belong to a {} run", kind.name()))),
    }
}

fn layers_of(cx: &RunContext, run: &RunSpec) -> Vec<usize> {
    run.layers.clone().unwrap_or_else(|| (0..cx.model.cfg.n_layers).collect())
}

/// Activation patching of one target at one layer: the cells of that layer, in
/// TransformerLens's order, each batch of patches run from this layer on.
fn patch_layer(cx: &RunContext, run: &RunSpec, site: Site, axes: crate::experiments::activation_patching::Axes, layer: usize) -> Result<(Vec<Row>, serde_json::Value)> {
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
        "cells_per_forward": s.cells_per_forward, "oom_halvings": s.oom_halvings,
    });
    Ok((rows, note))
}

/// The note of an activation-patching run: its per-layer jobs' notes summed per target.
pub fn activation_patching_note(job_notes: &[&serde_json::Value], first_diff: Option<i64>) -> serde_json::Value {
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
                }
                sweeps.push(s);
            }
        }
    }
    let rule = first_diff.map(|f| format!("positions before {f} (the first token where clean and corrupted differ) cannot change under causal attention; pattern entries with src > dest are masked; filled with the corrupted baseline"));
    serde_json::json!({"sweeps": sweeps, "fill_rule": rule})
}

fn attribution_patching(cx: &RunContext, run: &RunSpec, targets: &[(Site, crate::experiments::activation_patching::Axes)], options: AtpOptions, verify_top: usize) -> Result<(Vec<Row>, serde_json::Value)> {
    let (model, prep) = (cx.model, cx.prep()?);
    let n = cx.toks()?.n_prompts();
    let (clean_b, corr_b) = (prep.clean_baseline(), prep.corrupted_baseline());
    // Attribution estimates a change from the corrupted run: normalising divides by the gap.
    let scale = if cx.spec.metric.normalize { 1.0 / (clean_b - corr_b) } else { 1.0 };
    let targets: Vec<Target> = targets.iter().map(|(s, a)| Target::new(*s, *a)).collect::<Result<_>>()?;
    let layers = layers_of(cx, run);
    let t = Instant::now();
    let atts = attribute_with(model, prep, cx.atp_pass()?, &targets, &layers, options)?;
    let atp_secs = t.elapsed().as_secs_f64();
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for a in &atts {
        // The real patching effect of the cells with the largest |estimate|.
        let mut order: Vec<usize> = (0..a.cells.len()).collect();
        order.sort_by(|&i, &j| a.mean[j].abs().total_cmp(&a.mean[i].abs()));
        let top: Vec<usize> = order.into_iter().take(verify_top).collect();
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
        for (i, c) in a.cells.iter().enumerate() {
            let values: Vec<f64> = per_prompt(&a.per_prompt[i], n).into_iter().map(|v| v * scale).collect();
            let base = cell_row(&run.name, "attribution_patching", a.target.site, c);
            let token_pos = c.pos.or(c.dest);
            if cx.spec.metric.per_prompt {
                for (p, v) in values.iter().enumerate() {
                    let real = patched[i].as_ref().map(|(_, pp)| pp[p]);
                    rows.push(Row { prompt: Some(p as i32), value: *v, patched: real, token: cx.token(p, token_pos), ..base.clone() });
                }
            }
            rows.push(Row { value: a.mean[i] * scale, patched: patched[i].as_ref().map(|(m, _)| *m), token: cx.token(0, token_pos), ..base });
        }
    }
    let passes = 1 + if options.grad_drop { model.cfg.n_layers } else { 0 };
    Ok((rows, serde_json::json!({
        "targets": notes, "options": options, "forward_backward_passes": passes, "seconds": atp_secs,
        "value": "estimated change of the metric from the corrupted run (normalised by clean - corrupted when metric.normalize); patched: the real change"
    })))
}

fn component_rows(cx: &RunContext, run: &str, kind: &str, comps: &[Component], pos: i64, out: &mut Vec<Row>) {
    for c in comps {
        let base = Row {
            run: run.into(),
            kind: kind.into(),
            hook: c.hook.clone(),
            layer: c.layer.map(|l| l as i32),
            head: c.head.map(|h| h as i32),
            neuron: c.neuron.map(|k| k as i32),
            pos: Some(pos as i32),
            label: Some(c.label.clone()),
            computed: true,
            ..Row::default()
        };
        with_prompts(cx, base, &c.per_prompt, c.mean(), Some(pos), out);
    }
}

fn logit_lens(cx: &RunContext, run: &RunSpec, incl_mid: bool, top_k: usize, at: LensPositions) -> Result<(Vec<Row>, serde_json::Value)> {
    let toks = cx.toks()?;
    let metric = cx.metric()?;
    let (comps, top) = cache_analysis::logit_lens_from(cx.model, cx.analysis_cache()?, &metric, incl_mid, top_k, at)?;
    let last = toks.clean.size()[1] - 1;
    let mut rows = Vec::new();
    component_rows(cx, &run.name, "logit_lens", &comps, last, &mut rows);
    let tok = cx.model.tokenizer()?;
    for t in &top {
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
    Ok((rows, serde_json::json!({"labels": comps.iter().map(|c| c.label.clone()).collect::<Vec<_>>(), "incl_mid": incl_mid, "top_k": top_k,
        "value": "mean over prompts of the final-norm'd accumulated residual at the last position along the answer direction; top-k rows: probability"})))
}

fn dla(cx: &RunContext, run: &RunSpec, over: DlaOver) -> Result<(Vec<Row>, serde_json::Value)> {
    let toks = cx.toks()?;
    let metric = cx.metric()?;
    let comps = cache_analysis::dla_from(cx.model, cx.analysis_cache()?, &metric, over)?;
    let mut rows = Vec::new();
    component_rows(cx, &run.name, "direct_logit_attribution", &comps, toks.clean.size()[1] - 1, &mut rows);
    let total: f64 = comps.iter().map(Component::mean).sum();
    Ok((rows, serde_json::json!({"over": over, "components": comps.len(), "sum_of_components": total})))
}

fn head_score_rows(cx: &RunContext, run: &RunSpec, detections: &[(String, Detection)], options: DetectOptions, source: &HeadSource) -> Result<(Vec<Row>, serde_json::Value)> {
    let model = cx.model;
    let mut rows = Vec::new();
    let mut push = |pattern: &str, label: &str, per_layer: &[Vec<f64>]| {
        for (l, heads) in per_layer.iter().enumerate() {
            for (h, v) in heads.iter().enumerate() {
                rows.push(Row {
                    run: run.name.clone(),
                    kind: "head_scores".into(),
                    hook: HookPoint::Block(l, Site::Pattern).to_string(),
                    layer: Some(l as i32),
                    head: Some(h as i32),
                    pattern: Some(pattern.to_string()),
                    label: Some(label.to_string()),
                    value: *v,
                    computed: true,
                    ..Row::default()
                });
            }
        }
    };
    let note = match source {
        HeadSource::Prompts => {
            let toks = cx.toks()?;
            let dets: Vec<Detection> = detections.iter().map(|(_, d)| d.clone()).collect();
            let scores = head_scores::detect_from(model, cx.analysis_cache()?, &toks.clean, toks.mask.as_ref(), &dets, options)?;
            for ((name, _), s) in detections.iter().zip(&scores) {
                push(name, "prompts", s);
            }
            serde_json::json!({"source": "prompts", "options": options, "prompts": toks.n_prompts()})
        }
        HeadSource::RepeatedRandom { seq_len, batch, seed, token_range } => {
            let v = model.cfg.d_vocab as i64;
            let (lo, hi) = token_range.unwrap_or(if v > 10_000 { (1000, 10_000) } else { (0, v) });
            if hi > v || 2 * seq_len >= model.cfg.n_ctx as i64 + 1 {
                return Err(Error::Config(format!("repeated random tokens need token_range within the vocabulary (0..{v}) and 2·seq_len <= {} positions", model.cfg.n_ctx)));
            }
            let tokens = head_scores::repeated_random_tokens(*seed, *batch, *seq_len, lo, hi);
            for (name, s) in head_scores::repeated_stripes(model, &tokens)? {
                push(name, "repeated_random", &s);
            }
            serde_json::json!({"source": "repeated_random", "seq_len": seq_len, "batch": batch, "seed": seed, "token_range": [lo, hi]})
        }
    };
    Ok((rows, note))
}

fn ablation(cx: &RunContext, run: &RunSpec, a: &AblationSpec) -> Result<(Vec<Row>, serde_json::Value)> {
    let (model, toks) = (cx.model, cx.toks()?);
    let metric = cx.metric()?;
    let dataset = match &a.dataset {
        Some(path) => {
            let prompts = crate::spec::prompts::read(path).map_err(|e| Error::Config(format!("dataset {}: {e}", path.display())))?;
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
        let comps = cache_analysis::direct_logit_attribution(model, &toks.clean, toks.mask.as_ref(), &metric, DlaOver::Head, crate::Hooks::new())?;
        let mut order: Vec<&Component> = comps.iter().collect();
        order.sort_by(|x, y| y.mean().total_cmp(&x.mean()));
        a.units = Some(order.iter().take(k).map(|c| Unit { layer: c.layer.unwrap_or(0), index: c.head }).collect());
    }
    let a = &a;
    let total = if a.units.is_some() { 1 } else { crate::experiments::ablation::all_units(&model.cfg, a.site).len() };
    let pb = cx.bar(total, format!("{}: ablate {}", run.name, a.site.name()));
    let t = Instant::now();
    let out: AblationOutcome = run_ablation(model, a, &inputs, |k| pb.inc(k as u64))?;
    pb.finish_and_clear();
    let mut rows = Vec::new();
    let base = Row { run: run.name.clone(), kind: "ablation".into(), computed: true, ..Row::default() };
    let hook_of = |u: &Unit| HookPoint::Block(u.layer, a.site).to_string();
    with_prompts(cx, Row { label: Some("baseline".into()), hook: "-".into(), ..base.clone() }, &out.baseline, mean(&out.baseline), None, &mut rows);
    for (units, values) in &out.cells {
        let row = if let [u] = units.as_slice() {
            let (h, k) = unit_index(a, u);
            Row { hook: hook_of(u), layer: Some(u.layer as i32), head: h, neuron: k, ..base.clone() }
        } else {
            let label = units.iter().map(|u| unit_label(a, u)).collect::<Vec<_>>().join("+");
            Row { hook: a.site.name().to_string(), label: Some(format!("ablated {label}")), ..base.clone() }
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
    Ok((rows, serde_json::json!({"ablation": a, "measure": measure, "baseline": mean(&out.baseline), "forwards": out.forwards, "seconds": t.elapsed().as_secs_f64()})))
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
