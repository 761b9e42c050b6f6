//! Page-cache mode, for when no tmpfs is configured: warm a model file into the page cache
//! and measure how much of it is resident (mincore(2) over a read-only mapping).

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsFd;
use std::path::Path;
use std::time::Instant;

use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};

use super::copy::{CHUNK_BYTES, advise_sequential};
use super::error::{IoContext, StoreError};

/// How much of a file sits in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Residency {
    /// Bytes of the file in resident pages (a whole last page counts as the file's tail).
    pub resident_bytes: u64,
    /// Length of the file.
    pub total_bytes: u64,
}

impl Residency {
    /// True when every page of the file is resident.
    pub fn is_complete(&self) -> bool {
        self.resident_bytes >= self.total_bytes
    }
}

/// Asks the kernel to read `path` into the page cache (WILLNEED), then reads through it
/// if pages are still missing, and returns the residency measured afterwards.
pub fn warm_page_cache(path: &Path) -> Result<Residency, StoreError> {
    let started = Instant::now();
    let mut file = File::open(path).at("opening", path)?;
    // A hint: when it is refused, the read-through below does the work.
    let _ = posix_fadvise(file.as_fd(), 0, 0, PosixFadviseAdvice::POSIX_FADV_WILLNEED);
    if residency(path).is_ok_and(|r| r.is_complete()) {
        return residency(path);
    }
    advise_sequential(&file);
    let mut buf = vec![0; CHUNK_BYTES];
    let mut bytes: u64 = 0;
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => bytes += n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(StoreError::io("reading", path, e)),
        }
    }
    tracing::info!(path = %path.display(), tier = "page-cache", bytes,
        duration_ms = started.elapsed().as_millis() as u64, "page cache warmed");
    residency(path)
}

/// Measures how much of `path` is in the page cache (or in tmpfs memory).
pub fn residency(path: &Path) -> Result<Residency, StoreError> {
    let file = File::open(path).at("opening", path)?;
    let total_bytes = file.metadata().at("reading metadata of", path)?.len();
    if total_bytes == 0 {
        return Ok(Residency { resident_bytes: 0, total_bytes });
    }
    let (pages, page_bytes) = resident_pages(&file).at("measuring residency of", path)?;
    Ok(Residency { resident_bytes: (pages * page_bytes).min(total_bytes), total_bytes })
}

/// Returns (resident pages, page size) of a non-empty file via mincore(2).
#[allow(unsafe_code)]
fn resident_pages(file: &File) -> io::Result<(u64, u64)> {
    // SAFETY: the mapping is read-only and never dereferenced here: only its address is
    // handed to mincore, so a concurrent truncate cannot fault us. sysconf and mincore
    // are plain syscalls; `vec` has one byte per page of the mapping, as mincore needs.
    unsafe {
        let map = memmap2::Mmap::map(file)?;
        let page_bytes = match nix::libc::sysconf(nix::libc::_SC_PAGESIZE) {
            n if n > 0 => n as usize,
            _ => return Err(io::Error::last_os_error()),
        };
        let mut vec = vec![0u8; map.len().div_ceil(page_bytes)];
        let addr = map.as_ptr() as *mut nix::libc::c_void;
        if nix::libc::mincore(addr, map.len(), vec.as_mut_ptr()) != 0 {
            return Err(io::Error::last_os_error());
        }
        let resident = vec.iter().filter(|b| **b & 1 == 1).count() as u64;
        Ok((resident, page_bytes as u64))
    }
}
