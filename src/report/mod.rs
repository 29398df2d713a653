//! `tl-run report`: the pictures of a results directory as one self-contained HTML page
//! (`report.html`) plus one SVG per figure under `figures/`.
//!
//! figure.rs decides what each run kind shows (rows → figure descriptions, unit-tested);
//! svg.rs draws them (ticks.rs: its round axis ticks); html.rs lays out the page; patterns.rs
//! recomputes the attention patterns of the top heads; png.rs rasterises figures for `--png`;
//! prompt_facts.rs reads what the figures need of the prompts (baselines, corrupted positions);
//! shared_scale.rs puts a run's heatmaps on one colour scale; names.rs spells the header's dtype
//! and device.
pub mod html;
pub mod names;
pub mod patterns;
pub mod png;
pub mod prompt_facts;
pub mod shared_scale;
pub mod svg;
pub mod ticks;

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::output::atomic;
use crate::output::figure;
use crate::output::table::read_parquet;
use crate::output::token_label::token_label;

/// What was written.
#[derive(Debug)]
pub struct Written {
    pub page: PathBuf,
    pub figures: Vec<PathBuf>,
    pub bytes: u64,
}

/// What to draw besides the figures the results hold.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// A PNG beside every SVG under figures/ (for slides and papers).
    pub png: bool,
    /// Attention patterns of the top heads of patching runs by head: loads the run's model.
    pub patterns: bool,
    /// One colour scale for all heatmaps of a run (shared_scale.rs); None: the spec's
    /// `[output] shared_scale`, as the manifest records it (false when it does not).
    pub shared_scale: Option<bool>,
}

impl Default for Options {
    fn default() -> Self {
        Options { png: false, patterns: true, shared_scale: None }
    }
}

/// What every run's figures read of the manifest, read once.
struct Shared<'a> {
    manifest: &'a Value,
    /// The metric's name for colour bars.
    metric: String,
    source: patterns::PatternSource<'a>,
    changed: prompt_facts::ChangedTokens,
    /// The prompts' facts (a run adds its own Pearson r).
    facts: figure::RunFacts,
    opts: Options,
}

/// Reads `dir` (a finished run's output directory) and writes the report to `out` (default
/// `<dir>/report.html`) and its figures to `<out's directory>/figures/`.
pub fn write(dir: &Path, out: Option<&Path>, opts: Options) -> Result<Written> {
    let manifest = read_manifest(dir)?;
    let changed = prompt_facts::ChangedTokens::read(&manifest);
    let shared = Shared {
        manifest: &manifest,
        metric: metric_label(&manifest),
        source: patterns::PatternSource::new(&manifest),
        facts: prompt_facts::run_facts(&manifest, &changed),
        changed,
        opts,
    };
    let one_scale = opts
        .shared_scale
        .unwrap_or_else(|| manifest.pointer("/spec/shared_scale").and_then(Value::as_bool).unwrap_or(false));
    let mut runs =
        run_order(&manifest).into_iter().map(|name| run_figures(dir, &shared, &name)).collect::<Result<Vec<_>>>()?;
    if one_scale {
        runs.iter_mut().for_each(shared_scale::share);
    }
    let page_path = out.map(Path::to_path_buf).unwrap_or_else(|| dir.join("report.html"));
    let fig_dir = page_path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).join("figures");
    let figures = write_figures(&runs, &fig_dir, opts)?;
    let title =
        format!("tl-run report: {}", manifest.pointer("/spec/name").and_then(Value::as_str).unwrap_or("results"));
    let page = html::page(&title, &facts(&manifest, &shared.metric), &runs);
    atomic::write_bytes(&page_path, page.as_bytes())?;
    Ok(Written { page: page_path, figures, bytes: page.len() as u64 })
}

/// The manifest of `dir`, when it is a tl-run results directory (not a sharded one).
fn read_manifest(dir: &Path) -> Result<Value> {
    let manifest_path = dir.join("manifest.json");
    let sharded = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("manifest.shard-"));
    let text = std::fs::read_to_string(&manifest_path).map_err(|e| {
        Error::Config(if sharded {
            format!(
                "{} holds the shards of a sharded run: join them first with `tl-run merge {}`",
                dir.display(),
                dir.display()
            )
        } else {
            format!(
                "{}: {e}; is {} a tl-run results directory (the spec's output.dir)?",
                manifest_path.display(),
                dir.display()
            )
        })
    })?;
    let manifest: Value = serde_json::from_str(&text)
        .map_err(|e| Error::Config(format!("{}: not valid JSON: {e}", manifest_path.display())))?;
    // Another tool's manifest.json would otherwise give an empty report that looks like a run
    // with no results.
    if manifest.get("tl_run").is_none() || !manifest.get("runs").is_some_and(Value::is_object) {
        return Err(Error::Config(format!(
            "{} is not a tl-run manifest (it has no \"tl_run\" version and \"runs\" object); is {} a tl-run results directory (the spec's output.dir)?",
            manifest_path.display(),
            dir.display()
        )));
    }
    Ok(manifest)
}

