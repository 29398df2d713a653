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
    /// No estimate: each edge patched alone for real (`exact_changes`).
    Exact,
}

impl Method {
    /// Forward+backward passes with gradients (besides the corrupted forward).
    pub fn gradient_passes(self) -> usize {
        match self {
            Method::Eap => 1,
            Method::EapIg { steps } => steps,
            Method::CleanCorrupted => 2,
            Method::Exact => 0,
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

    /// Each sender hook point in order, with its first slot in the stacked senders and how many
    /// it fills.
    fn sender_slots(&self) -> Vec<(HookPoint, usize, usize)> {
        runs(self.senders.iter().map(|&s| Graph::sender_point(s).0))
    }

    /// Each receiver hook point in order, with its first receiver index and how many it reads.
    fn receiver_blocks(&self) -> Vec<(HookPoint, usize, usize)> {
        runs(self.receivers.iter().map(|&r| self.receiver_point(r).0))
    }

    /// The distinct hook points of the senders, in order.
    fn sender_points(&self) -> Vec<HookPoint> {
        self.sender_slots().into_iter().map(|(p, _, _)| p).collect()
    }

    fn receiver_points(&self) -> Vec<HookPoint> {
        self.receiver_blocks().into_iter().map(|(p, _, _)| p).collect()
    }
}

/// The runs of equal consecutive items: (item, index of its first, how many).
fn runs<T: PartialEq + Copy>(items: impl Iterator<Item = T>) -> Vec<(T, usize, usize)> {
    let mut out: Vec<(T, usize, usize)> = Vec::new();
    for (i, item) in items.enumerate() {
        match out.last_mut() {
            Some((p, _, count)) if *p == item => *count += 1,
            _ => out.push((item, i, 1)),
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

/// Rows `start..start + len` of the clean and corrupted batches: gradients are taken a batch of
/// prompts at a time, since a backward keeps every receiver's split input alive.
struct Rows {
    clean: Tensor,
    corrupted: Tensor,
    mask: Option<Tensor>,
    noise: Option<Tensor>,
    metric: crate::engine::metric::Metric,
}

impl Rows {
    fn of(prep: &CleanCorrupted, start: i64, len: i64) -> Rows {
        let part = |t: &Tensor| t.narrow(0, start, len);
        Rows {
            clean: part(&prep.clean_tokens),
            corrupted: part(&prep.corrupted_tokens),
            mask: prep.mask.as_ref().map(part),
            noise: prep.corrupt_embed.as_ref().map(part),
            metric: prep.metric.rows(start as usize, len as usize),
        }
    }

    /// The corruption of these rows (noise on the embedding; corrupted tokens need none).
    fn corrupt(&self, hooks: &mut Hooks) {
        if let Some(noise) = &self.noise {
            hooks.add_intervention(HookPoint::Embed, Intervention::new(Edit::Add(noise.shallow_clone())));
        }
    }
}

/// Bytes a gradient pass may keep per batch of prompts (the saved activations of the split
/// inputs dominate: about 8 copies of every receiver's and sender's input).
const GRAD_BYTES: i64 = 2 << 30;

/// Prompts per gradient batch for `seq` positions.
fn grad_batch(model: &Model, graph: &Graph, seq: i64) -> i64 {
    let per_prompt = seq * model.cfg.d_model as i64 * 4 * 8 * (graph.senders.len() + graph.receivers.len()) as i64;
    (GRAD_BYTES / per_prompt.max(1)).max(1)
}

/// The senders' activations on the clean or the corrupted run (with the corruption applied),
/// [b, pos, S, d], without gradients.
fn sender_acts(model: &Model, rows: &Rows, points: &[HookPoint], corrupted: bool) -> Result<Tensor> {
    let t = std::time::Instant::now();
    let mut hooks = Hooks::capture(points.iter().copied());
    if corrupted {
        rows.corrupt(&mut hooks);
    }
    let _ = model.run(
        Input::Tokens(if corrupted { &rows.corrupted } else { &rows.clean }),
        rows.mask.as_ref(),
        &mut hooks,
        Stop::BeforeLayer(model.cfg.n_layers),
    )?;
    let acts = stacked(points, |p| cached(&hooks.cache, p));
    tracing::debug!("senders of {} prompts: {:.2} s", rows.clean.size()[0], t.elapsed().as_secs_f64());
    acts
}

/// One forward with gradients: the gradient of Σ_prompts metric at every receiver ([b, pos, R, d])
/// and, `with_senders`, the senders' activations, with the corruption applied or the input
/// embedding replaced. (Without senders no head's result is split out: EAP-IG's passes.)
fn gradient_pass(
    model: &Model,
    rows: &Rows,
    graph: &Graph,
    tokens: &Tensor,
    with_senders: bool,
    edit_embed: impl FnOnce(&mut Hooks),
) -> Result<(Option<Tensor>, Tensor)> {
    let t = std::time::Instant::now();
    let receivers = graph.receiver_points();
    let senders = if with_senders { graph.sender_points() } else { Vec::new() };
    let mut hooks = Hooks::capture(senders.iter().chain(&receivers).copied()).with_grad();
    edit_embed(&mut hooks);
    let out = model.run(Input::Tokens(tokens), rows.mask.as_ref(), &mut hooks, Stop::FinalNorm)?;
    let total = rows.metric.per_row(model, &out).sum(Kind::Float);
    let inputs: Vec<Tensor> = receivers.iter().map(|p| hooks.cache[p].shallow_clone()).collect();
    let grads = Tensor::f_run_backward(&[total], &inputs, false, false)?;
    let grads: Vec<Tensor> =
        grads.into_iter().zip(&inputs).map(|(g, x)| if g.defined() { g } else { x.zeros_like() }).collect();
    let by_point: std::collections::HashMap<HookPoint, Tensor> = receivers.iter().copied().zip(grads).collect();
    let grad = stacked(&receivers, |p| Ok(by_point[p].shallow_clone()))?;
    let acts = if with_senders { Some(stacked(&senders, |p| cached(&hooks.cache, p))?) } else { None };
    tracing::debug!("gradient pass of {} prompts: {:.2} s", rows.clean.size()[0], t.elapsed().as_secs_f64());
    Ok((acts, grad))
}

/// Every edge's score, [senders, receivers] (zero where no edge is), in metric units per prompt;
/// the prompts a batch at a time (the sum over prompts is accumulated), `progress` called with
/// the prompts of each batch done.
pub fn edge_scores(
    model: &Model,
    prep: &CleanCorrupted,
    graph: &Graph,
    method: Method,
    mut progress: impl FnMut(usize),
) -> Result<Tensor> {
    let passes = match method {
        Method::Exact => return Err(Error::Other("exact scores are patched, not estimated: use exact_changes".into())),
        Method::EapIg { steps: 0 } => return Err(Error::Other("eap_ig needs steps >= 1".into())),
        m => m.gradient_passes(),
    };
    let n = prep.n_prompts();
    // Batches of equal size (64 prompts at 9 a batch: 8 of 8, not 7 of 9 and 1 of 1).
    let (n_rows, most) = (n.max(1) as usize, grad_batch(model, graph, prep.seq_len()).max(1) as usize);
    let batch = n_rows.div_ceil(n_rows.div_ceil(most)) as i64;
    let mut total: Option<Tensor> = None;
    for start in (0..n).step_by(batch as usize) {
        let len = batch.min(n - start);
        let rows = Rows::of(prep, start, len);
        let part = batch_scores(model, &rows, graph, method)?;
        total = Some(match total {
            Some(t) => t + part,
            None => part,
        });
        progress(len as usize);
    }
    let scores = total.ok_or_else(|| Error::Other("edge attribution of no prompts".into()))?;
    let device = scores.device();
    Ok(scores / (n as f64 * passes as f64) * mask(graph, device))
}

/// Σ over one batch's prompts and every gradient pass of Δ · ∂metric/∂input, [S, R].
fn batch_scores(model: &Model, rows: &Rows, graph: &Graph, method: Method) -> Result<Tensor> {
    let senders = graph.sender_points();
    let kept = |acts: Option<Tensor>| acts.ok_or_else(|| Error::Other("a gradient pass kept no senders".into()));
    if let Method::EapIg { steps } = method {
        // EAP-IG takes no gradient on the clean run, only its senders' activations; its first
        // step (k = 0: the corrupted embedding) is the corrupted run, so it keeps the corrupted
        // senders.
        let clean = sender_acts(model, rows, &senders, false)?;
        let (corrupted, mut grad) = gradient_pass(model, rows, graph, &rows.corrupted, true, |h| rows.corrupt(h))?;
        let corrupted = kept(corrupted)?;
        let (e_clean, e_corr) = (clean.select(2, 0), corrupted.select(2, 0));
        for k in 1..steps {
            let alpha = k as f64 / steps as f64;
            let e = &e_corr + (&e_clean - &e_corr) * alpha;
            let (_, g) = gradient_pass(model, rows, graph, &rows.clean, false, |h| {
                h.add_intervention(HookPoint::Embed, Intervention::new(Edit::Replace(e)))
            })?;
            grad += g;
        }
        return contract(graph, rows, corrupted - clean, grad);
    }
    let corrupted = sender_acts(model, rows, &senders, true)?;
    let (clean, mut grad) = gradient_pass(model, rows, graph, &rows.clean, true, |_| ())?;
    let clean = kept(clean)?;
    if method == Method::CleanCorrupted {
        let (_, g) = gradient_pass(model, rows, graph, &rows.corrupted, false, |h| rows.corrupt(h))?;
        grad += g;
    }
    contract(graph, rows, corrupted - clean, grad)
}

/// Σ over prompts and positions of Δ · gradient: [S, R] (zero where no edge is). A receiver's
/// senders are a prefix of the sender order (growing with the receiver's index), so each block of
/// receivers is one product with the longest prefix among them: blocks of at least 64 receivers
/// keep each product a matrix product (not one thin product per layer, which is memory-bound)
/// and do about 60% of the work of the full [S, R] product.
fn contract(graph: &Graph, rows: &Rows, delta: Tensor, grad: Tensor) -> Result<Tensor> {
    let t = std::time::Instant::now();
    let (s, r) = (graph.senders.len() as i64, graph.receivers.len() as i64);
    // [S, b·pos·d] and [R, b·pos·d]: one row per sender and per receiver.
    let delta = delta.to_kind(Kind::Float).permute([2, 0, 1, 3]).reshape([s, -1]);
    let grad = grad.to_kind(Kind::Float).permute([2, 0, 1, 3]).reshape([r, -1]);
    let mut prev = vec![0usize; r as usize];
    for (si, ri) in graph.edges() {
        prev[ri] = prev[ri].max(si + 1);
    }
    let scores = Tensor::zeros([s, r], (Kind::Float, delta.device()));
    let mut blocks: Vec<(usize, usize, usize)> = Vec::new();
    for (n, first, count) in runs(prev.iter().copied()) {
        match blocks.last_mut() {
            Some((m, _, c)) if *c < 64 => {
                *m = (*m).max(n);
                *c += count;
            }
            _ => blocks.push((n, first, count)),
        }
    }
    for (n, first, count) in blocks {
        if n == 0 {
            continue;
        }
        let (n, first, count) = (n as i64, first as i64, count as i64);
        let block = delta.narrow(0, 0, n).matmul(&grad.narrow(0, first, count).tr());
        scores.narrow(0, 0, n).narrow(1, first, count).copy_(&block);
    }
    tracing::debug!("scores of {} prompts' gradients: {:.2} s", rows.clean.size()[0], t.elapsed().as_secs_f64());
    Ok(scores)
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
    mut progress: impl FnMut(usize),
) -> Result<Vec<Vec<f64>>> {
    let senders = graph.sender_points();
    let ablated = match ablation {
        Ablation::Patching => sender_acts(model, &Rows::of(prep, 0, prep.n_prompts()), &senders, true)?,
        Ablation::Zero | Ablation::Mean => {
            let clean = sender_acts(model, &Rows::of(prep, 0, prep.n_prompts()), &senders, false)?;
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
        progress(chunk.len());
    }
    Ok(out)
}

/// What an evaluation forward's hooks share: the senders' δ so far.
struct Live {
    /// Each sender's δ in this run (ablated − live activation): [C, S, n·pos·d].
    deltas: Tensor,
    /// Σ of δ over the senders before each sender-point boundary (by its first sender index).
    prefix: std::collections::HashMap<usize, Tensor>,
    running: Tensor,
}

/// The shared state, or a named error if a hook panicked holding it.
fn lock(l: &std::sync::Mutex<Live>) -> Result<std::sync::MutexGuard<'_, Live>> {
    l.lock().map_err(|_| Error::Other("an evaluation hook panicked".into()))
}

/// One forward of a batch of circuits (rows: circuit-major, then prompt). With δ_u = ablated z_u
/// − z_u in this run, a receiver's update is Σ over its senders whose edge is off of δ_u. Its
/// senders are a prefix of the sender order (every sender before its layer, and a sequential
/// block's own heads for its MLP), so the update is also (Σ over that prefix of δ_u) − (Σ over
/// the senders whose edge is on of δ_u): the prefix sums are kept as the senders are computed,
/// and each receiver block reads only the fewer of its on or off senders.
fn evaluate_batch(
    model: &Model,
    prep: &CleanCorrupted,
    graph: &Graph,
    circuits: &[Vec<bool>],
    ablated: &Tensor,
) -> Result<Vec<Vec<f64>>> {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    let c = circuits.len() as i64;
    let [n, p, s, d] = ablated.size()[..] else { unreachable!("senders are stacked as [b, pos, S, d]") };
    let x = n * p * d;
    let (device, kind) = (ablated.device(), ablated.kind());
    let edges = graph.edges();
    // Senders first, each sender's activations contiguous: [S, n·pos·d].
    let ablated = ablated.permute([2, 0, 1, 3]).contiguous().view([s, x]);
    let live = Arc::new(Mutex::new(Live {
        deltas: Tensor::zeros([c, s, x], (kind, device)),
        prefix: HashMap::from([(0, Tensor::zeros([c, x], (kind, device)))]),
        running: Tensor::zeros([c, x], (kind, device)),
    }));
    let mut hooks = Hooks::new();
    for (point, first, count) in graph.sender_slots() {
        let live = Arc::clone(&live);
        let ablated = ablated.narrow(0, first as i64, count as i64);
        let write = move |t: &Tensor| -> Result<Tensor> {
            let k = count as i64;
            let per_sender = t.reshape([c, n, p, k, d]).permute([0, 3, 1, 2, 4]).reshape([c, k, x]);
            let mut l = lock(&live)?;
            let deltas = ablated.unsqueeze(0) - &per_sender;
            l.running = &l.running + deltas.sum_dim_intlist(1, false, kind);
            l.deltas.narrow(1, first as i64, k).copy_(&deltas);
            let total = l.running.shallow_clone();
            l.prefix.insert(first + count, total);
            Ok(t.shallow_clone())
        };
        hooks.add_intervention(point, Intervention::new(Edit::Func(Box::new(write))));
    }
    for (point, first, count) in graph.receiver_blocks() {
        let block = first..first + count;
        // The receivers' senders: a prefix of the sender order, [0, prev).
        let Some(prev) = edges.iter().filter(|(_, r)| block.contains(r)).map(|&(si, _)| si + 1).max() else {
            continue;
        };
        // Per circuit, each sender's edges into the block that are on / off.
        let (mut on, mut off) = (vec![0f32; circuits.len() * count * prev], vec![0f32; circuits.len() * count * prev]);
        for (e, &(si, ri)) in edges.iter().enumerate() {
            if !block.contains(&ri) {
                continue;
            }
            for (ci, keep) in circuits.iter().enumerate() {
                let at = (ci * count + (ri - first)) * prev + si;
                if keep[e] {
                    on[at] = 1.0;
                } else {
                    off[at] = 1.0;
                }
            }
        }
        let senders_of = |m: &[f32]| -> Vec<i64> {
            (0..prev)
                .filter(|&si| (0..circuits.len() * count).any(|row| m[row * prev + si] != 0.0))
                .map(|si| si as i64)
                .collect()
        };
        let (on_senders, off_senders) = (senders_of(&on), senders_of(&off));
        if off_senders.is_empty() {
            continue;
        }
        // Fewer senders to read: the off edges directly, or the prefix sum less the on edges.
        let from_prefix = on_senders.len() < off_senders.len();
        let (mask, chosen) = if from_prefix { (on, on_senders) } else { (off, off_senders) };
        let index = Tensor::from_slice(&chosen).to_device(device);
        let mask = Tensor::from_slice(&mask)
            .view([c, count as i64, prev as i64])
            .to_device(device)
            .to_kind(kind)
            .index_select(2, &index);
        let live = Arc::clone(&live);
        let k = count as i64;
        let edit = move |t: &Tensor| -> Result<Tensor> {
            let l = lock(&live)?;
            // [C, a, n·pos·d]: δ of the chosen senders.
            let picked = mask.matmul(&l.deltas.index_select(1, &index));
            let update = if from_prefix {
                let total =
                    l.prefix.get(&prev).ok_or_else(|| Error::Other(format!("senders before {prev} not seen")))?;
                total.unsqueeze(1) - picked
            } else {
                picked
            };
            let update = update.view([c, k, n, p, d]).permute([0, 2, 3, 1, 4]).reshape([c * n, p, k, d]);
            Ok(if t.dim() == 3 { t + update.squeeze_dim(2) } else { t + update })
        };
        hooks.add_intervention(point, Intervention::new(Edit::Func(Box::new(edit))));
    }
    let tokens = prep.clean_tokens.repeat([c, 1]);
    let mask = prep.mask.as_ref().map(|m| m.repeat([c, 1]));
    let t = std::time::Instant::now();
    let out = model.run(Input::Tokens(&tokens), mask.as_ref(), &mut hooks, Stop::FinalNorm)?;
    tracing::debug!("evaluation forward of {c} circuits: {:.2} s", t.elapsed().as_secs_f64());
    let metric = prep.metric.tiled(c as usize);
    let values: Vec<f64> = Vec::try_from(metric.per_row(model, &out).to_kind(Kind::Double))?;
    Ok(values.chunks(n as usize).map(|v| v.to_vec()).collect())
}

/// The real change of the metric (its mean over prompts) when each edge in `which` (indices into
/// `graph.edges()`) alone carries its sender's ablated activation, every other edge its live one:
/// exact edge patching, which is path patching of one sender into one receiver input (Wang et al.
/// 2023). Measured against the whole graph (the clean run under patching), so it compares with
/// the scores' estimates.
pub fn exact_changes(
    model: &Model,
    prep: &CleanCorrupted,
    graph: &Graph,
    which: &[usize],
    ablation: Ablation,
    progress: impl FnMut(usize),
) -> Result<Vec<f64>> {
    let all = graph.edges().len();
    let mut masks: Vec<Vec<bool>> = which
        .iter()
        .map(|&e| {
            let mut keep = vec![true; all];
            keep[e] = false;
            keep
        })
        .collect();
    masks.push(vec![true; all]);
    let values = evaluate(model, prep, graph, &masks, ablation, progress)?;
    let means: Vec<f64> = values.iter().map(|v| super::mean(v)).collect();
    let base = means[means.len() - 1];
    Ok(means[..which.len()].iter().map(|m| m - base).collect())
}
