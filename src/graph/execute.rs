//! Runs a resolved spec: shared jobs once (tokenizing, the clean and corrupted cached runs), then
//! each run, writing its Parquet as soon as it is complete and the manifest after every run, so a
//! failure later on leaves the finished outputs and a manifest that describes them.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use crate::engine::metric::Metric;
use crate::engine::nonfinite;
use crate::engine::tokenize::{TextTokenizer, TokenBatch};
use crate::error::{Error, Result};
use crate::experiments::attribution;
use crate::experiments::prepared::{Corrupt, Prepared};
use crate::graph::kinds;
use crate::model::hook_point::Site;
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
    /// None for noise corruption (the corrupted run reads the clean tokens).
    pub corrupted: Option<Tensor>,
    pub mask: Option<Tensor>,
    pub correct: Vec<i64>,
    pub incorrect: Vec<i64>,
    /// The clean prompts' tokens as strings, for the `token` column.
    pub clean_strs: Vec<Vec<String>>,
    /// Noise corruption: [n, pos] true at the token positions to noise.
    pub noised: Option<Tensor>,
    /// What the manifest records: prepend_bos as applied and every prompt's token ids.
    pub record: serde_json::Value,
}

impl Tokenized {
    pub fn n_prompts(&self) -> usize {
        self.clean_strs.len()
    }
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

/// Positions of `word`'s tokens in `ids` (with or without a leading space), if present.
fn find_word(tok: &TextTokenizer, ids: &[i64], word: &str) -> Result<Option<std::ops::Range<usize>>> {
    for form in [format!(" {word}"), word.to_string()] {
        let w = tok.encode(&form, false)?;
        if w.is_empty() {
            continue;
        }
        if let Some(start) = ids.windows(w.len()).position(|win| win == w.as_slice()) {
            return Ok(Some(start..start + w.len()));
        }
    }
    Ok(None)
}

/// [n, seq] true at the positions a noise corruption noises (left padding accounted for).
fn noise_positions(tok: &TextTokenizer, clean: &TokenBatch, positions: &Option<Vec<i64>>, words: &Option<Vec<String>>) -> Result<Tensor> {
    let (n, seq) = (clean.tokens.size()[0], clean.tokens.size()[1]);
    let mut mask = vec![false; (n * seq) as usize];
    for p in 0..n as usize {
        let len = clean.lengths[p] as i64;
        let pad = seq - len;
        let ids: Vec<i64> = Vec::try_from(clean.tokens.get(p as i64).narrow(0, pad, len))?;
        let mut set = |i: i64| mask[p * seq as usize + (pad + i) as usize] = true;
        if let Some(pos) = positions {
            for &i in pos {
                if i >= len {
                    return Err(Error::Config(format!("corruption.positions: prompt {p} has {len} tokens, so position {i} does not exist")));
                }
                set(i);
            }
        }
        // Every word found is noised; a prompt must contain at least one of them.
        if let Some(words) = words {
            let mut found = false;
            for w in words {
                if let Some(r) = find_word(tok, &ids, w)? {
                    r.for_each(|i| set(i as i64));
                    found = true;
                }
            }
            if !found {
                let shown = ids.iter().map(|&i| format!("{:?}", tok.token_str(i))).collect::<Vec<_>>().join(", ");
                return Err(Error::Config(format!("corruption.words: prompt {p} has no tokens spelling any of {words:?}: [{shown}]")));
            }
        }
    }
    Ok(Tensor::from_slice(&mask).view([n, seq]))
}

pub fn tokenize(spec: &Spec, tok: &TextTokenizer, cfg: &crate::model::config::ModelConfig, needs_corruption: bool) -> Result<Tokenized> {
    let needs_answers = spec.runs.iter().any(|r| r.kind.needs_answers());
    let bos = spec.model.prepend_bos_for(cfg);
    let clean_texts: Vec<&str> = spec.prompts.iter().map(|p| p.clean.as_str()).collect();
    let clean = tok.batch(&clean_texts, bos)?;
    let mut noised = None;
    let corrupted = match &spec.corruption {
        _ if !needs_corruption => None,
        Corruption::SwapPairs => {
            let n = clean_texts.len() as i64;
            let swapped: Vec<i64> = (0..n).map(|i| i ^ 1).collect();
            let idx = Tensor::from_slice(&swapped);
            Some(TokenBatch {
                tokens: clean.tokens.index_select(0, &idx),
                mask: clean.mask.as_ref().map(|m| m.index_select(0, &idx)),
                lengths: swapped.iter().map(|&i| clean.lengths[i as usize]).collect(),
            })
        }
        Corruption::Prompts | Corruption::ReplaceTokens(_) => {
            let texts: Vec<&str> = spec.prompts.iter().map(|p| p.corrupted.as_deref().unwrap_or(&p.clean)).collect();
            Some(tok.batch(&texts, bos)?)
        }
        Corruption::Noise { positions, words, .. } => {
            noised = Some(noise_positions(tok, &clean, positions, words)?);
            None
        }
    };
    if let Some(corrupted) = &corrupted {
        for (i, (a, b)) in clean.lengths.iter().zip(&corrupted.lengths).enumerate() {
            if a != b || clean.tokens.size() != corrupted.tokens.size() {
                return Err(Error::Other(format!(
                    "prompt {i}: clean is {a} tokens and corrupted is {b}; patching by position needs equal token lengths"
                )));
            }
        }
    }
    let mut correct = Vec::new();
    let mut incorrect = Vec::new();
    let mut problems = Vec::new();
    for (i, p) in spec.prompts.iter().enumerate().filter(|_| needs_answers) {
        match single_token(tok, &p.correct, i, "correct") {
            Ok(id) => correct.push(id),
            Err(e) => problems.push(e.to_string()),
        }
        if let Some(w) = &p.incorrect {
            match single_token(tok, w, i, "incorrect") {
                Ok(id) => incorrect.push(id),
                Err(e) => problems.push(e.to_string()),
            }
        }
    }
    // Every answer that is not one token, not just the first.
    if !problems.is_empty() {
        return Err(Error::Other(problems.join("\n")));
    }
    // A tokenizer larger than the model's embedding gives ids the model has no row for.
    let in_vocab = |id: i64, what: String| {
        crate::engine::tokenize::check_in_vocab(tok, id, cfg.d_vocab).map_err(|e| Error::Config(format!("{what}: {e}")))
    };
    for (i, (&c, w)) in correct.iter().zip(incorrect.iter().map(Some).chain(std::iter::repeat(None))).enumerate() {
        in_vocab(c, format!("prompt {i}: the correct answer"))?;
        if let Some(&w) = w {
            in_vocab(w, format!("prompt {i}: the incorrect answer"))?;
        }
    }
    for (which, b) in [("clean", Some(&clean)), ("corrupted", corrupted.as_ref())] {
        if let Some(b) = b {
            if let Some(max) = Vec::<i64>::try_from(b.tokens.flatten(0, -1)).unwrap_or_default().into_iter().max() {
                in_vocab(max, format!("the {which} prompts"))?;
            }
        }
    }
    let clean_strs = (0..clean_texts.len() as i64)
        .map(|i| Vec::<i64>::try_from(clean.tokens.get(i)).unwrap_or_default().into_iter().map(|t| tok.token_str(t)).collect())
        .collect();
    let unpadded = |b: &TokenBatch| -> Vec<Vec<i64>> {
        b.lengths.iter().enumerate().map(|(i, &len)| Vec::<i64>::try_from(b.tokens.get(i as i64).narrow(0, b.tokens.size()[1] - len as i64, len as i64)).unwrap_or_default()).collect()
    };
    let record = serde_json::json!({
        "prepend_bos": bos,
        "clean": unpadded(&clean),
        "corrupted": corrupted.as_ref().map(unpadded),
    });
    Ok(Tokenized { clean: clean.tokens, corrupted: corrupted.map(|c| c.tokens), mask: clean.mask, correct, incorrect, clean_strs, noised, record })
}

/// The first position at which the corrupted run differs from the clean one (seq_len if none).
pub fn first_changed(toks: &Tokenized) -> i64 {
    let seq = toks.clean.size()[1];
    match (&toks.corrupted, &toks.noised) {
        (Some(c), _) => crate::experiments::prepared::first_difference(&toks.clean, c),
        (None, Some(noised)) => {
            let any: Vec<bool> = Vec::try_from(noised.any_dims(&[0i64][..], false)).unwrap_or_default();
            any.iter().position(|b| *b).map_or(seq, |p| p as i64)
        }
        _ => seq,
    }
}

/// The corrupted runs' noise, [samples·n, seq, d_model]: torch's CPU generator seeded with
/// `seed` (torch.manual_seed(seed); torch.randn(samples, n, seq, d_model)), times `scale` × the
/// std of W_E, zero outside the noised positions.
pub fn embedding_noise(model: &Model, noised: &Tensor, scale: f64, samples: usize, seed: u64) -> Tensor {
    let (n, seq) = (noised.size()[0], noised.size()[1]);
    let d = model.cfg.d_model as i64;
    tch::manual_seed(seed as i64);
    let raw = Tensor::randn([samples as i64, n, seq, d], (Kind::Float, Device::Cpu));
    // The std of the unscaled embedding matrix, as TransformerLens 4.3's W_E.std() (Gemma's
    // sqrt(d_model) is folded into our W_E).
    let std = model.weights.w_e.to_device(Device::Cpu).to_kind(Kind::Float).std(true) / model.cfg.embed_scale;
    let noise = raw * (std * scale) * noised.to_kind(Kind::Float).view([1, n, seq, 1]);
    noise.view([samples as i64 * n, seq, d])
}

/// The clean and corrupted runs every patching run of the spec shares.
fn prepare(spec: &Spec, model: &Model, toks: &Tokenized) -> Result<Prepared> {
    let mut sites: Vec<Site> = Vec::new();
    for r in &spec.runs {
        let needed: Vec<Site> = match &r.kind {
            RunKind::ActivationPatching { targets } => targets.iter().map(|(s, _)| *s).collect(),
            RunKind::AttributionPatching { targets, options, .. } => {
                let t: Vec<_> = targets.iter().map(|(s, a)| crate::experiments::activation_patching::Target { site: *s, axes: *a }).collect();
                attribution::clean_sites(model, &t, *options)
            }
            _ => vec![],
        };
        for s in needed {
            if !sites.contains(&s) {
                sites.push(s);
            }
        }
    }
    let samples = spec.corruption.samples() as i64;
    let tile = |t: &Tensor| t.repeat([samples, 1]);
    let metric = Metric {
        kind: spec.metric.kind,
        correct: toks.correct.repeat(samples as usize),
        incorrect: toks.incorrect.repeat(samples as usize),
    };
    let (clean, corrupt) = match (&spec.corruption, &toks.corrupted, &toks.noised) {
        (Corruption::Noise { noise, samples, seed, .. }, _, Some(noised)) => {
            let noise_t = embedding_noise(model, noised, *noise, *samples, *seed);
            (tile(&toks.clean), Corrupt::EmbedNoise { noise: noise_t, first: first_changed(toks) })
        }
        (_, Some(c), _) => (toks.clean.shallow_clone(), Corrupt::Tokens(c.shallow_clone())),
        _ => return Err(Error::Other("patching needs a corruption".into())),
    };
    Prepared::new(model, clean, corrupt, toks.mask.as_ref().map(&tile), metric, &sites)
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
        run.check_model(&model.cfg, &spec.file).map_err(Error::Config)?;
    }
    let mut timings: BTreeMap<String, f64> = BTreeMap::new();
    let manifest_path = spec.output_dir.join("manifest.json");
    let weights: Vec<serde_json::Value> = match &model.files {
        Some(f) => f.weights.iter().map(|w| Ok(serde_json::json!({"file": w.display().to_string(), "sha256": sha256_file(w)?}))).collect::<Result<_>>()?,
        None => vec![],
    };
    let mut record = Record { spec, model, weights, path: manifest_path.clone(), nonfinite: Vec::new() };
    if let Some(f) = nonfinite::first_in_weights(model) {
        record.found(f, &serde_json::Map::new(), &timings, None, None)?;
    }
    let t = Instant::now();
    let needs_prompts = spec.runs.iter().any(|r| r.kind.needs_prompts());
    let needs_corruption = spec.runs.iter().any(|r| r.kind.needs_corruption());
    let toks = if needs_prompts { Some(tokenize(spec, model.tokenizer()?, &model.cfg, needs_corruption)?) } else { None };
    timings.insert("tokenize".into(), t.elapsed().as_secs_f64());

