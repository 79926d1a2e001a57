//! Reaching the controller cluster: which URLs to try, and one generic call helper that
//! fails over between them. Every command goes through [`Controllers::call`], so the
//! retry rules live here and nowhere else:
//!
//! * A URL that refuses the connection (or cannot be connected to within the connect
//!   timeout) never saw the request: try the next one, for reads and writes alike.
//! * A member that answers `Unavailable`, drops the call, or says nothing in time might
//!   have seen it. A read moves on to the next member (and goes round the list again,
//!   with a short pause, until the overall deadline). A write stops with
//!   [`Error::OutcomeUnknown`]: retrying could apply it twice, so the user must look.
//! * Any other answer, success or error, is the answer.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::time::Duration;

use overlay_grpc::Dialer;
use overlay_proto::pb::overlay_client::OverlayClient;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::args::DEFAULT_CONTROLLER;
/// Lists can be large; the generated client's 4 MiB default is too tight for them.
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// Timing of one [`Controllers::call`].
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Per URL, to establish the connection.
    pub connect_timeout: Duration,
    /// Per URL, for a read to answer before the next member is asked.
    pub read_timeout: Duration,
    /// For the whole call, over every URL and round.
    pub deadline: Duration,
    /// Pause between rounds of reads when members answered but were unavailable.
    pub backoff: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            connect_timeout: Duration::from_secs(2),
            read_timeout: Duration::from_secs(5),
            deadline: Duration::from_secs(15),
            backoff: Duration::from_millis(300),
        }
    }
}

/// Whether a call may be repeated on another member once a member may have seen it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Read,
    Write,
}

#[derive(Debug)]
pub enum Error {
    /// A `--controller` / `$OVERLAY_CONTROLLER` entry that is not a usable URL.
    BadUrl { url: String, reason: String },
    /// The controller's answer: its message already names the bad value.
    Status(Status),
    /// No member gave an answer; the last reason per URL tried.
    Unreachable(Vec<(String, String)>),
    /// A write reached `url` but its result is not known.
    OutcomeUnknown { url: String, reason: String },
    /// The TLS handshake with `url` failed: every member would refuse the same way.
    Tls { url: String, reason: String },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::BadUrl { url, reason } => write!(f, "invalid controller URL {url:?}: {reason}"),
            Error::Status(status) if status.message().is_empty() => {
                write!(f, "controller answered: {}", status.code().description())
            }
            Error::Status(status) => f.write_str(status.message()),
            Error::Unreachable(reasons) => {
                let list: Vec<String> = reasons.iter().map(|(url, why)| format!("{url}: {why}")).collect();
                write!(f, "cannot reach any controller ({})", list.join("; "))
            }
            Error::Tls { url, reason } => write!(f, "TLS with {url} failed: {reason}"),
            Error::OutcomeUnknown { url, reason } => write!(
                f,
                "outcome unknown: the request reached {url} but {reason}; it may or may not have been \
                 applied, check before retrying"
            ),
        }
    }
}

impl StdError for Error {}

/// The controller URLs to try, in order: `--controller`, else `$OVERLAY_CONTROLLER`, else
/// the default. Each gets `https://` (`http://` with `--insecure`) if it has no scheme
/// and `:7400` if it has no port; a scheme that does not match the mode is refused.
pub fn resolve_urls(
    flag: Option<&str>,
    env: Option<&str>,
    dialer: &Dialer,
) -> Result<Vec<String>, Error> {
    let raw = match (flag, env) {
        (Some(flag), _) => flag,
        (None, Some(env)) if !env.trim().is_empty() => env,
        _ => DEFAULT_CONTROLLER,
    };
    let urls = raw
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|url| dialer.normalize(url).map_err(|e| bad_url(url, e)))
        .collect::<Result<Vec<_>, _>>()?;
    if urls.is_empty() {
        return Err(Error::BadUrl { url: raw.to_string(), reason: "no URL given".into() });
    }
    Ok(urls)
}

