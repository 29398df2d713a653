//! Edge attribution patching (Hanna, Pezzelle & Belinkov 2024, and the EAP-IG code it ships):
//! the first-order estimate of corrupting one edge of the computational graph, for every edge at
//! once. An edge joins a sender (the input embedding, one head's `hook_result`, one MLP's
//! `hook_mlp_out`) to a receiver in a later layer (one head's query, key or value input, one
//! MLP's input, the logits' final residual):
//!
//!   score(u → v) = Σ_batch,pos,d (z_u^corrupted − z_u^clean) · ∂metric/∂(input of v) / prompts,
//!
//! with the gradient of Σ_prompts metric taken on the clean run (`Eap`), averaged over `steps`
//! runs whose input embeddings lie between the corrupted and the clean ones at k/steps for
//! k = 0..steps−1 as the reference code does (`EapIg`, "EAP-IG-inputs"), or averaged over the
//! clean and the corrupted run (`CleanCorrupted`). Keys and values of grouped-query models are
//! scored per key-value head, as TransformerLens 4.3 splits them (its `hook_k_input` has one copy
//! per key-value head): the edge into a key-value head is the sum of the per-query-head edges the
//! EAP-IG code would give with its ungrouped weights.
use tch::{Kind, Tensor};

use crate::engine::hooks::{Edit, Intervention};
use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::model::hook_point::{HookPoint, Site};
use crate::{Hooks, Input, Model, Stop};

use super::clean_corrupted::CleanCorrupted;

/// How the gradient side of the estimate is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum Method {
    /// One gradient, on the clean run.
    Eap,
    /// Integrated gradients over the input embeddings (EAP-IG-inputs), `steps` points.
    EapIg { steps: usize },
    /// The mean of the gradients on the clean and on the corrupted run.
    CleanCorrupted,
}

impl Method {
    /// Forward+backward passes with gradients (besides the corrupted forward).
    pub fn gradient_passes(self) -> usize {
        match self {
            Method::Eap => 1,
            Method::EapIg { steps } => steps,
            Method::CleanCorrupted => 2,
        }
    }
}

/// What writes into the residual stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sender {
    Input,
    Head { layer: usize, head: usize },
    Mlp { layer: usize },
}

/// Which input of a head an edge reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Qkv {
    Q,
    K,
    V,
}

/// What reads from it. A key or value receiver's `head` is a key-value head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Receiver {
    Head { layer: usize, head: usize, input: Qkv },
    Mlp { layer: usize },
    Logits,
}

/// The senders and receivers of a model, in the order of the score matrix's rows and columns:
/// the input, then per layer its heads and its MLP; per layer the heads' queries, keys, values
/// and the MLP's input, then the logits.
#[derive(Debug, Clone)]
pub struct Graph {
    pub senders: Vec<Sender>,
    pub receivers: Vec<Receiver>,
    pub n_layers: usize,
    /// Attention and MLP read the same residual (GPT-J, NeoX, Phi): no head → own-layer MLP edge.
    pub parallel: bool,
    /// Keys and values have fewer heads than queries (receivers named `kv{g}`).
    pub grouped: bool,
    /// Query heads per key-value head.
    group: usize,
}

impl Graph {
    pub fn new(cfg: &ModelConfig) -> Graph {
        let (heads, kv) = (cfg.n_heads, cfg.n_kv_heads);
        let mut senders = vec![Sender::Input];
        let mut receivers = Vec::new();
        for layer in 0..cfg.n_layers {
            senders.extend((0..heads).map(|head| Sender::Head { layer, head }));
            senders.push(Sender::Mlp { layer });
            for (input, n) in [(Qkv::Q, heads), (Qkv::K, kv), (Qkv::V, kv)] {
                receivers.extend((0..n).map(|head| Receiver::Head { layer, head, input }));
            }
            receivers.push(Receiver::Mlp { layer });
        }
        receivers.push(Receiver::Logits);
        Graph {
            senders,
            receivers,
            n_layers: cfg.n_layers,
            parallel: cfg.parallel_block,
            grouped: kv != heads,
            group: cfg.kv_group(),
        }
    }

