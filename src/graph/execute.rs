//! Runs a resolved spec: shared jobs once, then each run's sweeps, writing each run's Parquet
//! as soon as it is complete and the manifest after every run, so a failure later on leaves
//! the finished outputs and a manifest that describes them.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use tch::Tensor;

use crate::engine::metric::Metric;
use crate::engine::tokenize::TextTokenizer;
use crate::error::{Error, Result};
use crate::experiments::activation_patching::{cells_at, sweep_layers, Sweep, Target};
use crate::experiments::prepared::Prepared;
use crate::model::hook_point::{HookPoint, Site};
use crate::model::Model;
use crate::output::atomic;
use crate::output::table::{write_parquet, Row};
use crate::spec::{Corruption, RunKind, Spec};

pub struct Outcome {
    pub files: Vec<PathBuf>,
    pub manifest: PathBuf,
    pub summary: String,
}

/// Clean and corrupted token batches with the answers, checked.
pub struct Tokenized {
    pub clean: Tensor,
    pub corrupted: Tensor,
    pub mask: Option<Tensor>,
    pub correct: Vec<i64>,
    pub incorrect: Vec<i64>,
    /// The clean prompts' tokens as strings, for the `token` column.
    pub clean_strs: Vec<Vec<String>>,
}

fn single_token(tok: &TextTokenizer, word: &str, prompt: usize, which: &str) -> Result<i64> {
    let ids = tok.encode(word, false)?;
    if ids.len() != 1 {
        let shown: Vec<String> = ids.iter().map(|&i| format!("{:?}", tok.token_str(i))).collect();
        return Err(Error::Other(format!(
            "prompt {prompt}: the {which} answer {word:?} is {} tokens [{}], not one; use a single-token answer (often with a leading space)",
            ids.len(),
            shown.join(", ")
        )));
    }
    Ok(ids[0])
}

pub fn tokenize(spec: &Spec, tok: &TextTokenizer) -> Result<Tokenized> {
    let bos = spec.model.prepend_bos;
    let clean_texts: Vec<&str> = spec.prompts.iter().map(|p| p.clean.as_str()).collect();
    let clean = tok.batch(&clean_texts, bos)?;
    let corrupted = match &spec.corruption {
        Corruption::SwapPairs => {
            let n = clean_texts.len() as i64;
            let swapped: Vec<i64> = (0..n).map(|i| i ^ 1).collect();
            let idx = Tensor::from_slice(&swapped);
            crate::engine::tokenize::TokenBatch {
                tokens: clean.tokens.index_select(0, &idx),
                mask: clean.mask.as_ref().map(|m| m.index_select(0, &idx)),
                lengths: swapped.iter().map(|&i| clean.lengths[i as usize]).collect(),
            }
        }
        Corruption::Prompts | Corruption::ReplaceTokens(_) => {
            let texts: Vec<&str> = spec.prompts.iter().map(|p| p.corrupted.as_deref().unwrap_or(&p.clean)).collect();
            tok.batch(&texts, bos)?
        }
    };
    for (i, (a, b)) in clean.lengths.iter().zip(&corrupted.lengths).enumerate() {
        if a != b || clean.tokens.size() != corrupted.tokens.size() {
            return Err(Error::Other(format!(
                "prompt {i}: clean is {a} tokens and corrupted is {b}; patching by position needs equal token lengths"
            )));
        }
    }
    let mut correct = Vec::new();
    let mut incorrect = Vec::new();
    for (i, p) in spec.prompts.iter().enumerate() {
        correct.push(single_token(tok, &p.correct, i, "correct")?);
        if let Some(w) = &p.incorrect {
            incorrect.push(single_token(tok, w, i, "incorrect")?);
        }
    }
    let clean_strs = (0..clean_texts.len() as i64)
        .map(|i| Vec::<i64>::try_from(clean.tokens.get(i)).unwrap_or_default().into_iter().map(|t| tok.token_str(t)).collect())
        .collect();
    Ok(Tokenized { clean: clean.tokens, corrupted: corrupted.tokens, mask: clean.mask, correct, incorrect, clean_strs })
}

