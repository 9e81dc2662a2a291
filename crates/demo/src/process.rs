//! Child processes of the demo: each one the `hypha` binary with a subcommand, its output in
//! a log file, killed (and reaped) when its handle is dropped, so an error, a panic or Ctrl-C
//! in the demo leaves nothing running.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

use crate::DemoError;

/// Environment variables `hypha` reads as defaults for its flags (`HYPHA_LOG` stays).
const INHERITED_SETTINGS: [&str; 6] = [
    "HYPHA_CONFIG",
    "HYPHA_CONTROL_PLANE",
    "HYPHA_NAMESPACE",
    "HYPHA_SERVICE_ACCOUNT",
    "HYPHA_WORKLOAD",
    "HYPHA_NODE_ID",
];

/// A running child.
pub struct Proc {
    pub name: String,
    pub log: PathBuf,
    child: Child,
}

impl Proc {
    /// Starts `exe args...` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, exe: &Path, args: &[String], log: &Path) -> Result<Proc, DemoError> {
        Proc::spawn_with_env(name, exe, args, &[], log)
    }

    /// [`Proc::spawn`] with extra environment variables (settings meant for this child only,
    /// such as its own `SOFTHSM2_CONF`).
    pub fn spawn_with_env(
        name: &str,
        exe: &Path,
        args: &[String],
        env: &[(String, PathBuf)],
        log: &Path,
    ) -> Result<Proc, DemoError> {
        let mut cmd = Command::new(exe);
        cmd.args(args);
        Proc::spawn_command(name, cmd, env, log)
    }

    /// Starts `cmd` as it is (e.g. `ip netns exec <pod> hypha ...`), with `env` added and
    /// stdout and stderr appended to `log`.
    pub fn spawn_command(
        name: &str,
        mut cmd: Command,
        env: &[(String, PathBuf)],
        log: &Path,
    ) -> Result<Proc, DemoError> {
        let io = |e| DemoError::Io(log.to_path_buf(), e);
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(io)?;
        let err = out.try_clone().map_err(io)?;
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // Plain text in the log files.
            .env("NO_COLOR", "1");
        // The demo passes every setting as a flag; one inherited from the user's shell (a
        // node id, say) would apply to every sidecar at once.
        for var in INHERITED_SETTINGS {
            cmd.env_remove(var);
        }
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        let child = cmd.spawn().map_err(|source| DemoError::Spawn {
            name: name.to_owned(),
            exe: PathBuf::from(cmd.get_program()),
            source,
        })?;
        Ok(Proc {
            name: name.to_owned(),
            log: log.to_path_buf(),
            child,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The last `lines` lines of its log.
    pub fn tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }

    /// Whether its log has `text` in its last 64 KiB (a line it writes once ready).
    pub fn logged(&self, text: &str) -> bool {
        self.tail(usize::MAX).contains(text)
    }

    /// Whether it failed because one of its ports was taken meanwhile (it is then worth
    /// restarting on other ports).
    pub fn lost_a_port(&self) -> bool {
        let t = self.tail(20);
        t.contains("cannot listen on") || t.contains("Address already in use")
    }

    /// The error for a process that exited.
    pub fn exit_error(&self, status: ExitStatus) -> DemoError {
        DemoError::Exited {
            name: self.name.clone(),
            status: status.to_string(),
            log: self.log.clone(),
            tail: self.tail(15),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last `lines` lines of a file (at most its last 64 KiB are read).
pub fn tail(path: &Path, lines: usize) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
