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
use crate::error::{Error, Result};
use crate::graph::manifest::{JobRecord, Record};
use crate::graph::patch_groups::{run_here, PatchGroups};
use crate::graph::shard::{self, Shard};
use crate::graph::store::Store;
use crate::graph::{devices, keys, Plan, Task};
use crate::kinds::shared::context::RunContext;
use crate::kinds::shared::inputs::{first_changed, tokenize, Tokenized};
use crate::kinds::JobOutput;
use crate::kinds::Spec;
use crate::model::config::ModelConfig;
use crate::model::source::ModelFiles;
use crate::model::tokenize::TextTokenizer;
use crate::model::{LoadOptions, Model};
use crate::output::atomic;
use crate::output::table::{write_parquet, Row};

/// A work job's rows (shared with the store's writer) and its manifest note.
type StoredOutput = (std::sync::Arc<Vec<Row>>, serde_json::Value);

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
    Lazy {
        cfg: &'a ModelConfig,
        tokenizer: Option<&'a TextTokenizer>,
        files: Option<&'a ModelFiles>,
        device: Device,
        load: Box<devices::Loader<'a>>,
    },
}

impl ModelSource<'_> {
    pub(crate) fn cfg(&self) -> &ModelConfig {
        match self {
            ModelSource::Loaded(m) => &m.cfg,
            ModelSource::Lazy { cfg, .. } => cfg,
        }
    }
    fn tokenizer(&self) -> Result<&TextTokenizer> {
        match self {
            ModelSource::Loaded(m) => m.tokenizer(),
            ModelSource::Lazy { tokenizer, .. } => {
                tokenizer.ok_or_else(|| Error::Tokenizer("this model has no tokenizer.json".into()))
            }
        }
    }
    pub(crate) fn files(&self) -> Option<&ModelFiles> {
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
pub fn compile(
    spec: &Spec,
    cfg: &ModelConfig,
    tok: Option<&TextTokenizer>,
    files: Option<&ModelFiles>,
) -> Result<Compiled> {
    let needs_prompts = spec.runs.iter().any(|r| r.kind.needs().prompts);
    let needs_corruption = spec.runs.iter().any(|r| r.kind.needs().corruption);
    let toks = match (needs_prompts, tok) {
        (true, Some(tok)) => Some(tokenize(spec, tok, cfg, needs_corruption)?),
        (true, None) => {
            return Err(Error::Tokenizer("the spec's runs read prompts, and this model has no tokenizer.json".into()))
        }
        (false, _) => None,
    };
    compile_tokenized(spec, cfg, toks, files)
}

/// The job graph with its keys, for prompts already tokenized (None when no run reads prompts).
pub fn compile_tokenized(
    spec: &Spec,
    cfg: &ModelConfig,
    toks: Option<Tokenized>,
    files: Option<&ModelFiles>,
) -> Result<Compiled> {
    for run in &spec.runs {
        run.check_model(cfg, &spec.file).map_err(Error::Config)?;
    }
    let (seq, first_diff) = toks.as_ref().map_or((0, 0), |t| (t.clean.size()[1] as usize, first_changed(t)));
    let mut plan = Plan::build(spec, cfg, seq, first_diff);
    let digests = match files {
        Some(f) => crate::model::digest::model_digests(f)?,
        None => vec![],
    };
    keys::assign(&mut plan, spec, toks.as_ref(), &digests)?;
    Ok(Compiled { plan, toks, digests })
}

/// Runs the plan of `spec`: every job in order; a work job's result comes from the store when
/// its key is there, else it runs and is stored at once; shared passes run only when a job
/// that reads them runs. Each run's Parquet (or shard part) is written as soon as its jobs are
/// done, and the manifest after every run.
pub fn execute(spec: &Spec, source: ModelSource, opts: &ExecOptions) -> Result<Outcome> {
    let t = Instant::now();
    let compiled = compile(
        spec,
        source.cfg(),
        if spec.runs.iter().any(|r| r.kind.needs().prompts) { Some(source.tokenizer()?) } else { None },
        source.files(),
    )?;
    let seconds = t.elapsed().as_secs_f64();
    execute_compiled(spec, source, compiled, seconds, opts)
}

/// `execute` for a spec already compiled (`compile_seconds`: what that took, for the manifest).
pub fn execute_compiled(
    spec: &Spec,
    source: ModelSource,
    compiled: Compiled,
    compile_seconds: f64,
    opts: &ExecOptions,
) -> Result<Outcome> {
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
    let (mut status, mut results) = work_status(spec, &plan, store.as_ref(), opts.fresh, owned);
    let needed = needed_by_running_jobs(&plan, &mut status);

    let parallel = opts.devices.len() > 1 && matches!(source, ModelSource::Lazy { .. });
    let queue = std::sync::Mutex::new(
        plan.work().filter(|j| status[j.id] == "ran").map(|j| j.id).collect::<std::collections::VecDeque<usize>>(),
    );
    let (abort, reported) = (std::sync::atomic::AtomicBool::new(false), std::sync::atomic::AtomicBool::new(false));
    let model_cell: OnceCell<Model> = OnceCell::new();
    let mut cx: Option<RunContext> = None;
    let multi = opts.progress.then(indicatif::MultiProgress::new);
    let overall =
        jobs_bar(multi.as_ref(), plan.work().filter(|j| status[j.id] == "ran").map(|j| j.cost.max(1.0)).sum());
    let mut record = Record::new(spec, &source, &digests, opts.shard);
    let mut records: Vec<JobRecord> = Vec::new();
    let mut files = Vec::new();
    let mut run_notes = serde_json::Map::new();
    let mut summary = String::new();
    let mut groups = PatchGroups::default();
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
                            let shared = devices::Shared {
                                spec,
                                plan: &plan,
                                store: store.as_ref(),
                                load: load.as_ref(),
                                abort: &abort,
                                reported: &reported,
                                queue: &queue,
                            };
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
                                let (loaded, warm_up_seconds) =
                                    load_beside_warm_up(&job.name, load, *device, cfg, warm);
                                if let Some(seconds) = warm_up_seconds {
                                    // "load model" first: start-up benches count it as loading.
                                    timings.insert("load model (device warm-up beside it)".into(), seconds);
                                }
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
                        if task == Task::CleanCorrupted
                            && plan.jobs.iter().any(|j| j.task == Task::AttributionPass && needed[j.id])
                        {
                            c.expect_attribution_pass();
                        }
                        c.force(task.shared_pass().expect("a shared pass")).map_err(|e| {
                            Error::Other(format!("job [{}] {} on {}: {e}", job.id, job.name, prompts_of(toks.as_ref())))
                        })?;
                        if task == Task::CleanCorrupted {
                            if let Some(f) = baseline_finding(c)? {
                                record.found(f, &run_notes, &timings, c.clean_corrupted_if_made(), toks.as_ref())?;
                            }
                        }
                    }
                    task if task.is_work() && status[job.id] == "ran" => {
                        overall.set_message(job.name.clone());
                        let run = &spec.runs[task.run().expect("work jobs have a run")];
                        let named = |e: Error| match e {
                            Error::Config(m) => {
                                Error::Config(format!("run '{}', job [{}] {}: {m}", run.name, job.id, job.name))
                            }
                            other => {
                                Error::Other(format!("run '{}', job [{}] {}: {other}", run.name, job.id, job.name))
                            }
                        };
                        let (rows, note) = match pool.as_mut() {
                            Some(p) => {
                                let (rows, note, secs, device) = p
                                    .wait(job.id, |f| record.found(f, &run_notes, &timings, None, toks.as_ref()))
                                    .map_err(named)?;
                                seconds = Some(secs);
                                tracing::debug!(job = job.id, ?device, "job done");
                                (std::sync::Arc::new(rows), note)
                            }
                            None => {
                                let c = cx.as_ref().expect("the model loads before any work job");
                                // run_here stores each job the moment its rows exist.
                                let mut store_job = |j: &crate::graph::Job,
                                                     (rows, note): &crate::graph::patch_groups::SharedOutput|
                                 -> Result<()> {
                                    match (&writer, &store, &j.key) {
                                        (Some(w), Some(s), Some(key)) => w.put(s, key, rows.clone(), note.clone()),
                                        _ => Ok(()),
                                    }
                                };
                                let (rows, note) =
                                    run_here(c, &plan, job, &status, &mut groups, &mut store_job).map_err(named)?;
                                if note.get("forwards_shared_with_jobs").and_then(|v| v.as_u64()).is_some_and(|k| k > 0)
                                {
                                    seconds = note["seconds"].as_f64();
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
                        if let Some(f) = nonfinite_rows(&run.name, &rows) {
                            record.found(
                                f,
                                &run_notes,
                                &timings,
                                cx.as_ref().and_then(|c| c.clean_corrupted_if_made()),
                                toks.as_ref(),
                            )?;
                        }
                        let (path, note) = write_run(out_dir, opts.shard, run, &rows, &notes, &mine)?;
                        files.push(path);
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
                    record.write(
                        &run_notes,
                        &timings,
                        cx.as_ref().and_then(|c| c.clean_corrupted_if_made()),
                        toks.as_ref(),
                    )?;
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
    let jobs = format!(
        "jobs: {} ran, {} read from the store{}",
        count("ran"),
        count("stored"),
        opts.shard
            .map(|s| format!(", {} in other shards (this is shard {} of {})", count("other shard"), s.index, s.count))
            .unwrap_or_default()
    );
    Ok(Outcome { files, manifest: record.path.clone(), summary, jobs })
}

/// Work jobs' results stored from an earlier run (unless `fresh`), and every job's status:
/// "stored", "other shard" (a work job another shard owns) or, for now, "ran".
fn work_status(
    spec: &Spec,
    plan: &Plan,
    store: Option<&Store>,
    fresh: bool,
    owned: impl Fn(usize) -> bool,
) -> (Vec<&'static str>, HashMap<usize, StoredOutput>) {
    let mut results = HashMap::new();
    let mut status: Vec<&'static str> = vec!["ran"; plan.jobs.len()];
    for j in plan.work() {
        if !owned(j.id) {
            status[j.id] = "other shard";
        } else if let (Some(store), false, Some(key)) = (store, fresh, &j.key) {
            if let Some(s) = store.get(key) {
                let run_name = &spec.runs[j.task.run().expect("work jobs have a run")].name;
                let rows = s.rows.into_iter().map(|r| Row { run: run_name.clone(), ..r }).collect();
                results.insert(j.id, (std::sync::Arc::new(rows), s.note));
                status[j.id] = "stored";
            }
        }
    }
    (status, results)
}

/// The jobs that some running work job reads, directly or not (a shared pass runs only then);
/// shared passes no running job reads get status "skipped".
fn needed_by_running_jobs(plan: &Plan, status: &mut [&'static str]) -> Vec<bool> {
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
    needed
}

/// The overall progress bar, in units of job cost (hidden without progress or work).
fn jobs_bar(multi: Option<&indicatif::MultiProgress>, total_cost: f64) -> indicatif::ProgressBar {
    match multi {
        Some(m) if total_cost > 0.0 => {
            let b = m.add(indicatif::ProgressBar::new(total_cost.round().max(1.0) as u64));
            b.set_style(
                indicatif::ProgressStyle::with_template("jobs {msg:48} [{bar:30}] {percent}% {elapsed} (eta {eta})")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            b
        }
        _ => indicatif::ProgressBar::hidden(),
    }
}

/// Loads the model (job `name`) while a second thread warms the device's kernels, when `warm`
/// is given; returns the load's result and the warm-up's seconds if it succeeded. A failed
/// warm-up (a libtorch panic included) is only logged: the runs then pay the kernels' first use.
fn load_beside_warm_up(
    name: &str,
    load: &devices::Loader,
    device: Device,
    cfg: &ModelConfig,
    warm: Option<(LoadOptions, crate::engine::warm::WarmUp)>,
) -> (Result<Model>, Option<f64>) {
    std::thread::scope(|s| {
        let warming = warm.map(|(opts, run)| {
            s.spawn(move || crate::panics::guarded("device warm-up", || crate::engine::warm::warm_up(cfg, &opts, run)))
        });
        let loaded = crate::panics::guarded(name, || load(device));
        let seconds = match warming.map(|w| w.join()) {
            Some(Ok(Ok(seconds))) => {
                tracing::debug!(seconds, "warmed the device beside the load");
                Some(seconds)
            }
            Some(Ok(Err(e))) => {
                tracing::debug!(error = %e, "warming the device failed; the runs pay the first use of its kernels");
                None
            }
            Some(Err(_)) => {
                tracing::debug!("warming the device stopped unexpectedly");
                None
            }
            None => None,
        };
        (loaded, seconds)
    })
}

/// The first non-finite value among a run's rows (value or patched), with their count.
fn nonfinite_rows(run: &str, rows: &[&Row]) -> Option<nonfinite::Finding> {
    let bad: Vec<&Row> =
        rows.iter().copied().filter(|r| !r.value.is_finite() || r.patched.is_some_and(|p| !p.is_finite())).collect();
    let first = bad.first()?;
    Some(nonfinite::Finding {
        kind: "result".into(),
        at: format!("run '{run}' ({})", first.hook),
        count: bad.len() as i64,
        prompt: first.prompt.map(i64::from),
        position: first.pos.map(i64::from),
    })
}

/// Writes a run's Parquet (a shard's part with `shard`) atomically from its jobs' rows, and
/// returns its path and the run's manifest note (the kind's own, with kind, file, rows, jobs).
fn write_run(
    out_dir: &std::path::Path,
    shard: Option<Shard>,
    run: &crate::kinds::RunSpec,
    rows: &[&Row],
    job_notes: &[&serde_json::Value],
    jobs: &[usize],
) -> Result<(PathBuf, serde_json::Value)> {
    let path = match shard {
        Some(s) => s.part_path(out_dir, &run.name)?,
        None => atomic::file_in(out_dir, &run.name, ".parquet")?,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        atomic::remove_stale_temps(parent);
    }
    write_parquet(&path, rows)?;
    let mut note = crate::kinds::run_note(run, job_notes);
    if !note.is_object() {
        note = serde_json::json!({});
    }
    note["kind"] = run.kind_name().into();
    note["file"] = path.strip_prefix(out_dir).unwrap_or(&path).display().to_string().into();
    note["rows"] = rows.len().into();
    note["jobs"] = jobs.into();
    Ok((path, note))
}

/// The warm-up of a CUDA device beside the model's load (engine::warm): the clean run's tokens,
/// with a backward when an attribution pass will run. None on the CPU, for a model split over
/// devices, without prompts, where the miniature would crowd the model out of memory, or with
/// TL_RUN_WARM_UP=0 (so a bench can measure what it saves).
fn warm_up_for(
    spec: &Spec,
    plan: &Plan,
    needed: &[bool],
    cfg: &ModelConfig,
    device: Device,
    toks: Option<&Tokenized>,
) -> Option<(LoadOptions, crate::engine::warm::WarmUp)> {
    use crate::engine::warm::{fits, WarmUp};
    let toks = toks?;
    if !device.is_cuda() || spec.model.split_layers || std::env::var("TL_RUN_WARM_UP").is_ok_and(|v| v == "0") {
        return None;
    }
    let backward = plan.jobs.iter().any(|j| j.task == Task::AttributionPass && needed[j.id]);
    let run =
        WarmUp { tokens: toks.clean.shallow_clone(), mask: toks.mask.as_ref().map(Tensor::shallow_clone), backward };
    let kind = spec.model.kind().ok()?;
    fits(cfg, kind, device, &run).then(|| {
        (
            LoadOptions {
                revision: None,
                processing: spec.model.processing,
                device,
                kind,
                split: Vec::new(),
                attention: spec.model.attention,
            },
            run,
        )
    })
}

/// Runs work job `job` (a panic in it becomes an error naming its prompts) and stores its
/// result under its key at once.
pub(crate) fn run_and_store(cx: &RunContext, job: &crate::graph::Job, store: Option<&Store>) -> Result<JobOutput> {
    let run =
        &cx.spec.runs[job.task.run().ok_or_else(|| Error::Other(format!("job [{}] is not a work job", job.id)))?];
    let (rows, note) = crate::panics::guarded(&prompts_of(cx.toks), || {
        crate::panics::injected(&job.name);
        crate::kinds::run_job(cx, run, job.task.part())
    })?;
    if let (Some(store), Some(key)) = (store, &job.key) {
        store.put(key, &rows, &note)?;
    }
    Ok((rows, note))
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
    let (Some(p), Some(t)) = (cx.clean_corrupted_if_made(), cx.toks) else { return Ok(None) };
    let bad_clean = p.clean_per_prompt.iter().any(|v| !v.is_finite());
    if !bad_clean && p.corrupted_per_prompt.iter().all(|v| v.is_finite()) {
        return Ok(None);
    }
    let (which, tokens) = if bad_clean { ("clean", Some(&t.clean)) } else { ("corrupted", t.corrupted.as_ref()) };
    let found = match tokens {
        Some(tokens) => nonfinite::first_in_activations(cx.model, tokens, t.mask.as_ref())?,
        None => None,
    };
    Ok(Some(found.unwrap_or_else(|| nonfinite::Finding {
        kind: "baseline".into(),
        at: format!("the {which} run's metric"),
        count: 1,
        prompt: None,
        position: None,
    })))
}

/// A one-screen summary: the rows with the largest |value| per run.
fn top_rows(run: &str, rows: &[&Row]) -> String {
    let mut means: Vec<&Row> = rows.iter().copied().filter(|r| r.prompt.is_none() && r.rank.is_none()).collect();
    means.sort_by(|a, b| b.value.abs().total_cmp(&a.value.abs()));
    let mut s = format!("{run}: top rows by |value|\n");
    for r in means.iter().take(5) {
        let mut at = Vec::new();
        for (k, v) in [("head", r.head), ("pos", r.pos), ("dest", r.dest_pos), ("src", r.src_pos), ("neuron", r.neuron)]
        {
            if let Some(v) = v {
                at.push(format!("{k} {v}"));
            }
        }
        let what = r.label.clone().or_else(|| r.pattern.clone()).unwrap_or_else(|| r.hook.clone());
        let what =
            if r.pattern.is_some() { format!("{} {}", r.pattern.as_deref().unwrap_or(""), r.hook) } else { what };
        let tok = r.token.as_ref().map(|t| format!(" {t:?}")).unwrap_or_default();
        s.push_str(&format!("  {:<28} {:<18} {:>9.4}{tok}\n", what, at.join(", "), r.value));
    }
    s
}
