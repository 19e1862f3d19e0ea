//! quinn's crypto layer over the post-quantum TLS provider of [`crate::tls`]: the glue
//! between `quinn::crypto` and `rustls::quic`, ported from quinn-proto 0.11.19's
//! `crypto/rustls.rs` with every primitive from RustCrypto, so that no *ring* and no aws-lc
//! is compiled into a normal build (quinn is built without its `rustls-*`, `ring` and
//! `aws-lc-rs` features, which is also why quinn's own glue does not exist here).
//!
//! Read first: [`client_crypto`] / [`server_crypto`] (what goes into `quinn::ClientConfig::new`
//! and `quinn::ServerConfig::new`), then [`reset_key`] / [`token_key`] (the endpoint's
//! stateless-reset key and the server's Retry/NEW_TOKEN token key), then [`peer_of`] (who the
//! peer is once a connection exists) and [`wrong_peer`] (why a dial to a given PeerId failed).
//!
//! ```text
//! let endpoint = quinn::Endpoint::new(
//!     quinn::EndpointConfig::new(reset_key()?),
//!     Some(quinn::ServerConfig::new(server_crypto(&identity)?, token_key()?)),
//!     std_udp_socket,
//!     Arc::new(quinn::TokioRuntime),
//! )?;
//! let conn = endpoint
//!     .connect_with(quinn::ClientConfig::new(client_crypto(&identity, Some(peer))?), addr, "antmesh")?
//!     .await?;
//! let who = peer_of(&conn); // Some(PublicIdentity) of `peer`
//! ```
//!
//! | piece | how |
//! |---|---|
//! | TLS | `tls::client_config` / `tls::server_config`: TLS 1.3, ML-KEM-768, ML-DSA-65 raw public keys, mutual authentication |
//! | QUIC versions | v1 (and `0xff00_0021..=0xff00_0022`), draft-29..32 (`0xff00_001d..=0xff00_0020`), as quinn |
//! | Initial keys | `tls::quic_initial_suite().keys(..)` (RFC 9001 §5.2), AES-128-GCM + AES-128 header protection, from the config's primitives (RustCrypto, or aws-lc-rs with the `aws-lc` feature) |
//! | Retry integrity tag | AES-128-GCM (`aes-gcm`) with the fixed key/nonce of RFC 9001 §5.8 (v1) or draft-29 |
//! | stateless reset tokens | HMAC-SHA256 under a random 64-byte key |
//! | Retry / NEW_TOKEN tokens | HKDF-SHA256 (`hkdf`) from a random 64-byte key → a per-token AES-256-GCM key |
//! | ALPN, SNI, resumption, 0-RTT | none: every connection is a full, signed handshake |
//! | after the handshake | the rustls connection is dropped; the peer's key, [`HandshakeData`], transport parameters, next 1-RTT secrets and the RFC 9266 channel binding ([`CHANNEL_BINDING_LABEL`]) are kept; tickets are skipped, other messages refused ([`PostHandshakeReader`]) |
//!
//! The server name given to `Endpoint::connect` must be a syntactically valid name (as with
//! quinn's own glue) but is neither sent (SNI is off) nor checked: a node is who its key says.
//!
//! `Connection::peer_identity()` is a `Vec<rustls::pki_types::CertificateDer<'static>>`
//! holding the peer's one 1974-byte ML-DSA-65 SubjectPublicKeyInfo (the same type quinn's
//! rustls glue returns); [`peer_of`] turns it into a [`PublicIdentity`].
//! `Connection::handshake_data()` is a [`HandshakeData`].

use std::any::Any;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes128Gcm, Aes256Gcm};
use bytes::BytesMut;
use hkdf::Hkdf;
use quinn::crypto::{self as qc, CryptoError, ExportKeyingMaterialError, KeyPair, Keys, UnsupportedVersion};
use quinn::{ConnectError, ConnectionId, Side, TransportErrorCode};
use quinn_proto::transport_parameters::TransportParameters;
use quinn_proto::TransportError;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::quic::{Connection, HeaderProtectionKey, KeyChange, PacketKey, Secrets, Suite, Version};
use rustls::{AlertDescription, CipherSuite, NamedGroup};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::identity::{Identity, PeerId, PublicIdentity};
use crate::tls::{self, PeerVerifyError, TlsConfigError};

mod post_handshake;
#[cfg(test)]
mod tests;

pub use post_handshake::{PostHandshakeError, PostHandshakeReader, MAX_MESSAGE_LEN as MAX_POST_HANDSHAKE_MESSAGE_LEN};

type GcmNonce = aes_gcm::Nonce<<Aes128Gcm as aes_gcm::AeadCore>::NonceSize>;
type GcmTag = aes_gcm::Tag<<Aes128Gcm as aes_gcm::AeadCore>::TagSize>;

/// Bytes in an AES-GCM tag (Retry integrity tag, token AEAD).
const TAG_LEN: usize = 16;
/// Bytes of fresh key material behind the reset key and the token key.
const MASTER_KEY_LEN: usize = 64;

/// The `reason` of the local `TransportError` when the server's key is not the expected
/// PeerId, followed by the server's PeerId in hex. The expected PeerId is left out: the
/// reason also travels to the server in CONNECTION_CLOSE, and it has no business learning
/// whom the client was looking for.
const WRONG_PEER_REASON: &str = "antmesh: the server is another peer: ";

