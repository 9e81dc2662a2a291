//! HTTP plumbing shared by both directions: the body type, serving a listener with HTTP/1.1
//! and HTTP/2 (prior knowledge) on the same port, and the
//! local replies the proxy itself sends (no route, no healthy upstream, ...).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

/// Request and response bodies as they flow through the proxy.
pub type Body = http_body_util::combinators::BoxBody<Bytes, BodyError>;

/// Why a body ended before its end: a peer's error, or the proxy's own (a route timeout).
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// A complete body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

pub fn incoming(body: Incoming) -> Body {
    body.map_err(BodyError::from).boxed()
}

/// Header names the request path looks up, parsed once (a `&str` name is parsed and checked
/// on every lookup).
/// The client certificate a sidecar vouches for to its app (Istio's, as Envoy sets it).
pub const XFCC: http::HeaderName = http::HeaderName::from_static("x-forwarded-client-cert");
const RESPONSE_FLAGS: http::HeaderName = http::HeaderName::from_static("x-hypha-response-flags");
const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: http::HeaderName = http::HeaderName::from_static("grpc-message");

/// Why the proxy answered a request itself: Envoy's response flags, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flag {
    /// NR: no route matched.
    NoRoute,
    /// NC: the route's cluster does not exist.
    NoCluster,
    /// UH: no healthy upstream.
    NoHealthyUpstream,
    /// UF: upstream connection failure.
    ConnectFailure,
    /// UT: upstream request timeout.
    Timeout,
    /// UR / UC: upstream reset or connection termination.
    Reset,
    /// FI: fault injected.
    FaultInjected,
    /// DC: downstream connection problem (bad request).
    BadRequest,
    /// UO: the cluster's circuit breaker (connection pool) is full.
    Overflow,
}

impl Flag {
    pub fn as_str(self) -> &'static str {
        match self {
            Flag::NoRoute => "NR",
            Flag::NoCluster => "NC",
            Flag::NoHealthyUpstream => "UH",
            Flag::ConnectFailure => "UF",
            Flag::Timeout => "UT",
            Flag::Reset => "UR",
            Flag::FaultInjected => "FI",
            Flag::BadRequest => "DC",
            Flag::Overflow => "UO",
        }
    }

    fn status_and_text(self) -> (StatusCode, &'static str) {
        match self {
            Flag::NoRoute => (StatusCode::NOT_FOUND, "no route matched"),
            Flag::NoCluster => (StatusCode::SERVICE_UNAVAILABLE, "no such cluster"),
            Flag::NoHealthyUpstream => (StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream"),
            Flag::ConnectFailure => (
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream connect error or disconnect/reset before headers",
            ),
            Flag::Timeout => (StatusCode::GATEWAY_TIMEOUT, "upstream request timeout"),
            Flag::Reset => (
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream reset before response headers",
            ),
            Flag::FaultInjected => (StatusCode::SERVICE_UNAVAILABLE, "fault filter abort"),
            Flag::BadRequest => (StatusCode::BAD_REQUEST, "bad request"),
            Flag::Overflow => (
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream connect error or disconnect/reset before headers. reset reason: overflow",
            ),
        }
    }
}

/// Drops `x-hypha-response-flags` from a response that came from upstream: the flags are this
/// proxy's own account of a request, never an upstream's (which could otherwise fake a local
/// reply in metrics and logs, or have its answer turned into a gRPC error).
pub fn drop_upstream_flags(headers: &mut http::HeaderMap) {
    remove_rare(headers, &RESPONSE_FLAGS);
}

/// Whether `headers` has `name`, found by comparing it with each name the message has rather
/// than by hashing it: for names a message seldom carries, a few compares (a message has a
/// handful of names, at most hyper's limit of 100) cost less than hashing a long name.
pub fn has_rare(headers: &http::HeaderMap, name: &http::HeaderName) -> bool {
    headers.keys().any(|k| k == name)
}

/// Removes `name`, seldom there (see [`has_rare`]).
pub fn remove_rare(headers: &mut http::HeaderMap, name: &http::HeaderName) {
    if has_rare(headers, name) {
        headers.remove(name);
    }
}

/// The proxy's own reply for `flag`, marked so callers and tests can tell it from an app's.
pub fn local_reply(flag: Flag) -> Response<Body> {
    let (status, text) = flag.status_and_text();
    local_reply_with(status, flag, text)
}

