//! Golden Parquet comparison. Rows are matched by their keys (every string and integer column:
//! run, kind, hook, layer, head, pos, prompt, label, …); float columns must agree within
//! atol + rtol·|golden|, boolean columns exactly. Any table tl-run writes can be compared, so a
//! new column needs no change here. One rule knows a column's meaning: `patched` is there only
//! for the cells a top-k of |value| chose (`SELECTED_BY_VALUE`), so which cells those are may
//! differ at the cut when the values agree within tolerance.
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{
    DataType, Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type, UInt32Type, UInt64Type,
};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::error::{Error, Result};

/// One row's values: its float columns, then its exact (boolean) columns, each in column order.
pub type RowValues = (Vec<Option<f64>>, Vec<Option<bool>>);

/// A Parquet table as keyed rows.
#[derive(Debug, Default)]
pub struct KeyedTable {
    pub key_columns: Vec<String>,
    pub float_columns: Vec<String>,
    pub exact_columns: Vec<String>,
    /// key → (float values in float_columns order, exact values in exact_columns order).
    pub rows: BTreeMap<String, RowValues>,
    /// key → the rows one top-k selection ranks together (`selection_group`).
    pub groups: BTreeMap<String, String>,
    /// Columns with a value in some row (a column added after a golden was written compares
    /// as absent where it is empty, as it is in every row of the kinds that do not fill it).
    pub filled_columns: BTreeSet<String>,
}

/// Float columns with a value only in the rows a top-k of |value| selected within their group:
/// attribution's `patched`, the real patching of each target's `verify_top` cells.
pub const SELECTED_BY_VALUE: &[&str] = &["patched"];

/// The rows a `verify_top` selection ranks together: one run's target (its hook without the
/// layer) and prompt (or the mean over prompts).
fn selection_group(run: Option<&str>, hook: Option<&str>, prompt: Option<&str>) -> String {
    let target = hook.map(|h| match h.strip_prefix("blocks.").and_then(|rest| rest.split_once('.')) {
        Some((layer, site)) if layer.chars().all(|c| c.is_ascii_digit()) => site,
        _ => h,
    });
    format!("{}|{}|{}", run.unwrap_or(""), target.unwrap_or(""), prompt.unwrap_or("mean"))
}

enum Col {
    Key,
    Float,
    Exact,
    Unsupported,
}

