//! The tidy long-format result table: one row per measured value, written as Parquet.
use std::borrow::Borrow;
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
    /// The prompt role a cell patches ("S2", "END", "subject_last"): its position in each prompt
    /// (`pos` on per-prompt rows).
    pub role: Option<String>,
    /// ablation: the unit (or units, joined by "+") ablated, as TransformerLens names them
    /// ("L1H4", "L0N17", "L2 attn_out").
    pub unit: Option<String>,
    /// edge_attribution: the edge's sender ("input", "a3.h1", "m4") with its layer and head, its
    /// receiver ("a5.h2<q>", "m6", "logits"; its layer and head are `layer` and `head`) and the
    /// input it reaches ("q", "k", "v", "mlp", "logits").
    pub sender: Option<String>,
    pub sender_layer: Option<i32>,
    pub sender_head: Option<i32>,
    pub receiver: Option<String>,
    pub input: Option<String>,
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
        Field::new("role", DataType::Utf8, true),
        Field::new("unit", DataType::Utf8, true),
        Field::new("sender", DataType::Utf8, true),
        i("sender_layer"),
        i("sender_head"),
        Field::new("receiver", DataType::Utf8, true),
        Field::new("input", DataType::Utf8, true),
    ])
}

/// The rows as one record batch. Rows are borrowed (`Row` or `&Row`): the rows of a run's jobs
/// are written without being copied, which for a pattern target was 230,000 rows of strings.
pub fn to_batch<R: Borrow<Row> + Sync>(rows: &[R]) -> Result<RecordBatch> {
    to_batch_as(rows, None)
}

/// `to_batch` with every row's `run` replaced by `run` when given. The columns are built on all
/// cores (each string column of a 230,000-row file took about 10 ms).
fn to_batch_as<R: Borrow<Row> + Sync>(rows: &[R], run: Option<&str>) -> Result<RecordBatch> {
    use rayon::prelude::*;
    type Column<'a> = Box<dyn Fn() -> ArrayRef + Sync + 'a>;
    let rows = || rows.iter().map(Borrow::borrow);
    let s =
        |f: fn(&Row) -> &str| -> Column { Box::new(move || Arc::new(StringArray::from_iter_values(rows().map(f)))) };
    let i = |f: fn(&Row) -> Option<i32>| -> Column { Box::new(move || Arc::new(Int32Array::from_iter(rows().map(f)))) };
    let opt_s =
        |f: fn(&Row) -> Option<&str>| -> Column { Box::new(move || Arc::new(StringArray::from_iter(rows().map(f)))) };
    // In the schema's order.
    let columns: Vec<Column> = vec![
        match run {
            Some(run) => Box::new(move || Arc::new(StringArray::from_iter_values(rows().map(|_| run)))),
            None => s(|r| &r.run),
        },
        s(|r| &r.kind),
        s(|r| &r.hook),
        i(|r| r.layer),
        i(|r| r.head),
        i(|r| r.pos),
        i(|r| r.dest_pos),
        i(|r| r.src_pos),
        i(|r| r.prompt),
        Box::new(move || Arc::new(Float64Array::from_iter_values(rows().map(|r| r.value)))),
        opt_s(|r| r.token.as_deref()),
        Box::new(move || Arc::new(BooleanArray::from_iter(rows().map(|r| Some(r.computed))))),
        opt_s(|r| r.label.as_deref()),
        i(|r| r.neuron),
        i(|r| r.rank),
        i(|r| r.token_id),
        opt_s(|r| r.pattern.as_deref()),
        Box::new(move || Arc::new(Float64Array::from_iter(rows().map(|r| r.patched)))),
        opt_s(|r| r.role.as_deref()),
        opt_s(|r| r.unit.as_deref()),
        opt_s(|r| r.sender.as_deref()),
        i(|r| r.sender_layer),
        i(|r| r.sender_head),
        opt_s(|r| r.receiver.as_deref()),
        opt_s(|r| r.input.as_deref()),
    ];
    let columns: Vec<ArrayRef> = columns.par_iter().map(|make| make()).collect();
    RecordBatch::try_new(Arc::new(schema()), columns).map_err(|e| Error::Other(format!("arrow: {e}")))
}

/// Writes rows to a Parquet file atomically.
pub fn write_parquet<R: Borrow<Row> + Sync>(path: &std::path::Path, rows: &[R]) -> Result<()> {
    write_batch(path, &to_batch(rows)?)
}

