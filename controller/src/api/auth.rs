//! Who may do what (pure). Every RPC names the [`Act`] it performs and asks
//! [`authorize`] with the [`Caller`] its connection proved; a refusal becomes
//! `PERMISSION_DENIED` with a message that says who was refused what, and nothing runs.
//!
//! * `admin` may do everything;
//! * `agent` (one host, named by its certificate) may register, heartbeat, watch and
//!   renew its certificate as that host only, and register only with an underlay IP its
//!   certificate names, when it names any; and it may create, connect, disconnect and
//!   remove endpoints on that host only (the containers its CNI plugin attaches): the
//!   handlers send those as commands guarded by [`own_host`], so the host is checked
//!   again, atomically, where the change is applied;
//! * an `agent` also reports the statuses of its own host's endpoints, and may read
//!   one endpoint of its own host (a container's, whose CNI ADD waits until it is ready);
//! * `controller` may use the member-to-member Peer service, and nothing else;
//! * a caller without a certificate may only join with a token;
//! * with `--insecure` there are no identities and everything is allowed.

use std::net::IpAddr;

use overlay_grpc::Caller;
use overlay_pki::Role;

/// What a call does, as far as authorisation cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act<'a> {
    /// Any read of the desired state or the cluster (`ls`, `inspect`, `cluster status`).
    Read,
    /// Any change a user makes (networks, endpoints, routes, hosts, join tokens).
    Write,
    RegisterHost {
        host: &'a str,
        underlay_ip: IpAddr,
    },
    Heartbeat {
        host: &'a str,
    },
    Watch {
        host: &'a str,
    },
    RenewCertificate,
    /// Asking for a certificate with a join token (the token is checked by the handler).
    Join,
    /// The member-to-member Peer service.
    Peer,
    // --- Containers (CNI, issue 12) ---
    /// Creating, connecting, disconnecting or removing `endpoint`, which is (or is to
    /// be) on `host`; `None` when no such endpoint exists (the command then fails by
    /// itself).
    ChangeEndpoint {
        endpoint: &'a str,
        host: Option<&'a str>,
    },
    // --- Endpoint status (issue 15) ---
    /// Reporting the statuses of `host`'s endpoints.
    ReportStatus {
        host: &'a str,
    },
    /// Reading `endpoint` (inspect), which is on `host`; `None` when there is no such
    /// endpoint (the read then fails by itself).
    ReadEndpoint {
        endpoint: &'a str,
        host: Option<&'a str>,
    },
}

impl std::fmt::Display for Act<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Act::Read => f.write_str("read the cluster's state"),
            Act::Write => f.write_str("change the cluster's state"),
            Act::RegisterHost { host, underlay_ip } => {
                write!(f, "register host {host} with underlay IP {underlay_ip}")
            }
            Act::Heartbeat { host } => write!(f, "heartbeat as host {host}"),
            Act::Watch { host } => write!(f, "watch as host {host}"),
            Act::RenewCertificate => f.write_str("renew an agent certificate"),
            Act::Join => f.write_str("join"),
            Act::Peer => f.write_str("speak raft to a member"),
            Act::ChangeEndpoint { endpoint, host: Some(host) } => {
                write!(f, "change endpoint {endpoint} on host {host}")
            }
            Act::ChangeEndpoint { endpoint, host: None } => write!(f, "change endpoint {endpoint}"),
            Act::ReportStatus { host } => write!(f, "report endpoint statuses of host {host}"),
            Act::ReadEndpoint { endpoint, host: Some(host) } => {
                write!(f, "read endpoint {endpoint} on host {host}")
            }
            Act::ReadEndpoint { endpoint, host: None } => write!(f, "read endpoint {endpoint}"),
        }
    }
}

/// The caller as a refusal names it.
pub fn describe(caller: &Caller) -> String {
    match caller {
        Caller::Insecure { .. } => "an unauthenticated caller".into(),
        Caller::Anonymous { .. } => "a caller without a client certificate".into(),
        Caller::Certified { cert, .. } => match cert.role {
            Some(role) => format!("{role} {:?}", cert.name),
            None => format!("certificate {:?} (which carries no role)", cert.name),
        },
    }
}

