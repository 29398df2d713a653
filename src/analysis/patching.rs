//! Activation patching, equal to TransformerLens's patching.py but batched: the patch index is a
//! batch dimension (many cells per forward), every forward starts at the patched layer from the
//! cached corrupted residual, and cells that provably cannot change are filled without compute.
use tch::{Kind, Tensor};

use crate::analysis::clean_corrupted::CleanCorrupted;
use crate::engine::hooks::{Edit, Intervention};
use crate::error::{Error, Result};
use crate::model::hook_point::{HookPoint, Site};
use crate::{Hooks, Input, Model, Stop};

pub use crate::analysis::patch_cells::{cannot_change, cells_at, cells_with_roles, Axes, Cell, Target};

/// A layer and the cells (part, cell index) whose forwards start there.
type Step = (usize, Vec<(usize, usize)>);
/// The steps of the cells computed from one position on (by-position schedule).
type PositionGroup = (i64, Vec<Step>);

/// A finished sweep: cells in TransformerLens's row-major order with per-prompt metric values.
pub struct Sweep {
    pub target: Target,
    pub cells: Vec<Cell>,
    /// [cells][prompts] raw metric values.
    pub per_prompt: Vec<Vec<f64>>,
    /// Cells filled with the corrupted baseline without a forward pass.
    pub skipped: Vec<bool>,
    pub forwards: usize,
    /// Rows × positions × layers its forwards computed (the last block's positions counted
    /// whole): the arithmetic, whatever the schedule.
    pub computed: u64,
    /// Cells per batched forward at the end (after any halving).
    pub cells_per_forward: usize,
    /// How many times a batch ran out of memory and was halved.
    pub oom_halvings: usize,
}

impl Sweep {
    pub fn mean(&self, cell: usize) -> f64 {
        crate::analysis::mean(&self.per_prompt[cell])
    }
}