/// Writes rows atomically with key-value metadata in the file footer (the job store's notes),
/// each row's `run` written as `run` when given.
pub fn write_parquet_with<R: Borrow<Row> + Sync>(
    path: &std::path::Path,
    rows: &[R],
    run: Option<&str>,
    metadata: &[(&str, String)],
) -> Result<()> {
    let kv = metadata.iter().map(|(k, v)| parquet::file::metadata::KeyValue::new(k.to_string(), v.clone())).collect();
    let props = parquet::file::properties::WriterProperties::builder().set_key_value_metadata(Some(kv)).build();
    write_batch_with(path, &to_batch_as(rows, run)?, Some(props))
}

/// Writes any record batch to a Parquet file atomically.
pub fn write_batch(path: &std::path::Path, batch: &RecordBatch) -> Result<()> {
    write_batch_with(path, batch, None)
}

/// Encodes the batch's columns on all cores, row group by row group (the row groups and bytes
/// `ArrowWriter` would write serially), then writes the file atomically.
fn write_batch_with(
    path: &std::path::Path,
    batch: &RecordBatch,
    props: Option<parquet::file::properties::WriterProperties>,
) -> Result<()> {
    use parquet::arrow::arrow_writer::compute_leaves;
    use rayon::prelude::*;
    let pq = |e: &dyn std::fmt::Display| Error::Other(format!("parquet {}: {e}", path.display()));
    let props = props.unwrap_or_default();
    let group_rows = props.max_row_group_size().max(1);
    let mut buf = Vec::new();
    {
        // Made by ArrowWriter, so the file carries the Arrow schema in its metadata as before.
        let (mut file, groups) = ArrowWriter::try_new(&mut buf, batch.schema(), Some(props))
            .and_then(|w| w.into_serialized_writer())
            .map_err(|e| pq(&e))?;
        let schema = batch.schema();
        for (index, start) in (0..batch.num_rows()).step_by(group_rows).enumerate() {
            let group = batch.slice(start, group_rows.min(batch.num_rows() - start));
            let mut leaves = Vec::new();
            for (field, column) in schema.fields().iter().zip(group.columns()) {
                leaves.extend(compute_leaves(field, column).map_err(|e| pq(&e))?);
            }
            let writers = groups.create_column_writers(index).map_err(|e| pq(&e))?;
            if writers.len() != leaves.len() {
                return Err(pq(&format!("{} column writers for {} leaf columns", writers.len(), leaves.len())));
            }
            let chunks = writers
                .into_par_iter()
                .zip(leaves)
                .map(|(mut w, leaf)| {
                    w.write(&leaf)?;
                    w.close()
                })
                .collect::<parquet::errors::Result<Vec<_>>>()
                .map_err(|e| pq(&e))?;
            let mut row_group = file.next_row_group().map_err(|e| pq(&e))?;
            for chunk in chunks {
                chunk.append_to_row_group(&mut row_group).map_err(|e| pq(&e))?;
            }
            row_group.close().map_err(|e| pq(&e))?;
        }
        file.close().map_err(|e| pq(&e))?;
    }
    atomic::write_bytes(path, &buf)
}

