//! hardware, base, memory and cgroups: what the board has and how its RAM is split.

use super::{Context, Validator, is_sha256, sha256_message};
use crate::board;
use crate::model::{Base, Cgroups, FanLevel, Hardware, Limits, Memory, Tmpfs, Zram};
use crate::raw::{self, Arch, ZramAlgorithm};
use crate::units::{self, format_bytes, parse_bytes, parse_cpuset};

/// Firmware limit on `temp_limit` (values above are clamped by the firmware).
const TEMP_LIMIT_MAX_C: u32 = 85;
const FAN_LEVELS_MAX: usize = 4;
const DEFAULT_TMPFS_PATH: &str = "/var/cache/kiln/hot";

impl Validator<'_> {
    pub(super) fn hardware(&mut self, hw: &raw::Hardware) -> Option<Hardware> {
        let profile = match board::profile(hw.board) {
            Ok(p) => p,
            Err(e) => {
                self.err("hardware.board", format!("internal error in kiln's board data: {e}"));
                return None;
            }
        };
        let ram_bytes = self.qty("hardware.ram", Some(&hw.ram), parse_bytes);
        if let Some(ram) = ram_bytes {
            let sizes = profile.ram_sizes_bytes();
            if !sizes.is_empty() && !sizes.contains(&ram) {
                let list = sizes.iter().map(|b| format_bytes(*b)).collect::<Vec<_>>().join(", ");
                self.err(
                    "hardware.ram",
                    format!(
                        "{} is not a RAM size {} is sold with; use one of {list}",
                        format_bytes(ram),
                        profile_name(&profile)
                    ),
                );
            } else if sizes.is_empty() && ram < profile.min_ram_bytes() {
                self.err(
                    "hardware.ram",
                    format!(
                        "{} is too little; {} needs at least {}",
                        format_bytes(ram),
                        profile_name(&profile),
                        format_bytes(profile.min_ram_bytes())
                    ),
                );
            }
        }
        let storage = hw.storage.unwrap_or(profile.default_storage);
        if !profile.storage.contains(&storage) {
            let name = |s: &raw::Storage| format!("{s:?}").to_lowercase();
            let list = profile.storage.iter().map(name).collect::<Vec<_>>().join(", ");
            let msg = format!("{} cannot boot from {}; use one of {list}", profile_name(&profile), name(&storage));
            self.err("hardware.storage", msg);
        }
        let pcie_gen = match hw.pcie_gen {
            Some(g) if profile.pcie_gens.is_empty() => {
                self.err(
                    "hardware.pcie-gen",
                    format!("{} has no external PCIe link; remove pcie-gen (it was {g})", profile_name(&profile)),
                );
                None
            }
            Some(g) if !profile.pcie_gens.contains(&g) => {
                self.err(
                    "hardware.pcie-gen",
                    format!("PCIe gen {g} is not available on {}; use 2 or 3", profile_name(&profile)),
                );
                None
            }
            Some(3) => {
                self.warn("hardware.pcie-gen", "the Pi 5 is not certified for PCIe gen 3; some NVMe drives are unstable at it (fall back to 2 if you see I/O errors)");
                Some(3)
            }
            Some(g) => Some(g),
            None if !profile.pcie_gens.is_empty() && storage == raw::Storage::Nvme => Some(2),
            None => None,
        };
        let mut arm_freq_mhz = None;
        let mut over_voltage_delta_uv = None;
        let mut force_turbo = false;
        if let Some(oc) = &hw.overclock {
            if !profile.is_pi() {
                self.err_key(
                    "hardware.overclock",
                    format!("{} has no firmware clocks to set; remove overclock", profile_name(&profile)),
                );
            }
            if let (Some(f), Some(max)) = (oc.arm_freq_mhz, profile.arm_freq_max_mhz) {
                if !(600..=max).contains(&f) {
                    self.err(
                        "hardware.overclock.arm-freq-mhz",
                        format!("{f} MHz is outside 600-{max} MHz, what {} can run", profile_name(&profile)),
                    );
                } else if profile.arm_freq_warn_mhz.is_some_and(|w| f > w) {
                    self.warn(
                        "hardware.overclock.arm-freq-mhz",
                        format!(
                            "{f} MHz needs active cooling and a stable supply; test it under load before relying on it"
                        ),
                    );
                }
                arm_freq_mhz = Some(f);
            }
            if let Some(d) = oc.over_voltage_delta {
                if !(-100_000..=100_000).contains(&d) {
                    self.err(
                        "hardware.overclock.over-voltage-delta",
                        format!(
                            "{d} µV is outside ±100000 µV (±0.1 V); the value is in microvolts, e.g. 50000 = +50 mV"
                        ),
                    );
                }
                over_voltage_delta_uv = Some(d);
            }
            force_turbo = oc.force_turbo.unwrap_or(false);
            if force_turbo && over_voltage_delta_uv.is_some_and(|d| d > 0) && oc.void_warranty != Some(true) {
                self.err("hardware.overclock.force-turbo", "force-turbo with a positive over-voltage-delta permanently sets the warranty bit; refusing (set void-warranty: true to accept it)");
            }
        }
        let mut fan = Vec::new();
        let mut temp_limit_c = None;
        if let Some(c) = &hw.cooling {
            if !c.fan.is_empty() && !profile.fan_header {
                self.err_key(
                    "hardware.cooling.fan",
                    format!("{} has no fan header kiln can drive; remove the fan curve", profile_name(&profile)),
                );
            }
            if c.fan.len() > FAN_LEVELS_MAX {
                self.err_key(
                    "hardware.cooling.fan",
                    format!("the firmware has {FAN_LEVELS_MAX} fan levels; {} given", c.fan.len()),
                );
            }
            let mut prev: Option<f64> = None;
            for (i, level) in c.fan.iter().enumerate() {
                let path = format!("hardware.cooling.fan[{i}]");
                if !(20.0..=85.0).contains(&level.temp_c) {
                    self.err(&format!("{path}.temp-c"), format!("{} °C is outside 20-85 °C", level.temp_c));
                }
                if prev.is_some_and(|p| level.temp_c <= p) {
                    self.err(
                        &format!("{path}.temp-c"),
                        format!(
                            "{} °C is not above the previous level's {} °C; temperatures must rise",
                            level.temp_c,
                            prev.unwrap_or_default()
                        ),
                    );
                }
                if level.speed > 255 {
                    self.err(&format!("{path}.speed"), format!("{} is above 255, the fan's full PWM", level.speed));
                }
                prev = Some(level.temp_c);
                fan.push(FanLevel {
                    temp_millic: (level.temp_c * 1000.0).round() as u32,
                    hysteresis_millic: (level.hysteresis_c.unwrap_or(5.0) * 1000.0).round() as u32,
                    speed: level.speed,
                });
            }
            if let Some(t) = c.temp_limit_c {
                if !profile.is_pi() {
                    self.err(
                        "hardware.cooling.temp-limit-c",
                        format!("{} has no firmware temp_limit", profile_name(&profile)),
                    );
                } else if !(60..=TEMP_LIMIT_MAX_C).contains(&t) {
                    self.err("hardware.cooling.temp-limit-c", format!("{t} °C is outside 60-{TEMP_LIMIT_MAX_C} °C (the firmware clamps anything above {TEMP_LIMIT_MAX_C})"));
                }
                temp_limit_c = Some(t);
            }
        }
        Some(Hardware {
            profile,
            ram_bytes: ram_bytes?,
            storage,
            pcie_gen,
            arm_freq_mhz,
            over_voltage_delta_uv,
            force_turbo,
            fan,
            temp_limit_c,
        })
    }

    pub(super) fn base(&mut self, base: Option<&raw::Base>, hw: &Hardware) -> Option<Base> {
        let default_debian = raw::Debian::default();
        let (image, debian) = match base {
            Some(b) => (b.image.as_deref(), b.debian.as_ref()),
            None if hw.profile.is_pi() => {
                self.err_key("hardware.board", format!("{} needs `base: {{ image: ..., sha256: ... }}`: a Raspberry Pi OS Lite (arm64) image to start from", profile_name(&hw.profile)));
                return None;
            }
            None => (None, Some(&default_debian)),
        };
        match (image, debian) {
            (Some(_), Some(_)) => {
                self.err_key("base.debian", "give either base.image or base.debian, not both");
                None
            }
            (None, None) => {
                self.err_key("base", "give base.image (a Raspberry Pi OS image and its sha256) or base.debian");
                None
            }
            (Some(img), None) => {
                let sha = base.and_then(|b| b.sha256.clone());
                if !hw.profile.is_pi() {
                    self.err(
                        "base.image",
                        format!(
                            "{} builds from Debian; base.image takes a Raspberry Pi OS image, for Pi boards",
                            profile_name(&hw.profile)
                        ),
                    );
                }
                if ![".img", ".img.xz", ".img.zst"].iter().any(|ext| img.ends_with(ext)) {
                    self.err("base.image", format!("`{img}` is not a .img, .img.xz or .img.zst file"));
                }
                // Rendering does not read the base image (it is pinned by sha256 and only
                // `kiln build` opens it), so a missing one is a warning here, an error there.
                let path = self.host_path(img);
                if self.ctx == Context::Host {
                    match std::fs::metadata(&path) {
                        Ok(m) if !m.is_file() => self.err("base.image", format!("`{img}` is not a regular file")),
                        Ok(_) => {}
                        Err(e) => self.warn(
                            "base.image",
                            format!(
                                "`{img}` cannot be read ({e}); `kiln build` needs it: download it next to the spec"
                            ),
                        ),
                    }
                }
                let path = Some(path);
                match sha.as_deref() {
                    None => self.err_key("base", "base.image needs its sha256 (64 hex digits, from the download page's .sha256 file or `sha256sum`)"),
                    Some(s) if !is_sha256(s) => self.err("base.sha256", sha256_message(s)),
                    Some(_) => {}
                }
                Some(Base::Image { path: path?, sha256: sha.filter(|s| is_sha256(s))? })
            }
            (None, Some(d)) => {
                if base.is_some_and(|b| b.sha256.is_some()) {
                    self.err_key(
                        "base.sha256",
                        "sha256 pins base.image; a Debian base is pinned by its suite and mirror",
                    );
                }
                if hw.profile.is_pi() {
                    self.err_key(
                        "base.debian",
                        format!(
                            "Debian's kernel does not boot {}; use base.image with Raspberry Pi OS Lite (arm64)",
                            profile_name(&hw.profile)
                        ),
                    );
                }
                let arch = d.arch.unwrap_or(hw.profile.arch);
                if arch != hw.profile.arch {
                    self.err(
                        "base.debian.arch",
                        format!(
                            "{} is {}; a base built for {} cannot boot it",
                            profile_name(&hw.profile),
                            arch_name(hw.profile.arch),
                            arch_name(arch)
                        ),
                    );
                }
                let suite = d.suite.clone().unwrap_or_else(|| "bookworm".into());
                if suite.is_empty() || !suite.bytes().all(|b| b.is_ascii_lowercase() || b == b'-') {
                    self.err(
                        "base.debian.suite",
                        format!("`{suite}` is not a Debian suite name such as bookworm or trixie"),
                    );
                }
                let mirror = d.mirror.clone().unwrap_or_else(|| "http://deb.debian.org/debian".into());
                if !(mirror.starts_with("http://") || mirror.starts_with("https://") || mirror.starts_with("file:/")) {
                    self.err("base.debian.mirror", format!("`{mirror}` is not an http(s) or file: URL"));
                }
                for (i, p) in d.packages.iter().enumerate() {
                    if !is_package_name(p) {
                        self.err(&format!("base.debian.packages[{i}]"), format!("`{p}` is not a Debian package name"));
                    }
                }
                Some(Base::Debian { suite, arch, mirror, packages: d.packages.clone() })
            }
        }
    }

    /// Checks that compare with the board run when `hw` is valid.
    pub(super) fn memory(&mut self, m: &raw::Memory, hw: Option<&Hardware>) -> Option<Memory> {
        let ram = hw.map(|hw| hw.ram_bytes);
        let mut ok = true;
        let zram = match &m.zram {
            Some(z) => match self.qty("memory.zram.size", Some(&z.size), parse_bytes) {
                Some(0) => {
                    self.err("memory.zram.size", "0 bytes; remove memory.zram for no zram");
                    None
                }
                Some(size) => {
                    if let Some(ram) = ram.filter(|r| size > 2 * r) {
                        self.err("memory.zram.size", format!("{} is more than twice the board's {} of RAM; zram that large thrashes (use at most {})", format_bytes(size), format_bytes(ram), format_bytes(ram)));
                    }
                    Some(Zram {
                        size_bytes: size,
                        algorithm: z.algorithm.unwrap_or(ZramAlgorithm::Lz4),
                        priority: z.priority.unwrap_or(100),
                    })
                }
                None => {
                    ok = false;
                    None
                }
            },
            None => None,
        };
        let swappiness = m.swappiness.unwrap_or(10);
        if swappiness > 200 {
            self.err("memory.swappiness", format!("{swappiness} is above 200, the kernel's maximum"));
        }
        let page_cluster = m.page_cluster.unwrap_or(0);
        if page_cluster > 10 {
            self.err(
                "memory.page-cluster",
                format!("{page_cluster} would read 2^{page_cluster} pages per swap-in; use 0-10 (0 for zram)"),
            );
        }
        let vfs_cache_pressure = m.vfs_cache_pressure.unwrap_or(50);
        if vfs_cache_pressure > 1000 {
            self.err(
                "memory.vfs-cache-pressure",
                format!("{vfs_cache_pressure} is above 1000; 50 keeps caches, 100 is the kernel default"),
            );
        }
        let malloc_arena_max = m.malloc_arena_max.unwrap_or(2);
        if !(1..=64).contains(&malloc_arena_max) {
            self.err("memory.malloc-arena-max", format!("{malloc_arena_max} is outside 1-64"));
        }
        let tmpfs = match &m.tmpfs {
            Some(t) => {
                let path = t.path.clone().unwrap_or_else(|| DEFAULT_TMPFS_PATH.into());
                self.device_dir("memory.tmpfs.path", &path);
                match self.qty("memory.tmpfs.size", Some(&t.size), parse_bytes) {
                    Some(0) => {
                        self.err("memory.tmpfs.size", "0 bytes; remove memory.tmpfs for no hot tier");
                        None
                    }
                    Some(size) => Some(Tmpfs { path, size_bytes: size }),
                    None => {
                        ok = false;
                        None
                    }
                }
            }
            None => None,
        };
        ok.then_some(Memory {
            zram,
            swappiness,
            vfs_cache_pressure,
            page_cluster,
            tmpfs,
            malloc_arena_max,
            disk_swap: m.disk_swap.unwrap_or(false),
        })
    }

    /// A directory on the device kiln manages: absolute, normalized, outside system trees.
    pub(super) fn device_dir(&mut self, path: &str, dir: &str) {
        let reserved = [
            "/", "/etc", "/usr", "/bin", "/sbin", "/lib", "/boot", "/proc", "/sys", "/dev", "/run", "/tmp", "/var",
            "/home", "/root",
        ];
        if !dir.starts_with('/')
            || dir.contains("//")
            || dir.split('/').any(|c| c == ".." || c == ".")
            || (dir.len() > 1 && dir.ends_with('/'))
        {
            self.err(path, format!("`{dir}` is not an absolute, normalized path such as /var/cache/kiln/hot"));
        } else if reserved.contains(&dir)
            || dir.starts_with("/boot/")
            || dir.starts_with("/proc/")
            || dir.starts_with("/sys/")
            || dir.starts_with("/dev/")
        {
            self.err(path, format!("`{dir}` is a system directory; use one of kiln's own such as /var/cache/kiln/hot"));
        } else if !dir.bytes().all(|b| b.is_ascii_alphanumeric() || b"/-_.".contains(&b)) {
            self.err(
                path,
                format!(
                    "`{dir}` has characters systemd unit names would escape; use letters, digits, `-`, `_`, `.` and `/`"
                ),
            );
        }
    }

    pub(super) fn cgroups(&mut self, c: &raw::Cgroups, hw: Option<&Hardware>) -> Option<Cgroups> {
        let inference = self.limits("cgroups.inference", c.inference.as_ref(), hw)?;
        let mut kilnd = self.limits("cgroups.kilnd", c.kilnd.as_ref(), hw)?;
        kilnd.memory_max_bytes.get_or_insert(DEFAULT_KILND_MEMORY_MAX);
        let mut prewarm = self.limits("cgroups.prewarm", c.prewarm.as_ref(), hw)?;
        // Prewarm copies yield to inference: low I/O and CPU weight unless the spec says otherwise.
        prewarm.io_weight.get_or_insert(10);
        prewarm.cpu_weight.get_or_insert(10);
        if prewarm.memory_max_bytes.is_some() {
            // tmpfs pages are charged to the cgroup that writes them: a memory-max here would
            // cap the hot tier at it and push copied weights into swap.
            self.err_key("cgroups.prewarm.memory-max", "prewarm copies are charged the tmpfs pages they write; a memory-max here caps the hot tier and swaps weights out. Remove it (use io-weight or cache.prewarm.rate to throttle)");
        }
        Some(Cgroups { inference, kilnd, prewarm })
    }

    fn limits(&mut self, path: &str, l: Option<&raw::Limits>, hw: Option<&Hardware>) -> Option<Limits> {
        let Some(l) = l else { return Some(Limits::default()) };
        let p = |k: &str| format!("{path}.{k}");
        let mut ok = true;
        let mut bytes = |v: &mut Self, key: &str, q: Option<&raw::Quantity>| {
            let r = v.qty(&p(key), q, parse_bytes);
            ok &= q.is_none() || r.is_some();
            r
        };
        let memory_max_bytes = bytes(self, "memory-max", l.memory_max.as_ref());
        let memory_high_bytes = bytes(self, "memory-high", l.memory_high.as_ref());
        let swap_max_bytes = bytes(self, "swap-max", l.swap_max.as_ref());
        if let (Some(h), Some(m)) = (memory_high_bytes, memory_max_bytes)
            && h > m
        {
            self.err(
                &p("memory-high"),
                format!(
                    "{} is above memory-max ({}); memory-high throttles before the hard limit, so it must be lower",
                    format_bytes(h),
                    format_bytes(m)
                ),
            );
        }
        for (key, v) in [("memory-max", memory_max_bytes), ("memory-high", memory_high_bytes)] {
            if let Some(ram) = hw.map(|hw| hw.ram_bytes).filter(|r| v.is_some_and(|b| b > *r)) {
                self.err(
                    &p(key),
                    format!("{} is more than the board's {} of RAM", format_bytes(v.unwrap_or(0)), format_bytes(ram)),
                );
            } else if v == Some(0) {
                self.err(&p(key), "0 bytes would stop everything in this cgroup; remove the key for no limit");
            }
        }
        let cpus = self.qty(&p("cpus"), l.cpus.as_ref(), parse_cpuset);
        if let (Some(set), Some(hw)) = (&cpus, hw) {
            let cores = hw.profile.cores;
            if let Some(bad) = set.iter().find(|c| **c >= cores) {
                self.err(
                    &p("cpus"),
                    format!("CPU {bad} does not exist; {} has CPUs 0-{}", profile_name(&hw.profile), cores - 1),
                );
            }
        }
        ok &= l.cpus.is_none() || cpus.is_some();
        for (key, w) in [("cpu-weight", l.cpu_weight), ("io-weight", l.io_weight)] {
            if w.is_some_and(|w| !(1..=10_000).contains(&w)) {
                self.err(&p(key), format!("{} is outside 1-10000 (100 is the default share)", w.unwrap_or(0)));
            }
        }
        let quota = self.qty(&p("cpu-quota"), l.cpu_quota.as_ref(), parse_percent_unbounded);
        ok &= l.cpu_quota.is_none() || quota.is_some();
        if let (Some(q), Some(hw)) = (quota, hw) {
            let max = hw.profile.cores * 100;
            if q == 0 || q > max {
                self.err(&p("cpu-quota"), format!("{q}% is outside 1-{max}% ({} CPUs)", hw.profile.cores));
            }
        }
        ok.then_some(Limits {
            memory_max_bytes,
            memory_high_bytes,
            swap_max_bytes,
            cpus,
            cpu_weight: l.cpu_weight,
            cpu_quota_percent: quota,
            io_weight: l.io_weight,
        })
    }
}