fn col_kind(t: &DataType) -> Col {
    match t {
        DataType::Utf8
        | DataType::LargeUtf8
        | DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::UInt32
        | DataType::UInt64 => Col::Key,
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
                    Col::Unsupported => {
                        return Err(pq(&format!(
                            "column '{}' has type {}, which goldens cannot compare",
                            f.name(),
                            f.data_type()
                        )))
                    }
                }
            }
            t.key_columns = keys.iter().map(|k| k.0.clone()).collect();
            t.float_columns = floats.iter().map(|k| k.0.clone()).collect();
            t.exact_columns = exact.iter().map(|k| k.0.clone()).collect();
            for (j, f) in schema.fields().iter().enumerate() {
                if batch.column(j).null_count() < batch.num_rows() {
                    t.filled_columns.insert(f.name().clone());
                }
            }
            let column = |name: &str| keys.iter().find(|(n, _)| n == name).map(|(_, j)| batch.column(*j).as_ref());
            let (run, hook, prompt) = (column("run"), column("hook"), column("prompt"));
            for i in 0..batch.num_rows() {
                let at = |a: Option<&dyn Array>| a.and_then(|a| key_value(a, i));
                let group = selection_group(at(run).as_deref(), at(hook).as_deref(), at(prompt).as_deref());
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
                t.groups.insert(key.clone(), group);
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

/// For a column in `SELECTED_BY_VALUE`: per selection group, the smallest |value| among the rows
/// the column has a value in (the selection's cut).
fn selection_cuts(t: &KeyedTable, column: usize, value: usize) -> BTreeMap<&str, f64> {
    let mut cuts: BTreeMap<&str, f64> = BTreeMap::new();
    for (k, (f, _)) in &t.rows {
        if let (Some(_), Some(v), Some(g)) = (f[column], f[value], t.groups.get(k)) {
            let cut = cuts.entry(g.as_str()).or_insert(f64::INFINITY);
            *cut = cut.min(v.abs());
        }
    }
    cuts
}

/// Whether a row that one side selected and `lacking` did not was within tolerance of
/// `lacking`'s cut: its |value| there within atol + rtol·cut of the smallest selected.
fn near_the_cut(
    lacking: &KeyedTable,
    cuts: &BTreeMap<&str, f64>,
    key: &str,
    value: usize,
    atol: f64,
    rtol: f64,
) -> bool {
    let (Some((f, _)), Some(group)) = (lacking.rows.get(key), lacking.groups.get(key)) else { return false };
    match (f[value], cuts.get(group.as_str())) {
        (Some(v), Some(&cut)) => (cut - v.abs()).abs() <= atol + rtol * cut,
        _ => false,
    }
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
    for (what, a, b) in [
        ("key", &ours.key_columns, &golden.key_columns),
        ("float", &ours.float_columns, &golden.float_columns),
        ("boolean", &ours.exact_columns, &golden.exact_columns),
    ] {
        for c in set(a).symmetric_difference(&set(b)) {
            if a.contains(c) && !ours.filled_columns.contains(c) {
                continue;
            }
            let side = if a.contains(c) { "ours only" } else { "golden only" };
            d.schema.push(format!("{what} column '{c}' ({side})"));
        }
    }
    if !d.schema.is_empty() {
        return d;
    }
    d.missing = golden.rows.keys().filter(|k| !ours.rows.contains_key(*k)).cloned().collect();
    d.extra = ours.rows.keys().filter(|k| !golden.rows.contains_key(*k)).cloned().collect();
    let value_at = |t: &KeyedTable| t.float_columns.iter().position(|x| x == "value");
    for (j, c) in golden.float_columns.iter().enumerate() {
        let jo = ours.float_columns.iter().position(|x| x == c).unwrap_or(j);
        let mut col = ColumnDiff { column: c.clone(), max_abs_diff: 0.0, outside: Vec::new() };
        let mut worst: Vec<(f64, String, Option<f64>, Option<f64>)> = Vec::new();
        // A selected column: a row one side selected is fine when the other side's value for it
        // was within tolerance of that side's cut (bf16's rounding reorders near-equal cells).
        let selection = match (SELECTED_BY_VALUE.contains(&c.as_str()), value_at(ours), value_at(golden)) {
            (true, Some(vo), Some(vg)) => Some((vo, vg, selection_cuts(ours, jo, vo), selection_cuts(golden, j, vg))),
            _ => None,
        };
        for (k, (gf, _)) in &golden.rows {
            let Some((of, _)) = ours.rows.get(k) else { continue };
            let (o, g) = (of[jo], gf[j]);
            if same(o, g) {
                continue;
            }
            if let Some((vo, vg, ours_cuts, golden_cuts)) = &selection {
                let chosen_differently = match (o, g) {
                    (Some(_), None) => near_the_cut(golden, golden_cuts, k, *vg, atol, rtol),
                    (None, Some(_)) => near_the_cut(ours, ours_cuts, k, *vo, atol, rtol),
                    _ => false,
                };
                if chosen_differently {
                    continue;
                }
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
        let bad: Vec<String> = golden
            .rows
            .iter()
            .filter(|(k, (_, ge))| ours.rows.get(*k).is_some_and(|(_, oe)| oe[jo] != ge[j]))
            .map(|(k, _)| k.clone())
            .collect();
        d.exact.push((c.clone(), bad));
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table of one attribution target's cells (value, patched) at layer 0, heads 0..n.
    fn table(cells: &[(f64, Option<f64>)]) -> KeyedTable {
        let mut t = KeyedTable {
            key_columns: vec!["run".into(), "hook".into(), "head".into()],
            float_columns: vec!["value".into(), "patched".into()],
            ..KeyedTable::default()
        };
        for (h, (v, p)) in cells.iter().enumerate() {
            let key = format!("run=a hook=blocks.0.attn.hook_z head={h}");
            t.groups.insert(key.clone(), selection_group(Some("a"), Some("blocks.0.attn.hook_z"), None));
            t.rows.insert(key, (vec![Some(*v), *p], vec![]));
        }
        t
    }

    /// Rows of `patched` outside tolerance.
    fn outside(ours: &KeyedTable, golden: &KeyedTable, atol: f64) -> usize {
        diff(ours, golden, atol, 0.0).floats.iter().filter(|c| c.column == "patched").map(|c| c.outside.len()).sum()
    }

    #[test]
    fn cells_selected_differently_at_the_cut_pass_within_tolerance_only() {
        // The golden verified heads 0 and 1 (|0.30|, |0.20|); head 2's estimate was 0.19.
        let golden = table(&[(0.30, Some(0.5)), (-0.20, Some(0.4)), (0.19, None), (0.01, None)]);
        // Ours: head 2's estimate moved to 0.21 and took head 1's place.
        let ours = table(&[(0.30, Some(0.5)), (-0.20, None), (0.21, Some(0.3)), (0.01, None)]);
        // Head 2 was 0.01 below the golden's cut, head 1 0.01 below ours.
        assert_eq!(outside(&ours, &golden, 0.02), 0);
        assert_eq!(outside(&ours, &golden, 0.005), 2, "beyond tolerance of the cut, both differences fail");
        // A cell far below the cut verified in place of one at it fails whatever the values do.
        let ours = table(&[(0.30, Some(0.5)), (-0.20, None), (0.19, None), (0.01, Some(0.0))]);
        assert_eq!(outside(&ours, &golden, 0.02), 2);
        // Nothing verified at all is not a different choice.
        let ours = table(&[(0.30, None), (-0.20, None), (0.19, None), (0.01, None)]);
        assert_eq!(outside(&ours, &golden, 0.02), 2);
        // A verified value itself is held to the tolerance as before.
        let ours = table(&[(0.30, Some(0.5)), (-0.20, Some(0.45)), (0.19, None), (0.01, None)]);
        assert_eq!(outside(&ours, &golden, 0.02), 1);
    }

    #[test]
    fn selection_groups_are_a_runs_target_and_prompt() {
        assert_eq!(
            selection_group(Some("r"), Some("blocks.11.attn.hook_q"), None),
            selection_group(Some("r"), Some("blocks.0.attn.hook_q"), None)
        );
        assert_ne!(
            selection_group(Some("r"), Some("blocks.0.attn.hook_q"), None),
            selection_group(Some("r"), Some("blocks.0.attn.hook_k"), None)
        );
        assert_ne!(
            selection_group(Some("r"), Some("blocks.0.attn.hook_q"), Some("1")),
            selection_group(Some("r"), Some("blocks.0.attn.hook_q"), None)
        );
        assert_eq!(selection_group(None, Some("hook_embed"), None), "|hook_embed|mean");
    }
}
