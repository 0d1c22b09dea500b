//! `models:/` URIs and the names they carry.

use std::fmt;
use std::str::FromStr;

use crate::StoreError;

/// Which version of a model: `models:/<name>/<version>`, `models:/<name>@<alias>`, or
/// `models:/<name>/latest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelUri {
    pub name: String,
    pub selector: Selector,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    Version(u64),
    Alias(String),
    Latest,
}

impl FromStr for ModelUri {
    type Err = StoreError;

    fn from_str(uri: &str) -> Result<Self, StoreError> {
        let bad = |why: &str| StoreError::BadUri {
            uri: uri.to_owned(),
            why: why.to_owned(),
        };
        let rest = uri
            .strip_prefix("models:/")
            .ok_or_else(|| bad("expected models:/<name>/<version>, models:/<name>@<alias> or models:/<name>/latest"))?;
        let (name, selector) = if let Some((name, alias)) = rest.split_once('@') {
            check_name("alias", alias).map_err(|e| bad(&e))?;
            (name, Selector::Alias(alias.to_owned()))
        } else if let Some((name, version)) = rest.split_once('/') {
            let selector = match version {
                "latest" => Selector::Latest,
                v => match v.parse::<u64>() {
                    Ok(n) if n > 0 && !v.starts_with('0') => Selector::Version(n),
                    _ => {
                        return Err(bad(
                            "the version must be a positive whole number or `latest`",
                        ));
                    }
                },
            };
            (name, selector)
        } else {
            return Err(bad(
                "name a version: models:/<name>/<version>, models:/<name>@<alias> or models:/<name>/latest",
            ));
        };
        check_name("model name", name).map_err(|e| bad(&e))?;
        Ok(Self {
            name: name.to_owned(),
            selector,
        })
    }
}

impl fmt::Display for ModelUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.selector {
            Selector::Version(v) => write!(f, "models:/{}/{v}", self.name),
            Selector::Alias(a) => write!(f, "models:/{}@{a}", self.name),
            Selector::Latest => write!(f, "models:/{}/latest", self.name),
        }
    }
}

/// Model and alias names become directory and file entries: 1-128 characters from
/// `A-Z a-z 0-9 . _ -`, starting with a letter or digit (so no `..`, `/`, empty or control
/// characters).
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && !name.contains("..");
    if valid {
        Ok(())
    } else {
        Err(format!(
            "invalid {what} {name:?}: use 1-128 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_forms() {
        let uri: ModelUri = "models:/support-bot/3".parse().unwrap();
        assert_eq!(uri.selector, Selector::Version(3));
        let uri: ModelUri = "models:/support-bot@production".parse().unwrap();
        assert_eq!(uri.selector, Selector::Alias("production".to_owned()));
        let uri: ModelUri = "models:/support-bot/latest".parse().unwrap();
        assert_eq!(uri.selector, Selector::Latest);
        assert_eq!(uri.name, "support-bot");
        assert_eq!(uri.to_string(), "models:/support-bot/latest");
    }

    #[test]
    fn rejects_traversal_and_junk() {
        for bad in [
            "support-bot/1",
            "models:/support-bot",
            "models:/../etc/1",
            "models:/a/b/1",
            "models:/bot/0",
            "models:/bot/01",
            "models:/bot/-1",
            "models:/bot@",
            "models:/bot@../x",
            "models:/@prod",
            "models:/b\u{7}ot/1",
            "models:/.hidden/1",
        ] {
            assert!(bad.parse::<ModelUri>().is_err(), "{bad}");
        }
    }
}
