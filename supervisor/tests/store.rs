//! The model store and the hot tier on real files: a real HTTP server on localhost that
//! drops connections, a child process killed mid-copy, and (where mounting works) a real
//! tmpfs that fills up.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_supervisor::store::{CopyOptions, FetchOptions, HotTier, Store, StoreError, residency, warm_page_cache};
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;
const REAL_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/models/SmolLM2-135M-Instruct.Q4_1.gguf");
const REAL_MODEL_SHA: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
/// Selects the helper mode of `child_promote_helper`: the hot tier directory to copy into.
const CHILD_ENV: &str = "KILN_STORE_CHILD";

fn no_progress(_: u64, _: u64) {}

fn sha_of(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn blake3_of(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// Deterministic bytes that do not compress or repeat (xorshift).
fn pattern(len: u64, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes `len` pattern bytes to `dir/name`; returns the path and its sha256.
fn model_file(dir: &Path, name: &str, len: u64) -> (PathBuf, String) {
    let bytes = pattern(len, len ^ name.len() as u64);
    let path = dir.join(name);
    std::fs::write(&path, &bytes).expect("writing a model file");
    (path, sha_of(&bytes))
}

/// Names in `dir` that start with a dot: part files and temporary copies.
fn hidden_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("listing a directory")
        .map(|e| e.expect("reading a directory entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

fn require_tools() -> bool {
    std::env::var("KILN_REQUIRE_TOOLS").is_ok_and(|v| v == "1")
}

#[test]
fn import_good_file_lands_under_final_name() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, sha) = model_file(tmp.path(), "m.gguf", 3 * MIB + 17);
    let store = Store::open(&tmp.path().join("models")).unwrap();
    let last = AtomicU64::new(0);
    let path = store.import("m", &src, &sha, &|done, total| {
        assert_eq!(total, 3 * MIB + 17);
        last.store(done, Ordering::Relaxed);
    });
    let path = path.unwrap();
    assert_eq!(path, store.root().join(format!("{sha}.gguf")));
    assert!(store.contains(&sha));
    assert_eq!(std::fs::read(&path).unwrap(), std::fs::read(&src).unwrap());
    assert_eq!(last.load(Ordering::Relaxed), 3 * MIB + 17);
    assert!(hidden_files(store.root()).is_empty());
    store.verify(&sha).unwrap();
    // The same pass recorded the BLAKE3 of the bytes as the store's check digest.
    assert_eq!(store.check_digest(&sha), Some(blake3_of(&std::fs::read(&src).unwrap())));
}

#[test]
fn check_digest_is_written_whole_and_read_back_only_when_well_formed() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    let sha = sha_of(b"m");
    let b3 = blake3_of(b"m");
    assert_eq!(store.check_digest(&sha), None);
    store.record_check(&sha, &b3.to_uppercase()).unwrap();
    assert_eq!(std::fs::read_to_string(store.check_path_of(&sha)).unwrap(), format!("{b3}\n"));
    assert_eq!(store.check_digest(&sha), Some(b3.clone()));
    assert!(hidden_files(tmp.path()).is_empty(), "temporary left: {:?}", hidden_files(tmp.path()));
    assert!(matches!(store.record_check(&sha, "not-hex").unwrap_err(), StoreError::InvalidHash { .. }));
    // A torn or edited digest file counts as none (the sha256 then decides).
    std::fs::write(store.check_path_of(&sha), &b3[..40]).unwrap();
    assert_eq!(store.check_digest(&sha), None);
    store.forget_check(&sha).unwrap();
    assert!(!store.check_path_of(&sha).exists());
    store.forget_check(&sha).unwrap();
}

#[test]
fn import_wrong_sha_names_id_expected_actual_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, actual) = model_file(tmp.path(), "m.gguf", MIB);
    let expected = sha_of(b"something else");
    let store = Store::open(&tmp.path().join("models")).unwrap();
    let err = store.import("qwen-0.5b", &src, &expected, &no_progress).unwrap_err();
    assert!(matches!(err, StoreError::HashMismatch { .. }), "{err:?}");
    let text = err.to_string();
    for needle in ["qwen-0.5b", &expected, &actual] {
        assert!(text.contains(needle), "{text:?} lacks {needle}");
    }
    assert!(!store.contains(&expected));
    assert!(!store.path_of(&expected).exists());
    assert!(hidden_files(store.root()).is_empty(), "part file left: {:?}", hidden_files(store.root()));
}

