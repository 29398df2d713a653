//! Raw spec → checked `Spec`. Every problem found is collected (not just the first), with the
//! line, column and key it comes from, the bad value and what would be valid.
use std::path::{Path, PathBuf};

use toml::Spanned;

use crate::engine::metric::{MetricKind, WrongAnswers};
use crate::model::config::Processing;
use crate::model::hook_point::nearest;
use crate::model::AttentionKernel;
use crate::spec::corruption::{replace_words, resolve_prompts, Corruption};
use crate::spec::prompts::PromptPair;
use crate::spec::raw::*;
use crate::spec::{line_col, Diagnostic, SpecErrors};

#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelSpec {
    pub id: String,
    pub revision: Option<String>,
    pub processing: Processing,
    /// None: what TransformerLens's to_tokens does for the model's family.
    pub prepend_bos: Option<bool>,
    pub device: String,
    /// `devices = [...]`: one replica per device, jobs run concurrently (empty: `device` alone).
    pub devices: Vec<String>,
    /// `split_layers = true`: one model split by layers over `devices` instead of replicas.
    pub split_layers: bool,
    /// float32 | bfloat16 | float16: weights are processed in f32, then cast to this.
    pub dtype: String,
    /// How z is computed where no hook reads attention's steps. Recorded (and keyed) only when
    /// not the default, so manifests and keys of default runs did not change when it was added.
    #[serde(skip_serializing_if = "AttentionKernel::is_fused")]
    pub attention: AttentionKernel,
}

impl ModelSpec {
    /// The spec's prepend_bos, else the family default (the config is known only after loading).
    pub fn kind(&self) -> crate::error::Result<tch::Kind> {
        crate::model::config::parse_dtype(&self.dtype).ok_or_else(|| {
            crate::error::Error::Config(format!(
                "unknown dtype '{}' (valid: {})",
                self.dtype,
                crate::model::config::DTYPES
            ))
        })
    }

    pub fn prepend_bos_for(&self, cfg: &crate::model::config::ModelConfig) -> bool {
        self.prepend_bos.unwrap_or(cfg.default_prepend_bos)
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct MetricSpec {
    pub kind: MetricKind,
    pub normalize: bool,
    pub per_prompt: bool,
    /// Recorded (and keyed) only when not the default, so keys of earlier specs stay as they were.
    #[serde(skip_serializing_if = "WrongAnswers::is_mean")]
    pub wrong: WrongAnswers,
    /// The role whose position the metric reads (None: the last position).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<String>,
}

impl MetricSpec {
    /// Whether the metric is a direction in the residual stream (what DLA and the logit lens's
    /// answer rows read): not a KL divergence, nor a max over wrong answers.
    pub fn is_linear(&self) -> bool {
        self.kind.is_linear() && self.wrong == WrongAnswers::Mean
    }
}

/// What spec resolution asks of a resolved run. The runs' kinds live above the spec
/// (crate::kinds), which hands them in through `RunKinds`.
pub trait Run: Clone + std::fmt::Debug + serde::Serialize {
    fn name(&self) -> &str;
    fn kind_name(&self) -> &'static str;
    /// Which of the spec's sections the run reads.
    fn reads(&self) -> Reads;
}

/// The spec's sections a run reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reads {
    /// The spec's prompts (tokenized).
    pub prompts: bool,
    /// Corrupted prompts (or noise).
    pub corruption: bool,
    /// The metric's answers.
    pub answers: bool,
    /// The metric as a direction in the residual stream (a linear metric).
    pub metric_direction: bool,
}

/// The run kinds, as spec resolution sees them: each [[run]]'s options read from the text by
/// its kind, then resolved (problems reported on `cx`, None when there were any).
pub trait RunKinds {
    type Run: Run;
    /// A run's options as written.
    type Options;
    /// The options of every [[run]] of `text`, one per entry of `runs` (serde's errors, e.g. a
    /// value of the wrong type, as TOML errors).
    fn read(&self, text: &str, runs: &[RawRun]) -> Result<Vec<Self::Options>, toml::de::Error>;
    fn resolve(&self, cx: &mut Ctx, raw: &RawRun, options: &Self::Options, i: usize, base: &Path) -> Option<Self::Run>;
}

/// A resolved spec: its sections, and its runs as the kinds resolved them (`kinds::Spec`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Spec<R> {
    pub name: String,
    pub model: ModelSpec,
    pub prompts: Vec<PromptPair>,
    pub corruption: Corruption,
    pub metric: MetricSpec,
    pub runs: Vec<R>,
    pub output_dir: PathBuf,
    /// sha256 of the spec file's bytes.
    pub spec_hash: String,
    /// `[output] report = true`: write the HTML report after the run.
    pub report: bool,
    /// `[output] shared_scale = true`: the report draws all heatmaps of a run on one colour
    /// scale. Recorded in the manifest's spec, where `tl-run report` reads it, only when true, so
    /// manifests of specs without it did not change when it was added.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub shared_scale: bool,
    /// The spec file, for messages.
    pub file: String,
    /// Go on (recording them in the manifest) when NaN/inf appear; stop with an error otherwise.
    pub allow_nonfinite: bool,
}

