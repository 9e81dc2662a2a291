//! Key providers under BoringSSL: signatures for every TLS scheme verify, a server whose
//! context holds no private key completes real handshakes through the asynchronous
//! private-key method, and a provider that has to wait does not hold up other handshakes.

use std::sync::Arc;
use std::time::Duration;

use boring::hash::MessageDigest;
use boring::pkey::{PKey, Public};
use boring::rsa::Padding;
use boring::ssl::{SslAcceptor, SslConnector, SslMethod, SslSignatureAlgorithm, SslVerifyMode};
use common::{handshake, p256, rsa2048, self_signed, server, verifies};
use hypha_keys::{KeyFuture, KeyProvider, Method, SoftwareKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

mod common;

#[tokio::test]
async fn every_tls_signature_scheme_verifies() {
    let msg = b"the handshake transcript, more or less";
    let ec = SoftwareKey::new(p256()).unwrap();
    let sig = ec
        .sign(SslSignatureAlgorithm::ECDSA_SECP256R1_SHA256, msg)
        .await
        .unwrap();
    assert!(verifies(
        ec.public_key(),
        MessageDigest::sha256(),
        None,
        msg,
        &sig
    ));
    assert!(!verifies(
        ec.public_key(),
        MessageDigest::sha256(),
        None,
        b"other",
        &sig
    ));
    // An RSA scheme for an EC key is refused, not attempted.
    assert!(ec
        .sign(SslSignatureAlgorithm::RSA_PSS_RSAE_SHA256, msg)
        .await
        .is_err());

    let rsa = SoftwareKey::new(rsa2048()).unwrap();
    for (alg, digest, pss) in [
        (
            SslSignatureAlgorithm::RSA_PKCS1_SHA256,
            MessageDigest::sha256(),
            false,
        ),
        (
            SslSignatureAlgorithm::RSA_PKCS1_SHA384,
            MessageDigest::sha384(),
            false,
        ),
        (
            SslSignatureAlgorithm::RSA_PSS_RSAE_SHA256,
            MessageDigest::sha256(),
            true,
        ),
        (
            SslSignatureAlgorithm::RSA_PSS_RSAE_SHA512,
            MessageDigest::sha512(),
            true,
        ),
    ] {
        let sig = rsa.sign(alg, msg).await.unwrap();
        assert_eq!(sig.len(), 256);
        assert!(
            verifies(rsa.public_key(), digest, Some(pss), msg, &sig),
            "{alg}"
        );
    }
    assert!(rsa.sign(SslSignatureAlgorithm::ED25519, msg).await.is_err());
    assert_eq!(rsa.describe(), "software RSA-2048");
    assert_eq!(
        format!("{ec:?}"),
        "software ECDSA",
        "Debug never shows the key"
    );
}

/// A provider whose signatures all wait until `n` of them are pending at once, like a batch
/// that waits to fill up (or a token answering slowly to many handshakes).
struct Gate {
    inner: SoftwareKey,
    barrier: Arc<tokio::sync::Barrier>,
}

impl KeyProvider for Gate {
    fn public_key(&self) -> &PKey<Public> {
        self.inner.public_key()
    }
    fn sign(&self, algorithm: SslSignatureAlgorithm, input: &[u8]) -> KeyFuture<Vec<u8>> {
        let signed = hypha_keys::sign_with(self.inner.private_key(), algorithm, input);
        let barrier = self.barrier.clone();
        Box::pin(async move {
            barrier.wait().await;
            signed
        })
    }
    fn decrypt(&self, input: &[u8]) -> KeyFuture<Vec<u8>> {
        self.inner.decrypt(input)
    }
    fn describe(&self) -> String {
        "gated test key".into()
    }
}

#[tokio::test]
async fn handshakes_sign_through_the_provider_for_ecdsa_and_rsa() {
    for key in [p256(), rsa2048()] {
        let cert = self_signed(&key);
        let addr = server(Arc::new(SoftwareKey::new(key).unwrap()), cert.clone()).await;
        assert_eq!(handshake(addr, &cert).await, "ok");
    }
}

/// A TLS 1.2 server offering only the RSA key exchange: the client encrypts the premaster
/// secret to the certificate's key, and the server's provider decrypts it.
#[tokio::test]
async fn an_rsa_key_exchange_decrypts_through_the_provider() {
    let key = rsa2048();
    let cert = self_signed(&key);
    let provider = SoftwareKey::new(key.clone()).unwrap();

    // Raw decryption undoes a raw encryption; wrong sizes and non-RSA keys are refused.
    let rsa = key.rsa().unwrap();
    let mut m = vec![0u8; 256];
    m[1..].fill(0x5a);
    let mut c = vec![0u8; 256];
    rsa.public_encrypt(&m, &mut c, Padding::NONE).unwrap();
    assert_eq!(provider.decrypt(&c).await.unwrap(), m);
    assert!(provider.decrypt(&c[1..]).await.is_err());
    assert!(SoftwareKey::new(p256()).unwrap().decrypt(&c).await.is_err());

    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).unwrap();
    b.set_max_proto_version(Some(boring::ssl::SslVersion::TLS1_2))
        .unwrap();
    b.set_cipher_list("AES128-GCM-SHA256").unwrap();
    b.set_certificate(&cert).unwrap();
    b.set_async_private_key_method(Method(Arc::new(provider)));
    let acceptor = b.build();
    assert!(acceptor.context().private_key().is_none());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut s = tokio_boring::accept(&acceptor, tcp).await.unwrap();
        s.write_all(b"ok").await.unwrap();
        s.shutdown().await.unwrap();
    });
    let mut c = SslConnector::builder(SslMethod::tls()).unwrap();
    c.cert_store_mut().add_cert(cert.clone()).unwrap();
    c.set_verify(SslVerifyMode::PEER);
    c.set_cipher_list("AES128-GCM-SHA256").unwrap();
    let mut cfg = c.build().configure().unwrap();
    cfg.set_verify_hostname(false);
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut s = tokio_boring::connect(cfg, "keys-test", tcp).await.unwrap();
    // The RSA key exchange was negotiated, with a server context that holds no key: only the
    // provider could have decrypted the premaster secret.
    assert_eq!(
        s.ssl().current_cipher().unwrap().name(),
        "AES128-GCM-SHA256"
    );
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert_eq!(out, "ok");
}

#[tokio::test]
async fn a_waiting_provider_does_not_hold_up_other_handshakes() {
    let key = p256();
    let cert = self_signed(&key);
    // Eight handshakes on a single-threaded runtime, each signature released only once all
    // eight are pending: they complete only if a waiting signature leaves the runtime free
    // for the others (otherwise the barrier never fills and the test times out).
    let gate = Gate {
        inner: SoftwareKey::new(key).unwrap(),
        barrier: Arc::new(tokio::sync::Barrier::new(8)),
    };
    let addr = server(Arc::new(gate), cert.clone()).await;
    let mut all = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let cert = cert.clone();
        all.spawn(async move { handshake(addr, &cert).await });
    }
    let done = tokio::time::timeout(Duration::from_secs(20), async {
        let mut n = 0;
        while let Some(r) = all.join_next().await {
            assert_eq!(r.unwrap(), "ok");
            n += 1;
        }
        n
    })
    .await
    .expect("the handshakes waited on each other");
    assert_eq!(done, 8);
}
