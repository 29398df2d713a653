//! Sparse autoencoders in SAELens's on-disk format: a folder with `cfg.json` and
//! `sae_weights.safetensors`. The config is read in SAELens 6.x's layout or the flat pre-6.0 one
//! (converted as SAELens's `handle_pre_6_0_config` does), and encode/decode follow SAELens 6.54's
//! inference classes step for step (standard, JumpReLU, TopK, gated), so every value SAELens
//! hooks (`hook_sae_input`, `hook_sae_acts_pre`, `hook_sae_acts_post`, `hook_sae_recons`,
//! `hook_sae_output`) is computed here in the same order of operations.
use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::model::checkpoint::StateDict;

/// How the latents are activated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Architecture {
    /// ReLU of the pre-activation.
    Standard,
    /// ReLU masked where the pre-activation is not above a per-latent `threshold`.
    JumpRelu,
    /// The k largest pre-activations (then ReLU), optionally scaled by the decoder rows' norms.
    TopK { k: i64, rescale_by_decoder_norm: bool },
    /// A gate (`W_enc`, `b_gate`) times a magnitude path (`W_enc · exp(r_mag)`, `b_mag`).
    Gated,
}

/// SAELens's `normalize_activations` at inference.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Normalize {
    /// `none`, and `expected_average_only_in`, whose factor SAELens's trainer folds into the
    /// weights before saving (`load_from_disk` applies nothing).
    Identity,
    /// x · √d_in / ‖x‖ in, divided by the same factor out.
    ConstantNormRescale,
    /// (x − mean) / (std + 1e-5) in (std with N − 1), × std + mean out.
    LayerNorm,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SaeConfig {
    pub architecture: Architecture,
    pub d_in: i64,
    pub d_sae: i64,
    pub kind: Kind,
    pub apply_b_dec_to_input: bool,
    pub normalize: Normalize,
    /// `reshape_activations = "hook_z"`: the input's last two axes (heads, d_head) are flattened.
    pub hook_z: bool,
    /// The hook the SAE reads (`metadata.hook_name`; `hook_point` before 6.0).
    pub hook_name: Option<String>,
}

const ARCHITECTURES: &str = "standard, jumprelu, topk, gated";

fn bad(origin: &str, reason: impl Into<String>) -> Error {
    Error::Load { id: origin.to_string(), reason: reason.into() }
}

/// The major version of a version string ("6.54.0" → 6, "6.0.0-rc.1" → 6).
fn major(version: &str) -> Option<u64> {
    version.split(['.', '-']).next()?.trim().parse().ok()
}

