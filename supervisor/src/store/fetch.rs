//! `Store::fetch`: download a model into the store over HTTP, resuming a part file with a
//! `Range` request and retrying dropped connections; the hash covers every byte kept.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::copy::{CHUNK_BYTES, Digests, PipelinedHasher, Pump, PumpError};
use super::error::{IoContext, StoreError};
use super::persistent::{PartFile, Store};

/// Longest wait between two attempts, however many have failed.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// How hard `fetch` tries.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Requests to make before giving up (at least one is always made).
    pub attempts: u32,
    /// Wait before the second attempt; doubles for each further one, up to a minute.
    pub backoff_ms: u64,
    /// Give up on a connection that sends nothing for this long (`None`: wait forever).
    pub read_timeout_ms: Option<u64>,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions { attempts: 5, backoff_ms: 1_000, read_timeout_ms: Some(30_000) }
    }
}

/// How one attempt ended, short of success.
enum Failed {
    /// Worth another attempt (connection dropped, 5xx); the part file keeps what arrived.
    Retry(io::Error),
    /// Not worth another attempt.
    Fatal(StoreError),
    /// The request could not be made (bad URL, TLS failure): no attempt will do better.
    Unreachable(io::Error),
}

/// The part file, and the hash state and length of what it holds.
struct Download<'a> {
    part: PartFile,
    hashed: Digests,
    offset: u64,
    id: &'a str,
    url: &'a str,
    expected_size: Option<u64>,
    progress: &'a dyn Fn(u64, u64),
}

impl Store {
    /// Downloads `url` into the store as `sha256`, resuming a part file left by an
    /// earlier call and retrying dropped connections. Nothing gets the final name unless
    /// its sha256 (and size, when given) match. `progress` gets `(done, total)`; total is
    /// 0 while unknown.
    pub fn fetch(
        &self,
        id: &str,
        url: &str,
        sha256: &str,
        expected_size: Option<u64>,
        opts: &FetchOptions,
        progress: &dyn Fn(u64, u64),
    ) -> Result<PathBuf, StoreError> {
        let (sha, dest) = match self.already(id, sha256)? {
            super::persistent::Already::Stored(dest) => return Ok(dest),
            super::persistent::Already::Missing(sha, dest) => (sha, dest),
        };
        let started = Instant::now();
        let mut dl = Download {
            part: self.lock_part(&sha)?,
            hashed: Digests::default(),
            offset: 0,
            id,
            url,
            expected_size,
            progress,
        };
        dl.hash_existing_prefix()?;

        dl.run(opts)?;
        let bytes = dl.offset;
        dl.finish(self, &sha, &dest)?;
        tracing::info!(model = %id, sha256 = %sha, tier = "store", bytes,
            duration_ms = started.elapsed().as_millis() as u64, "model downloaded");
        Ok(dest)
    }
}

