//! In-memory handshakes: rustls client and server connections shuttling bytes to each
//! other through `write_tls` / `read_tls` / `process_new_packets`, no sockets.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::internal::msgs::codec::{Codec, Reader};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    AlertDescription, CertificateError, CipherSuite, ClientConnection, DigitallySignedStruct, DistinguishedName, Error,
    HandshakeKind, NamedGroup, PeerIncompatible, PeerMisbehaved, ProtocolVersion, ServerConnection, SignatureScheme,
};
use zeroize::Zeroizing;

use super::*;

/// aws-lc-rs against RustCrypto: the same wire format (feature `aws-lc`).
#[cfg(all(test, feature = "aws-lc"))]
mod cross_check;

fn identity(seed: u8) -> Identity {
    Identity::from_seed(Zeroizing::new([seed; 32]))
}

fn server_name() -> ServerName<'static> {
    ServerName::try_from("antmesh").unwrap()
}

fn connect(client: ClientConfig, server: ServerConfig) -> (ClientConnection, ServerConnection) {
    (ClientConnection::new(Arc::new(client), server_name()).unwrap(), ServerConnection::new(Arc::new(server)).unwrap())
}

/// What each side ended with.
#[derive(Debug, Default)]
struct Outcome {
    client: Option<Error>,
    server: Option<Error>,
}

/// Moves everything `from` wants to send into `to`; returns whether anything moved.
fn transfer<A, B>(
    from: &mut rustls::ConnectionCommon<A>,
    to: &mut rustls::ConnectionCommon<B>,
    to_error: &mut Option<Error>,
) -> bool {
    let mut bytes = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut bytes).unwrap();
    }
    if bytes.is_empty() || to_error.is_some() {
        return !bytes.is_empty();
    }
    let mut rd = &bytes[..];
    while !rd.is_empty() {
        to.read_tls(&mut rd).unwrap();
        if let Err(e) = to.process_new_packets() {
            *to_error = Some(e);
            break;
        }
    }
    true
}

/// Runs both sides until neither has anything to send (the erring side's alert included).
fn pump(client: &mut ClientConnection, server: &mut ServerConnection) -> Outcome {
    let mut out = Outcome::default();
    for _ in 0..32 {
        let a = transfer(client, server, &mut out.server);
        let b = transfer(server, client, &mut out.client);
        if !a && !b {
            break;
        }
    }
    out
}

fn read_app_data<D>(conn: &mut rustls::ConnectionCommon<D>) -> Vec<u8> {
    let mut buf = [0u8; 256];
    let n = conn.reader().read(&mut buf).unwrap();
    buf[..n].to_vec()
}

// ---------------------------------------------------------------------------------------
// (1) mutual handshake, identities, application data, no resumption

#[test]
fn mutual_handshake_authenticates_both_sides_and_carries_data() {
    let alice = identity(1); // client
    let bob = identity(2); // server
    let client_cfg = Arc::new(client_config(&alice, Some(bob.peer_id())).unwrap());
    let server_cfg = Arc::new(server_config(&bob).unwrap());

    for round in 0..2 {
        let mut client = ClientConnection::new(client_cfg.clone(), server_name()).unwrap();
        let mut server = ServerConnection::new(server_cfg.clone()).unwrap();
        let out = pump(&mut client, &mut server);
        assert!(out.client.is_none() && out.server.is_none(), "round {round}: {out:?}");
        assert!(!client.is_handshaking() && !server.is_handshaking());
        // No resumption: every connection is a full, ML-DSA-authenticated handshake.
        assert_eq!(client.handshake_kind(), Some(HandshakeKind::Full));
        assert_eq!(server.handshake_kind(), Some(HandshakeKind::Full));
        assert_eq!(client.protocol_version(), Some(ProtocolVersion::TLSv1_3));
        assert_eq!(client.alpn_protocol(), None);

        // Each side holds exactly the other's SPKI and derives the right PeerId from it.
        let seen_by_client = client.peer_certificates().unwrap();
        assert_eq!(seen_by_client.len(), 1);
        assert_eq!(seen_by_client[0].as_ref(), &spki_for(bob.public())[..]);
        assert_eq!(seen_by_client[0].len(), SPKI_LEN);
        assert_eq!(peer_id_from_spki(&seen_by_client[0]).unwrap(), bob.peer_id());
        let seen_by_server = server.peer_certificates().unwrap();
        assert_eq!(seen_by_server.len(), 1);
        assert_eq!(seen_by_server[0].as_ref(), &spki_for(alice.public())[..]);
        assert_eq!(peer_identity(server.peer_certificates()).unwrap().peer_id(), alice.peer_id());
        assert_eq!(peer_identity(client.peer_certificates()).unwrap().peer_id(), bob.peer_id());

        client.writer().write_all(b"ping from alice").unwrap();
        server.writer().write_all(b"pong from bob").unwrap();
        let out = pump(&mut client, &mut server);
        assert!(out.client.is_none() && out.server.is_none(), "{out:?}");
        assert_eq!(read_app_data(&mut server), b"ping from alice");
        assert_eq!(read_app_data(&mut client), b"pong from bob");
    }
}

