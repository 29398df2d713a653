//! GGUF checkpoints (llama.cpp's format): metadata, tensors dequantized to f32 (F32, F16, BF16,
//! Q8_0, Q4_0, Q4_1), llama.cpp's q/k row permutation undone, and the tokenizer rebuilt from the
//! metadata — so a `.gguf` file is a model id like a directory. Only the Llama architecture is
//! mapped (SmolLM2, Llama, Mistral-style GGUFs); others are a named error.
use std::collections::BTreeMap;
use std::path::Path;

use serde_json::json;
use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::model::checkpoint::StateDict;
use crate::model::mapped::MappedFile;

/// A metadata value.
#[derive(Debug, Clone)]
pub enum Value {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }
    fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Float(f) => Some(*f),
            Value::Int(i) => Some(*i as f64),
            _ => None,
        }
    }
    fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
}

struct TensorInfo {
    name: String,
    /// GGUF order: dims[0] varies fastest (torch shape is the reverse).
    dims: Vec<u64>,
    ggml_type: u32,
    offset: u64,
}

pub struct Gguf {
    pub metadata: BTreeMap<String, Value>,
    tensors: Vec<TensorInfo>,
    data: MappedFile,
    data_start: usize,
    origin: String,
}

/// A little-endian reader over the file's bytes that names what it was reading when it ran out.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    origin: &'a str,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize, what: &str) -> Result<&[u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len()).ok_or_else(|| Error::Load {
            id: self.origin.to_string(),
            reason: format!("GGUF file ends inside {what} (offset {}, {n} bytes wanted)", self.pos),
        })?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().expect("8 bytes")))
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.u64(what)? as usize;
        Ok(String::from_utf8_lossy(self.take(n, what)?).into_owned())
    }
    fn value(&mut self, ty: u32, key: &str) -> Result<Value> {
        Ok(match ty {
            0 => Value::Int(self.take(1, key)?[0] as i64),
            1 => Value::Int(self.take(1, key)?[0] as i8 as i64),
            2 => Value::Int(u16::from_le_bytes(self.take(2, key)?.try_into().expect("2")) as i64),
            3 => Value::Int(i16::from_le_bytes(self.take(2, key)?.try_into().expect("2")) as i64),
            4 => Value::Int(self.u32(key)? as i64),
            5 => Value::Int(self.u32(key)? as i32 as i64),
            6 => Value::Float(f32::from_le_bytes(self.take(4, key)?.try_into().expect("4")) as f64),
            7 => Value::Bool(self.take(1, key)?[0] != 0),
            8 => Value::Str(self.string(key)?),
            9 => {
                let item = self.u32(key)?;
                let n = self.u64(key)? as usize;
                if n > self.bytes.len() {
                    return Err(Error::Load {
                        id: self.origin.to_string(),
                        reason: format!("GGUF metadata '{key}' claims {n} items"),
                    });
                }
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(item, key)?);
                }
                Value::Array(v)
            }
            10 => Value::Int(self.u64(key)? as i64),
            11 => Value::Int(self.u64(key)? as i64),
            12 => Value::Float(f64::from_le_bytes(self.take(8, key)?.try_into().expect("8"))),
            other => {
                return Err(Error::Load {
                    id: self.origin.to_string(),
                    reason: format!("GGUF metadata '{key}' has unknown value type {other}"),
                })
            }
        })
    }
}

/// ggml type ids, with (elements per block, bytes per block).
fn block_layout(ty: u32) -> Option<(&'static str, usize, usize)> {
    Some(match ty {
        0 => ("F32", 1, 4),
        1 => ("F16", 1, 2),
        2 => ("Q4_0", 32, 18),
        3 => ("Q4_1", 32, 20),
        8 => ("Q8_0", 32, 34),
        30 => ("BF16", 1, 2),
        _ => return None,
    })
}

fn f16(b: &[u8]) -> f32 {
    half_to_f32(u16::from_le_bytes([b[0], b[1]]))
}

