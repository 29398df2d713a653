//! Bad input ends in a named error (exit code 1, one readable message), never a panic: spec
//! values the model cannot satisfy, empty prompts, missing devices, and malformed models —
//! config.json, safetensors, shard indexes, tokenizers and GGUF files broken one way at a time.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// Runs tl-run and asserts it failed with a named error (not a panic); returns stderr.
fn fails(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tl-run")).args(args).env("HF_HUB_OFFLINE", "1").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected a named error (exit 1) from {args:?}, got {:?}:\n{err}",
        out.status.code()
    );
    assert!(
        !err.contains("panicked") && !err.contains("internal failure") && !err.contains("backtrace"),
        "{args:?}: {err}"
    );
    assert!(err.starts_with("error: "), "{err}");
    err
}

/// A writable copy of a fixture (the fixture directories are links into the shared cache).
fn copy_fixture(name: &str, to: &Path) -> PathBuf {
    let dir = to.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    dir
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let p = dir.join("config.json");
    let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(c.as_object_mut().unwrap());
    std::fs::write(&p, serde_json::to_string_pretty(&c).unwrap()).unwrap();
}

type Tensors = Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>;

fn edit_weights(dir: &Path, edit: impl FnOnce(&mut Tensors)) {
    let p = dir.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut t: Tensors =
        st.tensors().into_iter().map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec())).collect();
    edit(&mut t);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = t
        .iter()
        .map(|(n, d, s, b)| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(&p, safetensors::serialize(views, &None).unwrap()).unwrap();
}

fn spec(dir: &Path, model: &Path, body: &str) -> PathBuf {
    let p = dir.join("spec.toml");
    let text = format!(
        "name = \"t\"\n[model]\nid = \"{}\"\n[prompts]\nclean = [\"When John and Mary went to the shops, John gave the bag to\"]\nanswers = [[\" Mary\", \" John\"]]\n{body}\n[output]\ndir = \"{}\"\n",
        model.display(),
        dir.join("out").display()
    );
    std::fs::write(&p, text).unwrap();
    p
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn top_k_past_the_vocabulary_is_named_at_its_line_in_validate_and_run() {
    let tmp = tempfile::tempdir().unwrap();
    let spec =
        spec(tmp.path(), &fixture("gpt2-tiny"), "[[run]]\nname = \"ll\"\nkind = \"logit_lens\"\ntop_k = 100000\n");
    for cmd in ["validate", "run"] {
        let e = fails(&[cmd, s(&spec)]);
        assert!(
            e.contains("spec.toml:10:9: run 'll': top_k = 100000 is more tokens than the model's vocabulary of 50257"),
            "{cmd}: {e}"
        );
    }
    assert!(!tmp.path().join("out").exists());
}

#[test]
fn empty_prompt_lists_and_prompts_of_no_tokens_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("empty.toml");
    let model = fixture("gpt2-tiny");
    std::fs::write(&p, format!("name = \"t\"\n[model]\nid = \"{}\"\n[prompts]\nclean = []\nanswers = []\n[[run]]\nname = \"r\"\nkind = \"logit_lens\"\n", model.display())).unwrap();
    for cmd in ["validate", "run"] {
        let e = fails(&[cmd, s(&p)]);
        assert!(e.contains("empty.toml:5:9: prompts.clean: no prompts"), "{e}");
    }
    std::fs::write(&p, format!("name = \"t\"\n[model]\nid = \"{}\"\n[prompts]\nclean = [\"\"]\nanswers = [[\" a\"]]\n[[run]]\nname = \"r\"\nkind = \"logit_lens\"\n", model.display())).unwrap();
    let e = fails(&["validate", s(&p)]);
    assert!(e.contains("prompts.clean[0]: an empty prompt"), "{e}");
    let out = tmp.path().join("x.safetensors");
    let e = fails(&["cache", s(&model), "--prompt", "", "--no-prepend-bos", "--out", s(&out)]);
    assert!(e.contains("prompt 0 (\"\") is no tokens and no BOS is prepended"), "{e}");
    assert!(!out.exists());
}

#[test]
fn noise_samples_past_the_hosts_memory_are_named_before_anything_is_allocated() {
    let tmp = tempfile::tempdir().unwrap();
    // 10^12 noised copies: petabytes of embedding noise, past any host's memory (a Rust vector
    // of that many answer ids aborted the process before this check).
    let body = "[corruption]\nkind = \"noise\"\npositions = [1]\nsamples = 1000000000000\n[[run]]\nname = \"r\"\nkind = \"activation_patching\"\nhooks = [\"resid_pre\"]\nover = [\"layer\", \"pos\"]\n";
    let p = spec(tmp.path(), &fixture("gpt2-tiny"), body);
    for cmd in ["validate", "run"] {
        let e = fails(&[cmd, s(&p)]);
        assert!(
            e.contains("spec.toml: corruption.samples: 1000000000000 noised copies of 1 prompt(s) of 15 tokens need"),
            "{cmd}: {e}"
        );
        assert!(e.contains("more than this machine's") && e.contains("use fewer samples"), "{cmd}: {e}");
    }
    assert!(!tmp.path().join("out").exists());
}

