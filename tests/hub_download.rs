//! The hub download path against a loopback hub: a small HTTP server in this process that
//! answers like the Hugging Face hub's `/{repo}/resolve/{revision}/{file}` (x-repo-commit,
//! etag / x-linked-etag, ranged GETs with content-range, a redirect of weights to a second
//! "CDN" path, 404 for missing files, 401 for a gated repo without the right token) and counts
//! the requests it serves. tl-run finds it through HF_ENDPOINT.
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use sha2::Digest;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

const COMMIT: &str = "c0ffee0000000000000000000000000000000001";
const TOKEN: &str = "hf_loopbackSecret42";

struct HubRepo {
    files: HashMap<String, Vec<u8>>,
    /// Branches and tags: name -> commit.
    refs: HashMap<String, String>,
    gated: bool,
    /// Answer this many requests with 503 before serving (a flaky hub).
    failures: AtomicU32,
    /// Send weights from the CDN slowly (64 KiB every 20 ms), so a download can be killed midway.
    slow: bool,
}

#[derive(Debug, Clone)]
struct Seen {
    path: String,
    authorization: Option<String>,
    range: Option<String>,
}

struct LoopbackHub {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Bytes of weights sent from the CDN path.
    cdn_bytes: Arc<AtomicU64>,
}

impl LoopbackHub {
    fn start(repos: HashMap<String, HubRepo>) -> LoopbackHub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let cdn_bytes = Arc::new(AtomicU64::new(0));
        let (repos, seen2, base, sent) = (Arc::new(repos), seen.clone(), url.clone(), cdn_bytes.clone());
        // The thread ends with the test process.
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (repos, seen, base, sent) = (repos.clone(), seen2.clone(), base.clone(), sent.clone());
                std::thread::spawn(move || {
                    let _ = serve(stream, &repos, &seen, &base, &sent);
                });
            }
        });
        LoopbackHub { url, seen, cdn_bytes }
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

fn sha256(b: &[u8]) -> String {
    format!("{:x}", sha2::Sha256::digest(b))
}

