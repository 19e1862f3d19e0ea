//! Thin, safe wrappers over the few POSIX calls std does not offer, for plugin I/O threads:
//! `poll` on several descriptors, a pollable stop signal, non-blocking mode, plain
//! `read`/`write` on a raw descriptor (so EIO from a hung-up tty arrives as itself),
//! per-thread SIGPIPE masking, starting a child in a session of its own, noticing a child's
//! exit without reaping it and signalling its process group. Also the two pieces every
//! plugin's `close` needs around its threads: a [`Crew`] that joins them (even when `close`
//! runs on one of them) and a host gate ([`StopSignal::gate`]) that silences callbacks once
//! the instance is closing.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle, ThreadId};
use std::time::Duration;

use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RArc, RSlice, RStr};
use antmesh_plugin_api::{Host, HostHandle, HostHandle_TO, InFrame, LinkAddr, LogLevel};

/// A one-shot "stop now" flag that threads can also wait on inside `poll`, so a thread
/// blocked on I/O notices `close` at once instead of at its next timeout.
pub struct StopSignal {
    flag: AtomicBool,
    /// The pipe's read end as handed out by `fd`; -1 once `release`d (`poll` ignores
    /// negative descriptors).
    read_fd: AtomicI32,
    /// Both ends of the pipe, until `release` closes them. Behind a lock only so that
    /// `trigger` never writes to a descriptor `release` is closing at the same time.
    ends: Mutex<Option<(OwnedFd, OwnedFd)>>,
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
        Ok(StopSignal {
            flag: AtomicBool::new(false),
            read_fd: AtomicI32::new(read_end.as_raw_fd()),
            ends: Mutex::new(Some((read_end, write_end))),
        })
    }

    fn lock_ends(&self) -> MutexGuard<'_, Option<(OwnedFd, OwnedFd)>> {
        // Nothing can panic while the lock is held; if it did, the descriptors are intact.
        self.ends.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Triggers the signal. The byte is never read back, so the read end stays readable
    /// and every later `poll` on it returns at once.
    pub fn trigger(&self) {
        if !self.flag.swap(true, Ordering::SeqCst) {
            if let Some((_, write_end)) = self.lock_ends().as_ref() {
                let byte = 1u8;
                // SAFETY: writing one byte from a valid buffer to a descriptor the held lock
                // keeps open. A full pipe (EAGAIN) cannot happen for the first byte and
                // would not matter anyway.
                let _ = unsafe { libc::write(write_end.as_raw_fd(), (&byte as *const u8).cast(), 1) };
            }
        }
    }

    /// Triggers the signal (if it was not already) and closes its two descriptors, so a
    /// closed instance that the host keeps around holds no pipe. Call it only once no
    /// thread polls [`fd`](Self::fd) any more (all joined): a descriptor number polled after
    /// it was closed may by then name an unrelated file. `is_set` and `wait` keep working
    /// (both report "stopped"), `fd` returns -1 afterwards. Idempotent.
    pub fn release(&self) {
        self.flag.store(true, Ordering::SeqCst);
        let ends = self.lock_ends().take();
        self.read_fd.store(-1, Ordering::SeqCst);
        drop(ends);
    }

    /// Whether `trigger` was called.
    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// The descriptor to include in a `poll` set (readable once triggered; -1 once
    /// released, which `poll` skips).
    pub fn fd(&self) -> RawFd {
        self.read_fd.load(Ordering::SeqCst)
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

    /// Wraps `host` so that every callback (including the `writable` an `Outbox` sends)
    /// is dropped once this signal is triggered. `close` triggers the signal first, so a
    /// callback that had not started by then never runs; together with joining the threads
    /// that is what makes "no callback after `close` returns" hold even for a thread that
    /// `close` could not join (because `close` was called on it, from a callback).
    pub fn gate(self: &Arc<Self>, host: Host) -> Host {
        let gated = GatedHost { host, stop: Arc::clone(self) };
        Host::new(HostHandle_TO::from_ptr(RArc::new(gated), TD_Opaque))
    }
}

/// The host behind [`StopSignal::gate`].
#[derive(Clone)]
struct GatedHost {
    host: Host,
    stop: Arc<StopSignal>,
}

impl GatedHost {
    fn open(&self) -> bool {
        !self.stop.is_set()
    }
}

impl HostHandle for GatedHost {
    fn deliver(&self, frames: RSlice<'_, InFrame<'_>>) {
        if self.open() {
            self.host.deliver(frames.as_slice());
        }
    }
    fn link_up(&self, peer: &LinkAddr) {
        if self.open() {
            self.host.link_up(peer);
        }
    }
    fn link_down(&self, peer: &LinkAddr, reason: RStr<'_>) {
        if self.open() {
            self.host.link_down(peer, reason.as_str());
        }
    }
    fn writable(&self) {
        if self.open() {
            self.host.writable();
        }
    }
    fn log(&self, level: LogLevel, message: RStr<'_>) {
        if self.open() {
            self.host.log(level, message.as_str());
        }
    }
}

