//! Golden Parquet comparison. Rows are matched by their keys (every string and integer column:
//! run, kind, hook, layer, head, pos, prompt, label, …); float columns must agree within
//! atol + rtol·|golden|, boolean columns exactly. Any table tl-run writes can be compared, so a
//! new column needs no change here.
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type, UInt32Type, UInt64Type};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::error::{Error, Result};

/// A Parquet table as keyed rows.
#[derive(Debug, Default)]
pub struct KeyedTable {
    pub key_columns: Vec<String>,
    pub float_columns: Vec<String>,
    pub exact_columns: Vec<String>,
    /// key → (float values in float_columns order, exact values in exact_columns order).
    pub rows: BTreeMap<String, (Vec<Option<f64>>, Vec<Option<bool>>)>,
}

enum Col {
    Key,
    Float,
    Exact,
    Unsupported,
}

fn col_kind(t: &DataType) -> Col {
    match t {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64 | DataType::UInt32 | DataType::UInt64 => Col::Key,
        DataType::Float32 | DataType::Float64 => Col::Float,
        DataType::Boolean => Col::Exact,
        _ => Col::Unsupported,
    }
}

fn key_value(a: &dyn Array, i: usize) -> Option<String> {
    if a.is_null(i) {
        return None;
    }
    Some(match a.data_type() {
        DataType::Utf8 => a.as_string::<i32>().value(i).to_string(),
        DataType::LargeUtf8 => a.as_string::<i64>().value(i).to_string(),
        DataType::Int8 => a.as_primitive::<Int8Type>().value(i).to_string(),
        DataType::Int16 => a.as_primitive::<Int16Type>().value(i).to_string(),
        DataType::Int32 => a.as_primitive::<Int32Type>().value(i).to_string(),
        DataType::Int64 => a.as_primitive::<Int64Type>().value(i).to_string(),
        DataType::UInt32 => a.as_primitive::<UInt32Type>().value(i).to_string(),
        DataType::UInt64 => a.as_primitive::<UInt64Type>().value(i).to_string(),
        _ => return None,
    })
}

fn float_value(a: &dyn Array, i: usize) -> Option<f64> {
    if a.is_null(i) {
        return None;
    }
    match a.data_type() {
        DataType::Float32 => Some(a.as_primitive::<Float32Type>().value(i) as f64),
        DataType::Float64 => Some(a.as_primitive::<Float64Type>().value(i)),
        _ => None,
    }
}

impl KeyedTable {
    pub fn read(path: &Path) -> Result<KeyedTable> {
        let pq = |e: &dyn std::fmt::Display| Error::Other(format!("{}: {e}", path.display()));
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| pq(&e))?.build().map_err(|e| pq(&e))?;
        let mut t = KeyedTable::default();
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for batch in reader {
            let batch = batch.map_err(|e| pq(&e))?;
            let schema = batch.schema();
            let (mut keys, mut floats, mut exact) = (Vec::new(), Vec::new(), Vec::new());
            for (j, f) in schema.fields().iter().enumerate() {
                match col_kind(f.data_type()) {
                    Col::Key => keys.push((f.name().clone(), j)),
                    Col::Float => floats.push((f.name().clone(), j)),
                    Col::Exact => exact.push((f.name().clone(), j)),
                    Col::Unsupported => return Err(pq(&format!("column '{}' has type {}, which goldens cannot compare", f.name(), f.data_type()))),
                }
            }
            t.key_columns = keys.iter().map(|k| k.0.clone()).collect();
            t.float_columns = floats.iter().map(|k| k.0.clone()).collect();
            t.exact_columns = exact.iter().map(|k| k.0.clone()).collect();
            for i in 0..batch.num_rows() {
                let mut key = keys
                    .iter()
                    .filter_map(|(n, j)| key_value(batch.column(*j).as_ref(), i).map(|v| format!("{n}={v}")))
                    .collect::<Vec<_>>()
                    .join(" ");
                // Rows with equal keys are matched in the order written.
                let count = seen.entry(key.clone()).or_insert(0);
                *count += 1;
                if *count > 1 {
                    key = format!("{key} #{count}");
                }
                let f = floats.iter().map(|(_, j)| float_value(batch.column(*j).as_ref(), i)).collect();
                let e = exact
                    .iter()
                    .map(|(_, j)| {
                        let a = batch.column(*j);
                        (!a.is_null(i)).then(|| a.as_boolean().value(i))
                    })
                    .collect();
                t.rows.insert(key, (f, e));
            }
        }
        Ok(t)
    }
}