impl Download<'_> {
    /// Makes attempts until the body is complete, waiting longer after each failure.
    fn run(&mut self, opts: &FetchOptions) -> Result<(), StoreError> {
        // A part file already as long as promised needs no request, only the checks.
        if self.offset > 0 && self.expected_size == Some(self.offset) {
            return Ok(());
        }
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_per_read(opts.read_timeout_ms.map(Duration::from_millis))
            .build()
            .new_agent();
        let attempts = opts.attempts.max(1);
        let mut attempt = 1;
        loop {
            let error = match self.attempt(&agent) {
                Ok(()) => return Ok(()),
                Err(Failed::Fatal(e)) => return Err(e),
                Err(Failed::Retry(e)) if attempt < attempts => e,
                Err(Failed::Retry(e) | Failed::Unreachable(e)) => {
                    return Err(StoreError::Download {
                        model: self.id.to_owned(),
                        url: self.url.to_owned(),
                        attempts: attempt,
                        source: e,
                    });
                }
            };
            let backoff =
                Duration::from_millis(opts.backoff_ms.saturating_mul(1 << (attempt - 1).min(16))).min(MAX_BACKOFF);
            tracing::warn!(model = %self.id, url = self.url, attempt, offset = self.offset, error = %error,
                backoff_ms = backoff.as_millis() as u64, "download interrupted, retrying");
            std::thread::sleep(backoff);
            attempt += 1;
        }
    }

    fn total(&self, announced: Option<u64>) -> u64 {
        self.expected_size.or(announced).unwrap_or(0)
    }

    /// Re-hashes what an earlier call left in the part file, once, so this call resumes.
    fn hash_existing_prefix(&mut self) -> Result<(), StoreError> {
        let path = &self.part.path;
        let len = self.part.file.metadata().at("reading metadata of", path)?.len();
        if len == 0 || self.expected_size.is_some_and(|size| len > size) {
            return self.restart();
        }
        let file: &mut File = &mut self.part.file;
        file.seek(SeekFrom::Start(0)).at("seeking", path)?;
        let pump = Pump { total_bytes: len, rate_limit_bytes_per_sec: None, cancel: None, progress: &|_, _| {} };
        let mut hasher = PipelinedHasher::new(CHUNK_BYTES, Digests::default()).at("starting a hasher for", path)?;
        let mut done = 0;
        pump.run(&mut (&*file).take(len), None, &mut hasher, &mut done).map_err(|e| match e {
            PumpError::Read(e) | PumpError::Write(e) => StoreError::io("reading", path, e),
            PumpError::Cancelled => StoreError::Cancelled,
        })?;
        self.hashed = hasher.into_state().at("hashing", path)?;
        self.offset = done;
        tracing::info!(model = %self.id, url = self.url, offset = done, "resuming download");
        Ok(())
    }

    /// Throws away what the part file holds and starts from byte 0.
    fn restart(&mut self) -> Result<(), StoreError> {
        self.part.file.set_len(0).at("truncating", &self.part.path)?;
        self.hashed = Digests::default();
        self.offset = 0;
        Ok(())
    }

    /// One request: from `offset` on, appending to the part file and the hash.
    fn attempt(&mut self, agent: &ureq::Agent) -> Result<(), Failed> {
        let mut request = agent.get(self.url).header("accept-encoding", "identity");
        if self.offset > 0 {
            request = request.header("range", format!("bytes={}-", self.offset));
        }
        let response = request
            .call()
            .map_err(|e| if transient(&e) { Failed::Retry(e.into_io()) } else { Failed::Unreachable(e.into_io()) })?;
        let status = response.status().as_u16();
        let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let content_range = header("content-range").as_deref().map(parse_content_range);
        let announced = match status {
            206 if self.offset > 0 => match content_range {
                Some(Some((start, total))) if start == self.offset => total,
                _ => {
                    self.restart().map_err(Failed::Fatal)?;
                    return Err(Failed::Retry(io::Error::other("server resumed at another offset than asked")));
                }
            },
            200 => {
                if self.offset > 0 {
                    tracing::info!(model = %self.id, url = self.url, offset = self.offset,
                        "server ignored the range request: downloading from the start");
                    self.restart().map_err(Failed::Fatal)?;
                }
                header("content-length").and_then(|v| v.parse().ok())
            }
            // Range not satisfiable: complete already, or the part file is from elsewhere.
            416 if self.offset > 0 => {
                let total = content_range.and_then(|r| r.and_then(|(_, t)| t));
                if total == Some(self.offset) {
                    return Ok(());
                }
                self.restart().map_err(Failed::Fatal)?;
                return Err(Failed::Retry(io::Error::other("server refused the range")));
            }
            408 | 429 | 500..=599 => {
                return Err(Failed::Retry(io::Error::other(format!("server answered {status}"))));
            }
            _ => {
                return Err(Failed::Fatal(StoreError::HttpStatus {
                    model: self.id.to_owned(),
                    url: self.url.to_owned(),
                    status,
                }));
            }
        };
        if let (Some(expected), Some(actual)) = (self.expected_size, announced)
            && expected != actual
        {
            self.restart().map_err(Failed::Fatal)?;
            return Err(Failed::Fatal(self.size_mismatch(actual)));
        }
        self.receive(response.into_body().into_reader(), announced)
    }

    /// Streams the body into the part file at `offset`, hashing it on the way.
    fn receive(&mut self, mut body: impl io::Read, announced: Option<u64>) -> Result<(), Failed> {
        let path = &self.part.path;
        let file: &mut File = &mut self.part.file;
        let fatal = |action, e| Failed::Fatal(StoreError::io(action, path, e));
        file.set_len(self.offset).map_err(|e| fatal("truncating", e))?;
        file.seek(SeekFrom::Start(self.offset)).map_err(|e| fatal("seeking", e))?;
        let pump = Pump {
            total_bytes: self.expected_size.or(announced).unwrap_or(0),
            rate_limit_bytes_per_sec: None,
            cancel: None,
            progress: self.progress,
        };
        let mut hasher =
            PipelinedHasher::new(CHUNK_BYTES, self.hashed.clone()).map_err(|e| fatal("starting a hasher for", e))?;
        let pumped = pump.run(&mut body, Some(file), &mut hasher, &mut self.offset);
        self.hashed = hasher.into_state().map_err(|e| fatal("hashing", e))?;
        match pumped {
            Ok(()) => {}
            Err(PumpError::Read(e)) => return Err(Failed::Retry(e)),
            Err(PumpError::Write(e)) => {
                let needed = self.total(announced).saturating_sub(self.offset);
                return Err(Failed::Fatal(StoreError::write(path, needed, e)));
            }
            Err(PumpError::Cancelled) => return Err(Failed::Fatal(StoreError::Cancelled)),
        }
        match announced {
            Some(total) if self.offset < total => Err(Failed::Retry(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("connection closed after {} of {total} bytes", self.offset),
            ))),
            _ => Ok(()),
        }
    }

    fn size_mismatch(&self, actual: u64) -> StoreError {
        StoreError::SizeMismatch {
            model: self.id.to_owned(),
            url: self.url.to_owned(),
            expected: self.expected_size.unwrap_or(0),
            actual,
        }
    }

    /// Checks size and hash; only then gives the part file its final name.
    fn finish(self, store: &Store, sha: &str, dest: &Path) -> Result<(), StoreError> {
        if self.expected_size.is_some_and(|size| size != self.offset) {
            let err = self.size_mismatch(self.offset);
            return Err(self.part.discard(err));
        }
        let (actual, blake3) = self.hashed.hex();
        if actual != sha {
            tracing::warn!(model = %self.id, url = self.url, expected = %sha, actual = %actual,
                "download rejected: sha256 mismatch");
            let err = StoreError::DownloadHashMismatch {
                model: self.id.to_owned(),
                url: self.url.to_owned(),
                expected: sha.to_owned(),
                actual,
            };
            return Err(self.part.discard(err));
        }
        self.part.commit(dest)?;
        store.record_check_or_warn(sha, &blake3);
        Ok(())
    }
}

/// True for request errors that another attempt may not meet: the network, not the URL.
fn transient(e: &ureq::Error) -> bool {
    matches!(
        e,
        ureq::Error::Io(_)
            | ureq::Error::Timeout(_)
            | ureq::Error::HostNotFound
            | ureq::Error::ConnectionFailed
            | ureq::Error::Protocol(_)
            | ureq::Error::BodyStalled
    )
}

/// Parses `bytes START-END/TOTAL` (or `bytes */TOTAL`) into `(START, TOTAL)`; a `*`
/// total is `None`, and an unsatisfied range has START `u64::MAX`.
fn parse_content_range(value: &str) -> Option<(u64, Option<u64>)> {
    let rest = value.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    let start = match range.trim() {
        "*" => u64::MAX,
        r => r.split_once('-')?.0.trim().parse().ok()?,
    };
    Some((start, total))
}
