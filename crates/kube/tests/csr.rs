//! The Kubernetes CSR signer against the test API server, driven by kubectl as an
//! administrator would (`kubectl apply`, `kubectl certificate approve/deny`), the signer with
//! the control plane's RBAC only: a request stays pending until approved, an approved one is
//! signed by its tenant's root (the chain verified with BoringSSL), a denied one never is, a
//! signer asked for another tenant's namespace or for other usages answers `Failed` with the
//! reason, and other signers' requests are left alone.

mod common;

use std::time::Duration;

use base64::Engine as _;
use boring::stack::Stack;
use boring::x509::store::X509StoreBuilder;
use boring::x509::{X509StoreContext, X509};
use common::{csr_base64, eventually, mesh_ca, San, TestCluster};
use hypha_kube::csr::{sign_csrs, SignerNames};
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
  - {name: blue, namespaces: [blue], signer: blue, signerNames: [istio.io/blue]}
  - {name: default, namespaces: ['*'], signer: default}
";

fn csr_yaml(name: &str, signer: &str, spiffe_id: &str, usages: &str) -> String {
    format!(
        "apiVersion: certificates.k8s.io/v1\nkind: CertificateSigningRequest\nmetadata:\n  name: \
         {name}\nspec:\n  signerName: {signer}\n  expirationSeconds: 3600\n  usages: [{usages}]\n  \
         request: {}\n",
        csr_base64(&[San::Uri(spiffe_id)])
    )
}

/// The CSR `name` as the API server holds it.
fn csr_object(cluster: &TestCluster, name: &str) -> Value {
    cluster
        .api
        .get(
            "certificates.k8s.io",
            "certificatesigningrequests",
            "",
            name,
        )
        .unwrap()
}

const WORKLOAD: &str = "digital signature, key encipherment, server auth, client auth";

