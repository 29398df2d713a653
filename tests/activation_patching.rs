//! Every activation-patching target against TransformerLens's patching.py on two GPT-2 fixtures
//! (tests/oracle/dump_patching.py): raw values within 1e-4 (against the corrupted baseline),
//! normalised values within 1e-3 of their largest (against 0), and the block_every /
//! all_pos_every / by_pos_every stacks.
mod common;

use common::*;
use tch::{Kind, Tensor};
use tl_run::analysis::clean_corrupted::{CleanCorrupted, Corrupt};
use tl_run::analysis::patching::{sweep, sweep_scheduled, Axes, Schedule, Target};
use tl_run::engine::metric::{Metric, MetricKind};
use tl_run::model::config::Processing;
use tl_run::{Model, Site};

fn logit_diff(oracle: &Oracle) -> Metric {
    let answers: Vec<i64> = Vec::try_from(oracle.get("answers").flatten(0, -1)).unwrap();
    Metric::single(
        MetricKind::LogitDiff,
        answers.iter().step_by(2).copied().collect(),
        answers.iter().skip(1).step_by(2).copied().collect(),
    )
}

fn corrupt(oracle: &Oracle) -> Corrupt {
    Corrupt::Tokens(oracle.get("corrupted_tokens").shallow_clone())
}

fn prepare(model: &Model, oracle: &Oracle, sites: &[Site]) -> CleanCorrupted {
    CleanCorrupted::new(
        model,
        oracle.get("clean_tokens").shallow_clone(),
        corrupt(oracle),
        None,
        logit_diff(oracle),
        sites,
    )
    .unwrap()
}

/// Our sweep as a tensor in TransformerLens's axis order, every layer's cells in one call under
/// `schedule` (by layer on a CPU, a staircase on a GPU).
fn ours(model: &Model, prep: &CleanCorrupted, site: Site, axes: Axes, schedule: Schedule) -> Tensor {
    let target = Target::new(site, axes).unwrap();
    let cells: Vec<_> = (0..model.cfg.n_layers)
        .flat_map(|l| tl_run::analysis::patching::cells_at(&model.cfg, target, l, prep.seq_len()))
        .collect();
    let s = sweep_scheduled(model, prep, &[(target, cells)], schedule, |_| {}).unwrap().pop().unwrap();
    let means: Vec<f64> = (0..s.cells.len()).map(|i| s.mean(i)).collect();
    let (l, p) = (model.cfg.n_layers as i64, prep.seq_len());
    let h = if matches!(site, Site::K | Site::V) { model.cfg.n_kv_heads } else { model.cfg.n_heads } as i64;
    let shape: Vec<i64> = match axes {
        Axes::LayerPos => vec![l, p],
        Axes::LayerPosHead => vec![l, p, h],
        Axes::LayerHead => vec![l, h],
        Axes::LayerHeadDest => vec![l, h, p],
        Axes::LayerHeadDestSrc => vec![l, h, p, p],
        Axes::LayerRole | Axes::LayerRoleHead => unreachable!("roles are checked in roles_vs_transformer_lens.rs"),
    };
    Tensor::from_slice(&means).view(shape.as_slice()).to_kind(Kind::Float)
}

fn target_of(key: &str) -> Option<(Site, Axes)> {
    Some(match key {
        "resid_pre" => (Site::ResidPre, Axes::LayerPos),
        "resid_mid" => (Site::ResidMid, Axes::LayerPos),
        "resid_post" => (Site::ResidPost, Axes::LayerPos),
        "attn_out" => (Site::AttnOut, Axes::LayerPos),
        "mlp_out" => (Site::MlpOut, Axes::LayerPos),
        "z_by_pos" => (Site::Z, Axes::LayerPosHead),
        "q_by_pos" => (Site::Q, Axes::LayerPosHead),
        "k_by_pos" => (Site::K, Axes::LayerPosHead),
        "v_by_pos" => (Site::V, Axes::LayerPosHead),
        "pattern_by_pos" => (Site::Pattern, Axes::LayerHeadDest),
        "pattern_dest_src" => (Site::Pattern, Axes::LayerHeadDestSrc),
        "z_all_pos" => (Site::Z, Axes::LayerHead),
        "q_all_pos" => (Site::Q, Axes::LayerHead),
        "k_all_pos" => (Site::K, Axes::LayerHead),
        "v_all_pos" => (Site::V, Axes::LayerHead),
        "pattern_all_pos" => (Site::Pattern, Axes::LayerHead),
        _ => return None,
    })
}

