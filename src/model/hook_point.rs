//! Hook points: the named places in the forward pass where activations can be read or changed.
//! `Display` and `FromStr` are exactly TransformerLens's names, so a name printed here can be
//! pasted into Python and the other way round; parsing is strict and suggests the nearest names.
use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// Which of a norm's two hooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NormHook {
    Scale,
    Normalized,
}

/// A hook point inside block `l`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Site {
    ResidPre,
    /// The residual stream copied per head before ln1 (TransformerLens's split q/k/v inputs,
    /// `set_use_split_qkv_input`): [batch, pos, heads, d_model], key and value inputs per
    /// key-value head. Computed only when captured by name or edited (edge attribution's
    /// receivers), never by capture-everything.
    QInput,
    KInput,
    VInput,
    Ln1(NormHook),
    Q,
    K,
    V,
    /// Qwen3's per-head query/key RMSNorm; TransformerLens hooks these [batch, head, pos, ..].
    QNorm(NormHook),
    QNormed,
    KNorm(NormHook),
    KNormed,
    RotQ,
    RotK,
    AttnScores,
    Pattern,
    Z,
    Result,
    /// Gemma 2's norm on the attention output (hook_attn_out is its output).
    Ln1Post(NormHook),
    AttnOut,
    ResidMid,
    /// The residual the MLP's norm reads (`set_use_hook_mlp_in`): resid_mid, or resid_pre in a
    /// parallel block. Like the split inputs, only when asked for by name or edited.
    MlpIn,
    Ln2(NormHook),
    MlpPre,
    MlpPreLinear,
    MlpPost,
    Ln2Post(NormHook),
    MlpOut,
    ResidPost,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HookPoint {
    /// Bloom's embedding LayerNorm (before hook_embed, which is its output).
    EmbedLn(NormHook),
    Embed,
    PosEmbed,
    Block(usize, Site),
    LnFinal(NormHook),
}

/// Every block site with its name after `blocks.{l}.`, in forward order. One table serves
/// printing and parsing, so the two cannot disagree.
pub const SITE_NAMES: &[(Site, &str)] = &[
    (Site::ResidPre, "hook_resid_pre"),
    (Site::QInput, "hook_q_input"),
    (Site::KInput, "hook_k_input"),
    (Site::VInput, "hook_v_input"),
    (Site::Ln1(NormHook::Scale), "ln1.hook_scale"),
    (Site::Ln1(NormHook::Normalized), "ln1.hook_normalized"),
    (Site::Q, "attn.hook_q"),
    (Site::K, "attn.hook_k"),
    (Site::V, "attn.hook_v"),
    (Site::QNorm(NormHook::Scale), "attn.q_norm.hook_scale"),
    (Site::QNorm(NormHook::Normalized), "attn.q_norm.hook_normalized"),
    (Site::QNormed, "attn.hook_q_normed"),
    (Site::KNorm(NormHook::Scale), "attn.k_norm.hook_scale"),
    (Site::KNorm(NormHook::Normalized), "attn.k_norm.hook_normalized"),
    (Site::KNormed, "attn.hook_k_normed"),
    (Site::RotQ, "attn.hook_rot_q"),
    (Site::RotK, "attn.hook_rot_k"),
    (Site::AttnScores, "attn.hook_attn_scores"),
    (Site::Pattern, "attn.hook_pattern"),
    (Site::Z, "attn.hook_z"),
    (Site::Result, "attn.hook_result"),
    (Site::Ln1Post(NormHook::Scale), "ln1_post.hook_scale"),
    (Site::Ln1Post(NormHook::Normalized), "ln1_post.hook_normalized"),
    (Site::AttnOut, "hook_attn_out"),
    (Site::ResidMid, "hook_resid_mid"),
    (Site::MlpIn, "hook_mlp_in"),
    (Site::Ln2(NormHook::Scale), "ln2.hook_scale"),
    (Site::Ln2(NormHook::Normalized), "ln2.hook_normalized"),
    (Site::MlpPre, "mlp.hook_pre"),
    (Site::MlpPreLinear, "mlp.hook_pre_linear"),
    (Site::MlpPost, "mlp.hook_post"),
    (Site::Ln2Post(NormHook::Scale), "ln2_post.hook_scale"),
    (Site::Ln2Post(NormHook::Normalized), "ln2_post.hook_normalized"),
    (Site::MlpOut, "hook_mlp_out"),
    (Site::ResidPost, "hook_resid_post"),
];

