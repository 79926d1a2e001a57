//! The CNI decisions, without I/O (pure): what an ADD becomes (create the endpoint,
//! connect it, or nothing to do), whether an attachment is realised in the kernel, what
//! the plugin is told, and what a controller's refusal means to a runtime.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use overlay_cni::naming::endpoint_name;
use overlay_cni::protocol::{Attached, Failure, FailureKind, Request, RouteFact};
use overlay_cni::spec::DNS_SERVER;
use overlay_model::{Catalog, Mac};

use super::registry::{Phase, Record, Registry};
use crate::desired::veth_name;
use crate::observed::NsObs;

/// What an ADD does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddPlan {
    /// A new container: its endpoint `endpoint`, created on this host.
    Create { endpoint: String },
    /// A further network of a container already attached (podman: eth1, eth2, …).
    Connect { endpoint: String },
    /// Exactly this attachment exists already (an ADD repeated): report it.
    Already { endpoint: String },
}

/// Decides an ADD on this host from the records and the desired state as this agent
/// has it.
pub fn plan_add(req: &Request, registry: &Registry, catalog: &Catalog) -> Result<AddPlan, Failure> {
    if !catalog.networks.contains_key(&req.network) {
        return Err(Failure::new(
            FailureKind::UnknownNetwork,
            format!("network {} does not exist", req.network),
        )
        .with_details(
            "create it with `overlayctl network create`, or fix `network` in the CNI configuration",
        ));
    }
    if let Some(r) = registry.get(&req.container_id) {
        let refused = |msg: String| Err(Failure::new(FailureKind::Refused, msg));
        if r.phase != Phase::Attached {
            return refused(format!(
                "container {} is still being {} (endpoint {}); try again",
                req.container_id,
                if r.phase == Phase::Attaching { "attached" } else { "detached" },
                r.endpoint
            ));
        }
        return match r.interfaces.get(&req.ifname) {
            Some(network) if *network == req.network => {
                Ok(AddPlan::Already { endpoint: r.endpoint.clone() })
            }
            Some(network) => refused(format!(
                "interface {} of container {} (endpoint {}) is already attached to network {network}",
                req.ifname, req.container_id, r.endpoint
            )),
            None => match r.interfaces.iter().find(|(_, n)| **n == req.network) {
                Some((ifname, _)) => refused(format!(
                    "container {} (endpoint {}) is already attached to network {} as {ifname}",
                    req.container_id, r.endpoint, req.network
                )),
                None => Ok(AddPlan::Connect { endpoint: r.endpoint.clone() }),
            },
        };
    }
    let name = endpoint_name(req.pod_name.as_deref(), &req.container_id);
    let from = match &req.pod_name {
        Some(pod) => format!("the container name {pod:?}"),
        None => format!("the container ID {}", req.container_id),
    };
    // Endpoints on networks this host does not carry are known by name only.
    let on = match catalog.endpoints.get(&name) {
        Some(existing) => Some(format!("on host {}", existing.host)),
        None => catalog.names.contains_key(&name).then(|| "on another host".to_string()),
    };
    if let Some(on) = on {
        return Err(Failure::new(
            FailureKind::NameClash,
            format!("endpoint {name} already exists ({on})"),
        )
        .with_details(format!(
            "the name comes from {from}; endpoint names are unique in the cluster: run the container under another name, or remove the other endpoint"
        )));
    }
    if let Some(other) = registry.by_endpoint(&name) {
        return Err(Failure::new(
            FailureKind::NameClash,
            format!("endpoint {name} belongs to container {} on this host", other.container_id),
        )
        .with_details(format!("the name comes from {from}")));
    }
    Ok(AddPlan::Create { endpoint: name })
}

/// What the endpoint's attachment to `network` should look like, from the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    pub endpoint: String,
    pub interface: String,
    pub address: Ipv4Network,
    pub mac: Mac,
    pub gateway: Ipv4Addr,
    pub internal: bool,
}

