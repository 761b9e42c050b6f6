//! Accounts in an image's /etc/passwd, group, shadow and gshadow, created the way
//! systemd-sysusers would from the generation's sysusers.d files, so owners by name resolve to
//! ids at build time and the device's systemd-sysusers finds nothing left to do.

use std::collections::BTreeMap;

/// The account databases of a root filesystem, as text lines.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Accounts {
    pub passwd: Vec<String>,
    pub group: Vec<String>,
    pub shadow: Vec<String>,
    pub gshadow: Vec<String>,
}

/// System ids are allocated downwards from here, as systemd-sysusers does (SYS_UID_MAX).
const SYSTEM_ID_MAX: u32 = 999;
const USER_ID_MIN: u32 = 1000;

fn lines(text: &str) -> Vec<String> {
    text.lines().filter(|l| !l.is_empty()).map(String::from).collect()
}

fn field(line: &str, n: usize) -> Option<&str> {
    line.split(':').nth(n)
}

impl Accounts {
    pub fn parse(passwd: &str, group: &str, shadow: &str, gshadow: &str) -> Accounts {
        Accounts { passwd: lines(passwd), group: lines(group), shadow: lines(shadow), gshadow: lines(gshadow) }
    }

    pub fn uid(&self, name: &str) -> Option<u32> {
        self.passwd.iter().find(|l| field(l, 0) == Some(name)).and_then(|l| field(l, 2)?.parse().ok())
    }

    pub fn gid(&self, name: &str) -> Option<u32> {
        self.group.iter().find(|l| field(l, 0) == Some(name)).and_then(|l| field(l, 2)?.parse().ok())
    }

    fn used(&self) -> Vec<u32> {
        let ids = |v: &Vec<String>| v.iter().filter_map(|l| field(l, 2)?.parse::<u32>().ok()).collect::<Vec<_>>();
        let mut all = ids(&self.passwd);
        all.extend(ids(&self.group));
        all
    }

    /// A free id: system ids count down from 999, user ids up from 1000; the same id is used
    /// for the user and its group.
    fn free_id(&self, system: bool) -> u32 {
        let used = self.used();
        if system {
            (1..=SYSTEM_ID_MAX).rev().find(|i| !used.contains(i)).unwrap_or(SYSTEM_ID_MAX)
        } else {
            (USER_ID_MIN..60000).find(|i| !used.contains(i)).unwrap_or(USER_ID_MIN)
        }
    }

    fn ensure_group(&mut self, name: &str, system: bool) -> u32 {
        if let Some(g) = self.gid(name) {
            return g;
        }
        let id = self.free_id(system);
        self.group.push(format!("{name}:x:{id}:"));
        self.gshadow.push(format!("{name}:!::"));
        id
    }

    /// Adds a user (and its own group) unless it exists; returns its uid.
    pub fn ensure_user(&mut self, name: &str, gecos: &str, home: &str, shell: &str, days: i64) -> u32 {
        if let Some(u) = self.uid(name) {
            return u;
        }
        let system = !home.starts_with("/home/");
        let id = self.free_id(system);
        let used = self.used();
        let gid = if self.gid(name).is_none() && !used.contains(&id) {
            self.group.push(format!("{name}:x:{id}:"));
            self.gshadow.push(format!("{name}:!::"));
            id
        } else {
            self.ensure_group(name, system)
        };
        self.passwd.push(format!("{name}:x:{id}:{gid}:{gecos}:{home}:{shell}"));
        self.shadow.push(format!("{name}:!*:{days}::::::"));
        id
    }

    /// Adds `user` to `group`'s members (creating a system group if needed).
    pub fn add_member(&mut self, user: &str, group: &str) {
        self.ensure_group(group, true);
        for line in self.group.iter_mut().chain(self.gshadow.iter_mut()) {
            if field(line, 0) != Some(group) {
                continue;
            }
            let members_at = line.rfind(':').map_or(line.len(), |i| i + 1);
            let members: Vec<&str> = line[members_at..].split(',').filter(|m| !m.is_empty()).collect();
            if !members.contains(&user) {
                let sep = if members.is_empty() { "" } else { "," };
                line.push_str(&format!("{sep}{user}"));
            }
        }
    }

