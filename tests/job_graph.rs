//! The job graph as the executor: stored jobs are reused on a rerun and only changed jobs run
//! again, shards merge to the single-process result, device replicas give the one-device rows,
//! and a batch that runs out of memory is halved. (Killing runs: tests/kill_resume.rs.)
//! Where the same batches run (a rerun, --fresh, a model split by layers) the files are
//! byte-identical; where cells are batched differently (shards, replicas, halving, the staircase,
//! one patching job redone alone) the rows are equal to rounding (`assert_same_rows`).
mod common;

use std::path::Path;
use std::process::Command;

use common::*;

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
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    let load = manifest["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["name"].as_str().unwrap().starts_with("load model"))
        .unwrap();
    assert_eq!(load["status"], "skipped", "a rerun with every job stored loads no weights");

    // A stored job whose file was damaged is redone, with a plain-text warning naming it (no
    // terminal colours in a log file).
    // A patching job's (the job keys change with every build, so it is picked by the plan, not
    // by the store's order): redone alone, not in its layer's group of shared forwards, its
    // cells are batched differently, so its rows equal the first run's to rounding.
    let plan: serde_json::Value = serde_json::from_str(&ok(&["plan", &ioi(), "--model-id", &model, "--json"])).unwrap();
    let key = plan.as_array().unwrap().iter().find(|j| j["task"] == "patch" && j["layer"] == 1).unwrap()["key"]
        .as_str()
        .unwrap()
        .to_string();
    let damaged = out.join(".tl-run/jobs").join(format!("{key}.parquet"));
    assert!(damaged.is_file(), "{} is not in the store", damaged.display());
    std::fs::write(&damaged, b"junk").unwrap();
    let o2 = tl_run().args(["run", &ioi(), "--model-id", &model, "--out", &o, "--quiet"]).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&o2.stdout), String::from_utf8_lossy(&o2.stderr));
    assert!(o2.status.success(), "{stderr}");
    assert_eq!(job_counts(&stdout), (1, ran - 1), "only the damaged job runs again");
    assert!(stderr.contains(&format!("stored job {} is unreadable and will be redone", damaged.display())), "{stderr}");
    assert!(!stderr.contains('\u{1b}'), "terminal escapes in a piped log: {stderr:?}");
    let first_run = tmp.path().join("first-run");
    std::fs::create_dir_all(&first_run).unwrap();
    for (p, bytes) in &files {
        std::fs::write(first_run.join(p), bytes).unwrap();
    }
    assert_same_rows(&first_run, &out, REBATCHED_REL);

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
    // `plan --shards 3 --json` names each work job's shard: after shard i the job store holds
    // exactly the keys of shards 0..=i.
    let plan: serde_json::Value =
        serde_json::from_str(&ok(&["plan", &ioi(), "--model-id", &model, "--shards", "3", "--json"])).unwrap();
    let shard_keys = |i: usize| -> std::collections::BTreeSet<String> {
        plan.as_array()
            .unwrap()
            .iter()
            .filter(|j| j["shard"] == i && j["key"].is_string())
            .map(|j| j["key"].as_str().unwrap().to_string())
            .collect()
    };
    let mut expected = std::collections::BTreeSet::new();
    let mut ran = 0;
    for i in 0..3 {
        let s = ok(&[
            "run",
            &ioi(),
            "--model-id",
            &model,
            "--out",
            sharded.to_str().unwrap(),
            "--quiet",
            "--shard",
            &format!("{i}/3"),
        ]);
        ran += job_counts(&s).0;
        assert!(!shard_keys(i).is_empty(), "shard {i} has no keyed job");
        expected.extend(shard_keys(i));
        let stored: std::collections::BTreeSet<String> = std::fs::read_dir(sharded.join(".tl-run/jobs"))
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".parquet").map(str::to_string))
            .collect();
        assert_eq!(stored, expected, "the store after shard {i}");
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
        assert!(
            line.starts_with(&format!("{run} {n} {n} ")),
            "{run}: the parts read as one dataset should have the single run's {n} rows: {line}"
        );
    }

    let merged = ok(&["merge", sharded.to_str().unwrap()]);
    assert!(merged.contains("3 shards"), "{merged}");
    // The shards batch their jobs' cells differently from the single run: the same rows to
    // rounding (the BLAS's results depend on the batch's size on some CPUs).
    let (want, got) = (parquet_files(&single), parquet_files(&sharded));
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "merge leaves exactly the single-file layout"
    );
    assert_same_rows(&single, &sharded, REBATCHED_REL);
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(sharded.join("manifest.json")).unwrap()).unwrap();
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
fn two_device_replicas_run_jobs_concurrently_and_give_the_one_device_files() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("gpt2-tiny").display().to_string();
    let (one, two, spec_key) = (tmp.path().join("one"), tmp.path().join("two"), tmp.path().join("spec-key"));
    ok(&["run", &ioi(), "--model-id", &model, "--out", one.to_str().unwrap(), "--quiet"]);
    let s =
        ok(&["run", &ioi(), "--model-id", &model, "--out", two.to_str().unwrap(), "--quiet", "--devices", "cpu,cpu"]);
    assert!(job_counts(&s).0 >= 15, "{s}");
    // The same through the spec's model.devices.
    let text = std::fs::read_to_string(ioi()).unwrap().replace("[model]\n", "[model]\ndevices = [\"cpu\", \"cpu\"]\n");
    let spec = tmp.path().join("devices.toml");
    std::fs::write(&spec, text).unwrap();
    ok(&["run", spec.to_str().unwrap(), "--model-id", &model, "--out", spec_key.to_str().unwrap(), "--quiet"]);
    for dir in [&two, &spec_key] {
        assert_same_rows(&one, dir, REBATCHED_REL);
        let manifest: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
        assert_eq!(manifest["device"], "[Cpu, Cpu]");
    }
    // Bad device lists are named with their line and key.
    for (devices, want) in [("[]", "model.devices: is empty"), ("[\"cpu\", \"tpu\"]", "unknown device 'tpu'")] {
        let text =
            std::fs::read_to_string(ioi()).unwrap().replace("[model]\n", &format!("[model]\ndevices = {devices}\n"));
        std::fs::write(&spec, text).unwrap();
        let e = fails(&["validate", spec.to_str().unwrap(), "--model-id", &model]);
        assert!(e.contains(want) && e.contains(":4:"), "{devices}: {e}");
    }
}

