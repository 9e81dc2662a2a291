//! The proxy's mesh identity end to end, in process: the control plane's secure endpoint
//! (xDS and the CA over TLS), a sidecar bootstrapping its certificate with a join token and
//! taking its config over mutual TLS, mutual TLS between sidecars under PeerAuthentication,
//! and the refusals around all that.

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
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

mod common;
use common::{
    admin, app, config, get, node_in, sample, sidecar_for, sidecar_service, tcp_echo, WAIT,
};

const TD: &str = "cluster.local";

/// A control plane serving xDS and the CA over TLS, for sidecars with certificates, with
/// join tokens for each `<namespace>.<account>` (`<account>-secret`).
struct Secured {
    uri: String,
    data: tempfile::TempDir,
    cp: ControlPlane,
    /// Certificate validity the sidecars ask for.
    validity: Duration,
    /// Sidecar keys in this PKCS#11 token instead of memory.
    pkcs11: Option<hypha_keys::pkcs11::TokenConfig>,
    /// Sidecar RSA operations batched for the multi-buffer engine.
    batch: Option<hypha_keys::batch::BatchConfig>,
    key_kind: KeyKind,
}

fn write_token(dir: &Path, name: &str, token: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, token).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// The embedded bookinfo config, tokens for `shop/web` and `shop/reviews`.
async fn secured() -> Secured {
    secured_on(
        hypha_control::initial_config(None).unwrap(),
        &["shop.web", "shop.reviews"],
    )
    .await
}

