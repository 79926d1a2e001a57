//! `overlay-lab up|down|status|ctl ARGS…`: the embedded default — a 3-host overlay
//! cluster (underlay switch, 3 host namespaces, 3 controllers, 3 agents) on this
//! machine, left running for people to try `overlayctl` against. `down` removes every
//! namespace, device and process it made. Needs root.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use overlay_tests::lab::{bin_dir, run, Lab, LabOptions, OUTSIDE_IP};
use serde::{Deserialize, Serialize};

const ID: &str = "ovtlab";
const STATE: &str = "/run/overlay-lab.json";

#[derive(Serialize, Deserialize)]
struct State {
    id: String,
    hosts: usize,
    dir: PathBuf,
    urls: String,
    pids: Vec<(String, u32)>,
}

fn load() -> Option<State> {
    serde_json::from_str(&std::fs::read_to_string(STATE).ok()?).ok()
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn ctl_args(state: &State, args: &[String]) -> Vec<String> {
    let mut all = vec![
        "nsenter".to_string(),
        format!("--net=/var/run/netns/{}h1", state.id),
        "--".into(),
        bin_dir().join("overlayctl").display().to_string(),
        "--controller".into(),
        state.urls.clone(),
    ];
    all.extend(args.iter().cloned());
    all
}

fn up() -> Result<(), String> {
    if load().is_some() {
        return Err(format!("a lab is already up ({STATE}); run `down` first"));
    }
    let lab = Lab::start_with(LabOptions { hosts: 3, id: Some(ID.into()), detached: true })
        .map_err(|e| format!("{e:#}"))?;
    let state = State {
        id: lab.id.clone(),
        hosts: lab.hosts,
        dir: lab.dir.clone(),
        urls: lab.controller_urls(),
        pids: lab.pids(),
    };
    std::fs::write(STATE, serde_json::to_vec_pretty(&state).map_err(|e| e.to_string())?)
        .map_err(|e| format!("{STATE}: {e}"))?;
    let ctl = ctl_args(&state, &[]).join(" ");
    println!(
        "lab up: hosts h1..h3 in namespaces {ID}h1..{ID}h3 (underlay 192.168.217.0/24), logs in {}",
        state.dir.display()
    );
    println!("\nuse overlayctl from host h1:\n\n    {ctl} host ls\n\nor simply:\n\n    ./scripts/lab.sh ctl host ls");
    println!("    ./scripts/lab.sh ctl network create frontend --subnet 10.0.1.0/24");
    println!("    ./scripts/lab.sh ctl endpoint create web --host h1 --network frontend");
    println!("    ./scripts/lab.sh ctl endpoint create api --host h2 --network frontend");
    println!("    ip netns exec web ping api          # by name, across hosts");
    println!("    ip netns exec web ping {OUTSIDE_IP}  # the lab's \"outside\" address");
    lab.detach();
    Ok(())
}

fn down() -> Result<(), String> {
    let state = load();
    let (id, hosts, dir) = match &state {
        Some(s) => (s.id.clone(), s.hosts, s.dir.clone()),
        None => (ID.to_string(), 3, std::env::temp_dir().join(ID)),
    };
    if let Some(s) = &state {
        for (_, pid) in &s.pids {
            // SAFETY: kill(2) on processes this tool started.
            unsafe {
                libc::kill(*pid as libc::pid_t, libc::SIGKILL);
            }
        }
    }
    let mut names = vec![];
    for i in 1..=hosts {
        if let Ok(text) =
            std::fs::read_to_string(dir.join(format!("agent{i}")).join("namespaces.json"))
        {
            names.extend(serde_json::from_str::<Vec<String>>(&text).unwrap_or_default());
        }
    }
    if let Ok(d) = std::fs::read_dir("/var/run/netns") {
        names.extend(
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&id)),
        );
    }
    for n in &names {
        let _ = run(&["ip", "netns", "del", n]);
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{n}"));
    }
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(STATE);
    println!("lab down: removed {} namespaces", names.len());
    Ok(())
}

fn status() -> Result<(), String> {
    let state = load().ok_or("no lab is up")?;
    for (what, pid) in &state.pids {
        println!("{what:12} pid {pid:7} {}", if alive(*pid) { "running" } else { "gone" });
    }
    let out = run(&ctl_args(&state, &["host".into(), "ls".into()])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

fn ctl(args: &[String]) -> Result<ExitCode, String> {
    let state = load().ok_or("no lab is up")?;
    let all = ctl_args(&state, args);
    let status =
        std::process::Command::new(&all[0]).args(&all[1..]).status().map_err(|e| e.to_string())?;
    Ok(if status.success() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("up") => up().map(|_| ExitCode::SUCCESS),
        Some("down") => down().map(|_| ExitCode::SUCCESS),
        Some("status") => status().map(|_| ExitCode::SUCCESS),
        Some("ctl") => ctl(&args[1..]),
        _ => Err("usage: overlay-lab up|down|status|ctl OVERLAYCTL-ARGS...".into()),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
