//! The accepting side. [`incoming`] turns a bound listener into the stream of connections
//! tonic serves; with TLS, each handshake runs in its own task (bounded in time and
//! number), so a slow or silent client never holds up the others.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use overlay_pki::CertInfo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::either::Either;
use tonic::transport::server::Connected;
use tracing::{debug, warn};

/// A handshake that takes longer than this is abandoned.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; more connections wait in the kernel's backlog.
const MAX_HANDSHAKES: usize = 1024;

/// Who is calling, as the connection proves it. Attached to every request (tonic request
/// extensions) of the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The server runs with `--insecure`: nobody is authenticated and everything is allowed.
    Insecure { remote: Option<SocketAddr> },
    /// TLS without a client certificate (an agent about to join with a token).
    Anonymous { remote: Option<SocketAddr> },
    /// TLS with a client certificate that chains to the cluster CA.
    Certified { remote: Option<SocketAddr>, cert: Arc<CertInfo> },
}

impl Caller {
    pub fn remote(&self) -> Option<SocketAddr> {
        match self {
            Caller::Insecure { remote }
            | Caller::Anonymous { remote }
            | Caller::Certified { remote, .. } => *remote,
        }
    }

    /// The caller of a tonic request; `Anonymous` if the request came some other way.
    pub fn of<T>(request: &tonic::Request<T>) -> Caller {
        request.extensions().get::<Caller>().cloned().unwrap_or(Caller::Anonymous { remote: None })
    }
}

/// One accepted connection, plaintext or TLS, with who is calling.
pub struct Conn {
    io: Either<TcpStream, Box<TlsStream<TcpStream>>>,
    caller: Caller,
}

impl Connected for Conn {
    type ConnectInfo = Caller;
    fn connect_info(&self) -> Caller {
        self.caller.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Closes a connection whose handshake failed so that the alert rustls wrote reaches
/// the client: closing a socket with unread input (with TLS 1.3 the client may already
/// have sent its first request) would reset the connection and lose the alert, and the
/// client would see "connection reset" instead of why it was refused.
async fn close_gently(mut tcp: TcpStream) {
    use tokio::io::AsyncWriteExt;
    let _ = tcp.shutdown().await;
    let drain = async {
        let mut sink = tokio::io::sink();
        let _ = tokio::io::copy(&mut tcp, &mut sink).await;
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

/// The connections accepted on `listener`: TLS with `tls`, plaintext without. The accept
/// loop ends when the returned stream is dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
) -> ReceiverStream<Result<Conn, io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(accept_loop(listener, tls.map(TlsAcceptor::from), tx));
    ReceiverStream::new(rx)
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    tx: mpsc::Sender<Result<Conn, io::Error>>,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let (tcp, remote) = tokio::select! {
            _ = tx.closed() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let Some(acceptor) = acceptor.clone() else {
            let caller = Caller::Insecure { remote: Some(remote) };
            if tx.send(Ok(Conn { io: Either::Left(tcp), caller })).await.is_err() {
                return;
            }
            continue;
        };
        let permit = match handshakes.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => return,
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp).into_fallible())
                .await
            {
                Ok(Ok(stream)) => {
                    let certs = stream.get_ref().1.peer_certificates();
                    let caller = match overlay_pki::tls::peer_info(certs) {
                        Some(cert) => {
                            Caller::Certified { remote: Some(remote), cert: Arc::new(cert) }
                        }
                        None => Caller::Anonymous { remote: Some(remote) },
                    };
                    let _ = tx.send(Ok(Conn { io: Either::Right(Box::new(stream)), caller })).await;
                }
                // Plaintext clients, foreign certificates and scanners end here; the
                // client sees the failure itself, so this is not worth more than debug.
                Ok(Err((e, tcp))) => {
                    debug!(%remote, error = %e, "TLS handshake failed");
                    close_gently(tcp).await;
                }
                Err(_) => debug!(%remote, "TLS handshake timed out"),
            }
        });
    }
}
