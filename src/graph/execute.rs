//! Executes a spec's job graph: tokenizing, then every job in order. Work jobs are stored as they
//! finish and read back on a rerun; shared passes run only for jobs that run; each run's Parquet
//! is written as soon as its jobs are done and the manifest after every run, so a failure (or a
//! kill) later on leaves the finished outputs, the stored jobs and a manifest that describes them.
use std::cell::OnceCell;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Instant;

use tch::{Device, Tensor};

use crate::engine::nonfinite;
use crate::engine::tokenize::TextTokenizer;
use crate::error::{Error, Result};
use crate::experiments::activation_patching::Schedule;
use crate::experiments::inputs::{first_changed, tokenize, Tokenized};
use crate::experiments::prepared::Prepared;
use crate::graph::shard::{self, Shard};
use crate::graph::store::Store;
use crate::experiments::context::RunContext;
use crate::graph::{devices, keys, Plan, Task};
use crate::model::config::ModelConfig;
use crate::model::source::ModelFiles;
use crate::model::{LoadOptions, Model};
use crate::output::atomic;
use crate::output::table::{write_parquet, Row};
use crate::spec::Spec;
use crate::experiments::kinds::JobOutput;

pub struct Outcome {
    pub files: Vec<PathBuf>,
    pub manifest: PathBuf,
    pub summary: String,
    /// How many jobs ran and how many came from the store.
    pub jobs: String,
}

/// How `execute` runs a plan.
#[derive(Debug, Clone, Default)]
pub struct ExecOptions {
    /// Progress bars on stderr.
    pub progress: bool,
    /// Keep finished jobs in `<output.dir>/.tl-run/` and reuse them (a rerun redoes only
    /// unfinished jobs).
    pub store: bool,
    /// Ignore stored results (still store new ones).
    pub fresh: bool,
    /// Run only this shard's jobs and write its parts.
    pub shard: Option<Shard>,
    /// More than one: a model replica per device, work jobs spread over them (a lazily loaded
    /// model only). One or none: the model's own device.
    pub devices: Vec<Device>,
}

/// The model a plan runs on: already loaded, or loaded when the first job that needs it runs
/// (a rerun whose jobs are all stored loads nothing).
pub enum ModelSource<'a> {
    Loaded(&'a Model),
    Lazy { cfg: &'a ModelConfig, tokenizer: Option<&'a TextTokenizer>, files: Option<&'a ModelFiles>, device: Device, load: Box<devices::Loader<'a>> },
}

impl ModelSource<'_> {
    fn cfg(&self) -> &ModelConfig {
        match self {
            ModelSource::Loaded(m) => &m.cfg,
            ModelSource::Lazy { cfg, .. } => cfg,
        }
    }
    fn tokenizer(&self) -> Result<&TextTokenizer> {
        match self {
            ModelSource::Loaded(m) => m.tokenizer(),
            ModelSource::Lazy { tokenizer, .. } => tokenizer.ok_or_else(|| Error::Tokenizer("this model has no tokenizer.json".into())),
        }
    }
    fn files(&self) -> Option<&ModelFiles> {
        match self {
            ModelSource::Loaded(m) => m.files.as_ref(),
            ModelSource::Lazy { files, .. } => *files,
        }
    }
}

/// Runs a spec on an already loaded model, without a job store (the regression gate).
pub fn run_spec(spec: &Spec, model: &Model, show_progress: bool) -> Result<Outcome> {
    execute(spec, ModelSource::Loaded(model), &ExecOptions { progress: show_progress, ..ExecOptions::default() })
}

/// The plan of a spec as it runs: tokens, the job graph and every work job's key.
pub struct Compiled {
    pub plan: Plan,
    pub toks: Option<Tokenized>,
    pub digests: Vec<(PathBuf, String)>,
}

