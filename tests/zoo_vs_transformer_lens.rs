//! The experiment kinds on one fixture per further decoder family, end to end through `tl-run`,
//! against TransformerLens 4.3 (tests/oracle/dump_zoo.py): activation patching of resid_pre over
//! [layer, pos] and z over [layer, head] (patching.py), attribution patching of the same two
//! targets (the Attribution Patching demo's formula), and direct logit attribution per layer and
//! per head (decompose_resid / stack_head_results + logit_attrs). Where TransformerLens 4.3
//! cannot compute them (per-head results for GPT-Neo, GPT-J and OPT; hook_attn_out for Bloom),
//! the DLA reference is HF transformers' own per-head and per-layer outputs taken through the same
//! apply_ln_to_stack + logit_attrs (dump_zoo.py's hf_reference, checked there against
//! TransformerLens wherever it has the quantity), and hook_result itself is checked against HF's
//! per-head outputs on the unprocessed model.
mod common;

use common::*;
use tch::Kind;
use tl_run::model::config::Processing;
use tl_run::{HookPoint, Hooks, Input, Site, Stop};

/// The fixtures this file compares (gpt2-tiny, gpt2-odd and llama-tiny have their own files).
fn zoo() -> Vec<String> {
    test_fixtures().into_iter().filter(|f| !["gpt2-tiny", "gpt2-odd", "llama-tiny"].contains(&f.as_str())).collect()
}

fn spec(fixture: &str, o: &Oracle) -> String {
    format!(
        r#"name = "zoo"
[model]
id = "{model}"
{prompts}
[corruption]
kind = "swap_pairs"
[metric]
kind = "logit_diff"
normalize = false
per_prompt = true

[[run]]
name = "patch_resid"
kind = "activation_patching"
hooks = ["resid_pre"]
over = ["layer", "pos"]

[[run]]
name = "patch_z"
kind = "activation_patching"
hooks = ["z"]
over = ["layer", "head"]

[[run]]
name = "atp"
kind = "attribution_patching"
hooks = ["resid_pre"]
over = ["layer", "pos"]

[[run]]
name = "atp_z"
kind = "attribution_patching"
hooks = ["z"]
over = ["layer", "head"]

[[run]]
name = "dla_layer"
kind = "direct_logit_attribution"
over = ["layer"]

[[run]]
name = "dla_head"
kind = "direct_logit_attribution"
over = ["layer", "head"]
"#,
        model = common::fixture(fixture).display(),
        prompts = prompts_toml(o)
    )
}

/// Mean rows (over prompts) of one hook, in cell order.
fn of_hook(t: &Table, suffix: &str) -> Vec<f64> {
    t.mean_rows().into_iter().filter(|&i| t.str("hook", i).unwrap().ends_with(suffix)).map(|i| t.value(i)).collect()
}

/// The per-prompt values of `label`, in prompt order.
fn per_prompt(t: &Table, label: &str) -> Vec<f64> {
    let mut rows: Vec<(i64, f64)> = t
        .rows(|t, i| t.str("label", i).as_deref() == Some(label) && t.int("prompt", i).is_some())
        .into_iter()
        .map(|i| (t.int("prompt", i).unwrap(), t.value(i)))
        .collect();
    rows.sort_by_key(|r| r.0);
    rows.into_iter().map(|r| r.1).collect()
}

/// Where `ours` and `theirs` differ most (`at` names value i), for a comparison's description.
fn worst_at(ours: &[f64], theirs: &[f64], at: impl Fn(usize) -> String) -> String {
    let worst = ours.iter().zip(theirs).map(|(a, b)| (a - b).abs()).enumerate().max_by(|a, b| a.1.total_cmp(&b.1));
    match worst {
        Some((i, _)) if ours.len() == theirs.len() => format!("largest |diff| at {}", at(i)),
        _ => "no common values".into(),
    }
}

