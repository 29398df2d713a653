//! Compiling a spec into its job graph (tokens, plan, keys) and executing it: the entry points
//! `plan`, `run` and the regression gate call. The execution itself is graph::executor's.
use std::path::PathBuf;
use std::time::Instant;

use tch::Device;

use crate::error::{Error, Result};
use crate::graph::shard::Shard;
pub use crate::graph::source::ModelSource;
use crate::graph::{keys, Plan};
use crate::kinds::shared::inputs::{first_changed, tokenize, Tokenized};
use crate::kinds::Spec;
use crate::model::config::ModelConfig;
use crate::model::source::ModelFiles;
use crate::model::tokenize::TextTokenizer;
use crate::model::Model;

/// What a run wrote.
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
    /// Progress as log lines on stderr instead (stderr is not a terminal: a Slurm or CI log).
    pub progress_lines: bool,
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
    let roles: Vec<Vec<i64>> = toks.as_ref().map_or(Vec::new(), |t| t.roles.iter().map(|(_, at)| at.clone()).collect());
    let mut plan = Plan::build(spec, cfg, seq, first_diff, &roles);
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

pub use crate::graph::executor::execute_compiled;
