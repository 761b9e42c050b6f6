//! The copy engine. A hot-tier copy is done in the kernel (sendfile(2), no user-space
//! copy) while a second thread hashes each chunk just written, read back from the target:
//! measured here (98 MB store file in the page cache to tmpfs) that is ~0.93x `cat`'s wall
//! time for a whole `kilnd prewarm`, where reading into a buffer, writing it and hashing it
//! was ~0.74x. Everything else (imports, fetches, hashing a file) reads a chunk, writes it,
//! and hashes it on a second thread, so the hash overlaps the next read and write.
//! The hash is SHA-256 (the spec's), BLAKE3 (the store's check digest, see `persistent`),
//! or both in one pass ([`Digests`]).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};
use nix::sys::sendfile::sendfile;
use sha2::{Digest, Sha256};

use super::error::{IoContext, StoreError};

/// Chunk size of an unthrottled copy, as coreutils `cat` uses: the buffer stays in the CPU's
/// L2 while it is read into, written out and handed to the hashing core. Measured here
/// (98 MB tmpfs to tmpfs, best of 7): 128 KiB x 4 buffers 1,545 MB/s, 4 MiB x 3 1,350 MB/s,
/// 64 KiB 1,450, 192 KiB 1,490; more buffers in flight were slower (8: 1,200). The prewarm
/// benchmark with a cold page cache (reads from the disk) got faster too: 841 -> 996 MB/s.
pub(crate) const CHUNK_BYTES: usize = 128 << 10;
/// Buffers in flight: one being read/written, one or two being hashed, one spare.
pub(crate) const BUFFERS: usize = 4;
/// Chunk size of an unthrottled copy checked with BLAKE3 alone. BLAKE3 hashes ~6 GB/s here
/// (AVX-512), so the hashing core waits on the copying one and what is left to save is the
/// hand-over per chunk: measured here (98 MB to tmpfs, pipelined, median of 5): 128 KiB x 4
/// 1,650 MB/s, 256 KiB x 2 1,970, 512 KiB x 4 1,980, 1 MiB x 2 1,900; cat 2,050.
pub(crate) const BLAKE3_CHUNK_BYTES: usize = 256 << 10;
/// Buffers in flight for a BLAKE3-checked copy (the hash keeps up, so two suffice).
pub(crate) const BLAKE3_BUFFERS: usize = 2;

/// A running hash the copy engine feeds: SHA-256, BLAKE3 or both.
pub(crate) trait ChunkHash: Send + 'static {
    fn update(&mut self, data: &[u8]);
}

impl ChunkHash for Sha256 {
    fn update(&mut self, data: &[u8]) {
        Digest::update(self, data);
    }
}

impl ChunkHash for blake3::Hasher {
    fn update(&mut self, data: &[u8]) {
        blake3::Hasher::update(self, data);
    }
}

/// SHA-256 and BLAKE3 of the same bytes in one pass: what the store records when a model
/// comes in (the spec's SHA-256 decides; the BLAKE3 becomes the store's check digest).
#[derive(Clone, Default)]
pub(crate) struct Digests {
    pub(crate) sha256: Sha256,
    pub(crate) blake3: blake3::Hasher,
}

impl ChunkHash for Digests {
    fn update(&mut self, data: &[u8]) {
        Digest::update(&mut self.sha256, data);
        self.blake3.update(data);
    }
}

impl Digests {
    /// Both digests as lowercase hex: `(sha256, blake3)`.
    pub(crate) fn hex(&self) -> (String, String) {
        (hex::encode(self.sha256.clone().finalize()), self.blake3.finalize().to_hex().to_string())
    }
}
/// Chunk of an unthrottled in-kernel copy ([`Pump::run_in_kernel`]): one sendfile(2) call.
pub(crate) const KERNEL_COPY_CHUNK_BYTES: usize = 1 << 20;
/// Chunks the in-kernel copy may run ahead of the hashing thread.
const KERNEL_COPY_CHUNKS_AHEAD: usize = 2;
/// How far ahead of an unthrottled in-kernel copy its source is asked into the page cache
/// (POSIX_FADV_WILLNEED, a chunk at a time), so that the disk always has the next reads
/// queued while sendfile copies. Measured with `kilnd prewarm --now` from a store whose page
/// cache was dropped, against the same binary without it, interleaved: 1,225 against 992 MB/s
/// (31 rounds), its slowest round 917 MB/s against 673; in a period when the VM's disk read
/// slower, 866 against 903 (11 rounds, within the noise). A throttled copy is left to the
/// kernel's own readahead: it is meant to stay out of the disk's way.
const KERNEL_COPY_READAHEAD_BYTES: u64 = 4 << 20;
/// The hashing thread reads a copied chunk back in pieces of this size (kept in L2).
const READ_BACK_BYTES: usize = 256 << 10;
/// Smallest chunk of a throttled copy, so the syscall count stays sane.
const MIN_THROTTLED_CHUNK_BYTES: usize = 64 << 10;
/// Longest single sleep of a throttled copy, so a cancel is seen promptly.
const MAX_SLEEP: Duration = Duration::from_millis(20);

