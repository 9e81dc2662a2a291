//! HTTP clients for the demo: one that reaches the mesh through a sidecar's HTTP proxy
//! listener the way `HTTP_PROXY` clients do (absolute-form request target, pooled keep-alive
//! connections) or, in a pod with transparent capture, straight to the service's name as any
//! unmodified client does; and a plain one for admin endpoints. What a pod serves on its
//! loopback only is reached from inside its network namespace ([`Reach`]).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

/// A response read to the end.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Why a request got no reply.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad request: {0}")]
    Request(#[from] http::Error),
    #[error("{0}")]
    Send(#[from] hyper_util::client::legacy::Error),
    #[error("reading the body: {0}")]
    Body(#[from] hyper::Error),
    #[error("no reply within {0:?}")]
    Timeout(Duration),
}

/// Where a demo process listens, and, for what a pod serves on its loopback only (a sidecar's
/// admin, the traffic client's proxy listener), the pod's network namespace: the node
/// connects from inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reach {
    pub addr: SocketAddr,
    pub netns: Option<String>,
}

impl Reach {
    /// An address the node reaches as it is.
    pub fn host(addr: SocketAddr) -> Reach {
        Reach { addr, netns: None }
    }

    pub async fn connect(&self) -> io::Result<TcpStream> {
        let Some(netns) = &self.netns else {
            return TcpStream::connect(self.addr).await;
        };
        let (netns, addr) = (netns.clone(), self.addr);
        let stream = tokio::task::spawn_blocking(move || {
            hypha_pod::connect_in(&netns, addr, Duration::from_secs(5))
        })
        .await
        .map_err(io::Error::other)??;
        stream.set_nonblocking(true)?;
        TcpStream::from_std(stream)
    }

    /// `http://<addr><path>`, which a person fetches with [`Reach::curl`].
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The command a person types on the node to fetch `path`.
    pub fn curl(&self, path: &str) -> String {
        match &self.netns {
            None => format!("curl {}", self.url(path)),
            Some(ns) => format!("ip netns exec {ns} curl {}", self.url(path)),
        }
    }
}

impl std::fmt::Display for Reach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.netns {
            None => write!(f, "{}", self.addr),
            Some(ns) => write!(f, "{} in {ns}", self.addr),
        }
    }
}

/// With a proxy: connects every request to that HTTP proxy, whatever its URI says, and marks
/// the connection as proxied so hyper sends absolute-form targets. Without: connects to the
/// URI's host and port (names resolved by the system, each address tried in turn). With
/// `direct`, every request goes to that address as it is (admin endpoints in a pod).
#[derive(Clone)]
pub struct ViaProxy {
    proxy: Option<Reach>,
    direct: Option<Reach>,
}

pub struct ProxiedStream {
    io: TokioIo<TcpStream>,
    proxied: bool,
}

impl tonic::codegen::Service<Uri> for ViaProxy {
    type Response = ProxiedStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<ProxiedStream>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let (proxy, direct) = (self.proxy.clone(), self.direct.clone());
        Box::pin(async move {
            let proxied = proxy.is_some();
            let stream = match proxy.or(direct) {
                Some(at) => at.connect().await?,
                None => {
                    let host = uri.host().ok_or_else(|| {
                        io::Error::new(io::ErrorKind::InvalidInput, format!("no host in {uri}"))
                    })?;
                    let host = host.trim_start_matches('[').trim_end_matches(']');
                    TcpStream::connect((host, uri.port_u16().unwrap_or(80))).await?
                }
            };
            stream.set_nodelay(true)?;
            Ok(ProxiedStream {
                io: TokioIo::new(stream),
                proxied,
            })
        })
    }
}

impl Connection for ProxiedStream {
    fn connected(&self) -> Connected {
        Connected::new().proxy(self.proxied)
    }
}

impl hyper::rt::Read for ProxiedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for ProxiedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

type EmptyBody = Empty<Bytes>;

/// GETs through a sidecar's HTTP proxy listener, or straight to the URL (captured).
#[derive(Clone)]
pub struct ProxyClient {
    client: Client<ViaProxy, EmptyBody>,
    timeout: Duration,
}

impl ProxyClient {
    pub fn new(proxy: Reach, timeout: Duration) -> ProxyClient {
        ProxyClient::build(Some(proxy), timeout)
    }

    /// Through `proxy`, or without one straight to each URL's host.
    pub fn with(proxy: Option<SocketAddr>, timeout: Duration) -> ProxyClient {
        ProxyClient::build(proxy.map(Reach::host), timeout)
    }

    fn build(proxy: Option<Reach>, timeout: Duration) -> ProxyClient {
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(ViaProxy {
                proxy,
                direct: None,
            });
        ProxyClient { client, timeout }
    }

    /// `GET url` with `headers`, the body read to the end.
    pub async fn get(&self, url: &str, headers: &HeaderMap) -> Result<Reply, ClientError> {
        let mut req = Request::get(url).body(EmptyBody::new())?;
        req.headers_mut().extend(headers.clone());
        send(&self.client, req, self.timeout).await
    }
}

/// GETs a plain URL (admin endpoints).
pub async fn get(url: &str, timeout: Duration) -> Result<Reply, ClientError> {
    let client: Client<HttpConnector, EmptyBody> =
        Client::builder(TokioExecutor::new()).build_http();
    let req = Request::get(url).body(EmptyBody::new())?;
    send(&client, req, timeout).await
}

/// GETs `path` at `at`, from inside its pod where it has one (admin endpoints).
pub async fn get_at(at: &Reach, path: &str, timeout: Duration) -> Result<Reply, ClientError> {
    if at.netns.is_none() {
        return get(&at.url(path), timeout).await;
    }
    let client: Client<ViaProxy, EmptyBody> =
        Client::builder(TokioExecutor::new()).build(ViaProxy {
            proxy: None,
            direct: Some(at.clone()),
        });
    let req = Request::get(at.url(path)).body(EmptyBody::new())?;
    send(&client, req, timeout).await
}

async fn send<C>(
    client: &Client<C, EmptyBody>,
    req: Request<EmptyBody>,
    timeout: Duration,
) -> Result<Reply, ClientError>
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let exchange = async {
        let resp = client.request(req).await?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or(Err(ClientError::Timeout(timeout)))
}
