//! A cluster for the Kubernetes source's tests: the test API server with its controllers, a
//! kubectl for the user (an administrator), and the control plane's own kubeconfig, whose
//! token is the `hypha-control` service account's: RBAC lets it do what `manifests/base/rbac.yaml`
//! grants and nothing else, as on a real cluster.

#![allow(dead_code)]

pub mod cert_manager;

use std::path::{Path, PathBuf};
use std::time::Duration;

use hypha_apiserver::ApiServer;

pub struct TestCluster {
    pub api: ApiServer,
    pub dir: tempfile::TempDir,
    /// The control plane's kubeconfig.
    pub control: PathBuf,
}

impl TestCluster {
    pub async fn start() -> TestCluster {
        let api = ApiServer::start().await.unwrap();
        api.run_controllers();
        let dir = tempfile::tempdir().unwrap();
        api.write_kubeconfig(dir.path()).unwrap();
        let rbac = dir.path().join("rbac.yaml");
        std::fs::write(
            &rbac,
            format!("{}\n---\n{}", hypha_kube::NAMESPACES, hypha_kube::RBAC),
        )
        .unwrap();
        kubectl(dir.path(), &["apply", "-f", rbac.to_str().unwrap()]);
        let token = api.issue_account_token(hypha_kube::CONTROL_NAMESPACE, "hypha-control");
        let control = api
            .write_kubeconfig_as(&dir.path().join("control.kubeconfig"), &token)
            .unwrap();
        TestCluster { api, dir, control }
    }

    /// kubectl as the cluster's administrator.
    pub fn kubectl(&self, args: &[&str]) -> String {
        kubectl(self.dir.path(), args)
    }

    /// Writes `yaml` to `name` in the test's directory and applies it.
    pub fn apply(&self, name: &str, yaml: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, yaml).unwrap();
        self.kubectl(&["apply", "-f", path.to_str().unwrap()]);
        path
    }

    /// A client as the control plane.
    pub async fn client(&self) -> kube::Client {
        hypha_kube::connect(Some(&self.control)).await.unwrap()
    }
}

pub fn kubectl(dir: &Path, args: &[&str]) -> String {
    hypha_apiserver::kubectl(dir, args).unwrap_or_else(|e| panic!("{e}"))
}

/// Polls `check` every 50 ms for up to 10 s.
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..200 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: not within 10 s");
}

/// Serves `cp`'s xDS in plaintext on a free loopback port; its URI.
pub async fn serve(cp: &hypha_control::ControlPlane) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let uri = format!("http://{}", listener.local_addr().unwrap());
    let serving = cp.clone();
    tokio::spawn(async move { serving.serve(listener).await });
    uri
}

pub enum San<'a> {
    Uri(&'a str),
    Dns(&'a str),
}

/// A CSR (base64 of its PEM, as CSR objects carry it) for a fresh P-256 key and these names,
/// as cert-manager makes one.
pub fn csr_base64(sans: &[San]) -> String {
    use boring::ec::{EcGroup, EcKey};
    use boring::nid::Nid;

    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    csr_base64_for(
        &boring::pkey::PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap(),
        sans,
    )
}

/// [`csr_base64`] for a given key.
pub fn csr_base64_for(key: &boring::pkey::PKey<boring::pkey::Private>, sans: &[San]) -> String {
    use base64::Engine as _;
    use boring::hash::MessageDigest;
    use boring::stack::Stack;
    use boring::x509::extension::SubjectAlternativeName;
    use boring::x509::X509Req;

    let mut b = X509Req::builder().unwrap();
    b.set_pubkey(key).unwrap();
    let mut san = SubjectAlternativeName::new();
    for s in sans {
        match s {
            San::Uri(u) => san.uri(u),
            San::Dns(d) => san.dns(d),
        };
    }
    let ext = san.build(&b.x509v3_context(None)).unwrap();
    let mut exts = Stack::new().unwrap();
    exts.push(ext).unwrap();
    b.add_extensions(&exts).unwrap();
    b.sign(key, MessageDigest::sha256()).unwrap();
    base64::engine::general_purpose::STANDARD.encode(b.build().to_pem().unwrap())
}

/// Whether `leaf` chains to `root` alone, by BoringSSL's verifier.
pub fn verifies(leaf: &boring::x509::X509, root: &boring::x509::X509) -> bool {
    use boring::stack::Stack;
    use boring::x509::store::X509StoreBuilder;
    use boring::x509::X509StoreContext;

    let mut store = X509StoreBuilder::new().unwrap();
    store.add_cert(root.clone()).unwrap();
    let store = store.build();
    let mut ctx = X509StoreContext::new().unwrap();
    ctx.init(&store, leaf, &Stack::new().unwrap(), |c| c.verify_cert())
        .unwrap()
}

/// A mesh config's MeshConfig and the CA it makes, its file signers under `dir`.
pub fn mesh_ca(yaml: &str, dir: &Path) -> (hypha_config::MeshConfig, std::sync::Arc<hypha_ca::Ca>) {
    let mesh = hypha_config::load_str("mesh.yaml", yaml)
        .into_result()
        .unwrap()
        .0
        .mesh;
    let ca = hypha_ca::Ca::from_mesh(&mesh, dir).unwrap();
    (mesh, std::sync::Arc::new(ca))
}

/// The URI SANs of a certificate.
pub fn uri_sans(cert: &boring::x509::X509Ref) -> Vec<String> {
    cert.subject_alt_names()
        .into_iter()
        .flatten()
        .filter_map(|n| n.uri().map(str::to_owned))
        .collect()
}
