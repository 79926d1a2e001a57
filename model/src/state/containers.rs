//! Container attachments (CNI, issue 12): the commands an agent uses to attach the
//! containers of its own host.
//!
//! They are the ordinary endpoint commands plus two things:
//! * the interface name the container runtime asked for (`CNI_IFNAME`: podman asks for
//!   `eth0`, `eth1`, … per network, Kubernetes multi-network set-ups for others);
//! * a guard that the endpoint is on a given host, checked in the same apply as the
//!   change, so an agent that may change only its own host's endpoints can never remove
//!   or rewire another host's, even if the name moved there in the meantime.

use super::{interface_index, State};
use crate::validate::check_interface;
use crate::{Change, Command, ModelError};

impl State {
    /// Applies one of the container commands (anything else changes nothing). Every
    /// check runs before the underlying command mutates anything.
    pub(super) fn apply_container_command(
        &mut self,
        command: &Command,
    ) -> Result<Vec<Change>, ModelError> {
        match command {
            Command::CreateEndpointAs { name, host, network, ip, aliases, interface } => {
                check_interface(interface)?;
                let changes = self.create_endpoint(name, host, network, *ip, aliases)?;
                Ok(self.name_interface(name, network, interface, changes))
            }
            Command::ConnectAs { network, endpoint, ip, aliases, interface, host } => {
                if let Some(host) = host {
                    self.check_on_host(endpoint, host)?;
                }
                if let Some(interface) = interface {
                    check_interface(interface)?;
                    self.check_interface_free(endpoint, interface)?;
                }
                let changes = self.connect(network, endpoint, *ip, aliases)?;
                Ok(match interface {
                    Some(interface) => self.name_interface(endpoint, network, interface, changes),
                    None => changes,
                })
            }
            Command::DisconnectOn { network, endpoint, host } => {
                self.check_on_host(endpoint, host)?;
                self.disconnect(network, endpoint)
            }
            Command::RemoveEndpointOn { name, host } => {
                self.check_on_host(name, host)?;
                self.remove_endpoint(name)
            }
            _ => Ok(Vec::new()),
        }
    }

    fn check_on_host(&self, endpoint: &str, host: &str) -> Result<(), ModelError> {
        let ep = self.endpoint(endpoint)?;
        if ep.host == host {
            Ok(())
        } else {
            Err(ModelError::EndpointOnOtherHost {
                endpoint: endpoint.to_string(),
                host: ep.host.clone(),
                asked: host.to_string(),
            })
        }
    }

