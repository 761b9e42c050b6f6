//! The generation: every file kiln manages on the device, rendered from a validated spec
//! with minijinja templates. Output is deterministic: the same spec gives byte-identical files,
//! listed in a manifest (path, kind, mode, owner, sha256) whose hash is the generation id.

mod files;
mod normalize;
mod tree;

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::validate::Loaded;

pub use normalize::normalized_spec;
pub use tree::{PACK_FILES, PACK_MANIFEST, pack, read_manifest, write_tree};

/// Where the manifest lands, relative to the generation root.
pub const MANIFEST_PATH: &str = "etc/kiln/manifest.json";

/// What an entry is on the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Kind {
    /// A whole file kiln owns.
    File,
    Dir,
    Symlink {
        target: String,
    },
    /// A block kiln manages inside a file the base owns (config.txt): everything between the
    /// block's first and last line is replaced; the rest of the file is left alone.
    Block,
    /// Arguments kiln adds to a one-line file the base owns (cmdline.txt), replacing any with the same key.
    Args,
}

/// How applying a change to an entry takes effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum Effect {
    /// Nothing to do beyond writing it.
    None,
    SysctlReload,
    DaemonReload,
    /// `systemd-tmpfiles --create` / `systemd-sysusers`.
    TmpfilesSysusers,
    RestartUnit,
    /// `hostnamectl hostname` from /etc/hostname.
    Hostname,
    /// kilnd has no reload: its spec, unit and environment take a restart (manifests written
    /// before this said `reload-kilnd` for the spec).
    #[serde(alias = "reload-kilnd")]
    RestartKilnd,
    /// Boot files (config.txt, cmdline.txt, zram size): needs a reboot.
    Reboot,
}

/// One managed path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Absolute path on the device.
    pub path: String,
    #[serde(flatten)]
    pub kind: Kind,
    /// Octal permission bits, e.g. 0o644.
    #[serde(serialize_with = "ser_mode", deserialize_with = "de_mode")]
    pub mode: u32,
    /// `user:group` by name: owners are resolved on the device (users may not exist yet).
    pub owner: String,
    /// sha256 of the content; empty for directories and symlinks.
    pub sha256: String,
    /// What applying a change to this entry takes.
    pub effect: Effect,
    /// Units to restart when this entry changes (for [`Effect::RestartUnit`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub units: Vec<String>,
    #[serde(skip)]
    pub content: Vec<u8>,
}

fn ser_mode<S: serde::Serializer>(mode: &u32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{mode:04o}"))
}

fn de_mode<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let text = String::deserialize(d)?;
    u32::from_str_radix(&text, 8).map_err(|_| serde::de::Error::custom(format!("mode `{text}` is not octal")))
}

/// The manifest: the generation id and every entry, sorted by path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub generation: String,
    pub name: String,
    pub entries: Vec<Entry>,
}

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("rendering template {template}: {message}")]
    Template { template: String, message: String },
    #[error("serializing the normalized spec: {0}")]
    Spec(String),
    #[error("internal error: {path} is rendered twice")]
    Duplicate { path: String },
}

impl Manifest {
    /// The generation id: sha256 over each entry's path, kind, mode, owner and content hash.
    fn compute_id(entries: &[Entry]) -> String {
        let mut h = Sha256::new();
        for e in entries {
            let kind = match &e.kind {
                Kind::File => "file".to_string(),
                Kind::Dir => "dir".to_string(),
                Kind::Symlink { target } => format!("symlink:{target}"),
                Kind::Block => "block".to_string(),
                Kind::Args => "args".to_string(),
            };
            h.update(format!("{}\0{kind}\0{:o}\0{}\0{}\n", e.path, e.mode, e.owner, e.sha256).as_bytes());
        }
        hex::encode(h.finalize())
    }

    /// The entry at `path`, if managed.
    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.path == path)
    }
}

impl fmt::Display for Manifest {
    /// The listing of paths, modes and owners (what the golden tests pin).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for e in &self.entries {
            let kind = match &e.kind {
                Kind::File => "file".to_string(),
                Kind::Dir => "dir".to_string(),
                Kind::Symlink { target } => format!("-> {target}"),
                Kind::Block => "block".to_string(),
                Kind::Args => "args".to_string(),
            };
            writeln!(f, "{:04o} {:<11} {} {kind}", e.mode, e.owner, e.path)?;
        }
        Ok(())
    }
}

/// Renders the generation of a validated spec.
pub fn render(loaded: &Loaded) -> Result<Manifest, RenderError> {
    let mut entries = files::entries(loaded)?;
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    if let Some(w) = entries.windows(2).find(|w| w[0].path == w[1].path) {
        return Err(RenderError::Duplicate { path: w[0].path.clone() });
    }
    for e in &mut entries {
        if matches!(e.kind, Kind::File | Kind::Block | Kind::Args) {
            e.sha256 = hex::encode(Sha256::digest(&e.content));
        }
    }
    let generation = Manifest::compute_id(&entries);
    Ok(Manifest { generation, name: loaded.spec.name.clone(), entries })
}
