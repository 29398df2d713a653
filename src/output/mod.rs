//! Files tl-run writes. Every write goes to a temporary file beside the target and is renamed
//! into place, so a killed run never leaves a half-written output behind.
pub mod activations;
pub mod atomic;
pub mod figure;
pub mod json_table;
pub mod table;
pub mod token_label;
