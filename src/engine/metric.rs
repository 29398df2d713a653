//! Metrics of a forward pass, per prompt, read from ln_final's output at each prompt's metric
//! position (the last one unless the spec names a role). They take ln_final's output rather than
//! full logits: a logit difference needs a few columns of W_U, not the vocabulary.
use tch::{Kind, Tensor};

use crate::model::Model;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricKind {
    /// mean logit(correct set) − mean (or max) logit(incorrect set).
    LogitDiff,
    /// log p(correct set); a multi-token answer: the sum of its tokens' log-probs, teacher-forced.
    Logprob,
    /// p(correct set); a multi-token answer: the product of its tokens' probabilities.
    Prob,
    /// p(correct set) − p(incorrect set) (greater-than's probability difference).
    ProbDiff,
    /// KL(clean ‖ run) of the next-token distributions at the metric position.
    KlDivergence,
}

impl MetricKind {
    pub const NAMES: [(&'static str, MetricKind); 5] = [
        ("logit_diff", MetricKind::LogitDiff),
        ("logprob", MetricKind::Logprob),
        ("prob", MetricKind::Prob),
        ("prob_diff", MetricKind::ProbDiff),
        ("kl_divergence", MetricKind::KlDivergence),
    ];

    /// Whether the metric compares the correct answer with incorrect ones.
    pub fn needs_incorrect(self) -> bool {
        matches!(self, MetricKind::LogitDiff | MetricKind::ProbDiff)
    }

    /// Whether a multi-token correct answer can be measured (its tokens' log-probs add up).
    pub fn takes_sequences(self) -> bool {
        matches!(self, MetricKind::Logprob | MetricKind::Prob)
    }

    /// Whether the metric is a linear function of the residual stream (a direction): what
    /// direct logit attribution decomposes.
    pub fn is_linear(self) -> bool {
        !matches!(self, MetricKind::KlDivergence)
    }
}

/// How logit_diff folds several incorrect answers into one logit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WrongAnswers {
    #[default]
    Mean,
    Max,
}

impl WrongAnswers {
    pub fn is_mean(&self) -> bool {
        *self == WrongAnswers::Mean
    }
}

/// A metric with each prompt's answer tokens. `correct[p]` is a set of tokens (their logits
/// averaged for logit_diff, their probabilities summed otherwise) or, with `sequence`, the
/// tokens of one multi-token answer read at consecutive positions ending at the last.
#[derive(Debug)]
pub struct Metric {
    pub kind: MetricKind,
    pub correct: Vec<Vec<i64>>,
    /// Required for logit_diff and prob_diff (a set per prompt).
    pub incorrect: Vec<Vec<i64>>,
    pub wrong: WrongAnswers,
    /// Per prompt: whether `correct` is one answer of several tokens (teacher-forced).
    pub sequence: Vec<bool>,
    /// Per prompt: how many positions before the last the prediction read is (None: the last).
    /// Counted from the end, so that a forward computing only the positions after a shared
    /// prefix reads the same token.
    pub positions_from_end: Option<Vec<i64>>,
    /// kl_divergence: the clean run's log-probs at each prompt's metric position, [n, vocab].
    pub clean_logprobs: Option<Tensor>,
}

impl Metric {
    /// One correct and (for logit_diff) one incorrect token per prompt, read at the last position.
    pub fn single(kind: MetricKind, correct: Vec<i64>, incorrect: Vec<i64>) -> Metric {
        let n = correct.len();
        Metric {
            kind,
            correct: correct.into_iter().map(|t| vec![t]).collect(),
            incorrect: incorrect.into_iter().map(|t| vec![t]).collect(),
            wrong: WrongAnswers::Mean,
            sequence: vec![false; n],
            positions_from_end: None,
            clean_logprobs: None,
        }
    }

