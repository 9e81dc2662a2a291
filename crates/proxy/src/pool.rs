//! Upstream HTTP/1.1 connections. Idle keep-alive connections are kept per address and per
//! worker thread, so taking one and putting it back touches no lock and no other thread.
//!
//! The request path drives its connection itself: hyper's connection future is polled by the
//! request that uses it, beside the response future, instead of by a task of its own. A small
//! response (see [`small_body`](crate::http::small_body)) is read whole the same way, and the
//! connection goes back to the pool with its future, ready for the next request: one task
//! wake-up per direction instead of three hand-offs between tasks. Responses that stream
//! (unknown or large length) or switch protocols hand the connection to a task, which drives
//! it from then on, as hyper's own pool does. (HTTP/2 multiplexes over one shared connection
//! per address and thread instead: [`send_h2`].)
//!
//! Connections to sidecars are mutual TLS ([`Tls::Mesh`]): the workload certificate is
//! presented, the server's SPIFFE ID checked against the identities the cluster allows, and
//! the verified identity kept with the connection, so a pooled connection is only reused where
//! its server is allowed. Connections a cluster originates TLS on ([`Tls::Origination`]) are
//! pooled apart per TLS context.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use std::sync::Arc;

use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hypha_identity::tls::Peer;
use hypha_identity::Credentials;

use crate::origination::Origination;

use crate::http::{Body, Flag};
use crate::model::{ClusterRuntime, FastMap};

/// Idle connections kept per address and thread; more are closed when they come back.
const IDLE_PER_ADDR: usize = 64;
/// An idle connection older than this is closed instead of reused, whatever the cluster
/// allows (Envoy's default HTTP idle timeout is one hour; servers usually close sooner, and
/// a connection they closed is not reused either). Shorter than a Hypha server's header
/// read timeout (30 s, which is its keep-alive idle timeout too), so a sidecar never sends
/// on a connection its peer is closing.
const IDLE_TIMEOUT: Duration = Duration::from_secs(20);

/// How a cluster's connections are used (`common_http_protocol_options`), and how many it
/// may have.
#[derive(Debug, Clone, Copy)]
pub struct Settings<'a> {
    pub connect_timeout: Duration,
    /// Closed after idling this long (at most [`IDLE_TIMEOUT`]).
    pub idle_timeout: Duration,
    /// Closed after this many requests.
    pub max_requests: Option<u32>,
    /// The cluster's HTTP/1.1 connections, every thread's together, and their cap
    /// (`max_connections`): a request that finds none idle and the cap reached waits for one
    /// (it is a pending request, which the circuit breaker bounds). `None`: no cap.
    pub cap: Option<(&'a Arc<ClusterRuntime>, u64)>,
}

impl Settings<'_> {
    pub fn of<'a>(
        c: &crate::model::Cluster,
        runtime: Option<&'a Arc<ClusterRuntime>>,
    ) -> Settings<'a> {
        Settings {
            connect_timeout: c.connect_timeout,
            idle_timeout: c.idle_timeout.map_or(IDLE_TIMEOUT, |t| t.min(IDLE_TIMEOUT)),
            max_requests: c.max_requests_per_connection,
            cap: runtime
                .filter(|_| c.limits.max_connections != u32::MAX)
                .map(|rt| (rt, u64::from(c.limits.max_connections))),
        }
    }
}

impl Default for Settings<'_> {
    fn default() -> Self {
        Settings {
            connect_timeout: Duration::from_secs(10),
            idle_timeout: IDLE_TIMEOUT,
            max_requests: None,
            cap: None,
        }
    }
}

/// One connection's place under its cluster's cap, given back when the connection and the
/// task that drives it are both gone.
pub(crate) struct Slot {
    rt: Arc<ClusterRuntime>,
    /// The live count ([`LIVE`]) of the thread whose pool holds the connection: where it was
    /// made, then wherever it last came back idle.
    live: arc_swap::ArcSwapOption<AtomicUsize>,
}

