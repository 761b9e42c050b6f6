//! Helpers for kiln's cross-crate integration tests (in `tests/tests/`): where the built
//! binaries are, the examples, and the SKIP/require rule for outside tools.

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// A workspace binary (`kiln`, `kilnd`) built for this test run, building it if needed.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join(name);
    if !bin.is_file() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status =
            Command::new(cargo).args(["build", "--bins"]).current_dir(repo_root()).status().expect("cargo runs");
        assert!(status.success(), "building the workspace binaries failed");
    }
    assert!(bin.is_file(), "{} was not built", bin.display());
    bin
}

/// True when an outside tool is installed. When it is not, a test prints `SKIP name: tool not
/// found` and returns, unless KILN_REQUIRE_TOOLS=1 (CI), where a missing tool fails the test.
pub fn have_tool(test: &str, tool: &str) -> bool {
    let found =
        Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().is_ok_and(|o| o.status.success());
    if !found {
        if std::env::var("KILN_REQUIRE_TOOLS").as_deref() == Ok("1") {
            panic!("{test}: {tool} not found and KILN_REQUIRE_TOOLS=1");
        }
        eprintln!("SKIP {test}: {tool} not found");
    }
    found
}

pub const EXAMPLES: [&str; 3] = ["generic-x86_64", "pi5-4gb-sd", "pi5-8gb-nvme"];

pub fn example(name: &str) -> PathBuf {
    let model = repo_root().join("examples/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(model.is_file(), "{} is missing: run scripts/fetch-model first", model.display());
    repo_root().join(format!("examples/{name}.yaml"))
}
