//! The agent's nftables table `inet overlay`: rendered as text from the desired state
//! (pure), installed whole with one `nft -f -` batch, observed through `nft -j`.
//!
//! What it enforces (see SPEC.md, Security):
//! * isolation: nothing is routed by the host from one overlay bridge to another (only a
//!   gateway endpoint, inside its own namespace, routes between networks);
//! * internal networks: nothing is forwarded into or out of their bridge;
//! * egress: a non-internal network's subnet leaving the host through anything but an
//!   overlay bridge is masqueraded behind the host's address;
//! * the control plane: endpoints reach no controller or metrics port ([`Guard`]) on any
//!   host's underlay address or controller address, whatever the route (forward), and
//!   the host itself accepts nothing from an endpoint but a ping of its own network's
//!   gateway address and replies to the host's own traffic (input; the embedded DNS
//!   lives inside each endpoint's namespace, so endpoints need nothing else from the
//!   host);
//! * the data plane: VXLAN, UDP-plane and QUIC packets are accepted only from the
//!   underlay addresses of the cluster's hosts (set `hosts`), and endpoints cannot send
//!   to those ports of any host (an endpoint's packet leaves masqueraded behind its
//!   host's address, which the other hosts trust).
//!
//! Speed: frames bridged inside one network never need netfilter. Where `br_netfilter`
//! is loaded (Docker loads it) the kernel shows them to the inet hooks anyway — the
//! per-bridge `nf_call_iptables` option can only add bridges to the namespace-wide
//! `net.bridge.bridge-nf-call-iptables`, never take one away — so the table keeps
//! them out of conntrack (`notrack` for every frame on an overlay bridge that is not
//! addressed to a gateway MAC, i.e. not routed) and lets them through the forward chain
//! with its first rule. The encapsulated packets themselves (data-plane ports) are not
//! tracked either. Everything routed keeps conntrack (masquerade and replies need it).
//!
//! The table carries the digest of its ruleset as its comment; the plan reinstalls it
//! when the digest or the rule count differs (a rule deleted by hand comes back).
//! This module never touches any other table.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use crate::desired::{FirewallDesired, BRIDGE_PREFIX, VXLAN_PORT};
use crate::observed::FirewallObs;

pub const FAMILY: &str = "inet";
pub const TABLE: &str = "overlay";

/// What the agent's configuration adds to the firewall (the catalog gives the rest).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Guard {
    /// Addresses of the controllers (from the `--controller` URLs); every registered
    /// host's underlay address is added to them.
    pub control_addrs: BTreeSet<Ipv4Addr>,
    /// Controller and metrics ports no endpoint may reach on those addresses.
    pub control_ports: BTreeSet<u16>,
    /// This host's data-plane UDP ports (VXLAN is always one of them).
    pub data_ports: BTreeSet<u16>,
}

/// A rendered ruleset: this host firewall (`inet overlay`) or the bridge shortcut
/// (`netdev overlay`, see `shortcut`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    /// The table's family; its name is always [`TABLE`].
    pub family: &'static str,
    /// The body of `table FAMILY overlay { … }` without the comment.
    pub body: String,
    pub digest: String,
    pub rules: usize,
}

impl Ruleset {
    pub fn new(family: &'static str, body: String, rules: usize) -> Ruleset {
        Ruleset { family, digest: digest(&body), body, rules }
    }

    /// The `nft -f` batch that replaces the table atomically.
    pub fn batch(&self) -> String {
        let family = self.family;
        format!(
            "table {family} {TABLE}\ndelete table {family} {TABLE}\ntable {family} {TABLE} {{\n\tcomment \"{}\"\n{}}}\n",
            self.digest, self.body
        )
    }
}

fn digest(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("overlay-agent {h:016x}")
}

/// `set NAME { type TYPE; elements = { … } }` (no `elements` line when empty: nft
/// refuses an empty list).
fn set(body: &mut String, name: &str, kind: &str, elements: &[String]) {
    let _ = writeln!(body, "\tset {name} {{\n\t\ttype {kind}");
    if !elements.is_empty() {
        let _ = writeln!(body, "\t\telements = {{ {} }}", elements.join(", "));
    }
    body.push_str("\t}\n");
}

/// Appends one rule to `body` and counts it.
struct Chain<'a> {
    body: &'a mut String,
    rules: &'a mut usize,
}