fn bar(len: u64, msg: String, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(len);
    b.set_style(ProgressStyle::with_template("{msg:40} [{bar:30}] {pos}/{len} cells {elapsed}").unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("=> "));
    b.set_message(msg);
    b
}

fn sweep_rows(run: &str, s: &Sweep, prep: &Prepared, spec: &Spec, toks: &Tokenized) -> Vec<Row> {
    let (clean_b, corr_b) = (prep.clean_baseline(), prep.corrupted_baseline());
    let norm = |v: f64| if spec.metric.normalize { (v - corr_b) / (clean_b - corr_b) } else { v };
    let mut rows = Vec::new();
    for (i, c) in s.cells.iter().enumerate() {
        let token_pos = c.pos.or(c.dest);
        let token = |p: usize| token_pos.and_then(|t| toks.clean_strs[p].get(t as usize).cloned());
        let base = Row {
            run: run.into(),
            kind: "activation_patching".into(),
            hook: HookPoint::Block(c.layer, s.target.site).to_string(),
            layer: Some(c.layer as i32),
            head: c.head.map(|h| h as i32),
            pos: c.pos.map(|p| p as i32),
            dest_pos: c.dest.map(|p| p as i32),
            src_pos: c.src.map(|p| p as i32),
            prompt: None,
            value: norm(s.mean(i)),
            token: token(0),
            computed: !s.skipped[i],
        };
        if spec.metric.per_prompt {
            for (p, v) in s.per_prompt[i].iter().enumerate() {
                rows.push(Row { prompt: Some(p as i32), value: norm(*v), token: token(p), ..base.clone() });
            }
        }
        rows.push(base);
    }
    rows
}

