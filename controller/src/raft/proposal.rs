//! What one raft log entry carries: a batch of client commands, each tagged with who
//! proposed it so that the proposing member can answer its waiting client when the
//! entry is applied.

use overlay_model::Command;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    /// Member id of the proposer.
    pub origin: u64,
    /// Distinguishes the proposer's process lifetimes, so a sequence number from before a
    /// restart never answers a waiter of the new process.
    pub incarnation: u64,
    pub seq: u64,
    pub command: Command,
}

/// The payload of one normal raft entry. Many concurrent client writes are batched into
/// one entry (one fsync, one replication round trip).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryBatch {
    pub proposals: Vec<Proposal>,
}

impl EntryBatch {
    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain data into a Vec cannot fail.
        postcard::to_stdvec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<EntryBatch, postcard::Error> {
        postcard::from_bytes(bytes)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn batches_round_trip() {
        let batch = EntryBatch {
            proposals: vec![Proposal {
                origin: 2,
                incarnation: 99,
                seq: 7,
                command: Command::RemoveEndpoint { name: "s1".into() },
            }],
        };
        assert_eq!(EntryBatch::decode(&batch.encode()).unwrap(), batch);
        assert!(EntryBatch::decode(&[0xff, 0xff]).is_err());
    }
}
