//! `{{ name }}` substitution in SQL files. Deliberately tiny (no logic, no loops): SQL stays SQL.
//! Names: `run_date` (YYYY-MM-DD), `run_date_nodash`, `job`, `params.<name>`.
//!
//! A template is parsed once, when the job is loaded (an unclosed `{{` or an undefined name is
//! an error at its line and column in the SQL file). Rendering keeps a map from the rendered
//! text back to the file as written, so an error DataFusion reports at a line and column of the
//! rendered SQL is shown where the user wrote it ([`Rendered::original`]), also on lines where a
//! `{{ … }}` was replaced by a value of another length.

use std::collections::BTreeMap;

/// A problem in a template, at a 1-based line and column of the SQL file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateError {
    pub line: usize,
    pub col: usize,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    /// Text copied as it is (a byte range of the source).
    Text(std::ops::Range<usize>),
    /// `{{ name }}` at a byte range of the source.
    Var {
        name: String,
        at: std::ops::Range<usize>,
    },
}

/// A parsed SQL template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

/// A rendered template and where each of its pieces came from.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub sql: String,
    /// (start in `sql`, start in the source, length in `sql`, whether it is a substituted
    /// value), in chars, in order.
    pieces: Vec<(usize, usize, usize, bool)>,
    source: String,
}

impl Template {
    /// Parses `text`. The only syntax error is a `{{` without its `}}`.
    pub fn parse(text: &str) -> Result<Self, TemplateError> {
        let mut parts = Vec::new();
        let mut pos = 0;
        while let Some(found) = text[pos..].find("{{") {
            let start = pos + found;
            if start > pos {
                parts.push(Part::Text(pos..start));
            }
            let Some(len) = text[start + 2..].find("}}") else {
                let (line, col) = line_col(text, start);
                return Err(TemplateError {
                    line,
                    col,
                    message: "`{{` is not closed by `}}`".into(),
                });
            };
            let end = start + 2 + len + 2;
            parts.push(Part::Var {
                name: text[start + 2..start + 2 + len].trim().to_string(),
                at: start..end,
            });
            pos = end;
        }
        if pos < text.len() {
            parts.push(Part::Text(pos..text.len()));
        }
        Ok(Self {
            source: text.to_string(),
            parts,
        })
    }

    /// The names used that `known` does not define, each at its place in the file.
    pub fn undefined(&self, known: &BTreeMap<String, String>) -> Vec<TemplateError> {
        self.parts
            .iter()
            .filter_map(|p| match p {
                Part::Var { name, at } if !known.contains_key(name) => {
                    let (line, col) = line_col(&self.source, at.start);
                    Some(TemplateError {
                        line,
                        col,
                        message: undefined(name, known),
                    })
                }
                _ => None,
            })
            .collect()
    }

    /// The SQL with every name replaced by its value from `vars`; all errors are returned.
    pub fn render(&self, vars: &BTreeMap<String, String>) -> Result<Rendered, Vec<TemplateError>> {
        let errors = self.undefined(vars);
        if !errors.is_empty() {
            return Err(errors);
        }
        let mut sql = String::with_capacity(self.source.len());
        let mut pieces = Vec::with_capacity(self.parts.len());
        let (mut out_chars, mut src_chars) = (0, 0);
        for part in &self.parts {
            let (text, source_len, var) = match part {
                Part::Text(r) => (&self.source[r.clone()], r.len(), false),
                Part::Var { name, at } => (vars[name].as_str(), at.len(), true),
            };
            let n = text.chars().count();
            pieces.push((out_chars, src_chars, n, var));
            sql.push_str(text);
            out_chars += n;
            let range_start = match part {
                Part::Text(r) => r.start,
                Part::Var { at, .. } => at.start,
            };
            src_chars += self.source[range_start..range_start + source_len]
                .chars()
                .count();
        }
        Ok(Rendered {
            sql,
            pieces,
            source: self.source.clone(),
        })
    }
}

