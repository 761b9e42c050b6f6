//! `kiln build`: spec -> image. Steps (each timed in the report): check and render, take the
//! base from the cache (or prepare it), copy its root filesystem and grow it, add accounts,
//! the generation, kilnd and the models with debugfs, write the boot partition, assemble the
//! partitions into an image, then the block map and checksum. Everything is written in a work
//! directory beside the outputs and renamed into place at the end.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use kiln_spec::model::{Base, ModelSource};
use kiln_spec::raw::Arch;
use kiln_spec::render::{self, Kind, Manifest};
use kiln_spec::validate::{Context, Loaded, load_file};
use sha2::{Digest, Sha256};

use crate::base::{self, Boot, Cache, Prepared};
use crate::image::apply::{self, Item, What};
use crate::image::users::Accounts;
use crate::image::{bmap, boot, ext4, fat, partition, sparse};
use crate::{elf, models, plan};

/// Default timestamp when SOURCE_DATE_EPOCH is unset: 1980-01-01, the earliest FAT can hold.
pub const DEFAULT_EPOCH: i64 = 315_532_800;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Zstd,
    Xz,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub spec: PathBuf,
    pub out: PathBuf,
    pub kilnd: Option<PathBuf>,
    pub compress: Option<Compression>,
    pub epoch: i64,
    pub cache: Cache,
}

/// How the build reports progress: long steps report bytes, every step a line.
pub trait Ui {
    fn step(&self, name: &str);
    fn progress(&self, what: &str, done: u64, total: u64);
}

#[derive(Debug, Clone)]
pub struct Step {
    pub name: String,
    pub seconds: f64,
    pub note: String,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub name: String,
    pub generation: String,
    pub image: PathBuf,
    pub outputs: Vec<PathBuf>,
    /// (label, start, size) in bytes.
    pub partitions: Vec<(String, u64, u64)>,
    pub base_key: String,
    pub base_from_cache: bool,
    pub image_bytes: u64,
    pub mapped_bytes: u64,
    pub sha256: String,
    pub steps: Vec<Step>,
}

struct Timer<'a> {
    ui: &'a dyn Ui,
    steps: Vec<Step>,
    started: Instant,
    current: Option<String>,
}

impl Timer<'_> {
    fn start(&mut self, name: &str) {
        self.finish("");
        self.ui.step(name);
        self.current = Some(name.to_string());
        self.started = Instant::now();
    }
    fn finish(&mut self, note: &str) {
        if let Some(name) = self.current.take() {
            self.steps.push(Step { name, seconds: self.started.elapsed().as_secs_f64(), note: note.to_string() });
        }
    }
}

/// The epoch for reproducible builds: SOURCE_DATE_EPOCH, else [`DEFAULT_EPOCH`].
pub fn epoch_from_env() -> Result<i64> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) => v.trim().parse::<i64>().with_context(|| format!("SOURCE_DATE_EPOCH=`{v}` is not a number of seconds")),
        Err(_) => Ok(DEFAULT_EPOCH),
    }
}

pub fn build(opts: &Options, ui: &dyn Ui) -> Result<Report> {
    let mut t = Timer { ui, steps: Vec::new(), started: Instant::now(), current: None };
    t.start("check and render the spec");
    let loaded = load_file(&opts.spec, Context::Host).map_err(|d| anyhow::anyhow!("{d}"))?;
    let manifest = render::render(&loaded).context("rendering the generation")?;
    let spec = &loaded.spec;
    let arch = spec.hardware.profile.arch;
    let kilnd = opts.kilnd.clone().unwrap_or_else(default_kilnd);
    elf::check(&kilnd, arch)?;
    t.finish(&format!("generation {}", &manifest.generation[..16]));

    std::fs::create_dir_all(&opts.out).with_context(|| format!("creating {}", opts.out.display()))?;
    let work = opts.out.join(format!(".kiln-build-{}-{}", spec.name, std::process::id()));
    if work.exists() {
        std::fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    }
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let result = build_in(opts, &loaded, &manifest, &kilnd, &work, &mut t);
    let _ = std::fs::remove_dir_all(&work);
    let mut report = result?;
    t.finish("");
    report.steps = t.steps;
    Ok(report)
}

