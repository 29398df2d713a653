//! The gate's result rows, and the three ways they are shown: a table on stdout, `check.parquet`
//! and JUnit XML (which GitHub, GitLab and Jenkins render as test results).
use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, Float64Array, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;

use crate::error::{Error, Result};

/// One checked figure.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckRow {
    pub model: String,
    pub dtype: String,
    /// "load", "logits" or "golden:<spec>".
    pub check: String,
    pub figure: String,
    pub value: f64,
    /// The rule the value was held to ("≤ 1e-06", "= 0", "report only").
    pub tolerance: String,
    pub pass: bool,
    /// Why it failed: the offending rows with their keys, or the error.
    pub detail: String,
}

pub fn fmt_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == v.trunc() && v.abs() < 1e15 {
        format!("{v:.0}")
    } else if v.abs() >= 1e-3 && v.abs() < 1e4 {
        format!("{v:.6}")
    } else {
        // 1e-4 rather than 1.000e-4.
        let s = format!("{v:.3e}");
        match s.split_once('e') {
            Some((m, e)) if m.contains('.') => format!("{}e{e}", m.trim_end_matches('0').trim_end_matches('.')),
            _ => s,
        }
    }
}

/// A tolerance as written: 0.5, not 0.500000.
pub fn fmt_tol(v: f64) -> String {
    let s = fmt_value(v);
    if s.contains('.') && !s.contains('e') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// The summary table, failures' details after it.
pub fn render(rows: &[CheckRow]) -> String {
    let header = ["model", "dtype", "check", "figure", "value", "tolerance", "result"];
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            [
                r.model.clone(),
                r.dtype.clone(),
                r.check.clone(),
                r.figure.clone(),
                fmt_value(r.value),
                r.tolerance.clone(),
                if r.pass { "pass".into() } else { "FAIL".into() },
            ]
        })
        .collect();
    let mut width = header.map(|h| h.chars().count());
    for c in &cells {
        for (w, s) in width.iter_mut().zip(c) {
            *w = (*w).max(s.chars().count());
        }
    }
    let line = |c: &[String]| {
        let mut s = String::new();
        for (i, (w, v)) in width.iter().zip(c).enumerate() {
            if i + 1 < c.len() {
                s.push_str(&format!("{v}{}  ", " ".repeat(w - v.chars().count())));
            } else {
                s.push_str(v);
            }
        }
        s.push('\n');
        s
    };
    let mut out = line(&header.map(String::from));
    for c in &cells {
        out.push_str(&line(c));
    }
    let failed: Vec<&CheckRow> = rows.iter().filter(|r| !r.pass).collect();
    out.push_str(&format!("\n{} of {} checks passed", rows.len() - failed.len(), rows.len()));
    out.push_str(if failed.is_empty() { ".\n" } else { "; failures:\n" });
    for r in failed {
        out.push_str(&format!("- {} {} {} {}: {}\n", r.model, r.dtype, r.check, r.figure, r.detail));
    }
    out
}

pub fn write_parquet(path: &std::path::Path, rows: &[CheckRow]) -> Result<()> {
    let schema = Schema::new(vec![
        Field::new("model", DataType::Utf8, false),
        Field::new("dtype", DataType::Utf8, false),
        Field::new("check", DataType::Utf8, false),
        Field::new("figure", DataType::Utf8, false),
        Field::new("value", DataType::Float64, false),
        Field::new("tolerance", DataType::Utf8, false),
        Field::new("pass", DataType::Boolean, false),
        Field::new("detail", DataType::Utf8, false),
    ]);
    let s = |f: fn(&CheckRow) -> &str| Arc::new(StringArray::from_iter_values(rows.iter().map(f))) as ArrayRef;
    let columns: Vec<ArrayRef> = vec![
        s(|r| &r.model),
        s(|r| &r.dtype),
        s(|r| &r.check),
        s(|r| &r.figure),
        Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.value))),
        s(|r| &r.tolerance),
        Arc::new(BooleanArray::from_iter(rows.iter().map(|r| Some(r.pass)))),
        s(|r| &r.detail),
    ];
    let batch =
        RecordBatch::try_new(Arc::new(schema), columns).map_err(|e| Error::Other(format!("check.parquet: {e}")))?;
    crate::output::table::write_batch(path, &batch)
}

fn xml(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            // Control characters other than tab and newline are not allowed in XML 1.0.
            c if (c as u32) < 0x20 && c != '\t' && c != '\n' => o.push(' '),
            c => o.push(c),
        }
    }
    o
}

/// JUnit XML: one test suite per model and dtype, one test case per figure.
pub fn junit(rows: &[CheckRow], seconds: f64) -> String {
    let mut suites: Vec<(String, Vec<&CheckRow>)> = Vec::new();
    for r in rows {
        let name = format!("{}/{}", r.model, r.dtype);
        match suites.iter_mut().find(|(n, _)| *n == name) {
            Some((_, v)) => v.push(r),
            None => suites.push((name, vec![r])),
        }
    }
    let failures = rows.iter().filter(|r| !r.pass).count();
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    out.push_str(&format!(
        "<testsuites name=\"tl-run check\" tests=\"{}\" failures=\"{failures}\" time=\"{seconds:.3}\">\n",
        rows.len()
    ));
    for (name, rs) in &suites {
        let f = rs.iter().filter(|r| !r.pass).count();
        out.push_str(&format!("  <testsuite name=\"{}\" tests=\"{}\" failures=\"{f}\">\n", xml(name), rs.len()));
        for r in rs {
            // The name stays the same from run to run, so CI can track each figure's history.
            out.push_str(&format!(
                "    <testcase classname=\"{}.{}\" name=\"{}\">\n",
                xml(name),
                xml(&r.check),
                xml(&r.figure)
            ));
            let value = format!("{} = {} (tolerance {})", r.figure, fmt_value(r.value), r.tolerance);
            if r.pass {
                out.push_str(&format!("      <system-out>{}</system-out>\n", xml(&value)));
            } else {
                out.push_str(&format!("      <failure message=\"{}\">{}</failure>\n", xml(&value), xml(&r.detail)));
            }
            out.push_str("    </testcase>\n");
        }
        out.push_str("  </testsuite>\n");
    }
    out.push_str("</testsuites>\n");
    out
}
