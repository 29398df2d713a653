//! bfloat16 and float16 runs against TransformerLens 4.3 and HF transformers run in the same
//! dtype (tests/oracle/dump_dtypes.py), on two fixtures of different families with prompts whose
//! swap effect is large against the dtype's resolution: activation patching (resid_pre over
//! [layer, pos], z over [layer, head]) through the oracle guard with a tolerance stated as a
//! fraction of the signal, and the last position's log-probs.
//!
//! The extra: every family's fixture against tl-run's own float32 run (weights are processed in
//! f32 and then cast; norms, softmax and the metric accumulate in f32). Prints, per family, the
//! max |Δ| of the logits and of the patching values on the zoo prompts against f32 — docs/verification.md's
//! dtype table — and asserts they stay within what the dtype's precision allows.
mod common;

use common::compare::Agreement;
use common::*;
use tl_run::model::config::Processing;
use tl_run::{Hooks, Input, LoadOptions, Model, Stop};

/// Every test fixture but gpt2-tiny (dtypes.rs compares it against TransformerLens itself).
fn families() -> Vec<String> {
    test_fixtures().into_iter().filter(|f| f != "gpt2-tiny").collect()
}

fn load_as(fixture_name: &str, kind: tch::Kind) -> Model {
    let opts = LoadOptions { processing: Processing::TRANSFORMER_LENS, kind, ..LoadOptions::default() };
    Model::load(fixture(fixture_name).to_str().unwrap(), &opts).unwrap()
}

/// Largest |Δ| of the logits (log-softmax, so shifts cannot hide) relative to the f32 run,
/// over a batch of the family's prompts.
fn logits_delta(fixture_name: &str, kind: tch::Kind) -> f64 {
    let oracle = Oracle::read(fixture_name, "raw-batch.safetensors");
    let tokens = oracle.get("tokens");
    let run = |m: &Model| {
        m.run(Input::Tokens(tokens), None, &mut Hooks::new(), Stop::Logits).unwrap().to_kind(tch::Kind::Float)
    };
    let f32_logits = run(&load_as(fixture_name, tch::Kind::Float));
    let low = run(&load_as(fixture_name, kind));
    max_abs_diff(&log_softmax(&low), &log_softmax(&f32_logits))
}

/// The resid_pre and z patching values of one dtype, in table order.
fn patching(fixture_name: &str, dtype: &str) -> Vec<f64> {
    let o = if fixture_name.starts_with("gpt2") || fixture_name == "llama-tiny" {
        None
    } else {
        Some(Oracle::read(fixture_name, "zoo.safetensors"))
    };
    let prompts = match &o {
        Some(o) => prompts_toml(o),
        None => format!("[prompts]\nfile = \"{}\"\n", prompt_file(fixture_name).display()),
    };
    let (mut v, z, _) = patching_on(fixture_name, dtype, &prompts);
    v.extend(z);
    v
}

/// tl-run's activation patching in `dtype` on `prompts` (a TOML [prompts] section), swap_pairs
/// corruption, raw logit difference: (resid_pre over [layer, pos], z over [layer, head], each
/// in table order = TransformerLens's row-major order; the clean tokens tl-run made).
fn patching_on(fixture_name: &str, dtype: &str, prompts: &str) -> (Vec<f64>, Vec<f64>, Vec<Vec<i64>>) {
    let spec = format!(
        "name = \"dtype\"\n[model]\nid = \"{}\"\ndtype = \"{dtype}\"\n{prompts}[corruption]\nkind = \"swap_pairs\"\n[metric]\nkind = \"logit_diff\"\nnormalize = false\n\n[[run]]\nname = \"resid\"\nkind = \"activation_patching\"\nhooks = [\"resid_pre\"]\nover = [\"layer\", \"pos\"]\n\n[[run]]\nname = \"heads\"\nkind = \"activation_patching\"\nhooks = [\"z\"]\nover = [\"layer\", \"head\"]\n",
        fixture(fixture_name).display()
    );
    let dir = run_spec(&spec, &[]);
    let out = dir.path().join("out");
    let mean_values = |run: &str| {
        let t = Table::read(&out.join(format!("{run}.parquet")));
        t.mean_rows().into_iter().map(|i| t.value(i)).collect::<Vec<f64>>()
    };
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    let tokens = serde_json::from_value(manifest["tokens"]["clean"].clone()).unwrap();
    (mean_values("resid"), mean_values("heads"), tokens)
}

