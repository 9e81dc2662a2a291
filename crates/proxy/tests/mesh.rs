//! The proxy end to end, in process, on loopback with ephemeral ports: Hypha's control plane,
//! a client sidecar in HTTP-proxy mode, a server sidecar in front of a real HTTP app, and apps
//! reached directly. Each routing feature is checked by what the backends actually received.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use hypha_control::ControlPlane;
use hypha_proxy::{Options, Running};
use hypha_xds::ProxyInfo;
use tokio::net::TcpListener;

mod common;
use common::*;

fn mesh_yaml(web_v1_sidecar: u16, web_v2: u16, v6_only: u16, flaky: (u16, u16)) -> String {
    format!(
        r#"
apiVersion: hypha.dev/v1alpha1
kind: MeshConfig
metadata: {{name: mesh}}
spec:
  trustDomain: test.local
  ipFamilies: [IPv4, IPv6]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: web, namespace: shop}}
spec:
  hosts: [web.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  workloadSelector: {{labels: {{app: web}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: web-v1, namespace: shop}}
spec: {{address: 127.0.0.1, labels: {{app: web, version: v1}}, ports: {{http: {web_v1_sidecar}}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: web-v2, namespace: shop}}
spec: {{address: 127.0.0.1, labels: {{app: web, version: v2}}, ports: {{http: {web_v2}}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: web, namespace: shop}}
spec:
  host: web
  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web, namespace: shop}}
spec:
  hosts: [web]
  http:
  - name: health
    match: [{{uri: {{exact: /healthz}}}}]
    directResponse: {{status: 200, body: {{string: ok}}}}
  - name: moved
    match: [{{uri: {{exact: /old-page}}}}]
    redirect: {{uri: /new-page, redirectCode: 302}}
  - name: jason
    match: [{{headers: {{end-user: {{exact: jason}}}}}}]
    route: [{{destination: {{host: web, subset: v2}}}}]
  - name: legacy
    match: [{{uri: {{prefix: /legacy/}}}}]
    rewrite: {{uri: /modern/}}
    route: [{{destination: {{host: web, subset: v1}}}}]
    headers:
      request: {{set: {{x-test: rewritten}}}}
      response: {{add: {{x-served-by: hypha}}}}
  - name: broken
    match: [{{uri: {{prefix: /broken}}}}]
    fault: {{abort: {{httpStatus: 418, percentage: {{value: 100}}}}}}
    route: [{{destination: {{host: web, subset: v1}}}}]
  - name: slow
    match: [{{uri: {{exact: /slow}}}}]
    timeout: 100ms
    route: [{{destination: {{host: web, subset: v1}}}}]
  - name: split
    route:
    - {{destination: {{host: web, subset: v1}}, weight: 80}}
    - {{destination: {{host: web, subset: v2}}, weight: 20}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: v6, namespace: shop}}
spec:
  hosts: [v6.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  endpoints: [{{address: "::1", ports: {{http: {v6_only}}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: flaky, namespace: shop}}
spec:
  hosts: [flaky.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 9090, name: http, protocol: HTTP}}]
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {good}}}}}
  - {{address: 127.0.0.1, ports: {{http: {bad}}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: flaky, namespace: shop}}
spec:
  hosts: [flaky]
  http:
  - route: [{{destination: {{host: flaky}}}}]
    retries: {{attempts: 3, retryOn: 5xx}}
---
# Round robin, not Istio's default least request (two random choices): the tests count how
# often the failing instance is tried, which must not depend on coin flips.
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: flaky, namespace: shop}}
spec:
  host: flaky.shop.svc.cluster.local
  trafficPolicy: {{loadBalancer: {{simple: ROUND_ROBIN}}}}
"#,
        good = flaky.0,
        bad = flaky.1,
    )
}

/// The control plane's xDS server on a runtime of its own, so a test can kill it outright
/// (every stream with it) and start it again on the same address.
struct CpServer {
    cp: ControlPlane,
    addr: SocketAddr,
    rt: Option<tokio::runtime::Runtime>,
}

impl CpServer {
    fn start(cp: ControlPlane, listener: std::net::TcpListener) -> CpServer {
        let addr = listener.local_addr().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let serving = cp.clone();
        rt.spawn(async move {
            let l = TcpListener::from_std(listener).unwrap();
            serving.serve(l).await
        });
        CpServer {
            cp,
            addr,
            rt: Some(rt),
        }
    }

    fn kill(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }

    fn restart(&mut self) {
        self.kill();
        let l = std::net::TcpListener::bind(self.addr).unwrap();
        l.set_nonblocking(true).unwrap();
        *self = CpServer::start(self.cp.clone(), l);
    }
}

impl Drop for CpServer {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Mesh {
    cp: ControlPlane,
    cp_server: CpServer,
    client: Running,
    _server: Running,
    v1: App,
    v2: App,
    v6: App,
    flaky_bad: App,
}

impl Mesh {
    fn control_plane(&self) -> String {
        format!("http://{}", self.cp_server.addr)
    }

