//! Which files a spec puts on the device, each from one template: the walk from a validated
//! field to its device file ends here.

use minijinja::{Environment, UndefinedBehavior, Value, context};
use sha2::{Digest, Sha256};

use super::normalize::{API_TOKEN_PATH, normalized_spec};
use super::{Effect, Entry, Kind, RenderError};
use crate::budget::Budget;
use crate::model::Spec;
use crate::raw::Storage;
use crate::units::{format_bytes, mib};
use crate::validate::Loaded;

const TEMPLATES: [(&str, &str); 21] = [
    ("header.j2", include_str!("../../templates/header.j2")),
    ("zram-generator.conf.j2", include_str!("../../templates/zram-generator.conf.j2")),
    ("sysctl.conf.j2", include_str!("../../templates/sysctl.conf.j2")),
    ("tmpfs.mount.j2", include_str!("../../templates/tmpfs.mount.j2")),
    ("kiln.slice.j2", include_str!("../../templates/kiln.slice.j2")),
    ("kilnd.service.j2", include_str!("../../templates/kilnd.service.j2")),
    ("kilnd.env.j2", include_str!("../../templates/kilnd.env.j2")),
    ("tmpfiles.conf.j2", include_str!("../../templates/tmpfiles.conf.j2")),
    ("sysusers-kiln.conf.j2", include_str!("../../templates/sysusers-kiln.conf.j2")),
    ("sysusers-users.conf.j2", include_str!("../../templates/sysusers-users.conf.j2")),
    ("authorized_keys.j2", include_str!("../../templates/authorized_keys.j2")),
    ("sudoers.j2", include_str!("../../templates/sudoers.j2")),
    ("kiln-passwords.service.j2", include_str!("../../templates/kiln-passwords.service.j2")),
    ("sshd.conf.j2", include_str!("../../templates/sshd.conf.j2")),
    ("hosts.j2", include_str!("../../templates/hosts.j2")),
    ("wifi.nmconnection.j2", include_str!("../../templates/wifi.nmconnection.j2")),
    ("config.txt.j2", include_str!("../../templates/config.txt.j2")),
    ("eeprom-boot-order.sh.j2", include_str!("../../templates/eeprom-boot-order.sh.j2")),
    ("eeprom-boot-order.service.j2", include_str!("../../templates/eeprom-boot-order.service.j2")),
    ("rpi-swap.conf.j2", include_str!("../../templates/rpi-swap.conf.j2")),
    ("dhcp.network.j2", include_str!("../../templates/dhcp.network.j2")),
];

const UNIT_DIR: &str = "/etc/systemd/system";
const ROOT: &str = "root:root";
const KILN: &str = "kiln:kiln";

struct Out<'a> {
    env: Environment<'a>,
    name: String,
    entries: Vec<Entry>,
}

impl Out<'_> {
    fn render(&self, template: &str, comment: &str, ctx: Value) -> Result<Vec<u8>, RenderError> {
        let tmpl = self.env.get_template(template).map_err(|e| tmpl_err(template, &e))?;
        let ctx = context! { name => self.name.clone(), comment => comment, ..ctx };
        tmpl.render(ctx).map(String::into_bytes).map_err(|e| tmpl_err(template, &e))
    }
    fn file(&mut self, path: &str, mode: u32, owner: &str, effect: Effect, content: Vec<u8>) {
        self.entries.push(Entry {
            path: path.into(),
            kind: Kind::File,
            mode,
            owner: owner.into(),
            sha256: String::new(),
            effect,
            units: vec![],
            content,
        });
    }
    fn tmpl(&mut self, path: &str, template: &str, ctx: Value, effect: Effect) -> Result<(), RenderError> {
        let content = self.render(template, "#", ctx)?;
        self.file(path, 0o644, ROOT, effect, content);
        Ok(())
    }
    fn restart(&mut self, units: &[&str]) {
        if let Some(e) = self.entries.last_mut() {
            e.effect = Effect::RestartUnit;
            e.units = units.iter().map(|u| u.to_string()).collect();
        }
    }
    fn dir(&mut self, path: &str, mode: u32, owner: &str) {
        self.entries.push(Entry {
            path: path.into(),
            kind: Kind::Dir,
            mode,
            owner: owner.into(),
            sha256: String::new(),
            effect: Effect::TmpfilesSysusers,
            units: vec![],
            content: vec![],
        });
    }
    fn link(&mut self, path: &str, target: &str, effect: Effect) {
        self.entries.push(Entry {
            path: path.into(),
            kind: Kind::Symlink { target: target.into() },
            mode: 0o777,
            owner: ROOT.into(),
            sha256: String::new(),
            effect,
            units: vec![],
            content: vec![],
        });
    }
    /// The symlink `systemctl enable` makes for a unit in /etc/systemd/system.
    fn enable(&mut self, target: &str, unit: &str) {
        self.link(&format!("{UNIT_DIR}/{target}.wants/{unit}"), &format!("{UNIT_DIR}/{unit}"), Effect::DaemonReload);
    }
}

