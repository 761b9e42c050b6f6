//! The spec as a YAML tree with positions: parsed once with serde-saphyr, turned into a
//! JSON value for schema checks and typed deserialization, plus an index from each field
//! path (`memory.zram.size`, `models[1].sha256`) to where its key and value are written.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use serde_saphyr::Spanned;

use crate::diag::{Diagnostic, Pos};

/// Where a field's key and value sit in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    /// The key (for sequence items: the item itself).
    pub key: Pos,
    pub value: Pos,
}

/// Field path -> place. The root is the empty path.
#[derive(Debug, Clone, Default)]
pub struct Index {
    places: BTreeMap<String, Place>,
}

impl Index {
    /// Position of the key at `path`, or of its nearest written ancestor.
    pub fn key(&self, path: &str) -> Pos {
        self.lookup(path).key
    }
    /// Position of the value at `path`, or of its nearest written ancestor's key.
    pub fn value(&self, path: &str) -> Pos {
        match self.places.get(path) {
            Some(p) => p.value,
            None => self.lookup(path).key,
        }
    }
    /// Whether `path` is written in the file (as opposed to filled by a default).
    pub fn has(&self, path: &str) -> bool {
        self.places.contains_key(path)
    }
    fn lookup(&self, path: &str) -> Place {
        let mut p = path;
        loop {
            if let Some(place) = self.places.get(p) {
                return *place;
            }
            match parent(p) {
                Some(up) => p = up,
                None => return Place { key: Pos { line: 1, col: 1 }, value: Pos { line: 1, col: 1 } },
            }
        }
    }
}

/// `a.b[2].c` -> `a.b[2]` -> `a.b` -> `a` -> `` -> None.
fn parent(path: &str) -> Option<&str> {
    if path.is_empty() {
        return None;
    }
    let cut = path.rfind(['.', '[']).unwrap_or(0);
    Some(&path[..cut])
}

/// Joins a child key onto a field path.
pub fn join(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_string() } else { format!("{path}.{key}") }
}

/// Joins a sequence index onto a field path.
pub fn join_index(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

/// Converts a JSON pointer (`/models/1/sha256`) into a field path (`models[1].sha256`).
pub fn pointer_to_path(pointer: &str, root: &Value) -> String {
    let mut path = String::new();
    let mut node = Some(root);
    for raw in pointer.split('/').skip(1) {
        let seg = raw.replace("~1", "/").replace("~0", "~");
        match node {
            Some(Value::Array(items)) => {
                let i: usize = seg.parse().unwrap_or(0);
                path = join_index(&path, i);
                node = items.get(i);
            }
            Some(Value::Object(map)) => {
                node = map.get(&seg);
                path = join(&path, &seg);
            }
            _ => {
                path = join(&path, &seg);
                node = None;
            }
        }
    }
    path
}

/// Removes the value at a field path (`memory.zram.size`, `models[1]`), if present.
pub fn remove(root: &mut Value, path: &str) {
    let Some(up) = parent(path) else { return };
    let last = &path[up.len()..];
    let Some(container) = get_mut(root, up) else { return };
    if let Some(key) = last.strip_prefix('.').or(if up.is_empty() { Some(last) } else { None }) {
        if let Value::Object(map) = container {
            map.remove(key);
        }
    } else if let Some(i) =
        last.strip_prefix('[').and_then(|x| x.strip_suffix(']')).and_then(|x| x.parse::<usize>().ok())
        && let Value::Array(items) = container
        && i < items.len()
    {
        items.remove(i);
    }
}

fn get_mut<'a>(root: &'a mut Value, path: &str) -> Option<&'a mut Value> {
    if path.is_empty() {
        return Some(root);
    }
    let up = parent(path)?;
    let last = &path[up.len()..];
    let container = get_mut(root, up)?;
    match last.strip_prefix('[').and_then(|x| x.strip_suffix(']')) {
        Some(i) => container.get_mut(i.parse::<usize>().ok()?),
        None => container.get_mut(last.strip_prefix('.').unwrap_or(last)),
    }
}