    let needs_prep = spec.runs.iter().any(|r| r.kind.patch_targets().is_some());
    let prep = match (&toks, needs_prep) {
        (Some(toks), true) => {
            let t = Instant::now();
            let p = crate::panics::guarded("the clean and corrupted runs", || prepare(spec, model, toks))?;
            timings.insert("clean and corrupted runs".into(), t.elapsed().as_secs_f64());
            tracing::info!(clean = p.clean_baseline(), corrupted = p.corrupted_baseline(), first_diff = p.first_diff, "baselines");
            Some(p)
        }
        _ => None,
    };
    if let (Some(p), Some(t)) = (&prep, &toks) {
        // A NaN baseline: find the first hook of the clean (or corrupted) run it comes from.
        let bad_clean = p.clean_per_prompt.iter().any(|v| !v.is_finite());
        if bad_clean || p.corrupted_per_prompt.iter().any(|v| !v.is_finite()) {
            let (which, tokens) = if bad_clean { ("clean", Some(&t.clean)) } else { ("corrupted", t.corrupted.as_ref()) };
            let found = match tokens {
                Some(tokens) => nonfinite::first_in_activations(model, tokens, t.mask.as_ref())?,
                None => None,
            };
            let f = found.unwrap_or_else(|| nonfinite::Finding { kind: "baseline".into(), at: format!("the {which} run's metric"), count: 1, prompt: None, position: None });
            record.found(f, &serde_json::Map::new(), &timings, Some(p), Some(t))?;
        }
    }

