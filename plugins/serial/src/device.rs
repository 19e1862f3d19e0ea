//! The serial instance's threads.
//!
//! The device thread owns the port: it opens (and after a failure, reopens with backoff)
//! the device, reads and decodes what arrives, tracks the peer's liveness from keepalives,
//! and reports link state. For each opened port it starts a writer thread on a duplicate
//! descriptor that drains the instance's `Outbox`, frames the data and sends keepalives;
//! the device thread joins that writer before it reports the device down, so no writer
//! outlives the port it writes to. Both threads belong to the instance's `Crew`, which is
//! what lets `close` wait for them even when it is called from a callback on one of them.
//! Every blocking wait also watches the instance's `StopSignal`, which is what keeps
//! `close` fast.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use abi_stable::std_types::{RSlice, RString};
use antmesh_plugin_api::{guard, Host, InFrame, LinkAddr, LogLevel};
use antmesh_plugin_kit::{Backoff, Codec, Decoded, FramingKind, Outbox};
use serialport::TTYPort;

use crate::config::Config;
use antmesh_plugin_kit::sys::{poll, pollfd, read_fd, set_nonblocking, write_fd, Crew, StopSignal};

/// HDLC payload type byte: the rest of the frame is data for the host.
pub(crate) const TYPE_DATA: u8 = 0x00;
/// HDLC payload type byte: a keepalive, never delivered.
pub(crate) const TYPE_KEEPALIVE: u8 = 0x01;

/// A port that stayed usable this long was healthy: the next reopen starts from the
/// minimum delay again.
const HEALTHY_LIFETIME: Duration = Duration::from_secs(5);
/// Upper bound on one blocking wait in either thread.
const IO_TICK: Duration = Duration::from_millis(50);
/// Bytes per read.
const READ_CHUNK: usize = 4096;
/// Frames taken from the outbox per write.
const WRITE_BATCH: usize = 32;
/// Consecutive zero-byte reads that count as a hangup (a tty in raw mode never returns 0
/// while its line is up).
const ZERO_READS_HANGUP: u32 = 3;

/// State shared by the transport handle and its threads.
pub(crate) struct Shared {
    pub cfg: Config,
    /// The peer as `send` expects it and as frames are delivered from it.
    pub peer: LinkAddr,
    /// The name inside `peer`, for cheap comparisons in `send`.
    pub peer_name: RString,
    pub host: Host,
    pub outbox: Outbox<Vec<u8>>,
    /// Whether the device is open and `send` may queue for it.
    pub device_open: AtomicBool,
    /// Triggered by `close`; `host` (and the outbox's copy of it) is gated on it.
    pub stop: Arc<StopSignal>,
    /// The device thread and the current writer.
    pub crew: Arc<Crew>,
}

/// Opens the device (exclusive access, raw mode) and makes it non-blocking: both threads
/// `poll` before they touch it, and a blocking write to a stalled line would hang `close`.
pub(crate) fn open_port(cfg: &Config) -> Result<TTYPort, String> {
    let port = serialport::new(cfg.path.as_str(), cfg.baud)
        .timeout(IO_TICK)
        .open_native()
        .map_err(|e| format!("opening serial device {}: {e}", cfg.path))?;
    set_nonblocking(port.as_raw_fd()).map_err(|e| format!("configuring serial device {}: {e}", cfg.path))?;
    Ok(port)
}

/// Why a port session ended.
enum End {
    /// The instance is closing.
    Closing,
    /// The device failed or hung up.
    Device(String),
}

/// Why the writer stopped writing.
enum WriteEnd {
    Stopped,
    Failed(io::Error),
}

/// The writer thread of one port session. Dropping it stops and joins the thread, so not
/// even a panic in the device thread leaves a writer running after `close`.
struct Writer {
    ended: Arc<AtomicBool>,
    error: Arc<Mutex<Option<String>>>,
    crew: Arc<Crew>,
    thread: Option<ThreadId>,
}

impl Writer {
    fn start(shared: &Arc<Shared>, port: TTYPort) -> io::Result<Writer> {
        let ended = Arc::new(AtomicBool::new(false));
        let error = Arc::new(Mutex::new(None));
        let (sh, e2, err2) = (Arc::clone(shared), Arc::clone(&ended), Arc::clone(&error));
        let thread = shared.crew.spawn("am-serial-wr", move || {
            if let Err(msg) = guard(|| writer_main(&sh, &port, &e2, &err2)) {
                sh.host.log(LogLevel::Error, &format!("serial writer thread panicked: {msg}"));
            }
        })?;
        Ok(Writer { ended, error, crew: Arc::clone(&shared.crew), thread: Some(thread) })
    }

    fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn stop(&mut self) {
        self.ended.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            // Returns at once if the writer is the thread that called `close` (from a
            // callback): it may be waiting for this thread, and finishes on its own.
            self.crew.join(t);
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What the device thread knows about the peer.
struct Link {
    up: bool,
    last_rx: Instant,
}

/// The device thread's body: runs `first`, then reopens the device until closed.
pub(crate) fn run(shared: &Arc<Shared>, first: TTYPort) {
    let cfg = &shared.cfg;
    let mut backoff = Backoff::new(
        Duration::from_millis(cfg.reopen_backoff_min_ms),
        Duration::from_millis(cfg.reopen_backoff_max_ms),
    );
    let mut next = Some(first);
    let mut failures = 0u32;
    loop {
        let port = match next.take() {
            Some(p) => p,
            None => match open_port(cfg) {
                Ok(p) => {
                    shared.host.info(&format!("serial device {} reopened", cfg.path));
                    p
                }
                Err(e) => {
                    // The first failure in a row is news; the retries are not.
                    let level = if failures == 0 { LogLevel::Warn } else { LogLevel::Debug };
                    shared.host.log(level, &format!("{e}; retrying"));
                    failures = failures.saturating_add(1);
                    if shared.stop.wait(backoff.next_delay()) {
                        return;
                    }
                    continue;
                }
            },
        };
        failures = 0;
        let started = Instant::now();
        match session(shared, port) {
            End::Closing => return,
            End::Device(e) => shared.host.warn(&format!("serial device {}: {e}", cfg.path)),
        }
        if started.elapsed() >= HEALTHY_LIFETIME {
            backoff.reset();
        }
        if shared.stop.wait(backoff.next_delay()) {
            return;
        }
    }
}

/// Runs one opened port until it fails or the instance closes.
fn session(shared: &Arc<Shared>, port: TTYPort) -> End {
    let mut writer = match port.try_clone_native().map_err(io::Error::from).and_then(|w| Writer::start(shared, w)) {
        Ok(w) => w,
        Err(e) => return End::Device(format!("device error: starting the writer: {e}")),
    };
    shared.device_open.store(true, Ordering::SeqCst);
    let mut link = Link { up: false, last_rx: Instant::now() };
    if shared.cfg.keepalive().is_none() {
        // Without keepalives nothing better than "the device is open" is known.
        link.up = true;
        shared.host.link_up(&shared.peer);
    }
    let end = read_loop(shared, port.as_raw_fd(), &writer, &mut link);
    shared.device_open.store(false, Ordering::SeqCst);
    writer.stop();
    drop(port);
    shared.outbox.clear();
    if let End::Device(reason) = &end {
        if link.up {
            shared.host.link_down(&shared.peer, reason);
        }
    }
    end
}

/// Reads and decodes until the device fails or the instance closes.
fn read_loop(shared: &Shared, fd: RawFd, writer: &Writer, link: &mut Link) -> End {
    let cfg = &shared.cfg;
    let keepalive = cfg.keepalive();
    let dead_after = Duration::from_millis(cfg.dead_after_ms);
    // HDLC frames carry a type byte in front of up to `mtu` bytes of data.
    let max_frame = cfg.mtu as usize + usize::from(cfg.framing == FramingKind::Hdlc);
    let mut codec = Codec::new(cfg.framing, max_frame);
    let mut buf = vec![0u8; READ_CHUNK];
    let mut decoded = Vec::new();
    let mut zero_reads = 0u32;
    loop {
        if shared.stop.is_set() {
            return End::Closing;
        }
        if let Some(e) = writer.error() {
            return End::Device(format!("device error: write failed: {e}"));
        }
        if keepalive.is_some() && link.up && link.last_rx.elapsed() >= dead_after {
            link.up = false;
            shared.host.link_down(&shared.peer, &format!("no frames for {} ms", cfg.dead_after_ms));
        }
        let mut fds = [pollfd(fd, libc::POLLIN), pollfd(shared.stop.fd(), libc::POLLIN)];
        if let Err(e) = poll(&mut fds, IO_TICK) {
            return End::Device(format!("device error: poll failed: {e}"));
        }
        let revents = fds[0].revents;
        if revents == 0 {
            continue;
        }
        if revents & libc::POLLNVAL != 0 {
            return End::Device("device error: descriptor invalid".to_owned());
        }
        // On POLLHUP/POLLERR the read below reports the actual error (EIO for a pty whose
        // other side closed) or whatever data is still buffered.
        match read_fd(fd, &mut buf) {
            Ok(0) => {
                zero_reads += 1;
                if zero_reads >= ZERO_READS_HANGUP {
                    return End::Device("device error: hung up (end of file)".to_owned());
                }
            }
            Ok(n) => {
                zero_reads = 0;
                decoded.clear();
                // Neither HDLC nor KISS has unrecoverable errors: they resynchronise.
                let _ = codec.decode(&buf[..n], &mut decoded);
                handle_frames(shared, &decoded, link, keepalive.is_some());
            }
            // Nothing to read although poll said hangup: it will not get better.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && revents & (libc::POLLHUP | libc::POLLERR) != 0 => {
                return End::Device("device error: hung up".to_owned());
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
            Err(e) => return End::Device(format!("device error: {e}")),
        }
    }
}

/// Delivers the data frames among `decoded` as one batch and updates liveness.
fn handle_frames(shared: &Shared, decoded: &[Decoded], link: &mut Link, keepalives: bool) {
    let mut frames = Vec::new();
    let mut valid = false;
    for d in decoded {
        let Decoded::Frame(f) = d else { continue };
        let data = match shared.cfg.framing {
            FramingKind::Hdlc => match f.split_first() {
                Some((&TYPE_DATA, data)) => Some(data),
                Some((&TYPE_KEEPALIVE, _)) => None,
                // Unknown type (a newer peer?) or empty: not ours to interpret.
                _ => continue,
            },
            FramingKind::Kiss | FramingKind::Length => Some(f.as_slice()),
        };
        valid = true;
        if let Some(data) = data {
            frames.push(InFrame { from: shared.peer.clone(), data: RSlice::from_slice(data) });
        }
    }
    if valid {
        link.last_rx = Instant::now();
        if keepalives && !link.up {
            link.up = true;
            shared.host.link_up(&shared.peer);
        }
    }
    shared.host.deliver(&frames);
}

/// The writer thread's body: outbox → frame → device, plus keepalives when idle.
fn writer_main(shared: &Shared, port: &TTYPort, ended: &AtomicBool, error: &Mutex<Option<String>>) {
    let cfg = &shared.cfg;
    let keepalive = cfg.keepalive();
    let codec = Codec::new(cfg.framing, cfg.mtu as usize + 1);
    let fd = port.as_raw_fd();
    let mut batch: Vec<Vec<u8>> = Vec::new();
    let mut wire = Vec::new();
    let mut typed = Vec::new();
    // None: nothing sent yet, so the first keepalive goes out at once and the peer sees
    // the link come up without waiting a whole interval.
    let mut last_tx: Option<Instant> = None;
    while !ended.load(Ordering::SeqCst) && !shared.stop.is_set() {
        let until_keepalive = match (keepalive, last_tx) {
            (Some(k), Some(t)) => k.saturating_sub(t.elapsed()),
            (Some(_), None) => Duration::ZERO,
            (None, _) => IO_TICK,
        };
        if shared.outbox.wait_drain(&mut batch, WRITE_BATCH, until_keepalive.min(IO_TICK)).is_none() {
            return; // the outbox was closed: the instance is closing
        }
        wire.clear();
        for frame in batch.drain(..) {
            if cfg.framing == FramingKind::Hdlc {
                typed.clear();
                typed.push(TYPE_DATA);
                typed.extend_from_slice(&frame);
                codec.encode(&typed, &mut wire);
            } else {
                codec.encode(&frame, &mut wire);
            }
        }
        // Data frames prove liveness too, so a keepalive is only sent on an idle line.
        if wire.is_empty() {
            match (keepalive, last_tx) {
                (Some(k), Some(t)) if t.elapsed() >= k => codec.encode(&[TYPE_KEEPALIVE], &mut wire),
                (Some(_), None) => codec.encode(&[TYPE_KEEPALIVE], &mut wire),
                _ => continue,
            }
        }
        match write_all(shared, fd, &wire, ended) {
            Ok(()) => last_tx = Some(Instant::now()),
            Err(WriteEnd::Stopped) => return,
            Err(WriteEnd::Failed(e)) => {
                *error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                return;
            }
        }
    }
}

/// Writes all of `data` to the non-blocking device, giving up when the session ends.
fn write_all(shared: &Shared, fd: RawFd, mut data: &[u8], ended: &AtomicBool) -> Result<(), WriteEnd> {
    while !data.is_empty() {
        if ended.load(Ordering::SeqCst) || shared.stop.is_set() {
            return Err(WriteEnd::Stopped);
        }
        let mut fds = [pollfd(fd, libc::POLLOUT), pollfd(shared.stop.fd(), libc::POLLIN)];
        poll(&mut fds, IO_TICK).map_err(WriteEnd::Failed)?;
        if fds[0].revents == 0 {
            continue;
        }
        match write_fd(fd, data) {
            Ok(0) => return Err(WriteEnd::Failed(io::Error::from(io::ErrorKind::WriteZero))),
            Ok(n) => data = &data[n..],
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
            Err(e) => return Err(WriteEnd::Failed(e)),
        }
    }
    Ok(())
}
