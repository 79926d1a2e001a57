//! The cluster PKI: one self-signed CA per cluster, and a certificate per host signed by
//! it. A host certificate names the host (SAN DNS = host name, optionally SAN IP = its
//! underlay address) and is valid for both TLS client and server authentication, because
//! every agent both dials and accepts.
//!
//! Files are PEM. Private keys are PKCS#8, written with mode 0600 through a temporary
//! file and a rename, so a reader never sees half a key and a key is never world-readable
//! even for a moment. Keys are ECDSA P-256 (every TLS stack verifies it; ring signs it).

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use overlay_model::names::validate_name;
use overlay_model::ModelError;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use thiserror::Error;
use time::{Duration, OffsetDateTime};

/// File name of the CA certificate in a PKI directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key in a PKI directory.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// Common name of every cluster CA (CAs are told apart by their keys, not their names).
const CA_COMMON_NAME: &str = "overlay cluster CA";
/// A CA outlives any host certificate it signs.
const CA_VALIDITY: Duration = Duration::days(20 * 365);
const HOST_VALIDITY: Duration = Duration::days(10 * 365);
/// Certificates are valid from a little before they were made, so a host whose clock is
/// slightly behind the issuer's accepts them at once.
const BACKDATE: Duration = Duration::hours(1);

#[derive(Debug, Error)]
pub enum PkiError {
    #[error(transparent)]
    InvalidName(#[from] ModelError),
    #[error("host name {0:?} cannot be a certificate name: an all-numeric or hex name reads as an IP address")]
    NumericName(String),
    #[error("{0} already exists: refusing to replace the cluster CA (--force replaces it)")]
    CaExists(PathBuf),
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a valid PEM {what}: {reason}")]
    BadPem { path: PathBuf, what: &'static str, reason: String },
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("certificate {path} is not valid for host {host:?} under CA {ca}: {reason}")]
    NotValid { path: PathBuf, host: String, ca: PathBuf, reason: String },
}

/// Checks that `host` can be named in a certificate: a DNS label (the model's rule for
/// every name) that TLS does not read as an IP address.
pub fn validate_host_name(host: &str) -> Result<(), PkiError> {
    validate_name(host)?;
    if ServerName::try_from(host).is_err() {
        return Err(PkiError::NumericName(host.to_string()));
    }
    Ok(())
}

/// A cluster CA with its signing key.
pub struct Ca {
    cert_pem: String,
    key: KeyPair,
}

impl Ca {
    /// Makes a new CA with a fresh key.
    pub fn generate() -> Result<Ca, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = ca_params();
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_VALIDITY;
        let cert = params.self_signed(&key)?;
        Ok(Ca { cert_pem: cert.pem(), key })
    }

