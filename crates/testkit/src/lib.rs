//! Test harness shared by Hypha's tests (a dev-dependency only): what a test that needs the
//! kernel's privileged parts (BPF, cgroups, later network namespaces) uses to set them up and
//! to skip loudly where it cannot run.

use std::io;
use std::net::TcpStream;
use std::path::{Path, PathBuf};

/// Whether a test that needs root may run. As root: yes. Otherwise it says loudly that `test`
/// did not run, and in CI (`CI` set, where tests run as root) it fails instead of skipping.
pub fn privileged(test: &str) -> bool {
    if euid() == Some(0) {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: needs root, and CI must run it"
    );
    eprintln!("!!! SKIPPED {test}: needs root (CI runs it as root) !!!");
    false
}

fn euid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The cgroup v2 mount point (`/sys/fs/cgroup` on a unified system, `/sys/fs/cgroup/unified`
/// on a hybrid one), from `/proc/self/mountinfo`.
pub fn cgroup2_root() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mount_point = left.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(mount_point))
    })
}

/// A cgroup v2 made for a test, with the whole test process in it while it lives (sockets
/// belong to the cgroup of the process that creates them); moved back and removed on drop.
/// Tests using one must not overlap within a process: hold a lock around them.
#[derive(Debug)]
pub struct TestCgroup {
    path: PathBuf,
    was: PathBuf,
}

impl TestCgroup {
    /// Creates `<cgroup2 root>/hypha-test-<pid>-<name>` and moves this process into it.
    pub fn enter(name: &str) -> TestCgroup {
        let root = cgroup2_root().expect("no cgroup v2 mount in /proc/self/mountinfo");
        let own = std::fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .expect("no cgroup v2 line in /proc/self/cgroup");
        let was = root.join(rel.trim_start_matches('/'));
        let path = root.join(format!("hypha-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir(&path);
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        std::fs::write(path.join("cgroup.procs"), std::process::id().to_string())
            .unwrap_or_else(|e| panic!("moving into {}: {e}", path.display()));
        TestCgroup { path, was }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let pid = std::process::id().to_string();
        if std::fs::write(self.was.join("cgroup.procs"), &pid).is_err() {
            if let Some(root) = cgroup2_root() {
                let _ = std::fs::write(root.join("cgroup.procs"), &pid);
            }
        }
        let _ = std::fs::remove_dir(&self.path);
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
