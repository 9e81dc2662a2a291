//! A sidecar's first certificate with nothing but its pod's projected service-account token:
//! the CA (served over TLS as `hypha control` serves it) checks the token with the test API
//! server's TokenReview and issues the SPIFFE ID of the namespace and service account the
//! review names, and nothing for a token of another account, another audience, no pod, a
//! deleted pod, an expired token, or when the review cannot be made. The token file is read
//! again for every request, as the kubelet rotates it.

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use boring::x509::X509;
use common::{eventually, TestCluster};
use hypha_apiserver::{ApiServer, Token};
use hypha_config::{Config, MeshConfig};
use hypha_control::security::{Secure, ROOT_CERT_FILE};
use hypha_control::ControlPlane;
use hypha_identity::tls::Peer;
use hypha_identity::{Credential, IdentityError, KeyKind, KeySource, Workload};
use serde_json::Value;

const APP: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: reviews, namespace: shop}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: reviews, namespace: shop}
spec:
  replicas: 1
  selector: {matchLabels: {app: reviews}}
  template:
    metadata: {labels: {app: reviews}}
    spec:
      serviceAccountName: reviews
      containers: [{name: reviews, image: example/reviews:1}]
";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The reviews pod's name and uid, once the Deployment has one.
async fn reviews_pod(api: &ApiServer) -> (String, String) {
    eventually("the Deployment's pod", || !api.list("", "pods").is_empty()).await;
    let p = api.list("", "pods").remove(0);
    let field = |f: &str| p.pointer(f).and_then(Value::as_str).unwrap().to_owned();
    (field("/metadata/name"), field("/metadata/uid"))
}

fn refused(r: &Result<hypha_identity::Identity, IdentityError>, code: tonic::Code, text: &str) {
    match r {
        Err(IdentityError::Refused { code: c, message }) => assert!(
            *c == code && message.contains(text),
            "want {code:?} with {text:?}, got {c:?}: {message}"
        ),
        other => panic!("want {code:?} with {text:?}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_get_certificates_with_their_service_account_token() {
    let cluster = TestCluster::start().await;
    cluster.apply("app.yaml", APP);
    let (pod, uid) = reviews_pod(&cluster.api).await;

    // The CA as `hypha control --kubernetes --listen-tls` runs it.
    let ca_dir = cluster.dir.path().join("ca");
    let secure = Arc::new(Secure::open(&MeshConfig::default(), &ca_dir, None).unwrap());
    // As the control plane, with only the permissions of manifests/base/rbac.yaml.
    secure.review_tokens_with(Arc::new(hypha_kube::TokenReviewer::new(
        cluster.client().await,
    )));
    let cp = ControlPlane::with_mtls(Config::default(), secure.signer_roots().clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let uri = format!("https://{}", listener.local_addr().unwrap());
    let serving = secure.clone();
    tokio::spawn(async move { serving.serve(&cp, listener).await });
    let ca_roots =
        X509::stack_from_pem(&std::fs::read(ca_dir.join(ROOT_CERT_FILE)).unwrap()).unwrap();

    let token_file = cluster.dir.path().join("istio-token");
    let workload = |sa: &str| Workload {
        ca: uri.clone(),
        ca_roots: ca_roots.clone(),
        ca_roots_file: None,
        ca_identity: Peer::OneOf(Arc::from(vec![
            "spiffe://cluster.local/ns/istio-system/sa/hypha-control".to_owned(),
        ])),
        token: Some(Credential::ServiceAccount(token_file.clone())),
        spiffe_id: format!("spiffe://cluster.local/ns/shop/sa/{sa}"),
        keys: KeySource::Software(KeyKind::EcdsaP256),
        validity: Duration::from_secs(600),
    };
    let token = |audience: &str, bound: bool, expires: u64| Token {
        namespace: "shop".into(),
        service_account: "reviews".into(),
        pod: bound.then(|| (pod.clone(), uid.clone())),
        audiences: vec![audience.into()],
        expires,
    };
    let write = |t: Token| std::fs::write(&token_file, cluster.api.issue_token(t)).unwrap();
    let reviews = workload("reviews");

    write(token("istio-ca", true, now() + 3600));
    let id = reviews
        .bootstrap()
        .await
        .expect("a certificate by TokenReview");
    assert_eq!(id.id(), "spiffe://cluster.local/ns/shop/sa/reviews");
    // Another account's identity with this token: refused by the CA's CSR check.
    refused(
        &workload("ratings").bootstrap().await,
        tonic::Code::PermissionDenied,
        "",
    );

    // The file is read again for every request: a rotated-in expired token is refused, the
    // next good one taken (Hypha's own audience too).
    write(token("istio-ca", true, now() - 1));
    refused(
        &reviews.bootstrap().await,
        tonic::Code::Unauthenticated,
        "expired",
    );
    write(token("hypha-ca", true, now() + 3600));
    reviews.bootstrap().await.expect("Hypha's audience");
    write(token("some-other-api", true, now() + 3600));
    refused(
        &reviews.bootstrap().await,
        tonic::Code::Unauthenticated,
        "audiences",
    );
    write(token("istio-ca", false, now() + 3600));
    refused(
        &reviews.bootstrap().await,
        tonic::Code::Unauthenticated,
        "bound to no pod",
    );

    // The pod is gone: its token is worth nothing.
    write(token("istio-ca", true, now() + 3600));
    cluster.kubectl(&["scale", "-n", "shop", "deployment/reviews", "--replicas=0"]);
    eventually("the pod gone", || cluster.api.list("", "pods").is_empty()).await;
    refused(
        &reviews.bootstrap().await,
        tonic::Code::Unauthenticated,
        "no longer exists",
    );

    // No review can be made (the API server is gone): no certificate.
    let TestCluster {
        api, dir: _keep, ..
    } = cluster;
    drop(api);
    refused(
        &reviews.bootstrap().await,
        tonic::Code::Unavailable,
        "reviewed",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_namespace_gets_its_roots_in_a_config_map() {
    let cluster = TestCluster::start().await;
    cluster.apply("app.yaml", APP);
    let ca_dir = cluster.dir.path().join("ca");
    let secure = Secure::open(&MeshConfig::default(), &ca_dir, None).unwrap();
    let cp = ControlPlane::with_mtls(Config::default(), secure.signer_roots().clone());
    let (_files_tx, files) = tokio::sync::watch::channel(Config::default());
    // With only the permissions of manifests/base/rbac.yaml.
    tokio::spawn(hypha_kube::run(cluster.client().await, cp.clone(), files));

    let published = |ns: &str| {
        cluster
            .api
            .get("", "configmaps", ns, hypha_kube::roots::CONFIGMAP)
            .and_then(|cm| {
                cm["data"][hypha_kube::roots::KEY]
                    .as_str()
                    .map(str::to_owned)
            })
    };
    eventually("the roots in namespace shop", || {
        published("shop").is_some()
    })
    .await;
    let bundle = cp.current().trust_bundle("shop").unwrap().to_owned();
    assert_eq!(published("shop").unwrap(), bundle);
    let root = std::fs::read_to_string(ca_dir.join(ROOT_CERT_FILE)).unwrap();
    assert!(
        bundle.contains(root.trim()),
        "the CA's root is in the bundle"
    );
    // A namespace made later gets them too.
    cluster.apply(
        "later.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: later}\n",
    );
    eventually("the roots in a new namespace", || {
        published("later").as_deref() == Some(bundle.as_str())
    })
    .await;
}
