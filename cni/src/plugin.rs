//! One plugin invocation, without the I/O (pure): the environment and stdin become either
//! something to print at once (VERSION, the "about" line) or one request for the agent;
//! the agent's reply becomes the CNI result, nothing (DEL, CHECK) or a CNI error.

use crate::protocol::{Attached, Failure, FailureKind, Op, Reply, Request, PROTOCOL_VERSION};
use crate::spec::{
    self, code, CniError, CniResult, Command, Dns, Interface, IpConfig, Route, DNS_SERVER,
};

/// What the binary prints when run by hand (no `CNI_COMMAND`), on stderr.
pub fn about() -> String {
    format!(
        "overlay-cni {}: attaches containers to overlay networks through the local overlay-agent\nCNI protocol versions supported: {}",
        env!("CARGO_PKG_VERSION"),
        spec::SUPPORTED_VERSIONS.join(", ")
    )
}

/// What to do for one invocation.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Print this on stderr and exit 0.
    About(String),
    /// Print this on stdout and exit 0.
    Print(String),
    /// Ask the agent.
    Ask(Box<Ask>),
}

/// Send `request` to the agent at `socket`, then [`finish`] with its reply.
#[derive(Debug, Clone, PartialEq)]
pub struct Ask {
    pub socket: String,
    pub request: Request,
    pub context: Context,
}

/// What [`finish`] needs to know about the invocation.
#[derive(Debug, Clone, PartialEq)]
pub struct Context {
    pub command: Command,
    /// The configuration's `cniVersion`: results and errors are printed in it.
    pub version: String,
    pub netns: String,
    pub ifname: String,
    pub prev_result: Option<CniResult>,
}

/// Validates the environment (through `get`) and `stdin` into a [`Step`].
pub fn prepare(get: &dyn Fn(&str) -> Option<String>, stdin: &[u8]) -> Result<Step, CniError> {
    let Some(env) = spec::read_env(get)? else { return Ok(Step::About(about())) };
    if env.command == Command::Version {
        let out = serde_json::to_string(&spec::version_result(stdin)).map_err(|e| {
            CniError::new(code::INTERNAL, "cannot encode the version", e.to_string())
        })?;
        return Ok(Step::Print(out));
    }
    let config = spec::parse_config(stdin, env.command)?;
    let version = config.cni_version.clone();
    let args = spec::parse_args(&env.args).map_err(|e| e.in_version(&version))?;
    let op = match env.command {
        Command::Add => Op::Add,
        Command::Del => Op::Del,
        _ => Op::Check,
    };
    let request = Request {
        version: PROTOCOL_VERSION,
        op,
        container_id: env.container_id,
        netns: env.netns.clone(),
        ifname: env.ifname.clone(),
        network: config.network,
        pod_name: args.pod_name,
        ip: args.ip,
    };
    let context = Context {
        command: env.command,
        version,
        netns: env.netns,
        ifname: env.ifname,
        prev_result: config.prev_result,
    };
    Ok(Step::Ask(Box::new(Ask { socket: config.socket, request, context })))
}

/// The error for an agent that could not be asked (connect, send or receive failed).
pub fn agent_unreachable(context: &Context, socket: &str, why: &str) -> CniError {
    CniError::new(
        code::TRY_AGAIN_LATER,
        format!("overlay agent unreachable at {socket}"),
        format!("{why} (is overlay-agent running on this host, with --socket {socket}?)"),
    )
    .in_version(&context.version)
}

/// The agent's reply as what to print on stdout (`None`: nothing) or a CNI error.
pub fn finish(context: &Context, reply: Reply) -> Result<Option<String>, CniError> {
    match (context.command, reply) {
        (_, Reply::Failed(failure)) => Err(failure_to_error(&failure).in_version(&context.version)),
        (Command::Add, Reply::Attached(attached)) => {
            let ours = result_of(&attached, context);
            let result =
                CniResult::chain(context.prev_result.clone(), ours).in_version(&context.version);
            serde_json::to_string(&result).map(Some).map_err(|e| {
                CniError::new(code::INTERNAL, "cannot encode the result", e.to_string())
                    .in_version(&context.version)
            })
        }
        (Command::Check, Reply::Attached(attached)) => {
            check_against(context, &attached).map(|()| None)
        }
        (Command::Del, Reply::Detached) => Ok(None),
        (command, other) => Err(CniError::new(
            code::INTERNAL,
            format!("the agent answered {command} with an unexpected reply"),
            format!("{other:?}"),
        )
        .in_version(&context.version)),
    }
}

/// The CNI code for each kind of failure.
fn failure_to_error(f: &Failure) -> CniError {
    let code = match f.kind {
        FailureKind::InvalidRequest => code::INVALID_ENVIRONMENT,
        FailureKind::UnknownNetwork | FailureKind::Refused => code::INVALID_NETWORK_CONFIG,
        FailureKind::PoolExhausted => code::POOL_EXHAUSTED,
        FailureKind::NameClash => code::NAME_CLASH,
        FailureKind::ControllerUnreachable => code::TRY_AGAIN_LATER,
        FailureKind::NotRealized => code::NOT_REALIZED,
        FailureKind::NotAttached => code::NOT_ATTACHED,
        FailureKind::Version | FailureKind::Internal => code::INTERNAL,
    };
    CniError::new(code, f.message.clone(), f.details.clone())
}