    /// The earliest position the metric reads in a batch of `seq` positions.
    pub fn earliest_position(&self, seq: i64) -> i64 {
        let back = self.positions_from_end.as_ref().and_then(|p| p.iter().copied().max()).unwrap_or(0);
        let tail = self.correct.iter().zip(&self.sequence).filter(|(_, s)| **s).map(|(c, _)| c.len() as i64).max();
        seq - 1 - back.max(tail.unwrap_or(1) - 1)
    }

    pub fn n_prompts(&self) -> usize {
        self.correct.len()
    }

    /// The metric of rows `start..start + len` of its prompt set (a batch of them).
    pub fn rows(&self, start: usize, len: usize) -> Metric {
        let take = |v: &Vec<Vec<i64>>| v.get(start..start + len).map(|s| s.to_vec()).unwrap_or_default();
        Metric {
            kind: self.kind,
            correct: take(&self.correct),
            incorrect: take(&self.incorrect),
            wrong: self.wrong,
            sequence: self.sequence.get(start..start + len).map(|s| s.to_vec()).unwrap_or_default(),
            positions_from_end: self.positions_from_end.as_ref().map(|p| p[start..start + len].to_vec()),
            clean_logprobs: self.clean_logprobs.as_ref().map(|t| t.narrow(0, start as i64, len as i64)),
        }
    }

    /// The metric repeated for `times` copies of the prompt set (noise samples).
    pub fn tiled(&self, times: usize) -> Metric {
        let rep = |v: &Vec<Vec<i64>>| v.iter().cycle().take(v.len() * times).cloned().collect();
        Metric {
            kind: self.kind,
            correct: rep(&self.correct),
            incorrect: rep(&self.incorrect),
            wrong: self.wrong,
            sequence: self.sequence.iter().cycle().take(self.sequence.len() * times).copied().collect(),
            positions_from_end: self
                .positions_from_end
                .as_ref()
                .map(|p| p.iter().cycle().take(p.len() * times).copied().collect()),
            clean_logprobs: self.clean_logprobs.as_ref().map(|t| t.repeat([times as i64, 1])),
        }
    }

    /// Whether forwards may stop at the last position (`Stop::LastPosition`): the metric reads
    /// nothing else. Otherwise `per_row` needs ln_final's output at every position.
    pub fn reads_last_only(&self) -> bool {
        self.positions_from_end.is_none() && !self.sequence.iter().any(|s| *s)
    }

    /// Whether every answer is one token (the metric of one token pair, as before sets existed).
    fn single_tokens(&self) -> bool {
        self.correct.iter().chain(&self.incorrect).all(|s| s.len() == 1) && !self.sequence.iter().any(|s| *s)
    }

    /// kl_divergence's reference: the clean run's log-probs at the metric positions, from its
    /// ln_final output at every position ([n, seq, d_model]).
    pub fn set_clean_reference(&mut self, model: &Model, clean_final: &Tensor) {
        if self.kind == MetricKind::KlDivergence {
            let at = self.read_positions(clean_final);
            self.clean_logprobs = Some(model.unembed(&at.to_kind(model.kind)).log_softmax(-1, Kind::Float));
        }
    }

    /// ln_final's output at each row's metric position, [rows, d_model], from its output at the
    /// last position ([rows, d_model]) or at every position ([rows, seq, d_model]).
    fn read_positions(&self, final_out: &Tensor) -> Tensor {
        if final_out.dim() == 2 {
            assert!(self.reads_last_only(), "this metric reads more than the last position");
            return final_out.shallow_clone();
        }
        match &self.positions_from_end {
            None => final_out.select(1, -1),
            Some(back) => {
                let (rows, seq) = (final_out.size()[0], final_out.size()[1]);
                let at: Vec<i64> = self.tile(back, rows).into_iter().map(|b| seq - 1 - b).collect();
                let idx = Tensor::from_slice(&at).to_device(final_out.device());
                let d = final_out.size()[2];
                final_out.gather(1, &idx.view([rows, 1, 1]).expand([rows, 1, d], false), false).squeeze_dim(1)
            }
        }
    }

