//! Block maps (bmap format 2.0): which blocks of a sparse image hold data, with a sha256
//! per range, written byte for byte as Debian's bmaptool 3.6 writes them and read as it reads.
//!
//! The layout and the file checksum follow bmaptools/BmapCreate.py (`_bmap_file_start`,
//! `_bmap_file_end`) and bmaptools/BmapCopy.py (`_parse_bmap`, `_verify_bmap_checksum`).

use std::fs::File;
use std::io::{self, Write as _};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::sparse::data_ranges;

/// The bmap block size kiln writes. bmaptool asks the filesystem (FIGETBSZ); 4 KiB is what
/// ext4, xfs and btrfs answer, and any multiple of 512 is valid for readers.
pub const BLOCK_SIZE: u64 = 4096;
const VERSION: &str = "2.0";
const CHECKSUM_TYPE: &str = "sha256";
const CHECKSUM_HEX_LEN: usize = 64;
/// Reads of 1 MiB: a cold read-back with 128 KiB reads ran at ~0.4x the disk's speed here.
const HASH_BUFFER_BYTES: usize = 1 << 20;
/// Buffers in flight between the reading and the hashing thread.
const HASH_BUFFERS: usize = 4;

/// A block map: the image's size and the blocks worth copying.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bmap {
    pub image_size: u64,
    pub block_size: u64,
    pub ranges: Vec<BmapRange>,
}

/// Blocks `first_block..=last_block` and the sha256 (lowercase hex) of their bytes; the last
/// block of the image may be partial, and is hashed only up to the end of the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BmapRange {
    pub first_block: u64,
    pub last_block: u64,
    pub sha256: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BmapError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: the image is empty, there is nothing to map")]
    EmptyImage { path: PathBuf },
    #[error("{path}: not a well-formed bmap XML file")]
    Xml {
        path: PathBuf,
        #[source]
        source: roxmltree::Error,
    },
    #[error("{path}: {what}")]
    Invalid { path: PathBuf, what: String },
    #[error(
        "{path}: BmapFileChecksum is {expected} but the file hashes to {actual} \
         (it was edited or truncated; regenerate it)"
    )]
    Checksum { path: PathBuf, expected: String, actual: String },
}

impl Bmap {
    /// Blocks in the image, counting a partial last block.
    pub fn blocks_count(&self) -> u64 {
        self.image_size.div_ceil(self.block_size)
    }

    /// Blocks listed in the map.
    pub fn mapped_blocks(&self) -> u64 {
        self.ranges.iter().map(|r| r.last_block - r.first_block + 1).sum()
    }

    /// The `[start, end)` bytes of a range, cut at the end of the image.
    pub fn byte_range(&self, range: &BmapRange) -> (u64, u64) {
        let start = range.first_block * self.block_size;
        (start.min(self.image_size), ((range.last_block + 1) * self.block_size).min(self.image_size))
    }

    /// Bytes listed in the map, cut at the end of the image: what a copy writes.
    pub fn mapped_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| self.byte_range(r)).map(|(s, e)| e - s).sum()
    }
}

/// Maps `image` from its data ranges (rounded out to whole blocks) and hashes each range.
pub fn generate(image: &Path) -> Result<Bmap, BmapError> {
    let read_err = |source| BmapError::Read { path: image.to_path_buf(), source };
    let file = File::open(image).map_err(read_err)?;
    let image_size = file.metadata().map_err(read_err)?.len();
    if image_size == 0 {
        return Err(BmapError::EmptyImage { path: image.to_path_buf() });
    }
    let blocks_count = image_size.div_ceil(BLOCK_SIZE);
    let mut blocks: Vec<(u64, u64)> = Vec::new();
    for (start, end) in data_ranges(&file).map_err(read_err)? {
        let first = start / BLOCK_SIZE;
        let last = (end.div_ceil(BLOCK_SIZE) - 1).min(blocks_count - 1);
        match blocks.last_mut() {
            Some(prev) if prev.1 + 1 >= first => prev.1 = prev.1.max(last),
            _ => blocks.push((first, last)),
        }
    }
    let mut bmap = Bmap { image_size, block_size: BLOCK_SIZE, ranges: Vec::with_capacity(blocks.len()) };
    for (first_block, last_block) in blocks {
        let mut range = BmapRange { first_block, last_block, sha256: String::new() };
        let (start, end) = bmap.byte_range(&range);
        let mut hasher = Sha256::new();
        hash_file_range(&mut hasher, &file, start, end).map_err(read_err)?;
        range.sha256 = hex::encode(hasher.finalize());
        bmap.ranges.push(range);
    }
    Ok(bmap)
}

