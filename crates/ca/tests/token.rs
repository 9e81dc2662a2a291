//! The CA with its key in a real PKCS#11 token (SoftHSM2, private token directory): attested
//! first, the key generated in the token and found again after a restart, certificates that
//! `openssl verify` accepts, nothing secret on disk, and clear refusals (attestation, wrong PIN,
//! a certificate that is not the token key's).
//!
//! SoftHSM2 reads its config (`SOFTHSM2_CONF`) once per process: every test here shares one
//! token directory set up before the module is first loaded, and they take turns ([`setup`]
//! returns a lock) so no two initialise or log in to the module at once.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use boring::x509::X509;
use common::{csr, id, p256, verifies, San};
use hypha_ca::attest::{AllowList, Attestor, ExternalCommand, TokenInfo};
use hypha_ca::{Ca, CaError, Caller, FileSigner, Signer};
use hypha_config::MeshConfig;

use hypha_keys::softhsm::MODULE;
/// The token most tests use, and one only the wrong-PIN test logs in to (logins are per token
/// and process: a wrong PIN is only noticed on a token nobody is logged in to).
const TOKEN: &str = "hypha-ca";
const PIN_TOKEN: &str = "hypha-ca-pin";

struct Hsm {
    dir: tempfile::TempDir,
}

impl Hsm {
    fn pin_file(&self) -> PathBuf {
        self.dir.path().join("pin")
    }
}

/// The shared SoftHSM2 token directory (created once) and the turn to use it; `None` (after a
/// loud note) when SoftHSM2 is not installed outside CI.
fn setup() -> Option<(&'static Hsm, MutexGuard<'static, ()>)> {
    static HSM: OnceLock<Hsm> = OnceLock::new();
    static TURN: Mutex<()> = Mutex::new(());
    if !hypha_keys::softhsm::available_for_tests() {
        return None;
    }
    let turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let hsm = HSM.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        hypha_keys::softhsm::tokens_for_tests(dir.path(), &[TOKEN, PIN_TOKEN]).unwrap();
        Hsm { dir }
    });
    Some((hsm, turn))
}

/// A validated mesh config with one tenant on one signer whose key is `key` (YAML, indented
/// for its place under `key:`).
fn mesh(key: &str) -> MeshConfig {
    let yaml = format!(
        "apiVersion: hypha.dev/v1alpha1
kind: MeshConfig
metadata: {{name: mesh}}
spec:
  signers:
  - name: vault
    key:
{key}
  tenants:
  - {{name: t, namespaces: ['*'], signer: vault}}
"
    );
    let loaded = hypha_config::load_str("mesh.yaml", &yaml);
    let problems: Vec<String> = loaded.diagnostics.iter().map(ToString::to_string).collect();
    assert!(problems.is_empty(), "{yaml}\n{problems:#?}");
    loaded.config.mesh
}

/// A pkcs11 key block for `token`/`key_label` with `attestation` (YAML under `attestation:`).
fn pkcs11(hsm: &Hsm, token: &str, key_label: &str, attestation: &str) -> String {
    format!(
        "      pkcs11:
        module: {MODULE}
        tokenLabel: {token}
        pinFile: {}
        keyLabel: {key_label}
        attestation:
{attestation}",
        hsm.pin_file().display()
    )
}

const ALLOW_SOFTHSM: &str =
    "          allow: {labels: [hypha-ca], manufacturers: [SoftHSM project]}";

fn issue(ca: &Ca) -> Vec<String> {
    ca.issue(
        &Caller::new("shop", "web"),
        &csr(&p256(), &[San::Uri(&id("shop", "web"))]),
        Duration::from_secs(3600),
    )
    .unwrap()
    .chain
}

/// `openssl verify -CAfile root.pem leaf.pem`, the way an operator would check it.
fn openssl_verifies(leaf: &str, root: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (leaf_path, root_path) = (dir.path().join("leaf.pem"), dir.path().join("root.pem"));
    std::fs::write(&leaf_path, leaf).unwrap();
    std::fs::write(&root_path, root).unwrap();
    let out = std::process::Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(&root_path)
        .arg(&leaf_path)
        .output()
        .expect("openssl runs (scripts/setup installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.trim_end().ends_with(": OK"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every file under `dir`, relative to it.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().to_path_buf());
            }
        }
    }
    out.sort();
    out
}