enum Node {
    Null,
    Bool(bool),
    Int(serde_json::Number),
    Float(f64),
    Str(String),
    Seq(Vec<Spanned<Node>>),
    Map(Vec<(Spanned<Node>, Spanned<Node>)>),
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Node;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any YAML value")
            }
            fn visit_unit<E>(self) -> Result<Node, E> {
                Ok(Node::Null)
            }
            fn visit_none<E>(self) -> Result<Node, E> {
                Ok(Node::Null)
            }
            fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
                Node::deserialize(d)
            }
            fn visit_bool<E>(self, v: bool) -> Result<Node, E> {
                Ok(Node::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Node, E> {
                Ok(Node::Int(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Node, E> {
                Ok(Node::Int(v.into()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Node, E> {
                Ok(Node::Float(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Node, E> {
                Ok(Node::Str(v.to_string()))
            }
            fn visit_string<E>(self, v: String) -> Result<Node, E> {
                Ok(Node::Str(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Node, A::Error> {
                let mut items = Vec::new();
                while let Some(x) = a.next_element()? {
                    items.push(x);
                }
                Ok(Node::Seq(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Node, A::Error> {
                let mut items = Vec::new();
                while let Some(entry) = a.next_entry()? {
                    items.push(entry);
                }
                Ok(Node::Map(items))
            }
        }
        d.deserialize_any(V)
    }
}

/// The parsed spec: its JSON value and where each field is written.
#[derive(Debug, Clone)]
pub struct Tree {
    pub value: Value,
    pub index: Index,
}

fn pos(loc: serde_saphyr::Location) -> Pos {
    Pos { line: loc.line().max(1), col: loc.column().max(1) }
}

/// Parses YAML text. A syntax error is returned as one diagnostic with its position.
pub fn parse(text: &str) -> Result<Tree, Vec<Diagnostic>> {
    let root: Spanned<Node> = match serde_saphyr::from_str(text) {
        Ok(root) => root,
        Err(e) => {
            let p = e.location().map(pos).unwrap_or(Pos { line: 1, col: 1 });
            return Err(vec![Diagnostic::new(p, "", format!("invalid YAML: {}", saphyr_message(&e)))]);
        }
    };
    let mut index = Index::default();
    let mut errors = Vec::new();
    let root_pos = pos(root.referenced);
    index.places.insert(String::new(), Place { key: root_pos, value: root_pos });
    let value = convert(root.value, "", &mut index, &mut errors);
    if errors.is_empty() { Ok(Tree { value, index }) } else { Err(errors) }
}

/// serde-saphyr's message without its `line X column Y:` prefix and snippet: we print our own.
fn saphyr_message(e: &serde_saphyr::Error) -> String {
    let text = e.without_snippet().to_string();
    let first = text.lines().next().unwrap_or_default();
    let first = first.strip_prefix("error: ").unwrap_or(first);
    let msg = match first.split_once(": ") {
        Some((head, rest)) if head.starts_with("line ") => rest,
        _ => first,
    };
    // The position is printed in front; drop the parser's own copy of it.
    let msg = match msg.rfind(" at line ") {
        Some(i) => &msg[..i],
        None => msg,
    };
    match msg.strip_prefix("duplicate mapping key: ") {
        Some(rest) => {
            let key = rest.split(',').next().unwrap_or(rest);
            format!("`{key}` appears twice in the same mapping; keep one")
        }
        None => msg.to_string(),
    }
}

fn convert(node: Node, path: &str, index: &mut Index, errors: &mut Vec<Diagnostic>) -> Value {
    match node {
        Node::Null => Value::Null,
        Node::Bool(b) => Value::Bool(b),
        Node::Int(n) => Value::Number(n),
        Node::Float(f) => serde_json::Number::from_f64(f).map_or(Value::String(f.to_string()), Value::Number),
        Node::Str(s) => Value::String(s),
        Node::Seq(items) => Value::Array(
            items
                .into_iter()
                .enumerate()
                .map(|(i, item)| {
                    let child = join_index(path, i);
                    let p = pos(item.referenced);
                    index.places.insert(child.clone(), Place { key: p, value: p });
                    convert(item.value, &child, index, errors)
                })
                .collect(),
        ),
        Node::Map(entries) => {
            let mut map = serde_json::Map::new();
            for (k, v) in entries {
                let key_pos = pos(k.referenced);
                let key = match k.value {
                    Node::Str(s) => s,
                    Node::Int(n) => n.to_string(),
                    Node::Bool(b) => b.to_string(),
                    _ => {
                        errors.push(Diagnostic::new(key_pos, path, "keys must be plain words such as `name`"));
                        continue;
                    }
                };
                let child = join(path, &key);
                index.places.insert(child.clone(), Place { key: key_pos, value: pos(v.referenced) });
                let value = convert(v.value, &child, index, errors);
                map.insert(key, value);
            }
            Value::Object(map)
        }
    }
}
