//! NaN and infinity: where they first appear (a weight, a hook of the forward pass, a baseline, a
//! result row), so a run can stop with that place named — or, with `allow_nonfinite = true`,
//! record it in the manifest and go on.
use tch::{Kind, Tensor};

use crate::engine::forward::{Input, Stop};
use crate::engine::hooks::Hooks;
use crate::error::Result;
use crate::model::hook_point::{HookPoint, Site};
use crate::model::Model;

/// One place non-finite values were found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Finding {
    /// "weight", "activation", "baseline" or "result".
    pub kind: String,
    /// The weight, hook or run name.
    #[serde(rename = "where")]
    pub at: String,
    /// How many values are NaN or ±inf there.
    pub count: i64,
    /// For activations: the first prompt and position holding one.
    pub prompt: Option<i64>,
    pub position: Option<i64>,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} non-finite value(s) in {} {}", self.count, self.kind, self.at)?;
        if let (Some(p), Some(q)) = (self.prompt, self.position) {
            write!(f, " (first at prompt {p}, position {q})")?;
        }
        Ok(())
    }
}

/// How many values of `t` are NaN or ±inf. Attention scores hold -inf where the causal mask
/// is, by design: `allow_neg_inf` skips those.
fn bad_mask(t: &Tensor, allow_neg_inf: bool) -> Tensor {
    let t = t.to_kind(Kind::Float);
    let bad = t.isfinite().logical_not();
    if allow_neg_inf {
        bad.logical_and(&t.isneginf().logical_not())
    } else {
        bad
    }
}

fn count(mask: &Tensor) -> i64 {
    mask.sum(Kind::Int64).int64_value(&[])
}

/// The first weight (in forward order) holding a NaN or inf.
pub fn first_in_weights(model: &Model) -> Option<Finding> {
    model.weights.named().into_iter().find_map(|(name, t)| {
        // One reduction per tensor, allocating nothing: a NaN or inf anywhere makes the sum
        // non-finite. Only then (or when finite weights overflow the f32 sum) the exact check.
        let sum_finite = t.sum(tch::Kind::Float).isfinite().int64_value(&[]) != 0;
        if sum_finite || t.isfinite().all().int64_value(&[]) != 0 {
            return None;
        }
        let n = count(&bad_mask(t, false));
        (n > 0).then(|| Finding { kind: "weight".into(), at: name, count: n, prompt: None, position: None })
    })
}

/// Runs `tokens` capturing every hook and returns the first hook (in forward order) holding a
/// NaN or inf, with the first prompt and position it is at.
pub fn first_in_activations(model: &Model, tokens: &Tensor, mask: Option<&Tensor>) -> Result<Option<Finding>> {
    let mut hooks = Hooks::capture_all();
    let logits = model.run(Input::Tokens(tokens), mask, &mut hooks, Stop::Logits)?;
    for point in model.hook_points() {
        let Some(t) = hooks.cache.get(&point) else { continue };
        let scores = matches!(point, HookPoint::Block(_, Site::AttnScores));
        let bad = bad_mask(t, scores);
        let n = count(&bad);
        if n == 0 {
            continue;
        }
        // Every activation is [batch, pos, ...] except the head-major q/k norms [batch, head, pos, ...].
        let head_major =
            matches!(point, HookPoint::Block(_, Site::QNorm(_) | Site::QNormed | Site::KNorm(_) | Site::KNormed));
        let idx = bad.nonzero();
        let (prompt, position) = if idx.size()[0] > 0 {
            let first: Vec<i64> = Vec::try_from(idx.get(0)).unwrap_or_default();
            (first.first().copied(), first.get(if head_major { 2 } else { 1 }).copied())
        } else {
            (None, None)
        };
        return Ok(Some(Finding { kind: "activation".into(), at: point.to_string(), count: n, prompt, position }));
    }
    let n = count(&bad_mask(&logits, false));
    Ok((n > 0).then(|| Finding {
        kind: "activation".into(),
        at: "logits".into(),
        count: n,
        prompt: None,
        position: None,
    }))
}
