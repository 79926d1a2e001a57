//! Named network namespaces (`/var/run/netns/NAME`, compatible with `ip netns`), the
//! record of which ones the agent created, and running code inside one.
//!
//! No long-lived thread ever changes namespace: work inside a namespace runs on a
//! short-lived thread that calls `setns` and exits (a socket created there stays in
//! that namespace for its whole life).

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Where named namespaces live.
pub const NETNS_DIR: &str = "/var/run/netns";
/// Where per-namespace `/etc` overrides live (`ip netns exec` bind-mounts them).
pub const ETC_NETNS_DIR: &str = "/etc/netns";

/// Path of namespace `name`.
pub fn path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Names of all named namespaces on the machine.
pub fn list() -> BTreeSet<String> {
    let Ok(dir) = fs::read_dir(NETNS_DIR) else { return BTreeSet::new() };
    dir.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect()
}

/// Inode of the namespace behind `/var/run/netns/NAME` (changes when it is recreated).
pub fn inode(name: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path(name)).ok().map(|m| m.ino())
}

/// Runs `f` on a fresh thread inside namespace `name`.
pub fn run_in<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let ns = File::open(path(name))?;
    std::thread::Builder::new()
        .name("ov-netns".into())
        .spawn(move || {
            // SAFETY: setns reads the fd, which `ns` keeps open; it changes the network
            // namespace of this short-lived thread only.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            f()
        })?
        .join()
        .map_err(|_| io::Error::other("namespace thread panicked"))?
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_encoded_bytes()).map_err(|_| io::ErrorKind::InvalidInput.into())
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Makes `/var/run/netns` a shared mount point, as `ip netns add` does, so namespaces
/// mounted here are visible to other mount namespaces too.
fn prepare_dir() -> io::Result<()> {
    fs::create_dir_all(NETNS_DIR)?;
    let dir = cstr(Path::new(NETNS_DIR))?;
    let none = c"none";
    // SAFETY: valid NUL-terminated strings that outlive the calls.
    unsafe {
        let flags = libc::MS_SHARED | libc::MS_REC;
        if libc::mount(none.as_ptr(), dir.as_ptr(), std::ptr::null(), flags, std::ptr::null()) == 0
        {
            return Ok(());
        }
        if io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            return Err(io::Error::last_os_error());
        }
        // Not a mount point yet: bind it onto itself, then share it.
        check(libc::mount(
            dir.as_ptr(),
            dir.as_ptr(),
            c"none".as_ptr(),
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        ))?;
        check(libc::mount(none.as_ptr(), dir.as_ptr(), std::ptr::null(), flags, std::ptr::null()))
    }
}

/// A namespace name becomes a path under `/var/run/netns` and `/etc/netns`: only DNS
/// labels (what the model allows for endpoint names) are ever created, written or
/// deleted, whatever reaches this module.
fn checked(name: &str) -> io::Result<()> {
    if overlay_model::names::is_dns_label(name) {
        Ok(())
    } else {
        Err(io::Error::new(io::ErrorKind::InvalidInput, format!("invalid namespace name {name:?}")))
    }
}

/// Creates namespace `name` (error if it exists).
pub fn create(name: &str) -> io::Result<()> {
    checked(name)?;
    prepare_dir()?;
    let target = path(name);
    File::options().write(true).create_new(true).open(&target)?;
    let target_c = cstr(&target)?;
    let result = std::thread::Builder::new()
        .name("ov-netns-add".into())
        .spawn(move || -> io::Result<()> {
            // SAFETY: unshare affects only this short-lived thread; mount gets valid
            // NUL-terminated strings.
            unsafe {
                check(libc::unshare(libc::CLONE_NEWNET))?;
                check(libc::mount(
                    c"/proc/thread-self/ns/net".as_ptr(),
                    target_c.as_ptr(),
                    c"none".as_ptr(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ))
            }
        })?
        .join()
        .map_err(|_| io::Error::other("namespace thread panicked"))?;
    if result.is_err() {
        let _ = fs::remove_file(&target);
    }
    result
}

/// Deletes namespace `name` and its `/etc/netns/NAME` (no error if already gone). The
/// kernel frees the namespace, and the veth ends inside it, once nothing holds it.
pub fn delete(name: &str) -> io::Result<()> {
    checked(name)?;
    let target = path(name);
    if target.exists() {
        let c = cstr(&target)?;
        // SAFETY: valid NUL-terminated path.
        let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINVAL) {
                return Err(err);
            }
        }
        match fs::remove_file(&target) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    let etc = Path::new(ETC_NETNS_DIR).join(name);
    let _ = fs::remove_file(etc.join("resolv.conf"));
    let _ = fs::remove_dir(&etc);
    Ok(())
}

/// Writes `/etc/netns/NAME/resolv.conf`.
pub fn write_resolv_conf(name: &str, content: &str) -> io::Result<()> {
    checked(name)?;
    let dir = Path::new(ETC_NETNS_DIR).join(name);
    fs::create_dir_all(&dir)?;
    crate::store::write_atomic(&dir.join("resolv.conf"), content.as_bytes())
}

/// Reads `/etc/netns/NAME/resolv.conf`.
pub fn read_resolv_conf(name: &str) -> Option<String> {
    fs::read_to_string(Path::new(ETC_NETNS_DIR).join(name).join("resolv.conf")).ok()
}

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// `net.ipv4.ip_forward` of the calling thread's namespace.
pub fn forwarding() -> bool {
    fs::read_to_string(IP_FORWARD).map(|s| s.trim() == "1").unwrap_or(false)
}

