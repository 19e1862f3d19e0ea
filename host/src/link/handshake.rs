//! The link handshake: ML-KEM-768 key agreement with ML-DSA-65 mutual authentication in
//! three messages, and a resumption exchange of two small frames.
//!
//! ```text
//! 1 Hello   I → R  flags | nonce_i[16] | PeerId_i[32] | (hint[8] if KNOWS_KEY) | ek[1184]
//! 2 Reply   R → I  flags | nonce_r[16] | ct[1088] | (pk_r[1952] if HAS_KEY) | sig_r[3309]
//! 3 Finish  I → R  AEAD_{k_hs}( flags | (pk_i[1952] if HAS_KEY) | sig_i[3309] )
//! ```
//!
//! - `th2 = SHA-256("antmesh link v1" ‖ Hello ‖ Reply-before-signature ‖ PeerId_r)`;
//!   the responder signs `th2` under context `antmesh/v1/link/responder`.
//! - `prk = HKDF-Extract(salt = th2, ikm = ML-KEM shared secret)`,
//!   `k_hs = Expand(prk, "antmesh link hs")`.
//! - `th3 = SHA-256(th2 ‖ sig_r ‖ Finish flags ‖ PeerId_i)`; the initiator signs it under
//!   context `antmesh/v1/link/initiator`. Finish is sealed under `k_hs`, which proves the
//!   initiator decapsulated; the responder's first authenticated frame proves the same for it.
//! - Session secrets come from `HKDF-Extract(salt = SHA-256(th2 ‖ Finish), ikm = prk)`.
//!
//! Both PeerIds and both nonces are inside what each side signs, so a signature cannot be
//! moved to another session or another peer, and a replayed Hello or Finish meets a fresh
//! nonce and ciphertext and fails. Public keys travel only when the other side does not
//! have them (PeerId is self-certifying, so a cached key is as good as a sent one).

use ml_kem::array::Array;
use ml_kem::ml_kem_768::{DecapsulationKey, EncapsulationKey};
use ml_kem::{Decapsulate, KeyExport};
use zeroize::Zeroizing;

use super::crypto::{expand, extract, hash, PacketKey, Rng, Secret};
use super::wire::{NONCE_LEN, TAG_LEN, TICKET_ID_LEN};
use crate::identity::{Identity, PeerId, PublicIdentity, SignError, VerifyError, PUBLIC_KEY_LEN, SIGNATURE_LEN};

/// ML-KEM-768 encapsulation key bytes.
pub const EK_LEN: usize = 1184;
/// ML-KEM-768 ciphertext bytes.
pub const CT_LEN: usize = 1088;
/// Bytes of the responder-id hint in a warm Hello.
pub const HINT_LEN: usize = 8;
/// Largest Hello.
pub const MAX_HELLO: usize = 1 + NONCE_LEN + 32 + HINT_LEN + EK_LEN;
/// Largest Reply.
pub const MAX_REPLY: usize = 1 + NONCE_LEN + CT_LEN + PUBLIC_KEY_LEN + SIGNATURE_LEN;
/// Largest Finish (sealed).
pub const MAX_FINISH: usize = 1 + PUBLIC_KEY_LEN + SIGNATURE_LEN + TAG_LEN;

/// Hello flag: the initiator has the responder's public key; a hint of the id follows.
pub const HELLO_KNOWS_KEY: u8 = 0x01;
/// Hello/Reply flag: replace the keys of the existing session and keep its state (rekey).
pub const CONTINUE: u8 = 0x02;
/// Reply/Finish flag: the sender's public key is included.
pub const HAS_KEY: u8 = 0x01;
/// Reply flag: the responder needs the initiator's public key in Finish.
pub const SEND_KEY: u8 = 0x04;

const DOMAIN: &[u8] = b"antmesh link v1";
const CTX_RESPONDER: &[u8] = b"antmesh/v1/link/responder";
const CTX_INITIATOR: &[u8] = b"antmesh/v1/link/initiator";

