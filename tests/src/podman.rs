//! Real podman on a lab host: containers attached through `overlay-cni` and that host's
//! agent, as a user would run them.
//!
//! Each [`Podman`] runs `podman` inside one lab host's network namespace (`nsenter
//! --net=…`, like the agents: the runtime's namespaces and the agent's bind mounts must be
//! visible machine-wide) with everything of its own under `<lab dir>/podman-h<i>`: storage
//! (vfs), run root, temporary files, `containers.conf` (CNI back end, runc, cgroupfs, no
//! ulimits, no events: what Debian's podman 4.3 needs on these machines), and a CNI config
//! directory with the conflists `overlayctl cni-config` prints for that host's agent
//! socket. No registry is reachable: the image is a busybox rootfs, `podman import`ed.
//!
//! Dropping it removes its containers and images and unmounts whatever podman left
//! under its directory, also when a test failed half-way.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{bail, Context, Result};

use crate::lab::{bin_dir, run, Lab};

/// The image every container runs.
pub const IMAGE: &str = "localhost/ovt-busybox:latest";

/// Busybox applets the image links (its `/bin/busybox` is the static one).
const APPLETS: [&str; 17] = [
    "sh", "ping", "wget", "httpd", "hostname", "cat", "sleep", "nslookup", "ip", "ls", "echo",
    "mkdir", "true", "ifconfig", "route", "grep", "timeout",
];

fn which(cmd: &str) -> Option<PathBuf> {
    let out = Command::new("sh").args(["-c", &format!("command -v {cmd}")]).output().ok()?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !path.is_empty()).then(|| PathBuf::from(path))
}

/// The static busybox (Debian's busybox-static).
fn busybox() -> Option<PathBuf> {
    ["/bin/busybox", "/usr/bin/busybox"].iter().map(PathBuf::from).find(|p| p.exists())
}

/// What is missing to run podman here (empty: nothing).
pub fn missing() -> Vec<&'static str> {
    let mut out = vec![];
    if which("podman").is_none() {
        out.push("podman");
    }
    if which("runc").is_none() {
        out.push("runc");
    }
    if busybox().is_none() {
        out.push("busybox-static");
    }
    if !Path::new("/usr/lib/cni/portmap").exists() {
        out.push("containernetworking-plugins");
    }
    out
}

pub struct Podman {
    pub host: usize,
    host_ns: String,
    dir: PathBuf,
}

