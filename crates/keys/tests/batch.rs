//! The batching RSA provider: signatures BoringSSL verifies for every TLS RSA scheme and key
//! size, raw decryption, TLS handshakes through it, the two flush reasons, and the fallbacks
//! (keys the engine does not take, a CPU without AVX-512 IFMA).

use std::sync::Arc;
use std::time::Duration;

use boring::bn::BigNum;
use boring::hash::MessageDigest;
use boring::pkey::PKey;
use boring::rsa::{Padding, Rsa};
use boring::ssl::SslSignatureAlgorithm;
use common::{handshake, p256, rsa2048, self_signed, server, verifies};
use hypha_keys::batch::{BatchConfig, Batcher};
use hypha_keys::KeyProvider;
use hypha_rsa_mb::Engine;

mod common;

/// A batcher on this CPU's engine, or `None` (said loudly) on a CPU without AVX-512 IFMA.
fn batcher(poll_delay: Duration) -> Option<Arc<Batcher>> {
    if !Engine::detect().is_accelerated() {
        eprintln!("NOTE: this CPU has no AVX-512 IFMA: only the fallback is tested in this file");
        return None;
    }
    let config = BatchConfig {
        poll_delay,
        fallback: false,
        queues: 1,
    };
    Some(Batcher::new(config).unwrap())
}

/// Signs `msg` with a SHA-256 scheme (`pss`: RSA-PSS, else PKCS#1 v1.5; `None`: ECDSA) and
/// checks the signature with BoringSSL against the provider's public key.
async fn signs_and_verifies(provider: &Arc<dyn KeyProvider>, pss: Option<bool>, msg: &[u8]) {
    let alg = match pss {
        Some(true) => SslSignatureAlgorithm::RSA_PSS_RSAE_SHA256,
        Some(false) => SslSignatureAlgorithm::RSA_PKCS1_SHA256,
        None => SslSignatureAlgorithm::ECDSA_SECP256R1_SHA256,
    };
    let sig = provider.sign(alg, msg).await.unwrap();
    assert!(
        verifies(
            provider.public_key(),
            MessageDigest::sha256(),
            pss,
            msg,
            &sig
        ),
        "{alg}"
    );
}

/// A TLS RSA scheme, its digest, and whether it is PSS.
type Scheme = (SslSignatureAlgorithm, fn() -> MessageDigest, bool);

const SCHEMES: [Scheme; 6] = [
    (
        SslSignatureAlgorithm::RSA_PKCS1_SHA256,
        MessageDigest::sha256,
        false,
    ),
    (
        SslSignatureAlgorithm::RSA_PKCS1_SHA384,
        MessageDigest::sha384,
        false,
    ),
    (
        SslSignatureAlgorithm::RSA_PKCS1_SHA512,
        MessageDigest::sha512,
        false,
    ),
    (
        SslSignatureAlgorithm::RSA_PSS_RSAE_SHA256,
        MessageDigest::sha256,
        true,
    ),
    (
        SslSignatureAlgorithm::RSA_PSS_RSAE_SHA384,
        MessageDigest::sha384,
        true,
    ),
    (
        SslSignatureAlgorithm::RSA_PSS_RSAE_SHA512,
        MessageDigest::sha512,
        true,
    ),
];

/// Eight signatures at once (one full batch, so the engine computes them), each verified.
async fn sign_eight(provider: &Arc<dyn KeyProvider>, scheme: Scheme, bits: usize) {
    let (alg, digest, pss) = scheme;
    let msgs: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i; 40 + usize::from(i)]).collect();
    let sigs = futures_join_all(msgs.iter().map(|m| provider.sign(alg, m))).await;
    for (m, sig) in msgs.iter().zip(sigs) {
        let sig = sig.unwrap();
        assert_eq!(sig.len(), bits / 8);
        assert!(
            verifies(provider.public_key(), digest(), Some(pss), m, &sig),
            "{alg} {bits}"
        );
        assert!(!verifies(
            provider.public_key(),
            digest(),
            Some(pss),
            b"other",
            &sig
        ));
    }
}

