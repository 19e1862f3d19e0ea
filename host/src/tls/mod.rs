//! TLS 1.3 for antmesh sessions: a post-quantum-only rustls [`CryptoProvider`] and the
//! client/server configurations built on it. The wire facts are in `docs/tls.md`.
//!
//! Read first: [`provider`] (what can be negotiated at all: ML-KEM-768, AES-128-GCM with
//! SHA-256, ML-DSA-65), then [`client_config`] / [`server_config`] (mutual authentication
//! with RFC 7250 raw public keys taken from the node's [`Identity`]), then
//! [`peer_id_from_spki`] / [`peer_identity`] (who the peer is after the handshake).
//!
//! | what | value |
//! |---|---|
//! | versions | TLS 1.3 only (rustls is built without `tls12`) |
//! | key exchange | `MLKEM768` (0x0201) only |
//! | cipher suite | TLS13_AES_128_GCM_SHA256 (0x1301) only |
//! | signatures | `mldsa65` (0x0905) only, pure ML-DSA, empty context |
//! | credentials | a bare 1974-byte SPKI, OID 2.16.840.1.101.3.4.3.18 |
//! | ALPN, SNI, resumption, tickets, 0-RTT | none |
//!
//! No classical algorithm is compiled into a normal build: neither *ring* nor aws-lc-rs is
//! a dependency, and every primitive here comes from RustCrypto crates, `ml-kem`, `fips204`
//! and, for AES-128-GCM on CPUs it supports, `graviola` ([`aes_gcm_implementation`]). For QUIC, [`quic_initial_suite`] and the suite's `quic::Algorithm`
//! ([`QUIC_AES_128_GCM`]) give the packet and header-protection keys.
//!
//! With the `aws-lc` feature the same provider runs over aws-lc-rs instead (ML-KEM-768,
//! ML-DSA-65 signing and verification, AES-128-GCM, AES-128 header protection, SHA-256,
//! HMAC): same wire format, still no classical group or signature (rustls' own aws-lc
//! provider is not used). The RustCrypto primitives stay available then, per configuration:
//! `Primitives`, `client_config_with`, `server_config_with` (feature `aws-lc`). `backend.rs` says which
//! library computes what.

mod backend;
mod kx;
mod rustcrypto;
mod sign;
mod suite;
mod verify;

#[cfg(feature = "aws-lc")]
mod aws_lc;

#[cfg(test)]
mod tests;

use std::sync::Arc;

use rustls::client::danger::ServerCertVerifier;
use rustls::client::{AlwaysResolvesClientRawPublicKeys, Resumption};
use rustls::crypto::{CryptoProvider, GetRandomFailed, KeyProvider, SecureRandom};
use rustls::pki_types::PrivateKeyDer;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::{CertifiedKey, SigningKey};
use rustls::{ClientConfig, ServerConfig, SupportedCipherSuite};

use crate::identity::{Identity, PeerId};

pub use kx::{MlKem768Group, MLKEM768, MLKEM768_CIPHERTEXT_LEN, MLKEM768_ENCAPSULATION_KEY_LEN};
pub use suite::{quic_initial_suite, QuicAes128Gcm, QUIC_AES_128_GCM, TLS13_AES_128_GCM_SHA256};
pub use verify::{
    peer_id_from_spki, peer_identity, peer_verify_error, public_identity_from_spki, spki_for, PeerIdentityError,
    PeerVerifyError, SpkiError, ML_DSA_65_ALGORITHMS, ML_DSA_65_OID, SPKI_LEN,
};

use verify::{ClientKeyVerifier, ServerKeyVerifier};

/// The name of the library behind [`provider`] and the configs: `"RustCrypto"`, or
/// `"aws-lc-rs"` with the `aws-lc` feature.
pub const PRIMITIVES: &str = <backend::DefaultBackend as backend::Backend>::NAME;

/// Which AES-128-GCM the pure-Rust primitives run on this CPU: `"graviola"` (x86-64 with
/// AES-NI, PCLMULQDQ, AVX2, BMI1 and ADX, or AArch64 with the crypto extensions; about 4× the
/// other in bulk) or `"aes-gcm"` (RustCrypto, everywhere else). Same function either way.
/// With the `aws-lc` feature this is still what `Primitives::RustCrypto` uses.
pub fn aes_gcm_implementation() -> &'static str {
    rustcrypto::GcmKey::new(&[0u8; backend::AES_128_KEY_LEN]).map_or("aes-gcm", |key| key.implementation())
}

