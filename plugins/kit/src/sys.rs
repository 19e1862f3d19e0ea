//! Thin, safe wrappers over the few POSIX calls std does not offer, for plugin I/O threads:
//! `poll` on several descriptors, a pollable stop signal, non-blocking mode, plain
//! `read`/`write` on a raw descriptor (so EIO from a hung-up tty arrives as itself),
//! per-thread SIGPIPE masking and signalling a process group.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// A one-shot "stop now" flag that threads can also wait on inside `poll`, so a thread
/// blocked on I/O notices `close` at once instead of at its next timeout.
pub struct StopSignal {
    flag: AtomicBool,
    read_end: OwnedFd,
    write_end: OwnedFd,
}

impl StopSignal {
    /// A fresh, untriggered signal (two close-on-exec descriptors).
    pub fn new() -> io::Result<StopSignal> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` is a valid two-element array for pipe2 to fill.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        let (read_end, write_end) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok(StopSignal { flag: AtomicBool::new(false), read_end, write_end })
    }

    /// Triggers the signal. The byte is never read back, so the read end stays readable
    /// and every later `poll` on it returns at once.
    pub fn trigger(&self) {
        if !self.flag.swap(true, Ordering::SeqCst) {
            let byte = 1u8;
            // SAFETY: writing one byte from a valid buffer to a descriptor we own. A full
            // pipe (EAGAIN) cannot happen for the first byte and would not matter anyway.
            let _ = unsafe { libc::write(self.write_end.as_raw_fd(), (&byte as *const u8).cast(), 1) };
        }
    }

    /// Whether `trigger` was called.
    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// The descriptor to include in a `poll` set (readable once triggered).
    pub fn fd(&self) -> RawFd {
        self.read_end.as_raw_fd()
    }

    /// Sleeps up to `timeout`, returning early (with `true`) once triggered.
    pub fn wait(&self, timeout: Duration) -> bool {
        if self.is_set() {
            return true;
        }
        let mut fds = [pollfd(self.fd(), libc::POLLIN)];
        let _ = poll(&mut fds, timeout);
        self.is_set()
    }
}

/// A `pollfd` asking for `events` on `fd`.
pub fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd { fd, events, revents: 0 }
}

/// `poll(2)` with a `Duration`; an interrupted call counts as a timeout.
pub fn poll(fds: &mut [libc::pollfd], timeout: Duration) -> io::Result<usize> {
    for f in fds.iter_mut() {
        f.revents = 0;
    }
    // Round up so a sub-millisecond remainder does not turn into a busy loop.
    let ms = timeout.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as libc::c_int;
    // SAFETY: `fds` is a valid, exclusively borrowed slice of pollfd structures.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(err);
    }
    Ok(rc as usize)
}

/// Puts `fd` into non-blocking mode, so a read or write after `poll` can never hang.
pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor the caller keeps open for the duration of the call.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above; only the O_NONBLOCK status flag changes.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Blocks SIGPIPE for the calling thread. A write to a pipe whose reader is gone then
/// fails with EPIPE instead of killing the host process (not every host ignores SIGPIPE).
pub fn block_sigpipe_in_this_thread() {
    // SAFETY: the sigset is initialised by sigemptyset before use; pthread_sigmask only
    // changes the calling thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGPIPE);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Sends `signal` to the process group led by `pgid` (the child and whatever it forked).
pub fn signal_group(pgid: u32, signal: libc::c_int) {
    let Ok(pgid) = libc::pid_t::try_from(pgid) else { return };
    if pgid <= 1 {
        return; // never signal "every process" or init by accident
    }
    // SAFETY: kill has no memory-safety preconditions; the group exists at least as long
    // as its unreaped leader does, and the caller only calls this before reaping it.
    let _ = unsafe { libc::kill(-pgid, signal) };
}

/// `read(2)` into `buf`.
pub fn read_fd(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the duration of the call.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// `write(2)` from `buf`.
pub fn write_fd(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the duration of the call.
    let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}