#[test]
fn import_refuses_a_malformed_hash() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, _) = model_file(tmp.path(), "m.gguf", 10);
    let store = Store::open(&tmp.path().join("models")).unwrap();
    let err = store.import("m", &src, "../etc/passwd", &no_progress).unwrap_err();
    assert!(matches!(err, StoreError::InvalidHash { .. }), "{err:?}");
}

#[test]
fn store_verify_removes_a_corrupted_file() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, sha) = model_file(tmp.path(), "m.gguf", MIB);
    let store = Store::open(&tmp.path().join("models")).unwrap();
    let path = store.import("m", &src, &sha, &no_progress).unwrap();
    assert!(store.check_digest(&sha).is_some());
    flip_byte(&path, 1000);
    let err = store.verify(&sha).unwrap_err();
    assert!(matches!(err, StoreError::HashMismatch { .. }), "{err:?}");
    assert!(!store.contains(&sha), "a corrupt file must never be used");
    assert!(store.check_digest(&sha).is_none(), "the check digest of a removed file stays behind");
}

// ---- fetch, against a minimal HTTP/1.1 server with Range support ----

#[derive(Clone, Copy)]
enum Behaviour {
    /// The first response announces the whole body, sends this many bytes, then drops.
    DropFirstAfter(usize),
    /// Honours `Range` from the first request on.
    Ranges,
    /// Answers every request with 200 and the whole body.
    IgnoreRange,
    /// Answers every request with this status and no body.
    Status(u16),
}

struct Server {
    url: String,
    /// The `Range` header of each request, in order.
    ranges: Arc<Mutex<Vec<Option<String>>>>,
}

fn serve(body: Vec<u8>, behaviour: Behaviour) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding a local port");
    let url = format!("http://{}/m.gguf", listener.local_addr().expect("local address"));
    let ranges = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&ranges);
    std::thread::spawn(move || {
        for (i, stream) in listener.incoming().enumerate() {
            let Ok(stream) = stream else { continue };
            let range = read_request(&stream);
            seen.lock().expect("ranges lock").push(range.clone());
            let _ = respond(stream, &body, behaviour, i, range);
        }
    });
    Server { url, ranges }
}

/// Reads the request head; returns the value of its `Range` header.
fn read_request(stream: &TcpStream) -> Option<String> {
    let mut range = None;
    for line in BufReader::new(stream).lines() {
        let line = line.ok()?;
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("range")
        {
            range = Some(value.trim().to_owned());
        }
    }
    range
}

