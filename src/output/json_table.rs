//! A kind's side tables (edge attribution's circuits): rows of JSON objects, as a job's note
//! carries them through the job store, written as Parquet with one typed column per key.
use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, Float64Array, Int64Array, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::output::table::write_batch;

/// Columns in the order their keys first appear; a column is Int64 when every value is an
/// integer, Float64 when every value is a number, Boolean when every value is one, Utf8
/// otherwise (other values written as JSON); nulls and missing keys are nulls.
pub fn to_batch(rows: &[Value]) -> Result<RecordBatch> {
    let mut names: Vec<String> = Vec::new();
    for row in rows {
        let obj = row.as_object().ok_or_else(|| Error::Other("a table row is not a JSON object".into()))?;
        for k in obj.keys() {
            if !names.contains(k) {
                names.push(k.clone());
            }
        }
    }
    let mut fields = Vec::new();
    let mut columns: Vec<ArrayRef> = Vec::new();
    for name in &names {
        let values: Vec<&Value> = rows.iter().map(|r| r.get(name).unwrap_or(&Value::Null)).collect();
        let present = || values.iter().filter(|v| !v.is_null());
        let (dtype, column): (DataType, ArrayRef) = if present().all(|v| v.is_i64()) {
            (DataType::Int64, Arc::new(Int64Array::from_iter(values.iter().map(|v| v.as_i64()))))
        } else if present().all(|v| v.is_number()) {
            (DataType::Float64, Arc::new(Float64Array::from_iter(values.iter().map(|v| v.as_f64()))))
        } else if present().all(|v| v.is_boolean()) {
            (DataType::Boolean, Arc::new(BooleanArray::from_iter(values.iter().map(|v| v.as_bool()))))
        } else {
            let text = |v: &Value| match v {
                Value::Null => None,
                Value::String(s) => Some(s.clone()),
                other => Some(other.to_string()),
            };
            (DataType::Utf8, Arc::new(StringArray::from_iter(values.iter().map(|v| text(v)))))
        };
        fields.push(Field::new(name, dtype, true));
        columns.push(column);
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).map_err(|e| Error::Other(format!("arrow: {e}")))
}

/// Writes the rows atomically.
pub fn write(path: &Path, rows: &[Value]) -> Result<()> {
    write_batch(path, &to_batch(rows)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::AsArray;
    use arrow::datatypes::{Float64Type, Int64Type};

    #[test]
    fn columns_take_the_type_every_value_has() {
        let rows = vec![
            serde_json::json!({"circuit": "top_n", "edges": 10, "faithfulness": 0.5, "ok": true}),
            serde_json::json!({"circuit": "greedy", "edges": 3, "faithfulness": 1, "extra": [1]}),
        ];
        let b = to_batch(&rows).unwrap();
        let schema = b.schema();
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(names, ["circuit", "edges", "faithfulness", "ok", "extra"]);
        assert_eq!(b.column(1).as_primitive::<Int64Type>().values(), &[10, 3]);
        // 0.5 and 1: a float column.
        assert_eq!(b.column(2).as_primitive::<Float64Type>().values(), &[0.5, 1.0]);
        assert!(b.column(3).is_null(1));
        assert_eq!(b.column(4).as_string::<i32>().value(1), "[1]");
        assert!(to_batch(&[serde_json::json!(3)]).is_err());
    }
}
