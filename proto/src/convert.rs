//! Conversions between the generated gRPC types and `overlay-model`.
//!
//! Model → wire is total. Wire → model (used by watchers such as the agent) validates and
//! returns `ModelError` naming the bad value, because the bytes come from the network.

use overlay_model::{parse, Attachment, Change, Endpoint, Host, ModelError, Network, Route};

use crate::pb;

impl From<&Attachment> for pb::Attachment {
    fn from(a: &Attachment) -> Self {
        pb::Attachment {
            network: a.network.clone(),
            interface: a.interface.clone(),
            ip: a.ip.to_string(),
            mac: a.mac.to_string(),
            aliases: a.aliases.clone(),
        }
    }
}

impl From<&Endpoint> for pb::Endpoint {
    fn from(e: &Endpoint) -> Self {
        pb::Endpoint {
            name: e.name.clone(),
            host: e.host.clone(),
            attachments: e.attachments.iter().map(pb::Attachment::from).collect(),
            // Filled by the controller's reads (not part of the desired state).
            status: String::new(),
            reason: String::new(),
        }
    }
}

/// A network without its endpoint list (see [`network_with_endpoints`]).
impl From<&Network> for pb::Network {
    fn from(n: &Network) -> Self {
        pb::Network {
            name: n.name.clone(),
            subnet: n.subnet.to_string(),
            gateway: n.gateway.to_string(),
            vni: n.vni,
            mtu: n.mtu,
            encap: n.encap.to_string(),
            internal: n.internal,
            encrypted: n.encrypted,
            endpoints: Vec::new(),
        }
    }
}

/// A network with the endpoints attached to it, as `network inspect` shows it.
pub fn network_with_endpoints<'a>(
    n: &Network,
    attached: impl IntoIterator<Item = (&'a Endpoint, &'a Attachment)>,
) -> pb::Network {
    let mut out = pb::Network::from(n);
    out.endpoints = attached
        .into_iter()
        .map(|(e, a)| pb::NetworkEndpoint {
            name: e.name.clone(),
            host: e.host.clone(),
            interface: a.interface.clone(),
            ip: a.ip.to_string(),
            mac: a.mac.to_string(),
            aliases: a.aliases.clone(),
        })
        .collect();
    out
}

/// A route with the address its `via` endpoint has in the route's network.
pub fn route(r: &Route, via_ip: Option<std::net::Ipv4Addr>) -> pb::Route {
    pb::Route {
        network: r.network.clone(),
        destination: r.destination.to_string(),
        via: r.via.clone(),
        via_ip: via_ip.map(|ip| ip.to_string()).unwrap_or_default(),
    }
}

/// A host with its endpoint count and the leader's last heartbeat (unix ms, 0: never).
pub fn host(h: &Host, endpoints: u32, last_seen_ms: i64) -> pb::Host {
    pb::Host {
        name: h.name.clone(),
        underlay_ip: h.underlay_ip.to_string(),
        status: h.status.to_string(),
        endpoints,
        last_seen_ms,
        underlay_mtu: h.underlay_mtu,
        underlay_prefix: u32::from(h.underlay_prefix),
        reason: String::new(),
    }
}

impl From<&Change> for pb::Change {
    fn from(c: &Change) -> Self {
        use pb::change::Kind;
        let kind = match c {
            Change::PutNetwork(n) => Kind::PutNetwork(n.into()),
            Change::DeleteNetwork(name) => Kind::DeleteNetwork(name.clone()),
            Change::PutEndpoint(e) => Kind::PutEndpoint(e.into()),
            Change::DeleteEndpoint(name) => Kind::DeleteEndpoint(name.clone()),
            // Watchers derive via_ip from the endpoints they hold.
            Change::PutRoute(r) => Kind::PutRoute(route(r, None)),
            Change::DeleteRoute((network, destination)) => Kind::DeleteRoute(pb::RouteKey {
                network: network.clone(),
                destination: destination.to_string(),
            }),
            Change::PutHost(h) => Kind::PutHost(host(h, 0, 0)),
            Change::DeleteHost(name) => Kind::DeleteHost(name.clone()),
        };
        pb::Change { kind: Some(kind) }
    }
}

impl TryFrom<&pb::Attachment> for Attachment {
    type Error = ModelError;
    fn try_from(a: &pb::Attachment) -> Result<Self, Self::Error> {
        Ok(Attachment {
            network: a.network.clone(),
            interface: a.interface.clone(),
            ip: parse::ipv4(&a.ip)?,
            mac: a.mac.parse()?,
            aliases: a.aliases.clone(),
        })
    }
}

impl TryFrom<&pb::Endpoint> for Endpoint {
    type Error = ModelError;
    fn try_from(e: &pb::Endpoint) -> Result<Self, Self::Error> {
        Ok(Endpoint {
            name: e.name.clone(),
            host: e.host.clone(),
            attachments: e
                .attachments
                .iter()
                .map(Attachment::try_from)
                .collect::<Result<_, _>>()?,
        })
    }
}

impl TryFrom<&pb::Network> for Network {
    type Error = ModelError;
    fn try_from(n: &pb::Network) -> Result<Self, Self::Error> {
        Ok(Network {
            name: n.name.clone(),
            subnet: parse::cidr(&n.subnet)?,
            gateway: parse::ipv4(&n.gateway)?,
            vni: n.vni,
            mtu: n.mtu,
            encap: n.encap.parse()?,
            encrypted: n.encrypted,
            internal: n.internal,
        })
    }
}

