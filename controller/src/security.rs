//! The member's TLS material, loaded and checked once at start: the server settings it
//! accepts connections with, the dialer it reaches other members with (its own
//! `controller` certificate as client certificate), and — when it was given the CA key —
//! the [`Signer`] that turns join tokens and renewals into agent certificates.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use overlay_grpc::{Caller, Dialer};
use overlay_pki::{Ca, Identity, Role, Subject};
use tracing::{info, warn};

use crate::config::Security;

/// What `run` wires in.
pub struct Loaded {
    /// `None` with `--insecure`.
    pub server: Option<Arc<overlay_pki::rustls::ServerConfig>>,
    pub dialer: Dialer,
    pub signer: Option<Signer>,
    /// When this member's certificate expires (for the metrics); `None` with `--insecure`.
    pub cert_not_after: Option<std::time::SystemTime>,
}

pub fn load(security: &Security, listen: std::net::SocketAddr) -> anyhow::Result<Loaded> {
    let (ca, cert, key, ca_key, lifetime) = match security {
        Security::Insecure => {
            warn!(
                %listen,
                "--insecure: the control plane is PLAINTEXT and UNAUTHENTICATED; anyone who can reach {listen} can read and change the whole network"
            );
            return Ok(Loaded {
                server: None,
                dialer: Dialer::insecure(),
                signer: None,
                cert_not_after: None,
            });
        }
        Security::Tls { ca, cert, key, ca_key, agent_cert_lifetime } => {
            (ca, cert, key, ca_key, *agent_cert_lifetime)
        }
    };
    let identity = Identity::load(ca, cert, key).context("--tls-cert")?;
    if identity.info.role != Some(Role::Controller) {
        bail!(
            "--tls-cert {} is not a controller certificate (it is {}): issue one with overlayctl cert issue NAME --role controller",
            cert.display(),
            identity.info.role.map_or("without a role".to_string(), |r| format!("a {r} certificate"))
        );
    }
    let server = overlay_pki::tls::server_config(&identity)?;
    let dialer = Dialer::tls(overlay_pki::tls::client_config(&identity.ca, Some(&identity))?);
    let signer = match ca_key {
        None => None,
        Some(ca_key) => {
            let signing = Ca::load_files(ca, ca_key).context("--tls-ca-key")?;
            if signing.cert_der() != &identity.ca {
                bail!("--tls-ca-key belongs to another CA than --tls-ca {}", ca.display());
            }
            info!(lifetime = ?lifetime, "this member signs agent certificates for join tokens");
            Some(Signer { ca: signing, lifetime })
        }
    };
    let cert_not_after = Some(identity.info.not_after);
    Ok(Loaded { server: Some(server), dialer, signer, cert_not_after })
}

/// Signs agent certificates (only on members given `--tls-ca-key`).
pub struct Signer {
    ca: Ca,
    lifetime: Duration,
}

impl Signer {
    /// An `agent` certificate for `host`, naming `ips`, over the key of `csr_der`.
    pub fn sign_agent(
        &self,
        csr_der: &[u8],
        host: &str,
        ips: Vec<IpAddr>,
    ) -> Result<String, overlay_pki::PkiError> {
        let subject = Subject::new(host, Role::Agent).with_ips(ips).with_lifetime(self.lifetime);
        self.ca.sign_request(csr_der, &subject)
    }

    pub fn ca(&self) -> &Ca {
        &self.ca
    }
}

/// How many watch streams one identity may hold open at once: an agent needs one (two
/// while it reconnects); more is a bug or an attack.
pub const MAX_WATCHES_PER_CLIENT: usize = 8;

/// Counts open watch streams per certificate name.
#[derive(Default)]
pub struct WatchLimits {
    open: Mutex<HashMap<String, usize>>,
}

/// Held for the life of one watch stream.
pub struct WatchSlot {
    limits: Arc<WatchLimits>,
    key: Option<String>,
}

impl WatchLimits {
    /// A slot for `caller`, or why not. Insecure callers have no identity to count by.
    pub fn acquire(self: &Arc<Self>, caller: &Caller) -> Result<WatchSlot, String> {
        let Caller::Certified { cert, .. } = caller else {
            return Ok(WatchSlot { limits: self.clone(), key: None });
        };
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(cert.name.clone()).or_insert(0);
        if *count >= MAX_WATCHES_PER_CLIENT {
            return Err(format!(
                "{:?} already has {count} watch streams open (at most {MAX_WATCHES_PER_CLIENT})",
                cert.name
            ));
        }
        *count += 1;
        Ok(WatchSlot { limits: self.clone(), key: Some(cert.name.clone()) })
    }
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let Some(key) = &self.key else { return };
        let mut open = self.limits.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.get_mut(key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use overlay_pki::CertInfo;

    use super::*;

    #[test]
    fn watch_slots_are_counted_per_name_and_released() {
        let limits = Arc::new(WatchLimits::default());
        let caller = Caller::Certified {
            remote: None,
            cert: Arc::new(CertInfo {
                name: "h1".into(),
                role: Some(Role::Agent),
                ips: vec![],
                not_before: SystemTime::UNIX_EPOCH,
                not_after: SystemTime::UNIX_EPOCH,
            }),
        };
        let mut held = Vec::new();
        for _ in 0..MAX_WATCHES_PER_CLIENT {
            held.push(limits.acquire(&caller).ok());
        }
        let refused = limits.acquire(&caller).err().unwrap_or_default();
        assert!(refused.contains("already has 8 watch streams open"), "{refused}");
        held.pop();
        assert!(limits.acquire(&caller).is_ok());
        let insecure = Caller::Insecure { remote: None };
        let many: Vec<_> = (0..100).map(|_| limits.acquire(&insecure)).collect();
        assert!(many.iter().all(Result::is_ok));
    }
}
