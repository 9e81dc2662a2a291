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
    tokens: std::path::PathBuf,
    mesh: hypha_config::MeshConfig,
    _data: tempfile::TempDir,
}

async fn endpoint(mesh: &str, accounts: &[&str]) -> Endpoint {
    let data = tempfile::tempdir().unwrap();
    let tokens = data.path().join("tokens");
    std::fs::create_dir(&tokens).unwrap();
    for a in accounts {
        let sa = a.split_once('.').unwrap().1;
        write_token(&tokens, a, &format!("{sa}-secret"));
    }
    let loaded = hypha_config::load_str("mesh.yaml", mesh);
    assert!(!loaded.has_errors(), "{:?}", loaded.diagnostics);
    let cfg = loaded.config;
    let ca_dir = data.path().join("ca");
    let secure = Arc::new(Secure::open(&cfg.mesh, &ca_dir, Some(&tokens)).unwrap());
    let mesh = cfg.mesh.clone();
    let cp = ControlPlane::with_mtls(cfg, secure.signer_roots().clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let uri = format!("https://{}", listener.local_addr().unwrap());
    // The token directory and the deny list are watched, as `hypha control` does.
    let (watching, watched) = (secure.clone(), cp.clone());
    tokio::spawn(async move { watching.watch(&watched, Duration::from_millis(50)).await });
    tokio::spawn(async move { secure.serve(&cp, listener).await });
    let ca_roots =
        X509::stack_from_pem(&std::fs::read(ca_dir.join(ROOT_CERT_FILE)).unwrap()).unwrap();
    Endpoint {
        uri,
        ca_roots,
        ca_dir,
        tokens,
        mesh,
        _data: data,
    }
}

/// `<dir>/<account>.token` (mode 0600) holding `content`.
fn write_token(dir: &std::path::Path, account: &str, content: &str) {
    let token = dir.join(format!("{account}.token"));
    std::fs::write(&token, content).unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// Retries `attempt` (bounded) until `done` says its answer is the one wanted.
async fn until<T, F: std::future::Future<Output = T>>(
    what: &str,
    mut attempt: impl FnMut() -> F,
    done: impl Fn(&T) -> bool,
) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let got = attempt().await;
        if done(&got) {
            return got;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn refused_with(
    r: &Result<hypha_identity::Identity, IdentityError>,
    code: tonic::Code,
    text: &str,
) -> bool {
    matches!(r, Err(IdentityError::Refused { code: c, message }) if *c == code && message.contains(text))
}

impl Endpoint {
    fn workload(&self, ns: &str, sa: &str, token: Option<&str>) -> Workload {
        Workload {
            ca: self.uri.clone(),
            ca_roots: self.ca_roots.clone(),
            ca_roots_file: None,
            ca_identity: control_plane_id(),
            token: token.map(Into::into),
            spiffe_id: format!("spiffe://{TD}/ns/{ns}/sa/{sa}"),
            keys: KeySource::Software(KeyKind::EcdsaP256),
            validity: Duration::from_secs(600),
        }
    }

    /// A mutual-TLS connection to the endpoint with `identity`.
    async fn channel(&self, identity: &hypha_identity::Identity) -> tonic::transport::Channel {
        let connector = hypha_identity::tls::client(Some(identity), &self.ca_roots).unwrap();
        hypha_identity::grpc::channel(&self.uri, connector, control_plane_id())
            .await
            .unwrap()
    }

    /// An xDS stream as `node`, over a new mutual-TLS connection with `identity`.
    async fn xds(&self, identity: &hypha_identity::Identity, node: &ProxyInfo) -> DeltaClient {
        xds_over(self.channel(identity).await, node).await
    }
}

/// An xDS stream as `node` on `channel`.
async fn xds_over(channel: tonic::transport::Channel, node: &ProxyInfo) -> DeltaClient {
    DeltaClient::over(channel, node.to_node(), Versions::new())
        .await
        .unwrap()
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
            also_trusted: Vec::new(),
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

#[tokio::test]
async fn join_tokens_are_read_again_and_can_expire() {
    let e = endpoint(WORKLOADS, &["shop.web"]).await;
    let reviews = e.workload("shop", "reviews", Some("reviews-secret"));
    let unknown = reviews.bootstrap().await;
    assert!(
        refused_with(&unknown, tonic::Code::Unauthenticated, "unknown token"),
        "{unknown:?}"
    );
    // A token added to the directory is taken without a restart.
    write_token(&e.tokens, "shop.reviews", "reviews-secret\n");
    until("the new token taken", || reviews.bootstrap(), Result::is_ok)
        .await
        .unwrap();
    // A token past its expiry is refused; one before it is taken.
    write_token(
        &e.tokens,
        "shop.late",
        "late-secret\nexpires: 2000-01-01T00:00:00Z\n",
    );
    write_token(
        &e.tokens,
        "shop.early",
        "early-secret\nexpires: 2999-01-01T00:00:00Z\n",
    );
    let early = e.workload("shop", "early", Some("early-secret"));
    until("the early token taken", || early.bootstrap(), Result::is_ok)
        .await
        .unwrap();
    let late = e
        .workload("shop", "late", Some("late-secret"))
        .bootstrap()
        .await;
    assert!(
        refused_with(&late, tonic::Code::Unauthenticated, "expired"),
        "{late:?}"
    );
    // A directory that no longer reads (a token file others may read) changes nothing.
    write_token(&e.tokens, "shop.loose", "loose-secret");
    std::fs::set_permissions(
        e.tokens.join("shop.loose.token"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(reviews.bootstrap().await.is_ok());
}

#[tokio::test]
async fn a_revoked_identity_renews_nothing_and_loses_its_config() {
    let e = endpoint(WORKLOADS, &["shop.web"]).await;
    let web = e.workload("shop", "web", Some("web-secret"));
    let id = web.bootstrap().await.unwrap();
    let own = node("shop", "web", "web-1", &[("app", "web")]);
    let connection = e.channel(&id).await;
    let mut stream = xds_over(connection.clone(), &own).await;
    assert!(first(&mut stream).await.is_ok());

    let revoked =
        hypha_control::security::revoke(&e.mesh, &e.ca_dir, &Caller::new("shop", "web")).unwrap();
    assert_eq!(revoked, format!("spiffe://{TD}/ns/shop/sa/web"));
    // Renewal is refused once the control plane has read the deny list (within its poll).
    let renewing = e.workload("shop", "web", None);
    let renewal = until("renewal refused", || renewing.renew(&id), |r| r.is_err()).await;
    assert!(
        refused_with(&renewal, tonic::Code::PermissionDenied, "revoked"),
        "{renewal:?}"
    );
    // So is a new certificate by join token, and a new xDS stream; the open one has ended.
    let again = web.bootstrap().await;
    assert!(
        refused_with(&again, tonic::Code::PermissionDenied, "revoked"),
        "{again:?}"
    );
    let status = first(&mut e.xds(&id, &own).await).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    // Also on the connection it opened before the revocation.
    let status = first(&mut xds_over(connection, &own).await)
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    let ended = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match stream.next().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the open stream ends");
    assert!(!matches!(ended, Ok(Some(_))), "{ended:?}");
}
