//! Certificates: one self-signed CA per cluster, and certificates signed by it that name
//! one party and carry its [`Role`].
//!
//! A certificate's subject is `CN=<name>, O=overlay, OU=<role>`; it names `<name>` as a
//! DNS SAN (so TLS peers can check "this is host h1") and any `--ip` as IP SANs. Every
//! certificate is valid for both TLS client and server authentication, because
//! controllers and agents both dial and accept.
//!
//! Keys are ECDSA P-256 (every TLS stack verifies it; ring signs it), PKCS#8 PEM.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration as StdDuration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{
    CertificateDer, CertificateSigningRequestDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName,
    UnixTime,
};
use time::{Duration, OffsetDateTime};

use crate::files::{create_dir, read_text, write_file};
use crate::role::Role;
use crate::PkiError;

/// File name of the CA certificate in a PKI directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key in a PKI directory.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// Common name of every cluster CA (CAs are told apart by their keys, not their names).
const CA_COMMON_NAME: &str = "overlay cluster CA";
/// The organisation every overlay certificate names.
const ORGANIZATION: &str = "overlay";
/// A CA outlives any certificate it signs.
const CA_VALIDITY: Duration = Duration::days(20 * 365);
/// Lifetime of certificates made offline by `overlayctl cert issue`.
pub const DEFAULT_LIFETIME: StdDuration = StdDuration::from_secs(10 * 365 * 86_400);
/// Certificates are valid from a little before they were made, so a host whose clock is
/// slightly behind the issuer's accepts them at once.
const BACKDATE: Duration = Duration::hours(1);

/// Checks that `name` can be named in a certificate: a DNS label (the model's rule for
/// every name) that TLS does not read as an IP address.
pub fn validate_cert_name(name: &str) -> Result<(), PkiError> {
    overlay_model::names::validate_name(name)?;
    if ServerName::try_from(name).is_err() {
        return Err(PkiError::NumericName(name.to_string()));
    }
    Ok(())
}

/// What a certificate is issued for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    pub name: String,
    pub role: Role,
    /// IP SANs; for an agent, the underlay addresses it may register with.
    pub ips: Vec<IpAddr>,
    pub lifetime: StdDuration,
}

impl Subject {
    /// `name` in `role`, no IP addresses, the default lifetime.
    pub fn new(name: &str, role: Role) -> Subject {
        Subject { name: name.to_string(), role, ips: vec![], lifetime: DEFAULT_LIFETIME }
    }

    pub fn with_ips(mut self, ips: Vec<IpAddr>) -> Subject {
        self.ips = ips;
        self
    }

    pub fn with_lifetime(mut self, lifetime: StdDuration) -> Subject {
        self.lifetime = lifetime;
        self
    }
}