fn tmpl_err(template: &str, e: &minijinja::Error) -> RenderError {
    RenderError::Template { template: template.into(), message: format!("{e:#}") }
}

fn environment() -> Result<Environment<'static>, RenderError> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .keep_trailing_newline(true)
        .build()
        .map_err(|e| tmpl_err("syntax", &e))?;
    env.set_syntax(syntax);
    for (name, source) in TEMPLATES {
        env.add_template(name, source).map_err(|e| tmpl_err(name, &e))?;
    }
    Ok(env)
}

/// systemd's path escaping for mount unit names (`systemd-escape --path`), for the
/// characters validation allows in kiln's directories: `[A-Za-z0-9/_.-]`.
pub fn mount_unit_name(path: &str) -> String {
    let trimmed = path.trim_matches('/');
    let mut out = String::new();
    for (i, c) in trimmed.chars().enumerate() {
        match c {
            '/' => out.push('-'),
            '-' => out.push_str("\\x2d"),
            '.' if i == 0 => out.push_str("\\x2e"),
            c => out.push(c),
        }
    }
    format!("{out}.mount")
}

/// A stable UUID (v4 layout) derived from text, so renders are deterministic.
fn derived_uuid(text: &str) -> String {
    let h = Sha256::digest(text.as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&h[..16]);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let x = hex::encode(b);
    format!("{}-{}-{}-{}-{}", &x[0..8], &x[8..12], &x[12..16], &x[16..20], &x[20..32])
}

pub(super) fn entries(loaded: &Loaded) -> Result<Vec<Entry>, RenderError> {
    let spec = &loaded.spec;
    let mut out = Out { env: environment()?, name: spec.name.clone(), entries: Vec::new() };
    kiln(&mut out, loaded)?;
    memory(&mut out, spec)?;
    system(&mut out, spec)?;
    if spec.hardware.profile.is_pi() {
        pi_boot(&mut out, spec)?;
    } else {
        let args = kernel_args(spec);
        if !args.is_empty() {
            out.entries.push(args_entry("/etc/kernel/cmdline", &args));
        }
    }
    Ok(out.entries)
}

