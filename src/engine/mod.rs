//! Running models: the hooked forward pass, interventions and captures, tokenization.
pub mod device;
pub mod forward;
pub mod hooks;
pub mod memory;
pub mod metric;
pub mod nonfinite;
pub mod tokenize;
pub mod warm;