/// A cluster CA with its signing key.
pub struct Ca {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
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
        Ok(Ca { cert_pem: cert.pem(), cert_der: cert.der().clone(), key })
    }

    /// Reads `DIR/ca.pem` and `DIR/ca-key.pem`.
    pub fn load(dir: &Path) -> Result<Ca, PkiError> {
        Ca::load_files(&dir.join(CA_CERT_FILE), &dir.join(CA_KEY_FILE))
    }

    /// Reads the CA certificate and its key from two files.
    pub fn load_files(cert_path: &Path, key_path: &Path) -> Result<Ca, PkiError> {
        let cert_pem = read_text(cert_path)?;
        // Parse now, so a bad file is reported as itself rather than as a failed issue.
        let cert_der = parse_cert(cert_path, &cert_pem)?;
        let key = KeyPair::from_pem(&read_text(key_path)?).map_err(|e| PkiError::BadPem {
            path: key_path.to_path_buf(),
            what: "private key",
            reason: e.to_string(),
        })?;
        let ca = Ca { cert_pem, cert_der, key };
        // The key must be the one the certificate was made with, or every certificate
        // signed with it would fail to verify far from here.
        let probe = ca.issue(&Subject {
            name: "probe".into(),
            role: Role::Admin,
            ips: vec![],
            lifetime: StdDuration::from_secs(60),
        })?;
        verify_chain(&ca.cert_der, &probe.cert_der).map_err(|reason| PkiError::KeyMismatch {
            cert: cert_path.to_path_buf(),
            key: key_path.to_path_buf(),
            reason,
        })?;
        Ok(ca)
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

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA's private key, PKCS#8 DER: secret material for deriving join tokens.
    pub fn key_der(&self) -> Vec<u8> {
        self.key.serialize_der()
    }

    /// Issues a certificate with a fresh key.
    pub fn issue(&self, subject: &Subject) -> Result<Issued, PkiError> {
        let key = KeyPair::generate()?;
        let cert = subject_params(subject)?.signed_by(&key, &self.issuer())?;
        Ok(Issued {
            name: subject.name.clone(),
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs a certificate for `subject` over the public key of a PKCS#10 request (whose
    /// signature proves the requester holds the key). Everything the certificate says
    /// comes from `subject`; the request's own subject and extensions are ignored.
    pub fn sign_request(&self, csr_der: &[u8], subject: &Subject) -> Result<String, PkiError> {
        let csr =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
                .map_err(|e| PkiError::BadRequest(e.to_string()))?;
        let cert = subject_params(subject)?.signed_by(&csr.public_key, &self.issuer())?;
        Ok(cert.pem())
    }

    fn issuer(&self) -> Issuer<'_, &KeyPair> {
        // The issuer's name and key identifier come from the same parameters the CA was
        // made with; `Ca::load_files` proves they match the certificate on disk.
        Issuer::new(ca_params(), &self.key)
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

fn subject_params(subject: &Subject) -> Result<CertificateParams, PkiError> {
    validate_cert_name(&subject.name)?;
    if subject.lifetime < StdDuration::from_secs(10) {
        return Err(PkiError::Lifetime(subject.lifetime));
    }
    let lifetime =
        Duration::try_from(subject.lifetime).map_err(|_| PkiError::Lifetime(subject.lifetime))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, subject.name.as_str());
    params.distinguished_name.push(DnType::OrganizationName, ORGANIZATION);
    params.distinguished_name.push(DnType::OrganizationalUnitName, subject.role.as_str());
    params.subject_alt_names.push(SanType::DnsName(subject.name.as_str().try_into()?));
    params.subject_alt_names.extend(subject.ips.iter().copied().map(SanType::IpAddress));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages =
        vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now.checked_add(lifetime).ok_or(PkiError::Lifetime(subject.lifetime))?;
    Ok(params)
}

/// A fresh key and a certificate request for it (the request's subject is `name`; the
/// signer decides what the certificate really says).
pub fn new_key_and_request(name: &str) -> Result<(String, Vec<u8>), PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.der().to_vec()))
}

/// A freshly issued certificate and its key, PEM.
pub struct Issued {
    pub name: String,
    pub cert_pem: String,
    pub cert_der: CertificateDer<'static>,
    pub key_pem: String,
}

impl Issued {
    /// Writes `DIR/NAME.pem` and `DIR/NAME-key.pem` (0600), creating DIR; returns both paths.
    pub fn save(&self, dir: &Path) -> Result<(PathBuf, PathBuf), PkiError> {
        let (cert_path, key_path) = cert_files(dir, &self.name);
        create_dir(dir)?;
        write_file(&key_path, &self.key_pem, 0o600)?;
        write_file(&cert_path, &self.cert_pem, 0o644)?;
        Ok((cert_path, key_path))
    }
}

/// `DIR/NAME.pem`, `DIR/NAME-key.pem`.
pub fn cert_files(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (dir.join(format!("{name}.pem")), dir.join(format!("{name}-key.pem")))
}

