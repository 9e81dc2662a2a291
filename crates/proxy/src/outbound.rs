//! Outbound: the app's requests to other services. Without transparent capture the app reaches
//! the mesh explicitly, in one of two ways a user can run without root:
//!
//! - **HTTP proxy** (`HTTP_PROXY=http://127.0.0.1:15080`): requests in absolute form or with a
//!   `Host` header; the port of the authority picks the route table (`0.0.0.0_<port>`'s RDS).
//! - **A local port per service port** (`--service reviews.bookinfo.svc.cluster.local:9080=127.0.0.1:19080`):
//!   everything arriving there is for that service, whatever the `Host` header says.
//!
//! Then: route → fault → rewrites and header operations → cluster → upstream.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::header::HOST;
use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::http::{self as h, Body, Flag};
use crate::model::{
    Action, Config, Fault, Forward, HashKey, ListenAddr, Redirect, Route, TcpRoutes,
    WeightedCluster,
};
use crate::request::{self, View};
use crate::router;
use crate::telemetry::{Reporter, Telemetry};
use crate::upstream::{Original, Plan, Upstreams};

/// What an outbound listener is for.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Route by the request's authority.
    HttpProxy,
    /// Every request is for this `host:port` (kept as the `Host` value requests get).
    Service { authority: HeaderValue, port: u16 },
    /// A captured connection to `dst` (its original destination): its port picks the route
    /// table, the request's authority the virtual host; what goes to `PassthroughCluster`
    /// goes to `dst`.
    Captured { dst: SocketAddr },
}

impl Mode {
    /// A service-port mode for `authority` (`host:port`, lower-cased here).
    pub fn service(authority: &str, port: u16) -> Option<Mode> {
        let authority = HeaderValue::from_str(&authority.to_ascii_lowercase()).ok()?;
        Some(Mode::Service { authority, port })
    }
}

/// The shared state of the outbound side.
#[derive(Clone)]
pub struct Outbound {
    pub config: Arc<ArcSwap<Config>>,
    pub upstreams: Upstreams,
    pub telemetry: Arc<Telemetry>,
}

