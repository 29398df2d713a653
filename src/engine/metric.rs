//! Metrics of a forward pass, per prompt, read at the last position. They take ln_final's output
//! rather than full logits: a logit difference needs two columns of W_U, not the vocabulary.
use tch::{Kind, Tensor};

use crate::model::Model;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricKind {
    /// logit(correct) - logit(incorrect).
    LogitDiff,
    /// log p(correct).
    Logprob,
    /// p(correct).
    Prob,
}

/// A metric with the answer token ids of each prompt.
#[derive(Debug)]
pub struct Metric {
    pub kind: MetricKind,
    pub correct: Vec<i64>,
    /// Required for logit_diff.
    pub incorrect: Vec<i64>,
}

impl Metric {
    /// Per-row values for `final_last` = ln_final output at the answer position, [rows, d_model],
    /// where rows are any number of copies of the prompt set (row r belongs to prompt r % n).
    pub fn per_row(&self, model: &Model, final_last: &Tensor) -> Tensor {
        // Reported values accumulate in f32 whatever the run dtype.
        let final_last = &final_last.to_kind(Kind::Float);
        let rows = final_last.size()[0];
        let n = self.correct.len() as i64;
        let tile = |ids: &[i64]| Tensor::from_slice(ids).to_device(final_last.device()).repeat([rows / n]);
        let logit_of = |ids: &Tensor| {
            let w = model.weights.unembed_columns(ids).to_kind(Kind::Float); // [rows, d]
                                                                             // Through the final softcap, as the full logits are (Gemma 2).
            model.final_softcap(
                (final_last * w).sum_dim_intlist(-1, false, None)
                    + model.weights.b_u.index_select(0, ids).to_kind(Kind::Float),
            )
        };
        match self.kind {
            MetricKind::LogitDiff => logit_of(&tile(&self.correct)) - logit_of(&tile(&self.incorrect)),
            MetricKind::Logprob | MetricKind::Prob => {
                let logp = model.unembed(&final_last.to_kind(model.kind)).log_softmax(-1, Kind::Float);
                let lp = logp.gather(1, &tile(&self.correct).unsqueeze(1), false).squeeze_dim(1);
                if self.kind == MetricKind::Prob {
                    lp.exp()
                } else {
                    lp
                }
            }
        }
    }
}
