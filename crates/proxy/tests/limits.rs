//! Slow and hostile clients: half-sent requests by the thousand do not keep a well-behaved
//! client from being served, the header read timeout closes them, and one source gets no more
//! than its share of connections; an idle TCP connection, HTTP/1.1 or HTTP/2 connection or
//! upgraded tunnel is closed, a busy one (a response still streaming) is not, and a tunnel
//! keeps its place under the limits.
//! Upstream: a route timeout and the circuit breaker cover the response body, and
//! `maxConnections` caps the HTTP/1.1 pool. Bounded in time and count (timeouts of seconds
//! or less here).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hypha_proxy::limits::Limits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Notify;

mod common;
use common::{
    client_sidecar, external_service, sidecar_in_front, sidecar_service, tcp_sidecar, web_sidecar,
};

const SLOW: usize = 2_000;
const PER_SOURCE: usize = 1_500;
const TIMEOUT: Duration = Duration::from_secs(3);

/// A connection from `source` to `to`.
async fn connect_from(source: [u8; 4], to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((source, 0))).unwrap();
    socket.connect(to).await.unwrap()
}

/// Whether the server closes `conn` within `within`.
async fn closed_within(conn: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 512];
    loop {
        match tokio::time::timeout(within, conn.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_requests_are_closed_and_keep_no_one_else_waiting() {
    let limits = Limits {
        header_read_timeout: TIMEOUT,
        max_connections: 10_000,
        max_connections_per_source: PER_SOURCE,
        ..Limits::default()
    };
    let yaml = |port: u16| {
        format!(
            "apiVersion: hypha.dev/v1alpha1\nkind: MeshConfig\nmetadata: {{name: m}}\n\
             spec: {{trustDomain: cluster.local}}\n{}",
            sidecar_service("web", 80, "http", "HTTP", port)
        )
    };
    let (_cp, _, server) = web_sidecar(yaml, limits).await;
    let inbound = server.inbound[0];

    // Thousands of requests from one source, each stopped halfway through its head: the
    // source's share is taken and waits; the connections over it are closed at once.
    let half = b"GET /slow HTTP/1.1\r\nhost: web.shop.svc.cluster.local\r\nx-a: ";
    let mut slow = Vec::with_capacity(PER_SOURCE);
    for _ in 0..PER_SOURCE {
        let mut c = connect_from([127, 0, 0, 1], inbound).await;
        c.write_all(half).await.unwrap();
        slow.push(c);
    }
    let opened = tokio::time::Instant::now();
    for _ in PER_SOURCE..SLOW {
        let mut c = connect_from([127, 0, 0, 1], inbound).await;
        let _ = c.write_all(half).await;
        assert!(
            closed_within(&mut c, Duration::from_millis(500)).await,
            "a connection over the source's share was taken"
        );
    }
    assert!(
        opened.elapsed() < TIMEOUT
            && !closed_within(slow.last_mut().unwrap(), Duration::from_millis(10)).await,
        "the source's share was closed before its header timeout"
    );
    // A well-behaved client from another address is served at once.
    let mut good = connect_from([127, 0, 0, 2], inbound).await;
    good.write_all(
        b"GET /ok HTTP/1.1\r\nhost: web.shop.svc.cluster.local\r\nconnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), good.read_to_string(&mut answer))
        .await
        .expect("the good client is answered while the slow ones wait")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("web /ok -"), "{answer}");

    // The source's share is closed by the header timeout.
    for c in &mut slow {
        assert!(
            closed_within(c, 2 * TIMEOUT).await,
            "a half-sent request still open {:?} after the last was opened",
            opened.elapsed()
        );
    }
}

#[tokio::test]
async fn idle_tcp_connections_are_closed_and_busy_ones_are_not() {
    let idle = Duration::from_millis(800);
    let yaml = |port: u16| {
        format!(
            "apiVersion: hypha.dev/v1alpha1\nkind: MeshConfig\nmetadata: {{name: m}}\n\
             spec: {{trustDomain: cluster.local}}\n{}",
            sidecar_service("db", 5432, "tcp", "TCP", port)
        )
    };
    let limits = Limits {
        tcp_idle_timeout: idle,
        ..Limits::default()
    };
    let (_cp, _, server) = tcp_sidecar(yaml, limits).await;
    let inbound = server.inbound[0];
    let ping = |c: &'static str| async move {
        let mut conn = TcpStream::connect(inbound).await.unwrap();
        conn.write_all(c.as_bytes()).await.unwrap();
        let mut back = vec![0u8; c.len()];
        tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        conn
    };
    let mut quiet = ping("a").await;
    let mut busy = ping("b").await;
    // The busy one talks every 200 ms for three idle periods; the quiet one says nothing.
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        busy.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(2), busy.read_exact(&mut one))
            .await
            .expect("the busy connection is still served")
            .unwrap();
    }
    assert!(closed_within(&mut quiet, Duration::from_millis(10)).await);
}

