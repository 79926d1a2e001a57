//! `overlayctl`: the command-line client of the overlay controller.
//!
//! It parses a command, pre-checks its values with overlay-model (so a bad name or CIDR
//! fails before any network traffic, with the controller's own wording), calls the
//! controller through `client` (failover between members) and prints the answer through
//! `output`. It formats; it never decides: every rule beyond those pre-checks is the
//! controller's. Every failure ends here as one line `error: ...` on stderr and exit
//! status 1 (2 for usage errors), never a panic or a backtrace.

mod args;
mod cert;
mod client;
#[cfg(test)]
mod fake;
mod output;

use std::fmt;
use std::io::Write;
use std::process::ExitCode;
use std::str::FromStr;

use overlay_grpc::Dialer;
use overlay_model::{names::validate_name, parse, Encap, ModelError};
use overlay_pki::Identity;
use overlay_proto::pb;

use crate::args::{
    Addressing, Cli, ClusterCmd, Command, EndpointCmd, Format, HostCmd, MemberCmd, NetworkCmd,
    NetworkCreate, RouteCmd, Wait, CONTROLLER_ENV,
};
use crate::client::{Call, Controllers, Policy};
use crate::output::{MemberChanged, Removed, Render};

/// Everything that can make a command fail.
#[derive(Debug)]
enum Failure {
    /// Rejected by the local pre-check.
    Invalid(ModelError),
    /// From calling the controller (including its refusals).
    Client(client::Error),
    /// Writing the output failed.
    Output(String),
    /// Flags that cannot work together or are missing.
    Usage(String),
    /// A `cert` command, or loading the TLS files, failed.
    Cert(overlay_pki::PkiError),
    /// A value the model crate does not cover (member ids and addresses) is invalid.
    BadValue(String),
    /// The change was made, but the endpoint's host did not realize it (in time).
    NotReady(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Invalid(e) => write!(f, "{e}"),
            Failure::Client(e) => write!(f, "{e}"),
            Failure::Output(e) => write!(f, "cannot write output: {e}"),
            Failure::Usage(e) => f.write_str(e),
            Failure::Cert(e) => write!(f, "{e}"),
            Failure::BadValue(e) => f.write_str(e),
            Failure::NotReady(e) => f.write_str(e),
        }
    }
}

impl From<ModelError> for Failure {
    fn from(e: ModelError) -> Self {
        Failure::Invalid(e)
    }
}

impl From<overlay_pki::PkiError> for Failure {
    fn from(e: overlay_pki::PkiError) -> Self {
        Failure::Cert(e)
    }
}

impl From<client::Error> for Failure {
    fn from(e: client::Error) -> Self {
        Failure::Client(e)
    }
}

fn main() -> ExitCode {
    // A bug must still end as one line, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        eprintln!("error: internal error: {}", one_line(&message));
        std::process::exit(1);
    }));

    let cli = match Cli::parse_args(std::env::args_os()) {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    // `cert` is offline: no controller URL to resolve, no async runtime.
    if let Command::Cert(cmd) = &cli.command {
        return match cert::run(cmd, cli.output) {
            Ok(()) => ExitCode::SUCCESS,
            Err(failure) => fail(&failure.to_string()),
        };
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => return fail(&format!("cannot start the async runtime: {e}")),
    };
    let insecure = cli.insecure;
    match runtime.block_on(run(cli)) {
        Ok(()) => {
            // After the output, and only on success: a failure stays one line.
            if insecure {
                eprintln!("warning: --insecure: this talked to the controllers in plaintext, unauthenticated");
            }
            ExitCode::SUCCESS
        }
        Err(failure) => fail(&failure.to_string()),
    }
}

/// The single place where a failure becomes the error line and exit status.
fn fail(message: &str) -> ExitCode {
    eprintln!("error: {}", one_line(message));
    ExitCode::from(1)
}

