//! Root rotation with two control-plane replicas on one cluster, each with a data directory of
//! its own and only the control plane's RBAC: `hypha ca rotate --kubernetes` puts the next
//! generation in the signer's Secret and phase 1 in the ConfigMap; both replicas put it in
//! force and push both roots; the Lease holder moves on only once the proxies of *both*
//! replicas acknowledged their bundles; both then sign with the new key; after the old key's
//! certificates have expired, the old root leaves every bundle and its key the Secret.

mod common;

use std::sync::Arc;
use std::time::Duration;

use boring::x509::X509;
use common::{eventually, TestCluster};
use hypha_ca::Caller;
use hypha_config::{Config, MeshConfig};
use hypha_control::mtls::ROOTCA;
use hypha_control::security::Secure;
use hypha_control::{ControlPlane, ProxyInfo};
use hypha_xds::{type_url, DeltaClient, Update};
use serde_json::Value;

const MESH: &str = "apiVersion: hypha.dev/v1alpha1
kind: MeshConfig
metadata: {name: mesh}
spec:
  signers:
  - {name: default, maxCertificateTtl: 3s}
  tenants:
  - {name: default, namespaces: ['*'], signer: default}
";

fn mesh() -> MeshConfig {
    let loaded = hypha_config::load_str("mesh.yaml", MESH);
    assert!(!loaded.has_errors(), "{:?}", loaded.diagnostics);
    loaded.config.mesh
}

/// A replica: its CA from its own data directory, its control plane serving plaintext xDS,
/// its rotation step every 100 ms, and the cluster's rotation service.
async fn replica(
    cluster: &TestCluster,
    mesh: &MeshConfig,
    dir: &std::path::Path,
    name: &str,
) -> (Arc<Secure>, String) {
    let client = cluster.client().await;
    hypha_kube::share_signers(&client, mesh, dir).await.unwrap();
    let secure = Arc::new(Secure::open(mesh, dir, None).unwrap());
    // As `hypha control --kubernetes` does: phases move on the Lease holder's word only.
    secure.rotate_elsewhere();
    let cfg = Config {
        mesh: mesh.clone(),
        ..Config::default()
    };
    let cp = ControlPlane::with_mtls(cfg, secure.signer_roots());
    let uri = common::serve(&cp).await;
    let watching = secure.clone();
    tokio::spawn(async move { watching.watch(&cp, Duration::from_millis(100)).await });
    let lease = hypha_kube::lease::LeaseConfig::new(
        "hypha-system",
        hypha_kube::rotation::LEASE,
        name,
        Duration::from_secs(3),
    );
    let service = hypha_kube::rotation::service(client, mesh.clone(), dir.to_path_buf(), lease);
    tokio::spawn((service.0)(secure.clone()));
    (secure, uri)
}

async fn proxy(uri: &str, workload: &str) -> DeltaClient {
    let node = ProxyInfo {
        id: format!("sidecar~10.0.0.9~{workload}.shop~shop.svc.cluster.local"),
        namespace: "shop".into(),
        service_account: "reviews".into(),
        workload_name: workload.into(),
        ..Default::default()
    }
    .to_node();
    let mut c = DeltaClient::connect(uri.to_owned(), node).await.unwrap();
    c.subscribe(type_url::SECRET, [ROOTCA]).await.unwrap();
    c
}

/// The next trust bundle sent, other types acknowledged on the way.
async fn next_bundle(c: &mut DeltaClient) -> (Update, Vec<String>) {
    loop {
        let u = tokio::time::timeout(Duration::from_secs(20), c.next())
            .await
            .expect("an update")
            .unwrap()
            .expect("the stream stays open");
        if u.type_url != type_url::SECRET {
            c.ack_or_nack(&u, Ok(())).await.unwrap();
            continue;
        }
        let text = String::from_utf8_lossy(&u.resources[0].body.value).into_owned();
        let start = text.find("-----BEGIN").unwrap_or(0);
        let end = text
            .rfind("-----END CERTIFICATE-----")
            .map_or(text.len(), |e| e + 25);
        let roots = X509::stack_from_pem(&text.as_bytes()[start..end])
            .unwrap()
            .iter()
            .map(hypha_ca::signer::fingerprint)
            .collect();
        return (u, roots);
    }
}

/// The ConfigMap the replicas share.
fn shared(cluster: &TestCluster) -> Option<Value> {
    cluster.api.get(
        "",
        "configmaps",
        "istio-system",
        hypha_kube::rotation::CONFIGMAP,
    )
}

fn state(cluster: &TestCluster) -> Value {
    shared(cluster)
        .and_then(|cm| {
            let json = cm.pointer("/data/state.default")?.as_str()?.to_owned();
            serde_json::from_str(&json).ok()
        })
        .unwrap_or(Value::Null)
}

fn phase(cluster: &TestCluster) -> String {
    let s = state(cluster);
    match s.pointer("/rotation/phase").and_then(Value::as_str) {
        Some(p) => p.to_owned(),
        None => format!("idle at generation {}", s["generation"]),
    }
}