/// Why a QUIC crypto configuration could not be built, or why a dial failed in the handshake.
#[derive(thiserror::Error, Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum QuicCryptoError {
    /// The TLS configuration could not be built (a bug here, not an input).
    #[error(transparent)]
    Config(#[from] TlsConfigError),
    /// rustls refused to start a QUIC session with the configuration (a bug here, or the
    /// random number generator failed while the session's key share was made).
    #[error("rustls cannot run a QUIC session with this configuration: {0}")]
    Session(rustls::Error),
    /// The operating system's random number generator failed.
    #[error("the operating system's random number generator failed")]
    Rng,
    /// The dialled node presented a valid key of another PeerId (see [`wrong_peer`]).
    #[error("dialled {expected} but the server is {actual}")]
    WrongPeer {
        /// The PeerId passed to [`client_crypto`].
        expected: PeerId,
        /// The PeerId of the key the server presented.
        actual: PeerId,
    },
}

/// What `quinn::Connection::handshake_data()` (and `Connecting::handshake_data()`) returns
/// for antmesh sessions: downcast the `Box<dyn Any>` to this. Available once the handshake
/// is complete (there is no ALPN or SNI to make it available earlier).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HandshakeData {
    /// The negotiated key-exchange group: always `MLKEM768`.
    pub key_exchange_group: Option<NamedGroup>,
    /// The negotiated cipher suite: always `TLS13_AES_128_GCM_SHA256`.
    pub cipher_suite: Option<CipherSuite>,
}

/// The client half of quinn's crypto configuration: mutual authentication with `identity`'s
/// ML-DSA-65 key, and with `expected`, only the node of that [`PeerId`] is accepted
/// (otherwise the dial fails; map the error with [`wrong_peer`]).
///
/// Use: `quinn::ClientConfig::new(client_crypto(&identity, expected)?)`.
pub fn client_crypto(
    identity: &Identity,
    expected: Option<PeerId>,
) -> Result<Arc<dyn qc::ClientConfig>, QuicCryptoError> {
    client_crypto_from(tls::client_config(identity, expected)?, tls::quic_initial_suite())
}

/// [`client_crypto`] over the chosen primitives (feature `aws-lc`; [`client_crypto`] uses
/// aws-lc-rs then): packet protection, Initial keys and the handshake all come from them.
#[cfg(feature = "aws-lc")]
pub fn client_crypto_with(
    identity: &Identity,
    expected: Option<PeerId>,
    primitives: tls::Primitives,
) -> Result<Arc<dyn qc::ClientConfig>, QuicCryptoError> {
    client_crypto_from(
        tls::client_config_with(identity, expected, primitives)?,
        tls::quic_initial_suite_with(primitives),
    )
}

/// `initial` must be the QUIC suite of `tls`'s provider.
fn client_crypto_from(tls: rustls::ClientConfig, initial: Suite) -> Result<Arc<dyn qc::ClientConfig>, QuicCryptoError> {
    let tls = Arc::new(tls);
    // rustls checks TLS 1.3 and the QUIC suite when a session starts; do it once here so
    // that `start_session` cannot fail on the configuration later.
    let probe = ServerName::from(IpAddr::V4(Ipv4Addr::LOCALHOST));
    rustls::quic::ClientConnection::new(tls.clone(), Version::V1, probe, Vec::new())
        .map_err(QuicCryptoError::Session)?;
    Ok(Arc::new(ClientCrypto { tls, initial }))
}

/// The server half of quinn's crypto configuration: our key as the raw public key, client
/// authentication mandatory, no ALPN, no tickets, no 0-RTT.
///
/// Use: `quinn::ServerConfig::new(server_crypto(&identity)?, token_key()?)`.
pub fn server_crypto(identity: &Identity) -> Result<Arc<dyn qc::ServerConfig>, QuicCryptoError> {
    server_crypto_from(tls::server_config(identity)?, tls::quic_initial_suite())
}

/// [`server_crypto`] over the chosen primitives (feature `aws-lc`; [`server_crypto`] uses
/// aws-lc-rs then).
#[cfg(feature = "aws-lc")]
pub fn server_crypto_with(
    identity: &Identity,
    primitives: tls::Primitives,
) -> Result<Arc<dyn qc::ServerConfig>, QuicCryptoError> {
    server_crypto_from(tls::server_config_with(identity, primitives)?, tls::quic_initial_suite_with(primitives))
}

/// `initial` must be the QUIC suite of `tls`'s provider.
fn server_crypto_from(tls: rustls::ServerConfig, initial: Suite) -> Result<Arc<dyn qc::ServerConfig>, QuicCryptoError> {
    let tls = Arc::new(tls);
    // Validated once, so `start_session` (which cannot return an error) does not fail.
    rustls::quic::ServerConnection::new(tls.clone(), Version::V1, Vec::new()).map_err(QuicCryptoError::Session)?;
    Ok(Arc::new(ServerCrypto { tls, initial }))
}

/// The endpoint's stateless-reset key (RFC 9000 §10.3): HMAC-SHA256 under 64 fresh random
/// bytes. Use: `quinn::EndpointConfig::new(reset_key()?)`. Fails with
/// [`QuicCryptoError::Rng`] if the operating system's RNG does: there is no weaker fallback.
pub fn reset_key() -> Result<Arc<dyn qc::HmacKey>, QuicCryptoError> {
    Ok(Arc::new(ResetKey(random_master_key()?)))
}

