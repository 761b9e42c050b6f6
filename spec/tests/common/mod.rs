//! Helpers shared by the spec crate's integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use kiln_spec::validate::{Context, Loaded, load_file};

pub const EXAMPLES: [&str; 3] = ["generic-x86_64", "pi5-4gb-sd", "pi5-8gb-nvme"];

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("spec/ has a parent").to_path_buf()
}

/// The real SmolLM2 model the examples name; scripts/fetch-model puts it there.
pub fn require_example_model() {
    let model = repo_root().join("examples/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        model.is_file(),
        "{} is missing: run scripts/fetch-model first (the README's test command does)",
        model.display()
    );
}

/// Loads an example by name; the path in messages is relative to the repository.
pub fn load_example(name: &str) -> Loaded {
    require_example_model();
    let path = repo_root().join(format!("examples/{name}.yaml"));
    match load_file(&path, Context::Host) {
        Ok(l) => l,
        Err(d) => panic!("example {name} does not check:\n{d}"),
    }
}
