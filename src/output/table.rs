//! The tidy long-format result table: one row per measured value, written as Parquet.
use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, Float64Array, Int32Array, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;

use crate::error::{Error, Result};
use crate::output::atomic;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Row {
    pub run: String,
    pub kind: String,
    /// Full TransformerLens hook name, e.g. "blocks.3.attn.hook_z".
    pub hook: String,
    pub layer: Option<i32>,
    pub head: Option<i32>,
    pub pos: Option<i32>,
    pub dest_pos: Option<i32>,
    pub src_pos: Option<i32>,
    /// None = mean over prompts.
    pub prompt: Option<i32>,
    pub value: f64,
    /// The token at `pos` (or `dest_pos`).
    pub token: Option<String>,
    /// False for cells filled without a forward pass because they provably cannot change.
    pub computed: bool,
    /// What a cache-analysis row measures: TransformerLens's labels ("3_pre", "final_post",
    /// "embed", "2_attn_out", "L1H4", "L0N17").
    pub label: Option<String>,
    pub neuron: Option<i32>,
    /// Top-k rows of the logit lens: 0-based rank, with the token id (value = probability).
    pub rank: Option<i32>,
    pub token_id: Option<i32>,
    /// head_scores: the detection pattern scored.
    pub pattern: Option<String>,
    /// attribution_patching with verify_top: the real activation-patching change of the metric
    /// for this cell (same units as `value`).
    pub patched: Option<f64>,
}

pub fn schema() -> Schema {
    let i = |n: &str| Field::new(n, DataType::Int32, true);
    Schema::new(vec![
        Field::new("run", DataType::Utf8, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("hook", DataType::Utf8, false),
        i("layer"),
        i("head"),
        i("pos"),
        i("dest_pos"),
        i("src_pos"),
        i("prompt"),
        Field::new("value", DataType::Float64, false),
        Field::new("token", DataType::Utf8, true),
        Field::new("computed", DataType::Boolean, false),
        Field::new("label", DataType::Utf8, true),
        i("neuron"),
        i("rank"),
        i("token_id"),
        Field::new("pattern", DataType::Utf8, true),
        Field::new("patched", DataType::Float64, true),
    ])
}

pub fn to_batch(rows: &[Row]) -> Result<RecordBatch> {
    let s = |f: fn(&Row) -> &str| Arc::new(StringArray::from_iter_values(rows.iter().map(f))) as ArrayRef;
    let i = |f: fn(&Row) -> Option<i32>| Arc::new(Int32Array::from_iter(rows.iter().map(f))) as ArrayRef;
    let columns: Vec<ArrayRef> = vec![
        s(|r| &r.run),
        s(|r| &r.kind),
        s(|r| &r.hook),
        i(|r| r.layer),
        i(|r| r.head),
        i(|r| r.pos),
        i(|r| r.dest_pos),
        i(|r| r.src_pos),
        i(|r| r.prompt),
        Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.value))),
        Arc::new(StringArray::from_iter(rows.iter().map(|r| r.token.as_deref()))),
        Arc::new(BooleanArray::from_iter(rows.iter().map(|r| Some(r.computed)))),
        Arc::new(StringArray::from_iter(rows.iter().map(|r| r.label.as_deref()))),
        i(|r| r.neuron),
        i(|r| r.rank),
        i(|r| r.token_id),
        Arc::new(StringArray::from_iter(rows.iter().map(|r| r.pattern.as_deref()))),
        Arc::new(Float64Array::from_iter(rows.iter().map(|r| r.patched))),
    ];
    RecordBatch::try_new(Arc::new(schema()), columns).map_err(|e| Error::Other(format!("arrow: {e}")))
}

/// Writes rows to a Parquet file atomically.
pub fn write_parquet(path: &std::path::Path, rows: &[Row]) -> Result<()> {
    write_batch(path, &to_batch(rows)?)
}

/// Writes any record batch to a Parquet file atomically.
pub fn write_batch(path: &std::path::Path, batch: &RecordBatch) -> Result<()> {
    let pq = |e: &dyn std::fmt::Display| Error::Other(format!("parquet {}: {e}", path.display()));
    let mut buf = Vec::new();
    {
        let mut w = ArrowWriter::try_new(&mut buf, batch.schema(), None).map_err(|e| pq(&e))?;
        w.write(batch).map_err(|e| pq(&e))?;
        w.close().map_err(|e| pq(&e))?;
    }
    atomic::write_bytes(path, &buf)
}
