//! The bridge shortcut: table `netdev overlay`, which hands known unicast frames of a
//! VXLAN network straight from the device they arrive on to the one they leave by, at
//! that device's ingress hook (`fwd`), before the bridge sees them.
//!
//! Why: where `br_netfilter` is loaded and `net.bridge.bridge-nf-call-iptables` is on
//! (Docker and Kubernetes hosts need it on, podman loads the module), every IPv4 frame
//! a bridge forwards also goes through the ip-family netfilter hooks — ~15 % of a
//! stream's CPU, which the agent's `notrack` rules cannot take back, and which only the
//! namespace-wide switch turns off (see `firewall`). Frames that skip the bridge skip
//! that too: the shortcut alone runs at the kernel's bare VXLAN speed on any host (what
//! is left is the host firewall's hooks on the encapsulated packets: `bench/README.md`,
//! "What the host firewall costs the data plane").
//!
//! What goes where, per network (rendered per device, from the desired state):
//! * a frame from a local endpoint's veth to another local endpoint's MAC: to that veth;
//! * to a MAC of this network that is local but whose veth is not there yet: left to the
//!   bridge (never sent away);
//! * to any other unicast MAC but the gateway's: to the network's vxlan device, whose own
//!   FDB sends it to the right host (or floods it to the network's hosts, as the bridge
//!   would for a MAC it does not know). Frames for the gateway MAC (routed by the host)
//!   and broadcast/multicast frames go through the bridge as before;
//! * a frame from the vxlan device to a local endpoint's MAC: to that veth.
//!
//! Isolation is kept: a network's chains only ever forward to that network's devices.
//! `--encap udp` networks (TAP uplinks, user space) keep the bridge path.
//!
//! Like the firewall, the table is rendered as text (pure), installed whole with one
//! `nft -f -` batch, and carries its digest as its comment. A device named in a rule or
//! map is resolved to its index when the table is loaded, so the table is installed
//! again whenever a device it names is created (again), and only devices that exist or
//! are created in the same pass are named. It is an optimisation only: when it cannot be
//! installed the table is removed, and every frame takes the bridge.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use crate::desired::{HostDesired, Uplink};
use crate::firewall::{self, Ruleset};

pub const FAMILY: &str = "netdev";

/// Renders the table for `desired`, naming only the devices in `present` (pure).
pub fn render(desired: &HostDesired, present: &BTreeSet<&str>) -> Ruleset {
    let mut body = String::new();
    let mut rules = 0;
    for nd in desired.networks.values().filter(|n| n.uplink_kind == Uplink::Vxlan) {
        let ports: Vec<(&str, String)> = desired
            .endpoints
            .values()
            .flat_map(|ed| &ed.interfaces)
            .filter(|i| i.network == nd.name)
            .map(|i| (i.host_name.as_str(), i.mac.to_string()))
            .collect();
        if ports.is_empty() {
            continue;
        }
        let vni = nd.vni;
        let locals: Vec<&str> = ports.iter().map(|(_, mac)| mac.as_str()).collect();
        let here: Vec<String> = ports
            .iter()
            .filter(|(dev, _)| present.contains(dev))
            .map(|(dev, mac)| format!("{mac} : \"{dev}\""))
            .collect();
        let _ = writeln!(body, "\tset locals-{vni} {{\n\t\ttype ether_addr");
        let _ = writeln!(body, "\t\telements = {{ {} }}\n\t}}", locals.join(", "));
        let _ = writeln!(body, "\tmap ports-{vni} {{\n\t\ttype ether_addr : iface_index");
        if !here.is_empty() {
            let _ = writeln!(body, "\t\telements = {{ {} }}", here.join(", "));
        }
        body.push_str("\t}\n");
        let uplink = present.contains(nd.uplink.as_str()).then_some(nd.uplink.as_str());
        let mut chain = |dev: &str, lines: &[String]| {
            let _ = writeln!(
                body,
                "\tchain {dev} {{\n\t\ttype filter hook ingress device \"{dev}\" priority filter; policy accept;"
            );
            for l in lines {
                let _ = writeln!(body, "\t\t{l}");
                rules += 1;
            }
            body.push_str("\t}\n");
        };
        for (dev, _) in ports.iter().filter(|(dev, _)| present.contains(dev)) {
            let mut lines = vec![
                "meta pkttype { broadcast, multicast } return".to_string(),
                format!("fwd to ether daddr map @ports-{vni}"),
            ];
            if let Some(uplink) = uplink {
                lines.push(format!("ether daddr @locals-{vni} return"));
                lines.push(format!("ether daddr != {} fwd to \"{uplink}\"", nd.bridge_mac));
            }
            chain(dev, &lines);
        }
        if let Some(uplink) = uplink {
            chain(uplink, &[format!("fwd to ether daddr map @ports-{vni}")]);
        }
    }
    Ruleset::new(FAMILY, body, rules)
}