/// A raw HTTP/1.1 app (keep-alive) that counts its connections, open now and at most at once.
/// `/hang` sends the head and one chunk, then nothing; `/hold` the same, then the last chunk
/// once `release` is notified; `/upgrade` answers 101 and then echoes; anything else gets
/// `ok` after 100 ms.
struct RawApp {
    addr: SocketAddr,
    open: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
    release: Arc<Notify>,
}

async fn raw_app() -> RawApp {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = RawApp {
        addr: listener.local_addr().unwrap(),
        open: Arc::default(),
        most: Arc::default(),
        release: Arc::default(),
    };
    let (open, most, release) = (app.open.clone(), app.most.clone(), app.release.clone());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let now = open.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            let (open, release) = (open.clone(), release.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        let mut chunk = [0u8; 1024];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => {
                                open.fetch_sub(1, Ordering::SeqCst);
                                return;
                            }
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&buf).into_owned();
                    buf.clear();
                    let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
                    let chunked =
                        "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\npart\r\n";
                    let ok = match path.as_str() {
                        "/hang" => {
                            let _ = s.write_all(chunked.as_bytes()).await;
                            std::future::pending::<()>().await;
                            unreachable!()
                        }
                        "/hold" => {
                            let notified = release.notified();
                            s.write_all(chunked.as_bytes()).await.is_ok() && {
                                notified.await;
                                s.write_all(b"0\r\n\r\n").await.is_ok()
                            }
                        }
                        "/upgrade" => {
                            let _ = s
                                .write_all(
                                    b"HTTP/1.1 101 Switching Protocols\r\n\
                                      connection: upgrade\r\nupgrade: echo\r\n\r\n",
                                )
                                .await;
                            let (mut r, mut w) = s.split();
                            let _ = tokio::io::copy(&mut r, &mut w).await;
                            false
                        }
                        _ => {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                                .await
                                .is_ok()
                        }
                    };
                    if !ok {
                        open.fetch_sub(1, Ordering::SeqCst);
                        return;
                    }
                }
            });
        }
    });
    app
}

/// The mesh config and `web` (port 80, HTTP) on the sidecar's `port`.
fn web_yaml(port: u16) -> String {
    format!(
        "{}{}",
        mesh_config(),
        sidecar_service("web", 80, "http", "HTTP", port)
    )
}

fn mesh_config() -> &'static str {
    "apiVersion: hypha.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: m}\n\
     spec: {trustDomain: cluster.local}\n"
}