/// A logged-in session on `token`, opened with cryptoki directly (not through the code under
/// test), and the private keys labelled `key_label` in it.
fn with_keys<T>(
    token: &str,
    key_label: &str,
    f: impl FnOnce(&cryptoki::session::Session, &[cryptoki::object::ObjectHandle]) -> T,
) -> T {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags};
    use cryptoki::error::{Error, RvError};
    use cryptoki::object::{Attribute, ObjectClass};
    use cryptoki::session::UserType;
    use cryptoki::types::AuthPin;

    let p = hypha_keys::pkcs11::module(std::path::Path::new(MODULE)).unwrap();
    match p.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => panic!("{e}"),
    }
    let slot = p
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| p.get_token_info(*s).unwrap().label().trim_end() == token)
        .unwrap();
    let session = p.open_ro_session(slot).unwrap();
    match session.login(UserType::User, Some(&AuthPin::from("1234".to_owned()))) {
        Ok(()) | Err(Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => panic!("{e}"),
    }
    let keys = session
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Label(key_label.as_bytes().to_vec()),
        ])
        .unwrap();
    f(&session, &keys)
}

fn private_keys(token: &str, key_label: &str) -> usize {
    with_keys(token, key_label, |_, keys| keys.len())
}

/// The CA key's protection as the token reports it: (sensitive, extractable, never
/// extractable, token object).
fn key_attributes(token: &str, key_label: &str) -> (bool, bool, bool, bool) {
    use cryptoki::object::{Attribute, AttributeType};
    with_keys(token, key_label, |session, keys| {
        assert_eq!(keys.len(), 1, "one private key labelled {key_label}");
        let attrs = session
            .get_attributes(
                keys[0],
                &[
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::NeverExtractable,
                    AttributeType::Token,
                ],
            )
            .unwrap();
        let mut got = (false, true, false, false);
        for a in attrs {
            match a {
                Attribute::Sensitive(v) => got.0 = v,
                Attribute::Extractable(v) => got.1 = v,
                Attribute::NeverExtractable(v) => got.2 = v,
                Attribute::Token(v) => got.3 = v,
                _ => {}
            }
        }
        got
    })
}

#[test]
fn token_ca_issues_chains_openssl_verifies_and_finds_its_key_after_restart() {
    let Some((hsm, _turn)) = setup() else { return };
    let data = tempfile::tempdir().unwrap();
    let cfg = mesh(&pkcs11(hsm, TOKEN, "ca-main", ALLOW_SOFTHSM));

    let ca = Ca::from_mesh(&cfg, data.path()).unwrap();
    let chain = issue(&ca);
    let root = ca.trust_bundle("t").unwrap();
    assert_eq!(root.len(), 1);
    assert!(verifies(&chain, &root));
    openssl_verifies(&chain[0], &root[0]);
    // The root is self-signed by the token's key.
    let root_cert = X509::from_pem(root[0].as_bytes()).unwrap();
    assert!(root_cert.verify(&root_cert.public_key().unwrap()).unwrap());

    // The token holds the key as a persistent object it will not let out.
    let (sensitive, extractable, never_extractable, persistent) = key_attributes(TOKEN, "ca-main");
    assert!(sensitive, "CKA_SENSITIVE");
    assert!(!extractable, "not CKA_EXTRACTABLE");
    assert!(never_extractable, "CKA_NEVER_EXTRACTABLE");
    assert!(persistent, "CKA_TOKEN");

    // On disk: the root certificate and nothing else; no private key in any form.
    assert_eq!(files(data.path()), vec![PathBuf::from("vault/ca-cert.pem")]);
    for f in files(data.path()) {
        let text =
            String::from_utf8_lossy(&std::fs::read(data.path().join(&f)).unwrap()).into_owned();
        assert!(!text.contains("PRIVATE KEY"), "{}", f.display());
    }
    drop(ca);

    // A restart finds the same key and the same root, and still issues.
    let again = Ca::from_mesh(&cfg, data.path()).unwrap();
    assert_eq!(again.trust_bundle("t").unwrap(), root);
    let chain = issue(&again);
    openssl_verifies(&chain[0], &root[0]);
    drop(again);

    // The data directory lost: the key in the token is kept and given a new root.
    std::fs::remove_dir_all(data.path().join("vault")).unwrap();
    let remade = Ca::from_mesh(&cfg, data.path()).unwrap();
    let new_root = X509::from_pem(remade.trust_bundle("t").unwrap()[0].as_bytes()).unwrap();
    assert!(new_root
        .public_key()
        .unwrap()
        .public_eq(&root_cert.public_key().unwrap()));
    drop(remade);

    // A certificate that is not the token key's is refused, naming the file and the key.
    let other = tempfile::tempdir().unwrap();
    let foreign = FileSigner::open_or_create(other.path(), "x", "x").unwrap();
    let cert_path = data.path().join("vault/ca-cert.pem");
    std::fs::write(&cert_path, foreign.certificate().to_pem().unwrap()).unwrap();
    let err = Ca::from_mesh(&cfg, data.path()).unwrap_err();
    assert!(matches!(err, CaError::TokenKey(_)), "{err}");
    let msg = err.to_string();
    for part in [
        "signer \"vault\"",
        "key \"ca-main\" in token \"hypha-ca\"",
        "ca-cert.pem does not belong to it",
    ] {
        assert!(msg.contains(part), "{part:?} not in: {msg}");
    }

    // A root on disk whose key the token does not hold (another keyLabel) is refused rather
    // than silently replaced, and no key is generated for it.
    std::fs::write(&cert_path, root[0].as_bytes()).unwrap();
    let renamed = mesh(&pkcs11(hsm, TOKEN, "ca-elsewhere", ALLOW_SOFTHSM));
    let err = Ca::from_mesh(&renamed, data.path()).unwrap_err();
    assert!(matches!(err, CaError::TokenKey(_)), "{err}");
    assert!(err.to_string().contains("holds no such key"), "{err}");
}

