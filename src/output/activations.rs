//! Activations to safetensors, keyed by full TransformerLens hook names (batch axis kept), with
//! the prompts, token ids and padding in the file's metadata, so `safetensors.torch.load_file`
//! gives exactly {hook name: tensor}.
use std::collections::HashMap;
use std::path::Path;

use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::output::atomic;

pub fn write(path: &Path, tensors: &[(String, Tensor)], metadata: HashMap<String, String>) -> Result<()> {
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.detach().to_device(tch::Device::Cpu).to_kind(Kind::Float).contiguous();
        let shape: Vec<usize> = t.size().iter().map(|&s| s as usize).collect();
        let values: Vec<f32> = Vec::<f32>::try_from(t.flatten(0, -1)).map_err(Error::Torch)?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        owned.push((name.clone(), shape, bytes));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = owned
        .iter()
        .map(|(n, shape, bytes)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::Other(format!("safetensors view of {n}: {e}")))
        })
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(views, &Some(metadata)).map_err(|e| Error::Other(format!("safetensors: {e}")))?;
    atomic::write_bytes(path, &bytes)
}
