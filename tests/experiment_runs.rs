//! `tl-run SPEC` end to end: experiments/ioi.toml on a local fixture and on a hub-cache layout,
//! Parquet and manifest contents against TransformerLens's patching.py, and user-facing errors.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use arrow::array::{Array, BooleanArray, Float64Array, Int32Array, StringArray};
use arrow::record_batch::RecordBatch;
use common::*;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

fn tl_run(args: &[&str], env: &[(&str, &Path)]) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tl-run"));
    cmd.args(args).env("HF_HUB_OFFLINE", "1").env_remove("HF_HOME").env_remove("HF_HUB_CACHE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn read_parquet(path: &Path) -> RecordBatch {
    let file = std::fs::File::open(path).unwrap();
    let reader = ParquetRecordBatchReaderBuilder::try_new(file).unwrap().build().unwrap();
    let batches: Vec<RecordBatch> = reader.map(|b| b.unwrap()).collect();
    arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap()
}

fn col<'a, T: 'static>(b: &'a RecordBatch, name: &str) -> &'a T {
    b.column_by_name(name).unwrap_or_else(|| panic!("no column {name}")).as_any().downcast_ref::<T>().unwrap()
}

fn ioi_spec() -> PathBuf {
    repo_root().join("experiments/ioi.toml")
}

/// The mean rows of `hook_suffix` in the table, in TL's row-major order for [layer, pos|head].
fn mean_values(b: &RecordBatch, hook_suffix: &str) -> Vec<f64> {
    let (hook, prompt, value) =
        (col::<StringArray>(b, "hook"), col::<Int32Array>(b, "prompt"), col::<Float64Array>(b, "value"));
    (0..b.num_rows())
        .filter(|&i| hook.value(i).ends_with(hook_suffix) && prompt.is_null(i))
        .map(|i| value.value(i))
        .collect()
}

fn check_against_oracle(out: &Path) {
    let oracle = Oracle::read("gpt2-tiny", "patching.safetensors");
    let (clean_b, corr_b) =
        (oracle.get("clean_baseline").double_value(&[0]), oracle.get("corrupted_baseline").double_value(&[0]));
    let resid = read_parquet(&out.join("resid.parquet"));
    assert_eq!(resid.num_rows(), 3 * 2 * 15);
    for name in
        ["run", "kind", "hook", "layer", "head", "pos", "dest_pos", "src_pos", "prompt", "value", "token", "computed"]
    {
        assert!(resid.column_by_name(name).is_some(), "missing column {name}");
    }
    assert_eq!(col::<StringArray>(&resid, "kind").value(0), "activation_patching");
    assert_eq!(col::<StringArray>(&resid, "token").value(10), " John");
    assert!(!col::<BooleanArray>(&resid, "computed").value(0), "position 0 cannot change");
    assert!(col::<Int32Array>(&resid, "head").is_null(0));
    for (suffix, key) in [("hook_resid_pre", "resid_pre"), ("hook_attn_out", "attn_out"), ("hook_mlp_out", "mlp_out")] {
        let ours = mean_values(&resid, suffix);
        let theirs: Vec<f64> = Vec::try_from(oracle.get(key).flatten(0, -1).to_kind(tch::Kind::Double)).unwrap();
        assert_eq!(ours.len(), theirs.len());
        for (a, b) in ours.iter().zip(&theirs) {
            let b = (b - corr_b) / (clean_b - corr_b);
            assert!((a - b).abs() <= 1e-3, "{key}: {a} vs TransformerLens {b}");
        }
    }
    let heads = read_parquet(&out.join("heads.parquet"));
    assert_eq!(heads.num_rows(), 3 * 2 * 4);
    let ours = mean_values(&heads, "attn.hook_z");
    let theirs: Vec<f64> = Vec::try_from(oracle.get("z_all_pos").flatten(0, -1).to_kind(tch::Kind::Double)).unwrap();
    for (a, b) in ours.iter().zip(&theirs) {
        assert!((a - (b - corr_b) / (clean_b - corr_b)).abs() <= 1e-3);
    }
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert!((manifest["metric"]["clean_baseline"].as_f64().unwrap() - clean_b).abs() < 1e-4);
    assert_eq!(manifest["spec"]["name"], "ioi-demo");
    assert_eq!(manifest["model"]["weights"][0]["sha256"].as_str().unwrap().len(), 64);
    assert!(manifest["runs"]["resid"]["sweeps"][0]["filled_without_compute"].as_u64().unwrap() > 0);
    assert!(manifest["timings_seconds"].as_object().unwrap().len() >= 4);
    // Nothing half-written is left behind: the outputs, and the job store holding finished jobs.
    for e in std::fs::read_dir(out).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.starts_with('.') || name == ".tl-run", "temporary file {name} left behind");
    }
    for e in std::fs::read_dir(out.join(".tl-run/jobs")).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.starts_with('.') && name.ends_with(".parquet"), "temporary file {name} left in the store");
    }
}

