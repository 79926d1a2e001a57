//! Outgoing raft traffic: one task per peer holding a long-lived client stream over the
//! Peer gRPC service on that member's `--listen` address.
//!
//! Sending never blocks the driver: each peer has a bounded queue, and a message that
//! does not fit, or that is queued while the peer is unreachable, is dropped. Raft
//! tolerates lost messages (it retransmits from its own progress tracking).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use overlay_proto::pb;
use protobuf::Message as _;
use raft::prelude::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info};

use crate::cluster::Peers;

const QUEUE: usize = 8192;

pub struct Transport {
    queues: HashMap<u64, mpsc::Sender<Message>>,
}

impl Transport {
    /// Starts a sender task for every member other than `self_id`.
    pub fn start(self_id: u64, peers: &Peers) -> Transport {
        let mut queues = HashMap::new();
        let addresses: &BTreeMap<u64, String> = &peers.addresses;
        for &id in addresses.keys().filter(|&&id| id != self_id) {
            let (tx, rx) = mpsc::channel(QUEUE);
            queues.insert(id, tx);
            tokio::spawn(peer_sender(self_id, id, peers.clone(), rx));
        }
        Transport { queues }
    }

    pub fn send(&self, messages: Vec<Message>) {
        for m in messages {
            if let Some(queue) = self.queues.get(&m.to) {
                if queue.try_send(m).is_err() {
                    debug!("peer queue full; raft will retransmit");
                }
            }
        }
    }
}

async fn peer_sender(self_id: u64, peer: u64, peers: Peers, mut queue: mpsc::Receiver<Message>) {
    let mut backoff = Duration::from_millis(50);
    let mut was_connected = true;
    loop {
        let Some(mut client) = peers.client(peer) else { return };
        let (tx, rx) = mpsc::channel::<pb::RaftMessage>(1024);
        let call = tokio::spawn(async move { client.raft(ReceiverStream::new(rx)).await });
        // Forward queued messages until the stream breaks.
        let mut sent_any = false;
        loop {
            let Some(m) = queue.recv().await else { return };
            let data = match m.write_to_bytes() {
                Ok(d) => d,
                Err(e) => {
                    debug!(error = %e, "unencodable raft message dropped");
                    continue;
                }
            };
            if tx.send(pb::RaftMessage { data }).await.is_err() {
                break;
            }
            if !sent_any {
                sent_any = true;
            }
            if call.is_finished() {
                break;
            }
        }
        drop(tx);
        let outcome = call.await;
        if was_connected {
            info!(from = self_id, peer, result = ?outcome.map(|r| r.err().map(|s| s.message().to_string())).ok().flatten(), "raft stream to peer ended; reconnecting");
        }
        was_connected = sent_any;
        // Drop what queued up while the peer was away: it is stale by now.
        while queue.try_recv().is_ok() {}
        tokio::time::sleep(backoff).await;
        backoff = if sent_any {
            Duration::from_millis(50)
        } else {
            (backoff * 2).min(Duration::from_secs(1))
        };
    }
}
