//! Experiment specs: the TOML a researcher writes (raw.rs), resolved into a checked plan
//! (resolve.rs) with every problem reported at once, each pointing at its line and key.
pub mod prompts;
pub mod raw;
pub mod resolve;
pub mod runs;

pub use resolve::{resolve_file, Corruption, MetricSpec, ModelSpec, RunKind, RunSpec, Spec};

/// One problem in a spec, located in the file.
#[derive(Debug, Clone)]
pub struct Diagnostic {
    pub line: usize,
    pub col: usize,
    pub key: String,
    pub message: String,
}

/// All the problems of one spec file.
#[derive(Debug)]
pub struct SpecErrors {
    pub file: String,
    pub diagnostics: Vec<Diagnostic>,
}

impl std::fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.diagnostics.len();
        writeln!(f, "{n} problem{} in {}:", if n == 1 { "" } else { "s" }, self.file)?;
        for d in &self.diagnostics {
            writeln!(f, "  {}:{}:{}: {}: {}", self.file, d.line, d.col, d.key, d.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for SpecErrors {}

/// 1-based line and column of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map(|i| offset - i).unwrap_or(offset + 1);
    (line, col)
}