/// Feeds bytes `[start, end)` of `file` to `hasher`; a file shorter than `end` is an error.
///
/// The calling thread reads while a helper thread hashes the buffer read before, so a range
/// costs about the slower of the two instead of their sum.
pub(crate) fn hash_file_range(hasher: &mut Sha256, file: &File, start: u64, end: u64) -> io::Result<()> {
    let len = end.saturating_sub(start);
    if len <= HASH_BUFFER_BYTES as u64 {
        let mut buf = vec![0u8; usize::try_from(len).unwrap_or(HASH_BUFFER_BYTES)];
        file.read_exact_at(&mut buf, start)?;
        hasher.update(&buf);
        return Ok(());
    }
    pipelined(hasher, file, start, end, 1)
}

/// Bytes that reads through O_DIRECT must be aligned to (buffer, offset and length): the
/// largest logical block size of disks and filesystems kiln writes to.
pub(crate) const DIRECT_ALIGN: u64 = 4096;

/// Whether `[start, end)` can be read or written with O_DIRECT (offsets, lengths and buffer
/// addresses alike).
pub(crate) fn direct_aligned(start: u64, end: u64) -> bool {
    start.is_multiple_of(DIRECT_ALIGN) && end.is_multiple_of(DIRECT_ALIGN)
}

/// [`hash_file_range`] for a file opened with O_DIRECT: the device reads straight into
/// aligned buffers, without the page cache's copy. `start` and `end` must be multiples of
/// [`DIRECT_ALIGN`] (else InvalidInput); a filesystem without O_DIRECT fails with EINVAL.
pub(crate) fn hash_direct_range(hasher: &mut Sha256, file: &File, start: u64, end: u64) -> io::Result<()> {
    if !direct_aligned(start, end) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "O_DIRECT read of an unaligned range"));
    }
    pipelined(hasher, file, start, end, DIRECT_ALIGN as usize)
}

