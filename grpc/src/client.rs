//! The dialling side: [`Dialer`] makes tonic channels to controllers.
//!
//! tonic is given a connector of ours instead of its own TLS, so the TLS settings are
//! exactly the project's (TLS 1.3 only, the cluster CA as the only root, the server must
//! hold a `controller` certificate; see `overlay_pki::tls`), and a renewed client
//! certificate is used by every connection made after [`Dialer::set_tls`].

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::TlsConnector;
use tokio_util::either::Either;
use tonic::transport::{Channel, Endpoint, Uri};

/// The controller's default port, added to a URL that names none.
pub const DEFAULT_PORT: u16 = 7400;

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("invalid controller URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("{url} is plaintext, but the control plane speaks TLS: use https:// (or --insecure on every party to run without TLS)")]
    PlaintextRefused { url: String },
    #[error("{url} needs TLS, but --insecure was given: use http:// with --insecure, or drop --insecure and give the TLS files")]
    TlsWithoutCredentials { url: String },
}

/// How this process dials controllers: TLS with the project's settings, or plaintext
/// when (and only when) it runs with `--insecure`. Clones share the TLS settings.
#[derive(Clone)]
pub struct Dialer {
    tls: Option<Arc<RwLock<Arc<ClientConfig>>>>,
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.tls.is_some() { "Dialer(tls)" } else { "Dialer(insecure)" })
    }
}

impl Dialer {
    pub fn tls(config: Arc<ClientConfig>) -> Dialer {
        Dialer { tls: Some(Arc::new(RwLock::new(config))) }
    }

    pub fn insecure() -> Dialer {
        Dialer { tls: None }
    }

    pub fn is_insecure(&self) -> bool {
        self.tls.is_none()
    }

    /// Replaces the TLS settings (a renewed certificate) for every later connection.
    /// No effect on an insecure dialer.
    pub fn set_tls(&self, config: Arc<ClientConfig>) {
        if let Some(tls) = &self.tls {
            *tls.write().unwrap_or_else(|p| p.into_inner()) = config;
        }
    }

    fn current_tls(&self) -> Option<Arc<ClientConfig>> {
        self.tls.as_ref().map(|t| t.read().unwrap_or_else(|p| p.into_inner()).clone())
    }

    /// The scheme a URL without one gets.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// `url` completed (scheme, default port) and checked against this dialer's mode.
    pub fn normalize(&self, url: &str) -> Result<String, DialError> {
        let bad = |reason: &str| DialError::BadUrl { url: url.to_string(), reason: reason.into() };
        let full = if url.contains("://") {
            url.to_string()
        } else {
            format!("{}://{url}", self.scheme())
        };
        let uri: Uri = full.parse().map_err(|_| bad("expected https://IP:PORT"))?;
        let scheme = match uri.scheme_str() {
            Some(s @ ("http" | "https")) => s,
            _ => return Err(bad("the scheme must be https (or http with --insecure)")),
        };
        let authority = match uri.authority() {
            Some(a) if !a.host().is_empty() => a,
            _ => return Err(bad("no host")),
        };
        // Anything after the host must be a numeric port.
        if authority.as_str().len() > authority.host().len() && authority.port_u16().is_none() {
            return Err(bad("the port must be a number"));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(bad("a controller URL has no path"));
        }
        match (scheme, self.tls.is_some()) {
            ("http", true) => return Err(DialError::PlaintextRefused { url: url.to_string() }),
            ("https", false) => {
                return Err(DialError::TlsWithoutCredentials { url: url.to_string() })
            }
            _ => {}
        }
        Ok(match authority.port_u16() {
            Some(_) => format!("{scheme}://{authority}"),
            None => format!("{scheme}://{authority}:{DEFAULT_PORT}"),
        })
    }

    /// A tonic endpoint for `url` (normalised and checked); set timeouts on it, then
    /// [`connect`](Self::connect) or [`connect_lazy`](Self::connect_lazy).
    pub fn endpoint(&self, url: &str) -> Result<Endpoint, DialError> {
        let url = self.normalize(url)?;
        Endpoint::from_shared(url.clone())
            .map_err(|e| DialError::BadUrl { url, reason: e.to_string() })
    }

    pub async fn connect(&self, endpoint: Endpoint) -> Result<Channel, tonic::transport::Error> {
        endpoint.connect_with_connector(self.connector()).await
    }

    /// A channel that connects on first use (and reconnects after failures).
    pub fn connect_lazy(&self, endpoint: Endpoint) -> Channel {
        endpoint.connect_with_connector_lazy(self.connector())
    }

    fn connector(&self) -> Connector {
        Connector { dialer: self.clone() }
    }
}

