//! Actions -> netlink, setns and nft. Each action is idempotent; a failing action is
//! recorded and the rest still run (the next reconcile pass retries what failed).

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;

use anyhow::{Context, Result};
use tracing::{debug, warn};

use crate::firewall::{self, Ruleset};
use crate::nl::Nl;
use crate::observed::OWNED_ALIAS;
use crate::plan::{Action, Ns};
use crate::store::Store;
use crate::{garp, netns, shortcut};

/// One action that failed.
#[derive(Debug)]
pub struct ApplyError {
    pub action: Action,
    pub error: anyhow::Error,
}

/// Applies `actions` in order with the host namespace's `host` connection.
pub async fn apply(host: &Nl, store: &Store, actions: &[Action]) -> Vec<ApplyError> {
    let mut ctx =
        Ctx { host, store, netns: BTreeMap::new(), indexes: BTreeMap::new(), announcer: None };
    let mut errors = Vec::new();
    for action in actions {
        debug!(netns = action.netns().unwrap_or(""), "apply {action}");
        if let Err(error) = ctx.apply_one(action).await {
            // The caller reports failures (once per change of error, with backoff).
            debug!(netns = action.netns().unwrap_or(""), "{action}: {error:#}");
            errors.push(ApplyError { action: action.clone(), error });
        }
    }
    errors
}

struct Ctx<'a> {
    host: &'a Nl,
    store: &'a Store,
    /// Connections into endpoint namespaces, opened on first use.
    netns: BTreeMap<String, Nl>,
    /// Host devices' indexes, looked up once for a run of FDB and neighbour actions
    /// (thousands in a row for a large network: a lookup per entry doubled the netlink
    /// round trips and parsing) and forgotten at any other action, which may create or
    /// delete devices.
    indexes: BTreeMap<String, u32>,
    /// The host namespace's packet socket for announcements, opened on first use: one
    /// per pass rather than per frame (see [`garp::Announcer`]).
    announcer: Option<garp::Announcer>,
}

/// Whether `action` leaves every host device (and so its index) as it was.
fn keeps_devices(action: &Action) -> bool {
    matches!(
        action,
        Action::AddFdb { .. }
            | Action::DelFdb { .. }
            | Action::AddNeigh { .. }
            | Action::DelNeigh { .. }
            | Action::Announce { .. }
    )
}