/// Hashes filled buffers on a helper thread and hands them back for reuse.
pub(crate) struct PipelinedHasher<H = Sha256> {
    full: Option<SyncSender<(Vec<u8>, usize)>>,
    empty: Receiver<Vec<u8>>,
    allocated: usize,
    buffers: usize,
    chunk_bytes: usize,
    worker: Option<JoinHandle<H>>,
}

impl<H: ChunkHash> PipelinedHasher<H> {
    /// Starts the hashing thread, seeded with `prefix` (state of bytes already hashed).
    pub(crate) fn new(chunk_bytes: usize, prefix: H) -> io::Result<Self> {
        Self::with_buffers(chunk_bytes, BUFFERS, prefix)
    }

    /// As `new`, with `buffers` chunks in flight.
    pub(crate) fn with_buffers(chunk_bytes: usize, buffers: usize, prefix: H) -> io::Result<Self> {
        let buffers = buffers.max(1);
        let (full_tx, full_rx) = sync_channel::<(Vec<u8>, usize)>(buffers);
        let (empty_tx, empty_rx) = sync_channel::<Vec<u8>>(buffers);
        let worker = std::thread::Builder::new().name("kiln-hash".into()).spawn(move || {
            let mut hasher = prefix;
            for (buf, len) in full_rx {
                hasher.update(&buf[..len]);
                // The receiver is gone only when the pump gave up; the buffer can go too.
                let _ = empty_tx.send(buf);
            }
            hasher
        })?;
        Ok(PipelinedHasher {
            full: Some(full_tx),
            empty: empty_rx,
            allocated: 0,
            buffers,
            chunk_bytes,
            worker: Some(worker),
        })
    }

    /// A buffer of `chunk_bytes` to read into: a returned one, a new one, or the next to
    /// come back from the hashing thread.
    fn buffer(&mut self) -> Vec<u8> {
        match self.empty.try_recv() {
            Ok(buf) => return buf,
            Err(TryRecvError::Empty) if self.allocated < self.buffers => {}
            Err(TryRecvError::Empty) => {
                if let Ok(buf) = self.empty.recv() {
                    return buf;
                }
            }
            Err(TryRecvError::Disconnected) => {}
        }
        self.allocated += 1;
        vec![0; self.chunk_bytes]
    }

    fn submit(&mut self, buf: Vec<u8>, len: usize) {
        if let Some(tx) = &self.full
            && tx.send((buf, len)).is_err()
        {
            // The worker died; `finish` reports it.
            self.full = None;
        }
    }

    /// Waits for the hashing thread and returns its state, to go on hashing later.
    pub(crate) fn into_state(mut self) -> io::Result<H> {
        let healthy = self.full.take().is_some();
        self.worker
            .take()
            .and_then(|w| w.join().ok())
            .filter(|_| healthy)
            .ok_or_else(|| io::Error::other("the hashing thread died"))
    }
}

impl<H> std::fmt::Debug for PipelinedHasher<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PipelinedHasher").field("chunk_bytes", &self.chunk_bytes).finish_non_exhaustive()
    }
}

/// How a pump runs: throttle, cancel flag, and progress reporting as `(done, total)`.
pub(crate) struct Pump<'a> {
    pub(crate) total_bytes: u64,
    pub(crate) rate_limit_bytes_per_sec: Option<u64>,
    pub(crate) cancel: Option<&'a AtomicBool>,
    pub(crate) progress: &'a dyn Fn(u64, u64),
}

/// Why a pump stopped early. The caller knows the paths and maps these to `StoreError`.
#[derive(Debug)]
pub(crate) enum PumpError {
    Read(io::Error),
    Write(io::Error),
    Cancelled,
}

