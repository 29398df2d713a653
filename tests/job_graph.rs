//! The job graph as the executor: stored jobs are reused on a rerun and only changed jobs run
//! again, shards merge to the single-process result, and a run killed with SIGKILL at any
//! moment finishes on a rerun with byte-identical Parquet and no temporary file left behind.
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use common::*;

fn tl_run() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tl-run"));
    c.env("HF_HUB_OFFLINE", "1");
    c
}

/// Runs tl-run with `args`; returns stdout, panicking with stderr on failure.
fn ok(args: &[&str]) -> String {
    let o = tl_run().args(args).output().unwrap();
    assert!(o.status.success(), "tl-run {args:?} failed:\n{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn fails(args: &[&str]) -> String {
    let o = tl_run().args(args).output().unwrap();
    assert!(!o.status.success(), "tl-run {args:?} should have failed");
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!e.contains("panicked"), "tl-run {args:?} panicked:\n{e}");
    e
}

/// (ran, read from the store) from a run's "jobs: X ran, Y read from the store" line.
fn job_counts(stdout: &str) -> (usize, usize) {
    let line = stdout.lines().find(|l| l.starts_with("jobs: ")).unwrap_or_else(|| panic!("no jobs line in\n{stdout}"));
    let nums: Vec<usize> = line.split(|c: char| !c.is_ascii_digit()).filter_map(|w| w.parse().ok()).collect();
    (nums[0], nums[1])
}

/// Every file under `dir` (relative path → bytes), leaving out the job store.
fn outputs(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
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

fn parquet_files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    outputs(dir).into_iter().filter(|(p, _)| p.extension().is_some_and(|e| e == "parquet")).collect()
}

/// Every temporary file anywhere under `dir`, the store included.
fn temp_files(dir: &Path) -> Vec<PathBuf> {
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

fn ioi() -> String {
    repo_root().join("experiments/ioi.toml").display().to_string()
}

#[test]
fn a_rerun_reads_every_job_from_the_store_and_a_changed_spec_redoes_only_its_changed_jobs() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, model) = (tmp.path().join("out"), fixture("gpt2-tiny").display().to_string());
    let o = out.display().to_string();
    let first = ok(&["run", &ioi(), "--model-id", &model, "--out", &o, "--quiet"]);
    let (ran, stored) = job_counts(&first);
    assert!(ran >= 15 && stored == 0, "a first run runs every job: {ran} ran, {stored} stored");
    let files = parquet_files(&out);

    let again = ok(&["run", &ioi(), "--model-id", &model, "--out", &o, "--quiet"]);
    assert_eq!(job_counts(&again), (0, ran), "an unchanged rerun runs nothing");
    assert_eq!(parquet_files(&out), files, "the rerun's files differ from the first run's");
    let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    let load = manifest["jobs"].as_array().unwrap().iter().find(|j| j["name"].as_str().unwrap().starts_with("load model")).unwrap();
    assert_eq!(load["status"], "skipped", "a rerun with every job stored loads no weights");

    // One option of one run changed, and another run renamed: only the changed run's job runs.
    let text = std::fs::read_to_string(ioi()).unwrap();
    let changed = text.replace("top_k = 5 ", "top_k = 3 ").replace("name = \"dla-heads\"", "name = \"dla-per-head\"");
    assert_ne!(changed, text);
    let spec = tmp.path().join("changed.toml");
    std::fs::write(&spec, changed).unwrap();
    let third = ok(&["run", spec.to_str().unwrap(), "--model-id", &model, "--out", &o, "--quiet"]);
    assert_eq!(job_counts(&third), (1, ran - 1), "only the logit-lens job's key changed");
    let renamed = Table::read(&out.join("dla-per-head.parquet"));
    let copy = tmp.path().join("dla-heads-first-run.parquet");
    std::fs::write(&copy, &files[Path::new("dla-heads.parquet")]).unwrap();
    let original = Table::read(&copy);
    assert_eq!(renamed.len(), original.len());
    for i in 0..renamed.len() {
        assert_eq!(renamed.value(i), original.value(i), "row {i} of the renamed run");
        assert_eq!(renamed.str("run", i).as_deref(), Some("dla-per-head"));
    }

    // --fresh runs everything again and gives the same bytes.
    let fresh = ok(&["run", &ioi(), "--model-id", &model, "--out", &o, "--quiet", "--fresh"]);
    assert_eq!(job_counts(&fresh), (ran, 0));
    let now = parquet_files(&out);
    for (p, bytes) in &files {
        assert_eq!(&now[p], bytes, "{} differs after --fresh", p.display());
    }
}