fn sha256_file(path: &Path) -> Result<String> {
    use sha2::Digest;
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

pub fn run_spec(spec: &Spec, model: &Model, show_progress: bool) -> Result<Outcome> {
    for run in &spec.runs {
        run.check_layers(model.cfg.n_layers, &spec.file).map_err(Error::Config)?;
    }
    let mut timings: BTreeMap<String, f64> = BTreeMap::new();
    let t = Instant::now();
    let toks = tokenize(spec, model.tokenizer()?)?;
    timings.insert("tokenize".into(), t.elapsed().as_secs_f64());

    let mut sites: Vec<Site> = Vec::new();
    for r in &spec.runs {
        let RunKind::ActivationPatching { targets } = &r.kind;
        for (s, _) in targets {
            if !sites.contains(s) {
                sites.push(*s);
            }
        }
    }
    let metric = Metric { kind: spec.metric.kind, correct: toks.correct.clone(), incorrect: toks.incorrect.clone() };
    let t = Instant::now();
    let prep = Prepared::new(model, toks.clean.shallow_clone(), toks.corrupted.shallow_clone(), toks.mask.as_ref().map(|m| m.shallow_clone()), metric, &sites)?;
    timings.insert("clean and corrupted runs".into(), t.elapsed().as_secs_f64());
    tracing::info!(clean = prep.clean_baseline(), corrupted = prep.corrupted_baseline(), first_diff = prep.first_diff, "baselines");

    std::fs::create_dir_all(&spec.output_dir).map_err(|e| Error::io(&spec.output_dir, e))?;
    let mut files = Vec::new();
    let mut run_notes = serde_json::Map::new();
    let mut summary = String::new();
    let weights: Vec<serde_json::Value> = match &model.files {
        Some(f) => f.weights.iter().map(|w| Ok(serde_json::json!({"file": w.display().to_string(), "sha256": sha256_file(w)?}))).collect::<Result<_>>()?,
        None => vec![],
    };
    let manifest_path = spec.output_dir.join("manifest.json");
    for run in &spec.runs {
        let RunKind::ActivationPatching { targets } = &run.kind;
        let mut rows = Vec::new();
        let mut sweeps_meta = Vec::new();
        let t_run = Instant::now();
        for (site, axes) in targets {
            let target = Target::new(*site, *axes)?;
            let layers: Vec<usize> = run.layers.clone().unwrap_or_else(|| (0..model.cfg.n_layers).collect());
            let total: usize = layers.iter().map(|&l| cells_at(&model.cfg, target, l, prep.seq_len()).len()).sum();
            let pb = bar(total as u64, format!("{}: {} [{}]", run.name, site.name(), axes.names().join(",")), show_progress);
            let t = Instant::now();
            let s = sweep_layers(model, &prep, target, &layers, |k| pb.inc(k as u64)).map_err(|e| Error::Other(format!("run '{}', {}: {e}", run.name, site.name())))?;
            pb.finish_and_clear();
            let secs = t.elapsed().as_secs_f64();
            timings.insert(format!("{}: {} over [{}]", run.name, site.name(), axes.names().join(", ")), secs);
            let skipped = s.skipped.iter().filter(|k| **k).count();
            sweeps_meta.push(serde_json::json!({
                "hook": site.name(), "over": axes.names(), "cells": s.cells.len(), "batched_forwards": s.forwards,
                "filled_without_compute": skipped,
                "fill_rule": format!("positions before {} (the first token where clean and corrupted differ) cannot change under causal attention; pattern entries with src > dest are masked; filled with the corrupted baseline", prep.first_diff),
                "seconds": secs,
            }));
            rows.extend(sweep_rows(&run.name, &s, &prep, spec, &toks));
        }
        let path = spec.output_dir.join(format!("{}.parquet", run.name));
        write_parquet(&path, &rows)?;
        files.push(path.clone());
        timings.insert(format!("{} (total)", run.name), t_run.elapsed().as_secs_f64());
        run_notes.insert(run.name.clone(), serde_json::json!({"kind": run.kind_name(), "file": path.file_name().map(|f| f.to_string_lossy().into_owned()), "rows": rows.len(), "sweeps": sweeps_meta}));
        summary.push_str(&top_cells(&run.name, &rows));
        let manifest = serde_json::json!({
            "spec": spec,
            "spec_hash": spec.spec_hash,
            "model": {
                "id": spec.model.id,
                "resolved_commit": model.files.as_ref().and_then(|f| f.commit.clone()),
                "weights": weights,
                "processing": model.processing,
            },
            "tl_run": {"version": env!("CARGO_PKG_VERSION"), "git_commit": option_env!("TL_RUN_GIT_COMMIT").unwrap_or("unknown")},
            "device": format!("{:?}", model.device),
            "dtype": format!("{:?}", model.kind),
            "metric": {"kind": spec.metric.kind, "normalize": spec.metric.normalize,
                       "clean_baseline": prep.clean_baseline(), "corrupted_baseline": prep.corrupted_baseline(),
                       "clean_per_prompt": prep.clean_per_prompt, "corrupted_per_prompt": prep.corrupted_per_prompt},
            "runs": run_notes,
            "timings_seconds": timings,
        });
        atomic::write_bytes(&manifest_path, serde_json::to_string_pretty(&manifest).map_err(|e| Error::Other(e.to_string()))?.as_bytes())?;
    }
    Ok(Outcome { files, manifest: manifest_path, summary })
}

/// A one-screen summary: the cells with the largest |value| per run.
fn top_cells(run: &str, rows: &[Row]) -> String {
    let mut means: Vec<&Row> = rows.iter().filter(|r| r.prompt.is_none()).collect();
    means.sort_by(|a, b| b.value.abs().total_cmp(&a.value.abs()));
    let mut s = format!("{run}: top cells by |value|\n");
    for r in means.iter().take(5) {
        let mut at = Vec::new();
        for (k, v) in [("head", r.head), ("pos", r.pos), ("dest", r.dest_pos), ("src", r.src_pos)] {
            if let Some(v) = v {
                at.push(format!("{k} {v}"));
            }
        }
        let tok = r.token.as_ref().map(|t| format!(" {t:?}")).unwrap_or_default();
        s.push_str(&format!("  {:<28} {:<18} {:>9.4}{tok}\n", r.hook, at.join(", "), r.value));
    }
    s
}