    /// Pushes the base mesh (with placeholder flaky ports) plus more YAML documents.
    fn push(&self, extra: &str) {
        let base = mesh_yaml(
            self._server.inbound[0].port(),
            self.v2.addr.port(),
            self.v6.addr.port(),
            (1, 2),
        );
        self.cp.update(config(&(base + extra)));
    }
}

async fn mesh() -> Mesh {
    let v1 = app("127.0.0.1:0", "v1", false).await;
    let v2 = app("127.0.0.1:0", "v2", false).await;
    let v6 = app("[::1]:0", "v6", false).await;
    let flaky_good = app("127.0.0.1:0", "good", false).await;
    let flaky_bad = app("127.0.0.1:0", "bad", true).await;

    // The control plane first, on an empty mesh: proxies can connect before the config is in.
    let cp_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cp_addr = cp_listener.local_addr().unwrap();
    let cp = ControlPlane::new(config(
        "apiVersion: hypha.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: m}\nspec: {trustDomain: test.local}\n",
    ));
    let cp_server = CpServer::start(cp.clone(), cp_listener.into_std().unwrap());
    let control_plane = format!("http://{cp_addr}");

    let server = hypha_proxy::start(Options {
        inbound: vec!["127.0.0.1:0".parse().unwrap()],
        app: Some(v1.addr),
        admin: Some("127.0.0.1:0".parse().unwrap()),
        ..sidecar(
            &control_plane,
            "web-v1",
            &[("app", "web"), ("version", "v1")],
        )
    })
    .await
    .unwrap();
    let client = hypha_proxy::start(Options {
        http_proxy: vec!["127.0.0.1:0".parse().unwrap()],
        admin: Some("127.0.0.1:0".parse().unwrap()),
        health: vec!["127.0.0.1:0".parse().unwrap()],
        ..sidecar(&control_plane, "client", &[("app", "client")])
    })
    .await
    .unwrap();
    cp.update(config(&mesh_yaml(
        server.inbound[0].port(),
        v2.addr.port(),
        v6.addr.port(),
        (flaky_good.addr.port(), flaky_bad.addr.port()),
    )));
    let mut mesh = Mesh {
        cp,
        cp_server,
        client,
        _server: server,
        v1,
        v2,
        v6,
        flaky_bad,
    };
    ready(&mut mesh.client).await;
    ready(&mut mesh._server).await;
    // Ready means complete for what was pushed so far, which may be the empty mesh: wait for
    // the pushed config itself (every table and endpoint set it refers to).
    let inbound_port = mesh._server.inbound[0].port();
    let deadline = Instant::now() + WAIT;
    loop {
        let c = mesh.client.config.load();
        let s = mesh._server.config.load();
        let client_done = ["80", "8080", "9090"]
            .iter()
            .all(|t| c.routes.contains_key(*t))
            && c.clusters
                .keys()
                .all(|k| !k.starts_with("outbound|") || c.endpoint_sets.contains_key(k));
        if client_done && s.inbound.by_port.contains_key(&inbound_port) {
            break;
        }
        assert!(Instant::now() < deadline, "the mesh config never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    mesh
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_features_end_to_end() {
    let m = mesh().await;
    let p = m.client.http_proxy[0];
    let web = "http://web.shop.svc.cluster.local";

    // Direct response and redirect never reach an app.
    let (s, body, _) = get(p, &format!("{web}/healthz"), &[]).await;
    assert_eq!((s, body.as_str()), (200, "ok"));
    let (s, _, h) = get(p, &format!("{web}/old-page"), &[]).await;
    assert_eq!(s, 302);
    assert_eq!(h["location"], "http://web.shop.svc.cluster.local/new-page");

    // x-request-id: generated when absent (a UUID), passed through when present.
    let (_, _, h) = get(p, &format!("{web}/id"), &[]).await;
    let id = h["x-seen-request-id"].to_str().unwrap().to_owned();
    assert_eq!(id.len(), 36, "{id}");
    let dashes: Vec<usize> = id.match_indices('-').map(|(i, _)| i).collect();
    assert_eq!(dashes, [8, 13, 18, 23], "{id}");
    assert_eq!(&id[14..15], "4", "a version 4 UUID: {id}");
    assert!("89ab".contains(&id[19..20]), "the RFC 4122 variant: {id}");
    assert!(
        id.chars().all(|c| c == '-' || c.is_ascii_hexdigit()),
        "{id}"
    );
    let (_, _, h2) = get(p, &format!("{web}/id"), &[]).await;
    assert_ne!(
        h2["x-seen-request-id"],
        id.as_str(),
        "a fresh id per request"
    );
    let (_, _, h) = get(p, &format!("{web}/id"), &[("x-request-id", "mine-1")]).await;
    assert_eq!(h["x-seen-request-id"], "mine-1");

    // Hop-by-hop headers stay on their hop, both ways, through two sidecars.
    let (s, _, h) = get(
        p,
        &format!("{web}/hop"),
        &[
            ("connection", "x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=9"),
            ("proxy-connection", "keep-alive"),
        ],
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(h["x-seen-hop"], "", "the app saw hop-by-hop headers");
    for hop in ["x-app-hop", "keep-alive"] {
        assert!(!h.contains_key(hop), "{hop} reached the client: {h:?}");
    }

    // Header route to v2 (reached directly), and v1 through the server sidecar's inbound.
    let (s, body, _) = get(p, &format!("{web}/a"), &[("end-user", "jason")]).await;
    assert_eq!((s, body.as_str()), (200, "v2 /a -"));
    let before = m.v1.hits.load(Ordering::Relaxed);
    let (s, body, h) = get(p, &format!("{web}/legacy/page?q=1"), &[("x-test", "orig")]).await;
    assert_eq!((s, body.as_str()), (200, "v1 /modern/page?q=1 rewritten"));
    assert_eq!(h["x-served-by"], "hypha");
    assert_eq!(m.v1.hits.load(Ordering::Relaxed), before + 1);

    // Fault abort and route timeout are the proxy's own replies.
    let (s, _, h) = get(p, &format!("{web}/broken"), &[]).await;
    assert_eq!(
        (s, h["x-hypha-response-flags"].to_str().unwrap()),
        (418, "FI")
    );
    let t = Instant::now();
    let (s, _, h) = get(p, &format!("{web}/slow"), &[]).await;
    assert_eq!(
        (s, h["x-hypha-response-flags"].to_str().unwrap()),
        (504, "UT")
    );
    assert!(
        t.elapsed() < Duration::from_millis(450),
        "{:?}",
        t.elapsed()
    );

    // 80/20 split: 500 requests, v2 share within 20 % ± 6 %.
    let (mut n1, mut n2) = (0, 0);
    for i in 0..500 {
        let (s, body, _) = get(p, &format!("{web}/split/{i}"), &[]).await;
        assert_eq!(s, 200);
        match &body[..2] {
            "v1" => n1 += 1,
            "v2" => n2 += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(n1 + n2, 500);
    assert!((70..=130).contains(&n2), "v2 got {n2} of 500");

    // IPv4 client → IPv6-only backend.
    let (s, body, _) = get(p, "http://v6.shop.svc.cluster.local:8080/six", &[]).await;
    assert_eq!((s, body.as_str()), (200, "v6 /six -"));
    assert_eq!(m.v6.hits.load(Ordering::Relaxed), 1);

    // Retries hide the failing instance: every request succeeds, and the bad one was tried.
    for i in 0..20 {
        let (s, body, _) = get(
            p,
            &format!("http://flaky.shop.svc.cluster.local:9090/{i}"),
            &[],
        )
        .await;
        assert_eq!((s, &body[..4]), (200, "good"), "request {i}");
    }
    assert!(m.flaky_bad.hits.load(Ordering::Relaxed) >= 5);
    // Requests with a body are retried too: the body is sent again, whole.
    let bad_before = m.flaky_bad.hits.load(Ordering::Relaxed);
    for i in 0..20 {
        let (s, body) = post(
            p,
            &format!("http://flaky.shop.svc.cluster.local:9090/p{i}"),
            format!("payload {i} {}", "x".repeat(i * 500)),
        )
        .await;
        assert_eq!(s, 200, "request {i}: {body}");
        assert_eq!(
            body,
            format!("good /p{i} - payload {i} {}", "x".repeat(i * 500))
        );
    }
    assert!(m.flaky_bad.hits.load(Ordering::Relaxed) >= bad_before + 5);

    // Unknown routes: a service port nobody has.
    let (s, _, h) = get(p, "http://nowhere.example:7777/", &[]).await;
    assert_eq!(
        (s, h["x-hypha-response-flags"].to_str().unwrap()),
        (404, "NR")
    );
    let _ = (&m.v2, &m.cp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_changes_apply_without_losing_requests() {
    let m = mesh().await;
    let p = m.client.http_proxy[0];
    let web = "http://web.shop.svc.cluster.local";
    let base = mesh_yaml(
        m._server.inbound[0].port(),
        m.v2.addr.port(),
        m.v6.addr.port(),
        (1, 2),
    );
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pusher = {
        let (cp, stop, base) = (m.cp.clone(), stop.clone(), base.clone());
        tokio::spawn(async move {
            let mut pushed = 0;
            while !stop.load(Ordering::Relaxed) && pushed < 20 {
                // Alternate the whole split between v1 and v2.
                let yaml = if pushed % 2 == 0 {
                    base.replace("weight: 80}", "weight: 0}")
                        .replace("weight: 20}", "weight: 100}")
                } else {
                    base.clone()
                };
                let cp = cp.clone();
                let cfg = config(&yaml);
                tokio::task::spawn_blocking(move || cp.update(cfg))
                    .await
                    .unwrap();
                pushed += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            pushed
        })
    };
    let mut codes: HashMap<u16, usize> = HashMap::new();
    for i in 0..2000 {
        let (s, _, _) = get(p, &format!("{web}/churn/{i}"), &[]).await;
        *codes.entry(s).or_default() += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let pushed = pusher.await.unwrap();
    assert_eq!(
        pushed, 20,
        "all 20 route changes were pushed during the traffic"
    );
    assert_eq!(codes.get(&200), Some(&2000), "{codes:?}");
    assert_eq!(m.client.xds.updates_rejected.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_admin_match_the_traffic() {
    let m = mesh().await;
    let p = m.client.http_proxy[0];
    let web = "http://web.shop.svc.cluster.local";
    for i in 0..7 {
        let (s, _, _) = get(p, &format!("{web}/legacy/{i}"), &[]).await;
        assert_eq!(s, 200);
    }
    for _ in 0..3 {
        let (s, _, _) = get(p, &format!("{web}/broken"), &[]).await;
        assert_eq!(s, 418);
    }
    let client_admin = m.client.admin.unwrap();
    let server_admin = m._server.admin.unwrap();
    assert_eq!(admin(client_admin, "/ready").await.0, 200);
    // Prometheus 3 scrapes only what names its text format; the dumps are JSON.
    let (_, metrics_type, _) = common::admin_typed(client_admin, "/metrics").await;
    assert_eq!(metrics_type, "text/plain; version=0.0.4; charset=utf-8");
    for path in ["/config_dump", "/certs"] {
        assert_eq!(
            common::admin_typed(client_admin, path).await.1,
            "application/json"
        );
    }

    // Bodies are counted when they end; the client has read them all by now, but the
    // proxy's side of the body may finish an instant later.
    let deadline = Instant::now() + WAIT;
    let (client_text, server_text) = loop {
        let c = admin(client_admin, "/metrics").await.1;
        let s = admin(server_admin, "/metrics").await.1;
        let done = sample(
            &c,
            "istio_requests_total",
            &[("destination_version", "v1"), ("response_code", "200")],
        ) == Some(7.0)
            && sample(
                &s,
                "istio_requests_total",
                &[("reporter", "destination"), ("response_code", "200")],
            ) == Some(7.0);
        if done || Instant::now() > deadline {
            break (c, s);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let v1_ok = [
        ("reporter", "source"),
        ("source_workload", "client"),
        ("source_workload_namespace", "shop"),
        ("destination_service", "web.shop.svc.cluster.local"),
        ("destination_version", "v1"),
        ("response_code", "200"),
        ("response_flags", "-"),
    ];
    assert_eq!(
        sample(&client_text, "istio_requests_total", &v1_ok),
        Some(7.0),
        "{client_text}"
    );
    assert_eq!(
        sample(
            &client_text,
            "istio_request_duration_milliseconds_count",
            &v1_ok
        ),
        Some(7.0)
    );
    assert!(
        sample(&client_text, "istio_response_bytes_sum", &v1_ok).unwrap() > 7.0 * 10.0,
        "each response body is `v1 /modern/N rewritten`"
    );
    let aborted = [("response_code", "418"), ("response_flags", "FI")];
    assert_eq!(
        sample(&client_text, "istio_requests_total", &aborted),
        Some(3.0)
    );
    // The server sidecar saw only the 7 that reached it, as the destination reporter.
    let inbound = [
        ("reporter", "destination"),
        ("destination_workload", "web-v1"),
        ("destination_app", "web"),
        ("response_code", "200"),
    ];
    assert_eq!(
        sample(&server_text, "istio_requests_total", &inbound),
        Some(7.0),
        "{server_text}"
    );
    assert_eq!(sample(&server_text, "istio_requests_total", &aborted), None);
    // The route tables' matchers: the client's routes (`/legacy` prefix and others) compiled
    // into dense automata within their budget.
    let route = [("table", "route")];
    assert!(sample(&client_text, "hypha_matcher_rules", &route).unwrap() >= 2.0);
    let dense = [("table", "route"), ("shape", "dense")];
    assert!(sample(&client_text, "hypha_matcher_automata", &dense).unwrap() >= 1.0);
    let lazy = [("table", "route"), ("shape", "lazy")];
    assert_eq!(
        sample(&client_text, "hypha_matcher_automata", &lazy),
        Some(0.0)
    );
    // Virtual host selection: every domain of every route table is a rule of a domain table
    // (Istio names each service by several domains: host, short names, with and without port).
    let domain = [("table", "domain")];
    let tables = sample(&client_text, "hypha_matcher_tables", &domain).unwrap();
    assert!(tables >= 1.0, "{client_text}");
    assert!(sample(&client_text, "hypha_matcher_rules", &domain).unwrap() > tables);

    // Admin views of the config.
    let (s, clusters) = admin(client_admin, "/clusters").await;
    assert_eq!(s, 200);
    assert!(
        clusters.contains("outbound|80|v1|web.shop.svc.cluster.local type=eds"),
        "{clusters}"
    );
    assert!(clusters.contains(&format!("127.0.0.1:{}", m._server.inbound[0].port())));
    let (_, dump) = admin(client_admin, "/config_dump").await;
    assert!(dump.contains("# type.googleapis.com/envoy.config.route.v3.RouteConfiguration"));
    assert!(dump.lines().any(|l| l.starts_with("80 ")), "{dump}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_away_keeps_serving_then_reconnects() {
    let mut m = mesh().await;
    let p = m.client.http_proxy[0];
    let web = "http://web.shop.svc.cluster.local";
    let connects = m.client.xds.connects.load(Ordering::Relaxed);

    m.cp_server.kill();
    // Traffic keeps flowing on the last good config, through both sidecars.
    for i in 0..50 {
        let (s, body, _) = get(p, &format!("{web}/legacy/{i}"), &[]).await;
        assert_eq!((s, &body[..2]), (200, "v1"));
    }
    // A change made while the proxies are disconnected reaches them after the restart.
    let yaml = mesh_yaml(
        m._server.inbound[0].port(),
        m.v2.addr.port(),
        m.v6.addr.port(),
        (1, 2),
    )
    .replace(
        "directResponse: {status: 200, body: {string: ok}}",
        "directResponse: {status: 200, body: {string: back}}",
    );
    m.cp.update(config(&yaml));
    m.cp_server.restart();
    let deadline = Instant::now() + WAIT;
    loop {
        let (s, body, _) = get(p, &format!("{web}/healthz"), &[]).await;
        assert_eq!(s, 200);
        if body == "back" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the proxy never picked up the change"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(m.client.xds.connects.load(Ordering::Relaxed) > connects);
    assert_eq!(m.client.xds.updates_rejected.load(Ordering::Relaxed), 0);
}

/// gRPC through two sidecars: bidirectional streaming with trailers over HTTP/2 on every hop.
/// The app is a second Hypha control plane (its ADS service is a streaming gRPC service) and
/// the client a delta ADS client pointed at a sidecar's local port for that service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_streaming_through_two_sidecars() {
    let m = mesh().await;
    let control_plane = format!("http://{}", m.cp_server.addr);

    // The app: an ADS server with the bookinfo config.
    let app_cp = ControlPlane::new(hypha_control::initial_config(None).unwrap());
    let app_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_addr = app_listener.local_addr().unwrap();
    let serving = app_cp.clone();
    tokio::spawn(async move { serving.serve(app_listener).await });

    let mut server = hypha_proxy::start(Options {
        inbound: vec!["127.0.0.1:0".parse().unwrap()],
        app: Some(app_addr),
        ..sidecar(&control_plane, "ads-1", &[("app", "ads")])
    })
    .await
    .unwrap();
    let mut client = hypha_proxy::start(Options {
        services: vec![(
            "127.0.0.1:0".parse().unwrap(),
            "ads.shop.svc.cluster.local:15010".into(),
        )],
        ..sidecar(&control_plane, "ads-client", &[("app", "ads-client")])
    })
    .await
    .unwrap();
    let grpc_service = sidecar_service("ads", 15010, "grpc", "GRPC", server.inbound[0].port());
    m.push(&grpc_service);
    ready(&mut client).await;
    ready(&mut server).await;
    eventually("gRPC service config never arrived", || {
        let c = client.config.load();
        c.routes.contains_key("15010")
            && c.endpoint_sets
                .contains_key("outbound|15010||ads.shop.svc.cluster.local")
            && server
                .config
                .load()
                .inbound
                .by_port
                .contains_key(&server.inbound[0].port())
    })
    .await;

    // Both sidecars speak HTTP/2 upstream for this service (gRPC needs it for trailers).
    assert!(client.config.load().clusters["outbound|15010||ads.shop.svc.cluster.local"].http2);
    let inbound_cluster = format!("inbound|{}||", server.inbound[0].port());
    assert!(server.config.load().clusters[&inbound_cluster].http2);

    // The stream: a subscription, pushes from the app, ACKs back, a change pushed mid-stream.
    let app_node = ProxyInfo {
        id: "sidecar~10.10.0.10~productpage-v1.bookinfo~bookinfo.svc.cluster.local".into(),
        namespace: "bookinfo".into(),
        workload_name: "productpage-v1".into(),
        ..Default::default()
    };
    let uri = format!("http://{}", client.services[0]);
    let mut ads = tokio::time::timeout(
        WAIT,
        hypha_xds::DeltaClient::connect(uri, app_node.to_node()),
    )
    .await
    .expect("connected in time")
    .expect("gRPC stream through the sidecars");
    let mut got = HashMap::new();
    while got.len() < 2 {
        let update = tokio::time::timeout(WAIT, ads.next())
            .await
            .expect("update in time")
            .unwrap()
            .expect("stream open");
        got.insert(update.type_url.clone(), update.resources.len());
        ads.ack_or_nack(&update, Ok(())).await.unwrap();
    }
    assert!(got[hypha_xds::type_url::CLUSTER] > 5, "{got:?}");
    assert!(got[hypha_xds::type_url::LISTENER] > 2, "{got:?}");
    // A change on the app side (the reviews subsets go away) arrives on the same stream.
    let mut changed = hypha_control::initial_config(None).unwrap();
    changed.destination_rules.retain(|d| d.name != "reviews");
    app_cp.update(changed);
    let update = tokio::time::timeout(WAIT, ads.next())
        .await
        .expect("pushed update in time")
        .unwrap()
        .expect("stream still open");
    assert_eq!(update.type_url, hypha_xds::type_url::CLUSTER.to_string());
    assert!(
        update
            .removed
            .contains(&"outbound|9080|v2|reviews.bookinfo.svc.cluster.local".to_string()),
        "{:?}",
        update.removed
    );

    // A fault abort on a gRPC route answers as gRPC: trailers-only, UNAVAILABLE for 503.
    let abort = r#"
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ads, namespace: shop}
spec:
  hosts: [ads]
  http:
  - fault: {abort: {httpStatus: 503, percentage: {value: 100}}}
    route: [{destination: {host: ads}}]
"#;
    m.push(&(grpc_service.clone() + abort));
    let deadline = Instant::now() + WAIT;
    let status = loop {
        let uri = format!("http://{}", client.services[0]);
        match hypha_xds::DeltaClient::connect(uri, app_node.to_node()).await {
            Err(hypha_xds::ClientError::Stream(status)) => break status,
            Ok(mut c) => {
                // Not aborted yet; the stream may still fail on its first message.
                if let Ok(Err(hypha_xds::ClientError::Stream(status))) =
                    tokio::time::timeout(Duration::from_millis(200), c.next()).await
                {
                    break status;
                }
            }
            Err(e) => panic!("{e}"),
        }
        assert!(Instant::now() < deadline, "the abort never applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let metrics = client.telemetry.metrics.render();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_requests_total{")
                && l.contains("grpc_response_status=\"14\"")
                && l.contains("response_flags=\"FI\"")
                && l.contains("request_protocol=\"grpc\"")),
        "{metrics}"
    );
}

/// Services for the cluster features: `od` (a good and a failing endpoint, outlier
/// detection, no retries), `pool` (one connection plus one pending request), `sticky`
/// (consistent hash on a header over two endpoints).
fn cluster_features_yaml(good: u16, bad: u16, slow: u16, a: u16, b: u16) -> String {
    format!(
        r#"
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: od, namespace: shop}}
spec:
  hosts: [od.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 7001, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {good}}}}}, {{address: 127.0.0.1, ports: {{http: {bad}}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: od, namespace: shop}}
spec:
  hosts: [od]
  http: [{{route: [{{destination: {{host: od}}}}], retries: {{attempts: 0}}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: od, namespace: shop}}
spec:
  host: od
  trafficPolicy:
    outlierDetection: {{consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 3s, maxEjectionPercent: 100}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: pool, namespace: shop}}
spec:
  hosts: [pool.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 7002, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {slow}}}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: pool, namespace: shop}}
spec:
  host: pool
  trafficPolicy:
    connectionPool: {{tcp: {{maxConnections: 1}}, http: {{http1MaxPendingRequests: 1}}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: pool2, namespace: shop}}
spec:
  hosts: [pool2.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 7004, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {slow}}}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: pool2, namespace: shop}}
spec:
  host: pool2
  trafficPolicy:
    connectionPool: {{http: {{http2MaxRequests: 1}}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: sticky, namespace: shop}}
spec:
  hosts: [sticky.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 7003, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {a}}}}}, {{address: 127.0.0.1, ports: {{http: {b}}}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: sticky, namespace: shop}}
spec:
  host: sticky
  trafficPolicy:
    loadBalancer: {{consistentHash: {{httpHeaderName: x-user}}}}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_pool_limits_and_consistent_hash() {
    let m = mesh().await;
    let p = m.client.http_proxy[0];
    let good = app("127.0.0.1:0", "good", false).await;
    let bad = app("127.0.0.1:0", "bad", true).await;
    let slow = app("127.0.0.1:0", "slow", false).await;
    let a = app("127.0.0.1:0", "a", false).await;
    let b = app("127.0.0.1:0", "b", false).await;
    m.push(&cluster_features_yaml(
        good.addr.port(),
        bad.addr.port(),
        slow.addr.port(),
        a.addr.port(),
        b.addr.port(),
    ));
    eventually("config never arrived", || {
        ["7001", "7002", "7003", "7004"]
            .iter()
            .all(|t| m.client.config.load().routes.contains_key(*t))
    })
    .await;

    // Outlier detection: two consecutive 5xx eject the failing endpoint for 3 s (long enough
    // for a round on a loaded machine); after that it is tried again and ejected again after
    // two more.
    let od = "http://od.shop.svc.cluster.local:7001";
    let round = |n: usize| async move {
        let mut failed = 0;
        for i in 0..n {
            let (s, _, _) = get(p, &format!("{od}/{i}"), &[]).await;
            if s != 200 {
                failed += 1;
            }
        }
        failed
    };
    let start = Instant::now();
    assert_eq!(round(40).await, 2, "ejected after its second failure");
    assert_eq!(bad.hits.load(Ordering::Relaxed), 2);
    let clusters = admin(m.client.admin.unwrap(), "/clusters").await.1;
    let od_block: String = clusters
        .split("\noutbound|")
        .find(|b| b.starts_with("7001||od."))
        .unwrap_or_default()
        .to_owned();
    let ejected: Vec<&str> = od_block
        .lines()
        .filter(|l| l.contains("health=ejected"))
        .collect();
    assert_eq!(ejected.len(), 1, "{clusters}");
    assert!(
        ejected[0].contains(&format!("127.0.0.1:{} ", bad.addr.port())),
        "{clusters}"
    );
    assert!(
        start.elapsed() < Duration::from_millis(2700),
        "the round must fit in the ejection"
    );
    tokio::time::sleep(Duration::from_millis(3100).saturating_sub(start.elapsed())).await;
    assert_eq!(
        round(60).await,
        2,
        "back after the ejection, then ejected again"
    );
    assert_eq!(bad.hits.load(Ordering::Relaxed), 4);
    assert!(good.hits.load(Ordering::Relaxed) >= 90);

    // Pool limits: one connection and one pending request; 6 slow requests at once.
    let pool = "http://pool.shop.svc.cluster.local:7002/slow";
    let all = futures_join(
        (0..6)
            .map(|_| async move { get(p, pool, &[]).await })
            .collect(),
    )
    .await;
    let ok = all.iter().filter(|(s, _, _)| *s == 200).count();
    let overflow: Vec<_> = all
        .iter()
        .filter(|(s, _, h)| *s == 503 && h["x-hypha-response-flags"] == "UO")
        .collect();
    assert_eq!(ok, 2, "{:?}", all.iter().map(|r| r.0).collect::<Vec<_>>());
    assert_eq!(overflow.len(), 4);
    assert_eq!(slow.hits.load(Ordering::Relaxed), 2);
    let set =
        m.client.config.load().endpoint_sets["outbound|7002||pool.shop.svc.cluster.local"].clone();
    assert_eq!(set.runtime.overflows.load(Ordering::Relaxed), 4);
    // `http2MaxRequests` limits HTTP/1.1 requests in flight too, as Envoy's `max_requests`.
    let pool2 = "http://pool2.shop.svc.cluster.local:7004/slow";
    let all = futures_join(
        (0..4)
            .map(|_| async move { get(p, pool2, &[]).await })
            .collect(),
    )
    .await;
    let codes: Vec<u16> = all.iter().map(|r| r.0).collect();
    assert_eq!(codes.iter().filter(|c| **c == 200).count(), 1, "{codes:?}");
    assert_eq!(codes.iter().filter(|c| **c == 503).count(), 3, "{codes:?}");
    assert_eq!(
        set.runtime.active.load(Ordering::Relaxed),
        0,
        "nothing leaked"
    );
    let metrics = admin(m.client.admin.unwrap(), "/metrics").await.1;
    assert_eq!(
        sample(
            &metrics,
            "istio_requests_total",
            &[
                ("destination_service", "pool.shop.svc.cluster.local"),
                ("response_flags", "UO")
            ]
        ),
        Some(4.0),
        "{metrics}"
    );

    // Consistent hash: a user always lands on the same endpoint; users spread over both.
    let sticky = "http://sticky.shop.svc.cluster.local:7003/";
    let mut seen = std::collections::HashSet::new();
    for user in 0..20 {
        let user = format!("user-{user}");
        let (_, first, _) = get(p, sticky, &[("x-user", &user)]).await;
        for _ in 0..5 {
            let (_, again, _) = get(p, sticky, &[("x-user", &user)]).await;
            assert_eq!(first[..1], again[..1], "{user} moved");
        }
        seen.insert(first[..1].to_owned());
    }
    assert_eq!(seen.len(), 2, "20 users all hashed to one endpoint");
}

/// Runs futures concurrently and returns their outputs in order.
async fn futures_join<F: std::future::Future + Send + 'static>(futs: Vec<F>) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

/// An app that accepts `Upgrade: echo` with 101 and then echoes every byte.
async fn upgrade_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |mut req: Request<hyper::body::Incoming>| async move {
                        let mut resp = Response::new(Full::new(Bytes::new()));
                        if req.headers().get("upgrade").is_some_and(|v| v == "echo") {
                            let on = hyper::upgrade::on(&mut req);
                            tokio::spawn(async move {
                                let io = on.await.unwrap();
                                let (mut r, mut w) = tokio::io::split(TokioIo::new(io));
                                let _ = tokio::io::copy(&mut r, &mut w).await;
                            });
                            *resp.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
                            resp.headers_mut()
                                .insert("upgrade", "echo".parse().unwrap());
                            resp.headers_mut()
                                .insert("connection", "upgrade".parse().unwrap());
                        }
                        Ok::<_, Infallible>(resp)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_passthrough_through_two_sidecars() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let m = mesh().await;
    let echo = upgrade_app().await;
    let mut ws_sidecar = hypha_proxy::start(Options {
        inbound: vec!["127.0.0.1:0".parse().unwrap()],
        app: Some(echo),
        ..sidecar(&m.control_plane(), "ws-1", &[("app", "ws")])
    })
    .await
    .unwrap();
    let ws = sidecar_service("ws", 7010, "http", "HTTP", ws_sidecar.inbound[0].port());
    m.push(&ws);
    ready(&mut ws_sidecar).await;
    let port = ws_sidecar.inbound[0].port();
    eventually("config never arrived", || {
        let c = m.client.config.load();
        c.routes.contains_key("7010")
            && c.endpoint_sets
                .contains_key("outbound|7010||ws.shop.svc.cluster.local")
            && ws_sidecar.config.load().inbound.by_port.contains_key(&port)
    })
    .await;

    let mut conn = tokio::net::TcpStream::connect(m.client.http_proxy[0])
        .await
        .unwrap();
    conn.write_all(
        b"GET http://ws.shop.svc.cluster.local:7010/chat HTTP/1.1\r\nHost: ws.shop.svc.cluster.local:7010\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tokio::time::timeout(WAIT, conn.read_exact(&mut byte))
            .await
            .expect("101 in time")
            .unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // Bytes both ways, larger than one read, then a half-close ends the echo.
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = conn.into_split();
    let sent = payload.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut echoed = vec![0u8; payload.len()];
    tokio::time::timeout(WAIT, r.read_exact(&mut echoed))
        .await
        .expect("echo in time")
        .unwrap();
    writer.await.unwrap();
    assert!(echoed == payload, "upgraded bytes came back changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_service_port_proxies_bytes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let m = mesh().await;
    // A raw TCP echo app.
    let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_addr = echo.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = echo.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = stream.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let tcp = format!(
        r#"
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: tcpsvc, namespace: shop}}
spec:
  hosts: [tcpsvc.shop.svc.cluster.local]
  addresses: [240.240.0.9]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 7020, name: tcp, protocol: TCP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{tcp: {}}}}}]
"#,
        echo_addr.port()
    );
    m.push(&tcp);
    let mut client = hypha_proxy::start(Options {
        services: vec![(
            "127.0.0.1:0".parse().unwrap(),
            "tcpsvc.shop.svc.cluster.local:7020".into(),
        )],
        ..sidecar(&m.control_plane(), "tcp-client", &[("app", "tcp-client")])
    })
    .await
    .unwrap();
    ready(&mut client).await;
    eventually("config never arrived", || {
        client
            .config
            .load()
            .endpoint_sets
            .contains_key("outbound|7020||tcpsvc.shop.svc.cluster.local")
    })
    .await;
    let conn = tokio::net::TcpStream::connect(client.services[0])
        .await
        .unwrap();
    let (mut r, mut w) = conn.into_split();
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let sent = payload.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    tokio::time::timeout(WAIT, r.read_to_end(&mut back))
        .await
        .expect("echo and close in time")
        .unwrap();
    writer.await.unwrap();
    assert!(back == payload, "bytes changed on the way");
    let deadline = Instant::now() + WAIT;
    loop {
        let text = client.telemetry.metrics.render();
        if text.contains("istio_tcp_sent_bytes_total 300000") {
            assert!(
                text.contains("istio_tcp_received_bytes_total 300000"),
                "{text}"
            );
            assert!(
                text.contains("istio_tcp_connections_opened_total 1"),
                "{text}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_finishes_requests_in_flight_and_refuses_new_ones() {
    let m = mesh().await;
    let p = m.client.http_proxy[0];
    let admin_addr = m.client.admin.unwrap();
    // The health listener: readiness and nothing else of the admin's.
    let health = m.client.health[0];
    assert_eq!(admin(health, "/healthz/ready").await.0, 200);
    assert_eq!(admin(health, "/metrics").await.0, 404);
    // A 500 ms request (split route, no timeout) in flight when the drain starts.
    let in_flight =
        tokio::spawn(
            async move { get(p, "http://web.shop.svc.cluster.local/slow-drain", &[]).await },
        );
    tokio::time::sleep(Duration::from_millis(150)).await;
    let started = Instant::now();
    let (left, ()) = tokio::join!(m.client.drain(Duration::from_secs(5)), async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        // While draining: not ready, and no new connections.
        assert_eq!(admin(admin_addr, "/ready").await.0, 503);
        assert_eq!(admin(health, "/healthz/ready").await.0, 503);
        let refused = match tokio::net::TcpStream::connect(p).await {
            Err(_) => true,
            Ok(mut s) => {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let _ = s
                    .write_all(b"GET http://web.shop.svc.cluster.local/x HTTP/1.1\r\nHost: web.shop.svc.cluster.local\r\n\r\n")
                    .await;
                let mut buf = [0u8; 1];
                matches!(
                    tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await,
                    Ok(Ok(0) | Err(_))
                )
            }
        };
        assert!(refused, "a new connection was served while draining");
    });
    assert_eq!(left, 0, "every connection closed before the deadline");
    assert!(started.elapsed() < Duration::from_secs(3));
    let (s, body, _) = in_flight.await.unwrap();
    assert_eq!(s, 200, "the request in flight finished");
    assert!(
        body.starts_with("v1 /slow-drain") || body.starts_with("v2 /slow-drain"),
        "{body}"
    );
}

/// An IPv6-only client reaches IPv4-only workloads, and each request leaves one JSON access
/// log line with what happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_client_and_access_log() {
    let m = mesh().await;
    let log = std::env::temp_dir().join(format!(
        "hypha-access-{}-{}.log",
        std::process::id(),
        Instant::now().elapsed().as_nanos()
    ));
    let _ = std::fs::remove_file(&log);
    let mut client = hypha_proxy::start(Options {
        http_proxy: vec!["[::1]:0".parse().unwrap()],
        access_log: Some(log.clone()),
        ..sidecar(&m.control_plane(), "v6-client", &[("app", "v6-client")])
    })
    .await
    .unwrap();
    ready(&mut client).await;
    let p = client.http_proxy[0];
    assert!(p.is_ipv6());
    let deadline = Instant::now() + WAIT;
    loop {
        let (s, body, _) = get(
            p,
            "http://web.shop.svc.cluster.local/legacy/v6",
            &[("x-request-id", "r-6")],
        )
        .await;
        if s == 200 {
            assert_eq!(body, "v1 /modern/v6 rewritten");
            break;
        }
        assert!(Instant::now() < deadline, "never routed: {s}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + WAIT;
    let line = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| l.contains("\"r-6\"")) {
            break l.to_owned();
        }
        assert!(Instant::now() < deadline, "no access log line: {text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["response_code"], 200);
    assert_eq!(v["response_flags"], "-");
    assert_eq!(v["method"], "GET");
    assert_eq!(v["path"], "/legacy/v6");
    assert_eq!(v["reporter"], "source");
    assert_eq!(
        v["upstream_cluster"],
        "outbound|80|v1|web.shop.svc.cluster.local"
    );
    assert_eq!(v["bytes_sent"], "v1 /modern/v6 rewritten".len());
    assert!(v["downstream_remote_address"]
        .as_str()
        .unwrap()
        .starts_with("[::1]:"));
    let _ = std::fs::remove_file(&log);
}

/// A ServiceEntry with `resolution: DNS` gives a STRICT_DNS cluster; its host name is resolved
/// when connecting (here `localhost`, which also names `::1` where nothing listens: the next
/// address is tried).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_resolved_service() {
    let m = mesh().await;
    let p = m.client.http_proxy[0];
    m.push(&format!(
        r#"
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: dns, namespace: shop}}
spec:
  hosts: [dns.example.com]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{{number: 7030, name: http, protocol: HTTP}}]
  endpoints: [{{address: localhost, ports: {{http: {}}}}}]
"#,
        m.v2.addr.port()
    ));
    let client = &m.client;
    // The cluster and the port's route table arrive in separate updates (CDS, then RDS).
    eventually("DNS cluster and its routes never arrived", || {
        let c = client.config.load();
        c.clusters.contains_key("outbound|7030||dns.example.com") && c.routes.contains_key("7030")
    })
    .await;
    let (s, body, _) = get(p, "http://dns.example.com:7030/resolved", &[]).await;
    assert_eq!((s, body.as_str()), (200, "v2 /resolved -"));
}

