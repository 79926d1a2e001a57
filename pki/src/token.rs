//! Join tokens, Swarm-style: `OVTKN-1-<CA fingerprint>-<secret>`.
//!
//! The secret is an HMAC of a nonce under a key derived from the CA's private key, so:
//! * only a controller holding the CA key (`--tls-ca-key`) can print the current token
//!   again (`overlayctl cluster join-token`), and nothing secret is replicated: the
//!   replicated state keeps the nonce and the SHA-256 of the token, never the token;
//! * rotating is choosing a new nonce: the old token stops matching the stored hash;
//! * the CA fingerprint lets an agent tell at once that its `--tls-ca` is not the CA the
//!   token belongs to.

use ring::{digest, hmac};
use rustls_pki_types::CertificateDer;

use crate::PkiError;

const PREFIX: &str = "OVTKN-1-";
/// Hex digits of the CA fingerprint in a token.
const FINGERPRINT_HEX: usize = 16;
/// Hex digits of the secret (128 bits).
const SECRET_HEX: usize = 32;
/// Bytes of a nonce.
pub const NONCE_LEN: usize = 16;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The CA's fingerprint as tokens carry it.
pub fn ca_fingerprint(ca: &CertificateDer<'_>) -> String {
    let d = digest::digest(&digest::SHA256, ca.as_ref());
    hex(d.as_ref())[..FINGERPRINT_HEX].to_string()
}

/// The token for `nonce` under the CA whose certificate is `ca` and key is `ca_key_der`.
pub fn derive(ca: &CertificateDer<'_>, ca_key_der: &[u8], nonce: &[u8]) -> String {
    let key_material = digest::digest(
        &digest::SHA256,
        &[b"overlay join token key v1\0".as_slice(), ca_key_der].concat(),
    );
    let key = hmac::Key::new(hmac::HMAC_SHA256, key_material.as_ref());
    let tag = hmac::sign(&key, nonce);
    format!("{PREFIX}{}-{}", ca_fingerprint(ca), &hex(tag.as_ref())[..SECRET_HEX])
}

/// What the replicated state keeps of a token.
pub fn hash(token: &str) -> [u8; 32] {
    let d = digest::digest(&digest::SHA256, token.trim().as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Compares two hashes in time independent of where they differ.
pub fn hashes_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks a token's shape (so a typo is reported as such, before any network traffic)
/// and that it belongs to the CA `ca`.
pub fn check(token: &str, ca: &CertificateDer<'_>) -> Result<(), PkiError> {
    let bad = |why: &str| PkiError::BadToken(why.to_string());
    let rest = token
        .trim()
        .strip_prefix(PREFIX)
        .ok_or_else(|| bad(&format!("it does not start with {PREFIX}")))?;
    let (fingerprint, secret) =
        rest.split_once('-').ok_or_else(|| bad("expected OVTKN-1-<CA>-<SECRET>"))?;
    let is_hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !is_hex(fingerprint, FINGERPRINT_HEX) || !is_hex(secret, SECRET_HEX) {
        return Err(bad("expected OVTKN-1-<16 hex digits>-<32 hex digits>"));
    }
    if fingerprint != ca_fingerprint(ca) {
        return Err(bad(&format!(
            "it belongs to a CA with fingerprint {fingerprint}, but --tls-ca is {}",
            ca_fingerprint(ca)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Ca;

    #[test]
    fn derive_check_hash_rotate() -> Result<(), PkiError> {
        let ca = Ca::generate()?;
        let t1 = derive(ca.cert_der(), &ca.key_der(), &[1; NONCE_LEN]);
        assert_eq!(t1, derive(ca.cert_der(), &ca.key_der(), &[1; NONCE_LEN]), "deterministic");
        let t2 = derive(ca.cert_der(), &ca.key_der(), &[2; NONCE_LEN]);
        assert_ne!(t1, t2, "a new nonce rotates");
        assert_eq!(t1.len(), PREFIX.len() + FINGERPRINT_HEX + 1 + SECRET_HEX);
        check(&t1, ca.cert_der())?;
        assert!(hashes_equal(&hash(&t1), &hash(&format!(" {t1}\n"))));
        assert!(!hashes_equal(&hash(&t1), &hash(&t2)));

        let other = Ca::generate()?;
        let e = check(&t1, other.cert_der()).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("belongs to a CA with fingerprint"), "{e}");
        // Another CA's key gives another token for the same nonce.
        assert_ne!(t1, derive(ca.cert_der(), &other.key_der(), &[1; NONCE_LEN]));
        for bad in ["", "SWMTKN-1-abc", "OVTKN-1-xyz", "OVTKN-1-0123456789abcdef-short"] {
            assert!(check(bad, ca.cert_der()).is_err(), "{bad}");
        }
        Ok(())
    }
}
