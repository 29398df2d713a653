//! The metrics beyond one answer pair against TransformerLens's patching.py with the same metric
//! written in torch (tests/oracle/dump_metrics.py), on a GPT-2 fixture and the grouped-query
//! Llama: logit_diff over token sets (mean and max of the wrong set), prob_diff, the log-prob of
//! a token set, kl_divergence to the clean run, and a multi-token answer read teacher-forced.
//! Baselines and resid_pre sweeps over [layer, pos], both schedules.
mod common;

use common::*;
use tch::{Kind, Tensor};
use tl_run::analysis::clean_corrupted::{CleanCorrupted, Corrupt};
use tl_run::analysis::patching::{sweep_scheduled, Axes, Schedule, Target};
use tl_run::engine::metric::{Metric, MetricKind, WrongAnswers};
use tl_run::model::config::Processing;
use tl_run::{Model, Site};

/// Each row's set: the ids where the mask is set.
fn sets(oracle: &Oracle, ids: &str, mask: &str) -> Vec<Vec<i64>> {
    let (ids, mask) = (oracle.get(ids), oracle.get(mask));
    (0..ids.size()[0])
        .map(|i| {
            let row: Vec<i64> = Vec::try_from(ids.get(i)).unwrap();
            let keep: Vec<i64> = Vec::try_from(mask.get(i).to_kind(Kind::Int64)).unwrap();
            row.into_iter().zip(keep).filter(|(_, k)| *k != 0).map(|(t, _)| t).collect()
        })
        .collect()
}

fn metric(oracle: &Oracle, kind: MetricKind, wrong: WrongAnswers) -> Metric {
    let correct = sets(oracle, "correct", "correct_mask");
    let n = correct.len();
    Metric {
        kind,
        correct,
        incorrect: sets(oracle, "wrong", "wrong_mask"),
        wrong,
        sequence: vec![false; n],
        positions_from_end: None,
        clean_logprobs: None,
    }
}

/// The multi-token answer of each prompt, read at the last positions.
fn answer_metric(oracle: &Oracle) -> Metric {
    let answer = oracle.get("answer");
    let correct: Vec<Vec<i64>> = (0..answer.size()[0]).map(|i| Vec::try_from(answer.get(i)).unwrap()).collect();
    let n = correct.len();
    Metric {
        kind: MetricKind::Logprob,
        correct,
        incorrect: vec![vec![]; n],
        wrong: WrongAnswers::Mean,
        sequence: vec![true; n],
        positions_from_end: None,
        clean_logprobs: None,
    }
}

/// resid_pre patched over [layer, pos], every layer in one call, as a [layer, pos] tensor.
fn resid_pre_sweep(model: &Model, prep: &CleanCorrupted, schedule: Schedule) -> Tensor {
    let target = Target::new(Site::ResidPre, Axes::LayerPos).unwrap();
    let cells: Vec<_> = (0..model.cfg.n_layers)
        .flat_map(|l| tl_run::analysis::patching::cells_at(&model.cfg, target, l, prep.seq_len()))
        .collect();
    let s = sweep_scheduled(model, prep, &[(target, cells)], schedule, |_| {}).unwrap().pop().unwrap();
    let means: Vec<f64> = (0..s.cells.len()).map(|i| s.mean(i)).collect();
    Tensor::from_slice(&means).view([model.cfg.n_layers as i64, prep.seq_len()]).to_kind(Kind::Float)
}

fn check(name: &str, model: &Model, oracle: &Oracle, key: &str, metric: Metric, tokens: (&str, &str), tol: Tol) {
    let prep = CleanCorrupted::new(
        model,
        oracle.get(tokens.0).shallow_clone(),
        Corrupt::Tokens(oracle.get(tokens.1).shallow_clone()),
        None,
        metric,
        &[Site::ResidPre],
    )
    .unwrap();
    let clean = oracle.get(&format!("{key}_clean")).double_value(&[0]);
    let corrupted = oracle.get(&format!("{key}_corrupted")).double_value(&[0]);
    // The baselines against zero (a zeroed output), as patching.rs's; KL(clean ‖ clean) is zero
    // by definition, so there only the corrupted one can be compared.
    for (which, ours, theirs) in
        [("clean", prep.clean_baseline(), clean), ("corrupted", prep.corrupted_baseline(), corrupted)]
    {
        if theirs == 0.0 {
            assert!(ours.abs() < 1e-6, "{name} {key} {which} baseline: {ours}, the reference's is 0");
            continue;
        }
        assert_oracle(
            &format!("{name} {key} {which} baseline (oracle {key}_{which})"),
            &[ours],
            &[theirs],
            Baseline::Zero,
            tol,
        );
    }
    for schedule in Schedule::ALL {
        // Patching nothing leaves the corrupted run's value.
        assert_oracle_tensor(
            &format!("{name} {key} resid_pre ({schedule:?}) (oracle {key})"),
            &resid_pre_sweep(model, &prep, schedule),
            oracle.get(key),
            Baseline::Value(corrupted),
            tol,
        );
    }
}

