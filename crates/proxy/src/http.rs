//! HTTP plumbing shared by both directions: the body type, serving a listener with HTTP/1.1
//! and HTTP/2 (prior knowledge) on the same port, the request view the matcher reads, and the
//! local replies the proxy itself sends (no route, no healthy upstream, ...).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

/// Request and response bodies as they flow through the proxy.
pub type Body = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

/// A complete body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

pub fn incoming(body: Incoming) -> Body {
    body.boxed()
}

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
        }
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
        "x-hypha-response-flags",
        http::HeaderValue::from_static(flag.as_str()),
    );
    r
}

/// Accepts connections on `listener` and serves each with `handle` (HTTP/1.1, or HTTP/2 when
/// the client starts with the HTTP/2 preface), until the task is dropped.
pub async fn serve<H, F>(listener: TcpListener, handle: H)
where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    loop {
        let (stream, peer) = accept(&listener).await;
        tokio::spawn(serve_connection(stream, peer, handle.clone()));
    }
}

/// The next connection; accept errors (out of descriptors and the like) back off instead of
/// spinning.
pub async fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                return (stream, peer);
            }
            Err(e) => {
                debug!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    }
}

/// Serves one downstream connection with `handle`.
pub async fn serve_connection<H, F>(stream: TcpStream, peer: SocketAddr, handle: H)
where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let response = handle(req, peer);
        async move { Ok::<_, Infallible>(response.await) }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    if let Err(e) = builder
        .serve_connection_with_upgrades(TokioIo::new(stream), service)
        .await
    {
        debug!(%peer, error = %e, "downstream connection ended with an error");
    }
}

/// The matcher's view of a request: borrowed from the request head, nothing allocated.
pub struct View<'a> {
    pub parts: &'a http::request::Parts,
    pub authority: &'a str,
}

impl hypha_matcher::Request for View<'_> {
    fn path(&self) -> &[u8] {
        self.parts.uri.path().as_bytes()
    }
    fn authority(&self) -> &[u8] {
        self.authority.as_bytes()
    }
    fn method(&self) -> &[u8] {
        self.parts.method.as_str().as_bytes()
    }
    fn scheme(&self) -> &[u8] {
        b"http"
    }
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.parts
            .headers
            .get(name)
            .map(http::HeaderValue::as_bytes)
    }
    fn query(&self, name: &str) -> Option<&[u8]> {
        hypha_matcher::query_param(self.parts.uri.query().unwrap_or("").as_bytes(), name)
    }
}
