//! `tl-run check ZOO.toml`: a regression gate over a zoo of models. Per model and dtype: the
//! logits (without weight processing, as HF computes them) against a stored reference with the
//! comparator metrics, then each listed experiment spec's Parquet against stored goldens. Every
//! figure becomes a pass/fail row; a failure to load or run becomes a failed row too, so one broken
//! model never hides the others.
pub mod golden;
pub mod logits;
pub mod report;
pub mod zoo;

use std::path::{Path, PathBuf};
use std::time::Instant;

use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::model::config::{parse_dtype, Processing};
use crate::{Hooks, Input, LoadOptions, Model, Stop};
use logits::{PromptLogits, Reference};
pub use report::CheckRow;
pub use zoo::{Tolerance, Zoo, ZooModel};

/// What `--update` rewrites from this run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Update {
    No,
    /// References and goldens.
    All,
    Goldens,
    References,
}

impl Update {
    pub fn references(self) -> bool {
        matches!(self, Update::All | Update::References)
    }
    pub fn goldens(self) -> bool {
        matches!(self, Update::All | Update::Goldens)
    }
}

pub struct CheckOptions {
    /// Rewrite references and/or goldens from this run (after a reviewed change).
    pub update: Update,
    /// Only these models (by name); all when empty.
    pub only: Vec<String>,
    /// Only this dtype.
    pub dtype: Option<String>,
    /// Where the specs' outputs of this run are written (`<out>/<model>/<dtype>/<spec>/`).
    pub out: PathBuf,
    pub progress: bool,
}

pub struct CheckOutcome {
    pub rows: Vec<CheckRow>,
    /// With --update: what moved by how much, one line per reference or golden file.
    pub moved: Vec<String>,
    pub seconds: f64,
}

impl CheckOutcome {
    pub fn passed(&self) -> bool {
        self.rows.iter().all(|r| r.pass)
    }
}

/// Rows of one (model, dtype).
struct Rows<'a> {
    model: &'a str,
    dtype: &'a str,
    rows: &'a mut Vec<CheckRow>,
}

impl Rows<'_> {
    fn push(
        &mut self,
        check: &str,
        figure: impl Into<String>,
        value: f64,
        tolerance: impl Into<String>,
        pass: bool,
        detail: impl Into<String>,
    ) {
        self.rows.push(CheckRow {
            model: self.model.into(),
            dtype: self.dtype.into(),
            check: check.into(),
            figure: figure.into(),
            value,
            tolerance: tolerance.into(),
            pass,
            detail: detail.into(),
        });
    }

    fn error(&mut self, check: &str, figure: &str, e: impl std::fmt::Display) {
        self.push(check, figure, f64::NAN, "no error", false, format!("{e:#}"));
    }

    /// A figure held to an upper (`max`) or lower bound; None: reported only.
    fn bounded(&mut self, figure: &str, value: f64, bound: Option<f64>, upper: bool) {
        match bound {
            None => self.push("logits", figure, value, "report only", true, ""),
            Some(b) => {
                let pass = if upper { value <= b } else { value >= b };
                let op = if upper { "≤" } else { "≥" };
                let b = report::fmt_tol(b);
                self.push(
                    "logits",
                    figure,
                    value,
                    format!("{op} {b}"),
                    pass,
                    if pass { String::new() } else { format!("{} is not {op} {b}", report::fmt_value(value)) },
                );
            }
        }
    }
}

