//! Model loading: hub-cache layout (HF_HUB_CACHE / HF_HOME, offline), sharded safetensors,
//! refusal of pickle checkpoints, and errors that say what is missing and where we looked.
//! Hub lookups run the binary with its own environment, so tests do not race on env vars.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use tl_run::model::config::Processing;
use tl_run::{Hooks, Input, LoadOptions, Model, Stop};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Lays out `fixture` as huggingface_hub does: blobs/, snapshots/<commit>/ symlinks, refs/main.
fn hub_cache(root: &Path, repo_id: &str, fixture_dir: &Path) -> PathBuf {
    let repo = root.join(format!("models--{}", repo_id.replace('/', "--")));
    let snap = repo.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), COMMIT).unwrap();
    for entry in std::fs::read_dir(fixture_dir).unwrap() {
        let entry = entry.unwrap();
        let blob = repo.join("blobs").join(format!("blob-{}", entry.file_name().to_string_lossy()));
        std::fs::copy(entry.path(), &blob).unwrap();
        std::os::unix::fs::symlink(&blob, snap.join(entry.file_name())).unwrap();
    }
    repo
}

fn tl_run(args: &[&str], env: &[(&str, &Path)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tl-run"));
    cmd.args(args).env_remove("HF_HOME").env_remove("HF_HUB_CACHE").env("HF_HUB_OFFLINE", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[test]
fn loads_from_hub_cache_offline_via_hf_hub_cache_and_hf_home() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("home/hub");
    hub_cache(&cache, "tl-run-fixtures/gpt2-tiny", &fixture("gpt2-tiny"));
    let expected = String::from_utf8(tl_run(&["hooks", fixture("gpt2-tiny").to_str().unwrap()], &[]).stdout).unwrap();
    assert!(expected.contains("blocks.1.hook_resid_post"));

    let via_cache = tl_run(&["hooks", "tl-run-fixtures/gpt2-tiny"], &[("HF_HUB_CACHE", &cache)]);
    assert!(via_cache.status.success(), "{}", String::from_utf8_lossy(&via_cache.stderr));
    assert_eq!(String::from_utf8(via_cache.stdout).unwrap(), expected);

    let via_home =
        tl_run(&["hooks", "tl-run-fixtures/gpt2-tiny", "--revision", COMMIT], &[("HF_HOME", &tmp.path().join("home"))]);
    assert!(via_home.status.success(), "{}", String::from_utf8_lossy(&via_home.stderr));

    // Offline and not cached: no network attempt, and the error says where it looked.
    let missing = tl_run(&["hooks", "tl-run-fixtures/absent"], &[("HF_HUB_CACHE", &cache)]);
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(err.contains("HF_HUB_OFFLINE") && err.contains(cache.to_str().unwrap()), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn hub_cache_resolution_records_the_commit() {
    let tmp = tempfile::tempdir().unwrap();
    hub_cache(tmp.path(), "org/llama-tiny", &fixture("llama-tiny"));
    // Resolve the layout directly through the library's cache reader.
    let files = tl_run::model::source::resolve_in_cache(tmp.path(), "org/llama-tiny", "main").unwrap();
    assert_eq!(files.commit.as_deref(), Some(COMMIT));
    assert!(files.weights[0].ends_with("model.safetensors"));
    assert!(files.tokenizer.is_some());
}

#[test]
fn sharded_checkpoints_load_like_single_files() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("gpt2-tiny");
    let tensors = tch::Tensor::read_safetensors(src.join("model.safetensors")).unwrap();
    let (a, b): (Vec<_>, Vec<_>) = tensors.into_iter().enumerate().partition(|(i, _)| i % 2 == 0);
    let mut map = serde_json::Map::new();
    for (file, part) in [("model-00001-of-00002.safetensors", a), ("model-00002-of-00002.safetensors", b)] {
        let part: Vec<(String, tch::Tensor)> = part.into_iter().map(|(_, t)| t).collect();
        for (n, _) in &part {
            map.insert(n.clone(), serde_json::Value::String(file.into()));
        }
        tch::Tensor::write_safetensors(&part, tmp.path().join(file)).unwrap();
    }
    std::fs::write(
        tmp.path().join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
    }
    let opts = LoadOptions { processing: Processing::TRANSFORMER_LENS, ..LoadOptions::default() };
    let sharded = Model::load(tmp.path().to_str().unwrap(), &opts).unwrap();
    assert_eq!(sharded.files.as_ref().unwrap().weights.len(), 2);
    let single = load("gpt2-tiny", Processing::TRANSFORMER_LENS);
    let toks = Oracle::read("gpt2-tiny", "processed-single.safetensors").get("tokens").shallow_clone();
    let x = sharded.run(Input::Tokens(&toks), None, &mut Hooks::new(), Stop::Logits).unwrap();
    let y = single.run(Input::Tokens(&toks), None, &mut Hooks::new(), Stop::Logits).unwrap();
    assert_eq!(max_abs_diff(&x, &y), 0.0);
}

#[test]
fn pickle_checkpoints_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("gpt2-tiny").join("config.json"), tmp.path().join("config.json")).unwrap();
    std::fs::write(tmp.path().join("pytorch_model.bin"), b"not loaded").unwrap();
    let err = Model::load(tmp.path().to_str().unwrap(), &LoadOptions::default()).err().expect("must fail").to_string();
    assert!(err.contains("pytorch_model.bin") && err.contains("safetensors only"), "{err}");
}

#[test]
fn missing_tensors_are_named_with_the_nearest_present() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("gpt2-tiny");
    let tensors: Vec<(String, tch::Tensor)> = tch::Tensor::read_safetensors(src.join("model.safetensors"))
        .unwrap()
        .into_iter()
        .filter(|(n, _)| !n.ends_with("h.1.ln_2.weight"))
        .collect();
    tch::Tensor::write_safetensors(&tensors, tmp.path().join("model.safetensors")).unwrap();
    std::fs::copy(src.join("config.json"), tmp.path().join("config.json")).unwrap();
    let err = Model::load(tmp.path().to_str().unwrap(), &LoadOptions::default()).err().expect("must fail").to_string();
    assert!(err.contains("h.1.ln_2.weight") && err.contains("nearest"), "{err}");
}

