//! The executor: one execution of a compiled plan, every job in order. Work jobs are stored as
//! they finish and read back on a rerun; shared passes run only for jobs that run; each run's
//! Parquet is written as soon as its jobs are done and the manifest after every run, so a
//! failure (or a kill) later on leaves the finished outputs, the stored jobs and a manifest that
//! describes them.
use std::cell::OnceCell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;
use std::time::Instant;

use tch::{Device, Tensor};

use crate::engine::nonfinite;
use crate::error::{Error, Result};
use crate::graph::execute::{Compiled, ExecOptions, Outcome};
use crate::graph::job::{baseline_finding, prompts_of};
use crate::graph::manifest::{JobRecord, Record};
use crate::graph::patch_groups::{run_here, PatchGroups, SharedOutput};
use crate::graph::progress_lines::ProgressLines;
use crate::graph::shard::{self, Shard};
use crate::graph::source::ModelSource;
use crate::graph::status::{needed_by_running_jobs, work_status, JobStatus};
use crate::graph::store::Store;
use crate::graph::{devices, Job, Plan, Task};
use crate::kinds::shared::context::RunContext;
use crate::kinds::shared::inputs::Tokenized;
use crate::kinds::Spec;
use crate::model::config::ModelConfig;
use crate::model::{LoadOptions, Model};
use crate::output::atomic;
use crate::output::table::{write_parquet, Row};

/// `execute` for a spec already compiled (`compile_seconds`: what that took, for the manifest).
pub fn execute_compiled(
    spec: &Spec,
    source: ModelSource,
    compiled: Compiled,
    compile_seconds: f64,
    opts: &ExecOptions,
) -> Result<Outcome> {
    let Compiled { plan, toks, digests } = compiled;
    let out_dir = &spec.output_dir;
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    atomic::remove_stale_temps(out_dir);
    let store = if opts.store { Some(Store::open(out_dir)?) } else { None };
    let shards = opts.shard.map(|s| shard::assign(&plan, s.count));
    let (mut status, results) =
        work_status(spec, &plan, store.as_ref(), opts.fresh, |id| owns(shards.as_deref(), opts.shard, id));
    let needed = needed_by_running_jobs(&plan, &mut status);
    // What the device replicas share, when there are several (they outlive the executor).
    let queue = Mutex::new(plan.work().filter(|j| status[j.id] == JobStatus::Ran).map(|j| j.id).collect());
    let (abort, reported) = (AtomicBool::new(false), AtomicBool::new(false));
    let model_cell: OnceCell<Model> = OnceCell::new();
    let multi = opts.progress.then(indicatif::MultiProgress::new);
    let overall =
        jobs_bar(multi.as_ref(), plan.work().filter(|j| status[j.id] == JobStatus::Ran).map(|j| j.cost.max(1.0)).sum());
    let to_run: Vec<&Job> = plan.work().filter(|j| status[j.id] == JobStatus::Ran).collect();
    let lines = opts.progress_lines.then(|| {
        let every = std::time::Duration::from_secs(10);
        ProgressLines::new(to_run.iter().map(|j| j.cost.max(1.0)).sum(), to_run.len(), every)
    });
    let mut ex = Executor {
        spec,
        plan: &plan,
        toks: toks.as_ref(),
        source: &source,
        opts,
        store: store.as_ref(),
        writer: store.as_ref().map(crate::graph::store::Writer::start),
        shards,
        status,
        needed,
        results,
        timings: BTreeMap::from([("tokenize and plan".to_string(), compile_seconds)]),
        record: Record::new(spec, &source, &digests, opts.shard),
        records: Vec::new(),
        files: Vec::new(),
        run_notes: serde_json::Map::new(),
        summary: String::new(),
        groups: PatchGroups::default(),
        model_cell: &model_cell,
        cx: None,
        pool: None,
        multi,
        overall,
        lines,
    };
    let replicas = Replicas { queue: &queue, abort: &abort, reported: &reported };
    std::thread::scope(|scope| {
        let result = plan.jobs.iter().try_for_each(|job| ex.step(scope, &replicas, job));
        if let Some(p) = &ex.pool {
            p.stop();
        }
        result
    })?;
    Ok(ex.outcome())
}

/// Whether `shard` owns job `id`, given each job's shard (every job when the run is not sharded).
fn owns(shards: Option<&[Option<usize>]>, shard: Option<Shard>, id: usize) -> bool {
    match (shards, shard) {
        (Some(a), Some(s)) => a[id] == Some(s.index),
        _ => true,
    }
}

