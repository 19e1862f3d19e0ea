//! The hub's persistence: the router's changes written to the mesh store on a blocking
//! thread that the hub never waits for, at most once per `save_interval`.
//!
//! A failed save is reported, its changes are kept for the next attempt, and the store is
//! reopened after a backoff (1 s doubling to a minute): redb refuses every write after an
//! I/O error, so a disk that filled up and emptied again needs a fresh handle. A file redb
//! cannot read is moved aside and replaced by an empty store, which is then written in full.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::task::JoinHandle;

use crate::mesh::router::{Changes, Router};
use crate::mesh::store::{MeshStore, Snapshot, StoreError};

/// First wait after a failure; doubled per failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Longest wait between attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// What a save attempt did.
pub struct Outcome {
    store: Option<Arc<MeshStore>>,
    changes: Changes,
    /// Ok(Some(path)): the store was damaged and moved to `path`.
    result: Result<Option<PathBuf>, StoreError>,
}

/// The mesh store as the hub sees it.
pub struct Persistence {
    path: PathBuf,
    store: Option<Arc<MeshStore>>,
    saving: Option<JoinHandle<Outcome>>,
    interval: Duration,
    next_save: Instant,
    retry_at: Option<Instant>,
    backoff: Duration,
    last_error: Option<String>,
    saves: u64,
    failures: u64,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Persistence {
    /// Opens the store at `path` and loads it (blocking; once, at start). A damaged file
    /// is moved aside; a store that cannot be opened at all is retried at the first save.
    pub fn open(path: PathBuf, interval: Duration) -> (Persistence, Snapshot) {
        let now = Instant::now();
        let mut p = Persistence {
            path,
            store: None,
            saving: None,
            interval,
            next_save: now,
            retry_at: None,
            backoff: FIRST_BACKOFF,
            last_error: None,
            saves: 0,
            failures: 0,
        };
        match MeshStore::open_or_replace(&p.path, unix_ms()) {
            Ok((store, snap, aside)) => {
                if let Some(aside) = aside {
                    tracing::warn!(store = %p.path.display(), moved_to = %aside.display(), "mesh store was damaged; moved aside, starting with an empty one");
                }
                p.store = Some(Arc::new(store));
                (p, snap)
            }
            Err(e) => {
                tracing::error!("{e}; paths are not persisted until it can be opened (retried)");
                p.last_error = Some(e.to_string());
                p.failures += 1;
                p.retry_at = Some(now + p.backoff);
                (p, Snapshot::default())
            }
        }
    }

    /// Whether a save is running.
    pub fn is_saving(&self) -> bool {
        self.saving.is_some()
    }

    /// Starts a save of the router's changes if one is due: none running, something
    /// changed, the interval passed, no backoff pending.
    pub fn maybe_start(&mut self, now: Instant, router: &mut Router) {
        if self.saving.is_some() || !router.has_changes() || now < self.next_save || self.retry_at.is_some_and(|t| now < t) {
            return;
        }
        self.start(now, router.take_changes());
    }

    fn start(&mut self, now: Instant, changes: Changes) {
        self.next_save = now + self.interval;
        let (path, store) = (self.path.clone(), self.store.clone());
        self.saving = Some(tokio::task::spawn_blocking(move || save(path, store, changes)));
    }

    /// When `maybe_start` next has something to do (None: nothing pending).
    pub fn next_wake(&self, has_changes: bool) -> Option<Instant> {
        if self.saving.is_some() || !has_changes {
            return None;
        }
        Some(self.retry_at.map_or(self.next_save, |r| r.max(self.next_save)))
    }

    /// Waits for the running save (pending forever when none runs).
    pub async fn finished(&mut self) -> Option<Outcome> {
        match self.saving.as_mut() {
            Some(h) => {
                let r = h.await;
                self.saving = None;
                r.ok()
            }
            None => std::future::pending().await,
        }
    }

    /// Takes in a save's outcome: on failure its changes go back to the router.
    pub fn on_finished(&mut self, now: Instant, outcome: Option<Outcome>, router: &mut Router) {
        let Some(Outcome { store, changes, result }) = outcome else {
            // The blocking task died; its changes are lost from this save, so write all.
            router.mark_all_changed();
            self.fail(now, "the save task failed".into());
            return;
        };
        self.store = store;
        match result {
            Ok(aside) => {
                if let Some(aside) = aside {
                    tracing::warn!(store = %self.path.display(), moved_to = %aside.display(), "mesh store was damaged; moved aside, writing the state in full");
                    router.mark_all_changed();
                }
                if self.last_error.take().is_some() {
                    tracing::info!(store = %self.path.display(), "mesh store saving again");
                }
                self.saves += 1;
                self.backoff = FIRST_BACKOFF;
                self.retry_at = None;
            }
            Err(e) => {
                router.restore_changes(&changes);
                // A fresh handle next time: redb refuses every write after an I/O error.
                self.store = None;
                self.fail(now, e.to_string());
            }
        }
    }

    fn fail(&mut self, now: Instant, error: String) {
        tracing::error!(store = %self.path.display(), retry_in_s = self.backoff.as_secs(), "mesh store save failed: {error}");
        self.failures += 1;
        self.last_error = Some(error);
        self.retry_at = Some(now + self.backoff);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }

    /// At shutdown: waits for a running save, then saves what is left (once, no retry).
    pub async fn flush(&mut self, router: &mut Router) {
        if self.saving.is_some() {
            let o = self.finished().await;
            self.on_finished(Instant::now(), o, router);
        }
        if router.has_changes() {
            self.start(Instant::now(), router.take_changes());
            let o = self.finished().await;
            self.on_finished(Instant::now(), o, router);
        }
    }

    /// For `antmesh status`.
    pub fn status(&self) -> Value {
        json!({
            "path": self.path.display().to_string(),
            "ok": self.last_error.is_none(),
            "error": self.last_error,
            "saves": self.saves,
            "failures": self.failures,
        })
    }
}

/// One save attempt, on a blocking thread: (re)opens the store if needed, then writes.
fn save(path: PathBuf, store: Option<Arc<MeshStore>>, changes: Changes) -> Outcome {
    let (store, aside) = match store {
        Some(s) => (s, None),
        None => match MeshStore::open_or_replace(&path, unix_ms()) {
            Ok((s, _, aside)) => (Arc::new(s), aside),
            Err(e) => return Outcome { store: None, changes, result: Err(e) },
        },
    };
    let result = store.apply(&changes).map(|()| aside);
    Outcome { store: Some(store), changes, result }
}