/// ioi.toml with its heads run patching every pattern entry, [layer, head, dest, src]: hundreds
/// of cells per layer.
fn pattern_spec(dir: &Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(ioi()).unwrap().replace(
        "hooks = [\"z\", \"v\", \"pattern\"]\nover = [\"layer\", \"head\"]",
        "hooks = [\"pattern\"]\nover = [\"layer\", \"head\", \"dest\", \"src\"]",
    );
    let spec = dir.join("pattern.toml");
    std::fs::write(&spec, text).unwrap();
    spec
}

#[test]
fn a_batch_that_runs_out_of_memory_is_halved_and_retried_with_the_same_results() {
    // Pattern patching over [layer, head, dest, src]: hundreds of cells per layer, all in one
    // batch under a 4 GiB budget, which the injected limit (64 rows = 8 cells of 8 prompts)
    // refuses as CUDA would: the sweep halves down to 8 cells and records it.
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("gpt2-tiny").display().to_string();
    let spec = pattern_spec(tmp.path());
    let (plain, halved) = (tmp.path().join("plain"), tmp.path().join("halved"));
    ok(&["run", spec.to_str().unwrap(), "--model-id", &model, "--out", plain.to_str().unwrap(), "--quiet"]);
    let o = tl_run()
        .args([
            "run",
            spec.to_str().unwrap(),
            "--model-id",
            &model,
            "--out",
            halved.to_str().unwrap(),
            "--quiet",
            "--batch-memory",
            "4GiB",
        ])
        .env("TL_RUN_INJECT_OOM_ROWS", "64")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(halved.join("manifest.json")).unwrap()).unwrap();
    let sweep = &manifest["runs"]["heads"]["sweeps"][0];
    assert!(sweep["oom_halvings"].as_u64().unwrap() >= 2, "{sweep}");
    assert!(sweep["cells_per_forward"].as_u64().unwrap() <= 8, "{sweep}");
    assert_same_rows(&plain, &halved, REBATCHED_REL);
    // A batch of one cell that does not fit is an error naming the job, not a loop.
    let o = tl_run()
        .args([
            "run",
            spec.to_str().unwrap(),
            "--model-id",
            &model,
            "--out",
            tmp.path().join("none").to_str().unwrap(),
            "--quiet",
        ])
        .env("TL_RUN_INJECT_OOM_ROWS", "4")
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("out of memory") && e.contains("job ["), "{e}");
}

