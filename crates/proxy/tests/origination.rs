//! TLS origination (issue 24, item 10): a DestinationRule with `tls.mode: SIMPLE` or `MUTUAL`
//! makes the sidecar speak TLS to a server that expects it, verified against the rule's roots
//! and names, instead of sending the app's plaintext on to the TLS port.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use boring::asn1::Asn1Time;
use boring::bn::{BigNum, MsbOption};
use boring::ec::{EcGroup, EcKey};
use boring::hash::MessageDigest;
use boring::nid::Nid;
use boring::pkey::{PKey, Private};
use boring::ssl::{NameType, SslAcceptor, SslMethod, SslVerifyMode};
use boring::x509::extension::{BasicConstraints, KeyUsage, SubjectAlternativeName};
use boring::x509::store::X509StoreBuilder;
use boring::x509::{X509NameBuilder, X509};
use bytes::Bytes;
use common::*;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

type Key = PKey<Private>;

fn key() -> Key {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap()
}

/// A certificate for `cn` signed by `issuer` (self-signed when `None`): a CA, or a leaf with
/// `dns` names.
fn cert(cn: &str, key: &Key, issuer: Option<(&X509, &Key)>, dns: &[&str]) -> X509 {
    let mut name = X509NameBuilder::new().unwrap();
    name.append_entry_by_nid(Nid::COMMONNAME, cn).unwrap();
    let name = name.build();
    let mut b = X509::builder().unwrap();
    b.set_version(2).unwrap();
    let mut serial = BigNum::new().unwrap();
    serial.rand(64, MsbOption::MAYBE_ZERO, false).unwrap();
    b.set_serial_number(&serial.to_asn1_integer().unwrap())
        .unwrap();
    b.set_subject_name(&name).unwrap();
    b.set_issuer_name(issuer.map_or(&*name, |(c, _)| c.subject_name()))
        .unwrap();
    b.set_pubkey(key).unwrap();
    b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    b.set_not_after(&Asn1Time::days_from_now(1).unwrap())
        .unwrap();
    if issuer.is_none() {
        b.append_extension(&BasicConstraints::new().critical().ca().build().unwrap())
            .unwrap();
        b.append_extension(
            &KeyUsage::new()
                .critical()
                .key_cert_sign()
                .crl_sign()
                .build()
                .unwrap(),
        )
        .unwrap();
    } else {
        let mut san = SubjectAlternativeName::new();
        for d in dns {
            san.dns(d);
        }
        if !dns.is_empty() {
            let ext = san.build(&b.x509v3_context(issuer.map(|i| &**i.0), None));
            b.append_extension(&ext.unwrap()).unwrap();
        }
    }
    b.sign(issuer.map_or(key, |i| i.1), MessageDigest::sha256())
        .unwrap();
    b.build()
}

/// Two CAs and the certificates each test server and client uses, as PEM files in a
/// directory the test owns.
struct Pki {
    dir: tempfile::TempDir,
    ca: (X509, Key),
    other_ca: (X509, Key),
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let k = key();
        let ca = (cert("test root", &k, None, &[]), k);
        let k = key();
        let other_ca = (cert("other root", &k, None, &[]), k);
        let pki = Pki { dir, ca, other_ca };
        pki.write("ca.pem", &pki.ca.0.to_pem().unwrap());
        pki
    }

    fn write(&self, name: &str, pem: &[u8]) -> String {
        let path = self.dir.path().join(name);
        std::fs::write(&path, pem).unwrap();
        path.to_str().unwrap().to_owned()
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_owned()
    }

    /// A leaf for `dns` (named `cn`) signed by the test root, or by the other one.
    fn leaf(&self, cn: &str, dns: &[&str], other: bool) -> (X509, Key) {
        let k = key();
        let (ca, ca_key) = if other { &self.other_ca } else { &self.ca };
        (cert(cn, &k, Some((ca, ca_key)), dns), k)
    }
}

/// What the TLS server does with a connection after the handshake.
#[derive(Clone, Copy)]
enum Serve {
    /// Answers HTTP (1.1 or 2) with `tls <version> sni=<sni> client=<cn> <path>`.
    Http,
    /// Sends back what it reads, prefixed with `sni=<sni>;`.
    Echo,
}

