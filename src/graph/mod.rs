//! A spec compiled into a graph of jobs, and the graph is what runs: `plan` prints these jobs and
//! `run` executes exactly these, in this order. Shared passes (tokenizing, loading, the clean and
//! corrupted runs, the attribution pass, the analysis cache) appear once and the runs that read
//! them depend on them; work jobs (the ones that produce rows) carry a content key, a cost and a
//! shard.
pub mod devices;
pub mod execute;
mod executor;
pub mod job;
pub mod keys;
mod manifest;
pub mod merge;
mod patch_groups;
mod progress_lines;
pub mod shard;
pub mod slurm;
pub mod source;
pub mod status;
pub mod store;

use crate::analysis::patching::cells_per_forward;
use crate::kinds::Spec;
use crate::kinds::{self, Part, Sizing};
use crate::model::config::ModelConfig;

/// What a job does. Indices are into `spec.runs` and a run's patch targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "task", rename_all = "snake_case")]
pub enum Task {
    Tokenize,
    Load,
    /// The clean and corrupted runs every patching run shares (`plan --json` has called it
    /// "prepare" since before the pass had one name; scripts read that).
    #[serde(rename = "prepare")]
    CleanCorrupted,
    /// The corrupted backward every attribution run reads: of the corrupted run of `CleanCorrupted`,
    /// which keeps its graph for it (a replica of a multi-device run that made the clean and
    /// corrupted runs for another job first runs a forward of its own).
    AttributionPass,
    /// The clean run caching what logit-lens, DLA and head-score runs read.
    AnalysisCache,
    /// Activation patching of one target at one layer.
    Patch {
        run: usize,
        target: usize,
        layer: usize,
    },
    /// A whole run in one job (attribution, lens, DLA, head scores, ablation).
    Whole {
        run: usize,
    },
    /// The run's Parquet (or its shard's part), from its work jobs' rows.
    Write {
        run: usize,
    },
    Manifest,
}

impl Task {
    /// Jobs that produce rows: they have keys, are stored and are split over shards.
    pub fn is_work(&self) -> bool {
        matches!(self, Task::Patch { .. } | Task::Whole { .. })
    }

    pub fn run(&self) -> Option<usize> {
        match *self {
            Task::Patch { run, .. } | Task::Whole { run } | Task::Write { run } => Some(run),
            _ => None,
        }
    }

    /// The part of its run a work job computes.
    pub fn part(&self) -> crate::kinds::Part {
        match *self {
            Task::Patch { target, layer, .. } => crate::kinds::Part::TargetLayer { target, layer },
            _ => crate::kinds::Part::Whole,
        }
    }

    /// The context's shared pass this job makes, if it is one.
    pub fn shared_pass(&self) -> Option<crate::kinds::shared::context::SharedPass> {
        use crate::kinds::shared::context::SharedPass;
        match self {
            Task::CleanCorrupted => Some(SharedPass::CleanCorrupted),
            Task::AttributionPass => Some(SharedPass::AttributionPass),
            Task::AnalysisCache => Some(SharedPass::AnalysisCache),
            _ => None,
        }
    }

