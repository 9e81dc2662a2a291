//! The cert-manager external issuer against the test API server, with cert-manager's
//! CertificateRequest kind registered and requests shaped as cert-manager v1 creates them,
//! approved or denied as its approver does (the `Approved`/`Denied` conditions): nothing is
//! signed before approval, an Issuer signs its own namespace's names with its tenant's root
//! (`status.ca`, the chain verified with BoringSSL), a ClusterIssuer its tenant's namespaces, a
//! name outside either is `Failed` with the reason, a denied request is closed, and issuers say
//! whether they can sign.

mod common;

use base64::Engine as _;
use boring::x509::X509;
use common::cert_manager::{certificate_request, decide, CERT_MANAGER_CRD};
use common::{eventually, mesh_ca, verifies, San, TestCluster};
use serde_json::Value;

const MESH: &str = "\
apiVersion: hypha.dev/v1alpha1
kind: MeshConfig
metadata: {name: mesh}
spec:
  signers:
  - {name: blue, maxCertificateTtl: 24h}
  - {name: default, maxCertificateTtl: 24h}
  tenants:
  - {name: blue, namespaces: [blue, blue-two], signer: blue}
  - {name: default, namespaces: ['*'], signer: default}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cert_manager_requests_are_signed_by_their_issuers_tenant_within_its_scope() {
    let cluster = TestCluster::start().await;
    let data = tempfile::tempdir().unwrap();
    let (mesh, ca) = mesh_ca(MESH, data.path());
    let crds = hypha_kube::install::yaml(&hypha_kube::crds::hypha());
    cluster.apply("crds.yaml", &format!("{crds}---\n{CERT_MANAGER_CRD}"));
    let ns = |n: &str| format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {n}}}\n");
    cluster.apply(
        "setup.yaml",
        &[
            ns("blue"),
            ns("blue-two"),
            ns("shop"),
            "apiVersion: hypha.dev/v1alpha1\nkind: Issuer\nmetadata: {name: blue, namespace: blue}\nspec: {tenant: blue}\n".into(),
            "apiVersion: hypha.dev/v1alpha1\nkind: Issuer\nmetadata: {name: lost, namespace: blue}\nspec: {tenant: nope}\n".into(),
            "apiVersion: hypha.dev/v1alpha1\nkind: ClusterIssuer\nmetadata: {name: blue}\nspec: {tenant: blue}\n".into(),
            "apiVersion: hypha.dev/v1alpha1\nkind: ClusterIssuer\nmetadata: {name: mesh}\nspec: {tenant: default}\n".into(),
        ]
        .join("---\n"),
    );
    let issuer = tokio::spawn(hypha_kube::issuer::run(cluster.client().await, ca.clone()));
    let td = ca.trust_domain().to_owned();
    let spiffe = |ns: &str, sa: &str| format!("spiffe://{td}/ns/{ns}/sa/{sa}");
    let hypha = |kind| ("hypha.dev", kind, "");
    let get = |ns: &str, name: &str| {
        cluster
            .api
            .get("cert-manager.io", "certificaterequests", ns, name)
            .unwrap()
    };
    let ready = |obj: &Value| -> Option<(String, String, String)> {
        let c = obj
            .pointer("/status/conditions")?
            .as_array()?
            .iter()
            .find(|c| c["type"] == "Ready")?;
        let s = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
        Some((s("status"), s("reason"), s("message")))
    };

    // The issuers say whether they can sign.
    eventually("issuers Ready", || {
        let i = |kind: &str, ns: &str, name: &str| {
            let resource = if kind == "Issuer" {
                "issuers"
            } else {
                "clusterissuers"
            };
            cluster
                .api
                .get("hypha.dev", resource, ns, name)
                .as_ref()
                .and_then(ready)
        };
        i("Issuer", "blue", "blue").is_some_and(|r| r.0 == "True")
            && i("ClusterIssuer", "", "mesh").is_some_and(|r| r.0 == "True")
            && i("Issuer", "blue", "lost").is_some_and(|r| r.0 == "False" && r.1 == "UnknownTenant")
    })
    .await;

    let with = |kind: &'static str, name: &'static str| {
        let (g, k, _) = hypha(kind);
        (g, k, name)
    };
    let web_id = spiffe("blue", "web");
    let requests = [
        (
            "blue",
            "web",
            with("Issuer", "blue"),
            vec![San::Dns("web.blue.svc"), San::Uri(&web_id)],
        ),
        (
            "blue",
            "too-wide",
            with("Issuer", "blue"),
            vec![San::Dns("web.blue-two.svc")],
        ),
        (
            "blue",
            "denied",
            with("Issuer", "blue"),
            vec![San::Dns("web.blue.svc")],
        ),
        (
            "blue-two",
            "cluster-wide",
            with("ClusterIssuer", "blue"),
            vec![San::Dns("api.blue-two.svc.cluster.local")],
        ),
        (
            "shop",
            "other-tenant",
            with("ClusterIssuer", "blue"),
            vec![San::Dns("cart.shop.svc")],
        ),
        (
            "shop",
            "mesh",
            with("ClusterIssuer", "mesh"),
            vec![San::Dns("*.shop.svc")],
        ),
        (
            "shop",
            "public-name",
            with("ClusterIssuer", "mesh"),
            vec![San::Dns("shop.example.com")],
        ),
        (
            "shop",
            "not-ours",
            ("cert-manager.io", "ClusterIssuer", "letsencrypt"),
            vec![San::Dns("cart.shop.svc")],
        ),
    ];
    let all: Vec<String> = requests
        .iter()
        .map(|(ns, name, issuer, sans)| certificate_request(ns, name, *issuer, sans))
        .collect();
    cluster.apply("requests.yaml", &all.join("---\n"));

    // Not approved: pending, nothing signed.
    eventually("pending", || {
        ready(&get("blue", "web")).is_some_and(|r| r.0 == "False" && r.1 == "Pending")
    })
    .await;
    assert!(get("blue", "web").pointer("/status/certificate").is_none());

    for (ns, name, _, _) in &requests {
        let kind = if *name == "denied" {
            "Denied"
        } else {
            "Approved"
        };
        decide(&cluster, ns, name, kind);
    }
    let closed = |ns: &str, name: &str| {
        ready(&get(ns, name))
            .is_some_and(|r| matches!(r.1.as_str(), "Issued" | "Failed" | "Denied"))
    };
    eventually("every request closed", || {
        requests
            .iter()
            .filter(|r| r.1 != "not-ours")
            .all(|(ns, name, _, _)| closed(ns, name))
    })
    .await;

    let b64 = base64::engine::general_purpose::STANDARD;
    let blue_root = X509::from_pem(ca.trust_bundle("blue").unwrap()[0].as_bytes()).unwrap();
    let default_root = X509::from_pem(ca.trust_bundle("default").unwrap()[0].as_bytes()).unwrap();
    for (ns, name, root, dns) in [
        ("blue", "web", &blue_root, "web.blue.svc"),
        (
            "blue-two",
            "cluster-wide",
            &blue_root,
            "api.blue-two.svc.cluster.local",
        ),
        ("shop", "mesh", &default_root, "*.shop.svc"),
    ] {
        let r = get(ns, name);
        assert_eq!(ready(&r).unwrap().1, "Issued", "{name}: {r}");
        let pem = |field: &str| b64.decode(r["status"][field].as_str().unwrap()).unwrap();
        let leaf = X509::from_pem(&pem("certificate")).unwrap();
        let issuing = X509::from_pem(&pem("ca")).unwrap();
        assert_eq!(
            issuing.to_der().unwrap(),
            root.to_der().unwrap(),
            "{name}: status.ca"
        );
        assert!(verifies(&leaf, root), "{name}");
        let names: Vec<String> = leaf
            .subject_alt_names()
            .unwrap()
            .iter()
            .filter_map(|n| n.dnsname().map(str::to_owned))
            .collect();
        assert_eq!(names, [dns]);
        // duration: 2h0m0s, the signer's cap being 24 h (notBefore is backdated a minute).
        let lifetime = leaf.not_before().diff(leaf.not_after()).unwrap();
        assert_eq!(
            i64::from(lifetime.days) * 86_400 + i64::from(lifetime.secs),
            7260
        );
    }
    let web = get("blue", "web");
    let leaf = X509::from_pem(
        &b64.decode(web["status"]["certificate"].as_str().unwrap())
            .unwrap(),
    )
    .unwrap();
    let uris = common::uri_sans(&leaf);
    assert_eq!(uris, [spiffe("blue", "web")]);

    for (ns, name, says) in [
        ("blue", "too-wide", "outside the issuer's namespace"),
        ("shop", "other-tenant", "belongs to tenant \"default\""),
        ("shop", "public-name", "not a Service name"),
    ] {
        let r = get(ns, name);
        let (status, reason, message) = ready(&r).unwrap();
        assert_eq!(
            (status.as_str(), reason.as_str()),
            ("False", "Failed"),
            "{name}"
        );
        assert!(message.contains(says), "{name}: {message}");
        assert!(r.pointer("/status/certificate").is_none(), "{name}");
        assert!(r.pointer("/status/failureTime").is_some(), "{name}");
    }
    let denied = get("blue", "denied");
    assert_eq!(ready(&denied).unwrap().1, "Denied");
    assert!(denied.pointer("/status/certificate").is_none());
    let foreign = get("shop", "not-ours");
    assert!(ready(&foreign).is_none(), "{foreign}");

    // Mid-rotation of the blue root, status.ca holds both roots, the signing one first: what
    // trusts it (istio-csr's bundle) takes the new root before anything is signed by it.
    let started = hypha_ca::rotation::start(&mesh, data.path(), "blue").unwrap();
    let cfg = mesh.signer("blue").unwrap();
    let (signer, also) = hypha_ca::open_signer(&mesh, cfg, data.path()).unwrap();
    ca.set_signer(&["blue".to_owned()], signer, also);
    cluster.apply(
        "rotating.yaml",
        &certificate_request(
            "blue",
            "rotating",
            with("Issuer", "blue"),
            &[San::Dns("web.blue.svc")],
        ),
    );
    decide(&cluster, "blue", "rotating", "Approved");
    eventually("signed mid-rotation", || {
        ready(&get("blue", "rotating")).is_some_and(|r| r.1 == "Issued")
    })
    .await;
    let r = get("blue", "rotating");
    let bundle =
        X509::stack_from_pem(&b64.decode(r["status"]["ca"].as_str().unwrap()).unwrap()).unwrap();
    let prints: Vec<String> = bundle.iter().map(hypha_ca::signer::fingerprint).collect();
    assert_eq!(prints, [started.old_root, started.new_root]);
    issuer.abort();
}