#[test]
fn shards_cover_every_job_once_read_as_one_dataset_and_merge_to_the_single_run() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("gpt2-tiny").display().to_string();
    let single = tmp.path().join("single");
    let sharded = tmp.path().join("sharded");
    let first = ok(&["run", &ioi(), "--model-id", &model, "--out", single.to_str().unwrap(), "--quiet"]);
    let (total, _) = job_counts(&first);
    let mut ran = 0;
    for i in 0..3 {
        let s = ok(&["run", &ioi(), "--model-id", &model, "--out", sharded.to_str().unwrap(), "--quiet", "--shard", &format!("{i}/3")]);
        ran += job_counts(&s).0;
    }
    assert_eq!(ran, total, "the shards together run every job exactly once");
    assert!(sharded.join("resid/shard=0-of-3/part-0.parquet").is_file());
    // pandas (a hive-partitioned directory) and polars (a glob) read the union of the parts.
    let py = repo_root().join(".venv/bin/python");
    let script = r#"
import sys, pandas as pd, polars as pl
d, runs = sys.argv[1], sys.argv[2:]
for run in runs:
    a = pd.read_parquet(f"{d}/{run}")
    b = pl.read_parquet(f"{d}/{run}/**/*.parquet")
    print(run, len(a), b.height, sorted(set(a["shard"].astype(str))))
"#;
    let runs = ["resid", "heads", "logit-lens", "attribution", "ablate-name-mover"];
    let o = Command::new(&py).arg("-c").arg(script).arg(&sharded).args(runs).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let read = String::from_utf8_lossy(&o.stdout).into_owned();
    for (line, run) in read.lines().zip(runs) {
        let n = Table::read(&single.join(format!("{run}.parquet"))).len();
        assert!(line.starts_with(&format!("{run} {n} {n} ")), "{run}: the parts read as one dataset should have the single run's {n} rows: {line}");
    }

    let merged = ok(&["merge", sharded.to_str().unwrap()]);
    assert!(merged.contains("3 shards"), "{merged}");
    let want = parquet_files(&single);
    let got = parquet_files(&sharded);
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "merge leaves exactly the single-file layout");
    for (p, bytes) in &want {
        assert_eq!(&got[p], bytes, "{}: the merged file is not byte-identical to the single run's", p.display());
    }
    let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(sharded.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["shards"].as_array().unwrap().len(), 3);
}

#[test]
fn shard_and_merge_problems_are_named_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("gpt2-tiny").display().to_string();
    let out = tmp.path().join("out");
    for bad in ["3/3", "1", "a/b", "0/0"] {
        let e = fails(&["run", &ioi(), "--model-id", &model, "--out", out.to_str().unwrap(), "--shard", bad]);
        assert!(e.contains("--shard") && e.contains("i/n"), "--shard {bad}: {e}");
    }
    let e = fails(&["merge", out.to_str().unwrap()]);
    assert!(e.contains("no shard manifests") || e.contains("No such file"), "{e}");
    ok(&["run", &ioi(), "--model-id", &model, "--out", out.to_str().unwrap(), "--quiet", "--shard", "1/3"]);
    let e = fails(&["merge", out.to_str().unwrap()]);
    assert!(e.contains("shards [0, 2] have no manifest"), "{e}");
    // Slurm variables select the shard inside an array task.
    let o = tl_run()
        .args(["run", &ioi(), "--model-id", &model, "--out", out.to_str().unwrap(), "--quiet"])
        .env("SLURM_ARRAY_TASK_ID", "0")
        .env("SLURM_ARRAY_TASK_COUNT", "3")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("this is shard 0 of 3"));
    assert!(out.join("manifest.shard-0-of-3.json").is_file());
}

