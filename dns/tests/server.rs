//! The server over real sockets on loopback (no root needed): local answers over UDP
//! and TCP, truncation, malformed packets, forwarding (with the TCP retry) to a fake
//! upstream, SERVFAIL within the budget, view updates and shutdown.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use overlay_dns::testutil::{catalog, AttSpec, EpSpec};
use overlay_dns::wire::{Record, TYPE_A, TYPE_AAAA, TYPE_PTR};
use overlay_dns::{serve, DnsView, Upstream};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{oneshot, watch};

const WAIT: Duration = Duration::from_secs(3);

fn test_view() -> DnsView {
    let many: Vec<String> = (0..40).map(|i| format!("10.0.1.{}", 100 + i)).collect();
    let names: Vec<String> = (0..40).map(|i| format!("m{i}")).collect();
    let atts: Vec<[AttSpec<'_>; 1]> =
        many.iter().map(|ip| [("front", ip.as_str(), &["many"][..])]).collect();
    let mut eps: Vec<EpSpec<'_>> = vec![
        ("client", &[("front", "10.0.1.10", &[])]),
        ("web", &[("front", "10.0.1.2", &["www"])]),
        ("db", &[("back", "10.0.2.2", &[])]),
    ];
    for (n, a) in names.iter().zip(&atts) {
        eps.push((n.as_str(), &a[..]));
    }
    DnsView::build(&catalog(
        &[("front", "10.0.1.0/24", false), ("back", "10.0.2.0/24", false)],
        &eps,
        &[],
    ))
}

struct Running {
    addr: SocketAddr,
    tcp_addr: SocketAddr,
    views: watch::Sender<Arc<DnsView>>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn start(upstream: Upstream) -> Running {
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (addr, tcp_addr) = (udp.local_addr().unwrap(), tcp.local_addr().unwrap());
    let (views, rx) = watch::channel(Arc::new(test_view()));
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(udp, tcp, "client".into(), rx, Arc::new(upstream), stopped));
    Running { addr, tcp_addr, views, stop: Some(stop), task }
}