    /// `per_prompt` repeated over `rows` rows (row r belongs to prompt r % n).
    fn tile<T: Copy>(&self, per_prompt: &[T], rows: i64) -> Vec<T> {
        per_prompt.iter().cycle().take(rows as usize).copied().collect()
    }

    /// Per-row values from ln_final's output: at the last position only ([rows, d_model], when
    /// `reads_last_only`) or at every position ([rows, seq, d_model]). Rows are any number of
    /// copies of the prompt set (row r belongs to prompt r % n).
    pub fn per_row(&self, model: &Model, final_out: &Tensor) -> Tensor {
        // Reported values accumulate in f32 whatever the run dtype.
        let final_out = &final_out.to_kind(Kind::Float);
        let x = self.read_positions(final_out);
        let rows = x.size()[0];
        let dev = x.device();
        if self.single_tokens() && matches!(self.kind, MetricKind::LogitDiff | MetricKind::Logprob | MetricKind::Prob) {
            let first = |sets: &[Vec<i64>]| -> Vec<i64> { sets.iter().map(|s| s[0]).collect() };
            let tile = |ids: &[i64]| Tensor::from_slice(&self.tile(ids, rows)).to_device(dev);
            return match self.kind {
                MetricKind::LogitDiff => {
                    self.logits_of(model, &x, &tile(&first(&self.correct)))
                        - self.logits_of(model, &x, &tile(&first(&self.incorrect)))
                }
                _ => {
                    let logp = model.unembed(&x.to_kind(model.kind)).log_softmax(-1, Kind::Float);
                    let lp = logp.gather(1, &tile(&first(&self.correct)).unsqueeze(1), false).squeeze_dim(1);
                    if self.kind == MetricKind::Prob {
                        lp.exp()
                    } else {
                        lp
                    }
                }
            };
        }
        match self.kind {
            MetricKind::LogitDiff => {
                let (c, c_mask) = self.padded(&self.correct, rows, dev);
                let (w, w_mask) = self.padded(&self.incorrect, rows, dev);
                let correct = masked_mean(&self.set_logits(model, &x, &c), &c_mask);
                let wrong = self.set_logits(model, &x, &w);
                let wrong = match self.wrong {
                    WrongAnswers::Mean => masked_mean(&wrong, &w_mask),
                    WrongAnswers::Max => wrong.masked_fill(&w_mask.logical_not(), f64::NEG_INFINITY).amax(1, false),
                };
                correct - wrong
            }
            MetricKind::KlDivergence => {
                let logp = model.unembed(&x.to_kind(model.kind)).log_softmax(-1, Kind::Float);
                let clean = self.clean_logprobs.as_ref().expect("kl_divergence has its clean reference");
                let times = rows / clean.size()[0];
                let clean = clean.to_device(dev).repeat([times, 1]);
                (clean.exp() * (&clean - logp)).sum_dim_intlist(-1, false, Kind::Float)
            }
            MetricKind::Logprob | MetricKind::Prob | MetricKind::ProbDiff => {
                let logp = model.unembed(&x.to_kind(model.kind)).log_softmax(-1, Kind::Float);
                let mut lp = set_logprob(&logp, &self.padded(&self.correct, rows, dev));
                if self.sequence.iter().any(|s| *s) {
                    lp = lp.where_self(
                        &self.sequence_mask(rows, dev).logical_not(),
                        &self.sequence_logprob(model, final_out),
                    );
                }
                match self.kind {
                    MetricKind::Logprob => lp,
                    MetricKind::Prob => lp.exp(),
                    _ => lp.exp() - set_logprob(&logp, &self.padded(&self.incorrect, rows, dev)).exp(),
                }
            }
        }
    }

    /// logit(ids) at each row, [rows], through the final softcap as full logits are (Gemma 2).
    fn logits_of(&self, model: &Model, x: &Tensor, ids: &Tensor) -> Tensor {
        let w = model.weights.unembed_columns(ids).to_kind(Kind::Float); // [rows, d]
        model.final_softcap(
            (x * w).sum_dim_intlist(-1, false, None) + model.weights.b_u.index_select(0, ids).to_kind(Kind::Float),
        )
    }