impl<R: Run> Spec<R> {
    /// Re-derives corrupted prompts after the prompts were replaced (--prompts): replace_tokens
    /// is applied again; explicit corrupted prompts must come with the new prompts.
    pub fn apply_corruption_to_prompts(&mut self) -> Result<(), String> {
        if self.metric.kind.needs_incorrect() {
            if let (Some(run), Some(i)) =
                (self.runs.iter().find(|r| r.reads().answers), self.prompts.iter().position(|p| p.incorrect.is_none()))
            {
                return Err(format!(
                    "{} has no incorrect answer, but run '{}' ({}) measures {}, which needs one for every prompt; add \"answers\": [correct, incorrect] (or \"wrong_answer\", or \"wrong_answers\": [...]) or use metric logprob/prob",
                    self.prompts[i].name(i),
                    run.name(),
                    run.kind_name(),
                    metric_name(self.metric.kind)
                ));
            }
        }
        match &self.corruption {
            Corruption::ReplaceTokens(pairs) => {
                if let Some(&i) = replace_words(&mut self.prompts, pairs).first() {
                    return Err(format!(
                        "prompt {i} contains none of the words to replace: {:?}",
                        self.prompts[i].clean
                    ));
                }
            }
            Corruption::Prompts if self.prompts.iter().any(|p| p.corrupted.is_none()) => {
                return Err(
                    "the spec's corruption is kind = \"prompts\": every prompt in the file needs a corrupted prompt"
                        .into(),
                );
            }
            Corruption::Slots(_) => {
                return Err(
                    "the spec's corruption is kind = \"slots\", which redraws its templates' slots: prompts from --prompts have none; use a spec with kind = \"prompts\" and corrupted prompts in the file".into(),
                )
            }
            Corruption::SwapPairs if !self.prompts.len().is_multiple_of(2) => {
                return Err(format!("swap_pairs needs an even number of prompts, got {}", self.prompts.len()))
            }
            _ => {}
        }
        Ok(())
    }
}

/// Collects the problems of one spec file, each located at its line and column.
pub struct Ctx<'a> {
    pub(crate) text: &'a str,
    pub(crate) diags: Vec<Diagnostic>,
}

impl Ctx<'_> {
    pub(crate) fn at<T>(&mut self, v: &Spanned<T>, key: impl Into<String>, message: impl Into<String>) {
        self.at_offset(v.span().start, key, message);
    }
    pub(crate) fn at_offset(&mut self, offset: usize, key: impl Into<String>, message: impl Into<String>) {
        let (line, col) = line_col(self.text, offset);
        self.diags.push(Diagnostic { line, col, key: key.into(), message: message.into() });
    }
    pub(crate) fn top(&mut self, key: &str, message: impl Into<String>) {
        self.diags.push(Diagnostic { line: 1, col: 1, key: key.into(), message: message.into() });
    }
}