    std::fs::create_dir_all(&spec.output_dir).map_err(|e| Error::io(&spec.output_dir, e))?;
    let mut files = Vec::new();
    let mut run_notes = serde_json::Map::new();
    let mut summary = String::new();
    let cx = kinds::RunContext::new(spec, model, toks.as_ref(), prep.as_ref(), show_progress);
    for run in &spec.runs {
        let t_run = Instant::now();
        let (rows, mut note) = crate::panics::guarded(run.kind_name(), || kinds::run(&cx, run, &mut timings)).map_err(|e| match e {
            Error::Config(m) => Error::Config(format!("run '{}': {m}", run.name)),
            other => Error::Other(format!("run '{}': {other}", run.name)),
        })?;
        let bad: Vec<&Row> = rows.iter().filter(|r| !r.value.is_finite() || r.patched.is_some_and(|p| !p.is_finite())).collect();
        if let Some(first) = bad.first() {
            let f = nonfinite::Finding { kind: "result".into(), at: format!("run '{}' ({})", run.name, first.hook), count: bad.len() as i64, prompt: first.prompt.map(i64::from), position: first.pos.map(i64::from) };
            record.found(f, &run_notes, &timings, prep.as_ref(), toks.as_ref())?;
        }
        let path = atomic::file_in(&spec.output_dir, &run.name, ".parquet")?;
        write_parquet(&path, &rows)?;
        files.push(path.clone());
        timings.insert(format!("{} (total)", run.name), t_run.elapsed().as_secs_f64());
        note["kind"] = run.kind_name().into();
        note["file"] = path.file_name().map(|f| f.to_string_lossy().into_owned()).into();
        note["rows"] = rows.len().into();
        run_notes.insert(run.name.clone(), note);
        summary.push_str(&top_rows(&run.name, &rows));
        record.write(&run_notes, &timings, prep.as_ref(), toks.as_ref())?;
    }
    Ok(Outcome { files, manifest: manifest_path, summary })
}

