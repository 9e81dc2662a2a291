//! The CA against real BoringSSL: file signers on disk, CSRs built the way a proxy will build
//! them, chains checked with BoringSSL's own X.509 verifier.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use boring::ec::{EcGroup, EcKey};
use boring::hash::MessageDigest;
use boring::nid::Nid;
use boring::pkey::PKey;
use boring::rsa::Rsa;
use boring::x509::{X509Req, X509};
use common::{csr, id, one_tenant, p256, tenant, verifies, San, TD};
use hypha_ca::{Ca, CaError, Caller, FileSigner, Signer, TenantCa};

// Extensions as DER bytes (boring has no accessors for them): OID, critical flag, value.
/// extKeyUsage: SEQUENCE { id-kp-serverAuth, id-kp-clientAuth }.
const EKU_SERVER_CLIENT: &[u8] = &[
    0x06, 0x03, 0x55, 0x1d, 0x25, 0x04, 0x16, 0x30, 0x14, 0x06, 0x08, 0x2b, 0x06, 0x01, 0x05, 0x05,
    0x07, 0x03, 0x01, 0x06, 0x08, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x02,
];
/// keyUsage, critical: digitalSignature.
const KU_DIGITAL_SIGNATURE: &[u8] = &[
    0x06, 0x03, 0x55, 0x1d, 0x0f, 0x01, 0x01, 0xff, 0x04, 0x04, 0x03, 0x02, 0x07, 0x80,
];
/// keyUsage, critical: digitalSignature, keyEncipherment.
const KU_DIGITAL_SIGNATURE_KEY_ENCIPHERMENT: &[u8] = &[
    0x06, 0x03, 0x55, 0x1d, 0x0f, 0x01, 0x01, 0xff, 0x04, 0x04, 0x03, 0x02, 0x05, 0xa0,
];
/// basicConstraints, critical: CA:FALSE (empty SEQUENCE).
const BASIC_CONSTRAINTS_LEAF: &[u8] = &[
    0x06, 0x03, 0x55, 0x1d, 0x13, 0x01, 0x01, 0xff, 0x04, 0x02, 0x30, 0x00,
];

fn has(der: &[u8], pattern: &[u8]) -> bool {
    der.windows(pattern.len()).any(|w| w == pattern)
}

#[test]
fn root_is_generated_once_then_reloaded_identical() {
    let dir = tempfile::tempdir().unwrap();
    let a = FileSigner::open_or_create(dir.path(), TD, "root").unwrap();
    let b = FileSigner::open_or_create(dir.path(), TD, "root").unwrap();
    assert_eq!(
        a.certificate().to_der().unwrap(),
        b.certificate().to_der().unwrap()
    );
    // Same key too: b signs, a's certificate key verifies.
    let sig = b.sign(b"hello").unwrap();
    let public = a.certificate().public_key().unwrap();
    let mut v = boring::sign::Verifier::new(MessageDigest::sha256(), &public).unwrap();
    assert!(v.verify_oneshot(&sig, b"hello").unwrap());
    // The root is a CA, self-signed through the signer seam.
    let root = a.certificate();
    assert!(root.verify(&public).unwrap());
    let text = format!("{:?}", root.subject_name());
    assert!(text.contains(TD), "{text}");
}

#[test]
fn key_file_is_0600_and_a_wider_mode_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("signer");
    FileSigner::open_or_create(&dir, TD, "root").unwrap();
    let key = dir.join("ca-key.pem");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let dmode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(dmode, 0o700, "a created signer dir is private");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = FileSigner::open_or_create(&dir, TD, "root").unwrap_err();
    assert!(
        matches!(err, CaError::KeyFileMode { mode: 0o644, .. }),
        "{err}"
    );
}

#[test]
fn a_missing_key_is_not_silently_replaced() {
    let dir = tempfile::tempdir().unwrap();
    FileSigner::open_or_create(dir.path(), TD, "root").unwrap();
    std::fs::remove_file(dir.path().join("ca-key.pem")).unwrap();
    let err = FileSigner::open_or_create(dir.path(), TD, "root").unwrap_err();
    assert!(matches!(err, CaError::Incomplete { .. }), "{err}");
}