fn a_records(r: &overlay_dns::wire::ResponseSummary) -> Vec<Ipv4Addr> {
    let mut v: Vec<Ipv4Addr> = r
        .answers
        .iter()
        .filter_map(|a| match a {
            Record::A(ip) => Some(*ip),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn answers_local_names_over_udp() {
    let s = start(Upstream::new(vec![])).await;
    let r = udp_query(s.addr, "web", TYPE_A, None, WAIT).await;
    assert_eq!((r.rcode, r.authoritative), (0, true));
    assert_eq!(a_records(&r), vec![Ipv4Addr::new(10, 0, 1, 2)]);
    let r = udp_query(s.addr, "WWW.front.", TYPE_A, Some(1232), WAIT).await;
    assert_eq!(a_records(&r), vec![Ipv4Addr::new(10, 0, 1, 2)]);
    assert!(r.edns.is_some());
    let r = udp_query(s.addr, "db", TYPE_A, None, WAIT).await;
    assert_eq!(r.rcode, 3, "isolated network: NXDOMAIN");
    let r = udp_query(s.addr, "web", TYPE_AAAA, None, WAIT).await;
    assert_eq!((r.rcode, r.answers.len()), (0, 0), "AAAA: NODATA");
    let r = udp_query(s.addr, "2.1.0.10.in-addr.arpa", TYPE_PTR, None, WAIT).await;
    assert_eq!(r.answers, vec![Record::Ptr("web.front".into())]);
}

#[tokio::test]
async fn big_answers_truncate_over_udp_and_fit_over_tcp() {
    let s = start(Upstream::new(vec![])).await;
    let r = udp_query(s.addr, "many", TYPE_A, None, WAIT).await;
    assert!(r.truncated);
    assert!(r.answers.is_empty());
    let r = udp_query(s.addr, "many", TYPE_A, Some(4096), WAIT).await;
    assert!(!r.truncated, "fits the EDNS size");
    assert_eq!(r.answers.len(), overlay_dns::resolver::MAX_ANSWERS);
    let rs = tcp_queries(s.tcp_addr, &["many", "web", "db"]).await;
    assert!(!rs[0].truncated);
    assert_eq!(rs[0].answers.len(), overlay_dns::resolver::MAX_ANSWERS);
    assert_eq!(a_records(&rs[1]), vec![Ipv4Addr::new(10, 0, 1, 2)]);
    assert_eq!(rs[2].rcode, 3);
}

#[tokio::test]
async fn malformed_packets_get_formerr_or_nothing() {
    let s = start(Upstream::new(vec![])).await;
    // too short: no answer at all
    assert_eq!(udp_raw(s.addr, &[1, 2, 3], Duration::from_millis(200)).await, None);
    // a response: never answered
    let mut q = Vec::new();
    overlay_dns::wire::write_query(7, "web", TYPE_A, None, &mut q).unwrap();
    let mut resp = q.clone();
    resp[2] |= 0x80;
    assert_eq!(udp_raw(s.addr, &resp, Duration::from_millis(200)).await, None);
    // a pointer loop: FORMERR
    let looped = [0, 9, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xC0, 12, 0, 1, 0, 1];
    let r = udp_raw(s.addr, &looped, WAIT).await.expect("an answer");
    let r = overlay_dns::wire::read_response(&r).unwrap();
    assert_eq!((r.id, r.rcode), (9, 1));
    // oversized
    let mut big = q.clone();
    big.resize(5000, 0);
    let r = udp_raw(s.addr, &big, WAIT).await.expect("an answer");
    assert_eq!(overlay_dns::wire::read_response(&r).unwrap().rcode, 1);
    // and the server still answers
    let r = udp_query(s.addr, "web", TYPE_A, None, WAIT).await;
    assert_eq!(r.rcode, 0);
}

#[tokio::test]
async fn forwards_over_udp_and_tcp() {
    let up = FakeUpstream::start(Ipv4Addr::new(127, 0, 0, 53)).await;
    let s = start(Upstream::new(vec![up.addr])).await;
    let r = udp_query(s.addr, "example.test", TYPE_A, None, WAIT).await;
    assert_eq!(a_records(&r), vec![UPSTREAM_ANSWER]);
    assert!(!r.authoritative);
    assert_eq!(up.udp_queries.load(Ordering::SeqCst), 1);
    // client over TCP: upstream over TCP
    let rs = tcp_queries(s.tcp_addr, &["example.test", "web"]).await;
    assert_eq!(a_records(&rs[0]), vec![UPSTREAM_ANSWER]);
    assert_eq!(a_records(&rs[1]), vec![Ipv4Addr::new(10, 0, 1, 2)]);
    assert_eq!(up.tcp_queries.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn truncated_upstream_answer_is_retried_over_tcp() {
    let up = FakeUpstream::start(Ipv4Addr::new(127, 0, 0, 54)).await;
    let s = start(Upstream::new(vec![up.addr])).await;
    let r = udp_query(s.addr, "tc.test", TYPE_A, None, WAIT).await;
    assert!(!r.truncated);
    assert_eq!(r.answers.len(), 3);
    assert_eq!(up.udp_queries.load(Ordering::SeqCst), 1);
    assert_eq!(up.tcp_queries.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn silent_upstreams_give_servfail_within_two_seconds() {
    let (_a, silent_a) = silent_upstream(Ipv4Addr::new(127, 0, 0, 55)).await;
    let (_b, silent_b) = silent_upstream(Ipv4Addr::new(127, 0, 0, 56)).await;
    let s = start(Upstream::new(vec![silent_a, silent_b])).await;
    let t = Instant::now();
    let r = udp_query(s.addr, "example.test", TYPE_A, None, WAIT).await;
    let took = t.elapsed();
    assert_eq!(r.rcode, 2, "SERVFAIL");
    assert!(took < Duration::from_millis(2300), "took {took:?}");
    assert!(took >= Duration::from_millis(1900), "gave up early: {took:?}");
    // and over TCP, where the upstream port is closed (refused at once)
    let t = Instant::now();
    let rs = tcp_queries(s.tcp_addr, &["example.test"]).await;
    assert_eq!(rs[0].rcode, 2);
    assert!(t.elapsed() < Duration::from_millis(2300));
}

#[tokio::test]
async fn picks_up_new_views() {
    let s = start(Upstream::new(vec![])).await;
    let r = udp_query(s.addr, "newcomer", TYPE_A, None, WAIT).await;
    assert_eq!(r.rcode, 2, "unknown name, no upstreams: SERVFAIL");
    let view = DnsView::build(&catalog(
        &[("front", "10.0.1.0/24", false)],
        &[("client", &[("front", "10.0.1.10", &[])]), ("newcomer", &[("front", "10.0.1.77", &[])])],
        &[],
    ));
    s.views.send(Arc::new(view)).unwrap();
    let r = udp_query(s.addr, "newcomer", TYPE_A, None, WAIT).await;
    assert_eq!(a_records(&r), vec![Ipv4Addr::new(10, 0, 1, 77)]);
}

#[tokio::test]
async fn stops_on_shutdown() {
    let mut s = start(Upstream::new(vec![])).await;
    let _ = udp_query(s.addr, "web", TYPE_A, None, WAIT).await;
    s.stop.take().unwrap().send(()).unwrap();
    let result = tokio::time::timeout(WAIT, &mut s.task).await.expect("stops").expect("no panic");
    assert!(result.is_ok());
}

#[tokio::test]
async fn idle_tcp_connections_are_closed() {
    use tokio::io::AsyncReadExt;
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tcp_addr = tcp.local_addr().unwrap();
    let (_views, rx) = watch::channel(Arc::new(test_view()));
    let config =
        overlay_dns::ServerConfig { tcp_idle: Duration::from_millis(200), ..Default::default() };
    tokio::spawn(overlay_dns::serve_with(
        udp,
        tcp,
        "client".into(),
        rx,
        Arc::new(Upstream::new(vec![])),
        config,
        std::future::pending::<()>(),
    ));
    let mut stream = tokio::net::TcpStream::connect(tcp_addr).await.unwrap();
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(WAIT, stream.read(&mut buf)).await.expect("closed in time");
    assert_eq!(n.unwrap_or(0), 0, "server closed the idle connection");
}

#[tokio::test]
async fn tcp_connection_limit() {
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tcp_addr = tcp.local_addr().unwrap();
    let (_views, rx) = watch::channel(Arc::new(test_view()));
    let config = overlay_dns::ServerConfig { max_tcp_connections: 2, ..Default::default() };
    tokio::spawn(overlay_dns::serve_with(
        udp,
        tcp,
        "client".into(),
        rx,
        Arc::new(Upstream::new(vec![])),
        config,
        std::future::pending::<()>(),
    ));
    let _a = tokio::net::TcpStream::connect(tcp_addr).await.unwrap();
    let _b = tokio::net::TcpStream::connect(tcp_addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut c = tokio::net::TcpStream::connect(tcp_addr).await.unwrap();
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(WAIT, c.read(&mut buf)).await.expect("closed in time");
    assert_eq!(n.unwrap_or(0), 0, "third connection refused");
    drop((_a, _b));
    tokio::time::sleep(Duration::from_millis(100)).await;
    // a slot frees up once a connection ends
    let rs = tcp_queries(tcp_addr, &["web"]).await;
    assert_eq!(rs[0].rcode, 0);
}