#[test]
fn the_allow_list_can_refuse_the_token_and_the_ca_then_refuses_the_signer() {
    let Some((hsm, _turn)) = setup() else { return };
    for (allow, reason) in [
        ("{labels: [other-token]}", "label \"hypha-ca\""),
        ("{serialNumbers: ['0000']}", "serial number"),
        (
            "{manufacturers: [Acme HSM]}",
            "manufacturer \"SoftHSM project\"",
        ),
        // Every non-empty list must match, not just one.
        (
            "{labels: [hypha-ca], serialNumbers: ['0000']}",
            "serial number",
        ),
    ] {
        let data = tempfile::tempdir().unwrap();
        let cfg = mesh(&pkcs11(
            hsm,
            TOKEN,
            "ca-refused",
            &format!("          allow: {allow}"),
        ));
        let err = Ca::from_mesh(&cfg, data.path()).unwrap_err();
        assert!(matches!(err, CaError::AttestationRefused(_)), "{err}");
        let msg = err.to_string();
        for part in [
            "signer \"vault\"",
            "token \"hypha-ca\"",
            "allow list",
            reason,
        ] {
            assert!(msg.contains(part), "{part:?} not in: {msg}");
        }
        // Refused before anything was made: no root, no key.
        assert!(files(data.path()).is_empty());
    }
    // Refused before the login: the token was never asked for the key.
    assert_eq!(private_keys(TOKEN, "ca-refused"), 0);
}