/// Reads a file of result rows (any file `write_parquet` wrote) with its key-value metadata.
pub fn read_parquet(path: &std::path::Path) -> Result<(Vec<Row>, std::collections::HashMap<String, String>)> {
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Float64Type, Int32Type};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let pq = |e: &dyn std::fmt::Display| Error::Other(format!("parquet {}: {e}", path.display()));
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| pq(&e))?;
    let metadata = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .map(|kv| kv.iter().filter_map(|k| Some((k.key.clone(), k.value.clone()?))).collect())
        .unwrap_or_default();
    if builder.schema().fields() != schema().fields() {
        return Err(pq(&"not a tl-run result table (its columns differ)"));
    }
    let mut rows = Vec::new();
    for batch in builder.build().map_err(|e| pq(&e))? {
        let b = batch.map_err(|e| pq(&e))?;
        let col = |name: &str| b.column_by_name(name).expect("schema checked above");
        let s = |name: &str| col(name).as_string::<i32>().clone();
        let i = |name: &str| col(name).as_primitive::<Int32Type>().clone();
        let f = |name: &str| col(name).as_primitive::<Float64Type>().clone();
        let (run, kind, hook, token, label, pattern) =
            (s("run"), s("kind"), s("hook"), s("token"), s("label"), s("pattern"));
        let (role, unit) = (s("role"), s("unit"));
        let (sender, receiver, input) = (s("sender"), s("receiver"), s("input"));
        let (sender_layer, sender_head) = (i("sender_layer"), i("sender_head"));
        let (layer, head, pos, dest, src, prompt, neuron, rank, token_id) = (
            i("layer"),
            i("head"),
            i("pos"),
            i("dest_pos"),
            i("src_pos"),
            i("prompt"),
            i("neuron"),
            i("rank"),
            i("token_id"),
        );
        let (value, patched) = (f("value"), f("patched"));
        let computed = col("computed").as_boolean().clone();
        let oi = |a: &arrow::array::Int32Array, r: usize| a.is_valid(r).then(|| a.value(r));
        let os = |a: &arrow::array::StringArray, r: usize| a.is_valid(r).then(|| a.value(r).to_string());
        for r in 0..b.num_rows() {
            rows.push(Row {
                run: run.value(r).to_string(),
                kind: kind.value(r).to_string(),
                hook: hook.value(r).to_string(),
                layer: oi(&layer, r),
                head: oi(&head, r),
                pos: oi(&pos, r),
                dest_pos: oi(&dest, r),
                src_pos: oi(&src, r),
                prompt: oi(&prompt, r),
                value: value.value(r),
                token: os(&token, r),
                computed: computed.value(r),
                label: os(&label, r),
                neuron: oi(&neuron, r),
                rank: oi(&rank, r),
                token_id: oi(&token_id, r),
                pattern: os(&pattern, r),
                patched: patched.is_valid(r).then(|| patched.value(r)),
                role: os(&role, r),
                unit: os(&unit, r),
                sender: os(&sender, r),
                sender_layer: oi(&sender_layer, r),
                sender_head: oi(&sender_head, r),
                receiver: os(&receiver, r),
                input: os(&input, r),
            });
        }
    }
    Ok((rows, metadata))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: usize) -> Vec<Row> {
        (0..n)
            .map(|i| Row {
                run: "r".into(),
                kind: "attribution_patching".into(),
                hook: format!("blocks.{}.attn.hook_pattern", i / 100),
                layer: Some((i / 100) as i32),
                head: (i % 3 != 0).then_some((i % 4) as i32),
                value: i as f64 * 0.5 - 7.0,
                token: (i % 5 != 0).then(|| format!(" t{}", i % 7)),
                computed: i % 2 == 0,
                label: (i % 11 == 0).then(|| "L0H1".to_string()),
                patched: (i % 13 == 0).then_some(i as f64),
                ..Row::default()
            })
            .collect()
    }

    /// What `ArrowWriter` writes serially, for the same batch and properties.
    fn serial(batch: &RecordBatch, props: parquet::file::properties::WriterProperties) -> Vec<u8> {
        let mut buf = Vec::new();
        let mut w = ArrowWriter::try_new(&mut buf, batch.schema(), Some(props)).unwrap();
        w.write(batch).unwrap();
        w.close().unwrap();
        buf
    }

    #[test]
    fn columns_encoded_in_parallel_give_the_bytes_arrow_writer_gives() {
        let dir = std::env::temp_dir().join(format!("tl-run-table-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kv = || Some(vec![parquet::file::metadata::KeyValue::new("note".into(), "{}".to_string())]);
        // Several row groups (the last one short), one row group, and no rows at all.
        for (n, group_rows) in [(2500, 1000), (2500, 1 << 20), (0, 1000)] {
            let batch = to_batch(&rows(n)).unwrap();
            let props = || {
                parquet::file::properties::WriterProperties::builder()
                    .set_max_row_group_size(group_rows)
                    .set_key_value_metadata(kv())
                    .build()
            };
            let path = dir.join(format!("{n}-{group_rows}.parquet"));
            write_batch_with(&path, &batch, Some(props())).unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), serial(&batch, props()), "{n} rows in groups of {group_rows}");
            let (back, meta) = read_parquet(&path).unwrap();
            assert_eq!(back, rows(n));
            assert_eq!(meta.get("note").map(String::as_str), Some("{}"));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