pub fn local_reply_with(status: StatusCode, flag: Flag, text: &str) -> Response<Body> {
    let mut r = Response::new(full(text.to_owned()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    r.headers_mut().insert(
        RESPONSE_FLAGS,
        http::HeaderValue::from_static(flag.as_str()),
    );
    r
}

/// Graceful shutdown, the listeners' side: once draining, listeners stop accepting, HTTP
/// connections finish the request in flight and close (HTTP/1.1 `Connection: close`, HTTP/2
/// GOAWAY), and [`DrainTrigger::drain`] waits for the connections still open.
#[derive(Clone)]
pub struct Drain {
    rx: tokio::sync::watch::Receiver<bool>,
    open: Arc<AtomicUsize>,
    /// The listeners' limits and the connections they count.
    admission: Arc<crate::limits::Admission>,
    /// One connection's own signal (see [`Drain::with_closer`]).
    own: Option<tokio::sync::watch::Receiver<bool>>,
}

/// Closes one connection as draining would (see [`Drain::with_closer`]).
#[derive(Clone)]
pub struct Closer(tokio::sync::watch::Sender<bool>);

impl Closer {
    /// The connection finishes the requests in flight and closes.
    pub fn close(&self) {
        self.0.send_replace(true);
    }
}

/// Graceful shutdown, the owner's side.
pub struct DrainTrigger {
    tx: tokio::sync::watch::Sender<bool>,
    open: Arc<AtomicUsize>,
}

/// Counts an open connection (for draining and the connection limits) until dropped.
pub struct Open {
    open: Arc<AtomicUsize>,
    admission: Arc<crate::limits::Admission>,
    slot: usize,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        self.admission.closed(self.slot);
    }
}

impl DrainTrigger {
    pub fn new() -> (DrainTrigger, Drain) {
        Self::with_limits(crate::limits::Limits::default())
    }

    /// Listeners under `limits`.
    pub fn with_limits(limits: crate::limits::Limits) -> (DrainTrigger, Drain) {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let open = Arc::new(AtomicUsize::new(0));
        (
            DrainTrigger {
                tx,
                open: open.clone(),
            },
            Drain {
                rx,
                open,
                admission: Arc::new(crate::limits::Admission::new(limits)),
                own: None,
            },
        )
    }

    /// Starts draining and waits until every connection closed or `deadline` passed;
    /// returns how many were still open.
    pub async fn drain(&self, deadline: std::time::Duration) -> usize {
        self.tx.send_replace(true);
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let open = self.open.load(Ordering::Acquire);
            if open == 0 || tokio::time::Instant::now() >= until {
                return open;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}

impl Drain {
    pub fn is_draining(&self) -> bool {
        *self.rx.borrow() || self.own.as_ref().is_some_and(|o| *o.borrow())
    }

    /// Resolves once draining starts (or the connection's own closer fires).
    pub async fn started(&mut self) {
        match &mut self.own {
            None => {
                let _ = self.rx.wait_for(|d| *d).await;
            }
            Some(own) => {
                tokio::select! {
                    _ = self.rx.wait_for(|d| *d) => {}
                    // A dropped closer closes nothing.
                    Ok(_) = own.wait_for(|d| *d) => {}
                }
            }
        }
    }

    /// This drain for one connection, which the returned [`Closer`] can also finish early
    /// (its chain changed under it).
    pub fn with_closer(&self) -> (Closer, Drain) {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let mut drain = self.clone();
        drain.own = Some(rx);
        (Closer(tx), drain)
    }

    /// Counts a connection from `peer` as open until the returned guard is dropped
    /// ([`accept`] does, for every connection it hands out).
    fn open(&self, peer: SocketAddr) -> Open {
        self.open.fetch_add(1, Ordering::AcqRel);
        let slot = self.admission.opened(peer.ip());
        Open {
            open: self.open.clone(),
            admission: self.admission.clone(),
            slot,
        }
    }

    /// The listeners' limits.
    pub fn limits(&self) -> &crate::limits::Limits {
        &self.admission.limits
    }
}

/// Accepts connections on `listener` and serves each with `handle` (HTTP/1.1, or HTTP/2 when
/// the client starts with the HTTP/2 preface), until draining starts.
pub async fn serve<H, F>(listener: TcpListener, drain: Drain, handle: H)
where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    while let Some((stream, peer, open)) = accept(&listener, &drain).await {
        let serving = serve_connection(stream, peer, drain.clone(), handle.clone());
        tokio::spawn(async move {
            let _open = open;
            serving.await;
        });
    }
}

/// The next connection, or `None` once draining starts. Accept errors (out of descriptors
/// and the like) back off instead of spinning.
pub async fn accept(
    listener: &TcpListener,
    drain: &Drain,
) -> Option<(TcpStream, SocketAddr, Open)> {
    let mut drain = drain.clone();
    loop {
        if drain.is_draining() {
            return None;
        }
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) if drain.admission.admits(peer.ip()) => {
                    let _ = stream.set_nodelay(true);
                    return Some((stream, peer, drain.open(peer)));
                }
                Ok((_, peer)) => {
                    debug!(%peer, "connection refused: over the connection limits");
                }
                Err(e) => {
                    debug!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            },
            () = drain.started() => return None,
        }
    }
}

/// Serves one downstream connection with `handle`; when draining starts, finishes the
/// request in flight and closes.
pub async fn serve_connection<H, F>(stream: TcpStream, peer: SocketAddr, drain: Drain, handle: H)
where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let mut drain = drain;
    // HTTP/2 with prior knowledge or HTTP/1.1, told apart once by peeking at the first bytes,
    // then served by hyper's own connection for that version (no per-read sniffing layer). A
    // client that sends nothing is let go with the header read timeout.
    let first = drain.limits().header_read_timeout;
    let h2 = tokio::select! {
        h2 = tokio::time::timeout(first, starts_with_h2_preface(&stream, PREFACE_WAIT)) => match h2 {
            Ok(Ok(h2)) => h2,
            Ok(Err(e)) => {
                debug!(%peer, error = %e, "downstream connection ended before a request");
                return;
            }
            Err(_) => {
                debug!(%peer, "downstream connection sent nothing in time: closed");
                return;
            }
        },
        () = drain.started() => return,
    };
    serve_io(stream, h2, peer, drain, handle).await;
}

