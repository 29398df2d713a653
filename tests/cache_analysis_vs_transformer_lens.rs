//! logit_lens, direct_logit_attribution and head_scores runs, end to end through `tl-run`, against
//! TransformerLens's ActivationCache (accumulated_resid, decompose_resid, stack_head_results,
//! stack_neuron_results, logit_attrs) and head_detector on four models (tests/oracle/dump_analysis.py).
mod common;

use common::*;
use tl_run::model::hook_point::{HookPoint, NormHook};
use tl_run::{Hooks, Input, Stop};

const FIXTURES: [&str; 4] = ["gpt2-tiny", "gpt2-odd", "llama-tiny", "stories260K"];

fn labels(o: &Oracle, key: &str) -> Vec<String> {
    serde_json::from_str(&o.metadata[key]).unwrap()
}

fn analysis_spec(fixture: &str, repeated: (i64, i64)) -> String {
    format!(
        r#"name = "analysis"
[model]
id = "{model}"
[prompts]
file = "{prompts}"
[metric]
kind = "logit_diff"
per_prompt = true

[[run]]
name = "lens"
kind = "logit_lens"
incl_mid = true
top_k = 5

[[run]]
name = "lens_all"
kind = "logit_lens"
top_k = 2
top_k_at = "all"

[[run]]
name = "dla_layer"
kind = "direct_logit_attribution"
over = ["layer"]

[[run]]
name = "dla_head"
kind = "direct_logit_attribution"
over = ["layer", "head"]

[[run]]
name = "dla_neuron"
kind = "direct_logit_attribution"
over = ["layer", "neuron"]

[[run]]
name = "heads_mul"
kind = "head_scores"
patterns = ["previous_token", "duplicate_token", "induction"]
[[run.custom]]
name = "induction_rule"
rule = "same_token"
offset = 1
[[run.custom]]
name = "previous_rule"
rule = "relative"
offset = 1

[[run]]
name = "heads_mul_excl"
kind = "head_scores"
exclude_bos = true
exclude_current_token = true

[[run]]
name = "heads_abs"
kind = "head_scores"
error_measure = "abs"

[[run]]
name = "heads_abs_excl"
kind = "head_scores"
error_measure = "abs"
exclude_bos = true
exclude_current_token = true

[[run]]
name = "repeated"
kind = "head_scores"
source = "repeated_random"
seq_len = 10
batch = 3
seed = 5
token_range = [{lo}, {hi}]
"#,
        model = fixture_path(fixture),
        prompts = prompt_file(fixture).display(),
        lo = repeated.0,
        hi = repeated.1
    )
}

fn fixture_path(f: &str) -> String {
    fixture(f).display().to_string()
}

/// Per-prompt rows of `label` in prompt order.
fn per_prompt(t: &Table, label: &str) -> Vec<f64> {
    let mut rows: Vec<(i64, f64)> = t
        .rows(|t, i| {
            t.str("label", i).as_deref() == Some(label) && t.int("prompt", i).is_some() && t.int("rank", i).is_none()
        })
        .into_iter()
        .map(|i| (t.int("prompt", i).unwrap(), t.value(i)))
        .collect();
    rows.sort_by_key(|r| r.0);
    rows.into_iter().map(|r| r.1).collect()
}

/// Every label's per-prompt values, label-major (value i: labels[i / n], prompt i % n), and the
/// oracle's [n, labels] tensor `key` in the same order.
fn by_label(fixture: &str, run: &str, t: &Table, o: &Oracle, key: &str, labels: &[String]) -> (Vec<f64>, Vec<f64>) {
    let theirs = o.get(key);
    let n = theirs.size()[0] as usize;
    let mut ours = Vec::new();
    for label in labels {
        let v = per_prompt(t, label);
        assert_eq!(v.len(), n, "{fixture} run {run}: prompts with a {label} row");
        ours.extend(v);
    }
    (ours, values(&theirs.transpose(0, 1)))
}

