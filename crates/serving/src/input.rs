//! MLflow's scoring request formats (`inputs`, `instances`, `dataframe_split`,
//! `dataframe_records`), read into one tensor per model input.

use std::borrow::Cow;

use serde_json::{Map, Value};
use tract_onnx::prelude::*;

use crate::ServingError;

/// The element type of a model input, as MLflow (numpy) names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    Float32,
    Float64,
    Int64,
    Str,
}

impl Dtype {
    pub(crate) fn of(datum: DatumType) -> Option<Self> {
        Some(match datum {
            DatumType::F32 => Self::Float32,
            DatumType::F64 => Self::Float64,
            DatumType::I64 => Self::Int64,
            DatumType::String => Self::Str,
            _ => return None,
        })
    }

    pub(crate) fn datum(self) -> DatumType {
        match self {
            Self::Float32 => DatumType::F32,
            Self::Float64 => DatumType::F64,
            Self::Int64 => DatumType::I64,
            Self::Str => DatumType::String,
        }
    }

    /// MLflow's name: `float32`, `float64`, `int64`, `str`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Float32 => "float32",
            Self::Float64 => "float64",
            Self::Int64 => "int64",
            Self::Str => "str",
        }
    }
}

/// One input of a model: a matrix `[N, width]` of `dtype`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputSpec {
    pub name: String,
    pub dtype: Dtype,
    pub width: usize,
}

impl InputSpec {
    fn expects(&self) -> String {
        format!(
            "input '{}' expects {} rows of shape [-1, {}]",
            self.name,
            self.dtype.name(),
            self.width
        )
    }
}

/// A request's values, one tensor `[rows, width]` per model input, in the model's input order.
#[derive(Debug)]
pub struct Batch {
    pub(crate) rows: usize,
    pub(crate) tensors: Vec<Tensor>,
}

impl Batch {
    pub fn rows(&self) -> usize {
        self.rows
    }
}

const FORMATS: [&str; 4] = [
    "inputs",
    "instances",
    "dataframe_split",
    "dataframe_records",
];

fn bad(message: impl Into<String>) -> ServingError {
    ServingError::BadInput(message.into())
}

/// Reads an MLflow scoring request for a model with `inputs`: exactly one format key (`params`
/// and any other key are ignored, as MLflow does: ONNX models take no params).
///
/// - `inputs` / `instances`: a list of rows (one-input models); an object keyed by input name
///   holding each input's rows (every input of the model; other keys ignored); or a list of objects, one per row,
///   each holding every input's row (TF-serving's row format; other keys ignored).
/// - `dataframe_split` / `dataframe_records`: for a model with one input, the columns in order
///   are the row (`dataframe_records` names them by position, "0", "1", …: JSON objects have no
///   key order); for a model with one input per column, columns go to inputs **by name**, in
///   any order (other columns are ignored, as MLflow does).
///
/// A `null` in a float input is NaN (a missing value, as pandas reads it).
pub fn parse_mlflow_input(body: &Value, inputs: &[InputSpec]) -> Result<Batch, ServingError> {
    let Some(object) = body.as_object() else {
        return Err(bad("the body must be a JSON object"));
    };
    // Other keys are ignored, as MLflow does (clients add metadata).
    let given: Vec<&str> = FORMATS
        .into_iter()
        .filter(|k| object.contains_key(*k))
        .collect();
    let [format] = given[..] else {
        let has = if given.is_empty() {
            let keys: Vec<&str> = object.keys().map(String::as_str).take(5).collect();
            format!("none (its keys: {})", keys.join(", "))
        } else {
            given.join(" and ")
        };
        return Err(bad(format!(
            "the body must have exactly one of {}; it has {has}",
            FORMATS.join(", ")
        )));
    };
    let value = &object[format];
    read_format(format, value, inputs).map_err(|e| match e {
        ServingError::BadInput(message) => ServingError::Schema { format, message },
        other => other,
    })
}

