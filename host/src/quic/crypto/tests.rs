//! quinn over the post-quantum provider: real endpoints on 127.0.0.1, plus known answers
//! for the Retry integrity tag and checks of the reset and token keys.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::{HmacKey, Session as _};
use quinn::{ConnectionError, Endpoint, EndpointConfig, ServerConfig, TokioRuntime};
use tokio::sync::mpsc;
use tokio::time::timeout;
use zeroize::Zeroizing;

use super::*;

const T: Duration = Duration::from_secs(30);
const QUIC_DRAFT_29: u32 = 0xff00_001d;

fn identity(seed: u8) -> Identity {
    Identity::from_seed(Zeroizing::new([seed; 32]))
}

fn udp_socket() -> UdpSocket {
    UdpSocket::bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap()
}

/// A server endpoint for `identity`. With `retry`, every Initial without a Retry token is
/// answered with Retry (counted in `retries`). Each accepted connection is handed to
/// `on_connection`.
fn server<F, Fut>(
    identity: &Identity,
    retry: bool,
    retries: Arc<AtomicUsize>,
    on_connection: F,
) -> (Endpoint, SocketAddr)
where
    F: Fn(quinn::Connection) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let config = ServerConfig::new(server_crypto(identity).unwrap(), token_key().unwrap());
    let endpoint =
        Endpoint::new(EndpointConfig::new(reset_key().unwrap()), Some(config), udp_socket(), Arc::new(TokioRuntime)).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let accepting = endpoint.clone();
    let on_connection = Arc::new(on_connection);
    tokio::spawn(async move {
        while let Some(incoming) = accepting.accept().await {
            if retry && !incoming.remote_address_validated() {
                retries.fetch_add(1, Ordering::SeqCst);
                incoming.retry().unwrap();
                continue;
            }
            let on_connection = on_connection.clone();
            tokio::spawn(async move {
                if let Ok(conn) = incoming.await {
                    on_connection(conn).await;
                }
            });
        }
    });
    (endpoint, addr)
}

fn client_endpoint() -> Endpoint {
    Endpoint::new(EndpointConfig::new(reset_key().unwrap()), None, udp_socket(), Arc::new(TokioRuntime)).unwrap()
}

async fn dial(
    endpoint: &Endpoint,
    identity: &Identity,
    expected: Option<PeerId>,
    addr: SocketAddr,
    version: Option<u32>,
) -> Result<quinn::Connection, ConnectionError> {
    let mut config = quinn::ClientConfig::new(client_crypto(identity, expected).unwrap());
    if let Some(version) = version {
        config.version(version);
    }
    timeout(T, endpoint.connect_with(config, addr, "antmesh").unwrap()).await.unwrap()
}

/// The server side of the stream test: echo "pong" to a bidirectional stream, then read one
/// unidirectional stream, and report (client PeerId, bi request, uni message, handshake data).
type Seen = (PeerId, Vec<u8>, Vec<u8>, HandshakeData);