/// An executable script in `dir`.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[test]
fn the_command_attestor_approves_only_an_answer_with_the_nonce() {
    // Taken first: the environment is changed below while no other test runs.
    let hsm = setup();
    let bin = tempfile::tempdir().unwrap();
    let seen = bin.path().join("input.json");
    let env = bin.path().join("env.txt");
    // Keeps what it was given, then answers with the nonce (no jq needed: the JSON is compact).
    let echo = script(
        bin.path(),
        "echo-nonce",
        &format!(
            "input=$(cat)\nprintf '%s' \"$input\" > {}\nenv > {}\n\
             printf '%s' \"$input\" | sed 's/.*\"nonce\":\"\\([0-9a-f]*\\)\".*/\\1/'",
            seen.display(),
            env.display()
        ),
    );
    let fails = script(
        bin.path(),
        "fails",
        "cat >/dev/null\necho 'quote verification failed: TCB out of date' >&2\nexit 1",
    );
    let wrong = script(bin.path(), "wrong-nonce", "cat >/dev/null\necho 00ff");
    let slow = script(bin.path(), "slow", "exec sleep 30");
    let token = TokenInfo {
        module: MODULE.into(),
        label: "t".into(),
        manufacturer_id: "m".into(),
        model: "v2".into(),
        serial_number: "42".into(),
    };
    let cmd = |path: &Path, timeout: Duration| ExternalCommand {
        path: path.to_path_buf(),
        args: vec![],
        timeout,
    };
    let nonce = hypha_ca::attest::nonce().unwrap();
    assert_eq!(nonce.len(), 64);
    assert_ne!(
        nonce,
        hypha_ca::attest::nonce().unwrap(),
        "fresh every time"
    );

    std::env::set_var("HYPHA_CA_TEST_SECRET", "do-not-pass-on");
    cmd(&echo, Duration::from_secs(10))
        .attest(&token, &nonce)
        .unwrap();
    let input: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&seen).unwrap()).unwrap();
    assert_eq!(
        input,
        serde_json::json!({
            "module": MODULE, "label": "t", "manufacturerId": "m", "model": "v2",
            "serialNumber": "42", "nonce": nonce,
        })
    );
    let env = std::fs::read_to_string(&env).unwrap();
    assert!(!env.contains("HYPHA_CA_TEST_SECRET"), "{env}");

    let err = cmd(&fails, Duration::from_secs(10))
        .attest(&token, &nonce)
        .unwrap_err();
    assert!(
        err.contains("exit status: 1") && err.contains("TCB out of date"),
        "{err}"
    );
    let err = cmd(&wrong, Duration::from_secs(10))
        .attest(&token, &nonce)
        .unwrap_err();
    assert!(err.contains("did not answer with the nonce"), "{err}");
    let started = std::time::Instant::now();
    let err = cmd(&slow, Duration::from_millis(300))
        .attest(&token, &nonce)
        .unwrap_err();
    assert!(err.contains("no answer within"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "killed on time"
    );
    let err = cmd(&bin.path().join("missing"), Duration::from_secs(1))
        .attest(&token, &nonce)
        .unwrap_err();
    assert!(err.contains("cannot run"), "{err}");

    // The allow list needs at least one entry to approve anything.
    assert!(AllowList::default().attest(&token, &nonce).is_err());

    // Through the CA, with the real token: approved by the echo, refused by the others.
    let Some((hsm, _turn)) = hsm else { return };
    let with = |path: &Path| {
        mesh(&pkcs11(
            hsm,
            TOKEN,
            "ca-command",
            &format!(
                "          command: {{path: {}, args: [--policy, strict], timeout: 5s}}",
                path.display()
            ),
        ))
    };
    let data = tempfile::tempdir().unwrap();
    let ca = Ca::from_mesh(&with(&echo), data.path()).unwrap();
    let chain = issue(&ca);
    assert!(verifies(&chain, &ca.trust_bundle("t").unwrap()));
    let input: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&seen).unwrap()).unwrap();
    assert_eq!(input["label"], TOKEN);
    assert_eq!(input["manufacturerId"], "SoftHSM project");
    drop(ca);
    for (path, reason) in [
        (&fails, "TCB out of date"),
        (&wrong, "did not answer with the nonce"),
    ] {
        let err = Ca::from_mesh(&with(path), data.path()).unwrap_err();
        assert!(matches!(err, CaError::AttestationRefused(_)), "{err}");
        let msg = err.to_string();
        for part in [
            "signer \"vault\"",
            "token \"hypha-ca\"",
            "command /",
            reason,
        ] {
            assert!(msg.contains(part), "{part:?} not in: {msg}");
        }
    }
}

