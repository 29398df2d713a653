//! The real default model, SmolLM2-135M-Instruct from its Q4_1 GGUF (fetched and checked by
//! scripts/setup.sh): tl-run's GGUF reader against transformers' own GGUF loading — the tokens
//! of the IOI prompts and the logits (unprocessed, so HF's numerics) — and the IOI patching
//! (resid_pre over [layer, pos], z over [layer, head], the first two IOI pairs) against
//! TransformerLens's patching.py on the same dequantized weights (tests/oracle/dump_smollm2.py).
mod common;

use common::*;
use tl_run::model::config::Processing;
use tl_run::{Hooks, Input, LoadOptions, Model, Stop};

fn gguf_path() -> String {
    let p = repo_root().join(".models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.is_file(), "{} is missing: run scripts/setup.sh", p.display());
    p.display().to_string()
}

#[test]
fn gguf_tokens_and_logits_equal_transformers() {
    let o = Oracle::read("smollm2", "gguf.safetensors");
    let model = Model::load(&gguf_path(), &LoadOptions { processing: Processing::NONE, ..LoadOptions::default() }).unwrap();
    assert_eq!((model.cfg.n_layers, model.cfg.d_model, model.cfg.n_heads, model.cfg.n_kv_heads, model.cfg.d_vocab), (30, 576, 9, 3, 49152));
    let tok = model.tokenizer().unwrap();
    let prompts: Vec<String> = serde_json::from_str(&o.metadata["prompts"]).unwrap();
    let mut worst: f64 = 0.0;
    for (i, p) in prompts.iter().enumerate() {
        let theirs: Vec<i64> = Vec::try_from(o.get(&format!("hf_tokens/{i}"))).unwrap();
        assert_eq!(tok.encode(p, false).unwrap(), theirs, "tokens of {p:?}");
        let tokens = tch::Tensor::from_slice(&theirs).unsqueeze(0);
        let logits = model.run(Input::Tokens(&tokens), None, &mut Hooks::new(), Stop::Logits).unwrap().squeeze_dim(0);
        worst = worst.max(max_abs_diff(&logits, o.get(&format!("hf_logits/{i}"))));
    }
    eprintln!("max |diff| {worst:.2e}  SmolLM2 logits vs transformers (GGUF), 8 prompts");
    assert!(worst <= 1e-4, "logits differ from transformers by {worst:.3e}");
    // A real trained model: the IOI answer is its top token.
    let tokens = tch::Tensor::from_slice(&tok.encode(&prompts[0], false).unwrap()).unsqueeze(0);
    let logits = model.run(Input::Tokens(&tokens), None, &mut Hooks::new(), Stop::Logits).unwrap();
    let top = logits.select(1, -1).argmax(-1, false).int64_value(&[0]);
    assert_eq!(tok.token_str(top), " Mary");
}

#[test]
fn ioi_patching_equals_patching_py() {
    let o = Oracle::read("smollm2", "patching.safetensors");
    let spec = format!(
        "name = \"smollm2\"\n[model]\nid = \"{}\"\n{}[corruption]\nkind = \"swap_pairs\"\n[metric]\nkind = \"logit_diff\"\nnormalize = false\n\n[[run]]\nname = \"resid\"\nkind = \"activation_patching\"\nhooks = [\"resid_pre\"]\nover = [\"layer\", \"pos\"]\n\n[[run]]\nname = \"heads\"\nkind = \"activation_patching\"\nhooks = [\"z\"]\nover = [\"layer\", \"head\"]\n",
        gguf_path(),
        prompts_toml(&o)
    );
    let dir = run_spec(&spec, &[]);
    let out = dir.path().join("out");
    let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    let ours: Vec<Vec<i64>> = serde_json::from_value(manifest["tokens"]["clean"].clone()).unwrap();
    let clean = o.get("clean_tokens");
    for (i, row) in ours.iter().enumerate() {
        assert_eq!(*row, Vec::<i64>::try_from(clean.get(i as i64)).unwrap(), "tokens of prompt {i} (TransformerLens's to_tokens)");
    }
    let base = manifest["metric"]["clean_baseline"].as_f64().unwrap();
    assert!((base - o.get("clean_baseline").double_value(&[0])).abs() <= 1e-4, "clean baseline {base}");
    for (run, key) in [("resid", "resid_pre"), ("heads", "z_all_pos")] {
        let t = Table::read(&out.join(format!("{run}.parquet")));
        let ours: Vec<f64> = t.mean_rows().into_iter().map(|i| t.value(i)).collect();
        assert_close(&format!("SmolLM2 IOI patching {key}"), &ours, &values(o.get(key)), 1e-4);
    }
}