/// Tokenizes the prompts and builds the job graph with its keys: what `plan` prints and `run`
/// executes.
pub fn compile(spec: &Spec, cfg: &ModelConfig, tok: Option<&TextTokenizer>, files: Option<&ModelFiles>) -> Result<Compiled> {
    let needs_prompts = spec.runs.iter().any(|r| r.kind.needs_prompts());
    let needs_corruption = spec.runs.iter().any(|r| r.kind.needs_corruption());
    let toks = match (needs_prompts, tok) {
        (true, Some(tok)) => Some(tokenize(spec, tok, cfg, needs_corruption)?),
        (true, None) => return Err(Error::Tokenizer("the spec's runs read prompts, and this model has no tokenizer.json".into())),
        (false, _) => None,
    };
    compile_tokenized(spec, cfg, toks, files)
}

/// The job graph with its keys, for prompts already tokenized (None when no run reads prompts).
pub fn compile_tokenized(spec: &Spec, cfg: &ModelConfig, toks: Option<Tokenized>, files: Option<&ModelFiles>) -> Result<Compiled> {
    for run in &spec.runs {
        run.check_model(cfg, &spec.file).map_err(Error::Config)?;
    }
    let (seq, first_diff) = toks.as_ref().map_or((0, 0), |t| (t.clean.size()[1] as usize, first_changed(t)));
    let mut plan = Plan::build(spec, cfg, seq, first_diff);
    let digests = match files {
        Some(f) => keys::model_digests(f)?,
        None => vec![],
    };
    keys::assign(&mut plan, spec, toks.as_ref(), &digests)?;
    Ok(Compiled { plan, toks, digests })
}

/// One job as the manifest records it.
#[derive(Debug, Clone, serde::Serialize)]
struct JobRecord {
    id: usize,
    name: String,
    key: Option<String>,
    /// ran | stored (its result read from the store) | skipped (no job that reads it had to
    /// run) | other shard
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    shard: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rows: Option<usize>,
    seconds: f64,
}

/// Runs the plan of `spec`: every job in order; a work job's result comes from the store when
/// its key is there, else it runs and is stored at once; shared passes run only when a job
/// that reads them runs. Each run's Parquet (or shard part) is written as soon as its jobs are
/// done, and the manifest after every run.
pub fn execute(spec: &Spec, source: ModelSource, opts: &ExecOptions) -> Result<Outcome> {
    let t = Instant::now();
    let compiled = compile(spec, source.cfg(), if spec.runs.iter().any(|r| r.kind.needs_prompts()) { Some(source.tokenizer()?) } else { None }, source.files())?;
    let seconds = t.elapsed().as_secs_f64();
    execute_compiled(spec, source, compiled, seconds, opts)
}