#[tokio::test]
async fn an_upgraded_tunnel_keeps_its_place_and_idles_out() {
    let app = raw_app().await;
    let idle = Duration::from_millis(800);
    let limits = Limits {
        max_connections_per_source: 1,
        tcp_idle_timeout: idle,
        ..Limits::default()
    };
    let (_cp, _, server) = sidecar_in_front(web_yaml, app.addr, "web", limits).await;
    let inbound = server.inbound[0];

    let mut tunnel = TcpStream::connect(inbound).await.unwrap();
    tunnel
        .write_all(
            b"GET /upgrade HTTP/1.1\r\nhost: web.shop.svc.cluster.local\r\n\
              connection: upgrade\r\nupgrade: echo\r\n\r\n",
        )
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut b = [0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(5), tunnel.read(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed before the 101");
        head.extend_from_slice(&b[..n]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    tunnel.write_all(b"hi").await.unwrap();
    let mut back = [0u8; 2];
    tunnel.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"hi");

    // The tunnel is still this source's one connection: another is refused.
    let mut second = TcpStream::connect(inbound).await.unwrap();
    assert!(
        closed_within(&mut second, Duration::from_millis(500)).await,
        "a second connection was taken while the tunnel holds the source's share"
    );
    // Quiet for the idle timeout, the tunnel is closed; then the source is served again.
    let opened = Instant::now();
    assert!(
        closed_within(&mut tunnel, 5 * idle).await,
        "the idle tunnel stayed open"
    );
    assert!(opened.elapsed() >= idle / 2);
    let mut third = TcpStream::connect(inbound).await.unwrap();
    third
        .write_all(
            b"GET /x HTTP/1.1\r\nhost: web.shop.svc.cluster.local\r\nconnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), third.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test]
async fn idle_http2_connections_are_closed_and_busy_ones_are_not() {
    let idle = Duration::from_millis(800);
    let limits = Limits {
        http_idle_timeout: idle,
        ..Limits::default()
    };
    let (_cp, _, server) = web_sidecar(web_yaml, limits).await;
    let inbound = server.inbound[0];
    let h2 = || async move {
        let stream = TcpStream::connect(inbound).await.unwrap();
        let (sender, conn) = hyper::client::conn::http2::handshake::<_, _, Empty<Bytes>>(
            TokioExecutor::new(),
            TokioIo::new(stream),
        )
        .await
        .unwrap();
        (sender, tokio::spawn(conn))
    };
    let get = |mut sender: hyper::client::conn::http2::SendRequest<Empty<Bytes>>| async move {
        let req = http::Request::builder()
            .uri("http://web.shop.svc.cluster.local/x")
            .body(Empty::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap();
    };
    let (quiet, quiet_conn) = h2().await;
    get(quiet.clone()).await;
    let (busy, busy_conn) = h2().await;
    // The busy one has a request every 200 ms for three idle periods.
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        get(busy.clone()).await;
    }
    assert!(
        quiet_conn.is_finished(),
        "the idle HTTP/2 connection is still open"
    );
    assert!(
        !busy_conn.is_finished(),
        "the busy HTTP/2 connection was closed"
    );
}

/// Reads from `conn` into `seen` until it ends with `end`.
async fn read_until(conn: &mut TcpStream, seen: &mut Vec<u8>, end: &[u8]) {
    while !seen.ends_with(end) {
        let mut b = [0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut b))
            .await
            .expect("the response stalled")
            .unwrap();
        assert!(
            n > 0,
            "closed mid-response: {}",
            String::from_utf8_lossy(seen)
        );
        seen.extend_from_slice(&b[..n]);
    }
}

#[tokio::test]
async fn http1_waits_for_a_request_head_while_idle_only() {
    let app = raw_app().await;
    let timeout = Duration::from_millis(800);
    let limits = Limits {
        header_read_timeout: timeout,
        ..Limits::default()
    };
    let (_cp, _, server) = sidecar_in_front(web_yaml, app.addr, "web", limits).await;
    let inbound = server.inbound[0];

    // A response that streams for three header timeouts is not cut...
    let mut conn = TcpStream::connect(inbound).await.unwrap();
    conn.write_all(b"GET /hold HTTP/1.1\r\nhost: web.shop.svc.cluster.local\r\n\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    read_until(&mut conn, &mut seen, b"part\r\n").await;
    tokio::time::sleep(3 * timeout).await;
    app.release.notify_waiters();
    read_until(&mut conn, &mut seen, b"0\r\n\r\n").await;
    // ...and once it has ended, the connection idle for the header timeout is closed.
    let ended = Instant::now();
    assert!(
        closed_within(&mut conn, 5 * timeout).await,
        "the idle keep-alive connection stayed open"
    );
    assert!(ended.elapsed() >= timeout / 2, "{:?}", ended.elapsed());
}

/// The mesh config, an external service `host` (port 80, HTTP) served by `at`, and `extra`
/// YAML for it.
fn external(host: &str, at: SocketAddr, extra: &str) -> String {
    format!(
        "{}{}{extra}",
        mesh_config(),
        external_service(host, 80, "HTTP", at)
    )
}

/// A request through the HTTP proxy on a connection of its own: the response head, with its
/// body still to read.
async fn start(proxy: SocketAddr, url: &str) -> http::Response<hyper::body::Incoming> {
    let stream = TcpStream::connect(proxy).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let target: http::Uri = url.parse().unwrap();
    let req = http::Request::builder()
        .uri(target.path())
        .header("host", target.host().unwrap())
        .body(Empty::new())
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), sender.send_request(req))
        .await
        .expect("response head in time")
        .unwrap()
}

#[tokio::test]
async fn the_route_timeout_and_circuit_breaker_cover_the_response_body() {
    let app = raw_app().await;
    let yaml = external(
        "stream.ext.test",
        app.addr,
        r#"---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: stream, namespace: shop}
spec:
  hosts: [stream.ext.test]
  http: [{timeout: 1s, route: [{destination: {host: stream.ext.test}}]}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: stream, namespace: shop}
spec:
  host: stream.ext.test
  trafficPolicy: {connectionPool: {http: {http2MaxRequests: 1}}}
"#,
    );
    let (_cp, client) = client_sidecar(&yaml, &[]).await;
    let proxy = client.http_proxy[0];

    // While one response's body is still coming, the request counts: a second overflows.
    let held = start(proxy, "http://stream.ext.test/hold").await;
    assert_eq!(held.status(), 200);
    let over = start(proxy, "http://stream.ext.test/x").await;
    assert_eq!(
        over.status(),
        503,
        "the circuit breaker let a second request through"
    );
    app.release.notify_waiters();
    let body = held.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"part");
    assert_eq!(start(proxy, "http://stream.ext.test/x").await.status(), 200);

    // A body that stops coming is cut at the route's deadline, counted from the request.
    let sent = Instant::now();
    let hung = start(proxy, "http://stream.ext.test/hang").await;
    assert_eq!(hung.status(), 200);
    let body = tokio::time::timeout(Duration::from_secs(5), hung.into_body().collect())
        .await
        .expect("the hung body was not cut");
    assert!(
        body.is_err(),
        "a cut body must end in an error, not look complete"
    );
    assert!(
        sent.elapsed() >= Duration::from_millis(900),
        "{:?}",
        sent.elapsed()
    );
    // ...and stops counting against the circuit breaker.
    assert_eq!(start(proxy, "http://stream.ext.test/x").await.status(), 200);
}

/// One worker thread, where the cap is exact (each worker's pool may have one connection
/// whatever the cap, as in Envoy).
#[tokio::test]
async fn max_connections_caps_the_http1_pool() {
    let app = raw_app().await;
    let yaml = external(
        "pool.ext.test",
        app.addr,
        r#"---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: pool, namespace: shop}
spec:
  host: pool.ext.test
  trafficPolicy:
    connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 64}}
"#,
    );
    let (_cp, client) = client_sidecar(&yaml, &[]).await;
    let proxy = client.http_proxy[0];
    // Eight at once: they wait for the one connection in turn, and all are served.
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..8 {
        calls.spawn(async move {
            let resp = start(proxy, "http://pool.ext.test/x").await;
            (
                resp.status(),
                resp.into_body().collect().await.unwrap().to_bytes(),
            )
        });
    }
    while let Some(done) = calls.join_next().await {
        let (status, body) = done.unwrap();
        assert_eq!((status.as_u16(), &body[..]), (200, &b"ok"[..]));
    }
    assert_eq!(
        app.most.load(Ordering::SeqCst),
        1,
        "more than maxConnections connections were open at once"
    );
}

#[tokio::test]
async fn max_connections_refuses_tcp_connections_over_it() {
    let echo = common::tcp_echo().await;
    let yaml = format!(
        "{}{}{}",
        mesh_config(),
        external_service("db.ext.test", 9000, "TCP", echo),
        r#"---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: db, namespace: shop}
spec:
  host: db.ext.test
  trafficPolicy: {connectionPool: {tcp: {maxConnections: 1}}}
"#
    );
    let (_cp, client) = client_sidecar(&yaml, &["db.ext.test:9000"]).await;
    let listener = client.services[0];
    let ping = |mut c: TcpStream| async move {
        c.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(2), c.read(&mut one)).await;
        (c, matches!(read, Ok(Ok(1))))
    };
    let (first, served) = ping(TcpStream::connect(listener).await.unwrap()).await;
    assert!(served, "the first connection is proxied");
    // The cluster's one connection is taken: the next is closed unserved.
    let (_, served) = ping(TcpStream::connect(listener).await.unwrap()).await;
    assert!(!served, "a second connection went over maxConnections");
    // Once the first ends, its place is free again.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, served) = ping(TcpStream::connect(listener).await.unwrap()).await;
        if served {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the place of a closed connection never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
