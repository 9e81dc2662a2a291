//! Helpers the proxy's end-to-end tests share: a test app, configs from YAML, sidecar
//! options, requests through a sidecar's HTTP proxy listener, admin and metrics reads.

#![allow(dead_code)] // each test binary uses its own subset

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hypha_proxy::{Options, Running};
use hypha_xds::ProxyInfo;
use tokio::net::TcpListener;

pub const WAIT: Duration = Duration::from_secs(15);

/// A test app: answers `<name> <path> <x-test header>`; `/slow` after 500 ms; when `failing`,
/// always 503. Echoes `x-request-id` and `x-forwarded-client-cert` as `x-seen-*`; `/fake-flags`
/// answers with a proxy's `x-hypha-response-flags`. Counts requests.
pub struct App {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicU64>,
}

pub async fn app(bind: &str, name: &'static str, failing: bool) -> App {
    let listener = TcpListener::bind(bind).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicU64::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let counter = counter.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    counter.fetch_add(1, Ordering::Relaxed);
                    async move {
                        if req.uri().path().starts_with("/slow") {
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                        let x = req
                            .headers()
                            .get("x-test")
                            .map_or("-".into(), |v| v.to_str().unwrap().to_owned());
                        let mut body = format!("{name} {} {x}", req.uri());
                        let (head, sent) = req.into_parts();
                        let req = Request::from_parts(head, ());
                        // A request body is echoed after the rest.
                        let sent = sent
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        if !sent.is_empty() {
                            body = format!("{body} {}", String::from_utf8_lossy(&sent));
                        }
                        let mut resp = Response::new(Full::new(Bytes::from(body)));
                        if let Some(id) = req.headers().get("x-request-id") {
                            resp.headers_mut().insert("x-seen-request-id", id.clone());
                        }
                        if let Some(v) = req.headers().get("x-forwarded-client-cert") {
                            resp.headers_mut().insert("x-seen-xfcc", v.clone());
                        }
                        if req.uri().path() == "/fake-flags" {
                            // An app posing as a proxy's local reply.
                            resp.headers_mut()
                                .insert("x-hypha-response-flags", "UF".parse().unwrap());
                        }
                        if req.uri().path() == "/hop" {
                            // Which hop-by-hop headers reached the app, and some of its own.
                            let seen: Vec<&str> = ["x-secret", "keep-alive", "proxy-connection"]
                                .into_iter()
                                .filter(|h| req.headers().contains_key(*h))
                                .collect();
                            let h = resp.headers_mut();
                            h.insert("x-seen-hop", seen.join(",").parse().unwrap());
                            h.insert("connection", "keep-alive, x-app-hop".parse().unwrap());
                            h.insert("x-app-hop", "1".parse().unwrap());
                            h.insert("keep-alive", "timeout=5".parse().unwrap());
                        }
                        if failing {
                            *resp.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
                        }
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    App { addr, hits }
}

pub fn config(yaml: &str) -> hypha_config::Config {
    let loaded = hypha_config::load_str("mesh.yaml", yaml);
    assert!(!loaded.has_errors(), "{:?}", loaded.diagnostics);
    loaded.config
}

pub fn node(name: &str, labels: &[(&str, &str)]) -> ProxyInfo {
    node_in("shop", name, name, labels)
}

/// Workload `workload` in namespace `ns`, running as service account `sa`, on 127.0.0.1.
pub fn node_in(ns: &str, sa: &str, workload: &str, labels: &[(&str, &str)]) -> ProxyInfo {
    ProxyInfo {
        id: format!("sidecar~127.0.0.1~{workload}.{ns}~{ns}.svc.cluster.local"),
        namespace: ns.into(),
        service_account: sa.into(),
        workload_name: workload.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ips: vec!["127.0.0.1".parse().unwrap()],
    }
}

pub async fn ready(p: &mut Running) {
    tokio::time::timeout(WAIT, p.ready.wait_for(|r| *r))
        .await
        .expect("proxy ready in time")
        .unwrap();
}

/// A sidecar of workload `name` in namespace `shop` that listens on nothing yet; tests set
/// the listeners they need with struct update syntax.
pub fn sidecar(control_plane: &str, name: &str, labels: &[(&str, &str)]) -> Options {
    sidecar_for(control_plane, node(name, labels))
}

/// [`sidecar`] for any node.
pub fn sidecar_for(control_plane: &str, node: ProxyInfo) -> Options {
    Options {
        node,
        control_plane: control_plane.to_owned(),
        http_proxy: vec![],
        services: vec![],
        inbound: vec![],
        inbound_port: None,
        app: None,
        capture_outbound: None,
        capture_inbound: None,
        admin: None,
        health: vec![],
        app_probes: Default::default(),
        access_log: None,
        identity: None,
        limits: Default::default(),
    }
}

/// A service `<app>.shop` on one port, served by the workload `<app>-1` (labels `app: <app>`)
/// whose sidecar takes the mesh's traffic on `inbound`.
pub fn sidecar_service(
    app: &str,
    port: u16,
    port_name: &str,
    protocol: &str,
    inbound: u16,
) -> String {
    format!(
        r#"
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {app}, namespace: shop}}
spec:
  hosts: [{app}.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: {port}, name: {port_name}, protocol: {protocol}}}]
  workloadSelector: {{labels: {{app: {app}}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: {app}-1, namespace: shop}}
spec: {{address: 127.0.0.1, labels: {{app: {app}}}, ports: {{{port_name}: {inbound}}}}}
"#
    )
}