#[test]
fn a_custom_detection_matrix_of_another_length_than_the_prompts_is_named_at_its_line() {
    let tmp = tempfile::tempdir().unwrap();
    // The prompt is 15 tokens with BOS; the matrix is 3x3.
    let body = "[[run]]\nname = \"h\"\nkind = \"head_scores\"\n[[run.custom]]\nname = \"three\"\nmatrix = [[1.0], [1.0, 0.0], [0.0, 1.0, 0.0]]\n";
    let p = spec(tmp.path(), &fixture("gpt2-tiny"), body);
    let p2 = tmp.path().join("square.toml");
    std::fs::write(
        &p2,
        std::fs::read_to_string(&p)
            .unwrap()
            .replace("[[1.0], [1.0, 0.0], [0.0, 1.0, 0.0]]", "[[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]"),
    )
    .unwrap();
    let e = fails(&["validate", s(&p)]);
    assert!(e.contains("spec.toml:12:10: run[0].custom[0].matrix: a detection matrix is square"), "{e}");
    for cmd in ["validate", "run"] {
        let e = fails(&[cmd, s(&p2)]);
        assert!(e.contains("square.toml:11:8: run 'h': custom pattern 'three' is a 3x3 matrix, so it scores prompts of 3 tokens (BOS included), but the prompts are 15"), "{cmd}: {e}");
    }
    assert!(!tmp.path().join("out").exists());
}

#[test]
fn a_spec_or_zoo_file_that_cannot_be_read_is_named_without_a_line() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing.toml");
    for args in [
        vec!["validate", s(&missing)],
        vec!["run", s(&missing)],
        vec!["plan", s(&missing)],
        vec!["check", s(&missing)],
        vec!["validate", s(tmp.path())],
    ] {
        let e = fails(&args);
        assert!(e.contains(": cannot read it: ") && !e.contains(":0:0") && !e.contains(": -:"), "{args:?}: {e}");
    }
    assert!(fails(&["validate", s(&missing)])
        .contains(&format!("  {}: cannot read it: No such file or directory", missing.display())));
}

#[test]
fn a_prompt_file_without_wrong_answers_under_logit_diff_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = tmp.path().join("spec.toml");
    std::fs::write(
        &spec,
        format!(
            "name = \"t\"\n[model]\nid = \"{}\"\n[prompts]\nclean = [\"When John and Mary went to the shops, John gave the bag to\", \"When John and Mary went to the shops, Mary gave the bag to\"]\nanswers = [[\" Mary\", \" John\"], [\" John\", \" Mary\"]]\n[corruption]\nkind = \"swap_pairs\"\n[[run]]\nname = \"r\"\nkind = \"activation_patching\"\nhooks = [\"resid_pre\"]\nover = [\"layer\", \"pos\"]\n",
            fixture("gpt2-tiny").display()
        ),
    )
    .unwrap();
    let prompts = tmp.path().join("p.jsonl");
    std::fs::write(
        &prompts,
        "{\"prompt\": \"When John and Mary went to the shops, John gave the bag to\", \"answer\": \" Mary\"}\n{\"prompt\": \"When John and Mary went to the shops, Mary gave the bag to\", \"answer\": \" John\"}\n",
    )
    .unwrap();
    for cmd in ["validate", "run"] {
        let e = fails(&[cmd, s(&spec), "--prompts", s(&prompts)]);
        assert!(
            e.contains(&format!(
                "prompt 0 ({}:1) has no incorrect answer, but run 'r' (activation_patching) measures logit_diff",
                prompts.display()
            )),
            "{e}"
        );
    }
}

#[test]
fn a_device_that_is_not_here_is_named() {
    let model = fixture("gpt2-tiny");
    let e = fails(&["hooks", s(&model), "--device", "cuda"]);
    assert!(e.contains("device 'cuda' was asked for but CUDA is not available here"), "{e}");
    let e = fails(&["hooks", s(&model), "--device", "cuda:1"]);
    assert!(e.contains("cuda:1 does not exist"), "{e}");
    let e = fails(&["hooks", s(&model), "--device", "tpu"]);
    assert!(e.contains("unknown device 'tpu' (use cpu, cuda or cuda:N)"), "{e}");
    let tmp = tempfile::tempdir().unwrap();
    let spec = spec(tmp.path(), &model, "[[run]]\nname = \"ll\"\nkind = \"logit_lens\"\n");
    let e = fails(&["run", s(&spec), "--device", "cuda:1"]);
    assert!(e.contains("cuda:1 does not exist"), "{e}");
}

