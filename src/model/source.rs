//! Where a model's files come from: a local directory, or a Hugging Face hub id resolved through
//! the standard hub cache (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub) and
//! downloaded with hf-hub when missing, from HF_ENDPOINT (default https://huggingface.co) with
//! HF_TOKEN when set. A revision whose files are all in the cache (or known absent, as
//! huggingface_hub records under .no_exist/) is served from it without a request; with
//! HF_HUB_OFFLINE=1 only the cache is read.
//! Only safetensors weights are ever loaded: pickle checkpoints can execute code.
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// What the user wrote (hub id or directory).
    pub id: String,
    pub config: PathBuf,
    pub weights: Vec<PathBuf>,
    pub tokenizer: Option<PathBuf>,
    pub tokenizer_config: Option<PathBuf>,
    /// The commit the hub cache resolved the revision to (None for a local directory).
    pub commit: Option<String>,
}

const INDEX: &str = "model.safetensors.index.json";
const SINGLE: &str = "model.safetensors";
const PICKLES: &[&str] = &["pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt"];

/// Something that can hand out a repository's files by name: a directory, the hub cache, or the
/// hub itself. `Ok(None)` = that file is not in the repository (or not cached).
trait FileStore {
    fn get(&self, name: &str) -> Result<Option<PathBuf>>;
    fn describe(&self) -> String;
    /// Whether the repository has `name`, without fetching it (the hub is asked for its headers).
    fn has(&self, name: &str) -> Result<bool> {
        Ok(self.get(name)?.is_some())
    }
}

struct LocalDir(PathBuf);

impl FileStore for LocalDir {
    fn get(&self, name: &str) -> Result<Option<PathBuf>> {
        let p = self.0.join(name);
        Ok(p.is_file().then_some(p))
    }
    fn describe(&self) -> String {
        format!("directory {}", self.0.display())
    }
}

/// The hub cache layout: models--{org}--{name}/refs/{revision} holds a commit hash, and
/// snapshots/{commit}/{file} the files.
struct HubCache {
    repo_dir: PathBuf,
    commit: Option<String>,
}

impl HubCache {
    fn open(cache: &Path, id: &str, revision: &str) -> Self {
        let repo_dir = cache.join(format!("models--{}", id.replace('/', "--")));
        let commit = if is_commit_hash(revision) {
            Some(revision.to_string())
        } else {
            std::fs::read_to_string(repo_dir.join("refs").join(revision)).ok().map(|s| s.trim().to_string())
        };
        HubCache { repo_dir, commit }
    }
}

impl FileStore for HubCache {
    fn get(&self, name: &str) -> Result<Option<PathBuf>> {
        let Some(commit) = &self.commit else { return Ok(None) };
        let p = self.repo_dir.join("snapshots").join(commit).join(name);
        Ok(p.is_file().then_some(p))
    }
    fn describe(&self) -> String {
        format!("hub cache {}", self.repo_dir.display())
    }
}

/// The cache, trusted only where it knows: a file in the snapshot, or a file huggingface_hub
/// recorded as absent (`.no_exist/<commit>/<name>`). Anything else needs the hub.
struct CacheOnlyIfComplete(HubCache);

/// The error CacheOnlyIfComplete gives for a file the cache cannot answer for.
const NOT_CACHED: &str = "\u{0}not cached";

impl FileStore for CacheOnlyIfComplete {
    fn get(&self, name: &str) -> Result<Option<PathBuf>> {
        if let Some(p) = self.0.get(name)? {
            return Ok(Some(p));
        }
        match &self.0.commit {
            Some(c) if self.0.repo_dir.join(".no_exist").join(c).join(name).exists() => Ok(None),
            _ => Err(Error::Load { id: String::new(), reason: NOT_CACHED.into() }),
        }
    }
    fn describe(&self) -> String {
        self.0.describe()
    }
}

struct Hub {
    repo: hf_hub::api::sync::ApiRepo,
    label: String,
    /// models--{org}--{name} in the cache, for .no_exist markers.
    repo_dir: PathBuf,
    token: Option<String>,
}

