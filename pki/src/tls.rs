//! TLS 1.3 settings of the control plane: every gRPC connection between `overlayctl`,
//! controllers and agents.
//!
//! * Servers (controllers) present their `controller` certificate and ask for a client
//!   certificate chaining to the cluster CA. A client without one may still connect —
//!   an agent joining with a token has none yet — but every RPC except `Join` refuses it;
//!   a client presenting a certificate from another CA fails the handshake.
//! * Clients trust only the cluster CA and accept only a server whose certificate
//!   carries the `controller` role. They do not check the server's name: the role is what
//!   makes a server a controller, so controllers can be dialled by any address.
//!
//! What a peer may do is decided per call from [`crate::CertInfo`] (see the controller's
//! authorisation rules), not here.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::cert::CertInfo;
use crate::role::Role;
use crate::{Identity, PkiError};

/// Signature algorithms accepted in certificate chains (ours are ECDSA P-256).
pub const SIGNATURE_ALGORITHMS: &[&dyn rustls::pki_types::SignatureVerificationAlgorithm] =
    &[webpki::ring::ECDSA_P256_SHA256, webpki::ring::ECDSA_P384_SHA384, webpki::ring::ED25519];

/// gRPC runs over HTTP/2.
const ALPN_H2: &[u8] = b"h2";

/// The one crypto provider of the project (ring, as quinn uses).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_err(e: impl std::fmt::Display) -> PkiError {
    PkiError::Tls(e.to_string())
}

/// A controller's server side.
pub fn server_config(identity: &Identity) -> Result<Arc<rustls::ServerConfig>, PkiError> {
    let mut roots = RootCertStore::empty();
    roots.add(identity.ca.clone()).map_err(tls_err)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .allow_unauthenticated()
        .build()
        .map_err(tls_err)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![identity.cert.clone()], identity.key.clone_key())
        .map_err(tls_err)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// A client of the controllers: trusts `ca`, presents `identity` when it has one.
pub fn client_config(
    ca: &CertificateDer<'static>,
    identity: Option<&Identity>,
) -> Result<Arc<rustls::ClientConfig>, PkiError> {
    let verifier = Arc::new(RoleVerifier::new(ca, Role::Controller)?);
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match identity {
        Some(id) => builder
            .with_client_auth_cert(vec![id.cert.clone()], id.key.clone_key())
            .map_err(tls_err)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// What the certificate a TLS peer presented says (already verified by the handshake).
pub fn peer_info(certs: Option<&[CertificateDer<'_>]>) -> Option<CertInfo> {
    CertInfo::parse(certs?.first()?).ok()
}

/// Accepts a server certificate that chains to the cluster CA and carries `role`,
/// whatever name it was dialled by.
#[derive(Debug)]
struct RoleVerifier {
    anchor: TrustAnchor<'static>,
    role: Role,
    algorithms: WebPkiSupportedAlgorithms,
}

impl RoleVerifier {
    fn new(ca: &CertificateDer<'static>, role: Role) -> Result<RoleVerifier, PkiError> {
        let anchor = webpki::anchor_from_trusted_cert(ca).map_err(tls_err)?.to_owned();
        Ok(RoleVerifier { anchor, role, algorithms: provider().signature_verification_algorithms })
    }
}

impl ServerCertVerifier for RoleVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ee = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| rustls::Error::General(format!("bad server certificate: {e}")))?;
        ee.verify_for_usage(
            SIGNATURE_ALGORITHMS,
            std::slice::from_ref(&self.anchor),
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(e),
            )))
        })?;
        let info = CertInfo::parse(end_entity)
            .map_err(|e| rustls::Error::General(format!("server certificate: {e}")))?;
        if info.role != Some(self.role) {
            return Err(rustls::Error::General(format!(
                "the server's certificate ({:?}) is not a {} certificate",
                info.name, self.role
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is ever negotiated (see the protocol versions above).
        Err(rustls::Error::General("TLS 1.2 is not accepted".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
