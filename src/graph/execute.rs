//! Executes a spec's job graph: tokenizing, then every job in order. Work jobs are stored as they
//! finish and read back on a rerun; shared passes run only for jobs that run; each run's Parquet
//! is written as soon as its jobs are done and the manifest after every run, so a failure (or a
//! kill) later on leaves the finished outputs, the stored jobs and a manifest that describes them.
use std::cell::OnceCell;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use crate::engine::metric::Metric;
use crate::engine::nonfinite;
use crate::engine::tokenize::{TextTokenizer, TokenBatch};
use crate::error::{Error, Result};
use crate::experiments::attribution;
use crate::experiments::prepared::{Corrupt, Prepared};
use crate::graph::shard::{self, Shard};
use crate::graph::store::Store;
use crate::graph::{devices, keys, kinds, Plan, Task};
use crate::model::config::ModelConfig;
use crate::model::source::ModelFiles;
use crate::model::hook_point::Site;
use crate::model::Model;
use crate::output::atomic;
use crate::output::table::{write_parquet, Row};
use crate::spec::{Corruption, RunKind, Spec};

pub struct Outcome {
    pub files: Vec<PathBuf>,
    pub manifest: PathBuf,
    pub summary: String,
    /// How many jobs ran and how many came from the store.
    pub jobs: String,
}

/// Clean and corrupted token batches with the answers, checked.
pub struct Tokenized {
    pub clean: Tensor,
    /// None for noise corruption (the corrupted run reads the clean tokens).
    pub corrupted: Option<Tensor>,
    pub mask: Option<Tensor>,
    pub correct: Vec<i64>,
    pub incorrect: Vec<i64>,
    /// The clean prompts' tokens as strings, for the `token` column.
    pub clean_strs: Vec<Vec<String>>,
    /// Noise corruption: [n, pos] true at the token positions to noise.
    pub noised: Option<Tensor>,
    /// What the manifest records: prepend_bos as applied and every prompt's token ids.
    pub record: serde_json::Value,
}

impl Tokenized {
    pub fn n_prompts(&self) -> usize {
        self.clean_strs.len()
    }

    /// A copy with tensors of its own (tensors are not shared between threads).
    pub fn duplicate(&self) -> Tokenized {
        Tokenized {
            clean: self.clean.copy(),
            corrupted: self.corrupted.as_ref().map(Tensor::copy),
            mask: self.mask.as_ref().map(Tensor::copy),
            correct: self.correct.clone(),
            incorrect: self.incorrect.clone(),
            clean_strs: self.clean_strs.clone(),
            noised: self.noised.as_ref().map(Tensor::copy),
            record: self.record.clone(),
        }
    }
}

fn single_token(tok: &TextTokenizer, word: &str, prompt: usize, which: &str) -> Result<i64> {
    let ids = tok.encode(word, false)?;
    if ids.len() != 1 {
        let shown: Vec<String> = ids.iter().map(|&i| format!("{:?}", tok.token_str(i))).collect();
        return Err(Error::Other(format!(
            "prompt {prompt}: the {which} answer {word:?} is {} tokens [{}], not one; use a single-token answer (often with a leading space)",
            ids.len(),
            shown.join(", ")
        )));
    }
    Ok(ids[0])
}

/// Positions of `word`'s tokens in `ids` (with or without a leading space), if present.
fn find_word(tok: &TextTokenizer, ids: &[i64], word: &str) -> Result<Option<std::ops::Range<usize>>> {
    for form in [format!(" {word}"), word.to_string()] {
        let w = tok.encode(&form, false)?;
        if w.is_empty() {
            continue;
        }
        if let Some(start) = ids.windows(w.len()).position(|win| win == w.as_slice()) {
            return Ok(Some(start..start + w.len()));
        }
    }
    Ok(None)
}