impl Ctx<'_> {
    /// Index of host device `dev`, from the cache when the previous actions kept it valid.
    async fn host_index(&mut self, dev: &str) -> Result<u32> {
        if let Some(index) = self.indexes.get(dev) {
            return Ok(*index);
        }
        let index = self.host.index(dev).await?;
        self.indexes.insert(dev.to_string(), index);
        Ok(index)
    }

    fn nl(&mut self, ns: &Ns) -> Result<&Nl> {
        match ns {
            Ns::Host => Ok(self.host),
            Ns::Netns(name) => {
                if !self.netns.contains_key(name) {
                    let nl =
                        Nl::in_netns(name).with_context(|| format!("entering namespace {name}"))?;
                    self.netns.insert(name.clone(), nl);
                }
                self.netns.get(name).context("namespace connection vanished")
            }
        }
    }

    async fn apply_one(&mut self, action: &Action) -> Result<()> {
        if !keeps_devices(action) {
            self.indexes.clear();
        }
        match action {
            Action::CreateNamespace { name } => {
                // The record is a cache (the mark set next is what counts, see
                // `marks`): a full disk must not stop endpoints from being created.
                if let Err(e) = self.store.record_namespace(name) {
                    warn!(endpoint = %name, "cannot record namespace {name} (creating it all the same; its mark says it is ours): {e}");
                }
                if !netns::path(name).exists() {
                    netns::create(name).with_context(|| format!("creating namespace {name}"))?;
                }
                Ok(())
            }
            Action::MarkNamespace { name, mark } => {
                self.nl(&Ns::Netns(name.clone()))?.set_alias("lo", mark).await
            }
            Action::DeleteNamespace { name } => {
                self.netns.remove(name);
                netns::delete(name).with_context(|| format!("deleting namespace {name}"))?;
                self.store.forget_namespace(name).context("updating namespace record")
            }
            Action::CreateBridge { name, mtu, mac } => {
                self.host.create_bridge(name, *mtu, *mac).await?;
                self.host.set_alias(name, OWNED_ALIAS).await
            }
            Action::CreateVxlan { name, vni, local, mtu, bridge } => {
                self.host.create_vxlan(name, *vni, *local, *mtu, bridge).await?;
                self.host.set_alias(name, OWNED_ALIAS).await?;
                // The kernel may ignore IFLA_MTU on vxlan creation: set it explicitly.
                self.host.set_mtu(name, *mtu).await
            }
            Action::SetAlias { dev } => self.host.set_alias(dev, OWNED_ALIAS).await,
            Action::CreateVeth { netns: ns, host_name, peer_tmp, inside, mac, mtu, bridge } => {
                let r = self.create_veth(ns, host_name, peer_tmp, inside, *mac, *mtu, bridge).await;
                if r.is_err() {
                    // Undo: half a pair is garbage; the next pass starts over.
                    let _ = self.host.delete_link(host_name).await;
                    let _ = self.host.delete_link(peer_tmp).await;
                }
                r
            }
            Action::DeleteLink { ns, name } => self.nl(ns)?.delete_link(name).await,
            Action::SetMtu { ns, dev, mtu } => self.nl(ns)?.set_mtu(dev, *mtu).await,
            Action::SetMac { ns, dev, mac } => self.nl(ns)?.set_mac(dev, *mac).await,
            Action::SetMaster { dev, master } => self.host.set_master(dev, master).await,
            Action::SetUp { ns, dev } => self.nl(ns)?.set_up(dev).await,
            Action::AddAddress { ns, dev, addr } => self.nl(ns)?.add_addr(dev, *addr).await,
            Action::DelAddress { ns, dev, addr } => self.nl(ns)?.del_addr(dev, *addr).await,
            Action::AddFdb { dev, entry } => {
                let index = self.host_index(dev).await?;
                self.host.add_fdb(index, dev, entry).await
            }
            Action::DelFdb { dev, entry } => {
                let index = self.host_index(dev).await?;
                self.host.del_fdb(index, dev, entry).await
            }
            Action::AddNeigh { dev, ip, mac } => {
                let index = self.host_index(dev).await?;
                self.host.add_neigh(index, dev, *ip, *mac).await
            }
            Action::DelNeigh { dev, ip, mac } => {
                let index = self.host_index(dev).await?;
                self.host.del_neigh(index, dev, *ip, *mac).await
            }
            Action::AddRoute { netns: ns, route } => {
                self.nl(&Ns::Netns(ns.clone()))?.add_route(route).await
            }
            Action::DelRoute { netns: ns, route } => {
                self.nl(&Ns::Netns(ns.clone()))?.del_route(route).await
            }
            Action::SetForwarding { ns: Ns::Host, on } => {
                netns::set_forwarding(*on).context("setting net.ipv4.ip_forward")
            }
            Action::SetForwarding { ns: Ns::Netns(name), on } => {
                let on = *on;
                netns::run_in(name, move || netns::set_forwarding(on))
                    .with_context(|| format!("setting net.ipv4.ip_forward in {name}"))
            }
            Action::SetSysctls { netns: name, values } => {
                let values = values.clone();
                netns::run_in(name, move || {
                    values.iter().try_for_each(|(k, v)| {
                        netns::write_sysctl(k, v)
                            .map_err(|e| std::io::Error::new(e.kind(), format!("{k}: {e}")))
                    })
                })
                .with_context(|| format!("setting sysctls in {name}"))
            }
            Action::Announce { ns, dev, ip, mac } => {
                let frame = garp::frame(*ip, *mac);
                let context = || format!("announcing {ip} at {mac} on {dev} ({ns})");
                match ns {
                    Ns::Host => {
                        if self.announcer.is_none() {
                            self.announcer = Some(garp::Announcer::new().with_context(context)?);
                        }
                        let announcer = self.announcer.as_ref().context("no packet socket")?;
                        announcer.send(dev, &frame).with_context(context)
                    }
                    Ns::Netns(name) => {
                        let dev = dev.clone();
                        netns::run_in(name, move || garp::send(&dev, &frame)).with_context(context)
                    }
                }
            }
            Action::WriteResolvConf { netns: ns } => {
                netns::write_resolv_conf(ns, crate::desired::RESOLV_CONF)
                    .context("writing resolv.conf")
            }
            Action::ApplyFirewall { ruleset } => run_nft(firewall::install, ruleset).await,
            Action::ApplyShortcut { ruleset } => run_nft(shortcut::install, ruleset).await,
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn create_veth(
        &mut self,
        ns: &str,
        host_name: &str,
        peer_tmp: &str,
        inside: &str,
        mac: overlay_model::Mac,
        mtu: u32,
        bridge: &str,
    ) -> Result<()> {
        let host = self.host;
        host.delete_link(peer_tmp).await?;
        host.create_veth(host_name, peer_tmp, mtu).await?;
        host.set_alias(host_name, OWNED_ALIAS).await?;
        host.set_alias(peer_tmp, OWNED_ALIAS).await?;
        host.set_mac(peer_tmp, mac).await?;
        host.set_mtu(peer_tmp, mtu).await?;
        host.set_master(host_name, bridge).await?;
        host.set_up(host_name).await?;
        let file =
            File::open(netns::path(ns)).with_context(|| format!("opening namespace {ns}"))?;
        host.move_to_netns(peer_tmp, file.as_raw_fd()).await?;
        let nl = self.nl(&Ns::Netns(ns.to_string()))?;
        nl.set_name(peer_tmp, inside).await?;
        nl.set_up(inside).await
    }
}

/// Installs `ruleset` with `install` (an `nft` run) off the async threads.
pub async fn run_nft(install: fn(&Ruleset) -> Result<(), String>, ruleset: &Ruleset) -> Result<()> {
    let ruleset = ruleset.clone();
    tokio::task::spawn_blocking(move || install(&ruleset))
        .await
        .context("nft task")?
        .map_err(anyhow::Error::msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::Fdb;
    use overlay_model::Mac;

    #[test]
    fn only_fdb_and_neighbour_actions_keep_cached_indexes() {
        let dev = "ovx-4096".to_string();
        let entry = Fdb { mac: Mac::from_counter(1), dst: "192.0.2.2".parse().expect("ip") };
        let (ip, mac) = ("10.0.0.2".parse().expect("ip"), Mac::from_counter(1));
        for a in [
            Action::AddFdb { dev: dev.clone(), entry },
            Action::DelFdb { dev: dev.clone(), entry },
            Action::AddNeigh { dev: dev.clone(), ip, mac },
            Action::DelNeigh { dev: dev.clone(), ip, mac },
        ] {
            assert!(keeps_devices(&a), "{a}");
        }
        for a in [
            Action::DeleteLink { ns: Ns::Host, name: dev.clone() },
            Action::CreateVxlan {
                name: dev.clone(),
                vni: 4096,
                local: "192.0.2.1".parse().expect("ip"),
                mtu: 1450,
                bridge: "ovb-4096".into(),
            },
            Action::CreateBridge { name: "ovb-4096".into(), mtu: 1450, mac },
            Action::DeleteNamespace { name: "ep".into() },
            Action::SetUp { ns: Ns::Host, dev },
        ] {
            assert!(!keeps_devices(&a), "{a}");
        }
    }
}