/// `Ok` if `caller` may perform `act`; else why not, as the sentence after
/// "permission denied: ".
pub fn authorize(caller: &Caller, act: Act<'_>) -> Result<(), String> {
    let denied = |why: &str| Err(format!("{} may not {act}{why}", describe(caller)));
    let cert = match caller {
        Caller::Insecure { .. } => return Ok(()),
        Caller::Anonymous { .. } if act == Act::Join => return Ok(()),
        Caller::Anonymous { .. } => {
            return denied(
                " (connect with a client certificate: --tls-cert and --tls-key, or OVERLAY_TLS_CERT and OVERLAY_TLS_KEY)",
            )
        }
        Caller::Certified { cert, .. } => cert,
    };
    let Some(role) = cert.role else {
        return denied(" (issue it again with overlayctl cert issue … --role)");
    };
    match (role, act) {
        (_, Act::Join) => Ok(()),
        (Role::Admin, Act::Peer) => denied(" (only controller certificates may)"),
        (Role::Admin, _) => Ok(()),
        (Role::Controller, Act::Peer) => Ok(()),
        (Role::Controller, _) => denied(" (a controller certificate is for raft traffic only)"),
        (Role::Agent, Act::Heartbeat { host } | Act::Watch { host }) if host == cert.name => Ok(()),
        (Role::Agent, Act::RegisterHost { host, underlay_ip }) if host == cert.name => {
            if cert.ips.is_empty() || cert.ips.contains(&underlay_ip) {
                Ok(())
            } else {
                let named: Vec<String> = cert.ips.iter().map(IpAddr::to_string).collect();
                denied(&format!(" (its certificate names only {})", named.join(", ")))
            }
        }
        (Role::Agent, Act::RenewCertificate) => Ok(()),
        (Role::Agent, Act::ChangeEndpoint { host, .. } | Act::ReadEndpoint { host, .. })
            if host.is_none_or(|h| h == cert.name) =>
        {
            Ok(())
        }
        (Role::Agent, Act::ReportStatus { host }) if host == cert.name => Ok(()),
        (Role::Agent, Act::ReportStatus { .. }) => denied(&format!(
            " (its certificate is for host {}: an agent reports only its own host's endpoints)",
            cert.name
        )),
        (Role::Agent, Act::ReadEndpoint { .. }) => denied(&format!(
            " (its certificate is for host {}: an agent reads only its own host's endpoints)",
            cert.name
        )),
        (Role::Agent, Act::Heartbeat { .. } | Act::Watch { .. } | Act::RegisterHost { .. }) => {
            denied(&format!(" (its certificate is for host {})", cert.name))
        }
        (Role::Agent, Act::ChangeEndpoint { .. }) => denied(&format!(
            " (its certificate is for host {}: an agent changes only its own host's endpoints)",
            cert.name
        )),
        (Role::Agent, _) => denied(
            " (an agent certificate allows only its own host's registration, heartbeats, watch and endpoints)",
        ),
    }
}

/// The host an `agent` caller may change endpoints on (its own); `None` for every other
/// caller. Endpoint changes an agent asks for are applied as commands guarded by it.
pub fn own_host(caller: &Caller) -> Option<&str> {
    match caller {
        Caller::Certified { cert, .. } if cert.role == Some(Role::Agent) => Some(&cert.name),
        _ => None,
    }
}

