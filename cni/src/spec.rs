//! What the CNI specification (1.0.0) defines, as plain data and pure functions: the
//! environment a runtime sets, the configuration it writes on stdin, `CNI_ARGS`, version
//! negotiation, and the success, version and error objects a plugin prints.
//!
//! Behaviour follows the specification and the reference plugins' `skel` package:
//! `CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_IFNAME` and `CNI_PATH` are required for ADD, DEL
//! and CHECK, `CNI_NETNS` for ADD and CHECK; container IDs, network names and interface
//! names are validated before anything else; unknown `CNI_ARGS` keys are refused unless
//! `IgnoreUnknown` is set; errors are `{"cniVersion","code","msg","details"}` on stdout.

use std::fmt;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// Specification versions this plugin speaks (configuration and results).
pub const SUPPORTED_VERSIONS: [&str; 4] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"];
/// The version used when the input names none we can use (errors, VERSION).
pub const CURRENT_VERSION: &str = "1.0.0";
/// Where the agent listens unless the configuration says otherwise (`socket`).
pub const DEFAULT_SOCKET: &str = "/run/overlay/agent.sock";
/// The embedded DNS every endpoint has.
pub const DNS_SERVER: &str = "127.0.0.11";
/// Linux's limit on interface names (IFNAMSIZ - 1).
const MAX_IFNAME: usize = 15;

/// Error codes: 1–99 are the specification's, 100+ this plugin's own.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODING_FAILURE: u32 = 6;
    pub const INVALID_NETWORK_CONFIG: u32 = 7;
    /// Transient: the agent or the controllers cannot be reached now.
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// The network has no free address left.
    pub const POOL_EXHAUSTED: u32 = 100;
    /// The endpoint name is taken by another endpoint or namespace.
    pub const NAME_CLASH: u32 = 101;
    /// The agent could not realise the attachment in time.
    pub const NOT_REALIZED: u32 = 102;
    /// CHECK found the attachment missing or different.
    pub const NOT_ATTACHED: u32 = 103;
    /// Anything else (the reference plugins' "internal" code).
    pub const INTERNAL: u32 = 999;
}

/// The CNI error object. `msg` is short and names the bad thing; `details` says more.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{msg}{}", if details.is_empty() { String::new() } else { format!("; {details}") })]
pub struct CniError {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> CniError {
        CniError {
            cni_version: CURRENT_VERSION.to_string(),
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The same error, reported in the configuration's version.
    pub fn in_version(mut self, version: &str) -> CniError {
        if !version.is_empty() {
            self.cni_version = version.to_string();
        }
        self
    }

    /// As printed on stdout.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| {
            format!(r#"{{"cniVersion":"{CURRENT_VERSION}","code":{},"msg":"error"}}"#, self.code)
        })
    }
}

/// `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
        })
    }
}

/// The `CNI_*` environment of one invocation, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    pub command: Command,
    pub container_id: String,
    /// Empty only for DEL (the namespace may be gone) and VERSION.
    pub netns: String,
    pub ifname: String,
    pub args: String,
    pub path: String,
}

/// Reads the environment through `get` (`std::env::var` in the binary). `Ok(None)` when
/// `CNI_COMMAND` is not set at all: the plugin was run by hand, and says what it is.
pub fn read_env(get: &dyn Fn(&str) -> Option<String>) -> Result<Option<Env>, CniError> {
    let var = |name: &str| get(name).unwrap_or_default();
    let command = match var("CNI_COMMAND").as_str() {
        "" => return Ok(None),
        "ADD" => Command::Add,
        "DEL" => Command::Del,
        "CHECK" => Command::Check,
        "VERSION" => Command::Version,
        other => {
            return Err(CniError::new(
                code::INVALID_ENVIRONMENT,
                format!("unknown CNI_COMMAND {other:?}"),
                "expected ADD, DEL, CHECK or VERSION",
            ))
        }
    };
    let env = Env {
        command,
        container_id: var("CNI_CONTAINERID"),
        netns: var("CNI_NETNS"),
        ifname: var("CNI_IFNAME"),
        args: var("CNI_ARGS"),
        path: var("CNI_PATH"),
    };
    if command == Command::Version {
        return Ok(Some(env));
    }
    let mut missing = vec![];
    for (name, value, needed) in [
        ("CNI_CONTAINERID", &env.container_id, true),
        ("CNI_NETNS", &env.netns, command != Command::Del),
        ("CNI_IFNAME", &env.ifname, true),
        ("CNI_PATH", &env.path, true),
    ] {
        if needed && value.is_empty() {
            missing.push(name);
        }
    }
    if !missing.is_empty() {
        return Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            format!("required env variables [{}] missing", missing.join(",")),
            "",
        ));
    }
    if !is_cni_name(&env.container_id) {
        return Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            format!("invalid characters in CNI_CONTAINERID {:?}", env.container_id),
            "a container ID starts with a letter or digit, followed by letters, digits, '_', '.' or '-'",
        ));
    }
    check_ifname(&env.ifname)?;
    Ok(Some(env))
}