fn respond(
    mut stream: TcpStream,
    body: &[u8],
    behaviour: Behaviour,
    request: usize,
    range: Option<String>,
) -> std::io::Result<()> {
    let len = body.len();
    let start = range.and_then(|r| r.strip_prefix("bytes=")?.strip_suffix('-')?.parse::<usize>().ok());
    match (behaviour, start) {
        (Behaviour::Status(code), _) => {
            write!(stream, "HTTP/1.1 {code} Nope\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        }
        (Behaviour::DropFirstAfter(n), _) if request == 0 => {
            write!(stream, "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n")?;
            stream.write_all(&body[..n])?;
            stream.flush()?;
            stream.shutdown(std::net::Shutdown::Both)
        }
        (Behaviour::DropFirstAfter(_) | Behaviour::Ranges, Some(s)) if s >= len => {
            write!(stream, "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\n")?;
            write!(stream, "Content-Length: 0\r\nConnection: close\r\n\r\n")
        }
        (Behaviour::DropFirstAfter(_) | Behaviour::Ranges, Some(s)) => {
            write!(stream, "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {s}-{}/{len}\r\n", len - 1)?;
            write!(stream, "Content-Length: {}\r\nConnection: close\r\n\r\n", len - s)?;
            stream.write_all(&body[s..])
        }
        _ => {
            write!(stream, "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n")?;
            stream.write_all(body)
        }
    }
}

fn fetch_opts(attempts: u32) -> FetchOptions {
    FetchOptions { attempts, backoff_ms: 0, read_timeout_ms: Some(10_000) }
}

#[test]
fn fetch_resumes_with_a_range_request_after_a_dropped_connection() {
    let tmp = tempfile::tempdir().unwrap();
    let body = pattern(3 * MIB, 7);
    let sha = sha_of(&body);
    let server = serve(body.clone(), Behaviour::DropFirstAfter(1_000_000));
    let store = Store::open(tmp.path()).unwrap();
    let path = store.fetch("m", &server.url, &sha, Some(3 * MIB), &fetch_opts(3), &no_progress).unwrap();
    assert_eq!(*server.ranges.lock().unwrap(), vec![None, Some("bytes=1000000-".to_owned())]);
    assert_eq!(std::fs::read(&path).unwrap(), body);
    store.verify(&sha).unwrap();
    // Both hashes carried across the dropped connection.
    assert_eq!(store.check_digest(&sha), Some(blake3_of(&body)));
    assert!(hidden_files(tmp.path()).is_empty());
}

#[test]
fn fetch_resumes_a_part_file_left_by_an_earlier_call() {
    let tmp = tempfile::tempdir().unwrap();
    let body = pattern(2 * MIB, 8);
    let sha = sha_of(&body);
    let server = serve(body.clone(), Behaviour::DropFirstAfter(500_000));
    let store = Store::open(tmp.path()).unwrap();
    let err = store.fetch("m", &server.url, &sha, None, &fetch_opts(1), &no_progress).unwrap_err();
    assert!(matches!(err, StoreError::Download { .. }), "{err:?}");
    assert!(!store.contains(&sha));
    assert_eq!(std::fs::metadata(store.part_path_of(&sha)).unwrap().len(), 500_000);

    store.fetch("m", &server.url, &sha, None, &fetch_opts(1), &no_progress).unwrap();
    assert_eq!(server.ranges.lock().unwrap()[1].as_deref(), Some("bytes=500000-"));
    store.verify(&sha).unwrap();
    // The part file's bytes were re-hashed into both digests on resume.
    assert_eq!(store.check_digest(&sha), Some(blake3_of(&body)));
}

#[test]
fn fetch_starts_over_when_the_server_ignores_the_range() {
    let tmp = tempfile::tempdir().unwrap();
    let body = pattern(MIB, 9);
    let sha = sha_of(&body);
    let store = Store::open(tmp.path()).unwrap();
    std::fs::write(store.part_path_of(&sha), &body[..1000]).unwrap();
    let server = serve(body.clone(), Behaviour::IgnoreRange);
    let path = store.fetch("m", &server.url, &sha, Some(MIB), &fetch_opts(1), &no_progress).unwrap();
    assert_eq!(*server.ranges.lock().unwrap(), vec![Some("bytes=1000-".to_owned())]);
    assert_eq!(std::fs::read(path).unwrap(), body);
}

#[test]
fn fetch_of_wrong_bytes_fails_the_hash_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let body = pattern(MIB, 10);
    let expected = sha_of(b"the bytes the manifest meant");
    let server = serve(body.clone(), Behaviour::IgnoreRange);
    let store = Store::open(tmp.path()).unwrap();
    let err = store.fetch("llama", &server.url, &expected, None, &fetch_opts(3), &no_progress).unwrap_err();
    assert!(matches!(err, StoreError::DownloadHashMismatch { .. }), "{err:?}");
    let text = err.to_string();
    for needle in ["llama", &expected, &sha_of(&body)] {
        assert!(text.contains(needle), "{text:?} lacks {needle}");
    }
    assert!(!store.contains(&expected));
    assert!(std::fs::read_dir(tmp.path()).unwrap().next().is_none(), "nothing may be left");
}

#[test]
fn fetch_after_a_stale_part_file_mismatches_once_then_succeeds() {
    let tmp = tempfile::tempdir().unwrap();
    let body = pattern(MIB, 11);
    let sha = sha_of(&body);
    let store = Store::open(tmp.path()).unwrap();
    // A part file from some other download: its prefix hashes wrong, so the result must.
    std::fs::write(store.part_path_of(&sha), pattern(4096, 99)).unwrap();
    let server = serve(body.clone(), Behaviour::Ranges);
    let err = store.fetch("m", &server.url, &sha, Some(MIB), &fetch_opts(1), &no_progress).unwrap_err();
    assert!(matches!(err, StoreError::DownloadHashMismatch { .. }), "{err:?}");
    assert!(!store.contains(&sha) && !store.part_path_of(&sha).exists());
    assert_eq!(server.ranges.lock().unwrap()[0].as_deref(), Some("bytes=4096-"));
    store.fetch("m", &server.url, &sha, Some(MIB), &fetch_opts(1), &no_progress).unwrap();
    store.verify(&sha).unwrap();
}

#[test]
fn fetch_of_a_complete_part_file_only_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let body = pattern(MIB, 12);
    let sha = sha_of(&body);
    let store = Store::open(tmp.path()).unwrap();
    // With the size known, no request at all: this server would only answer 500.
    std::fs::write(store.part_path_of(&sha), &body).unwrap();
    let broken = serve(Vec::new(), Behaviour::Status(500));
    store.fetch("m", &broken.url, &sha, Some(MIB), &fetch_opts(1), &no_progress).unwrap();
    assert!(broken.ranges.lock().unwrap().is_empty());
    // Without it, the server's 416 tells that nothing is missing.
    std::fs::remove_file(store.path_of(&sha)).unwrap();
    std::fs::write(store.part_path_of(&sha), &body).unwrap();
    let server = serve(body, Behaviour::Ranges);
    store.fetch("m", &server.url, &sha, None, &fetch_opts(1), &no_progress).unwrap();
    assert_eq!(*server.ranges.lock().unwrap(), vec![Some(format!("bytes={MIB}-"))]);
    store.verify(&sha).unwrap();
}