/// The values of `format` as one tensor per model input.
fn read_format(format: &str, value: &Value, inputs: &[InputSpec]) -> Result<Batch, ServingError> {
    let columns = match (format, value) {
        ("inputs" | "instances", Value::Object(named)) => by_input_name(format, named, inputs)?,
        ("inputs" | "instances", Value::Array(rows))
            if !rows.is_empty() && rows.iter().all(Value::is_object) =>
        {
            instance_records(format, rows, inputs)?
        }
        ("inputs" | "instances", Value::Array(rows)) => match inputs {
            [only] => vec![rows_of(format, rows.iter(), only)?],
            _ => {
                return Err(bad(format!(
                    "the model has {} inputs ({}): send {format} as an object keyed by input name",
                    inputs.len(),
                    names(inputs)
                )));
            }
        },
        ("inputs" | "instances", _) => {
            return Err(bad(format!(
                "{format} must be a list of rows or an object keyed by input name"
            )));
        }
        ("dataframe_split", _) => dataframe_split(value, inputs)?,
        _ => match value {
            Value::Array(rows) => records("dataframe_records", rows, inputs)?,
            _ => return Err(bad("dataframe_records must be a list of objects")),
        },
    };
    let rows = columns.first().map_or(0, |c| c.rows);
    if let Some(other) = columns.iter().find(|c| c.rows != rows) {
        return Err(bad(format!(
            "input '{}' has {} rows, input '{}' {rows}: every input needs the same row count",
            other.input.name, other.rows, columns[0].input.name
        )));
    }
    Ok(Batch {
        rows,
        tensors: columns
            .into_iter()
            .map(Column::into_tensor)
            .collect::<Result<_, _>>()?,
    })
}

fn names(inputs: &[InputSpec]) -> String {
    inputs
        .iter()
        .map(|i| format!("'{}'", i.name))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The JSON values for one input, row-major.
struct Column<'a> {
    input: &'a InputSpec,
    rows: usize,
    cells: Vec<&'a Value>,
}

impl Column<'_> {
    fn into_tensor(self) -> Result<Tensor, ServingError> {
        let spec = self.input;
        let shape = [self.rows, spec.width];
        let at = |i: usize| {
            let width = spec.width.max(1);
            // A one-value input is one column of the request: the input names it.
            let cell = match width {
                1 => format!("row {i}"),
                _ => format!("row {}, column {}", i / width, i % width),
            };
            let kind = match spec.dtype {
                Dtype::Str => "a string",
                Dtype::Int64 => "an integer",
                _ => "a number",
            };
            format!("{cell} is not {kind}: {}", spec.expects())
        };
        let tensor = match spec.dtype {
            Dtype::Float32 | Dtype::Float64 => {
                let values = self
                    .cells
                    .iter()
                    .enumerate()
                    .map(|(i, v)| match v {
                        Value::Null => Ok(f64::NAN),
                        // What `python_json` makes of Python's bare `Infinity`.
                        Value::String(s) if s == "Infinity" => Ok(f64::INFINITY),
                        Value::String(s) if s == "-Infinity" => Ok(f64::NEG_INFINITY),
                        v => v.as_f64().ok_or_else(|| bad(at(i))),
                    })
                    .collect::<Result<Vec<f64>, _>>()?;
                if spec.dtype == Dtype::Float64 {
                    Tensor::from_shape(&shape, &values)
                } else {
                    let values: Vec<f32> = values.into_iter().map(|v| v as f32).collect();
                    Tensor::from_shape(&shape, &values)
                }
            }
            Dtype::Int64 => {
                let values = self
                    .cells
                    .iter()
                    .enumerate()
                    .map(|(i, v)| v.as_i64().ok_or_else(|| bad(at(i))))
                    .collect::<Result<Vec<i64>, _>>()?;
                Tensor::from_shape(&shape, &values)
            }
            Dtype::Str => {
                let values = self
                    .cells
                    .iter()
                    .enumerate()
                    .map(|(i, v)| v.as_str().map(str::to_owned).ok_or_else(|| bad(at(i))))
                    .collect::<Result<Vec<String>, _>>()?;
                tract_ndarray::Array2::from_shape_vec(shape, values)
                    .map(IntoTensor::into_tensor)
                    .map_err(TractError::from)
            }
        };
        tensor.map_err(|e| ServingError::Inference(format!("{e:#}")))
    }
}