/// Serves HTTP/2 (`h2`) or HTTP/1.1 on an established downstream connection (a TLS one, whose
/// ALPN said which), with `handle`, until it closes or draining finishes it.
pub async fn serve_tls<S, H, F>(stream: S, h2: bool, peer: SocketAddr, drain: Drain, handle: H)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>, SocketAddr) -> F + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    serve_io(stream, h2, peer, drain, handle).await;
}

async fn serve_io<S, H, F>(stream: S, h2: bool, peer: SocketAddr, mut drain: Drain, handle: H)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>, SocketAddr) -> F + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let io = TokioIo::new(stream);
    // A request is in flight from its head until its response body is dropped; a connection
    // with none in flight for its idle time is closed. One timer per connection, re-armed
    // only when it fires, instead of one per request.
    let activity = Arc::new(Activity::default());
    let counted = activity.clone();
    let result = if h2 {
        let service = hyper::service::service_fn(move |req| {
            let request = counted.begin();
            let response = Box::pin(handle(req, peer));
            async move {
                Ok::<_, Infallible>(response.await.map(|body| HeldBody {
                    body,
                    _request: request,
                }))
            }
        });
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .serve_connection(io, service);
        let mut conn = std::pin::pin!(conn);
        let idle = idle_for(&activity, drain.limits().http_idle_timeout);
        match until_drained(conn.as_mut(), &mut drain, idle, |c| {
            c.get_mut().as_mut().graceful_shutdown();
        })
        .await
        {
            Ended::Closed(result) => result,
            // The requests in flight (none, unless one began since) finish first.
            Ended::Idle => {
                debug!(%peer, "HTTP/2 connection idle: closed");
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    } else {
        // An upgrade request carries the connection's hold, which its tunnel keeps until it
        // ends: this task, and the connection's place under the limits, last that long.
        let (held, mut tunnels) = tokio::sync::mpsc::channel::<()>(1);
        let idle = drain.limits().tcp_idle_timeout;
        let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
            let request = counted.begin();
            // hyper marks a request that may upgrade (an `upgrade` header, or CONNECT).
            if req
                .extensions()
                .get::<hyper::upgrade::OnUpgrade>()
                .is_some()
            {
                req.extensions_mut().insert(Tunnel {
                    _held: held.clone(),
                    idle,
                });
            }
            // Boxed once: the request's future holds the whole route-to-upstream state
            // (KiBs), and hyper moves what `call` returns several times.
            let response = Box::pin(handle(req, peer));
            async move {
                Ok::<_, Infallible>(response.await.map(|body| HeldBody {
                    body,
                    _request: request,
                }))
            }
        });
        // The header read timeout is the idle time of an HTTP/1.1 connection: from when it
        // opens or its last response ends, the next request head must be whole within it (a
        // head half sent is no request yet). Closed at once: nothing is in flight.
        let conn = hyper::server::conn::http1::Builder::new()
            .header_read_timeout(None)
            .serve_connection(io, service)
            .with_upgrades();
        let idle = idle_for(&activity, drain.limits().header_read_timeout);
        let result = match until_drained(conn, &mut drain, idle, |c| c.graceful_shutdown()).await {
            Ended::Closed(result) => result,
            Ended::Idle => {
                debug!(%peer, "no whole request head within the header read timeout: closed");
                Ok(())
            }
        };
        // Every sender is gone once the connection and its tunnels are.
        let _ = tunnels.recv().await;
        result
    };
    if let Err(e) = result {
        debug!(%peer, error = %e, "downstream connection ended with an error");
    }
}

/// The requests in flight on a connection, and when the last one ended.
struct Activity {
    active: AtomicUsize,
    /// `model::now_nanos` when the count last fell to zero (or the connection opened).
    idle_since: std::sync::atomic::AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            active: AtomicUsize::new(0),
            idle_since: std::sync::atomic::AtomicU64::new(crate::model::now_nanos()),
        }
    }
}

/// One request counted in flight until dropped.
struct InFlight(Arc<Activity>);

impl Activity {
    fn begin(self: &Arc<Self>) -> InFlight {
        self.active.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0
                .idle_since
                .store(crate::model::now_nanos(), Ordering::Release);
        }
    }
}

/// A response body that keeps its request in flight until hyper drops it (written whole, or
/// the connection gone): a response that streams for long is not an idle connection.
struct HeldBody {
    body: Body,
    _request: InFlight,
}

impl hyper::body::Body for HeldBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BodyError>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Resolves once `activity` has had no request in flight for `idle`.
async fn idle_for(activity: &Activity, idle: std::time::Duration) {
    loop {
        let busy = activity.active.load(Ordering::Acquire) > 0;
        let since = activity.idle_since.load(Ordering::Acquire);
        let elapsed =
            std::time::Duration::from_nanos(crate::model::now_nanos().saturating_sub(since));
        if !busy && elapsed >= idle {
            return;
        }
        tokio::time::sleep(if busy { idle } else { idle - elapsed }).await;
    }
}