/// [n, seq] true at the positions a noise corruption noises (left padding accounted for).
fn noise_positions(tok: &TextTokenizer, clean: &TokenBatch, positions: &Option<Vec<i64>>, words: &Option<Vec<String>>) -> Result<Tensor> {
    let (n, seq) = (clean.tokens.size()[0], clean.tokens.size()[1]);
    let mut mask = vec![false; (n * seq) as usize];
    for p in 0..n as usize {
        let len = clean.lengths[p] as i64;
        let pad = seq - len;
        let ids: Vec<i64> = Vec::try_from(clean.tokens.get(p as i64).narrow(0, pad, len))?;
        let mut set = |i: i64| mask[p * seq as usize + (pad + i) as usize] = true;
        if let Some(pos) = positions {
            for &i in pos {
                if i >= len {
                    return Err(Error::Config(format!("corruption.positions: prompt {p} has {len} tokens, so position {i} does not exist")));
                }
                set(i);
            }
        }
        // Every word found is noised; a prompt must contain at least one of them.
        if let Some(words) = words {
            let mut found = false;
            for w in words {
                if let Some(r) = find_word(tok, &ids, w)? {
                    r.for_each(|i| set(i as i64));
                    found = true;
                }
            }
            if !found {
                let shown = ids.iter().map(|&i| format!("{:?}", tok.token_str(i))).collect::<Vec<_>>().join(", ");
                return Err(Error::Config(format!("corruption.words: prompt {p} has no tokens spelling any of {words:?}: [{shown}]")));
            }
        }
    }
    Ok(Tensor::from_slice(&mask).view([n, seq]))
}

pub fn tokenize(spec: &Spec, tok: &TextTokenizer, cfg: &crate::model::config::ModelConfig, needs_corruption: bool) -> Result<Tokenized> {
    let needs_answers = spec.runs.iter().any(|r| r.kind.needs_answers());
    let bos = spec.model.prepend_bos_for(cfg);
    let clean_texts: Vec<&str> = spec.prompts.iter().map(|p| p.clean.as_str()).collect();
    let clean = tok.batch(&clean_texts, bos)?;
    let mut noised = None;
    let corrupted = match &spec.corruption {
        _ if !needs_corruption => None,
        Corruption::SwapPairs => {
            let n = clean_texts.len() as i64;
            let swapped: Vec<i64> = (0..n).map(|i| i ^ 1).collect();
            let idx = Tensor::from_slice(&swapped);
            Some(TokenBatch {
                tokens: clean.tokens.index_select(0, &idx),
                mask: clean.mask.as_ref().map(|m| m.index_select(0, &idx)),
                lengths: swapped.iter().map(|&i| clean.lengths[i as usize]).collect(),
            })
        }
        Corruption::Prompts | Corruption::ReplaceTokens(_) => {
            let texts: Vec<&str> = spec.prompts.iter().map(|p| p.corrupted.as_deref().unwrap_or(&p.clean)).collect();
            Some(tok.batch(&texts, bos)?)
        }
        Corruption::Noise { positions, words, .. } => {
            noised = Some(noise_positions(tok, &clean, positions, words)?);
            None
        }
    };
    if let Some(corrupted) = &corrupted {
        for (i, (a, b)) in clean.lengths.iter().zip(&corrupted.lengths).enumerate() {
            if a != b || clean.tokens.size() != corrupted.tokens.size() {
                return Err(Error::Other(format!(
                    "prompt {i}: clean is {a} tokens and corrupted is {b}; patching by position needs equal token lengths"
                )));
            }
        }
    }
    let mut correct = Vec::new();
    let mut incorrect = Vec::new();
    let mut problems = Vec::new();
    for (i, p) in spec.prompts.iter().enumerate().filter(|_| needs_answers) {
        match single_token(tok, &p.correct, i, "correct") {
            Ok(id) => correct.push(id),
            Err(e) => problems.push(e.to_string()),
        }
        if let Some(w) = &p.incorrect {
            match single_token(tok, w, i, "incorrect") {
                Ok(id) => incorrect.push(id),
                Err(e) => problems.push(e.to_string()),
            }
        }
    }
    // Every answer that is not one token, not just the first.
    if !problems.is_empty() {
        return Err(Error::Other(problems.join("\n")));
    }
    // A tokenizer larger than the model's embedding gives ids the model has no row for.
    let in_vocab = |id: i64, what: String| {
        crate::engine::tokenize::check_in_vocab(tok, id, cfg.d_vocab).map_err(|e| Error::Config(format!("{what}: {e}")))
    };
    for (i, (&c, w)) in correct.iter().zip(incorrect.iter().map(Some).chain(std::iter::repeat(None))).enumerate() {
        in_vocab(c, format!("prompt {i}: the correct answer"))?;
        if let Some(&w) = w {
            in_vocab(w, format!("prompt {i}: the incorrect answer"))?;
        }
    }
    for (which, b) in [("clean", Some(&clean)), ("corrupted", corrupted.as_ref())] {
        if let Some(b) = b {
            if let Some(max) = Vec::<i64>::try_from(b.tokens.flatten(0, -1)).unwrap_or_default().into_iter().max() {
                in_vocab(max, format!("the {which} prompts"))?;
            }
        }
    }
    let clean_strs = (0..clean_texts.len() as i64)
        .map(|i| Vec::<i64>::try_from(clean.tokens.get(i)).unwrap_or_default().into_iter().map(|t| tok.token_str(t)).collect())
        .collect();
    let unpadded = |b: &TokenBatch| -> Vec<Vec<i64>> {
        b.lengths.iter().enumerate().map(|(i, &len)| Vec::<i64>::try_from(b.tokens.get(i as i64).narrow(0, b.tokens.size()[1] - len as i64, len as i64)).unwrap_or_default()).collect()
    };
    let record = serde_json::json!({
        "prepend_bos": bos,
        "clean": unpadded(&clean),
        "corrupted": corrupted.as_ref().map(unpadded),
    });
    Ok(Tokenized { clean: clean.tokens, corrupted: corrupted.map(|c| c.tokens), mask: clean.mask, correct, incorrect, clean_strs, noised, record })
}

