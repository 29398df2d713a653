//! Models: configuration by composition, loading from a directory or the hub, TL-layout weights,
//! hook points. One file per family translates a checkpoint; nothing downstream knows families.
pub mod checkpoint;
pub mod config;
pub mod digest;
pub mod families;
pub mod gguf;
pub mod hook_point;
pub mod mapped;
pub mod process;
pub mod sae;
pub mod source;
pub mod tokenize;
pub mod weights;

use tch::{Device, Kind};

use crate::error::{Error, Result};
use crate::model::tokenize::TextTokenizer;
use config::{ModelConfig, Processing};
use hook_point::HookPoint;
use weights::{FusedAttn, Weights};

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub revision: Option<String>,
    pub processing: Processing,
    pub device: Device,
    pub kind: Kind,
    /// Non-empty: the model is split by layers over these devices (contiguous, even groups:
    /// layers 0..k on the first, ...), embedding on the first, final norm and unembedding on
    /// the last; `device` is then ignored.
    pub split: Vec<Device>,
    /// How attention's z is computed where no hook reads its steps.
    pub attention: AttentionKernel,
}

/// How z is computed where the fused kernel may be used (`Model::fuses_attention`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttentionKernel {
    /// libtorch's scaled_dot_product_attention (the default) in f32 and f64.
    #[default]
    Fused,
    /// The explicit steps in every forward (a bench compares the two: `--attention explicit`).
    Explicit,
}

impl AttentionKernel {
    pub fn is_fused(&self) -> bool {
        *self == AttentionKernel::Fused
    }

    /// `--attention` and `[model] attention`.
    pub fn parse(s: &str) -> Option<AttentionKernel> {
        match s {
            "fused" => Some(AttentionKernel::Fused),
            "explicit" => Some(AttentionKernel::Explicit),
            _ => None,
        }
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            revision: None,
            processing: Processing::TRANSFORMER_LENS,
            device: Device::Cpu,
            kind: Kind::Float,
            split: Vec::new(),
            attention: AttentionKernel::Fused,
        }
    }
}

/// The device of every layer when `n_layers` layers are split over `devices` in contiguous,
/// even groups (the first groups take one more when they do not divide).
pub fn split_layers(n_layers: usize, devices: &[Device]) -> Vec<Device> {
    let k = devices.len().max(1);
    (0..n_layers).map(|l| devices.get(l * k / n_layers.max(1)).copied().unwrap_or(Device::Cpu)).collect()
}

/// A loaded model: immutable weights and config; all run state lives in `Hooks` and the caller.
pub struct Model {
    pub cfg: ModelConfig,
    pub weights: Weights,
    pub(crate) fused: Vec<FusedAttn>,
    pub processing: Processing,
    /// Where the output side lives (final norm, unembedding, logits): the only device unless
    /// the model is split by layers.
    pub device: Device,
    /// The device of each layer (all `device` unless split); the embedding is on layer 0's.
    pub layer_devices: Vec<Device>,
    pub kind: Kind,
    /// How attention runs where its scores and pattern are not hooked.
    pub attention_kernel: AttentionKernel,
    pub tokenizer: Option<TextTokenizer>,
    pub files: Option<source::ModelFiles>,
}

use families::family;

/// Whether a model id names a GGUF file.
pub fn is_gguf(id: &str) -> bool {
    id.ends_with(".gguf") && std::path::Path::new(id).is_file()
}

/// A model's files resolved and its config.json parsed (a GGUF file's header read), with its
/// tokenizer once built: what validate and plan read without weights, and what
/// `Model::load_described` loads, so a run resolves the source and parses config and tokenizer
/// once.
#[derive(Clone)]
pub struct Described {
    pub id: String,
    pub files: source::ModelFiles,
    pub json: serde_json::Value,
    pub cfg: ModelConfig,
    /// Built by `read(.., true)`; else `Model::load_described` builds it beside the weights.
    pub tokenizer: Option<TextTokenizer>,
    /// A `.gguf` file, mapped.
    gguf: Option<std::sync::Arc<gguf::Gguf>>,
}

