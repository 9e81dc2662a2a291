//! Keys in a real PKCS#11 token (SoftHSM2, in a private token directory): generated inside,
//! signing every TLS scheme through the token's thread pool, and serving a TLS handshake
//! whose context holds no key.

use std::path::Path;
use std::sync::Arc;

use boring::hash::MessageDigest;
use boring::rsa::Padding;
use boring::sign::{RsaPssSaltlen, Verifier};
use boring::ssl::SslSignatureAlgorithm;
use hypha_keys::pkcs11::{PinSource, Token, TokenConfig, TokenInfo, TokenKeyKind};
use hypha_keys::softhsm::{TokenDir, MODULE};
use hypha_keys::{KeyError, KeyProvider};

/// A fresh SoftHSM2 token in `dir`, labelled `label`, user PIN 1234; this process's only
/// token directory (the library reads `SOFTHSM2_CONF` once; one test per binary sets it).
fn softhsm(dir: &Path, label: &str) {
    let tokens = TokenDir::create_in(dir).unwrap();
    tokens.init_token(label, "1234").unwrap();
    std::env::set_var("SOFTHSM2_CONF", &tokens.conf);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_generated_in_softhsm2_sign_every_scheme() {
    if !hypha_keys::softhsm::available_for_tests() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    softhsm(dir.path(), "hypha-test");
    // A wrong PIN is an error, not a panic. (First: a login holds for the whole process.)
    std::env::set_var("HYPHA_TEST_PIN", "0000");
    let wrong = Token::open(&TokenConfig {
        module: MODULE.into(),
        label: "hypha-test".into(),
        pin: PinSource::Env("HYPHA_TEST_PIN".into()),
        threads: 1,
    });
    assert!(wrong.is_err());
    // An unknown token label too.
    let missing = Token::open(&TokenConfig {
        module: MODULE.into(),
        label: "no-such-token".into(),
        pin: PinSource::Env("HYPHA_TEST_PIN".into()),
        threads: 1,
    });
    assert!(missing.is_err());
    std::env::set_var("HYPHA_TEST_PIN", "1234");
    let cfg = TokenConfig {
        module: MODULE.into(),
        label: "hypha-test".into(),
        pin: PinSource::Env("HYPHA_TEST_PIN".into()),
        threads: 2,
    };
    // A check sees what the token says about itself and can refuse it before any login.
    let refused = Token::open_checked(&cfg, |info: &TokenInfo| {
        assert_eq!(info.label, "hypha-test");
        assert_eq!(info.manufacturer_id, "SoftHSM project");
        assert_eq!(info.model, "SoftHSM v2");
        assert!(!info.serial_number.is_empty());
        assert_eq!(info.module, Path::new(MODULE));
        Err(KeyError::Backend("not this one".into()))
    });
    assert!(refused.unwrap_err().to_string().contains("not this one"));
    let token = Token::open(&cfg).unwrap();
    let msg = b"a handshake transcript";

    let ec = token
        .generate(TokenKeyKind::EcdsaP256, "ec-key", false)
        .await
        .unwrap();
    assert!(ec
        .describe()
        .starts_with("PKCS#11 token \"hypha-test\" ECDSA"));
    let sig = ec
        .sign(SslSignatureAlgorithm::ECDSA_SECP256R1_SHA256, msg)
        .await
        .unwrap();
    let ok = Verifier::new(MessageDigest::sha256(), ec.public_key())
        .unwrap()
        .verify_oneshot(&sig, msg)
        .unwrap();
    assert!(ok, "DER ECDSA signature from the token");

    let rsa = token
        .generate(TokenKeyKind::Rsa(2048), "rsa-key", false)
        .await
        .unwrap();
    for (alg, digest, pss) in [
        (
            SslSignatureAlgorithm::RSA_PKCS1_SHA256,
            MessageDigest::sha256(),
            false,
        ),
        (
            SslSignatureAlgorithm::RSA_PSS_RSAE_SHA256,
            MessageDigest::sha256(),
            true,
        ),
        (
            SslSignatureAlgorithm::RSA_PSS_RSAE_SHA384,
            MessageDigest::sha384(),
            true,
        ),
    ] {
        let sig = rsa.sign(alg, msg).await.unwrap();
        let mut v = Verifier::new(digest, rsa.public_key()).unwrap();
        if pss {
            v.set_rsa_padding(Padding::PKCS1_PSS).unwrap();
            v.set_rsa_pss_saltlen(RsaPssSaltlen::DIGEST_LENGTH).unwrap();
        } else {
            v.set_rsa_padding(Padding::PKCS1).unwrap();
        }
        assert!(v.verify_oneshot(&sig, msg).unwrap(), "{alg}");
    }
    // Raw RSA decryption in the token (an RSA key exchange) undoes a raw encryption with the
    // public key; the ECDSA key refuses.
    let public_rsa = rsa.public_key().rsa().unwrap();
    let mut m = vec![0u8; 256];
    m[1..].fill(0xa5);
    let mut c = vec![0u8; 256];
    public_rsa
        .public_encrypt(&m, &mut c, Padding::NONE)
        .unwrap();
    assert_eq!(rsa.decrypt(&c).await.unwrap(), m);
    assert!(ec.decrypt(&c).await.is_err());
    // A scheme the key cannot do is refused before the token is asked.
    assert!(ec
        .sign(SslSignatureAlgorithm::RSA_PKCS1_SHA256, msg)
        .await
        .is_err());

    // A persistent key is found again by its label (how the CA finds its key after a restart);
    // session objects and unknown labels are not. Lookups wait, so they run off the runtime.
    let persistent = token
        .generate(TokenKeyKind::EcdsaP256, "ca-key", true)
        .await
        .unwrap();
    let t = token.clone();
    let (found, session_key, unknown) = tokio::task::spawn_blocking(move || {
        (
            t.find_blocking("ca-key").unwrap().unwrap(),
            t.find_blocking("ec-key").unwrap(),
            t.find_blocking("no-such-key").unwrap(),
        )
    })
    .await
    .unwrap();
    assert!(session_key.is_none() && unknown.is_none());
    assert_eq!(found.kind(), TokenKeyKind::EcdsaP256);
    assert!(found.public_key().public_eq(persistent.public_key()));
    let sig = tokio::task::spawn_blocking(move || {
        found.sign_blocking(SslSignatureAlgorithm::ECDSA_SECP256R1_SHA256, msg)
    })
    .await
    .unwrap()
    .unwrap();
    let mut v = Verifier::new(MessageDigest::sha256(), persistent.public_key()).unwrap();
    assert!(
        v.verify_oneshot(&sig, msg).unwrap(),
        "blocking DER signature"
    );

    // Many signatures at once go through the pool.
    let ec = Arc::new(ec);
    let mut all = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let ec = ec.clone();
        all.spawn(async move {
            ec.sign(SslSignatureAlgorithm::ECDSA_SECP256R1_SHA256, b"x")
                .await
                .unwrap()
        });
    }
    while let Some(sig) = all.join_next().await {
        let mut v = Verifier::new(MessageDigest::sha256(), ec.public_key()).unwrap();
        assert!(v.verify_oneshot(&sig.unwrap(), b"x").unwrap());
    }

    // The token's metrics count what its threads did: 1 + 3 + 1 + 32 signatures (the refused
    // scheme never reached the token), 3 keys generated, and every job's wait (3 lookups and
    // the decryption too).
    let m = token.metrics();
    assert_eq!(m.label, "hypha-test");
    assert_eq!(
        (m.signed, m.sign_failed, m.generated, m.queued, m.threads),
        (37, 0, 3, 0, 2)
    );
    assert_eq!(m.sign_time.count, 37);
    assert_eq!(m.wait_time.count, 37 + 3 + 3 + 1);
    assert!(m.sign_time.sum_seconds > 0.0);
    assert!(m.sign_time.cumulative.windows(2).all(|w| w[0] <= w[1]));

    // Handshakes that went away before a thread took their operation are skipped: each of
    // these is queued (polled once) and dropped at once.
    for _ in 0..100 {
        let mut sign = rsa.sign(SslSignatureAlgorithm::RSA_PKCS1_SHA256, msg);
        std::future::poll_fn(|cx| {
            let _ = sign.as_mut().poll(cx);
            std::task::Poll::Ready(())
        })
        .await;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let m = loop {
        let m = token.metrics();
        if m.queued == 0 && m.abandoned + m.signed == 100 + 37 {
            break m;
        }
        assert!(std::time::Instant::now() < deadline, "{m:?}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    assert!(m.abandoned > 0, "{m:?}");

    // Session keys leave nothing behind in the token: the public half goes once read, the key
    // when its last user lets go (a rotated-out certificate). The persistent key stays.
    assert_eq!(token.session_objects().await.unwrap(), 2, "ec-key, rsa-key");
    drop(rsa);
    drop(Arc::into_inner(ec).unwrap());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while token.session_objects().await.unwrap() != 0 {
        assert!(std::time::Instant::now() < deadline, "session keys left");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(token.metrics().destroyed, 2);
    let t = token.clone();
    let still = tokio::task::spawn_blocking(move || t.find_blocking("ca-key").unwrap())
        .await
        .unwrap();
    assert!(still.is_some(), "the persistent key was destroyed");
}
