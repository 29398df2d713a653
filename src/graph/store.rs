//! The job store: each finished work job's rows and note, stored atomically under
//! `<output.dir>/.tl-run/jobs/<key>.parquet` the moment the job finishes, so a rerun (after a
//! kill, a preemption or a changed spec) redoes only the jobs whose keys it lacks.
use std::path::{Path, PathBuf};

use crate::error::Result;
use crate::output::atomic;
use crate::output::table::{read_parquet, write_parquet_with, Row};

const NOTE: &str = "tl-run.note";

#[derive(Clone)]
pub struct Store {
    dir: PathBuf,
}

/// A finished job waiting to be written: its key, its rows and its manifest note.
type QueuedJob = (String, std::sync::Arc<Vec<Row>>, serde_json::Value);

/// Stores finished jobs on a background thread, so the device goes on with the next job while
/// one job's Parquet is encoded and fsynced (on a GPU that write took about as long as the
/// job). A job is in the store once its file is renamed into place, as before; a kill loses
/// only the writes still queued, and a rerun redoes those jobs.
pub struct Writer {
    queue: Option<std::sync::mpsc::Sender<QueuedJob>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Writer {
    pub fn start(store: &Store) -> Writer {
        let store = store.clone();
        let (tx, rx) = std::sync::mpsc::channel::<QueuedJob>();
        let thread = std::thread::Builder::new()
            .name("tl-run-store".into())
            .spawn(move || {
                let mut first_error = None;
                for (key, rows, note) in rx {
                    // After a failed write the rest are not attempted (a full disk stays full);
                    // the error is reported when the run finishes.
                    if first_error.is_none() {
                        if let Err(e) = store.put(&key, &rows, &note) {
                            first_error = Some(e);
                        }
                    }
                }
                first_error.map_or(Ok(()), Err)
            })
            .ok();
        Writer { queue: Some(tx), thread }
    }

    /// Queues job `key`'s result (written in the calling thread if the writer thread could not
    /// be started). The rows are shared, not copied: a pattern target's 230,000 rows took a
    /// noticeable part of its job to clone.
    pub fn put(&self, store: &Store, key: &str, rows: std::sync::Arc<Vec<Row>>, note: serde_json::Value) -> Result<()> {
        match (&self.queue, &self.thread) {
            (Some(q), Some(_)) => {
                if let Err(std::sync::mpsc::SendError((k, r, n))) = q.send((key.to_string(), rows, note)) {
                    return store.put(&k, &r, &n);
                }
                Ok(())
            }
            _ => store.put(key, &rows, &note),
        }
    }

    /// Waits for every queued write; the first failed one is the error.
    pub fn finish(mut self) -> Result<()> {
        self.queue.take();
        match self.thread.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err(crate::error::Error::Other("the job store's writer thread panicked".into()))),
            None => Ok(()),
        }
    }
}

impl Drop for Writer {
    /// On an early return (an error in a job) the writes already queued still complete.
    fn drop(&mut self) {
        self.queue.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
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
        // The run's name is left out: a job's result is keyed by its content, not by its run.
        write_parquet_with(&self.path(key), rows, Some(""), &[(NOTE, note.to_string())])?;
        static STORED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        crate::panics::injected_pause_after_stored(STORED.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1);
        Ok(())
    }
}