/// IEEE half to f32 (subnormals included).
fn half_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let frac = (h & 0x3ff) as u32;
    let bits = match (exp, frac) {
        (0, 0) => sign,
        (0, f) => {
            // Subnormal: normalise the fraction.
            let shift = f.leading_zeros() - 21;
            sign | ((127 - 15 + 1 - shift) << 23) | ((f << shift) & 0x3ff) << 13
        }
        (0x1f, f) => sign | 0x7f80_0000 | (f << 13),
        (e, f) => sign | ((e + 127 - 15) << 23) | (f << 13),
    };
    f32::from_bits(bits)
}

/// Dequantizes `bytes` of ggml type `ty` into `out` (as many values as it holds).
fn dequantize_into(ty: u32, bytes: &[u8], out: &mut [f32]) {
    let fill =
        |out: &mut [f32], values: &mut dyn Iterator<Item = f32>| out.iter_mut().zip(values).for_each(|(o, v)| *o = v);
    match ty {
        0 => fill(out, &mut bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
        1 => fill(out, &mut bytes.chunks_exact(2).map(f16)),
        30 => fill(
            out,
            &mut bytes.chunks_exact(2).map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)),
        ),
        8 => {
            for (blk, out) in bytes.chunks_exact(34).zip(out.chunks_exact_mut(32)) {
                let d = f16(&blk[0..2]);
                out.iter_mut().zip(&blk[2..]).for_each(|(o, &q)| *o = q as i8 as f32 * d);
            }
        }
        2 | 3 => {
            // 32 weights per block: the low nibbles are weights 0..16, the high nibbles 16..32.
            let (head, min_of) = if ty == 2 { (2, None) } else { (4, Some(2)) };
            for (blk, out) in bytes.chunks_exact(if ty == 2 { 18 } else { 20 }).zip(out.chunks_exact_mut(32)) {
                let d = f16(&blk[0..2]);
                let (offset, m) = match min_of {
                    Some(at) => (0.0, f16(&blk[at..at + 2])),
                    None => (-8.0, 0.0),
                };
                let qs = &blk[head..head + 16];
                let (low, high) = out.split_at_mut(16);
                for ((l, h), &q) in low.iter_mut().zip(high.iter_mut()).zip(qs) {
                    *l = ((q & 0x0f) as f32 + offset) * d + m;
                    *h = ((q >> 4) as f32 + offset) * d + m;
                }
            }
        }
        _ => unreachable!("checked by block_layout"),
    }
}

