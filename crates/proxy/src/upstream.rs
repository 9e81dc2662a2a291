//! Sending a request to a cluster: endpoint choice, pooled keep-alive connections (HTTP/1.1,
//! or HTTP/2 multiplexed where the cluster says the upstream speaks it), every address of a
//! dual-stack endpoint tried in turn, per-try and route timeouts, and retries with jittered
//! exponential backoff.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::request::Parts;
use http::{Request, Response, Uri};
use http_body_util::BodyExt as _;

use crate::http::{Body, Flag, RequestBody};
use crate::model::{
    now_nanos, ClusterKind, ClusterRuntime, Config, EndpointSet, EndpointState, Lb, OutlierPolicy,
    RetryPolicy, UpstreamTls,
};

/// Connection pools to upstreams, shared by every config generation so a config change does
/// not drop established connections.
#[derive(Clone)]
pub struct Upstreams {
    /// The workload certificate, for clusters that speak mutual TLS.
    pub identity: Option<hypha_identity::Store>,
    /// Proxied TCP connections idle this long are closed.
    pub tcp_idle_timeout: Duration,
}

impl Default for Upstreams {
    fn default() -> Self {
        Upstreams {
            identity: None,
            tcp_idle_timeout: crate::limits::Limits::default().tcp_idle_timeout,
        }
    }
}

/// Where a request for `PassthroughCluster` goes.
#[derive(Debug, Clone, Copy)]
pub enum Original<'a> {
    /// The authority it names (HTTP proxy mode: the client asked for that host).
    Authority(&'a str),
    /// The address the connection was going to (captured traffic): never where its `Host`
    /// header points, which the client may set to anything.
    Address(SocketAddr),
}

/// How a request goes out: the cluster, the route's timeout and retry policy.
pub struct Plan<'a> {
    pub cluster: &'a str,
    /// For `PassthroughCluster`: where the request was going.
    pub original: Option<Original<'a>>,
    pub timeout: Option<Duration>,
    pub retry: Option<&'a RetryPolicy>,
    /// The consistent-hash key, when the route has a hash policy and the request its input.
    pub hash: Option<u64>,
}

