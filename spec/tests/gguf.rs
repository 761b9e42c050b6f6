//! Tests for the GGUF header reader: synthetic files, hostile files, and the real model if present.

use std::path::{Path, PathBuf};

use kiln_spec::gguf::{GgufError, GgufInfo, Repack, TensorInfo, read_header};
use proptest::prelude::*;

/// A minimal GGUF writer for synthetic files.
#[derive(Default)]
struct W(Vec<u8>);

impl W {
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    fn header(&mut self, version: u32, tensors: u64, kvs: u64) -> &mut Self {
        self.0.extend_from_slice(b"GGUF");
        self.u32(version).u64(tensors).u64(kvs)
    }
    fn kv_u32(&mut self, k: &str, v: u32) -> &mut Self {
        self.str(k).u32(4).u32(v)
    }
    fn kv_u64(&mut self, k: &str, v: u64) -> &mut Self {
        self.str(k).u32(10).u64(v)
    }
    fn kv_str(&mut self, k: &str, v: &str) -> &mut Self {
        self.str(k).u32(8).str(v)
    }
    fn kv_str_array(&mut self, k: &str, items: &[String]) -> &mut Self {
        self.str(k).u32(9).u32(8).u64(items.len() as u64);
        for s in items {
            self.str(s);
        }
        self
    }
    fn tensor(&mut self, name: &str, dims: &[u64], offset: u64) -> &mut Self {
        self.typed_tensor(name, dims, 0, offset)
    }
    fn typed_tensor(&mut self, name: &str, dims: &[u64], ggml_type: u32, offset: u64) -> &mut Self {
        self.str(name).u32(dims.len() as u32);
        for d in dims {
            self.u64(*d);
        }
        self.u32(ggml_type).u64(offset)
    }
    /// Pads to `align`, then appends `data` zero bytes; returns the data offset.
    fn data(&mut self, align: usize, data: usize) -> u64 {
        let off = self.0.len().div_ceil(align) * align;
        self.0.resize(off + data, 0);
        off as u64
    }
}

const TEMPLATE: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}";

/// A v3 "llama" file: u32/u64 ints, an `n_tokens` string array, alignment 64, two tensors.
fn llama_file(n_tokens: usize) -> (Vec<u8>, usize, u64) {
    let tokens: Vec<String> = (0..n_tokens).map(|i| format!("tok{i}")).collect();
    let mut w = W::default();
    w.header(3, 2, 12)
        .kv_str("general.architecture", "llama")
        .kv_str("general.name", "tiny")
        .kv_u32("general.file_type", 3)
        .kv_u32("llama.context_length", 4096)
        .kv_u64("llama.block_count", 12)
        .kv_u32("llama.embedding_length", 768)
        .kv_u32("llama.attention.head_count", 12)
        .kv_u32("llama.attention.head_count_kv", 4)
        .kv_str_array("tokenizer.ggml.tokens", &tokens)
        .kv_str("tokenizer.chat_template", TEMPLATE)
        .kv_u32("general.alignment", 64);
    w.str("llama.rope.freq_base").u32(6).u32(10000f32.to_bits());
    w.tensor("token_embd.weight", &[768, 100], 0).tensor("output_norm.weight", &[768], 76_800);
    let header_len = w.0.len();
    let data = w.data(64, 76_800 + 768);
    (w.0, header_len, data)
}

fn write(dir: &tempfile::TempDir, bytes: &[u8]) -> PathBuf {
    let p = dir.path().join("m.gguf");
    std::fs::write(&p, bytes).expect("write temp file");
    p
}

fn read(bytes: &[u8]) -> Result<GgufInfo, GgufError> {
    let dir = tempfile::tempdir().expect("tempdir");
    read_header(&write(&dir, bytes))
}

