//! Board profiles: the data in `images/boards/*.yaml` (RAM sizes sold, storage, PCIe,
//! clocks, firmware, partition layout), embedded at build time.

use serde::{Deserialize, Serialize};

use crate::raw::{Arch, Board, Storage};
use crate::units::parse_bytes;

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Firmware {
    /// Raspberry Pi firmware: config.txt and cmdline.txt on the FAT partition.
    Raspberrypi,
    /// UEFI (VMs).
    Efi,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Partition {
    #[serde(default)]
    pub start: Option<String>,
    #[serde(default)]
    pub size: Option<String>,
    pub fs: String,
    pub label: String,
    #[serde(default)]
    pub mount: Option<String>,
    #[serde(default)]
    pub ext4_features: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Partitions {
    pub table: String,
    pub boot: Partition,
    pub root: Partition,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Profile {
    pub board: Board,
    pub arch: Arch,
    pub cores: u32,
    /// RAM sizes the board is sold with; empty = any size from `min-ram` (VMs).
    pub ram_sizes: Vec<String>,
    #[serde(default)]
    pub min_ram: Option<String>,
    pub storage: Vec<Storage>,
    pub default_storage: Storage,
    pub pcie_gens: Vec<u8>,
    #[serde(default)]
    pub arm_freq_default_mhz: Option<u32>,
    #[serde(default)]
    pub arm_freq_warn_mhz: Option<u32>,
    #[serde(default)]
    pub arm_freq_max_mhz: Option<u32>,
    pub fan_header: bool,
    pub os_reserve: String,
    /// Which weights llama.cpp repacks on this board's CPU (they then sit in RAM twice).
    pub cpu_repack: crate::gguf::Repack,
    pub firmware: Firmware,
    pub partitions: Partitions,
}

impl Profile {
    pub fn ram_sizes_bytes(&self) -> Vec<u64> {
        self.ram_sizes.iter().filter_map(|s| parse_bytes(s).ok()).collect()
    }
    pub fn os_reserve_bytes(&self) -> u64 {
        parse_bytes(&self.os_reserve).unwrap_or(0)
    }
    pub fn min_ram_bytes(&self) -> u64 {
        self.min_ram.as_deref().and_then(|s| parse_bytes(s).ok()).unwrap_or(0)
    }
    pub fn is_pi(&self) -> bool {
        self.firmware == Firmware::Raspberrypi
    }
}

const PROFILES: [(Board, &str, &str); 4] = [
    (Board::Pi5, "images/boards/pi5.yaml", include_str!("../../images/boards/pi5.yaml")),
    (Board::Pi4, "images/boards/pi4.yaml", include_str!("../../images/boards/pi4.yaml")),
    (
        Board::GenericX86_64,
        "images/boards/generic-x86_64.yaml",
        include_str!("../../images/boards/generic-x86_64.yaml"),
    ),
    (
        Board::GenericAarch64,
        "images/boards/generic-aarch64.yaml",
        include_str!("../../images/boards/generic-aarch64.yaml"),
    ),
];

/// The profile of a board. Errors name the data file: they mean kiln itself is broken.
pub fn profile(board: Board) -> Result<Profile, String> {
    let (_, file, text) =
        PROFILES.iter().find(|(b, _, _)| *b == board).ok_or_else(|| format!("no profile for board {board:?}"))?;
    let profile: Profile = serde_saphyr::from_str(text).map_err(|e| format!("{file}: {e}"))?;
    if profile.board != board {
        return Err(format!("{file}: says board {:?}, expected {board:?}", profile.board));
    }
    Ok(profile)
}
