//! Reads the header of a GGUF model file (metadata and tensor infos, never the weights) safely.
//!
//! The reader streams through a buffered [`File`], bound-checks every length and offset against
//! the file size, skips metadata it does not need without storing it, and never panics.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

const MAGIC: [u8; 4] = *b"GGUF";
/// Longest string value kept or skipped (chat templates can be large).
const MAX_STRING: u64 = 16 << 20;
/// Longest key or tensor name (the spec caps keys at 65535 bytes).
const MAX_KEY: u64 = 65_535;
/// Deepest nesting of arrays accepted.
const MAX_DEPTH: u32 = 4;
/// Most `{arch}.*` candidate keys remembered before the architecture is known.
const MAX_CANDIDATES: usize = 256;
const ARCH_KEYS: [&str; 7] = [
    "context_length",
    "block_count",
    "embedding_length",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.key_length",
    "attention.value_length",
];

/// What a GGUF header says about a model, plus where its tensor data lies.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufInfo {
    /// GGUF format version (2 or 3).
    pub version: u32,
    /// Size of the whole file.
    pub file_size_bytes: u64,
    /// Number of tensors.
    pub tensor_count: u64,
    /// Offset of the first tensor byte (after alignment).
    pub tensor_data_offset: u64,
    /// file_size_bytes - tensor_data_offset: the bytes a worker maps for weights.
    pub tensor_data_bytes: u64,
    /// `general.architecture`.
    pub architecture: Option<String>,
    /// `general.name`.
    pub name: Option<String>,
    /// `general.file_type`.
    pub file_type: Option<u32>,
    /// `{arch}.context_length`.
    pub context_length: Option<u64>,
    /// `{arch}.block_count`.
    pub block_count: Option<u64>,
    /// `{arch}.embedding_length`.
    pub embedding_length: Option<u64>,
    /// `{arch}.attention.head_count` (the max when stored per layer).
    pub head_count: Option<u64>,
    /// `{arch}.attention.head_count_kv`, or `head_count` when absent (the max when per layer).
    pub head_count_kv: Option<u64>,
    /// `{arch}.attention.key_length`.
    pub key_length: Option<u64>,
    /// `{arch}.attention.value_length`.
    pub value_length: Option<u64>,
    /// `tokenizer.chat_template`.
    pub chat_template: Option<String>,
    /// Every tensor's name, type, shape and place, in file order.
    pub tensors: Vec<TensorInfo>,
}

/// One tensor of a GGUF file (its info, not its data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// The `ggml_type` number (2 = Q4_0, 3 = Q4_1, 8 = Q8_0, 12 = Q4_K, 20 = IQ4_NL ...).
    pub ggml_type: u32,
    /// ne[0] .. ne[n_dims-1]: ne[0] is the row length, ne[1] the number of rows.
    pub dims: Vec<u64>,
    /// Offset of its data from the start of the tensor data.
    pub offset: u64,
}

/// Which of llama.cpp's CPU weight repacks (ggml-cpu/repack.cpp) the engine applies on a CPU.
/// A repacked tensor is copied into anonymous memory at load, so its bytes sit in RAM twice:
/// once in the mapped (page-cached) file, once repacked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Repack {
    /// No repacking (e.g. Cortex-A72: no dot-product instructions).
    None,
    /// x86-64 with AVX2 (kilnd is built for x86-64-v3): Q4_0, Q4_K, IQ4_NL, MXFP4 in 8-row groups.
    X86Avx2,
    /// Armv8.2 with dot product, no i8mm (Cortex-A76, the Pi 5): Q4_0, IQ4_NL, MXFP4, Q8_0 in
    /// 4-row groups; Q4_K, Q5_K, Q6_K in 8-row groups.
    ArmDotprod,
}

impl Repack {
    /// What this process's engine does: decided by the CPU features kilnd (and so the
    /// llama.cpp inside it) was compiled for.
    pub fn of_this_build() -> Repack {
        if cfg!(all(target_arch = "x86_64", target_feature = "avx2")) {
            Repack::X86Avx2
        } else if cfg!(all(target_arch = "aarch64", target_feature = "dotprod")) {
            Repack::ArmDotprod
        } else {
            Repack::None
        }
    }

    /// The row group a tensor of `ggml_type` is repacked in, or None when it is not.
    fn rows(self, ggml_type: u32) -> Option<u64> {
        const Q4_0: u32 = 2;
        const Q8_0: u32 = 8;
        const Q4_K: u32 = 12;
        const Q5_K: u32 = 13;
        const Q6_K: u32 = 14;
        const IQ4_NL: u32 = 20;
        const MXFP4: u32 = 39;
        match (self, ggml_type) {
            (Repack::X86Avx2, Q4_0 | Q4_K | IQ4_NL | MXFP4) => Some(8),
            (Repack::ArmDotprod, Q4_0 | IQ4_NL | MXFP4 | Q8_0) => Some(4),
            (Repack::ArmDotprod, Q4_K | Q5_K | Q6_K) => Some(8),
            _ => None,
        }
    }
}

