//! What the runs of a spec share, made once per spec and read by every kind's jobs: the tokenized
//! inputs and the clean + corrupted pass made from them (`inputs`; the pass itself is
//! analysis::clean_corrupted), and the context a job reads them through (`context`).
pub mod context;
pub mod inputs;
