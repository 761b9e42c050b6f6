//! The spec's JSON Schema (from the `raw` types) and the structural check that reports every
//! unknown key, wrong type and missing field at once, each at its place in the file.

use serde_json::Value;

use crate::diag::{Diagnostic, did_you_mean};
use crate::raw::RawSpec;
use crate::tree::{Tree, join, pointer_to_path};

/// The JSON Schema of a kiln spec (draft 2020-12), as `kiln schema` prints it.
pub fn json_schema() -> Value {
    let mut schema = serde_json::to_value(schemars::schema_for!(RawSpec)).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut schema {
        map.insert("$id".into(), Value::String("https://kiln.invalid/schema/kiln-v1.json".into()));
        map.insert("title".into(), Value::String("kiln spec (kiln/v1)".into()));
    }
    strip_null(&mut schema);
    schema
}

/// An absent key is how a spec leaves a field to its default; an empty value (`zram:`) is
/// more likely a mistake, so the schema does not allow null where serde's Option would.
fn strip_null(v: &mut Value) {
    match v {
        Value::Object(map) => {
            if let Some(Value::Array(types)) = map.get_mut("type") {
                types.retain(|t| t != "null");
                if types.len() == 1 {
                    let only = types[0].clone();
                    map.insert("type".into(), only);
                }
            }
            if let Some(Value::Array(any)) = map.get("anyOf") {
                let non_null: Vec<Value> =
                    any.iter().filter(|s| s.get("type") != Some(&Value::from("null"))).cloned().collect();
                if non_null.len() == 1 && any.len() == 2 {
                    map.remove("anyOf");
                    if let Value::Object(inner) = &non_null[0] {
                        for (k, val) in inner {
                            map.entry(k.clone()).or_insert_with(|| val.clone());
                        }
                    }
                }
            }
            map.values_mut().for_each(strip_null);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_null),
        _ => {}
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::Null => "an empty value".into(),
        Value::Bool(b) => format!("`{b}`"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the text `{s}`"),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "a mapping".into(),
    }
}

fn type_name(t: &str) -> &str {
    match t {
        "object" => "a mapping",
        "array" => "a list",
        "string" => "text",
        "integer" => "a whole number",
        "number" => "a number",
        "boolean" => "true or false",
        other => other,
    }
}

/// The names a `oneOf` of `const`s or an `enum` allows, if the subschema is one.
fn allowed_names(sub: &Value) -> Option<Vec<String>> {
    if let Some(Value::Array(e)) = sub.get("enum") {
        return Some(e.iter().filter_map(|v| v.as_str().map(String::from)).collect());
    }
    let Some(Value::Array(one)) = sub.get("oneOf") else { return None };
    let mut names = Vec::new();
    for s in one {
        match (s.get("const"), s.get("enum")) {
            (Some(Value::String(c)), _) => names.push(c.clone()),
            (_, Some(Value::Array(e))) => names.extend(e.iter().filter_map(|v| v.as_str().map(String::from))),
            _ => return None,
        }
    }
    Some(names)
}

fn one_of_message(found: &Value, names: &[String]) -> String {
    let list = names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
    let word = found.as_str().map(String::from).unwrap_or_else(|| found.to_string());
    match did_you_mean(&word, names.iter().map(String::as_str)) {
        Some(s) => format!("`{word}` is not allowed; did you mean `{s}`? (one of {list})"),
        None => format!("{} is not allowed; use one of {list}", describe(found)),
    }
}

/// Checks the tree against the schema; every problem becomes a diagnostic at its place.
pub fn check(tree: &Tree) -> Vec<Diagnostic> {
    let schema = json_schema();
    let validator = match jsonschema::validator_for(&schema) {
        Ok(v) => v,
        Err(e) => {
            return vec![Diagnostic::new(
                Default::default(),
                "",
                format!("internal error: kiln's own schema is invalid: {e}"),
            )];
        }
    };
    let mut out = Vec::new();
    for err in validator.iter_errors(&tree.value) {
        let path = pointer_to_path(err.instance_path().as_str(), &tree.value);
        let schema_ptr = err.schema_path().as_str().to_string();
        let sub_parent =
            schema.pointer(schema_ptr.rsplit_once('/').map_or("", |(p, _)| p)).cloned().unwrap_or(Value::Null);
        let instance = err.instance().clone().into_owned();
        use jsonschema::error::ValidationErrorKind as K;
        match err.kind() {
            K::AdditionalProperties { unexpected } => {
                let known: Vec<String> = sub_parent
                    .get("properties")
                    .and_then(Value::as_object)
                    .map(|m| m.keys().cloned().collect())
                    .unwrap_or_default();
                for key in unexpected {
                    let at = join(&path, key);
                    let msg = match did_you_mean(key, known.iter().map(String::as_str)) {
                        Some(s) => format!("unknown key `{key}`; did you mean `{s}`?"),
                        None => format!("unknown key `{key}`; expected one of: {}", known.join(", ")),
                    };
                    out.push(Diagnostic::new(tree.index.key(&at), at, msg));
                }
            }
            K::Required { property } => {
                let name = property.as_str().unwrap_or_default();
                let what = sub_parent
                    .pointer(&format!("/properties/{name}/description"))
                    .and_then(Value::as_str)
                    .map(|d| format!(" ({d})"))
                    .unwrap_or_default();
                out.push(Diagnostic::new(
                    tree.index.key(&path),
                    path.clone(),
                    format!("missing required key `{name}`{what}"),
                ));
            }
            K::Type { kind } => {
                let expected = match kind {
                    jsonschema::error::TypeKind::Single(t) => type_name(&t.to_string()).to_string(),
                    jsonschema::error::TypeKind::Multiple(set) => {
                        set.iter().map(|t| type_name(&t.to_string()).to_string()).collect::<Vec<_>>().join(" or ")
                    }
                };
                out.push(Diagnostic::new(
                    tree.index.value(&path),
                    path.clone(),
                    format!("expected {expected}, found {}", describe(&instance)),
                ));
            }
            K::Enum { .. } | K::OneOfNotValid { .. } | K::AnyOf { .. } => {
                let sub = schema.pointer(&schema_ptr).cloned().unwrap_or(Value::Null);
                let sub = if sub.is_array() { sub_parent.clone() } else { sub };
                let msg = match allowed_names(&sub).or_else(|| allowed_names(&sub_parent)) {
                    Some(names) => one_of_message(&instance, &names),
                    None => format!("{} does not fit here: {err}", describe(&instance)),
                };
                out.push(Diagnostic::new(tree.index.value(&path), path.clone(), msg));
            }
            K::Minimum { limit } => out.push(Diagnostic::new(
                tree.index.value(&path),
                path.clone(),
                format!("{} is below the minimum, {limit}", describe(&instance)),
            )),
            K::Maximum { limit } => out.push(Diagnostic::new(
                tree.index.value(&path),
                path.clone(),
                format!("{} is above the maximum, {limit}", describe(&instance)),
            )),
            _ => out.push(Diagnostic::new(tree.index.value(&path), path.clone(), err.to_string())),
        }
    }
    out
}