#[test]
fn client_without_expectation_accepts_any_valid_server_key() {
    let (mut client, mut server) =
        connect(client_config(&identity(1), None).unwrap(), server_config(&identity(3)).unwrap());
    let out = pump(&mut client, &mut server);
    assert!(out.client.is_none() && out.server.is_none(), "{out:?}");
    assert_eq!(peer_identity(client.peer_certificates()).unwrap().peer_id(), identity(3).peer_id());
}

// ---------------------------------------------------------------------------------------
// (2) negotiated parameters and the wire

/// Extensions of a plaintext ClientHello record: (type, body).
fn client_hello_extensions(record: &[u8]) -> (Vec<u16>, Vec<(u16, Vec<u8>)>) {
    let be16 = |b: &[u8], at: usize| u16::from_be_bytes([b[at], b[at + 1]]);
    assert_eq!(record[0], 0x16, "handshake record");
    let hs = &record[5..];
    assert_eq!(hs[0], 0x01, "ClientHello");
    let body = &hs[4..];
    let mut at = 2 + 32; // legacy_version, random
    at += 1 + usize::from(body[at]); // legacy_session_id
    let suites_len = usize::from(be16(body, at));
    let suites = (0..suites_len / 2).map(|i| be16(body, at + 2 + 2 * i)).collect();
    at += 2 + suites_len;
    at += 1 + usize::from(body[at]); // legacy_compression_methods
    let ext_end = at + 2 + usize::from(be16(body, at));
    at += 2;
    let mut exts = Vec::new();
    while at < ext_end {
        let (typ, len) = (be16(body, at), usize::from(be16(body, at + 2)));
        exts.push((typ, body[at + 4..at + 4 + len].to_vec()));
        at += 4 + len;
    }
    (suites, exts)
}

#[test]
fn negotiates_mlkem768_aes128gcm_and_mldsa65_only() {
    let (mut client, mut server) =
        connect(client_config(&identity(1), None).unwrap(), server_config(&identity(2)).unwrap());

    // The ClientHello on the wire (plaintext).
    let mut hello = Vec::new();
    client.write_tls(&mut hello).unwrap();
    let (suites, exts) = client_hello_extensions(&hello);
    assert_eq!(suites, vec![0x1301], "TLS13_AES_128_GCM_SHA256 only");
    let ext = |t: u16| exts.iter().find(|(typ, _)| *typ == t).map(|(_, b)| b.clone());
    assert_eq!(ext(0x000d).unwrap(), vec![0x00, 0x02, 0x09, 0x05], "signature_algorithms = [mldsa65]");
    assert_eq!(ext(0x000a).unwrap(), vec![0x00, 0x02, 0x02, 0x01], "supported_groups = [MLKEM768]");
    assert_eq!(ext(0x002b).unwrap(), vec![0x02, 0x03, 0x04], "supported_versions = [TLS 1.3]");
    let key_share = ext(0x0033).unwrap();
    assert_eq!(&key_share[2..4], &[0x02, 0x01]);
    assert_eq!(usize::from(u16::from_be_bytes([key_share[4], key_share[5]])), MLKEM768_ENCAPSULATION_KEY_LEN);
    assert_eq!(key_share.len(), 2 + 4 + MLKEM768_ENCAPSULATION_KEY_LEN, "one key share");
    assert_eq!(ext(0x0013).unwrap(), vec![0x01, 0x02], "client_certificate_type = [RawPublicKey]");
    assert_eq!(ext(0x0014), None, "no server_certificate_type");
    assert_eq!(ext(0x0010), None, "no ALPN");
    assert_eq!(ext(0x0000), None, "no SNI");
    assert_eq!(ext(0x002a), None, "no early_data");
    assert_eq!(ext(0x0029), None, "no pre_shared_key");
    let mut rd = &hello[..];
    server.read_tls(&mut rd).unwrap();
    server.process_new_packets().unwrap();

    let out = pump(&mut client, &mut server);
    assert!(out.client.is_none() && out.server.is_none(), "{out:?}");
    let commons: [&rustls::CommonState; 2] = [&client, &server];
    for common in commons {
        assert_eq!(common.negotiated_key_exchange_group().map(|g| g.name()), Some(NamedGroup::MLKEM768));
        assert_eq!(u16::from(NamedGroup::MLKEM768), 0x0201);
        assert_eq!(common.negotiated_cipher_suite().map(|s| s.suite()), Some(CipherSuite::TLS13_AES_128_GCM_SHA256));
    }
}