impl SaeConfig {
    /// Reads `cfg.json`'s text. `origin` names the file in errors.
    pub fn from_json(text: &str, origin: &str) -> Result<SaeConfig> {
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| bad(origin, format!("cfg.json is not JSON: {e}")))?;
        let obj = v.as_object().ok_or_else(|| bad(origin, "cfg.json is not a JSON object"))?;
        let version = obj
            .get("sae_lens_version")
            .and_then(|x| x.as_str())
            .or_else(|| obj.get("metadata").and_then(|m| m.get("sae_lens_version")).and_then(|x| x.as_str()));
        // SAELens's gate: a config without a version, or before 6.0, is read as the flat layout.
        let modern = version.and_then(major).is_some_and(|m| m >= 6);
        let int = |key: &str| -> Result<i64> {
            obj.get(key).and_then(|x| x.as_i64()).ok_or_else(|| bad(origin, format!("cfg.json has no integer '{key}'")))
        };
        let (d_in, d_sae) = (int("d_in")?, int("d_sae")?);
        if d_in <= 0 || d_sae <= 0 {
            return Err(bad(origin, format!("cfg.json: d_in = {d_in} and d_sae = {d_sae} must be positive")));
        }
        let dtype = obj.get("dtype").and_then(|x| x.as_str()).ok_or_else(|| bad(origin, "cfg.json has no 'dtype'"))?;
        let kind = match dtype.trim_start_matches("torch.") {
            "float32" | "float" => Kind::Float,
            "float64" | "double" => Kind::Double,
            "float16" | "half" => Kind::Half,
            "bfloat16" => Kind::BFloat16,
            other => {
                return Err(bad(
                    origin,
                    format!("cfg.json: dtype '{other}' is not float32, float64, float16 or bfloat16"),
                ))
            }
        };
        let flag = |key: &str, default: bool| obj.get(key).and_then(|x| x.as_bool()).unwrap_or(default);
        let str_of = |key: &str| obj.get(key).and_then(|x| x.as_str());
        let (hook_name, architecture, normalize, reshape) = if modern {
            let hook = obj.get("metadata").and_then(|m| m.get("hook_name")).and_then(|x| x.as_str());
            let normalize = str_of("normalize_activations").unwrap_or("none").to_string();
            let reshape = str_of("reshape_activations").unwrap_or("none").to_string();
            (hook.map(str::to_string), str_of("architecture").unwrap_or("standard").to_string(), normalize, reshape)
        } else {
            let hook = str_of("hook_name").or_else(|| str_of("hook_point")).map(str::to_string);
            let activation = str_of("activation_fn").or_else(|| str_of("activation_fn_str")).unwrap_or("relu");
            let k = obj.get("activation_fn_kwargs").and_then(|kw| kw.get("k")).filter(|k| !k.is_null());
            let architecture = if activation == "topk" && k.is_some() {
                "topk".to_string()
            } else {
                str_of("architecture").unwrap_or("standard").to_string()
            };
            let normalize = match obj.get("normalize_activations") {
                Some(serde_json::Value::Bool(true)) => "expected_average_only_in".to_string(),
                Some(serde_json::Value::String(s)) => s.clone(),
                _ => "none".to_string(),
            };
            let reshape = match str_of("reshape_activations") {
                Some(r) => r.to_string(),
                None if hook.as_deref().is_some_and(|h| h.contains("hook_z")) => "hook_z".to_string(),
                None => "none".to_string(),
            };
            (hook, architecture, normalize, reshape)
        };
        let architecture = match architecture.as_str() {
            "standard" => Architecture::Standard,
            "jumprelu" => Architecture::JumpRelu,
            "gated" => Architecture::Gated,
            "topk" => {
                // Pre-6.0: activation_fn_kwargs' k wins (SAELens sets k from it); 6.x: `k`.
                let from_kwargs = obj.get("activation_fn_kwargs").and_then(|kw| kw.get("k")).filter(|k| !k.is_null());
                let k = if modern { obj.get("k") } else { from_kwargs.or_else(|| obj.get("k")) };
                let k = k.and_then(|x| x.as_i64()).unwrap_or(100);
                if k < 1 || k > d_sae {
                    return Err(bad(origin, format!("cfg.json: topk's k = {k} must be between 1 and d_sae = {d_sae}")));
                }
                Architecture::TopK { k, rescale_by_decoder_norm: flag("rescale_acts_by_decoder_norm", false) }
            }
            t if t.contains("transcoder") => {
                return Err(bad(origin, format!("cfg.json: architecture '{t}' (a transcoder) is not supported yet")))
            }
            other => {
                return Err(bad(origin, format!("cfg.json: unknown architecture '{other}' (known: {ARCHITECTURES})")))
            }
        };
        let normalize = match normalize.as_str() {
            "none" | "expected_average_only_in" => Normalize::Identity,
            "constant_norm_rescale" => Normalize::ConstantNormRescale,
            "layer_norm" => Normalize::LayerNorm,
            other => {
                return Err(bad(
                    origin,
                    format!(
                        "cfg.json: normalize_activations '{other}' is not supported (none, expected_average_only_in, constant_norm_rescale, layer_norm)"
                    ),
                ))
            }
        };
        let hook_z = match reshape.as_str() {
            "none" => false,
            "hook_z" => true,
            other => return Err(bad(origin, format!("cfg.json: reshape_activations '{other}' is not none or hook_z"))),
        };
        Ok(SaeConfig {
            architecture,
            d_in,
            d_sae,
            kind,
            apply_b_dec_to_input: flag("apply_b_dec_to_input", true),
            normalize,
            hook_z,
            hook_name,
        })
    }
}

