//! `overlayctl cert`: the cluster PKI, offline like `nebula-cert`. `cert ca` makes the
//! cluster CA once; `cert issue NAME --role R` signs a certificate for one controller,
//! host or operator, which is copied to where it is used with `ca.pem`. The work is
//! overlay-pki's; this file only checks the arguments and reports the files.

use std::net::IpAddr;
use std::path::PathBuf;

use overlay_model::parse;
use overlay_pki::{Ca, Role, Subject, CA_CERT_FILE, CA_KEY_FILE, DEFAULT_LIFETIME};
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
        CertCmd::Issue { name, ca_dir, out: dir, role, ips, lifetime } => {
            // Arguments first, so a typo is reported before any file is read.
            overlay_pki::validate_cert_name(name)?;
            let role: Role = role.parse()?;
            let ips = ips
                .iter()
                .map(|ip| parse::ipv4(ip).map(IpAddr::V4))
                .collect::<Result<Vec<_>, _>>()?;
            let lifetime = match lifetime {
                Some(text) => parse::duration(text)?,
                None => DEFAULT_LIFETIME,
            };
            let subject = Subject::new(name, role).with_ips(ips).with_lifetime(lifetime);
            let issued = Ca::load(ca_dir)?.issue(&subject)?;
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

    use overlay_pki::Identity;

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
        let issue = |name: &str, role: &str, more: &[&str]| {
            let mut args = vec!["issue", name, "--ca-dir", d, "--out", d, "--role", role];
            args.extend_from_slice(more);
            cert(&args)
        };
        assert_eq!(issue("h1", "agent", &["--ip", "192.0.2.1", "--ip", "192.0.2.2"]), Ok(()));
        let load = |name: &str, role: Role| {
            let (c, k) = overlay_pki::cert_files(&dir, name);
            Identity::load_for(&dir.join(CA_CERT_FILE), &c, &k, name, role)
        };
        let h1 = load("h1", Role::Agent).map_err(|e| e.to_string());
        assert_eq!(h1.map(|i| i.info.ips.len()), Ok(2));
        assert_eq!(issue("ops", "admin", &["--lifetime", "1d"]), Ok(()));
        assert!(load("ops", Role::Admin).is_ok());
        assert!(load("ops", Role::Agent).is_err());

        let bad = |args: &[&str], needle: &str| {
            let message = cert(args).err().unwrap_or_default();
            assert!(message.contains(needle), "{args:?}: {message}");
        };
        fn with<'a>(args: &[&'a str]) -> Vec<&'a str> {
            [args, &["--role", "agent"][..]].concat()
        }
        bad(&with(&["issue", "H_1", "--ca-dir", d, "--out", d]), "invalid name \"H_1\"");
        bad(&with(&["issue", "h2", "--ca-dir", d, "--out", d, "--ip", "1.2.3"]), "\"1.2.3\"");
        bad(
            &with(&["issue", "h2", "--ca-dir", "/nonexistent-ca", "--out", d]),
            "/nonexistent-ca/ca.pem",
        );
        bad(&["issue", "h2", "--ca-dir", d, "--out", d, "--role", "root"], "unknown role \"root\"");
        bad(&with(&["issue", "h2", "--ca-dir", d, "--out", d, "--lifetime", "soon"]), "\"soon\"");
        assert_eq!(cert(&["ca", "--out", d, "--force"]), Ok(()));
        // Signed by the replaced CA: no longer valid.
        assert!(load("h1", Role::Agent).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