/// The figures of run `name`: its kind's, and the attention patterns of its top heads.
fn run_figures(dir: &Path, shared: &Shared, name: &str) -> Result<figure::RunFigures> {
    let entry = &shared.manifest["runs"][name];
    let file =
        entry.get("file").and_then(Value::as_str).map(str::to_string).unwrap_or_else(|| format!("{name}.parquet"));
    let path = dir.join(&file);
    if !path.exists() {
        let sharded = dir.join(name).is_dir();
        return Err(Error::Config(format!(
            "run '{name}': {} is missing{}",
            path.display(),
            if sharded {
                "; this directory holds shards: join them first with `tl-run merge DIR`"
            } else {
                "; did the run finish (manifest.json's \"complete\")?"
            }
        )));
    }
    let (rows, _) = read_parquet(&path)?;
    let kind = entry
        .get("kind")
        .and_then(Value::as_str)
        .or_else(|| rows.first().map(|r| r.kind.as_str()))
        .unwrap_or("")
        .to_string();
    // A kind this build does not know (results of a newer one) gets its table, no figures.
    let info = crate::kinds::by_name(&kind);
    let draw = info.map_or(figure::no_figures as figure::KindFigures, |k| k.figures);
    let own = figure::RunFacts::from_manifest(entry);
    let facts = figure::RunFacts {
        pearson_by_hook: own.pearson_by_hook,
        faithfulness: own.faithfulness,
        circuit: own.circuit,
        ..shared.facts.clone()
    };
    let mut figs = figure::run_figures(name, &kind, draw, &rows, &facts, &shared.metric);
    let heads = match info {
        Some(k) if k.pattern_heads => figure::top_heads(&rows, figure::PATTERN_HEADS),
        _ => Vec::new(),
    };
    if !heads.is_empty() {
        if !shared.opts.patterns {
            figs.patterns_note = Some("left out (--no-patterns)".into());
        } else {
            match shared.source.patterns(&heads) {
                Ok((tokens, ps)) => {
                    // Prompt 0's own tokens, unpadded: its changed positions as counted there.
                    let changed = shared.changed.positions.first().cloned().unwrap_or_default();
                    figs.patterns = ps
                        .iter()
                        .map(|p| {
                            let mut f = figure::pattern_figure(name, p.layer, p.head, &tokens, &p.probabilities);
                            figure::mark_positions(&mut f, &changed);
                            f
                        })
                        .collect()
                }
                Err(why) => {
                    tracing::warn!(run = %name, "no attention patterns in the report: {why}");
                    figs.patterns_note = Some(why);
                }
            }
        }
    }
    Ok(figs)
}

/// Each figure as SVG (and PNG with `opts.png`) under `fig_dir`; figures an earlier report left
/// there that this one did not redraw are removed.
fn write_figures(runs: &[figure::RunFigures], fig_dir: &Path, opts: Options) -> Result<Vec<PathBuf>> {
    let mut figures = Vec::new();
    let rasteriser = opts.png.then(png::Rasteriser::new);
    for r in runs {
        let all = r
            .figures
            .iter()
            .chain(&r.patterns)
            .map(|f| (None, f))
            .chain(r.per_prompt.iter().flat_map(|(p, fs)| fs.iter().map(move |f| (Some(*p), f))));
        for (i, (prompt, f)) in all.enumerate() {
            if let Some(svg) = svg::render(f) {
                let stem = match prompt {
                    Some(p) => format!("{}-prompt{p}-{i}", r.run),
                    None => format!("{}-{i}", r.run),
                };
                let path = fig_dir.join(format!("{}.svg", sanitize(&stem)));
                atomic::write_bytes(&path, svg.as_bytes())?;
                if let Some(raster) = &rasteriser {
                    let png_path = path.with_extension("png");
                    atomic::write_bytes(
                        &png_path,
                        &raster.png(&svg).map_err(|e| Error::Other(format!("{}: {e}", png_path.display())))?,
                    )?;
                    figures.push(png_path);
                }
                figures.push(path);
            }
        }
    }
    // Figures of an earlier report of this directory that this one did not redraw.
    if let Ok(entries) = std::fs::read_dir(fig_dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "svg" || x == "png") && !figures.contains(&p) {
                let _ = std::fs::remove_file(&p);
            }
        }
    }
    Ok(figures)
}

