//! A spec compiled into a graph of jobs. Work several runs need (loading, tokenizing, the clean
//! and corrupted cached runs) appears once and every run depends on it.
pub mod execute;

use crate::experiments::activation_patching::Axes;
use crate::model::config::ModelConfig;
use crate::model::hook_point::Site;
use crate::spec::{RunKind, Spec};

#[derive(Debug, Clone, serde::Serialize)]
pub struct Job {
    pub id: usize,
    pub name: String,
    pub deps: Vec<usize>,
    /// Cells this job measures (one TransformerLens forward each).
    pub cells: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Plan {
    pub jobs: Vec<Job>,
}

/// Cells of one sweep (for k/v over key-value heads).
pub fn cell_count(cfg: &ModelConfig, site: Site, axes: Axes, seq: usize) -> usize {
    let heads = if matches!(site, Site::K | Site::V) { cfg.n_kv_heads } else { cfg.n_heads };
    cfg.n_layers
        * match axes {
            Axes::LayerPos => seq,
            Axes::LayerPosHead | Axes::LayerHeadDest => seq * heads,
            Axes::LayerHead => heads,
            Axes::LayerHeadDestSrc => seq * seq * heads,
        }
}

impl Plan {
    pub fn build(spec: &Spec, cfg: &ModelConfig, seq: usize) -> Plan {
        let mut jobs = Vec::new();
        let mut add = |name: String, deps: Vec<usize>, cells: usize| {
            let id = jobs.len();
            jobs.push(Job { id, name, deps, cells });
            id
        };
        let mut writes = Vec::new();
        let load = add(format!("load model {}", spec.model.id), vec![], 0);
        let tok = add(format!("tokenize {} prompt pairs", spec.prompts.len()), vec![load], 0);
        let clean = add("clean run (cache patched hooks)".into(), vec![tok], 0);
        let corrupted = add("corrupted run (cache resid_pre)".into(), vec![tok], 0);
        for run in &spec.runs {
            let RunKind::ActivationPatching { targets } = &run.kind;
            let sweeps: Vec<usize> = targets
                .iter()
                .map(|(site, axes)| {
                    let layers = run.layers.as_ref().map(|l| l.len()).unwrap_or(cfg.n_layers);
                    let cells = cell_count(cfg, *site, *axes, seq) / cfg.n_layers * layers;
                    add(format!("{}: patch {} over [{}]", run.name, site.name(), axes.names().join(", ")), vec![clean, corrupted], cells)
                })
                .collect();
            writes.push(add(format!("{}: write {}.parquet", run.name, run.name), sweeps, 0));
        }
        add("write manifest.json".into(), writes, 0);
        Plan { jobs }
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        for j in &self.jobs {
            let deps = if j.deps.is_empty() { "-".to_string() } else { j.deps.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(",") };
            let cells = if j.cells > 0 { format!("  ({} cells = TransformerLens forward passes)", j.cells) } else { String::new() };
            s.push_str(&format!("[{:>2}] {:<60} after {deps}{cells}\n", j.id, j.name));
        }
        let total: usize = self.jobs.iter().map(|j| j.cells).sum();
        s.push_str(&format!("total: {total} patched cells; 2 full forward passes + batched partial passes from the patched layer\n"));
        s
    }
}
