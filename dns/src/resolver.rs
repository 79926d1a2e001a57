//! The naming rules: which answer one endpoint gets for one question.
//!
//! Pure: a [`DnsView`], the asking endpoint's name and a parsed query in, an
//! [`Answer`] out — either a local response or "forward to the host's resolvers". No
//! allocation: answers borrow the view or sit in a small inline array.
//!
//! The rules (names compare case-insensitively; a trailing dot changes nothing):
//!
//! * `NAME` — an endpoint name or an alias — resolves to the holders' addresses in the
//!   networks the asker is attached to (several A records when it shares several
//!   networks, or when several endpoints hold the alias; the order rotates per query).
//! * `NAME.NETWORK` resolves to NAME's address in NETWORK if the asker is attached to
//!   NETWORK or one of the asker's networks has a route (`overlayctl route add`) whose
//!   destination covers that address: names resolve across a gateway, which Docker's
//!   embedded DNS cannot do.
//! * `D.C.B.A.in-addr.arpa` (PTR) for an endpoint address the asker can reach as above
//!   answers `NAME.NETWORK.` — the form that resolves back from anywhere that can reach
//!   it.
//! * A name that resolves but has no record of the asked type (AAAA: the overlay is
//!   IPv4-only) gets an empty NOERROR, not NXDOMAIN, so resolvers do not give up on the
//!   name.
//! * NXDOMAIN is given only for names that are ours: a single label that is some
//!   endpoint's name or alias, `LABEL.NETWORK` where both are ours, and reverse names of
//!   addresses inside overlay subnets. So isolated networks stay isolated (their names do
//!   not leak), and nothing about the overlay is asked of the outside world.
//! * Everything else is forwarded, as Docker does — including unknown single labels,
//!   which may be names the host's resolvers know (search domains, LLMNR-style setups),
//!   and `x.NETWORK` when `x` is not ours, so a network named like a real domain (`lan`,
//!   `corp`) does not hide that domain from its endpoints. An endpoint attached only to
//!   `--internal` networks (no way out, by definition) gets REFUSED instead, as does an
//!   endpoint the view does not know.

use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;

use crate::records::{Asker, DnsView, Holder, NetId};
use crate::wire::{
    self, Query, Rcode, Rdata, CLASS_ANY, CLASS_IN, MAX_LABEL_LEN, OPCODE_QUERY, TYPE_A, TYPE_ANY,
    TYPE_PTR,
};

/// TTL of every local record. Short, because endpoints come and go and most stub
/// resolvers in containers do not cache anyway.
pub const TTL: u32 = 10;
/// Most A records in one answer; more holders than this are rotated through.
pub const MAX_ANSWERS: usize = 32;

/// What to do with a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer<'v> {
    /// Answer it ourselves.
    Local(Local<'v>),
    /// Send it to the host's resolvers ([`crate::Upstream`]).
    Forward,
}

/// A response decided locally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Local<'v> {
    pub rcode: Rcode,
    /// Set for answers about our own names.
    pub authoritative: bool,
    pub records: Records<'v>,
}

/// The answer records of a [`Local`] response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Records<'v> {
    None,
    A(AddrList),
    /// A PTR target in wire form, borrowed from the view.
    Ptr(&'v [u8]),
}

/// Up to [`MAX_ANSWERS`] addresses, inline.
#[derive(Clone, PartialEq, Eq)]
pub struct AddrList {
    buf: [Ipv4Addr; MAX_ANSWERS],
    len: usize,
}

impl AddrList {
    fn new() -> AddrList {
        AddrList { buf: [Ipv4Addr::UNSPECIFIED; MAX_ANSWERS], len: 0 }
    }

    /// Adds `ip` unless full or already present.
    fn push(&mut self, ip: Ipv4Addr) {
        if self.len < MAX_ANSWERS && !self.as_slice().contains(&ip) {
            self.buf[self.len] = ip;
            self.len += 1;
        }
    }

    pub fn as_slice(&self) -> &[Ipv4Addr] {
        &self.buf[..self.len]
    }
}

impl std::fmt::Debug for AddrList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.as_slice()).finish()
    }
}

impl Local<'_> {
    fn new(rcode: Rcode, authoritative: bool) -> Self {
        Local { rcode, authoritative, records: Records::None }
    }

    pub fn rdata(&self) -> Rdata<'_> {
        match &self.records {
            Records::None => Rdata::None,
            Records::A(list) => Rdata::A(list.as_slice()),
            Records::Ptr(name) => Rdata::Ptr(name),
        }
    }

    /// Writes the response to `query` into `out`, truncated (TC) beyond `limit` bytes.
    pub fn write(&self, query: &Query<'_>, limit: usize, out: &mut Vec<u8>) {
        wire::write_response(query, self.rcode, self.authoritative, self.rdata(), TTL, limit, out);
    }
}

