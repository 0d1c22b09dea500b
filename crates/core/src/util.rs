//! Small helpers every crate needs once.

/// Seconds since the Unix epoch, for `created` fields.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// An error and its sources as one line (`a: b: c`), skipping a cause its parent already quotes.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Deserializes JSON from bytes, checking them as UTF-8 in one pass first: serde_json's
/// `from_slice` checks every string it reads on its own (~100 instructions each), `from_str`
/// none. For bodies whose strings are all read (a client's request, an answer decoded whole);
/// where most of a body is skipped, `from_slice` checks less. Bytes that are not UTF-8 go to
/// `from_slice`, for its error and the place it names.
pub fn json_from_bytes<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> serde_json::Result<T> {
    match std::str::from_utf8(bytes) {
        Ok(text) => serde_json::from_str(text),
        Err(_) => serde_json::from_slice(bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_from_bytes_reads_utf8_and_reports_other_bytes_like_from_slice() {
        let value: serde_json::Value = json_from_bytes(r#"{"a":"é","b":[1]}"#.as_bytes()).unwrap();
        assert_eq!(value, serde_json::json!({"a": "é", "b": [1]}));
        let not_utf8 = b"{\"a\":\"\xff\"}";
        let ours = json_from_bytes::<serde_json::Value>(not_utf8).unwrap_err();
        let theirs = serde_json::from_slice::<serde_json::Value>(not_utf8).unwrap_err();
        assert_eq!(ours.to_string(), theirs.to_string());
        assert_eq!(
            ours.to_string(),
            "invalid unicode code point at line 1 column 7"
        );
    }
}
