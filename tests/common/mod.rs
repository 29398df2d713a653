//! Helpers shared by the integration tests: where fixtures and TransformerLens oracle outputs
//! live, reading them, and comparisons that print which hook differed and by how much.
#![allow(dead_code)]
pub mod compare;

#[allow(unused_imports)] // each test binary uses a part of the helper
pub use compare::{assert_oracle, assert_oracle_tensor, Baseline, Tol};
use std::collections::HashMap;
use std::path::PathBuf;

use tch::Tensor;
use tl_run::model::config::Processing;
use tl_run::{LoadOptions, Model};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A fixture model directory; stories260K is the real trained model vendored in tests/models/.
pub fn fixture(name: &str) -> PathBuf {
    let p = if name == "stories260K" {
        repo_root().join("tests/models/stories260K")
    } else {
        repo_root().join("fixtures").join(name)
    };
    assert!(
        p.join("config.json").is_file(),
        "fixture {} is missing: run `scripts/test.sh` (it builds fixtures and TransformerLens outputs)",
        p.display()
    );
    p
}

pub fn oracle_file(fixture: &str, file: &str) -> PathBuf {
    let p = repo_root().join("fixtures/oracle").join(fixture).join(file);
    assert!(p.is_file(), "TransformerLens output {} is missing: run `scripts/test.sh`", p.display());
    p
}

pub struct Oracle {
    pub tensors: HashMap<String, Tensor>,
    pub metadata: HashMap<String, String>,
}

impl Oracle {
    pub fn read(fixture: &str, file: &str) -> Oracle {
        let path = oracle_file(fixture, file);
        let tensors = Tensor::read_safetensors(&path).expect("read oracle").into_iter().collect();
        let bytes = std::fs::read(&path).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).expect("oracle metadata");
        Oracle { tensors, metadata: meta.metadata().clone().unwrap_or_default() }
    }

    pub fn get(&self, key: &str) -> &Tensor {
        self.tensors.get(key).unwrap_or_else(|| panic!("oracle has no '{key}'"))
    }

    pub fn prompts(&self) -> Vec<String> {
        self.metadata.get("prompts").map(|p| serde_json::from_str(p).unwrap()).unwrap_or_default()
    }
}

pub fn load(fixture_name: &str, processing: Processing) -> Model {
    let opts = LoadOptions { processing, ..LoadOptions::default() };
    Model::load(fixture(fixture_name).to_str().unwrap(), &opts)
        .unwrap_or_else(|e| panic!("loading {fixture_name}: {e}"))
}

/// Max |a - b|, where equal infinities (masked attention scores) count as equal.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    let a = a.detach().to_kind(tch::Kind::Double);
    let b = b.detach().to_kind(tch::Kind::Double);
    let same_inf = a.isinf().logical_and(&b.isinf()).logical_and(&a.eq_tensor(&b));
    let diff = (&a - &b).abs().masked_fill(&same_inf, 0.0);
    if diff.numel() == 0 {
        return 0.0;
    }
    let d = diff.max().double_value(&[]);
    if d.is_nan() {
        f64::INFINITY
    } else {
        d
    }
}

/// log-softmax over the vocabulary: equal between processed and unprocessed models, since
/// center_unembed shifts each position's logits by a constant.
pub fn log_softmax(t: &Tensor) -> Tensor {
    t.log_softmax(-1, tch::Kind::Float)
}

/// A Parquet result table read back, with typed access by column name.
pub struct Table {
    pub batch: arrow::record_batch::RecordBatch,
}

impl Table {
    pub fn read(path: &std::path::Path) -> Table {
        use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
        let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let reader = ParquetRecordBatchReaderBuilder::try_new(file).unwrap().build().unwrap();
        let batches: Vec<_> = reader.map(|b| b.unwrap()).collect();
        Table { batch: arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap() }
    }

    pub fn len(&self) -> usize {
        self.batch.num_rows()
    }

    fn column(&self, name: &str) -> &dyn arrow::array::Array {
        self.batch.column_by_name(name).unwrap_or_else(|| panic!("no column {name}")).as_ref()
    }

    pub fn str(&self, name: &str, i: usize) -> Option<String> {
        let c = self.column(name).as_any().downcast_ref::<arrow::array::StringArray>().unwrap();
        (!arrow::array::Array::is_null(c, i)).then(|| c.value(i).to_string())
    }

    pub fn int(&self, name: &str, i: usize) -> Option<i64> {
        let c = self.column(name).as_any().downcast_ref::<arrow::array::Int32Array>().unwrap();
        (!arrow::array::Array::is_null(c, i)).then(|| c.value(i) as i64)
    }

    pub fn float(&self, name: &str, i: usize) -> Option<f64> {
        let c = self.column(name).as_any().downcast_ref::<arrow::array::Float64Array>().unwrap();
        (!arrow::array::Array::is_null(c, i)).then(|| c.value(i))
    }