fn nxdomain<'v>() -> Answer<'v> {
    Answer::Local(Local::new(Rcode::NxDomain, true))
}

/// No record of the asked type for a name that exists.
fn nodata<'v>() -> Answer<'v> {
    Answer::Local(Local::new(Rcode::NoError, true))
}

fn forward<'v>(asker: Option<&Asker>) -> Answer<'v> {
    if asker.is_some_and(|a| a.may_forward) {
        Answer::Forward
    } else {
        Answer::Local(Local::new(Rcode::Refused, false))
    }
}

/// Lowercases a label into `buf`; `None` if it is longer than any label of ours.
fn lower<'b>(label: &[u8], buf: &'b mut [u8; MAX_LABEL_LEN]) -> Option<&'b [u8]> {
    let out = buf.get_mut(..label.len())?;
    for (o, b) in out.iter_mut().zip(label) {
        *o = b.to_ascii_lowercase();
    }
    Some(out)
}

/// Decides the answer `asker` (an endpoint name) gets for `query`.
pub fn resolve<'v>(view: &'v DnsView, asker: &str, query: &Query<'_>) -> Answer<'v> {
    if query.opcode != OPCODE_QUERY {
        return Answer::Local(Local::new(Rcode::NotImp, false));
    }
    if query.edns.is_some_and(|e| e.version > 0) {
        return Answer::Local(Local::new(Rcode::BadVers, false));
    }
    let mut asker_buf = [0u8; MAX_LABEL_LEN];
    let asker = lower(asker.as_bytes(), &mut asker_buf).and_then(|a| view.asker(a));
    if query.qclass != CLASS_IN && query.qclass != CLASS_ANY {
        return forward(asker);
    }

    let mut labels = query.name.labels();
    let count = query.name.label_count();
    let (mut b0, mut b1) = ([0u8; MAX_LABEL_LEN], [0u8; MAX_LABEL_LEN]);
    match count {
        1 => {
            let Some(name) = labels.next().and_then(|l| lower(l, &mut b0)) else {
                return forward(asker);
            };
            bare(view, asker, name, query.qtype)
        }
        2 => {
            let first = labels.next().and_then(|l| lower(l, &mut b0));
            let second = labels.next().and_then(|l| lower(l, &mut b1));
            let (Some(name), Some(net)) = (first, second) else {
                return forward(asker);
            };
            qualified(view, asker, name, net, query.qtype)
        }
        6 => match reverse_ip(&query.name) {
            Some(ip) => reverse(view, asker, ip, query.qtype),
            None => forward(asker),
        },
        _ => forward(asker),
    }
}

/// The addresses of the `holders` that pass `keep`, starting at a position that moves
/// on with every query so clients spread over several holders (and more than
/// [`MAX_ANSWERS`] holders are all served in turn).
fn collect(view: &DnsView, holders: &[Holder], keep: impl Fn(&Holder) -> bool) -> AddrList {
    let start = match holders.len() {
        0 | 1 => 0,
        n => view.rotation.fetch_add(1, Ordering::Relaxed) % n,
    };
    let (head, tail) = holders.split_at(start);
    let mut list = AddrList::new();
    for h in tail.iter().chain(head).filter(|h| keep(h)) {
        list.push(h.ip);
    }
    list
}

/// A records for A/ANY questions, NODATA for other types, NXDOMAIN if none.
fn addresses<'v>(list: AddrList, qtype: u16) -> Answer<'v> {
    if list.len == 0 {
        return nxdomain();
    }
    if qtype != TYPE_A && qtype != TYPE_ANY {
        return nodata();
    }
    Answer::Local(Local { rcode: Rcode::NoError, authoritative: true, records: Records::A(list) })
}

/// `NAME`: the holders' addresses in networks the asker is attached to.
fn bare<'v>(view: &'v DnsView, asker: Option<&Asker>, name: &[u8], qtype: u16) -> Answer<'v> {
    let Some(holders) = view.holders(name) else {
        return forward(asker);
    };
    let Some(asker) = asker else {
        return nxdomain();
    };
    addresses(collect(view, holders, |h| asker.shares(h.net)), qtype)
}