#[test]
fn answer_tokens_past_the_embedding_are_named() {
    // The GPT-2 tokenizer (50,257 tokens) on a model whose embedding has 1,000 rows.
    let tmp = tempfile::tempdir().unwrap();
    let model = copy_fixture("gpt2-tiny", tmp.path());
    edit_config(&model, |c| {
        c.insert("vocab_size".into(), 1000.into());
    });
    edit_weights(&model, |t| {
        let (_, _, shape, data) = t.iter_mut().find(|(n, ..)| n.ends_with("wte.weight")).unwrap();
        let row = shape[1] * 4;
        shape[0] = 1000;
        data.truncate(1000 * row);
    });
    let spec = spec(tmp.path(), &model, "[[run]]\nname = \"ll\"\nkind = \"logit_lens\"\n");
    let e = fails(&["run", s(&spec)]);
    assert!(
        e.contains(
            "prompt 0: the correct answer: tokenizer: token 5335 (\" Mary\") is outside the model's vocabulary of 1000"
        ),
        "{e}"
    );
    let e =
        fails(&["cache", s(&model), "--prompt", "When John and Mary", "--out", s(&tmp.path().join("x.safetensors"))]);
    assert!(e.contains("is outside the model's vocabulary of 1000"), "{e}");
}

#[test]
fn bad_head_counts_and_shapes_in_config_json_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        ("gpt2-tiny", serde_json::json!({"n_head": 0}), "hidden size 64 is not divisible by 0 attention heads"),
        ("gpt2-tiny", serde_json::json!({"n_head": 5}), "hidden size 64 is not divisible by 5 attention heads"),
        ("llama-tiny", serde_json::json!({"num_attention_heads": 0}), "n_heads must be positive"),
        (
            "llama-tiny",
            serde_json::json!({"num_key_value_heads": 0}),
            "6 query heads cannot be grouped over 0 key-value heads",
        ),
        ("gpt2-tiny", serde_json::json!({"n_head": "four"}), "invalid type: string \"four\""),
        ("gpt2-tiny", serde_json::json!({"n_layer": 0}), "n_layers must be positive"),
        (
            "gpt2-tiny",
            serde_json::json!({"n_embd": 60, "n_head": 4}),
            "tensor 'transformer.h.0.attn.c_attn.weight' has shape [64, 192], but config.json implies [60, 180]",
        ),
        (
            "phi3-tiny",
            serde_json::json!({"num_key_value_heads": 3}),
            "tensor 'model.layers.0.self_attn.qkv_proj.weight' has shape [80, 48], but config.json implies [96, 48]",
        ),
        (
            "bloom-tiny",
            serde_json::json!({"hidden_size": 48}),
            "query_key_value.weight' has shape [192, 64], but config.json implies [144, 48]",
        ),
        (
            "neox-tiny",
            serde_json::json!({"intermediate_size": 100}),
            "dense_h_to_4h.weight' has shape [256, 64], but config.json implies [100, 64]",
        ),
        ("gpt2-tiny", serde_json::json!({"model_type": "mamba"}), "model_type 'mamba' is not supported"),
    ];
    for (i, (fixture_name, patch, want)) in cases.into_iter().enumerate() {
        let dir = copy_fixture(fixture_name, &tmp.path().join(i.to_string()));
        edit_config(&dir, |c| {
            for (k, v) in patch.as_object().unwrap() {
                c.insert(k.clone(), v.clone());
            }
        });
        let e = fails(&["hooks", s(&dir)]);
        assert!(e.contains(want), "{fixture_name} {patch}: {e}");
    }
    // Missing keys and a config.json that is not JSON.
    let dir = copy_fixture("gpt2-tiny", &tmp.path().join("missing"));
    edit_config(&dir, |c| {
        c.remove("n_embd");
    });
    let e = fails(&["hooks", s(&dir)]);
    assert!(e.contains("n_embd"), "{e}");
    std::fs::write(dir.join("config.json"), "{ not json").unwrap();
    let e = fails(&["hooks", s(&dir)]);
    assert!(e.contains("config.json"), "{e}");
}