/// Where `ours` and `theirs` differ most (`at` names value i), for a comparison's description.
fn worst_at(ours: &[f64], theirs: &[f64], at: impl Fn(usize) -> String) -> String {
    let worst = ours.iter().zip(theirs).map(|(a, b)| (a - b).abs()).enumerate().max_by(|a, b| a.1.total_cmp(&b.1));
    match worst {
        Some((i, _)) if ours.len() == theirs.len() => format!("largest |diff| at {}", at(i)),
        _ => "no common values".into(),
    }
}

#[test]
fn logit_lens_dla_and_head_scores_match_transformer_lens() {
    for fixture in FIXTURES {
        let o = Oracle::read(fixture, "analysis.safetensors");
        let range = if fixture.starts_with("gpt2") { (1000, 10000) } else { (3, 512) };
        let dir = run_spec(&analysis_spec(fixture, range), &[]);
        let out = dir.path().join("out");
        // Logit lens: each label's per-prompt value along the answer direction (logit-difference
        // units; a do-nothing lens reports zeros), all labels and prompts in one comparison (a
        // label alone may carry little signal; each value is still held to the tolerance).
        let lens = Table::read(&out.join("lens.parquet"));
        let lens_labels = labels(&o, "lens_labels");
        let n = o.get("lens").size()[0];
        let (ours, theirs) = by_label(fixture, "lens", &lens, &o, "lens", &lens_labels);
        let at = worst_at(&ours, &theirs, |i| format!("{} prompt {}", lens_labels[i / n as usize], i % n as usize));
        let what = format!("{fixture} run lens, {} labels × {n} prompts (oracle lens; {at})", lens_labels.len());
        assert_oracle(&what, &ours, &theirs, Baseline::Zero, Tol::Abs(1e-4));
        // The top 5 tokens of each label and prompt; their probabilities in one comparison.
        let (mut probs, mut their_probs, mut located) = (Vec::new(), Vec::new(), Vec::new());
        for p in 0..n {
            for (c, label) in lens_labels.iter().enumerate() {
                let mut top = lens.rows(|t, i| {
                    t.int("prompt", i) == Some(p)
                        && t.str("label", i).as_deref() == Some(label)
                        && t.int("rank", i).is_some()
                });
                top.sort_by_key(|&i| lens.int("rank", i));
                let ids: Vec<i64> = top.iter().map(|&i| lens.int("token_id", i).unwrap()).collect();
                let their_ids: Vec<i64> = Vec::try_from(o.get("lens_topk_ids").get(p).get(c as i64)).unwrap();
                assert_eq!(ids, their_ids, "{fixture} lens top-5 tokens {label} prompt {p}");
                probs.extend(top.iter().map(|&i| lens.value(i)));
                their_probs.extend(values(&o.get("lens_topk_probs").get(p).get(c as i64)));
                located.extend((0..top.len()).map(|r| format!("{label} prompt {p} rank {r}")));
            }
        }
        let at = worst_at(&probs, &their_probs, |i| located[i].clone());
        let what = format!(
            "{fixture} run lens, top-5 probabilities of {} labels × {n} prompts (oracle lens_topk_probs; {at})",
            lens_labels.len()
        );
        assert_oracle(&what, &probs, &their_probs, Baseline::Zero, Tol::Abs(1e-5));
        // Top-k at every position of each prompt's own tokens (none at left padding): the last
        // position's rows are the top-k above.
        let all = Table::read(&out.join("lens_all.parquet"));
        let seq = lens.int("pos", lens.mean_rows()[0]).unwrap() + 1;
        let top_rows = all.rows(|t, i| t.int("rank", i).is_some());
        let manifest: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
        let tokens: i64 =
            manifest["tokens"]["clean"].as_array().unwrap().iter().map(|t| t.as_array().unwrap().len() as i64).sum();
        assert_eq!(
            top_rows.len() as i64,
            (lens_labels.len() as i64 - lens_labels.iter().filter(|l| l.ends_with("_mid")).count() as i64) * tokens * 2,
            "{fixture}: top-2 rows at every position of the prompts"
        );
        for &i in &top_rows {
            let (p, pos) = (all.int("prompt", i).unwrap() as usize, all.int("pos", i).unwrap());
            let len = manifest["tokens"]["clean"][p].as_array().unwrap().len() as i64;
            assert!(pos >= seq - len, "{fixture}: a top-k row at prompt {p}'s pad position {pos}");
        }
        for &i in top_rows.iter().filter(|&&i| all.int("pos", i) == Some(seq - 1)) {
            let (p, label, rank) =
                (all.int("prompt", i).unwrap(), all.str("label", i).unwrap(), all.int("rank", i).unwrap());
            let c = lens_labels.iter().position(|l| *l == label).unwrap() as i64;
            assert_eq!(
                all.int("token_id", i).unwrap(),
                o.get("lens_topk_ids").int64_value(&[p, c, rank]),
                "{fixture} top_k_at = all, {label} prompt {p}"
            );
        }
        // DLA per layer, head and neuron, per prompt.
        for (run, key) in [("dla_layer", "dla_layer"), ("dla_head", "dla_head"), ("dla_neuron", "dla_neuron")] {
            let t = Table::read(&out.join(format!("{run}.parquet")));
            let their_labels = labels(&o, &format!("{key}_labels"));
            let ours: Vec<String> = t.mean_rows().into_iter().map(|i| t.str("label", i).unwrap()).collect();
            assert_eq!(ours, their_labels, "{fixture} {run} labels");
            // Every term against TransformerLens (each layer, each head, each neuron), all terms
            // and prompts in one comparison: a single neuron's DLA can be ~1e-5 on every prompt.
            let (ours, theirs) = by_label(fixture, run, &t, &o, key, &their_labels);
            let n = o.get(key).size()[0] as usize;
            let at = worst_at(&ours, &theirs, |i| format!("{} prompt {}", their_labels[i / n], i % n));
            let what =
                format!("{fixture} run {run}, {} components × {n} prompts (oracle {key}; {at})", their_labels.len());
            assert_oracle(&what, &ours, &theirs, Baseline::Zero, Tol::Abs(1e-4));
        }
        dla_sums_add_up(fixture, &o, &out);
        // Head detector: every pattern, measure and exclusion, averaged over the prompts.
        for (run, measure, excl) in [
            ("heads_mul", "mul", "all"),
            ("heads_mul_excl", "mul", "excl"),
            ("heads_abs", "abs", "all"),
            ("heads_abs_excl", "abs", "excl"),
        ] {
            let t = Table::read(&out.join(format!("{run}.parquet")));
            for pattern in ["previous_token", "duplicate_token", "induction"] {
                let ours: Vec<f64> = t
                    .rows(|t, i| t.str("pattern", i).as_deref() == Some(pattern))
                    .into_iter()
                    .map(|i| t.value(i))
                    .collect();
                // abs scores are rounded to 3 decimals, as TL does.
                let tol = if measure == "abs" { 1.1e-3 } else { 1e-5 };
                let key = format!("heads/{pattern}/{measure}/{excl}");
                assert_oracle(
                    &format!("{fixture} run {run}, {pattern} per [layer, head] (oracle {key})"),
                    &ours,
                    &values(o.get(&key)),
                    Baseline::Zero,
                    Tol::Abs(tol),
                );
            }
        }
        // The spec's own rules reproduce the named patterns.
        let t = Table::read(&out.join("heads_mul.parquet"));
        let of = |p: &str| -> Vec<f64> {
            t.rows(|t, i| t.str("pattern", i).as_deref() == Some(p)).into_iter().map(|i| t.value(i)).collect()
        };
        let what = format!("{fixture} run heads_mul, custom same_token offset 1 rule (oracle heads/induction/mul/all)");
        assert_oracle(
            &what,
            &of("induction_rule"),
            &values(o.get("heads/induction/mul/all")),
            Baseline::Zero,
            Tol::Abs(1e-5),
        );
        let what =
            format!("{fixture} run heads_mul, custom relative offset 1 rule (oracle heads/previous_token/mul/all)");
        assert_oracle(
            &what,
            &of("previous_rule"),
            &values(o.get("heads/previous_token/mul/all")),
            Baseline::Zero,
            Tol::Abs(1e-5),
        );
        // Repeated random tokens: the same tokens as torch's generator, the demo's stripe scores.
        let tokens = tl_run::analysis::head_detector::repeated_random_tokens(5, 3, 10, range.0, range.1);
        assert!(tokens.equal(o.get("repeated/tokens")), "{fixture}: repeated random tokens differ from torch.randint");
        let t = Table::read(&out.join("repeated.parquet"));
        for pattern in ["previous_token", "duplicate_token", "induction"] {
            let ours: Vec<f64> = t
                .rows(|t, i| t.str("pattern", i).as_deref() == Some(pattern))
                .into_iter()
                .map(|i| t.value(i))
                .collect();
            let what =
                format!("{fixture} run repeated, {pattern} stripe per [layer, head] (oracle repeated/{pattern})");
            assert_oracle(&what, &ours, &values(o.get(&format!("repeated/{pattern}"))), Baseline::Zero, Tol::Abs(1e-5));
        }
    }
}