impl Upstreams {
    /// Sends the request (origin-form URI in `parts`) per `plan`. A body held whole can be
    /// sent by every attempt; a streaming one only by the first, so such a request is not
    /// retried (its bytes are gone), as Envoy does beyond its buffer limit.
    pub async fn send(
        &self,
        cfg: &Config,
        plan: &Plan<'_>,
        mut parts: Parts,
        mut body: RequestBody,
    ) -> Result<Response<Body>, Flag> {
        strip_request(&mut parts);
        let Some(cluster) = cfg.clusters.get(plan.cluster) else {
            return Err(Flag::NoCluster);
        };
        let set = cfg.endpoint_sets.get(plan.cluster);
        // Envoy's route timeout spans the whole response, body included.
        let deadline = plan.timeout.map(|t| tokio::time::Instant::now() + t);
        // The circuit breaker: requests in flight against the cluster's limits.
        let in_flight = match set {
            Some(set) => {
                let rt = &set.runtime;
                let limit = cluster.limits.concurrency(cluster.http2);
                if rt.active.fetch_add(1, Ordering::AcqRel) >= limit {
                    rt.active.fetch_sub(1, Ordering::AcqRel);
                    rt.overflows.fetch_add(1, Ordering::Relaxed);
                    return Err(Flag::Overflow);
                }
                Some(Decrement(&rt.active))
            }
            None => None,
        };
        let settings = crate::pool::Settings::of(cluster, set.map(|s| &s.runtime));
        let attempt_all = async {
            let h2 = cluster.http2;
            let replayable = body.replayable();
            let retry = plan.retry.filter(|_| replayable);
            let attempts = 1 + retry.map_or(0, |r| r.attempts);
            let mut last = Err(Flag::NoHealthyUpstream);
            let mut tried = [usize::MAX; 4];
            for attempt in 0..attempts {
                // The retry budget: retries in flight per cluster (`max_retries`).
                let _retrying = if attempt > 0 {
                    let Some(set) = set else { break };
                    let retries = &set.runtime.retries;
                    if retries.fetch_add(1, Ordering::AcqRel)
                        >= u64::from(cluster.limits.max_retries)
                    {
                        retries.fetch_sub(1, Ordering::AcqRel);
                        break;
                    }
                    tokio::time::sleep(backoff(retry, attempt)).await;
                    Some(Decrement(retries))
                } else {
                    None
                };
                let (targets, state, istio): (Cow<'_, [SocketAddr]>, _, _) =
                    match (&cluster.kind, set) {
                        (ClusterKind::OriginalDst, _) => {
                            (original_targets(plan.original).await?.into(), None, false)
                        }
                        (ClusterKind::Dns(hosts), _) => {
                            (dns_targets(hosts, attempt).await?.into(), None, false)
                        }
                        (_, Some(set)) => {
                            let i = pick(set, cluster.lb, plan.hash, &tried)
                                .ok_or(Flag::NoHealthyUpstream)?;
                            tried[attempt as usize % tried.len()] = i;
                            let e = &set.endpoints[i];
                            (
                                Cow::Borrowed(&e.addresses[..]),
                                Some(&set.states[i]),
                                e.istio_tls,
                            )
                        }
                        (_, None) => return Err(Flag::NoHealthyUpstream),
                    };
                let tls = self.tls(cluster.tls.as_ref(), istio)?;
                // A streaming body can be sent once: only the first address is tried.
                let targets = if replayable {
                    &targets[..]
                } else {
                    &targets[..targets.len().min(1)]
                };
                let _endpoint_active = state.map(|st| {
                    st.active.fetch_add(1, Ordering::AcqRel);
                    Decrement(&st.active)
                });
                let result = try_targets(
                    h2,
                    targets,
                    &parts,
                    &mut body,
                    retry.and_then(|r| r.per_try_timeout),
                    &settings,
                    tls.as_ref(),
                )
                .await;
                if let (Some(st), Some(set)) = (state, set) {
                    outlier(cluster.outlier.as_ref(), set, st, &result);
                }
                let again = match (&result, retry) {
                    (_, None) => false,
                    (Ok(resp), Some(r)) => retriable(r, resp),
                    (Err(Flag::ConnectFailure), Some(r)) => {
                        r.on_connect_failure
                            || r.on_5xx
                            || r.on_gateway_error
                            || r.on_reset_before_request
                    }
                    (Err(Flag::Reset), Some(r)) => r.on_reset || r.on_5xx,
                    (Err(Flag::Timeout), Some(r)) => r.on_5xx || r.on_gateway_error,
                    (Err(_), Some(_)) => false,
                };
                last = result;
                if !again {
                    break;
                }
            }
            last
        };
        let resp = match deadline {
            Some(d) => tokio::time::timeout_at(d, attempt_all)
                .await
                .unwrap_or(Err(Flag::Timeout)),
            None => attempt_all.await,
        }?;
        // A small body came whole with the head; a streaming one is still under the route's
        // deadline and counts in flight until it ends.
        if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS
            || crate::http::held_whole(&resp).is_some()
        {
            return Ok(resp);
        }
        let in_flight = match (in_flight, set) {
            (Some(counted), Some(set)) => {
                // The count passes to the body, which gives it back when it ends.
                std::mem::forget(counted);
                Some(InFlight(set.runtime.clone()))
            }
            _ => None,
        };
        if in_flight.is_none() && deadline.is_none() {
            return Ok(resp);
        }
        Ok(resp.map(|inner| {
            Bounded {
                inner,
                deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
                _in_flight: in_flight,
            }
            .boxed()
        }))
    }
}

/// A request counted in its cluster's requests in flight until dropped.
struct InFlight(std::sync::Arc<ClusterRuntime>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A streaming response body still under its request's limits: the request counts in flight
/// (the circuit breaker) until the body ends, and a body still coming at the route's deadline
/// is cut with an error, so the client sees a broken response, never a short one.
struct Bounded {
    inner: Body,
    deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    _in_flight: Option<InFlight>,
}

impl hyper::body::Body for Bounded {
    type Data = bytes::Bytes;
    type Error = crate::http::BodyError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        use std::future::Future as _;
        use std::task::Poll;
        let this = self.get_mut();
        if let Poll::Ready(frame) = std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            if !matches!(frame, Some(Ok(_))) {
                this.deadline = None;
                this._in_flight = None;
            }
            return Poll::Ready(frame);
        }
        if let Some(deadline) = &mut this.deadline {
            if deadline.as_mut().poll(cx).is_ready() {
                this.deadline = None;
                this._in_flight = None;
                this.inner = crate::http::full("");
                return Poll::Ready(Some(Err(
                    "route timeout: the response body did not end in time".into(),
                )));
            }
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Decrements a counter when dropped, however the request ends.
struct Decrement<'a>(&'a AtomicU64);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Outlier detection: consecutive 5xx (and, where enforced, gateway errors: 502/503/504 and
/// connection failures) eject the endpoint for base time × its ejection count, unless that
/// would eject more than the allowed share of the cluster (at least one may always go).
fn outlier(
    policy: Option<&OutlierPolicy>,
    set: &EndpointSet,
    st: &EndpointState,
    result: &Result<Response<Body>, Flag>,
) {
    let Some(p) = policy else { return };
    let (five, gateway) = match result {
        Ok(r) => {
            let code = r.status().as_u16();
            (code >= 500, matches!(code, 502..=504))
        }
        Err(Flag::ConnectFailure | Flag::Reset | Flag::Timeout) => (true, true),
        Err(_) => return,
    };
    if !five {
        st.consecutive_5xx.store(0, Ordering::Relaxed);
        st.consecutive_gateway.store(0, Ordering::Relaxed);
        return;
    }
    let n5 = st.consecutive_5xx.fetch_add(1, Ordering::AcqRel) + 1;
    let ng = if gateway {
        st.consecutive_gateway.fetch_add(1, Ordering::AcqRel) + 1
    } else {
        st.consecutive_gateway.store(0, Ordering::Relaxed);
        0
    };
    let tripped = (p.consecutive_5xx > 0 && n5 >= p.consecutive_5xx)
        || (p.consecutive_gateway > 0 && ng >= p.consecutive_gateway);
    if !tripped {
        return;
    }
    let now = now_nanos();
    if st.ejected_until.load(Ordering::Acquire) > now {
        return; // already out
    }
    let ejected = set
        .states
        .iter()
        .filter(|s| s.ejected_until.load(Ordering::Relaxed) > now)
        .count();
    let allowed = (set.states.len() * p.max_ejection_percent as usize / 100).max(1);
    if ejected >= allowed {
        return;
    }
    // The ejection count decays by one for every sweep interval the endpoint has been back
    // since its last ejection ended, as Envoy's does: an endpoint that failed once long ago
    // is not ejected for longer and longer.
    let last_until = st.ejected_until.load(Ordering::Acquire);
    let mut times = st.ejections.load(Ordering::Acquire);
    if last_until > 0 {
        let healthy = (now - last_until) / (p.interval.as_nanos() as u64).max(1);
        times = times.saturating_sub(u32::try_from(healthy).unwrap_or(u32::MAX));
    }
    let times = times + 1;
    st.ejections.store(times, Ordering::Release);
    let until = now + (p.base_ejection * times).as_nanos() as u64;
    st.ejected_until.store(until, Ordering::Release);
    st.consecutive_5xx.store(0, Ordering::Relaxed);
    st.consecutive_gateway.store(0, Ordering::Relaxed);
    tracing::info!(
        ejection_ms = (p.base_ejection * times).as_millis() as u64,
        "outlier ejected an endpoint"
    );
}

/// An upstream TCP connection: plaintext, or mutual TLS to a sidecar.
pub enum TcpUpstream {
    Plain(tokio::net::TcpStream),
    Tls(Box<tokio_boring::SslStream<tokio::net::TcpStream>>),
}

impl Upstreams {
    /// Connects to an endpoint of `cluster` for TCP proxying (every address of the chosen
    /// endpoint in turn; an ejected or failing endpoint is skipped like for HTTP), with mutual
    /// TLS where the cluster says so for that endpoint. Over the cluster's `max_connections`,
    /// refused ([`Flag::Overflow`]); the connection's place is held while the returned slot
    /// lives.
    pub(crate) async fn connect_tcp(
        &self,
        cfg: &Config,
        cluster: &str,
    ) -> Result<(TcpUpstream, Option<crate::pool::Slot>), Flag> {
        let c = cfg.clusters.get(cluster).ok_or(Flag::NoCluster)?;
        let slot = match cfg
            .endpoint_sets
            .get(cluster)
            .filter(|_| c.limits.max_connections != u32::MAX)
        {
            Some(set) => {
                let max = u64::from(c.limits.max_connections);
                let Some(slot) = crate::pool::Slot::try_take(&set.runtime, max) else {
                    set.runtime.overflows.fetch_add(1, Ordering::Relaxed);
                    return Err(Flag::Overflow);
                };
                Some(slot)
            }
            None => None,
        };
        let (targets, istio) = match &c.kind {
            ClusterKind::Dns(hosts) => (dns_targets(hosts, 0).await?, false),
            _ => {
                let set = cfg
                    .endpoint_sets
                    .get(cluster)
                    .ok_or(Flag::NoHealthyUpstream)?;
                let i = pick(set, c.lb, None, &[]).ok_or(Flag::NoHealthyUpstream)?;
                let e = &set.endpoints[i];
                (e.addresses.clone(), e.istio_tls)
            }
        };
        let tls = self.tls(c.tls.as_ref(), istio)?;
        for addr in &targets {
            match tokio::time::timeout(c.connect_timeout, tokio::net::TcpStream::connect(addr))
                .await
            {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    let Some(tls) = &tls else {
                        return Ok((TcpUpstream::Plain(stream), slot));
                    };
                    let (s, _) = crate::pool::handshake(*addr, stream, tls).await?;
                    return Ok((TcpUpstream::Tls(Box::new(s)), slot));
                }
                Ok(Err(e)) => tracing::debug!(%addr, error = %e, "TCP upstream connect failed"),
                Err(_) => tracing::debug!(%addr, "TCP upstream connect timed out"),
            }
        }
        Err(Flag::ConnectFailure)
    }
}

impl Upstreams {
    /// Sends straight to `target` (the local app, for inbound traffic).
    pub async fn send_direct(
        &self,
        http2: bool,
        target: SocketAddr,
        mut parts: Parts,
        body: Body,
    ) -> Result<Response<Body>, Flag> {
        strip_request(&mut parts);
        let settings = crate::pool::Settings::default();
        let mut body = RequestBody::Streaming(Some(body));
        try_targets(http2, &[target], &parts, &mut body, None, &settings, None).await
    }

    /// The TLS a cluster's endpoint takes, if any: origination, or mutual TLS with the
    /// current certificate (a connection keeps the one it started with), the identities
    /// allowed and the ALPN, where the endpoint has a sidecar (`istio`) or the cluster says
    /// every endpoint does.
    fn tls(
        &self,
        t: Option<&crate::model::UpstreamTls>,
        istio: bool,
    ) -> Result<Option<crate::pool::Tls>, Flag> {
        let t = match t {
            None => return Ok(None),
            Some(UpstreamTls::Origination(o)) => {
                return Ok(Some(crate::pool::Tls::Origination(o.clone())))
            }
            Some(UpstreamTls::Mesh(t)) if istio || !t.only_istio_endpoints => t,
            Some(UpstreamTls::Mesh(_)) => return Ok(None),
        };
        let Some(store) = &self.identity else {
            // Refused when the cluster arrived (see `state`); never reached.
            return Err(Flag::ConnectFailure);
        };
        Ok(Some(crate::pool::Tls::Mesh {
            credentials: store.load(),
            peer: if t.identities.is_empty() {
                hypha_identity::tls::Peer::Any
            } else {
                hypha_identity::tls::Peer::OneOf(t.identities.clone())
            },
            alpn: t.alpn.clone(),
        }))
    }
}

/// The request's hop-by-hop headers stay on the downstream hop; an upgrade request keeps
/// what the upstream needs to agree to it.
fn strip_request(parts: &mut Parts) {
    if !crate::http::has_hop_by_hop(&parts.headers) {
        return;
    }
    let upgrading = parts.headers.contains_key(http::header::UPGRADE);
    crate::http::strip_hop_by_hop(&mut parts.headers, upgrading);
}

/// Whether a response is retried: its status, or the `grpc-status` of a trailers-only gRPC
/// response (Envoy reads it from the headers too; a status in trailers comes too late).
fn retriable(r: &RetryPolicy, resp: &Response<Body>) -> bool {
    let status = resp.status().as_u16();
    (r.on_5xx && status >= 500)
        || (r.on_gateway_error && matches!(status, 502..=504))
        || r.on_status.contains(&status)
        || (r.on_ratelimited && resp.headers().contains_key("x-envoy-ratelimited"))
        || (r.on_grpc_status != 0
            && crate::http::grpc_status(resp.headers()).is_some_and(|g| r.on_grpc(u32::from(g))))
}

fn backoff(retry: Option<&RetryPolicy>, attempt: u32) -> Duration {
    let Some(r) = retry else {
        return Duration::ZERO;
    };
    let exp = r.base_interval * 2u32.saturating_pow(attempt.saturating_sub(1).min(16));
    let cap = exp.min(r.max_interval);
    // Full jitter, as Envoy does: uniform in [0, cap].
    let ms = cap.as_millis() as u64;
    Duration::from_millis(crate::rand::below(ms + 1))
}

/// The endpoint to use, among those not ejected (all of them if every one is): round robin,
/// least request (the less busy of two random ones), random, or for the hash policies the
/// highest-scoring endpoint for the request's key (rendezvous hashing: consistent, and only
/// the keys of a removed endpoint move).
///
/// Endpoints in `tried` (earlier attempts of this request) are avoided while others are
/// usable, as Istio's retry policy does (`previous_hosts`).
fn pick(set: &EndpointSet, lb: Lb, hash: Option<u64>, tried: &[usize]) -> Option<usize> {
    let n = set.endpoints.len();
    if n == 0 {
        return None;
    }
    let now = now_nanos();
    let up = |i: usize| set.states[i].ejected_until.load(Ordering::Relaxed) <= now;
    let fresh = |i: usize| up(i) && !tried.contains(&i);
    let usable: &dyn Fn(usize) -> bool = if (0..n).any(fresh) {
        &fresh
    } else if (0..n).any(up) {
        &up
    } else {
        &|_| true
    };
    match (lb, hash) {
        (Lb::RingHash | Lb::Maglev, Some(key)) => (0..n).filter(|&i| usable(i)).max_by_key(|&i| {
            let weight = u64::from(set.endpoints[i].weight.max(1));
            mix(key ^ mix(i as u64 + 1)) / weight.max(1) * weight
        }),
        (Lb::LeastRequest, _) if n > 1 => {
            let a = crate::rand::below(n as u64) as usize;
            let b = crate::rand::below(n as u64) as usize;
            let load = |i: usize| set.states[i].active.load(Ordering::Relaxed);
            match (usable(a), usable(b)) {
                (true, true) => Some(if load(b) < load(a) { b } else { a }),
                (true, false) => Some(a),
                (false, true) => Some(b),
                (false, false) => (0..n).find(|&i| usable(i)),
            }
        }
        (Lb::Random, _) => {
            let start = crate::rand::below(n as u64) as usize;
            (0..n).map(|k| (start + k) % n).find(|&i| usable(i))
        }
        _ => {
            let start = set.next.fetch_add(1, Ordering::Relaxed);
            (0..n).map(|k| (start + k) % n).find(|&i| usable(i))
        }
    }
}

/// A 64-bit finalizer (splitmix64) to spread hash keys.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// For a DNS cluster: the addresses of one of its hosts (taking turns across attempts),
/// resolved now (the system resolver caches as it is configured to).
async fn dns_targets(hosts: &[(String, u16)], attempt: u32) -> Result<Vec<SocketAddr>, Flag> {
    let (host, port) = &hosts[attempt as usize % hosts.len()];
    resolve((host.as_str(), *port)).await
}

/// For `PassthroughCluster`: the original destination, or the addresses of the authority the
/// request named.
async fn original_targets(original: Option<Original<'_>>) -> Result<Vec<SocketAddr>, Flag> {
    let authority = match original.ok_or(Flag::NoHealthyUpstream)? {
        Original::Address(a) => return Ok(vec![a]),
        Original::Authority(a) => a,
    };
    let has_port = authority
        .rsplit_once(':')
        .is_some_and(|(h, p)| p.parse::<u16>().is_ok() && (!h.contains(':') || h.ends_with(']')));
    if has_port {
        resolve(authority).await
    } else {
        // `[v6]` must stay bracketed: host and port as one string.
        resolve(format!("{authority}:80")).await
    }
}

/// Every address a name resolves to; none is "no healthy upstream".
async fn resolve(target: impl tokio::net::ToSocketAddrs) -> Result<Vec<SocketAddr>, Flag> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(target)
        .await
        .map_err(|_| Flag::NoHealthyUpstream)?
        .collect();
    if addrs.is_empty() {
        return Err(Flag::NoHealthyUpstream);
    }
    Ok(addrs)
}

/// Tries the endpoint's addresses in order until one connects. HTTP/1.1 requests go in
/// origin form with their `Host`; HTTP/2 ones with the `Host` (or the `:authority` they came
/// with) as `:authority`, the endpoint's address only when the request has neither, so the server's sidecar matches `hosts:` rules
/// on the name the client used.
async fn try_targets(
    h2: bool,
    targets: &[SocketAddr],
    parts: &Parts,
    body: &mut RequestBody,
    per_try: Option<Duration>,
    settings: &crate::pool::Settings<'_>,
    tls: Option<&crate::pool::Tls>,
) -> Result<Response<Body>, Flag> {
    let mut last = Err(Flag::NoHealthyUpstream);
    let pq = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    // Looked up only where it is needed: an origin-form HTTP/1.1 request goes as it came.
    let host = || {
        parts
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .filter(|h| crate::request::plain_authority(h.as_bytes()))
            .or_else(|| parts.uri.authority().map(http::uri::Authority::as_str))
    };
    for &addr in targets {
        let mut req = Request::new(body.take());
        *req.method_mut() = parts.method.clone();
        *req.headers_mut() = parts.headers.clone();
        let sent = async {
            if h2 {
                let by_addr = addr.to_string();
                let scheme = match tls {
                    Some(crate::pool::Tls::Origination(_)) => "https",
                    _ => "http",
                };
                *req.uri_mut() = Uri::builder()
                    .scheme(scheme)
                    .authority(host().unwrap_or(&by_addr))
                    .path_and_query(pq)
                    .build()
                    .map_err(|_| Flag::BadRequest)?;
                // `:authority` says it; a `host` header beside it would say it twice.
                req.headers_mut().remove(http::header::HOST);
                crate::pool::send_h2(addr, req, settings, tls).await
            } else {
                if parts.uri.authority().is_none() {
                    *req.uri_mut() = parts.uri.clone(); // origin form already: no parse
                } else {
                    *req.uri_mut() = pq.parse::<Uri>().map_err(|_| Flag::BadRequest)?;
                    // A request that came over HTTP/2 has its authority in the URI only.
                    if !req.headers().contains_key(http::header::HOST) {
                        if let Some(a) = host().and_then(|h| http::HeaderValue::from_str(h).ok()) {
                            req.headers_mut().insert(http::header::HOST, a);
                        }
                    }
                }
                crate::pool::send(addr, req, settings, tls).await
            }
        };
        let result = match per_try {
            Some(t) => match tokio::time::timeout(t, sent).await {
                Ok(r) => r,
                Err(_) => return Err(Flag::Timeout),
            },
            None => sent.await,
        };
        match result {
            Ok(mut resp) => {
                let upgrading = resp.status() == http::StatusCode::SWITCHING_PROTOCOLS;
                crate::http::strip_hop_by_hop(resp.headers_mut(), upgrading);
                crate::http::drop_upstream_flags(resp.headers_mut());
                return Ok(resp);
            }
            // Only requests whose body is held whole reach a second address (see `send`).
            Err(Flag::ConnectFailure) => last = Err(Flag::ConnectFailure),
            other => return other,
        }
    }
    last
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::model::{epoch, Endpoint};

    fn set(n: usize) -> EndpointSet {
        let endpoints: Vec<Endpoint> = (0..n)
            .map(|i| Endpoint {
                addresses: vec![SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16))],
                weight: 1,
                istio_tls: false,
            })
            .collect();
        EndpointSet {
            endpoints: endpoints.into(),
            states: (0..n).map(|_| Arc::default()).collect(),
            ..Default::default()
        }
    }

    fn status(code: u16) -> Result<Response<Body>, Flag> {
        let mut r = Response::new(crate::http::full(""));
        *r.status_mut() = http::StatusCode::from_u16(code).unwrap();
        Ok(r)
    }

    #[test]
    fn ejections_lengthen_while_recent_and_decay_by_interval() {
        let policy = OutlierPolicy {
            consecutive_5xx: 1,
            consecutive_gateway: 0,
            base_ejection: Duration::from_secs(1),
            max_ejection_percent: 100,
            interval: Duration::from_millis(10),
        };
        let set = set(4);
        let st = &set.states[0];
        // Ejection times are counted from the proxy's epoch: let 100 ms pass since it.
        std::thread::sleep(Duration::from_millis(100).saturating_sub(epoch().elapsed()));
        outlier(Some(&policy), &set, st, &status(500));
        assert_eq!(st.ejections.load(Ordering::Relaxed), 1);
        assert!(st.ejected_until.load(Ordering::Relaxed) > now_nanos());

        // Back just now (less than an interval): the next ejection is twice as long.
        st.ejected_until.store(now_nanos() - 1, Ordering::Relaxed);
        outlier(Some(&policy), &set, st, &status(503));
        assert_eq!(st.ejections.load(Ordering::Relaxed), 2);

        // Back for five intervals: the count decays to zero before this ejection counts.
        st.ejected_until
            .store(now_nanos() - 5 * 10_000_000, Ordering::Relaxed);
        outlier(Some(&policy), &set, st, &status(500));
        assert_eq!(st.ejections.load(Ordering::Relaxed), 1);

        // A success resets the consecutive count, so one 5xx does not eject the next one.
        let other = &set.states[1];
        outlier(Some(&policy), &set, other, &status(200));
        assert_eq!(other.ejections.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn grpc_status_in_headers_is_retried_when_the_policy_says_so() {
        let policy = RetryPolicy {
            attempts: 2,
            per_try_timeout: None,
            on_5xx: false,
            on_gateway_error: false,
            on_connect_failure: true,
            on_reset: false,
            on_status: vec![503],
            on_ratelimited: false,
            on_reset_before_request: false,
            base_interval: Duration::from_millis(25),
            max_interval: Duration::from_millis(250),
            on_refused_stream: false,
            on_grpc_status: (1 << 14) | (1 << 1), // unavailable, cancelled
        };
        let grpc = |code: &'static str| {
            let mut r = Response::new(crate::http::full(""));
            let h = r.headers_mut();
            h.insert("grpc-status", http::HeaderValue::from_static(code));
            h.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            );
            r
        };
        assert!(retriable(&policy, &grpc("14")));
        assert!(retriable(&policy, &grpc("1")));
        assert!(!retriable(&policy, &grpc("0")));
        assert!(!retriable(&policy, &grpc("13")));
        assert!(retriable(&policy, &status(503).unwrap()));
        assert!(!retriable(&policy, &status(500).unwrap()));
        // A grpc-status on a response that is not gRPC is not one.
        let mut not_grpc = status(200).unwrap();
        not_grpc
            .headers_mut()
            .insert("grpc-status", http::HeaderValue::from_static("14"));
        assert!(!retriable(&policy, &not_grpc));
    }
}