/// A stateless-reset key derived from the node's identity (HKDF-SHA256 over its secret
/// seed), so that it survives restarts: a node that restarted answers packets of the
/// connections it forgot with stateless resets its peers accept, and they redial at once
/// instead of waiting for the idle timeout. The seed stays secret, so the key does too.
pub fn reset_key_for(identity: &Identity) -> Arc<dyn qc::HmacKey> {
    let hk = Hkdf::<Sha256>::new(Some(&b"antmesh quic stateless reset v1"[..]), &identity.seed()[..]);
    let mut key = Zeroizing::new([0u8; MASTER_KEY_LEN]);
    // 64 bytes is far below HKDF-SHA256's 8,160-byte limit: expand cannot fail.
    let _ = hk.expand(b"reset key", key.as_mut());
    Arc::new(ResetKey(key))
}

/// The key of the endpoint's connection-ID generator, derived from the identity like the
/// reset key: after a restart the endpoint still recognises its old connection IDs as its
/// own, which is what lets it answer them with a stateless reset.
pub fn cid_key_for(identity: &Identity) -> u64 {
    let hk = Hkdf::<Sha256>::new(Some(&b"antmesh quic cid key v1"[..]), &identity.seed()[..]);
    let mut key = [0u8; 8];
    let _ = hk.expand(b"cid key", &mut key);
    u64::from_be_bytes(key)
}

/// The server's key for Retry and NEW_TOKEN tokens: HKDF-SHA256 (empty salt) over 64 fresh
/// random bytes; each token is sealed with AES-256-GCM under a key expanded from the
/// token's random nonce (the construction of quinn's *ring* key). Tokens are opaque to
/// peers, so this never affects interoperability.
/// Use: `quinn::ServerConfig::new(server_crypto(..)?, token_key()?)`. Fails with
/// [`QuicCryptoError::Rng`] if the RNG does.
pub fn token_key() -> Result<Arc<dyn qc::HandshakeTokenKey>, QuicCryptoError> {
    let master = random_master_key()?;
    Ok(Arc::new(TokenKey(Hkdf::new(Some(&[][..]), &master[..]))))
}

/// The authenticated peer of `conn`: its ML-DSA-65 key, hence its [`PeerId`].
///
/// `None` only if the connection's crypto session is not ours or the peer is not (yet)
/// authenticated, which cannot happen for a `Connection` from an antmesh endpoint: both
/// sides authenticate with a raw public key before the connection is handed out (0-RTT and
/// 0.5-RTT aside, which antmesh does not use).
pub fn peer_of(conn: &quinn::Connection) -> Option<PublicIdentity> {
    let certificates = conn.peer_identity()?.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    tls::peer_identity(Some(&certificates)).ok()
}

/// The [`PeerId`] of `conn`'s authenticated peer, as [`peer_of`] gives it but without
/// decoding the key (a hash of the key bytes, ~2 µs, where decoding for `peer_of` costs
/// ~21 µs and 6 KB): what a dial or an accept needs.
pub fn peer_id_of(conn: &quinn::Connection) -> Option<PeerId> {
    let certificates = conn.peer_identity()?.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    tls::peer_id_from_spki(certificates.first()?.as_ref()).ok()
}

/// Maps the error of a dial made with `client_crypto(.., Some(expected))` to
/// [`QuicCryptoError::WrongPeer`] when that is why it failed: the server presented a valid
/// ML-DSA-65 key whose PeerId is not `expected`. Any other error gives `None`.
///
/// How: our client session refuses the server's key during the TLS handshake (the server
/// never sees the client's key), sends the alert `certificate_unknown`, and quinn reports
/// `ConnectionError::TransportError` with code `crypto(certificate_unknown)` and a reason
/// naming the server's PeerId. Only that *local* error is recognised; a peer's
/// CONNECTION_CLOSE (`ConnectionError::ConnectionClosed`) never is.
pub fn wrong_peer(error: &quinn::ConnectionError, expected: PeerId) -> Option<QuicCryptoError> {
    let quinn::ConnectionError::TransportError(e) = error else {
        return None;
    };
    if e.code != TransportErrorCode::crypto(u8::from(AlertDescription::CertificateUnknown)) {
        return None;
    }
    let actual = e.reason.strip_prefix(WRONG_PEER_REASON)?.parse::<PeerId>().ok()?;
    Some(QuicCryptoError::WrongPeer { expected, actual })
}

// ---------------------------------------------------------------------------------------
// Configurations

struct ClientCrypto {
    tls: Arc<rustls::ClientConfig>,
    /// Initial packet keys: the QUIC suite of `tls`'s provider.
    initial: Suite,
}

impl qc::ClientConfig for ClientCrypto {
    fn start_session(
        self: Arc<Self>,
        version: u32,
        server_name: &str,
        params: &TransportParameters,
    ) -> Result<Box<dyn qc::Session>, ConnectError> {
        let version = interpret_version(version)?;
        let name = ServerName::try_from(server_name)
            .map_err(|_| ConnectError::InvalidServerName(server_name.into()))?
            .to_owned();
        let connection =
            rustls::quic::ClientConnection::new(self.tls.clone(), version, name, transport_parameters(params))
                .map_err(|e| {
                    // The configuration was checked in `client_crypto`: only the RNG is left.
                    // quinn has no better variant for "this endpoint cannot start sessions".
                    tracing::error!("cannot start a TLS client session: {e}");
                    ConnectError::EndpointStopping
                })?;
        Ok(Box::new(TlsSession::new(version, self.initial, Connection::Client(connection))))
    }
}