    /// Reads `DIR/ca.pem` and `DIR/ca-key.pem`.
    pub fn load(dir: &Path) -> Result<Ca, PkiError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let cert_pem = read_text(&cert_path)?;
        // Parse now, so a bad file is reported as itself rather than as a failed issue.
        parse_cert(&cert_path, &cert_pem)?;
        let key_path = dir.join(CA_KEY_FILE);
        let key = KeyPair::from_pem(&read_text(&key_path)?).map_err(|e| PkiError::BadPem {
            path: key_path,
            what: "private key",
            reason: e.to_string(),
        })?;
        Ok(Ca { cert_pem, key })
    }

    /// Writes `DIR/ca.pem` and `DIR/ca-key.pem` (0600), creating DIR. Refuses when either
    /// exists, unless `force`.
    pub fn save(&self, dir: &Path, force: bool) -> Result<(), PkiError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        if !force {
            for path in [&cert_path, &key_path] {
                if path.exists() {
                    return Err(PkiError::CaExists(path.clone()));
                }
            }
        }
        create_dir(dir)?;
        write_file(&key_path, &self.key.serialize_pem(), 0o600)?;
        write_file(&cert_path, &self.cert_pem, 0o644)
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a certificate for host `host`, with `ip` as an extra IP SAN.
    pub fn issue(&self, host: &str, ip: Option<IpAddr>) -> Result<HostCert, PkiError> {
        validate_host_name(host)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, host);
        params.subject_alt_names.push(SanType::DnsName(host.try_into()?));
        params.subject_alt_names.extend(ip.map(SanType::IpAddress));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + HOST_VALIDITY;
        // The issuer's name and key identifier come from the same parameters the CA was
        // made with; `verify_host_cert` in the tests and at load time proves they match.
        let issuer = Issuer::new(ca_params(), &self.key);
        let cert = params.signed_by(&key, &issuer)?;
        Ok(HostCert { host: host.to_string(), cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

/// What the CA certificate says about itself, shared by [`Ca::generate`] and the issuer
/// side of [`Ca::issue`] (which must name the CA exactly as its certificate does).
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, CA_COMMON_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

/// A freshly issued host certificate and its key, PEM.
pub struct HostCert {
    pub host: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl HostCert {
    /// Writes `DIR/HOST.pem` and `DIR/HOST-key.pem` (0600), creating DIR; returns both paths.
    pub fn save(&self, dir: &Path) -> Result<(PathBuf, PathBuf), PkiError> {
        let (cert_path, key_path) = host_files(dir, &self.host);
        create_dir(dir)?;
        write_file(&key_path, &self.key_pem, 0o600)?;
        write_file(&cert_path, &self.cert_pem, 0o644)?;
        Ok((cert_path, key_path))
    }
}

/// `DIR/HOST.pem`, `DIR/HOST-key.pem`.
pub fn host_files(dir: &Path, host: &str) -> (PathBuf, PathBuf) {
    (dir.join(format!("{host}.pem")), dir.join(format!("{host}-key.pem")))
}

/// What a host needs to join the encrypted plane: its name, its certificate and key, and
/// the cluster CA that every peer's certificate must chain to.
#[derive(Debug)]
pub struct Identity {
    pub host: String,
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
    pub ca: CertificateDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            host: self.host.clone(),
            cert: self.cert.clone(),
            key: self.key.clone_key(),
            ca: self.ca.clone(),
        }
    }
}

impl Identity {
    /// Reads `ca` (the CA certificate), `cert` and `key` (host `host`'s) and checks that
    /// the certificate is valid now, chains to the CA and names `host`.
    pub fn load(host: &str, ca: &Path, cert: &Path, key: &Path) -> Result<Identity, PkiError> {
        validate_host_name(host)?;
        let ca_der = parse_cert(ca, &read_text(ca)?)?;
        let cert_der = parse_cert(cert, &read_text(cert)?)?;
        let key_der = PrivateKeyDer::from_pem_slice(read_text(key)?.as_bytes()).map_err(|e| {
            PkiError::BadPem { path: key.to_path_buf(), what: "private key", reason: e.to_string() }
        })?;
        verify_host_cert(&ca_der, &cert_der, host).map_err(|reason| PkiError::NotValid {
            path: cert.to_path_buf(),
            host: host.to_string(),
            ca: ca.to_path_buf(),
            reason,
        })?;
        Ok(Identity { host: host.to_string(), cert: cert_der, key: key_der, ca: ca_der })
    }

    /// [`Identity::load`] from the layout `overlayctl cert` writes: `DIR/ca.pem`,
    /// `DIR/HOST.pem`, `DIR/HOST-key.pem`.
    pub fn load_dir(dir: &Path, host: &str) -> Result<Identity, PkiError> {
        validate_host_name(host)?;
        let (cert, key) = host_files(dir, host);
        Identity::load(host, &dir.join(CA_CERT_FILE), &cert, &key)
    }

    /// An identity straight from a CA, without files (tests, tools).
    pub fn from_issued(ca: &Ca, issued: &HostCert) -> Result<Identity, PkiError> {
        let from_memory = PathBuf::from("<memory>");
        let key = PrivatePkcs8KeyDer::from_pem_slice(issued.key_pem.as_bytes()).map_err(|e| {
            PkiError::BadPem {
                path: from_memory.clone(),
                what: "private key",
                reason: e.to_string(),
            }
        })?;
        Ok(Identity {
            host: issued.host.clone(),
            cert: parse_cert(&from_memory, &issued.cert_pem)?,
            key: key.into(),
            ca: parse_cert(&from_memory, ca.cert_pem())?,
        })
    }
}

/// Checks that `cert` chains to `ca`, is valid now for TLS client and server use, and
/// names `host`. The error is the reason, for the caller to put in context.
pub fn verify_host_cert(
    ca: &CertificateDer<'_>,
    cert: &CertificateDer<'_>,
    host: &str,
) -> Result<(), String> {
    let anchor = webpki::anchor_from_trusted_cert(ca).map_err(|e| format!("bad CA: {e}"))?;
    let ee = webpki::EndEntityCert::try_from(cert).map_err(|e| format!("bad certificate: {e}"))?;
    let algs = &[webpki::ring::ECDSA_P256_SHA256, webpki::ring::ED25519];
    let now = UnixTime::now();
    for usage in [webpki::KeyUsage::server_auth(), webpki::KeyUsage::client_auth()] {
        ee.verify_for_usage(algs, std::slice::from_ref(&anchor), &[], now, usage, None, None)
            .map_err(|e| format!("{e}"))?;
    }
    verify_names_host(&ee, host)
}

/// Checks that an already chain-verified end-entity certificate names `host`.
pub(crate) fn verify_names_host(ee: &webpki::EndEntityCert<'_>, host: &str) -> Result<(), String> {
    let name = ServerName::try_from(host).map_err(|_| format!("{host:?} is not a DNS name"))?;
    ee.verify_is_valid_for_subject_name(&name).map_err(|e| format!("{e}"))
}

fn parse_cert(path: &Path, pem: &str) -> Result<CertificateDer<'static>, PkiError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| PkiError::BadPem {
        path: path.to_path_buf(),
        what: "certificate",
        reason: e.to_string(),
    })
}

