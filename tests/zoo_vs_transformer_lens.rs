//! The experiment kinds on one fixture per further decoder family, end to end through `tl-run`,
//! against TransformerLens 4.3 (tests/oracle/dump_zoo.py): activation patching of resid_pre over
//! [layer, pos] and z over [layer, head] (patching.py), attribution patching of the same two
//! targets (the Attribution Patching demo's formula), and direct logit attribution per layer and
//! per head (decompose_resid / stack_head_results + logit_attrs) where TransformerLens can
//! compute them.
mod common;

use common::*;

const ZOO: [&str; 15] = [
    "llama3-tiny", "llama-linear-tiny", "neo-tiny", "gptj-tiny", "neox-tiny", "opt-tiny", "mistral-tiny", "qwen2-tiny",
    "qwen3-tiny", "gemma-tiny", "gemma2-tiny", "phi-tiny", "phi3-tiny", "stablelm-tiny", "bloom-tiny",
];

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
    let mut rows: Vec<(i64, f64)> =
        t.rows(|t, i| t.str("label", i).as_deref() == Some(label) && t.int("prompt", i).is_some()).into_iter().map(|i| (t.int("prompt", i).unwrap(), t.value(i))).collect();
    rows.sort_by_key(|r| r.0);
    rows.into_iter().map(|r| r.1).collect()
}

fn check(name: &str) {
    let fixture = name;
    let o = Oracle::read(fixture, "zoo.safetensors");
    let dir = run_spec(&spec(fixture, &o), &[]);
    let out = dir.path().join("out");
    // The tokens tl-run made are TransformerLens's (its default prepend_bos for the family).
    let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    let ours: Vec<Vec<i64>> = serde_json::from_value(manifest["tokens"]["clean"].clone()).unwrap();
    let clean = o.get("clean_tokens");
    for (i, row) in ours.iter().enumerate() {
        assert_eq!(*row, Vec::<i64>::try_from(clean.get(i as i64)).unwrap(), "{fixture}: tokens of prompt {i}");
    }
    let patch = Table::read(&out.join("patch_resid.parquet"));
    assert_close(&format!("{fixture} patching resid_pre"), &of_hook(&patch, "hook_resid_pre"), &values(o.get("patch/resid_pre")), 1e-4);
    let patch = Table::read(&out.join("patch_z.parquet"));
    assert_close(&format!("{fixture} patching z all positions"), &of_hook(&patch, "attn.hook_z"), &values(o.get("patch/z_all_pos")), 1e-4);
    // AtP in raw logit-difference units (the demo's metric is normalised by the gap).
    let gap = o.get("clean_baseline").double_value(&[0]) - o.get("corrupted_baseline").double_value(&[0]);
    let raw = |key: &str| -> Vec<f64> { values(o.get(key)).into_iter().map(|v| v * gap).collect() };
    let atp = Table::read(&out.join("atp.parquet"));
    assert_close(&format!("{fixture} AtP resid_pre"), &of_hook(&atp, "hook_resid_pre"), &raw("atp/resid_pre"), 1e-4);
    let atp = Table::read(&out.join("atp_z.parquet"));
    assert_close(&format!("{fixture} AtP z all positions"), &of_hook(&atp, "attn.hook_z"), &raw("atp/z_all_pos"), 1e-4);
    // DLA, per prompt and component.
    let mut dla_checked = 0;
    for key in ["dla_layer", "dla_head"] {
        let Some(theirs) = o.tensors.get(key) else { continue };
        let labels: Vec<String> = serde_json::from_str(&o.metadata[&format!("{key}_labels")]).unwrap();
        let t = Table::read(&out.join(format!("{key}.parquet")));
        for (c, label) in labels.iter().enumerate() {
            assert_close(&format!("{fixture} {key} {label}"), &per_prompt(&t, label), &values(&theirs.select(1, c as i64)), 1e-4);
        }
        dla_checked += 1;
    }
    // TransformerLens 4.3 computes no per-head results for GPT-Neo, GPT-J and OPT, and no
    // hook_attn_out for Bloom: DLA is checked against it everywhere else.
    let expected = match fixture {
        "neo-tiny" | "gptj-tiny" | "opt-tiny" | "bloom-tiny" => 1,
        _ => 2,
    };
    assert_eq!(dla_checked, expected, "{fixture}: DLA tables the oracle has");
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

#[test]
fn zoo_list_matches_the_oracle_script() {
    let script = std::fs::read_to_string(repo_root().join("tests/oracle/dump_zoo.py")).unwrap();
    for f in ZOO {
        assert!(script.contains(&format!("\"{f}\"")), "{f} is not in dump_zoo.py's ZOO");
    }
}
