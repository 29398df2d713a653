//! edge_attribution runs, end to end through `tl-run`, against a reference built on
//! TransformerLens 4.3's hooks (tests/oracle/edge_attribution.py, run here on the same token ids:
//! hook_result senders, split q/k/v and hook_mlp_in receivers, written from the EAP-IG
//! definitions): every edge's score for EAP, EAP-IG and the clean/corrupted mean, on GPT-2, a
//! grouped-query Llama, a parallel-attention NeoX and Gemma 2. The edge lists must be equal too,
//! so a missing edge (NeoX has no head → own-layer MLP edge) or a wrong name fails.
mod common;

use std::collections::BTreeMap;
use std::process::Command;

use common::*;
use tl_run::model::config::Processing;

const STEPS: usize = 3;

/// Circuits chosen from the EAP scores, and what their non-circuit edges carry.
const CIRCUITS: [(&str, &str, &str); 3] = [
    ("circuits", "top_n = [3, 10, 30]\ngreedy = [5, 20]\n", "patching"),
    ("circuits_mean", "top_n = [10]\n", "mean"),
    ("circuits_zero", "greedy = [10]\n", "zero"),
];

/// Three IOI-style prompts of one token length with their (correct, incorrect) answers; each
/// prompt's corrupted run reads the next prompt (a rotation, not a swap of pairs: with swapped
/// pairs the corrupted run's gradients mirror the clean run's and clean_corrupted equals eap).
fn prompts(fixture: &str) -> Vec<(&'static str, [&'static str; 2])> {
    if uses_gpt2_tokenizer(fixture) {
        vec![
            ("When John and Mary went to the shops, John gave the bag to", [" Mary", " John"]),
            ("When Tom and James went to the park, James gave the ball to", [" Tom", " James"]),
            ("When John and Mary went to the shops, Mary gave the bag to", [" John", " Mary"]),
        ]
    } else {
        vec![
            ("Lily and Tim were at home. Tim gave a toy to", ["Lily", "Tim"]),
            ("Tim and Lily were at home. Lily gave a toy to", ["Tim", "Lily"]),
            ("Lily and Tim were at home. Lily gave a toy to", ["Tim", "Lily"]),
        ]
    }
}

/// The reference's scores per method (edge name → score) and its mean clean and corrupted metric.
fn reference(fixture: &str, prompts: &[(&str, [&str; 2])]) -> serde_json::Value {
    let model = load(fixture, Processing::TRANSFORMER_LENS);
    let tok = model.tokenizer().unwrap();
    let ids: Vec<Vec<i64>> = prompts.iter().map(|p| tok.encode(p.0, model.cfg.default_prepend_bos).unwrap()).collect();
    assert!(ids.iter().all(|x| x.len() == ids[0].len()), "{fixture}: prompts of one token length");
    let n = ids.len();
    let answer = |s: &str| tok.encode(s, false).unwrap()[0];
    let input = serde_json::json!({
        "clean": ids,
        "corrupted": (0..n).map(|i| ids[(i + 1) % n].clone()).collect::<Vec<_>>(),
        "correct": prompts.iter().map(|p| answer(p.1[0])).collect::<Vec<_>>(),
        "incorrect": prompts.iter().map(|p| answer(p.1[1])).collect::<Vec<_>>(),
        "steps": STEPS,
        "circuits": [
            {"top_n": [3, 10, 30], "greedy": [5, 20], "intervention": "patching"},
            {"top_n": [10], "intervention": "mean"},
            {"greedy": [10], "intervention": "zero"},
        ],
        "exact": true,
    });
    let tmp = tempfile::tempdir().unwrap();
    let (inp, res) = (tmp.path().join("in.json"), tmp.path().join("out.json"));
    std::fs::write(&inp, input.to_string()).unwrap();
    let py = repo_root().join(".venv/bin/python");
    assert!(py.exists(), "no .venv: run scripts/setup.sh");
    let run = Command::new(py)
        .arg(repo_root().join("tests/oracle/edge_attribution.py"))
        .arg(common::fixture(fixture))
        .arg(&inp)
        .arg(&res)
        .output()
        .unwrap();
    assert!(run.status.success(), "oracle failed: {}", String::from_utf8_lossy(&run.stderr));
    serde_json::from_str(&std::fs::read_to_string(&res).unwrap()).unwrap()
}