/// Tries a hub request up to this many times while the hub answers 5xx or the connection fails.
const HUB_ATTEMPTS: u32 = 4;

fn is_transient(e: &hf_hub::api::sync::ApiError) -> bool {
    match e {
        hf_hub::api::sync::ApiError::RequestError(e) => match &**e {
            ureq::Error::Status(code, _) => *code >= 500,
            ureq::Error::Transport(_) => true,
        },
        hf_hub::api::sync::ApiError::IoError(_) | hf_hub::api::sync::ApiError::TooManyRetries(_) => true,
        _ => false,
    }
}

impl Hub {
    /// `repo.get` with bounded retries and backoff (0.25 s, 0.5 s, 1 s) on 5xx answers and
    /// broken connections; a partly downloaded file resumes from where it stopped.
    fn get_with_retries(&self, name: &str) -> std::result::Result<PathBuf, hf_hub::api::sync::ApiError> {
        let mut attempt = 1;
        loop {
            match self.repo.get(name) {
                Err(e) if is_transient(&e) && attempt < HUB_ATTEMPTS => {
                    tracing::warn!(
                        "hub request for {name} failed ({}); retrying ({attempt} of {})",
                        redact(&e.to_string()),
                        HUB_ATTEMPTS - 1
                    );
                    std::thread::sleep(std::time::Duration::from_millis(250 << (attempt - 1)));
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// A blob named by a sha256 (weights: the etag of an LFS file) must hash to its name, or it
    /// is removed: the digest of a hub file is read from its blob name (graph/keys.rs).
    fn verify(&self, name: &str, path: &Path, fetched_after: std::time::SystemTime) -> Result<()> {
        let Ok(blob) = std::fs::canonicalize(path) else { return Ok(()) };
        let Some(expected) = blob
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .filter(|n| n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit()))
        else {
            return Ok(());
        };
        let fresh = std::fs::metadata(&blob).and_then(|m| m.modified()).is_ok_and(|t| t >= fetched_after);
        if !fresh {
            return Ok(());
        }
        let actual = crate::model::digest::file_digest(&blob)?;
        if actual != expected {
            let _ = std::fs::remove_file(&blob);
            return Err(Error::Load {
                id: self.label.clone(),
                reason: format!("downloaded {name} hashes to sha256 {actual}, not its etag {expected}: removed it; run again to download it anew"),
            });
        }
        Ok(())
    }
}

impl FileStore for Hub {
    /// Asks for the first byte (no redirect followed), so a pickle checkpoint is named without
    /// being downloaded.
    fn has(&self, name: &str) -> Result<bool> {
        let agent = ureq::AgentBuilder::new().redirects(0).build();
        let mut req = agent.get(&self.repo.url(name)).set("Range", "bytes=0-0");
        if let Some(t) = &self.token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        match req.call() {
            Ok(_) => Ok(true),
            Err(ureq::Error::Status(404, _)) => Ok(false),
            Err(ureq::Error::Status(code, _)) if (300..400).contains(&code) => Ok(true),
            Err(e) => Err(Error::Load {
                id: self.label.clone(),
                reason: format!("asking the hub for {name}: {}", redact(&e.to_string())),
            }),
        }
    }

    fn get(&self, name: &str) -> Result<Option<PathBuf>> {
        let started = std::time::SystemTime::now() - std::time::Duration::from_secs(2);
        match self.get_with_retries(name) {
            Ok(p) => {
                self.verify(name, &p, started)?;
                Ok(Some(p))
            }
            // A 404 means the repository has no such file (recorded, as huggingface_hub does, so
            // the next run need not ask); anything else is a real failure.
            Err(hf_hub::api::sync::ApiError::RequestError(e)) if matches!(*e, ureq::Error::Status(404, _)) => {
                if let ureq::Error::Status(_, r) = *e {
                    if let Some(commit) = r.header("x-repo-commit").filter(|c| is_commit_hash(c)) {
                        let marker = self.repo_dir.join(".no_exist").join(commit).join(name);
                        if let Some(dir) = marker.parent() {
                            let _ = std::fs::create_dir_all(dir).and_then(|_| std::fs::write(&marker, b""));
                        }
                    }
                }
                Ok(None)
            }
            Err(hf_hub::api::sync::ApiError::RequestError(e)) if matches!(*e, ureq::Error::Status(401 | 403, _)) => Err(Error::Load {
                id: self.label.clone(),
                reason: format!(
                    "downloading {name}: the hub refused access ({}): the repository is gated or private. Accept its terms on the hub \
                     and set HF_TOKEN to an access token of an account that may read it",
                    if let ureq::Error::Status(code, _) = *e { code } else { 0 }
                ),
            }),
            Err(e) if is_transient(&e) => Err(Error::Load {
                id: self.label.clone(),
                reason: format!(
                    "downloading {name}: the hub failed {HUB_ATTEMPTS} times in a row (last: {}); try again later. Without internet here, \
                     set HF_HUB_OFFLINE=1 to read the hub cache only (fill it with `tl-run download` where there is internet), or \
                     give a local directory or .gguf file with --model-id",
                    redact(&e.to_string())
                ),
            }),
            Err(e) => Err(Error::Load { id: self.label.clone(), reason: format!("downloading {name}: {}", redact(&e.to_string())) }),
        }
    }
    fn describe(&self) -> String {
        format!("the hub ({})", self.label)
    }
}

fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// HF_HUB_CACHE, else HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub
/// (the order huggingface_hub uses).
pub fn hub_cache_dir() -> PathBuf {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(p) = var("HF_HUB_CACHE") {
        return p;
    }
    if let Some(p) = var("HF_HOME") {
        return p.join("hub");
    }
    let base = var("XDG_CACHE_HOME")
        .or_else(|| var("HOME").map(|h| h.join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("huggingface").join("hub")
}

/// HF_TOKEN (or the older HUGGING_FACE_HUB_TOKEN), sent as `Authorization: Bearer`; never
/// logged or written to the manifest.
fn hub_token() -> Option<String> {
    ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|t| !t.trim().is_empty()))
        .map(|t| t.trim().to_string())
}

/// An error message with the token, if it appears, blanked out.
fn redact(message: &str) -> String {
    match hub_token() {
        Some(t) => message.replace(&t, "<HF_TOKEN>"),
        None => message.to_string(),
    }
}

pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes" | "ON" | "on"))
        .unwrap_or(false)
}

/// Finds the files of model `id`: a local directory when `id` names one, else a hub repository.
/// Why a path names no model: a .gguf file or a directory that is not there (with the full path
/// it was looked for at, as a spec's relative id is resolved against the spec's directory), or a
/// file that is not a .gguf.
fn not_a_model_path(path: &Path) -> String {
    let full = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let shown =
        if full == path { path.display().to_string() } else { format!("{} ({})", path.display(), full.display()) };
    let what = if path.is_file() {
        format!("{shown} is a file but not a .gguf model: a model is a directory (config.json, weights, tokenizer) or a .gguf file")
    } else if path.extension().is_some_and(|x| x == "gguf") {
        format!("no such file: {shown}")
    } else {
        format!("no such directory: {shown}")
    };
    format!(
        "{what}; a relative [model] id is resolved against the spec's directory: give the model with --model-id PATH"
    )
}

pub fn resolve(id: &str, revision: Option<&str>) -> Result<ModelFiles> {
    let path = Path::new(id);
    if path.is_dir() {
        return collect(id, &LocalDir(path.to_path_buf()), None);
    }
    if path.is_absolute()
        || id.starts_with("./")
        || id.starts_with("../")
        || id.split('/').count() > 2
        || path.is_file()
    {
        return Err(Error::Load { id: id.into(), reason: not_a_model_path(path) });
    }
    let revision = revision.unwrap_or("main");
    let cache_dir = hub_cache_dir();
    if offline() {
        return resolve_in_cache(&cache_dir, id, revision);
    }
    // Everything already cached: no request at all.
    let cached = HubCache::open(&cache_dir, id, revision);
    if let Some(commit) = cached.commit.clone() {
        match collect(id, &CacheOnlyIfComplete(cached), Some(commit)) {
            Err(Error::Load { reason, .. }) if reason == NOT_CACHED => {}
            done => return done,
        }
    }
    let repo_dir = cache_dir.join(format!("models--{}", id.replace('/', "--")));
    let mut builder = hf_hub::api::sync::ApiBuilder::from_cache(hf_hub::Cache::new(cache_dir))
        .with_progress(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if let Some(endpoint) = std::env::var("HF_ENDPOINT").ok().filter(|e| !e.is_empty()) {
        builder = builder.with_endpoint(endpoint.trim_end_matches('/').to_string());
    }
    if let Some(token) = hub_token() {
        builder = builder.with_token(Some(token));
    }
    let api = builder.build().map_err(|e| Error::Load { id: id.into(), reason: format!("hub client: {e}") })?;
    let repo = api.repo(hf_hub::Repo::with_revision(id.to_string(), hf_hub::RepoType::Model, revision.to_string()));
    let hub = Hub { repo, label: format!("{id}@{revision}"), repo_dir, token: hub_token() };
    let mut files = collect(id, &hub, None)?;
    // Downloads land in snapshots/<commit>/; read the commit back from the path.
    files.commit = files.config.parent().and_then(|p| p.file_name()).map(|c| c.to_string_lossy().into_owned());
    Ok(files)
}

/// Resolves `id` at `revision` from a hub cache directory only (what HF_HUB_OFFLINE=1 does).
pub fn resolve_in_cache(cache_dir: &Path, id: &str, revision: &str) -> Result<ModelFiles> {
    let cached = HubCache::open(cache_dir, id, revision);
    if cached.commit.is_none() {
        return Err(Error::Load {
            id: id.into(),
            reason: format!(
                "HF_HUB_OFFLINE is set and revision '{revision}' is not in the hub cache at {} (looked for {})",
                cache_dir.display(),
                cached.repo_dir.join("refs").join(revision).display()
            ),
        });
    }
    let commit = cached.commit.clone();
    collect(id, &cached, commit)
}

fn collect(id: &str, store: &dyn FileStore, commit: Option<String>) -> Result<ModelFiles> {
    let missing =
        |what: &str| Error::Load { id: id.into(), reason: format!("{what} not found in {}", store.describe()) };
    let config = store.get("config.json")?.ok_or_else(|| missing("config.json"))?;
    let weights = if let Some(single) = store.get(SINGLE)? {
        vec![single]
    } else if let Some(index) = store.get(INDEX)? {
        shard_files(id, &index, store)?
    } else {
        for p in PICKLES {
            if store.has(p)? {
                return Err(Error::Load {
                    id: id.into(),
                    reason: format!(
                        "only {p} (a pickle checkpoint) is in {}; tl-run loads safetensors only, because pickle files \
                         can run code. Convert it with `safetensors`'s convert script or pick a repo with model.safetensors",
                        store.describe()
                    ),
                });
            }
        }
        return Err(missing("model.safetensors (or model.safetensors.index.json)"));
    };
    Ok(ModelFiles {
        id: id.into(),
        config,
        weights,
        tokenizer: store.get("tokenizer.json")?,
        tokenizer_config: store.get("tokenizer_config.json")?,
        commit,
    })
}

fn shard_files(id: &str, index: &Path, store: &dyn FileStore) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Load { id: id.into(), reason: format!("{}: {e}", index.display()) })?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::Load { id: id.into(), reason: format!("{} has no weight_map", index.display()) })?;
    let mut names: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    names
        .into_iter()
        .map(|n| {
            if !n.ends_with(".safetensors") || n.contains("..") || n.starts_with('/') {
                return Err(Error::Load {
                    id: id.into(),
                    reason: format!("shard '{n}' is not a safetensors file in the repo"),
                });
            }
            store.get(n)?.ok_or_else(|| Error::Load {
                id: id.into(),
                reason: format!("shard {n} not found in {}", store.describe()),
            })
        })
        .collect()
}