impl Rendered {
    /// The 1-based (line, column) in the file as written of a 1-based (line, column) of the
    /// rendered SQL (columns count characters, as the SQL parser does). A position inside a
    /// substituted value maps to the `{{` it replaced.
    pub fn original(&self, line: usize, col: usize) -> (usize, usize) {
        let Some(at) = char_offset(&self.sql, line, col) else {
            return (line.max(1), col.max(1));
        };
        let piece = self
            .pieces
            .iter()
            .rev()
            .find(|(start, ..)| *start <= at)
            .copied();
        let src = match piece {
            Some((start, src, _, false)) => src + (at - start),
            Some((_, src, _, true)) => src,
            None => at,
        };
        let byte = self
            .source
            .char_indices()
            .nth(src)
            .map_or(self.source.len(), |(b, _)| b);
        line_col(&self.source, byte)
    }
}

/// The char offset of a 1-based (line, column), columns in chars.
fn char_offset(text: &str, line: usize, col: usize) -> Option<usize> {
    let (mut l, mut c) = (1, 1);
    for (i, ch) in text.chars().enumerate() {
        if l == line && c == col {
            return Some(i);
        }
        if ch == '\n' {
            l += 1;
            c = 1;
        } else {
            c += 1;
        }
    }
    (l == line && c == col).then_some(text.chars().count())
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

/// The 1-based (line, column in chars) of a byte offset.
fn line_col(text: &str, byte: usize) -> (usize, usize) {
    let before = &text[..byte];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
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
        let t = Template::parse("select {{run_date}}, {{ params.margin }} x").unwrap();
        assert_eq!(t.render(&vars()).unwrap().sql, "select 2026-11-22, 0.3 x");
    }

    #[test]
    fn undefined_names_are_located() {
        let t = Template::parse("select 1\n  , {{ params.nope }}\n, {{ oops }}").unwrap();
        let e = t.render(&vars()).unwrap_err();
        assert_eq!(e.len(), 2);
        assert_eq!((e[0].line, e[0].col), (2, 5));
        assert!(e[0].message.contains("add `nope` under `params:`"));
        assert_eq!((e[1].line, e[1].col), (3, 3));
    }

    #[test]
    fn unclosed_braces_are_an_error() {
        let e = Template::parse("select\n  {{ run_date").unwrap_err();
        assert_eq!((e.line, e.col), (2, 3));
    }

    /// Before the map, an error after `{{ params.margin }}` (14 chars, rendered as 3) was
    /// reported 11 columns too far left.
    #[test]
    fn rendered_positions_map_back_to_the_file_as_written() {
        let text = "select a,\n  {{ params.margin }} * b, nope, {{ run_date }}\nfrom t";
        let r = Template::parse(text).unwrap().render(&vars()).unwrap();
        assert_eq!(r.sql, "select a,\n  0.3 * b, nope, 2026-11-22\nfrom t");
        let rendered_col = r.sql.lines().nth(1).unwrap().find("nope").unwrap() + 1;
        let written_col = text.lines().nth(1).unwrap().find("nope").unwrap() + 1;
        assert_ne!(rendered_col, written_col);
        assert_eq!(r.original(2, rendered_col), (2, written_col));
        // Inside a value: the `{{` it replaced; lines without templates are unchanged.
        assert_eq!(r.original(2, 4), (2, 3));
        assert_eq!(r.original(1, 8), (1, 8));
        assert_eq!(r.original(3, 6), (3, 6));
        // Multi-byte characters count once, as columns do.
        let t = Template::parse("select 'é', {{ run_date }}, x").unwrap();
        let r = t.render(&vars()).unwrap();
        let col = r.sql.chars().position(|c| c == 'x').unwrap() + 1;
        let want = "select 'é', {{ run_date }}, x"
            .chars()
            .position(|c| c == 'x')
            .unwrap()
            + 1;
        assert_eq!(r.original(1, col), (1, want));
    }
}