    /// Whether this is a shared pass that work jobs read.
    pub fn is_shared(&self) -> bool {
        matches!(self, Task::Load | Task::CleanCorrupted | Task::AttributionPass | Task::AnalysisCache)
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
    ///
    /// Over 80 lines: the jobs in the order they run (tokenize, load, shared passes, each run's
    /// work jobs and write, the manifest), each step reading the ids the earlier ones got.
    pub fn build(spec: &Spec, cfg: &ModelConfig, seq: usize, first_diff: i64, roles: &[Vec<i64>]) -> Plan {
        let mut jobs: Vec<Job> = Vec::new();
        let blank = |task| Job {
            id: 0,
            name: String::new(),
            task,
            deps: vec![],
            cells: 0,
            filled: 0,
            forwards: 0,
            tl_forwards: 0,
            cost: 0.0,
            key: None,
        };
        let mut add = |name: String, deps: Vec<usize>, work: Job| {
            let id = jobs.len();
            jobs.push(Job { id, name, deps, ..work });
            id
        };
        let n = (spec.prompts.len() * spec.corruption.samples()).max(1);
        let full = |forwards: usize| (forwards * n * cfg.n_layers) as f64;
        let forwards = |task, k: usize| Job { forwards: k, tl_forwards: k, cost: full(k), ..blank(task) };
        let needs_prompts = spec.runs.iter().any(|r| r.kind.needs().prompts);
        let tok = needs_prompts
            .then(|| add(format!("tokenize {} prompts", spec.prompts.len()), vec![], blank(Task::Tokenize)));
        let load = add(format!("load model {}", spec.model.id), vec![], blank(Task::Load));
        let inputs: Vec<usize> = std::iter::once(load).chain(tok).collect();
        let patching = spec.runs.iter().any(|r| r.kind.needs().clean_corrupted);
        let prepare = patching.then(|| {
            let samples = spec.corruption.samples();
            let copies = if samples > 1 { format!(" (x{samples} noise samples)") } else { String::new() };
            add(format!("clean and corrupted runs{copies}"), inputs.clone(), forwards(Task::CleanCorrupted, 2))
        });
        let attributing = spec.runs.iter().any(|r| r.kind.needs().attribution_pass);
        let atp_pass = attributing.then(|| {
            let grad_drop = spec.runs.iter().any(|r| r.kind.needs().attribution_pass_per_layer);
            let passes = 1 + if grad_drop { cfg.n_layers } else { 0 };
            // Its first pass is the backward of the corrupted run, which keeps its graph for it
            // (GradDrop adds a forward + backward per layer).
            let name = match passes - 1 {
                0 => "corrupted run's backward".to_string(),
                extra => format!("corrupted run's backward + {extra} GradDrop forward+backward passes"),
            };
            add(
                name,
                vec![prepare.expect("attribution patches")],
                Job {
                    forwards: passes - 1,
                    tl_forwards: passes,
                    cost: 2.0 * full(passes) - full(1),
                    ..blank(Task::AttributionPass)
                },
            )
        });
        let analysing = spec.runs.iter().any(|r| r.kind.needs().analysis_cache);
        let analysis = analysing
            .then(|| add("clean run (cache analysis hooks)".into(), inputs.clone(), forwards(Task::AnalysisCache, 1)));
        // Batches are sized for the spec's device; one that is not here (a plan made on a login
        // node) is sized as CPU, and running there names the missing device.
        let device = crate::engine::device::parse(&spec.model.device).unwrap_or(tch::Device::Cpu);
        let chunk = cells_per_forward(cfg, n as i64, seq as i64, device);
        let mut writes = Vec::new();
        for (r, run) in spec.runs.iter().enumerate() {
            let layers = run.layers_or_all(cfg.n_layers);
            let sizing = Sizing { cfg, seq, first_diff, n, chunk, layers, roles };
            let Some(kind) = kinds::by_name(run.kind_name()) else { continue };
            // A job reads the shared pass its kind needs, else the model and the prompts.
            let needs = run.kind.needs();
            let deps = match (needs.attribution_pass, needs.clean_corrupted, needs.analysis_cache) {
                (true, _, _) => vec![atp_pass.expect("attribution needs the pass")],
                (_, true, _) => vec![prepare.expect("patching needs the clean and corrupted runs")],
                (_, _, true) => vec![analysis.expect("analysis needs the cached clean run")],
                _ => inputs.clone(),
            };
            let ids: Vec<usize> = (kind.jobs)(run, &sizing)
                .into_iter()
                .map(|d| {
                    let task = match d.part {
                        Part::TargetLayer { target, layer } => Task::Patch { run: r, target, layer },
                        Part::Whole => Task::Whole { run: r },
                    };
                    add(
                        d.name,
                        deps.clone(),
                        Job {
                            cells: d.cells,
                            filled: d.filled,
                            forwards: d.forwards,
                            tl_forwards: d.tl_forwards,
                            cost: d.cost,
                            ..blank(task)
                        },
                    )
                })
                .collect();
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
            let deps = if j.deps.is_empty() {
                "-".to_string()
            } else {
                j.deps.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(",")
            };
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