/// Container IDs and network names: a letter or digit, then letters, digits, `_ . -`.
pub fn is_cni_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphanumeric())
        && bytes.all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// `CNI_IFNAME`: what Linux accepts as an interface name.
pub fn check_ifname(name: &str) -> Result<(), CniError> {
    let bad = |why: &str| {
        Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            format!("invalid CNI_IFNAME {name:?}: {why}"),
            "",
        ))
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_IFNAME {
        return bad("longer than 15 characters");
    }
    if name == "." || name == ".." {
        return bad("not a name");
    }
    if name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace()) {
        return bad("contains '/', ':' or whitespace");
    }
    Ok(())
}

/// `x.y.z` as numbers, for comparing versions.
fn version_tuple(v: &str) -> Option<(u32, u32, u32)> {
    let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
    let t = (parts.next()??, parts.next()??, parts.next()??);
    parts.next().is_none().then_some(t)
}

/// True when `v` is at least `min` (both `x.y.z`; unparsable is false).
pub fn version_at_least(v: &str, min: &str) -> bool {
    matches!((version_tuple(v), version_tuple(min)), (Some(a), Some(b)) if a >= b)
}

/// The plugin's own configuration (one entry of a conflist's `plugins`, with `name`,
/// `cniVersion`, `prevResult` and `runtimeConfig` added by the runtime). Unknown keys are
/// ignored: runtimes add their own.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct NetConf {
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "type", default)]
    pub plugin_type: String,
    /// The overlay network (default: `name`, the conflist's name).
    #[serde(default)]
    pub network: Option<String>,
    /// The agent's socket (default [`DEFAULT_SOCKET`]).
    #[serde(default)]
    pub socket: Option<String>,
    #[serde(rename = "prevResult", default)]
    pub prev_result: Option<serde_json::Value>,
}

/// A configuration that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub cni_version: String,
    pub name: String,
    pub network: String,
    pub socket: String,
    pub prev_result: Option<CniResult>,
}

/// Parses and validates the configuration on stdin for `command`.
pub fn parse_config(stdin: &[u8], command: Command) -> Result<Config, CniError> {
    let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            code::DECODING_FAILURE,
            "cannot decode the network configuration",
            e.to_string(),
        )
    })?;
    let version = conf.cni_version.clone();
    let fail = |code, msg: String, details: &str| {
        Err(CniError::new(code, msg, details).in_version(&version))
    };
    if !SUPPORTED_VERSIONS.contains(&version.as_str()) {
        return fail(
            code::INCOMPATIBLE_VERSION,
            format!("incompatible CNI version {version:?}"),
            &format!("overlay-cni supports {}", SUPPORTED_VERSIONS.join(", ")),
        );
    }
    if command == Command::Check && !version_at_least(&version, "0.4.0") {
        return fail(
            code::INCOMPATIBLE_VERSION,
            format!("config version {version} does not allow CHECK"),
            "CHECK needs cniVersion 0.4.0 or later",
        );
    }
    if conf.name.is_empty() {
        return fail(code::INVALID_NETWORK_CONFIG, "missing network name".into(), "");
    }
    if !is_cni_name(&conf.name) {
        return fail(
            code::INVALID_NETWORK_CONFIG,
            format!("invalid characters found in network name {:?}", conf.name),
            "",
        );
    }
    let network = conf.network.clone().unwrap_or_else(|| conf.name.clone());
    if !crate::naming::is_dns_label(&network) {
        return fail(
            code::INVALID_NETWORK_CONFIG,
            format!("invalid overlay network name {network:?}"),
            "overlay network names are 1-63 characters of a-z, 0-9 and '-', not starting or ending with '-'",
        );
    }
    let socket = conf.socket.clone().unwrap_or_else(|| DEFAULT_SOCKET.to_string());
    if !socket.starts_with('/') {
        return fail(
            code::INVALID_NETWORK_CONFIG,
            format!("socket {socket:?} is not an absolute path"),
            "",
        );
    }
    let prev_result = match conf.prev_result {
        Some(v) if !v.is_null() => Some(serde_json::from_value::<CniResult>(v).map_err(|e| {
            CniError::new(code::DECODING_FAILURE, "cannot decode prevResult", e.to_string())
                .in_version(&version)
        })?),
        _ => None,
    };
    Ok(Config { cni_version: version, name: conf.name, network, socket, prev_result })
}