/// `rows` for `input`: each row a list of `width` values, or a bare value when `width` is 1.
fn rows_of<'a>(
    what: &str,
    rows: impl ExactSizeIterator<Item = &'a Value>,
    input: &'a InputSpec,
) -> Result<Column<'a>, ServingError> {
    let count = rows.len();
    // Grown as rows are checked: a size computed from the request before checking could be huge.
    let mut cells = Vec::new();
    for (i, row) in rows.enumerate() {
        match row {
            Value::Array(values) if values.len() == input.width => cells.extend(values),
            Value::Array(values) => {
                return Err(bad(format!(
                    "{what}: row {i} has {} values: {}",
                    values.len(),
                    input.expects()
                )));
            }
            scalar if input.width == 1 && !scalar.is_object() => cells.push(scalar),
            _ => {
                return Err(bad(format!(
                    "{what}: row {i} is not a list: {}",
                    input.expects()
                )));
            }
        }
    }
    Ok(Column {
        input,
        rows: count,
        cells,
    })
}

/// `{"<input>": rows, ...}`: every input of the model (other keys are ignored, as MLflow does).
fn by_input_name<'a>(
    what: &str,
    named: &'a Map<String, Value>,
    inputs: &'a [InputSpec],
) -> Result<Vec<Column<'a>>, ServingError> {
    inputs
        .iter()
        .map(|input| match named.get(&input.name) {
            Some(Value::Array(rows)) => rows_of(what, rows.iter(), input),
            Some(_) => Err(bad(format!(
                "{what}.{} must be a list of rows: {}",
                input.name,
                input.expects()
            ))),
            None => Err(bad(format!(
                "{what} is missing input '{}': {} (the model's inputs: {})",
                input.name,
                input.expects(),
                names(inputs)
            ))),
        })
        .collect()
}

/// Where each input's column is, for a model with one input per column.
fn column_inputs(
    what: &str,
    columns: &[impl AsRef<str>],
    inputs: &[InputSpec],
) -> Result<Vec<usize>, ServingError> {
    if let Some(wide) = inputs.iter().find(|i| i.width != 1) {
        return Err(bad(format!(
            "{what}: the model has {} inputs and '{}' takes {} values per row; send inputs as an object keyed by input name",
            inputs.len(),
            wide.name,
            wide.width
        )));
    }
    // Other columns are ignored, as MLflow's schema enforcement does.
    inputs
        .iter()
        .map(|input| {
            columns
                .iter()
                .position(|c| c.as_ref() == input.name)
                .ok_or_else(|| {
                    bad(format!(
                        "{what} is missing column '{}': {}",
                        input.name,
                        input.expects()
                    ))
                })
        })
        .collect()
}

