//! What a forward pass does at its hook points: interventions first (in the order given), then
//! capture. With nothing planned at a point, `at` returns its input untouched at the cost of one
//! map lookup, so an unhooked forward pays nothing.
use std::collections::{HashMap, HashSet};

use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::model::hook_point::HookPoint;

/// A selection along one axis: everything, one index, or a list. "All" is a value, not a magic number.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Sel {
    #[default]
    All,
    One(i64),
    List(Vec<i64>),
}

impl Sel {
    fn index(&self, size: i64, device: tch::Device) -> Result<Option<Tensor>> {
        let check = |i: i64| {
            if i < 0 || i >= size {
                Err(format!("index {i} out of range 0..{size}"))
            } else {
                Ok(i)
            }
        };
        Ok(match self {
            Sel::All => None,
            Sel::One(i) => Some(Tensor::from_slice(&[check(*i).map_err(Error::Other)?]).to_device(device)),
            Sel::List(v) => {
                let v: Vec<i64> = v.iter().map(|&i| check(i)).collect::<Result<_, _>>().map_err(Error::Other)?;
                Some(Tensor::from_slice(&v).to_device(device))
            }
        })
    }
}

/// A hook function: the selected slice in, its replacement (same shape) out.
pub type SliceFn = Box<dyn Fn(&Tensor) -> Result<Tensor> + Send>;

/// What to do to the selected slice.
pub enum Edit {
    /// Replace it with these values (shape of the slice, or broadcastable to it).
    Replace(Tensor),
    Add(Tensor),
    Scale(f64),
    Zero,
    /// Any function of the slice; its result must have the slice's shape.
    Func(SliceFn),
    /// Take `source` where `mask` is true (both broadcastable to the slice): many different
    /// patches in one batched forward, one per batch row.
    Where {
        mask: Tensor,
        source: Tensor,
    },
}

impl std::fmt::Debug for Edit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Edit::Replace(t) => write!(f, "Replace({:?})", t.size()),
            Edit::Add(t) => write!(f, "Add({:?})", t.size()),
            Edit::Scale(s) => write!(f, "Scale({s})"),
            Edit::Zero => f.write_str("Zero"),
            Edit::Func(_) => f.write_str("Func(..)"),
            Edit::Where { mask, source } => write!(f, "Where(mask {:?}, source {:?})", mask.size(), source.size()),
        }
    }
}

/// One edit of one hook point's activation, restricted to a slice. Axes are named, so the same
/// intervention works on [batch, pos, head, ..] tensors and on [batch, head, query, key] maps:
/// `pos` is the query position for attention maps and `key_pos` their key position.
#[derive(Debug)]
pub struct Intervention {
    pub batch: Sel,
    pub pos: Sel,
    pub head: Sel,
    pub key_pos: Sel,
    pub edit: Edit,
}

impl Intervention {
    pub fn new(edit: Edit) -> Self {
        Intervention { batch: Sel::All, pos: Sel::All, head: Sel::All, key_pos: Sel::All, edit }
    }
    pub fn batch(mut self, s: Sel) -> Self {
        self.batch = s;
        self
    }
    pub fn pos(mut self, s: Sel) -> Self {
        self.pos = s;
        self
    }
    pub fn head(mut self, s: Sel) -> Self {
        self.head = s;
        self
    }
    pub fn key_pos(mut self, s: Sel) -> Self {
        self.key_pos = s;
        self
    }

    /// Applies the edit to `x`, the activation at `point`. Returns a new tensor (autograd-safe).
    fn apply(&self, point: HookPoint, x: &Tensor) -> Result<Tensor> {
        let err = |reason: String| Error::Intervention { hook: point.to_string(), reason };
        let site = point.site();
        let dims = x.dim();
        // Axis of each selection in this hook's layout; None = the hook has no such axis.
        let (pos_ax, head_ax, key_ax) = match site {
            Some(s) if s.is_attention_map() => (Some(2), Some(1), Some(3)),
            Some(s) if s.has_heads() => (Some(1), Some(2), None),
            _ => (Some(1), None, None),
        };
        let mut axes: Vec<(usize, &Sel)> = vec![(0, &self.batch)];
        for (ax, sel, what) in
            [(pos_ax, &self.pos, "position"), (head_ax, &self.head, "head"), (key_ax, &self.key_pos, "key position")]
        {
            match ax {
                Some(a) if a < dims => axes.push((a, sel)),
                _ if *sel != Sel::All => return Err(err(format!("this hook has no {what} axis"))),
                _ => {}
            }
        }
        axes.sort_by_key(|(a, _)| *a);
        let size = x.size();
        // Advanced indices, one per selected axis, shaped to broadcast as an outer product.
        let mut picked: Vec<(usize, Tensor)> = Vec::new();
        for (ax, sel) in &axes {
            if let Some(ix) = sel.index(size[*ax], x.device()).map_err(|e| err(e.to_string()))? {
                picked.push((*ax, ix));
            }
        }
        if picked.is_empty() {
            return self.transform(x).map_err(|e| err(e.to_string()));
        }
        // Index with full aranges for unselected axes up to the last selected one, so the slice
        // keeps every axis in order: [n_batch, n_pos, n_head, ...rest].
        let last = picked.iter().map(|(a, _)| *a).max().unwrap_or(0);
        let n = last + 1;
        let mut indices: Vec<Option<Tensor>> = Vec::with_capacity(n);
        for ax in 0..n {
            let ix = picked
                .iter()
                .find(|(a, _)| *a == ax)
                .map(|(_, t)| t.shallow_clone())
                .unwrap_or_else(|| Tensor::arange(size[ax], (Kind::Int64, x.device())));
            let mut shape = vec![1i64; n];
            shape[ax] = -1;
            indices.push(Some(ix.view(shape.as_slice())));
        }
        let slice = x.f_index(&indices).map_err(|e| err(e.to_string()))?;
        let new = self.transform(&slice).map_err(|e| err(e.to_string()))?;
        let new = new
            .f_expand_as(&slice)
            .map_err(|_| err(format!("values of shape {:?} do not fit the slice {:?}", new.size(), slice.size())))?;
        Ok(x.f_index_put(&indices, &new.to_kind(x.kind()), false)?)
    }