/// Reads `[start, end)` into HASH_BUFFERS rotating buffers, each used from its first byte
/// aligned to `align`, and hashes them on a helper thread.
fn pipelined(hasher: &mut Sha256, file: &File, start: u64, end: u64, align: usize) -> io::Result<()> {
    let window = |buf: &[u8]| buf.as_ptr().align_offset(align).min(align - 1);
    std::thread::scope(|scope| {
        let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<(Vec<u8>, usize)>(HASH_BUFFERS);
        let (empty_tx, empty_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(HASH_BUFFERS);
        for _ in 0..HASH_BUFFERS {
            let _ = empty_tx.send(vec![0u8; HASH_BUFFER_BYTES + align - 1]);
        }
        let helper = scope.spawn(move || {
            for (buf, n) in full_rx {
                let at = window(&buf);
                hasher.update(&buf[at..at + n]);
                // The reader is gone only when it stopped early; the buffer can go too.
                let _ = empty_tx.send(buf);
            }
        });
        let mut off = start;
        let mut read = Ok(());
        while off < end {
            let Ok(mut buf) = empty_rx.recv() else { break };
            let want = usize::try_from(end - off).unwrap_or(usize::MAX).min(HASH_BUFFER_BYTES);
            let at = window(&buf);
            if let Err(e) = file.read_exact_at(&mut buf[at..at + want], off) {
                read = Err(e);
                break;
            }
            if full_tx.send((buf, want)).is_err() {
                break;
            }
            off += want as u64;
        }
        drop(full_tx);
        let hashed = helper.join().map_err(|_| io::Error::other("the sha256 thread panicked"));
        read.and(hashed)
            .and_then(|()| if off < end { Err(io::Error::other("the sha256 thread stopped early")) } else { Ok(()) })
    })
}

/// The bmap file, laid out exactly as bmaptool 3.6 writes it (comments and padding
/// included), with `BmapFileChecksum` the sha256 of the file with that field all '0'.
pub fn to_xml(bmap: &Bmap) -> String {
    let blocks = bmap.blocks_count();
    let mapped = bmap.mapped_blocks();
    let image_human = human_size(bmap.image_size);
    let mut x = String::with_capacity(2048 + bmap.ranges.len() * 100);
    x += HEADER;
    x += &format!("<bmap version=\"{VERSION}\">\n");
    x += &format!("    <!-- Image size in bytes: {image_human} -->\n");
    x += &format!("    <ImageSize> {} </ImageSize>\n\n", bmap.image_size);
    x += "    <!-- Size of a block in bytes -->\n";
    x += &format!("    <BlockSize> {} </BlockSize>\n\n", bmap.block_size);
    x += "    <!-- Count of blocks in the image file -->\n";
    x += &format!("    <BlocksCount> {blocks} </BlocksCount>\n\n");
    // bmaptool writes placeholders here and overwrites them in place once it has counted
    // the mapped blocks; the padding that survives is part of the format's exact bytes.
    x += "    <!-- Count of mapped blocks: ";
    let mapped_comment_pos = x.len();
    x += &format!("{} or {}   -->\n", " ".repeat(image_human.len()), " ".repeat("100.0%".len()));
    x += "    <MappedBlocksCount> ";
    let mapped_count_pos = x.len();
    x += &format!("{} </MappedBlocksCount>\n\n", " ".repeat(blocks.to_string().len()));
    x += "    <!-- Type of checksum used in this file -->\n";
    x += &format!("    <ChecksumType> {CHECKSUM_TYPE} </ChecksumType>\n\n");
    x += "    <!-- The checksum of this bmap file. When it is calculated, the value of\n";
    x += "         the checksum has be zero (all ASCII \"0\" symbols).  -->\n";
    x += "    <BmapFileChecksum> ";
    let checksum_pos = x.len();
    x += &"0".repeat(CHECKSUM_HEX_LEN);
    x += " </BmapFileChecksum>\n\n";
    x += "    <!-- The block map which consists of elements which may either be a\n";
    x += "         range of blocks or a single block. The 'chksum' attribute\n";
    x += "         (if present) is the checksum of this blocks range. -->\n";
    x += "    <BlockMap>\n";
    for r in &bmap.ranges {
        if r.first_block == r.last_block {
            x += &format!("        <Range chksum=\"{}\"> {} </Range>\n", r.sha256, r.first_block);
        } else {
            x += &format!("        <Range chksum=\"{}\"> {}-{} </Range>\n", r.sha256, r.first_block, r.last_block);
        }
    }
    x += "    </BlockMap>\n</bmap>\n";
    let percent = (mapped as f64 * 100.0) / blocks as f64;
    overwrite(&mut x, mapped_comment_pos, &format!("{} or {percent:.1}%", human_size(mapped * bmap.block_size)));
    overwrite(&mut x, mapped_count_pos, &mapped.to_string());
    let checksum = hex::encode(Sha256::digest(x.as_bytes()));
    overwrite(&mut x, checksum_pos, &checksum);
    x
}

/// Generates the map of `image` and writes it to `bmap_path` atomically (a temporary file
/// in the same directory, fsync, rename, fsync of the directory).
pub fn write(image: &Path, bmap_path: &Path) -> Result<Bmap, BmapError> {
    let bmap = generate(image)?;
    let write_err = |source| BmapError::Write { path: bmap_path.to_path_buf(), source };
    let dir = match bmap_path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    // Readable as the image beside it is (0666 less the umask, as File::create makes it), not
    // tempfile's private 0600: whoever flashes the image reads its block map too.
    let mut tmp = tempfile::Builder::new()
        .prefix(".kiln-bmap-")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666))
        .tempfile_in(dir)
        .map_err(write_err)?;
    tmp.write_all(to_xml(&bmap).as_bytes()).map_err(write_err)?;
    tmp.as_file().sync_all().map_err(write_err)?;
    tmp.persist(bmap_path).map_err(|e| write_err(e.error))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(write_err)?;
    Ok(bmap)
}

/// Reads a bmap file and checks it the way bmaptool does before trusting it: the
/// `BmapFileChecksum`, then that counts and ranges agree with the image size.
pub fn read(path: &Path) -> Result<Bmap, BmapError> {
    let bytes = std::fs::read(path).map_err(|source| BmapError::Read { path: path.to_path_buf(), source })?;
    parse(&bytes, path)
}

