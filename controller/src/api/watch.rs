//! Serving the Watch method: one task per stream, feeding shared pre-encoded frames
//! (see `crate::watch`) through a small bounded channel, so a stream's memory is a few
//! frames of references whatever the catalog's size, and a watcher that cannot keep up
//! falls behind the hub's broadcast and is sent a fresh snapshot instead of a growing
//! queue.
//!
//! [`WithWatch`] sits in front of the generated `OverlayServer` and answers the Watch
//! path itself with [`WatchCodec`], which writes [`Frame`]s as they are (clients decode
//! them with the generated types: the bytes are the same). Every other path goes to the
//! generated server. The trait method (`OverlayApi::watch`) serves the same frames
//! decoded, for callers that build the generated server alone.
//!
//! Contract: a watcher that asks for a per-host stream (`per_host`, an agent) receives
//! what its host needs (`watch::view`: whole objects for the networks it wants, every
//! other endpoint by name); any other watcher the whole catalog. Every message carries
//! the revision; objects may already reflect later revisions than the
//! message's, never earlier ones. When nothing relevant happened for a watcher, it gets
//! a progress message (no changes, the newest revision) at most every
//! [`PROGRESS_INTERVAL`], so its applied revision keeps up with the cluster's.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use overlay_grpc::Caller;
use overlay_proto::pb;
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Status};
use tracing::debug;

use super::auth::{self, Act};
use super::overlay::OverlayApi;
use crate::cluster::{Cluster, MAX_MESSAGE_BYTES, MAX_REQUEST_BYTES};
use crate::security::WatchSlot;
use crate::watch::{
    frames, live_frames, progress, Event, Frame, HostView, HubEvent, Piece, Start, WatchCodec,
};

/// The gRPC path served here.
pub const WATCH_PATH: &str = "/overlay.v1.Overlay/Watch";
/// Frames a stream may have queued before its task waits for the client.
const STREAM_BUFFER: usize = 4;
/// Revisions waiting for a stream are sent together up to about this many bytes.
const COALESCE_BYTES: usize = 256 * 1024;
/// The shortest time between two progress messages to one host.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

pub type FrameStream = ReceiverStream<Result<Frame, Status>>;

/// Checks the caller and starts the stream's task.
#[allow(clippy::result_large_err)]
pub fn open(api: &OverlayApi, req: Request<pb::WatchRequest>) -> Result<FrameStream, Status> {
    let caller = Caller::of(&req);
    let r = req.into_inner();
    auth::check(&caller, Act::Watch { host: &r.host })?;
    api.serving()?;
    api.same_cluster(&r.cluster_id)?;
    let slot = api.watches.acquire(&caller).map_err(Status::resource_exhausted)?;
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    let cluster = api.cluster.clone();
    let open = cluster.shared.metrics.watch_opened();
    // Narrowed to the host only for a watcher that understands names apart from
    // objects (`put_names`): an older agent gets the whole catalog, as it expects.
    let host: Option<String> = (r.per_host && !r.host.is_empty()).then(|| r.host.clone());
    tokio::spawn(async move {
        let _open = open;
        debug!(host = %r.host, from = r.from_revision, "watch started");
        serve(cluster, host, r.from_revision, tx, slot).await;
        debug!(host = %r.host, "watch ended");
    });
    Ok(ReceiverStream::new(rx))
}

/// One stream's sending side, with what progress messages need.
struct Sender {
    tx: mpsc::Sender<Result<Frame, Status>>,
    cluster_id: Arc<str>,
    /// Revision of the last frame sent.
    sent: u64,
    sent_at: Instant,
}

impl Sender {
    async fn send(&mut self, frame: Frame) -> Result<(), ()> {
        let revision = frame.revision;
        self.tx.send(Ok(frame)).await.map_err(|_| ())?;
        self.sent = self.sent.max(revision);
        self.sent_at = Instant::now();
        Ok(())
    }

    async fn send_all(&mut self, list: Vec<Frame>) -> Result<(), ()> {
        for f in list {
            self.send(f).await?;
        }
        Ok(())
    }

    /// What `view` receives of `event`, as encoded change records (none when nothing
    /// concerns it).
    fn event_bodies(&self, cluster: &Cluster, view: &mut HostView, event: &Event) -> Vec<Bytes> {
        let pieces = view.filter(event);
        let mut bodies = Vec::new();
        for p in pieces {
            match p {
                Piece::Record(b) => bodies.push(b.clone()),
                Piece::Network(n) => {
                    if let Some(content) = cluster.shared.hub.network(n) {
                        bodies.extend(content.chunks().iter().cloned());
                    }
                }
                Piece::Dropped(n) => {
                    if let (Some(content), Some(me)) = (cluster.shared.hub.network(n), view.host())
                    {
                        bodies.extend(content.release(me, view.wanted()));
                    }
                }
            }
        }
        bodies
    }
}

