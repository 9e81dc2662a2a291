//! The app's probes through the sidecar's health listener, as an injected pod's kubelet sends
//! them (`/app-health/<container>/livez`, ...): HTTP by status, TCP by connection, gRPC by
//! the health service's answer, each within its timeout, whatever the proxy's own state.

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::StreamBody;
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hypha_proxy::probe::{Action, AppProbe, AppProbes};
use tokio::net::TcpListener;

/// A gRPC health server answering every Check with `status` (1 SERVING, 2 NOT_SERVING).
async fn grpc_health(status: u8) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: http::Request<hyper::body::Incoming>| async move {
                        assert_eq!(req.uri().path(), "/grpc.health.v1.Health/Check");
                        let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![
                            Ok(Frame::data(Bytes::from(vec![0, 0, 0, 0, 2, 0x08, status]))),
                            Ok(Frame::trailers({
                                let mut t = http::HeaderMap::new();
                                t.insert("grpc-status", "0".parse().unwrap());
                                t
                            })),
                        ];
                        let body = StreamBody::new(tokio_stream::iter(frames));
                        Ok::<_, Infallible>(
                            http::Response::builder()
                                .header("content-type", "application/grpc")
                                .body(body)
                                .unwrap(),
                        )
                    },
                );
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

fn http(port: u16, path: &str) -> Action {
    Action::Http {
        port,
        path: path.into(),
        https: false,
        host: None,
        headers: vec![],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_listener_runs_the_apps_probes() {
    let good = app("127.0.0.1:0", "app", false).await;
    let bad = app("127.0.0.1:0", "app", true).await;
    let serving = grpc_health(1).await;
    let not_serving = grpc_health(2).await;
    // Accepts and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let second = Duration::from_secs(1);
    let probe = |action| AppProbe {
        action,
        timeout: second,
    };
    let by_path: HashMap<String, AppProbe> = [
        (
            "/app-health/web/livez",
            probe(http(good.addr.port(), "/health")),
        ),
        (
            "/app-health/web/readyz",
            probe(http(bad.addr.port(), "/health")),
        ),
        (
            "/app-health/web/startupz",
            probe(Action::Tcp {
                port: good.addr.port(),
                host: None,
            }),
        ),
        (
            "/app-health/db/readyz",
            probe(Action::Tcp {
                port: closed,
                host: None,
            }),
        ),
        (
            "/app-health/grpc/livez",
            probe(Action::Grpc {
                port: serving.port(),
                service: Some("shop".into()),
            }),
        ),
        (
            "/app-health/grpc/readyz",
            probe(Action::Grpc {
                port: not_serving.port(),
                service: None,
            }),
        ),
        (
            "/app-health/slow/livez",
            probe(http(silent.local_addr().unwrap().port(), "/")),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    // No control plane: the probes are the app's, not the proxy's readiness.
    let p = hypha_proxy::start(hypha_proxy::Options {
        health: vec!["127.0.0.1:0".parse().unwrap()],
        app_probes: AppProbes {
            app: Some("127.0.0.1".parse().unwrap()),
            by_path,
        },
        ..sidecar("http://127.0.0.1:1", "web", &[("app", "web")])
    })
    .await
    .unwrap();
    let h = p.health[0];
    assert_eq!(admin(h, "/healthz/ready").await.0, 503, "no config yet");
    assert_eq!(admin(h, "/app-health/web/livez").await.0, 200);
    let hits = good.hits.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(hits, 1, "the probe reached the app");
    let (s, body) = admin(h, "/app-health/web/readyz").await;
    assert_eq!(s, 503, "{body}");
    assert!(body.contains("HTTP status 5"), "{body}");
    assert_eq!(admin(h, "/app-health/web/startupz").await.0, 200);
    let (s, body) = admin(h, "/app-health/db/readyz").await;
    assert_eq!(s, 503, "{body}");
    assert_eq!(admin(h, "/app-health/grpc/livez").await.0, 200);
    let (s, body) = admin(h, "/app-health/grpc/readyz").await;
    assert_eq!(s, 503);
    assert!(body.contains("not SERVING"), "{body}");
    let started = Instant::now();
    let (s, body) = admin(h, "/app-health/slow/livez").await;
    assert_eq!(s, 503, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the probe's timeout"
    );
    assert_eq!(admin(h, "/app-health/nope/livez").await.0, 404);
    assert_eq!(
        admin(h, "/metrics").await.0,
        404,
        "nothing else of the admin's"
    );
    drop(silent);
}

/// A probe's own `Host` header is the one sent (once), as the kubelet sends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probes_host_header_replaces_the_default() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await.unwrap();
            let head = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
            let hosts: Vec<&str> = head.lines().filter(|l| l.starts_with("host:")).collect();
            let status = if hosts == ["host: app.example"] {
                "200 OK"
            } else {
                "400 Bad Request"
            };
            let _ = s
                .write_all(format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").as_bytes())
                .await;
        }
    });
    let probe = AppProbe {
        action: Action::Http {
            port,
            path: "/".into(),
            https: false,
            host: None,
            headers: vec![("Host".into(), "app.example".into())],
        },
        timeout: Duration::from_secs(1),
    };
    let p = hypha_proxy::start(hypha_proxy::Options {
        health: vec!["127.0.0.1:0".parse().unwrap()],
        app_probes: AppProbes {
            app: Some("127.0.0.1".parse().unwrap()),
            by_path: [("/app-health/a/readyz".to_owned(), probe)]
                .into_iter()
                .collect(),
        },
        ..sidecar("http://127.0.0.1:1", "web", &[("app", "web")])
    })
    .await
    .unwrap();
    let (s, body) = admin(p.health[0], "/app-health/a/readyz").await;
    assert_eq!(s, 200, "{body}");
}
