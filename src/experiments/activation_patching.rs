//! Activation patching, equal to TransformerLens's patching.py but batched: the patch index is a
//! batch dimension (many cells per forward), every forward starts at the patched layer from the
//! cached corrupted residual, and cells that provably cannot change are filled without compute.
use tch::{Kind, Tensor};

use crate::engine::hooks::{Edit, Intervention};
use crate::error::{Error, Result};
use crate::experiments::prepared::Prepared;
use crate::model::hook_point::{HookPoint, Site};
use crate::{Hooks, Input, Model, Stop};

/// The axes a sweep runs over (TransformerLens's index_axis_names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Axes {
    /// resid_pre/mid/post, attn_out, mlp_out: one cell per (layer, pos).
    LayerPos,
    /// z/q/k/v at one position: (layer, pos, head).
    LayerPosHead,
    /// z/q/k/v (all positions) and pattern (all positions): (layer, head).
    LayerHead,
    /// pattern row of one destination: (layer, head, dest).
    LayerHeadDest,
    /// one pattern entry: (layer, head, dest, src).
    LayerHeadDestSrc,
}

impl Axes {
    pub fn names(self) -> &'static [&'static str] {
        match self {
            Axes::LayerPos => &["layer", "pos"],
            Axes::LayerPosHead => &["layer", "pos", "head"],
            Axes::LayerHead => &["layer", "head"],
            Axes::LayerHeadDest => &["layer", "head", "dest"],
            Axes::LayerHeadDestSrc => &["layer", "head", "dest", "src"],
        }
    }
}

/// One patching target: a block site swept over some axes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Target {
    pub site: Site,
    pub axes: Axes,
}

impl Target {
    /// Which axes each site can be swept over, as in patching.py.
    pub fn new(site: Site, axes: Axes) -> Result<Target> {
        let ok = match site {
            Site::ResidPre | Site::ResidMid | Site::ResidPost | Site::AttnOut | Site::MlpOut => axes == Axes::LayerPos,
            Site::Z | Site::Q | Site::K | Site::V => matches!(axes, Axes::LayerPosHead | Axes::LayerHead),
            Site::Pattern => matches!(axes, Axes::LayerHead | Axes::LayerHeadDest | Axes::LayerHeadDestSrc),
            _ => false,
        };
        if ok {
            Ok(Target { site, axes })
        } else {
            Err(Error::Config(format!("{} cannot be patched over [{}]", site.name(), axes.names().join(", "))))
        }
    }
}

/// One patched cell's coordinates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cell {
    pub layer: usize,
    pub head: Option<i64>,
    pub pos: Option<i64>,
    pub dest: Option<i64>,
    pub src: Option<i64>,
}

/// A finished sweep: cells in TransformerLens's row-major order with per-prompt metric values.
pub struct Sweep {
    pub target: Target,
    pub cells: Vec<Cell>,
    /// [cells][prompts] raw metric values.
    pub per_prompt: Vec<Vec<f64>>,
    /// Cells filled with the corrupted baseline without a forward pass.
    pub skipped: Vec<bool>,
    pub forwards: usize,
    /// Cells per batched forward at the end (after any halving).
    pub cells_per_forward: usize,
    /// How many times a batch ran out of memory and was halved.
    pub oom_halvings: usize,
}

impl Sweep {
    pub fn mean(&self, cell: usize) -> f64 {
        crate::experiments::mean(&self.per_prompt[cell])
    }
}

fn heads_at(cfg: &crate::model::config::ModelConfig, site: Site) -> i64 {
    match site {
        Site::K | Site::V => cfg.n_kv_heads as i64, // k, v are patched over key-value heads
        _ => cfg.n_heads as i64,
    }
}