/// TransformerLens's grouped sweeps, rebuilt from ours.
fn stacked(model: &Model, prep: &CleanCorrupted, key: &str, schedule: Schedule) -> Option<Tensor> {
    let heads = [Site::Z, Site::Q, Site::K, Site::V];
    Some(match key {
        "block_every" => Tensor::stack(
            &[Site::ResidPre, Site::AttnOut, Site::MlpOut].map(|s| ours(model, prep, s, Axes::LayerPos, schedule)),
            0,
        ),
        "all_pos_every" => {
            let mut parts: Vec<Tensor> =
                heads.iter().map(|s| ours(model, prep, *s, Axes::LayerHead, schedule)).collect();
            parts.push(ours(model, prep, Site::Pattern, Axes::LayerHead, schedule));
            Tensor::stack(&parts, 0)
        }
        "by_pos_every" => {
            let mut parts: Vec<Tensor> =
                heads.iter().map(|s| ours(model, prep, *s, Axes::LayerPosHead, schedule)).collect();
            // pattern by destination is [layer, head, dest]; TL rearranges it to [layer, pos, head].
            parts.push(ours(model, prep, Site::Pattern, Axes::LayerHeadDest, schedule).permute([0, 2, 1]));
            Tensor::stack(&parts, 0)
        }
        _ => return None,
    })
}

fn check_fixture(name: &str, min_targets: usize) {
    let model = load(name, Processing::TRANSFORMER_LENS);
    let oracle = Oracle::read(name, "patching.safetensors");
    let sites = [
        Site::ResidPre,
        Site::ResidMid,
        Site::ResidPost,
        Site::AttnOut,
        Site::MlpOut,
        Site::Z,
        Site::Q,
        Site::K,
        Site::V,
        Site::Pattern,
    ];
    let prep = prepare(&model, &oracle, &sites);
    let clean_b = oracle.get("clean_baseline").double_value(&[0]);
    let corr_b = oracle.get("corrupted_baseline").double_value(&[0]);
    assert_oracle(
        &format!("{name} clean baseline (oracle clean_baseline)"),
        &[prep.clean_baseline()],
        &[clean_b],
        Baseline::Zero,
        Tol::Abs(1e-4),
    );
    assert_oracle(
        &format!("{name} corrupted baseline (oracle corrupted_baseline)"),
        &[prep.corrupted_baseline()],
        &[corr_b],
        Baseline::Zero,
        Tol::Abs(1e-4),
    );
    let mut failures = Vec::new();
    let mut checked = 0;
    for ((key, theirs), schedule) in oracle.tensors.iter().flat_map(|kv| Schedule::ALL.map(|s| (kv, s))) {
        let ours = match target_of(key) {
            Some((site, axes)) => ours(&model, &prep, site, axes, schedule),
            None => match stacked(&model, &prep, key, schedule) {
                Some(t) => t,
                None => continue,
            },
        };
        let key = format!("{key} ({schedule:?})");
        checked += 1;
        if ours.size() != theirs.size() {
            failures.push(format!("{key}: shape {:?} vs TL {:?}", ours.size(), theirs.size()));
            continue;
        }
        let (ours, theirs) = (values(&ours), values(theirs));
        let norm = |v: &[f64]| -> Vec<f64> { v.iter().map(|x| (x - corr_b) / (clean_b - corr_b)).collect() };
        // Every target is checked, each failure collected (assert_oracle has printed it).
        let checked_target = common::compare::outcome(&key, || {
            // Raw logit differences: patching nothing leaves the corrupted run's.
            assert_oracle(&format!("{name} {key} raw"), &ours, &theirs, Baseline::Value(corr_b), Tol::Abs(1e-4));
            // Normalised: 0 is the corrupted run, 1 the clean one.
            assert_oracle(
                &format!("{name} {key} normalised"),
                &norm(&ours),
                &norm(&theirs),
                Baseline::Zero,
                Tol::OfSignal(1e-3),
            );
        });
        failures.extend(checked_target.err());
    }
    assert!(checked >= min_targets, "only {checked} targets in the oracle file");
    assert!(failures.is_empty(), "{name}:\n  {}", failures.join("\n  "));
}

