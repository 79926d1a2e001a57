//! What a certificate entitles its holder to. The role is written into the certificate
//! (subject OU) by whoever holds the CA key, so it cannot be claimed, only granted.

use std::fmt;
use std::str::FromStr;

use crate::PkiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// A raft member: the only role that may send raft traffic.
    Controller,
    /// One host's agent: registers, heartbeats and watches as that host only.
    Agent,
    /// An operator (`overlayctl`): may do everything.
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Controller, Role::Agent, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Controller => "controller",
            Role::Agent => "agent",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = PkiError;
    fn from_str(s: &str) -> Result<Role, PkiError> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| PkiError::UnknownRole(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_names_the_bad_value() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>().ok(), Some(r));
        }
        let e = "root".parse::<Role>().err().map(|e| e.to_string()).unwrap_or_default();
        assert_eq!(e, "unknown role \"root\": expected controller, agent or admin");
    }
}