impl Gguf {
    pub fn read(path: &Path) -> Result<Gguf> {
        let origin = path.display().to_string();
        // Mapped, not read: metadata and tensor table are a few MB at the front, and the tensors
        // are dequantized straight from the page cache.
        let data = MappedFile::open(path)?;
        let mut c = Cursor { bytes: data.bytes(), pos: 0, origin: &origin };
        if c.take(4, "the magic number")? != b"GGUF" {
            return Err(Error::Load { id: origin.clone(), reason: "not a GGUF file (no GGUF magic number)".into() });
        }
        let version = c.u32("the version")?;
        if !(2..=3).contains(&version) {
            return Err(Error::Load {
                id: origin.clone(),
                reason: format!("GGUF version {version} is not supported (2 or 3)"),
            });
        }
        let n_tensors = c.u64("the tensor count")?;
        let n_kv = c.u64("the metadata count")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string("a metadata key")?;
            let ty = c.u32(&key)?;
            let v = c.value(ty, &key)?;
            metadata.insert(key, v);
        }
        let mut tensors = Vec::new();
        for _ in 0..n_tensors {
            let name = c.string("a tensor name")?;
            let n_dims = c.u32(&name)?;
            if n_dims > 4 {
                return Err(Error::Load {
                    id: origin.clone(),
                    reason: format!("tensor '{name}' has {n_dims} dimensions"),
                });
            }
            let dims = (0..n_dims).map(|_| c.u64(&name)).collect::<Result<Vec<_>>>()?;
            let ggml_type = c.u32(&name)?;
            let offset = c.u64(&name)?;
            tensors.push(TensorInfo { name, dims, ggml_type, offset });
        }
        let align = metadata.get("general.alignment").and_then(Value::as_i64).unwrap_or(32).max(1) as usize;
        let data_start = c.pos.div_ceil(align) * align;
        // Every tensor must fit in the file and be of a type we can read, before any is used.
        for t in &tensors {
            let Some((_, per_block, bytes)) = block_layout(t.ggml_type) else {
                return Err(Error::Load {
                    id: origin.clone(),
                    reason: format!("tensor '{}' has ggml type {}, which tl-run cannot dequantize (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)", t.name, t.ggml_type),
                });
            };
            let n: u64 = t.dims.iter().product();
            let size = (n as usize).div_ceil(per_block) * bytes;
            let start = data_start + t.offset as usize;
            if !(n as usize).is_multiple_of(per_block) || start + size > data.bytes().len() {
                return Err(Error::Load {
                    id: origin.clone(),
                    reason: format!("tensor '{}' runs past the end of the file", t.name),
                });
            }
        }
        Ok(Gguf { metadata, tensors, data, data_start, origin })
    }

    fn meta(&self, key: &str) -> Result<&Value> {
        self.metadata
            .get(key)
            .ok_or_else(|| Error::Load { id: self.origin.clone(), reason: format!("GGUF metadata has no '{key}'") })
    }

    fn meta_i64(&self, key: &str) -> Result<i64> {
        self.meta(key)?.as_i64().ok_or_else(|| Error::Load {
            id: self.origin.clone(),
            reason: format!("GGUF metadata '{key}' is not an integer"),
        })
    }

    pub fn architecture(&self) -> Result<String> {
        Ok(self.meta("general.architecture")?.as_str().unwrap_or("").to_string())
    }

    /// An HF-style config.json for the architecture, so the family parser reads it as any other.
    pub fn config_json(&self) -> Result<serde_json::Value> {
        let arch = self.architecture()?;
        if arch != "llama" {
            return Err(Error::Config(format!("GGUF architecture '{arch}' is not supported (supported: llama)")));
        }
        let k = |s: &str| format!("{arch}.{s}");
        let heads = self.meta_i64(&k("attention.head_count"))?;
        let vocab = match self.metadata.get(&k("vocab_size")).and_then(Value::as_i64) {
            Some(v) => v,
            None => match self.meta("tokenizer.ggml.tokens")? {
                Value::Array(a) => a.len() as i64,
                _ => 0,
            },
        };
        let f = |s: &str, default: f64| self.metadata.get(&k(s)).and_then(Value::as_f64).unwrap_or(default);
        Ok(json!({
            "model_type": "llama",
            "num_hidden_layers": self.meta_i64(&k("block_count"))?,
            "hidden_size": self.meta_i64(&k("embedding_length"))?,
            "intermediate_size": self.meta_i64(&k("feed_forward_length"))?,
            "num_attention_heads": heads,
            "num_key_value_heads": self.metadata.get(&k("attention.head_count_kv")).and_then(Value::as_i64).unwrap_or(heads),
            "vocab_size": vocab,
            "max_position_embeddings": self.meta_i64(&k("context_length"))?,
            "rms_norm_eps": f("attention.layer_norm_rms_epsilon", 1e-5),
            "rope_theta": f("rope.freq_base", 10000.0),
            "hidden_act": "silu",
            "bos_token_id": self.metadata.get("tokenizer.ggml.bos_token_id").and_then(Value::as_i64),
            "eos_token_id": self.metadata.get("tokenizer.ggml.eos_token_id").and_then(Value::as_i64),
            "pad_token_id": self.metadata.get("tokenizer.ggml.padding_token_id").and_then(Value::as_i64),
        }))
    }

    /// One tensor dequantized to f32 straight into its storage, in torch's shape (GGUF dims
    /// reversed).
    fn tensor(&self, t: &TensorInfo) -> Result<Tensor> {
        let (_, per_block, bytes) = block_layout(t.ggml_type).expect("checked on read");
        let n: usize = t.dims.iter().product::<u64>() as usize;
        let start = self.data_start + t.offset as usize;
        let raw = &self.data.bytes()[start..start + n / per_block * bytes];
        let shape: Vec<i64> = t.dims.iter().rev().map(|&d| d as i64).collect();
        let w = Tensor::f_empty(shape.as_slice(), (Kind::Float, tch::Device::Cpu))
            .map_err(|e| Error::Load { id: self.origin.clone(), reason: e.to_string() })?;
        if n > 0 {
            // SAFETY: `w` is a fresh contiguous f32 tensor of exactly n elements, owned here.
            let out = unsafe { std::slice::from_raw_parts_mut(w.data_ptr() as *mut f32, n) };
            dequantize_into(t.ggml_type, raw, out);
        }
        Ok(w)
    }

    /// Every tensor under its HF Llama name, in f32, with q/k rows in HF's order again;
    /// dequantized on all cores.
    pub fn state_dict(&self) -> Result<StateDict> {
        self.named_tensors(true)
    }

    /// The same names and shapes without the values, for checking the checkpoint against its
    /// config (`Model::inspect`, `tl-run hooks`) without dequantizing it: each tensor is
    /// uninitialised storage that nothing reads, which the allocator maps without touching.
    pub fn state_dict_shapes(&self) -> Result<StateDict> {
        self.named_tensors(false)
    }

    fn named_tensors(&self, values: bool) -> Result<StateDict> {
        use rayon::prelude::*;
        let cfg = self.config_json()?;
        let heads = cfg["num_attention_heads"].as_i64().unwrap_or(1);
        let kv_heads = cfg["num_key_value_heads"].as_i64().unwrap_or(heads);
        let out = self
            .tensors
            .par_iter()
            .map(|t| {
                let name = hf_name(&t.name).ok_or_else(|| Error::Load {
                    id: self.origin.clone(),
                    reason: format!("GGUF tensor '{}' has no Llama counterpart", t.name),
                })?;
                let permuted_over = if t.name.ends_with("attn_q.weight") {
                    Some(heads)
                } else if t.name.ends_with("attn_k.weight") {
                    Some(kv_heads)
                } else {
                    None
                };
                let w = if values { self.tensor(t)? } else { self.shaped(t)? };
                let w = match permuted_over {
                    Some(h) if values => unpermute(&w, h)?,
                    // Undoing the permutation keeps the shape; whether it can be undone is checked.
                    Some(h) => {
                        permuted_rows(&w, h)?;
                        w
                    }
                    None => w,
                };
                Ok((name, w))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(StateDict::from_tensors(out))
    }

    /// A tensor of `t`'s torch shape whose storage is allocated but never written or read.
    fn shaped(&self, t: &TensorInfo) -> Result<Tensor> {
        let shape: Vec<i64> = t.dims.iter().rev().map(|&d| d as i64).collect();
        Tensor::f_empty(shape.as_slice(), (Kind::Float, tch::Device::Cpu))
            .map_err(|e| Error::Load { id: self.origin.clone(), reason: e.to_string() })
    }

    /// The tokenizer the metadata describes (byte-level BPE, "gpt2" in GGUF's words), built as
    /// a tokenizer.json would describe it; control tokens (token_type 3) are special tokens.
    pub fn tokenizer(&self) -> Result<tokenizers::Tokenizer> {
        let model = self.meta("tokenizer.ggml.model")?.as_str().unwrap_or("");
        if model != "gpt2" {
            return Err(Error::Tokenizer(format!(
                "GGUF tokenizer model '{model}' is not supported (supported: gpt2 byte-level BPE)"
            )));
        }
        let strings = |key: &str| -> Result<Vec<String>> {
            match self.meta(key)? {
                Value::Array(a) => Ok(a.iter().map(|v| v.as_str().unwrap_or("").to_string()).collect()),
                _ => Err(Error::Tokenizer(format!("GGUF metadata '{key}' is not a list"))),
            }
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        let types: Vec<i64> = match self.metadata.get("tokenizer.ggml.token_type") {
            Some(Value::Array(a)) => a.iter().map(|v| v.as_i64().unwrap_or(1)).collect(),
            _ => Vec::new(),
        };
        let vocab: serde_json::Map<String, serde_json::Value> =
            tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
        let added: Vec<serde_json::Value> = tokens
            .iter()
            .zip(&types)
            .enumerate()
            .filter(|(_, (_, &ty))| ty == 3)
            .map(|(i, (t, _))| json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
            .collect();
        let spec = json!({
            "version": "1.0",
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges},
        });
        spec.to_string().parse::<tokenizers::Tokenizer>().map_err(|e| Error::Tokenizer(format!("GGUF tokenizer: {e}")))
    }
}

/// llama.cpp's converter interleaves each head's rotary halves (for its adjacent-pair rotary);
/// HF's rotate-half layout is recovered by the inverse reshape.
fn unpermute(w: &Tensor, heads: i64) -> Result<Tensor> {
    let size = w.size();
    let rows = permuted_rows(w, heads)?;
    let rest: Vec<i64> = size[1..].to_vec();
    let mut shape = vec![heads, rows / heads / 2, 2];
    shape.extend(&rest);
    Ok(w.reshape(shape.as_slice()).transpose(1, 2).reshape(size.as_slice()))
}

/// The rows of a q/k weight permuted over `heads`, when they split into a rotary pair per head.
fn permuted_rows(w: &Tensor, heads: i64) -> Result<i64> {
    let rows = w.size()[0];
    if heads <= 0 || rows % (heads * 2) != 0 {
        return Err(Error::Config(format!("cannot undo the q/k permutation: {rows} rows over {heads} heads")));
    }
    Ok(rows)
}

/// GGUF's Llama tensor names -> HF's.
fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let hf = match part {
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "attn_q.bias" => "self_attn.q_proj.bias",
        "attn_k.bias" => "self_attn.k_proj.bias",
        "attn_v.bias" => "self_attn.v_proj.bias",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_convert() {
        assert_eq!(half_to_f32(0x3c00), 1.0);
        assert_eq!(half_to_f32(0xc000), -2.0);
        assert_eq!(half_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(half_to_f32(0x7bff), 65504.0);
    }

    #[test]
    fn blocks_and_half_floats_dequantize() {
        // Q4_1: d = 1, m = 0.5; nibble j of byte i -> weight i (low) or 16 + i (high).
        let mut blk = vec![0x00, 0x3c, 0x00, 0x38];
        blk.extend((0..16u8).map(|i| i | ((15 - i) << 4)));
        let mut v = [0.0; 32];
        dequantize_into(3, &blk, &mut v);
        assert_eq!(v[0], 0.5);
        assert_eq!(v[15], 15.5);
        assert_eq!(v[16], 15.5);
        assert_eq!(v[31], 0.5);
        // Q4_0: d = 1, no minimum, nibbles offset by -8.
        let mut blk = vec![0x00, 0x3c];
        blk.extend((0..16u8).map(|i| i | ((15 - i) << 4)));
        let mut v = [0.0; 32];
        dequantize_into(2, &blk, &mut v);
        assert_eq!((v[0], v[15], v[16], v[31]), (-8.0, 7.0, 7.0, -8.0));
        // F16 and BF16 element by element.
        let mut v = [0.0; 2];
        dequantize_into(1, &[0x00, 0x3c, 0x00, 0xc0], &mut v);
        assert_eq!(v, [1.0, -2.0]);
        dequantize_into(30, &[0x80, 0x3f, 0x00, 0xc0], &mut v);
        assert_eq!(v, [1.0, -2.0]);
        let mut blk = vec![0x00, 0x40]; // d = 2
        blk.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let mut v = [0.0; 32];
        dequantize_into(8, &blk, &mut v);
        assert_eq!(v[0], -32.0);
        assert_eq!(v[31], 30.0);
    }
}