impl Slot {
    /// A place under `max` connections, if there is one now.
    pub(crate) fn try_take(rt: &Arc<ClusterRuntime>, max: u64) -> Option<Slot> {
        if rt.connections.fetch_add(1, Ordering::AcqRel) < max {
            Some(Slot {
                rt: rt.clone(),
                live: arc_swap::ArcSwapOption::empty(),
            })
        } else {
            rt.connections.fetch_sub(1, Ordering::AcqRel);
            None
        }
    }

    /// A place over the cap: counted, but taken whatever the count.
    fn over(rt: &Arc<ClusterRuntime>) -> Slot {
        rt.connections.fetch_add(1, Ordering::AcqRel);
        Slot {
            rt: rt.clone(),
            live: arc_swap::ArcSwapOption::empty(),
        }
    }

    /// Counts the connection in this thread's pool for `key` from now on.
    fn settle_here(&self, key: Key) {
        LIVE.with(|l| {
            let mut l = l.borrow_mut();
            let here = l.entry(key).or_default();
            let now = self.live.load();
            if now.as_ref().is_some_and(|n| Arc::ptr_eq(n, here)) {
                return;
            }
            here.fetch_add(1, Ordering::AcqRel);
            if let Some(before) = self.live.swap(Some(here.clone())) {
                before.fetch_sub(1, Ordering::AcqRel);
            }
        });
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(live) = self.live.load_full() {
            live.fetch_sub(1, Ordering::AcqRel);
        }
        self.rt.connections.fetch_sub(1, Ordering::AcqRel);
        self.rt.freed.notify_waiters();
    }
}

thread_local! {
    /// Requests waiting for a connection under a cap that started waiting on this thread
    /// (a waiting task may wake on another).
    static WAITING_HERE: Arc<AtomicUsize> = Arc::default();
    /// Connections made by this thread's pool under a cap, by address and kind, open now
    /// (idle or busy, wherever they are driven from).
    static LIVE: RefCell<FastMap<Key, Arc<AtomicUsize>>> = RefCell::default();
}

/// What a request that found no idle connection gets under a cap.
enum Reserved {
    /// A place for one more connection.
    Slot(Arc<Slot>),
    /// A connection that came back idle on this thread while it waited.
    Idle(Conn),
}

/// How often a waiting request looks again for a connection that became free without
/// coming back through [`put_idle`] (one that finished streaming a body).
const RECHECK: Duration = Duration::from_millis(10);

/// A place for one more connection under `cap`. At the cap, this thread's pool waits for one
/// of its own connections to come back, as Envoy's per-worker pools do; a pool with no
/// connection to the address at all makes one anyway (Envoy's rule too: no request waits on
/// connections another thread holds), so the cap is at least one per worker thread.
async fn reserve(
    addr: SocketAddr,
    tls: Option<&Tls>,
    cap: (&Arc<ClusterRuntime>, u64),
) -> Reserved {
    let (rt, max) = cap;
    let key = (addr, kind(tls));
    let live = LIVE.with(|l| l.borrow_mut().entry(key).or_default().clone());
    let counted = |slot: Slot| {
        slot.settle_here(key);
        Reserved::Slot(Arc::new(slot))
    };
    loop {
        let freed = rt.freed.notified();
        let mut freed = std::pin::pin!(freed);
        // Registered before the checks: a connection freed between them still wakes this.
        freed.as_mut().enable();
        if let Some(slot) = Slot::try_take(rt, max) {
            return counted(slot);
        }
        if let Some(conn) = take_idle(addr, tls) {
            return Reserved::Idle(conn);
        }
        if live.load(Ordering::Acquire) == 0 {
            return counted(Slot::over(rt));
        }
        let waiting = WAITING_HERE.with(Arc::clone);
        waiting.fetch_add(1, Ordering::AcqRel);
        let _waited = Waited(waiting);
        let _ = tokio::time::timeout(RECHECK, freed).await;
    }
}

/// Counts a request out of the waiting ones of the thread it started waiting on, however its
/// wait ends.
struct Waited(Arc<AtomicUsize>);