#[test]
fn fetch_does_not_retry_a_404() {
    let tmp = tempfile::tempdir().unwrap();
    let server = serve(Vec::new(), Behaviour::Status(404));
    let store = Store::open(tmp.path()).unwrap();
    let sha = sha_of(b"x");
    let err = store.fetch("m", &server.url, &sha, None, &fetch_opts(5), &no_progress).unwrap_err();
    assert!(matches!(err, StoreError::HttpStatus { status: 404, .. }), "{err:?}");
    assert_eq!(server.ranges.lock().unwrap().len(), 1);
}

// ---- hot tier ----

fn flip_byte(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).expect("reading the file to corrupt");
    bytes[at] ^= 0x40;
    std::fs::write(path, bytes).expect("writing the corrupted file");
}

#[test]
fn flipped_byte_fails_verify_and_demote_promote_restores() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, sha) = model_file(tmp.path(), "m.gguf", 5 * MIB);
    let hot = HotTier::open(&tmp.path().join("hot"), 64 * MIB).unwrap();
    let report = hot.promote(&src, &sha, &CopyOptions::default(), &no_progress).unwrap();
    assert_eq!(report.bytes, 5 * MIB);
    assert_eq!(hot.list(), vec![(sha.clone(), 5 * MIB)]);
    assert_eq!(hot.used_bytes(), 5 * MIB);
    assert!(hot.verify(&sha).unwrap());

    flip_byte(&hot.path_of(&sha), 4 * MIB as usize + 3);
    assert!(!hot.verify(&sha).unwrap());
    hot.demote(&sha).unwrap();
    assert!(!hot.contains(&sha));
    assert_eq!(hot.used_bytes(), 0);
    hot.promote(&src, &sha, &CopyOptions::default(), &no_progress).unwrap();
    assert!(hot.verify(&sha).unwrap());
}

