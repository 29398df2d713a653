//! The binary as a user runs it: `hooks`, `cache`, and readable errors (never a panic).
mod common;

use std::process::Command;

use common::*;
use tl_run::model::config::Processing;
use tl_run::{Hooks, Input, Stop};

fn tl_run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tl-run")).args(args).env("HF_HUB_OFFLINE", "1").output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn hooks_lists_every_point_with_its_shape() {
    let dir = fixture("stories260K");
    let (ok, out, err) = tl_run(&["hooks", dir.to_str().unwrap(), "--seq", "7"]);
    assert!(ok, "{err}");
    assert!(out.contains("blocks.4.attn.hook_k") && out.contains("[1, 7, 4, 8]"), "{out}");
    assert!(out.contains("blocks.0.attn.hook_rot_q") && !out.contains("hook_pos_embed"));
    assert_eq!(out.lines().count(), 1 + 5 * 21 + 2);
}

/// `hooks` lists from the config, checking the checkpoint without loading it: its names and shapes
/// must be exactly what a forward of the loaded model captures, in every family.
#[test]
fn hooks_lists_what_a_forward_captures_in_every_family() {
    for name in &every_family() {
        let (ok, out, err) = tl_run(&["hooks", fixture(name).to_str().unwrap(), "--batch", "2", "--seq", "5"]);
        assert!(ok, "{name}: {err}");
        let listed: Vec<(String, String)> = out
            .lines()
            .map(|l| l.split_once(' ').map(|(n, s)| (n.to_string(), s.trim().to_string())).unwrap())
            .collect();
        let model = load(name, Processing::TRANSFORMER_LENS);
        let tokens = tch::Tensor::zeros([2, 5], (tch::Kind::Int64, tch::Device::Cpu));
        let mut hooks = Hooks::capture_all();
        let _logits = model.run(Input::Tokens(&tokens), None, &mut hooks, Stop::Logits).unwrap();
        let captured: Vec<(String, String)> =
            model.hook_points().iter().map(|p| (p.to_string(), format!("{:?}", hooks.cache[p].size()))).collect();
        assert_eq!(listed, captured, "{name}");
        assert_eq!(hooks.cache.len(), captured.len(), "{name}: the forward captured points the listing lacks");
    }
}

#[test]
fn cache_writes_named_activations_equal_to_the_library() {
    let tmp = tempfile::tempdir().unwrap();
    let out_file = tmp.path().join("acts.safetensors");
    let dir = fixture("gpt2-odd");
    let prompts = ["When John and Mary went to the shops, John gave the bag to", "Hi"];
    let (ok, out, err) = tl_run(&[
        "cache",
        dir.to_str().unwrap(),
        "--prompt",
        prompts[0],
        "--prompt",
        prompts[1],
        "--hooks",
        "blocks.2.attn.hook_pattern,blocks.0.hook_resid_post",
        "--out",
        out_file.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("wrote 2 activations"), "{out}");
    let bytes = std::fs::read(&out_file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names = st.names();
    names.sort();
    assert_eq!(names, ["blocks.0.hook_resid_post", "blocks.2.attn.hook_pattern"]);
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    assert_eq!(meta["padding_side"], "left");

    let model = load("gpt2-odd", Processing::TRANSFORMER_LENS);
    let batch = model.tokenizer().unwrap().batch(&prompts, true).unwrap();
    let point = model.hook_point("blocks.0.hook_resid_post").unwrap();
    let mut hooks = Hooks::capture([point]);
    let _ = model.run(Input::Tokens(&batch.tokens), batch.mask.as_ref(), &mut hooks, Stop::Logits).unwrap();
    let written = tch::Tensor::read_safetensors(&out_file)
        .unwrap()
        .into_iter()
        .find(|(n, _)| n == "blocks.0.hook_resid_post")
        .unwrap()
        .1;
    assert_eq!(written.size(), [2, 15, 96]);
    assert_eq!(max_abs_diff(&written, &hooks.cache[&point]), 0.0);
    // Nothing temporary is left beside the output.
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
}

#[test]
fn unknown_hooks_get_suggestions_and_bad_layers_the_range() {
    let dir = fixture("gpt2-tiny");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.safetensors");
    let no_panic = |e: &str| {
        assert!(!e.contains("panicked") && !e.contains("backtrace") && !e.contains("internal failure"), "{e}")
    };
    let (ok, _, err) = tl_run(&[
        "cache",
        dir.to_str().unwrap(),
        "--prompt",
        "hi",
        "--hooks",
        "blocks.0.hook_resid_pr",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("did you mean 'blocks.0.hook_resid_pre'"), "{err}");
    no_panic(&err);
    let (ok, _, err) = tl_run(&[
        "cache",
        dir.to_str().unwrap(),
        "--prompt",
        "hi",
        "--hooks",
        "blocks.7.hook_resid_pre",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("2 layers: 0-1"), "{err}");
    no_panic(&err);
    let (ok, _, err) = tl_run(&["hooks", "/nonexistent/model"]);
    assert!(!ok && err.contains("no such directory"), "{err}");
    no_panic(&err);
    assert!(!out.exists());
}

/// `tl-run tokenize` gives the token ids TransformerLens's to_tokens gave the oracle for the same
/// text (GPT-2's BPE with BOS prepended; the stories tokenizer, which adds <s> itself), and says
/// whether an answer is one token.
#[test]
fn tokenize_shows_the_tokens_transformer_lens_makes() {
    for fixture_name in ["gpt2-tiny", "llama-tiny"] {
        let oracle = Oracle::read(fixture_name, "processed-single.safetensors");
        let text = oracle.prompts()[0].clone();
        let expected: Vec<i64> = Vec::try_from(oracle.get("tokens").get(0)).unwrap();
        assert!(expected.len() > 5, "{fixture_name}: the oracle's prompt has {} tokens", expected.len());
        let out = ok(&["tokenize", fixture(fixture_name).to_str().unwrap(), &text, "--answer", " Mary", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let ids: Vec<i64> =
            v["texts"][0]["tokens"].as_array().unwrap().iter().map(|t| t["id"].as_i64().unwrap()).collect();
        assert_eq!(ids, expected, "{fixture_name}: {text:?}");
        let positions: Vec<u64> =
            v["texts"][0]["tokens"].as_array().unwrap().iter().map(|t| t["pos"].as_u64().unwrap()).collect();
        assert_eq!(positions, (0..expected.len() as u64).collect::<Vec<_>>());
    }
    let out =
        ok(&["tokenize", fixture("gpt2-tiny").to_str().unwrap(), "x", "--answer", " Mary", "--answer", " Maryanne"]);
    assert!(out.contains("answer \" Mary\": one token"), "{out}");
    assert!(out.contains("answer \" Maryanne\": 2 tokens: not usable as a single-token answer"), "{out}");
}