/// Runs the gate over `zoo`.
pub fn run(zoo: &Zoo, opts: &CheckOptions) -> Result<CheckOutcome> {
    let start = Instant::now();
    for name in &opts.only {
        if !zoo.models.iter().any(|m| &m.name == name) {
            let names: Vec<&str> = zoo.models.iter().map(|m| m.name.as_str()).collect();
            return Err(Error::Config(format!(
                "--only {name}: no such model in {} (models: {})",
                zoo.file.display(),
                names.join(", ")
            )));
        }
    }
    if let Some(d) = &opts.dtype {
        if parse_dtype(d).is_none() {
            return Err(Error::Config(format!("--dtype {d}: unknown dtype (valid: {})", crate::model::config::DTYPES)));
        }
    }
    let mut out = CheckOutcome { rows: Vec::new(), moved: Vec::new(), seconds: 0.0 };
    for m in zoo.models.iter().filter(|m| opts.only.is_empty() || opts.only.contains(&m.name)) {
        // --dtype runs a dtype the zoo may not list for this model (e.g. bf16 under f32 tolerances).
        let dtypes: Vec<String> = match &opts.dtype {
            Some(d) => vec![d.clone()],
            None => m.dtypes.clone(),
        };
        for (i, dtype) in dtypes.iter().enumerate() {
            let t = Instant::now();
            eprintln!("tl-run check: {} ({dtype})", m.name);
            let tol = m
                .tolerance
                .get(dtype)
                .cloned()
                .unwrap_or_else(|| m.tolerance.values().next().cloned().unwrap_or_default());
            let mut rows = Rows { model: &m.name, dtype, rows: &mut out.rows };
            // References are written from the first dtype checked: the zoo's most precise one.
            // A panic in one model is that model's failed row; the gate goes on with the others.
            let moved = &mut out.moved;
            let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                check_logits(m, dtype, &tol, opts.update.references() && i == 0, &mut rows, moved);
                check_goldens(m, dtype, &tol, opts, &mut rows, moved);
            }));
            if let Err(payload) = caught {
                rows.error("internal", "failure", crate::panics::take_message(payload.as_ref()));
            }
            tracing::info!(model = %m.name, dtype, seconds = t.elapsed().as_secs_f64(), "checked");
        }
    }
    out.seconds = start.elapsed().as_secs_f64();
    Ok(out)
}

fn load(m: &ZooModel, dtype: &str, processing: Processing) -> Result<Model> {
    let device = crate::engine::device::parse(&m.device)?;
    let kind = parse_dtype(dtype).ok_or_else(|| Error::Config(format!("unknown dtype '{dtype}'")))?;
    Model::load(
        &m.source.model_id(),
        &LoadOptions { revision: m.source.revision(), processing, device, kind, ..LoadOptions::default() },
    )
}

/// Our logits for each token sequence, f32 on the CPU.
fn our_logits(model: &Model, seqs: &[Vec<i64>]) -> Result<Vec<PromptLogits>> {
    let vocab = model.cfg.d_vocab;
    seqs.iter()
        .enumerate()
        .map(|(i, ids)| {
            if let Some(bad) = ids.iter().find(|&&t| t < 0 || t as usize >= vocab) {
                return Err(Error::Other(format!(
                    "prompt {i}: token id {bad} is outside the model's vocabulary of {vocab}"
                )));
            }
            let n = ids.len() as i64;
            let tokens = Tensor::from_slice(ids).view([1, n]).to_device(model.device);
            let logits = model.run(Input::Tokens(&tokens), None, &mut Hooks::new(), Stop::Logits)?;
            let logits = logits.to_device(tch::Device::Cpu).to_kind(Kind::Float).contiguous().view([-1]);
            Ok(PromptLogits { tokens: ids.clone(), logits: Vec::<f32>::try_from(&logits)?, vocab })
        })
        .collect()
}