/// The mask of what to take from the clean run for some cells of a chunk of `blocks` cells (each
/// block is the n prompts of one cell; `cells` pairs a block index with its cell, and blocks not
/// named stay unpatched), shaped to broadcast against the activation.
/// `skip` positions are not computed (a key-value prefix): position coordinates shift by it.
/// Role cells read each row's position from `roles` ([role][row of a block]); a row whose
/// position is in the prefix is left alone (there clean and corrupted are equal).
fn patch_mask(
    target: Target,
    cells: &[(i64, Cell)],
    blocks: i64,
    n: i64,
    act_shape: &[i64],
    skip: i64,
    roles: &[Vec<i64>],
) -> Tensor {
    let rows = blocks * n;
    // The mask's shape: activation shape with broadcast (size-1) axes where a cell covers all.
    let attn = target.site == Site::Pattern;
    let mut shape = act_shape.to_vec();
    shape[0] = rows;
    match target.axes {
        Axes::LayerPos | Axes::LayerRole => shape[2] = 1,
        Axes::LayerPosHead | Axes::LayerRoleHead => shape[3] = 1,
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
        let dest = c.dest.unwrap_or(0) - skip;
        for i in 0..n {
            let pos = match c.role {
                Some(r) => roles[r][i as usize] - skip,
                None => c.pos.unwrap_or(skip) - skip,
            };
            // A role's position inside the prefix: clean equals corrupted there.
            if pos < 0 {
                continue;
            }
            let at: Vec<i64> = match (target.axes, attn) {
                (Axes::LayerPos | Axes::LayerRole, _) => vec![pos, 0],
                (Axes::LayerPosHead | Axes::LayerRoleHead, _) => vec![pos, c.head.unwrap_or(0), 0],
                (Axes::LayerHead, true) => vec![c.head.unwrap_or(0), 0, 0],
                (Axes::LayerHead, false) => vec![0, c.head.unwrap_or(0), 0],
                (Axes::LayerHeadDest, _) => vec![c.head.unwrap_or(0), dest, 0],
                (Axes::LayerHeadDestSrc, _) => vec![c.head.unwrap_or(0), dest, c.src.unwrap_or(0)],
            };
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
    let per_row_floats = seq
        * (12 * c.d_model as i64
            + 4 * c.n_heads as i64 * seq
            + 3 * c.mlp.d_mlp as i64
            + 4 * (c.n_heads * c.d_head) as i64);
    let budget_floats = crate::engine::memory::budget_floats(device);
    ((budget_floats / per_row_floats.max(1)) / n).clamp(1, 4096) as usize
}

/// Runs one target's sweep over every layer (or only `layers`). `progress` gets cells done.
pub fn sweep(model: &Model, prep: &CleanCorrupted, target: Target, progress: impl FnMut(usize)) -> Result<Sweep> {
    let all: Vec<usize> = (0..model.cfg.n_layers).collect();
    sweep_layers(model, prep, target, &all, progress)
}

pub fn sweep_layers(
    model: &Model,
    prep: &CleanCorrupted,
    target: Target,
    layers: &[usize],
    progress: impl FnMut(usize),
) -> Result<Sweep> {
    let mut cells = Vec::new();
    for &layer in layers {
        if layer >= model.cfg.n_layers {
            return Err(Error::Config(format!(
                "layer {layer} is out of range: the model has {} layers: 0-{}",
                model.cfg.n_layers,
                model.cfg.n_layers - 1
            )));
        }
        cells.extend(cells_at(&model.cfg, target, layer, prep.seq_len()));
    }
    sweep_cells(model, prep, target, &cells, progress)
}

/// Patches each of `cells` (any subset of the target's cells, e.g. the top cells of an
/// attribution) in batched forwards grouped by layer; results in the order given.
pub fn sweep_cells(
    model: &Model,
    prep: &CleanCorrupted,
    target: Target,
    cells: &[Cell],
    progress: impl FnMut(usize),
) -> Result<Sweep> {
    let mut sweeps = sweep_together(model, prep, &[(target, cells.to_vec())], progress)?;
    Ok(sweeps.pop().expect("one sweep per part"))
}

/// How a sweep over several layers is cut into forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// One forward (or chunk of forwards) per layer, each starting at that layer: on a CPU the
    /// work is the arithmetic, and this keeps every forward's batch small.
    ByLayer,
    /// One forward for the cells of many layers: it starts at the first layer, and before each
    /// later layer the cells patched there join the batch, so each row still runs only the
    /// layers from its own on. The arithmetic is the same as `ByLayer`'s, but a sweep over L
    /// layers launches each kernel about L times instead of L²/2: on a GPU, where launches
    /// rather than arithmetic bound these small batches, that is most of a sweep's time.
    Staircase,
    /// Cells at one position (`over` with `pos`) computed from that position on: under causal
    /// attention a patch at position p cannot change the positions before it, so each forward
    /// reuses the corrupted run's keys and values there and computes only positions p.. . The
    /// cells of one position across layers share a staircase (batches stay large); other cells
    /// run by layer. On a CPU, where the arithmetic is the cost, this computes about half the
    /// positions a by-layer sweep does.
    ByPosition,
}

impl Schedule {
    pub const ALL: [Schedule; 3] = [Schedule::ByLayer, Schedule::Staircase, Schedule::ByPosition];

    /// The name TL_RUN_PATCH_SCHEDULE and the manifest use.
    pub fn name(self) -> &'static str {
        match self {
            Schedule::ByLayer => "by_layer",
            Schedule::Staircase => "staircase",
            Schedule::ByPosition => "by_position",
        }
    }

    /// Staircase on CUDA devices, ByPosition on the CPU;
    /// TL_RUN_PATCH_SCHEDULE=staircase|by_layer|by_position chooses (the tests run each on the CPU).
    pub fn for_device(device: tch::Device) -> Schedule {
        match std::env::var("TL_RUN_PATCH_SCHEDULE").as_deref() {
            Ok("staircase") => Schedule::Staircase,
            Ok("by_layer") => Schedule::ByLayer,
            Ok("by_position") => Schedule::ByPosition,
            _ if device.is_cuda() => Schedule::Staircase,
            _ => Schedule::ByPosition,
        }
    }

    /// Whether this schedule's forwards hold cells of several layers (the executor then groups
    /// the patching jobs of every layer).
    pub fn across_layers(self) -> bool {
        self != Schedule::ByLayer
    }
}

