//! An established link session: traffic keys for both directions, their ratchets and
//! generations, the replay windows, and the ARQ that rides on them.
//!
//! Key id byte of a data frame: generation (top 2 bits) and ratchet epoch (low 6 bits).
//! A *generation* is the output of one handshake (or resumption); a fresh ML-KEM exchange
//! (rekey) starts the next generation while the ARQ state carries on. An *epoch* is one step
//! of the per-direction symmetric ratchet inside a generation: the sender steps when a
//! key has sealed `ratchet_bytes`, lived `ratchet_interval`, or come near its packet-number
//! limit; the receiver follows when it sees the next epoch and forgets the key two steps
//! back, so a captured key reveals nothing sent before the previous step.

use std::time::{Duration, Instant};

use super::arq::Arq;
use super::crypto::{ratchet, AeadFailed, PacketKey, ReplayWindow, Secret, MAX_PACKETS_PER_KEY};
use super::wire::data_header;
use crate::identity::PublicIdentity;

/// How the keys of a session were agreed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Full handshake; at least one public key travelled.
    Cold,
    /// Full handshake; no public key travelled (each side had the other's cached).
    Warm,
    /// Resumed from a ticket of an earlier session (no new ML-KEM exchange).
    Resumed,
}

pub(crate) struct TxKeys {
    gen: u8,
    epoch: u32,
    secret: Secret,
    key: PacketKey,
    pn: u32,
    bytes: u64,
    since: Instant,
}

impl TxKeys {
    pub(crate) fn new(gen: u8, secret: Secret, now: Instant) -> TxKeys {
        TxKeys { gen, epoch: 0, key: PacketKey::from_secret(&secret), secret, pn: 0, bytes: 0, since: now }
    }

    fn key_id(&self) -> u8 {
        ((self.gen & 3) << 6) | (self.epoch & 63) as u8
    }

    fn step(&mut self, now: Instant) {
        self.secret = ratchet(&self.secret);
        self.key = PacketKey::from_secret(&self.secret);
        self.epoch += 1;
        self.pn = 0;
        self.bytes = 0;
        self.since = now;
    }
}

/// How many ratchet steps a receiver follows at once. 63 epochs fit the 6-bit field; one
/// is the previous epoch, and half the space keeps "ahead" and "behind" apart.
const MAX_EPOCHS_AHEAD: u32 = 31;

struct RxEpoch {
    key: PacketKey,
    replay: ReplayWindow,
}

pub(crate) struct RxKeys {
    gen: u8,
    epoch: u32,
    secret: Secret,
    cur: RxEpoch,
    prev: Option<RxEpoch>,
}

impl RxKeys {
    pub(crate) fn new(gen: u8, secret: Secret) -> RxKeys {
        let cur = RxEpoch { key: PacketKey::from_secret(&secret), replay: ReplayWindow::default() };
        RxKeys { gen, epoch: 0, secret, cur, prev: None }
    }

    /// Opens a packet whose key id names this generation.
    fn open(&mut self, epoch6: u8, pn: u32, header: &[u8], sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
        let pn64 = u64::from(pn);
        if epoch6 == (self.epoch & 63) as u8 {
            return open_in(&mut self.cur, pn64, header, sealed);
        }
        if epoch6 == (self.epoch.wrapping_sub(1) & 63) as u8 {
            return match self.prev.as_mut() {
                Some(p) => open_in(p, pn64, header, sealed),
                None => Err(OpenError::UnknownKey),
            };
        }
        // Ahead by 1..=MAX_EPOCHS_AHEAD: the peer stepped, perhaps more than once while its
        // frames under the steps between were lost.
        let ahead = u32::from(epoch6.wrapping_sub((self.epoch & 63) as u8) & 63);
        if (1..=MAX_EPOCHS_AHEAD).contains(&ahead) {
            let mut secret = ratchet(&self.secret);
            for _ in 1..ahead {
                secret = ratchet(&secret);
            }
            let mut next = RxEpoch { key: PacketKey::from_secret(&secret), replay: ReplayWindow::default() };
            let plain = open_in(&mut next, pn64, header, sealed)?;
            // Authenticated under a later key: move there. Keys more than one step back are
            // dropped here, which is what gives the ratchet its forward secrecy.
            let old = std::mem::replace(&mut self.cur, next);
            self.prev = (ahead == 1).then_some(old);
            self.secret = secret;
            self.epoch += ahead;
            return Ok(plain);
        }
        Err(OpenError::UnknownKey)
    }
}

fn open_in(e: &mut RxEpoch, pn: u64, header: &[u8], sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
    if !e.replay.check(pn) {
        return Err(OpenError::Replay);
    }
    let plain = e.key.open(pn, header, sealed).map_err(|AeadFailed| OpenError::Decrypt)?;
    e.replay.record(pn);
    Ok(plain)
}

/// Why a data frame was not accepted.
#[derive(thiserror::Error, Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum OpenError {
    /// The key id names no key this session holds.
    #[error("data frame under an unknown key")]
    UnknownKey,
    /// The packet number was already accepted, or is too old.
    #[error("replayed data frame")]
    Replay,
    /// Authentication failed.
    #[error("data frame failed authentication")]
    Decrypt,
}

/// Limits on key use.
#[derive(Debug, Clone, Copy)]
pub struct KeyLimits {
    /// Bytes sealed under one ratchet epoch.
    pub ratchet_bytes: u64,
    /// Lifetime of one ratchet epoch.
    pub ratchet_interval: Duration,
}

