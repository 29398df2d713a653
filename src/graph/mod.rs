//! A spec compiled into a graph of jobs, and the graph is what runs: `plan` prints these jobs and
//! `run` executes exactly these, in this order. Shared passes (tokenizing, loading, the clean and
//! corrupted runs, the attribution pass, the analysis cache) appear once and the runs that read
//! them depend on them; work jobs (the ones that produce rows) carry a content key, a cost and a
//! shard.
pub mod devices;
pub mod execute;
pub mod keys;
pub mod merge;
pub mod shard;
pub mod slurm;
pub mod store;

use crate::experiments::ablation::all_units;
use crate::experiments::activation_patching::{cannot_change, cells_at, cells_per_forward, Target};
use crate::model::config::ModelConfig;
use crate::spec::{RunKind, Spec};

/// Seconds per unit of estimated cost, relative to patching, measured per job kind on the
/// GPT-2-small-shaped IOI run (`tl-run plan --json` against the manifest's job seconds): the
/// attribution job also multiplies gradients over every cell, the logit lens unembeds every
/// label at every position for its top-k, DLA and head scores only decompose the cached run,
/// an ablation job runs whole forwards. Shards are balanced on these.
const ATTRIBUTE_COST: f64 = 1.7;
const LENS_COST: f64 = 4.0;
const DECOMPOSE_COST: f64 = 0.25;
const ABLATE_COST: f64 = 1.8;

/// What a job does. Indices are into `spec.runs` and a run's patch targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "task", rename_all = "snake_case")]
pub enum Task {
    Tokenize,
    Load,
    /// The clean and corrupted runs every patching run shares.
    Prepare,
    /// The corrupted forward+backward every attribution run reads.
    AttributionPass,
    /// The clean run caching what logit-lens, DLA and head-score runs read.
    AnalysisCache,
    /// Activation patching of one target at one layer.
    Patch { run: usize, target: usize, layer: usize },
    /// Attribution of every target of a run, with its verify_top patches.
    Attribute { run: usize },
    /// Logit lens, DLA or head scores of a run.
    Analyse { run: usize },
    Ablate { run: usize },
    /// The run's Parquet (or its shard's part), from its work jobs' rows.
    Write { run: usize },
    Manifest,
}

impl Task {
    /// Jobs that produce rows: they have keys, are stored and are split over shards.
    pub fn is_work(&self) -> bool {
        matches!(self, Task::Patch { .. } | Task::Attribute { .. } | Task::Analyse { .. } | Task::Ablate { .. })
    }

    pub fn run(&self) -> Option<usize> {
        match *self {
            Task::Patch { run, .. } | Task::Attribute { run } | Task::Analyse { run } | Task::Ablate { run } | Task::Write { run } => Some(run),
            _ => None,
        }
    }

    /// The part of its run a work job computes.
    pub fn part(&self) -> crate::experiments::kinds::Part {
        match *self {
            Task::Patch { target, layer, .. } => crate::experiments::kinds::Part::TargetLayer { target, layer },
            _ => crate::experiments::kinds::Part::Whole,
        }
    }

    /// The context's shared pass this job makes, if it is one.
    pub fn shared_pass(&self) -> Option<crate::experiments::context::SharedPass> {
        use crate::experiments::context::SharedPass;
        match self {
            Task::Prepare => Some(SharedPass::Prepare),
            Task::AttributionPass => Some(SharedPass::AttributionPass),
            Task::AnalysisCache => Some(SharedPass::AnalysisCache),
            _ => None,
        }
    }