fn dataframe_split<'a>(
    value: &'a Value,
    inputs: &'a [InputSpec],
) -> Result<Vec<Column<'a>>, ServingError> {
    let what = "dataframe_split";
    let Some(Value::Array(data)) = value.get("data") else {
        return Err(bad("dataframe_split needs \"data\": a list of rows"));
    };
    // Names, or numbers: a DataFrame made from an array has the column labels 0, 1, …, and
    // `df.to_dict(orient="split")` writes them as numbers.
    let columns: Option<Vec<Cow<'_, str>>> = match value.get("columns") {
        None => None,
        Some(Value::Array(columns)) => Some(
            columns
                .iter()
                .map(|c| match c {
                    Value::String(name) => Ok(Cow::Borrowed(name.as_str())),
                    Value::Number(label) => Ok(Cow::Owned(label.to_string())),
                    _ => Err(bad(
                        "dataframe_split columns must be names (strings) or numbers",
                    )),
                })
                .collect::<Result<_, _>>()?,
        ),
        Some(_) => return Err(bad("dataframe_split columns must be a list of names")),
    };
    // As pandas' DataFrame, which MLflow builds, refuses them: which of two would be meant?
    if let Some(columns) = &columns {
        let mut seen = std::collections::HashSet::with_capacity(columns.len());
        if let Some(twice) = columns.iter().find(|&c| !seen.insert(c)) {
            return Err(bad(format!(
                "dataframe_split has the column '{twice}' twice"
            )));
        }
    }
    if let [only] = inputs {
        if let Some([_]) = columns.as_deref()
            && only.width > 1
        {
            // One column holding each row's values as a list (a DataFrame of arrays).
            let rows = data
                .iter()
                .enumerate()
                .map(|(i, row)| match row.as_array().map(Vec::as_slice) {
                    Some([cell]) => Ok(cell),
                    _ => Err(bad(format!(
                        "{what}: row {i} must hold one value, the list of its column"
                    ))),
                })
                .collect::<Result<Vec<&Value>, _>>()?;
            return Ok(vec![rows_of(what, rows.into_iter(), only)?]);
        }
        if let Some(columns) = &columns {
            if columns.len() != only.width {
                return Err(bad(format!(
                    "dataframe_split has {} columns: {} (the columns in order)",
                    columns.len(),
                    only.expects()
                )));
            }
            // Read by position, as MLflow does; but columns named by position in another order
            // would feed each value to another column than `dataframe_records` (which goes by
            // those names) does with the same frame. Names are distinct (above), so n names
            // that are all positions below n are each position once.
            let position = |name: &str| {
                name.parse::<usize>()
                    .ok()
                    .filter(|at| *at < columns.len() && at.to_string() == name)
            };
            let positions: Option<Vec<usize>> = columns.iter().map(|c| position(c)).collect();
            let out_of_order = positions
                .is_some_and(|positions| positions.iter().enumerate().any(|(at, p)| at != *p));
            if out_of_order {
                return Err(bad(format!(
                    "dataframe_split columns are named by position but not in order ({}): \
                     values are read by position, so put the columns in order 0..{}",
                    columns.join(", "),
                    columns.len() - 1
                )));
            }
        }
        return Ok(vec![rows_of(what, data.iter(), only)?]);
    }
    let Some(columns) = columns else {
        return Err(bad(format!(
            "dataframe_split needs \"columns\": the model has {} inputs ({}), matched by column name",
            inputs.len(),
            names(inputs)
        )));
    };
    let positions = column_inputs(what, &columns, inputs)?;
    let mut cells: Vec<Vec<&Value>> = vec![Vec::with_capacity(data.len()); inputs.len()];
    for (i, row) in data.iter().enumerate() {
        let Some(values) = row.as_array().filter(|v| v.len() == columns.len()) else {
            return Err(bad(format!(
                "dataframe_split: row {i} must be a list of {} values, one per column",
                columns.len()
            )));
        };
        for (input, &at) in positions.iter().enumerate() {
            cells[input].push(&values[at]);
        }
    }
    Ok(inputs
        .iter()
        .zip(cells)
        .map(|(input, cells)| Column {
            input,
            rows: data.len(),
            cells,
        })
        .collect())
}

/// TF-serving's row format: a list of objects keyed by input name, each value that input's row
/// for this instance (as MLflow reads `instances`). Other keys are ignored.
fn instance_records<'a>(
    what: &str,
    records: &'a [Value],
    inputs: &'a [InputSpec],
) -> Result<Vec<Column<'a>>, ServingError> {
    inputs
        .iter()
        .map(|input| {
            let rows = records
                .iter()
                .enumerate()
                .map(|(i, record)| {
                    record.get(&input.name).ok_or_else(|| {
                        bad(format!(
                            "{what}[{i}] is missing input '{}': {}",
                            input.name,
                            input.expects()
                        ))
                    })
                })
                .collect::<Result<Vec<&Value>, _>>()?;
            rows_of(what, rows.into_iter(), input)
        })
        .collect()
}

