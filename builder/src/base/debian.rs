//! A Debian root filesystem as a base, built with mmdebstrap (root mode as root, unshare mode
//! otherwise: rootless) and turned into ext4 with `mke2fs -d` inside mmdebstrap's hook, where
//! the files still have their real owners. arm64 on an x86 host runs through qemu-user binfmt.

use std::path::Path;

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::{BaseError, BaseInfo, Boot, CACHE_FORMAT, Cache, Prepared, io, load_cached, publish, staging_for};
use crate::tools;

/// What the image needs beyond minbase, for kilnd and the generic boards' boot.
const BASE_PACKAGES: [&str; 8] =
    ["systemd", "systemd-sysv", "udev", "dbus", "systemd-zram-generator", "systemd-boot-efi", "kmod", "iproute2"];

#[derive(Debug, Clone, Serialize)]
pub struct Recipe {
    pub suite: String,
    /// Debian architecture name: amd64 or arm64.
    pub arch: String,
    pub mirror: String,
    /// Every package beyond minbase, sorted.
    pub packages: Vec<String>,
    pub format: &'static str,
}

impl Recipe {
    pub fn new(suite: &str, arch: &str, mirror: &str, extra: &[String]) -> Recipe {
        let kernel = if arch == "amd64" { "linux-image-cloud-amd64" } else { "linux-image-arm64" };
        let mut packages: Vec<String> = BASE_PACKAGES.iter().map(|s| s.to_string()).collect();
        packages.push(kernel.into());
        packages.extend(extra.iter().filter(|p| !p.is_empty()).cloned());
        packages.sort();
        packages.dedup();
        Recipe { suite: suite.into(), arch: arch.into(), mirror: mirror.into(), packages, format: CACHE_FORMAT }
    }
    /// The cache key: a hash of everything that goes into the base.
    pub fn key(&self) -> String {
        let json = serde_json::to_string(self).unwrap_or_default();
        format!("debian-{}-{}", self.arch, &hex::encode(Sha256::digest(json.as_bytes()))[..24])
    }
}

/// The hook that turns the finished chroot into root.ext4 and collects the EFI boot files.
/// `$1` is the chroot; OUT is the staging directory.
const HOOK: &str = r#"set -eu
root="$1"
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/tmp/* "$root"/etc/hostname
printf 'uninitialized\n' > "$root/etc/machine-id"
mkdir -p "$OUT/esp"
kernel=$(ls "$root"/boot/vmlinuz-* | sort -V | tail -n 1)
initrd=$(ls "$root"/boot/initrd.img-* | sort -V | tail -n 1)
cp "$kernel" "$OUT/esp/vmlinuz"
cp "$initrd" "$OUT/esp/initrd.img"
cp "$root"/usr/lib/systemd/boot/efi/systemd-boot*.efi "$OUT/esp/"
# /proc, /sys and /dev are mounted in the chroot now: copy the tree without them (owners,
# modes, hardlinks and xattrs kept) and make the filesystem from the copy.
tree="$OUT/tree"
mkdir "$tree"
tar -C "$root" --one-file-system --xattrs --xattrs-include='*' -cf - . | tar -C "$tree" --xattrs --xattrs-include='*' -xpf -
used=$(du -sb "$tree" | cut -f1)
align=$((8 * 1024 * 1024))
size=$(( (used + used / 4 + 256 * 1024 * 1024 + align - 1) / align * align ))
E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH mke2fs -q -t ext4 -b 4096 -L rootfs -U "$FS_UUID" -E "hash_seed=$HASH_SEED" -d "$tree" "$OUT/root.ext4" $((size / 1024))k
rm -rf "$tree"
"#;

/// The cached base for a recipe, running mmdebstrap if needed.
pub fn prepare(recipe: &Recipe, cache: &Cache, log: &dyn Fn(&str)) -> Result<Prepared, BaseError> {
    let key = recipe.key();
    let dir = cache.base_dir(&key);
    if let Some(p) = load_cached(&dir)? {
        return Ok(p);
    }
    let staging = staging_for(&dir)?;
    let result = bootstrap(recipe, &staging, log)
        .and_then(|boot| publish(&staging, &dir, BaseInfo { format: CACHE_FORMAT.into(), key: key.clone(), boot }));
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    result
}

fn bootstrap(recipe: &Recipe, staging: &Path, log: &dyn Fn(&str)) -> Result<Boot, BaseError> {
    log(&format!(
        "mmdebstrap {} {} ({} packages beyond minbase); this is cached afterwards",
        recipe.suite,
        recipe.arch,
        recipe.packages.len()
    ));
    let seed = Sha256::digest(recipe.key().as_bytes());
    let uuid = |b: &[u8]| {
        let x = hex::encode(&b[..16]);
        format!("{}-{}-4{}-a{}-{}", &x[0..8], &x[8..12], &x[13..16], &x[17..20], &x[20..32])
    };
    let hook = format!(
        "export OUT='{}' FS_UUID='{}' HASH_SEED='{}' SOURCE_DATE_EPOCH=${{SOURCE_DATE_EPOCH:-315532800}}; {HOOK}",
        staging.display(),
        uuid(&seed[..16]),
        uuid(&seed[16..32])
    );
    let mode = if nix::unistd::geteuid().is_root() { "root" } else { "unshare" };
    let args = vec![
        "--quiet".to_string(),
        format!("--mode={mode}"),
        "--variant=minbase".into(),
        format!("--arch={}", recipe.arch),
        format!("--include={}", recipe.packages.join(",")),
        format!("--customize-hook={hook}"),
        recipe.suite.clone(),
        "/dev/null".into(),
        recipe.mirror.clone(),
    ];
    tools::run_env("mmdebstrap", &args, None, &[("SOURCE_DATE_EPOCH", "315532800")])?;
    let esp = staging.join("esp");
    let loader = std::fs::read_dir(&esp)
        .map_err(io(&esp))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .find(|n| n.starts_with("systemd-boot") && n.ends_with(".efi"))
        .ok_or_else(|| BaseError::Layout {
            path: esp.clone(),
            message: "systemd-boot's EFI binary is missing".into(),
        })?;
    Ok(Boot::Efi { kernel: "vmlinuz".into(), initrd: "initrd.img".into(), loader })
}