#[test]
fn killed_at_20_random_moments_a_rerun_finishes_with_identical_files_and_no_temporary_file() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = long_ioi_spec(tmp.path());
    let model = fixture("gpt2-tiny").display().to_string();
    let run = |out: &Path| {
        let mut c = tl_run();
        c.args(["run", spec.to_str().unwrap(), "--model-id", &model, "--out", out.to_str().unwrap(), "--quiet"]).env("TL_RUN_BATCH_FLOATS", LONG_BATCH_FLOATS);
        c
    };
    // Two uninterrupted runs: the second's time (warm page cache, like the trials') bounds the
    // kill moments.
    let reference = tmp.path().join("reference");
    let o = run(&tmp.path().join("warm-up")).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let t = Instant::now();
    let o = run(&reference).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let full = t.elapsed();
    let want = parquet_files(&reference);
    assert!(want.len() >= 9);
    let mut seed: u64 = 0x5eed_2026_1127;
    let (mut killed, mut resumed_jobs, mut report) = (0, 0, Vec::new());
    for trial in 0..20 {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let at = full.mul_f64((seed >> 11) as f64 / (1u64 << 53) as f64);
        let out = tmp.path().join(format!("trial-{trial}"));
        let mut child = run(&out).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        std::thread::sleep(at);
        let was_running = child.try_wait().unwrap().is_none();
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        killed += was_running as usize;
        let stored_before = std::fs::read_dir(out.join(".tl-run/jobs")).map(|d| d.count()).unwrap_or(0);
        let o = run(&out).output().unwrap();
        assert!(o.status.success(), "trial {trial}: the rerun after a kill at {at:?} failed:\n{}", String::from_utf8_lossy(&o.stderr));
        let (ran, stored) = job_counts(&String::from_utf8_lossy(&o.stdout));
        resumed_jobs += stored;
        report.push(format!("{:.2}s: {} stored before, rerun {ran} ran + {stored} stored", at.as_secs_f64(), stored_before));
        let got = parquet_files(&out);
        assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "trial {trial} (killed at {at:?}): other files");
        for (p, bytes) in &want {
            assert!(&got[p] == bytes, "trial {trial} (killed at {at:?}): {} is not byte-identical to the uninterrupted run's", p.display());
        }
        let temps = temp_files(&out);
        assert!(temps.is_empty(), "trial {trial} (killed at {at:?}): temporary files left: {temps:?}");
        let top: Vec<String> = outputs(&out).keys().map(|p| p.display().to_string()).collect();
        assert!(top.iter().all(|p| p.ends_with(".parquet") || p == "manifest.json"), "trial {trial}: unexpected files {top:?}");
    }
    eprintln!("kill -9 trials (uninterrupted run {:.2}s):\n  {}", full.as_secs_f64(), report.join("\n  "));
    assert!(killed >= 10, "only {killed} of 20 kills hit a running process; the runs are too short to test resume");
    assert!(resumed_jobs > 0, "no rerun read a stored job: resume was never exercised");
}

#[test]
fn two_device_replicas_run_jobs_concurrently_and_give_the_one_device_files() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("gpt2-tiny").display().to_string();
    let (one, two, spec_key) = (tmp.path().join("one"), tmp.path().join("two"), tmp.path().join("spec-key"));
    ok(&["run", &ioi(), "--model-id", &model, "--out", one.to_str().unwrap(), "--quiet"]);
    let s = ok(&["run", &ioi(), "--model-id", &model, "--out", two.to_str().unwrap(), "--quiet", "--devices", "cpu,cpu"]);
    assert!(job_counts(&s).0 >= 15, "{s}");
    // The same through the spec's model.devices.
    let text = std::fs::read_to_string(ioi()).unwrap().replace("[model]\n", "[model]\ndevices = [\"cpu\", \"cpu\"]\n");
    let spec = tmp.path().join("devices.toml");
    std::fs::write(&spec, text).unwrap();
    ok(&["run", spec.to_str().unwrap(), "--model-id", &model, "--out", spec_key.to_str().unwrap(), "--quiet"]);
    let want = parquet_files(&one);
    for dir in [&two, &spec_key] {
        assert_eq!(parquet_files(dir), want, "{}: two replicas differ from one device", dir.display());
        let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
        assert_eq!(manifest["device"], "[Cpu, Cpu]");
    }
    // Bad device lists are named with their line and key.
    for (devices, want) in [("[]", "model.devices: is empty"), ("[\"cpu\", \"tpu\"]", "unknown device 'tpu'")] {
        let text = std::fs::read_to_string(ioi()).unwrap().replace("[model]\n", &format!("[model]\ndevices = {devices}\n"));
        std::fs::write(&spec, text).unwrap();
        let e = fails(&["validate", spec.to_str().unwrap(), "--model-id", &model]);
        assert!(e.contains(want) && e.contains(":4:"), "{devices}: {e}");
    }
}