#[tokio::test]
async fn mutual_handshake_and_streams_both_kinds() {
    let (client_id, server_id) = (identity(1), identity(2));
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<Seen>();
    let (_server, addr) = server(&server_id, false, Arc::default(), move |conn| {
        let seen_tx = seen_tx.clone();
        async move {
            let peer = peer_of(&conn).unwrap().peer_id();
            let data = *conn.handshake_data().unwrap().downcast::<HandshakeData>().unwrap();
            let (mut send, mut recv) = conn.accept_bi().await.unwrap();
            let request = recv.read_to_end(1 << 16).await.unwrap();
            send.write_all(b"pong from server").await.unwrap();
            send.finish().unwrap();
            let mut uni = conn.accept_uni().await.unwrap();
            let message = uni.read_to_end(1 << 20).await.unwrap();
            seen_tx.send((peer, request, message, data)).unwrap();
            conn.closed().await;
        }
    });

    let client = client_endpoint();
    let conn = dial(&client, &client_id, Some(server_id.peer_id()), addr, None).await.unwrap();
    let server_key = peer_of(&conn).unwrap();
    assert_eq!(server_key.peer_id(), server_id.peer_id());
    assert_eq!(peer_id_of(&conn), Some(server_id.peer_id()));
    assert_eq!(server_key.as_bytes(), server_id.public().as_bytes());
    // The documented peer_identity type.
    let certs = conn.peer_identity().unwrap().downcast::<Vec<CertificateDer<'static>>>().unwrap();
    assert_eq!(certs.len(), 1);
    assert_eq!(certs[0].as_ref(), &tls::spki_for(server_id.public())[..]);
    let data = *conn.handshake_data().unwrap().downcast::<HandshakeData>().unwrap();
    assert_eq!(data.key_exchange_group, Some(NamedGroup::MLKEM768));
    assert_eq!(data.cipher_suite, Some(CipherSuite::TLS13_AES_128_GCM_SHA256));

    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(b"ping from client").await.unwrap();
    send.finish().unwrap();
    assert_eq!(recv.read_to_end(1 << 16).await.unwrap(), b"pong from server");
    let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let mut uni = conn.open_uni().await.unwrap();
    uni.write_all(&big).await.unwrap();
    uni.finish().unwrap();

    let (peer, request, message, server_data) = timeout(T, seen_rx.recv()).await.unwrap().unwrap();
    assert_eq!(peer, client_id.peer_id());
    assert_eq!(request, b"ping from client");
    assert_eq!(message, big);
    assert_eq!(server_data, data);
    conn.close(0u32.into(), b"done");
    timeout(T, client.wait_idle()).await.unwrap();
}

#[tokio::test]
async fn dialling_the_wrong_peer_fails_with_a_typed_error() {
    let (client_id, server_id, someone_else) = (identity(1), identity(2), identity(3));
    let (server_err_tx, mut server_err_rx) = mpsc::unbounded_channel();
    let config = ServerConfig::new(server_crypto(&server_id).unwrap(), token_key().unwrap());
    let server =
        Endpoint::new(EndpointConfig::new(reset_key().unwrap()), Some(config), udp_socket(), Arc::new(TokioRuntime)).unwrap();
    let addr = server.local_addr().unwrap();
    let accepting = server.clone();
    tokio::spawn(async move {
        while let Some(incoming) = accepting.accept().await {
            let _ = server_err_tx.send(incoming.await.err());
        }
    });

    let client = client_endpoint();
    let expected = someone_else.peer_id();
    let err = dial(&client, &client_id, Some(expected), addr, None).await.unwrap_err();
    let ConnectionError::TransportError(ref transport) = err else { panic!("unexpected error {err:?}") };
    assert_eq!(transport.code, TransportErrorCode::crypto(u8::from(AlertDescription::CertificateUnknown)));
    // The reason names the server's PeerId, never the one we were looking for.
    assert!(!transport.reason.contains(&expected.to_hex()), "{}", transport.reason);
    assert_eq!(wrong_peer(&err, expected), Some(QuicCryptoError::WrongPeer { expected, actual: server_id.peer_id() }));
    assert_eq!(
        wrong_peer(&err, expected).unwrap().to_string(),
        format!("dialled {expected} but the server is {}", server_id.peer_id())
    );

    // The server saw the client's alert, and never the client's key.
    let server_err = timeout(T, server_err_rx.recv()).await.unwrap().unwrap().unwrap();
    let ConnectionError::ConnectionClosed(ref close) = server_err else { panic!("unexpected {server_err:?}") };
    assert_eq!(close.error_code, TransportErrorCode::crypto(u8::from(AlertDescription::CertificateUnknown)));
    // A peer's CONNECTION_CLOSE with the same reason is not taken for our own verdict.
    assert_eq!(wrong_peer(&server_err, expected), None);
    assert_eq!(wrong_peer(&ConnectionError::TimedOut, expected), None);

    // The same client and server work with the right PeerId, or with none expected.
    for expected in [Some(server_id.peer_id()), None] {
        let conn = dial(&client, &client_id, expected, addr, None).await.unwrap();
        assert_eq!(peer_of(&conn).unwrap().peer_id(), server_id.peer_id());
        conn.close(0u32.into(), b"");
    }
}