fn serve(
    mut stream: TcpStream,
    repos: &HashMap<String, HubRepo>,
    seen: &Mutex<Vec<Seen>>,
    base: &str,
    sent: &AtomicU64,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut headers = HashMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("/").to_string();
    seen.lock().unwrap().push(Seen {
        path: path.clone(),
        authorization: headers.get("authorization").cloned(),
        range: headers.get("range").cloned(),
    });
    let respond =
        |stream: &mut TcpStream, status: &str, extra: &[(String, String)], body: &[u8]| -> std::io::Result<()> {
            let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
            for (k, v) in extra {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
            head.push_str("\r\n");
            stream.write_all(head.as_bytes())?;
            stream.write_all(body)
        };
    // A ranged (or whole) body with the headers the client reads.
    let send = |stream: &mut TcpStream, data: &[u8], mut extra: Vec<(String, String)>| -> std::io::Result<()> {
        let range = headers.get("range").and_then(|r| r.strip_prefix("bytes=")).map(|r| {
            let (a, b) = r.split_once('-').unwrap_or((r, ""));
            let a: usize = a.parse().unwrap_or(0);
            let b: usize = b.parse().unwrap_or(data.len().saturating_sub(1)).min(data.len().saturating_sub(1));
            (a, b)
        });
        match range {
            Some((a, b)) if a < data.len() => {
                extra.push(("Content-Range".into(), format!("bytes {a}-{b}/{}", data.len())));
                respond(stream, "206 Partial Content", &extra, &data[a..=b])
            }
            _ => respond(stream, "200 OK", &extra, data),
        }
    };
    if let Some(sha) = path.strip_prefix("/cdn/") {
        let blob = repos.values().flat_map(|r| r.files.values().map(move |b| (r, b))).find(|(_, b)| sha256(b) == sha);
        return match blob {
            Some((r, b)) => {
                let slow = r.slow && headers.get("range").is_some_and(|r| r != "bytes=0-0");
                if slow {
                    // The header says how much follows; the body trickles.
                    let (a, _) = headers["range"].trim_start_matches("bytes=").split_once('-').unwrap_or(("0", ""));
                    let a: usize = a.parse().unwrap_or(0);
                    let head = format!("HTTP/1.1 206 Partial Content\r\nConnection: close\r\nContent-Length: {}\r\nContent-Range: bytes {a}-{}/{}\r\n\r\n", b.len() - a, b.len() - 1, b.len());
                    stream.write_all(head.as_bytes())?;
                    for chunk in b[a..].chunks(64 << 10) {
                        stream.write_all(chunk)?;
                        sent.fetch_add(chunk.len() as u64, Ordering::SeqCst);
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                    return Ok(());
                }
                send(&mut stream, b, vec![])
            }
            None => respond(&mut stream, "404 Not Found", &[], b"no such blob"),
        };
    }
    let parts: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
    let [org, name, "resolve", rev, file] = parts[..] else {
        return respond(&mut stream, "404 Not Found", &[], b"not a resolve URL");
    };
    let Some(repo) = repos.get(&format!("{org}/{name}")) else {
        return respond(
            &mut stream,
            "404 Not Found",
            &[("x-error-code".into(), "RepositoryNotFound".into())],
            b"Repository not found",
        );
    };
    if repo.failures.load(Ordering::SeqCst) > 0 {
        repo.failures.fetch_sub(1, Ordering::SeqCst);
        return respond(&mut stream, "503 Service Unavailable", &[], b"try later");
    }
    if repo.gated && headers.get("authorization").map(String::as_str) != Some(&format!("Bearer {TOKEN}")) {
        return respond(
            &mut stream,
            "401 Unauthorized",
            &[("x-error-code".into(), "GatedRepo".into())],
            b"Access to this model is restricted",
        );
    }
    let commit = if rev.len() == 40 {
        rev.to_string()
    } else {
        match repo.refs.get(rev) {
            Some(c) => c.clone(),
            None => {
                return respond(
                    &mut stream,
                    "404 Not Found",
                    &[("x-error-code".into(), "RevisionNotFound".into())],
                    b"no such revision",
                )
            }
        }
    };
    let common = vec![("x-repo-commit".to_string(), commit.clone())];
    let Some(data) = repo.files.get(file) else {
        let mut h = common.clone();
        h.push(("x-error-code".into(), "EntryNotFound".into()));
        return respond(&mut stream, "404 Not Found", &h, b"Entry not found");
    };
    let etag = sha256(data);
    if file.ends_with(".safetensors") {
        // Weights live on the CDN: the hub answers with a redirect carrying the LFS etag.
        let mut h = common;
        h.push(("x-linked-etag".into(), format!("\"{etag}\"")));
        h.push(("x-linked-size".into(), data.len().to_string()));
        h.push(("Location".into(), format!("{base}/cdn/{etag}")));
        return respond(&mut stream, "302 Found", &h, b"");
    }
    let mut h = common;
    h.push(("ETag".into(), format!("\"{etag}\"")));
    send(&mut stream, data, h)
}

fn fixture_repo(drop: &[&str], gated: bool) -> HubRepo {
    let dir = repo_root().join("fixtures/gpt2-tiny");
    let mut files = HashMap::new();
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !drop.contains(&name.as_str()) {
            files.insert(name, std::fs::read(e.path()).unwrap());
        }
    }
    HubRepo {
        files,
        refs: HashMap::from([("main".to_string(), COMMIT.to_string()), ("v1.0".to_string(), COMMIT.to_string())]),
        gated,
        failures: AtomicU32::new(0),
        slow: false,
    }
}

fn tl_run(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tl-run"));
    c.args(args)
        .current_dir(repo_root())
        .env_remove("HF_TOKEN")
        .env_remove("HUGGING_FACE_HUB_TOKEN")
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_HOME");
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn parquet_values(path: &Path) -> Vec<(String, f64)> {
    let (rows, _) = tl_run::output::table::read_parquet(path).unwrap();
    rows.into_iter().map(|r| (format!("{} {:?} {:?} {:?}", r.hook, r.layer, r.pos, r.head), r.value)).collect()
}

#[test]
fn a_first_run_downloads_into_the_shared_cache_and_a_second_run_asks_nothing() {
    let hub = LoopbackHub::start(HashMap::from([
        ("tl-run-test/gpt2-tiny".to_string(), fixture_repo(&[], false)),
        ("tl-run-test/no-tokenizer-config".to_string(), fixture_repo(&["tokenizer_config.json"], false)),
    ]));
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let env = [("HF_ENDPOINT", hub.url.as_str()), ("HF_HUB_CACHE", s(&cache))];
    let out = tmp.path().join("from-hub");
    let (ok, _, err) = tl_run(
        &["run", "experiments/ioi.toml", "--model-id", "tl-run-test/gpt2-tiny", "--out", s(&out), "--quiet"],
        &env,
    );
    assert!(ok, "{err}");
    let first = hub.count();
    assert!(first >= 4, "config, tokenizer, tokenizer_config and weights are fetched: {:?}", hub.seen.lock().unwrap());
    assert!(
        hub.seen.lock().unwrap().iter().any(|r| r.path.starts_with("/cdn/")),
        "the weights came through the redirect"
    );

    // The standard layout, which huggingface_hub itself reads (the cache is shared with Python).
    let repo_dir = cache.join("models--tl-run-test--gpt2-tiny");
    assert_eq!(std::fs::read_to_string(repo_dir.join("refs/main")).unwrap().trim(), COMMIT);
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        let p = repo_dir.join("snapshots").join(COMMIT).join(f);
        assert!(p.is_file(), "{}", p.display());
        let blob = std::fs::canonicalize(&p).unwrap();
        assert!(
            blob.starts_with(std::fs::canonicalize(repo_dir.join("blobs")).unwrap()),
            "{} is a link into blobs/",
            p.display()
        );
        if f == "model.safetensors" {
            assert_eq!(
                blob.file_name().unwrap().to_string_lossy(),
                sha256(&std::fs::read(&blob).unwrap()),
                "the weights' blob is named by its sha256 (the etag)"
            );
        }
    }
    let py = Command::new(repo_root().join(".venv/bin/python"))
        .args(["-c", "import sys\nfrom huggingface_hub import hf_hub_download\nfor f in ['config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json']:\n    print(hf_hub_download('tl-run-test/gpt2-tiny', f, cache_dir=sys.argv[1], local_files_only=True))", s(&cache)])
        .output()
        .unwrap();
    assert!(py.status.success(), "huggingface_hub does not find the files: {}", String::from_utf8_lossy(&py.stderr));
    assert_eq!(String::from_utf8_lossy(&py.stdout).lines().count(), 4);

    // The same results as from a local directory of the same files; the manifest has the commit.
    let local = tmp.path().join("local");
    let (ok, _, err) = tl_run(
        &["run", "experiments/ioi.toml", "--model-id", "fixtures/gpt2-tiny", "--out", s(&local), "--quiet"],
        &[],
    );
    assert!(ok, "{err}");
    for run in ["resid", "heads", "attribution", "logit-lens"] {
        assert_eq!(
            parquet_values(&out.join(format!("{run}.parquet"))),
            parquet_values(&local.join(format!("{run}.parquet"))),
            "{run}"
        );
    }
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["model"]["resolved_commit"], COMMIT);

    // A second run: not one request. Offline: not one either, even with the hub gone.
    let (ok, _, err) = tl_run(
        &[
            "run",
            "experiments/ioi.toml",
            "--model-id",
            "tl-run-test/gpt2-tiny",
            "--out",
            s(&tmp.path().join("again")),
            "--quiet",
            "--fresh",
        ],
        &env,
    );
    assert!(ok, "{err}");
    assert_eq!(hub.count(), first, "a second run asked the hub: {:?}", &hub.seen.lock().unwrap()[first..]);
    let offline = [("HF_ENDPOINT", "http://127.0.0.1:9"), ("HF_HUB_CACHE", s(&cache)), ("HF_HUB_OFFLINE", "1")];
    let (ok, _, err) = tl_run(&["validate", "experiments/ioi.toml", "--model-id", "tl-run-test/gpt2-tiny"], &offline);
    assert!(ok, "{err}");
    assert_eq!(hub.count(), first);

    // A file the repo lacks is asked for once: the 404 is recorded as huggingface_hub does.
    let (ok, _, err) =
        tl_run(&["validate", "experiments/ioi.toml", "--model-id", "tl-run-test/no-tokenizer-config"], &env);
    assert!(ok, "{err}");
    let missing =
        cache.join("models--tl-run-test--no-tokenizer-config/.no_exist").join(COMMIT).join("tokenizer_config.json");
    assert!(missing.exists(), "{}", missing.display());
    let before = hub.count();
    let (ok, _, err) =
        tl_run(&["validate", "experiments/ioi.toml", "--model-id", "tl-run-test/no-tokenizer-config"], &env);
    assert!(ok, "{err}");
    assert_eq!(hub.count(), before, "the known-absent file was asked for again");
}

