//! What the manifest records of the prompts, as the figures use it: the corrupted baseline a
//! patched probability's colours diverge around, and the positions the corruption changes.
//!
//! The manifest's `tokens` holds every prompt's token ids without padding ("clean",
//! "corrupted": null for noise corruption, whose corrupted run reads the clean tokens); its
//! `metric` the clean and corrupted baselines, mean and per prompt. Noised positions are known
//! only where the spec lists them (`corruption.positions`): those found from
//! `corruption.words` are not recorded, so they cannot be marked.
use std::collections::BTreeSet;

use serde_json::Value;

use crate::output::figure::RunFacts;

/// The facts every run's figures share (a run adds its own Pearson r).
pub fn run_facts(m: &Value, changed: &ChangedTokens) -> RunFacts {
    let (centre, centres) = metric_centres(m);
    let prompts = centres.len().max(changed.positions.len());
    let per_prompt = (0..prompts)
        .map(|p| (centres.get(p).copied().flatten().or(centre), changed.padded(p).unwrap_or_default()))
        .collect();
    RunFacts {
        pearson_by_hook: Vec::new(),
        metric_centre: centre,
        corrupted_positions: changed.any_padded(),
        per_prompt,
        ..RunFacts::default()
    }
}

/// The value a patched metric's colours diverge around, for the mean and per prompt: the
/// corrupted baseline (the metric when patching restores nothing) of `prob` and `logprob`,
/// whose 0 is no reference point (a probability's lowest value, a log-probability's highest).
/// None (around 0) for logit_diff, whose 0 is where the two answers tie, as the TransformerLens
/// demos draw it; for a normalised metric, whose corrupted baseline is 0 already; and where the
/// manifest has no baseline.
pub fn metric_centres(m: &Value) -> (Option<f64>, Vec<Option<f64>>) {
    let kind = m.pointer("/spec/metric/kind").or_else(|| m.pointer("/metric/kind")).and_then(Value::as_str);
    let normalised = m
        .pointer("/spec/metric/normalize")
        .or_else(|| m.pointer("/metric/normalize"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if normalised || !matches!(kind, Some("prob" | "logprob")) {
        return (None, Vec::new());
    }
    let finite = |v: Option<f64>| v.filter(|v| v.is_finite());
    let mean = finite(m.pointer("/metric/corrupted_baseline").and_then(Value::as_f64));
    let all: Vec<Option<f64>> = m
        .pointer("/metric/corrupted_per_prompt")
        .and_then(Value::as_array)
        .map(|a| a.iter().map(|v| finite(v.as_f64())).collect())
        .unwrap_or_default();
    // With noise corruption each prompt has several corrupted runs (samples), prompt-fastest:
    // run s·n + p is sample s of prompt p, as the patching kinds average them.
    let n = prompt_count(m);
    if n == 0 || all.is_empty() || !all.len().is_multiple_of(n) {
        return (mean, Vec::new());
    }
    let per_prompt = (0..n)
        .map(|p| {
            let runs: Option<Vec<f64>> = all.iter().skip(p).step_by(n).copied().collect();
            runs.filter(|r| !r.is_empty()).map(|r| r.iter().sum::<f64>() / r.len() as f64)
        })
        .collect();
    (mean, per_prompt)
}

fn prompt_count(m: &Value) -> usize {
    m.pointer("/spec/prompts").or_else(|| m.pointer("/tokens/clean")).and_then(Value::as_array).map_or(0, Vec::len)
}

/// Each prompt's positions the corruption changes, counted in the prompt's own tokens, and its
/// left padding in the batch (rows count positions with it).
#[derive(Debug, Clone, Default)]
pub struct ChangedTokens {
    pub positions: Vec<BTreeSet<usize>>,
    pub padding: Vec<usize>,
}

impl ChangedTokens {
    /// Where each corrupted prompt's tokens differ from its clean one's or, for noise
    /// corruption, the positions the spec noises; nothing when the manifest records no tokens.
    pub fn read(m: &Value) -> ChangedTokens {
        let Some(clean) = token_ids(m, "clean") else { return ChangedTokens::default() };
        let seq = clean.iter().map(Vec::len).max().unwrap_or(0);
        let padding: Vec<usize> = clean.iter().map(|c| seq - c.len()).collect();
        let positions: Vec<BTreeSet<usize>> = match token_ids(m, "corrupted") {
            Some(corrupted) => clean
                .iter()
                .enumerate()
                .map(|(p, c)| {
                    let k = corrupted.get(p);
                    (0..c.len()).filter(|&i| k.and_then(|k| k.get(i)) != Some(&c[i])).collect()
                })
                .collect(),
            None if m.pointer("/tokens/noised").is_some_and(Value::is_array) => token_ids(m, "noised")
                .unwrap_or_default()
                .iter()
                .map(|p| p.iter().map(|&i| i as usize).collect())
                .collect(),
            None => {
                let noised: Vec<usize> = m
                    .pointer("/spec/corruption/noise/positions")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(Value::as_u64).map(|i| i as usize).collect())
                    .unwrap_or_default();
                clean.iter().map(|c| noised.iter().copied().filter(|&i| i < c.len()).collect()).collect()
            }
        };
        ChangedTokens { positions, padding }
    }

    /// Prompt `p`'s changed positions as the rows count them (left padding included); None for a
    /// prompt the manifest does not have.
    pub fn padded(&self, p: usize) -> Option<BTreeSet<usize>> {
        let pad = self.padding.get(p).copied().unwrap_or(0);
        self.positions.get(p).map(|s| s.iter().map(|i| i + pad).collect())
    }

    /// The positions any prompt changes, as the rows count them: what the mean rows' figures
    /// mark, their values being means over every prompt.
    pub fn any_padded(&self) -> BTreeSet<usize> {
        (0..self.positions.len()).filter_map(|p| self.padded(p)).flatten().collect()
    }
}

/// The manifest's `tokens.<which>`: each prompt's token ids; None where it records none.
fn token_ids(m: &Value, which: &str) -> Option<Vec<Vec<i64>>> {
    let prompts = m.get("tokens")?.get(which)?.as_array()?;
    let ids =
        |p: &Value| p.as_array().map(|a| a.iter().filter_map(Value::as_i64).collect::<Vec<i64>>()).unwrap_or_default();
    Some(prompts.iter().map(ids).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn manifest(kind: &str, normalize: bool) -> Value {
        json!({
            "spec": {"metric": {"kind": kind, "normalize": normalize}, "prompts": [{}, {}], "corruption": "swap_pairs"},
            "metric": {"kind": kind, "normalize": normalize, "clean_baseline": 0.6, "corrupted_baseline": 0.2,
                       "clean_per_prompt": [0.5, 0.7], "corrupted_per_prompt": [0.1, 0.3]},
            "tokens": {"prepend_bos": true, "clean": [[1, 5, 6, 7], [1, 8, 9]], "corrupted": [[1, 5, 4, 7], [2, 8, 3]]}
        })
    }

    #[test]
    fn probabilities_diverge_around_the_corrupted_baseline() {
        for kind in ["prob", "logprob"] {
            let (mean, per) = metric_centres(&manifest(kind, false));
            assert_eq!(mean, Some(0.2), "{kind}");
            assert_eq!(per, vec![Some(0.1), Some(0.3)], "{kind}");
        }
    }

    #[test]
    fn logit_diff_and_normalised_metrics_diverge_around_zero() {
        for (kind, normalize) in [("logit_diff", false), ("logit_diff", true), ("prob", true), ("logprob", true)] {
            assert_eq!(metric_centres(&manifest(kind, normalize)), (None, Vec::new()), "{kind} {normalize}");
        }
    }

    #[test]
    fn no_baseline_no_centre() {
        let mut m = manifest("prob", false);
        m["metric"] = json!({"kind": "prob", "normalize": false});
        assert_eq!(metric_centres(&m), (None, Vec::new()));
    }

    #[test]
    fn noise_samples_are_averaged_per_prompt() {
        let mut m = manifest("prob", false);
        // Two samples of two prompts: sample 0 of prompts 0, 1, then sample 1.
        m["metric"]["corrupted_per_prompt"] = json!([0.1, 0.3, 0.2, 0.5]);
        assert_eq!(metric_centres(&m).1, vec![Some(0.15000000000000002), Some(0.4)]);
    }

    #[test]
    fn changed_tokens_are_counted_with_the_left_padding() {
        let c = ChangedTokens::read(&manifest("prob", false));
        assert_eq!(c.padding, vec![0, 1], "prompt 1 is one token shorter");
        assert_eq!(c.positions, vec![BTreeSet::from([2]), BTreeSet::from([0, 2])]);
        assert_eq!(c.padded(1), Some(BTreeSet::from([1, 3])));
        assert_eq!(c.any_padded(), BTreeSet::from([1, 2, 3]));
        assert_eq!(c.padded(2), None);
    }

    #[test]
    fn noise_marks_the_listed_positions_only() {
        let mut m = manifest("prob", false);
        m["tokens"]["corrupted"] = Value::Null;
        m["spec"]["corruption"] =
            json!({"noise": {"positions": [1, 3], "words": null, "noise": 3.0, "samples": 1, "seed": 0}});
        let c = ChangedTokens::read(&m);
        assert_eq!(c.positions, vec![BTreeSet::from([1, 3]), BTreeSet::from([1])], "position 3 is past prompt 1's end");
        m["spec"]["corruption"] =
            json!({"noise": {"positions": null, "words": ["Mary"], "noise": 3.0, "samples": 1, "seed": 0}});
        assert!(ChangedTokens::read(&m).any_padded().is_empty(), "a manifest without tokens.noised marks no words");
        // The run records the positions the words were found at, in each prompt's own tokens.
        m["tokens"]["noised"] = json!([[2], [0, 1]]);
        let c = ChangedTokens::read(&m);
        assert_eq!(c.positions, vec![BTreeSet::from([2]), BTreeSet::from([0, 1])]);
        assert_eq!(c.any_padded(), BTreeSet::from([1, 2]), "prompt 1 is padded by one");
    }

    #[test]
    fn run_facts_carry_the_mean_and_each_prompt() {
        let m = manifest("prob", false);
        let f = run_facts(&m, &ChangedTokens::read(&m));
        assert_eq!(f.metric_centre, Some(0.2));
        assert_eq!(f.corrupted_positions, BTreeSet::from([1, 2, 3]));
        let p1 = f.for_prompt(1);
        assert_eq!((p1.metric_centre, p1.corrupted_positions), (Some(0.3), BTreeSet::from([1, 3])));
        let none = run_facts(&json!({}), &ChangedTokens::read(&json!({})));
        assert_eq!((none.metric_centre, none.corrupted_positions.len(), none.per_prompt.len()), (None, 0, 0));
    }
}
