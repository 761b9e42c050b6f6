//! Activating a generation on the device (`kilnd activate N`, as root): install only the
//! files that differ from the running generation, switch `current`, apply what the diff needs
//! (sysusers/tmpfiles, daemon-reload, sysctl, hostname, unit restarts, kilnd restart), then
//! the health gate: kilnd must be active (READY, from a new process when it was restarted) and
//! answer a canary completion within the spec's `supervisor.deploy.health-timeout`. When it
//! does not, the previous generation is re-installed and re-applied the same way.
//!
//! A marker (`generations/.activating.json`) is written before the first file changes and
//! removed when the device is consistent again: an activation killed half-way is undone by
//! the next `kilnd activate` or `kilnd rollback` before it does anything else.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use kiln_spec::diff::{Plan, diff};
use kiln_spec::model::ModelSource;
use kiln_spec::render::{Entry, Kind, Manifest};
use kiln_spec::validate::{Context, load_file};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::generations::{GenMeta, GenState, Generations, sync_dir};

const KILND_UNIT: &str = "kilnd.service";

/// How to activate.
#[derive(Debug, Clone)]
pub struct Options {
    /// The system root files are installed under: `/` on a device, a directory in tests.
    pub root: PathBuf,
    /// Run the commands (systemctl, systemd-sysusers ...) and the health gate. Off, they are
    /// only reported (tests of the file installation on a machine that is not the device).
    pub live: bool,
    /// Overrides the new spec's health timeout.
    pub health_timeout: Option<Duration>,
    /// kilnd's state directory (the store, for the check that every model is present).
    pub state: PathBuf,
}

/// How an activation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The generation runs and is healthy. `reboot_for` lists changes that wait for a reboot.
    Activated { number: u32, reboot_for: Vec<String>, actions: Vec<String> },
    /// The generation was unhealthy; `to` runs again.
    RolledBack { number: u32, to: Option<u32>, reason: String },
    /// Nothing differs from the running generation.
    Unchanged { number: u32 },
}

#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    from: Option<u32>,
    to: u32,
}

/// Activates generation `to`; `say` gets one line per step.
pub fn activate(gens: &Generations, to: u32, opts: &Options, say: &mut dyn FnMut(&str)) -> Result<Outcome> {
    let _lock = lock(gens)?;
    recover(gens, opts, say)?;
    let from = gens.current()?;
    if from == Some(to) && gens.meta(to).state == GenState::Good {
        say(&format!("generation {to} is already active"));
        return Ok(Outcome::Unchanged { number: to });
    }
    let new = gens.manifest(to)?;
    check_models(gens, to, opts)?;
    let old = match from {
        Some(n) => gens.manifest(n)?,
        None => Manifest { generation: String::new(), name: new.name.clone(), entries: Vec::new() },
    };
    let plan = diff(&old, &new);
    say(&format!(
        "activating generation {to} ({}) over {}: {} path(s) change",
        &new.generation[..12.min(new.generation.len())],
        from.map_or("nothing".to_string(), |n| format!("generation {n}")),
        plan.changes.len()
    ));
    write_marker(gens, &Marker { from, to })?;
    let started = jiff::Timestamp::now();
    let result = apply(gens, &old, &new, to, &plan, opts, say).and_then(|actions| {
        health_gate(gens, to, &plan, opts, say)?;
        Ok(actions)
    });
    match result {
        Ok(actions) => {
            let mut meta = gens.meta(to);
            meta.state = GenState::Good;
            meta.activated_at = Some(started.as_second());
            meta.failure = None;
            gens.set_meta(to, &meta)?;
            clear_marker(gens)?;
            let keep = load_file(&gens.path_of(to).join("etc/kiln/spec.yaml"), Context::Device)
                .map(|l| l.spec.supervisor.keep_generations)
                .unwrap_or(5);
            let removed = gens.collect_garbage(keep, from)?;
            if !removed.is_empty() {
                let list: Vec<String> = removed.iter().map(u32::to_string).collect();
                say(&format!("removed old generation(s) {} (keeping {keep})", list.join(", ")));
            }
            if plan.needs_reboot() {
                say(&format!("REBOOT REQUIRED: {} only take(s) effect at boot", plan.reboot_for.join(", ")));
            }
            say(&format!("generation {to} is active and healthy"));
            Ok(Outcome::Activated { number: to, reboot_for: plan.reboot_for.clone(), actions })
        }
        Err(e) => {
            let reason = format!("{e:#}");
            say(&format!("generation {to} failed: {reason}"));
            let meta = GenMeta { state: GenState::Failed, failure: Some(reason.clone()), ..gens.meta(to) };
            gens.set_meta(to, &meta)?;
            match from {
                Some(back) => {
                    say(&format!("rolling back to generation {back}"));
                    let reverse = diff(&new, &old);
                    apply(gens, &new, &old, back, &reverse, opts, say)
                        .and_then(|_| health_gate(gens, back, &reverse, opts, say))
                        .with_context(|| format!("rolling back to generation {back} after: {reason}"))?;
                    clear_marker(gens)?;
                    say(&format!("generation {back} is active again"));
                }
                None => clear_marker(gens)?,
            }
            Ok(Outcome::RolledBack { number: to, to: from, reason })
        }
    }
}