#[test]
fn ioi_spec_on_a_local_fixture_matches_patching_py() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let (ok, stdout, err) = tl_run(
        &[
            ioi_spec().to_str().unwrap(),
            "--model-id",
            fixture("gpt2-tiny").to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert!(ok, "{err}");
    assert!(stdout.contains("resid.parquet") && stdout.contains("top rows"), "{stdout}");
    check_against_oracle(&out);
    // The six patching targets of its two runs at both layers are one group of jobs (the CPU's
    // by-position schedule runs each position's cells of every layer in one staircase).
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    for run in ["resid", "heads"] {
        for s in manifest["runs"][run]["sweeps"].as_array().unwrap() {
            assert_eq!(s["forwards_shared_with_jobs"], 11, "{run}: {s}");
        }
    }
}

#[test]
fn ioi_spec_as_written_runs_from_a_hub_cache_layout() {
    // model.id = "gpt2" resolved offline from HF_HUB_CACHE, where "gpt2" is the fixture.
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("hub/models--gpt2");
    let commit = "fedcba9876543210fedcba9876543210fedcba98";
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        std::os::unix::fs::symlink(fixture("gpt2-tiny").join(f), snap.join(f)).unwrap();
    }
    let out = tmp.path().join("out");
    let (ok, _, err) = tl_run(
        &[ioi_spec().to_str().unwrap(), "--out", out.to_str().unwrap()],
        &[("HF_HUB_CACHE", &tmp.path().join("hub"))],
    );
    assert!(ok, "{err}");
    check_against_oracle(&out);
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["model"]["resolved_commit"], commit);
}

#[test]
fn plan_and_validate_need_no_weights() {
    let tmp = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture("gpt2-tiny").join(f), tmp.path().join(f)).unwrap();
    }
    // A placeholder weight file: plan and validate must not read it.
    std::fs::write(tmp.path().join("model.safetensors"), b"not read").unwrap();
    let (ok, out, err) =
        tl_run(&["plan", ioi_spec().to_str().unwrap(), "--model-id", tmp.path().to_str().unwrap()], &[]);
    assert!(ok, "{err}");
    assert!(
        out.contains("heads: patch attn.hook_pattern over [layer, head] at layer 1")
            && out.contains("attribution: attribution of 3 targets, patch the top 20 per target"),
        "{out}"
    );
    // The attribution pass is the backward of the corrupted run, which is kept for it.
    assert!(out.contains("corrupted run's backward "), "{out}");
    assert!(
        out.contains(
            "total: tl-run 24 forward passes (patches batched, each from the patched layer); TransformerLens 220"
        ),
        "{out}"
    );
    let (ok, out, err) =
        tl_run(&["validate", ioi_spec().to_str().unwrap(), "--model-id", tmp.path().to_str().unwrap()], &[]);
    assert!(ok && out.contains(": ok"), "{out}{err}");
}

fn write_spec(dir: &Path, body: &str) -> PathBuf {
    let p = dir.join("spec.toml");
    std::fs::write(&p, body).unwrap();
    p
}

