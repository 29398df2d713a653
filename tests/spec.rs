//! Specs: the IOI spec as written, every other accepted form, and errors that point at the
//! TOML line and key with the bad value and a suggestion, all problems at once.
use std::path::Path;

use tl_run::kinds::resolve_text;
use tl_run::kinds::{resolve_file, RunKind};
use tl_run::spec::Corruption;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_ioi_spec_resolves() {
    let spec = resolve_file(&repo().join("experiments/ioi.toml")).unwrap();
    assert_eq!(spec.name, "ioi-demo");
    assert_eq!(spec.model.id, "gpt2");
    assert_eq!(spec.prompts.len(), 8);
    assert_eq!(spec.prompts[1].correct, " John");
    assert_eq!(spec.corruption, Corruption::SwapPairs);
    assert!(spec.metric.normalize);
    let kinds: Vec<&str> = spec.runs.iter().map(|r| r.kind_name()).collect();
    assert_eq!(
        kinds,
        [
            "activation_patching",
            "activation_patching",
            "logit_lens",
            "direct_logit_attribution",
            "direct_logit_attribution",
            "head_scores",
            "attribution_patching",
            "attribution_patching",
            "ablation"
        ]
    );
    let RunKind::ActivationPatching(tl_run::kinds::activation_patching::Options { targets, .. }) = &spec.runs[1].kind
    else {
        panic!("expected activation patching")
    };
    assert_eq!(targets.len(), 3);
    let RunKind::AttributionPatching(tl_run::kinds::attribution_patching::Options { options, verify_top, .. }) =
        &spec.runs[7].kind
    else {
        panic!("expected attribution patching")
    };
    assert!(options.qk_fix && !options.grad_drop && *verify_top == 10);
    assert!(spec.output_dir.ends_with("experiments/results/ioi-demo"));
}

const GOOD: &str = r#"
name = "t"
[model]
id = "gpt2"
[prompts]
clean = ["a b", "c d"]
answers = [[" x", " y"], [" y", " x"]]
[corruption]
kind = "swap_pairs"
[[run]]
name = "r"
kind = "activation_patching"
hooks = ["resid_pre"]
over = ["layer", "pos"]
"#;

fn errors(text: &str) -> String {
    resolve_text(text, "spec.toml", Path::new(".")).expect_err("should fail").to_string()
}

