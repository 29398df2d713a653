//! The spec file as written: plain serde structs with spans on every value an error may point
//! at. `kind` fields are plain strings dispatched by hand, because serde's tagged enums lose spans.
use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSpec {
    pub name: Spanned<String>,
    pub model: RawModel,
    pub prompts: Option<Spanned<RawPrompts>>,
    pub corruption: Option<RawCorruption>,
    pub metric: Option<RawMetric>,
    #[serde(default)]
    pub run: Vec<RawRun>,
    pub output: Option<RawOutput>,
    /// Run on (recording where in the manifest) when weights, activations or results hold NaN/inf.
    pub allow_nonfinite: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    pub id: Spanned<String>,
    pub revision: Option<String>,
    pub dtype: Option<Spanned<String>>,
    pub device: Option<Spanned<String>>,
    /// Several devices: one model replica each, independent jobs spread over them.
    pub devices: Option<Spanned<Vec<Spanned<String>>>>,
    /// With devices: one model split by layers over them instead of a replica on each.
    pub split_layers: Option<Spanned<bool>>,
    pub fold_ln: Option<bool>,
    pub center_writing_weights: Option<bool>,
    pub center_unembed: Option<bool>,
    pub fold_value_biases: Option<bool>,
    pub prepend_bos: Option<bool>,
    /// "fused" (libtorch's kernel where no hook reads attention's steps) or "explicit".
    pub attention: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrompts {
    pub clean: Option<Spanned<Vec<String>>>,
    pub answers: Option<Spanned<Vec<Spanned<Vec<String>>>>>,
    /// JSONL ({"clean", "answers"} or {"prompt", "answer", "wrong_answer"} per line) or
    /// AutoCircuit-style JSON ({"prompts": [{"clean", "corrupt", "answers", "wrong_answers"}]}).
    pub file: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCorruption {
    pub kind: Spanned<String>,
    pub prompts: Option<Spanned<Vec<String>>>,
    /// replace_tokens: words replaced in every prompt, {from = to}.
    pub replace: Option<Spanned<std::collections::BTreeMap<String, String>>>,
    /// noise: Gaussian noise on the token embeddings at these token positions or words.
    pub positions: Option<Spanned<Vec<i64>>>,
    pub words: Option<Spanned<Vec<String>>>,
    /// noise: standard deviations of the embedding matrix (3.0, as ROME).
    pub noise: Option<Spanned<f64>>,
    pub samples: Option<Spanned<i64>>,
    pub seed: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetric {
    pub kind: Spanned<String>,
    #[serde(default)]
    pub normalize: bool,
    #[serde(default)]
    pub per_prompt: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRun {
    pub name: Spanned<String>,
    pub kind: Spanned<String>,
    #[serde(default)]
    pub hooks: Vec<Spanned<String>>,
    pub over: Option<Spanned<Vec<String>>>,
    pub layers: Option<Spanned<Vec<i64>>>,
    // attribution_patching
    pub qk_fix: Option<bool>,
    pub grad_drop: Option<bool>,
    pub verify_top: Option<Spanned<i64>>,
    // logit_lens
    pub incl_mid: Option<bool>,
    pub top_k: Option<Spanned<i64>>,
    pub top_k_at: Option<Spanned<String>>,
    // head_scores
    pub patterns: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    pub custom: Vec<RawCustomPattern>,
    pub error_measure: Option<Spanned<String>>,
    pub exclude_bos: Option<bool>,
    pub exclude_current_token: Option<bool>,
    pub source: Option<Spanned<String>>,
    pub seq_len: Option<Spanned<i64>>,
    pub batch: Option<Spanned<i64>>,
    pub seed: Option<Spanned<i64>>,
    pub token_range: Option<Spanned<Vec<i64>>>,
    // ablation
    pub method: Option<Spanned<String>>,
    pub units: Option<Spanned<Vec<Vec<i64>>>>,
    pub top_dla_heads: Option<Spanned<i64>>,
    pub positions: Option<Spanned<Vec<i64>>>,
    pub measure: Option<Spanned<String>>,
    pub dataset: Option<Spanned<String>>,
}

/// A head_scores detection pattern of the spec's own: a matrix or a rule.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCustomPattern {
    pub name: Spanned<String>,
    pub matrix: Option<Spanned<Vec<Vec<f64>>>>,
    /// "same_token" (attend `offset` after an earlier copy of the current token) or "relative"
    /// (attend `offset` tokens back).
    pub rule: Option<Spanned<String>>,
    pub offset: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutput {
    pub dir: Spanned<String>,
    /// Write `<dir>/report.html` (and `figures/`) after the run.
    pub report: Option<bool>,
}
