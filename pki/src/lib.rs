//! The cluster PKI, shared by `overlayctl`, the controller, the agent and the encrypted
//! data plane: one CA per cluster ([`Ca`]), certificates that name one party and carry
//! its [`Role`] ([`cert`]), credentials loaded and checked ([`Identity`]), the TLS 1.3
//! settings of every control-plane connection ([`tls`]) and join tokens ([`token`]).
//!
//! It never decides what a role may do (the controller does), and never writes a private
//! key anyone but its owner can read.

pub mod cert;
mod error;
mod files;
mod identity;
mod role;
pub mod tls;
pub mod token;

pub use cert::{
    cert_files, new_key_and_request, validate_cert_name, verify_cert_for, verify_chain, Ca,
    CertInfo, Issued, Subject, CA_CERT_FILE, CA_KEY_FILE, DEFAULT_LIFETIME,
};
pub use error::PkiError;
pub use files::write_file;
pub use identity::{load_ca, Identity};
pub use role::Role;
/// The TLS library every overlay connection uses, for callers' type names.
pub use rustls;
pub use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// `N` bytes from the system's secure random source.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], PkiError> {
    use ring::rand::SecureRandom;
    let mut out = [0u8; N];
    ring::rand::SystemRandom::new()
        .fill(&mut out)
        .map_err(|_| PkiError::Tls("the system's random number generator failed".into()))?;
    Ok(out)
}
