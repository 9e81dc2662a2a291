//! YAML with positions: turns a multi-document YAML file into JSON values plus an index from
//! field path (`spec.http[2].route[0].weight`) to line and column, so every later error, from
//! serde or from validation, can point at the exact place in the user's file.
//!
//! Scalars are resolved with the YAML 1.2 core schema (what Kubernetes tooling emits): plain
//! `true`/`false`, `null`/`~`, integers and floats become typed values, quoted scalars stay
//! strings.

use std::collections::HashMap;

use serde_json::{Map, Number, Value};
use yaml_rust2::parser::{Event, Parser, Tag};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// A 1-based line and column in a source file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

impl From<Marker> for Pos {
    fn from(m: Marker) -> Self {
        Pos {
            line: m.line(),
            column: m.col() + 1,
        }
    }
}

/// One YAML document: its value, where it starts, and where each field path sits.
#[derive(Debug, Clone)]
pub struct Document {
    pub value: Value,
    pub start: Pos,
    positions: HashMap<String, Pos>,
}

impl Document {
    /// A document that did not come from YAML text (an object read from the Kubernetes API
    /// server): every path is reported at its start.
    pub fn unpositioned(value: Value) -> Document {
        Document {
            value,
            start: Pos::default(),
            positions: HashMap::new(),
        }
    }

    /// Position of `path`, or of its nearest ancestor that has one (a missing field is reported
    /// where its parent is).
    pub fn position(&self, path: &str) -> Pos {
        let mut p = path;
        loop {
            if let Some(pos) = self.positions.get(p) {
                return *pos;
            }
            match p.rfind(['.', '[']) {
                Some(i) => p = &p[..i],
                None => return self.start,
            }
        }
    }
}

/// A YAML syntax problem, with where it is.
#[derive(Debug, Clone)]
pub struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

/// Parses every document of `src`. Empty documents (a stray `---`) are dropped.
pub fn parse_documents(src: &str) -> Result<Vec<Document>, SyntaxError> {
    let mut b = Builder {
        parser: Parser::new_from_str(src),
        anchors: HashMap::new(),
        positions: HashMap::new(),
    };
    let mut docs = Vec::new();
    loop {
        let (ev, mark) = b.next()?;
        match ev {
            Event::StreamStart | Event::DocumentEnd | Event::Nothing => {}
            Event::StreamEnd => break,
            Event::DocumentStart => {
                let (ev, mark) = b.next()?;
                if ev == Event::DocumentEnd {
                    continue;
                }
                let mut path = String::new();
                let value = b.node(ev, mark, &mut path)?;
                let positions = std::mem::take(&mut b.positions);
                b.anchors.clear();
                if !value.is_null() {
                    docs.push(Document {
                        value,
                        start: mark.into(),
                        positions,
                    });
                }
            }
            other => {
                return Err(SyntaxError {
                    pos: mark.into(),
                    message: format!("unexpected YAML event {other:?}"),
                })
            }
        }
    }
    Ok(docs)
}

struct Builder<'a> {
    parser: Parser<std::str::Chars<'a>>,
    anchors: HashMap<usize, Value>,
    positions: HashMap<String, Pos>,
}

impl Builder<'_> {
    fn next(&mut self) -> Result<(Event, Marker), SyntaxError> {
        self.parser.next_token().map_err(|e| SyntaxError {
            pos: (*e.marker()).into(),
            message: e.info().to_string(),
        })
    }

    fn node(&mut self, ev: Event, mark: Marker, path: &mut String) -> Result<Value, SyntaxError> {
        self.positions.insert(path.clone(), mark.into());
        let (value, anchor) = match ev {
            Event::Scalar(text, style, anchor, tag) => (scalar(text, style, tag.as_ref()), anchor),
            Event::Alias(id) => {
                let v = self.anchors.get(&id).cloned().ok_or_else(|| SyntaxError {
                    pos: mark.into(),
                    message: "alias to an unknown anchor".into(),
                })?;
                return Ok(v);
            }
            Event::SequenceStart(anchor, _) => {
                let mut items = Vec::new();
                loop {
                    let (ev, mark) = self.next()?;
                    if ev == Event::SequenceEnd {
                        break;
                    }
                    let len = path.len();
                    path.push_str(&format!("[{}]", items.len()));
                    items.push(self.node(ev, mark, path)?);
                    path.truncate(len);
                }
                (Value::Array(items), anchor)
            }
            Event::MappingStart(anchor, _) => {
                let mut map = Map::new();
                loop {
                    let (ev, kmark) = self.next()?;
                    if ev == Event::MappingEnd {
                        break;
                    }
                    let key = match ev {
                        Event::Scalar(text, ..) => text,
                        _ => {
                            return Err(SyntaxError {
                                pos: kmark.into(),
                                message: "mapping keys must be plain strings".into(),
                            })
                        }
                    };
                    if map.contains_key(&key) {
                        return Err(SyntaxError {
                            pos: kmark.into(),
                            message: format!("duplicate key `{key}`"),
                        });
                    }
                    let len = path.len();
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(&key);
                    let (ev, vmark) = self.next()?;
                    let v = self.node(ev, vmark, path)?;
                    // Point a field at its key: that is where a person looks for it.
                    self.positions.insert(path.clone(), kmark.into());
                    path.truncate(len);
                    map.insert(key, v);
                }
                (Value::Object(map), anchor)
            }
            other => {
                return Err(SyntaxError {
                    pos: mark.into(),
                    message: format!("unexpected YAML event {other:?}"),
                })
            }
        };
        if anchor > 0 {
            self.anchors.insert(anchor, value.clone());
        }
        Ok(value)
    }
}