    /// Query heads per key-value head (1 without grouped-query attention).
    pub fn group(&self) -> usize {
        self.group
    }

    /// Whether `s` writes where `r` reads: a later layer, the own layer's MLP for a head of a
    /// sequential block, and the logits for every sender.
    pub fn connects(&self, s: Sender, r: Receiver) -> bool {
        match (s, r) {
            (_, Receiver::Logits) | (Sender::Input, _) => true,
            (Sender::Head { layer: ls, .. }, Receiver::Mlp { layer }) => ls < layer || (ls == layer && !self.parallel),
            (Sender::Head { layer: ls, .. } | Sender::Mlp { layer: ls }, Receiver::Head { layer, .. })
            | (Sender::Mlp { layer: ls }, Receiver::Mlp { layer }) => ls < layer,
        }
    }

    /// Every edge as (sender index, receiver index), receiver by receiver.
    pub fn edges(&self) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for (r, &rv) in self.receivers.iter().enumerate() {
            out.extend(self.senders.iter().enumerate().filter(|(_, &sv)| self.connects(sv, rv)).map(|(s, _)| (s, r)));
        }
        out
    }

    pub fn sender_name(&self, s: Sender) -> String {
        match s {
            Sender::Input => "input".into(),
            Sender::Head { layer, head } => format!("a{layer}.h{head}"),
            Sender::Mlp { layer } => format!("m{layer}"),
        }
    }

    /// `a5.h2<q>`, `a5.kv1<k>` (grouped keys and values), `m4`, `logits`.
    pub fn receiver_name(&self, r: Receiver) -> String {
        match r {
            Receiver::Head { layer, head, input } => {
                let (letter, group) = match input {
                    Qkv::Q => ("q", false),
                    Qkv::K => ("k", self.grouped),
                    Qkv::V => ("v", self.grouped),
                };
                format!("a{layer}.{}{head}<{letter}>", if group { "kv" } else { "h" })
            }
            Receiver::Mlp { layer } => format!("m{layer}"),
            Receiver::Logits => "logits".into(),
        }
    }

    /// The hook point (and head) a sender's activation is read at.
    pub fn sender_point(s: Sender) -> (HookPoint, Option<usize>) {
        match s {
            Sender::Input => (HookPoint::Embed, None),
            Sender::Head { layer, head } => (HookPoint::Block(layer, Site::Result), Some(head)),
            Sender::Mlp { layer } => (HookPoint::Block(layer, Site::MlpOut), None),
        }
    }

    /// The hook point (and head) a receiver's input is read at.
    pub fn receiver_point(&self, r: Receiver) -> (HookPoint, Option<usize>) {
        match r {
            Receiver::Head { layer, head, input } => {
                let site = match input {
                    Qkv::Q => Site::QInput,
                    Qkv::K => Site::KInput,
                    Qkv::V => Site::VInput,
                };
                (HookPoint::Block(layer, site), Some(head))
            }
            Receiver::Mlp { layer } => (HookPoint::Block(layer, Site::MlpIn), None),
            Receiver::Logits => (HookPoint::Block(self.n_layers - 1, Site::ResidPost), None),
        }
    }

    /// The distinct hook points of the senders, in order.
    fn sender_points(&self) -> Vec<HookPoint> {
        distinct(self.senders.iter().map(|&s| Graph::sender_point(s).0))
    }

    fn receiver_points(&self) -> Vec<HookPoint> {
        distinct(self.receivers.iter().map(|&r| self.receiver_point(r).0))
    }
}

fn distinct(points: impl Iterator<Item = HookPoint>) -> Vec<HookPoint> {
    let mut out: Vec<HookPoint> = Vec::new();
    for p in points {
        if out.last() != Some(&p) {
            out.push(p);
        }
    }
    out
}

