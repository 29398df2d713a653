//! What activation patching patches: the targets (a hook site over some axes, as patching.py's
//! index_axis_names) and the cells of a target at a layer, with which cells provably cannot
//! change (they sit before the first position where clean and corrupted differ).
use crate::error::{Error, Result};
use crate::model::hook_point::Site;

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
    /// resid and block outputs at one role of template prompts (each prompt's own position).
    LayerRole,
    /// z/q/k/v at one role: (layer, role, head).
    LayerRoleHead,
}

impl Axes {
    pub fn names(self) -> &'static [&'static str] {
        match self {
            Axes::LayerPos => &["layer", "pos"],
            Axes::LayerPosHead => &["layer", "pos", "head"],
            Axes::LayerHead => &["layer", "head"],
            Axes::LayerHeadDest => &["layer", "head", "dest"],
            Axes::LayerHeadDestSrc => &["layer", "head", "dest", "src"],
            Axes::LayerRole => &["layer", "role"],
            Axes::LayerRoleHead => &["layer", "role", "head"],
        }
    }

    /// Whether a cell is a role of the prompts, at a position of its own in each.
    pub fn by_role(self) -> bool {
        matches!(self, Axes::LayerRole | Axes::LayerRoleHead)
    }
}

/// One patching target: a block site swept over some axes, each cell restoring its layer or
/// (`window` > 1, ROME's causal tracing) that many consecutive layers centred on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Target {
    pub site: Site,
    pub axes: Axes,
    pub window: usize,
}

impl Target {
    /// Which axes each site can be swept over, as in patching.py.
    pub fn new(site: Site, axes: Axes) -> Result<Target> {
        let ok = match site {
            Site::ResidPre | Site::ResidMid | Site::ResidPost | Site::AttnOut | Site::MlpOut => {
                matches!(axes, Axes::LayerPos | Axes::LayerRole)
            }
            Site::Z | Site::Q | Site::K | Site::V => {
                matches!(axes, Axes::LayerPosHead | Axes::LayerHead | Axes::LayerRoleHead)
            }
            Site::Pattern => matches!(axes, Axes::LayerHead | Axes::LayerHeadDest | Axes::LayerHeadDestSrc),
            _ => false,
        };
        if ok {
            Ok(Target { site, axes, window: 1 })
        } else {
            Err(Error::Config(format!("{} cannot be patched over [{}]", site.name(), axes.names().join(", "))))
        }
    }
}

impl Target {
    /// The target with each cell restoring `window` layers (1: its own).
    pub fn with_window(self, window: usize) -> Target {
        Target { window: window.max(1), ..self }
    }

    /// The layers a cell at `layer` patches: ROME's window, range(max(0, layer − ⌊w/2⌋),
    /// min(n_layers, layer + ⌈w/2⌉)).
    pub fn window_layers(&self, layer: usize, n_layers: usize) -> std::ops::Range<usize> {
        let w = self.window.max(1);
        layer.saturating_sub(w / 2)..(layer + w.div_ceil(2)).min(n_layers)
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
    /// A role cell: the role's index; `pos` is then its latest position over the prompts (what
    /// `cannot_change` compares).
    pub role: Option<usize>,
}

impl Cell {
    /// A unit of multi-site patching (`units = [[layer, index], ...]`): a head over every position
    /// (`LayerHead`) or a position (`LayerPos`), at `layer`.
    pub fn unit(layer: usize, axes: Axes, index: i64) -> Cell {
        Cell {
            layer,
            head: (axes == Axes::LayerHead).then_some(index),
            pos: (axes == Axes::LayerPos).then_some(index),
            dest: None,
            src: None,
            role: None,
        }
    }
}

fn heads_at(cfg: &crate::model::config::ModelConfig, site: Site) -> i64 {
    match site {
        Site::K | Site::V => cfg.n_kv_heads as i64, // k, v are patched over key-value heads
        _ => cfg.n_heads as i64,
    }
}

/// Every cell of `target` at one layer, in row-major order of the target's axes.
pub fn cells_at(cfg: &crate::model::config::ModelConfig, target: Target, layer: usize, seq: i64) -> Vec<Cell> {
    cells_with_roles(cfg, target, layer, seq, &[])
}

/// `cells_at`, role targets' cells from `roles`: each role's position in every prompt.
pub fn cells_with_roles(
    cfg: &crate::model::config::ModelConfig,
    target: Target,
    layer: usize,
    seq: i64,
    roles: &[Vec<i64>],
) -> Vec<Cell> {
    let heads = heads_at(cfg, target.site);
    let base = Cell { layer, head: None, pos: None, dest: None, src: None, role: None };
    let role = |r: usize| Cell { role: Some(r), pos: roles[r].iter().copied().max(), ..base };
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
        Axes::LayerRole => out.extend((0..roles.len()).map(role)),
        Axes::LayerRoleHead => {
            for r in 0..roles.len() {
                out.extend((0..heads).map(|h| Cell { head: Some(h), ..role(r) }));
            }
        }
    }
    out
}

/// True when patching `cell` provably changes nothing: every activation at a position before the
/// first clean/corrupted difference is identical (causal attention), and a pattern entry with
/// src > dest is masked to zero in both runs.
pub fn cannot_change(cell: &Cell, first_diff: i64) -> bool {
    let before = |p: Option<i64>| p.is_some_and(|p| p < first_diff);
    before(cell.pos) || before(cell.dest) || matches!((cell.dest, cell.src), (Some(d), Some(s)) if s > d)
}