/// Parses and checks bmap bytes; `path` names the file in errors.
pub fn parse(bytes: &[u8], path: &Path) -> Result<Bmap, BmapError> {
    let invalid = |what: String| BmapError::Invalid { path: path.to_path_buf(), what };
    let text = std::str::from_utf8(bytes).map_err(|e| invalid(format!("not UTF-8 text ({e})")))?;
    let doc = roxmltree::Document::parse(text).map_err(|source| BmapError::Xml { path: path.to_path_buf(), source })?;
    let root = doc.root_element();
    if root.tag_name().name() != "bmap" {
        return Err(invalid(format!("the root element is <{}>, expected <bmap>", root.tag_name().name())));
    }
    let version = root.attribute("version").unwrap_or("");
    let (major, minor) = version.split_once('.').unwrap_or((version, ""));
    if !(major == "2" || (major == "1" && minor == "4")) {
        return Err(invalid(format!("bmap version \"{version}\" is not supported (kiln reads 2.x and 1.4)")));
    }
    let field = |name: &str| -> Result<&str, BmapError> {
        let node = root.children().find(|n| n.has_tag_name(name));
        node.map(|n| n.text().unwrap_or("").trim()).ok_or_else(|| invalid(format!("<{name}> is missing")))
    };
    let number = |name: &str| -> Result<u64, BmapError> {
        let s = field(name)?;
        s.parse().map_err(|_| invalid(format!("<{name}> is \"{s}\", expected a whole number")))
    };
    let cs_type = field("ChecksumType")?;
    if cs_type != CHECKSUM_TYPE {
        return Err(invalid(format!("<ChecksumType> is \"{cs_type}\", kiln checks only {CHECKSUM_TYPE}")));
    }
    verify_file_checksum(bytes, field("BmapFileChecksum")?, path)?;

    let (image_size, block_size) = (number("ImageSize")?, number("BlockSize")?);
    if block_size == 0 || block_size % 512 != 0 {
        return Err(invalid(format!("<BlockSize> is {block_size}, expected a multiple of 512")));
    }
    let mut bmap = Bmap { image_size, block_size, ranges: Vec::new() };
    let blocks_count = number("BlocksCount")?;
    if blocks_count != bmap.blocks_count() {
        return Err(invalid(format!(
            "<BlocksCount> is {blocks_count} but {image_size} bytes make {} blocks of {block_size}",
            bmap.blocks_count()
        )));
    }
    let block_map =
        root.children().find(|n| n.has_tag_name("BlockMap")).ok_or_else(|| invalid("<BlockMap> is missing".into()))?;
    for node in block_map.children().filter(|n| n.has_tag_name("Range")) {
        let line = doc.text_pos_at(node.range().start).row;
        let range = parse_range(node, blocks_count).map_err(|what| invalid(format!("line {line}: {what}")))?;
        if let Some(prev) = bmap.ranges.last().filter(|p| p.last_block >= range.first_block) {
            return Err(invalid(format!(
                "line {line}: range {}-{} overlaps or precedes range {}-{}; ranges must ascend",
                range.first_block, range.last_block, prev.first_block, prev.last_block
            )));
        }
        bmap.ranges.push(range);
    }
    let mapped_count = number("MappedBlocksCount")?;
    if mapped_count != bmap.mapped_blocks() {
        return Err(invalid(format!(
            "<MappedBlocksCount> is {mapped_count} but the ranges hold {} blocks",
            bmap.mapped_blocks()
        )));
    }
    Ok(bmap)
}

fn parse_range(node: roxmltree::Node, blocks_count: u64) -> Result<BmapRange, String> {
    let text = node.text().unwrap_or("").trim();
    let block = |s: &str| s.trim().parse::<u64>().map_err(|_| format!("range \"{text}\" is not N or N-M"));
    let (first_block, last_block) = match text.split_once('-') {
        Some((a, b)) => (block(a)?, block(b)?),
        None => (block(text)?, block(text)?),
    };
    if first_block > last_block {
        return Err(format!("range \"{text}\" starts after it ends"));
    }
    if last_block >= blocks_count {
        return Err(format!("range \"{text}\" goes past the image's {blocks_count} blocks"));
    }
    // bmaptool allows a range without a checksum; kiln verifies every byte it writes.
    let sha256 = node.attribute("chksum").ok_or_else(|| format!("range \"{text}\" has no chksum attribute"))?;
    if sha256.len() != CHECKSUM_HEX_LEN || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("range \"{text}\" has chksum \"{sha256}\", expected 64 hex digits"));
    }
    Ok(BmapRange { first_block, last_block, sha256: sha256.to_ascii_lowercase() })
}

/// bmaptool's rule: replace the first occurrence of the stated checksum in the file with
/// '0's, hash the whole file, compare.
fn verify_file_checksum(bytes: &[u8], stated: &str, path: &Path) -> Result<(), BmapError> {
    let invalid = |what: String| BmapError::Invalid { path: path.to_path_buf(), what };
    if stated.len() != CHECKSUM_HEX_LEN || !stated.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(invalid(format!("<BmapFileChecksum> is \"{stated}\", expected 64 hex digits")));
    }
    let pos = bytes
        .windows(stated.len())
        .position(|w| w == stated.as_bytes())
        .ok_or_else(|| invalid("<BmapFileChecksum> is not written literally in the file (entities?)".into()))?;
    let mut zeroed = bytes.to_vec();
    zeroed[pos..pos + stated.len()].fill(b'0');
    let actual = hex::encode(Sha256::digest(&zeroed));
    if !actual.eq_ignore_ascii_case(stated) {
        return Err(BmapError::Checksum { path: path.to_path_buf(), expected: stated.into(), actual });
    }
    Ok(())
}

