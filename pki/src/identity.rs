//! A party's credentials: the cluster CA it trusts, its own certificate and key, and what
//! that certificate says ([`CertInfo`]).

use std::path::Path;

use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::cert::{
    parse_cert, parse_key, parse_pkcs8_key, verify_cert_for, verify_chain, Ca, CertInfo, Issued,
};
use crate::files::read_text;
use crate::role::Role;
use crate::PkiError;

#[derive(Debug)]
pub struct Identity {
    /// The cluster CA: the only trust anchor.
    pub ca: CertificateDer<'static>,
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
    pub info: CertInfo,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone_key(),
            info: self.info.clone(),
        }
    }
}

impl Identity {
    /// Reads the CA certificate, a certificate and its key, and checks that the
    /// certificate is valid now, chains to the CA and belongs to the key. `cert` and
    /// `key` may be one file holding both (read once, so a file replaced while it is
    /// read still gives a matching pair).
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Identity, PkiError> {
        let ca_der = load_ca(ca)?;
        let cert_text = read_text(cert)?;
        let key_text = if key == cert { cert_text.clone() } else { read_text(key)? };
        let cert_der = parse_cert(cert, &cert_text)?;
        let key_der = parse_key(key, &key_text)?;
        verify_chain(&ca_der, &cert_der).map_err(|reason| PkiError::NotValid {
            path: cert.to_path_buf(),
            ca: ca.to_path_buf(),
            reason,
        })?;
        Identity::from_parts(ca_der, cert_der, key_der).map_err(|e| match e {
            PkiError::KeyDoesNotMatch => PkiError::KeyMismatch {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
                reason: "the key is not the certificate's".into(),
            },
            other => other,
        })
    }

    /// [`Identity::load`], and the certificate must carry `role` and be issued to `name`.
    pub fn load_for(
        ca: &Path,
        cert: &Path,
        key: &Path,
        name: &str,
        role: Role,
    ) -> Result<Identity, PkiError> {
        let identity = Identity::load(ca, cert, key)?;
        verify_cert_for(&identity.ca, &identity.cert, name, role).map_err(|reason| {
            PkiError::NotValid { path: cert.to_path_buf(), ca: ca.to_path_buf(), reason }
        })?;
        Ok(identity)
    }

    /// An identity from parts already in memory; checks that the key is the certificate's.
    pub fn from_parts(
        ca: CertificateDer<'static>,
        cert: CertificateDer<'static>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Identity, PkiError> {
        let info = CertInfo::parse(&cert)?;
        let provider = crate::tls::provider();
        let certified =
            rustls::sign::CertifiedKey::from_der(vec![cert.clone()], key.clone_key(), &provider)
                .map_err(|_| PkiError::KeyDoesNotMatch)?;
        certified.keys_match().map_err(|_| PkiError::KeyDoesNotMatch)?;
        Ok(Identity { ca, cert, key, info })
    }

    /// An identity straight from a CA, without files (tests, tools, simulators).
    pub fn from_issued(ca: &Ca, issued: &Issued) -> Result<Identity, PkiError> {
        Identity::from_parts(
            ca.cert_der().clone(),
            issued.cert_der.clone(),
            parse_pkcs8_key(&issued.key_pem)?,
        )
    }

    /// The name the certificate is issued to.
    pub fn name(&self) -> &str {
        &self.info.name
    }
}

/// Reads a CA certificate (the trust anchor of a party that has no certificate yet).
pub fn load_ca(path: &Path) -> Result<CertificateDer<'static>, PkiError> {
    let der = parse_cert(path, &read_text(path)?)?;
    webpki::anchor_from_trusted_cert(&der).map_err(|e| PkiError::BadPem {
        path: path.to_path_buf(),
        what: "CA certificate",
        reason: e.to_string(),
    })?;
    Ok(der)
}