/// An upstream that fails each path's first request as the path says (`/409`: 409 Conflict;
/// `/limited`: 429 with `x-envoy-ratelimited`; `/429`: 429 alone) and answers 200 after; its
/// count of requests per path.
async fn fails_once() -> (SocketAddr, Arc<std::sync::Mutex<HashMap<String, u32>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let seen: Arc<std::sync::Mutex<HashMap<String, u32>>> = Arc::default();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let counts = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let counts = counts.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let mut chunk = [0u8; 4096];
                    let Ok(n) = s.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end + 4);
                    let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
                    let n = {
                        let mut c = counts.lock().unwrap();
                        let n = c.entry(path.clone()).or_insert(0);
                        *n += 1;
                        *n
                    };
                    let first = n == 1;
                    let (status, extra) = match path.as_str() {
                        "/409" if first => ("409 Conflict", ""),
                        "/limited" if first => {
                            ("429 Too Many Requests", "x-envoy-ratelimited: true\r\n")
                        }
                        "/429" if first => ("429 Too Many Requests", ""),
                        _ => ("200 OK", ""),
                    };
                    let reply = format!("HTTP/1.1 {status}\r\n{extra}content-length: 2\r\n\r\nok");
                    if s.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// Istio's `retryOn` conditions beyond 5xx, as Envoy acts on them: `retriable-4xx` retries a