#[tokio::test]
async fn every_rsa_scheme_and_size_verifies_and_decrypts() {
    // Operations go in groups of eight: with this delay only full batches answer.
    let Some(batcher) = batcher(Duration::from_secs(600)) else {
        return;
    };
    for bits in [2048, 3072, 4096] {
        let key = PKey::from_rsa(Rsa::generate(bits).unwrap()).unwrap();
        let provider = batcher.provider(key.clone()).unwrap();
        assert!(
            provider
                .describe()
                .starts_with(&format!("multi-buffer RSA-{bits}")),
            "{}",
            provider.describe()
        );
        for scheme in SCHEMES {
            sign_eight(&provider, scheme, bits as usize).await;
        }
        assert!(provider
            .sign(SslSignatureAlgorithm::ECDSA_SECP256R1_SHA256, b"x")
            .await
            .is_err());

        // Six raw decryptions, one input of the wrong length and the modulus itself: one
        // batch; the two bad ones fail alone.
        let rsa = key.rsa().unwrap();
        let len = bits as usize / 8;
        let plain: Vec<Vec<u8>> = (0..6u8)
            .map(|i| {
                let mut m = vec![i; len];
                m[0] = 0;
                m
            })
            .collect();
        let mut inputs: Vec<Vec<u8>> = plain
            .iter()
            .map(|m| {
                let mut c = vec![0u8; len];
                rsa.public_encrypt(m, &mut c, Padding::NONE).unwrap();
                c
            })
            .collect();
        inputs.push(inputs[0][1..].to_vec());
        inputs.push(rsa.n().to_vec());
        let out = futures_join_all(inputs.iter().map(|c| provider.decrypt(c))).await;
        for (m, got) in plain.iter().zip(&out) {
            assert_eq!(got.as_ref().unwrap(), m);
        }
        assert!(out[6].is_err(), "wrong length refused");
        assert!(out[7].is_err(), "n itself refused");
    }
    let m = batcher.metrics();
    assert_eq!((m.engine, m.batched_keys), ("avx512ifma", 3));
    assert_eq!((m.ok, m.failed), (3 * (6 * 8 + 6), 3 * 2));
    assert_eq!(
        (m.flushed_full, m.flushed_timer, m.flushed_idle),
        (21, 0, 0)
    );
}

#[tokio::test]
async fn eight_concurrent_operations_make_one_full_batch() {
    // A poll delay far longer than the test: only a full batch can answer in time.
    let Some(batcher) = batcher(Duration::from_secs(600)) else {
        return;
    };
    let providers: Vec<Arc<dyn KeyProvider>> = (0..4)
        .map(|_| batcher.provider(rsa2048()).unwrap())
        .collect();
    let msg = b"eight handshakes at once";
    let signs = (0..8).map(|i| {
        let p = providers[i % providers.len()].clone();
        async move {
            (
                p.sign(SslSignatureAlgorithm::RSA_PSS_RSAE_SHA256, msg)
                    .await,
                p,
            )
        }
    });
    let done = tokio::time::timeout(Duration::from_secs(60), futures_join_all(signs))
        .await
        .expect("a full batch is computed without waiting for the timer");
    for (sig, p) in done {
        assert!(verifies(
            p.public_key(),
            MessageDigest::sha256(),
            Some(true),
            msg,
            &sig.unwrap()
        ));
    }
    let m = batcher.metrics();
    assert_eq!((m.flushed_full, m.flushed_timer, m.flushed_idle), (1, 0, 0));
    assert_eq!(m.batch_sizes, [0, 0, 0, 0, 0, 0, 0, 1]);
    assert_eq!(m.queue_wait.count, 8);
}

#[tokio::test]
async fn a_lone_operation_waits_for_the_timer_and_no_longer() {
    let delay = Duration::from_millis(40);
    let Some(batcher) = batcher(delay) else {
        return;
    };
    let provider = batcher.provider(rsa2048()).unwrap();
    let start = std::time::Instant::now();
    signs_and_verifies(&provider, Some(false), b"alone").await;
    assert!(start.elapsed() >= delay, "answered before the poll delay");
    let m = batcher.metrics();
    assert_eq!((m.flushed_full, m.flushed_timer, m.flushed_idle), (0, 1, 0));
    // A batch of one: computed by BoringSSL, the signature checked above all the same.
    assert_eq!(m.batch_sizes[0], 1);
    // It waited for the delay (it could not fill a batch) and was then computed: the wait
    // recorded is at least the delay, and well under a second.
    assert_eq!(m.queue_wait.count, 1);
    assert!(
        m.queue_wait.sum_seconds >= delay.as_secs_f64(),
        "{:?}",
        m.queue_wait
    );
    assert!(m.queue_wait.sum_seconds < 1.0, "{:?}", m.queue_wait);
}