/// `execute` for a spec already compiled (`compile_seconds`: what that took, for the manifest).
pub fn execute_compiled(spec: &Spec, source: ModelSource, compiled: Compiled, compile_seconds: f64, opts: &ExecOptions) -> Result<Outcome> {
    let Compiled { plan, toks, digests } = compiled;
    let mut timings: BTreeMap<String, f64> = BTreeMap::new();
    timings.insert("tokenize and plan".into(), compile_seconds);
    let out_dir = &spec.output_dir;
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    atomic::remove_stale_temps(out_dir);
    let store = if opts.store { Some(Store::open(out_dir)?) } else { None };
    let mut writer = store.as_ref().map(crate::graph::store::Writer::start);
    let shards = opts.shard.map(|s| shard::assign(&plan, s.count));
    let owned = |id: usize| match (&shards, opts.shard) {
        (Some(a), Some(s)) => a[id] == Some(s.index),
        _ => true,
    };
    // Stored results of this shard's work jobs.
    let mut results: HashMap<usize, (std::sync::Arc<Vec<Row>>, serde_json::Value)> = HashMap::new();
    let mut status: Vec<&'static str> = vec!["ran"; plan.jobs.len()];
    for j in plan.work() {
        if !owned(j.id) {
            status[j.id] = "other shard";
        } else if let (Some(store), false, Some(key)) = (&store, opts.fresh, &j.key) {
            if let Some(s) = store.get(key) {
                let run_name = &spec.runs[j.task.run().expect("work jobs have a run")].name;
                let rows = s.rows.into_iter().map(|r| Row { run: run_name.clone(), ..r }).collect();
                results.insert(j.id, (std::sync::Arc::new(rows), s.note));
                status[j.id] = "stored";
            }
        }
    }
    // A shared pass runs only when some work job that reads it (directly or not) runs.
    let mut needed = vec![false; plan.jobs.len()];
    for j in plan.work().filter(|j| status[j.id] == "ran") {
        let mut stack = vec![j.id];
        while let Some(id) = stack.pop() {
            if !needed[id] {
                needed[id] = true;
                stack.extend(&plan.jobs[id].deps);
            }
        }
    }
    for j in plan.jobs.iter().filter(|j| j.task.is_shared() && !needed[j.id]) {
        status[j.id] = "skipped";
    }

    let parallel = opts.devices.len() > 1 && matches!(source, ModelSource::Lazy { .. });
    let queue = std::sync::Mutex::new(plan.work().filter(|j| status[j.id] == "ran").map(|j| j.id).collect::<std::collections::VecDeque<usize>>());
    let (abort, reported) = (std::sync::atomic::AtomicBool::new(false), std::sync::atomic::AtomicBool::new(false));
    let model_cell: OnceCell<Model> = OnceCell::new();
    let mut cx: Option<RunContext> = None;
    let multi = opts.progress.then(indicatif::MultiProgress::new);
    let total_cost: f64 = plan.work().filter(|j| status[j.id] == "ran").map(|j| j.cost.max(1.0)).sum();
    let overall = match &multi {
        Some(m) if total_cost > 0.0 => {
            let b = m.add(indicatif::ProgressBar::new(total_cost.round().max(1.0) as u64));
            b.set_style(indicatif::ProgressStyle::with_template("jobs {msg:48} [{bar:30}] {percent}% {elapsed} (eta {eta})").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()).progress_chars("=> "));
            b
        }
        _ => indicatif::ProgressBar::hidden(),
    };
    let mut record = Record::new(spec, &source, &digests, opts.shard);
    let mut records: Vec<JobRecord> = Vec::new();
    let mut files = Vec::new();
    let mut run_notes = serde_json::Map::new();
    let mut summary = String::new();
    let mut done_together: HashMap<usize, JobOutput> = HashMap::new();
    let mut alone: std::collections::HashSet<usize> = std::collections::HashSet::new();
    std::thread::scope(|scope| {
    let mut pool: Option<devices::Pool> = None;
    let result = (|| -> Result<()> {
    for job in &plan.jobs {
        let t_job = Instant::now();
        let mut rows_out = None;
        let mut seconds = None;
        match job.task {
            Task::Tokenize => {}
            Task::Load if needed[job.id] && parallel => {
                if let ModelSource::Lazy { load, .. } = &source {
                    let shared = devices::Shared { spec, plan: &plan, store: store.as_ref(), load: load.as_ref(), abort: &abort, reported: &reported, queue: &queue };
                    pool = Some(devices::Pool::start(scope, &opts.devices, shared, toks.as_ref()));
                    record.device = format!("{:?}", opts.devices);
                }
            }
            // With several devices every replica makes the shared passes its jobs read.
            task if task.is_shared() && parallel => {}
            Task::Load if needed[job.id] => {
                let model: &Model = match &source {
                    ModelSource::Loaded(m) => m,
                    ModelSource::Lazy { load, device, cfg, .. } => {
                        let warm = warm_up_for(spec, &plan, &needed, cfg, *device, toks.as_ref());
                        let loaded = std::thread::scope(|s| {
                            // Guarded: a failed warm-up (a libtorch panic) is only logged.
                            let warming = warm.map(|(opts, run)| s.spawn(move || crate::panics::guarded("device warm-up", || crate::engine::warm::warm_up(cfg, &opts, run))));
                            let loaded = crate::panics::guarded(&job.name, || load(*device));
                            match warming.map(|w| w.join()) {
                                Some(Ok(Ok(seconds))) => {
                                    tracing::debug!(seconds, "warmed the device beside the load");
                                    // "load model" first: start-up benches count it as loading.
                                    timings.insert("load model (device warm-up beside it)".into(), seconds);
                                }
                                Some(Ok(Err(e))) => tracing::debug!(error = %e, "warming the device failed; the runs pay the first use of its kernels"),
                                Some(Err(_)) => tracing::debug!("warming the device stopped unexpectedly"),
                                None => {}
                            }
                            loaded
                        });
                        let _ = model_cell.set(loaded?);
                        model_cell.get().expect("set above")
                    }
                };
                record.loaded(model);
                if let Some(f) = nonfinite::first_in_weights(model) {
                    record.found(f, &run_notes, &timings, None, toks.as_ref())?;
                }
                cx = Some(RunContext::new(spec, model, toks.as_ref(), multi.clone()));
            }
            task if task.is_shared() && needed[job.id] => {
                let c = cx.as_ref().expect("the model loads before any shared pass");
                overall.set_message(job.name.clone());
                if task == Task::Prepare && plan.jobs.iter().any(|j| j.task == Task::AttributionPass && needed[j.id]) {
                    c.expect_attribution_pass();
                }
                c.force(task.shared_pass().expect("a shared pass")).map_err(|e| Error::Other(format!("job [{}] {} on {}: {e}", job.id, job.name, prompts_of(toks.as_ref()))))?;
                if task == Task::Prepare {
                    if let Some(f) = baseline_finding(c)? {
                        record.found(f, &run_notes, &timings, c.prepared(), toks.as_ref())?;
                    }
                }
            }
            task if task.is_work() && status[job.id] == "ran" => {
                overall.set_message(job.name.clone());
                let run = &spec.runs[task.run().expect("work jobs have a run")];
                let named = |e: Error| match e {
                    Error::Config(m) => Error::Config(format!("run '{}', job [{}] {}: {m}", run.name, job.id, job.name)),
                    other => Error::Other(format!("run '{}', job [{}] {}: {other}", run.name, job.id, job.name)),
                };
                let (rows, note) = match pool.as_mut() {
                    Some(p) => {
                        let (rows, note, secs, device) = p.wait(job.id, |f| record.found(f, &run_notes, &timings, None, toks.as_ref())).map_err(named)?;
                        seconds = Some(secs);
                        tracing::debug!(job = job.id, ?device, "job done");
                        (std::sync::Arc::new(rows), note)
                    }
                    None => {
                        let c = cx.as_ref().expect("the model loads before any work job");
                        let (rows, note) = match done_together.remove(&job.id) {
                            Some(done) => done,
                            None => {
                                // Patching jobs at this job's layer that are still to run share
                                // its forwards; their results wait here until the loop reaches them.
                                let across_layers = Schedule::for_device(c.model.device) == Schedule::Staircase;
                                let group = patch_group(&plan, job, &status, &alone, across_layers);
                                match (group.len() > 1).then(|| run_patch_group(c, &plan, &group)) {
                                    Some(Ok(done)) => {
                                        let mut done = done.into_iter();
                                        let first = done.next().expect("one result per job");
                                        done_together.extend(group[1..].iter().copied().zip(done));
                                        first
                                    }
                                    // A failed group runs its jobs one by one, so that a failure
                                    // is its own job's (named, and the others' rows kept).
                                    Some(Err(e)) => {
                                        tracing::debug!(error = %e, jobs = ?group, "a group of patching jobs failed: running them one by one");
                                        alone.extend(group.iter().copied());
                                        run_and_store(c, job, None).map_err(named)?
                                    }
                                    None => run_and_store(c, job, None).map_err(named)?,
                                }
                            }
                        };
                        if note.get("forwards_shared_with_jobs").and_then(|v| v.as_u64()).is_some_and(|k| k > 0) {
                            seconds = note["seconds"].as_f64();
                        }
                        let rows = std::sync::Arc::new(rows);
                        crate::panics::injected_delay();
                        if let (Some(w), Some(s), Some(key)) = (&writer, &store, &job.key) {
                            w.put(s, key, rows.clone(), note.clone())?;
                        }
                        (rows, note)
                    }
                };
                rows_out = Some(rows.len());
                results.insert(job.id, (rows, note));
                overall.inc(job.cost.max(1.0).round() as u64);
            }
            Task::Write { run: r } => {
                let run = &spec.runs[r];
                let mine: Vec<usize> = job.deps.iter().copied().filter(|&d| owned(d)).collect();
                // The jobs' rows are borrowed, not copied, into the file.
                let mut rows: Vec<&Row> = Vec::new();
                let mut notes: Vec<&serde_json::Value> = Vec::new();
                for d in &mine {
                    let (r, n) = results.get(d).expect("every owned work job ran or was stored");
                    rows.extend(r.iter());
                    notes.push(n);
                }
                let bad: Vec<&Row> = rows.iter().copied().filter(|r| !r.value.is_finite() || r.patched.is_some_and(|p| !p.is_finite())).collect();
                if let Some(first) = bad.first() {
                    let f = nonfinite::Finding { kind: "result".into(), at: format!("run '{}' ({})", run.name, first.hook), count: bad.len() as i64, prompt: first.prompt.map(i64::from), position: first.pos.map(i64::from) };
                    record.found(f, &run_notes, &timings, cx.as_ref().and_then(|c| c.prepared()), toks.as_ref())?;
                }
                let path = match opts.shard {
                    Some(s) => s.part_path(out_dir, &run.name)?,
                    None => atomic::file_in(out_dir, &run.name, ".parquet")?,
                };
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
                    atomic::remove_stale_temps(parent);
                }
                write_parquet(&path, &rows)?;
                files.push(path.clone());
                let mut note = crate::experiments::kinds::run_note(run, &notes);
                if !note.is_object() {
                    note = serde_json::json!({});
                }
                note["kind"] = run.kind_name().into();
                note["file"] = path.strip_prefix(out_dir).unwrap_or(&path).display().to_string().into();
                note["rows"] = rows.len().into();
                note["jobs"] = mine.clone().into();
                run_notes.insert(run.name.clone(), note);
                rows_out = Some(rows.len());
                if !rows.is_empty() {
                    summary.push_str(&top_rows(&run.name, &rows));
                }
            }
            _ => {}
        }
        let seconds = seconds.unwrap_or_else(|| t_job.elapsed().as_secs_f64());
        if status[job.id] == "ran" && (job.task.is_work() || needed[job.id]) {
            timings.insert(job.name.clone(), seconds);
        }
        let stored_rows = results.get(&job.id).map(|(r, _)| r.len());
        records.push(JobRecord {
            id: job.id,
            name: job.name.clone(),
            key: job.key.clone(),
            status: status[job.id],
            shard: shards.as_ref().and_then(|a| a[job.id]),
            rows: rows_out.or(stored_rows),
            seconds,
        });
        if job.task == Task::Manifest {
            // The manifest says complete only once every job is in the store.
            if let Some(w) = writer.take() {
                w.finish()?;
            }
        }
        if matches!(job.task, Task::Write { .. } | Task::Manifest) {
            record.jobs = records.clone();
            record.complete = job.task == Task::Manifest;
            record.write(&run_notes, &timings, cx.as_ref().and_then(|c| c.prepared()), toks.as_ref())?;
        }
    }
    Ok(())
    })();
    if let Some(p) = &pool {
        p.stop();
    }
    result
    })?;
    overall.finish_and_clear();
    let count = |s: &str| records.iter().filter(|r| r.status == s && plan.jobs[r.id].task.is_work()).count();
    let jobs = format!("jobs: {} ran, {} read from the store{}", count("ran"), count("stored"), opts.shard.map(|s| format!(", {} in other shards (this is shard {} of {})", count("other shard"), s.index, s.count)).unwrap_or_default());
    Ok(Outcome { files, manifest: record.path.clone(), summary, jobs })
}