#[test]
fn promote_checked_copies_against_the_check_digest_and_refuses_a_mismatch() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, sha) = model_file(tmp.path(), "m.gguf", 3 * MIB + 5);
    let b3 = blake3_of(&std::fs::read(&src).unwrap());
    let hot = HotTier::open(&tmp.path().join("hot"), 64 * MIB).unwrap();
    // Checked against the sha256, the copy reports the BLAKE3 for the store to record.
    let report = hot.promote(&src, &sha, &CopyOptions::default(), &no_progress).unwrap();
    assert_eq!(report.blake3.as_deref(), Some(b3.as_str()));
    hot.demote(&sha).unwrap();

    let report = hot.promote_checked(&src, &sha, &b3, &CopyOptions::default(), &no_progress).unwrap();
    assert_eq!((report.bytes, report.blake3), (3 * MIB + 5, None));
    assert_eq!(std::fs::read(hot.path_of(&sha)).unwrap(), std::fs::read(&src).unwrap());
    assert!(hot.verify_checked(&sha, &b3).unwrap() && hot.verify(&sha).unwrap());
    flip_byte(&hot.path_of(&sha), 2 * MIB as usize);
    assert!(!hot.verify_checked(&sha, &b3).unwrap());
    hot.demote(&sha).unwrap();

    // A source that changed since the digest was recorded: nothing is kept.
    flip_byte(&src, 17);
    let err = hot.promote_checked(&src, &sha, &b3, &CopyOptions::default(), &no_progress).unwrap_err();
    match &err {
        StoreError::CheckMismatch { path, expected, actual } => {
            assert_eq!((path, expected), (&src, &b3));
            assert_eq!(*actual, blake3_of(&std::fs::read(&src).unwrap()));
        }
        other => panic!("expected a check digest mismatch, got {other:?}"),
    }
    assert!(err.to_string().contains("check digest"), "{err}");
    assert!(!hot.contains(&sha));
    assert!(std::fs::read_dir(hot.dir()).unwrap().next().is_none(), "temporary copy left");
    // Throttled and cancellable like the sha256 copy.
    let cancel = Arc::new(AtomicBool::new(true));
    let opts = CopyOptions { rate_limit_bytes_per_sec: None, cancel: Some(cancel) };
    let err = hot.promote_checked(&src, &sha, &b3, &opts, &no_progress).unwrap_err();
    assert!(matches!(err, StoreError::Cancelled), "{err:?}");
}

/// A source the kernel cannot copy from with sendfile(2) (a FIFO here; a filesystem that
/// cannot splice on a device) is copied through user space instead, hashed the same way.
#[test]
fn a_source_the_kernel_cannot_copy_from_is_copied_through_user_space() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = pattern(3 * MIB + 7, 42);
    let sha = sha_of(&bytes);
    let fifo = tmp.path().join("m.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let writer = {
        let (fifo, bytes) = (fifo.clone(), bytes.clone());
        std::thread::spawn(move || std::fs::write(fifo, bytes))
    };
    let hot = HotTier::open(&tmp.path().join("hot"), 64 * MIB).unwrap();
    let report = hot.promote(&fifo, &sha, &CopyOptions::default(), &no_progress).unwrap();
    writer.join().unwrap().unwrap();
    assert_eq!(report.bytes, bytes.len() as u64);
    assert_eq!(report.blake3.as_deref(), Some(blake3_of(&bytes).as_str()));
    assert_eq!(std::fs::read(hot.path_of(&sha)).unwrap(), bytes);
}

#[test]
fn promote_over_budget_is_refused_before_copying() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, sha_a) = model_file(tmp.path(), "a.gguf", 3 * MIB);
    let (b, sha_b) = model_file(tmp.path(), "b.gguf", 2 * MIB);
    let hot = HotTier::open(&tmp.path().join("hot"), 4 * MIB).unwrap();
    hot.promote(&a, &sha_a, &CopyOptions::default(), &no_progress).unwrap();
    let err = hot.promote(&b, &sha_b, &CopyOptions::default(), &no_progress).unwrap_err();
    assert!(
        matches!(err, StoreError::OverBudget { needed, used, budget } if needed == 2 * MIB && used == 3 * MIB && budget == 4 * MIB),
        "{err:?}"
    );
    assert!(hidden_files(hot.dir()).is_empty());
    // Re-promoting what is already hot replaces it, so it does not count twice.
    hot.promote(&a, &sha_a, &CopyOptions::default(), &no_progress).unwrap();
}

#[test]
fn promote_of_a_corrupt_source_keeps_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, _) = model_file(tmp.path(), "m.gguf", MIB);
    let wrong = sha_of(b"other");
    let hot = HotTier::open(&tmp.path().join("hot"), 64 * MIB).unwrap();
    let err = hot.promote(&src, &wrong, &CopyOptions::default(), &no_progress).unwrap_err();
    assert!(matches!(err, StoreError::HashMismatch { .. }), "{err:?}");
    assert!(std::fs::read_dir(hot.dir()).unwrap().next().is_none());
}