/// The first position at which the corrupted run differs from the clean one (seq_len if none).
pub fn first_changed(toks: &Tokenized) -> i64 {
    let seq = toks.clean.size()[1];
    match (&toks.corrupted, &toks.noised) {
        (Some(c), _) => crate::experiments::prepared::first_difference(&toks.clean, c),
        (None, Some(noised)) => {
            let any: Vec<bool> = Vec::try_from(noised.any_dims(&[0i64][..], false)).unwrap_or_default();
            any.iter().position(|b| *b).map_or(seq, |p| p as i64)
        }
        _ => seq,
    }
}

/// The corrupted runs' noise, [samples·n, seq, d_model]: torch's CPU generator seeded with
/// `seed` (torch.manual_seed(seed); torch.randn(samples, n, seq, d_model)), times `scale` × the
/// std of W_E, zero outside the noised positions.
pub fn embedding_noise(model: &Model, noised: &Tensor, scale: f64, samples: usize, seed: u64) -> Tensor {
    let (n, seq) = (noised.size()[0], noised.size()[1]);
    let d = model.cfg.d_model as i64;
    tch::manual_seed(seed as i64);
    let raw = Tensor::randn([samples as i64, n, seq, d], (Kind::Float, Device::Cpu));
    // The std of the unscaled embedding matrix, as TransformerLens 4.3's W_E.std() (Gemma's
    // sqrt(d_model) is folded into our W_E).
    let std = model.weights.w_e.to_device(Device::Cpu).to_kind(Kind::Float).std(true) / model.cfg.embed_scale;
    let noise = raw * (std * scale) * noised.to_kind(Kind::Float).view([1, n, seq, 1]);
    noise.view([samples as i64 * n, seq, d])
}