impl Described {
    /// The files of `id` (a hub id, a directory or a `.gguf` file) and its parsed config; its
    /// tokenizer too with `with_tokenizer` (an error when a safetensors model has none).
    pub fn read(id: &str, revision: Option<&str>, with_tokenizer: bool) -> Result<Described> {
        if is_gguf(id) {
            let path = std::path::Path::new(id);
            let g = gguf::Gguf::read(path)?;
            let json = g.config_json()?;
            let tokenizer = match with_tokenizer {
                true => Some(TextTokenizer::from_parts(g.tokenizer()?, &serde_json::Value::Null, &json)?),
                false => None,
            };
            let cfg = family(&json)?.0;
            let gguf = Some(std::sync::Arc::new(g));
            return Ok(Described { id: id.into(), files: gguf_files(path), json, cfg, tokenizer, gguf });
        }
        let files = source::resolve(id, revision)?;
        let json = read_json(&files.config)?;
        let tokenizer = match with_tokenizer {
            true => {
                let path = files
                    .tokenizer
                    .as_ref()
                    .ok_or_else(|| Error::Tokenizer("the model has no tokenizer.json".into()))?;
                Some(TextTokenizer::load(path, files.tokenizer_config.as_deref(), &json)?)
            }
            false => None,
        };
        let cfg = family(&json)?.0;
        Ok(Described { id: id.into(), files, json, cfg, tokenizer, gguf: None })
    }

    /// The tokenizer `read` built.
    pub fn tokenizer(&self) -> Result<&TextTokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| Error::Tokenizer("the model has no tokenizer.json".into()))
    }
}

/// A `.gguf` file holds config, tokenizer and weights in one.
fn gguf_files(path: &std::path::Path) -> source::ModelFiles {
    source::ModelFiles {
        id: path.display().to_string(),
        config: path.to_path_buf(),
        weights: vec![path.to_path_buf()],
        tokenizer: None,
        tokenizer_config: None,
        commit: None,
    }
}

fn read_json(path: &std::path::Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
}

/// While a half-precision checkpoint is processed, glibc's malloc hands back every freed block
/// over 1 MiB to the system. Otherwise its dynamic mmap threshold, raised by the first large
/// frees, keeps the per-tensor f32 working copies of weight processing in the heap after they are
/// freed. Measured on a 2.15 GB bf16 checkpoint, that retention was about 0.7 GB of peak RSS. An
/// f32 checkpoint, processed in place, keeps the default (its temporaries reuse the heap).
/// After any load the threshold is glibc's largest default (32 MiB), so sweeps reuse their heap.
struct LoadingAllocator;

impl LoadingAllocator {
    /// Leaves the allocator as it is until dropped.
    fn until_loaded() -> LoadingAllocator {
        LoadingAllocator
    }

    fn enter() -> LoadingAllocator {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only sets an allocator tunable; any value is valid.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        }
        LoadingAllocator
    }
}

impl Drop for LoadingAllocator {
    fn drop(&mut self) {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: as above.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        }
    }
}

impl Model {
    /// Loads `id` (a local directory, a hub id or a `.gguf` file) with TransformerLens-style
    /// processing.
    pub fn load(id: &str, opts: &LoadOptions) -> Result<Model> {
        Model::load_described(&Described::read(id, opts.revision.as_deref(), false)?, opts)
    }

    /// Loads a model whose files `read` resolved and whose config it parsed (a run's
    /// preflight), reading neither again.
    pub fn load_described(d: &Described, opts: &LoadOptions) -> Result<Model> {
        let _loaded = LoadingAllocator::until_loaded();
        match &d.gguf {
            Some(g) => Model::load_gguf(d, g, opts),
            None => Model::load_safetensors(d, opts),
        }
    }

    fn load_safetensors(d: &Described, opts: &LoadOptions) -> Result<Model> {
        let (id, files, json) = (d.id.as_str(), &d.files, &d.json);
        tracing::info!(id, config = %files.config.display(), shards = files.weights.len(), "loading model");
        let (cfg, weights) = Model::read_weights(id, files, json)?;
        let tokenizer = || match &d.tokenizer {
            Some(t) => Ok(Some(t.clone())),
            None => files
                .tokenizer
                .as_ref()
                .map(|t| TextTokenizer::load(t, files.tokenizer_config.as_deref(), json))
                .transpose(),
        };
        let process = |weights: Weights| {
            let started = std::time::Instant::now();
            // Only a half-precision checkpoint makes f32 working copies to hand back; an f32 one
            // is processed in place, and its few temporaries reuse the heap (with the 1 MiB
            // threshold each was a fresh mapping, page-faulted in: about 20% of processing GPT-2
            // small).
            let _allocator =
                weights.blocks.iter().any(|b| b.attn.w_q.kind() != tch::Kind::Float).then(LoadingAllocator::enter);
            let model = Model::from_weights(cfg, weights, opts);
            tracing::debug!(seconds = started.elapsed().as_secs_f64(), "weights processed and placed");
            model
        };
        // The tokenizer (0.1-0.2 s of JSON and merges for GPT-2's) is built beside the weight
        // processing where a core is free for it. On two cores it only moved the time: the
        // processing took as much longer. Beside the read it cost more than it saved, as both
        // then change the address space the read's page faults wait on.
        let (model, tokenizer) = if std::thread::available_parallelism().map_or(1, |n| n.get()) > 2 {
            std::thread::scope(|s| {
                let tokenizer = s.spawn(tokenizer);
                let model = process(weights);
                (
                    model,
                    tokenizer.join().unwrap_or_else(|_| {
                        Err(Error::Tokenizer("building the tokenizer stopped unexpectedly".into()))
                    }),
                )
            })
        } else {
            let tokenizer = tokenizer();
            (process(weights), tokenizer)
        };
        let tokenizer = tokenizer?;
        let mut model = model?;
        model.tokenizer = tokenizer;
        model.files = Some(files.clone());
        Ok(model)
    }

