//! One function per command, dispatched from the parsed arguments (args.rs).
mod args;
mod calibrate;
mod tokenize;

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
pub use args::{Args, Command, ModelArgs, SpecArgs};
use tl_run::kinds::Spec;
use tl_run::model::config::Processing;
use tl_run::{Hooks, Input, LoadOptions, Model, Stop};

pub fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("TL_RUN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    // Colours only on a terminal: Slurm's log files and CI logs get plain text.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(colour).try_init();
}

fn parse_device(s: &str) -> Result<tch::Device> {
    Ok(tl_run::engine::device::parse(s)?)
}

fn load(m: &ModelArgs) -> Result<Model> {
    Ok(Model::load(&m.model, &load_options(m)?)?)
}

fn load_options(m: &ModelArgs) -> Result<LoadOptions> {
    Ok(LoadOptions {
        revision: m.revision.clone(),
        processing: if m.no_processing { Processing::NONE } else { Processing::TRANSFORMER_LENS },
        device: parse_device(&m.device)?,
        kind: tl_run::model::config::parse_dtype(&m.dtype)
            .with_context(|| format!("unknown dtype '{}' (valid: {})", m.dtype, tl_run::model::config::DTYPES))?,
        split: m.split.iter().map(|d| parse_device(d)).collect::<Result<_>>()?,
        ..LoadOptions::default()
    })
}

/// `--prepend-bos` / `--no-prepend-bos` as TransformerLens's prepend_bos (None: the family's default).
fn bos_choice(prepend_bos: bool, no_prepend_bos: bool) -> Option<bool> {
    match (prepend_bos, no_prepend_bos) {
        (true, _) => Some(true),
        (_, true) => Some(false),
        _ => None,
    }
}