#[tokio::test]
async fn fifty_sequential_connections() {
    const N: usize = 50;
    let (client_id, server_id) = (identity(1), identity(2));
    let (peer_tx, mut peer_rx) = mpsc::unbounded_channel();
    let (_server, addr) = server(&server_id, false, Arc::default(), move |conn| {
        let peer_tx = peer_tx.clone();
        async move {
            let mut uni = conn.accept_uni().await.unwrap();
            let message = uni.read_to_end(64).await.unwrap();
            peer_tx.send((peer_of(&conn).map(|p| p.peer_id()), message)).unwrap();
            conn.closed().await;
        }
    });

    let client = client_endpoint();
    for i in 0..N {
        let conn = dial(&client, &client_id, Some(server_id.peer_id()), addr, None).await.unwrap();
        assert_eq!(peer_of(&conn).unwrap().peer_id(), server_id.peer_id());
        let mut uni = conn.open_uni().await.unwrap();
        uni.write_all(&(i as u32).to_be_bytes()).await.unwrap();
        uni.finish().unwrap();
        let (peer, message) = timeout(T, peer_rx.recv()).await.unwrap().unwrap();
        assert_eq!(peer, Some(client_id.peer_id()));
        assert_eq!(message, (i as u32).to_be_bytes());
        conn.close(0u32.into(), b"bye");
    }
    timeout(T, client.wait_idle()).await.unwrap();
}

async fn connect_through_retry(version: Option<u32>) {
    let (client_id, server_id) = (identity(1), identity(2));
    let retries = Arc::new(AtomicUsize::new(0));
    let (peer_tx, mut peer_rx) = mpsc::unbounded_channel();
    let (_server, addr) = server(&server_id, true, retries.clone(), move |conn| {
        let peer_tx = peer_tx.clone();
        async move {
            let mut uni = conn.accept_uni().await.unwrap();
            let message = uni.read_to_end(64).await.unwrap();
            peer_tx.send((peer_of(&conn).map(|p| p.peer_id()), message)).unwrap();
            conn.closed().await;
        }
    });

    let client = client_endpoint();
    for round in 1..=2 {
        let conn = dial(&client, &client_id, Some(server_id.peer_id()), addr, version).await.unwrap();
        assert_eq!(peer_of(&conn).unwrap().peer_id(), server_id.peer_id());
        let mut uni = conn.open_uni().await.unwrap();
        uni.write_all(b"after retry").await.unwrap();
        uni.finish().unwrap();
        let (peer, message) = timeout(T, peer_rx.recv()).await.unwrap().unwrap();
        assert_eq!((peer, message), (Some(client_id.peer_id()), b"after retry".to_vec()));
        // Every connection went through exactly one Retry.
        assert_eq!(retries.load(Ordering::SeqCst), round);
        conn.close(0u32.into(), b"");
    }
}

#[tokio::test]
async fn retry_path_quic_v1() {
    connect_through_retry(None).await;
}

#[tokio::test]
async fn retry_path_quic_draft_29() {
    connect_through_retry(Some(QUIC_DRAFT_29)).await;
}

// ---------------------------------------------------------------------------------------
// Known answers and key objects

fn unhex(s: &str) -> Vec<u8> {
    hex::decode(s.replace([' ', '\n'], "")).unwrap()
}

/// RFC 9001 Appendix A.4: the Retry for client DCID 0x8394c8f03e515708, token "token".
#[test]
fn retry_integrity_tag_rfc9001_a4() {
    let odcid = ConnectionId::new(&unhex("8394c8f03e515708"));
    let retry = unhex("ff000000010008f067a5502a4262b574 6f6b656e04a265ba2eff4d829058fb3f 0f2496ba");
    let (packet, tag) = retry.split_at(retry.len() - TAG_LEN);
    assert_eq!(retry_tag(Version::V1, &odcid, packet).unwrap(), tag);
    // quinn splits header and payload (token ‖ tag) differently; any split verifies.
    for split in [0, 9, packet.len()] {
        assert!(retry_is_valid(Version::V1, &odcid, &retry[..split], &retry[split..]));
    }
    let mut forged = retry.clone();
    forged[20] ^= 1;
    assert!(!retry_is_valid(Version::V1, &odcid, &forged[..9], &forged[9..]));
    assert!(!retry_is_valid(Version::V1, &ConnectionId::new(&[1; 8]), &retry[..9], &retry[9..]));
    assert!(!retry_is_valid(Version::V1, &odcid, &[], &retry[..15]));
    // The server config answers the same through quinn's trait; v1 and draft keys differ.
    let server = server_crypto(&identity(2)).unwrap();
    assert_eq!(server.retry_tag(1, &odcid, packet), tag);
    assert_ne!(server.retry_tag(QUIC_DRAFT_29, &odcid, packet), tag);
}