/// The fixtures of tests/oracle/dump_dtypes.py. Its prompts are the IOI prompts with each swap
/// pair's answers re-picked (on the float32 model) as the two tokens whose logit difference the
/// swap moves most: the mean logit-difference gap is 2.6 logits on both and the patching signals
/// (max |patched − corrupted|) 2.7 / 1.4 (qwen3-tiny resid_pre / z) and 2.6 / 2.0 (neo-tiny),
/// against bf16 rounding of ~0.01 logits. With the fixtures' IOI answers the signals are
/// 0.1-0.9 and two correct bf16 implementations differ by 2-7% of them, which no tolerance under
/// the oracle guard's 1/20 of the signal can tell from a bug.
const SAME_DTYPE: [&str; 2] = ["qwen3-tiny", "neo-tiny"];

/// Patching tolerance as a fraction of the signal, per dtype. Measured (dump_dtypes.py) over both
/// fixtures and both targets, the largest pairwise difference between three correct
/// implementations in one dtype — TransformerLens (weights cast to the dtype, processed in f32,
/// cast back), HF transformers (unprocessed weights) and TransformerLens processed in f32 and then
/// cast, as tl-run does — is 1.04e-2 of the signal in bfloat16 (qwen3-tiny z) and 1.4e-3 in
/// float16 (neo-tiny z); the bounds leave 1.9× and 2.9× that. They must stay under 1/40 of the
/// signal: swapped pairs make the clean and corrupted metrics ±g, so resid_pre's largest |value|
/// is half its signal, and the guard wants that ≥ 20× the tolerance too.
fn patching_tol(dtype: &str) -> f64 {
    if dtype == "bfloat16" {
        0.02
    } else {
        0.004
    }
}

/// Log-prob tolerance, absolute, per dtype. A forward that does nothing (zero logits) gives the
/// uniform log-prob −ln V everywhere, so that is the baseline; the fixtures' last-position
/// log-probs lie up to 4.30 (qwen3-tiny) and 4.36 (neo-tiny) from it, which caps the tolerance
/// at 4.30 / 20 = 0.215. Measured between correct implementations in one dtype (TransformerLens,
/// transformers, processed-in-f32-then-cast), over both fixtures: at most 0.095 in bfloat16 and
/// 0.0134 in float16, so 0.2 and 0.03 (about two units of bfloat16's resolution 2^-8 and four of
/// float16's 2^-11 at the largest |log-prob| of 15.2).
fn logprob_tol(dtype: &str) -> f64 {
    if dtype == "bfloat16" {
        0.2
    } else {
        0.03
    }
}

/// Runs one comparison, returning its failure (a difference or a refused comparison) so that
/// every comparison is reported, not the first.
fn failure(what: &str, f: impl FnOnce() -> Agreement) -> Option<String> {
    common::compare::outcome(what, f).err()
}

