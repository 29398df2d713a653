//! The job store: each finished work job's rows and note, stored atomically under
//! `<output.dir>/.tl-run/jobs/<key>.parquet` the moment the job finishes, so a rerun (after a
//! kill, a preemption or a changed spec) redoes only the jobs whose keys it lacks.
use std::path::{Path, PathBuf};

use crate::error::Result;
use crate::output::atomic;
use crate::output::table::{read_parquet, write_parquet_with, Row};

const NOTE: &str = "tl-run.note";

pub struct Store {
    dir: PathBuf,
}

/// A stored job result. Rows carry an empty `run` (the key has no run name); the writer sets it.
pub struct Stored {
    pub rows: Vec<Row>,
    pub note: serde_json::Value,
}

impl Store {
    /// The store of an output directory; temporary files that killed processes left in it are
    /// removed.
    pub fn open(output_dir: &Path) -> Result<Store> {
        let dir = output_dir.join(".tl-run").join("jobs");
        std::fs::create_dir_all(&dir).map_err(|e| crate::error::Error::io(&dir, e))?;
        atomic::remove_stale_temps(&dir);
        Ok(Store { dir })
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.parquet"))
    }

    /// The stored result of `key`; a file that cannot be read counts as absent (it is redone).
    pub fn get(&self, key: &str) -> Option<Stored> {
        let path = self.path(key);
        if !path.exists() {
            return None;
        }
        match read_parquet(&path) {
            Ok((rows, meta)) => {
                let note = meta.get(NOTE).and_then(|n| serde_json::from_str(n).ok()).unwrap_or(serde_json::Value::Null);
                Some(Stored { rows, note })
            }
            Err(e) => {
                tracing::warn!("stored job {} is unreadable and will be redone: {e}", path.display());
                None
            }
        }
    }

    pub fn put(&self, key: &str, rows: &[Row], note: &serde_json::Value) -> Result<()> {
        let rows: Vec<Row> = rows.iter().map(|r| Row { run: String::new(), ..r.clone() }).collect();
        write_parquet_with(&self.path(key), &rows, &[(NOTE, note.to_string())])
    }
}
