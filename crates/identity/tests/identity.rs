//! Workload identities end to end over loopback: a CA served over TLS (`grpc::incoming`) with
//! join tokens and certificate renewal, workloads bootstrapping and renewing through it, and
//! mutual TLS between two workloads with SPIFFE checks.

use std::sync::Arc;
use std::time::{Duration, Instant};

use boring::x509::X509;
use hypha_ca::{Ca, CaService, Caller, FileSigner, JoinTokens, TenantCa};
use hypha_identity::tls::{self, ClientCert, Peer, TlsError, ALPN_H2_HTTP11};
use hypha_identity::{
    grpc, issue_local, Credentials, Identity, IdentityError, KeyKind, KeySource, Store, Workload,
    WorkloadAuth,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TD: &str = "cluster.local";

fn id(ns: &str, sa: &str) -> String {
    format!("spiffe://{TD}/ns/{ns}/sa/{sa}")
}

fn tenant(name: &str, ns: &str, dir: &std::path::Path) -> TenantCa {
    let signer = FileSigner::open_or_create(&dir.join(name), TD, name).unwrap();
    TenantCa {
        name: name.into(),
        namespaces: vec![ns.into()],
        trust_tenants: vec![],
        signer: Arc::new(signer),
        max_validity: Duration::from_secs(3600),
    }
}

/// A CA (tenants `a` for namespace `a`, `default` for the rest) served over TLS as
/// `spiffe://.../ns/istio-system/sa/hypha-control`; join tokens for default/web and a/app.
struct TestCa {
    uri: String,
    ca: Arc<Ca>,
    ca_roots: Vec<X509>,
    _dir: tempfile::TempDir,
}

async fn serve_ca() -> TestCa {
    let dir = tempfile::tempdir().unwrap();
    let ca = Arc::new(
        Ca::new(
            TD,
            vec![
                tenant("default", "*", dir.path()),
                tenant("a", "a", dir.path()),
            ],
        )
        .unwrap(),
    );
    let roots = ca.all_roots().unwrap();
    let control = issue_local(
        &ca,
        &Caller::new("istio-system", "hypha-control"),
        Duration::from_secs(3600),
        &roots,
    )
    .unwrap();
    let ca_roots = vec![control.chain().last().unwrap().clone()];
    let store = Store::new(Credentials::new(control, ClientCert::Optional).unwrap());
    let tokens = JoinTokens::new([
        ("web-token", Caller::new("default", "web")),
        ("app-token", Caller::new("a", "app")),
    ])
    .unwrap();
    let auth = Arc::new(WorkloadAuth::new(Some(tokens), TD));
    let service = CaService::new(ca.clone(), auth).into_server();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let uri = format!("https://{}", listener.local_addr().unwrap());
    let incoming = grpc::incoming(listener, move || store.load());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming),
    );
    TestCa {
        uri,
        ca,
        ca_roots,
        _dir: dir,
    }
}

impl TestCa {
    fn workload(&self, ns: &str, sa: &str, token: Option<&str>) -> Workload {
        Workload {
            ca: self.uri.clone(),
            ca_roots: self.ca_roots.clone(),
            ca_identity: Peer::ServiceAccount("hypha-control".into()),
            token: token.map(str::to_owned),
            spiffe_id: id(ns, sa),
            keys: KeySource::Software(KeyKind::EcdsaP256),
            validity: Duration::from_secs(600),
        }
    }
}

