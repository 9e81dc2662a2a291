//! Several control-plane replicas on one cluster, with no state of their own: started at the
//! same moment, they end up with one CA (its signer in a Secret, published by whichever was
//! first), each serves xDS from its own watches, and a sidecar moving from one to the other
//! resumes with the versions it has: nothing it holds is sent again.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{eventually, TestCluster};
use hypha_ca::signer::{CERT_FILE, KEY_FILE};
use hypha_config::{Config, MeshConfig};
use hypha_control::security::ROOT_CERT_FILE;
use hypha_control::{ControlPlane, ProxyInfo};
use hypha_xds::{type_url, DeltaClient};

const APP: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: reviews, namespace: shop}
spec:
  replicas: 2
  selector: {matchLabels: {app: reviews}}
  template:
    metadata: {labels: {app: reviews}}
    spec:
      serviceAccountName: reviews
      containers: [{name: reviews, image: example/reviews:1, ports: [{containerPort: 9080}]}]
";

/// A replica: its control plane, fed by its own watches, serving plaintext xDS.
async fn replica(cluster: &TestCluster) -> (ControlPlane, String) {
    let cp = ControlPlane::new(Config::default());
    let (files_tx, files) = tokio::sync::watch::channel(Config::default());
    let client = cluster.client().await;
    let source = cp.clone();
    tokio::spawn(async move {
        let _files = files_tx;
        hypha_kube::run(client, source, files).await;
    });
    let uri = common::serve(&cp).await;
    (cp, uri)
}

async fn next(c: &mut DeltaClient) -> hypha_xds::Update {
    tokio::time::timeout(Duration::from_secs(10), c.next())
        .await
        .expect("an update within 10 s")
        .unwrap()
        .expect("the stream stays open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_one_ca_and_a_proxy_resumes_on_another() {
    let cluster = TestCluster::start().await;
    cluster.apply("app.yaml", APP);

    // Two replicas start at once, each with a data directory of its own.
    let mesh = MeshConfig::default();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (client_a, client_b) = (cluster.client().await, cluster.client().await);
    let (ra, rb) = tokio::join!(
        hypha_kube::share_signers(&client_a, &mesh, a.path()),
        hypha_kube::share_signers(&client_b, &mesh, b.path()),
    );
    ra.unwrap();
    rb.unwrap();
    for signer in &mesh.signers {
        for file in [KEY_FILE, CERT_FILE] {
            let read =
                |d: &std::path::Path| std::fs::read(d.join(&signer.name).join(file)).unwrap();
            // Compared, never printed: one of them is a private key.
            assert!(
                read(a.path()) == read(b.path()),
                "{} {file} differs",
                signer.name
            );
        }
        let secret = hypha_kube::signers::secret_name(&signer.name);
        assert!(cluster
            .api
            .get("", "secrets", "istio-system", &secret)
            .is_some());
    }
    // The CA of each serves the same root.
    let root = |d: &std::path::Path| {
        hypha_control::security::Secure::open(&mesh, d, None).unwrap();
        std::fs::read(d.join(ROOT_CERT_FILE)).unwrap()
    };
    assert_eq!(root(a.path()), root(b.path()));

    let (cp_a, uri_a) = replica(&cluster).await;
    let (cp_b, uri_b) = replica(&cluster).await;
    let host = "reviews.shop.svc.cluster.local";
    let ready = |cp: &ControlPlane| {
        cp.current()
            .registry
            .service(host, "shop")
            .is_some_and(|s| s.endpoints.len() == 2)
    };
    eventually("both replicas see the pods", || {
        ready(&cp_a) && ready(&cp_b)
    })
    .await;

    let pod = cp_a
        .current()
        .registry
        .service(host, "shop")
        .unwrap()
        .endpoints[0]
        .workload_name
        .clone();
    let node = ProxyInfo {
        id: format!("sidecar~10.0.0.1~{pod}.shop~shop.svc.cluster.local"),
        namespace: "shop".into(),
        service_account: "reviews".into(),
        workload_name: pod,
        ..Default::default()
    }
    .to_node();
    let mut on_a = DeltaClient::connect(uri_a, node.clone()).await.unwrap();
    let mut types = BTreeSet::new();
    while types.len() < 2 {
        let u = next(&mut on_a).await;
        assert!(!u.resources.is_empty(), "{u:?}");
        types.insert(u.type_url.clone());
        on_a.ack_or_nack(&u, Ok(())).await.unwrap();
    }
    let held = on_a.accepted_versions().clone();
    assert!(held[type_url::CLUSTER].len() > 1 && !held[type_url::LISTENER].is_empty());
    drop(on_a);

    // On the other replica with what it holds: the same versions, so nothing is sent again.
    let mut on_b = DeltaClient::connect_with_versions(uri_b, node, held)
        .await
        .unwrap();
    for _ in 0..2 {
        let u = next(&mut on_b).await;
        assert!(u.resources.is_empty() && u.removed.is_empty(), "{u:?}");
        on_b.ack_or_nack(&u, Ok(())).await.unwrap();
    }
}
