//! What every experiment kind reads, made once per spec: the tokenized clean and corrupted
//! prompts with their answers (checked: single tokens, in the vocabulary, equal lengths), the
//! positions a noise corruption noises and its noise, and the shared clean and corrupted runs.
//! It depends on the spec, the engine and the model only, so nothing cycles with it.
use tch::{Device, Kind, Tensor};

use crate::analysis::clean_corrupted::{CleanCorrupted, Corrupt};
use crate::engine::metric::Metric;
use crate::error::{Error, Result};
use crate::kinds::Spec;
use crate::model::hook_point::{HookPoint, Site};
use crate::model::tokenize::{TextTokenizer, TokenBatch};
use crate::model::Model;
use crate::spec::Corruption;

/// Clean and corrupted token batches with the answers, checked.
pub struct Tokenized {
    pub clean: Tensor,
    /// None for noise corruption (the corrupted run reads the clean tokens).
    pub corrupted: Option<Tensor>,
    pub mask: Option<Tensor>,
    /// Each prompt's correct token set, or (with `sequence`) its multi-token answer.
    pub correct: Vec<Vec<i64>>,
    /// Each prompt's incorrect token set (empty when it has none).
    pub incorrect: Vec<Vec<i64>>,
    /// Per prompt: whether `correct` is one answer of several tokens, all but the last appended
    /// to the prompt (clean and corrupted) and read teacher-forced.
    pub sequence: Vec<bool>,
    /// The clean prompts' tokens as strings, for the `token` column.
    pub clean_strs: Vec<Vec<String>>,
    /// Noise corruption: [n, pos] true at the token positions to noise.
    pub noised: Option<Tensor>,
    /// Template prompts: the roles every prompt has (its slots' fillers, then END, the last
    /// prompt token), each with its position in every prompt of the padded batch.
    pub roles: Vec<(String, Vec<i64>)>,
    /// What the manifest records: prepend_bos as applied and every prompt's token ids.
    pub record: serde_json::Value,
}

impl Tokenized {
    pub fn n_prompts(&self) -> usize {
        self.clean_strs.len()
    }

    /// How many pad tokens precede prompt `p` in the left-padded batch.
    pub fn padding(&self, p: usize) -> i64 {
        match &self.mask {
            Some(m) => self.clean.size()[1] - m.get(p as i64).sum(Kind::Int64).int64_value(&[]),
            None => 0,
        }
    }

    /// Role `name`'s position in every prompt, or an error naming the roles there are.
    pub fn role(&self, name: &str) -> Result<&[i64]> {
        match self.roles.iter().find(|(r, _)| r == name) {
            Some((_, at)) => Ok(at),
            None if self.roles.is_empty() => Err(Error::Config(format!(
                "role '{name}': the prompts have no roles; roles come from [prompts] templates"
            ))),
            None => Err(Error::Config(format!(
                "role '{name}' is not in every prompt (roles every prompt has: {})",
                self.roles.iter().map(|(r, _)| r.as_str()).collect::<Vec<_>>().join(", ")
            ))),
        }
    }

    /// The string of prompt p's token at `pos` (prompts repeat past the last: noise samples).
    pub fn token(&self, prompt: usize, pos: Option<i64>) -> Option<String> {
        token_at(&self.clean_strs, prompt, pos)
    }

    /// A copy with tensors of its own (tensors are not shared between threads).
    pub fn duplicate(&self) -> Tokenized {
        Tokenized {
            clean: self.clean.copy(),
            corrupted: self.corrupted.as_ref().map(Tensor::copy),
            mask: self.mask.as_ref().map(Tensor::copy),
            correct: self.correct.clone(),
            incorrect: self.incorrect.clone(),
            sequence: self.sequence.clone(),
            clean_strs: self.clean_strs.clone(),
            noised: self.noised.as_ref().map(Tensor::copy),
            roles: self.roles.clone(),
            record: self.record.clone(),
        }
    }
}