/// Wraps a verifier and records the scheme of every CertificateVerify it checks.
#[derive(Debug)]
struct Recording<V> {
    inner: V,
    schemes: Arc<Mutex<Vec<SignatureScheme>>>,
}

impl ServerCertVerifier for Recording<verify::ServerKeyVerifier> {
    fn verify_server_cert(
        &self,
        ee: &CertificateDer<'_>,
        im: &[CertificateDer<'_>],
        name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        self.inner.verify_server_cert(ee, im, name, ocsp, now)
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        ServerCertVerifier::verify_tls12_signature(&self.inner, m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.schemes.lock().unwrap().push(d.scheme);
        ServerCertVerifier::verify_tls13_signature(&self.inner, m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        ServerCertVerifier::supported_verify_schemes(&self.inner)
    }
    fn requires_raw_public_keys(&self) -> bool {
        ServerCertVerifier::requires_raw_public_keys(&self.inner)
    }
}

impl ClientCertVerifier for Recording<verify::ClientKeyVerifier> {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        ee: &CertificateDer<'_>,
        im: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.inner.verify_client_cert(ee, im, now)
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        ClientCertVerifier::verify_tls12_signature(&self.inner, m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.schemes.lock().unwrap().push(d.scheme);
        ClientCertVerifier::verify_tls13_signature(&self.inner, m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        ClientCertVerifier::supported_verify_schemes(&self.inner)
    }
    fn requires_raw_public_keys(&self) -> bool {
        ClientCertVerifier::requires_raw_public_keys(&self.inner)
    }
    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }
}

#[test]
fn both_certificate_verifies_are_mldsa65_and_other_schemes_are_refused() {
    let schemes = Arc::new(Mutex::new(Vec::new()));
    let client = build_client_config(
        sign::certified_key(&identity(1)).unwrap(),
        Arc::new(Recording { inner: verify::ServerKeyVerifier::new(None), schemes: schemes.clone() }),
    )
    .unwrap();
    let server = build_server_config(
        sign::certified_key(&identity(2)).unwrap(),
        Arc::new(Recording { inner: verify::ClientKeyVerifier::default(), schemes: schemes.clone() }),
    )
    .unwrap();
    let (mut client, mut server) = connect(client, server);
    let out = pump(&mut client, &mut server);
    assert!(out.client.is_none() && out.server.is_none(), "{out:?}");
    assert_eq!(*schemes.lock().unwrap(), vec![SignatureScheme::ML_DSA_65; 2]);

    // Both verifiers advertise only 0x0905 (ClientHello and CertificateRequest).
    let server_verifier = verify::ServerKeyVerifier::new(None);
    assert_eq!(ServerCertVerifier::supported_verify_schemes(&server_verifier), vec![SignatureScheme::ML_DSA_65]);
    assert_eq!(
        ClientCertVerifier::supported_verify_schemes(&verify::ClientKeyVerifier::default()),
        vec![SignatureScheme::ML_DSA_65]
    );
    assert_eq!(u16::from(SignatureScheme::ML_DSA_65), 0x0905);
    assert_eq!(provider().signature_verification_algorithms.supported_schemes(), vec![SignatureScheme::ML_DSA_65]);

    // A valid ML-DSA-65 signature is accepted only under its own code point.
    let id = identity(5);
    let cert = CertificateDer::from(spki_for(id.public()));
    let message = b"TLS 1.3, server CertificateVerify\0transcript-hash";
    let signature = id.sign(message, b"").unwrap();
    let dss = |scheme: u16, sig: &[u8]| {
        let mut enc = scheme.to_be_bytes().to_vec();
        enc.extend_from_slice(&u16::try_from(sig.len()).unwrap().to_be_bytes());
        enc.extend_from_slice(sig);
        DigitallySignedStruct::read(&mut Reader::init(&enc)).unwrap()
    };
    ServerCertVerifier::verify_tls13_signature(&server_verifier, message, &cert, &dss(0x0905, &signature)).unwrap();
    for other in [0x0904u16, 0x0906, 0x0807, 0x0403, 0x0804] {
        let err = ServerCertVerifier::verify_tls13_signature(&server_verifier, message, &cert, &dss(other, &signature))
            .unwrap_err();
        assert_eq!(
            err,
            Error::PeerMisbehaved(PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme),
            "{other:#06x}"
        );
        assert!(ClientCertVerifier::verify_tls13_signature(
            &verify::ClientKeyVerifier::default(),
            message,
            &cert,
            &dss(other, &signature)
        )
        .is_err());
    }
    let mut forged = signature;
    forged[7] ^= 0x40;
    assert!(
        ServerCertVerifier::verify_tls13_signature(&server_verifier, message, &cert, &dss(0x0905, &forged)).is_err()
    );
    assert!(ClientCertVerifier::verify_tls13_signature(
        &verify::ClientKeyVerifier::default(),
        b"other",
        &cert,
        &dss(0x0905, &signature)
    )
    .is_err());
}

// ---------------------------------------------------------------------------------------
// (3) the wrong peer

#[test]
fn client_expecting_another_peer_fails_with_the_typed_error() {
    let bob = identity(2);
    let carol = identity(3);
    let (mut client, mut server) =
        connect(client_config(&identity(1), Some(carol.peer_id())).unwrap(), server_config(&bob).unwrap());
    let out = pump(&mut client, &mut server);
    let err = out.client.expect("client must refuse");
    assert_eq!(
        peer_verify_error(&err),
        Some(&PeerVerifyError::WrongPeer { expected: carol.peer_id(), actual: bob.peer_id() })
    );
    assert_eq!(out.server, Some(Error::AlertReceived(AlertDescription::CertificateUnknown)));
    assert!(client.peer_certificates().is_none());
}

// ---------------------------------------------------------------------------------------
// (4) keys that don't match what is claimed

#[test]
fn server_presenting_someone_elses_key_fails() {
    let victim = identity(2);
    let mallory = identity(66);
    // Mallory shows Bob's SPKI but can only sign with her own key.
    let liar = sign::certified_key_with_spki::<backend::DefaultBackend>(&mallory, spki_for(victim.public())).unwrap();
    let server = build_server_config(liar, Arc::new(verify::ClientKeyVerifier::default())).unwrap();
    for expected in [None, Some(victim.peer_id())] {
        let (mut client, mut server) = connect(client_config(&identity(1), expected).unwrap(), server.clone());
        let out = pump(&mut client, &mut server);
        assert_eq!(out.client, Some(Error::InvalidCertificate(CertificateError::BadSignature)));
        assert_eq!(out.server, Some(Error::AlertReceived(AlertDescription::DecryptError)));
        assert!(client.peer_certificates().is_none());
    }
}

#[test]
fn client_presenting_someone_elses_key_fails() {
    let victim = identity(1);
    let mallory = identity(66);
    let liar = sign::certified_key_with_spki::<backend::DefaultBackend>(&mallory, spki_for(victim.public())).unwrap();
    let client = build_client_config(liar, Arc::new(verify::ServerKeyVerifier::new(None))).unwrap();
    let (mut client, mut server) = connect(client, server_config(&identity(2)).unwrap());
    let out = pump(&mut client, &mut server);
    assert_eq!(out.server, Some(Error::InvalidCertificate(CertificateError::BadSignature)));
    assert_eq!(out.client, Some(Error::AlertReceived(AlertDescription::DecryptError)));
    assert!(server.peer_certificates().is_none());
}

#[test]
fn malformed_spkis_are_refused_with_typed_errors() {
    let id = identity(2);
    let mut wrong_oid = spki_for(id.public());
    wrong_oid[16] = 0x11; // id-ml-dsa-44
    let mut short = spki_for(id.public());
    short.pop();

    // As a server key.
    for (spki, want) in
        [(wrong_oid.clone(), SpkiError::Algorithm), (short.clone(), SpkiError::Length { len: SPKI_LEN - 1 })]
    {
        let key = sign::certified_key_with_spki::<backend::DefaultBackend>(&id, spki).unwrap();
        let server = build_server_config(key, Arc::new(verify::ClientKeyVerifier::default())).unwrap();
        let (mut client, mut server) = connect(client_config(&identity(1), None).unwrap(), server);
        let out = pump(&mut client, &mut server);
        assert_eq!(peer_verify_error(&out.client.unwrap()), Some(&PeerVerifyError::Spki(want)));
    }
    // As a client key.
    let key = sign::certified_key_with_spki::<backend::DefaultBackend>(&id, wrong_oid).unwrap();
    let client = build_client_config(key, Arc::new(verify::ServerKeyVerifier::new(None))).unwrap();
    let (mut client, mut server) = connect(client, server_config(&identity(3)).unwrap());
    let out = pump(&mut client, &mut server);
    assert_eq!(peer_verify_error(&out.server.unwrap()), Some(&PeerVerifyError::Spki(SpkiError::Algorithm)));
}

#[test]
fn server_requires_a_client_key() {
    let client = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verify::ServerKeyVerifier::new(None)))
        .with_no_client_auth();
    let (mut client, mut server) = connect(client, server_config(&identity(2)).unwrap());
    let out = pump(&mut client, &mut server);
    // Without client_certificate_type = [RawPublicKey] the server refuses at ClientHello.
    assert_eq!(out.server, Some(Error::PeerIncompatible(PeerIncompatible::IncorrectCertificateTypeExtension)));
    assert_eq!(out.client, Some(Error::AlertReceived(AlertDescription::HandshakeFailure)));
}

// ---------------------------------------------------------------------------------------
// (5) a classical-only client

/// Accepts any server certificate; the handshake never gets that far.
#[derive(Debug)]
struct AcceptAnything(Vec<SignatureScheme>);

impl ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.clone()
    }
}