fn refused(r: Result<Identity, IdentityError>) -> tonic::Code {
    match r {
        Err(IdentityError::Refused { code, .. }) => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn bootstrap_by_token_then_renew_by_certificate() {
    let ca = serve_ca().await;
    let web = ca.workload("default", "web", Some("web-token"));
    let first = web.bootstrap().await.unwrap();
    assert_eq!(first.id(), id("default", "web"));
    let root = first.roots()[0].clone();
    assert!(first.chain()[0]
        .verify(&root.public_key().unwrap())
        .unwrap());

    // Renewal presents the current certificate, not the token.
    let no_token = Workload {
        token: None,
        ..web.clone()
    };
    let second = no_token.renew(&first).await.unwrap();
    assert_eq!(second.id(), first.id());
    assert_ne!(
        second.chain()[0].serial_number().to_bn().unwrap(),
        first.chain()[0].serial_number().to_bn().unwrap()
    );
    assert_ne!(
        second.chain()[0]
            .public_key()
            .unwrap()
            .public_key_to_der()
            .unwrap(),
        first.chain()[0]
            .public_key()
            .unwrap()
            .public_key_to_der()
            .unwrap(),
        "renewal makes a new key"
    );

    // RSA keys too.
    let rsa = Workload {
        keys: KeySource::Software(KeyKind::Rsa2048),
        ..web
    };
    let third = rsa.bootstrap().await.unwrap();
    assert_eq!(
        third.chain()[0].public_key().unwrap().id(),
        boring::pkey::Id::RSA
    );
}

#[tokio::test]
async fn the_ca_refuses_strangers_and_other_identities() {
    let ca = serve_ca().await;
    // No credentials at all.
    let code = refused(ca.workload("default", "web", None).bootstrap().await);
    assert_eq!(code, tonic::Code::Unauthenticated);
    // A token nobody was given.
    let code = refused(
        ca.workload("default", "web", Some("guess"))
            .bootstrap()
            .await,
    );
    assert_eq!(code, tonic::Code::Unauthenticated);
    // web's token asking for app's identity.
    let code = refused(ca.workload("a", "app", Some("web-token")).bootstrap().await);
    assert_eq!(code, tonic::Code::PermissionDenied);
    // web's certificate asking for app's identity.
    let web = ca
        .workload("default", "web", Some("web-token"))
        .bootstrap()
        .await
        .unwrap();
    let code = refused(ca.workload("a", "app", None).renew(&web).await);
    assert_eq!(code, tonic::Code::PermissionDenied);
}

#[tokio::test]
async fn a_workload_checks_who_the_ca_is() {
    let ca = serve_ca().await;
    let w = Workload {
        ca_identity: Peer::OneOf(Arc::from(vec![id("istio-system", "impostor")])),
        ..ca.workload("default", "web", Some("web-token"))
    };
    match w.bootstrap().await {
        Err(IdentityError::Connect { reason, .. }) => {
            assert!(reason.contains("not allowed"), "{reason}");
        }
        other => panic!("expected a refused connection, got {other:?}"),
    }
    // Roots that do not vouch for the CA: the handshake fails.
    let other_dir = tempfile::tempdir().unwrap();
    let stranger = FileSigner::open_or_create(other_dir.path(), TD, "stranger").unwrap();
    let w = Workload {
        ca_roots: vec![hypha_ca::Signer::certificate(&stranger).clone()],
        ..ca.workload("default", "web", Some("web-token"))
    };
    match w.bootstrap().await {
        Err(IdentityError::Connect { reason, .. }) => {
            assert!(reason.contains("certificate"), "{reason}");
        }
        other => panic!("expected a failed handshake, got {other:?}"),
    }
}

/// Serves mutual TLS with `server` on loopback; each accepted connection writes the client's
/// SPIFFE ID back. Returns the address.
async fn echo_identity(server: Identity) -> std::net::SocketAddr {
    let acceptor = tls::server(&server, ClientCert::Require).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut s) = tls::accept(&acceptor, tcp).await {
                    let peer = tls::peer_id(s.ssl()).unwrap_or_default();
                    let _ = s.write_all(peer.as_bytes()).await;
                    let _ = s.shutdown().await;
                }
            });
        }
    });
    addr
}

async fn call(
    addr: std::net::SocketAddr,
    client: Option<&Identity>,
    roots: &[X509],
    allowed: &Peer,
) -> Result<String, TlsError> {
    let connector = tls::client(client, roots).unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut s = tls::connect(&connector, tcp, allowed, ALPN_H2_HTTP11).await?;
    let mut out = String::new();
    match s.read_to_string(&mut out).await {
        Ok(_) => Ok(out),
        Err(e) => Err(TlsError::Handshake(e.to_string())),
    }
}

