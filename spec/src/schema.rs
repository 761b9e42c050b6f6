//! The spec's JSON Schema (from the `raw` types) and the structural check that reports every
//! unknown key, wrong type and missing field at once, each at its place in the file.

use serde::Deserialize;
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

/// Whether `value` passes the schema, decided without building it. The schema is generated
/// from `RawSpec` with the same serde attributes, but serde is more lenient in two ways: it
/// reads null as an absent value (the schema refuses null, `strip_null`), and it reads a
/// struct from a sequence. So a value passes here only if it holds no null, serde reads it as
/// a `RawSpec`, and writing that `RawSpec` back gives every key and value of the input again
/// (a number given for a quantity comes back as its text, an integer for a float as a float). Anything else gets the full check
/// and its messages. Building and compiling the schema is most of what loading a spec costs
/// (~2.7 ms of ~3 ms in a fresh process: jsonschema also checks the schema against its
/// meta-schema); `fast_path_never_accepts_what_the_schema_refuses` holds the two together.
fn passes_without_schema(value: &Value) -> bool {
    fn has_null(v: &Value) -> bool {
        match v {
            Value::Null => true,
            Value::Array(items) => items.iter().any(has_null),
            Value::Object(map) => map.values().any(has_null),
            _ => false,
        }
    }
    /// Every key and value of `input` is in `output`, in the same shape.
    fn covered(input: &Value, output: &Value) -> bool {
        match (input, output) {
            (Value::Object(a), Value::Object(b)) => a.iter().all(|(k, v)| b.get(k).is_some_and(|w| covered(v, w))),
            (Value::Array(a), Value::Array(b)) => a.len() == b.len() && a.iter().zip(b).all(|(v, w)| covered(v, w)),
            (Value::Number(n), Value::String(text)) => n.to_string() == *text,
            // An integer given for a float field comes back as a float: `45` as `45.0`.
            (Value::Number(a), Value::Number(b)) => a == b || a.as_f64().is_some_and(|x| b.as_f64() == Some(x)),
            (a, b) => a == b,
        }
    }
    if has_null(value) {
        return false;
    }
    let Ok(raw) = RawSpec::deserialize(value) else { return false };
    serde_json::to_value(&raw).is_ok_and(|back| covered(value, &back))
}

/// Checks the tree against the schema; every problem becomes a diagnostic at its place.
pub fn check(tree: &Tree) -> Vec<Diagnostic> {
    if passes_without_schema(&tree.value) {
        return Vec::new();
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every place in every value under `ptr`, as JSON pointers.
    fn places(v: &Value, ptr: String, out: &mut Vec<String>) {
        match v {
            Value::Object(map) => {
                for (k, child) in map {
                    places(child, format!("{ptr}/{}", k.replace('~', "~0").replace('/', "~1")), out);
                }
            }
            Value::Array(items) => {
                for (i, child) in items.iter().enumerate() {
                    places(child, format!("{ptr}/{i}"), out);
                }
            }
            _ => {}
        }
        out.push(ptr);
    }

    /// Wrong (and some right) values for a place: other types, out-of-range numbers, null,
    /// an unknown key, a missing key, an extra or a null array element.
    fn mutants(v: &Value) -> Vec<Value> {
        let mut out: Vec<Value> = serde_json::from_str::<Vec<Value>>(
            r#"[null, true, -1, 0, 1.5, 300, 70000, 5000000000, 18446744073709551615, "x", "4GiB", "", [], {}, [1], ["x"]]"#,
        )
        .unwrap();
        match v {
            Value::Object(map) => {
                let mut extra = map.clone();
                extra.insert("zz-unknown".into(), Value::from(1));
                out.push(Value::Object(extra));
                for k in map.keys() {
                    let mut less = map.clone();
                    less.remove(k);
                    out.push(Value::Object(less));
                }
                out.push(Value::Array(map.values().cloned().collect()));
            }
            Value::Array(items) if !items.is_empty() => {
                let mut more = items.clone();
                more.push(items[0].clone());
                out.push(Value::Array(more));
                out.push(Value::Array(vec![Value::Null]));
            }
            _ => {}
        }
        out
    }

    /// The fast path of `check` must never pass a spec the schema refuses: every example
    /// spec, with every place in it replaced by each mutant, is put to both. (Written when a
    /// first version, without the write-back comparison, passed `debian: []`.)
    #[test]
    fn fast_path_never_accepts_what_the_schema_refuses() {
        let validator = jsonschema::validator_for(&json_schema()).unwrap();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let (mut tried, mut refused, mut fast) = (0, 0, 0);
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "yaml") {
                continue;
            }
            let tree = crate::tree::parse(&std::fs::read_to_string(&path).unwrap()).unwrap();
            assert!(passes_without_schema(&tree.value), "{}: the example misses the fast path", path.display());
            assert!(validator.is_valid(&tree.value), "{}", path.display());
            let mut at = Vec::new();
            places(&tree.value, String::new(), &mut at);
            for ptr in at {
                for m in mutants(tree.value.pointer(&ptr).unwrap()) {
                    let mut v = tree.value.clone();
                    *v.pointer_mut(&ptr).unwrap() = m.clone();
                    tried += 1;
                    let valid = validator.is_valid(&v);
                    refused += usize::from(!valid);
                    if passes_without_schema(&v) {
                        fast += 1;
                        assert!(valid, "{}: {ptr} = {m}: the fast path passed what the schema refuses", path.display());
                    }
                }
            }
        }
        // The corpus has teeth both ways: most mutants are refused, some still pass.
        assert!(tried > 1000 && refused > tried / 2 && fast > 100, "tried {tried}, refused {refused}, fast {fast}");
    }
}