fn read_text(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Read { path: path.to_path_buf(), source })
}

fn create_dir(dir: &Path) -> Result<(), PkiError> {
    fs::create_dir_all(dir).map_err(|source| PkiError::Write { path: dir.to_path_buf(), source })
}

/// Writes `contents` to `path` with `mode` through a temporary file in the same directory
/// and a rename.
fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    let err = |source| PkiError::Write { path: path.to_path_buf(), source };
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    // A stale temporary file from an interrupted run would keep its old mode.
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(err(e)),
        _ => {}
    }
    let mut file =
        fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp).map_err(err)?;
    file.write_all(contents.as_bytes()).and_then(|()| file.sync_all()).map_err(err)?;
    fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn tempdir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("overlay-pki-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn issue_save_load_verify_round_trip() -> TestResult {
        let dir = tempdir("round-trip");
        let ca = Ca::generate()?;
        ca.save(&dir, false)?;
        let loaded = Ca::load(&dir)?;
        assert_eq!(loaded.cert_pem(), ca.cert_pem());
        let issued = loaded.issue("h1", Some("192.0.2.1".parse().expect("ip")))?;
        let (cert, key) = issued.save(&dir)?;
        assert_eq!(cert, dir.join("h1.pem"));
        for private in [&key, &dir.join(CA_KEY_FILE)] {
            let mode = fs::metadata(private)?.permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", private.display());
        }
        let id = Identity::load_dir(&dir, "h1")?;
        assert_eq!(id.host, "h1");
        // The same certificate does not name another host.
        let wrong = verify_host_cert(&id.ca, &id.cert, "h2");
        assert!(wrong.is_err(), "{wrong:?}");
        fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn certificate_from_another_ca_does_not_verify() -> TestResult {
        let (ours, theirs) = (Ca::generate()?, Ca::generate()?);
        let mine = Identity::from_issued(&ours, &ours.issue("h1", None)?)?;
        let foreign = Identity::from_issued(&theirs, &theirs.issue("h1", None)?)?;
        assert!(verify_host_cert(&mine.ca, &mine.cert, "h1").is_ok());
        let err = verify_host_cert(&mine.ca, &foreign.cert, "h1");
        assert!(err.is_err(), "{err:?}");
        Ok(())
    }

    #[test]
    fn refuses_to_replace_a_ca_unless_forced() -> TestResult {
        let dir = tempdir("replace");
        Ca::generate()?.save(&dir, false)?;
        let second = Ca::generate()?;
        match second.save(&dir, false) {
            Err(PkiError::CaExists(path)) => assert_eq!(path, dir.join(CA_CERT_FILE)),
            other => panic!("{:?}", other.err()),
        }
        second.save(&dir, true)?;
        assert_eq!(Ca::load(&dir)?.cert_pem(), second.cert_pem());
        fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn bad_names_and_files_are_named_in_the_error() -> TestResult {
        let ca = Ca::generate()?;
        for bad in ["", "H1", "a.b", "-a", "x_y"] {
            let message = ca.issue(bad, None).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(message.contains(&format!("{bad:?}")), "{message}");
        }
        let message = ca.issue("123", None).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("\"123\""), "{message}");

        let dir = tempdir("bad-files");
        create_dir(&dir)?;
        let missing = Ca::load(&dir).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(missing.contains(&dir.join(CA_CERT_FILE).display().to_string()), "{missing}");
        write_file(&dir.join(CA_CERT_FILE), "not pem", 0o644)?;
        let garbage = Ca::load(&dir).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(garbage.contains("not a valid PEM certificate"), "{garbage}");
        fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
