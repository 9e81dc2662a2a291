//! The control plane's secure endpoint (Istio's port 15012): xDS and the CA API over TLS,
//! with the control plane's own certificate issued by its CA in process and renewed at half
//! life. Workloads present a join token for their first certificate (no client certificate
//! yet) and their certificate afterwards, for renewals and for xDS (mutual TLS).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hypha_ca::{Ca, CaService, Caller, JoinTokens};
use hypha_config::MeshConfig;
use hypha_identity::grpc::PeerInfo;
use hypha_identity::tls::ClientCert;
use hypha_identity::{
    grpc, issue_local, issue_local_in_token, Credentials, Identity, Store, WorkloadAuth,
};
use hypha_xds::AdsServer;
use hypha_xds::ProxyInfo;
use tokio::net::TcpListener;
use tonic::{Extensions, Status};

use crate::ControlPlane;

/// The control plane's service account; its identity is
/// `spiffe://<trust domain>/ns/<root namespace>/sa/hypha-control`.
pub const SERVICE_ACCOUNT: &str = hypha_ca::CONTROL_SERVICE_ACCOUNT;

/// The file (in the data directory) with the root that verifies the control plane's
/// certificate: what a proxy's `--ca-root` points at (Istio's `root-cert.pem`).
pub const ROOT_CERT_FILE: &str = "root-cert.pem";

/// Validity of the control plane's own certificate.
const OWN_VALIDITY: Duration = Duration::from_secs(24 * 3600);