    /// Whether this is a shared pass that work jobs read.
    pub fn is_shared(&self) -> bool {
        matches!(self, Task::Load | Task::Prepare | Task::AttributionPass | Task::AnalysisCache)
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Job {
    pub id: usize,
    pub name: String,
    #[serde(flatten)]
    pub task: Task,
    pub deps: Vec<usize>,
    /// Cells this job measures (patched, estimated or ablated).
    pub cells: usize,
    /// Cells filled without compute (they provably cannot change).
    pub filled: usize,
    /// Forward passes tl-run runs (batched, from the patched layer where it patches).
    pub forwards: usize,
    /// Forward passes TransformerLens runs for the same job (one per patched or ablated cell).
    pub tl_forwards: usize,
    /// Estimated work in layer-rows (rows of a batch times the layers they pass through), what
    /// shards are balanced by.
    pub cost: f64,
    /// Work jobs: the content key their result is stored under (set once tokens are known).
    pub key: Option<String>,
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
        let blank = |task| Job { id: 0, name: String::new(), task, deps: vec![], cells: 0, filled: 0, forwards: 0, tl_forwards: 0, cost: 0.0, key: None };
        let mut add = |name: String, deps: Vec<usize>, work: Job| {
            let id = jobs.len();
            jobs.push(Job { id, name, deps, ..work });
            id
        };
        let n = (spec.prompts.len() * spec.corruption.samples()).max(1);
        let full = |forwards: usize| (forwards * n * cfg.n_layers) as f64;
        let forwards = |task, k: usize| Job { forwards: k, tl_forwards: k, cost: full(k), ..blank(task) };
        let needs_prompts = spec.runs.iter().any(|r| r.kind.needs_prompts());
        let tok = needs_prompts.then(|| add(format!("tokenize {} prompts", spec.prompts.len()), vec![], blank(Task::Tokenize)));
        let load = add(format!("load model {}", spec.model.id), vec![], blank(Task::Load));
        let inputs: Vec<usize> = std::iter::once(load).chain(tok).collect();
        let patching = spec.runs.iter().any(|r| r.kind.needs().clean_and_corrupted);
        let prepare = patching.then(|| {
            let samples = spec.corruption.samples();
            let copies = if samples > 1 { format!(" (x{samples} noise samples)") } else { String::new() };
            add(format!("clean and corrupted runs{copies}"), inputs.clone(), forwards(Task::Prepare, 2))
        });
        let attributing = spec.runs.iter().any(|r| r.kind.needs().attribution_pass);
        let atp_pass = attributing.then(|| {
            let grad_drop = spec.runs.iter().any(|r| matches!(&r.kind, RunKind::AttributionPatching { options, .. } if options.grad_drop));
            let passes = 1 + if grad_drop { cfg.n_layers } else { 0 };
            add(format!("corrupted forward+backward ({passes} pass{})", if passes == 1 { "" } else { "es" }), vec![prepare.expect("attribution patches")], Job { cost: 2.0 * full(passes), ..forwards(Task::AttributionPass, passes) })
        });
        let analysing = spec.runs.iter().any(|r| r.kind.needs().analysis_cache);
        let analysis = analysing.then(|| add("clean run (cache analysis hooks)".into(), inputs.clone(), forwards(Task::AnalysisCache, 1)));
        // The plan's device as named (availability is checked when the model loads).
        let device = match spec.model.device.strip_prefix("cuda") {
            Some(i) => tch::Device::Cuda(i.trim_start_matches(':').parse().unwrap_or(0)),
            None => tch::Device::Cpu,
        };
        let chunk = cells_per_forward(cfg, n as i64, seq as i64, device);
        let skip = if first_diff > 0 && (first_diff as usize) < seq { first_diff as usize } else { 0 };
        let mut writes = Vec::new();
        for (r, run) in spec.runs.iter().enumerate() {
            let layers: Vec<usize> = run.layers.clone().unwrap_or_else(|| (0..cfg.n_layers).collect());
            // Patched forwards of `cells` at `layer`: batches of `chunk` cells × n prompts, from
            // the patched layer on, over the positions after the shared prefix.
            let patch_cost = |cells: usize, layer: usize| {
                let rows = (cells * n) as f64;
                rows * (cfg.n_layers - layer.min(cfg.n_layers)) as f64 * ((seq - skip).max(1) as f64 / seq.max(1) as f64)
            };
            let ids: Vec<usize> = match &run.kind {
                RunKind::ActivationPatching { targets } => {
                    let mut ids = Vec::new();
                    for (t, (site, axes)) in targets.iter().enumerate() {
                        for &layer in &layers {
                            let at = cells_at(cfg, Target { site: *site, axes: *axes }, layer, seq as i64);
                            let filled = at.iter().filter(|c| cannot_change(c, first_diff)).count();
                            let todo = at.len() - filled;
                            let job = Job { cells: at.len(), filled, forwards: todo.div_ceil(chunk), tl_forwards: at.len(), cost: patch_cost(todo, layer), ..blank(Task::Patch { run: r, target: t, layer }) };
                            let name = format!("{}: patch {} over [{}] at layer {layer}", run.name, site.name(), axes.names().join(", "));
                            ids.push(add(name, vec![prepare.expect("patching prepares")], job));
                        }
                    }
                    ids
                }
                RunKind::AttributionPatching { targets, verify_top, .. } => {
                    let cells: usize = targets.iter().map(|(s, a)| layers.iter().map(|&l| cells_at(cfg, Target { site: *s, axes: *a }, l, seq as i64).len()).sum::<usize>()).sum();
                    let verify = targets.len() * verify_top;
                    let verify_forwards = targets.len() * verify_top.div_ceil(chunk);
                    let job = Job { cells, forwards: verify_forwards, tl_forwards: verify, cost: ATTRIBUTE_COST * (full(1) + patch_cost(verify, cfg.n_layers / 2)), ..blank(Task::Attribute { run: r }) };
                    let also = if *verify_top > 0 { format!(", patch the top {verify_top} per target") } else { String::new() };
                    vec![add(format!("{}: attribution of {} targets{also}", run.name, targets.len()), vec![atp_pass.expect("attribution pass")], job)]
                }
                RunKind::Ablation(a) => {
                    let together = a.units.is_some() || a.top_dla_heads.is_some();
                    let units = if together { 1 } else { all_units(cfg, a.site).len() };
                    let what = if together { "units together".to_string() } else { format!("each of {units} units in turn") };
                    let k = 1 + if together { 1 } else { units.div_ceil(chunk) };
                    let job = Job { cells: units, forwards: k, tl_forwards: 1 + units, cost: ABLATE_COST * (full(1) + (units * n * cfg.n_layers) as f64), ..blank(Task::Ablate { run: r }) };
                    vec![add(format!("{}: {:?} ablation of {}, {what}", run.name, a.method, a.site.name()), inputs.clone(), job)]
                }
                kind if kind.needs().analysis_cache => {
                    vec![add(format!("{}: {} from the cached clean run", run.name, kind.name()), vec![analysis.expect("analysis cache")], Job { cost: full(1) * if matches!(kind, RunKind::LogitLens { .. }) { LENS_COST } else { DECOMPOSE_COST }, ..blank(Task::Analyse { run: r }) })]
                }
                kind => vec![add(format!("{}: {} (one forward)", run.name, kind.name()), vec![load], forwards(Task::Analyse { run: r }, 1))],
            };
            writes.push(add(format!("{}: write {}.parquet", run.name, run.name), ids, blank(Task::Write { run: r })));
        }
        add("write manifest.json".into(), writes, blank(Task::Manifest));
        Plan { jobs }
    }

    pub fn work(&self) -> impl Iterator<Item = &Job> {
        self.jobs.iter().filter(|j| j.task.is_work())
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
            let key = j.key.as_deref().map(|k| format!("  key {}", &k[..12.min(k.len())])).unwrap_or_default();
            s.push_str(&format!("[{:>2}] {:<60} after {deps}{work}{key}\n", j.id, j.name));
        }
        let ours: usize = self.jobs.iter().map(|j| j.forwards).sum();
        let theirs: usize = self.jobs.iter().map(|j| j.tl_forwards).sum();
        s.push_str(&format!("total: tl-run {ours} forward passes (patches batched, each from the patched layer); TransformerLens {theirs} (one full forward per patched or ablated cell)\n"));
        s
    }
}