/// The post-quantum-only provider: key exchange ML-KEM-768, the one suite
/// TLS13_AES_128_GCM_SHA256, signature verification ML-DSA-65 only, randomness from the OS,
/// and a key provider that loads no DER private keys (keys come from [`Identity`]). The
/// primitives are RustCrypto's, or aws-lc-rs's with the `aws-lc` feature ([`PRIMITIVES`]).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(CryptoProvider {
        cipher_suites: vec![SupportedCipherSuite::Tls13(&TLS13_AES_128_GCM_SHA256)],
        kx_groups: vec![&MLKEM768],
        signature_verification_algorithms: ML_DSA_65_ALGORITHMS,
        secure_random: &OsRandom,
        key_provider: &NoDerKeys,
    })
}

/// Why a TLS configuration could not be built.
#[derive(thiserror::Error, Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum TlsConfigError {
    /// rustls refused the provider or the protocol versions (a bug here, not an input).
    #[error("rustls refused the TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The crypto library could not load the node's ML-DSA-65 signing key from its seed, or
    /// derived another public key from it than the identity's (only with the `aws-lc`
    /// feature; the RustCrypto key is the identity itself).
    #[error("the ML-DSA-65 signing key could not be loaded: {0}")]
    SigningKey(&'static str),
}

/// Which library computes a configuration's primitives. Only with the `aws-lc` feature,
/// which makes both available; [`provider`], [`client_config`] and [`server_config`] use
/// [`Primitives::AwsLc`] then. Both put the same bytes on the wire and talk to each other.
#[cfg(feature = "aws-lc")]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Primitives {
    /// RustCrypto, `ml-kem` and `fips204`: what a build without the feature uses.
    RustCrypto,
    /// aws-lc-rs (the default with the feature).
    AwsLc,
}

#[cfg(feature = "aws-lc")]
impl Primitives {
    /// The library's name, as [`PRIMITIVES`].
    pub fn name(self) -> &'static str {
        match self {
            Primitives::RustCrypto => <rustcrypto::RustCrypto as backend::Backend>::NAME,
            Primitives::AwsLc => <aws_lc::AwsLc as backend::Backend>::NAME,
        }
    }

    fn suite(self) -> &'static rustls::Tls13CipherSuite {
        match self {
            Primitives::RustCrypto => &suite::RUSTCRYPTO_TLS13_AES_128_GCM_SHA256,
            Primitives::AwsLc => &TLS13_AES_128_GCM_SHA256,
        }
    }

    fn kx_group(self) -> &'static dyn rustls::crypto::SupportedKxGroup {
        match self {
            Primitives::RustCrypto => &kx::MlKem768::<rustcrypto::RustCrypto>::NEW,
            Primitives::AwsLc => &MLKEM768,
        }
    }

    fn verify_algorithms(self) -> &'static rustls::crypto::WebPkiSupportedAlgorithms {
        match self {
            Primitives::RustCrypto => &verify::RUSTCRYPTO_ML_DSA_65_ALGORITHMS,
            Primitives::AwsLc => &ML_DSA_65_ALGORITHMS,
        }
    }

    fn certified_key(self, identity: &Identity) -> Result<Arc<CertifiedKey>, TlsConfigError> {
        match self {
            Primitives::RustCrypto => sign::certified_key_with::<rustcrypto::RustCrypto>(identity),
            Primitives::AwsLc => sign::certified_key_with::<aws_lc::AwsLc>(identity),
        }
    }
}

/// [`provider`] over the chosen primitives (feature `aws-lc`).
#[cfg(feature = "aws-lc")]
pub fn provider_with(primitives: Primitives) -> Arc<CryptoProvider> {
    Arc::new(CryptoProvider {
        cipher_suites: vec![SupportedCipherSuite::Tls13(primitives.suite())],
        kx_groups: vec![primitives.kx_group()],
        signature_verification_algorithms: *primitives.verify_algorithms(),
        secure_random: &OsRandom,
        key_provider: &NoDerKeys,
    })
}

/// [`quic_initial_suite`] over the chosen primitives (feature `aws-lc`).
#[cfg(feature = "aws-lc")]
pub fn quic_initial_suite_with(primitives: Primitives) -> rustls::quic::Suite {
    let suite = primitives.suite();
    rustls::quic::Suite { suite, quic: suite.quic.unwrap_or(&QUIC_AES_128_GCM) }
}

/// [`client_config`] over the chosen primitives (feature `aws-lc`).
#[cfg(feature = "aws-lc")]
pub fn client_config_with(
    identity: &Identity,
    expected: Option<PeerId>,
    primitives: Primitives,
) -> Result<ClientConfig, TlsConfigError> {
    let verifier = ServerKeyVerifier { expected, algorithms: primitives.verify_algorithms() };
    build_client_config_on(provider_with(primitives), primitives.certified_key(identity)?, Arc::new(verifier))
}

