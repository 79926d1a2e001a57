//! Property tests: no input makes parse, resolve or the response writer panic, loop or
//! write a response the reader rejects. Random bytes, and valid queries with random
//! mutations (byte flips, truncation, inserted compression pointers, absurd counts).
//! Case counts are modest so this runs in seconds in CI.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::OnceLock;

use overlay_dns::testutil::catalog;
use overlay_dns::wire::{self, read_response, write_error, MAX_TCP_RESPONSE};
use overlay_dns::{parse, resolve, Answer, DnsView, Rcode};
use proptest::prelude::*;

fn view() -> &'static DnsView {
    static VIEW: OnceLock<DnsView> = OnceLock::new();
    VIEW.get_or_init(|| {
        DnsView::build(&catalog(
            &[
                ("front", "10.0.1.0/24", false),
                ("back", "10.0.2.0/24", false),
                ("dmz", "10.0.3.0/24", true),
            ],
            &[
                ("web", &[("front", "10.0.1.2", &["www", "app"])]),
                ("web2", &[("front", "10.0.1.3", &["www"])]),
                ("db", &[("back", "10.0.2.2", &[])]),
                ("gw", &[("front", "10.0.1.254", &[]), ("dmz", "10.0.3.254", &[])]),
                ("proxy", &[("dmz", "10.0.3.2", &["app"])]),
            ],
            &[("front", "10.0.3.0/24", "gw")],
        ))
    })
}

/// Runs a packet through everything the server does with it.
fn exercise(packet: &[u8]) {
    let mut out = Vec::new();
    match parse(packet) {
        Ok(q) => {
            for asker in ["web", "db", "gw", "nobody"] {
                match resolve(view(), asker, &q) {
                    Answer::Local(local) => {
                        for limit in [q.udp_limit(), MAX_TCP_RESPONSE] {
                            local.write(&q, limit, &mut out);
                            assert!(out.len() <= limit);
                            let r = read_response(&out).expect("our responses read back");
                            assert_eq!(r.id, q.id);
                        }
                    }
                    Answer::Forward => {}
                }
            }
        }
        Err(_) => {
            if write_error(packet, Rcode::FormErr, &mut out) {
                let r = read_response(&out).expect("our error responses read back");
                assert_eq!(r.rcode, 1);
            }
        }
    }
    // the response reader is used on upstream replies: it must survive anything too
    let _ = read_response(packet);
}

fn valid_query() -> impl Strategy<Value = Vec<u8>> {
    let names = prop::sample::select(vec![
        "web",
        "WWW",
        "app.dmz",
        "db.back",
        "proxy.dmz.",
        "2.1.0.10.in-addr.arpa",
        "2.3.0.10.in-addr.arpa",
        "9.9.9.9.in-addr.arpa",
        "example.com",
        ".",
        "a.b.c.d.e.f.g",
    ]);
    let types = prop::sample::select(vec![1u16, 12, 28, 255, 15, 0, 65535]);
    let edns = prop::option::of(any::<u16>());
    (names, types, edns, any::<u16>()).prop_map(|(name, qtype, edns, id)| {
        let mut out = Vec::new();
        wire::write_query(id, name, qtype, edns, &mut out).expect("valid literal");
        out
    })
}

#[derive(Debug, Clone)]
enum Mutation {
    Set(usize, u8),
    Truncate(usize),
    Pointer(usize, u16),
    Append(Vec<u8>),
    Counts(u16, u16, u16),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Mutation::Set(at, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), any::<u16>()).prop_map(|(at, p)| Mutation::Pointer(at, p)),
        prop::collection::vec(any::<u8>(), 0..64).prop_map(Mutation::Append),
        (any::<u16>(), any::<u16>(), any::<u16>()).prop_map(|(a, n, r)| Mutation::Counts(a, n, r)),
    ]
}

fn mutate(mut packet: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = packet.len().max(1);
        match m {
            Mutation::Set(at, b) => {
                if let Some(x) = packet.get_mut(at % len) {
                    *x = *b;
                }
            }
            Mutation::Truncate(at) => packet.truncate(at % len),
            Mutation::Pointer(at, p) => {
                let at = at % len;
                let ptr = (0xC000 | (p & 0x3FFF)).to_be_bytes();
                for (i, b) in ptr.iter().enumerate() {
                    if let Some(x) = packet.get_mut(at + i) {
                        *x = *b;
                    }
                }
            }
            Mutation::Append(bytes) => packet.extend_from_slice(bytes),
            Mutation::Counts(a, n, r) => {
                if packet.len() >= 12 {
                    packet[6..8].copy_from_slice(&a.to_be_bytes());
                    packet[8..10].copy_from_slice(&n.to_be_bytes());
                    packet[10..12].copy_from_slice(&r.to_be_bytes());
                }
            }
        }
    }
    packet
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 5000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(packet in prop::collection::vec(any::<u8>(), 0..600)) {
        exercise(&packet);
    }

    #[test]
    fn random_bytes_with_a_valid_header_never_panic(
        body in prop::collection::vec(any::<u8>(), 0..300),
        id in any::<u16>(),
    ) {
        let mut packet = vec![(id >> 8) as u8, id as u8, 1, 0, 0, 1, 0, 0, 0, 0, 0, 1];
        packet.extend_from_slice(&body);
        exercise(&packet);
    }

    #[test]
    fn mutated_queries_never_panic(
        query in valid_query(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        exercise(&mutate(query, &mutations));
    }

    #[test]
    fn valid_queries_always_parse_and_answer(query in valid_query()) {
        let q = parse(&query).expect("valid queries parse");
        prop_assert_eq!(q.question_end, if q.edns.is_some() { query.len() - 11 } else { query.len() });
        exercise(&query);
    }
}