    pub fn value(&self, i: usize) -> f64 {
        self.float("value", i).unwrap()
    }

    /// Indices of the rows for which `keep` holds, in table order.
    pub fn rows(&self, keep: impl Fn(&Table, usize) -> bool) -> Vec<usize> {
        (0..self.len()).filter(|&i| keep(self, i)).collect()
    }

    /// Rows without a prompt (means over prompts) and without a rank (not top-k rows).
    pub fn mean_rows(&self) -> Vec<usize> {
        self.rows(|t, i| t.int("prompt", i).is_none() && t.int("rank", i).is_none())
    }
}

/// Writes `spec` into a fresh directory, runs `tl-run` on it with `args`, and returns the
/// directory (results in its out/). Panics with stderr when the run fails.
pub fn run_spec(spec: &str, args: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spec.toml");
    std::fs::write(&path, spec).unwrap();
    let out = dir.path().join("out");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tl-run"));
    cmd.arg("run").arg("--quiet").arg(&path).arg("--out").arg(&out).args(args).env("HF_HUB_OFFLINE", "1");
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "tl-run failed on\n{spec}\n{}", String::from_utf8_lossy(&o.stderr));
    dir
}

/// Every test fixture of configs/fixtures.toml (one or more per family: two GPT-2 shapes,
/// Llama 3 and linear rope scaling, ...; not the bench-only ones), in the file's order.
pub fn test_fixtures() -> Vec<String> {
    let text = std::fs::read_to_string(repo_root().join("configs/fixtures.toml")).unwrap();
    let table: toml::Table = toml::from_str(&text).unwrap();
    let mut named: Vec<(usize, String)> = Vec::new();
    for family in table.values().filter_map(|f| f.as_table()) {
        for (name, f) in family {
            if f.get("bench").and_then(|b| b.as_bool()) != Some(true) {
                // toml::Table is sorted; the file's order is where the header is.
                named.push((text.find(&format!(".{name}]")).unwrap_or(usize::MAX), name.clone()));
            }
        }
    }
    named.sort();
    named.into_iter().map(|(_, n)| n).collect()
}

/// Every test fixture and the real stories260K.
pub fn every_family() -> Vec<String> {
    let mut all = test_fixtures();
    all.push("stories260K".into());
    all
}

/// Whether a fixture uses the GPT-2 tokenizer (configs/fixtures.toml says; stories260K and the
/// "stories" fixtures use the 512-token sentencepiece one).
pub fn uses_gpt2_tokenizer(fixture: &str) -> bool {
    let text = std::fs::read_to_string(repo_root().join("configs/fixtures.toml")).unwrap();
    let table: toml::Table = toml::from_str(&text).unwrap();
    table
        .values()
        .filter_map(|f| f.as_table()?.get(fixture)?.get("tokenizer")?.as_str().map(|t| t == "gpt2"))
        .next()
        .unwrap_or(false)
}

/// The prompt file of experiments/prompts/ a fixture's tokenizer reads (as the oracle scripts).
pub fn prompt_file(fixture: &str) -> PathBuf {
    repo_root().join("experiments/prompts").join(if uses_gpt2_tokenizer(fixture) {
        "ioi.jsonl"
    } else {
        "stories.jsonl"
    })
}

/// The oracle's prompts ([{clean, answers}]) as TOML [prompts] lines.
pub fn prompts_toml(oracle: &Oracle) -> String {
    let prompts: Vec<serde_json::Value> = serde_json::from_str(&oracle.metadata["prompts"]).unwrap();
    let clean: Vec<String> = prompts.iter().map(|p| p["clean"].to_string()).collect();
    let answers: Vec<String> = prompts.iter().map(|p| p["answers"].to_string()).collect();
    format!("[prompts]\nclean = [{}]\nanswers = [{}]\n", clean.join(", "), answers.join(", "))
}

/// A tensor as f64 values in row-major order.
pub fn values(t: &Tensor) -> Vec<f64> {
    Vec::try_from(t.flatten(0, -1).to_kind(tch::Kind::Double)).unwrap()
}

/// A spec with enough jobs (per-layer patching of several hooks, every other kind) and small
/// patch batches (TL_RUN_BATCH_FLOATS = LONG_BATCH_FLOATS) that a run lasts long enough to be killed mid-sweep.
pub fn long_ioi_spec(dir: &std::path::Path) -> PathBuf {
    let text = std::fs::read_to_string(repo_root().join("experiments/ioi.toml"))
        .unwrap()
        .replace(
            r#"hooks = ["resid_pre", "attn_out", "mlp_out"]
over = ["layer", "pos"]

[[run]]
name = "heads""#,
            r#"hooks = ["resid_pre", "resid_mid", "attn_out", "mlp_out", "resid_post"]
over = ["layer", "pos"]

[[run]]
name = "heads""#,
        )
        .replace(
            r#"hooks = ["z", "v", "pattern"]
over = ["layer", "head"]"#,
            r#"hooks = ["z", "v", "q"]
over = ["layer", "pos", "head"]"#,
        );
    let p = dir.join("long-ioi.toml");
    std::fs::write(&p, text).unwrap();
    p
}