    /// Sets a user's password hash in shadow.
    pub fn set_password(&mut self, user: &str, hash: &str) {
        for line in &mut self.shadow {
            if field(line, 0) == Some(user) {
                let mut parts: Vec<&str> = line.split(':').collect();
                if parts.len() > 1 {
                    parts[1] = hash;
                    *line = parts.join(":");
                }
            }
        }
    }

    /// Applies sysusers.d lines (`u` and `m`; `g` too), as the generation renders them.
    pub fn apply_sysusers(&mut self, conf: &str, days: i64) {
        for line in conf.lines() {
            let words = split_sysusers(line);
            match words.as_slice() {
                [t, name, _id, gecos, home, shell, ..] if t == "u" => {
                    let shell = if shell == "-" { "/usr/sbin/nologin" } else { shell };
                    self.ensure_user(name, gecos, home, shell, days);
                }
                [t, name, _id, gecos, home] if t == "u" => {
                    self.ensure_user(name, gecos, home, "/usr/sbin/nologin", days);
                }
                [t, user, group, ..] if t == "m" => self.add_member(user, group),
                [t, name, ..] if t == "g" => {
                    self.ensure_group(name, true);
                }
                _ => {}
            }
        }
    }

    /// Owner `user:group` by name -> numeric ids.
    pub fn resolve(&self, owner: &str) -> Option<(u32, u32)> {
        let (u, g) = owner.split_once(':').unwrap_or((owner, owner));
        Some((self.uid(u)?, self.gid(g)?))
    }

    pub fn texts(&self) -> BTreeMap<&'static str, String> {
        let join = |v: &Vec<String>| v.iter().map(|l| format!("{l}\n")).collect::<String>();
        BTreeMap::from([
            ("/etc/passwd", join(&self.passwd)),
            ("/etc/group", join(&self.group)),
            ("/etc/shadow", join(&self.shadow)),
            ("/etc/gshadow", join(&self.gshadow)),
        ])
    }
}

/// Splits a sysusers.d line into words, honouring double quotes; comments and blanks are empty.
fn split_sysusers(line: &str) -> Vec<String> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return vec![];
    }
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysusers_lines_create_system_and_regular_users_once() {
        let mut a = Accounts::parse(
            "root:x:0:0:root:/root:/bin/bash\npi:x:1000:1000::/home/pi:/bin/bash\n",
            "root:x:0:\npi:x:1000:\nsudo:x:27:\n",
            "root:*:19000:0:99999:7:::\npi:!:19000::::::\n",
            "root:*::\n",
        );
        let conf = "# comment\nu kiln - \"kiln supervisor\" /var/lib/kiln -\nu ops - \"ops\" /home/ops /bin/bash\nm ops sudo\nu pi - \"pi\" /home/pi /bin/bash\n";
        a.apply_sysusers(conf, 20000);
        assert_eq!(a.uid("kiln"), Some(999));
        assert_eq!(a.gid("kiln"), Some(999));
        assert_eq!(a.uid("ops"), Some(1001));
        assert_eq!(a.uid("pi"), Some(1000));
        assert!(a.group.iter().any(|l| l == "sudo:x:27:ops"));
        assert!(a.passwd.contains(&"kiln:x:999:999:kiln supervisor:/var/lib/kiln:/usr/sbin/nologin".to_string()));
        let again = a.clone();
        a.apply_sysusers(conf, 20000);
        assert_eq!(a, again, "applying twice changes nothing");
        a.set_password("ops", "$6$x$y");
        assert!(a.shadow.contains(&"ops:$6$x$y:20000::::::".to_string()));
        assert_eq!(a.resolve("kiln:kiln"), Some((999, 999)));
        assert_eq!(a.resolve("nobody:nobody"), None);
    }
}
