//! Raw spec → checked `Spec`. Every problem found is collected (not just the first), with the
//! line, column and key it comes from, the bad value and what would be valid.
use std::path::{Path, PathBuf};

use toml::Spanned;

use crate::engine::metric::MetricKind;
use crate::analysis::head_detector::Detection;
use crate::model::config::Processing;
use crate::model::AttentionKernel;
use crate::spec::corruption::{replace_words, resolve_prompts, Corruption};
use crate::spec::prompts::PromptPair;
use crate::spec::raw::*;
pub use crate::kinds::options::RunKind;
use crate::kinds::options::{resolve_kind, HeadSource};
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
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RunSpec {
    pub name: String,
    pub kind: RunKind,
    /// Only these layers (all when None), with the spec line and column they were given at.
    pub layers: Option<Vec<usize>>,
    pub layers_at: Option<(usize, usize)>,
    /// Where the options checked against the model were given (top_k, units, seq_len,
    /// token_range), by key, as (line, column).
    pub keys_at: std::collections::BTreeMap<&'static str, (usize, usize)>,
}

impl RunSpec {
    /// Checks the run's layers against a model with `n_layers` layers.
    pub fn check_layers(&self, n_layers: usize, file: &str) -> Result<(), String> {
        let Some(layers) = &self.layers else { return Ok(()) };
        if let Some(bad) = layers.iter().find(|&&l| l >= n_layers) {
            let (line, col) = self.layers_at.unwrap_or((0, 0));
            return Err(format!(
                "{file}:{line}:{col}: run '{}': layer {bad} is out of range: the model has {n_layers} layers: 0-{}",
                self.name,
                n_layers - 1
            ));
        }
        Ok(())
    }

    /// `file:line:col` of one of the run's keys, or the file alone when the key was not given.
    fn key_at(&self, key: &str, file: &str) -> String {
        self.keys_at.get(key).map(|(l, c)| format!("{file}:{l}:{c}")).unwrap_or_else(|| file.to_string())
    }