#[test]
fn own_identity_is_issued_and_the_chain_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let ca = one_tenant(dir.path());
    let key = p256();
    let me = Caller::new("bookinfo", "reviews");
    let issued = ca
        .issue(
            &me,
            &csr(&key, &[San::Uri(&id("bookinfo", "reviews"))]),
            Duration::from_secs(3600),
        )
        .unwrap();
    assert_eq!(issued.chain.len(), 2);
    assert_eq!(issued.validity, Duration::from_secs(3600));
    let bundle = ca.trust_bundle("default").unwrap();
    assert_eq!(bundle, vec![issued.chain[1].clone()]);
    assert!(verifies(&issued.chain, &bundle));

    let leaf = X509::from_pem(issued.chain[0].as_bytes()).unwrap();
    assert!(leaf.public_key().unwrap().public_eq(&key));
    let sans = leaf.subject_alt_names().unwrap();
    let sans: Vec<_> = sans.iter().map(|n| n.uri().map(str::to_owned)).collect();
    assert_eq!(sans, vec![Some(id("bookinfo", "reviews"))]);
    let der = leaf.to_der().unwrap();
    assert!(
        has(&der, EKU_SERVER_CLIENT),
        "extKeyUsage serverAuth, clientAuth"
    );
    assert!(
        has(&der, KU_DIGITAL_SIGNATURE),
        "keyUsage: digitalSignature only"
    );
    assert!(
        has(&der, BASIC_CONSTRAINTS_LEAF),
        "basicConstraints CA:FALSE"
    );
    assert!(leaf.subject_key_id().is_some());
    assert_eq!(
        leaf.authority_key_id().unwrap().as_slice(),
        X509::from_pem(bundle[0].as_bytes())
            .unwrap()
            .subject_key_id()
            .unwrap()
            .as_slice()
    );
}

#[test]
fn rsa_2048_is_accepted_with_key_encipherment_and_rsa_1024_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = one_tenant(dir.path());
    let me = Caller::new("ns", "sa");
    let rsa = PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap();
    let issued = ca
        .issue(
            &me,
            &csr(&rsa, &[San::Uri(&id("ns", "sa"))]),
            Duration::ZERO,
        )
        .unwrap();
    let der = X509::from_pem(issued.chain[0].as_bytes())
        .unwrap()
        .to_der()
        .unwrap();
    assert!(has(&der, KU_DIGITAL_SIGNATURE_KEY_ENCIPHERMENT));

    let small = PKey::from_rsa(Rsa::generate(1024).unwrap()).unwrap();
    let err = ca
        .issue(
            &me,
            &csr(&small, &[San::Uri(&id("ns", "sa"))]),
            Duration::ZERO,
        )
        .unwrap_err();
    assert!(
        matches!(err, CaError::UnsupportedKey(ref k) if k == "RSA-1024"),
        "{err}"
    );

    let g = EcGroup::from_curve_name(Nid::SECP384R1).unwrap();
    let p384 = PKey::from_ec_key(EcKey::generate(&g).unwrap()).unwrap();
    let err = ca
        .issue(
            &me,
            &csr(&p384, &[San::Uri(&id("ns", "sa"))]),
            Duration::ZERO,
        )
        .unwrap_err();
    assert!(matches!(err, CaError::UnsupportedKey(_)), "{err}");
}

#[test]
fn someone_elses_identity_is_refused_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let ca = one_tenant(dir.path());
    let err = ca
        .issue(
            &Caller::new("bookinfo", "reviews"),
            &csr(&p256(), &[San::Uri(&id("bookinfo", "ratings"))]),
            Duration::ZERO,
        )
        .unwrap_err();
    match &err {
        CaError::IdentityMismatch { requested, caller } => {
            assert_eq!(requested, &id("bookinfo", "ratings"));
            assert_eq!(caller, &id("bookinfo", "reviews"));
        }
        other => panic!("{other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("sa/ratings") && msg.contains("sa/reviews"),
        "{msg}"
    );
}

