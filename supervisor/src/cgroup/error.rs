//! `CgroupError`: what can go wrong placing workers in cgroups. Every variant names the
//! cgroup (its name relative to the backend's root) and, where one is involved, the file.

use std::io;
use std::path::PathBuf;

/// Every failure of a [`CgroupBackend`](super::CgroupBackend). I/O variants carry the
/// underlying error as `#[source]`, never also in the message.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A cgroup name that could escape the backend's root or is not a directory name.
    #[error("invalid cgroup name {name:?}: {reason} (use names like \"inference/smollm2\")")]
    InvalidName { name: String, reason: &'static str },

    /// A filesystem call on a cgroup file failed; `action` is a lowercase gerund.
    #[error("cgroup {cgroup}: {action} {file}")]
    Io {
        cgroup: String,
        action: &'static str,
        file: PathBuf,
        #[source]
        source: io::Error,
    },

    /// cgroups-rs failed to act on a cgroup file (v1 backend). Boxed: its error is large.
    #[error("cgroup {cgroup}: {action} {file}")]
    Controller {
        cgroup: String,
        action: &'static str,
        file: PathBuf,
        #[source]
        source: Box<cgroups_rs::fs::error::Error>,
    },

    /// A cgroup file held something other than what the kernel documents.
    #[error("cgroup {cgroup}: {file}: cannot parse {content:?}: expected {expected}")]
    Parse { cgroup: String, file: PathBuf, content: String, expected: &'static str },

    /// A limit needs a controller that the parent does not offer.
    #[error(
        "cgroup {cgroup}: the {controller} controller is not available: {file} does not list it \
         (delegate it to kilnd, e.g. Delegate=yes in its unit)"
    )]
    ControllerUnavailable { cgroup: String, controller: &'static str, file: PathBuf },

    /// A limit was asked for that this kernel cannot enforce (its file does not exist).
    #[error("cgroup {cgroup}: cannot set {setting}: {file} does not exist ({hint})")]
    Unsupported { cgroup: String, setting: &'static str, file: PathBuf, hint: &'static str },

    /// cgroup v2 refuses to enable controllers in a cgroup that holds processes.
    #[error(
        "cgroup {cgroup}: cannot enable controllers in {file}: the cgroup holds processes \
         (cgroup v2 allows none there; move them to a leaf first, e.g. with enter_leaf)"
    )]
    InternalProcesses {
        cgroup: String,
        file: PathBuf,
        #[source]
        source: io::Error,
    },

    /// `remove` was called on a cgroup that still has processes in it.
    #[error("refusing to remove cgroup {cgroup}: it still holds processes {pids:?} (kill them first)")]
    Busy { cgroup: String, pids: Vec<u32> },

    /// A needed cgroup hierarchy is not mounted.
    #[error("the cgroup v1 {controller} controller is not mounted (see /proc/self/mountinfo)")]
    NotMounted { controller: &'static str },

    /// A reading that only a cgroup can give, asked of the no-cgroup backend.
    #[error("cgroup {cgroup}: {what} is unknown: workers run without cgroups")]
    NoCgroups { cgroup: String, what: &'static str },
}

/// Attaches a cgroup name, an action and a file to an `io::Result`.
pub(crate) trait IoContext<T> {
    fn ctx(self, cgroup: &str, action: &'static str, file: impl Into<PathBuf>) -> Result<T, CgroupError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, cgroup: &str, action: &'static str, file: impl Into<PathBuf>) -> Result<T, CgroupError> {
        self.map_err(|source| CgroupError::Io { cgroup: cgroup.to_owned(), action, file: file.into(), source })
    }
}
