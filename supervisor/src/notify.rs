//! systemd's notify protocol (sd_notify): READY=1 after start-up, STATUS= on changes,
//! WATCHDOG=1 as a heartbeat. A no-op when not started by systemd (no NOTIFY_SOCKET).

use std::os::unix::net::UnixDatagram;

/// Sends one notification; returns whether systemd was there to receive it.
pub fn notify(state: &str) -> std::io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return Ok(false) };
    let sock = UnixDatagram::unbound()?;
    let bytes = path.as_encoded_bytes();
    if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)?;
        sock.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        sock.send_to(state.as_bytes(), std::path::Path::new(&path))?;
    }
    Ok(true)
}

pub fn ready(status: &str) -> std::io::Result<bool> {
    notify(&format!("READY=1\nSTATUS={status}"))
}

pub fn status(status: &str) -> std::io::Result<bool> {
    notify(&format!("STATUS={status}"))
}

pub fn watchdog() -> std::io::Result<bool> {
    notify("WATCHDOG=1")
}

/// STOPPING=1: kilnd is shutting down.
pub fn stopping() -> std::io::Result<bool> {
    notify("STOPPING=1")
}

#[cfg(test)]
mod tests {
    #[test]
    fn messages_reach_a_notify_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        // Only this test sets NOTIFY_SOCKET; the others run without it.
        let sent = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "notify::tests::child_sends_ready", "--nocapture"])
            .env("NOTIFY_SOCKET", &path)
            .env("KILN_NOTIFY_CHILD", "1")
            .status()
            .unwrap();
        assert!(sent.success());
        let mut buf = [0u8; 256];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving 1 model");
    }

    #[test]
    fn child_sends_ready() {
        if std::env::var("KILN_NOTIFY_CHILD").is_ok() {
            assert!(super::ready("serving 1 model").unwrap());
        }
    }
}