#[test]
fn classical_only_client_is_refused() {
    // rustls' ring provider (a dev-dependency only): X25519, secp256r1, secp384r1.
    let ring = rustls::crypto::ring::default_provider();
    assert!(ring.kx_groups.iter().all(|g| g.name() != NamedGroup::MLKEM768));
    let schemes = ring.signature_verification_algorithms.supported_schemes();
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(ring))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnything(schemes)))
        .with_no_client_auth();
    let (mut client, mut server) = connect(client, server_config(&identity(2)).unwrap());
    let out = pump(&mut client, &mut server);
    assert_eq!(out.server, Some(Error::PeerIncompatible(PeerIncompatible::NoKxGroupsInCommon)));
    assert_eq!(out.client, Some(Error::AlertReceived(AlertDescription::HandshakeFailure)));
    assert!(server.negotiated_key_exchange_group().is_none());
}

#[test]
fn client_without_mldsa65_is_refused() {
    // ML-KEM-768 in common, but the client accepts only Ed25519 signatures.
    let client = build_client_config(
        sign::certified_key(&identity(1)).unwrap(),
        Arc::new(AcceptAnything(vec![SignatureScheme::ED25519])),
    )
    .unwrap();
    let (mut client, mut server) = connect(client, server_config(&identity(2)).unwrap());
    let out = pump(&mut client, &mut server);
    assert_eq!(out.server, Some(Error::PeerIncompatible(PeerIncompatible::NoSignatureSchemesInCommon)));
    assert_eq!(out.client, Some(Error::AlertReceived(AlertDescription::HandshakeFailure)));
}