/// What a verified certificate says: who, in which role, with which addresses, until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub name: String,
    /// `None` for a certificate without an overlay role (made by an older `cert issue`).
    pub role: Option<Role>,
    pub ips: Vec<IpAddr>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl CertInfo {
    /// Reads a certificate's subject, SANs and validity. It does not verify anything:
    /// call it on certificates a TLS handshake or [`verify_chain`] has already checked.
    pub fn parse(der: &CertificateDer<'_>) -> Result<CertInfo, PkiError> {
        let bad = |reason: String| PkiError::BadCertificate(reason);
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| bad(format!("does not parse: {e}")))?;
        let first = |mut it: Box<dyn Iterator<Item = _> + '_>| -> Option<String> {
            it.next().and_then(|a: &x509_parser::x509::AttributeTypeAndValue<'_>| {
                a.as_str().ok().map(str::to_string)
            })
        };
        let subject = cert.subject();
        let name = first(Box::new(subject.iter_common_name()))
            .ok_or_else(|| bad("names no common name".into()))?;
        let role = match first(Box::new(subject.iter_organizational_unit())) {
            Some(ou) => Some(ou.parse().map_err(|_| bad(format!("has unknown role {ou:?}")))?),
            None => None,
        };
        let mut ips = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for general in &san.value.general_names {
                if let x509_parser::extensions::GeneralName::IPAddress(bytes) = general {
                    ips.push(
                        ip_from_bytes(bytes)
                            .ok_or_else(|| bad("has a malformed IP address".into()))?,
                    );
                }
            }
        }
        let time = |t: i64| UNIX_EPOCH + StdDuration::from_secs(u64::try_from(t).unwrap_or(0));
        Ok(CertInfo {
            name,
            role,
            ips,
            not_before: time(cert.validity().not_before.timestamp()),
            not_after: time(cert.validity().not_after.timestamp()),
        })
    }

    /// How much of its validity is left at `now` (zero once expired).
    pub fn remaining(&self, now: SystemTime) -> StdDuration {
        self.not_after.duration_since(now).unwrap_or_default()
    }

    /// Its whole validity period.
    pub fn lifetime(&self) -> StdDuration {
        self.not_after.duration_since(self.not_before).unwrap_or_default()
    }
}

/// Checks that `cert` chains to `ca` and is valid now for TLS client and server use.
/// The error is the reason, for the caller to put in context.
pub fn verify_chain(ca: &CertificateDer<'_>, cert: &CertificateDer<'_>) -> Result<(), String> {
    let anchor = webpki::anchor_from_trusted_cert(ca).map_err(|e| format!("bad CA: {e}"))?;
    let ee = webpki::EndEntityCert::try_from(cert).map_err(|e| format!("bad certificate: {e}"))?;
    let now = UnixTime::now();
    for usage in [webpki::KeyUsage::server_auth(), webpki::KeyUsage::client_auth()] {
        ee.verify_for_usage(
            crate::tls::SIGNATURE_ALGORITHMS,
            std::slice::from_ref(&anchor),
            &[],
            now,
            usage,
            None,
            None,
        )
        .map_err(|e| format!("{e}"))?;
    }
    Ok(())
}

/// Checks that `cert` chains to `ca`, is valid now, carries `role` and is issued to
/// `name`.
pub fn verify_cert_for(
    ca: &CertificateDer<'_>,
    cert: &CertificateDer<'_>,
    name: &str,
    role: Role,
) -> Result<CertInfo, String> {
    verify_chain(ca, cert)?;
    let info = CertInfo::parse(cert).map_err(|e| e.to_string())?;
    if info.role != Some(role) {
        return Err(match info.role {
            Some(other) => format!("it is a {other} certificate, not a {role} certificate"),
            None => format!("it carries no role (issue it again with --role {role})"),
        });
    }
    if info.name != name {
        return Err(format!("it is issued to {:?}, not {name:?}", info.name));
    }
    Ok(info)
}

/// An IP SAN's octets as an address (4 bytes for IPv4, 16 for IPv6).
fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        return Some(IpAddr::from(v4));
    }
    <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from)
}

pub(crate) fn parse_cert(path: &Path, pem: &str) -> Result<CertificateDer<'static>, PkiError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| PkiError::BadPem {
        path: path.to_path_buf(),
        what: "certificate",
        reason: e.to_string(),
    })
}

pub(crate) fn parse_key(path: &Path, pem: &str) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| PkiError::BadPem {
        path: path.to_path_buf(),
        what: "private key",
        reason: e.to_string(),
    })
}