struct ServerCrypto {
    tls: Arc<rustls::ServerConfig>,
    /// Initial packet keys: the QUIC suite of `tls`'s provider.
    initial: Suite,
}

impl qc::ServerConfig for ServerCrypto {
    fn initial_keys(&self, version: u32, dst_cid: &ConnectionId) -> Result<Keys, UnsupportedVersion> {
        Ok(initial_keys(self.initial, interpret_version(version)?, dst_cid, Side::Server))
    }

    /// quinn never calls this for a version `initial_keys` refused; if it did, the tag is
    /// all zeros, which no client accepts.
    fn retry_tag(&self, version: u32, orig_dst_cid: &ConnectionId, packet: &[u8]) -> [u8; 16] {
        interpret_version(version).ok().and_then(|v| retry_tag(v, orig_dst_cid, packet)).unwrap_or([0; TAG_LEN])
    }

    fn start_session(self: Arc<Self>, version: u32, params: &TransportParameters) -> Box<dyn qc::Session> {
        // quinn calls this only for versions `initial_keys` accepted.
        let Ok(version) = interpret_version(version) else {
            return Box::new(FailedSession {
                version: Version::V1,
                initial: self.initial,
                reason: "unsupported QUIC version".into(),
            });
        };
        match rustls::quic::ServerConnection::new(self.tls.clone(), version, transport_parameters(params)) {
            Ok(connection) => Box::new(TlsSession::new(version, self.initial, Connection::Server(connection))),
            // Checked in `server_crypto`; the handshake then fails with INTERNAL_ERROR.
            Err(e) => Box::new(FailedSession {
                version,
                initial: self.initial,
                reason: format!("cannot start a TLS server session: {e}"),
            }),
        }
    }
}

/// QUIC version → the rustls key schedule (quinn-proto's `interpret_version`).
fn interpret_version(version: u32) -> Result<Version, UnsupportedVersion> {
    match version {
        0xff00_001d..=0xff00_0020 => Ok(Version::V1Draft),
        0x0000_0001 | 0xff00_0021..=0xff00_0022 => Ok(Version::V1),
        _ => Err(UnsupportedVersion),
    }
}

fn transport_parameters(params: &TransportParameters) -> Vec<u8> {
    let mut bytes = Vec::new();
    params.write(&mut bytes);
    bytes
}

fn tls_side(side: Side) -> rustls::Side {
    match side {
        Side::Client => rustls::Side::Client,
        Side::Server => rustls::Side::Server,
    }
}

/// Initial packet keys (RFC 9001 §5.2) from the client's first destination CID, over
/// `suite`'s primitives.
fn initial_keys(suite: Suite, version: Version, dst_cid: &ConnectionId, side: Side) -> Keys {
    let keys = suite.keys(dst_cid, tls_side(side), version);
    Keys {
        header: KeyPair {
            local: Box::new(HeaderProtection(keys.local.header)),
            remote: Box::new(HeaderProtection(keys.remote.header)),
        },
        packet: KeyPair {
            local: Box::new(PacketProtection(keys.local.packet)),
            remote: Box::new(PacketProtection(keys.remote.packet)),
        },
    }
}

// ---------------------------------------------------------------------------------------
// Retry integrity (RFC 9001 §5.8)

const RETRY_INTEGRITY_KEY_V1: [u8; 16] =
    [0xbe, 0x0c, 0x69, 0x0b, 0x9f, 0x66, 0x57, 0x5a, 0x1d, 0x76, 0x6b, 0x54, 0xe3, 0x68, 0xc8, 0x4e];
const RETRY_INTEGRITY_NONCE_V1: [u8; 12] = [0x46, 0x15, 0x99, 0xd3, 0x5d, 0x63, 0x2b, 0xf2, 0x23, 0x98, 0x25, 0xbb];
const RETRY_INTEGRITY_KEY_DRAFT: [u8; 16] =
    [0xcc, 0xce, 0x18, 0x7e, 0xd0, 0x9a, 0x09, 0xd0, 0x57, 0x28, 0x15, 0x5a, 0x6c, 0xb9, 0x6b, 0xe1];
const RETRY_INTEGRITY_NONCE_DRAFT: [u8; 12] = [0xe5, 0x49, 0x30, 0xf9, 0x7f, 0x21, 0x36, 0xf0, 0x53, 0x0a, 0x8c, 0x1c];

/// The Retry integrity AEAD and nonce of `version`; `None` for versions without one here.
fn retry_aead(version: Version) -> Option<(Aes128Gcm, GcmNonce)> {
    let (key, nonce) = match version {
        Version::V1 => (RETRY_INTEGRITY_KEY_V1, RETRY_INTEGRITY_NONCE_V1),
        Version::V1Draft => (RETRY_INTEGRITY_KEY_DRAFT, RETRY_INTEGRITY_NONCE_DRAFT),
        _ => return None,
    };
    Some((Aes128Gcm::new(&key.into()), nonce.into()))
}

/// The Retry pseudo-packet prefix: ODCID length, ODCID.
fn retry_pseudo_packet(orig_dst_cid: &ConnectionId, capacity: usize) -> Vec<u8> {
    let mut pseudo = Vec::with_capacity(1 + orig_dst_cid.len() + capacity);
    // A connection ID is at most 20 bytes.
    pseudo.push(orig_dst_cid.len() as u8);
    pseudo.extend_from_slice(orig_dst_cid);
    pseudo
}

