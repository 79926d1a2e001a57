//! Name lookups inside endpoints keep working while the agent restarts (issue 15,
//! SPEC.md "Local state is disposable"), through the real binaries in the namespace lab.
//!
//! An endpoint on h1 asks 127.0.0.11 without pause, one UDP query at a time, each
//! answered within a second or counted as failed (no retries: stricter than a resolver):
//! a peer's name (answered from the overlay's records) and a name the DNS forwards to
//! the host's resolvers (a small responder this test runs on the lab's "outside"
//! address). Meanwhile h1's agent is SIGKILLed and started again, then stopped with
//! SIGTERM and started again. Not one lookup may fail; a name created while the agent
//! was down resolves once it is back.
//!
//! Needs root; skipped without. Everything it creates carries the lab's prefix; traffic
//! stays inside the lab's namespaces.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{Ipv4Addr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use overlay_tests::lab::{in_netns, run_cases, wait_for, Lab, OUTSIDE_IP};

const T: Duration = Duration::from_secs(30);
const NET: &str = "dr";
/// What the test's upstream answers for every name.
const FORWARDED_ANSWER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 77);
const FORWARDED_NAME: &str = "www.example.test";

/// A query for `name` (type A, class IN) with id `id`.
fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// One lookup from the calling thread's namespace: `Ok(answers)` for a NOERROR reply
/// with id `id`, else why not.
fn lookup(sock: &UdpSocket, id: u16, name: &str) -> std::result::Result<u16, String> {
    sock.send_to(&query(id, name), "127.0.0.11:53").map_err(|e| format!("send: {e}"))?;
    let mut buf = [0u8; 1500];
    loop {
        let n = sock.recv(&mut buf).map_err(|e| format!("no answer: {e}"))?;
        if n < 12 || u16::from_be_bytes([buf[0], buf[1]]) != id {
            continue; // a late answer to an earlier query
        }
        let rcode = buf[3] & 0x0f;
        let answers = u16::from_be_bytes([buf[6], buf[7]]);
        return match (rcode, answers) {
            (0, n) if n > 0 => Ok(n),
            (rcode, n) => Err(format!("rcode {rcode}, {n} answers")),
        };
    }
}

/// A DNS responder at OUTSIDE_IP:53 in the switch namespace: every A query gets
/// [`FORWARDED_ANSWER`]. Runs until `stop`.
fn upstream(lab: &Lab, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let ns = lab.switch_ns();
    std::thread::spawn(move || {
        let _ = in_netns(&ns, || {
            let sock = UdpSocket::bind((OUTSIDE_IP, 53)).expect("bind the test upstream");
            sock.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
            let mut buf = [0u8; 1500];
            while !stop.load(Ordering::Relaxed) {
                let Ok((n, peer)) = sock.recv_from(&mut buf) else { continue };
                if n < 17 {
                    continue;
                }
                let mut r = buf[..n].to_vec();
                r[2] = 0x81; // response, recursion desired
                r[3] = 0x80; // recursion available, NOERROR
                r[6..8].copy_from_slice(&1u16.to_be_bytes());
                r[8..12].fill(0);
                r.truncate(n);
                // Answer: pointer to the question's name, A, IN, TTL 60, 4 bytes.
                r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
                r.extend_from_slice(&FORWARDED_ANSWER.octets());
                let _ = sock.send_to(&r, peer);
            }
        });
    })
}

/// Asks from namespace `ns` without pause until `stop`; returns (asked, failures).
fn ask_forever(
    ns: String,
    names: Vec<String>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Result<(usize, Vec<String>)>> {
    std::thread::spawn(move || {
        in_netns(&ns, || {
            let sock = UdpSocket::bind("0.0.0.0:0").context("bind")?;
            sock.set_read_timeout(Some(Duration::from_secs(1)))?;
            let (mut asked, mut failed) = (0usize, Vec::new());
            let mut id: u16 = 1;
            while !stop.load(Ordering::Relaxed) {
                for name in &names {
                    id = id.wrapping_add(1);
                    asked += 1;
                    if let Err(why) = lookup(&sock, id, name) {
                        failed.push(format!("{name}: {why}"));
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok((asked, failed))
        })?
    })
}

fn setup(lab: &mut Lab) -> Result<()> {
    lab.ctl_ok(&["network", "create", NET, "--subnet", "10.0.45.0/24"])?;
    lab.endpoint("a", 1, NET, &[])?;
    lab.endpoint("b", 2, NET, &[])?;
    Ok(())
}

fn lookups_survive_restarts(lab: &mut Lab) -> Result<()> {
    let (a, b) = (lab.ep("a"), lab.ep("b"));
    let stop_upstream = Arc::new(AtomicBool::new(false));
    let up = upstream(lab, stop_upstream.clone());
    // Both kinds answer before anything happens (positive control).
    wait_for(T, "both names to resolve from a", || {
        in_netns(&a, || {
            let sock = UdpSocket::bind("0.0.0.0:0").ok()?;
            sock.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
            (lookup(&sock, 7, &b).is_ok() && lookup(&sock, 8, FORWARDED_NAME).is_ok()).then_some(())
        })
        .ok()
        .flatten()
    })?;
    let stop = Arc::new(AtomicBool::new(false));
    let asker = ask_forever(a.clone(), vec![b.clone(), FORWARDED_NAME.to_string()], stop.clone());
    let passes = |log: &str| log.matches("reconcile").count();

    std::thread::sleep(Duration::from_secs(1));
    lab.kill_agent(1);
    // A name created while the agent is down.
    let c = lab.ep("c");
    lab.ctl_ok(&["endpoint", "create", &c, "--host", "h2", "--network", NET, "--no-wait"])?;
    std::thread::sleep(Duration::from_secs(1));
    let before = passes(&lab.agent_log(1));
    lab.start_agent(1)?;
    wait_for(T, "the restarted agent to reconcile", || {
        (passes(&lab.agent_log(1)) > before + 1).then_some(())
    })?;
    std::thread::sleep(Duration::from_secs(1));
    lab.stop_agent(1);
    std::thread::sleep(Duration::from_secs(1));
    lab.start_agent(1)?;
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let (asked, failed) = asker.join().map_err(|_| anyhow::anyhow!("asker panicked"))??;
    // The name made while the agent was down resolves now that it is back.
    let c_resolves = wait_for(T, "the name created during the restart to resolve", || {
        in_netns(&a, || {
            let sock = UdpSocket::bind("0.0.0.0:0").ok()?;
            sock.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
            lookup(&sock, 9, &c).ok()
        })
        .ok()
        .flatten()
    });
    stop_upstream.store(true, Ordering::Relaxed);
    let _ = up.join();
    eprintln!("{asked} lookups across a SIGKILL and a SIGTERM restart, {} failed", failed.len());
    ensure!(asked > 100, "only {asked} lookups were made");
    ensure!(
        failed.is_empty(),
        "{} of {asked} lookups failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(10)]
    );
    c_resolves?;
    lab.ctl_ok(&["endpoint", "rm", &c])?;
    Ok(())
}

#[test]
fn dns_through_agent_restarts() {
    run_cases(&[("setup", setup), ("lookups survive agent restarts", lookups_survive_restarts)]);
}