fn verifies(chain: &[X509], root: &str) -> bool {
    let mut store = X509StoreBuilder::new().unwrap();
    store
        .add_cert(X509::from_pem(root.as_bytes()).unwrap())
        .unwrap();
    let store = store.build();
    let mut rest = Stack::new().unwrap();
    for c in &chain[1..] {
        rest.push(c.clone()).unwrap();
    }
    let mut ctx = X509StoreContext::new().unwrap();
    ctx.init(&store, &chain[0], &rest, |c| c.verify_cert())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approved_csrs_are_signed_by_their_tenants_signer_and_no_others() {
    let cluster = TestCluster::start().await;
    let data = tempfile::tempdir().unwrap();
    let (mesh, ca) = mesh_ca(MESH, data.path());
    let signer = tokio::spawn(sign_csrs(
        cluster.client().await,
        ca.clone(),
        SignerNames::from_mesh(&mesh),
    ));
    // A signer name of the tenant's own (istiod's K8S_SIGNER) needs its `sign` permission.
    cluster.apply(
        "istio-signer.yaml",
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: {name: sign-istio-blue}\n\
         rules:\n- {apiGroups: [certificates.k8s.io], resources: [signers], resourceNames: [istio.io/blue], \
         verbs: [sign]}\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\n\
         metadata: {name: sign-istio-blue}\nroleRef: {apiGroup: rbac.authorization.k8s.io, kind: \
         ClusterRole, name: sign-istio-blue}\nsubjects:\n- {kind: ServiceAccount, name: hypha-control, \
         namespace: hypha-system}\n",
    );
    let td = ca.trust_domain().to_owned();
    let id = |ns: &str, sa: &str| format!("spiffe://{td}/ns/{ns}/sa/{sa}");
    let get = |name: &str| csr_object(&cluster, name);
    let certificate = |name: &str| {
        get(name)
            .pointer("/status/certificate")
            .and_then(Value::as_str)
            .map(|c| base64::engine::general_purpose::STANDARD.decode(c).unwrap())
    };
    let failed = |name: &str| -> Option<String> {
        get(name)
            .pointer("/status/conditions")?
            .as_array()?
            .iter()
            .find(|c| c["type"] == "Failed")
            .map(|c| c["message"].as_str().unwrap_or_default().to_owned())
    };

    cluster.apply(
        "csrs.yaml",
        &[
            csr_yaml("web", "hypha.dev/blue", &id("blue", "web"), WORKLOAD),
            csr_yaml("istiod-made", "istio.io/blue", &id("blue", "api"), WORKLOAD),
            csr_yaml("denied", "hypha.dev/blue", &id("blue", "web"), WORKLOAD),
            csr_yaml(
                "other-tenant",
                "hypha.dev/blue",
                &id("shop", "cart"),
                WORKLOAD,
            ),
            csr_yaml(
                "code-signing",
                "hypha.dev/blue",
                &id("blue", "web"),
                "digital signature, code signing",
            ),
            csr_yaml(
                "not-ours",
                "example.com/signer",
                &id("blue", "web"),
                WORKLOAD,
            ),
        ]
        .join("---\n"),
    );
    // The API server names who asked.
    assert_eq!(get("web")["spec"]["username"], "kubernetes-admin");

    // Pending: nothing is signed before approval.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(certificate("web"), None);

    for name in [
        "web",
        "istiod-made",
        "other-tenant",
        "code-signing",
        "not-ours",
    ] {
        cluster.kubectl(&["certificate", "approve", name]);
    }
    cluster.kubectl(&["certificate", "deny", "denied"]);
    eventually("the approved CSRs answered", || {
        certificate("web").is_some()
            && certificate("istiod-made").is_some()
            && failed("other-tenant").is_some()
            && failed("code-signing").is_some()
    })
    .await;

    let blue_root = &ca.trust_bundle("blue").unwrap()[0];
    let default_root = &ca.trust_bundle("default").unwrap()[0];
    for (name, sa) in [("web", "web"), ("istiod-made", "api")] {
        let chain = X509::stack_from_pem(&certificate(name).unwrap()).unwrap();
        assert!(verifies(&chain, blue_root), "{name}: blue's root");
        assert!(!verifies(&chain, default_root), "{name}: not default's");
        let uris = common::uri_sans(&chain[0]);
        assert_eq!(uris, [id("blue", sa)]);
        // expirationSeconds honoured (notBefore is backdated a minute).
        let lifetime = chain[0].not_before().diff(chain[0].not_after()).unwrap();
        assert_eq!(
            i64::from(lifetime.days) * 86_400 + i64::from(lifetime.secs),
            3660
        );
    }
    let why = failed("other-tenant").unwrap();
    assert!(why.contains("belongs to tenant \"default\""), "{why}");
    assert_eq!(certificate("other-tenant"), None);
    let why = failed("code-signing").unwrap();
    assert!(why.contains("code signing"), "{why}");

    // Denied and foreign requests stay as they are.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(certificate("denied"), None);
    assert_eq!(failed("denied"), None);
    assert_eq!(certificate("not-ours"), None);
    assert_eq!(failed("not-ours"), None);
    signer.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_signer_may_answer_and_only_an_approver_approve() {
    let cluster = TestCluster::start().await;
    cluster.apply(
        "csr.yaml",
        &csr_yaml(
            "web",
            "hypha.dev/default",
            "spiffe://cluster.local/ns/a/sa/b",
            WORKLOAD,
        ),
    );
    cluster.apply(
        "other.yaml",
        &csr_yaml(
            "other",
            "example.com/signer",
            "spiffe://cluster.local/ns/a/sa/b",
            WORKLOAD,
        ),
    );
    let client = cluster.client().await;
    let api: kube::Api<k8s_openapi::api::certificates::v1::CertificateSigningRequest> =
        kube::Api::all(client);
    // The control plane's account may sign for hypha.dev/* but not approve.
    let mut approved = serde_json::to_value(api.get("web").await.unwrap()).unwrap();
    approved["status"] = serde_json::json!({"conditions": [{"type": "Approved", "status": "True",
        "reason": "Test", "message": "self-approved"}]});
    let err = api
        .replace_subresource("approval", "web", &Default::default(), &approved)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(e) if e.code == 403),
        "{err}"
    );
    for (name, allowed) in [("web", true), ("other", false)] {
        let mut csr = api.get(name).await.unwrap();
        csr.status.get_or_insert_with(Default::default).certificate =
            Some(k8s_openapi::ByteString(b"not yet".to_vec()));
        let r = api.replace_status(name, &Default::default(), &csr).await;
        assert_eq!(r.is_ok(), allowed, "{name}: {r:?}");
    }
}

