//! A spec compiled into a graph of jobs. Work several runs need (loading, tokenizing, the clean
//! and corrupted cached runs) appears once and every run depends on it.
pub mod execute;
pub mod kinds;

use crate::experiments::ablation::all_units;
use crate::experiments::activation_patching::{cannot_change, cells_at, cells_per_forward, Target};
use crate::model::config::ModelConfig;
use crate::model::hook_point::Site;
use crate::spec::{RunKind, Spec};

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Job {
    pub id: usize,
    pub name: String,
    pub deps: Vec<usize>,
    /// Cells this job measures (patched, estimated or ablated).
    pub cells: usize,
    /// Cells filled without compute (they provably cannot change).
    pub filled: usize,
    /// Forward passes tl-run runs (batched, from the patched layer where it patches).
    pub forwards: usize,
    /// Forward passes TransformerLens runs for the same job (one per patched or ablated cell).
    pub tl_forwards: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Plan {
    pub jobs: Vec<Job>,
}

impl Plan {
    /// `seq`: the prompts' token length; `first_diff`: the first position where any clean and
    /// corrupted prompt differ.
    pub fn build(spec: &Spec, cfg: &ModelConfig, seq: usize, first_diff: i64) -> Plan {
        let mut jobs: Vec<Job> = Vec::new();
        let mut add = |name: String, deps: Vec<usize>, work: Job| {
            let id = jobs.len();
            jobs.push(Job { id, name, deps, ..work });
            id
        };
        let none = Job::default();
        let forwards = |n: usize| Job { forwards: n, tl_forwards: n, ..Job::default() };
        let load = add(format!("load model {}", spec.model.id), vec![], none.clone());
        let needs_prompts = spec.runs.iter().any(|r| r.kind.needs_prompts());
        let tok = if needs_prompts { add(format!("tokenize {} prompts", spec.prompts.len()), vec![load], none.clone()) } else { load };
        let patching = spec.runs.iter().any(|r| r.kind.patch_targets().is_some());
        let shared = if patching {
            let samples = spec.corruption.samples();
            let clean = add("clean run (cache patched hooks)".into(), vec![tok], forwards(1));
            let copies = if samples > 1 { format!(" x{samples} noise samples") } else { String::new() };
            let corrupted = add(format!("corrupted run{copies} (cache resid_pre)"), vec![tok], forwards(1));
            vec![clean, corrupted]
        } else {
            vec![tok]
        };
        let n = (spec.prompts.len() * spec.corruption.samples()).max(1) as i64;
        let chunk = cells_per_forward(cfg, n, seq as i64);
        let mut writes = Vec::new();
        for run in &spec.runs {
            let layers: Vec<usize> = run.layers.clone().unwrap_or_else(|| (0..cfg.n_layers).collect());
            let sweep = |site: Site, axes| {
                let mut j = Job::default();
                for &l in &layers {
                    let at = cells_at(cfg, Target { site, axes }, l, seq as i64);
                    let skip = at.iter().filter(|c| cannot_change(c, first_diff)).count();
                    j.cells += at.len();
                    j.filled += skip;
                    j.forwards += (at.len() - skip).div_ceil(chunk);
                }
                j.tl_forwards = j.cells;
                j
            };
            let jobs: Vec<usize> = match &run.kind {
                RunKind::ActivationPatching { targets } => targets
                    .iter()
                    .map(|(site, axes)| add(format!("{}: patch {} over [{}]", run.name, site.name(), axes.names().join(", ")), shared.clone(), sweep(*site, *axes)))
                    .collect(),
                RunKind::AttributionPatching { targets, options, verify_top } => {
                    let cells: usize = targets.iter().map(|(s, a)| sweep(*s, *a).cells).sum();
                    let passes = 1 + if options.grad_drop { cfg.n_layers } else { 0 };
                    let name = format!("{}: attribution of {} targets ({passes} forward+backward)", run.name, targets.len());
                    let atp = add(name, shared.clone(), Job { cells, ..forwards(passes) });
                    let mut ids = vec![atp];
                    if *verify_top > 0 {
                        let verify = Job { cells: targets.len() * verify_top, forwards: targets.len() * verify_top.div_ceil(chunk), tl_forwards: targets.len() * verify_top, ..Job::default() };
                        ids.push(add(format!("{}: patch the top {verify_top} cells per target", run.name), vec![atp], verify));
                    }
                    ids
                }
                RunKind::Ablation(a) => {
                    let together = a.units.is_some() || a.top_dla_heads.is_some();
                    let units = if together { 1 } else { all_units(cfg, a.site).len() };
                    let what = if together { "units together".to_string() } else { format!("each of {units} units in turn") };
                    let work = Job { cells: units, forwards: 1 + if together { 1 } else { units.div_ceil(chunk) }, tl_forwards: 1 + units, ..Job::default() };
                    vec![add(format!("{}: {:?} ablation of {}, {what}", run.name, a.method, a.site.name()), vec![tok], work)]
                }
                other => vec![add(format!("{}: {} (one cached forward)", run.name, other.name()), vec![tok], forwards(1))],
            };
            writes.push(add(format!("{}: write {}.parquet", run.name, run.name), jobs, none.clone()));
        }
        add("write manifest.json".into(), writes, none);
        Plan { jobs }
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        for j in &self.jobs {
            let deps = if j.deps.is_empty() { "-".to_string() } else { j.deps.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(",") };
            let work = match (j.cells, j.forwards) {
                (0, 0) => String::new(),
                (0, f) => format!("  {f} forward{}", if f == 1 { "" } else { "s" }),
                (c, f) => format!("  {c} cells, {} filled without compute, {f} batched forwards", j.filled),
            };
            s.push_str(&format!("[{:>2}] {:<60} after {deps}{work}\n", j.id, j.name));
        }
        let ours: usize = self.jobs.iter().map(|j| j.forwards).sum();
        let theirs: usize = self.jobs.iter().map(|j| j.tl_forwards).sum();
        s.push_str(&format!("total: tl-run {ours} forward passes (patches batched, each from the patched layer); TransformerLens {theirs} (one full forward per patched or ablated cell)\n"));
        s
    }
}
