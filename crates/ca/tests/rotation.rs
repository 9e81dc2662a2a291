//! Root rotation of a file signer through its three phases, as the CA serves each: which key
//! signs, which roots the tenants' bundles (and the tenants trusting them) hold, what is
//! vouched for, and what `hypha ca status` says. The control plane's side (acknowledgements,
//! pushes) is tested end to end by the demo's rotation test.

mod common;

use std::time::{Duration, SystemTime};

use boring::x509::X509;
use common::{csr, id, p256, verifies, San};
use hypha_ca::rotation::{self, Phase, RotationState};
use hypha_ca::{Ca, CaError, Caller};

const MESH: &str = "apiVersion: hypha.dev/v1alpha1
kind: MeshConfig
metadata: {name: mesh}
spec:
  signers:
  - {name: shop-ca, maxCertificateTtl: 30s}
  - {name: main}
  tenants:
  - {name: shop, namespaces: [shop], signer: shop-ca}
  - {name: default, namespaces: ['*'], signer: main, trustTenants: [shop]}
";

fn mesh() -> hypha_config::MeshConfig {
    let loaded = hypha_config::load_str("mesh.yaml", MESH);
    assert!(!loaded.has_errors(), "{:?}", loaded.diagnostics);
    loaded.config.mesh
}

fn issue(ca: &Ca, ns: &str) -> Vec<String> {
    let caller = Caller::new(ns, "web");
    let pem = csr(&p256(), &[San::Uri(&id(ns, "web"))]);
    ca.issue(&caller, &pem, Duration::from_secs(20))
        .unwrap()
        .chain
}

fn root_of(chain: &[String]) -> String {
    chain.last().unwrap().clone()
}

fn pem(cert: &X509) -> String {
    String::from_utf8(cert.to_pem().unwrap()).unwrap()
}

fn state(dir: &std::path::Path) -> RotationState {
    RotationState::read(&dir.join("shop-ca")).unwrap()
}

#[test]
fn a_file_signer_rotates_through_three_phases() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = mesh();
    let ca = Ca::from_mesh(&mesh, dir.path()).unwrap();
    let old_root = pem(ca.tenant("shop").unwrap().signer.certificate());
    let before = issue(&ca, "shop");
    assert_eq!(root_of(&before), old_root);
    assert_eq!(
        ca.trust_bundle("shop").unwrap(),
        std::slice::from_ref(&old_root)
    );
    assert_eq!(state(dir.path()), RotationState::default());

    // Phase 1: the next generation exists and is trusted everywhere the old one is (the
    // shop tenant's bundle, the default tenant that trusts shop, the CA's own endpoint); the
    // old key still signs.
    let started = rotation::start(&mesh, dir.path(), "shop").unwrap();
    assert_eq!((started.from, started.to), (0, 1));
    assert_eq!(started.tenants, ["shop"]);
    assert_ne!(started.old_root, started.new_root);
    let s = state(dir.path());
    assert_eq!(s.phase(), "distributing");
    assert_eq!((s.signing(), s.also_trusted()), (0, Some(1)));
    let err = rotation::start(&mesh, dir.path(), "shop").unwrap_err();
    assert!(matches!(err, CaError::Rotation(_)), "{err}");
    assert!(err.to_string().contains("already rotating"), "{err}");

    let ca = Ca::from_mesh(&mesh, dir.path()).unwrap();
    let new_root =
        pem(&rotation::generation_root(mesh.signer("shop-ca").unwrap(), dir.path(), 1).unwrap());
    assert_eq!(
        hypha_ca::signer::fingerprint(&X509::from_pem(new_root.as_bytes()).unwrap()),
        started.new_root
    );
    assert_eq!(
        ca.trust_bundle("shop").unwrap(),
        [old_root.clone(), new_root.clone()]
    );
    let default = ca.trust_bundle("default").unwrap();
    assert!(default.contains(&old_root) && default.contains(&new_root));
    assert!(ca.all_roots().unwrap().contains(&new_root));
    let during = issue(&ca, "shop");
    assert_eq!(
        root_of(&during),
        old_root,
        "the old key signs until phase 2"
    );

    // Not acknowledged yet: no move. Acknowledged: phase 2, the old root kept for the
    // signer's longest validity (30 s) after the switch.
    let now = SystemTime::now();
    let ttl = mesh.signer("shop-ca").unwrap().max_certificate_ttl.0;
    assert_eq!(s.advance(false, now, ttl), None);
    let issuing = s.advance(true, now, ttl).unwrap();
    let r = issuing.rotation.as_ref().unwrap();
    assert_eq!(r.phase, Phase::Issuing);
    assert_eq!(r.retire_after.unwrap() - r.switched.unwrap(), 30);
    issuing.write(&dir.path().join("shop-ca")).unwrap();

    let ca = Ca::from_mesh(&mesh, dir.path()).unwrap();
    let after_switch = issue(&ca, "shop");
    assert_eq!(root_of(&after_switch), new_root, "the new key signs");
    assert_eq!(
        ca.trust_bundle("shop").unwrap(),
        [new_root.clone(), old_root.clone()]
    );
    // Every certificate verifies against the bundle; both generations' are vouched for.
    let bundle = ca.trust_bundle("shop").unwrap();
    for chain in [&before, &during, &after_switch] {
        assert!(verifies(chain, &bundle));
        let leaf = X509::from_pem(chain[0].as_bytes()).unwrap();
        ca.vouch(&id("shop", "web"), &leaf).unwrap();
    }
    // Before retire_after nothing moves; after it, the rotation completes.
    assert_eq!(
        issuing.advance(true, now + Duration::from_secs(29), ttl),
        None
    );
    let done = issuing
        .advance(false, now + Duration::from_secs(31), ttl)
        .unwrap();
    assert_eq!(done.phase(), "idle");
    assert_eq!(
        (done.generation, done.signing(), done.also_trusted()),
        (1, 1, None)
    );
    assert_eq!(done.last.as_ref().map(|l| (l.from, l.to)), Some((0, 1)));
    done.write(&dir.path().join("shop-ca")).unwrap();
    rotation::retire(mesh.signer("shop-ca").unwrap(), dir.path(), 0).unwrap();
    assert!(
        !dir.path().join("shop-ca").join("ca-key.pem").exists(),
        "the old key file is gone"
    );
    assert!(dir.path().join("shop-ca/gen-1/ca-key.pem").exists());

    // Phase 3: the old root is gone from every bundle, its certificates no longer vouched for.
    let ca = Ca::from_mesh(&mesh, dir.path()).unwrap();
    assert_eq!(
        ca.trust_bundle("shop").unwrap(),
        std::slice::from_ref(&new_root)
    );
    assert!(!ca.trust_bundle("default").unwrap().contains(&old_root));
    assert!(!ca.all_roots().unwrap().contains(&old_root));
    let leaf = X509::from_pem(before[0].as_bytes()).unwrap();
    assert!(ca.vouch(&id("shop", "web"), &leaf).is_err());
    assert!(!verifies(&before, &ca.trust_bundle("shop").unwrap()));
    assert_eq!(root_of(&issue(&ca, "shop")), new_root);

    // A second rotation starts from generation 1.
    let again = rotation::start(&mesh, dir.path(), "shop").unwrap();
    assert_eq!((again.from, again.to), (1, 2));
}

