//! Template prompt sets patched by role against TransformerLens (tests/oracle/patch_by_role.py):
//! tl-run generates IOI prompts from templates (ABBA and BABA, names redrawn for the corrupted
//! prompt), patches resid_pre over [layer, role] and z over [layer, role, head]; the oracle reads
//! the same prompts from the run's manifest, finds each role's position in each prompt with
//! TransformerLens's tokenizer (IOIDataset's word_idx) and patches with those per-prompt index
//! tensors. On GPT-2 (BPE) and Llama (sentencepiece, names split into several tokens).
mod common;

use std::process::Command;

use common::*;

/// IOI templates: GPT-2's BPE has single-token names with a leading space; stories260K's
/// sentencepiece few (Lily, Tim, mom, written without the space it adds itself), and its places
/// and objects are several tokens, so its prompts differ in length (left padding).
fn spec(name: &str, metric_at: Option<&str>) -> String {
    let (templates, slots) = if uses_gpt2_tokenizer(name) {
        (
            r#"templates = ["When{IO} and{S} went to the{PLACE},{S} gave a{OBJECT} to",
             "When{S} and{IO} went to the{PLACE},{S} gave a{OBJECT} to"]"#,
            r#"IO = [" Mary", " John", " Tom", " James", " Dan", " Sid", " Martin", " Amy"]
S = [" Mary", " John", " Tom", " James", " Dan", " Sid", " Martin", " Amy"]
PLACE = [" shops", " park", " school", " store"]
OBJECT = [" bag", " ball", " drink", " apple"]"#,
        )
    } else {
        (
            r#"templates = ["{IO} and {S} went to the {PLACE}. {S} gave a {OBJECT} to",
             "{S} and {IO} went to the {PLACE}. {S} gave a {OBJECT} to"]"#,
            r#"IO = ["Lily", "Tim", "mom"]
S = ["Lily", "Tim", "mom"]
PLACE = ["park", "shop", "garden"]
OBJECT = ["ball", "toy", "cake", "box"]"#,
        )
    };
    format!(
        r#"name = "ioi-roles"
[model]
id = "{}"
[prompts]
{templates}
answer = "{{IO}}"
wrong_answer = "{{S}}"
count = 8
seed = 1
[prompts.slots]
{slots}
[corruption]
kind = "slots"
slots = ["IO", "S"]
[metric]
kind = "logit_diff"
{position}
[[run]]
name = "resid"
kind = "activation_patching"
hooks = ["resid_pre"]
over = ["layer", "role"]
per_prompt = true
[[run]]
name = "heads"
kind = "activation_patching"
hooks = ["z"]
over = ["layer", "role", "head"]
"#,
        fixture(name).display(),
        position = metric_at.map(|r| format!("position = \"{r}\"")).unwrap_or_default(),
    )
}

#[test]
fn template_sets_patched_by_role_equal_transformer_lens_with_per_prompt_indices() {
    // The metric at the last position on both families, and at each prompt's S2 (a position that
    // differs between the ABBA and BABA prompts' S1 and IO, the same as theirs here) on GPT-2.
    let cases = [("gpt2-tiny", None), ("llama-tiny", None), ("gpt2-tiny", Some("S2")), ("llama-tiny", Some("S2"))];
    for (name, metric_at) in cases {
        check_roles(name, &spec(name, metric_at), &fixture(name), metric_at, true);
    }
}

