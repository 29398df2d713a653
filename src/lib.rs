//! tl-run: mechanistic-interpretability experiments on transformer language models, numerically
//! equal to TransformerLens. The binary is a thin layer over this library.
pub mod analysis;
pub mod check;
pub mod engine;
pub mod error;
pub mod graph;
pub mod kinds;
pub mod model;
pub mod output;
pub mod panics;
pub mod report;
pub mod spec;

pub use engine::forward::{Input, Stop};
pub use engine::hooks::{Edit, Hooks, Intervention, Sel};
pub use error::{Error, Result};
pub use model::hook_point::{HookPoint, NormHook, Site};
pub use model::{LoadOptions, Model};
