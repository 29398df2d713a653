//! Experiment kinds, one file each. Each takes prepared runs (tokens, caches, metric) and
//! returns tidy rows; the job graph decides what is shared between runs.
pub mod activation_patching;
pub mod prepared;
pub mod cache_analysis;
pub mod head_scores;
pub mod attribution;
pub mod ablation;
