//! Who is in the cluster and how to reach them, and the rules a membership change must
//! pass before the leader proposes it. Pure: no I/O, no clock; the driver gathers a
//! [`View`] of the raft node and asks [`check`] / [`next_promotion`].
//!
//! A member is added in two raft configuration changes, one at a time: first as a
//! learner (it receives the log but does not count for quorum, so a member that is slow
//! to start or to catch up never stalls writes), then, once the leader sees its log
//! caught up, promoted to voter by the leader on its own. A member is removed with one
//! change. Addresses travel in the conf change entry's context ([`MemberChange`]) and
//! live in snapshots ([`super::snapshot`]), so every member, and one restarted or joined
//! later, knows every other member's address.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;

use raft::prelude::{ConfChangeSingle, ConfChangeType, ConfChangeV2};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A learner whose log is at most this many entries behind the leader's commit index
/// counts as caught up: under a steady write load it is always a round trip behind.
pub const CATCH_UP_SLACK: u64 = 64;

/// The replicated part of the membership beyond raft's own `ConfState`: addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    /// `IP:PORT` of every voter and learner.
    pub addresses: BTreeMap<u64, String>,
    /// Ids that were removed. They are never given to a new member: a removed member
    /// that is started again with its old log must not be mistaken for the new one.
    pub removed: BTreeSet<u64>,
}

/// One membership change, as proposed (in the conf change entry's context) and applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberChange {
    AddLearner { id: u64, address: String },
    Promote { id: u64 },
    Remove { id: u64 },
}

impl MemberChange {
    pub fn id(&self) -> u64 {
        match self {
            MemberChange::AddLearner { id, .. }
            | MemberChange::Promote { id }
            | MemberChange::Remove { id } => *id,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain data into a Vec cannot fail.
        postcard::to_stdvec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<MemberChange, postcard::Error> {
        postcard::from_bytes(bytes)
    }

    /// The raft configuration change carrying this change (and, as its context, itself).
    pub fn to_conf_change(&self) -> ConfChangeV2 {
        let (id, change_type) = match self {
            MemberChange::AddLearner { id, .. } => (*id, ConfChangeType::AddLearnerNode),
            MemberChange::Promote { id } => (*id, ConfChangeType::AddNode),
            MemberChange::Remove { id } => (*id, ConfChangeType::RemoveNode),
        };
        let mut single = ConfChangeSingle { node_id: id, ..Default::default() };
        single.set_change_type(change_type);
        let mut cc = ConfChangeV2::default();
        cc.set_changes(vec![single].into());
        cc.context = self.encode().into();
        cc
    }
}

impl fmt::Display for MemberChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemberChange::AddLearner { id, address } => write!(f, "add member {id} ({address})"),
            MemberChange::Promote { id } => write!(f, "make member {id} a voter"),
            MemberChange::Remove { id } => write!(f, "remove member {id}"),
        }
    }
}

impl Membership {
    /// Starts from what a snapshot held, filling in addresses it lacks (a snapshot from
    /// before membership changes existed carries none) from `configured` (`--peers`).
    pub fn with_fallback(
        replicated: Option<Membership>,
        members: impl IntoIterator<Item = u64>,
        configured: &BTreeMap<u64, String>,
    ) -> Membership {
        let mut m = replicated.unwrap_or_default();
        for id in members {
            if let (false, Some(address)) = (m.addresses.contains_key(&id), configured.get(&id)) {
                m.addresses.insert(id, address.clone());
            }
        }
        m
    }

    /// Records an applied change. Every member applies the same changes in log order.
    pub fn apply(&mut self, change: &MemberChange) {
        match change {
            MemberChange::AddLearner { id, address } => {
                self.addresses.insert(*id, address.clone());
            }
            MemberChange::Promote { .. } => {}
            MemberChange::Remove { id } => {
                self.addresses.remove(id);
                self.removed.insert(*id);
            }
        }
    }

