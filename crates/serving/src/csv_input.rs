//! `text/csv` scoring bodies, read the way MLflow's scoring server reads them (pandas
//! `read_csv` with the model's input types): a header row names the columns, each further row
//! is a row of the frame. A column that feeds a string input holds strings, whatever they look
//! like (`02134` stays `02134`). Any other column whose every cell is a number or missing
//! (empty, `NA`, `NaN`, `null`…, as pandas reads them) holds numbers, a missing one `null`
//! (NaN in a float input); anything else holds strings.

use serde_json::{Number, Value, json};

use crate::{Dtype, InputSpec, ServingError};

/// What pandas reads as a missing value by default (besides the empty cell).
const MISSING: &[&str] = &[
    "NA", "N/A", "n/a", "NaN", "nan", "-NaN", "-nan", "NULL", "null", "None", "<NA>", "#N/A",
];

/// Column names as pandas' `read_csv` gives them: an empty one is `Unnamed: <position>`, and a
/// repeated one gets the first of `.1`, `.2`, … that no column has (so the columns stay
/// distinct).
fn pandas_column_names(header: Vec<String>) -> Vec<String> {
    let names: Vec<String> = header
        .into_iter()
        .enumerate()
        .map(|(at, name)| match name.is_empty() {
            true => format!("Unnamed: {at}"),
            false => name,
        })
        .collect();
    let mut taken: std::collections::HashSet<String> = names.iter().cloned().collect();
    let mut seen = std::collections::HashSet::with_capacity(names.len());
    let mut suffixes = std::collections::HashMap::new();
    names
        .into_iter()
        .map(|name| {
            if seen.insert(name.clone()) {
                return name;
            }
            let suffix = suffixes.entry(name.clone()).or_insert(0);
            loop {
                *suffix += 1;
                let renamed = format!("{name}.{suffix}");
                if taken.insert(renamed.clone()) {
                    return renamed;
                }
            }
        })
        .collect()
}

/// The CSV `body` for a model with `inputs`, as the equivalent JSON request:
/// `{"dataframe_split": {"columns", "data"}}`.
pub fn mlflow_csv_input(body: &[u8], inputs: &[InputSpec]) -> Result<Value, ServingError> {
    let bad = |e: csv::Error| ServingError::BadInput(format!("the CSV body cannot be read: {e}"));
    // Flexible: a short row is padded with missing cells, as pandas does; a long one is refused
    // below, as pandas does.
    let mut reader = csv::ReaderBuilder::new().flexible(true).from_reader(body);
    let header: Vec<String> = reader
        .headers()
        .map_err(bad)?
        .iter()
        .map(|name| name.trim().to_owned())
        .collect();
    if header.iter().all(String::is_empty) {
        return Err(ServingError::BadInput(
            "the CSV body needs a header row naming its columns".to_owned(),
        ));
    }
    let columns = pandas_column_names(header);
    let mut rows = reader
        .records()
        .collect::<Result<Vec<_>, _>>()
        .map_err(bad)?;
    for (i, row) in rows.iter_mut().enumerate() {
        if row.len() > columns.len() {
            return Err(ServingError::BadInput(format!(
                "the CSV body cannot be read: row {} has {} fields, the header names {}",
                i + 1,
                row.len(),
                columns.len()
            )));
        }
        while row.len() < columns.len() {
            row.push_field("");
        }
    }
    // A model with one input takes the columns as its row, whatever their names.
    let text_input = |column: &str| {
        inputs
            .iter()
            .any(|i| i.dtype == Dtype::Str && (i.name == column || inputs.len() == 1))
    };
    let numeric: Vec<bool> = columns
        .iter()
        .enumerate()
        .map(|(c, name)| {
            !text_input(name)
                && rows.iter().all(|row| {
                    let cell = row[c].trim();
                    is_missing(cell) || cell.parse::<f64>().is_ok()
                })
        })
        .collect();
    let data: Vec<Value> = rows
        .iter()
        .map(|row| {
            row.iter()
                .zip(&numeric)
                .map(|(cell, &numeric)| cell_value(cell, numeric))
                .collect()
        })
        .collect();
    Ok(json!({"dataframe_split": {"columns": columns, "data": data}}))
}