impl GgufInfo {
    /// Bytes of each tensor's data, in file order: up to the next tensor's offset (or the end).
    fn tensor_bytes(&self) -> Vec<u64> {
        let mut offsets: Vec<u64> = self.tensors.iter().map(|t| t.offset).collect();
        offsets.sort_unstable();
        self.tensors
            .iter()
            .map(|t| {
                let i = offsets.partition_point(|o| *o <= t.offset);
                let next = offsets.get(i).copied().unwrap_or(self.tensor_data_bytes);
                next.saturating_sub(t.offset)
            })
            .collect()
    }

    /// Bytes llama.cpp copies into anonymous memory when it repacks this model's weights for
    /// `repack`: matrices (2-D or more) of a repacked type whose row count divides into the
    /// row groups. `token_embd.weight` stays in the mapping (it is read by row lookup, not
    /// multiplied). Measured: SmolLM2-135M Q4_0 and IQ4_NL on AVX2 add ~57 MiB of anonymous
    /// memory, Q4_1 and Q8_0 nothing (supervisor/tests/serve.rs checks this against a load).
    pub fn repacked_bytes(&self, repack: Repack) -> u64 {
        let sizes = self.tensor_bytes();
        self.tensors
            .iter()
            .zip(sizes)
            .filter(|(t, _)| t.name != "token_embd.weight" && t.dims.len() >= 2)
            .filter(|(t, _)| repack.rows(t.ggml_type).is_some_and(|g| t.dims[1] % g == 0))
            .map(|(_, b)| b)
            .sum()
    }

    /// Bytes of an f16 K+V cache for `context` tokens:
    /// `block_count * context * head_count_kv * (k_dim + v_dim) * 2`, where k_dim is `key_length`
    /// and v_dim is `value_length`, each defaulting to `embedding_length / head_count`.
    /// None when the header lacks the numbers (or the result overflows).
    pub fn kv_cache_bytes(&self, context: u64) -> Option<u64> {
        let head_dim = || self.embedding_length?.checked_div(self.head_count?);
        let k_dim = self.key_length.or_else(head_dim)?;
        let v_dim = self.value_length.or_else(head_dim)?;
        self.block_count?
            .checked_mul(context)?
            .checked_mul(self.head_count_kv?)?
            .checked_mul(k_dim.checked_add(v_dim)?)?
            .checked_mul(2)
    }
}

/// Why a GGUF header could not be read. Every variant names the file in `path`.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened or read.
    #[error("reading GGUF header of {}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file does not start with "GGUF"; `magic` holds its first four bytes.
    #[error(
        "reading GGUF header of {}: not a GGUF file (magic is {}, expected 47475546 \"GGUF\")",
        .path.display(), hex4(.magic)
    )]
    NotGguf { path: PathBuf, magic: [u8; 4] },
    /// The file is a big-endian GGUF.
    #[error("reading GGUF header of {}: big-endian GGUF files are not supported", .path.display())]
    BigEndian { path: PathBuf },
    /// The GGUF version is not 2 or 3.
    #[error(
        "reading GGUF header of {}: unsupported GGUF version {version} (only 2 and 3 are supported)",
        .path.display()
    )]
    UnsupportedVersion { path: PathBuf, version: u32 },
    /// The file ends (or a length points past its end) while reading `what` at byte `offset`.
    #[error(
        "reading GGUF header of {}: truncated at byte {offset} while reading {what}",
        .path.display()
    )]
    Truncated { path: PathBuf, offset: u64, what: String },
    /// The header holds a value that cannot be right, found near byte `offset`.
    #[error("reading GGUF header of {}: invalid header at byte {offset}: {reason}", .path.display())]
    Invalid { path: PathBuf, offset: u64, reason: String },
}