/// Errors setting up the secure endpoint.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error("CA: {0}")]
    Ca(#[from] hypha_ca::CaError),
    #[error("join tokens: {0}")]
    Tokens(#[from] hypha_ca::service::TokenError),
    #[error("certificate: {0}")]
    Identity(#[from] hypha_identity::IdentityError),
    #[error("{0}: {1}")]
    Write(PathBuf, std::io::Error),
    #[error("{0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("issuing task failed: {0}")]
    Task(String),
}

/// Over TLS, a proxy gets the config of its own identity only (as istiod checks): the
/// namespace and service account its node claims must be those of its client certificate;
/// an Istio-style node id (`sidecar~<ip>~<workload>.<ns>~...`) must name the claimed workload
/// and namespace; and a workload the registry knows by the claimed name (or addresses) must
/// run as that service account and carry the claimed labels, so no workload takes another's
/// config (its inbound chains, its `sourceLabels` routes). Plaintext connections (the
/// `--listen` port) carry no identity and are not checked.
pub fn authorize_node(
    proxy: &ProxyInfo,
    connection: &Extensions,
    registry: &crate::registry::Registry,
) -> Result<(), Status> {
    let Some(peer) = connection.get::<PeerInfo>() else {
        return Ok(());
    };
    if let Some(reason) = &peer.refused {
        return Err(Status::permission_denied(format!(
            "the client certificate is refused: {reason}"
        )));
    }
    let id = peer.identity.as_deref().ok_or_else(|| {
        Status::unauthenticated("xDS over TLS needs the workload's client certificate")
    })?;
    let denied = |why: String| {
        tracing::warn!(node = %proxy.id, identity = %id, "xDS: {why}");
        Err(Status::permission_denied(why))
    };
    let claimed = format!("/ns/{}/sa/{}", proxy.namespace, proxy.service_account);
    let own = id
        .strip_prefix("spiffe://")
        .and_then(|rest| rest.find('/').map(|i| &rest[i..]));
    if own != Some(claimed.as_str()) {
        return denied(format!(
            "the client certificate is {id}, not namespace {} service account {}",
            proxy.namespace, proxy.service_account
        ));
    }
    let parts: Vec<&str> = proxy.id.split('~').collect();
    if let [_, _, instance, _] = parts[..] {
        let (_, ns) = instance.split_once('.').unwrap_or((instance, ""));
        if ns != proxy.namespace {
            return denied(format!(
                "node id {} names another namespace than {}",
                proxy.id, proxy.namespace
            ));
        }
    }
    let instance = proxy.instance();
    let known = registry.workloads_of(&proxy.namespace, instance, &proxy.ips);
    // The workload the node names is its instance's (a WorkloadEntry's own name, a pod's
    // Deployment): it labels the proxy's telemetry, so another one would be a lie.
    let owner = known
        .iter()
        .map(|w| w.owner.as_str())
        .find(|o| !o.is_empty());
    let named = proxy.workload_name.as_str();
    if !named.is_empty() && named != instance && owner != Some(named) {
        return denied(format!(
            "node id {} names another workload than {}/{named}",
            proxy.id, proxy.namespace
        ));
    }
    if let Some(w) = known
        .iter()
        .find(|w| w.service_account != proxy.service_account)
    {
        return denied(format!(
            "workload {}/{} runs as service account {}, not {}",
            w.namespace, w.workload_name, w.service_account, proxy.service_account
        ));
    }
    let carries = |w: &&crate::registry::Endpoint| {
        proxy.labels.iter().all(|(k, v)| w.labels.get(k) == Some(v))
    };
    if !known.is_empty() && !known.iter().any(carries) {
        return denied(format!(
            "workload {}/{instance} does not carry the labels the node claims",
            proxy.namespace
        ));
    }
    Ok(())
}

/// The verified identity of a TLS connection's client, if any.
pub fn verified_identity(connection: &Extensions) -> Option<&str> {
    connection
        .get::<PeerInfo>()
        .and_then(|p| p.identity.as_deref())
}

/// Where an xDS stream's NACKs are remembered: under the verified identity and the node id,
/// so a workload can only ever mute content for itself.
pub fn rejection_key(
    node: &envoy_types::pb::envoy::config::core::v3::Node,
    connection: &Extensions,
) -> String {
    match verified_identity(connection) {
        Some(id) => format!("{id} {}", node.id),
        None => node.id.clone(),
    }
}

/// The CA with the control plane's own credentials.
pub struct Secure {
    ca: Arc<Ca>,
    auth: Arc<WorkloadAuth>,
    own: Store,
    /// The token holding the control plane's own key, when it is in one.
    own_token: Option<Arc<hypha_keys::pkcs11::Token>>,
    caller: Caller,
    /// The mesh config the CA was opened from: its signers rotate (see [`crate::rotation`]).
    mesh: MeshConfig,
    rotations: crate::rotation::Rotations,
    /// The data directory (its deny list, `revoked`) and the join-token directory, read
    /// again when they change.
    data_dir: PathBuf,
    tokens_dir: Option<PathBuf>,
}

impl std::fmt::Debug for Secure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secure")
            .field("ca", &self.ca)
            .field("identity", &self.own.load().identity.id())
            .finish_non_exhaustive()
    }
}

impl Secure {
    /// Has the CA check bearer tokens that are no join token with `review` (service-account
    /// tokens, by TokenReview).
    pub fn review_tokens_with(&self, review: Arc<dyn hypha_ca::TokenReview>) {
        self.auth.review_tokens_with(review);
    }

    /// Opens (or creates on first start) the CA's signers under `data_dir`, reads the join
    /// tokens, issues the control plane's certificate and writes `data_dir/root-cert.pem`.
    ///
    /// With a token-held signer this waits for the token: call it where blocking is allowed
    /// (`run` does, under `spawn_blocking`), not on an async worker thread.
    pub fn open(
        mesh: &MeshConfig,
        data_dir: &Path,
        join_tokens: Option<&Path>,
    ) -> Result<Secure, SecurityError> {
        Self::open_with(mesh, data_dir, join_tokens, None)
    }

