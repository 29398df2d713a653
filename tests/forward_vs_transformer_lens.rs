//! Every hook point and the logits of our forward pass against TransformerLens 4.3.0
//! (TransformerBridge in compatibility mode) on the same fixture weights: two GPT-2 shapes (one
//! odd: 3 layers, 6 heads of 16, 128 positions), a random GQA Llama, the real stories260K and one
//! fixture per further decoder family (configs/fixtures.toml), with processing on
//! (from_pretrained defaults) and off (also checked against HF transformers).
mod common;

use std::collections::BTreeMap;

use common::*;
use tl_run::model::config::Processing;
use tl_run::{Hooks, Input, Stop};

/// Each hook (and the logits) is held to this fraction of its largest |value|, its signal against
/// a do-nothing forward's zeros: the fixtures' weights are scaled (configs/fixtures.toml
/// init_scale), so magnitudes span orders across hooks (patterns ≤ 1, scores and logits in the
/// tens) and no one absolute bound fits them all.
const REL_TOL: f64 = 1e-5;
/// Ours against ours (processing_preserves_log_probs): an absolute bound on log-softmax.
const LOG_PROB_TOL: f64 = 1e-4;
/// Hooks the bridge exposes that HookedTransformer does not have (HF rotary tables).
const BRIDGE_ONLY: &[&str] = &["hook_cos", "hook_sin"];

/// Hooks TransformerLens 4.3 registers for a family but never fires (or, for hook_result, cannot
/// compute for that attention class); ours fire with the real value. Their values are checked
/// through what they feed: rot_q/rot_k through hook_attn_scores, hook_attn_out through
/// hook_resid_mid; hook_result against HF transformers' own per-head outputs, and its sum over
/// heads plus b_O against HF's attention output (zoo_vs_transformer_lens.rs, *_head_results_*).
const TL_NEVER_FIRES: &[(&str, &[&str])] = &[
    ("gptj-tiny", &["attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_result"]),
    ("neox-tiny", &["attn.hook_rot_q", "attn.hook_rot_k"]),
    ("phi3-tiny", &["attn.hook_rot_q", "attn.hook_rot_k"]),
    ("neo-tiny", &["attn.hook_result"]),
    ("opt-tiny", &["attn.hook_result"]),
    ("bloom-tiny", &["hook_attn_out"]),
];

/// TransformerLens quirks in what a hook holds, compared on what carries information:
/// OPT's ln2 hooks are flattened to [batch·pos, ..] (HF OPT reshapes before that norm), and for
/// the families whose attention TL 4.3 wraps in its generic AttentionBridge (GPT-Neo, GPT-J,
/// OPT) hook_attn_scores holds the softmaxed pattern, so it is compared with our pattern; our
/// scores feed that pattern and are checked through it.
fn tl_quirk(
    fixture: &str,
    name: &str,
    ours: &tch::Tensor,
    theirs: &tch::Tensor,
    cache: &Hooks,
) -> Option<(tch::Tensor, tch::Tensor)> {
    if fixture == "opt-tiny" && name.contains(".ln2.") && theirs.numel() == ours.numel() && theirs.dim() < ours.dim() {
        return Some((ours.shallow_clone(), theirs.reshape(ours.size())));
    }
    if ["neo-tiny", "gptj-tiny", "opt-tiny"].contains(&fixture) && name.ends_with("attn.hook_attn_scores") {
        let pattern_name = name.replace("hook_attn_scores", "hook_pattern");
        let pattern = cache.cache.get(&pattern_name.parse().unwrap()).unwrap();
        return Some((pattern.shallow_clone(), theirs.shallow_clone()));
    }
    None
}

fn tl_never_fires(fixture: &str, name: &str) -> bool {
    TL_NEVER_FIRES.iter().any(|(f, hooks)| *f == fixture && hooks.iter().any(|h| name.ends_with(h)))
}