/// Why an in-kernel copy ([`Pump::run_in_kernel`]) stopped early.
#[derive(Debug)]
pub(crate) enum KernelCopyError<H> {
    Pump(PumpError),
    /// Reading the copy back to hash it failed.
    ReadBack(io::Error),
    /// The kernel cannot copy between these files (sendfile(2) refused before any byte
    /// moved): copy them through user space, starting from the state handed back.
    Unsupported(H),
}

impl Pump<'_> {
    /// The chunk size for this pump: smaller when throttled so the rate stays smooth.
    pub(crate) fn chunk_bytes(&self) -> usize {
        match self.rate_limit_bytes_per_sec {
            Some(rate) => {
                usize::try_from(rate / 8).unwrap_or(CHUNK_BYTES).clamp(MIN_THROTTLED_CHUNK_BYTES, CHUNK_BYTES)
            }
            None => CHUNK_BYTES,
        }
    }

    fn cancelled(&self) -> bool {
        self.cancel.is_some_and(|c| c.load(Ordering::Relaxed))
    }

    /// Reads `src` to its end; writes each chunk to `dst` (when given) and then hands it
    /// to `hasher`. `done` counts the bytes written and hashed, also when this fails.
    pub(crate) fn run<H: ChunkHash>(
        &self,
        src: &mut dyn Read,
        mut dst: Option<&mut File>,
        hasher: &mut PipelinedHasher<H>,
        done: &mut u64,
    ) -> Result<(), PumpError> {
        let start = Instant::now();
        let mut pumped: u64 = 0;
        loop {
            if self.cancelled() {
                return Err(PumpError::Cancelled);
            }
            let mut buf = hasher.buffer();
            let len = loop {
                match src.read(&mut buf) {
                    Ok(len) => break len,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(PumpError::Read(e)),
                }
            };
            if len == 0 {
                return Ok(());
            }
            if let Some(dst) = dst.as_deref_mut() {
                dst.write_all(&buf[..len]).map_err(PumpError::Write)?;
            }
            hasher.submit(buf, len);
            *done += len as u64;
            pumped += len as u64;
            (self.progress)(*done, self.total_bytes);
            self.throttle(start, pumped)?;
        }
    }

    /// Copies `src` to `dst` (both at offset 0, `src` to its end) in the kernel: sendfile(2)
    /// moves each chunk from the page cache to `dst` with no user-space copy, while a second
    /// thread reads back the chunk just written (its pages still in the CPU's cache) and
    /// hashes it into `state`. The hash therefore covers what landed in `dst`, one chunk
    /// behind the copy; cancel, throttle and progress work as in [`Pump::run`]. Returns the
    /// final state. `dst` must be open for reading too.
    pub(crate) fn run_in_kernel<H: ChunkHash>(
        &self,
        src: &File,
        dst: &File,
        chunk_bytes: usize,
        state: H,
        done: &mut u64,
    ) -> Result<H, KernelCopyError<H>> {
        let start = Instant::now();
        let mut offset: i64 = 0;
        let readahead = self.rate_limit_bytes_per_sec.is_none_or(|r| r == 0);
        let mut advised: u64 = 0;
        std::thread::scope(|scope| {
            let (tx, rx) = sync_channel::<(u64, usize)>(KERNEL_COPY_CHUNKS_AHEAD);
            let hasher = std::thread::Builder::new()
                .name("kiln-hash".into())
                .spawn_scoped(scope, move || -> io::Result<H> {
                    let mut state = state;
                    let mut buf = vec![0u8; READ_BACK_BYTES];
                    for (at, len) in rx {
                        let mut piece_at = at;
                        while piece_at < at + len as u64 {
                            let n = READ_BACK_BYTES.min((at + len as u64 - piece_at) as usize);
                            dst.read_exact_at(&mut buf[..n], piece_at)?;
                            state.update(&buf[..n]);
                            piece_at += n as u64;
                        }
                    }
                    Ok(state)
                })
                .map_err(|e| KernelCopyError::Pump(PumpError::Write(e)))?;
            let copied = (|| loop {
                if self.cancelled() {
                    return Err(Some(PumpError::Cancelled));
                }
                let at = offset as u64;
                if readahead {
                    let want = (at + KERNEL_COPY_READAHEAD_BYTES).min(self.total_bytes);
                    // A chunk's worth at a time, and the file's last piece however short.
                    if want > advised && (want - advised >= chunk_bytes as u64 || want == self.total_bytes) {
                        // A hint: refused, the kernel's own readahead still reads ahead.
                        let _ = posix_fadvise(
                            src.as_fd(),
                            advised as i64,
                            (want - advised) as i64,
                            PosixFadviseAdvice::POSIX_FADV_WILLNEED,
                        );
                        advised = want;
                    }
                }
                let len = match sendfile(dst.as_fd(), src.as_fd(), Some(&mut offset), chunk_bytes) {
                    Ok(len) => len,
                    Err(Errno::EINTR) => continue,
                    // A source without a page cache (a pipe: ESPIPE) or a filesystem that cannot splice.
                    Err(Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP | Errno::ESPIPE) if at == 0 => {
                        return Err(None);
                    }
                    // sendfile does not say which side failed: out of room is the target's.
                    Err(e @ (Errno::ENOSPC | Errno::EDQUOT | Errno::EFBIG | Errno::EROFS)) => {
                        return Err(Some(PumpError::Write(e.into())));
                    }
                    Err(e) => return Err(Some(PumpError::Read(e.into()))),
                };
                if len == 0 {
                    return Ok(());
                }
                if tx.send((at, len)).is_err() {
                    return Ok(()); // the hasher failed: its error is reported below
                }
                *done += len as u64;
                (self.progress)(*done, self.total_bytes);
                self.throttle(start, *done).map_err(Some)?;
            })();
            drop(tx);
            let hashed = hasher.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            match (copied, hashed) {
                // Nothing was sent to the hasher: its state is the one it was given.
                (Err(None), Ok(state)) => Err(KernelCopyError::Unsupported(state)),
                (Err(Some(e)), _) => Err(KernelCopyError::Pump(e)),
                (_, Err(e)) => Err(KernelCopyError::ReadBack(e)),
                (Ok(()), Ok(state)) => Ok(state),
            }
        })
    }

    /// Sleeps until `pumped` bytes are due at the rate limit, in slices, watching `cancel`.
    fn throttle(&self, start: Instant, pumped: u64) -> Result<(), PumpError> {
        let Some(rate) = self.rate_limit_bytes_per_sec.filter(|r| *r > 0) else {
            return Ok(());
        };
        let due = Duration::from_secs_f64(pumped as f64 / rate as f64);
        loop {
            if self.cancelled() {
                return Err(PumpError::Cancelled);
            }
            let elapsed = start.elapsed();
            if elapsed >= due {
                return Ok(());
            }
            std::thread::sleep((due - elapsed).min(MAX_SLEEP));
        }
    }
}