#[test]
fn synthetic_llama_file() {
    let (bytes, header_len, data) = llama_file(1000);
    let info = read(&bytes).expect("valid file");
    assert_eq!(data % 64, 0);
    assert!(data >= header_len as u64 && data < header_len as u64 + 64);
    assert_eq!(
        info,
        GgufInfo {
            version: 3,
            file_size_bytes: bytes.len() as u64,
            tensor_count: 2,
            tensor_data_offset: data,
            tensor_data_bytes: 76_800 + 768,
            architecture: Some("llama".into()),
            name: Some("tiny".into()),
            file_type: Some(3),
            context_length: Some(4096),
            block_count: Some(12),
            embedding_length: Some(768),
            head_count: Some(12),
            head_count_kv: Some(4),
            key_length: None,
            value_length: None,
            chat_template: Some(TEMPLATE.into()),
            tensors: vec![
                TensorInfo { name: "token_embd.weight".into(), ggml_type: 0, dims: vec![768, 100], offset: 0 },
                TensorInfo { name: "output_norm.weight".into(), ggml_type: 0, dims: vec![768], offset: 76_800 },
            ],
        }
    );
    // head_dim 768/12 = 64, n_embd_kv = 4*64 = 256: 2 * 12 * 4096 * 256 * 2 bytes.
    assert_eq!(info.kv_cache_bytes(4096), Some(50_331_648));
    assert_eq!(info.kv_cache_bytes(0), Some(0));
}

/// Which tensors llama.cpp's CPU repacking copies into anonymous memory, per CPU.
#[test]
fn repacked_bytes_count_matrices_of_repacked_types_by_row_group() {
    let (q4_0, q8_0, q4_1, f32_) = (2, 8, 3, 0);
    let mut w = W::default();
    w.header(3, 6, 1).kv_str("general.architecture", "llama");
    // Offsets in bytes; each tensor's size is the distance to the next one.
    w.typed_tensor("token_embd.weight", &[64, 16], q4_0, 0) // row lookups: never repacked
        .typed_tensor("blk.0.attn_q.weight", &[64, 16], q4_0, 1024) // 16 rows: 8- and 4-row groups
        .typed_tensor("blk.0.ffn_up.weight", &[64, 12], q4_0, 2048) // 12 rows: 4-row groups only
        .typed_tensor("blk.0.attn_k.weight", &[64, 8], q8_0, 2560) // Q8_0: Arm only
        .typed_tensor("blk.0.attn_v.weight", &[64, 8], q4_1, 3072) // Q4_1: nowhere
        .typed_tensor("blk.0.attn_norm.weight", &[64], f32_, 3584); // 1-D
    w.data(32, 3584 + 256);
    let info = read(&w.0).expect("valid file");
    assert_eq!(info.tensors.len(), 6);
    assert_eq!(info.repacked_bytes(Repack::X86Avx2), 1024);
    assert_eq!(info.repacked_bytes(Repack::ArmDotprod), 1024 + 512 + 512);
    assert_eq!(info.repacked_bytes(Repack::None), 0);
}

#[test]
fn key_value_lengths_per_layer_kv_heads_and_other_int_types() {
    let mut w = W::default();
    w.header(2, 0, 7).kv_str("general.architecture", "gemma");
    w.str("gemma.block_count").u32(0).0.push(4); // u8
    w.str("gemma.attention.head_count").u32(5).u32(8); // i32
    w.str("gemma.attention.head_count_kv").u32(9).u32(11).u64(3).u64(2).u64(4).u64(1); // i64 array
    w.str("gemma.attention.key_length").u32(2).0.extend_from_slice(&256u16.to_le_bytes());
    w.kv_u64("gemma.attention.value_length", 128);
    w.str("gemma.context_length").u32(11).u64(-5i64 as u64); // negative: ignored
    w.data(32, 0);
    let info = read(&w.0).expect("valid file");
    assert_eq!(info.version, 2);
    assert_eq!(info.block_count, Some(4));
    assert_eq!((info.head_count, info.head_count_kv), (Some(8), Some(4)));
    assert_eq!((info.key_length, info.value_length), (Some(256), Some(128)));
    assert_eq!(info.context_length, None);
    assert_eq!(info.embedding_length, None);
    // 4 layers * 10 tokens * 4 kv heads * (256 + 128) * 2 bytes.
    assert_eq!(info.kv_cache_bytes(10), Some(122_880));
}