fn hex4(b: &[u8; 4]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Bytes of a fixed-size value type; None for strings, arrays and unknown types.
fn fixed_size(ty: u32) -> Option<u64> {
    match ty {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

/// Which part of a metadata value the caller keeps.
#[derive(Clone, Copy, PartialEq)]
enum Want {
    Skip,
    Int,
    Str,
}

/// An integer (max of an int array) and/or a string read from one value.
type Value = (Option<u64>, Option<String>);
type Res<T> = Result<T, GgufError>;

struct Reader {
    inner: BufReader<File>,
    path: PathBuf,
    pos: u64,
    len: u64,
}

impl Reader {
    fn truncated(&self, what: &str) -> GgufError {
        let (path, offset, what) = (self.path.clone(), self.pos, what.to_owned());
        GgufError::Truncated { path, offset, what }
    }
    fn invalid(&self, reason: String) -> GgufError {
        GgufError::Invalid { path: self.path.clone(), offset: self.pos, reason }
    }
    fn io(&self, source: std::io::Error) -> GgufError {
        GgufError::Io { path: self.path.clone(), source }
    }
    /// Fails unless `n` more bytes exist.
    fn check(&self, n: u64, what: &str) -> Res<()> {
        match self.pos.checked_add(n) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(self.truncated(what)),
        }
    }
    fn exact(&mut self, buf: &mut [u8], what: &str) -> Res<()> {
        self.check(buf.len() as u64, what)?;
        self.inner.read_exact(buf).map_err(|e| self.io(e))?;
        self.pos += buf.len() as u64;
        Ok(())
    }
    fn skip(&mut self, n: u64, what: &str) -> Res<()> {
        self.check(n, what)?;
        let rel = i64::try_from(n).map_err(|_| self.truncated(what))?;
        self.inner.seek_relative(rel).map_err(|e| self.io(e))?;
        self.pos += n;
        Ok(())
    }
    fn bytes<const N: usize>(&mut self, what: &str) -> Res<[u8; N]> {
        let mut b = [0; N];
        self.exact(&mut b, what)?;
        Ok(b)
    }
    fn u32(&mut self, what: &str) -> Res<u32> {
        self.bytes(what).map(u32::from_le_bytes)
    }
    fn u64(&mut self, what: &str) -> Res<u64> {
        self.bytes(what).map(u64::from_le_bytes)
    }
    /// Reads a string length, checked against `cap` and the bytes left in the file.
    fn str_len(&mut self, cap: u64, what: &str) -> Res<u64> {
        let n = self.u64(what)?;
        if n > cap {
            return Err(self.invalid(format!("{what}: string length {n} exceeds the limit {cap}")));
        }
        self.check(n, what)?;
        Ok(n)
    }
    fn string(&mut self, cap: u64, what: &str) -> Res<String> {
        let n = self.str_len(cap, what)?;
        let mut buf = vec![0; usize::try_from(n).map_err(|_| self.truncated(what))?];
        self.exact(&mut buf, what)?;
        String::from_utf8(buf).map_err(|_| self.invalid(format!("{what} is not valid UTF-8")))
    }
    /// Reads an integer of any integer type `ty`; None when negative.
    fn int(&mut self, ty: u32, what: &str) -> Res<Option<u64>> {
        let size = fixed_size(ty).unwrap_or(8);
        let mut b = [0u8; 8];
        self.exact(&mut b[..size as usize], what)?;
        let raw = u64::from_le_bytes(b);
        let shift = 64 - 8 * size as u32;
        Ok(match ty {
            1 | 3 | 5 | 11 => u64::try_from(((raw << shift) as i64) >> shift).ok(),
            _ => Some(raw),
        })
    }
    /// Reads or skips one value of type `ty`; with `Want::Int`, int arrays yield their max.
    fn value(&mut self, ty: u32, want: Want, depth: u32, what: &str) -> Res<Value> {
        match ty {
            0..=5 | 10 | 11 if want == Want::Int => Ok((self.int(ty, what)?, None)),
            8 if want == Want::Str => Ok((None, Some(self.string(MAX_STRING, what)?))),
            8 => {
                let n = self.str_len(MAX_STRING, what)?;
                self.skip(n, what).map(|_| (None, None))
            }
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(self.invalid(format!("{what}: arrays nested over {MAX_DEPTH} deep")));
                }
                let elem = self.u32(what)?;
                let count = self.u64(what)?;
                let min = match elem {
                    8 => 8,
                    9 => 12,
                    _ => fixed_size(elem)
                        .ok_or_else(|| self.invalid(format!("{what}: unknown array element type {elem}")))?,
                };
                self.check(count.saturating_mul(min), what)?;
                if want != Want::Int && elem != 8 && elem != 9 {
                    return self.skip(count * min, what).map(|_| (None, None));
                }
                let inner = if want == Want::Int { Want::Int } else { Want::Skip };
                let mut max = None;
                for _ in 0..count {
                    max = max.max(self.value(elem, inner, depth + 1, what)?.0);
                }
                Ok((max, None))
            }
            _ => match fixed_size(ty) {
                Some(n) => self.skip(n, what).map(|_| (None, None)),
                None => Err(self.invalid(format!("{what}: unknown value type {ty}"))),
            },
        }
    }
}