/// Converters hand the nn.Linear MLP matrices over as transposed views (so `tl-run hooks` copies
/// nothing); a loaded model's must be contiguous, the layout its forward is fast with, whatever
/// the family and dtype.
#[test]
fn loaded_mlp_matrices_are_contiguous() {
    for name in &every_family() {
        for kind in [tch::Kind::Float, tch::Kind::BFloat16] {
            let opts = LoadOptions { processing: Processing::TRANSFORMER_LENS, kind, ..LoadOptions::default() };
            let model = Model::load(fixture(name).to_str().unwrap(), &opts).unwrap();
            for (l, b) in model.weights.blocks.iter().enumerate() {
                let m = &b.mlp;
                for (what, t) in [("w_in", Some(&m.w_in)), ("w_gate", m.w_gate.as_ref()), ("w_out", Some(&m.w_out))] {
                    if let Some(t) = t {
                        assert!(
                            t.is_contiguous(),
                            "{name} {kind:?}: block {l}'s {what} is not contiguous (strides {:?})",
                            t.stride()
                        );
                    }
                }
            }
        }
    }
}

/// The FAMILIES table's layout of each family is what its config parser builds, on every
/// fixture (and every fixture's model_type is in the table).
#[test]
fn every_fixtures_family_has_the_layout_the_families_table_gives() {
    use tl_run::model::families::{self, Layout};
    let mut seen = std::collections::BTreeSet::new();
    for name in every_family() {
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixture(&name).join("config.json")).unwrap()).unwrap();
        let f = families::of(&json).unwrap();
        let cfg = (f.config)(&json).unwrap();
        let parallel = match f.layout {
            Layout::Sequential => false,
            Layout::Parallel => true,
            Layout::ParallelIfConfigured => json["use_parallel_residual"].as_bool().unwrap_or(true),
        };
        assert_eq!(cfg.parallel_block, parallel, "{name}: {:?}", f.layout);
        seen.insert(json["model_type"].as_str().unwrap().to_string());
    }
    // Every family of the table has a fixture.
    for f in families::FAMILIES {
        assert!(f.model_types.iter().any(|t| seen.contains(*t)), "no fixture of {:?}", f.model_types);
    }
}