/// Why a handshake failed.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HandshakeError {
    /// A handshake message has the wrong length for its flags.
    #[error("malformed handshake message {msg} ({len} bytes)")]
    Malformed {
        /// Message number.
        msg: u8,
        /// Its length.
        len: usize,
    },
    /// A public key in a message is not a valid ML-DSA-65 key.
    #[error("invalid public key: {0}")]
    BadKey(VerifyError),
    /// The key the peer sent does not hash to the PeerId it claimed.
    #[error("public key does not match the claimed PeerId {claimed}")]
    KeyMismatch {
        /// The id in Hello.
        claimed: PeerId,
    },
    /// The peer's signature does not verify.
    #[error("handshake signature from {peer} does not verify")]
    BadSignature {
        /// Whose.
        peer: PeerId,
    },
    /// The peer is not the one that was dialled.
    #[error("expected peer {expected}, the link answered as {actual}")]
    WrongPeer {
        /// Dialled.
        expected: PeerId,
        /// Answered.
        actual: PeerId,
    },
    /// The peer omitted its public key and this node does not have it.
    #[error("peer {0} omitted its public key and none is cached")]
    UnknownKey(PeerId),
    /// The ML-KEM ciphertext or key was refused.
    #[error("ML-KEM-768 key agreement failed")]
    Kem,
    /// Finish did not decrypt under the handshake key.
    #[error("handshake message 3 failed authentication")]
    Decrypt,
    /// Signing failed.
    #[error(transparent)]
    Sign(#[from] SignError),
    /// The peer refused.
    #[error("refused by the peer: {0:?}")]
    Rejected(super::wire::RejectReason),
    /// No answer within the handshake timeout.
    #[error("handshake timed out")]
    Timeout,
    /// A handshake message does not fit 256 fragments at this MTU.
    #[error(transparent)]
    Fragments(#[from] super::frag::TooManyFragments),
    /// A resumption MAC did not verify.
    #[error("resumption proof did not verify")]
    ResumeProof,
}

/// The secrets a completed handshake or resumption yields.
pub struct SessionSecrets {
    /// Initiator → responder traffic secret.
    pub i2r: Secret,
    /// Responder → initiator traffic secret.
    pub r2i: Secret,
    /// The next resumption secret.
    pub resume: Secret,
    /// The id both sides file that resumption secret under.
    pub ticket: [u8; TICKET_ID_LEN],
}

fn derive(prk: &[u8; 32], th: &[u8; 32]) -> SessionSecrets {
    let master = extract(th, prk);
    let ticket = expand::<TICKET_ID_LEN>(&master, b"antmesh link ticket");
    SessionSecrets {
        i2r: expand::<32>(&master, b"antmesh link i2r"),
        r2i: expand::<32>(&master, b"antmesh link r2i"),
        resume: expand::<32>(&master, b"antmesh link resume"),
        ticket: *ticket,
    }
}

/// A parsed Hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello<'a> {
    /// Flags.
    pub flags: u8,
    /// Initiator nonce.
    pub nonce: &'a [u8; NONCE_LEN],
    /// Initiator's claimed id.
    pub peer: PeerId,
    /// First bytes of the responder id the initiator expects, when it has its key.
    pub hint: Option<&'a [u8; HINT_LEN]>,
    /// Ephemeral ML-KEM encapsulation key.
    pub ek: &'a [u8; EK_LEN],
}