/// Every cell of `target` at one layer, in row-major order of the target's axes.
pub(crate) fn cells_at(cfg: &crate::model::config::ModelConfig, target: Target, layer: usize, seq: i64) -> Vec<Cell> {
    let heads = heads_at(cfg, target.site);
    let base = Cell { layer, head: None, pos: None, dest: None, src: None };
    let mut out = Vec::new();
    match target.axes {
        Axes::LayerPos => out.extend((0..seq).map(|p| Cell { pos: Some(p), ..base })),
        Axes::LayerPosHead => {
            for p in 0..seq {
                out.extend((0..heads).map(|h| Cell { pos: Some(p), head: Some(h), ..base }));
            }
        }
        Axes::LayerHead => out.extend((0..heads).map(|h| Cell { head: Some(h), ..base })),
        Axes::LayerHeadDest => {
            for h in 0..heads {
                out.extend((0..seq).map(|d| Cell { head: Some(h), dest: Some(d), ..base }));
            }
        }
        Axes::LayerHeadDestSrc => {
            for h in 0..heads {
                for d in 0..seq {
                    out.extend((0..seq).map(|s| Cell { head: Some(h), dest: Some(d), src: Some(s), ..base }));
                }
            }
        }
    }
    out
}

/// True when patching `cell` provably changes nothing: every activation at a position before the
/// first clean/corrupted difference is identical (causal attention), and a pattern entry with
/// src > dest is masked to zero in both runs.
pub(crate) fn cannot_change(cell: &Cell, first_diff: i64) -> bool {
    let before = |p: Option<i64>| p.is_some_and(|p| p < first_diff);
    before(cell.pos) || before(cell.dest) || matches!((cell.dest, cell.src), (Some(d), Some(s)) if s > d)
}

/// The mask of what to take from the clean run for some cells of a chunk of `blocks` cells (each
/// block is the n prompts of one cell; `cells` pairs a block index with its cell, and blocks not
/// named stay unpatched), shaped to broadcast against the activation.
/// `skip` positions are not computed (a key-value prefix): position coordinates shift by it.
fn patch_mask(target: Target, cells: &[(i64, Cell)], blocks: i64, n: i64, act_shape: &[i64], skip: i64) -> Tensor {
    let rows = blocks * n;
    // The mask's shape: activation shape with broadcast (size-1) axes where a cell covers all.
    let attn = target.site == Site::Pattern;
    let mut shape = act_shape.to_vec();
    shape[0] = rows;
    match target.axes {
        Axes::LayerPos => shape[2] = 1,
        Axes::LayerPosHead => shape[3] = 1,
        Axes::LayerHead if attn => {
            shape[2] = 1;
            shape[3] = 1
        }
        Axes::LayerHead => {
            shape[1] = 1;
            shape[3] = 1
        }
        Axes::LayerHeadDest => shape[3] = 1,
        Axes::LayerHeadDestSrc => {}
    }
    // One coordinate list per mask axis (0 on broadcast axes), one entry per row.
    let mut coords: Vec<Vec<i64>> = vec![Vec::with_capacity(cells.len() * n as usize); shape.len()];
    for &(k, c) in cells {
        let (pos, dest) = (c.pos.unwrap_or(0) - skip, c.dest.unwrap_or(0) - skip);
        let at: Vec<i64> = match (target.axes, attn) {
            (Axes::LayerPos, _) => vec![pos, 0],
            (Axes::LayerPosHead, _) => vec![pos, c.head.unwrap_or(0), 0],
            (Axes::LayerHead, true) => vec![c.head.unwrap_or(0), 0, 0],
            (Axes::LayerHead, false) => vec![0, c.head.unwrap_or(0), 0],
            (Axes::LayerHeadDest, _) => vec![c.head.unwrap_or(0), dest, 0],
            (Axes::LayerHeadDestSrc, _) => vec![c.head.unwrap_or(0), dest, c.src.unwrap_or(0)],
        };
        for i in 0..n {
            coords[0].push(k * n + i);
            for (ax, v) in at.iter().enumerate() {
                coords[ax + 1].push(*v);
            }
        }
    }
    let mask = Tensor::zeros(shape.as_slice(), (Kind::Bool, tch::Device::Cpu));
    let index: Vec<Option<Tensor>> = coords.iter().map(|c| Some(Tensor::from_slice(c))).collect();
    mask.index_put(&index, &Tensor::from(true), false)
}

