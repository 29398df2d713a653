//! The model a plan runs on: loaded already (the regression gate), or loaded when the first job
//! that needs it runs, so a rerun whose jobs are all stored loads nothing.
use tch::Device;

use crate::error::{Error, Result};
use crate::graph::devices;
use crate::model::config::ModelConfig;
use crate::model::source::ModelFiles;
use crate::model::tokenize::TextTokenizer;
use crate::model::Model;

/// The model a plan runs on: already loaded, or loaded when the first job that needs it runs
/// (a rerun whose jobs are all stored loads nothing).
pub enum ModelSource<'a> {
    Loaded(&'a Model),
    Lazy {
        cfg: &'a ModelConfig,
        tokenizer: Option<&'a TextTokenizer>,
        files: Option<&'a ModelFiles>,
        device: Device,
        load: Box<devices::Loader<'a>>,
    },
}

impl ModelSource<'_> {
    pub(crate) fn cfg(&self) -> &ModelConfig {
        match self {
            ModelSource::Loaded(m) => &m.cfg,
            ModelSource::Lazy { cfg, .. } => cfg,
        }
    }
    pub(crate) fn tokenizer(&self) -> Result<&TextTokenizer> {
        match self {
            ModelSource::Loaded(m) => m.tokenizer(),
            ModelSource::Lazy { tokenizer, .. } => {
                tokenizer.ok_or_else(|| Error::Tokenizer("this model has no tokenizer.json".into()))
            }
        }
    }
    pub(crate) fn files(&self) -> Option<&ModelFiles> {
        match self {
            ModelSource::Loaded(m) => m.files.as_ref(),
            ModelSource::Lazy { files, .. } => *files,
        }
    }
}