/// The warm-up of a CUDA device beside the model's load (engine::warm): the clean run's tokens,
/// with a backward when an attribution pass will run. None on the CPU, for a model split over
/// devices, without prompts, where the miniature would crowd the model out of memory, or with
/// TL_RUN_WARM_UP=0 (so a bench can measure what it saves).
fn warm_up_for(spec: &Spec, plan: &Plan, needed: &[bool], cfg: &ModelConfig, device: Device, toks: Option<&Tokenized>) -> Option<(LoadOptions, crate::engine::warm::WarmUp)> {
    use crate::engine::warm::{fits, WarmUp};
    let toks = toks?;
    if !device.is_cuda() || spec.model.split_layers || std::env::var("TL_RUN_WARM_UP").is_ok_and(|v| v == "0") {
        return None;
    }
    let backward = plan.jobs.iter().any(|j| j.task == Task::AttributionPass && needed[j.id]);
    let run = WarmUp { tokens: toks.clean.shallow_clone(), mask: toks.mask.as_ref().map(Tensor::shallow_clone), backward };
    let kind = spec.model.kind().ok()?;
    fits(cfg, kind, device, &run).then(|| (LoadOptions { revision: None, processing: spec.model.processing, device, kind, split: Vec::new() }, run))
}

/// Runs work job `job` (a panic in it becomes an error naming its prompts) and stores its
/// result under its key at once.
pub(crate) fn run_and_store(cx: &RunContext, job: &crate::graph::Job, store: Option<&Store>) -> Result<JobOutput> {
    let run = &cx.spec.runs[job.task.run().ok_or_else(|| Error::Other(format!("job [{}] is not a work job", job.id)))?];
    let (rows, note) = crate::panics::guarded(&prompts_of(cx.toks), || {
        crate::panics::injected(&job.name);
        crate::experiments::kinds::run_job(cx, run, job.task.part())
    })?;
    if let (Some(store), Some(key)) = (store, &job.key) {
        store.put(key, &rows, &note)?;
    }
    Ok((rows, note))
}