/// One model's logits against its reference, every figure of the gate (max |Δ|, MSE, cosine,
/// KL, top-1) per prompt and dtype, as rows; over 80 lines, one figure after another.
fn check_logits(
    m: &ZooModel,
    dtype: &str,
    tol: &Tolerance,
    update: bool,
    rows: &mut Rows<'_>,
    moved: &mut Vec<String>,
) {
    let model = match load(m, dtype, Processing::NONE) {
        Ok(model) => model,
        Err(e) => return rows.error("load", "model", e),
    };
    let bos = m.prepend_bos.unwrap_or(model.cfg.default_prepend_bos);
    let ours_tokens: Result<Vec<Vec<i64>>> =
        model.tokenizer().and_then(|t| m.prompts.iter().map(|p| t.encode(p, bos)).collect());
    let ours_tokens = match ours_tokens {
        Ok(t) => t,
        Err(e) => return rows.error("logits", "tokens", e),
    };
    let reference = if m.reference.is_file() {
        match Reference::read(&m.reference) {
            Ok(r) => Some(r),
            Err(e) => return rows.error("logits", "reference", e),
        }
    } else {
        None
    };
    let Some(reference) = reference.filter(|r| r.prompts == m.prompts || !update) else {
        // --update with no (or a stale) reference: make it from ours.
        return match our_logits(&model, &ours_tokens) {
            Ok(items) => write_reference(m, dtype, items, moved, None),
            Err(e) => rows.error("logits", "run", e),
        };
    };
    if reference.prompts != m.prompts {
        let detail = format!(
            "the reference {} was made for other prompts ({} prompts, first {:?}); remake it with scripts/reference_logits.py or --update",
            m.reference.display(),
            reference.prompts.len(),
            reference.prompts.first().map(String::as_str).unwrap_or("")
        );
        return rows.push("logits", "prompts", 1.0, "= reference's", false, detail);
    }
    // Tokens: ours against the reference's, then the logits on the reference's tokens, so a
    // tokenizer difference and a numerical one are told apart.
    let differ: Vec<String> = ours_tokens
        .iter()
        .zip(&reference.items)
        .enumerate()
        .filter(|(_, (o, r))| **o != r.tokens)
        .map(|(i, (o, r))| format!("prompt {i}: ours {o:?}, reference {:?}", r.tokens))
        .collect();
    rows.push("logits", "tokens", differ.len() as f64, "= 0 prompts differing", differ.is_empty(), differ.join("; "));
    let seqs: Vec<Vec<i64>> = reference.items.iter().map(|r| r.tokens.clone()).collect();
    let ours = match our_logits(&model, &seqs) {
        Ok(o) => o,
        Err(e) => return rows.error("logits", "run", e),
    };
    let c = match logits::compare(&ours, &reference.items, tol.atol, tol.rtol) {
        Ok(c) => c,
        Err(e) => return rows.error("logits", "shape", e),
    };
    rows.push(
        "logits",
        "allclose",
        c.outside as f64,
        format!("0 outside atol={} rtol={}", report::fmt_tol(tol.atol), report::fmt_tol(tol.rtol)),
        c.outside == 0,
        if c.outside == 0 {
            String::new()
        } else {
            format!(
                "{} of {} logits outside |ours − ref| ≤ atol + rtol·|ref| (max |diff| {:e})",
                c.outside, c.elements, c.max_abs_diff
            )
        },
    );
    rows.bounded("max_abs_diff", c.max_abs_diff, tol.max_abs, true);
    rows.bounded("mse", c.mse, tol.mse, true);
    rows.bounded("cosine", c.cosine, tol.cosine, false);
    rows.bounded("kl(ref||ours)", c.kl_ref_ours, tol.kl, true);
    rows.bounded("kl(ours||ref)", c.kl_ours_ref, tol.kl, true);
    rows.bounded("top1", c.top1, tol.top1, false);
    if update {
        let ours = match our_logits(&model, &ours_tokens) {
            Ok(o) => o,
            Err(e) => return rows.error("logits", "run", e),
        };
        write_reference(m, dtype, ours, moved, Some(&c));
    }
}

