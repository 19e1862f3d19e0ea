//! Symmetric cryptography of the link engine: the key schedule (HKDF-SHA256), packet
//! protection (ChaCha20-Poly1305), the per-direction symmetric ratchet, the replay window,
//! and the engine's random number generator.
//!
//! Nonces never repeat: each direction of each key has its own packet-number space, the
//! nonce is the key's IV XOR the packet number, a key is replaced (ratchet step) long
//! before its packet numbers could wrap, and the sender refuses to seal past the limit.

use chacha20::cipher::{KeyIvInit, StreamCipher};
use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{ChaCha20Poly1305, KeyInit, Nonce, Tag};
use hkdf::Hkdf;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::wire::TAG_LEN;

/// A 32-byte secret that is wiped when dropped.
pub type Secret = Zeroizing<[u8; 32]>;

/// Packets one key may seal. Far below 2^32 so that the ratchet always runs first.
pub const MAX_PACKETS_PER_KEY: u32 = 1 << 30;

/// HKDF-Expand of `prk` for `label` into `N` bytes.
pub fn expand<const N: usize>(prk: &[u8; 32], label: &[u8]) -> Zeroizing<[u8; N]> {
    let mut out = Zeroizing::new([0u8; N]);
    // A 32-byte PRK is always a valid HKDF-SHA256 PRK and N ≤ 255·32, so neither fails.
    if let Ok(hk) = Hkdf::<Sha256>::from_prk(prk) {
        let _ = hk.expand(label, out.as_mut());
    }
    out
}

/// HKDF-Extract.
pub fn extract(salt: &[u8], ikm: &[u8]) -> Secret {
    let (prk, _) = Hkdf::<Sha256>::extract(Some(salt), ikm);
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(&prk);
    out
}