#[test]
fn absent_head_count_kv_equals_head_count_and_missing_numbers_give_none() {
    let mut w = W::default();
    w.header(3, 0, 3)
        .kv_u32("llama.attention.head_count", 9)
        .kv_u32("llama.block_count", 2)
        .kv_str("general.architecture", "llama"); // architecture after its keys
    w.data(32, 0);
    let info = read(&w.0).expect("valid file");
    assert_eq!((info.head_count, info.head_count_kv), (Some(9), Some(9)));
    assert_eq!(info.kv_cache_bytes(100), None, "no embedding_length nor key_length");
}

#[test]
fn wrong_magic_version_and_endianness() {
    let mut elf = b"\x7fELF".to_vec();
    elf.extend_from_slice(&[0; 32]);
    let err = read(&elf).expect_err("not gguf");
    let msg = err.to_string();
    assert!(matches!(err, GgufError::NotGguf { .. }), "{err:?}");
    assert!(msg.starts_with("reading GGUF header of "), "{msg}");
    assert!(msg.ends_with(": not a GGUF file (magic is 7f454c46, expected 47475546 \"GGUF\")"), "{msg}");

    let mut w = W::default();
    w.header(1, 0, 0);
    let err = read(&w.0).expect_err("v1");
    assert!(matches!(err, GgufError::UnsupportedVersion { version: 1, .. }), "{err:?}");
    assert!(err.to_string().contains("unsupported GGUF version 1"), "{err}");

    let mut be = b"GGUF".to_vec();
    be.extend_from_slice(&3u32.to_be_bytes());
    be.extend_from_slice(&[0; 16]);
    assert!(matches!(read(&be), Err(GgufError::BigEndian { .. })));
}

#[test]
fn missing_file_is_io_error_with_source() {
    let err = read_header(Path::new("/nonexistent/kiln/x.gguf")).expect_err("missing");
    assert!(matches!(err, GgufError::Io { .. }), "{err:?}");
    assert_eq!(err.to_string(), "reading GGUF header of /nonexistent/kiln/x.gguf");
    assert!(std::error::Error::source(&err).is_some());
}

#[test]
fn every_prefix_is_an_error_or_ok_never_a_panic() {
    let (bytes, header_len, _) = llama_file(20);
    let dir = tempfile::tempdir().expect("tempdir");
    for n in (0..header_len + 100).chain([bytes.len() - 1, bytes.len()]) {
        let res = read_header(&write(&dir, &bytes[..n]));
        if n <= header_len {
            let err = res.expect_err("a truncated header must fail");
            let ok = matches!(err, GgufError::Truncated { .. } | GgufError::Invalid { .. });
            assert!(ok, "prefix {n}: {err:?}");
        }
    }
}