/// The integrity tag of Retry `packet` (everything before the tag): AES-128-GCM with the
/// version's fixed key and nonce over an empty plaintext, the pseudo-packet as AAD.
fn retry_tag(version: Version, orig_dst_cid: &ConnectionId, packet: &[u8]) -> Option<[u8; TAG_LEN]> {
    let (aead, nonce) = retry_aead(version)?;
    let mut pseudo = retry_pseudo_packet(orig_dst_cid, packet.len());
    pseudo.extend_from_slice(packet);
    let tag = aead.encrypt_in_place_detached(&nonce, &pseudo, &mut []).ok()?;
    Some(tag.into())
}

/// Whether the Retry packet `header ‖ payload` (its last 16 bytes the tag) is authentic
/// for `orig_dst_cid`.
fn retry_is_valid(version: Version, orig_dst_cid: &ConnectionId, header: &[u8], payload: &[u8]) -> bool {
    let Some(tag_start) = payload.len().checked_sub(TAG_LEN) else {
        return false;
    };
    let Some((aead, nonce)) = retry_aead(version) else {
        return false;
    };
    let (token, tag) = payload.split_at(tag_start);
    let mut pseudo = retry_pseudo_packet(orig_dst_cid, header.len() + token.len());
    pseudo.extend_from_slice(header);
    pseudo.extend_from_slice(token);
    aead.decrypt_in_place_detached(&nonce, &pseudo, &mut [], GcmTag::from_slice(tag)).is_ok()
}

// ---------------------------------------------------------------------------------------
// The session

/// A TLS 1.3 session inside QUIC (quinn-proto's `TlsSession`, minus 0-RTT).
///
/// Once the handshake is over and rustls has nothing left to send, the rustls connection is
/// dropped ([`TlsSession::retire`]) and only what quinn still asks for is kept
/// ([`Finished`]): rustls keeps the buffer it reassembled the peer's flight in (5–7 KB with
/// ML-DSA-65 keys and signatures) for as long as the connection lives, and an idle
/// connection should not pay for its handshake.
struct TlsSession {
    version: Version,
    /// Initial packet keys (the suite of the config's provider).
    initial: Suite,
    /// Set once `handshake_data` is available (quinn polls `read_handshake`'s `true`).
    got_handshake_data: bool,
    /// The secrets of the next 1-RTT key phase: key updates need nothing else from TLS.
    next_secrets: Option<Secrets>,
    state: SessionState,
}

/// The rustls connection is boxed (over 1 KB) so that a finished session, which quinn keeps
/// for the connection's lifetime, is only as large as [`Finished`].
enum SessionState {
    /// The handshake, until rustls is done with it.
    Handshaking(Box<Connection>),
    /// After it.
    Finished(Finished),
}

/// What a session keeps once its handshake is over.
struct Finished {
    side: Side,
    handshake: HandshakeData,
    /// The peer's SPKI, as rustls gave it (`peer_identity`).
    peer: Option<Vec<CertificateDer<'static>>>,
    /// The peer's transport parameters, encoded (read again when quinn asks).
    params: Option<Vec<u8>>,
    early_data_accepted: Option<bool>,
    /// The RFC 9266 `tls-exporter` channel binding, the one exporter value kept.
    channel_binding: Option<[u8; CHANNEL_BINDING_LEN]>,
    /// NewSessionTickets from a server are skipped; anything else is refused.
    post_handshake: PostHandshakeReader,
}

/// The exporter label of RFC 9266 channel bindings (`tls-exporter`), with an empty context.
pub const CHANNEL_BINDING_LABEL: &[u8] = b"EXPORTER-Channel-Binding";
/// Bytes of the RFC 9266 channel binding.
pub const CHANNEL_BINDING_LEN: usize = 32;

impl TlsSession {
    fn new(version: Version, initial: Suite, inner: Connection) -> Self {
        TlsSession {
            version,
            initial,
            got_handshake_data: false,
            next_secrets: None,
            state: SessionState::Handshaking(Box::new(inner)),
        }
    }

    /// Drops the rustls connection once the handshake is complete and rustls has handed
    /// over everything it had to send, keeping what [`qc::Session`] still needs. After this
    /// the session cannot export keying material except the RFC 9266 channel binding.
    fn retire(&mut self) {
        let SessionState::Handshaking(inner) = &self.state else {
            return;
        };
        if inner.is_handshaking() || !self.got_handshake_data {
            return;
        }
        let side = side_of(inner);
        let finished = Finished {
            side,
            handshake: handshake_data_of(inner),
            peer: peer_certificates_of(inner),
            params: inner.quic_transport_parameters().map(<[u8]>::to_vec),
            early_data_accepted: early_data_accepted_of(inner),
            channel_binding: inner
                .export_keying_material([0u8; CHANNEL_BINDING_LEN], CHANNEL_BINDING_LABEL, Some(&[]))
                .ok(),
            post_handshake: PostHandshakeReader::new(side == Side::Client),
        };
        self.state = SessionState::Finished(finished);
    }

    fn side(&self) -> Side {
        match &self.state {
            SessionState::Handshaking(inner) => side_of(inner),
            SessionState::Finished(f) => f.side,
        }
    }