/// The threads of one plugin instance, so that `close` can wait for all of them, and they
/// for each other, without deadlocking when `close` is called from inside a host callback
/// on one of these very threads: a thread cannot join itself, and a thread that waits in
/// `close` for another must not in turn be waited for by it.
///
/// Threads are started with [`spawn`](Self::spawn); a thread waits for another with
/// [`join`](Self::join); `close` calls [`finish`](Self::finish).
#[derive(Default)]
pub struct Crew {
    members: Mutex<Vec<Member>>,
    changed: Condvar,
}

struct Member {
    id: ThreadId,
    handle: Option<JoinHandle<()>>,
    /// Its body has not returned yet.
    running: bool,
    /// It is inside a `close` called from a host callback, waiting for the others, so
    /// none of them may wait for it.
    closing: bool,
}

/// Marks its thread's body as returned (also when it unwinds) and wakes whoever waits.
struct Done(Arc<Crew>);

impl Drop for Done {
    fn drop(&mut self) {
        let me = thread::current().id();
        let mut members = self.0.lock();
        if let Some(m) = members.iter_mut().find(|m| m.id == me) {
            m.running = false;
        }
        self.0.changed.notify_all();
    }
}

impl Crew {
    /// An empty crew.
    pub fn new() -> Crew {
        Crew::default()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Member>> {
        // The lock is never held across user code, so poisoning is next to impossible;
        // the list stays consistent either way.
        self.members.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, Vec<Member>>) -> MutexGuard<'a, Vec<Member>> {
        self.changed.wait(guard).unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts a named thread running `body`. Callers wrap `body` in `guard` themselves;
    /// the crew only records when it returns.
    pub fn spawn(self: &Arc<Self>, name: &str, body: impl FnOnce() + Send + 'static) -> io::Result<ThreadId> {
        let crew = Arc::clone(self);
        let (go, registered) = mpsc::sync_channel::<()>(1);
        // The lock is not held while spawning: if that fails, `body` is dropped inside
        // `spawn`, and its drop may well call `join` on this crew.
        let handle = thread::Builder::new().name(name.to_owned()).spawn(move || {
            // Runs nothing before `spawn` has registered this thread, so that `Done` and
            // `is_member` find it. (An error means `spawn` is gone; nothing to wait for.)
            let _ = registered.recv();
            let _done = Done(crew);
            body();
        })?;
        let id = handle.thread().id();
        self.lock().push(Member { id, handle: Some(handle), running: true, closing: false });
        let _ = go.send(());
        Ok(id)
    }

    /// Whether the calling thread is one of this crew's (and still running its body), i.e.
    /// `close` was called from a host callback on it.
    pub fn is_member(&self) -> bool {
        let me = thread::current().id();
        self.lock().iter().any(|m| m.id == me && m.running)
    }

    /// Waits for thread `id` to return and joins it. Returns early, leaving it to
    /// [`finish`](Self::finish), when `id` is the caller or is inside `close` (it may be
    /// waiting for the caller); does nothing when `id` was joined already.
    pub fn join(&self, id: ThreadId) {
        if id == thread::current().id() {
            return;
        }
        let mut members = self.lock();
        loop {
            let Some(i) = members.iter().position(|m| m.id == id) else { return };
            if !members[i].running {
                let handle = members.swap_remove(i).handle;
                drop(members);
                if let Some(h) = handle {
                    // Bodies run under `guard`, so a join error carries no plugin panic.
                    let _ = h.join();
                }
                return;
            }
            if members[i].closing {
                return;
            }
            members = self.wait(members);
        }
    }

    /// What `close` calls once it has triggered the instance's stop signal.
    ///
    /// From any other thread: waits until every thread of the crew has returned, joins
    /// them all and returns `true`. From one of the crew's own threads (a host callback
    /// called `close`): marks the caller as closing, waits for every other thread that is
    /// not itself closing, joins those and returns `false` — the caller's own thread
    /// returns once its callback does, and a later `finish` from outside joins it.
    pub fn finish(&self) -> bool {
        let me = thread::current().id();
        let mut members = self.lock();
        let inside = match members.iter_mut().find(|m| m.id == me && m.running) {
            Some(m) => {
                m.closing = true;
                self.changed.notify_all();
                true
            }
            None => false,
        };
        while members.iter().any(|m| m.running && !(inside && (m.id == me || m.closing))) {
            members = self.wait(members);
        }
        let mut handles = Vec::new();
        members.retain_mut(|m| {
            if m.running {
                return true;
            }
            handles.extend(m.handle.take());
            false
        });
        let all = members.is_empty();
        drop(members);
        for h in handles {
            // Bodies run under `guard`, so a join error carries no plugin panic.
            let _ = h.join();
        }
        !inside && all
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
///
/// Only call it while the group leader is a child of ours that has not been reaped (it
/// may have exited: a zombie still holds its pid, and with it the group id). Once it is
/// reaped the id may be reused by an unrelated group.
pub fn signal_group(pgid: u32, signal: libc::c_int) {
    let Ok(pgid) = libc::pid_t::try_from(pgid) else { return };
    if pgid <= 1 {
        return; // never signal "every process" or init by accident
    }
    // SAFETY: kill has no memory-safety preconditions; the group exists at least as long
    // as its unreaped leader does, and the caller only calls this before reaping it.
    let _ = unsafe { libc::kill(-pgid, signal) };
}

/// Whether our child `pid` has exited, *without* reaping it, so its process group can
/// still be signalled safely (see [`signal_group`]) before it is reaped (`Child::wait`).
///
/// `Err` (ECHILD) means it is not, or no longer, our child to wait for: someone reaped it
/// already (the host ignores SIGCHLD, so the kernel does), and its group id may be reused.
pub fn child_exited(pid: u32) -> io::Result<bool> {
    let id = libc::id_t::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    loop {
        // SAFETY: siginfo_t is plain data, for which all zeroes is a valid value; waitid
        // leaves it that way when no child changed state (WNOHANG).
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is valid for writes for the duration of the call. WNOWAIT leaves
        // the child waitable, so this never reaps it.
        let rc = unsafe {
            libc::waitid(libc::P_PID, id, &mut info, libc::WEXITED | libc::WNOHANG | libc::WNOWAIT)
        };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        // SAFETY: `info` is either still zeroed or was filled by waitid for a child state
        // change, for which si_pid is the field to read; zero means "no change yet".
        return Ok(unsafe { info.si_pid() } != 0);
    }
}

/// Makes the child of `cmd` call `setsid()` before it execs: it then leads a new session
/// and a new process group (both ids equal its pid, so [`signal_group`] with its pid still
/// reaches everything it forks) and has no controlling terminal. In the host's session it
/// could open `/dev/tty` or write to the host's terminal and be stopped for good by
/// SIGTTIN/SIGTTOU; outside it, neither can happen. (Do not combine with
/// `process_group`: `setsid` fails for a process that already leads a group.)
pub fn new_session_on_spawn(cmd: &mut Command) -> &mut Command {
    let hook = || {
        // SAFETY: setsid is async-signal-safe and has no memory-safety preconditions.
        if unsafe { libc::setsid() } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the hook runs in the forked child before exec, where only async-signal-safe
    // work is allowed: it makes one async-signal-safe call and reads errno, and neither
    // allocates nor takes a lock.
    unsafe { cmd.pre_exec(hook) }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Stdio;
    use std::time::Instant;

    #[test]
    fn released_stop_signal_stays_set_and_holds_no_descriptor() {
        let s = StopSignal::new().unwrap();
        assert!(s.fd() >= 0);
        // (That the descriptors are closed is checked by the plugins' leak tests, which run
        // alone; here a parallel test could reuse the number.)
        s.release();
        assert!(s.is_set());
        assert_eq!(s.fd(), -1);
        let start = Instant::now();
        assert!(s.wait(Duration::from_secs(5)));
        assert!(start.elapsed() < Duration::from_secs(1));
        s.trigger();
        s.release();
    }

    #[test]
    fn child_exited_does_not_reap() {
        let mut child = Command::new("true").stdin(Stdio::null()).spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !child_exited(child.id()).unwrap() {
            assert!(Instant::now() < deadline, "exit never seen");
            thread::sleep(Duration::from_millis(2));
        }
        // Still a zombie for us to reap.
        assert!(child.wait().unwrap().success());
        assert!(child_exited(child.id()).is_err(), "reaped child still waitable");
    }

    #[test]
    fn new_session_child_leads_its_session() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "cat /proc/self/stat"]).stdout(Stdio::piped());
        let out = new_session_on_spawn(&mut cmd).output().unwrap();
        let stat = String::from_utf8(out.stdout).unwrap();
        let pid = stat.split_whitespace().next().unwrap().to_owned();
        let f: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
        // `cat` is the shell's child, in the shell's group and session.
        assert_eq!(f[3], f[2], "session id equals group id");
        assert_ne!(f[2], pid, "cat is not the leader");
        assert_eq!(f[4], "0", "no controlling terminal");
    }

    #[test]
    fn crew_members_closing_from_inside_do_not_deadlock() {
        let crew = Arc::new(Crew::new());
        let (id_tx, id_rx) = mpsc::channel::<ThreadId>();
        let (a_tx, a_rx) = mpsc::channel::<bool>();
        let c = Arc::clone(&crew);
        // A: "close from a callback" — waits for every other member.
        let a = crew
            .spawn("crew-a", move || {
                thread::sleep(Duration::from_millis(20));
                let _ = a_tx.send(c.finish());
            })
            .unwrap();
        id_tx.send(a).unwrap();
        let c = Arc::clone(&crew);
        // B: waits for A, as a supervisor waits for its writer.
        crew.spawn("crew-b", move || {
            if let Ok(a) = id_rx.recv() {
                c.join(a);
            }
        })
        .unwrap();
        assert_eq!(a_rx.recv_timeout(Duration::from_secs(5)), Ok(false), "A's finish from inside");
        assert!(!crew.is_member());
        assert!(crew.finish(), "finish from outside joins everyone");
        assert!(crew.lock().is_empty());
    }
}
