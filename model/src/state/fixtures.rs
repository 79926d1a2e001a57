//! Test fixtures shared by the state machine's test modules.

#![allow(clippy::unwrap_used)]

use super::State;
use crate::{Command, NetworkSpec};

/// A state with these hosts (name, underlay IP in a /24) registered and these networks
/// (name, subnet) created with every default.
pub fn state_with(hosts: &[(&str, &str)], networks: &[(&str, &str)]) -> State {
    let mut s = State::new();
    for (name, ip) in hosts {
        s.apply(&Command::RegisterHost {
            name: (*name).into(),
            underlay_ip: ip.parse().unwrap(),
            underlay_prefix: 24,
            underlay_mtu: 1500,
            now_ms: 1,
        })
        .unwrap();
    }
    for (name, subnet) in networks {
        s.apply(&Command::CreateNetwork(spec(name, subnet))).unwrap();
    }
    s
}

/// `network create NAME --subnet SUBNET` with every other setting left to `apply`.
pub fn spec(name: &str, subnet: &str) -> NetworkSpec {
    NetworkSpec::with_defaults(name, subnet.parse().unwrap())
}