pub const LONG_BATCH_FLOATS: &str = "40000";

// Running the tl-run binary and reading what it wrote.

pub fn tl_run() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_tl-run"));
    c.env("HF_HUB_OFFLINE", "1");
    c
}

/// Runs tl-run with `args`; returns stdout, panicking with stderr on failure.
pub fn ok(args: &[&str]) -> String {
    let o = tl_run().args(args).output().unwrap();
    assert!(o.status.success(), "tl-run {args:?} failed:\n{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn fails(args: &[&str]) -> String {
    let o = tl_run().args(args).output().unwrap();
    assert!(!o.status.success(), "tl-run {args:?} should have failed");
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!e.contains("panicked"), "tl-run {args:?} panicked:\n{e}");
    e
}

/// (ran, read from the store) from a run's "jobs: X ran, Y read from the store" line.
pub fn job_counts(stdout: &str) -> (usize, usize) {
    let line = stdout.lines().find(|l| l.starts_with("jobs: ")).unwrap_or_else(|| panic!("no jobs line in\n{stdout}"));
    let nums: Vec<usize> = line.split(|c: char| !c.is_ascii_digit()).filter_map(|w| w.parse().ok()).collect();
    (nums[0], nums[1])
}

/// Every file under `dir` (relative path → bytes), leaving out the job store.
pub fn outputs(dir: &std::path::Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                if e.file_name() != ".tl-run" {
                    stack.push(p);
                }
            } else {
                out.insert(p.strip_prefix(dir).unwrap().to_path_buf(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

pub fn parquet_files(dir: &std::path::Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    outputs(dir).into_iter().filter(|(p, _)| p.extension().is_some_and(|e| e == "parquet")).collect()
}

/// Every temporary file anywhere under `dir`, the store included.
pub fn temp_files(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if e.path().is_dir() {
                stack.push(e.path());
            } else if tl_run::output::atomic::is_temp(&name) || name.contains("probe") {
                found.push(e.path());
            }
        }
    }
    found
}

/// Asserts that two result directories hold the same Parquet files with the same rows: every
/// column but the floats equal, floats within `rel` of each other (relative, at least 1 in the
/// denominator). Runs that batch the same cells differently (shards, replicas, halved batches,
/// the staircase, a resume after a kill) round differently: the BLAS's kernels on some CPUs give
/// results that depend on the batch's size (docs/verification.md), so they promise the same
/// values to rounding, not the same bytes. Byte-identity is checked where the same batches run.
pub fn assert_same_rows(a: &std::path::Path, b: &std::path::Path, rel: f64) {
    use arrow::array::{Array, Float32Array, Float64Array};
    let (fa, fb) = (parquet_files(a), parquet_files(b));
    assert_eq!(
        fa.keys().collect::<Vec<_>>(),
        fb.keys().collect::<Vec<_>>(),
        "{} and {}: other files",
        a.display(),
        b.display()
    );
    for name in fa.keys() {
        let (x, y) = (Table::read(&a.join(name)), Table::read(&b.join(name)));
        assert_eq!(x.batch.schema(), y.batch.schema(), "{}: schemas differ", name.display());
        assert_eq!(x.len(), y.len(), "{}: row counts differ", name.display());
        for (field, (cx, cy)) in x.batch.schema().fields().iter().zip(x.batch.columns().iter().zip(y.batch.columns())) {
            let floats = |c: &dyn Array| -> Option<Vec<Option<f64>>> {
                if let Some(f) = c.as_any().downcast_ref::<Float64Array>() {
                    return Some(f.iter().collect());
                }
                c.as_any().downcast_ref::<Float32Array>().map(|f| f.iter().map(|v| v.map(f64::from)).collect())
            };
            match (floats(cx.as_ref()), floats(cy.as_ref())) {
                (Some(vx), Some(vy)) => {
                    for (i, (p, q)) in vx.iter().zip(&vy).enumerate() {
                        let same = match (p, q) {
                            (Some(p), Some(q)) => {
                                p == q || (p.is_nan() && q.is_nan()) || (p - q).abs() <= rel * p.abs().max(1.0)
                            }
                            (None, None) => true,
                            _ => false,
                        };
                        assert!(
                            same,
                            "{} column {} row {i}: {p:?} vs {q:?} (beyond {rel:e} relative)",
                            name.display(),
                            field.name()
                        );
                    }
                }
                _ => assert_eq!(cx.to_data(), cy.to_data(), "{} column {} differs", name.display(), field.name()),
            }
        }
    }
}

/// Same-batches tolerance of `assert_same_rows`: f32 rounding of a batch's GEMMs (~1e-7 of the
/// logits) over the fixtures' clean − corrupted gaps (≥ 0.02 logits) stays under 1e-5.
pub const REBATCHED_REL: f64 = 1e-5;
