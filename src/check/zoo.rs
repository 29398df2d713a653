//! Zoo files: the models a regression gate checks, each with its dtypes, prompts, tolerances, the
//! stored logits reference and the experiment specs whose Parquet is kept as goldens. Every
//! problem is reported at once with its line and key, as for experiment specs.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::spec::resolve::Ctx;
use crate::spec::SpecErrors;

/// What a zoo file says, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawZoo {
    defaults: Option<RawDefaults>,
    #[serde(default)]
    model: Vec<RawModel>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    dtypes: Option<Spanned<Vec<Spanned<String>>>>,
    prompts: Option<Spanned<Vec<String>>>,
    prompts_file: Option<Spanned<String>>,
    device: Option<Spanned<String>>,
    tolerance: Option<RawTolerances>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    name: Spanned<String>,
    /// A hub id (needs `revision`).
    id: Option<Spanned<String>>,
    /// A local directory or `.gguf` file, relative to the zoo file.
    path: Option<Spanned<String>>,
    revision: Option<Spanned<String>>,
    #[serde(default)]
    allow_moving_revision: bool,
    dtypes: Option<Spanned<Vec<Spanned<String>>>>,
    prompts: Option<Spanned<Vec<String>>>,
    prompts_file: Option<Spanned<String>>,
    prepend_bos: Option<bool>,
    device: Option<Spanned<String>>,
    reference: Spanned<String>,
    goldens: Option<Spanned<String>>,
    #[serde(default)]
    spec: Vec<RawSpecEntry>,
    tolerance: Option<RawTolerances>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpecEntry {
    file: Spanned<String>,
    /// A prompt file swapped in for the spec's [prompts] (as `run --prompts`).
    prompts: Option<Spanned<String>>,
    /// The name its goldens are kept under (default: the spec file's stem).
    name: Option<Spanned<String>>,
}

/// Tolerances as written: the keys for every dtype, and per-dtype tables overriding them.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct RawTolerances {
    atol: Option<Spanned<f64>>,
    rtol: Option<Spanned<f64>>,
    max_abs: Option<Spanned<f64>>,
    mse: Option<Spanned<f64>>,
    cosine: Option<Spanned<f64>>,
    kl: Option<Spanned<f64>>,
    top1: Option<Spanned<f64>>,
    value_atol: Option<Spanned<f64>>,
    value_rtol: Option<Spanned<f64>>,
    float32: Option<Box<RawTolerances>>,
    bfloat16: Option<Box<RawTolerances>>,
    float16: Option<Box<RawTolerances>>,
}

/// The thresholds one (model, dtype) is checked with. `None`: the figure is reported, not gated.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Tolerance {
    /// allclose(ours, reference, atol, rtol), elementwise over all logits.
    pub atol: f64,
    pub rtol: f64,
    /// Upper bounds.
    pub max_abs: Option<f64>,
    pub mse: Option<f64>,
    /// KL(ref‖ours) and KL(ours‖ref), each.
    pub kl: Option<f64>,
    /// Lower bounds.
    pub cosine: Option<f64>,
    pub top1: Option<f64>,
    /// Golden Parquet float columns: |ours − golden| ≤ value_atol + value_rtol·|golden|.
    pub value_atol: f64,
    pub value_rtol: f64,
}

impl Default for Tolerance {
    /// f32 defaults: the project's 1e-4 agreement with TransformerLens and HF.
    fn default() -> Self {
        Tolerance {
            atol: 1e-4,
            rtol: 1e-4,
            max_abs: None,
            mse: Some(1e-8),
            kl: Some(1e-6),
            cosine: Some(0.99999),
            top1: Some(1.0),
            value_atol: 1e-4,
            value_rtol: 1e-4,
        }
    }
}

impl RawTolerances {
    fn apply(&self, t: &mut Tolerance) {
        let set = |v: &Option<Spanned<f64>>, dst: &mut f64| {
            if let Some(v) = v {
                *dst = *v.get_ref();
            }
        };
        let set_opt = |v: &Option<Spanned<f64>>, dst: &mut Option<f64>| {
            if let Some(v) = v {
                *dst = Some(*v.get_ref());
            }
        };
        set(&self.atol, &mut t.atol);
        set(&self.rtol, &mut t.rtol);
        set_opt(&self.max_abs, &mut t.max_abs);
        set_opt(&self.mse, &mut t.mse);
        set_opt(&self.kl, &mut t.kl);
        set_opt(&self.cosine, &mut t.cosine);
        set_opt(&self.top1, &mut t.top1);
        set(&self.value_atol, &mut t.value_atol);
        set(&self.value_rtol, &mut t.value_rtol);
    }