impl Outbound {
    pub async fn handle(
        &self,
        mode: &Mode,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<Body> {
        let (mut parts, body) = req.into_parts();
        // Sanitized: only the server's sidecar says who the client is.
        h::remove_rare(&mut parts.headers, &h::XFCC);
        if !h::has_rare(&parts.headers, &REQUEST_ID) {
            if let Some(v) = request_id() {
                parts.headers.insert(REQUEST_ID, v);
            }
        }
        let request = self
            .telemetry
            .begin(&parts, h::request_size(&parts, &body), peer);
        let grpc = h::is_grpc(&parts);
        let (mut resp, cluster) = self
            .dispatch(mode, Request::from_parts(parts, body), peer)
            .await;
        if grpc {
            resp = h::grpc_local_reply(resp);
        }
        let telemetry = self.telemetry.clone();
        h::observed(resp, move |out| {
            telemetry.end(
                request,
                Reporter::Source,
                cluster.as_deref().unwrap_or(""),
                out,
                None,
            );
        })
    }

    /// The response, and the cluster the request went to, if it got that far.
    async fn dispatch(
        &self,
        mode: &Mode,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> (Response<Body>, Option<Arc<str>>) {
        let none = || None;
        let cfg = self.config.load_full();
        let (mut parts, body) = req.into_parts();
        let (authority, port) = match mode {
            Mode::Service { authority, port } => (authority.clone(), *port),
            Mode::HttpProxy => match request_authority(&parts) {
                Some(a) => a,
                None => return (h::local_reply(Flag::BadRequest), none()),
            },
            Mode::Captured { dst } => match request_authority(&parts) {
                Some((a, _)) => (a, dst.port()),
                None => return (h::local_reply(Flag::BadRequest), none()),
            },
        };
        let host = authority;
        let authority = host.to_str().unwrap_or_default();
        // Absolute-form targets become origin-form for the upstream.
        if parts.uri.scheme().is_some() {
            let pq = parts
                .uri
                .path_and_query()
                .map_or("/", |pq| pq.as_str())
                .to_owned();
            match pq.parse() {
                Ok(uri) => parts.uri = uri,
                Err(_) => return (h::local_reply(Flag::BadRequest), none()),
            }
        }
        let Some((table, paths)) = cfg.http_by_port.get(&port) else {
            return (h::local_reply(Flag::NoRoute), none());
        };
        if request::normalize(&mut parts, *paths).is_err() {
            return (h::local_reply(Flag::BadRequest), none());
        }
        let view = View::new(&parts, authority);
        let Some(route) = router::select(&cfg, table, &view) else {
            return (h::local_reply(Flag::NoRoute), none());
        };
        let route: &Route = route;
        match &route.action {
            Action::Direct { status, body } => {
                let mut r = Response::new(h::full(body.clone()));
                *r.status_mut() = StatusCode::from_u16(*status).unwrap_or(StatusCode::OK);
                router::apply(r.headers_mut(), &route.headers, false);
                (r, none())
            }
            Action::Redirect(rd) => (redirect(rd, authority, &parts), none()),
            Action::Forward(f) => {
                let wc = router::pick_cluster(f);
                if let Some(reply) = fault(route.fault.as_ref()).await {
                    return (reply, Some(wc.name.clone()));
                }
                let hash = hash_key(&f.hash, &parts, peer);
                let resp = self
                    .forward(&cfg, mode, route, f, wc, parts, body, &host, hash)
                    .await;
                (resp, Some(wc.name.clone()))
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &self,
        cfg: &Config,
        mode: &Mode,
        route: &Route,
        f: &Forward,
        wc: &WeightedCluster,
        mut parts: http::request::Parts,
        body: Incoming,
        host: &HeaderValue,
        hash: Option<u64>,
    ) -> Response<Body> {
        if let Some(pq) = router::rewrite_path(f, &parts.uri) {
            match pq.parse() {
                Ok(uri) => parts.uri = uri,
                Err(_) => return h::local_reply(Flag::BadRequest),
            }
        }
        let authority = host.to_str().unwrap_or_default();
        match &f.host_rewrite {
            Some(rewrite) => {
                if let Ok(v) = HeaderValue::from_str(rewrite) {
                    parts.headers.insert(HOST, v);
                }
            }
            None => {
                parts.headers.insert(HOST, host.clone());
            }
        }
        router::apply(&mut parts.headers, &route.headers, true);
        router::apply(&mut parts.headers, &wc.headers, true);
        let upgrade = h::take_upgrade(&mut parts);
        let plan = Plan {
            cluster: &wc.name,
            original: Some(match mode {
                Mode::Captured { dst } => Original::Address(*dst),
                _ => Original::Authority(authority),
            }),
            timeout: f.timeout,
            retry: f.retry.as_ref(),
            hash,
        };
        match self
            .upstreams
            .send(cfg, &plan, parts, h::RequestBody::from_incoming(body).await)
            .await
        {
            Ok(mut resp) => {
                h::splice(upgrade, &mut resp);
                let (mut rp, rb) = resp.into_parts();
                router::apply(&mut rp.headers, &route.headers, false);
                router::apply(&mut rp.headers, &wc.headers, false);
                Response::from_parts(rp, rb)
            }
            Err(flag) => h::local_reply(flag),
        }
    }
}

const REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// A random UUID (version 4) for `x-request-id`, as Envoy generates for requests without one,
/// formatted on the stack.
fn request_id() -> Option<HeaderValue> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut v = (u128::from(crate::rand::next()) << 64) | u128::from(crate::rand::next());
    v = (v & !(0xf << 76)) | (0x4 << 76); // version 4
    v = (v & !(0x3 << 62)) | (0x2 << 62); // RFC 4122 variant
    let mut out = [0u8; 36];
    let mut j = 0;
    for (i, b) in v.to_be_bytes().into_iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out[j] = b'-';
            j += 1;
        }
        out[j] = HEX[usize::from(b >> 4)];
        out[j + 1] = HEX[usize::from(b & 0xf)];
        j += 2;
    }
    HeaderValue::from_bytes(&out).ok()
}

/// The consistent-hash key of a request: the first hash policy whose input the request has.
fn hash_key(keys: &[HashKey], parts: &http::request::Parts, peer: SocketAddr) -> Option<u64> {
    let fnv = |bytes: &[u8]| {
        bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    };
    keys.iter().find_map(|k| match k {
        HashKey::Header(name) => parts.headers.get(name).map(|v| fnv(v.as_bytes())),
        HashKey::Cookie(name) => parts
            .headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|c| {
                let (k, v) = c.trim().split_once('=')?;
                (k == name).then(|| fnv(v.as_bytes()))
            }),
        HashKey::SourceIp => Some(fnv(peer.ip().to_string().as_bytes())),
        HashKey::Query(name) => {
            hypha_matcher::query_param(parts.uri.query().unwrap_or("").as_bytes(), name).map(fnv)
        }
    })
}

