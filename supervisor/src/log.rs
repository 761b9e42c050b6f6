//! kilnd's logging: journald when one listens on its socket (fields become journal fields, every
//! notable event carries a fixed MESSAGE_ID so `journalctl MESSAGE_ID=...` finds it), stderr
//! otherwise. Libraries log with `tracing` fields; only this module decides where they go.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// journald's native socket.
pub const JOURNALD_SOCKET: &str = "/run/systemd/journal/socket";

/// MESSAGE_IDs of kilnd's events (128-bit ids, as `journalctl --new-id128` makes them).
pub mod message_id {
    pub const MODEL_LOADED: &str = "5c0a0f1e8f6b4f43a3a1d2a8e0b7c101";
    pub const MODEL_UNLOADED: &str = "5c0a0f1e8f6b4f43a3a1d2a8e0b7c102";
    pub const EVICTION: &str = "5c0a0f1e8f6b4f43a3a1d2a8e0b7c103";
    pub const PREWARM_DONE: &str = "5c0a0f1e8f6b4f43a3a1d2a8e0b7c104";
    pub const OOM_KILL: &str = "5c0a0f1e8f6b4f43a3a1d2a8e0b7c105";
    pub const LOAD_REFUSED: &str = "5c0a0f1e8f6b4f43a3a1d2a8e0b7c106";
    pub const TRANSITION: &str = "5c0a0f1e8f6b4f43a3a1d2a8e0b7c107";
    pub const PRESSURE: &str = "5c0a0f1e8f6b4f43a3a1d2a8e0b7c108";
    pub const STARTED: &str = "5c0a0f1e8f6b4f43a3a1d2a8e0b7c109";
    /// A request served (debug level): tokens, time to first token, tokens/s.
    pub const REQUEST: &str = "5c0a0f1e8f6b4f43a3a1d2a8e0b7c10a";
    /// A worker exited or crashed (OOM kills use OOM_KILL).
    pub const WORKER_EXITED: &str = "5c0a0f1e8f6b4f43a3a1d2a8e0b7c10b";
    /// Periodic cache hit rates.
    pub const CACHE_STATS: &str = "5c0a0f1e8f6b4f43a3a1d2a8e0b7c10c";
    /// kilnd listens for HTTP.
    pub const LISTENING: &str = "5c0a0f1e8f6b4f43a3a1d2a8e0b7c10d";
}

/// Where logs went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    Journald,
    Stderr,
}

/// Whether a journald listens on its socket. A socket file left behind by a journald that
/// has since died still exists, but nothing receives what is sent to it: connecting tells.
pub fn journald_listening() -> bool {
    std::os::unix::net::UnixDatagram::unbound().and_then(|s| s.connect(JOURNALD_SOCKET)).is_ok()
}

/// Sets up logging once for the process. `level` is the spec's log level (KILND_LOG overrides).
pub fn init(level: &str) -> Sink {
    let filter = EnvFilter::try_from_env("KILND_LOG").unwrap_or_else(|_| EnvFilter::new(level));
    if journald_listening()
        && let Ok(layer) = tracing_journald::layer()
    {
        // Field names go to the journal upper-cased and unprefixed: model -> MODEL.
        let layer = layer.with_field_prefix(None).with_syslog_identifier("kilnd".into());
        if tracing_subscriber::registry().with(filter).with(layer).try_init().is_ok() {
            return Sink::Journald;
        }
        return Sink::Stderr;
    }
    let _ = tracing_subscriber::registry()
        .with(EnvFilter::try_from_env("KILND_LOG").unwrap_or_else(|_| EnvFilter::new(level)))
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(false))
        .try_init();
    Sink::Stderr
}