#[test]
fn gpt2_tiny_every_target_equals_patching_py() {
    check_fixture("gpt2-tiny", 2 * 19);
}

#[test]
fn gpt2_odd_every_target_equals_patching_py() {
    check_fixture("gpt2-odd", 2 * 18);
}

/// Grouped-query attention: k and v are patched over the 2 key-value heads (TL issue #980).
#[test]
fn llama_gqa_every_target_equals_patching_py() {
    check_fixture("llama-tiny", 2 * 15);
}

/// The prob and logprob metrics through patching sweeps (z over [layer, head] with prob,
/// resid_pre over [layer, pos] with logprob), on a GPT-2 fixture and the GQA Llama: baselines and
/// sweeps against patching.py with the same metric.
#[test]
fn prob_and_logprob_metrics_equal_patching_py() {
    for name in ["gpt2-tiny", "llama-tiny"] {
        let model = load(name, Processing::TRANSFORMER_LENS);
        let oracle = Oracle::read(name, "patching.safetensors");
        // An answer's probability is ~1/vocabulary, so an absolute bound could not fail: the
        // probabilities agree to 1e-4 of themselves, the sweep to 1e-3 of its effect. Log-probs
        // are O(10): 1e-4 absolute, as for logit differences.
        let cases = [
            (
                MetricKind::Prob,
                "prob",
                "z_all_pos_prob",
                Site::Z,
                Axes::LayerHead,
                Tol::OfSignal(1e-4),
                Tol::OfSignal(1e-3),
            ),
            (
                MetricKind::Logprob,
                "logprob",
                "resid_pre_logprob",
                Site::ResidPre,
                Axes::LayerPos,
                Tol::Abs(1e-4),
                Tol::Abs(1e-4),
            ),
        ];
        for (kind, label, key, site, axes, baseline_tol, sweep_tol) in cases {
            let mut metric = logit_diff(&oracle);
            metric.kind = kind;
            let prep = CleanCorrupted::new(
                &model,
                oracle.get("clean_tokens").shallow_clone(),
                corrupt(&oracle),
                None,
                metric,
                &[site],
            )
            .unwrap();
            let clean = oracle.get(&format!("clean_{label}")).double_value(&[0]);
            let corrupted = oracle.get(&format!("corrupted_{label}")).double_value(&[0]);
            assert_oracle(
                &format!("{name} {label} metric clean baseline (oracle clean_{label})"),
                &[prep.clean_baseline()],
                &[clean],
                Baseline::Zero,
                baseline_tol,
            );
            assert_oracle(
                &format!("{name} {label} metric corrupted baseline (oracle corrupted_{label})"),
                &[prep.corrupted_baseline()],
                &[corrupted],
                Baseline::Zero,
                baseline_tol,
            );
            let theirs = oracle.get(key);
            for schedule in Schedule::ALL {
                let ours = ours(&model, &prep, site, axes, schedule);
                // Patching nothing leaves the corrupted run's value.
                assert_oracle_tensor(
                    &format!("{name} {key} ({schedule:?}) (oracle {key})"),
                    &ours,
                    theirs,
                    Baseline::Value(corrupted),
                    sweep_tol,
                );
            }
        }
    }
}