fn signing_root(secure: &Secure) -> String {
    use base64::Engine as _;
    let csr = base64::engine::general_purpose::STANDARD
        .decode(common::csr_base64(&[common::San::Uri(
            "spiffe://cluster.local/ns/shop/sa/reviews",
        )]))
        .unwrap();
    let issued = secure
        .ca()
        .issue(
            &Caller::new("shop", "reviews"),
            &csr,
            Duration::from_secs(3),
        )
        .unwrap();
    hypha_ca::signer::fingerprint(&X509::from_pem(issued.chain[1].as_bytes()).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_rotate_a_root_together() {
    let cluster = TestCluster::start().await;
    let mesh = mesh();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (secure_a, uri_a) = replica(&cluster, &mesh, a.path(), "replica-a").await;
    let (secure_b, uri_b) = replica(&cluster, &mesh, b.path(), "replica-b").await;
    let mut on_a = proxy(&uri_a, "reviews-a").await;
    let mut on_b = proxy(&uri_b, "reviews-b").await;
    let (first_a, roots) = next_bundle(&mut on_a).await;
    assert_eq!(roots.len(), 1);
    let old = roots[0].clone();
    on_a.ack_or_nack(&first_a, Ok(())).await.unwrap();
    let (first_b, roots_b) = next_bundle(&mut on_b).await;
    assert_eq!(
        roots_b,
        std::slice::from_ref(&old),
        "one CA for both replicas"
    );
    on_b.ack_or_nack(&first_b, Ok(())).await.unwrap();
    assert_eq!(signing_root(&secure_a), old);

    // `hypha ca rotate --kubernetes`, as the control plane's RBAC allows it.
    let scratch = tempfile::tempdir().unwrap();
    let started =
        hypha_kube::rotation::start(&cluster.client().await, &mesh, "default", scratch.path())
            .await
            .unwrap();
    assert_eq!(started.old_root, old);
    let new = started.new_root.clone();
    let secret = cluster
        .api
        .get("", "secrets", "istio-system", "hypha-ca-default")
        .unwrap();
    assert!(secret.pointer("/data/gen-1.ca-key.pem").is_some());
    assert_eq!(phase(&cluster), "distributing");

    // Both replicas push both roots; only replica a's proxy acknowledges.
    let (update_a, roots_a) = next_bundle(&mut on_a).await;
    assert_eq!(roots_a, [old.clone(), new.clone()]);
    on_a.ack_or_nack(&update_a, Ok(())).await.unwrap();
    let (update_b, roots_b) = next_bundle(&mut on_b).await;
    assert_eq!(roots_b, [old.clone(), new.clone()]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        phase(&cluster),
        "distributing",
        "a proxy of replica b has not acknowledged"
    );
    assert_eq!(signing_root(&secure_a), old);
    assert_eq!(signing_root(&secure_b), old);

    // Once it has, the leader moves on and both replicas sign with the new key.
    on_b.ack_or_nack(&update_b, Ok(())).await.unwrap();
    let until = tokio::time::Instant::now() + Duration::from_secs(15);
    while phase(&cluster) != "issuing" {
        assert!(
            tokio::time::Instant::now() < until,
            "still {}",
            phase(&cluster)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eventually("both replicas sign with the new key", || {
        signing_root(&secure_a) == new && signing_root(&secure_b) == new
    })
    .await;

    // The proxies keep acknowledging; after the old key's certificates have expired (3 s),
    // the old root leaves both replicas' bundles, and its key the Secret.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for (mut c, side) in [(on_a, "a"), (on_b, "b")] {
        let tx = tx.clone();
        tokio::spawn(async move {
            loop {
                let (u, roots) = next_bundle(&mut c).await;
                c.ack_or_nack(&u, Ok(())).await.unwrap();
                if tx.send((side, roots)).is_err() {
                    return;
                }
            }
        });
    }
    let mut last = std::collections::BTreeMap::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    while !(last.get("a") == Some(&vec![new.clone()]) && last.get("b") == Some(&vec![new.clone()]))
    {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        let (side, roots) = tokio::time::timeout(left, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("bundles {last:?}, phase {}", phase(&cluster)))
            .unwrap();
        last.insert(side, roots);
    }
    assert_eq!(phase(&cluster), "idle at generation 1");
    let secret = cluster
        .api
        .get("", "secrets", "istio-system", "hypha-ca-default")
        .unwrap();
    assert!(
        secret.pointer("/data/ca-key.pem").is_none(),
        "the retired key left the Secret"
    );
    assert!(secret.pointer("/data/ca-cert.pem").is_some());
    eventually(
        "the replicas deleted their copies of the retired key",
        || {
            !a.path().join("default/ca-key.pem").exists()
                && !b.path().join("default/ca-key.pem").exists()
        },
    )
    .await;
    // Both replicas reported; a restarted replica takes the new generation from the cluster.
    let cm = shared(&cluster).unwrap();
    for r in ["replica.replica-a", "replica.replica-b"] {
        assert!(cm.pointer(&format!("/data/{r}")).is_some(), "{r}");
    }
    let c = tempfile::tempdir().unwrap();
    hypha_kube::share_signers(&cluster.client().await, &mesh, c.path())
        .await
        .unwrap();
    let restarted = Secure::open(&mesh, c.path(), None).unwrap();
    assert_eq!(signing_root(&restarted), new);
    assert_eq!(restarted.ca().trust_bundle("default").unwrap().len(), 1);
}
