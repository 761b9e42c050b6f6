//! The validated spec. Only `validate` builds these; every quantity is parsed, every default
//! filled, units are in field names.

use std::path::PathBuf;

use crate::board::Profile;
use crate::raw::{Arch, EvictionPolicy, LogLevel, Storage, ZramAlgorithm};
use crate::units::Window;

#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub name: String,
    pub hardware: Hardware,
    pub base: Base,
    pub system: System,
    pub memory: Memory,
    pub cgroups: Cgroups,
    pub models: Vec<Model>,
    pub cache: Cache,
    pub supervisor: Supervisor,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Hardware {
    pub profile: Profile,
    pub ram_bytes: u64,
    pub storage: Storage,
    /// Some only where the board has an external PCIe link.
    pub pcie_gen: Option<u8>,
    pub arm_freq_mhz: Option<u32>,
    pub over_voltage_delta_uv: Option<i64>,
    pub force_turbo: bool,
    pub fan: Vec<FanLevel>,
    pub temp_limit_c: Option<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FanLevel {
    pub temp_millic: u32,
    pub hysteresis_millic: u32,
    pub speed: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Base {
    /// An existing Raspberry Pi OS image.
    Image {
        path: PathBuf,
        sha256: String,
    },
    Debian {
        suite: String,
        arch: Arch,
        mirror: String,
        packages: Vec<String>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct System {
    pub hostname: String,
    pub timezone: String,
    pub locale: String,
    pub users: Vec<User>,
    pub ssh_enable: bool,
    pub ssh_password_authentication: bool,
    pub wifi: Option<Wifi>,
    pub packages: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct User {
    pub name: String,
    pub ssh_authorized_keys: Vec<String>,
    pub password_hash: Option<String>,
    pub sudo: bool,
    pub groups: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Wifi {
    pub ssid: String,
    pub country: String,
    /// Where the passphrase came from, for the normalized spec (never the passphrase itself).
    pub psk_source: PskSource,
    /// The passphrase, read at validation time; lands only in the 0600 NetworkManager file.
    pub psk: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum PskSource {
    File(PathBuf),
    Env(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Memory {
    pub zram: Option<Zram>,
    pub swappiness: u32,
    pub vfs_cache_pressure: u32,
    pub page_cluster: u32,
    pub tmpfs: Option<Tmpfs>,
    pub malloc_arena_max: u32,
    pub disk_swap: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Zram {
    pub size_bytes: u64,
    pub algorithm: ZramAlgorithm,
    pub priority: i32,
}

impl ZramAlgorithm {
    pub fn as_kernel_str(self) -> &'static str {
        match self {
            ZramAlgorithm::Lz4 => "lz4",
            ZramAlgorithm::Lz4hc => "lz4hc",
            ZramAlgorithm::Zstd => "zstd",
            ZramAlgorithm::LzoRle => "lzo-rle",
            ZramAlgorithm::Lzo => "lzo",
        }
    }
    /// A planning compression ratio for typical anonymous memory (conservative ends of
    /// published zram measurements): RAM a full device takes = size / ratio.
    pub fn planning_ratio(self) -> f64 {
        match self {
            ZramAlgorithm::Zstd => 3.0,
            ZramAlgorithm::Lz4hc => 2.5,
            ZramAlgorithm::Lz4 | ZramAlgorithm::LzoRle | ZramAlgorithm::Lzo => 2.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Tmpfs {
    pub path: String,
    pub size_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Limits {
    pub memory_max_bytes: Option<u64>,
    pub memory_high_bytes: Option<u64>,
    pub swap_max_bytes: Option<u64>,
    pub cpus: Option<Vec<u32>>,
    pub cpu_weight: Option<u32>,
    pub cpu_quota_percent: Option<u32>,
    pub io_weight: Option<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Cgroups {
    pub inference: Limits,
    pub kilnd: Limits,
    pub prewarm: Limits,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// A host file, baked into the image's store.
    Path(PathBuf),
    Url(String),
    /// Already in the device's store (a normalized spec on the device).
    Store,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    pub id: String,
    pub source: ModelSource,
    pub sha256: String,
    pub size_bytes: u64,
    /// f16 K+V bytes for `context` x `parallel` tokens, when the GGUF header was readable.
    pub kv_bytes: Option<u64>,
    /// Weights llama.cpp repacks into anonymous memory on the board's CPU (so held twice),
    /// when the GGUF header was readable.
    pub repacked_bytes: Option<u64>,
    pub context: u32,
    pub threads: u32,
    pub batch: u32,
    /// Generations decoded together (continuous batching); each has `context` tokens.
    pub parallel: u32,
    pub pin: bool,
    pub priority: i32,
    pub chat_template: Option<String>,
    pub sampling: crate::raw::Sampling,
}

impl Model {
    /// Where the model lives in the device's content-addressed store.
    pub fn store_path(&self) -> String {
        format!("{STORE_DIR}/{}.gguf", self.sha256)
    }
    /// Where kilnd's store keeps the model's check digest (its BLAKE3, one hex line).
    pub fn check_path(&self) -> String {
        format!("{STORE_DIR}/{}.b3", self.sha256)
    }
    /// Weights + KV + repacked weights + compute buffers: what loading it may take.
    pub fn footprint_bytes(&self) -> u64 {
        self.size_bytes
            + self.kv_bytes.unwrap_or(0)
            + self.repacked_bytes.unwrap_or(0)
            + compute_buffer_bytes(self.batch)
    }

    /// Fills in what the GGUF header tells (KV and repacked bytes) where the spec could not:
    /// on the device the normalized spec names models by hash, and kilnd reads the store's copy.
    pub fn complete_from(&mut self, header: &crate::gguf::GgufInfo, repack: crate::gguf::Repack) {
        if self.kv_bytes.is_none() {
            self.kv_bytes = header.kv_cache_bytes(u64::from(self.context) * u64::from(self.parallel.max(1)));
        }
        if self.repacked_bytes.is_none() {
            self.repacked_bytes = Some(header.repacked_bytes(repack));
        }
    }
}

/// llama.cpp's CPU compute buffer grows with the batch; 64 KiB per batch token plus 32 MiB is
/// a conservative estimate for small models (measured figures are in docs/benchmarks.md).
pub fn compute_buffer_bytes(batch: u32) -> u64 {
    32 * crate::units::MIB + u64::from(batch) * 64 * crate::units::KIB
}

pub const STORE_DIR: &str = "/var/lib/kiln/models";

#[derive(Debug, Clone, PartialEq)]
pub struct Cache {
    pub hot_budget_bytes: u64,
    pub eviction: EvictionPolicy,
    pub keep_alive_secs: u64,
    pub warn_percent: f64,
    pub evict_percent: f64,
    pub emergency_percent: f64,
    pub psi_percent: f64,
    pub prewarm: Prewarm,
    pub responses: ResponseCache,
    pub prefix: PrefixCache,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Prewarm {
    pub windows: Vec<Window>,
    pub models: Vec<String>,
    pub rate_bytes_per_sec: Option<u64>,
    pub at_boot: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ResponseCache {
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    pub ttl_secs: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PrefixCache {
    pub dir: String,
    pub size_bytes: u64,
    pub ttl_secs: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Supervisor {
    pub listen: std::net::SocketAddr,
    pub api_token_file: Option<PathBuf>,
    pub queue_depth: u32,
    pub body_limit_bytes: u64,
    pub prompt_tokens_limit: Option<u32>,
    pub max_tokens_limit: u32,
    pub log_level: LogLevel,
    /// Time a new generation has to become healthy before the device rolls back.
    pub health_timeout_secs: u64,
    /// Generations kept on the device, the active one included.
    pub keep_generations: u32,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}
