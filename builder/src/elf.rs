//! Which CPU an executable is for, from its ELF header, so a kilnd built for the wrong
//! architecture is refused before it lands in an image.

use std::io::Read;
use std::path::Path;

use kiln_spec::raw::Arch;

const EM_X86_64: u16 = 0x3e;
const EM_AARCH64: u16 = 0xb7;

#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("reading {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a 64-bit little-endian ELF executable")]
    NotElf { path: String },
    #[error(
        "{path} is built for {found}, but the board runs {wanted}: build kilnd for {wanted} (e.g. `cargo build --release --target {target} -p kiln-supervisor`) and pass it with --kilnd"
    )]
    WrongArch { path: String, found: String, wanted: &'static str, target: &'static str },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error(
        "{path} needs {}, which the image's root does not have (looked in {}): add the package that provides {} to the base (base.debian.packages) or build kilnd without {}",
        missing.join(", "), dirs.join(", "), if missing.len() == 1 { "it" } else { "them" }, if missing.len() == 1 { "it" } else { "them" }
    )]
    MissingLibraries { path: String, missing: Vec<String>, dirs: Vec<String> },
}

/// The shared libraries an executable names (DT_NEEDED).
pub fn needed_libraries(path: &Path) -> Result<Vec<String>, ElfError> {
    let shown = path.display().to_string();
    // Read, not mapped (mapping is unsafe code): kilnd is well under a GiB.
    let bytes = std::fs::read(path).map_err(|source| ElfError::Io { path: shown.clone(), source })?;
    let elf = goblin::elf::Elf::parse(&bytes).map_err(|e| ElfError::Parse { path: shown, message: e.to_string() })?;
    Ok(elf.libraries.iter().map(|s| (*s).to_owned()).collect())
}

/// Where the dynamic loader finds libraries in a Debian or Raspberry Pi OS root.
pub fn library_dirs(arch: Arch) -> Vec<String> {
    let triple = match arch {
        Arch::Amd64 => "x86_64-linux-gnu",
        Arch::Arm64 => "aarch64-linux-gnu",
    };
    vec![format!("/lib/{triple}"), format!("/usr/lib/{triple}"), "/lib".into(), "/usr/lib".into(), "/lib64".into()]
}

fn name(machine: u16) -> String {
    match machine {
        EM_X86_64 => "x86_64".into(),
        EM_AARCH64 => "aarch64".into(),
        0x28 => "32-bit ARM".into(),
        0x03 => "i386".into(),
        0xf3 => "RISC-V".into(),
        other => format!("ELF machine {other:#x}"),
    }
}

/// Checks that `path` is an ELF executable for `arch`.
pub fn check(path: &Path, arch: Arch) -> Result<(), ElfError> {
    let shown = path.display().to_string();
    let mut header = [0u8; 20];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut header))
        .map_err(|source| ElfError::Io { path: shown.clone(), source })?;
    if &header[..4] != b"\x7fELF" || header[4] != 2 || header[5] != 1 {
        return Err(ElfError::NotElf { path: shown });
    }
    let machine = u16::from_le_bytes([header[18], header[19]]);
    let (wanted_machine, wanted, target) = match arch {
        Arch::Amd64 => (EM_X86_64, "x86_64", "x86_64-unknown-linux-gnu"),
        Arch::Arm64 => (EM_AARCH64, "aarch64", "aarch64-unknown-linux-gnu"),
    };
    if machine != wanted_machine {
        return Err(ElfError::WrongArch { path: shown, found: name(machine), wanted, target });
    }
    Ok(())
}