fn family_of(name: &str) -> String {
    // "blocks.3.attn.hook_q" -> "attn.hook_q": the max diff is reported per hook family.
    match name.strip_prefix("blocks.") {
        Some(rest) => rest.split_once('.').map(|(_, s)| s.to_string()).unwrap_or_default(),
        None => name.to_string(),
    }
}

/// Compares one hook through the oracle guard, recording its agreement (max |diff| over the
/// hook's largest |value|) under the hook's family; returns the failure (a difference, a shape
/// mismatch or a refused comparison) so that every hook of a case is reported, not the first.
fn compare(
    what: &str,
    name: &str,
    ours: &tch::Tensor,
    theirs: &tch::Tensor,
    worst: &mut BTreeMap<String, f64>,
) -> Option<String> {
    match common::compare::outcome(what, || {
        assert_oracle_tensor(what, ours, theirs, Baseline::Zero, Tol::OfSignal(REL_TOL))
    }) {
        Ok(a) => {
            let w = worst.entry(family_of(name)).or_insert(0.0);
            *w = w.max(a.max_diff / a.signal);
            None
        }
        Err(e) => Some(e),
    }
}

fn compare_case(fixture_name: &str, processed: bool, case: &str, worst: &mut BTreeMap<String, f64>) {
    let processing = if processed { Processing::TRANSFORMER_LENS } else { Processing::NONE };
    let model = load(fixture_name, processing);
    let file = format!("{}-{case}.safetensors", if processed { "processed" } else { "raw" });
    let oracle = Oracle::read(fixture_name, &file);
    let tokens = oracle.get("tokens");

    // Prompts are tokenized by us exactly as TransformerLens tokenized them, with its default
    // prepend_bos for the family.
    if let Some(bos) = oracle.metadata.get("prepend_bos") {
        assert_eq!(model.cfg.default_prepend_bos.to_string(), *bos, "{fixture_name}: default prepend_bos");
    }
    let prompts = oracle.prompts();
    if !prompts.is_empty() {
        let tok = model.tokenizer().unwrap();
        for (i, p) in prompts.iter().enumerate() {
            let ours = tok.encode(p, model.cfg.default_prepend_bos).unwrap();
            let theirs: Vec<i64> = Vec::try_from(tokens.get(i as i64)).unwrap();
            assert_eq!(ours, theirs, "{fixture_name}: tokens of {p:?}");
        }
    }

    let mut hooks = Hooks::capture_all();
    let logits = model.run(Input::Tokens(tokens), None, &mut hooks, Stop::Logits).unwrap();
    let mut failures = Vec::new();
    let mut check = |name: &str, what: String, ours: &tch::Tensor, theirs: &tch::Tensor, failures: &mut Vec<String>| {
        if let Some(f) = compare(&what, name, ours, theirs, worst) {
            failures.push(f);
        }
    };
    for point in model.hook_points() {
        let name = point.to_string();
        let ours = hooks.cache.get(&point).unwrap_or_else(|| panic!("{name} was not captured"));
        let what = format!("{fixture_name} {file} {name}");
        match oracle.tensors.get(&name) {
            Some(theirs) => match tl_quirk(fixture_name, &name, ours, theirs, &hooks) {
                Some((o, t)) => {
                    check(&name, format!("{what} (TransformerLens quirk, see tl_quirk)"), &o, &t, &mut failures)
                }
                None => check(&name, what, ours, theirs, &mut failures),
            },
            None if tl_never_fires(fixture_name, &name) => {}
            None => failures.push(format!("{name}: TransformerLens has no such hook")),
        }
    }
    for name in oracle.tensors.keys() {
        let ours_has = model.hook_point(name).is_ok();
        let expected_extra =
            ["tokens", "logits", "hf_logits"].contains(&name.as_str()) || BRIDGE_ONLY.iter().any(|s| name.ends_with(s));
        if !ours_has && !expected_extra {
            failures.push(format!("{name}: TransformerLens has it and we do not"));
        }
    }
    check("logits", format!("{fixture_name} {file} logits"), &logits, oracle.get("logits"), &mut failures);
    if !processed {
        check(
            "logits_vs_hf_transformers",
            format!("{fixture_name} {file} logits vs HF transformers (oracle hf_logits)"),
            &logits,
            oracle.get("hf_logits"),
            &mut failures,
        );
    }
    assert!(
        failures.is_empty(),
        "{fixture_name} {file}:\n  {}\nmax |diff| / largest |value| so far per family: {worst:#?}",
        failures.join("\n  ")
    );
}