/// The attachment of `endpoint` to `network` on `host` as the catalog has it, if the
/// catalog has it with interface `ifname`.
pub fn expected(
    catalog: &Catalog,
    host: &str,
    endpoint: &str,
    network: &str,
    ifname: &str,
) -> Option<Expected> {
    let ep = catalog.endpoints.get(endpoint).filter(|e| e.host == host)?;
    let att = ep.attachment(network).filter(|a| a.interface == ifname)?;
    let net = catalog.networks.get(network)?;
    Some(Expected {
        endpoint: endpoint.to_string(),
        interface: ifname.to_string(),
        address: Ipv4Network::new(att.ip, net.subnet.prefix()).ok()?,
        mac: att.mac,
        gateway: net.gateway,
        internal: net.internal,
    })
}

/// The facts the plugin gets when `observed` (the container's namespace) has the
/// attachment as expected and its DNS is served; `Err` says what is still missing.
pub fn realized(
    want: &Expected,
    observed: &NsObs,
    dns_served: &BTreeSet<String>,
    host_mac: Option<Mac>,
) -> Result<Attached, String> {
    let Some(link) = observed.links.get(&want.interface) else {
        return Err(format!("no interface {} in the container yet", want.interface));
    };
    if !link.up {
        return Err(format!("{} is not up yet", want.interface));
    }
    if link.mac != Some(want.mac) {
        return Err(format!("{} does not have MAC {} yet", want.interface, want.mac));
    }
    if !link.addrs.contains(&want.address) {
        return Err(format!("{} does not have address {} yet", want.interface, want.address));
    }
    let default_route =
        observed.routes.iter().any(|r| r.dest.prefix() == 0 && r.via == want.gateway);
    if !want.internal && !default_route {
        return Err(format!("no default route via {} yet", want.gateway));
    }
    if !dns_served.contains(&want.endpoint) {
        return Err("the DNS at 127.0.0.11 is not serving it yet".into());
    }
    // Routes through this interface: their next hop is in its subnet.
    let routes = observed
        .routes
        .iter()
        .filter(|r| want.address.contains(r.via))
        .map(|r| RouteFact { dst: r.dest.to_string(), gw: r.via })
        .collect();
    Ok(Attached {
        endpoint: want.endpoint.clone(),
        interface: want.interface.clone(),
        mac: want.mac.to_string(),
        address: want.address.to_string(),
        gateway: want.gateway,
        routes,
        host_interface: veth_name(&want.endpoint, &want.interface),
        host_mac: host_mac.map(|m| m.to_string()),
        nameservers: vec![DNS_SERVER.to_string()],
    })
}

/// A controller's refusal (gRPC code and message) as the runtime's failure.
pub fn refusal(code: tonic::Code, message: &str) -> Failure {
    use tonic::Code;
    let kind = match code {
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => {
            FailureKind::ControllerUnreachable
        }
        Code::AlreadyExists => FailureKind::NameClash,
        Code::NotFound if message.starts_with("network ") => FailureKind::UnknownNetwork,
        Code::FailedPrecondition if message.contains("no free addresses") => {
            FailureKind::PoolExhausted
        }
        _ => FailureKind::Refused,
    };
    let message = if kind == FailureKind::ControllerUnreachable {
        format!("controller unreachable: {message}")
    } else {
        message.to_string()
    };
    Failure::new(kind, message)
}

/// The failure for "no controller could be asked", with the reason per URL.
pub fn unreachable(reasons: &[(String, String)]) -> Failure {
    let details: Vec<String> = reasons.iter().map(|(url, why)| format!("{url}: {why}")).collect();
    Failure::new(
        FailureKind::ControllerUnreachable,
        "controller unreachable: no controller answered, so the endpoint cannot be changed now",
    )
    .with_details(details.join("; "))
}