/// What this plugin takes from `CNI_ARGS`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    /// `K8S_POD_NAME`: the container's (or pod's) name; podman passes it too.
    pub pod_name: Option<String>,
    /// `IP`: a static address asked for (podman's `--ip`).
    pub ip: Option<Ipv4Addr>,
}

/// Keys this plugin knows (the Kubernetes ones are accepted, only the name is used).
const KNOWN_ARGS: [&str; 6] = [
    "IgnoreUnknown",
    "K8S_POD_NAME",
    "K8S_POD_NAMESPACE",
    "K8S_POD_INFRA_CONTAINER_ID",
    "K8S_POD_UID",
    "IP",
];

/// Parses `K=V;K2=V2`. Unknown keys are an error unless `IgnoreUnknown` is `1`/`true`.
pub fn parse_args(args: &str) -> Result<CniArgs, CniError> {
    let mut out = CniArgs::default();
    if args.is_empty() {
        return Ok(out);
    }
    let mut pairs = vec![];
    for pair in args.split(';') {
        let Some((k, v)) = pair.split_once('=').filter(|(_, v)| !v.contains('=')) else {
            return Err(CniError::new(
                code::INVALID_ENVIRONMENT,
                format!("CNI_ARGS: invalid pair {pair:?}"),
                "expected KEY=VALUE pairs separated by ';'",
            ));
        };
        pairs.push((k, v));
    }
    let ignore_unknown = pairs.iter().any(|(k, v)| {
        *k == "IgnoreUnknown" && matches!(v.to_ascii_lowercase().as_str(), "1" | "true")
    });
    let mut unknown = vec![];
    for (k, v) in pairs {
        match k {
            "K8S_POD_NAME" if !v.is_empty() => out.pod_name = Some(v.to_string()),
            "IP" => {
                let ip = v.parse().map_err(|_| {
                    CniError::new(
                        code::INVALID_ENVIRONMENT,
                        format!("CNI_ARGS: IP={v} is not an IPv4 address"),
                        "",
                    )
                })?;
                out.ip = Some(ip);
            }
            k if KNOWN_ARGS.contains(&k) => {}
            _ => unknown.push(format!("{k}={v}")),
        }
    }
    if !unknown.is_empty() && !ignore_unknown {
        return Err(CniError::new(
            code::UNSUPPORTED_FIELD,
            format!("CNI_ARGS: unknown args [{}]", unknown.join(" ")),
            "set IgnoreUnknown=1 to ignore them",
        ));
    }
    Ok(out)
}

/// One interface of a result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    /// The container's namespace (`CNI_NETNS`); empty for a host-side interface.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sandbox: String,
}

/// One address of a result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// `"4"` in results before 1.0.0 (the field was dropped in 1.0.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// CIDR notation, e.g. `10.0.1.5/24`.
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    pub fn is_empty(&self) -> bool {
        self.nameservers.is_empty()
            && self.domain.is_none()
            && self.search.is_empty()
            && self.options.is_empty()
    }
}

/// The success object of ADD (and the `prevResult` of CHECK and DEL).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniResult {
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    #[serde(default, skip_serializing_if = "Dns::is_empty")]
    pub dns: Dns,
}

