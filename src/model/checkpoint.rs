//! A checkpoint's tensors by name, read from safetensors files only. Family converters `take`
//! tensors out; a missing name fails at load time with the name and the nearest names present.
use std::collections::BTreeMap;
use std::path::PathBuf;

use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::model::hook_point::nearest;

pub struct StateDict {
    tensors: BTreeMap<String, Tensor>,
    /// Prefix tried before every name (e.g. "transformer." when the checkpoint has it).
    prefix: String,
    origin: String,
}

impl StateDict {
    /// Reads every shard in its stored dtype; each tensor becomes f32 only when a converter
    /// takes it (weight processing runs in f32 as TransformerLens does), so a bf16 checkpoint is
    /// never held as a whole in f32 next to its stored copy.
    pub fn read(files: &[PathBuf]) -> Result<Self> {
        let mut tensors = BTreeMap::new();
        for f in files {
            let read = Tensor::read_safetensors(f).map_err(|e| Error::Load {
                id: f.display().to_string(),
                reason: format!("reading safetensors: {e}"),
            })?;
            tensors.extend(read);
        }
        let origin = files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ");
        Ok(StateDict { tensors, prefix: String::new(), origin })
    }

    pub fn from_tensors(tensors: impl IntoIterator<Item = (String, Tensor)>) -> Self {
        StateDict { tensors: tensors.into_iter().collect(), prefix: String::new(), origin: "tensors".into() }
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

    /// Removes and returns tensor `name` (looked up with the prefix first, then as given).
    pub fn take(&mut self, name: &str) -> Result<Tensor> {
        let prefixed = format!("{}{name}", self.prefix);
        if let Some(t) = self.tensors.remove(&prefixed).or_else(|| self.tensors.remove(name)) {
            return Ok(t.to_kind(Kind::Float));
        }
        let near = nearest(&prefixed, self.tensors.keys().map(|k| k.as_str()));
        Err(Error::Load {
            id: self.origin.clone(),
            reason: format!("tensor '{prefixed}' is missing{}", if near.is_empty() { String::new() } else { format!(" (nearest: {})", near.join(", ")) }),
        })
    }

    /// Like `take`, and checks the shape, so that a checkpoint disagreeing with config.json is
    /// named here instead of failing inside a reshape.
    pub fn take_shaped(&mut self, name: &str, shape: &[i64]) -> Result<Tensor> {
        let t = self.take(name)?;
        if t.size() != shape {
            return Err(Error::Load {
                id: self.origin.clone(),
                reason: format!("tensor '{}{name}' has shape {:?}, but config.json implies {shape:?}", self.prefix, t.size()),
            });
        }
        Ok(t)
    }

    /// Like `take`, but the tensor may be absent (biases of bias-free models).
    pub fn take_opt(&mut self, name: &str) -> Option<Tensor> {
        let prefixed = format!("{}{name}", self.prefix);
        self.tensors.remove(&prefixed).or_else(|| self.tensors.remove(name)).map(|t| t.to_kind(Kind::Float))
    }

    /// Tensor `name` shared with another use (tied embeddings), without removing it.
    pub fn get(&self, name: &str) -> Option<Tensor> {
        let prefixed = format!("{}{name}", self.prefix);
        self.tensors.get(&prefixed).or_else(|| self.tensors.get(name)).map(|t| t.to_kind(Kind::Float).copy())
    }
}