/// The clean and corrupted runs every patching run of the spec shares.
pub(crate) fn prepare(spec: &Spec, model: &Model, toks: &Tokenized) -> Result<Prepared> {
    let mut sites: Vec<Site> = Vec::new();
    for r in &spec.runs {
        let needed: Vec<Site> = match &r.kind {
            RunKind::ActivationPatching { targets } => targets.iter().map(|(s, _)| *s).collect(),
            RunKind::AttributionPatching { targets, options, .. } => {
                let t: Vec<_> = targets.iter().map(|(s, a)| crate::experiments::activation_patching::Target { site: *s, axes: *a }).collect();
                attribution::clean_sites(model, &t, *options)
            }
            _ => vec![],
        };
        for s in needed {
            if !sites.contains(&s) {
                sites.push(s);
            }
        }
    }
    let samples = spec.corruption.samples() as i64;
    let tile = |t: &Tensor| t.repeat([samples, 1]);
    let metric = Metric {
        kind: spec.metric.kind,
        correct: toks.correct.repeat(samples as usize),
        incorrect: toks.incorrect.repeat(samples as usize),
    };
    let (clean, corrupt) = match (&spec.corruption, &toks.corrupted, &toks.noised) {
        (Corruption::Noise { noise, samples, seed, .. }, _, Some(noised)) => {
            let noise_t = embedding_noise(model, noised, *noise, *samples, *seed);
            (tile(&toks.clean), Corrupt::EmbedNoise { noise: noise_t, first: first_changed(toks) })
        }
        (_, Some(c), _) => (toks.clean.shallow_clone(), Corrupt::Tokens(c.shallow_clone())),
        _ => return Err(Error::Other("patching needs a corruption".into())),
    };
    Prepared::new(model, clean, corrupt, toks.mask.as_ref().map(&tile), metric, &sites)
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
    let shards = opts.shard.map(|s| shard::assign(&plan, s.count));
    let owned = |id: usize| match (&shards, opts.shard) {
        (Some(a), Some(s)) => a[id] == Some(s.index),
        _ => true,
    };
    // Stored results of this shard's work jobs.
    let mut results: HashMap<usize, (Vec<Row>, serde_json::Value)> = HashMap::new();
    let mut status: Vec<&'static str> = vec!["ran"; plan.jobs.len()];
    for j in plan.work() {
        if !owned(j.id) {
            status[j.id] = "other shard";
        } else if let (Some(store), false, Some(key)) = (&store, opts.fresh, &j.key) {
            if let Some(s) = store.get(key) {
                let run_name = &spec.runs[j.task.run().expect("work jobs have a run")].name;
                let rows = s.rows.into_iter().map(|r| Row { run: run_name.clone(), ..r }).collect();
                results.insert(j.id, (rows, s.note));
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
    let mut cx: Option<kinds::RunContext> = None;
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
                    ModelSource::Lazy { load, device, .. } => {
                        let _ = model_cell.set(load(*device)?);
                        model_cell.get().expect("set above")
                    }
                };
                record.loaded(model);
                if let Some(f) = nonfinite::first_in_weights(model) {
                    record.found(f, &run_notes, &timings, None, toks.as_ref())?;
                }
                cx = Some(kinds::RunContext::new(spec, model, toks.as_ref(), multi.clone()));
            }
            task if task.is_shared() && needed[job.id] => {
                let c = cx.as_ref().expect("the model loads before any shared pass");
                overall.set_message(job.name.clone());
                c.force(task).map_err(|e| Error::Other(format!("{}: {e}", job.name)))?;
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
                        (rows, note)
                    }
                    None => {
                        let c = cx.as_ref().expect("the model loads before any work job");
                        let (rows, note) = crate::panics::guarded(&prompts_of(toks.as_ref()), || {
                            crate::panics::injected(&job.name);
                            kinds::run_job(c, task)
                        })
                        .map_err(named)?;
                        if let (Some(store), Some(key)) = (&store, &job.key) {
                            store.put(key, &rows, &note)?;
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
                let mut rows: Vec<Row> = Vec::new();
                let mut notes: Vec<&serde_json::Value> = Vec::new();
                for d in &mine {
                    let (r, n) = results.get(d).expect("every owned work job ran or was stored");
                    rows.extend(r.iter().cloned());
                    notes.push(n);
                }
                let bad: Vec<&Row> = rows.iter().filter(|r| !r.value.is_finite() || r.patched.is_some_and(|p| !p.is_finite())).collect();
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
                let mut note = match &run.kind {
                    RunKind::ActivationPatching { .. } => kinds::activation_patching_note(&notes, toks.as_ref().map(first_changed)),
                    _ => notes.first().map(|n| (*n).clone()).unwrap_or(serde_json::Value::Null),
                };
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

/// The prompts a job computes on, for a failure's message (jobs batch every prompt).
pub(crate) fn prompts_of(toks: Option<&Tokenized>) -> String {
    match toks.map(Tokenized::n_prompts) {
        Some(0) | None => "no prompts".into(),
        Some(1) => "prompt 0".into(),
        Some(n) => format!("prompts 0-{} (one batch)", n - 1),
    }
}

/// A NaN baseline: the first hook of the clean (or corrupted) run it comes from.
pub(crate) fn baseline_finding(cx: &kinds::RunContext) -> Result<Option<nonfinite::Finding>> {
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
fn top_rows(run: &str, rows: &[Row]) -> String {
    let mut means: Vec<&Row> = rows.iter().filter(|r| r.prompt.is_none() && r.rank.is_none()).collect();
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