fn kiln(out: &mut Out<'_>, loaded: &Loaded) -> Result<(), RenderError> {
    let spec = &loaded.spec;
    out.dir("/etc/kiln", 0o755, ROOT);
    out.file(
        "/etc/kiln/spec.yaml",
        0o644,
        ROOT,
        Effect::RestartKilnd,
        normalized_spec(spec, &loaded.raw)?.into_bytes(),
    );
    let env =
        context! { malloc_arena_max => spec.memory.malloc_arena_max, log_level => spec.supervisor.log_level.as_str() };
    out.tmpl("/etc/kiln/kilnd.env", "kilnd.env.j2", env, Effect::RestartKilnd)?;
    out.file("/etc/kiln/packages.list", 0o644, ROOT, Effect::None, packages(spec).join("\n").into_bytes());
    if let Some(src) = &spec.supervisor.api_token_file {
        let token = std::fs::read_to_string(src).unwrap_or_default();
        out.file(API_TOKEN_PATH, 0o600, KILN, Effect::RestartKilnd, format!("{}\n", token.trim()).into_bytes());
    }
    out.tmpl("/etc/sysusers.d/kiln.conf", "sysusers-kiln.conf.j2", context! {}, Effect::TmpfilesSysusers)?;
    // kiln's directories exist in the image itself: the tmpfs mount point must be there before
    // the root is writable, and the store before kilnd starts.
    let mut kiln_dirs: Vec<String> = vec![
        "/var/lib/kiln".into(),
        crate::model::STORE_DIR.into(),
        "/var/cache/kiln".into(),
        spec.cache.prefix.dir.clone(),
    ];
    if let Some(t) = &spec.memory.tmpfs {
        kiln_dirs.push(t.path.clone());
    }
    kiln_dirs.sort();
    kiln_dirs.dedup();
    for d in &kiln_dirs {
        out.dir(d, 0o750, KILN);
    }
    let mut dirs: Vec<String> = vec![spec.cache.prefix.dir.clone()];
    if let Some(t) = &spec.memory.tmpfs {
        dirs.push(t.path.clone());
    }
    dirs.sort();
    dirs.dedup();
    out.tmpl("/etc/tmpfiles.d/kiln.conf", "tmpfiles.conf.j2", context! { dirs }, Effect::TmpfilesSysusers)?;
    out.tmpl(&format!("{UNIT_DIR}/kiln.slice"), "kiln.slice.j2", context! {}, Effect::DaemonReload)?;
    let budget = Budget::of(spec);
    let kilnd_bytes = spec.cgroups.kilnd.memory_max_bytes.unwrap_or(0);
    let hot_bytes = spec.memory.tmpfs.as_ref().map_or(0, |t| t.size_bytes);
    let tmpfs_unit = spec.memory.tmpfs.as_ref().map(|t| mount_unit_name(&t.path));
    let mut rw_paths = vec!["/var/lib/kiln".to_string(), "/var/cache/kiln".to_string(), spec.cache.prefix.dir.clone()];
    if let Some(t) = &spec.memory.tmpfs {
        rw_paths.push(t.path.clone());
    }
    rw_paths.sort();
    rw_paths.dedup();
    let ctx = context! {
        tmpfs_unit,
        kilnd_mib => mib(kilnd_bytes),
        inference_mib => mib(budget.inference_bytes),
        hot_mib => mib(hot_bytes),
        memory_max_bytes => kilnd_bytes + budget.inference_bytes + hot_bytes,
        cpu_weight => spec.cgroups.inference.cpu_weight,
        io_weight => spec.cgroups.inference.io_weight,
        rw_paths,
    };
    out.tmpl(&format!("{UNIT_DIR}/kilnd.service"), "kilnd.service.j2", ctx, Effect::RestartKilnd)?;
    out.enable("multi-user.target", "kilnd.service");
    Ok(())
}

/// What the image must contain for this generation, beyond a minimal system.
fn packages(spec: &Spec) -> Vec<String> {
    let mut p: Vec<String> = vec!["systemd".into(), "ca-certificates".into()];
    if spec.memory.zram.is_some() {
        p.push("systemd-zram-generator".into());
    }
    if spec.system.ssh_enable {
        p.push("openssh-server".into());
    }
    if spec.system.users.iter().any(|u| u.sudo) {
        p.push("sudo".into());
    }
    if spec.system.wifi.is_some() {
        p.push("network-manager".into());
    }
    if spec.system.locale != "C.UTF-8" {
        p.push("locales".into());
    }
    if spec.hardware.profile.is_pi() && spec.hardware.storage != Storage::Sd {
        p.push("rpi-eeprom".into());
    }
    p.extend(spec.system.packages.iter().cloned());
    p.sort();
    p.dedup();
    p.push(String::new());
    p
}

fn memory(out: &mut Out<'_>, spec: &Spec) -> Result<(), RenderError> {
    let m = &spec.memory;
    if let Some(z) = &m.zram {
        let ctx = context! { size_mib => mib(z.size_bytes), algorithm => z.algorithm.as_kernel_str(), priority => z.priority };
        out.tmpl("/etc/systemd/zram-generator.conf", "zram-generator.conf.j2", ctx, Effect::RestartUnit)?;
        out.restart(&["systemd-zram-setup@zram0.service"]);
    }
    let ctx = context! { swappiness => m.swappiness, vfs_cache_pressure => m.vfs_cache_pressure, page_cluster => m.page_cluster };
    out.tmpl("/etc/sysctl.d/90-kiln.conf", "sysctl.conf.j2", ctx, Effect::SysctlReload)?;
    if let Some(t) = &m.tmpfs {
        let unit = mount_unit_name(&t.path);
        let ctx =
            context! { path => t.path.clone(), size_bytes => t.size_bytes, size_human => format_bytes(t.size_bytes) };
        out.tmpl(&format!("{UNIT_DIR}/{unit}"), "tmpfs.mount.j2", ctx, Effect::RestartUnit)?;
        out.restart(&[&unit, "kilnd.service"]);
        out.enable("local-fs.target", &unit);
    }
    if spec.hardware.profile.is_pi() && !m.disk_swap {
        // Bookworm swaps to a file with dphys-swapfile, Trixie with rpi-swap: kiln's zram replaces both.
        out.link(&format!("{UNIT_DIR}/dphys-swapfile.service"), "/dev/null", Effect::Reboot);
        out.tmpl("/etc/rpi/swap.conf.d/50-kiln.conf", "rpi-swap.conf.j2", context! {}, Effect::Reboot)?;
    }
    Ok(())
}

