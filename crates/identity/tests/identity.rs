//! Workload identities end to end over loopback: a CA served over TLS (`grpc::incoming`) with
//! join tokens and certificate renewal, workloads bootstrapping and renewing through it, and
//! mutual TLS between two workloads with SPIFFE checks.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{echo_on, one_tenant_ca, own_identity, tenant, TD};

use boring::ssl::{SslConnector, SslMethod, SslSessionCacheMode, SslVerifyMode};
use boring::x509::X509;
use hypha_ca::{Ca, CaService, Caller, FileSigner, JoinTokens};
use hypha_identity::tls::{self, ChainCacheStats, ClientCert, Peer, TlsError, ALPN_H2_HTTP11};
use hypha_identity::{
    grpc, issue_local, Credentials, Identity, IdentityError, KeyKind, KeySource, Store, Workload,
    WorkloadAuth,
};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

fn id(ns: &str, sa: &str) -> String {
    format!("spiffe://{TD}/ns/{ns}/sa/{sa}")
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
        .unwrap()
        .with_control_namespace("istio-system"),
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
            ca_roots_file: None,
            ca_identity: Peer::OneOf(Arc::from(vec![id("istio-system", "hypha-control")])),
            token: token.map(Into::into),
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
async fn one_address_cannot_hold_every_handshake() {
    let ca = serve_ca().await;
    let addr: std::net::SocketAddr = ca.uri.trim_start_matches("https://").parse().unwrap();
    let from = |last: u8| async move {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(([127, 0, 0, last], 0).into()).unwrap();
        socket.connect(addr).await.unwrap()
    };
    // Silent clients from one address: sixteen wait in their handshake...
    let mut held = Vec::new();
    for _ in 0..16 {
        held.push(from(2).await);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // ...and the next ones from there are closed at once.
    for _ in 0..8 {
        let mut c = from(2).await;
        let mut b = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(2), c.read(&mut b)).await;
        assert!(
            matches!(read, Ok(Ok(0) | Err(_))),
            "a handshake over the address's share was taken: {read:?}"
        );
    }
    let mut b = [0u8; 16];
    assert!(
        tokio::time::timeout(Duration::from_millis(50), held[0].read(&mut b))
            .await
            .is_err(),
        "a handshake within the share was closed"
    );
    // A workload elsewhere gets its certificate meanwhile.
    let web = ca.workload("default", "web", Some("web-token"));
    assert_eq!(web.bootstrap().await.unwrap().id(), id("default", "web"));
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
        Err(IdentityError::WrongServer { reason, .. }) => {
            assert!(reason.contains("not allowed"), "{reason}");
        }
        other => panic!("expected a refused server, got {other:?}"),
    }
    // Roots that do not vouch for the CA: the handshake fails.
    let other_dir = tempfile::tempdir().unwrap();
    let stranger = FileSigner::open_or_create(other_dir.path(), TD, "stranger").unwrap();
    let w = Workload {
        ca_roots: vec![hypha_ca::Signer::certificate(&stranger).clone()],
        ca_roots_file: None,
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
    echo_on(tls::server(&server, ClientCert::Require).unwrap()).await
}

async fn call(
    addr: std::net::SocketAddr,
    client: Option<&Identity>,
    roots: &[X509],
    allowed: &Peer,
) -> Result<String, TlsError> {
    call_on(&tls::client(client, roots).unwrap(), addr, allowed).await
}

/// [`call`] with a context the test keeps.
async fn call_on(
    connector: &SslConnector,
    addr: std::net::SocketAddr,
    allowed: &Peer,
) -> Result<String, TlsError> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut s = tls::connect(connector, tcp, allowed, ALPN_H2_HTTP11).await?;
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

/// Each side remembers the peer chains it verified (`hypha_identity::verified`): the same chain
/// again is not re-verified, another chain is, and a remembered chain is refused once expired.
#[tokio::test]
async fn an_expired_certificate_is_refused_even_when_its_chain_was_verified_before() {
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
    let acceptor = tls::server(&server, ClientCert::Require).unwrap();
    let addr = echo_on(acceptor.clone()).await;
    let roots = web.roots().to_vec();
    let server_cache = || tls::chain_cache_stats(acceptor.context());
    let stats = |hits, misses| ChainCacheStats { hits, misses };

    // Valid now: verified the first time, remembered the second, on both sides.
    let connector = tls::client(Some(&web), &roots).unwrap();
    let client_cache = || tls::chain_cache_stats(connector.context());
    for _ in 0..2 {
        let seen = call_on(&connector, addr, &Peer::Any).await.unwrap();
        assert_eq!(seen, id("default", "web"));
    }
    assert_eq!(server_cache(), stats(1, 1));
    assert_eq!(client_cache(), stats(1, 1));

    // The same SPIFFE ID from a CA the server does not trust: verified (not remembered as the
    // other chain) and refused.
    let dir = tempfile::tempdir().unwrap();
    let stranger = one_tenant_ca(dir.path());
    let impostor = own_identity(&stranger, "default", "web");
    assert!(call(addr, Some(&impostor), &roots, &Peer::Any)
        .await
        .is_err());
    assert_eq!(server_cache(), stats(1, 2));

    // Certificates are valid to the second: just over a second past notAfter it has expired,
    // and the remembered chain no longer counts.
    let expired = web.not_after() + Duration::from_millis(1100);
    if let Ok(wait) = expired.duration_since(std::time::SystemTime::now()) {
        tokio::time::sleep(wait).await;
    }
    assert!(call_on(&connector, addr, &Peer::Any).await.is_err());
    assert_eq!(server_cache(), stats(1, 3));
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

/// Servers issue no session tickets (Hypha's clients never resume, so each would be work
/// thrown away): a client that keeps every session it is given gets none.
#[tokio::test]
async fn a_server_gives_no_session_to_resume() {
    let dir = tempfile::tempdir().unwrap();
    let server = own_identity(&one_tenant_ca(dir.path()), "default", "reviews");
    let addr = echo_on(tls::server(&server, ClientCert::Optional).unwrap()).await;

    let sessions = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut b = SslConnector::builder(SslMethod::tls()).unwrap();
    b.set_verify(SslVerifyMode::NONE);
    b.set_session_cache_mode(SslSessionCacheMode::CLIENT);
    let seen = sessions.clone();
    b.set_new_session_callback(move |_, _| {
        seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    });
    let client = b.build();
    for _ in 0..2 {
        let mut cfg = client.configure().unwrap();
        cfg.set_verify_hostname(false);
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut s = tokio_boring::connect(cfg, "reviews", tcp).await.unwrap();
        assert_eq!(s.ssl().version_str(), "TLSv1.3");
        assert!(!s.ssl().session_reused());
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
    }
    assert_eq!(sessions.load(std::sync::atomic::Ordering::Relaxed), 0);
}