/// Refuses a kilnd whose shared libraries the root lacks: it would fail at boot with
/// "error while loading shared libraries" instead.
fn check_libraries(kilnd: &Path, root: &Path, arch: Arch) -> Result<()> {
    let needed = elf::needed_libraries(kilnd)?;
    let dirs = elf::library_dirs(arch);
    let listing = ext4::list_dirs(root, &dirs).context("listing the root's library directories")?;
    let present: std::collections::HashSet<&str> =
        listing.values().flatten().flat_map(|entries| entries.iter().map(|e| e.name.as_str())).collect();
    let missing: Vec<String> = needed.into_iter().filter(|lib| !present.contains(lib.as_str())).collect();
    if !missing.is_empty() {
        return Err(elf::ElfError::MissingLibraries { path: kilnd.display().to_string(), missing, dirs }.into());
    }
    Ok(())
}

fn default_kilnd() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("kilnd")))
        .unwrap_or_else(|| PathBuf::from("kilnd"))
}

fn build_in(
    opts: &Options,
    loaded: &Loaded,
    manifest: &Manifest,
    kilnd: &Path,
    work: &Path,
    t: &mut Timer<'_>,
) -> Result<Report> {
    let spec = &loaded.spec;
    let progress = |what: &str, done: u64, total: u64| t.ui.progress(what, done, total);

    t.start("models into the verified cache");
    let mut model_files: Vec<(String, PathBuf, u64)> = Vec::new();
    let mut cached_models = 0;
    for m in &spec.models {
        if let ModelSource::Path(src) = &m.source {
            let cached = models::cached(&m.id, src, &m.sha256, &opts.cache.models_dir(), &progress)?;
            cached_models += usize::from(cached.hit);
            model_files.push((m.store_path(), cached.path, m.size_bytes));
            model_files.push((m.check_path(), cached.check, 0));
        }
    }
    t.finish(&format!("{} baked in, {cached_models} already cached", model_files.len() / 2));

    t.start("base");
    let prepared = prepare_base(spec, manifest, &opts.cache, &progress, t.ui)?;
    t.finish(if prepared.from_cache { "from cache" } else { "prepared and cached" });

    t.start("copy and grow the root filesystem");
    let root = work.join("root.ext4");
    sparse_copy(&prepared.root_ext4(), &root)?;
    check_libraries(kilnd, &root, spec.hardware.profile.arch)?;
    let (block, blocks) = ext4::geometry(&root)?;
    let kilnd_bytes = std::fs::metadata(kilnd).with_context(|| format!("reading {}", kilnd.display()))?.len();
    let payload: u64 = model_files.iter().map(|m| m.2).sum::<u64>() + kilnd_bytes;
    let root_bytes = plan::root_fs_size(block * blocks, payload);
    ext4::grow(&root, root_bytes, opts.epoch)?;
    t.finish(&format!("{} MiB", root_bytes / plan::MIB));

    let table = match &prepared.info.boot {
        Boot::Rpi { table, boot_index, root_index } => {
            plan::rpi_table(&spec.name, table, *boot_index, *root_index, root_bytes)
        }
        Boot::Efi { .. } => plan::efi_table(&spec.name, spec.hardware.profile.arch == Arch::Arm64, root_bytes),
    };

    t.start("accounts, generation, kilnd and models into the root");
    let staged = work.join("files");
    std::fs::create_dir_all(&staged).with_context(|| format!("creating {}", staged.display()))?;
    let items = root_items(manifest, &prepared, &table, &root, kilnd, &model_files, &staged, opts.epoch)?;
    apply::apply(&root, &items, opts.epoch).context("writing into the root filesystem")?;
    ext4::check(&root).context("checking the root filesystem after kiln's edits")?;
    t.finish(&format!("{} paths", items.len()));

    t.start("boot partition");
    let boot_file = work.join("boot.vfat");
    match &prepared.info.boot {
        Boot::Rpi { .. } => rpi_boot(&prepared, manifest, &table, &boot_file, work, opts.epoch)?,
        Boot::Efi { loader, .. } => {
            efi_boot(&prepared, loader, manifest, &table, &boot_file, work, opts.epoch, spec.hardware.profile.arch)?
        }
    }
    t.finish("");

    t.start("assemble the image");
    let name = format!("{}.img", spec.name);
    let image = work.join(&name);
    assemble(&image, &table, &boot_file, &root)?;
    t.finish(&format!("{} MiB", table.image_size_bytes() / plan::MIB));

    t.start("block map and checksum");
    // Two hashes of the same image (the block map's per range, the checksum's over every byte,
    // holes included) on two cores at once: each reads the image from the page cache.
    let bmap_path = work.join(format!("{name}.bmap"));
    let (map, sha256) = std::thread::scope(|scope| {
        let map = scope.spawn(|| bmap::write(&image, &bmap_path));
        let sha256 = file_sha256(&image, &progress);
        (map.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)), sha256)
    });
    let map = map.context("writing the block map")?;
    let sha256 = sha256?;
    let mut sums = format!("{sha256}  {name}\n");
    let mut outputs = vec![format!("{name}.bmap")];
    if let Some(c) = opts.compress {
        let ext = match c {
            Compression::Zstd => "zst",
            Compression::Xz => "xz",
        };
        let cname = format!("{name}.{ext}");
        compress(&image, &work.join(&cname), c, &progress)?;
        sums.push_str(&format!("{}  {cname}\n", file_sha256(&work.join(&cname), &progress)?));
        outputs.push(cname);
    }
    std::fs::write(work.join(format!("{name}.sha256")), &sums).context("writing the checksum")?;
    outputs.push(format!("{name}.sha256"));
    t.finish("");

    // Publish: no finished-looking image until everything else is in place.
    let final_image = opts.out.join(&name);
    if final_image.exists() {
        std::fs::remove_file(&final_image).with_context(|| format!("removing the old {}", final_image.display()))?;
    }
    let mut published = Vec::new();
    for o in outputs.iter().chain(std::iter::once(&name)) {
        let to = opts.out.join(o);
        std::fs::rename(work.join(o), &to).with_context(|| format!("moving {o} into {}", opts.out.display()))?;
        published.push(to);
    }
    let labels = match table.kind {
        partition::Kind::Mbr => ["bootfs", "rootfs"],
        partition::Kind::Gpt => ["esp", "root"],
    };
    Ok(Report {
        name: spec.name.clone(),
        generation: manifest.generation.clone(),
        image: final_image,
        outputs: published,
        partitions: table.parts.iter().zip(labels).map(|(p, l)| (l.to_string(), p.start_bytes, p.size_bytes)).collect(),
        base_key: prepared.info.key.clone(),
        base_from_cache: prepared.from_cache,
        image_bytes: map.image_size,
        mapped_bytes: map.ranges.iter().map(|r| (r.last_block - r.first_block + 1) * map.block_size).sum(),
        sha256,
        steps: Vec::new(),
    })
}