    /// Drops addresses of ids that are no longer in the configuration (after a snapshot
    /// or a restart replay), so the transport never keeps talking to a removed member.
    pub fn retain(&mut self, members: &BTreeSet<u64>) {
        self.addresses.retain(|id, _| members.contains(id));
    }

    fn member_with_address(&self, address: &str) -> Option<u64> {
        self.addresses.iter().find(|(_, a)| a.as_str() == address).map(|(&id, _)| id)
    }
}

/// What the leader knows about its cluster when it decides on a change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    pub voters: BTreeSet<u64>,
    pub learners: BTreeSet<u64>,
    /// Members the leader heard from within an election timeout, itself included, and a
    /// member to be added if it answered the leader's probe.
    pub live: BTreeSet<u64>,
    /// Members whose log is within [`CATCH_UP_SLACK`] of the leader's commit index and
    /// being replicated to (the leader itself included).
    pub caught_up: BTreeSet<u64>,
    /// A configuration change is proposed but not yet applied.
    pub pending_conf: bool,
}

impl View {
    fn members(&self) -> BTreeSet<u64> {
        self.voters.union(&self.learners).copied().collect()
    }
}

/// Why a membership change was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MembershipError {
    #[error("invalid member id 0: member ids start at 1")]
    InvalidId,
    #[error("invalid member address {0:?}: expected IP:PORT")]
    InvalidAddress(String),
    #[error("member {id} is already in the cluster (at {address})")]
    AlreadyMember { id: u64, address: String },
    #[error("address {address} is already used by member {id}")]
    AddressInUse { address: String, id: u64 },
    #[error(
        "the controller at {address} is member {answered}, not {id}: check the id and the \
         address (its --id and --listen)"
    )]
    AddressAnswersAs { address: String, answered: u64, id: u64 },
    #[error("member id {0} was removed from this cluster and is never reused: pick a new id")]
    IdRemoved(u64),
    #[error("member {id} is not in the cluster (members: {members})")]
    NotMember { id: u64, members: String },
    #[error(
        "member {0} is still being added (a learner catching up; start it with --join if it \
         is not running): wait until it is a voter, or remove it, before another change"
    )]
    AddInProgress(u64),
    /// Transient: the previous change (or a new leader's log) is not applied yet.
    #[error("another membership change is still being applied; retry in a moment")]
    ChangeInProgress,
    #[error("cannot remove member {0}: it is the only voter")]
    LastVoter(u64),
    #[error("{0}")]
    WouldLoseQuorum(QuorumLoss),
}

/// The details of a refused change that would leave the cluster without a majority.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuorumLoss {
    pub change: String,
    /// Voters of the configuration after the change.
    pub voters: BTreeSet<u64>,
    pub reachable: BTreeSet<u64>,
}

impl fmt::Display for QuorumLoss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unreachable: BTreeSet<u64> = self.voters.difference(&self.reachable).copied().collect();
        write!(
            f,
            "cannot {}: the resulting {} voters ({}) need {} reachable, but only {} {} ({}); \
             unreachable: {}",
            self.change,
            self.voters.len(),
            list(&self.voters),
            majority(self.voters.len()),
            self.reachable.len(),
            if self.reachable.len() == 1 { "is" } else { "are" },
            list(&self.reachable),
            list(&unreachable),
        )
    }
}

pub fn majority(voters: usize) -> usize {
    voters / 2 + 1
}

fn list(ids: &BTreeSet<u64>) -> String {
    if ids.is_empty() {
        return "none".into();
    }
    ids.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
}

/// What the leader does with a requested change that passed [`check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Propose this change.
    Propose(MemberChange),
    /// Nothing to do: the change is already in effect (a retried request).
    AlreadyDone,
}