/// The record a new container starts with.
pub fn new_record(req: &Request, endpoint: &str) -> Record {
    Record {
        container_id: req.container_id.clone(),
        endpoint: endpoint.to_string(),
        netns: req.netns.clone(),
        inode: 0,
        interfaces: [(req.ifname.clone(), req.network.clone())].into_iter().collect(),
        phase: Phase::Attaching,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::desired::RouteSpec;
    use crate::observed::{LinkKind, LinkObs};
    use overlay_cni::protocol::{Op, PROTOCOL_VERSION};
    use overlay_model::{Attachment, Encap, Endpoint, Network};

    fn catalog() -> Catalog {
        let mut c = Catalog::default();
        for (name, subnet, gw, internal) in
            [("web", "10.0.1.0/24", "10.0.1.1", false), ("db", "10.0.2.0/24", "10.0.2.1", true)]
        {
            c.networks.insert(
                name.into(),
                Network {
                    name: name.into(),
                    subnet: subnet.parse().unwrap(),
                    gateway: gw.parse().unwrap(),
                    vni: 4096,
                    mtu: 1450,
                    encap: Encap::Vxlan,
                    encrypted: false,
                    internal,
                },
            );
        }
        c.endpoints.insert(
            "bare".into(),
            Endpoint {
                name: "bare".into(),
                host: "h2".into(),
                attachments: vec![Attachment {
                    network: "web".into(),
                    interface: "eth0".into(),
                    ip: "10.0.1.2".parse().unwrap(),
                    mac: Mac::from_counter(1),
                    aliases: vec![],
                }],
            },
        );
        c
    }

    fn req(id: &str, pod: Option<&str>, ifname: &str, network: &str) -> Request {
        Request {
            version: PROTOCOL_VERSION,
            op: Op::Add,
            container_id: id.into(),
            netns: "/run/netns/netns-x".into(),
            ifname: ifname.into(),
            network: network.into(),
            pod_name: pod.map(str::to_string),
            ip: None,
        }
    }

    fn registry(records: &[Record]) -> Registry {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("ov-cni-decide-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut r = Registry::open(&dir).unwrap();
        for rec in records {
            r.set(&rec.container_id, Some(rec.clone())).unwrap();
        }
        let _ = std::fs::remove_dir_all(&dir);
        r
    }

    #[test]
    fn a_new_container_is_created_under_its_name() {
        let c = catalog();
        let r = registry(&[]);
        assert_eq!(
            plan_add(&req("abc", Some("Web_1"), "eth0", "web"), &r, &c),
            Ok(AddPlan::Create { endpoint: "web-1".into() })
        );
        let id = "769efd9c47723aea1259647e04b5fe192a6b3da3efbb3be8a3befe552a557541";
        assert_eq!(
            plan_add(&req(id, None, "eth0", "web"), &r, &c),
            Ok(AddPlan::Create { endpoint: "769efd9c4772".into() })
        );
        let e = plan_add(&req("abc", Some("x"), "eth0", "nope"), &r, &c).unwrap_err();
        assert_eq!(e.kind, FailureKind::UnknownNetwork);
        assert_eq!(e.message, "network nope does not exist");
    }

    #[test]
    fn names_taken_elsewhere_are_refused_clearly() {
        let c = catalog();
        let e = plan_add(&req("abc", Some("bare"), "eth0", "web"), &registry(&[]), &c).unwrap_err();
        assert_eq!(e.kind, FailureKind::NameClash);
        assert_eq!(e.message, "endpoint bare already exists (on host h2)");
        assert!(e.details.contains("\"bare\""), "{}", e.details);
        let mut by_name = c.clone();
        std::sync::Arc::make_mut(&mut by_name.names).insert("far".into(), vec![]);
        let e = plan_add(&req("abc", Some("far"), "eth0", "web"), &registry(&[]), &by_name)
            .unwrap_err();
        assert_eq!(e.message, "endpoint far already exists (on another host)");
        let mut other = new_record(&req("other", Some("web1"), "eth0", "web"), "web1");
        other.phase = Phase::Attaching;
        let e = plan_add(&req("abc", Some("web1"), "eth0", "web"), &registry(&[other]), &c)
            .unwrap_err();
        assert_eq!(e.message, "endpoint web1 belongs to container other on this host");
    }

    #[test]
    fn further_networks_of_a_container_are_connected() {
        let c = catalog();
        let mut rec = new_record(&req("abc", Some("web1"), "eth0", "web"), "web1");
        rec.phase = Phase::Attached;
        let r = registry(&[rec.clone()]);
        assert_eq!(
            plan_add(&req("abc", Some("web1"), "eth1", "db"), &r, &c),
            Ok(AddPlan::Connect { endpoint: "web1".into() })
        );
        assert_eq!(
            plan_add(&req("abc", Some("web1"), "eth0", "web"), &r, &c),
            Ok(AddPlan::Already { endpoint: "web1".into() })
        );
        let e = plan_add(&req("abc", None, "eth0", "db"), &r, &c).unwrap_err();
        assert!(e.message.contains("already attached to network web"), "{}", e.message);
        let e = plan_add(&req("abc", None, "eth1", "web"), &r, &c).unwrap_err();
        assert!(e.message.ends_with("already attached to network web as eth0"), "{}", e.message);
        rec.phase = Phase::Detaching;
        let e = plan_add(&req("abc", None, "eth1", "db"), &registry(&[rec]), &c).unwrap_err();
        assert!(e.message.contains("being detached"), "{}", e.message);
    }

    fn ns_with(addr: &str, mac: Mac, routes: &[(&str, &str)]) -> NsObs {
        let mut link = LinkObs::new(LinkKind::Veth, 1450);
        link.up = true;
        link.mac = Some(mac);
        link.addrs.insert(addr.parse().unwrap());
        let mut ns = NsObs::default();
        ns.links.insert("eth0".into(), link);
        for (dest, via) in routes {
            ns.routes.insert(RouteSpec { dest: dest.parse().unwrap(), via: via.parse().unwrap() });
        }
        ns
    }

    #[test]
    fn realised_means_interface_address_route_and_dns() {
        let mut c = catalog();
        c.endpoints.get_mut("bare").unwrap().host = "h1".into();
        let want = expected(&c, "h1", "bare", "web", "eth0").unwrap();
        assert_eq!(expected(&c, "h2", "bare", "web", "eth0"), None);
        assert_eq!(expected(&c, "h1", "bare", "web", "eth1"), None);
        let mac = Mac::from_counter(1);
        let served: BTreeSet<String> = ["bare".to_string()].into();
        let routes =
            [("0.0.0.0/0", "10.0.1.1"), ("10.9.0.0/16", "10.0.1.7"), ("10.8.0.0/16", "10.0.2.7")];
        let ok = realized(&want, &ns_with("10.0.1.2/24", mac, &routes), &served, None).unwrap();
        assert_eq!(ok.address, "10.0.1.2/24");
        assert_eq!(ok.mac, "02:00:00:00:00:01");
        assert_eq!(ok.host_interface, veth_name("bare", "eth0"));
        assert_eq!(
            ok.routes,
            vec![
                RouteFact { dst: "0.0.0.0/0".into(), gw: "10.0.1.1".parse().unwrap() },
                RouteFact { dst: "10.9.0.0/16".into(), gw: "10.0.1.7".parse().unwrap() },
            ]
        );
        let e = realized(&want, &NsObs::default(), &served, None).unwrap_err();
        assert_eq!(e, "no interface eth0 in the container yet");
        let e = realized(&want, &ns_with("10.0.1.2/24", mac, &[]), &served, None).unwrap_err();
        assert_eq!(e, "no default route via 10.0.1.1 yet");
        let e = realized(&want, &ns_with("10.0.1.2/24", mac, &routes), &BTreeSet::new(), None)
            .unwrap_err();
        assert!(e.contains("DNS"), "{e}");
        let e = realized(&want, &ns_with("10.0.1.3/24", mac, &routes), &served, None).unwrap_err();
        assert!(e.contains("10.0.1.2/24"), "{e}");
    }

    #[test]
    fn controller_refusals_keep_their_words_and_get_a_kind() {
        use tonic::Code;
        let f = refusal(
            Code::FailedPrecondition,
            "network web (10.0.1.0/30) has no free addresses left",
        );
        assert_eq!(f.kind, FailureKind::PoolExhausted);
        assert_eq!(f.message, "network web (10.0.1.0/30) has no free addresses left");
        assert_eq!(
            refusal(Code::AlreadyExists, "endpoint x already exists").kind,
            FailureKind::NameClash
        );
        assert_eq!(
            refusal(Code::NotFound, "network web not found").kind,
            FailureKind::UnknownNetwork
        );
        assert_eq!(
            refusal(Code::InvalidArgument, "IP 10.0.9.1 is not …").kind,
            FailureKind::Refused
        );
        let f = refusal(Code::Unavailable, "no leader");
        assert_eq!(
            (f.kind, f.message.as_str()),
            (FailureKind::ControllerUnreachable, "controller unreachable: no leader")
        );
        let f = unreachable(&[("https://192.0.2.1:7400".into(), "connection refused".into())]);
        assert!(f.message.starts_with("controller unreachable"), "{}", f.message);
        assert_eq!(f.details, "https://192.0.2.1:7400: connection refused");
    }
}