/// The activations at `points` stacked on a new axis 2 in order ([b, pos, n, d]): a point with
/// a head axis ([b, pos, heads, d]) gives each head, one without ([b, pos, d]) one entry.
fn stacked(points: &[HookPoint], acts: impl Fn(&HookPoint) -> Result<Tensor>) -> Result<Tensor> {
    let parts = points
        .iter()
        .map(|p| {
            let t = acts(p)?;
            Ok(if t.dim() == 3 { t.unsqueeze(2) } else { t })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&parts, 2))
}

fn cached(cache: &std::collections::HashMap<HookPoint, Tensor>, p: &HookPoint) -> Result<Tensor> {
    cache.get(p).map(|t| t.detach()).ok_or_else(|| Error::Other(format!("{p} was not computed")))
}

/// The senders' activations on the corrupted run (with the corruption applied), [b, pos, S, d].
fn corrupted_senders(model: &Model, prep: &CleanCorrupted, points: &[HookPoint]) -> Result<Tensor> {
    let mut hooks = Hooks::capture(points.iter().copied());
    prep.corrupt(&mut hooks);
    let _ = model.run(
        Input::Tokens(&prep.corrupted_tokens),
        prep.mask.as_ref(),
        &mut hooks,
        Stop::BeforeLayer(model.cfg.n_layers),
    )?;
    stacked(points, |p| cached(&hooks.cache, p))
}

/// One forward with gradients: the senders' activations and the gradient of Σ_prompts metric at
/// every receiver ([b, pos, R, d]), with the corruption applied or the input embedding replaced.
fn gradient_pass(
    model: &Model,
    prep: &CleanCorrupted,
    graph: &Graph,
    tokens: &Tensor,
    edit_embed: impl FnOnce(&mut Hooks),
) -> Result<(Tensor, Tensor)> {
    let (senders, receivers) = (graph.sender_points(), graph.receiver_points());
    let mut hooks = Hooks::capture(senders.iter().chain(&receivers).copied()).with_grad();
    edit_embed(&mut hooks);
    let out = model.run(Input::Tokens(tokens), prep.mask.as_ref(), &mut hooks, Stop::FinalNorm)?;
    let total = prep.metric.per_row(model, &out).sum(Kind::Float);
    let inputs: Vec<Tensor> = receivers.iter().map(|p| hooks.cache[p].shallow_clone()).collect();
    let grads = Tensor::f_run_backward(&[total], &inputs, false, false)?;
    let grads: Vec<Tensor> =
        grads.into_iter().zip(&inputs).map(|(g, x)| if g.defined() { g } else { x.zeros_like() }).collect();
    let by_point: std::collections::HashMap<HookPoint, Tensor> = receivers.iter().copied().zip(grads).collect();
    let grad = stacked(&receivers, |p| Ok(by_point[p].shallow_clone()))?;
    let acts = stacked(&senders, |p| cached(&hooks.cache, p))?;
    Ok((acts, grad))
}

/// Every edge's score, [senders, receivers] (zero where no edge is), in metric units per prompt.
pub fn edge_scores(model: &Model, prep: &CleanCorrupted, graph: &Graph, method: Method) -> Result<Tensor> {
    let senders = graph.sender_points();
    let corrupted = corrupted_senders(model, prep, &senders)?;
    let clean_tokens = &prep.clean_tokens;
    let (clean, mut grad) = gradient_pass(model, prep, graph, clean_tokens, |_| ())?;
    let passes = match method {
        Method::Eap => 1,
        Method::CleanCorrupted => {
            let (_, g) = gradient_pass(model, prep, graph, &prep.corrupted_tokens, |h| prep.corrupt(h))?;
            grad += g;
            2
        }
        Method::EapIg { steps } => {
            if steps == 0 {
                return Err(Error::Other("eap_ig needs steps >= 1".into()));
            }
            // The input sender is entry 0 of both stacks: the clean and corrupted embeddings.
            let (e_clean, e_corr) = (clean.select(2, 0), corrupted.select(2, 0));
            let mut sum = grad.zeros_like();
            for k in 0..steps {
                let alpha = k as f64 / steps as f64;
                let e = &e_corr + (&e_clean - &e_corr) * alpha;
                let (_, g) = gradient_pass(model, prep, graph, clean_tokens, |h| {
                    h.add_intervention(HookPoint::Embed, Intervention::new(Edit::Replace(e)))
                })?;
                sum += g;
            }
            grad = sum;
            steps
        }
    };
    let delta = (corrupted - clean).to_kind(Kind::Float);
    let scores = Tensor::einsum("bpsd,bprd->sr", &[delta, grad.to_kind(Kind::Float)], None::<i64>);
    let n = prep.n_prompts() as f64 * passes as f64;
    let device = scores.device();
    Ok(scores / n * mask(graph, device))
}

