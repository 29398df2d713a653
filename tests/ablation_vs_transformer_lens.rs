//! ablation runs and noise corruption, end to end through `tl-run`, against TransformerLens
//! run_with_hooks ablations, its per-head DLA after a knock-out, and patching.py on noised
//! embeddings (tests/oracle/dump_ablation.py), on a GPT-2-shaped fixture and a grouped-query Llama.
mod common;

use common::*;

const FIXTURES: [&str; 2] = ["gpt2-tiny", "llama-tiny"];

fn ablation_spec(fixture: &str, o: &Oracle, seq: i64) -> String {
    let mut s = format!(
        "name = \"ablate\"\n[model]\nid = \"{}\"\n{}[corruption]\nkind = \"swap_pairs\"\n[metric]\nkind = \"logit_diff\"\nper_prompt = true\n",
        common::fixture(fixture).display(),
        prompts_toml(o)
    );
    let runs = [
        ("z_zero", "z", "method = \"zero\""),
        ("z_mean", "z", "method = \"mean\""),
        ("z_resample", "z", "method = \"resample\""),
        ("z_mean_last", "z", &*format!("method = \"mean\"\npositions = [{}]", seq - 1)),
        ("z_zero_loss", "z", "method = \"zero\"\nmeasure = \"loss\""),
        ("attn_out_mean", "attn_out", "method = \"mean\""),
        ("mlp_out_mean", "mlp_out", "method = \"mean\""),
        ("mlp_post_zero", "mlp_post", "method = \"zero\""),
        ("knockout", "z", "method = \"mean\"\nunits = [[1, 0], [1, 2]]\nmeasure = \"direct_logit_attribution\""),
    ];
    // The mean over a dataset file holding the same prompts is the mean over the prompts.
    let dataset = format!("method = \"mean\"\ndataset = \"{}\"", prompt_file(fixture).display());
    let runs: Vec<(&str, &str, &str)> = runs
        .into_iter()
        .chain(fixture.starts_with("gpt2").then_some(("z_mean_dataset", "z", dataset.as_str())))
        .collect();
    for (name, hook, opts) in runs {
        s.push_str(&format!("\n[[run]]\nname = \"{name}\"\nkind = \"ablation\"\nhooks = [\"{hook}\"]\n{opts}\n"));
    }
    s
}

/// Mean rows of ablated units (layer set), in table order.
fn unit_means(t: &Table) -> Vec<f64> {
    t.mean_rows().into_iter().filter(|&i| t.int("layer", i).is_some()).map(|i| t.value(i)).collect()
}

#[test]
fn ablations_match_transformer_lens_hooks() {
    for fixture in FIXTURES {
        let o = Oracle::read(fixture, "ablation.safetensors");
        let prompts: Vec<serde_json::Value> = serde_json::from_str(&o.metadata["prompts"]).unwrap();
        let model = load(fixture, tl_run::model::config::Processing::TRANSFORMER_LENS);
        let seq = model.tokenizer().unwrap().encode(prompts[0]["clean"].as_str().unwrap(), true).unwrap().len() as i64;
        let dir = run_spec(&ablation_spec(fixture, &o, seq), &[]);
        let out = dir.path().join("out");
        // A do-nothing ablation leaves the clean run's metric (logit difference, or loss).
        let clean_ld = o.get("clean_baseline").double_value(&[0]);
        let clean_loss = o.get("clean_loss").double_value(&[0]);
        for key in [
            "z_zero",
            "z_mean",
            "z_resample",
            "z_mean_last",
            "z_zero_loss",
            "attn_out_mean",
            "mlp_out_mean",
            "mlp_post_zero",
        ] {
            let t = Table::read(&out.join(format!("{key}.parquet")));
            let (clean, what) =
                if key.ends_with("loss") { (clean_loss, "clean_loss") } else { (clean_ld, "clean_baseline") };
            assert_oracle(
                &format!("{fixture} ablation run {key} (oracle {key}, unit means)"),
                &unit_means(&t),
                &values(o.get(key)),
                Baseline::Value(clean),
                Tol::Abs(1e-4),
            );
            let baseline =
                t.rows(|t, i| t.str("label", i).as_deref() == Some("baseline") && t.int("prompt", i).is_none());
            assert_oracle(
                &format!("{fixture} ablation run {key} baseline row (oracle {what})"),
                &[t.value(baseline[0])],
                &[clean],
                Baseline::Zero,
                Tol::Abs(1e-4),
            );
        }
        if fixture.starts_with("gpt2") {
            let t = Table::read(&out.join("z_mean_dataset.parquet"));
            assert_oracle(
                &format!("{fixture} ablation run z_mean_dataset, mean over a dataset file (oracle z_mean)"),
                &unit_means(&t),
                &values(o.get("z_mean")),
                Baseline::Value(clean_ld),
                Tol::Abs(1e-4),
            );
        }
        // Knock out two heads, then per-head direct logit attribution, per prompt.
        let t = Table::read(&out.join("knockout.parquet"));
        let dla = o.get("knockout_dla");
        for p in 0..dla.size()[0] {
            let ours: Vec<f64> = t
                .rows(|t, i| t.int("prompt", i) == Some(p) && t.str("label", i).is_some_and(|l| l.starts_with('L')))
                .into_iter()
                .map(|i| t.value(i))
                .collect();
            assert_oracle(
                &format!("{fixture} ablation run knockout, per-head DLA of prompt {p} (oracle knockout_dla)"),
                &ours,
                &values(&dla.get(p)),
                Baseline::Zero,
                Tol::Abs(1e-4),
            );
        }
    }
}