    /// [`Secure::open`], with the control plane's own key generated in `own_token` (and
    /// regenerated there at every renewal) instead of in memory.
    pub fn open_with(
        mesh: &MeshConfig,
        data_dir: &Path,
        join_tokens: Option<&Path>,
        own_token: Option<Arc<hypha_keys::pkcs11::Token>>,
    ) -> Result<Secure, SecurityError> {
        Self::open_named(mesh, data_dir, join_tokens, own_token, Vec::new())
    }

    /// [`Secure::open_with`], the control plane's certificates carrying `server_names` (DNS)
    /// besides its SPIFFE ID: the names the API server calls its injection webhook by.
    pub fn open_named(
        mesh: &MeshConfig,
        data_dir: &Path,
        join_tokens: Option<&Path>,
        own_token: Option<Arc<hypha_keys::pkcs11::Token>>,
        server_names: Vec<String>,
    ) -> Result<Secure, SecurityError> {
        let ca = Arc::new(Ca::from_mesh(mesh, data_dir)?.with_control_names(server_names));
        ca.set_revoked(read_revoked(data_dir)?);
        let tokens = join_tokens.map(JoinTokens::from_dir).transpose()?;
        if let Some(t) = &tokens {
            tracing::info!("{} join token(s) loaded", t.len());
        }
        let auth = Arc::new(WorkloadAuth::new(tokens, mesh.trust_domain.clone()));
        let caller = Caller::new(mesh.root_namespace.clone(), SERVICE_ACCOUNT);
        // Workloads of every tenant renew here: trust every tenant's root.
        let roots = ca.all_roots()?;
        let own = own_identity(&ca, &caller, &roots, own_token.as_ref())?;
        let path = write_root_cert(&ca, &caller, data_dir)?;
        // `key` last: the demo reads it to the end of the line.
        tracing::info!(identity = %own.id(), root = %path.display(), key = %own.key_description(), "control plane certificate issued");
        let own = Store::new(Credentials::new(own, ClientCert::Optional)?);
        Ok(Secure {
            ca,
            auth,
            own,
            own_token,
            caller,
            mesh: mesh.clone(),
            rotations: crate::rotation::Rotations::read(mesh, data_dir),
            data_dir: data_dir.to_path_buf(),
            tokens_dir: join_tokens.map(Path::to_path_buf),
        })
    }

    /// Reads the deny list and the join-token directory again. A directory that does not
    /// read (a malformed token file, say) leaves what was read before in force.
    pub fn reload(&self) -> Result<(), SecurityError> {
        let revoked = read_revoked(&self.data_dir);
        if let Ok(ids) = &revoked {
            self.ca.set_revoked(ids.clone());
        }
        revoked?;
        if let Some(dir) = &self.tokens_dir {
            let tokens = JoinTokens::from_dir(dir)?;
            tracing::info!("{} join token(s) loaded", tokens.len());
            self.auth.set_tokens(tokens);
        }
        Ok(())
    }

    /// Watches the deny list and the join-token directory (every `poll`), reloads on a
    /// change, and ends the xDS streams of identities revoked meanwhile. Runs until dropped.
    pub async fn watch(&self, cp: &ControlPlane, poll: Duration) {
        let mut seen = self.fingerprint();
        loop {
            tokio::time::sleep(poll).await;
            if let Err(e) = self.rotation_step(cp).await {
                tracing::error!(error = %e, "root rotation step failed; retrying at the next poll");
            }
            let now = self.fingerprint();
            if now == seen {
                continue;
            }
            seen = now;
            if let Err(e) = self.reload() {
                tracing::error!(error = %e, "reloading join tokens or the deny list failed; what did not read stays as it was");
            }
            // Whatever else failed, the deny list in force now ends its identities' streams.
            let td = self.ca.trust_domain().to_owned();
            let ended = cp.disconnect(|p| {
                self.ca.is_revoked(&format!(
                    "spiffe://{td}/ns/{}/sa/{}",
                    p.namespace, p.service_account
                ))
            });
            if ended > 0 {
                tracing::warn!(streams = ended, "xDS streams of revoked identities ended");
            }
        }
    }