#[test]
fn provider_offers_only_pq_algorithms_and_loads_no_der_keys() {
    let p = provider();
    assert_eq!(p.kx_groups.iter().map(|g| g.name()).collect::<Vec<_>>(), vec![NamedGroup::MLKEM768]);
    assert_eq!(
        p.cipher_suites.iter().map(|s| s.suite()).collect::<Vec<_>>(),
        vec![CipherSuite::TLS13_AES_128_GCM_SHA256]
    );
    assert!(p.cipher_suites.iter().all(|s| s.tls13().and_then(|s| s.quic_suite()).is_some()));
    let der = rustls::pki_types::PrivateKeyDer::Pkcs8(vec![0x30, 0x00].into());
    assert!(p.key_provider.load_private_key(der).is_err());
    let mut buf = [0u8; 32];
    p.secure_random.fill(&mut buf).unwrap();
    assert_ne!(buf, [0u8; 32]);
}

// ---------------------------------------------------------------------------------------
// QUIC mode: the same configs drive rustls' QUIC API (what quinn glue will call)

#[test]
fn quic_mode_handshake_yields_working_packet_keys() {
    use rustls::quic::{self, KeyChange};

    let alice = identity(1);
    let bob = identity(2);
    let mut client: quic::Connection = quic::ClientConnection::new(
        Arc::new(client_config(&alice, Some(bob.peer_id())).unwrap()),
        quic::Version::V1,
        server_name(),
        b"client transport parameters".to_vec(),
    )
    .unwrap()
    .into();
    let mut server: quic::Connection = quic::ServerConnection::new(
        Arc::new(server_config(&bob).unwrap()),
        quic::Version::V1,
        b"server transport parameters".to_vec(),
    )
    .unwrap()
    .into();

    // Handshake bytes go across in order; each side keeps its 1-RTT keys when they come.
    fn step(from: &mut quic::Connection, to: &mut quic::Connection, one_rtt: &mut Option<quic::Keys>) {
        loop {
            let mut buf = Vec::new();
            let change = from.write_hs(&mut buf);
            if !buf.is_empty() {
                to.read_hs(&buf).unwrap();
            }
            match change {
                Some(KeyChange::OneRtt { keys, .. }) => *one_rtt = Some(keys),
                Some(KeyChange::Handshake { .. }) => {}
                None if buf.is_empty() => return,
                None => {}
            }
        }
    }
    let (mut client_1rtt, mut server_1rtt) = (None, None);
    for _ in 0..16 {
        step(&mut client, &mut server, &mut client_1rtt);
        step(&mut server, &mut client, &mut server_1rtt);
        if !client.is_handshaking() && !server.is_handshaking() {
            break;
        }
    }
    // The client's last flight (its Finished) after it got the server's.
    step(&mut client, &mut server, &mut client_1rtt);
    assert!(!client.is_handshaking() && !server.is_handshaking());
    assert_eq!(client.alert(), None);
    assert_eq!(server.alert(), None);
    assert_eq!(client.quic_transport_parameters(), Some(&b"server transport parameters"[..]));
    assert_eq!(server.quic_transport_parameters(), Some(&b"client transport parameters"[..]));
    assert_eq!(peer_identity(client.peer_certificates()).unwrap().peer_id(), bob.peer_id());
    assert_eq!(peer_identity(server.peer_certificates()).unwrap().peer_id(), alice.peer_id());
    assert_eq!(client.negotiated_key_exchange_group().map(|g| g.name()), Some(NamedGroup::MLKEM768));

    // A 1-RTT packet sealed by the client opens at the server, and back.
    let (Some(client_keys), Some(server_keys)) = (client_1rtt, server_1rtt) else { panic!("missing 1-RTT keys") };
    let header = [0x40u8, 1, 2, 3, 4];
    let mut payload = b"stream data".to_vec();
    let tag = client_keys.local.packet.encrypt_in_place(7, &header, &mut payload).unwrap();
    payload.extend_from_slice(tag.as_ref());
    assert_eq!(server_keys.remote.packet.decrypt_in_place(7, &header, &mut payload).unwrap(), b"stream data");
    let mut payload = b"reply".to_vec();
    let tag = server_keys.local.packet.encrypt_in_place(9, &header, &mut payload).unwrap();
    payload.extend_from_slice(tag.as_ref());
    assert!(client_keys.remote.packet.decrypt_in_place(8, &header, &mut payload.clone()).is_err());
    assert_eq!(client_keys.remote.packet.decrypt_in_place(9, &header, &mut payload).unwrap(), b"reply");
    let (mut first, mut pn) = (0x41u8, [0u8, 7]);
    client_keys.local.header.encrypt_in_place(&[5u8; 16], &mut first, &mut pn).unwrap();
    server_keys.remote.header.decrypt_in_place(&[5u8; 16], &mut first, &mut pn).unwrap();
    assert_eq!((first, pn), (0x41, [0, 7]));
}
