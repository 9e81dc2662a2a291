//! The proxy's workload identity: its first certificate from the control plane's CA (join
//! token), renewal at half life, and the mutual-TLS channel to the control plane for xDS.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use boring::x509::X509;
use hypha_identity::tls::{ClientCert, Peer};
use hypha_identity::{grpc, Credentials, IdentityError, KeyKind, KeySource, Store, Workload};

/// The control plane's service account (see `hypha_control::security`).
const CONTROL_SERVICE_ACCOUNT: &str = "hypha-control";

/// How long a starting proxy keeps trying to reach the CA before giving up.
const BOOTSTRAP_PATIENCE: Duration = Duration::from_secs(60);

/// Where the proxy's identity comes from.
#[derive(Debug, Clone)]
pub struct IdentityOptions {
    /// The root that verifies the control plane (its `root-cert.pem`).
    pub ca_root: PathBuf,
    /// The join token for the first certificate.
    pub join_token: Option<PathBuf>,
    /// A projected service-account token (Kubernetes), read again at every renewal: the
    /// kubelet rotates it. Instead of `join_token`.
    pub service_account_token: Option<PathBuf>,
    pub trust_domain: String,
    /// The control plane's namespace (the mesh's root namespace): the control plane must be
    /// `spiffe://<trust domain>/ns/<this>/sa/hypha-control`, nothing less.
    pub control_plane_namespace: String,
    pub key_kind: KeyKind,
    /// Keys in this PKCS#11 token instead of memory: generated there, never extractable.
    pub pkcs11: Option<hypha_keys::pkcs11::TokenConfig>,
    /// The label of the key generated in the token (default `hypha <SPIFFE ID>`).
    pub key_label: Option<String>,
    /// RSA operations batched for the multi-buffer engine (Istio's `cryptomb`); the key in
    /// memory. Not with `pkcs11`.
    pub batch: Option<hypha_keys::batch::BatchConfig>,
    /// Certificate validity asked for (the CA caps it).
    pub validity: Duration,
}

/// Errors obtaining the proxy's identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityStartError {
    #[error("{0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("{0}: no certificate in it")]
    NoRoot(PathBuf),
    #[error("workload identity: {0}")]
    Identity(IdentityError),
}

impl From<IdentityError> for IdentityStartError {
    fn from(e: IdentityError) -> IdentityStartError {
        IdentityStartError::Identity(e)
    }
}

/// The mesh identity of a running proxy and how to reach the control plane with it.
#[derive(Debug, Clone)]
pub struct Mesh {
    pub store: Store,
    /// The token holding the workload key, when it is in one.
    pub token: Option<Arc<hypha_keys::pkcs11::Token>>,
    /// The batcher signing for the workload key, when there is one.
    pub batcher: Option<Arc<hypha_keys::batch::Batcher>>,
    ca_roots: Vec<X509>,
    /// `--ca-root`, read again for every connection to the control plane (its roots rotate).
    ca_roots_file: PathBuf,
    /// Who the control plane must be.
    control_plane: Peer,
}

impl Mesh {
    /// A mutual-TLS gRPC channel to the control plane with the current certificate.
    pub async fn control_plane(
        &self,
        uri: &str,
    ) -> Result<tonic::transport::Channel, IdentityError> {
        let roots = hypha_identity::roots_from_file(Some(&self.ca_roots_file), &self.ca_roots);
        let connector = hypha_identity::tls::client(Some(&self.store.load().identity), &roots)?;
        grpc::channel(uri, connector, self.control_plane.clone()).await
    }
}

impl Mesh {
    /// Applies a trust bundle update (the `ROOTCA` secret): the same certificate, new roots,
    /// for connections from now on.
    pub fn trust(&self, resources: &[hypha_xds::Resource]) -> Result<(), String> {
        let mut roots = None;
        for r in resources {
            let bundle =
                crate::compile::trust_bundle(&r.name, &r.body.value).map_err(|e| e.to_string())?;
            roots = Some(bundle);
        }
        let Some(roots) = roots else { return Ok(()) };
        let count = roots.len();
        // Over whatever certificate is current when it lands (a renewal may race it).
        self.store
            .update(|current| {
                let identity = current.identity.with_roots(roots.clone())?;
                Credentials::new(identity, ClientCert::Require)
            })
            .map_err(|e| e.to_string())?;
        tracing::info!(roots = count, "trust bundle updated");
        Ok(())
    }
}