/// An SAE's weights, in its config's dtype.
pub struct Sae {
    pub cfg: SaeConfig,
    pub dir: PathBuf,
    pub w_enc: Tensor,
    pub w_dec: Tensor,
    /// Absent for gated SAEs.
    pub b_enc: Option<Tensor>,
    pub b_dec: Tensor,
    pub threshold: Option<Tensor>,
    /// Gated: (b_gate, r_mag, b_mag).
    pub gate: Option<(Tensor, Tensor, Tensor)>,
}

/// Every value SAELens hooks in one pass of an SAE (its forward without the error term).
pub struct SaeValues {
    /// `hook_sae_input`: the input flattened (hook_z), before normalisation.
    pub input: Tensor,
    /// `hook_sae_acts_pre`: the pre-activation (gated: the magnitude path; TopK: before the
    /// decoder-norm rescale).
    pub acts_pre: Tensor,
    /// `hook_sae_acts_post`: the latents.
    pub acts_post: Tensor,
    /// `hook_sae_recons`: latents · W_dec + b_dec, before de-normalisation and unflattening.
    pub recons: Tensor,
    /// `hook_sae_output`: the reconstruction in the input's space and shape.
    pub output: Tensor,
}

/// What de-normalisation needs from the input (SAELens keeps it on the module between encode
/// and decode).
enum NormState {
    Identity,
    Scale(Tensor),
    Affine { mean: Tensor, std: Tensor },
}

impl Sae {
    /// Loads an SAE folder. Every tensor of the file must be used (SAELens loads strictly), and
    /// each has the shape the config implies.
    pub fn load(dir: &Path) -> Result<Sae> {
        let cfg_path = dir.join("cfg.json");
        let origin = cfg_path.display().to_string();
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let cfg = SaeConfig::from_json(&text, &origin)?;
        let weights = dir.join("sae_weights.safetensors");
        if !weights.is_file() {
            return Err(bad(&weights.display().to_string(), "no sae_weights.safetensors beside cfg.json"));
        }
        let mut sd = StateDict::read(std::slice::from_ref(&weights))?;
        let (all, taken) = sd.names_and_taken();
        let (d_in, d_sae) = (cfg.d_in, cfg.d_sae);
        let mut take =
            |name: &str, shape: &[i64]| -> Result<Tensor> { Ok(sd.take_shaped(name, shape)?.to_kind(cfg.kind)) };
        let w_enc = take("W_enc", &[d_in, d_sae])?;
        let w_dec = take("W_dec", &[d_sae, d_in])?;
        let b_dec = take("b_dec", &[d_in])?;
        let (b_enc, threshold, gate) = match cfg.architecture {
            Architecture::Gated => {
                (None, None, Some((take("b_gate", &[d_sae])?, take("r_mag", &[d_sae])?, take("b_mag", &[d_sae])?)))
            }
            Architecture::JumpRelu => (Some(take("b_enc", &[d_sae])?), Some(take("threshold", &[d_sae])?), None),
            _ => (Some(take("b_enc", &[d_sae])?), None, None),
        };
        // SAELens drops a `scaling_factor` of ones and refuses any other.
        if let Some(s) = sd.take_opt("scaling_factor")? {
            let ones = s.ones_like();
            if !s.to_kind(Kind::Double).allclose(&ones.to_kind(Kind::Double), 1e-5, 1e-8, false) {
                return Err(bad(&weights.display().to_string(), "a scaling_factor other than ones is not supported"));
            }
        }
        let left = crate::model::checkpoint::unused(&all, &taken);
        if !left.is_empty() {
            return Err(bad(
                &weights.display().to_string(),
                format!("tensors a {:?} SAE does not have: {}", cfg.architecture, left.join(", ")),
            ));
        }
        if let Some(t) = &threshold {
            if t.isnan().any().int64_value(&[]) != 0 {
                return Err(bad(&weights.display().to_string(), "the JumpReLU threshold has NaN entries"));
            }
        }
        Ok(Sae { cfg, dir: dir.to_path_buf(), w_enc, w_dec, b_enc, b_dec, threshold, gate })
    }

