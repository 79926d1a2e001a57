//! The `overlayctl` binary as a user runs it: exit statuses, the one-line error rule and
//! output, against an in-process fake controller.

#[path = "../src/fake.rs"]
mod fake;

use std::process::Output;

use fake::Behaviour;
use serde_json::{json, Value};
use tonic::Code;

/// `overlayctl --insecure ARGS`: the fake controller speaks plaintext.
async fn overlayctl(args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_overlayctl"))
        .arg("--insecure")
        .args(args)
        .env_remove("OVERLAY_CONTROLLER")
        .env_remove("RUST_BACKTRACE")
        .output()
        .await
        .expect("run overlayctl")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Exit status 1 (or `code`), nothing on stdout, exactly one `error: ` line on stderr.
fn assert_error(out: &Output, code: i32) -> String {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {stderr}");
    assert_eq!(text(&out.stdout), "");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: ") && stderr.ends_with('\n'), "{stderr}");
    stderr.trim_end().to_string()
}

/// Exit status 0; on stderr at most the `--insecure` warning.
fn assert_ok(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(stderr.is_empty() || stderr.starts_with("warning: --insecure"), "{stderr}");
    assert!(stderr.lines().count() <= 1, "{stderr}");
    text(&out.stdout)
}

async fn refused_url() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    format!("http://{addr}")
}

#[tokio::test]
async fn usage_errors_exit_2_with_one_line() {
    let out = overlayctl(&["network", "create", "x"]).await;
    assert_eq!(
        assert_error(&out, 2),
        "error: the following required arguments were not provided: --subnet <CIDR>"
    );
    assert_error(&overlayctl(&[]).await, 2);
    assert_error(&overlayctl(&["network", "ls", "--frob"]).await, 2);
}

#[tokio::test]
async fn help_and_version_exit_0() {
    let help = assert_ok(&overlayctl(&["--help"]).await);
    assert!(help.contains("network"), "{help}");
    let version = assert_ok(&overlayctl(&["--version"]).await);
    assert!(version.starts_with("overlayctl "), "{version}");
    assert_ok(&overlayctl(&["route", "add", "--help"]).await);
}

#[tokio::test]
async fn bad_input_fails_before_any_call() {
    let (url, calls) = fake::spawn(Behaviour::Answer).await;
    let out =
        overlayctl(&["--controller", &url, "network", "create", "f", "--subnet", "10.0.1.5/24"])
            .await;
    assert_eq!(
        assert_error(&out, 1),
        r#"error: invalid CIDR "10.0.1.5/24": expected an IPv4 network such as 10.0.1.0/24"#
    );
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[tokio::test]
async fn bad_member_values_fail_before_any_call() {
    let (url, calls) = fake::spawn(Behaviour::Answer).await;
    let out = overlayctl(&["--controller", &url, "cluster", "member", "add", "4", "nowhere"]).await;
    assert_eq!(
        assert_error(&out, 1),
        r#"error: invalid member address "nowhere": expected IP:PORT"#
    );
    let out = overlayctl(&["--controller", &url, "cluster", "member", "rm", "0"]).await;
    assert_eq!(assert_error(&out, 1), "error: invalid member id 0: member ids start at 1");
    assert_error(&overlayctl(&["cluster", "member", "rm", "x"]).await, 2);
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 0);
    let out = overlayctl(&[
        "--controller",
        &url,
        "-o",
        "json",
        "cluster",
        "member",
        "add",
        "4",
        "10.0.0.4:7400",
    ])
    .await;
    let v: Value = serde_json::from_str(&assert_ok(&out)).expect("json");
    assert_eq!(v["change"], "added");
    assert_eq!(v["id"], 4);
    assert_eq!(v["address"], "10.0.0.4:7400");
}

#[tokio::test]
async fn no_controller_is_one_line() {
    let dead = refused_url().await;
    let out = overlayctl(&["--controller", &dead, "network", "ls"]).await;
    assert_eq!(
        assert_error(&out, 1),
        format!("error: cannot reach any controller ({dead}: connection refused)")
    );
}

