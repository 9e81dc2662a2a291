//! `hypha wait`: the classic sidecar's `postStart` hook for `holdApplicationUntilProxyStarts`
//! (Istio's `pilot-agent wait`). The kubelet starts the next container only when the hook
//! returns, so the app starts once its sidecar answers `/healthz/ready` with 200.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error("{0:?} is not an http://ADDRESS:PORT/PATH URL")]
    Url(String),
    #[error("not ready after {0:?}: {1}")]
    Timeout(Duration, String),
}

/// Polls `url` (`http://127.0.0.1:15021/healthz/ready`) every `every` until it answers 200,
/// for at most `timeout`.
pub fn wait_ready(url: &str, timeout: Duration, every: Duration) -> Result<(), WaitError> {
    let bad = || WaitError::Url(url.to_owned());
    let rest = url.strip_prefix("http://").ok_or_else(bad)?;
    let (authority, path) = rest.find('/').map_or((rest, "/"), |i| rest.split_at(i));
    let addr: SocketAddr = authority.parse().map_err(|_| bad())?;
    let start = Instant::now();
    loop {
        let last = match probe(addr, authority, path) {
            Ok(200) => return Ok(()),
            Ok(status) => format!("status {status}"),
            Err(e) => e.to_string(),
        };
        if start.elapsed() >= timeout {
            return Err(WaitError::Timeout(timeout, last));
        }
        std::thread::sleep(every);
    }
}

/// One GET; the response's status code.
fn probe(addr: SocketAddr, authority: &str, path: &str) -> std::io::Result<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    // One write: a server that answers on the first bytes must not find the rest arriving
    // after it has closed.
    let request = format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes())?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head)?;
    std::str::from_utf8(&head[9..12])
        .ok()
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("not an HTTP response"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn waits_for_a_200_and_gives_up_after_the_timeout() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            for status in ["503 Service Unavailable", "200 OK"] {
                let (mut c, _) = l.accept().unwrap();
                // The whole request head, then the answer.
                let mut head = Vec::new();
                let mut buf = [0u8; 256];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = c.read(&mut buf).unwrap();
                    assert!(n > 0, "the request ended early");
                    head.extend_from_slice(&buf[..n]);
                }
                write!(c, "HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").unwrap();
            }
        });
        let url = format!("http://{addr}/healthz/ready");
        wait_ready(&url, Duration::from_secs(10), Duration::from_millis(10)).unwrap();
        server.join().unwrap();
        // Nothing listens there any more.
        let err = wait_ready(&url, Duration::from_millis(50), Duration::from_millis(10));
        assert!(matches!(err, Err(WaitError::Timeout(..))), "{err:?}");
        assert!(matches!(
            wait_ready("https://x", Duration::ZERO, Duration::ZERO),
            Err(WaitError::Url(_))
        ));
    }
}