/// A string option that is one of `options` (its default when not given).
pub(crate) fn choice<T: Copy>(
    cx: &mut Ctx,
    v: &Option<Spanned<String>>,
    key: String,
    options: &[(&str, T)],
    default: T,
) -> T {
    let Some(v) = v else { return default };
    match options.iter().find(|(n, _)| *n == v.get_ref()) {
        Some((_, t)) => *t,
        None => {
            let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
            cx.at(
                v,
                key,
                format!(
                    "unknown value '{}' (valid: {}); did you mean '{}'?",
                    v.get_ref(),
                    names.join(", "),
                    nearest(v.get_ref(), names.iter().copied())[0]
                ),
            );
            default
        }
    }
}

/// An integer option of at least `min` (its default when not given).
pub(crate) fn positive(cx: &mut Ctx, v: &Option<Spanned<i64>>, key: String, default: i64, min: i64) -> i64 {
    match v {
        None => default,
        Some(x) if *x.get_ref() < min => {
            cx.at(x, key, format!("must be at least {min}, got {}", x.get_ref()));
            default
        }
        Some(x) => *x.get_ref(),
    }
}

/// Reads and resolves a spec file, its runs through `kinds`, with the prompts read from
/// `prompts_file` instead of the spec's own `prompts.file` when given (the `--prompts` flag: the
/// spec's file need not exist where the override is given, e.g. a spec copied away from the
/// repository it names a file in). Relative paths in it are relative to the file.
pub fn resolve_file<K: RunKinds>(
    path: &Path,
    prompts_file: Option<&Path>,
    kinds: &K,
) -> Result<Spec<K::Run>, SpecErrors> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| SpecErrors::unreadable(&file, &e))?;
    let base = path.parent().unwrap_or(Path::new("."));
    resolve_text(&text, &file, base, prompts_file, kinds)
}