/// A sweep's results as they are filled in, and how its forwards went.
struct Progress<'a> {
    /// [part][cell]: per-prompt metric values once known.
    values: Vec<Vec<Option<Vec<f64>>>>,
    forwards: Vec<usize>,
    /// [part]: rows × positions × layers the part's cells computed (`Sweep::computed`).
    computed: Vec<u64>,
    /// [part][cell]: the layer a cell's forward starts at.
    starts: Vec<Vec<usize>>,
    /// Positions and layers of a whole forward.
    seq: i64,
    n_layers: usize,
    chunk_size: usize,
    halvings: usize,
    report: &'a mut dyn FnMut(usize),
}

/// Several targets' cells patched in shared forwards: the cells of every part at one layer
/// are the batch of one forward from that layer (each part's patch edits only its own rows),
/// so the sweeps of one layer pay one pass's fixed costs, not one each. On a GPU those costs,
/// kernel launches through every later layer, were most of a job's time; there, the layers'
/// forwards are also merged into staircases (`Schedule`). Each row's numbers are those of a
/// forward of its part alone. One sweep per part, cells in the order given.
pub fn sweep_together(
    model: &Model,
    prep: &CleanCorrupted,
    parts: &[(Target, Vec<Cell>)],
    progress: impl FnMut(usize),
) -> Result<Vec<Sweep>> {
    sweep_scheduled(model, prep, parts, Schedule::for_device(model.device), progress)
}