fn is_missing(cell: &str) -> bool {
    cell.is_empty() || MISSING.contains(&cell)
}

fn cell_value(cell: &str, numeric: bool) -> Value {
    if !numeric {
        return Value::String(cell.to_owned());
    }
    let cell = cell.trim();
    if let Ok(integer) = cell.parse::<i64>() {
        return integer.into();
    }
    // Missing values, and infinities (JSON has no number for them; read as missing too).
    cell.parse::<f64>()
        .ok()
        .and_then(Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(name: &str, dtype: Dtype) -> InputSpec {
        InputSpec {
            name: name.to_owned(),
            dtype,
            width: 1,
        }
    }

    #[test]
    fn columns_of_numbers_are_numbers_and_the_others_strings() {
        let csv = b"sepal length,color,count\n5.1,red,3\n,\"dark, blue\",-2\nNA,7,0\n";
        assert_eq!(
            mlflow_csv_input(csv, &[]).unwrap(),
            json!({"dataframe_split": {
                "columns": ["sepal length", "color", "count"],
                "data": [[5.1, "red", 3], [null, "dark, blue", -2], [null, "7", 0]]
            }})
        );
    }

    #[test]
    fn columns_of_string_inputs_stay_strings_however_they_look() {
        let csv = b"zip,amount\n02134,1.5\n10001,2\n";
        let inputs = [input("zip", Dtype::Str), input("amount", Dtype::Float32)];
        assert_eq!(
            mlflow_csv_input(csv, &inputs).unwrap()["dataframe_split"]["data"],
            json!([["02134", 1.5], ["10001", 2]])
        );
        // One string input: every column is part of its row.
        let one = [input("codes", Dtype::Str)];
        assert_eq!(
            mlflow_csv_input(b"a,b\n1,2\n", &one).unwrap()["dataframe_split"]["data"],
            json!([["1", "2"]])
        );
    }

    #[test]
    fn empty_and_repeated_column_names_are_named_as_pandas_does() {
        let csv = b"a,,a,a.1,a\n1,2,3,4,5\n";
        assert_eq!(
            mlflow_csv_input(csv, &[]).unwrap()["dataframe_split"]["columns"],
            // pandas 3.1.1: ['a', 'Unnamed: 1', 'a.2', 'a.1', 'a.3']
            json!(["a", "Unnamed: 1", "a.2", "a.1", "a.3"])
        );
        let names = |header: &[&str]| {
            pandas_column_names(header.iter().map(|name| (*name).to_owned()).collect())
        };
        assert_eq!(names(&["x", "x.1", "x", "x"]), ["x", "x.1", "x.2", "x.3"]);
        assert_eq!(names(&["", "", "a"]), ["Unnamed: 0", "Unnamed: 1", "a"]);
    }

    #[test]
    fn short_rows_are_padded_with_missing_cells_as_pandas_does() {
        assert_eq!(
            mlflow_csv_input(b"a,b,c\n1,2,3\n5,6\n", &[]).unwrap()["dataframe_split"]["data"],
            json!([[1, 2, 3], [5, 6, null]])
        );
    }

    #[test]
    fn long_rows_or_headless_csv_are_a_bad_input() {
        let error = mlflow_csv_input(b"a,b\n1,2\n3,4,5\n", &[]).unwrap_err();
        assert_eq!(
            error.to_string(),
            "the CSV body cannot be read: row 2 has 3 fields, the header names 2"
        );
        for csv in [&b""[..], b"\n"] {
            let error = mlflow_csv_input(csv, &[]).unwrap_err();
            assert!(matches!(error, ServingError::BadInput(_)), "{error}");
        }
    }
}