    /// The config and the unprocessed TL-layout weights of a safetensors checkpoint.
    fn read_weights(id: &str, files: &source::ModelFiles, json: &serde_json::Value) -> Result<(ModelConfig, Weights)> {
        let started = std::time::Instant::now();
        let converted = Model::convert_checked(id, json, checkpoint::StateDict::read(&files.weights)?)?;
        tracing::debug!(
            seconds = started.elapsed().as_secs_f64(),
            "checkpoint read and converted to the TransformerLens layout"
        );
        Ok(converted)
    }

    /// Converts a checkpoint's tensors to TL-layout weights for the family config.json names,
    /// checking that they are the checkpoint of that config: every tensor present, of the shape
    /// the config implies, and none left over.
    fn convert_checked(
        id: &str,
        json: &serde_json::Value,
        sd: checkpoint::StateDict,
    ) -> Result<(ModelConfig, Weights)> {
        let (cfg, convert) = family(json)?;
        let (names, taken) = sd.names_and_taken();
        let weights = convert(sd, &cfg).map_err(|e| match e {
            Error::Load { reason, .. } => Error::Load { id: id.into(), reason },
            e => e,
        })?;
        // A tensor no converter step read is a checkpoint that does not match its config.
        let unused = checkpoint::unused(&names, &taken);
        if !unused.is_empty() {
            let shown: Vec<&str> = unused.iter().take(5).map(String::as_str).collect();
            return Err(Error::Load {
                id: id.into(),
                reason: format!(
                    "{} tensor(s) in the checkpoint are not part of a {} model with this config.json: {}{}; is config.json (model_type, layer count, bias settings) the checkpoint's own?",
                    unused.len(),
                    cfg.family,
                    shown.join(", "),
                    if unused.len() > 5 { format!(" and {} more", unused.len() - 5) } else { String::new() }
                ),
            });
        }
        Ok((cfg, weights))
    }

    /// The config of `id` with its checkpoint checked against it as a load checks it (every
    /// tensor present with the shape config.json implies, none left over, the TL-layout weights
    /// consistent), for what needs the model's structure but not its values, such as listing
    /// hook points. A safetensors checkpoint is mapped, not read: the check reads its headers and
    /// no weight values, so it takes milliseconds whatever the model's size. Nothing is
    /// processed, placed on a device or tokenized. A `.gguf` file is mapped too, and its tensors
    /// converted by shape alone (`Gguf::state_dict_shapes`): nothing is dequantized.
    pub fn inspect(id: &str, revision: Option<&str>) -> Result<ModelConfig> {
        let validated = |(cfg, weights): (ModelConfig, Weights)| weights.validate(&cfg).map(|()| cfg);
        if is_gguf(id) {
            let g = gguf::Gguf::read(std::path::Path::new(id))?;
            let json = g.config_json()?;
            return Model::convert_gguf(id, &json, g.state_dict_shapes()?).and_then(validated);
        }
        let files = source::resolve(id, revision)?;
        tracing::info!(id, config = %files.config.display(), shards = files.weights.len(), "checking model");
        let json = read_json(&files.config)?;
        checkpoint::StateDict::check_mapped(&files.weights, |sd| {
            Model::convert_checked(id, &json, sd).and_then(validated)
        })
    }

