//! A run killed with SIGKILL finishes on a rerun with the uninterrupted run's rows and no
//! temporary file left. Ten kills land at known points of the progress: the store's writer pauses
//! once exactly k jobs are stored (TL_RUN_INJECT_PAUSE_AFTER_STORED, k spread over the run), the
//! test sees the k files and kills, and the rerun must read exactly those k jobs and run the rest.
//! Ten more land at random moments of the whole run (loading, sweeps, the final writes), where
//! nothing is aimed and only the outcome is checked.
mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

fn stored_jobs(out: &Path) -> usize {
    std::fs::read_dir(out.join(".tl-run/jobs"))
        .map(|d| d.flatten().filter(|e| e.path().extension().is_some_and(|x| x == "parquet")).count())
        .unwrap_or(0)
}

#[test]
fn killed_at_known_points_and_at_random_moments_a_rerun_finishes_with_the_same_rows_and_no_temporary_file() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = long_ioi_spec(tmp.path());
    let model = fixture("gpt2-tiny").display().to_string();
    let run = |out: &Path| {
        let mut c = tl_run();
        c.args(["run", spec.to_str().unwrap(), "--model-id", &model, "--out", out.to_str().unwrap(), "--quiet"])
            .env("TL_RUN_BATCH_FLOATS", LONG_BATCH_FLOATS);
        c
    };
    let reference = tmp.path().join("reference");
    let t = Instant::now();
    let o = run(&reference).output().unwrap();
    let full = t.elapsed();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (total, _) = job_counts(&String::from_utf8_lossy(&o.stdout));
    assert!(total >= 10, "{total} jobs: too few to kill between them");
    let want = parquet_files(&reference);
    assert!(want.len() >= 9);
    let mut seed: u64 = 0x5eed_2026_1207;
    let mut report = Vec::new();
    for trial in 0..20 {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let u = (seed >> 11) as f64 / (1u64 << 53) as f64;
        let out = tmp.path().join(format!("trial-{trial}"));
        // Odd trials: paused after k of the `total` jobs are stored, k = 1 .. total - 1.
        let k = (trial % 2 == 1).then(|| 1 + (trial / 2) * (total - 2) / 9);
        let mut cmd = run(&out);
        if let Some(k) = k {
            cmd.env("TL_RUN_INJECT_PAUSE_AFTER_STORED", k.to_string());
        }
        let started = Instant::now();
        let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        match k {
            Some(k) => {
                while stored_jobs(&out) < k {
                    assert!(
                        child.try_wait().unwrap().is_none(),
                        "trial {trial}: the run ended before storing {k} jobs"
                    );
                    assert!(
                        started.elapsed() < Duration::from_secs(600),
                        "trial {trial}: {k} jobs not stored in 10 minutes"
                    );
                    std::thread::sleep(Duration::from_millis(5));
                }
                assert!(child.try_wait().unwrap().is_none(), "trial {trial}: the paused run ended");
            }
            None => std::thread::sleep(full.mul_f64(u)),
        }
        let at = started.elapsed();
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let stored_before = stored_jobs(&out);
        if let Some(k) = k {
            assert_eq!(
                stored_before, k,
                "trial {trial}: the writer paused after {k} jobs, yet {stored_before} are stored"
            );
        }
        let o = run(&out).output().unwrap();
        assert!(
            o.status.success(),
            "trial {trial}: the rerun after a kill at {at:?} failed:\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let (ran, stored) = job_counts(&String::from_utf8_lossy(&o.stdout));
        if k.is_some() {
            assert_eq!(
                (ran, stored),
                (total - stored_before, stored_before),
                "trial {trial}: the rerun must read every stored job and run the rest"
            );
        }
        report.push(format!(
            "{:.2}s{}: {stored_before} stored before, rerun {ran} ran + {stored} read",
            at.as_secs_f64(),
            k.map(|k| format!(" (paused at {k})")).unwrap_or_default()
        ));
        // A rerun that redid every job batched as the uninterrupted run did: the same bytes. One
        // that resumed batches the remaining cells differently: the same rows to rounding.
        if stored == 0 || ran == 0 {
            assert!(
                parquet_files(&out) == want,
                "trial {trial} (killed at {at:?}, nothing resumed): files are not byte-identical"
            );
        } else {
            assert_same_rows(&reference, &out, REBATCHED_REL);
        }
        let temps = temp_files(&out);
        assert!(temps.is_empty(), "trial {trial} (killed at {at:?}): temporary files left: {temps:?}");
        let top: Vec<String> = outputs(&out).keys().map(|p| p.display().to_string()).collect();
        assert!(
            top.iter().all(|p| p.ends_with(".parquet") || p == "manifest.json"),
            "trial {trial}: unexpected files {top:?}"
        );
    }
    eprintln!(
        "kill -9 trials ({total} jobs, uninterrupted run {:.2}s):\n  {}",
        full.as_secs_f64(),
        report.join("\n  ")
    );
}
