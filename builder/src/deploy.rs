//! `kiln deploy`: re-deploy an edited spec to a running device over SSH as a new generation.
//!
//! 1. Ask the device what it runs (`kilnd generations --json`: the active manifest and the
//!    store's model hashes).
//! 2. Render the new generation here and diff it against the active one.
//! 3. Send only what the device lacks: models by sha256 (`kilnd receive-model`, verified while
//!    written, renamed into the store only when whole), then the generation as a tar stream
//!    holding the manifest and the files whose hash the device does not have (`kilnd receive`,
//!    published under its number only when complete).
//! 4. Activate it on the device (`kilnd activate N`, in a transient systemd unit so a dropped
//!    connection does not stop it half-way): only what the diff needs is applied, then the
//!    health gate; an unhealthy generation is rolled back on the device.
//!
//! Until step 4 the device runs what it ran: killing a deploy during a transfer changes nothing.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context as _, Result, anyhow, bail};
use kiln_spec::diff::diff;
use kiln_spec::model::ModelSource;
use kiln_spec::render::{Kind, Manifest, pack, render};
use kiln_spec::validate::{Context, load_file};

/// `ssh://user@host[:port]`, with how to authenticate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub user: String,
    pub host: String,
    pub port: u16,
    pub identity: Option<PathBuf>,
    /// A known_hosts file of its own (new host keys are accepted into it; a changed one is refused).
    pub known_hosts: Option<PathBuf>,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target> {
        let rest = url
            .strip_prefix("ssh://")
            .ok_or_else(|| anyhow!("--target `{url}` must look like ssh://user@host[:port]"))?;
        let (user, hostport) =
            rest.split_once('@').ok_or_else(|| anyhow!("--target `{url}` names no user: ssh://user@host[:port]"))?;
        let hostport = hostport.trim_end_matches('/');
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') || h.starts_with('[') => {
                (h, p.parse().map_err(|_| anyhow!("--target `{url}`: `{p}` is not a port"))?)
            }
            _ => (hostport, 22),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if user.is_empty() || host.is_empty() {
            bail!("--target `{url}` must look like ssh://user@host[:port]");
        }
        Ok(Target { user: user.into(), host: host.into(), port, identity: None, known_hosts: None })
    }

    /// An ssh command running `remote` on the device, as root (sudo -n for other users).
    pub fn command(&self, remote: &str) -> Command {
        let mut c = Command::new("ssh");
        c.args(["-p", &self.port.to_string(), "-o", "BatchMode=yes", "-o", "ConnectTimeout=20"]);
        c.args(["-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]);
        if let Some(id) = &self.identity {
            c.arg("-i").arg(id).args(["-o", "IdentitiesOnly=yes"]);
        }
        if let Some(k) = &self.known_hosts {
            c.arg("-o").arg(format!("UserKnownHostsFile={}", k.display()));
            c.args(["-o", "StrictHostKeyChecking=accept-new"]);
        }
        c.arg(format!("{}@{}", self.user, self.host));
        let sudo = if self.user == "root" { "" } else { "sudo -n " };
        c.arg(format!("{sudo}{remote}"));
        c
    }

    /// Runs `remote` and returns its stdout; the error carries its stderr.
    fn output(&self, remote: &str, stdin: Option<Stdio>) -> Result<String> {
        let mut c = self.command(remote);
        c.stdin(stdin.unwrap_or(Stdio::null())).stdout(Stdio::piped()).stderr(Stdio::piped());
        let out = c.output().context("running ssh (is openssh-client installed?)")?;
        if !out.status.success() {
            bail!(
                "{}",
                describe_failure(&self.to_string(), remote, &out.status, &String::from_utf8_lossy(&out.stderr))
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ssh://{}@{}:{}", self.user, self.host, self.port)
    }
}

fn describe_failure(target: &str, remote: &str, status: &std::process::ExitStatus, stderr: &str) -> String {
    let stderr = stderr.trim();
    let hint = if status.code() == Some(255) {
        " (ssh could not connect or log in: check the address, --identity and that the user's key is in the spec)"
    } else if stderr.contains("a password is required") {
        " (the user needs passwordless sudo: give it `sudo: true` and no password in the spec, or deploy as root)"
    } else if stderr.contains("kilnd: command not found") || stderr.contains("kilnd: not found") {
        " (the device has no kilnd: was it built by kiln?)"
    } else {
        ""
    };
    format!("`{remote}` on {target} failed ({status}){hint}: {stderr}")
}

/// What the device reported about itself.
#[derive(Debug, Clone)]
pub struct Remote {
    pub current: Option<u32>,
    pub manifest: Option<Manifest>,
    pub store: BTreeSet<String>,
}

pub fn remote_state(t: &Target) -> Result<Remote> {
    let text = t.output("kilnd generations --json", None)?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("the device's `kilnd generations --json` said: {text}"))?;
    let manifest = match &v["manifest"] {
        serde_json::Value::Null => None,
        m => Some(serde_json::from_value(m.clone()).context("reading the device's active manifest")?),
    };
    let store = v["store"].as_array().into_iter().flatten().filter_map(|s| s.as_str().map(str::to_owned)).collect();
    Ok(Remote { current: v["current"].as_u64().map(|n| n as u32), manifest, store })
}

#[derive(Debug, Clone, Default)]
pub struct DeployOptions {
    pub dry_run: bool,
    pub health_timeout_secs: Option<u64>,
}

/// How a deploy ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deployed {
    Unchanged { current: Option<u32> },
    DryRun,
    Activated { number: u32 },
    RolledBack { number: u32 },
}

/// Deploys `spec` to `t`; progress goes to `say`.
pub fn deploy(spec: &Path, t: &Target, opts: &DeployOptions, say: &mut dyn FnMut(&str)) -> Result<Deployed> {
    let loaded = load_file(spec, Context::Host).map_err(|d| anyhow!("{d}"))?;
    let manifest = render(&loaded).context("rendering the generation")?;
    say(&format!("{}: generation {}", spec.display(), &manifest.generation[..16]));
    let remote = remote_state(t)?;
    let empty = Manifest { generation: String::new(), name: manifest.name.clone(), entries: Vec::new() };
    let active = remote.manifest.as_ref().unwrap_or(&empty);
    if !active.name.is_empty() && active.name != manifest.name {
        bail!(
            "{t} runs `{}`, and this spec is `{}`: refusing to replace one device's system with another's",
            active.name,
            manifest.name
        );
    }
    let plan = diff(active, &manifest);
    let models: Vec<(String, String, PathBuf, u64)> = loaded
        .spec
        .models
        .iter()
        .filter(|m| !remote.store.contains(&m.sha256))
        .filter_map(|m| match &m.source {
            ModelSource::Path(p) => Some((m.id.clone(), m.sha256.clone(), p.clone(), m.size_bytes)),
            _ => None,
        })
        .collect();
    let current = remote.current.map_or("no generation".to_string(), |n| format!("generation {n}"));
    if plan.is_empty() && models.is_empty() {
        say(&format!("{t} already runs this generation ({current}): nothing to do"));
        return Ok(Deployed::Unchanged { current: remote.current });
    }
    say(&format!("{t} runs {current}; the new one differs:"));
    for line in plan.to_string().lines() {
        say(&format!("  {line}"));
    }
    for (id, sha, _, bytes) in &models {
        say(&format!("  model {id} ({} MiB, {}) is not on the device: it will be sent", bytes >> 20, &sha[..12]));
    }
    if opts.dry_run {
        return Ok(Deployed::DryRun);
    }
    for (id, sha, path, bytes) in &models {
        say(&format!("sending model {id} ({} MiB)", bytes >> 20));
        let started = Instant::now();
        let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        t.output(&format!("kilnd receive-model {sha} --id {id}"), Some(Stdio::from(file)))
            .with_context(|| format!("sending model {id}"))?;
        let secs = started.elapsed().as_secs_f64();
        say(&format!("  sent and verified in {secs:.1}s ({:.1} MiB/s)", (*bytes as f64 / 1048576.0) / secs.max(0.001)));
    }
    let known: BTreeSet<String> = active.entries.iter().map(|e| e.sha256.clone()).filter(|s| !s.is_empty()).collect();
    let stream = pack(&manifest, &known).context("packing the generation")?;
    let sent = manifest
        .entries
        .iter()
        .filter(|e| matches!(e.kind, Kind::File | Kind::Block | Kind::Args) && !known.contains(&e.sha256))
        .count();
    say(&format!("sending the generation: manifest and {sent} file(s) the device lacks ({} bytes)", stream.len()));
    let mut child = t
        .command("kilnd receive")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running ssh")?;
    child
        .stdin
        .take()
        .ok_or_else(|| anyhow!("ssh has no stdin"))?
        .write_all(&stream)
        .context("sending the generation")?;
    let out = child.wait_with_output().context("sending the generation")?;
    if !out.status.success() {
        bail!(
            "{}",
            describe_failure(&t.to_string(), "kilnd receive", &out.status, &String::from_utf8_lossy(&out.stderr))
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let number: u32 = text.trim().parse().with_context(|| format!("`kilnd receive` answered `{}`", text.trim()))?;
    say(&format!("the device holds it as generation {number}; activating"));
    match activate_remote(t, &format!("activate {number}"), opts.health_timeout_secs, say)? {
        true => Ok(Deployed::Activated { number }),
        false => Ok(Deployed::RolledBack { number }),
    }
}

/// Runs `kilnd ARGS` (activate or rollback) on the device in a transient unit, relaying its
/// lines; true when it ended healthy, false when it rolled back.
pub fn activate_remote(t: &Target, args: &str, timeout: Option<u64>, say: &mut dyn FnMut(&str)) -> Result<bool> {
    let timeout = timeout.map(|s| format!(" --health-timeout {s}")).unwrap_or_default();
    // A transient unit: the activation (and its rollback) finishes even if this connection drops.
    let remote = format!(
        "systemd-run --quiet --wait --pipe --collect --service-type=exec --unit=kiln-{} /usr/bin/kilnd {args}{timeout}",
        args.replace(' ', "-")
    );
    let mut child = t.command(&remote).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("ssh has no stdout"))?;
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        say(&format!("  device: {}", line.context("reading the device's output")?));
    }
    let out = child.wait_with_output()?;
    match out.status.code() {
        Some(0) => Ok(true),
        Some(2) => Ok(false),
        _ => bail!("{}", describe_failure(&t.to_string(), &remote, &out.status, &String::from_utf8_lossy(&out.stderr))),
    }
}

/// `kilnd generations` on the device, as text.
pub fn generations(t: &Target) -> Result<String> {
    t.output("kilnd generations", None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_with_and_without_a_port() {
        let t = Target::parse("ssh://kiln-admin@192.168.1.20:2222").unwrap();
        assert_eq!((t.user.as_str(), t.host.as_str(), t.port), ("kiln-admin", "192.168.1.20", 2222));
        let t = Target::parse("ssh://root@pi.local").unwrap();
        assert_eq!((t.user.as_str(), t.host.as_str(), t.port), ("root", "pi.local", 22));
        let t = Target::parse("ssh://root@[fe80::1]:22").unwrap();
        assert_eq!(t.host, "fe80::1");
        for bad in ["pi.local", "ssh://pi.local", "ssh://root@pi:port", "ssh://@pi"] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn commands_use_sudo_only_for_other_users() {
        let t = Target::parse("ssh://kiln-admin@h:2").unwrap();
        let args: Vec<String> = t.command("kilnd x").get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(args.last().unwrap(), "sudo -n kilnd x");
        let t = Target::parse("ssh://root@h").unwrap();
        let args: Vec<String> = t.command("kilnd x").get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(args.last().unwrap(), "kilnd x");
    }
}
