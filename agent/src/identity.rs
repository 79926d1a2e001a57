//! Who this agent is to the controllers, and how it stays so.
//!
//! * With `--tls-cert/--tls-key` the operator manages the certificate; the agent only
//!   checks it (an `agent` certificate for this host, under `--tls-ca`) and warns as its
//!   end nears.
//! * With `--join-token` the agent manages it: it makes its own key, asks a controller
//!   holding the CA key to sign a certificate for it ([`join`]), keeps both in one file,
//!   `DATA_DIR/tls/agent.pem` (0600; one file, replaced atomically, so a reader never
//!   pairs a new key with an old certificate), and renews them when a third of the
//!   lifetime is left ([`renew_forever`]), so it never needs help again.
//! * With `--insecure` there is no identity: plaintext, and no encrypted networks.
//!
//! The resulting [`Controllers`] is what every control-plane call dials with.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use overlay_grpc::Dialer;
use overlay_pki::{load_ca, new_key_and_request, token, write_file, CertInfo, Identity, Role};
use overlay_proto::pb;
use overlay_proto::pb::overlay_client::OverlayClient;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::agent::TlsFiles;

/// How the agent authenticates to the controllers, from its flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Security {
    /// `--insecure`: plaintext, unauthenticated.
    Insecure,
    /// `--tls-ca --tls-cert --tls-key`: a certificate the operator issued.
    Files(TlsFiles),
    /// `--tls-ca --join-token`: the agent gets (and renews) its own certificate.
    JoinToken { ca: PathBuf, token: String },
}

/// The controllers and how to dial them.
#[derive(Debug, Clone)]
pub struct Controllers {
    pub urls: Vec<String>,
    pub dialer: Dialer,
}

/// How long a control-plane call may take.
const RPC_TIMEOUT: Duration = Duration::from_secs(5);

impl Controllers {
    /// A client of `url`, connected now.
    pub async fn connect(
        &self,
        url: &str,
    ) -> Result<OverlayClient<tonic::transport::Channel>, String> {
        let endpoint = self
            .dialer
            .endpoint(url)
            .map_err(|e| e.to_string())?
            .connect_timeout(RPC_TIMEOUT)
            // A ping every 2 s finds a silent controller; 10 s to answer, because a
            // loaded one answers late, and cutting a stream mid-snapshot starts the
            // snapshot over (1,000 agents syncing at once broke ~1,700 streams with 3 s).
            .http2_keep_alive_interval(Duration::from_secs(2))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        let channel = self.dialer.connect(endpoint).await.map_err(|e| {
            overlay_grpc::client::tls_failure(&e)
                .unwrap_or_else(|| format!("connecting to {url}: {}", root_cause(&e)))
        })?;
        Ok(OverlayClient::new(channel))
    }
}

pub(crate) fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut e = err;
    while let Some(next) = e.source() {
        e = next;
    }
    e.to_string()
}

/// Where a joined agent keeps its certificate and key: one file holding both.
pub fn joined_files(data_dir: &Path, ca: &Path) -> TlsFiles {
    let both = data_dir.join("tls").join("agent.pem");
    TlsFiles { ca: ca.to_path_buf(), cert: both.clone(), key: both }
}

/// Sets up the agent's identity: checks given files, or joins with the token when the
/// data dir holds no usable certificate yet. Returns how to dial the controllers and the
/// files the encrypted data plane uses (none with `--insecure`).
pub async fn establish(
    security: &Security,
    host: &str,
    underlay_ip: Ipv4Addr,
    urls: &[String],
    data_dir: &Path,
) -> Result<(Dialer, Option<TlsFiles>)> {
    match security {
        Security::Insecure => {
            warn!("--insecure: talking to the controllers in PLAINTEXT, unauthenticated; no encrypted networks on this host");
            Ok((Dialer::insecure(), None))
        }
        Security::Files(files) => {
            let identity = load(files, host)?;
            warn_if_expiring(&identity.info, &files.cert);
            Ok((dialer_for(&identity)?, Some(files.clone())))
        }
        Security::JoinToken { ca, token } => {
            let files = joined_files(data_dir, ca);
            match load(&files, host) {
                Ok(identity) if !expired(&identity.info) => {
                    info!(cert = %files.cert.display(), "using the certificate this agent joined with");
                    return Ok((dialer_for(&identity)?, Some(files)));
                }
                Ok(_) => info!("the certificate this agent joined with has expired; joining again"),
                Err(_) if !files.cert.exists() => {}
                Err(e) => warn!("cannot use {}: {e:#}; joining again", files.cert.display()),
            }
            let identity = join(&files, token, host, underlay_ip, urls).await?;
            Ok((dialer_for(&identity)?, Some(files)))
        }
    }
}

fn load(files: &TlsFiles, host: &str) -> Result<Identity> {
    Identity::load_for(&files.ca, &files.cert, &files.key, host, Role::Agent)
        .with_context(|| format!("the agent certificate for host {host}"))
}

fn dialer_for(identity: &Identity) -> Result<Dialer> {
    Ok(Dialer::tls(overlay_pki::tls::client_config(&identity.ca, Some(identity))?))
}

fn expired(info: &CertInfo) -> bool {
    info.remaining(SystemTime::now()) < Duration::from_secs(30)
}

fn warn_if_expiring(info: &CertInfo, path: &Path) {
    let left = info.remaining(SystemTime::now());
    if left < info.lifetime() / 3 {
        warn!(
            cert = %path.display(),
            days_left = left.as_secs() / 86_400,
            "the agent certificate expires soon and is managed by hand: issue a new one (or join with a token to have it renewed automatically)"
        );
    }
}

