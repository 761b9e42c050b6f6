//! Every invalid-spec fixture is rejected with exactly the errors in its snapshot: each with
//! file:line:col, the field, what is wrong and what would be right.

mod common;

use std::path::Path;

use kiln_spec::validate::{Context, load_file};

#[test]
fn invalid_fixtures_fail_with_their_exact_errors() {
    common::require_example_model();
    let dir = Path::new("tests/fixtures/invalid");
    let mut names: Vec<_> = std::fs::read_dir(dir).expect("fixtures").map(|e| e.expect("entry").path()).collect();
    names.sort();
    assert!(names.len() >= 15, "fixtures went missing");
    for path in names {
        let stem = path.file_stem().expect("stem").to_string_lossy().into_owned();
        match load_file(&path, Context::Host) {
            Ok(_) => panic!("{} was accepted", path.display()),
            Err(diags) => {
                assert!(!diags.items.is_empty());
                let sorted = diags.items.windows(2).all(|w| w[0].pos <= w[1].pos);
                assert!(sorted, "{stem}: errors are not sorted by line");
                insta::assert_snapshot!(stem, diags.to_string());
            }
        }
    }
}
