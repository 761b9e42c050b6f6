//! The spec exactly as written: serde structs (kebab-case, unknown keys refused). Their doc
//! comments become the JSON Schema's descriptions (`kiln schema`), so editors show them.
//! Quantities stay text here; `validate` parses them and says what is wrong.

use std::borrow::Cow;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize};

/// A number or a quantity with a unit, kept as written: `8GiB`, `30m`, `70%`, `4096`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Quantity(pub String);

impl<'de> Deserialize<'de> for Quantity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Any {
            U(u64),
            I(i64),
            F(f64),
            S(String),
        }
        Ok(Quantity(match Any::deserialize(d)? {
            Any::U(v) => v.to_string(),
            Any::I(v) => v.to_string(),
            Any::F(v) => v.to_string(),
            Any::S(v) => v,
        }))
    }
}

impl JsonSchema for Quantity {
    fn schema_name() -> Cow<'static, str> {
        "Quantity".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({ "type": ["string", "number"] })
    }
    fn inline_schema() -> bool {
        true
    }
}

/// A kiln spec: one device, declared.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawSpec {
    /// Spec format version: `kiln/v1`.
    pub api_version: String,
    /// Device name: lowercase letters, digits and dashes. Names the image and is the default hostname.
    pub name: String,
    pub hardware: Hardware,
    /// What the root filesystem starts from. Defaults to Debian for the generic boards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<Base>,
    #[serde(default)]
    pub system: System,
    #[serde(default)]
    pub memory: Memory,
    #[serde(default)]
    pub cgroups: Cgroups,
    /// GGUF models kilnd serves.
    #[serde(default)]
    pub models: Vec<Model>,
    #[serde(default)]
    pub cache: Cache,
    #[serde(default)]
    pub supervisor: Supervisor,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum Board {
    #[serde(rename = "pi5")]
    Pi5,
    #[serde(rename = "pi4")]
    Pi4,
    #[serde(rename = "generic-x86_64")]
    GenericX86_64,
    #[serde(rename = "generic-aarch64")]
    GenericAarch64,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Storage {
    Sd,
    Nvme,
    Usb,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Hardware {
    /// Board profile from `images/boards/`.
    pub board: Board,
    /// RAM of this board variant, e.g. `8GiB`; must be a size the board is sold with.
    pub ram: Quantity,
    /// Where the root filesystem lives. Default: the board profile's (sd for Pi boards).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<Storage>,
    /// PCIe generation for the external link (Pi 5 only): 2 (default) or 3 (not certified, faster NVMe).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pcie_gen: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overclock: Option<Overclock>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cooling: Option<Cooling>,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Overclock {
    /// CPU clock in MHz (`arm_freq`). Pi 5 default 2400; above 2800 needs good cooling, 3000 is the effective cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arm_freq_mhz: Option<u32>,
    /// Offset in microvolts added to the firmware's DVFS voltage (`over_voltage_delta`), e.g. 50000 = +50 mV.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub over_voltage_delta: Option<i64>,
    /// `force_turbo=1`: no idle down-clocking. Combined with a positive voltage it sets the warranty bit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force_turbo: Option<bool>,
    /// Set to true to accept that force-turbo with over-voltage permanently voids the warranty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub void_warranty: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Cooling {
    /// Fan curve (Pi 5 fan header), up to 4 levels with rising temperatures.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fan: Vec<FanLevel>,
    /// Firmware throttling temperature in °C (`temp_limit`, max 85).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temp_limit_c: Option<u32>,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FanLevel {
    /// Temperature in °C at which this level starts.
    pub temp_c: f64,
    /// Fan PWM 0-255.
    pub speed: u32,
    /// Hysteresis in °C (default 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hysteresis_c: Option<f64>,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Base {
    /// An existing Raspberry Pi OS image (.img, .img.xz, .img.zst), relative to the spec file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// sha256 of the image file as given (compressed or not): 64 hex digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Build the root filesystem from Debian packages instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debian: Option<Debian>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Arch {
    Arm64,
    Amd64,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema, PartialEq, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Debian {
    /// Debian suite (default bookworm).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suite: Option<String>,
    /// Architecture (default: the board's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<Arch>,
    /// Mirror URL (default http://deb.debian.org/debian).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<String>,
    /// Extra packages for the base.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packages: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema, PartialEq, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct System {
    /// Default: the spec's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// IANA zone such as Europe/Berlin (default UTC). Prewarm windows are in this zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// Default C.UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locale: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<User>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh: Option<Ssh>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wifi: Option<Wifi>,
    /// Extra packages installed in the image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packages: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct User {
    pub name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_authorized_keys: Vec<String>,
    /// crypt(3) hash, e.g. from `mkpasswd -m yescrypt`. Without one the account has no password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_hash: Option<String>,
    /// Refused: a plain password in a spec leaks. Use password-hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Give the user sudo (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sudo: Option<bool>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Ssh {
    /// Start the SSH server (default true when any user has keys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable: Option<bool>,
    /// Allow password logins (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_authentication: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Wifi {
    pub ssid: String,
    /// Two-letter regulatory country code, e.g. DE.
    pub country: String,
    /// File holding the passphrase, relative to the spec file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psk_file: Option<String>,
    /// Environment variable holding the passphrase when kiln renders.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psk_env: Option<String>,
    /// Refused: secrets are never inline. Use psk-file or psk-env.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psk: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ZramAlgorithm {
    Lz4,
    Lz4hc,
    Zstd,
    LzoRle,
    Lzo,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema, PartialEq, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Memory {
    /// Compressed swap in RAM. Omit for none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zram: Option<Zram>,
    /// vm.swappiness 0-200 (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swappiness: Option<u32>,
    /// vm.vfs_cache_pressure (default 50: keep file pages, such as mapped weights, longer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vfs_cache_pressure: Option<u32>,
    /// vm.page-cluster 0-10 (default 0: no swap readahead, right for zram).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_cluster: Option<u32>,
    /// tmpfs hot tier for model weights. Omit to use the page cache only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tmpfs: Option<Tmpfs>,
    /// MALLOC_ARENA_MAX for kilnd and its workers (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub malloc_arena_max: Option<u32>,
    /// Keep the base's disk swap (dphys-swapfile / rpi-swap file) (default false: zram only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_swap: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Zram {
    /// Uncompressed size of the swap device, e.g. 2GiB.
    pub size: Quantity,
    /// Compression algorithm (default lz4: fastest on the Pi's Cortex-A76).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<ZramAlgorithm>,
    /// Swap priority (default 100, above any disk swap).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Tmpfs {
    /// Mount point (default /var/cache/kiln/hot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    pub size: Quantity,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema, PartialEq, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Cgroups {
    /// Limits shared by all inference workers (kiln-inference.slice).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inference: Option<Limits>,
    /// Limits for kilnd itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kilnd: Option<Limits>,
    /// Limits for prewarm copies (store -> hot tier).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prewarm: Option<Limits>,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema, PartialEq, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Limits {
    /// memory.max: the hard limit (OOM kill above it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_max: Option<Quantity>,
    /// memory.high: throttle and reclaim above it; below memory-max.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_high: Option<Quantity>,
    /// memory.swap.max.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_max: Option<Quantity>,
    /// CPUs as a cpuset, e.g. "1-3".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<Quantity>,
    /// cpu.weight 1-10000 (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_weight: Option<u32>,
    /// CPU quota as a percentage of one CPU, e.g. 250%.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_quota: Option<Quantity>,
    /// io.weight 1-10000 (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_weight: Option<u32>,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Model {
    /// Name clients use (`model` in API requests).
    pub id: String,
    /// A local GGUF file, relative to the spec file; baked into the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// An http(s) URL the device fetches (resumable, verified).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// sha256 of the GGUF file: 64 hex digits. Required: a model is never used unverified.
    pub sha256: String,
    /// File size; required for url models (the budget is checked before download).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Quantity>,
    /// Context length in tokens (default 2048).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<u32>,
    /// Decode threads (default: the inference cpuset's size, else the board's cores minus one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads: Option<u32>,
    /// Prompt batch size (default 512).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<u32>,
    /// Generations decoded together, one batch per step (default 1). Each has the whole
    /// context; the KV cache holds context x parallel tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel: Option<u32>,
    /// Keep in the hot tier; never evicted for space.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin: Option<bool>,
    /// Higher stays longer under pressure (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// Jinja chat template overriding the one in the GGUF.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<String>,
    /// Default sampling for requests that do not set their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling: Option<Sampling>,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema, PartialEq, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Sampling {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeat_penalty: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum EvictionPolicy {
    /// Least recently used first (pins never).
    Lru,
    /// GreedyDual-Size: weigh recency by the cost of reloading from the tier a model falls to.
    GreedyDualSize,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema, PartialEq, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Cache {
    /// Bytes of model weights the hot tier may hold (default: the tmpfs size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hot_budget: Option<Quantity>,
    /// Eviction order (default greedy-dual-size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eviction: Option<EvictionPolicy>,
    /// How long a loaded model stays after its last request ends (default 30m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_alive: Option<Quantity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thresholds: Option<Thresholds>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prewarm: Option<Prewarm>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub responses: Option<ResponseCache>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<PrefixCache>,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema, PartialEq, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Thresholds {
    /// Memory in use (of RAM) that logs a warning (default 60%).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warn: Option<Quantity>,
    /// Memory in use that starts evicting unpinned models (default 70%).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evict: Option<Quantity>,
    /// Memory in use that evicts every unpinned model and refuses loads (default 95%).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emergency: Option<Quantity>,
    /// PSI memory `some avg10` that counts as pressure (default 10%).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psi: Option<Quantity>,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema, PartialEq, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Prewarm {
    /// Off-peak windows in local time: "01:00-05:00", "23:00-02:00", "sat,sun 01:00-07:00".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub windows: Vec<String>,
    /// Models to prewarm, by id (default: the pinned ones).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
    /// I/O rate cap for prewarm copies, e.g. 100MiB/s (default: uncapped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<Quantity>,
    /// Also prewarm once at boot (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_boot: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema, PartialEq, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ResponseCache {
    /// In-memory bytes (default 64MiB; 0 disables).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
    /// On-disk bytes (default 256MiB; 0 disables).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<Quantity>,
    /// Entry lifetime (default 24h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<Quantity>,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema, PartialEq, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PrefixCache {
    /// Directory for saved KV states (default /var/cache/kiln/prefix).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
    /// Bytes on disk (default 512MiB; 0 disables).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Quantity>,
    /// Entry lifetime (default 7d).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<Quantity>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema, PartialEq, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Supervisor {
    /// HTTP listen address (default 127.0.0.1:8080). A non-loopback address needs api-token-file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// File holding the bearer token, relative to the spec file; installed as /etc/kiln/api-token (0600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_token_file: Option<String>,
    /// Requests waiting per model before 429 (default 8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_depth: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<RequestLimits>,
    /// Default info.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_level: Option<LogLevel>,
    /// How `kiln deploy` activates a new generation on the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deploy: Option<Deploy>,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema, PartialEq, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Deploy {
    /// How long a new generation's kilnd has to report READY and answer a canary completion
    /// before the device rolls back to the previous generation (default 5m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_timeout: Option<Quantity>,
    /// Generations kept on the device, the active one included (default 5; at least 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_generations: Option<u32>,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema, PartialEq, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RequestLimits {
    /// Largest request body (default 1MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Quantity>,
    /// Most prompt tokens per request (default: the model's context).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<u32>,
    /// Most generated tokens per request (default 1024).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
}