fn system(out: &mut Out<'_>, spec: &Spec) -> Result<(), RenderError> {
    let s = &spec.system;
    out.file("/etc/hostname", 0o644, ROOT, Effect::Hostname, format!("{}\n", s.hostname).into_bytes());
    out.tmpl("/etc/hosts", "hosts.j2", context! { hostname => s.hostname.clone() }, Effect::None)?;
    out.link("/etc/localtime", &format!("/usr/share/zoneinfo/{}", s.timezone), Effect::RestartKilnd);
    out.file("/etc/timezone", 0o644, ROOT, Effect::RestartKilnd, format!("{}\n", s.timezone).into_bytes());
    out.file("/etc/default/locale", 0o644, ROOT, Effect::None, format!("LANG={}\n", s.locale).into_bytes());
    if s.locale != "C.UTF-8" {
        let charset = if s.locale.ends_with(".UTF-8") || s.locale.ends_with(".utf8") { "UTF-8" } else { "ISO-8859-1" };
        out.file("/etc/locale.gen", 0o644, ROOT, Effect::None, format!("{} {charset}\n", s.locale).into_bytes());
    }
    if !s.users.is_empty() {
        let users: Vec<Value> =
            s.users.iter().map(|u| context! { name => u.name.clone(), groups => u.groups.clone() }).collect();
        out.tmpl(
            "/etc/sysusers.d/50-kiln-users.conf",
            "sysusers-users.conf.j2",
            context! { users },
            Effect::TmpfilesSysusers,
        )?;
    }
    for u in &s.users {
        let owner = format!("{0}:{0}", u.name);
        out.dir(&format!("/home/{}", u.name), 0o750, &owner);
        if !u.ssh_authorized_keys.is_empty() {
            out.dir(&format!("/home/{}/.ssh", u.name), 0o700, &owner);
            let keys = out.render("authorized_keys.j2", "#", context! { keys => u.ssh_authorized_keys.clone() })?;
            out.file(&format!("/home/{}/.ssh/authorized_keys", u.name), 0o600, &owner, Effect::None, keys);
        }
    }
    let sudoers: Vec<Value> = s
        .users
        .iter()
        .filter(|u| u.sudo)
        .map(|u| context! { name => u.name.clone(), password => u.password_hash.is_some() })
        .collect();
    if !sudoers.is_empty() {
        let content = out.render("sudoers.j2", "#", context! { users => sudoers })?;
        out.file("/etc/sudoers.d/50-kiln-users", 0o440, ROOT, Effect::None, content);
    }
    let hashes: Vec<String> =
        s.users.iter().filter_map(|u| u.password_hash.as_ref().map(|h| format!("{}:{h}\n", u.name))).collect();
    if !hashes.is_empty() {
        out.dir("/etc/kiln/secrets", 0o700, ROOT);
        out.file("/etc/kiln/secrets/passwords", 0o600, ROOT, Effect::RestartUnit, hashes.concat().into_bytes());
        out.restart(&["kiln-passwords.service"]);
        out.tmpl(
            &format!("{UNIT_DIR}/kiln-passwords.service"),
            "kiln-passwords.service.j2",
            context! {},
            Effect::DaemonReload,
        )?;
        out.enable("multi-user.target", "kiln-passwords.service");
    }
    if s.ssh_enable {
        let users: Vec<String> = s.users.iter().map(|u| u.name.clone()).collect();
        let ctx = context! { password_authentication => s.ssh_password_authentication, users };
        out.tmpl("/etc/ssh/sshd_config.d/50-kiln.conf", "sshd.conf.j2", ctx, Effect::RestartUnit)?;
        out.restart(&["ssh.service"]);
        out.link(
            &format!("{UNIT_DIR}/multi-user.target.wants/ssh.service"),
            "/lib/systemd/system/ssh.service",
            Effect::DaemonReload,
        );
    } else {
        out.link(&format!("{UNIT_DIR}/ssh.service"), "/dev/null", Effect::DaemonReload);
    }
    if !spec.hardware.profile.is_pi() {
        // Raspberry Pi OS brings NetworkManager; the VM boards' Debian base uses systemd-networkd.
        out.tmpl("/etc/systemd/network/80-kiln-dhcp.network", "dhcp.network.j2", context! {}, Effect::RestartUnit)?;
        out.restart(&["systemd-networkd.service"]);
        for (target, unit) in [
            ("multi-user.target", "systemd-networkd.service"),
            ("sockets.target", "systemd-networkd.socket"),
            ("network-online.target", "systemd-networkd-wait-online.service"),
        ] {
            out.link(
                &format!("{UNIT_DIR}/{target}.wants/{unit}"),
                &format!("/lib/systemd/system/{unit}"),
                Effect::DaemonReload,
            );
        }
    }
    if let Some(w) = &s.wifi {
        let ctx = context! { ssid => w.ssid.clone(), psk => w.psk.clone(), uuid => derived_uuid(&format!("kiln-wifi:{}:{}", spec.name, w.ssid)) };
        let content = out.render("wifi.nmconnection.j2", "#", ctx)?;
        let path = "/etc/NetworkManager/system-connections/kiln-wifi.nmconnection";
        out.file(path, 0o600, ROOT, Effect::RestartUnit, content);
        out.restart(&["NetworkManager.service"]);
    }
    Ok(())
}