#[test]
fn bf16_and_f16_patching_match_transformer_lens_in_the_same_dtype() {
    let mut failures = Vec::new();
    for f in SAME_DTYPE {
        let o = Oracle::read(f, "dtypes.safetensors");
        let prompts = prompts_toml(&o);
        let tokens = o.get("tokens");
        for (kind, dtype) in [(tch::Kind::BFloat16, "bfloat16"), (tch::Kind::Half, "float16")] {
            let (resid, z, ours_tokens) = patching_on(f, dtype, &prompts);
            for (i, row) in ours_tokens.iter().enumerate() {
                assert_eq!(*row, Vec::<i64>::try_from(tokens.get(i as i64)).unwrap(), "{f}: tokens of prompt {i}");
            }
            // A do-nothing patch leaves the corrupted run's metric, in this dtype.
            let corrupted = o.get(&format!("{dtype}/corrupted")).double_value(&[0]);
            let tol = Tol::OfSignal(patching_tol(dtype));
            for (ours, key, what) in
                [(&resid, "resid_pre", "resid_pre over [layer, pos]"), (&z, "z", "z over [layer, head]")]
            {
                let what = format!("{f} {dtype} {what} (oracle {dtype}/{key}, TransformerLens in {dtype})");
                failures.extend(failure(&what, || {
                    assert_oracle(
                        &what,
                        ours,
                        &values(o.get(&format!("{dtype}/{key}"))),
                        Baseline::Value(corrupted),
                        tol,
                    )
                }));
            }
            // The last position's log-probs of the clean prompts against transformers' and
            // TransformerLens's in the same dtype (log-softmax: center_unembed's shift cancels).
            let logits = load_as(f, kind).run(Input::Tokens(tokens), None, &mut Hooks::new(), Stop::Logits).unwrap();
            let ours = log_softmax(&logits.select(1, -1).to_kind(tch::Kind::Float));
            let uniform = -(ours.size()[1] as f64).ln();
            for (source, key) in [("transformers", "hf_logprobs"), ("TransformerLens", "tl_logprobs")] {
                let what = format!("{f} {dtype} last-position log-probs (oracle {dtype}/{key}, {source} in {dtype})");
                failures.extend(failure(&what, || {
                    assert_oracle_tensor(
                        &what,
                        &ours,
                        o.get(&format!("{dtype}/{key}")),
                        Baseline::Value(uniform),
                        Tol::Abs(logprob_tol(dtype)),
                    )
                }));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn bf16_and_f16_stay_close_to_f32_on_every_family() {
    let mut failures = Vec::new();
    println!(
        "{:<20} {:>14} {:>14} {:>16} {:>16}",
        "fixture", "logits bf16", "logits f16", "patching bf16", "patching f16"
    );
    for f in &families() {
        let reference = patching(f, "float32");
        let mut row = Vec::new();
        for (kind, name) in [(tch::Kind::BFloat16, "bfloat16"), (tch::Kind::Half, "float16")] {
            let d = logits_delta(f, kind);
            // bf16 keeps 8 significant bits, f16 11: the bound is a few units in the last place
            // of O(1)-sized log-probs accumulated over a few layers.
            let bound = if kind == tch::Kind::BFloat16 { 0.25 } else { 0.05 };
            if !(d <= bound) {
                failures.push(format!("{f} {name}: log-softmax |Δ| {d:.3e} > {bound}"));
            }
            row.push(d);
        }
        for name in ["bfloat16", "float16"] {
            let low = patching(f, name);
            assert_eq!(low.len(), reference.len());
            let d = low.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
            // In logit-difference units, absolute: at the scale of the logits' own rounding in
            // the dtype. The fixtures' patching effects on the zoo prompts are 0.02-0.3 logits,
            // so this bounds drift from f32, not agreement relative to the signal; the test
            // above compares against TransformerLens and transformers in the same dtype.
            let bound = if name == "bfloat16" { 0.05 } else { 0.005 };
            if !(d <= bound) {
                failures.push(format!("{f} {name}: patching |Δ| {d:.3e} > {bound:.0e}"));
            }
            row.push(d);
        }
        if !(row[1] < row[0]) {
            failures.push(format!(
                "{f}: float16 ({:.2e}) should be closer to float32 than bfloat16 ({:.2e})",
                row[1], row[0]
            ));
        }
        println!("{f:<20} {:>14.2e} {:>14.2e} {:>16.2e} {:>16.2e}", row[0], row[1], row[2], row[3]);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn same_dtype_fixtures_match_the_oracle_script() {
    let script = std::fs::read_to_string(repo_root().join("tests/oracle/dump_dtypes.py")).unwrap();
    let line = script.lines().find(|l| l.starts_with("FIXTURES = ")).expect("dump_dtypes.py has no FIXTURES line");
    for f in SAME_DTYPE {
        assert!(line.contains(&format!("\"{f}\"")), "{f} is not in dump_dtypes.py's FIXTURES");
    }
}
