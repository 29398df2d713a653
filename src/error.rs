//! Typed errors of the library. Every message is meant for a person: it names what was wrong,
//! where it was looked for, and what would be valid.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(String),

    #[error("cannot load model '{id}': {reason}")]
    Load { id: String, reason: String },

    // Not named `source`: thiserror would then chain it, and `{:#}` would print it twice.
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },

    #[error("unknown hook point '{name}'{}", suggest(.suggestions))]
    UnknownHook { name: String, suggestions: Vec<String> },

    #[error("hook point '{name}' does not exist in this model: {why}")]
    AbsentHook { name: String, why: String },

    #[error("intervention at '{hook}': {reason}")]
    Intervention { hook: String, reason: String },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),

    #[error("{0}")]
    Other(String),
}

fn suggest(names: &[String]) -> String {
    if names.is_empty() {
        String::new()
    } else {
        format!(" (did you mean {}?)", names.iter().map(|n| format!("'{n}'")).collect::<Vec<_>>().join(", "))
    }
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), err: source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Whether an error (or a caught libtorch panic's message) is a failed allocation.
pub fn is_out_of_memory(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("out of memory") || m.contains("can't allocate memory") || m.contains("not enough memory")
}