fn write_reference(
    m: &ZooModel,
    dtype: &str,
    items: Vec<PromptLogits>,
    moved: &mut Vec<String>,
    was: Option<&logits::Comparison>,
) {
    let reference = Reference {
        prompts: m.prompts.clone(),
        items,
        source: format!("tl-run {} {dtype}", env!("CARGO_PKG_VERSION")),
    };
    let line = match reference.write(&m.reference, &[("model", m.source.model_id())]) {
        Err(e) => format!("{}: could not write {}: {e}", m.name, m.reference.display()),
        Ok(()) => match was {
            None => format!("{}: reference {} written ({dtype})", m.name, m.reference.display()),
            Some(c) => format!(
                "{}: reference {} rewritten ({dtype}): max |Δlogit| {:.3e}, KL(old‖new) {:.3e}, top-1 agreement {:.4}",
                m.name,
                m.reference.display(),
                c.max_abs_diff,
                c.kl_ref_ours,
                c.top1
            ),
        },
    };
    eprintln!("{line}");
    moved.push(line);
}

fn parquet_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().into_string().ok()).filter(|n| n.ends_with(".parquet")).collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// At most `n` keys, for a detail line.
fn some(keys: &[String], n: usize) -> String {
    let mut s = keys.iter().take(n).map(|k| format!("[{k}]")).collect::<Vec<_>>().join(", ");
    if keys.len() > n {
        s.push_str(&format!(" and {} more", keys.len() - n));
    }
    s
}

fn check_goldens(
    m: &ZooModel,
    dtype: &str,
    tol: &Tolerance,
    opts: &CheckOptions,
    rows: &mut Rows<'_>,
    moved: &mut Vec<String>,
) {
    let Some(goldens) = &m.goldens else { return };
    let mut loaded: Vec<(Processing, Model)> = Vec::new();
    for entry in &m.specs {
        let check = format!("golden:{}", entry.name);
        let out_dir = opts.out.join(&m.name).join(dtype).join(&entry.name);
        let spec = (|| -> Result<crate::kinds::Spec> {
            let mut spec = crate::kinds::resolve_file(&entry.file).map_err(|e| Error::Config(e.to_string()))?;
            spec.model.id = m.source.model_id();
            spec.model.revision = m.source.revision();
            spec.model.dtype = dtype.to_string();
            spec.model.device = m.device.clone();
            spec.output_dir = out_dir.clone();
            if let Some(p) = &entry.prompts {
                spec.prompts = crate::spec::prompts::read(p).map_err(Error::Config)?;
                spec.apply_corruption_to_prompts().map_err(Error::Config)?;
            }
            Ok(spec)
        })();
        let spec = match spec {
            Ok(s) => s,
            Err(e) => {
                rows.error(&check, "spec", e);
                continue;
            }
        };
        if !loaded.iter().any(|(p, _)| *p == spec.model.processing) {
            match load(m, dtype, spec.model.processing) {
                Ok(model) => loaded.push((spec.model.processing, model)),
                Err(e) => {
                    rows.error(&check, "load", e);
                    continue;
                }
            }
        }
        let Some((_, model)) = loaded.iter().find(|(p, _)| *p == spec.model.processing) else { continue };
        let _ = std::fs::remove_dir_all(&out_dir);
        if let Err(e) = crate::graph::execute::run_spec(&spec, model, opts.progress) {
            rows.error(&check, "run", e);
            continue;
        }
        let golden_dir = goldens.join(dtype).join(&entry.name);
        let ours = parquet_files(&out_dir);
        let theirs = parquet_files(&golden_dir);
        for file in ours.iter().chain(theirs.iter().filter(|f| !ours.contains(f))) {
            let run = file.trim_end_matches(".parquet");
            let (ours_path, golden_path) = (out_dir.join(file), golden_dir.join(file));
            if opts.update.goldens() {
                update_golden(m, dtype, &entry.name, &ours_path, &golden_path, tol, moved);
                continue;
            }
            compare_file(rows, &check, run, &ours_path, &golden_path, tol);
        }
    }
}

