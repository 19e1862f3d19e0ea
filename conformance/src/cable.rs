//! A relay the runner puts between two stream endpoints — a null-modem cable it controls.
//!
//! Each side is a Unix socket the endpoint's child process connects to (pipe fixture, which
//! reconnects after respawns) or the far end of a socat pty pair (serial fixture). Bytes
//! from one side are written to the other; [`Cable::inject`] writes bytes towards one side
//! as if the other side had sent them; a side that hangs up takes the other side's current
//! connection down with it, like a peer that vanished.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Which end of the cable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Endpoint A.
    A,
    /// Endpoint B.
    B,
}

impl Side {
    fn index(self) -> usize {
        match self {
            Side::A => 0,
            Side::B => 1,
        }
    }
}

enum Conn {
    Unix(UnixStream),
    Pty(File),
}

impl Conn {
    fn write_all(&self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Conn::Unix(s) => (&*s).write_all(bytes),
            Conn::Pty(f) => (&*f).write_all(bytes),
        }
    }

    fn hang_up(&self) {
        if let Conn::Unix(s) = self {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

struct Shared {
    conns: [Mutex<Option<Arc<Conn>>>; 2],
    stop: AtomicBool,
}

impl Shared {
    fn current(&self, side: usize) -> Option<Arc<Conn>> {
        self.conns[side].lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, side: usize, conn: Option<Arc<Conn>>) -> Option<Arc<Conn>> {
        std::mem::replace(&mut *self.conns[side].lock().unwrap_or_else(|p| p.into_inner()), conn)
    }

    /// Clears `side` only if `conn` is still the connection there (one lock, so a newer
    /// connection installed meanwhile is never dropped by an old pump).
    fn clear_if_current(&self, side: usize, conn: &Arc<Conn>) -> bool {
        let mut slot = self.conns[side].lock().unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
            *slot = None;
            return true;
        }
        false
    }
}

/// The relay. Dropping it stops every thread.
pub struct Cable {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    sockets: Vec<PathBuf>,
}

fn poll_readable(fd: RawFd, timeout_ms: i32) -> bool {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd on the stack, count 1.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    n > 0
}

fn pump(shared: Arc<Shared>, me: usize, conn: Arc<Conn>) {
    let other = 1 - me;
    let mut buf = vec![0u8; 16 * 1024];
    let fd = match &*conn {
        Conn::Unix(s) => s.as_raw_fd(),
        Conn::Pty(f) => f.as_raw_fd(),
    };
    while !shared.stop.load(Ordering::Acquire) {
        if !poll_readable(fd, 50) {
            continue;
        }
        let n = match &*conn {
            Conn::Unix(s) => (&*s).read(&mut buf),
            Conn::Pty(f) => (&*f).read(&mut buf),
        };
        match n {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if let Some(peer) = shared.current(other) {
                    // Nobody on the other end: the bytes fall on the floor, as on a real line.
                    let _ = peer.write_all(&buf[..n]);
                }
            }
        }
    }
    // This side hung up: if it is still the current connection, drop it and take the
    // other side's line down too.
    if shared.clear_if_current(me, &conn) {
        if let Some(peer) = shared.current(other) {
            peer.hang_up();
        }
    }
}

impl Cable {
    /// A cable whose two sides are Unix sockets at `a` and `b`; each accepts reconnects.
    pub fn unix(a: &Path, b: &Path) -> std::io::Result<Cable> {
        let shared = Arc::new(Shared { conns: [Mutex::new(None), Mutex::new(None)], stop: AtomicBool::new(false) });
        let mut threads = Vec::new();
        for (i, path) in [a, b].into_iter().enumerate() {
            let listener = UnixListener::bind(path)?;
            listener.set_nonblocking(true)?;
            let sh = Arc::clone(&shared);
            threads.push(std::thread::spawn(move || {
                let mut pumps: Vec<JoinHandle<()>> = Vec::new();
                while !sh.stop.load(Ordering::Acquire) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            if stream.set_nonblocking(false).is_err() {
                                continue;
                            }
                            let conn = Arc::new(Conn::Unix(stream));
                            // Install first, then hang up the previous one: its pump then
                            // finds it is no longer current and leaves the new one alone.
                            if let Some(old) = sh.set(i, Some(Arc::clone(&conn))) {
                                old.hang_up();
                            }
                            let sh2 = Arc::clone(&sh);
                            pumps.push(std::thread::spawn(move || pump(sh2, i, conn)));
                            pumps.retain(|p| !p.is_finished());
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
                for p in pumps {
                    let _ = p.join();
                }
            }));
        }
        Ok(Cable { shared, threads, sockets: vec![a.to_path_buf(), b.to_path_buf()] })
    }

    /// A cable between two pty devices (the far ends of two socat pty pairs).
    pub fn pty(a: &Path, b: &Path) -> std::io::Result<Cable> {
        let shared = Arc::new(Shared { conns: [Mutex::new(None), Mutex::new(None)], stop: AtomicBool::new(false) });
        let mut threads = Vec::new();
        for (i, path) in [a, b].into_iter().enumerate() {
            let f = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
            let conn = Arc::new(Conn::Pty(f));
            let _ = shared.set(i, Some(Arc::clone(&conn)));
            let sh = Arc::clone(&shared);
            threads.push(std::thread::spawn(move || pump(sh, i, conn)));
        }
        Ok(Cable { shared, threads, sockets: Vec::new() })
    }

    /// Whether both sides currently have a connection.
    pub fn connected(&self) -> bool {
        self.shared.current(0).is_some() && self.shared.current(1).is_some()
    }

    /// Writes `bytes` towards `side`, as if the other side had sent them.
    pub fn inject(&self, side: Side, bytes: &[u8]) -> std::io::Result<()> {
        match self.shared.current(side.index()) {
            Some(c) => c.write_all(bytes),
            None => Err(std::io::Error::new(std::io::ErrorKind::NotConnected, "that side of the cable is not connected")),
        }
    }
}

impl Drop for Cable {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        for i in 0..2 {
            if let Some(c) = self.shared.set(i, None) {
                c.hang_up();
            }
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        for s in &self.sockets {
            let _ = std::fs::remove_file(s);
        }
    }
}