pub fn dispatch(args: Args) -> Result<()> {
    if std::env::var_os("TL_RUN_ATTENTION").is_some() {
        tracing::warn!("TL_RUN_ATTENTION is no longer read: give --attention explicit (or [model] attention) instead");
    }
    match args.command {
        Command::Hooks { model, seq, batch } => hooks(&model, batch, seq),
        Command::Cache { model, prompts, hooks, out, no_prepend_bos, prepend_bos } => {
            let bos = bos_choice(prepend_bos, no_prepend_bos);
            cache(&model, &prompts, &hooks, &out, bos)
        }
        Command::Tokenize { model, texts, spec, first, answers, revision, no_prepend_bos, prepend_bos, json } => {
            let bos = bos_choice(prepend_bos, no_prepend_bos);
            let from_spec = match &spec {
                Some(path) => tokenize::spec_prompts(path, first)?,
                None => Vec::new(),
            };
            tokenize::print(&model, revision.as_deref(), &texts, &from_spec, &answers, bos, json)
        }
        Command::Run { spec, quiet, fresh, shard, report } => run(&spec, !quiet, fresh, shard.as_deref(), report),
        Command::Download { models, revision, spec, zoo } => download(&models, revision.as_deref(), &spec, &zoo),
        Command::Report { dir, out, png, no_patterns, shared_scale } => {
            let t = std::time::Instant::now();
            // Without the flag, the spec's `[output] shared_scale` (in the manifest) decides.
            let opts =
                tl_run::report::Options { png, patterns: !no_patterns, shared_scale: shared_scale.then_some(true) };
            let w = tl_run::report::write(&dir, out.as_deref(), opts)?;
            println!(
                "wrote {} ({} KiB, {} figures under {}) in {:.2} s",
                w.page.display(),
                w.bytes / 1024,
                w.figures.len(),
                w.page.with_file_name("figures").display(),
                t.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Command::Plan { spec, json, shards, estimate } => {
            plan(&spec, Some(PlanOutput { json, shards, calibrate: estimate }))
        }
        Command::Validate { spec } => plan(&spec, None),
        Command::Merge { dir, keep_shards } => {
            let merged = tl_run::graph::merge::merge(&dir, keep_shards)?;
            for f in &merged.files {
                println!("wrote {}", f.display());
            }
            println!("wrote {} ({} shards, {} jobs)", merged.manifest.display(), merged.shards, merged.jobs);
            Ok(())
        }
        Command::Slurm { spec, tasks, gpus_per_task, cpus_per_task, partition, time, submit } => {
            let opts = tl_run::graph::slurm::ArrayOptions { tasks, gpus_per_task, cpus_per_task, partition, time };
            slurm(&spec, &opts, submit)
        }
        Command::Check { zoo, update, only, dtype, junit, out, quiet } => {
            use tl_run::check::Update;
            let update = match update.as_deref() {
                None => Update::No,
                Some("goldens") => Update::Goldens,
                Some("references") => Update::References,
                Some(_) => Update::All,
            };
            let opts = tl_run::check::CheckOptions {
                update,
                only,
                dtype,
                out,
                progress: !quiet && std::io::IsTerminal::is_terminal(&std::io::stderr()),
            };
            check(&zoo, &opts, junit.as_deref())
        }
    }
}

/// Reads and resolves a spec with the command-line overrides applied.
fn read_spec(a: &SpecArgs) -> Result<Spec> {
    if let Some(b) = a.batch_memory {
        tl_run::engine::memory::set_budget_bytes(b);
    }
    let mut spec = tl_run::kinds::resolve_file_with_prompts(&a.spec, a.prompts.as_deref())?;
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
        spec.model.devices.clear();
    }
    if let Some(first) = a.devices.first() {
        spec.model.device = first.clone();
        spec.model.devices = a.devices.clone();
    }
    if a.split_layers {
        anyhow::ensure!(
            !spec.model.devices.is_empty(),
            "--split-layers needs --devices (or model.devices in the spec): the devices to split the layers over"
        );
        spec.model.split_layers = true;
    }
    if let Some(d) = &a.dtype {
        spec.model.dtype = d.clone();
    }
    if let Some(k) = &a.attention {
        spec.model.attention = tl_run::model::AttentionKernel::parse(k)
            .with_context(|| format!("--attention {k}: unknown attention kernel (valid: fused, explicit)"))?;
    }
    if let Some(p) = &a.prompts {
        spec.prompts = tl_run::spec::prompts::read(p).map_err(|e| anyhow::anyhow!("--prompts {}: {e}", p.display()))?;
        spec.apply_corruption_to_prompts().map_err(|e| anyhow::anyhow!("--prompts {}: {e}", p.display()))?;
    }
    Ok(spec)
}

/// What the config and tokenizer tell about a spec before any weights are loaded.
struct Preflight {
    /// The model's files, config and tokenizer, read once: the load takes them.
    model: std::sync::Arc<tl_run::model::Described>,
    toks: Option<tl_run::kinds::shared::inputs::Tokenized>,
}

/// Every problem of a spec against the model's config and tokenizer at once, or the tokenized
/// prompts.
fn preflight(spec: &Spec) -> Result<Preflight> {
    let model = tl_run::model::Described::read(&spec.model.id, spec.model.revision.as_deref(), true)?;
    let (cfg, tok) = (&model.cfg, model.tokenizer()?);
    let mut problems: Vec<String> = spec.runs.iter().filter_map(|r| r.check_model(cfg, &spec.file).err()).collect();
    let mut toks = None;
    if spec.runs.iter().any(|r| r.kind.needs().prompts) {
        // The clean prompts' length, even when answers or corruption have problems of their own.
        let texts: Vec<&str> = spec.prompts.iter().map(|p| p.clean.as_str()).collect();
        if let Ok(b) = tok.batch(&texts, spec.model.prepend_bos_for(cfg)) {
            let seq = b.tokens.size()[1] as usize;
            if seq > cfg.n_ctx {
                problems.push(format!(
                    "{}: the longest prompt is {seq} tokens, more than the model's context of {}",
                    spec.file, cfg.n_ctx
                ));
            }
            problems.extend(spec.runs.iter().filter_map(|r| r.check_positions(seq, &b.lengths, &spec.file).err()));
        }
        match tl_run::kinds::shared::inputs::tokenize(
            spec,
            tok,
            cfg,
            spec.runs.iter().any(|r| r.kind.needs().corruption),
        ) {
            Ok(t) => toks = Some(t),
            // One line per problem, each naming the file (the error lists several at once).
            Err(e) => problems.extend(e.to_string().lines().map(|line| format!("{}: {line}", spec.file))),
        }
    }
    let lines: Vec<String> = problems.iter().flat_map(|p| p.lines().map(str::to_string)).collect();
    let n = lines.len();
    anyhow::ensure!(
        n == 0,
        "{n} problem{} with model {}:\n  {}",
        if n == 1 { "" } else { "s" },
        spec.model.id,
        lines.join("\n  ")
    );
    Ok(Preflight { model: std::sync::Arc::new(model), toks })
}

struct PlanOutput {
    json: bool,
    shards: Option<usize>,
    /// Time one forward for the time estimate (loads the weights).
    calibrate: bool,
}

/// "42 s", "7 min 15 s", "2 h 5 min".
fn human_seconds(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, s % 3600 / 60),
    }
}

