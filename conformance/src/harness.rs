//! An open instance plus a thread that collects its events, so checks can wait for "a frame
//! like this" or "a link_down" with a deadline, while the plugin is never blocked by a slow
//! reader (a blocked reader would turn a backpressure check into a deadlock).

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use antmesh_host::plugin::{LoadedPlugin, NativeTransport, OpenError};
use antmesh_host::transport::{Transport, TransportEvent};
use antmesh_plugin_api::{LinkAddr, SendError};

/// One flattened event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ev {
    /// A received frame.
    Frame(LinkAddr, Vec<u8>),
    /// A peer came up.
    Up(LinkAddr),
    /// A peer went down.
    Down(LinkAddr, String),
    /// Room after WouldBlock.
    Writable,
    /// Pull mode: something arrived after a `recv_pull` found nothing.
    Readable,
}

#[derive(Default)]
struct Log {
    events: VecDeque<Ev>,
    ended: bool,
}

/// The collected events of one instance.
#[derive(Default)]
pub struct Events {
    log: Mutex<Log>,
    changed: Condvar,
}

impl Events {
    fn lock(&self) -> MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Removes and returns the first event matching `pred`, waiting up to `timeout`.
    pub fn take(&self, timeout: Duration, mut pred: impl FnMut(&Ev) -> bool) -> Option<Ev> {
        let deadline = Instant::now() + timeout;
        let mut log = self.lock();
        loop {
            if let Some(i) = log.events.iter().position(&mut pred) {
                return log.events.remove(i);
            }
            let now = Instant::now();
            if now >= deadline || log.ended {
                return None;
            }
            log = match self.changed.wait_timeout(log, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// The next received frame, waiting up to `timeout`.
    pub fn next_frame(&self, timeout: Duration) -> Option<(LinkAddr, Vec<u8>)> {
        match self.take(timeout, |e| matches!(e, Ev::Frame(..))) {
            Some(Ev::Frame(from, data)) => Some((from, data)),
            _ => None,
        }
    }

    /// Drops every collected event.
    pub fn clear(&self) {
        self.lock().events.clear();
    }

    /// Removes and returns all collected frames.
    pub fn drain_frames(&self) -> Vec<(LinkAddr, Vec<u8>)> {
        let mut log = self.lock();
        let mut frames = Vec::new();
        log.events.retain(|e| match e {
            Ev::Frame(from, data) => {
                frames.push((from.clone(), data.clone()));
                false
            }
            _ => true,
        });
        frames
    }

    /// Number of frames collected so far.
    pub fn frame_count(&self) -> usize {
        self.lock().events.iter().filter(|e| matches!(e, Ev::Frame(..))).count()
    }
}

/// An open instance with its collector.
pub struct Endpoint {
    /// The instance.
    pub transport: Arc<NativeTransport>,
    /// Its events.
    pub events: Arc<Events>,
    collector: Option<JoinHandle<()>>,
}

impl Endpoint {
    /// Opens `plugin` with `config` as interface `name`.
    pub fn open(plugin: &LoadedPlugin, name: &str, config: &str) -> Result<Endpoint, OpenError> {
        let (t, rx) = NativeTransport::open(plugin, name, config)?;
        let events = Arc::new(Events::default());
        let sink = Arc::clone(&events);
        let collector = std::thread::Builder::new()
            .name(format!("conformance-{name}"))
            .spawn(move || {
                while let Ok(ev) = rx.recv_blocking() {
                    let mut log = sink.lock();
                    match ev {
                        TransportEvent::Frames(batch) => {
                            log.events.extend(batch.iter().map(|(f, d)| Ev::Frame(f.clone(), d.to_vec())))
                        }
                        TransportEvent::LinkUp(p) => log.events.push_back(Ev::Up(p)),
                        TransportEvent::LinkDown { peer, reason } => log.events.push_back(Ev::Down(peer, reason)),
                        TransportEvent::Writable => log.events.push_back(Ev::Writable),
                        TransportEvent::Readable => log.events.push_back(Ev::Readable),
                    }
                    drop(log);
                    sink.changed.notify_all();
                }
                sink.lock().ended = true;
                sink.changed.notify_all();
            })
            .ok();
        Ok(Endpoint { transport: Arc::new(t), events, collector })
    }

    /// Sends, waiting for `writable` (up to `timeout` in total) whenever the plugin pushes
    /// back; also retries while the peer is momentarily unknown (a respawning pipe).
    pub fn send_patiently(&self, to: &LinkAddr, frame: &[u8], timeout: Duration) -> Result<(), SendError> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.transport.send(to, frame) {
                Err(SendError::WouldBlock) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(SendError::WouldBlock);
                    }
                    // A writable may have been consumed by a concurrent sender; poll too.
                    let _ = self.events.take(left.min(Duration::from_millis(20)), |e| *e == Ev::Writable);
                }
                Err(SendError::UnknownPeer(p)) => {
                    if Instant::now() >= deadline {
                        return Err(SendError::UnknownPeer(p));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => return other,
            }
        }
    }

    /// Closes the instance and stops the collector.
    pub fn close(mut self) -> Result<(), String> {
        let r = self.transport.close().map_err(|e| e.to_string());
        if let Some(h) = self.collector.take() {
            let _ = h.join();
        }
        r
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        let _ = self.transport.close();
        if let Some(h) = self.collector.take() {
            let _ = h.join();
        }
    }
}

/// Open file descriptors and threads of this process (Linux: /proc/self).
pub fn resource_counts() -> (usize, usize) {
    let count = |p: &str| std::fs::read_dir(p).map(|d| d.count()).unwrap_or(0);
    (count("/proc/self/fd"), count("/proc/self/task"))
}

/// Child processes of this process that have not been reaped.
pub fn zombie_children() -> usize {
    let me = std::process::id().to_string();
    let Ok(rd) = std::fs::read_dir("/proc") else { return 0 };
    rd.filter_map(Result::ok)
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| {
            // pid (comm) state ppid …; comm may contain spaces, so split after ')'.
            stat.rsplit_once(')').is_some_and(|(_, rest)| {
                let mut f = rest.split_whitespace();
                f.next() == Some("Z") && f.next() == Some(me.as_str())
            })
        })
        .count()
}
