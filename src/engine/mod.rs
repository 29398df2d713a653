//! Running models: the hooked forward pass and its attention, interventions and captures, tokenization.
pub mod attention;
pub mod device;
pub mod forward;
pub mod hooks;
pub mod memory;
pub mod metric;
pub mod nonfinite;
pub mod positions;
pub mod warm;
