//! An in-process host for plugin unit tests: call your `open` function with
//! [`Harness::host`] (or the exported root module with [`Harness::handle`]); every callback
//! becomes an [`Event`] on a channel, and callbacks that arrive after the test declared the
//! instance closed are counted so tests can assert there are none. A hook
//! ([`Harness::on_callback`]) runs inside every callback, on the plugin's thread, so tests can
//! act from there (call `close` from a callback, stall one).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RArc, RSlice, RStr};
use antmesh_plugin_api::{Host, HostHandle, HostHandleBox, HostHandle_TO, InFrame, LinkAddr, LogLevel};

/// One host callback.
#[derive(Debug, Clone)]
pub enum Event {
    /// `deliver`: the batch of frames.
    Frames(Vec<(LinkAddr, Vec<u8>)>),
    /// `link_up`.
    Up(LinkAddr),
    /// `link_down` with its reason.
    Down(LinkAddr, String),
    /// `writable`.
    Writable,
    /// `readable` (pull mode).
    Readable,
    /// `log`.
    Log(LogLevel, String),
}

/// What [`Harness::on_callback`] installs.
type Hook = Arc<dyn Fn(&Event) + Send + Sync>;

#[derive(Clone)]
struct TestHost {
    tx: Sender<Event>,
    closed: Arc<AtomicBool>,
    late: Arc<AtomicUsize>,
    hook: Arc<Mutex<Option<Hook>>>,
}

impl TestHost {
    fn emit(&self, e: Event) {
        if self.closed.load(Ordering::SeqCst) {
            self.late.fetch_add(1, Ordering::SeqCst);
        }
        // Cloned out so the hook runs without the lock: it may re-enter the plugin, which
        // may call back here from another thread.
        let hook = self.hook.lock().unwrap_or_else(PoisonError::into_inner).clone();
        if let Some(hook) = hook {
            hook(&e);
        }
        let _ = self.tx.send(e);
    }
}

impl HostHandle for TestHost {
    fn deliver(&self, frames: RSlice<'_, InFrame<'_>>) {
        self.emit(Event::Frames(frames.iter().map(|f| (f.from.clone(), f.data.to_vec())).collect()));
    }
    fn link_up(&self, peer: &LinkAddr) {
        self.emit(Event::Up(peer.clone()));
    }
    fn link_down(&self, peer: &LinkAddr, reason: RStr<'_>) {
        self.emit(Event::Down(peer.clone(), reason.to_string()));
    }
    fn writable(&self) {
        self.emit(Event::Writable);
    }
    fn readable(&self) {
        self.emit(Event::Readable);
    }
    fn log(&self, level: LogLevel, message: RStr<'_>) {
        self.emit(Event::Log(level, message.to_string()));
    }
}

/// The test's side of the host: the handle to pass to `open`, and the event stream.
pub struct Harness {
    /// The handle to pass to the plugin's `open`.
    pub host: Host,
    /// The same handle in its boundary form, for calling the exported root module.
    pub handle: HostHandleBox,
    /// Every callback, in order.
    pub rx: Receiver<Event>,
    closed: Arc<AtomicBool>,
    late: Arc<AtomicUsize>,
    hook: Arc<Mutex<Option<Hook>>>,
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}

impl Harness {
    /// A fresh host with an empty event stream.
    pub fn new() -> Harness {
        let (tx, rx) = channel();
        let closed = Arc::new(AtomicBool::new(false));
        let late = Arc::new(AtomicUsize::new(0));
        let hook = Arc::new(Mutex::new(None));
        let th = TestHost { tx, closed: Arc::clone(&closed), late: Arc::clone(&late), hook: Arc::clone(&hook) };
        let handle: HostHandleBox = HostHandle_TO::from_ptr(RArc::new(th), TD_Opaque);
        Harness { host: Host::new(handle.clone()), handle, rx, closed, late, hook }
    }

    /// Declares the instance closed: any callback from now on is a bug.
    pub fn mark_closed(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    /// The flag behind [`mark_closed`](Self::mark_closed), for a hook that closes the
    /// instance from inside a callback (set it right after `close` returns there). A
    /// callback counts as late if it *starts* after the flag is set.
    pub fn closed_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.closed)
    }

    /// Runs `hook` inside every later callback, on the calling plugin thread, before the
    /// event is queued on [`rx`](Self::rx). Replaces an earlier hook. The hook must not
    /// own the instance it is called for for good (take it out of a slot instead), or the
    /// instance and this host keep each other alive.
    pub fn on_callback(&self, hook: impl Fn(&Event) + Send + Sync + 'static) {
        *self.hook.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(hook));
    }

    /// Callbacks received after `mark_closed`.
    pub fn late_callbacks(&self) -> usize {
        self.late.load(Ordering::SeqCst)
    }

    /// Waits up to `timeout` for an event matching `pred`, skipping (and printing) others.
    pub fn wait(&self, timeout: Duration, mut pred: impl FnMut(&Event) -> bool) -> Option<Event> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let e = self.rx.recv_timeout(left).ok()?;
            if pred(&e) {
                return Some(e);
            }
            if let Event::Log(level, msg) = &e {
                eprintln!("[plugin {level:?}] {msg}");
            }
        }
    }

    /// Waits for the next `link_up`.
    pub fn wait_up(&self, timeout: Duration) -> Option<LinkAddr> {
        match self.wait(timeout, |e| matches!(e, Event::Up(_)))? {
            Event::Up(a) => Some(a),
            _ => None,
        }
    }

    /// Waits for the next `link_down`.
    pub fn wait_down(&self, timeout: Duration) -> Option<(LinkAddr, String)> {
        match self.wait(timeout, |e| matches!(e, Event::Down(..)))? {
            Event::Down(a, r) => Some((a, r)),
            _ => None,
        }
    }

    /// Collects delivered frames until `n` have arrived or `timeout` passes.
    pub fn frames(&self, n: usize, timeout: Duration) -> Vec<(LinkAddr, Vec<u8>)> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        while got.len() < n {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else { break };
            match self.wait(left, |e| matches!(e, Event::Frames(_))) {
                Some(Event::Frames(f)) => got.extend(f),
                _ => break,
            }
        }
        got
    }
}
