//! Logits references (safetensors: `logits.<i>` [pos, vocab] f32 and `tokens.<i>` [pos] i64 per
//! prompt, the prompts and their source in the metadata) and the comparator metrics of
//! TransformerLens's hf-tl-logit-comparator demo, computed over every position of every prompt.
use std::collections::HashMap;
use std::path::Path;

use crate::error::{Error, Result};

/// One prompt's tokens and logits, row-major [pos, vocab].
#[derive(Debug, Clone, PartialEq)]
pub struct PromptLogits {
    pub tokens: Vec<i64>,
    pub logits: Vec<f32>,
    pub vocab: usize,
}

/// A stored reference: per prompt, the tokens it was run on and the logits.
#[derive(Debug, Clone)]
pub struct Reference {
    pub prompts: Vec<String>,
    pub items: Vec<PromptLogits>,
    /// Who made it ("transformers 4.57.1 float32", "tl-run 0.1.0 float32").
    pub source: String,
}

fn bad(path: &Path, why: impl Into<String>) -> Error {
    Error::Other(format!("reference {}: {}", path.display(), why.into()))
}

impl Reference {
    pub fn read(path: &Path) -> Result<Reference> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| bad(path, format!("not a safetensors file: {e}")))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(path, e.to_string()))?;
        let meta: HashMap<String, String> = meta.metadata().clone().unwrap_or_default();
        let prompts: Vec<String> = meta
            .get("prompts")
            .ok_or_else(|| bad(path, "no 'prompts' in the metadata"))
            .and_then(|p| serde_json::from_str(p).map_err(|e| bad(path, format!("metadata 'prompts': {e}"))))?;
        let mut items = Vec::with_capacity(prompts.len());
        for i in 0..prompts.len() {
            let l = st.tensor(&format!("logits.{i}")).map_err(|_| bad(path, format!("no tensor logits.{i}")))?;
            let t = st.tensor(&format!("tokens.{i}")).map_err(|_| bad(path, format!("no tensor tokens.{i}")))?;
            let (shape, tshape) = (l.shape().to_vec(), t.shape().to_vec());
            if l.dtype() != safetensors::Dtype::F32 || shape.len() != 2 {
                return Err(bad(path, format!("logits.{i} must be F32 [pos, vocab], is {:?} {shape:?}", l.dtype())));
            }
            if t.dtype() != safetensors::Dtype::I64 || tshape != [shape[0]] {
                return Err(bad(path, format!("tokens.{i} must be I64 [{}], is {:?} {tshape:?}", shape[0], t.dtype())));
            }
            let logits = l.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            let tokens = t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect();
            items.push(PromptLogits { tokens, logits, vocab: shape[1] });
        }
        Ok(Reference { prompts, items, source: meta.get("source").cloned().unwrap_or_else(|| "unknown".into()) })
    }

    pub fn write(&self, path: &Path, extra: &[(&str, String)]) -> Result<()> {
        let mut owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        for (i, it) in self.items.iter().enumerate() {
            let n = it.tokens.len();
            owned.push((
                format!("logits.{i}"),
                safetensors::Dtype::F32,
                vec![n, it.vocab],
                it.logits.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ));
            owned.push((
                format!("tokens.{i}"),
                safetensors::Dtype::I64,
                vec![n],
                it.tokens.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ));
        }
        let views = owned
            .iter()
            .map(|(n, d, s, b)| {
                safetensors::tensor::TensorView::new(*d, s.clone(), b)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| Error::Other(format!("safetensors {n}: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut meta = HashMap::from([
            ("prompts".to_string(), serde_json::to_string(&self.prompts).unwrap_or_default()),
            ("source".to_string(), self.source.clone()),
        ]);
        for (k, v) in extra {
            meta.insert(k.to_string(), v.clone());
        }
        let bytes =
            safetensors::serialize(views, &Some(meta)).map_err(|e| Error::Other(format!("safetensors: {e}")))?;
        crate::output::atomic::write_bytes(path, &bytes)
    }
}

/// The comparator's figures for ours against the reference.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Comparison {
    /// Logits outside |ours − ref| ≤ atol + rtol·|ref| (torch.allclose's rule), and all logits.
    pub outside: usize,
    pub elements: usize,
    pub max_abs_diff: f64,
    pub mse: f64,
    /// Mean over positions of the cosine similarity of the two logit vectors.
    pub cosine: f64,
    /// Mean over positions of the KL divergence between the next-token distributions.
    pub kl_ref_ours: f64,
    pub kl_ours_ref: f64,
    /// Fraction of positions whose argmax agrees.
    pub top1: f64,
    pub positions: usize,
}

fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let lse = max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
    row.iter().map(|&v| v as f64 - lse).collect()
}

