//! Content keys of work jobs. A key is the sha256 of everything a job's rows depend on: the
//! model's files (weights, config, tokenizer) by digest, the weight processing and dtype, the
//! tokens and answers, the corruption and metric, the job's own intervention (kind, options,
//! target, layer) and the engine (tl-run version, commit and binary). Two jobs with one key
//! produce identical rows, so a stored result can stand in for running the job. The run's name
//! is not part of it: a renamed run reuses its rows.
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use sha2::Digest;

use crate::error::{Error, Result};
use crate::experiments::inputs::Tokenized;
use crate::graph::{Plan, Task};
use crate::model::source::ModelFiles;
use crate::spec::{RunKind, Spec};

/// sha256 of a file's bytes, hex.
pub fn file_digest(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Every file of a model that its numbers depend on, with its digest, in a stable order. Files
/// not in the digest cache are hashed in parallel (the shards of a 15 GiB checkpoint took 15 s
/// one after another on a GPU machine's CPU).
pub fn model_digests(files: &ModelFiles) -> Result<Vec<(PathBuf, String)>> {
    use rayon::prelude::*;
    let mut paths: Vec<&PathBuf> = std::iter::once(&files.config)
        .chain(&files.weights)
        .chain(&files.tokenizer)
        .chain(&files.tokenizer_config)
        .collect();
    paths.sort();
    paths.dedup();
    let mut cache = DigestCache::open();
    let looked_up: Vec<(&PathBuf, Known)> =
        paths.into_iter().map(|p| Ok((p, cache.look_up(p)?))).collect::<Result<_>>()?;
    let found: Vec<(&PathBuf, Known, String)> = looked_up
        .into_par_iter()
        .map(|(p, known)| {
            let digest = match &known {
                Known::Digest(d) => d.clone(),
                Known::Unknown(_) => file_digest(p)?,
            };
            Ok((p, known, digest))
        })
        .collect::<Result<_>>()?;
    let mut digests = Vec::with_capacity(found.len());
    for (p, known, digest) in found {
        if let Known::Unknown(id) = known {
            cache.remember(id, &digest);
        }
        digests.push((p.clone(), digest));
    }
    cache.save();
    Ok(digests)
}

/// A file's digest as the cache knows it, or the identity (path, size, mtime) to file it under.
enum Known {
    Digest(String),
    Unknown(String),
}

/// File digests without rereading weights on every plan and run: a hub snapshot file links to
/// a blob named by its sha256; any other file's digest is kept in
/// `~/.cache/tl-run/digests.json` under its path, size and modification time.
struct DigestCache {
    path: Option<PathBuf>,
    known: serde_json::Map<String, serde_json::Value>,
    changed: bool,
}

impl DigestCache {
    fn open() -> DigestCache {
        let dir = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")));
        let path = dir.map(|d| d.join("tl-run").join("digests.json"));
        let known = path
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        DigestCache { path, known, changed: false }
    }

    fn look_up(&self, file: &Path) -> Result<Known> {
        if let Some(blob) =
            std::fs::read_link(file).ok().and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
        {
            if blob.len() == 64
                && blob.bytes().all(|b| b.is_ascii_hexdigit())
                && file.parent().is_some_and(|d| d.parent().is_some_and(|s| s.ends_with("snapshots")))
            {
                return Ok(Known::Digest(blob));
            }
        }
        let meta = std::fs::metadata(file).map_err(|e| Error::io(file, e))?;
        let mtime =
            meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
        let id = format!(
            "{}:{}:{mtime}",
            std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf()).display(),
            meta.len()
        );
        Ok(match self.known.get(&id).and_then(|v| v.as_str()) {
            Some(d) => Known::Digest(d.to_string()),
            None => Known::Unknown(id),
        })
    }

    fn remember(&mut self, id: String, digest: &str) {
        self.known.insert(id, digest.into());
        self.changed = true;
    }

    /// Best effort: a cache that cannot be written only costs rehashing next time.
    fn save(&self) {
        if let (true, Some(p)) = (self.changed, &self.path) {
            if let Ok(text) = serde_json::to_string(&self.known) {
                let _ = crate::output::atomic::write_bytes(p, text.as_bytes());
            }
        }
    }
}

/// What identifies the code computing a result: the version and commit it was built from, and
/// the binary itself (its size and modification time), so a rebuilt development binary never
/// reads results an earlier build stored.
pub fn engine_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        let exe = std::env::current_exe().ok().and_then(|p| std::fs::metadata(p).ok()).map(|m| {
            let mtime = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            format!("{}-{mtime}", m.len())
        });
        format!(
            "{}+{}+{}",
            env!("CARGO_PKG_VERSION"),
            option_env!("TL_RUN_GIT_COMMIT").unwrap_or("unknown"),
            exe.unwrap_or_default()
        )
    })
}

fn sha256_json(v: &serde_json::Value) -> String {
    format!("{:x}", sha2::Sha256::digest(v.to_string().as_bytes()))
}

/// Sets the key of every work job of `plan`.
pub fn assign(plan: &mut Plan, spec: &Spec, toks: Option<&Tokenized>, digests: &[(PathBuf, String)]) -> Result<()> {
    let base = serde_json::json!({
        "engine": engine_id(),
        "model_files": digests.iter().map(|(_, d)| d).collect::<Vec<_>>(),
        "processing": spec.model.processing,
        "dtype": format!("{:?}", spec.model.kind()?),
        "tokens": toks.map(|t| &t.record),
        "answers": toks.map(|t| (&t.correct, &t.incorrect)),
        "corruption": spec.corruption,
        "metric": spec.metric,
    });
    let base = sha256_json(&base);
    for job in plan.jobs.iter_mut().filter(|j| j.task.is_work()) {
        let what = match job.task {
            Task::Patch { run, target, layer } => {
                let RunKind::ActivationPatching { targets } = &spec.runs[run].kind else {
                    unreachable!("patch jobs come from activation_patching runs")
                };
                serde_json::json!({"task": "patch", "target": targets[target], "layer": layer})
            }
            task => {
                let run = &spec.runs[task.run().expect("work jobs belong to a run")];
                let dataset = match &run.kind {
                    RunKind::Ablation(a) => a.dataset.as_deref().map(file_digest).transpose()?,
                    _ => None,
                };
                serde_json::json!({"task": "whole", "kind": run.kind, "layers": run.layers, "dataset": dataset})
            }
        };
        job.key = Some(sha256_json(&serde_json::json!({"base": base, "job": what})));
    }
    Ok(())
}