#[test]
fn malformed_safetensors_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let fresh = |name: &str| copy_fixture("gpt2-tiny", &tmp.path().join(name));

    let dir = fresh("truncated");
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let e = fails(&["hooks", s(&dir)]);
    assert!(e.contains("does not fit its byte range"), "{e}");

    let dir = fresh("header");
    let mut bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(dir.join("model.safetensors"), &bytes).unwrap();
    let e = fails(&["hooks", s(&dir)]);
    assert!(e.contains("safetensors header length 1099511627776 runs past the end"), "{e}");

    let dir = fresh("tiny");
    std::fs::write(dir.join("model.safetensors"), b"abc").unwrap();
    let e = fails(&["hooks", s(&dir)]);
    assert!(e.contains("not a safetensors file"), "{e}");

    let dir = fresh("dtype");
    edit_weights(&dir, |t| {
        let (_, dtype, _, _) = t.iter_mut().find(|(n, ..)| n.ends_with("h.0.ln_1.weight")).unwrap();
        *dtype = safetensors::Dtype::I32; // same width as F32, so the bytes still fit
    });
    let e = fails(&["hooks", s(&dir)]);
    assert!(e.contains("h.0.ln_1.weight' is Int; a weight must be F32, F16, BF16 or F64"), "{e}");

    let dir = fresh("missing");
    edit_weights(&dir, |t| t.retain(|(n, ..)| !n.ends_with("h.1.mlp.c_proj.weight")));
    let e = fails(&["hooks", s(&dir)]);
    assert!(e.contains("tensor 'transformer.h.1.mlp.c_proj.weight' is missing"), "{e}");

    let dir = fresh("extra");
    edit_weights(&dir, |t| {
        t.push(("transformer.h.7.attn.c_attn.weight".into(), safetensors::Dtype::F32, vec![2], vec![0; 8]))
    });
    let e = fails(&["hooks", s(&dir)]);
    assert!(e.contains("1 tensor(s) in the checkpoint are not part of a gpt2 model with this config.json: transformer.h.7.attn.c_attn.weight"), "{e}");

    let dir = fresh("shards");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        r#"{"metadata": {}, "weight_map": {"transformer.wte.weight": "model-00001-of-00002.safetensors"}}"#,
    )
    .unwrap();
    let e = fails(&["hooks", s(&dir)]);
    assert!(e.contains("model-00001-of-00002.safetensors"), "{e}");
}

#[test]
fn missing_or_unparsable_tokenizers_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("gpt2-tiny", tmp.path());
    let out = tmp.path().join("x.safetensors");
    std::fs::write(dir.join("tokenizer.json"), "{ this is not a tokenizer").unwrap();
    let e = fails(&["cache", s(&dir), "--prompt", "hi", "--out", s(&out)]);
    assert!(e.contains("tokenizer"), "{e}");
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let e = fails(&["cache", s(&dir), "--prompt", "hi", "--out", s(&out)]);
    assert!(e.contains("no tokenizer.json"), "{e}");
    let spec = spec(tmp.path(), &dir, "[[run]]\nname = \"ll\"\nkind = \"logit_lens\"\n");
    let e = fails(&["validate", s(&spec)]);
    assert!(e.contains("no tokenizer.json"), "{e}");
}

/// A minimal GGUF v3 file: general.architecture = llama and one 4×4 tensor of ggml type `ty`.
fn gguf_with_type(path: &Path, ty: u32) {
    let mut b: Vec<u8> = Vec::new();
    let string = |b: &mut Vec<u8>, s: &str| {
        b.extend((s.len() as u64).to_le_bytes());
        b.extend(s.as_bytes());
    };
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes()); // tensors
    b.extend(1u64.to_le_bytes()); // metadata
    string(&mut b, "general.architecture");
    b.extend(8u32.to_le_bytes()); // string
    string(&mut b, "llama");
    string(&mut b, "token_embd.weight");
    b.extend(2u32.to_le_bytes());
    b.extend(4u64.to_le_bytes());
    b.extend(4u64.to_le_bytes());
    b.extend(ty.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    while !b.len().is_multiple_of(32) {
        b.push(0);
    }
    b.extend([0u8; 64]);
    std::fs::write(path, b).unwrap();
}

#[test]
fn a_gguf_with_an_unknown_quantization_type_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("m.gguf");
    gguf_with_type(&p, 99);
    let e = fails(&["hooks", s(&p)]);
    assert!(e.contains("tensor 'token_embd.weight' has ggml type 99, which tl-run cannot dequantize"), "{e}");
    // Q2_K (10) is a real llama.cpp type tl-run does not read.
    gguf_with_type(&p, 10);
    let e = fails(&["hooks", s(&p)]);
    assert!(e.contains("ggml type 10"), "{e}");
    std::fs::write(&p, b"GGUF").unwrap();
    fails(&["hooks", s(&p)]);
}

fn two_run_spec(dir: &Path, out: &Path, second_name: &str) -> PathBuf {
    let p = dir.join("w.toml");
    std::fs::write(
        &p,
        format!(
            r#"name = "t"
[model]
id = "{}"
[prompts]
clean = ["When John and Mary went to the shops, John gave the bag to", "When John and Mary went to the shops, Mary gave the bag to"]
answers = [[" Mary", " John"], [" John", " Mary"]]
[corruption]
kind = "swap_pairs"
[[run]]
name = "resid"
kind = "activation_patching"
hooks = ["resid_pre"]
over = ["layer", "pos"]
[[run]]
name = "{second_name}"
kind = "logit_lens"
top_k = 50
top_k_at = "all"
[output]
dir = "{}"
"#,
            fixture("gpt2-odd").display(),
            out.display()
        ),
    )
    .unwrap();
    p
}