/// `job` and the activation-patching jobs at its layer (at any layer with `across_layers`, for
/// the staircase schedule) that are still to run (status "ran", later in the plan, their inputs
/// ready, not in a group that failed): one group of forwards (patch_together). Any other job
/// alone.
fn patch_group(plan: &crate::graph::Plan, job: &crate::graph::Job, status: &[&str], alone: &std::collections::HashSet<usize>, across_layers: bool) -> Vec<usize> {
    let Task::Patch { layer, .. } = job.task else { return vec![job.id] };
    if alone.contains(&job.id) {
        return vec![job.id];
    }
    let mut group = vec![job.id];
    for other in plan.jobs.iter().skip(job.id + 1) {
        let ready = other.deps.iter().all(|&d| d < job.id) && !alone.contains(&other.id);
        if matches!(other.task, Task::Patch { layer: l, .. } if l == layer || across_layers) && status[other.id] == "ran" && ready {
            group.push(other.id);
        }
    }
    group
}

/// Runs a group of patching jobs together (their stores are written as the loop reaches them).
fn run_patch_group(cx: &RunContext, plan: &crate::graph::Plan, group: &[usize]) -> Result<Vec<JobOutput>> {
    let jobs: Vec<(&crate::spec::RunSpec, crate::experiments::kinds::Part)> = group
        .iter()
        .map(|&id| {
            let task = plan.jobs[id].task;
            let run = task.run().ok_or_else(|| Error::Other(format!("job [{id}] is not a work job")))?;
            Ok((&cx.spec.runs[run], task.part()))
        })
        .collect::<Result<_>>()?;
    crate::panics::guarded(&prompts_of(cx.toks), || {
        for &id in group {
            crate::panics::injected(&plan.jobs[id].name);
        }
        crate::experiments::kinds::activation_patching::patch_together(cx, &jobs)
    })
}