/// TransformerLens `utils.get_act_name` short forms, for specs ("resid_pre" + a layer).
pub const SHORT_NAMES: &[(&str, Site)] = &[
    ("resid_pre", Site::ResidPre),
    ("resid_mid", Site::ResidMid),
    ("resid_post", Site::ResidPost),
    ("attn_out", Site::AttnOut),
    ("mlp_out", Site::MlpOut),
    ("q", Site::Q),
    ("k", Site::K),
    ("v", Site::V),
    ("rot_q", Site::RotQ),
    ("rot_k", Site::RotK),
    ("z", Site::Z),
    ("result", Site::Result),
    ("attn_scores", Site::AttnScores),
    ("attn", Site::Pattern),
    ("pattern", Site::Pattern),
    ("pre", Site::MlpPre),
    ("pre_linear", Site::MlpPreLinear),
    ("post", Site::MlpPost),
    ("mlp_pre", Site::MlpPre),
    ("mlp_post", Site::MlpPost),
];

impl Site {
    /// Made only when asked for by name (TransformerLens's flagged hooks): the split q/k/v inputs
    /// and hook_mlp_in.
    pub fn only_by_name(self) -> bool {
        matches!(self, Site::QInput | Site::KInput | Site::VInput | Site::MlpIn)
    }

    pub fn name(self) -> &'static str {
        SITE_NAMES.iter().find(|(s, _)| *s == self).map(|(_, n)| *n).expect("every site is in SITE_NAMES")
    }

    /// The site a `get_act_name` short form names, if any.
    pub fn from_short(name: &str) -> Option<Site> {
        SHORT_NAMES.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
    }

    /// True for sites whose tensors have a head axis.
    pub fn has_heads(self) -> bool {
        matches!(
            self,
            Site::Q
                | Site::K
                | Site::V
                | Site::QNorm(_)
                | Site::QNormed
                | Site::KNorm(_)
                | Site::KNormed
                | Site::RotQ
                | Site::RotK
                | Site::AttnScores
                | Site::Pattern
                | Site::Z
                | Site::Result
                | Site::QInput
                | Site::KInput
                | Site::VInput
        )
    }

    /// True for [batch, head, query, key] tensors (the head axis comes before positions).
    pub fn is_attention_map(self) -> bool {
        matches!(self, Site::AttnScores | Site::Pattern)
    }
}

impl HookPoint {
    pub fn layer(self) -> Option<usize> {
        match self {
            HookPoint::Block(l, _) => Some(l),
            _ => None,
        }
    }

    pub fn site(self) -> Option<Site> {
        match self {
            HookPoint::Block(_, s) => Some(s),
            _ => None,
        }
    }
}

impl fmt::Display for HookPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HookPoint::EmbedLn(NormHook::Scale) => f.write_str("embed_ln.hook_scale"),
            HookPoint::EmbedLn(NormHook::Normalized) => f.write_str("embed_ln.hook_normalized"),
            HookPoint::Embed => f.write_str("hook_embed"),
            HookPoint::PosEmbed => f.write_str("hook_pos_embed"),
            HookPoint::Block(l, s) => write!(f, "blocks.{l}.{}", s.name()),
            HookPoint::LnFinal(NormHook::Scale) => f.write_str("ln_final.hook_scale"),
            HookPoint::LnFinal(NormHook::Normalized) => f.write_str("ln_final.hook_normalized"),
        }
    }
}

