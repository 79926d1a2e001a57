//! The command line: clap types only. Parsing here checks shapes (a number is a number);
//! what a value means is checked by overlay-model in `main.rs` and, authoritatively, by
//! the controller.

use std::path::PathBuf;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

/// The controller used when neither `--controller` nor `$OVERLAY_CONTROLLER` is set
/// (https://, or http:// with `--insecure`).
pub const DEFAULT_CONTROLLER: &str = "127.0.0.1:7400";
/// The environment variable that names the controllers when `--controller` is absent.
pub const CONTROLLER_ENV: &str = "OVERLAY_CONTROLLER";

/// Command-line client of the overlay network controller.
#[derive(Debug, Parser)]
#[command(name = "overlayctl", version, about, propagate_version = true)]
pub struct Cli {
    /// Controller URLs, comma-separated, tried in order [default: $OVERLAY_CONTROLLER, then
    /// https://127.0.0.1:7400]
    #[arg(long, global = true, value_name = "URL[,URL...]")]
    pub controller: Option<String>,

    /// The cluster CA certificate (PEM)
    #[arg(long, global = true, env = "OVERLAY_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,

    /// Your certificate (PEM; role admin to change things)
    #[arg(long, global = true, env = "OVERLAY_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,

    /// Your private key (PEM)
    #[arg(long, global = true, env = "OVERLAY_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,

    /// Plaintext, unauthenticated (only for a cluster whose controllers run --insecure;
    /// the TLS flags are then ignored)
    #[arg(long, global = true)]
    pub insecure: bool,

    /// Output format
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Format::Table)]
    pub output: Format,

    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Parses `argv` (program name first). A missing subcommand is an ordinary one-line
    /// usage error rather than clap's help-on-stderr, so every usage error looks alike.
    pub fn parse_args<I, T>(argv: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let mut command = no_help_when_empty(Cli::command());
        let matches = command.try_get_matches_from_mut(argv)?;
        Cli::from_arg_matches(&matches).map_err(|e| e.format(&mut command))
    }
}

