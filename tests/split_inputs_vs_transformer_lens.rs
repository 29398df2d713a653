//! The receivers of edge attribution against TransformerLens (tests/oracle/split_inputs.py, run
//! here): hook_q_input / hook_k_input / hook_v_input (the residual copied per head, then ln1 per
//! head; k and v per key-value head) and hook_mlp_in, each edited in one head's copy (or the MLP's
//! input) of one layer, on GPT-2 and on a Llama with grouped-query attention. Each edit must move
//! the logits by at least 20x the tolerance, so a path that ignored it would fail.
mod common;

use std::process::Command;

use common::*;
use tl_run::engine::hooks::{Edit, Intervention, Sel};
use tl_run::model::config::Processing;
use tl_run::model::hook_point::{HookPoint, Site};
use tl_run::{Hooks, Input, Stop};

#[test]
fn split_qkv_and_mlp_inputs_equal_transformer_lens() {
    for (name, layer, head, kv_head) in [("gpt2-tiny", 1usize, 1i64, 1i64), ("llama-tiny", 1, 3, 1)] {
        let model = load(name, Processing::TRANSFORMER_LENS);
        let tok = model.tokenizer().unwrap();
        let text = if uses_gpt2_tokenizer(name) {
            "When Mary and John went to the shops, John gave"
        } else {
            "Lily and Tim went to the park. Tim gave"
        };
        let ids = tok.encode(text, model.cfg.default_prepend_bos).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("oracle.json");
        let py = repo_root().join(".venv/bin/python");
        assert!(py.exists(), "no .venv: run scripts/setup.sh");
        let run = Command::new(py)
            .arg(repo_root().join("tests/oracle/split_inputs.py"))
            .arg(fixture(name))
            .arg(serde_json::to_string(&ids).unwrap())
            .args([layer.to_string(), head.to_string(), kv_head.to_string()])
            .arg(&out)
            .output()
            .unwrap();
        assert!(run.status.success(), "oracle failed: {}", String::from_utf8_lossy(&run.stderr));
        let theirs: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        let floats =
            |k: &str| -> Vec<f64> { theirs[k].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect() };
        let (h, kv, d) = (model.cfg.n_heads as i64, model.cfg.n_kv_heads as i64, model.cfg.d_model as i64);
        assert_eq!(theirs["q_input_shape"], serde_json::json!([1, ids.len(), h, d]), "{name} hook_q_input shape");
        assert_eq!(theirs["k_input_shape"], serde_json::json!([1, ids.len(), kv, d]), "{name} hook_k_input shape");
        let tokens = tch::Tensor::from_slice(&ids).unsqueeze(0);
        let delta = tch::Tensor::from_slice(&(0..d).map(|i| 3.0 * ((i + 1) as f32).sin()).collect::<Vec<f32>>());
        let logits = |hooks: &mut Hooks| -> Vec<f64> {
            let out = model.run(Input::Tokens(&tokens), None, hooks, Stop::Logits).unwrap();
            Vec::try_from(out.get(0).get(-1).to_kind(tch::Kind::Double)).unwrap()
        };
        let none = logits(&mut Hooks::new());
        assert_oracle(
            &format!("{name} logits, nothing edited (oracle none)"),
            &none,
            &floats("none"),
            Baseline::Zero,
            Tol::Abs(1e-4),
        );
        for (key, site, index) in [
            ("q", Site::QInput, Some(head)),
            ("k", Site::KInput, Some(kv_head)),
            ("v", Site::VInput, Some(kv_head)),
            ("mlp", Site::MlpIn, None),
        ] {
            let mut edit = Intervention::new(Edit::Add(delta.shallow_clone()));
            if let Some(i) = index {
                edit = edit.head(Sel::One(i));
            }
            let mut hooks = Hooks::new().intervene(HookPoint::Block(layer, site), edit);
            let ours = logits(&mut hooks);
            // Against the unedited logits: the edit must move them by 20x the tolerance.
            assert_oracle(
                &format!("{name} logits with {} edited (oracle {key})", HookPoint::Block(layer, site)),
                &ours,
                &floats(key),
                Baseline::Values(&none),
                Tol::Abs(1e-4),
            );
        }
    }
}
