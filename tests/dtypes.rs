//! bfloat16 and float16 runs on every family's fixture against the same model in float32:
//! weights are processed in f32 and then cast, norms, softmax and the metric accumulate in f32.
//! Prints, per family, the max |Δ| of the logits and of activation-patching values (resid_pre
//! over [layer, pos] and z over [layer, head] on the zoo prompts) against f32 — the README's
//! dtype table — and asserts they stay within what the dtype's precision allows.
mod common;

use common::*;
use tl_run::model::config::Processing;
use tl_run::{Hooks, Input, LoadOptions, Model, Stop};

const FAMILIES: [&str; 17] = [
    "gpt2-odd", "llama-tiny", "llama3-tiny", "llama-linear-tiny", "neo-tiny", "gptj-tiny", "neox-tiny", "opt-tiny", "mistral-tiny",
    "qwen2-tiny", "qwen3-tiny", "gemma-tiny", "gemma2-tiny", "phi-tiny", "phi3-tiny", "stablelm-tiny", "bloom-tiny",
];

fn load_as(fixture_name: &str, kind: tch::Kind) -> Model {
    let opts = LoadOptions { processing: Processing::TRANSFORMER_LENS, kind, ..LoadOptions::default() };
    Model::load(fixture(fixture_name).to_str().unwrap(), &opts).unwrap()
}

/// Largest |Δ| of the logits (log-softmax, so shifts cannot hide) relative to the f32 run,
/// over a batch of the family's prompts.
fn logits_delta(fixture_name: &str, kind: tch::Kind) -> f64 {
    let oracle = Oracle::read(fixture_name, "raw-batch.safetensors");
    let tokens = oracle.get("tokens");
    let run = |m: &Model| m.run(Input::Tokens(tokens), None, &mut Hooks::new(), Stop::Logits).unwrap().to_kind(tch::Kind::Float);
    let f32_logits = run(&load_as(fixture_name, tch::Kind::Float));
    let low = run(&load_as(fixture_name, kind));
    max_abs_diff(&log_softmax(&low), &log_softmax(&f32_logits))
}

/// The resid_pre and z patching values of one dtype, in table order.
fn patching(fixture_name: &str, dtype: &str) -> Vec<f64> {
    let o = if fixture_name.starts_with("gpt2") || fixture_name == "llama-tiny" { None } else { Some(Oracle::read(fixture_name, "zoo.safetensors")) };
    let prompts = match &o {
        Some(o) => prompts_toml(o),
        None => format!("[prompts]\nfile = \"{}\"\n", prompt_file(fixture_name).display()),
    };
    let spec = format!(
        "name = \"dtype\"\n[model]\nid = \"{}\"\ndtype = \"{dtype}\"\n{prompts}[corruption]\nkind = \"swap_pairs\"\n[metric]\nkind = \"logit_diff\"\nnormalize = false\n\n[[run]]\nname = \"resid\"\nkind = \"activation_patching\"\nhooks = [\"resid_pre\"]\nover = [\"layer\", \"pos\"]\n\n[[run]]\nname = \"heads\"\nkind = \"activation_patching\"\nhooks = [\"z\"]\nover = [\"layer\", \"head\"]\n",
        fixture(fixture_name).display()
    );
    let dir = run_spec(&spec, &[]);
    let mut v = Vec::new();
    for run in ["resid", "heads"] {
        let t = Table::read(&dir.path().join("out").join(format!("{run}.parquet")));
        v.extend(t.mean_rows().into_iter().map(|i| t.value(i)));
    }
    v
}

#[test]
fn bf16_and_f16_stay_close_to_f32_on_every_family() {
    let mut failures = Vec::new();
    println!("{:<20} {:>14} {:>14} {:>16} {:>16}", "fixture", "logits bf16", "logits f16", "patching bf16", "patching f16");
    for f in FAMILIES {
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
            // In logit-difference units; the random fixtures' patching effects are ~1e-3, so
            // the bound is absolute, at the scale of the logits' own rounding (gemma2-tiny and
            // mistral-tiny have 5× weights, so the largest activations and errors).
            let bound = if name == "bfloat16" { 0.05 } else { 0.005 };
            if !(d <= bound) {
                failures.push(format!("{f} {name}: patching |Δ| {d:.3e} > {bound:.0e}"));
            }
            row.push(d);
        }
        if !(row[1] < row[0]) {
            failures.push(format!("{f}: float16 ({:.2e}) should be closer to float32 than bfloat16 ({:.2e})", row[1], row[0]));
        }
        println!("{f:<20} {:>14.2e} {:>14.2e} {:>16.2e} {:>16.2e}", row[0], row[1], row[2], row[3]);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
