//! attribution_patching runs, end to end through `tl-run`, against TransformerLens's Attribution
//! Patching demo formula (AtP), AtP*'s query/key fix computed by brute force, and GradDrop
//! (tests/oracle/dump_attribution.py), on GPT-2-shaped fixtures and a grouped-query Llama; and
//! verify_top's real patching values against patching.py.
mod common;

use common::*;

const FIXTURES: [&str; 3] = ["gpt2-tiny", "gpt2-odd", "llama-tiny"];

/// (run suffix, hooks, over, oracle keys in hook order)
fn groups(fixture: &str) -> Vec<(&'static str, &'static str, &'static str, Vec<&'static str>)> {
    let mut g = vec![
        (
            "pos",
            r#"["resid_pre", "resid_mid", "attn_out", "mlp_out"]"#,
            r#"["layer", "pos"]"#,
            vec!["resid_pre", "resid_mid", "attn_out", "mlp_out"],
        ),
        (
            "by_pos",
            r#"["z", "q", "k", "v"]"#,
            r#"["layer", "pos", "head"]"#,
            vec!["z_by_pos", "q_by_pos", "k_by_pos", "v_by_pos"],
        ),
        (
            "all_pos",
            r#"["z", "q", "k", "v", "pattern"]"#,
            r#"["layer", "head"]"#,
            vec!["z_all_pos", "q_all_pos", "k_all_pos", "v_all_pos", "pattern_all_pos"],
        ),
        ("dest", r#"["pattern"]"#, r#"["layer", "head", "dest"]"#, vec!["pattern_by_dest"]),
    ];
    if fixture == "gpt2-tiny" {
        g.push(("dest_src", r#"["pattern"]"#, r#"["layer", "head", "dest", "src"]"#, vec!["pattern_dest_src"]));
    }
    g
}

fn spec(fixture: &str, o: &Oracle) -> String {
    let mut s = format!(
        "name = \"atp\"\n[model]\nid = \"{}\"\n{}[corruption]\nkind = \"swap_pairs\"\n[metric]\nkind = \"logit_diff\"\n",
        common::fixture(fixture).display(),
        prompts_toml(o)
    );
    for (name, hooks, over, _) in groups(fixture) {
        for (variant, opts) in [("atp", ""), ("gd", "grad_drop = true\n")] {
            s.push_str(&format!("\n[[run]]\nname = \"{variant}_{name}\"\nkind = \"attribution_patching\"\nhooks = {hooks}\nover = {over}\n{opts}"));
        }
    }
    s.push_str("\n[[run]]\nname = \"qk_by_pos\"\nkind = \"attribution_patching\"\nhooks = [\"q\", \"k\"]\nover = [\"layer\", \"pos\", \"head\"]\nqk_fix = true\n");
    s.push_str("\n[[run]]\nname = \"qk_all_pos\"\nkind = \"attribution_patching\"\nhooks = [\"q\", \"k\"]\nover = [\"layer\", \"head\"]\nqk_fix = true\n");
    s.push_str("\n[[run]]\nname = \"verify\"\nkind = \"attribution_patching\"\nhooks = [\"resid_pre\"]\nover = [\"layer\", \"pos\"]\nverify_top = 6\n");
    s
}

/// Mean-row values of one hook (by hook-name suffix), in table (cell) order.
fn of_hook(t: &Table, suffix: &str) -> Vec<f64> {
    t.mean_rows().into_iter().filter(|&i| t.str("hook", i).unwrap().ends_with(suffix)).map(|i| t.value(i)).collect()
}

fn suffix(key: &str) -> &'static str {
    match key.split('_').next().unwrap() {
        "resid" if key.starts_with("resid_pre") => "hook_resid_pre",
        "resid" => "hook_resid_mid",
        "attn" => "hook_attn_out",
        "mlp" => "hook_mlp_out",
        "z" => "attn.hook_z",
        "q" => "attn.hook_q",
        "k" => "attn.hook_k",
        "v" => "attn.hook_v",
        "pattern" => "attn.hook_pattern",
        other => panic!("unknown target {other}"),
    }
}

#[test]
fn attribution_matches_the_transformer_lens_demo_and_atp_star() {
    for fixture in FIXTURES {
        let o = Oracle::read(fixture, "attribution.safetensors");
        let dir = run_spec(&spec(fixture, &o), &[]);
        let out = dir.path().join("out");
        // The demo normalises its metric by (clean − corrupted); with a random model's small gap
        // that multiplies f32 rounding, so both sides are compared in raw logit-difference units.
        let gap = o.get("clean_baseline").double_value(&[0]) - o.get("corrupted_baseline").double_value(&[0]);
        // GradDrop's values are absolute values: they scale by |gap|.
        let raw = |key: &str| -> Vec<f64> {
            let g = if key.starts_with("gd/") { gap.abs() } else { gap };
            values(o.get(key)).into_iter().map(|v| v * g).collect()
        };
        for (name, _, _, keys) in groups(fixture) {
            for (variant, prefix) in [("atp", ""), ("gd", "gd/")] {
                let t = Table::read(&out.join(format!("{variant}_{name}.parquet")));
                for key in &keys {
                    // Attribution scores: a do-nothing estimate is 0.
                    assert_oracle(
                        &format!("{fixture} run {variant}_{name} {} (oracle {prefix}{key}, raw units)", suffix(key)),
                        &of_hook(&t, suffix(key)),
                        &raw(&format!("{prefix}{key}")),
                        Baseline::Zero,
                        Tol::Abs(1e-4),
                    );
                }
            }
        }
        for (name, keys) in [("qk_by_pos", ["q_by_pos", "k_by_pos"]), ("qk_all_pos", ["q_all_pos", "k_all_pos"])] {
            let t = Table::read(&out.join(format!("{name}.parquet")));
            for key in keys {
                assert_oracle(
                    &format!("{fixture} run {name} (AtP* qk fix) {} (oracle qk/{key}, raw units)", suffix(key)),
                    &of_hook(&t, suffix(key)),
                    &raw(&format!("qk/{key}")),
                    Baseline::Zero,
                    Tol::Abs(1e-4),
                );
            }
        }
        // verify_top: the 6 largest |estimates| carry their real patching effect; the manifest
        // has the correlations of the two.
        let t = Table::read(&out.join("verify.parquet"));
        let verified = t.rows(|t, i| t.float("patched", i).is_some());
        assert_eq!(verified.len(), 6, "{fixture}: verify_top = 6");
        let mut est: Vec<f64> = of_hook(&t, "hook_resid_pre").iter().map(|v| v.abs()).collect();
        est.sort_by(|a, b| b.total_cmp(a));
        for &i in &verified {
            assert!(t.value(i).abs() >= est[5] - 1e-12, "{fixture}: a verified cell is not among the top 6");
        }
        let manifest: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
        let v = &manifest["runs"]["verify"]["targets"][0]["verify_top"];
        assert_eq!(v["cells"], 6);
        let (a, b): (Vec<f64>, Vec<f64>) =
            verified.iter().map(|&i| (t.value(i), t.float("patched", i).unwrap())).unzip();
        // Pearson's r computed here, not by the library.
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let (ma, mb) = (mean(&a), mean(&b));
        let cov: f64 = a.iter().zip(&b).map(|(x, y)| (x - ma) * (y - mb)).sum();
        let (sa, sb) = (
            a.iter().map(|x| (x - ma).powi(2)).sum::<f64>().sqrt(),
            b.iter().map(|y| (y - mb).powi(2)).sum::<f64>().sqrt(),
        );
        assert!(
            (v["pearson"].as_f64().unwrap() - cov / (sa * sb)).abs() < 1e-9,
            "{fixture}: manifest pearson {} vs {}",
            v["pearson"],
            cov / (sa * sb)
        );
        assert!(v["spearman"].as_f64().is_some());
        // The real values against TransformerLens's patching.py on the same prompts
        // (get_act_patch_resid_pre with the normalised metric, in raw units here), every fixture.
        let real: Vec<f64> = raw("real/resid_pre");
        let cells: Vec<usize> = t.mean_rows();
        assert_eq!(real.len(), cells.len(), "{fixture}: resid_pre cells");
        let at: Vec<usize> = verified.iter().map(|&i| cells.iter().position(|&c| c == i).unwrap()).collect();
        let got: Vec<f64> = verified.iter().map(|&i| t.float("patched", i).unwrap()).collect();
        let expect: Vec<f64> = at.iter().map(|&cell| real[cell]).collect();
        // `patched` is the change of the metric from the corrupted run (raw units), so 0 is what
        // patching nothing gives.
        assert_oracle(
            &format!(
                "{fixture} run verify, patched column of resid_pre cells {at:?} (oracle real/resid_pre, raw units)"
            ),
            &got,
            &expect,
            Baseline::Zero,
            Tol::Abs(1e-4),
        );
    }
}