fn scalar(text: String, style: TScalarStyle, tag: Option<&Tag>) -> Value {
    if let Some(tag) = tag {
        if tag.suffix == "str" {
            return Value::String(text);
        }
    }
    if style != TScalarStyle::Plain {
        return Value::String(text);
    }
    match text.as_str() {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    if let Some(n) = parse_int(&text) {
        return Value::Number(n);
    }
    if looks_like_float(&text) {
        if let Some(n) = text.parse::<f64>().ok().and_then(Number::from_f64) {
            return Value::Number(n);
        }
    }
    Value::String(text)
}

fn parse_int(t: &str) -> Option<Number> {
    let (neg, digits) = match t.as_bytes().first()? {
        b'-' => (true, &t[1..]),
        b'+' => (false, &t[1..]),
        _ => (false, t),
    };
    let (radix, digits) = if let Some(h) = digits.strip_prefix("0x") {
        (16, h)
    } else if let Some(o) = digits.strip_prefix("0o") {
        (8, o)
    } else {
        (10, digits)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let v = i128::from_str_radix(digits, radix).ok()?;
    let v = if neg { -v } else { v };
    if let Ok(u) = u64::try_from(v) {
        Some(u.into())
    } else {
        i64::try_from(v).ok().map(Into::into)
    }
}

fn looks_like_float(t: &str) -> bool {
    let body = t.trim_start_matches(['-', '+']);
    !body.is_empty()
        && body
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit() || c == '.')
        && body
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '-' | '+'))
        && body.chars().any(|c| c.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_point_at_keys_and_items() {
        let src =
            "a: 1\n---\nkind: X\nspec:\n  http:\n  - route:\n    - weight: 50\n      x: '7'\n";
        let docs = parse_documents(src).unwrap();
        assert_eq!(docs.len(), 2);
        let d = &docs[1];
        assert_eq!(d.value["spec"]["http"][0]["route"][0]["weight"], 50);
        assert_eq!(d.value["spec"]["http"][0]["route"][0]["x"], "7");
        assert_eq!(
            d.position("spec.http[0].route[0].weight"),
            Pos { line: 7, column: 7 }
        );
        assert_eq!(
            d.position("spec.http[0].route[0].x"),
            Pos { line: 8, column: 7 }
        );
        // A field that is not there is reported at its parent.
        assert_eq!(d.position("spec.http[0].route[0].missing").line, 7);
        assert_eq!(d.position("kind"), Pos { line: 3, column: 1 });
    }

    #[test]
    fn scalars_follow_the_core_schema() {
        let docs =
            parse_documents("a: true\nb: 'true'\nc: 0x10\nd: 1.5\ne: ~\nf: 1.2.3.4\ng: -3\n")
                .unwrap();
        let v = &docs[0].value;
        assert_eq!(v["a"], true);
        assert_eq!(v["b"], "true");
        assert_eq!(v["c"], 16);
        assert_eq!(v["d"], 1.5);
        assert!(v["e"].is_null());
        assert_eq!(v["f"], "1.2.3.4");
        assert_eq!(v["g"], -3);
    }

    #[test]
    fn anchors_and_duplicate_keys() {
        let docs = parse_documents("x: &l {app: a}\ny: *l\n").unwrap();
        assert_eq!(docs[0].value["y"]["app"], "a");
        let err = parse_documents("a: 1\nb: 2\na: 3\n").unwrap_err();
        assert_eq!(err.pos.line, 3);
        assert!(err.message.contains("duplicate key"));
    }

    #[test]
    fn syntax_errors_have_positions() {
        let err = parse_documents("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(err.pos.line >= 1, "{err:?}");
    }
}