/// `NAME.NETWORK`: NAME's address in NETWORK, if the asker can reach it.
fn qualified<'v>(
    view: &'v DnsView,
    asker: Option<&Asker>,
    name: &[u8],
    net: &[u8],
    qtype: u16,
) -> Answer<'v> {
    let (Some(holders), Some(net)) = (view.holders(name), view.network(net)) else {
        return forward(asker);
    };
    let Some(asker) = asker else {
        return nxdomain();
    };
    addresses(collect(view, holders, |h| h.net == net && asker.reaches(net, h.ip)), qtype)
}

/// PTR for an address: ours if it is an endpoint address or inside an overlay subnet.
fn reverse<'v>(view: &'v DnsView, asker: Option<&Asker>, ip: Ipv4Addr, qtype: u16) -> Answer<'v> {
    let Some(targets) = view.ptr(ip) else {
        return if view.in_overlay_subnet(ip) { nxdomain() } else { forward(asker) };
    };
    let reachable = |net: NetId| asker.is_some_and(|a| a.reaches(net, ip));
    let Some(target) = targets.iter().find(|t| reachable(t.net)) else {
        return nxdomain();
    };
    if qtype != TYPE_PTR && qtype != TYPE_ANY {
        return nodata();
    }
    Answer::Local(Local {
        rcode: Rcode::NoError,
        authoritative: true,
        records: Records::Ptr(&target.name),
    })
}

/// The address of `D.C.B.A.in-addr.arpa`, if the name is exactly that.
fn reverse_ip(name: &wire::Name) -> Option<Ipv4Addr> {
    let mut labels = name.labels();
    let mut octets = [0u8; 4];
    for slot in octets.iter_mut().rev() {
        *slot = parse_octet(labels.next()?)?;
    }
    let in_addr = labels.next()?;
    let arpa = labels.next()?;
    (in_addr.eq_ignore_ascii_case(b"in-addr") && arpa.eq_ignore_ascii_case(b"arpa"))
        .then(|| Ipv4Addr::from(octets))
}

