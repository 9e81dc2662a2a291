//! SoftHSM2 (Debian's `softhsm2`) tokens made on the spot in a directory of their own: the real
//! PKCS#11 token of `hypha demo --keys pkcs11` and of the tests.
//!
//! SoftHSM2 finds its tokens through the config file named by `SOFTHSM2_CONF`, read once per
//! process when the module loads: a process sees the tokens of the [`TokenDir`] whose `conf` it
//! was given, and no other.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::KeyError;

/// The SoftHSM2 PKCS#11 module.
pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// The tool that initializes tokens.
const UTIL: &str = "softhsm2-util";

fn backend(e: impl std::fmt::Display) -> KeyError {
    KeyError::Backend(e.to_string())
}

/// Whether SoftHSM2 (the module and its tool) is installed; what is missing if not.
pub fn check_installed() -> Result<(), String> {
    if !Path::new(MODULE).exists() {
        return Err(format!("{MODULE} does not exist"));
    }
    match Command::new(UTIL).arg("--version").output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!("`{UTIL} --version` failed ({})", out.status)),
        Err(e) => Err(format!("cannot run {UTIL}: {e}")),
    }
}

/// For tests that need a token: `true` when SoftHSM2 is installed; outside CI, `false` after a
/// loud note (the test then returns); in CI (`CI` set) a missing SoftHSM2 is a failure, since
/// `scripts/setup` installs it.
pub fn available_for_tests() -> bool {
    match check_installed() {
        Ok(()) => true,
        Err(why) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "SoftHSM2 is missing in CI ({why}): scripts/setup installs it"
            );
            eprintln!("!!! SKIPPED: SoftHSM2 is not installed ({why}); run scripts/setup");
            false
        }
    }
}

/// For tests: tokens labelled `labels` (user PIN `1234`, also in `dir/pin`) in a new token
/// directory under `dir`, and `SOFTHSM2_CONF` naming it. The library reads that variable once
/// per process: call this before anything loads the module. Returns the PIN file.
pub fn tokens_for_tests(dir: &Path, labels: &[&str]) -> Result<PathBuf, KeyError> {
    let tokens = TokenDir::create_in(dir)?;
    std::env::set_var("SOFTHSM2_CONF", &tokens.conf);
    for label in labels {
        tokens.init_token(label, "1234")?;
    }
    let pin = dir.join("pin");
    std::fs::write(&pin, "1234\n").map_err(|e| backend(format!("{}: {e}", pin.display())))?;
    Ok(pin)
}

/// A SoftHSM2 token directory and the config that points at it.
#[derive(Debug, Clone)]
pub struct TokenDir {
    /// What `SOFTHSM2_CONF` must name.
    pub conf: PathBuf,
    /// SoftHSM2's own files: the tokens themselves.
    pub store: PathBuf,
}

impl TokenDir {
    /// Creates `store` and writes `conf` pointing at it (file object store, errors only in
    /// SoftHSM2's log).
    pub fn create(conf: &Path, store: &Path) -> Result<TokenDir, KeyError> {
        std::fs::create_dir_all(store).map_err(|e| backend(format!("{}: {e}", store.display())))?;
        std::fs::write(
            conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                store.display()
            ),
        )
        .map_err(|e| backend(format!("{}: {e}", conf.display())))?;
        Ok(TokenDir {
            conf: conf.to_path_buf(),
            store: store.to_path_buf(),
        })
    }

    /// `dir/softhsm2.conf` for tokens in `dir/tokens`.
    pub fn create_in(dir: &Path) -> Result<TokenDir, KeyError> {
        Self::create(&dir.join("softhsm2.conf"), &dir.join("tokens"))
    }

    /// Initializes a token labelled `label` with user PIN `pin` in the first free slot. The
    /// security officer's PIN is random and kept nowhere: nobody administers these tokens.
    /// The PINs are on the tool's command line for the instant it runs (it has no other
    /// non-interactive way); errors never carry them.
    pub fn init_token(&self, label: &str, pin: &str) -> Result<(), KeyError> {
        let mut so = [0u8; 16];
        boring::rand::rand_bytes(&mut so)?;
        let so_pin: String = so.iter().map(|b| format!("{b:02x}")).collect();
        let out = Command::new(UTIL)
            .env("SOFTHSM2_CONF", &self.conf)
            .args(["--init-token", "--free", "--label", label])
            .args(["--pin", pin, "--so-pin", &so_pin])
            .output()
            .map_err(|e| backend(format!("cannot run {UTIL}: {e}")))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(backend(format!(
                "{UTIL} --init-token {label:?}: {} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }
}
