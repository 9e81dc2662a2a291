//! `hypha ca status`: each tenant's signer, where its key lives and the root it signs with, read
//! from the mesh config and the data directory alone (no key, no token, no PIN is touched).

use std::path::{Path, PathBuf};

use boring::x509::X509;
use hypha_config::MeshConfig;
use serde::Serialize;

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
    /// The root, once the control plane has made it.
    pub root: Option<RootStatus>,
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
            let (key, dir) = match cfg {
                Some(s) => match &s.key.pkcs11 {
                    Some(p) => (
                        format!("pkcs11 {}/{}", p.token_label, p.key_label),
                        data_dir.join(&s.name),
                    ),
                    None => {
                        let dir = file_signer_dir(s, data_dir).unwrap_or_default();
                        (format!("file {}", dir.display()), dir)
                    }
                },
                None => ("unknown signer".into(), PathBuf::new()),
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
                root: root(&dir.join(CERT_FILE)),
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
    }
    out
}
