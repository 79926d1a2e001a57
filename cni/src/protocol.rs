//! The plugin↔agent protocol on the agent's unix socket (pure: messages and their
//! encoding; the binary and the agent do the socket I/O).
//!
//! One connection per CNI invocation: the plugin writes one [`Request`] as a JSON line,
//! the agent answers one [`Reply`] as a JSON line and closes. A line longer than
//! [`MAX_LINE`] is refused. `version` lets a newer agent refuse an older plugin clearly
//! (and the other way round) instead of misreading it.
//!
//! The agent answers with facts ([`Attached`]); the plugin turns them into the CNI
//! result, so the agent knows nothing of CNI versions and output shapes.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// Bumped when a message changes incompatibly.
pub const PROTOCOL_VERSION: u32 = 1;
/// The longest line either side accepts.
pub const MAX_LINE: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Attach the container to the network (create the endpoint or connect it).
    Add,
    /// Detach it (disconnect, or remove the endpoint with its last network).
    Del,
    /// Report the attachment as it is, or fail if it is not.
    Check,
}

/// What the plugin asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub version: u32,
    pub op: Op,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS` (may be empty for DEL).
    pub netns: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// The overlay network.
    pub network: String,
    /// `K8S_POD_NAME` from `CNI_ARGS`, as the runtime passed it.
    #[serde(default)]
    pub pod_name: Option<String>,
    /// `IP` from `CNI_ARGS`: a static address.
    #[serde(default)]
    pub ip: Option<Ipv4Addr>,
}

/// A route the attachment got: `dst` via `gw`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteFact {
    pub dst: String,
    pub gw: Ipv4Addr,
}

/// The attachment as realised on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attached {
    /// The endpoint's name (as `overlayctl endpoint ls` shows it).
    pub endpoint: String,
    /// The interface inside the container (`CNI_IFNAME`).
    pub interface: String,
    pub mac: String,
    /// Address with the network's prefix, e.g. `10.0.1.5/24`.
    pub address: String,
    /// The network's gateway.
    pub gateway: Ipv4Addr,
    /// Routes inside the container with a next hop (the default route unless the network
    /// is internal, and the network's routes through gateway endpoints).
    pub routes: Vec<RouteFact>,
    /// The host end of the veth pair, and its MAC when known.
    pub host_interface: String,
    #[serde(default)]
    pub host_mac: Option<String>,
    /// Nameservers inside (the embedded DNS).
    pub nameservers: Vec<String>,
}

/// Why the agent refused or failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The request itself is wrong (a namespace path that is not one, a bad name).
    InvalidRequest,
    /// The network does not exist.
    UnknownNetwork,
    /// The network has no free address.
    PoolExhausted,
    /// The endpoint name (or namespace name) is taken by something else.
    NameClash,
    /// No controller answered (the change cannot be made now).
    ControllerUnreachable,
    /// The controller refused the change for another reason.
    Refused,
    /// The agent did not realise the attachment in time.
    NotRealized,
    /// CHECK: the attachment is missing or not as recorded.
    NotAttached,
    /// The protocol versions differ.
    Version,
    Internal,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub kind: FailureKind,
    /// One line that names the bad thing.
    pub message: String,
    /// More, if there is more to say (the controller's own words, a hint).
    #[serde(default)]
    pub details: String,
}

impl Failure {
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Failure {
        Failure { kind, message: message.into(), details: String::new() }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Failure {
        self.details = details.into();
        self
    }
}

/// What the agent answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// ADD and CHECK: the attachment as it is.
    Attached(Attached),
    /// DEL: detached, or nothing was attached.
    Detached,
    Failed(Failure),
}

/// A message as one line (JSON never contains a raw newline).
pub fn encode<T: Serialize>(message: &T) -> Result<String, serde_json::Error> {
    let mut line = serde_json::to_string(message)?;
    line.push('\n');
    Ok(line)
}

/// One line back into a message.
pub fn decode<'a, T: Deserialize<'a>>(line: &'a str) -> Result<T, String> {
    if line.len() > MAX_LINE {
        return Err(format!("message of {} bytes is longer than {MAX_LINE}", line.len()));
    }
    serde_json::from_str(line.trim_end()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn messages_are_one_line_each_and_round_trip() {
        let request = Request {
            version: PROTOCOL_VERSION,
            op: Op::Add,
            container_id: "769efd9c4772".into(),
            netns: "/run/netns/netns-1".into(),
            ifname: "eth0".into(),
            network: "web".into(),
            pod_name: Some("web1".into()),
            ip: None,
        };
        let line = encode(&request).unwrap();
        assert_eq!(line.matches('\n').count(), 1);
        assert!(line.starts_with(r#"{"version":1,"op":"add","#), "{line}");
        assert_eq!(decode::<Request>(&line).unwrap(), request);
        let reply = Reply::Failed(
            Failure::new(FailureKind::UnknownNetwork, "network web not found").with_details("x"),
        );
        let line = encode(&reply).unwrap();
        assert!(line.starts_with(r#"{"failed":{"kind":"unknown_network","#), "{line}");
        assert_eq!(decode::<Reply>(&line).unwrap(), reply);
        assert_eq!(decode::<Reply>(&encode(&Reply::Detached).unwrap()).unwrap(), Reply::Detached);
    }

    #[test]
    fn unknown_fields_and_long_lines_are_refused() {
        let e = decode::<Request>(r#"{"version":1,"op":"add","bogus":1}"#).unwrap_err();
        assert!(e.contains("bogus"), "{e}");
        let long = format!("\"{}\"", "a".repeat(MAX_LINE));
        assert!(decode::<String>(&long).unwrap_err().contains("longer than"));
    }
}