fn check(name: &str) {
    let fixture = name;
    let o = Oracle::read(fixture, "zoo.safetensors");
    let dir = run_spec(&spec(fixture, &o), &[]);
    let out = dir.path().join("out");
    // The tokens tl-run made are TransformerLens's (its default prepend_bos for the family).
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    let ours: Vec<Vec<i64>> = serde_json::from_value(manifest["tokens"]["clean"].clone()).unwrap();
    let clean = o.get("clean_tokens");
    for (i, row) in ours.iter().enumerate() {
        assert_eq!(*row, Vec::<i64>::try_from(clean.get(i as i64)).unwrap(), "{fixture}: tokens of prompt {i}");
    }
    // Activation patching, raw logit difference (normalize = false): a do-nothing patch leaves
    // the corrupted run's metric.
    let corrupted = o.get("corrupted_baseline").double_value(&[0]);
    let patch = Table::read(&out.join("patch_resid.parquet"));
    let what = format!("{fixture} run patch_resid, resid_pre over [layer, pos] (oracle patch/resid_pre)");
    assert_oracle(
        &what,
        &of_hook(&patch, "hook_resid_pre"),
        &values(o.get("patch/resid_pre")),
        Baseline::Value(corrupted),
        Tol::Abs(1e-4),
    );
    let patch = Table::read(&out.join("patch_z.parquet"));
    let what = format!("{fixture} run patch_z, z over [layer, head] all positions (oracle patch/z_all_pos)");
    assert_oracle(
        &what,
        &of_hook(&patch, "attn.hook_z"),
        &values(o.get("patch/z_all_pos")),
        Baseline::Value(corrupted),
        Tol::Abs(1e-4),
    );
    // AtP in raw logit-difference units (the demo's metric is normalised by the gap); a
    // do-nothing attribution is zero.
    let gap = o.get("clean_baseline").double_value(&[0]) - corrupted;
    let raw = |key: &str| -> Vec<f64> { values(o.get(key)).into_iter().map(|v| v * gap).collect() };
    let atp = Table::read(&out.join("atp.parquet"));
    let what = format!("{fixture} run atp, resid_pre over [layer, pos] (oracle atp/resid_pre × gap {gap:.3e})");
    assert_oracle(&what, &of_hook(&atp, "hook_resid_pre"), &raw("atp/resid_pre"), Baseline::Zero, Tol::Abs(1e-4));
    let atp = Table::read(&out.join("atp_z.parquet"));
    let what =
        format!("{fixture} run atp_z, z over [layer, head] all positions (oracle atp/z_all_pos × gap {gap:.3e})");
    assert_oracle(&what, &of_hook(&atp, "attn.hook_z"), &raw("atp/z_all_pos"), Baseline::Zero, Tol::Abs(1e-4));
    // DLA, every component of every prompt in one comparison per table (a single component can
    // carry no signal of its own; each value is still held to the tolerance).
    let mut dla_checked = 0;
    for key in ["dla_layer", "dla_head"] {
        let Some(theirs) = o.tensors.get(key) else { continue };
        let labels: Vec<String> = serde_json::from_str(&o.metadata[&format!("{key}_labels")]).unwrap();
        let t = Table::read(&out.join(format!("{key}.parquet")));
        let n = theirs.size()[0] as usize;
        let mut ours = Vec::new();
        for label in &labels {
            let v = per_prompt(&t, label);
            assert_eq!(v.len(), n, "{fixture} run {key}: prompts with a {label} row");
            ours.extend(v);
        }
        // Component-major, as `ours`: value i is component labels[i / n], prompt i % n.
        let theirs = values(&theirs.transpose(0, 1));
        let at = worst_at(&ours, &theirs, |i| format!("{} prompt {}", labels[i / n], i % n));
        // "transformer_lens", or "hf" where TransformerLens cannot compute it (dump_zoo.py's hf_reference).
        let source: String = serde_json::from_str(&o.metadata[&format!("{key}_source")]).unwrap();
        let what = format!(
            "{fixture} run {key}, {} components × {n} prompts (oracle {key} from {source}; {at})",
            labels.len()
        );
        assert_oracle(&what, &ours, &theirs, Baseline::Zero, Tol::Abs(1e-4));
        dla_checked += 1;
    }
    // Every family has both: TransformerLens's, or HF's where TransformerLens 4.3 computes no
    // per-head results (GPT-Neo, GPT-J, OPT) or no hook_attn_out (Bloom).
    assert_eq!(dla_checked, 2, "{fixture}: DLA tables the oracle has");
}

/// hook_result and the HF per-head outputs (z_h times the h-th column slice of the out
/// projection's weight) are the same f32 products summed in a different order, over d_head terms;
/// the fixtures measure ~1e-6 of the largest |value| (the forward pass's REL_TOL in
/// forward_vs_transformer_lens.rs, for the same reason).
const HEAD_REL_TOL: f64 = 1e-5;

