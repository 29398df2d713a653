//! Command-line arguments and one function per command.
use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args as ClapArgs, Parser, Subcommand};
use tl_run::model::config::Processing;
use tl_run::spec::Spec;
use tl_run::{Hooks, Input, LoadOptions, Model, Stop};

#[derive(Parser, Debug)]
#[command(name = "tl-run", version, about = "Mechanistic-interpretability experiments, equal to TransformerLens")]
pub struct Args {
    /// More logging (-v info, -vv debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print every hook point of a model with its shape.
    Hooks {
        #[command(flatten)]
        model: ModelArgs,
        /// Sequence length used for the shapes.
        #[arg(long, default_value_t = 16)]
        seq: i64,
        /// Batch size used for the shapes.
        #[arg(long, default_value_t = 1)]
        batch: i64,
    },
    /// Run prompts and write the activations of the named hooks (default: all) to safetensors.
    Cache {
        #[command(flatten)]
        model: ModelArgs,
        /// A prompt (repeat for a batch; unequal lengths are left-padded).
        #[arg(long = "prompt", required = true)]
        prompts: Vec<String>,
        /// Comma-separated TransformerLens hook names.
        #[arg(long, value_delimiter = ',')]
        hooks: Vec<String>,
        /// Output .safetensors file.
        #[arg(long)]
        out: PathBuf,
        /// Do not prepend BOS (TransformerLens prepend_bos=False); the default is what
        /// TransformerLens's to_tokens does for the model's family.
        #[arg(long, conflicts_with = "prepend_bos")]
        no_prepend_bos: bool,
        /// Prepend BOS even where the family's default is not to (TransformerLens prepend_bos=True).
        #[arg(long)]
        prepend_bos: bool,
    },
    /// Run an experiment spec (also: `tl-run SPEC.toml`).
    Run {
        #[command(flatten)]
        spec: SpecArgs,
        /// No progress bars.
        #[arg(long)]
        quiet: bool,
    },
    /// Print the job graph of a spec without running it.
    Plan {
        #[command(flatten)]
        spec: SpecArgs,
    },
    /// Check a spec and the model's config and tokenizer, without loading weights.
    Validate {
        #[command(flatten)]
        spec: SpecArgs,
    },
    /// Regression gate: every model of a zoo file against its stored logits reference and its
    /// experiment goldens; exit code 0 only when every figure passes.
    Check {
        /// The zoo file (TOML).
        zoo: PathBuf,
        /// Rewrite the references and goldens (`--update=goldens` or `--update=references`: only
        /// those) from this run, after a reviewed change, and print what moved by how much.
        #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "all", value_parser = ["all", "goldens", "references"])]
        update: Option<String>,
        /// Only this model (by name; repeat for several).
        #[arg(long)]
        only: Vec<String>,
        /// Only this dtype (float32, bfloat16, float16), also one the zoo does not list.
        #[arg(long)]
        dtype: Option<String>,
        /// Also write the results as JUnit XML here.
        #[arg(long)]
        junit: Option<PathBuf>,
        /// Where check.parquet and the specs' outputs of this run go.
        #[arg(long, default_value = "results/check")]
        out: PathBuf,
        /// No progress bars.
        #[arg(long)]
        quiet: bool,
    },
}

#[derive(ClapArgs, Debug)]
pub struct SpecArgs {
    /// The experiment spec (TOML).
    pub spec: PathBuf,
    /// Use this model (hub id or directory) instead of the spec's model.id.
    #[arg(long)]
    pub model_id: Option<String>,
    /// Write results here instead of the spec's output.dir.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Run on this device instead of the spec's model.device (cpu, cuda, cuda:N).
    #[arg(long)]
    pub device: Option<String>,
    /// Run in this dtype instead of the spec's model.dtype (float32, bfloat16, float16).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Use this prompt file (JSONL or prompt-pair JSON) instead of the spec's [prompts]: the
    /// same experiment on a model whose tokenizer needs other prompts.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
}

#[derive(ClapArgs, Debug)]
pub struct ModelArgs {
    /// Hub id (e.g. gpt2) or local directory.
    pub model: String,
    /// Hub revision (branch, tag or commit).
    #[arg(long)]
    pub revision: Option<String>,
    /// Load without TransformerLens weight processing (HF numerics).
    #[arg(long)]
    pub no_processing: bool,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// float32, bfloat16 or float16 (weights are processed in f32, then cast).
    #[arg(long, default_value = "float32")]
    pub dtype: String,
}

