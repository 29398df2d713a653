//! The run's manifest (`manifest.json`, or a shard's): the spec, the model and its weights'
//! digests, every job's status and time, each run's note and file, NaN findings. Rewritten after
//! every run so that a failure or a kill leaves one that describes what was finished.
use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::analysis::clean_corrupted::CleanCorrupted;
use crate::engine::nonfinite;
use crate::error::{Error, Result};
use crate::graph::keys;
use crate::graph::shard::Shard;
use crate::graph::source::ModelSource;
use crate::graph::status::JobStatus;
use crate::kinds::shared::inputs::Tokenized;
use crate::kinds::Spec;
use crate::model::Model;
use crate::output::atomic;

/// One job as the manifest records it.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct JobRecord {
    pub id: usize,
    pub name: String,
    pub key: Option<String>,
    /// ran | stored (its result read from the store) | skipped (no job that reads it had to
    /// run) | other shard
    pub status: JobStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shard: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows: Option<usize>,
    pub seconds: f64,
}

/// What the manifest records, written after every run (and when a run stops on a NaN).
pub(crate) struct Record<'a> {
    pub spec: &'a Spec,
    pub model: serde_json::Value,
    pub device: String,
    pub dtype: String,
    pub path: PathBuf,
    pub shard: Option<Shard>,
    pub jobs: Vec<JobRecord>,
    pub nonfinite: Vec<nonfinite::Finding>,
    /// Set when the last job has run (what `merge` waits for).
    pub complete: bool,
}

impl<'a> Record<'a> {
    pub fn new(spec: &'a Spec, source: &ModelSource, digests: &[(PathBuf, String)], shard: Option<Shard>) -> Self {
        let files = source.files();
        let is_weight = |p: &PathBuf| files.is_some_and(|f| f.weights.contains(p));
        let weights: Vec<serde_json::Value> = digests
            .iter()
            .filter(|(p, _)| is_weight(p))
            .map(|(p, d)| serde_json::json!({"file": p.display().to_string(), "sha256": d}))
            .collect();
        let model = serde_json::json!({
            "id": spec.model.id,
            "family": source.cfg().family,
            "resolved_commit": files.and_then(|f| f.commit.clone()),
            "weights": weights,
            "processing": spec.model.processing,
        });
        let (device, dtype) = match source {
            ModelSource::Loaded(m) => (format!("{:?}", m.device), format!("{:?}", m.kind)),
            ModelSource::Lazy { .. } => (
                spec.model.device.clone(),
                spec.model.kind().map(|k| format!("{k:?}")).unwrap_or_else(|_| spec.model.dtype.clone()),
            ),
        };
        let name = shard.map_or_else(|| "manifest.json".to_string(), |s| s.manifest_name());
        Record {
            spec,
            model,
            device,
            dtype,
            path: spec.output_dir.join(name),
            shard,
            jobs: Vec::new(),
            nonfinite: Vec::new(),
            complete: false,
        }
    }

    /// What only a loaded model tells: the device and dtype it runs in, its processing.
    pub fn loaded(&mut self, model: &Model) {
        self.device = format!("{:?}", model.device);
        self.dtype = format!("{:?}", model.kind);
        self.model["processing"] = serde_json::to_value(model.processing).unwrap_or_default();
        self.model["layer_devices"] = model.layer_devices.iter().map(|d| format!("{d:?}")).collect();
    }

    pub fn write(
        &self,
        runs: &serde_json::Map<String, serde_json::Value>,
        timings: &BTreeMap<String, f64>,
        prep: Option<&CleanCorrupted>,
        toks: Option<&Tokenized>,
    ) -> Result<()> {
        let spec = self.spec;
        let metric = match prep {
            Some(p) => {
                serde_json::json!({"kind": spec.metric.kind, "noise_samples_per_prompt": spec.corruption.samples(), "normalize": spec.metric.normalize,
                       "clean_baseline": p.clean_baseline(), "corrupted_baseline": p.corrupted_baseline(),
                       "clean_per_prompt": p.clean_per_prompt, "corrupted_per_prompt": p.corrupted_per_prompt})
            }
            None => serde_json::json!({"kind": spec.metric.kind, "normalize": spec.metric.normalize}),
        };
        let manifest = serde_json::json!({
            "spec": spec,
            "spec_hash": spec.spec_hash,
            "model": self.model,
            "tl_run": {"version": env!("CARGO_PKG_VERSION"), "git_commit": option_env!("TL_RUN_GIT_COMMIT").unwrap_or("unknown"), "engine": keys::engine_id()},
            "device": self.device,
            "dtype": self.dtype,
            "shard": self.shard,
            "complete": self.complete,
            "metric": metric,
            "tokens": toks.map(|t| t.record.clone()),
            "runs": runs,
            "jobs": self.jobs,
            "nonfinite": self.nonfinite,
            "timings_seconds": timings,
        });
        std::fs::create_dir_all(&spec.output_dir).map_err(|e| Error::io(&spec.output_dir, e))?;
        atomic::write_bytes(
            &self.path,
            serde_json::to_string_pretty(&manifest).map_err(|e| Error::Other(e.to_string()))?.as_bytes(),
        )
    }

    /// Records a NaN/inf finding; unless the spec allows them, writes the manifest with it and
    /// stops the run with an error naming where it first appeared.
    pub fn found(
        &mut self,
        f: nonfinite::Finding,
        runs: &serde_json::Map<String, serde_json::Value>,
        timings: &BTreeMap<String, f64>,
        prep: Option<&CleanCorrupted>,
        toks: Option<&Tokenized>,
    ) -> Result<()> {
        let message = f.to_string();
        self.nonfinite.push(f);
        if self.spec.allow_nonfinite {
            tracing::warn!("{message} (allow_nonfinite: recorded in the manifest)");
            return Ok(());
        }
        self.write(runs, timings, prep, toks)?;
        Err(Error::Other(format!(
            "{message}; the run stopped (recorded in {}). Set allow_nonfinite = true at the top of the spec to run on and record them instead",
            self.path.display()
        )))
    }
}