/// Per-head results where TransformerLens 4.3 has none (its bridge cannot set_use_attn_result
/// for GPT-Neo, GPT-J and OPT): on the unprocessed model and the zoo's clean tokens, each head's
/// hook_result equals HF transformers' own per-head output (dump_zoo.py's hf_result), and the
/// heads summed plus b_O equal HF's attention output (the out projection's, bias included), as
/// does our hook_attn_out.
fn check_head_results(fixture: &str) {
    let o = Oracle::read(fixture, "zoo.safetensors");
    let model = load(fixture, Processing::NONE);
    let tokens = o.get("clean_tokens");
    let n_layers = model.cfg.n_layers;
    let points = (0..n_layers).flat_map(|l| [HookPoint::Block(l, Site::Result), HookPoint::Block(l, Site::AttnOut)]);
    let mut hooks = Hooks::capture(points);
    let _ = model.run(Input::Tokens(tokens), None, &mut hooks, Stop::Logits).unwrap();
    for l in 0..n_layers {
        let result = hooks.cache[&HookPoint::Block(l, Site::Result)].to_kind(Kind::Float); // [batch, pos, head, d_model]
        let attn_out = hooks.cache[&HookPoint::Block(l, Site::AttnOut)].to_kind(Kind::Float);
        let what = format!("{fixture} unprocessed blocks.{l}.attn.hook_result [batch, pos, head, d_model] (oracle hf_result/blocks.{l}, HF transformers)");
        assert_oracle_tensor(
            &what,
            &result,
            o.get(&format!("hf_result/blocks.{l}")),
            Baseline::Zero,
            Tol::OfSignal(HEAD_REL_TOL),
        );
        let hf_attn_out = o.get(&format!("hf_attn_out/blocks.{l}"));
        // A hook_result of zeros would leave b_O alone: that is the sum's baseline.
        let b_o = model.weights.blocks[l].attn.b_o.to_kind(Kind::Float).to_device(attn_out.device());
        let summed = result.sum_dim_intlist(2, false, Kind::Float) + &b_o;
        let bias = values(&b_o.expand(hf_attn_out.size(), false));
        let what = format!("{fixture} unprocessed Σ_head blocks.{l}.attn.hook_result + b_O (oracle hf_attn_out/blocks.{l}, HF transformers)");
        assert_oracle_tensor(&what, &summed, hf_attn_out, Baseline::Values(&bias), Tol::OfSignal(HEAD_REL_TOL));
        let what =
            format!("{fixture} unprocessed blocks.{l}.hook_attn_out (oracle hf_attn_out/blocks.{l}, HF transformers)");
        assert_oracle_tensor(&what, &attn_out, hf_attn_out, Baseline::Values(&bias), Tol::OfSignal(HEAD_REL_TOL));
    }
}

#[test]
fn gpt_neo_head_results_equal_hf_transformers() {
    check_head_results("neo-tiny");
}

#[test]
fn gptj_head_results_equal_hf_transformers() {
    check_head_results("gptj-tiny");
}

#[test]
fn opt_head_results_equal_hf_transformers() {
    check_head_results("opt-tiny");
}

macro_rules! zoo_tests {
    ($($test:ident => $fixture:literal),* $(,)?) => {
        $(
            #[test]
            fn $test() {
                check($fixture);
            }
        )*
    };
}

zoo_tests! {
    llama3_experiments_equal_transformer_lens => "llama3-tiny",
    llama_linear_experiments_equal_transformer_lens => "llama-linear-tiny",
    gpt_neo_experiments_equal_transformer_lens => "neo-tiny",
    gptj_experiments_equal_transformer_lens => "gptj-tiny",
    gpt_neox_experiments_equal_transformer_lens => "neox-tiny",
    opt_experiments_equal_transformer_lens => "opt-tiny",
    mistral_experiments_equal_transformer_lens => "mistral-tiny",
    qwen2_experiments_equal_transformer_lens => "qwen2-tiny",
    qwen3_experiments_equal_transformer_lens => "qwen3-tiny",
    gemma_experiments_equal_transformer_lens => "gemma-tiny",
    gemma2_experiments_equal_transformer_lens => "gemma2-tiny",
    phi_experiments_equal_transformer_lens => "phi-tiny",
    phi3_experiments_equal_transformer_lens => "phi3-tiny",
    stablelm_experiments_equal_transformer_lens => "stablelm-tiny",
    bloom_experiments_equal_transformer_lens => "bloom-tiny",
}

/// The oracle guard itself (tests/common/compare.rs): comparisons without signal are refused and
/// broken outputs fail.
#[test]
fn the_oracle_guard_refuses_comparisons_without_signal() {
    common::compare::guard_self_test();
}

#[test]
fn zoo_list_matches_the_oracle_script() {
    let script = std::fs::read_to_string(repo_root().join("tests/oracle/dump_zoo.py")).unwrap();
    for f in zoo() {
        assert!(script.contains(&format!("\"{f}\"")), "{f} is not in dump_zoo.py's ZOO");
    }
}