#[test]
fn token_set_kl_and_multi_token_metrics_equal_transformer_lens() {
    for name in ["gpt2-tiny", "llama-tiny"] {
        let model = load(name, Processing::TRANSFORMER_LENS);
        let oracle = Oracle::read(name, "metrics.safetensors");
        let tokens = ("clean_tokens", "corrupted_tokens");
        // Logits and log-probs are O(1–10): 1e-4 absolute. Probabilities of random tokens are
        // ~1/vocabulary, so theirs is relative to the effect; KL divergences are O(1e-3–1e-1).
        let cases = [
            ("logit_diff_mean", MetricKind::LogitDiff, WrongAnswers::Mean, Tol::Abs(1e-4)),
            ("logit_diff_max", MetricKind::LogitDiff, WrongAnswers::Max, Tol::Abs(1e-4)),
            // Random tokens' probabilities are ~1e-6–1e-3: an absolute 1e-8, above f32's rounding
            // of their sums (1.3e-9 seen on llama-tiny) and 48x-48000x below their effects.
            ("prob_diff", MetricKind::ProbDiff, WrongAnswers::Mean, Tol::Abs(1e-8)),
            ("logprob_set", MetricKind::Logprob, WrongAnswers::Mean, Tol::Abs(1e-4)),
            ("kl_divergence", MetricKind::KlDivergence, WrongAnswers::Mean, Tol::Abs(1e-5)),
        ];
        for (key, kind, wrong, tol) in cases {
            check(name, &model, &oracle, key, metric(&oracle, kind, wrong), tokens, tol);
        }
        let mt = ("clean_tokens_mt", "corrupted_tokens_mt");
        check(name, &model, &oracle, "answer_logprob", answer_metric(&oracle), mt, Tol::Abs(1e-4));
    }
}

/// Multi-token answers through a spec, end to end: tl-run appends each answer's tokens but the
/// last to its prompt and to its swapped corrupted prompt; the oracle builds the same from the
/// strings itself (tests/oracle/dump_metrics.py) and patches resid_pre over [layer, pos].
#[test]
fn a_spec_with_multi_token_answers_equals_transformer_lens_teacher_forced() {
    let oracle = Oracle::read("gpt2-tiny", "metrics.safetensors");
    let list = |k: &str| -> Vec<String> { serde_json::from_str(&oracle.metadata[k]).unwrap() };
    let (prompts, answers) = (list("e2e_prompts"), list("e2e_answers"));
    let tmp = tempfile::tempdir().unwrap();
    let jsonl = tmp.path().join("prompts.jsonl");
    let lines: Vec<String> =
        prompts.iter().zip(&answers).map(|(p, a)| serde_json::json!({"clean": p, "answer": a}).to_string()).collect();
    std::fs::write(&jsonl, lines.join("\n")).unwrap();
    let spec = format!(
        "name = \"mt\"\n[model]\nid = \"{}\"\n[prompts]\nfile = \"{}\"\n[corruption]\nkind = \"swap_pairs\"\n[metric]\nkind = \"logprob\"\n[[run]]\nname = \"resid\"\nkind = \"activation_patching\"\nhooks = [\"resid_pre\"]\nover = [\"layer\", \"pos\"]\n",
        fixture("gpt2-tiny").display(),
        jsonl.display()
    );
    let dir = run_spec(&spec, &[]);
    let out = dir.path().join("out");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    let theirs_tokens = oracle.get("e2e_clean_tokens");
    for (i, ours) in manifest["tokens"]["clean"].as_array().unwrap().iter().enumerate() {
        let ours: Vec<i64> = ours.as_array().unwrap().iter().map(|t| t.as_i64().unwrap()).collect();
        assert_eq!(ours, Vec::<i64>::try_from(theirs_tokens.get(i as i64)).unwrap(), "prompt {i}'s tokens");
    }
    let t = Table::read(&out.join("resid.parquet"));
    let mut rows: Vec<((i64, i64), f64)> = t
        .mean_rows()
        .into_iter()
        .map(|i| ((t.int("layer", i).unwrap(), t.int("pos", i).unwrap()), t.value(i)))
        .collect();
    rows.sort_by_key(|(k, _)| *k);
    let ours: Vec<f64> = rows.into_iter().map(|(_, v)| v).collect();
    let corrupted = oracle.get("e2e_corrupted").double_value(&[0]);
    assert_oracle(
        "gpt2-tiny multi-token answers through a spec, resid_pre (oracle e2e_resid_pre)",
        &ours,
        &values(oracle.get("e2e_resid_pre")),
        Baseline::Value(corrupted),
        Tol::Abs(1e-4),
    );
}