fn prepare_base(
    spec: &kiln_spec::Spec,
    manifest: &Manifest,
    cache: &Cache,
    progress: &dyn Fn(&str, u64, u64),
    ui: &dyn Ui,
) -> Result<Prepared> {
    match &spec.base {
        Base::Image { path, sha256 } => {
            if !path.is_file() && !cache.base_dir(&format!("rpi-{}", &sha256[..32])).join("base.json").is_file() {
                bail!(
                    "base image {} is not there and not cached; download it (see examples/images/README.md)",
                    path.display()
                );
            }
            Ok(base::rpi::prepare(path, sha256, cache, progress)?)
        }
        Base::Debian { suite, arch, mirror, packages } => {
            let arch = match arch {
                Arch::Amd64 => "amd64",
                Arch::Arm64 => "arm64",
            };
            let listed = manifest
                .get("/etc/kiln/packages.list")
                .map(|e| String::from_utf8_lossy(&e.content).into_owned())
                .unwrap_or_default();
            let mut extra: Vec<String> = listed.lines().map(String::from).collect();
            extra.extend(packages.iter().cloned());
            let recipe = base::debian::Recipe::new(suite, arch, mirror, &extra);
            Ok(base::debian::prepare(&recipe, cache, &|msg| ui.step(msg))?)
        }
    }
}