/// A list of objects, one per row. One-input models: the keys are the columns' positions ("0",
/// "1", …; a one-column input takes any name). Otherwise keys are input names.
fn records<'a>(
    what: &str,
    records: &'a [Value],
    inputs: &'a [InputSpec],
) -> Result<Vec<Column<'a>>, ServingError> {
    let Some(first) = records.first() else {
        return Ok(inputs
            .iter()
            .map(|input| Column {
                input,
                rows: 0,
                cells: Vec::new(),
            })
            .collect());
    };
    let Some(first) = first.as_object() else {
        return Err(bad(format!("{what}[0] is not an object")));
    };
    let mut columns: Vec<&str> = first.keys().map(String::as_str).collect();
    if let ([only], [column]) = (inputs, &columns[..])
        && only.width > 1
    {
        // One column holding each row's values as a list (a DataFrame of arrays).
        let rows = records
            .iter()
            .enumerate()
            .map(|(i, record)| {
                record
                    .as_object()
                    .filter(|o| o.len() == 1)
                    .and_then(|o| o.get(*column))
                    .ok_or_else(|| bad(format!("{what}[{i}] must have the one column '{column}'")))
            })
            .collect::<Result<Vec<&Value>, _>>()?;
        return Ok(vec![rows_of(what, rows.into_iter(), only)?]);
    }
    if let [only] = inputs
        && only.width > 1
    {
        // The order of an object's keys is not part of JSON (a body re-serialised on its way,
        // with sorted keys say, changes it): the columns of one wide input are placed by their
        // names "0", "1", …, never by where they stand in the record.
        let mut indexed: Vec<(usize, &str)> = columns
            .iter()
            // Written as positions are ("1", not "01" or "+1").
            .map(|c| {
                c.parse::<usize>()
                    .ok()
                    .filter(|i| i.to_string() == *c)
                    .map(|i| (i, *c))
            })
            .collect::<Option<_>>()
            .unwrap_or_default();
        indexed.sort_unstable();
        if !indexed.iter().map(|(i, _)| *i).eq(0..only.width) {
            return Err(bad(format!(
                "{what}: input '{}' takes {} values per row, and JSON objects do not keep the order of their keys: name the columns \"0\" to \"{}\" (their positions), or send dataframe_split (\"columns\" in order) or inputs",
                only.name,
                only.width,
                only.width - 1
            )));
        }
        columns = indexed.into_iter().map(|(_, c)| c).collect();
    }
    let object = |i: usize, record: &'a Value| {
        record
            .as_object()
            .filter(|o| o.len() == columns.len() && columns.iter().all(|c| o.contains_key(*c)))
            .ok_or_else(|| bad(format!("{what}[{i}] must have the columns {columns:?}")))
    };
    if let [only] = inputs {
        if columns.len() != only.width {
            return Err(bad(format!(
                "{what} has {} columns: {} (the columns in order)",
                columns.len(),
                only.expects()
            )));
        }
        let mut cells = Vec::new();
        for (i, record) in records.iter().enumerate() {
            let record = object(i, record)?;
            cells.extend(columns.iter().map(|c| &record[*c]));
        }
        return Ok(vec![Column {
            input: only,
            rows: records.len(),
            cells,
        }]);
    }
    column_inputs(what, &columns, inputs)?;
    let mut cells: Vec<Vec<&Value>> = vec![Vec::with_capacity(records.len()); inputs.len()];
    for (i, record) in records.iter().enumerate() {
        let record = object(i, record)?;
        for (input, cells) in inputs.iter().zip(&mut cells) {
            cells.push(&record[&input.name]);
        }
    }
    Ok(inputs
        .iter()
        .zip(cells)
        .map(|(input, cells)| Column {
            input,
            rows: records.len(),
            cells,
        })
        .collect())
}