fn bad_url(url: &str, e: overlay_grpc::DialError) -> Error {
    match e {
        overlay_grpc::DialError::BadUrl { reason, .. } => {
            Error::BadUrl { url: url.to_string(), reason }
        }
        other => Error::BadUrl { url: url.to_string(), reason: other.to_string() },
    }
}

/// The controller members to call, in order.
#[derive(Debug, Clone)]
pub struct Controllers {
    urls: Vec<String>,
    policy: Policy,
    dialer: Dialer,
}

/// How one attempt on one member ended, when it did not end with an answer.
enum Miss {
    /// The request never left: safe to send elsewhere.
    NotSent(String),
    /// The member may have seen the request.
    Unanswered(String),
    /// The TLS handshake failed (so the request was not processed); others would fail alike.
    Tls(String),
}

impl Controllers {
    pub fn new(urls: Vec<String>, policy: Policy, dialer: Dialer) -> Controllers {
        Controllers { urls, policy, dialer }
    }

    /// Calls `f` on the first member that answers, per the rules at the top of this file.
    /// `f` builds one attempt; it is called again for every member tried.
    pub async fn call<T, F, Fut>(&self, call: Call, mut f: F) -> Result<T, Error>
    where
        F: FnMut(OverlayClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let policy = self.policy;
        let deadline = tokio::time::Instant::now() + policy.deadline;
        let mut last: Vec<Option<String>> = vec![None; self.urls.len()];
        loop {
            let mut unanswered = false;
            for (i, url) in self.urls.iter().enumerate() {
                let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
                if remaining.is_zero() {
                    break;
                }
                let miss = match connect(&self.dialer, url, policy.connect_timeout.min(remaining))
                    .await
                {
                    Err(miss) => miss,
                    Ok(channel) => {
                        let client =
                            OverlayClient::new(channel).max_decoding_message_size(MAX_MESSAGE);
                        let limit = match call {
                            Call::Read => policy.read_timeout.min(remaining),
                            Call::Write => remaining,
                        };
                        match tokio::time::timeout(limit, f(client)).await {
                            Ok(Ok(response)) => return Ok(response.into_inner()),
                            Ok(Err(status)) => match classify(&status, self.dialer.is_insecure()) {
                                Some(miss) => miss,
                                None => return Err(Error::Status(status)),
                            },
                            Err(_) => {
                                Miss::Unanswered(format!("got no answer within {}", seconds(limit)))
                            }
                        }
                    }
                };
                match miss {
                    Miss::Tls(reason) => return Err(Error::Tls { url: url.clone(), reason }),
                    Miss::NotSent(reason) => last[i] = Some(reason),
                    Miss::Unanswered(reason) if call == Call::Write => {
                        return Err(Error::OutcomeUnknown { url: url.clone(), reason });
                    }
                    Miss::Unanswered(reason) => {
                        unanswered = true;
                        last[i] = Some(reason);
                    }
                }
            }
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            if !unanswered || remaining <= policy.backoff {
                break;
            }
            tokio::time::sleep(policy.backoff).await;
        }
        let reasons =
            self.urls.iter().zip(last).filter_map(|(url, why)| Some((url.clone(), why?))).collect();
        Err(Error::Unreachable(reasons))
    }
}

async fn connect(dialer: &Dialer, url: &str, timeout: Duration) -> Result<Channel, Miss> {
    let endpoint = dialer
        .endpoint(url)
        .map_err(|e| Miss::NotSent(e.to_string()))?
        .connect_timeout(timeout)
        .tcp_nodelay(true);
    match tokio::time::timeout(timeout, dialer.connect(endpoint)).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(e)) => Err(match overlay_grpc::client::tls_failure(&e) {
            Some(reason) => Miss::Tls(reason),
            None => Miss::NotSent(root_cause(&e)),
        }),
        Err(_) => Err(Miss::NotSent(format!("no connection within {}", seconds(timeout)))),
    }
}

