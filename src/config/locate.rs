//! Maps a field path (`steps[1].sql`, `inputs.orders.columns.amount`) to the line and column
//! where it is written in a YAML document.
//!
//! serde tells us *which* field is wrong (through `serde_path_to_error`) but, once a document has
//! parsed, no longer *where* it is. This module walks the document once with an event parser that
//! keeps source marks and records the position of every mapping key and sequence item, so any
//! later check (a missing SQL file, an unknown partition column) can point at the exact spot.
//! Paths use the same spelling as `serde_path_to_error`: `a.b[2].c`.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// A 1-based line and column in a source file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

/// A syntax error found while scanning the document.
#[derive(Debug, Clone)]
pub struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

/// Positions of every key and item of one YAML document.
#[derive(Debug, Default, Clone)]
pub struct Locator {
    positions: HashMap<String, Pos>,
}

enum Frame {
    /// In a mapping; `key` is set after a key scalar was read and until its value is done.
    Map {
        path: String,
        key: Option<String>,
    },
    Seq {
        path: String,
        index: usize,
    },
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    positions: HashMap<String, Pos>,
}

fn pos_of(mark: Marker) -> Pos {
    // yaml-rust2 lines are 1-based, columns 0-based.
    Pos {
        line: mark.line().max(1),
        col: mark.col() + 1,
    }
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

impl Builder {
    /// Called for every node (scalar, mapping, sequence) that starts: returns its own path, or
    /// None when the node is a mapping key (recorded, but not a value).
    fn enter_node(&mut self, mark: Marker, scalar: Option<&str>) -> Option<String> {
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Seq { path, index }) => {
                let p = format!("{path}[{index}]");
                *index += 1;
                self.positions.entry(p.clone()).or_insert(pos_of(mark));
                Some(p)
            }
            Some(Frame::Map { path, key }) => match key.take() {
                None => {
                    // This node is a key. Only scalar keys have a path.
                    let k = scalar.unwrap_or("?").to_string();
                    let p = join(path, &k);
                    let pos = pos_of(mark);
                    self.positions.entry(p).or_insert(pos);
                    // The parser marks a block mapping after its first key: start it at the key.
                    let own = self.positions.entry(path.clone()).or_insert(pos);
                    if (pos.line, pos.col) < (own.line, own.col) {
                        *own = pos;
                    }
                    *key = Some(k);
                    None
                }
                Some(k) => Some(join(path, &k)),
            },
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::Scalar(value, ..) => {
                self.enter_node(mark, Some(&value));
            }
            Event::Alias(_) => {
                self.enter_node(mark, None);
            }
            Event::MappingStart(..) => {
                let path = self.enter_node(mark, None).unwrap_or_default();
                self.positions.entry(path.clone()).or_insert(pos_of(mark));
                self.stack.push(Frame::Map { path, key: None });
            }
            Event::SequenceStart(..) => {
                let path = self.enter_node(mark, None).unwrap_or_default();
                self.positions.entry(path.clone()).or_insert(pos_of(mark));
                self.stack.push(Frame::Seq { path, index: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

impl Locator {
    /// Scans `text`; a YAML syntax error is returned with its position.
    pub fn build(text: &str) -> Result<Self, SyntaxError> {
        let mut builder = Builder::default();
        let mut parser = Parser::new_from_str(text);
        parser.load(&mut builder, false).map_err(|e| SyntaxError {
            pos: pos_of(*e.marker()),
            message: e.info().to_string(),
        })?;
        Ok(Self {
            positions: builder.positions,
        })
    }

    /// The position of `path`, or of its nearest written ancestor (a missing field is reported
    /// where its parent is), or 1:1.
    pub fn locate(&self, path: &str) -> Pos {
        let mut p = normalize(path);
        loop {
            if let Some(pos) = self.positions.get(&p) {
                return *pos;
            }
            match parent(&p) {
                Some(up) => p = up,
                None => return Pos { line: 1, col: 1 },
            }
        }
    }
}

/// `serde_path_to_error` writes the root as `.` and unknown segments as `?`.
pub fn normalize(path: &str) -> String {
    let p = path.trim_start_matches('.');
    if p == "." || p == "?" {
        String::new()
    } else {
        p.replace(".?", "")
    }
}

fn parent(path: &str) -> Option<String> {
    if path.is_empty() {
        return None;
    }
    let cut = path.rfind(['.', '[']).unwrap_or(0);
    Some(path[..cut].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "description: x\ninputs:\n  orders:\n    url: file://a\n    columns: { id: int64, amount: float64 }\nsteps:\n  - name: a\n    sql: sql/a.sql\n  - { name: b, sql: sql/b.sql }\n";

    #[test]
    fn keys_and_items_have_positions() {
        let loc = Locator::build(DOC).unwrap();
        assert_eq!(loc.locate("description"), Pos { line: 1, col: 1 });
        assert_eq!(loc.locate("inputs.orders.url"), Pos { line: 4, col: 5 });
        assert_eq!(
            loc.locate("inputs.orders.columns.amount"),
            Pos { line: 5, col: 27 }
        );
        assert_eq!(loc.locate("steps[0].sql"), Pos { line: 8, col: 5 });
        assert_eq!(loc.locate("steps[1].sql"), Pos { line: 9, col: 16 });
        assert_eq!(loc.locate("steps[1]"), Pos { line: 9, col: 5 });
    }

    #[test]
    fn missing_paths_fall_back_to_the_nearest_parent() {
        let loc = Locator::build(DOC).unwrap();
        assert_eq!(loc.locate("steps[0].kmeans.k"), Pos { line: 7, col: 5 });
        assert_eq!(loc.locate(".nope"), Pos { line: 1, col: 1 });
    }

    #[test]
    fn syntax_errors_have_positions() {
        let err = Locator::build("a: 1\nb: [1, 2\nc: 3\n").unwrap_err();
        assert!(err.pos.line >= 2, "{err:?}");
    }
}