/// Resolves a spec's text; see `resolve_file`.
pub fn resolve_text<K: RunKinds>(
    text: &str,
    file: &str,
    base: &Path,
    prompts_file: Option<&Path>,
    kinds: &K,
) -> Result<Spec<K::Run>, SpecErrors> {
    let fail = |diagnostics| SpecErrors { file: file.to_string(), diagnostics };
    let raw: RawSpec = toml::from_str(text).map_err(|e| fail(vec![crate::spec::toml_diagnostic(text, &e)]))?;
    let options = kinds.read(text, &raw.run).map_err(|e| fail(vec![crate::spec::toml_diagnostic(text, &e)]))?;
    let mut cx = Ctx { text, diags: Vec::new() };
    let spec_hash = {
        use sha2::Digest;
        format!("{:x}", sha2::Sha256::digest(text.as_bytes()))
    };
    let model = resolve_model(&mut cx, &raw.model);
    let (prompts, corruption) = resolve_prompts(&mut cx, &raw, base, prompts_file);
    let metric = resolve_metric(&mut cx, raw.metric.as_ref());
    check_metric_role(&mut cx, &metric, raw.metric.as_ref(), &prompts);
    let mut runs = Vec::new();
    let mut names = std::collections::HashSet::new();
    if raw.run.is_empty() {
        cx.top("run", "the spec has no [[run]] entries");
    }
    for (i, (r, options)) in raw.run.iter().zip(&options).enumerate() {
        let key = |k: &str| format!("run[{i}].{k}");
        if !names.insert(r.name.get_ref().clone()) {
            cx.at(&r.name, key("name"), format!("run name '{}' is used twice", r.name.get_ref()));
        }
        if let Err(why) = crate::output::atomic::check_file_stem(r.name.get_ref()) {
            cx.at(&r.name, key("name"), format!("run name {:?} {why} (it names the run's output file <output.dir>/<name>.parquet); use letters, digits, '-', '_' or '.'", r.name.get_ref()));
        }
        if let Some(run) = kinds.resolve(&mut cx, r, options, i, base) {
            let (at, reads, kind) = (r.kind.span().start, run.reads(), run.kind_name());
            if reads.prompts && prompts.is_empty() && raw.prompts.is_none() {
                cx.at_offset(at, key("kind"), format!("{kind} runs read prompts: add a [prompts] section"));
            }
            if reads.corruption && corruption.is_none() {
                cx.at_offset(
                    at,
                    key("kind"),
                    format!(
                        "{kind} runs need a [corruption] section (kind = swap_pairs, prompts, replace_tokens or noise)"
                    ),
                );
            }
            if reads.answers && metric.kind.needs_incorrect() && prompts.iter().any(|p| p.incorrect.is_none()) {
                cx.at_offset(at, key("kind"), format!("{kind} runs with metric {} need an incorrect answer for every prompt ([correct, incorrect], or wrong_answers)", metric_name(metric.kind)));
            }
            if let (true, Some(role)) = (reads.metric_direction, &metric.position) {
                cx.at_offset(at, key("kind"), format!("{kind} reads the residual stream at the last position, and [metric] position = \"{role}\" reads another; drop the position or this run"));
            }
            if reads.metric_direction && !metric.is_linear() {
                cx.at_offset(at, key("kind"), format!("{kind} reads the metric as a direction in the residual stream (W_U's answer columns), which metric {}{} is not; use logit_diff (wrong = \"mean\"), logprob, prob or prob_diff", metric_name(metric.kind), if metric.wrong == WrongAnswers::Max { " with wrong = \"max\"" } else { "" }));
            }
            runs.push(run);
        }
    }
    let output_dir = match &raw.output {
        Some(o) => base.join(o.dir.get_ref()),
        None => base.join("results").join(raw.name.get_ref()),
    };
    if !cx.diags.is_empty() {
        return Err(fail(cx.diags));
    }
    let corruption = corruption.unwrap_or(Corruption::SwapPairs);
    let report = raw.output.as_ref().and_then(|o| o.report).unwrap_or(false);
    let shared_scale = raw.output.as_ref().and_then(|o| o.shared_scale).unwrap_or(false);
    Ok(Spec {
        name: raw.name.into_inner(),
        model,
        prompts,
        corruption,
        metric,
        runs,
        output_dir,
        spec_hash,
        report,
        shared_scale,
        file: file.to_string(),
        allow_nonfinite: raw.allow_nonfinite.unwrap_or(false),
    })
}

/// `[metric] position` names a role every prompt has.
fn check_metric_role(cx: &mut Ctx, metric: &MetricSpec, raw: Option<&RawMetric>, prompts: &[PromptPair]) {
    let (Some(role), Some(at)) = (&metric.position, raw.and_then(|m| m.position.as_ref())) else { return };
    let every = |r: &str| prompts.iter().all(|q| q.roles.iter().any(|(s, _)| s == r));
    let known: Vec<&str> =
        prompts.first().map_or(Vec::new(), |p| p.roles.iter().map(|(r, _)| r.as_str()).filter(|r| every(r)).collect());
    if known.is_empty() {
        cx.at(
            at,
            "metric.position",
            format!("role '{role}': the prompts have no roles; roles come from [prompts] templates"),
        );
    } else if !known.contains(&role.as_str()) {
        cx.at(
            at,
            "metric.position",
            format!(
                "role '{role}' is not in every prompt (roles: {}, END); did you mean '{}'?",
                known.join(", "),
                nearest(role, known.iter().copied())[0]
            ),
        );
    }
}

/// A metric's name as the spec writes it.
pub fn metric_name(kind: MetricKind) -> &'static str {
    MetricKind::NAMES.iter().find(|(_, k)| *k == kind).map_or("?", |(n, _)| n)
}

