//! Experiment kinds, one file each. Each takes prepared runs (tokens, caches, metric) and
//! returns tidy rows; the job graph decides what is shared between runs.
pub mod ablation;
pub mod activation_patching;
pub mod attribution;
pub mod cache_analysis;
pub mod context;
pub mod head_scores;
pub mod inputs;
pub mod kinds;
pub mod prepared;

/// The mean of per-prompt values (0 for none).
pub(crate) fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}