pub(crate) fn parse_pkcs8_key(pem: &str) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes()).map(Into::into).map_err(|e| {
        PkiError::BadPem {
            path: PathBuf::from("<memory>"),
            what: "private key",
            reason: e.to_string(),
        }
    })
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::Identity;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn tempdir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("overlay-pki-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    pub(crate) fn subject(name: &str, role: Role) -> Subject {
        Subject { name: name.into(), role, ips: vec![], lifetime: DEFAULT_LIFETIME }
    }

    #[test]
    fn issue_save_load_verify_round_trip() -> TestResult {
        let dir = tempdir("round-trip");
        let ca = Ca::generate()?;
        ca.save(&dir, false)?;
        let loaded = Ca::load(&dir)?;
        assert_eq!(loaded.cert_pem(), ca.cert_pem());
        let mut s = subject("h1", Role::Agent);
        s.ips = vec!["192.0.2.1".parse()?];
        let issued = loaded.issue(&s)?;
        let (cert, key) = issued.save(&dir)?;
        assert_eq!(cert, dir.join("h1.pem"));
        for private in [&key, &dir.join(CA_KEY_FILE)] {
            let mode = fs::metadata(private)?.permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", private.display());
        }
        let id = Identity::load(&dir.join(CA_CERT_FILE), &cert, &key)?;
        assert_eq!(id.info.name, "h1");
        assert_eq!(id.info.role, Some(Role::Agent));
        assert_eq!(id.info.ips, vec!["192.0.2.1".parse::<IpAddr>()?]);
        assert!(verify_cert_for(&id.ca, &id.cert, "h1", Role::Agent).is_ok());
        let wrong = verify_cert_for(&id.ca, &id.cert, "h2", Role::Agent);
        assert_eq!(wrong.err().as_deref(), Some("it is issued to \"h1\", not \"h2\""));
        let wrong = verify_cert_for(&id.ca, &id.cert, "h1", Role::Admin);
        assert_eq!(
            wrong.err().as_deref(),
            Some("it is a agent certificate, not a admin certificate")
        );
        fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn lifetime_is_what_was_asked() -> TestResult {
        let ca = Ca::generate()?;
        let mut s = subject("h1", Role::Agent);
        s.lifetime = StdDuration::from_secs(3600);
        let info = CertInfo::parse(&ca.issue(&s)?.cert_der)?;
        let left = info.remaining(SystemTime::now()).as_secs();
        assert!((3500..=3600).contains(&left), "{left}");
        s.lifetime = StdDuration::from_secs(1);
        assert!(matches!(ca.issue(&s), Err(PkiError::Lifetime(_))));
        Ok(())
    }

    #[test]
    fn certificate_from_another_ca_does_not_verify() -> TestResult {
        let (ours, theirs) = (Ca::generate()?, Ca::generate()?);
        let mine = ours.issue(&subject("h1", Role::Agent))?;
        let foreign = theirs.issue(&subject("h1", Role::Agent))?;
        assert!(verify_chain(ours.cert_der(), &mine.cert_der).is_ok());
        let err = verify_chain(ours.cert_der(), &foreign.cert_der);
        assert!(err.is_err(), "{err:?}");
        Ok(())
    }

    #[test]
    fn signs_requests_with_the_signers_subject() -> TestResult {
        let ca = Ca::generate()?;
        let (key_pem, csr) = new_key_and_request("whoever")?;
        let mut s = subject("h7", Role::Agent);
        s.ips = vec!["192.0.2.7".parse()?];
        let pem = ca.sign_request(&csr, &s)?;
        let cert = parse_cert(Path::new("<memory>"), &pem)?;
        let info = verify_cert_for(ca.cert_der(), &cert, "h7", Role::Agent)?;
        assert_eq!(info.ips, s.ips);
        // The key from the request is the certificate's key.
        Identity::from_parts(ca.cert_der().clone(), cert, parse_pkcs8_key(&key_pem)?)?;
        let err = ca.sign_request(b"garbage", &s).err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("certificate request")));
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
    fn a_ca_key_that_does_not_match_is_refused() -> TestResult {
        let (dir, other) = (tempdir("mismatch"), tempdir("mismatch-other"));
        Ca::generate()?.save(&dir, false)?;
        Ca::generate()?.save(&other, false)?;
        let err = Ca::load_files(&dir.join(CA_CERT_FILE), &other.join(CA_KEY_FILE));
        assert!(matches!(err, Err(PkiError::KeyMismatch { .. })), "{:?}", err.err());
        fs::remove_dir_all(&dir)?;
        fs::remove_dir_all(&other)?;
        Ok(())
    }

    #[test]
    fn bad_names_and_files_are_named_in_the_error() -> TestResult {
        let ca = Ca::generate()?;
        for bad in ["", "H1", "a.b", "-a", "x_y", "123"] {
            let message = ca
                .issue(&subject(bad, Role::Agent))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(message.contains(&format!("{bad:?}")), "{message}");
        }
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