pub fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("TL_RUN_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

fn parse_device(s: &str) -> Result<tch::Device> {
    Ok(tl_run::engine::device::parse(s)?)
}

fn load(m: &ModelArgs) -> Result<Model> {
    let opts = LoadOptions {
        revision: m.revision.clone(),
        processing: if m.no_processing { Processing::NONE } else { Processing::TRANSFORMER_LENS },
        device: parse_device(&m.device)?,
        kind: tl_run::model::config::parse_dtype(&m.dtype).with_context(|| format!("unknown dtype '{}' (valid: {})", m.dtype, tl_run::model::config::DTYPES))?,
    };
    Ok(Model::load(&m.model, &opts)?)
}

pub fn dispatch(args: Args) -> Result<()> {
    match args.command {
        Command::Hooks { model, seq, batch } => hooks(&model, batch, seq),
        Command::Cache { model, prompts, hooks, out, no_prepend_bos, prepend_bos } => {
            let bos = match (prepend_bos, no_prepend_bos) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            };
            cache(&model, &prompts, &hooks, &out, bos)
        }
        Command::Run { spec, quiet } => run(&spec, !quiet),
        Command::Plan { spec } => plan(&spec, true),
        Command::Validate { spec } => plan(&spec, false),
        Command::Check { zoo, update, only, dtype, junit, out, quiet } => {
            use tl_run::check::Update;
            let update = match update.as_deref() {
                None => Update::No,
                Some("goldens") => Update::Goldens,
                Some("references") => Update::References,
                Some(_) => Update::All,
            };
            let opts = tl_run::check::CheckOptions { update, only, dtype, out, progress: !quiet && std::io::IsTerminal::is_terminal(&std::io::stderr()) };
            check(&zoo, &opts, junit.as_deref())
        }
    }
}

/// Reads and resolves a spec with the command-line overrides applied.
fn read_spec(a: &SpecArgs) -> Result<Spec> {
    let mut spec = tl_run::spec::resolve_file(&a.spec)?;
    if let Some(id) = &a.model_id {
        spec.model.id = id.clone();
    } else {
        // A local model path in a spec is relative to the spec file.
        let id = &spec.model.id;
        if id.starts_with("./") || id.starts_with("../") {
            let base = a.spec.parent().unwrap_or(std::path::Path::new("."));
            spec.model.id = base.join(id).display().to_string();
        }
    }
    if let Some(out) = &a.out {
        spec.output_dir = out.clone();
    }
    if let Some(d) = &a.device {
        spec.model.device = d.clone();
    }
    if let Some(d) = &a.dtype {
        spec.model.dtype = d.clone();
    }
    if let Some(p) = &a.prompts {
        spec.prompts = tl_run::spec::prompts::read(p).map_err(|e| anyhow::anyhow!("--prompts {}: {e}", p.display()))?;
        spec.apply_corruption_to_prompts().map_err(|e| anyhow::anyhow!("--prompts {}: {e}", p.display()))?;
    }
    Ok(spec)
}

/// What the config and tokenizer tell about a spec, before any weights are loaded: every
/// problem at once, or the prompts' length and first changed position.
fn preflight(spec: &Spec) -> Result<(tl_run::model::config::ModelConfig, usize, i64)> {
    let (cfg, tok) = tl_run::model::describe(&spec.model.id, spec.model.revision.as_deref())?;
    let mut problems: Vec<String> = spec.runs.iter().filter_map(|r| r.check_model(&cfg, &spec.file).err()).collect();
    let mut shape = (0, 0);
    if spec.runs.iter().any(|r| r.kind.needs_prompts()) {
        // The clean prompts' length, even when answers or corruption have problems of their own.
        let texts: Vec<&str> = spec.prompts.iter().map(|p| p.clean.as_str()).collect();
        if let Ok(b) = tok.batch(&texts, spec.model.prepend_bos_for(&cfg)) {
            let seq = b.tokens.size()[1] as usize;
            if seq > cfg.n_ctx {
                problems.push(format!("{}: the longest prompt is {seq} tokens, more than the model's context of {}", spec.file, cfg.n_ctx));
            }
            problems.extend(spec.runs.iter().filter_map(|r| r.check_positions(seq, &spec.file).err()));
        }
        match tl_run::graph::execute::tokenize(spec, &tok, &cfg, spec.runs.iter().any(|r| r.kind.needs_corruption())) {
            Ok(toks) => shape = (toks.clean.size()[1] as usize, tl_run::graph::execute::first_changed(&toks)),
            Err(e) => problems.push(format!("{}: {e}", spec.file)),
        }
    }
    let lines: Vec<String> = problems.iter().flat_map(|p| p.lines().map(str::to_string)).collect();
    let n = lines.len();
    anyhow::ensure!(n == 0, "{n} problem{} with model {}:\n  {}", if n == 1 { "" } else { "s" }, spec.model.id, lines.join("\n  "));
    Ok((cfg, shape.0, shape.1))
}

fn plan(a: &SpecArgs, print: bool) -> Result<()> {
    let spec = read_spec(a)?;
    let (cfg, seq, first_diff) = preflight(&spec)?;
    if print {
        print!("{}", tl_run::graph::Plan::build(&spec, &cfg, seq, first_diff).render());
    } else {
        println!(
            "{}: ok ({} prompts of {seq} tokens, {} runs; model {} has {} layers, {} heads)",
            a.spec.display(), spec.prompts.len(), spec.runs.len(), spec.model.id, cfg.n_layers, cfg.n_heads
        );
    }
    Ok(())
}

