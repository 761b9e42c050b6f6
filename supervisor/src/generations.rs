//! Generations on the device: every applied spec is a numbered directory under
//! `/var/lib/kiln/generations/<n>` holding its rendered files and manifest; `current` is a
//! symlink to the active one, switched atomically (a new link renamed over the old).
//!
//! `kiln deploy` sends a generation as a tar stream (the manifest plus only the files the
//! device does not already have, by hash); `receive` checks every file against the manifest
//! and publishes the directory under its number only when it is complete. `activate` (in
//! `activate.rs`) installs it into the running system.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use kiln_spec::render::{Kind, MANIFEST_PATH, Manifest, PACK_FILES, PACK_MANIFEST, read_manifest, write_tree};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What happened to a generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GenState {
    /// Received, never activated.
    Received,
    /// Activated and healthy.
    Good,
    /// Activated, found unhealthy, rolled back.
    Failed,
}

/// The sidecar `<n>.json` beside each generation directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenMeta {
    pub state: GenState,
    /// Unix seconds.
    pub received_at: i64,
    #[serde(default)]
    pub activated_at: Option<i64>,
    /// Why it was rolled back.
    #[serde(default)]
    pub failure: Option<String>,
}

/// One generation as `kilnd generations` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct GenInfo {
    pub number: u32,
    /// The manifest hash.
    pub id: String,
    pub name: String,
    pub current: bool,
    #[serde(flatten)]
    pub meta: GenMeta,
}

/// The device's generations directory.
#[derive(Debug, Clone)]
pub struct Generations {
    dir: PathBuf,
}

fn now() -> i64 {
    jiff::Timestamp::now().as_second()
}

