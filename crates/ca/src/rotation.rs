//! Root rotation without downtime (`hypha ca rotate --tenant T`), per signer, in three phases
//! recorded in `<data dir>/<signer>/rotation.json` so a restarted control plane resumes where
//! it was:
//!
//! 1. **Distributing**: the next generation's key and root exist; every bundle that trusts the
//!    signer's root trusts the new one too, while the old key still signs. The control plane
//!    moves on once every proxy has acknowledged its new bundle.
//! 2. **Issuing**: the new key signs; the old root stays trusted until every certificate it
//!    signed has expired (`retire_after`: the switch plus the signer's longest validity).
//! 3. Done: the new generation alone; the old key is deleted (a file) or destroyed (a token).
//!
//! A generation is a key and its root: generation 0 is the signer as first made (its dir,
//! its key label); generation `n` lives in `gen-<n>` under it, its token key labelled
//! `<key label>.gen<n>`. Only `hypha ca rotate` makes a generation; the control plane loads
//! them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use boring::x509::X509;
use hypha_config::MeshConfig;
use serde::{Deserialize, Serialize};

use crate::signer::{fingerprint, write_new, CERT_FILE, KEY_FILE};
use crate::tenants::{file_signer_dir, signer_common_name};
use crate::{CaError, FileSigner, Signer, TokenSigner, TokenSignerConfig};

/// A signer's rotation state, in its directory under the data dir.
pub const ROTATION_FILE: &str = "rotation.json";

/// Where a signer's rotation stands.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RotationState {
    /// The generation that signs when no rotation is under way (0: the signer as first made).
    pub generation: u32,
    /// The rotation under way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<Rotation>,
    /// The last rotation that completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<Completed>,
}

/// A rotation under way, from [`RotationState::generation`] to `to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rotation {
    pub to: u32,
    pub phase: Phase,
    /// Unix seconds.
    pub started: u64,
    /// When the new key began to sign (phase [`Phase::Issuing`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switched: Option<u64>,
    /// When the old root leaves the bundles: the last certificate the old key signed has
    /// expired by then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retire_after: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Phase {
    /// Both roots trusted, the old key signs, proxies are acknowledging the new bundle.
    Distributing,
    /// Both roots trusted, the new key signs, the old key's certificates are running out.
    Issuing,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Distributing => "distributing",
            Phase::Issuing => "issuing",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Completed {
    pub from: u32,
    pub to: u32,
    pub started: u64,
    pub finished: u64,
}

pub(crate) fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

impl RotationState {
    /// The state in `dir` (a signer's directory under the data dir); none yet: generation 0.
    pub fn read(dir: &Path) -> Result<RotationState, CaError> {
        let path = dir.join(ROTATION_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| CaError::Rotation(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RotationState::default()),
            Err(e) => Err(CaError::io(&path)(e)),
        }
    }

    /// Replaces the state in `dir` whole (a temp file renamed over it).
    pub fn write(&self, dir: &Path) -> Result<(), CaError> {
        std::fs::create_dir_all(dir).map_err(CaError::io(dir))?;
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| CaError::Rotation(format!("encoding the rotation state: {e}")))?;
        write_new(&dir.join(ROTATION_FILE), &json, 0o644)
    }

    /// The generation whose key signs now.
    pub fn signing(&self) -> u32 {
        match &self.rotation {
            Some(r) if r.phase == Phase::Issuing => r.to,
            _ => self.generation,
        }
    }

    /// The other generation whose root is trusted besides the signing one's, mid-rotation.
    pub fn also_trusted(&self) -> Option<u32> {
        let r = self.rotation.as_ref()?;
        Some(if r.phase == Phase::Issuing {
            self.generation
        } else {
            r.to
        })
    }

    /// What `hypha ca status` and metrics call the state: `idle`, `distributing`, `issuing`.
    pub fn phase(&self) -> &'static str {
        self.rotation.as_ref().map_or("idle", |r| r.phase.as_str())
    }

    /// The next state, if it is time for one: Distributing moves on once `acknowledged` (every
    /// proxy has the bundle with both roots); Issuing ends at `retire_after`.
    pub fn advance(
        &self,
        acknowledged: bool,
        now: SystemTime,
        max_validity: Duration,
    ) -> Option<Self> {
        let r = self.rotation.as_ref()?;
        let now = unix(now);
        match r.phase {
            Phase::Distributing if acknowledged => Some(RotationState {
                rotation: Some(Rotation {
                    phase: Phase::Issuing,
                    switched: Some(now),
                    retire_after: Some(now + max_validity.as_secs()),
                    ..r.clone()
                }),
                ..self.clone()
            }),
            Phase::Issuing if r.retire_after.is_some_and(|t| now >= t) => Some(RotationState {
                generation: r.to,
                rotation: None,
                last: Some(Completed {
                    from: self.generation,
                    to: r.to,
                    started: r.started,
                    finished: now,
                }),
            }),
            _ => None,
        }
    }
}

/// Where generation `n` of a signer keeps its root (and, for a file signer, its key).
pub fn generation_dir(base: &Path, n: u32) -> PathBuf {
    if n == 0 {
        base.to_path_buf()
    } else {
        base.join(format!("gen-{n}"))
    }
}

/// The token key label of generation `n`.
pub fn generation_label(label: &str, n: u32) -> String {
    if n == 0 {
        label.to_owned()
    } else {
        format!("{label}.gen{n}")
    }
}