impl Chain<'_> {
    fn open<'a>(body: &'a mut String, rules: &'a mut usize, name: &str, spec: &str) -> Chain<'a> {
        let _ = writeln!(body, "\tchain {name} {{\n\t\t{spec}; policy accept;");
        Chain { body, rules }
    }
    /// A chain only jumped to (no hook, no policy).
    fn regular<'a>(body: &'a mut String, rules: &'a mut usize, name: &str) -> Chain<'a> {
        let _ = writeln!(body, "\tchain {name} {{");
        Chain { body, rules }
    }
    fn rule(&mut self, rule: impl AsRef<str>) {
        let _ = writeln!(self.body, "\t\t{}", rule.as_ref());
        *self.rules += 1;
    }
    fn close(self) {
        self.body.push_str("\t}\n");
    }
}

/// Renders the ruleset for `fw` (pure).
pub fn render(fw: &FirewallDesired) -> Ruleset {
    let mut body = String::new();
    let mut rules = 0;
    let b = BRIDGE_PREFIX;
    let quoted = |s: &str| format!("\"{s}\"");

    let hosts: Vec<String> = fw.hosts.iter().map(ToString::to_string).collect();
    let control: BTreeSet<Ipv4Addr> = fw.hosts.union(&fw.guard.control_addrs).copied().collect();
    let control: Vec<String> = control.iter().map(ToString::to_string).collect();
    let control_ports: Vec<String> = fw.guard.control_ports.iter().map(u16::to_string).collect();
    let mut data_ports = fw.guard.data_ports.clone();
    data_ports.insert(VXLAN_PORT);
    let data_ports: Vec<String> = data_ports.iter().map(u16::to_string).collect();
    let macs: Vec<String> = fw.gateway_macs.iter().map(ToString::to_string).collect();
    let bridges: BTreeSet<&str> = fw
        .external
        .iter()
        .map(|(b, _)| b.as_str())
        .chain(fw.internal.iter().map(String::as_str))
        .collect();
    let bridged: Vec<String> =
        bridges.iter().map(|b| format!("{} . {}", quoted(b), quoted(b))).collect();
    let gateways: Vec<String> =
        fw.gateways.iter().map(|(b, ip)| format!("{} . {ip}", quoted(b))).collect();

    set(&mut body, "hosts", "ipv4_addr", &hosts);
    set(&mut body, "control_addrs", "ipv4_addr", &control);
    set(&mut body, "control_ports", "inet_service", &control_ports);
    set(&mut body, "data_ports", "inet_service", &data_ports);
    set(&mut body, "gateway_macs", "ether_addr", &macs);
    set(&mut body, "bridged", "ifname . ifname", &bridged);
    set(&mut body, "gateways", "ifname . ipv4_addr", &gateways);

    // Before conntrack (priority raw): what needs no connection state.
    let mut c = Chain::open(
        &mut body,
        &mut rules,
        "prerouting",
        "type filter hook prerouting priority raw",
    );
    c.rule("udp dport @data_ports notrack");
    c.rule(format!("iifname \"{b}*\" ether daddr != @gateway_macs notrack"));
    c.close();
    let mut c =
        Chain::open(&mut body, &mut rules, "output", "type filter hook output priority raw");
    c.rule("udp dport @data_ports notrack");
    c.close();

    // Every encapsulated packet a host receives passes this chain, so what only
    // concerns endpoints is a chain of its own.
    let mut c =
        Chain::open(&mut body, &mut rules, "input", "type filter hook input priority filter");
    c.rule(format!("iifname \"{b}*\" jump from_endpoints"));
    c.rule("udp dport @data_ports ip saddr != @hosts counter drop");
    // The underlay is IPv4: nothing legitimate reaches these ports over IPv6.
    c.rule("meta nfproto ipv6 udp dport @data_ports counter drop");
    c.close();
    let mut c = Chain::regular(&mut body, &mut rules, "from_endpoints");
    c.rule("ct state established,related accept");
    c.rule("iifname . ip daddr @gateways icmp type echo-request accept");
    c.rule("counter drop");
    c.close();

    let mut c =
        Chain::open(&mut body, &mut rules, "forward", "type filter hook forward priority filter");
    // With br_netfilter, frames bridged *within* one bridge pass this hook with
    // iifname = oifname = that bridge: they are let through first (every rule below
    // concerns traffic that leaves a bridge for somewhere else).
    c.rule("iifname . oifname @bridged accept");
    c.rule(format!(
        "iifname \"{b}*\" ip daddr @control_addrs meta l4proto {{ tcp, udp }} th dport @control_ports counter drop"
    ));
    c.rule(format!("iifname \"{b}*\" ip daddr @hosts udp dport @data_ports counter drop"));
    for bridge in &bridges {
        c.rule(format!("iifname \"{bridge}\" oifname \"{b}*\" oifname != \"{bridge}\" drop"));
    }
    for bridge in &fw.internal {
        c.rule(format!("iifname \"{bridge}\" oifname != \"{bridge}\" drop"));
        c.rule(format!("oifname \"{bridge}\" iifname != \"{bridge}\" drop"));
    }
    c.close();

    let mut c = Chain::open(
        &mut body,
        &mut rules,
        "postrouting",
        "type nat hook postrouting priority srcnat",
    );
    for (_bridge, subnet) in &fw.external {
        c.rule(format!("ip saddr {subnet} oifname != \"{b}*\" masquerade"));
    }
    c.close();
    Ruleset::new(FAMILY, body, rules)
}

