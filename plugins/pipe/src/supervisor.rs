//! The pipe instance's threads.
//!
//! One supervisor thread per instance owns the child: it spawns it, reads and decodes its
//! stdout, notices when it exits, kills what is left of its process group, reaps it and
//! respawns it after a backoff. Each child gets its own writer thread that drains the
//! instance's `Outbox` into the child's stdin; the supervisor joins that writer before it
//! reports the child down, so no writer outlives the child it was writing to. Both threads
//! belong to the instance's `Crew`, which is what lets `close` wait for them even when it
//! is called from a callback on one of them. Every blocking wait also watches the
//! instance's `StopSignal`, which is what keeps `close` fast.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

use abi_stable::std_types::{RSlice, RString};
use antmesh_plugin_api::{guard, Host, InFrame, LinkAddr, LogLevel};
use antmesh_plugin_kit::{Backoff, Codec, Decoded, Outbox};

use crate::config::Config;
use antmesh_plugin_kit::sys::{
    block_sigpipe_in_this_thread, child_exited, new_session_on_spawn, poll, pollfd, set_nonblocking, signal_group,
    Crew, StopSignal,
};

/// A child that lived this long was healthy: the next respawn starts from the minimum delay.
const HEALTHY_LIFETIME: Duration = Duration::from_secs(5);
/// How long a child gets between SIGTERM and SIGKILL (kept short: `close` waits for it).
const TERM_GRACE: Duration = Duration::from_millis(100);
/// How long a child that closed its stdout gets to exit on its own before it is killed.
const EOF_GRACE: Duration = Duration::from_millis(100);
/// Upper bound on one reader `poll`; the supervisor checks on the child this often.
const READER_TICK: Duration = Duration::from_millis(100);
/// Upper bound on one writer wait; the writer checks whether its child is finished this often.
const WRITER_TICK: Duration = Duration::from_millis(50);
/// Bytes per read from the child's stdout (one delivered batch per read).
const READ_CHUNK: usize = 64 * 1024;
/// Frames taken from the outbox per write.
const WRITE_BATCH: usize = 64;
/// Reads allowed when draining the stdout of a child that has already exited; bounded
/// because a grandchild may still hold the pipe and keep writing.
const DRAIN_READS: usize = 64;

/// State shared by the transport handle and its threads.
pub(crate) struct Shared {
    pub cfg: Config,
    /// The peer as `send` expects it and as frames are delivered from it.
    pub peer: LinkAddr,
    /// The name inside `peer`, for cheap comparisons in `send`.
    pub peer_name: RString,
    pub host: Host,
    pub outbox: Outbox<Vec<u8>>,
    /// Whether a child is running and `send` may queue for it.
    pub child_up: AtomicBool,
    /// Triggered by `close`; `host` (and the outbox's copy of it) is gated on it.
    pub stop: Arc<StopSignal>,
    /// The supervisor and the current writer.
    pub crew: Arc<Crew>,
}

/// Starts the configured command with piped stdin/stdout in a session (and so a process
/// group) of its own: killing the group also reaches whatever it forked (`sh -c 'a | b'`),
/// and without a controlling terminal it can never be stopped by SIGTTIN/SIGTTOU for
/// touching the host's terminal.
pub(crate) fn spawn_child(cfg: &Config) -> io::Result<Child> {
    let mut cmd = Command::new(&cfg.command);
    cmd.args(&cfg.args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit());
    new_session_on_spawn(&mut cmd).spawn()
}

/// Why a session ended, as far as the reader could tell.
enum End {
    /// The instance is closing.
    Closing,
    /// The child exited (seen, not reaped yet: its group is killed first).
    Exited,
    /// The child closed its stdout.
    Eof,
    /// The child must go: bad stream, a failed write to its stdin, a read error.
    Kill(String),
}

/// Why the writer stopped writing.
enum WriteEnd {
    /// The session or the instance is ending.
    Stopped,
    /// The child's stdin failed.
    Failed(io::Error),
}