/// A float column's agreement.
#[derive(Debug, Clone)]
pub struct ColumnDiff {
    pub column: String,
    pub max_abs_diff: f64,
    /// Rows outside tolerance (keys, ours, golden), worst first.
    pub outside: Vec<(String, Option<f64>, Option<f64>)>,
}

#[derive(Debug, Clone, Default)]
pub struct TableDiff {
    pub missing: Vec<String>,
    pub extra: Vec<String>,
    pub floats: Vec<ColumnDiff>,
    /// Boolean columns: (column, rows that differ).
    pub exact: Vec<(String, Vec<String>)>,
    /// Columns only one side has.
    pub schema: Vec<String>,
}

fn same(a: Option<f64>, b: Option<f64>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(x), Some(y)) => x == y || (x.is_nan() && y.is_nan()),
        _ => false,
    }
}

/// Compares `ours` with `golden`.
pub fn diff(ours: &KeyedTable, golden: &KeyedTable, atol: f64, rtol: f64) -> TableDiff {
    let mut d = TableDiff::default();
    let set = |v: &[String]| v.iter().cloned().collect::<BTreeSet<_>>();
    for (what, a, b) in [("key", &ours.key_columns, &golden.key_columns), ("float", &ours.float_columns, &golden.float_columns), ("boolean", &ours.exact_columns, &golden.exact_columns)] {
        for c in set(a).symmetric_difference(&set(b)) {
            let side = if a.contains(c) { "ours only" } else { "golden only" };
            d.schema.push(format!("{what} column '{c}' ({side})"));
        }
    }
    if !d.schema.is_empty() {
        return d;
    }
    d.missing = golden.rows.keys().filter(|k| !ours.rows.contains_key(*k)).cloned().collect();
    d.extra = ours.rows.keys().filter(|k| !golden.rows.contains_key(*k)).cloned().collect();
    for (j, c) in golden.float_columns.iter().enumerate() {
        let jo = ours.float_columns.iter().position(|x| x == c).unwrap_or(j);
        let mut col = ColumnDiff { column: c.clone(), max_abs_diff: 0.0, outside: Vec::new() };
        let mut worst: Vec<(f64, String, Option<f64>, Option<f64>)> = Vec::new();
        for (k, (gf, _)) in &golden.rows {
            let Some((of, _)) = ours.rows.get(k) else { continue };
            let (o, g) = (of[jo], gf[j]);
            if same(o, g) {
                continue;
            }
            let dist = match (o, g) {
                (Some(x), Some(y)) => (x - y).abs(),
                _ => f64::INFINITY,
            };
            let dist = if dist.is_nan() { f64::INFINITY } else { dist };
            col.max_abs_diff = col.max_abs_diff.max(dist);
            if !(dist <= atol + rtol * g.map(f64::abs).unwrap_or(0.0)) {
                worst.push((dist, k.clone(), o, g));
            }
        }
        worst.sort_by(|a, b| b.0.total_cmp(&a.0));
        col.outside = worst.into_iter().map(|(_, k, o, g)| (k, o, g)).collect();
        d.floats.push(col);
    }
    for (j, c) in golden.exact_columns.iter().enumerate() {
        let jo = ours.exact_columns.iter().position(|x| x == c).unwrap_or(j);
        let bad: Vec<String> = golden.rows.iter().filter(|(k, (_, ge))| ours.rows.get(*k).is_some_and(|(_, oe)| oe[jo] != ge[j])).map(|(k, _)| k.clone()).collect();
        d.exact.push((c.clone(), bad));
    }
    d
}
