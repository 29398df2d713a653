//! SAEs in SAELens's on-disk format, loaded and run by tl-run, against SAELens 6.54 itself
//! (tests/oracle/sae_values.py, run here in its own venv from scripts/sae_lens.sh): random-init
//! SAEs of every architecture (standard, JumpReLU, TopK with and without the decoder-norm
//! rescale, gated), both run-time normalisations, a hook_z SAE, pre-6.0 flat cfg.json files, and
//! inputs on the activations' edges (TopK rows with fewer than k positive pre-activations,
//! JumpReLU pre-activations exactly at the threshold, gate pre-activations exactly 0); every value
//! SAELens hooks on the same input equals ours, and so does the config SAELens reads.
mod common;

use std::process::Command;

use common::*;
use tch::Tensor;
use tl_run::model::sae::{Architecture, Normalize, Sae};

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
        "jumprelu_at_threshold",
        "topk",
        "topk_few_positive",
        "topk_rescaled",
        "gated",
        "gated_at_zero",
        "hook_z",
        "constant_norm_rescale",
        "layer_norm",
        "topk_pre6",
        "hook_z_pre6",
        "standard_unversioned",
    ];
    for name in names {
        let dir = out.path().join(name);
        let sae = Sae::load(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        check_config(name, &sae, &dir);
        let theirs: std::collections::HashMap<String, Tensor> =
            Tensor::read_safetensors(dir.join("values.safetensors")).unwrap().into_iter().collect();
        let x = &theirs["x"];
        let ours = sae.forward(x).unwrap_or_else(|e| panic!("{name}: {e}"));
        // hook_sae_input is the input itself, flattened for hook_z: equal, not an effect.
        let flat_x = if sae.cfg.hook_z { x.flatten(-2, -1) } else { x.shallow_clone() };
        assert!(ours.input.equal(&theirs["hook_sae_input"]) && ours.input.equal(&flat_x), "{name}: hook_sae_input");
        for (hook, value) in [("hook_sae_acts_pre", &ours.acts_pre), ("hook_sae_recons", &ours.recons)] {
            assert_oracle_tensor(&format!("{name}: {hook}"), value, &theirs[hook], Baseline::Zero, Tol::Abs(1e-5));
        }
        // The output against the input (what an SAE that passed x through would give).
        let x_values: Vec<f64> = Vec::try_from(x.flatten(0, -1).to_kind(tch::Kind::Double)).unwrap();
        assert_oracle_tensor(
            &format!("{name}: hook_sae_output"),
            &ours.output,
            &theirs["hook_sae_output"],
            Baseline::Values(&x_values),
            Tol::Abs(1e-5),
        );
        // The latents against zero, and, where the activation is more than a ReLU, against the
        // ReLU of SAELens's pre-activation (so the activation itself is what is compared).
        let post = &theirs["hook_sae_acts_post"];
        assert_oracle_tensor(
            &format!("{name}: hook_sae_acts_post"),
            &ours.acts_post,
            post,
            Baseline::Zero,
            Tol::Abs(1e-5),
        );
        if sae.cfg.architecture != Architecture::Standard {
            let relu: Vec<f64> =
                Vec::try_from(theirs["hook_sae_acts_pre"].relu().flatten(0, -1).to_kind(tch::Kind::Double)).unwrap();
            assert_oracle_tensor(
                &format!("{name}: hook_sae_acts_post against ReLU(acts_pre)"),
                &ours.acts_post,
                post,
                Baseline::Values(&relu),
                Tol::Abs(1e-5),
            );
        }
        check_edges(name, &sae, &theirs);
    }
}

/// The config SAELens read from the folder (its cfg.to_dict(), with the class it built) equals
/// ours: hook, architecture, k, widths, normalisation, reshape, b_dec on the input.
fn check_config(name: &str, sae: &Sae, dir: &std::path::Path) {
    let read: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cfg_read.json")).unwrap()).unwrap();
    let c = &sae.cfg;
    assert_eq!(c.hook_name.as_deref(), read["metadata"]["hook_name"].as_str(), "{name}: hook_name");
    assert_eq!(c.d_in, read["d_in"].as_i64().unwrap(), "{name}: d_in");
    assert_eq!(c.d_sae, read["d_sae"].as_i64().unwrap(), "{name}: d_sae");
    assert_eq!(c.apply_b_dec_to_input, read["apply_b_dec_to_input"].as_bool().unwrap(), "{name}: apply_b_dec_to_input");
    assert_eq!(c.hook_z, read["reshape_activations"] == "hook_z", "{name}: reshape_activations");
    let normalize = match read["normalize_activations"].as_str().unwrap() {
        "none" | "expected_average_only_in" => Normalize::Identity,
        "constant_norm_rescale" => Normalize::ConstantNormRescale,
        "layer_norm" => Normalize::LayerNorm,
        other => panic!("{name}: SAELens read normalize_activations {other}"),
    };
    assert_eq!(c.normalize, normalize, "{name}: normalize_activations");
    let architecture = match read["class"].as_str().unwrap() {
        "StandardSAE" => Architecture::Standard,
        "JumpReLUSAE" => Architecture::JumpRelu,
        "GatedSAE" => Architecture::Gated,
        "TopKSAE" => Architecture::TopK {
            k: read["k"].as_i64().unwrap(),
            rescale_by_decoder_norm: read["rescale_acts_by_decoder_norm"].as_bool().unwrap(),
        },
        other => panic!("{name}: SAELens built {other}"),
    };
    assert_eq!(c.architecture, architecture, "{name}: architecture");
}

/// The fixtures that put the activation's edge cases on the input really do (so an `>=` for `>`,
/// or a TopK without its ReLU, would fail the comparisons above).
fn check_edges(name: &str, sae: &Sae, theirs: &std::collections::HashMap<String, Tensor>) {
    let (pre, post) = (&theirs["hook_sae_acts_pre"], &theirs["hook_sae_acts_post"]);
    let count = |t: Tensor| t.to_kind(tch::Kind::Int64).sum(tch::Kind::Int64).int64_value(&[]);
    let active = post.ne(0.0).to_kind(tch::Kind::Float).mean(tch::Kind::Float).double_value(&[]);
    assert!(active > 0.0 && active < 0.9, "{name}: {active:.2} of SAELens's latents active");
    match name {
        "jumprelu_at_threshold" => {
            let at = pre.eq_tensor(sae.threshold.as_ref().unwrap()).logical_and(&pre.gt(0.0));
            assert!(count(at) >= 5, "{name}: no positive pre-activation exactly at its threshold");
        }
        "topk_few_positive" => {
            let per_row = post.ne(0.0).sum_dim_intlist([-1i64].as_slice(), false, tch::Kind::Int64);
            assert!(per_row.min().int64_value(&[]) < 8, "{name}: every row has k positive pre-activations");
        }
        "topk_rescaled" => {
            // The rescale changes which latents are chosen in some row.
            let (_, unscaled) = pre.topk(8, -1, true, true);
            let picked = post.zeros_like().scatter_value(-1, &unscaled, 1.0).ne(0.0);
            let differs = count(picked.logical_xor(&post.ne(0.0)).logical_and(&post.ne(0.0)));
            assert!(differs > 0, "{name}: the decoder-norm rescale changes no choice");
        }
        _ => {}
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