    /// What the watched files look like: names, sizes and modification times.
    fn fingerprint(&self) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
        let stat = |p: PathBuf| {
            use std::os::unix::fs::MetadataExt;
            let m = std::fs::metadata(&p).ok();
            // Size, mode and change time: a `chmod 600` on a refused token file is a change.
            let len = m
                .as_ref()
                .map_or(0, |m| m.len() ^ (u64::from(m.mode()) << 48));
            let changed = m.map(|m| {
                SystemTime::UNIX_EPOCH
                    + Duration::new(
                        u64::try_from(m.ctime()).unwrap_or(0),
                        u32::try_from(m.ctime_nsec()).unwrap_or(0),
                    )
            });
            (p, len, changed)
        };
        let mut out = vec![stat(self.data_dir.join(hypha_ca::REVOKED_FILE))];
        if let Some(dir) = &self.tokens_dir {
            if let Ok(entries) = std::fs::read_dir(dir) {
                let mut files: Vec<_> = entries.flatten().map(|e| stat(e.path())).collect();
                files.sort();
                out.extend(files);
            }
        }
        out
    }

    /// Each signer's roots now (two mid-rotation), which the sidecars' trust bundles
    /// (`ROOTCA`) are made of.
    pub fn signer_roots(&self) -> crate::mtls::SignerRoots {
        signer_roots(&self.mesh, &self.ca).unwrap_or_default()
    }

    /// Each signer's rotation state in force (for `/metrics`).
    pub fn rotations(&self) -> Vec<(String, hypha_ca::rotation::RotationState)> {
        self.rotations.states()
    }

    /// The rotation states in force and whether every proxy connected here acknowledged their
    /// bundles (a replica's report to its cluster's leader).
    pub fn rotation_report(&self) -> (Vec<(String, hypha_ca::rotation::RotationState)>, bool) {
        self.rotations.report()
    }

    /// Leaves moving rotation phases on to a cluster's leader (see `hypha_kube::rotation`).
    pub fn rotate_elsewhere(&self) {
        self.rotations.advance_elsewhere();
    }

    /// One step of every signer's root rotation (see [`crate::rotation`]), then the control
    /// plane's own TLS made to trust what the CA's roots are now, and `root-cert.pem` written
    /// again if they changed.
    pub async fn rotation_step(
        &self,
        cp: &ControlPlane,
    ) -> Result<Vec<crate::rotation::Step>, SecurityError> {
        let steps = self
            .rotations
            .step(&self.mesh, &self.data_dir, &self.ca, cp)
            .await?;
        let roots = self.ca.all_root_certs();
        let current = self.own.load();
        let trusted = current.identity.roots();
        let same = trusted.len() == roots.len()
            && trusted
                .iter()
                .zip(&roots)
                .all(|(a, b)| hypha_ca::same_cert(a, b));
        if !same {
            let count = roots.len();
            let identity = current.identity.with_roots(roots)?;
            self.own
                .replace(Credentials::new(identity, ClientCert::Optional)?);
            write_root_cert(&self.ca, &self.caller, &self.data_dir)?;
            tracing::info!(
                roots = count,
                "control plane trusts the CA's roots as they are now"
            );
        }
        Ok(steps)
    }

    pub fn identity(&self) -> Arc<Credentials> {
        self.own.load()
    }

    /// The mesh CA: for the other ways certificates are asked of it (Kubernetes CSRs).
    pub fn ca(&self) -> Arc<Ca> {
        self.ca.clone()
    }

    /// The control plane's credentials as they rotate: for other TLS servers of its own (the
    /// injection webhook).
    pub fn credentials(&self) -> Store {
        self.own.clone()
    }

    /// The root that signed the control plane's certificate (PEM): what a client of its TLS
    /// servers trusts (the webhook's `caBundle`).
    pub fn own_root(&self) -> String {
        self.own
            .load()
            .identity
            .chain()
            .last()
            .and_then(|c| c.to_pem().ok())
            .map(|p| String::from_utf8_lossy(&p).into_owned())
            .unwrap_or_default()
    }

    /// Serves ADS and the CA API over TLS on `listener` until dropped.
    pub async fn serve(
        &self,
        cp: &ControlPlane,
        listener: TcpListener,
    ) -> Result<(), tonic::transport::Error> {
        let own = self.own.clone();
        let ca = self.ca.clone();
        let revoked = self.ca.clone();
        cp.check_revocation(Arc::new(move |id: &str| revoked.is_revoked(id)));
        let incoming = grpc::incoming_vouched(
            listener,
            move || own.load(),
            Arc::new(move |id: &str, leaf: &_| ca.vouch(id, leaf)),
        );
        tonic::transport::Server::builder()
            .add_service(AdsServer::new(Arc::new(cp.clone())).into_service())
            .add_service(CaService::new(self.ca.clone(), self.auth.clone()).into_server())
            .serve_with_incoming(incoming)
            .await
    }

    /// Renews the control plane's own certificate at half life. Runs until dropped.
    pub async fn rotate_own(&self) {
        loop {
            let wait = self
                .own
                .load()
                .identity
                .renew_at()
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            tokio::time::sleep(wait).await;
            // Issuing may wait for a token-held signer: off the async workers.
            let (ca, caller) = (self.ca.clone(), self.caller.clone());
            let token = self.own_token.clone();
            let reissued =
                tokio::task::spawn_blocking(move || reissue(&ca, &caller, token.as_ref()))
                    .await
                    .unwrap_or_else(|e| Err(SecurityError::Task(e.to_string())));
            match reissued {
                Ok(c) => {
                    tracing::info!(identity = %c.identity.id(), "control plane certificate rotated");
                    self.own.replace(c);
                }
                Err(e) => {
                    tracing::error!(error = %e, "renewing the control plane certificate failed");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        }
    }
}

/// Each signer's roots (PEM, the signing one first): what tenants' trust bundles are made of.
pub(crate) fn signer_roots(
    mesh: &MeshConfig,
    ca: &Ca,
) -> Result<crate::mtls::SignerRoots, SecurityError> {
    let mut out = crate::mtls::SignerRoots::new();
    for t in &mesh.tenants {
        if let Some(tenant) = ca.tenant(&t.name) {
            let mut pem = String::new();
            for root in tenant.own_roots() {
                pem.push_str(&String::from_utf8_lossy(
                    &root.to_pem().map_err(hypha_ca::CaError::from)?,
                ));
            }
            out.insert(t.signer.clone(), pem);
        }
    }
    Ok(out)
}

/// `root-cert.pem` in the data directory: the roots the control plane's certificate may chain
/// to (its tenant's, two mid-rotation), for clients of its TLS servers (`--ca-root`).
fn write_root_cert(ca: &Ca, caller: &Caller, data_dir: &Path) -> Result<PathBuf, SecurityError> {
    let mut pem = Vec::new();
    if let Some(t) = ca.tenant_of(&caller.namespace) {
        for root in t.own_roots() {
            pem.extend(root.to_pem().map_err(hypha_ca::CaError::from)?);
        }
    }
    let path = data_dir.join(ROOT_CERT_FILE);
    let tmp = data_dir.join(format!(".{ROOT_CERT_FILE}.tmp"));
    std::fs::write(&tmp, pem).map_err(|e| SecurityError::Write(tmp.clone(), e))?;
    std::fs::rename(&tmp, &path).map_err(|e| SecurityError::Write(path.clone(), e))?;
    Ok(path)
}

fn reissue(
    ca: &Ca,
    caller: &Caller,
    token: Option<&Arc<hypha_keys::pkcs11::Token>>,
) -> Result<Credentials, SecurityError> {
    // Every tenant's roots as they are now (a signer may have rotated since).
    let own = own_identity(ca, caller, &ca.all_roots()?, token)?;
    Ok(Credentials::new(own, ClientCert::Optional)?)
}

/// The control plane's own identity, its key in memory or in `token`. Blocking.
fn own_identity(
    ca: &Ca,
    caller: &Caller,
    roots: &[String],
    token: Option<&Arc<hypha_keys::pkcs11::Token>>,
) -> Result<Identity, SecurityError> {
    Ok(match token {
        None => issue_local(ca, caller, OWN_VALIDITY, roots)?,
        Some(t) => issue_local_in_token(ca, caller, OWN_VALIDITY, roots, t)?,
    })
}

/// The deny list in `data_dir` (none: nothing revoked).
fn read_revoked(data_dir: &Path) -> Result<std::collections::HashSet<String>, SecurityError> {
    let path = data_dir.join(hypha_ca::REVOKED_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(hypha_ca::parse_revoked(&text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Default::default()),
        Err(e) => Err(SecurityError::Read(path, e)),
    }
}

/// `hypha ca revoke`: adds `spiffe://<td>/ns/<namespace>/sa/<service account>` to the deny
/// list in `data_dir`. A running control plane reads it within a second: the identity gets
/// no certificate (by token or renewal), its certificates are refused at the control plane,
/// and its xDS streams end. Returns the SPIFFE ID.
pub fn revoke(
    mesh: &MeshConfig,
    data_dir: &Path,
    caller: &Caller,
) -> Result<String, SecurityError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let id = caller.spiffe_id(&mesh.trust_domain)?;
    let path = data_dir.join(hypha_ca::REVOKED_FILE);
    let listed = read_revoked(data_dir)?;
    if !listed.contains(&id) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| SecurityError::Write(path.clone(), e))?;
        writeln!(f, "{id}").map_err(|e| SecurityError::Write(path.clone(), e))?;
    }
    Ok(id)
}

