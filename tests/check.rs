//! `tl-run check`: the gate passes on the shipped zoo-ci references and goldens, and fails, with a
//! non-zero exit and the offending row named, when a golden value moves past its tolerance, a
//! golden row is deleted or added, a weight of the model changes, or the dtype becomes bf16 under
//! f32 tolerances. The comparator metrics are recomputed in the test's own Python (torch, float64,
//! the hf-tl-logit-comparator demo's calls) from the same logits.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, Float64Array, Int32Array, RecordBatch};
use common::*;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;

const MODEL: &str = "gpt2-odd";

struct Outcome {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn check(zoo: &Path, args: &[&str], out: &Path) -> Outcome {
    let o = Command::new(env!("CARGO_BIN_EXE_tl-run"))
        .arg("check")
        .arg(zoo)
        .arg("--out")
        .arg(out)
        .args(args)
        .output()
        .expect("run tl-run");
    Outcome {
        ok: o.status.success(),
        stdout: String::from_utf8_lossy(&o.stdout).into(),
        stderr: String::from_utf8_lossy(&o.stderr).into(),
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        let meta = std::fs::metadata(&p).unwrap();
        if meta.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

/// A one-model zoo in a temp dir: gpt2-odd (or `model_dir`) with a copy of its zoo-ci reference
/// and goldens, and the IOI spec, under zoo-ci's f32 tolerances.
struct OneModelZoo {
    dir: tempfile::TempDir,
}

impl OneModelZoo {
    fn new(model_dir: &Path) -> OneModelZoo {
        let dir = tempfile::tempdir().unwrap();
        let root = repo_root();
        std::fs::copy(
            root.join("fixtures/references").join(format!("{MODEL}.safetensors")),
            dir.path().join("reference.safetensors"),
        )
        .expect("zoo-ci reference (run scripts/test.sh)");
        copy_dir(&root.join("configs/zoo-ci/goldens").join(MODEL), &dir.path().join("goldens"));
        let zoo = format!(
            r#"[defaults]
prompts = {prompts}
[defaults.tolerance]
atol = 1e-4
rtol = 1e-4
mse = 1e-9
cosine = 0.99999
kl = 1e-7
top1 = 1.0

[[model]]
name = "{MODEL}"
path = "{path}"
reference = "reference.safetensors"
goldens = "goldens"
[[model.spec]]
file = "{spec}"
"#,
            prompts = zoo_ci_prompts(),
            path = model_dir.display(),
            spec = root.join("experiments/ioi.toml").display()
        );
        std::fs::write(dir.path().join("zoo.toml"), zoo).unwrap();
        OneModelZoo { dir }
    }
    fn zoo(&self) -> PathBuf {
        self.dir.path().join("zoo.toml")
    }
    fn golden(&self, run: &str) -> PathBuf {
        self.dir.path().join("goldens/float32/ioi").join(format!("{run}.parquet"))
    }
    fn check(&self, args: &[&str]) -> Outcome {
        check(&self.zoo(), args, &self.dir.path().join("out"))
    }
}

/// zoo-ci's default prompts, as a TOML array.
fn zoo_ci_prompts() -> String {
    let zoo: toml::Table =
        toml::from_str(&std::fs::read_to_string(repo_root().join("configs/zoo-ci.toml")).unwrap()).unwrap();
    zoo["defaults"]["prompts"].to_string()
}

fn read_batch(path: &Path) -> RecordBatch {
    let r = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(path).unwrap()).unwrap().build().unwrap();
    let batches: Vec<RecordBatch> = r.map(|b| b.unwrap()).collect();
    arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap()
}

fn write_batch(path: &Path, b: &RecordBatch) {
    let mut w = ArrowWriter::try_new(std::fs::File::create(path).unwrap(), b.schema(), None).unwrap();
    w.write(b).unwrap();
    w.close().unwrap();
}

fn with_column(b: &RecordBatch, name: &str, col: ArrayRef) -> RecordBatch {
    let i = b.schema().index_of(name).unwrap();
    let mut cols = b.columns().to_vec();
    cols[i] = col;
    RecordBatch::try_new(b.schema(), cols).unwrap()
}

#[test]
fn the_gate_passes_on_the_shipped_zoo_ci_references_and_goldens() {
    // The whole zoo runs in scripts/test.sh; here two models, one of them in two dtypes.
    let out = tempfile::tempdir().unwrap();
    let junit = out.path().join("junit.xml");
    let r = check(
        &repo_root().join("configs/zoo-ci.toml"),
        &["--only", MODEL, "--only", "stories260K", "--junit", junit.to_str().unwrap()],
        out.path(),
    );
    assert!(r.ok, "gate failed:\n{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("stories260K  bfloat16") && r.stdout.contains("golden:induction"), "{}", r.stdout);
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(xml.contains("failures=\"0\"") && xml.contains("<testsuite name=\"stories260K/bfloat16\""), "{xml}");
    let t = read_batch(&out.path().join("check.parquet"));
    let pass = t.column_by_name("pass").unwrap().as_any().downcast_ref::<arrow::array::BooleanArray>().unwrap();
    assert!(t.num_rows() > 30 && pass.iter().all(|p| p == Some(true)), "{} rows", t.num_rows());
}

#[test]
fn a_golden_value_moved_past_its_tolerance_fails_with_its_row_named() {
    let z = OneModelZoo::new(&fixture(MODEL));
    let path = z.golden("resid");
    let b = read_batch(&path);
    let v = b.column_by_name("value").unwrap().as_any().downcast_ref::<Float64Array>().unwrap();
    // Row 7 moves by 1e-3, ten times the tolerance; the others stay.
    let moved: Float64Array = v.iter().enumerate().map(|(i, x)| x.map(|x| if i == 7 { x + 1e-3 } else { x })).collect();
    write_batch(&path, &with_column(&b, "value", Arc::new(moved)));
    let r = z.check(&[]);
    assert!(!r.ok, "{}", r.stdout);
    let layer = b.column_by_name("layer").unwrap().as_any().downcast_ref::<Int32Array>().unwrap().value(7);
    let pos = b.column_by_name("pos").unwrap().as_any().downcast_ref::<Int32Array>().unwrap().value(7);
    let failure = r
        .stdout
        .lines()
        .find(|l| l.starts_with(&format!("- {MODEL} float32 golden:ioi resid:")))
        .unwrap_or_else(|| panic!("{}", r.stdout));
    assert!(
        failure.contains("1 'value' value(s) outside tolerance")
            && failure.contains(&format!("layer={layer} pos={pos}")),
        "{failure}"
    );
    // Only that run fails.
    assert_eq!(r.stdout.lines().filter(|l| l.ends_with("FAIL")).count(), 1, "{}", r.stdout);

    // --update=goldens takes this run's values back, says by how much they moved, and the gate passes.
    let u = z.check(&["--update=goldens"]);
    assert!(u.ok, "{}\n{}", u.stdout, u.stderr);
    let moved = u
        .stdout
        .lines()
        .find(|l| l.contains("golden float32/ioi/resid.parquet rewritten"))
        .unwrap_or_else(|| panic!("{}", u.stdout));
    assert!(moved.contains("0 rows added, 0 removed") && moved.contains("max |Δvalue| 1.000e-3"), "{moved}");
    let again = z.check(&[]);
    assert!(again.ok, "{}", again.stdout);
}

#[test]
fn a_deleted_and_an_added_golden_row_fail_with_their_keys() {
    let z = OneModelZoo::new(&fixture(MODEL));
    // heads: drop the first row. dla-layers: add a copy of row 0 at layer 99.
    let heads = read_batch(&z.golden("heads"));
    write_batch(&z.golden("heads"), &heads.slice(1, heads.num_rows() - 1));
    let dla = read_batch(&z.golden("dla-layers"));
    let extra = with_column(&dla.slice(0, 1), "layer", Arc::new(Int32Array::from(vec![99])));
    write_batch(
        &z.golden("dla-layers"),
        &arrow::compute::concat_batches(&dla.schema(), &[dla.clone(), extra]).unwrap(),
    );
    let r = z.check(&[]);
    assert!(!r.ok);
    let line = |run: &str| {
        r.stdout
            .lines()
            .find(|l| l.starts_with(&format!("- {MODEL} float32 golden:ioi {run}:")))
            .unwrap_or_else(|| panic!("no failure for {run}:\n{}", r.stdout))
            .to_string()
    };
    let layer0 = heads.column_by_name("layer").unwrap().as_any().downcast_ref::<Int32Array>().unwrap().value(0);
    let head0 = heads.column_by_name("head").unwrap().as_any().downcast_ref::<Int32Array>().unwrap().value(0);
    let h = line("heads");
    assert!(h.contains("1 extra row(s): [run=heads") && h.contains(&format!("layer={layer0} head={head0}")), "{h}");
    let d = line("dla-layers");
    assert!(d.contains("1 golden row(s) missing: [run=dla-layers") && d.contains("layer=99"), "{d}");
}

#[test]
fn one_perturbed_weight_fails_the_logits_and_the_goldens() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join(MODEL);
    copy_dir(&fixture(MODEL), &model);
    // One element of one weight matrix moves by 0.05.
    let file = model.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> =
        st.tensors().into_iter().map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec())).collect();
    let (_, dtype, _, data) =
        tensors.iter_mut().find(|(n, ..)| n.ends_with("h.1.mlp.c_fc.weight")).expect("gpt2 c_fc weight");
    assert_eq!(*dtype, safetensors::Dtype::F32);
    let x = f32::from_le_bytes(data[0..4].try_into().unwrap()) + 0.05;
    data[0..4].copy_from_slice(&x.to_le_bytes());
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(&file, safetensors::serialize(views, &None).unwrap()).unwrap();