/// What the device replicas of a multi-device run share with the executor.
struct Replicas<'a> {
    queue: &'a Mutex<VecDeque<usize>>,
    abort: &'a AtomicBool,
    reported: &'a AtomicBool,
}

/// One execution of a plan: every job in order (`step`), one method per task; the manifest is
/// rewritten after every run's write.
struct Executor<'a> {
    spec: &'a Spec,
    plan: &'a Plan,
    toks: Option<&'a Tokenized>,
    source: &'a ModelSource<'a>,
    opts: &'a ExecOptions,
    store: Option<&'a Store>,
    writer: Option<crate::graph::store::Writer>,
    /// Each job's shard, for a sharded run.
    shards: Option<Vec<Option<usize>>>,
    status: Vec<JobStatus>,
    /// Whether a job that runs reads this job (a shared pass or the load runs only then).
    needed: Vec<bool>,
    /// Work jobs' results (run or stored), by job id.
    results: HashMap<usize, SharedOutput>,
    timings: BTreeMap<String, f64>,
    record: Record<'a>,
    records: Vec<JobRecord>,
    files: Vec<PathBuf>,
    run_notes: serde_json::Map<String, serde_json::Value>,
    summary: String,
    groups: PatchGroups,
    model_cell: &'a OnceCell<Model>,
    cx: Option<RunContext<'a>>,
    /// The device replicas (several devices and a lazily loaded model).
    pool: Option<devices::Pool<'a>>,
    multi: Option<indicatif::MultiProgress>,
    overall: indicatif::ProgressBar,
    lines: Option<ProgressLines>,
}

/// What a job's task reported for its manifest entry: its rows, and its seconds when not the
/// wall time of its step (a job run on a replica or as part of a patch group).
#[derive(Default)]
struct Done {
    rows: Option<usize>,
    seconds: Option<f64>,
}