#[test]
fn run_names_cannot_leave_the_output_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    for (name, why) in [
        ("../escape", "contains a path separator"),
        ("a/b", "contains a path separator"),
        (".hidden", "starts with '.'"),
        ("..", "starts with '.'"),
        ("", "is empty"),
    ] {
        let spec = two_run_spec(tmp.path(), &out, name);
        let e = fails(&["validate", s(&spec)]);
        assert!(e.contains("w.toml:15:8: run[1].name") && e.contains(why), "{name:?}: {e}");
        fails(&["run", s(&spec)]);
    }
    assert!(!out.exists() && !tmp.path().join("escape.parquet").exists());
}

#[test]
fn an_unwritable_output_directory_is_named_before_loading() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    let spec = two_run_spec(tmp.path(), &file.join("out"), "ll");
    let e = fails(&["run", s(&spec)]);
    assert!(
        e.contains(&format!("output directory {}: {} is not a directory", file.join("out").display(), file.display())),
        "{e}"
    );
}

#[test]
fn a_full_disk_is_a_named_error_and_leaves_no_partial_file() {
    // A file-size limit of 8 KiB (sh's ulimit -f counts 512-byte blocks): the first run's table
    // fits, the logit lens's top-50 table at every position does not.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let spec = two_run_spec(tmp.path(), &out, "ll");
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -f 16; exec '{}' run '{}' --quiet", env!("CARGO_BIN_EXE_tl-run"), spec.display()))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    // The logit lens's rows go to the job store (written in the background) and to ll.parquet:
    // whichever is refused first is named.
    assert!(err.contains(&format!("{}", out.display())) && err.contains(".parquet: File too large"), "{err}");
    let mut left: Vec<String> =
        std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    left.sort();
    // The finished run and the manifest that describes it; nothing temporary, nothing partial.
    assert_eq!(left, [".tl-run", "manifest.json", "resid.parquet"], "{err}");
    let stored: Vec<String> = std::fs::read_dir(out.join(".tl-run/jobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    // The first run's per-layer jobs, each a whole result table; nothing temporary.
    assert!(!stored.is_empty(), "the finished run's jobs are stored");
    for name in &stored {
        assert!(!tl_run::output::atomic::is_temp(name), "temporary file {name} left in the store");
        tl_run::output::table::read_parquet(&out.join(".tl-run/jobs").join(name)).unwrap();
    }
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["runs"].as_object().unwrap().keys().collect::<Vec<_>>(), ["resid"]);
}

/// Multiplies every f32 of the tensors whose names end with one of `names` by `by`, or (by = NaN)
/// sets their first element to NaN.
fn scale_weights(dir: &Path, names: &[&str], by: f32) {
    edit_weights(dir, |t| {
        for (n, dtype, _, data) in t.iter_mut().filter(|(n, ..)| names.iter().any(|s| n.ends_with(s))) {
            assert_eq!(*dtype, safetensors::Dtype::F32, "{n}");
            for (i, c) in data.chunks_exact_mut(4).enumerate() {
                let x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                let y = if by.is_nan() {
                    if i == 5 {
                        f32::NAN
                    } else {
                        x
                    }
                } else {
                    x * by
                };
                c.copy_from_slice(&y.to_le_bytes());
            }
        }
    });
}

fn manifest_nonfinite(out: &Path) -> Vec<serde_json::Value> {
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    m["nonfinite"].as_array().unwrap().clone()
}

#[test]
fn nan_in_a_weight_stops_the_run_naming_the_weight_and_records_it() {
    let tmp = tempfile::tempdir().unwrap();
    let model = copy_fixture("gpt2-odd", tmp.path());
    scale_weights(&model, &["h.1.mlp.c_fc.weight"], f32::NAN);
    let out = tmp.path().join("out");
    let spec = two_run_spec(tmp.path(), &out, "ll");
    let e = fails(&["run", s(&spec), "--model-id", s(&model)]);
    assert!(
        e.contains("non-finite value(s) in weight blocks.1.mlp.W_in; the run stopped")
            && e.contains("allow_nonfinite = true"),
        "{e}"
    );
    let found = manifest_nonfinite(&out);
    assert_eq!(found.len(), 1);
    assert_eq!((found[0]["kind"].as_str(), found[0]["where"].as_str()), (Some("weight"), Some("blocks.1.mlp.W_in")));
    // No result table was written.
    assert!(!out.join("resid.parquet").exists());
}

#[test]
fn an_activation_overflow_is_traced_to_the_first_hook_and_allow_nonfinite_runs_on() {
    // Finite f32 weights whose layer-0 MLP output overflows float16 (max 65504).
    let tmp = tempfile::tempdir().unwrap();
    let model = copy_fixture("gpt2-odd", tmp.path());
    scale_weights(&model, &["h.0.mlp.c_fc.weight", "h.0.mlp.c_proj.weight"], 3000.0);
    let out = tmp.path().join("out");
    let spec = two_run_spec(tmp.path(), &out, "ll");
    let e = fails(&["run", s(&spec), "--model-id", s(&model), "--dtype", "float16"]);
    assert!(
        e.contains("non-finite value(s) in activation blocks.0.hook_mlp_out (first at prompt 0, position 0)"),
        "{e}"
    );
    assert!(!out.join("resid.parquet").exists());
    // allow_nonfinite = true: the run finishes, exit 0, and the manifest lists every place.
    let text = format!("allow_nonfinite = true\n{}", std::fs::read_to_string(&spec).unwrap());
    std::fs::write(&spec, text).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_tl-run"))
        .args(["run", s(&spec), "--model-id", s(&model), "--dtype", "float16", "--quiet"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let found = manifest_nonfinite(&out);
    let wheres: Vec<&str> = found.iter().map(|f| f["where"].as_str().unwrap()).collect();
    assert_eq!(wheres[0], "blocks.0.hook_mlp_out", "{found:?}");
    assert!(
        wheres.iter().any(|w| w.starts_with("run 'resid'")) && wheres.iter().any(|w| w.starts_with("run 'll'")),
        "{found:?}"
    );
    assert!(out.join("resid.parquet").exists() && out.join("ll.parquet").exists());
}

#[test]
fn validate_reports_every_model_aware_problem_at_once_with_its_line() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("v.toml");
    std::fs::write(
        &p,
        format!(
            r#"name = "t"
[model]
id = "{}"
[prompts]
clean = ["When John and Mary went to the shops, John gave the bag to", "When John and Mary went to the shops, Mary gave the bag to"]
answers = [[" Mary", " John and"], [" John", " Mary and"]]
[corruption]
kind = "swap_pairs"
[[run]]
name = "a"
kind = "activation_patching"
hooks = ["resid_pre"]
over = ["layer", "pos"]
layers = [7]
[[run]]
name = "b"
kind = "ablation"
hooks = ["z"]
units = [[0, 9], [5, 0]]
method = "zero"
positions = [2, 99]
[[run]]
name = "c"
kind = "head_scores"
source = "repeated_random"
seq_len = 40
token_range = [0, 99999]
batch = 1000000000000
[[run]]
name = "d"
kind = "logit_lens"
top_k = 60000
[output]
dir = "{}"
"#,
            fixture("gpt2-tiny").display(),
            tmp.path().join("out").display()
        ),
    )
    .unwrap();
    for cmd in ["validate", "run"] {
        let e = fails(&[cmd, s(&p)]);
        for want in [
            "10 problems with model",
            "v.toml:21:13: run 'b': positions [99] are out of range: the prompts have 15 tokens (0-14)",
            "v.toml:14:10: run 'a': layer 7 is out of range: the model has 2 layers: 0-1",
            "v.toml:19:9: run 'b': unit [0, 9] is out of range: the model has 2 layers (0-1) of 4 heads (0-3)",
            "v.toml:19:9: run 'b': unit [5, 0] is out of range",
            "v.toml:26:11: run 'c': seq_len = 40 makes 80 tokens (twice 40), more than the model's context of 64; use seq_len ≤ 32",
            "v.toml:27:15: run 'c': token_range ends at 99999, past the model's vocabulary of 50257",
            "v.toml:28:9: run 'c': batch = 1000000000000 rows of repeated tokens keep 2 layers × 4 heads of 80×80 attention patterns, 0.2 MiB a row, more than this machine's",
            "v.toml:32:9: run 'd': top_k = 60000 is more tokens than the model's vocabulary of 50257",
            // Each of the tokenizer's problems on its own line, naming the file.
            "v.toml: prompt 0: the incorrect answer \" John and\" is 2 tokens [\" John\", \" and\"], not one",
            "v.toml: prompt 1: the incorrect answer \" Mary and\" is 2 tokens [\" Mary\", \" and\"], not one",
        ] {
            assert!(e.contains(want), "{cmd}: {want:?} not in\n{e}");
        }
    }
    // `run` stopped before loading weights or creating anything.
    assert!(!tmp.path().join("out").exists());
}

#[test]
fn a_hook_the_family_does_not_have_is_named_before_loading() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = two_run_spec(tmp.path(), &tmp.path().join("out"), "ll").display().to_string();
    let text = std::fs::read_to_string(&spec).unwrap().replace("hooks = [\"resid_pre\"]", "hooks = [\"resid_mid\"]");
    std::fs::write(&spec, text).unwrap();
    let e = fails(&["validate", &spec, "--model-id", s(&fixture("neox-tiny"))]);
    assert!(e.contains("run 'resid': a gpt_neox model has no hook_resid_mid"), "{e}");
}

#[test]
fn a_panic_inside_a_job_names_the_run_the_job_and_the_prompts_and_keeps_finished_jobs() {
    // TL_RUN_INJECT_PANIC panics inside the named job as a libtorch binding would.
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("gpt2-tiny").display().to_string();
    let spec = common::repo_root().join("experiments/ioi.toml");
    for devices in ["cpu", "cpu,cpu"] {
        let out = tmp.path().join(devices.replace(',', "-"));
        let o = Command::new(env!("CARGO_BIN_EXE_tl-run"))
            .args(["run", s(&spec), "--model-id", &model, "--out", s(&out), "--quiet", "--devices", devices])
            .env("TL_RUN_INJECT_PANIC", "heads: patch attn.hook_v over [layer, head] at layer 1")
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{devices}: {e}");
        assert!(
            e.contains("run 'heads', job [15] heads: patch attn.hook_v over [layer, head] at layer 1: prompts 0-7 (one batch): internal failure: injected panic"),
            "{devices}: {e}"
        );
        assert!(
            !e.contains("panicked at") && !e.contains("stack backtrace") && e.lines().count() <= 2,
            "{devices}: {e}"
        );
        // The finished run and the jobs done before the failure stay.
        assert!(out.join("resid.parquet").is_file(), "{devices}");
        assert!(std::fs::read_dir(out.join(".tl-run/jobs")).unwrap().count() >= 6, "{devices}");
    }
}

/// A model path that is not there says which file or directory it looked for (in full, as a
/// spec's relative id is resolved against the spec) and how to give another; an unreachable hub
/// says how to work offline.
#[test]
fn a_missing_model_path_or_an_unreachable_hub_says_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = tmp.path().join("default.toml");
    std::fs::copy(repo_root().join("experiments/default.toml"), &spec).unwrap();
    let e = fails(&["validate", spec.to_str().unwrap()]);
    let looked_for = format!("{}/../.models/SmolLM2-135M-Instruct.Q4_1.gguf", tmp.path().display());
    assert!(e.contains(&format!("no such file: {looked_for}")) && e.contains("--model-id PATH"), "{e}");
    let not_gguf = tmp.path().join("weights.bin");
    std::fs::write(&not_gguf, b"x").unwrap();
    let e = fails(&["hooks", not_gguf.to_str().unwrap()]);
    assert!(e.contains("is a file but not a .gguf model"), "{e}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tl-run"))
        .args(["hooks", "org/model"])
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .env("HF_HUB_CACHE", tmp.path().join("hub"))
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("HF_HUB_OFFLINE=1") && e.contains("--model-id"), "{e}");
}