/// The prompts a job computes on, for a failure's message (jobs batch every prompt).
pub(crate) fn prompts_of(toks: Option<&Tokenized>) -> String {
    match toks.map(Tokenized::n_prompts) {
        Some(0) | None => "no prompts".into(),
        Some(1) => "prompt 0".into(),
        Some(n) => format!("prompts 0-{} (one batch)", n - 1),
    }
}

/// A NaN baseline: the first hook of the clean (or corrupted) run it comes from.
pub(crate) fn baseline_finding(cx: &RunContext) -> Result<Option<nonfinite::Finding>> {
    let (Some(p), Some(t)) = (cx.prepared(), cx.toks) else { return Ok(None) };
    let bad_clean = p.clean_per_prompt.iter().any(|v| !v.is_finite());
    if !bad_clean && p.corrupted_per_prompt.iter().all(|v| v.is_finite()) {
        return Ok(None);
    }
    let (which, tokens) = if bad_clean { ("clean", Some(&t.clean)) } else { ("corrupted", t.corrupted.as_ref()) };
    let found = match tokens {
        Some(tokens) => nonfinite::first_in_activations(cx.model, tokens, t.mask.as_ref())?,
        None => None,
    };
    Ok(Some(found.unwrap_or_else(|| nonfinite::Finding { kind: "baseline".into(), at: format!("the {which} run's metric"), count: 1, prompt: None, position: None })))
}