/// How many cells to run per forward: as many as fit the working-memory budget of `device`
/// (engine::memory: a flag, TL_RUN_BATCH_FLOATS, a CUDA device's free memory or a CPU default).
pub(crate) fn cells_per_forward(c: &crate::model::config::ModelConfig, n: i64, seq: i64, device: tch::Device) -> usize {
    let per_row_floats = seq * (12 * c.d_model as i64 + 4 * c.n_heads as i64 * seq + 3 * c.mlp.d_mlp as i64 + 4 * (c.n_heads * c.d_head) as i64);
    let budget_floats = crate::engine::memory::budget_floats(device);
    ((budget_floats / per_row_floats.max(1)) / n).clamp(1, 4096) as usize
}

/// Runs one target's sweep over every layer (or only `layers`). `progress` gets cells done.
pub fn sweep(model: &Model, prep: &Prepared, target: Target, progress: impl FnMut(usize)) -> Result<Sweep> {
    let all: Vec<usize> = (0..model.cfg.n_layers).collect();
    sweep_layers(model, prep, target, &all, progress)
}

pub fn sweep_layers(model: &Model, prep: &Prepared, target: Target, layers: &[usize], progress: impl FnMut(usize)) -> Result<Sweep> {
    let mut cells = Vec::new();
    for &layer in layers {
        if layer >= model.cfg.n_layers {
            return Err(Error::Config(format!("layer {layer} is out of range: the model has {} layers: 0-{}", model.cfg.n_layers, model.cfg.n_layers - 1)));
        }
        cells.extend(cells_at(&model.cfg, target, layer, prep.seq_len()));
    }
    sweep_cells(model, prep, target, &cells, progress)
}

/// Patches each of `cells` (any subset of the target's cells, e.g. the top cells of an
/// attribution) in batched forwards grouped by layer; results in the order given.
pub fn sweep_cells(model: &Model, prep: &Prepared, target: Target, cells: &[Cell], progress: impl FnMut(usize)) -> Result<Sweep> {
    let mut sweeps = sweep_together(model, prep, &[(target, cells.to_vec())], progress)?;
    Ok(sweeps.pop().expect("one sweep per part"))
}

