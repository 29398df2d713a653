//! A checkpoint's tensors by name, read from safetensors files only. Family converters `take`
//! tensors out; a missing name fails at load time with the name and the nearest names present.
//! Every tensor but the derived buffers is read when the files are opened, on all cores and in
//! its stored dtype, straight into its own storage; converters then mostly make views of it, and
//! weight processing upcasts one block at a time, so loading holds the file's bytes once.
use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;

use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::model::hook_point::nearest;
use crate::model::mapped::MappedFile;

/// Where a tensor's bytes are: already in memory, a byte range of a safetensors file, or the
/// address of that range in a file mapped by `StateDict::check_mapped`.
enum Entry {
    Loaded(Tensor),
    OnDisk { file: PathBuf, start: u64, len: usize, shape: Vec<i64>, kind: Kind },
    Mapped { address: usize, len: usize, shape: Vec<i64>, kind: Kind },
}

pub struct StateDict {
    tensors: BTreeMap<String, Entry>,
    /// Every name taken so far, shared with the loader, so that what a converter left behind can
    /// be reported after it has consumed the StateDict.
    taken: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// Prefix tried before every name (e.g. "transformer." when the checkpoint has it).
    prefix: String,
    origin: String,
}

fn kind_of(dtype: &str) -> Option<(Kind, usize)> {
    Some(match dtype {
        "F32" => (Kind::Float, 4),
        "F16" => (Kind::Half, 2),
        "BF16" => (Kind::BFloat16, 2),
        "F64" => (Kind::Double, 8),
        "I64" => (Kind::Int64, 8),
        "I32" => (Kind::Int, 4),
        "I16" => (Kind::Int16, 2),
        "I8" => (Kind::Int8, 1),
        "U8" => (Kind::Uint8, 1),
        "BOOL" => (Kind::Bool, 1),
        _ => return None,
    })
}

/// The tensor table of one safetensors file (its JSON header), checked against the file size.
fn index(file: &PathBuf, out: &mut BTreeMap<String, Entry>) -> Result<()> {
    let bad = |reason: String| Error::Load { id: file.display().to_string(), reason };
    let mut f = std::fs::File::open(file).map_err(|e| Error::io(file, e))?;
    let size = f.metadata().map_err(|e| Error::io(file, e))?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|_| bad("not a safetensors file: shorter than its 8-byte header length".into()))?;
    let header_len = u64::from_le_bytes(n);
    if header_len > size.saturating_sub(8) || header_len > 100_000_000 {
        return Err(bad(format!("safetensors header length {header_len} runs past the end of the {size}-byte file")));
    }
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header).map_err(|e| bad(format!("reading the safetensors header: {e}")))?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| bad(format!("the safetensors header is not valid JSON: {e}")))?;
    let data_start = 8 + header_len;
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        let dtype = info.get("dtype").and_then(|d| d.as_str()).unwrap_or("");
        let (kind, width) = kind_of(dtype)
            .ok_or_else(|| bad(format!("tensor '{name}' has dtype '{dtype}', which tl-run cannot read")))?;
        let shape: Vec<i64> = info
            .get("shape")
            .and_then(|s| s.as_array())
            .map(|a| a.iter().filter_map(|d| d.as_i64()).collect())
            .unwrap_or_default();
        let offsets: Vec<u64> = info
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .map(|a| a.iter().filter_map(|d| d.as_u64()).collect())
            .unwrap_or_default();
        let [begin, end] = offsets[..] else { return Err(bad(format!("tensor '{name}' has no data_offsets"))) };
        let numel: i64 = shape.iter().product();
        if end < begin || (end - begin) as i64 != numel * width as i64 || data_start + end > size {
            return Err(bad(format!(
                "tensor '{name}' ({dtype} {shape:?}) does not fit its byte range {begin}..{end} of the file"
            )));
        }
        out.insert(
            name,
            Entry::OnDisk { file: file.clone(), start: data_start + begin, len: (end - begin) as usize, shape, kind },
        );
    }
    Ok(())
}

