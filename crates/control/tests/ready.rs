//! `hypha control --health`: `/ready` says whether the config served is complete, as a
//! Deployment's readiness probe asks it; until it is, proxies are asked to come back. And
//! `/metrics`, as Prometheus scrapes it.

use hypha_control::{serve_ready, ControlPlane};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn ready_once_the_sources_config_is_served() {
    let cp = ControlPlane::new(hypha_config::Config::default());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(serve_ready(cp.clone(), l));
    assert!(get(addr, "/ready").await.starts_with("HTTP/1.1 200"));
    // Another source that has not pushed yet.
    cp.set_ready(false);
    assert!(get(addr, "/ready").await.starts_with("HTTP/1.1 503"));
    cp.set_ready(true);
    assert!(get(addr, "/ready").await.starts_with("HTTP/1.1 200"));
    assert!(get(addr, "/config").await.starts_with("HTTP/1.1 404"));
    // `/metrics` in Prometheus' text format, named as Prometheus 3 requires.
    let metrics = get(addr, "/metrics").await;
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(
        metrics.contains("content-type: text/plain; version=0.0.4; charset=utf-8\r\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("\nhypha_control_generation 1\n"),
        "{metrics}"
    );
}

#[test]
fn proxies_are_asked_to_come_back_until_ready() {
    use hypha_xds::SnapshotSource;
    let cp = ControlPlane::new(hypha_config::Config::default());
    let node = envoy_types::pb::envoy::config::core::v3::Node {
        id: "sidecar~10.0.0.1~web-1.shop~shop.svc.cluster.local".into(),
        ..Default::default()
    };
    let none = tonic::Extensions::default();
    cp.set_ready(false);
    let refused = cp.watch(&node, &none).expect_err("not ready");
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    cp.set_ready(true);
    assert!(cp.watch(&node, &none).is_ok());
}