/// SHA-256 over the concatenation of `parts`.
pub fn hash(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// One AEAD key with its IV.
pub struct PacketKey {
    aead: ChaCha20Poly1305,
    iv: [u8; 12],
}

impl PacketKey {
    /// The key and IV of a traffic secret.
    pub fn from_secret(secret: &[u8; 32]) -> PacketKey {
        let key = expand::<32>(secret, b"antmesh link key");
        let iv = expand::<12>(secret, b"antmesh link iv");
        PacketKey { aead: ChaCha20Poly1305::new(key.as_ref().into()), iv: *iv }
    }

    fn nonce(&self, pn: u64) -> Nonce {
        let mut n = self.iv;
        for (b, p) in n[4..].iter_mut().zip(pn.to_be_bytes()) {
            *b ^= p;
        }
        Nonce::from(n)
    }

    /// Encrypts `buf` in place and appends the tag.
    pub fn seal(&self, pn: u64, aad: &[u8], buf: &mut Vec<u8>) -> Result<(), AeadFailed> {
        let tag = self.aead.encrypt_in_place_detached(&self.nonce(pn), aad, buf).map_err(|_| AeadFailed)?;
        buf.extend_from_slice(&tag);
        Ok(())
    }

    /// Decrypts `sealed` (ciphertext ‖ tag) into a new buffer.
    pub fn open(&self, pn: u64, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, AeadFailed> {
        let split = sealed.len().checked_sub(TAG_LEN).ok_or(AeadFailed)?;
        let (ct, tag) = sealed.split_at(split);
        let mut buf = ct.to_vec();
        self.aead
            .decrypt_in_place_detached(&self.nonce(pn), aad, &mut buf, Tag::from_slice(tag))
            .map_err(|_| AeadFailed)?;
        Ok(buf)
    }
}

/// Authentication failed (or the buffer could not be sealed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AeadFailed;

/// The next secret of a ratchet chain. One-way: an old key cannot be computed from a new one.
pub fn ratchet(secret: &[u8; 32]) -> Secret {
    expand::<32>(secret, b"antmesh link ratchet")
}

/// A sliding window of packet numbers already accepted under one key.
#[derive(Debug, Clone, Default)]
pub struct ReplayWindow {
    /// Highest packet number accepted plus one (0: none yet).
    top: u64,
    /// Bit `i` set: packet `top - 1 - i` was accepted.
    bits: u128,
}

impl ReplayWindow {
    /// Packets further behind the highest one than this are refused as too old.
    pub const WIDTH: u64 = 128;

    /// Whether `pn` is new (not seen, not too old). Does not record it.
    pub fn check(&self, pn: u64) -> bool {
        if pn >= self.top {
            return true;
        }
        let back = self.top - 1 - pn;
        back < Self::WIDTH && self.bits & (1u128 << back) == 0
    }

    /// Records `pn`, which [`ReplayWindow::check`] accepted and the AEAD authenticated.
    pub fn record(&mut self, pn: u64) {
        if pn >= self.top {
            let shift = pn + 1 - self.top;
            self.bits = if shift >= Self::WIDTH { 0 } else { self.bits << shift };
            self.bits |= 1;
            self.top = pn + 1;
        } else {
            let back = self.top - 1 - pn;
            if back < Self::WIDTH {
                self.bits |= 1u128 << back;
            }
        }
    }
}

/// A cryptographically secure generator (ChaCha20 keystream) seeded once, so that the
/// engine is deterministic under a fixed seed in simulations and unpredictable otherwise.
pub struct Rng(chacha20::ChaCha20);

impl Rng {
    /// A generator from a 32-byte seed.
    pub fn from_seed(seed: [u8; 32]) -> Rng {
        Rng(chacha20::ChaCha20::new(&seed.into(), &[0u8; 12].into()))
    }

    /// A generator seeded from the operating system.
    pub fn from_os() -> Result<Rng, getrandom::Error> {
        let mut seed = Zeroizing::new([0u8; 32]);
        getrandom::getrandom(seed.as_mut())?;
        Ok(Rng::from_seed(*seed))
    }

    /// Fills `out` with random bytes.
    pub fn fill(&mut self, out: &mut [u8]) {
        out.fill(0);
        // The keystream of one (key, nonce) pair is 256 GiB; the engine draws a few bytes
        // per handshake. apply_keystream only panics past that end.
        if self.0.try_apply_keystream(out).is_err() {
            // Re-key from the stream's own tail rather than repeat it.
            *self = Rng::from_seed(hash(&[out]));
            self.0.apply_keystream(out);
        }
    }

    /// `N` random bytes.
    pub fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        self.fill(&mut out);
        out
    }

    /// A random u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::{proptest, prop_assert_eq};

    #[test]
    fn seal_open_and_tamper() {
        let k = PacketKey::from_secret(&[7u8; 32]);
        let mut buf = b"hello".to_vec();
        k.seal(3, b"hdr", &mut buf).unwrap();
        assert_eq!(buf.len(), 5 + TAG_LEN);
        assert_eq!(k.open(3, b"hdr", &buf).unwrap(), b"hello");
        assert_eq!(k.open(4, b"hdr", &buf), Err(AeadFailed));
        assert_eq!(k.open(3, b"hdx", &buf), Err(AeadFailed));
        let mut bad = buf.clone();
        bad[0] ^= 1;
        assert_eq!(k.open(3, b"hdr", &bad), Err(AeadFailed));
        assert_eq!(k.open(3, b"hdr", &buf[..10]), Err(AeadFailed));
    }

    #[test]
    fn ratchet_is_deterministic_and_moves() {
        let s = [1u8; 32];
        assert_eq!(*ratchet(&s), *ratchet(&s));
        assert_ne!(*ratchet(&s), s);
        assert_ne!(*ratchet(&ratchet(&s)), *ratchet(&s));
    }

    #[test]
    fn seeded_rng_is_deterministic() {
        let mut a = Rng::from_seed([3; 32]);
        let mut b = Rng::from_seed([3; 32]);
        assert_eq!(a.bytes::<40>(), b.bytes::<40>());
        assert_ne!(a.bytes::<16>(), Rng::from_seed([4; 32]).bytes::<16>());
    }

    proptest! {
        /// The window accepts each packet number once and refuses anything 128 or more
        /// behind the highest accepted one, whatever the arrival order.
        #[test]
        fn replay_window_matches_a_set(pns in proptest::collection::vec(0u64..400, 1..300)) {
            let mut w = ReplayWindow::default();
            let mut seen = std::collections::BTreeSet::new();
            let mut top: Option<u64> = None;
            for pn in pns {
                let fresh = !seen.contains(&pn) && top.is_none_or(|t| pn + ReplayWindow::WIDTH > t);
                prop_assert_eq!(w.check(pn), fresh, "pn {}", pn);
                if fresh {
                    w.record(pn);
                    seen.insert(pn);
                    top = Some(top.map_or(pn, |t| t.max(pn)));
                }
            }
        }
    }
}