/// `None` for a real answer from a member; otherwise why there was none.
fn classify(status: &Status, insecure: bool) -> Option<Miss> {
    // A plaintext HTTP/2 client reads a TLS server's alert record as a frame header
    // with an impossible length; the server never saw a request.
    if insecure
        && status.source().is_some_and(|e| root_cause(e).contains("frame with invalid size"))
    {
        return Some(Miss::Tls(
            "the controller speaks TLS, but --insecure was given: use https:// URLs with --tls-ca, --tls-cert and --tls-key".into(),
        ));
    }
    // With TLS 1.3 a server refuses a client certificate only after the client's side of
    // the handshake is done, so the refusal arrives as the first call's failure; the
    // server never processed the request.
    if let Some(reason) = overlay_grpc::client::tls_failure(status) {
        return Some(Miss::Tls(reason));
    }
    if refused(status) {
        return Some(Miss::NotSent("connection refused".into()));
    }
    // The generated client's wording when the channel could not get ready: not sent.
    if status.code() == Code::Unknown && status.message().starts_with("Service was not ready") {
        return Some(Miss::NotSent(status.message().to_string()));
    }
    // A status with a source was made on this side from a transport failure mid-call.
    if status.source().is_some() {
        let cause = status.source().map(root_cause).unwrap_or_default();
        return Some(Miss::Unanswered(format!("the call failed: {cause}")));
    }
    // A member that cannot take part (its disk is full) refuses every call before doing
    // anything: the next member is asked, for writes too.
    if status.code() == Code::Unavailable && status.message().contains(NOT_SERVING) {
        return Some(Miss::NotSent(status.message().to_string()));
    }
    if status.code() == Code::Unavailable {
        return Some(Miss::Unanswered(format!("it answered unavailable: {}", status.message())));
    }
    None
}

/// What a controller that refuses every call (it cannot write its raft log) says; the
/// controller's `NOT_SERVING` has the same words.
pub const NOT_SERVING: &str = "is not serving";

fn refused(err: &(dyn StdError + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return io.kind() == std::io::ErrorKind::ConnectionRefused;
        }
        next = e.source();
    }
    false
}

/// The innermost cause of an error, in the words a user expects.
fn root_cause(err: &(dyn StdError + 'static)) -> String {
    let mut next: Option<&(dyn StdError + 'static)> = Some(err);
    let mut innermost = err.to_string();
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::ConnectionRefused => "connection refused".into(),
                std::io::ErrorKind::TimedOut => "connection timed out".into(),
                _ => io.to_string(),
            };
        }
        innermost = e.to_string();
        next = e.source();
    }
    innermost
}

