//! The control plane is secure by default (SPEC "Security"), checked in the namespace lab
//! through the real binaries and raw gRPC clients:
//!
//! * plaintext is refused; a caller without a client certificate may only join; a
//!   certificate from another CA fails the handshake;
//! * roles: `agent` registers, heartbeats and watches as its own host only and changes
//!   nothing; `admin` does everything; only `controller` certificates speak raft, and
//!   even they cannot propose internal commands or slip in an unusable snapshot;
//! * join tokens: printed as the last word, a wrong or rotated-out one registers nothing,
//!   the right one gives a new host its own `agent` certificate (key 0600 in its data
//!   dir), which it renews before it expires (the lab's controllers sign 40 s
//!   certificates here, so renewal happens within the test);
//! * cluster identity: an agent whose state belongs to another cluster is refused;
//! * limits: watch streams per client, request size.
//!
//! The lab has 4 hosts; host 4's agent is started by the join cases. Needs root.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use overlay_grpc::Dialer;
use overlay_pki::{Ca, CertInfo, Identity, Role, Subject};
use overlay_proto::pb;
use overlay_tests::lab::{in_netns, run_cases_with, wait_for, Case, Lab, LabOptions};
use tonic::Code;

const T: Duration = Duration::from_secs(30);
/// Agent certificates the lab's controllers sign live this long.
const LIFETIME_SECS: u64 = 40;

fn ca_path(lab: &Lab) -> std::path::PathBuf {
    lab.pki_dir().join("ca.pem")
}

/// A TLS dialer for `identity` (none: no client certificate) trusting the lab's CA.
fn dialer(lab: &Lab, identity: Option<&Identity>) -> Dialer {
    let ca = overlay_pki::load_ca(&ca_path(lab)).unwrap();
    Dialer::tls(overlay_pki::tls::client_config(&ca, identity).unwrap())
}

fn identity(lab: &Lab, cert: &Path, key: &Path) -> Identity {
    Identity::load(&ca_path(lab), cert, key).unwrap()
}

fn controller_identity(lab: &Lab, i: usize) -> Identity {
    let (cert, key) = overlay_pki::cert_files(&lab.pki_dir(), &format!("c{i}"));
    identity(lab, &cert, &key)
}

fn agent_identity(lab: &Lab, i: usize) -> Identity {
    let (cert, key) = lab.agent_cert_files(i);
    identity(lab, &cert, &key)
}

fn url(i: usize) -> String {
    format!("https://{}:7400", Lab::host_ip(i))
}

/// Runs `f` with a connected channel to controller 1, from host 1's namespace.
fn with_channel<T: Send>(
    lab: &Lab,
    dialer: Dialer,
    f: impl FnOnce(
            tonic::transport::Channel,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>
        + Send,
) -> Result<T> {
    in_netns(&lab.host_ns(1), move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async move {
            let endpoint = dialer.endpoint(&url(1))?.connect_timeout(Duration::from_secs(5));
            let channel = dialer.connect(endpoint).await?;
            Ok(tokio::time::timeout(T, f(channel)).await?)
        })
    })?
}

fn overlay(
    channel: tonic::transport::Channel,
) -> pb::overlay_client::OverlayClient<tonic::transport::Channel> {
    pb::overlay_client::OverlayClient::new(channel)
}

fn expect_denied<T: std::fmt::Debug>(
    what: &str,
    r: Result<tonic::Response<T>, tonic::Status>,
) -> Result<String> {
    match r {
        Err(s) if s.code() == Code::PermissionDenied => {
            ensure!(s.message().starts_with("permission denied: "), "{what}: {}", s.message());
            Ok(s.message().to_string())
        }
        other => bail!("{what}: expected permission denied, got {other:?}"),
    }
}

fn network_names(lab: &Lab) -> Result<Vec<String>> {
    let v = lab.ctl_json(&["network", "ls"])?;
    Ok(v.as_array()
        .context("array")?
        .iter()
        .filter_map(|n| n["name"].as_str().map(String::from))
        .collect())
}

