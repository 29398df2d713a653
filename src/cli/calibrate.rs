//! `plan`'s time estimate: the plan's work is counted in layer-rows (rows of a batch times the
//! layers they pass through, as the shards are balanced by). The seconds a layer-row takes come
//! from the output directory's last run (its manifest's job times, matched to this plan's jobs by
//! key) or, with `--estimate`, from one forward of the spec's clean prompts on its device, timed
//! after a warm-up (which loads the weights: a plan is otherwise weight-free).
use anyhow::Result;
use tch::Tensor;
use tl_run::kinds::Spec;
use tl_run::model::Described;
use tl_run::{Hooks, Input, LoadOptions, Model, Stop};

/// Seconds per layer-row on the spec's device, and what was timed.
pub struct Calibration {
    pub seconds_per_layer_row: f64,
    pub what: String,
}

/// The rate of the run stored in `output_dir`: its jobs' seconds over their cost in `plan`.
pub fn from_store(output_dir: &std::path::Path, plan: &tl_run::graph::Plan) -> Option<Calibration> {
    let text = std::fs::read_to_string(output_dir.join("manifest.json")).ok()?;
    let manifest: serde_json::Value = serde_json::from_str(&text).ok()?;
    let (mut seconds, mut cost) = (0.0, 0.0);
    for job in manifest["jobs"].as_array()?.iter().filter(|j| j["status"] == "ran") {
        // By key, else by name (a rebuilt binary keys its jobs anew; their work is the same).
        let same_key = |p: &&tl_run::graph::Job| p.key.is_some() && p.key.as_deref() == job["key"].as_str();
        let same_name = |p: &&tl_run::graph::Job| Some(p.name.as_str()) == job["name"].as_str();
        let Some(planned) = plan.jobs.iter().find(same_key).or_else(|| plan.jobs.iter().find(same_name)) else {
            continue;
        };
        seconds += job["seconds"].as_f64().unwrap_or(0.0);
        cost += planned.cost;
    }
    (cost > 0.0 && seconds > 0.0).then(|| Calibration {
        seconds_per_layer_row: seconds / cost,
        what: format!("at the rate of the jobs last run in {}", output_dir.display()),
    })
}

/// Times a forward of `tokens` (the clean prompts; a 32-token row when the spec has none).
pub fn calibrate(spec: &Spec, described: &Described, tokens: Option<(Tensor, Option<Tensor>)>) -> Result<Calibration> {
    let device = tl_run::engine::device::parse(&spec.model.device)?;
    let opts = LoadOptions {
        revision: spec.model.revision.clone(),
        processing: spec.model.processing,
        device,
        kind: spec.model.kind()?,
        split: Vec::new(),
        attention: spec.model.attention,
    };
    let loading = std::time::Instant::now();
    let model = Model::load_described(described, &opts)?;
    let load_s = loading.elapsed().as_secs_f64();
    let (tokens, mask) = tokens.unwrap_or_else(|| {
        (Tensor::zeros([1, 32.min(model.cfg.n_ctx as i64)], (tch::Kind::Int64, tch::Device::Cpu)), None)
    });
    let (tokens, mask) = (tokens.to_device(model.device), mask.map(|m| m.to_device(model.device)));
    let forward = || -> Result<f64> {
        let t = std::time::Instant::now();
        let _ = tch::no_grad(|| model.run(Input::Tokens(&tokens), mask.as_ref(), &mut Hooks::new(), Stop::FinalNorm))?;
        if let tch::Device::Cuda(i) = model.device {
            tch::Cuda::synchronize(i as i64);
        }
        Ok(t.elapsed().as_secs_f64())
    };
    forward()?; // warm-up: allocator, kernels, caches
    let seconds = forward()?;
    let (rows, seq) = (tokens.size()[0], tokens.size()[1]);
    Ok(Calibration {
        seconds_per_layer_row: seconds / (rows as f64 * model.cfg.n_layers as f64),
        what: format!(
            "a forward of {rows} rows × {seq} tokens took {seconds:.3} s on {} after a {load_s:.1} s load",
            spec.model.device
        ),
    })
}