    let z = OneModelZoo::new(&model);
    let r = z.check(&[]);
    assert!(!r.ok);
    let failing: Vec<&str> = r.stdout.lines().filter(|l| l.ends_with("FAIL")).collect();
    assert!(failing.iter().any(|l| l.contains("logits") && l.contains("allclose")), "{}", r.stdout);
    assert!(failing.iter().any(|l| l.contains("golden:ioi")), "{}", r.stdout);
    assert!(
        r.stdout.contains(&format!("- {MODEL} float32 logits allclose:"))
            && r.stdout.contains("logits outside |ours − ref|"),
        "{}",
        r.stdout
    );
}

#[test]
fn bf16_under_f32_tolerances_fails() {
    let z = OneModelZoo::new(&fixture(MODEL));
    let r = z.check(&["--dtype", "bfloat16"]);
    assert!(!r.ok);
    let fails = |fig: &str| {
        r.stdout.lines().any(|l| {
            l.starts_with(&MODEL.to_string())
                && l.contains("bfloat16")
                && l.contains(&format!(" {fig} "))
                && l.ends_with("FAIL")
        })
    };
    assert!(fails("allclose") && fails("mse"), "{}", r.stdout);
    // No bf16 goldens are stored for this model: named, not skipped.
    assert!(r.stdout.contains("no golden") && r.stdout.contains("bfloat16/ioi/resid.parquet"), "{}", r.stdout);
}