/// File-name-safe stem (run names are already checked, but prompts and indices are appended).
fn sanitize(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' { c } else { '_' }).collect()
}

/// Runs in the spec's order (the manifest's object is keyed by name).
fn run_order(m: &Value) -> Vec<String> {
    let from_spec: Vec<String> = m
        .pointer("/spec/runs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|r| r.get("name").and_then(Value::as_str).map(str::to_string))
        .collect();
    let known: Vec<String> =
        m.get("runs").and_then(Value::as_object).map(|o| o.keys().cloned().collect()).unwrap_or_default();
    let mut order: Vec<String> = from_spec.into_iter().filter(|n| known.contains(n)).collect();
    for k in known {
        if !order.contains(&k) {
            order.push(k);
        }
    }
    order
}

/// The metric's name as the colour bars show it.
pub fn metric_label(m: &Value) -> String {
    let kind = m.pointer("/spec/metric/kind").and_then(Value::as_str).unwrap_or("logit_diff");
    let name = match kind {
        "logit_diff" => "logit difference",
        "logprob" => "log-probability of the answer",
        "prob" => "probability of the answer",
        other => other,
    };
    if m.pointer("/spec/metric/normalize").and_then(Value::as_bool).unwrap_or(false) {
        format!("{name}, normalised (m − corrupted) / (clean − corrupted)")
    } else {
        name.to_string()
    }
}

fn facts(m: &Value, metric: &str) -> Vec<html::Fact> {
    let esc = html::escape;
    let s = |p: &str| {
        m.pointer(p)
            .map(|v| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string()))
            .unwrap_or_else(|| "—".into())
    };
    let mut out: Vec<html::Fact> = vec![
        ("model".into(), format!("<code>{}</code> ({})", esc(&s("/model/id")), esc(&s("/model/family")))),
        ("revision".into(), esc(&s("/model/resolved_commit").replace("null", "local files"))),
    ];
    let weights: Vec<String> = m
        .pointer("/model/weights")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|w| {
            format!(
                "<code>{}</code> sha256 {}",
                esc(w.get("file").and_then(Value::as_str).unwrap_or("")),
                esc(&w.get("sha256").and_then(Value::as_str).unwrap_or("").chars().take(16).collect::<String>())
            )
        })
        .collect();
    out.push(("weights".into(), weights.join("<br>")));
    out.push((
        "dtype, device".into(),
        format!("{}, {}", esc(&names::dtype_name(&s("/dtype"))), esc(&names::device_name(&s("/device")))),
    ));
    let processing: Vec<String> = m
        .pointer("/model/processing")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k} = {v}"))
        .collect();
    out.push(("processing".into(), esc(&processing.join(", "))));
    let prompts: Vec<String> = m
        .pointer("/spec/prompts")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .take(4)
        .map(|p| {
            // The prompt quoted as text; the answer is one token, shown as the figures show tokens.
            format!(
                "{} → {}",
                esc(&format!("{:?}", p.get("clean").and_then(Value::as_str).unwrap_or(""))),
                esc(&token_label(p.get("correct").and_then(Value::as_str).unwrap_or("")))
            )
        })
        .collect();
    let n = m.pointer("/spec/prompts").and_then(Value::as_array).map_or(0, Vec::len);
    out.push((
        format!("prompts ({n})"),
        format!("{}{}", prompts.join("<br>"), if n > 4 { format!("<br>… and {} more", n - 4) } else { String::new() }),
    ));
    out.push(("metric".into(), esc(metric)));
    if let (Some(c), Some(k)) = (
        m.pointer("/metric/clean_baseline").and_then(Value::as_f64),
        m.pointer("/metric/corrupted_baseline").and_then(Value::as_f64),
    ) {
        out.push(("baselines".into(), format!("clean {c:.4}, corrupted {k:.4}")));
    }
    if let Some(t) = m.get("timings_seconds").and_then(Value::as_object) {
        let total: f64 = t.values().filter_map(Value::as_f64).sum();
        out.push(("time".into(), format!("{total:.2} s over {} timed steps", t.len())));
    }
    out.push((
        "tl-run".into(),
        format!(
            "{} (commit {})",
            esc(&s("/tl_run/version")),
            esc(&s("/tl_run/git_commit").chars().take(12).collect::<String>())
        ),
    ));
    if m.get("complete").and_then(Value::as_bool) == Some(false) {
        out.push(("status".into(), "<b>incomplete</b>: the run stopped before its last job".into()));
    }
    out
}
