//! What overlay's long-running daemons (`overlay-controller`, `overlay-agent`) offer
//! their supervisor and their operators, in one place so both binaries behave alike:
//!
//! * [`notify`]: systemd's `sd_notify` (`READY=1`, `WATCHDOG=1`, `STATUS=…`);
//! * [`metrics`]: Prometheus metrics: the registry helpers both daemons use, values
//!   computed at scrape time ([`metrics::Scraped`]), and the text encoding;
//! * [`http`]: the minimal HTTP/1.1 server of `GET /metrics` behind `--metrics-listen`;
//! * [`blocking`]: disk writes from async code without stalling the runtime.
//!
//! It never decides anything about the overlay itself and never panics on what a
//! scraper sends.

pub mod blocking;
pub mod http;
pub mod metrics;
pub mod notify;