/// The metric's answers, wrong one way at a time: each a named error at its spec or file line.
#[test]
fn bad_answer_sets_and_metrics_are_named_at_their_line() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("gpt2-tiny");
    let clean = "clean = [\"When John and Mary went to the shops, John gave the bag to\", \"When John and Mary went to the shops, Mary gave the bag to\"]";
    let patch =
        "[[run]]\nname = \"r\"\nkind = \"activation_patching\"\nhooks = [\"resid_pre\"]\nover = [\"layer\", \"pos\"]\n";
    let dla = "[[run]]\nname = \"d\"\nkind = \"direct_logit_attribution\"\nover = [\"layer\"]\n";
    let spec = |name: &str, prompts: &str, metric: &str, runs: &str| {
        let path = tmp.path().join(format!("{name}.toml"));
        let text = format!(
            "name = \"t\"\n[model]\nid = \"{}\"\n[prompts]\n{prompts}\n[corruption]\nkind = \"swap_pairs\"\n[metric]\n{metric}\n{runs}",
            model.display()
        );
        std::fs::write(&path, text).unwrap();
        path
    };
    let cases: [(&str, PathBuf, &str, &str); 6] = [
        (
            "overlap",
            spec("overlap", &format!("{clean}\nanswers = [[\" Mary\"], [\" John\"]]\nwrong_answers = [[\" John\", \" Mary\"], [\" Mary\"]]"), "kind = \"logit_diff\"", patch),
            "validate",
            ":7:18: prompts.wrong_answers[0]: \" Mary\" is both a correct and a wrong answer",
        ),
        (
            "empty",
            spec("empty", &format!("{clean}\nanswers = [[], [\" John\"]]\nwrong_answers = [[\" John\"], [\" Mary\"]]"), "kind = \"prob_diff\"", patch),
            "validate",
            "prompts.answers[0]: an empty set",
        ),
        (
            "max",
            spec("max", &format!("{clean}\nanswers = [[\" Mary\", \" John\"], [\" John\", \" Mary\"]]"), "kind = \"prob\"\nwrong = \"max\"", patch),
            "validate",
            ":11:9: metric.wrong: folds several wrong answers into one logit, which only logit_diff reads",
        ),
        (
            "kl-dla",
            spec("kl-dla", &format!("{clean}\nanswers = [[\" Mary\", \" John\"], [\" John\", \" Mary\"]]"), "kind = \"kl_divergence\"", dla),
            "validate",
            "direct_logit_attribution reads the metric as a direction in the residual stream (W_U's answer columns), which metric kl_divergence is not",
        ),
        (
            "multi-token-diff",
            spec("multi-token-diff", &format!("{clean}\nanswers = [[\" Maryanne\", \" John\"], [\" John\", \" Mary\"]]"), "kind = \"logit_diff\"", patch),
            "run",
            "prompt 0: the correct answer \" Maryanne\" is 2 tokens [\" Mary\", \"anne\"], not one; metric logit_diff compares single tokens",
        ),
        (
            "multi-token-dla",
            spec("multi-token-dla", &format!("{clean}\nanswers = [[\" Maryanne\", \" John\"], [\" John\", \" Mary\"]]"), "kind = \"logprob\"", dla),
            "run",
            "run 'd' (direct_logit_attribution) reads one token's direction",
        ),
    ];
    for (name, path, cmd, expected) in cases {
        let out = tmp.path().join(format!("out-{name}"));
        let e = fails(&[cmd, s(&path), "--out", s(&out)]);
        // Spec problems at file:line:col, runtime ones after the file's name.
        let at = if expected.starts_with(':') { format!("{}{expected}", path.display()) } else { expected.to_string() };
        assert!(e.contains(&at) && e.contains(&format!("{}", path.display())), "{name}: {e}");
    }
    // A multi-token answer that takes its prompt past the context (gpt2-tiny: 64 positions).
    let long = "a ".repeat(58);
    let answer = " one two three four five six seven eight";
    let path = spec(
        "past-context",
        &format!("clean = [\"{long}\", \"{long}b\"]\nanswers = [[\"{answer}\"], [\"{answer}\"]]"),
        "kind = \"logprob\"",
        patch,
    );
    let e = fails(&["run", s(&path), "--out", s(&tmp.path().join("out-past"))]);
    assert!(
        e.contains("with its multi-token answer's tokens but the last (7 of them) it is")
            && e.contains("more than the model's context of 64"),
        "{e}"
    );
    // A malformed JSONL line is named by file and line.
    let jsonl = tmp.path().join("bad.jsonl");
    std::fs::write(&jsonl, "{\"prompt\": \"a b\", \"answer\": \" c\"}\n{\"prompt\": \"a b\" \"answer\": 3}\n").unwrap();
    let path = spec("jsonl", "file = \"bad.jsonl\"", "kind = \"logprob\"", patch);
    let e = fails(&["validate", s(&path)]);
    assert!(e.contains(&format!("{}:2: ", jsonl.display())), "{e}");
}

