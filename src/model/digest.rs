//! Files' sha256 digests: a model's files for job keys and the manifest, downloaded blobs checked
//! against their names, a dataset a run reads. Weights are hashed once per file version
//! (`~/.cache/tl-run/digests.json`), in parallel.
use std::path::{Path, PathBuf};

use sha2::Digest;

use crate::error::{Error, Result};
use crate::model::source::ModelFiles;

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