#[test]
fn a_gated_repo_names_hf_token_and_the_token_is_sent_but_never_shown() {
    let hub = LoopbackHub::start(HashMap::from([("tl-run-test/gated".to_string(), fixture_repo(&[], true))]));
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let out = tmp.path().join("out");
    let args = ["run", "experiments/ioi.toml", "--model-id", "tl-run-test/gated", "--out", s(&out), "--quiet"];
    let (ok, _, err) = tl_run(&args, &[("HF_ENDPOINT", &hub.url), ("HF_HUB_CACHE", s(&cache))]);
    assert!(!ok);
    assert!(err.contains("HF_TOKEN") && err.contains("gated"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let (ok, stdout, err) =
        tl_run(&args, &[("HF_ENDPOINT", &hub.url), ("HF_HUB_CACHE", s(&cache)), ("HF_TOKEN", TOKEN)]);
    assert!(ok, "{err}");
    let seen = hub.seen.lock().unwrap().clone();
    assert!(
        seen.iter().rfind(|r| !r.path.starts_with("/cdn/")).unwrap().authorization.as_deref()
            == Some(&format!("Bearer {TOKEN}")),
        "{seen:?}"
    );
    let manifest = std::fs::read_to_string(out.join("manifest.json")).unwrap();
    for text in [&stdout, &err, &manifest] {
        assert!(!text.contains(TOKEN), "the token leaked: {text}");
    }
}

#[test]
fn download_prefetches_models_of_ids_a_spec_and_a_zoo_for_offline_runs() {
    let hub = LoopbackHub::start(HashMap::from([
        ("tl-run-test/gpt2-tiny".to_string(), fixture_repo(&[], false)),
        ("tl-run-test/second".to_string(), fixture_repo(&[], false)),
        ("tl-run-test/third".to_string(), fixture_repo(&[], false)),
    ]));
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let env = [("HF_ENDPOINT", hub.url.as_str()), ("HF_HUB_CACHE", s(&cache))];
    let spec = tmp.path().join("spec.toml");
    let text = std::fs::read_to_string(repo_root().join("experiments/ioi.toml"))
        .unwrap()
        .replace("id = \"gpt2\"", "id = \"tl-run-test/second\"\nrevision = \"v1.0\"");
    std::fs::write(
        &spec,
        text.replace("file = \"prompts/", &format!("file = \"{}/experiments/prompts/", repo_root().display())),
    )
    .unwrap();
    let zoo = tmp.path().join("zoo.toml");
    std::fs::write(&zoo, format!("[[model]]\nname = \"third\"\nid = \"tl-run-test/third\"\nrevision = \"{COMMIT}\"\nreference = \"third.safetensors\"\nprompts = [\"Hello there\"]\n")).unwrap();
    let (ok, stdout, err) = tl_run(&["download", "tl-run-test/gpt2-tiny", "--spec", s(&spec), "--zoo", s(&zoo)], &env);
    assert!(ok, "{err}");
    for id in ["tl-run-test/gpt2-tiny@main", "tl-run-test/second@v1.0", &format!("tl-run-test/third@{COMMIT}")] {
        assert!(stdout.contains(&format!("{id}: commit {COMMIT}")), "{id} not reported:\n{stdout}");
    }
    // Now offline, with no hub at all: the spec runs.
    let offline = [("HF_ENDPOINT", "http://127.0.0.1:9"), ("HF_HUB_CACHE", s(&cache)), ("HF_HUB_OFFLINE", "1")];
    let (ok, _, err) = tl_run(&["run", s(&spec), "--out", s(&tmp.path().join("out")), "--quiet"], &offline);
    assert!(ok, "{err}");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("out/manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["model"]["resolved_commit"], COMMIT, "the tag's commit is recorded");
}

#[test]
fn a_large_download_shows_a_progress_bar_on_a_terminal() {
    let hub = LoopbackHub::start(HashMap::from([(
        "tl-run-test/slow".to_string(),
        repo_with(fixture_repo(&[], false), |r| r.slow = true),
    )]));
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let cmd = format!("'{}' download tl-run-test/slow", env!("CARGO_BIN_EXE_tl-run"));
    // script(1) gives the command a pseudo-terminal and copies what it prints.
    let o = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .env("HF_ENDPOINT", &hub.url)
        .env("HF_HUB_CACHE", &cache)
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{text}");
    assert!(
        text.contains("model.safetensors") && (text.contains("MiB") || text.contains("MB")),
        "no progress bar on a terminal:\n{text}"
    );
    // Not on a pipe: logs stay clean.
    let (ok, stdout, err) = tl_run(
        &["download", "tl-run-test/slow"],
        &[("HF_ENDPOINT", &hub.url), ("HF_HUB_CACHE", s(&tmp.path().join("hub2")))],
    );
    assert!(ok, "{err}");
    assert!(!err.contains('%') && !stdout.contains('%'), "{stdout}{err}");
}

fn repo_with(mut r: HubRepo, f: impl FnOnce(&mut HubRepo)) -> HubRepo {
    f(&mut r);
    r
}

#[test]
fn a_pickle_only_repo_is_refused_before_the_pickle_is_downloaded() {
    let pickle = repo_with(fixture_repo(&["model.safetensors"], false), |r| {
        r.files.insert("pytorch_model.bin".into(), vec![0x80; 4 << 20]);
    });
    let hub = LoopbackHub::start(HashMap::from([("tl-run-test/pickle".to_string(), pickle)]));
    let tmp = tempfile::tempdir().unwrap();
    let (ok, _, err) = tl_run(
        &["validate", "experiments/ioi.toml", "--model-id", "tl-run-test/pickle"],
        &[("HF_ENDPOINT", &hub.url), ("HF_HUB_CACHE", s(&tmp.path().join("hub")))],
    );
    assert!(!ok);
    assert!(err.contains("pytorch_model.bin") && err.contains("pickle") && err.contains("safetensors only"), "{err}");
    let seen = hub.seen.lock().unwrap().clone();
    let asked: Vec<&Seen> = seen.iter().filter(|r| r.path.ends_with("/pytorch_model.bin")).collect();
    assert!(
        !asked.is_empty() && asked.iter().all(|r| r.range.as_deref() == Some("bytes=0-0")),
        "the pickle was fetched, not only asked for: {asked:?}"
    );
    let blobs = tmp.path().join("hub/models--tl-run-test--pickle/blobs");
    let big = std::fs::read_dir(&blobs)
        .map(|d| d.flatten().filter(|e| e.metadata().unwrap().len() >= 4 << 20).count())
        .unwrap_or(0);
    assert_eq!(big, 0, "no pickle in the cache");
}

#[test]
fn a_flaky_hub_is_retried_and_a_failing_one_is_a_named_error() {
    let hub = LoopbackHub::start(HashMap::from([
        ("tl-run-test/flaky".to_string(), repo_with(fixture_repo(&[], false), |r| r.failures = AtomicU32::new(2))),
        ("tl-run-test/down".to_string(), repo_with(fixture_repo(&[], false), |r| r.failures = AtomicU32::new(1_000))),
    ]));
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let env = [("HF_ENDPOINT", hub.url.as_str()), ("HF_HUB_CACHE", s(&cache))];
    let (ok, _, err) = tl_run(&["validate", "experiments/ioi.toml", "--model-id", "tl-run-test/flaky"], &env);
    assert!(ok, "two 503s are retried: {err}");
    let before = hub.count();
    let t = std::time::Instant::now();
    let (ok, _, err) = tl_run(&["validate", "experiments/ioi.toml", "--model-id", "tl-run-test/down"], &env);
    assert!(!ok);
    assert!(err.contains("503") && err.contains("failed 4 times in a row"), "{err}");
    assert_eq!(hub.count() - before, 4, "a bounded number of tries");
    assert!(t.elapsed() >= std::time::Duration::from_millis(1_500), "with backoff (0.25 + 0.5 + 1 s)");
}

#[test]
fn a_download_killed_mid_file_leaves_no_trusted_blob_and_the_rerun_completes() {
    let hub = LoopbackHub::start(HashMap::from([(
        "tl-run-test/slow".to_string(),
        repo_with(fixture_repo(&[], false), |r| r.slow = true),
    )]));
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tl-run"))
        .args(["download", "tl-run-test/slow"])
        .env("HF_ENDPOINT", &hub.url)
        .env("HF_HUB_CACHE", &cache)
        .env_remove("HF_HUB_OFFLINE")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while hub.cdn_bytes.load(Ordering::SeqCst) < 2 << 20 {
        assert!(t.elapsed() < std::time::Duration::from_secs(60), "the download did not start");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let weights = fixture_repo(&[], false).files.remove("model.safetensors").unwrap();
    let etag = sha256(&weights);
    let blobs = cache.join("models--tl-run-test--slow/blobs");
    assert!(!blobs.join(&etag).exists(), "a partial download sits under the blob's name");
    let (ok, stdout, err) =
        tl_run(&["download", "tl-run-test/slow"], &[("HF_ENDPOINT", &hub.url), ("HF_HUB_CACHE", s(&cache))]);
    assert!(ok, "{err}");
    assert!(stdout.contains(COMMIT), "{stdout}");
    assert_eq!(sha256(&std::fs::read(blobs.join(&etag)).unwrap()), etag, "the finished blob hashes to its etag");
    let resumed = hub
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.path.starts_with("/cdn/"))
        .filter_map(|r| r.range.clone())
        .any(|r| r != "bytes=0-0" && r != "bytes=0-");
    assert!(resumed, "the rerun resumed the partial file with a range request");
}

#[test]
fn a_sharded_checkpoint_downloads_every_shard() {
    // gpt2-tiny's tensors split over two shards with an index, as the hub stores large models.
    let dir = repo_root().join("fixtures/gpt2-tiny");
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().cloned().collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut repo = fixture_repo(&["model.safetensors"], false);
    let mut weight_map = serde_json::Map::new();
    for (i, part) in [a, b].iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        let views: Vec<(String, safetensors::tensor::TensorView)> =
            part.iter().map(|n| (n.clone(), st.tensor(n).unwrap())).collect();
        repo.files.insert(file.clone(), safetensors::serialize(views, &None).unwrap());
        for n in part.iter() {
            weight_map.insert(n.clone(), file.clone().into());
        }
    }
    repo.files.insert(
        "model.safetensors.index.json".into(),
        serde_json::to_vec(&serde_json::json!({"metadata": {}, "weight_map": weight_map})).unwrap(),
    );
    let hub = LoopbackHub::start(HashMap::from([("tl-run-test/sharded".to_string(), repo)]));
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let out = tmp.path().join("out");
    let (ok, _, err) = tl_run(
        &["run", "experiments/ioi.toml", "--model-id", "tl-run-test/sharded", "--out", s(&out), "--quiet"],
        &[("HF_ENDPOINT", &hub.url), ("HF_HUB_CACHE", s(&cache))],
    );
    assert!(ok, "{err}");
    for i in 1..=2 {
        assert!(cache
            .join(format!("models--tl-run-test--sharded/snapshots/{COMMIT}/model-0000{i}-of-00002.safetensors"))
            .is_file());
    }
    let local = tmp.path().join("local");
    let (ok, _, err) = tl_run(
        &["run", "experiments/ioi.toml", "--model-id", "fixtures/gpt2-tiny", "--out", s(&local), "--quiet"],
        &[],
    );
    assert!(ok, "{err}");
    assert_eq!(parquet_values(&out.join("resid.parquet")), parquet_values(&local.join("resid.parquet")));
}