/// True when the installed table is exactly `want`.
pub fn is_current(observed: Option<&FirewallObs>, want: &Ruleset) -> bool {
    observed.is_some_and(|o| o.digest == want.digest && o.rules == want.rules)
}

/// Whether `nft` can be run at all, and its version line; checked once at start so a
/// missing nftables is said clearly, once, rather than on every pass.
pub fn check() -> Result<String, String> {
    let out = Command::new("nft")
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run nft: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!("nft --version failed: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Installs `ruleset` in one batch.
pub fn install(ruleset: &Ruleset) -> Result<(), String> {
    run_nft(&ruleset.batch())
}

/// Removes the `family` table (no error if absent).
pub fn remove(family: &str) -> Result<(), String> {
    run_nft(&format!("table {family} {TABLE}\ndelete table {family} {TABLE}\n"))
}

fn run_nft(batch: &str) -> Result<(), String> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run nft: {e}"))?;
    // An nft that fails early stops reading: its own error says more than our EPIPE.
    let written = match child.stdin.take() {
        Some(mut stdin) => stdin.write_all(batch.as_bytes()),
        None => Ok(()),
    };
    let out = child.wait_with_output().map_err(|e| format!("waiting for nft: {e}"))?;
    if !out.status.success() {
        return Err(format!("nft failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    written.map_err(|e| format!("writing to nft: {e}"))
}

fn nft_list(family: &str, json: bool) -> Option<Vec<u8>> {
    let mut cmd = Command::new("nft");
    if json {
        cmd.arg("-j");
    }
    let out = cmd.args(["list", "table", family, TABLE]).stderr(Stdio::null()).output().ok()?;
    out.status.success().then_some(out.stdout)
}

/// Reads the installed table, `None` if there is none (or nft is missing). The rules
/// are counted from the JSON listing; the comment comes from the text listing because
/// nft 1.0.6 leaves table comments out of its JSON.
pub fn observe(family: &str) -> Option<FirewallObs> {
    let rules = count_rules(&nft_list(family, true)?)?;
    let digest =
        table_comment(&String::from_utf8_lossy(&nft_list(family, false)?)).unwrap_or_default();
    Some(FirewallObs { digest, rules })
}

/// The ruleset's generation in the calling thread's network namespace: a number the
/// kernel changes with every nftables commit, by anyone (`NFT_MSG_GETGEN` over
/// netfilter netlink, one round trip, no process). `None` when it cannot be asked (no
/// nf_tables): then the table is observed every time.
pub fn generation() -> Option<u32> {
    let mut socket = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_NETFILTER).ok()?;
    socket.bind_auto().ok()?;
    socket.connect(&netlink_sys::SocketAddr::new(0, 0)).ok()?;
    socket.send(&generation_request(1), 0).ok()?;
    let mut buf = vec![0u8; 8192];
    // Bounded: a reply that never comes must not stall a pass.
    let timeout = libc::timeval { tv_sec: 1, tv_usec: 0 };
    // SAFETY: setsockopt on a socket we own, with a pointer to a live timeval and its size.
    let r = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::addr_of!(timeout).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return None;
    }
    let n = socket.recv(&mut &mut buf[..], 0).ok()?;
    parse_generation(buf.get(..n)?)
}

/// `NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETGEN` and the reply's `… | NFT_MSG_NEWGEN`.
const GETGEN: u16 = (10 << 8) | 16;
const NEWGEN: u16 = (10 << 8) | 15;
/// `NFTA_GEN_ID`.
const GEN_ID: u16 = 1;

/// The request: a netlink header and an empty `nfgenmsg` (AF_UNSPEC, version 0).
fn generation_request(seq: u32) -> Vec<u8> {
    let mut m = Vec::with_capacity(20);
    m.extend_from_slice(&20u32.to_ne_bytes());
    m.extend_from_slice(&GETGEN.to_ne_bytes());
    m.extend_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[0, 0, 0, 0]);
    m
}

/// `NFTA_GEN_ID` (big-endian) of a `NEWGEN` reply; `None` for anything else (an error
/// reply, a short or malformed message).
fn parse_generation(msg: &[u8]) -> Option<u32> {
    let u16_at = |i: usize| Some(u16::from_ne_bytes(msg.get(i..i + 2)?.try_into().ok()?));
    let len = u32::from_ne_bytes(msg.get(0..4)?.try_into().ok()?) as usize;
    if u16_at(4)? != NEWGEN || len > msg.len() {
        return None;
    }
    // Attributes after the 16-byte header and the 4-byte nfgenmsg, 4-byte aligned.
    let mut at = 20;
    while at + 4 <= len {
        let alen = usize::from(u16_at(at)?);
        let kind = u16_at(at + 2)? & 0x3fff;
        if alen < 4 || at + alen > len {
            return None;
        }
        if kind == GEN_ID && alen == 8 {
            return Some(u32::from_be_bytes(msg.get(at + 4..at + 8)?.try_into().ok()?));
        }
        at += (alen + 3) & !3;
    }
    None
}

fn count_rules(json: &[u8]) -> Option<usize> {
    let v: serde_json::Value = serde_json::from_slice(json).ok()?;
    let items = v.get("nftables")?.as_array()?;
    Some(items.iter().filter(|i| i.get("rule").is_some()).count())
}

/// The `comment "…"` line of the table itself (before its first chain).
fn table_comment(text: &str) -> Option<String> {
    for line in text.lines().map(str::trim) {
        if line.starts_with("chain ") {
            return None;
        }
        if let Some(rest) = line.strip_prefix("comment \"") {
            return rest.strip_suffix('"').map(str::to_string);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_generation_comes_from_a_newgen_reply_only() {
        let req = generation_request(7);
        assert_eq!(req.len(), 20);
        assert_eq!(u16::from_ne_bytes([req[4], req[5]]), GETGEN);
        // A NEWGEN reply: header, nfgenmsg, NFTA_GEN_ID 0x01020304, NFTA_GEN_PROC_PID.
        let mut reply = Vec::new();
        reply.extend_from_slice(&36u32.to_ne_bytes());
        reply.extend_from_slice(&NEWGEN.to_ne_bytes());
        reply.extend_from_slice(&[0; 10]);
        reply.extend_from_slice(&[0; 4]);
        reply.extend_from_slice(&8u16.to_ne_bytes());
        reply.extend_from_slice(&GEN_ID.to_ne_bytes());
        reply.extend_from_slice(&[1, 2, 3, 4]);
        reply.extend_from_slice(&8u16.to_ne_bytes());
        reply.extend_from_slice(&2u16.to_ne_bytes());
        reply.extend_from_slice(&[0, 0, 0, 9]);
        assert_eq!(parse_generation(&reply), Some(0x0102_0304));
        // Anything else: unknown.
        assert_eq!(parse_generation(&reply[..10]), None);
        let mut error = reply.clone();
        error[4..6].copy_from_slice(&2u16.to_ne_bytes());
        assert_eq!(parse_generation(&error), None);
        let mut bad = reply.clone();
        bad[20..22].copy_from_slice(&200u16.to_ne_bytes());
        assert_eq!(parse_generation(&bad), None);
    }

    fn sample() -> FirewallDesired {
        FirewallDesired {
            external: vec![("ovb-4096".into(), "10.1.0.0/24".parse().unwrap())],
            internal: vec!["ovb-4097".into()],
            gateway_macs: [crate::desired::bridge_mac(4096), crate::desired::bridge_mac(4097)]
                .into(),
            gateways: [
                ("ovb-4096".to_string(), "10.1.0.1".parse().unwrap()),
                ("ovb-4097".to_string(), "10.2.0.1".parse().unwrap()),
            ]
            .into(),
            hosts: ["192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap()].into(),
            guard: Guard {
                control_addrs: ["192.0.2.9".parse().unwrap()].into(),
                control_ports: [7400, 9100].into(),
                data_ports: [4789, 7470, 7471].into(),
            },
        }
    }

    #[test]
    fn renders_the_exact_ruleset() {
        let r = render(&sample());
        let want = r#"	set hosts {
		type ipv4_addr
		elements = { 192.0.2.1, 192.0.2.2 }
	}
	set control_addrs {
		type ipv4_addr
		elements = { 192.0.2.1, 192.0.2.2, 192.0.2.9 }
	}
	set control_ports {
		type inet_service
		elements = { 7400, 9100 }
	}
	set data_ports {
		type inet_service
		elements = { 4789, 7470, 7471 }
	}
	set gateway_macs {
		type ether_addr
		elements = { 06:6f:76:00:10:00, 06:6f:76:00:10:01 }
	}
	set bridged {
		type ifname . ifname
		elements = { "ovb-4096" . "ovb-4096", "ovb-4097" . "ovb-4097" }
	}
	set gateways {
		type ifname . ipv4_addr
		elements = { "ovb-4096" . 10.1.0.1, "ovb-4097" . 10.2.0.1 }
	}
	chain prerouting {
		type filter hook prerouting priority raw; policy accept;
		udp dport @data_ports notrack
		iifname "ovb-*" ether daddr != @gateway_macs notrack
	}
	chain output {
		type filter hook output priority raw; policy accept;
		udp dport @data_ports notrack
	}
	chain input {
		type filter hook input priority filter; policy accept;
		iifname "ovb-*" jump from_endpoints
		udp dport @data_ports ip saddr != @hosts counter drop
		meta nfproto ipv6 udp dport @data_ports counter drop
	}
	chain from_endpoints {
		ct state established,related accept
		iifname . ip daddr @gateways icmp type echo-request accept
		counter drop
	}
	chain forward {
		type filter hook forward priority filter; policy accept;
		iifname . oifname @bridged accept
		iifname "ovb-*" ip daddr @control_addrs meta l4proto { tcp, udp } th dport @control_ports counter drop
		iifname "ovb-*" ip daddr @hosts udp dport @data_ports counter drop
		iifname "ovb-4096" oifname "ovb-*" oifname != "ovb-4096" drop
		iifname "ovb-4097" oifname "ovb-*" oifname != "ovb-4097" drop
		iifname "ovb-4097" oifname != "ovb-4097" drop
		oifname "ovb-4097" iifname != "ovb-4097" drop
	}
	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		ip saddr 10.1.0.0/24 oifname != "ovb-*" masquerade
	}
"#;
        assert_eq!(r.body, want);
        assert_eq!(r.rules, 17);
        assert!(r.batch().starts_with(
            "table inet overlay\ndelete table inet overlay\ntable inet overlay {\n\tcomment \"overlay-agent "
        ));
        assert!(r.batch().ends_with(&format!("{want}}}\n")));
    }

    #[test]
    fn an_empty_host_still_guards_its_data_plane() {
        // No networks, no hosts known yet, a guard without data ports: VXLAN is still
        // closed to everyone (the empty `hosts` set matches nobody).
        let r = render(&FirewallDesired::default());
        assert!(r
            .body
            .contains("\tset data_ports {\n\t\ttype inet_service\n\t\telements = { 4789 }\n\t}\n"));
        assert!(r.body.contains("\tset hosts {\n\t\ttype ipv4_addr\n\t}\n"));
        assert!(r.body.contains("udp dport @data_ports ip saddr != @hosts counter drop"));
        assert_eq!(r.rules, 12);
        // Any change of hosts, ports or networks changes the digest (and so reinstalls).
        let base = render(&sample());
        let mut more = sample();
        more.hosts.insert("192.0.2.3".parse().unwrap());
        assert_ne!(render(&more).digest, base.digest);
        let mut ports = sample();
        ports.guard.control_ports.insert(9200);
        assert_ne!(render(&ports).digest, base.digest);
        assert_eq!(render(&sample()), base);
    }

    #[test]
    fn parses_nft_listings() {
        let json = br#"{"nftables":[{"metainfo":{"version":"1.0.6"}},
            {"table":{"family":"inet","name":"overlay","handle":3}},
            {"chain":{"family":"inet","table":"overlay","name":"forward"}},
            {"rule":{"family":"inet","table":"overlay","chain":"forward"}},
            {"rule":{"family":"inet","table":"overlay","chain":"forward"}}]}"#;
        assert_eq!(count_rules(json), Some(2));
        assert_eq!(count_rules(b"nonsense"), None);
        let text = "table inet overlay {\n\tcomment \"overlay-agent 00ff\"\n\tchain forward {\n\t\tiifname \"a\" drop comment \"x\"\n\t}\n}\n";
        assert_eq!(table_comment(text).as_deref(), Some("overlay-agent 00ff"));
        assert_eq!(table_comment("table inet overlay {\n\tchain f {\n\t\tcomment \"x\"\n"), None);
    }
}