/// A server that speaks only TLS, with `leaf`; when `client_ca` is set, it requires a client
/// certificate from that CA.
async fn tls_server(leaf: &(X509, Key), client_ca: Option<&X509>, serve: Serve) -> SocketAddr {
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).unwrap();
    b.set_certificate(&leaf.0).unwrap();
    b.set_private_key(&leaf.1).unwrap();
    if let Some(ca) = client_ca {
        let mut store = X509StoreBuilder::new().unwrap();
        store.add_cert(ca.clone()).unwrap();
        b.set_cert_store(store.build());
        b.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
    }
    b.set_alpn_select_callback(|_, offered| {
        boring::ssl::select_next_proto(b"\x02h2\x08http/1.1", offered)
            .ok_or(boring::ssl::AlpnError::NOACK)
    });
    let acceptor = Arc::new(b.build());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // A client that is not TLS, or fails verification, ends here.
                let Ok(mut tls) = tokio_boring::accept(&acceptor, stream).await else {
                    return;
                };
                let sni = tls
                    .ssl()
                    .servername(NameType::HOST_NAME)
                    .unwrap_or("-")
                    .to_owned();
                match serve {
                    Serve::Echo => {
                        let mut buf = [0u8; 64];
                        let n = tls.read(&mut buf).await.unwrap_or(0);
                        let mut out = format!("sni={sni};").into_bytes();
                        out.extend_from_slice(&buf[..n]);
                        let _ = tls.write_all(&out).await;
                        let _ = tls.shutdown().await;
                    }
                    Serve::Http => {
                        let client = tls
                            .ssl()
                            .peer_certificate()
                            .and_then(|c| {
                                let cn = c.subject_name().entries_by_nid(Nid::COMMONNAME).next()?;
                                Some(cn.data().as_utf8().ok()?.to_string())
                            })
                            .unwrap_or_else(|| "-".into());
                        let svc = hyper::service::service_fn(move |req: Request<_>| {
                            let body = format!(
                                "tls {:?} sni={sni} client={client} {}",
                                req.version(),
                                req.uri().path()
                            );
                            async move {
                                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
                            }
                        });
                        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(tls), svc)
                            .await;
                    }
                }
            });
        }
    });
    addr
}