/// The cells filled without compute are the positions before the first clean/corrupted
/// difference; their values equal the corrupted baseline.
#[test]
fn unchangeable_cells_are_skipped() {
    let model = load("gpt2-tiny", Processing::TRANSFORMER_LENS);
    let oracle = Oracle::read("gpt2-tiny", "patching.safetensors");
    let prep = prepare(&model, &oracle, &[Site::ResidPre]);
    // "When John and Mary went to the shops, John gave" vs "..., Mary gave": the pairs first
    // differ at the second mention of a name, position 10 (BOS counted).
    assert_eq!(prep.first_diff, 10);
    let s = sweep(&model, &prep, Target::new(Site::ResidPre, Axes::LayerPos).unwrap(), |_| {}).unwrap();
    let skipped: Vec<_> = s.cells.iter().zip(&s.skipped).filter(|(_, k)| **k).map(|(c, _)| c.pos.unwrap()).collect();
    let expected: Vec<i64> = (0..2).flat_map(|_| 0..10).collect();
    assert_eq!(skipped, expected);
    for (i, k) in s.skipped.iter().enumerate() {
        if *k {
            assert_eq!(s.per_prompt[i], prep.corrupted_per_prompt);
        }
    }
    assert!(Target::new(Site::ResidPre, Axes::LayerHead).is_err());
}

/// With an attribution pass to follow, the corrupted run keeps its graph and the pass is its
/// backward: the same activations and gradients as a pass with its own forward, and the
/// baselines and corrupted caches of the clean and corrupted runs unchanged.
#[test]
fn the_attribution_pass_is_the_backward_of_the_kept_corrupted_run() {
    use tl_run::analysis::attribution::Pass;
    use tl_run::HookPoint;
    let model = load("llama-tiny", Processing::TRANSFORMER_LENS);
    let oracle = Oracle::read("llama-tiny", "patching.safetensors");
    let sites = [Site::ResidPre, Site::Z, Site::Pattern];
    let points: Vec<HookPoint> = (0..model.cfg.n_layers)
        .flat_map(|l| [Site::ResidPre, Site::AttnOut, Site::Z, Site::Pattern].map(|s| HookPoint::Block(l, s)))
        .collect();
    let plain = prepare(&model, &oracle, &sites);
    let kept = CleanCorrupted::keeping_gradients(
        &model,
        oracle.get("clean_tokens").shallow_clone(),
        corrupt(&oracle),
        None,
        logit_diff(&oracle),
        &sites,
        &points,
    )
    .unwrap();
    assert_eq!(kept.corrupted_per_prompt, plain.corrupted_per_prompt);
    assert_eq!(kept.clean_per_prompt, plain.clean_per_prompt);
    for (a, b) in kept.corrupted_resid_pre.iter().zip(&plain.corrupted_resid_pre) {
        assert!(!a.requires_grad(), "what the sweeps read carries no graph");
        assert_eq!(a, b);
    }
    // A pass at a point the corrupted run did not capture runs its own forward.
    let elsewhere = [HookPoint::Block(0, Site::MlpOut)];
    assert!(kept.take_pending_backward(&elsewhere).is_none());
    let from_kept = Pass::new(&model, &kept, &points).unwrap();
    assert!(kept.take_pending_backward(&points).is_none(), "the kept run is taken by the first pass");
    let own_forward = Pass::new(&model, &plain, &points).unwrap();
    for p in &points {
        for (what, a, b) in [
            ("activation", &from_kept.acts[p], &own_forward.acts[p]),
            ("gradient", &from_kept.grads[p], &own_forward.grads[p]),
        ] {
            let diff = (a - b).abs().max().double_value(&[]);
            assert!(diff <= 1e-6, "{p} {what}: {diff}");
            assert!(b.abs().max().double_value(&[]) > 0.0 || what == "gradient", "{p}: an all-zero {what}");
        }
    }
    assert!(
        points.iter().all(|p| own_forward.grads[p].abs().max().double_value(&[]) > 0.0),
        "a point without gradient"
    );
}