/// `Tokenized::token` on the token strings alone, which threads can share (the tensors beside
/// them are not shared between threads).
pub(crate) fn token_at(clean_strs: &[Vec<String>], prompt: usize, pos: Option<i64>) -> Option<String> {
    clean_strs.get(prompt % clean_strs.len().max(1))?.get(pos? as usize).cloned()
}

/// Each prompt's answers as token ids: the correct set (or one multi-token correct answer,
/// when the metric reads sequences), the incorrect set; every problem of every prompt at once.
struct AnswerIds {
    correct: Vec<Vec<i64>>,
    incorrect: Vec<Vec<i64>>,
    sequence: Vec<bool>,
}

fn answer_ids(spec: &Spec, tok: &TextTokenizer) -> Result<AnswerIds> {
    let kind = spec.metric.kind;
    let metric = crate::spec::resolve::metric_name(kind);
    let direction = spec.runs.iter().find(|r| r.kind.needs().metric_direction);
    let mut out = AnswerIds { correct: vec![], incorrect: vec![], sequence: vec![] };
    let mut problems = Vec::new();
    let shown = |ids: &[i64]| ids.iter().map(|&i| format!("{:?}", tok.token_str(i))).collect::<Vec<_>>().join(", ");
    for (i, p) in spec.prompts.iter().enumerate() {
        let name = p.name(i);
        let correct_words = p.correct_set();
        let mut correct = Vec::new();
        let mut sequence = false;
        for w in &correct_words {
            let ids = tok.encode(w, false)?;
            match ids.len() {
                0 => problems.push(format!("{name}: the correct answer {w:?} is no tokens")),
                1 => correct.push(ids[0]),
                k if correct_words.len() == 1 && kind.takes_sequences() => {
                    if let Some(run) = direction {
                        problems.push(format!("{name}: the correct answer {w:?} is {k} tokens [{}], and run '{}' ({}) reads one token's direction in the residual stream; give a single-token answer", shown(&ids), run.name, run.kind.name()));
                    }
                    correct = ids;
                    sequence = true;
                }
                k => problems.push(format!(
                    "{name}: the correct answer {w:?} is {k} tokens [{}], not one; {}",
                    shown(&ids),
                    if correct_words.len() > 1 {
                        "every answer of a token set is one token".to_string()
                    } else {
                        format!("metric {metric} compares single tokens: use a single-token answer (often with a leading space; some tokenizers split numbers into digits, so give the first digit or a set of them), or metric logprob / prob, which read a multi-token answer teacher-forced")
                    }
                )),
            }
        }
        let mut incorrect = Vec::new();
        for w in p.incorrect_set() {
            let ids = tok.encode(w, false)?;
            match ids.len() {
                1 => incorrect.push(ids[0]),
                k => problems.push(format!(
                    "{name}: the incorrect answer {w:?} is {k} tokens [{}], not one; incorrect answers are single tokens (often with a leading space)",
                    shown(&ids)
                )),
            }
        }
        if let Some(t) = correct.iter().find(|t| !sequence && incorrect.contains(t)) {
            problems.push(format!(
                "{name}: token {:?} is both a correct and an incorrect answer: the sets must not overlap",
                tok.token_str(*t)
            ));
        }
        out.correct.push(correct);
        out.incorrect.push(incorrect);
        out.sequence.push(sequence);
    }
    if !problems.is_empty() {
        return Err(Error::Other(problems.join("\n")));
    }
    Ok(out)
}

impl Tokenized {
    /// The spec's metric on these prompts' answers, read at the last position or at its role's.
    pub fn metric(&self, spec: &crate::spec::MetricSpec) -> Result<Metric> {
        let seq = self.clean.size()[1];
        let positions_from_end = match &spec.position {
            Some(role) => Some(self.role(role)?.iter().map(|p| seq - 1 - p).collect()),
            None => None,
        };
        Ok(Metric {
            kind: spec.kind,
            correct: self.correct.clone(),
            incorrect: self.incorrect.clone(),
            wrong: spec.wrong,
            sequence: self.sequence.clone(),
            positions_from_end,
            clean_logprobs: None,
        })
    }
}

