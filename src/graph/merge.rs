//! `tl-run merge DIR`: the shards' parts of every run joined into the single-file layout
//! (`DIR/<run>.parquet`, rows in the order one process writes them) and one manifest.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::output::atomic;
use crate::output::table::{read_parquet, write_parquet, Row};

pub struct Merged {
    pub files: Vec<PathBuf>,
    pub manifest: PathBuf,
    pub shards: usize,
    pub jobs: usize,
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Other(format!("{}: {e}", path.display())))
}

/// The shard manifests in `dir`, by shard index; every shard of the count must have finished.
fn shard_manifests(dir: &Path) -> Result<(usize, Vec<(PathBuf, Value)>)> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut found: BTreeMap<(usize, usize), PathBuf> = BTreeMap::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(mid) = name.strip_prefix("manifest.shard-").and_then(|n| n.strip_suffix(".json")) else { continue };
        if let Some((i, n)) = mid.split_once("-of-").and_then(|(i, n)| Some((i.parse().ok()?, n.parse().ok()?))) {
            found.insert((n, i), e.path());
        }
    }
    let counts: Vec<usize> = found.keys().map(|k| k.0).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    let n = match counts.as_slice() {
        [] => return Err(Error::Config(format!("{}: no shard manifests (manifest.shard-<i>-of-<n>.json); run the spec with --shard i/n or as a Slurm array first", dir.display()))),
        [n] => *n,
        many => return Err(Error::Config(format!("{}: shard manifests of different shard counts {many:?}; remove the parts of the runs you do not want merged", dir.display()))),
    };
    let mut out = Vec::new();
    let mut missing = Vec::new();
    let mut unfinished = Vec::new();
    for i in 0..n {
        match found.get(&(n, i)) {
            None => missing.push(i),
            Some(p) => {
                let m = read_json(p)?;
                if m["complete"] != Value::Bool(true) {
                    unfinished.push(i);
                }
                out.push((p.clone(), m));
            }
        }
    }
    if !missing.is_empty() || !unfinished.is_empty() {
        return Err(Error::Other(format!(
            "{}: not every shard of {n} has finished: {}{}; rerun those shards (they resume from the job store), then merge",
            dir.display(),
            if missing.is_empty() { String::new() } else { format!("shards {missing:?} have no manifest") },
            if unfinished.is_empty() { String::new() } else { format!("{}shards {unfinished:?} stopped before their last job", if missing.is_empty() { "" } else { "; " }) }
        )));
    }
    let hashes: std::collections::BTreeSet<String> =
        out.iter().map(|(_, m)| m["spec_hash"].as_str().unwrap_or("").to_string()).collect();
    if hashes.len() > 1 {
        return Err(Error::Other(format!(
            "{}: the shards ran different specs (spec hashes {hashes:?}); rerun them with one spec",
            dir.display()
        )));
    }
    Ok((n, out))
}

