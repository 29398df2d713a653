//! Attention-head scoring: TransformerLens's head_detector (how much each head's attention
//! matches a detection pattern), batched over many prompts, and the Exploratory Analysis demo's
//! stripe scores on repeated random tokens.
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::model::hook_point::{HookPoint, Site};
use crate::{Hooks, Input, Model, Stop};

/// What a head's attention is compared against.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Detection {
    /// Each token attends to the one before it.
    PreviousToken,
    /// To earlier copies of itself.
    DuplicateToken,
    /// To the token after an earlier copy of itself (duplicate shifted one column right).
    Induction,
    /// To the token `offset` after an earlier copy of itself (0 = duplicate, 1 = induction).
    SameToken { offset: usize },
    /// To the token `offset` before it (1 = previous token, 0 = itself).
    Relative { offset: usize },
    /// A given lower-triangular [seq, seq] matrix; only prompts of that many tokens.
    Matrix(Vec<Vec<f64>>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorMeasure {
    /// Σ(attention ⊙ pattern) / Σ attention.
    Mul,
    /// 1 − round(mean|attention − pattern| · seq, 3).
    Abs,
}

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct DetectOptions {
    pub measure: ErrorMeasure,
    pub exclude_bos: bool,
    pub exclude_current_token: bool,
}

/// The detection matrix for one prompt's tokens, [seq, seq] f32, exactly as head_detector.py
/// builds its named patterns.
pub fn detection_matrix(d: &Detection, tokens: &[i64]) -> Result<Tensor> {
    let t = tokens.len();
    let mut m = vec![0f32; t * t];
    let duplicate = |i: usize, j: usize| j < i && tokens[i] == tokens[j];
    match d {
        Detection::PreviousToken => (1..t).for_each(|i| m[i * t + i - 1] = 1.0),
        Detection::Relative { offset } => (*offset..t).for_each(|i| m[i * t + i - offset] = 1.0),
        Detection::DuplicateToken | Detection::Induction | Detection::SameToken { .. } => {
            let k = match d {
                Detection::DuplicateToken => 0,
                Detection::Induction => 1,
                Detection::SameToken { offset } => *offset,
                _ => unreachable!(),
            };
            // Shifted k columns right (columns before k zero), then lower-triangular.
            for i in 0..t {
                for j in k..=i {
                    if duplicate(i, j - k) {
                        m[i * t + j] = 1.0;
                    }
                }
            }
        }
        Detection::Matrix(rows) => {
            if rows.len() != t || rows.iter().any(|r| r.len() != t) {
                return Err(Error::Config(format!(
                    "the detection matrix is {}x{}, but the prompt has {t} tokens",
                    rows.len(),
                    rows.first().map_or(0, |r| r.len())
                )));
            }
            for (i, r) in rows.iter().enumerate() {
                for (j, v) in r.iter().enumerate() {
                    if j > i && *v != 0.0 {
                        return Err(Error::Config(format!(
                            "the detection matrix must be lower triangular: row {i} has {v} at column {j}"
                        )));
                    }
                    m[i * t + j] = *v as f32;
                }
            }
        }
    }
    Ok(Tensor::from_slice(&m).view([t as i64, t as i64]))
}

/// Scores of every head of one layer on one prompt: `attn` [heads, seq, seq], `det` [seq, seq].
pub fn similarity(attn: &Tensor, det: &Tensor, o: DetectOptions) -> Result<Vec<f64>> {
    let t = attn.size()[1];
    let det = det.to_device(attn.device());
    let keep = {
        let mut k = Tensor::ones([t, t], (Kind::Float, attn.device()));
        if o.exclude_bos {
            k = k.index_fill(1, &Tensor::from_slice(&[0i64]).to_device(attn.device()), 0.0);
        }
        if o.exclude_current_token {
            k = k * (1.0 - Tensor::eye(t, (Kind::Float, attn.device())));
        }
        k
    };
    let sum2 = |x: &Tensor| x.sum_dim_intlist(&[1i64, 2][..], false, Kind::Float);
    let scores = match o.measure {
        ErrorMeasure::Mul => {
            let a = attn * &keep;
            sum2(&(&a * &det)) / sum2(&a)
        }
        ErrorMeasure::Abs => {
            let a = (attn - &det).abs() * &keep;
            // mean in f32 as TL, then × seq and rounded to 3 decimals in f64.
            let mean = a.mean_dim(&[1i64, 2][..], false, Kind::Float).to_kind(Kind::Double) * t as f64;
            1.0 - (mean * 1000.0).round() / 1000.0
        }
    };
    Ok(Vec::try_from(scores.to_kind(Kind::Double))?)
}

/// Every layer's attention pattern, what head scoring reads.
pub fn pattern_points(model: &Model) -> Vec<HookPoint> {
    (0..model.cfg.n_layers).map(|l| HookPoint::Block(l, Site::Pattern)).collect()
}

/// Scores indexed [layer][head].
pub type LayerHeadScores = Vec<Vec<f64>>;

/// Scores every head against each detection from a run's cache of `pattern_points` for
/// `tokens`, per prompt (its own tokens, padding cut off) and averaged over prompts:
/// [layer][head] per detection.
pub fn detect_from(
    model: &Model,
    cache: &std::collections::HashMap<HookPoint, Tensor>,
    tokens: &Tensor,
    mask: Option<&Tensor>,
    detections: &[Detection],
    o: DetectOptions,
) -> Result<Vec<LayerHeadScores>> {
    let (n, seq) = (tokens.size()[0], tokens.size()[1]);
    if seq < 2 || seq >= model.cfg.n_ctx as i64 {
        return Err(Error::Config(format!(
            "head scores need prompts of 2 to {} tokens, got {seq}",
            model.cfg.n_ctx - 1
        )));
    }
    let n_layers = model.cfg.n_layers;
    let lengths: Vec<i64> = match mask {
        Some(m) => Vec::try_from(m.sum_dim_intlist(1, false, Kind::Int64).to_device(Device::Cpu))?,
        None => vec![seq; n as usize],
    };
    let heads = model.cfg.n_heads;
    let mut out = vec![vec![vec![0.0; heads]; n_layers]; detections.len()];
    for p in 0..n {
        let len = lengths[p as usize];
        let start = seq - len; // left padding
        let toks: Vec<i64> = Vec::try_from(tokens.get(p).narrow(0, start, len).to_device(Device::Cpu))?;
        let dets: Vec<Tensor> = detections.iter().map(|d| detection_matrix(d, &toks)).collect::<Result<_>>()?;
        for (l, point) in pattern_points(model).iter().enumerate() {
            let attn = cache
                .get(point)
                .ok_or_else(|| Error::Other(format!("{point} was not cached")))?
                .get(p)
                .narrow(1, start, len)
                .narrow(2, start, len);
            for (di, det) in dets.iter().enumerate() {
                for (h, s) in similarity(&attn, det, o)?.into_iter().enumerate() {
                    out[di][l][h] += s / n as f64;
                }
            }
        }
    }
    Ok(out)
}

/// `batch` rows of `seq_len` random tokens in [lo, hi), each repeated twice, from torch's CPU
/// generator seeded with `seed` (the same tokens torch.manual_seed + torch.randint give).
pub fn repeated_random_tokens(seed: u64, batch: i64, seq_len: i64, lo: i64, hi: i64) -> Tensor {
    tch::manual_seed(seed as i64);
    let rand = Tensor::randint_low(lo, hi, [batch, seq_len], (Kind::Int64, Device::Cpu));
    Tensor::cat(&[&rand, &rand], 1)
}

/// The Exploratory Analysis demo's scores on repeated random tokens: the mean attention on the
/// previous-token (offset −1), duplicate-token (−seq_len) and induction (1 − seq_len) stripes,
/// over batch and positions. Returns (name, [layer][head]).
pub fn repeated_stripes(model: &Model, tokens: &Tensor) -> Result<Vec<(&'static str, LayerHeadScores)>> {
    let seq_len = tokens.size()[1] / 2;
    let n_layers = model.cfg.n_layers;
    let mut hooks = Hooks::capture(pattern_points(model));
    // Only attention patterns are read: stop before ln_final and the unembedding.
    let _ = model.run(Input::Tokens(tokens), None, &mut hooks, Stop::BeforeLayer(n_layers))?;
    let mut out = Vec::new();
    for (name, offset) in [("previous_token", -1), ("duplicate_token", -seq_len), ("induction", 1 - seq_len)] {
        let mut per_layer = Vec::new();
        for l in 0..n_layers {
            let stripe = hooks.cache[&HookPoint::Block(l, Site::Pattern)].diagonal(offset, -2, -1); // [b, h, len]
            per_layer.push(Vec::try_from(stripe.mean_dim(&[0i64, 2][..], false, Kind::Float).to_kind(Kind::Double))?);
        }
        out.push((name, per_layer));
    }
    Ok(out)
}
