//! The control plane, as a child process: its log read for generation lines and problems.

use std::io::{BufRead, BufReader, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A `config generation N pushed to M proxies` line, when this process read it.
#[derive(Debug, Clone)]
pub(crate) struct GenerationLog {
    pub(crate) at: Instant,
    pub(crate) generation: u64,
    pub(crate) proxies: u64,
    pub(crate) took_ms: u64,
}

#[derive(Default)]
pub(crate) struct LogState {
    pub(crate) generations: Vec<GenerationLog>,
    /// WARN and ERROR lines (the first 100).
    pub(crate) problems: Vec<String>,
    pub(crate) problem_count: usize,
    /// The last lines, to show when the control plane dies.
    pub(crate) tail: std::collections::VecDeque<String>,
}

/// Kills and reaps the control plane when dropped (also on error or panic).
pub(crate) struct ControlPlane {
    child: Child,
    log: Arc<Mutex<LogState>>,
}

impl ControlPlane {
    /// `hypha control <source...> --listen addr`: `source` is `--config DIR`, or
    /// `--kubernetes --kubeconfig FILE`.
    pub(crate) fn spawn(
        bin: &Path,
        source: &[std::ffi::OsString],
        addr: SocketAddr,
        log_path: &Path,
    ) -> Result<Self> {
        let mut child = Command::new(bin)
            .arg("control")
            .args(source)
            .arg("--listen")
            .arg(addr.to_string())
            .env("HYPHA_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let log = Arc::new(Mutex::new(LogState::default()));
        let file = Arc::new(Mutex::new(
            std::fs::File::create(log_path)
                .with_context(|| format!("cannot create {}", log_path.display()))?,
        ));
        let stdout = child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>);
        let stderr = child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>);
        for stream in [stdout, stderr].into_iter().flatten() {
            let (log, file) = (log.clone(), file.clone());
            std::thread::spawn(move || read_log(stream, &log, &file));
        }
        Ok(ControlPlane { child, log })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let tail: Vec<String> = self.log().tail.iter().cloned().collect();
            bail!(
                "the control plane exited ({status}); its last lines:\n{}",
                tail.join("\n")
            );
        }
        Ok(())
    }

    pub(crate) fn log(&self) -> std::sync::MutexGuard<'_, LogState> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until the control plane accepts TCP on `addr`.
    pub(crate) async fn wait_listening(&mut self, addr: SocketAddr, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            self.check_alive()?;
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the control plane did not listen on {addr} within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn read_log(
    stream: Box<dyn std::io::Read + Send>,
    log: &Mutex<LogState>,
    file: &Mutex<std::fs::File>,
) {
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { break };
        let at = Instant::now();
        let line = strip_ansi(&line);
        if let Ok(mut f) = file.lock() {
            let _ = writeln!(f, "{line}");
        }
        let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
        if line.contains("config generation") && line.contains("pushed") {
            log.generations.push(GenerationLog {
                at,
                generation: field(&line, "generation=").unwrap_or(0),
                proxies: field(&line, "proxies=").unwrap_or(0),
                took_ms: field(&line, "took_ms=").unwrap_or(0),
            });
        }
        if line.contains(" WARN ") || line.contains(" ERROR ") {
            log.problem_count += 1;
            if log.problems.len() < 100 {
                log.problems.push(line.clone());
            }
        }
        if log.tail.len() == 50 {
            log.tail.pop_front();
        }
        log.tail.push_back(line);
    }
}

pub(crate) fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ params final-byte (0x40..=0x7e).
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The number after `key` (e.g. `took_ms=`) in a log line.
pub(crate) fn field(line: &str, key: &str) -> Option<u64> {
    let at = line.find(key)? + key.len();
    let digits: String = line[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

pub(crate) fn hypha_bin() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("HYPHA_BIN") {
        return Ok(PathBuf::from(bin));
    }
    // This benchmark runs as target/<profile>/deps/control_scale-<hash>; the binary is built
    // by `cargo build --release -p hypha` into target/release.
    let exe = std::env::current_exe()?;
    let target = exe
        .parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .context("cannot locate the target directory")?;
    let bin = target.join("release").join("hypha");
    if !bin.exists() {
        bail!(
            "{} not found: run `cargo build --release -p hypha` or set HYPHA_BIN",
            bin.display()
        );
    }
    Ok(bin)
}

pub(crate) fn free_port() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?)
}