/// Windows (`window = k`, ROME): every cell restores the clean activation in k consecutive layers
/// centred on its own, against a TransformerLens loop restoring the same layers
/// (tests/oracle/dump_windows.py) on GPT-2 (3 layers) and the real stories260K Llama (5 layers),
/// windows of 2 and 3 at attn_out and mlp_out. A window of 1 would give each layer's own patch;
/// the two differ, so a window that patched one layer fails.
#[test]
fn windows_equal_a_transformer_lens_loop() {
    for name in ["gpt2-odd", "stories260K"] {
        let model = load(name, Processing::TRANSFORMER_LENS);
        let oracle = Oracle::read(name, "windows.safetensors");
        let sites = [Site::AttnOut, Site::MlpOut];
        let prep = prepare(&model, &oracle, &sites);
        let corr_b = oracle.get("corrupted_baseline").double_value(&[0]);
        assert_oracle(
            &format!("{name} corrupted baseline (oracle corrupted_baseline)"),
            &[prep.corrupted_baseline()],
            &[corr_b],
            Baseline::Zero,
            Tol::Abs(1e-4),
        );
        for (site, label) in [(Site::AttnOut, "attn_out"), (Site::MlpOut, "mlp_out")] {
            for k in [2usize, 3] {
                let target = Target::new(site, Axes::LayerPos).unwrap().with_window(k);
                let cells: Vec<_> = (0..model.cfg.n_layers)
                    .flat_map(|l| tl_run::analysis::patching::cells_at(&model.cfg, target, l, prep.seq_len()))
                    .collect();
                for schedule in Schedule::ALL {
                    let s = sweep_scheduled(&model, &prep, &[(target, cells.clone())], schedule, |_| {})
                        .unwrap()
                        .pop()
                        .unwrap();
                    let means: Vec<f64> = (0..s.cells.len()).map(|i| s.mean(i)).collect();
                    let key = format!("{label}_window{k}");
                    // The window differs from patching the layer alone (window 1, also
                    // TransformerLens's): a window that restored one layer would fail.
                    let one = oracle.get(&format!("{label}_window1"));
                    let apart = (oracle.get(&key) - one).abs().max().double_value(&[]);
                    assert!(apart >= 20.0 * 1e-4, "{name} {key}: the window is {apart} from one layer's patch");
                    // Patching nothing leaves the corrupted run's value.
                    assert_oracle(
                        &format!("{name} {key} ({schedule:?}) (oracle {key})"),
                        &means,
                        &values(oracle.get(&key)),
                        Baseline::Value(corr_b),
                        Tol::Abs(1e-4),
                    );
                }
            }
        }
    }
}

/// Multi-site patching (`units = [...]`): heads of several layers, and positions at several
/// layers, restored together in one forward, against TransformerLens restoring the same cells in
/// one run_with_hooks (tests/oracle/dump_windows.py) on GPT-2 and stories260K.
#[test]
fn units_patched_together_equal_transformer_lens() {
    use tl_run::analysis::patching::{patch_jointly, Cell};
    type Units = &'static [(usize, i64)];
    let units: [(&str, Site, Axes, Units, Units); 2] = [
        ("z_units", Site::Z, Axes::LayerHead, &[(0, 1), (1, 2), (2, 0)], &[(0, 1), (2, 3), (4, 0)]),
        ("resid_pre_units", Site::ResidPre, Axes::LayerPos, &[(1, 10), (2, 12)], &[(1, 5), (3, 8)]),
    ];
    for (f, name) in ["gpt2-odd", "stories260K"].into_iter().enumerate() {
        let model = load(name, Processing::TRANSFORMER_LENS);
        let oracle = Oracle::read(name, "windows.safetensors");
        let prep = prepare(&model, &oracle, &[Site::Z, Site::ResidPre]);
        let corr_b = oracle.get("corrupted_baseline").double_value(&[0]);
        for (key, site, axes, gpt2, stories) in units {
            let cells: Vec<Cell> = [gpt2, stories][f].iter().map(|&(layer, i)| Cell::unit(layer, axes, i)).collect();
            // Patching any one unit alone gives another value (by 20× the tolerance): an
            // implementation that dropped units would fail.
            let joint = oracle.get(key).double_value(&[0]);
            for j in 0..cells.len() {
                let alone = oracle.get(&format!("{key}_{j}")).double_value(&[0]);
                assert!(
                    (joint - alone).abs() >= 20.0 * 1e-4,
                    "{name} {key}: unit {j} alone gives {alone}, together {joint}"
                );
            }
            let per_prompt = patch_jointly(&model, &prep, Target::new(site, axes).unwrap(), &cells).unwrap();
            let mean = per_prompt.iter().sum::<f64>() / per_prompt.len() as f64;
            // Patching nothing leaves the corrupted run's value.
            assert_oracle(
                &format!("{name} {key} (oracle {key})"),
                &[mean],
                &values(oracle.get(key)),
                Baseline::Value(corr_b),
                Tol::Abs(1e-4),
            );
        }
    }
}

