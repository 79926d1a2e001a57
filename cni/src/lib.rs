//! `overlay-cni`: a CNI plugin (spec 1.0.0: ADD, DEL, CHECK, VERSION) that attaches
//! containers to overlay networks by asking the host's `overlay-agent` over a unix
//! socket. The agent owns the host's bridges, VXLAN devices, DNS servers and firewall, so
//! it plumbs the container; the plugin only translates between CNI and the agent.
//!
//! * [`spec`] (pure): what CNI defines: the environment, the configuration on stdin,
//!   `CNI_ARGS`, versions, the result and the error objects.
//! * [`protocol`] (pure): the plugin↔agent messages (one JSON line each way).
//! * [`naming`] (pure): the endpoint name a container gets (the agent decides with it).
//! * [`conflist`] (pure): the conflist `overlayctl cni-config` prints.
//! * [`plugin`] (pure): one invocation from environment and stdin to a request, and from
//!   the agent's reply to what is printed.
//!
//! The binary (`main.rs`) does the I/O: reads the environment and stdin, makes the one
//! request, prints the result or the CNI error JSON. This crate must never touch the
//! kernel or talk to the controllers itself: that is the agent's job.

pub mod conflist;
pub mod naming;
pub mod plugin;
pub mod protocol;
pub mod spec;
