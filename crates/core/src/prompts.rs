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
        let new_tera = || {
            let mut tera = tera::Tera::new();
            // Prompts are text for an LLM, not HTML: never escape.
            tera.autoescape_on(Vec::<&str>::new());
            tera
        };
        let mut sources: Vec<(&str, &str)> = sources.into_iter().collect();
        sources.sort_unstable();
        // Every template's syntax on its own, so that all errors are listed at once (what one
        // template refers to in another — extends, include — is checked below, with all).
        let syntax_errors: Vec<String> = sources
            .iter()
            .filter_map(
                |&(name, source)| match new_tera().add_raw_template(name, source) {
                    Err(e) if matches!(e.kind(), tera::ErrorKind::SyntaxError(_)) => {
                        Some(format!("template '{name}': {}", crate::error_chain(&e)))
                    }
                    _ => None,
                },
            )
            .collect();
        if !syntax_errors.is_empty() {
            return Err(syntax_errors.join("; "));
        }
        // All at once: a template may extend or include one that comes after it.
        let mut tera = new_tera();
        tera.add_raw_templates(sources.iter().copied())
            .map_err(|e| crate::error_chain(&e))?;
        let names = sources.iter().map(|(name, _)| (*name).to_owned()).collect();
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
            // Hidden files (an editor's, say) are not templates.
            let hidden = path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'));
            if path.extension().is_some_and(|e| e == "tera") && !hidden {
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
        // Every broken template is named, not only the first.
        let error =
            Prompts::from_sources([("b", "{% if x %}"), ("fine", "ok"), ("a", "Hello {{ name")])
                .unwrap_err();
        assert!(
            error.starts_with("template 'a'") && error.contains("; template 'b'"),
            "{error}"
        );
    }

    #[test]
    fn a_template_may_extend_one_given_after_it() {
        let base = ("base", "B[{% block body %}{% endblock body %}]");
        let child = (
            "child",
            "{% extends \"base\" %}{% block body %}{{ x }}{% endblock body %}",
        );
        for sources in [[base, child], [child, base]] {
            let prompts = Prompts::from_sources(sources).unwrap();
            assert_eq!(prompts.render("child", &json!({"x": 1})).unwrap(), "B[1]");
            assert_eq!(prompts.names(), ["base", "child"]);
        }
        let orphan = Prompts::from_sources([child]).unwrap_err();
        assert!(orphan.contains("base"), "{orphan}");
        // And include one, in either order.
        let part = ("part", "[{{ x }}]");
        let whole = ("whole", "A{% include \"part\" %}B");
        for sources in [[part, whole], [whole, part]] {
            let prompts = Prompts::from_sources(sources).unwrap();
            assert_eq!(prompts.render("whole", &json!({"x": 2})).unwrap(), "A[2]B");
        }
        let missing = Prompts::from_sources([whole]).unwrap_err();
        assert!(missing.contains("part"), "{missing}");
    }
}