impl<'a> Hello<'a> {
    /// Parses message 1.
    pub fn decode(b: &'a [u8]) -> Result<Hello<'a>, HandshakeError> {
        let bad = HandshakeError::Malformed { msg: 1, len: b.len() };
        let flags = *b.first().ok_or(bad.clone())?;
        let hint_len = if flags & HELLO_KNOWS_KEY != 0 { HINT_LEN } else { 0 };
        if b.len() != 1 + NONCE_LEN + 32 + hint_len + EK_LEN || flags & !(HELLO_KNOWS_KEY | CONTINUE) != 0 {
            return Err(bad);
        }
        let nonce = b[1..17].try_into().map_err(|_| bad.clone())?;
        let peer = PeerId(b[17..49].try_into().map_err(|_| bad.clone())?);
        let hint = if hint_len > 0 { Some(b[49..57].try_into().map_err(|_| bad.clone())?) } else { None };
        let ek = b[49 + hint_len..].try_into().map_err(|_| bad)?;
        Ok(Hello { flags, nonce, peer, hint, ek })
    }

    /// Encodes message 1.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MAX_HELLO);
        out.push(self.flags);
        out.extend_from_slice(self.nonce);
        out.extend_from_slice(&self.peer.0);
        if let Some(h) = self.hint {
            out.extend_from_slice(h);
        }
        out.extend_from_slice(self.ek);
        out
    }
}

/// A parsed Reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply<'a> {
    /// Flags.
    pub flags: u8,
    /// Responder nonce.
    pub nonce: &'a [u8; NONCE_LEN],
    /// ML-KEM ciphertext.
    pub ct: &'a [u8; CT_LEN],
    /// Responder public key, when sent.
    pub key: Option<&'a [u8; PUBLIC_KEY_LEN]>,
    /// Signature over th2.
    pub sig: &'a [u8; SIGNATURE_LEN],
    /// The bytes the signature covers (all but the signature).
    pub signed: &'a [u8],
}

impl<'a> Reply<'a> {
    /// Parses message 2.
    pub fn decode(b: &'a [u8]) -> Result<Reply<'a>, HandshakeError> {
        let bad = HandshakeError::Malformed { msg: 2, len: b.len() };
        let flags = *b.first().ok_or(bad.clone())?;
        let key_len = if flags & HAS_KEY != 0 { PUBLIC_KEY_LEN } else { 0 };
        if b.len() != 1 + NONCE_LEN + CT_LEN + key_len + SIGNATURE_LEN || flags & !(HAS_KEY | CONTINUE | SEND_KEY) != 0 {
            return Err(bad);
        }
        let split = b.len() - SIGNATURE_LEN;
        let ct_end = 17 + CT_LEN;
        Ok(Reply {
            flags,
            nonce: b[1..17].try_into().map_err(|_| bad.clone())?,
            ct: b[17..ct_end].try_into().map_err(|_| bad.clone())?,
            key: if key_len > 0 { Some(b[ct_end..split].try_into().map_err(|_| bad.clone())?) } else { None },
            sig: b[split..].try_into().map_err(|_| bad)?,
            signed: &b[..split],
        })
    }
}

/// The plaintext of a Finish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinishBody<'a> {
    /// Flags.
    pub flags: u8,
    /// Initiator public key, when asked for.
    pub key: Option<&'a [u8; PUBLIC_KEY_LEN]>,
    /// Signature over th3.
    pub sig: &'a [u8; SIGNATURE_LEN],
}

