//! Test harness shared by Hypha's tests (a dev-dependency only): what a test that needs the
//! kernel's privileged parts (BPF, cgroups, later network namespaces) uses to set them up and
//! to skip loudly where it cannot run.

use std::io;
use std::net::TcpStream;
use std::path::Path;

/// Whether a test that needs root may run. As root: yes. Otherwise it says loudly that `test`
/// did not run, and in CI (`CI` set, where tests run as root) it fails instead of skipping.
pub fn privileged(test: &str) -> bool {
    if hypha_pod::is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: needs root, and CI must run it"
    );
    eprintln!("!!! SKIPPED {test}: needs root (CI runs it as root) !!!");
    false
}

pub use hypha_pod::cgroup2_root;

/// A cgroup v2 made for a test, with the whole test process in it while it lives (sockets
/// belong to the cgroup of the process that creates them); moved back and removed on drop.
/// Tests using one must not overlap within a process: hold a lock around them.
#[derive(Debug)]
pub struct TestCgroup(hypha_pod::Cgroup);

impl TestCgroup {
    /// Creates `<cgroup2 root>/hypha-test-<pid>-<name>` and moves this process into it.
    pub fn enter(name: &str) -> TestCgroup {
        let name = format!("hypha-test-{}-{name}", std::process::id());
        TestCgroup(hypha_pod::Cgroup::enter(&name).unwrap_or_else(|e| panic!("{name}: {e}")))
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

/// Bytes the loopback interface has received so far (it sends what it receives), from
/// `/proc/net/dev`: a transfer that bypasses the TCP/IP stack barely moves it.
pub fn loopback_bytes() -> u64 {
    let dev = std::fs::read_to_string("/proc/net/dev").expect("/proc/net/dev");
    dev.lines()
        .find_map(|l| l.trim_start().strip_prefix("lo:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|b| b.parse().ok())
        .expect("no lo in /proc/net/dev")
}

pub use hypha_bypass::read_some;

/// Reads to the end of the stream with [`read_some`].
pub fn read_to_end(s: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = read_some(s, &mut buf)?;
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&buf[..n]);
    }
}