/// What a wait for the child found.
enum Exit {
    /// Still running.
    Running,
    /// Exited, not reaped yet: its pid, and so its group id, is still ours.
    Exited,
    /// Not our child to wait for any more (reaped by someone else, e.g. the kernel when
    /// the host ignores SIGCHLD); its group id may already belong to someone else.
    Gone(io::Error),
}

/// One running child with its writer thread. Dropping it kills the child's process group,
/// reaps the child and joins the writer, so not even a panic in the supervisor leaves a
/// process behind.
pub(crate) struct Session {
    shared: Arc<Shared>,
    child: Child,
    stdout: Option<ChildStdout>,
    writer: Option<ThreadId>,
    /// Tells the writer this child is finished.
    ended: Arc<AtomicBool>,
    /// Set by the writer when a write to stdin failed.
    write_error: Arc<Mutex<Option<String>>>,
    /// How the child ended, once it is reaped (or found reaped elsewhere).
    outcome: Option<String>,
    started: Instant,
}

impl Session {
    /// Takes over a freshly spawned child and starts its writer thread.
    pub(crate) fn start(shared: &Arc<Shared>, mut child: Child) -> io::Result<Session> {
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let mut session = Session {
            shared: Arc::clone(shared),
            child,
            stdout: None,
            writer: None,
            ended: Arc::new(AtomicBool::new(false)),
            write_error: Arc::new(Mutex::new(None)),
            outcome: None,
            started: Instant::now(),
        };
        let (Some(stdin), Some(stdout)) = (stdin, stdout) else {
            return Err(io::Error::other("child was spawned without stdio pipes"));
        };
        set_nonblocking(stdout.as_raw_fd())?;
        set_nonblocking(stdin.as_raw_fd())?;
        session.stdout = Some(stdout);
        let (sh, ended, err) = (Arc::clone(shared), Arc::clone(&session.ended), Arc::clone(&session.write_error));
        let writer = shared.crew.spawn("am-pipe-wr", move || {
            let host = sh.host.clone();
            if let Err(msg) = guard(|| writer_main(&sh, &stdin, &ended, &err)) {
                host.log(LogLevel::Error, &format!("pipe writer thread panicked: {msg}"));
            }
        })?;
        session.writer = Some(writer);
        Ok(session)
    }