/// Waits (bounded) until `cond` holds.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// GET through the HTTP proxy listener: (status, body, headers).
pub async fn get(
    proxy: SocketAddr,
    url: &str,
    headers: &[(&str, &str)],
) -> (u16, String, http::HeaderMap) {
    request(proxy, http::Method::GET, url, headers, Bytes::new()).await
}

pub async fn post(proxy: SocketAddr, url: &str, body: String) -> (u16, String) {
    let (status, body, _) = request(proxy, http::Method::POST, url, &[], body.into()).await;
    (status, body)
}

/// A request to `url` through `proxy` in absolute form, as curl sends it with HTTP_PROXY.
pub async fn request(
    proxy: SocketAddr,
    method: http::Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> (u16, String, http::HeaderMap) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let target: http::Uri = url.parse().unwrap();
    let mut req = Request::new(Full::new(body));
    *req.method_mut() = method;
    *req.uri_mut() = format!("http://{proxy}{}", target.path_and_query().unwrap())
        .parse()
        .unwrap();
    req.headers_mut().insert(
        http::header::HOST,
        target.authority().unwrap().as_str().parse().unwrap(),
    );
    for (k, v) in headers {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let resp = tokio::time::timeout(WAIT, client.request(req))
        .await
        .expect("response in time")
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned(), headers)
}

/// Plain GET on an admin endpoint.
pub async fn admin(addr: SocketAddr, path: &str) -> (u16, String) {
    let (status, _, body) = admin_typed(addr, path).await;
    (status, body)
}

/// [`admin`], with the response's Content-Type.
pub async fn admin_typed(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let resp = client
        .get(format!("http://{addr}{path}").parse().unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        content_type,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// The value of the first sample of `metric` whose labels contain every `want` pair.
pub fn sample(text: &str, metric: &str, want: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")))
        .find(|l| {
            want.iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// A control plane (plaintext xDS on loopback) serving `yaml(inbound port)`, and a sidecar for
/// `web-1` (label `app: web`) in front of the test app under `limits`, ready.
pub async fn web_sidecar(
    yaml: impl Fn(u16) -> String,
    limits: hypha_proxy::limits::Limits,
) -> (hypha_control::ControlPlane, String, Running) {
    let web = app("127.0.0.1:0", "web", false).await;
    sidecar_in_front(yaml, web.addr, "web", limits).await
}

/// [`web_sidecar`] for a TCP service: a sidecar for `db-1` (label `app: db`) in front of
/// [`tcp_echo`].
pub async fn tcp_sidecar(
    yaml: impl Fn(u16) -> String,
    limits: hypha_proxy::limits::Limits,
) -> (hypha_control::ControlPlane, String, Running) {
    sidecar_in_front(yaml, tcp_echo().await, "db", limits).await
}

/// A control plane serving `yaml(inbound port)` and a ready sidecar for `<name>-1` (label
/// `app: <name>`) in front of `app`.
pub async fn sidecar_in_front(
    yaml: impl Fn(u16) -> String,
    app: SocketAddr,
    name: &str,
    limits: hypha_proxy::limits::Limits,
) -> (hypha_control::ControlPlane, String, Running) {
    let cp = hypha_control::ControlPlane::new(config(&yaml(1)));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let uri = format!("http://{}", listener.local_addr().unwrap());
    let serving = cp.clone();
    tokio::spawn(async move { serving.serve(listener).await });
    let mut server = hypha_proxy::start(Options {
        inbound: vec!["127.0.0.1:0".parse().unwrap()],
        app: Some(app),
        limits,
        ..sidecar(&uri, &format!("{name}-1"), &[("app", name)])
    })
    .await
    .unwrap();
    cp.update(config(&yaml(server.inbound[0].port())));
    ready(&mut server).await;
    (cp, uri, server)
}

/// A TCP server on loopback that sends back what it reads.
pub async fn tcp_echo() -> SocketAddr {
    let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = echo.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// A ServiceEntry for `host` outside the mesh (namespace `shop`), port `port` named `p` with
/// `protocol`, whose one endpoint is `at`.
pub fn external_service(host: &str, port: u16, protocol: &str, at: SocketAddr) -> String {
    let name = host.split('.').next().unwrap();
    format!(
        r#"
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: shop}}
spec:
  hosts: [{host}]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{{number: {port}, name: p, protocol: {protocol}}}]
  endpoints: [{{address: 127.0.0.1, ports: {{p: {}}}}}]
"#,
        at.port()
    )
}

/// A control plane serving `yaml` and a ready sidecar for `web-1` (label `app: web`) with an
/// HTTP proxy listener and the local service listeners `services` (`host:port` each).
pub async fn client_sidecar(
    yaml: &str,
    services: &[&str],
) -> (hypha_control::ControlPlane, Running) {
    let cp = hypha_control::ControlPlane::new(config(yaml));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let uri = format!("http://{}", listener.local_addr().unwrap());
    let serving = cp.clone();
    tokio::spawn(async move { serving.serve(listener).await });
    let mut client = hypha_proxy::start(Options {
        http_proxy: vec!["127.0.0.1:0".parse().unwrap()],
        services: services
            .iter()
            .map(|s| ("127.0.0.1:0".parse().unwrap(), (*s).to_owned()))
            .collect(),
        ..sidecar(&uri, "web-1", &[("app", "web")])
    })
    .await
    .unwrap();
    ready(&mut client).await;
    (cp, client)
}