/// The decomposition adds up: per layer to the final logit difference; per head plus each layer's
/// b_O to that layer's attn_out; per neuron plus b_out to its mlp_out (at the last position,
/// through the run's own ln_final scale).
fn dla_sums_add_up(fixture: &str, o: &Oracle, out: &std::path::Path) {
    let layer = Table::read(&out.join("dla_layer.parquet"));
    let head = Table::read(&out.join("dla_head.parquet"));
    let neuron = Table::read(&out.join("dla_neuron.parquet"));
    let final_ld = values(o.get("final_logit_diff"));
    let n = final_ld.len() as i64;
    let of_prompt = |t: &Table, p: i64, keep: &dyn Fn(&Table, usize) -> bool| -> f64 {
        t.rows(|t, i| t.int("prompt", i) == Some(p) && keep(t, i)).into_iter().map(|i| t.value(i)).sum()
    };
    let model = load(fixture, tl_run::model::config::Processing::TRANSFORMER_LENS);
    let tok = model.tokenizer().unwrap();
    let prompts: Vec<String> = read_prompt_texts(fixture);
    let batch = tok.batch(&prompts, true).unwrap();
    let mut hooks = Hooks::capture([HookPoint::LnFinal(NormHook::Scale)]);
    let _ = model.run(Input::Tokens(&batch.tokens), batch.mask.as_ref(), &mut hooks, Stop::FinalNorm).unwrap();
    let scale = values(&hooks.cache[&HookPoint::LnFinal(NormHook::Scale)].select(1, -1));
    let answers = o.get("answers");
    let layernorm = model.cfg.norm.kind == tl_run::model::config::NormKind::LayerNorm;
    // A constant vector's DLA in prompt p.
    let bias_dla = |b: &tch::Tensor, p: i64| -> f64 {
        let (c, w) = (answers.int64_value(&[p, 0]), answers.int64_value(&[p, 1]));
        let dir = model.weights.w_u.select(1, c) - model.weights.w_u.select(1, w);
        let b = if layernorm { b - b.mean(tch::Kind::Float) } else { b.shallow_clone() };
        (b * dir).sum(tch::Kind::Double).double_value(&[]) / scale[p as usize]
    };
    // Per prompt, the per-layer terms plus b_U add up to TransformerLens's final logit difference
    // (b_U is excluded from DLA by logit_attrs; with fold_ln it holds ln_final's bias): with
    // every term zero (a do-nothing DLA) the sum would be b_U's difference alone.
    let b_u: Vec<f64> = (0..n)
        .map(|p| {
            let (c, w) = (answers.int64_value(&[p, 0]), answers.int64_value(&[p, 1]));
            model.weights.b_u.double_value(&[c]) - model.weights.b_u.double_value(&[w])
        })
        .collect();
    let totals: Vec<f64> = (0..n).map(|p| of_prompt(&layer, p, &|_, _| true) + b_u[p as usize]).collect();
    let what = format!("{fixture} run dla_layer, Σ terms + b_U per prompt (oracle final_logit_diff)");
    assert_oracle(&what, &totals, &final_ld, Baseline::Values(&b_u), Tol::Abs(1e-4));
    for p in 0..n {
        for l in 0..model.cfg.n_layers as i64 {
            let attn = of_prompt(&layer, p, &|t, i| t.str("label", i) == Some(format!("{l}_attn_out")));
            let heads = of_prompt(&head, p, &|t, i| t.int("layer", i) == Some(l));
            let b_o = bias_dla(&model.weights.blocks[l as usize].attn.b_o, p);
            assert!(
                (heads + b_o - attn).abs() <= 1e-4,
                "{fixture} prompt {p} layer {l}: heads {heads} + b_O {b_o} != attn_out {attn}"
            );
            let mlp = of_prompt(&layer, p, &|t, i| t.str("label", i) == Some(format!("{l}_mlp_out")));
            let neurons = of_prompt(&neuron, p, &|t, i| t.int("layer", i) == Some(l));
            let b_out = bias_dla(&model.weights.blocks[l as usize].mlp.b_out, p);
            assert!(
                (neurons + b_out - mlp).abs() <= 1e-4,
                "{fixture} prompt {p} layer {l}: neurons {neurons} + b_out {b_out} != mlp_out {mlp}"
            );
        }
    }
}