fn run(a: &SpecArgs, progress: bool) -> Result<()> {
    let spec = read_spec(a)?;
    tl_run::output::atomic::check_writable_dir(&spec.output_dir)?;
    preflight(&spec)?;
    let opts = LoadOptions {
        revision: spec.model.revision.clone(),
        processing: spec.model.processing,
        device: parse_device(&spec.model.device)?,
        kind: spec.model.kind()?,
    };
    let model = Model::load(&spec.model.id, &opts)?;
    let outcome = tl_run::graph::execute::run_spec(&spec, &model, progress && std::io::IsTerminal::is_terminal(&std::io::stderr()))?;
    for f in &outcome.files {
        println!("wrote {}", f.display());
    }
    println!("wrote {}", outcome.manifest.display());
    print!("{}", outcome.summary);
    Ok(())
}

fn hooks(m: &ModelArgs, batch: i64, seq: i64) -> Result<()> {
    let model = load(m)?;
    let mut out = String::new();
    for p in model.hook_points() {
        out.push_str(&format!("{:<36} {:?}\n", p.to_string(), model.hook_shape(p, batch, seq)));
    }
    print!("{out}");
    Ok(())
}

fn cache(m: &ModelArgs, prompts: &[String], names: &[String], out: &std::path::Path, prepend_bos: Option<bool>) -> Result<()> {
    let model = load(m)?;
    let points = if names.is_empty() {
        model.hook_points()
    } else {
        names.iter().map(|n| model.hook_point(n.trim())).collect::<tl_run::Result<Vec<_>>>()?
    };
    let tok = model.tokenizer()?;
    let batch = tok.batch(prompts, prepend_bos.unwrap_or(model.cfg.default_prepend_bos))?;
    if let Some(max) = Vec::<i64>::try_from(batch.tokens.flatten(0, -1))?.into_iter().max() {
        tl_run::engine::tokenize::check_in_vocab(tok, max, model.cfg.d_vocab)?;
    }
    let mut hooks = Hooks::capture(points.iter().copied());
    let _logits = model.run(Input::Tokens(&batch.tokens), batch.mask.as_ref(), &mut hooks, Stop::Logits)?;
    let tensors: Vec<(String, tch::Tensor)> = points.iter().filter_map(|p| hooks.take(*p).map(|t| (p.to_string(), t))).collect();
    let tokens: Vec<Vec<i64>> = (0..prompts.len() as i64).map(|i| Vec::<i64>::try_from(batch.tokens.get(i)).unwrap_or_default()).collect();
    let metadata = HashMap::from([
        ("prompts".to_string(), serde_json::to_string(prompts)?),
        ("tokens".to_string(), serde_json::to_string(&tokens)?),
        ("lengths".to_string(), serde_json::to_string(&batch.lengths)?),
        ("padding_side".to_string(), "left".to_string()),
        ("model".to_string(), m.model.clone()),
        ("processing".to_string(), serde_json::to_string(&model.processing)?),
    ]);
    tl_run::output::activations::write(out, &tensors, metadata)?;
    println!("wrote {} activations for {} prompt(s) to {}", tensors.len(), prompts.len(), out.display());
    Ok(())
}

fn check(zoo: &std::path::Path, opts: &tl_run::check::CheckOptions, junit: Option<&std::path::Path>) -> Result<()> {
    use tl_run::check::report;
    let zoo = tl_run::check::Zoo::read(zoo, opts.update != tl_run::check::Update::No)?;
    let outcome = tl_run::check::run(&zoo, opts)?;
    print!("{}", report::render(&outcome.rows));
    let parquet = opts.out.join("check.parquet");
    report::write_parquet(&parquet, &outcome.rows)?;
    println!("wrote {} ({:.1} s)", parquet.display(), outcome.seconds);
    if let Some(j) = junit {
        tl_run::output::atomic::write_bytes(j, report::junit(&outcome.rows, outcome.seconds).as_bytes())?;
        println!("wrote {}", j.display());
    }
    if opts.update != tl_run::check::Update::No {
        println!("\nupdated:");
        for line in &outcome.moved {
            println!("  {line}");
        }
        // After --update only a model that failed to load or run is an error.
        let errors = outcome.rows.iter().filter(|r| !r.pass && r.tolerance == "no error").count();
        anyhow::ensure!(errors == 0, "{errors} model(s) or spec(s) failed to load or run; see the table");
        return Ok(());
    }
    let failed = outcome.rows.iter().filter(|r| !r.pass).count();
    anyhow::ensure!(failed == 0, "the gate failed: {failed} of {} checks did not pass", outcome.rows.len());
    Ok(())
}