/// kilnd's own default memory.max: it holds the response cache and HTTP state, not weights.
pub const DEFAULT_KILND_MEMORY_MAX: u64 = 256 * units::MIB;

fn parse_percent_unbounded(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let num = t
        .strip_suffix('%')
        .ok_or_else(|| format!("`{t}` is not a CPU quota; write a percentage of one CPU such as 250%"))?;
    num.trim()
        .parse::<u32>()
        .map_err(|_| format!("`{t}` is not a CPU quota; write a whole percentage of one CPU such as 250%"))
}

pub(crate) fn profile_name(p: &board::Profile) -> String {
    match p.board {
        raw::Board::Pi5 => "the Raspberry Pi 5".into(),
        raw::Board::Pi4 => "the Raspberry Pi 4".into(),
        raw::Board::GenericX86_64 => "generic-x86_64".into(),
        raw::Board::GenericAarch64 => "generic-aarch64".into(),
    }
}

fn arch_name(a: Arch) -> &'static str {
    match a {
        Arch::Arm64 => "arm64",
        Arch::Amd64 => "amd64",
    }
}

/// Debian package names (policy 5.6.7), optionally with an `=version`.
fn is_package_name(p: &str) -> bool {
    let name = p.split_once('=').map_or(p, |(n, _)| n);
    name.len() >= 2
        && name.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b))
}