/// 409, `envoy-ratelimited` a response marked `x-envoy-ratelimited`, and nothing else is
/// retried (a bare 429 reaches the client).
#[tokio::test]
async fn retry_on_retriable_4xx_and_envoy_ratelimited() {
    let (at, seen) = fails_once().await;
    let yaml = format!(
        "apiVersion: hypha.dev/v1alpha1\nkind: MeshConfig\nmetadata: {{name: m}}\n\
         spec: {{trustDomain: cluster.local}}\n{}\
         ---\napiVersion: networking.istio.io/v1\nkind: VirtualService\n\
         metadata: {{name: up, namespace: shop}}\nspec:\n  hosts: [up.ext.test]\n  http:\n  \
         - route: [{{destination: {{host: up.ext.test}}}}]\n    retries: {{attempts: 2, \
         retryOn: \"retriable-4xx,envoy-ratelimited,reset-before-request,retriable-headers\"}}\n",
        common::external_service("up.ext.test", 80, "HTTP", at)
    );
    let (_cp, client) = common::client_sidecar(&yaml, &[]).await;
    let proxy = client.http_proxy[0];
    for (path, want, tries) in [("/409", 200, 2), ("/limited", 200, 2), ("/429", 429, 1)] {
        let (status, _, _) = get(proxy, &format!("http://up.ext.test{path}"), &[]).await;
        assert_eq!(status, want, "{path}");
        assert_eq!(seen.lock().unwrap()[path], tries, "{path}");
    }
}