/// Decides whether the leader may propose `change` now.
pub fn check(
    view: &View,
    members: &Membership,
    change: &MemberChange,
) -> Result<Decision, MembershipError> {
    let id = change.id();
    if id == 0 {
        return Err(MembershipError::InvalidId);
    }
    if view.pending_conf {
        return Err(MembershipError::ChangeInProgress);
    }
    let address_of = |id: u64| members.addresses.get(&id).cloned().unwrap_or_default();
    match change {
        MemberChange::AddLearner { address, .. } => {
            if address.parse::<SocketAddr>().is_err() {
                return Err(MembershipError::InvalidAddress(address.clone()));
            }
            if members.removed.contains(&id) {
                return Err(MembershipError::IdRemoved(id));
            }
            if view.learners.contains(&id) && address_of(id) == *address {
                return Ok(Decision::AlreadyDone); // a retry while it catches up
            }
            if view.voters.contains(&id) || view.learners.contains(&id) {
                return Err(MembershipError::AlreadyMember { id, address: address_of(id) });
            }
            if let Some(other) = members.member_with_address(address) {
                return Err(MembershipError::AddressInUse { address: address.clone(), id: other });
            }
            if let Some(&learner) = view.learners.iter().next() {
                return Err(MembershipError::AddInProgress(learner));
            }
            // A learner never counts for quorum, but it is added to become a voter: refuse
            // now what could not reach a majority of the grown configuration, counting the
            // new member only if it answers already (`View::live`, probed by the caller).
            let mut voters = view.voters.clone();
            voters.insert(id);
            let reachable: BTreeSet<u64> = voters.intersection(&view.live).copied().collect();
            if reachable.len() < majority(voters.len()) {
                return Err(MembershipError::WouldLoseQuorum(QuorumLoss {
                    change: change.to_string(),
                    voters,
                    reachable,
                }));
            }
            Ok(Decision::Propose(change.clone()))
        }
        MemberChange::Promote { .. } => {
            if view.voters.contains(&id) {
                return Ok(Decision::AlreadyDone);
            }
            if !view.learners.contains(&id) {
                return Err(not_member(view, id));
            }
            let mut voters = view.voters.clone();
            voters.insert(id);
            let reachable: BTreeSet<u64> = voters
                .iter()
                .filter(|v| view.live.contains(v) && (**v != id || view.caught_up.contains(v)))
                .copied()
                .collect();
            if reachable.len() < majority(voters.len()) {
                return Err(MembershipError::WouldLoseQuorum(QuorumLoss {
                    change: change.to_string(),
                    voters,
                    reachable,
                }));
            }
            Ok(Decision::Propose(change.clone()))
        }
        MemberChange::Remove { .. } => {
            if view.learners.contains(&id) {
                return Ok(Decision::Propose(change.clone())); // never counted for quorum
            }
            if !view.voters.contains(&id) {
                return Err(not_member(view, id));
            }
            if view.voters.len() == 1 {
                return Err(MembershipError::LastVoter(id));
            }
            if let Some(&learner) = view.learners.iter().next() {
                return Err(MembershipError::AddInProgress(learner));
            }
            let voters: BTreeSet<u64> = view.voters.iter().filter(|&&v| v != id).copied().collect();
            let reachable: BTreeSet<u64> = voters.intersection(&view.live).copied().collect();
            if reachable.len() < majority(voters.len()) {
                return Err(MembershipError::WouldLoseQuorum(QuorumLoss {
                    change: change.to_string(),
                    voters,
                    reachable,
                }));
            }
            Ok(Decision::Propose(change.clone()))
        }
    }
}

fn not_member(view: &View, id: u64) -> MembershipError {
    MembershipError::NotMember { id, members: list(&view.members()) }
}

/// The learner the leader should promote now, if any: caught up, reachable, and its
/// promotion keeps a majority reachable.
pub fn next_promotion(view: &View, members: &Membership) -> Option<MemberChange> {
    view.learners
        .iter()
        .filter(|id| view.live.contains(id) && view.caught_up.contains(id))
        .map(|&id| MemberChange::Promote { id })
        .find(|change| matches!(check(view, members, change), Ok(Decision::Propose(_))))
}