pub(crate) struct Session {
    pub peer: PublicIdentity,
    pub initiator: bool,
    pub mode: Mode,
    pub arq: Arq,
    tx: TxKeys,
    tx_next: Option<TxKeys>,
    rx: RxKeys,
    rx_old: Option<(RxKeys, Instant)>,
    pub gen: u8,
    pub confirmed: bool,
    /// When the current generation's keys were agreed.
    pub keys_since: Instant,
    /// Bytes sealed in this generation.
    pub gen_bytes: u64,
    pub last_rx: Instant,
    pub last_tx: Instant,
    pub replays: u64,
}

impl Session {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        peer: PublicIdentity,
        initiator: bool,
        mode: Mode,
        arq: Arq,
        tx: Secret,
        rx: Secret,
        confirmed: bool,
        now: Instant,
    ) -> Session {
        Session {
            peer,
            initiator,
            mode,
            arq,
            tx: TxKeys::new(0, tx, now),
            tx_next: None,
            rx: RxKeys::new(0, rx),
            rx_old: None,
            gen: 0,
            confirmed,
            keys_since: now,
            gen_bytes: 0,
            last_rx: now,
            last_tx: now,
            replays: 0,
        }
    }

    /// Installs the next generation's keys (rekey). The responder sends under them at
    /// once; the initiator only after the responder confirmed (`confirm_rekey`), because
    /// until its Finish arrives the responder cannot open them.
    pub(crate) fn rekey(&mut self, tx: Secret, rx: Secret, now: Instant, grace: Duration, send_now: bool) {
        let gen = (self.gen + 1) & 3;
        self.gen = gen;
        let old = std::mem::replace(&mut self.rx, RxKeys::new(gen, rx));
        self.rx_old = Some((old, now + grace));
        let next = TxKeys::new(gen, tx, now);
        if send_now {
            self.tx = next;
        } else {
            self.tx_next = Some(next);
        }
        self.keys_since = now;
        self.gen_bytes = 0;
    }

    /// The initiator learnt that the responder has the new keys.
    pub(crate) fn confirm_rekey(&mut self) {
        if let Some(next) = self.tx_next.take() {
            self.tx = next;
        }
    }

    /// Drops a rekey the responder never confirmed: back to the previous generation, whose
    /// keys the responder still uses unless it completed the exchange. The abandoned
    /// receive keys stay for the grace period, for that case.
    pub(crate) fn abandon_rekey(&mut self, now: Instant, grace: Duration) {
        if self.tx_next.take().is_none() {
            return;
        }
        if let Some((old, _)) = self.rx_old.take() {
            let newer = std::mem::replace(&mut self.rx, old);
            self.gen = self.rx.gen;
            self.rx_old = Some((newer, now + grace));
        }
    }

    /// Whether a rekey is waiting for the responder's confirmation.
    pub(crate) fn rekey_pending(&self) -> bool {
        self.tx_next.is_some()
    }

    /// Seals a plaintext into a data frame.
    pub(crate) fn seal(&mut self, now: Instant, limits: &KeyLimits, mut plain: Vec<u8>) -> Result<Vec<u8>, AeadFailed> {
        let t = &mut self.tx;
        if t.pn >= MAX_PACKETS_PER_KEY || t.bytes >= limits.ratchet_bytes || now.saturating_duration_since(t.since) >= limits.ratchet_interval {
            t.step(now);
        }
        let header = data_header(t.key_id(), t.pn);
        t.key.seal(u64::from(t.pn), &header, &mut plain)?;
        t.pn += 1;
        t.bytes += plain.len() as u64;
        self.gen_bytes += plain.len() as u64;
        self.last_tx = now;
        let mut frame = Vec::with_capacity(header.len() + plain.len());
        frame.extend_from_slice(&header);
        frame.extend_from_slice(&plain);
        Ok(frame)
    }

    /// Opens a data frame. Returns the plaintext and whether it was under the newest
    /// generation (which, for an initiator waiting on a rekey, confirms it).
    pub(crate) fn open(&mut self, now: Instant, key_id: u8, pn: u32, header: &[u8], sealed: &[u8]) -> Result<(Vec<u8>, bool), OpenError> {
        if let Some((_, until)) = &self.rx_old {
            if *until <= now {
                self.rx_old = None;
            }
        }
        let gen = key_id >> 6;
        let epoch6 = key_id & 63;
        let mut r = Err(OpenError::UnknownKey);
        if gen == self.rx.gen {
            r = self.rx.open(epoch6, pn, header, sealed).map(|p| (p, true));
        }
        if r.is_err() {
            // After an abandoned rekey both generations may carry the same 2-bit number.
            if let Some((old, _)) = self.rx_old.as_mut().filter(|(o, _)| o.gen == gen) {
                r = old.open(epoch6, pn, header, sealed).map(|p| (p, false));
            }
        }
        match &r {
            Ok(_) => self.last_rx = now,
            Err(OpenError::Replay) => self.replays += 1,
            Err(_) => {}
        }
        r
    }

    /// Current (generation, epoch) of the sending side, for tests and stats.
    pub(crate) fn tx_epoch(&self) -> (u8, u32) {
        (self.tx.gen, self.tx.epoch)
    }
}