/// `sweep_together` with the schedule given rather than the device's.
pub fn sweep_scheduled(
    model: &Model,
    prep: &CleanCorrupted,
    parts: &[(Target, Vec<Cell>)],
    schedule: Schedule,
    mut progress: impl FnMut(usize),
) -> Result<Vec<Sweep>> {
    let n = prep.n_prompts();
    let seq = prep.seq_len();
    let fill = |c: &Cell| cannot_change(c, prep.first_diff).then(|| prep.corrupted_per_prompt.clone());
    let values: Vec<Vec<Option<Vec<f64>>>> = parts.iter().map(|(_, cells)| cells.iter().map(fill).collect()).collect();
    progress(values.iter().flatten().filter(|v| v.is_some()).count());
    // A cell's forward starts at the first layer it patches (its own, or its window's first).
    let n_layers = model.cfg.n_layers;
    let start = |p: usize, c: &Cell| parts[p].0.window_layers(c.layer, n_layers).start;
    let mut state = Progress {
        values,
        forwards: vec![0; parts.len()],
        computed: vec![0; parts.len()],
        starts: (0..parts.len()).map(|p| parts[p].1.iter().map(|c| start(p, c)).collect()).collect(),
        seq,
        n_layers,
        chunk_size: cells_per_forward(&model.cfg, n, seq, model.device),
        halvings: 0,
        report: &mut progress,
    };
    // Without the corrupted run's keys and values (kept when the device's schedule is by
    // position) the by-position schedule cannot reuse them.
    let schedule = match schedule {
        Schedule::ByPosition if prep.corrupted_kv.is_none() => Schedule::ByLayer,
        s => s,
    };
    let mut layers: Vec<usize> = (0..parts.len()).flat_map(|p| parts[p].1.iter().map(move |c| start(p, c))).collect();
    layers.sort_unstable();
    layers.dedup();
    let todo_at = |state: &Progress, layer: usize| -> Vec<(usize, usize)> {
        (0..parts.len())
            .flat_map(|p| (0..parts[p].1.len()).map(move |i| (p, i)))
            .filter(|&(p, i)| start(p, &parts[p].1[i]) == layer && state.values[p][i].is_none())
            .collect()
    };
    match schedule {
        Schedule::ByLayer => {
            for layer in layers {
                let todo = todo_at(&state, layer);
                patch_layer(model, prep, parts, layer, &todo, &mut state, 0)?;
            }
        }
        Schedule::Staircase => {
            let steps: Vec<_> = layers.iter().map(|&l| (l, todo_at(&state, l))).collect();
            staircases(model, prep, parts, steps, 0, &mut state)?;
        }
        Schedule::ByPosition => {
            // Per position: the layers' cells there, in layer order, then a staircase of them.
            let mut by_from: std::collections::BTreeMap<i64, Vec<Step>> = Default::default();
            for &layer in &layers {
                let todo = todo_at(&state, layer);
                let mut other = Vec::new();
                for (p, i) in todo {
                    match own_position(prep, parts[p].0, &parts[p].1[i]) {
                        Some(from) => {
                            let steps = by_from.entry(from).or_default();
                            match steps.last_mut() {
                                Some((l, cells)) if *l == layer => cells.push((p, i)),
                                _ => steps.push((layer, vec![(p, i)])),
                            }
                        }
                        None => other.push((p, i)),
                    }
                }
                if !other.is_empty() {
                    patch_layer(model, prep, parts, layer, &other, &mut state, 0)?;
                }
            }
            let groups: Vec<PositionGroup> = by_from.into_iter().collect();
            positions_in_parallel(model, prep, parts, groups, &mut state)?;
        }
    }
    let (chunk_size, halvings) = (state.chunk_size, state.halvings);
    let sweeps = parts
        .iter()
        .zip(state.values)
        .zip(state.forwards)
        .zip(state.computed)
        .map(|((((target, cells), values), forwards), computed)| Sweep {
            computed,
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

/// The positions a forward computes: those from `from` (a cell's own position, under the
/// by-position schedule; 0 otherwise) and after the shared key-value prefix, whichever start
/// later: (positions skipped, positions computed).
fn computed_from(prep: &CleanCorrupted, from: i64) -> (i64, i64) {
    let skip = from.max(prep.prefix.as_ref().map(|p| p.len).unwrap_or(0));
    (skip, prep.seq_len() - skip)
}

/// The position a cell's forward can start from under the by-position schedule: its own, or the
/// first the metric reads if that is earlier; None for cells not at one position (heads over
/// all positions, roles at each row's own position, patterns).
fn own_position(prep: &CleanCorrupted, target: Target, c: &Cell) -> Option<i64> {
    match target.axes {
        Axes::LayerPos | Axes::LayerPosHead if c.role.is_none() => {
            c.pos.map(|p| p.min(prep.metric.earliest_position(prep.seq_len())))
        }
        _ => None,
    }
}

/// The corrupted run's residual entering `layer` (positions from `skip`), once per cell of `k`:
/// the rows a forward from `layer` starts from.
fn corrupted_rows(prep: &CleanCorrupted, layer: usize, k: i64, skip: i64) -> Tensor {
    let computed = prep.seq_len() - skip;
    prep.corrupted_resid_pre[layer].narrow(1, skip, computed).repeat([k, 1, 1])
}

/// `target`'s clean activation at `layer`, positions from `skip` only (the query axis of
/// patterns, the position axis of everything else).
fn clean_at(prep: &CleanCorrupted, target: Target, layer: usize, skip: i64) -> Result<Tensor> {
    let computed = prep.seq_len() - skip;
    let point = HookPoint::Block(layer, target.site);
    let full =
        prep.clean.get(&point).ok_or_else(|| Error::Other(format!("{point} was not cached on the clean run")))?;
    Ok(if target.site == Site::Pattern { full.narrow(2, skip, computed) } else { full.narrow(1, skip, computed) })
}

/// A forward's batch: `blocks` blocks of n rows (a block is one cell's prompts), computing the
/// positions from `skip`.
#[derive(Clone, Copy)]
struct Rows {
    blocks: i64,
    skip: i64,
}

/// Adds to `hooks` the patches of `cells` (each with its block in the batch), each part's on the
/// rows of its own cells at every layer each cell patches (its own, or its window's; only layer
/// `only` if given). Blocks not named pass through.
fn add_patches(
    hooks: &mut Hooks,
    model: &Model,
    prep: &CleanCorrupted,
    parts: &[(Target, Vec<Cell>)],
    cells: &[(i64, (usize, usize))],
    rows: Rows,
    only: Option<usize>,
) -> Result<()> {
    let n = prep.n_prompts();
    let n_layers = model.cfg.n_layers;
    for p in (0..parts.len()).filter(|&p| cells.iter().any(|&(_, (q, _))| q == p)) {
        let (target, part_cells) = &parts[p];
        let all_mine: Vec<(i64, Cell)> =
            cells.iter().filter(|(_, (q, _))| *q == p).map(|&(block, (_, i))| (block, part_cells[i])).collect();
        let mut layers: Vec<usize> =
            all_mine.iter().flat_map(|(_, c)| target.window_layers(c.layer, n_layers)).collect();
        layers.sort_unstable();
        layers.dedup();
        layers.retain(|l| only.is_none_or(|o| o == *l));
        for layer in layers {
            let mine: Vec<(i64, Cell)> = all_mine
                .iter()
                .filter(|(_, c)| target.window_layers(c.layer, n_layers).contains(&layer))
                .copied()
                .collect();
            let clean = clean_at(prep, *target, layer, rows.skip)?;
            let patch = patch_mask(*target, &mine, rows.blocks, n, &clean.size(), rows.skip, &prep.role_positions)
                .to_device(model.device);
            let source = clean.repeat(repeat_dims(rows.blocks, clean.dim()));
            hooks.add_intervention(
                HookPoint::Block(layer, target.site),
                Intervention::new(Edit::Where { mask: patch, source }),
            );
        }
    }
    Ok(())
}

/// How a patched forward from `layer` ends. From an earlier layer, nothing is hooked in the last
/// block, which then computes only the last position (`Stop::LastPosition`) when that is all the
/// metric reads (not a role's position or a multi-token answer). A forward that
/// starts in the last block patches it: there, whether a patch's site lets that block skip
/// positions would depend on which other jobs share the forward, so it computes every position
/// whatever they are, and each row's numbers stay those of its own cell (byte-identical files
/// whether jobs share forwards, run on replicas or under either schedule).
fn last_block_stop(model: &Model, prep: &CleanCorrupted, layer: usize) -> Stop {
    if layer + 1 < model.cfg.n_layers && prep.metric.reads_last_only() {
        Stop::LastPosition
    } else {
        Stop::FinalNorm
    }
}

/// The cells `todo` of one layer in batched forwards from that layer, computing the positions
/// from `from` on (`computed_from`), chunked to the batch budget (halved on running out of
/// memory).
fn patch_layer(
    model: &Model,
    prep: &CleanCorrupted,
    parts: &[(Target, Vec<Cell>)],
    layer: usize,
    todo: &[(usize, usize)],
    state: &mut Progress,
    from: i64,
) -> Result<()> {
    let n = prep.n_prompts();
    let (skip, _) = computed_from(prep, from);
    let mut at = 0;
    while at < todo.len() {
        let chunk = &todo[at..(at + state.chunk_size).min(todo.len())];
        let k = chunk.len() as i64;
        let forward = || -> Result<Vec<f64>> {
            if let Some(oom) = crate::engine::memory::injected_oom(k * n) {
                return Err(Error::Other(oom));
            }
            let resid = corrupted_rows(prep, layer, k, skip);
            let mask = prep.mask.as_ref().map(|m| m.repeat([k, 1]));
            let prefix = prep.kv_before(skip).map(|p| p.repeat_from(k, layer));
            let mut hooks = Hooks::new();
            let cells: Vec<(i64, (usize, usize))> = chunk.iter().enumerate().map(|(j, &c)| (j as i64, c)).collect();
            add_patches(&mut hooks, model, prep, parts, &cells, Rows { blocks: k, skip }, None)?;
            let last_patched = chunk
                .iter()
                .map(|&(p, i)| parts[p].0.window_layers(parts[p].1[i].layer, model.cfg.n_layers).end - 1)
                .max()
                .unwrap_or(layer);
            let stop = last_block_stop(model, prep, last_patched);
            let out = model.run_with_prefix(
                Input::Residual { layer, resid: &resid },
                mask.as_ref(),
                &mut hooks,
                stop,
                prefix.as_ref(),
            )?;
            Ok(Vec::try_from(prep.metric.per_row(model, &out).to_kind(Kind::Double))?)
        };
        // A batch that does not fit is halved and retried (libtorch reports a failed
        // allocation as an error or, through tch, a panic).
        let v = match crate::panics::guarded("a batch of patched forwards", forward) {
            Err(e) if chunk.len() > 1 && crate::error::is_out_of_memory(&e.to_string()) => {
                state.chunk_size = chunk.len().div_ceil(2);
                state.halvings += 1;
                tracing::warn!(
                    layer,
                    cells = chunk.len(),
                    now = state.chunk_size,
                    "out of memory: halving the batch and retrying"
                );
                continue;
            }
            other => other?,
        };
        state.record(chunk, &v, n, skip);
        at += chunk.len();
    }
    Ok(())
}

/// The cells of `steps` (each layer with its cells, in layer order) in staircase forwards
/// computing the positions from `from` on: consecutive layers whose cells fit one batch share a
/// staircase; a layer with more cells than a batch holds runs by itself, in chunks.
fn staircases(
    model: &Model,
    prep: &CleanCorrupted,
    parts: &[(Target, Vec<Cell>)],
    steps: Vec<(usize, Vec<(usize, usize)>)>,
    from: i64,
    state: &mut Progress,
) -> Result<()> {
    let mut window: Vec<(usize, Vec<(usize, usize)>)> = Vec::new();
    let mut in_window = 0;
    for (layer, todo) in steps {
        if todo.is_empty() {
            continue;
        }
        // The last layer's cells run by themselves: a forward that starts there computes
        // every position (`last_block_stop`), which the staircase's other rows need not.
        if todo.len() > state.chunk_size || layer + 1 == model.cfg.n_layers {
            patch_layer(model, prep, parts, layer, &todo, state, from)?;
            continue;
        }
        if in_window + todo.len() > state.chunk_size {
            patch_staircase(model, prep, parts, std::mem::take(&mut window), state, from)?;
            in_window = 0;
        }
        in_window += todo.len();
        window.push((layer, todo));
    }
    if !window.is_empty() {
        patch_staircase(model, prep, parts, window, state, from)?;
    }
    Ok(())
}

/// The cells of several layers (`window`: each layer with its cells, in layer order) in one
/// staircase forward, computing the positions from `from` on. Each layer's patches are those of
/// every row that has joined and patches there (a window patches several layers). Out of
/// memory, the window's layers run one by one instead, each chunked and halved as it needs.
fn patch_staircase(
    model: &Model,
    prep: &CleanCorrupted,
    parts: &[(Target, Vec<Cell>)],
    window: Vec<(usize, Vec<(usize, usize)>)>,
    state: &mut Progress,
    from: i64,
) -> Result<()> {
    let n = prep.n_prompts();
    let (skip, _) = computed_from(prep, from);
    let kv = prep.kv_before(skip);
    let last_layer = model.cfg.n_layers - 1;
    let Some(first) = window.first().map(|(l, _)| *l) else { return Ok(()) };
    let total: i64 = window.iter().map(|(_, todo)| todo.len() as i64).sum();
    let forward = || -> Result<Vec<f64>> {
        if let Some(oom) = crate::engine::memory::injected_oom(total * n) {
            return Err(Error::Other(oom));
        }
        let mut x: Option<Tensor> = None;
        let mut blocks = 0i64;
        let mut joined: Vec<(i64, (usize, usize))> = Vec::new();
        for layer in first..model.cfg.n_layers {
            if let Some((_, todo)) = window.iter().find(|(l, _)| *l == layer) {
                let k = todo.len() as i64;
                let joining = corrupted_rows(prep, layer, k, skip);
                x = Some(match x.take() {
                    Some(x) => Tensor::cat(&[x.to_device(joining.device()), joining], 0),
                    None => joining,
                });
                joined.extend(todo.iter().enumerate().map(|(j, &c)| (blocks + j as i64, c)));
                blocks += k;
            }
            let Some(resid) = x.take() else { continue };
            let mut hooks = Hooks::new();
            add_patches(&mut hooks, model, prep, parts, &joined, Rows { blocks, skip }, Some(layer))?;
            let mask = prep.mask.as_ref().map(|m| m.repeat([blocks, 1]));
            let prefix = kv.as_ref().map(|p| p.repeat_layers(blocks, layer..layer + 1));
            // The last layer ends the staircase: ln_final's output at the last position.
            let stop = match layer == last_layer {
                true if prep.metric.reads_last_only() => Stop::LastPosition,
                true => Stop::FinalNorm,
                false => Stop::BeforeLayer(layer + 1),
            };
            x = Some(model.run_with_prefix(
                Input::Residual { layer, resid: &resid },
                mask.as_ref(),
                &mut hooks,
                stop,
                prefix.as_ref(),
            )?);
        }
        let last = x.expect("the window has cells");
        Ok(Vec::try_from(prep.metric.per_row(model, &last).to_kind(Kind::Double))?)
    };
    match crate::panics::guarded("a staircase of patched forwards", forward) {
        Ok(v) => {
            let order: Vec<(usize, usize)> = window.iter().flat_map(|(_, todo)| todo.iter().copied()).collect();
            state.record(&order, &v, n, skip);
            Ok(())
        }
        Err(e) if crate::error::is_out_of_memory(&e.to_string()) => {
            tracing::warn!(
                layers = window.len(),
                cells = total,
                "out of memory in a staircase of layers: running them one by one"
            );
            for (layer, todo) in &window {
                patch_layer(model, prep, parts, *layer, todo, state, from)?;
            }
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// The by-position schedule's staircases (one per starting position), on as many CPU threads as
/// torch uses, each with one torch thread: their forwards are small (a few positions of a few
/// cells' rows), and two single-threaded GEMMs side by side kept a 2-core CPU busier than one
/// two-threaded GEMM at a time. Each worker takes the position with the most work left
/// (positions computed × cells) when it is free. On a GPU, or with one thread, they run one
/// after another.
fn positions_in_parallel(
    model: &Model,
    prep: &CleanCorrupted,
    parts: &[(Target, Vec<Cell>)],
    mut groups: Vec<PositionGroup>,
    state: &mut Progress,
) -> Result<()> {
    let threads = if model.device == tch::Device::Cpu { tch::get_num_threads().max(1) as usize } else { 1 };
    let workers = threads.min(groups.len());
    if workers <= 1 {
        for (from, steps) in groups {
            staircases(model, prep, parts, steps, from, state)?;
        }
        return Ok(());
    }
    let work = |(from, steps): &PositionGroup| {
        (prep.seq_len() - from) * steps.iter().map(|(_, cells)| cells.len() as i64).sum::<i64>()
    };
    // A queue, the largest work last: each worker takes the largest left when it is free.
    groups.sort_by_key(work);
    let queue = std::sync::Mutex::new(groups);
    // Each worker's share of the batch budget: their forwards are in memory at once.
    let chunk_size = state.chunk_size.div_ceil(workers).max(1);
    let shared = Shared { model, prep, parts };
    let (sender, receiver) = std::sync::mpsc::channel::<usize>();
    let finished = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                let sender = sender.clone();
                let (shared, queue) = (&shared, &queue);
                let seed = state.fork(chunk_size);
                scope.spawn(move || -> Result<Worker> {
                    tch::set_num_threads(1);
                    let mut report = |k: usize| {
                        let _ = sender.send(k);
                    };
                    let mut local = seed.progress(&mut report);
                    let next = || queue.lock().unwrap_or_else(|e| e.into_inner()).pop();
                    while let Some((from, steps)) = next() {
                        if let Err(e) = staircases(shared.model, shared.prep, shared.parts, steps, from, &mut local) {
                            // The others stop after their current position.
                            queue.lock().unwrap_or_else(|e| e.into_inner()).clear();
                            return Err(e);
                        }
                    }
                    Ok(local.into_worker())
                })
            })
            .collect();
        drop(sender);
        // Progress reaches the caller's callback on this thread, as the workers finish cells.
        for k in receiver {
            (state.report)(k);
        }
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|e| Err(Error::Other(crate::panics::take_message(&*e)))))
            .collect::<Vec<_>>()
    });
    tch::set_num_threads(threads as i32);
    for worker in finished {
        state.join(worker?);
    }
    Ok(())
}