    /// Checks the run against the model's config, before any weights are loaded: its layers,
    /// logit_lens's top_k against the vocabulary, ablation units against the layers, heads and
    /// neurons, and repeated random tokens against the context and the vocabulary. Every
    /// problem, one per line.
    pub fn check_model(&self, cfg: &crate::model::config::ModelConfig, file: &str) -> Result<(), String> {
        let mut problems = Vec::new();
        if let Err(e) = self.check_layers(cfg.n_layers, file) {
            problems.push(e);
        }
        let at = |key: &str| self.key_at(key, file);
        if let RunKind::ActivationPatching { targets } | RunKind::AttributionPatching { targets, .. } = &self.kind {
            for (site, _) in targets.iter().filter(|(s, _)| !cfg.has_site(*s)) {
                problems.push(format!(
                    "{file}: run '{}': a {} model has no {} (its attention and MLP read the same residual)",
                    self.name,
                    cfg.family,
                    site.name()
                ));
            }
        }
        match &self.kind {
            RunKind::LogitLens { top_k, .. } if *top_k > cfg.d_vocab => problems.push(format!(
                "{}: run '{}': top_k = {top_k} is more tokens than the model's vocabulary of {}; use at most {}",
                at("top_k"),
                self.name,
                cfg.d_vocab,
                cfg.d_vocab
            )),
            RunKind::Ablation(a) => {
                use crate::model::hook_point::Site;
                let (max, what) = match a.site {
                    Site::Z => (cfg.n_heads as i64, "heads"),
                    Site::MlpPost => (cfg.mlp.d_mlp as i64, "neurons"),
                    _ => (1, ""),
                };
                for u in a.units.iter().flatten() {
                    if u.layer >= cfg.n_layers || u.index.is_some_and(|i| i < 0 || i >= max) {
                        let unit =
                            u.index.map(|i| format!("[{}, {i}]", u.layer)).unwrap_or_else(|| format!("[{}]", u.layer));
                        let per =
                            if what.is_empty() { String::new() } else { format!(" of {max} {what} (0-{})", max - 1) };
                        problems.push(format!(
                            "{}: run '{}': unit {unit} is out of range: the model has {} layers (0-{}){per}",
                            at("units"),
                            self.name,
                            cfg.n_layers,
                            cfg.n_layers - 1
                        ));
                    }
                }
            }
            RunKind::HeadScores {
                source: crate::kinds::options::HeadSource::RepeatedRandom { seq_len, batch, token_range, .. },
                ..
            } => {
                // The random tokens twice (no BOS, as the Exploratory Analysis demo's stripes).
                let needed = 2 * *seq_len as usize;
                // Every layer's pattern [batch, heads, 2·seq_len, 2·seq_len] is kept (f32 at
                // least): past the host's memory the run could only end out of memory.
                let per_row = (cfg.n_layers * cfg.n_heads) as u64 * (needed as u64).pow(2) * 4;
                if let Some(host) = crate::engine::memory::past_host_memory((*batch as u64).checked_mul(per_row)) {
                    problems.push(format!(
                        "{}: run '{}': batch = {batch} rows of repeated tokens keep {} layers × {} heads of {needed}×{needed} attention patterns, {:.1} MiB a row, more than this machine's {:.1} GiB of memory; {}",
                        at("batch"),
                        self.name,
                        cfg.n_layers,
                        cfg.n_heads,
                        per_row as f64 / (1u64 << 20) as f64,
                        host as f64 / (1u64 << 30) as f64,
                        match host / per_row.max(1) {
                            0 => "use a smaller seq_len (not even one row fits)".to_string(),
                            most => format!("use batch ≤ {most}"),
                        }
                    ));
                }
                if needed > cfg.n_ctx {
                    problems.push(format!(
                        "{}: run '{}': seq_len = {seq_len} makes {needed} tokens (twice {seq_len}), more than the model's context of {}; use seq_len ≤ {}",
                        at("seq_len"),
                        self.name,
                        cfg.n_ctx,
                        cfg.n_ctx / 2
                    ));
                }
                if let Some((_, hi)) = token_range {
                    if *hi as usize > cfg.d_vocab {
                        problems.push(format!(
                            "{}: run '{}': token_range ends at {hi}, past the model's vocabulary of {}",
                            at("token_range"),
                            self.name,
                            cfg.d_vocab
                        ));
                    }
                }
            }
            _ => {}
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("\n"))
        }
    }

    /// Checks the run against the prompts' token lengths (`seq` the longest, `lengths` each
    /// prompt's): ablation positions, custom detection matrices. One problem per line.
    pub fn check_positions(&self, seq: usize, lengths: &[usize], file: &str) -> Result<(), String> {
        if let RunKind::HeadScores { detections, source: HeadSource::Prompts, .. } = &self.kind {
            return self.check_matrix_sizes(detections, lengths, file);
        }
        let RunKind::Ablation(a) = &self.kind else { return Ok(()) };
        let bad: Vec<i64> = a.positions.iter().flatten().copied().filter(|&p| p < 0 || p as usize >= seq).collect();
        if bad.is_empty() {
            return Ok(());
        }
        let at = self.key_at("positions", file);
        Err(format!(
            "{at}: run '{}': positions {bad:?} are out of range: the prompts have {seq} tokens (0-{})",
            self.name,
            seq.saturating_sub(1)
        ))
    }

    /// A custom matrix scores prompts of its own token count (head_detector scores each prompt
    /// unpadded), so every prompt must have that many tokens.
    fn check_matrix_sizes(
        &self,
        detections: &[(String, Detection)],
        lengths: &[usize],
        file: &str,
    ) -> Result<(), String> {
        let at = self.key_at("custom", file);
        let mut problems = Vec::new();
        for (name, d) in detections {
            let Detection::Matrix(rows) = d else { continue };
            let other: Vec<String> = lengths
                .iter()
                .enumerate()
                .filter(|(_, &t)| t != rows.len())
                .map(|(p, t)| format!("prompt {p} is {t}"))
                .collect();
            if !other.is_empty() {
                let shown = match lengths.first() {
                    Some(t) if other.len() == lengths.len() && lengths.iter().all(|l| l == t) => {
                        format!("the prompts are {t}")
                    }
                    _ if other.len() > 3 => format!("{}, … ({} prompts)", other[..3].join(", "), other.len()),
                    _ => other.join(", "),
                };
                problems.push(format!(
                    "{at}: run '{}': custom pattern '{name}' is a {n}x{n} matrix, so it scores prompts of {n} tokens (BOS included), but {shown}; give prompts of that length or a matrix of theirs",
                    self.name,
                    n = rows.len()
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("\n"))
        }
    }

    /// The layers the run covers: its `layers`, else all `n_layers`.
    pub fn layers_or_all(&self, n_layers: usize) -> Vec<usize> {
        self.layers.clone().unwrap_or_else(|| (0..n_layers).collect())
    }

    pub fn kind_name(&self) -> &'static str {
        self.kind.name()
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Spec {
    pub name: String,
    pub model: ModelSpec,
    pub prompts: Vec<PromptPair>,
    pub corruption: Corruption,
    pub metric: MetricSpec,
    pub runs: Vec<RunSpec>,
    pub output_dir: PathBuf,
    /// sha256 of the spec file's bytes.
    pub spec_hash: String,
    /// `[output] report = true`: write the HTML report after the run.
    pub report: bool,
    /// The spec file, for messages.
    pub file: String,
    /// Go on (recording them in the manifest) when NaN/inf appear; stop with an error otherwise.
    pub allow_nonfinite: bool,
}

impl Spec {
    /// Re-derives corrupted prompts after the prompts were replaced (--prompts): replace_tokens
    /// is applied again; explicit corrupted prompts must come with the new prompts.
    pub fn apply_corruption_to_prompts(&mut self) -> Result<(), String> {
        if self.metric.kind == MetricKind::LogitDiff {
            if let (Some(run), Some(i)) = (
                self.runs.iter().find(|r| r.kind.needs_answers()),
                self.prompts.iter().position(|p| p.incorrect.is_none()),
            ) {
                return Err(format!(
                    "prompt {i} has no incorrect answer, but run '{}' ({}) measures logit_diff, which needs one for every prompt; add \"answers\": [correct, incorrect] (or \"wrong_answer\") or use metric logprob/prob",
                    run.name,
                    run.kind.name()
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
            Corruption::SwapPairs if !self.prompts.len().is_multiple_of(2) => {
                return Err(format!("swap_pairs needs an even number of prompts, got {}", self.prompts.len()))
            }
            _ => {}
        }
        Ok(())
    }
}

pub(crate) struct Ctx<'a> {
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

/// Reads and resolves a spec file. Relative paths in it are relative to the file.
pub fn resolve_file(path: &Path) -> Result<Spec, SpecErrors> {
    resolve_file_with_prompts(path, None)
}

/// Like `resolve_file`, with the prompts read from `prompts_file` instead of the spec's own
/// `prompts.file` (the `--prompts` flag): the spec's file need not exist where the override is
/// given, e.g. a spec copied away from the repository it names a file in.
pub fn resolve_file_with_prompts(path: &Path, prompts_file: Option<&Path>) -> Result<Spec, SpecErrors> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| SpecErrors::unreadable(&file, &e))?;
    let base = path.parent().unwrap_or(Path::new("."));
    resolve_text_with_prompts(&text, &file, base, prompts_file)
}

pub fn resolve_text(text: &str, file: &str, base: &Path) -> Result<Spec, SpecErrors> {
    resolve_text_with_prompts(text, file, base, None)
}

fn resolve_text_with_prompts(
    text: &str,
    file: &str,
    base: &Path,
    prompts_file: Option<&Path>,
) -> Result<Spec, SpecErrors> {
    let fail = |diagnostics| SpecErrors { file: file.to_string(), diagnostics };
    let raw: RawSpec = toml::from_str(text).map_err(|e| fail(vec![crate::spec::toml_diagnostic(text, &e)]))?;
    let mut cx = Ctx { text, diags: Vec::new() };
    let spec_hash = {
        use sha2::Digest;
        format!("{:x}", sha2::Sha256::digest(text.as_bytes()))
    };
    let model = resolve_model(&mut cx, &raw.model);
    let (prompts, corruption) = resolve_prompts(&mut cx, &raw, base, prompts_file);
    let metric = match &raw.metric {
        None => MetricSpec { kind: MetricKind::LogitDiff, normalize: false, per_prompt: false },
        Some(m) => {
            let kind = match m.kind.get_ref().as_str() {
                "logit_diff" => MetricKind::LogitDiff,
                "logprob" => MetricKind::Logprob,
                "prob" => MetricKind::Prob,
                other => {
                    cx.at(
                        &m.kind,
                        "metric.kind",
                        format!("unknown metric '{other}' (valid: logit_diff, logprob, prob)"),
                    );
                    MetricKind::LogitDiff
                }
            };
            MetricSpec { kind, normalize: m.normalize, per_prompt: m.per_prompt }
        }
    };
    let mut runs = Vec::new();
    let mut names = std::collections::HashSet::new();
    if raw.run.is_empty() {
        cx.top("run", "the spec has no [[run]] entries");
    }
    for (i, r) in raw.run.iter().enumerate() {
        let key = |k: &str| format!("run[{i}].{k}");
        if !names.insert(r.name.get_ref().clone()) {
            cx.at(&r.name, key("name"), format!("run name '{}' is used twice", r.name.get_ref()));
        }
        if let Err(why) = crate::output::atomic::check_file_stem(r.name.get_ref()) {
            cx.at(&r.name, key("name"), format!("run name {:?} {why} (it names the run's output file <output.dir>/<name>.parquet); use letters, digits, '-', '_' or '.'", r.name.get_ref()));
        }
        let layers = match &r.layers {
            Some(l) if l.get_ref().iter().any(|&x| x < 0) => {
                cx.at(l, key("layers"), format!("layers must be non-negative, got {:?}", l.get_ref()));
                None
            }
            Some(l) => Some(l.get_ref().iter().map(|&x| x as usize).collect()),
            None => None,
        };
        let layers_at = r.layers.as_ref().map(|l| line_col(cx.text, l.span().start));
        let mut keys_at = std::collections::BTreeMap::new();
        for (k, span) in [
            ("top_k", r.top_k.as_ref().map(|v| v.span())),
            ("units", r.units.as_ref().map(|v| v.span())),
            ("seq_len", r.seq_len.as_ref().map(|v| v.span())),
            ("batch", r.batch.as_ref().map(|v| v.span())),
            ("token_range", r.token_range.as_ref().map(|v| v.span())),
            ("positions", r.positions.as_ref().map(|v| v.span())),
            ("custom", r.custom.first().map(|c| c.name.span())),
        ] {
            if let Some(span) = span {
                keys_at.insert(k, line_col(cx.text, span.start));
            }
        }
        if let Some(kind) = resolve_kind(&mut cx, r, i, base) {
            let at = r.kind.span().start;
            if kind.needs_prompts() && prompts.is_empty() && raw.prompts.is_none() {
                cx.at_offset(at, key("kind"), format!("{} runs read prompts: add a [prompts] section", kind.name()));
            }
            if kind.needs_corruption() && corruption.is_none() {
                cx.at_offset(
                    at,
                    key("kind"),
                    format!(
                        "{} runs need a [corruption] section (kind = swap_pairs, prompts, replace_tokens or noise)",
                        kind.name()
                    ),
                );
            }
            if kind.needs_answers()
                && metric.kind == MetricKind::LogitDiff
                && prompts.iter().any(|p| p.incorrect.is_none())
            {
                cx.at_offset(at, key("kind"), format!("{} runs with metric logit_diff need an incorrect answer for every prompt ([correct, incorrect])", kind.name()));
            }
            runs.push(RunSpec { name: r.name.get_ref().clone(), kind, layers, layers_at, keys_at });
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
        file: file.to_string(),
        allow_nonfinite: raw.allow_nonfinite.unwrap_or(false),
    })
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
        attention: crate::kinds::options::choice(
            cx,
            &m.attention,
            "model.attention".into(),
            &[("fused", AttentionKernel::Fused), ("explicit", AttentionKernel::Explicit)],
            AttentionKernel::Fused,
        ),
    }
}
