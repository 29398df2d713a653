//! Text to token ids the way TransformerLens does it: BOS prepended by default unless the
//! tokenizer's own post-processor already adds it (Llama), and batches of unequal length
//! left-padded with an attention mask.
use std::path::Path;

use tch::{Kind, Tensor};

use crate::error::{Error, Result};

/// A token's byte range in the text it was read from, (start, end).
pub type ByteRange = (usize, usize);

#[derive(Clone)]
pub struct TextTokenizer {
    tok: tokenizers::Tokenizer,
    pub bos_id: Option<i64>,
    pub pad_id: i64,
    /// The tokenizer adds BOS itself (TL's `tokenizer_prepends_bos`).
    prepends_bos: bool,
}

/// A tokenized batch, left-padded.
pub struct TokenBatch {
    pub tokens: Tensor, // [batch, pos] int64
    /// [batch, pos], 1 = real token; None when every prompt has the same length.
    pub mask: Option<Tensor>,
    pub lengths: Vec<usize>,
}

fn special_token(cfg: &serde_json::Value, key: &str) -> Option<String> {
    match cfg.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl TextTokenizer {
    pub fn load(path: &Path, tokenizer_config: Option<&Path>, model_config: &serde_json::Value) -> Result<Self> {
        let tok =
            tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        let tcfg = match tokenizer_config {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
                serde_json::from_str(&text).map_err(|e| Error::Tokenizer(format!("{}: {e}", p.display())))?
            }
            None => serde_json::Value::Null,
        };
        Self::from_parts(tok, &tcfg, model_config)
    }

    /// A tokenizer with its special tokens named by tokenizer_config.json (`tcfg`, or Null) and
    /// config.json's token ids.
    pub fn from_parts(
        tok: tokenizers::Tokenizer,
        tcfg: &serde_json::Value,
        model_config: &serde_json::Value,
    ) -> Result<Self> {
        let id_of = |key: &str| special_token(tcfg, key).and_then(|t| tok.token_to_id(&t)).map(i64::from);
        let from_model = |key: &str| model_config.get(key).and_then(|v| v.as_i64());
        let bos_id = id_of("bos_token").or_else(|| from_model("bos_token_id"));
        let eos_id = id_of("eos_token").or_else(|| from_model("eos_token_id"));
        let pad_id = id_of("pad_token").or_else(|| from_model("pad_token_id")).or(eos_id).or(bos_id).unwrap_or(0);
        let prepends_bos = !tok.encode("", true).map_err(|e| Error::Tokenizer(e.to_string()))?.get_ids().is_empty();
        Ok(TextTokenizer { tok, bos_id, pad_id, prepends_bos })
    }

    /// Token ids of one prompt; `prepend_bos` as TransformerLens's to_tokens.
    pub fn encode(&self, text: &str, prepend_bos: bool) -> Result<Vec<i64>> {
        let enc = self.tok.encode(text, self.prepends_bos).map_err(|e| Error::Tokenizer(e.to_string()))?;
        let mut ids: Vec<i64> = enc.get_ids().iter().map(|&i| i64::from(i)).collect();
        match (prepend_bos, self.prepends_bos) {
            (true, false) => {
                let bos = self
                    .bos_id
                    .ok_or_else(|| Error::Tokenizer("prepend_bos is set but the tokenizer has no BOS token".into()))?;
                ids.insert(0, bos);
            }
            (false, true) if !ids.is_empty() && Some(ids[0]) == self.bos_id => {
                ids.remove(0);
            }
            _ => {}
        }
        Ok(ids)
    }

    /// Token ids of one prompt with each token's byte range in `text` (an added BOS has an
    /// empty range at 0).
    pub fn encode_with_offsets(&self, text: &str, prepend_bos: bool) -> Result<(Vec<i64>, Vec<ByteRange>)> {
        let enc = self.tok.encode(text, self.prepends_bos).map_err(|e| Error::Tokenizer(e.to_string()))?;
        let ids = self.encode(text, prepend_bos)?;
        let mut offsets: Vec<ByteRange> = enc.get_offsets().to_vec();
        // Line the offsets up with `encode`'s BOS handling.
        while offsets.len() > ids.len() {
            offsets.remove(0);
        }
        while offsets.len() < ids.len() {
            offsets.insert(0, (0, 0));
        }
        Ok((ids, offsets))
    }

    /// Several prompts as one left-padded batch. No prompts, or a prompt of no tokens, is an
    /// error: nothing downstream can measure an empty sequence.
    pub fn batch(&self, texts: &[impl AsRef<str>], prepend_bos: bool) -> Result<TokenBatch> {
        self.batch_with_tails(texts, prepend_bos, &[])
    }

    /// `batch`, with prompt i's tokens followed by `tails[i]` (token ids; none past the end of
    /// `tails`): a multi-token answer's tokens but its last, read teacher-forced.
    pub fn batch_with_tails(
        &self,
        texts: &[impl AsRef<str>],
        prepend_bos: bool,
        tails: &[Vec<i64>],
    ) -> Result<TokenBatch> {
        if texts.is_empty() {
            return Err(Error::Tokenizer("no prompts to tokenize".into()));
        }
        let mut seqs: Vec<Vec<i64>> =
            texts.iter().map(|t| self.encode(t.as_ref(), prepend_bos)).collect::<Result<_>>()?;
        if let Some(i) = seqs.iter().position(Vec::is_empty) {
            let why = if prepend_bos { "" } else { " and no BOS is prepended" };
            return Err(Error::Tokenizer(format!(
                "prompt {i} ({:?}) is no tokens{why}: give it some text{}",
                texts[i].as_ref(),
                if prepend_bos { "" } else { " or prepend BOS" }
            )));
        }
        for (s, tail) in seqs.iter_mut().zip(tails) {
            s.extend_from_slice(tail);
        }
        Ok(pad_left(&seqs, self.pad_id))
    }

    /// The string of one token, as the vocabulary spells it decoded (e.g. " John").
    pub fn token_str(&self, id: i64) -> String {
        u32::try_from(id).ok().and_then(|i| self.tok.decode(&[i], false).ok()).unwrap_or_else(|| format!("<{id}>"))
    }

    pub fn vocab_size(&self) -> usize {
        self.tok.get_vocab_size(true)
    }
}