impl TryFrom<&pb::Route> for Route {
    type Error = ModelError;
    fn try_from(r: &pb::Route) -> Result<Self, Self::Error> {
        Ok(Route {
            network: r.network.clone(),
            destination: parse::cidr(&r.destination)?,
            via: r.via.clone(),
        })
    }
}

impl TryFrom<&pb::Host> for Host {
    type Error = ModelError;
    fn try_from(h: &pb::Host) -> Result<Self, Self::Error> {
        Ok(Host {
            name: h.name.clone(),
            underlay_ip: parse::ipv4(&h.underlay_ip)?,
            underlay_mtu: h.underlay_mtu,
            status: h.status.parse()?,
            status_changed_ms: 0,
            underlay_prefix: u8::try_from(h.underlay_prefix).ok().filter(|p| *p <= 32).ok_or_else(
                || ModelError::InvalidCidr(format!("{}/{}", h.underlay_ip, h.underlay_prefix)),
            )?,
        })
    }
}

/// Why a change from the wire could not be understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeError {
    Empty,
    Invalid(ModelError),
}

impl std::fmt::Display for ChangeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChangeError::Empty => f.write_str("change without a kind"),
            ChangeError::Invalid(e) => write!(f, "invalid change: {e}"),
        }
    }
}

impl std::error::Error for ChangeError {}

impl From<ModelError> for ChangeError {
    fn from(e: ModelError) -> Self {
        ChangeError::Invalid(e)
    }
}

impl TryFrom<&pb::Change> for Change {
    type Error = ChangeError;
    fn try_from(c: &pb::Change) -> Result<Self, Self::Error> {
        use pb::change::Kind;
        Ok(match c.kind.as_ref().ok_or(ChangeError::Empty)? {
            Kind::PutNetwork(n) => Change::PutNetwork(n.try_into()?),
            Kind::DeleteNetwork(name) => Change::DeleteNetwork(name.clone()),
            Kind::PutEndpoint(e) => Change::PutEndpoint(e.try_into()?),
            Kind::DeleteEndpoint(name) => Change::DeleteEndpoint(name.clone()),
            Kind::PutRoute(r) => Change::PutRoute(r.try_into()?),
            Kind::DeleteRoute(k) => {
                Change::DeleteRoute((k.network.clone(), parse::cidr(&k.destination)?))
            }
            Kind::PutHost(h) => Change::PutHost(h.try_into()?),
            Kind::DeleteHost(name) => Change::DeleteHost(name.clone()),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use overlay_model::{Encap, HostStatus, Mac};

    #[test]
    fn changes_round_trip_through_the_wire() {
        let endpoint = Endpoint {
            name: "s1".into(),
            host: "h1".into(),
            attachments: vec![Attachment {
                network: "backend".into(),
                interface: "eth0".into(),
                ip: "10.0.1.2".parse().unwrap(),
                mac: Mac::from_counter(7),
                aliases: vec!["db".into()],
            }],
        };
        let network = Network {
            name: "backend".into(),
            subnet: "10.0.1.0/24".parse().unwrap(),
            gateway: "10.0.1.1".parse().unwrap(),
            vni: 4096,
            mtu: 1450,
            encap: Encap::Vxlan,
            encrypted: false,
            internal: true,
        };
        let host = Host {
            name: "h1".into(),
            underlay_ip: "192.0.2.1".parse().unwrap(),
            underlay_mtu: 1500,
            status: HostStatus::Ready,
            status_changed_ms: 0,
            underlay_prefix: 24,
        };
        let route = Route {
            network: "backend".into(),
            destination: "10.0.2.0/24".parse().unwrap(),
            via: "gw".into(),
        };
        let changes = vec![
            Change::PutNetwork(network),
            Change::PutEndpoint(endpoint),
            Change::PutHost(host),
            Change::PutRoute(route.clone()),
            Change::DeleteRoute(route.key()),
            Change::DeleteEndpoint("s1".into()),
            Change::DeleteNetwork("backend".into()),
            Change::DeleteHost("h1".into()),
        ];
        for change in changes {
            let wire = pb::Change::from(&change);
            assert_eq!(Change::try_from(&wire).unwrap(), change);
        }
    }

    #[test]
    fn bad_wire_values_are_named() {
        let wire = pb::Change {
            kind: Some(pb::change::Kind::DeleteRoute(pb::RouteKey {
                network: "n".into(),
                destination: "10.0.0.0/99".into(),
            })),
        };
        assert_eq!(
            Change::try_from(&wire),
            Err(ChangeError::Invalid(ModelError::InvalidCidr("10.0.0.0/99".into())))
        );
        assert_eq!(Change::try_from(&pb::Change { kind: None }), Err(ChangeError::Empty));
        let host = pb::Host {
            name: "h1".into(),
            underlay_ip: "192.0.2.1".into(),
            status: "ready".into(),
            underlay_prefix: 33,
            ..Default::default()
        };
        let wire = pb::Change { kind: Some(pb::change::Kind::PutHost(host)) };
        assert_eq!(
            Change::try_from(&wire),
            Err(ChangeError::Invalid(ModelError::InvalidCidr("192.0.2.1/33".into())))
        );
    }
}