/// The authority and port a request is for: the absolute-form target, else `Host`;
/// lower-cased, as the `Host` value the upstream gets (the request's own when it already was).
fn request_authority(parts: &http::request::Parts) -> Option<(HeaderValue, u16)> {
    let (text, value) = match parts.uri.authority() {
        Some(a) => (a.as_str(), None),
        None => {
            let v = parts.headers.get(HOST)?;
            (v.to_str().ok()?, Some(v))
        }
    };
    let value = match value {
        Some(v) if !text.bytes().any(|b| b.is_ascii_uppercase()) => v.clone(),
        _ => HeaderValue::from_str(&text.to_ascii_lowercase()).ok()?,
    };
    let authority = value.to_str().ok()?;
    let port = match authority.rsplit_once(':') {
        Some((host, p)) if !host.ends_with(':') && (!host.contains(':') || host.ends_with(']')) => {
            p.parse().ok()?
        }
        _ => 80,
    };
    Some((value, port))
}

fn redirect(rd: &Redirect, authority: &str, parts: &http::request::Parts) -> Response<Body> {
    let scheme = rd.scheme.as_deref().unwrap_or("http");
    let host = match (&rd.host, rd.port) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.clone(),
        (None, Some(p)) => {
            let bare = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
            format!("{bare}:{p}")
        }
        (None, None) => authority.to_owned(),
    };
    let path = rd.path.clone().unwrap_or_else(|| {
        parts
            .uri
            .path_and_query()
            .map_or("/".into(), |pq| pq.as_str().to_owned())
    });
    let mut r = Response::new(h::full(""));
    *r.status_mut() = StatusCode::from_u16(rd.status).unwrap_or(StatusCode::MOVED_PERMANENTLY);
    if let Ok(v) = HeaderValue::from_str(&format!("{scheme}://{host}{path}")) {
        r.headers_mut().insert(http::header::LOCATION, v);
    }
    r
}

/// Applies a route's fault: maybe a delay, then maybe an abort reply.
async fn fault(f: Option<&Fault>) -> Option<Response<Body>> {
    let f = f?;
    if let Some((delay, millionths)) = f.delay {
        if crate::rand::below(1_000_000) < u64::from(millionths) {
            tokio::time::sleep(delay).await;
        }
    }
    if let Some((status, millionths)) = f.abort {
        if crate::rand::below(1_000_000) < u64::from(millionths) {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            return Some(h::local_reply_with(
                status,
                Flag::FaultInjected,
                "fault filter abort",
            ));
        }
    }
    None
}