fn argmax(row: &[f32]) -> usize {
    // The first maximum, as torch.argmax; NaN never wins.
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] || row[best].is_nan() {
            best = i;
        }
    }
    best
}

/// Compares prompt by prompt (equal shapes required: the caller ran ours on the reference's tokens).
pub fn compare(ours: &[PromptLogits], reference: &[PromptLogits], atol: f64, rtol: f64) -> Result<Comparison> {
    if ours.len() != reference.len() {
        return Err(Error::Other(format!("{} prompts against a reference of {}", ours.len(), reference.len())));
    }
    let mut c = Comparison {
        outside: 0,
        elements: 0,
        max_abs_diff: 0.0,
        mse: 0.0,
        cosine: 0.0,
        kl_ref_ours: 0.0,
        kl_ours_ref: 0.0,
        top1: 0.0,
        positions: 0,
    };
    let mut sq = 0.0;
    for (i, (o, r)) in ours.iter().zip(reference).enumerate() {
        if o.vocab != r.vocab || o.logits.len() != r.logits.len() {
            return Err(Error::Other(format!(
                "prompt {i}: our logits are [{}, {}], the reference's [{}, {}]",
                o.logits.len() / o.vocab.max(1),
                o.vocab,
                r.logits.len() / r.vocab.max(1),
                r.vocab
            )));
        }
        for (orow, rrow) in o.logits.chunks_exact(o.vocab).zip(r.logits.chunks_exact(r.vocab)) {
            let (mut dot, mut no, mut nr) = (0.0f64, 0.0f64, 0.0f64);
            for (&a, &b) in orow.iter().zip(rrow) {
                let (a, b) = (a as f64, b as f64);
                let d = (a - b).abs();
                if !(d <= atol + rtol * b.abs()) {
                    c.outside += 1;
                }
                c.max_abs_diff = if d.is_nan() || c.max_abs_diff.is_nan() { f64::NAN } else { c.max_abs_diff.max(d) };
                sq += d * d;
                dot += a * b;
                no += a * a;
                nr += b * b;
            }
            // torch's cosine_similarity clamps each norm at eps = 1e-8.
            c.cosine += dot / (no.sqrt().max(1e-8) * nr.sqrt().max(1e-8));
            let (lo, lr) = (log_softmax(orow), log_softmax(rrow));
            let kl = |p: &[f64], q: &[f64]| {
                p.iter()
                    .zip(q)
                    .map(|(&lp, &lq)| if lp == f64::NEG_INFINITY { 0.0 } else { lp.exp() * (lp - lq) })
                    .sum::<f64>()
            };
            c.kl_ref_ours += kl(&lr, &lo);
            c.kl_ours_ref += kl(&lo, &lr);
            c.top1 += f64::from(u8::from(argmax(orow) == argmax(rrow)));
            c.positions += 1;
            c.elements += orow.len();
        }
    }
    let n = c.positions.max(1) as f64;
    c.mse = sq / c.elements.max(1) as f64;
    c.cosine /= n;
    c.kl_ref_ours /= n;
    c.kl_ours_ref /= n;
    c.top1 /= n;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(logits: Vec<f32>, vocab: usize) -> PromptLogits {
        PromptLogits { tokens: vec![0; logits.len() / vocab], logits, vocab }
    }

    #[test]
    fn identical_logits_compare_perfectly() {
        let a = vec![p(vec![1.0, 2.0, 3.0, 0.5, -1.0, 2.0], 3)];
        let c = compare(&a, &a, 0.0, 0.0).unwrap();
        assert_eq!((c.outside, c.max_abs_diff, c.mse, c.top1), (0, 0.0, 0.0, 1.0));
        assert!((c.cosine - 1.0).abs() < 1e-12 && c.kl_ref_ours.abs() < 1e-15 && c.kl_ours_ref.abs() < 1e-15);
    }

    #[test]
    fn a_changed_argmax_and_a_nan_are_caught() {
        let r = vec![p(vec![1.0, 2.0, 3.0], 3)];
        let o = vec![p(vec![1.0, 3.5, 3.0], 3)];
        let c = compare(&o, &r, 1e-4, 0.0).unwrap();
        assert_eq!((c.outside, c.top1), (1, 0.0));
        assert!((c.max_abs_diff - 1.5).abs() < 1e-12 && (c.mse - 0.75).abs() < 1e-12);
        assert!(c.kl_ref_ours > 0.0 && c.kl_ours_ref > 0.0);
        let n = vec![p(vec![1.0, f32::NAN, 3.0], 3)];
        let c = compare(&n, &r, 1e-4, 0.0).unwrap();
        assert!(c.outside == 1 && c.max_abs_diff.is_nan());
    }
}
