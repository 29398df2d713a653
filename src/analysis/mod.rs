//! The algorithms, each named for what it computes and equal to its TransformerLens counterpart:
//! `patching` (transformer_lens.patching), `attribution` (AtP and AtP*), `activation_cache`
//! (ActivationCache's accumulated_resid, decompose_resid, stack_head_results, logit lens, DLA),
//! `head_detector` (head_detector.py and the demo's attention stripes) and `ablation`. They take
//! tensors and a model and return numbers; they know nothing of specs, jobs or rows' files, and
//! import only engine and model (tests/layering.rs).
pub mod ablation;
pub mod activation_cache;
pub mod attribution;
pub mod circuits;
pub mod clean_corrupted;
pub mod edge_attribution;
pub mod head_detector;
pub mod patch_cells;
pub mod patching;

/// The mean of per-prompt values (0 for none).
pub(crate) fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}
