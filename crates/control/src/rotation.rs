//! The control plane's side of a signer's root rotation (`hypha_ca::rotation` has the phases
//! and the files): every poll of [`crate::security::Secure::watch`], a rotation state changed on
//! disk is put in force (the CA's signers swapped, every trust bundle made again and pushed,
//! the control plane's own TLS trusting both roots), and a phase whose condition holds moves
//! on: Distributing once every connected proxy has acknowledged its new bundle, Issuing once
//! the old key's last certificate has expired.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use hypha_ca::rotation::{self, RotationState};
use hypha_ca::Ca;
use hypha_config::MeshConfig;

use crate::security::SecurityError;
use crate::server::ControlPlane;

/// Each signer's rotation state as last put in force.
#[derive(Debug)]
pub struct Rotations {
    applied: Mutex<HashMap<String, RotationState>>,
    /// Whether this process moves phases on (from files: yes; replicas on a cluster: no, their
    /// leader does, from every replica's report; see `hypha_kube::rotation`).
    advance_here: AtomicBool,
    /// Whether, at the last step, every proxy connected here had acknowledged the bundle of
    /// the states in force (false from the moment a new state is put in force).
    acknowledged: AtomicBool,
}

/// What one step did, for logs and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A state read from disk was put in force (signers swapped, bundles pushed).
    Applied { signer: String, phase: &'static str },
    /// A phase moved on (written to disk; put in force by the next step).
    Advanced { signer: String, phase: &'static str },
}

impl Rotations {
    /// The states `Ca::from_mesh` opened the signers at.
    pub fn read(mesh: &MeshConfig, data_dir: &Path) -> Rotations {
        let applied = mesh
            .signers
            .iter()
            .filter_map(|s| {
                let state = RotationState::read(&rotation::state_dir(data_dir, &s.name)).ok()?;
                Some((s.name.clone(), state))
            })
            .collect();
        Rotations {
            applied: Mutex::new(applied),
            advance_here: AtomicBool::new(true),
            acknowledged: AtomicBool::new(false),
        }
    }

    /// Leaves moving phases on to someone else (a cluster's leader); this process still puts
    /// in force what it reads and reports whether its proxies acknowledged it.
    pub fn advance_elsewhere(&self) {
        self.advance_here.store(false, Ordering::SeqCst);
    }

    /// The states in force and whether every proxy connected here has acknowledged their
    /// bundles: this replica's report.
    pub fn report(&self) -> (Vec<(String, RotationState)>, bool) {
        // Read in this order: a state put in force clears the flag first.
        let acknowledged = self.acknowledged.load(Ordering::SeqCst);
        (self.states(), acknowledged)
    }

    /// Each signer's state in force: what `/metrics` reports.
    pub fn states(&self) -> Vec<(String, RotationState)> {
        let mut out: Vec<_> = self
            .applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn applied(&self, signer: &str) -> Option<RotationState> {
        self.applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(signer)
            .cloned()
    }

    fn set_applied(&self, signer: &str, state: RotationState) {
        self.applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(signer.to_owned(), state);
    }

    /// One step for every signer a tenant uses. Blocking work (opening a token) runs off the
    /// async workers.
    pub async fn step(
        &self,
        mesh: &MeshConfig,
        data_dir: &Path,
        ca: &Arc<Ca>,
        cp: &ControlPlane,
    ) -> Result<Vec<Step>, SecurityError> {
        let mut steps = Vec::new();
        // Judged once, before anything new is put in force (a push never takes away a root
        // another signer is distributing), and recorded only if nothing was.
        let acked = cp.trust_acknowledged();
        for cfg in mesh
            .signers
            .iter()
            .filter(|s| mesh.tenants.iter().any(|t| t.signer == s.name))
        {
            let dir = rotation::state_dir(data_dir, &cfg.name);
            let state = RotationState::read(&dir)?;
            if self.applied(&cfg.name).as_ref() != Some(&state) {
                let (mesh2, cfg2, data) = (mesh.clone(), cfg.clone(), data_dir.to_path_buf());
                let (signer, also) = tokio::task::spawn_blocking(move || {
                    hypha_ca::open_signer(&mesh2, &cfg2, &data)
                })
                .await
                .map_err(|e| SecurityError::Task(e.to_string()))??;
                let tenants: Vec<String> = mesh
                    .tenants
                    .iter()
                    .filter(|t| t.signer == cfg.name)
                    .map(|t| t.name.clone())
                    .collect();
                self.acknowledged.store(false, Ordering::SeqCst);
                ca.set_signer(&tenants, signer, also);
                let g = cp.set_signer_roots(crate::security::signer_roots(mesh, ca)?);
                tracing::info!(signer = %cfg.name, phase = state.phase(), signing = state.signing(), generation = g.number, proxies = g.proxies, "root rotation: state in force, trust bundles pushed");
                if let (Some(done), None) = (&state.last, &state.rotation) {
                    // The old key signs no more and its certificates have expired.
                    if self
                        .applied(&cfg.name)
                        .is_some_and(|before| before.rotation.is_some())
                    {
                        rotation::retire(cfg, data_dir, done.from)?;
                    }
                }
                steps.push(Step::Applied {
                    signer: cfg.name.clone(),
                    phase: state.phase(),
                });
                self.set_applied(&cfg.name, state);
                // Judged at the next step, once the proxies have had the push.
                continue;
            }
            if !self.advance_here.load(Ordering::SeqCst) {
                continue;
            }
            let next = state.advance(
                acked.everywhere(),
                SystemTime::now(),
                cfg.max_certificate_ttl.0,
            );
            match next {
                Some(next) => {
                    next.write(&dir)?;
                    tracing::info!(signer = %cfg.name, phase = next.phase(), proxies = acked.proxies, "root rotation: phase moved on");
                    steps.push(Step::Advanced {
                        signer: cfg.name.clone(),
                        phase: next.phase(),
                    });
                }
                None if state.phase() == "distributing" => {
                    tracing::debug!(signer = %cfg.name, waiting = ?acked.waiting, "root rotation: proxies still to acknowledge the new trust bundle");
                }
                None => {}
            }
        }
        if !steps.iter().any(|s| matches!(s, Step::Applied { .. })) {
            self.acknowledged
                .store(acked.everywhere(), Ordering::SeqCst);
        }
        Ok(steps)
    }
}

/// The rotation gauges of `/metrics` (`hypha control --health`): per signer, the phase (a 1
/// beside the phase in force), the generation that signs, and when the old root retires.
pub fn metrics(states: &[(String, RotationState)]) -> String {
    let mut out = String::from(
        "# HELP hypha_ca_rotation_phase A signer's root rotation phase (1: the phase in force).\n\
         # TYPE hypha_ca_rotation_phase gauge\n",
    );
    for (signer, s) in states {
        for phase in ["idle", "distributing", "issuing"] {
            let v = u8::from(s.phase() == phase);
            out.push_str(&format!(
                "hypha_ca_rotation_phase{{signer=\"{signer}\",phase=\"{phase}\"}} {v}\n"
            ));
        }
    }
    out.push_str(
        "# HELP hypha_ca_signing_generation The generation of a signer's key that signs now.\n\
         # TYPE hypha_ca_signing_generation gauge\n",
    );
    for (signer, s) in states {
        out.push_str(&format!(
            "hypha_ca_signing_generation{{signer=\"{signer}\"}} {}\n",
            s.signing()
        ));
    }
    out.push_str(
        "# HELP hypha_ca_rotation_retire_after_seconds When the old root leaves the bundles (Unix time; 0: not yet known).\n\
         # TYPE hypha_ca_rotation_retire_after_seconds gauge\n",
    );
    for (signer, s) in states {
        let at = s
            .rotation
            .as_ref()
            .and_then(|r| r.retire_after)
            .unwrap_or(0);
        out.push_str(&format!(
            "hypha_ca_rotation_retire_after_seconds{{signer=\"{signer}\"}} {at}\n"
        ));
    }
    out
}