/// What the manifest records, written after every run (and when a run stops on a NaN).
struct Record<'a> {
    spec: &'a Spec,
    model: serde_json::Value,
    device: String,
    dtype: String,
    path: PathBuf,
    shard: Option<Shard>,
    jobs: Vec<JobRecord>,
    nonfinite: Vec<nonfinite::Finding>,
    /// Set when the last job has run (what `merge` waits for).
    complete: bool,
}

impl<'a> Record<'a> {
    fn new(spec: &'a Spec, source: &ModelSource, digests: &[(PathBuf, String)], shard: Option<Shard>) -> Self {
        let files = source.files();
        let is_weight = |p: &PathBuf| files.is_some_and(|f| f.weights.contains(p));
        let weights: Vec<serde_json::Value> = digests.iter().filter(|(p, _)| is_weight(p)).map(|(p, d)| serde_json::json!({"file": p.display().to_string(), "sha256": d})).collect();
        let model = serde_json::json!({
            "id": spec.model.id,
            "family": source.cfg().family,
            "resolved_commit": files.and_then(|f| f.commit.clone()),
            "weights": weights,
            "processing": spec.model.processing,
        });
        let (device, dtype) = match source {
            ModelSource::Loaded(m) => (format!("{:?}", m.device), format!("{:?}", m.kind)),
            ModelSource::Lazy { .. } => (spec.model.device.clone(), spec.model.kind().map(|k| format!("{k:?}")).unwrap_or_else(|_| spec.model.dtype.clone())),
        };
        let name = shard.map_or_else(|| "manifest.json".to_string(), |s| s.manifest_name());
        Record { spec, model, device, dtype, path: spec.output_dir.join(name), shard, jobs: Vec::new(), nonfinite: Vec::new(), complete: false }
    }

    /// What only a loaded model tells: the device and dtype it runs in, its processing.
    fn loaded(&mut self, model: &Model) {
        self.device = format!("{:?}", model.device);
        self.dtype = format!("{:?}", model.kind);
        self.model["processing"] = serde_json::to_value(model.processing).unwrap_or_default();
        self.model["layer_devices"] = model.layer_devices.iter().map(|d| format!("{d:?}")).collect();
    }

