//! The command line as clap parses it: commands, their options and help texts.
use std::path::PathBuf;

use clap::{Args as ClapArgs, Parser, Subcommand};

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
    /// Print every hook point of a model with its shape (the checkpoint is checked against its
    /// config; weights are not read or processed).
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
    /// Show how texts tokenize for a model (position, id and token, as TransformerLens's
    /// to_tokens gives them) and how answers tokenize (a metric needs single-token answers).
    Tokenize {
        /// Hub id, local directory or .gguf file.
        model: String,
        /// Texts to tokenize.
        #[arg(required_unless_present = "spec")]
        texts: Vec<String>,
        /// Also the first prompts of this spec (templates: with the role each token holds).
        #[arg(long)]
        spec: Option<std::path::PathBuf>,
        /// How many of the spec's prompts to show.
        #[arg(long, default_value_t = 4)]
        first: usize,
        /// An answer to check (repeat for several), tokenized as the metric does (no BOS).
        #[arg(long = "answer")]
        answers: Vec<String>,
        /// Hub revision (branch, tag or commit).
        #[arg(long)]
        revision: Option<String>,
        /// Do not prepend BOS; the default is what TransformerLens's to_tokens does for the family.
        #[arg(long, conflicts_with = "prepend_bos")]
        no_prepend_bos: bool,
        /// Prepend BOS even where the family's default is not to.
        #[arg(long)]
        prepend_bos: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run an experiment spec (also: `tl-run SPEC.toml`). Finished jobs are kept under
    /// `<output.dir>/.tl-run/`: a rerun (after a kill or a changed spec) redoes only the jobs
    /// whose results are not stored.
    Run {
        #[command(flatten)]
        spec: SpecArgs,
        /// No progress bars.
        #[arg(long)]
        quiet: bool,
        /// Ignore stored job results and run every job (new results are still stored).
        #[arg(long)]
        fresh: bool,
        /// Run only shard i of n (0-based, e.g. 2/8): a cost-balanced share of the jobs, written
        /// as `<dir>/<run>/shard=<i>-of-<n>/part-0.parquet`; `tl-run merge DIR` joins the parts.
        /// Inside a Slurm array task the default is SLURM_ARRAY_TASK_ID of SLURM_ARRAY_TASK_COUNT.
        #[arg(long)]
        shard: Option<String>,
        /// Write `<output dir>/report.html` and `figures/` after the run (as `[output] report = true`).
        #[arg(long)]
        report: bool,
    },
    /// Print the job graph of a spec without running it: exactly the jobs `run` executes.
    Plan {
        #[command(flatten)]
        spec: SpecArgs,
        /// Print the jobs as JSON (id, name, task, deps, cost, key).
        #[arg(long)]
        json: bool,
        /// Also show how the jobs split over this many shards (and each shard's cost).
        #[arg(long)]
        shards: Option<usize>,
        /// Estimate the run's time from one timed forward of the prompts (loads the weights;
        /// without it the estimate uses the output directory's last run, if any).
        #[arg(long, conflicts_with = "json")]
        estimate: bool,
    },
    /// Fetch into the hub cache every file runs of these models need (config, tokenizer,
    /// weights) and print each resolved commit, so that `HF_HUB_OFFLINE=1 tl-run ...` works on a
    /// node without internet (download on the login node, run on the compute nodes).
    Download {
        /// Hub ids (org/name).
        models: Vec<String>,
        /// Branch, tag or commit for the ids given here (default main).
        #[arg(long)]
        revision: Option<String>,
        /// Also every model this spec runs (model.id, model.revision).
        #[arg(long)]
        spec: Vec<PathBuf>,
        /// Also every hub model of this zoo file.
        #[arg(long)]
        zoo: Vec<PathBuf>,
    },
    /// Draw a results directory: one self-contained HTML page (inline SVG, no script, opens
    /// offline) and one SVG per figure under figures/ beside it.
    Report {
        /// The output directory of a finished run (the spec's output.dir).
        dir: PathBuf,
        /// Write the page here instead of <DIR>/report.html.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Also write a PNG (2x) beside every SVG under figures/.
        #[arg(long)]
        png: bool,
        /// Leave out the attention patterns of the top heads (drawing them loads the run's model).
        #[arg(long)]
        no_patterns: bool,
        /// One colour scale for all heatmaps of a run (as `[output] shared_scale = true`).
        #[arg(long)]
        shared_scale: bool,
    },
    /// Join the shard parts of a sharded run into one Parquet file per run and one manifest.
    Merge {
        /// The output directory the shards wrote into.
        dir: PathBuf,
        /// Keep the shard parts and manifests after merging (they are removed by default).
        #[arg(long)]
        keep_shards: bool,
    },
    /// Write an sbatch script running a spec as a Slurm array, one shard per task (and submit
    /// it, with a dependent job that merges the shards, with --submit).
    Slurm {
        #[command(flatten)]
        spec: SpecArgs,
        /// Array tasks (shards).
        #[arg(long)]
        tasks: usize,
        /// GPUs per task (--gpus-per-task); omit for CPU-only tasks.
        #[arg(long)]
        gpus_per_task: Option<usize>,
        /// CPUs per task.
        #[arg(long)]
        cpus_per_task: Option<usize>,
        /// Slurm partition.
        #[arg(long)]
        partition: Option<String>,
        /// Time limit per task (Slurm format, e.g. 04:00:00).
        #[arg(long)]
        time: Option<String>,
        /// Submit the array with sbatch, and a merge job that runs after it succeeds.
        #[arg(long)]
        submit: bool,
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
    #[arg(long, conflicts_with = "devices")]
    pub device: Option<String>,
    /// Run on these devices (comma-separated, e.g. cuda:0,cuda:1): one model replica each,
    /// independent jobs concurrently; instead of the spec's model.device(s).
    #[arg(long, value_delimiter = ',')]
    pub devices: Vec<String>,
    /// With --devices (or the spec's model.devices): split one model by layers over them
    /// (layers 0..k on the first, ...; e.g. cuda:0,cpu offloads the last layers) instead of a
    /// replica on each.
    #[arg(long)]
    pub split_layers: bool,
    /// Run in this dtype instead of the spec's model.dtype (float32, bfloat16, float16).
    #[arg(long)]
    pub dtype: Option<String>,
    /// How attention's z is computed where no hook reads its steps, instead of the spec's
    /// model.attention: fused (libtorch's kernel, the default) or explicit (TransformerLens's
    /// steps in every forward).
    #[arg(long)]
    pub attention: Option<String>,
    /// Working memory one batch of patched forwards may use (e.g. 512MiB, 8GiB); default: half
    /// the free memory of a CUDA device, 256MiB on CPU. A batch that runs out of memory is
    /// halved and retried either way.
    #[arg(long, value_parser = parse_size)]
    pub batch_memory: Option<u64>,
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
    /// Split the model by layers over these devices (comma-separated, e.g. cuda:0,cpu) instead
    /// of --device.
    #[arg(long, value_delimiter = ',')]
    pub split: Vec<String>,
}

/// A size in bytes: a number with an optional K/M/G/T suffix (KiB, MB, ... all mean powers of 1024).
fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let x: f64 = num.parse().map_err(|_| format!("{s:?} is not a size; write e.g. 512MiB or 8GiB"))?;
    let scale = match unit.trim().to_ascii_lowercase().trim_end_matches('b').trim_end_matches('i') {
        "" => 1u64,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        _ => return Err(format!("{s:?}: unknown unit {unit:?}; use K, M, G or T (e.g. 512MiB)")),
    };
    let bytes = (x * scale as f64) as u64;
    if bytes < 1 << 20 {
        return Err(format!("{s:?} is less than 1MiB"));
    }
    Ok(bytes)
}
