//! The conflist `overlayctl cni-config NETWORK` prints (pure): `overlay-cni` for the
//! network, chained with the standard `portmap` plugin so a runtime's published ports
//! (`podman run -p 8080:80`) work the usual way.

use serde_json::{json, Value};

use crate::spec::CURRENT_VERSION;

/// The conflist for `network`, whose agent listens on `socket`. Its `name` is the
/// network's, so `podman run --network NETWORK` finds it.
pub fn conflist(network: &str, socket: &str) -> Value {
    json!({
        "cniVersion": CURRENT_VERSION,
        "name": network,
        "plugins": [
            { "type": "overlay-cni", "network": network, "socket": socket },
            { "type": "portmap", "capabilities": { "portMappings": true } }
        ]
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::spec::{parse_config, Command};

    /// What a runtime hands each plugin from it parses as our configuration.
    #[test]
    fn the_conflist_feeds_the_plugin() {
        let list = conflist("web", "/run/overlay/agent.sock");
        assert_eq!(list["plugins"][1]["type"], "portmap");
        let mut entry = list["plugins"][0].clone();
        entry["cniVersion"] = list["cniVersion"].clone();
        entry["name"] = list["name"].clone();
        let c = parse_config(entry.to_string().as_bytes(), Command::Add).unwrap();
        assert_eq!((c.network.as_str(), c.socket.as_str()), ("web", "/run/overlay/agent.sock"));
    }
}