fn compare_file(rows: &mut Rows<'_>, check: &str, run: &str, ours: &Path, golden: &Path, tol: &Tolerance) {
    if !golden.is_file() {
        return rows.push(
            check,
            run,
            f64::NAN,
            "a golden",
            false,
            format!("no golden {} for this run: review it and run `tl-run check --update=goldens`", golden.display()),
        );
    }
    if !ours.is_file() {
        return rows.push(
            check,
            run,
            f64::NAN,
            "a golden",
            false,
            format!("the golden {} has no run '{run}' in this spec's output", golden.display()),
        );
    }
    let (o, g) = match (golden::KeyedTable::read(ours), golden::KeyedTable::read(golden)) {
        (Ok(o), Ok(g)) => (o, g),
        (Err(e), _) | (_, Err(e)) => return rows.error(check, run, e),
    };
    let d = golden::diff(&o, &g, tol.value_atol, tol.value_rtol);
    if !d.schema.is_empty() {
        return rows.push(check, run, d.schema.len() as f64, "columns = golden's", false, d.schema.join("; "));
    }
    // One row per run: the largest float difference; rows, floats and booleans all gate it.
    let mut problems = Vec::new();
    if !d.missing.is_empty() {
        problems.push(format!("{} golden row(s) missing: {}", d.missing.len(), some(&d.missing, 5)));
    }
    if !d.extra.is_empty() {
        problems.push(format!("{} extra row(s): {}", d.extra.len(), some(&d.extra, 5)));
    }
    let fmt = |v: &Option<f64>| v.map(report::fmt_value).unwrap_or_else(|| "null".into());
    for c in d.floats.iter().filter(|c| !c.outside.is_empty()) {
        let shown: Vec<String> =
            c.outside.iter().take(5).map(|(k, o, g)| format!("[{k}] ours {} golden {}", fmt(o), fmt(g))).collect();
        let more = if c.outside.len() > 5 { format!(" and {} more", c.outside.len() - 5) } else { String::new() };
        problems.push(format!(
            "{} '{}' value(s) outside tolerance: {}{more}",
            c.outside.len(),
            c.column,
            shown.join("; ")
        ));
    }
    for (col, bad) in d.exact.iter().filter(|(_, b)| !b.is_empty()) {
        problems.push(format!("'{col}' differs at {}", some(bad, 5)));
    }
    let max = d.floats.iter().map(|c| c.max_abs_diff).fold(0.0, f64::max);
    let tolerance = format!(
        "{} rows; |Δ| ≤ {} + {}·|golden|",
        g.rows.len(),
        report::fmt_tol(tol.value_atol),
        report::fmt_tol(tol.value_rtol)
    );
    rows.push(check, run, max, tolerance, problems.is_empty(), problems.join("; "));
}

fn update_golden(
    m: &ZooModel,
    dtype: &str,
    spec: &str,
    ours: &Path,
    golden: &Path,
    tol: &Tolerance,
    moved: &mut Vec<String>,
) {
    let label = format!(
        "{}: golden {dtype}/{spec}/{}",
        m.name,
        golden.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default()
    );
    let line = if !ours.is_file() {
        match std::fs::remove_file(golden) {
            Ok(()) => format!("{label} removed (the spec no longer writes it)"),
            Err(e) => format!("{label}: could not remove: {e}"),
        }
    } else {
        let what = match (golden.is_file(), golden::KeyedTable::read(ours)) {
            (true, Ok(o)) => match golden::KeyedTable::read(golden) {
                Ok(g) => {
                    let d = golden::diff(&o, &g, tol.value_atol, tol.value_rtol);
                    let maxes = d
                        .floats
                        .iter()
                        .map(|c| format!("max |Δ{}| {:.3e}", c.column, c.max_abs_diff))
                        .collect::<Vec<_>>()
                        .join(", ");
                    format!("rewritten: {} rows added, {} removed, {maxes}", d.extra.len(), d.missing.len())
                }
                Err(_) => "rewritten (the old one was unreadable)".into(),
            },
            _ => "written".into(),
        };
        match std::fs::read(ours)
            .map_err(|e| Error::io(ours, e))
            .and_then(|b| crate::output::atomic::write_bytes(golden, &b))
        {
            Ok(()) => format!("{label} {what}"),
            Err(e) => format!("{label}: could not write: {e}"),
        }
    };
    eprintln!("{line}");
    moved.push(line);
}
