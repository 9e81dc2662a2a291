//! `hypha control` with the CA key in a real PKCS#11 token (SoftHSM2): a token the attestation
//! policy refuses stops start-up with the reason; an approved one starts, waiting for the token
//! off the async runtime (this test's runtime is single-threaded, where a blocking wait on the
//! runtime's thread would panic).

use std::path::Path;
use std::time::Duration;

use hypha_control::Security;

use hypha_keys::softhsm::MODULE;
const TOKEN: &str = "hypha-control-ca";

/// A fresh SoftHSM2 token in `dir`, user PIN 1234 (in `dir/pin`); this binary has one test.
fn softhsm(dir: &Path) {
    hypha_keys::softhsm::tokens_for_tests(dir, &[TOKEN]).unwrap();
}

fn mesh_yaml(hsm: &Path, allowed_label: &str) -> String {
    format!(
        "apiVersion: hypha.dev/v1alpha1
kind: MeshConfig
metadata: {{name: mesh}}
spec:
  signers:
  - name: hsm
    key:
      pkcs11:
        module: {MODULE}
        tokenLabel: {TOKEN}
        pinFile: {}
        keyLabel: mesh-ca-1
        attestation:
          allow: {{labels: [{allowed_label}]}}
  tenants:
  - {{name: all, namespaces: ['*'], signer: hsm}}
",
        hsm.join("pin").display()
    )
}

#[tokio::test]
async fn control_starts_with_an_attested_token_ca_and_refuses_an_unapproved_one() {
    if !hypha_keys::softhsm::available_for_tests() {
        return;
    }
    let hsm = tempfile::tempdir().unwrap();
    softhsm(hsm.path());
    let config = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let security = Security {
        data_dir: data.path().to_path_buf(),
        join_tokens: None,
        listen: vec![],
        own_key: None,
        token_review: None,
        server_names: Vec::new(),
        services: Vec::new(),
        rotate_elsewhere: false,
    };
    let own_key = hypha_keys::pkcs11::TokenConfig {
        module: MODULE.into(),
        label: TOKEN.into(),
        pin: hypha_keys::pkcs11::PinSource::File(hsm.path().join("pin")),
        threads: 1,
    };

    std::fs::write(
        config.path().join("mesh.yaml"),
        mesh_yaml(hsm.path(), "some-other-token"),
    )
    .unwrap();
    let err = hypha_control::run(
        Some(config.path().to_path_buf()),
        &[],
        Some(security.clone()),
        None,
    )
    .await
    .unwrap_err();
    let msg = err.to_string();
    for part in [
        "signer \"hsm\"",
        "token \"hypha-control-ca\"",
        "refused by attestation (allow list)",
        "label \"hypha-control-ca\" is not in the allow list",
    ] {
        assert!(msg.contains(part), "{part:?} not in: {msg}");
    }
    assert!(!data.path().join("hsm").exists(), "nothing made for it");

    std::fs::write(
        config.path().join("mesh.yaml"),
        mesh_yaml(hsm.path(), TOKEN),
    )
    .unwrap();
    // The control plane's own serving key in the token too.
    let control = tokio::spawn(hypha_control::run(
        Some(config.path().to_path_buf()),
        &[],
        Some(Security {
            own_key: Some(own_key.clone()),
            ..security.clone()
        }),
        None,
    ));
    // Ready when the control plane's own certificate, issued by the token, is out.
    let root_file = data.path().join(hypha_control::security::ROOT_CERT_FILE);
    let mut waited = Duration::ZERO;
    while !root_file.exists() {
        assert!(
            !control.is_finished(),
            "control stopped: {:?}",
            control.await
        );
        assert!(waited < Duration::from_secs(20), "control did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
        waited += Duration::from_millis(20);
    }
    let root = std::fs::read(data.path().join("hsm/ca-cert.pem")).unwrap();
    assert_eq!(std::fs::read(&root_file).unwrap(), root);
    assert!(!control.is_finished());
    control.abort();

    // What that control plane serves with: a certificate whose key is in the token, and TLS
    // contexts that hold no key.
    let data_dir = data.path().to_path_buf();
    let mesh = hypha_config::load(config.path())
        .into_result()
        .unwrap()
        .0
        .mesh;
    let secure = tokio::task::spawn_blocking(move || {
        let token = hypha_keys::pkcs11::Token::open(&own_key).unwrap();
        hypha_control::security::Secure::open_with(&mesh, &data_dir, None, Some(token)).unwrap()
    })
    .await
    .unwrap();
    let own = secure.identity();
    let described = format!("{:?}", own.identity);
    assert!(
        described.contains("PKCS#11 token") && described.contains(TOKEN),
        "{described}"
    );
    assert!(own.server.context().private_key().is_none());
    assert!(own
        .identity
        .id()
        .ends_with("/ns/istio-system/sa/hypha-control"));
}
