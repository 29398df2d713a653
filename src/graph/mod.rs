//! A spec compiled into a graph of jobs. Work several runs need (loading, tokenizing, the clean
//! and corrupted cached runs) appears once and every run depends on it.
pub mod execute;

use crate::experiments::activation_patching::{cannot_change, cells_at, cells_per_forward, Target};
use crate::model::config::ModelConfig;
use crate::spec::{RunKind, Spec};

#[derive(Debug, Clone, serde::Serialize)]
pub struct Job {
    pub id: usize,
    pub name: String,
    pub deps: Vec<usize>,
    /// Cells this job measures (one TransformerLens forward each).
    pub cells: usize,
    /// Cells filled without compute (they provably cannot change).
    pub filled: usize,
    /// Batched forward passes (each from the patched layer on) tl-run will run.
    pub forwards: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Plan {
    pub jobs: Vec<Job>,
}

impl Plan {
    /// `first_diff`: the first position where any clean/corrupted pair differs.
    pub fn build(spec: &Spec, cfg: &ModelConfig, seq: usize, first_diff: i64) -> Plan {
        let mut jobs = Vec::new();
        let mut add = |name: String, deps: Vec<usize>, (cells, filled, forwards): (usize, usize, usize)| {
            let id = jobs.len();
            jobs.push(Job { id, name, deps, cells, filled, forwards });
            id
        };
        let none = (0, 0, 0);
        let mut writes = Vec::new();
        let load = add(format!("load model {}", spec.model.id), vec![], none);
        let tok = add(format!("tokenize {} prompt pairs", spec.prompts.len()), vec![load], none);
        let clean = add("clean run (cache patched hooks)".into(), vec![tok], (0, 0, 1));
        let corrupted = add("corrupted run (cache resid_pre)".into(), vec![tok], (0, 0, 1));
        let chunk = cells_per_forward(cfg, spec.prompts.len() as i64, seq as i64);
        for run in &spec.runs {
            let RunKind::ActivationPatching { targets } = &run.kind;
            let sweeps: Vec<usize> = targets
                .iter()
                .map(|(site, axes)| {
                    let layers: Vec<usize> = run.layers.clone().unwrap_or_else(|| (0..cfg.n_layers).collect());
                    let (mut cells, mut filled, mut forwards) = (0, 0, 0);
                    for &l in &layers {
                        let at = cells_at(cfg, Target { site: *site, axes: *axes }, l, seq as i64);
                        let skip = at.iter().filter(|c| cannot_change(c, first_diff)).count();
                        cells += at.len();
                        filled += skip;
                        forwards += (at.len() - skip).div_ceil(chunk);
                    }
                    add(format!("{}: patch {} over [{}]", run.name, site.name(), axes.names().join(", ")), vec![clean, corrupted], (cells, filled, forwards))
                })
                .collect();
            writes.push(add(format!("{}: write {}.parquet", run.name, run.name), sweeps, none));
        }
        add("write manifest.json".into(), writes, none);
        Plan { jobs }
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        for j in &self.jobs {
            let deps = if j.deps.is_empty() { "-".to_string() } else { j.deps.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(",") };
            let cells = if j.cells > 0 { format!("  {} cells, {} filled without compute, {} batched forwards", j.cells, j.filled, j.forwards) } else { String::new() };
            s.push_str(&format!("[{:>2}] {:<56} after {deps}{cells}\n", j.id, j.name));
        }
        let cells: usize = self.jobs.iter().map(|j| j.cells).sum();
        let forwards: usize = self.jobs.iter().map(|j| j.forwards).sum();
        s.push_str(&format!(
            "total: {cells} patched cells (TransformerLens: {cells} full forward passes); tl-run: {forwards} forward passes, 2 full and the rest batched from the patched layer\n"
        ));
        s
    }
}
