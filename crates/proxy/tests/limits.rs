//! Slow and hostile clients: half-sent requests by the thousand do not keep a well-behaved
//! client from being served, the header read timeout closes them, and one source gets no more
//! than its share of connections; an idle TCP connection is closed, a busy one is not.
//! Bounded in time and count (timeouts of seconds here).

use std::net::SocketAddr;
use std::time::Duration;

use hypha_proxy::limits::Limits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

mod common;
use common::{sidecar_service, tcp_sidecar, web_sidecar};

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