    /// The QUIC error for a failed handshake: `crypto(alert)` if TLS sent an alert (the
    /// reason naming the server's PeerId when it was the wrong one), else
    /// PROTOCOL_VIOLATION.
    fn handshake_error(inner: &Connection, error: &rustls::Error) -> TransportError {
        let Some(alert) = inner.alert() else {
            return TransportError {
                code: TransportErrorCode::PROTOCOL_VIOLATION,
                frame: None,
                reason: format!("TLS error: {error}"),
            };
        };
        let reason = match tls::peer_verify_error(error) {
            Some(PeerVerifyError::WrongPeer { actual, .. }) => format!("{WRONG_PEER_REASON}{actual}"),
            _ => error.to_string(),
        };
        TransportError { code: TransportErrorCode::crypto(alert.into()), frame: None, reason }
    }
}

fn side_of(inner: &Connection) -> Side {
    match inner {
        Connection::Client(_) => Side::Client,
        Connection::Server(_) => Side::Server,
    }
}

fn handshake_data_of(inner: &Connection) -> HandshakeData {
    HandshakeData {
        key_exchange_group: inner.negotiated_key_exchange_group().map(|g| g.name()),
        cipher_suite: inner.negotiated_cipher_suite().map(|s| s.suite()),
    }
}

fn peer_certificates_of(inner: &Connection) -> Option<Vec<CertificateDer<'static>>> {
    inner.peer_certificates().map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
}

fn early_data_accepted_of(inner: &Connection) -> Option<bool> {
    match inner {
        Connection::Client(session) => Some(session.is_early_data_accepted()),
        Connection::Server(_) => None,
    }
}

impl qc::Session for TlsSession {
    fn initial_keys(&self, dst_cid: &ConnectionId, side: Side) -> Keys {
        initial_keys(self.initial, self.version, dst_cid, side)
    }

    fn handshake_data(&self) -> Option<Box<dyn Any>> {
        if !self.got_handshake_data {
            return None;
        }
        Some(Box::new(match &self.state {
            SessionState::Handshaking(inner) => handshake_data_of(inner),
            SessionState::Finished(f) => f.handshake.clone(),
        }))
    }

    /// `Vec<CertificateDer<'static>>`: the peer's SPKI, set by rustls only after the peer's
    /// CertificateVerify was checked.
    fn peer_identity(&self) -> Option<Box<dyn Any>> {
        let peer = match &self.state {
            SessionState::Handshaking(inner) => peer_certificates_of(inner),
            SessionState::Finished(f) => f.peer.clone(),
        };
        peer.map(|certificates| Box::new(certificates) as Box<dyn Any>)
    }

    /// 0-RTT is off (no resumption), so there are never early keys.
    fn early_crypto(&self) -> Option<(Box<dyn qc::HeaderKey>, Box<dyn qc::PacketKey>)> {
        None
    }

    fn early_data_accepted(&self) -> Option<bool> {
        match &self.state {
            SessionState::Handshaking(inner) => early_data_accepted_of(inner),
            SessionState::Finished(f) => f.early_data_accepted,
        }
    }

    fn is_handshaking(&self) -> bool {
        match &self.state {
            SessionState::Handshaking(inner) => inner.is_handshaking(),
            SessionState::Finished(_) => false,
        }
    }