/// An external service `host` on `port` (`protocol`) whose one endpoint is `at`, and the
/// DestinationRule `tls` for it.
fn external(host: &str, port: u16, protocol: &str, at: SocketAddr, tls: &str) -> String {
    let name = host.split('.').next().unwrap();
    format!(
        r#"{}---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {name}, namespace: shop}}
spec:
  host: {host}
  trafficPolicy: {{tls: {tls}}}
"#,
        external_service(host, port, protocol, at)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_rules_originate_tls_verified_by_roots_and_names() {
    let pki = Pki::new();
    let ca = pki.path("ca.pem");
    let api = tls_server(
        &pki.leaf("api", &["api.ext.test"], false),
        None,
        Serve::Http,
    )
    .await;
    let other = tls_server(
        &pki.leaf("other", &["*.other.test"], false),
        None,
        Serve::Http,
    )
    .await;
    let rogue = tls_server(
        &pki.leaf("rogue", &["rogue.ext.test"], true),
        None,
        Serve::Http,
    )
    .await;
    let mutual = tls_server(
        &pki.leaf("mutual", &["mutual.ext.test"], false),
        Some(&pki.ca.0),
        Serve::Http,
    )
    .await;
    let echo = tls_server(
        &pki.leaf("tcp", &["tcp.ext.test"], false),
        None,
        Serve::Echo,
    )
    .await;
    let (client_cert, client_key) = pki.leaf("web-client", &[], false);
    let chain = pki.write("client.pem", &client_cert.to_pem().unwrap());
    let key_file = pki.write(
        "client-key.pem",
        &client_key.private_key_to_pem_pkcs8().unwrap(),
    );

    let simple = format!("{{mode: SIMPLE, caCertificates: {ca}}}");
    let mut yaml = String::new();
    for (host, at, tls) in [
        // The SNI is the host; the certificate must name it.
        ("api.ext.test", api, simple.clone()),
        // A certificate that names another host is refused...
        ("named.ext.test", other, simple.clone()),
        // ...unless the rule lists that name (a wildcard in the certificate covers it).
        (
            "alias.ext.test",
            other,
            format!("{{mode: SIMPLE, caCertificates: {ca}, subjectAltNames: [a.other.test]}}"),
        ),
        // A certificate from roots the rule does not trust is refused...
        ("rogue.ext.test", rogue, simple.clone()),
        // ...unless the rule verifies nothing.
        (
            "skip.ext.test",
            rogue,
            "{mode: SIMPLE, insecureSkipVerify: true}".to_owned(),
        ),
        // A server that wants a client certificate gets it with MUTUAL...
        (
            "mutual.ext.test",
            mutual,
            format!(
                "{{mode: MUTUAL, caCertificates: {ca}, clientCertificate: {chain}, \
                 privateKey: {key_file}}}"
            ),
        ),
        // ...and refuses SIMPLE.
        (
            "nocert.ext.test",
            mutual,
            format!("{{mode: SIMPLE, caCertificates: {ca}, sni: mutual.ext.test}}"),
        ),
        // Without a rule, the app's plaintext goes as it is: a TLS server refuses it.
        ("plain.ext.test", api, "{mode: DISABLE}".to_owned()),
    ] {
        yaml += &external(host, 80, "HTTP", at, &tls);
    }
    // HTTP/2 with an explicit SNI, and TCP.
    yaml += &external(
        "h2.ext.test",
        80,
        "HTTP2",
        api,
        &format!("{{mode: SIMPLE, caCertificates: {ca}, sni: api.ext.test}}"),
    );
    yaml += &external("tcp.ext.test", 9000, "TCP", echo, &simple);

    let (_cp, client) = client_sidecar(&yaml, &["tcp.ext.test:9000"]).await;
    let proxy = client.http_proxy[0];

    let (status, body, _) = get(proxy, "http://api.ext.test/hello", &[]).await;
    assert_eq!(
        (status, body.as_str()),
        (200, "tls HTTP/1.1 sni=api.ext.test client=- /hello")
    );
    let (status, _, _) = get(proxy, "http://named.ext.test/", &[]).await;
    assert_eq!(status, 503, "a certificate for another name is refused");
    let (status, body, _) = get(proxy, "http://alias.ext.test/x", &[]).await;
    assert_eq!(
        (status, body.as_str()),
        (200, "tls HTTP/1.1 sni=alias.ext.test client=- /x")
    );
    let (status, _, _) = get(proxy, "http://rogue.ext.test/", &[]).await;
    assert_eq!(status, 503, "a certificate from untrusted roots is refused");
    let (status, body, _) = get(proxy, "http://skip.ext.test/", &[]).await;
    assert_eq!(
        (status, body.as_str()),
        (200, "tls HTTP/1.1 sni=skip.ext.test client=- /")
    );
    let (status, body, _) = get(proxy, "http://mutual.ext.test/m", &[]).await;
    assert_eq!(
        (status, body.as_str()),
        (200, "tls HTTP/1.1 sni=mutual.ext.test client=web-client /m")
    );
    let (status, _, _) = get(proxy, "http://nocert.ext.test/", &[]).await;
    assert_eq!(status, 503, "no client certificate with SIMPLE");
    let (status, _, _) = get(proxy, "http://plain.ext.test/", &[]).await;
    assert_eq!(status, 503, "plaintext to a TLS server");
    let (status, body, _) = get(proxy, "http://h2.ext.test/two", &[]).await;
    assert_eq!(
        (status, body.as_str()),
        (200, "tls HTTP/2.0 sni=api.ext.test client=- /two")
    );
    // Reused connections stay with their own TLS context: the same server through another
    // rule still presents its certificate to that rule's check.
    for _ in 0..3 {
        assert_eq!(get(proxy, "http://api.ext.test/", &[]).await.0, 200);
        assert_eq!(get(proxy, "http://plain.ext.test/", &[]).await.0, 503);
    }

    let mut tcp = tokio::net::TcpStream::connect(client.services[0])
        .await
        .unwrap();
    tcp.write_all(b"ping").await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut got))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&got), "sni=tcp.ext.test;ping");
}

#[test]
fn a_rule_whose_files_the_sidecar_cannot_read_is_refused_by_name() {
    let pki = Pki::new();
    let missing = pki.path("missing.pem");
    let yaml = external(
        "api.ext.test",
        80,
        "HTTP",
        "127.0.0.1:443".parse().unwrap(),
        &format!("{{mode: SIMPLE, caCertificates: {missing}}}"),
    );
    let t = hypha_control::Translation::new(std::sync::Arc::new(config(&yaml)), "1");
    let snap = t.snapshot(&node("web-1", &[("app", "web")]));
    let name = "outbound|80||api.ext.test";
    let sent = &snap
        .resources(hypha_xds::type_url::CLUSTER)
        .unwrap()
        .get(name)
        .unwrap()
        .body
        .value;
    // The cluster is refused (NACKed) with the file and the reason: nothing goes out in
    // plaintext instead.
    let err = hypha_proxy::compile::cluster(name, sent)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(err.contains(&format!("{missing}: No such file")), "{err}");
}