/// Kernel arguments kiln adds.
fn kernel_args(spec: &Spec) -> Vec<String> {
    let mut args = Vec::new();
    if spec.hardware.profile.is_pi() {
        // Raspberry Pi kernels have shipped with the memory controller off; kilnd's limits need it.
        args.push("cgroup_enable=memory".to_string());
        if let Some(w) = &spec.system.wifi {
            args.push(format!("cfg80211.ieee80211_regdom={}", w.country));
        }
    }
    if spec.memory.zram.is_some() {
        // zswap in front of zram would compress pages twice.
        args.push("zswap.enabled=0".to_string());
    }
    args
}

fn args_entry(path: &str, args: &[String]) -> Entry {
    Entry {
        path: path.into(),
        kind: Kind::Args,
        mode: 0o644,
        owner: ROOT.into(),
        sha256: String::new(),
        effect: Effect::Reboot,
        units: vec![],
        content: format!("{}\n", args.join(" ")).into_bytes(),
    }
}

fn pi_boot(out: &mut Out<'_>, spec: &Spec) -> Result<(), RenderError> {
    let hw = &spec.hardware;
    let mut lines = Vec::new();
    if let Some(pcie_gen) = hw.pcie_gen {
        lines.push("dtparam=pciex1".to_string());
        lines.push(format!("dtparam=pciex1_gen={pcie_gen}"));
    }
    if let Some(f) = hw.arm_freq_mhz {
        lines.push(format!("arm_freq={f}"));
    }
    if let Some(d) = hw.over_voltage_delta_uv {
        lines.push(format!("over_voltage_delta={d}"));
    }
    if hw.force_turbo {
        lines.push("force_turbo=1".to_string());
    }
    for (i, l) in hw.fan.iter().enumerate() {
        lines.push(format!(
            "dtparam=fan_temp{i}={},fan_temp{i}_hyst={},fan_temp{i}_speed={}",
            l.temp_millic, l.hysteresis_millic, l.speed
        ));
    }
    if let Some(t) = hw.temp_limit_c {
        lines.push(format!("temp_limit={t}"));
    }
    let block = out.render("config.txt.j2", "#", context! { lines })?;
    out.entries.push(Entry { kind: Kind::Block, ..args_entry("/boot/firmware/config.txt", &[]) });
    if let Some(e) = out.entries.last_mut() {
        e.content = block;
    }
    out.entries.push(args_entry("/boot/firmware/cmdline.txt", &kernel_args(spec)));
    if hw.storage != Storage::Sd {
        // BOOT_ORDER nibbles are tried right to left: 6 NVMe, 4 USB, 1 SD, f restart.
        let (storage, boot_order) = match hw.storage {
            Storage::Nvme => ("NVMe", "0xf416"),
            _ => ("USB", "0xf164"),
        };
        let ctx = context! { storage, boot_order };
        let script = out.render("eeprom-boot-order.sh.j2", "#", ctx.clone())?;
        out.file("/etc/kiln/eeprom-boot-order.sh", 0o755, ROOT, Effect::None, script);
        out.tmpl(
            &format!("{UNIT_DIR}/kiln-eeprom-boot-order.service"),
            "eeprom-boot-order.service.j2",
            ctx,
            Effect::DaemonReload,
        )?;
        out.enable("multi-user.target", "kiln-eeprom-boot-order.service");
    }
    Ok(())
}