/// `--help` and `--version` print as usual; any other clap error becomes one line and exit
/// status 2.
fn usage_error(e: clap::Error) -> ExitCode {
    if !e.use_stderr() {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    eprintln!("error: {}", usage_message(&e.render().to_string()));
    ExitCode::from(2)
}

/// The first paragraph of clap's message (the error and, say, the missing arguments or the
/// possible values) on one line, without the `error:` prefix, tips and usage block.
fn usage_message(rendered: &str) -> String {
    let paragraph: Vec<&str> = rendered
        .lines()
        .map(str::trim)
        .skip_while(|l| l.is_empty())
        .take_while(|l| !l.is_empty())
        .collect();
    let line = paragraph.join(" ");
    let line = line.strip_prefix("error:").map(str::trim_start).unwrap_or(&line);
    if line.is_empty() {
        "invalid arguments".into()
    } else {
        line.to_string()
    }
}

fn one_line(message: &str) -> String {
    message.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ")
}

/// Calls one RPC through [`Controllers::call`]; the request is cloned for each attempt.
macro_rules! rpc {
    ($ctl:expr, $call:expr, $method:ident, $request:expr) => {{
        let request = $request;
        $ctl.call($call, move |mut client| {
            let request = request.clone();
            async move { client.$method(request).await }
        })
        .await?
    }};
}

/// How to reach the controllers: TLS with the user's identity, or `--insecure`.
fn dialer(cli: &Cli) -> Result<Dialer, Failure> {
    if cli.insecure {
        return Ok(Dialer::insecure());
    }
    let (Some(ca), Some(cert), Some(key)) = (&cli.tls_ca, &cli.tls_cert, &cli.tls_key) else {
        return Err(Failure::Usage(
            "TLS is required: give --tls-ca, --tls-cert and --tls-key (or set OVERLAY_TLS_CA, OVERLAY_TLS_CERT and OVERLAY_TLS_KEY), or --insecure for a cluster running without TLS".into(),
        ));
    };
    let identity = Identity::load(ca, cert, key)?;
    Ok(Dialer::tls(overlay_pki::tls::client_config(&identity.ca, Some(&identity))?))
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let dialer = dialer(&cli)?;
    let env = std::env::var(CONTROLLER_ENV).ok();
    let urls = client::resolve_urls(cli.controller.as_deref(), env.as_deref(), &dialer)?;
    let ctl = Controllers::new(urls, Policy::default(), dialer);
    let out = cli.output;
    use Call::{Read, Write};

    match cli.command {
        Command::Cluster(ClusterCmd::Status) => {
            let status = rpc!(ctl, Read, cluster_status, pb::ClusterStatusRequest {});
            emit(out, &status)
        }
        Command::Cluster(ClusterCmd::Member(MemberCmd::Add { id, address })) => {
            let id = member_id(id)?;
            let address = member_address(&address)?;
            let response = rpc!(ctl, Write, add_member, pb::AddMemberRequest { id, address });
            emit(out, &MemberChanged::Added(response))
        }
        Command::Cluster(ClusterCmd::Member(MemberCmd::Rm { id })) => {
            let id = member_id(id)?;
            let response = rpc!(ctl, Write, remove_member, pb::RemoveMemberRequest { id });
            emit(out, &MemberChanged::Removed(response))
        }
        // Read, not Write: a member without the CA key answers unavailable and the next
        // one is asked; a rotation repeated that way only makes one more new token.
        Command::Cluster(ClusterCmd::JoinToken { rotate }) => {
            let token = rpc!(ctl, Read, join_token, pb::JoinTokenRequest { rotate });
            emit(out, &token)
        }

        Command::Host(HostCmd::Ls) => {
            let list = rpc!(ctl, Read, list_hosts, pb::ListHostsRequest::default());
            emit(out, &list.hosts[..])
        }
        Command::Host(HostCmd::Add { name, underlay_ip, mtu }) => {
            validate_name(&name)?;
            parse::ipv4(&underlay_ip)?;
            // The underlay prefix stays unknown until the host's agent registers it.
            let request = pb::RegisterHostRequest {
                name,
                underlay_ip,
                underlay_mtu: explicit_mtu(mtu)?,
                ..Default::default()
            };
            emit(out, &rpc!(ctl, Write, register_host, request))
        }
        Command::Host(HostCmd::Rm { name }) => {
            validate_name(&name)?;
            rpc!(ctl, Write, remove_host, pb::NameRequest { name: name.clone() });
            emit(out, &Removed::Named { kind: "host", name })
        }

        Command::Network(NetworkCmd::Create(create)) => {
            let request = network_request(create)?;
            emit(out, &rpc!(ctl, Write, create_network, request))
        }
        Command::Network(NetworkCmd::Ls) => {
            let list = rpc!(ctl, Read, list_networks, pb::ListNetworksRequest::default());
            emit(out, &list.networks[..])
        }
        Command::Network(NetworkCmd::Inspect { name }) => {
            validate_name(&name)?;
            emit(out, &rpc!(ctl, Read, inspect_network, pb::NameRequest { name }))
        }
        Command::Network(NetworkCmd::Rm { name }) => {
            validate_name(&name)?;
            rpc!(ctl, Write, remove_network, pb::NameRequest { name: name.clone() });
            emit(out, &Removed::Named { kind: "network", name })
        }
        Command::Network(NetworkCmd::Connect { network, endpoint, addressing, wait }) => {
            validate_name(&network)?;
            validate_name(&endpoint)?;
            let (ip, aliases) = addressing_request(addressing)?;
            let limit = wait_limit(&wait)?;
            let what = format!("was connected to network {network}");
            let request =
                pb::ConnectRequest { network, endpoint, ip, aliases, ..Default::default() };
            let connected = rpc!(ctl, Write, connect_network, request);
            emit(out, &wait_ready(&ctl, connected, limit, &what).await?)
        }
        Command::Network(NetworkCmd::Disconnect { network, endpoint }) => {
            validate_name(&network)?;
            validate_name(&endpoint)?;
            let request = pb::DisconnectRequest { network, endpoint };
            emit(out, &rpc!(ctl, Write, disconnect_network, request))
        }

        Command::Endpoint(EndpointCmd::Create { name, host, network, addressing, wait }) => {
            validate_name(&name)?;
            validate_name(&host)?;
            validate_name(&network)?;
            let (ip, aliases) = addressing_request(addressing)?;
            let limit = wait_limit(&wait)?;
            let request = pb::CreateEndpointRequest {
                name,
                host,
                network,
                ip,
                aliases,
                ..Default::default()
            };
            let created = rpc!(ctl, Write, create_endpoint, request);
            emit(out, &wait_ready(&ctl, created, limit, "was created").await?)
        }
        Command::Endpoint(EndpointCmd::Ls) => {
            let list = rpc!(ctl, Read, list_endpoints, pb::ListEndpointsRequest::default());
            emit(out, &list.endpoints[..])
        }
        Command::Endpoint(EndpointCmd::Inspect { name }) => {
            validate_name(&name)?;
            emit(out, &rpc!(ctl, Read, inspect_endpoint, pb::NameRequest { name }))
        }
        Command::Endpoint(EndpointCmd::Rm { name }) => {
            validate_name(&name)?;
            rpc!(ctl, Write, remove_endpoint, pb::NameRequest { name: name.clone() });
            emit(out, &Removed::Named { kind: "endpoint", name })
        }

        Command::Route(RouteCmd::Add { network, destination, via }) => {
            validate_name(&network)?;
            parse::cidr(&destination)?;
            validate_name(&via)?;
            let request = pb::AddRouteRequest { network, destination, via };
            emit(out, &rpc!(ctl, Write, add_route, request))
        }
        Command::Route(RouteCmd::Ls { network }) => {
            if let Some(network) = &network {
                validate_name(network)?;
            }
            let request = pb::ListRoutesRequest {
                network: network.unwrap_or_default(),
                ..Default::default()
            };
            let list = rpc!(ctl, Read, list_routes, request);
            emit(out, &list.routes[..])
        }
        Command::Route(RouteCmd::Rm { network, destination }) => {
            validate_name(&network)?;
            parse::cidr(&destination)?;
            let request = pb::RemoveRouteRequest {
                network: network.clone(),
                destination: destination.clone(),
            };
            rpc!(ctl, Write, remove_route, request);
            emit(out, &Removed::Route { network, destination })
        }

        // Refused for a network the cluster does not have; always JSON (it is a file).
        Command::CniConfig { network, socket } => {
            validate_name(&network)?;
            let socket = socket.unwrap_or_else(|| overlay_cni::spec::DEFAULT_SOCKET.to_string());
            if !socket.starts_with('/') {
                return Err(Failure::Usage(format!("--socket {socket}: must be an absolute path")));
            }
            rpc!(ctl, Read, inspect_network, pb::NameRequest { name: network.clone() });
            let list = overlay_cni::conflist::conflist(&network, &socket);
            let text =
                serde_json::to_string_pretty(&list).map_err(|e| Failure::Output(e.to_string()))?;
            writeln!(std::io::stdout(), "{text}").map_err(|e| Failure::Output(e.to_string()))
        }
        Command::Cert(_) => unreachable!("cert commands run in main() without a controller"),
    }
}

/// How long to wait for an endpoint to become ready; `None`: `--no-wait`.
fn wait_limit(wait: &Wait) -> Result<Option<std::time::Duration>, Failure> {
    if wait.no_wait {
        return Ok(None);
    }
    if !(wait.timeout.is_finite() && wait.timeout > 0.0 && wait.timeout <= 86_400.0) {
        return Err(Failure::Usage(format!(
            "--timeout {}: must be more than 0 and at most 86400 seconds (or --no-wait)",
            wait.timeout
        )));
    }
    Ok(Some(std::time::Duration::from_secs_f64(wait.timeout)))
}

/// Between two looks at a pending endpoint.
const WAIT_POLL: std::time::Duration = std::time::Duration::from_millis(200);

/// Waits until `endpoint` (as the write returned it) is `ready`, looking again every
/// [`WAIT_POLL`]; fails at once when its host reports it `failed`, and with what it is
/// still waiting for after `limit`. `what` says what the write did ("was created").
async fn wait_ready(
    ctl: &Controllers,
    mut endpoint: pb::Endpoint,
    limit: Option<std::time::Duration>,
    what: &str,
) -> Result<pb::Endpoint, Failure> {
    let Some(limit) = limit else { return Ok(endpoint) };
    let deadline = tokio::time::Instant::now() + limit;
    let name = endpoint.name.clone();
    let mut last_error = None;
    loop {
        match endpoint.status.as_str() {
            "ready" => return Ok(endpoint),
            // A controller from before statuses: nothing to wait for.
            "" => return Ok(endpoint),
            "failed" => {
                return Err(Failure::NotReady(format!(
                    "endpoint {name} {what}, but host {} cannot realize it: {} (fix that and it is realized by itself, or remove the endpoint with `overlayctl endpoint rm {name}`)",
                    endpoint.host, endpoint.reason
                )))
            }
            _ => {}
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            let why = match last_error {
                Some(e) => format!("{}; then: {e}", endpoint.reason),
                None => endpoint.reason.clone(),
            };
            return Err(Failure::NotReady(format!(
                "endpoint {name} {what}, but is not ready after {}: {why}",
                wait_seconds(limit)
            )));
        }
        tokio::time::sleep(WAIT_POLL.min(deadline - now)).await;
        let request = pb::NameRequest { name: name.clone() };
        let read = ctl
            .call(Call::Read, move |mut client| {
                let request = request.clone();
                async move { client.inspect_endpoint(request).await }
            })
            .await;
        match read {
            Ok(e) => endpoint = e,
            // Keep waiting (a leader election, a member restarting); said at the end.
            Err(e) => last_error = Some(e.to_string()),
        }
    }
}

fn wait_seconds(d: std::time::Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0}s")
    } else {
        format!("{s}s")
    }
}