    fn write(&self, runs: &serde_json::Map<String, serde_json::Value>, timings: &BTreeMap<String, f64>, prep: Option<&Prepared>, toks: Option<&Tokenized>) -> Result<()> {
        let spec = self.spec;
        let metric = match prep {
            Some(p) => serde_json::json!({"kind": spec.metric.kind, "noise_samples_per_prompt": spec.corruption.samples(), "normalize": spec.metric.normalize,
                       "clean_baseline": p.clean_baseline(), "corrupted_baseline": p.corrupted_baseline(),
                       "clean_per_prompt": p.clean_per_prompt, "corrupted_per_prompt": p.corrupted_per_prompt}),
            None => serde_json::json!({"kind": spec.metric.kind, "normalize": spec.metric.normalize}),
        };
        let manifest = serde_json::json!({
            "spec": spec,
            "spec_hash": spec.spec_hash,
            "model": self.model,
            "tl_run": {"version": env!("CARGO_PKG_VERSION"), "git_commit": option_env!("TL_RUN_GIT_COMMIT").unwrap_or("unknown"), "engine": keys::engine_id()},
            "device": self.device,
            "dtype": self.dtype,
            "shard": self.shard,
            "complete": self.complete,
            "metric": metric,
            "tokens": toks.map(|t| t.record.clone()),
            "runs": runs,
            "jobs": self.jobs,
            "nonfinite": self.nonfinite,
            "timings_seconds": timings,
        });
        std::fs::create_dir_all(&spec.output_dir).map_err(|e| Error::io(&spec.output_dir, e))?;
        atomic::write_bytes(&self.path, serde_json::to_string_pretty(&manifest).map_err(|e| Error::Other(e.to_string()))?.as_bytes())
    }

    /// Records a NaN/inf finding; unless the spec allows them, writes the manifest with it and
    /// stops the run with an error naming where it first appeared.
    fn found(&mut self, f: nonfinite::Finding, runs: &serde_json::Map<String, serde_json::Value>, timings: &BTreeMap<String, f64>, prep: Option<&Prepared>, toks: Option<&Tokenized>) -> Result<()> {
        let message = f.to_string();
        self.nonfinite.push(f);
        if self.spec.allow_nonfinite {
            tracing::warn!("{message} (allow_nonfinite: recorded in the manifest)");
            return Ok(());
        }
        self.write(runs, timings, prep, toks)?;
        Err(Error::Other(format!(
            "{message}; the run stopped (recorded in {}). Set allow_nonfinite = true at the top of the spec to run on and record them instead",
            self.path.display()
        )))
    }
}

/// A one-screen summary: the rows with the largest |value| per run.
fn top_rows(run: &str, rows: &[&Row]) -> String {
    let mut means: Vec<&Row> = rows.iter().copied().filter(|r| r.prompt.is_none() && r.rank.is_none()).collect();
    means.sort_by(|a, b| b.value.abs().total_cmp(&a.value.abs()));
    let mut s = format!("{run}: top rows by |value|\n");
    for r in means.iter().take(5) {
        let mut at = Vec::new();
        for (k, v) in [("head", r.head), ("pos", r.pos), ("dest", r.dest_pos), ("src", r.src_pos), ("neuron", r.neuron)] {
            if let Some(v) = v {
                at.push(format!("{k} {v}"));
            }
        }
        let what = r.label.clone().or_else(|| r.pattern.clone()).unwrap_or_else(|| r.hook.clone());
        let what = if r.pattern.is_some() { format!("{} {}", r.pattern.as_deref().unwrap_or(""), r.hook) } else { what };
        let tok = r.token.as_ref().map(|t| format!(" {t:?}")).unwrap_or_default();
        s.push_str(&format!("  {:<28} {:<18} {:>9.4}{tok}\n", what, at.join(", "), r.value));
    }
    s
}