const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How long a client that began the HTTP/2 preface may take to finish it.
const PREFACE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Whether the client starts with the HTTP/2 connection preface, read without consuming it.
/// `false` as soon as the bytes differ (an HTTP/1.1 request line), or the client closes; an
/// error for a client that begins the preface and does not finish it within `patience`
/// ([`PREFACE_WAIT`]).
async fn starts_with_h2_preface(
    stream: &TcpStream,
    patience: std::time::Duration,
) -> std::io::Result<bool> {
    let mut buf = [0u8; 24];
    let mut waited = std::time::Duration::ZERO;
    let mut pause = std::time::Duration::from_millis(1);
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 || buf[..n] != H2_PREFACE[..n] {
            return Ok(false);
        }
        if n == H2_PREFACE.len() {
            return Ok(true);
        }
        // Part of the preface so far (clients send it in one piece; this is rare). Peeking
        // again returns at once, even once the client has closed (what it sent stays
        // readable), so wait a little, longer each time, and let go of a client that stops.
        if waited >= patience {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client began the HTTP/2 preface and did not finish it",
            ));
        }
        tokio::time::sleep(pause).await;
        waited += pause;
        pause = (pause * 2).min(std::time::Duration::from_millis(100));
    }
}

/// How a connection's task ended.
enum Ended<E> {
    /// The connection closed (or finished its requests once asked to).
    Closed(Result<(), E>),
    /// The connection was idle for its idle time.
    Idle,
}

/// Runs a connection to its end, or until `idle` resolves; when draining starts, asks it once
/// to finish the request in flight and close. The drain signal and `idle` are polled when
/// they wake, not every time the connection does (four times per request).
async fn until_drained<C, E>(
    conn: C,
    drain: &mut Drain,
    idle: impl Future<Output = ()>,
    shutdown: fn(Pin<&mut C>),
) -> Ended<E>
where
    C: Future<Output = Result<(), E>>,
{
    let mut conn = std::pin::pin!(conn);
    let started = drain.started();
    let mut started = std::pin::pin!(started);
    let mut idle = std::pin::pin!(idle);
    let signal = Arc::new(DrainSignal::default());
    let mut shutting_down = false;
    std::future::poll_fn(|cx| {
        if signal.woken.swap(false, Ordering::AcqRel) {
            signal.register(cx.waker());
            let waker = std::task::Waker::from(signal.clone());
            let mut own = std::task::Context::from_waker(&waker);
            if !shutting_down && started.as_mut().poll(&mut own).is_ready() {
                shutdown(conn.as_mut());
                shutting_down = true;
            }
            if idle.as_mut().poll(&mut own).is_ready() {
                return std::task::Poll::Ready(Ended::Idle);
            }
        }
        conn.as_mut().poll(cx).map(Ended::Closed)
    })
    .await
}

/// Wakes a connection's task for its drain signal, and remembers that it was this signal.
struct DrainSignal {
    woken: std::sync::atomic::AtomicBool,
    task: std::sync::Mutex<Option<std::task::Waker>>,
}

impl Default for DrainSignal {
    fn default() -> Self {
        DrainSignal {
            // Polled once at the start, to register.
            woken: std::sync::atomic::AtomicBool::new(true),
            task: std::sync::Mutex::new(None),
        }
    }
}

impl DrainSignal {
    fn register(&self, waker: &std::task::Waker) {
        let mut task = self
            .task
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !task.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *task = Some(waker.clone());
        }
    }
}

impl std::task::Wake for DrainSignal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        let task = self
            .task
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(w) = task.as_ref() {
            w.wake_by_ref();
        }
    }
}

/// Removes the hop-by-hop headers a proxy must not pass on (RFC 9110 §7.6.1): `connection`
/// and every header it names, `keep-alive`, `proxy-connection`, `transfer-encoding` (hyper
/// frames the body itself) and `te` other than `trailers` (gRPC needs that one); `upgrade`
/// too unless the message is switching protocols. One pass over the names when there is
/// nothing to remove, the usual case.
pub fn strip_hop_by_hop(headers: &mut http::HeaderMap, upgrading: bool) {
    use http::header::{CONNECTION, TE};
    if !headers.keys().any(|n| is_hop_by_hop(n, upgrading)) {
        return;
    }
    // The names `connection` lists, but for `close` and the fixed ones (removed below):
    // rarely any, and collected without allocating when there are none.
    let mut te_listed = false;
    let listed: Vec<http::HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| {
            te_listed |= t.eq_ignore_ascii_case("te");
            ![
                "close",
                "te",
                "keep-alive",
                "proxy-connection",
                "transfer-encoding",
                "connection",
                "upgrade",
            ]
            .iter()
            .any(|fixed| t.eq_ignore_ascii_case(fixed))
        })
        .filter_map(|t| http::HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    // `te` goes on with `trailers` only (gRPC needs it), unless `connection` named it.
    let trailers = !te_listed
        && headers.get_all(TE).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
            })
        });
    // The fixed names, each removed where present (a scan of the names, no hashing of the
    // absent ones); `upgrade` stays on an upgrade.
    while let Some(name) = headers
        .keys()
        .find(|n| is_hop_by_hop(n, upgrading))
        .cloned()
    {
        headers.remove(name);
    }
    if upgrading {
        headers.insert(CONNECTION, http::HeaderValue::from_static("upgrade"));
    }
    if trailers {
        headers.insert(TE, http::HeaderValue::from_static("trailers"));
    }
}

/// Whether `headers` has a hop-by-hop header, `upgrade` included: the usual request has none,
/// and one scan of its names says so.
pub fn has_hop_by_hop(headers: &http::HeaderMap) -> bool {
    headers.keys().any(|n| is_hop_by_hop(n, false))
}