/// [`authorize`] as a gRPC status.
pub fn check(caller: &Caller, act: Act<'_>) -> Result<(), tonic::Status> {
    authorize(caller, act)
        .map_err(|why| tonic::Status::permission_denied(format!("permission denied: {why}")))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::SystemTime;

    use overlay_pki::CertInfo;

    use super::*;

    fn cert(name: &str, role: Option<Role>, ips: &[&str]) -> Caller {
        Caller::Certified {
            remote: None,
            cert: Arc::new(CertInfo {
                name: name.into(),
                role,
                ips: ips.iter().filter_map(|i| i.parse().ok()).collect(),
                not_before: SystemTime::UNIX_EPOCH,
                not_after: SystemTime::UNIX_EPOCH,
            }),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))
    }

    #[test]
    fn admin_does_everything_but_raft() {
        let admin = cert("ops", Some(Role::Admin), &[]);
        for act in [Act::Read, Act::Write, Act::Watch { host: "h9" }, Act::Join] {
            assert_eq!(authorize(&admin, act), Ok(()), "{act}");
        }
        assert_eq!(
            authorize(&admin, Act::Peer),
            Err("admin \"ops\" may not speak raft to a member (only controller certificates may)"
                .into())
        );
    }

    #[test]
    fn agents_act_as_their_own_host_only() {
        let h1 = cert("h1", Some(Role::Agent), &["192.0.2.1"]);
        let reg = |host, addr| Act::RegisterHost { host, underlay_ip: ip(addr) };
        assert_eq!(authorize(&h1, reg("h1", "192.0.2.1")), Ok(()));
        assert_eq!(authorize(&h1, Act::Heartbeat { host: "h1" }), Ok(()));
        assert_eq!(authorize(&h1, Act::Watch { host: "h1" }), Ok(()));
        assert_eq!(authorize(&h1, Act::RenewCertificate), Ok(()));
        assert_eq!(
            authorize(&h1, reg("h2", "192.0.2.1")),
            Err("agent \"h1\" may not register host h2 with underlay IP 192.0.2.1 (its certificate is for host h1)".into())
        );
        assert_eq!(
            authorize(&h1, reg("h1", "192.0.2.99")),
            Err("agent \"h1\" may not register host h1 with underlay IP 192.0.2.99 (its certificate names only 192.0.2.1)".into())
        );
        assert!(authorize(&h1, Act::Watch { host: "h2" }).is_err());
        assert!(authorize(&h1, Act::Write).is_err());
        assert_eq!(own_host(&h1), Some("h1"));
        assert!(authorize(&h1, Act::Read).is_err());
        assert!(authorize(&h1, Act::Peer).is_err());
        // Without IP SANs any underlay IP goes.
        let open = cert("h1", Some(Role::Agent), &[]);
        assert_eq!(authorize(&open, reg("h1", "198.51.100.7")), Ok(()));
    }

    /// CNI: an agent attaches its own host's containers, and nothing else.
    #[test]
    fn agents_change_endpoints_on_their_own_host_only() {
        let h1 = cert("h1", Some(Role::Agent), &["192.0.2.1"]);
        let change = |endpoint, host| Act::ChangeEndpoint { endpoint, host };
        assert_eq!(authorize(&h1, change("web1", Some("h1"))), Ok(()));
        // An endpoint that does not exist: the guarded command fails by itself.
        assert_eq!(authorize(&h1, change("gone", None)), Ok(()));
        assert_eq!(
            authorize(&h1, change("db1", Some("h2"))),
            Err("agent \"h1\" may not change endpoint db1 on host h2 (its certificate is for host h1: an agent changes only its own host's endpoints)".into())
        );
        // Still nothing else: networks, routes, hosts are `Write`; reads are `Read`.
        assert!(authorize(&h1, Act::Write).is_err());
        assert!(authorize(&h1, Act::Read).is_err());
        let admin = cert("ops", Some(Role::Admin), &[]);
        assert_eq!(authorize(&admin, change("db1", Some("h2"))), Ok(()));
        assert_eq!(own_host(&admin), None);
        let c1 = cert("c1", Some(Role::Controller), &[]);
        assert!(authorize(&c1, change("web1", Some("c1"))).is_err());
        assert!(authorize(&Caller::Anonymous { remote: None }, change("x", None)).is_err());
        assert_eq!(own_host(&Caller::Insecure { remote: None }), None);
    }

    /// Issue 15: an agent reports (and reads) its own host's endpoints only.
    #[test]
    fn agents_report_statuses_of_their_own_host_only() {
        let h1 = cert("h1", Some(Role::Agent), &["192.0.2.1"]);
        assert_eq!(authorize(&h1, Act::ReportStatus { host: "h1" }), Ok(()));
        assert_eq!(
            authorize(&h1, Act::ReportStatus { host: "h2" }),
            Err("agent \"h1\" may not report endpoint statuses of host h2 (its certificate is for host h1: an agent reports only its own host's endpoints)".into())
        );
        let read = |endpoint, host| Act::ReadEndpoint { endpoint, host };
        assert_eq!(authorize(&h1, read("web1", Some("h1"))), Ok(()));
        assert_eq!(authorize(&h1, read("gone", None)), Ok(()));
        assert_eq!(
            authorize(&h1, read("db1", Some("h2"))),
            Err("agent \"h1\" may not read endpoint db1 on host h2 (its certificate is for host h1: an agent reads only its own host's endpoints)".into())
        );
        let admin = cert("ops", Some(Role::Admin), &[]);
        assert_eq!(authorize(&admin, read("db1", Some("h2"))), Ok(()));
        assert_eq!(authorize(&admin, Act::ReportStatus { host: "h2" }), Ok(()));
        let c1 = cert("c1", Some(Role::Controller), &[]);
        assert!(authorize(&c1, Act::ReportStatus { host: "c1" }).is_err());
        assert!(authorize(&Caller::Anonymous { remote: None }, Act::ReportStatus { host: "h1" })
            .is_err());
    }

    #[test]
    fn controllers_speak_raft_only() {
        let c1 = cert("c1", Some(Role::Controller), &[]);
        assert_eq!(authorize(&c1, Act::Peer), Ok(()));
        assert!(authorize(&c1, Act::Write).is_err());
        assert!(authorize(&c1, Act::Read).is_err());
    }

    #[test]
    fn strangers_may_only_join() {
        let anon = Caller::Anonymous { remote: None };
        assert_eq!(authorize(&anon, Act::Join), Ok(()));
        let why = authorize(&anon, Act::Read).err().unwrap_or_default();
        assert!(why.starts_with("a caller without a client certificate may not read"), "{why}");
        let old = cert("h1", None, &[]);
        assert!(authorize(&old, Act::Watch { host: "h1" }).is_err());
        let insecure = Caller::Insecure { remote: None };
        assert_eq!(authorize(&insecure, Act::Peer), Ok(()));
        let status = check(&anon, Act::Write).err().map(|s| s.message().to_string());
        assert!(status.is_some_and(|m| m.starts_with("permission denied: ")));
    }
}
