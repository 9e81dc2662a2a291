//! An issuer's own attestation of the token holding its tenant's key, with SoftHSM2 (a binary
//! of its own: the token's config is set in the environment before anything else runs).

mod common;

use base64::Engine as _;
use boring::x509::X509;
use common::cert_manager::{certificate_request, decide, CERT_MANAGER_CRD};
use common::{eventually, mesh_ca, verifies, San, TestCluster};
use serde_json::Value;

/// An issuer's own attestation of the token holding its tenant's key (SoftHSM2 here): passed,
/// its status names the token and the verdict and it signs; refused, or a file key, it is not
/// Ready, says why, and its approved requests stay unsigned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuers_attest_the_token_and_sign_nothing_when_it_fails() {
    if !hypha_keys::softhsm::available_for_tests() {
        return;
    }
    let hsm = tempfile::tempdir().unwrap();
    let pin = hypha_keys::softhsm::tokens_for_tests(hsm.path(), &["hypha-issuer"]).unwrap();
    let mesh = format!(
        "apiVersion: hypha.dev/v1alpha1
kind: MeshConfig
metadata: {{name: mesh}}
spec:
  signers:
  - name: vault
    key:
      pkcs11:
        module: {}
        tokenLabel: hypha-issuer
        pinFile: {}
        keyLabel: issuer-ca
        attestation:
          allow: {{labels: [hypha-issuer]}}
  - {{name: files}}
  tenants:
  - {{name: vault, namespaces: [vault], signer: vault}}
  - {{name: files, namespaces: ['*'], signer: files}}
",
        hypha_keys::softhsm::MODULE,
        pin.display()
    );
    let cluster = TestCluster::start().await;
    let data = tempfile::tempdir().unwrap();
    // Opening a token blocks: off the runtime, as the control plane does it.
    let dir = data.path().to_owned();
    let (_, ca) = tokio::task::block_in_place(|| mesh_ca(&mesh, &dir));
    let crds = hypha_kube::install::yaml(&hypha_kube::crds::hypha());
    cluster.apply("crds.yaml", &format!("{crds}---\n{CERT_MANAGER_CRD}"));
    let issuer = |kind: &str, name: &str, tenant: &str, allow: &str| {
        let ns = if kind == "Issuer" {
            "\n  namespace: vault"
        } else {
            ""
        };
        format!(
            "apiVersion: hypha.dev/v1alpha1\nkind: {kind}\nmetadata:\n  name: {name}{ns}\nspec:\n  \
             tenant: {tenant}\n  attestation:\n    allow: {allow}\n"
        )
    };
    cluster.apply(
        "issuers.yaml",
        &[
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: vault}\n".to_owned(),
            issuer(
                "Issuer",
                "good",
                "vault",
                "{manufacturers: [SoftHSM project]}",
            ),
            issuer(
                "Issuer",
                "wrong-serial",
                "vault",
                "{serialNumbers: ['0000']}",
            ),
            issuer(
                "ClusterIssuer",
                "file-key",
                "files",
                "{labels: [hypha-issuer]}",
            ),
        ]
        .join("---\n"),
    );
    let running = tokio::spawn(hypha_kube::issuer::run(cluster.client().await, ca.clone()));
    let status = |resource: &str, ns: &str, name: &str| {
        cluster
            .api
            .get("hypha.dev", resource, ns, name)
            .and_then(|o| o.get("status").cloned())
            .unwrap_or_default()
    };
    let ready = |s: &Value| {
        s["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
            .cloned()
            .unwrap_or_default()
    };
    eventually("every issuer judged", || {
        ["good", "wrong-serial"]
            .iter()
            .all(|n| !ready(&status("issuers", "vault", n)).is_null())
            && !ready(&status("clusterissuers", "", "file-key")).is_null()
    })
    .await;

    let good = status("issuers", "vault", "good");
    assert_eq!(ready(&good)["status"], "True", "{good}");
    assert_eq!(good["signer"]["key"], "pkcs11");
    assert_eq!(good["signer"]["token"]["label"], "hypha-issuer");
    assert_eq!(good["signer"]["token"]["manufacturer"], "SoftHSM project");
    assert!(good["signer"]["token"]["serialNumber"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
    assert_eq!(good["attestation"]["verdict"], "Approved");
    assert!(good["attestation"]["time"].is_string());

    let wrong = status("issuers", "vault", "wrong-serial");
    assert_eq!(ready(&wrong)["status"], "False");
    assert_eq!(ready(&wrong)["reason"], "AttestationFailed");
    assert_eq!(wrong["attestation"]["verdict"], "Refused");
    assert!(
        wrong["attestation"]["reason"]
            .as_str()
            .unwrap()
            .contains("serial number"),
        "{wrong}"
    );
    let file = status("clusterissuers", "", "file-key");
    assert_eq!(ready(&file)["reason"], "AttestationFailed");
    assert!(
        ready(&file)["message"]
            .as_str()
            .unwrap()
            .contains("is a file"),
        "{file}"
    );

    let request = |name: &str, issuer: &str| {
        certificate_request(
            "vault",
            name,
            ("hypha.dev", "Issuer", issuer),
            &[San::Dns("web.vault.svc")],
        )
    };
    cluster.apply(
        "requests.yaml",
        &[
            request("signed", "good"),
            request("refused", "wrong-serial"),
        ]
        .join("---\n"),
    );
    decide(&cluster, "vault", "signed", "Approved");
    decide(&cluster, "vault", "refused", "Approved");
    let get = |name: &str| {
        cluster
            .api
            .get("cert-manager.io", "certificaterequests", "vault", name)
            .unwrap()
    };
    eventually("the good issuer's request issued", || {
        get("signed").pointer("/status/certificate").is_some()
    })
    .await;
    let b64 = base64::engine::general_purpose::STANDARD;
    let leaf = X509::from_pem(
        &b64.decode(get("signed")["status"]["certificate"].as_str().unwrap())
            .unwrap(),
    )
    .unwrap();
    let root = X509::from_pem(ca.trust_bundle("vault").unwrap()[0].as_bytes()).unwrap();
    assert!(verifies(&leaf, &root), "signed by the token's root");
    eventually("the refused issuer's request pending, saying why", || {
        ready(&get("refused")["status"])["message"]
            .as_str()
            .is_some_and(|m| m.contains("cannot sign") && m.contains("serial number"))
    })
    .await;
    assert!(get("refused").pointer("/status/certificate").is_none());
    running.abort();
}