fn is_hop_by_hop(n: &http::HeaderName, upgrading: bool) -> bool {
    use http::header::{CONNECTION, TE, TRANSFER_ENCODING, UPGRADE};
    n == CONNECTION
        || n == TRANSFER_ENCODING
        || n == TE
        || (n == UPGRADE && !upgrading)
        || n == KEEP_ALIVE
        || n == PROXY_CONNECTION
}

const KEEP_ALIVE: http::HeaderName = http::HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: http::HeaderName = http::HeaderName::from_static("proxy-connection");

/// Largest request body kept so that a retry can send it again (Envoy buffers up to its
/// connection buffer limit for the same reason).
const REPLAY_LIMIT: usize = 64 * 1024;

/// What [`RequestBody::from_incoming`] found without waiting.
enum Took {
    Ended(Option<http::HeaderMap>),
    Failed(hyper::Error),
    TooLarge,
    Waiting,
}

/// A request body on its way upstream: whole in memory, so every attempt can send it (retries
/// and a dual-stack endpoint's second address), or streaming, so it can be sent once.
pub enum RequestBody {
    Whole {
        data: Vec<Bytes>,
        trailers: Option<http::HeaderMap>,
    },
    Streaming(Option<Body>),
}

impl RequestBody {
    /// A body of known length that fits in [`REPLAY_LIMIT`] is read whole (it is coming, and
    /// small). Of any other body, takes what the client has already sent, waiting for
    /// nothing but one yield to hyper's connection: when that is the whole body (as with
    /// unary gRPC calls, whose message usually arrives with the head) and it fits, it can be
    /// sent again; otherwise the part taken is sent first and the rest streams behind it.
    pub async fn from_incoming(mut body: Incoming) -> RequestBody {
        use hyper::body::Body as _;
        let mut data = Vec::new();
        let mut size = 0;
        if body.is_end_stream() {
            return RequestBody::Whole {
                data,
                trailers: None,
            };
        }
        let known = body.size_hint().exact();
        if known.is_some_and(|n| n <= REPLAY_LIMIT as u64) {
            return match body.collect().await {
                Ok(whole) => {
                    let trailers = whole.trailers().cloned();
                    RequestBody::Whole {
                        data: vec![whole.to_bytes()],
                        trailers,
                    }
                }
                // The client went away mid-body: what reaches upstream ends in the same error.
                Err(e) => RequestBody::Streaming(Some(
                    http_body_util::StreamBody::new(tokio_stream::iter([Err(BodyError::from(e))]))
                        .boxed(),
                )),
            };
        }
        // What is there now; hyper hands over what it has already read when its connection
        // runs again, so a body that is not complete yet gets one yield before it streams.
        let mut yielded = false;
        let took = loop {
            let took = std::future::poll_fn(|cx| loop {
                let frame = match std::pin::Pin::new(&mut body).poll_frame(cx) {
                    std::task::Poll::Ready(None) => {
                        return std::task::Poll::Ready(Took::Ended(None))
                    }
                    std::task::Poll::Ready(Some(Ok(frame))) => frame,
                    // An error is the rest's to report, in order.
                    std::task::Poll::Ready(Some(Err(e))) => {
                        return std::task::Poll::Ready(Took::Failed(e))
                    }
                    std::task::Poll::Pending => return std::task::Poll::Ready(Took::Waiting),
                };
                match frame.into_data() {
                    Ok(d) => {
                        size += d.len();
                        data.push(d);
                        if size > REPLAY_LIMIT {
                            return std::task::Poll::Ready(Took::TooLarge);
                        }
                    }
                    Err(frame) => {
                        return std::task::Poll::Ready(Took::Ended(frame.into_trailers().ok()));
                    }
                }
            })
            .await;
            match took {
                Took::Waiting if !yielded => {
                    yielded = true;
                    tokio::task::yield_now().await;
                }
                took => break took,
            }
        };
        match took {
            Took::Ended(trailers) => RequestBody::Whole { data, trailers },
            took => {
                use tokio_stream::StreamExt as _;
                let error = match took {
                    Took::Failed(e) => Some(e),
                    _ => None,
                };
                let taken: Vec<_> = data
                    .into_iter()
                    .map(|d| Ok(hyper::body::Frame::data(d)))
                    .chain(error.map(|e| Err(BodyError::from(e))))
                    .collect();
                let rest = tokio_stream::iter(taken).chain(http_body_util::BodyStream::new(
                    body.map_err(BodyError::from),
                ));
                RequestBody::Streaming(Some(http_body_util::StreamBody::new(rest).boxed()))
            }
        }
    }

    /// Whether [`take`](Self::take) can give the body again.
    pub fn replayable(&self) -> bool {
        matches!(self, RequestBody::Whole { .. })
    }

    /// The body for one attempt (for a streaming body, the first only; then empty).
    pub fn take(&mut self) -> Body {
        match self {
            RequestBody::Whole { data, trailers } if trailers.is_none() && data.len() <= 1 => {
                full(data.first().cloned().unwrap_or_default())
            }
            RequestBody::Whole { data, trailers } => {
                let frames = data
                    .iter()
                    .cloned()
                    .map(hyper::body::Frame::data)
                    .chain(trailers.clone().map(hyper::body::Frame::trailers))
                    .map(Ok);
                http_body_util::StreamBody::new(tokio_stream::iter(frames.collect::<Vec<_>>()))
                    .boxed()
            }
            RequestBody::Streaming(body) => body.take().unwrap_or_else(|| full("")),
        }
    }
}