fn compare_fixture(fixture_name: &str, cases: &[&str]) {
    let mut worst = BTreeMap::new();
    for processed in [false, true] {
        for case in cases {
            compare_case(fixture_name, processed, case, &mut worst);
        }
    }
    // The per-family maxima, for the record (cargo test -- --nocapture shows them).
    println!("max |diff| / largest |value| per hook family, {fixture_name}:");
    for (family, d) in &worst {
        println!("  {family:<28} {d:.2e}");
    }
}

#[test]
fn gpt2_tiny_equals_transformer_lens() {
    compare_fixture("gpt2-tiny", &["single", "batch"]);
}

#[test]
fn gpt2_odd_shape_equals_transformer_lens() {
    compare_fixture("gpt2-odd", &["single", "batch", "long"]);
}

#[test]
fn llama_gqa_fixture_equals_transformer_lens() {
    compare_fixture("llama-tiny", &["single", "batch"]);
}

#[test]
fn stories260k_equals_transformer_lens_and_hf() {
    compare_fixture("stories260K", &["single", "batch", "long"]);
}

/// One test per further family: the fixture alone and in a batch.
macro_rules! family_tests {
    ($($test:ident => $fixture:literal),* $(,)?) => {
        $(
            #[test]
            fn $test() {
                compare_fixture($fixture, &["single", "batch"]);
            }
        )*
    };
}

family_tests! {
    llama3_rope_scaling_equals_transformer_lens => "llama3-tiny",
    llama_linear_rope_scaling_equals_transformer_lens => "llama-linear-tiny",
    gpt_neo_equals_transformer_lens => "neo-tiny",
    gptj_equals_transformer_lens => "gptj-tiny",
    gpt_neox_equals_transformer_lens => "neox-tiny",
    opt_equals_transformer_lens => "opt-tiny",
    mistral_equals_transformer_lens => "mistral-tiny",
    qwen2_equals_transformer_lens => "qwen2-tiny",
    qwen3_equals_transformer_lens => "qwen3-tiny",
    gemma_equals_transformer_lens => "gemma-tiny",
    gemma2_equals_transformer_lens => "gemma2-tiny",
    phi_equals_transformer_lens => "phi-tiny",
    phi3_equals_transformer_lens => "phi3-tiny",
    stablelm_equals_transformer_lens => "stablelm-tiny",
    bloom_equals_transformer_lens => "bloom-tiny",
}

/// Processing changes hook values but not the model's predictions: log-probs agree.
#[test]
fn processing_preserves_log_probs() {
    for fixture_name in ["gpt2-odd", "stories260K"] {
        let oracle = Oracle::read(fixture_name, "raw-batch.safetensors");
        let tokens = oracle.get("tokens");
        let a = load(fixture_name, Processing::TRANSFORMER_LENS)
            .run(Input::Tokens(tokens), None, &mut Hooks::new(), Stop::Logits)
            .unwrap();
        let b = load(fixture_name, Processing::NONE)
            .run(Input::Tokens(tokens), None, &mut Hooks::new(), Stop::Logits)
            .unwrap();
        let d = max_abs_diff(&log_softmax(&a), &log_softmax(&b));
        assert!(d <= LOG_PROB_TOL, "{fixture_name}: log-softmax differs by {d:.3e}");
    }
}