/// The real SmolLM2-135M (its Q4_1 GGUF; the oracle has transformers dequantize the same file):
/// resid_pre over [layer, role] on 8 generated IOI prompts (TransformerLens's z sweep, a forward
/// per layer, role and head, would take minutes on a 135M model).
#[test]
fn smollm2_template_set_patched_by_role_equals_transformer_lens() {
    let gguf = repo_root().join(".models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(gguf.is_file(), "{} is missing: run scripts/setup.sh", gguf.display());
    let text =
        spec("gpt2-tiny", None).replace(&fixture("gpt2-tiny").display().to_string(), &gguf.display().to_string());
    let text = &text[..text.find("[[run]]\nname = \"heads\"").expect("the heads run")];
    check_roles("smollm2", text, &gguf, None, false);
}

/// Runs `spec_text` (the roles spec of `name`), has patch_by_role.py patch the manifest's prompts
/// in TransformerLens on `model` (a fixture directory or a GGUF file), and compares positions and
/// values (z by role and head too when `with_heads`).
fn check_roles(name: &str, spec_text: &str, model: &std::path::Path, metric_at: Option<&str>, with_heads: bool) {
    {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("spec.toml");
        std::fs::write(&path, spec_text).unwrap();
        let out = tmp.path().join("out");
        ok(&["run", path.to_str().unwrap(), "--out", out.to_str().unwrap(), "--quiet"]);
        let oracle = tmp.path().join("oracle.json");
        let py = repo_root().join(".venv/bin/python");
        assert!(py.exists(), "no .venv: run scripts/setup.sh");
        let mut args = vec![model.as_os_str().to_owned(), out.join("manifest.json").into(), oracle.clone().into()];
        if !with_heads {
            args.push("--resid-only".into());
        }
        let run = Command::new(py).arg(repo_root().join("tests/oracle/patch_by_role.py")).args(args).output().unwrap();
        assert!(run.status.success(), "oracle failed: {}", String::from_utf8_lossy(&run.stderr));
        let theirs: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&oracle).unwrap()).unwrap();
        let roles: Vec<String> =
            theirs["roles"].as_array().unwrap().iter().map(|r| r.as_str().unwrap().to_string()).collect();
        let corrupted = theirs["corrupted"].as_f64().unwrap();
        let floats =
            |k: &str| -> Vec<f64> { theirs[k].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect() };

        // Each prompt's role positions: ours (per-prompt rows' pos, in the prompt's own tokens)
        // against TransformerLens's word_idx in the padded batch less the padding.
        let resid = Table::read(&out.join("resid.parquet"));
        let manifest: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
        let lengths: Vec<usize> =
            manifest["tokens"]["clean"].as_array().unwrap().iter().map(|t| t.as_array().unwrap().len()).collect();
        let seq = *lengths.iter().max().unwrap();
        for role in &roles {
            let at = theirs["positions"][role].as_array().unwrap();
            for (p, len) in lengths.iter().enumerate() {
                let row = resid.rows(|t, i| {
                    t.int("layer", i) == Some(0)
                        && t.str("role", i).as_deref() == Some(role)
                        && t.int("prompt", i) == Some(p as i64)
                });
                assert_eq!(row.len(), 1, "{name} {role} prompt {p}");
                let want = at[p].as_i64().unwrap() - (seq - len) as i64;
                assert_eq!(resid.int("pos", row[0]), Some(want), "{name}: role {role} of prompt {p}");
            }
        }

        // The mean rows in the oracle's order: layer, then role (then head).
        let mean = |t: &Table, key: &dyn Fn(&Table, usize) -> (i64, usize, i64)| -> Vec<f64> {
            let mut rows: Vec<((i64, usize, i64), f64)> =
                t.mean_rows().into_iter().map(|i| (key(t, i), t.value(i))).collect();
            rows.sort_by_key(|(k, _)| *k);
            rows.into_iter().map(|(_, v)| v).collect()
        };
        let role_index =
            |t: &Table, i: usize| roles.iter().position(|r| Some(r.as_str()) == t.str("role", i).as_deref()).unwrap();
        let ours_resid = mean(&resid, &|t, i| (t.int("layer", i).unwrap(), role_index(t, i), 0));
        // Patching nothing leaves the corrupted run's value.
        assert_oracle(
            &format!("{name} (metric at {metric_at:?}) resid_pre by role (oracle resid_pre)"),
            &ours_resid,
            &floats("resid_pre"),
            Baseline::Value(corrupted),
            Tol::Abs(1e-4),
        );
        if !with_heads {
            return;
        }
        let heads = Table::read(&out.join("heads.parquet"));
        let ours_z = mean(&heads, &|t, i| (t.int("layer", i).unwrap(), role_index(t, i), t.int("head", i).unwrap()));
        assert_oracle(
            &format!("{name} (metric at {metric_at:?}) z by role and head (oracle z)"),
            &ours_z,
            &floats("z"),
            Baseline::Value(corrupted),
            Tol::Abs(1e-4),
        );
    }
}
