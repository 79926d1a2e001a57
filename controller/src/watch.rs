//! The watch hub: the recent history of applied changes plus a broadcast of new ones,
//! from which each agent's Watch stream is served.
//!
//! The driver publishes while it holds the state write lock; a new watcher subscribes
//! while holding the state read lock. So a watcher's starting point (a catalog snapshot
//! or a replay from history) and the live events after it never overlap or leave a gap.
//! A slow watcher never blocks the driver: it falls behind the broadcast buffer, notices
//! `Lagged`, and starts over from a fresh snapshot.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use overlay_model::{Applied, Catalog, State};
use tokio::sync::broadcast;

#[derive(Debug, Clone)]
pub enum HubEvent {
    Applied(Arc<Applied>),
    /// The state was replaced wholesale (a snapshot from the leader): start over.
    Reset,
}

/// Where a new watcher starts.
pub enum Start {
    /// The changes after the watcher's revision, in order.
    Replay(Vec<Arc<Applied>>),
    /// The whole catalog: the revision asked for is older than the history kept.
    Snapshot(Box<Catalog>),
}

pub struct WatchHub {
    inner: Mutex<History>,
    tx: broadcast::Sender<HubEvent>,
}

struct History {
    /// Revision just before the first kept change: history covers (base, newest].
    base: u64,
    changes: VecDeque<Arc<Applied>>,
    capacity: usize,
}

impl WatchHub {
    pub fn new(revision: u64, capacity: usize) -> WatchHub {
        let (tx, _) = broadcast::channel(4096);
        WatchHub {
            inner: Mutex::new(History { base: revision, changes: VecDeque::new(), capacity }),
            tx,
        }
    }

    fn history(&self) -> std::sync::MutexGuard<'_, History> {
        // A panic while holding this lock cannot leave History inconsistent (every
        // mutation is a single push/pop), so recover from poisoning.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called by the driver, with the state write lock held, for every applied command
    /// that changed something.
    pub fn publish(&self, applied: Applied) {
        let applied = Arc::new(applied);
        {
            let mut h = self.history();
            h.changes.push_back(applied.clone());
            while h.changes.len() > h.capacity {
                if let Some(old) = h.changes.pop_front() {
                    h.base = old.revision;
                }
            }
        }
        let _ = self.tx.send(HubEvent::Applied(applied));
    }

    /// Called by the driver, with the state write lock held, after replacing the state.
    pub fn reset(&self, revision: u64) {
        {
            let mut h = self.history();
            h.changes.clear();
            h.base = revision;
        }
        let _ = self.tx.send(HubEvent::Reset);
    }

    /// Called with the state read lock held (`state` is that guard's content).
    pub fn subscribe(
        &self,
        from_revision: u64,
        state: &State,
    ) -> (Start, broadcast::Receiver<HubEvent>) {
        let rx = self.tx.subscribe();
        let h = self.history();
        let start = if from_revision == 0 || from_revision < h.base {
            Start::Snapshot(Box::new(state.catalog.clone()))
        } else {
            Start::Replay(
                h.changes.iter().filter(|a| a.revision > from_revision).cloned().collect(),
            )
        };
        (start, rx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn applied(revision: u64) -> Applied {
        Applied { revision, changes: vec![] }
    }

    #[test]
    fn replays_what_it_kept_and_snapshots_what_it_dropped() {
        let hub = WatchHub::new(0, 3);
        for r in 1..=5 {
            hub.publish(applied(r));
        }
        let state = State::default();
        match hub.subscribe(3, &state).0 {
            Start::Replay(v) => {
                assert_eq!(v.iter().map(|a| a.revision).collect::<Vec<_>>(), [4, 5])
            }
            Start::Snapshot(_) => panic!("revision 3 is kept"),
        }
        assert!(matches!(hub.subscribe(1, &state).0, Start::Snapshot(_)));
        assert!(matches!(hub.subscribe(0, &state).0, Start::Snapshot(_)));
        // A watcher ahead of this member (it watched another member) waits for it.
        match hub.subscribe(9, &state).0 {
            Start::Replay(v) => assert!(v.is_empty()),
            Start::Snapshot(_) => panic!("a future revision needs no snapshot"),
        }
    }

    #[tokio::test]
    async fn live_events_follow_the_subscription() {
        let hub = WatchHub::new(0, 10);
        let (_, mut rx) = hub.subscribe(0, &State::default());
        hub.publish(applied(1));
        hub.reset(1);
        assert!(matches!(rx.recv().await.unwrap(), HubEvent::Applied(a) if a.revision == 1));
        assert!(matches!(rx.recv().await.unwrap(), HubEvent::Reset));
    }
}