/// What the workers read: the model's weights and the clean and corrupted caches, never written
/// while a sweep runs.
struct Shared<'a> {
    model: &'a Model,
    prep: &'a CleanCorrupted,
    parts: &'a [(Target, Vec<Cell>)],
}

// SAFETY: tch's Tensor is Send but not Sync, as any tensor may be written in place. The workers
// only read these tensors (every op they run on them makes new tensors), and libtorch's ops are
// safe to run on one tensor from several threads when none writes it; nothing here has interior
// mutability but `CleanCorrupted::pending_backward`, a Mutex the sweeps do not touch.
unsafe impl Sync for Shared<'_> {}

/// A worker's state without its report: its results, joined into the sweep's at the end.
struct Worker {
    values: Vec<Vec<Option<Vec<f64>>>>,
    forwards: Vec<usize>,
    computed: Vec<u64>,
    starts: Vec<Vec<usize>>,
    seq: i64,
    n_layers: usize,
    chunk_size: usize,
    halvings: usize,
}

impl Worker {
    fn progress(self, report: &mut dyn FnMut(usize)) -> Progress<'_> {
        Progress {
            values: self.values,
            forwards: self.forwards,
            computed: self.computed,
            starts: self.starts,
            seq: self.seq,
            n_layers: self.n_layers,
            chunk_size: self.chunk_size,
            halvings: self.halvings,
            report,
        }
    }
}