#[test]
fn multi_token_answers_and_bad_layers_are_explained() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("gpt2-tiny");
    let text = std::fs::read_to_string(ioi_spec()).unwrap().replace(r#"[" Dan", " Sid"]"#, r#"[" Danforth", " Sid"]"#);
    let spec = write_spec(tmp.path(), &text);
    let (ok, _, err) = tl_run(&["validate", spec.to_str().unwrap(), "--model-id", model.to_str().unwrap()], &[]);
    assert!(!ok);
    assert!(err.contains("prompt 4") && err.contains("\" Danforth\" is 2 tokens") && err.contains("\" Dan\""), "{err}");

    let text = std::fs::read_to_string(ioi_spec())
        .unwrap()
        .replace("over = [\"layer\", \"pos\"]", "over = [\"layer\", \"pos\"]\nlayers = [0, 5]");
    let spec = write_spec(tmp.path(), &text);
    let (ok, _, err) = tl_run(
        &[
            spec.to_str().unwrap(),
            "--model-id",
            model.to_str().unwrap(),
            "--out",
            tmp.path().join("o").to_str().unwrap(),
        ],
        &[],
    );
    assert!(!ok);
    assert!(
        err.contains("spec.toml:31:10") && err.contains("layer 5 is out of range: the model has 2 layers: 0-1"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn per_prompt_logprob_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(ioi_spec())
        .unwrap()
        .replace("kind = \"logit_diff\"", "kind = \"logprob\"\nper_prompt = true")
        .replace("normalize = true", "normalize = false")
        .replace("hooks = [\"resid_pre\", \"attn_out\", \"mlp_out\"]", "hooks = [\"resid_pre\"]");
    let spec = write_spec(tmp.path(), &text);
    let out = tmp.path().join("o");
    let (ok, _, err) = tl_run(
        &[spec.to_str().unwrap(), "--model-id", fixture("gpt2-tiny").to_str().unwrap(), "--out", out.to_str().unwrap()],
        &[],
    );
    assert!(ok, "{err}");
    let b = read_parquet(&out.join("resid.parquet"));
    assert_eq!(b.num_rows(), 2 * 15 * 9, "8 per-prompt rows and one mean row per cell");
    let ours = mean_values(&b, "hook_resid_pre");
    let oracle = Oracle::read("gpt2-tiny", "patching.safetensors");
    let theirs: Vec<f64> =
        Vec::try_from(oracle.get("resid_pre_logprob").flatten(0, -1).to_kind(tch::Kind::Double)).unwrap();
    for (a, b) in ours.iter().zip(&theirs) {
        assert!((a - b).abs() <= 1e-4, "logprob {a} vs TransformerLens {b}");
    }
}

/// Corrupted prompts equal to the clean ones: nothing differs, so every position is computed
/// for the cells over all positions (under both schedules), and every cell equals the baseline.
#[test]
fn patching_runs_when_clean_corrupted_do_not_differ() {
    let prompts = r#"["When John and Mary went to the shops, John gave the bag to", "When Tom and James went to the park, James gave the ball to"]"#;
    let spec = format!(
        "name = \"same\"\n[model]\nid = \"{}\"\n[prompts]\nclean = {prompts}\nanswers = [[\" Mary\", \" John\"], [\" Tom\", \" James\"]]\n[corruption]\nkind = \"prompts\"\nprompts = {prompts}\n[metric]\nkind = \"logit_diff\"\nnormalize = false\n\n[[run]]\nname = \"heads\"\nkind = \"activation_patching\"\nhooks = [\"z\"]\nover = [\"layer\", \"head\"]\n",
        fixture("gpt2-tiny").display()
    );
    for schedule in ["by_layer", "staircase", "by_position"] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spec.toml");
        std::fs::write(&path, &spec).unwrap();
        let out = dir.path().join("out");
        let o = Command::new(env!("CARGO_BIN_EXE_tl-run"))
            .env("HF_HUB_OFFLINE", "1")
            .args(["run", "--quiet", path.to_str().unwrap(), "--out", out.to_str().unwrap()])
            .env("TL_RUN_PATCH_SCHEDULE", schedule)
            .output()
            .unwrap();
        assert!(o.status.success(), "{schedule}: {}", String::from_utf8_lossy(&o.stderr));
        let manifest: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
        let base = manifest["metric"]["clean_baseline"].as_f64().unwrap();
        let t = Table::read(&out.join("heads.parquet"));
        assert_eq!(t.len(), 8, "{schedule}");
        for i in 0..t.len() {
            assert!((t.value(i) - base).abs() <= 1e-5, "{schedule} row {i}: {} vs baseline {base}", t.value(i));
        }
    }
}