impl<'a> FinishBody<'a> {
    /// Parses the plaintext of message 3.
    pub fn decode(b: &'a [u8]) -> Result<FinishBody<'a>, HandshakeError> {
        let bad = HandshakeError::Malformed { msg: 3, len: b.len() };
        let flags = *b.first().ok_or(bad.clone())?;
        let key_len = if flags & HAS_KEY != 0 { PUBLIC_KEY_LEN } else { 0 };
        if b.len() != 1 + key_len + SIGNATURE_LEN || flags & !(HAS_KEY | CONTINUE) != 0 {
            return Err(bad);
        }
        Ok(FinishBody {
            flags,
            key: if key_len > 0 { Some(b[1..1 + key_len].try_into().map_err(|_| bad.clone())?) } else { None },
            sig: b[1 + key_len..].try_into().map_err(|_| bad)?,
        })
    }
}

/// The initiator between Hello and Reply.
pub struct InitiatorStart {
    dk: DecapsulationKey,
    /// The Hello it sent (encoded).
    pub hello: Vec<u8>,
    /// Its nonce (collision tie-break).
    pub nonce: [u8; NONCE_LEN],
}

/// Builds a Hello. `known` is the responder's key when this node has it.
pub fn start(rng: &mut Rng, me: &Identity, known: Option<&PeerId>, rekey: bool) -> InitiatorStart {
    let seed = Zeroizing::new(rng.bytes::<64>());
    let dk = DecapsulationKey::from_seed(Array::from(*seed));
    let ek_bytes = dk.encapsulation_key().to_bytes();
    let mut ek = [0u8; EK_LEN];
    ek.copy_from_slice(&ek_bytes);
    let nonce = rng.bytes::<NONCE_LEN>();
    let mut hint = [0u8; HINT_LEN];
    let mut flags = if rekey { CONTINUE } else { 0 };
    if let Some(id) = known {
        flags |= HELLO_KNOWS_KEY;
        hint.copy_from_slice(&id.0[..HINT_LEN]);
    }
    let hello = Hello { flags, nonce: &nonce, peer: me.peer_id(), hint: known.map(|_| &hint), ek: &ek }.encode();
    InitiatorStart { dk, hello, nonce }
}

/// The responder between Reply and Finish.
pub struct ResponderWait {
    th2: [u8; 32],
    sig_r: Box<[u8; SIGNATURE_LEN]>,
    prk: Secret,
    /// The initiator's claimed id.
    pub claimed: PeerId,
    /// Its key, if this node had it cached.
    known: Option<PublicIdentity>,
    /// Whether both sides asked to keep the existing session (rekey).
    pub continues: bool,
    /// The Reply (encoded).
    pub reply: Vec<u8>,
}

/// Answers a Hello. `lookup` returns a cached key by PeerId; `keep_session` says whether
/// this node has a session with the claimed peer that it is willing to rekey.
pub fn respond(
    rng: &mut Rng,
    me: &Identity,
    hello_bytes: &[u8],
    lookup: impl Fn(&PeerId) -> Option<PublicIdentity>,
    keep_session: bool,
) -> Result<ResponderWait, HandshakeError> {
    let hello = Hello::decode(hello_bytes)?;
    let ek = EncapsulationKey::new(&Array::from(*hello.ek)).map_err(|_| HandshakeError::Kem)?;
    let m = Zeroizing::new(rng.bytes::<32>());
    let (ct, ss) = ek.encapsulate_deterministic(&Array::from(*m));
    let ss = Zeroizing::new(ss);
    let my_id = me.peer_id();
    let send_key = hello.hint.is_none_or(|h| h[..] != my_id.0[..HINT_LEN]);
    let known = lookup(&hello.peer);
    let continues = keep_session && hello.flags & CONTINUE != 0;
    let mut flags = if send_key { HAS_KEY } else { 0 };
    if known.is_none() {
        flags |= SEND_KEY;
    }
    if continues {
        flags |= CONTINUE;
    }
    let nonce = rng.bytes::<NONCE_LEN>();
    let mut reply = Vec::with_capacity(MAX_REPLY);
    reply.push(flags);
    reply.extend_from_slice(&nonce);
    reply.extend_from_slice(&ct);
    if send_key {
        reply.extend_from_slice(me.public().as_bytes());
    }
    let th2 = hash(&[DOMAIN, hello_bytes, &reply, &my_id.0]);
    let sig_r = Box::new(me.sign(&th2, CTX_RESPONDER)?);
    reply.extend_from_slice(&sig_r[..]);
    let prk = extract(&th2, &ss[..]);
    Ok(ResponderWait { th2, sig_r, prk, claimed: hello.peer, known, continues, reply })
}

fn hs_key(prk: &[u8; 32]) -> PacketKey {
    PacketKey::from_secret(&expand::<32>(prk, b"antmesh link hs"))
}

/// What the initiator has once it verified the Reply.
pub struct InitiatorDone {
    /// The responder.
    pub peer: PublicIdentity,
    /// The sealed Finish to send.
    pub finish: Vec<u8>,
    /// The session secrets.
    pub secrets: SessionSecrets,
    /// Whether the responder agreed to keep the existing session.
    pub continues: bool,
}

/// Verifies the Reply and builds the Finish. `cached` is the key this node has for the
/// expected responder (used when the Reply omits it); `expect` the id that was dialled.
pub fn finish(
    me: &Identity,
    st: InitiatorStart,
    reply_bytes: &[u8],
    cached: Option<&PublicIdentity>,
    expect: Option<&PeerId>,
    can_continue: bool,
) -> Result<InitiatorDone, HandshakeError> {
    let reply = Reply::decode(reply_bytes)?;
    let peer = match reply.key {
        Some(k) => PublicIdentity::from_bytes(k).map_err(HandshakeError::BadKey)?,
        None => cached.cloned().ok_or(HandshakeError::UnknownKey(expect.copied().unwrap_or(PeerId([0; 32]))))?,
    };
    if let Some(e) = expect {
        if peer.peer_id() != *e {
            return Err(HandshakeError::WrongPeer { expected: *e, actual: peer.peer_id() });
        }
    }
    let th2 = hash(&[DOMAIN, &st.hello, reply.signed, &peer.peer_id().0]);
    peer.verify(&th2, reply.sig, CTX_RESPONDER).map_err(|_| HandshakeError::BadSignature { peer: peer.peer_id() })?;
    let ss = Zeroizing::new(st.dk.decapsulate_slice(reply.ct).map_err(|_| HandshakeError::Kem)?);
    let prk = extract(&th2, &ss[..]);
    let send_key = reply.flags & SEND_KEY != 0;
    // The initiator has the last word on continuing: both asked, and it still can.
    let continues = can_continue && reply.flags & CONTINUE != 0 && st.hello.first().is_some_and(|f| f & CONTINUE != 0);
    let fflags = if send_key { HAS_KEY } else { 0 } | if continues { CONTINUE } else { 0 };
    let my_id = me.peer_id();
    let th3 = hash(&[&th2, reply.sig, &[fflags], &my_id.0]);
    let sig_i = me.sign(&th3, CTX_INITIATOR)?;
    let mut body = Vec::with_capacity(MAX_FINISH);
    body.push(fflags);
    if send_key {
        body.extend_from_slice(me.public().as_bytes());
    }
    body.extend_from_slice(&sig_i);
    hs_key(&prk).seal(0, &th2, &mut body).map_err(|_| HandshakeError::Decrypt)?;
    let secrets = derive(&prk, &hash(&[&th2, &body]));
    Ok(InitiatorDone { peer, finish: body, secrets, continues })
}

/// What the responder has once it verified the Finish.
pub struct ResponderDone {
    /// The initiator.
    pub peer: PublicIdentity,
    /// The session secrets.
    pub secrets: SessionSecrets,
    /// Both sides agreed to keep the existing session (rekey).
    pub continues: bool,
}

/// Verifies a Finish.
pub fn accept(st: &ResponderWait, finish: &[u8]) -> Result<ResponderDone, HandshakeError> {
    let body = hs_key(&st.prk).open(0, &st.th2, finish).map_err(|_| HandshakeError::Decrypt)?;
    let f = FinishBody::decode(&body)?;
    let peer = match f.key {
        Some(k) => PublicIdentity::from_bytes(k).map_err(HandshakeError::BadKey)?,
        None => st.known.clone().ok_or(HandshakeError::UnknownKey(st.claimed))?,
    };
    if peer.peer_id() != st.claimed {
        return Err(HandshakeError::KeyMismatch { claimed: st.claimed });
    }
    let th3 = hash(&[&st.th2, &st.sig_r[..], &[f.flags], &st.claimed.0]);
    peer.verify(&th3, f.sig, CTX_INITIATOR).map_err(|_| HandshakeError::BadSignature { peer: st.claimed })?;
    let secrets = derive(&st.prk, &hash(&[&st.th2, finish]));
    Ok(ResponderDone { peer, secrets, continues: st.continues && f.flags & CONTINUE != 0 })
}

/// A resumption ticket: a secret shared with one peer from an earlier session.
pub struct Ticket {
    /// Its id.
    pub id: [u8; TICKET_ID_LEN],
    /// The secret.
    pub secret: Secret,
    /// The peer it was shared with.
    pub peer: PeerId,
    /// When the ML-KEM exchange this ticket descends from took place: resumptions do not
    /// reset the clock that schedules the next fresh exchange.
    pub kem_at: std::time::Instant,
}

fn resume_keys(ticket: &Ticket, nonce_i: &[u8; NONCE_LEN]) -> (Secret, PacketKey, PacketKey) {
    let k = extract(&[&ticket.id[..], &nonce_i[..]].concat(), &ticket.secret[..]);
    let ki = PacketKey::from_secret(&expand::<32>(&k, b"antmesh link resume i"));
    let kr = PacketKey::from_secret(&expand::<32>(&k, b"antmesh link resume r"));
    (k, ki, kr)
}

/// The MAC a Resume frame carries: over its first 35 bytes (kind, tag, ticket id, nonce).
pub fn resume_mac(ticket: &Ticket, head: &[u8], nonce_i: &[u8; NONCE_LEN]) -> [u8; TAG_LEN] {
    let (_, ki, _) = resume_keys(ticket, nonce_i);
    let mut empty = Vec::new();
    // Sealing an empty buffer cannot fail.
    let _ = ki.seal(0, head, &mut empty);
    let mut out = [0u8; TAG_LEN];
    out.copy_from_slice(&empty[..TAG_LEN.min(empty.len())]);
    out
}

/// Checks a Resume's MAC and builds the ResumeOk MAC over `resume_frame ‖ ok_head`, where
/// `ok_head` is the ResumeOk's first 19 bytes. Returns the MAC and the session secrets.
pub fn resume_accept(
    ticket: &Ticket,
    resume_frame: &[u8],
    nonce_i: &[u8; NONCE_LEN],
    mac: &[u8; TAG_LEN],
    ok_head: &[u8],
) -> Result<([u8; TAG_LEN], SessionSecrets), HandshakeError> {
    let head = resume_frame.get(..resume_frame.len().saturating_sub(TAG_LEN)).unwrap_or_default();
    let expected = resume_mac(ticket, head, nonce_i);
    if !constant_time_eq(&expected, mac) {
        return Err(HandshakeError::ResumeProof);
    }
    let (k, _, kr) = resume_keys(ticket, nonce_i);
    let aad = [resume_frame, ok_head].concat();
    let mut empty = Vec::new();
    let _ = kr.seal(0, &aad, &mut empty);
    let mut out = [0u8; TAG_LEN];
    out.copy_from_slice(&empty[..TAG_LEN.min(empty.len())]);
    let th = hash(&[b"antmesh link resume", &aad]);
    Ok((out, derive(&k, &th)))
}

/// The initiator's check of a ResumeOk; returns the session secrets.
pub fn resume_complete(
    ticket: &Ticket,
    resume_frame: &[u8],
    nonce_i: &[u8; NONCE_LEN],
    ok_head: &[u8],
    mac: &[u8; TAG_LEN],
) -> Result<SessionSecrets, HandshakeError> {
    let (k, _, kr) = resume_keys(ticket, nonce_i);
    let aad = [resume_frame, ok_head].concat();
    let mut empty = Vec::new();
    let _ = kr.seal(0, &aad, &mut empty);
    if empty.len() != TAG_LEN || !constant_time_eq(&empty, mac) {
        return Err(HandshakeError::ResumeProof);
    }
    let th = hash(&[b"antmesh link resume", &aad]);
    Ok(derive(&k, &th))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> Identity {
        Identity::from_seed(Zeroizing::new([n; 32]))
    }

    fn run(cold: bool) -> (usize, usize, usize) {
        let (a, b) = (id(1), id(2));
        let mut rng = Rng::from_seed([9; 32]);
        let known_b = (!cold).then(|| b.peer_id());
        let st = start(&mut rng, &a, known_b.as_ref(), false);
        let hello_len = st.hello.len();
        let a_pub = a.public().clone();
        let lookup = |p: &PeerId| (!cold && *p == a_pub.peer_id()).then(|| a_pub.clone());
        let r = respond(&mut rng, &b, &st.hello, lookup, false).unwrap();
        let reply_len = r.reply.len();
        let cached = (!cold).then(|| b.public().clone());
        let done = finish(&a, st, &r.reply, cached.as_ref(), Some(&b.peer_id()), false).unwrap();
        assert_eq!(done.peer.peer_id(), b.peer_id());
        let ResponderDone { peer, secrets: s, .. } = accept(&r, &done.finish).unwrap();
        assert_eq!(peer.peer_id(), a.peer_id());
        assert_eq!(*s.i2r, *done.secrets.i2r);
        assert_eq!(*s.r2i, *done.secrets.r2i);
        assert_eq!(s.ticket, done.secrets.ticket);
        assert_ne!(*s.i2r, *s.r2i);
        (hello_len, reply_len, done.finish.len())
    }

    #[test]
    fn cold_and_warm_handshakes_agree_and_have_the_expected_sizes() {
        let (h, r, f) = run(true);
        assert_eq!((h, r, f), (1233, 6366, 5278));
        let (h, r, f) = run(false);
        assert_eq!((h, r, f), (1241, 4414, 3326));
    }

    #[test]
    fn wrong_peer_tampered_reply_and_forged_finish_are_refused() {
        let (a, b, c) = (id(1), id(2), id(3));
        let mut rng = Rng::from_seed([1; 32]);
        let st = start(&mut rng, &a, None, false);
        let r = respond(&mut rng, &b, &st.hello, |_| None, false).unwrap();
        let err = finish(&a, st, &r.reply, None, Some(&c.peer_id()), false).err().unwrap();
        assert!(matches!(err, HandshakeError::WrongPeer { .. }));

        let st = start(&mut rng, &a, None, false);
        let r = respond(&mut rng, &b, &st.hello, |_| None, false).unwrap();
        let mut bad = r.reply.clone();
        bad[20] ^= 1; // inside the ciphertext, which the signature covers
        assert_eq!(finish(&a, st, &bad, None, None, false).err().unwrap(), HandshakeError::BadSignature { peer: b.peer_id() });

        // C answers a Hello that claims to be A: its Finish is signed by C's key, which does
        // not hash to A's id.
        let st = start(&mut rng, &c, None, false);
        let mut hello = st.hello.clone();
        hello[17..49].copy_from_slice(&a.peer_id().0);
        let r = respond(&mut rng, &b, &hello, |_| None, false).unwrap();
        let forged = InitiatorStart { hello: hello.clone(), ..st };
        let done = finish(&c, forged, &r.reply, None, None, false).unwrap();
        assert_eq!(accept(&r, &done.finish).err().unwrap(), HandshakeError::KeyMismatch { claimed: a.peer_id() });
    }

    proptest::proptest! {
        /// Message bodies decode to the fields they were built from, and any other length
        /// or unknown flag is refused.
        #[test]
        fn message_bodies_round_trip(
            nonce in proptest::prelude::any::<[u8; 16]>(),
            peer in proptest::prelude::any::<[u8; 32]>(),
            hint in proptest::option::of(proptest::prelude::any::<[u8; HINT_LEN]>()),
            cont in proptest::prelude::any::<bool>(),
            with_key in proptest::prelude::any::<bool>(),
            fill in proptest::prelude::any::<u8>(),
            cut in 1usize..40,
        ) {
            let ek = [fill; EK_LEN];
            let flags = if hint.is_some() { HELLO_KNOWS_KEY } else { 0 } | if cont { CONTINUE } else { 0 };
            let h = Hello { flags, nonce: &nonce, peer: PeerId(peer), hint: hint.as_ref(), ek: &ek };
            let bytes = h.encode();
            proptest::prop_assert_eq!(Hello::decode(&bytes).unwrap(), h);
            proptest::prop_assert!(Hello::decode(&bytes[..bytes.len() - cut]).is_err());

            let key = [fill ^ 1; PUBLIC_KEY_LEN];
            let sig = [fill ^ 2; SIGNATURE_LEN];
            let ct = [fill ^ 3; CT_LEN];
            let rflags = if with_key { HAS_KEY } else { 0 } | if cont { CONTINUE } else { 0 } | SEND_KEY;
            let mut reply = vec![rflags];
            reply.extend_from_slice(&nonce);
            reply.extend_from_slice(&ct);
            if with_key {
                reply.extend_from_slice(&key);
            }
            reply.extend_from_slice(&sig);
            let r = Reply::decode(&reply).unwrap();
            proptest::prop_assert_eq!((r.flags, r.nonce, r.ct, r.key.is_some(), r.sig), (rflags, &nonce, &ct, with_key, &sig));
            proptest::prop_assert_eq!(r.signed.len(), reply.len() - SIGNATURE_LEN);
            proptest::prop_assert!(Reply::decode(&reply[..reply.len() - cut]).is_err());
            let mut bad = reply.clone();
            bad[0] |= 0x80;
            proptest::prop_assert!(Reply::decode(&bad).is_err());

            let fflags = if with_key { HAS_KEY } else { 0 };
            let mut fin = vec![fflags];
            if with_key {
                fin.extend_from_slice(&key);
            }
            fin.extend_from_slice(&sig);
            let f = FinishBody::decode(&fin).unwrap();
            proptest::prop_assert_eq!((f.flags, f.key.is_some(), f.sig), (fflags, with_key, &sig));
            proptest::prop_assert!(FinishBody::decode(&fin[..fin.len() - cut]).is_err());
        }
    }

    #[test]
    fn resumption_agrees_and_refuses_a_wrong_secret() {
        let t = Ticket { id: [4; 16], secret: Zeroizing::new([5; 32]), peer: PeerId([0; 32]), kem_at: std::time::Instant::now() };
        let nonce = [6; 16];
        let head = [[0x25, 0, 1].as_slice(), &t.id, &nonce].concat();
        let mac = resume_mac(&t, &head, &nonce);
        let frame = [head.as_slice(), &mac].concat();
        let ok_head = [0x26, 0, 1].iter().chain([7u8; 16].iter()).copied().collect::<Vec<_>>();
        let (ok_mac, s_r) = resume_accept(&t, &frame, &nonce, &mac, &ok_head).unwrap();
        let s_i = resume_complete(&t, &frame, &nonce, &ok_head, &ok_mac).unwrap();
        assert_eq!(*s_i.i2r, *s_r.i2r);
        assert_eq!(s_i.ticket, s_r.ticket);
        assert_ne!(s_i.ticket, t.id);
        let wrong = Ticket { secret: Zeroizing::new([6; 32]), ..t };
        assert_eq!(resume_accept(&wrong, &frame, &nonce, &mac, &ok_head).err(), Some(HandshakeError::ResumeProof));
    }
}