/// Joins the shard parts of a sharded run (every shard's manifest complete, each job once) into
/// one Parquet file per run and one manifest; over 80 lines, as each check it makes names the
/// shard at fault.
pub fn merge(dir: &Path, keep_shards: bool) -> Result<Merged> {
    let (n, manifests) = shard_manifests(dir)?;
    let first = &manifests[0].1;
    let runs: Vec<String> = first["spec"]["runs"]
        .as_array()
        .map(|a| a.iter().filter_map(|r| r["name"].as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    // Rows per job, from every shard's job records.
    let mut job_records: BTreeMap<u64, Value> = BTreeMap::new();
    for (_, m) in &manifests {
        let index = m["shard"]["index"].as_u64();
        for j in m["jobs"].as_array().into_iter().flatten() {
            let id = j["id"].as_u64().unwrap_or(0);
            let mine = j["shard"].as_u64().is_some() && j["shard"].as_u64() == index;
            if mine || !job_records.contains_key(&id) {
                job_records.insert(id, j.clone());
            }
        }
    }
    let mut files = Vec::new();
    let mut run_notes = serde_json::Map::new();
    for run in &runs {
        let mut chunks: Vec<(u64, Vec<Row>)> = Vec::new();
        let mut notes = Vec::new();
        for (path, m) in &manifests {
            let note = &m["runs"][run];
            let Some(file) = note["file"].as_str() else {
                return Err(Error::Other(format!(
                    "{}: run '{run}' has no part (the shard stopped before writing it)",
                    path.display()
                )));
            };
            let (rows, _) = read_parquet(&dir.join(file))?;
            let mut at = 0;
            for id in note["jobs"].as_array().into_iter().flatten().filter_map(Value::as_u64) {
                let k = job_records.get(&id).and_then(|j| j["rows"].as_u64()).unwrap_or(0) as usize;
                if at + k > rows.len() {
                    return Err(Error::Other(format!(
                        "{}: job {id} of run '{run}' lists {k} rows past the part's {} rows",
                        path.display(),
                        rows.len()
                    )));
                }
                chunks.push((id, rows[at..at + k].to_vec()));
                at += k;
            }
            if at != rows.len() {
                return Err(Error::Other(format!(
                    "{}: run '{run}': the part has {} rows, its jobs {at}",
                    path.display(),
                    rows.len()
                )));
            }
            notes.push(note.clone());
        }
        chunks.sort_by_key(|(id, _)| *id);
        let rows: Vec<Row> = chunks.into_iter().flat_map(|(_, r)| r).collect();
        let path = atomic::file_in(dir, run, ".parquet")?;
        write_parquet(&path, &rows)?;
        // Side tables (edge attribution's circuits) come from the one job that made them.
        let mut tables = serde_json::Map::new();
        for note in &notes {
            for (name, file) in note["tables"].as_object().into_iter().flatten() {
                let from = dir.join(file.as_str().unwrap_or_default());
                let to = atomic::file_in(dir, &format!("{run}-{name}"), ".parquet")?;
                if tables.contains_key(name) {
                    return Err(Error::Other(format!("run '{run}': table '{name}' was written by two shards")));
                }
                let bytes = std::fs::read(&from).map_err(|e| Error::io(&from, e))?;
                atomic::write_bytes(&to, &bytes)?;
                tables.insert(name.clone(), format!("{run}-{name}.parquet").into());
                files.push(to);
            }
        }
        let mut run_note = serde_json::json!({"kind": notes.first().map(|n| n["kind"].clone()), "file": format!("{run}.parquet"), "rows": rows.len(), "shards": notes});
        if !tables.is_empty() {
            run_note["tables"] = tables.into();
        }
        run_notes.insert(run.clone(), run_note);
        files.push(path);
    }
    let mut manifest = first.clone();
    manifest["shard"] = Value::Null;
    manifest["runs"] = Value::Object(run_notes);
    manifest["jobs"] = Value::Array(job_records.values().cloned().collect());
    manifest["shards"] = manifests.iter().map(|(_, m)| serde_json::json!({"shard": m["shard"], "device": m["device"], "timings_seconds": m["timings_seconds"]})).collect();
    manifest["nonfinite"] =
        manifests.iter().flat_map(|(_, m)| m["nonfinite"].as_array().cloned().unwrap_or_default()).collect();
    manifest["timings_seconds"] = Value::Null;
    let manifest_path = dir.join("manifest.json");
    atomic::write_bytes(
        &manifest_path,
        serde_json::to_string_pretty(&manifest).map_err(|e| Error::Other(e.to_string()))?.as_bytes(),
    )?;
    if !keep_shards {
        for run in &runs {
            let run_dir = dir.join(run);
            for i in 0..n {
                let _ = std::fs::remove_dir_all(run_dir.join(format!("shard={i}-of-{n}")));
            }
            let _ = std::fs::remove_dir(&run_dir);
        }
        for (p, _) in &manifests {
            let _ = std::fs::remove_file(p);
        }
    }
    Ok(Merged { files, manifest: manifest_path, shards: n, jobs: job_records.len() })
}