#[test]
fn rate_limit_throttles_the_copy() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, sha) = model_file(tmp.path(), "m.gguf", 8 * MIB);
    let hot = HotTier::open(&tmp.path().join("hot"), 64 * MIB).unwrap();
    let opts = CopyOptions { rate_limit_bytes_per_sec: Some(16 * MIB), cancel: None };
    let started = Instant::now();
    let report = hot.promote(&src, &sha, &opts, &no_progress).unwrap();
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(400), "8 MiB at 16 MiB/s took {elapsed:?}");
    assert!(elapsed < Duration::from_secs(30), "{elapsed:?}");
    assert_eq!(report.bytes, 8 * MIB);
    assert!(hot.verify(&sha).unwrap());

    // The copy checked against the store's BLAKE3 keeps to the rate too.
    hot.demote(&sha).unwrap();
    let b3 = report.blake3.unwrap();
    let started = Instant::now();
    hot.promote_checked(&src, &sha, &b3, &opts, &no_progress).unwrap();
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(400), "8 MiB at 16 MiB/s took {elapsed:?}");
    assert!(hot.verify_checked(&sha, &b3).unwrap());
}

#[test]
fn cancel_stops_the_copy_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, sha) = model_file(tmp.path(), "m.gguf", 16 * MIB);
    let hot = HotTier::open(&tmp.path().join("hot"), 64 * MIB).unwrap();
    for rate in [None, Some(MIB)] {
        let cancel = Arc::new(AtomicBool::new(false));
        let opts = CopyOptions { rate_limit_bytes_per_sec: rate, cancel: Some(Arc::clone(&cancel)) };
        let copied = AtomicU64::new(0);
        // Inference traffic "arrives" once the first chunk is written.
        let err = hot
            .promote(&src, &sha, &opts, &|done, _| {
                copied.store(done, Ordering::Relaxed);
                cancel.store(true, Ordering::Relaxed);
            })
            .unwrap_err();
        assert!(matches!(err, StoreError::Cancelled), "{err:?}");
        assert!(copied.load(Ordering::Relaxed) < 16 * MIB, "the copy ran to its end");
        assert!(!hot.contains(&sha));
        assert!(std::fs::read_dir(hot.dir()).unwrap().next().is_none(), "temporary file left");
    }
}

/// Not a test on its own: `kill_9_during_prewarm_leaves_no_hot_copy` re-runs this test
/// binary with `KILN_STORE_CHILD` set, and this copies slowly until it is killed.
#[test]
fn child_promote_helper() {
    let Ok(hot_dir) = std::env::var(CHILD_ENV) else { return };
    let src = std::env::var("KILN_STORE_CHILD_SRC").unwrap();
    let sha = std::env::var("KILN_STORE_CHILD_SHA").unwrap();
    let hot = HotTier::open(Path::new(&hot_dir), u64::MAX).unwrap();
    let opts = CopyOptions { rate_limit_bytes_per_sec: Some(256 << 10), cancel: None };
    hot.promote(Path::new(&src), &sha, &opts, &no_progress).unwrap();
}

#[test]
fn kill_9_during_prewarm_leaves_no_hot_copy() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let tmp = tempfile::tempdir().unwrap();
    let (src, sha) = model_file(tmp.path(), "m.gguf", 16 * MIB);
    let hot_dir = tmp.path().join("hot");
    std::fs::create_dir(&hot_dir).unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["child_promote_helper", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, &hot_dir)
        .stdout(std::process::Stdio::null())
        .env("KILN_STORE_CHILD_SRC", &src)
        .env("KILN_STORE_CHILD_SHA", &sha)
        .spawn()
        .unwrap();
    // Wait for the event (the temporary file appears), not for time to pass.
    let deadline = Instant::now() + Duration::from_secs(60);
    while hidden_files(&hot_dir).is_empty() {
        assert!(child.try_wait().unwrap().is_none(), "the child ended before copying");
        assert!(Instant::now() < deadline, "the child never started copying");
        std::thread::sleep(Duration::from_millis(5));
    }
    kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9));
    assert!(!hidden_files(&hot_dir).is_empty(), "the kill should leave the temporary file behind");

    let hot = HotTier::open(&hot_dir, 64 * MIB).unwrap();
    assert!(!hot.contains(&sha));
    assert!(hidden_files(&hot_dir).is_empty(), "open must remove leftovers: {:?}", hidden_files(&hot_dir));
    assert_eq!(hot.used_bytes(), 0);
    hot.promote(&src, &sha, &CopyOptions::default(), &no_progress).unwrap();
    assert!(hot.contains(&sha) && hot.verify(&sha).unwrap());
}