fn sparse_copy(from: &Path, to: &Path) -> Result<()> {
    let src = File::open(from).with_context(|| format!("opening {}", from.display()))?;
    let len = src.metadata().with_context(|| format!("reading {}", from.display()))?.len();
    let dst = File::create(to).with_context(|| format!("creating {}", to.display()))?;
    dst.set_len(len).with_context(|| format!("sizing {}", to.display()))?;
    sparse::copy_ranges(&src, 0, &dst, 0, len)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}

/// Stages `content` as a host file for debugfs to write.
fn stage(staged: &Path, n: &mut usize, content: &[u8]) -> Result<PathBuf> {
    *n += 1;
    let p = staged.join(format!("{n:05}"));
    std::fs::write(&p, content).with_context(|| format!("staging {}", p.display()))?;
    Ok(p)
}

#[allow(clippy::too_many_arguments)]
fn root_items(
    manifest: &Manifest,
    prepared: &Prepared,
    table: &partition::Table,
    root: &Path,
    kilnd: &Path,
    model_files: &[(String, PathBuf, u64)],
    staged: &Path,
    epoch: i64,
) -> Result<Vec<Item>> {
    let days = epoch / 86_400;
    let read = |p: &str| -> Result<String> {
        Ok(String::from_utf8_lossy(&ext4::read_file(root, p)?.unwrap_or_default()).into_owned())
    };
    let mut accounts =
        Accounts::parse(&read("/etc/passwd")?, &read("/etc/group")?, &read("/etc/shadow")?, &read("/etc/gshadow")?);
    for e in &manifest.entries {
        if e.path.starts_with("/etc/sysusers.d/") {
            accounts.apply_sysusers(&String::from_utf8_lossy(&e.content), days);
        }
    }
    if let Some(pw) = manifest.get("/etc/kiln/secrets/passwords") {
        for line in String::from_utf8_lossy(&pw.content).lines() {
            if let Some((user, hash)) = line.split_once(':') {
                accounts.set_password(user, hash);
            }
        }
    }
    let mut n = 0;
    let mut items = Vec::new();
    for (path, text) in accounts.texts() {
        items.push(Item {
            path: path.into(),
            what: What::File(stage(staged, &mut n, text.as_bytes())?),
            mode: None,
            owner: None,
        });
    }
    let owner =
        |o: &str| accounts.resolve(o).ok_or_else(|| anyhow::anyhow!("owner `{o}` is not a user:group the image knows"));
    for e in &manifest.entries {
        if e.path.starts_with("/boot/firmware/") {
            continue; // the FAT boot partition's
        }
        let what = match &e.kind {
            Kind::Dir => What::Dir,
            Kind::Symlink { target } => What::Symlink(target.clone()),
            Kind::File | Kind::Args | Kind::Block => What::File(stage(staged, &mut n, &e.content)?),
        };
        items.push(Item { path: e.path.clone(), what, mode: Some(e.mode), owner: Some(owner(&e.owner)?) });
    }
    let manifest_json = serde_json::to_string_pretty(manifest).context("serializing the manifest")?;
    items.push(Item {
        path: "/etc/kiln/manifest.json".into(),
        what: What::File(stage(staged, &mut n, manifest_json.as_bytes())?),
        mode: Some(0o644),
        owner: Some((0, 0)),
    });
    // Generation 1, as `kiln deploy` will find it: the rendered files and the manifest under
    // /var/lib/kiln/generations/1 (readable, so kilnd knows its generation; secrets keep their
    // 0600 root modes), `current` pointing at it.
    const GENERATIONS: &str = "/var/lib/kiln/generations";
    items.push(Item { path: GENERATIONS.into(), what: What::Dir, mode: Some(0o755), owner: Some((0, 0)) });
    items.push(Item { path: format!("{GENERATIONS}/1"), what: What::Dir, mode: Some(0o755), owner: Some((0, 0)) });
    for e in &manifest.entries {
        let what = match &e.kind {
            Kind::Dir => What::Dir,
            Kind::Symlink { target } => What::Symlink(target.clone()),
            Kind::File | Kind::Args | Kind::Block => What::File(stage(staged, &mut n, &e.content)?),
        };
        items.push(Item { path: format!("{GENERATIONS}/1{}", e.path), what, mode: Some(e.mode), owner: Some((0, 0)) });
    }
    items.push(Item {
        path: format!("{GENERATIONS}/1/etc/kiln/manifest.json"),
        what: What::File(stage(staged, &mut n, format!("{manifest_json}\n").as_bytes())?),
        mode: Some(0o644),
        owner: Some((0, 0)),
    });
    let meta = serde_json::json!({ "state": "good", "received_at": epoch, "activated_at": epoch });
    items.push(Item {
        path: format!("{GENERATIONS}/1.json"),
        what: What::File(stage(staged, &mut n, meta.to_string().as_bytes())?),
        mode: Some(0o644),
        owner: Some((0, 0)),
    });
    items.push(Item {
        path: format!("{GENERATIONS}/current"),
        what: What::Symlink("1".into()),
        mode: None,
        owner: Some((0, 0)),
    });
    let fstab = match &prepared.info.boot {
        Boot::Rpi { table: old, .. } => boot::retarget_fstab(
            &read("/etc/fstab")?,
            old.id.trim_start_matches("0x"),
            table.id.trim_start_matches("0x"),
        ),
        Boot::Efi { .. } => format!(
            "# Managed by kiln.\nPARTUUID={}\t/\text4\tdefaults,noatime\t0\t1\nPARTUUID={}\t/boot/efi\tvfat\tumask=0077\t0\t2\n",
            table.partuuid(2).unwrap_or_default(),
            table.partuuid(1).unwrap_or_default()
        ),
    };
    items.push(Item {
        path: "/etc/fstab".into(),
        what: What::File(stage(staged, &mut n, fstab.as_bytes())?),
        mode: None,
        owner: None,
    });
    if matches!(prepared.info.boot, Boot::Efi { .. }) {
        items.push(Item { path: "/boot/efi".into(), what: What::Dir, mode: Some(0o700), owner: Some((0, 0)) });
    }
    items.push(Item {
        path: "/usr/bin/kilnd".into(),
        what: What::File(kilnd.to_path_buf()),
        mode: Some(0o755),
        owner: Some((0, 0)),
    });
    let kiln_ids = owner("kiln:kiln")?;
    for (store_path, file, _) in model_files {
        items.push(Item {
            path: store_path.clone(),
            what: What::File(file.clone()),
            mode: Some(0o640),
            owner: Some(kiln_ids),
        });
    }
    Ok(items)
}