/// The generation to roll back to by hand: the newest good one older than the current.
pub fn previous_good(gens: &Generations) -> Result<u32> {
    let current = gens.current()?.ok_or_else(|| anyhow!("no generation is active"))?;
    gens.numbers()?
        .into_iter()
        .rev()
        .find(|&n| n < current && gens.meta(n).state == GenState::Good)
        .ok_or_else(|| anyhow!("no good generation older than the current one ({current}) is left to roll back to"))
}

fn lock(gens: &Generations) -> Result<Flock<fs::File>> {
    fs::create_dir_all(gens.dir()).with_context(|| format!("creating {}", gens.dir().display()))?;
    let path = gens.dir().join(".lock");
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    Flock::lock(f, FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| anyhow!("another activation holds {} ({e}); wait for it to finish", path.display()))
}

fn marker_path(gens: &Generations) -> PathBuf {
    gens.dir().join(".activating.json")
}

fn write_marker(gens: &Generations, m: &Marker) -> Result<()> {
    let path = marker_path(gens);
    let mut f = fs::File::create(&path).with_context(|| format!("writing {}", path.display()))?;
    f.write_all(&serde_json::to_vec(m)?)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    sync_dir(gens.dir())
}

fn clear_marker(gens: &Generations) -> Result<()> {
    match fs::remove_file(marker_path(gens)) {
        Ok(()) => sync_dir(gens.dir()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).context("removing the activation marker"),
    }
}

/// Undoes an activation that was killed half-way: re-installs the generation it started from.
fn recover(gens: &Generations, opts: &Options, say: &mut dyn FnMut(&str)) -> Result<()> {
    let Ok(bytes) = fs::read(marker_path(gens)) else { return Ok(()) };
    let m: Marker = serde_json::from_slice(&bytes).context("reading the activation marker")?;
    let Some(from) = m.from else {
        return clear_marker(gens);
    };
    say(&format!("an activation of generation {} over {from} was interrupted: restoring generation {from}", m.to));
    let half = gens.manifest(m.to)?;
    let good = gens.manifest(from)?;
    let plan = diff(&half, &good);
    apply(gens, &half, &good, from, &plan, opts, say)?;
    let meta = GenMeta { state: GenState::Failed, failure: Some("activation interrupted".into()), ..gens.meta(m.to) };
    gens.set_meta(m.to, &meta)?;
    clear_marker(gens)
}

/// Every model the new spec keeps in the store must be there before anything changes.
fn check_models(gens: &Generations, n: u32, opts: &Options) -> Result<()> {
    let spec_path = gens.path_of(n).join("etc/kiln/spec.yaml");
    let loaded = load_file(&spec_path, Context::Device)
        .map_err(|d| anyhow!("generation {n}'s spec does not check on this device:\n{d}"))?;
    let store = opts.state.join("models");
    for m in &loaded.spec.models {
        if matches!(m.source, ModelSource::Url(_)) {
            continue; // kilnd fetches these itself
        }
        let path = store.join(format!("{}.gguf", m.sha256));
        if !path.is_file() {
            bail!(
                "model {} (sha256 {}) is not in the store ({}): `kiln deploy` sends it; nothing was changed",
                m.id,
                m.sha256,
                store.display()
            );
        }
    }
    Ok(())
}