/// Python's `json.dumps` (and so MLflow's own `convert_input_example_to_serving_input`) writes
/// missing and infinite floats as bare `NaN`, `Infinity` and `-Infinity`, which are not JSON.
/// Rewrites them outside strings as `null` (a missing value) and the strings `"Infinity"` and
/// `"-Infinity"` (which float inputs read as such); `None` when there is none to rewrite.
pub fn python_json(body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(body.len() + 16);
    let (mut in_string, mut escaped, mut rewritten) = (false, false, false);
    let mut i = 0;
    while i < body.len() {
        let byte = body[i];
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
        } else {
            let rest = &body[i..];
            let replacement: Option<(&[u8], usize)> = if rest.starts_with(b"NaN") {
                Some((b"null", 3))
            } else if rest.starts_with(b"Infinity") {
                Some((b"\"Infinity\"", 8))
            } else if rest.starts_with(b"-Infinity") {
                Some((b"\"-Infinity\"", 9))
            } else {
                None
            };
            if let Some((text, consumed)) = replacement {
                out.extend_from_slice(text);
                i += consumed;
                rewritten = true;
                continue;
            }
            in_string = byte == b'"';
        }
        out.push(byte);
        i += 1;
    }
    rewritten.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn one(width: usize) -> Vec<InputSpec> {
        vec![InputSpec {
            name: "x".into(),
            dtype: Dtype::Float32,
            width,
        }]
    }

    fn per_column(names: &[&str]) -> Vec<InputSpec> {
        names
            .iter()
            .map(|n| InputSpec {
                name: (*n).into(),
                dtype: Dtype::Float32,
                width: 1,
            })
            .collect()
    }

    fn values(batch: &Batch) -> Vec<Vec<f32>> {
        batch
            .tensors
            .iter()
            .map(|t| {
                t.to_plain_array_view::<f32>()
                    .unwrap()
                    .iter()
                    .copied()
                    .collect()
            })
            .collect()
    }

    #[test]
    fn reads_every_mlflow_format_into_the_same_rows() {
        for body in [
            json!({"inputs": [[1, 2], [3, 4]]}),
            json!({"inputs": {"x": [[1, 2], [3, 4]]}}),
            json!({"instances": [[1, 2], [3, 4]], "params": {}}),
            json!({"instances": [{"x": [1, 2]}, {"x": [3, 4], "other": 0}]}),
            json!({"dataframe_split": {"columns": ["a", "b"], "data": [[1, 2], [3, 4]]}}),
            // A DataFrame made from an array: its column labels are the numbers 0, 1, …
            json!({"dataframe_split": {"columns": [0, 1], "data": [[1, 2], [3, 4]]}}),
            json!({"dataframe_records": [{"1": 2, "0": 1}, {"0": 3, "1": 4}]}),
        ] {
            let batch = parse_mlflow_input(&body, &one(2)).unwrap();
            assert_eq!(batch.rows(), 2, "{body}");
            assert_eq!(values(&batch), [vec![1.0, 2.0, 3.0, 4.0]], "{body}");
        }
        let empty = parse_mlflow_input(&json!({"inputs": []}), &one(2)).unwrap();
        assert_eq!((empty.rows(), empty.tensors[0].shape()), (0, &[0, 2][..]));
    }

    #[test]
    fn columns_named_by_position_out_of_order_or_twice_are_refused_not_misread() {
        // By position these would be read as [2, 1]; `dataframe_records` reads the same names
        // as positions, [1, 2]. Neither silently: a 400.
        for columns in [json!(["1", "0"]), json!([1, 0])] {
            let body = json!({"dataframe_split": {"columns": columns, "data": [[2, 1]]}});
            let error = parse_mlflow_input(&body, &one(2)).unwrap_err().to_string();
            assert!(
                error.contains("columns are named by position but not in order (1, 0)"),
                "{error}"
            );
        }
        // Other names, or positions that are not all there, go by position as in MLflow.
        for columns in [json!(["b", "a"]), json!(["1", "2"])] {
            let body = json!({"dataframe_split": {"columns": columns, "data": [[2, 1]]}});
            let batch = parse_mlflow_input(&body, &one(2)).unwrap();
            assert_eq!(values(&batch), [vec![2.0, 1.0]], "{body}");
        }
        let twice = json!({"dataframe_split": {"columns": ["a", "a"], "data": [[2, 1]]}});
        let error = parse_mlflow_input(&twice, &one(2)).unwrap_err().to_string();
        assert!(error.contains("has the column 'a' twice"), "{error}");
        let bad = json!({"dataframe_split": {"columns": [true, null], "data": [[2, 1]]}});
        let error = parse_mlflow_input(&bad, &one(2)).unwrap_err().to_string();
        assert!(
            error.contains("columns must be names (strings) or numbers"),
            "{error}"
        );
    }

    #[test]
    fn reads_what_mlflow_reads_beside_the_plain_formats() {
        for body in [
            json!({"inputs": [[1, 2]], "client": "batch-7"}),
            json!({"inputs": {"x": [[1, 2]], "extra": [[0]]}}),
            json!({"dataframe_records": [{"0": 1, "1": 2}]}),
        ] {
            let batch = parse_mlflow_input(&body, &one(2)).unwrap();
            assert_eq!(values(&batch), [vec![1.0, 2.0]], "{body}");
        }
        // One column holding lists, as a DataFrame of arrays sends it.
        for body in [
            json!({"dataframe_split": {"columns": ["input"], "data": [[[1, 2]], [[3, 4]]]}}),
            json!({"dataframe_records": [{"input": [1, 2]}, {"input": [3, 4]}]}),
        ] {
            let batch = parse_mlflow_input(&body, &one(2)).unwrap();
            assert_eq!(values(&batch), [vec![1.0, 2.0, 3.0, 4.0]], "{body}");
        }
        // One column: its name says nothing and needs to say nothing.
        let batch = parse_mlflow_input(&json!({"dataframe_records": [{"v": 7}]}), &one(1)).unwrap();
        assert_eq!(values(&batch), [vec![7.0]]);
    }

    #[test]
    fn maps_columns_to_inputs_by_name_in_any_order() {
        let inputs = per_column(&["a", "b", "c"]);
        for body in [
            json!({"dataframe_split": {"columns": ["c", "a", "b"], "data": [[3, 1, 2], [6, 4, 5]]}}),
            json!({"dataframe_records": [{"c": 3, "b": 2, "a": 1, "z": 0}, {"a": 4, "b": 5, "z": 0, "c": 6}]}),
            json!({"inputs": {"b": [[2], [5]], "c": [3, 6], "a": [[1], [4]]}}),
            json!({"instances": [{"a": 1, "b": 2, "c": 3}, {"c": 6, "b": 5, "a": 4}]}),
        ] {
            let batch = parse_mlflow_input(&body, &inputs).unwrap();
            assert_eq!(
                values(&batch),
                [vec![1.0, 4.0], vec![2.0, 5.0], vec![3.0, 6.0]],
                "{body}"
            );
        }
    }

    #[test]
    fn reads_pythons_nan_and_infinity_outside_strings() {
        let body = br#"{"inputs": [[NaN, -Infinity, Infinity, 1.5]], "note": "NaN \" Infinity"}"#;
        let fixed = python_json(body).unwrap();
        assert_eq!(
            String::from_utf8(fixed.clone()).unwrap(),
            r#"{"inputs": [[null, "-Infinity", "Infinity", 1.5]], "note": "NaN \" Infinity"}"#
        );
        let value: Value = serde_json::from_slice(&fixed).unwrap();
        let got = values(&parse_mlflow_input(&value, &one(4)).unwrap());
        assert!(got[0][0].is_nan());
        assert_eq!(got[0][1..], [f32::NEG_INFINITY, f32::INFINITY, 1.5]);
        assert_eq!(python_json(br#"{"inputs": [[1, "NaN"]]}"#), None);
    }

    #[test]
    fn null_is_nan_in_float_inputs() {
        let batch = parse_mlflow_input(&json!({"inputs": [[1, null]]}), &one(2)).unwrap();
        let got = values(&batch);
        assert_eq!(got[0][0], 1.0);
        assert!(got[0][1].is_nan());
    }

    #[test]
    fn keeps_float64_and_int64_inputs_exact() {
        let input = |dtype| {
            vec![InputSpec {
                name: "x".into(),
                dtype,
                width: 1,
            }]
        };
        let batch = parse_mlflow_input(&json!({"inputs": [0.1]}), &input(Dtype::Float64)).unwrap();
        assert_eq!(
            batch.tensors[0]
                .to_plain_array_view::<f64>()
                .unwrap()
                .as_slice()
                .unwrap(),
            [0.1]
        );
        let batch = parse_mlflow_input(
            &json!({"inputs": [[9007199254740993_i64]]}),
            &input(Dtype::Int64),
        )
        .unwrap();
        assert_eq!(
            batch.tensors[0]
                .to_plain_array_view::<i64>()
                .unwrap()
                .as_slice()
                .unwrap(),
            [9007199254740993]
        );
        let error = parse_mlflow_input(&json!({"inputs": [[1.5]]}), &input(Dtype::Int64))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("is not an integer: input 'x' expects int64"),
            "{error}"
        );
    }

    #[test]
    fn explains_what_does_not_fit() {
        let error = |body: Value| parse_mlflow_input(&body, &one(2)).unwrap_err().to_string();
        assert!(error(json!({})).contains("has none"));
        assert!(
            error(json!({"inputs": [[1, 2]], "instances": [[1, 2]]}))
                .contains("inputs and instances")
        );
        assert!(error(json!({"input": [[1, 2]]})).contains("it has none (its keys: input)"));
        assert!(
            error(json!({"inputs": [[1, 2, 3]]}))
                .contains("row 0 has 3 values: input 'x' expects float32 rows of shape [-1, 2]")
        );
        assert!(error(json!({"inputs": [[1, "a"]]})).contains("row 0, column 1 is not a number"));
        assert!(
            error(json!({"inputs": {"y": [[1, 2]]}}))
                .contains("missing input 'x': input 'x' expects float32 rows of shape [-1, 2] (the model's inputs: 'x')")
        );
        assert!(
            error(json!({"dataframe_records": [{"b": 1, "a": 2}]}))
                .contains("name the columns \"0\" to \"1\"")
        );
        assert!(error(json!({"dataframe_records": [{"0": 1, "2": 2}]})).contains("\"0\" to \"1\""));
        assert!(error(json!([1, 2])).contains("JSON object"));

        let inputs = per_column(&["a", "b"]);
        let body = json!({"dataframe_records": [{"a": 1, "b": 2}, {"a": 3, "b": "x"}]});
        let error = parse_mlflow_input(&body, &inputs).unwrap_err().to_string();
        assert!(
            error.contains("row 1 is not a number: input 'b' expects float32"),
            "{error}"
        );
        let error = |body: Value| parse_mlflow_input(&body, &inputs).unwrap_err().to_string();
        assert!(
            error(json!({"dataframe_split": {"columns": ["a"], "data": [[1]]}}))
                .contains("missing column 'b'")
        );
        assert!(
            error(json!({"dataframe_records": [{"a": 1, "z": 3}]})).contains("missing column 'b'")
        );
        assert!(error(json!({"inputs": [[1, 2]]})).contains("object keyed by input name"));
        assert!(
            error(json!({"inputs": {"a": [1, 2], "b": [1]}}))
                .contains("every input needs the same row count")
        );
    }
}
