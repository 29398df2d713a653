//! Helpers shared by the integration tests: where fixtures and TransformerLens oracle outputs
//! live, reading them, and comparisons that print which hook differed and by how much.
#![allow(dead_code)]
use std::collections::HashMap;
use std::path::PathBuf;

use tch::Tensor;
use tl_run::model::config::Processing;
use tl_run::{LoadOptions, Model};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A fixture model directory; stories260K is the real trained model in ../shared.
pub fn fixture(name: &str) -> PathBuf {
    let p = if name == "stories260K" { repo_root().join("../shared/models/stories260K") } else { repo_root().join("fixtures").join(name) };
    assert!(
        p.join("config.json").is_file(),
        "fixture {} is missing: run `scripts/test.sh` (it builds fixtures and TransformerLens outputs)",
        p.display()
    );
    p
}

pub fn oracle_file(fixture: &str, file: &str) -> PathBuf {
    let p = repo_root().join("fixtures/oracle").join(fixture).join(file);
    assert!(p.is_file(), "TransformerLens output {} is missing: run `scripts/test.sh`", p.display());
    p
}

pub struct Oracle {
    pub tensors: HashMap<String, Tensor>,
    pub metadata: HashMap<String, String>,
}

impl Oracle {
    pub fn read(fixture: &str, file: &str) -> Oracle {
        let path = oracle_file(fixture, file);
        let tensors = Tensor::read_safetensors(&path).expect("read oracle").into_iter().collect();
        let bytes = std::fs::read(&path).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).expect("oracle metadata");
        Oracle { tensors, metadata: meta.metadata().clone().unwrap_or_default() }
    }

    pub fn get(&self, key: &str) -> &Tensor {
        self.tensors.get(key).unwrap_or_else(|| panic!("oracle has no '{key}'"))
    }

    pub fn prompts(&self) -> Vec<String> {
        self.metadata.get("prompts").map(|p| serde_json::from_str(p).unwrap()).unwrap_or_default()
    }
}

pub fn load(fixture_name: &str, processing: Processing) -> Model {
    let opts = LoadOptions { processing, ..LoadOptions::default() };
    Model::load(fixture(fixture_name).to_str().unwrap(), &opts).unwrap_or_else(|e| panic!("loading {fixture_name}: {e}"))
}

/// Max |a - b|, where equal infinities (masked attention scores) count as equal.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    let a = a.detach().to_kind(tch::Kind::Double);
    let b = b.detach().to_kind(tch::Kind::Double);
    let same_inf = a.isinf().logical_and(&b.isinf()).logical_and(&a.eq_tensor(&b));
    let diff = (&a - &b).abs().masked_fill(&same_inf, 0.0);
    if diff.numel() == 0 {
        return 0.0;
    }
    let d = diff.max().double_value(&[]);
    if d.is_nan() {
        f64::INFINITY
    } else {
        d
    }
}

/// log-softmax over the vocabulary: equal between processed and unprocessed models, since
/// center_unembed shifts each position's logits by a constant.
pub fn log_softmax(t: &Tensor) -> Tensor {
    t.log_softmax(-1, tch::Kind::Float)
}
