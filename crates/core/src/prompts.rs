//! Prompt templates: Tera 2, strict, never HTML-escaped.

use std::path::Path;

use serde::Serialize;

/// A chain's compiled templates, named after their files (`prompts/system.tera` → `system`).
#[derive(Clone)]
pub struct Prompts {
    tera: tera::Tera,
    names: Vec<String>,
}

impl std::fmt::Debug for Prompts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prompts")
            .field("names", &self.names)
            .finish()
    }
}

impl Prompts {
    /// Compiles templates given as (name, source) pairs. A syntax error names the template.
    pub fn from_sources<'a>(
        sources: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, String> {
        let mut tera = tera::Tera::new();
        // Prompts are text for an LLM, not HTML: never escape.
        tera.autoescape_on(Vec::<&str>::new());
        let mut names = Vec::new();
        for (name, source) in sources {
            tera.add_raw_template(name, source)
                .map_err(|e| format!("template '{name}': {}", crate::error_chain(&e)))?;
            names.push(name.to_owned());
        }
        names.sort();
        Ok(Self { tera, names })
    }

    /// Compiles every `*.tera` file in `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self, String> {
        let mut sources = Vec::new();
        let entries =
            std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
        for entry in entries {
            let path = entry
                .map_err(|e| format!("cannot read {}: {e}", dir.display()))?
                .path();
            if path.extension().is_some_and(|e| e == "tera") {
                let name = path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let source = std::fs::read_to_string(&path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                sources.push((name, source));
            }
        }
        Self::from_sources(sources.iter().map(|(n, s)| (n.as_str(), s.as_str())))
            .map_err(|e| format!("{}: {e}", dir.display()))
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tera.contains_template(name)
    }

    /// Renders `name` with the fields of `vars` (a struct or map) as variables.
    pub fn render(&self, name: &str, vars: &impl Serialize) -> Result<String, String> {
        let context = tera::Context::from_serialize(vars).map_err(|e| {
            format!(
                "template '{name}': variables must be a map or struct: {}",
                crate::error_chain(&e)
            )
        })?;
        self.tera
            .render(name, &context)
            .map_err(|e| format!("template '{name}': {}", crate::error_chain(&e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_without_escaping() {
        let prompts = Prompts::from_sources([(
            "system",
            "You help with {{ product }}. Rules: {% for r in rules %}[{{ r }}]{% endfor %}",
        )])
        .unwrap();
        let text = prompts
            .render(
                "system",
                &json!({"product": "<Switch & Yard>", "rules": ["be \"kind\"", "a < b"]}),
            )
            .unwrap();
        assert_eq!(
            text,
            "You help with <Switch & Yard>. Rules: [be \"kind\"][a < b]"
        );
    }

    #[test]
    fn an_undefined_variable_is_an_error() {
        let prompts = Prompts::from_sources([("system", "Hello {{ nme }}")]).unwrap();
        let error = prompts
            .render("system", &json!({"name": "Ann"}))
            .unwrap_err();
        assert!(error.contains("template 'system'"), "{error}");
        assert!(error.contains("nme"), "{error}");
    }

    #[test]
    fn a_syntax_error_fails_at_compile_time() {
        let error = Prompts::from_sources([("broken", "Hello {{ name")]).unwrap_err();
        assert!(error.starts_with("template 'broken'"), "{error}");
    }
}