/// `overlayctl` from host 1 with exactly `args` (no admin identity added).
fn raw_ctl(lab: &Lab, args: &[&str]) -> std::process::Output {
    let ns = format!("--net=/var/run/netns/{}", lab.host_ns(1));
    let ctl = overlay_tests::lab::bin_dir().join("overlayctl");
    let mut all = vec!["nsenter", &ns, "--", ctl.to_str().unwrap()];
    all.extend_from_slice(args);
    overlay_tests::lab::run(&all)
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}

fn setup(lab: &mut Lab) -> Result<()> {
    lab.ctl_ok(&["network", "create", "sec", "--subnet", "10.77.0.0/24"])?;
    Ok(())
}

fn plaintext_refused(lab: &mut Lab) -> Result<()> {
    let urls =
        (1..=3).map(|i| format!("http://{}:7400", Lab::host_ip(i))).collect::<Vec<_>>().join(",");
    let out = raw_ctl(
        lab,
        &[
            "--insecure",
            "--controller",
            &urls,
            "network",
            "create",
            "plain",
            "--subnet",
            "10.78.0.0/24",
        ],
    );
    ensure!(!out.status.success(), "a plaintext write succeeded");
    ensure!(
        stderr(&out).contains("the controller speaks TLS, but --insecure was given"),
        "{}",
        stderr(&out)
    );
    // And a TLS client refuses http:// itself.
    let mut args = vec!["--controller".to_string(), urls.clone()];
    args.extend(lab.admin_args());
    args.extend(["network".into(), "ls".into()]);
    let out = raw_ctl(lab, &args.iter().map(String::as_str).collect::<Vec<_>>());
    ensure!(
        stderr(&out).contains("is plaintext, but the control plane speaks TLS"),
        "{}",
        stderr(&out)
    );
    ensure!(!network_names(lab)?.contains(&"plain".to_string()), "state changed");
    Ok(())
}

fn no_client_certificate(lab: &mut Lab) -> Result<()> {
    let anonymous = dialer(lab, None);
    let (list, create) = with_channel(lab, anonymous, |ch| {
        Box::pin(async move {
            let mut c = overlay(ch);
            let list = c.list_networks(pb::ListNetworksRequest::default()).await;
            let req = pb::CreateNetworkRequest {
                name: "anon".into(),
                subnet: "10.79.0.0/24".into(),
                ..Default::default()
            };
            (list, c.create_network(req).await)
        })
    })?;
    let why = expect_denied("anonymous list", list)?;
    ensure!(why.contains("a caller without a client certificate"), "{why}");
    expect_denied("anonymous create", create)?;
    ensure!(!network_names(lab)?.contains(&"anon".to_string()), "state changed");
    Ok(())
}