/// Every device `render` may name for `desired`: a plan that creates one of them again
/// must install the table again (the kernel resolved the old device's index).
pub fn devices(desired: &HostDesired) -> BTreeSet<&str> {
    let mut out = BTreeSet::new();
    for nd in desired.networks.values().filter(|n| n.uplink_kind == Uplink::Vxlan) {
        out.insert(nd.uplink.as_str());
    }
    let vxlan: BTreeSet<&str> = desired
        .networks
        .values()
        .filter(|n| n.uplink_kind == Uplink::Vxlan)
        .map(|n| n.name.as_str())
        .collect();
    for i in desired.endpoints.values().flat_map(|ed| &ed.interfaces) {
        if vxlan.contains(i.network.as_str()) {
            out.insert(i.host_name.as_str());
        }
    }
    out
}

/// Installs `ruleset`; when that fails, removes the table, so that no frame follows an
/// outdated one (which could send a new local endpoint's frames away), and says why.
pub fn install(ruleset: &Ruleset) -> Result<(), String> {
    firewall::install(ruleset).map_err(|e| match firewall::remove(FAMILY) {
        Ok(()) => format!("{e} (removed the shortcut: frames take the bridge)"),
        Err(r) => format!("{e}; removing the old table failed too: {r}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::desired_for_host;
    use crate::desired::tests::{catalog, local};

    fn rendered(present: &[&str]) -> (HostDesired, Ruleset) {
        let d = desired_for_host(&catalog(), &local("h1", "192.0.2.1"));
        let present: BTreeSet<&str> = present.iter().copied().collect();
        let r = render(&d, &present);
        (d, r)
    }

    #[test]
    fn known_unicast_skips_the_bridge_within_its_network_only() {
        let (d, _) = rendered(&[]);
        let all: Vec<&str> = devices(&d).into_iter().collect();
        let (_, r) = rendered(&all);
        let web = &d.endpoints["web"].interfaces[0];
        let net = &d.networks[&web.network];
        let vni = net.vni;
        assert!(r.body.contains(&format!("set locals-{vni} {{")), "{}", r.body);
        assert!(r.body.contains(&format!("{} : \"{}\"", web.mac, web.host_name)), "{}", r.body);
        // The veth's chain: broadcast to the bridge, local MACs to their veth, the rest
        // (but the gateway's) to this network's vxlan device.
        let chain = r.body.split(&format!("chain {} {{", web.host_name)).nth(1).expect("chain");
        let chain = chain.split("\t}").next().expect("end");
        assert!(chain.contains("meta pkttype { broadcast, multicast } return"));
        assert!(chain.contains(&format!("fwd to ether daddr map @ports-{vni}")));
        assert!(chain.contains(&format!("ether daddr @locals-{vni} return")));
        assert!(
            chain.contains(&format!("ether daddr != {} fwd to \"{}\"", net.bridge_mac, net.uplink))
        );
        // Every fwd of this chain stays in the network.
        for other in d.networks.values().filter(|n| n.name != net.name) {
            assert!(!chain.contains(&other.uplink), "{chain}");
            assert!(!chain.contains(&format!("-{} ", other.vni)), "{chain}");
        }
        assert!(r.body.contains(&format!("chain {} {{", net.uplink)));
        assert_eq!(r.family, FAMILY);
    }

    #[test]
    fn only_present_devices_are_named() {
        let (d, none) = rendered(&[]);
        // No device yet: the local MACs are known, no chain and no port is named.
        assert_eq!(none.rules, 0);
        assert!(!none.body.contains("chain"));
        assert!(!none.body.contains('"'), "{}", none.body);
        // The veth without its uplink: local frames only, nothing sent to a missing one.
        let web = &d.endpoints["web"].interfaces[0];
        let (_, veth_only) = rendered(&[web.host_name.as_str()]);
        assert!(veth_only.body.contains(&format!("chain {} {{", web.host_name)));
        assert!(!veth_only.body.contains(" fwd to \"ov"), "{}", veth_only.body);
        assert_ne!(none.digest, veth_only.digest);
    }

    #[test]
    fn udp_networks_keep_the_bridge() {
        let mut cat = catalog();
        for n in cat.networks.values_mut() {
            n.encap = overlay_model::Encap::Udp;
        }
        let d = desired_for_host(&cat, &local("h1", "192.0.2.1"));
        assert!(devices(&d).is_empty());
        let all: BTreeSet<&str> = d.networks.values().map(|n| n.uplink.as_str()).collect();
        assert_eq!(render(&d, &all).rules, 0);
    }
}