fn read_prompt_texts(fixture: &str) -> Vec<String> {
    std::fs::read_to_string(prompt_file(fixture))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["clean"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_custom_detection_matrix_matches_transformer_lens() {
    for fixture in ["gpt2-tiny", "llama-tiny"] {
        let o = Oracle::read(fixture, "analysis.safetensors");
        let first: Vec<String> = serde_json::from_str(&o.metadata["prompts"]).unwrap();
        let tok = load(fixture, tl_run::model::config::Processing::TRANSFORMER_LENS);
        let seq = tok.tokenizer().unwrap().encode(&first[0], true).unwrap().len();
        // Attends to the token two back and to the first token (as the oracle's).
        let rows: Vec<String> = (0..seq)
            .map(|i| {
                format!(
                    "[{}]",
                    (0..seq)
                        .map(|j| if j == 0 || (i >= 2 && j == i - 2) { "1" } else { "0" })
                        .collect::<Vec<_>>()
                        .join(",")
                )
            })
            .collect();
        let spec = format!(
            "name = \"custom\"\n[model]\nid = \"{}\"\n[prompts]\nclean = [{:?}]\nanswers = [[\"x\"]]\n[metric]\nkind = \"prob\"\n\
             [[run]]\nname = \"mul\"\nkind = \"head_scores\"\n[[run.custom]]\nname = \"two_back\"\nmatrix = [{}]\n\
             [[run]]\nname = \"abs\"\nkind = \"head_scores\"\nerror_measure = \"abs\"\nexclude_bos = true\nexclude_current_token = true\n[[run.custom]]\nname = \"two_back\"\nmatrix = [{}]\n",
            fixture_path(fixture), first[0], rows.join(","), rows.join(",")
        );
        let dir = run_spec(&spec, &[]);
        for (run, key, tol) in [("mul", "heads/custom/mul/all", 1e-5), ("abs", "heads/custom/abs/excl", 1.1e-3)] {
            let t = Table::read(&dir.path().join(format!("out/{run}.parquet")));
            let ours: Vec<f64> = (0..t.len()).map(|i| t.value(i)).collect();
            assert_oracle(
                &format!("{fixture} run {run}, custom two_back matrix per [layer, head] (oracle {key})"),
                &ours,
                &values(o.get(key)),
                Baseline::Zero,
                Tol::Abs(tol),
            );
        }
    }
}