fn foreign_ca(lab: &mut Lab) -> Result<()> {
    let dir = lab.dir.join("foreign");
    let ca = Ca::generate()?;
    ca.save(&dir, true)?;
    let (cert, key) = ca.issue(&Subject::new("admin", Role::Admin))?.save(&dir)?;
    // Trusting our own CA: the controllers refuse the client certificate.
    let (our_ca, their_ca) = (ca_path(lab), dir.join("ca.pem"));
    let args = [
        "--controller",
        &url(1),
        "--tls-ca",
        our_ca.to_str().unwrap(),
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "network",
        "create",
        "foreign",
        "--subnet",
        "10.80.0.0/24",
    ];
    // overlayctl itself refuses to present a certificate that its --tls-ca did not sign.
    let out = raw_ctl(lab, &args);
    ensure!(stderr(&out).contains("is not valid under CA"), "{}", stderr(&out));
    // A client that presents it anyway: the controllers refuse the handshake.
    let foreign = {
        let pem = std::fs::read_to_string(&cert)?;
        let key_pem = std::fs::read_to_string(&key)?;
        use overlay_pki::rustls::pki_types::pem::PemObject;
        Identity::from_parts(
            overlay_pki::load_ca(&our_ca)?,
            overlay_pki::CertificateDer::from_pem_slice(pem.as_bytes())?,
            overlay_pki::PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?,
        )?
    };
    let refused = with_channel(lab, dialer(lab, Some(&foreign)), |ch| {
        Box::pin(async move { overlay(ch).list_networks(pb::ListNetworksRequest::default()).await })
    });
    let why = match refused {
        Ok(Ok(_)) => bail!("a certificate from another CA was accepted"),
        Ok(Err(status)) => overlay_grpc::client::tls_failure(&status).unwrap_or_default(),
        Err(e) => e.chain().find_map(overlay_grpc::client::tls_failure).unwrap_or_default(),
    };
    ensure!(why.contains("refused this client's certificate"), "{why:?}");
    // Trusting the foreign CA: the controllers' certificates are not trusted.
    let args = [
        "--controller",
        &url(1),
        "--tls-ca",
        their_ca.to_str().unwrap(),
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "network",
        "ls",
    ];
    let out = raw_ctl(lab, &args);
    ensure!(stderr(&out).contains("certificate is not trusted"), "{}", stderr(&out));
    ensure!(!network_names(lab)?.contains(&"foreign".to_string()), "state changed");
    Ok(())
}

fn agent_role_is_limited(lab: &mut Lab) -> Result<()> {
    let (cert, key) = lab.agent_cert_files(1);
    let flags: Vec<String> = vec![
        "--controller".into(),
        url(1),
        "--tls-ca".into(),
        ca_path(lab).display().to_string(),
        "--tls-cert".into(),
        cert.display().to_string(),
        "--tls-key".into(),
        key.display().to_string(),
    ];
    let agent_ctl = |args: &[&str]| {
        let mut all: Vec<&str> = flags.iter().map(String::as_str).collect();
        all.extend_from_slice(args);
        raw_ctl(lab, &all)
    };
    let out = agent_ctl(&["network", "create", "byagent", "--subnet", "10.81.0.0/24"]);
    ensure!(
        stderr(&out).starts_with("error: permission denied: agent \"h1\" may not change"),
        "{}",
        stderr(&out)
    );
    let out = agent_ctl(&["host", "add", "h9", "--underlay-ip", "192.168.217.9"]);
    ensure!(stderr(&out).starts_with("error: permission denied: agent \"h1\""), "{}", stderr(&out));
    let out = agent_ctl(&["network", "ls"]);
    ensure!(stderr(&out).starts_with("error: permission denied"), "{}", stderr(&out));
    // Endpoints (for CNI): on its own host only.
    let (mine, theirs) = (lab.ep("agent-own"), lab.ep("agent-other"));
    let out = agent_ctl(&["endpoint", "create", &theirs, "--host", "h2", "--network", "sec"]);
    ensure!(
        stderr(&out).starts_with(&format!(
            "error: permission denied: agent \"h1\" may not change endpoint {theirs} on host h2"
        )),
        "{}",
        stderr(&out)
    );
    let out = agent_ctl(&["endpoint", "create", &mine, "--host", "h1", "--network", "sec"]);
    ensure!(out.status.success(), "own host's endpoint: {}", stderr(&out));
    lab.ctl_ok(&["endpoint", "create", &theirs, "--host", "h2", "--network", "sec"])?;
    for args in [
        vec!["endpoint", "rm", theirs.as_str()],
        vec!["network", "disconnect", "sec", theirs.as_str()],
    ] {
        let out = agent_ctl(&args);
        ensure!(stderr(&out).contains("permission denied"), "{args:?}: {}", stderr(&out));
    }
    let out = agent_ctl(&["endpoint", "rm", &mine]);
    ensure!(out.status.success(), "own endpoint rm: {}", stderr(&out));
    lab.ctl_ok(&["endpoint", "rm", &theirs])?;

    let h1 = agent_identity(lab, 1);
    let (other, wrong_ip, own, beat, watch) = with_channel(lab, dialer(lab, Some(&h1)), |ch| {
        Box::pin(async move {
            let mut c = overlay(ch);
            let reg = |name: &str, ip: &str| pb::RegisterHostRequest {
                name: name.into(),
                underlay_ip: ip.into(),
                ..Default::default()
            };
            let other = c.register_host(reg("h2", "192.168.217.2")).await;
            let wrong_ip = c.register_host(reg("h1", "192.168.217.99")).await;
            let own = c.register_host(reg("h1", "192.168.217.1")).await;
            let beat =
                c.heartbeat(pb::HeartbeatRequest { host: "h2".into(), ..Default::default() }).await;
            let watch = c
                .watch(pb::WatchRequest { host: "h3".into(), ..Default::default() })
                .await
                .map(|r| {
                    drop(r);
                    tonic::Response::new(())
                });
            (other, wrong_ip, own.map(|_| ()), beat, watch)
        })
    })?;
    expect_denied("register h2 as h1", other)?;
    let why = expect_denied("register h1 with another IP", wrong_ip)?;
    ensure!(why.contains("its certificate names only 192.168.217.1"), "{why}");
    own.context("an agent registers its own host")?;
    expect_denied("heartbeat as h2", beat)?;
    expect_denied("watch as h3", watch)?;
    ensure!(!network_names(lab)?.contains(&"byagent".to_string()), "state changed");
    let hosts = lab.ctl_json(&["host", "ls"])?;
    ensure!(hosts.as_array().unwrap().iter().all(|h| h["name"] != "h9"), "h9 registered");
    // And the admin can.
    lab.ctl_ok(&["network", "create", "byadmin", "--subnet", "10.82.0.0/24"])?;
    lab.ctl_ok(&["network", "rm", "byadmin"])?;
    Ok(())
}

