//! What a compromise gets at the control plane's secure endpoint (xDS and the CA over TLS):
//! one tenant's leaked signer key mints no identity of another tenant (the endpoint trusts
//! every tenant's root, yet a client certificate counts only if it comes from the signer of
//! its own namespace's tenant); one workload's key takes no other workload's config, and its
//! NACKs mute nothing for anyone else.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use boring::x509::X509;
use hypha_ca::{Ca, Caller, FileSigner, TenantCa};
use hypha_control::security::{Secure, ROOT_CERT_FILE};
use hypha_control::ControlPlane;
use hypha_identity::tls::Peer;
use hypha_identity::{IdentityError, KeyKind, KeySource, Workload};
use hypha_xds::{DeltaClient, ProxyInfo, Versions};
use tokio::net::TcpListener;

const TD: &str = "cluster.local";

/// Tenant `a` (namespace `shop`, the root namespace) on signer `sa`; tenant `b` (the rest) on
/// signer `sb`; nothing shared.
const MESH: &str = "apiVersion: hypha.dev/v1alpha1
kind: MeshConfig
metadata: {name: m}
spec:
  trustDomain: cluster.local
  signers: [{name: sa}, {name: sb}]
  tenants:
  - {name: a, namespaces: [shop, istio-system], signer: sa}
  - {name: b, namespaces: ['*'], signer: sb}
";

fn control_plane_id() -> Peer {
    Peer::OneOf(Arc::from(vec![format!(
        "spiffe://{TD}/ns/istio-system/sa/hypha-control"
    )]))
}

/// A control plane serving `mesh` over TLS with join tokens for `<ns>.<sa>` (`<sa>-secret`).
struct Endpoint {
    uri: String,
    ca_roots: Vec<X509>,
    ca_dir: std::path::PathBuf,
    _data: tempfile::TempDir,
}