/// Tells the kernel we read `file` front to back (doubles readahead). A hint only.
pub(crate) fn advise_sequential(file: &File) {
    let _ = posix_fadvise(file.as_fd(), 0, 0, PosixFadviseAdvice::POSIX_FADV_SEQUENTIAL);
}

/// Hashes the whole file at `path` with SHA-256; returns the hex digest and the length read.
pub(crate) fn hash_file(path: &Path) -> Result<(String, u64), StoreError> {
    let (state, done) = hash_file_with(path, CHUNK_BYTES, Sha256::new())?;
    Ok((hex::encode(state.finalize()), done))
}

/// Hashes the whole file at `path` with BLAKE3; returns the hex digest and the length read.
pub(crate) fn blake3_file(path: &Path) -> Result<(String, u64), StoreError> {
    let (state, done) = hash_file_with(path, BLAKE3_CHUNK_BYTES, blake3::Hasher::new())?;
    Ok((state.finalize().to_hex().to_string(), done))
}

/// Feeds the whole file at `path` to `state`; returns it and the length read.
pub(crate) fn hash_file_with<H: ChunkHash>(path: &Path, chunk_bytes: usize, state: H) -> Result<(H, u64), StoreError> {
    let mut file = File::open(path).at("opening", path)?;
    advise_sequential(&file);
    let total_bytes = file.metadata().at("reading metadata of", path)?.len();
    let pump = Pump { total_bytes, rate_limit_bytes_per_sec: None, cancel: None, progress: &|_, _| {} };
    let mut hasher = PipelinedHasher::new(chunk_bytes, state).at("starting a hasher for", path)?;
    let mut done = 0;
    match pump.run(&mut file, None, &mut hasher, &mut done) {
        Ok(()) => {}
        Err(PumpError::Read(e) | PumpError::Write(e)) => {
            return Err(StoreError::io("reading", path, e));
        }
        Err(PumpError::Cancelled) => return Err(StoreError::Cancelled),
    }
    let state = hasher.into_state().at("hashing", path)?;
    Ok((state, done))
}
