//! A real Slurm array: `tl-run slurm --submit` on the single-node cluster `scripts/slurm.sh`
//! starts (scripts/test.sh does, and exports SLURM_CONF). A 4-task array over the IOI spec gives
//! the single-process rows, also when one task is cancelled with scancel mid-run and requeued.
mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn slurm_conf() -> String {
    std::env::var("SLURM_CONF").unwrap_or_else(|_| {
        panic!("SLURM_CONF is not set: start the test cluster with `eval \"$(bash scripts/slurm.sh)\"` (scripts/test.sh does)")
    })
}

fn sh(cmd: &str, args: &[&str]) -> String {
    let o =
        Command::new(cmd).args(args).env("SLURM_CONF", slurm_conf()).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(o.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// (array job id, merge job id) from `tl-run slurm --submit`'s output.
fn submit(spec: &Path, out: &Path, tasks: usize, envs: &[(&str, &str)]) -> (String, String) {
    let model = fixture("gpt2-tiny").display().to_string();
    let o = Command::new(env!("CARGO_BIN_EXE_tl-run"))
        .args([
            "slurm",
            spec.to_str().unwrap(),
            "--model-id",
            &model,
            "--out",
            out.to_str().unwrap(),
            "--tasks",
            &tasks.to_string(),
            "--submit",
        ])
        .env("SLURM_CONF", slurm_conf())
        .env("HF_HUB_OFFLINE", "1")
        // sbatch passes the environment on to the tasks.
        .envs(envs.iter().copied())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "tl-run slurm failed: {}\n{text}", String::from_utf8_lossy(&o.stderr));
    let words: Vec<&str> = text.split_whitespace().collect();
    let after = |w: &str| words.iter().position(|x| *x == w).map(|i| words[i + 2].to_string()).unwrap();
    (after("array"), after("merge"))
}

/// The state of a job as scontrol tells it.
fn state(job: &str) -> String {
    let o = Command::new("scontrol").args(["show", "job", job]).env("SLURM_CONF", slurm_conf()).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    text.split_whitespace().find_map(|w| w.strip_prefix("JobState=")).unwrap_or("UNKNOWN").to_string()
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let t = Instant::now();
    while !done() {
        assert!(t.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn single_run(spec: &Path, out: &Path) {
    let model = fixture("gpt2-tiny").display().to_string();
    let o = Command::new(env!("CARGO_BIN_EXE_tl-run"))
        .args(["run", spec.to_str().unwrap(), "--model-id", &model, "--out", out.to_str().unwrap(), "--quiet"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// The store keys of shard `shard`'s work jobs when the spec's jobs split over `count` shards.
fn shard_keys(spec: &Path, count: usize, shard: usize) -> Vec<String> {
    let model = fixture("gpt2-tiny").display().to_string();
    let o = Command::new(env!("CARGO_BIN_EXE_tl-run"))
        .args(["plan", spec.to_str().unwrap(), "--model-id", &model, "--shards", &count.to_string(), "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let jobs: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("plan --json: {e}"));
    jobs.as_array()
        .unwrap()
        .iter()
        .filter(|j| j["shard"] == shard && j["key"].is_string())
        .map(|j| j["key"].as_str().unwrap().to_string())
        .collect()
}

/// Row sets equal, values equal to rounding (REBATCHED_REL; the tasks batch cells differently from
/// the single process), keyed by every column but the values.
fn assert_same_row_sets(single: &Path, merged: &Path, what: &str) {
    let runs: Vec<String> = std::fs::read_dir(single)
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".parquet").map(str::to_string))
        .collect();
    assert!(runs.len() >= 9, "{what}: {runs:?}");
    for run in runs {
        let (a, _) = tl_run::output::table::read_parquet(&single.join(format!("{run}.parquet"))).unwrap();
        let (b, _) = tl_run::output::table::read_parquet(&merged.join(format!("{run}.parquet")))
            .unwrap_or_else(|e| panic!("{what}: {run}: {e}"));
        let key = |r: &tl_run::output::table::Row| {
            format!("{:?}", tl_run::output::table::Row { value: 0.0, patched: None, ..r.clone() })
        };
        let mut a: Vec<_> = a.iter().map(|r| (key(r), r.value, r.patched)).collect();
        let mut b: Vec<_> = b.iter().map(|r| (key(r), r.value, r.patched)).collect();
        a.sort_by(|x, y| x.0.cmp(&y.0));
        b.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(a.len(), b.len(), "{what}: {run} row count");
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.0, y.0, "{what}: {run}: the row sets differ");
            assert!(
                (x.1 - y.1).abs() <= REBATCHED_REL * x.1.abs().max(1.0),
                "{what}: {run} {}: {} vs {}",
                x.0,
                x.1,
                y.1
            );
            assert_eq!(x.2.is_some(), y.2.is_some());
            if let (Some(p), Some(q)) = (x.2, y.2) {
                assert!((p - q).abs() <= REBATCHED_REL * p.abs().max(1.0), "{what}: {run} patched: {p} vs {q}");
            }
        }
    }
}

#[test]
fn a_slurm_array_gives_the_single_process_rows_even_with_a_task_cancelled_and_requeued() {
    let _ = slurm_conf();
    let tmp = tempfile::tempdir().unwrap();
    let spec = repo_root().join("experiments/ioi.toml");
    let single = tmp.path().join("single");
    single_run(&spec, &single);

    // A plain 4-task array, merged by the dependent job.
    let out = tmp.path().join("array");
    let t = Instant::now();
    let (array, merge) = submit(&spec, &out, 4, &[]);
    wait_for("the merge job", Duration::from_secs(900), || {
        state(&merge) == "COMPLETED" || state(&merge) == "FAILED" || state(&merge) == "CANCELLED"
    });
    assert_eq!(state(&merge), "COMPLETED", "merge job {merge}; logs in {}", out.join(".tl-run/slurm").display());
    eprintln!("4-task array {array} and its merge: {:.1}s from submit to merged", t.elapsed().as_secs_f64());
    assert_same_row_sets(&single, &out, "4-task array");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    let times: Vec<f64> = manifest["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["timings_seconds"].as_object().unwrap().values().filter_map(|v| v.as_f64()).sum())
        .collect();
    eprintln!("per-task job seconds: {times:?}");

    // A task is cancelled mid-run, then requeued: it resumes from the store and the result is
    // the same. No moment is aimed at: the first task to store a job pauses there for good
    // (TL_RUN_INJECT_PAUSE_AFTER_STORED=1; the marker file names it and keeps every other task,
    // and the requeued one, from pausing), so the cancel lands with exactly one of its jobs stored.
    let spec = long_ioi_spec(tmp.path());
    let single = tmp.path().join("single-long");
    single_run(&spec, &single);
    let out = tmp.path().join("requeued");
    let marker = tmp.path().join("paused-task");
    let (array, merge) = submit(
        &spec,
        &out,
        4,
        &[("TL_RUN_INJECT_PAUSE_AFTER_STORED", "1"), ("TL_RUN_INJECT_PAUSE_MARKER", marker.to_str().unwrap())],
    );
    let mut paused = String::new();
    wait_for("a task to pause after its first stored job", Duration::from_secs(900), || {
        paused = std::fs::read_to_string(&marker).unwrap_or_default();
        !paused.is_empty()
    });
    let index: usize = paused.trim().parse().unwrap_or_else(|_| panic!("the marker names no array task: {paused:?}"));
    let task = format!("{array}_{index}");
    // Its keys (from `tl-run plan --shards 4 --json`) in the shared job store, where each job
    // lands the moment it finishes (its shard manifest is written only per run).
    let keys = shard_keys(&spec, 4, index);
    assert!(keys.len() >= 2, "task {index} has too few jobs to cancel mid-run: {keys:?}");
    let jobs = out.join(".tl-run/jobs");
    let stored = || keys.iter().filter(|k| jobs.join(format!("{k}.parquet")).exists()).count();
    let cancelled_while = state(&task);
    let manifest = out.join(format!("manifest.shard-{index}-of-4.json"));
    let done_before: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap_or_else(|_| "{}".into())).unwrap_or_default();
    sh("scancel", &[&task]);
    wait_for("the cancelled task to end", Duration::from_secs(600), || {
        !matches!(state(&task).as_str(), "RUNNING" | "COMPLETING")
    });
    let stored_at_cancel = stored();
    sh("scontrol", &["requeue", &task]);
    // A requeued job waits two minutes by default before it is eligible again; started within
    // the second of the kill, slurmd refuses it ("job credential revoked"). Release it after
    // a pause.
    std::thread::sleep(Duration::from_secs(3));
    wait_for("the requeued task", Duration::from_secs(900), || {
        let s = state(&task);
        if s == "PENDING" {
            let _ = Command::new("scontrol")
                .args(["update", &format!("jobid={task}"), "StartTime=now"])
                .env("SLURM_CONF", slurm_conf())
                .output();
        }
        s == "COMPLETED" || s == "FAILED"
    });
    assert_eq!(state(&task), "COMPLETED", "requeued task {task}");
    // The cancellation may have made the merge job's afterok dependency unsatisfiable: then
    // merge by hand, as a user would.
    wait_for("the array", Duration::from_secs(900), || (0..4).all(|i| state(&format!("{array}_{i}")) == "COMPLETED"));
    let merged_by_slurm = {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(20)
            && !matches!(state(&merge).as_str(), "COMPLETED" | "FAILED" | "CANCELLED")
        {
            std::thread::sleep(Duration::from_millis(200));
        }
        state(&merge) == "COMPLETED"
    };
    if !merged_by_slurm {
        let _ = Command::new("scancel").arg(&merge).env("SLURM_CONF", slurm_conf()).output();
        let o = Command::new(env!("CARGO_BIN_EXE_tl-run")).args(["merge", out.to_str().unwrap()]).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    eprintln!(
        "task {index} cancelled while {cancelled_while} with {stored_at_cancel} of its {} jobs stored (manifest complete: {}), requeued; merged by the dependent job: {merged_by_slurm}",
        keys.len(), done_before["complete"]
    );
    assert_eq!(cancelled_while, "RUNNING", "the paused task should be running");
    assert_eq!(stored_at_cancel, 1, "the task paused after its first stored job");
    assert_ne!(done_before["complete"], true, "task {index} had already finished");
    // The requeued task read what it had stored before the cancel.
    let log = std::fs::read_to_string(out.join(format!(".tl-run/slurm/{array}_{index}.out"))).unwrap_or_default();
    let last =
        log.lines().rfind(|l| l.starts_with("jobs: ")).unwrap_or_else(|| panic!("the requeued task's log: {log}"));
    let stored: usize = last.split(", ").nth(1).and_then(|w| w.split(' ').next()).and_then(|n| n.parse().ok()).unwrap();
    assert_eq!(stored, 1, "the requeued task reads the one job stored before the pause: {last}");
    eprintln!("requeued task {index}: {last}");
    assert_same_row_sets(&single, &out, "array with a requeued task");
}
