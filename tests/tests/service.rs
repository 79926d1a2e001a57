//! Running overlay as a service: the install script, the systemd units, the example and
//! provisioned configs (checked against the real daemons), the Vagrant files, the agent
//! under exactly the unit's capabilities, and the README followed literally on a clean
//! clone (demo lab up, walk-through, idempotent `up`, smoke script, `down` leaves
//! nothing behind).
//!
//! Tests that need root (network namespaces) skip without it, like the other e2e tests.
//! Tests that run the workspace binaries expect `cargo build --workspace --bins` first
//! (scripts/test.sh does that).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use overlay_tests::lab::{bin_dir, can_run, wait_for, Lab};

/// Held by tests that run or rebuild the workspace binaries: the clean-clone test
/// rebuilds them in place.
static BINARIES: Mutex<()> = Mutex::new(());

fn lock_binaries() -> std::sync::MutexGuard<'static, ()> {
    BINARIES.lock().unwrap_or_else(|e| e.into_inner())
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn sh(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn have(tool: &str) -> bool {
    sh(Command::new("sh").args(["-c", &format!("command -v {tool}")])).status.success()
}

fn workspace_bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(p.exists(), "{} is missing: run `cargo build --workspace --bins` first", p.display());
    p
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("ovsvc-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }

    fn path(&self) -> &str {
        self.0.to_str().expect("utf-8 temp dir")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const BINARY_NAMES: [&str; 4] =
    ["overlay-controller", "overlay-agent", "overlayctl", "overlay-cni"];

/// Stand-ins for the four binaries (install.sh only copies them).
fn fake_binaries(dir: &Path) -> String {
    let bins = dir.join("fake-bin");
    std::fs::create_dir_all(&bins).expect("fake-bin");
    for b in BINARY_NAMES {
        std::fs::write(bins.join(b), format!("#!/bin/sh\necho fake {b}\n")).expect("fake binary");
    }
    bins.display().to_string()
}

fn install(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(repo().join("deploy/install.sh"));
    cmd.args(args).env_remove("DESTDIR").env_remove("PREFIX");
    for (k, v) in env {
        cmd.env(k, v);
    }
    sh(&mut cmd)
}

/// Every file under `root` (symlinks as their target): relative path -> (mode, content).
fn snapshot(root: &Path) -> BTreeMap<String, (u32, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (u32, Vec<u8>)>) {
        for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
            let p = e.path();
            let meta = std::fs::symlink_metadata(&p).expect("metadata");
            let rel = p.strip_prefix(root).expect("under root").display().to_string();
            if meta.is_dir() {
                walk(root, &p, out);
            } else if meta.is_symlink() {
                let target = std::fs::read_link(&p).expect("read_link");
                out.insert(rel, (0, target.display().to_string().into_bytes()));
            } else {
                let content = std::fs::read(&p).expect("read");
                out.insert(rel, (meta.permissions().mode() & 0o7777, content));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn read(path: impl AsRef<Path>) -> String {
    let path = path.as_ref();
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The one-line error of a failed script run.
fn one_line_error(out: &Output) -> String {
    assert!(!out.status.success(), "expected a failure: {}", text(out));
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(err.lines().count(), 1, "expected one line: {}", text(out));
    assert!(err.starts_with("error: "), "{}", text(out));
    err
}

#[test]
fn install_script_places_every_file_keeps_configs_and_is_idempotent() {
    let tmp = TempDir::new("install");
    let from = fake_binaries(&tmp.0);
    let root = tmp.0.join("root");
    let root_s = root.display().to_string();

    let out = install(&["--from", &from, "--destdir", &root_s], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let files = snapshot(&root);
    let expected: BTreeMap<String, u32> = [
        ("usr/local/bin/overlay-controller", 0o755),
        ("usr/local/bin/overlay-agent", 0o755),
        ("usr/local/bin/overlayctl", 0o755),
        ("usr/lib/cni/overlay-cni", 0o755),
        ("opt/cni/bin/overlay-cni", 0o755),
        ("etc/systemd/system/overlay-controller.service", 0o644),
        ("etc/systemd/system/overlay-agent.service", 0o644),
        ("etc/overlay/controller.toml", 0o644),
        ("etc/overlay/agent.toml", 0o644),
        ("etc/sysctl.d/99-overlay.conf", 0o644),
        ("usr/local/share/doc/overlay/README.md", 0o644),
        ("usr/local/share/doc/overlay/controller.toml", 0o644),
        ("usr/local/share/doc/overlay/agent.toml", 0o644),
    ]
    .into_iter()
    .map(|(p, m)| (p.to_string(), m))
    .collect();
    let modes: BTreeMap<String, u32> = files.iter().map(|(k, (m, _))| (k.clone(), *m)).collect();
    assert_eq!(modes, expected);
    for (installed, source) in [
        ("etc/overlay/agent.toml", repo().join("deploy/agent.toml")),
        ("etc/overlay/controller.toml", repo().join("deploy/controller.toml")),
        ("usr/local/share/doc/overlay/agent.toml", repo().join("deploy/agent.toml")),
        ("etc/sysctl.d/99-overlay.conf", repo().join("deploy/99-overlay.conf")),
        ("usr/local/share/doc/overlay/README.md", repo().join("README.md")),
        ("usr/local/bin/overlay-agent", Path::new(&from).join("overlay-agent")),
        ("usr/lib/cni/overlay-cni", Path::new(&from).join("overlay-cni")),
        ("opt/cni/bin/overlay-cni", Path::new(&from).join("overlay-cni")),
        ("etc/systemd/system/overlay-agent.service", repo().join("deploy/overlay-agent.service")),
    ] {
        assert_eq!(files[installed].1, std::fs::read(&source).expect("source"), "{installed}");
    }

    // Again, with an edited config: that config is kept, nothing else changes.
    let agent_conf = root.join("etc/overlay/agent.toml");
    std::fs::write(&agent_conf, "name = \"mine\"\n").expect("edit config");
    let before = snapshot(&root);
    let out = install(&["--from", &from], &[("DESTDIR", &root_s)]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(snapshot(&root), before, "a second run changed files");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(&format!("kept       {}", agent_conf.display())), "{stdout}");
    assert!(!stdout.contains("installed"), "second run reinstalled something:\n{stdout}");

    // PREFIX moves the binaries and rewrites the units to match.
    let out = install(&["--from", &from, "--destdir", &root_s], &[("PREFIX", "/usr")]);
    assert!(out.status.success(), "{}", text(&out));
    let unit = read(root.join("etc/systemd/system/overlay-agent.service"));
    assert!(unit.contains("\nExecStart=/usr/bin/overlay-agent --config"), "{unit}");
    assert!(unit.contains("file:///usr/share/doc/overlay/README.md"), "{unit}");
    assert!(!unit.contains("/usr/local/"), "{unit}");
    assert!(root.join("usr/bin/overlayctl").exists());
}

#[test]
fn install_script_help_and_errors_name_the_bad_value() {
    let out = install(&["--help"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let help = String::from_utf8_lossy(&out.stdout);
    for word in ["--from", "--prefix", "--destdir", "DESTDIR", "PREFIX", "systemctl"] {
        assert!(help.contains(word), "--help does not mention {word}:\n{help}");
    }
    let tmp = TempDir::new("install-errors");
    assert!(one_line_error(&install(&["--bogus"], &[])).contains("--bogus"));
    assert!(one_line_error(&install(&["--prefix", "usr/x"], &[])).contains("usr/x"));
    let err =
        one_line_error(&install(&["--from", "/nonexistent/bin", "--destdir", tmp.path()], &[]));
    assert!(err.contains("/nonexistent/bin"), "{err}");
    let err = one_line_error(&install(&["--from", tmp.path(), "--destdir", tmp.path()], &[]));
    assert!(err.contains("overlay-controller"), "{err}");
}

/// `systemd-analyze verify` of the units installed under `root`: no warning at all.
/// The standard units (sysinit.target, network-online.target, …) are copied in.
fn verify_units(root: &Path, units: &[&str]) {
    let lib = root.join("usr/lib/systemd");
    std::fs::create_dir_all(&lib).expect("usr/lib/systemd");
    let out = sh(Command::new("cp").args(["-a", "/usr/lib/systemd/system"]).arg(&lib));
    assert!(out.status.success(), "copying the standard units: {}", text(&out));
    let out = sh(Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(format!("--root={}", root.display()))
        .args(units));
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify {units:?}: {}",
        text(&out)
    );
}

fn systemd_analyze_available() -> bool {
    let ok = have("systemd-analyze") && Path::new("/usr/lib/systemd/system").is_dir();
    if !ok {
        eprintln!(
            "skipped: systemd-analyze or /usr/lib/systemd/system missing (apt-get install systemd)"
        );
    }
    ok
}

#[test]
fn installed_units_pass_systemd_analyze_verify() {
    if !systemd_analyze_available() {
        return;
    }
    let tmp = TempDir::new("verify");
    let from = fake_binaries(&tmp.0);
    let root = tmp.0.join("root");
    let out = install(&["--from", &from, "--destdir", &root.display().to_string()], &[]);
    assert!(out.status.success(), "{}", text(&out));
    verify_units(&root, &["overlay-controller.service", "overlay-agent.service"]);

    // The check is not vacuous: a bad setting is reported.
    let unit = root.join("etc/systemd/system/overlay-agent.service");
    let good = read(&unit);
    std::fs::write(&unit, good.replace("Restart=on-failure", "Restart=sometimes")).expect("edit");
    let out = sh(Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(format!("--root={}", root.display()))
        .arg("overlay-agent.service"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("sometimes"), "{}", text(&out));
}

/// Settings of one unit file: key -> values, in order.
fn unit_settings(unit: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with('[') {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            out.entry(k.trim().to_string()).or_default().push(v.trim().to_string());
        }
    }
    out
}

#[test]
fn units_declare_what_the_daemons_do() {
    let agent = unit_settings(&read(repo().join("deploy/overlay-agent.service")));
    let controller = unit_settings(&read(repo().join("deploy/overlay-controller.service")));
    for unit in [&agent, &controller] {
        assert_eq!(unit["After"], ["network-online.target"]);
        assert_eq!(unit["Wants"], ["network-online.target"]);
        assert_eq!(unit["Restart"], ["on-failure"]);
        assert!(unit.contains_key("StateDirectory") && unit.contains_key("ConfigurationDirectory"));
    }
    // Both send READY=1 (overlay-ops' notify): the controller once it serves, the agent
    // after its first reconcile pass; the agent also pings the watchdog from its loop.
    assert_eq!(controller["Type"], ["notify"]);
    assert_eq!(agent["Type"], ["notify"]);
    assert_eq!(agent["WatchdogSec"], ["60"]);
    assert!(!agent.contains_key("NotifyAccess"), "only the agent's main process notifies");
    // The `--encap udp` data-plane daemon the agent spawns must survive agent restarts.
    assert_eq!(agent["KillMode"], ["process"]);
    assert_eq!(
        agent["CapabilityBoundingSet"],
        ["CAP_NET_ADMIN CAP_SYS_ADMIN CAP_NET_BIND_SERVICE CAP_NET_RAW"]
    );
    // Anything giving the agent its own mount namespace would hide the namespaces it
    // mounts under /run/netns from the host (`ip netns exec` would find nothing); device
    // restrictions would block /dev/net/tun.
    for key in [
        "PrivateTmp",
        "PrivateMounts",
        "PrivateDevices",
        "ProtectSystem",
        "ProtectHome",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "ProtectClock",
        "ProtectProc",
        "ReadOnlyPaths",
        "ReadWritePaths",
        "InaccessiblePaths",
        "TemporaryFileSystem",
        "BindPaths",
        "RootDirectory",
        "MountFlags",
        "DeviceAllow",
        "DevicePolicy",
        "PrivateNetwork",
    ] {
        assert!(!agent.contains_key(key), "overlay-agent.service must not set {key}");
    }
}

/// Long flags of a daemon's --help, as config keys (`--data-dir` -> `data_dir`).
fn flag_keys(binary: &Path) -> Vec<String> {
    let out = sh(Command::new(binary).arg("--help"));
    assert!(out.status.success(), "{} --help: {}", binary.display(), text(&out));
    let help = String::from_utf8_lossy(&out.stdout).to_string();
    let mut keys: Vec<String> = help
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("--"))
        .map(|w| w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric()))
        .filter(|w| !w.is_empty() && !["help", "version", "config"].contains(w))
        .map(|w| w.replace('-', "_"))
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// Runs a daemon on `config` with one flag that is bad on purpose: failing on that flag
/// (and not on the file) proves the file parsed, unknown keys being errors.
fn assert_daemon_accepts(binary: &Path, config: &Path, bad: &[&str], expected: &str) {
    let out = sh(Command::new(binary).arg("--config").arg(config).args(bad));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains(expected),
        "{} did not get past {}: {}",
        binary.display(),
        config.display(),
        text(&out)
    );
}

fn assert_controller_accepts(config: &Path) {
    assert_daemon_accepts(&workspace_bin("overlay-controller"), config, &["--id", "0"], "--id 0");
}

fn assert_agent_accepts(config: &Path) {
    let agent = workspace_bin("overlay-agent");
    assert_daemon_accepts(&agent, config, &["--reconcile-interval", "0"], "reconcile interval");
}

#[test]
fn example_configs_document_every_key_and_the_daemons_accept_them() {
    let _bins = lock_binaries();
    for (binary, example) in
        [("overlay-controller", "deploy/controller.toml"), ("overlay-agent", "deploy/agent.toml")]
    {
        let keys = flag_keys(&workspace_bin(binary));
        assert!(keys.len() >= 4, "{binary}: no flags found in --help: {keys:?}");
        let text = read(repo().join(example));
        for key in &keys {
            let documented = text.lines().any(|l| {
                let l = l.trim_start_matches('#').trim_start();
                l.strip_prefix(key.as_str()).is_some_and(|rest| rest.trim_start().starts_with('='))
            });
            assert!(documented, "{example} does not document `{key}` (a flag of {binary})");
        }
    }
    assert_controller_accepts(&repo().join("deploy/controller.toml"));
    assert_agent_accepts(&repo().join("deploy/agent.toml"));
}

fn provision(args: &[&str]) -> Output {
    sh(Command::new(repo().join("vagrant/provision.sh")).args(args))
}

#[test]
fn provisioning_writes_each_vms_configs_and_enables_verified_units() {
    let _bins = lock_binaries();
    let tmp = TempDir::new("provision");
    let from = fake_binaries(&tmp.0);
    // The cluster CA and the VMs' certificates, as the Vagrantfile makes them.
    let pki = tmp.0.join("pki");
    let pki_s = pki.display().to_string();
    let ctl = workspace_bin("overlayctl");
    let out = sh(Command::new(&ctl).args(["cert", "ca", "--out", &pki_s]));
    assert!(out.status.success(), "cert ca: {}", text(&out));
    let issue = |name: &str, role: &str, ip: Option<&str>| {
        let out = sh(Command::new(&ctl)
            .args(["cert", "issue", name, "--role", role, "--ca-dir", &pki_s, "--out", &pki_s])
            .args(ip.map(|ip| ["--ip", ip]).unwrap_or_default().iter().filter(|a| !a.is_empty())));
        assert!(out.status.success(), "cert issue: {}", text(&out));
    };
    for vm in 1..=4 {
        let ip = format!("192.168.56.{}", 10 + vm);
        issue(&format!("vm{vm}"), "agent", Some(&ip));
        if vm <= 3 {
            issue(&format!("vm{vm}-controller"), "controller", Some(&ip));
        }
    }
    issue("admin", "admin", None);
    let peers = "1=192.168.56.11:7400,2=192.168.56.12:7400,3=192.168.56.13:7400";
    let urls = "https://192.168.56.11:7400,https://192.168.56.12:7400,https://192.168.56.13:7400";
    for vm in 1..=4u32 {
        let root = tmp.0.join(format!("vm{vm}"));
        let root_s = root.display().to_string();
        let out = provision(&[
            "--id",
            &vm.to_string(),
            "--root",
            &root_s,
            "--from",
            &from,
            "--tls",
            &pki_s,
        ]);
        assert!(out.status.success(), "vm{vm}: {}", text(&out));
        let etc = root.join("etc/overlay");
        let ip = format!("192.168.56.{}", 10 + vm);

        let agent: toml::Table = toml::from_str(&read(etc.join("agent.toml"))).expect("agent.toml");
        assert_eq!(agent["name"].as_str(), Some(format!("vm{vm}").as_str()));
        assert_eq!(agent["underlay_ip"].as_str(), Some(ip.as_str()));
        assert_eq!(agent["controller"].as_str(), Some(urls));
        for (key, file, mode) in [
            ("tls_ca", "ca.pem".to_string(), 0o644),
            ("tls_cert", format!("vm{vm}.pem"), 0o644),
            ("tls_key", format!("vm{vm}-key.pem"), 0o600),
        ] {
            assert_eq!(agent[key].as_str(), Some(format!("/etc/overlay/tls/{file}").as_str()));
            let installed = etc.join("tls").join(&file);
            assert_eq!(
                std::fs::read(&installed).ok(),
                std::fs::read(pki.join(&file)).ok(),
                "{file}"
            );
            let m = std::fs::metadata(&installed).expect("tls file").permissions().mode() & 0o777;
            assert_eq!(m, mode, "mode of {file}");
        }
        let admin_key = etc.join("tls/admin-key.pem");
        let m = std::fs::metadata(&admin_key).expect("admin key").permissions().mode() & 0o777;
        assert_eq!(m, 0o600, "mode of admin-key.pem");
        let profile = read(root.join("etc/profile.d/overlay.sh"));
        assert!(profile.contains(&format!("OVERLAY_CONTROLLER={urls}")), "{profile}");
        assert!(profile.contains("OVERLAY_TLS_CERT=/etc/overlay/tls/admin.pem"), "{profile}");
        assert_agent_accepts(&etc.join("agent.toml"));
        let wants = root.join("etc/systemd/system/multi-user.target.wants");
        assert!(wants.join("overlay-agent.service").is_symlink(), "vm{vm}: agent not enabled");

        if vm <= 3 {
            let c: toml::Table =
                toml::from_str(&read(etc.join("controller.toml"))).expect("controller.toml");
            assert_eq!(c["id"].as_integer(), Some(i64::from(vm)));
            assert_eq!(c["listen"].as_str(), Some(format!("{ip}:7400").as_str()));
            assert_eq!(c["peers"].as_str(), Some(peers));
            assert_eq!(c["tls_cert"].as_str(), Some("/etc/overlay/tls/controller.pem"));
            let key = etc.join("tls/controller-key.pem");
            assert_eq!(
                std::fs::read(&key).ok(),
                std::fs::read(pki.join(format!("vm{vm}-controller-key.pem"))).ok()
            );
            let m = std::fs::metadata(&key).expect("controller key").permissions().mode() & 0o777;
            assert_eq!(m, 0o600, "mode of controller-key.pem");
            assert_controller_accepts(&etc.join("controller.toml"));
            assert!(wants.join("overlay-controller.service").is_symlink(), "vm{vm}");
        } else {
            // A fourth VM is an agent-only host: the example config stays, not enabled.
            assert_eq!(
                read(etc.join("controller.toml")),
                read(repo().join("deploy/controller.toml"))
            );
            assert!(!wants.join("overlay-controller.service").exists());
        }
        if systemd_analyze_available() {
            verify_units(&root, &["overlay-controller.service", "overlay-agent.service"]);
        }
    }

    // Without systemctl nothing is enabled; bad values are named.
    let root = tmp.0.join("plain");
    let out = provision(&[
        "--id",
        "2",
        "--root",
        &root.display().to_string(),
        "--from",
        &from,
        "--no-systemctl",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!root.join("etc/systemd/system/multi-user.target.wants").exists());
    assert!(one_line_error(&provision(&["--id", "0", "--root", tmp.path()])).contains("--id 0"));
    assert!(one_line_error(&provision(&["--id", "1", "--members", "2"])).contains("--members 2"));
    assert!(one_line_error(&provision(&["--root", tmp.path()])).contains("--id"));
    let err = one_line_error(&provision(&["--id", "7", "--root", tmp.path(), "--tls", &pki_s]));
    assert!(err.contains("vm7.pem"), "{err}");
}

#[test]
fn vagrantfile_and_scripts_parse() {
    let scripts = [
        "deploy/install.sh",
        "vagrant/provision.sh",
        "vagrant/smoke.sh",
        "scripts/lab.sh",
        "scripts/test.sh",
        "scripts/ensure-packages.sh",
        "bench/build-and-run.sh",
        "bench/dataplane.sh",
        "bench/encap.sh",
    ];
    for script in scripts {
        let out = sh(Command::new("bash").arg("-n").arg(repo().join(script)));
        assert!(out.status.success(), "bash -n {script}: {}", text(&out));
        let mode = std::fs::metadata(repo().join(script)).expect("script").permissions().mode();
        assert!(mode & 0o111 != 0, "{script} is not executable");
    }
    let vagrantfile = repo().join("vagrant/Vagrantfile");
    if have("ruby") {
        let out = sh(Command::new("ruby").arg("-c").arg(&vagrantfile));
        assert!(out.status.success(), "ruby -c Vagrantfile: {}", text(&out));
    } else {
        eprintln!("skipped ruby -c vagrant/Vagrantfile: ruby is not installed");
    }
    if have("vagrant") {
        let out = sh(Command::new("vagrant").arg("validate").current_dir(repo().join("vagrant")));
        assert!(out.status.success(), "vagrant validate: {}", text(&out));
    } else {
        eprintln!("skipped vagrant validate: vagrant is not installed");
    }
}

/// Kills and reaps a child on drop.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn agent_works_with_only_the_units_capabilities() {
    if !can_run() || !have("setpriv") {
        eprintln!("skipped: needs root, ip, nsenter and setpriv");
        return;
    }
    let _bins = lock_binaries();
    let unit = unit_settings(&read(repo().join("deploy/overlay-agent.service")));
    let caps: Vec<String> = unit["CapabilityBoundingSet"][0]
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    let mut lab = Lab::start(3).expect("lab");
    // Agent 1 again, as systemd would run it: root, bounding set from the unit, no new
    // privileges (a root process's capabilities are its bounding set).
    lab.kill_agent(1);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(lab.dir.join("agent1-restricted.log"))
        .expect("log");
    let child = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", lab.host_ns(1)))
        .args(["--", "setpriv", "--no-new-privs", "--inh-caps=-all"])
        .arg(format!("--bounding-set=-all,{}", caps.join(",")))
        .arg("--")
        .arg(workspace_bin("overlay-agent"))
        .args(lab.agent_args(1).expect("agent args"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("restricted agent");
    let _agent = KillOnDrop(child);

    // A kernel VXLAN network and an `--encap udp` one (TAP devices and UDP sockets in the
    // data-plane daemon the restricted agent starts, with the same capabilities).
    for (net, subnet, encap) in
        [("capvx", "10.77.1.0/24", &[][..]), ("capudp", "10.77.2.0/24", &["--encap", "udp"][..])]
    {
        let mut args = vec!["network", "create", net, "--subnet", subnet];
        args.extend_from_slice(encap);
        lab.ctl_ok(&args).expect("network");
        let a = lab.endpoint(&format!("{net}a"), 1, net, &[]).expect("endpoint, restricted host");
        let b = lab.endpoint(&format!("{net}b"), 2, net, &[]).expect("endpoint on another host");
        // By name: the DNS on 127.0.0.11:53 in `a` is served by the restricted agent.
        let t = Duration::from_secs(20);
        lab.ping_ok(&a, &b, t).unwrap_or_else(|e| panic!("{net}: {e}\n{}", lab.logs()));
        lab.ping_ok(&b, &a, t).unwrap_or_else(|e| panic!("{net}: {e}\n{}", lab.logs()));
    }
    let nft = sh(Command::new("ip").args([
        "netns",
        "exec",
        &lab.host_ns(1),
        "nft",
        "list",
        "table",
        "inet",
        "overlay",
    ]));
    assert!(nft.status.success(), "no nft table from the restricted agent: {}", text(&nft));
    let log = read(lab.dir.join("agent1-restricted.log"));
    for bad in ["Operation not permitted", "Permission denied", "EPERM", "EACCES"] {
        assert!(!log.contains(bad), "restricted agent hit {bad}:\n{log}");
    }
}

/// The README's shell commands in section `heading` (```sh blocks, `\` continuations
/// joined, comment lines dropped).
fn readme_commands(readme: &str, heading: &str) -> Vec<String> {
    let section = readme
        .split("\n## ")
        .find(|s| s.starts_with(heading))
        .unwrap_or_else(|| panic!("README has no section \"## {heading}\""));
    let mut commands = vec![];
    let mut in_sh = false;
    let mut pending = String::new();
    for line in section.lines() {
        let t = line.trim();
        if t.starts_with("```") {
            in_sh = t == "```sh";
            continue;
        }
        if !in_sh || t.is_empty() || t.starts_with('#') {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(part) => pending.push_str(part),
            None => {
                pending.push_str(t);
                commands.push(std::mem::take(&mut pending));
            }
        }
    }
    commands
}

/// A bash script running `commands` in `dir`; each must succeed, or fail when its
/// comment says `# fails`. Commands in endpoints are retried for up to 30 s: the agents
/// converge in the background, as a person retyping would notice.
fn walkthrough_script(dir: &Path, commands: &[String]) -> String {
    let mut script = format!(
        "set -u\ncd '{}'\n{}",
        dir.display(),
        r#"step() {
  local expect=$1 tries=$2 line=$3 rc i
  echo "+ $line"
  for ((i = 1; ; i++)); do
    eval "$line"
    rc=$?
    if [ "$expect" = ok ] && [ $rc -eq 0 ]; then return 0; fi
    if [ "$expect" = fails ] && [ $rc -ne 0 ]; then return 0; fi
    if [ $i -ge $tries ]; then echo "README command gave exit $rc, expected $expect: $line" >&2; exit 1; fi
    sleep 1
  done
}
"#
    );
    for c in commands {
        let expect = if c.contains("# fails") { "fails" } else { "ok" };
        let tries = if expect == "ok" && c.starts_with("ip netns exec") { 30 } else { 1 };
        script.push_str(&format!("step {expect} {tries} '{}'\n", c.replace('\'', r"'\''")));
    }
    script
}

const LAB_STATE: &str = "/run/overlay-lab.json";
/// Endpoints the README walk-through and vagrant/smoke.sh create.
const WALKTHROUGH_ENDPOINTS: [&str; 5] = ["s1", "s2", "gw", "e1", "e2"];

fn lab_state_pids() -> Vec<u32> {
    let v: serde_json::Value = serde_json::from_str(&read(LAB_STATE)).expect("lab state");
    v["pids"]
        .as_array()
        .expect("pids")
        .iter()
        .filter_map(|p| p[1].as_u64().and_then(|p| u32::try_from(p).ok()))
        .collect()
}

/// Names in /run/netns that the lab or the walk-through made.
fn our_namespaces() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/run/netns") else { return vec![] };
    dir.flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("ovtlab") || WALKTHROUGH_ENDPOINTS.contains(&n.as_str()))
        .collect()
}

/// Processes whose command line mentions the lab's directory (its controllers/agents).
fn lab_processes() -> Vec<String> {
    let lab_dir = std::env::temp_dir().join("ovtlab").display().to_string();
    let Ok(procs) = std::fs::read_dir("/proc") else { return vec![] };
    procs
        .flatten()
        .filter(|p| p.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|p| {
            let cmd = std::fs::read(p.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.contains(&lab_dir).then(|| format!("{}: {cmd}", p.file_name().to_string_lossy()))
        })
        .collect()
}

/// Runs `./scripts/lab.sh down` in the clone when dropped (also on a failed assertion).
struct LabDown<'a>(&'a Path);

impl Drop for LabDown<'_> {
    fn drop(&mut self) {
        let _ = Command::new(self.0.join("scripts/lab.sh"))
            .arg("down")
            .env_remove("CARGO_TARGET_DIR")
            .stdin(Stdio::null())
            .output();
    }
}

/// The README, followed literally on a clean clone of this repository: its demo command
/// builds and starts the lab, `overlayctl host ls` shows three ready hosts, every
/// walk-through command does what the README says, `up` is idempotent and replaces a
/// stale lab, vagrant/smoke.sh passes against the lab, and the README's `down` leaves no
/// namespace, process or file behind.
///
/// The clone builds for real, into its own target dir: `target` in the clone is a
/// symlink to `readme-clone/` inside this workspace's target dir, kept between runs so a
/// rerun only recompiles the workspace crates. (Sharing this workspace's own target dir
/// is not safe: some artifacts of the clone's crates get the same file names as ours, and
/// the doc tests that `cargo test` runs afterwards then link mismatched crates.)
#[test]
fn readme_walkthrough_on_a_clean_clone() {
    if !can_run() || !have("git") {
        eprintln!("skipped: needs root, ip, nsenter and git");
        return;
    }
    assert!(
        !Path::new(LAB_STATE).exists() && our_namespaces().is_empty(),
        "a lab (or s1/s2/gw) is already up on this machine: run ./scripts/lab.sh down first"
    );
    let _bins = lock_binaries();
    let tmp = TempDir::new("clone");
    let clone = tmp.0.join("overlay");
    let out = sh(Command::new("git").args(["clone", "-q"]).arg(repo()).arg(&clone));
    assert!(out.status.success(), "git clone: {}", text(&out));
    let target = bin_dir().parent().expect("target dir").join("readme-clone");
    std::fs::create_dir_all(&target).expect("clone target dir");
    std::os::unix::fs::symlink(&target, clone.join("target")).expect("target symlink");
    let _down = LabDown(&clone);
    let bash = |script: &str| {
        sh(Command::new("bash")
            .args(["-c", script])
            .current_dir(&clone)
            .env_remove("CARGO_TARGET_DIR")
            .env("CARGO_INCREMENTAL", "0")
            .env_remove("OVERLAY_CONTROLLER"))
    };

    let readme = read(clone.join("README.md"));
    let setup = readme_commands(&readme, "Set-up");
    assert_eq!(setup.first().map(String::as_str), Some("./scripts/lab.sh up"), "{setup:?}");
    let walk = readme_commands(&readme, "Walk-through");
    let down_at = walk.iter().position(|c| c == "./scripts/lab.sh down").expect("README: down");
    let (before_down, down) = walk.split_at(down_at);
    assert_eq!(before_down.first(), setup.first(), "the walk-through starts the lab");

    let out = bash(&walkthrough_script(&clone, before_down));
    assert!(out.status.success(), "README walk-through: {}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("started controller 1"), "no progress shown:\n{stdout}");

    // overlayctl the documented way (exported OVERLAY_CONTROLLER, inside host h1).
    let export = walk.iter().find(|c| c.starts_with("export OVERLAY_CONTROLLER=")).expect("export");
    let host_ls = walk
        .iter()
        .find(|c| c.starts_with("ip netns exec ovtlabh1") && c.contains("overlayctl host ls"))
        .expect("README: overlayctl host ls inside ovtlabh1");
    let out = bash(&format!("{export}\n{host_ls}"));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        table.lines().filter(|l| l.split_whitespace().any(|w| w == "ready")).count(),
        3,
        "{table}"
    );

    // `up` again: the running lab is healthy and left alone.
    let pids = lab_state_pids();
    let out = bash("./scripts/lab.sh up");
    assert!(out.status.success(), "second up: {}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("already up and healthy"),
        "{}",
        text(&out)
    );
    assert_eq!(lab_state_pids(), pids, "second up restarted the lab");

    // A dead agent makes the lab stale: `up` removes it and starts a fresh one.
    // SAFETY: kill(2) on a pid of the lab this test started.
    unsafe {
        libc::kill(pids[4] as libc::pid_t, libc::SIGKILL);
    }
    let out = bash("./scripts/lab.sh up");
    assert!(out.status.success(), "up over a stale lab: {}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("stale lab"), "{}", text(&out));
    let fresh = lab_state_pids();
    assert!(fresh.iter().all(|p| !pids.contains(p)), "old processes kept: {pids:?} {fresh:?}");
    assert!(!our_namespaces().iter().any(|n| n == "s1"), "the stale lab's endpoints were kept");

    let out = bash("vagrant/smoke.sh --lab");
    assert!(out.status.success(), "smoke.sh --lab: {}", text(&out));

    let out = bash(&walkthrough_script(&clone, down));
    assert!(out.status.success(), "README down: {}", text(&out));
    let gone = wait_for(Duration::from_secs(5), "lab processes to go", || {
        pids.iter().chain(&fresh).all(|p| !Path::new(&format!("/proc/{p}")).exists()).then_some(())
    });
    assert!(gone.is_ok(), "lab processes left: {:?}", lab_processes());
    assert_eq!(lab_processes(), Vec::<String>::new());
    assert_eq!(our_namespaces(), Vec::<String>::new());
    for n in WALKTHROUGH_ENDPOINTS {
        assert!(!Path::new(&format!("/etc/netns/{n}")).exists(), "/etc/netns/{n} left");
    }
    assert!(!Path::new(LAB_STATE).exists());
    assert!(!std::env::temp_dir().join("ovtlab").exists());

    let out = bash("./scripts/lab.sh down");
    assert!(out.status.success(), "second down: {}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing was up"), "{}", text(&out));
}

/// Three controllers on loopback ports, as child processes killed on drop.
struct LoopbackCluster {
    dir: PathBuf,
    ports: Vec<u16>,
    members: Vec<Option<KillOnDrop>>,
}

impl LoopbackCluster {
    /// Three members on loopback, secured as the README says: a CA, one controller
    /// certificate they share, and an admin certificate for overlayctl.
    fn new(dir: &Path) -> LoopbackCluster {
        let ports = (0..3)
            .map(|_| {
                let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
                l.local_addr().expect("addr").port()
            })
            .collect();
        let pki = dir.join("pki").display().to_string();
        let ctl = workspace_bin("overlayctl");
        for args in [
            vec!["cert", "ca", "--out", &pki],
            vec![
                "cert",
                "issue",
                "controller",
                "--role",
                "controller",
                "--ca-dir",
                &pki,
                "--out",
                &pki,
            ],
            vec!["cert", "issue", "admin", "--role", "admin", "--ca-dir", &pki, "--out", &pki],
        ] {
            let out = sh(Command::new(&ctl).args(&args));
            assert!(out.status.success(), "{args:?}: {}", text(&out));
        }
        LoopbackCluster { dir: dir.to_path_buf(), ports, members: vec![None, None, None] }
    }

    /// `--tls-ca F --tls-cert F --tls-key F` for certificate `name`.
    fn tls_args(&self, name: &str) -> Vec<String> {
        let pki = self.dir.join("pki");
        let file = |f: &str| pki.join(f).display().to_string();
        vec![
            "--tls-ca".into(),
            file("ca.pem"),
            "--tls-cert".into(),
            file(&format!("{name}.pem")),
            "--tls-key".into(),
            file(&format!("{name}-key.pem")),
        ]
    }

    fn data_dir(&self, id: usize) -> PathBuf {
        self.dir.join(format!("member{id}"))
    }

    fn urls(&self) -> String {
        self.ports.iter().map(|p| format!("https://127.0.0.1:{p}")).collect::<Vec<_>>().join(",")
    }

    fn start(&mut self, id: usize) {
        let peers: Vec<String> = self
            .ports
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1))
            .collect();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("member{id}.log")))
            .expect("log");
        let child = Command::new(workspace_bin("overlay-controller"))
            .args([
                "--id",
                &id.to_string(),
                "--listen",
                &format!("127.0.0.1:{}", self.ports[id - 1]),
            ])
            .arg("--data-dir")
            .arg(self.data_dir(id))
            .args(["--peers", &peers.join(",")])
            .args(self.tls_args("controller"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("controller");
        self.members[id - 1] = Some(KillOnDrop(child));
    }

    /// SIGTERM (as `systemctl stop`), then wait for a clean exit.
    fn stop(&mut self, id: usize) {
        if let Some(mut m) = self.members[id - 1].take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(m.0.id() as libc::pid_t, libc::SIGTERM);
            }
            let status = m.0.wait().expect("wait");
            assert!(status.success(), "member {id} did not stop cleanly: {status:?}");
        }
    }

    fn ctl(&self, args: &[&str]) -> Output {
        sh(Command::new(workspace_bin("overlayctl"))
            .args(["--controller", &self.urls()])
            .args(self.tls_args("admin"))
            .args(args))
    }

    /// `overlayctl ARGS`, retried until it succeeds (leader elections take a moment).
    fn ctl_ok(&self, args: &[&str]) -> String {
        let out = wait_for(Duration::from_secs(20), &format!("overlayctl {args:?}"), || {
            let out = self.ctl(args);
            out.status.success().then_some(out)
        })
        .unwrap_or_else(|e| panic!("{e}: {}", text(&self.ctl(args))));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn network_names(&self) -> Vec<String> {
        let v: serde_json::Value =
            serde_json::from_str(&self.ctl_ok(&["-o", "json", "network", "ls"])).expect("json");
        v.as_array()
            .expect("array")
            .iter()
            .filter_map(|n| n["name"].as_str().map(str::to_string))
            .collect()
    }
}

/// The README's backup and restore, as written: stop one member, archive its data dir,
/// start it; after losing every member, the same archive in every data dir with each
/// member's own `member-id` brings the cluster back as of the backup, writable.
#[test]
fn controller_backup_and_restore_as_documented() {
    if !have("tar") {
        eprintln!("skipped: tar is not installed");
        return;
    }
    let _bins = lock_binaries();
    let tmp = TempDir::new("backup");
    let mut cluster = LoopbackCluster::new(&tmp.0);
    for id in 1..=3 {
        cluster.start(id);
    }
    for (i, name) in ["before1", "before2"].iter().enumerate() {
        cluster.ctl_ok(&["network", "create", name, "--subnet", &format!("10.66.{i}.0/24")]);
    }

    cluster.stop(1);
    let archive = tmp.0.join("backup.tar.gz");
    let out =
        sh(Command::new("tar").arg("-C").arg(&tmp.0).arg("-czf").arg(&archive).arg("member1"));
    assert!(out.status.success(), "tar: {}", text(&out));
    cluster.start(1);
    cluster.ctl_ok(&["network", "create", "after", "--subnet", "10.66.9.0/24"]);
    assert_eq!(cluster.network_names(), ["after", "before1", "before2"]);

    // Every member lost.
    cluster.members = vec![None, None, None];
    for id in 1..=3 {
        let data = cluster.data_dir(id);
        std::fs::remove_dir_all(&data).expect("wipe");
        let unpack = tmp.0.join(format!("unpack{id}"));
        std::fs::create_dir_all(&unpack).expect("unpack dir");
        let out = sh(Command::new("tar").arg("-C").arg(&unpack).arg("-xzf").arg(&archive));
        assert!(out.status.success(), "untar: {}", text(&out));
        std::fs::rename(unpack.join("member1"), &data).expect("restore");
        std::fs::write(data.join("member-id"), format!("{id}\n")).expect("member-id");
        cluster.start(id);
    }
    assert_eq!(cluster.network_names(), ["before1", "before2"]);
    cluster.ctl_ok(&["network", "create", "restored", "--subnet", "10.66.10.0/24"]);
    assert_eq!(cluster.network_names(), ["before1", "before2", "restored"]);
}
