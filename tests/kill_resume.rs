//! A run killed with SIGKILL at 20 random moments (loading, mid-sweep, mid-write; half of them
//! while jobs are being stored) finishes on a rerun with Parquet byte-identical to an
//! uninterrupted run and no temporary file left. Alone in its test binary, so the runs it times
//! are not slowed by other tests.
mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Instant;

use common::*;

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
    // Watching its job store for the first stored job: on a small model most of a run is start-up
    // (libtorch, tokenizer, load, baselines), so half of the kills are aimed at the stretch where
    // jobs are being stored, or resume would be exercised only by chance.
    let t = Instant::now();
    let mut child = run(&reference).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let mut first_store = None;
    while child.try_wait().unwrap().is_none() {
        if first_store.is_none() && std::fs::read_dir(reference.join(".tl-run/jobs")).is_ok_and(|mut d| d.next().is_some()) {
            first_store = Some(t.elapsed());
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let full = t.elapsed();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let first_store = first_store.unwrap_or(full.mul_f64(0.5)).min(full);
    let want = parquet_files(&reference);
    assert!(want.len() >= 9);
    let mut seed: u64 = 0x5eed_2026_1127;
    let (mut killed, mut resumed_jobs, mut mid_sweep, mut report) = (0, 0, 0, Vec::new());
    for trial in 0..20 {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let u = (seed >> 11) as f64 / (1u64 << 53) as f64;
        let out = tmp.path().join(format!("trial-{trial}"));
        let started = Instant::now();
        let mut child = run(&out).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        if trial % 2 == 0 {
            std::thread::sleep(full.mul_f64(u));
        } else {
            // After this trial's own first stored job (its start-up varies by a tenth of a
            // second, as much as the storing stretch lasts), a random part of that stretch.
            while child.try_wait().unwrap().is_none() && !std::fs::read_dir(out.join(".tl-run/jobs")).is_ok_and(|mut d| d.next().is_some()) {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            std::thread::sleep((full - first_store).mul_f64(u));
        }
        let at = started.elapsed();
        let was_running = child.try_wait().unwrap().is_none();
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        killed += was_running as usize;
        let stored_before = std::fs::read_dir(out.join(".tl-run/jobs")).map(|d| d.count()).unwrap_or(0);
        let o = run(&out).output().unwrap();
        assert!(o.status.success(), "trial {trial}: the rerun after a kill at {at:?} failed:\n{}", String::from_utf8_lossy(&o.stderr));
        let (ran, stored) = job_counts(&String::from_utf8_lossy(&o.stdout));
        resumed_jobs += stored;
        mid_sweep += (ran > 0 && stored > 0) as usize;
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
    eprintln!("kill -9 trials (uninterrupted run {:.2}s, first job stored at {:.2}s):\n  {}", full.as_secs_f64(), first_store.as_secs_f64(), report.join("\n  "));
    assert!(killed >= 10, "only {killed} of 20 kills hit a running process; the runs are too short to test resume");
    assert!(resumed_jobs > 0, "no rerun read a stored job: resume was never exercised");
    assert!(mid_sweep >= 3, "only {mid_sweep} of 20 kills landed between the first and the last stored job");
}