/// The staircase schedule (a GPU's default: the patching jobs of every layer in one forward whose
/// batch grows as layers are reached) and the by-position one (a CPU's) give the by-layer
/// schedule's rows, on every file of ioi.toml; out of memory, a staircase falls back to its layers one by one, halving as needed.
#[test]
fn the_staircase_schedule_gives_the_by_layer_rows_and_falls_back_out_of_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("gpt2-tiny").display().to_string();
    let run = |spec: &str, out: &Path, schedule: &str, oom_rows: Option<&str>| {
        let mut c = tl_run();
        c.args(["run", spec, "--model-id", &model, "--out", out.to_str().unwrap(), "--quiet"])
            .env("TL_RUN_PATCH_SCHEDULE", schedule);
        if let Some(rows) = oom_rows {
            c.env("TL_RUN_INJECT_OOM_ROWS", rows);
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{schedule}: {}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap()
    };
    // Every column of every file (attribution's verified cells, `patched`, are patched through
    // the same schedules).
    let same_rows = |a: &Path, b: &Path| assert_same_rows(a, b, REBATCHED_REL);
    let (by_layer, staircase) = (tmp.path().join("by-layer"), tmp.path().join("staircase"));
    let manifest = run(&ioi(), &by_layer, "by_layer", None);
    let shared = |m: &serde_json::Value| m["runs"]["resid"]["sweeps"][0]["forwards_shared_with_jobs"].as_u64().unwrap();
    // By layer, each of gpt2-tiny's 2 layers is one group of its 6 targets.
    assert_eq!(shared(&manifest), 5);
    let manifest = run(&ioi(), &staircase, "staircase", None);
    // As a staircase, the jobs of both layers (and of the heads run) are one group.
    assert!(shared(&manifest) >= 11, "{}", manifest["runs"]["resid"]);
    same_rows(&by_layer, &staircase);
    // By position (the CPU's default): each position's cells of every layer share a staircase
    // that computes only the positions from theirs on; the same rows with less arithmetic.
    let computed = |m: &serde_json::Value, run: &str| -> u64 {
        m["runs"][run]["sweeps"].as_array().unwrap().iter().map(|s| s["row_position_layers"].as_u64().unwrap()).sum()
    };
    let by_position = tmp.path().join("by-position");
    let positions = run(&ioi(), &by_position, "by_position", None);
    same_rows(&by_layer, &by_position);
    let layers: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(by_layer.join("manifest.json")).unwrap()).unwrap();
    assert!(
        computed(&positions, "resid") * 10 < computed(&layers, "resid") * 8,
        "by position {} vs by layer {} rows x positions x layers",
        computed(&positions, "resid"),
        computed(&layers, "resid")
    );
    // Heads over every position cannot start later: the same work.
    assert_eq!(computed(&positions, "heads"), computed(&layers, "heads"));

    // Hundreds of pattern cells per layer: the staircase of both layers is refused by the
    // injected limit, and each layer then halves down to 8 cells.
    let spec = pattern_spec(tmp.path());
    let (plain, halved) = (tmp.path().join("plain"), tmp.path().join("halved"));
    run(spec.to_str().unwrap(), &plain, "by_layer", None);
    let manifest = run(spec.to_str().unwrap(), &halved, "staircase", Some("64"));
    let sweep = &manifest["runs"]["heads"]["sweeps"][0];
    assert!(
        sweep["oom_halvings"].as_u64().unwrap() >= 2 && sweep["cells_per_forward"].as_u64().unwrap() <= 8,
        "{sweep}"
    );
    same_rows(&plain, &halved);
}

