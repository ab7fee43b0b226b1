//! rustls configuration for the tunnel: mutual TLS 1.3, ALPN h2, certificates
//! whose only identity is a SPIFFE URI SAN. Chains are verified against the
//! trust bundle; names are not (there are none): the SPIFFE id is checked after
//! the handshake by the side that knows what it expects.

use std::sync::Arc;

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{ring, CryptoProvider},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    server::WebPkiClientVerifier,
    ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("bad PEM: {0}")]
    Pem(String),
    #[error("TLS config: {0}")]
    Config(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(String),
}

/// ring, with TLS 1.3's AES-128-GCM offered first (rustls offers AES-256
/// first; a server follows the client's order). Measured on this project's
/// machine (docs/performance.md): AES-128-GCM moves 3.0 GB/s through rustls
/// against 2.6-2.9 for AES-256-GCM and 1.1 for ChaCha20; BoringSSL (Envoy,
/// Istio) prefers it too. aws-lc-rs seals 15-20 % faster still, but AES-GCM
/// is ~7 % of the agent's CPU on the tunnel path: not worth its C build.
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = ring::default_provider();
    p.cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(p)
}

pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem(e.to_string()))
}

pub fn key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::Pem(e.to_string()))
}

pub fn roots(bundle_pem: &str) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    for c in certs_from_pem(bundle_pem)? {
        store.add(c).map_err(TlsError::Config)?;
    }
    Ok(Arc::new(store))
}

/// The SPIFFE id a peer's certificate carries (its `spiffe://` URI SAN, if
/// it is a well-formed workload id).
pub fn peer_spiffe_id(cert: &CertificateDer<'_>) -> Option<ferry_model::SpiffeId> {
    let (_, c) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let san = c.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => u.parse().ok(),
        _ => None,
    })
}

/// The DER SubjectPublicKeyInfo of a certificate.
pub fn public_key_der(cert: &CertificateDer<'_>) -> Option<Vec<u8>> {
    let (_, c) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(c.tbs_certificate.subject_pki.raw.to_vec())
}

/// Verifies `leaf` (with `intermediates`) to `roots`, valid now, for both
/// uses a workload certificate has: client and server.
pub fn verify_chain(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    roots: &RootCertStore,
) -> Result<(), rustls::Error> {
    let now = UnixTime::now();
    let algs = provider().signature_verification_algorithms.all;
    for usage in [webpki::KeyUsage::client_auth(), webpki::KeyUsage::server_auth()] {
        verify_end_entity(leaf, intermediates, roots, algs, now, usage)?;
    }
    Ok(())
}

fn verify_end_entity(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    roots: &RootCertStore,
    algs: &[&dyn rustls::pki_types::SignatureVerificationAlgorithm],
    now: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<(), rustls::Error> {
    let cert = webpki::EndEntityCert::try_from(leaf).map_err(|e| rustls::Error::General(e.to_string()))?;
    cert.verify_for_usage(algs, &roots.roots, intermediates, now, usage, None, None)
        .map_err(|e| rustls::Error::InvalidCertificate(webpki_error(e)))?;
    Ok(())
}

/// Serial number (hex) and expiry of a certificate, for views and rotation.
pub fn serial_and_expiry(cert: &CertificateDer<'_>) -> Option<(String, i64)> {
    let (_, c) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some((c.raw_serial_as_string(), c.validity().not_after.timestamp()))
}

/// Server side (the destination's tunnel listener): requires a client chain to the roots.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut c = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    c.alpn_protocols = vec![b"h2".to_vec()];
    // No resumption: a resumed TLS 1.3 session skips the certificates, so
    // an expired (or no longer trusted) client would be let back in on
    // its old session. Tunnel connections are pooled: full handshakes are rare.
    c.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    c.send_tls13_tickets = 0;
    Ok(Arc::new(c))
}

/// Client side (the source's tunnel): presents the source workload's certificate.
pub fn client_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut c = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ChainOnly {
            roots,
            provider: provider(),
        }))
        .with_client_auth_cert(chain, key)?;
    c.alpn_protocols = vec![b"h2".to_vec()];
    // No resumption (see server_config): every handshake checks both chains.
    c.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(c))
}

/// Verifies the server's chain to the trust bundle (validity, signatures,
/// serverAuth usage) but not a DNS name: the caller checks the SPIFFE id.
#[derive(Debug)]
struct ChainOnly {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        verify_end_entity(
            end_entity,
            intermediates,
            &self.roots,
            self.provider.signature_verification_algorithms.all,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

fn webpki_error(e: webpki::Error) -> rustls::CertificateError {
    use rustls::CertificateError as C;
    match e {
        webpki::Error::CertExpired { .. } => C::Expired,
        webpki::Error::CertNotValidYet { .. } => C::NotValidYet,
        webpki::Error::UnknownIssuer => C::UnknownIssuer,
        webpki::Error::InvalidSignatureForPublicKey => C::BadSignature,
        other => C::Other(rustls::OtherError(Arc::new(WebpkiError(other.to_string())))),
    }
}

#[derive(Debug)]
struct WebpkiError(String);
impl std::fmt::Display for WebpkiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for WebpkiError {}