#[test]
fn absurd_lengths_are_errors_not_oom() {
    // Key length u64::MAX.
    let mut w = W::default();
    w.header(3, 0, 1).u64(u64::MAX).u32(4).u32(0);
    assert!(matches!(read(&w.0), Err(GgufError::Invalid { .. })));
    // String value longer than the file.
    let mut w = W::default();
    w.header(3, 0, 1).str("general.name").u32(8).u64(1000).0.extend_from_slice(b"abc");
    assert!(matches!(read(&w.0), Err(GgufError::Truncated { .. })));
    // Array count huge (skipped and wanted).
    for key in ["tokenizer.ggml.tokens", "llama.attention.head_count_kv"] {
        for elem in [8, 4, 9] {
            let mut w = W::default();
            w.header(3, 0, 1).str(key).u32(9).u32(elem).u64(u64::MAX / 2).u64(0);
            assert!(matches!(read(&w.0), Err(GgufError::Truncated { .. })), "{key} {elem}");
        }
    }
    // Counts that cannot fit in the file.
    for (t, k) in [(u64::MAX, 0), (0, u64::MAX), (1 << 40, 1 << 40)] {
        let mut w = W::default();
        w.header(3, t, k).u64(0);
        assert!(matches!(read(&w.0), Err(GgufError::Invalid { .. })), "{t} {k}");
    }
    // Deeply nested arrays.
    let mut w = W::default();
    w.header(3, 0, 1).str("x").u32(9);
    for _ in 0..100 {
        w.u32(9).u64(1);
    }
    w.0.resize(w.0.len() + 64, 0);
    assert!(matches!(read(&w.0), Err(GgufError::Invalid { .. })));
    // Unknown value type, bad alignment, too many dims, tensor offset outside the file.
    let mut w = W::default();
    w.header(3, 0, 1).str("x").u32(13).u64(0);
    assert!(matches!(read(&w.0), Err(GgufError::Invalid { .. })));
    let mut w = W::default();
    w.header(3, 0, 1).kv_u32("general.alignment", 0).u64(0);
    assert!(matches!(read(&w.0), Err(GgufError::Invalid { .. })));
    let mut w = W::default();
    w.header(3, 1, 0).tensor("t", &[1, 1, 1, 1, 1], 0).data(32, 32);
    assert!(matches!(read(&w.0), Err(GgufError::Invalid { .. })));
    let mut w = W::default();
    w.header(3, 1, 0).tensor("t", &[4], 64).data(32, 64);
    assert!(matches!(read(&w.0), Err(GgufError::Truncated { .. })));
}

proptest! {
    #[test]
    fn random_bytes_after_magic_never_panic(
        tensors in prop_oneof![0u64..4, any::<u64>()],
        kvs in prop_oneof![0u64..8, any::<u64>()],
        tail in proptest::collection::vec(any::<u8>(), 0..600),
    ) {
        let mut w = W::default();
        w.header(3, tensors, kvs).0.extend_from_slice(&tail);
        let _ = read(&w.0);
        let mut raw = b"GGUF\x03\0\0\0".to_vec();
        raw.extend_from_slice(&tail);
        let _ = read(&raw);
    }
}

#[test]
fn gguf_real_model() {
    // Where scripts/fetch-model puts the demo model (scripts/test runs it first).
    let path = std::env::var_os("KILN_TEST_MODEL").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    if !path.is_file() {
        let msg = format!("SKIP gguf_real_model: model not found at {} (scripts/fetch-model)", path.display());
        assert!(std::env::var("KILN_REQUIRE_TOOLS").as_deref() != Ok("1"), "{msg}");
        println!("{msg}");
        return;
    }
    let info = read_header(&path).expect("real model header");
    println!("{info:#?}\nkv_cache_bytes(8192) = {:?}", info.kv_cache_bytes(8192));
    assert_eq!(info.architecture.as_deref(), Some("llama"));
    assert_eq!(info.block_count, Some(30));
    assert_eq!(info.embedding_length, Some(576));
    assert_eq!(info.head_count, Some(9));
    assert_eq!(info.head_count_kv, Some(3));
    assert_eq!(info.context_length, Some(8192));
    assert!(info.chat_template.as_deref().is_some_and(|t| t.contains("im_start")));
    assert!(info.tensor_data_bytes < info.file_size_bytes);
    assert_eq!(info.tensor_data_offset + info.tensor_data_bytes, info.file_size_bytes);
    // head_dim 576/9 = 64, n_embd_kv = 3*64 = 192: 2 * 30 * 8192 * 192 * 2 bytes.
    assert_eq!(info.kv_cache_bytes(8192), Some(188_743_680));
    // Q4_1 throughout: llama.cpp repacks nothing of it, on any CPU.
    assert_eq!(info.tensors.len() as u64, info.tensor_count);
    assert_eq!(info.repacked_bytes(Repack::X86Avx2), 0);
    assert_eq!(info.repacked_bytes(Repack::ArmDotprod), 0);
}