/// Unmounts on drop, so a failing assertion does not leave a mount behind.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn tmpfs_full() {
    use nix::mount::{MsFlags, mount};
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("hot");
    std::fs::create_dir(&mnt).unwrap();
    if let Err(e) = mount(Some("tmpfs"), &mnt, Some("tmpfs"), MsFlags::empty(), Some("size=1m")) {
        assert!(!require_tools(), "tmpfs_full: mounting a tmpfs failed: {e} (KILN_REQUIRE_TOOLS=1)");
        println!("SKIP tmpfs_full: needs root to mount a tmpfs ({e})");
        return;
    }
    let _mounted = Mounted(mnt.clone());
    let (big, big_sha) = model_file(tmp.path(), "big.gguf", 2 * MIB);
    let hot = HotTier::open(&mnt, 64 * MIB).unwrap();
    let err = hot.promote(&big, &big_sha, &CopyOptions::default(), &no_progress).unwrap_err();
    assert!(matches!(&err, StoreError::NoSpace { needed, path } if *needed == 2 * MIB && *path == mnt), "{err:?}");
    assert!(!hot.contains(&big_sha));
    assert!(std::fs::read_dir(&mnt).unwrap().next().is_none(), "temporary file left on the tmpfs");
    // The space came back: a model that fits still goes in.
    let (small, small_sha) = model_file(tmp.path(), "small.gguf", 512 << 10);
    hot.promote(&small, &small_sha, &CopyOptions::default(), &no_progress).unwrap();
    assert!(hot.verify(&small_sha).unwrap());
}

// ---- page-cache mode ----

#[test]
fn warm_page_cache_makes_the_file_resident() {
    let tmp = tempfile::tempdir().unwrap();
    let (path, _) = model_file(tmp.path(), "m.gguf", 4 * MIB + 1);
    match warm_page_cache(&path) {
        Ok(r) => {
            assert_eq!(r.total_bytes, 4 * MIB + 1);
            assert!(r.resident_bytes > 0, "{r:?}");
            assert_eq!(residency(&path).unwrap().total_bytes, 4 * MIB + 1);
        }
        Err(StoreError::Io { source, .. }) if source.raw_os_error() == Some(nix::libc::ENOSYS) => {
            println!("SKIP warm_page_cache: mincore is not implemented here");
        }
        Err(e) => panic!("{e:?}"),
    }
    let empty = tmp.path().join("empty");
    std::fs::write(&empty, b"").unwrap();
    assert_eq!(residency(&empty).unwrap().total_bytes, 0);
}

// ---- the real model ----

#[test]
fn real_model_imports_and_promotes() {
    let model = Path::new(REAL_MODEL);
    if !model.is_file() {
        assert!(!require_tools(), "{REAL_MODEL} is missing (scripts/fetch-model fetches it)");
        println!("SKIP real_model_imports_and_promotes: {REAL_MODEL} not found");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("models")).unwrap();
    let stored = store.import("smollm2-135m", model, REAL_MODEL_SHA, &no_progress).unwrap();
    let hot = HotTier::open(&tmp.path().join("hot"), 256 * MIB).unwrap();
    let report = hot.promote(&stored, REAL_MODEL_SHA, &CopyOptions::default(), &no_progress).unwrap();
    assert_eq!(report.bytes, std::fs::metadata(model).unwrap().len());
    assert!(hot.verify(REAL_MODEL_SHA).unwrap());
    println!("promote: {} bytes in {:?} ({} MB/s)", report.bytes, report.duration, report.bytes_per_sec / 1_000_000);
}