/// `hypha ca issue`: a key and certificate for one identity from the CA in `data_dir`, written
/// to `out` as `key.pem` (0600), `cert-chain.pem` (leaf first) and `root-cert.pem` (the
/// identity's trust bundle): for peers that are not Hypha, which need their key in a file.
/// Blocks like [`Secure::open`]; `hypha ca issue` calls it with no async runtime at all.
pub fn issue_files(
    mesh: &MeshConfig,
    data_dir: &Path,
    caller: &Caller,
    validity: Duration,
    key: hypha_identity::KeyKind,
    out: &Path,
) -> Result<String, SecurityError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let ca = Ca::from_mesh(mesh, data_dir)?;
    ca.set_revoked(read_revoked(data_dir)?);
    let tenant = ca
        .tenant_of(&caller.namespace)
        .ok_or_else(|| hypha_ca::CaError::NoTenant(caller.namespace.clone()))?;
    let bundle = ca.trust_bundle(&tenant.name)?;
    let key = key.generate()?;
    let id = hypha_identity::issue_local_with(&ca, caller, validity, &bundle, key.clone())?;
    std::fs::create_dir_all(out).map_err(|e| SecurityError::Write(out.to_path_buf(), e))?;
    let write = |name: &str, bytes: &[u8], mode: u32| {
        let path = out.join(name);
        let _ = std::fs::remove_file(&path);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .and_then(|mut f| f.write_all(bytes))
            .map_err(|e| SecurityError::Write(path, e))
    };
    let mut chain = Vec::new();
    for c in id.chain() {
        chain.extend(c.to_pem().map_err(hypha_ca::CaError::from)?);
    }
    let key_pem = key
        .private_key_to_pem_pkcs8()
        .map_err(hypha_ca::CaError::from)?;
    write("key.pem", &key_pem, 0o600)?;
    write("cert-chain.pem", &chain, 0o644)?;
    write("root-cert.pem", bundle.concat().as_bytes(), 0o644)?;
    Ok(id.id().to_owned())
}