    fn for_dtype(&self, dtype: &str) -> Option<&RawTolerances> {
        match dtype {
            "float32" => self.float32.as_deref(),
            "bfloat16" => self.bfloat16.as_deref(),
            "float16" => self.float16.as_deref(),
            _ => None,
        }
    }

    /// Every value given, with its key, for range checks.
    fn values(&self, prefix: &str) -> Vec<(String, &Spanned<f64>)> {
        let mut v: Vec<(String, &Spanned<f64>)> = [
            ("atol", &self.atol),
            ("rtol", &self.rtol),
            ("max_abs", &self.max_abs),
            ("mse", &self.mse),
            ("cosine", &self.cosine),
            ("kl", &self.kl),
            ("top1", &self.top1),
            ("value_atol", &self.value_atol),
            ("value_rtol", &self.value_rtol),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| (format!("{prefix}.{k}"), v)))
        .collect();
        for (d, sub) in [("float32", &self.float32), ("bfloat16", &self.bfloat16), ("float16", &self.float16)] {
            if let Some(s) = sub {
                v.extend(s.values(&format!("{prefix}.{d}")));
            }
        }
        v
    }
}

/// Where a model comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// A hub id at a revision.
    Hub { id: String, revision: String },
    /// A local directory or `.gguf` file (absolute, or relative to the working directory).
    Local(PathBuf),
}

impl Source {
    /// The id `Model::load` takes.
    pub fn model_id(&self) -> String {
        match self {
            Source::Hub { id, .. } => id.clone(),
            Source::Local(p) => p.display().to_string(),
        }
    }
    pub fn revision(&self) -> Option<String> {
        match self {
            Source::Hub { revision, .. } => Some(revision.clone()),
            Source::Local(_) => None,
        }
    }
}

/// One experiment spec run on a model, with its goldens' name.
#[derive(Debug, Clone)]
pub struct SpecEntry {
    pub file: PathBuf,
    pub prompts: Option<PathBuf>,
    pub name: String,
}

/// One checked model of the zoo.
#[derive(Debug, Clone)]
pub struct ZooModel {
    pub name: String,
    pub source: Source,
    pub dtypes: Vec<String>,
    pub prompts: Vec<String>,
    pub prepend_bos: Option<bool>,
    pub device: String,
    pub reference: PathBuf,
    /// Goldens live in `<goldens>/<dtype>/<spec name>/<run>.parquet`.
    pub goldens: Option<PathBuf>,
    pub specs: Vec<SpecEntry>,
    /// Per dtype.
    pub tolerance: BTreeMap<String, Tolerance>,
}

#[derive(Debug, Clone)]
pub struct Zoo {
    pub file: PathBuf,
    pub models: Vec<ZooModel>,
}