impl Drop for Waited {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// TLS for an upstream connection.
#[derive(Clone)]
pub enum Tls {
    /// Mutual TLS to a sidecar: the credentials to present, who the server must be, and the
    /// ALPN to offer (wire format).
    Mesh {
        credentials: Arc<Credentials>,
        peer: Peer,
        alpn: Arc<[u8]>,
    },
    /// TLS origination to a server outside the mesh.
    Origination(Arc<Origination>),
}

impl Tls {
    /// Whether a pooled connection (server identity, identity presented) may take a request
    /// that asks for this TLS. Connections of another kind are in another pool.
    fn reusable(&self, ids: Option<(&Arc<str>, &Arc<str>)>) -> bool {
        match (self, ids) {
            (
                Tls::Mesh {
                    credentials, peer, ..
                },
                Some((id, local)),
            ) => peer.allows(id) && **local == *credentials.identity.id(),
            (Tls::Origination(_), None) => true,
            _ => false,
        }
    }
}

/// Which pool a connection belongs to: plaintext (0), mutual TLS (1), or one origination
/// context's.
fn kind(tls: Option<&Tls>) -> u64 {
    match tls {
        None => 0,
        Some(Tls::Mesh { .. }) => 1,
        Some(Tls::Origination(o)) => o.id,
    }
}

/// hyper's connection future (its type is not nameable, hence the box).
type Driver = Pin<Box<dyn Future<Output = hyper::Result<()>> + Send>>;

/// A keep-alive connection: the handle requests are sent on, and the future that does its
/// I/O while nobody else drives it (`None` once a task drives it).
struct Conn {
    sender: SendRequest<Body>,
    driver: Option<Driver>,
    /// Requests sent on it.
    requests: u32,
    /// The server's verified SPIFFE ID, for a mutual-TLS connection.
    peer: Option<Arc<str>>,
    /// The identity this side presented on it: a connection is only reused by the same
    /// workload (several proxies can share a process, as in tests).
    local: Option<Arc<str>>,
    /// Its pool ([`kind`]).
    kind: u64,
    /// Its place under the cluster's cap, if it has one.
    slot: Option<Arc<Slot>>,
}

/// Plaintext, mutual-TLS and each origination context's connections to one address are
/// pooled apart.
type Key = (SocketAddr, u64);

/// A multiplexed HTTP/2 connection and, over mutual TLS, its server's verified identity and
/// the identity this side presented.
type H2Conn = (http2::SendRequest<Body>, Option<(Arc<str>, Arc<str>)>);

/// An idle connection and when it stops being reusable.
type Idle = (Conn, Instant);

thread_local! {
    static IDLE: RefCell<FastMap<Key, Vec<Idle>>> = RefCell::default();
    /// One multiplexed HTTP/2 connection per address (plaintext and mutual TLS apart), with
    /// its server's identity.
    static H2: RefCell<FastMap<Key, H2Conn>> = RefCell::default();
}

impl Conn {
    /// Whether the connection can take a request now. One that does not say so yet gets to
    /// notice, without waiting, what happened while it sat idle (it finished the last
    /// response, or the server closed it).
    fn ready_now(&mut self) -> bool {
        if self.sender.is_ready() {
            // A close that arrived meanwhile is seen when the request is sent, which then
            // comes back unsent (see `send`).
            return true;
        }
        if let Some(driver) = &mut self.driver {
            let mut cx = Context::from_waker(Waker::noop());
            if driver.as_mut().poll(&mut cx).is_ready() {
                self.driver = None; // closed (or failed): the sender now says so
            }
        }
        !self.sender.is_closed() && self.sender.is_ready()
    }

    /// Polls `fut` to completion while driving the connection.
    async fn drive<F: Future>(&mut self, fut: F) -> F::Output {
        let mut fut = std::pin::pin!(fut);
        poll_fn(|cx| {
            if let Some(driver) = &mut self.driver {
                if let Poll::Ready(result) = driver.as_mut().poll(cx) {
                    self.driver = None;
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "upstream connection ended with an error");
                    }
                }
            }
            fut.as_mut().poll(cx)
        })
        .await
    }

    /// From now on a task drives the connection (and holds its place under the cap).
    fn detach(&mut self, addr: SocketAddr) {
        if let Some(driver) = self.driver.take() {
            let slot = self.slot.clone();
            tokio::spawn(async move {
                if let Err(e) = driver.await {
                    tracing::debug!(%addr, error = %e, "upstream connection ended with an error");
                }
                drop(slot);
            });
        }
    }
}