#[tokio::test]
async fn mutual_tls_checks_spiffe_ids_both_ways() {
    let ca = serve_ca().await;
    let web = ca
        .workload("default", "web", Some("web-token"))
        .bootstrap()
        .await
        .unwrap();
    let server = issue_local(
        &ca.ca,
        &Caller::new("default", "reviews"),
        Duration::from_secs(600),
        &ca.ca.trust_bundle("default").unwrap(),
    )
    .unwrap();
    let addr = echo_identity(server).await;
    let roots = web.roots().to_vec();

    // The expected server; the server sees the client's identity.
    let reviews = Peer::OneOf(Arc::from(vec![id("default", "reviews")]));
    let seen = call(addr, Some(&web), &roots, &reviews).await.unwrap();
    assert_eq!(seen, id("default", "web"));

    // A server that is not who the cluster says its endpoints are.
    let ratings = Peer::OneOf(Arc::from(vec![id("default", "ratings")]));
    match call(addr, Some(&web), &roots, &ratings).await {
        Err(TlsError::UnexpectedPeer { got, .. }) => assert_eq!(got, id("default", "reviews")),
        other => panic!("expected an unexpected peer, got {other:?}"),
    }

    // No client certificate: the server refuses.
    assert!(call(addr, None, &roots, &reviews).await.is_err());

    // Tenant `a`'s workload does not trust the default tenant's root: the handshake fails.
    let app = ca
        .workload("a", "app", Some("app-token"))
        .bootstrap()
        .await
        .unwrap();
    match call(addr, Some(&app), app.roots(), &Peer::Any).await {
        Err(TlsError::Handshake(m)) => assert!(m.contains("certificate"), "{m}"),
        other => panic!("expected a failed handshake, got {other:?}"),
    }
}

#[tokio::test]
async fn an_expired_certificate_is_refused() {
    let ca = serve_ca().await;
    let short = Workload {
        // Long enough that the first call is surely within it on a loaded machine.
        validity: Duration::from_secs(4),
        ..ca.workload("default", "web", Some("web-token"))
    };
    let web = short.bootstrap().await.unwrap();
    let server = issue_local(
        &ca.ca,
        &Caller::new("default", "reviews"),
        Duration::from_secs(600),
        &ca.ca.trust_bundle("default").unwrap(),
    )
    .unwrap();
    let addr = echo_identity(server).await;
    let roots = web.roots().to_vec();
    // Valid now.
    call(addr, Some(&web), &roots, &Peer::Any).await.unwrap();
    // Certificates are valid to the second: just over a second past notAfter it has expired.
    let expired = web.not_after() + Duration::from_millis(1100);
    if let Ok(wait) = expired.duration_since(std::time::SystemTime::now()) {
        tokio::time::sleep(wait).await;
    }
    assert!(call(addr, Some(&web), &roots, &Peer::Any).await.is_err());
}

#[tokio::test]
async fn rotation_replaces_the_certificate_at_half_life() {
    let ca = serve_ca().await;
    let w = Workload {
        validity: Duration::from_secs(2),
        ..ca.workload("default", "web", Some("web-token"))
    };
    let first = w.bootstrap().await.unwrap();
    let serial = |c: &Credentials| c.identity.chain()[0].serial_number().to_bn().unwrap();
    let store = Store::new(Credentials::new(first, ClientCert::Require).unwrap());
    let original = serial(&store.load());
    let renew_at = store.load().identity.renew_at();
    tokio::spawn(w.rotate(store.clone(), ClientCert::Require));
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut serials = vec![original];
    while serials.len() < 3 {
        assert!(
            Instant::now() < deadline,
            "rotated {} times",
            serials.len() - 1
        );
        let now = serial(&store.load());
        if serials.last() != Some(&now) {
            assert!(std::time::SystemTime::now() >= renew_at);
            serials.push(now);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Each rotation is a new certificate for the same identity.
    assert_eq!(store.load().identity.id(), id("default", "web"));
}
