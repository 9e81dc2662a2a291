//! `hypha ca status`: each tenant's signer, where its key lives and the root it signs with, read
//! from the mesh config and the data directory alone (no key, no token, no PIN is touched).

use std::path::{Path, PathBuf};

use boring::x509::X509;
use hypha_config::MeshConfig;
use serde::Serialize;

use crate::rotation::{self, RotationState};
use crate::signer::{fingerprint, CERT_FILE};
use crate::tenants::file_signer_dir;

/// One tenant as the CA would serve it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TenantStatus {
    pub tenant: String,
    pub namespaces: Vec<String>,
    pub signer: String,
    /// `file <dir>` or `pkcs11 <token label>/<key label>`.
    pub key: String,
    /// Kubernetes CSR signer names it answers (`hypha.dev/<tenant>` and its `signerNames`).
    pub signer_names: Vec<String>,
    pub trust_tenants: Vec<String>,
    /// The root that signs, once the control plane has made it.
    pub root: Option<RootStatus>,
    /// The signer's rotation: the generation that signs, the phase, and the other root
    /// trusted mid-rotation.
    pub rotation: RotationStatus,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RotationStatus {
    /// `idle`, `distributing` or `issuing`.
    pub phase: String,
    pub signing_generation: u32,
    /// Mid-rotation, the other generation's root (trusted, not signing).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub also_trusted: Option<RootStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<crate::rotation::RotationState>,
    /// Why the state could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RootStatus {
    pub path: PathBuf,
    pub subject: String,
    /// SHA-256 of the certificate, hex.
    pub fingerprint: String,
    pub not_before: String,
    pub not_after: String,
}

/// Every tenant of `mesh`, with what `data_dir` holds of its signer.
pub fn status(mesh: &MeshConfig, data_dir: &Path) -> Vec<TenantStatus> {
    mesh.tenants
        .iter()
        .map(|t| {
            let cfg = mesh.signer(&t.signer);
            let state = cfg.map(|s| RotationState::read(&rotation::state_dir(data_dir, &s.name)));
            let (signing, other) = match &state {
                Some(Ok(st)) => (st.signing(), st.also_trusted()),
                _ => (0, None),
            };
            let (key, dir) = match cfg {
                Some(s) => match &s.key.pkcs11 {
                    Some(p) => (
                        format!(
                            "pkcs11 {}/{}",
                            p.token_label,
                            rotation::generation_label(&p.key_label, signing)
                        ),
                        data_dir.join(&s.name),
                    ),
                    None => {
                        let dir = file_signer_dir(s, data_dir).unwrap_or_default();
                        let key = rotation::generation_dir(&dir, signing);
                        (format!("file {}", key.display()), dir)
                    }
                },
                None => ("unknown signer".into(), PathBuf::new()),
            };
            let rotation = RotationStatus {
                phase: match &state {
                    Some(Ok(st)) => st.phase().to_owned(),
                    _ => "idle".to_owned(),
                },
                signing_generation: signing,
                also_trusted: other
                    .and_then(|n| root(&rotation::generation_dir(&dir, n).join(CERT_FILE))),
                state: state.as_ref().and_then(|s| s.as_ref().ok().cloned()),
                error: state.and_then(|s| s.err().map(|e| e.to_string())),
            };
            let mut signer_names = vec![format!("hypha.dev/{}", t.name)];
            signer_names.extend(t.signer_names.iter().cloned());
            TenantStatus {
                tenant: t.name.clone(),
                namespaces: t.namespaces.clone(),
                signer: t.signer.clone(),
                key,
                signer_names,
                trust_tenants: t.trust_tenants.clone(),
                root: root(&rotation::generation_dir(&dir, signing).join(CERT_FILE)),
                rotation,
            }
        })
        .collect()
}

fn root(path: &Path) -> Option<RootStatus> {
    let cert = X509::from_pem(&std::fs::read(path).ok()?).ok()?;
    let subject = cert
        .subject_name()
        .entries()
        .filter_map(|e| {
            let key = e.object().nid().short_name().ok()?;
            Some(format!("{key}={}", e.data().as_utf8().ok()?))
        })
        .collect::<Vec<_>>()
        .join(", ");
    Some(RootStatus {
        path: path.to_owned(),
        subject,
        fingerprint: fingerprint(&cert),
        not_before: cert.not_before().to_string(),
        not_after: cert.not_after().to_string(),
    })
}

/// The statuses as text, a block per tenant.
pub fn render(statuses: &[TenantStatus]) -> String {
    let mut out = String::new();
    for s in statuses {
        out.push_str(&format!(
            "tenant {}\n  namespaces    {}\n  signer        {} ({})\n  signer names  {}\n",
            s.tenant,
            s.namespaces.join(", "),
            s.signer,
            s.key,
            s.signer_names.join(", ")
        ));
        if !s.trust_tenants.is_empty() {
            out.push_str(&format!("  trusts        {}\n", s.trust_tenants.join(", ")));
        }
        match &s.root {
            Some(r) => out.push_str(&format!(
                "  root          {}\n  fingerprint   {}\n  valid         {} .. {}\n",
                r.subject, r.fingerprint, r.not_before, r.not_after
            )),
            None => {
                out.push_str("  root          none yet (made on the control plane's first start)\n")
            }
        }
        let r = &s.rotation;
        match &r.state {
            Some(
                st @ RotationState {
                    rotation: Some(rot),
                    ..
                },
            ) => {
                let what = match r.phase.as_str() {
                    "distributing" => format!(
                        "phase 1 of 3, distributing generation {} (trusted, not signing yet): the \
                         new key signs once every proxy has acknowledged its bundle",
                        rot.to
                    ),
                    _ => format!(
                        "phase 2 of 3, issuing from generation {}; generation {} stays trusted \
                         until {} (Unix time)",
                        rot.to,
                        st.generation,
                        rot.retire_after.unwrap_or(0)
                    ),
                };
                out.push_str(&format!("  rotation      {what}\n"));
                if let Some(o) = &r.also_trusted {
                    out.push_str(&format!("  also trusted  {}\n", o.fingerprint));
                }
            }
            Some(st) => {
                let last = st.last.as_ref().map_or(String::new(), |l| {
                    format!(
                        " (last rotation: generation {} -> {}, done at {} Unix time)",
                        l.from, l.to, l.finished
                    )
                });
                out.push_str(&format!(
                    "  rotation      none under way; generation {} signs{last}\n",
                    r.signing_generation
                ));
            }
            None => {}
        }
        if let Some(e) = &r.error {
            out.push_str(&format!("  rotation      unreadable state: {e}\n"));
        }
    }
    out
}
