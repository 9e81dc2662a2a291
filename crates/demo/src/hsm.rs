//! `hypha demo --keys pkcs11`: SoftHSM2 tokens for the mesh, made in the demo's own directory.
//! The control plane's CA signers and every sidecar generate their private keys inside a token
//! (sensitive, never extractable) and use them only through it.
//!
//! One token per process, each in a token directory of its own (its own `softhsm2.conf`, given
//! to that process alone as `SOFTHSM2_CONF`), rather than one token for the whole mesh:
//! - it mirrors production, one HSM or enclave per pod, and a process sees no token but its own;
//! - a shared token means a shared PIN, and whoever holds it may sign with every key in the
//!   token: a sidecar could sign certificates with the CA's persistent key;
//! - SoftHSM2 does let several processes share a token directory (lock files and a generation
//!   counter make each reload the others' changes), but nothing here needs that to hold under
//!   load: one directory per process has no writers but its owner.
//!
//! Layout under `<demo dir>/hsm/` (0700): `<name>.conf`, `<name>.pin` (the user PIN, 0600) and
//! `store/<name>/`, SoftHSM2's own files, which are the token itself.

use std::path::{Path, PathBuf};

use crate::DemoError;

/// The SoftHSM2 PKCS#11 module (Debian's `softhsm2`).
pub use hypha_keys::softhsm::MODULE;
/// The directory (under the hsm directory) of the token stores.
pub const STORE: &str = "store";

/// One process's token.
#[derive(Debug, Clone)]
pub struct Token {
    /// The token's label (what `--pkcs11-token` and `tokenLabel` name).
    pub label: String,
    /// The SoftHSM2 config that process gets as `SOFTHSM2_CONF`.
    pub conf: PathBuf,
    /// The user PIN, first line (0600).
    pub pin_file: PathBuf,
}

impl Token {
    /// The environment the process needs to see its token (and no other).
    pub fn env(&self) -> Vec<(String, PathBuf)> {
        vec![("SOFTHSM2_CONF".to_owned(), self.conf.clone())]
    }

    /// `hypha proxy` flags that keep the workload key in this token.
    pub fn proxy_args(&self) -> Vec<String> {
        vec![
            "--pkcs11-module".into(),
            MODULE.into(),
            "--pkcs11-token".into(),
            self.label.clone(),
            "--pkcs11-pin-file".into(),
            self.pin_file.display().to_string(),
        ]
    }
}

/// An error unless SoftHSM2 (its module and `softhsm2-util`) is installed.
pub fn check_installed() -> Result<(), DemoError> {
    hypha_keys::softhsm::check_installed().map_err(DemoError::NoSoftHsm)
}

/// The token label for a process of the mesh (at most 32 characters, as PKCS#11 allows).
pub fn label(name: &str) -> String {
    let mut label = format!("hypha-{name}");
    label.truncate(32);
    label
}

/// Makes a fresh token for each of `names` under `dir`, with random PINs. Blocking (it runs
/// `softhsm2-util`, a few milliseconds a token).
pub fn create(dir: &Path, names: &[&str]) -> Result<Vec<Token>, DemoError> {
    use std::os::unix::fs::PermissionsExt;
    check_installed()?;
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |e: std::io::Error| DemoError::Io(p, e)
    };
    std::fs::create_dir_all(dir.join(STORE)).map_err(io(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
    let mut tokens = Vec::new();
    for name in names {
        let token_err = |e: hypha_keys::KeyError| DemoError::Token {
            label: label(name),
            reason: e.to_string(),
        };
        let dir_of_tokens = hypha_keys::softhsm::TokenDir::create(
            &dir.join(format!("{name}.conf")),
            &dir.join(STORE).join(name),
        )
        .map_err(token_err)?;
        let token = Token {
            label: label(name),
            conf: dir_of_tokens.conf.clone(),
            pin_file: dir.join(format!("{name}.pin")),
        };
        // A random user PIN, written 0600 before the token exists.
        let pin = crate::mesh::random_hex(16)?;
        crate::mesh::write_secret(&token.pin_file, &pin)?;
        dir_of_tokens
            .init_token(&token.label, &pin)
            .map_err(token_err)?;
        tokens.push(token);
    }
    Ok(tokens)
}
