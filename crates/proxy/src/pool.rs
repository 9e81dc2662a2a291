//! Upstream HTTP/1.1 connections. Idle keep-alive connections are kept per address and per
//! worker thread, so taking one and putting it back touches no lock and no other thread: the
//! request path owns its connection from `send` to the response head, and hyper's connection
//! task carries the rest. (HTTP/2 multiplexes over one shared connection instead; see
//! `upstream`.)

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;

use crate::http::{Body, Flag};

/// Idle connections kept per address and thread; more are closed when they come back.
const IDLE_PER_ADDR: usize = 64;
/// An idle connection older than this is closed instead of reused (Envoy's default HTTP
/// idle timeout is one hour; servers usually close sooner, which `is_closed` notices).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// An idle connection and when it was put back.
type Idle = (SendRequest<Body>, Instant);

thread_local! {
    static IDLE: RefCell<HashMap<SocketAddr, Vec<Idle>>> = RefCell::new(HashMap::new());
}

/// An idle connection to `addr` that can take a request now, if there is one. Closed ones
/// are dropped; busy ones (still reading a previous response body) stay for later.
fn take_idle(addr: SocketAddr) -> Option<SendRequest<Body>> {
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        let list = idle.get_mut(&addr)?;
        let now = Instant::now();
        list.retain(|(s, since)| !s.is_closed() && now.duration_since(*since) < IDLE_TIMEOUT);
        let i = list.iter().rposition(|(s, _)| s.is_ready())?;
        Some(list.swap_remove(i).0)
    })
}

fn put_idle(addr: SocketAddr, sender: SendRequest<Body>) {
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        let list = idle.entry(addr).or_default();
        if list.len() < IDLE_PER_ADDR {
            list.push((sender, Instant::now()));
        }
    });
}

async fn connect(addr: SocketAddr, timeout: Duration) -> Result<SendRequest<Body>, Flag> {
    let stream = match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%addr, error = %e, "upstream connect failed");
            return Err(Flag::ConnectFailure);
        }
        Err(_) => {
            tracing::debug!(%addr, "upstream connect timed out");
            return Err(Flag::ConnectFailure);
        }
    };
    let _ = stream.set_nodelay(true);
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|_| Flag::ConnectFailure)?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(%addr, error = %e, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}

/// Sends `req` (origin-form URI, `Host` set) to `addr` over an idle keep-alive connection, or
/// a new one. A reused connection the server closed meanwhile hands the request back unsent,
/// and the next connection gets it.
pub async fn send(
    addr: SocketAddr,
    mut req: Request<Body>,
    connect_timeout: Duration,
) -> Result<Response<Incoming>, Flag> {
    while let Some(mut sender) = take_idle(addr) {
        match sender.try_send_request(req).await {
            Ok(resp) => {
                put_idle(addr, sender);
                return Ok(resp);
            }
            Err(mut e) => match e.take_message() {
                Some(unsent) => req = unsent,
                None => {
                    tracing::debug!(%addr, error = %e.error(), "upstream request failed");
                    return Err(Flag::Reset);
                }
            },
        }
    }
    let mut sender = connect(addr, connect_timeout).await?;
    match sender.send_request(req).await {
        Ok(resp) => {
            put_idle(addr, sender);
            Ok(resp)
        }
        Err(e) => {
            tracing::debug!(%addr, error = %e, "upstream request failed");
            Err(Flag::Reset)
        }
    }
}
