//! Conversions between the generated gRPC types and `overlay-model`.
//!
//! Model → wire is total. Wire → model (used by watchers such as the agent) validates and
//! returns `ModelError` naming the bad value, because the bytes come from the network.

use overlay_model::names::is_dns_label;
use overlay_model::{
    parse, Attachment, Change, Endpoint, Host, ModelError, NameEntry, Network, Route,
};

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
            Change::PutNames(entries) => Kind::PutNames(pack_names(entries)),
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
            Kind::PutNames(names) => Change::PutNames(unpack_names(names)?),
        })
    }
}

/// `entries` in the wire's packed form (see `EndpointNames` in the proto).
pub fn pack_names<'a>(entries: impl IntoIterator<Item = &'a NameEntry>) -> pb::EndpointNames {
    let mut packed = Vec::new();
    for e in entries {
        packed.extend_from_slice(e.name.as_bytes());
        for alias in &e.aliases {
            packed.push(b' ');
            packed.extend_from_slice(alias.as_bytes());
        }
        packed.push(b'\n');
    }
    pb::EndpointNames { entries: packed }
}

/// The entries of a packed `EndpointNames`; every name and alias must be a DNS label.
pub fn unpack_names(names: &pb::EndpointNames) -> Result<Vec<NameEntry>, ModelError> {
    let mut out = Vec::new();
    for line in names.entries.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let mut words = line.split(|&b| b == b' ').map(|w| {
            std::str::from_utf8(w)
                .ok()
                .filter(|w| is_dns_label(w))
                .map(str::to_string)
                .ok_or_else(|| ModelError::InvalidName(String::from_utf8_lossy(w).into_owned()))
        });
        let name = words.next().unwrap_or_else(|| Err(ModelError::InvalidName(String::new())))?;
        let aliases = words.collect::<Result<Vec<_>, _>>()?;
        out.push(NameEntry { name, aliases });
    }
    Ok(out)
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
            Change::PutNames(vec![
                NameEntry { name: "web-1".into(), aliases: vec!["web".into(), "www".into()] },
                NameEntry { name: "db".into(), aliases: vec![] },
            ]),
        ];
        for change in changes {
            let wire = pb::Change::from(&change);
            assert_eq!(Change::try_from(&wire).unwrap(), change);
        }
    }

    #[test]
    fn packed_names_are_checked_word_by_word() {
        let packed = |s: &str| pb::EndpointNames { entries: s.as_bytes().to_vec() };
        assert_eq!(pack_names(&[]).entries, b"");
        assert_eq!(unpack_names(&packed("a b\n\nc\n")).unwrap().len(), 2, "empty lines skipped");
        assert_eq!(
            unpack_names(&packed("ok Bad\n")),
            Err(ModelError::InvalidName("Bad".into())),
            "the bad word is named"
        );
        assert!(unpack_names(&packed("a  b\n")).is_err(), "an empty word is not a label");
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