/// Sets `net.ipv4.ip_forward` of the calling thread's namespace.
pub fn set_forwarding(on: bool) -> io::Result<()> {
    fs::write(IP_FORWARD, if on { "1\n" } else { "0\n" })
}

/// The `/proc/sys` file of `key` (`net/ipv4/conf/all/rp_filter`), which must be a
/// relative path without `..` (keys come from the agent's own table, never from input).
fn sysctl_path(key: &str) -> io::Result<PathBuf> {
    let relative = Path::new(key);
    let plain = relative.components().all(|c| matches!(c, std::path::Component::Normal(_)));
    if !plain || key.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad sysctl {key:?}")));
    }
    Ok(Path::new("/proc/sys").join(relative))
}

/// A sysctl of the calling thread's namespace, trimmed; `None` if it cannot be read.
pub fn read_sysctl(key: &str) -> Option<String> {
    fs::read_to_string(sysctl_path(key).ok()?).ok().map(|v| v.trim().to_string())
}

/// Sets a sysctl of the calling thread's namespace.
pub fn write_sysctl(key: &str, value: &str) -> io::Result<()> {
    fs::write(sysctl_path(key)?, format!("{value}\n"))
}

/// How often, since boot, the kernel could not add a neighbour because its ARP table
/// (one for the whole machine) was full: the sum of `table_fulls` over every CPU in
/// `/proc/net/stat/arp_cache`.
pub fn arp_table_fulls() -> Option<u64> {
    parse_table_fulls(&fs::read_to_string("/proc/net/stat/arp_cache").ok()?)
}

/// `table_fulls` summed over the per-CPU lines (hexadecimal) of an `arp_cache` text.
fn parse_table_fulls(text: &str) -> Option<u64> {
    let mut lines = text.lines();
    let col = lines.next()?.split_whitespace().position(|c| c == "table_fulls")?;
    lines
        .filter_map(|l| l.split_whitespace().nth(col))
        .map(|v| u64::from_str_radix(v, 16).ok())
        .sum()
}

// --- Containers (CNI, issue 12) ---

/// `ioctl(NS_GET_NSTYPE)`: the kind of namespace an nsfs file descriptor refers to.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// Makes the network namespace at `source` (a container runtime's `CNI_NETNS`: a bind
/// mount such as `/run/netns/cni-…`, or `/proc/PID/ns/net`) visible as namespace `name`,
/// with a bind mount of its own, so `ip netns exec NAME` and everything here work on it.
/// Returns the namespace's inode. `source` must be a network namespace; `name` must not
/// exist yet. Deleting `name` later ([`delete`]) only unmounts it: the runtime's
/// namespace lives on as long as the runtime holds it.
pub fn adopt(name: &str, source: &Path) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    checked(name)?;
    let ns = File::open(source)?;
    // SAFETY: ioctl on an fd `ns` keeps open; NS_GET_NSTYPE takes no argument.
    let kind = unsafe { libc::ioctl(ns.as_raw_fd(), NS_GET_NSTYPE as _) };
    if kind != libc::CLONE_NEWNET {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a network namespace", source.display()),
        ));
    }
    let inode = ns.metadata()?.ino();
    prepare_dir()?;
    let target = path(name);
    File::options().write(true).create_new(true).open(&target)?;
    // Mount what was checked, through the open descriptor (the path could change).
    let from = cstr(Path::new(&format!("/proc/self/fd/{}", ns.as_raw_fd())))?;
    let to = cstr(&target)?;
    // SAFETY: valid NUL-terminated strings that outlive the call.
    let mounted = check(unsafe {
        libc::mount(from.as_ptr(), to.as_ptr(), c"none".as_ptr(), libc::MS_BIND, std::ptr::null())
    });
    if let Err(e) = mounted {
        let _ = fs::remove_file(&target);
        return Err(e);
    }
    Ok(inode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_are_paths_never_reach_the_file_system() {
        for bad in ["../etc", "a/b", "", ".", "Upper", "x\0y"] {
            assert_eq!(
                create(bad).map_err(|e| e.kind()),
                Err(io::ErrorKind::InvalidInput),
                "{bad}"
            );
            assert_eq!(
                delete(bad).map_err(|e| e.kind()),
                Err(io::ErrorKind::InvalidInput),
                "{bad}"
            );
            let written = write_resolv_conf(bad, "x").map_err(|e| e.kind());
            assert_eq!(written, Err(io::ErrorKind::InvalidInput), "{bad}");
        }
        assert!(checked("ovt123a-s1").is_ok());
    }

    #[test]
    fn table_fulls_are_summed_over_cpus() {
        let text =
            "entries  allocs table_fulls\n00000022 000000b1 0000000a\n00000022 000000b4 00000001\n";
        assert_eq!(parse_table_fulls(text), Some(11));
        assert_eq!(parse_table_fulls("entries allocs\n1 2\n"), None);
        assert_eq!(parse_table_fulls("table_fulls\nzz\n"), None);
        assert_eq!(parse_table_fulls(""), None);
    }

    #[test]
    fn sysctl_keys_stay_under_proc_sys() {
        assert!(sysctl_path("net/ipv4/conf/all/rp_filter").is_ok());
        for bad in ["", "/etc/passwd", "../etc/passwd", "net/../../etc"] {
            assert!(sysctl_path(bad).is_err(), "{bad}");
        }
    }
}
