//! Puts files, directories and symlinks into an ext4 filesystem with their modes, owners
//! and the build's timestamp, in one debugfs session: parents first, replacing what the base
//! had at those paths, creating missing parent directories (0755 root).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::ext4::{self, DirEntry, Edits, Ext4Error};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum What {
    Dir,
    /// Content from a host file.
    File(PathBuf),
    Symlink(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub path: String,
    pub what: What,
    /// Permission bits and ids; None keeps what the base had there (or 0644/0755 root).
    pub mode: Option<u32>,
    pub owner: Option<(u32, u32)>,
}

fn parent(path: &str) -> Option<&str> {
    let cut = path.rfind('/')?;
    Some(if cut == 0 { "/" } else { &path[..cut] })
}

fn name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

fn ancestors(path: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut p = path;
    while let Some(up) = parent(p) {
        out.push(up.to_string());
        if up == "/" {
            break;
        }
        p = up;
    }
    out
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Ext4(#[from] Ext4Error),
    #[error("{path} is a directory in the base image; kiln would put a file there")]
    DirInTheWay { path: String },
    #[error("{path} is a file in the base image; kiln needs a directory there")]
    FileInTheWay { path: String },
}

/// Applies `items` to the filesystem in `image`; every inode kiln writes, and every directory
/// whose entries change, gets `epoch` as its timestamps.
pub fn apply(image: &Path, items: &[Item], epoch: i64) -> Result<(), ApplyError> {
    let mut items: Vec<&Item> = items.iter().collect();
    items.sort_by(|a, b| a.path.cmp(&b.path));
    let mut dirs: BTreeSet<String> = BTreeSet::new();
    for it in &items {
        dirs.extend(ancestors(&it.path));
    }
    let listed = ext4::list_dirs(image, &dirs.iter().cloned().collect::<Vec<_>>())?;
    let existing = |path: &str| -> Option<DirEntry> {
        let entries = listed.get(parent(path)?)?.as_ref()?;
        entries.iter().find(|e| e.name == name(path)).cloned()
    };
    let declared: BTreeMap<&str, &Item> = items.iter().map(|i| (i.path.as_str(), *i)).collect();
    let mut e = Edits::default();
    let mut made: BTreeSet<String> = BTreeSet::new();
    let mut touched: BTreeSet<String> = BTreeSet::new();
    // Parents nobody declared and the base lacks.
    for dir in &dirs {
        if dir == "/" {
            continue;
        }
        if let Some(it) = declared.get(dir.as_str()) {
            // A declared directory is made here too, before the undeclared ones below it
            // (its mode and owner are set with the items).
            if it.what == What::Dir && existing(dir).is_none() && made.insert(dir.clone()) {
                e.mkdir(dir);
                touched.extend(parent(dir).map(String::from));
            }
            continue;
        }
        match existing(dir) {
            Some(d) if d.is_dir() => {}
            Some(_) => return Err(ApplyError::FileInTheWay { path: dir.clone() }),
            None if made.contains(dir) => {}
            None => {
                e.mkdir(dir);
                e.set_inode(dir, 0o040755, 0, 0, epoch);
                made.insert(dir.clone());
                touched.extend(parent(dir).map(String::from));
            }
        }
    }
    for it in items {
        let old = existing(&it.path);
        let (mode, (uid, gid)) = match &old {
            Some(o) => (it.mode.unwrap_or(o.mode & 0o7777), it.owner.unwrap_or((o.uid, o.gid))),
            None => (it.mode.unwrap_or(if it.what == What::Dir { 0o755 } else { 0o644 }), it.owner.unwrap_or((0, 0))),
        };
        match &it.what {
            What::Dir => {
                match &old {
                    Some(o) if !o.is_dir() => return Err(ApplyError::FileInTheWay { path: it.path.clone() }),
                    Some(_) => {}
                    None if made.contains(&it.path) => {}
                    None => e.mkdir(&it.path),
                }
                e.set_inode(&it.path, 0o040000 | mode, uid, gid, epoch);
            }
            What::File(host) => {
                if let Some(o) = &old {
                    if o.is_dir() {
                        return Err(ApplyError::DirInTheWay { path: it.path.clone() });
                    }
                    e.rm(&it.path);
                }
                e.write(host, &it.path);
                e.set_inode(&it.path, 0o100000 | mode, uid, gid, epoch);
            }
            What::Symlink(target) => {
                if let Some(o) = &old {
                    if o.is_dir() {
                        return Err(ApplyError::DirInTheWay { path: it.path.clone() });
                    }
                    e.rm(&it.path);
                }
                e.symlink(&it.path, target);
                e.set_inode(&it.path, 0o120777, uid, gid, epoch);
            }
        }
        touched.extend(parent(&it.path).map(String::from));
    }
    for dir in &touched {
        e.set_times(dir, epoch);
    }
    e.apply(image, epoch)?;
    Ok(())
}
