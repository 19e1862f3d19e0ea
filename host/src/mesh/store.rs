//! The mesh's persistent state: path table, announce cache and known identities, in an
//! embedded crash-safe store (redb: copy-on-write B-trees, a commit is atomic and durable).
//!
//! The router stays sans-IO: it exports a [`Snapshot`] (at start, and for tests) or the
//! [`Changes`] since its last save, and restores a snapshot; this module only moves them to
//! and from disk. A save writes only what changed. A file redb cannot read is moved aside
//! ([`MeshStore::open_or_replace`]) rather than turning persistence off for good.
//!
//! A path is stored with the *PeerId* of its next hop (neighbour numbers do not survive a
//! restart) and comes back when a neighbour with that id is up again. Expiry is wall-clock, so it is honoured across restarts: whatever
//! expired while the node was down is dropped on load.
//!
//! Records (big-endian):
//!
//! ```text
//! paths      dest[16] → next-hop PeerId[32] | hops u8 | cost u16 | timestamp u64 | expires u64 (ms) | verified u8
//! announces  dest[16] → has-full u8 | compact-len u16 | compact form | full form (no key)
//! keys       PeerId[32] → ML-DSA-65 public key[1952]
//! ```

use std::path::{Path, PathBuf};

use redb::{Database, ReadableTable, TableDefinition};

use crate::identity::{PeerId, PublicIdentity};

use super::dest::DestinationHash;
use super::router::Changes;

const PATHS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("paths");
const ANNOUNCES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("announces");
const KEYS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("keys");

/// One stored path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathRecord {
    /// Destination.
    pub dest: DestinationHash,
    /// The next hop's identity.
    pub next_hop: PeerId,
    /// Hops.
    pub hops: u8,
    /// Cost.
    pub cost: u16,
    /// The announce's origin timestamp.
    pub timestamp_ms: u64,
    /// Expiry, ms since the Unix epoch.
    pub expires_ms: u64,
    /// Verified in full here.
    pub verified: bool,
}

/// One stored announce: the compact form always, the full form (without the public key)
/// when this node verified it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnounceRecord {
    /// Destination.
    pub dest: DestinationHash,
    /// Compact form (body ‖ id).
    pub compact: Vec<u8>,
    /// Full form without the key.
    pub full: Option<Vec<u8>>,
}

/// What the router persists.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// Paths.
    pub paths: Vec<PathRecord>,
    /// Announces.
    pub announces: Vec<AnnounceRecord>,
    /// Known identities.
    pub keys: Vec<PublicIdentity>,
}

/// Why the store failed.
#[derive(thiserror::Error, Debug)]
#[non_exhaustive]
pub enum StoreError {
    /// Opening or creating the database file.
    #[error("mesh store {path}: {source}")]
    Open {
        /// The file.
        path: String,
        /// Why.
        source: Box<redb::DatabaseError>,
    },
    /// A transaction, table, read, write or commit failed (a failed commit leaves the
    /// previous state).
    #[error("mesh store: {0}")]
    Db(Box<redb::Error>),
    /// A damaged store could not be moved aside.
    #[error("mesh store {path}: cannot move the damaged file aside: {source}")]
    MoveAside {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

impl StoreError {
    /// Whether the file itself is unreadable (damaged, or a format this build cannot
    /// read), as opposed to the disk or the system failing.
    pub fn is_damage(&self) -> bool {
        // redb reports a file that is not a database at all (bad magic, short) as I/O
        // errors of these kinds.
        let unreadable = |e: &std::io::Error| matches!(e.kind(), std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof);
        let storage_damage = |e: &redb::StorageError| match e {
            redb::StorageError::Corrupted(_) => true,
            redb::StorageError::Io(e) => unreadable(e),
            _ => false,
        };
        match self {
            StoreError::Open { source, .. } => match source.as_ref() {
                redb::DatabaseError::Storage(e) => storage_damage(e),
                redb::DatabaseError::UpgradeRequired(_) | redb::DatabaseError::RepairAborted => true,
                _ => false,
            },
            StoreError::Db(e) => match e.as_ref() {
                redb::Error::Io(e) => unreadable(e),
                other => matches!(
                    other,
                    redb::Error::Corrupted(_)
                        | redb::Error::UpgradeRequired(_)
                        | redb::Error::TableTypeMismatch { .. }
                        | redb::Error::TableIsMultimap(_)
                        | redb::Error::TypeDefinitionChanged { .. }
                ),
            },
            StoreError::MoveAside { .. } => false,
        }
    }
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(Box::new(redb::Error::from(e)))
            }
        }
    )*};
}
from_redb!(redb::TransactionError, redb::TableError, redb::StorageError, redb::CommitError);

/// The on-disk store.
pub struct MeshStore {
    db: Database,
}