/// Several targets' cells patched in shared forwards: the cells of every part at one layer
/// are the batch of one forward from that layer (each part's patch edits only its own rows),
/// so the sweeps of one layer pay one pass's fixed costs, not one each. On a GPU those costs,
/// kernel launches through every later layer, were most of a job's time. Each row's numbers
/// are those of a forward of its part alone. One sweep per part, cells in the order given.
pub fn sweep_together(model: &Model, prep: &Prepared, parts: &[(Target, Vec<Cell>)], mut progress: impl FnMut(usize)) -> Result<Vec<Sweep>> {
    let n = prep.n_prompts();
    let seq = prep.seq_len();
    let fill = |c: &Cell| cannot_change(c, prep.first_diff).then(|| prep.corrupted_per_prompt.clone());
    let mut values: Vec<Vec<Option<Vec<f64>>>> = parts.iter().map(|(_, cells)| cells.iter().map(fill).collect()).collect();
    progress(values.iter().flatten().filter(|v| v.is_some()).count());
    let mut forwards = vec![0usize; parts.len()];
    let mut chunk_size = cells_per_forward(&model.cfg, n, seq, model.device);
    let mut halvings = 0;
    // With a prefix only positions from `skip` on are computed: the query axis of patterns,
    // the position axis of everything else.
    let skip = prep.prefix.as_ref().map(|p| p.len).unwrap_or(0);
    let computed = seq - skip;
    let mut layers: Vec<usize> = parts.iter().flat_map(|(_, cells)| cells.iter().map(|c| c.layer)).collect();
    layers.sort_unstable();
    layers.dedup();
    for layer in layers {
        // Each part's clean activation at this layer (computed positions only).
        let mut clean: Vec<Option<Tensor>> = Vec::with_capacity(parts.len());
        for (target, cells) in parts {
            if !cells.iter().any(|c| c.layer == layer) {
                clean.push(None);
                continue;
            }
            let point = HookPoint::Block(layer, target.site);
            let full = prep.clean.get(&point).ok_or_else(|| Error::Other(format!("{point} was not cached on the clean run")))?;
            clean.push(Some(if target.site == Site::Pattern { full.narrow(2, skip, computed) } else { full.narrow(1, skip, computed) }));
        }
        // (part, cell index) of every cell at this layer that needs a forward, part by part.
        let todo: Vec<(usize, usize)> = (0..parts.len())
            .flat_map(|p| (0..parts[p].1.len()).map(move |i| (p, i)))
            .filter(|&(p, i)| parts[p].1[i].layer == layer && values[p][i].is_none())
            .collect();
        let mut at = 0;
        while at < todo.len() {
            let chunk = &todo[at..(at + chunk_size).min(todo.len())];
            let k = chunk.len() as i64;
            let in_chunk: Vec<usize> = (0..parts.len()).filter(|&p| chunk.iter().any(|&(q, _)| q == p)).collect();
            let forward = || -> Result<Vec<f64>> {
                if let Some(oom) = crate::engine::memory::injected_oom(k * n) {
                    return Err(Error::Other(oom));
                }
                let resid = prep.corrupted_resid_pre[layer].narrow(1, skip, computed).repeat([k, 1, 1]);
                let mask = prep.mask.as_ref().map(|m| m.repeat([k, 1]));
                let prefix = prep.prefix.as_ref().map(|p| p.repeat(k));
                let mut hooks = Hooks::new();
                for &p in &in_chunk {
                    let (target, cells) = &parts[p];
                    let clean = clean[p].as_ref().expect("a part with cells at this layer has its clean activation");
                    let mine: Vec<(i64, Cell)> = chunk.iter().enumerate().filter(|(_, &(q, _))| q == p).map(|(j, &(_, i))| (j as i64, cells[i])).collect();
                    let patch = patch_mask(*target, &mine, k, n, &clean.size(), skip).to_device(model.device);
                    let source = clean.repeat(repeat_dims(k, clean.dim()));
                    hooks.add_intervention(HookPoint::Block(layer, target.site), Intervention::new(Edit::Where { mask: patch, source }));
                }
                let out = model.run_with_prefix(Input::Residual { layer, resid: &resid }, mask.as_ref(), &mut hooks, Stop::FinalNorm, prefix.as_ref())?;
                Ok(Vec::try_from(prep.metric.per_row(model, &out.select(1, -1)).to_kind(Kind::Double))?)
            };
            // A batch that does not fit is halved and retried (libtorch reports a failed
            // allocation as an error or, through tch, a panic).
            let v = match crate::panics::guarded("a batch of patched forwards", forward) {
                Err(e) if chunk.len() > 1 && crate::engine::memory::is_out_of_memory(&e.to_string()) => {
                    chunk_size = chunk.len().div_ceil(2);
                    halvings += 1;
                    tracing::warn!(layer, cells = chunk.len(), now = chunk_size, "out of memory: halving the batch and retrying");
                    continue;
                }
                other => other?,
            };
            for &p in &in_chunk {
                forwards[p] += 1;
            }
            for (j, &(p, i)) in chunk.iter().enumerate() {
                values[p][i] = Some(v[j * n as usize..(j + 1) * n as usize].to_vec());
            }
            progress(chunk.len());
            at += chunk.len();
        }
    }
    let sweeps = parts
        .iter()
        .zip(values)
        .zip(forwards)
        .map(|(((target, cells), values), forwards)| Sweep {
            target: *target,
            cells: cells.clone(),
            skipped: cells.iter().map(|c| cannot_change(c, prep.first_diff)).collect(),
            per_prompt: values.into_iter().map(|v| v.expect("every cell has a value")).collect(),
            forwards,
            cells_per_forward: chunk_size,
            oom_halvings: halvings,
        })
        .collect();
    Ok(sweeps)
}

/// Repeat counts that stack `k` copies along the first axis of a `dim`-axis tensor.
pub(crate) fn repeat_dims(k: i64, dim: usize) -> Vec<i64> {
    let mut r = vec![1i64; dim];
    r[0] = k;
    r
}