/// `plan` (with output) or `validate` (None).
fn plan(a: &SpecArgs, output: Option<PlanOutput>) -> Result<()> {
    let spec = read_spec(a)?;
    let pf = preflight(&spec)?;
    let seq = pf.toks.as_ref().map_or(0, |t| t.clean.size()[1]);
    let Some(out) = output else {
        println!(
            "{}: ok ({} prompts of {seq} tokens, {} runs; model {} has {} layers, {} heads)",
            a.spec.display(),
            spec.prompts.len(),
            spec.runs.len(),
            spec.model.id,
            pf.model.cfg.n_layers,
            pf.model.cfg.n_heads
        );
        return Ok(());
    };
    let calibration_tokens =
        pf.toks.as_ref().map(|t| (t.clean.shallow_clone(), t.mask.as_ref().map(tch::Tensor::shallow_clone)));
    let compiled = tl_run::graph::execute::compile_tokenized(&spec, &pf.model.cfg, pf.toks, Some(&pf.model.files))?;
    let plan = &compiled.plan;
    let work: f64 = plan.jobs.iter().map(|j| j.cost).sum();
    let rate = match out.calibrate {
        true => Some(calibrate::calibrate(&spec, &pf.model, calibration_tokens)?),
        false => calibrate::from_store(&spec.output_dir, plan),
    };
    let estimate = match rate {
        Some(c) => format!(
            "estimated: {work:.0} layer-rows of forward work, about {} ({})",
            human_seconds(work * c.seconds_per_layer_row),
            c.what
        ),
        None => format!("estimated: {work:.0} layer-rows of forward work (--estimate times one forward for a time)"),
    };
    let owner = match out.shards {
        Some(n) => {
            anyhow::ensure!(n > 0, "--shards must be at least 1");
            Some(tl_run::graph::shard::assign(plan, n))
        }
        None => None,
    };
    if out.json {
        // With --shards each work job says which shard runs it (a Slurm task's keys, for
        // watching its progress in the job store).
        let mut jobs = serde_json::to_value(&plan.jobs)?;
        if let (Some(owner), Some(list)) = (&owner, jobs.as_array_mut()) {
            for (job, shard) in list.iter_mut().zip(owner.iter()) {
                job["shard"] = serde_json::json!(shard);
            }
        }
        println!("{}", serde_json::to_string_pretty(&jobs)?);
    } else {
        print!("{}", plan.render());
        println!("{estimate}");
    }
    if let (Some(n), Some(owner)) = (out.shards, owner) {
        let mut cost = vec![0.0f64; n];
        let mut jobs = vec![0usize; n];
        for j in plan.work() {
            let s = owner[j.id].expect("work jobs have a shard");
            cost[s] += j.cost;
            jobs[s] += 1;
        }
        let (max, min) = (cost.iter().cloned().fold(0.0, f64::max), cost.iter().cloned().fold(f64::INFINITY, f64::min));
        // The summary goes to stderr under --json, so that stdout stays one JSON document.
        let mut summary: Vec<String> =
            (0..n).map(|s| format!("shard {s}/{n}: {} jobs, cost {:.0}", jobs[s], cost[s])).collect();
        summary.push(format!("cost balance: max/min {:.3}", if min > 0.0 { max / min } else { f64::INFINITY }));
        for line in summary {
            if out.json {
                eprintln!("{line}");
            } else {
                println!("{line}");
            }
        }
    }
    Ok(())
}

/// Whether an output directory's job store holds any job's result.
fn has_stored_jobs(output_dir: &std::path::Path) -> bool {
    let jobs = output_dir.join(".tl-run").join("jobs");
    std::fs::read_dir(jobs)
        .is_ok_and(|mut entries| entries.any(|e| e.is_ok_and(|e| e.path().extension().is_some_and(|x| x == "parquet"))))
}