    fn check_interface_free(&self, endpoint: &str, interface: &str) -> Result<(), ModelError> {
        let ep = self.endpoint(endpoint)?;
        match ep.attachments.iter().find(|a| a.interface == interface) {
            Some(a) => Err(ModelError::InterfaceInUse {
                endpoint: endpoint.to_string(),
                interface: interface.to_string(),
                network: a.network.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Renames the interface of `endpoint`'s attachment to `network` (just made by
    /// `changes`) and puts the renamed endpoint into `changes`. Attachments stay sorted
    /// by `ethN` index, other names last, as `connect` expects.
    fn name_interface(
        &mut self,
        endpoint: &str,
        network: &str,
        interface: &str,
        changes: Vec<Change>,
    ) -> Vec<Change> {
        let Some(ep) = self.catalog.endpoints.get_mut(endpoint) else { return changes };
        if let Some(a) = ep.attachments.iter_mut().find(|a| a.network == network) {
            a.interface = interface.to_string();
        }
        ep.attachments.sort_by_key(|a| interface_index(&a.interface).unwrap_or(u32::MAX));
        let renamed = ep.clone();
        changes
            .into_iter()
            .map(|c| match c {
                Change::PutEndpoint(e) if e.name == endpoint => {
                    Change::PutEndpoint(renamed.clone())
                }
                other => other,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::state::fixtures::state_with;

    fn state() -> State {
        state_with(
            &[("h1", "192.0.2.1"), ("h2", "192.0.2.2")],
            &[("web", "10.0.1.0/24"), ("db", "10.0.2.0/24")],
        )
    }

    fn create(name: &str, host: &str, network: &str, interface: &str) -> Command {
        Command::CreateEndpointAs {
            name: name.into(),
            host: host.into(),
            network: network.into(),
            ip: None,
            aliases: vec![],
            interface: interface.into(),
        }
    }

    fn connect(network: &str, endpoint: &str, interface: &str, host: &str) -> Command {
        Command::ConnectAs {
            network: network.into(),
            endpoint: endpoint.into(),
            ip: None,
            aliases: vec![],
            interface: Some(interface.into()),
            host: Some(host.into()),
        }
    }

    fn interfaces(s: &State, endpoint: &str) -> Vec<(String, String)> {
        s.catalog.endpoints[endpoint]
            .attachments
            .iter()
            .map(|a| (a.interface.clone(), a.network.clone()))
            .collect()
    }

    #[test]
    fn the_runtime_names_the_interfaces() {
        let mut s = state();
        let applied = s.apply(&create("c1", "h1", "web", "net0")).unwrap();
        // The change carries the renamed endpoint, exactly what the catalog holds.
        assert_eq!(applied.changes, vec![Change::PutEndpoint(s.catalog.endpoints["c1"].clone())]);
        assert_eq!(interfaces(&s, "c1"), vec![("net0".into(), "web".into())]);
        s.apply(&connect("db", "c1", "eth1", "h1")).unwrap();
        // ethN first, other names last.
        assert_eq!(
            interfaces(&s, "c1"),
            vec![("eth1".into(), "db".into()), ("net0".into(), "web".into())]
        );
        // Podman's order: eth0 then eth1.
        s.apply(&create("c2", "h1", "web", "eth0")).unwrap();
        s.apply(&connect("db", "c2", "eth1", "h1")).unwrap();
        assert_eq!(
            interfaces(&s, "c2"),
            vec![("eth0".into(), "web".into()), ("eth1".into(), "db".into())]
        );
    }

    #[test]
    fn bad_or_taken_interface_names_are_refused_and_change_nothing() {
        let mut s = state();
        for bad in ["", "lo", "a/b", "a b", "x:1", "..", "sixteen-chars-xx"] {
            assert_eq!(
                s.apply(&create("c1", "h1", "web", bad)),
                Err(ModelError::InvalidInterface(bad.into()))
            );
        }
        s.apply(&create("c1", "h1", "web", "eth0")).unwrap();
        let before = s.clone();
        assert_eq!(
            s.apply(&connect("db", "c1", "eth0", "h1")),
            Err(ModelError::InterfaceInUse {
                endpoint: "c1".into(),
                interface: "eth0".into(),
                network: "web".into()
            })
        );
        assert_eq!(s, before);
        assert_eq!(s.catalog.revision, before.catalog.revision);
    }

    #[test]
    fn guarded_commands_touch_only_endpoints_on_their_host() {
        let mut s = state();
        s.apply(&create("c1", "h1", "web", "eth0")).unwrap();
        let before = s.clone();
        let other = |asked: &str| ModelError::EndpointOnOtherHost {
            endpoint: "c1".into(),
            host: "h1".into(),
            asked: asked.into(),
        };
        assert_eq!(s.apply(&connect("db", "c1", "eth1", "h2")), Err(other("h2")));
        let disconnect = Command::DisconnectOn {
            network: "web".into(),
            endpoint: "c1".into(),
            host: "h2".into(),
        };
        assert_eq!(s.apply(&disconnect), Err(other("h2")));
        let remove =
            |host: &str| Command::RemoveEndpointOn { name: "c1".into(), host: host.into() };
        assert_eq!(s.apply(&remove("h2")), Err(other("h2")));
        assert_eq!(s, before);
        assert_eq!(
            s.apply(&Command::RemoveEndpointOn { name: "gone".into(), host: "h1".into() }),
            Err(ModelError::EndpointNotFound("gone".into()))
        );
        s.apply(&connect("db", "c1", "eth1", "h1")).unwrap();
        let disconnect = Command::DisconnectOn {
            network: "db".into(),
            endpoint: "c1".into(),
            host: "h1".into(),
        };
        s.apply(&disconnect).unwrap();
        s.apply(&remove("h1")).unwrap();
        assert!(s.catalog.endpoints.is_empty());
        assert_eq!(other("h2").kind(), crate::error::ErrorKind::PermissionDenied);
    }

    #[test]
    fn an_unguarded_connect_without_a_name_is_the_ordinary_connect() {
        let mut s = state();
        s.apply(&create("c1", "h1", "web", "eth0")).unwrap();
        s.apply(&Command::ConnectAs {
            network: "db".into(),
            endpoint: "c1".into(),
            ip: None,
            aliases: vec![],
            interface: None,
            host: None,
        })
        .unwrap();
        assert_eq!(
            interfaces(&s, "c1"),
            vec![("eth0".into(), "web".into()), ("eth1".into(), "db".into())]
        );
    }

    /// Raft logs store commands with postcard, which names a variant by its position:
    /// the container commands come after every older one.
    #[test]
    fn container_commands_come_after_the_older_variants() {
        let first = |c: &Command| postcard::to_stdvec(c).ok().and_then(|b| b.first().copied());
        let join = Command::SetJoinToken { nonce: [0; 16], hash: [0; 32] };
        let older = first(&join).unwrap();
        assert!(first(&create("c", "h", "n", "eth0")).unwrap() > older);
        let remove = Command::RemoveEndpointOn { name: "c".into(), host: "h".into() };
        assert!(first(&remove).unwrap() > older);
    }
}
