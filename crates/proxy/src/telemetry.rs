//! Request metrics with Istio's names and labels, kept without locks: a fixed open-addressing
//! table of series, each slot claimed once by compare-and-swap on its key and then updated
//! with atomic adds. A new series (a new combination of service, response code and flags)
//! allocates its label set once; a request on a known series touches only atomics. The
//! Prometheus text is rendered from the table on scrape.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use crate::http::Outcome;

/// Istio's `istio_request_duration_milliseconds` buckets.
const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];
/// Istio's `istio_request_bytes` / `istio_response_bytes` buckets.
const SIZE_BUCKETS: [f64; 8] = [
    1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0, 1000000.0, 10000000.0,
];
/// Series slots; past this many distinct label sets new ones are counted in `overflow`.
const SLOTS: usize = 4096;

/// Who reports: the client's sidecar (`source`) or the server's (`destination`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reporter {
    Source,
    Destination,
}

/// The labels of one series, in Istio's vocabulary. Built once per new series.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Labels {
    pub reporter: Reporter,
    pub source_workload: String,
    pub source_namespace: String,
    pub source_app: String,
    pub source_version: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_namespace: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_principal: String,
    pub destination_service: String,
    pub request_protocol: &'static str,
    pub response_code: u16,
    pub grpc_response_status: Option<u16>,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
}

impl Labels {
    fn render(&self, out: &mut String) {
        let service_name = self
            .destination_service
            .split('.')
            .next()
            .unwrap_or("unknown");
        let service_ns = self
            .destination_service
            .split('.')
            .nth(1)
            .unwrap_or("unknown");
        let reporter = match self.reporter {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        };
        let _ = write!(
            out,
            "reporter=\"{reporter}\",source_workload=\"{}\",source_workload_namespace=\"{}\",\
source_app=\"{}\",source_version=\"{}\",source_principal=\"{}\",destination_workload=\"{}\",\
destination_workload_namespace=\"{}\",destination_app=\"{}\",destination_version=\"{}\",\
destination_principal=\"{}\",destination_service=\"{}\",destination_service_name=\"{}\",\
destination_service_namespace=\"{}\",request_protocol=\"{}\",response_code=\"{}\",\
grpc_response_status=\"{}\",response_flags=\"{}\",connection_security_policy=\"{}\"",
            esc(&self.source_workload),
            esc(&self.source_namespace),
            esc(&self.source_app),
            esc(&self.source_version),
            esc(&self.source_principal),
            esc(&self.destination_workload),
            esc(&self.destination_namespace),
            esc(&self.destination_app),
            esc(&self.destination_version),
            esc(&self.destination_principal),
            esc(&self.destination_service),
            esc(service_name),
            esc(service_ns),
            self.request_protocol,
            self.response_code,
            self.grpc_response_status
                .map_or(String::new(), |g| g.to_string()),
            self.response_flags,
            self.connection_security_policy,
        );
    }
}

fn esc(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains(['"', '\\', '\n']) {
        s.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
            .into()
    } else {
        s.into()
    }
}

struct Histogram<const N: usize> {
    buckets: [AtomicU64; N],
    /// Sum in the unit's thousandths (µs for durations), to stay integral.
    sum_milli: AtomicU64,
}

impl<const N: usize> Default for Histogram<N> {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_milli: AtomicU64::new(0),
        }
    }
}

