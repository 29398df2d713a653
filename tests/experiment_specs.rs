//! Every spec in experiments/ runs on every family's fixture and on the real stories260K (models
//! whose tokenizer is not GPT-2's read experiments/prompts/stories.jsonl through --prompts),
//! writing one non-empty Parquet table of finite values per run and a manifest naming them all.
mod common;

use common::*;

fn run_on(spec_file: &str, model: &str) {
    let text = std::fs::read_to_string(repo_root().join("experiments").join(spec_file)).unwrap();
    let gpt2 = uses_gpt2_tokenizer(model);
    // The subject words of causal tracing have to be in the prompts.
    let text = if gpt2 { text } else { text.replace(r#"words = ["Eiffel Tower", "Colosseum"]"#, r#"words = ["Lily"]"#) };
    let prompts = prompt_file(model).display().to_string();
    let model_dir = fixture(model).display().to_string();
    let mut args = vec!["--model-id", &model_dir];
    if !gpt2 && text.contains("[prompts]") {
        args.extend(["--prompts", &prompts]);
    }
    let dir = run_spec(&text, &args);
    let out = dir.path().join("out");
    let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    plan_is_what_ran(spec_file, model, &dir.path().join("spec.toml"), &args, &manifest);
    let spec: toml::Value = toml::from_str(&text).unwrap();
    let runs = spec["run"].as_array().unwrap();
    assert_eq!(manifest["runs"].as_object().unwrap().len(), runs.len(), "{spec_file} on {model}: manifest runs");
    for r in runs {
        let name = r["name"].as_str().unwrap();
        let t = Table::read(&out.join(format!("{name}.parquet")));
        assert!(t.len() > 0, "{spec_file} on {model}: run {name} wrote no rows");
        assert!((0..t.len()).all(|i| t.value(i).is_finite()), "{spec_file} on {model}: run {name} has non-finite values");
        assert_eq!(t.str("kind", 0).as_deref(), r["kind"].as_str(), "{spec_file} on {model}: run {name} kind");
    }
}

/// `plan --json` lists exactly the jobs the run's manifest records, in order, with the same keys,
/// and a fresh run ran every one of them.
fn plan_is_what_ran(spec_file: &str, model: &str, spec: &std::path::Path, args: &[&str], manifest: &serde_json::Value) {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_tl-run")).arg("plan").arg("--json").arg(spec).args(args).output().unwrap();
    assert!(o.status.success(), "{spec_file} on {model}: plan failed: {}", String::from_utf8_lossy(&o.stderr));
    let plan: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    let ran = manifest["jobs"].as_array().unwrap();
    let listed = |jobs: &[serde_json::Value]| jobs.iter().map(|j| (j["id"].as_u64().unwrap(), j["name"].as_str().unwrap().to_string(), j["key"].as_str().map(str::to_string))).collect::<Vec<_>>();
    assert_eq!(listed(&plan), listed(ran), "{spec_file} on {model}: the planned jobs are not the executed ones");
    assert!(plan.iter().any(|j| j["key"].is_string()), "{spec_file} on {model}: no work job has a key");
    for j in ran {
        assert_eq!(j["status"], "ran", "{spec_file} on {model}: job {} of a fresh run did not run", j["name"]);
    }
}

/// Every spec file in experiments/.
fn specs() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(repo_root().join("experiments"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".toml"))
        .collect();
    v.sort();
    v
}

/// Every test fixture of configs/fixtures.toml (not the bench-only ones, and not gpt2-tiny,
/// whose 64-position context is shorter than induction.toml's 100 tokens; gpt2-odd stands for
/// GPT-2) and stories260K.
fn models() -> Vec<String> {
    let table: toml::Table = toml::from_str(&std::fs::read_to_string(repo_root().join("configs/fixtures.toml")).unwrap()).unwrap();
    let mut v: Vec<String> = table
        .values()
        .filter_map(|f| f.as_table())
        .flat_map(|f| f.iter().filter(|(n, s)| s.get("bench").and_then(|b| b.as_bool()) != Some(true) && *n != "gpt2-tiny").map(|(n, _)| n.clone()))
        .collect();
    v.push("stories260K".into());
    v
}

#[test]
fn every_experiment_spec_runs_on_every_family_and_stories260k() {
    let specs = specs();
    assert!(specs.len() >= 4, "{specs:?}");
    for spec in &specs {
        for model in models() {
            run_on(spec, &model);
        }
    }
}

/// On every further family's fixture, against that family's TransformerLens oracle
/// (tests/oracle/dump_zoo.py): ioi.toml's and default.toml's `resid` runs on the oracle's prompts
/// (patching.py's get_act_patch_resid_pre; the spec's normalised values against the oracle's raw
/// values normalised with its own baselines), and induction.toml's `stripes` run (the
/// Exploratory Analysis demo's stripe means on the same repeated random tokens), and
/// causal_tracing.toml's `trace` run on the first two prompts with the family's word noised
/// (patching.py on the same noised embeddings).
#[test]
fn shipped_specs_match_transformer_lens_on_every_family() {
    let zoo: Vec<String> = std::fs::read_dir(repo_root().join("fixtures/oracle"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("zoo.safetensors").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(zoo.len() >= 15, "{zoo:?}");
    for fixture_name in zoo {
        let o = Oracle::read(&fixture_name, "zoo.safetensors");
        let tmp = tempfile::tempdir().unwrap();
        let prompts: Vec<serde_json::Value> = serde_json::from_str(&o.metadata["prompts"]).unwrap();
        let jsonl: String = prompts.iter().map(|p| format!("{}\n", serde_json::json!({"clean": p["clean"], "answers": p["answers"]}))).collect();
        let file = tmp.path().join("prompts.jsonl");
        std::fs::write(&file, jsonl).unwrap();
        let model_dir = fixture(&fixture_name).display().to_string();
        let (clean, corrupted) = (o.get("clean_baseline").double_value(&[0]), o.get("corrupted_baseline").double_value(&[0]));
        let theirs: Vec<f64> = values(o.get("patch/resid_pre")).into_iter().map(|v| (v - corrupted) / (clean - corrupted)).collect();
        for spec in ["ioi.toml", "default.toml"] {
            let text = std::fs::read_to_string(repo_root().join("experiments").join(spec)).unwrap();
            let dir = run_spec(&text, &["--model-id", &model_dir, "--prompts", file.to_str().unwrap()]);
            let t = Table::read(&dir.path().join("out/resid.parquet"));
            let ours: Vec<f64> = t.mean_rows().into_iter().filter(|&i| t.str("hook", i).unwrap().ends_with("hook_resid_pre")).map(|i| t.value(i)).collect();
            assert_close(&format!("{spec} resid (resid_pre, normalised) on {fixture_name}"), &ours, &theirs, 1e-3);
        }
        let two = tmp.path().join("two.jsonl");
        std::fs::write(&two, std::fs::read_to_string(&file).unwrap().lines().take(2).map(|l| format!("{l}\n")).collect::<String>()).unwrap();
        let word = if uses_gpt2_tokenizer(&fixture_name) { "Mary" } else { "Lily" };
        let text = std::fs::read_to_string(repo_root().join("experiments/causal_tracing.toml"))
            .unwrap()
            .replace(r#"words = ["Eiffel Tower", "Colosseum"]"#, &format!("words = [\"{word}\"]"));
        let dir = run_spec(&text, &["--model-id", &model_dir, "--prompts", two.to_str().unwrap()]);
        let out = dir.path().join("out");
        let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
        // Probabilities of a random model's answer are ~1/vocabulary: compare relative to the
        // oracle's own scale, or a 1e-5 absolute tolerance would pass anything.
        let noised = values(o.get("trace/corrupted_prob"));
        let scaled = |what: &str, ours: &[f64], theirs: &[f64]| {
            let scale = theirs.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(noised[0].abs());
            assert!(scale > 0.0, "{what}: an all-zero oracle");
            let ours: Vec<f64> = ours.iter().map(|v| v / scale).collect();
            let theirs: Vec<f64> = theirs.iter().map(|v| v / scale).collect();
            assert_close(what, &ours, &theirs, 1e-4);
        };
        {
            scaled(&format!("causal_tracing.toml noised prob on {fixture_name}"), &[manifest["metric"]["corrupted_baseline"].as_f64().unwrap()], &noised);
            let t = Table::read(&out.join("trace.parquet"));
            // Bloom's hook_attn_out never fires in TransformerLens 4.3, so it has no attn_out oracle.
            for key in ["resid_pre", "attn_out", "mlp_out"].into_iter().filter(|k| o.tensors.contains_key(&format!("trace/{k}"))) {
                let ours: Vec<f64> = t.mean_rows().into_iter().filter(|&i| t.str("hook", i).unwrap().ends_with(&format!("hook_{key}"))).map(|i| t.value(i)).collect();
                scaled(&format!("causal_tracing.toml {key} on {fixture_name} (relative)"), &ours, &values(o.get(&format!("trace/{key}"))));
            }
        }
        let text = std::fs::read_to_string(repo_root().join("experiments/induction.toml")).unwrap();
        let dir = run_spec(&text, &["--model-id", &model_dir]);
        let t = Table::read(&dir.path().join("out/stripes.parquet"));
        for pattern in ["previous_token", "duplicate_token", "induction"] {
            let ours: Vec<f64> = t.rows(|t, i| t.str("pattern", i).as_deref() == Some(pattern)).into_iter().map(|i| t.value(i)).collect();
            assert_close(&format!("induction.toml {pattern} stripe on {fixture_name}"), &ours, &values(o.get(&format!("induction/{pattern}"))), 1e-5);
        }
    }
}