/// Installs `new` over `old` (files, then the `current` link) and runs what the plan needs.
fn apply(
    gens: &Generations,
    old: &Manifest,
    new: &Manifest,
    n: u32,
    plan: &Plan,
    opts: &Options,
    say: &mut dyn FnMut(&str),
) -> Result<Vec<String>> {
    let inst = Installer { root: opts.root.clone(), chown: opts.live };
    // Accounts first: files may belong to users the new generation creates.
    let (accounts, rest): (Vec<_>, Vec<_>) = plan.changes.iter().partition(|c| c.path.starts_with("/etc/sysusers.d/"));
    for c in &accounts {
        inst.change(old.get(&c.path), new.get(&c.path))?;
    }
    let mut actions = Vec::new();
    let mut run = |cmd: &[&str], say: &mut dyn FnMut(&str)| -> Result<()> {
        let line = cmd.join(" ");
        if opts.live {
            say(&format!("running: {line}"));
            let out = Command::new(cmd[0]).args(&cmd[1..]).output().with_context(|| format!("running {line}"))?;
            if !out.status.success() {
                bail!("`{line}` failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
            }
        } else {
            say(&format!("would run: {line}"));
        }
        actions.push(line);
        Ok(())
    };
    if plan.sysusers_tmpfiles {
        run(&["systemd-sysusers"], say)?;
    }
    for c in &rest {
        inst.change(old.get(&c.path), new.get(&c.path))?;
    }
    gens.switch(n)?;
    say(&format!("current -> generation {n}"));
    if plan.sysusers_tmpfiles {
        run(&["systemd-tmpfiles", "--create"], say)?;
    }
    if plan.daemon_reload {
        run(&["systemctl", "daemon-reload"], say)?;
    }
    if plan.sysctl_reload {
        run(&["systemctl", "restart", "systemd-sysctl.service"], say)?;
    }
    let mut hostname = None;
    if plan.hostname
        && let Some(e) = new.get("/etc/hostname")
    {
        let name = String::from_utf8_lossy(&e.content).trim().to_string();
        if opts.live {
            nix::unistd::sethostname(&name).with_context(|| format!("setting the hostname to {name}"))?;
        }
        say(&format!("hostname {name}"));
        hostname = Some(format!("hostname {name}"));
    }
    let units: Vec<&str> = plan.restart_units.iter().map(String::as_str).collect();
    if !units.is_empty() {
        let mut cmd = vec!["systemctl", "restart"];
        cmd.extend(units);
        run(&cmd, say)?;
    }
    if plan.restart_kilnd {
        // A kilnd that failed to start (its start limit hit) cannot be restarted before this.
        run(&["systemctl", "reset-failed", KILND_UNIT], say)?;
        // --no-block: the health gate waits for READY with the spec's own timeout.
        run(&["systemctl", "restart", "--no-block", KILND_UNIT], say)?;
    }
    actions.extend(hostname);
    Ok(actions)
}

/// Writes files with their modes and owners, each under a temporary name renamed into place.
struct Installer {
    root: PathBuf,
    chown: bool,
}

impl Installer {
    fn at(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    fn change(&self, old: Option<&Entry>, new: Option<&Entry>) -> Result<()> {
        match (old, new) {
            (_, Some(e)) => self.install(e).with_context(|| format!("installing {}", e.path)),
            (Some(o), None) => self.remove(o).with_context(|| format!("removing {}", o.path)),
            (None, None) => Ok(()),
        }
    }

    fn install(&self, e: &Entry) -> Result<()> {
        let path = self.at(&e.path);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        match &e.kind {
            Kind::Dir => {
                fs::create_dir_all(&path)?;
                fs::set_permissions(&path, fs::Permissions::from_mode(e.mode))?;
                self.set_owner(&path, &e.owner, false)?;
            }
            Kind::Symlink { target } => {
                let tmp = tmp_name(&path);
                let _ = fs::remove_file(&tmp);
                symlink(target, &tmp)?;
                self.set_owner(&tmp, &e.owner, true)?;
                fs::rename(&tmp, &path)?;
            }
            Kind::File => self.write(&path, &e.content, e)?,
            Kind::Block => {
                let base = read_text(&path)?;
                let merged = kiln_spec::bootfiles::merge_config_txt(&base, &String::from_utf8_lossy(&e.content));
                self.write(&path, merged.as_bytes(), e)?;
            }
            Kind::Args => {
                let base = read_text(&path)?;
                let root = kiln_spec::bootfiles::cmdline_root(&base)
                    .and_then(|r| r.strip_prefix("PARTUUID="))
                    .ok_or_else(|| anyhow!("{} has no root=PARTUUID= argument to keep", path.display()))?
                    .to_string();
                let text = String::from_utf8_lossy(&e.content).into_owned();
                let args: Vec<&str> = text.split_whitespace().collect();
                self.write(&path, kiln_spec::bootfiles::merge_cmdline(&base, &args, &root).as_bytes(), e)?;
            }
        }
        Ok(())
    }

    fn remove(&self, e: &Entry) -> Result<()> {
        let path = self.at(&e.path);
        match &e.kind {
            Kind::File | Kind::Symlink { .. } => match fs::remove_file(&path) {
                Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(err.into()),
                _ => Ok(()),
            },
            Kind::Dir => {
                let _ = fs::remove_dir(&path); // only when empty: it may hold what others put there
                Ok(())
            }
            Kind::Block => {
                let base = read_text(&path)?;
                let kept = kiln_spec::bootfiles::merge_config_txt(&base, "");
                write_atomic(&path, kept.trim_end().as_bytes(), None)
            }
            Kind::Args => {
                let base = read_text(&path)?;
                let ours: Vec<String> = String::from_utf8_lossy(&e.content)
                    .split_whitespace()
                    .map(|a| a.split_once('=').map_or(a, |(k, _)| k).to_string())
                    .collect();
                let kept: Vec<&str> = base
                    .split_whitespace()
                    .filter(|a| !ours.iter().any(|k| a.split_once('=').map_or(*a, |(key, _)| key) == k))
                    .collect();
                write_atomic(&path, format!("{}\n", kept.join(" ")).as_bytes(), None)
            }
        }
    }

    fn write(&self, path: &Path, content: &[u8], e: &Entry) -> Result<()> {
        let tmp = tmp_name(path);
        write_atomic(&tmp, content, Some(e.mode))?;
        self.set_owner(&tmp, &e.owner, false)?;
        fs::rename(&tmp, path)?;
        Ok(())
    }

    fn set_owner(&self, path: &Path, owner: &str, link: bool) -> Result<()> {
        if !self.chown {
            return Ok(());
        }
        let (user, group) = owner.split_once(':').unwrap_or((owner, owner));
        let uid = nix::unistd::User::from_name(user)?.ok_or_else(|| anyhow!("no user `{user}` on this system"))?.uid;
        let gid =
            nix::unistd::Group::from_name(group)?.ok_or_else(|| anyhow!("no group `{group}` on this system"))?.gid;
        let flag = if link { nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW } else { nix::fcntl::AtFlags::empty() };
        nix::unistd::fchownat(nix::fcntl::AT_FDCWD, path, Some(uid), Some(gid), flag)?;
        Ok(())
    }
}

fn tmp_name(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.kiln-new"))
}

fn read_text(path: &Path) -> Result<String> {
    match fs::read(path) {
        Ok(b) => Ok(String::from_utf8_lossy(&b).into_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Writes `path` (the final name when `mode` is None: keeps the mode of what was there).
fn write_atomic(path: &Path, content: &[u8], mode: Option<u32>) -> Result<()> {
    let (target, rename) = match mode {
        Some(_) => (path.to_path_buf(), false),
        None => (tmp_name(path), true),
    };
    let keep = fs::metadata(path).map(|m| m.permissions().mode() & 0o7777).unwrap_or(0o644);
    let mut f = fs::File::create(&target).with_context(|| format!("writing {}", target.display()))?;
    f.write_all(content)?;
    f.set_permissions(fs::Permissions::from_mode(mode.unwrap_or(keep)))?;
    f.sync_all()?;
    if rename {
        fs::rename(&target, path)?;
    }
    Ok(())
}

/// Waits until kilnd is active (READY; a new process when the plan restarted it) and answers
/// a canary completion, within the generation's health timeout.
fn health_gate(gens: &Generations, n: u32, plan: &Plan, opts: &Options, say: &mut dyn FnMut(&str)) -> Result<()> {
    if !opts.live {
        say("would check: kilnd READY and a canary completion");
        return Ok(());
    }
    let spec_path = gens.path_of(n).join("etc/kiln/spec.yaml");
    let loaded = load_file(&spec_path, Context::Device).map_err(|d| anyhow!("{d}"))?;
    let spec = loaded.spec;
    let timeout = opts.health_timeout.unwrap_or(Duration::from_secs(spec.supervisor.health_timeout_secs));
    let deadline = Instant::now() + timeout;
    let before = unit_props();
    let restarted = plan.restart_kilnd || plan.restart_units.contains(KILND_UNIT);
    say(&format!("health gate: kilnd READY and a canary completion within {}s", timeout.as_secs()));
    // A restart was queued (--no-block): the old process may still be there for a moment.
    let old_pid = if restarted { before.get("MainPID").cloned() } else { None };
    let n_restarts0: u64 = before.get("NRestarts").and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut seen_other = !restarted;
    loop {
        let p = unit_props();
        let state = p.get("ActiveState").map(String::as_str).unwrap_or("");
        let pid = p.get("MainPID").cloned().unwrap_or_default();
        if old_pid.as_deref() != Some(pid.as_str()) || state != "active" {
            seen_other = true;
        }
        if seen_other && state == "active" && pid != "0" {
            break;
        }
        let restarts: u64 = p.get("NRestarts").and_then(|v| v.parse().ok()).unwrap_or(0);
        if state == "failed" || restarts >= n_restarts0 + 2 {
            bail!(
                "kilnd did not start ({} restart(s), state {state}, result {}): {}",
                restarts - n_restarts0.min(restarts),
                p.get("Result").map(String::as_str).unwrap_or("?"),
                journal_tail()
            );
        }
        if Instant::now() > deadline {
            bail!("kilnd was not READY within {}s (state {state}): {}", timeout.as_secs(), journal_tail());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    say("kilnd is READY");
    let Some(model) = spec.models.iter().find(|m| m.pin).or(spec.models.first()) else {
        say("no models: no canary");
        return Ok(());
    };
    let mut addr = spec.supervisor.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let token = match &spec.supervisor.api_token_file {
        Some(f) => {
            let p = opts.root.join(f.to_string_lossy().trim_start_matches('/'));
            Some(fs::read_to_string(&p).with_context(|| format!("reading the API token {}", p.display()))?)
        }
        None => None,
    };
    let remaining = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(5));
    let agent: ureq::Agent =
        ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(remaining)).build().into();
    // Not deterministic (temperature > 0, no seed): the response cache cannot answer it.
    let body = serde_json::json!({ "model": model.id, "prompt": "Hello", "max_tokens": 1, "temperature": 0.8 });
    let mut req = agent.post(&format!("http://{addr}/v1/completions")).header("content-type", "application/json");
    if let Some(t) = &token {
        req = req.header("authorization", &format!("Bearer {}", t.trim()));
    }
    let mut resp = req
        .send(serde_json::to_vec(&body)?.as_slice())
        .map_err(|e| anyhow!("the canary completion to {addr} failed: {e}"))?;
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    if status != 200 {
        bail!("the canary completion of {} got HTTP {status}: {}", model.id, text.trim());
    }
    let v: serde_json::Value = serde_json::from_str(&text).context("the canary's answer is not JSON")?;
    if v["choices"][0]["text"].as_str().is_none() {
        bail!("the canary's answer has no text: {text}");
    }
    say(&format!("canary completion of {} answered", model.id));
    Ok(())
}

fn unit_props() -> std::collections::BTreeMap<String, String> {
    let out = Command::new("systemctl")
        .args(["show", KILND_UNIT, "-p", "ActiveState", "-p", "MainPID", "-p", "NRestarts", "-p", "Result"])
        .output();
    let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    text.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn journal_tail() -> String {
    let lines = |args: &[&str]| -> Vec<String> {
        let out = Command::new("journalctl").args(["-u", KILND_UNIT, "--no-pager", "-o", "cat"]).args(args).output();
        let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
        text.lines().filter(|l| !l.trim().is_empty()).map(str::to_owned).collect()
    };
    // kilnd's own errors say why (e.g. `cannot listen on ...`); systemd's lines say what followed.
    let mut all = lines(&["-p", "err", "-n", "3"]);
    all.extend(lines(&["-n", "5"]));
    if all.is_empty() { "(no journal lines)".into() } else { format!("last journal lines:\n  {}", all.join("\n  ")) }
}
