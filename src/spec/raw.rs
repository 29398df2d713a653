//! The spec file as written: plain serde structs with spans on every value an error may point
//! at. `kind` fields are plain strings dispatched by hand, because serde's tagged enums lose spans;
//! a [[run]]'s options are read by its kind (`read_runs`).
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
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
    /// Each prompt's incorrect answers as a token set; with it, `answers` gives the correct sets.
    pub wrong_answers: Option<Spanned<Vec<Spanned<Vec<String>>>>>,
    /// Templates with {SLOT}s, filled from `slots` (`count` prompts drawn with `seed`); their
    /// answers are templates too (`answer = "{IO}"`, `wrong_answer = "{S}"`).
    pub templates: Option<Spanned<Vec<String>>>,
    pub slots: Option<Spanned<std::collections::BTreeMap<String, Vec<String>>>>,
    pub answer: Option<Spanned<String>>,
    pub wrong_answer: Option<Spanned<String>>,
    pub count: Option<Spanned<i64>>,
    pub seed: Option<Spanned<i64>>,
    /// JSONL ({"clean", "answers"} or {"prompt", "answer", "wrong_answer"} per line) or
    /// AutoCircuit-style JSON ({"prompts": [{"clean", "corrupt", "answers", "wrong_answers"}]}).
    pub file: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCorruption {
    pub kind: Spanned<String>,
    pub prompts: Option<Spanned<Vec<String>>>,
    /// slots: the template slots drawn again for the corrupted prompt (IOI's ABC: ["IO", "S"]).
    pub slots: Option<Spanned<Vec<String>>>,
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
    /// logit_diff against several incorrect answers: "mean" (default) or "max" of their logits.
    pub wrong: Option<Spanned<String>>,
    /// The role whose position's prediction is read (template prompts; default END, the last).
    pub position: Option<Spanned<String>>,
    #[serde(default)]
    pub normalize: bool,
    #[serde(default)]
    pub per_prompt: bool,
}

/// A [[run]] table as the spec reads it: its name and kind, and the keys given with where each
/// key is. The kind's own options are read from the same text by the kind (`read_runs`),
/// which knows their types: serde cannot pick a struct by a field's value and keep spans.
#[derive(Debug)]
pub struct RawRun {
    pub name: Spanned<String>,
    pub kind: Spanned<String>,
    /// One row per prompt besides the mean, for this run (else [metric] per_prompt).
    pub per_prompt: Option<bool>,
    /// Every other key, with its offset.
    pub keys: Vec<(String, usize)>,
}

impl<'de> Deserialize<'de> for RawRun {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Table;
        impl<'de> Visitor<'de> for Table {
            type Value = RawRun;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a [[run]] table")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawRun, A::Error> {
                let (mut name, mut kind, mut per_prompt, mut keys) = (None, None, None, Vec::new());
                // Keys are spanned (values of dotted keys are not): an unknown key is reported
                // at itself, whatever its value.
                while let Some(key) = map.next_key::<Spanned<String>>()? {
                    match key.get_ref().as_str() {
                        "name" => name = Some(map.next_value::<Spanned<String>>()?),
                        "kind" => kind = Some(map.next_value::<Spanned<String>>()?),
                        "per_prompt" => per_prompt = Some(map.next_value::<bool>()?),
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                            let at = key.span().start;
                            keys.push((key.into_inner(), at));
                        }
                    }
                }
                Ok(RawRun {
                    name: name.ok_or_else(|| de::Error::missing_field("name"))?,
                    kind: kind.ok_or_else(|| de::Error::missing_field("kind"))?,
                    per_prompt,
                    keys,
                })
            }
        }
        d.deserialize_map(Table)
    }
}

/// The [[run]] tables of a spec's text again, each read by its own seed (its kind's options
/// struct): serde's errors come back as TOML errors with their spans.
pub fn read_runs<S, T>(text: &str, seeds: Vec<S>) -> Result<Vec<T>, toml::de::Error>
where
    S: for<'de> DeserializeSeed<'de, Value = T>,
{
    struct Doc<S>(Vec<S>);
    impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for Doc<S> {
        type Value = Vec<S::Value>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_map(self)
        }
    }
    impl<'de, S: DeserializeSeed<'de>> Visitor<'de> for Doc<S> {
        type Value = Vec<S::Value>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a spec")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let (mut seeds, mut out) = (Some(self.0), Vec::new());
            while let Some(key) = map.next_key::<String>()? {
                match (key.as_str(), seeds.take()) {
                    ("run", Some(s)) => out = map.next_value_seed(Runs(s))?,
                    (_, s) => {
                        seeds = s;
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(out)
        }
    }
    struct Runs<S>(Vec<S>);
    impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for Runs<S> {
        type Value = Vec<S::Value>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_seq(self)
        }
    }
    impl<'de, S: DeserializeSeed<'de>> Visitor<'de> for Runs<S> {
        type Value = Vec<S::Value>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("[[run]] tables")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::with_capacity(self.0.len());
            for s in self.0 {
                match seq.next_element_seed(s)? {
                    Some(v) => out.push(v),
                    None => break,
                }
            }
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(out)
        }
    }
    Doc(seeds).deserialize(toml::Deserializer::new(text))
}

/// The field names of a struct that derives Deserialize (what `deserialize_struct` is told): a
/// kind's option keys come from its options struct, never from a second list.
pub fn field_names<T: for<'de> Deserialize<'de>>() -> &'static [&'static str] {
    struct Fields(Option<&'static [&'static str]>);
    #[derive(Debug)]
    struct Stop;
    impl std::fmt::Display for Stop {
        fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("fields read")
        }
    }
    impl std::error::Error for Stop {}
    impl de::Error for Stop {
        fn custom<M: std::fmt::Display>(_: M) -> Self {
            Stop
        }
    }
    impl<'de> Deserializer<'de> for &mut Fields {
        type Error = Stop;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            Err(Stop)
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Stop> {
            self.0 = Some(fields);
            Err(Stop)
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
            unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
        }
    }
    let mut fields = Fields(None);
    let _ = T::deserialize(&mut fields);
    fields.0.unwrap_or(&[])
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutput {
    pub dir: Spanned<String>,
    /// Write `<dir>/report.html` (and `figures/`) after the run.
    pub report: Option<bool>,
    /// The report draws all heatmaps of a run on one colour scale.
    pub shared_scale: Option<bool>,
}
