//! Compact catalog construction for this crate's tests, its fuzz test and the benchmark
//! server. Not part of the API the agent uses; panics on malformed literals.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use overlay_model::{Attachment, Catalog, Encap, Endpoint, Mac, Network, Route};

/// `(name, subnet, internal)`.
pub type NetSpec<'a> = (&'a str, &'a str, bool);
/// `(network, ip, aliases)`.
pub type AttSpec<'a> = (&'a str, &'a str, &'a [&'a str]);
/// `(name, attachments)`.
pub type EpSpec<'a> = (&'a str, &'a [AttSpec<'a>]);
/// `(network, destination, via)`.
pub type RouteSpec<'a> = (&'a str, &'a str, &'a str);

/// Builds a catalog from literals.
pub fn catalog(nets: &[NetSpec<'_>], eps: &[EpSpec<'_>], routes: &[RouteSpec<'_>]) -> Catalog {
    let mut cat = Catalog { revision: 1, ..Catalog::default() };
    for (i, &(name, subnet, internal)) in nets.iter().enumerate() {
        let subnet: Ipv4Network = subnet.parse().unwrap();
        let gateway = Ipv4Addr::from(u32::from(subnet.network()) + 1);
        cat.networks.insert(
            name.to_string(),
            Network {
                name: name.to_string(),
                subnet,
                gateway,
                vni: 4096 + i as u32,
                mtu: 1450,
                encap: Encap::Vxlan,
                encrypted: false,
                internal,
            },
        );
    }
    let mut mac = 0;
    for &(name, atts) in eps {
        let attachments = atts
            .iter()
            .enumerate()
            .map(|(i, &(network, ip, aliases))| {
                mac += 1;
                Attachment {
                    network: network.to_string(),
                    interface: format!("eth{i}"),
                    ip: ip.parse().unwrap(),
                    mac: Mac::from_counter(mac),
                    aliases: aliases.iter().map(|a| a.to_string()).collect(),
                }
            })
            .collect();
        let ep = Endpoint { name: name.to_string(), host: "h1".to_string(), attachments };
        cat.endpoints.insert(name.to_string(), ep);
    }
    for &(network, destination, via) in routes {
        let route = Route {
            network: network.to_string(),
            destination: destination.parse().unwrap(),
            via: via.to_string(),
        };
        cat.routes.insert(route.key(), route);
    }
    cat
}

/// The benchmark's catalog: network `bench` (10.89.0.0/16), endpoint `client` at
/// 10.89.0.2, and `count` endpoints `ep0`… from 10.89.1.0 on.
pub fn bench_catalog(count: u32) -> Catalog {
    let names: Vec<String> = (0..count).map(|i| format!("ep{i}")).collect();
    let ips: Vec<String> = (0..count)
        .map(|i| Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 89, 1, 0)) + i).to_string())
        .collect();
    let atts: Vec<[AttSpec<'_>; 1]> =
        ips.iter().map(|ip| [("bench", ip.as_str(), &[][..])]).collect();
    let mut eps: Vec<EpSpec<'_>> = vec![("client", &[("bench", "10.89.0.2", &[])])];
    for (name, att) in names.iter().zip(&atts) {
        eps.push((name.as_str(), &att[..]));
    }
    catalog(&[("bench", "10.89.0.0/16", false)], &eps, &[])
}
