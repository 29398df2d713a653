//! Experiment specs: the TOML a researcher writes (raw.rs), resolved into a checked plan
//! (resolve.rs; prompts and corruption in corruption.rs; each [[run]] by its kind, crate::kinds,
//! through the `RunKinds` it is handed) with every problem
//! reported at once, each pointing at its line and key.
pub mod corruption;
pub mod prompts;
pub mod raw;
pub mod resolve;
pub mod templates;

pub use corruption::Corruption;
pub use resolve::{MetricSpec, ModelSpec, Reads, Run, RunKinds, Spec};

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

impl SpecErrors {
    /// A spec or zoo file that cannot be read: one problem of the file as a whole, with no line,
    /// column or key (line 0 prints without them).
    pub fn unreadable(file: &str, e: &std::io::Error) -> SpecErrors {
        SpecErrors {
            file: file.to_string(),
            diagnostics: vec![Diagnostic {
                line: 0,
                col: 0,
                key: String::new(),
                message: format!("cannot read it: {e}"),
            }],
        }
    }
}

impl std::fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.diagnostics.len();
        writeln!(f, "{n} problem{} in {}:", if n == 1 { "" } else { "s" }, self.file)?;
        for d in &self.diagnostics {
            match d.line {
                0 => writeln!(f, "  {}: {}", self.file, d.message)?,
                _ => writeln!(f, "  {}:{}:{}: {}: {}", self.file, d.line, d.col, d.key, d.message)?,
            }
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

/// A TOML syntax or type error as a diagnostic, always with a line and a message (toml gives an
/// empty message for some syntax errors, e.g. a key with no value at the end of the file).
pub fn toml_diagnostic(text: &str, e: &toml::de::Error) -> Diagnostic {
    let (line, col) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
    let mut message = e.message().trim().to_string();
    if message.is_empty() {
        message = e.to_string().lines().next().unwrap_or("").trim().to_string();
    }
    if message.is_empty() || message.starts_with("TOML parse error") {
        message = "invalid TOML here: a value, key, quote or bracket is missing or malformed".into();
    }
    Diagnostic { line: line.max(1), col, key: "toml".into(), message }
}
