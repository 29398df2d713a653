//! What every job of every kind reads (the spec, the model, the tokenized prompts, the shared
//! passes, made once and on first use) and the row helpers all kinds lay their results out with.
use std::cell::OnceCell;
use std::collections::HashMap;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tch::Tensor;

use crate::analysis::activation_cache::Component;
use crate::analysis::attribution::Pass;
use crate::analysis::clean_corrupted::CleanCorrupted;
use crate::analysis::patching::Cell;
use crate::engine::metric::Metric;
use crate::error::{Error, Result};
use crate::kinds::shared::inputs::Tokenized;
use crate::kinds::Spec;
use crate::model::hook_point::{HookPoint, Site};
use crate::model::Model;
use crate::output::table::Row;

/// What every job reads: the spec, the model, the tokenized prompts and the shared passes, each
/// made when its job in the graph runs (or on first use).
pub struct RunContext<'a> {
    pub spec: &'a Spec,
    pub model: &'a Model,
    pub toks: Option<&'a Tokenized>,
    /// Where job progress bars go (None: no bars).
    pub progress: Option<MultiProgress>,
    /// The clean and corrupted runs every patching run shares.
    prep: OnceCell<CleanCorrupted>,
    /// The corrupted backward every attribution run reads (of the corrupted run, kept for it),
    /// made on first use for the union of their hook points.
    atp_pass: OnceCell<Pass>,
    /// The clean run's cache every logit-lens, DLA and head-score run reads, likewise.
    analysis_cache: OnceCell<HashMap<HookPoint, Tensor>>,
    /// Set when the attribution pass will run after the clean and corrupted runs: the
    /// corrupted run then keeps its graph for that pass's backward.
    attribution_follows: std::cell::Cell<bool>,
}

impl<'a> RunContext<'a> {
    pub fn new(spec: &'a Spec, model: &'a Model, toks: Option<&'a Tokenized>, progress: Option<MultiProgress>) -> Self {
        RunContext {
            spec,
            model,
            toks,
            progress,
            prep: OnceCell::new(),
            atp_pass: OnceCell::new(),
            analysis_cache: OnceCell::new(),
            attribution_follows: Default::default(),
        }
    }

    /// Runs a shared pass now (its job in the graph).
    pub fn force(&self, pass: SharedPass) -> Result<()> {
        match pass {
            SharedPass::CleanCorrupted => self.clean_corrupted().map(|_| ()),
            SharedPass::AttributionPass => self.atp_pass().map(|_| ()),
            SharedPass::AnalysisCache => self.analysis_cache().map(|_| ()),
        }
    }

    /// The shared clean and corrupted runs, if made.
    pub fn clean_corrupted_if_made(&self) -> Option<&CleanCorrupted> {
        self.prep.get()
    }

    /// Says that the attribution pass runs after the clean and corrupted runs (its job is to
    /// run), so the corrupted run keeps its autograd graph and the pass is a backward alone.
    /// Without it (the pass's results stored, or no attribution run) nothing is kept.
    pub fn expect_attribution_pass(&self) {
        self.attribution_follows.set(true);
    }

    /// The points of the attribution pass: the union of every attribution run's.
    fn gradient_points(&self) -> Result<Vec<HookPoint>> {
        let mut points: Vec<HookPoint> = Vec::new();
        for r in &self.spec.runs {
            points.extend(crate::kinds::captures(r, self.model)?.gradient_points);
        }
        points.sort_by_key(|p| p.to_string());
        points.dedup();
        Ok(points)
    }

    pub(crate) fn atp_pass(&self) -> Result<&Pass> {
        if self.atp_pass.get().is_none() {
            if self.prep.get().is_none() {
                // Made on first use here: the corrupted run is made for this pass too.
                self.attribution_follows.set(true);
            }
            let points = self.gradient_points()?;
            let _ = self.atp_pass.set(Pass::new(self.model, self.clean_corrupted()?, &points)?);
        }
        Ok(self.atp_pass.get().expect("set above"))
    }

    pub(crate) fn analysis_cache(&self) -> Result<&HashMap<HookPoint, Tensor>> {
        if self.analysis_cache.get().is_none() {
            let model = self.model;
            let mut points: Vec<HookPoint> = Vec::new();
            for r in &self.spec.runs {
                points.extend(crate::kinds::captures(r, model)?.analysis_points);
            }
            let toks = self.toks()?;
            let mut hooks = crate::Hooks::capture(points);
            let _ =
                model.run(crate::Input::Tokens(&toks.clean), toks.mask.as_ref(), &mut hooks, crate::Stop::FinalNorm)?;
            let _ = self.analysis_cache.set(hooks.cache);
        }
        Ok(self.analysis_cache.get().expect("set above"))
    }