    fn transform(&self, slice: &Tensor) -> Result<Tensor> {
        Ok(match &self.edit {
            Edit::Replace(v) => v.to_device(slice.device()).to_kind(slice.kind()).f_expand_as(slice).map_err(|_| {
                Error::Other(format!("values of shape {:?} do not fit the slice {:?}", v.size(), slice.size()))
            })?,
            Edit::Add(v) => slice.f_add(&v.to_device(slice.device()))?,
            Edit::Scale(s) => slice * *s,
            Edit::Zero => slice.zeros_like(),
            Edit::Where { mask, source } => {
                source.to_device(slice.device()).f_where_self(&mask.to_device(slice.device()), slice)?
            }
            Edit::Func(f) => {
                let out = f(slice)?;
                if out.size() != slice.size() {
                    return Err(Error::Other(format!(
                        "function returned shape {:?} for a slice of {:?}",
                        out.size(),
                        slice.size()
                    )));
                }
                out
            }
        })
    }
}

#[derive(Debug, Default, Clone)]
pub enum Capture {
    #[default]
    Nothing,
    All,
    Only(HashSet<HookPoint>),
}

/// The interventions and captures of one forward pass, and what it captured.
#[derive(Debug, Default)]
pub struct Hooks {
    interventions: HashMap<HookPoint, Vec<Intervention>>,
    capture: Capture,
    /// Keep the autograd graph and make every captured activation differentiable.
    grad: bool,
    pub cache: HashMap<HookPoint, Tensor>,
}

impl Hooks {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn capture_all() -> Self {
        Hooks { capture: Capture::All, ..Self::default() }
    }

    pub fn capture(points: impl IntoIterator<Item = HookPoint>) -> Self {
        Hooks { capture: Capture::Only(points.into_iter().collect()), ..Self::default() }
    }

    /// Gradients of anything computed from the output, with respect to every captured
    /// activation, become available through `Tensor::run_backward`.
    pub fn with_grad(mut self) -> Self {
        self.grad = true;
        self
    }

    pub fn grad(&self) -> bool {
        self.grad
    }

    /// Also capture `points` (keeping the interventions already planned).
    pub fn add_captures(&mut self, points: impl IntoIterator<Item = HookPoint>) {
        match &mut self.capture {
            Capture::All => {}
            Capture::Only(s) => s.extend(points),
            Capture::Nothing => self.capture = Capture::Only(points.into_iter().collect()),
        }
    }

    pub fn intervene(mut self, point: HookPoint, i: Intervention) -> Self {
        self.add_intervention(point, i);
        self
    }

    pub fn add_intervention(&mut self, point: HookPoint, i: Intervention) {
        self.interventions.entry(point).or_default().push(i);
    }

    /// Whether the forward should compute an optional activation (hook_result) at all.
    pub fn wants(&self, point: HookPoint) -> bool {
        self.edits(point) || self.captures(point)
    }

    /// Whether the forward should take a path TransformerLens takes only when asked (the split
    /// q/k/v inputs, hook_mlp_in): `point` is edited or captured by name, not by capturing
    /// everything (TransformerLens's run_with_cache has none of these without its flags).
    pub fn requests(&self, point: HookPoint) -> bool {
        self.edits(point) || matches!(&self.capture, Capture::Only(s) if s.contains(&point))
    }

    /// Whether this forward captures anything at all.
    pub fn captures_any(&self) -> bool {
        match &self.capture {
            Capture::Nothing => false,
            Capture::All => true,
            Capture::Only(s) => !s.is_empty(),
        }
    }

    /// Whether an intervention changes `point` (so derived values must be recomputed from it).
    pub fn edits(&self, point: HookPoint) -> bool {
        self.interventions.contains_key(&point)
    }

    /// Whether any point `pick` selects is edited or captured (capturing everything counts).
    pub fn any_at(&self, pick: impl Fn(HookPoint) -> bool) -> bool {
        let captured = match &self.capture {
            Capture::Nothing => false,
            Capture::All => true,
            Capture::Only(s) => s.iter().any(|p| pick(*p)),
        };
        captured || self.interventions.keys().any(|p| pick(*p))
    }

    fn captures(&self, point: HookPoint) -> bool {
        match &self.capture {
            Capture::Nothing => false,
            Capture::All => true,
            Capture::Only(s) => s.contains(&point),
        }
    }

    /// Called by the forward at every hook point.
    pub fn at(&mut self, point: HookPoint, x: Tensor) -> Result<Tensor> {
        let x = match self.interventions.get(&point) {
            None => x,
            Some(list) => {
                let mut x = x;
                for i in list {
                    x = i.apply(point, &x)?;
                }
                x
            }
        };
        if self.captures(point) {
            // Weights carry no gradient, so the first captured activation is a leaf: mark it.
            // Later ones are computed from it and are in the graph already.
            let x = if self.grad && !x.requires_grad() { x.detach().set_requires_grad(true) } else { x };
            self.cache.insert(point, x.shallow_clone());
            return Ok(x);
        }
        Ok(x)
    }

    pub fn take(&mut self, point: HookPoint) -> Option<Tensor> {
        self.cache.remove(&point)
    }
}