#[test]
fn a_wrong_pin_a_missing_token_or_no_policy_fail_clearly() {
    let Some((hsm, _turn)) = setup() else { return };
    let data = tempfile::tempdir().unwrap();
    std::env::set_var("HYPHA_CA_TEST_WRONG_PIN", "0000");
    let allow_pin_token = "          allow: {labels: [hypha-ca-pin]}";
    let wrong = mesh(&format!(
        "      pkcs11:
        module: {MODULE}
        tokenLabel: {PIN_TOKEN}
        pinEnv: HYPHA_CA_TEST_WRONG_PIN
        keyLabel: k
        attestation:
{allow_pin_token}"
    ));
    let err = Ca::from_mesh(&wrong, data.path()).unwrap_err();
    assert!(matches!(err, CaError::Token { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("signer \"vault\"")
            && msg.contains("logging in to token \"hypha-ca-pin\"")
            && msg.contains("PIN is incorrect"),
        "{msg}"
    );
    assert!(!msg.contains("0000"), "the PIN is not in the error: {msg}");

    let missing = mesh(&pkcs11(
        hsm,
        "no-such-token",
        "k",
        "          allow: {labels: [no-such-token]}",
    ));
    let err = Ca::from_mesh(&missing, data.path()).unwrap_err();
    assert!(
        err.to_string()
            .contains("no token labelled \"no-such-token\""),
        "{err}"
    );

    // Unvalidated config without a policy: refused, never approved by default.
    let mut bare = mesh(&pkcs11(hsm, TOKEN, "k", ALLOW_SOFTHSM));
    if let Some(p) = bare.signers[0].key.pkcs11.as_mut() {
        p.attestation = None;
    }
    let err = Ca::from_mesh(&bare, data.path()).unwrap_err();
    assert!(
        matches!(err, CaError::NoAttestation(ref s) if s == "vault"),
        "{err}"
    );
    assert!(files(data.path()).is_empty());
}

/// The rotation docs/security.md describes, with today's config: a second signer (new
/// keyLabel) in a placeholder tenant both tenants trust, then the signers swapped, then the old
/// one retired. Certificates of the old root keep verifying until it is retired.
#[test]
fn rotating_a_token_key_overlaps_the_old_and_new_roots() {
    let Some((hsm, _turn)) = setup() else { return };
    let data = tempfile::tempdir().unwrap();
    let signer = |name: &str, key: &str| {
        format!(
            "  - name: {name}
    key:
      pkcs11:
        module: {MODULE}
        tokenLabel: {TOKEN}
        pinFile: {}
        keyLabel: {key}
        attestation: {{allow: {{labels: [{TOKEN}]}}}}
",
            hsm.pin_file().display()
        )
    };
    let stage = |signers: &str, tenants: &str| {
        let yaml = format!(
            "apiVersion: hypha.dev/v1alpha1
kind: MeshConfig
metadata: {{name: mesh}}
spec:
  signers:
{signers}  tenants:
{tenants}"
        );
        let loaded = hypha_config::load_str("mesh.yaml", &yaml);
        assert!(!loaded.has_errors(), "{yaml}");
        Ca::from_mesh(&loaded.config.mesh, data.path()).unwrap()
    };
    let both = format!(
        "{}{}",
        signer("ca-1", "rotate-1"),
        signer("ca-2", "rotate-2")
    );

    let before = stage(
        &signer("ca-1", "rotate-1"),
        "  - {name: mesh, namespaces: ['*'], signer: ca-1}\n",
    );
    let old_root = before.trust_bundle("mesh").unwrap();
    let old_cert = issue(&before);
    drop(before);

    // 1. The new key and root, trusted by everyone before anyone is issued from it.
    let overlap = stage(
        &both,
        "  - {name: mesh, namespaces: ['*'], signer: ca-1, trustTenants: [next]}
  - {name: next, namespaces: [hypha-rotation], signer: ca-2, trustTenants: [mesh]}
",
    );
    let bundle = overlap.trust_bundle("mesh").unwrap();
    assert_eq!(bundle.len(), 2);
    assert_eq!(bundle[0], old_root[0]);
    let new_root = bundle[1].clone();
    drop(overlap);

    // 2. Switched: new certificates come from the new key; old ones still verify.
    let switched = stage(
        &both,
        "  - {name: mesh, namespaces: ['*'], signer: ca-2, trustTenants: [prev]}
  - {name: prev, namespaces: [hypha-rotation], signer: ca-1, trustTenants: [mesh]}
",
    );
    let bundle = switched.trust_bundle("mesh").unwrap();
    assert_eq!(bundle, vec![new_root.clone(), old_root[0].clone()]);
    let new_cert = issue(&switched);
    assert!(verifies(&new_cert, std::slice::from_ref(&new_root)));
    assert!(!verifies(&new_cert, &old_root));
    assert!(verifies(&old_cert, &bundle));
    openssl_verifies(&new_cert[0], &new_root);
    drop(switched);

    // 3. Retired: only the new root is trusted.
    let after = stage(
        &signer("ca-2", "rotate-2"),
        "  - {name: mesh, namespaces: ['*'], signer: ca-2}\n",
    );
    assert_eq!(after.trust_bundle("mesh").unwrap(), vec![new_root]);
    assert!(!verifies(&old_cert, &after.trust_bundle("mesh").unwrap()));
}

/// The Kubernetes CSR signer and the cert-manager issuer sign through the same token signer:
/// their certificates chain to the token's root, and the key stays in the token.
#[test]
fn kubernetes_csrs_and_issuer_requests_are_signed_in_the_token() {
    let Some((hsm, _turn)) = setup() else { return };
    let data = tempfile::tempdir().unwrap();
    let cfg = mesh(&pkcs11(hsm, TOKEN, "ca-k8s", ALLOW_SOFTHSM));
    let ca = Ca::from_mesh(&cfg, data.path()).unwrap();
    let root = ca.trust_bundle("t").unwrap();
    let usages: Vec<String> = hypha_ca::KUBERNETES_USAGES.map(String::from).to_vec();

    let csr_signed = ca
        .sign_kubernetes(
            "t",
            &csr(&p256(), &[San::Uri(&id("shop", "web"))]),
            &usages,
            Duration::from_secs(600),
        )
        .unwrap();
    openssl_verifies(&csr_signed.chain[0], &root[0]);
    let issuer_signed = ca
        .sign_for_issuer(
            "t",
            Some("shop"),
            &csr(&p256(), &[San::Dns("web.shop.svc.cluster.local")]),
            &usages,
            Duration::ZERO,
        )
        .unwrap();
    openssl_verifies(&issuer_signed.chain[0], &root[0]);

    let (sensitive, extractable, never_extractable, persistent) = key_attributes(TOKEN, "ca-k8s");
    assert!(sensitive && !extractable && never_extractable && persistent);
    for f in files(data.path()) {
        let text =
            String::from_utf8_lossy(&std::fs::read(data.path().join(&f)).unwrap()).into_owned();
        assert!(!text.contains("PRIVATE KEY"), "{}", f.display());
    }
}

/// `hypha ca rotate` on a token-held signer: the next generation's key is generated in the
/// same token (label `<keyLabel>.gen1`, sensitive, never extractable), only roots reach the
/// data directory, the new key signs once the rotation is in phase 2, and the old key stays in
/// the token for its owner to destroy.
#[test]
fn hypha_ca_rotate_makes_the_next_key_in_the_token() {
    use hypha_ca::rotation::{self, RotationState};
    let Some((hsm, _turn)) = setup() else { return };
    let data = tempfile::tempdir().unwrap();
    let mesh = mesh(&pkcs11(hsm, TOKEN, "gen-ca", ALLOW_SOFTHSM));
    let ca = Ca::from_mesh(&mesh, data.path()).unwrap();
    let old_root = ca.trust_bundle("t").unwrap()[0].clone();

    let started = rotation::start(&mesh, data.path(), "t").unwrap();
    assert_eq!((started.from, started.to), (0, 1));
    assert_eq!(private_keys(TOKEN, "gen-ca.gen1"), 1);
    assert_eq!(
        key_attributes(TOKEN, "gen-ca.gen1"),
        (true, false, true, true)
    );
    // Only certificates and the state on disk: no key bytes.
    for f in files(data.path()) {
        let text = std::fs::read_to_string(data.path().join(&f)).unwrap_or_default();
        assert!(!text.contains("PRIVATE KEY"), "{}", f.display());
    }

    let dir = data.path().join("vault");
    let issuing = RotationState::read(&dir)
        .unwrap()
        .advance(true, std::time::SystemTime::now(), Duration::from_secs(60))
        .unwrap();
    issuing.write(&dir).unwrap();
    let ca = Ca::from_mesh(&mesh, data.path()).unwrap();
    let chain = issue(&ca);
    let bundle = ca.trust_bundle("t").unwrap();
    assert_eq!(bundle.len(), 2);
    assert_ne!(chain[1], old_root, "the new key signs");
    assert_eq!(chain[1], bundle[0]);
    assert!(verifies(&chain, &bundle));
    openssl_verifies(&chain[0], &chain[1]);

    // Done: the old root leaves the bundle; the old key is left in the token.
    let done = issuing
        .advance(
            false,
            std::time::SystemTime::now() + Duration::from_secs(61),
            Duration::from_secs(60),
        )
        .unwrap();
    done.write(&dir).unwrap();
    rotation::retire(mesh.signer("vault").unwrap(), data.path(), 0).unwrap();
    let ca = Ca::from_mesh(&mesh, data.path()).unwrap();
    assert_eq!(ca.trust_bundle("t").unwrap(), [chain[1].clone()]);
    assert_eq!(private_keys(TOKEN, "gen-ca"), 1);
}