/// A token id the model has an embedding row for, else an error naming the token.
pub fn check_in_vocab(tok: &TextTokenizer, id: i64, d_vocab: usize) -> Result<()> {
    if id < 0 || id as usize >= d_vocab {
        return Err(Error::Tokenizer(format!(
            "token {id} ({:?}) is outside the model's vocabulary of {d_vocab}: the tokenizer ({} tokens) is larger than the model's embedding",
            tok.token_str(id),
            tok.vocab_size()
        )));
    }
    Ok(())
}

/// Left-pads token sequences into one [batch, max_len] tensor with a mask (None if all equal).
pub fn pad_left(seqs: &[Vec<i64>], pad_id: i64) -> TokenBatch {
    let lengths: Vec<usize> = seqs.iter().map(Vec::len).collect();
    let max = lengths.iter().copied().max().unwrap_or(0);
    let mut flat = Vec::with_capacity(seqs.len() * max);
    let mut mask = Vec::with_capacity(seqs.len() * max);
    for s in seqs {
        let pad = max - s.len();
        flat.extend(std::iter::repeat_n(pad_id, pad).chain(s.iter().copied()));
        mask.extend(std::iter::repeat_n(0i64, pad).chain(std::iter::repeat_n(1i64, s.len())));
    }
    let shape = [seqs.len() as i64, max as i64];
    let ragged = lengths.iter().any(|&l| l != max);
    TokenBatch {
        tokens: Tensor::from_slice(&flat).view(shape),
        mask: ragged.then(|| Tensor::from_slice(&mask).view(shape).to_kind(Kind::Int64)),
        lengths,
    }
}