/// Asks the controllers in turn for a certificate, with the join token. A refused token
/// is final (it will not get better by asking again); unreachable controllers are
/// retried with backoff.
async fn join(
    files: &TlsFiles,
    token: &str,
    host: &str,
    underlay_ip: Ipv4Addr,
    urls: &[String],
) -> Result<Identity> {
    let ca = load_ca(&files.ca).context("--tls-ca")?;
    token::check(token, &ca).context("--join-token")?;
    let anonymous = Controllers {
        urls: urls.to_vec(),
        dialer: Dialer::tls(overlay_pki::tls::client_config(&ca, None)?),
    };
    let (key_pem, csr) = new_key_and_request(host)?;
    let request = pb::JoinRequest {
        token: token.trim().to_string(),
        host: host.to_string(),
        underlay_ip: underlay_ip.to_string(),
        csr,
    };
    let response = ask_in_turn(&anonymous, "join", |mut client| {
        let request = request.clone();
        async move { client.join(request).await }
    })
    .await?;
    save(files, &key_pem, &response.certificate)?;
    let identity = load(files, host)?;
    info!(cert = %files.cert.display(), not_after = ?identity.info.not_after, "joined: got an agent certificate");
    Ok(identity)
}

/// Writes the certificate and its key into the one file of [`joined_files`], atomically.
fn save(files: &TlsFiles, key_pem: &str, cert_pem: &str) -> Result<()> {
    if let Some(dir) = files.cert.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    write_file(&files.cert, &format!("{cert_pem}{key_pem}"), 0o600)?;
    Ok(())
}

/// Calls `f` on each controller in turn until one answers; retries the round with
/// backoff while none does. A refusal (anything but "unavailable") ends it.
async fn ask_in_turn<T, F, Fut>(controllers: &Controllers, what: &str, mut f: F) -> Result<T>
where
    F: FnMut(OverlayClient<tonic::transport::Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let mut backoff =
        crate::backoff::Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
    loop {
        for url in &controllers.urls {
            let client = match controllers.connect(url).await {
                Ok(c) => c,
                Err(e) => {
                    warn!(controller = %url, "{what}: {e}");
                    continue;
                }
            };
            match tokio::time::timeout(RPC_TIMEOUT, f(client)).await {
                Ok(Ok(response)) => return Ok(response.into_inner()),
                Ok(Err(status)) if status.code() == tonic::Code::Unavailable => {
                    warn!(controller = %url, "{what}: {}", status.message());
                }
                Ok(Err(status)) => bail!("{what} refused by {url}: {}", status.message()),
                Err(_) => warn!(controller = %url, "{what}: no answer within {RPC_TIMEOUT:?}"),
            }
        }
        backoff.wait().await;
    }
}

/// When to renew: once a third of the lifetime is left.
pub fn renew_in(info: &CertInfo, now: SystemTime) -> Duration {
    info.remaining(now).saturating_sub(info.lifetime() / 3)
}

/// Renews a joined agent's certificate for ever: at [`renew_in`], with a fresh key,
/// authenticated by the certificate being renewed. Every later connection uses the new
/// one; `renewed` is bumped so the encrypted data plane picks it up too.
pub async fn renew_forever(
    files: TlsFiles,
    host: String,
    controllers: Controllers,
    renewed: watch::Sender<u64>,
) {
    loop {
        let identity = match load(&files, &host) {
            Ok(i) => i,
            Err(e) => {
                warn!("certificate renewal: {e:#}");
                tokio::time::sleep(Duration::from_secs(60)).await;
                continue;
            }
        };
        tokio::time::sleep(renew_in(&identity.info, SystemTime::now())).await;
        match renew(&files, &host, &controllers).await {
            Ok(info) => {
                info!(not_after = ?info.not_after, "renewed the agent certificate");
                renewed.send_modify(|n| *n += 1);
            }
            Err(e) => {
                // Try again well before it expires; never faster than every few seconds.
                let left = identity.info.remaining(SystemTime::now());
                let wait = (left / 10).clamp(Duration::from_secs(2), Duration::from_secs(300));
                warn!(retry_in = ?wait, "renewing the agent certificate failed: {e:#}");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

async fn renew(files: &TlsFiles, host: &str, controllers: &Controllers) -> Result<CertInfo> {
    let (key_pem, csr) = new_key_and_request(host)?;
    let response = ask_in_turn(controllers, "renew", |mut client| {
        let request = pb::RenewRequest { csr: csr.clone() };
        async move { client.renew_certificate(request).await }
    })
    .await?;
    save(files, &key_pem, &response.certificate)?;
    let identity = load(files, host)?;
    controllers.dialer.set_tls(overlay_pki::tls::client_config(&identity.ca, Some(&identity))?);
    Ok(identity.info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_when_a_third_is_left() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let info = CertInfo {
            name: "h1".into(),
            role: Some(Role::Agent),
            ips: vec![],
            not_before: start,
            not_after: start + Duration::from_secs(90),
        };
        assert_eq!(renew_in(&info, start), Duration::from_secs(60));
        assert_eq!(renew_in(&info, start + Duration::from_secs(59)), Duration::from_secs(1));
        assert_eq!(renew_in(&info, start + Duration::from_secs(75)), Duration::ZERO);
        assert_eq!(renew_in(&info, start + Duration::from_secs(500)), Duration::ZERO);
    }
}