/// The voter leadership should move to before the leader removes itself: reachable,
/// caught up, the most advanced (`matched` per member), lowest id on ties.
pub fn transfer_target(view: &View, leader: u64, matched: &BTreeMap<u64, u64>) -> Option<u64> {
    view.voters
        .iter()
        .filter(|&&v| v != leader && view.live.contains(&v) && view.caught_up.contains(&v))
        .max_by_key(|&&v| (matched.get(&v).copied().unwrap_or(0), std::cmp::Reverse(v)))
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(list: &[u64]) -> BTreeSet<u64> {
        list.iter().copied().collect()
    }

    fn view(voters: &[u64], learners: &[u64], live: &[u64]) -> View {
        View {
            voters: ids(voters),
            learners: ids(learners),
            live: ids(live),
            caught_up: ids(live),
            pending_conf: false,
        }
    }

    fn members(list: &[u64]) -> Membership {
        Membership {
            addresses: list.iter().map(|&id| (id, format!("10.0.0.{id}:7400"))).collect(),
            removed: BTreeSet::new(),
        }
    }

    fn add(id: u64) -> MemberChange {
        MemberChange::AddLearner { id, address: format!("10.0.0.{id}:7400") }
    }

    #[test]
    fn adding_needs_a_majority_of_the_grown_configuration_among_the_old_voters() {
        let m = members(&[1, 2, 3]);
        assert_eq!(
            check(&view(&[1, 2, 3], &[], &[1, 2, 3]), &m, &add(4)),
            Ok(Decision::Propose(add(4)))
        );
        let e = check(&view(&[1, 2, 3], &[], &[1, 2]), &m, &add(4)).expect_err("3 of 4 needed");
        assert_eq!(
            e.to_string(),
            "cannot add member 4 (10.0.0.4:7400): the resulting 4 voters (1, 2, 3, 4) need 3 \
             reachable, but only 2 are (1, 2); unreachable: 3, 4"
        );
        // A single member grows to two only if it is up (it always is: it decides).
        assert!(check(&view(&[1], &[], &[1]), &members(&[1]), &add(2)).is_err());
    }

    #[test]
    fn removing_a_dead_member_is_allowed_removing_a_live_one_next_to_a_dead_one_is_not() {
        let m = members(&[1, 2, 3]);
        let v = view(&[1, 2, 3], &[], &[1, 2]);
        let rm = |id| MemberChange::Remove { id };
        assert_eq!(check(&v, &m, &rm(3)), Ok(Decision::Propose(rm(3))));
        let e = check(&v, &m, &rm(2)).expect_err("would leave 1 of 2");
        assert_eq!(
            e.to_string(),
            "cannot remove member 2: the resulting 2 voters (1, 3) need 2 reachable, but only 1 \
             is (1); unreachable: 3"
        );
        assert_eq!(
            check(&view(&[1], &[], &[1]), &members(&[1]), &rm(1)),
            Err(MembershipError::LastVoter(1))
        );
        assert!(matches!(check(&v, &m, &rm(9)), Err(MembershipError::NotMember { id: 9, .. })));
    }

    #[test]
    fn one_change_at_a_time() {
        let m = members(&[1, 2, 3, 4]);
        let v = view(&[1, 2, 3], &[4], &[1, 2, 3]);
        assert_eq!(check(&v, &m, &add(5)), Err(MembershipError::AddInProgress(4)));
        assert_eq!(
            check(&v, &m, &MemberChange::Remove { id: 3 }),
            Err(MembershipError::AddInProgress(4))
        );
        // Removing the learner itself aborts the addition.
        assert!(check(&v, &m, &MemberChange::Remove { id: 4 }).is_ok());
        // Asking again for the learner being added is not an error.
        assert_eq!(check(&v, &m, &add(4)), Ok(Decision::AlreadyDone));
        let pending = View { pending_conf: true, ..view(&[1, 2, 3], &[], &[1, 2, 3]) };
        assert_eq!(
            check(&pending, &members(&[1, 2, 3]), &add(4)),
            Err(MembershipError::ChangeInProgress)
        );
    }

    #[test]
    fn ids_and_addresses_are_unique_and_removed_ids_never_come_back() {
        let mut m = members(&[1, 2, 3]);
        let v = view(&[1, 2, 3], &[], &[1, 2, 3]);
        assert!(matches!(
            check(&v, &m, &add(2)),
            Err(MembershipError::AlreadyMember { id: 2, .. })
        ));
        let clash = MemberChange::AddLearner { id: 4, address: "10.0.0.1:7400".into() };
        assert!(matches!(check(&v, &m, &clash), Err(MembershipError::AddressInUse { id: 1, .. })));
        let bad = MemberChange::AddLearner { id: 4, address: "nowhere".into() };
        assert_eq!(check(&v, &m, &bad), Err(MembershipError::InvalidAddress("nowhere".into())));
        m.apply(&MemberChange::Remove { id: 3 });
        assert_eq!(m.addresses.keys().copied().collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(
            check(&view(&[1, 2], &[], &[1, 2]), &m, &add(3)),
            Err(MembershipError::IdRemoved(3))
        );
    }

    #[test]
    fn a_learner_is_promoted_once_caught_up_and_reachable() {
        let m = members(&[1, 2, 3, 4]);
        let mut v = view(&[1, 2, 3], &[4], &[1, 2, 3]);
        assert_eq!(next_promotion(&v, &m), None);
        v.live.insert(4);
        assert_eq!(next_promotion(&v, &m), None, "reachable but not caught up");
        v.caught_up.insert(4);
        assert_eq!(next_promotion(&v, &m), Some(MemberChange::Promote { id: 4 }));
        // With two voters down, four voters would have only two reachable.
        let v = View { live: ids(&[1, 4]), caught_up: ids(&[1, 4]), ..v };
        assert_eq!(next_promotion(&v, &m), None);
    }

    #[test]
    fn leadership_goes_to_the_most_advanced_reachable_voter() {
        let v = view(&[1, 2, 3], &[], &[1, 2, 3]);
        let matched = BTreeMap::from([(1, 50), (2, 40), (3, 45)]);
        assert_eq!(transfer_target(&v, 1, &matched), Some(3));
        let v = view(&[1, 2, 3], &[], &[1, 2]);
        assert_eq!(transfer_target(&v, 1, &matched), Some(2));
        assert_eq!(transfer_target(&view(&[1], &[], &[1]), 1, &matched), None);
    }

    #[test]
    fn changes_round_trip_through_the_conf_change_context() {
        let change = add(4);
        let cc = change.to_conf_change();
        assert_eq!(MemberChange::decode(&cc.context).ok(), Some(change));
        assert_eq!(cc.get_changes()[0].node_id, 4);
        assert_eq!(cc.get_changes()[0].get_change_type(), ConfChangeType::AddLearnerNode);
    }

    #[test]
    fn configured_addresses_fill_gaps_of_old_snapshots() {
        let configured = BTreeMap::from([(1, "a:1".to_string()), (2, "b:2".to_string())]);
        let m = Membership::with_fallback(None, [1, 2], &configured);
        assert_eq!(m.addresses, configured);
        let replicated = Membership {
            addresses: BTreeMap::from([(1, "x:1".to_string())]),
            removed: BTreeSet::new(),
        };
        let m = Membership::with_fallback(Some(replicated), [1, 2], &configured);
        assert_eq!(m.addresses.get(&1).map(String::as_str), Some("x:1"));
        assert_eq!(m.addresses.get(&2).map(String::as_str), Some("b:2"));
    }
}
