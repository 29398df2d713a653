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
    let model =
        Model::load(&gguf_path(), &LoadOptions { processing: Processing::NONE, ..LoadOptions::default() }).unwrap();
    assert_eq!(
        (model.cfg.n_layers, model.cfg.d_model, model.cfg.n_heads, model.cfg.n_kv_heads, model.cfg.d_vocab),
        (30, 576, 9, 3, 49152)
    );
    let tok = model.tokenizer().unwrap();
    let prompts: Vec<String> = serde_json::from_str(&o.metadata["prompts"]).unwrap();
    // Held to a tolerance of 1e-4 × the prompt's largest |logit| (a do-nothing model outputs
    // zeros): these logits reach |20| or more through 30 layers, where summation order alone
    // moves the last digits by about 1e-4 (1.12e-4 on a CPU with AVX-512 BF16/AMX kernels), so
    // the bound is the gate's rtol (configs/zoo-ci.toml: atol 1e-4, rtol 1e-4) at the largest
    // logit. The gate's own elementwise bound is checked as well.
    let mut excess = f64::NEG_INFINITY;
    for (i, p) in prompts.iter().enumerate() {
        let theirs: Vec<i64> = Vec::try_from(o.get(&format!("hf_tokens/{i}"))).unwrap();
        assert_eq!(tok.encode(p, false).unwrap(), theirs, "tokens of {p:?}");
        let tokens = tch::Tensor::from_slice(&theirs).unsqueeze(0);
        let logits = model
            .run(Input::Tokens(&tokens), None, &mut Hooks::new(), Stop::Logits)
            .unwrap()
            .squeeze_dim(0)
            .to_kind(tch::Kind::Double);
        let reference = o.get(&format!("hf_logits/{i}")).to_kind(tch::Kind::Double);
        assert_oracle_tensor(
            &format!("SmolLM2 logits of prompt {i} vs transformers (GGUF) (oracle hf_logits/{i})"),
            &logits,
            &reference,
            Baseline::Zero,
            Tol::OfSignal(1e-4),
        );
        // How far past atol + rtol·|reference| the worst element is (≤ 0: within).
        let past = ((&logits - &reference).abs() - (reference.abs() * 1e-4 + 1e-4)).max().double_value(&[]);
        assert!(
            past <= 0.0,
            "SmolLM2 logits of prompt {i}: {past:.3e} past the gate's atol 1e-4 + rtol 1e-4·|reference|"
        );
        excess = excess.max(past);
    }
    eprintln!(
        "worst excess over 1e-4 + 1e-4·|ref| {excess:.2e}  SmolLM2 logits vs transformers (GGUF), {} prompts",
        prompts.len()
    );
    // A real trained model: the IOI answer is its top token.
    let tokens = tch::Tensor::from_slice(&tok.encode(&prompts[0], false).unwrap()).unsqueeze(0);
    let logits = model.run(Input::Tokens(&tokens), None, &mut Hooks::new(), Stop::Logits).unwrap();
    let top = logits.select(1, -1).argmax(-1, false).int64_value(&[0]);
    assert_eq!(tok.token_str(top), " Mary");
}

/// `tl-run hooks` checks a GGUF by its tensors' shapes alone, dequantizing nothing: its listing
/// must be exactly what a forward of the loaded model captures.
#[test]
fn hooks_of_the_gguf_are_what_its_forward_captures() {
    let out = tl_run().args(["hooks", &gguf_path(), "--batch", "2", "--seq", "5"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed: Vec<(String, String)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split_once(' ').map(|(n, s)| (n.to_string(), s.trim().to_string())).unwrap())
        .collect();
    let model = Model::load(&gguf_path(), &LoadOptions::default()).unwrap();
    let tokens = tch::Tensor::zeros([2, 5], (tch::Kind::Int64, tch::Device::Cpu));
    let mut hooks = Hooks::capture_all();
    let _logits = model.run(Input::Tokens(&tokens), None, &mut hooks, Stop::Logits).unwrap();
    let captured: Vec<(String, String)> =
        model.hook_points().iter().map(|p| (p.to_string(), format!("{:?}", hooks.cache[p].size()))).collect();
    assert_eq!(listed, captured);
    assert_eq!(hooks.cache.len(), captured.len(), "the forward captured points the listing lacks");
    // Checked by shape: a key-value head count that does not fit the k and v weights is refused.
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("m.gguf");
    let mut bytes = std::fs::read(gguf_path()).unwrap();
    let key = b"llama.attention.head_count_kv";
    let mut entry = (key.len() as u64).to_le_bytes().to_vec();
    entry.extend(key);
    let at = bytes.windows(entry.len()).position(|w| w == entry.as_slice()).expect("head_count_kv in the metadata")
        + entry.len();
    // The value after the key: its type (u32; 4 = uint32), then the count (3 in SmolLM2).
    assert_eq!(u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()), 4);
    assert_eq!(u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()), 3);
    bytes[at + 4..at + 8].copy_from_slice(&1u32.to_le_bytes());
    std::fs::write(&bad, bytes).unwrap();
    let out = tl_run().args(["hooks", bad.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("k_proj") && !err.contains("panicked"), "{err}");
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
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    let ours: Vec<Vec<i64>> = serde_json::from_value(manifest["tokens"]["clean"].clone()).unwrap();
    let clean = o.get("clean_tokens");
    for (i, row) in ours.iter().enumerate() {
        assert_eq!(
            *row,
            Vec::<i64>::try_from(clean.get(i as i64)).unwrap(),
            "tokens of prompt {i} (TransformerLens's to_tokens)"
        );
    }
    // Raw logit difference (normalize = false): a do-nothing patch leaves the corrupted metric.
    let corrupted = o.get("corrupted_baseline").double_value(&[0]);
    let base = manifest["metric"]["clean_baseline"].as_f64().unwrap();
    assert_oracle(
        "SmolLM2 IOI manifest clean_baseline (oracle clean_baseline)",
        &[base],
        &values(o.get("clean_baseline")),
        Baseline::Value(corrupted),
        Tol::Abs(1e-4),
    );
    for (run, hook, key) in [
        ("resid", "resid_pre over [layer, pos]", "resid_pre"),
        ("heads", "z over [layer, head] all positions", "z_all_pos"),
    ] {
        let t = Table::read(&out.join(format!("{run}.parquet")));
        let ours: Vec<f64> = t.mean_rows().into_iter().map(|i| t.value(i)).collect();
        assert_oracle(
            &format!("SmolLM2 IOI run {run}, {hook} (oracle {key})"),
            &ours,
            &values(o.get(key)),
            Baseline::Value(corrupted),
            Tol::Abs(1e-4),
        );
    }
}