/// A TCP server that writes `name` to each connection and closes it.
async fn says(name: &'static str) -> SocketAddr {
    use tokio::io::AsyncWriteExt;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(name.as_bytes()).await;
            });
        }
    });
    addr
}

/// A sidecar's local port for a TCP service goes through the service's VirtualService `tcp`
/// routes, as a connection to the service's address does: split 80/20 between two services
/// over 400 connections.
#[tokio::test]
async fn a_local_tcp_service_port_follows_weighted_tcp_routes() {
    use tokio::io::AsyncReadExt;
    let (a, b) = (says("A").await, says("B").await);
    let yaml = format!(
        "apiVersion: hypha.dev/v1alpha1\nkind: MeshConfig\nmetadata: {{name: m}}\n\
         spec: {{trustDomain: cluster.local}}\n{}{}{}\
         ---\napiVersion: networking.istio.io/v1\nkind: VirtualService\n\
         metadata: {{name: db, namespace: shop}}\nspec:\n  hosts: [db.ext.test]\n  tcp:\n  \
         - route:\n    - {{destination: {{host: db-a.ext.test, port: {{number: 9001}}}}, \
         weight: 80}}\n    - {{destination: {{host: db-b.ext.test, port: {{number: 9002}}}}, \
         weight: 20}}\n",
        // Each on a port of its own: TCP services sharing a port without addresses are told
        // apart by server name.
        common::external_service("db.ext.test", 9000, "TCP", a),
        common::external_service("db-a.ext.test", 9001, "TCP", a),
        common::external_service("db-b.ext.test", 9002, "TCP", b),
    );
    let (_cp, client) = common::client_sidecar(&yaml, &["db.ext.test:9000"]).await;
    let local = client.services[0];
    let mut by = HashMap::<String, usize>::new();
    for _ in 0..400 {
        let mut c = tokio::net::TcpStream::connect(local).await.unwrap();
        let mut got = String::new();
        tokio::time::timeout(WAIT, c.read_to_string(&mut got))
            .await
            .unwrap()
            .unwrap();
        *by.entry(got).or_default() += 1;
    }
    // The standard deviation is 8 connections: ±60 is far outside chance.
    assert_eq!(by.values().sum::<usize>(), 400, "{by:?}");
    let to_b = by.get("B").copied().unwrap_or(0);
    assert!((20..=140).contains(&to_b), "{by:?}");
}