#[test]
fn a_model_split_by_layers_sees_every_hook_and_gives_the_one_device_rows() {
    let tmp = tempfile::tempdir().unwrap();
    // Every hook of a split model holds the one-device activation (families with learned,
    // rotary and ALiBi positions, local attention and softcaps).
    for family in ["gpt2-tiny", "llama-tiny", "gemma2-tiny", "bloom-tiny", "neox-tiny"] {
        let model = fixture(family).display().to_string();
        let (one, split) = (tmp.path().join(format!("{family}-one.st")), tmp.path().join(format!("{family}-split.st")));
        let prompts = ["--prompt", "When John and Mary went to the shops", "--prompt", "the bag"];
        ok(&[&["cache", &model, "--out", one.to_str().unwrap()][..], &prompts].concat());
        ok(&[&["cache", &model, "--out", split.to_str().unwrap(), "--split", "cpu,cpu,cpu"][..], &prompts].concat());
        let (a, b) = (std::fs::read(&one).unwrap(), std::fs::read(&split).unwrap());
        let (a, b) =
            (safetensors::SafeTensors::deserialize(&a).unwrap(), safetensors::SafeTensors::deserialize(&b).unwrap());
        let mut names = a.names();
        names.sort();
        let mut other = b.names();
        other.sort();
        assert_eq!(names, other, "{family}: hook names");
        for n in names {
            assert_eq!(a.tensor(n).unwrap().data(), b.tensor(n).unwrap().data(), "{family}: {n} differs when split");
        }
    }
    // Every experiment kind on a split model: the one-device files.
    let model = fixture("gpt2-tiny").display().to_string();
    let (one, split) = (tmp.path().join("one"), tmp.path().join("split"));
    ok(&["run", &ioi(), "--model-id", &model, "--out", one.to_str().unwrap(), "--quiet"]);
    ok(&[
        "run",
        &ioi(),
        "--model-id",
        &model,
        "--out",
        split.to_str().unwrap(),
        "--quiet",
        "--devices",
        "cpu,cpu",
        "--split-layers",
    ]);
    assert_eq!(parquet_files(&split), parquet_files(&one));
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(split.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["model"]["layer_devices"], serde_json::json!(["Cpu", "Cpu"]));
    let e = fails(&["run", &ioi(), "--model-id", &model, "--out", split.to_str().unwrap(), "--split-layers"]);
    assert!(e.contains("--split-layers needs --devices"), "{e}");
    let spec = tmp.path().join("split.toml");
    std::fs::write(
        &spec,
        std::fs::read_to_string(ioi()).unwrap().replace("[model]\n", "[model]\nsplit_layers = true\n"),
    )
    .unwrap();
    let e = fails(&["validate", spec.to_str().unwrap(), "--model-id", &model]);
    assert!(e.contains(":4:") && e.contains("model.split_layers: needs model.devices"), "{e}");
}