/// What the manifest records, written after every run (and when a run stops on a NaN).
struct Record<'a> {
    spec: &'a Spec,
    model: &'a Model,
    weights: Vec<serde_json::Value>,
    path: PathBuf,
    nonfinite: Vec<nonfinite::Finding>,
}

impl Record<'_> {
    fn write(&self, runs: &serde_json::Map<String, serde_json::Value>, timings: &BTreeMap<String, f64>, prep: Option<&Prepared>, toks: Option<&Tokenized>) -> Result<()> {
        let spec = self.spec;
        let metric = match prep {
            Some(p) => serde_json::json!({"kind": spec.metric.kind, "noise_samples_per_prompt": spec.corruption.samples(), "normalize": spec.metric.normalize,
                       "clean_baseline": p.clean_baseline(), "corrupted_baseline": p.corrupted_baseline(),
                       "clean_per_prompt": p.clean_per_prompt, "corrupted_per_prompt": p.corrupted_per_prompt}),
            None => serde_json::json!({"kind": spec.metric.kind, "normalize": spec.metric.normalize}),
        };
        let manifest = serde_json::json!({
            "spec": spec,
            "spec_hash": spec.spec_hash,
            "model": {
                "id": spec.model.id,
                "family": self.model.cfg.family,
                "resolved_commit": self.model.files.as_ref().and_then(|f| f.commit.clone()),
                "weights": self.weights,
                "processing": self.model.processing,
            },
            "tl_run": {"version": env!("CARGO_PKG_VERSION"), "git_commit": option_env!("TL_RUN_GIT_COMMIT").unwrap_or("unknown")},
            "device": format!("{:?}", self.model.device),
            "dtype": format!("{:?}", self.model.kind),
            "metric": metric,
            "tokens": toks.map(|t| t.record.clone()),
            "runs": runs,
            "nonfinite": self.nonfinite,
            "timings_seconds": timings,
        });
        std::fs::create_dir_all(&spec.output_dir).map_err(|e| Error::io(&spec.output_dir, e))?;
        atomic::write_bytes(&self.path, serde_json::to_string_pretty(&manifest).map_err(|e| Error::Other(e.to_string()))?.as_bytes())
    }

    /// Records a NaN/inf finding; unless the spec allows them, writes the manifest with it and
    /// stops the run with an error naming where it first appeared.
    fn found(&mut self, f: nonfinite::Finding, runs: &serde_json::Map<String, serde_json::Value>, timings: &BTreeMap<String, f64>, prep: Option<&Prepared>, toks: Option<&Tokenized>) -> Result<()> {
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

/// A one-screen summary: the rows with the largest |value| per run.
fn top_rows(run: &str, rows: &[Row]) -> String {
    let mut means: Vec<&Row> = rows.iter().filter(|r| r.prompt.is_none() && r.rank.is_none()).collect();
    means.sort_by(|a, b| b.value.abs().total_cmp(&a.value.abs()));
    let mut s = format!("{run}: top rows by |value|\n");
    for r in means.iter().take(5) {
        let mut at = Vec::new();
        for (k, v) in [("head", r.head), ("pos", r.pos), ("dest", r.dest_pos), ("src", r.src_pos), ("neuron", r.neuron)] {
            if let Some(v) = v {
                at.push(format!("{k} {v}"));
            }
        }
        let what = r.label.clone().or_else(|| r.pattern.clone()).unwrap_or_else(|| r.hook.clone());
        let what = if r.pattern.is_some() { format!("{} {}", r.pattern.as_deref().unwrap_or(""), r.hook) } else { what };
        let tok = r.token.as_ref().map(|t| format!(" {t:?}")).unwrap_or_default();
        s.push_str(&format!("  {:<28} {:<18} {:>9.4}{tok}\n", what, at.join(", "), r.value));
    }
    s
}
