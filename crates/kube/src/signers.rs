//! One CA for every control-plane replica: each signer whose key is a file is kept in a
//! Kubernetes Secret `hypha-ca-<signer>` in the mesh's root namespace (istiod keeps its
//! self-signed root in `istio-ca-secret` the same way), so replicas sign with the same key and
//! proxies trust one root. A starting replica takes the Secret if it exists; else it makes the
//! signer as without a cluster and publishes it, and when another replica published first (409
//! Conflict) it takes that one instead. Signers whose key is in a PKCS#11 token are shared by
//! the token itself and are left alone.

use std::collections::BTreeMap;
use std::path::Path;

use hypha_ca::signer::{CERT_FILE, KEY_FILE};
use hypha_config::MeshConfig;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::{Api, PostParams};
use kube::Client;

/// The Secret holding signer `name`.
pub fn secret_name(signer: &str) -> String {
    format!("hypha-ca-{signer}")
}

#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("signer {0}: {1}")]
    Api(String, kube::Error),
    #[error("signer {0}: {1}")]
    Ca(String, hypha_ca::CaError),
    #[error("signer {0}: {1}: {2}")]
    Io(String, std::path::PathBuf, std::io::Error),
    #[error("signer {0}: Secret {1} lacks {2}")]
    Incomplete(String, String, &'static str),
}

/// Makes every file signer of `mesh` under `data_dir` the one the cluster shares (see the
/// module docs); call before the CA opens.
pub async fn share_signers(
    client: &Client,
    mesh: &MeshConfig,
    data_dir: &Path,
) -> Result<(), ShareError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &mesh.root_namespace);
    for signer in &mesh.signers {
        let Some(dir) = hypha_ca::file_signer_dir(signer, data_dir) else {
            continue;
        };
        let name = secret_name(&signer.name);
        let api_err = |e| ShareError::Api(signer.name.clone(), e);
        if let Some(secret) = api.get_opt(&name).await.map_err(api_err)? {
            take(&signer.name, &dir, &secret)?;
            tracing::info!(signer = %signer.name, "CA signer taken from Secret {name}");
            continue;
        }
        let (d, org, cn) = (
            dir.clone(),
            mesh.trust_domain.clone(),
            hypha_ca::signer_common_name(&signer.name),
        );
        tokio::task::spawn_blocking(move || hypha_ca::FileSigner::open_or_create(&d, &org, &cn))
            .await
            .map_err(|e| {
                ShareError::Io(signer.name.clone(), dir.clone(), std::io::Error::other(e))
            })?
            .map_err(|e| ShareError::Ca(signer.name.clone(), e))?;
        let mut data = BTreeMap::new();
        for file in [KEY_FILE, CERT_FILE] {
            let path = dir.join(file);
            let bytes = std::fs::read(&path)
                .map_err(|e| ShareError::Io(signer.name.clone(), path.clone(), e))?;
            data.insert(file.to_owned(), ByteString(bytes));
        }
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(mesh.root_namespace.clone()),
                ..Default::default()
            },
            type_: Some("Opaque".into()),
            data: Some(data),
            ..Default::default()
        };
        match api.create(&PostParams::default(), &secret).await {
            Ok(_) => tracing::info!(signer = %signer.name, "CA signer published as Secret {name}"),
            Err(kube::Error::Api(status)) if status.code == 409 => {
                let theirs = api.get(&name).await.map_err(api_err)?;
                take(&signer.name, &dir, &theirs)?;
                tracing::info!(signer = %signer.name, "another replica published first; its signer taken");
            }
            Err(e) => return Err(api_err(e)),
        }
    }
    // A root rotation under way or done: its generations and state (`crate::rotation`).
    crate::rotation::sync(client, mesh, data_dir).await?;
    Ok(())
}

/// Writes the Secret's key (0600) and root into `dir` (0700). The key of generation 0 is gone
/// once a root rotation retired it (the later generations are `crate::rotation`'s to copy).
fn take(signer: &str, dir: &Path, secret: &Secret) -> Result<(), ShareError> {
    let data = secret.data.as_ref();
    if data.and_then(|d| d.get(CERT_FILE)).is_none() {
        return Err(ShareError::Incomplete(
            signer.to_owned(),
            secret.metadata.name.clone().unwrap_or_default(),
            CERT_FILE,
        ));
    }
    for file in [KEY_FILE, CERT_FILE] {
        if let Some(bytes) = data.and_then(|d| d.get(file)) {
            crate::rotation::write_if_changed(&dir.join(file), &bytes.0, 0o600, signer)?;
        }
    }
    Ok(())
}