/// Two replicas behind the signers' Lease; the leader is killed (its task dropped, its Lease not
/// given back) in the middle of a burst of 200 approved CSRs: the other takes over once the
/// lease time has passed, and every CSR is answered exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_killed_during_a_burst_loses_no_csr_and_signs_none_twice() {
    use hypha_kube::lease::{while_leader, LeaseConfig};

    const N: usize = 200;
    let cluster = TestCluster::start().await;
    let data = tempfile::tempdir().unwrap();
    let (mesh, ca) = mesh_ca(MESH, data.path());
    let names = SignerNames::from_mesh(&mesh);
    let mut feed = cluster.api.changes();
    let mut replicas = std::collections::BTreeMap::new();
    for identity in ["replica-a", "replica-b"] {
        let client = cluster.client().await;
        let lease = LeaseConfig {
            retry: Duration::from_millis(300),
            ..LeaseConfig::new(
                hypha_kube::CONTROL_NAMESPACE,
                "hypha-signers",
                identity,
                Duration::from_secs(2),
            )
        };
        let (ca, names) = (ca.clone(), names.clone());
        let task = tokio::spawn(while_leader(client.clone(), lease, move || {
            sign_csrs(client.clone(), ca.clone(), names.clone())
        }));
        replicas.insert(identity, task);
    }
    let holder = || {
        cluster
            .api
            .get(
                "coordination.k8s.io",
                "leases",
                hypha_kube::CONTROL_NAMESPACE,
                "hypha-signers",
            )
            .and_then(|l| {
                l.pointer("/spec/holderIdentity")?
                    .as_str()
                    .map(str::to_owned)
            })
    };
    eventually("a leader", || holder().is_some()).await;
    let first = holder().unwrap();

    let id = format!("spiffe://{}/ns/blue/sa/web", ca.trust_domain());
    let all: Vec<String> = (0..N)
        .map(|i| csr_yaml(&format!("burst-{i}"), "hypha.dev/blue", &id, WORKLOAD))
        .collect();
    cluster.apply("burst.yaml", &all.join("---\n"));
    let signed = || {
        cluster
            .api
            .list("certificates.k8s.io", "certificatesigningrequests")
            .iter()
            .filter(|c| c.pointer("/status/certificate").is_some())
            .count()
    };
    // Approved as an approving controller does, one after the other.
    let admin = hypha_kube::connect(Some(&cluster.dir.path().join("kubeconfig")))
        .await
        .unwrap();
    let approving = tokio::spawn(async move {
        let api: kube::Api<k8s_openapi::api::certificates::v1::CertificateSigningRequest> =
            kube::Api::all(admin);
        for i in 0..N {
            let name = format!("burst-{i}");
            let mut csr = serde_json::to_value(api.get(&name).await.unwrap()).unwrap();
            csr["status"] = serde_json::json!({"conditions": [{"type": "Approved",
                "status": "True", "reason": "AutoApproved", "message": "burst"}]});
            api.replace_subresource("approval", &name, &Default::default(), &csr)
                .await
                .unwrap();
        }
    });
    // Kill the leader once it has signed some of them.
    eventually("the first signatures", || signed() >= 10).await;
    replicas[first.as_str()].abort();
    let at_kill = signed();
    approving.await.unwrap();
    for _ in 0..600 {
        if signed() == N {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(signed(), N, "every CSR signed (at the kill: {at_kill})");
    assert!(at_kill < N, "the leader was killed mid-burst");
    let second = holder().unwrap();
    assert_ne!(second, first, "the other replica took over");

    // Each CSR's certificate was written once and never replaced.
    let mut certificates: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
        Default::default();
    while let Ok(event) = feed.try_recv() {
        if event.resource != "certificatesigningrequests" {
            continue;
        }
        if let Some(c) = event
            .object
            .pointer("/status/certificate")
            .and_then(Value::as_str)
        {
            certificates
                .entry(event.meta("name"))
                .or_default()
                .insert(c.to_owned());
        }
    }
    assert_eq!(certificates.len(), N);
    for (name, seen) in &certificates {
        assert_eq!(seen.len(), 1, "{name} answered {} times", seen.len());
    }
    for task in replicas.values() {
        task.abort();
    }
}

/// What a stock istiod sets up to get its workloads' certificates from an external Kubernetes
/// signer (`EXTERNAL_CA=ISTIOD_RA_KUBERNETES_API`, `K8S_SIGNER=istio.io/mesh`): its own RBAC
/// (create, watch, approve and delete CSRs for that signer), and `hypha-control` allowed to sign
/// for it. The same YAML is in the README.
const ISTIOD_RBAC: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: istio-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: istiod-k8s-signer}
rules:
- apiGroups: [certificates.k8s.io]
  resources: [certificatesigningrequests]
  verbs: [create, get, list, watch, delete]
- apiGroups: [certificates.k8s.io]
  resources: [certificatesigningrequests/approval]
  verbs: [update]