#[test]
fn noise_corruption_matches_causal_tracing_with_transformer_lens() {
    for fixture in FIXTURES {
        let o = Oracle::read(fixture, "ablation.safetensors");
        let noise: serde_json::Value = serde_json::from_str(&o.metadata["noise"]).unwrap();
        let prompts: Vec<serde_json::Value> = serde_json::from_str(&o.metadata["prompts"]).unwrap();
        let m = noise["prompts"].as_u64().unwrap() as usize;
        let clean: Vec<String> = prompts[..m].iter().map(|p| p["clean"].to_string()).collect();
        let answers: Vec<String> = prompts[..m].iter().map(|p| format!("[{}]", p["answers"][0])).collect();
        let word = noise["word"][fixture].as_str().unwrap().trim();
        let spec = format!(
            "name = \"trace\"\n[model]\nid = \"{}\"\n[prompts]\nclean = [{}]\nanswers = [{}]\n\
             [corruption]\nkind = \"noise\"\nwords = [\"{word}\"]\nnoise = {}\nsamples = {}\nseed = {}\n\
             [metric]\nkind = \"prob\"\n\
             [[run]]\nname = \"trace\"\nkind = \"activation_patching\"\nhooks = [\"resid_pre\", \"attn_out\", \"mlp_out\"]\nover = [\"layer\", \"pos\"]\n",
            common::fixture(fixture).display(),
            clean.join(", "),
            answers.join(", "),
            noise["noise"],
            noise["samples"],
            noise["seed"]
        );
        // The noised positions given by index instead of by word give the same tracing.
        let mask = o.get("noise_mask");
        let positions: Vec<i64> = (0..mask.size()[1]).filter(|&j| mask.int64_value(&[0, j]) == 1).collect();
        assert!((0..mask.size()[0])
            .all(|p| (0..mask.size()[1]).all(|j| (mask.int64_value(&[p, j]) == 1) == positions.contains(&j))));
        let by_index = spec.replace(&format!("words = [\"{word}\"]"), &format!("positions = {positions:?}"));
        for spec in [spec, by_index] {
            let dir = run_spec(&spec, &[]);
            let out = dir.path().join("out");
            let manifest: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
            // Probabilities of an answer are ~1/vocabulary on a GPT-2-vocabulary fixture, so an
            // absolute 1e-5 could not fail: the baselines agree to 1e-4 of themselves, and the
            // traces to 1e-3 of their effect (their largest change from the noised probability).
            let by = if spec.contains("positions = ") { "positions" } else { "word" };
            assert_oracle(
                &format!("{fixture} noise ({by}) manifest clean_baseline (oracle noise_clean_prob)"),
                &[manifest["metric"]["clean_baseline"].as_f64().unwrap()],
                &values(o.get("noise_clean_prob")),
                Baseline::Zero,
                Tol::OfSignal(1e-4),
            );
            assert_oracle(
                &format!("{fixture} noise ({by}) manifest corrupted_baseline (oracle noise_corrupted_prob)"),
                &[manifest["metric"]["corrupted_baseline"].as_f64().unwrap()],
                &values(o.get("noise_corrupted_prob")),
                Baseline::Zero,
                Tol::OfSignal(1e-4),
            );
            // Restoring nothing leaves the noised probability.
            let noised = o.get("noise_corrupted_prob").double_value(&[0]);
            let t = Table::read(&out.join("trace.parquet"));
            for (suffix, key) in [
                ("hook_resid_pre", "noise_resid_pre"),
                ("hook_attn_out", "noise_attn_out"),
                ("hook_mlp_out", "noise_mlp_out"),
            ] {
                let ours: Vec<f64> = t
                    .mean_rows()
                    .into_iter()
                    .filter(|&i| t.str("hook", i).unwrap().ends_with(suffix))
                    .map(|i| t.value(i))
                    .collect();
                assert_oracle(
                    &format!("{fixture} noise ({by}) run trace {suffix} (oracle {key})"),
                    &ours,
                    &values(o.get(key)),
                    Baseline::Value(noised),
                    Tol::OfSignal(1e-3),
                );
            }
        }
    }
}
