//! A controller member whose disk is full (issue 15), through the real binaries in the
//! namespace lab: each member's data dir is moved onto a small tmpfs, then one member's
//! tmpfs is filled to the last byte and writes large enough to need new pages go on.
//!
//! * a full follower stops taking part (it says why, in its log and to a client that
//!   asks it), without crash-looping; the majority goes on taking writes;
//! * a full leader loses leadership; a new leader takes the writes;
//! * once space is freed, the member takes part again by itself and catches up;
//! * nothing acknowledged is lost: every write that succeeded is on every member, whose
//!   states end identical (same digest).
//!
//! Needs root; skipped without. Everything it creates carries the lab's prefix.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use overlay_tests::lab::{run_cases, wait_for, Lab};

const T: Duration = Duration::from_secs(60);
const NET: &str = "df";
/// Each member's tmpfs.
const TMPFS_MIB: u32 = 16;

fn cluster(lab: &Lab) -> Result<serde_json::Value> {
    lab.ctl_json(&["cluster", "status"])
}

fn leader(lab: &Lab) -> Option<usize> {
    let v = cluster(lab).ok()?;
    let id = v["leader"].as_u64()? as usize;
    (1..=3).contains(&id).then_some(id)
}

/// All three members reachable, with one leader, the same commit index and digest.
fn in_sync(lab: &Lab) -> Option<()> {
    let v = cluster(lab).ok()?;
    let members = v["members"].as_array()?;
    let ok = members.len() == 3
        && members.iter().all(|m| m["reachable"] == true)
        && members.iter().filter(|m| m["role"] == "leader").count() == 1
        && members.iter().all(|m| m["commit_index"] == members[0]["commit_index"])
        && members.iter().all(|m| m["digest"] == members[0]["digest"]);
    ok.then_some(())
}

fn setup(lab: &mut Lab) -> Result<()> {
    for i in 1..=3 {
        lab.controller_on_tmpfs(i, TMPFS_MIB)?;
        wait_for(T, "the cluster back in sync after moving a data dir", || in_sync(lab))?;
    }
    lab.ctl_ok(&["network", "create", NET, "--subnet", "10.0.44.0/24"])?;
    Ok(())
}

/// Fills the file system holding `dir` to the last byte; returns the filler file.
fn fill(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path)?;
    let chunk = vec![0xa5u8; 64 * 1024];
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => return Err(e.into()),
        }
    }
    // The last partial chunks, byte-sized.
    while let Ok(n) = f.write(&chunk[..512]) {
        if n == 0 {
            break;
        }
    }
    Ok(path)
}

/// A write big enough that its raft entry needs pages of its own: an endpoint with 40
/// long aliases (about 2.5 KB). `None` if it failed.
fn big_write(lab: &Lab, n: usize) -> Option<String> {
    let name = lab.ep(&format!("w{n}"));
    let aliases: Vec<String> =
        (0..40).map(|k| format!("{}-alias-{k:02}-{}", lab.id, "x".repeat(30))).collect();
    let mut args =
        vec!["endpoint", "create", name.as_str(), "--host", "h1", "--network", NET, "--no-wait"];
    for a in &aliases {
        args.push("--alias");
        args.push(a);
    }
    lab.ctl_ok(&args).ok().map(|_| name)
}

/// Fills member `m`'s disk, writes until it stalls, checks the rest goes on, frees the
/// space, and checks it comes back with everything.
fn full_member(lab: &mut Lab, m: usize, acknowledged: &mut Vec<String>) -> Result<()> {
    let log_start = lab.controller_log(m).len();
    let filler = fill(&lab.controller_data_dir(m))?;
    let mut n = acknowledged.len();
    let stalled = wait_for(T, &format!("member {m} to stall on its full disk"), || {
        n += 1;
        if let Some(name) = big_write(lab, n) {
            acknowledged.push(name);
        }
        let log = lab.controller_log(m);
        log[log_start..].contains("raft log cannot be written").then_some(log)
    })?;
    ensure!(
        stalled[log_start..].contains("No space left on device"),
        "member {m}'s log does not name the full disk:\n{}",
        &stalled[log_start..]
    );
    // The majority goes on: writes keep succeeding, a leader other than m.
    for _ in 0..3 {
        n += 1;
        let name =
            big_write(lab, n).with_context(|| format!("a write while member {m} is full"))?;
        acknowledged.push(name);
    }
    let l = wait_for(T, "a leader other than the full member", || leader(lab).filter(|l| *l != m))?;
    ensure!(l != m);
    // Asked alone, the full member says why (one line, the reason).
    let out = lab.ctl_via(1, &Lab::controller_url(m), &["network", "ls"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    ensure!(!out.status.success(), "a full member answered a read");
    ensure!(
        err.contains("is not serving") && err.contains("No space left on device"),
        "the full member said: {err}"
    );
    // Not crash-looping: its process is still the one we started.
    ensure!(
        !lab.controller_log(m)[log_start..].contains("raft driver failed"),
        "member {m} exited"
    );

    std::fs::remove_file(&filler)?;
    wait_for(T, &format!("member {m} to take part again"), || {
        lab.controller_log(m)[log_start..].contains("takes part again").then_some(())
    })?;
    wait_for(T, "the cluster in sync again", || in_sync(lab))?;
    // Nothing acknowledged is lost, on any member (each asked alone, from its own state).
    for i in 1..=3 {
        let out = lab.ctl_via(1, &Lab::controller_url(i), &["-o", "json", "endpoint", "ls"]);
        ensure!(out.status.success(), "member {i}: {}", String::from_utf8_lossy(&out.stderr));
        let list: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let names: Vec<&str> =
            list.as_array().context("ls")?.iter().filter_map(|e| e["name"].as_str()).collect();
        for a in acknowledged.iter() {
            if !names.contains(&a.as_str()) {
                bail!("acknowledged write {a} is missing on member {i}");
            }
        }
    }
    Ok(())
}

fn full_follower(lab: &mut Lab) -> Result<()> {
    let l = wait_for(T, "a leader", || leader(lab))?;
    let follower = (1..=3).find(|i| *i != l).context("no follower")?;
    let mut acknowledged = vec![];
    full_member(lab, follower, &mut acknowledged)?;
    eprintln!("follower {follower}: {} acknowledged writes kept", acknowledged.len());
    for name in acknowledged {
        lab.ctl_ok(&["endpoint", "rm", &name])?;
    }
    Ok(())
}

fn full_leader(lab: &mut Lab) -> Result<()> {
    let l = wait_for(T, "a leader", || leader(lab))?;
    let mut acknowledged = vec![];
    full_member(lab, l, &mut acknowledged)?;
    eprintln!("leader {l}: {} acknowledged writes kept", acknowledged.len());
    Ok(())
}

#[test]
fn disk_full() {
    run_cases(&[
        ("setup: data dirs on small tmpfs", setup),
        ("a full follower stalls, the majority goes on, it comes back", full_follower),
        ("a full leader loses leadership and comes back", full_leader),
    ]);
}