    /// The input flattened (hook_z), normalised, less b_dec where the config says: what the
    /// encoder multiplies, with hook_sae_input's value and the normalisation's state.
    fn process_in(&self, x: &Tensor) -> (Tensor, Tensor, NormState) {
        let x = x.to_kind(self.cfg.kind);
        let x = if self.cfg.hook_z { x.flatten(-2, -1) } else { x };
        let input = x.shallow_clone();
        let (x, state) = match self.cfg.normalize {
            Normalize::Identity => (x, NormState::Identity),
            Normalize::ConstantNormRescale => {
                let c = x.norm_scalaropt_dim(2, [-1i64].as_slice(), true).reciprocal() * (self.cfg.d_in as f64).sqrt();
                (&x * &c, NormState::Scale(c))
            }
            Normalize::LayerNorm => {
                let mean = x.mean_dim([-1i64].as_slice(), true, x.kind());
                let centred = &x - &mean;
                let std = centred.std_dim([-1i64].as_slice(), true, true);
                (&centred / (&std + 1e-5), NormState::Affine { mean, std })
            }
        };
        let x = if self.cfg.apply_b_dec_to_input { x - &self.b_dec } else { x };
        (input, x, state)
    }

    /// The decoder rows' norms (TopK's rescale).
    fn decoder_norms(&self) -> Tensor {
        self.w_dec.norm_scalaropt_dim(2, [-1i64].as_slice(), false)
    }

    /// (hook_sae_acts_pre, hook_sae_acts_post) of an encoder input.
    fn activate(&self, sae_in: &Tensor) -> (Tensor, Tensor) {
        match self.cfg.architecture {
            Architecture::Gated => {
                let (b_gate, r_mag, b_mag) = self.gate.as_ref().expect("a gated SAE has its gate tensors");
                let gate = (sae_in.matmul(&self.w_enc) + b_gate).gt(0.0).to_kind(self.cfg.kind);
                let mag_pre = sae_in.matmul(&(&self.w_enc * r_mag.exp())) + b_mag;
                let post = gate * mag_pre.relu();
                (mag_pre, post)
            }
            arch => {
                let b_enc = self.b_enc.as_ref().expect("a non-gated SAE has b_enc");
                let pre = sae_in.matmul(&self.w_enc) + b_enc;
                let post = match arch {
                    Architecture::JumpRelu => {
                        let threshold = self.threshold.as_ref().expect("a JumpReLU SAE has its threshold");
                        pre.relu() * pre.gt_tensor(threshold).to_kind(self.cfg.kind)
                    }
                    Architecture::TopK { k, rescale_by_decoder_norm } => {
                        let h = if rescale_by_decoder_norm { &pre * self.decoder_norms() } else { pre.shallow_clone() };
                        let (values, indices) = h.topk(k, -1, true, false);
                        h.zeros_like().scatter(-1, &indices, &values.relu())
                    }
                    _ => pre.relu(),
                };
                (pre, post)
            }
        }
    }