/// `units = [...]` in a spec: one row per run (and per prompt), named by its units in the
/// `unit` column, with the value the analysis gives (checked against TransformerLens above).
#[test]
fn a_units_run_writes_one_row_named_by_its_units() {
    let spec = format!(
        "name = \"u\"\n[model]\nid = \"{}\"\n[prompts]\nfile = \"{}\"\n[corruption]\nkind = \"swap_pairs\"\n[metric]\nkind = \"logit_diff\"\n[[run]]\nname = \"together\"\nkind = \"activation_patching\"\nhooks = [\"z\"]\nover = [\"layer\", \"head\"]\nunits = [[0, 1], [1, 2]]\nper_prompt = true\n",
        fixture("gpt2-tiny").display(),
        prompt_file("gpt2-tiny").display()
    );
    let dir = run_spec(&spec, &[]);
    let t = Table::read(&dir.path().join("out/together.parquet"));
    let mean = t.mean_rows();
    assert_eq!(mean.len(), 1, "one row for the units together");
    assert_eq!(t.str("unit", mean[0]).as_deref(), Some("L0H1+L1H2"));
    assert_eq!(t.str("label", mean[0]).as_deref(), Some("patched L0H1+L1H2"));
    assert_eq!(t.len(), 1 + 8, "and one row per prompt");
    // The value is the joint patch of the analysis (checked against TransformerLens above) on
    // the same prompts, the mean of its per-prompt rows.
    let oracle = Oracle::read("gpt2-tiny", "patching.safetensors");
    let model = load("gpt2-tiny", Processing::TRANSFORMER_LENS);
    let prep = prepare(&model, &oracle, &[Site::Z]);
    let cells: Vec<tl_run::analysis::patching::Cell> = [(0usize, 1i64), (1, 2)]
        .iter()
        .map(|&(layer, h)| tl_run::analysis::patching::Cell::unit(layer, Axes::LayerHead, h))
        .collect();
    let direct = tl_run::analysis::patching::patch_jointly(
        &model,
        &prep,
        Target::new(Site::Z, Axes::LayerHead).unwrap(),
        &cells,
    )
    .unwrap();
    let direct_mean = direct.iter().sum::<f64>() / direct.len() as f64;
    assert!((t.value(mean[0]) - direct_mean).abs() < 1e-6, "{} vs {direct_mean}", t.value(mean[0]));
    assert!((direct_mean - prep.corrupted_baseline()).abs() > 1e-3, "the units change the metric");
    let prompts: f64 = t.rows(|t, i| t.int("prompt", i).is_some()).iter().map(|&i| t.value(i)).sum::<f64>() / 8.0;
    assert!((prompts - t.value(mean[0])).abs() < 1e-9);
    let e = common::fails(&["validate", &{
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, spec.replace("[[0, 1], [1, 2]]", "[[0, 1], [5, 2]]")).unwrap();
        bad.display().to_string()
    }]);
    assert!(e.contains("unit [5, 2] is out of range: the model has 2 layers (0-1) of 4 heads"), "{e}");
}
