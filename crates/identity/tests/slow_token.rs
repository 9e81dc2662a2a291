//! Mutual-TLS handshakes with server keys in a PKCS#11 token (SoftHSM2), RSA and ECDSA; and a
//! slow token slows only the handshakes that need its signatures: a server whose key lives in a
//! token that takes 50 ms more per signature, on a single-threaded runtime, keeps answering an
//! established connection while new handshakes wait for the token.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boring::pkey::{PKey, Public};
use boring::ssl::SslSignatureAlgorithm;
use hypha_ca::{Ca, Caller, FileSigner, TenantCa};
use hypha_identity::tls::{self, ClientCert, Peer, ALPN_HTTP11};
use hypha_identity::{issue_local, issue_local_for, Identity};
use hypha_keys::pkcs11::{PinSource, Token, TokenConfig, TokenKeyKind};
use hypha_keys::softhsm::{TokenDir, MODULE};
use hypha_keys::{KeyFuture, KeyProvider};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TD: &str = "cluster.local";
const DELAY: Duration = Duration::from_millis(50);

/// A token key whose every signature first waits [`DELAY`] on a blocking thread, as a call into
/// a slow HSM would (the wait happens off the runtime, like the token pool's own calls).
struct Slow(Arc<dyn KeyProvider>);

impl KeyProvider for Slow {
    fn public_key(&self) -> &PKey<Public> {
        self.0.public_key()
    }

    fn sign(&self, algorithm: SslSignatureAlgorithm, input: &[u8]) -> KeyFuture<Vec<u8>> {
        let inner = self.0.clone();
        let input = input.to_vec();
        Box::pin(async move {
            tokio::task::spawn_blocking(|| std::thread::sleep(DELAY))
                .await
                .unwrap();
            inner.sign(algorithm, &input).await
        })
    }

    fn decrypt(&self, input: &[u8]) -> KeyFuture<Vec<u8>> {
        self.0.decrypt(input)
    }

    fn describe(&self) -> String {
        format!("slow {}", self.0.describe())
    }
}

fn softhsm(dir: &Path, label: &str) {
    let tokens = TokenDir::create_in(dir).unwrap();
    tokens.init_token(label, "1234").unwrap();
    // The library reads its config from the environment; this binary has one test.
    std::env::set_var("SOFTHSM2_CONF", &tokens.conf);
}