/// The token a role's filler (byte span `span`) lands on: the last token overlapping it.
pub fn role_token(offsets: &[crate::model::tokenize::ByteRange], span: &std::ops::Range<usize>) -> Option<usize> {
    offsets.iter().rposition(|&(s, e)| e > s && s < span.end && e > span.start)
}

/// Each role every template prompt has, with its position in each prompt of the padded batch:
/// the last token overlapping the slot's filler (the last subject token, ROME's), then END, the
/// last prompt token (before any multi-token answer's tail).
fn role_positions(
    spec: &Spec,
    tok: &TextTokenizer,
    bos: bool,
    batch: &TokenBatch,
    tails: &[Vec<i64>],
) -> Result<Vec<(String, Vec<i64>)>> {
    if spec.prompts.iter().any(|p| p.roles.is_empty()) {
        return Ok(Vec::new());
    }
    let seq = batch.tokens.size()[1];
    let mut names: Vec<String> = spec.prompts[0].roles.iter().map(|(r, _)| r.clone()).collect();
    names.retain(|r| spec.prompts.iter().all(|p| p.roles.iter().any(|(q, _)| q == r)));
    let mut at: Vec<Vec<i64>> = vec![Vec::new(); names.len() + 1];
    for (i, p) in spec.prompts.iter().enumerate() {
        let (_, offsets) = tok.encode_with_offsets(&p.clean, bos)?;
        let pad = seq - batch.lengths[i] as i64;
        for (k, name) in names.iter().enumerate() {
            let span = &p.roles.iter().find(|(r, _)| r == name).expect("every prompt has it").1;
            let last = role_token(&offsets, span).ok_or_else(|| {
                Error::Config(format!("{}: role {name} ({:?}) covers no token", p.name(i), &p.clean[span.clone()]))
            })?;
            at[k].push(pad + last as i64);
        }
        let tail = tails.get(i).map_or(0, Vec::len) as i64;
        at[names.len()].push(seq - 1 - tail);
    }
    names.push("END".into());
    Ok(names.into_iter().zip(at).collect())
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
fn noise_positions(
    tok: &TextTokenizer,
    clean: &TokenBatch,
    positions: &Option<Vec<i64>>,
    words: &Option<Vec<String>>,
) -> Result<Tensor> {
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
                    return Err(Error::Config(format!(
                        "corruption.positions: prompt {p} has {len} tokens, so position {i} does not exist"
                    )));
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
                return Err(Error::Config(format!(
                    "corruption.words: prompt {p} has no tokens spelling any of {words:?}: [{shown}]"
                )));
            }
        }
    }
    Ok(Tensor::from_slice(&mask).view([n, seq]))
}

/// Refuses noise samples whose embedding noise alone ([samples·n, seq, d_model] f32, drawn on
/// the host) exceeds the host's memory, before anything is allocated: such a run could only end
/// in a failed allocation, or in the kernel killing the process.
fn noise_fits_in_memory(samples: usize, tokens: Vec<i64>, d_model: usize) -> Result<()> {
    let (n, seq) = (tokens[0] as u64, tokens.get(1).copied().unwrap_or(1) as u64);
    let bytes = (samples as u64)
        .checked_mul(n)
        .and_then(|b| b.checked_mul(seq))
        .and_then(|b| b.checked_mul(d_model as u64))
        .and_then(|b| b.checked_mul(4));
    let Some(host) = crate::engine::memory::past_host_memory(bytes) else { return Ok(()) };
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let need =
        bytes.map(|b| format!("{:.1} GiB", gib(b))).unwrap_or_else(|| "more bytes than a 64-bit count holds".into());
    let most = host / (n * seq * d_model as u64 * 4).max(1);
    Err(Error::Other(format!(
        "corruption.samples: {samples} noised copies of {n} prompt(s) of {seq} tokens need {need} for their embedding noise alone \
         (samples × prompts × tokens × d_model {d_model} × 4 bytes), more than this machine's {:.1} GiB of memory; use fewer samples (at most {most} fit that noise at all)",
        gib(host)
    )))
}