impl MeshStore {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path) -> Result<MeshStore, StoreError> {
        let db = Database::create(path).map_err(|e| StoreError::Open { path: path.display().to_string(), source: Box::new(e) })?;
        Ok(MeshStore { db })
    }

    /// Opens the store at `path`; a damaged file (or one whose tables do not read) is
    /// renamed to `<path>.damaged-<unix ms>` and a fresh store created in its place. Returns
    /// the store, what it holds, and where a damaged file went.
    pub fn open_or_replace(path: &Path, now_ms: u64) -> Result<(MeshStore, Snapshot, Option<PathBuf>), StoreError> {
        let opened = MeshStore::open(path).and_then(|s| {
            let snap = s.load(now_ms)?;
            Ok((s, snap))
        });
        match opened {
            Ok((s, snap)) => Ok((s, snap, None)),
            Err(e) if e.is_damage() => {
                let mut aside = path.as_os_str().to_owned();
                aside.push(format!(".damaged-{now_ms}"));
                let aside = PathBuf::from(aside);
                std::fs::rename(path, &aside).map_err(|source| StoreError::MoveAside { path: path.display().to_string(), source })?;
                let s = MeshStore::open(path)?;
                Ok((s, Snapshot::default(), Some(aside)))
            }
            Err(e) => Err(e),
        }
    }

    /// Writes `ch` (records to put, records to delete), atomically.
    pub fn apply(&self, ch: &Changes) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut paths = tx.open_table(PATHS)?;
            for (dest, p) in &ch.paths {
                put_or_remove(&mut paths, &dest.0, p.as_ref().map(encode_path).as_deref())?;
            }
            let mut anns = tx.open_table(ANNOUNCES)?;
            for (dest, a) in &ch.announces {
                put_or_remove(&mut anns, &dest.0, a.as_ref().map(encode_announce).as_deref())?;
            }
            let mut keys = tx.open_table(KEYS)?;
            for (peer, k) in &ch.keys {
                put_or_remove(&mut keys, &peer.0, k.as_ref().map(|k| &k.as_bytes()[..]))?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Replaces the stored state with `snap`, atomically.
    pub fn save(&self, snap: &Snapshot) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut paths = tx.open_table(PATHS)?;
            paths.retain(|_, _| false)?;
            for p in &snap.paths {
                paths.insert(&p.dest.0[..], &encode_path(p)[..])?;
            }
            let mut anns = tx.open_table(ANNOUNCES)?;
            anns.retain(|_, _| false)?;
            for a in &snap.announces {
                anns.insert(&a.dest.0[..], &encode_announce(a)[..])?;
            }
            let mut keys = tx.open_table(KEYS)?;
            keys.retain(|_, _| false)?;
            for k in &snap.keys {
                keys.insert(&k.peer_id().0[..], &k.as_bytes()[..])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Loads the stored state, dropping what expired before `now_ms` and any record that
    /// does not parse (a store from a newer version, or damage).
    pub fn load(&self, now_ms: u64) -> Result<Snapshot, StoreError> {
        let tx = self.db.begin_read()?;
        let mut snap = Snapshot::default();
        each_row(&tx, PATHS, |k, v| {
            if let Some(p) = decode_path(k, v).filter(|p| p.expires_ms > now_ms) {
                snap.paths.push(p);
            }
        })?;
        each_row(&tx, ANNOUNCES, |k, v| {
            if let Some(a) = decode_announce(k, v) {
                snap.announces.push(a);
            }
        })?;
        each_row(&tx, KEYS, |k, v| {
            if let Ok(key) = PublicIdentity::from_bytes(v) {
                if key.peer_id().0[..] == *k {
                    snap.keys.push(key);
                }
            }
        })?;
        Ok(snap)
    }
}

/// Calls `f` with each row of `table`; a table never written (a fresh store) has none.
fn each_row(
    tx: &redb::ReadTransaction,
    table: TableDefinition<&[u8], &[u8]>,
    mut f: impl FnMut(&[u8], &[u8]),
) -> Result<(), StoreError> {
    let t = match tx.open_table(table) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    for row in t.iter()? {
        let (k, v) = row?;
        f(k.value(), v.value());
    }
    Ok(())
}

/// Writes `value` under `key`, or deletes the key when there is none.
fn put_or_remove(table: &mut redb::Table<'_, &'static [u8], &'static [u8]>, key: &[u8], value: Option<&[u8]>) -> Result<(), StoreError> {
    match value {
        Some(v) => {
            table.insert(key, v)?;
        }
        None => {
            table.remove(key)?;
        }
    }
    Ok(())
}

fn encode_path(p: &PathRecord) -> Vec<u8> {
    let mut v = Vec::with_capacity(52);
    v.extend_from_slice(&p.next_hop.0);
    v.push(p.hops);
    v.extend_from_slice(&p.cost.to_be_bytes());
    v.extend_from_slice(&p.timestamp_ms.to_be_bytes());
    v.extend_from_slice(&p.expires_ms.to_be_bytes());
    v.push(u8::from(p.verified));
    v
}

fn encode_announce(a: &AnnounceRecord) -> Vec<u8> {
    let mut v = Vec::with_capacity(3 + a.compact.len() + a.full.as_ref().map_or(0, Vec::len));
    v.push(u8::from(a.full.is_some()));
    v.extend_from_slice(&(a.compact.len() as u16).to_be_bytes());
    v.extend_from_slice(&a.compact);
    if let Some(f) = &a.full {
        v.extend_from_slice(f);
    }
    v
}

fn dest_of(k: &[u8]) -> Option<DestinationHash> {
    Some(DestinationHash(k.try_into().ok()?))
}

fn decode_path(k: &[u8], v: &[u8]) -> Option<PathRecord> {
    if v.len() != 52 {
        return None;
    }
    Some(PathRecord {
        dest: dest_of(k)?,
        next_hop: PeerId(v[..32].try_into().ok()?),
        hops: v[32],
        cost: u16::from_be_bytes([v[33], v[34]]),
        timestamp_ms: u64::from_be_bytes(v[35..43].try_into().ok()?),
        expires_ms: u64::from_be_bytes(v[43..51].try_into().ok()?),
        verified: v[51] != 0,
    })
}

fn decode_announce(k: &[u8], v: &[u8]) -> Option<AnnounceRecord> {
    let (&has_full, rest) = v.split_first()?;
    let (len, rest) = rest.split_at_checked(2)?;
    let n = usize::from(u16::from_be_bytes([len[0], len[1]]));
    let (compact, full) = rest.split_at_checked(n)?;
    Some(AnnounceRecord {
        dest: dest_of(k)?,
        compact: compact.to_vec(),
        full: (has_full != 0).then(|| full.to_vec()),
    })
}
