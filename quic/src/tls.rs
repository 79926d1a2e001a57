//! TLS for the plane: mutual authentication against the cluster CA and nothing else.
//!
//! The server side requires a client certificate chaining to the CA (rustls'
//! `WebPkiClientVerifier` over a root store holding only the CA); the client side checks
//! the server's certificate against the CA for the host name the caller expects at the
//! address it dials. rustls cannot know which name a client should have, so
//! [`check_peer_name`] does that after the handshake: the plane knows which host lives at
//! the client's address.

use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;

use crate::QuicError;
use overlay_pki::{CertInfo, Identity, Role};

/// ALPN protocol of the plane; a peer speaking anything else fails the handshake.
pub const ALPN: &[u8] = b"overlay-frames/1";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(identity: &Identity) -> Result<Arc<RootCertStore>, QuicError> {
    let mut roots = RootCertStore::empty();
    roots.add(identity.ca.clone()).map_err(QuicError::Tls)?;
    Ok(Arc::new(roots))
}

pub(crate) fn server_crypto(identity: &Identity) -> Result<QuicServerConfig, QuicError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(identity)?, provider())
        .build()
        .map_err(|e| QuicError::Verifier(e.to_string()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(QuicError::Tls)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![identity.cert.clone()], identity.key.clone_key())
        .map_err(QuicError::Tls)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    QuicServerConfig::try_from(tls).map_err(|e| QuicError::Verifier(e.to_string()))
}

pub(crate) fn client_crypto(identity: &Identity) -> Result<QuicClientConfig, QuicError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(QuicError::Tls)?
        .with_root_certificates(roots(identity)?)
        .with_client_auth_cert(vec![identity.cert.clone()], identity.key.clone_key())
        .map_err(QuicError::Tls)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    QuicClientConfig::try_from(tls).map_err(|e| QuicError::Verifier(e.to_string()))
}

/// Checks that the certificate a connected peer presented (already verified against the
/// CA by the handshake) is the `agent` certificate of `host`.
pub(crate) fn check_peer_name(conn: &quinn::Connection, host: &str) -> Result<(), String> {
    let identity = conn.peer_identity().ok_or("no certificate presented")?;
    let chain = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| "unexpected kind of peer identity")?;
    let leaf = chain.first().ok_or("empty certificate chain")?;
    let info = CertInfo::parse(leaf).map_err(|e| e.to_string())?;
    if info.role != Some(Role::Agent) {
        return Err(format!("{:?} does not hold an agent certificate", info.name));
    }
    if info.name != host {
        return Err(format!("the certificate is issued to {:?}, not {host:?}", info.name));
    }
    Ok(())
}