/// draft-ietf-quic-tls-29 Appendix A.4: the same Retry under the draft-29 key and nonce.
#[test]
fn retry_integrity_tag_draft_29() {
    let odcid = ConnectionId::new(&unhex("8394c8f03e515708"));
    let retry = unhex("ffff00001d0008f067a5502a4262b574 6f6b656ed16926d81f6f9ca2953a8aa4 575e1e49");
    let (packet, tag) = retry.split_at(retry.len() - TAG_LEN);
    assert_eq!(retry_tag(Version::V1Draft, &odcid, packet).unwrap(), tag);
    assert!(retry_is_valid(Version::V1Draft, &odcid, packet, tag));
}

#[test]
fn versions_are_those_of_quinn() {
    let server = server_crypto(&identity(2)).unwrap();
    let cid = ConnectionId::new(&[7; 8]);
    for version in [1, 0xff00_001d, 0xff00_0020, 0xff00_0021, 0xff00_0022] {
        assert!(server.initial_keys(version, &cid).is_ok(), "{version:#x}");
    }
    for version in [0, 2, 0x6b33_43cf, 0xff00_001c, 0xff00_0023] {
        assert!(server.initial_keys(version, &cid).is_err(), "{version:#x}");
        assert_eq!(server.retry_tag(version, &cid, b"packet"), [0; TAG_LEN]);
    }
}

#[test]
fn reset_key_is_hmac_sha256() {
    use hmac::{Hmac, Mac};
    let key = ResetKey(Zeroizing::new([0x42; MASTER_KEY_LEN]));
    let mut expected = <Hmac<Sha256> as Mac>::new_from_slice(&[0x42; MASTER_KEY_LEN]).unwrap();
    expected.update(b"connection id");
    let expected = expected.finalize().into_bytes();
    let mut out = [0u8; 32];
    key.sign(b"connection id", &mut out);
    assert_eq!(out[..], expected[..]);
    assert_eq!(key.signature_len(), 32);
    assert!(key.verify(b"connection id", &out).is_ok());
    assert!(key.verify(b"connection iD", &out).is_err());
    assert!(key.verify(b"connection id", &out[..31]).is_err());
    let mut longer = out.to_vec();
    longer.push(0);
    assert!(key.verify(b"connection id", &longer).is_err());

    // Fresh keys differ; each is stable.
    let (a, b) = (reset_key().unwrap(), reset_key().unwrap());
    let (mut sa, mut sa2, mut sb) = ([0u8; 32], [0u8; 32], [0u8; 32]);
    a.sign(b"cid", &mut sa);
    a.sign(b"cid", &mut sa2);
    b.sign(b"cid", &mut sb);
    assert_eq!(sa, sa2);
    assert_ne!(sa, sb);
}

#[test]
fn token_key_seals_and_opens() {
    let key = token_key().unwrap();
    let nonce = 0x1234_5678_9abc_def0_u128.to_le_bytes();
    let mut token = b"retry token payload".to_vec();
    key.aead_from_hkdf(&nonce).seal(&mut token, b"").unwrap();
    assert_eq!(token.len(), 19 + TAG_LEN);
    assert_ne!(&token[..19], b"retry token payload");

    let mut copy = token.clone();
    assert_eq!(key.aead_from_hkdf(&nonce).open(&mut copy, b"").unwrap(), b"retry token payload");
    // Another nonce, another key, associated data, a flipped bit, or another token key: refused.
    let mut copy = token.clone();
    assert!(key.aead_from_hkdf(&[0; 16]).open(&mut copy, b"").is_err());
    let mut copy = token.clone();
    assert!(key.aead_from_hkdf(&nonce).open(&mut copy, b"aad").is_err());
    let mut copy = token.clone();
    copy[3] ^= 1;
    assert!(key.aead_from_hkdf(&nonce).open(&mut copy, b"").is_err());
    let mut copy = token.clone();
    assert!(token_key().unwrap().aead_from_hkdf(&nonce).open(&mut copy, b"").is_err());
    assert!(key.aead_from_hkdf(&nonce).open(&mut [0u8; 15], b"").is_err());
}