/// What went wrong, in words a user can act on, when `err` (or one of its causes) is a
/// TLS failure; `None` for any other error.
pub fn tls_failure(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    use tokio_rustls::rustls::Error as Tls;
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(tls) = e.downcast_ref::<Tls>() {
            return Some(explain(&tls.to_string()));
        }
        if let Some(io) = e.downcast_ref::<io::Error>() {
            // h2 carries I/O errors on as kind and text only, so the rustls error may
            // survive only as its message.
            if let Some(inner) = io.get_ref() {
                if let Some(tls) = inner.downcast_ref::<Tls>() {
                    return Some(explain(&tls.to_string()));
                }
            }
            let text = io.to_string();
            return is_tls_text(&text).then(|| explain(&text));
        }
        next = e.source();
    }
    None
}

/// rustls' messages for failed handshakes start like these.
fn is_tls_text(text: &str) -> bool {
    ["received fatal alert", "invalid peer certificate", "peer is incompatible", "peer misbehaved"]
        .iter()
        .any(|p| text.starts_with(p))
        || text.contains("certificate is not a controller certificate")
}

/// A rustls error message in words a user can act on.
fn explain(text: &str) -> String {
    const CLIENT_REFUSED: [&str; 7] = [
        "UnknownCA",
        "BadCertificate",
        "CertificateRequired",
        "CertificateExpired",
        "CertificateRevoked",
        "CertificateUnknown",
        "DecryptError",
    ];
    if let Some(alert) = text.strip_prefix("received fatal alert: ") {
        if CLIENT_REFUSED.contains(&alert.trim()) {
            return format!(
                "the controller refused this client's certificate ({alert}): is --tls-cert issued by the cluster CA, and still valid?"
            );
        }
    }
    if let Some(why) = text.strip_prefix("invalid peer certificate: ") {
        return format!(
            "the controller's certificate is not trusted ({why}): is --tls-ca the cluster CA?"
        );
    }
    if text.contains("InvalidContentType") || text.contains("corrupt message") {
        return "the controller does not speak TLS (is it running with --insecure?)".to_string();
    }
    text.to_string()
}

/// tonic's connector: TCP, then TLS unless insecure.
#[derive(Clone)]
struct Connector {
    dialer: Dialer,
}

type Io = TokioIo<Either<TcpStream, TlsStream<TcpStream>>>;

impl tower_service::Service<Uri> for Connector {
    type Response = Io;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Io>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = self.dialer.current_tls();
        Box::pin(async move {
            let host = uri.host().unwrap_or_default().trim_matches(['[', ']']).to_string();
            let port = uri.port_u16().unwrap_or(DEFAULT_PORT);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            let _ = tcp.set_nodelay(true);
            let Some(tls) = tls else { return Ok(TokioIo::new(Either::Left(tcp))) };
            // The name is only what the handshake carries: servers are checked by role
            // (overlay_pki::tls), not by the name they were dialled by.
            let name = ServerName::try_from(host.clone()).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidInput, format!("bad host {host:?}"))
            })?;
            let stream = TlsConnector::from(tls).connect(name, tcp).await?;
            Ok(TokioIo::new(Either::Right(stream)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_failures_are_explained_even_as_text() {
        let alert =
            io::Error::new(io::ErrorKind::InvalidData, "received fatal alert: DecryptError");
        let why = tls_failure(&alert).unwrap_or_default();
        assert!(why.starts_with("the controller refused this client's certificate"), "{why}");
        let untrusted = io::Error::new(
            io::ErrorKind::InvalidData,
            tokio_rustls::rustls::Error::InvalidCertificate(
                tokio_rustls::rustls::CertificateError::UnknownIssuer,
            ),
        );
        let why = tls_failure(&untrusted).unwrap_or_default();
        assert!(why.starts_with("the controller's certificate is not trusted"), "{why}");
        let refused = io::Error::new(io::ErrorKind::ConnectionRefused, "connection refused");
        assert_eq!(tls_failure(&refused), None);
    }

    fn secure() -> Dialer {
        let config = ClientConfig::builder_with_provider(overlay_pki::tls::provider())
            .with_safe_default_protocol_versions()
            .map(|b| b.with_root_certificates(tokio_rustls::rustls::RootCertStore::empty()))
            .map(|b| b.with_no_client_auth());
        match config {
            Ok(c) => Dialer::tls(Arc::new(c)),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn urls_are_completed_and_checked_against_the_mode() {
        let tls = secure();
        assert_eq!(tls.normalize("10.0.0.1").ok().as_deref(), Some("https://10.0.0.1:7400"));
        assert_eq!(tls.normalize("https://h:1").ok().as_deref(), Some("https://h:1"));
        let e = tls.normalize("http://10.0.0.1:7400").err().map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.starts_with("http://10.0.0.1:7400 is plaintext")));
        let plain = Dialer::insecure();
        assert_eq!(plain.normalize("10.0.0.1:9").ok().as_deref(), Some("http://10.0.0.1:9"));
        let e = plain.normalize("https://10.0.0.1").err().map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("--insecure was given")));
        for bad in ["ftp://x", "https://", "https://h/path", "https://h:notaport"] {
            assert!(tls.normalize(bad).is_err(), "{bad}");
        }
    }
}
