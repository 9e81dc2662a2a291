//! Sending a request to a cluster: endpoint choice, pooled keep-alive connections (HTTP/1.1,
//! or HTTP/2 multiplexed where the cluster says the upstream speaks it), every address of a
//! dual-stack endpoint tried in turn, per-try and route timeouts, and retries with jittered
//! exponential backoff.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::request::Parts;
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

use crate::http::{Body, Flag};
use crate::model::{ClusterKind, Config, Endpoint, Lb, RetryPolicy};

/// Connection pools to upstreams, shared by every config generation so a config change does
/// not drop established connections.
#[derive(Clone)]
pub struct Upstreams {
    h1: Client<HttpConnector, Body>,
    h2: Client<HttpConnector, Body>,
}

impl Default for Upstreams {
    fn default() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(10)));
        connector.enforce_http(true);
        let h1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector.clone());
        let h2 = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Upstreams { h1, h2 }
    }
}

/// How a request goes out: the cluster, the route's timeout and retry policy.
pub struct Plan<'a> {
    pub cluster: &'a str,
    /// For `PassthroughCluster`: where the request was going.
    pub original: Option<&'a str>,
    pub timeout: Option<Duration>,
    pub retry: Option<&'a RetryPolicy>,
}

impl Upstreams {
    /// Sends the request (origin-form URI in `parts`) per `plan`. The body is sent once; a
    /// request with a body is not retried (its bytes are gone), as Envoy does beyond its
    /// buffer limit.
    pub async fn send(
        &self,
        cfg: &Config,
        plan: &Plan<'_>,
        parts: Parts,
        body: Body,
        body_is_empty: bool,
    ) -> Result<Response<Incoming>, Flag> {
        let attempt_all = async {
            let Some(cluster) = cfg.clusters.get(plan.cluster) else {
                return Err(Flag::NoCluster);
            };
            let client = if cluster.http2 { &self.h2 } else { &self.h1 };
            let retry = plan.retry.filter(|_| body_is_empty);
            let attempts = 1 + retry.map_or(0, |r| r.attempts);
            let mut body = Some(body);
            let mut last = Err(Flag::NoHealthyUpstream);
            for attempt in 0..attempts {
                if attempt > 0 {
                    tokio::time::sleep(backoff(retry, attempt)).await;
                }
                let targets = match &cluster.kind {
                    ClusterKind::OriginalDst => original_targets(plan.original).await?,
                    _ => {
                        let set = cfg
                            .endpoint_sets
                            .get(plan.cluster)
                            .ok_or(Flag::NoHealthyUpstream)?;
                        pick(&set.endpoints, &set.next, cluster.lb)
                            .ok_or(Flag::NoHealthyUpstream)?
                            .addresses
                            .clone()
                    }
                };
                let b = body.take().unwrap_or_else(|| crate::http::full(""));
                // A body can be sent once: with one, only the first address is tried.
                let targets = if body_is_empty {
                    &targets[..]
                } else {
                    &targets[..targets.len().min(1)]
                };
                let result = try_targets(
                    client,
                    targets,
                    &parts,
                    b,
                    retry.and_then(|r| r.per_try_timeout),
                )
                .await;
                let again = match (&result, retry) {
                    (_, None) => false,
                    (Ok(resp), Some(r)) => retriable_status(r, resp.status().as_u16()),
                    (Err(Flag::ConnectFailure), Some(r)) => {
                        r.on_connect_failure || r.on_5xx || r.on_gateway_error
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
        match plan.timeout {
            Some(t) => tokio::time::timeout(t, attempt_all)
                .await
                .unwrap_or(Err(Flag::Timeout)),
            None => attempt_all.await,
        }
    }
}

impl Upstreams {
    /// Sends straight to `target` (the local app, for inbound traffic).
    pub async fn send_direct(
        &self,
        http2: bool,
        target: SocketAddr,
        parts: Parts,
        body: Body,
    ) -> Result<Response<Incoming>, Flag> {
        let client = if http2 { &self.h2 } else { &self.h1 };
        try_targets(client, &[target], &parts, body, None).await
    }
}

fn retriable_status(r: &RetryPolicy, status: u16) -> bool {
    (r.on_5xx && status >= 500)
        || (r.on_gateway_error && matches!(status, 502..=504))
        || r.on_status.contains(&status)
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

/// The next endpoint: round robin (least request and the hash policies also take turns until
/// they have their own state), random for `RANDOM`.
fn pick<'e>(
    endpoints: &'e [Endpoint],
    next: &std::sync::atomic::AtomicUsize,
    lb: Lb,
) -> Option<&'e Endpoint> {
    if endpoints.is_empty() {
        return None;
    }
    let i = match lb {
        Lb::Random => crate::rand::below(endpoints.len() as u64) as usize,
        _ => next.fetch_add(1, Ordering::Relaxed) % endpoints.len(),
    };
    endpoints.get(i)
}

/// For `PassthroughCluster`: the addresses of the authority the request named.
async fn original_targets(authority: Option<&str>) -> Result<Vec<SocketAddr>, Flag> {
    let authority = authority.ok_or(Flag::NoHealthyUpstream)?;
    let with_port = if authority
        .rsplit_once(':')
        .is_some_and(|(h, p)| p.parse::<u16>().is_ok() && (!h.contains(':') || h.ends_with(']')))
    {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(with_port)
        .await
        .map_err(|_| Flag::NoHealthyUpstream)?
        .collect();
    if addrs.is_empty() {
        return Err(Flag::NoHealthyUpstream);
    }
    Ok(addrs)
}

/// Tries the endpoint's addresses in order until one connects.
async fn try_targets(
    client: &Client<HttpConnector, Body>,
    targets: &[SocketAddr],
    parts: &Parts,
    body: Body,
    per_try: Option<Duration>,
) -> Result<Response<Incoming>, Flag> {
    let mut body = Some(body);
    let mut last = Err(Flag::NoHealthyUpstream);
    for addr in targets {
        let pq = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let uri: Uri = format!("http://{addr}{pq}")
            .parse()
            .map_err(|_| Flag::BadRequest)?;
        let mut req = Request::new(body.take().unwrap_or_else(|| crate::http::full("")));
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = uri;
        *req.headers_mut() = parts.headers.clone();
        let sent = client.request(req);
        let result = match per_try {
            Some(t) => match tokio::time::timeout(t, sent).await {
                Ok(r) => r,
                Err(_) => return Err(Flag::Timeout),
            },
            None => sent.await,
        };
        match result {
            Ok(resp) => return Ok(resp),
            Err(e) if e.is_connect() => {
                tracing::debug!(%addr, error = %e, "upstream connect failed");
                // Only requests without a body reach a second address (see `send`).
                last = Err(Flag::ConnectFailure);
            }
            Err(e) => {
                tracing::debug!(%addr, error = %e, "upstream request failed");
                return Err(Flag::Reset);
            }
        }
    }
    last
}