/// A decimal octet of 1–3 digits, no sign, no leading zero (the canonical spelling).
fn parse_octet(label: &[u8]) -> Option<u8> {
    if label.is_empty() || label.len() > 3 || (label.len() > 1 && label[0] == b'0') {
        return None;
    }
    let mut value = 0u16;
    for &b in label {
        if !b.is_ascii_digit() {
            return None;
        }
        value = value * 10 + u16::from(b - b'0');
    }
    u8::try_from(value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use crate::wire::{parse, write_query, TYPE_AAAA};

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("valid ip")
    }

    /// Two isolated networks `front` and `back`, a gateway `gw` in both, a third
    /// network `dmz` reachable from `front` through a route via `gw`, and an internal
    /// network `vault`.
    fn view() -> DnsView {
        DnsView::build(&catalog(
            &[
                ("front", "10.0.1.0/24", false),
                ("back", "10.0.2.0/24", false),
                ("dmz", "10.0.3.0/24", false),
                ("vault", "10.0.4.0/24", true),
            ],
            &[
                ("web", &[("front", "10.0.1.2", &["www", "app"])]),
                ("web2", &[("front", "10.0.1.3", &["www"])]),
                ("db", &[("back", "10.0.2.2", &["database"])]),
                ("gw", &[("front", "10.0.1.254", &[]), ("dmz", "10.0.3.254", &[])]),
                ("proxy", &[("dmz", "10.0.3.2", &["app"])]),
                ("multi", &[("front", "10.0.1.9", &[]), ("back", "10.0.2.9", &[])]),
                ("safe", &[("vault", "10.0.4.2", &[])]),
            ],
            &[("front", "10.0.3.0/24", "gw")],
        ))
    }

    fn ask<'v>(view: &'v DnsView, asker: &str, name: &str, qtype: u16) -> Answer<'v> {
        let mut pkt = Vec::new();
        write_query(7, name, qtype, None, &mut pkt).expect("valid name");
        let q = parse(&pkt).expect("parses");
        resolve(view, asker, &q)
    }

    fn addrs(answer: &Answer<'_>) -> Vec<Ipv4Addr> {
        match answer {
            Answer::Local(Local { rcode: Rcode::NoError, records: Records::A(l), .. }) => {
                let mut v = l.as_slice().to_vec();
                v.sort();
                v
            }
            other => panic!("expected A records, got {other:?}"),
        }
    }

    fn rcode(answer: &Answer<'_>) -> Option<Rcode> {
        match answer {
            Answer::Local(l) => Some(l.rcode),
            Answer::Forward => None,
        }
    }

    fn ptr(answer: &Answer<'_>) -> String {
        match answer {
            Answer::Local(Local { records: Records::Ptr(n), .. }) => {
                wire::read_name(n, 0).expect("valid").0.to_dotted()
            }
            other => panic!("expected PTR, got {other:?}"),
        }
    }

    #[test]
    fn endpoint_name_resolves_in_shared_network() {
        let v = view();
        assert_eq!(addrs(&ask(&v, "web2", "web", TYPE_A)), vec![ip("10.0.1.2")]);
        assert_eq!(addrs(&ask(&v, "web", "web", TYPE_A)), vec![ip("10.0.1.2")], "itself");
    }

    #[test]
    fn names_are_case_insensitive_and_trailing_dot_optional() {
        let v = view();
        assert_eq!(addrs(&ask(&v, "web2", "WeB.", TYPE_A)), vec![ip("10.0.1.2")]);
        assert_eq!(addrs(&ask(&v, "WEB2", "web.FRONT.", TYPE_A)), vec![ip("10.0.1.2")]);
    }

    #[test]
    fn several_shared_networks_give_several_addresses() {
        let v = view();
        // gw shares only front with multi
        assert_eq!(addrs(&ask(&v, "gw", "multi", TYPE_A)), vec![ip("10.0.1.9")]);
        let both = DnsView::build(&catalog(
            &[("a", "10.1.0.0/24", false), ("b", "10.2.0.0/24", false)],
            &[
                ("x", &[("a", "10.1.0.2", &[]), ("b", "10.2.0.2", &[])]),
                ("y", &[("a", "10.1.0.3", &[]), ("b", "10.2.0.3", &[])]),
            ],
            &[],
        ));
        assert_eq!(addrs(&ask(&both, "y", "x", TYPE_A)), vec![ip("10.1.0.2"), ip("10.2.0.2")]);
    }

    #[test]
    fn aliases_resolve_only_in_their_network() {
        let v = view();
        assert_eq!(addrs(&ask(&v, "multi", "database", TYPE_A)), vec![ip("10.0.2.2")]);
        // "app" is web's alias in front and proxy's alias in dmz
        assert_eq!(addrs(&ask(&v, "web2", "app", TYPE_A)), vec![ip("10.0.1.2")]);
        assert_eq!(addrs(&ask(&v, "gw", "app", TYPE_A)), vec![ip("10.0.1.2"), ip("10.0.3.2")]);
    }

    #[test]
    fn shared_alias_returns_all_holders_rotating() {
        let v = view();
        let mut firsts = Vec::new();
        for _ in 0..4 {
            match ask(&v, "multi", "www", TYPE_A) {
                Answer::Local(Local { records: Records::A(l), .. }) => {
                    assert_eq!(l.as_slice().len(), 2);
                    firsts.push(l.as_slice()[0]);
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(firsts.contains(&ip("10.0.1.2")) && firsts.contains(&ip("10.0.1.3")), "{firsts:?}");
        assert_ne!(firsts[0], firsts[1], "consecutive queries rotate");
    }

    #[test]
    fn isolated_networks_give_nxdomain() {
        let v = view();
        assert_eq!(rcode(&ask(&v, "web", "db", TYPE_A)), Some(Rcode::NxDomain));
        assert_eq!(rcode(&ask(&v, "web", "database", TYPE_A)), Some(Rcode::NxDomain));
        assert_eq!(rcode(&ask(&v, "web", "db.back", TYPE_A)), Some(Rcode::NxDomain));
        assert_eq!(rcode(&ask(&v, "db", "web", TYPE_A)), Some(Rcode::NxDomain));
        // a bare name does not cross routes: only NAME.NETWORK does
        assert_eq!(rcode(&ask(&v, "web", "proxy", TYPE_A)), Some(Rcode::NxDomain));
    }

    #[test]
    fn names_known_only_by_name_give_nxdomain_never_forwarded() {
        // What a host that does not carry `far` knows of its endpoint: name and aliases.
        let mut cat = catalog(
            &[("front", "10.0.1.0/24", false), ("far", "10.0.9.0/24", false)],
            &[("web", &[("front", "10.0.1.2", &["www"])])],
            &[],
        );
        std::sync::Arc::make_mut(&mut cat.names)
            .insert("remote".into(), vec!["cache".into(), "www".into()]);
        let v = DnsView::build(&cat);
        for name in ["remote", "cache", "remote.far", "remote.front"] {
            assert_eq!(rcode(&ask(&v, "web", name, TYPE_A)), Some(Rcode::NxDomain), "{name}");
        }
        assert_eq!(addrs(&ask(&v, "web", "www", TYPE_A)), [ip("10.0.1.2")], "own holder kept");
        assert_eq!(ask(&v, "web", "elsewhere", TYPE_A), Answer::Forward);
    }

    #[test]
    fn qualified_name_in_attached_network() {
        let v = view();
        assert_eq!(addrs(&ask(&v, "multi", "db.back", TYPE_A)), vec![ip("10.0.2.2")]);
        assert_eq!(addrs(&ask(&v, "multi", "database.back", TYPE_A)), vec![ip("10.0.2.2")]);
        assert_eq!(addrs(&ask(&v, "multi", "multi.back", TYPE_A)), vec![ip("10.0.2.9")]);
        // exists, network reachable, but not in that network
        assert_eq!(rcode(&ask(&v, "multi", "db.front", TYPE_A)), Some(Rcode::NxDomain));
    }

    #[test]
    fn qualified_name_resolves_across_a_gateway_route() {
        let v = view();
        // web is only in front; front routes 10.0.3.0/24 via gw
        assert_eq!(addrs(&ask(&v, "web", "proxy.dmz", TYPE_A)), vec![ip("10.0.3.2")]);
        assert_eq!(addrs(&ask(&v, "web", "app.dmz", TYPE_A)), vec![ip("10.0.3.2")]);
        // the route is one-way: dmz has no route back to front
        assert_eq!(rcode(&ask(&v, "proxy", "web.front", TYPE_A)), Some(Rcode::NxDomain));
        // and back is not covered by any route of front
        assert_eq!(rcode(&ask(&v, "web", "db.back", TYPE_A)), Some(Rcode::NxDomain));
    }

    #[test]
    fn route_covering_part_of_a_subnet_covers_only_those_addresses() {
        let v = DnsView::build(&catalog(
            &[("a", "10.1.0.0/24", false), ("b", "10.2.0.0/24", false)],
            &[
                ("x", &[("a", "10.1.0.2", &[])]),
                ("low", &[("b", "10.2.0.5", &[])]),
                ("high", &[("b", "10.2.0.200", &[])]),
                ("gw", &[("a", "10.1.0.1", &[]), ("b", "10.2.0.1", &[])]),
            ],
            &[("a", "10.2.0.0/25", "gw")],
        ));
        assert_eq!(addrs(&ask(&v, "x", "low.b", TYPE_A)), vec![ip("10.2.0.5")]);
        assert_eq!(rcode(&ask(&v, "x", "high.b", TYPE_A)), Some(Rcode::NxDomain));
    }

    #[test]
    fn ptr_for_reachable_addresses() {
        let v = view();
        assert_eq!(ptr(&ask(&v, "web2", "2.1.0.10.in-addr.arpa", TYPE_PTR)), "web.front");
        assert_eq!(
            ptr(&ask(&v, "web", "2.3.0.10.IN-ADDR.ARPA.", TYPE_PTR)),
            "proxy.dmz",
            "via route"
        );
        assert_eq!(ptr(&ask(&v, "multi", "9.2.0.10.in-addr.arpa", TYPE_PTR)), "multi.back");
        assert_eq!(
            rcode(&ask(&v, "web", "2.2.0.10.in-addr.arpa", TYPE_PTR)),
            Some(Rcode::NxDomain)
        );
        // an unassigned address inside an overlay subnet is ours too
        assert_eq!(
            rcode(&ask(&v, "web", "77.1.0.10.in-addr.arpa", TYPE_PTR)),
            Some(Rcode::NxDomain)
        );
        // A question on a reverse name that exists: NODATA
        assert_eq!(rcode(&ask(&v, "web2", "2.1.0.10.in-addr.arpa", TYPE_A)), Some(Rcode::NoError));
    }

    #[test]
    fn foreign_reverse_names_are_forwarded() {
        let v = view();
        assert_eq!(ask(&v, "web", "8.8.8.8.in-addr.arpa", TYPE_PTR), Answer::Forward);
        assert_eq!(
            ask(&v, "web", "1.0.10.in-addr.arpa", TYPE_PTR),
            Answer::Forward,
            "zone, not host"
        );
        assert_eq!(ask(&v, "web", "02.1.0.10.in-addr.arpa", TYPE_PTR), Answer::Forward);
        assert_eq!(ask(&v, "web", "256.1.0.10.in-addr.arpa", TYPE_PTR), Answer::Forward);
    }

    #[test]
    fn aaaa_and_other_types_get_nodata() {
        let v = view();
        for qtype in [TYPE_AAAA, 15 /* MX */, 16 /* TXT */] {
            let a = ask(&v, "web2", "web", qtype);
            assert_eq!(a, Answer::Local(Local::new(Rcode::NoError, true)), "type {qtype}");
            let a = ask(&v, "web", "proxy.dmz", qtype);
            assert_eq!(rcode(&a), Some(Rcode::NoError));
        }
        // but an unreachable name is NXDOMAIN whatever the type
        assert_eq!(rcode(&ask(&v, "web", "db", TYPE_AAAA)), Some(Rcode::NxDomain));
    }

    #[test]
    fn any_returns_addresses() {
        let v = view();
        assert_eq!(addrs(&ask(&v, "web2", "web", TYPE_ANY)), vec![ip("10.0.1.2")]);
    }

    #[test]
    fn everything_else_is_forwarded() {
        let v = view();
        for name in
            ["example.com", "unknown", "nosuch.front", "web.nosuchnet", "a.b.c", ".", "web.front.x"]
        {
            assert_eq!(ask(&v, "web", name, TYPE_A), Answer::Forward, "{name}");
        }
    }

    #[test]
    fn internal_only_and_unknown_askers_may_not_forward() {
        let v = view();
        assert_eq!(rcode(&ask(&v, "safe", "example.com", TYPE_A)), Some(Rcode::Refused));
        assert_eq!(rcode(&ask(&v, "nobody", "example.com", TYPE_A)), Some(Rcode::Refused));
        assert_eq!(rcode(&ask(&v, "nobody", "web", TYPE_A)), Some(Rcode::NxDomain));
        // attached to one non-internal network is enough
        assert_eq!(ask(&v, "multi", "example.com", TYPE_A), Answer::Forward);
    }

    #[test]
    fn opcode_and_edns_version() {
        let v = view();
        let mut pkt = Vec::new();
        write_query(1, "web", TYPE_A, None, &mut pkt).expect("valid");
        pkt[2] |= 2 << 3; // opcode STATUS
        let q = parse(&pkt).expect("parses");
        assert_eq!(rcode(&resolve(&v, "web", &q)), Some(Rcode::NotImp));
        write_query(1, "web", TYPE_A, Some(1232), &mut pkt).expect("valid");
        let at = pkt.len() - 5; // OPT TTL's version byte
        pkt[at] = 1;
        let q = parse(&pkt).expect("parses");
        assert_eq!(rcode(&resolve(&v, "web", &q)), Some(Rcode::BadVers));
    }

    #[test]
    fn non_in_class_is_forwarded() {
        let v = view();
        let mut pkt = Vec::new();
        write_query(1, "web", TYPE_A, None, &mut pkt).expect("valid");
        let n = pkt.len();
        pkt[n - 1] = 3; // class CH
        let q = parse(&pkt).expect("parses");
        assert_eq!(resolve(&v, "web", &q), Answer::Forward);
    }

    #[test]
    fn large_alias_sets_are_capped() {
        let ips: Vec<String> = (0..40).map(|i| format!("10.9.0.{}", i + 10)).collect();
        let names: Vec<String> = (0..40).map(|i| format!("n{i}")).collect();
        let atts: Vec<[AttSpec<'_>; 1]> =
            ips.iter().map(|ip| [("n", ip.as_str(), &["svc"][..])]).collect();
        let eps: Vec<EpSpec<'_>> =
            names.iter().zip(&atts).map(|(n, a)| (n.as_str(), &a[..])).collect();
        let v = DnsView::build(&catalog(&[("n", "10.9.0.0/24", false)], &eps, &[]));
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..40 {
            let got = addrs(&ask(&v, "n0", "svc", TYPE_A));
            assert_eq!(got.len(), MAX_ANSWERS);
            seen.extend(got);
        }
        assert_eq!(seen.len(), 40, "rotation reaches every holder");
    }

    #[test]
    fn octets() {
        assert_eq!(parse_octet(b"0"), Some(0));
        assert_eq!(parse_octet(b"255"), Some(255));
        assert_eq!(parse_octet(b"256"), None);
        assert_eq!(parse_octet(b"1a"), None);
        assert_eq!(parse_octet(b""), None);
        assert_eq!(parse_octet(b"0001"), None);
    }
}