fn raft_only_from_controllers(lab: &mut Lab) -> Result<()> {
    let admin = {
        let (cert, key) = overlay_pki::cert_files(&lab.pki_dir(), "admin");
        identity(lab, &cert, &key)
    };
    for (who, id) in [("admin", admin), ("agent", agent_identity(lab, 1))] {
        let (raft, status) = with_channel(lab, dialer(lab, Some(&id)), |ch| {
            Box::pin(async move {
                let mut c = pb::peer_client::PeerClient::new(ch);
                let messages = tokio_stream::iter(vec![pb::RaftMessage { data: vec![1, 2, 3] }]);
                (c.raft(messages).await, c.member_status(pb::Empty {}).await)
            })
        })?;
        expect_denied(&format!("raft from {who}"), raft)?;
        expect_denied(&format!("member status from {who}"), status)?;
    }
    // A controller certificate gets in, but cannot propose what only the leader may.
    let c1 = controller_identity(lab, 1);
    let command = overlay_model::Command::SetHostStatus {
        name: "h2".into(),
        status: overlay_model::HostStatus::Down,
        now_ms: 1,
    };
    let bytes = postcard::to_stdvec(&command)?;
    let propose = with_channel(lab, dialer(lab, Some(&c1)), move |ch| {
        Box::pin(async move {
            pb::peer_client::PeerClient::new(ch)
                .propose(pb::ProposeRequest { command: bytes })
                .await
        })
    })?;
    let why = expect_denied("internal command from a peer", propose)?;
    ensure!(why.contains("only the leader itself may propose"), "{why}");
    let hosts = lab.ctl_json(&["host", "ls"])?;
    let h2 = hosts.as_array().unwrap().iter().find(|h| h["name"] == "h2").context("h2")?;
    ensure!(h2["status"] == "ready", "h2 was marked down: {h2}");
    Ok(())
}