/// Reads the header of the GGUF file at `path`: metadata and tensor infos, never tensor data.
pub fn read_header(path: &Path) -> Result<GgufInfo, GgufError> {
    let io = |source| GgufError::Io { path: path.to_owned(), source };
    let file = File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let inner = BufReader::with_capacity(1 << 16, file);
    let mut r = Reader { inner, path: path.to_owned(), pos: 0, len };

    let magic = r.bytes("the magic")?;
    if magic != MAGIC {
        return Err(GgufError::NotGguf { path: path.to_owned(), magic });
    }
    let version = r.u32("the version")?;
    if version != 0 && version & 0xffff == 0 {
        return Err(GgufError::BigEndian { path: path.to_owned() });
    }
    if !(2..=3).contains(&version) {
        return Err(GgufError::UnsupportedVersion { path: path.to_owned(), version });
    }
    let tensor_count = r.u64("the tensor count")?;
    let kv_count = r.u64("the metadata count")?;
    // Each metadata entry takes at least 13 bytes, each tensor info at least 24.
    let min = (kv_count.checked_mul(13).zip(tensor_count.checked_mul(24))).and_then(|(a, b)| a.checked_add(b));
    if min.is_none_or(|m| m > len - r.pos) {
        let (k, t) = (kv_count, tensor_count);
        return Err(r.invalid(format!("{k} metadata entries and {t} tensors cannot fit in {len} bytes")));
    }

    let (mut architecture, mut name, mut chat_template, mut file_type) = (None, None, None, None);
    let mut alignment = 32u64;
    let mut candidates: Vec<(String, u64)> = Vec::new();
    for _ in 0..kv_count {
        let key = r.string(MAX_KEY, "a metadata key")?;
        let ty = r.u32("a metadata value type")?;
        let arch_key = (ARCH_KEYS.iter()).any(|s| key.strip_suffix(s).is_some_and(|p| p.ends_with('.')));
        let want = match key.as_str() {
            "general.architecture" | "general.name" | "tokenizer.chat_template" => Want::Str,
            "general.file_type" | "general.alignment" => Want::Int,
            _ if arch_key && candidates.len() < MAX_CANDIDATES => Want::Int,
            _ => Want::Skip,
        };
        let (int, string) = r.value(ty, want, 0, "a metadata value")?;
        match key.as_str() {
            "general.architecture" => architecture = string,
            "general.name" => name = string,
            "tokenizer.chat_template" => chat_template = string,
            "general.file_type" => file_type = int.and_then(|v| u32::try_from(v).ok()),
            "general.alignment" => match int {
                Some(a) if a.is_power_of_two() && a <= 1 << 30 => alignment = a,
                _ => {
                    return Err(r.invalid(format!("general.alignment {int:?} is not a power of 2")));
                }
            },
            _ => candidates.extend(int.map(|v| (key, v))),
        }
    }
    let arch = architecture.as_deref().unwrap_or_default();
    let get = |suffix: &str| {
        let key = format!("{arch}.{suffix}");
        candidates.iter().rev().find(|(k, _)| *k == key).map(|(_, v)| *v)
    };
    let head_count = get(ARCH_KEYS[3]);

    let mut max_offset = 0;
    let mut tensors = Vec::new();
    for _ in 0..tensor_count {
        let n = r.str_len(MAX_KEY, "a tensor name")?;
        let mut name = vec![0; usize::try_from(n).map_err(|_| r.truncated("a tensor name"))?];
        r.exact(&mut name, "a tensor name")?;
        let name = String::from_utf8_lossy(&name).into_owned();
        let n_dims = r.u32("a tensor's dimension count")?;
        if n_dims > 4 {
            return Err(r.invalid(format!("a tensor has {n_dims} dimensions, at most 4 allowed")));
        }
        let dims = (0..n_dims).map(|_| r.u64("a tensor's dimensions")).collect::<Result<Vec<_>, _>>()?;
        let ggml_type = r.u32("a tensor type")?;
        let offset = r.u64("a tensor offset")?;
        if offset % alignment != 0 {
            let msg = format!("tensor offset {offset} is not a multiple of alignment {alignment}");
            return Err(r.invalid(msg));
        }
        max_offset = max_offset.max(offset);
        tensors.push(TensorInfo { name, ggml_type, dims, offset });
    }
    let data = r.pos.div_ceil(alignment).checked_mul(alignment).filter(|d| *d <= len);
    let data = match data {
        Some(d) if tensor_count == 0 || max_offset < len - d => d,
        _ => return Err(r.truncated("the tensor data")),
    };
    Ok(GgufInfo {
        version,
        file_size_bytes: len,
        tensor_count,
        tensor_data_offset: data,
        tensor_data_bytes: len - data,
        context_length: get(ARCH_KEYS[0]),
        block_count: get(ARCH_KEYS[1]),
        embedding_length: get(ARCH_KEYS[2]),
        head_count,
        head_count_kv: get(ARCH_KEYS[4]).or(head_count),
        key_length: get(ARCH_KEYS[5]),
        value_length: get(ARCH_KEYS[6]),
        architecture,
        name,
        file_type,
        chat_template,
        tensors,
    })
}