impl<'a> Executor<'a> {
    /// Runs (or skips, or takes from the store) one job and records it.
    fn step<'scope>(
        &mut self,
        scope: &'scope std::thread::Scope<'scope, 'a>,
        replicas: &Replicas<'a>,
        job: &Job,
    ) -> Result<()> {
        let t_job = Instant::now();
        let parallel = self.opts.devices.len() > 1 && matches!(self.source, ModelSource::Lazy { .. });
        let done = match job.task {
            Task::Tokenize => Done::default(),
            Task::Load if self.needed[job.id] && parallel => {
                self.start_replicas(scope, replicas);
                Done::default()
            }
            // With several devices every replica makes the shared passes its jobs read.
            task if task.is_shared() && parallel => Done::default(),
            Task::Load if self.needed[job.id] => {
                self.load(job)?;
                Done::default()
            }
            task if task.is_shared() && self.needed[job.id] => {
                self.shared_pass(job)?;
                Done::default()
            }
            task if task.is_work() && self.status[job.id] == JobStatus::Ran => self.work(job)?,
            Task::Write { run } => self.write(job, run)?,
            _ => Done::default(),
        };
        self.record_job(job, done, t_job.elapsed().as_secs_f64())
    }

    /// Starts one model replica per device, each pulling work jobs from the queue.
    fn start_replicas<'scope>(&mut self, scope: &'scope std::thread::Scope<'scope, 'a>, replicas: &Replicas<'a>) {
        if let ModelSource::Lazy { load, .. } = self.source {
            let shared = devices::Shared {
                spec: self.spec,
                plan: self.plan,
                store: self.store,
                load: load.as_ref(),
                abort: replicas.abort,
                reported: replicas.reported,
                queue: replicas.queue,
            };
            self.pool = Some(devices::Pool::start(scope, &self.opts.devices, shared, self.toks));
            self.record.device = format!("{:?}", self.opts.devices);
        }
    }

    /// Loads the model (warming a CUDA device beside it) and makes the run context.
    fn load(&mut self, job: &Job) -> Result<()> {
        let model: &'a Model = match self.source {
            ModelSource::Loaded(m) => m,
            ModelSource::Lazy { load, device, cfg, .. } => {
                let warm = warm_up_for(self.spec, self.plan, &self.needed, cfg, *device, self.toks);
                let (loaded, warm_up_seconds) = load_beside_warm_up(&job.name, load, *device, cfg, warm);
                if let Some(seconds) = warm_up_seconds {
                    // "load model" first: start-up benches count it as loading.
                    self.timings.insert("load model (device warm-up beside it)".into(), seconds);
                }
                let _ = self.model_cell.set(loaded?);
                self.model_cell.get().expect("set above")
            }
        };
        self.record.loaded(model);
        if let Some(f) = nonfinite::first_in_weights(model) {
            self.record.found(f, &self.run_notes, &self.timings, None, self.toks)?;
        }
        self.cx = Some(RunContext::new(self.spec, model, self.toks, self.multi.clone()));
        Ok(())
    }

    /// Makes a shared pass (the clean + corrupted runs, the attribution backward, the analysis
    /// cache) that a job that runs reads.
    fn shared_pass(&mut self, job: &Job) -> Result<()> {
        let c = self.cx.as_ref().expect("the model loads before any shared pass");
        self.overall.set_message(job.name.clone());
        let task = job.task;
        if task == Task::CleanCorrupted
            && self.plan.jobs.iter().any(|j| j.task == Task::AttributionPass && self.needed[j.id])
        {
            c.expect_attribution_pass();
        }
        c.force(task.shared_pass().expect("a shared pass"))
            .map_err(|e| Error::Other(format!("job [{}] {} on {}: {e}", job.id, job.name, prompts_of(self.toks))))?;
        if task == Task::CleanCorrupted {
            if let Some(f) = baseline_finding(c)? {
                self.record.found(f, &self.run_notes, &self.timings, c.clean_corrupted_if_made(), self.toks)?;
            }
        }
        Ok(())
    }

    /// Runs a work job: on a replica, or here (with the patching jobs that share its forwards),
    /// storing its result the moment it exists.
    fn work(&mut self, job: &Job) -> Result<Done> {
        self.overall.set_message(job.name.clone());
        let run = &self.spec.runs[job.task.run().expect("work jobs have a run")];
        let named = |e: Error| match e {
            Error::Config(m) => Error::Config(format!("run '{}', job [{}] {}: {m}", run.name, job.id, job.name)),
            other => Error::Other(format!("run '{}', job [{}] {}: {other}", run.name, job.id, job.name)),
        };
        let mut done = Done::default();
        let (rows, note) = match self.pool.as_mut() {
            Some(p) => {
                let (record, run_notes, timings, toks) = (&mut self.record, &self.run_notes, &self.timings, self.toks);
                let (rows, note, secs, device) =
                    p.wait(job.id, |f| record.found(f, run_notes, timings, None, toks)).map_err(named)?;
                done.seconds = Some(secs);
                tracing::debug!(job = job.id, ?device, "job done");
                (std::sync::Arc::new(rows), note)
            }
            None => {
                let c = self.cx.as_ref().expect("the model loads before any work job");
                let (writer, store) = (&self.writer, self.store);
                // run_here stores each job the moment its rows exist.
                let mut store_job = |j: &Job, (rows, note): &SharedOutput| -> Result<()> {
                    match (writer, store, &j.key) {
                        (Some(w), Some(s), Some(key)) => w.put(s, key, rows.clone(), note.clone()),
                        _ => Ok(()),
                    }
                };
                let (rows, note) =
                    run_here(c, self.plan, job, &self.status, &mut self.groups, &mut store_job).map_err(named)?;
                if note.get("forwards_shared_with_jobs").and_then(|v| v.as_u64()).is_some_and(|k| k > 0) {
                    done.seconds = note["seconds"].as_f64();
                }
                (rows, note)
            }
        };
        done.rows = Some(rows.len());
        self.results.insert(job.id, (rows, note));
        self.overall.inc(job.cost.max(1.0).round() as u64);
        if let Some(line) = self.lines.as_mut().and_then(|l| l.job_done(&job.name, job.cost.max(1.0))) {
            eprintln!("{line}");
        }
        Ok(done)
    }

    /// Writes run `r`'s Parquet (or this shard's part) from its jobs' rows.
    fn write(&mut self, job: &Job, r: usize) -> Result<Done> {
        let run = &self.spec.runs[r];
        let mine: Vec<usize> = job.deps.iter().copied().filter(|&d| self.owned(d)).collect();
        // The jobs' rows are borrowed, not copied, into the file.
        let mut rows: Vec<&Row> = Vec::new();
        let mut notes: Vec<&serde_json::Value> = Vec::new();
        for d in &mine {
            let (r, n) = self.results.get(d).expect("every owned work job ran or was stored");
            rows.extend(r.iter());
            notes.push(n);
        }
        let clean_corrupted = self.cx.as_ref().and_then(|c| c.clean_corrupted_if_made());
        if let Some(f) = nonfinite_rows(&run.name, &rows) {
            self.record.found(f, &self.run_notes, &self.timings, clean_corrupted, self.toks)?;
        }
        let (path, note) = write_run(&self.spec.output_dir, self.opts.shard, run, &rows, &notes, &mine)?;
        self.files.push(path);
        self.run_notes.insert(run.name.clone(), note);
        if !rows.is_empty() {
            self.summary.push_str(&top_rows(&run.name, &rows));
        }
        Ok(Done { rows: Some(rows.len()), seconds: None })
    }

    /// Whether this shard owns job `id` (every job when the run is not sharded).
    fn owned(&self, id: usize) -> bool {
        owns(self.shards.as_deref(), self.opts.shard, id)
    }

    /// The job's manifest entry; after a run's write and at the end, the manifest itself.
    fn record_job(&mut self, job: &Job, done: Done, wall_seconds: f64) -> Result<()> {
        let seconds = done.seconds.unwrap_or(wall_seconds);
        if self.status[job.id] == JobStatus::Ran && (job.task.is_work() || self.needed[job.id]) {
            self.timings.insert(job.name.clone(), seconds);
        }
        let stored_rows = self.results.get(&job.id).map(|(r, _)| r.len());
        self.records.push(JobRecord {
            id: job.id,
            name: job.name.clone(),
            key: job.key.clone(),
            status: self.status[job.id],
            shard: self.shards.as_ref().and_then(|a| a[job.id]),
            rows: done.rows.or(stored_rows),
            seconds,
        });
        if job.task == Task::Manifest {
            // The manifest says complete only once every job is in the store.
            if let Some(w) = self.writer.take() {
                w.finish()?;
            }
        }
        if matches!(job.task, Task::Write { .. } | Task::Manifest) {
            self.record.jobs = self.records.clone();
            self.record.complete = job.task == Task::Manifest;
            let clean_corrupted = self.cx.as_ref().and_then(|c| c.clean_corrupted_if_made());
            self.record.write(&self.run_notes, &self.timings, clean_corrupted, self.toks)?;
        }
        Ok(())
    }

    /// What the run produced, once every job is done.
    fn outcome(self) -> Outcome {
        self.overall.finish_and_clear();
        let count =
            |s: JobStatus| self.records.iter().filter(|r| r.status == s && self.plan.jobs[r.id].task.is_work()).count();
        let jobs = format!(
            "jobs: {} ran, {} read from the store{}",
            count(JobStatus::Ran),
            count(JobStatus::Stored),
            self.opts
                .shard
                .map(|s| {
                    format!(
                        ", {} in other shards (this is shard {} of {})",
                        count(JobStatus::OtherShard),
                        s.index,
                        s.count
                    )
                })
                .unwrap_or_default()
        );
        Outcome { files: self.files, manifest: self.record.path.clone(), summary: self.summary, jobs }
    }
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
    write_side_tables(out_dir, &path, &run.name, &mut note)?;
    note["rows"] = rows.len().into();
    note["jobs"] = jobs.into();
    Ok((path, note))
}

/// Writes a run's side tables (a note's `"tables": {name: [row objects]}`, e.g. edge
/// attribution's circuits) as `<run>-<name>.parquet` beside its file (`<name>.parquet` beside a
/// shard's part), and leaves their file names in the note in place of the rows.
pub(crate) fn write_side_tables(
    out_dir: &std::path::Path,
    run_file: &std::path::Path,
    run: &str,
    note: &mut serde_json::Value,
) -> Result<()> {
    let Some(tables) = note.get("tables").and_then(serde_json::Value::as_object).cloned() else { return Ok(()) };
    let dir = run_file.parent().unwrap_or(out_dir);
    let part = run_file.file_stem().is_some_and(|s| s != run);
    let mut files = serde_json::Map::new();
    for (name, rows) in tables {
        let rows = rows.as_array().cloned().unwrap_or_default();
        let path = if part {
            atomic::file_in(dir, &name, ".parquet")?
        } else {
            atomic::file_in(dir, &format!("{run}-{name}"), ".parquet")?
        };
        crate::output::json_table::write(&path, &rows)?;
        files.insert(name, path.strip_prefix(out_dir).unwrap_or(&path).display().to_string().into());
    }
    note["tables"] = files.into();
    Ok(())
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