fn token_printed_rotated_and_refused(lab: &mut Lab) -> Result<()> {
    let out = lab.ctl_ok(&["cluster", "join-token"])?;
    let token = out.split_whitespace().last().context("no token")?.to_string();
    ensure!(Some(token.as_str()) == lab.join_token(), "join-token printed another token: {out}");
    let json = lab.ctl_json(&["cluster", "join-token"])?;
    ensure!(json["token"] == token.as_str(), "{json}");
    let rotated = lab.ctl_ok(&["cluster", "join-token", "--rotate"])?;
    let new = rotated.split_whitespace().last().context("no token")?.to_string();
    ensure!(new != token, "rotation kept the token");
    let again = lab.ctl_ok(&["cluster", "join-token"])?;
    ensure!(again.split_whitespace().last() == Some(new.as_str()), "{again}");

    // Host 4 with the rotated-out token: refused, nothing registered.
    lab.start_agent(4)?;
    let status = lab.wait_agent_exit(4, T)?;
    ensure!(!status.success(), "agent with an old token kept running");
    let log = lab.agent_log(4);
    ensure!(log.contains("the join token is wrong or was rotated out"), "{log}");
    let hosts = lab.ctl_json(&["host", "ls"])?;
    ensure!(hosts.as_array().unwrap().iter().all(|h| h["name"] != "h4"), "h4 registered: {hosts}");
    ensure!(!lab.agent_cert_files(4).0.exists(), "a certificate was written");
    lab.set_join_token(&new);
    Ok(())
}

fn token_join_gives_an_agent_certificate(lab: &mut Lab) -> Result<()> {
    lab.start_agent(4)?;
    wait_for(T, "h4 ready", || {
        let hosts = lab.ctl_json(&["host", "ls"]).ok()?;
        hosts.as_array()?.iter().any(|h| h["name"] == "h4" && h["status"] == "ready").then_some(())
    })?;
    let (cert, key) = lab.agent_cert_files(4);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key)?.permissions().mode() & 0o777;
    ensure!(mode == 0o600, "key mode {mode:o}");
    let h4 = identity(lab, &cert, &key);
    ensure!(h4.info.name == "h4" && h4.info.role == Some(Role::Agent), "{:?}", h4.info);
    ensure!(h4.info.ips == vec![Lab::host_ip(4).parse::<std::net::IpAddr>()?], "{:?}", h4.info.ips);
    // It carries the network like any host.
    let ep = lab.endpoint("j4", 4, "sec", &[])?;
    let other = lab.endpoint("j1", 1, "sec", &[])?;
    let ip = lab.wait_endpoint(&other)?;
    lab.ping_ok(&ep, &ip, T)?;
    Ok(())
}

fn not_after(lab: &Lab, i: usize) -> Result<SystemTime> {
    let (cert, _) = lab.agent_cert_files(i);
    let pem = std::fs::read_to_string(&cert)?;
    let der = rustls_pem_cert(&pem)?;
    Ok(CertInfo::parse(&der)?.not_after)
}

fn rustls_pem_cert(pem: &str) -> Result<overlay_pki::CertificateDer<'static>> {
    use overlay_pki::rustls::pki_types::pem::PemObject;
    Ok(overlay_pki::CertificateDer::from_pem_slice(pem.as_bytes())?)
}

fn certificates_renew(lab: &mut Lab) -> Result<()> {
    let first = not_after(lab, 1)?;
    // The lab's agent certificates live 40 s; renewal starts when a third is left.
    let renewed = wait_for(Duration::from_secs(LIFETIME_SECS + 20), "h1 to renew", || {
        not_after(lab, 1).ok().filter(|t| *t > first)
    })?;
    eprintln!(
        "renewed: not_after moved by {:?}",
        renewed.duration_since(first).unwrap_or_default()
    );
    // Past the old certificate's end, the agent is still trusted: still ready, still
    // watching (a new endpoint on it works).
    let wait = first.duration_since(SystemTime::now()).unwrap_or_default() + Duration::from_secs(2);
    std::thread::sleep(wait);
    let ep = lab.endpoint("renewed", 1, "sec", &[])?;
    let peer = lab.ep("j4");
    let ip = lab.wait_endpoint(&peer)?;
    lab.ping_ok(&ep, &ip, T)?;
    let hosts = lab.ctl_json(&["host", "ls"])?;
    let h1 = hosts.as_array().unwrap().iter().find(|h| h["name"] == "h1").context("h1")?;
    ensure!(h1["status"] == "ready", "{h1}");
    ensure!(lab.agent_log(1).contains("renewed the agent certificate"), "no renewal logged");
    Ok(())
}