/// [`server_config`] over the chosen primitives (feature `aws-lc`).
#[cfg(feature = "aws-lc")]
pub fn server_config_with(identity: &Identity, primitives: Primitives) -> Result<ServerConfig, TlsConfigError> {
    let verifier = ClientKeyVerifier { algorithms: primitives.verify_algorithms() };
    build_server_config_on(provider_with(primitives), primitives.certified_key(identity)?, Arc::new(verifier))
}

/// A client configuration for dialling a node: TLS 1.3 only, our [`provider`], client
/// authentication with `identity`'s raw public key, no ALPN/SNI/resumption/0-RTT.
///
/// The server may present its SPKI with or without the `server_certificate_type`
/// extension (we don't ask for it). With `expected`, a server whose key hashes to another
/// [`PeerId`] is refused with [`PeerVerifyError::WrongPeer`] (see [`peer_verify_error`]).
pub fn client_config(identity: &Identity, expected: Option<PeerId>) -> Result<ClientConfig, TlsConfigError> {
    build_client_config(sign::certified_key(identity)?, Arc::new(ServerKeyVerifier::new(expected)))
}

/// A server configuration for accepting nodes: TLS 1.3 only, our [`provider`], our SPKI as
/// the "certificate", client authentication mandatory by raw public key, no ALPN, no
/// session tickets or resumption, no 0-RTT.
pub fn server_config(identity: &Identity) -> Result<ServerConfig, TlsConfigError> {
    build_server_config(sign::certified_key(identity)?, Arc::new(ClientKeyVerifier::default()))
}

fn build_client_config(
    key: Arc<CertifiedKey>,
    verifier: Arc<dyn ServerCertVerifier>,
) -> Result<ClientConfig, TlsConfigError> {
    build_client_config_on(provider(), key, verifier)
}

fn build_client_config_on(
    provider: Arc<CryptoProvider>,
    key: Arc<CertifiedKey>,
    verifier: Arc<dyn ServerCertVerifier>,
) -> Result<ClientConfig, TlsConfigError> {
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        // only_raw_public_keys() == true: sends client_certificate_type = [RawPublicKey].
        .with_client_cert_resolver(Arc::new(AlwaysResolvesClientRawPublicKeys::new(key)));
    config.alpn_protocols = Vec::new();
    config.resumption = Resumption::disabled();
    config.enable_early_data = false;
    config.enable_sni = false;
    Ok(config)
}

fn build_server_config(
    key: Arc<CertifiedKey>,
    verifier: Arc<dyn ClientCertVerifier>,
) -> Result<ServerConfig, TlsConfigError> {
    build_server_config_on(provider(), key, verifier)
}

fn build_server_config_on(
    provider: Arc<CryptoProvider>,
    key: Arc<CertifiedKey>,
    verifier: Arc<dyn ClientCertVerifier>,
) -> Result<ServerConfig, TlsConfigError> {
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(ServerKeyResolver(key)));
    config.alpn_protocols = Vec::new();
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(NoServerSessionStorage {});
    // QUIC accepts only 0 or u32::MAX here.
    config.max_early_data_size = 0;
    Ok(config)
}

/// The server's key. `only_raw_public_keys()` stays false on purpose: a client that does
/// not offer `server_certificate_type` (ant-quic) must still be answered, with the SPKI in
/// an X.509-typed entry. `AlwaysResolvesServerRawPublicKeys` would refuse such clients.
#[derive(Debug)]
struct ServerKeyResolver(Arc<CertifiedKey>);

impl ResolvesServerCert for ServerKeyResolver {
    /// Always our key: rustls resolves it before choosing the group and the signature
    /// scheme, so a client with no common group or without ML-DSA-65 is then refused with
    /// the precise `NoKxGroupsInCommon` / `NoSignatureSchemesInCommon`.
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// Randomness from the operating system.
#[derive(Debug)]
struct OsRandom;

impl SecureRandom for OsRandom {
    fn fill(&self, buf: &mut [u8]) -> Result<(), GetRandomFailed> {
        getrandom::getrandom(buf).map_err(|_| GetRandomFailed)
    }
}

/// Loads no private keys: the only key is the node's ML-DSA-65 [`Identity`].
#[derive(Debug)]
struct NoDerKeys;

impl KeyProvider for NoDerKeys {
    fn load_private_key(&self, _key_der: PrivateKeyDer<'static>) -> Result<Arc<dyn SigningKey>, rustls::Error> {
        Err(rustls::Error::General("antmesh loads no DER private keys; TLS keys come from the node identity".into()))
    }
}
