//! Running the outside tools kiln builds with (sfdisk, mkfs.fat, mtools, debugfs, mke2fs,
//! e2fsck, resize2fs, mmdebstrap): every failure names the tool, its arguments and what it said.

use std::ffi::OsStr;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("{tool} is not installed (install the Debian package {package})")]
    Missing { tool: String, package: String },
    #[error("running {tool}")]
    Spawn {
        tool: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} {args} failed ({status}): {stderr}")]
    Failed { tool: String, args: String, status: String, stderr: String },
}

/// The Debian package that provides a tool, for error messages and scripts/setup.
pub fn package_of(tool: &str) -> &'static str {
    match tool {
        "sfdisk" => "fdisk",
        "mkfs.fat" | "fsck.fat" => "dosfstools",
        "mcopy" | "mmd" | "mdir" | "mtype" | "mattrib" | "mdel" => "mtools",
        "debugfs" | "mke2fs" | "e2fsck" | "resize2fs" | "tune2fs" | "dumpe2fs" => "e2fsprogs",
        "mmdebstrap" => "mmdebstrap",
        "bmaptool" => "bmap-tools",
        _ => "(unknown)",
    }
}

/// Where a tool is, searching PATH plus the sbin directories a non-root PATH may lack.
pub fn find(tool: &str) -> Result<PathBuf, ToolError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].iter().map(PathBuf::from));
    for dir in dirs {
        let candidate = dir.join(tool);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(ToolError::Missing { tool: tool.into(), package: package_of(tool).into() })
}

/// Runs a tool to completion, optionally feeding stdin; returns its stdout.
pub fn run<I, S>(tool: &str, args: I, stdin: Option<&[u8]>) -> Result<Vec<u8>, ToolError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_env(tool, args, stdin, &[])
}

/// [`run`] with extra environment variables.
pub fn run_env<I, S>(tool: &str, args: I, stdin: Option<&[u8]>, env: &[(&str, &str)]) -> Result<Vec<u8>, ToolError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let out = run_full(tool, args, stdin, env)?;
    Ok(out.stdout)
}

/// What a tool printed.
#[derive(Debug)]
pub struct Output {
    pub stdout: Vec<u8>,
    pub stderr: String,
}

/// Runs a tool that must exit 0 and returns both streams (for tools such as debugfs that
/// report errors on stderr with status 0).
pub fn run_full<I, S>(tool: &str, args: I, stdin: Option<&[u8]>, env: &[(&str, &str)]) -> Result<Output, ToolError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let exe = find(tool)?;
    let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_os_string()).collect();
    let shown = args.iter().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>().join(" ");
    let mut cmd = Command::new(&exe);
    cmd.args(&args).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    // Tools print in the C locale so kiln can read their output.
    cmd.env("LC_ALL", "C");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().map_err(|source| ToolError::Spawn { tool: tool.into(), source })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        let input = input.to_vec();
        std::thread::spawn(move || {
            let _ = pipe.write_all(&input);
        });
    }
    let out = child.wait_with_output().map_err(|source| ToolError::Spawn { tool: tool.into(), source })?;
    if !out.status.success() {
        return Err(ToolError::Failed {
            tool: tool.into(),
            args: shown,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(Output { stdout: out.stdout, stderr: String::from_utf8_lossy(&out.stderr).into_owned() })
}
