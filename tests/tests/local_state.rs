//! Local state is disposable (issue 15, SPEC.md): an agent whose data directory is
//! corrupted or deleted rebuilds from the controller and the kernel, through the real
//! binaries in the namespace lab. For each of the two cases (agent SIGKILLed, its files
//! overwritten with garbage / its data dir removed, agent started again):
//!
//! * existing endpoints keep resolving names and reach their peers;
//! * the agent takes its namespaces back from their marks (no "not created by
//!   overlay-agent" for its own), a new endpoint on that host becomes ready;
//! * `endpoint rm` removes the namespace (it is still recognized as the agent's);
//! * damaged files are set aside (`NAME.corrupt-…`), not failing passes forever.
//!
//! Needs root; skipped without. Everything it creates carries the lab's prefix.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use overlay_tests::lab::{run_cases, wait_for, Lab};

const T: Duration = Duration::from_secs(30);
const NET: &str = "ls";

fn ip_of(lab: &Lab, name: &str) -> Result<String> {
    let v = lab.ctl_json(&["endpoint", "inspect", name])?;
    Ok(v["attachments"][0]["ip"].as_str().context("no ip")?.to_string())
}

fn setup(lab: &mut Lab) -> Result<()> {
    lab.ctl_ok(&["network", "create", NET, "--subnet", "10.0.43.0/24"])?;
    for (short, host) in [("a", 1), ("b", 2)] {
        lab.endpoint(short, host, NET, &[])?;
    }
    Ok(())
}

/// `a` (on h1) still resolves `b` and reaches it, and `b` reaches `a`.
fn existing_work(lab: &Lab) -> Result<()> {
    let (a, b) = (lab.ep("a"), lab.ep("b"));
    let (a_ip, b_ip) = (ip_of(lab, &a)?, ip_of(lab, &b)?);
    wait_for(T, "a to resolve b", || {
        let out = lab.exec(&a, &["getent", "hosts", &b]);
        String::from_utf8_lossy(&out.stdout).contains(&b_ip).then_some(())
    })?;
    lab.ping_ok(&a, &b_ip, T)?;
    lab.ping_ok(&b, &a_ip, T)?;
    Ok(())
}

/// After the agent on h1 came back: it owns its endpoints again, creates and removes.
fn rebuilt(lab: &Lab, round: &str) -> Result<()> {
    existing_work(lab)?;
    let a = lab.ep("a");
    wait_for(T, "a to be ready again", || {
        (lab.ctl_json(&["endpoint", "inspect", &a]).ok()?["status"] == "ready").then_some(())
    })?;
    let log = lab.agent_log(1);
    ensure!(
        !log.contains(&format!("namespace {a} exists and was not created by overlay-agent")),
        "the agent did not recognize its own namespace"
    );
    // A new endpoint: the create waits until it is ready.
    let c = lab.endpoint(&format!("c{round}"), 1, NET, &[])?;
    let b = lab.ep("b");
    let out = lab.exec(&c, &["getent", "hosts", &b]);
    ensure!(out.status.success(), "new endpoint {c} cannot resolve {b}");
    // Removing it removes its namespace.
    lab.ctl_ok(&["endpoint", "rm", &c])?;
    wait_for(T, "the removed endpoint's namespace to go", || {
        (!Path::new(&format!("/var/run/netns/{c}")).exists()).then_some(())
    })?;
    Ok(())
}

fn corrupted_data_dir(lab: &mut Lab) -> Result<()> {
    existing_work(lab)?;
    lab.kill_agent(1);
    let dir = lab.agent_data_dir(1);
    let mut damaged = vec![];
    for name in ["desired.json", "namespaces.json", "cluster-id", "cni.json"] {
        let path = dir.join(name);
        // Garbage over whatever is there (also where the file did not exist yet).
        std::fs::write(&path, b"\x00\xffthis is not what you think}{")?;
        damaged.push(name);
    }
    std::fs::write(dir.join("tls").join("agent.pem"), b"-----BEGIN GARBAGE-----\n")?;
    lab.start_agent(1)?;
    rebuilt(lab, "1")?;
    let names: Vec<String> = std::fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    for name in ["desired.json", "namespaces.json", "cni.json"] {
        ensure!(
            names.iter().any(|n| n.starts_with(&format!("{name}.corrupt-"))),
            "{name} was not set aside: {names:?}"
        );
    }
    ensure!(damaged.len() == 4);
    Ok(())
}

fn deleted_data_dir(lab: &mut Lab) -> Result<()> {
    lab.kill_agent(1);
    std::fs::remove_dir_all(lab.agent_data_dir(1))?;
    lab.start_agent(1)?;
    rebuilt(lab, "2")?;
    // The endpoint made before the data dir was lost is still the agent's to remove.
    let a = lab.ep("a");
    lab.ctl_ok(&["endpoint", "rm", &a])?;
    wait_for(T, "a's namespace to go", || {
        (!Path::new(&format!("/var/run/netns/{a}")).exists()).then_some(())
    })?;
    Ok(())
}

#[test]
fn local_state_is_disposable() {
    run_cases(&[
        ("setup", setup),
        ("corrupted data dir", corrupted_data_dir),
        ("deleted data dir", deleted_data_dir),
    ]);
}