#[test]
fn edge_scores_equal_a_transformer_lens_reference() {
    for fixture in ["gpt2-tiny", "llama-tiny", "neox-tiny", "gemma2-tiny"] {
        let prompts = prompts(fixture);
        let n = prompts.len();
        let clean: Vec<String> = prompts.iter().map(|p| format!("{:?}", p.0)).collect();
        let corrupted: Vec<String> = (0..n).map(|i| clean[(i + 1) % n].clone()).collect();
        let answers: Vec<String> = prompts.iter().map(|p| format!("[{:?}, {:?}]", p.1[0], p.1[1])).collect();
        let mut spec = format!(
            "name = \"eap\"\n[model]\nid = \"{}\"\n[prompts]\nclean = [{}]\nanswers = [{}]\n[corruption]\nkind = \"prompts\"\nprompts = [{}]\n[metric]\nkind = \"logit_diff\"\n",
            common::fixture(fixture).display(),
            clean.join(", "),
            answers.join(", "),
            corrupted.join(", ")
        );
        for method in ["eap", "eap_ig", "clean_corrupted"] {
            let steps = if method == "eap_ig" { format!("steps = {STEPS}\n") } else { String::new() };
            spec.push_str(&format!(
                "\n[[run]]\nname = \"{method}\"\nkind = \"edge_attribution\"\nmethod = \"{method}\"\n{steps}"
            ));
        }
        for (name, sizes, intervention) in CIRCUITS {
            spec.push_str(&format!(
                "\n[[run]]\nname = \"{name}\"\nkind = \"edge_attribution\"\nmethod = \"eap\"\n{sizes}intervention = \"{intervention}\"\n"
            ));
        }
        spec.push_str("\n[[run]]\nname = \"exact\"\nkind = \"edge_attribution\"\nmethod = \"exact\"\n");
        spec.push_str("\n[[run]]\nname = \"verify\"\nkind = \"edge_attribution\"\nmethod = \"eap\"\nverify_top = 5\n");
        let dir = run_spec(&spec, &[]);
        let out = dir.path().join("out");
        let theirs = reference(fixture, &prompts);
        let gap = theirs["clean_metric"].as_f64().unwrap() - theirs["corrupted_metric"].as_f64().unwrap();
        eprintln!("{fixture}: clean - corrupted logit difference {gap:.4}");
        let scores = |method: &str| -> BTreeMap<String, f64> {
            theirs[method].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_f64().unwrap())).collect()
        };
        let eap = scores("eap");
        for method in ["eap", "eap_ig", "clean_corrupted"] {
            let t = Table::read(&out.join(format!("{method}.parquet")));
            let ours: BTreeMap<String, f64> = (0..t.len()).map(|i| (t.str("label", i).unwrap(), t.value(i))).collect();
            let reference = scores(method);
            assert_eq!(t.len(), reference.len(), "{fixture} {method}: edge count");
            assert!(
                ours.keys().eq(reference.keys()),
                "{fixture} {method}: edges differ: ours only {:?}, reference only {:?}",
                ours.keys().filter(|k| !reference.contains_key(*k)).take(5).collect::<Vec<_>>(),
                reference.keys().filter(|k| !ours.contains_key(*k)).take(5).collect::<Vec<_>>()
            );
            // Each kind of receiver on its own, so that one kind's edges (all <k>, all into an
            // MLP) computed as zero would fail even where another kind's scores are larger.
            for input in ["<q>", "<k>", "<v>", "->m", "->logits"] {
                let names: Vec<&String> = reference
                    .keys()
                    .filter(|k| if input.starts_with('<') { k.ends_with(input) } else { k.contains(input) })
                    .collect();
                let a: Vec<f64> = names.iter().map(|k| ours[*k]).collect();
                let b: Vec<f64> = names.iter().map(|k| reference[*k]).collect();
                // EAP against 0 (what an edge that does nothing gets); the other methods against
                // EAP's scores, so that a method that fell back to EAP's gradient would fail.
                let eap_scores: Vec<f64> = names.iter().map(|k| eap[*k]).collect();
                let baseline = if method == "eap" { Baseline::Zero } else { Baseline::Values(&eap_scores) };
                assert_oracle(
                    &format!("{fixture} {method}: {} edge scores into {input}", names.len()),
                    &a,
                    &b,
                    baseline,
                    Tol::Abs(5e-6),
                );
            }
        }
        check_circuits(fixture, &out, &theirs);
        check_exact(fixture, &out, &scores("exact"), &eap);
    }
}

/// method = "exact" (each edge patched alone) equals the reference's patching of each edge, and
/// verify_top's `patched` column carries it for the 5 edges of largest |EAP score|.
fn check_exact(fixture: &str, out: &std::path::Path, exact: &BTreeMap<String, f64>, eap: &BTreeMap<String, f64>) {
    let t = Table::read(&out.join("exact.parquet"));
    let names: Vec<String> = (0..t.len()).map(|i| t.str("label", i).unwrap()).collect();
    let ours: Vec<f64> = (0..t.len()).map(|i| t.value(i)).collect();
    let theirs: Vec<f64> = names.iter().map(|n| exact[n]).collect();
    // 0: an edge whose patching changes nothing.
    assert_oracle(
        &format!("{fixture} exact: {} edges patched alone", names.len()),
        &ours,
        &theirs,
        Baseline::Zero,
        Tol::Abs(1e-5),
    );
    let t = Table::read(&out.join("verify.parquet"));
    let verified: Vec<usize> = t.rows(|t, i| t.float("patched", i).is_some());
    let mut by_size: Vec<(&String, f64)> = eap.iter().map(|(k, v)| (k, v.abs())).collect();
    by_size.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut top: Vec<&String> = by_size.iter().take(5).map(|(k, _)| *k).collect();
    top.sort();
    let mut got: Vec<String> = verified.iter().map(|&i| t.str("label", i).unwrap()).collect();
    got.sort();
    assert_eq!(got.iter().collect::<Vec<_>>(), top, "{fixture} verify_top = 5: the 5 largest |EAP scores|");
    let ours: Vec<f64> =
        got.iter().map(|n| t.float("patched", verified[got_index(&t, &verified, n)]).unwrap()).collect();
    let theirs: Vec<f64> = got.iter().map(|n| exact[n]).collect();
    assert_oracle(&format!("{fixture} verify_top: patched edges"), &ours, &theirs, Baseline::Zero, Tol::Abs(1e-5));
}