    pub(crate) fn toks(&self) -> Result<&Tokenized> {
        self.toks.ok_or_else(|| Error::Other("this run needs prompts".into()))
    }
    pub fn clean_corrupted(&self) -> Result<&CleanCorrupted> {
        if self.prep.get().is_none() {
            let grad_points = if self.attribution_follows.get() && self.atp_pass.get().is_none() {
                self.gradient_points()?
            } else {
                Vec::new()
            };
            let p = crate::panics::guarded("the clean and corrupted runs", || {
                crate::kinds::shared::inputs::clean_corrupted_pass(self.spec, self.model, self.toks()?, &grad_points)
            })?;
            tracing::info!(
                clean = p.clean_baseline(),
                corrupted = p.corrupted_baseline(),
                first_diff = p.first_diff,
                "baselines"
            );
            let _ = self.prep.set(p);
        }
        Ok(self.prep.get().expect("set above"))
    }
    pub(crate) fn metric(&self) -> Result<Metric> {
        let t = self.toks()?;
        let mut metric = t.metric(&self.spec.metric)?;
        if metric.kind == crate::engine::metric::MetricKind::KlDivergence {
            // The reference distribution: the clean run's (what ablation compares with too).
            let mut none = crate::Hooks::new();
            let clean =
                self.model.run(crate::Input::Tokens(&t.clean), t.mask.as_ref(), &mut none, crate::Stop::FinalNorm)?;
            metric.set_clean_reference(self.model, &clean);
        }
        Ok(metric)
    }
    /// Whether run `run` writes a row per prompt besides the mean: its own per_prompt, else
    /// [metric] per_prompt.
    pub(crate) fn per_prompt(&self, run: &str) -> bool {
        self.spec.runs.iter().find(|r| r.name == run).and_then(|r| r.per_prompt).unwrap_or(self.spec.metric.per_prompt)
    }
    pub(crate) fn bar(&self, len: usize, msg: String) -> ProgressBar {
        let Some(multi) = &self.progress else { return ProgressBar::hidden() };
        let b = multi.add(ProgressBar::new(len as u64));
        b.set_style(
            ProgressStyle::with_template("{msg:40} [{bar:30}] {pos}/{len} {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        b.set_message(msg);
        b
    }
    /// The string of prompt p's token at `pos`.
    pub(crate) fn token(&self, prompt: usize, pos: Option<i64>) -> Option<String> {
        self.toks?.token(prompt, pos)
    }
}

/// Values over samples·n rows (noise corruption) folded to one per prompt (mean over samples).
pub(crate) fn per_prompt(v: &[f64], n: usize) -> Vec<f64> {
    if v.len() <= n {
        return v.to_vec();
    }
    let samples = (v.len() / n) as f64;
    (0..n).map(|p| v.iter().skip(p).step_by(n).sum::<f64>() / samples).collect()
}

/// The mean row, and with metric.per_prompt one row per prompt (value from `values`).
pub(crate) fn with_prompts(
    cx: &RunContext,
    base: Row,
    values: &[f64],
    mean_value: f64,
    token_pos: Option<i64>,
    out: &mut Vec<Row>,
) {
    if cx.per_prompt(&base.run) {
        for (p, v) in values.iter().enumerate() {
            out.push(Row { prompt: Some(p as i32), value: *v, token: cx.token(p, token_pos), ..base.clone() });
        }
    }
    out.push(Row { value: mean_value, token: cx.token(0, token_pos), ..base });
}

/// Rows for the cells of one run's target, in order: the hook name is formatted once per layer
/// rather than per cell (a pattern target of an 8B model is 230,000 cells).
pub(crate) struct CellRows<'a> {
    run: &'a str,
    kind: &'a str,
    site: Site,
    hook: Option<(usize, String)>,
}

impl<'a> CellRows<'a> {
    pub(crate) fn new(run: &'a str, kind: &'a str, site: Site) -> Self {
        CellRows { run, kind, site, hook: None }
    }

    pub(crate) fn row(&mut self, c: &Cell) -> Row {
        let hook = match &self.hook {
            Some((l, name)) if *l == c.layer => name.clone(),
            _ => {
                let name = HookPoint::Block(c.layer, self.site).to_string();
                self.hook = Some((c.layer, name.clone()));
                name
            }
        };
        Row {
            run: self.run.into(),
            kind: self.kind.into(),
            hook,
            layer: Some(c.layer as i32),
            head: c.head.map(|h| h as i32),
            pos: c.pos.map(|p| p as i32),
            dest_pos: c.dest.map(|p| p as i32),
            src_pos: c.src.map(|p| p as i32),
            computed: true,
            ..Row::default()
        }
    }
}

/// The shared passes a context makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedPass {
    /// The clean and corrupted runs every patching run shares.
    CleanCorrupted,
    /// The corrupted backward every attribution run reads.
    AttributionPass,
    /// The clean run caching what logit-lens, DLA and head-score runs read.
    AnalysisCache,
}

/// One row per component (and per prompt with metric.per_prompt) of a lens, DLA or ablation run.
pub(crate) fn component_rows(
    cx: &RunContext,
    run: &str,
    kind: &str,
    comps: &[Component],
    pos: i64,
    out: &mut Vec<Row>,
) {
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