/// Replaces bytes at `pos` with `with`, as a write into the middle of a file does.
fn overwrite(s: &mut String, pos: usize, with: &str) {
    let end = (pos + with.len()).min(s.len());
    s.replace_range(pos..end, with);
}

/// bmaptools.BmapHelpers.human_size: "1 byte", "N bytes" under 512, else "%.1f KiB/MiB/...".
fn human_size(size: u64) -> String {
    if size == 1 {
        return "1 byte".into();
    }
    if size < 512 {
        return format!("{size} bytes");
    }
    let mut value = size as f64;
    for unit in ["KiB", "MiB", "GiB", "TiB"] {
        value /= 1024.0;
        if value < 1024.0 {
            return format!("{value:.1} {unit}");
        }
    }
    format!("{value:.1} EiB")
}

const HEADER: &str = r#"<?xml version="1.0" ?>
<!-- This file contains the block map for an image file, which is basically
     a list of useful (mapped) block numbers in the image file. In other words,
     it lists only those blocks which contain data (boot sector, partition
     table, file-system metadata, files, directories, extents, etc). These
     blocks have to be copied to the target device. The other blocks do not
     contain any useful data and do not have to be copied to the target
     device.

     The block map an optimization which allows to copy or flash the image to
     the image quicker than copying of flashing the entire image. This is
     because with bmap less data is copied: <MappedBlocksCount> blocks instead
     of <BlocksCount> blocks.

     Besides the machine-readable data, this file contains useful commentaries
     which contain human-readable information like image size, percentage of
     mapped data, etc.

     The 'version' attribute is the block map file format version in the
     'major.minor' format. The version major number is increased whenever an
     incompatible block map format change is made. The minor number changes
     in case of minor backward-compatible changes. -->

"#;

#[cfg(test)]
mod tests {
    use super::*;

    /// The pipelined range hash equals a one-shot sha256 of the same bytes, for ranges shorter
    /// than a buffer, of whole buffers, and of many buffers and a remainder; a range past the
    /// end of the file is an error, not a short hash.
    /// O_DIRECT reads land in aligned buffers and hash the same as buffered reads; an
    /// unaligned range is refused before any read.
    #[test]
    fn hash_direct_range_matches_a_one_shot_hash() {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..(HASH_BUFFER_BYTES * 3 + 5 * 4096)).map(|i| (i * 13 % 253) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let file = File::options().read(true).custom_flags(nix::libc::O_DIRECT).open(&path).unwrap();
        let (n, b, a) = (data.len() as u64, HASH_BUFFER_BYTES as u64, DIRECT_ALIGN);
        for (start, end) in [(0, a), (a, b + a), (0, n), (b - a, n - a)] {
            let mut h = Sha256::new();
            hash_direct_range(&mut h, &file, start, end).unwrap();
            let want = hex::encode(Sha256::digest(&data[start as usize..end as usize]));
            assert_eq!(hex::encode(h.finalize()), want, "{start}..{end}");
        }
        let err = hash_direct_range(&mut Sha256::new(), &file, 1, a).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(hash_direct_range(&mut Sha256::new(), &file, n - a, n + b).is_err());
    }

    #[test]
    fn the_block_map_gets_the_same_mode_as_a_file_the_build_creates() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("x.img");
        std::fs::write(&image, vec![7u8; 3 * 4096]).unwrap();
        write(&image, &dir.path().join("x.img.bmap")).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join("x.img.bmap")), mode(&image));
        assert_ne!(mode(&image) & 0o044, 0, "the umask here leaves files readable by others");
    }

    #[test]
    fn hash_file_range_matches_a_one_shot_hash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..(HASH_BUFFER_BYTES * 9 + 12_345)).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let file = File::open(&path).unwrap();
        let n = data.len() as u64;
        let b = HASH_BUFFER_BYTES as u64;
        for (start, end) in [(0, 0), (5, 100), (0, b), (1, b + 1), (0, n), (b / 2, n - 3), (3 * b, 7 * b)] {
            let mut h = Sha256::new();
            hash_file_range(&mut h, &file, start, end).unwrap();
            let want = hex::encode(Sha256::digest(&data[start as usize..end as usize]));
            assert_eq!(hex::encode(h.finalize()), want, "{start}..{end}");
        }
        assert!(hash_file_range(&mut Sha256::new(), &file, n - 10, n + b * 3).is_err());
    }
}
