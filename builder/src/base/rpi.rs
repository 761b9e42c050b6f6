//! A Raspberry Pi OS image as a base: verify its sha256, decompress (.img, .img.xz, .img.zst)
//! sparsely, read its partition table and keep its FAT boot and ext4 root partitions as files.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

use super::{BaseError, BaseInfo, Boot, CACHE_FORMAT, Cache, Prepared, io, load_cached, publish, staging_for};
use crate::image::{partition, sparse};

/// Progress of a long step: (what, done bytes, total bytes).
pub type Progress<'a> = &'a dyn Fn(&str, u64, u64);

const CHUNK: usize = 1 << 20;

/// The cached base for an image pinned by `sha256`, preparing it if needed.
pub fn prepare(image: &Path, sha256: &str, cache: &Cache, progress: Progress<'_>) -> Result<Prepared, BaseError> {
    let key = format!("rpi-{}", &sha256[..32.min(sha256.len())]);
    let dir = cache.base_dir(&key);
    if let Some(p) = load_cached(&dir)? {
        return Ok(p);
    }
    let staging = staging_for(&dir)?;
    let result = unpack(image, sha256, &staging, progress)
        .and_then(|boot| publish(&staging, &dir, BaseInfo { format: CACHE_FORMAT.into(), key, boot }));
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    result
}

fn unpack(image: &Path, sha256: &str, staging: &Path, progress: Progress<'_>) -> Result<Boot, BaseError> {
    verify(image, sha256, progress)?;
    let raw = staging.join("base.img");
    decompress(image, &raw, progress)?;
    let table = partition::read(&raw)?;
    let layout = |message: &str| BaseError::Layout { path: image.to_path_buf(), message: message.into() };
    let is_fat = |t: &str| {
        matches!(t.to_lowercase().as_str(), "b" | "c" | "e" | "ef") || t.eq_ignore_ascii_case(partition::GPT_ESP)
    };
    let is_linux = |t: &str| {
        t == "83"
            || t.eq_ignore_ascii_case("0FC63DAF-8483-4772-8E79-3D69D8477DE4")
            || t.eq_ignore_ascii_case(partition::GPT_ROOT_AARCH64)
    };
    let boot_index = table
        .parts
        .iter()
        .position(|p| is_fat(&p.type_id))
        .ok_or_else(|| layout("no FAT boot partition (type c) in its partition table"))?;
    let root_index = table
        .parts
        .iter()
        .position(|p| is_linux(&p.type_id))
        .ok_or_else(|| layout("no Linux root partition (type 83) in its partition table"))?;
    let src = File::open(&raw).map_err(io(&raw))?;
    for (index, name) in [(boot_index, "boot.vfat"), (root_index, "root.ext4")] {
        let p = &table.parts[index];
        let out_path = staging.join(name);
        let out = File::create(&out_path).map_err(io(&out_path))?;
        out.set_len(p.size_bytes).map_err(io(&out_path))?;
        sparse::copy_ranges(&src, p.start_bytes, &out, 0, p.size_bytes).map_err(io(&out_path))?;
        out.sync_all().map_err(io(&out_path))?;
    }
    drop(src);
    std::fs::remove_file(&raw).map_err(io(&raw))?;
    let magic = crate::image::ext4::geometry(&staging.join("root.ext4"))
        .map_err(|e| layout(&format!("partition {} is not ext4: {e}", root_index + 1)))?;
    if magic.0 == 0 {
        return Err(layout(&format!("partition {} is not an ext4 filesystem", root_index + 1)));
    }
    Ok(Boot::Rpi { table: (&table).into(), boot_index, root_index })
}

/// Reads the whole file once, checking its sha256 against the pin.
fn verify(image: &Path, expected: &str, progress: Progress<'_>) -> Result<(), BaseError> {
    let mut f = File::open(image).map_err(io(image))?;
    let total = f.metadata().map_err(io(image))?.len();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io(image))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        done += n as u64;
        progress("verifying base image", done, total);
    }
    let actual = hex::encode(h.finalize());
    if actual != expected {
        return Err(BaseError::Hash { path: image.to_path_buf(), expected: expected.into(), actual });
    }
    Ok(())
}

/// Decompresses by extension, writing zero blocks as holes so the copy stays sparse.
fn decompress(image: &Path, out_path: &Path, progress: Progress<'_>) -> Result<(), BaseError> {
    let f = File::open(image).map_err(io(image))?;
    let total = f.metadata().map_err(io(image))?.len();
    let name = image.to_string_lossy();
    let mut reader: Box<dyn Read> = if name.ends_with(".xz") {
        Box::new(xz2::read::XzDecoder::new_multi_decoder(BufReader::new(f)))
    } else if name.ends_with(".zst") {
        Box::new(zstd::stream::read::Decoder::new(f).map_err(io(image))?)
    } else {
        Box::new(f)
    };
    let mut out = File::create(out_path).map_err(io(out_path))?;
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0u64;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            let n = reader.read(&mut buf[filled..]).map_err(io(image))?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        if buf[..filled].iter().all(|b| *b == 0) {
            out.seek(SeekFrom::Current(filled as i64)).map_err(io(out_path))?;
        } else {
            out.write_all(&buf[..filled]).map_err(io(out_path))?;
        }
        written += filled as u64;
        progress("unpacking base image", written, total.max(written));
    }
    out.set_len(written).map_err(io(out_path))?;
    out.sync_all().map_err(io(out_path))?;
    Ok(())
}