#[test]
fn extra_or_missing_sans_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = one_tenant(dir.path());
    let me = Caller::new("bookinfo", "reviews");
    let own = id("bookinfo", "reviews");

    let err = ca
        .issue(
            &me,
            &csr(&p256(), &[San::Uri(&own), San::Dns("evil.example")]),
            Duration::ZERO,
        )
        .unwrap_err();
    assert!(
        matches!(&err, CaError::ExtraSan { extra, .. } if extra == &["DNS:evil.example"]),
        "{err}"
    );

    let other = id("bookinfo", "ratings");
    let err = ca
        .issue(
            &me,
            &csr(&p256(), &[San::Uri(&own), San::Uri(&other)]),
            Duration::ZERO,
        )
        .unwrap_err();
    assert!(
        matches!(&err, CaError::ExtraSan { extra, .. } if extra == &[format!("URI:{other}")]),
        "{err}"
    );

    let err = ca
        .issue(&me, &csr(&p256(), &[]), Duration::ZERO)
        .unwrap_err();
    assert!(matches!(err, CaError::NoSan { .. }), "{err}");
}

#[test]
fn a_tampered_csr_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = one_tenant(dir.path());
    let me = Caller::new("bookinfo", "reviews");
    // Signed for ratings, then edited to say reviews (same length): the signature no longer
    // covers what the CSR says.
    let pem = csr(&p256(), &[San::Uri(&id("bookinfo", "ratings"))]);
    let mut der = X509Req::from_pem(&pem).unwrap().to_der().unwrap();
    let at = der
        .windows(b"ratings".len())
        .position(|w| w == b"ratings")
        .unwrap();
    der[at..at + 7].copy_from_slice(b"reviews");
    let tampered = X509Req::from_der(&der).unwrap().to_pem().unwrap();
    let err = ca.issue(&me, &tampered, Duration::ZERO).unwrap_err();
    assert!(matches!(err, CaError::BadSignature), "{err}");

    let err = ca.issue(&me, b"not a csr", Duration::ZERO).unwrap_err();
    assert!(matches!(err, CaError::BadCsr(_)), "{err}");
}

#[test]
fn validity_is_capped_not_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = tenant("default", "*", &[], dir.path());
    t.max_validity = Duration::from_secs(600);
    let ca = Ca::new(TD, vec![t]).unwrap();
    let me = Caller::new("ns", "sa");
    let issued = ca
        .issue(
            &me,
            &csr(&p256(), &[San::Uri(&id("ns", "sa"))]),
            Duration::from_secs(30 * 24 * 3600),
        )
        .unwrap();
    assert_eq!(issued.validity, Duration::from_secs(600));
    let leaf = X509::from_pem(issued.chain[0].as_bytes()).unwrap();
    // notAfter - notBefore = cap + the 60 s backdate.
    let diff = leaf.not_before().diff(leaf.not_after()).unwrap();
    assert_eq!((diff.days, diff.secs), (0, 660));
}

#[test]
fn tenants_have_separate_roots_until_one_is_shared() {
    let dir = tempfile::tempdir().unwrap();
    let build = |b_trusts_a: bool| {
        let trust: &[&str] = if b_trusts_a { &["a"] } else { &[] };
        Ca::new(
            TD,
            vec![
                tenant("a", "team-a", &[], dir.path()),
                tenant("b", "team-b", trust, dir.path()),
            ],
        )
        .unwrap()
    };
    let ca = build(false);
    let a_root = ca.trust_bundle("a").unwrap();
    let b_root = ca.trust_bundle("b").unwrap();
    assert_ne!(a_root, b_root);

    let leaf_a = ca
        .issue(
            &Caller::new("team-a", "web"),
            &csr(&p256(), &[San::Uri(&id("team-a", "web"))]),
            Duration::ZERO,
        )
        .unwrap();
    assert_eq!(leaf_a.chain[1], a_root[0]);
    assert!(verifies(&leaf_a.chain, &a_root));
    assert!(!verifies(&leaf_a.chain, &b_root));

    // Same signers on disk, now b trusts a (one direction).
    let shared = build(true);
    let b_bundle = shared.trust_bundle("b").unwrap();
    assert_eq!(b_bundle, vec![b_root[0].clone(), a_root[0].clone()]);
    assert!(verifies(&leaf_a.chain, &b_bundle));
    assert_eq!(shared.trust_bundle("a").unwrap(), a_root);

    let err = Ca::new(TD, vec![tenant("c", "x", &["nope"], dir.path())]).unwrap_err();
    assert!(matches!(err, CaError::UnknownTrustedTenant { .. }), "{err}");
}