impl CniResult {
    /// Appends `ours` after what a previous plugin in the chain returned (indexes of
    /// our addresses shift past its interfaces); its DNS settings win when it has any.
    pub fn chain(prev: Option<CniResult>, ours: CniResult) -> CniResult {
        let Some(mut prev) = prev else { return ours };
        let offset = prev.interfaces.len();
        prev.interfaces.extend(ours.interfaces);
        prev.ips.extend(ours.ips.into_iter().map(|mut ip| {
            ip.interface = ip.interface.map(|i| i + offset);
            ip
        }));
        prev.routes.extend(ours.routes);
        if prev.dns.is_empty() {
            prev.dns = ours.dns;
        }
        prev.cni_version = ours.cni_version;
        prev
    }

    /// The same result in `version`'s shape (IP versions before 1.0.0).
    pub fn in_version(mut self, version: &str) -> CniResult {
        let old = !version_at_least(version, "1.0.0");
        for ip in &mut self.ips {
            ip.version = old.then(|| "4".to_string());
        }
        self.cni_version = version.to_string();
        self
    }
}

/// The object VERSION prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionResult {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    #[serde(rename = "supportedVersions")]
    pub supported_versions: Vec<String>,
}

/// VERSION's answer to `stdin` (`{"cniVersion": …}`, possibly empty): the version asked
/// for when it is one we speak, else ours.
pub fn version_result(stdin: &[u8]) -> VersionResult {
    #[derive(Deserialize)]
    struct Asked {
        #[serde(rename = "cniVersion", default)]
        cni_version: String,
    }
    let asked = serde_json::from_slice::<Asked>(stdin).map(|a| a.cni_version).unwrap_or_default();
    let cni_version = if SUPPORTED_VERSIONS.contains(&asked.as_str()) {
        asked
    } else {
        CURRENT_VERSION.to_string()
    };
    VersionResult {
        cni_version,
        supported_versions: SUPPORTED_VERSIONS.iter().map(|v| v.to_string()).collect(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn env_of(vars: &[(&str, &str)]) -> Result<Option<Env>, CniError> {
        let vars: Vec<(String, String)> =
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        read_env(&|name: &str| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
    }

    const ADD: [(&str, &str); 6] = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "769efd9c4772"),
        ("CNI_NETNS", "/run/netns/netns-d70fa5b1"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=web1"),
        ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
    ];

    #[test]
    fn the_environment_is_read_as_skel_does() {
        let env = env_of(&ADD).unwrap().unwrap();
        assert_eq!(env.command, Command::Add);
        assert_eq!(env.netns, "/run/netns/netns-d70fa5b1");
        // No CNI_COMMAND: run by hand.
        assert_eq!(env_of(&[]).unwrap(), None);
        // VERSION needs nothing else.
        assert_eq!(
            env_of(&[("CNI_COMMAND", "VERSION")]).unwrap().unwrap().command,
            Command::Version
        );
        // DEL needs no namespace; ADD does.
        let without_netns: Vec<_> =
            ADD.iter().copied().filter(|(k, _)| *k != "CNI_NETNS").collect();
        let e = env_of(&without_netns).unwrap_err();
        assert_eq!((e.code, e.msg.as_str()), (4, "required env variables [CNI_NETNS] missing"));
        let mut del = without_netns.clone();
        del[0] = ("CNI_COMMAND", "DEL");
        assert_eq!(env_of(&del).unwrap().unwrap().netns, "");
        let e = env_of(&[("CNI_COMMAND", "DEL")]).unwrap_err();
        assert_eq!(e.msg, "required env variables [CNI_CONTAINERID,CNI_IFNAME,CNI_PATH] missing");
        let e = env_of(&[("CNI_COMMAND", "GC")]).unwrap_err();
        assert_eq!((e.code, e.msg.as_str()), (4, "unknown CNI_COMMAND \"GC\""));
    }

    #[test]
    fn container_ids_and_interface_names_are_validated() {
        let with = |k: &str, v: &'static str| {
            let vars: Vec<_> =
                ADD.iter().map(|&(a, b)| if a == k { (a, v) } else { (a, b) }).collect();
            env_of(&vars)
        };
        let e = with("CNI_CONTAINERID", "-bad").unwrap_err();
        assert_eq!(e.code, 4);
        assert!(e.msg.contains("\"-bad\""), "{e}");
        assert!(with("CNI_CONTAINERID", "k8s_POD.x-1").is_ok());
        for bad in ["eth/0", "eth:0", "e th0", ".", "..", "a-very-long-ifname"] {
            let e = with("CNI_IFNAME", bad).unwrap_err();
            assert_eq!(e.code, 4, "{bad}");
            assert!(e.msg.contains("CNI_IFNAME"), "{e}");
        }
        assert!(with("CNI_IFNAME", "net1").is_ok());
    }

    /// The specification's example configuration, as the runtime hands our entry over.
    #[test]
    fn configuration_as_in_the_spec_examples() {
        let stdin = br#"{
            "cniVersion": "1.0.0",
            "name": "dbnet",
            "type": "overlay-cni",
            "network": "backend",
            "keyA": ["some more", "plugin specific", "configuration"],
            "runtimeConfig": {"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]},
            "args": {"cni": {}}
        }"#;
        let c = parse_config(stdin, Command::Add).unwrap();
        assert_eq!(
            (c.cni_version.as_str(), c.name.as_str(), c.network.as_str(), c.socket.as_str()),
            ("1.0.0", "dbnet", "backend", DEFAULT_SOCKET)
        );
        assert_eq!(c.prev_result, None);
        // The network defaults to the conflist's name; the socket can be chosen.
        let c = parse_config(
            br#"{"cniVersion":"0.4.0","name":"web","type":"overlay-cni","socket":"/tmp/a.sock"}"#,
            Command::Add,
        )
        .unwrap();
        assert_eq!((c.network.as_str(), c.socket.as_str()), ("web", "/tmp/a.sock"));
    }

    #[test]
    fn configuration_errors_name_the_bad_value() {
        let e = parse_config(b"{", Command::Add).unwrap_err();
        assert_eq!(e.code, code::DECODING_FAILURE);
        let e = parse_config(br#"{"cniVersion":"2.0.0","name":"web"}"#, Command::Add).unwrap_err();
        assert_eq!((e.code, e.cni_version.as_str()), (1, "2.0.0"));
        assert!(e.msg.contains("\"2.0.0\""), "{e}");
        let e =
            parse_config(br#"{"cniVersion":"0.3.1","name":"web"}"#, Command::Check).unwrap_err();
        assert_eq!(e.code, 1);
        let e = parse_config(br#"{"cniVersion":"1.0.0"}"#, Command::Add).unwrap_err();
        assert_eq!((e.code, e.msg.as_str()), (7, "missing network name"));
        let e =
            parse_config(br#"{"cniVersion":"1.0.0","name":"web","network":"Web_1"}"#, Command::Add)
                .unwrap_err();
        assert_eq!(e.code, 7);
        assert!(e.msg.contains("\"Web_1\""), "{e}");
        let e = parse_config(
            br#"{"cniVersion":"1.0.0","name":"web","socket":"agent.sock"}"#,
            Command::Add,
        )
        .unwrap_err();
        assert!(e.msg.contains("\"agent.sock\""), "{e}");
    }

    #[test]
    fn cni_args_as_podman_and_kubelet_pass_them() {
        let a = parse_args("IgnoreUnknown=1;K8S_POD_NAME=My_Box.1").unwrap();
        assert_eq!(a, CniArgs { pod_name: Some("My_Box.1".into()), ip: None });
        let a = parse_args(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u;IP=10.0.1.9;MAC=02:00:00:00:00:01",
        )
        .unwrap();
        assert_eq!(a.pod_name.as_deref(), Some("web-0"));
        assert_eq!(a.ip, Some(Ipv4Addr::new(10, 0, 1, 9)));
        assert_eq!(parse_args("").unwrap(), CniArgs::default());
        let e = parse_args("FOO=BAR").unwrap_err();
        assert_eq!((e.code, e.msg.as_str()), (2, "CNI_ARGS: unknown args [FOO=BAR]"));
        assert!(parse_args("FOO=BAR;IgnoreUnknown=true").is_ok());
        let e = parse_args("IgnoreUnknown=1;oops").unwrap_err();
        assert_eq!(e.msg, "CNI_ARGS: invalid pair \"oops\"");
        let e = parse_args("IP=10.0.1.300").unwrap_err();
        assert!(e.msg.contains("10.0.1.300"), "{e}");
    }

    /// The bridge plugin's result from the specification's ADD example, read as a
    /// `prevResult` and written back unchanged.
    #[test]
    fn results_round_trip_the_spec_example() {
        let example = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"cni0","mac":"00:11:22:33:44:55"},{"name":"veth3243","mac":"55:44:33:22:11:11"},{"name":"eth0","mac":"99:88:77:66:55:44","sandbox":"/var/run/netns/blue"}],"ips":[{"address":"10.1.0.5/16","gateway":"10.1.0.1","interface":2}],"routes":[{"dst":"0.0.0.0/0"}],"dns":{"nameservers":["10.1.0.1"]}}"#;
        let r: CniResult = serde_json::from_str(example).unwrap();
        assert_eq!(r.interfaces[2].sandbox, "/var/run/netns/blue");
        assert_eq!(r.ips[0].interface, Some(2));
        assert_eq!(serde_json::to_string(&r).unwrap(), example);
        // Before 1.0.0 addresses carry their IP version.
        let old = r.clone().in_version("0.4.0");
        assert_eq!(old.ips[0].version.as_deref(), Some("4"));
        assert!(serde_json::to_string(&old).unwrap().contains(r#""version":"4","address""#));
        assert_eq!(old.in_version("1.0.0"), r);
    }

    #[test]
    fn a_result_after_another_plugin_keeps_its_part() {
        let prev = CniResult {
            cni_version: "1.0.0".into(),
            interfaces: vec![Interface { name: "lo0".into(), ..Default::default() }],
            ips: vec![IpConfig {
                address: "192.0.2.9/32".into(),
                interface: Some(0),
                ..Default::default()
            }],
            ..Default::default()
        };
        let ours = CniResult {
            cni_version: "1.0.0".into(),
            interfaces: vec![
                Interface { name: "ovv1".into(), ..Default::default() },
                Interface {
                    name: "eth0".into(),
                    sandbox: "/run/netns/x".into(),
                    ..Default::default()
                },
            ],
            ips: vec![IpConfig {
                address: "10.0.1.2/24".into(),
                interface: Some(1),
                ..Default::default()
            }],
            dns: Dns { nameservers: vec![DNS_SERVER.into()], ..Default::default() },
            ..Default::default()
        };
        let r = CniResult::chain(Some(prev), ours.clone());
        assert_eq!(r.interfaces.len(), 3);
        assert_eq!(r.ips[1].interface, Some(2));
        assert_eq!(r.dns.nameservers, vec![DNS_SERVER]);
        assert_eq!(CniResult::chain(None, ours.clone()), ours);
    }

    /// The error object of the specification's example, field for field.
    #[test]
    fn errors_print_as_the_spec_shows() {
        let e = CniError::new(
            7,
            "Invalid Configuration",
            "Network 192.168.0.0/31 too small to allocate from.",
        );
        assert_eq!(
            e.to_json(),
            r#"{"cniVersion":"1.0.0","code":7,"msg":"Invalid Configuration","details":"Network 192.168.0.0/31 too small to allocate from."}"#
        );
        assert_eq!(
            e.to_string(),
            "Invalid Configuration; Network 192.168.0.0/31 too small to allocate from."
        );
        let e = CniError::new(11, "later", "").in_version("0.4.0");
        assert_eq!(e.to_json(), r#"{"cniVersion":"0.4.0","code":11,"msg":"later"}"#);
    }

    #[test]
    fn version_answers_as_the_spec_shows() {
        let v = version_result(br#"{"cniVersion":"1.0.0"}"#);
        assert_eq!(
            serde_json::to_string(&v).unwrap(),
            r#"{"cniVersion":"1.0.0","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0"]}"#
        );
        assert_eq!(version_result(br#"{"cniVersion":"0.4.0"}"#).cni_version, "0.4.0");
        assert_eq!(version_result(b"").cni_version, CURRENT_VERSION);
        assert!(version_at_least("1.0.0", "0.4.0"));
        assert!(!version_at_least("0.3.1", "0.4.0"));
        assert!(!version_at_least("x", "0.4.0"));
    }
}