impl Progress<'_> {
    /// A worker's own state: no values yet, the sweep's sizes and a batch budget of `chunk_size`
    /// cells.
    fn fork(&self, chunk_size: usize) -> Worker {
        Worker {
            values: self.values.iter().map(|cells| vec![None; cells.len()]).collect(),
            forwards: vec![0; self.forwards.len()],
            computed: vec![0; self.computed.len()],
            starts: self.starts.clone(),
            seq: self.seq,
            n_layers: self.n_layers,
            chunk_size,
            halvings: 0,
        }
    }

    fn into_worker(self) -> Worker {
        Worker {
            values: self.values,
            forwards: self.forwards,
            computed: self.computed,
            starts: self.starts,
            seq: self.seq,
            n_layers: self.n_layers,
            chunk_size: self.chunk_size,
            halvings: self.halvings,
        }
    }

    fn join(&mut self, w: Worker) {
        for (mine, theirs) in self.values.iter_mut().zip(w.values) {
            for (v, t) in mine.iter_mut().zip(theirs) {
                if t.is_some() {
                    *v = t;
                }
            }
        }
        for (p, f) in w.forwards.into_iter().enumerate() {
            self.forwards[p] += f;
        }
        for (p, c) in w.computed.into_iter().enumerate() {
            self.computed[p] += c;
        }
        self.halvings += w.halvings;
        self.chunk_size = self.chunk_size.min(w.chunk_size);
    }
    /// Stores one forward's per-row values (n per cell of `cells`, in order; positions from
    /// `skip` computed): one forward for each part with cells in it.
    fn record(&mut self, cells: &[(usize, usize)], v: &[f64], n: i64, skip: i64) {
        for &(p, i) in cells {
            self.computed[p] += (n * (self.seq - skip)) as u64 * (self.n_layers - self.starts[p][i]) as u64;
        }
        let parts: std::collections::BTreeSet<usize> = cells.iter().map(|&(p, _)| p).collect();
        for p in parts {
            self.forwards[p] += 1;
        }
        for (j, &(p, i)) in cells.iter().enumerate() {
            self.values[p][i] = Some(v[j * n as usize..(j + 1) * n as usize].to_vec());
        }
        (self.report)(cells.len());
    }
}