#[test]
fn every_problem_is_reported_with_line_key_and_suggestion() {
    let bad = GOOD
        .replace(r#"hooks = ["resid_pre"]"#, r#"hooks = ["resid_pr", "z"]"#)
        .replace(r#"kind = "swap_pairs""#, r#"kind = "swap_pair""#)
        .replace(
            r#"over = ["layer", "pos"]"#,
            r#"over = ["layer", "pos"]
[[run]]
name = "r2"
kind = "activation_patchin""#,
        );
    let e = errors(&bad);
    assert!(e.contains("4 problems"), "{e}");
    assert!(e.contains("spec.toml:13:10: run[0].hooks[0]: unknown hook 'resid_pr'; did you mean 'resid_pre'"), "{e}");
    assert!(e.contains("run[0].over: attn.hook_z cannot be patched over [layer, pos]"), "{e}");
    assert!(e.contains("spec.toml:9:8: corruption.kind: unknown corruption 'swap_pair'"), "{e}");
    assert!(e.contains("run[1].kind: unknown run kind 'activation_patchin'"), "{e}");
}

#[test]
fn syntax_errors_and_unknown_keys_name_the_line() {
    let e = errors(&GOOD.replace("[model]\nid = \"gpt2\"", "[model]\nid = \"gpt2\"\nfold_lns = true"));
    assert!(e.contains("spec.toml:5:1") && e.contains("fold_lns"), "{e}");
    let e = errors(&GOOD.replace(r#"clean = ["a b", "c d"]"#, r#"clean = ["a b", "c d""#));
    assert!(e.contains("spec.toml:7:1: toml: invalid array"), "{e}");
}

#[test]
fn answers_must_pair_up_with_prompts() {
    let e = errors(&GOOD.replace(r#"answers = [[" x", " y"], [" y", " x"]]"#, r#"answers = [[" x", " y"]]"#));
    assert!(e.contains("prompts.answers: 1 answer entries for 2 clean prompts: give one per prompt"), "{e}");
}

#[test]
fn explicit_and_replaced_corruptions() {
    let s = resolve_text(
        &GOOD.replace(r#"kind = "swap_pairs""#, "kind = \"prompts\"\nprompts = [\"e f\", \"g h\"]"),
        "s",
        Path::new("."),
    )
    .unwrap();
    assert_eq!(s.prompts[1].corrupted.as_deref(), Some("g h"));
    let s = resolve_text(
        &GOOD.replace(r#"kind = "swap_pairs""#, "kind = \"replace_tokens\"\nreplace = { b = \"q\", d = \"r\" }"),
        "s",
        Path::new("."),
    )
    .unwrap();
    assert_eq!(s.prompts[0].corrupted.as_deref(), Some("a q"));
    assert_eq!(s.prompts[1].corrupted.as_deref(), Some("c r"));
}

#[test]
fn prompt_files_jsonl_and_prompt_pairs() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.jsonl"), "{\"clean\": \"a b\", \"answers\": [\" x\", \" y\"]}\n{\"prompt\": \"c d\", \"answer\": \" y\", \"wrong_answer\": \" x\"}\n").unwrap();
    std::fs::write(
        dir.path().join("pairs.json"),
        r#"{"prompts": [{"clean": "a b", "corrupt": "a c", "answers": [" x"], "wrong_answers": [" y"]}]}"#,
    )
    .unwrap();
    let with_file = |f: &str| {
        GOOD.replace(
            "clean = [\"a b\", \"c d\"]\nanswers = [[\" x\", \" y\"], [\" y\", \" x\"]]",
            &format!("file = \"{f}\""),
        )
    };
    let s = resolve_text(&with_file("p.jsonl"), "s", dir.path()).unwrap();
    assert_eq!(s.prompts.len(), 2);
    assert_eq!(s.prompts[1].incorrect.as_deref(), Some(" x"));
    let pairs = with_file("pairs.json").replace("[corruption]\nkind = \"swap_pairs\"\n", "");
    let s = resolve_text(&pairs, "s", dir.path()).unwrap();
    assert_eq!(s.corruption, Corruption::Prompts);
    assert_eq!(s.prompts[0].corrupted.as_deref(), Some("a c"));
    let e = resolve_text(&with_file("missing.jsonl"), "s", dir.path()).err().unwrap().to_string();
    assert!(e.contains("prompts.file") && e.contains("missing.jsonl"), "{e}");
    // --prompts replaces the spec's file, which then need not exist (a spec copied elsewhere).
    let spec_path = dir.path().join("copied.toml");
    std::fs::write(&spec_path, with_file("missing.jsonl")).unwrap();
    let s = tl_run::kinds::resolve_file_with_prompts(&spec_path, Some(&dir.path().join("p.jsonl"))).unwrap();
    assert_eq!(s.prompts.len(), 2);
    let e = tl_run::kinds::resolve_file_with_prompts(&spec_path, Some(&dir.path().join("gone.jsonl")))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("--prompts") && e.contains("gone.jsonl"), "{e}");
}

#[test]
fn the_induction_and_causal_tracing_specs_resolve() {
    let s = resolve_file(&repo().join("experiments/induction.toml")).unwrap();
    assert!(s.prompts.is_empty(), "repeated random tokens need no prompts");
    let RunKind::HeadScores(tl_run::kinds::head_scores::Options { source, .. }) = &s.runs[0].kind else {
        panic!("expected head scores")
    };
    assert!(matches!(source, tl_run::kinds::head_scores::HeadSource::RepeatedRandom { seq_len: 50, batch: 4, .. }));
    let s = resolve_file(&repo().join("experiments/causal_tracing.toml")).unwrap();
    let Corruption::Noise { noise, samples, words, .. } = &s.corruption else { panic!("expected noise") };
    assert_eq!((*noise, *samples), (3.0, 10));
    assert_eq!(words.as_deref(), Some(&["Eiffel Tower".to_string(), "Colosseum".to_string()][..]));
}

#[test]
fn options_of_the_new_kinds_are_checked_with_lines_and_suggestions() {
    let run = |body: &str| {
        GOOD.replace("kind = \"activation_patching\"\nhooks = [\"resid_pre\"]\nover = [\"layer\", \"pos\"]", body)
    };
    let e = errors(&run("kind = \"logit_lens\"\ntop_k = -1\nverify_top = 3"));
    assert!(e.contains("run[0].top_k: must be at least 0, got -1"), "{e}");
    assert!(e.contains("run[0].verify_top: 'verify_top' is not an option of logit_lens runs"), "{e}");
    let e = errors(&run("kind = \"head_scores\"\npatterns = [\"inducton\"]\nerror_measure = \"ab\""));
    assert!(e.contains("unknown pattern 'inducton'") && e.contains("did you mean 'induction'"), "{e}");
    assert!(e.contains("run[0].error_measure: unknown value 'ab' (valid: mul, abs); did you mean 'abs'?"), "{e}");
    // A custom detection matrix: square, lower triangular, finite (checked before any model).
    for (matrix, want) in [
        ("[[1.0], [1.0, 1.0]]", "run[0].custom[0].matrix: a detection matrix is square, one row and one column per token (BOS included): got 2 rows of lengths [1, 2]"),
        ("[[1.0, 1.0], [0.0, 1.0]]", "run[0].custom[0].matrix: a detection matrix is lower triangular (a token attends to itself and earlier tokens only): row 0 has 1 at column 1"),
        ("[[nan, 0.0], [0.0, 1.0]]", "run[0].custom[0].matrix: row 0 has NaN at column 0; the matrix's weights must be finite"),
    ] {
        let e = errors(&run(&format!("kind = \"head_scores\"\n[[run.custom]]\nname = \"m\"\nmatrix = {matrix}")));
        assert!(e.contains(want), "{matrix}: {e}");
    }
    let e = errors(&run("kind = \"direct_logit_attribution\"\nover = [\"layer\", \"pos\"]"));
    assert!(e.contains("spec.toml:13:8: run[0].over: unknown axes"), "{e}");
    let e = errors(&run("kind = \"ablation\"\nhooks = [\"zz\"]\nmethod = \"mean\""));
    assert!(e.contains("unknown hook 'zz' for ablation") && e.contains("did you mean 'z'"), "{e}");
    let e = errors(&run("kind = \"ablation\"\nhooks = [\"z\"]\nunits = [[1]]\nmeasure = \"direct_logit_attribution\""));
    assert!(e.contains("each unit of attn.hook_z is [layer, head], got [1]"), "{e}");
    let e = errors(&GOOD.replace("kind = \"swap_pairs\"", "kind = \"noise\"\nnoise = -1.0"));
    assert!(
        e.contains("noise needs either positions") && e.contains("corruption.noise: noise must be a positive number"),
        "{e}"
    );
    let e = errors(&GOOD.replace("kind = \"swap_pairs\"", "kind = \"swap_pairs\"\nsamples = 3"));
    assert!(e.contains("corruption.samples: 'samples' is an option of kind = \"noise\""), "{e}");
    // Patching needs a corruption; a head-score run on repeated random tokens needs no prompts.
    let e = errors(&GOOD.replace("[corruption]\nkind = \"swap_pairs\"\n", ""));
    assert!(e.contains("activation_patching runs need a [corruption] section"), "{e}");
    let no_prompts = "name = \"t\"\n[model]\nid = \"gpt2\"\n[[run]]\nname = \"r\"\nkind = \"head_scores\"\nsource = \"repeated_random\"\n";
    assert!(resolve_text(no_prompts, "s", Path::new(".")).is_ok());
    let e = errors(&no_prompts.replace("source = \"repeated_random\"\n", ""));
    assert!(e.contains("head_scores runs read prompts: add a [prompts] section"), "{e}");
}

#[test]
fn dtypes_are_named_and_checked() {
    for (name, kind) in [("float32", tch::Kind::Float), ("bfloat16", tch::Kind::BFloat16), ("float16", tch::Kind::Half)]
    {
        let s = resolve_text(
            &GOOD.replace("[model]\nid = \"gpt2\"", &format!("[model]\nid = \"gpt2\"\ndtype = \"{name}\"")),
            "s",
            Path::new("."),
        )
        .unwrap();
        assert_eq!(s.model.kind().unwrap(), kind);
    }
    assert_eq!(resolve_text(GOOD, "s", Path::new(".")).unwrap().model.kind().unwrap(), tch::Kind::Float);
    let e = errors(&GOOD.replace("[model]\nid = \"gpt2\"", "[model]\nid = \"gpt2\"\ndtype = \"fp8\""));
    assert!(e.contains("spec.toml:5:9: model.dtype: unknown dtype 'fp8' (valid: float32, bfloat16, float16)"), "{e}");
}

/// A kind reads the keys of its own options struct: any other key is named at the key itself
/// (dotted ones too), and under an unknown kind the keys no kind reads are named beside it.
#[test]
fn a_runs_unknown_keys_are_named_at_the_key() {
    let e = errors(&GOOD.replace("over = [\"layer\", \"pos\"]", "over = [\"layer\", \"pos\"]\ncolour.red = 1"));
    assert!(e.contains("spec.toml:15:1: run[0].colour: 'colour' is not an option of activation_patching runs"), "{e}");
    assert!(e.contains("(valid: hooks, over, layers, window, units)"), "{e}");
    let e = errors(&GOOD.replace("over = [\"layer\", \"pos\"]", "over = [\"layer\", \"pos\"]\nlayer = [0]"));
    assert!(
        e.contains("'layer' is not an option of activation_patching runs") && e.contains("did you mean 'layers'?"),
        "{e}"
    );
    let e = errors(&GOOD.replace("kind = \"activation_patching\"", "kind = \"activation_patchin\"\ncolour = 2"));
    assert!(
        e.contains("unknown run kind 'activation_patchin'") && e.contains("did you mean 'activation_patching'"),
        "{e}"
    );
    assert!(e.contains("run[0].colour: 'colour' is not an option of any run kind"), "{e}");
    assert!(!e.contains("'hooks'"), "hooks is some kind's key: reported once the kind is known\n{e}");
    // A value of the wrong type for a key the kind reads is serde's error at the value.
    let e = errors(&GOOD.replace("over = [\"layer\", \"pos\"]", "over = \"layer\""));
    assert!(e.contains("spec.toml:14:8") && e.contains("invalid type: string \"layer\", expected a sequence"), "{e}");
}