/// The patching jobs that share a layer's forwards are stored the moment that group finishes, not
/// when the executor's loop reaches each of them: a run paused after as many stored jobs as layer
/// 0 has patching jobs holds exactly layer 0's jobs of both patching runs, and a rerun after a
/// kill there runs only the rest.
#[test]
fn a_group_of_patching_jobs_is_stored_when_the_group_finishes() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("gpt2-tiny").display().to_string();
    let plan: serde_json::Value = serde_json::from_str(&ok(&["plan", &ioi(), "--model-id", &model, "--json"])).unwrap();
    let layer0: std::collections::BTreeSet<String> = plan
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["task"] == "patch" && j["layer"] == 0)
        .map(|j| j["key"].as_str().unwrap().to_string())
        .collect();
    let runs: std::collections::BTreeSet<u64> = plan
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["task"] == "patch" && j["layer"] == 0)
        .map(|j| j["run"].as_u64().unwrap())
        .collect();
    assert!(layer0.len() >= 6 && runs.len() == 2, "layer 0 has {} patching jobs of runs {runs:?}", layer0.len());
    let out = tmp.path().join("out");
    let mut child = tl_run()
        .args(["run", &ioi(), "--model-id", &model, "--out", out.to_str().unwrap(), "--quiet"])
        .env("TL_RUN_INJECT_PAUSE_AFTER_STORED", layer0.len().to_string())
        .env("TL_RUN_PATCH_SCHEDULE", "by_layer")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stored = || -> std::collections::BTreeSet<String> {
        std::fs::read_dir(out.join(".tl-run/jobs"))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().to_str()?.strip_suffix(".parquet").map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let t = std::time::Instant::now();
    while stored().len() < layer0.len() {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before storing {} jobs", layer0.len());
        assert!(t.elapsed() < std::time::Duration::from_secs(600));
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(stored(), layer0, "the first stored jobs are layer 0's group, of both runs");
    let (ran, read) =
        job_counts(&ok(&["run", &ioi(), "--model-id", &model, "--out", out.to_str().unwrap(), "--quiet"]));
    assert_eq!(read, layer0.len(), "the rerun reads the stored group");
    assert!(ran >= 10, "{ran}");
}

/// Off a terminal (a Slurm or CI log) a run logs progress lines: jobs done, the share of the
/// work, the time elapsed and left; the last after the last job. `--quiet` logs none.
#[test]
fn a_run_off_a_terminal_logs_progress_lines_with_the_time_left() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = repo_root().join("experiments/ioi.toml");
    let run = |quiet: bool| {
        let mut cmd = tl_run();
        cmd.args(["run", spec.to_str().unwrap(), "--model-id", fixture("gpt2-tiny").to_str().unwrap(), "--fresh"]);
        cmd.args(["--out", tmp.path().join("out").to_str().unwrap()]);
        if quiet {
            cmd.arg("--quiet");
        }
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let err = run(false);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("tl-run: ")).collect();
    assert!(lines.len() >= 2, "a line after the first job and after the last:\n{err}");
    let last = lines.last().unwrap();
    assert!(last.contains("100% of the work") && last.contains("about 0s left"), "{last}");
    let (done, of) = last["tl-run: ".len()..].split_once(" jobs").unwrap().0.split_once('/').unwrap();
    assert_eq!(done, of, "{last}");
    assert!(!run(true).contains("tl-run: "), "--quiet logs no progress");
}

/// A job's key holds only what its kind reads: a changed metric redoes every job that reads the
/// answers but not the head scores over the prompts; a run's own `per_prompt` writes prompt rows
/// for that run alone and redoes only its jobs.
#[test]
fn a_job_is_redone_only_when_what_it_reads_changed() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, model) = (tmp.path().join("out"), fixture("gpt2-tiny").display().to_string());
    let o = out.display().to_string();
    let first = ok(&["run", &ioi(), "--model-id", &model, "--out", &o, "--quiet"]);
    let (ran, _) = job_counts(&first);
    let scores = std::fs::read(out.join("head-scores.parquet")).unwrap();
    let text = std::fs::read_to_string(ioi()).unwrap();
    let write = |name: &str, text: String| {
        let spec = tmp.path().join(name);
        std::fs::write(&spec, text).unwrap();
        spec.display().to_string()
    };
    let logprob = text.replace("kind = \"logit_diff\"", "kind = \"logprob\"");
    assert_ne!(logprob, text);
    let again = ok(&["run", &write("logprob.toml", logprob), "--model-id", &model, "--out", &o, "--quiet"]);
    assert_eq!(job_counts(&again), (ran - 1, 1), "only head-scores (over the prompts, no answers) is stored");
    assert_eq!(std::fs::read(out.join("head-scores.parquet")).unwrap(), scores);

    let per_prompt = text.replace("name = \"dla-layers\"", "name = \"dla-layers\"\nper_prompt = true");
    assert_ne!(per_prompt, text);
    let third = ok(&["run", &write("per-prompt.toml", per_prompt), "--model-id", &model, "--out", &o, "--quiet"]);
    // Against the first run's stored jobs (the spec is the original but for per_prompt).
    assert_eq!(job_counts(&third), (1, ran - 1), "against the first run, only the dla-layers job's key changed");
    let dla = Table::read(&out.join("dla-layers.parquet"));
    let prompts: std::collections::BTreeSet<i64> = (0..dla.len()).filter_map(|i| dla.int("prompt", i)).collect();
    assert_eq!(prompts, (0..8).collect(), "dla-layers has rows for each of the 8 prompts");
    let heads = Table::read(&out.join("dla-heads.parquet"));
    assert!((0..heads.len()).all(|i| heads.int("prompt", i).is_none()), "dla-heads has mean rows only");
}