/// Streams one watcher: a starting point, then live changes in revision order, and
/// progress messages while nothing concerns it. Falls back to a fresh snapshot whenever
/// it lagged behind or the state was reset. Ends when the watcher goes away (releasing
/// its `slot`), even while nothing changes.
async fn serve(
    cluster: Cluster,
    host: Option<String>,
    mut from: u64,
    tx: mpsc::Sender<Result<Frame, Status>>,
    _slot: WatchSlot,
) {
    let mut out = Sender { tx, cluster_id: Arc::from(""), sent: 0, sent_at: Instant::now() };
    loop {
        let cluster_id = cluster.read_state().meta().cluster_id.clone().unwrap_or_default();
        out.cluster_id = Arc::from(cluster_id.as_str());
        let (start, mut rx) = cluster.shared.hub.subscribe(host.as_deref(), from);
        let mut view = match start {
            Start::Snapshot { revision, view, parts } => {
                // Encoded (or found encoded) here, outside every lock.
                let list = frames(revision, &out.cluster_id, parts.bodies(), true);
                drop(parts);
                if out.send_all(list).await.is_err() {
                    return;
                }
                from = revision;
                view
            }
            Start::Replay { mut view, events } => {
                let before = from;
                let mut bodies = Vec::new();
                for event in events {
                    if event.revision <= from {
                        // The watcher has it (from another member): only follow the view.
                        view.filter(&event);
                        continue;
                    }
                    bodies.extend(out.event_bodies(&cluster, &mut view, &event));
                    from = event.revision;
                }
                if !bodies.is_empty()
                    && out
                        .send_all(live_frames(before, from, &out.cluster_id, bodies))
                        .await
                        .is_err()
                {
                    return;
                }
                view
            }
        };
        // The newest revision this watcher has been told nothing about (a replay of
        // events that did not concern it leaves one).
        let mut pending: Option<u64> = (from > out.sent).then_some(from);
        // An event taken while coalescing that must be handled on its own.
        let mut deferred: Option<Result<HubEvent, broadcast::error::RecvError>> = None;
        // Live changes until the stream ends or we must start over.
        loop {
            let progress_at = pending.map(|_| out.sent_at + PROGRESS_INTERVAL);
            let event = if let Some(event) = deferred.take() {
                event
            } else {
                tokio::select! {
                    _ = out.tx.closed() => return,
                    event = rx.recv() => event,
                    _ = sleep_until(progress_at) => {
                        if let Some(revision) = pending.take() {
                            if revision > out.sent {
                                let frame = progress(revision, &out.cluster_id);
                                if out.send(frame).await.is_err() {
                                    return;
                                }
                            }
                        }
                        continue;
                    }
                }
            };
            match event {
                Ok(HubEvent::Applied(event)) => {
                    if event.revision <= from {
                        view.filter(&event);
                        continue;
                    }
                    if event.revision != from + 1 {
                        from = 0;
                        break; // a gap: cannot happen by construction, but never send one
                    }
                    let before = from;
                    let mut bodies = out.event_bodies(&cluster, &mut view, &event);
                    from = event.revision;
                    // What else is already waiting goes out with it: a stream that fell
                    // behind (its client was slow, or a burst of writes) catches up in a
                    // few full frames instead of one small frame per revision.
                    let mut size: usize = bodies.iter().map(Bytes::len).sum();
                    while size < COALESCE_BYTES {
                        match rx.try_recv() {
                            Ok(HubEvent::Applied(next)) if next.revision == from + 1 => {
                                let more = out.event_bodies(&cluster, &mut view, &next);
                                size += more.iter().map(Bytes::len).sum::<usize>();
                                bodies.extend(more);
                                from = next.revision;
                            }
                            Err(broadcast::error::TryRecvError::Empty) => break,
                            Ok(other) => {
                                deferred = Some(Ok(other));
                                break;
                            }
                            Err(broadcast::error::TryRecvError::Lagged(n)) => {
                                deferred = Some(Err(broadcast::error::RecvError::Lagged(n)));
                                break;
                            }
                            Err(broadcast::error::TryRecvError::Closed) => {
                                deferred = Some(Err(broadcast::error::RecvError::Closed));
                                break;
                            }
                        }
                    }
                    if bodies.is_empty() {
                        pending = Some(from);
                        continue;
                    }
                    pending = None;
                    let list = live_frames(before, from, &out.cluster_id, bodies);
                    if out.send_all(list).await.is_err() {
                        return;
                    }
                }
                Ok(HubEvent::Reset) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    from = 0;
                    break;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The generated `OverlayServer` with the Watch path served by [`open`] with
/// [`WatchCodec`].
#[derive(Clone)]
pub struct WithWatch<S> {
    inner: S,
    api: Arc<OverlayApi>,
}

impl<S> WithWatch<S> {
    pub fn new(inner: S, api: Arc<OverlayApi>) -> WithWatch<S> {
        WithWatch { inner, api }
    }
}

impl<S> tonic::server::NamedService for WithWatch<S> {
    const NAME: &'static str = pb::overlay_server::SERVICE_NAME;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> tower_service::Service<http::Request<tonic::body::Body>> for WithWatch<S>
where
    S: tower_service::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
        > + Send,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        if req.uri().path() != WATCH_PATH {
            return Box::pin(self.inner.call(req));
        }
        let api = self.api.clone();
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(WatchCodec)
                .apply_max_message_size_config(Some(MAX_REQUEST_BYTES), Some(MAX_MESSAGE_BYTES));
            Ok(grpc.server_streaming(WatchSvc(api), req).await)
        })
    }
}

struct WatchSvc(Arc<OverlayApi>);

impl tonic::server::ServerStreamingService<pb::WatchRequest> for WatchSvc {
    type Response = Frame;
    type ResponseStream = FrameStream;
    type Future = BoxFuture<Result<tonic::Response<FrameStream>, Status>>;

    fn call(&mut self, request: Request<pb::WatchRequest>) -> Self::Future {
        let api = self.0.clone();
        Box::pin(async move { open(&api, request).map(tonic::Response::new) })
    }
}