/// Reads every tensor a converter will take, on all cores: reading from the page cache is bound
/// by page faults on the fresh memory, which the kernel serves per core. Tensors are read in
/// their stored dtype (what the file holds, no more), and derived buffers stay unread.
fn read_all(tensors: BTreeMap<String, Entry>) -> Result<BTreeMap<String, Entry>> {
    use rayon::prelude::*;
    let mut entries: Vec<(String, Entry)> = tensors.into_iter().collect();
    // Largest first, so the cores finish together.
    entries.sort_by_key(|(_, e)| std::cmp::Reverse(if let Entry::OnDisk { len, .. } = e { *len } else { 0 }));
    entries
        .into_par_iter()
        .map(
            |(name, e)| {
                if is_derived_buffer(&name) {
                    Ok((name, e))
                } else {
                    e.load().map(|t| (name, Entry::Loaded(t)))
                }
            },
        )
        .collect()
}

impl Entry {
    fn load(self) -> Result<Tensor> {
        match self {
            Entry::Loaded(t) => Ok(t),
            Entry::OnDisk { file, start, len, shape, kind } => {
                use std::os::unix::fs::FileExt;
                let f = std::fs::File::open(&file).map_err(|e| Error::io(&file, e))?;
                // Read straight into the tensor's own storage: one copy from the page cache, no
                // intermediate buffer.
                let t = Tensor::f_empty(&shape, (kind, tch::Device::Cpu))
                    .map_err(|e| Error::Load { id: file.display().to_string(), reason: e.to_string() })?;
                if len > 0 {
                    // SAFETY: `t` is a fresh contiguous CPU tensor of exactly `len` bytes (numel ×
                    // element width was checked against the byte range when indexing), owned here.
                    let bytes = unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut u8, len) };
                    f.read_exact_at(bytes, start).map_err(|e| Error::io(&file, e))?;
                }
                Ok(t)
            }
            Entry::Mapped { address, len, shape, kind } => {
                let width = kind.elt_size_in_bytes();
                let strides: Vec<i64> = (0..shape.len()).map(|i| shape[i + 1..].iter().product()).collect();
                let failed = |e: tch::TchError| Error::Load { id: "a mapped checkpoint".into(), reason: e.to_string() };
                if address % width == 0 {
                    // SAFETY: the range lies inside a private mapping (checked against the file
                    // size when indexing) that `check_mapped` keeps until every tensor taken from
                    // it is gone; aligned for the element type.
                    unsafe { Tensor::f_from_blob(address as *const u8, &shape, &strides, kind, tch::Device::Cpu) }
                        .map_err(failed)
                } else {
                    // A tensor the file does not align for its type gets aligned storage of its own.
                    let t = Tensor::f_empty(&shape, (kind, tch::Device::Cpu)).map_err(failed)?;
                    // SAFETY: as above for the source; `t` is fresh, contiguous and `len` bytes.
                    unsafe { std::ptr::copy_nonoverlapping(address as *const u8, t.data_ptr() as *mut u8, len) };
                    Ok(t)
                }
            }
        }
    }
}

impl StateDict {
    /// Indexes every shard; tensors are read (in their stored dtype) when taken. Weight
    /// processing upcasts them to f32 one block at a time (as TransformerLens processes in f32),
    /// so a bf16 checkpoint is never held whole in f32.
    pub fn read(files: &[PathBuf]) -> Result<Self> {
        let mut tensors = BTreeMap::new();
        for f in files {
            index(f, &mut tensors)?;
        }
        let origin = files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ");
        Ok(StateDict { tensors: read_all(tensors)?, taken: Default::default(), prefix: String::new(), origin })
    }

    /// Runs `check` on the checkpoint with every tensor a view of the files mapped into memory:
    /// converting and checking shapes reads no weight values, so this costs what the files'
    /// headers do, whatever their size. Every tensor taken must be dropped inside `check` (the
    /// mappings end when it returns), so it returns no tensors.
    pub(crate) fn check_mapped<T>(files: &[PathBuf], check: impl FnOnce(StateDict) -> Result<T>) -> Result<T> {
        let mut tensors = BTreeMap::new();
        for f in files {
            index(f, &mut tensors)?;
        }
        let maps = files.iter().map(|f| MappedFile::open(f)).collect::<Result<Vec<_>>>()?;
        let base: BTreeMap<&PathBuf, usize> = files.iter().zip(&maps).map(|(f, m)| (f, m.address())).collect();
        let tensors = tensors
            .into_iter()
            .map(|(name, e)| match e {
                Entry::OnDisk { file, start, len, shape, kind } => {
                    (name, Entry::Mapped { address: base[&file] + start as usize, len, shape, kind })
                }
                e => (name, e),
            })
            .collect();
        let origin = files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ");
        let checked = check(StateDict { tensors, taken: Default::default(), prefix: String::new(), origin });
        drop(maps);
        checked
    }