    /// logit of every token of a padded set, [rows, S].
    fn set_logits(&self, model: &Model, x: &Tensor, ids: &Tensor) -> Tensor {
        let (rows, s) = (ids.size()[0], ids.size()[1]);
        let flat = ids.flatten(0, -1);
        let w = model.weights.unembed_columns(&flat).to_kind(Kind::Float).view([rows, s, -1]);
        model.final_softcap(
            (x.unsqueeze(1) * w).sum_dim_intlist(-1, false, None)
                + model.weights.b_u.index_select(0, &flat).to_kind(Kind::Float).view([rows, s]),
        )
    }

    /// Token sets padded to one width, [rows, S], with the mask of real entries.
    fn padded(&self, sets: &[Vec<i64>], rows: i64, dev: tch::Device) -> (Tensor, Tensor) {
        let width = sets.iter().map(Vec::len).max().unwrap_or(1).max(1);
        let mut ids = Vec::with_capacity(rows as usize * width);
        let mut mask = Vec::with_capacity(rows as usize * width);
        for r in 0..rows as usize {
            let set = &sets[r % sets.len()];
            for j in 0..width {
                ids.push(set.get(j).copied().unwrap_or(set[0]));
                mask.push(j < set.len());
            }
        }
        let shape = [rows, width as i64];
        (Tensor::from_slice(&ids).view(shape).to_device(dev), Tensor::from_slice(&mask).view(shape).to_device(dev))
    }

    fn sequence_mask(&self, rows: i64, dev: tch::Device) -> Tensor {
        Tensor::from_slice(&self.tile(&self.sequence, rows)).to_device(dev)
    }

    /// Each row's multi-token answer: the sum of log p(token j) at the j-th of its last
    /// positions (the answer's tokens but the last are part of the prompt), [rows]; 0 for rows
    /// whose answer is one token.
    fn sequence_logprob(&self, model: &Model, final_out: &Tensor) -> Tensor {
        let rows = final_out.size()[0];
        let seq = final_out.size()[1];
        let longest = self.correct.iter().zip(&self.sequence).filter(|(_, s)| **s).map(|(c, _)| c.len()).max();
        let k = longest.unwrap_or(1) as i64;
        let tail = final_out.narrow(1, seq - k, k);
        let logp = model.unembed(&tail.to_kind(model.kind)).log_softmax(-1, Kind::Float); // [rows, k, V]
        let (mut ids, mut mask) = (Vec::new(), Vec::new());
        for r in 0..rows as usize {
            let p = r % self.correct.len();
            let toks = if self.sequence[p] { &self.correct[p][..] } else { &[][..] };
            let start = k as usize - toks.len();
            for j in 0..k as usize {
                ids.push(if j >= start { toks[j - start] } else { 0 });
                mask.push(j >= start);
            }
        }
        let dev = final_out.device();
        let ids = Tensor::from_slice(&ids).view([rows, k, 1]).to_device(dev);
        let mask = Tensor::from_slice(&mask).view([rows, k]).to_device(dev);
        (logp.gather(2, &ids, false).squeeze_dim(2) * mask.to_kind(Kind::Float)).sum_dim_intlist(-1, false, Kind::Float)
    }
}

/// log Σ p(set) per row from log-probs [rows, V] and a padded set with its mask.
fn set_logprob(logp: &Tensor, (ids, mask): &(Tensor, Tensor)) -> Tensor {
    logp.gather(1, ids, false).masked_fill(&mask.logical_not(), f64::NEG_INFINITY).logsumexp([1], false)
}

fn masked_mean(v: &Tensor, mask: &Tensor) -> Tensor {
    let m = mask.to_kind(Kind::Float);
    (v * &m).sum_dim_intlist(1, false, Kind::Float) / m.sum_dim_intlist(1, false, Kind::Float)
}
