//! The admin listener: `/ready` (200 once the first complete config is applied, else 503),
//! `/metrics` (Prometheus text, Istio's metric names), `/config_dump` (the applied resources,
//! by type, with versions), `/clusters` (each cluster's endpoints), `/certs` (the workload
//! certificate: identity, serial, expiry, the trusted roots and their SHA-256 fingerprints, the
//! root its chain ends at, and where the key lives; never the key). Plain HTTP on loopback by default. Health listeners (`serve_health`) serve the
//! readiness check alone, on addresses the kubelet reaches.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::http::{self as h, Body};
use crate::model::{ClusterKind, Config};
use crate::telemetry::Telemetry;

#[derive(Clone)]
pub struct Admin {
    pub config: Arc<ArcSwap<Config>>,
    pub telemetry: Arc<Telemetry>,
    pub ready: watch::Receiver<bool>,
    /// (type URL, name, version) of every applied resource.
    pub versions: Arc<ArcSwap<Vec<(String, String, String)>>>,
    /// The data listeners' drain: not ready while draining.
    pub draining: h::Drain,
    /// The workload certificate, when the proxy has a mesh identity.
    pub identity: Option<hypha_identity::Store>,
}

/// The Content-Type of Prometheus' text exposition format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

impl Admin {
    fn handle(&self, req: &Request<Incoming>) -> Response<Body> {
        let (status, body) = match req.uri().path() {
            "/ready" | "/healthz/ready" => {
                if *self.ready.borrow() && !self.draining.is_draining() {
                    (StatusCode::OK, "LIVE\n".to_owned())
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "NOT READY\n".to_owned())
                }
            }
            "/metrics" | "/stats/prometheus" => (StatusCode::OK, self.metrics()),
            "/config_dump" => (StatusCode::OK, self.config_dump()),
            "/clusters" => (StatusCode::OK, self.clusters()),
            "/certs" => (StatusCode::OK, self.certs()),
            _ => (
                StatusCode::NOT_FOUND,
                "admin: /ready /metrics /config_dump /clusters /certs\n".to_owned(),
            ),
        };
        let content_type = match req.uri().path() {
            // Prometheus 3 refuses a scrape without its text format's type.
            "/metrics" | "/stats/prometheus" => PROMETHEUS_TEXT,
            "/config_dump" | "/certs" if status == StatusCode::OK => "application/json",
            _ => "text/plain; charset=utf-8",
        };
        let mut r = Response::new(h::full(body));
        *r.status_mut() = status;
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(content_type),
        );
        r
    }

    /// The telemetry's metrics, then the shape of the current config's match tables.
    fn metrics(&self) -> String {
        let mut out = self.telemetry.render();
        let config = self.config.load();
        let tables = config.routes.values();
        crate::telemetry::render_matcher(
            &mut out,
            &[
                (
                    "route",
                    tables
                        .clone()
                        .flat_map(|r| r.virtual_hosts.iter().map(|v| v.table.stats()))
                        .collect(),
                ),
                ("domain", tables.map(|r| r.domains.stats()).collect()),
            ],
        );
        if let Some(store) = &self.identity {
            let creds = store.load();
            crate::telemetry::render_chain_cache(
                &mut out,
                hypha_identity::tls::chain_cache_stats(creds.server.context()),
                hypha_identity::tls::chain_cache_stats(creds.client.context()),
            );
        }
        out
    }

    fn config_dump(&self) -> String {
        let mut out = String::new();
        let versions = self.versions.load();
        let mut last_type = "";
        for (t, name, version) in versions.iter() {
            if t != last_type {
                let _ = writeln!(out, "# {t}");
                last_type = t;
            }
            let _ = writeln!(out, "{name} {version}");
        }
        out
    }

    /// JSON: `{"identity", "serial", "expires_in_s", "roots": [subject...], "key"}` (`key`: where
    /// the private key lives, e.g. `PKCS#11 token "mesh" ECDSA P-256`), or
    /// `{"identity": null}` without a mesh identity.
    fn certs(&self) -> String {
        let Some(store) = &self.identity else {
            return "{\"identity\":null}\n".to_owned();
        };
        let creds = store.load();
        let id = &creds.identity;
        let serial = id.chain()[0]
            .serial_number()
            .to_bn()
            .and_then(|b| b.to_hex_str().map(|s| s.to_string()))
            .unwrap_or_default();
        let expires_in_s = id
            .not_after()
            .duration_since(std::time::SystemTime::now())
            .map_or(0, |d| d.as_secs());
        let roots: Vec<String> = id
            .roots()
            .iter()
            .map(|r| {
                r.subject_name()
                    .entries()
                    .filter_map(|e| e.data().as_utf8().ok().map(|s| s.to_string()))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .collect();
        // Roots of one signer's generations share a subject: fingerprints tell them apart.
        let sha256 = |c: &boring::x509::X509Ref| {
            c.digest(boring::hash::MessageDigest::sha256())
                .map(|d| d.iter().map(|b| format!("{b:02x}")).collect::<String>())
                .unwrap_or_default()
        };
        let root_sha256: Vec<String> = id.roots().iter().map(|r| sha256(r)).collect();
        let chain_root = id.chain().last().map(|c| sha256(c)).unwrap_or_default();
        let mut out = serde_json::json!({
            "identity": id.id(),
            "serial": serial,
            "expires_in_s": expires_in_s,
            "roots": roots,
            "root_sha256": root_sha256,
            "chain_root_sha256": chain_root,
            "key": id.key_description(),
        })
        .to_string();
        out.push('\n');
        out
    }

    fn clusters(&self) -> String {
        let cfg = self.config.load();
        let mut names: Vec<&String> = cfg.clusters.keys().collect();
        names.sort();
        let mut out = String::new();
        for name in names {
            let c = &cfg.clusters[name];
            let kind = match c.kind {
                ClusterKind::Eds => "eds",
                ClusterKind::Static(_) => "static",
                ClusterKind::OriginalDst => "original_dst",
                ClusterKind::Dns(_) => "dns",
            };
            let _ = writeln!(out, "{name} type={kind} lb={:?} http2={}", c.lb, c.http2);
            if let Some(set) = cfg.endpoint_sets.get(name) {
                let now = crate::model::now_nanos();
                let _ = writeln!(
                    out,
                    "  active_requests={} overflows={}",
                    set.runtime.active.load(Ordering::Relaxed),
                    set.runtime.overflows.load(Ordering::Relaxed)
                );
                for (e, st) in set.endpoints.iter().zip(set.states.iter()) {
                    let addrs: Vec<String> = e.addresses.iter().map(ToString::to_string).collect();
                    let until = st.ejected_until.load(Ordering::Relaxed);
                    let health = if until > now {
                        format!("ejected for {} ms", (until - now) / 1_000_000)
                    } else {
                        "healthy".to_owned()
                    };
                    let _ = writeln!(
                        out,
                        "  {} weight={} active={} health={health}",
                        addrs.join(","),
                        e.weight,
                        st.active.load(Ordering::Relaxed)
                    );
                }
            }
        }
        out
    }
}

/// A health listener: `/healthz/ready` (and `/ready`), and the app's probes it forwards
/// (`probes`), nothing else of the admin's.
pub async fn serve_health(
    admin: Admin,
    probes: Arc<crate::probe::AppProbes>,
    listener: TcpListener,
    drain: h::Drain,
) {
    h::serve(listener, drain, move |req, _| {
        let path = req.uri().path().to_owned();
        let ready =
            matches!(path.as_str(), "/ready" | "/healthz/ready").then(|| admin.handle(&req));
        let probes = probes.clone();
        async move {
            if let Some(resp) = ready {
                return resp;
            }
            let (status, body) = match probes.check(&path).await {
                Some(Ok(())) => (StatusCode::OK, "ok\n".to_owned()),
                Some(Err(why)) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
                None => (
                    StatusCode::NOT_FOUND,
                    "health: /healthz/ready and /app-health/<container>/<probe>\n".to_owned(),
                ),
            };
            let mut r = Response::new(h::full(body));
            *r.status_mut() = status;
            r
        }
    })
    .await;
}

/// Serves the admin endpoints until the task is dropped.
pub async fn serve(admin: Admin, listener: TcpListener, drain: h::Drain) {
    h::serve(listener, drain, move |req, _| {
        let resp = admin.handle(&req);
        async move { resp }
    })
    .await;
}
