//! `kiln vm`: boot a built VM image in QEMU with user-mode networking, the guest's kilnd API
//! and SSH forwarded to host ports, the serial console in a log file. It says where to reach
//! the API once the guest's kilnd answers /health, and stays in the foreground until stopped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::image::partition::{self, GPT_ROOT_AARCH64, GPT_ROOT_X86_64};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Tcg,
    Kvm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    X86_64,
    Aarch64,
}

#[derive(Debug, Clone)]
pub struct VmOptions {
    pub image: PathBuf,
    pub api_port: u16,
    pub ssh_port: u16,
    /// The port kilnd listens on inside the guest (the spec's supervisor.listen).
    pub guest_api_port: u16,
    pub accel: Accel,
    pub memory_mib: u32,
    pub cpus: u32,
    pub serial_log: PathBuf,
    /// Discard the guest's writes (the image file stays as built).
    pub snapshot: bool,
    pub ready_timeout: Duration,
}

/// Firmware candidates per architecture (Debian's ovmf and qemu-efi-aarch64 packages).
fn firmware(arch: Arch) -> Result<PathBuf> {
    let candidates: &[&str] = match arch {
        Arch::X86_64 => &["/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/ovmf/OVMF.fd"],
        Arch::Aarch64 => &["/usr/share/AAVMF/AAVMF_CODE.fd", "/usr/share/qemu-efi-aarch64/QEMU_EFI.fd"],
    };
    candidates.iter().map(PathBuf::from).find(|p| p.is_file()).ok_or_else(|| {
        let pkg = if arch == Arch::X86_64 { "ovmf" } else { "qemu-efi-aarch64" };
        anyhow!("no UEFI firmware for {arch:?} (looked at {}); install Debian's {pkg}", candidates.join(", "))
    })
}

/// The image's architecture, from its GPT root partition type.
pub fn image_arch(image: &Path) -> Result<Arch> {
    let table =
        partition::read(image).with_context(|| format!("reading the partition table of {}", image.display()))?;
    for p in &table.parts {
        if p.type_id.eq_ignore_ascii_case(GPT_ROOT_X86_64) {
            return Ok(Arch::X86_64);
        }
        if p.type_id.eq_ignore_ascii_case(GPT_ROOT_AARCH64) {
            return Ok(Arch::Aarch64);
        }
    }
    bail!(
        "{} has no x86_64 or aarch64 GPT root partition: it is not a kiln VM image (Raspberry Pi images boot on the board: `kiln flash` it)",
        image.display()
    )
}

/// The QEMU command line for the image.
pub fn command(o: &VmOptions) -> Result<Command> {
    let arch = image_arch(&o.image)?;
    let fw = firmware(arch)?;
    let (qemu, machine) = match arch {
        Arch::X86_64 => ("qemu-system-x86_64", "q35"),
        Arch::Aarch64 => ("qemu-system-aarch64", "virt"),
    };
    let mut cmd = Command::new(qemu);
    cmd.args(["-machine", machine, "-m", &o.memory_mib.to_string(), "-smp", &o.cpus.to_string()]);
    match (o.accel, arch) {
        (Accel::Kvm, _) => cmd.args(["-accel", "kvm", "-cpu", "host"]),
        // kilnd (llama.cpp) is built for x86-64-v3 and cortex-a76: the emulated CPU needs
        // AVX2/FMA (resp. the A76's features), which `max` has.
        (Accel::Tcg, _) => cmd.args(["-accel", "tcg", "-cpu", "max"]),
    };
    cmd.arg("-drive").arg(format!("if=pflash,format=raw,readonly=on,file={}", fw.display()));
    let mut drive = format!("file={},format=raw,if=virtio", o.image.display());
    if o.snapshot {
        drive.push_str(",snapshot=on");
    }
    cmd.arg("-drive").arg(drive);
    cmd.args(["-netdev"]).arg(format!(
        "user,id=net0,hostfwd=tcp:127.0.0.1:{}-:{},hostfwd=tcp:127.0.0.1:{}-:22",
        o.api_port, o.guest_api_port, o.ssh_port
    ));
    cmd.args(["-device", "virtio-net-pci,netdev=net0", "-device", "virtio-rng-pci"]);
    cmd.args(["-display", "none", "-monitor", "none"]);
    cmd.arg("-serial").arg(format!("file:{}", o.serial_log.display()));
    Ok(cmd)
}

/// A booted VM; killed when dropped.
#[derive(Debug)]
pub struct Vm {
    pub child: Child,
    pub api_url: String,
    pub ssh_url: String,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Boots the image and waits until the guest's kilnd answers /health.
pub fn boot(o: &VmOptions) -> Result<Vm> {
    if !o.image.is_file() {
        bail!("{} does not exist; build it with `kiln build SPEC --out DIR`", o.image.display());
    }
    let qemu = command(o)?;
    // QEMU dies with kiln, however kiln ends (Ctrl-C, kill, kill -9): util-linux's setpriv
    // sets PR_SET_PDEATHSIG before it runs QEMU. Without setpriv, QEMU is only killed when
    // kiln exits normally.
    let program = qemu.get_program().to_string_lossy().into_owned();
    if crate::tools::find(&program).is_err() {
        bail!("{program} is not installed (Debian: qemu-system-x86 for x86_64 images, qemu-system-arm for aarch64)");
    }
    let mut cmd = if crate::tools::find("setpriv").is_ok() {
        let mut c = Command::new("setpriv");
        c.args(["--pdeathsig", "TERM", "--"]).arg(qemu.get_program()).args(qemu.get_args());
        c
    } else {
        qemu
    };
    let _ = std::fs::remove_file(&o.serial_log);
    let child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().with_context(|| {
        format!("starting {:?} (install Debian's qemu-system-x86 / qemu-system-arm)", cmd.get_program())
    })?;
    let mut vm = Vm {
        child,
        api_url: format!("http://127.0.0.1:{}", o.api_port),
        ssh_url: format!("ssh://root@127.0.0.1:{}", o.ssh_port),
    };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(3)))
        .http_status_as_error(false)
        .build()
        .into();
    let started = Instant::now();
    loop {
        if let Some(status) = vm.child.try_wait().context("watching QEMU")? {
            let mut err = String::new();
            if let Some(mut e) = vm.child.stderr.take() {
                use std::io::Read as _;
                let _ = e.read_to_string(&mut err);
            }
            bail!(
                "QEMU exited ({status}) before kilnd was ready: {}\nserial console: {}",
                err.trim(),
                o.serial_log.display()
            );
        }
        if let Ok(r) = agent.get(&format!("{}/health", vm.api_url)).call()
            && r.status() == 200
        {
            return Ok(vm);
        }
        if started.elapsed() > o.ready_timeout {
            let tail = std::fs::read_to_string(&o.serial_log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(30).collect();
            bail!(
                "kilnd in the guest did not answer {}/health within {} s; the serial console ({}) ends with:\n{}",
                vm.api_url,
                o.ready_timeout.as_secs(),
                o.serial_log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}