/// Repeat counts that stack `k` copies along the first axis of a `dim`-axis tensor.
pub(crate) fn repeat_dims(k: i64, dim: usize) -> Vec<i64> {
    let mut r = vec![1i64; dim];
    r[0] = k;
    r
}

/// Several cells of one target patched together (multi-site patching: a set of heads, or of
/// positions at several layers, restored at once) in one forward from the earliest layer; the
/// metric per row (prompt, noise sample).
pub fn patch_jointly(model: &Model, prep: &CleanCorrupted, target: Target, cells: &[Cell]) -> Result<Vec<f64>> {
    let n_layers = model.cfg.n_layers;
    let first = cells
        .iter()
        .map(|c| target.window_layers(c.layer, n_layers).start)
        .min()
        .ok_or_else(|| Error::Config("no units to patch".into()))?;
    let last = cells.iter().map(|c| target.window_layers(c.layer, n_layers).end - 1).max().unwrap_or(first);
    let (skip, _) = computed_from(prep, 0);
    // Every unit in the batch's one block.
    let parts = [(target, cells.to_vec())];
    let all: Vec<(i64, (usize, usize))> = (0..cells.len()).map(|i| (0, (0, i))).collect();
    let mut hooks = Hooks::new();
    add_patches(&mut hooks, model, prep, &parts, &all, Rows { blocks: 1, skip }, None)?;
    let resid = corrupted_rows(prep, first, 1, skip);
    let prefix = prep.kv_before(skip).map(|p| p.repeat_from(1, first));
    let stop = last_block_stop(model, prep, last);
    let out = crate::panics::guarded("a forward with units patched together", || {
        model.run_with_prefix(
            Input::Residual { layer: first, resid: &resid },
            prep.mask.as_ref(),
            &mut hooks,
            stop,
            prefix.as_ref(),
        )
    })?;
    Ok(Vec::try_from(prep.metric.per_row(model, &out).to_kind(Kind::Double))?)
}