#[test]
fn from_mesh_config_maps_namespaces_to_tenants() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = hypha_config::MeshConfig::default();
    let ca = Ca::from_mesh(&mesh, dir.path()).unwrap();
    assert_eq!(ca.tenant_of("anything").unwrap().name, "default");
    assert!(dir.path().join("default/ca-key.pem").exists());
    let again = Ca::from_mesh(&mesh, dir.path()).unwrap();
    assert_eq!(
        ca.trust_bundle("default").unwrap(),
        again.trust_bundle("default").unwrap()
    );
}

/// A key holder outside the CA's reach: the shape of the PKCS#11 signer to come. Issuing must
/// go through `sign` alone.
struct CountingSigner {
    inner: FileSigner,
    signs: std::sync::atomic::AtomicUsize,
}

impl Signer for CountingSigner {
    fn certificate(&self) -> &X509 {
        self.inner.certificate()
    }
    fn sign(&self, tbs: &[u8]) -> Result<Vec<u8>, CaError> {
        self.signs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.sign(tbs)
    }
}

#[test]
fn issuing_needs_only_the_signer_seam() {
    let dir = tempfile::tempdir().unwrap();
    let signer = Arc::new(CountingSigner {
        inner: FileSigner::open_or_create(dir.path(), TD, "root").unwrap(),
        signs: 0.into(),
    });
    let ca = Ca::new(
        TD,
        vec![TenantCa {
            name: "t".into(),
            namespaces: vec!["*".into()],
            trust_tenants: vec![],
            signer: signer.clone(),
            also_trusted: Vec::new(),
            max_validity: Duration::from_secs(3600),
        }],
    )
    .unwrap();
    let issued = ca
        .issue(
            &Caller::new("ns", "sa"),
            &csr(&p256(), &[San::Uri(&id("ns", "sa"))]),
            Duration::ZERO,
        )
        .unwrap();
    assert_eq!(signer.signs.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert!(verifies(&issued.chain, &ca.trust_bundle("t").unwrap()));
}

/// Kubernetes CSRs: the identity is the CSR's own, so the signer checks it belongs to its
/// tenant, is of this trust domain, and asks only for a workload certificate's usages.
#[test]
fn kubernetes_csrs_are_signed_only_for_the_signers_own_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(
        TD,
        vec![
            tenant("a", "team-a", &[], dir.path()),
            tenant("b", "team-b", &[], dir.path()),
        ],
    )
    .unwrap();
    let usages: Vec<String> = hypha_ca::KUBERNETES_USAGES.map(String::from).to_vec();
    let web_a = csr(&p256(), &[San::Uri(&id("team-a", "web"))]);
    let issued = ca
        .sign_kubernetes("a", &web_a, &usages, Duration::from_secs(600))
        .unwrap();
    assert!(verifies(&issued.chain, &ca.trust_bundle("a").unwrap()));
    assert!(!verifies(&issued.chain, &ca.trust_bundle("b").unwrap()));
    assert_eq!(issued.validity, Duration::from_secs(600));
    let leaf = X509::from_pem(issued.chain[0].as_bytes()).unwrap();
    let sans: Vec<String> = leaf
        .subject_alt_names()
        .unwrap()
        .iter()
        .filter_map(|n| n.uri().map(str::to_owned))
        .collect();
    assert_eq!(sans, [id("team-a", "web")]);

    let err = ca
        .sign_kubernetes("b", &web_a, &usages, Duration::ZERO)
        .unwrap_err();
    assert!(
        matches!(&err, CaError::OtherTenant { owner, signer, .. } if owner == "a" && signer == "b"),
        "{err}"
    );
    let err = ca
        .sign_kubernetes("a", &web_a, &["code signing".into()], Duration::ZERO)
        .unwrap_err();
    assert!(
        matches!(&err, CaError::Usage(u) if u == "code signing"),
        "{err}"
    );
    let foreign = csr(
        &p256(),
        &[San::Uri("spiffe://other.domain/ns/team-a/sa/web")],
    );
    let err = ca
        .sign_kubernetes("a", &foreign, &usages, Duration::ZERO)
        .unwrap_err();
    assert!(matches!(err, CaError::ForeignIdentity(_)), "{err}");
    for sans in [
        vec![San::Uri(&id("team-a", "web")), San::Dns("web.team-a.svc")],
        vec![San::Dns("web.team-a.svc")],
        vec![],
    ] {
        let err = ca
            .sign_kubernetes("a", &csr(&p256(), &sans), &usages, Duration::ZERO)
            .unwrap_err();
        assert!(matches!(err, CaError::BadCsr(_)), "{err}");
    }
    // The control plane's identity stays reserved to the control plane's namespace.
    let control = csr(&p256(), &[San::Uri(&id("team-a", "hypha-control"))]);
    let err = ca
        .sign_kubernetes("a", &control, &usages, Duration::ZERO)
        .unwrap_err();
    assert!(matches!(err, CaError::Reserved(_)), "{err}");
}