/// The [metric] section (logit_diff when none is given).
fn resolve_metric(cx: &mut Ctx, metric: Option<&RawMetric>) -> MetricSpec {
    match metric {
        None => MetricSpec {
            kind: MetricKind::LogitDiff,
            normalize: false,
            per_prompt: false,
            wrong: WrongAnswers::Mean,
            position: None,
        },
        Some(m) => {
            let kind =
                choice(cx, &Some(m.kind.clone()), "metric.kind".into(), &MetricKind::NAMES, MetricKind::LogitDiff);
            let wrong = choice(
                cx,
                &m.wrong,
                "metric.wrong".into(),
                &[("mean", WrongAnswers::Mean), ("max", WrongAnswers::Max)],
                WrongAnswers::Mean,
            );
            if let (Some(w), false) = (&m.wrong, kind == MetricKind::LogitDiff) {
                cx.at(w, "metric.wrong", format!("folds several wrong answers into one logit, which only logit_diff reads; metric {} does not (drop the key)", metric_name(kind)));
            }
            // END is the last position, where the metric reads anyway.
            let position = m.position.as_ref().map(|p| p.get_ref().clone()).filter(|p| p != "END");
            MetricSpec { kind, normalize: m.normalize, per_prompt: m.per_prompt, wrong, position }
        }
    }
}

fn resolve_model(cx: &mut Ctx, m: &RawModel) -> ModelSpec {
    if let Some(d) = &m.dtype {
        if crate::model::config::parse_dtype(d.get_ref()).is_none() {
            cx.at(
                d,
                "model.dtype",
                format!("unknown dtype '{}' (valid: {})", d.get_ref(), crate::model::config::DTYPES),
            );
        }
    }
    let device = m.device.as_ref().map(|d| d.get_ref().clone()).unwrap_or_else(|| "cpu".into());
    let known =
        |d: &str| d == "cpu" || d == "cuda" || d.strip_prefix("cuda:").is_some_and(|n| n.parse::<usize>().is_ok());
    if let Some(d) = &m.device {
        if !known(d.get_ref()) {
            cx.at(d, "model.device", format!("unknown device '{}' (valid: cpu, cuda, cuda:N)", d.get_ref()));
        }
    }
    if let (Some(s), None) = (&m.split_layers, &m.devices) {
        if *s.get_ref() {
            cx.at(
                s,
                "model.split_layers",
                "needs model.devices, the devices to split the layers over, e.g. devices = [\"cuda:0\", \"cpu\"]",
            );
        }
    }
    let mut devices = Vec::new();
    if let Some(list) = &m.devices {
        if list.get_ref().is_empty() {
            cx.at(
                list,
                "model.devices",
                "is empty; list at least one device, e.g. [\"cuda:0\", \"cuda:1\"], or drop the key",
            );
        }
        if let Some(d) = &m.device {
            cx.at(d, "model.device", "is given together with model.devices; keep one of them");
        }
        for d in list.get_ref() {
            if known(d.get_ref()) {
                devices.push(d.get_ref().clone());
            } else {
                cx.at(d, "model.devices", format!("unknown device '{}' (valid: cpu, cuda, cuda:N)", d.get_ref()));
            }
        }
    }
    let tl = Processing::TRANSFORMER_LENS;
    ModelSpec {
        id: m.id.get_ref().clone(),
        revision: m.revision.clone(),
        processing: Processing {
            fold_ln: m.fold_ln.unwrap_or(tl.fold_ln),
            center_writing_weights: m.center_writing_weights.unwrap_or(tl.center_writing_weights),
            center_unembed: m.center_unembed.unwrap_or(tl.center_unembed),
            fold_value_biases: m.fold_value_biases.unwrap_or(tl.fold_value_biases),
        },
        prepend_bos: m.prepend_bos,
        device: devices.first().cloned().unwrap_or(device),
        split_layers: m.split_layers.as_ref().is_some_and(|s| *s.get_ref()),
        devices,
        dtype: m.dtype.as_ref().map(|d| d.get_ref().clone()).unwrap_or_else(|| "float32".into()),
        attention: choice(
            cx,
            &m.attention,
            "model.attention".into(),
            &[("fused", AttentionKernel::Fused), ("explicit", AttentionKernel::Explicit)],
            AttentionKernel::Fused,
        ),
    }
}