impl<const N: usize> Histogram<N> {
    fn observe(&self, bounds: &[f64; N], value: f64) {
        // Only the first bucket holding the value is counted; rendering accumulates.
        if let Some(i) = bounds.iter().position(|b| value <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_milli
            .fetch_add((value * 1000.0) as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str, bounds: &[f64; N], count: u64) {
        let mut cumulative = 0;
        for (b, bound) in self.buckets.iter().zip(bounds) {
            cumulative += b.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let sum = self.sum_milli.load(Ordering::Relaxed) as f64 / 1000.0;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

#[derive(Default)]
struct Slot {
    /// 0: free. Otherwise the series' hash (never 0).
    key: AtomicU64,
    labels: OnceLock<Arc<Labels>>,
    requests: AtomicU64,
    duration: Histogram<19>,
    request_bytes: Histogram<8>,
    response_bytes: Histogram<8>,
}

/// One request's outcome.
pub struct Observation {
    pub duration_ms: f64,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub grpc_status: Option<u16>,
}

/// The proxy's metrics.
pub struct Metrics {
    slots: Box<[Slot]>,
    overflow: AtomicU64,
    tcp_opened: AtomicU64,
    tcp_closed: AtomicU64,
    tcp_sent: AtomicU64,
    tcp_received: AtomicU64,
    /// Plaintext connections closed on ports that require mutual TLS (STRICT).
    plaintext_refused: AtomicU64,
    /// Inbound TLS handshakes that failed (no or an untrusted client certificate, ...).
    tls_refused: AtomicU64,
    /// Requests and connections denied by authorization policy, and those an AUDIT policy
    /// matched.
    rbac_denied_http: AtomicU64,
    rbac_denied_tcp: AtomicU64,
    rbac_audited: AtomicU64,
    /// Outbound connections closed because no filter chain takes their server name.
    no_filter_chain: AtomicU64,
    /// Inbound connections and requests refused, by [`InboundRefusal`].
    inbound_refused: [AtomicU64; 4],
}

/// Why the inbound side closed a connection (or denied a request) before any policy ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboundRefusal {
    /// No complete config yet.
    NotReady = 0,
    /// To the sidecar's own ports, from its own passthrough source, or to a cluster without
    /// endpoints.
    Blackholed = 1,
    /// No filter chain takes the connection.
    NoFilterChain = 2,
    /// The chain the connection was accepted under is gone or changed kind.
    ChainChanged = 3,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            slots: (0..SLOTS).map(|_| Slot::default()).collect(),
            overflow: AtomicU64::new(0),
            tcp_opened: AtomicU64::new(0),
            tcp_closed: AtomicU64::new(0),
            tcp_sent: AtomicU64::new(0),
            tcp_received: AtomicU64::new(0),
            plaintext_refused: AtomicU64::new(0),
            tls_refused: AtomicU64::new(0),
            rbac_denied_http: AtomicU64::new(0),
            rbac_denied_tcp: AtomicU64::new(0),
            rbac_audited: AtomicU64::new(0),
            no_filter_chain: AtomicU64::new(0),
            inbound_refused: Default::default(),
        }
    }
}

impl Metrics {
    /// Records a request on the series `key` identifies; `labels` builds the series' labels
    /// the first time it is seen. `key` must identify the label set (see [`series_key`]).
    pub fn record(&self, key: u64, labels: impl FnOnce() -> Labels, o: &Observation) {
        let key = key.max(1);
        let start = (key as usize) % SLOTS;
        for probe in 0..SLOTS {
            let slot = &self.slots[(start + probe) % SLOTS];
            let current = slot.key.load(Ordering::Acquire);
            let mine = if current == key {
                true
            } else if current == 0 {
                match slot
                    .key
                    .compare_exchange(0, key, Ordering::AcqRel, Ordering::Acquire)
                {
                    Ok(_) => true,
                    Err(other) => other == key,
                }
            } else {
                false
            };
            if !mine {
                continue;
            }
            slot.labels.get_or_init(|| Arc::new(labels()));
            slot.requests.fetch_add(1, Ordering::Relaxed);
            slot.duration.observe(&DURATION_BUCKETS_MS, o.duration_ms);
            slot.request_bytes
                .observe(&SIZE_BUCKETS, o.request_bytes as f64);
            slot.response_bytes
                .observe(&SIZE_BUCKETS, o.response_bytes as f64);
            return;
        }
        self.overflow.fetch_add(1, Ordering::Relaxed);
    }

    pub fn tcp_opened(&self) {
        self.tcp_opened.fetch_add(1, Ordering::Relaxed);
    }

    pub fn tcp_closed(&self, sent: u64, received: u64) {
        self.tcp_closed.fetch_add(1, Ordering::Relaxed);
        self.tcp_sent.fetch_add(sent, Ordering::Relaxed);
        self.tcp_received.fetch_add(received, Ordering::Relaxed);
    }

    pub fn plaintext_refused(&self) {
        self.plaintext_refused.fetch_add(1, Ordering::Relaxed);
    }

    pub fn tls_refused(&self) {
        self.tls_refused.fetch_add(1, Ordering::Relaxed);
    }

    pub fn rbac_denied(&self, http: bool) {
        let c = if http {
            &self.rbac_denied_http
        } else {
            &self.rbac_denied_tcp
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn rbac_audited(&self) {
        self.rbac_audited.fetch_add(1, Ordering::Relaxed);
    }

    pub fn inbound_refused(&self, why: InboundRefusal) {
        self.inbound_refused[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn no_filter_chain(&self) {
        self.no_filter_chain.fetch_add(1, Ordering::Relaxed);
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut series = Vec::new();
        for slot in self.slots.iter() {
            if let Some(labels) = slot.labels.get() {
                let mut l = String::new();
                labels.render(&mut l);
                series.push((l, slot));
            }
        }
        series.sort_by(|a, b| a.0.cmp(&b.0));
        out.push_str("# TYPE istio_requests_total counter\n");
        for (l, s) in &series {
            let _ = writeln!(
                out,
                "istio_requests_total{{{l}}} {}",
                s.requests.load(Ordering::Relaxed)
            );
        }
        for (name, pick) in [
            ("istio_request_duration_milliseconds", 0),
            ("istio_request_bytes", 1),
            ("istio_response_bytes", 2),
        ] {
            let _ = writeln!(out, "# TYPE {name} histogram");
            for (l, s) in &series {
                let count = s.requests.load(Ordering::Relaxed);
                match pick {
                    0 => s
                        .duration
                        .render(&mut out, name, l, &DURATION_BUCKETS_MS, count),
                    1 => s
                        .request_bytes
                        .render(&mut out, name, l, &SIZE_BUCKETS, count),
                    _ => s
                        .response_bytes
                        .render(&mut out, name, l, &SIZE_BUCKETS, count),
                }
            }
        }
        for (name, v) in [
            ("istio_tcp_connections_opened_total", &self.tcp_opened),
            ("istio_tcp_connections_closed_total", &self.tcp_closed),
            ("istio_tcp_sent_bytes_total", &self.tcp_sent),
            ("istio_tcp_received_bytes_total", &self.tcp_received),
            ("hypha_metrics_series_overflow_total", &self.overflow),
            (
                "hypha_inbound_plaintext_refused_total",
                &self.plaintext_refused,
            ),
            (
                "hypha_inbound_tls_handshake_errors_total",
                &self.tls_refused,
            ),
            ("hypha_rbac_denied_requests_total", &self.rbac_denied_http),
            ("hypha_rbac_denied_connections_total", &self.rbac_denied_tcp),
            ("hypha_rbac_audited_total", &self.rbac_audited),
            (
                "hypha_outbound_no_filter_chain_total",
                &self.no_filter_chain,
            ),
            ("hypha_inbound_not_ready_total", &self.inbound_refused[0]),
            ("hypha_inbound_blackholed_total", &self.inbound_refused[1]),
            (
                "hypha_inbound_no_filter_chain_total",
                &self.inbound_refused[2],
            ),
            (
                "hypha_inbound_chain_changed_total",
                &self.inbound_refused[3],
            ),
        ] {
            let _ = writeln!(
                out,
                "# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        out
    }
}

/// A series key from the parts that vary per request; the rest of the labels are fixed per
/// proxy. FNV-1a, so equal parts always give the same key.
pub fn series_key(
    reporter: Reporter,
    service: &str,
    code: u16,
    flags: &str,
    grpc_status: Option<u16>,
    peer: Option<&str>,
) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    };
    eat(&[reporter as u8]);
    eat(service.as_bytes());
    eat(&code.to_le_bytes());
    eat(flags.as_bytes());
    eat(&grpc_status.map_or([0xff, 0xff], u16::to_le_bytes));
    eat(peer.unwrap_or("").as_bytes());
    h
}

/// The proxy's own workload, for the `source_*` (outbound) or `destination_*` (inbound) labels.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    pub workload: String,
    pub namespace: String,
    pub app: String,
    pub version: String,
}

/// Metrics plus who this proxy is, and the access log when enabled.
#[derive(Default)]
pub struct Telemetry {
    pub metrics: Metrics,
    pub me: Identity,
    pub access_log: Option<AccessLog>,
    /// The PKCS#11 token holding the workload key, whose operations `/metrics` reports.
    pub token: Option<Arc<hypha_keys::pkcs11::Token>>,
    /// The multi-buffer RSA batcher signing for the workload key (`hypha_cryptomb_*`).
    pub batcher: Option<Arc<hypha_keys::batch::Batcher>>,
}

/// What an access log line needs from the request, captured when it arrives (only when the
/// access log is on).
pub struct AccessEntry {
    start: std::time::SystemTime,
    method: String,
    path: String,
    authority: String,
    request_id: String,
    user_agent: String,
    peer: std::net::SocketAddr,
}

impl AccessEntry {
    pub fn new(parts: &http::request::Parts, peer: std::net::SocketAddr) -> AccessEntry {
        let header = |name: &str| {
            parts
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_owned()
        };
        AccessEntry {
            start: std::time::SystemTime::now(),
            method: parts.method.to_string(),
            path: parts
                .uri
                .path_and_query()
                .map_or("/".into(), |pq| pq.as_str().to_owned()),
            authority: parts
                .uri
                .authority()
                .map_or_else(|| header("host"), |a| a.as_str().to_owned()),
            request_id: header("x-request-id"),
            user_agent: header("user-agent"),
            peer,
        }
    }
}

/// JSON access log lines, one per request, written by a task of their own so the request path
/// never waits on stdout; when the writer falls behind, lines are dropped and counted.
pub struct AccessLog {
    tx: tokio::sync::mpsc::Sender<String>,
    pub dropped: AtomicU64,
}

impl AccessLog {
    /// Starts the writer task (on the current runtime); lines go to `out`.
    pub fn start(mut out: impl std::io::Write + Send + 'static) -> AccessLog {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(4096);
        tokio::task::spawn_blocking(move || {
            while let Some(line) = rx.blocking_recv() {
                let _ = writeln!(out, "{line}");
                // Flush when the queue is empty: batches under load, prompt when idle.
                if rx.is_empty() {
                    let _ = out.flush();
                }
            }
        });
        AccessLog {
            tx,
            dropped: AtomicU64::new(0),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn write(
        &self,
        e: &AccessEntry,
        reporter: Reporter,
        cluster: &str,
        code: u16,
        flags: &str,
        o: &Observation,
        peer: Option<&str>,
    ) {
        let start = e
            .start
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let line = serde_json::json!({
            "start_time_unix_ms": start.as_millis() as u64,
            "reporter": match reporter { Reporter::Source => "source", Reporter::Destination => "destination" },
            "method": e.method,
            "path": e.path,
            "authority": e.authority,
            "response_code": code,
            "response_flags": flags,
            "grpc_status": o.grpc_status,
            "bytes_received": o.request_bytes,
            "bytes_sent": o.response_bytes,
            "duration_ms": (o.duration_ms * 1000.0).round() / 1000.0,
            "upstream_cluster": cluster,
            "x_request_id": e.request_id,
            "user_agent": e.user_agent,
            "downstream_remote_address": e.peer.to_string(),
            // The caller's verified SPIFFE ID (inbound, over mutual TLS).
            "downstream_peer_principal": peer,
        })
        .to_string();
        if self.tx.try_send(line).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A request being served, to be counted (and logged) when its response ends.
pub struct InFlight {
    start: std::time::Instant,
    request_bytes: u64,
    entry: Option<AccessEntry>,
}

impl Telemetry {
    /// Prometheus text exposition: the request and connection metrics, then the key
    /// provider's (token or batcher).
    pub fn render(&self) -> String {
        let mut out = self.metrics.render();
        if let Some(token) = &self.token {
            render_token(&mut out, &token.metrics());
        }
        if let Some(batcher) = &self.batcher {
            render_batcher(&mut out, &batcher.metrics());
        }
        out
    }

    /// Starts accounting for a request (captures what the access log needs, if it is on).
    pub fn begin(
        &self,
        parts: &http::request::Parts,
        request_bytes: u64,
        peer: std::net::SocketAddr,
    ) -> InFlight {
        InFlight {
            start: std::time::Instant::now(),
            request_bytes,
            entry: self
                .access_log
                .as_ref()
                .map(|_| AccessEntry::new(parts, peer)),
        }
    }

    /// Counts (and logs) the request once its response, with `code` and `flags`, has sent
    /// `response_bytes`. `peer` is the other side's verified SPIFFE ID, when the connection
    /// was mutual TLS (the caller's, for the destination reporter).
    pub fn end(
        &self,
        r: InFlight,
        reporter: Reporter,
        cluster: &str,
        out: Outcome,
        peer: Option<&str>,
    ) {
        let o = Observation {
            duration_ms: r.start.elapsed().as_secs_f64() * 1000.0,
            request_bytes: r.request_bytes,
            response_bytes: out.bytes,
            grpc_status: out.grpc_status,
        };
        self.observe(reporter, cluster, out.code, out.flags, &o, peer);
        if let (Some(log), Some(entry)) = (&self.access_log, r.entry) {
            log.write(&entry, reporter, cluster, out.code, out.flags, &o, peer);
        }
    }

    /// Counts a finished request. `cluster` is the cluster it went to (`outbound|80|v1|host`),
    /// or empty when the proxy answered itself before choosing one. `peer`: see [`Self::end`].
    pub fn observe(
        &self,
        reporter: Reporter,
        cluster: &str,
        code: u16,
        flags: &'static str,
        o: &Observation,
        peer: Option<&str>,
    ) {
        let key = series_key(reporter, cluster, code, flags, o.grpc_status, peer);
        self.metrics.record(
            key,
            || {
                let service = cluster.rsplit('|').next().unwrap_or("");
                let service = if service.is_empty() {
                    "unknown"
                } else {
                    service
                };
                let subset = cluster.split('|').nth(2).filter(|s| !s.is_empty());
                let me = &self.me;
                let unknown = || "unknown".to_owned();
                let (source, destination) = match reporter {
                    Reporter::Source => (
                        (
                            me.workload.clone(),
                            me.namespace.clone(),
                            me.app.clone(),
                            me.version.clone(),
                        ),
                        (
                            unknown(),
                            service
                                .split('.')
                                .nth(1)
                                .map_or_else(unknown, str::to_owned),
                            unknown(),
                            subset.map_or_else(unknown, str::to_owned),
                        ),
                    ),
                    Reporter::Destination => (
                        (
                            unknown(),
                            // The caller's namespace, from its SPIFFE ID.
                            peer.and_then(|p| p.split("/ns/").nth(1))
                                .and_then(|rest| rest.split('/').next())
                                .map_or_else(unknown, str::to_owned),
                            unknown(),
                            unknown(),
                        ),
                        (
                            me.workload.clone(),
                            me.namespace.clone(),
                            me.app.clone(),
                            me.version.clone(),
                        ),
                    ),
                };
                Labels {
                    reporter,
                    source_workload: source.0,
                    source_namespace: source.1,
                    source_app: source.2,
                    source_version: source.3,
                    source_principal: match reporter {
                        Reporter::Destination => peer.map_or_else(unknown, str::to_owned),
                        Reporter::Source => unknown(),
                    },
                    destination_workload: destination.0,
                    destination_namespace: destination.1,
                    destination_app: destination.2,
                    destination_version: destination.3,
                    destination_principal: "unknown".into(),
                    destination_service: service.to_owned(),
                    request_protocol: if o.grpc_status.is_some() {
                        "grpc"
                    } else {
                        "http"
                    },
                    response_code: code,
                    grpc_response_status: o.grpc_status,
                    response_flags: flags,
                    // Istio reports the policy on the destination side only.
                    connection_security_policy: match (reporter, peer) {
                        (Reporter::Destination, Some(_)) => "mutual_tls",
                        (Reporter::Destination, None) => "none",
                        (Reporter::Source, _) => "unknown",
                    },
                }
            },
            o,
        );
    }
}

/// The workload key's token: operations, queue and timings (`hypha_pkcs11_*`).
fn render_token(out: &mut String, m: &hypha_keys::pkcs11::TokenMetrics) {
    let token = format!("token=\"{}\"", esc(&m.label));
    let _ = writeln!(
        out,
        "# TYPE hypha_pkcs11_signatures_total counter\n\
hypha_pkcs11_signatures_total{{{token},result=\"ok\"}} {}\n\
hypha_pkcs11_signatures_total{{{token},result=\"error\"}} {}\n\
# TYPE hypha_pkcs11_keys_generated_total counter\n\
hypha_pkcs11_keys_generated_total{{{token}}} {}\n\
# TYPE hypha_pkcs11_keys_destroyed_total counter\n\
hypha_pkcs11_keys_destroyed_total{{{token}}} {}\n\
# TYPE hypha_pkcs11_abandoned_total counter\n\
hypha_pkcs11_abandoned_total{{{token}}} {}\n\
# TYPE hypha_pkcs11_queued gauge\n\
hypha_pkcs11_queued{{{token}}} {}\n\
# TYPE hypha_pkcs11_threads gauge\n\
hypha_pkcs11_threads{{{token}}} {}",
        m.signed, m.sign_failed, m.generated, m.destroyed, m.abandoned, m.queued, m.threads
    );
    for (name, h) in [
        ("hypha_pkcs11_sign_seconds", &m.sign_time),
        ("hypha_pkcs11_queue_wait_seconds", &m.wait_time),
    ] {
        render_seconds(out, name, &token, h);
    }
}

/// A duration histogram over the key providers' buckets.
fn render_seconds(out: &mut String, name: &str, labels: &str, h: &hypha_keys::metrics::Histogram) {
    use hypha_keys::metrics::SECONDS_BUCKETS;
    let _ = writeln!(out, "# TYPE {name} histogram");
    for (bound, n) in SECONDS_BUCKETS.iter().zip(&h.cumulative) {
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "{name}_bucket{{{labels},le=\"+Inf\"}} {}\n{name}_sum{{{labels}}} {}\n{name}_count{{{labels}}} {}",
        h.count, h.sum_seconds, h.count
    );
}

/// The compiled match tables, by kind (`table`: "route", "domain"), summed per kind
/// (`hypha_matcher_*`): how many, their rules and anchor patterns, the automata they took
/// (dense, lazy), how often a pattern set was split to fit its budget, their memory, and
/// lazy-cache clears (a sign the budget is too small for the traffic).
pub fn render_matcher(out: &mut String, kinds: &[(&str, Vec<hypha_matcher::Stats>)]) {
    /// A family's name, type, and series (labels, value from the table count and the sums).
    type Family = (&'static str, &'static str, &'static [(&'static str, Field)]);
    type Field = fn(usize, &hypha_matcher::Stats) -> u64;
    let families: [Family; 7] = [
        ("tables", "gauge", &[("", |n, _| n as u64)]),
        ("rules", "gauge", &[("", |_, s| s.rules as u64)]),
        (
            "patterns",
            "gauge",
            &[
                ("index=\"literal\"", |_, s| s.exact_literals as u64),
                ("index=\"automaton\"", |_, s| {
                    (s.patterns - s.exact_literals) as u64
                }),
            ],
        ),
        (
            "automata",
            "gauge",
            &[
                ("shape=\"dense\"", |_, s| s.dense_dfas as u64),
                ("shape=\"lazy\"", |_, s| s.lazy_dfas as u64),
            ],
        ),
        ("splits", "gauge", &[("", |_, s| s.splits as u64)]),
        (
            "memory_bytes",
            "gauge",
            &[
                ("part=\"automata\"", |_, s| s.dfa_bytes as u64),
                ("part=\"lazy_cache_per_thread\"", |_, s| {
                    s.lazy_cache_bytes as u64
                }),
            ],
        ),
        (
            "lazy_cache_clears_total",
            "counter",
            &[("", |_, s| s.lazy_cache_clears)],
        ),
    ];
    let sums: Vec<(String, usize, hypha_matcher::Stats)> = kinds
        .iter()
        .map(|(table, stats)| {
            let mut sum = hypha_matcher::Stats::default();
            for s in stats {
                sum.rules += s.rules;
                sum.patterns += s.patterns;
                sum.exact_literals += s.exact_literals;
                sum.dense_dfas += s.dense_dfas;
                sum.lazy_dfas += s.lazy_dfas;
                sum.splits += s.splits;
                sum.dfa_bytes += s.dfa_bytes;
                sum.lazy_cache_bytes += s.lazy_cache_bytes;
                sum.lazy_cache_clears += s.lazy_cache_clears;
            }
            (format!("table=\"{table}\""), stats.len(), sum)
        })
        .collect();
    for (name, kind, series) in families {
        let _ = writeln!(out, "# TYPE hypha_matcher_{name} {kind}");
        for (t, n, sum) in &sums {
            for (label, field) in series {
                let sep = if label.is_empty() { "" } else { "," };
                let value = field(*n, sum);
                let _ = writeln!(out, "hypha_matcher_{name}{{{t}{sep}{label}}} {value}");
            }
        }
    }
}

/// The peer chains the current certificate's TLS contexts checked (`hypha_identity::verified`):
/// `hit`, accepted as verified before without checking the signatures again; `miss`, verified
/// in full. Inbound is the server context, outbound the client one. New contexts, and so new
/// counts from 0, come with each certificate rotation or trust-bundle change.
pub fn render_chain_cache(
    out: &mut String,
    inbound: hypha_identity::tls::ChainCacheStats,
    outbound: hypha_identity::tls::ChainCacheStats,
) {
    out.push_str("# TYPE hypha_tls_peer_chains_total counter\n");
    for (direction, s) in [("inbound", inbound), ("outbound", outbound)] {
        for (result, n) in [("hit", s.hits), ("miss", s.misses)] {
            let _ = writeln!(
                out,
                "hypha_tls_peer_chains_total{{direction=\"{direction}\",result=\"{result}\"}} {n}"
            );
        }
    }
}

/// The multi-buffer RSA batcher (`hypha_cryptomb_*`): operations, batches by size and by
/// flush reason, keys batched or handed to BoringSSL, queue wait.
fn render_batcher(out: &mut String, m: &hypha_keys::batch::BatchMetrics) {
    let engine = format!("engine=\"{}\"", m.engine);
    let _ = writeln!(
        out,
        "# TYPE hypha_cryptomb_operations_total counter\n\
hypha_cryptomb_operations_total{{{engine},result=\"ok\"}} {}\n\
hypha_cryptomb_operations_total{{{engine},result=\"error\"}} {}\n\
# TYPE hypha_cryptomb_batches_total counter\n\
hypha_cryptomb_batches_total{{{engine},reason=\"full\"}} {}\n\
hypha_cryptomb_batches_total{{{engine},reason=\"timer\"}} {}\n\
hypha_cryptomb_batches_total{{{engine},reason=\"idle\"}} {}\n\
# TYPE hypha_cryptomb_keys_total counter\n\
hypha_cryptomb_keys_total{{{engine},path=\"batched\"}} {}\n\
hypha_cryptomb_keys_total{{{engine},path=\"fallback\"}} {}\n\
# TYPE hypha_cryptomb_queues gauge\n\
hypha_cryptomb_queues{{{engine}}} {}\n\
# TYPE hypha_cryptomb_batch_size histogram",
        m.ok,
        m.failed,
        m.flushed_full,
        m.flushed_timer,
        m.flushed_idle,
        m.batched_keys,
        m.fallback_keys,
        m.queues
    );
    let mut cumulative = 0;
    for (i, n) in m.batch_sizes.iter().enumerate() {
        cumulative += n;
        let _ = writeln!(
            out,
            "hypha_cryptomb_batch_size_bucket{{{engine},le=\"{}\"}} {cumulative}",
            i + 1
        );
    }
    let sum: u64 = m
        .batch_sizes
        .iter()
        .zip(1..)
        .map(|(n, size)| n * size)
        .sum();
    let _ = writeln!(
        out,
        "hypha_cryptomb_batch_size_bucket{{{engine},le=\"+Inf\"}} {cumulative}\n\
hypha_cryptomb_batch_size_sum{{{engine}}} {sum}\n\
hypha_cryptomb_batch_size_count{{{engine}}} {cumulative}"
    );
    render_seconds(
        out,
        "hypha_cryptomb_queue_wait_seconds",
        &engine,
        &m.queue_wait,
    );
}