    fn write_error(&self) -> Option<String> {
        self.write_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Makes sure the child and its process group are gone and the child reaped (waiting
    /// `natural` for it to exit by itself first), joins the writer, and returns how the
    /// child ended, as text.
    fn finish(&mut self, natural: Duration) -> String {
        self.ended.store(true, Ordering::SeqCst);
        let outcome = self.reap(natural);
        if let Some(w) = self.writer.take() {
            // Returns at once if the writer is the thread that called `close` (from a
            // callback): it may be waiting for this thread, and finishes on its own.
            self.shared.crew.join(w);
        }
        self.stdout = None;
        outcome
    }

    fn reap(&mut self, natural: Duration) -> String {
        if let Some(outcome) = &self.outcome {
            return outcome.clone();
        }
        let outcome = self.stop_and_reap(natural);
        self.outcome = Some(outcome.clone());
        outcome
    }

    fn stop_and_reap(&mut self, natural: Duration) -> String {
        let pid = self.child.id();
        let mut exit = self.wait_for_exit(natural);
        if matches!(exit, Exit::Running) {
            signal_group(pid, libc::SIGTERM);
            exit = self.wait_for_exit(TERM_GRACE);
        }
        if let Exit::Gone(e) = exit {
            // Its group id may be reused by now, so its group is left alone.
            return gone_text(&e);
        }
        // The child is not reaped yet, so its pid, which is its group's id, cannot have been
        // reused: kill whatever is left of the group before reaping it. That is everything
        // when the child ignored SIGTERM, and its own children (`sh -c 'a | b'`, a
        // background job) when it exited by itself: they would otherwise outlive it, the
        // respawns and `close`.
        signal_group(pid, libc::SIGKILL);
        // After SIGKILL the wait is short; it is also what keeps the child from lingering
        // as a zombie.
        match self.child.wait() {
            Ok(st) => st.to_string(),
            Err(e) => format!("unknown status ({e})"),
        }
    }

    /// Polls for the child's exit for up to `limit`, without reaping it.
    fn wait_for_exit(&mut self, limit: Duration) -> Exit {
        let deadline = Instant::now() + limit;
        loop {
            match child_exited(self.child.id()) {
                Ok(true) => return Exit::Exited,
                Ok(false) => {}
                Err(e) => return Exit::Gone(e),
            }
            if Instant::now() >= deadline {
                return Exit::Running;
            }
            thread::sleep(Duration::from_millis(2));
        }
    }
}

/// The exit status text for a child someone else reaped.
fn gone_text(e: &io::Error) -> String {
    format!("unknown status (reaped elsewhere: {e})")
}

impl Drop for Session {
    fn drop(&mut self) {
        self.finish(Duration::ZERO);
    }
}

/// The supervisor thread's body: runs `first`, then respawns until closed.
pub(crate) fn supervise(shared: &Arc<Shared>, first: Session) {
    let cfg = &shared.cfg;
    let mut backoff =
        Backoff::new(Duration::from_millis(cfg.backoff_min_ms), Duration::from_millis(cfg.backoff_max_ms));
    let mut next = Some(first);
    loop {
        let mut session = match next.take() {
            Some(s) => s,
            None => match spawn_child(cfg).and_then(|c| Session::start(shared, c)) {
                Ok(s) => s,
                Err(e) => {
                    shared.host.warn(&format!("respawning `{}` failed: {e}", cfg.command));
                    if shared.stop.wait(backoff.next_delay()) {
                        return;
                    }
                    continue;
                }
            },
        };
        shared.child_up.store(true, Ordering::SeqCst);
        shared.host.link_up(&shared.peer);

        let mut drops = 0usize;
        let end = read_child(shared, &mut session, &mut drops);
        shared.child_up.store(false, Ordering::SeqCst);
        let reason = match end {
            End::Closing => {
                session.finish(Duration::ZERO);
                shared.outbox.clear();
                return;
            }
            End::Exited => format!("child exited: {}", session.finish(Duration::ZERO)),
            End::Eof => {
                let natural = session.finish(EOF_GRACE);
                format!("child exited: {natural}")
            }
            End::Kill(why) => format!("child exited: {} (killed: {why})", session.finish(Duration::ZERO)),
        };
        shared.outbox.clear();
        if drops > 0 {
            shared.host.debug(&format!("dropped {drops} malformed frames from the child's stdout"));
        }
        shared.host.link_down(&shared.peer, &reason);
        if session.started.elapsed() >= HEALTHY_LIFETIME {
            backoff.reset();
        }
        drop(session);
        if !cfg.respawn {
            shared.host.info("child is not respawned (respawn: false)");
            return;
        }
        if shared.stop.wait(backoff.next_delay()) {
            return;
        }
    }
}

/// Reads the child's stdout until the session ends, delivering one batch per read.
fn read_child(shared: &Shared, session: &mut Session, drops: &mut usize) -> End {
    let Some(mut stdout) = session.stdout.take() else {
        return End::Kill("no stdout".to_owned());
    };
    let end = read_loop(shared, session, &mut stdout, drops);
    // Kept open until the child is reaped, so it never dies of SIGPIPE on its way out.
    session.stdout = Some(stdout);
    end
}

fn read_loop(shared: &Shared, session: &mut Session, stdout: &mut ChildStdout, drops: &mut usize) -> End {
    let fd = stdout.as_raw_fd();
    let mut codec = Codec::new(shared.cfg.framing, shared.cfg.mtu as usize);
    let mut buf = vec![0u8; READ_CHUNK];
    let mut decoded = Vec::new();
    loop {
        if shared.stop.is_set() {
            return End::Closing;
        }
        if let Some(e) = session.write_error() {
            return End::Kill(format!("writing to its stdin failed: {e}"));
        }
        let mut fds = [pollfd(fd, libc::POLLIN), pollfd(shared.stop.fd(), libc::POLLIN)];
        if let Err(e) = poll(&mut fds, READER_TICK) {
            return End::Kill(format!("poll failed: {e}"));
        }
        if fds[0].revents != 0 {
            match stdout.read(&mut buf) {
                Ok(0) => return End::Eof,
                Ok(n) => {
                    if let Err(e) = consume(shared, &mut codec, &buf[..n], &mut decoded, drops) {
                        return End::Kill(e);
                    }
                }
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
                Err(e) => return End::Kill(format!("reading its stdout failed: {e}")),
            }
        }
        // Only noticed here, not reaped: `finish` kills the rest of its group first.
        let exited = match child_exited(session.child.id()) {
            Ok(exited) => exited,
            Err(e) => {
                // Someone else reaped it: it is gone, and its group must not be signalled.
                session.outcome = Some(gone_text(&e));
                true
            }
        };
        if exited {
            // Whatever it wrote before exiting is still in the pipe: deliver it.
            for _ in 0..DRAIN_READS {
                if shared.stop.is_set() {
                    return End::Closing;
                }
                match stdout.read(&mut buf) {
                    Ok(n) if n > 0 => {
                        if consume(shared, &mut codec, &buf[..n], &mut decoded, drops).is_err() {
                            break;
                        }
                    }
                    _ => break,
                }
            }
            return End::Exited;
        }
    }
}

/// Decodes `bytes` and delivers the frames as one batch; `Err` on an unrecoverable stream.
fn consume(
    shared: &Shared,
    codec: &mut Codec,
    bytes: &[u8],
    decoded: &mut Vec<Decoded>,
    drops: &mut usize,
) -> Result<(), String> {
    decoded.clear();
    let result = codec.decode(bytes, decoded);
    // Frames decoded before a fatal error are intact: deliver them first.
    let frames: Vec<InFrame<'_>> = decoded
        .iter()
        .filter_map(|d| match d {
            Decoded::Frame(f) => Some(InFrame { from: shared.peer.clone(), data: RSlice::from_slice(f) }),
            Decoded::Dropped(_) => None,
        })
        .collect();
    *drops += decoded.len() - frames.len();
    shared.host.deliver(&frames);
    result.map_err(|e| e.to_string())
}

/// The writer thread's body: outbox → encode → child's stdin, until the session ends.
fn writer_main(shared: &Shared, stdin: &ChildStdin, ended: &AtomicBool, error: &Mutex<Option<String>>) {
    block_sigpipe_in_this_thread();
    let codec = Codec::new(shared.cfg.framing, shared.cfg.mtu as usize);
    let mut batch: Vec<Vec<u8>> = Vec::new();
    let mut wire = Vec::new();
    while !ended.load(Ordering::SeqCst) && !shared.stop.is_set() {
        match shared.outbox.wait_drain(&mut batch, WRITE_BATCH, WRITER_TICK) {
            None => return,
            Some(0) => continue,
            Some(_) => {}
        }
        wire.clear();
        for frame in batch.drain(..) {
            codec.encode(&frame, &mut wire);
        }
        match write_all(shared, stdin, &wire, ended) {
            Ok(()) => {}
            Err(WriteEnd::Stopped) => return,
            Err(WriteEnd::Failed(e)) => {
                *error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                return;
            }
        }
    }
}

/// Writes all of `data` to the non-blocking `stdin`, giving up when the session ends.
fn write_all(shared: &Shared, stdin: &ChildStdin, mut data: &[u8], ended: &AtomicBool) -> Result<(), WriteEnd> {
    let mut stdin: &ChildStdin = stdin;
    while !data.is_empty() {
        if ended.load(Ordering::SeqCst) || shared.stop.is_set() {
            return Err(WriteEnd::Stopped);
        }
        let mut fds = [pollfd(stdin.as_raw_fd(), libc::POLLOUT), pollfd(shared.stop.fd(), libc::POLLIN)];
        poll(&mut fds, WRITER_TICK).map_err(WriteEnd::Failed)?;
        if fds[0].revents == 0 {
            continue;
        }
        match stdin.write(data) {
            Ok(0) => return Err(WriteEnd::Failed(io::Error::from(io::ErrorKind::WriteZero))),
            Ok(n) => data = &data[n..],
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
            Err(e) => return Err(WriteEnd::Failed(e)),
        }
    }
    Ok(())
}