/// Echoes 8-byte messages on every accepted mutual-TLS connection.
async fn echo(listener: TcpListener, acceptor: boring::ssl::SslAcceptor) {
    loop {
        let (tcp, _) = listener.accept().await.unwrap();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let Ok(mut s) = tls::accept(&acceptor, tcp).await else {
                return;
            };
            let mut buf = [0u8; 8];
            while s.read_exact(&mut buf).await.is_ok() {
                if s.write_all(&buf).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// A certificate from `ca` for `key` (a CSR the key signs itself), as `default/<sa>`.
async fn identity_for(ca: &Ca, key: Arc<dyn KeyProvider>, sa: &str) -> Identity {
    let roots = ca.all_roots().unwrap();
    let caller = Caller::new("default", sa);
    issue_local_for(ca, &caller, Duration::from_secs(600), &roots, key)
        .await
        .unwrap()
}

/// An echo server with `server`'s credentials on loopback.
async fn serve(server: &Identity) -> std::net::SocketAddr {
    let acceptor = tls::server(server, ClientCert::Require).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(echo(listener, acceptor));
    addr
}

#[tokio::test(flavor = "current_thread")]
async fn token_keys_serve_handshakes_and_a_slow_token_holds_up_only_new_ones() {
    if !hypha_keys::softhsm::available_for_tests() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    softhsm(dir.path(), "slow");
    std::env::set_var("HYPHA_SLOW_TOKEN_PIN", "1234");
    let token = Token::open(&TokenConfig {
        module: MODULE.into(),
        label: "slow".into(),
        pin: PinSource::Env("HYPHA_SLOW_TOKEN_PIN".into()),
        threads: 1,
    })
    .unwrap();
    let signer = FileSigner::open_or_create(&dir.path().join("ca"), TD, "test").unwrap();
    let ca = Ca::new(
        TD,
        vec![TenantCa {
            name: "default".into(),
            namespaces: vec!["*".into()],
            trust_tenants: vec![],
            signer: Arc::new(signer),
            also_trusted: Vec::new(),
            max_validity: Duration::from_secs(3600),
        }],
    )
    .unwrap();
    let roots = ca.all_roots().unwrap();
    let client = issue_local(
        &ca,
        &Caller::new("default", "client"),
        Duration::from_secs(600),
        &roots,
    )
    .unwrap();
    let connector = Arc::new(tls::client(Some(&client), client.roots()).unwrap());
    let connect = |connector: Arc<boring::ssl::SslConnector>, addr| async move {
        let tcp = TcpStream::connect(addr).await.unwrap();
        tls::connect(&connector, tcp, &Peer::Any, ALPN_HTTP11)
            .await
            .unwrap()
    };

    // Server keys of both kinds in the token: the context holds no key, the token signs the
    // CertificateVerify (RSA-PSS for RSA under TLS 1.3), the client checks it and the server's
    // SPIFFE ID, and data flows.
    for (kind, label) in [
        (TokenKeyKind::Rsa(2048), "rsa"),
        (TokenKeyKind::EcdsaP256, "ec"),
    ] {
        let key = Arc::new(token.generate(kind, label, false).await.unwrap());
        let server = identity_for(&ca, key, label).await;
        assert!(tls::server(&server, ClientCert::Require)
            .unwrap()
            .context()
            .private_key()
            .is_none());
        let addr = serve(&server).await;
        let mut s = connect(connector.clone(), addr).await;
        assert_eq!(
            tls::peer_id(s.ssl()).unwrap(),
            format!("spiffe://{TD}/ns/default/sa/{label}")
        );
        // Envoy's default key exchange, not the hybrid post-quantum group.
        assert_eq!(s.ssl().curve_name(), Some("X25519"));
        s.write_all(b"12345678").await.unwrap();
        let mut buf = [0u8; 8];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"12345678");
    }
    let signed_before = token.metrics().signed;

    // The slow token: every signature 50 ms late.
    let in_token: Arc<dyn KeyProvider> = Arc::new(
        token
            .generate(TokenKeyKind::EcdsaP256, "server", false)
            .await
            .unwrap(),
    );
    let server = identity_for(&ca, Arc::new(Slow(in_token)), "server").await;
    let addr = serve(&server).await;

    // The established connection (its own handshake waited for the slow token too).
    let mut established = connect(connector.clone(), addr).await;

    // Eight new connections at once: each handshake needs a (slow) signature from the token.
    let first_done = Arc::new(AtomicBool::new(false));
    let mut handshakes = Vec::new();
    for _ in 0..8 {
        let (connector, first_done) = (connector.clone(), first_done.clone());
        handshakes.push(tokio::spawn(async move {
            let started = Instant::now();
            let _s = connect(connector, addr).await;
            first_done.store(true, Ordering::SeqCst);
            started.elapsed()
        }));
    }

    // Meanwhile, on the same single-threaded runtime, the established connection keeps
    // answering: count round trips until the first new handshake completes.
    let mut round_trips = 0u64;
    let mut buf = [0u8; 8];
    while !first_done.load(Ordering::SeqCst) {
        established
            .write_all(&round_trips.to_le_bytes())
            .await
            .unwrap();
        established.read_exact(&mut buf).await.unwrap();
        assert_eq!(u64::from_le_bytes(buf), round_trips);
        round_trips += 1;
    }
    let mut took = Vec::new();
    for h in handshakes {
        took.push(h.await.unwrap());
    }
    took.sort();
    // The slow token did slow the new handshakes down...
    assert!(took[0] >= DELAY, "fastest handshake {:?}", took[0]);
    // ...and only them: while the first one waited (at least 50 ms), the established
    // connection kept going. A blocked runtime would have answered none.
    // Every new handshake's signature was the token's (plus the CSR's and the first one's).
    assert_eq!(token.metrics().signed, signed_before + 1 + 1 + 8);
    assert!(
        round_trips >= 20,
        "only {round_trips} round trips on the established connection while a handshake waited {:?}",
        took[0]
    );
}
