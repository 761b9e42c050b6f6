//! Sparse files: where a file holds data (SEEK_DATA/SEEK_HOLE) and copies that keep holes.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use nix::errno::Errno;
use nix::fcntl::copy_file_range;
use nix::unistd::{Whence, lseek};

/// Bytes moved per positioned read and write.
const COPY_BUFFER_BYTES: usize = 4 << 20;

/// The `[start, end)` byte ranges of `file` that hold data, sorted and merged.
///
/// Uses `lseek(SEEK_DATA/SEEK_HOLE)` (see lseek(2)); a filesystem without it (EINVAL) is
/// treated as one full range, which is always correct, only slower. An empty file has none.
/// Moves the file offset: callers read with positioned I/O (`read_at`).
pub fn data_ranges(file: &File) -> io::Result<Vec<(u64, u64)>> {
    let size = file.metadata()?.len();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let start = match lseek(file, to_off(pos)?, Whence::SeekData) {
            Ok(off) => off as u64,
            // ENXIO: no data at or after `pos`, the rest of the file is a hole.
            Err(Errno::ENXIO) => break,
            Err(Errno::EINVAL) if pos == 0 => return Ok(vec![(0, size)]),
            Err(e) => return Err(e.into()),
        };
        let end = match lseek(file, to_off(start)?, Whence::SeekHole) {
            Ok(off) => (off as u64).min(size),
            // The file shrank under us: what is left ends here.
            Err(Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        if end <= start {
            break;
        }
        match ranges.last_mut() {
            Some(last) if last.1 >= start => last.1 = last.1.max(end),
            _ => ranges.push((start, end)),
        }
        pos = end;
    }
    Ok(ranges)
}

/// Copies `len` bytes of `src` at `src_off` to `dst` at `dst_off`, skipping the holes of
/// `src` so the destination keeps them. Returns the bytes actually copied.
///
/// In the kernel with copy_file_range(2) where it can (page cache to page cache, no copy
/// through user space; a reflink on filesystems that share extents), else positioned reads and
/// writes in 4 MiB buffers: a block-device destination, or files on two filesystems.
///
/// Only holes are skipped, not zero-filled data: a destination that is not fresh (a block
/// device, an old file) keeps its old bytes where `src` has holes. Bytes past the end of
/// `src` are treated as a hole.
pub fn copy_ranges(src: &File, src_off: u64, dst: &File, dst_off: u64, len: u64) -> io::Result<u64> {
    let end = src_off.checked_add(len).ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut copied = 0u64;
    let mut buf = Vec::new();
    let mut in_kernel = true;
    for (start, stop) in data_ranges(src)? {
        let (start, stop) = (start.max(src_off), stop.min(end));
        let mut off = start;
        while off < stop {
            let want = usize::try_from(stop - off).unwrap_or(usize::MAX).min(COPY_BUFFER_BYTES);
            let n = if in_kernel {
                let (mut from, mut to) = (to_off(off)?, to_off(dst_off + (off - src_off))?);
                match copy_file_range(src, Some(&mut from), dst, Some(&mut to), want) {
                    Ok(n) => n,
                    // Not between these two files (EXDEV, EINVAL for a block device, ...): the
                    // same bytes through user space, from here on.
                    Err(Errno::EXDEV | Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP | Errno::EBADF) => {
                        in_kernel = false;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
            } else {
                buf.resize(want, 0);
                let n = src.read_at(&mut buf, off)?;
                dst.write_all_at(&buf[..n], dst_off + (off - src_off))?;
                n
            };
            if n == 0 {
                // `src` ended early (it shrank): nothing more to copy.
                return Ok(copied);
            }
            off += n as u64;
            copied += n as u64;
        }
    }
    Ok(copied)
}

fn to_off(pos: u64) -> io::Result<i64> {
    i64::try_from(pos).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn sparse_file(size: u64, islands: &[(u64, &[u8])]) -> File {
        let f = tempfile::tempfile().unwrap();
        f.set_len(size).unwrap();
        for (off, data) in islands {
            f.write_all_at(data, *off).unwrap();
        }
        f
    }

    #[test]
    fn data_ranges_finds_islands_in_holes() {
        let f = sparse_file(8 * MIB, &[(MIB, &[1; 4096]), (5 * MIB, &[2; 8192])]);
        let ranges = data_ranges(&f).unwrap();
        // Filesystems may round to their block size; islands must be covered, holes kept.
        assert_eq!(ranges.len(), 2, "{ranges:?}");
        assert!(ranges[0].0 <= MIB && ranges[0].1 >= MIB + 4096 && ranges[0].1 < 2 * MIB, "{ranges:?}");
        assert!(ranges[1].0 <= 5 * MIB && ranges[1].1 >= 5 * MIB + 8192, "{ranges:?}");
    }

    #[test]
    fn data_ranges_of_empty_and_all_hole_files() {
        assert!(data_ranges(&sparse_file(0, &[])).unwrap().is_empty());
        assert!(data_ranges(&sparse_file(4 * MIB, &[])).unwrap().is_empty());
    }

    #[test]
    fn copy_ranges_keeps_holes_and_copies_data() {
        let src = sparse_file(4 * MIB, &[(0, b"head"), (3 * MIB, &[7; 100])]);
        let dst = tempfile::tempfile().unwrap();
        dst.set_len(5 * MIB).unwrap();
        let copied = copy_ranges(&src, 0, &dst, MIB, 4 * MIB).unwrap();
        assert!((104..4 * MIB).contains(&copied), "copied {copied}");
        let mut got = vec![0u8; 4];
        dst.read_exact_at(&mut got, MIB).unwrap();
        assert_eq!(got, b"head");
        let mut got = vec![0u8; 100];
        dst.read_exact_at(&mut got, 4 * MIB).unwrap();
        assert_eq!(got, vec![7; 100]);
        let holes = data_ranges(&dst).unwrap();
        assert!(holes.iter().all(|&(s, e)| e - s < MIB), "destination lost its holes: {holes:?}");
    }

    /// /dev/shm (tmpfs) to an unnamed file in the crate directory (another filesystem): copy_file_range
    /// refuses (EXDEV) and the copy goes through user space, with the same result.
    #[test]
    fn copy_ranges_between_two_filesystems_copies_the_same_bytes() {
        let Ok(src) = tempfile::tempfile_in("/dev/shm") else { return };
        let dst = tempfile::tempfile_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        src.set_len(9 * MIB).unwrap();
        let data: Vec<u8> = (0..5 * MIB + 123).map(|i| (i % 251) as u8).collect();
        src.write_all_at(&data, 2 * MIB).unwrap();
        let copied = copy_ranges(&src, 0, &dst, 4096, 9 * MIB).unwrap();
        assert!(copied >= data.len() as u64, "copied {copied}");
        let mut got = vec![0u8; data.len()];
        dst.read_exact_at(&mut got, 2 * MIB + 4096).unwrap();
        assert!(got == data, "the bytes differ");
    }

    #[test]
    fn copy_ranges_copies_only_the_window() {
        let src = sparse_file(2 * MIB, &[(0, &[9; 8192])]);
        let dst = tempfile::tempfile().unwrap();
        let copied = copy_ranges(&src, 4096, &dst, 0, 100).unwrap();
        assert_eq!(copied, 100);
        assert_eq!(dst.metadata().unwrap().len(), 100);
    }
}