/// `tl-run run`: preflight, the model's load started beside the plan (when it will be needed),
/// the execution and what it prints; over 80 lines as the command reads top to bottom.
fn run(a: &SpecArgs, progress: bool, fresh: bool, shard: Option<&str>, report: bool) -> Result<()> {
    use tl_run::graph::execute::{ExecOptions, ModelSource};
    let spec = read_spec(a)?;
    let shard = match shard {
        Some(s) => Some(tl_run::graph::shard::Shard::parse(s)?),
        None => tl_run::graph::shard::Shard::from_slurm_env()?,
    };
    if let Some(s) = shard {
        tracing::info!("running shard {} of {}", s.index, s.count);
    }
    tl_run::output::atomic::check_writable_dir(&spec.output_dir)?;
    let t = std::time::Instant::now();
    let pf = preflight(&spec)?;
    let devices: Vec<tch::Device> = spec.model.devices.iter().map(|d| parse_device(d)).collect::<Result<_>>()?;
    // Split by layers: one model over the devices; else a replica per device.
    let (split, devices) = if spec.model.split_layers { (devices, Vec::new()) } else { (Vec::new(), devices) };
    let opts = LoadOptions {
        revision: spec.model.revision.clone(),
        processing: spec.model.processing,
        device: parse_device(&spec.model.device)?,
        kind: spec.model.kind()?,
        split,
        attention: spec.model.attention,
    };
    // A run that loads the model whatever the store holds (--fresh, or nothing stored in this
    // output directory yet) starts loading it now, beside the weight digests and the plan, which
    // the load does not need: a first run on a machine hashes every weight file (0.7 s for a
    // 500 MB checkpoint on this 2-core machine, 5 s for an 8B model's 15 GiB on a GPU machine).
    let early = (devices.len() <= 1 && (fresh || !has_stored_jobs(&spec.output_dir))).then(|| {
        let (described, opts) = (pf.model.clone(), opts.clone());
        tracing::debug!("loading the model beside the weight digests and the plan");
        std::thread::Builder::new()
            .name("tl-run-load".into())
            .spawn(move || tl_run::panics::guarded("load model", || Model::load_described(&described, &opts)))
    });
    let early = std::sync::Mutex::new(early.and_then(|spawned| spawned.ok()));
    let compiled = tl_run::graph::execute::compile_tokenized(&spec, &pf.model.cfg, pf.toks, Some(&pf.model.files))?;
    let load = |device: tch::Device| {
        let started = early.lock().unwrap_or_else(|e| e.into_inner()).take();
        match started {
            Some(loading) if device == opts.device => loading
                .join()
                .unwrap_or_else(|_| Err(tl_run::Error::Other("loading the model stopped unexpectedly".into()))),
            _ => Model::load_described(&pf.model, &LoadOptions { device, ..opts.clone() }),
        }
    };
    let source = ModelSource::Lazy {
        cfg: &pf.model.cfg,
        tokenizer: pf.model.tokenizer.as_ref(),
        files: Some(&pf.model.files),
        device: opts.device,
        load: Box::new(load),
    };
    let exec = ExecOptions {
        progress: progress && std::io::IsTerminal::is_terminal(&std::io::stderr()),
        progress_lines: progress && !std::io::IsTerminal::is_terminal(&std::io::stderr()),
        store: true,
        fresh,
        shard,
        devices,
    };
    let outcome = tl_run::graph::execute::execute_compiled(&spec, source, compiled, t.elapsed().as_secs_f64(), &exec)?;
    for f in &outcome.files {
        println!("wrote {}", f.display());
    }
    println!("wrote {}", outcome.manifest.display());
    println!("{}", outcome.jobs);
    print!("{}", outcome.summary);
    if report || spec.report {
        if shard.is_some() {
            println!(
                "no report for one shard: run `tl-run merge {}`, then `tl-run report {}`",
                spec.output_dir.display(),
                spec.output_dir.display()
            );
        } else {
            let w = tl_run::report::write(&spec.output_dir, None, tl_run::report::Options::default())?;
            println!("wrote {} ({} figures)", w.page.display(), w.figures.len());
        }
    }
    Ok(())
}

/// `tl-run download`: resolves (downloading what is missing) every hub model named.
fn download(models: &[String], revision: Option<&str>, specs: &[PathBuf], zoos: &[PathBuf]) -> Result<()> {
    let mut wanted: Vec<(String, Option<String>)> =
        models.iter().map(|m| (m.clone(), revision.map(str::to_string))).collect();
    for path in specs {
        let spec = tl_run::kinds::resolve_file(path)?;
        wanted.push((spec.model.id.clone(), spec.model.revision.clone()));
    }
    for path in zoos {
        let zoo = tl_run::check::zoo::Zoo::read(path, true)?;
        for m in zoo.models {
            if let tl_run::check::zoo::Source::Hub { id, revision } = m.source {
                wanted.push((id, Some(revision)));
            }
        }
    }
    anyhow::ensure!(!wanted.is_empty(), "name at least one model (org/name), --spec SPEC.toml or --zoo ZOO.toml");
    wanted.dedup();
    for (id, rev) in wanted {
        let path = std::path::Path::new(&id);
        if path.exists() || id.ends_with(".gguf") {
            println!("{id}: a local file or directory, nothing to download");
            continue;
        }
        let files = tl_run::model::source::resolve(&id, rev.as_deref())?;
        let bytes: u64 = files
            .weights
            .iter()
            .chain([&files.config])
            .chain(files.tokenizer.iter())
            .chain(files.tokenizer_config.iter())
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum();
        println!(
            "{id}@{}: commit {} ({} weight file(s), {:.1} MB) in {}",
            rev.as_deref().unwrap_or("main"),
            files.commit.as_deref().unwrap_or("?"),
            files.weights.len(),
            bytes as f64 / 1e6,
            files.config.parent().map(|p| p.display().to_string()).unwrap_or_default()
        );
    }
    Ok(())
}

