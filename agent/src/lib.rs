//! The overlay host agent: reconciles this host's kernel data plane (bridges, VXLAN
//! devices, veths, endpoint namespaces, FDB/neighbour/route state, the `inet overlay`
//! nftables table and one DNS server per endpoint) to the controller's desired state.
//!
//! * [`desired`] (pure): catalog -> what this host should have.
//! * [`observed`] + [`observe`]: what the kernel has, only objects we own; [`entries`]:
//!   the host's FDB and neighbour entries kept current from netlink notifications.
//! * [`plan`] (pure): desired vs observed -> a printable list of actions.
//! * [`apply`] (+ [`nl`], [`netns`], [`garp`]): actions -> netlink, setns, gratuitous
//!   ARP, nft.
//! * [`firewall`]: the nftables ruleset (rendered purely, installed in one batch).
//! * [`shortcut`]: known unicast frames of VXLAN networks skip the bridge (and
//!   br_netfilter) through `netdev` ingress `fwd`.
//! * [`reconcile`]: observe/plan/apply passes, with per-action backoff and reporting;
//!   [`store`] (+ [`journal`]): what survives restarts.
//! * [`identity`]: the agent's certificate (checked, or joined with a token and renewed).
//! * [`watch`]: register, heartbeat, and the controller's desired-state stream (with
//!   [`backoff`]: jittered retry delays).
//! * [`dns`]: one embedded DNS server per local endpoint.
//! * [`dataplane`]: the daemon that carries `--encap udp` networks in user space (it
//!   outlives agent restarts), and the agent's client of it.
//! * [`cni`]: the unix socket `overlay-cni` asks to attach containers (their endpoints live
//!   in the runtime's namespaces, bind-mounted under `/run/netns`).
//! * [`metrics`]: what `--metrics-listen` shows (passes, the data plane's counters).
//! * [`agent`]: the main loop tying them together.
//!
//! The agent must never touch a device or namespace it did not create: owned devices
//! carry the `ovb-`/`ovx-`/`ovu-`/`ovv`/`ovp` prefixes *and* the alias `overlay-agent`
//! (set when it creates them), owned namespaces are recorded in the data directory.

pub mod agent;
pub mod apply;
pub mod backoff;
pub mod cni;
pub mod dataplane;
pub mod desired;
pub mod diff;
pub mod dns;
pub mod entries;
pub mod firewall;
pub mod garp;
pub mod identity;
pub mod journal;
pub mod marks;
pub mod metrics;
pub mod netns;
pub mod nl;
pub mod observe;
pub mod observed;
pub mod plan;
pub mod reconcile;
pub mod report;
pub mod shortcut;
pub mod status;
pub mod store;
pub mod watch;