/// Member ids start at 1 (0 is raft's "nobody").
fn member_id(id: u64) -> Result<u64, Failure> {
    if id == 0 {
        return Err(Failure::BadValue("invalid member id 0: member ids start at 1".into()));
    }
    Ok(id)
}

/// A member's `IP:PORT`, as the controller stores it.
fn member_address(address: &str) -> Result<String, Failure> {
    address.trim().parse::<std::net::SocketAddr>().map(|a| a.to_string()).map_err(|_| {
        Failure::BadValue(format!("invalid member address {address:?}: expected IP:PORT"))
    })
}

/// Pre-checks `network create` and builds its request. Values travel as typed, so the
/// controller's messages quote the user's own text.
fn network_request(c: NetworkCreate) -> Result<pb::CreateNetworkRequest, ModelError> {
    validate_name(&c.name)?;
    parse::cidr(&c.subnet)?;
    if let Some(gateway) = &c.gateway {
        parse::ipv4(gateway)?;
    }
    if let Some(encap) = &c.encap {
        Encap::from_str(encap)?;
    }
    // On the wire 0 means "choose for me"; an explicit 0 must not be read that way.
    let vni = match c.vni {
        Some(0) => return Err(ModelError::InvalidVni(0)),
        vni => vni.unwrap_or(0),
    };
    Ok(pb::CreateNetworkRequest {
        name: c.name,
        subnet: c.subnet,
        gateway: c.gateway.unwrap_or_default(),
        mtu: explicit_mtu(c.mtu)?,
        encap: c.encap.unwrap_or_default(),
        internal: c.internal,
        encrypted: c.encrypted,
        vni,
    })
}