impl Podman {
    /// podman on lab host `host`, with a conflist per network in `networks` (made by
    /// `overlayctl cni-config NET --socket <the host's agent socket>`).
    pub fn new(lab: &Lab, host: usize, networks: &[&str]) -> Result<Podman> {
        let dir = lab.dir.join(format!("podman-h{host}"));
        for sub in ["cni-bin", "net.d", "tmp", "root", "runroot"] {
            fs::create_dir_all(dir.join(sub))?;
        }
        let podman = Podman { host, host_ns: lab.host_ns(host), dir };
        let plugin = bin_dir().join("overlay-cni");
        if !plugin.exists() {
            bail!("{} is missing: run `cargo build --workspace --bins` first", plugin.display());
        }
        let link = podman.dir.join("cni-bin").join("overlay-cni");
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&plugin, &link)?;
        let d = podman.dir.display();
        fs::write(
            podman.dir.join("containers.conf"),
            format!(
                "[containers]\ndefault_ulimits = []\n\n[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{d}/cni-bin\", \"/usr/lib/cni\"]\nnetwork_config_dir = \"{d}/net.d\"\n\n[engine]\ncgroup_manager = \"cgroupfs\"\nruntime = \"runc\"\nevents_logger = \"none\"\ntmp_dir = \"{d}/tmp\"\n"
            ),
        )?;
        fs::write(
            podman.dir.join("storage.conf"),
            format!("[storage]\ndriver = \"vfs\"\nrunroot = \"{d}/runroot\"\ngraphroot = \"{d}/root\"\n"),
        )?;
        let socket = lab.agent_socket(host).display().to_string();
        for net in networks {
            let conflist = lab.ctl_ok(&["cni-config", net, "--socket", &socket])?;
            fs::write(podman.dir.join("net.d").join(format!("{net}.conflist")), conflist)?;
        }
        Ok(podman)
    }

    /// `podman ARGS` in the host's namespace.
    pub fn run(&self, args: &[&str]) -> Output {
        let d = &self.dir;
        Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", self.host_ns))
            .arg("--")
            .arg("podman")
            .args(["--root", &d.join("root").display().to_string()])
            .args(["--runroot", &d.join("runroot").display().to_string()])
            .args(["--storage-driver", "vfs"])
            .args(args)
            .env("CONTAINERS_CONF", d.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", d.join("storage.conf"))
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run podman: {e}"))
    }

    /// `podman ARGS`, stdout; an error with podman's stderr on failure.
    pub fn ok(&self, args: &[&str]) -> Result<String> {
        let out = self.run(args);
        if !out.status.success() {
            bail!(
                "h{}: podman {args:?} failed: {}{}",
                self.host,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Imports [`IMAGE`]: a rootfs of the static busybox, its applets, and `/www`.
    pub fn import_busybox(&self) -> Result<()> {
        let busybox = busybox().context("busybox-static is not installed")?;
        let rootfs = self.dir.join("rootfs");
        let _ = fs::remove_dir_all(&rootfs);
        for sub in ["bin", "etc", "www", "tmp", "proc", "sys", "dev"] {
            fs::create_dir_all(rootfs.join(sub))?;
        }
        fs::copy(&busybox, rootfs.join("bin/busybox"))?;
        for applet in APPLETS {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))?;
        }
        let tar = self.dir.join("rootfs.tar");
        let (rootfs_s, tar_s) = (rootfs.display().to_string(), tar.display().to_string());
        let out = run(&["tar", "-C", &rootfs_s, "-cf", &tar_s, "."]);
        if !out.status.success() {
            bail!("tar: {}", String::from_utf8_lossy(&out.stderr));
        }
        self.ok(&["import", &tar_s, IMAGE]).map(drop)
    }

    /// Starts a detached container NAME on `network` (more: `extra`) serving its own
    /// name over HTTP on port 80.
    pub fn web(&self, name: &str, networks: &[&str], extra: &[&str]) -> Result<String> {
        let mut args = vec!["run", "-d", "--pull", "never", "--name", name, "--hostname", name];
        for n in networks {
            args.extend(["--network", n]);
        }
        args.extend(["--cap-add", "NET_RAW"]);
        args.extend_from_slice(extra);
        args.extend([
            IMAGE,
            "sh",
            "-c",
            "hostname > /www/index.html && exec httpd -f -p 80 -h /www",
        ]);
        self.ok(&args)
    }

    /// `podman exec NAME ARGS`.
    pub fn exec(&self, name: &str, args: &[&str]) -> Output {
        let mut all = vec!["exec", name];
        all.extend_from_slice(args);
        self.run(&all)
    }

    /// Mount points podman left under its directory, deepest first.
    fn mounts(&self) -> Vec<String> {
        let prefix = self.dir.display().to_string();
        let mut out: Vec<String> = fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4).map(str::to_string))
            .filter(|m| m.starts_with(&prefix))
            .collect();
        out.sort_by_key(|m| std::cmp::Reverse(m.len()));
        out
    }
}

/// Where libcni (inside podman) caches each attachment's result, named
/// `NETWORK-CONTAINERID-IFNAME`; a DEL that failed leaves its file behind.
const CNI_CACHE: &str = "/var/lib/cni/results";

impl Drop for Podman {
    fn drop(&mut self) {
        let ids = self.ok(&["ps", "--all", "--quiet", "--no-trunc"]).unwrap_or_default();
        let _ = self.run(&["rm", "--all", "--force", "--time", "0"]);
        if let Ok(dir) = fs::read_dir(CNI_CACHE) {
            for entry in dir.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if ids.split_whitespace().any(|id| name.contains(&format!("-{id}-"))) {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        let _ = self.run(&["rmi", "--all", "--force"]);
        for m in self.mounts() {
            let _ = run(&["umount", "-l", &m]);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}