/// An idle connection to `addr` that can take a request now, if there is one. Closed and
/// expired ones are dropped; busy ones (a task still reading a previous response body) stay
/// for later.
fn take_idle(addr: SocketAddr, tls: Option<&Tls>) -> Option<Conn> {
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        let list = idle.get_mut(&(addr, kind(tls)))?;
        let now = Instant::now();
        list.retain(|(c, until)| !c.sender.is_closed() && now < *until);
        let allowed = |c: &Conn| match tls {
            Some(t) => t.reusable(c.peer.as_ref().zip(c.local.as_ref())),
            None => c.peer.is_none(),
        };
        let i = list
            .iter_mut()
            .rposition(|(c, _)| allowed(c) && c.ready_now())?;
        Some(list.swap_remove(i).0)
    })
}

/// Keeps a connection for the next request, unless it is closed or has served its share;
/// requests waiting under a cap on this thread are told.
fn put_idle(addr: SocketAddr, conn: Conn, settings: &Settings) {
    if conn.sender.is_closed() || settings.max_requests.is_some_and(|n| conn.requests >= n) {
        return;
    }
    if let Some((rt, _)) = settings.cap {
        if let Some(slot) = &conn.slot {
            slot.settle_here((addr, conn.kind));
        }
        if WAITING_HERE.with(|w| w.load(Ordering::Acquire)) > 0 {
            rt.freed.notify_waiters();
        }
    }
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        let list = idle.entry((addr, conn.kind)).or_default();
        if list.len() < IDLE_PER_ADDR {
            list.push((conn, Instant::now() + settings.idle_timeout));
        }
    });
}

async fn connect(
    addr: SocketAddr,
    timeout: Duration,
    tls: Option<&Tls>,
    slot: Option<Arc<Slot>>,
) -> Result<Conn, Flag> {
    let stream = tcp(addr, timeout).await?;
    let Some(tls) = tls else {
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|_| Flag::ConnectFailure)?;
        return Ok(Conn {
            sender,
            driver: Some(Box::pin(conn.with_upgrades())),
            requests: 0,
            peer: None,
            local: None,
            kind: 0,
            slot,
        });
    };
    let (stream, ids) = handshake(addr, stream, tls).await?;
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|_| Flag::ConnectFailure)?;
    let (peer, local) = ids.unzip();
    Ok(Conn {
        sender,
        driver: Some(Box::pin(conn.with_upgrades())),
        requests: 0,
        peer,
        local,
        kind: kind(Some(tls)),
        slot,
    })
}

/// The client side of TLS on `stream`. For mutual TLS, the server's verified identity and the
/// one presented.
pub(crate) async fn handshake(
    addr: SocketAddr,
    stream: tokio::net::TcpStream,
    tls: &Tls,
) -> Result<(Stream, Option<(Arc<str>, Arc<str>)>), Flag> {
    match tls {
        Tls::Mesh {
            credentials,
            peer,
            alpn,
        } => match hypha_identity::tls::connect(&credentials.client, stream, peer, alpn).await {
            Ok(s) => {
                let id = hypha_identity::tls::peer_id(s.ssl()).unwrap_or_default();
                Ok((s, Some((id.into(), credentials.identity.id().into()))))
            }
            Err(e) => {
                tracing::warn!(%addr, error = %e, "upstream mutual TLS refused");
                Err(Flag::ConnectFailure)
            }
        },
        Tls::Origination(o) => match o.connect(stream).await {
            Ok(s) => Ok((s, None)),
            Err(e) => {
                tracing::warn!(%addr, sni = %o.spec.sni, error = %e, "upstream TLS refused");
                Err(Flag::ConnectFailure)
            }
        },
    }
}

