//! Where each token sits: position ids (left padding counted from the first real token), the
//! causal, windowed and padding attention mask, ALiBi biases and rotary tables, as
//! TransformerLens and HF compute them for each family's positional scheme.
use tch::{Kind, Tensor};

use crate::model::config::{Positional, RopeScaling};
use crate::model::Model;

/// Per-batch facts shared by every layer: positions and which key positions each query may see.
pub struct Positions {
    /// [batch, pos] position ids; with left padding they count from the first real token.
    pub ids: Tensor,
    /// The same for every key position (differs from `ids` only after a key-value prefix).
    pub key_ids: Tensor,
    /// [batch, pos] 1 for real tokens and 0 for padding; None when nothing is padded.
    pub mask: Option<Tensor>,
}

impl Positions {
    pub fn new(batch: i64, seq: i64, mask: Option<&Tensor>, device: tch::Device) -> Self {
        match mask {
            None => {
                let ids = Tensor::arange(seq, (Kind::Int64, device)).unsqueeze(0).expand([batch, seq], false);
                Positions { key_ids: ids.shallow_clone(), ids, mask: None }
            }
            Some(m) => {
                // As TransformerLens: cumulative count of real tokens, minus one, floored at 0.
                let m = m.to_kind(Kind::Int64).to_device(device);
                let ids = (m.cumsum(1, Kind::Int64) - 1).clamp_min(0);
                Positions { key_ids: ids.shallow_clone(), ids, mask: Some(m) }
            }
        }
    }

    /// The same positions on another device (a model split by layers).
    pub(super) fn on(&self, device: tch::Device) -> Positions {
        Positions {
            ids: self.ids.to_device(device),
            key_ids: self.key_ids.to_device(device),
            mask: self.mask.as_ref().map(|m| m.to_device(device)),
        }
    }

    pub(super) fn batch_seq(&self) -> (i64, i64) {
        let s = self.ids.size();
        (s[0], s[1])
    }
}

impl Model {
    /// [batch|1, 1, query, key] true where attention is allowed (causal, within the window if
    /// any, and not to padding). Queries are the computed positions, which start `skip`
    /// positions in; keys are all.
    pub(super) fn attention_mask(&self, pos: &Positions, skip: i64, window: Option<usize>) -> Tensor {
        let (_, queries) = pos.batch_seq();
        let keys = queries + skip;
        let ones = Tensor::ones([queries, keys], (Kind::Bool, pos.ids.device()));
        let mut causal = ones.tril(skip);
        if let Some(w) = window {
            // Query i (at sequence index i + skip) sees keys j with i + skip − j < w.
            causal = causal.logical_and(&ones.triu(skip - w as i64 + 1));
        }
        let causal = causal.view([1, 1, queries, keys]);
        match &pos.mask {
            None => causal,
            Some(m) => causal.logical_and(&m.to_kind(Kind::Bool).view([-1, 1, 1, keys])),
        }
    }

    /// ALiBi biases slope_h · key_position, [batch|1, heads, 1, keys], as HF's
    /// build_alibi_tensor (key positions count real tokens, so padding does not shift them).
    pub(super) fn alibi(&self, pos: &Positions) -> Option<Tensor> {
        if self.cfg.positional != Positional::Alibi {
            return None;
        }
        let h = self.cfg.n_heads as i64;
        let closest = 1i64 << (63 - (h as u64).leading_zeros());
        let base_of = |n: i64| 2f64.powf(-(2f64.powf(-((n as f64).log2() - 3.0))));
        let device = pos.ids.device();
        let powers = Tensor::arange_start(1, 1 + closest, (Kind::Float, device));
        let mut slopes = Tensor::from(base_of(closest) as f32).to_device(device).pow(&powers);
        if closest != h {
            let extra = (closest).min(h - closest);
            let extra_powers = Tensor::arange_start_step(1, 1 + 2 * extra, 2, (Kind::Float, device));
            slopes = Tensor::cat(
                &[slopes, Tensor::from(base_of(2 * closest) as f32).to_device(device).pow(&extra_powers)],
                0,
            );
        }
        let keys = pos.key_ids.to_kind(Kind::Float); // [batch, keys]
        let alibi = slopes.view([1, h, 1, 1]) * keys.unsqueeze(1).unsqueeze(1);
        Some(alibi.to_kind(self.kind))
    }

    /// (cos, sin), each [batch, pos, 1, rotary_dim], computed in f32 the way HF and TL do.
    pub(super) fn rotary_tables(&self, pos: &Positions) -> Option<(Tensor, Tensor)> {
        let Positional::Rotary { dim, base, adjacent_pairs, scaling } = self.cfg.positional else { return None };
        let device = pos.ids.device();
        let exps = Tensor::arange_start_step(0, dim as i64, 2, (Kind::Float, device)) / dim as f64;
        let inv_freq = scale_frequencies(Tensor::from(base as f32).to_device(device).pow(&exps).reciprocal(), scaling);
        let freq = if adjacent_pairs {
            inv_freq.repeat_interleave_self_int(2, 0, None)
        } else {
            Tensor::cat(&[&inv_freq, &inv_freq], 0)
        };
        let angles = pos.ids.to_kind(Kind::Float).unsqueeze(-1) * freq.view([1, 1, -1]);
        let angles = angles.unsqueeze(2);
        Some((angles.cos().to_kind(self.kind), angles.sin().to_kind(self.kind)))
    }

    pub(super) fn rotate(&self, x: &Tensor, tables: &(Tensor, Tensor)) -> Tensor {
        let Positional::Rotary { dim, adjacent_pairs, .. } = self.cfg.positional else { return x.shallow_clone() };
        let d = dim as i64;
        let e = x.size()[3];
        let rot = x.narrow(3, 0, d);
        let flipped = if adjacent_pairs {
            let pairs = rot.unflatten(3, [d / 2, 2]);
            Tensor::stack(&[-pairs.select(4, 1), pairs.select(4, 0)], 4).flatten(3, 4)
        } else {
            Tensor::cat(&[-rot.narrow(3, d / 2, d / 2), rot.narrow(3, 0, d / 2)], 3)
        };
        let rotated = &rot * &tables.0 + flipped * &tables.1;
        if d == e {
            rotated
        } else {
            Tensor::cat(&[rotated, x.narrow(3, d, e - d)], 3)
        }
    }
}

/// Rescaled rotary inverse frequencies, as HF's rope initialisation functions compute them (f32).
fn scale_frequencies(inv_freq: Tensor, scaling: RopeScaling) -> Tensor {
    match scaling {
        RopeScaling::None => inv_freq,
        RopeScaling::Linear { factor } => inv_freq / factor,
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position } => {
            let low_freq_wavelen = original_max_position / low_freq_factor;
            let high_freq_wavelen = original_max_position / high_freq_factor;
            let wavelen = inv_freq.reciprocal() * (2.0 * std::f64::consts::PI);
            // Long wavelengths are interpolated by `factor`, short ones kept.
            let scaled = inv_freq.where_self(&wavelen.le(low_freq_wavelen), &(&inv_freq / factor));
            let smooth =
                (wavelen.reciprocal() * original_max_position - low_freq_factor) / (high_freq_factor - low_freq_factor);
            let smoothed = (smooth.ones_like() - &smooth) * &scaled / factor + &smooth * &scaled;
            let medium = wavelen.ge(high_freq_wavelen).logical_and(&wavelen.le(low_freq_wavelen));
            smoothed.where_self(&medium, &scaled)
        }
    }
}
