//! Everything the PKI can refuse, each with a message that names the bad value or file.

use std::path::PathBuf;
use std::time::Duration;

use overlay_model::ModelError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum PkiError {
    #[error(transparent)]
    InvalidName(#[from] ModelError),
    #[error("name {0:?} cannot be a certificate name: an all-numeric or hex name reads as an IP address")]
    NumericName(String),
    #[error("unknown role {0:?}: expected controller, agent or admin")]
    UnknownRole(String),
    #[error("certificate lifetime {0:?} is out of range (10 s to 100 years)")]
    Lifetime(Duration),
    #[error("{0} already exists: refusing to replace the cluster CA (--force replaces it)")]
    CaExists(PathBuf),
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a valid PEM {what}: {reason}")]
    BadPem { path: PathBuf, what: &'static str, reason: String },
    #[error("the certificate {0}")]
    BadCertificate(String),
    #[error("invalid certificate request: {0}")]
    BadRequest(String),
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("certificate {path} is not valid under CA {ca}: {reason}")]
    NotValid { path: PathBuf, ca: PathBuf, reason: String },
    #[error("key {key} does not belong to certificate {cert}: {reason}")]
    KeyMismatch { cert: PathBuf, key: PathBuf, reason: String },
    #[error("the private key does not belong to the certificate")]
    KeyDoesNotMatch,
    #[error("invalid join token: {0}")]
    BadToken(String),
    #[error("TLS set-up failed: {0}")]
    Tls(String),
}
