//! Attestation of PKCS#11 tokens: before the CA logs in to a token to hold a signer's key, an
//! [`Attestor`] looks at what the token says it is and approves it or says why not. Every
//! pkcs11 signer in the mesh config names one (there is no default that approves).
//!
//! Two plugins: [`AllowList`] (labels, serial numbers, manufacturers from the mesh config) and
//! [`ExternalCommand`] (a program that decides, e.g. an SGX quote verifier for a token that is
//! an enclave behind a PKCS#11 library).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hypha_config::mesh::Attestation;
pub use hypha_keys::pkcs11::TokenInfo;

use crate::CaError;

/// Approves a token for a CA key, or refuses it with a reason (the CA's error adds the signer,
/// the token and [`Attestor::describe`]).
pub trait Attestor: Send + Sync {
    /// `nonce` is fresh for each attestation (64 hex digits): a verifier that gets evidence from
    /// the token (a quote) binds the nonce into it, so an old answer cannot be replayed.
    fn attest(&self, token: &TokenInfo, nonce: &str) -> Result<(), String>;

    /// The policy, for logs and errors: `allow list`, `command /usr/libexec/verify`.
    fn describe(&self) -> String;
}

/// The attestor a mesh config's `attestation` block describes; `None` unless it names exactly
/// one plugin (validation reports that; this keeps an unvalidated config from approving).
pub fn from_config(a: &Attestation) -> Option<Box<dyn Attestor>> {
    match (&a.allow, &a.command) {
        (Some(allow), None) => Some(Box::new(AllowList {
            labels: allow.labels.clone(),
            serial_numbers: allow.serial_numbers.clone(),
            manufacturers: allow.manufacturers.clone(),
        })),
        (None, Some(c)) => Some(Box::new(ExternalCommand {
            path: PathBuf::from(&c.path),
            args: c.args.clone(),
            timeout: c.timeout.as_std(),
        })),
        _ => None,
    }
}

/// 32 random bytes, hex.
pub fn nonce() -> Result<String, CaError> {
    let mut bytes = [0u8; 32];
    boring::rand::rand_bytes(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Tokens allowed by what they report: a token passes if it matches every non-empty list. All
/// lists empty approves nothing.
#[derive(Debug, Clone, Default)]
pub struct AllowList {
    pub labels: Vec<String>,
    pub serial_numbers: Vec<String>,
    pub manufacturers: Vec<String>,
}

impl Attestor for AllowList {
    fn attest(&self, token: &TokenInfo, _nonce: &str) -> Result<(), String> {
        let lists = [
            ("label", &self.labels, &token.label),
            ("serial number", &self.serial_numbers, &token.serial_number),
            ("manufacturer", &self.manufacturers, &token.manufacturer_id),
        ];
        if lists.iter().all(|(_, list, _)| list.is_empty()) {
            return Err("the allow list is empty".into());
        }
        for (what, list, value) in lists {
            if !list.is_empty() && !list.contains(value) {
                return Err(format!(
                    "{what} {value:?} is not in the allow list {list:?}"
                ));
            }
        }
        Ok(())
    }

    fn describe(&self) -> String {
        "allow list".into()
    }
}

/// Largest answer read from the program, per stream.
const OUTPUT_LIMIT: u64 = 64 * 1024;

/// A program that decides. Contract (also in `docs/security.md`):
///
/// - input: one JSON object on stdin, then end of file: `module`, `label`, `manufacturerId`,
///   `model`, `serialNumber` (as the token reports them, padding trimmed) and `nonce`;
/// - environment: empty except `PATH` (the control plane's environment, which may hold the
///   token's PIN, is not handed on); arguments: `args` from the config;
/// - approval: exit status 0 and stdout, trimmed, exactly the nonce. Anything else refuses,
///   with the exit status and the first line of stderr as the reason; so does taking longer
///   than `timeout` (the program is killed).
#[derive(Debug, Clone)]
pub struct ExternalCommand {
    pub path: PathBuf,
    pub args: Vec<String>,
    pub timeout: Duration,
}

impl Attestor for ExternalCommand {
    fn attest(&self, token: &TokenInfo, nonce: &str) -> Result<(), String> {
        let input = serde_json::json!({
            "module": token.module.display().to_string(),
            "label": token.label,
            "manufacturerId": token.manufacturer_id,
            "model": token.model,
            "serialNumber": token.serial_number,
            "nonce": nonce,
        })
        .to_string();
        let mut cmd = Command::new(&self.path);
        cmd.args(&self.args)
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(path) = std::env::var_os("PATH") {
            cmd.env("PATH", path);
        }
        let mut child = cmd.spawn().map_err(|e| format!("cannot run it: {e}"))?;
        if let Some(mut stdin) = child.stdin.take() {
            // A few hundred bytes: fits the pipe, so this cannot block on a program that does
            // not read. One that exits without reading is judged by its answer, not this error.
            let _ = stdin.write_all(input.as_bytes());
        }
        // Readers on their own threads, so a program filling one pipe cannot stall the other
        // or the timeout.
        let stdout = read_all(child.stdout.take());
        let stderr = read_all(child.stderr.take());
        let deadline = Instant::now() + self.timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("no answer within {:?}; killed", self.timeout));
                }
                Err(e) => return Err(format!("waiting for it: {e}")),
            }
        };
        // The pipes close as the program exits, unless a child of it still holds them: wait
        // for the rest of its output until the deadline (and a moment, if that has passed).
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100));
        let out = stdout.recv_timeout(left).unwrap_or_default();
        if !status.success() {
            let err = stderr.recv_timeout(left).unwrap_or_default();
            let err = String::from_utf8_lossy(&err);
            let first = err.lines().next().unwrap_or("").trim();
            return Err(format!(
                "refused ({status}){}",
                if first.is_empty() {
                    String::new()
                } else {
                    format!(": {first}")
                }
            ));
        }
        if String::from_utf8_lossy(&out).trim() != nonce {
            return Err("exited 0 but did not answer with the nonce".into());
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!("command {}", self.path.display())
    }
}

/// Reads up to [`OUTPUT_LIMIT`] bytes of a pipe on a thread; the bytes arrive on the channel.
fn read_all(pipe: Option<impl Read + Send + 'static>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    if let Some(pipe) = pipe {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.take(OUTPUT_LIMIT).read_to_end(&mut buf);
            let _ = tx.send(buf);
        });
    }
    rx
}