fn is_commit(rev: &str) -> bool {
    rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Reads a prompt file: `.txt` (one prompt per line) or the JSONL / pair JSON experiment specs
/// take (their clean prompts).
pub fn read_prompt_file(path: &Path) -> Result<Vec<String>, String> {
    if path.extension().is_some_and(|e| e == "txt") {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let v: Vec<String> = text.lines().filter(|l| !l.trim().is_empty()).map(str::to_string).collect();
        if v.is_empty() {
            return Err(format!("{} holds no prompts", path.display()));
        }
        return Ok(v);
    }
    Ok(crate::spec::prompts::read(path)?.into_iter().map(|p| p.clean).collect())
}

impl Zoo {
    /// Reads a zoo file. With `creating` (check --update) the references and goldens need not
    /// exist yet; otherwise a missing one is an error at its line.
    pub fn read(path: &Path, creating: bool) -> Result<Zoo, SpecErrors> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| SpecErrors::unreadable(&file, &e))?;
        let raw: RawZoo = toml::from_str(&text).map_err(|e| SpecErrors {
            file: file.clone(),
            diagnostics: vec![crate::spec::toml_diagnostic(&text, &e)],
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut cx = Ctx { text: &text, diags: Vec::new() };
        let defaults = raw.defaults.unwrap_or_default();
        if raw.model.is_empty() {
            cx.top("model", "the zoo lists no [[model]]");
        }
        if let Some(t) = &defaults.tolerance {
            check_tolerances(&mut cx, t, "defaults.tolerance");
        }
        let mut names = std::collections::HashSet::new();
        let mut models = Vec::new();
        for m in &raw.model {
            let name = m.name.get_ref().clone();
            if name.is_empty() || name.contains('/') || name.contains(char::is_whitespace) {
                cx.at(
                    &m.name,
                    "model.name",
                    format!("'{name}' cannot name a golden directory: use letters, digits, '-', '_' or '.'"),
                );
            }
            if !names.insert(name.clone()) {
                cx.at(&m.name, "model.name", format!("'{name}' is listed twice"));
            }
            let key = |k: &str| format!("model[{name}].{k}");
            let source = model_source(&mut cx, m, base, &key);
            let dtypes = model_dtypes(&mut cx, m, &defaults, &key);
            let prompts = model_prompts(&mut cx, m, &defaults, base, &key);
            let device = m
                .device
                .as_ref()
                .or(defaults.device.as_ref())
                .map(|d| d.get_ref().clone())
                .unwrap_or_else(|| "cpu".into());
            let reference = base.join(m.reference.get_ref());
            if !creating && !reference.is_file() {
                cx.at(
                    &m.reference,
                    key("reference"),
                    format!("no reference logits at {}: make them with scripts/reference_logits.py (HF transformers) or `tl-run check --update`", reference.display()),
                );
            }
            let (goldens, specs) = model_specs(&mut cx, m, base, creating, &key);
            let tolerance = model_tolerances(&mut cx, m, &defaults, &dtypes, &key);
            if let Some(source) = source {
                models.push(ZooModel {
                    name,
                    source,
                    dtypes,
                    prompts,
                    prepend_bos: m.prepend_bos,
                    device,
                    reference,
                    goldens,
                    specs,
                    tolerance,
                });
            }
        }
        if !cx.diags.is_empty() {
            return Err(SpecErrors { file, diagnostics: cx.diags });
        }
        Ok(Zoo { file: path.to_path_buf(), models })
    }
}

/// A model's source: a hub id pinned to a commit, or a local path that exists.
fn model_source(cx: &mut Ctx<'_>, m: &RawModel, base: &Path, key: &dyn Fn(&str) -> String) -> Option<Source> {
    match (&m.id, &m.path) {
        (Some(id), None) => {
            match &m.revision {
                None => cx.at(id, key("revision"), "a hub model needs revision = \"<40-hex commit>\" (or a branch with allow_moving_revision = true)".to_string()),
                Some(r) if !is_commit(r.get_ref()) && !m.allow_moving_revision => cx.at(
                    r,
                    key("revision"),
                    format!("'{}' is a branch or tag, not a commit: its files can change under the gate; pin the 40-hex commit or set allow_moving_revision = true", r.get_ref()),
                ),
                _ => {}
            }
            Some(Source::Hub {
                id: id.get_ref().clone(),
                revision: m.revision.as_ref().map(|r| r.get_ref().clone()).unwrap_or_else(|| "main".into()),
            })
        }
        (None, Some(p)) => {
            let full = base.join(p.get_ref());
            if m.revision.is_some() {
                cx.at(
                    p,
                    key("revision"),
                    "a local path has no revision; drop revision or use id = \"org/name\"".to_string(),
                );
            }
            if !full.exists() {
                cx.at(p, key("path"), format!("no such model: {}", full.display()));
            }
            Some(Source::Local(full))
        }
        (Some(id), Some(_)) => {
            cx.at(
                id,
                key("id"),
                "give either id (a hub model) or path (a local directory or .gguf), not both".to_string(),
            );
            None
        }
        (None, None) => {
            cx.at(&m.name, key("id"), "give id = \"org/name\" (with revision) or path = \"dir-or.gguf\"".to_string());
            None
        }
    }
}

/// A model's dtypes (its own, the defaults', or float32), each one tl-run runs in.
fn model_dtypes(cx: &mut Ctx<'_>, m: &RawModel, defaults: &RawDefaults, key: &dyn Fn(&str) -> String) -> Vec<String> {
    match m.dtypes.as_ref().or(defaults.dtypes.as_ref()) {
        None => vec!["float32".into()],
        Some(list) => {
            if list.get_ref().is_empty() {
                cx.at(list, key("dtypes"), "no dtypes: list at least one of float32, bfloat16, float16".to_string());
            }
            for d in list.get_ref() {
                if crate::model::config::parse_dtype(d.get_ref()).is_none() {
                    cx.at(
                        d,
                        key("dtypes"),
                        format!("unknown dtype '{}' (valid: {})", d.get_ref(), crate::model::config::DTYPES),
                    );
                }
            }
            list.get_ref().iter().map(|d| d.get_ref().clone()).collect()
        }
    }
}

/// A model's prompts: its own list or file, else the defaults'.
fn model_prompts(
    cx: &mut Ctx<'_>,
    m: &RawModel,
    defaults: &RawDefaults,
    base: &Path,
    key: &dyn Fn(&str) -> String,
) -> Vec<String> {
    match (&m.prompts, &m.prompts_file, &defaults.prompts, &defaults.prompts_file) {
        (Some(p), Some(_), _, _) => {
            cx.at(p, key("prompts"), "give prompts or prompts_file, not both".to_string());
            Vec::new()
        }
        (Some(p), None, _, _) | (None, None, Some(p), _) => {
            if p.get_ref().is_empty() || p.get_ref().iter().any(|s| s.is_empty()) {
                cx.at(p, key("prompts"), "prompts must be a non-empty list of non-empty strings".to_string());
            }
            p.get_ref().clone()
        }
        (None, Some(f), _, _) | (None, None, None, Some(f)) => {
            let full = base.join(f.get_ref());
            match read_prompt_file(&full) {
                Ok(v) => v,
                Err(e) => {
                    cx.at(f, key("prompts_file"), e);
                    Vec::new()
                }
            }
        }
        (None, None, None, None) => {
            cx.at(
                &m.name,
                key("prompts"),
                "no prompts: give prompts = [...] or prompts_file here or in [defaults]".to_string(),
            );
            Vec::new()
        }
    }
}

/// A model's goldens directory and the specs whose Parquet it holds (each under its own name).
fn model_specs(
    cx: &mut Ctx<'_>,
    m: &RawModel,
    base: &Path,
    creating: bool,
    key: &dyn Fn(&str) -> String,
) -> (Option<PathBuf>, Vec<SpecEntry>) {
    let goldens = m.goldens.as_ref().map(|g| base.join(g.get_ref()));
    if !m.spec.is_empty() && goldens.is_none() {
        cx.at(
            &m.name,
            key("goldens"),
            "the model runs specs but has no goldens = \"dir\" to compare their Parquet with".to_string(),
        );
    }
    if let (Some(g), Some(gs)) = (&goldens, &m.goldens) {
        if !creating && !m.spec.is_empty() && !g.is_dir() {
            cx.at(gs, key("goldens"), format!("no goldens at {}: make them with `tl-run check --update`", g.display()));
        }
    }
    let mut specs = Vec::new();
    let mut spec_names = std::collections::HashSet::new();
    for s in &m.spec {
        let file = base.join(s.file.get_ref());
        if !file.is_file() {
            cx.at(&s.file, key("spec.file"), format!("no such spec: {}", file.display()));
        }
        let prompts = s.prompts.as_ref().map(|p| {
            let full = base.join(p.get_ref());
            if !full.is_file() {
                cx.at(p, key("spec.prompts"), format!("no such prompt file: {}", full.display()));
            }
            full
        });
        let name = match &s.name {
            Some(n) => n.get_ref().clone(),
            None => file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
        };
        if !spec_names.insert(name.clone()) {
            cx.at(
                s.name.as_ref().unwrap_or(&s.file),
                key("spec.name"),
                format!("two specs keep goldens under '{name}': give one a name = \"...\""),
            );
        }
        specs.push(SpecEntry { file, prompts, name });
    }
    (goldens, specs)
}

/// A model's tolerance per dtype: the defaults', then its own, each overridden per dtype.
fn model_tolerances(
    cx: &mut Ctx<'_>,
    m: &RawModel,
    defaults: &RawDefaults,
    dtypes: &[String],
    key: &dyn Fn(&str) -> String,
) -> BTreeMap<String, Tolerance> {
    if let Some(t) = &m.tolerance {
        check_tolerances(cx, t, &key("tolerance"));
    }
    let mut tolerance = BTreeMap::new();
    for d in dtypes {
        let mut t = Tolerance::default();
        for raw in [defaults.tolerance.as_ref(), m.tolerance.as_ref()].into_iter().flatten() {
            raw.apply(&mut t);
            if let Some(per) = raw.for_dtype(d) {
                per.apply(&mut t);
            }
        }
        tolerance.insert(d.clone(), t);
    }
    tolerance
}

fn check_tolerances(cx: &mut Ctx<'_>, t: &RawTolerances, prefix: &str) {
    for (key, v) in t.values(prefix) {
        let x = *v.get_ref();
        let bounded = key.ends_with("cosine") || key.ends_with("top1");
        if !x.is_finite() || x < 0.0 || (bounded && x > 1.0) {
            let valid = if bounded { "a number in [0, 1]" } else { "a finite number ≥ 0" };
            cx.at(v, key, format!("{x} is not a tolerance: use {valid}"));
        }
    }
}
