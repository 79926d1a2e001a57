//! End-to-end testing support for overlay: [`lab`] builds a multi-host cluster out of
//! network namespaces on this machine and runs the real binaries in it; [`bench`] holds
//! the measuring helpers of the benchmark binaries; [`frames`] crafts the packets of
//! tests that play an attacker on the underlay; [`prom`] scrapes and parses `/metrics`;
//! [`podman`] runs real containers on a lab host through overlay-cni.
//!
//! It must never send traffic anywhere but loopback and the namespaces it created, and
//! must leave nothing behind (every namespace it causes is removed on drop).

pub mod bench;
pub mod frames;
pub mod lab;
pub mod podman;
pub mod prom;
