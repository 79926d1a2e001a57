//! The `overlay-cni` binary run as a container runtime runs it: environment, stdin,
//! stdout, exit status. Needs no agent: these are the answers it gives on its own (DEL of
//! an unknown container through a real agent is in the end-to-end suite, tests/tests/cni.rs).

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn run(env: &[(&str, &str)], stdin: &str) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_overlay-cni"));
    cmd.env_clear().stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn overlay-cni");
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin.as_bytes()).expect("stdin");
    }
    child.wait_with_output().expect("wait")
}

fn stdout_json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("stdout is not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout))
    })
}

fn add_env(netns: &str) -> Vec<(&str, &str)> {
    vec![
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "0123456789abcdef"),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=web1"),
        ("CNI_PATH", "/opt/cni/bin"),
    ]
}

#[test]
fn version_lists_the_supported_versions() {
    let out = run(&[("CNI_COMMAND", "VERSION")], r#"{"cniVersion":"1.0.0"}"#);
    assert!(out.status.success());
    let v = stdout_json(&out);
    assert_eq!(v["cniVersion"], "1.0.0");
    assert_eq!(v["supportedVersions"], serde_json::json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0"]));
}

#[test]
fn run_by_hand_it_says_what_it_is() {
    let out = run(&[], "");
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("overlay-cni") && err.contains("1.0.0"), "{err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn add_with_the_agent_unreachable_names_the_socket() {
    let dir = std::env::temp_dir().join(format!("ov-cni-bin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let socket = dir.join("agent.sock");
    let conf = format!(
        r#"{{"cniVersion":"1.0.0","name":"web","type":"overlay-cni","network":"web","socket":"{}"}}"#,
        socket.display()
    );
    let out = run(&add_env("/run/netns/none"), &conf);
    assert_eq!(out.status.code(), Some(1));
    let e = stdout_json(&out);
    assert_eq!(e["cniVersion"], "1.0.0");
    assert_eq!(e["code"], 11);
    assert_eq!(e["msg"], format!("overlay agent unreachable at {}", socket.display()));
    let details = e["details"].as_str().unwrap_or_default();
    assert!(details.contains("No such file or directory"), "{details}");
    // A socket nobody listens on is named the same way.
    let listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
    drop(listener);
    let out = run(&add_env("/run/netns/none"), &conf);
    let e = stdout_json(&out);
    assert_eq!(e["msg"], format!("overlay agent unreachable at {}", socket.display()));
    assert!(e["details"].as_str().unwrap_or_default().contains("refused"), "{e}");
    // The default socket when the configuration names none.
    let out =
        run(&add_env("/run/netns/none"), r#"{"cniVersion":"1.0.0","name":"ovt-no-such-net"}"#);
    let e = stdout_json(&out);
    if !std::path::Path::new("/run/overlay/agent.sock").exists() {
        assert_eq!(e["msg"], "overlay agent unreachable at /run/overlay/agent.sock");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_input_is_a_cni_error_before_any_request() {
    let conf = r#"{"cniVersion":"1.0.0","name":"web"}"#;
    let mut env = add_env("/run/netns/x");
    env.retain(|(k, _)| *k != "CNI_IFNAME");
    let out = run(&env, conf);
    assert_eq!(out.status.code(), Some(1));
    let e = stdout_json(&out);
    assert_eq!(e["code"], 4);
    assert_eq!(e["msg"], "required env variables [CNI_IFNAME] missing");

    let out = run(&add_env("/run/netns/x"), r#"{"cniVersion":"9.9.9","name":"web"}"#);
    let e = stdout_json(&out);
    assert_eq!((e["code"].as_u64(), e["cniVersion"].as_str()), (Some(1), Some("9.9.9")));

    let out = run(&add_env("/run/netns/x"), "{");
    assert_eq!(stdout_json(&out)["code"], 6);
}