/// A TLS connection to an upstream.
pub(crate) type Stream = tokio_boring::SslStream<tokio::net::TcpStream>;

async fn tcp(addr: SocketAddr, timeout: Duration) -> Result<tokio::net::TcpStream, Flag> {
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
    Ok(stream)
}

/// Sends `req` (origin-form URI, `Host` set) to `addr` over an idle keep-alive connection, or
/// a new one. A reused connection the server closed meanwhile hands the request back unsent,
/// and the next connection gets it. A small response comes back with its body read whole.
pub async fn send(
    addr: SocketAddr,
    mut req: Request<Body>,
    settings: &Settings<'_>,
    tls: Option<&Tls>,
) -> Result<Response<Body>, Flag> {
    let slot = loop {
        let mut conn = match (take_idle(addr, tls), settings.cap) {
            (Some(conn), _) => conn,
            (None, None) => break None,
            (None, Some(cap)) => match reserve(addr, tls, cap).await {
                Reserved::Slot(slot) => break Some(slot),
                Reserved::Idle(conn) => conn,
            },
        };
        conn.requests += 1;
        let sent = conn.sender.try_send_request(req);
        match conn.drive(sent).await {
            Ok(resp) => return respond(addr, conn, resp, settings).await,
            Err(mut e) => match e.take_message() {
                Some(unsent) => req = unsent,
                None => {
                    tracing::debug!(%addr, error = %e.error(), "upstream request failed");
                    return Err(Flag::Reset);
                }
            },
        }
    };
    let mut conn = connect(addr, settings.connect_timeout, tls, slot).await?;
    conn.requests += 1;
    let sent = conn.sender.send_request(req);
    match conn.drive(sent).await {
        Ok(resp) => respond(addr, conn, resp, settings).await,
        Err(e) => {
            tracing::debug!(%addr, error = %e, "upstream request failed");
            Err(Flag::Reset)
        }
    }
}

/// Sends `req` (absolute URI: its authority is the request's `:authority`) over this thread's
/// multiplexed HTTP/2 connection to `addr`, plaintext or mutual TLS, made (ALPN h2) when there
/// is none or the last one closed. A small response comes back with its body read whole.
pub async fn send_h2(
    addr: SocketAddr,
    req: Request<Body>,
    settings: &Settings<'_>,
    tls: Option<&Tls>,
) -> Result<Response<Body>, Flag> {
    let key = (addr, kind(tls));
    let cached = H2.with(|h2| {
        let h2 = h2.borrow();
        h2.get(&key)
            .filter(|(s, ids)| {
                !s.is_closed()
                    && match tls {
                        Some(t) => t.reusable(ids.as_ref().map(|(a, b)| (a, b))),
                        None => ids.is_none(),
                    }
            })
            .map(|(s, _)| s.clone())
    });
    let mut sender = match cached {
        Some(s) => s,
        None => {
            let stream = tcp(addr, settings.connect_timeout).await?;
            let (sender, ids) = match tls {
                Some(tls) => {
                    let (stream, ids) = handshake(addr, stream, tls).await?;
                    (h2_handshake(addr, stream).await?, ids)
                }
                None => (h2_handshake(addr, stream).await?, None),
            };
            H2.with(|h2| h2.borrow_mut().insert(key, (sender.clone(), ids)));
            sender
        }
    };
    sender.ready().await.map_err(|_| Flag::Reset)?;
    let resp = sender.send_request(req).await.map_err(|e| {
        tracing::debug!(%addr, error = %e, "upstream HTTP/2 request failed");
        Flag::Reset
    })?;
    crate::http::small_body_whole(resp).await
}

/// An HTTP/2 client connection on `stream`, driven by a task of its own.
async fn h2_handshake<S>(addr: SocketAddr, stream: S) -> Result<http2::SendRequest<Body>, Flag>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .map_err(|e| {
            tracing::debug!(%addr, error = %e, "upstream HTTP/2 handshake failed");
            Flag::ConnectFailure
        })?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(%addr, error = %e, "upstream HTTP/2 connection ended");
        }
    });
    Ok(sender)
}

