//! `{{ name }}` substitution in SQL files. Deliberately tiny (no logic, no loops): SQL stays SQL.
//! Names: `run_date` (YYYY-MM-DD), `run_date_nodash`, `job`, `params.<name>`.
//! An undefined name is an error that points at its line and column in the SQL file.

use std::collections::BTreeMap;

/// A name used in a template that has no value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateError {
    pub line: usize,
    pub col: usize,
    pub message: String,
}

/// Replaces every `{{ name }}` in `text` with its value from `vars`.
pub fn render(text: &str, vars: &BTreeMap<String, String>) -> Result<String, Vec<TemplateError>> {
    let mut out = String::with_capacity(text.len());
    let mut errors = Vec::new();
    let mut rest = text;
    let mut consumed = 0;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let (line, col) = line_col(text, consumed + start);
        let Some(end) = after.find("}}") else {
            errors.push(TemplateError {
                line,
                col,
                message: "`{{` is not closed by `}}`".into(),
            });
            return Err(errors);
        };
        let name = after[..end].trim();
        match vars.get(name) {
            Some(v) => out.push_str(v),
            None => errors.push(TemplateError {
                line,
                col,
                message: undefined(name, vars),
            }),
        }
        let skip = start + 2 + end + 2;
        consumed += skip;
        rest = &rest[skip..];
    }
    out.push_str(rest);
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

fn undefined(name: &str, vars: &BTreeMap<String, String>) -> String {
    let known: Vec<&str> = vars.keys().map(String::as_str).collect();
    if let Some(p) = name.strip_prefix("params.") {
        format!(
            "undefined template variable `{name}`: add `{p}` under `params:` in the job, or use one of: {}",
            known.join(", ")
        )
    } else {
        format!(
            "undefined template variable `{name}`; defined: {}",
            known.join(", ")
        )
    }
}

fn line_col(text: &str, byte: usize) -> (usize, usize) {
    let before = &text[..byte];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(byte, |i| byte - i - 1) + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> BTreeMap<String, String> {
        BTreeMap::from([
            ("run_date".to_string(), "2026-11-22".to_string()),
            ("params.margin".to_string(), "0.3".to_string()),
        ])
    }

    #[test]
    fn substitutes_names() {
        let r = render("select {{run_date}}, {{ params.margin }} x", &vars()).unwrap();
        assert_eq!(r, "select 2026-11-22, 0.3 x");
    }

    #[test]
    fn undefined_names_are_located() {
        let e = render("select 1\n  , {{ params.nope }}\n, {{ oops }}", &vars()).unwrap_err();
        assert_eq!(e.len(), 2);
        assert_eq!((e[0].line, e[0].col), (2, 5));
        assert!(e[0].message.contains("add `nope` under `params:`"));
        assert_eq!((e[1].line, e[1].col), (3, 3));
    }

    #[test]
    fn unclosed_braces_are_an_error() {
        assert!(render("select {{ run_date", &vars()).is_err());
    }
}