/// `tl-run slurm`: the sbatch script, written next to the outputs, and submitted with --submit.
fn slurm(a: &SpecArgs, opts: &tl_run::graph::slurm::ArrayOptions, submit: bool) -> Result<()> {
    let spec = read_spec(a)?;
    // The tasks must start: the spec and the model are checked here, not on the cluster.
    preflight(&spec)?;
    // The task command line: the same overrides, every path absolute, outputs where this spec's go.
    let abs = |p: &std::path::Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()).display().to_string();
    let mut args = vec!["--out".to_string(), abs(&spec.output_dir)];
    if let Some(id) = &a.model_id {
        let p = std::path::Path::new(id);
        args.extend(["--model-id".into(), if p.exists() { abs(p) } else { id.clone() }]);
    }
    if !a.devices.is_empty() {
        args.extend(["--devices".to_string(), a.devices.join(",")]);
    }
    if a.split_layers {
        args.push("--split-layers".into());
    }
    if let Some(b) = a.batch_memory {
        args.extend(["--batch-memory".to_string(), b.to_string()]);
    }
    for (flag, v) in [("--device", &a.device), ("--dtype", &a.dtype)] {
        if let Some(v) = v {
            args.extend([flag.to_string(), v.clone()]);
        }
    }
    if let Some(p) = &a.prompts {
        args.extend(["--prompts".into(), abs(p)]);
    }
    let script = tl_run::graph::slurm::write_script(&spec, &a.spec, &args, opts)?;
    println!("wrote {}", script.display());
    if submit {
        let ids = tl_run::graph::slurm::submit(&script, &spec.output_dir, opts.partition.as_deref())?;
        println!(
            "submitted array job {} ({} tasks) and merge job {} (after the array succeeds)",
            ids.0, opts.tasks, ids.1
        );
    } else {
        println!("submit with: sbatch {}   (then: tl-run merge {})", script.display(), spec.output_dir.display());
    }
    Ok(())
}

/// Hook points follow from the config, so the listing checks the checkpoint against it without
/// reading or processing weight values (`Model::inspect`): milliseconds for any model size.
fn hooks(m: &ModelArgs, batch: i64, seq: i64) -> Result<()> {
    // The load options are still checked, so that a command that fails under `cache` (a device
    // that is not here, an unknown dtype) fails here too.
    load_options(m)?;
    let cfg = Model::inspect(&m.model, m.revision.as_deref())?;
    let mut out = String::new();
    for p in cfg.hook_points() {
        out.push_str(&format!("{:<36} {:?}\n", p.to_string(), cfg.hook_shape(p, batch, seq)));
    }
    print!("{out}");
    Ok(())
}

fn cache(
    m: &ModelArgs,
    prompts: &[String],
    names: &[String],
    out: &std::path::Path,
    prepend_bos: Option<bool>,
) -> Result<()> {
    let model = load(m)?;
    let points = if names.is_empty() {
        model.hook_points()
    } else {
        names.iter().map(|n| model.hook_point(n.trim())).collect::<tl_run::Result<Vec<_>>>()?
    };
    let tok = model.tokenizer()?;
    let batch = tok.batch(prompts, prepend_bos.unwrap_or(model.cfg.default_prepend_bos))?;
    if let Some(max) = Vec::<i64>::try_from(batch.tokens.flatten(0, -1))?.into_iter().max() {
        tl_run::model::tokenize::check_in_vocab(tok, max, model.cfg.d_vocab)?;
    }
    let mut hooks = Hooks::capture(points.iter().copied());
    let _logits = model.run(Input::Tokens(&batch.tokens), batch.mask.as_ref(), &mut hooks, Stop::Logits)?;
    let tensors: Vec<(String, tch::Tensor)> =
        points.iter().filter_map(|p| hooks.take(*p).map(|t| (p.to_string(), t))).collect();
    let tokens: Vec<Vec<i64>> =
        (0..prompts.len() as i64).map(|i| Vec::<i64>::try_from(batch.tokens.get(i)).unwrap_or_default()).collect();
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
    model.release_at_exit();
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
