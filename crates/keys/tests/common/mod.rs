//! Shared by the key provider tests: keys, a self-signed certificate, signature checks and a
//! TLS server whose context holds no private key.

#![allow(dead_code)]

use std::sync::Arc;

use boring::asn1::Asn1Time;
use boring::ec::{EcGroup, EcKey};
use boring::hash::MessageDigest;
use boring::nid::Nid;
use boring::pkey::{PKey, Private, Public};
use boring::rsa::{Padding, Rsa};
use boring::sign::{RsaPssSaltlen, Verifier};
use boring::ssl::{SslAcceptor, SslConnector, SslMethod, SslVerifyMode};
use boring::x509::{X509Name, X509};
use hypha_keys::{KeyProvider, Method};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub fn p256() -> PKey<Private> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap()
}

pub fn rsa2048() -> PKey<Private> {
    PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap()
}

pub fn self_signed(key: &PKey<Private>) -> X509 {
    let mut name = X509Name::builder().unwrap();
    name.append_entry_by_text("CN", "keys-test").unwrap();
    let name = name.build();
    let mut b = X509::builder().unwrap();
    b.set_version(2).unwrap();
    b.set_subject_name(&name).unwrap();
    b.set_issuer_name(&name).unwrap();
    b.set_pubkey(key).unwrap();
    b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    b.set_not_after(&Asn1Time::days_from_now(1).unwrap())
        .unwrap();
    b.sign(key, MessageDigest::sha256()).unwrap();
    b.build()
}

pub fn verifies(
    public: &PKey<Public>,
    digest: MessageDigest,
    pss: Option<bool>,
    msg: &[u8],
    sig: &[u8],
) -> bool {
    let mut v = Verifier::new(digest, public).unwrap();
    match pss {
        Some(true) => {
            v.set_rsa_padding(Padding::PKCS1_PSS).unwrap();
            v.set_rsa_pss_saltlen(RsaPssSaltlen::DIGEST_LENGTH).unwrap();
        }
        Some(false) => v.set_rsa_padding(Padding::PKCS1).unwrap(),
        None => {}
    }
    v.verify_oneshot(sig, msg).unwrap_or(false)
}

/// A TLS server on loopback whose context has the certificate but not the key; each
/// connection gets `ok` written back.
pub async fn server(provider: Arc<dyn KeyProvider>, cert: X509) -> std::net::SocketAddr {
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).unwrap();
    b.set_certificate(&cert).unwrap();
    b.set_async_private_key_method(Method(provider));
    let acceptor = b.build();
    assert!(
        acceptor.context().private_key().is_none(),
        "the context must not hold the key"
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut s) = tokio_boring::accept(&acceptor, tcp).await {
                    let _ = s.write_all(b"ok").await;
                    let _ = s.shutdown().await;
                }
            });
        }
    });
    addr
}

pub async fn handshake(addr: std::net::SocketAddr, cert: &X509) -> String {
    let mut b = SslConnector::builder(SslMethod::tls()).unwrap();
    b.cert_store_mut().add_cert(cert.clone()).unwrap();
    b.set_verify(SslVerifyMode::PEER);
    let mut cfg = b.build().configure().unwrap();
    cfg.set_verify_hostname(false);
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut s = tokio_boring::connect(cfg, "keys-test", tcp).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}