#[tokio::test]
async fn the_controller_message_is_the_error() {
    let message = "subnet 10.0.1.0/25 overlaps network frontend (10.0.1.0/24)";
    let (url, _) = fake::spawn(Behaviour::Fail(Code::InvalidArgument, message.into())).await;
    let out =
        overlayctl(&["--controller", &url, "network", "create", "b", "--subnet", "10.0.1.0/25"])
            .await;
    assert_eq!(assert_error(&out, 1), format!("error: {message}"));
}

#[tokio::test]
async fn fails_over_and_prints_json() {
    let dead = refused_url().await;
    let (live, _) = fake::spawn(Behaviour::Answer).await;
    let urls = format!("{dead},{live}");

    let out = overlayctl(&["--controller", &urls, "-o", "json", "network", "ls"]).await;
    let networks: Value = serde_json::from_str(&assert_ok(&out)).expect("json");
    assert_eq!(networks[0]["name"], "frontend");
    assert_eq!(networks[0]["endpoints"][0]["aliases"], json!(["web"]));

    let out = overlayctl(&["--controller", &urls, "host", "ls", "-o", "json"]).await;
    let hosts: Value = serde_json::from_str(&assert_ok(&out)).expect("json");
    assert_eq!(hosts[0]["last_seen"], "2026-11-23T10:04:05Z");

    let out = overlayctl(&["--controller", &urls, "-o", "json", "endpoint", "rm", "s1"]).await;
    let removed: Value = serde_json::from_str(&assert_ok(&out)).expect("json");
    assert_eq!(removed, json!({"removed": "endpoint", "name": "s1"}));
}

#[tokio::test]
async fn tables_by_default() {
    let (url, _) = fake::spawn(Behaviour::Answer).await;
    let out = assert_ok(&overlayctl(&["--controller", &url, "network", "ls"]).await);
    assert!(
        out.starts_with(
            "NAME       SUBNET        GATEWAY    VNI    MTU    ENCAP   INTERNAL   ENDPOINTS\n"
        ),
        "{out}"
    );
    let out = assert_ok(&overlayctl(&["--controller", &url, "endpoint", "rm", "s1"]).await);
    assert_eq!(out, "removed endpoint s1\n");
    let out = assert_ok(&overlayctl(&["--controller", &url, "cluster", "status"]).await);
    assert!(out.starts_with("ID   ADDRESS"), "{out}");
}

#[tokio::test]
async fn env_names_the_controller() {
    let (url, calls) = fake::spawn(Behaviour::Answer).await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_overlayctl"))
        .args(["--insecure", "route", "ls"])
        .env("OVERLAY_CONTROLLER", url.trim_start_matches("http://"))
        .output()
        .await
        .expect("run overlayctl");
    assert!(assert_ok(&out).contains("10.0.2.0/24"));
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// `cni-config`: a conflist for an existing network (overlay-cni, then portmap), refused
/// for one the controller does not know.
#[tokio::test]
async fn cni_config_prints_a_conflist() {
    let (url, _) = fake::spawn(Behaviour::Answer).await;
    let out =
        overlayctl(&["--controller", &url, "cni-config", "web", "--socket", "/run/a.sock"]).await;
    let list: Value = serde_json::from_str(&assert_ok(&out)).expect("json");
    assert_eq!(
        list,
        json!({
            "cniVersion": "1.0.0",
            "name": "web",
            "plugins": [
                {"type": "overlay-cni", "network": "web", "socket": "/run/a.sock"},
                {"type": "portmap", "capabilities": {"portMappings": true}}
            ]
        })
    );
    let out = overlayctl(&["--controller", &url, "cni-config", "web"]).await;
    let list: Value = serde_json::from_str(&assert_ok(&out)).expect("json");
    assert_eq!(list["plugins"][0]["socket"], "/run/overlay/agent.sock");
    let out = overlayctl(&["--controller", &url, "cni-config", "web", "--socket", "a.sock"]).await;
    assert_eq!(assert_error(&out, 1), "error: --socket a.sock: must be an absolute path");

    let (url, _) =
        fake::spawn(Behaviour::Fail(Code::NotFound, "network nosuch not found".into())).await;
    let out = overlayctl(&["--controller", &url, "cni-config", "nosuch"]).await;
    assert_eq!(assert_error(&out, 1), "error: network nosuch not found");
}