/// The prompts tokenized as TransformerLens does (BOS, left padding), their corrupted versions
/// (other prompts, replaced words or noised positions) and the answers' token ids, with every
/// problem of every prompt reported at once: one pass over the prompts, which is why it runs
/// past 80 lines.
pub fn tokenize(
    spec: &Spec,
    tok: &TextTokenizer,
    cfg: &crate::model::config::ModelConfig,
    needs_corruption: bool,
) -> Result<Tokenized> {
    let needs_answers = spec.runs.iter().any(|r| r.kind.needs().answers);
    let bos = spec.model.prepend_bos_for(cfg);
    let clean_texts: Vec<&str> = spec.prompts.iter().map(|p| p.clean.as_str()).collect();
    let answers = match needs_answers {
        true => answer_ids(spec, tok)?,
        false => AnswerIds { correct: vec![], incorrect: vec![], sequence: vec![] },
    };
    // A multi-token answer's tokens but the last follow its prompt, clean and corrupted.
    let tails: Vec<Vec<i64>> = answers
        .correct
        .iter()
        .zip(&answers.sequence)
        .map(|(c, s)| if *s { c[..c.len() - 1].to_vec() } else { vec![] })
        .collect();
    let with_tails = !tails.iter().all(Vec::is_empty);
    let clean = tok.batch_with_tails(&clean_texts, bos, &tails)?;
    // A multi-token answer read teacher-forced lengthens its prompt.
    if let Some(i) = (0..clean.lengths.len()).find(|&i| clean.lengths[i] > cfg.n_ctx && !tails[i].is_empty()) {
        return Err(Error::Config(format!(
            "{}: with its multi-token answer's tokens but the last ({} of them) it is {} tokens, more than the model's context of {}",
            spec.prompts[i].name(i),
            tails[i].len(),
            clean.lengths[i],
            cfg.n_ctx
        )));
    }
    let roles = role_positions(spec, tok, bos, &clean, &tails)?;
    let mut noised = None;
    let corrupted = match &spec.corruption {
        _ if !needs_corruption => None,
        Corruption::SwapPairs if with_tails => {
            // Prompt i^1's text with prompt i's answer continuation.
            let swapped: Vec<&str> = (0..clean_texts.len()).map(|i| clean_texts[i ^ 1]).collect();
            Some(tok.batch_with_tails(&swapped, bos, &tails)?)
        }
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
        Corruption::Prompts | Corruption::ReplaceTokens(_) | Corruption::Slots(_) => {
            let texts: Vec<&str> = spec.prompts.iter().map(|p| p.corrupted.as_deref().unwrap_or(&p.clean)).collect();
            Some(tok.batch_with_tails(&texts, bos, &tails)?)
        }
        Corruption::Noise { positions, words, samples, .. } => {
            noise_fits_in_memory(*samples, clean.tokens.size(), cfg.d_model)?;
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
    let AnswerIds { correct, incorrect, sequence } = answers;
    // A tokenizer larger than the model's embedding gives ids the model has no row for.
    let in_vocab = |id: i64, what: String| {
        crate::model::tokenize::check_in_vocab(tok, id, cfg.d_vocab).map_err(|e| Error::Config(format!("{what}: {e}")))
    };
    for (i, (c, w)) in correct.iter().zip(&incorrect).enumerate() {
        for &t in c {
            in_vocab(t, format!("{}: the correct answer", spec.prompts[i].name(i)))?;
        }
        for &t in w {
            in_vocab(t, format!("{}: the incorrect answer", spec.prompts[i].name(i)))?;
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
        .map(|i| {
            Vec::<i64>::try_from(clean.tokens.get(i))
                .unwrap_or_default()
                .into_iter()
                .map(|t| tok.token_str(t))
                .collect()
        })
        .collect();
    let unpadded = |b: &TokenBatch| -> Vec<Vec<i64>> {
        b.lengths
            .iter()
            .enumerate()
            .map(|(i, &len)| {
                Vec::<i64>::try_from(b.tokens.get(i as i64).narrow(0, b.tokens.size()[1] - len as i64, len as i64))
                    .unwrap_or_default()
            })
            .collect()
    };
    // Noised positions in each prompt's own tokens (the report marks them on its axes).
    let noised_positions = |m: &Tensor| -> Vec<Vec<i64>> {
        let seq = clean.tokens.size()[1];
        clean
            .lengths
            .iter()
            .enumerate()
            .map(|(i, &len)| {
                let pad = seq - len as i64;
                let row: Vec<bool> = Vec::try_from(m.get(i as i64)).unwrap_or_default();
                (pad..seq).filter(|&q| row.get(q as usize) == Some(&true)).map(|q| q - pad).collect()
            })
            .collect()
    };
    let record = serde_json::json!({
        "prepend_bos": bos,
        "clean": unpadded(&clean),
        "corrupted": corrupted.as_ref().map(unpadded),
        "noised": noised.as_ref().map(noised_positions),
    });
    Ok(Tokenized {
        clean: clean.tokens,
        corrupted: corrupted.map(|c| c.tokens),
        mask: clean.mask,
        correct,
        incorrect,
        sequence,
        clean_strs,
        noised,
        roles,
        record,
    })
}

/// The first position at which the corrupted run differs from the clean one (seq_len if none).
pub fn first_changed(toks: &Tokenized) -> i64 {
    let seq = toks.clean.size()[1];
    match (&toks.corrupted, &toks.noised) {
        (Some(c), _) => crate::analysis::clean_corrupted::first_difference(&toks.clean, c),
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
/// With `grad_points`, the corrupted run is kept for the attribution pass's backward there.
pub(crate) fn clean_corrupted_pass(
    spec: &Spec,
    model: &Model,
    toks: &Tokenized,
    grad_points: &[HookPoint],
) -> Result<CleanCorrupted> {
    // The union of the sites every run's kind says the clean run caches.
    let mut sites: Vec<Site> = Vec::new();
    for r in &spec.runs {
        for s in crate::kinds::captures(r, model)?.clean_sites {
            if !sites.contains(&s) {
                sites.push(s);
            }
        }
    }
    let samples = spec.corruption.samples() as i64;
    let metric = toks.metric(&spec.metric)?.tiled(samples as usize);
    let (clean, corrupt) = match (&spec.corruption, &toks.corrupted, &toks.noised) {
        (Corruption::Noise { noise, samples, seed, .. }, _, Some(noised)) => {
            let noise_t = embedding_noise(model, noised, *noise, *samples, *seed);
            // The clean prompts once: the clean run is shared by every noise sample.
            (toks.clean.shallow_clone(), Corrupt::EmbedNoise { noise: noise_t, first: first_changed(toks) })
        }
        (_, Some(c), _) => (toks.clean.shallow_clone(), Corrupt::Tokens(c.shallow_clone())),
        _ => return Err(Error::Other("patching needs a corruption".into())),
    };
    let mut prep = CleanCorrupted::keeping_gradients(
        model,
        clean,
        corrupt,
        toks.mask.as_ref().map(Tensor::shallow_clone),
        metric,
        &sites,
        grad_points,
    )?;
    prep.role_positions = toks.roles.iter().map(|(_, at)| at.repeat(samples as usize)).collect();
    Ok(prep)
}
