//! Spec text fuzzing: valid specs mutated (keys dropped, renamed, retyped, values out of range,
//! huge numbers, unicode, deeply nested tables, truncation, stray bytes) never panic the resolver,
//! and every error it reports names a line (≥ 1) and a key.
//!
//! 10,000 cases per run with a fixed seed. A longer run: `TL_RUN_FUZZ_CASES=1000000
//! TL_RUN_FUZZ_SEED=7 cargo test --release --test spec_fuzz -- --nocapture`.
mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};

use common::*;

/// xorshift64*: a fixed, dependency-free stream of pseudo-random numbers.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
}

const KEYS: &[&str] = &[
    "name",
    "id",
    "revision",
    "dtype",
    "device",
    "fold_ln",
    "prepend_bos",
    "clean",
    "answers",
    "file",
    "kind",
    "prompts",
    "replace",
    "positions",
    "words",
    "noise",
    "samples",
    "seed",
    "normalize",
    "per_prompt",
    "hooks",
    "over",
    "layers",
    "qk_fix",
    "grad_drop",
    "verify_top",
    "incl_mid",
    "top_k",
    "top_k_at",
    "patterns",
    "error_measure",
    "exclude_bos",
    "source",
    "seq_len",
    "batch",
    "token_range",
    "method",
    "units",
    "top_dla_heads",
    "measure",
    "dataset",
    "dir",
    "allow_nonfinite",
    "custom",
    "matrix",
    "rule",
    "offset",
];

const VALUES: &[&str] = &[
    "-1",
    "0",
    "1",
    "2",
    "-9223372036854775808",
    "9223372036854775807",
    "99999999999999999999999",
    "1e308",
    "-1e308",
    "nan",
    "inf",
    "-inf",
    "0.5",
    "true",
    "false",
    "\"\"",
    "\"é漢字🙂\"",
    "\"\\u0000\"",
    "\"../../etc/passwd\"",
    "[]",
    "[[]]",
    "[1, \"a\", true]",
    "[-5, 1000000]",
    "{}",
    "{ a = 1 }",
    "\"resid_pre\"",
    "[\"layer\", \"pos\"]",
    "[\"head\", \"layer\", \"layer\"]",
    "\"logit_lens\"",
    "\"float64\"",
    "1979-05-27T07:32:00Z",
    "[[0, 0], [99, 99]]",
    "[[1.0, 2.0], [3.0]]",
];

fn nested(depth: usize, array: bool) -> String {
    if array {
        format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
    } else {
        format!("{}1{}", "{ a = ".repeat(depth), " }".repeat(depth))
    }
}

/// One mutation of `text`.
fn mutate(rng: &mut Rng, text: &str) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    if lines.is_empty() {
        lines.push(String::new());
    }
    let kv: Vec<usize> =
        (0..lines.len()).filter(|&i| lines[i].contains(" = ") && !lines[i].trim_start().starts_with('#')).collect();
    let at = if kv.is_empty() { 0 } else { *rng.pick(&kv) };
    match rng.below(12) {
        // Drop a key.
        0 if !kv.is_empty() => {
            lines.remove(at);
        }
        // Rename a key: to another real key (maybe in the wrong table) or a near miss.
        1 if !kv.is_empty() => {
            let (_, rest) = lines[at].split_once(" = ").unwrap();
            let key = if rng.below(2) == 0 {
                rng.pick(KEYS).to_string()
            } else {
                format!("{}x", lines[at].split(" = ").next().unwrap().trim())
            };
            lines[at] = format!("{key} = {rest}");
        }
        // Retype or replace a value.
        2..=4 if !kv.is_empty() => {
            let (key, _) = lines[at].split_once(" = ").unwrap();
            lines[at] = format!("{key} = {}", rng.pick(VALUES));
        }
        // Unicode in keys, strings and table names.
        5 => {
            let i = rng.below(lines.len());
            let pos = rng.below(lines[i].len() + 1);
            let pos = (0..=pos).rev().find(|&p| lines[i].is_char_boundary(p)).unwrap_or(0);
            let odd: &&str =
                rng.pick(&["é", "漢字", "🙂", "\u{200b}", "\u{202e}", "\"", "'", "[", "]", "=", "#", "\\"]);
            lines[i].insert_str(pos, odd);
        }
        // Deeply nested values.
        6 if !kv.is_empty() => {
            let (key, _) = lines[at].split_once(" = ").unwrap();
            let depth = *rng.pick(&[3, 20, 100, 1000]);
            lines[at] = format!("{key} = {}", nested(depth, rng.below(2) == 0));
        }
        // A deeply nested table header, or a duplicated / stray table.
        7 => {
            let depth = *rng.pick(&[2, 10, 200]);
            let header = format!("[{}]", (0..depth).map(|i| format!("t{i}")).collect::<Vec<_>>().join("."));
            let i = rng.below(lines.len() + 1);
            lines.insert(
                i,
                rng.pick(&[
                    header.as_str(),
                    "[model]",
                    "[[run]]",
                    "[output]",
                    "[prompts]",
                    "[metric]",
                    "[[run.custom]]",
                    "run = 3",
                ])
                .to_string(),
            );
        }
        // Extra keys, valid for some tables only.
        8 => {
            let i = rng.below(lines.len() + 1);
            lines.insert(i, format!("{} = {}", rng.pick(KEYS), rng.pick(VALUES)));
        }
        // Truncate.
        9 => {
            let mut t = lines.join("\n");
            let cut = rng.below(t.len() + 1);
            let cut = (0..=cut).rev().find(|&p| t.is_char_boundary(p)).unwrap_or(0);
            t.truncate(cut);
            return t;
        }
        // Swap two lines.
        10 if lines.len() > 1 => {
            let (a, b) = (rng.below(lines.len()), rng.below(lines.len()));
            lines.swap(a, b);
        }
        // Duplicate a line.
        _ => {
            let i = rng.below(lines.len().max(1));
            if let Some(l) = lines.get(i).cloned() {
                lines.insert(i, l);
            }
        }
    }
    lines.join("\n")
}