/// The control plane's full SPIFFE ID, pinned: the trust domain, the root namespace and the
/// service account. A workload that merely shares the service account's name elsewhere is not
/// the control plane (and the CA issues that name nowhere else).
fn control_plane_peer(opts: &IdentityOptions) -> Peer {
    Peer::OneOf(
        [format!(
            "spiffe://{}/ns/{}/sa/{CONTROL_SERVICE_ACCOUNT}",
            opts.trust_domain, opts.control_plane_namespace
        )]
        .into(),
    )
}

/// Gets the first certificate for `spiffe://<td>/ns/<ns>/sa/<sa>` from the CA at
/// `control_plane`, retrying while the CA cannot be reached (it may be starting too), and
/// returns the identity with its renewal task, which the caller runs.
pub async fn bootstrap(
    control_plane: &str,
    namespace: &str,
    service_account: &str,
    opts: &IdentityOptions,
) -> Result<(Mesh, impl std::future::Future<Output = ()>), IdentityStartError> {
    let read = |p: &PathBuf| std::fs::read(p).map_err(|e| IdentityStartError::Read(p.clone(), e));
    let ca_roots = X509::stack_from_pem(&read(&opts.ca_root)?).map_err(IdentityError::from)?;
    if ca_roots.is_empty() {
        return Err(IdentityStartError::NoRoot(opts.ca_root.clone()));
    }
    let token = match (&opts.service_account_token, &opts.join_token) {
        (Some(p), _) => Some(hypha_identity::Credential::ServiceAccount(p.clone())),
        (None, Some(p)) => Some(hypha_identity::Credential::Join(
            String::from_utf8_lossy(&read(p)?).trim().to_owned(),
        )),
        (None, None) => None,
    };
    let keys = match (&opts.pkcs11, &opts.batch) {
        (None, None) => KeySource::Software(opts.key_kind),
        (None, Some(cfg)) => KeySource::Batched {
            kind: opts.key_kind,
            batcher: hypha_keys::batch::Batcher::new(cfg.clone()).map_err(IdentityError::Key)?,
        },
        (Some(cfg), _) => {
            let cfg = cfg.clone();
            let token = tokio::task::spawn_blocking(move || hypha_keys::pkcs11::Token::open(&cfg))
                .await
                .map_err(|e| IdentityError::Key(hypha_keys::KeyError::Backend(e.to_string())))?
                .map_err(IdentityError::Key)?;
            let kind = match opts.key_kind {
                KeyKind::EcdsaP256 => hypha_keys::pkcs11::TokenKeyKind::EcdsaP256,
                KeyKind::Rsa2048 => hypha_keys::pkcs11::TokenKeyKind::Rsa(2048),
                KeyKind::Rsa3072 => hypha_keys::pkcs11::TokenKeyKind::Rsa(3072),
            };
            KeySource::Token {
                token,
                kind,
                label: opts.key_label.clone(),
            }
        }
    };
    let (key_token, batcher) = match &keys {
        KeySource::Token { token, .. } => (Some(token.clone()), None),
        KeySource::Batched { batcher, .. } => (None, Some(batcher.clone())),
        KeySource::Software(_) => (None, None),
    };
    let workload = Workload {
        ca: control_plane.to_owned(),
        ca_roots: ca_roots.clone(),
        ca_roots_file: Some(opts.ca_root.clone()),
        ca_identity: control_plane_peer(opts),
        token,
        spiffe_id: format!(
            "spiffe://{}/ns/{namespace}/sa/{service_account}",
            opts.trust_domain
        ),
        keys,
        validity: opts.validity,
    };
    let deadline = tokio::time::Instant::now() + BOOTSTRAP_PATIENCE;
    let mut retry = Duration::from_millis(100);
    let identity = loop {
        match workload.bootstrap().await {
            Ok(id) => break id,
            Err(IdentityError::Connect { uri, reason })
                if tokio::time::Instant::now() + retry < deadline =>
            {
                tracing::info!(%uri, %reason, "CA not reachable yet; retrying");
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e.into()),
        }
    };
    let valid_s = identity
        .not_after()
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default()
        .as_secs();
    tracing::info!(identity = %identity.id(), valid_s, "certificate issued");
    let store = Store::new(Credentials::new(identity, ClientCert::Require)?);
    let rotation = workload.rotate(store.clone(), ClientCert::Require);
    Ok((
        Mesh {
            store,
            token: key_token,
            batcher,
            ca_roots,
            ca_roots_file: opts.ca_root.clone(),
            control_plane: control_plane_peer(opts),
        },
        rotation,
    ))
}
