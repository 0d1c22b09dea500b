//! `text/csv` scoring bodies, read the way MLflow's scoring server reads them (pandas
//! `read_csv`): a header row names the columns, each further row is a row of the frame. A
//! column whose every cell is a number holds numbers (an empty cell there is a missing value,
//! `null`: NaN in a float input); any other column holds strings.

use serde_json::{Number, Value, json};

use crate::ServingError;

/// The CSV `body` as the equivalent JSON request: `{"dataframe_split": {"columns", "data"}}`.
pub fn mlflow_csv_input(body: &[u8]) -> Result<Value, ServingError> {
    let bad = |e: csv::Error| ServingError::BadInput(format!("the CSV body cannot be read: {e}"));
    let mut reader = csv::ReaderBuilder::new().from_reader(body);
    let columns: Vec<String> = reader
        .headers()
        .map_err(bad)?
        .iter()
        .map(|name| name.trim().to_owned())
        .collect();
    if columns.iter().all(String::is_empty) {
        return Err(ServingError::BadInput(
            "the CSV body needs a header row naming its columns".to_owned(),
        ));
    }
    let rows = reader
        .records()
        .collect::<Result<Vec<_>, _>>()
        .map_err(bad)?;
    let numeric: Vec<bool> = (0..columns.len())
        .map(|c| {
            rows.iter().all(|row| {
                let cell = row[c].trim();
                cell.is_empty() || cell.parse::<f64>().is_ok()
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

fn cell_value(cell: &str, numeric: bool) -> Value {
    if !numeric {
        return Value::String(cell.to_owned());
    }
    let cell = cell.trim();
    if let Ok(integer) = cell.parse::<i64>() {
        return integer.into();
    }
    // Empty, `nan` and infinities have no JSON number: a missing value.
    cell.parse::<f64>()
        .ok()
        .and_then(Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_of_numbers_are_numbers_and_the_others_strings() {
        let csv = b"sepal length,color,count\n5.1,red,3\n,\"dark, blue\",-2\nnan,7,0\n";
        assert_eq!(
            mlflow_csv_input(csv).unwrap(),
            json!({"dataframe_split": {
                "columns": ["sepal length", "color", "count"],
                "data": [[5.1, "red", 3], [null, "dark, blue", -2], [null, "7", 0]]
            }})
        );
    }

    #[test]
    fn ragged_or_headless_csv_is_a_bad_input() {
        for csv in [&b"a,b\n1,2\n3\n"[..], b"", b"\n"] {
            let error = mlflow_csv_input(csv).unwrap_err();
            assert!(matches!(error, ServingError::BadInput(_)), "{error}");
        }
    }
}