/// Parses the grammar of names without knowing a model; `Model::hook_point` also checks that the
/// point exists in that model (layer in range, rotary hooks only on rotary models...).
impl FromStr for HookPoint {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self> {
        let parsed = match name {
            "hook_embed" => Some(HookPoint::Embed),
            "embed_ln.hook_scale" => Some(HookPoint::EmbedLn(NormHook::Scale)),
            "embed_ln.hook_normalized" => Some(HookPoint::EmbedLn(NormHook::Normalized)),
            "hook_pos_embed" => Some(HookPoint::PosEmbed),
            "ln_final.hook_scale" => Some(HookPoint::LnFinal(NormHook::Scale)),
            "ln_final.hook_normalized" => Some(HookPoint::LnFinal(NormHook::Normalized)),
            _ => name.strip_prefix("blocks.").and_then(|rest| {
                let (layer, site) = rest.split_once('.')?;
                if layer.len() > 1 && layer.starts_with('0') {
                    return None;
                }
                let layer: usize = layer.parse().ok()?;
                let site = SITE_NAMES.iter().find(|(_, n)| *n == site)?.0;
                Some(HookPoint::Block(layer, site))
            }),
        };
        parsed.ok_or_else(|| Error::UnknownHook { name: name.to_string(), suggestions: Vec::new() })
    }
}

/// Levenshtein distance, for "did you mean" suggestions.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// The up-to-three candidates closest to `name`, closest first.
pub fn nearest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut scored: Vec<(usize, &str)> = candidates.into_iter().map(|c| (edit_distance(name, c), c)).collect();
    scored.sort();
    let best = scored.first().map(|(d, _)| *d).unwrap_or(0);
    scored.into_iter().take_while(|(d, _)| *d <= best + 1).take(3).map(|(_, c)| c.to_string()).collect()
}

/// A model's hook points follow from its config alone (what `tl-run hooks` lists without
/// loading weights).
impl crate::model::config::ModelConfig {
    /// Every hook point of this model in forward order (hook_result included: it is computed
    /// only when captured or edited). The split inputs (hook_q_input, hook_k_input,
    /// hook_v_input) and hook_mlp_in are not listed: like TransformerLens without its
    /// use_split_qkv_input and use_hook_mlp_in flags, a forward makes them only when one is asked
    /// for by name (edge attribution), and capturing everything does not.
    pub fn hook_points(&self) -> Vec<HookPoint> {
        let mut out = Vec::new();
        if self.embed_norm {
            out.extend([HookPoint::EmbedLn(NormHook::Scale), HookPoint::EmbedLn(NormHook::Normalized)]);
        }
        out.push(HookPoint::Embed);
        if self.has_pos_embed() {
            out.push(HookPoint::PosEmbed);
        }
        for l in 0..self.n_layers {
            out.extend(
                SITE_NAMES
                    .iter()
                    .filter(|(s, _)| self.has_site(*s) && !s.only_by_name())
                    .map(|(s, _)| HookPoint::Block(l, *s)),
            );
        }
        out.push(HookPoint::LnFinal(NormHook::Scale));
        out.push(HookPoint::LnFinal(NormHook::Normalized));
        out
    }

    /// Parses a TransformerLens hook name and checks that this model has it; the error names the
    /// nearest valid names or the valid layer range.
    pub fn hook_point(&self, name: &str) -> Result<HookPoint> {
        let point = match name.parse::<HookPoint>() {
            Ok(p) => p,
            Err(_) => {
                let names: Vec<String> = self.hook_points().iter().map(|p| p.to_string()).collect();
                return Err(Error::UnknownHook {
                    name: name.into(),
                    suggestions: nearest(name, names.iter().map(|s| s.as_str())),
                });
            }
        };
        match point {
            HookPoint::Block(l, _) if l >= self.n_layers => Err(Error::AbsentHook {
                name: name.into(),
                why: format!("the model has {} layers: 0-{}", self.n_layers, self.n_layers - 1),
            }),
            HookPoint::Block(_, s) if !self.has_site(s) => {
                Err(Error::AbsentHook { name: name.into(), why: format!("no {} in this architecture", s.name()) })
            }
            HookPoint::PosEmbed if !self.has_pos_embed() => Err(Error::AbsentHook {
                name: name.into(),
                why: "this model has no learned position embedding (rotary or ALiBi)".into(),
            }),
            HookPoint::EmbedLn(_) if !self.embed_norm => {
                Err(Error::AbsentHook { name: name.into(), why: "this model has no embedding norm".into() })
            }
            p => Ok(p),
        }
    }

