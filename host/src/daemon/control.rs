//! The local control socket: a Unix socket in the node's data directory, mode 0600, one
//! JSON request per line and one JSON reply per line. `antmesh paths`, `probe` and `send`
//! are its clients.
//!
//! ```text
//! {"cmd":"status"}
//! {"cmd":"paths"}
//! {"cmd":"probe","dest":"<32 hex>","timeout_s":30}
//! {"cmd":"send","dest":"<32 hex>","data":"text","timeout_s":30}
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use super::hub::ControlRequest;

/// The socket's file name in the data directory.
pub const SOCKET_NAME: &str = "control.sock";
/// Most bytes one client connection may send (its requests together).
const MAX_REQUEST: usize = 64 * 1024;

/// Why the control socket could not be served or reached.
#[derive(thiserror::Error, Debug)]
#[non_exhaustive]
pub enum ControlError {
    /// Another node answers on this socket (same data directory).
    #[error("another node is running with data directory {0} (its control socket answers)")]
    InUse(PathBuf),
    /// Binding, connecting, reading or writing failed.
    #[error("control socket {path}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The reply was not JSON.
    #[error("control socket {0}: the node sent something other than JSON")]
    Protocol(PathBuf),
}

/// Binds the control socket at `path`, replacing one a crashed node left behind. The
/// caller holds the data directory's lock, so no other node is binding it meanwhile.
pub async fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let io = |source| ControlError::Io { path: path.to_path_buf(), source };
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(ControlError::InUse(path.parent().map(Path::to_path_buf).unwrap_or_default()));
        }
        // Left behind by a node that did not exit cleanly.
        std::fs::remove_file(path).map_err(io)?;
    }
    // Created under a 0077 umask, then tightened to 0600 explicitly: owner only, like the
    // identity key, because the socket drives the node.
    // SAFETY: umask only changes this process's file creation mask.
    let old = unsafe { libc::umask(0o077) };
    let listener = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = listener.map_err(io)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(listener)
}

/// Accepts clients and forwards their requests to the hub. Only processes of this node's
/// own user are served: the socket's mode says so, and the peer's credentials
/// (SO_PEERCRED) are checked too, in case the mode was loosened.
pub async fn serve(listener: UnixListener, hub: mpsc::Sender<ControlRequest>) {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of descriptors, typically: back off rather than spin.
                tracing::warn!("control socket accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                continue;
            }
        };
        match stream.peer_cred() {
            Ok(c) if c.uid() == me => {}
            Ok(c) => {
                tracing::warn!(uid = c.uid(), "control socket: refused a client of another user");
                continue;
            }
            Err(e) => {
                tracing::warn!("control socket: cannot read the client's credentials, refused: {e}");
                continue;
            }
        }
        let hub = hub.clone();
        tokio::spawn(async move {
            let (rd, mut wr) = stream.into_split();
            let mut lines = BufReader::new(rd.take(MAX_REQUEST as u64)).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let reply = match serde_json::from_str::<Value>(&line) {
                    Ok(request) => {
                        let (tx, rx) = oneshot::channel();
                        if hub.send(ControlRequest { request, reply: tx }).await.is_err() {
                            json!({"ok": false, "error": "the node is shutting down"})
                        } else {
                            rx.await.unwrap_or_else(|_| json!({"ok": false, "error": "the node is shutting down"}))
                        }
                    }
                    Err(e) => json!({"ok": false, "error": format!("not JSON: {e}")}),
                };
                let mut out = reply.to_string();
                out.push('\n');
                if wr.write_all(out.as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// Sends one request to the node whose control socket is `path` and returns its reply.
pub async fn request(path: &Path, req: &Value, timeout: Duration) -> Result<Value, ControlError> {
    let io = |source| ControlError::Io { path: path.to_path_buf(), source };
    let stream = UnixStream::connect(path).await.map_err(io)?;
    let (rd, mut wr) = stream.into_split();
    let mut line = req.to_string();
    line.push('\n');
    wr.write_all(line.as_bytes()).await.map_err(io)?;
    let mut lines = BufReader::new(rd).lines();
    let reply = tokio::time::timeout(timeout, lines.next_line())
        .await
        .map_err(|_| io(std::io::Error::new(std::io::ErrorKind::TimedOut, "no reply")))?
        .map_err(io)?
        .ok_or_else(|| ControlError::Protocol(path.to_path_buf()))?;
    serde_json::from_str(&reply).map_err(|_| ControlError::Protocol(path.to_path_buf()))
}