/// 1 where an edge is, 0 elsewhere, [senders, receivers].
pub fn mask(graph: &Graph, device: tch::Device) -> Tensor {
    let (s, r) = (graph.senders.len(), graph.receivers.len());
    let mut m = vec![0f32; s * r];
    for (i, j) in graph.edges() {
        m[i * r + j] = 1.0;
    }
    Tensor::from_slice(&m).view([s as i64, r as i64]).to_device(device)
}

/// What an edge outside a circuit carries: its sender's activation on the corrupted run, zero,
/// or its mean over the prompts at each position on the clean run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Ablation {
    Patching,
    Zero,
    Mean,
}

/// Bytes of live sender activations one evaluation forward may keep (circuits are batched up to
/// it).
const LIVE_BYTES: i64 = 1 << 30;

/// The metric per prompt of each circuit (a mask over `graph.edges()`), run on the clean prompts
/// with every edge outside it carrying the ablated activation: at each receiver, its input plus
/// Σ over senders u whose edge is not in the circuit of (ablated z_u − z_u in this run), as the
/// EAP-IG code's evaluate_graph does. Circuits are batched along the batch axis.
pub fn evaluate(
    model: &Model,
    prep: &CleanCorrupted,
    graph: &Graph,
    circuits: &[Vec<bool>],
    ablation: Ablation,
) -> Result<Vec<Vec<f64>>> {
    let senders = graph.sender_points();
    let ablated = match ablation {
        Ablation::Patching => corrupted_senders(model, prep, &senders)?,
        Ablation::Zero | Ablation::Mean => {
            let mut hooks = Hooks::capture(senders.iter().copied());
            let _ = model.run(
                Input::Tokens(&prep.clean_tokens),
                prep.mask.as_ref(),
                &mut hooks,
                Stop::BeforeLayer(model.cfg.n_layers),
            )?;
            let clean = stacked(&senders, |p| cached(&hooks.cache, p))?;
            if ablation == Ablation::Zero {
                clean.zeros_like()
            } else {
                clean.mean_dim(0, true, clean.kind()).expand_as(&clean)
            }
        }
    };
    let [n, p, s, d] = ablated.size()[..] else { unreachable!("senders are stacked as [b, pos, S, d]") };
    let per_forward = (LIVE_BYTES / (n * p * s * d * 4).max(1)).max(1) as usize;
    let mut out = Vec::new();
    for chunk in circuits.chunks(per_forward) {
        out.extend(evaluate_batch(model, prep, graph, chunk, &ablated)?);
    }
    Ok(out)
}

/// The receivers read at each receiver hook point: (point, first receiver index, count).
fn receiver_blocks(graph: &Graph) -> Vec<(HookPoint, usize, usize)> {
    let mut out: Vec<(HookPoint, usize, usize)> = Vec::new();
    for (i, &r) in graph.receivers.iter().enumerate() {
        let point = graph.receiver_point(r).0;
        match out.last_mut() {
            Some((p, _, count)) if *p == point => *count += 1,
            _ => out.push((point, i, 1)),
        }
    }
    out
}

/// Each sender hook point's first slot in the stacked senders, and how many it fills.
fn sender_slots(graph: &Graph) -> Vec<(HookPoint, usize, usize)> {
    let mut out: Vec<(HookPoint, usize, usize)> = Vec::new();
    for (i, &s) in graph.senders.iter().enumerate() {
        let point = Graph::sender_point(s).0;
        match out.last_mut() {
            Some((p, _, count)) if *p == point => *count += 1,
            _ => out.push((point, i, 1)),
        }
    }
    out
}