/// Host files with the build's timestamp, for mtools to copy with `-m`.
fn write_stamped(path: &Path, content: &[u8], epoch: i64) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, content).with_context(|| format!("writing {}", path.display()))?;
    set_mtime(path, epoch)
}

fn set_mtime(path: &Path, epoch: i64) -> Result<()> {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(epoch.max(0) as u64);
    let f = File::options()
        .write(!path.is_dir())
        .read(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    f.set_times(std::fs::FileTimes::new().set_accessed(t).set_modified(t))
        .with_context(|| format!("stamping {}", path.display()))?;
    Ok(())
}

fn rpi_boot(
    prepared: &Prepared,
    manifest: &Manifest,
    table: &partition::Table,
    out: &Path,
    work: &Path,
    epoch: i64,
) -> Result<()> {
    sparse_copy(&prepared.boot_vfat(), out)?;
    let dir = work.join("boot-files");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let text = |name: &str| -> Result<String> {
        Ok(String::from_utf8_lossy(&fat::read_file(out, name)?.unwrap_or_default()).into_owned())
    };
    if let Some(block) = manifest.get("/boot/firmware/config.txt") {
        let merged = boot::merge_config_txt(&text("config.txt")?, &String::from_utf8_lossy(&block.content));
        write_stamped(&dir.join("config.txt"), merged.as_bytes(), epoch)?;
    }
    let args_entry = manifest
        .get("/boot/firmware/cmdline.txt")
        .map(|e| String::from_utf8_lossy(&e.content).into_owned())
        .unwrap_or_default();
    let args: Vec<&str> = args_entry.split_whitespace().collect();
    let root_uuid = table.partuuid(2).context("the image has no root partition")?;
    let base_cmdline = text("cmdline.txt")?;
    if base_cmdline.trim().is_empty() {
        bail!("the base image's boot partition has no cmdline.txt; is it a Raspberry Pi OS image?");
    }
    write_stamped(&dir.join("cmdline.txt"), boot::merge_cmdline(&base_cmdline, &args, &root_uuid).as_bytes(), epoch)?;
    fat::copy_tree(out, &dir)?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn efi_boot(
    prepared: &Prepared,
    loader: &str,
    manifest: &Manifest,
    table: &partition::Table,
    out: &Path,
    work: &Path,
    epoch: i64,
    arch: Arch,
) -> Result<()> {
    let size = table.parts[0].size_bytes;
    fat::mkfs(out, size, "ESP")?;
    let tree = work.join("esp-tree");
    let esp = prepared.esp_dir();
    let copy = |from: &Path, to: &Path| -> Result<()> {
        let bytes = std::fs::read(from).with_context(|| format!("reading {}", from.display()))?;
        write_stamped(to, &bytes, epoch)
    };
    let boot_name = if arch == Arch::Arm64 { "BOOTAA64.EFI" } else { "BOOTX64.EFI" };
    copy(&esp.join(loader), &tree.join("EFI/BOOT").join(boot_name))?;
    copy(&esp.join("vmlinuz"), &tree.join("vmlinuz"))?;
    copy(&esp.join("initrd.img"), &tree.join("initrd.img"))?;
    let args = manifest
        .get("/etc/kernel/cmdline")
        .map(|e| String::from_utf8_lossy(&e.content).trim().to_string())
        .unwrap_or_default();
    let root = table.partuuid(2).context("the image has no root partition")?;
    let console = if arch == Arch::Arm64 { "console=ttyAMA0,115200" } else { "console=ttyS0,115200" };
    let entry = format!(
        "title kiln {}\nlinux /vmlinuz\ninitrd /initrd.img\noptions root=PARTUUID={root} ro rootwait {console} {args}\n",
        manifest.name
    );
    write_stamped(&tree.join("loader/entries/kiln.conf"), entry.as_bytes(), epoch)?;
    write_stamped(&tree.join("loader/loader.conf"), b"default kiln.conf\ntimeout 0\n", epoch)?;
    for d in ["EFI/BOOT", "EFI", "loader/entries", "loader"] {
        set_mtime(&tree.join(d), epoch)?;
    }
    fat::copy_tree(out, &tree)?;
    Ok(())
}

fn assemble(image: &Path, table: &partition::Table, boot: &Path, root: &Path) -> Result<()> {
    let f = File::create(image).with_context(|| format!("creating {}", image.display()))?;
    f.set_len(table.image_size_bytes()).with_context(|| format!("sizing {}", image.display()))?;
    drop(f);
    partition::write(image, table)?;
    let dst = File::options().write(true).open(image).with_context(|| format!("opening {}", image.display()))?;
    for (file, part) in [(boot, &table.parts[0]), (root, &table.parts[1])] {
        let src = File::open(file).with_context(|| format!("opening {}", file.display()))?;
        let len = src.metadata().with_context(|| format!("reading {}", file.display()))?.len();
        if len > part.size_bytes {
            bail!("{} ({} bytes) does not fit its partition ({} bytes)", file.display(), len, part.size_bytes);
        }
        sparse::copy_ranges(&src, 0, &dst, part.start_bytes, len)
            .with_context(|| format!("copying {} into the image", file.display()))?;
    }
    dst.sync_all().with_context(|| format!("syncing {}", image.display()))?;
    Ok(())
}

/// The sha256 of every byte of `path`, holes included. The data is read (a reader and a hashing
/// thread, `bmap::hash_file_range`); a hole is hashed as the zeros it reads as without reading
/// it: reading a hole makes the kernel zero a page-cache page for every 4 KiB of it, which was
/// a third of this step's time for the demo image (800 of its 1410 MiB are holes).
fn file_sha256(path: &Path, progress: &dyn Fn(&str, u64, u64)) -> Result<String> {
    const PIECE: u64 = 64 << 20;
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let total = f.metadata().with_context(|| format!("reading metadata of {}", path.display()))?.len();
    let ranges = sparse::data_ranges(&f).with_context(|| format!("finding the data in {}", path.display()))?;
    let zeros = vec![0u8; 1 << 20];
    let mut h = Sha256::new();
    let mut pos = 0;
    for (start, end) in ranges.into_iter().chain(std::iter::once((total, total))) {
        while pos < start {
            let n = usize::try_from(start - pos).unwrap_or(usize::MAX).min(zeros.len());
            h.update(&zeros[..n]);
            pos += n as u64;
            progress("checksum", pos, total);
        }
        while pos < end {
            let to = (pos + PIECE).min(end);
            bmap::hash_file_range(&mut h, &f, pos, to).with_context(|| format!("reading {}", path.display()))?;
            pos = to;
            progress("checksum", pos, total);
        }
    }
    Ok(hex::encode(h.finalize()))
}

fn compress(image: &Path, out: &Path, c: Compression, progress: &dyn Fn(&str, u64, u64)) -> Result<()> {
    use std::io::{Read, Write};
    let mut src = File::open(image).with_context(|| format!("opening {}", image.display()))?;
    let total = src.metadata().map(|m| m.len()).unwrap_or(0);
    let dst = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut w: Box<dyn Write> = match c {
        Compression::Zstd => {
            Box::new(zstd::stream::write::Encoder::new(dst, 10).context("starting zstd")?.auto_finish())
        }
        Compression::Xz => {
            // Multi-threaded xz: single-threaded preset 6 takes minutes for a GiB-sized image.
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
            let stream = xz2::stream::MtStreamBuilder::new()
                .threads(threads)
                .preset(6)
                .check(xz2::stream::Check::Crc64)
                .encoder()
                .context("starting xz")?;
            Box::new(xz2::write::XzEncoder::new_stream(dst, stream))
        }
    };
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0;
    loop {
        let n = src.read(&mut buf).with_context(|| format!("reading {}", image.display()))?;
        if n == 0 {
            break;
        }
        w.write_all(&buf[..n]).with_context(|| format!("writing {}", out.display()))?;
        done += n as u64;
        progress("compressing", done, total);
    }
    w.flush().with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn file_sha256_of_a_sparse_file_is_the_sha256_of_all_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        for (name, size, islands) in [
            ("holes around data", 200u64 << 20, vec![(1u64 << 20, 3u8), (70 << 20, 5), ((200 << 20) - 4096, 9)]),
            ("starts and ends with holes", 9 << 20, vec![(4 << 20, 1)]),
            ("all hole", 3 << 20, vec![]),
            ("empty", 0, vec![]),
        ] {
            let path = dir.path().join(name);
            let f = File::create(&path).unwrap();
            f.set_len(size).unwrap();
            for &(at, byte) in &islands {
                f.write_all_at(&vec![byte; 4096 * 3].into_iter().take((size - at) as usize).collect::<Vec<_>>(), at)
                    .unwrap();
            }
            drop(f);
            let want = hex::encode(Sha256::digest(std::fs::read(&path).unwrap()));
            assert_eq!(file_sha256(&path, &|_, _, _| {}).unwrap(), want, "{name}");
        }
    }
}