/// `--mtu` for the wire, where 0 means the default: an explicit 0 is refused.
fn explicit_mtu(mtu: Option<u32>) -> Result<u32, ModelError> {
    match mtu {
        Some(0) => Err(ModelError::InvalidMtu(0)),
        mtu => Ok(mtu.unwrap_or(0)),
    }
}

/// Pre-checks `--ip` and `--alias`; `(ip or "", aliases)` for the request.
fn addressing_request(a: Addressing) -> Result<(String, Vec<String>), ModelError> {
    if let Some(ip) = &a.ip {
        parse::ipv4(ip)?;
    }
    for alias in &a.aliases {
        validate_name(alias)?;
    }
    Ok((a.ip.unwrap_or_default(), a.aliases))
}

/// Prints `item` on stdout in the chosen format. A closed stdout (`| head`) is not an error.
fn emit<R: Render + ?Sized>(format: Format, item: &R) -> Result<(), Failure> {
    let text = match format {
        Format::Json => {
            let mut json = serde_json::to_string_pretty(&item.json())
                .map_err(|e| Failure::Output(e.to_string()))?;
            json.push('\n');
            json
        }
        Format::Table => item.table(output::now_ms()),
    };
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(Failure::Output(e.to_string())),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(args: &[&str]) -> Result<pb::CreateNetworkRequest, String> {
        let argv = ["overlayctl", "network", "create"].into_iter().chain(args.iter().copied());
        match Cli::parse_args(argv).map_err(|e| e.to_string())?.command {
            Command::Network(NetworkCmd::Create(c)) => {
                network_request(c).map_err(|e| e.to_string())
            }
            other => Err(format!("parsed as {other:?}")),
        }
    }

    #[test]
    fn network_create_request() {
        assert_eq!(
            create(&["frontend", "--subnet", "10.0.1.0/24"]),
            Ok(pb::CreateNetworkRequest {
                name: "frontend".into(),
                subnet: "10.0.1.0/24".into(),
                ..Default::default()
            })
        );
        assert_eq!(
            create(&[
                "backend",
                "--subnet",
                "10.0.2.0/24",
                "--gateway",
                "10.0.2.254",
                "--internal",
                "--mtu",
                "1400",
                "--encap",
                "udp",
                "--encrypted",
                "--vni",
                "42"
            ]),
            Ok(pb::CreateNetworkRequest {
                name: "backend".into(),
                subnet: "10.0.2.0/24".into(),
                gateway: "10.0.2.254".into(),
                mtu: 1400,
                encap: "udp".into(),
                internal: true,
                encrypted: true,
                vni: 42,
            })
        );
    }

    #[test]
    fn network_create_pre_checks_use_the_model_messages() {
        let check = |args: &[&str], expected: ModelError| {
            assert_eq!(create(args), Err(expected.to_string()), "{args:?}");
        };
        check(&["Front", "--subnet", "10.0.1.0/24"], ModelError::InvalidName("Front".into()));
        check(&["f", "--subnet", "10.0.1.5/24"], ModelError::InvalidCidr("10.0.1.5/24".into()));
        check(
            &["f", "--subnet", "10.0.1.0/24", "--gateway", "x"],
            ModelError::InvalidIp("x".into()),
        );
        check(
            &["f", "--subnet", "10.0.1.0/24", "--encap", "gre"],
            ModelError::InvalidEncap("gre".into()),
        );
        check(&["f", "--subnet", "10.0.1.0/24", "--vni", "0"], ModelError::InvalidVni(0));
        check(&["f", "--subnet", "10.0.1.0/24", "--mtu", "0"], ModelError::InvalidMtu(0));
    }

    #[test]
    fn addressing_is_pre_checked() {
        let a = |ip: Option<&str>, aliases: &[&str]| Addressing {
            ip: ip.map(String::from),
            aliases: aliases.iter().map(|s| s.to_string()).collect(),
        };
        assert_eq!(addressing_request(a(None, &[])), Ok((String::new(), vec![])));
        assert_eq!(
            addressing_request(a(Some("10.0.1.9"), &["web"])),
            Ok(("10.0.1.9".into(), vec!["web".into()]))
        );
        assert_eq!(addressing_request(a(Some(""), &[])), Err(ModelError::InvalidIp(String::new())));
        assert_eq!(
            addressing_request(a(None, &["ok", "Bad_"])),
            Err(ModelError::InvalidName("Bad_".into()))
        );
    }

    fn usage(args: &[&str]) -> String {
        let argv = std::iter::once("overlayctl").chain(args.iter().copied());
        match Cli::parse_args(argv) {
            Ok(cli) => panic!("{args:?} parsed as {cli:?}"),
            Err(e) => usage_message(&e.render().to_string()),
        }
    }

    #[test]
    fn usage_errors_are_one_line() {
        assert_eq!(
            usage(&["network", "create", "x"]),
            "the following required arguments were not provided: --subnet <CIDR>"
        );
        assert_eq!(
            usage(&["-o", "yaml", "network", "ls"]),
            "invalid value 'yaml' for '--output <OUTPUT>' [possible values: table, json]"
        );
        assert_eq!(usage(&["network", "ls", "--bogus"]), "unexpected argument '--bogus' found");
        assert_eq!(usage(&["netwrk"]), "unrecognized subcommand 'netwrk'");
        assert_eq!(
            usage(&["network"]),
            "'overlayctl network' requires a subcommand but one was not provided \
             [subcommands: create, ls, list, inspect, rm, remove, connect, disconnect, help]"
        );
        assert_eq!(usage_message(""), "invalid arguments");
    }

    #[test]
    fn failures_are_one_line() {
        assert_eq!(one_line("a\n b  c\n\n"), "a b  c");
        let failure = Failure::Invalid(ModelError::InvalidCidr("x".into()));
        assert_eq!(
            failure.to_string(),
            r#"invalid CIDR "x": expected an IPv4 network such as 10.0.1.0/24"#
        );
    }
}
