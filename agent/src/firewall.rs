//! The agent's nftables table `inet overlay`: rendered as text from the desired state
//! (pure), installed whole with one `nft -f -` batch, observed through `nft -j`.
//!
//! Rules:
//! * isolation: nothing is routed by the host from one overlay bridge to another (only a
//!   gateway endpoint, inside its own namespace, routes between networks);
//! * internal networks: nothing is forwarded into or out of their bridge (traffic
//!   bridged inside it is untouched, even when br_netfilter shows it to this hook);
//! * egress: a non-internal network's subnet leaving the host through anything but an
//!   overlay bridge is masqueraded behind the host's address.
//!
//! The table carries the digest of its ruleset as its comment; the plan reinstalls it
//! when the digest or the rule count differs (a rule deleted by hand comes back).
//! This module never touches any other table.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};

use crate::desired::{FirewallDesired, BRIDGE_PREFIX};
use crate::observed::FirewallObs;

pub const FAMILY: &str = "inet";
pub const TABLE: &str = "overlay";

/// A rendered ruleset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    /// The body of `table inet overlay { … }` without the comment.
    pub body: String,
    pub digest: String,
    pub rules: usize,
}

impl Ruleset {
    /// The `nft -f` batch that replaces the table atomically.
    pub fn batch(&self) -> String {
        format!(
            "table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\ntable {FAMILY} {TABLE} {{\n\tcomment \"{}\"\n{}}}\n",
            self.digest, self.body
        )
    }
}

fn digest(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("overlay-agent {h:016x}")
}

/// Renders the ruleset for `fw` (pure).
pub fn render(fw: &FirewallDesired) -> Ruleset {
    let mut body = String::new();
    let mut rules = 0;
    body.push_str(
        "\tchain forward {\n\t\ttype filter hook forward priority filter; policy accept;\n",
    );
    // With br_netfilter loaded, frames bridged *within* one bridge also pass this hook
    // with iifname = oifname = that bridge: every rule must leave those alone.
    for bridge in fw.external.iter().map(|(b, _)| b).chain(&fw.internal) {
        let _ = writeln!(
            body,
            "\t\tiifname \"{bridge}\" oifname \"{BRIDGE_PREFIX}*\" oifname != \"{bridge}\" drop"
        );
        rules += 1;
    }
    for bridge in &fw.internal {
        let _ = writeln!(body, "\t\tiifname \"{bridge}\" oifname != \"{bridge}\" drop");
        let _ = writeln!(body, "\t\toifname \"{bridge}\" iifname != \"{bridge}\" drop");
        rules += 2;
    }
    body.push_str("\t}\n");
    body.push_str(
        "\tchain postrouting {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n",
    );
    for (_bridge, subnet) in &fw.external {
        let _ = writeln!(body, "\t\tip saddr {subnet} oifname != \"{BRIDGE_PREFIX}*\" masquerade");
        rules += 1;
    }
    body.push_str("\t}\n");
    Ruleset { digest: digest(&body), body, rules }
}

/// True when the installed table is exactly `want`.
pub fn is_current(observed: Option<&FirewallObs>, want: &Ruleset) -> bool {
    observed.is_some_and(|o| o.digest == want.digest && o.rules == want.rules)
}

/// Installs `ruleset` in one batch.
pub fn install(ruleset: &Ruleset) -> Result<(), String> {
    run_nft(&ruleset.batch())
}

/// Removes the table (no error if absent).
pub fn remove() -> Result<(), String> {
    run_nft(&format!("table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n"))
}

fn run_nft(batch: &str) -> Result<(), String> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run nft: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(batch.as_bytes()).map_err(|e| format!("writing to nft: {e}"))?;
    }
    let out = child.wait_with_output().map_err(|e| format!("waiting for nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("nft failed: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

fn nft_list(json: bool) -> Option<Vec<u8>> {
    let mut cmd = Command::new("nft");
    if json {
        cmd.arg("-j");
    }
    let out = cmd.args(["list", "table", FAMILY, TABLE]).stderr(Stdio::null()).output().ok()?;
    out.status.success().then_some(out.stdout)
}

/// Reads the installed table, `None` if there is none (or nft is missing). The rules
/// are counted from the JSON listing; the comment comes from the text listing because
/// nft 1.0.6 leaves table comments out of its JSON.
pub fn observe() -> Option<FirewallObs> {
    let rules = count_rules(&nft_list(true)?)?;
    let digest = table_comment(&String::from_utf8_lossy(&nft_list(false)?)).unwrap_or_default();
    Some(FirewallObs { digest, rules })
}

fn count_rules(json: &[u8]) -> Option<usize> {
    let v: serde_json::Value = serde_json::from_slice(json).ok()?;
    let items = v.get("nftables")?.as_array()?;
    Some(items.iter().filter(|i| i.get("rule").is_some()).count())
}

/// The `comment "…"` line of the table itself (before its first chain).
fn table_comment(text: &str) -> Option<String> {
    for line in text.lines().map(str::trim) {
        if line.starts_with("chain ") {
            return None;
        }
        if let Some(rest) = line.strip_prefix("comment \"") {
            return rest.strip_suffix('"').map(str::to_string);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn renders_isolation_internal_and_masquerade() {
        let fw = FirewallDesired {
            external: vec![("ovb-4096".into(), "10.1.0.0/24".parse().unwrap())],
            internal: vec!["ovb-4097".into()],
        };
        let r = render(&fw);
        assert_eq!(r.rules, 5);
        assert!(r
            .body
            .contains("iifname \"ovb-4096\" oifname \"ovb-*\" oifname != \"ovb-4096\" drop"));
        assert!(r
            .body
            .contains("iifname \"ovb-4097\" oifname \"ovb-*\" oifname != \"ovb-4097\" drop"));
        assert!(r.body.contains("iifname \"ovb-4097\" oifname != \"ovb-4097\" drop"));
        assert!(r.body.contains("oifname \"ovb-4097\" iifname != \"ovb-4097\" drop"));
        assert!(r.body.contains("ip saddr 10.1.0.0/24 oifname != \"ovb-*\" masquerade"));
        assert!(r.batch().starts_with("table inet overlay\ndelete table inet overlay\n"));
        assert_ne!(render(&FirewallDesired::default()).digest, r.digest);
    }

    #[test]
    fn parses_nft_listings() {
        let json = br#"{"nftables":[{"metainfo":{"version":"1.0.6"}},
            {"table":{"family":"inet","name":"overlay","handle":3}},
            {"chain":{"family":"inet","table":"overlay","name":"forward"}},
            {"rule":{"family":"inet","table":"overlay","chain":"forward"}},
            {"rule":{"family":"inet","table":"overlay","chain":"forward"}}]}"#;
        assert_eq!(count_rules(json), Some(2));
        assert_eq!(count_rules(b"nonsense"), None);
        let text = "table inet overlay {\n\tcomment \"overlay-agent 00ff\"\n\tchain forward {\n\t\tiifname \"a\" drop comment \"x\"\n\t}\n}\n";
        assert_eq!(table_comment(text).as_deref(), Some("overlay-agent 00ff"));
        assert_eq!(table_comment("table inet overlay {\n\tchain f {\n\t\tcomment \"x\"\n"), None);
    }
}