fn no_help_when_empty(command: clap::Command) -> clap::Command {
    let names: Vec<String> = command.get_subcommands().map(|s| s.get_name().to_string()).collect();
    let mut command = command.arg_required_else_help(false);
    for name in names {
        command = command.mut_subcommand(name, no_help_when_empty);
    }
    command
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(Debug, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// The controller cluster
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Hosts (registered by their agents)
    #[command(subcommand)]
    Host(HostCmd),
    /// Overlay networks
    #[command(subcommand)]
    Network(NetworkCmd),
    /// Endpoints (network namespaces on a host)
    #[command(subcommand)]
    Endpoint(EndpointCmd),
    /// Static routes pushed to every endpoint of a network
    #[command(subcommand)]
    Route(RouteCmd),
    /// The cluster PKI: a CA and certificates with roles (offline: needs no controller)
    #[command(subcommand)]
    Cert(CertCmd),
    /// A CNI conflist for NETWORK on stdout: overlay-cni chained with portmap, for a
    /// container runtime's CNI config directory
    CniConfig {
        network: String,
        /// The agent's socket on the hosts [default: /run/overlay/agent.sock]
        #[arg(long, value_name = "PATH")]
        socket: Option<String>,
    },
}

#[derive(Debug, PartialEq, Eq, Subcommand)]
pub enum ClusterCmd {
    /// Members: id, address, role, term, commit index, reachable, matched index, voter
    Status,
    /// Change the raft membership, one member at a time (admin only)
    #[command(subcommand)]
    Member(MemberCmd),
    /// The token agents join with (printed as the last word); needs a controller that
    /// holds the CA key
    JoinToken {
        /// Replace the token first: the old one stops working at once
        #[arg(long)]
        rotate: bool,
    },
}

#[derive(Debug, PartialEq, Eq, Subcommand)]
pub enum MemberCmd {
    /// Add member ID listening on IP:PORT (start it with `overlay-controller --join`); it
    /// becomes a voter once it has caught up
    Add {
        id: u64,
        #[arg(value_name = "IP:PORT")]
        address: String,
    },
    /// Remove member ID, e.g. a dead one before adding its replacement
    #[command(visible_alias = "remove")]
    Rm { id: u64 },
}

#[derive(Debug, PartialEq, Eq, Subcommand)]
pub enum HostCmd {
    /// List hosts: name, underlay IP, status, endpoints, last seen
    #[command(visible_alias = "list")]
    Ls,
    /// Register a host without waiting for its agent
    Add {
        name: String,
        #[arg(long, value_name = "IP")]
        underlay_ip: String,
        /// Underlay MTU [default: 1500]
        #[arg(long, value_name = "N")]
        mtu: Option<u32>,
    },
    /// Remove a host (refused while it has endpoints)
    #[command(visible_alias = "remove")]
    Rm { name: String },
}

#[derive(Debug, PartialEq, Eq, Subcommand)]
pub enum NetworkCmd {
    /// Create a network
    Create(NetworkCreate),
    /// List networks
    #[command(visible_alias = "list")]
    Ls,
    /// Show a network and its endpoints
    Inspect { name: String },
    /// Remove a network (refused while endpoints are attached)
    #[command(visible_alias = "remove")]
    Rm { name: String },
    /// Attach an existing endpoint to a further network
    Connect {
        network: String,
        endpoint: String,
        #[command(flatten)]
        addressing: Addressing,
        #[command(flatten)]
        wait: Wait,
    },
    /// Detach an endpoint from a network
    Disconnect { network: String, endpoint: String },
}

#[derive(Debug, PartialEq, Eq, Args)]
pub struct NetworkCreate {
    pub name: String,
    /// IPv4 subnet, e.g. 10.0.1.0/24
    #[arg(long, value_name = "CIDR")]
    pub subnet: String,
    /// Gateway address [default: the first usable address]
    #[arg(long, value_name = "IP")]
    pub gateway: Option<String>,
    /// No default route and no masquerade to the outside world
    #[arg(long)]
    pub internal: bool,
    /// [default: underlay MTU minus the encapsulation overhead]
    #[arg(long, value_name = "N")]
    pub mtu: Option<u32>,
    /// vxlan or udp [default: vxlan]
    #[arg(long, value_name = "vxlan|udp")]
    pub encap: Option<String>,
    /// Encrypt traffic between hosts (needs --encap udp)
    #[arg(long)]
    pub encrypted: bool,
    /// [default: chosen by the controller]
    #[arg(long, value_name = "N")]
    pub vni: Option<u32>,
}

/// `--ip` and `--alias`, shared by `endpoint create` and `network connect`.
#[derive(Debug, PartialEq, Eq, Args)]
pub struct Addressing {
    /// Address in the network [default: allocated]
    #[arg(long, value_name = "IP")]
    pub ip: Option<String>,
    /// Further DNS name in the network (repeatable)
    #[arg(long = "alias", value_name = "NAME")]
    pub aliases: Vec<String>,
}

/// `--timeout` and `--no-wait`, shared by `endpoint create` and `network connect`.
#[derive(Debug, PartialEq, Args)]
pub struct Wait {
    /// Seconds to wait for the endpoint's host to realize it before failing with the
    /// host's reason
    #[arg(long, value_name = "SECONDS", default_value_t = DEFAULT_WAIT_SECS, conflicts_with = "no_wait")]
    pub timeout: f64,
    /// Return as soon as the change is committed, without waiting for the host
    #[arg(long)]
    pub no_wait: bool,
}

/// `--timeout` when not given.
pub const DEFAULT_WAIT_SECS: f64 = 10.0;

impl Default for Wait {
    fn default() -> Wait {
        Wait { timeout: DEFAULT_WAIT_SECS, no_wait: false }
    }
}

impl Eq for Wait {}

#[derive(Debug, PartialEq, Eq, Subcommand)]
pub enum EndpointCmd {
    /// Create an endpoint on HOST attached to NETWORK
    Create {
        name: String,
        #[arg(long)]
        host: String,
        #[arg(long)]
        network: String,
        #[command(flatten)]
        addressing: Addressing,
        #[command(flatten)]
        wait: Wait,
    },
    /// List endpoints, one row per attachment
    #[command(visible_alias = "list")]
    Ls,
    /// Show an endpoint and its attachments
    Inspect { name: String },
    /// Remove an endpoint
    #[command(visible_alias = "remove")]
    Rm { name: String },
}

#[derive(Debug, PartialEq, Eq, Subcommand)]
pub enum RouteCmd {
    /// Route DEST_CIDR through endpoint --via on every endpoint of NETWORK
    Add {
        network: String,
        destination: String,
        #[arg(long, value_name = "ENDPOINT")]
        via: String,
    },
    /// List routes, of one network or all
    #[command(visible_alias = "list")]
    Ls { network: Option<String> },
    /// Remove a route
    #[command(visible_alias = "remove")]
    Rm { network: String, destination: String },
}

#[derive(Debug, PartialEq, Eq, Subcommand)]
pub enum CertCmd {
    /// Create the cluster CA: DIR/ca.pem and DIR/ca-key.pem
    Ca {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Replace an existing CA (every host certificate it signed stops being trusted)
        #[arg(long)]
        force: bool,
    },
    /// Issue a certificate for NAME signed by the CA: DIR/NAME.pem and DIR/NAME-key.pem
    Issue {
        /// The controller's, host's or operator's name
        name: String,
        /// Directory holding ca.pem and ca-key.pem
        #[arg(long, value_name = "DIR")]
        ca_dir: PathBuf,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// What the holder may do: controller (a raft member), agent (host NAME only),
        /// admin (everything)
        #[arg(long, value_name = "controller|agent|admin")]
        role: String,
        /// An address the certificate names (repeatable); an agent may register only
        /// with an underlay IP its certificate names, when it names any
        #[arg(long = "ip", value_name = "IP")]
        ips: Vec<String>,
        /// How long the certificate is valid, e.g. 365d [default: 3650d]
        #[arg(long, value_name = "DURATION")]
        lifetime: Option<String>,
    },
}

#[cfg(test)]
mod tests {
    use clap::error::ErrorKind;

    use super::*;

    fn parse(args: &[&str]) -> Cli {
        let argv = std::iter::once("overlayctl").chain(args.iter().copied());
        match Cli::parse_args(argv) {
            Ok(cli) => cli,
            Err(e) => panic!("{args:?}: {e}"),
        }
    }

    fn command(args: &[&str]) -> Command {
        parse(args).command
    }

    fn fails(args: &[&str]) -> ErrorKind {
        let argv = std::iter::once("overlayctl").chain(args.iter().copied());
        match Cli::parse_args(argv) {
            Ok(cli) => panic!("{args:?} parsed as {cli:?}"),
            Err(e) => e.kind(),
        }
    }

    fn no_addressing() -> Addressing {
        Addressing { ip: None, aliases: vec![] }
    }

    #[test]
    fn globals_default_and_go_anywhere() {
        let cli = parse(&["network", "ls"]);
        assert_eq!(cli.controller, None);
        assert_eq!(cli.output, Format::Table);

        let cli = parse(&["--controller", "a:7400,b:7400", "-o", "json", "network", "ls"]);
        assert_eq!(cli.controller.as_deref(), Some("a:7400,b:7400"));
        assert_eq!(cli.output, Format::Json);

        let cli = parse(&["network", "ls", "-o", "json", "--controller", "x"]);
        assert_eq!(cli.controller.as_deref(), Some("x"));
        assert_eq!(cli.output, Format::Json);

        assert_eq!(parse(&["--output=json", "host", "ls"]).output, Format::Json);
        assert_eq!(fails(&["-o", "yaml", "network", "ls"]), ErrorKind::InvalidValue);
    }

    #[test]
    fn cluster_and_host() {
        assert_eq!(command(&["cluster", "status"]), Command::Cluster(ClusterCmd::Status));
        assert_eq!(
            command(&["cluster", "member", "add", "4", "10.0.0.4:7400"]),
            Command::Cluster(ClusterCmd::Member(MemberCmd::Add {
                id: 4,
                address: "10.0.0.4:7400".into()
            }))
        );
        assert_eq!(
            command(&["cluster", "member", "rm", "3"]),
            Command::Cluster(ClusterCmd::Member(MemberCmd::Rm { id: 3 }))
        );
        assert_eq!(fails(&["cluster", "member", "rm", "three"]), ErrorKind::ValueValidation);
        assert_eq!(fails(&["cluster", "member", "add", "4"]), ErrorKind::MissingRequiredArgument);
        assert_eq!(command(&["host", "ls"]), Command::Host(HostCmd::Ls));
        assert_eq!(command(&["host", "list"]), Command::Host(HostCmd::Ls));
        assert_eq!(
            command(&["host", "add", "h1", "--underlay-ip", "192.168.1.10"]),
            Command::Host(HostCmd::Add {
                name: "h1".into(),
                underlay_ip: "192.168.1.10".into(),
                mtu: None
            })
        );
        assert_eq!(
            command(&["host", "add", "h1", "--underlay-ip", "192.168.1.10", "--mtu", "9000"]),
            Command::Host(HostCmd::Add {
                name: "h1".into(),
                underlay_ip: "192.168.1.10".into(),
                mtu: Some(9000)
            })
        );
        assert_eq!(
            command(&["host", "rm", "h1"]),
            Command::Host(HostCmd::Rm { name: "h1".into() })
        );
        assert_eq!(fails(&["host", "add", "h1"]), ErrorKind::MissingRequiredArgument);
        assert_eq!(
            fails(&["host", "add", "h1", "--underlay-ip", "x", "--mtu", "big"]),
            ErrorKind::ValueValidation
        );
    }

    #[test]
    fn network_create() {
        assert_eq!(
            command(&["network", "create", "frontend", "--subnet", "10.0.1.0/24"]),
            Command::Network(NetworkCmd::Create(NetworkCreate {
                name: "frontend".into(),
                subnet: "10.0.1.0/24".into(),
                gateway: None,
                internal: false,
                mtu: None,
                encap: None,
                encrypted: false,
                vni: None,
            }))
        );
        assert_eq!(
            command(&[
                "network",
                "create",
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
                "42",
            ]),
            Command::Network(NetworkCmd::Create(NetworkCreate {
                name: "backend".into(),
                subnet: "10.0.2.0/24".into(),
                gateway: Some("10.0.2.254".into()),
                internal: true,
                mtu: Some(1400),
                encap: Some("udp".into()),
                encrypted: true,
                vni: Some(42),
            }))
        );
        assert_eq!(fails(&["network", "create", "x"]), ErrorKind::MissingRequiredArgument);
        assert_eq!(
            fails(&["network", "create", "--subnet", "10.0.0.0/8"]),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(
            fails(&["network", "create", "x", "--subnet", "10.0.0.0/8", "--vni", "-1"]),
            ErrorKind::UnknownArgument
        );
    }

    #[test]
    fn network_others() {
        assert_eq!(command(&["network", "ls"]), Command::Network(NetworkCmd::Ls));
        assert_eq!(
            command(&["network", "inspect", "frontend"]),
            Command::Network(NetworkCmd::Inspect { name: "frontend".into() })
        );
        assert_eq!(
            command(&["network", "rm", "frontend"]),
            Command::Network(NetworkCmd::Rm { name: "frontend".into() })
        );
        assert_eq!(
            command(&["network", "connect", "backend", "gw"]),
            Command::Network(NetworkCmd::Connect {
                network: "backend".into(),
                endpoint: "gw".into(),
                addressing: no_addressing(),
                wait: Wait::default(),
            })
        );
        assert_eq!(
            command(&[
                "network", "connect", "backend", "gw", "--ip", "10.0.2.9", "--alias", "a",
                "--alias", "b"
            ]),
            Command::Network(NetworkCmd::Connect {
                network: "backend".into(),
                endpoint: "gw".into(),
                addressing: Addressing {
                    ip: Some("10.0.2.9".into()),
                    aliases: vec!["a".into(), "b".into()]
                },
                wait: Wait::default(),
            })
        );
        assert_eq!(
            command(&["network", "disconnect", "backend", "gw"]),
            Command::Network(NetworkCmd::Disconnect {
                network: "backend".into(),
                endpoint: "gw".into()
            })
        );
        assert_eq!(
            fails(&["network", "disconnect", "backend"]),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(fails(&["network", "frob"]), ErrorKind::InvalidSubcommand);
    }

    #[test]
    fn endpoint() {
        assert_eq!(
            command(&["endpoint", "create", "s1", "--host", "h1", "--network", "frontend"]),
            Command::Endpoint(EndpointCmd::Create {
                name: "s1".into(),
                host: "h1".into(),
                network: "frontend".into(),
                addressing: no_addressing(),
                wait: Wait::default(),
            })
        );
        assert_eq!(
            command(&[
                "endpoint",
                "create",
                "s1",
                "--host",
                "h1",
                "--network",
                "frontend",
                "--ip",
                "10.0.1.7",
                "--alias",
                "web",
            ]),
            Command::Endpoint(EndpointCmd::Create {
                name: "s1".into(),
                host: "h1".into(),
                network: "frontend".into(),
                addressing: Addressing { ip: Some("10.0.1.7".into()), aliases: vec!["web".into()] },
                wait: Wait::default(),
            })
        );
        let create = ["endpoint", "create", "s1", "--host", "h1", "--network", "n"];
        let with = |extra: &[&str]| command(&[&create[..], extra].concat());
        assert!(matches!(
            with(&["--timeout", "2.5"]),
            Command::Endpoint(EndpointCmd::Create {
                wait: Wait { timeout: 2.5, no_wait: false },
                ..
            })
        ));
        assert!(matches!(
            with(&["--no-wait"]),
            Command::Endpoint(EndpointCmd::Create { wait: Wait { no_wait: true, .. }, .. })
        ));
        assert_eq!(
            fails(&[&create[..], &["--no-wait", "--timeout", "3"]].concat()),
            ErrorKind::ArgumentConflict
        );
        assert_eq!(command(&["endpoint", "ls"]), Command::Endpoint(EndpointCmd::Ls));
        assert_eq!(
            command(&["endpoint", "inspect", "s1"]),
            Command::Endpoint(EndpointCmd::Inspect { name: "s1".into() })
        );
        assert_eq!(
            command(&["endpoint", "rm", "s1"]),
            Command::Endpoint(EndpointCmd::Rm { name: "s1".into() })
        );
        assert_eq!(
            fails(&["endpoint", "create", "s1", "--host", "h1"]),
            ErrorKind::MissingRequiredArgument
        );
    }

    #[test]
    fn route() {
        assert_eq!(
            command(&["route", "add", "frontend", "10.0.2.0/24", "--via", "gw"]),
            Command::Route(RouteCmd::Add {
                network: "frontend".into(),
                destination: "10.0.2.0/24".into(),
                via: "gw".into()
            })
        );
        assert_eq!(command(&["route", "ls"]), Command::Route(RouteCmd::Ls { network: None }));
        assert_eq!(
            command(&["route", "ls", "frontend"]),
            Command::Route(RouteCmd::Ls { network: Some("frontend".into()) })
        );
        assert_eq!(
            command(&["route", "rm", "frontend", "10.0.2.0/24"]),
            Command::Route(RouteCmd::Rm {
                network: "frontend".into(),
                destination: "10.0.2.0/24".into()
            })
        );
        assert_eq!(
            fails(&["route", "add", "frontend", "10.0.2.0/24"]),
            ErrorKind::MissingRequiredArgument
        );
    }

    #[test]
    fn help_and_version_are_not_errors() {
        assert_eq!(fails(&["--help"]), ErrorKind::DisplayHelp);
        assert_eq!(fails(&["network", "--help"]), ErrorKind::DisplayHelp);
        assert_eq!(fails(&["--version"]), ErrorKind::DisplayVersion);
        assert_eq!(fails(&[]), ErrorKind::MissingSubcommand);
        assert_eq!(fails(&["network"]), ErrorKind::MissingSubcommand);
        // The derive API agrees with `parse_args` on everything else.
        let argv = ["overlayctl", "-o", "json", "route", "ls", "frontend"];
        assert_eq!(Cli::try_parse_from(argv).map(|c| c.command).ok(), Some(command(&argv[1..])));
    }

    #[test]
    fn clap_definition_is_consistent() {
        no_help_when_empty(Cli::command()).debug_assert();
    }
}