/// Serves the outbound side on `listener` in `mode` until the task is dropped. A service
/// port listener for a service whose port is not HTTP proxies TCP bytes to its cluster.
pub async fn serve(
    outbound: Outbound,
    listener: tokio::net::TcpListener,
    mode: Mode,
    drain: h::Drain,
) {
    // One allocation per listener: requests clone these `Arc`s, not the state they hold.
    let (outbound, mode) = (Arc::new(outbound), Arc::new(mode));
    while let Some((stream, peer, open)) = h::accept(&listener, &drain).await {
        let target = match &*mode {
            Mode::Service { authority, port } => {
                let cfg = outbound.config.load();
                if cfg.http_by_port.contains_key(port) {
                    Target::Http(mode.clone())
                } else {
                    let authority = authority.to_str().unwrap_or_default();
                    let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
                    let service = format!("outbound|{port}||{host}");
                    // Through the service's TCP routes (a VirtualService may split or move
                    // them), as a connection to its address would go.
                    match cfg.tcp_by_service.get(&service) {
                        Some(routes) => tcp_target(routes.clone()),
                        None => Target::Tcp(service),
                    }
                }
            }
            _ => Target::Http(mode.clone()),
        };
        spawn(&outbound, stream, peer, &drain, target, open);
    }
}

/// Where a connection through `routes` goes: its cluster, or the one the ClientHello picks.
fn tcp_target(routes: Arc<TcpRoutes>) -> Target {
    match (&routes.names, &routes.default) {
        (None, Some(clusters)) => Target::Tcp(clusters.pick().to_owned()),
        _ => Target::ByName(routes),
    }
}

/// Where an accepted outbound connection goes.
enum Target {
    /// TCP bytes to this cluster.
    Tcp(String),
    /// TCP bytes to the cluster the ClientHello's server name picks.
    ByName(Arc<TcpRoutes>),
    /// HTTP, routed in this mode.
    Http(Arc<Mode>),
    /// TCP bytes straight to this address (a captured connection the mesh does not know).
    Passthrough(SocketAddr),
}

/// Serves one accepted connection on its own task, counted by the drain.
fn spawn(
    outbound: &Arc<Outbound>,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    drain: &h::Drain,
    target: Target,
    open: h::Open,
) {
    let o = outbound.clone();
    match target {
        Target::Http(mode) => {
            let serving = h::serve_connection(stream, peer, drain.clone(), move |req, peer| {
                let (o, m) = (o.clone(), mode.clone());
                async move { o.handle(&m, req, peer).await }
            });
            tokio::spawn(async move {
                let _open = open;
                serving.await;
            });
        }
        Target::Tcp(cluster) => {
            tokio::spawn(async move {
                let _open = open;
                tcp_proxy(o, cluster, stream, &[]).await;
            });
        }
        Target::ByName(routes) => {
            tokio::spawn(async move {
                let _open = open;
                let mut stream = stream;
                let (hello, name) = client_hello(&mut stream).await;
                match routes.pick(name.as_deref()) {
                    Some(cluster) => tcp_proxy(o, cluster.to_owned(), stream, &hello).await,
                    None => {
                        o.telemetry.metrics.no_filter_chain();
                        tracing::debug!(%peer, server_name = name, "no filter chain takes this server name");
                    }
                }
            });
        }
        Target::Passthrough(dst) => {
            tokio::spawn(async move {
                let _open = open;
                passthrough(&o, stream, dst).await;
            });
        }
    }
}

/// Serves the captured outbound listener (15001): each connection goes where its original
/// destination says, as Envoy's `virtualOutbound` hands it to the listener for that address:
/// a TCP service (by VIP and port, or by port) to its cluster, an HTTP port through its route
/// table, anything else straight to the original destination (Istio's `ALLOW_ANY`
/// passthrough). A connection made to the listener itself is closed.
pub async fn serve_captured(
    outbound: Outbound,
    listener: tokio::net::TcpListener,
    drain: h::Drain,
) {
    let outbound = Arc::new(outbound);
    let own = listener.local_addr().ok();
    while let Some((stream, peer, open)) = h::accept(&listener, &drain).await {
        let dst = match crate::capture::original_dst(&stream) {
            Ok(dst) => dst,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "captured connection without an original destination");
                continue;
            }
        };
        if Some(dst.port()) == own.map(|a| a.port())
            && dst.ip() == stream.local_addr().map_or(dst.ip(), |a| a.ip())
        {
            tracing::debug!(%peer, "connection to the capture port itself refused");
            continue;
        }
        let cfg = outbound.config.load();
        let (ip, port) = (dst.ip().to_canonical(), dst.port());
        let tcp = cfg
            .tcp
            .get(&ListenAddr::Vip(ip, port))
            .or_else(|| cfg.tcp.get(&ListenAddr::AnyOn(port)))
            .cloned();
        let http = cfg.http_by_port.contains_key(&port);
        drop(cfg);
        let target = match tcp {
            Some(routes) => tcp_target(routes),
            None if http => Target::Http(Arc::new(Mode::Captured { dst })),
            None => Target::Passthrough(dst),
        };
        spawn(&outbound, stream, peer, &drain, target, open);
    }
}

