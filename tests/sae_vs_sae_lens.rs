//! SAEs in SAELens's on-disk format, loaded and run by tl-run, against SAELens 6.54 itself
//! (tests/oracle/sae_values.py, run here in its own venv from scripts/sae_lens.sh): random-init
//! SAEs of every architecture (standard, JumpReLU, TopK with and without the decoder-norm
//! rescale, gated), both run-time normalisations, a hook_z SAE, and a pre-6.0 flat cfg.json;
//! every value SAELens hooks on the same input equals ours.
mod common;

use std::process::Command;

use common::*;
use tch::Tensor;
use tl_run::model::sae::Sae;

#[test]
fn every_sae_hook_value_equals_sae_lens() {
    let py = repo_root().join(".venv-saelens/bin/python");
    assert!(py.exists(), "no .venv-saelens: run scripts/sae_lens.sh");
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(py).arg(repo_root().join("tests/oracle/sae_values.py")).arg(out.path()).output().unwrap();
    assert!(run.status.success(), "SAELens oracle failed: {}", String::from_utf8_lossy(&run.stderr));
    let names = [
        "standard",
        "jumprelu",
        "topk",
        "topk_rescaled",
        "gated",
        "hook_z",
        "constant_norm_rescale",
        "layer_norm",
        "topk_pre6",
    ];
    for name in names {
        let dir = out.path().join(name);
        let sae = Sae::load(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        let theirs: std::collections::HashMap<String, Tensor> =
            Tensor::read_safetensors(dir.join("values.safetensors")).unwrap().into_iter().collect();
        let ours = sae.forward(&theirs["x"]);
        let pairs = [
            ("hook_sae_input", &ours.input),
            ("hook_sae_acts_pre", &ours.acts_pre),
            ("hook_sae_acts_post", &ours.acts_post),
            ("hook_sae_recons", &ours.recons),
            ("hook_sae_output", &ours.output),
        ];
        for (hook, value) in pairs {
            assert_oracle_tensor(&format!("{name}: {hook}"), value, &theirs[hook], Baseline::Zero, Tol::Abs(1e-5));
        }
        // The latents are sparse where the architecture makes them so: a comparison that passed
        // with every latent active (or none) would not test the activation.
        let active = ours.acts_post.ne(0.0).to_kind(tch::Kind::Float).mean(tch::Kind::Float).double_value(&[]);
        assert!(active > 0.0 && active < 0.9, "{name}: {active:.2} of the latents active");
        if name.starts_with("topk") {
            let per_row = ours.acts_post.ne(0.0).sum_dim_intlist([-1i64].as_slice(), false, tch::Kind::Int64);
            assert!(per_row.max().int64_value(&[]) <= 8, "{name}: more than k latents active");
        }
    }
}

#[test]
fn bad_sae_folders_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let err = Sae::load(dir.path()).err().expect("no cfg.json").to_string();
    assert!(err.contains("cfg.json"), "{err}");
    std::fs::write(
        dir.path().join("cfg.json"),
        r#"{"d_in":4,"d_sae":8,"dtype":"float32","architecture":"standard","metadata":{"sae_lens_version":"6.54.0"}}"#,
    )
    .unwrap();
    let err = Sae::load(dir.path()).err().expect("no weights").to_string();
    assert!(err.contains("sae_weights.safetensors"), "{err}");
    // Widths that disagree with cfg.json name the tensor and both shapes.
    let t = |shape: &[i64]| Tensor::zeros(shape, (tch::Kind::Float, tch::Device::Cpu));
    let (w_enc, w_dec, b_enc, b_dec) = (t(&[4, 9]), t(&[8, 4]), t(&[8]), t(&[4]));
    Tensor::write_safetensors(
        &[("W_enc", &w_enc), ("W_dec", &w_dec), ("b_enc", &b_enc), ("b_dec", &b_dec)],
        dir.path().join("sae_weights.safetensors"),
    )
    .unwrap();
    let err = Sae::load(dir.path()).err().expect("a wrong width").to_string();
    assert!(err.contains("W_enc") && err.contains("[4, 9]") && err.contains("[4, 8]"), "{err}");
}
