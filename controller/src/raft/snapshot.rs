//! What a raft snapshot's data holds: the member addresses ([`Membership`]) and the
//! model's [`State`]. Raft itself keeps the voters and learners in the snapshot's
//! metadata (`ConfState`); the addresses must travel with it so that a member that
//! catches up from a snapshot, or joins with one, can reach every other member.
//!
//! Layout: `[0x80][u32 LE length][postcard Membership][State::to_bytes()]`. Snapshots
//! written before membership changes existed are plain `State::to_bytes()` (whose first
//! byte is the model's format byte, 1); they decode with no membership, and the member
//! falls back to the addresses it was configured with (`--peers`).

use overlay_model::State;
use thiserror::Error;

use super::membership::Membership;

/// First byte of a snapshot that carries the membership. Distinct from every format
/// byte `State::to_bytes` uses.
const TAG: u8 = 0x80;

#[derive(Debug, Error)]
pub enum SnapshotDataError {
    #[error("snapshot data is truncated")]
    Truncated,
    #[error("snapshot membership is unreadable: {0}")]
    Membership(postcard::Error),
    #[error("snapshot state is unreadable: {0}")]
    State(#[from] overlay_model::state::SnapshotError),
}

pub fn encode(membership: &Membership, state: &State) -> Vec<u8> {
    // Serializing plain data into a Vec cannot fail.
    let members = postcard::to_stdvec(membership).unwrap_or_default();
    let state = state.to_bytes();
    let mut out = Vec::with_capacity(5 + members.len() + state.len());
    out.push(TAG);
    out.extend_from_slice(&(members.len() as u32).to_le_bytes());
    out.extend_from_slice(&members);
    out.extend_from_slice(&state);
    out
}

/// The membership (`None` for an old snapshot) and the state.
pub fn decode(bytes: &[u8]) -> Result<(Option<Membership>, State), SnapshotDataError> {
    let Some((&TAG, rest)) = bytes.split_first() else {
        return Ok((None, State::from_bytes(bytes)?));
    };
    let len: [u8; 4] =
        rest.get(..4).and_then(|b| b.try_into().ok()).ok_or(SnapshotDataError::Truncated)?;
    let len = u32::from_le_bytes(len) as usize;
    let members = rest.get(4..4 + len).ok_or(SnapshotDataError::Truncated)?;
    let membership = postcard::from_bytes(members).map_err(SnapshotDataError::Membership)?;
    let state = State::from_bytes(&rest[4 + len..])?;
    Ok((Some(membership), state))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    #[test]
    fn round_trips_and_reads_old_snapshots() {
        let membership = Membership {
            addresses: BTreeMap::from([(1, "10.0.0.1:7400".into()), (4, "10.0.0.4:7400".into())]),
            removed: BTreeSet::from([2]),
        };
        let state = State::new();
        let (m, s) = decode(&encode(&membership, &state)).unwrap();
        assert_eq!(m, Some(membership.clone()));
        assert_eq!(s, state);
        let (m, s) = decode(&state.to_bytes()).unwrap();
        assert_eq!(m, None);
        assert_eq!(s, state);
        let bytes = encode(&membership, &state);
        assert!(decode(&bytes[..3]).is_err());
        assert!(decode(&bytes[..bytes.len() - 1]).is_err());
        assert!(decode(&[]).is_err());
    }
}