/// Operations that arrive further apart than the poll delay stop waiting for company: after
/// a few, each is computed as soon as it arrives ("idle").
#[tokio::test]
async fn a_quiet_queue_computes_at_once() {
    let delay = Duration::from_millis(5);
    let Some(batcher) = batcher(delay) else {
        return;
    };
    let provider = batcher.provider(rsa2048()).unwrap();
    for i in 0..8u8 {
        signs_and_verifies(&provider, Some(false), &[i]).await;
        tokio::time::sleep(delay * 8).await;
    }
    let m = batcher.metrics();
    assert_eq!(m.flushed_full, 0);
    assert_eq!(m.flushed_timer + m.flushed_idle, 8);
    assert!(m.flushed_idle >= 5, "{m:?}");
}

#[tokio::test]
async fn handshakes_run_through_the_batcher() {
    let Some(batcher) = batcher(Duration::from_millis(2)) else {
        return;
    };
    let key = rsa2048();
    let cert = self_signed(&key);
    let addr = server(batcher.provider(key).unwrap(), cert.clone()).await;
    let clients = (0..12).map(|_| handshake(addr, &cert));
    for out in futures_join_all(clients).await {
        assert_eq!(out, "ok");
    }
    let m = batcher.metrics();
    assert_eq!(m.ok, 12, "each handshake's signature came from the engine");
}

#[tokio::test]
async fn keys_the_engine_does_not_take_fall_back_to_software() {
    let Some(batcher) = batcher(Duration::from_millis(1)) else {
        return;
    };
    let e3 = Rsa::generate_with_e(2048, &BigNum::from_u32(3).unwrap()).unwrap();
    for key in [
        p256(),
        PKey::from_rsa(Rsa::generate(1024).unwrap()).unwrap(),
        PKey::from_rsa(e3).unwrap(),
    ] {
        let provider = batcher.provider(key).unwrap();
        assert!(
            provider.describe().starts_with("software"),
            "{}",
            provider.describe()
        );
        let pss = provider.public_key().rsa().ok().map(|_| false);
        signs_and_verifies(&provider, pss, b"fallback").await;
    }
    let m = batcher.metrics();
    assert_eq!((m.fallback_keys, m.batched_keys, m.ok), (3, 0, 0));
}

#[tokio::test]
async fn a_cpu_without_ifma_falls_back_or_refuses_as_configured() {
    let refuse = BatchConfig {
        fallback: false,
        ..BatchConfig::default()
    };
    let err = Batcher::with_engine(refuse, Engine::portable()).unwrap_err();
    assert!(err.to_string().contains("AVX-512 IFMA"), "{err}");

    let allow = BatchConfig {
        fallback: true,
        ..BatchConfig::default()
    };
    let batcher = Batcher::with_engine(allow, Engine::portable()).unwrap();
    let provider = batcher.provider(rsa2048()).unwrap();
    assert_eq!(provider.describe(), "software RSA-2048");
    signs_and_verifies(&provider, Some(true), b"x").await;
    assert_eq!(batcher.metrics().engine, "off");
}

/// All of `futures`, concurrently on this task (no extra dependency for `join_all`).
async fn futures_join_all<F: std::future::Future>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output> {
    let handles: Vec<_> = futures.map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = handles.iter().map(|_| None).collect();
    let mut handles: Vec<Option<_>> = handles.into_iter().map(Some).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (h, out) in handles.iter_mut().zip(outputs.iter_mut()) {
            if let Some(f) = h {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        *out = Some(v);
                        *h = None;
                    }
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().map(|o| o.unwrap()).collect()
}