#[test]
fn configs_build_and_errors_read_well() {
    let id = identity(5);
    assert!(client_crypto(&id, None).is_ok());
    assert!(client_crypto(&id, Some(identity(6).peer_id())).is_ok());
    assert!(server_crypto(&id).is_ok());
    assert_eq!(QuicCryptoError::Rng.to_string(), "the operating system's random number generator failed");
}

// ---------------------------------------------------------------------------------------
// After the handshake: the rustls connection is dropped, the session keeps what quinn asks

/// Moves everything `from` has to send into `to`, as quinn does with CRYPTO frames: in
/// order, one piece per encryption level (rustls refuses a read that spans a key change).
/// Returns the bytes moved.
fn pump(from: &mut TlsSession, to: &mut TlsSession) -> usize {
    let mut moved = 0;
    loop {
        let mut buf = Vec::new();
        let keys = from.write_handshake(&mut buf);
        if !buf.is_empty() {
            to.read_handshake(&buf).unwrap();
        }
        moved += buf.len();
        if keys.is_none() && buf.is_empty() {
            return moved;
        }
    }
}

/// A client session of `client` dialling `server`, and the server's session, handshaken in
/// memory.
fn handshaken(client: &Identity, server: &Identity) -> (TlsSession, TlsSession) {
    let params = TransportParameters::read(Side::Server, &mut io::Cursor::new(&[][..])).unwrap();
    let client_tls = Arc::new(tls::client_config(client, Some(server.peer_id())).unwrap());
    let server_tls = Arc::new(tls::server_config(server).unwrap());
    let name = ServerName::try_from("antmesh").unwrap();
    let c = rustls::quic::ClientConnection::new(client_tls, Version::V1, name, transport_parameters(&params)).unwrap();
    let s = rustls::quic::ServerConnection::new(server_tls, Version::V1, transport_parameters(&params)).unwrap();
    let mut c = TlsSession::new(Version::V1, tls::quic_initial_suite(), Connection::Client(c));
    let mut s = TlsSession::new(Version::V1, tls::quic_initial_suite(), Connection::Server(s));
    while pump(&mut c, &mut s) + pump(&mut s, &mut c) > 0 {}
    (c, s)
}

fn session_peer_id(session: &TlsSession) -> PeerId {
    let certificates = session.peer_identity().unwrap().downcast::<Vec<CertificateDer<'static>>>().unwrap();
    tls::peer_identity(Some(&certificates)).unwrap().peer_id()
}

fn channel_binding(session: &TlsSession) -> [u8; CHANNEL_BINDING_LEN] {
    let mut out = [0u8; CHANNEL_BINDING_LEN];
    session.export_keying_material(&mut out, CHANNEL_BINDING_LABEL, b"").unwrap();
    out
}