fn evaluate_batch(
    model: &Model,
    prep: &CleanCorrupted,
    graph: &Graph,
    circuits: &[Vec<bool>],
    ablated: &Tensor,
) -> Result<Vec<Vec<f64>>> {
    use std::sync::{Arc, Mutex};
    let c = circuits.len() as i64;
    let [n, p, s, d] = ablated.size()[..] else { unreachable!("senders are stacked as [b, pos, S, d]") };
    let r = graph.receivers.len();
    let edges = graph.edges();
    // 1 where an edge is not in the circuit, per circuit: [C, S, R].
    let mut off = vec![0f32; circuits.len() * s as usize * r];
    for (ci, keep) in circuits.iter().enumerate() {
        for (e, &(si, ri)) in edges.iter().enumerate() {
            if !keep[e] {
                off[(ci * s as usize + si) * r + ri] = 1.0;
            }
        }
    }
    let device = ablated.device();
    let off = Tensor::from_slice(&off).view([c, s, r as i64]).to_device(device).to_kind(ablated.kind());
    // The senders' activations in this run, written as each is computed: [C, N, pos, S, d].
    let live = Arc::new(Mutex::new(ablated.zeros_like().unsqueeze(0).repeat([c, 1, 1, 1, 1])));
    let mut hooks = Hooks::new();
    for (point, first, count) in sender_slots(graph) {
        let live = Arc::clone(&live);
        let write = move |x: &Tensor| -> Result<Tensor> {
            let stackable = if x.dim() == 3 { x.unsqueeze(2) } else { x.shallow_clone() };
            let buf = live.lock().map_err(|_| Error::Other("a sender hook panicked".into()))?;
            buf.narrow(3, first as i64, count as i64).copy_(&stackable.reshape([c, n, p, count as i64, d]));
            Ok(x.shallow_clone())
        };
        hooks.add_intervention(point, Intervention::new(Edit::Func(Box::new(write))));
    }
    for (point, first, count) in receiver_blocks(graph) {
        // Only the senders before this point can reach it.
        let prev = edges.iter().filter(|&&(_, ri)| ri >= first && ri < first + count).map(|&(si, _)| si + 1).max();
        let Some(prev) = prev else { continue };
        let mask = off.narrow(1, 0, prev as i64).narrow(2, first as i64, count as i64);
        // Σ_u mask · ablated_u, the same in every forward: [C, N, pos, k, d].
        let fixed =
            Tensor::einsum("npsd,csr->cnprd", &[ablated.narrow(2, 0, prev as i64), mask.shallow_clone()], None::<i64>);
        let live = Arc::clone(&live);
        let edit = move |x: &Tensor| -> Result<Tensor> {
            let buf = live.lock().map_err(|_| Error::Other("a sender hook panicked".into()))?;
            let current =
                Tensor::einsum("cnpsd,csr->cnprd", &[buf.narrow(3, 0, prev as i64), mask.shallow_clone()], None::<i64>);
            let update = (&fixed - current).reshape([c * n, p, count as i64, d]);
            Ok(if x.dim() == 3 { x + update.squeeze_dim(2) } else { x + update })
        };
        hooks.add_intervention(point, Intervention::new(Edit::Func(Box::new(edit))));
    }
    let tokens = prep.clean_tokens.repeat([c, 1]);
    let mask = prep.mask.as_ref().map(|m| m.repeat([c, 1]));
    let out = model.run(Input::Tokens(&tokens), mask.as_ref(), &mut hooks, Stop::FinalNorm)?;
    let metric = prep.metric.tiled(c as usize);
    let values: Vec<f64> = Vec::try_from(metric.per_row(model, &out).to_kind(Kind::Double))?;
    Ok(values.chunks(n as usize).map(|v| v.to_vec()).collect())
}