    /// (hook_sae_recons, hook_sae_output) of latents.
    fn decode_with(&self, acts: &Tensor, state: &NormState, heads: Option<i64>) -> (Tensor, Tensor) {
        let acts = match self.cfg.architecture {
            Architecture::TopK { rescale_by_decoder_norm: true, .. } => acts * self.decoder_norms().reciprocal(),
            _ => acts.shallow_clone(),
        };
        let recons = acts.matmul(&self.w_dec) + &self.b_dec;
        let out = match state {
            NormState::Identity => recons.shallow_clone(),
            NormState::Scale(c) => &recons / c,
            NormState::Affine { mean, std } => &recons * std + mean,
        };
        let out = match heads {
            Some(h) => {
                let mut shape = out.size();
                let d = shape.pop().unwrap_or(0);
                shape.extend([h, d / h.max(1)]);
                out.reshape(shape.as_slice())
            }
            None => out,
        };
        (recons, out)
    }

    /// One pass of the SAE on activations `x` (the hook's shape: [..., d_in], or [..., heads,
    /// d_head] for hook_z), every hooked value. An input of another width is a named error.
    pub fn forward(&self, x: &Tensor) -> Result<SaeValues> {
        let size = x.size();
        let width =
            if self.cfg.hook_z { size.iter().rev().take(2).product::<i64>() } else { *size.last().unwrap_or(&0) };
        if (self.cfg.hook_z && size.len() < 2) || width != self.cfg.d_in {
            return Err(Error::Other(format!(
                "the SAE in {} reads {} values per position (d_in), but its input has shape {size:?}{}",
                self.dir.display(),
                self.cfg.d_in,
                if self.cfg.hook_z { " (hook_z: heads × d_head must be d_in)" } else { "" }
            )));
        }
        let heads = if self.cfg.hook_z { Some(size[size.len() - 2]) } else { None };
        let (input, sae_in, state) = self.process_in(x);
        let (acts_pre, acts_post) = self.activate(&sae_in);
        let (recons, output) = self.decode_with(&acts_post, &state, heads);
        Ok(SaeValues { input, acts_pre, acts_post, recons, output })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pre_6_config_reads_as_sae_lens_converts_it() {
        let c = SaeConfig::from_json(
            r#"{"d_in":16,"d_sae":64,"dtype":"float32","hook_point":"blocks.0.attn.hook_z","activation_fn_str":"topk",
                "activation_fn_kwargs":{"k":8},"normalize_activations":false,"sae_lens_version":"3.5.0"}"#,
            "cfg.json",
        )
        .unwrap();
        assert_eq!(c.architecture, Architecture::TopK { k: 8, rescale_by_decoder_norm: false });
        assert_eq!(c.hook_name.as_deref(), Some("blocks.0.attn.hook_z"));
        assert!(c.hook_z && c.apply_b_dec_to_input);
        assert_eq!(c.normalize, Normalize::Identity);
    }

    #[test]
    fn a_6x_config_without_a_version_is_read_as_the_flat_layout() {
        // SAELens's gate: no sae_lens_version means pre-6.0, whose metadata is rebuilt from the
        // top level (so a nested hook_name is not seen).
        let c = SaeConfig::from_json(
            r#"{"d_in":4,"d_sae":8,"dtype":"float32","metadata":{"hook_name":"blocks.0.hook_resid_pre"},"architecture":"jumprelu"}"#,
            "cfg.json",
        )
        .unwrap();
        assert_eq!(c.hook_name, None);
        assert_eq!(c.architecture, Architecture::JumpRelu);
    }

    #[test]
    fn bad_configs_are_named() {
        let err = |text: &str| SaeConfig::from_json(text, "x/cfg.json").unwrap_err().to_string();
        let base = r#""d_in":4,"d_sae":8,"dtype":"float32","metadata":{"sae_lens_version":"6.54.0"}"#;
        assert!(err(&format!("{{{base},\"architecture\":\"mystery\"}}")).contains("unknown architecture 'mystery'"));
        assert!(err(&format!("{{{base},\"architecture\":\"transcoder\"}}")).contains("transcoder"));
        assert!(err(&format!("{{{base},\"architecture\":\"topk\",\"k\":9}}")).contains("k = 9"));
        assert!(err(r#"{"d_in":4,"d_sae":8}"#).contains("dtype"));
        assert!(err("[1]").contains("not a JSON object"));
    }
}
