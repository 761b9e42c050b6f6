//! system (hostname, time zone, locale, users, SSH, Wi-Fi) and supervisor: who can log in and
//! reach the API, and how. Secrets are read from files or the environment, never inline.

use std::net::SocketAddr;
use std::path::Path;

use super::{Context, Validator, is_dns_label};
use crate::model::{PskSource, Supervisor, System, User, Wifi};
use crate::raw::{self, LogLevel};
use crate::units::{format_bytes, parse_bytes};

const SSH_KEY_TYPES: [&str; 8] = [
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
    "ssh-dss",
];
/// crypt(3) prefixes that are strong enough: yescrypt, gost-yescrypt, sha512, sha256, bcrypt.
const HASH_PREFIXES: [&str; 6] = ["$y$", "$gy$", "$6$", "$5$", "$2b$", "$2y$"];
const ZONEINFO: &str = "/usr/share/zoneinfo";

impl Validator<'_> {
    pub(super) fn system(&mut self, s: &raw::System, name: &str) -> Option<System> {
        let hostname = s.hostname.clone().unwrap_or_else(|| name.to_string());
        if s.hostname.is_some() && !is_dns_label(&hostname) {
            self.err(
                "system.hostname",
                format!("`{hostname}` is not a hostname; use 1-63 lowercase letters, digits and dashes"),
            );
        }
        let timezone = s.timezone.clone().unwrap_or_else(|| "UTC".into());
        self.timezone(&timezone);
        let locale = s.locale.clone().unwrap_or_else(|| "C.UTF-8".into());
        if !is_locale(&locale) {
            self.err("system.locale", format!("`{locale}` is not a locale such as en_US.UTF-8 or C.UTF-8"));
        }
        let mut users = Vec::new();
        for (i, u) in s.users.iter().enumerate() {
            let p = format!("system.users[{i}]");
            if s.users[..i].iter().any(|x| x.name == u.name) {
                self.err(&format!("{p}.name"), format!("user `{}` is declared twice", u.name));
            }
            if let Some(user) = self.user(&p, u) {
                users.push(user);
            }
        }
        let any_keys = users.iter().any(|u| !u.ssh_authorized_keys.is_empty());
        let ssh_enable = s.ssh.as_ref().and_then(|x| x.enable).unwrap_or(any_keys);
        let ssh_password_authentication = s.ssh.as_ref().and_then(|x| x.password_authentication).unwrap_or(false);
        if ssh_enable && !any_keys && !(ssh_password_authentication && users.iter().any(|u| u.password_hash.is_some()))
        {
            self.warn(
                "system.ssh",
                "SSH is on but no user has a key (or a password with password-authentication): no one can log in",
            );
        }
        if ssh_password_authentication && !ssh_enable {
            self.warn("system.ssh.password-authentication", "has no effect: SSH is off");
        }
        let wifi = match &s.wifi {
            Some(w) => Some(self.wifi(w)?),
            None => None,
        };
        for (i, p) in s.packages.iter().enumerate() {
            if p.is_empty() || p.contains(char::is_whitespace) {
                self.err(&format!("system.packages[{i}]"), format!("`{p}` is not a package name"));
            }
        }
        Some(System {
            hostname,
            timezone,
            locale,
            users,
            ssh_enable,
            ssh_password_authentication,
            wifi,
            packages: s.packages.clone(),
        })
    }

    fn timezone(&mut self, tz: &str) {
        let shape_ok = !tz.is_empty()
            && !tz.starts_with('/')
            && !tz.split('/').any(|c| c.is_empty() || c == "..")
            && tz.bytes().all(|b| b.is_ascii_alphanumeric() || b"/_-+".contains(&b));
        if !shape_ok {
            self.err("system.timezone", format!("`{tz}` is not a time zone name such as Europe/Berlin or UTC"));
            return;
        }
        // Where the host has the zone database, check the zone exists; its names are the same everywhere.
        let db = Path::new(ZONEINFO);
        if db.is_dir() && !db.join(tz).is_file() {
            let area = tz.split('/').next().unwrap_or_default();
            let candidates: Vec<String> = std::fs::read_dir(db.join(area))
                .map(|rd| {
                    rd.filter_map(|e| e.ok()).map(|e| format!("{area}/{}", e.file_name().to_string_lossy())).collect()
                })
                .unwrap_or_default();
            let hint = crate::diag::did_you_mean(tz, candidates.iter().map(String::as_str))
                .map(|s| format!("; did you mean `{s}`?"))
                .unwrap_or_default();
            self.err("system.timezone", format!("`{tz}` is not in the time zone database{hint}"));
        }
    }

    fn user(&mut self, p: &str, u: &raw::User) -> Option<User> {
        let mut ok = true;
        let valid_name = u.name.len() <= 32
            && u.name.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
            && u.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-".contains(&b));
        if !valid_name {
            self.err(&format!("{p}.name"), format!("`{}` is not a user name; use up to 32 lowercase letters, digits, `_` and `-`, starting with a letter", u.name));
            ok = false;
        }
        if u.name == "root" {
            self.err(&format!("{p}.name"), "root is not managed by kiln; declare your own user with sudo: true");
        }
        if u.name == "kiln" {
            self.err(&format!("{p}.name"), "`kiln` is the supervisor's own system user; choose another name");
        }
        if u.password.is_some() {
            self.err_key(&format!("{p}.password"), "plain passwords are refused: they end up in the image and in version control. Use password-hash with the output of `mkpasswd -m yescrypt`");
            ok = false;
        }
        if let Some(h) = &u.password_hash
            && h != "!"
            && h != "*"
            && !HASH_PREFIXES.iter().any(|pre| h.starts_with(pre))
        {
            let msg = if h.starts_with("$1$") {
                "is an MD5 crypt hash, too weak; make a new one with `mkpasswd -m yescrypt`".to_string()
            } else {
                "is not a crypt(3) hash; make one with `mkpasswd -m yescrypt` (or `!` to lock the password)".to_string()
            };
            self.err(&format!("{p}.password-hash"), format!("this {msg}"));
            ok = false;
        }
        for (i, key) in u.ssh_authorized_keys.iter().enumerate() {
            let mut parts = key.split_whitespace();
            let (kind, body) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
            let body_ok = body.len() >= 16 && body.bytes().all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b));
            if !SSH_KEY_TYPES.contains(&kind) || !body_ok || key.contains('\n') {
                self.err(&format!("{p}.ssh-authorized-keys[{i}]"), "not an OpenSSH public key; paste one line of a .pub file, such as `ssh-ed25519 AAAAC3... you@laptop`");
                ok = false;
            }
        }
        for (i, g) in u.groups.iter().enumerate() {
            if g.is_empty() || !g.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-".contains(&b)) {
                self.err(&format!("{p}.groups[{i}]"), format!("`{g}` is not a group name"));
            }
        }
        ok.then(|| User {
            name: u.name.clone(),
            ssh_authorized_keys: u.ssh_authorized_keys.clone(),
            password_hash: u.password_hash.clone(),
            sudo: u.sudo.unwrap_or(false),
            groups: u.groups.clone(),
        })
    }

    fn wifi(&mut self, w: &raw::Wifi) -> Option<Wifi> {
        if w.ssid.is_empty() || w.ssid.len() > 32 {
            self.err("system.wifi.ssid", format!("an SSID is 1-32 bytes; this one is {}", w.ssid.len()));
        }
        if w.country.len() != 2 || !w.country.bytes().all(|b| b.is_ascii_uppercase()) {
            self.err(
                "system.wifi.country",
                format!("`{}` is not a two-letter country code such as DE or US", w.country),
            );
        }
        if w.psk.is_some() {
            self.err_key("system.wifi.psk", "secrets are never inline in a spec; put the passphrase in a file (psk-file: ./secrets/wifi.psk) or an environment variable (psk-env: WIFI_PSK)");
            return None;
        }
        let (source, psk) = match (&w.psk_file, &w.psk_env) {
            (Some(_), Some(_)) => {
                self.err_key("system.wifi.psk-env", "give psk-file or psk-env, not both");
                return None;
            }
            (None, None) => {
                self.err_key("system.wifi", "missing the passphrase: add psk-file (a file holding it) or psk-env (an environment variable holding it)");
                return None;
            }
            (Some(f), None) => {
                let path = match self.ctx {
                    Context::Host => self.existing_file("system.wifi.psk-file", f, "passphrase file")?,
                    Context::Device => return None,
                };
                match std::fs::read_to_string(&path) {
                    Ok(text) => (PskSource::File(path), text.trim_end_matches(['\n', '\r']).to_string()),
                    Err(e) => {
                        self.err("system.wifi.psk-file", format!("cannot read `{f}`: {e}"));
                        return None;
                    }
                }
            }
            (None, Some(var)) => match std::env::var(var) {
                Ok(v) => (PskSource::Env(var.clone()), v),
                Err(_) => {
                    self.err(
                        "system.wifi.psk-env",
                        format!("environment variable `{var}` is not set (or not UTF-8); set it when running kiln"),
                    );
                    return None;
                }
            },
        };
        let hex64 = psk.len() == 64 && psk.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex64 && !(8..=63).contains(&psk.len()) {
            let at = if w.psk_file.is_some() { "system.wifi.psk-file" } else { "system.wifi.psk-env" };
            self.err(at, format!("a WPA passphrase is 8-63 characters (or 64 hex digits); this one has {}", psk.len()));
            return None;
        }
        Some(Wifi { ssid: w.ssid.clone(), country: w.country.clone(), psk_source: source, psk })
    }

    pub(super) fn supervisor(&mut self, s: &raw::Supervisor) -> Option<Supervisor> {
        let listen_text = s.listen.clone().unwrap_or_else(|| "127.0.0.1:8080".into());
        let listen = match listen_text.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.err(
                    "supervisor.listen",
                    format!("`{listen_text}` is not an address:port such as 127.0.0.1:8080 or [::1]:8080"),
                );
                None
            }
        };
        let api_token_file = match &s.api_token_file {
            Some(f) => {
                match self.ctx {
                    Context::Host => {
                        let path = self.existing_file("supervisor.api-token-file", f, "token file");
                        if let Some(p) = &path
                            && std::fs::read_to_string(p).map(|t| t.trim().len() < 16).unwrap_or(true)
                        {
                            self.err("supervisor.api-token-file", format!("`{f}` must hold a token of at least 16 characters (e.g. from `openssl rand -hex 32`)"));
                        }
                        path
                    }
                    Context::Device => Some(Path::new(f).to_path_buf()),
                }
            }
            None => None,
        };
        if let Some(addr) = listen
            && !addr.ip().is_loopback()
            && s.api_token_file.is_none()
        {
            self.err("supervisor.listen", format!("refusing to serve on {addr} without a token: anyone on the network could use the models. Add api-token-file, or listen on 127.0.0.1"));
        }
        let queue_depth = s.queue_depth.unwrap_or(8);
        if !(1..=1024).contains(&queue_depth) {
            self.err("supervisor.queue-depth", format!("{queue_depth} is outside 1-1024"));
        }
        let limits = s.limits.clone().unwrap_or_default();
        let body_limit_bytes = match &limits.body {
            Some(q) => self.qty("supervisor.limits.body", Some(q), parse_bytes)?,
            None => 1024 * 1024,
        };
        if !(1024..=64 * 1024 * 1024).contains(&body_limit_bytes) {
            self.err("supervisor.limits.body", format!("{} is outside 1KiB-64MiB", format_bytes(body_limit_bytes)));
        }
        let max_tokens_limit = limits.max_tokens.unwrap_or(1024);
        if max_tokens_limit == 0 {
            self.err("supervisor.limits.max-tokens", "0 would refuse every completion");
        }
        if limits.prompt_tokens == Some(0) {
            self.err("supervisor.limits.prompt-tokens", "0 would refuse every prompt");
        }
        let deploy = s.deploy.clone().unwrap_or_default();
        let health_timeout_secs = self.opt_secs("supervisor.deploy.health-timeout", &deploy.health_timeout, 5 * 60);
        if let Some(t) = health_timeout_secs
            && !(10..=3600).contains(&t)
        {
            self.err("supervisor.deploy.health-timeout", format!("{t}s is outside 10s-1h"));
        }
        let keep_generations = deploy.keep_generations.unwrap_or(5);
        if !(2..=100).contains(&keep_generations) {
            self.err(
                "supervisor.deploy.keep-generations",
                format!(
                    "{keep_generations} is outside 2-100 (the active generation and one to roll back to, at least)"
                ),
            );
        }
        Some(Supervisor {
            health_timeout_secs: health_timeout_secs?,
            keep_generations,
            listen: listen?,
            api_token_file,
            queue_depth,
            body_limit_bytes,
            prompt_tokens_limit: limits.prompt_tokens,
            max_tokens_limit,
            log_level: s.log_level.unwrap_or(LogLevel::Info),
        })
    }
}

fn is_locale(l: &str) -> bool {
    if l == "C.UTF-8" || l == "C" || l == "POSIX" {
        return true;
    }
    let (lang, enc) = l.split_once('.').unwrap_or((l, ""));
    let (ll, cc) = lang.split_once('_').unwrap_or((lang, "XX"));
    (2..=3).contains(&ll.len())
        && ll.bytes().all(|b| b.is_ascii_lowercase())
        && cc.len() == 2
        && cc.bytes().all(|b| b.is_ascii_uppercase())
        && (enc.is_empty() || enc == "UTF-8" || enc == "utf8")
}