fn seconds(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use overlay_proto::pb;

    use super::*;
    use crate::fake::{self, Behaviour};

    fn urls(flag: Option<&str>, env: Option<&str>) -> Vec<String> {
        match resolve_urls(flag, env, &Dialer::insecure()) {
            Ok(urls) => urls,
            Err(e) => panic!("{flag:?} {env:?}: {e}"),
        }
    }

    fn bad_url(flag: &str) -> String {
        match resolve_urls(Some(flag), None, &Dialer::insecure()) {
            Ok(urls) => panic!("{flag:?} resolved to {urls:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn urls_default_then_env_then_flag() {
        assert_eq!(urls(None, None), ["http://127.0.0.1:7400"]);
        assert_eq!(urls(None, Some("")), ["http://127.0.0.1:7400"]);
        assert_eq!(urls(None, Some("10.0.0.1:7400")), ["http://10.0.0.1:7400"]);
        assert_eq!(urls(Some("10.0.0.2:9000"), Some("10.0.0.1:7400")), ["http://10.0.0.2:9000"]);
    }

    fn tls_dialer() -> Dialer {
        let ca = overlay_pki::Ca::generate().expect("CA");
        Dialer::tls(overlay_pki::tls::client_config(ca.cert_der(), None).expect("TLS config"))
    }

    #[test]
    fn urls_are_split_and_completed() {
        assert_eq!(
            urls(Some("http://10.0.0.1:7400, 10.0.0.2:7400,,10.0.0.4,[fd00::1]/"), None),
            [
                "http://10.0.0.1:7400",
                "http://10.0.0.2:7400",
                "http://10.0.0.4:7400",
                "http://[fd00::1]:7400",
            ]
        );
        let secure = resolve_urls(Some("https://ctl.example:443,10.0.0.4"), None, &tls_dialer());
        assert_eq!(
            secure.map_err(|e| e.to_string()),
            Ok(vec!["https://ctl.example:443".to_string(), "https://10.0.0.4:7400".to_string()])
        );
    }

    #[test]
    fn the_scheme_must_match_the_mode() {
        let plain = resolve_urls(Some("http://10.0.0.1:7400"), None, &tls_dialer());
        let e = plain.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("is plaintext, but the control plane speaks TLS"), "{e}");
        let e = bad_url("https://10.0.0.1:7400");
        assert!(e.contains("needs TLS, but --insecure was given"), "{e}");
        let default = resolve_urls(None, None, &tls_dialer()).map_err(|e| e.to_string());
        assert_eq!(default, Ok(vec!["https://127.0.0.1:7400".to_string()]));
    }

    #[test]
    fn bad_urls_are_named() {
        assert_eq!(bad_url(""), r#"invalid controller URL "": no URL given"#);
        assert_eq!(bad_url(" , "), r#"invalid controller URL " , ": no URL given"#);
        assert_eq!(
            bad_url("ftp://x:1"),
            r#"invalid controller URL "ftp://x:1": the scheme must be https (or http with --insecure)"#
        );
        assert_eq!(bad_url("a b"), r#"invalid controller URL "a b": expected https://IP:PORT"#);
        assert_eq!(
            bad_url("h:1/api"),
            r#"invalid controller URL "h:1/api": a controller URL has no path"#
        );
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(seconds(Duration::from_secs(15)), "15s");
        assert_eq!(seconds(Duration::from_millis(250)), "250ms");
    }

    fn quick() -> Policy {
        Policy {
            connect_timeout: Duration::from_millis(500),
            read_timeout: Duration::from_millis(300),
            deadline: Duration::from_secs(2),
            backoff: Duration::from_millis(50),
        }
    }

    /// A port on which nothing listens.
    async fn refused_url() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr: SocketAddr = listener.local_addr().expect("addr");
        drop(listener);
        format!("http://{addr}")
    }

    async fn list(ctl: &Controllers) -> Result<pb::NetworkList, Error> {
        ctl.call(Call::Read, |mut c| async move {
            c.list_networks(pb::ListNetworksRequest::default()).await
        })
        .await
    }

    async fn create(ctl: &Controllers) -> Result<pb::Network, Error> {
        let req = pb::CreateNetworkRequest {
            name: "n".into(),
            subnet: "10.0.0.0/24".into(),
            ..Default::default()
        };
        ctl.call(Call::Write, move |mut c| {
            let req = req.clone();
            async move { c.create_network(req).await }
        })
        .await
    }

    fn count(calls: &Arc<AtomicUsize>) -> usize {
        calls.load(Ordering::SeqCst)
    }

    #[tokio::test]
    async fn reads_and_writes_skip_refused_urls() {
        let dead = refused_url().await;
        let (live, calls) = fake::spawn(Behaviour::Answer).await;
        let ctl = Controllers::new(vec![dead, live], quick(), Dialer::insecure());
        let list = list(&ctl).await.expect("list");
        assert_eq!(list.networks.len(), 1);
        let network = create(&ctl).await.expect("create");
        assert_eq!(network.name, "n");
        assert_eq!(count(&calls), 2);
    }

    #[tokio::test]
    async fn all_refused_names_every_url() {
        let (a, b) = (refused_url().await, refused_url().await);
        let ctl = Controllers::new(vec![a.clone(), b.clone()], quick(), Dialer::insecure());
        let err = list(&ctl).await.expect_err("no controller").to_string();
        assert_eq!(
            err,
            format!(
                "cannot reach any controller ({a}: connection refused; {b}: connection refused)"
            )
        );
    }

    #[tokio::test]
    async fn a_read_moves_past_an_unavailable_member() {
        let (sick, sick_calls) =
            fake::spawn(Behaviour::Fail(Code::Unavailable, "no leader".into())).await;
        let (live, live_calls) = fake::spawn(Behaviour::Answer).await;
        let ctl = Controllers::new(vec![sick, live], quick(), Dialer::insecure());
        assert!(list(&ctl).await.is_ok());
        assert_eq!((count(&sick_calls), count(&live_calls)), (1, 1));
    }

    #[tokio::test]
    async fn a_read_moves_past_a_silent_member() {
        let (slow, _) = fake::spawn(Behaviour::Hang).await;
        let (live, live_calls) = fake::spawn(Behaviour::Answer).await;
        let ctl = Controllers::new(vec![slow, live], quick(), Dialer::insecure());
        assert!(list(&ctl).await.is_ok());
        assert_eq!(count(&live_calls), 1);
    }

    #[tokio::test]
    async fn reads_go_round_until_the_deadline() {
        let (sick, sick_calls) =
            fake::spawn(Behaviour::Fail(Code::Unavailable, "no leader".into())).await;
        let ctl = Controllers::new(vec![sick.clone()], quick(), Dialer::insecure());
        let err = list(&ctl).await.expect_err("unavailable").to_string();
        assert_eq!(
            err,
            format!("cannot reach any controller ({sick}: it answered unavailable: no leader)")
        );
        assert!(count(&sick_calls) > 3, "{}", count(&sick_calls));
    }

    #[tokio::test]
    async fn a_write_that_may_have_landed_is_not_repeated() {
        let (sick, _) = fake::spawn(Behaviour::Fail(Code::Unavailable, "leader lost".into())).await;
        let (live, live_calls) = fake::spawn(Behaviour::Answer).await;
        let ctl = Controllers::new(vec![sick.clone(), live], quick(), Dialer::insecure());
        let err = create(&ctl).await.expect_err("unknown").to_string();
        assert!(err.starts_with(&format!("outcome unknown: the request reached {sick} but it answered unavailable: leader lost;")), "{err}");
        assert_eq!(count(&live_calls), 0);
    }

    #[tokio::test]
    async fn a_write_without_answer_is_unknown() {
        let (slow, _) = fake::spawn(Behaviour::Hang).await;
        let (live, live_calls) = fake::spawn(Behaviour::Answer).await;
        let ctl = Controllers::new(vec![slow.clone(), live], quick(), Dialer::insecure());
        let err = create(&ctl).await.expect_err("unknown").to_string();
        assert!(
            err.starts_with(&format!(
                "outcome unknown: the request reached {slow} but got no answer within"
            )),
            "{err}"
        );
        assert_eq!(count(&live_calls), 0);
    }

    #[tokio::test]
    async fn a_refusal_is_the_answer() {
        let message = "subnet 10.0.1.0/25 overlaps network frontend (10.0.1.0/24)";
        let (picky, _) = fake::spawn(Behaviour::Fail(Code::InvalidArgument, message.into())).await;
        let (live, live_calls) = fake::spawn(Behaviour::Answer).await;
        let ctl = Controllers::new(vec![picky, live], quick(), Dialer::insecure());
        assert_eq!(create(&ctl).await.expect_err("refused").to_string(), message);
        assert_eq!(list(&ctl).await.expect_err("refused").to_string(), message);
        assert_eq!(count(&live_calls), 0);
    }
}