/// A running CA is moved through the phases by `set_signer` without a restart: what the
/// control plane does when the rotation state changes on disk.
#[test]
fn a_running_ca_swaps_signers_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = mesh();
    let ca = Ca::from_mesh(&mesh, dir.path()).unwrap();
    let old_root = pem(ca.tenant("shop").unwrap().signer.certificate());
    rotation::start(&mesh, dir.path(), "shop").unwrap();
    let cfg = mesh.signer("shop-ca").unwrap();
    let (signer, also) = hypha_ca::open_signer(&mesh, cfg, dir.path()).unwrap();
    ca.set_signer(&["shop".to_owned()], signer, also);
    assert_eq!(ca.trust_bundle("shop").unwrap().len(), 2);
    assert_eq!(root_of(&issue(&ca, "shop")), old_root);
    // Other tenants are untouched.
    let main = ca.tenant("default").unwrap();
    assert!(main.also_trusted.is_empty());
}

#[test]
fn status_shows_the_phase_and_both_roots() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = mesh();
    Ca::from_mesh(&mesh, dir.path()).unwrap();
    let started = rotation::start(&mesh, dir.path(), "shop").unwrap();
    let st = hypha_ca::status::status(&mesh, dir.path());
    let shop = st.iter().find(|s| s.tenant == "shop").unwrap();
    assert_eq!(shop.rotation.phase, "distributing");
    assert_eq!(shop.rotation.signing_generation, 0);
    assert_eq!(shop.root.as_ref().unwrap().fingerprint, started.old_root);
    assert_eq!(
        shop.rotation.also_trusted.as_ref().unwrap().fingerprint,
        started.new_root
    );
    let text = hypha_ca::status::render(&st);
    assert!(
        text.contains("phase 1 of 3, distributing generation 1"),
        "{text}"
    );
    assert!(text.contains(&started.new_root), "{text}");

    let s = state(dir.path());
    let issuing = s
        .advance(true, SystemTime::now(), Duration::from_secs(30))
        .unwrap();
    issuing.write(&dir.path().join("shop-ca")).unwrap();
    let st = hypha_ca::status::status(&mesh, dir.path());
    let shop = st.iter().find(|s| s.tenant == "shop").unwrap();
    assert_eq!(shop.rotation.phase, "issuing");
    assert_eq!(shop.root.as_ref().unwrap().fingerprint, started.new_root);
    assert!(shop.key.ends_with("gen-1"), "{}", shop.key);
    let text = hypha_ca::status::render(&st);
    assert!(
        text.contains("phase 2 of 3, issuing from generation 1"),
        "{text}"
    );

    // A state that does not parse is reported, not taken for "idle".
    std::fs::write(dir.path().join("shop-ca/rotation.json"), "{").unwrap();
    let st = hypha_ca::status::status(&mesh, dir.path());
    let shop = st.iter().find(|s| s.tenant == "shop").unwrap();
    assert!(shop.rotation.error.is_some());
    assert!(Ca::from_mesh(&mesh, dir.path()).is_err());
}