    fn read_handshake(&mut self, buf: &[u8]) -> Result<bool, TransportError> {
        let inner = match &mut self.state {
            SessionState::Handshaking(inner) => inner,
            SessionState::Finished(f) => {
                return match f.post_handshake.read(buf) {
                    Ok(()) => Ok(false),
                    Err(e) => Err(TransportError {
                        code: TransportErrorCode::crypto(e.alert().into()),
                        frame: None,
                        reason: e.to_string(),
                    }),
                };
            }
        };
        if let Err(e) = inner.read_hs(buf) {
            return Err(Self::handshake_error(inner, &e));
        }
        if !self.got_handshake_data {
            // rustls gives no explicit signal; with neither ALPN nor SNI in use this is the
            // end of the handshake (quinn's own test, kept for SNI from other clients).
            let have_server_name = match &**inner {
                Connection::Client(_) => false,
                Connection::Server(session) => session.server_name().is_some(),
            };
            if inner.alpn_protocol().is_some() || have_server_name || !inner.is_handshaking() {
                self.got_handshake_data = true;
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn transport_parameters(&self) -> Result<Option<TransportParameters>, TransportError> {
        let params = match &self.state {
            SessionState::Handshaking(inner) => inner.quic_transport_parameters(),
            SessionState::Finished(f) => f.params.as_deref(),
        };
        match params {
            None => Ok(None),
            Some(buf) => Ok(Some(TransportParameters::read(self.side(), &mut io::Cursor::new(buf))?)),
        }
    }

    fn write_handshake(&mut self, buf: &mut Vec<u8>) -> Option<Keys> {
        let SessionState::Handshaking(inner) = &mut self.state else {
            return None;
        };
        let keys = match inner.write_hs(buf) {
            Some(KeyChange::Handshake { keys }) => keys,
            Some(KeyChange::OneRtt { keys, next }) => {
                self.next_secrets = Some(next);
                keys
            }
            None => {
                // rustls has handed over all it had to send: if the handshake is also over,
                // nothing of it is needed any more (quinn reads the transport parameters and
                // handshake data afterwards, from what `retire` keeps).
                self.retire();
                return None;
            }
        };
        Some(Keys {
            header: KeyPair {
                local: Box::new(HeaderProtection(keys.local.header)),
                remote: Box::new(HeaderProtection(keys.remote.header)),
            },
            packet: KeyPair {
                local: Box::new(PacketProtection(keys.local.packet)),
                remote: Box::new(PacketProtection(keys.remote.packet)),
            },
        })
    }

    fn next_1rtt_keys(&mut self) -> Option<KeyPair<Box<dyn qc::PacketKey>>> {
        let keys = self.next_secrets.as_mut()?.next_packet_keys();
        Some(KeyPair { local: Box::new(PacketProtection(keys.local)), remote: Box::new(PacketProtection(keys.remote)) })
    }

    fn is_valid_retry(&self, orig_dst_cid: &ConnectionId, header: &[u8], payload: &[u8]) -> bool {
        retry_is_valid(self.version, orig_dst_cid, header, payload)
    }

    /// Any exporter during the handshake; after it, only the RFC 9266 channel binding
    /// ([`CHANNEL_BINDING_LABEL`], empty context, [`CHANNEL_BINDING_LEN`] bytes): the
    /// session no longer holds the TLS key schedule then.
    fn export_keying_material(
        &self,
        output: &mut [u8],
        label: &[u8],
        context: &[u8],
    ) -> Result<(), ExportKeyingMaterialError> {
        match &self.state {
            SessionState::Handshaking(inner) => {
                inner.export_keying_material(output, label, Some(context)).map_err(|_| ExportKeyingMaterialError)?;
            }
            SessionState::Finished(f) => {
                let binding = f.channel_binding.as_ref().ok_or(ExportKeyingMaterialError)?;
                if label != CHANNEL_BINDING_LABEL || !context.is_empty() || output.len() != binding.len() {
                    return Err(ExportKeyingMaterialError);
                }
                output.copy_from_slice(binding);
            }
        }
        Ok(())
    }
}

/// A server session rustls refused to start (impossible after `server_crypto`'s check):
/// the first handshake bytes fail the connection with INTERNAL_ERROR and `reason`.
struct FailedSession {
    version: Version,
    initial: Suite,
    reason: String,
}

impl qc::Session for FailedSession {
    fn initial_keys(&self, dst_cid: &ConnectionId, side: Side) -> Keys {
        initial_keys(self.initial, self.version, dst_cid, side)
    }

    fn handshake_data(&self) -> Option<Box<dyn Any>> {
        None
    }

    fn peer_identity(&self) -> Option<Box<dyn Any>> {
        None
    }

    fn early_crypto(&self) -> Option<(Box<dyn qc::HeaderKey>, Box<dyn qc::PacketKey>)> {
        None
    }

    fn early_data_accepted(&self) -> Option<bool> {
        None
    }

    fn is_handshaking(&self) -> bool {
        true
    }

    fn read_handshake(&mut self, _buf: &[u8]) -> Result<bool, TransportError> {
        Err(TransportError { code: TransportErrorCode::INTERNAL_ERROR, frame: None, reason: self.reason.clone() })
    }

    fn transport_parameters(&self) -> Result<Option<TransportParameters>, TransportError> {
        Ok(None)
    }

    fn write_handshake(&mut self, _buf: &mut Vec<u8>) -> Option<Keys> {
        None
    }

    fn next_1rtt_keys(&mut self) -> Option<KeyPair<Box<dyn qc::PacketKey>>> {
        None
    }

    fn is_valid_retry(&self, _orig_dst_cid: &ConnectionId, _header: &[u8], _payload: &[u8]) -> bool {
        false
    }

    fn export_keying_material(&self, _: &mut [u8], _: &[u8], _: &[u8]) -> Result<(), ExportKeyingMaterialError> {
        Err(ExportKeyingMaterialError)
    }
}

// ---------------------------------------------------------------------------------------
// Packet and header protection: rustls' keys under quinn's traits (newtypes, since both
// traits and both key types are foreign here)

/// Header protection (RFC 9001 §5.4).
struct HeaderProtection(Box<dyn HeaderProtectionKey>);

impl HeaderProtection {
    /// Masks (`encrypt`) or unmasks the first byte and the packet number of `packet`, whose
    /// packet number starts at `pn_offset`; the sample starts 4 bytes after it. quinn always
    /// passes a long enough packet; a short one is left as it is.
    fn apply(&self, pn_offset: usize, packet: &mut [u8], encrypt: bool) {
        let Some((header, sample)) = packet.split_at_mut_checked(pn_offset + 4) else {
            tracing::warn!("QUIC packet too short for header protection");
            return;
        };
        let Some((first, rest)) = header.split_first_mut() else {
            return;
        };
        let pn_end = Ord::min(pn_offset + 3, rest.len());
        let (Some(sample), Some(packet_number)) =
            (sample.get(..self.0.sample_len()), rest.get_mut(pn_offset.saturating_sub(1)..pn_end))
        else {
            tracing::warn!("QUIC packet too short for header protection");
            return;
        };
        let result = if encrypt {
            self.0.encrypt_in_place(sample, first, packet_number)
        } else {
            self.0.decrypt_in_place(sample, first, packet_number)
        };
        if let Err(e) = result {
            // Unreachable with our keys; the packet is then dropped by the peer (or by us).
            tracing::warn!("QUIC header protection failed: {e}");
        }
    }
}

impl qc::HeaderKey for HeaderProtection {
    fn decrypt(&self, pn_offset: usize, packet: &mut [u8]) {
        self.apply(pn_offset, packet, false)
    }

    fn encrypt(&self, pn_offset: usize, packet: &mut [u8]) {
        self.apply(pn_offset, packet, true)
    }

    fn sample_size(&self) -> usize {
        self.0.sample_len()
    }
}

/// Packet protection (RFC 9001 §5.3).
struct PacketProtection(Box<dyn PacketKey>);

impl qc::PacketKey for PacketProtection {
    /// `buf` is header ‖ payload ‖ room for the tag. quinn's trait cannot report failure, so
    /// if encryption ever failed the payload and tag are zeroed rather than sent in clear.
    fn encrypt(&self, packet: u64, buf: &mut [u8], header_len: usize) {
        let tag_len = self.0.tag_len();
        let Some(payload_len) = buf.len().checked_sub(header_len).and_then(|n| n.checked_sub(tag_len)) else {
            tracing::error!("QUIC packet shorter than its header and tag; not encrypted, zeroed");
            buf.fill(0);
            return;
        };
        let (header, payload_tag) = buf.split_at_mut(header_len);
        let (payload, tag_storage) = payload_tag.split_at_mut(payload_len);
        match self.0.encrypt_in_place(packet, header, payload) {
            Ok(tag) => tag_storage.iter_mut().zip(tag.as_ref()).for_each(|(out, byte)| *out = *byte),
            Err(e) => {
                tracing::error!("QUIC packet encryption failed ({e}); payload zeroed");
                payload_tag.fill(0);
            }
        }
    }

    fn decrypt(&self, packet: u64, header: &[u8], payload: &mut BytesMut) -> Result<(), CryptoError> {
        let plain_len = self.0.decrypt_in_place(packet, header, payload.as_mut()).map_err(|_| CryptoError)?.len();
        payload.truncate(plain_len);
        Ok(())
    }

    fn tag_len(&self) -> usize {
        self.0.tag_len()
    }

    fn confidentiality_limit(&self) -> u64 {
        self.0.confidentiality_limit()
    }

    fn integrity_limit(&self) -> u64 {
        self.0.integrity_limit()
    }
}

// ---------------------------------------------------------------------------------------
// Stateless-reset key and token key

/// 64 bytes from the operating system's RNG.
fn random_master_key() -> Result<Zeroizing<[u8; MASTER_KEY_LEN]>, QuicCryptoError> {
    let mut key = Zeroizing::new([0u8; MASTER_KEY_LEN]);
    getrandom::getrandom(key.as_mut()).map_err(|_| QuicCryptoError::Rng)?;
    Ok(key)
}

/// HMAC-SHA256 under a 64-byte key. The MAC is computed as HKDF-Extract(salt = key,
/// IKM = data), which RFC 5869 defines as exactly HMAC-Hash(key, data), because that
/// constructor cannot fail (`Hmac::new_from_slice` returns a `Result`).
struct ResetKey(Zeroizing<[u8; MASTER_KEY_LEN]>);

impl ResetKey {
    fn mac(&self, data: &[u8]) -> [u8; 32] {
        Hkdf::<Sha256>::extract(Some(&self.0[..]), data).0.into()
    }
}

impl qc::HmacKey for ResetKey {
    fn sign(&self, data: &[u8], signature_out: &mut [u8]) {
        let mac = self.mac(data);
        signature_out.iter_mut().zip(mac).for_each(|(out, byte)| *out = byte);
    }

    fn signature_len(&self) -> usize {
        32
    }

    fn verify(&self, data: &[u8], signature: &[u8]) -> Result<(), CryptoError> {
        let mac = self.mac(data);
        // Constant time in the contents; the length is public.
        let difference = mac.iter().zip(signature).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if signature.len() == mac.len() && difference == 0 {
            Ok(())
        } else {
            Err(CryptoError)
        }
    }
}

/// The token key: HKDF-SHA256's PRK; one AES-256-GCM key per token.
struct TokenKey(Hkdf<Sha256>);

impl qc::HandshakeTokenKey for TokenKey {
    fn aead_from_hkdf(&self, random_bytes: &[u8]) -> Box<dyn qc::AeadKey> {
        let mut key = Zeroizing::new([0u8; 32]);
        // 32 bytes is far below HKDF-SHA256's limit of 255 × 32, so this never fails; if it
        // did, the token key would refuse to seal or open anything.
        match self.0.expand(random_bytes, key.as_mut()) {
            Ok(()) => Box::new(TokenAead(Some(Aes256Gcm::new(&(*key).into())))),
            Err(_) => Box::new(TokenAead(None)),
        }
    }
}

/// AES-256-GCM with the all-zero nonce: each key seals exactly one token.
struct TokenAead(Option<Aes256Gcm>);

impl qc::AeadKey for TokenAead {
    fn seal(&self, data: &mut Vec<u8>, additional_data: &[u8]) -> Result<(), CryptoError> {
        let aead = self.0.as_ref().ok_or(CryptoError)?;
        let tag =
            aead.encrypt_in_place_detached(&GcmNonce::default(), additional_data, data).map_err(|_| CryptoError)?;
        data.extend_from_slice(&tag);
        Ok(())
    }

    fn open<'a>(&self, data: &'a mut [u8], additional_data: &[u8]) -> Result<&'a mut [u8], CryptoError> {
        let aead = self.0.as_ref().ok_or(CryptoError)?;
        let plain_len = data.len().checked_sub(TAG_LEN).ok_or(CryptoError)?;
        let (ciphertext, tag) = data.split_at_mut(plain_len);
        aead.decrypt_in_place_detached(&GcmNonce::default(), additional_data, ciphertext, GcmTag::from_slice(tag))
            .map_err(|_| CryptoError)?;
        Ok(ciphertext)
    }
}