/// Where edge `name` is among the verified rows.
fn got_index(t: &Table, verified: &[usize], name: &str) -> usize {
    verified.iter().position(|&i| t.str("label", i).as_deref() == Some(name)).unwrap()
}

/// The circuits' edges (and node counts) equal the reference's selections from its own scores,
/// and their metric equals its evaluation; with patching, the empty circuit is the corrupted run
/// and the whole graph the clean run.
fn check_circuits(fixture: &str, out: &std::path::Path, theirs: &serde_json::Value) {
    for (k, (name, _, intervention)) in CIRCUITS.iter().enumerate() {
        let t = read_json_table(&out.join(format!("{name}-circuits.parquet")));
        let reference = theirs["circuits"][k].as_array().unwrap();
        assert_eq!(t.len(), reference.len(), "{fixture} {name}: circuits");
        let (mut ours, mut theirs_m) = (Vec::new(), Vec::new());
        for (row, r) in t.iter().zip(reference) {
            let what = format!("{fixture} {name}: {} {}", r["selection"], r["requested"]);
            assert_eq!(row["selection"], r["selection"], "{what}");
            let edges: Vec<&str> = r["edges"].as_array().unwrap().iter().map(|e| e.as_str().unwrap()).collect();
            assert_eq!(row["edges"].as_u64().unwrap() as usize, edges.len(), "{what}: edge count");
            if r["selection"] != "graph" {
                let names = row["edge_names"].as_str().unwrap();
                let got: Vec<&str> = if names.is_empty() { Vec::new() } else { names.split(' ').collect() };
                assert_eq!(got, edges, "{what}: edges");
            }
            assert_eq!(row["nodes"], r["nodes"], "{what}: nodes");
            ours.push(row["metric"].as_f64().unwrap());
            theirs_m.push(r["metric"].as_f64().unwrap());
        }
        // The metric with everything ablated (the empty circuit, second to last) is what a
        // faithfulness pass that ablated nothing differently would report for every circuit.
        let empty = theirs_m[theirs_m.len() - 2];
        let none = vec![empty; theirs_m.len()];
        assert_oracle(
            &format!("{fixture} {name}: metric of each circuit ({intervention})"),
            &ours,
            &theirs_m,
            Baseline::Values(&none),
            Tol::Abs(1e-5),
        );
        if *intervention == "patching" {
            let clean = theirs["clean_metric"].as_f64().unwrap();
            let corrupted = theirs["corrupted_metric"].as_f64().unwrap();
            assert!((ours[ours.len() - 1] - clean).abs() < 1e-5, "{fixture}: the whole graph is the clean run");
            assert!(
                (ours[ours.len() - 2] - corrupted).abs() < 1e-5,
                "{fixture}: the empty circuit is the corrupted run"
            );
            // Faithfulness as written: (m - m(empty)) / (m(graph) - m(empty)).
            for (i, row) in t.iter().enumerate() {
                let f = (ours[i] - ours[ours.len() - 2]) / (ours[ours.len() - 1] - ours[ours.len() - 2]);
                assert!((row["faithfulness"].as_f64().unwrap() - f).abs() < 1e-9, "{fixture} {name}: faithfulness");
            }
        }
    }
}

/// A side table's rows as JSON objects (column name → value).
fn read_json_table(path: &std::path::Path) -> Vec<serde_json::Map<String, serde_json::Value>> {
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{DataType, Float64Type, Int64Type};
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).unwrap().build().unwrap();
    let mut rows = Vec::new();
    for batch in reader {
        let b = batch.unwrap();
        for i in 0..b.num_rows() {
            let mut row = serde_json::Map::new();
            for (f, c) in b.schema().fields().iter().zip(b.columns()) {
                let v = if c.is_null(i) {
                    serde_json::Value::Null
                } else {
                    match f.data_type() {
                        DataType::Int64 => c.as_primitive::<Int64Type>().value(i).into(),
                        DataType::Float64 => c.as_primitive::<Float64Type>().value(i).into(),
                        DataType::Utf8 => c.as_string::<i32>().value(i).into(),
                        DataType::Boolean => c.as_boolean().value(i).into(),
                        other => panic!("column {} of type {other}", f.name()),
                    }
                };
                row.insert(f.name().clone(), v);
            }
            rows.push(row);
        }
    }
    rows
}