fn another_clusters_agent_is_refused(lab: &mut Lab) -> Result<()> {
    lab.stop_agent(4);
    let id_file = lab.agent_data_dir(4).join("cluster-id");
    let ours = std::fs::read_to_string(&id_file)?.trim().to_string();
    ensure!(ours.len() == 32, "cluster id {ours:?}");
    std::fs::write(&id_file, "ffffffffffffffffffffffffffffffff\n")?;
    lab.start_agent(4)?;
    wait_for(T, "the refusal in h4's log", || {
        lab.agent_log(4)
            .contains("but the caller belongs to cluster ffffffffffffffffffffffffffffffff")
            .then_some(())
    })?;
    std::fs::write(&id_file, format!("{ours}\n"))?;
    lab.stop_agent(4);
    lab.start_agent(4)?;
    wait_for(T, "h4 ready again", || {
        let hosts = lab.ctl_json(&["host", "ls"]).ok()?;
        hosts.as_array()?.iter().any(|h| h["name"] == "h4" && h["status"] == "ready").then_some(())
    })?;
    Ok(())
}

fn limits(lab: &mut Lab) -> Result<()> {
    let h1 = agent_identity(lab, 1);
    let outcomes = with_channel(lab, dialer(lab, Some(&h1)), |ch| {
        Box::pin(async move {
            let mut c = overlay(ch);
            let mut held = Vec::new();
            let mut codes = Vec::new();
            for _ in 0..10 {
                match c.watch(pb::WatchRequest { host: "h1".into(), ..Default::default() }).await {
                    Ok(stream) => held.push(stream),
                    Err(s) => codes.push((s.code(), s.message().to_string())),
                }
            }
            let big = pb::CreateNetworkRequest {
                name: "x".repeat(5 * 1024 * 1024),
                subnet: "10.83.0.0/24".into(),
                ..Default::default()
            };
            (held.len(), codes, c.create_network(big).await.map(|_| ()))
        })
    })?;
    let (opened, refused, big) = outcomes;
    ensure!(opened <= 8, "{opened} watch streams for one agent");
    let (code, why) = refused.first().context("no watch was refused")?;
    ensure!(
        *code == Code::ResourceExhausted && why.contains("watch streams open"),
        "{code:?} {why}"
    );
    let big = big.err().context("a 5 MiB request was read")?;
    ensure!(matches!(big.code(), Code::ResourceExhausted | Code::OutOfRange), "{big:?}");
    Ok(())
}

#[test]
fn security() {
    let opts = LabOptions {
        agents: Some(3),
        controller_args: vec!["--agent-cert-lifetime".into(), format!("{LIFETIME_SECS}s")],
        ..LabOptions::hosts(4)
    };
    let cases: &[(&str, Case)] = &[
        ("setup", setup),
        ("plaintext_refused", plaintext_refused),
        ("no_client_certificate", no_client_certificate),
        ("foreign_ca", foreign_ca),
        ("agent_role_is_limited", agent_role_is_limited),
        ("raft_only_from_controllers", raft_only_from_controllers),
        ("token_printed_rotated_and_refused", token_printed_rotated_and_refused),
        ("token_join_gives_an_agent_certificate", token_join_gives_an_agent_certificate),
        ("certificates_renew", certificates_renew),
        ("another_clusters_agent_is_refused", another_clusters_agent_is_refused),
        ("limits", limits),
    ];
    run_cases_with(opts, cases);
}