fn seeds() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(repo_root().join("experiments"))
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    v.sort();
    // Kinds the shipped specs do not use, with their options.
    v.push(
        r#"name = "more"
[model]
id = "gpt2"
dtype = "bfloat16"
prepend_bos = false
[prompts]
clean = ["The Eiffel Tower is in", "The Colosseum is in"]
answers = [[" Paris", " Rome"], [" Rome", " Paris"]]
[corruption]
kind = "noise"
words = ["Eiffel Tower", "Colosseum"]
noise = 3.0
samples = 2
seed = 1
[metric]
kind = "logprob"
per_prompt = true
[[run]]
name = "abl"
kind = "ablation"
hooks = ["z"]
method = "resample"
units = [[0, 1], [1, 2]]
positions = [1]
measure = "metric"
[[run]]
name = "hs"
kind = "head_scores"
patterns = ["previous_token"]
error_measure = "mul"
exclude_bos = true
[[run.custom]]
name = "diag"
rule = "relative"
offset = 0
[[run]]
name = "dla"
kind = "direct_logit_attribution"
over = ["layer", "neuron"]
layers = [0]
"#
        .into(),
    );
    v
}

#[test]
fn mutated_specs_never_panic_and_every_error_names_a_line_and_key() {
    let cases: usize = std::env::var("TL_RUN_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let seed: u64 = std::env::var("TL_RUN_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5eed);
    let mut rng = Rng(seed.max(1));
    let seeds = seeds();
    let base = repo_root().join("experiments");
    let (mut accepted, mut rejected) = (0, 0);
    for case in 0..cases {
        let mut text = rng.pick(&seeds).clone();
        for _ in 0..1 + rng.below(3) {
            text = mutate(&mut rng, &text);
        }
        // The resolver's own panics are what is tested: the default hook stays quiet while one
        // is caught, and the failure below prints the spec that caused it.
        let quiet = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let outcome = catch_unwind(AssertUnwindSafe(|| tl_run::kinds::resolve_text(&text, "fuzz.toml", &base)));
        std::panic::set_hook(quiet);
        match outcome {
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panic!("case {case} (seed {seed}) panicked the resolver ({msg}) on:\n{text}");
            }
            Ok(Ok(_)) => accepted += 1,
            Ok(Err(errors)) => {
                rejected += 1;
                assert!(!errors.diagnostics.is_empty(), "case {case}: an error with no diagnostics for:\n{text}");
                for d in &errors.diagnostics {
                    if d.line == 0 || d.key.is_empty() || d.message.is_empty() {
                        panic!("case {case}: a diagnostic without line or key: {d:?}\n{errors}\nfor:\n{text}");
                    }
                }
            }
        }
    }
    eprintln!("{cases} mutated specs: {accepted} accepted, {rejected} rejected with located errors, no panic");
    assert!(
        accepted > 100 && rejected > cases / 3,
        "{accepted} accepted, {rejected} rejected: the mutations do not exercise both sides"
    );
}
