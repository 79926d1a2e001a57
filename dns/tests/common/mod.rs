//! Helpers shared by the integration tests: a fake upstream resolver on loopback and a
//! tiny DNS client. Nothing here sends to anything but 127.0.0.0/8.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use overlay_dns::wire::{self, Rdata, ResponseSummary, TYPE_A};
use overlay_dns::Rcode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// The address fake upstreams answer with.
pub const UPSTREAM_ANSWER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

/// A fake upstream resolver on `ip` (a loopback address), UDP and TCP on one port:
/// * `tc.test`: TC over UDP, three A records over TCP;
/// * `silent.test`: never answers;
/// * other names under `.test`: one A record, [`UPSTREAM_ANSWER`];
/// * anything else: NXDOMAIN (so search-domain attempts by glibc fail cleanly).
///
/// Counts the queries it received.
pub struct FakeUpstream {
    pub addr: SocketAddr,
    pub udp_queries: Arc<AtomicUsize>,
    pub tcp_queries: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn fake_answer(packet: &[u8], tcp: bool) -> Option<Vec<u8>> {
    let q = wire::parse(packet).ok()?;
    let name = q.name.to_dotted().to_ascii_lowercase();
    let mut out = Vec::new();
    let three = [UPSTREAM_ANSWER, Ipv4Addr::new(192, 0, 2, 2), Ipv4Addr::new(192, 0, 2, 3)];
    match name.as_str() {
        "silent.test" => return None,
        "tc.test" if !tcp => {
            wire::write_response(&q, Rcode::NoError, false, Rdata::A(&three), 60, 0, &mut out)
        }
        "tc.test" => {
            wire::write_response(&q, Rcode::NoError, false, Rdata::A(&three), 60, 65535, &mut out)
        }
        n if !n.ends_with(".test") => {
            wire::write_response(&q, Rcode::NxDomain, false, Rdata::None, 60, 65535, &mut out)
        }
        _ => wire::write_response(
            &q,
            Rcode::NoError,
            false,
            Rdata::A(&[UPSTREAM_ANSWER]),
            60,
            65535,
            &mut out,
        ),
    }
    Some(out)
}

impl FakeUpstream {
    pub async fn start(ip: Ipv4Addr) -> FakeUpstream {
        // find a port free for both UDP and TCP
        let (udp, tcp) = loop {
            let udp = UdpSocket::bind((ip, 0)).await.unwrap();
            let port = udp.local_addr().unwrap().port();
            if let Ok(tcp) = TcpListener::bind((ip, port)).await {
                break (udp, tcp);
            }
        };
        let addr = udp.local_addr().unwrap();
        let udp_queries = Arc::new(AtomicUsize::new(0));
        let tcp_queries = Arc::new(AtomicUsize::new(0));
        let counter = udp_queries.clone();
        let udp_task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((n, peer)) = udp.recv_from(&mut buf).await {
                counter.fetch_add(1, Ordering::SeqCst);
                if let Some(resp) = fake_answer(&buf[..n], false) {
                    let _ = udp.send_to(&resp, peer).await;
                }
            }
        });
        let counter = tcp_queries.clone();
        let tcp_task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = tcp.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    loop {
                        let mut len = [0u8; 2];
                        if stream.read_exact(&mut len).await.is_err() {
                            return;
                        }
                        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
                        if stream.read_exact(&mut buf).await.is_err() {
                            return;
                        }
                        counter.fetch_add(1, Ordering::SeqCst);
                        if let Some(resp) = fake_answer(&buf, true) {
                            let mut framed = (resp.len() as u16).to_be_bytes().to_vec();
                            framed.extend_from_slice(&resp);
                            if stream.write_all(&framed).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        FakeUpstream { addr, udp_queries, tcp_queries, tasks: vec![udp_task, tcp_task] }
    }
}

/// A UDP socket on loopback that never answers: an upstream that is down but does
/// not refuse (no ICMP port unreachable).
pub async fn silent_upstream(ip: Ipv4Addr) -> (UdpSocket, SocketAddr) {
    let sock = UdpSocket::bind((ip, 0)).await.unwrap();
    let addr = sock.local_addr().unwrap();
    (sock, addr)
}

/// Sends one query over UDP and waits up to `wait` for the answer.
pub async fn udp_query(
    server: SocketAddr,
    name: &str,
    qtype: u16,
    edns: Option<u16>,
    wait: Duration,
) -> ResponseSummary {
    let sock = UdpSocket::bind((server.ip(), 0)).await.unwrap();
    let mut q = Vec::new();
    wire::write_query(0xBEEF, name, qtype, edns, &mut q).unwrap();
    sock.send_to(&q, server).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let (n, _) = tokio::time::timeout(wait, sock.recv_from(&mut buf))
        .await
        .expect("answer in time")
        .unwrap();
    let r = wire::read_response(&buf[..n]).expect("well-formed response");
    assert_eq!(r.id, 0xBEEF);
    r
}

/// Sends raw bytes over UDP; returns the response bytes, or None after `wait`.
pub async fn udp_raw(server: SocketAddr, packet: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let sock = UdpSocket::bind((server.ip(), 0)).await.unwrap();
    sock.send_to(packet, server).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let (n, _) = tokio::time::timeout(wait, sock.recv_from(&mut buf)).await.ok()?.ok()?;
    buf.truncate(n);
    Some(buf)
}

/// Sends several queries on one TCP connection and reads their answers.
pub async fn tcp_queries(server: SocketAddr, names: &[&str]) -> Vec<ResponseSummary> {
    let mut stream = TcpStream::connect(server).await.unwrap();
    let mut out = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let mut q = Vec::new();
        wire::write_query(i as u16, name, TYPE_A, None, &mut q).unwrap();
        let mut framed = (q.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&q);
        stream.write_all(&framed).await.unwrap();
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).await.unwrap();
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut buf).await.unwrap();
        let r = wire::read_response(&buf).expect("well-formed response");
        assert_eq!(r.id, i as u16);
        out.push(r);
    }
    out
}