/// A body that counts the bytes it yields, notes the gRPC status its trailers carry, and calls
/// `done` with both once, when it ends or is dropped (a client that goes away mid-response
/// still gets its request counted).
pub struct Counted<F: FnOnce(u64, Option<u16>)> {
    inner: Body,
    bytes: u64,
    grpc_status: Option<u16>,
    /// Called with the body's byte count and gRPC status.
    done: Option<F>,
}

impl<F: FnOnce(u64, Option<u16>)> Counted<F> {
    pub fn new(inner: Body, grpc_status: Option<u16>, done: F) -> Counted<F> {
        Counted {
            inner,
            bytes: 0,
            grpc_status,
            done: Some(done),
        }
    }

    fn finish(&mut self) {
        if let Some(done) = self.done.take() {
            done(self.bytes, self.grpc_status);
        }
    }
}

impl<F: FnOnce(u64, Option<u16>)> Drop for Counted<F> {
    fn drop(&mut self) {
        self.finish();
    }
}

// `done` is never pinned: it is only taken out and called.
impl<F: FnOnce(u64, Option<u16>)> Unpin for Counted<F> {}

impl<F: FnOnce(u64, Option<u16>)> hyper::body::Body for Counted<F> {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                } else if let Some(trailers) = frame.trailers_ref() {
                    this.grpc_status = status_field(trailers).or(this.grpc_status);
                }
            }
            std::task::Poll::Ready(None) => this.finish(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// The `grpc-status` of a gRPC response's headers (a trailers-only response). Responses that
/// are not gRPC are not searched for it: most traffic is not, and the lookup of a custom
/// header name costs more than that of `content-type`.
pub fn grpc_status(headers: &http::HeaderMap) -> Option<u16> {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
        .then(|| status_field(headers))?
}

fn status_field(headers: &http::HeaderMap) -> Option<u16> {
    headers.get(GRPC_STATUS)?.to_str().ok()?.parse().ok()
}

/// Whether a request is gRPC (its replies must then be gRPC too).
pub fn is_grpc(parts: &http::request::Parts) -> bool {
    parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Turns the proxy's own reply to a gRPC request into what a gRPC client expects: HTTP 200,
/// trailers-only, `grpc-status` mapped from the HTTP status as Envoy maps it (503 →
/// UNAVAILABLE, 504 → UNAVAILABLE, 404 → UNIMPLEMENTED, ...). Replies from the app pass.
pub fn grpc_local_reply(resp: Response<Body>) -> Response<Body> {
    let Some(flags) = resp.headers().get(RESPONSE_FLAGS).cloned() else {
        return resp;
    };
    let code: u16 = match resp.status().as_u16() {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502..=504 => 14,
        _ => 2,
    };
    let message = resp
        .status()
        .canonical_reason()
        .unwrap_or("proxy error")
        .to_owned();
    let mut r = Response::new(full(""));
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    h.insert(GRPC_STATUS, http::HeaderValue::from(code));
    if let Ok(v) = http::HeaderValue::from_str(&message) {
        h.insert(GRPC_MESSAGE, v);
    }
    h.insert(RESPONSE_FLAGS, flags);
    r
}

/// A gRPC request's authorization denial: trailers-only, `grpc-status` PERMISSION_DENIED (7),
/// as Envoy's local replies to gRPC requests do.
pub fn grpc_permission_denied() -> Response<Body> {
    let mut r = Response::new(full(""));
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    h.insert(GRPC_STATUS, http::HeaderValue::from(7u16));
    h.insert(
        GRPC_MESSAGE,
        http::HeaderValue::from_static("RBAC: access denied"),
    );
    r
}

/// The request body size when known up front (`content-length` or an exact size hint).
pub fn request_size(parts: &http::request::Parts, body: &impl hyper::body::Body) -> u64 {
    parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .or_else(|| body.size_hint().exact())
        .unwrap_or(0)
}

/// The response flags of a reply: the proxy's own (`x-hypha-response-flags`) or `-`.
pub fn response_flags(resp: &Response<Body>) -> &'static str {
    // Only the proxy's own replies have it.
    let headers = resp.headers();
    match has_rare(headers, &RESPONSE_FLAGS)
        .then(|| headers.get(RESPONSE_FLAGS))
        .flatten()
        .map(http::HeaderValue::as_bytes)
    {
        Some(b"NR") => Flag::NoRoute.as_str(),
        Some(b"NC") => Flag::NoCluster.as_str(),
        Some(b"UH") => Flag::NoHealthyUpstream.as_str(),
        Some(b"UF") => Flag::ConnectFailure.as_str(),
        Some(b"UT") => Flag::Timeout.as_str(),
        Some(b"UR") => Flag::Reset.as_str(),
        Some(b"FI") => Flag::FaultInjected.as_str(),
        Some(b"DC") => Flag::BadRequest.as_str(),
        Some(b"UO") => Flag::Overflow.as_str(),
        _ => "-",
    }
}

/// Wraps a finished response so that `observe(code, flags, response bytes)` runs when its
/// body is done. A small body is already whole in memory (see [`small_body`]) and leaves with
/// the head in one write: it is observed now, without wrapping.
pub fn observed(
    resp: Response<Body>,
    observe: impl FnOnce(Outcome) + Send + Sync + 'static,
) -> Response<Body> {
    let code = resp.status().as_u16();
    let flags = response_flags(&resp);
    let grpc = grpc_status(resp.headers());
    if let Some(bytes) = held_whole(&resp) {
        observe(Outcome {
            code,
            flags,
            grpc_status: grpc,
            bytes,
        });
        return resp;
    }
    resp.map(|b| {
        Counted::new(b, grpc, move |bytes, grpc_status| {
            observe(Outcome {
                code,
                flags,
                grpc_status,
                bytes,
            });
        })
        .boxed()
    })
}

/// How a response ended, for metrics and logs.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    pub code: u16,
    pub flags: &'static str,
    /// From the response headers (trailers-only) or trailers.
    pub grpc_status: Option<u16>,
    /// Response body bytes.
    pub bytes: u64,
}