    /// A `.gguf` file: tensors dequantized to f32, processed, then cast to the run dtype.
    fn load_gguf(d: &Described, g: &gguf::Gguf, opts: &LoadOptions) -> Result<Model> {
        let _allocator = LoadingAllocator::enter();
        tracing::info!(id = d.id, "loading GGUF model");
        let (cfg, weights) = Model::convert_gguf(&d.id, &d.json, g.state_dict()?)?;
        let tokenizer = match &d.tokenizer {
            Some(t) => t.clone(),
            None => TextTokenizer::from_parts(g.tokenizer()?, &serde_json::Value::Null, &d.json)?,
        };
        let mut model = Model::from_weights(cfg, weights, opts)?;
        model.tokenizer = Some(tokenizer);
        model.files = Some(d.files.clone());
        Ok(model)
    }

    fn convert_gguf(
        id: &str,
        json: &serde_json::Value,
        tensors: checkpoint::StateDict,
    ) -> Result<(ModelConfig, Weights)> {
        let (cfg, convert) = family(json)?;
        let weights = convert(tensors, &cfg).map_err(|e| match e {
            Error::Load { reason, .. } => Error::Load { id: id.into(), reason },
            e => e,
        })?;
        Ok((cfg, weights))
    }

    /// Builds a model from unprocessed TL-layout weights (f32, CPU). The weights are processed
    /// in place (see `process::process`): keep no other handle on their tensors.
    pub fn from_weights(cfg: ModelConfig, mut weights: Weights, opts: &LoadOptions) -> Result<Model> {
        weights.validate(&cfg)?;
        let kind = opts.kind;
        let layer_devices = if opts.split.is_empty() {
            vec![opts.device; cfg.n_layers]
        } else {
            split_layers(cfg.n_layers, &opts.split)
        };
        let device = opts.split.last().copied().unwrap_or(opts.device);
        let input = layer_devices.first().copied().unwrap_or(device);
        let device_of = |at: process::Place| match at {
            process::Place::Block(l) => layer_devices[l],
            process::Place::Input => input,
            process::Place::Output => device,
        };
        process::process(&mut weights, &cfg, opts.processing, &device_of, kind);
        let fused = {
            use rayon::prelude::*;
            weights.blocks.par_iter_mut().map(|b| b.attn.fused()).collect()
        };
        Ok(Model {
            cfg,
            weights,
            fused,
            processing: opts.processing,
            device,
            layer_devices,
            kind: opts.kind,
            attention_kernel: opts.attention,
            tokenizer: None,
            files: None,
        })
    }

    /// Leaves the weights for the operating system to reclaim when the process ends, for a
    /// command that is about to exit: freeing them one by one first costs 0.1-0.2 s per
    /// 500 MB, paid again in full by the exit.
    pub fn release_at_exit(self) {
        std::mem::forget(self);
    }

    /// The device layer `l`'s weights and activations live on (`device` past the last layer).
    pub fn device_of(&self, l: usize) -> Device {
        self.layer_devices.get(l).copied().unwrap_or(self.device)
    }

    /// Where the embedding lives and a forward from tokens starts.
    pub fn input_device(&self) -> Device {
        self.device_of(0)
    }

    pub fn tokenizer(&self) -> Result<&TextTokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| Error::Tokenizer("this model has no tokenizer.json".into()))
    }

    /// Every hook point of this model in forward order (see `ModelConfig::hook_points`).
    pub fn hook_points(&self) -> Vec<HookPoint> {
        self.cfg.hook_points()
    }

    /// Parses a TransformerLens hook name and checks that this model has it.
    pub fn hook_point(&self, name: &str) -> Result<HookPoint> {
        self.cfg.hook_point(name)
    }

    /// The shape of `point`'s activation for a [batch, seq] input.
    pub fn hook_shape(&self, point: HookPoint, batch: i64, seq: i64) -> Vec<i64> {
        self.cfg.hook_shape(point, batch, seq)
    }
}

#[cfg(test)]
mod tests {
    use super::split_layers;
    use tch::Device;

    #[test]
    fn layers_split_into_contiguous_even_groups_in_device_order() {
        let (a, b, c) = (Device::Cuda(0), Device::Cuda(1), Device::Cpu);
        assert_eq!(split_layers(5, &[a, c]), [a, a, a, c, c]);
        assert_eq!(split_layers(6, &[a, b, c]), [a, a, b, b, c, c]);
        assert_eq!(split_layers(2, &[a, b, c]), [a, b]);
        assert_eq!(split_layers(3, &[a]), [a, a, a]);
    }
}
