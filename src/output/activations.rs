//! Activations to safetensors, keyed by full TransformerLens hook names (batch axis kept), with
//! the prompts, token ids and padding in the file's metadata, so `safetensors.torch.load_file`
//! gives exactly {hook name: tensor}.
use std::collections::{BTreeMap, HashMap};
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
    let bytes =
        safetensors::serialize(views, &Some(metadata)).map_err(|e| Error::Other(format!("safetensors: {e}")))?;
    let (head, data) = sorted_header(&bytes)?;
    atomic::write_with(path, |f| {
        use std::io::Write;
        f.write_all(&head).and_then(|()| f.write_all(&bytes[data..])).map_err(|e| Error::io(path, e))
    })
}

/// The file's length-prefixed JSON header re-encoded with its keys sorted, and where its data
/// starts in `bytes`. The safetensors crate writes the metadata map in HashMap order, which
/// differs from process to process, so the same activations gave files that differed in their
/// first bytes. Offsets in the header are relative to the data, so only the header's length
/// changes; it is padded with spaces to a multiple of 8, as the crate pads it.
fn sorted_header(bytes: &[u8]) -> Result<(Vec<u8>, usize)> {
    let bad = |what: &str| Error::Other(format!("safetensors header: {what}"));
    let n = bytes.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes).ok_or_else(|| bad("too short"))?
        as usize;
    let header = bytes.get(8..8 + n).ok_or_else(|| bad("shorter than its length"))?;
    // BTreeMaps, so the order is sorted whatever serde_json's features: the metadata and the
    // tensor names. Each tensor's entry keeps the crate's own (fixed) order.
    let mut header: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(header).map_err(|e| bad(&e.to_string()))?;
    if let Some(meta) = header.get("__metadata__") {
        let meta: BTreeMap<String, String> = serde_json::from_value(meta.clone()).map_err(|e| bad(&e.to_string()))?;
        header.insert("__metadata__".into(), serde_json::to_value(meta).map_err(|e| bad(&e.to_string()))?);
    }
    let mut text = serde_json::to_vec(&header).map_err(|e| bad(&e.to_string()))?;
    text.resize(text.len().div_ceil(8) * 8, b' ');
    let mut head = (text.len() as u64).to_le_bytes().to_vec();
    head.extend_from_slice(&text);
    Ok((head, 8 + n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_activations_give_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let tensors = vec![
            ("blocks.0.hook_resid_pre".to_string(), Tensor::arange(6, (Kind::Float, tch::Device::Cpu)).view([1, 2, 3])),
            ("hook_embed".to_string(), Tensor::ones([1, 2, 3], (Kind::Float, tch::Device::Cpu))),
        ];
        let metadata = || {
            HashMap::from(
                [
                    ("prompts", "[\"Hi\"]"),
                    ("tokens", "[[1, 2]]"),
                    ("lengths", "[2]"),
                    ("padding_side", "left"),
                    ("model", "m"),
                    ("processing", "{}"),
                ]
                .map(|(k, v)| (k.to_string(), v.to_string())),
            )
        };
        // Each HashMap has its own random order; the files must not.
        let files: Vec<Vec<u8>> = (0..8)
            .map(|i| {
                let p = dir.path().join(format!("{i}.safetensors"));
                write(&p, &tensors, metadata()).unwrap();
                std::fs::read(p).unwrap()
            })
            .collect();
        assert!(files.iter().all(|f| f == &files[0]));
        let st = safetensors::SafeTensors::deserialize(&files[0]).unwrap();
        assert_eq!(st.tensor("blocks.0.hook_resid_pre").unwrap().shape(), &[1, 2, 3]);
        let (_, meta) = safetensors::SafeTensors::read_metadata(&files[0]).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap()["padding_side"], "left");
        assert_eq!(u64::from_le_bytes(files[0][..8].try_into().unwrap()) % 8, 0);
    }
}
