//! What changes between two generations, and what applying the change takes: reload sysctl,
//! reload systemd, restart units or kilnd, or reboot (boot files, zram devices in use).

use std::collections::BTreeSet;
use std::fmt;

use crate::render::{Effect, Entry, Kind, Manifest};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeKind {
    Added,
    Removed,
    /// Which of content, kind, mode and owner differ.
    Modified(Vec<&'static str>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub path: String,
    pub kind: ChangeKind,
}

/// The steps that apply a change, in the order to run them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    pub changes: Vec<Change>,
    pub sysusers_tmpfiles: bool,
    pub daemon_reload: bool,
    pub sysctl_reload: bool,
    pub hostname: bool,
    pub restart_units: BTreeSet<String>,
    pub restart_kilnd: bool,
    /// Paths whose change only takes effect after a reboot.
    pub reboot_for: Vec<String>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }
    pub fn needs_reboot(&self) -> bool {
        !self.reboot_for.is_empty()
    }
    fn apply_effect(&mut self, e: &Entry) {
        if e.path.starts_with("/etc/systemd/") {
            self.daemon_reload = true;
        }
        match e.effect {
            Effect::None => {}
            Effect::SysctlReload => self.sysctl_reload = true,
            Effect::DaemonReload => self.daemon_reload = true,
            Effect::TmpfilesSysusers => self.sysusers_tmpfiles = true,
            Effect::RestartUnit => self.restart_units.extend(e.units.iter().cloned()),
            Effect::Hostname => self.hostname = true,
            Effect::RestartKilnd => self.restart_kilnd = true,
            Effect::Reboot => self.reboot_for.push(e.path.clone()),
        }
    }
}

fn differences(a: &Entry, b: &Entry) -> Vec<&'static str> {
    let mut d = Vec::new();
    if a.kind != b.kind {
        d.push(match (&a.kind, &b.kind) {
            (Kind::Symlink { .. }, Kind::Symlink { .. }) => "target",
            _ => "kind",
        });
    }
    if a.sha256 != b.sha256 {
        d.push("content");
    }
    if a.mode != b.mode {
        d.push("mode");
    }
    if a.owner != b.owner {
        d.push("owner");
    }
    d
}

/// Compares two generations entry by entry.
pub fn diff(old: &Manifest, new: &Manifest) -> Plan {
    let mut plan = Plan::default();
    for e in &new.entries {
        match old.get(&e.path) {
            None => {
                plan.changes.push(Change { path: e.path.clone(), kind: ChangeKind::Added });
                plan.apply_effect(e);
            }
            Some(o) => {
                let d = differences(o, e);
                if !d.is_empty() {
                    plan.changes.push(Change { path: e.path.clone(), kind: ChangeKind::Modified(d) });
                    plan.apply_effect(e);
                }
            }
        }
    }
    for o in &old.entries {
        if new.get(&o.path).is_none() {
            plan.changes.push(Change { path: o.path.clone(), kind: ChangeKind::Removed });
            plan.apply_effect(o);
        }
    }
    plan.changes.sort_by(|a, b| a.path.cmp(&b.path));
    if plan.restart_kilnd {
        plan.restart_units.remove("kilnd.service");
    }
    plan
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.changes.is_empty() {
            return writeln!(f, "no changes: the generations are identical");
        }
        writeln!(f, "{} path(s) change:", self.changes.len())?;
        for c in &self.changes {
            match &c.kind {
                ChangeKind::Added => writeln!(f, "  + {}", c.path)?,
                ChangeKind::Removed => writeln!(f, "  - {}", c.path)?,
                ChangeKind::Modified(d) => writeln!(f, "  ~ {} ({})", c.path, d.join(", "))?,
            }
        }
        writeln!(f, "applying it takes:")?;
        if self.sysusers_tmpfiles {
            writeln!(f, "  systemd-sysusers && systemd-tmpfiles --create")?;
        }
        if self.daemon_reload {
            writeln!(f, "  systemctl daemon-reload")?;
        }
        if self.sysctl_reload {
            writeln!(f, "  systemctl restart systemd-sysctl.service (applies /etc/sysctl.d)")?;
        }
        if self.hostname {
            writeln!(f, "  hostnamectl hostname \"$(cat /etc/hostname)\"")?;
        }
        if !self.restart_units.is_empty() {
            let units: Vec<&str> = self.restart_units.iter().map(String::as_str).collect();
            writeln!(f, "  systemctl restart {}", units.join(" "))?;
        }
        if self.restart_kilnd {
            writeln!(f, "  systemctl restart kilnd.service")?;
        }
        if self.needs_reboot() {
            writeln!(f, "  reboot: {} only take(s) effect at boot", self.reboot_for.join(", "))?;
        }
        if !(self.sysusers_tmpfiles
            || self.daemon_reload
            || self.sysctl_reload
            || self.hostname
            || !self.restart_units.is_empty()
            || self.restart_kilnd
            || self.needs_reboot())
        {
            writeln!(f, "  nothing beyond writing the files")?;
        }
        Ok(())
    }
}