/// `hypha ca status`: each tenant's signer and root, read without opening any key or token.
#[test]
fn status_names_each_tenants_signer_and_root_without_opening_keys() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = "apiVersion: hypha.dev/v1alpha1
kind: MeshConfig
metadata: {name: mesh}
spec:
  signers:
  - {name: files}
  - name: vault
    key: {pkcs11: {module: /nonexistent.so, tokenLabel: tok, pinFile: /nonexistent, keyLabel: ca, attestation: {allow: {labels: [tok]}}}}
  tenants:
  - {name: shop, namespaces: [shop], signer: vault, signerNames: [istio.io/shop]}
  - {name: default, namespaces: ['*'], signer: files, trustTenants: [shop]}
";
    let loaded = hypha_config::load_str("mesh.yaml", yaml);
    assert!(!loaded.has_errors(), "{:?}", loaded.diagnostics);
    let mesh = loaded.config.mesh;
    let before = hypha_ca::status::status(&mesh, dir.path());
    assert_eq!(before.len(), 2);
    let shop = &before[0];
    assert_eq!(shop.key, "pkcs11 tok/ca");
    assert_eq!(shop.signer_names, ["hypha.dev/shop", "istio.io/shop"]);
    assert!(
        shop.root.is_none() && before[1].root.is_none(),
        "no roots yet"
    );
    assert!(before[1].key.starts_with("file "), "{}", before[1].key);

    // The file signer's root, once made, is the one the CA signs with.
    let files =
        FileSigner::open_or_create(&dir.path().join("files"), TD, "Hypha mesh CA files").unwrap();
    let after = hypha_ca::status::status(&mesh, dir.path());
    let root = after[1].root.as_ref().expect("the file signer's root");
    assert_eq!(
        root.fingerprint,
        hypha_ca::signer::fingerprint(files.certificate())
    );
    assert!(
        root.subject.contains("CN=Hypha mesh CA files"),
        "{}",
        root.subject
    );
    let text = hypha_ca::status::render(&after);
    assert!(
        text.contains("tenant shop") && text.contains("none yet"),
        "{text}"
    );
    assert!(text.contains(&root.fingerprint), "{text}");
}