/// A request's wish to switch protocols: the downstream half of the connection, and its
/// connection's hold.
pub struct Upgrade {
    on: hyper::upgrade::OnUpgrade,
    tunnel: Option<Tunnel>,
}

/// What an upgraded connection keeps of the HTTP/1.1 connection it came from: the serving task
/// (and with it the connection's place under the connection limits and in draining) lasts
/// until the tunnel ends; and the idle timeout it runs under.
// Clone: request extensions must be.
#[derive(Clone)]
pub struct Tunnel {
    _held: tokio::sync::mpsc::Sender<()>,
    idle: std::time::Duration,
}

/// For a request asking to switch protocols (WebSocket and other `Upgrade`s over HTTP/1.1):
/// takes the downstream half out of the request, to be joined with the upstream's half once
/// the upstream agrees.
pub fn take_upgrade(parts: &mut http::request::Parts) -> Option<Upgrade> {
    // The extension first: none on the usual request, and no hash to find that out.
    if parts
        .extensions
        .get::<hyper::upgrade::OnUpgrade>()
        .is_none()
        || !parts.headers.contains_key(http::header::UPGRADE)
    {
        return None;
    }
    let on = parts.extensions.remove::<hyper::upgrade::OnUpgrade>()?;
    Some(Upgrade {
        on,
        tunnel: parts.extensions.remove::<Tunnel>(),
    })
}

/// When the upstream answered `101 Switching Protocols`, splices the two upgraded
/// connections and copies bytes both ways until either side closes, or nothing has moved
/// for the TCP idle timeout.
pub fn splice<B>(downstream: Option<Upgrade>, resp: &mut Response<B>) {
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return;
    }
    let Some(Upgrade { on, tunnel }) = downstream else {
        return;
    };
    let upstream = hyper::upgrade::on(resp);
    tokio::spawn(async move {
        let idle = tunnel
            .as_ref()
            .map_or(crate::limits::Limits::default().tcp_idle_timeout, |t| {
                t.idle
            });
        let (Ok(d), Ok(u)) = tokio::join!(on, upstream) else {
            debug!("upgrade failed on one side");
            return;
        };
        let (mut d, mut u) = (TokioIo::new(d), TokioIo::new(u));
        if let Err(e) = crate::limits::splice(&mut d, &mut u, idle).await {
            debug!(error = %e, "upgraded connection ended");
        }
        drop(tunnel);
    });
}

/// Largest response body read whole before it is passed on.
const SMALL_BODY: u64 = 64 * 1024;

/// Whether a response's body is small enough to read whole first: its length known and at
/// most [`SMALL_BODY`] (most API responses), and the response no protocol switch. The
/// downstream then gets head and body in one write instead of two, and the upstream
/// connection is free for the next request sooner. Larger and streamed bodies (gRPC,
/// chunked, upgrades) pass through as they come.
pub fn small_body<B>(resp: &Response<B>) -> bool {
    resp.status() != StatusCode::SWITCHING_PROTOCOLS
        && resp
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .is_some_and(|n| n <= SMALL_BODY)
}

/// The length of a response body already held whole in memory (see [`small_body`]), from
/// the body itself: no header is read again.
pub fn held_whole<B: hyper::body::Body>(resp: &Response<B>) -> Option<u64> {
    resp.body().size_hint().exact().filter(|&n| n <= SMALL_BODY)
}