- apiGroups: [certificates.k8s.io]
  resources: [signers]
  resourceNames: [istio.io/mesh]
  verbs: [approve]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: istiod-k8s-signer}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: istiod-k8s-signer}
subjects:
- {kind: ServiceAccount, name: istiod, namespace: istio-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: hypha-sign-istio-mesh}
rules:
- apiGroups: [certificates.k8s.io]
  resources: [signers]
  resourceNames: [istio.io/mesh]
  verbs: [sign]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: hypha-sign-istio-mesh}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: hypha-sign-istio-mesh}
subjects:
- {kind: ServiceAccount, name: hypha-control, namespace: hypha-system}
";

const ISTIO_MESH: &str = "\
apiVersion: hypha.dev/v1alpha1
kind: MeshConfig
metadata: {name: mesh}
spec:
  signers:
  - {name: mesh, maxCertificateTtl: 24h}
  tenants:
  - {name: mesh, namespaces: ['*'], signer: mesh, signerNames: [istio.io/mesh]}
";

/// istiod as a Kubernetes RA, step by step as it does it for a workload's CSR: create the CSR
/// (`generateName: csr-workload-`, the workload agent's RSA-2048 request for its SPIFFE ID, the
/// four usages, `expirationSeconds` from the requested TTL), approve it itself, wait for
/// `status.certificate`, verify the chain against the root it was given for the signer
/// (`meshConfig.caCertificates[].certSigners`), then delete the CSR.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stock_istiod_gets_workload_certificates_from_hyphas_signer() {
    use k8s_openapi::api::certificates::v1::{
        CertificateSigningRequest, CertificateSigningRequestCondition,
        CertificateSigningRequestSpec,
    };

    let cluster = TestCluster::start().await;
    cluster.apply("istiod-rbac.yaml", ISTIOD_RBAC);
    let data = tempfile::tempdir().unwrap();
    let (mesh, ca) = mesh_ca(ISTIO_MESH, data.path());
    let signer = tokio::spawn(sign_csrs(
        cluster.client().await,
        ca.clone(),
        SignerNames::from_mesh(&mesh),
    ));
    // meshConfig.caCertificates: [{pem: <this>, certSigners: [istio.io/mesh]}]
    let root = ca.trust_bundle("mesh").unwrap()[0].clone();

    let token = cluster.api.issue_account_token("istio-system", "istiod");
    let kubeconfig = cluster
        .api
        .write_kubeconfig_as(&cluster.dir.path().join("istiod.kubeconfig"), &token)
        .unwrap();
    let istiod = hypha_kube::connect(Some(&kubeconfig)).await.unwrap();
    let csrs: kube::Api<CertificateSigningRequest> = kube::Api::all(istiod);

    let key = boring::pkey::PKey::from_rsa(boring::rsa::Rsa::generate(2048).unwrap()).unwrap();
    let workload = format!("spiffe://{}/ns/shop/sa/web", ca.trust_domain());
    let request = base64::engine::general_purpose::STANDARD
        .decode(common::csr_base64_for(&key, &[San::Uri(&workload)]))
        .unwrap();
    let usages = [
        "digital signature",
        "key encipherment",
        "server auth",
        "client auth",
    ];
    let csr = CertificateSigningRequest {
        metadata: kube::api::ObjectMeta {
            generate_name: Some("csr-workload-".into()),
            ..Default::default()
        },
        spec: CertificateSigningRequestSpec {
            request: k8s_openapi::ByteString(request),
            signer_name: "istio.io/mesh".into(),
            usages: Some(usages.map(String::from).to_vec()),
            expiration_seconds: Some(86_400),
            ..Default::default()
        },
        status: None,
    };
    let mut created = csrs.create(&Default::default(), &csr).await.unwrap();
    let name = created.metadata.name.clone().unwrap();
    assert!(name.starts_with("csr-workload-"));
    assert_eq!(
        created.spec.username.as_deref(),
        Some("system:serviceaccount:istio-system:istiod")
    );
    let message = format!("CSR ({name}) for the certificate (web) is approved");
    created
        .status
        .get_or_insert_with(Default::default)
        .conditions
        .get_or_insert_with(Vec::new)
        .push(CertificateSigningRequestCondition {
            type_: "Approved".into(),
            status: "True".into(),
            reason: Some(message.clone()),
            message: Some(message),
            ..Default::default()
        });
    csrs.replace_subresource("approval", &name, &Default::default(), &created)
        .await
        .unwrap();

    let mut pem = None;
    for _ in 0..200 {
        let now = csrs.get(&name).await.unwrap();
        if let Some(c) = now.status.and_then(|s| s.certificate) {
            pem = Some(c.0);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let chain = X509::stack_from_pem(&pem.expect("status.certificate within 10 s")).unwrap();
    assert!(
        verifies(&chain, &root),
        "the chain verifies against the signer's root"
    );
    let leaf = &chain[0];
    let uris = common::uri_sans(leaf);
    assert_eq!(uris, [workload]);
    assert!(
        leaf.public_key().unwrap().public_eq(&key),
        "the workload's own key"
    );
    let lifetime = leaf.not_before().diff(leaf.not_after()).unwrap();
    assert_eq!(
        i64::from(lifetime.days) * 86_400 + i64::from(lifetime.secs),
        86_460
    );
    csrs.delete(&name, &Default::default()).await.unwrap();
    signer.abort();
}

/// `--approve-own-csrs`: a workload's CSR for its own service account's identity is approved
/// (then signed); one for another identity, or one an administrator made, waits for a person.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_identity_csrs_are_approved_and_no_others() {
    let cluster = TestCluster::start().await;
    // The approver's grant, on top of the control plane's base RBAC.
    cluster.apply(
        "approve.yaml",
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: {name: hypha-approve}\n\
         rules:\n- {apiGroups: [certificates.k8s.io], resources: [certificatesigningrequests/approval], \
         verbs: [update]}\n- {apiGroups: [certificates.k8s.io], resources: [signers], resourceNames: \
         [hypha.dev/*], verbs: [approve]}\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: \
         ClusterRoleBinding\nmetadata: {name: hypha-approve}\nroleRef: {apiGroup: \
         rbac.authorization.k8s.io, kind: ClusterRole, name: hypha-approve}\nsubjects:\n- {kind: \
         ServiceAccount, name: hypha-control, namespace: hypha-system}\n---\napiVersion: \
         rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: {name: csr-creator}\nrules:\n- \
         {apiGroups: [certificates.k8s.io], resources: [certificatesigningrequests], verbs: [create, \
         get]}\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: \
         {name: csr-creator}\nroleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: \
         csr-creator}\nsubjects:\n- {kind: ServiceAccount, name: web, namespace: blue}\n",
    );
    let data = tempfile::tempdir().unwrap();
    let (mesh, ca) = mesh_ca(MESH, data.path());
    let names = SignerNames::from_mesh(&mesh);
    let client = cluster.client().await;
    let td = ca.trust_domain().to_owned();
    let signing = tokio::spawn(sign_csrs(client.clone(), ca.clone(), names.clone()));
    let approving = tokio::spawn(hypha_kube::csr::approve_own_csrs(client, td.clone(), names));

    // As the workload blue/web.
    let token = cluster.api.issue_account_token("blue", "web");
    let kubeconfig = cluster
        .api
        .write_kubeconfig_as(&cluster.dir.path().join("web.kubeconfig"), &token)
        .unwrap();
    let web = hypha_kube::connect(Some(&kubeconfig)).await.unwrap();
    let csrs: kube::Api<k8s_openapi::api::certificates::v1::CertificateSigningRequest> =
        kube::Api::all(web);
    for (name, sa) in [("own", "web"), ("someone-else", "db")] {
        let yaml = csr_yaml(
            name,
            "hypha.dev/blue",
            &format!("spiffe://{td}/ns/blue/sa/{sa}"),
            WORKLOAD,
        );
        let value = hypha_config::yaml::parse_documents(&yaml)
            .unwrap()
            .remove(0)
            .value;
        csrs.create(&Default::default(), &serde_json::from_value(value).unwrap())
            .await
            .unwrap();
    }
    // The same identity asked by an administrator is not the requester's own.
    cluster.apply(
        "admin.yaml",
        &csr_yaml(
            "by-admin",
            "hypha.dev/blue",
            &format!("spiffe://{td}/ns/blue/sa/web"),
            WORKLOAD,
        ),
    );
    let get = |name: &str| csr_object(&cluster, name);
    eventually("the own-identity CSR approved and signed", || {
        get("own").pointer("/status/certificate").is_some()
    })
    .await;
    let reasons: Vec<Value> = get("own")["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["reason"].clone())
        .collect();
    assert_eq!(reasons, [Value::from("HyphaOwnIdentity")]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    for name in ["someone-else", "by-admin"] {
        let c = get(name);
        assert!(c.pointer("/status/conditions").is_none(), "{name}: {c}");
    }
    signing.abort();
    approving.abort();
}