    pub fn from_tensors(tensors: impl IntoIterator<Item = (String, Tensor)>) -> Self {
        StateDict {
            tensors: tensors.into_iter().map(|(n, t)| (n, Entry::Loaded(t))).collect(),
            taken: Default::default(),
            prefix: String::new(),
            origin: "tensors".into(),
        }
    }

    /// Uses `prefix` for every later lookup when the checkpoint's names carry it (HF models are
    /// saved both with and without the base-model prefix).
    pub fn with_optional_prefix(mut self, prefix: &str, probe: &str) -> Self {
        if self.tensors.contains_key(&format!("{prefix}{probe}")) {
            self.prefix = prefix.to_string();
        }
        self
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(&format!("{}{name}", self.prefix)) || self.tensors.contains_key(name)
    }

    fn remove(&mut self, name: &str) -> Option<Entry> {
        let prefixed = format!("{}{name}", self.prefix);
        let key = if self.tensors.contains_key(&prefixed) { prefixed } else { name.to_string() };
        let e = self.tensors.remove(&key)?;
        if let Ok(mut t) = self.taken.lock() {
            t.push(key);
        }
        Some(e)
    }

    /// Every tensor name, and a handle on the names taken from now on.
    pub fn names_and_taken(&self) -> (Vec<String>, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
        (self.tensors.keys().cloned().collect(), self.taken.clone())
    }

    /// Removes and returns tensor `name` (looked up with the prefix first, then as given).
    pub fn take(&mut self, name: &str) -> Result<Tensor> {
        if let Some(e) = self.remove(name) {
            return self.floating(name, e.load()?);
        }
        let prefixed = format!("{}{name}", self.prefix);
        let near = nearest(&prefixed, self.tensors.keys().map(|k| k.as_str()));
        Err(Error::Load {
            id: self.origin.clone(),
            reason: format!(
                "tensor '{prefixed}' is missing{}",
                if near.is_empty() { String::new() } else { format!(" (nearest: {})", near.join(", ")) }
            ),
        })
    }

    /// Like `take`, and checks the shape, so that a checkpoint disagreeing with config.json is
    /// named here instead of failing inside a reshape.
    pub fn take_shaped(&mut self, name: &str, shape: &[i64]) -> Result<Tensor> {
        let t = self.take(name)?;
        if t.size() != shape {
            return Err(Error::Load {
                id: self.origin.clone(),
                reason: format!(
                    "tensor '{}{name}' has shape {:?}, but config.json implies {shape:?}",
                    self.prefix,
                    t.size()
                ),
            });
        }
        Ok(t)
    }

    /// Like `take`, but the tensor may be absent (biases of bias-free models).
    pub fn take_opt(&mut self, name: &str) -> Result<Option<Tensor>> {
        match self.remove(name) {
            None => Ok(None),
            Some(e) => Ok(Some(self.floating(name, e.load()?)?)),
        }
    }

    /// Weights are floating point: an integer or boolean tensor under a weight's name means
    /// the checkpoint is not what config.json says.
    fn floating(&self, name: &str, t: Tensor) -> Result<Tensor> {
        if matches!(t.kind(), Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double) {
            Ok(t)
        } else {
            Err(Error::Load {
                id: self.origin.clone(),
                reason: format!(
                    "tensor '{}{name}' is {:?}; a weight must be F32, F16, BF16 or F64",
                    self.prefix,
                    t.kind()
                ),
            })
        }
    }
}

/// Buffers some checkpoints save beside the weights (causal masks, rotary inverse frequencies,
/// position ids): derived from the config, so not read, and not an error when left over.
pub fn is_derived_buffer(name: &str) -> bool {
    [
        ".attn.bias",
        ".attn.masked_bias",
        ".attention.bias",
        ".attention.masked_bias",
        "rotary_emb.inv_freq",
        "position_ids",
    ]
    .iter()
    .any(|s| name.ends_with(s))
}

/// The names a converter left behind that are not derived buffers.
pub fn unused(all: &[String], taken: &std::sync::Mutex<Vec<String>>) -> Vec<String> {
    let taken: std::collections::BTreeSet<String> =
        taken.lock().map(|t| t.iter().cloned().collect()).unwrap_or_default();
    all.iter().filter(|n| !taken.contains(*n) && !is_derived_buffer(n)).cloned().collect()
}
