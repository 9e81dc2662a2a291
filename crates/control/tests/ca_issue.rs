//! `hypha ca issue`: a key and certificate for one identity written to files, the key 0600, the
//! chain verifying against the written trust bundle.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use hypha_ca::Caller;
use hypha_identity::KeyKind;

#[test]
fn issues_files_for_one_identity() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = hypha_control::initial_config(None).unwrap();
    let out = dir.path().join("out");
    let id = hypha_control::security::issue_files(
        &cfg.mesh,
        &dir.path().join("ca"),
        &Caller::new("bookinfo", "bookinfo-ratings"),
        Duration::from_secs(600),
        KeyKind::EcdsaP256,
        &out,
    )
    .unwrap();
    assert_eq!(id, "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-ratings");
    let mode = |f: &str| std::fs::metadata(out.join(f)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("key.pem"), 0o600);
    let key =
        boring::pkey::PKey::private_key_from_pem(&std::fs::read(out.join("key.pem")).unwrap())
            .unwrap();
    let chain =
        boring::x509::X509::stack_from_pem(&std::fs::read(out.join("cert-chain.pem")).unwrap())
            .unwrap();
    let roots =
        boring::x509::X509::stack_from_pem(&std::fs::read(out.join("root-cert.pem")).unwrap())
            .unwrap();
    assert!(chain[0].public_key().unwrap().public_eq(&key));
    assert!(chain[0].verify(&roots[0].public_key().unwrap()).unwrap());
    assert_eq!(key.id(), boring::pkey::Id::EC);
    // Issued by the same CA the control plane then serves: a second issue reuses its signer.
    // An RSA key when asked for one (HAProxy in the handshake benchmark).
    let out2 = dir.path().join("out2");
    hypha_control::security::issue_files(
        &cfg.mesh,
        &dir.path().join("ca"),
        &Caller::new("bookinfo", "bookinfo-reviews"),
        Duration::from_secs(600),
        KeyKind::Rsa2048,
        &out2,
    )
    .unwrap();
    let roots2 = std::fs::read(out2.join("root-cert.pem")).unwrap();
    assert_eq!(roots2, std::fs::read(out.join("root-cert.pem")).unwrap());
    let key2 =
        boring::pkey::PKey::private_key_from_pem(&std::fs::read(out2.join("key.pem")).unwrap())
            .unwrap();
    assert_eq!(key2.rsa().unwrap().size(), 256);
    let chain2 =
        boring::x509::X509::stack_from_pem(&std::fs::read(out2.join("cert-chain.pem")).unwrap())
            .unwrap();
    assert!(chain2[0].public_key().unwrap().public_eq(&key2));
}