async fn secured_on(cfg: hypha_config::Config, accounts: &[&str]) -> Secured {
    let data = tempfile::tempdir().unwrap();
    let tokens = data.path().join("tokens");
    std::fs::create_dir(&tokens).unwrap();
    for a in accounts {
        let sa = a.split_once('.').unwrap().1;
        write_token(&tokens, &format!("{a}.token"), &format!("{sa}-secret"));
    }
    let secure = Arc::new(Secure::open(&cfg.mesh, &data.path().join("ca"), Some(&tokens)).unwrap());
    let cp = ControlPlane::with_mtls(cfg, secure.signer_roots().clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let uri = format!("https://{}", listener.local_addr().unwrap());
    let serving = cp.clone();
    tokio::spawn(async move { secure.serve(&serving, listener).await });
    Secured {
        uri,
        data,
        cp,
        validity: Duration::from_secs(3600),
        pkcs11: None,
        batch: None,
        key_kind: KeyKind::EcdsaP256,
    }
}

impl Secured {
    fn root(&self) -> PathBuf {
        self.data.path().join("ca").join(ROOT_CERT_FILE)
    }

    fn identity(&self, token: &str) -> IdentityOptions {
        IdentityOptions {
            ca_root: self.root(),
            join_token: Some(write_token(self.data.path(), "presented.token", token)),
            service_account_token: None,
            trust_domain: TD.into(),
            control_plane_namespace: "istio-system".into(),
            key_kind: self.key_kind,
            pkcs11: self.pkcs11.clone(),
            key_label: None,
            batch: self.batch.clone(),
            validity: self.validity,
        }
    }
}

fn node(ns: &str, sa: &str) -> ProxyInfo {
    workload_node(ns, sa, sa)
}

/// The sidecar of workload `<app>-1` (label `app: <app>`) running as service account `sa`.
fn workload_node(ns: &str, sa: &str, app: &str) -> ProxyInfo {
    node_in(ns, sa, &format!("{app}-1"), &[("app", app)])
}

fn sidecar(s: &Secured, ns: &str, sa: &str, token: &str) -> Options {
    Options {
        http_proxy: vec!["127.0.0.1:0".parse().unwrap()],
        identity: Some(s.identity(token)),
        ..sidecar_for(&s.uri, node(ns, sa))
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
    assert_eq!(v["key"], "software ECDSA", "where the key lives");
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

/// Proxies pin the control plane's full SPIFFE ID, and the CA issues its service account in
/// the root namespace only: a workload named `hypha-control` elsewhere is neither issued nor,
/// with a certificate from elsewhere (another CA config over the same signer), believed.
#[tokio::test]
async fn the_control_plane_is_who_it_must_be() {
    let cfg = hypha_control::initial_config(None).unwrap();
    let s = secured_on(cfg.clone(), &["shop.web", "shop.hypha-control"]).await;
    let reserved = refusal(
        hypha_proxy::start(sidecar(&s, "shop", "hypha-control", "hypha-control-secret")).await,
    );
    assert!(
        reserved.contains("PermissionDenied") && reserved.contains("reserved"),
        "{reserved}"
    );
    // An impostor: the same signer, but the control plane's name in namespace `shop`.
    let mut mesh = cfg.mesh.clone();
    mesh.root_namespace = "shop".into();
    let impostor = Arc::new(
        Secure::open(
            &mesh,
            &s.data.path().join("ca"),
            Some(&s.data.path().join("tokens")),
        )
        .unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let uri = format!("https://{}", listener.local_addr().unwrap());
    let cp = ControlPlane::with_mtls(cfg, impostor.signer_roots().clone());
    tokio::spawn(async move { impostor.serve(&cp, listener).await });
    let fooled = refusal(
        hypha_proxy::start(Options {
            control_plane: uri,
            ..sidecar(&s, "shop", "web", "web-secret")
        })
        .await,
    );
    assert!(
        fooled.contains("spiffe://cluster.local/ns/shop/sa/hypha-control"),
        "{fooled}"
    );
    // The real one is believed.
    let mut p = hypha_proxy::start(sidecar(&s, "shop", "web", "web-secret"))
        .await
        .unwrap();
    tokio::time::timeout(WAIT, p.ready.wait_for(|r| *r))
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn xds_over_tls_serves_only_the_node_its_certificate_names() {
    let s = secured().await;
    let ca_roots = boring::x509::X509::stack_from_pem(&std::fs::read(s.root()).unwrap()).unwrap();
    let web = Workload {
        ca: s.uri.clone(),
        ca_roots: ca_roots.clone(),
        ca_roots_file: None,
        ca_identity: Peer::OneOf(Arc::from(vec![format!(
            "spiffe://{TD}/ns/istio-system/sa/hypha-control"
        )])),
        token: Some("web-secret".into()),
        spiffe_id: format!("spiffe://{TD}/ns/shop/sa/web"),
        keys: hypha_identity::KeySource::Software(KeyKind::EcdsaP256),
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
            Peer::OneOf(Arc::from(vec![format!(
                "spiffe://{TD}/ns/istio-system/sa/hypha-control"
            )])),
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
        Peer::OneOf(Arc::from(vec![format!(
            "spiffe://{TD}/ns/istio-system/sa/hypha-control"
        )])),
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

const MESH: &str = "apiVersion: hypha.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: m}\nspec: {trustDomain: cluster.local}\n";

/// Service `web.shop` (port 80, HTTP) served by `web-1`, whose sidecar listens on `inbound`
/// and whose WorkloadEntry says it runs as `shop/web`; and a PeerAuthentication for `shop`.
fn web_yaml(inbound: u16, mode: &str) -> String {
    web_yaml_with(MESH, inbound, mode)
}

fn web_yaml_with(mesh: &str, inbound: u16, mode: &str) -> String {
    let web = sidecar_service("web", 80, "http", "HTTP", inbound).replace(
        "spec: {address: 127.0.0.1,",
        "spec: {address: 127.0.0.1, serviceAccount: web,",
    );
    format!(
        "{mesh}{web}---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
         metadata: {{name: default, namespace: shop}}\nspec: {{mtls: {{mode: {mode}}}}}\n"
    )
}

/// GETs `url` through `proxy` until it answers 200 (a config change on its way); the body.
async fn get_until_ok(proxy: std::net::SocketAddr, url: &str) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, body, _) = get(proxy, url, &[]).await;
        if status == 200 {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still {status}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A plaintext HTTP/1.1 request straight to a sidecar's inbound port: what it answers, or
/// `""` when it closes the connection first.
async fn plaintext(addr: std::net::SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /plain HTTP/1.1\r\nhost: web\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A server sidecar for `web` (as `sa`, with `<sa>-secret`) in front of an app, and a client
/// sidecar (`shop/client`), both ready, the config pointing at the server's inbound port.
struct Pair {
    server: hypha_proxy::Running,
    client: hypha_proxy::Running,
    hits: Arc<std::sync::atomic::AtomicU64>,
}

async fn pair(s: &Secured, server_sa: &str, yaml: impl Fn(u16) -> String) -> Pair {
    pair_from(s, server_sa, "shop", yaml).await
}

/// [`pair`] with the client in namespace `client_ns`.
async fn pair_from(
    s: &Secured,
    server_sa: &str,
    client_ns: &str,
    yaml: impl Fn(u16) -> String,
) -> Pair {
    pair_as(s, workload_node("shop", server_sa, "web"), client_ns, yaml).await
}

/// [`pair_from`] with the server's sidecar as `server_node`.
async fn pair_as(
    s: &Secured,
    server_node: ProxyInfo,
    client_ns: &str,
    yaml: impl Fn(u16) -> String,
) -> Pair {
    let server_sa = server_node.service_account.clone();
    let web = app("127.0.0.1:0", "web", false).await;
    let mut server = hypha_proxy::start(Options {
        node: server_node,
        http_proxy: vec![],
        inbound: vec!["127.0.0.1:0".parse().unwrap()],
        app: Some(web.addr),
        admin: Some("127.0.0.1:0".parse().unwrap()),
        access_log: Some(s.data.path().join("web.access.log")),
        ..sidecar(s, "shop", &server_sa, &format!("{server_sa}-secret"))
    })
    .await
    .unwrap();
    s.cp.update(config(&yaml(server.inbound[0].port())));
    let mut client = hypha_proxy::start(Options {
        admin: Some("127.0.0.1:0".parse().unwrap()),
        ..sidecar(s, client_ns, "client", "client-secret")
    })
    .await
    .unwrap();
    for p in [&mut server, &mut client] {
        tokio::time::timeout(WAIT, p.ready.wait_for(|r| *r))
            .await
            .expect("ready")
            .unwrap();
    }
    Pair {
        server,
        client,
        hits: web.hits,
    }
}

#[tokio::test]
async fn sidecars_speak_mutual_tls_strict_refuses_plaintext_permissive_takes_both() {
    let s = secured_on(config(&web_yaml(1, "STRICT")), &["shop.web", "shop.client"]).await;
    let p = pair(&s, "web", |port| web_yaml(port, "STRICT")).await;
    let url = "http://web.shop.svc.cluster.local/hello";
    let (status, body, _) = get(p.client.http_proxy[0], url, &[]).await;
    assert_eq!((status, body.as_str()), (200, "web /hello -"));

    // The server saw the client's verified identity over mutual TLS.
    let (_, metrics) = admin(p.server.admin.unwrap(), "/metrics").await;
    let seen = sample(
        &metrics,
        "istio_requests_total",
        &[
            ("reporter", "destination"),
            (
                "source_principal",
                "spiffe://cluster.local/ns/shop/sa/client",
            ),
            ("source_workload_namespace", "shop"),
            ("connection_security_policy", "mutual_tls"),
        ],
    );
    assert_eq!(seen, Some(1.0), "{metrics}");

    // STRICT: plaintext to the inbound port is closed unanswered, and counted.
    let inbound = p.server.inbound[0];
    assert_eq!(plaintext(inbound).await, "");
    let (_, metrics) = admin(p.server.admin.unwrap(), "/metrics").await;
    assert!(
        metrics.contains("hypha_inbound_plaintext_refused_total 1"),
        "{metrics}"
    );
    assert_eq!(p.hits.load(std::sync::atomic::Ordering::Relaxed), 1);

    // PERMISSIVE: the same port takes plaintext too, and mutual TLS still.
    s.cp.update(config(&web_yaml(inbound.port(), "PERMISSIVE")));
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let answer = plaintext(inbound).await;
        if answer.starts_with("HTTP/1.1 200") {
            assert!(answer.ends_with("web /plain -"), "{answer}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "PERMISSIVE never applied"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, _, _) = get(p.client.http_proxy[0], url, &[]).await;
    assert_eq!(status, 200);
    let (_, metrics) = admin(p.server.admin.unwrap(), "/metrics").await;
    let plain = sample(
        &metrics,
        "istio_requests_total",
        &[
            ("reporter", "destination"),
            ("connection_security_policy", "none"),
        ],
    );
    assert_eq!(plain, Some(1.0), "{metrics}");
}

#[tokio::test]
async fn each_side_checks_a_peer_chain_once_and_counts_the_rest_as_hits() {
    // A connection per request: three full handshakes, the same peer chain each time.
    let one_per_connection = |port| {
        format!(
            "{}---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
             metadata: {{name: web, namespace: shop}}\nspec:\n  host: web.shop.svc.cluster.local\n  \
             trafficPolicy: {{connectionPool: {{http: {{maxRequestsPerConnection: 1}}}}}}\n",
            web_yaml(port, "STRICT")
        )
    };
    let s = secured_on(config(&web_yaml(1, "STRICT")), &["shop.web", "shop.client"]).await;
    let p = pair(&s, "web", one_per_connection).await;
    for i in 0..3 {
        let url = format!("http://web.shop.svc.cluster.local/{i}");
        let (status, body, _) = get(p.client.http_proxy[0], &url, &[]).await;
        assert_eq!((status, body), (200, format!("web /{i} -")));
    }
    assert_eq!(p.hits.load(std::sync::atomic::Ordering::Relaxed), 3);
    for (side, direction) in [(&p.server, "inbound"), (&p.client, "outbound")] {
        let (_, metrics) = admin(side.admin.unwrap(), "/metrics").await;
        let count = |result| {
            sample(
                &metrics,
                "hypha_tls_peer_chains_total",
                &[("direction", direction), ("result", result)],
            )
        };
        assert_eq!(
            (count("miss"), count("hit")),
            (Some(1.0), Some(2.0)),
            "{direction}: {metrics}"
        );
    }
}

#[tokio::test]
async fn a_server_that_is_not_who_the_service_runs_as_is_refused() {
    // web-1's WorkloadEntry says `shop/web`, but a sidecar holding `shop/impostor` listens
    // where web-1's traffic goes. (It cannot get web-1's config: the control plane refuses a
    // node claiming a workload that runs as another account; see `hypha-control`'s
    // `compromise` tests. So it claims a workload of its own.)
    let s = secured_on(
        config(&web_yaml(1, "STRICT")),
        &["shop.impostor", "shop.client"],
    )
    .await;
    let impostor = node_in("shop", "impostor", "impostor-1", &[("app", "web")]);
    let p = pair_as(&s, impostor, "shop", |port| web_yaml(port, "STRICT")).await;
    let (status, _, headers) = get(
        p.client.http_proxy[0],
        "http://web.shop.svc.cluster.local/",
        &[],
    )
    .await;
    assert_eq!(status, 503);
    assert_eq!(
        headers
            .get("x-hypha-response-flags")
            .map(|v| v.to_str().unwrap()),
        Some("UF")
    );
    assert_eq!(p.hits.load(std::sync::atomic::Ordering::Relaxed), 0);
}

/// Two tenants with their own signers: `a` (namespace `shop`, and the control plane's) and
/// `b` (every other namespace); `share` makes each trust the other's root.
fn tenants_mesh(share: bool) -> String {
    let (ta, tb) = if share {
        (", trustTenants: [b]", ", trustTenants: [a]")
    } else {
        ("", "")
    };
    format!(
        "apiVersion: hypha.dev/v1alpha1\nkind: MeshConfig\nmetadata: {{name: m}}\nspec:\n  \
         trustDomain: cluster.local\n  signers: [{{name: sa}}, {{name: sb}}]\n  tenants:\n  \
         - {{name: a, namespaces: [shop, istio-system], signer: sa{ta}}}\n  \
         - {{name: b, namespaces: [\"*\"], signer: sb{tb}}}\n"
    )
}

#[tokio::test]
async fn tenants_do_not_trust_each_other_until_the_mesh_config_shares_their_roots() {
    let s = secured_on(
        config(&web_yaml_with(&tenants_mesh(false), 1, "STRICT")),
        &["shop.web", "other.client"],
    )
    .await;
    let p = pair_from(&s, "web", "other", |port| {
        web_yaml_with(&tenants_mesh(false), port, "STRICT")
    })
    .await;
    // Each sidecar's certificate comes from its own tenant's signer.
    let issuer = |r: &hypha_proxy::Running| {
        let creds = r.identity.as_ref().unwrap().load();
        let name = creds.identity.chain()[0].issuer_name().to_der().unwrap();
        name
    };
    assert_ne!(issuer(&p.server), issuer(&p.client));
    let url = "http://web.shop.svc.cluster.local/";
    let (status, _, headers) = get(p.client.http_proxy[0], url, &[]).await;
    assert_eq!(status, 503, "a cross-tenant handshake must fail");
    assert_eq!(
        headers
            .get("x-hypha-response-flags")
            .map(|v| v.to_str().unwrap()),
        Some("UF")
    );
    assert_eq!(p.hits.load(std::sync::atomic::Ordering::Relaxed), 0);

    // Share the roots both ways: the new trust bundles reach both sidecars (ROOTCA), and the
    // same sidecars, with the same certificates, now connect.
    let port = p.server.inbound[0].port();
    s.cp.update(config(&web_yaml_with(&tenants_mesh(true), port, "STRICT")));
    assert_eq!(get_until_ok(p.client.http_proxy[0], url).await, "web / -");
    for r in [&p.server, &p.client] {
        assert_eq!(
            r.identity.as_ref().unwrap().load().identity.roots().len(),
            2
        );
    }
}

#[tokio::test]
async fn authorization_policy_denies_with_403_and_counts_it() {
    let policy = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
                  metadata: {name: web-from-client, namespace: shop}\nspec:\n  \
                  selector: {matchLabels: {app: web}}\n  action: ALLOW\n  rules:\n  \
                  - from:\n    - source: {principals: [cluster.local/ns/shop/sa/client]}\n\
                  ---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
                  metadata: {name: no-admin, namespace: shop}\nspec:\n  \
                  selector: {matchLabels: {app: web}}\n  action: DENY\n  rules:\n  \
                  - to:\n    - operation: {paths: [/admin*]}\n";
    let yaml = |port: u16| format!("{}{policy}", web_yaml(port, "STRICT"));
    let s = secured_on(
        config(&yaml(1)),
        &["shop.web", "shop.client", "shop.stranger"],
    )
    .await;
    let p = pair(&s, "web", yaml).await;
    let url = "http://web.shop.svc.cluster.local/x";
    let (status, body, _) = get(p.client.http_proxy[0], url, &[]).await;
    assert_eq!((status, body.as_str()), (200, "web /x -"));

    // Another workload of the same namespace, over mutual TLS too: not allowed.
    let mut stranger = hypha_proxy::start(sidecar(&s, "shop", "stranger", "stranger-secret"))
        .await
        .unwrap();
    tokio::time::timeout(WAIT, stranger.ready.wait_for(|r| *r))
        .await
        .unwrap()
        .unwrap();
    let (status, body, _) = get(stranger.http_proxy[0], url, &[]).await;
    assert_eq!((status, body.as_str()), (403, "RBAC: access denied"));
    assert_eq!(p.hits.load(std::sync::atomic::Ordering::Relaxed), 1);

    let (_, metrics) = admin(p.server.admin.unwrap(), "/metrics").await;
    assert!(
        metrics.contains("hypha_rbac_denied_requests_total 1"),
        "{metrics}"
    );
    let denied = sample(
        &metrics,
        "istio_requests_total",
        &[
            ("reporter", "destination"),
            ("response_code", "403"),
            (
                "source_principal",
                "spiffe://cluster.local/ns/shop/sa/stranger",
            ),
        ],
    );
    assert_eq!(denied, Some(1.0), "{metrics}");

    // The access log names each caller by its verified identity.
    let log = s.data.path().join("web.access.log");
    let deadline = tokio::time::Instant::now() + WAIT;
    let lines = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.lines().count() >= 2 {
            break text;
        }
        assert!(tokio::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let entries: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let who = |code: u64| {
        entries
            .iter()
            .find(|e| e["response_code"] == code)
            .map(|e| e["downstream_peer_principal"].clone())
    };
    assert_eq!(
        who(200),
        Some("spiffe://cluster.local/ns/shop/sa/client".into())
    );
    assert_eq!(
        who(403),
        Some("spiffe://cluster.local/ns/shop/sa/stranger".into())
    );

    // Paths are normalized before policies see them (Istio's pathNormalization BASE), and
    // the app gets the normalized path: no dot segment walks around a DENY.
    for path in [
        "/admin/x",
        "/public/../admin/x",
        "/public/%2e%2e/admin",
        "/a\\..\\admin",
    ] {
        let (status, body, _) = get(
            p.client.http_proxy[0],
            &format!("http://web.shop.svc.cluster.local{path}"),
            &[],
        )
        .await;
        assert_eq!(
            (status, body.as_str()),
            (403, "RBAC: access denied"),
            "{path}"
        );
    }
    let (status, body, _) = get(
        p.client.http_proxy[0],
        "http://web.shop.svc.cluster.local/a/./b/../c",
        &[],
    )
    .await;
    assert_eq!((status, body.as_str()), (200, "web /a/c -"));
}

/// The app learns who called from its sidecar only: `x-forwarded-client-cert` as Istio sets it
/// from the verified peer, whatever the client wrote; and a response's
/// `x-hypha-response-flags` is the proxy's own, never an upstream's.
#[tokio::test]
async fn the_app_learns_its_caller_from_its_sidecar_only() {
    let s = secured_on(config(&web_yaml(1, "STRICT")), &["shop.web", "shop.client"]).await;
    let p = pair(&s, "web", |port| web_yaml(port, "STRICT")).await;
    let url = "http://web.shop.svc.cluster.local/x";
    get_until_ok(p.client.http_proxy[0], url).await;
    let forged =
        "By=spiffe://cluster.local/ns/shop/sa/web;URI=spiffe://cluster.local/ns/shop/sa/admin";
    let (status, _, headers) = get(
        p.client.http_proxy[0],
        url,
        &[("x-forwarded-client-cert", forged)],
    )
    .await;
    assert_eq!(status, 200);
    let creds = p.client.identity.as_ref().unwrap().load();
    let leaf = &creds.identity.chain()[0];
    let hash: String = leaf
        .digest(boring::hash::MessageDigest::sha256())
        .unwrap()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        headers.get("x-seen-xfcc").map(|v| v.to_str().unwrap()),
        Some(
            format!(
                "By=spiffe://{TD}/ns/shop/sa/web;Hash={hash};Subject=\"\";\
                 URI=spiffe://{TD}/ns/shop/sa/client"
            )
            .as_str()
        )
    );
    // An app that answers with the proxy's flag header: passed on as the app's answer,
    // without the header, and counted as such.
    let (status, body, headers) = get(
        p.client.http_proxy[0],
        "http://web.shop.svc.cluster.local/fake-flags",
        &[],
    )
    .await;
    assert_eq!((status, body.as_str()), (200, "web /fake-flags -"));
    assert!(
        !headers.contains_key("x-hypha-response-flags"),
        "{headers:?}"
    );
    let (_, metrics) = admin(p.client.admin.unwrap(), "/metrics").await;
    assert!(!metrics.contains("response_flags=\"UF\""), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_second_certificates_rotate_under_load_without_losing_a_request() {
    let mut s = secured_on(config(&web_yaml(1, "STRICT")), &["shop.web", "shop.client"]).await;
    s.validity = Duration::from_secs(10);
    let p = pair(&s, "web", |port| web_yaml(port, "STRICT")).await;
    let serial = |r: &hypha_proxy::Running| {
        let c = r.identity.as_ref().unwrap().load();
        c.identity.chain()[0]
            .serial_number()
            .to_bn()
            .unwrap()
            .to_hex_str()
            .unwrap()
            .to_string()
    };
    let proxy = p.client.http_proxy[0];
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut serials = (vec![serial(&p.server)], vec![serial(&p.client)]);
    let mut load = tokio::task::JoinSet::new();
    for worker in 0..4 {
        load.spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while tokio::time::Instant::now() < until {
                let url = format!("http://web.shop.svc.cluster.local/w{worker}");
                let (status, body, _) = get(proxy, &url, &[]).await;
                if status == 200 && body == format!("web /w{worker} -") {
                    ok += 1;
                } else {
                    failed.push((status, body));
                }
            }
            (ok, failed)
        });
    }
    while tokio::time::Instant::now() < until {
        for (list, r) in [(&mut serials.0, &p.server), (&mut serials.1, &p.client)] {
            let now = serial(r);
            if list.last() != Some(&now) {
                list.push(now);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut total = 0;
    while let Some(r) = load.join_next().await {
        let (ok, failed) = r.unwrap();
        assert!(failed.is_empty(), "lost requests: {failed:?}");
        total += ok;
    }
    assert!(total > 100, "only {total} requests in 30 s");
    // Renewed at half life: about every 5 s, so at least four times each in 30 s.
    assert!(
        serials.0.len() >= 5,
        "server rotated {} times",
        serials.0.len() - 1
    );
    assert!(
        serials.1.len() >= 5,
        "client rotated {} times",
        serials.1.len() - 1
    );
}

#[tokio::test]
async fn disable_turns_mutual_tls_off_for_that_workload() {
    let s = secured_on(
        config(&web_yaml(1, "DISABLE")),
        &["shop.web", "shop.client"],
    )
    .await;
    let p = pair(&s, "web", |port| web_yaml(port, "DISABLE")).await;
    let (status, _, _) = get(
        p.client.http_proxy[0],
        "http://web.shop.svc.cluster.local/",
        &[],
    )
    .await;
    assert_eq!(status, 200);
    // The client sent plaintext (the endpoint is not marked for mutual TLS), and the server
    // takes plaintext from anyone.
    let (_, metrics) = admin(p.server.admin.unwrap(), "/metrics").await;
    let plain = sample(
        &metrics,
        "istio_requests_total",
        &[
            ("reporter", "destination"),
            ("connection_security_policy", "none"),
        ],
    );
    assert_eq!(plain, Some(1.0), "{metrics}");
    assert!(plaintext(p.server.inbound[0])
        .await
        .starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn a_tcp_connection_the_policy_does_not_allow_is_closed() {
    let echo_addr = tcp_echo().await;
    let yaml = |port: u16| {
        format!(
            "{MESH}---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
             metadata: {{name: vault, namespace: shop}}\nspec:\n  \
             hosts: [vault.shop.svc.cluster.local]\n  addresses: [240.240.0.10]\n  \
             location: MESH_INTERNAL\n  resolution: STATIC\n  \
             ports: [{{number: 7020, name: tcp, protocol: TCP}}]\n  \
             workloadSelector: {{labels: {{app: vault}}}}\n\
             ---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\n\
             metadata: {{name: vault-1, namespace: shop}}\n\
             spec: {{address: 127.0.0.1, serviceAccount: vault, labels: {{app: vault}}, ports: {{tcp: {port}}}}}\n\
             ---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
             metadata: {{name: vault-from-client, namespace: shop}}\nspec:\n  \
             selector: {{matchLabels: {{app: vault}}}}\n  rules:\n  \
             - from:\n    - source: {{principals: [cluster.local/ns/shop/sa/client]}}\n"
        )
    };
    let s = secured_on(
        config(&yaml(1)),
        &["shop.vault", "shop.client", "shop.stranger"],
    )
    .await;
    let mut server = tcp_server(&s, "vault", echo_addr).await;
    s.cp.update(config(&yaml(server.inbound[0].port())));
    let tcp_client = |sa: &'static str| Options {
        http_proxy: vec![],
        services: vec![(
            "127.0.0.1:0".parse().unwrap(),
            "vault.shop.svc.cluster.local:7020".into(),
        )],
        ..sidecar(&s, "shop", sa, &format!("{sa}-secret"))
    };
    let mut client = hypha_proxy::start(tcp_client("client")).await.unwrap();
    let mut stranger = hypha_proxy::start(tcp_client("stranger")).await.unwrap();
    for p in [&mut server, &mut client, &mut stranger] {
        tokio::time::timeout(WAIT, p.ready.wait_for(|r| *r))
            .await
            .unwrap()
            .unwrap();
    }
    // What comes back through each client's service port.
    let echo_through = |listen: std::net::SocketAddr| async move {
        let mut conn = tokio::net::TcpStream::connect(listen).await.unwrap();
        conn.write_all(b"hello vault").await.unwrap();
        conn.shutdown().await.unwrap();
        let mut back = Vec::new();
        let _ = tokio::time::timeout(WAIT, conn.read_to_end(&mut back)).await;
        String::from_utf8_lossy(&back).into_owned()
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        // The endpoint (with the real port) arrives after the first config.
        if echo_through(client.services[0]).await == "hello vault" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the client never got through"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The stranger's sidecar has the same endpoint by now (so what follows is the policy,
    // not a stale config).
    let port = server.inbound[0].port();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !stranger
        .config
        .load()
        .endpoint_sets
        .get("outbound|7020||vault.shop.svc.cluster.local")
        .is_some_and(|set| set.endpoints.iter().any(|e| e.addresses[0].port() == port))
    {
        assert!(tokio::time::Instant::now() < deadline, "stale config");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(echo_through(stranger.services[0]).await, "");
    let (_, metrics) = admin(server.admin.unwrap(), "/metrics").await;
    assert!(
        metrics.contains("hypha_rbac_denied_connections_total 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_with_their_keys_in_a_pkcs11_token() {
    if !hypha_keys::softhsm::available_for_tests() {
        return;
    }
    let mut s = secured_on(config(&web_yaml(1, "STRICT")), &["shop.web", "shop.client"]).await;
    // A private SoftHSM2 token for both sidecars (the library reads its config from the
    // environment; only this test uses it).
    let hsm = s.data.path().join("softhsm");
    let tokens = hypha_keys::softhsm::TokenDir::create_in(&hsm).unwrap();
    tokens.init_token("mesh", "1234").unwrap();
    std::env::set_var("SOFTHSM2_CONF", &tokens.conf);
    let pin = hsm.join("pin");
    std::fs::write(&pin, "1234\n").unwrap();
    s.pkcs11 = Some(hypha_keys::pkcs11::TokenConfig {
        module: hypha_keys::softhsm::MODULE.into(),
        label: "mesh".into(),
        pin: hypha_keys::pkcs11::PinSource::File(pin),
        threads: 2,
    });
    let p = pair(&s, "web", |port| web_yaml(port, "STRICT")).await;
    let body = get_until_ok(
        p.client.http_proxy[0],
        "http://web.shop.svc.cluster.local/k",
    )
    .await;
    assert_eq!(body, "web /k -");
    for r in [&p.server, &p.client] {
        let creds = r.identity.as_ref().unwrap().load();
        let described = format!("{:?}", creds.identity);
        assert!(
            described.contains("PKCS#11 token") && described.contains("mesh"),
            "{described}"
        );
        // The TLS contexts hold no private key: the token signs every handshake.
        assert!(creds.server.context().private_key().is_none());
        // /metrics counts the token's work: the key generated, the CSR and at least one
        // handshake signed, nothing failed, nothing waiting.
        let text = r.telemetry.render();
        let value = |metric: &str, labels: &[(&str, &str)]| -> f64 {
            let mut want = vec![("token", "mesh")];
            want.extend_from_slice(labels);
            sample(&text, metric, &want).unwrap_or_else(|| panic!("no {metric} in\n{text}"))
        };
        assert!(value("hypha_pkcs11_signatures_total", &[("result", "ok")]) >= 2.0);
        assert_eq!(
            value("hypha_pkcs11_signatures_total", &[("result", "error")]),
            0.0
        );
        assert!(value("hypha_pkcs11_keys_generated_total", &[]) >= 1.0);
        assert_eq!(value("hypha_pkcs11_queued", &[]), 0.0);
        assert!(value("hypha_pkcs11_sign_seconds_count", &[]) >= 2.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_with_batched_rsa_keys() {
    let mut s = secured_on(config(&web_yaml(1, "STRICT")), &["shop.web", "shop.client"]).await;
    let accelerated = hypha_rsa_mb::Engine::detect().is_accelerated();
    if !accelerated {
        eprintln!("NOTE: no AVX-512 IFMA on this CPU: testing the cryptomb fallback instead");
    }
    s.key_kind = KeyKind::Rsa2048;
    s.batch = Some(hypha_keys::batch::BatchConfig {
        poll_delay: Duration::from_millis(2),
        fallback: !accelerated,
        queues: 2,
    });
    let p = pair(&s, "web", |port| web_yaml(port, "STRICT")).await;
    let body = get_until_ok(
        p.client.http_proxy[0],
        "http://web.shop.svc.cluster.local/k",
    )
    .await;
    assert_eq!(body, "web /k -");
    for r in [&p.server, &p.client] {
        let creds = r.identity.as_ref().unwrap().load();
        let described = format!("{:?}", creds.identity);
        let expected = if accelerated {
            "multi-buffer RSA-2048"
        } else {
            "software RSA-2048"
        };
        assert!(described.contains(expected), "{described}");
        assert!(creds.server.context().private_key().is_none());
        let text = r.telemetry.render();
        let engine = if accelerated { "avx512ifma" } else { "off" };
        let value = |metric: &str, labels: &[(&str, &str)]| -> f64 {
            let mut want = vec![("engine", engine)];
            want.extend_from_slice(labels);
            sample(&text, metric, &want).unwrap_or_else(|| panic!("no {metric} in\n{text}"))
        };
        if accelerated {
            // Each sidecar signed at least one handshake through the engine, in batches.
            let ops = "hypha_cryptomb_operations_total";
            assert!(value(ops, &[("result", "ok")]) >= 1.0);
            assert_eq!(value(ops, &[("result", "error")]), 0.0);
            let batches: f64 = ["full", "timer", "idle"]
                .iter()
                .map(|r| value("hypha_cryptomb_batches_total", &[("reason", r)]))
                .sum();
            assert!(batches >= 1.0);
            assert!(value("hypha_cryptomb_keys_total", &[("path", "batched")]) >= 1.0);
            assert!(value("hypha_cryptomb_queue_wait_seconds_count", &[]) >= 1.0);
            assert_eq!(value("hypha_cryptomb_queues", &[]), 2.0);
        } else {
            assert!(value("hypha_cryptomb_keys_total", &[("path", "fallback")]) >= 1.0);
        }
    }
}

/// Sends one keep-alive HTTP/1.1 request on `conn`; the status line and body, or `None`
/// when the connection closes before a whole response.
async fn keep_alive_get(conn: &mut tokio::net::TcpStream, path: &str) -> Option<(u16, String)> {
    let request = format!("GET {path} HTTP/1.1\r\nhost: web\r\n\r\n");
    conn.write_all(request.as_bytes()).await.ok()?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(WAIT, conn.read(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).into_owned();
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            continue;
        };
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        if body.len() >= length {
            let status = head.split(' ').nth(1)?.parse().ok()?;
            return Some((status, body.to_owned()));
        }
    }
}

/// A keep-alive connection opened under PERMISSIVE does not keep working without policy when
/// STRICT arrives: its next request is denied and the connection closes after it.
#[tokio::test]
async fn a_keep_alive_connection_is_judged_by_the_chain_it_was_accepted_under() {
    let s = secured_on(
        config(&web_yaml(1, "PERMISSIVE")),
        &["shop.web", "shop.client"],
    )
    .await;
    let p = pair(&s, "web", |port| web_yaml(port, "PERMISSIVE")).await;
    let inbound = p.server.inbound[0];
    let mut conn = tokio::net::TcpStream::connect(inbound).await.unwrap();
    assert_eq!(
        keep_alive_get(&mut conn, "/one").await,
        Some((200, "web /one -".into()))
    );
    s.cp.update(config(&web_yaml(inbound.port(), "STRICT")));
    let deadline = tokio::time::Instant::now() + WAIT;
    while p
        .server
        .config
        .load()
        .inbound_chain(false, inbound.port())
        .is_some()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "STRICT never applied"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, _) = keep_alive_get(&mut conn, "/two").await.expect("an answer");
    assert_eq!(status, 403);
    // Closed after that answer.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(WAIT, conn.read_to_end(&mut rest)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?} {rest:?}");
    assert_eq!(p.hits.load(std::sync::atomic::Ordering::Relaxed), 1);
    let (_, metrics) = admin(p.server.admin.unwrap(), "/metrics").await;
    assert!(
        metrics.contains("hypha_inbound_chain_changed_total 1"),
        "{metrics}"
    );
    // New plaintext connections are refused outright; mutual TLS still works.
    assert_eq!(plaintext(inbound).await, "");
    let (status, _, _) = get(
        p.client.http_proxy[0],
        "http://web.shop.svc.cluster.local/",
        &[],
    )
    .await;
    assert_eq!(status, 200);
}

/// An open TCP connection is judged again when a new config arrives: under PERMISSIVE it
/// echoes, and STRICT closes it.
#[tokio::test]
async fn an_open_tcp_connection_closes_when_its_chain_goes() {
    let echo_addr = tcp_echo().await;
    let yaml = |port: u16, mode: &str| {
        let db = sidecar_service("db", 5432, "tcp", "TCP", port).replace(
            "spec: {address: 127.0.0.1,",
            "spec: {address: 127.0.0.1, serviceAccount: db,",
        );
        format!(
            "{MESH}{db}---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
             metadata: {{name: default, namespace: shop}}\nspec: {{mtls: {{mode: {mode}}}}}\n"
        )
    };
    let s = secured_on(config(&yaml(1, "PERMISSIVE")), &["shop.db"]).await;
    let mut server = tcp_server(&s, "db", echo_addr).await;
    let port = server.inbound[0].port();
    s.cp.update(config(&yaml(port, "PERMISSIVE")));
    tokio::time::timeout(WAIT, server.ready.wait_for(|r| *r))
        .await
        .unwrap()
        .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !matches!(
        server.config.load().inbound_chain(false, port),
        Some(hypha_proxy::model::Inbound::Tcp { .. })
    ) {
        assert!(tokio::time::Instant::now() < deadline, "no TCP chain");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut conn = tokio::net::TcpStream::connect(server.inbound[0])
        .await
        .unwrap();
    conn.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    tokio::time::timeout(WAIT, conn.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"ping");
    s.cp.update(config(&yaml(port, "STRICT")));
    let mut rest = Vec::new();
    let read = tokio::time::timeout(WAIT, conn.read_to_end(&mut rest)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "still open: {read:?}"
    );
    let (_, metrics) = admin(server.admin.unwrap(), "/metrics").await;
    assert!(
        metrics.contains("hypha_inbound_chain_changed_total 1"),
        "{metrics}"
    );
}

/// The sidecar of `<sa>-1` (running as `shop/<sa>`, label `app: <sa>`) in front of the TCP
/// server at `app`, with an admin listener.
async fn tcp_server(s: &Secured, sa: &str, app: std::net::SocketAddr) -> hypha_proxy::Running {
    hypha_proxy::start(Options {
        node: workload_node("shop", sa, sa),
        http_proxy: vec![],
        inbound: vec!["127.0.0.1:0".parse().unwrap()],
        app: Some(app),
        admin: Some("127.0.0.1:0".parse().unwrap()),
        ..sidecar(s, "shop", sa, &format!("{sa}-secret"))
    })
    .await
    .unwrap()
}

/// Before its first complete config a sidecar's inbound side serves nothing (the app behind
/// it is not open to whoever comes first), and counts what it closed.
#[tokio::test]
async fn inbound_serves_nothing_before_the_first_complete_config() {
    let web = app("127.0.0.1:0", "web", false).await;
    // A control plane that never answers.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let running = hypha_proxy::start(Options {
        inbound: vec!["127.0.0.1:0".parse().unwrap()],
        app: Some(web.addr),
        admin: Some("127.0.0.1:0".parse().unwrap()),
        ..sidecar_for(
            &format!("http://{}", silent.local_addr().unwrap()),
            workload_node("shop", "web", "web"),
        )
    })
    .await
    .unwrap();
    assert_eq!(plaintext(running.inbound[0]).await, "");
    assert_eq!(web.hits.load(std::sync::atomic::Ordering::Relaxed), 0);
    let (_, metrics) = admin(running.admin.unwrap(), "/metrics").await;
    assert!(
        metrics.contains("hypha_inbound_not_ready_total 1"),
        "{metrics}"
    );
}