#[test]
fn a_finished_session_drops_rustls_and_keeps_what_quinn_asks_for() {
    let (client_id, server_id) = (identity(1), identity(2));
    let (mut c, mut s) = handshaken(&client_id, &server_id);
    for session in [&c, &s] {
        assert!(matches!(session.state, SessionState::Finished(_)), "rustls connection dropped");
        assert!(!session.is_handshaking());
        let data = *session.handshake_data().unwrap().downcast::<HandshakeData>().unwrap();
        assert_eq!(data.key_exchange_group, Some(NamedGroup::MLKEM768));
        assert_eq!(data.cipher_suite, Some(CipherSuite::TLS13_AES_128_GCM_SHA256));
        assert!(session.transport_parameters().unwrap().is_some());
    }
    assert_eq!(session_peer_id(&c), server_id.peer_id());
    assert_eq!(session_peer_id(&s), client_id.peer_id());
    assert_eq!(c.early_data_accepted(), Some(false));
    assert_eq!(s.early_data_accepted(), None);
    assert!(c.write_handshake(&mut Vec::new()).is_none());

    // Key updates need only the kept secrets: the client's next key seals what the
    // server's next key opens.
    let (cn, sn) = (c.next_1rtt_keys().unwrap(), s.next_1rtt_keys().unwrap());
    let header = [0x40u8, 1, 2, 3];
    let mut packet = [&header[..], b"after a key update", &[0u8; 16][..]].concat();
    cn.local.encrypt(7, &mut packet, header.len());
    let mut payload = BytesMut::from(&packet[header.len()..]);
    sn.remote.decrypt(7, &header, &mut payload).unwrap();
    assert_eq!(&payload[..], b"after a key update");
}

#[test]
fn a_finished_session_exports_the_channel_binding_only() {
    let (c, s) = handshaken(&identity(1), &identity(2));
    // Both ends derive it from their own key schedule: equal only if the handshake's
    // secrets are.
    assert_eq!(channel_binding(&c), channel_binding(&s));
    assert_ne!(channel_binding(&c), [0u8; CHANNEL_BINDING_LEN]);
    let (c2, _) = handshaken(&identity(1), &identity(2));
    assert_ne!(channel_binding(&c), channel_binding(&c2), "fresh per connection");
    let mut out = [0u8; CHANNEL_BINDING_LEN];
    assert!(c.export_keying_material(&mut out, b"EXPORTER-other", b"").is_err());
    assert!(c.export_keying_material(&mut out, CHANNEL_BINDING_LABEL, b"ctx").is_err());
    assert!(c.export_keying_material(&mut [0u8; 16], CHANNEL_BINDING_LABEL, b"").is_err());
}

#[test]
fn after_the_handshake_tickets_are_skipped_and_other_messages_refused() {
    let (mut c, mut s) = handshaken(&identity(1), &identity(2));
    // A NewSessionTicket from the server, cut into three CRYPTO frames.
    let ticket = [&[4u8, 0, 0, 6][..], &[0, 0, 0, 60, 1, 2]].concat();
    for piece in ticket.chunks(4) {
        assert!(!c.read_handshake(piece).unwrap());
    }
    // KeyUpdate is forbidden in QUIC: unexpected_message, as rustls would answer.
    let e = c.read_handshake(&[24, 0, 0, 1, 0]).unwrap_err();
    assert_eq!(e.code, TransportErrorCode::crypto(u8::from(AlertDescription::UnexpectedMessage)));
    // A client sends nothing after its Finished.
    let e = s.read_handshake(&ticket).unwrap_err();
    assert_eq!(e.code, TransportErrorCode::crypto(u8::from(AlertDescription::UnexpectedMessage)));
}

#[tokio::test]
async fn quinn_connections_export_the_channel_binding_after_the_handshake() {
    let (client_id, server_id) = (identity(1), identity(2));
    let (tx, mut rx) = mpsc::unbounded_channel::<[u8; CHANNEL_BINDING_LEN]>();
    let (_server, addr) = server(&server_id, false, Arc::default(), move |conn| {
        let tx = tx.clone();
        async move {
            let mut out = [0u8; CHANNEL_BINDING_LEN];
            conn.export_keying_material(&mut out, CHANNEL_BINDING_LABEL, b"").unwrap();
            tx.send(out).unwrap();
            conn.closed().await;
        }
    });
    let client = client_endpoint();
    let conn = dial(&client, &client_id, Some(server_id.peer_id()), addr, None).await.unwrap();
    let mut out = [0u8; CHANNEL_BINDING_LEN];
    conn.export_keying_material(&mut out, CHANNEL_BINDING_LABEL, b"").unwrap();
    assert_eq!(timeout(T, rx.recv()).await.unwrap().unwrap(), out);
    assert!(conn.export_keying_material(&mut out, b"EXPORTER-other", b"").is_err());
    conn.close(0u32.into(), b"done");
    timeout(T, client.wait_idle()).await.unwrap();
}