/// The response to pass on; the connection goes back to the pool (or to a task that drives
/// it while the body streams).
async fn respond(
    addr: SocketAddr,
    mut conn: Conn,
    resp: Response<hyper::body::Incoming>,
    settings: &Settings<'_>,
) -> Result<Response<Body>, Flag> {
    if !crate::http::small_body(&resp) {
        conn.detach(addr);
        // An upgraded connection is the client's now, never the pool's.
        if resp.status() != http::StatusCode::SWITCHING_PROTOCOLS {
            put_idle(addr, conn, settings);
        }
        return Ok(resp.map(crate::http::incoming));
    }
    let (parts, body) = resp.into_parts();
    match conn.drive(body.collect()).await {
        Ok(collected) => {
            put_idle(addr, conn, settings);
            Ok(Response::from_parts(
                parts,
                crate::http::full(collected.to_bytes()),
            ))
        }
        Err(e) => {
            tracing::debug!(%addr, error = %e, "upstream reset while sending the response body");
            Err(Flag::Reset)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A raw HTTP/1.1 server: answers each request on a connection with `body`, and closes the
    /// connection after `per_conn` responses. Counts the connections it accepted.
    async fn server(body: Vec<u8>, per_conn: usize) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let body = Arc::new(body);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let body = body.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    for _ in 0..per_conn {
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            let mut chunk = [0u8; 1024];
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        buf.clear();
                        let head =
                            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
                        if s.write_all(head.as_bytes()).await.is_err()
                            || s.write_all(&body).await.is_err()
                        {
                            return;
                        }
                    }
                    // Closes without `Connection: close`, as an idle timeout does.
                });
            }
        });
        (addr, accepted)
    }

    fn get() -> Request<Body> {
        let mut req = Request::new(crate::http::full(""));
        req.headers_mut()
            .insert(http::header::HOST, http::HeaderValue::from_static("t"));
        req
    }

    async fn body_of(resp: Response<Body>) -> Vec<u8> {
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec()
    }

    const S: Settings = Settings {
        connect_timeout: Duration::from_secs(5),
        idle_timeout: IDLE_TIMEOUT,
        max_requests: None,
        cap: None,
    };

    #[tokio::test(flavor = "current_thread")]
    async fn small_responses_reuse_one_connection() {
        let (addr, accepted) = server(b"hello".to_vec(), usize::MAX).await;
        for _ in 0..50 {
            let resp = send(addr, get(), &S, None).await.unwrap();
            assert_eq!(body_of(resp).await, b"hello");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_connection_serves_at_most_max_requests_and_idles_at_most_idle_timeout() {
        let (addr, accepted) = server(b"hello".to_vec(), usize::MAX).await;
        let three = Settings {
            max_requests: Some(3),
            ..S
        };
        for _ in 0..9 {
            let resp = send(addr, get(), &three, None).await.unwrap();
            assert_eq!(body_of(resp).await, b"hello");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);

        let (addr, accepted) = server(b"hello".to_vec(), usize::MAX).await;
        let short = Settings {
            idle_timeout: Duration::from_millis(50),
            ..S
        };
        for _ in 0..3 {
            let resp = send(addr, get(), &short, None).await.unwrap();
            assert_eq!(body_of(resp).await, b"hello");
            tokio::time::sleep(Duration::from_millis(80)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_connection_the_server_closed_while_idle_is_not_used() {
        // One response per connection, then the server closes it.
        let (addr, accepted) = server(b"x".to_vec(), 1).await;
        for _ in 0..5 {
            let resp = send(addr, get(), &S, None)
                .await
                .expect("no error after an idle close");
            assert_eq!(body_of(resp).await, b"x");
            // Let the close arrive before the next request takes the connection.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 5);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn large_responses_stream_and_the_connection_comes_back() {
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let (addr, accepted) = server(big.clone(), usize::MAX).await;
        for _ in 0..3 {
            let resp = send(addr, get(), &S, None).await.unwrap();
            assert_eq!(body_of(resp).await, big);
            // The task driving the connection sees the body end, then it is idle again.
            tokio::task::yield_now().await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }
}
