//! The JSON Schema in docs/ is the one the code generates (regenerate with
//! `cargo run -p kiln-builder -- schema > docs/kiln-v1.schema.json`), and it accepts the examples.

mod common;

#[test]
fn committed_schema_matches_the_generated_one() {
    let path = common::repo_root().join("docs/kiln-v1.schema.json");
    let committed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("docs/kiln-v1.schema.json")).expect("json");
    assert!(
        committed == kiln_spec::schema::json_schema(),
        "docs/kiln-v1.schema.json is stale: run `cargo run -p kiln-builder -- schema > docs/kiln-v1.schema.json`"
    );
}

#[test]
fn the_schema_accepts_every_example_and_rejects_an_unknown_key() {
    let schema = kiln_spec::schema::json_schema();
    let validator = jsonschema::validator_for(&schema).expect("the schema compiles");
    for name in common::EXAMPLES {
        let text = std::fs::read_to_string(common::repo_root().join(format!("examples/{name}.yaml"))).expect("example");
        let tree = kiln_spec::tree::parse(&text).expect("parses");
        let errors: Vec<String> = validator.iter_errors(&tree.value).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{name}: {errors:?}");
        let mut bad = tree.value.clone();
        bad["memory"]["swapiness"] = serde_json::json!(10);
        assert!(!validator.is_valid(&bad));
    }
}
