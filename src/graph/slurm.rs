//! Slurm arrays: an sbatch script whose task i runs shard i of n (from SLURM_ARRAY_TASK_ID and
//! SLURM_ARRAY_TASK_COUNT), requeueable (a preempted or requeued task resumes from the job
//! store), and a merge job that joins the parts once every task has succeeded.
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::kinds::Spec;

#[derive(Debug, Clone, Default)]
pub struct ArrayOptions {
    pub tasks: usize,
    pub gpus_per_task: Option<usize>,
    pub cpus_per_task: Option<usize>,
    pub partition: Option<String>,
    pub time: Option<String>,
}

fn quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "/._-=:+,@".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Where the script and the tasks' logs go.
pub fn slurm_dir(output_dir: &Path) -> PathBuf {
    absolute(output_dir).join(".tl-run").join("slurm")
}

/// The sbatch script: `exe run SPEC ARGS` in `cwd` for every task of an array of `opts.tasks`.
pub fn script_text(
    spec: &Spec,
    exe: &Path,
    spec_path: &Path,
    args: &[String],
    cwd: &Path,
    opts: &ArrayOptions,
) -> Result<String> {
    if opts.tasks == 0 {
        return Err(Error::Config("--tasks must be at least 1".into()));
    }
    let logs = slurm_dir(&spec.output_dir);
    let mut s = String::from("#!/bin/bash\n");
    let name: String =
        spec.name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    s.push_str(&format!("#SBATCH --job-name=tl-run-{name}\n"));
    s.push_str(&format!("#SBATCH --array=0-{}\n", opts.tasks - 1));
    s.push_str(&format!("#SBATCH --output={}\n", logs.join("%A_%a.out").display()));
    s.push_str("#SBATCH --open-mode=append\n");
    // Preemption or `scontrol requeue` starts the task again; it resumes from the job store.
    s.push_str("#SBATCH --requeue\n");
    s.push_str("#SBATCH --ntasks=1\n");
    if let Some(g) = opts.gpus_per_task {
        s.push_str(&format!("#SBATCH --gpus-per-task={g}\n"));
    }
    if let Some(c) = opts.cpus_per_task {
        s.push_str(&format!("#SBATCH --cpus-per-task={c}\n"));
    }
    if let Some(p) = &opts.partition {
        s.push_str(&format!("#SBATCH --partition={p}\n"));
    }
    if let Some(t) = &opts.time {
        s.push_str(&format!("#SBATCH --time={t}\n"));
    }
    s.push_str("# Task i runs shard i of the array's task count (SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT);\n");
    s.push_str("# CUDA_VISIBLE_DEVICES (set by Slurm for --gpus-per-task) picks the GPU that `cuda` names.\n");
    s.push_str("set -euo pipefail\n");
    s.push_str(&format!("cd {}\n", quote(&cwd.display().to_string())));
    let mut cmd =
        vec![quote(&exe.display().to_string()), "run".into(), quote(&absolute(spec_path).display().to_string())];
    cmd.extend(args.iter().map(|a| quote(a)));
    cmd.push("--quiet".into());
    s.push_str(&format!("exec {}\n", cmd.join(" ")));
    Ok(s)
}

/// Writes the script to `<output.dir>/.tl-run/slurm/array.sbatch`.
pub fn write_script(spec: &Spec, spec_path: &Path, args: &[String], opts: &ArrayOptions) -> Result<PathBuf> {
    let exe = std::env::current_exe().map_err(|e| Error::Other(format!("cannot find the tl-run binary: {e}")))?;
    let cwd = std::env::current_dir().map_err(|e| Error::Other(format!("no current directory: {e}")))?;
    let text = script_text(spec, &exe, spec_path, args, &cwd, opts)?;
    let dir = slurm_dir(&spec.output_dir);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let path = dir.join("array.sbatch");
    crate::output::atomic::write_bytes(&path, text.as_bytes())?;
    Ok(path)
}

fn sbatch(args: &[String]) -> Result<String> {
    let out = std::process::Command::new("sbatch")
        .args(args)
        .output()
        .map_err(|e| Error::Other(format!("cannot run sbatch ({e}); is Slurm installed and on PATH?")))?;
    if !out.status.success() {
        return Err(Error::Other(format!(
            "sbatch {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    // --parsable prints "jobid" or "jobid;cluster".
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.trim().split(';').next().unwrap_or("").to_string())
}

/// Submits the array, then a job that merges the shards once every task succeeded. Returns
/// both job ids.
pub fn submit(script: &Path, output_dir: &Path, partition: Option<&str>) -> Result<(String, String)> {
    let array = sbatch(&["--parsable".into(), script.display().to_string()])?;
    let exe = std::env::current_exe().map_err(|e| Error::Other(format!("cannot find the tl-run binary: {e}")))?;
    let dir = absolute(output_dir);
    let mut args = vec![
        "--parsable".to_string(),
        format!("--dependency=afterok:{array}"),
        "--job-name=tl-run-merge".into(),
        format!("--output={}", slurm_dir(output_dir).join("merge-%j.out").display()),
    ];
    if let Some(p) = partition {
        args.push(format!("--partition={p}"));
    }
    args.push(format!("--wrap={} merge {}", quote(&exe.display().to_string()), quote(&dir.display().to_string())));
    let merge = sbatch(&args)?;
    Ok((array, merge))
}