/// A captured connection for a destination the mesh does not know: bytes straight to it.
async fn passthrough(o: &Outbound, mut downstream: tokio::net::TcpStream, dst: SocketAddr) {
    let mut upstream = match tokio::net::TcpStream::connect(dst).await {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(%dst, error = %e, "passthrough: cannot connect");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let metrics = &o.telemetry.metrics;
    metrics.tcp_opened();
    let idle = o.upstreams.tcp_idle_timeout;
    match crate::limits::splice(&mut downstream, &mut upstream, idle).await {
        Ok((sent, received)) => metrics.tcp_closed(sent, received),
        Err(_) => metrics.tcp_closed(0, 0),
    }
}

/// How long a connection told apart by server name may take to send its ClientHello. Envoy's
/// listener filters wait 15 s by default and Istio then goes on without them; after this the
/// connection goes to the chain without names, if the listener has one.
const HELLO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads the start of a connection until it is a whole ClientHello, or cannot be one, or
/// [`HELLO_TIMEOUT`] passes: the bytes read (to send on first) and the server name.
async fn client_hello(stream: &mut tokio::net::TcpStream) -> (Vec<u8>, Option<String>) {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::with_capacity(2048);
    let read = async {
        loop {
            match hypha_sni::parse(&buf) {
                hypha_sni::Hello::Partial => {}
                hypha_sni::Hello::NotTls => return None,
                hypha_sni::Hello::Complete(name) => return name,
            }
            buf.reserve(2048);
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    };
    let name = tokio::time::timeout(HELLO_TIMEOUT, read)
        .await
        .ok()
        .flatten();
    (buf, name)
}

/// Proxies `downstream` to a connection to `cluster`, sending `first` (bytes already read
/// from the downstream) before anything else.
async fn tcp_proxy(
    o: Arc<Outbound>,
    cluster: String,
    mut downstream: tokio::net::TcpStream,
    first: &[u8],
) {
    use tokio::io::AsyncWriteExt;
    let cfg = o.config.load_full();
    let (upstream, _slot) = match o.upstreams.connect_tcp(&cfg, &cluster).await {
        Ok(u) => u,
        Err(flag) => {
            tracing::debug!(cluster, flag = flag.as_str(), "TCP proxy: no upstream");
            return;
        }
    };
    let metrics = &o.telemetry.metrics;
    metrics.tcp_opened();
    let sent_first = first.len() as u64;
    let idle = o.upstreams.tcp_idle_timeout;
    let copied = match upstream {
        crate::upstream::TcpUpstream::Plain(mut u) => match u.write_all(first).await {
            Ok(()) => crate::limits::splice(&mut downstream, &mut u, idle).await,
            Err(e) => Err(e),
        },
        crate::upstream::TcpUpstream::Tls(mut u) => match u.write_all(first).await {
            Ok(()) => crate::limits::splice(&mut downstream, &mut *u, idle).await,
            Err(e) => Err(e),
        },
    };
    match copied {
        // From the app (sent to the peer), and back.
        Ok((sent, received)) => metrics.tcp_closed(sent_first + sent, received),
        Err(e) => {
            metrics.tcp_closed(0, 0);
            tracing::debug!(cluster, error = %e, "TCP proxy connection ended");
        }
    }
}