    /// The shape of `point`'s activation for a [batch, seq] input.
    pub fn hook_shape(&self, point: HookPoint, batch: i64, seq: i64) -> Vec<i64> {
        let c = self;
        let (d, h, kv, e, m) =
            (c.d_model as i64, c.n_heads as i64, c.n_kv_heads as i64, c.d_head as i64, c.mlp.d_mlp as i64);
        match point {
            HookPoint::Embed | HookPoint::PosEmbed => vec![batch, seq, d],
            HookPoint::LnFinal(NormHook::Scale) | HookPoint::EmbedLn(NormHook::Scale) => vec![batch, seq, 1],
            HookPoint::LnFinal(NormHook::Normalized) | HookPoint::EmbedLn(NormHook::Normalized) => vec![batch, seq, d],
            HookPoint::Block(_, s) => match s {
                Site::Ln1(NormHook::Scale)
                | Site::Ln2(NormHook::Scale)
                | Site::Ln1Post(NormHook::Scale)
                | Site::Ln2Post(NormHook::Scale) => {
                    vec![batch, seq, 1]
                }
                Site::QNorm(NormHook::Scale) => vec![batch, h, seq, 1],
                Site::KNorm(NormHook::Scale) => vec![batch, kv, seq, 1],
                Site::QNorm(NormHook::Normalized) | Site::QNormed => vec![batch, h, seq, e],
                Site::KNorm(NormHook::Normalized) | Site::KNormed => vec![batch, kv, seq, e],
                Site::Q | Site::RotQ | Site::Z => vec![batch, seq, h, e],
                Site::K | Site::V | Site::RotK => vec![batch, seq, kv, e],
                Site::AttnScores | Site::Pattern => vec![batch, h, seq, seq],
                Site::Result | Site::QInput => vec![batch, seq, h, d],
                Site::KInput | Site::VInput => vec![batch, seq, kv, d],
                Site::MlpPre | Site::MlpPreLinear | Site::MlpPost => vec![batch, seq, m],
                _ => vec![batch, seq, d],
            },
        }
    }
}

/// Sites serialise as their TransformerLens name after `blocks.{l}.` (e.g. "attn.hook_z").
impl serde::Serialize for Site {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_round_trips() {
        let mut points = vec![HookPoint::Embed, HookPoint::PosEmbed];
        points.extend([NormHook::Scale, NormHook::Normalized].map(HookPoint::LnFinal));
        points.extend([NormHook::Scale, NormHook::Normalized].map(HookPoint::EmbedLn));
        for (site, _) in SITE_NAMES {
            points.push(HookPoint::Block(11, *site));
        }
        for p in points {
            assert_eq!(p.to_string().parse::<HookPoint>().unwrap(), p);
        }
        assert_eq!(HookPoint::Block(3, Site::Z).to_string(), "blocks.3.attn.hook_z");
    }

    #[test]
    fn malformed_names_are_rejected() {
        for bad in ["blocks.01.hook_resid_pre", "blocks.x.hook_resid_pre", "blocks.1.hook_resid", "hook_z", ""] {
            assert!(bad.parse::<HookPoint>().is_err(), "{bad}");
        }
    }

    #[test]
    fn nearest_names_are_suggested() {
        let names = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.0.attn.hook_z"];
        assert_eq!(nearest("blocks.0.hook_resid_pr", names)[0], "blocks.0.hook_resid_pre");
    }
}