/// The CNI result of an attachment: the host end and the container's interface, its
/// address with the gateway, its routes, and the embedded DNS.
pub fn result_of(a: &Attached, context: &Context) -> CniResult {
    let gateway = a.gateway.to_string();
    CniResult {
        cni_version: context.version.clone(),
        interfaces: vec![
            Interface {
                name: a.host_interface.clone(),
                mac: a.host_mac.clone().unwrap_or_default(),
                sandbox: String::new(),
            },
            Interface {
                name: a.interface.clone(),
                mac: a.mac.clone(),
                sandbox: context.netns.clone(),
            },
        ],
        ips: vec![IpConfig {
            version: None,
            address: a.address.clone(),
            gateway: Some(gateway),
            interface: Some(1),
        }],
        routes: a
            .routes
            .iter()
            .map(|r| Route { dst: r.dst.clone(), gw: Some(r.gw.to_string()) })
            .collect(),
        dns: Dns {
            nameservers: if a.nameservers.is_empty() {
                vec![DNS_SERVER.to_string()]
            } else {
                a.nameservers.clone()
            },
            ..Dns::default()
        },
    }
}

/// CHECK: the `prevResult` must list `CNI_IFNAME` in the container with the MAC and
/// address the agent reports now.
pub fn check_against(context: &Context, a: &Attached) -> Result<(), CniError> {
    let fail = |code, msg: String| Err(CniError::new(code, msg, "").in_version(&context.version));
    let Some(prev) = &context.prev_result else {
        return fail(
            code::INVALID_NETWORK_CONFIG,
            "CHECK needs prevResult, which is missing".into(),
        );
    };
    let Some(index) =
        prev.interfaces.iter().position(|i| i.name == context.ifname && !i.sandbox.is_empty())
    else {
        return fail(
            code::NOT_ATTACHED,
            format!("prevResult lists no interface {} in the container", context.ifname),
        );
    };
    let mac = &prev.interfaces[index].mac;
    if !mac.is_empty() && !mac.eq_ignore_ascii_case(&a.mac) {
        return fail(
            code::NOT_ATTACHED,
            format!("{} has MAC {} now, not {mac} as added", context.ifname, a.mac),
        );
    }
    let addresses: Vec<&str> = prev
        .ips
        .iter()
        .filter(|ip| ip.interface == Some(index))
        .map(|ip| ip.address.as_str())
        .collect();
    if !addresses.contains(&a.address.as_str()) {
        return fail(
            code::NOT_ATTACHED,
            format!(
                "{} has address {} now, not {} as added",
                context.ifname,
                a.address,
                addresses.join(", ")
            ),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::protocol::RouteFact;
    use std::net::Ipv4Addr;

    fn vars(command: &str) -> Vec<(&'static str, String)> {
        vec![
            ("CNI_COMMAND", command.into()),
            ("CNI_CONTAINERID", "769efd9c47723aea".into()),
            ("CNI_NETNS", "/run/netns/netns-1".into()),
            ("CNI_IFNAME", "eth0".into()),
            ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=web1".into()),
            ("CNI_PATH", "/opt/cni/bin".into()),
        ]
    }

    fn step(vars: &[(&'static str, String)], stdin: &str) -> Result<Step, CniError> {
        prepare(
            &|k: &str| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()),
            stdin.as_bytes(),
        )
    }

    const CONF: &str =
        r#"{"cniVersion":"1.0.0","name":"web","type":"overlay-cni","socket":"/run/ov/a.sock"}"#;

    fn attached() -> Attached {
        Attached {
            endpoint: "web1".into(),
            interface: "eth0".into(),
            mac: "02:0a:00:01:00:02".into(),
            address: "10.0.1.2/24".into(),
            gateway: Ipv4Addr::new(10, 0, 1, 1),
            routes: vec![RouteFact { dst: "0.0.0.0/0".into(), gw: Ipv4Addr::new(10, 0, 1, 1) }],
            host_interface: "ovv0123456789ab".into(),
            host_mac: Some("aa:bb:cc:dd:ee:ff".into()),
            nameservers: vec![DNS_SERVER.into()],
        }
    }

    fn ask(vars: &[(&'static str, String)], stdin: &str) -> (String, Request, Context) {
        match step(vars, stdin).unwrap() {
            Step::Ask(ask) => (ask.socket, ask.request, ask.context),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn add_becomes_one_request() {
        let (socket, request, _) = ask(&vars("ADD"), CONF);
        assert_eq!(socket, "/run/ov/a.sock");
        assert_eq!(
            request,
            Request {
                version: PROTOCOL_VERSION,
                op: Op::Add,
                container_id: "769efd9c47723aea".into(),
                netns: "/run/netns/netns-1".into(),
                ifname: "eth0".into(),
                network: "web".into(),
                pod_name: Some("web1".into()),
                ip: None,
            }
        );
    }

    #[test]
    fn version_and_about_need_no_agent() {
        let v = vec![("CNI_COMMAND", "VERSION".to_string())];
        assert_eq!(
            step(&v, r#"{"cniVersion":"1.0.0"}"#).unwrap(),
            Step::Print(
                r#"{"cniVersion":"1.0.0","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0"]}"#
                    .into()
            )
        );
        assert!(matches!(step(&[], "").unwrap(), Step::About(text) if text.contains("1.0.0")));
    }

    /// The ADD result has the shape of the specification's bridge example: the host end,
    /// the container's interface with its sandbox, the address on it with the gateway,
    /// routes and DNS.
    #[test]
    fn the_add_result_is_a_spec_result() {
        let (_, _, context) = ask(&vars("ADD"), CONF);
        let out = finish(&context, Reply::Attached(attached())).unwrap().unwrap();
        assert_eq!(
            out,
            r#"{"cniVersion":"1.0.0","interfaces":[{"name":"ovv0123456789ab","mac":"aa:bb:cc:dd:ee:ff"},{"name":"eth0","mac":"02:0a:00:01:00:02","sandbox":"/run/netns/netns-1"}],"ips":[{"address":"10.0.1.2/24","gateway":"10.0.1.1","interface":1}],"routes":[{"dst":"0.0.0.0/0","gw":"10.0.1.1"}],"dns":{"nameservers":["127.0.0.11"]}}"#
        );
        // In the configuration's version.
        let old = CONF.replace("1.0.0", "0.4.0");
        let (_, _, context) = ask(&vars("ADD"), &old);
        let out = finish(&context, Reply::Attached(attached())).unwrap().unwrap();
        assert!(out.starts_with(r#"{"cniVersion":"0.4.0""#), "{out}");
        assert!(out.contains(r#"{"version":"4","address":"10.0.1.2/24""#), "{out}");
    }

    #[test]
    fn failures_become_cni_errors_in_the_configs_version() {
        let (_, _, context) = ask(&vars("ADD"), &CONF.replace("1.0.0", "0.4.0"));
        let reply = Reply::Failed(Failure::new(
            FailureKind::PoolExhausted,
            "network web (10.0.1.0/30) has no free addresses left",
        ));
        let e = finish(&context, reply).unwrap_err();
        assert_eq!(
            e.to_json(),
            r#"{"cniVersion":"0.4.0","code":100,"msg":"network web (10.0.1.0/30) has no free addresses left"}"#
        );
        for (kind, code) in [
            (FailureKind::UnknownNetwork, 7),
            (FailureKind::NameClash, 101),
            (FailureKind::ControllerUnreachable, 11),
            (FailureKind::NotRealized, 102),
        ] {
            let e = finish(&context, Reply::Failed(Failure::new(kind, "x"))).unwrap_err();
            assert_eq!(e.code, code, "{kind:?}");
        }
        let e =
            agent_unreachable(&context, "/run/ov/a.sock", "connecting: No such file or directory");
        assert_eq!(e.code, 11);
        assert_eq!(e.msg, "overlay agent unreachable at /run/ov/a.sock");
        assert!(e.details.contains("No such file or directory"), "{e}");
    }

    #[test]
    fn del_prints_nothing_and_check_compares_with_prev_result() {
        let (_, request, context) = ask(&vars("DEL"), CONF);
        assert_eq!(request.op, Op::Del);
        assert_eq!(finish(&context, Reply::Detached).unwrap(), None);

        let (_, _, context) = ask(&vars("ADD"), CONF);
        let added = finish(&context, Reply::Attached(attached())).unwrap().unwrap();
        let with_prev = CONF.replace('}', &format!(r#","prevResult":{added}}}"#));
        let (_, request, context) = ask(&vars("CHECK"), &with_prev);
        assert_eq!(request.op, Op::Check);
        assert_eq!(finish(&context, Reply::Attached(attached())).unwrap(), None);
        let mut moved = attached();
        moved.address = "10.0.1.9/24".into();
        let e = finish(&context, Reply::Attached(moved)).unwrap_err();
        assert_eq!(e.code, code::NOT_ATTACHED);
        assert_eq!(e.msg, "eth0 has address 10.0.1.9/24 now, not 10.0.1.2/24 as added");
        let (_, _, context) = ask(&vars("CHECK"), CONF);
        let e = finish(&context, Reply::Attached(attached())).unwrap_err();
        assert!(e.msg.contains("prevResult"), "{e}");
    }

    #[test]
    fn bad_input_fails_before_any_request() {
        let mut v = vars("ADD");
        v[4].1 = "FOO=1".into();
        let e = step(&v, CONF).unwrap_err();
        assert_eq!(e.code, code::UNSUPPORTED_FIELD);
        let e = step(&vars("ADD"), "not json").unwrap_err();
        assert_eq!(e.code, code::DECODING_FAILURE);
    }
}
