//! The spec file as written: plain serde structs with spans on every value an error may point
//! at. `kind` fields are plain strings dispatched by hand, because serde's tagged enums lose spans.
use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSpec {
    pub name: Spanned<String>,
    pub model: RawModel,
    pub prompts: RawPrompts,
    pub corruption: Option<RawCorruption>,
    pub metric: Option<RawMetric>,
    #[serde(default)]
    pub run: Vec<RawRun>,
    pub output: Option<RawOutput>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    pub id: Spanned<String>,
    pub revision: Option<String>,
    pub dtype: Option<Spanned<String>>,
    pub device: Option<Spanned<String>>,
    pub fold_ln: Option<bool>,
    pub center_writing_weights: Option<bool>,
    pub center_unembed: Option<bool>,
    pub fold_value_biases: Option<bool>,
    pub prepend_bos: Option<bool>,
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
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutput {
    pub dir: Spanned<String>,
}