#[test]
fn comparator_metrics_equal_the_demo_formulas_in_torch() {
    // A reference that disagrees: the zoo-ci reference plus noise (seeded), made by Python.
    let z = OneModelZoo::new(&fixture(MODEL));
    let py = repo_root().join(".venv/bin/python");
    let dir = z.dir.path();
    let noisy = dir.join("reference.safetensors");
    let script = r#"
import json, sys, torch
from safetensors.torch import load_file, save_file
from safetensors import safe_open
path = sys.argv[1]
with safe_open(path, "pt") as f:
    meta = f.metadata()
t = load_file(path)
g = torch.Generator().manual_seed(0)
for k in list(t):
    if k.startswith("logits."):
        t[k] = (t[k] + 0.3 * torch.randn(t[k].shape, generator=g)).contiguous()
save_file(t, path, metadata=meta)
"#;
    let st = Command::new(&py).arg("-c").arg(script).arg(&noisy).status().unwrap();
    assert!(st.success());
    let r = z.check(&[]);
    assert!(!r.ok, "noise 0.3 must fail the f32 gate");
    // Ours, as tl-run computed them: --update=references writes them over a copy of the zoo.
    let ours_dir = tempfile::tempdir().unwrap();
    let ours_zoo = std::fs::read_to_string(z.zoo())
        .unwrap()
        .replace("reference.safetensors", &ours_dir.path().join("ours.safetensors").display().to_string());
    std::fs::write(ours_dir.path().join("zoo.toml"), ours_zoo).unwrap();
    let u = check(&ours_dir.path().join("zoo.toml"), &["--update=references"], &ours_dir.path().join("out"));
    assert!(u.ok, "{}\n{}", u.stdout, u.stderr);

    let script = r#"
import json, sys, torch
import torch.nn.functional as F
import pyarrow.parquet as pq
from safetensors.torch import load_file
ref, ours, table = load_file(sys.argv[1]), load_file(sys.argv[2]), pq.read_table(sys.argv[3]).to_pylist()
n = len([k for k in ref if k.startswith("logits.")])
r = torch.cat([ref[f"logits.{i}"] for i in range(n)]).double()
o = torch.cat([ours[f"logits.{i}"] for i in range(n)]).double()
atol, rtol = 1e-4, 1e-4
def kl_div(l1, l2):  # the demo's: F.kl_div(log p1, p2, batchmean) = KL(p2 || p1)
    return F.kl_div(F.softmax(l1, -1).log(), F.softmax(l2, -1), reduction="batchmean").item()
expected = {
    "allclose": float((~((o - r).abs() <= atol + rtol * r.abs())).sum()),
    "max_abs_diff": (o - r).abs().max().item(),
    "mse": F.mse_loss(o, r).item(),
    "cosine": F.cosine_similarity(o, r, dim=-1).mean().item(),
    "kl(ref||ours)": kl_div(o, r),
    "kl(ours||ref)": kl_div(r, o),
    "top1": (o.argmax(-1) == r.argmax(-1)).double().mean().item(),
}
got = {row["figure"]: row["value"] for row in table if row["check"] == "logits"}
assert not torch.allclose(o, r, atol=atol, rtol=rtol)
for k, v in expected.items():
    assert abs(got[k] - v) <= 1e-9 + 1e-6 * abs(v), (k, got[k], v)
print(json.dumps({k: [got[k], v] for k, v in expected.items()}))
"#;
    let o = Command::new(&py)
        .arg("-c")
        .arg(script)
        .arg(&noisy)
        .arg(ours_dir.path().join("ours.safetensors"))
        .arg(dir.join("out/check.parquet"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    eprintln!("{}", String::from_utf8_lossy(&o.stdout));
}

#[test]
fn zoo_file_errors_name_the_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let write = |text: &str| {
        let p = dir.path().join("zoo.toml");
        std::fs::write(&p, text).unwrap();
        p
    };
    let err = |text: &str| tl_run::check::Zoo::read(&write(text), false).expect_err("must fail").to_string();
    let e = err("[[model]]\nname = \"m\"\nid = \"gpt2\"\nrevision = \"main\"\nprompts = [\"a\"]\nreference = \"r.safetensors\"\n");
    assert!(
        e.contains("zoo.toml:4:")
            && e.contains("model[m].revision")
            && e.contains("branch or tag")
            && e.contains("allow_moving_revision"),
        "{e}"
    );
    let e = err(
        "[[model]]\nname = \"m\"\npath = \"nowhere\"\nprompts = [\"a\"]\nreference = \"r.safetensors\"\ncolour = 3\n",
    );
    assert!(e.contains("zoo.toml:6:") && e.contains("unknown field `colour`"), "{e}");
    let e = err("[[model]]\nname = \"m\"\npath = \"nowhere\"\nprompts_file = \"none.txt\"\nreference = \"r.safetensors\"\ndtypes = [\"float8\"]\n");
    for want in [
        "zoo.toml:3:",
        "model[m].path",
        "no such model",
        "zoo.toml:4:",
        "model[m].prompts_file",
        "zoo.toml:5:",
        "model[m].reference",
        "zoo.toml:6:",
        "unknown dtype 'float8'",
    ] {
        assert!(e.contains(want), "{want} not in {e}");
    }
    let e = err("[defaults.tolerance]\ncosine = 2.0\n[[model]]\nname = \"m\"\nid = \"gpt2\"\nrevision = \"main\"\nallow_moving_revision = true\nprompts = [\"a\"]\nreference = \"r.safetensors\"\n");
    assert!(e.contains("zoo.toml:2:") && e.contains("defaults.tolerance.cosine") && !e.contains("revision"), "{e}");
    // A branch is accepted with allow_moving_revision; the public zoo parses (references are made later).
    tl_run::check::Zoo::read(&repo_root().join("configs/zoo.toml"), true).expect("configs/zoo.toml");
    tl_run::check::Zoo::read(&repo_root().join("configs/zoo-ci.toml"), false).expect("configs/zoo-ci.toml");
}
