//! The proxy's mesh identity end to end, in process: the control plane's secure endpoint
//! (xDS and the CA over TLS), a sidecar bootstrapping its certificate with a join token and
//! taking its config over mutual TLS, and the refusals around that.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hypha_control::security::{Secure, ROOT_CERT_FILE};
use hypha_control::ControlPlane;
use hypha_identity::tls::Peer;
use hypha_identity::{KeyKind, Workload};
use hypha_proxy::identity::IdentityOptions;
use hypha_proxy::{Options, StartError};
use hypha_xds::{DeltaClient, ProxyInfo, Versions};
use tokio::net::TcpListener;

const WAIT: Duration = Duration::from_secs(15);
const TD: &str = "cluster.local";

/// The embedded config's control plane serving xDS and the CA over TLS, with join tokens for
/// `shop/web` and `shop/reviews`.
struct Secured {
    uri: String,
    data: tempfile::TempDir,
}

fn write_token(dir: &Path, name: &str, token: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, token).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

async fn secured() -> Secured {
    let data = tempfile::tempdir().unwrap();
    let tokens = data.path().join("tokens");
    std::fs::create_dir(&tokens).unwrap();
    write_token(&tokens, "shop.web.token", "web-secret");
    write_token(&tokens, "shop.reviews.token", "reviews-secret");
    let cfg = hypha_control::initial_config(None).unwrap();
    let secure = Arc::new(Secure::open(&cfg.mesh, &data.path().join("ca"), Some(&tokens)).unwrap());
    let cp = ControlPlane::new(cfg);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let uri = format!("https://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { secure.serve(&cp, listener).await });
    Secured { uri, data }
}

impl Secured {
    fn root(&self) -> PathBuf {
        self.data.path().join("ca").join(ROOT_CERT_FILE)
    }

    fn identity(&self, token: &str) -> IdentityOptions {
        IdentityOptions {
            ca_root: self.root(),
            join_token: Some(write_token(self.data.path(), "presented.token", token)),
            trust_domain: TD.into(),
            key_kind: KeyKind::EcdsaP256,
            validity: Duration::from_secs(3600),
        }
    }
}

fn node(ns: &str, sa: &str) -> ProxyInfo {
    ProxyInfo {
        id: format!("sidecar~127.0.0.1~{sa}-1.{ns}~{ns}.svc.cluster.local"),
        namespace: ns.into(),
        service_account: sa.into(),
        workload_name: format!("{sa}-1"),
        labels: [("app".to_owned(), sa.to_owned())].into_iter().collect(),
        ips: vec!["127.0.0.1".parse().unwrap()],
    }
}

fn sidecar(s: &Secured, ns: &str, sa: &str, token: &str) -> Options {
    Options {
        node: node(ns, sa),
        control_plane: s.uri.clone(),
        http_proxy: vec!["127.0.0.1:0".parse().unwrap()],
        services: vec![],
        inbound: vec![],
        inbound_port: None,
        app: None,
        admin: None,
        access_log: None,
        identity: Some(s.identity(token)),
    }
}

#[tokio::test]
async fn a_sidecar_gets_its_certificate_and_its_config_over_mutual_tls() {
    let s = secured().await;
    let mut p = hypha_proxy::start(Options {
        admin: Some("127.0.0.1:0".parse().unwrap()),
        ..sidecar(&s, "shop", "web", "web-secret")
    })
    .await
    .unwrap();
    tokio::time::timeout(WAIT, p.ready.wait_for(|r| *r))
        .await
        .expect("ready over mutual TLS")
        .unwrap();
    let creds = p.identity.as_ref().unwrap().load();
    assert_eq!(creds.identity.id(), format!("spiffe://{TD}/ns/shop/sa/web"));
    // The certificate chains to the root the control plane wrote.
    let root = boring::x509::X509::from_pem(&std::fs::read(s.root()).unwrap()).unwrap();
    let leaf = &creds.identity.chain()[0];
    assert!(leaf.verify(&root.public_key().unwrap()).unwrap());

    // The admin endpoint shows the identity and its expiry, never the key.
    let certs = admin_get(p.admin.unwrap(), "/certs").await;
    let v: serde_json::Value = serde_json::from_str(certs.split("\r\n\r\n").nth(1).unwrap())
        .unwrap_or_else(|e| panic!("{e}: {certs}"));
    assert_eq!(v["identity"], format!("spiffe://{TD}/ns/shop/sa/web"));
    let expires = v["expires_in_s"].as_u64().unwrap();
    assert!((3500..=3600).contains(&expires), "{expires}");
    assert!(!certs.contains("PRIVATE KEY"));
}

async fn admin_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

fn refusal(r: Result<hypha_proxy::Running, StartError>) -> String {
    match r {
        Err(e @ StartError::Identity(_)) => e.to_string(),
        Err(e) => panic!("expected an identity error, got {e}"),
        Ok(_) => panic!("expected the CA to refuse"),
    }
}

#[tokio::test]
async fn a_sidecar_with_a_bad_or_borrowed_token_gets_no_certificate() {
    let s = secured().await;
    let unknown = refusal(hypha_proxy::start(sidecar(&s, "shop", "web", "guessed")).await);
    assert!(unknown.contains("Unauthenticated"), "{unknown}");
    // reviews' token does not make anyone else reviews, nor reviews anyone else.
    let borrowed = refusal(hypha_proxy::start(sidecar(&s, "shop", "web", "reviews-secret")).await);
    assert!(borrowed.contains("PermissionDenied"), "{borrowed}");
}

#[tokio::test]
async fn xds_over_tls_serves_only_the_node_its_certificate_names() {
    let s = secured().await;
    let ca_roots = boring::x509::X509::stack_from_pem(&std::fs::read(s.root()).unwrap()).unwrap();
    let web = Workload {
        ca: s.uri.clone(),
        ca_roots: ca_roots.clone(),
        ca_identity: Peer::ServiceAccount("hypha-control".into()),
        token: Some("web-secret".into()),
        spiffe_id: format!("spiffe://{TD}/ns/shop/sa/web"),
        key_kind: KeyKind::EcdsaP256,
        validity: Duration::from_secs(600),
    }
    .bootstrap()
    .await
    .unwrap();
    let channel = || async {
        let connector = hypha_identity::tls::client(Some(&web), &ca_roots).unwrap();
        hypha_identity::grpc::channel(
            &s.uri,
            connector,
            Peer::ServiceAccount("hypha-control".into()),
        )
        .await
        .unwrap()
    };

    // Its own node: config arrives.
    let mut own = DeltaClient::over(
        channel().await,
        node("shop", "web").to_node(),
        Versions::new(),
    )
    .await
    .unwrap();
    let first = tokio::time::timeout(WAIT, own.next()).await.unwrap();
    assert!(matches!(first, Ok(Some(_))), "{first:?}");

    // Claiming to be reviews with web's certificate: the stream is refused.
    let mut other = DeltaClient::over(
        channel().await,
        node("shop", "reviews").to_node(),
        Versions::new(),
    )
    .await
    .unwrap();
    let refused = tokio::time::timeout(WAIT, other.next()).await.unwrap();
    match refused {
        Err(hypha_xds::ClientError::Stream(status)) => {
            assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        }
        other => panic!("expected a refused stream, got {other:?}"),
    }

    // Without a client certificate (server-authenticated TLS only): refused too.
    let anonymous = hypha_identity::grpc::channel(
        &s.uri,
        hypha_identity::tls::client(None, &ca_roots).unwrap(),
        Peer::ServiceAccount("hypha-control".into()),
    )
    .await
    .unwrap();
    let mut anon = DeltaClient::over(anonymous, node("shop", "web").to_node(), Versions::new())
        .await
        .unwrap();
    match tokio::time::timeout(WAIT, anon.next()).await.unwrap() {
        Err(hypha_xds::ClientError::Stream(status)) => {
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
        }
        other => panic!("expected a refused stream, got {other:?}"),
    }
}