/// A response from upstream, its body read whole first when [`small_body`] says so.
pub async fn small_body_whole(resp: Response<Incoming>) -> Result<Response<Body>, Flag> {
    if !small_body(&resp) {
        return Ok(resp.map(incoming));
    }
    let (parts, body) = resp.into_parts();
    match body.collect().await {
        Ok(collected) => Ok(Response::from_parts(parts, full(collected.to_bytes()))),
        Err(e) => {
            debug!(error = %e, "upstream reset while sending the response body");
            Err(Flag::Reset)
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    /// What `starts_with_h2_preface` says of a client that writes `parts`, 20 ms apart.
    async fn sniff(parts: &[&'static [u8]]) -> bool {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let parts = parts.to_vec();
        let client = tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            for p in parts {
                s.write_all(p).await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            // Then closes: what was written stays readable.
        });
        let (server, _) = listener.accept().await.unwrap();
        let h2 = starts_with_h2_preface(&server, PREFACE_WAIT).await.unwrap();
        client.await.unwrap();
        h2
    }

    /// A client that sends part of the preface and closes (or stalls) is let go once the
    /// patience runs out, not peeked at forever.
    #[tokio::test]
    async fn a_client_that_never_finishes_the_h2_preface_is_let_go() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"PRI * HTTP").await.unwrap();
        });
        let (server, _) = listener.accept().await.unwrap();
        client.await.unwrap();
        let patience = std::time::Duration::from_millis(300);
        let started = std::time::Instant::now();
        let err = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            starts_with_h2_preface(&server, patience),
        )
        .await
        .expect("still peeking after 10 s")
        .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= patience);
    }

    /// Sends `head` then each of `chunks` (20 ms apart) as one HTTP/1.1 request to a server
    /// that turns the body into a [`RequestBody`]; returns whether it was held whole and the
    /// bytes it carried.
    async fn request_body(head: &'static str, chunks: &[&'static str]) -> (bool, Vec<u8>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let chunks = chunks.to_vec();
        tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(head.as_bytes()).await.unwrap();
            for c in chunks {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                s.write_all(c.as_bytes()).await.unwrap();
            }
            let mut sink = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut s, &mut sink).await;
        });
        let (stream, _) = listener.accept().await.unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let tx = std::sync::Mutex::new(Some(tx));
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let tx = tx.lock().unwrap().take();
            async move {
                let mut body = RequestBody::from_incoming(req.into_body()).await;
                let whole = body.replayable();
                let bytes = body.take().collect().await.unwrap().to_bytes().to_vec();
                if let Some(tx) = tx {
                    let _ = tx.send((whole, bytes));
                }
                Ok::<_, Infallible>(Response::new(full("")))
            }
        });
        tokio::spawn(
            hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service),
        );
        rx.await.unwrap()
    }

    #[tokio::test]
    async fn request_bodies_are_held_whole_when_small_and_known_or_already_complete() {
        // Known length, small: read whole even though it comes in pieces.
        let (whole, bytes) = request_body(
            "POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 10\r\n\r\n01234",
            &["56789"],
        )
        .await;
        assert!(whole);
        assert_eq!(bytes, b"0123456789");
        // Chunked, still arriving when routed: streams, nothing lost.
        let (whole, bytes) = request_body(
            "POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
            &["6\r\n world\r\n", "0\r\n\r\n"],
        )
        .await;
        assert!(!whole);
        assert_eq!(bytes, b"hello world");
        // Chunked but already complete: held whole.
        let (whole, bytes) = request_body(
            "POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            &[],
        )
        .await;
        assert!(whole);
        assert_eq!(bytes, b"hello");
    }

    #[tokio::test]
    async fn the_http2_preface_is_told_from_http1_without_consuming_it() {
        assert!(sniff(&[H2_PREFACE]).await);
        assert!(sniff(&[b"PRI * HT", b"TP/2.0\r\n\r\nSM\r\n\r\n"]).await);
        assert!(!sniff(&[b"GET / HTTP/1.1\r\nhost: a\r\n\r\n"]).await);
        assert!(!sniff(&[b"PUT / HTTP/1.1\r\n"]).await);
        assert!(!sniff(&[b"PRI", b" / HTTP/1.1\r\n\r\n"]).await);
        assert!(!sniff(&[]).await); // closed before a byte
    }

    /// `strip_hop_by_hop` on a message with `headers`, what is left (names and values, sorted).
    fn stripped(headers: &[(&str, &str)], upgrading: bool) -> Vec<(String, String)> {
        let mut map = http::HeaderMap::new();
        for (n, v) in headers {
            map.append(
                http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        strip_hop_by_hop(&mut map, upgrading);
        let mut left: Vec<(String, String)> = map
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
            .collect();
        left.sort();
        left
    }

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn hop_by_hop_headers_stay_on_their_hop() {
        // Nothing to do: left as it is.
        let plain = [("accept", "*/*"), ("host", "a"), ("x-b", "1")];
        assert_eq!(stripped(&plain, false), pairs(&plain));
        // The fixed names, and what `connection` lists (any case, with `close`).
        let hop = [
            ("connection", "close, X-Secret ,keep-alive"),
            ("connection", "x-other"),
            ("x-secret", "1"),
            ("x-other", "2"),
            ("x-kept", "3"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("te", "gzip"),
        ];
        assert_eq!(stripped(&hop, false), pairs(&[("x-kept", "3")]));
        // `te: trailers` goes on (gRPC needs it), alone; unless `connection` names `te`.
        let te = [("te", "trailers, gzip"), ("x-a", "1")];
        assert_eq!(
            stripped(&te, false),
            pairs(&[("te", "trailers"), ("x-a", "1")])
        );
        let te_listed = [("te", "trailers"), ("connection", "te")];
        assert_eq!(stripped(&te_listed, false), pairs(&[]));
        // An upgrade keeps `upgrade` and says `connection: upgrade`.
        let up = [
            ("connection", "Upgrade, x-secret"),
            ("upgrade", "websocket"),
            ("x-secret", "1"),
            ("keep-alive", "1"),
        ];
        assert_eq!(
            stripped(&up, true),
            pairs(&[("connection", "upgrade"), ("upgrade", "websocket")])
        );
    }
}