impl Generations {
    /// The generations under kilnd's state directory (`/var/lib/kiln`).
    pub fn at(state: &Path) -> Generations {
        Generations { dir: state.join("generations") }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path_of(&self, n: u32) -> PathBuf {
        self.dir.join(n.to_string())
    }

    fn meta_path(&self, n: u32) -> PathBuf {
        self.dir.join(format!("{n}.json"))
    }

    /// The active generation's number, from the `current` link.
    pub fn current(&self) -> Result<Option<u32>> {
        let link = self.dir.join("current");
        match fs::read_link(&link) {
            Ok(target) => {
                let text = target.to_string_lossy();
                let n = text
                    .parse()
                    .with_context(|| format!("{} points at `{text}`, not at a generation number", link.display()))?;
                Ok(Some(n))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", link.display())),
        }
    }

    /// The numbers of complete generations, ascending.
    pub fn numbers(&self) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e).with_context(|| format!("listing {}", self.dir.display())),
        };
        for e in entries {
            let e = e.with_context(|| format!("listing {}", self.dir.display()))?;
            if let Some(n) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok())
                && e.path().join(MANIFEST_PATH).is_file()
            {
                out.push(n);
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    pub fn manifest(&self, n: u32) -> Result<Manifest> {
        read_manifest(&self.path_of(n)).with_context(|| format!("reading generation {n}"))
    }

    pub fn meta(&self, n: u32) -> GenMeta {
        fs::read(self.meta_path(n)).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or(GenMeta {
            state: GenState::Good,
            received_at: 0,
            activated_at: None,
            failure: None,
        })
    }

    pub fn set_meta(&self, n: u32, meta: &GenMeta) -> Result<()> {
        let path = self.meta_path(n);
        let tmp = self.dir.join(format!(".{n}.json.tmp"));
        fs::write(&tmp, serde_json::to_vec_pretty(meta)?).with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        sync_dir(&self.dir)
    }

    /// Every generation, oldest first.
    pub fn list(&self) -> Result<Vec<GenInfo>> {
        let current = self.current()?;
        let mut out = Vec::new();
        for n in self.numbers()? {
            let path = self.path_of(n).join(MANIFEST_PATH);
            let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            let m: Manifest =
                serde_json::from_str(&text).with_context(|| format!("{} is not a kiln manifest", path.display()))?;
            out.push(GenInfo {
                number: n,
                id: m.generation,
                name: m.name,
                current: current == Some(n),
                meta: self.meta(n),
            });
        }
        Ok(out)
    }

    /// Points `current` at generation `n` atomically: a new link renamed over the old one.
    pub fn switch(&self, n: u32) -> Result<()> {
        if !self.path_of(n).join(MANIFEST_PATH).is_file() {
            bail!("generation {n} does not exist in {}", self.dir.display());
        }
        let tmp = self.dir.join(".current.tmp");
        let _ = fs::remove_file(&tmp);
        symlink(n.to_string(), &tmp).with_context(|| format!("creating {}", tmp.display()))?;
        fs::rename(&tmp, self.dir.join("current"))
            .with_context(|| format!("switching {}/current", self.dir.display()))?;
        sync_dir(&self.dir)
    }

    /// Receives a generation sent as a tar stream: `manifest.json` and `files/<path>` for the
    /// files the device lacks. The others come from the generations already here, matched by
    /// sha256. Every file is checked against the manifest; the directory gets its number (the
    /// next free one, returned) only once complete, so an interrupted transfer leaves nothing
    /// that looks like a generation.
    pub fn receive(&self, stream: impl Read) -> Result<u32> {
        fs::create_dir_all(&self.dir).with_context(|| format!("creating {}", self.dir.display()))?;
        self.remove_leftovers();
        let mut manifest: Option<Manifest> = None;
        let mut sent: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut archive = tar::Archive::new(stream);
        for entry in archive.entries().context("reading the generation stream")? {
            let mut entry = entry.context("reading the generation stream")?;
            let name = entry.path().context("reading the generation stream")?.to_string_lossy().into_owned();
            let mut data = Vec::new();
            entry.read_to_end(&mut data).with_context(|| format!("reading {name} from the generation stream"))?;
            if name == PACK_MANIFEST {
                manifest = Some(serde_json::from_slice(&data).context("the sent manifest is not a kiln manifest")?);
            } else if let Some(path) = name.strip_prefix(&format!("{PACK_FILES}/")) {
                sent.insert(format!("/{path}"), data);
            } else {
                bail!("unexpected `{name}` in the generation stream");
            }
        }
        let Some(mut manifest) = manifest else { bail!("the generation stream ended before its manifest") };
        // Content already on the device, by hash.
        let mut known: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let wanted: std::collections::BTreeSet<String> = manifest
            .entries
            .iter()
            .filter(|e| matches!(e.kind, Kind::File | Kind::Block | Kind::Args) && !sent.contains_key(&e.path))
            .map(|e| e.sha256.clone())
            .collect();
        if !wanted.is_empty() {
            for n in self.numbers()?.into_iter().rev() {
                let Ok(m) = self.manifest(n) else { continue };
                for e in m.entries {
                    if wanted.contains(&e.sha256) && !known.contains_key(&e.sha256) {
                        known.insert(e.sha256.clone(), e.content);
                    }
                }
                if wanted.iter().all(|s| known.contains_key(s)) {
                    break;
                }
            }
        }
        for e in &mut manifest.entries {
            if !matches!(e.kind, Kind::File | Kind::Block | Kind::Args) {
                continue;
            }
            let content = match sent.remove(&e.path) {
                Some(c) => c,
                None => match known.get(&e.sha256) {
                    Some(c) => c.clone(),
                    None => bail!(
                        "{} (sha256 {}) was neither sent nor found in a generation on the device; deploy again",
                        e.path,
                        e.sha256
                    ),
                },
            };
            let actual = hex::encode(Sha256::digest(&content));
            if actual != e.sha256 {
                bail!("{} arrived damaged: sha256 {actual}, the manifest says {}; deploy again", e.path, e.sha256);
            }
            e.content = content;
        }
        if let Some(extra) = sent.keys().next() {
            bail!("the generation stream holds {extra}, which its manifest does not list");
        }
        let n = self.numbers()?.last().map_or(1, |n| n + 1).max(self.current()?.map_or(1, |c| c + 1));
        write_tree(&manifest, &self.path_of(n)).with_context(|| format!("writing generation {n}"))?;
        self.set_meta(
            n,
            &GenMeta { state: GenState::Received, received_at: now(), activated_at: None, failure: None },
        )?;
        Ok(n)
    }

    /// Removes what an interrupted `receive` left: staging directories (dot names).
    fn remove_leftovers(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else { return };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.contains(".kiln-tmp-") {
                tracing::info!(path = %e.path().display(), "removing an interrupted transfer");
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }

    /// Removes the oldest generations beyond `keep`, never the current one nor `also_keep`.
    pub fn collect_garbage(&self, keep: u32, also_keep: Option<u32>) -> Result<Vec<u32>> {
        let current = self.current()?;
        let numbers = self.numbers()?;
        let excess = numbers.len().saturating_sub(keep as usize);
        let mut removed = Vec::new();
        for &n in numbers.iter() {
            if removed.len() >= excess {
                break;
            }
            if Some(n) == current || Some(n) == also_keep {
                continue;
            }
            fs::remove_dir_all(self.path_of(n)).with_context(|| format!("removing generation {n}"))?;
            let _ = fs::remove_file(self.meta_path(n));
            removed.push(n);
        }
        sync_dir(&self.dir)?;
        Ok(removed)
    }
}

/// The generation kilnd runs: number and manifest id, when the device has generations.
pub fn running(state: &Path) -> Option<serde_json::Value> {
    let g = Generations::at(state);
    let n = g.current().ok()??;
    let text = fs::read_to_string(g.path_of(n).join(MANIFEST_PATH)).ok()?;
    let m: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(serde_json::json!({ "number": n, "id": m["generation"] }))
}

pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("syncing the directory {}", dir.display()))
}