#[test]
fn bad_edge_attribution_options_are_named_at_their_line() {
    let tmp = tempfile::tempdir().unwrap();
    // Spec-level problems: each key at its line.
    let spec_text = "[corruption]\nkind = \"prompts\"\nprompts = [\"When John and Mary went to the shops, Mary gave the bag to\"]\n[[run]]\nname = \"e\"\nkind = \"edge_attribution\"\nmethod = \"eap-ig\"\nsteps = 0\ntop_n = [0, 5]\nintervention = \"resample\"\n";
    let p = spec(tmp.path(), &fixture("gpt2-tiny"), spec_text);
    let e = fails(&["validate", s(&p)]);
    for want in [
        "spec.toml:13:10: run[0].method: unknown value 'eap-ig' (valid: eap, eap_ig, clean_corrupted, exact); did you mean 'eap_ig'?",
        "spec.toml:14:9: run[0].steps: must be at least 1, got 0",
        "spec.toml:15:9: run[0].top_n: top_n takes circuit sizes of at least 1 edge",
        "spec.toml:16:16: run[0].intervention: unknown value 'resample' (valid: patching, zero, mean)",
    ] {
        assert!(e.contains(want), "{want:?} not in\n{e}");
    }
    // A circuit larger than the model's graph: named against the model before loading weights.
    let p = spec(
        tmp.path(),
        &fixture("gpt2-tiny"),
        "[corruption]\nkind = \"prompts\"\nprompts = [\"When John and Mary went to the shops, Mary gave the bag to\"]\n[[run]]\nname = \"e\"\nkind = \"edge_attribution\"\ngreedy = 5000\n",
    );
    for cmd in ["validate", "run"] {
        let e = fails(&[cmd, s(&p)]);
        assert!(
            e.contains("spec.toml:13:10: run 'e': greedy = 5000 is more edges than the model's graph has (110: 11 senders, 27 receivers); use at most 110"),
            "{cmd}: {e}"
        );
    }
    assert!(!tmp.path().join("out").exists());
}
