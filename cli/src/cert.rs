//! `overlayctl cert`: the cluster PKI for encrypted networks, offline like `nebula-cert`.
//! `cert ca` makes the cluster CA once; `cert issue HOST` signs a certificate for one
//! host, which the operator copies to that host with `ca.pem`. The work is
//! overlay-quic's `pki`; this file only checks the arguments and reports the files.

use std::net::IpAddr;
use std::path::PathBuf;

use overlay_model::parse;
use overlay_quic::pki::{self, Ca, CA_CERT_FILE, CA_KEY_FILE};
use serde::Serialize;

use crate::args::{CertCmd, Format};
use crate::output::Render;
use crate::{emit, Failure};

pub fn run(cmd: &CertCmd, out: Format) -> Result<(), Failure> {
    match cmd {
        CertCmd::Ca { out: dir, force } => {
            let ca = Ca::generate()?;
            ca.save(dir, *force)?;
            emit(out, &Written { cert: dir.join(CA_CERT_FILE), key: dir.join(CA_KEY_FILE) })
        }
        CertCmd::Issue { host, ca_dir, out: dir, ip } => {
            // Arguments first, so a typo is reported before any file is read.
            pki::validate_host_name(host)?;
            let ip = ip.as_deref().map(parse::ipv4).transpose()?.map(IpAddr::V4);
            let issued = Ca::load(ca_dir)?.issue(host, ip)?;
            let (cert, key) = issued.save(dir)?;
            emit(out, &Written { cert, key })
        }
    }
}

/// The files a `cert` command wrote.
#[derive(Debug, Serialize)]
struct Written {
    cert: PathBuf,
    key: PathBuf,
}

impl Render for Written {
    type Json = Self;
    fn json(&self) -> Self {
        Written { cert: self.cert.clone(), key: self.key.clone() }
    }
    fn table(&self, _now_ms: i64) -> String {
        format!("certificate {}\nprivate key {}\n", self.cert.display(), self.key.display())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use overlay_quic::pki::Identity;

    use super::*;
    use crate::args::{Cli, Command};

    fn cert(args: &[&str]) -> Result<(), String> {
        let argv = ["overlayctl", "-o", "json", "cert"].into_iter().chain(args.iter().copied());
        match Cli::parse_args(argv).map_err(|e| e.to_string())?.command {
            Command::Cert(cmd) => run(&cmd, Format::Json).map_err(|e| e.to_string()),
            other => Err(format!("parsed as {other:?}")),
        }
    }

    fn path(p: &Path) -> &str {
        p.to_str().unwrap_or_default()
    }

    #[test]
    fn ca_then_issue_then_load() {
        let dir = std::env::temp_dir().join(format!("overlayctl-cert-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let d = path(&dir);
        assert_eq!(cert(&["ca", "--out", d]), Ok(()));
        let again = cert(&["ca", "--out", d]);
        assert_eq!(
            again,
            Err(format!(
                "{} already exists: refusing to replace the cluster CA (--force replaces it)",
                dir.join("ca.pem").display()
            ))
        );
        assert_eq!(cert(&["issue", "h1", "--ca-dir", d, "--out", d, "--ip", "192.0.2.1"]), Ok(()));
        assert!(Identity::load_dir(&dir, "h1").is_ok());

        let bad = |args: &[&str], needle: &str| {
            let message = cert(args).err().unwrap_or_default();
            assert!(message.contains(needle), "{args:?}: {message}");
        };
        bad(&["issue", "H_1", "--ca-dir", d, "--out", d], "invalid name \"H_1\"");
        bad(&["issue", "h2", "--ca-dir", d, "--out", d, "--ip", "1.2.3"], "\"1.2.3\"");
        bad(&["issue", "h2", "--ca-dir", "/nonexistent-ca", "--out", d], "/nonexistent-ca/ca.pem");
        assert_eq!(cert(&["ca", "--out", d, "--force"]), Ok(()));
        // Signed by the replaced CA: no longer valid.
        assert!(Identity::load_dir(&dir, "h1").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