async fn endpoint(mesh: &str, accounts: &[&str]) -> Endpoint {
    let data = tempfile::tempdir().unwrap();
    let tokens = data.path().join("tokens");
    std::fs::create_dir(&tokens).unwrap();
    for a in accounts {
        let token = tokens.join(format!("{a}.token"));
        let sa = a.split_once('.').unwrap().1;
        std::fs::write(&token, format!("{sa}-secret")).unwrap();
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let loaded = hypha_config::load_str("mesh.yaml", mesh);
    assert!(!loaded.has_errors(), "{:?}", loaded.diagnostics);
    let cfg = loaded.config;
    let ca_dir = data.path().join("ca");
    let secure = Arc::new(Secure::open(&cfg.mesh, &ca_dir, Some(&tokens)).unwrap());
    let cp = ControlPlane::with_mtls(cfg, secure.signer_roots().clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let uri = format!("https://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { secure.serve(&cp, listener).await });
    let ca_roots =
        X509::stack_from_pem(&std::fs::read(ca_dir.join(ROOT_CERT_FILE)).unwrap()).unwrap();
    Endpoint {
        uri,
        ca_roots,
        ca_dir,
        _data: data,
    }
}

impl Endpoint {
    fn workload(&self, ns: &str, sa: &str, token: Option<&str>) -> Workload {
        Workload {
            ca: self.uri.clone(),
            ca_roots: self.ca_roots.clone(),
            ca_identity: control_plane_id(),
            token: token.map(str::to_owned),
            spiffe_id: format!("spiffe://{TD}/ns/{ns}/sa/{sa}"),
            keys: KeySource::Software(KeyKind::EcdsaP256),
            validity: Duration::from_secs(600),
        }
    }

    /// An xDS stream as `node`, over mutual TLS with `identity`.
    async fn xds(&self, identity: &hypha_identity::Identity, node: &ProxyInfo) -> DeltaClient {
        let connector = hypha_identity::tls::client(Some(identity), &self.ca_roots).unwrap();
        let channel = hypha_identity::grpc::channel(&self.uri, connector, control_plane_id())
            .await
            .unwrap();
        DeltaClient::over(channel, node.to_node(), Versions::new())
            .await
            .unwrap()
    }
}

/// The sidecar of workload `workload` in `ns`, running as `sa`, with `labels`.
fn node(ns: &str, sa: &str, workload: &str, labels: &[(&str, &str)]) -> ProxyInfo {
    ProxyInfo {
        id: format!("sidecar~127.0.0.1~{workload}.{ns}~{ns}.svc.cluster.local"),
        namespace: ns.into(),
        service_account: sa.into(),
        workload_name: workload.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ips: vec!["127.0.0.1".parse().unwrap()],
    }
}

/// The first thing a stream says: an update, or the status that refused it.
async fn first(xds: &mut DeltaClient) -> Result<hypha_xds::Update, tonic::Status> {
    match tokio::time::timeout(Duration::from_secs(15), xds.next())
        .await
        .expect("an answer in time")
    {
        Ok(Some(u)) => Ok(u),
        Err(hypha_xds::ClientError::Stream(status)) => Err(*status),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn a_leaked_tenant_signer_mints_no_other_tenants_identity() {
    let e = endpoint(MESH, &["shop.web"]).await;
    let workload = |token: Option<&str>| e.workload("shop", "web", token);
    // The genuine shop/web certificate (tenant a's signer) renews.
    let genuine = workload(Some("web-secret")).bootstrap().await.unwrap();
    workload(None).renew(&genuine).await.unwrap();

    // Tenant b's signer key, as whoever stole it from tenant b holds it, mints shop/web.
    let stolen = FileSigner::open_or_create(&e.ca_dir.join("sb"), TD, "stolen").unwrap();
    let rogue = Ca::new(
        TD,
        vec![TenantCa {
            name: "rogue".into(),
            namespaces: vec!["*".into()],
            trust_tenants: vec![],
            signer: Arc::new(stolen),
            max_validity: Duration::from_secs(3600),
        }],
    )
    .unwrap();
    let forged = hypha_identity::issue_local(
        &rogue,
        &Caller::new("shop", "web"),
        Duration::from_secs(600),
        &rogue.all_roots().unwrap(),
    )
    .unwrap();
    assert_eq!(forged.id(), genuine.id());
    // Renewal with it: refused.
    match workload(None).renew(&forged).await {
        Err(IdentityError::Refused { code, message }) => {
            assert_eq!(code, tonic::Code::PermissionDenied, "{message}");
            assert!(
                message.contains("not from the signer of tenant \"a\""),
                "{message}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // xDS with it: refused.
    let mut xds = e.xds(&forged, &node("shop", "web", "web-1", &[])).await;
    let status = first(&mut xds).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("not from the signer"),
        "{status:?}"
    );
}

/// `web-1` runs as `web`, `reviews-1` as `reviews`, both in `shop`.
const WORKLOADS: &str = "apiVersion: hypha.dev/v1alpha1
kind: MeshConfig
metadata: {name: m}
spec: {trustDomain: cluster.local}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web, namespace: shop}
spec:
  hosts: [web.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}]
  workloadSelector: {labels: {app: web}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: web-1, namespace: shop}
spec: {address: 127.0.0.1, serviceAccount: web, labels: {app: web}, ports: {http: 8080}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}]
  workloadSelector: {labels: {app: reviews}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-1, namespace: shop}
spec: {address: 127.0.0.2, serviceAccount: reviews, labels: {app: reviews}, ports: {http: 9080}}
";

#[tokio::test]
async fn a_workload_takes_no_other_workloads_config() {
    let e = endpoint(WORKLOADS, &["shop.web"]).await;
    let web = e
        .workload("shop", "web", Some("web-secret"))
        .bootstrap()
        .await
        .unwrap();
    // Its own workload, labels and node id: config arrives.
    let own = node("shop", "web", "web-1", &[("app", "web")]);
    assert!(first(&mut e.xds(&web, &own).await).await.is_ok());
    // Another workload's name, labels or node id, with its own service account: refused.
    let mut stolen_id = own.clone();
    stolen_id.id = "sidecar~127.0.0.2~reviews-1.shop~shop.svc.cluster.local".into();
    for (what, claim) in [
        (
            "workload",
            node("shop", "web", "reviews-1", &[("app", "reviews")]),
        ),
        (
            "labels",
            node("shop", "web", "web-1", &[("app", "reviews")]),
        ),
        ("node id", stolen_id),
    ] {
        let status = first(&mut e.xds(&web, &claim).await).await.unwrap_err();
        assert_eq!(
            status.code(),
            tonic::Code::PermissionDenied,
            "{what}: {status:?}"
        );
    }
}

#[tokio::test]
async fn a_workload_nacks_nothing_away_from_another() {
    let e = endpoint(WORKLOADS, &["shop.web", "shop.client"]).await;
    let web = e
        .workload("shop", "web", Some("web-secret"))
        .bootstrap()
        .await
        .unwrap();
    let client = e
        .workload("shop", "client", Some("client-secret"))
        .bootstrap()
        .await
        .unwrap();
    // `web` connects under the node id of the `client` sidecar (a workload the registry does
    // not know, so nothing ties the id to an account) and NACKs what it gets.
    let theirs = node("shop", "client", "client-1", &[]);
    let mut posing = ProxyInfo {
        service_account: "web".into(),
        ..theirs.clone()
    };
    posing.labels.clear();
    let mut attacker = e.xds(&web, &posing).await;
    let update = first(&mut attacker).await.unwrap();
    assert!(!update.resources.is_empty());
    let rejected: Vec<String> = update.resources.iter().map(|r| r.name.clone()).collect();
    attacker
        .ack_or_nack(&update, Err("not today".into()))
        .await
        .unwrap();
    // Let the NACK land before the real client connects.
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(attacker);
    // The real client still gets every one of them.
    let mut real = e.xds(&client, &theirs).await;
    let got = first(&mut real).await.unwrap();
    assert_eq!(got.type_url, update.type_url);
    for name in &rejected {
        assert!(
            got.resources.iter().any(|r| &r.name == name),
            "{name} was muted for the real client"
        );
    }
}
