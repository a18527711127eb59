//! What starting a backing service from a test needs, whichever the service: children
//! that die with the test process, commands run to completion, free ports, and the
//! directories of test processes that are gone.

use std::io;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock, mpsc};

/// Environment variable that, set to anything but `0` or empty, makes a missing backing
/// service fail the tests that need it instead of skipping them.
pub const REQUIRE_VAR: &str = "REQUIRE_REAL_CLIENTS";

/// Whether tests must fail rather than skip when a real backing service is missing.
pub fn required() -> bool {
    std::env::var(REQUIRE_VAR).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Spawn `command` from a thread that lives as long as the process: the parent-death
/// signal fires when the spawning *thread* exits, and a test's thread ends with the test.
pub(crate) fn spawn_from_lasting_thread(command: Command) -> io::Result<Child> {
    type Request = (Command, mpsc::Sender<io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (requests, incoming) = mpsc::channel::<Request>();
        std::thread::spawn(move || {
            for (mut command, reply) in incoming {
                let _ = reply.send(command.spawn());
            }
            // Keep the thread, so the children spawned here live on.
            loop {
                std::thread::park();
            }
        });
        Mutex::new(requests)
    });
    let (reply, answer) = mpsc::channel();
    spawner
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send((command, reply))
        .map_err(|_| io::Error::other("the spawning thread is gone"))?;
    answer
        .recv()
        .map_err(|_| io::Error::other("the spawning thread is gone"))?
}

/// Run `command` to completion; an error, with its stderr, unless it succeeds.
pub(crate) fn run(command: &mut Command) -> io::Result<Output> {
    let output = command.stdin(Stdio::null()).output()?;
    if output.status.success() {
        return Ok(output);
    }
    Err(io::Error::other(format!(
        "{:?} failed with {}: {}",
        command.get_program(),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    )))
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub(crate) fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Remove the temporary directories named `<prefix><pid>-…` of test processes that no
/// longer exist (a process killed, or a shared service, which is never dropped).
pub(crate) fn remove_abandoned(prefix: &str) {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if !pid.is_empty() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