/// Where a signer's rotation state lives: `<data dir>/<signer>` (its roots' home too).
pub fn state_dir(data_dir: &Path, signer: &str) -> PathBuf {
    data_dir.join(signer)
}

/// Where generation `n` of the signer `cfg` keeps its root.
fn root_dir(cfg: &hypha_config::mesh::Signer, data_dir: &Path, n: u32) -> PathBuf {
    match &cfg.key.pkcs11 {
        Some(_) => generation_dir(&data_dir.join(&cfg.name), n),
        None => generation_dir(&file_signer_dir(cfg, data_dir).unwrap_or_default(), n),
    }
}

/// Generation `n`'s root, read from its directory (no key or token is opened).
pub fn generation_root(
    cfg: &hypha_config::mesh::Signer,
    data_dir: &Path,
    n: u32,
) -> Result<X509, CaError> {
    let path = root_dir(cfg, data_dir, n).join(CERT_FILE);
    Ok(X509::from_pem(
        &std::fs::read(&path).map_err(CaError::io(&path))?,
    )?)
}

/// Opens generation `n` of the signer `cfg` (blocks on a token: see [`crate::token`]).
/// Generation 0 is made on first start; a later one must exist, since only
/// [`start`] makes it (`create`).
pub fn open_generation(
    mesh: &MeshConfig,
    cfg: &hypha_config::mesh::Signer,
    data_dir: &Path,
    n: u32,
    create: bool,
) -> Result<Arc<dyn Signer>, CaError> {
    let common_name = signer_common_name(&cfg.name);
    let root_dir = root_dir(cfg, data_dir, n);
    if n > 0 && !create && !root_dir.join(CERT_FILE).exists() {
        return Err(CaError::Rotation(format!(
            "signer {:?}: generation {n} has no root in {}; `hypha ca rotate` makes it",
            cfg.name,
            root_dir.display()
        )));
    }
    Ok(match &cfg.key.pkcs11 {
        Some(p) => {
            let mut token = TokenSignerConfig::from_mesh(&cfg.name, p)?;
            token.key_label = generation_label(&p.key_label, n);
            Arc::new(TokenSigner::open_or_create(
                &token,
                &root_dir,
                &mesh.trust_domain,
                &common_name,
            )?)
        }
        None => Arc::new(FileSigner::open_or_create(
            &root_dir,
            &mesh.trust_domain,
            &common_name,
        )?),
    })
}

/// A rotation that [`start`] began.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    pub signer: String,
    /// Every tenant the signer signs for (they rotate together).
    pub tenants: Vec<String>,
    pub from: u32,
    pub to: u32,
    pub old_root: String,
    pub new_root: String,
}

/// `hypha ca rotate --tenant T`: makes the next generation of `tenant`'s signer (a key in its
/// token, or a key file) and records phase 1; the control plane does the rest. Refused while
/// a rotation of that signer is under way. Blocks on a token.
pub fn start(mesh: &MeshConfig, data_dir: &Path, tenant: &str) -> Result<Started, CaError> {
    let t = mesh
        .tenants
        .iter()
        .find(|t| t.name == tenant)
        .ok_or_else(|| CaError::UnknownTenant(tenant.into()))?;
    let cfg = crate::tenants::signer_of(mesh, t)?;
    let dir = state_dir(data_dir, &cfg.name);
    let state = RotationState::read(&dir)?;
    if let Some(r) = &state.rotation {
        return Err(CaError::Rotation(format!(
            "signer {:?} is already rotating (phase {}, to generation {}); see `hypha ca status`",
            cfg.name,
            r.phase.as_str(),
            r.to
        )));
    }
    let old = open_generation(mesh, cfg, data_dir, state.generation, false)?;
    let to = state.generation + 1;
    let new = open_generation(mesh, cfg, data_dir, to, true)?;
    RotationState {
        rotation: Some(Rotation {
            to,
            phase: Phase::Distributing,
            started: unix(SystemTime::now()),
            switched: None,
            retire_after: None,
        }),
        ..state.clone()
    }
    .write(&dir)?;
    tracing::info!(signer = %cfg.name, from = state.generation, to, new_root = %fingerprint(new.certificate()), "root rotation started");
    Ok(Started {
        signer: cfg.name.clone(),
        tenants: mesh
            .tenants
            .iter()
            .filter(|x| x.signer == cfg.name)
            .map(|x| x.name.clone())
            .collect(),
        from: state.generation,
        to,
        old_root: fingerprint(old.certificate()),
        new_root: fingerprint(new.certificate()),
    })
}

/// After a rotation from generation `old` completed: a file key is deleted (its root stays, as
/// a record); a token key stays in the token, where only its owner can destroy it (named in
/// the log).
pub fn retire(cfg: &hypha_config::mesh::Signer, data_dir: &Path, old: u32) -> Result<(), CaError> {
    match &cfg.key.pkcs11 {
        Some(p) => {
            tracing::warn!(signer = %cfg.name, token = %p.token_label, key = %generation_label(&p.key_label, old), "rotation done: the retired CA key is no longer used; destroy it in its token");
            Ok(())
        }
        None => {
            let dir = generation_dir(&file_signer_dir(cfg, data_dir).unwrap_or_default(), old);
            let key = dir.join(KEY_FILE);
            match std::fs::remove_file(&key) {
                Ok(()) => {
                    tracing::info!(signer = %cfg.name, key = %key.display(), "rotation done: the retired CA key file is deleted");
                    Ok(())
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(CaError::io(&key)(e)),
            }
        }
    }
}
