//! `overlay-cni`, the binary a container runtime executes: reads the `CNI_*` environment
//! and the configuration on stdin, makes at most one request to the local agent over its
//! unix socket, and prints the result (exit 0) or a CNI error object (exit 1) on stdout,
//! as the specification asks. Everything it decides is in the library ([`plugin`]); this
//! file is only the I/O, and it never panics on its input.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use overlay_cni::plugin::{self, Step};
use overlay_cni::protocol::{self, Reply, Request, MAX_LINE};
use overlay_cni::spec::{code, CniError};

/// The agent bounds its own work (controller calls, waiting for the kernel) well below
/// this; it only guards against an agent that hangs.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);
const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a socket with no agent behind it (missing, or refusing: the agent is
/// restarting, e.g. upgraded by systemd) is tried again before giving up.
const CONNECT_PATIENCE: Duration = Duration::from_secs(10);
const CONNECT_RETRY: Duration = Duration::from_millis(100);
/// A network configuration is a few hundred bytes; this is plenty.
const MAX_STDIN: u64 = 1024 * 1024;

fn main() -> ExitCode {
    // A bug must still end as a CNI error, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let e = CniError::new(code::INTERNAL, "overlay-cni failed", info.to_string());
        println!("{}", e.to_json());
    }));
    let get = |name: &str| std::env::var(name).ok();
    // Run by hand (no CNI_COMMAND): say what this is without waiting for stdin.
    let mut stdin = Vec::new();
    if get("CNI_COMMAND").is_some_and(|c| !c.is_empty()) {
        if let Err(e) = std::io::stdin().take(MAX_STDIN).read_to_end(&mut stdin) {
            return fail(&CniError::new(
                code::IO_FAILURE,
                "error reading from stdin",
                e.to_string(),
            ));
        }
    }
    match plugin::prepare(&get, &stdin) {
        Err(e) => fail(&e),
        Ok(Step::About(text)) => {
            eprintln!("{text}");
            ExitCode::SUCCESS
        }
        Ok(Step::Print(text)) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Ok(Step::Ask(ask)) => {
            let plugin::Ask { socket, request, context } = *ask;
            let reply = match exchange(&socket, &request) {
                Ok(reply) => reply,
                Err(why) => return fail(&plugin::agent_unreachable(&context, &socket, &why)),
            };
            match plugin::finish(&context, reply) {
                Ok(Some(out)) => {
                    println!("{out}");
                    ExitCode::SUCCESS
                }
                Ok(None) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            }
        }
    }
}

/// The error object on stdout (what runtimes read) and as a line on stderr (their logs).
fn fail(e: &CniError) -> ExitCode {
    println!("{}", e.to_json());
    eprintln!("overlay-cni: {e}");
    ExitCode::FAILURE
}

/// Connects to the agent, waiting up to [`CONNECT_PATIENCE`] for one that is
/// (re)starting.
fn connect(socket: &str) -> Result<UnixStream, String> {
    let deadline = Instant::now() + CONNECT_PATIENCE;
    loop {
        let e = match UnixStream::connect(socket) {
            Ok(s) => return Ok(s),
            Err(e) => e,
        };
        let no_agent = matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
        );
        if !no_agent {
            return Err(format!("connecting: {e}"));
        }
        if Instant::now() >= deadline {
            return Err(format!("connecting: {e} (for {}s)", CONNECT_PATIENCE.as_secs()));
        }
        std::thread::sleep(CONNECT_RETRY);
    }
}

/// One request, one reply.
fn exchange(socket: &str, request: &Request) -> Result<Reply, String> {
    let mut stream = connect(socket)?;
    stream.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(|e| e.to_string())?;
    stream.set_write_timeout(Some(SEND_TIMEOUT)).map_err(|e| e.to_string())?;
    let line = protocol::encode(request).map_err(|e| format!("encoding the request: {e}"))?;
    stream.write_all(line.as_bytes()).map_err(|e| format!("sending the request: {e}"))?;
    let mut answer = String::new();
    let read = BufReader::new(stream.take(MAX_LINE as u64 + 1)).read_line(&mut answer).map_err(
        |e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                format!("no answer within {}s", REPLY_TIMEOUT.as_secs())
            }
            _ => format!("reading the answer: {e}"),
        },
    )?;
    if read == 0 {
        return Err("the agent closed the connection without answering".into());
    }
    protocol::decode(&answer).map_err(|e| format!("cannot read the agent's answer: {e}"))
}