/// A signer that can be made to fail, as a token does when it is pulled or its slot fails.
struct Flaky {
    inner: hypha_ca::FileSigner,
    broken: std::sync::atomic::AtomicBool,
}

impl hypha_ca::Signer for Flaky {
    fn certificate(&self) -> &X509 {
        self.inner.certificate()
    }

    fn sign(&self, tbs: &[u8]) -> Result<Vec<u8>, hypha_ca::CaError> {
        if self.broken.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(hypha_ca::CaError::Sign("the token is gone".into()));
        }
        self.inner.sign(tbs)
    }
}

/// An issuer's `Ready` follows its signer's health: judged again periodically, it goes false
/// (`SignerUnavailable`, with the signer's error) when the signer fails and back when it signs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issuer_is_not_ready_while_its_signer_cannot_sign() {
    use std::sync::atomic::Ordering;

    let cluster = TestCluster::start().await;
    let data = tempfile::tempdir().unwrap();
    let signer = std::sync::Arc::new(Flaky {
        inner: hypha_ca::FileSigner::open_or_create(data.path(), "cluster.local", "flaky").unwrap(),
        broken: false.into(),
    });
    let ca = hypha_ca::Ca::new(
        "cluster.local",
        vec![hypha_ca::TenantCa {
            name: "mesh".into(),
            namespaces: vec!["*".into()],
            trust_tenants: vec![],
            signer: signer.clone(),
            also_trusted: Vec::new(),
            max_validity: std::time::Duration::from_secs(3600),
        }],
    )
    .unwrap();
    let crds = hypha_kube::install::yaml(&hypha_kube::crds::hypha());
    cluster.apply("crds.yaml", &format!("{crds}---\n{CERT_MANAGER_CRD}"));
    cluster.apply(
        "issuer.yaml",
        "apiVersion: hypha.dev/v1alpha1\nkind: ClusterIssuer\nmetadata: {name: mesh}\nspec: {tenant: mesh}\n",
    );
    let running = tokio::spawn(hypha_kube::issuer::run_with(
        cluster.client().await,
        std::sync::Arc::new(ca),
        std::time::Duration::from_millis(200),
    ));
    let ready = || -> (String, String, String) {
        let issuer = cluster.api.get("hypha.dev", "clusterissuers", "", "mesh");
        let c = issuer
            .as_ref()
            .and_then(|i| {
                i.pointer("/status/conditions")?
                    .as_array()?
                    .iter()
                    .find(|c| c["type"] == "Ready")
                    .cloned()
            })
            .unwrap_or_default();
        let s = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
        (s("status"), s("reason"), s("message"))
    };
    eventually("ready", || ready().0 == "True").await;
    signer.broken.store(true, Ordering::SeqCst);
    eventually("not ready once its signer fails", || {
        ready().1 == "SignerUnavailable"
    })
    .await;
    assert!(ready().2.contains("the token is gone"), "{:?}", ready());
    signer.broken.store(false, Ordering::SeqCst);
    eventually("ready again", || ready().0 == "True").await;
    running.abort();
}
