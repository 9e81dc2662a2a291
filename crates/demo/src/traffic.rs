//! Driving traffic into the demo mesh and summing up what happened: every request goes in
//! through the `demo-client` sidecar (HTTP proxy mode), as a browser behind `HTTP_PROXY`
//! would, and what the apps answered (who served reviews, how the ratings call went, whether
//! the trace headers arrived) is read from productpage's page. The mesh's own view comes from
//! the sidecars' `/metrics`.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue, StatusCode};
use serde_json::Value;

use crate::client::{self, ProxyClient};
use crate::mesh::Mesh;
use crate::metrics::{self, Sample};
use crate::topology::{host, CLIENT, NAMESPACE, SERVICE_PORT};

/// A fault delay on ratings is 100 ms: a call that took at least this long was delayed.
const DELAYED: f64 = 100.0;

/// What one request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// `/productpage`, as jason or anonymously.
    Page { jason: bool },
    /// `/healthz`: a direct response from the client's sidecar.
    Health,
    /// `/index.html`: a redirect from the client's sidecar.
    OldHome,
    /// `/legacy/productpage`: the prefix `/legacy/` rewritten to `/`, and `x-legacy: true` set
    /// on the way.
    Legacy,
}

impl Kind {
    fn path(self) -> &'static str {
        match self {
            Kind::Page { .. } => "/productpage",
            Kind::Health => "/healthz",
            Kind::OldHome => "/index.html",
            Kind::Legacy => "/legacy/productpage",
        }
    }
}

/// One request's outcome.
#[derive(Debug, Clone)]
struct Outcome {
    kind: Kind,
    request_id: String,
    latency: Duration,
    /// `Err` when no response came back.
    reply: Result<client::Reply, String>,
}

/// The requests to send: `pages` page views (a third as jason) with a few of each other kind
/// spread among them.
pub fn plan(pages: usize) -> Vec<Kind> {
    let mut kinds: Vec<Kind> = (0..pages)
        .map(|i| Kind::Page { jason: i % 3 == 0 })
        .collect();
    let each = (pages / 8).clamp(1, 5);
    let extras: Vec<Kind> = (0..each)
        .flat_map(|_| [Kind::Health, Kind::OldHome, Kind::Legacy])
        .collect();
    let step = kinds.len() / (extras.len() + 1) + 1;
    for (i, k) in extras.into_iter().enumerate() {
        kinds.insert(((i + 1) * step).min(kinds.len()), k);
    }
    kinds
}

/// Sends `kinds` through the client's sidecar, `concurrency` at a time.
async fn send_all(mesh: &Mesh, kinds: Vec<Kind>, concurrency: usize) -> Vec<Outcome> {
    let client = ProxyClient::new(
        mesh.plan
            .reach(crate::topology::CLIENT, mesh.plan.client_proxy),
        Duration::from_secs(10),
    );
    let kinds = Arc::new(kinds);
    let next = Arc::new(AtomicUsize::new(0));
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (client, kinds, next) = (client.clone(), kinds.clone(), next.clone());
        tasks.spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&kind) = kinds.get(i) else {
                    return out;
                };
                out.push(send_one(&client, kind, seed, i).await);
            }
        });
    }
    let mut all = Vec::new();
    while let Some(done) = tasks.join_next().await {
        all.extend(done.unwrap_or_default());
    }
    all
}

/// Trace headers as a tracing client would send them: a W3C `traceparent` and B3.
fn trace_headers(seed: u64, i: usize) -> (String, HeaderMap) {
    let trace = format!("{seed:016x}{:016x}", i as u64);
    let span = format!("{:016x}", seed.rotate_left(17) ^ i as u64);
    let request_id = format!("demo-{seed:x}-{i}");
    let mut h = HeaderMap::new();
    let mut set = |name: &'static str, v: String| {
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(name, v);
        }
    };
    set("x-request-id", request_id.clone());
    set("traceparent", format!("00-{trace}-{span}-01"));
    set("x-b3-traceid", trace);
    set("x-b3-spanid", span);
    set("x-b3-sampled", "1".into());
    (request_id, h)
}

async fn send_one(client: &ProxyClient, kind: Kind, seed: u64, i: usize) -> Outcome {
    let (request_id, mut headers) = trace_headers(seed, i);
    if kind == (Kind::Page { jason: true }) {
        headers.insert("end-user", HeaderValue::from_static("jason"));
    }
    let start = Instant::now();
    let reply = client
        .get(&Mesh::productpage_url(kind.path()), &headers)
        .await
        .map_err(|e| e.to_string());
    Outcome {
        kind,
        request_id,
        latency: start.elapsed(),
        reply,
    }
}

/// Counts by name, e.g. reviews version → pages.
pub type Counts = BTreeMap<String, usize>;

/// What the demo saw.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub elapsed: Duration,
    pub concurrency: usize,
    /// Requests sent, by kind.
    pub sent: BTreeMap<String, usize>,
    /// Status codes by kind (`-` for no response).
    pub statuses: BTreeMap<String, Counts>,
    /// Page views that got 200.
    pub pages: usize,
    pub pages_ok: usize,
    /// Which reviews answered jason's pages, and everyone else's (`reviews-v1` ...).
    pub jason: Counts,
    pub anonymous: Counts,
    pub p50: Duration,
    pub p99: Duration,
    /// Pages on which the request id reached details, reviews and (if called) ratings.
    pub traced: usize,
    /// Redirect targets of `/index.html`.
    pub redirects: Counts,
    /// `/healthz` bodies.
    pub health: Counts,
    /// `/legacy/productpage` pages that productpage saw with `x-legacy: true`.
    pub legacy_rewritten: usize,
    /// reviews → ratings gRPC calls, and how they went.
    pub ratings_calls: usize,
    pub ratings_delayed: usize,
    pub ratings_aborted: usize,
    pub ratings_failed: usize,
    /// Calls to each service (by app), as the sidecars counted them.
    pub calls: BTreeMap<String, Calls>,
    /// `istio_requests_total` as the calling sidecars reported it: (source workload,
    /// destination service, destination version, code, flags) → requests.
    pub source_metrics: BTreeMap<(String, String, String, String, String), f64>,
    /// As the serving sidecars reported it: (destination workload, code, flags) → requests.
    pub destination_metrics: BTreeMap<(String, String, String), f64>,
    /// How each serving sidecar saw its callers: (destination workload, the caller's
    /// verified SPIFFE ID, `connection_security_policy`) → requests.
    pub security: BTreeMap<(String, String, String), f64>,
    /// What the mesh refused, by (caller, target, outcome): the guest tenant's calls into
    /// bookinfo, and calls to ratings from anyone but reviews.
    pub denials: BTreeMap<(String, String, String), usize>,
    /// Each sidecar's workload identity from its `/certs`: (workload, SPIFFE ID, the issuing
    /// root's name, where its private key lives); `-` where a sidecar reported none.
    pub identities: Vec<(String, String, String, String)>,
    /// Where the mesh's keys were asked to live.
    pub keys: crate::Keys,
    /// Each CA signer and where its key lives, as the control plane logged it at start.
    pub signers: Vec<(String, String)>,
    /// Where the control plane's own serving key lives, from its log.
    pub control_key: String,
    /// With `--pods`: the pods, the unmodified client's answer, the bypass's counters.
    pub pods: Option<crate::pods::PodsReport>,
    /// With `--kubernetes`: the workloads are pods of the cluster.
    pub kubernetes: bool,
    /// With `--rotate-root`: the rotation under load.
    pub rotation: Option<crate::rotation::Report>,
}

impl Summary {
    /// The share of page views that succeeded.
    pub fn success_rate(&self) -> f64 {
        if self.pages == 0 {
            return 0.0;
        }
        self.pages_ok as f64 / self.pages as f64
    }

    /// The calls to one service (`details`, `reviews`, ...).
    pub fn calls(&self, app: &str) -> Calls {
        self.calls.get(app).copied().unwrap_or_default()
    }
}

/// Calls to one service: what the callers' sidecars answered (after retries) and what reached
/// the service's own sidecars (every try).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Calls {
    /// Requests the callers' sidecars sent on (not answered themselves, as a fault abort is).
    pub requests: f64,
    /// Of those, the ones that did not end in 2xx.
    pub errors: f64,
    /// Tries that reached the service, and the ones it failed.
    pub tries: f64,
    pub failed_tries: f64,
}

impl Calls {
    /// Tries beyond one per request: the mesh's retries.
    pub fn retries(&self) -> f64 {
        (self.tries - self.requests).max(0.0)
    }
}

fn kind_name(k: Kind) -> String {
    match k {
        Kind::Page { jason: true } => "page (jason)".into(),
        Kind::Page { jason: false } => "page".into(),
        _ => k.path().into(),
    }
}

fn str_at<'v>(v: &'v Value, path: &[&str]) -> &'v str {
    path.iter()
        .try_fold(v, |v, k| v.get(k))
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// Runs the traffic and sums it up (metrics included).
pub async fn drive(mesh: &Mesh, pages: usize, concurrency: usize) -> Summary {
    let kinds = plan(pages);
    // The client's sidecar has counted the readiness checks already.
    let expected = client_counted(mesh).await + kinds.len() as f64;
    let start = Instant::now();
    let outcomes = send_all(mesh, kinds, concurrency).await;
    let mut s = Summary {
        elapsed: start.elapsed(),
        concurrency,
        kubernetes: mesh.cluster.is_some(),
        ..Summary::default()
    };
    let mut latencies = Vec::new();
    for o in &outcomes {
        let name = kind_name(o.kind);
        *s.sent.entry(name.clone()).or_default() += 1;
        let code = o
            .reply
            .as_ref()
            .map_or("-".to_owned(), |r| r.status.as_u16().to_string());
        *s.statuses.entry(name).or_default().entry(code).or_default() += 1;
        let Ok(reply) = &o.reply else { continue };
        let page: Value = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
        match o.kind {
            Kind::Page { jason } => {
                s.pages += 1;
                latencies.push(o.latency);
                if reply.status != StatusCode::OK {
                    continue;
                }
                s.pages_ok += 1;
                let by = str_at(&page, &["reviews", "served_by"]).to_owned();
                let counts = if jason {
                    &mut s.jason
                } else {
                    &mut s.anonymous
                };
                *counts.entry(by).or_default() += 1;
                let call = &page["reviews"]["ratings_call"];
                let mut traced = str_at(&page, &["details", "request_id"]) == o.request_id
                    && str_at(&page, &["reviews", "request_id"]) == o.request_id;
                if call.is_object() {
                    s.ratings_calls += 1;
                    if call["ms"].as_f64().unwrap_or(0.0) >= DELAYED {
                        s.ratings_delayed += 1;
                    }
                    match (str_at(call, &["status"]), str_at(call, &["flags"])) {
                        ("ok", _) => traced &= str_at(call, &["request_id"]) == o.request_id,
                        (_, "FI") => s.ratings_aborted += 1,
                        _ => s.ratings_failed += 1,
                    }
                }
                if traced {
                    s.traced += 1;
                }
            }
            Kind::Health => {
                *s.health.entry(reply.text().trim().to_owned()).or_default() += 1;
            }
            Kind::OldHome => {
                let to = reply
                    .headers
                    .get(http::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("(no location)")
                    .to_owned();
                *s.redirects.entry(to).or_default() += 1;
            }
            Kind::Legacy => {
                if page["legacy"].as_bool() == Some(true) {
                    s.legacy_rewritten += 1;
                }
            }
        }
    }
    latencies.sort();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or_default()
    };
    s.p50 = pct(0.50);
    s.p99 = pct(0.99);
    let denied = denials(mesh).await;
    s.denials = denied.denials;
    scrape(mesh, &mut s, expected + denied.from_client).await;
    s
}

/// Requests of each kind the mesh should refuse.
const DENIALS: usize = 3;
/// Tries per refused request: one the caller's sidecar aborted by fault injection (flag FI,
/// ratings' 5 %) never reached the policy that refuses it, so it is asked again.
const DENIAL_TRIES: usize = 5;

struct Denied {
    denials: BTreeMap<(String, String, String), usize>,
    /// Of them, sent through the demo client's sidecar (which counts them).
    from_client: f64,
}

/// Calls the mesh config forbids: the guest tenant (namespace `guest`, which does not trust
/// bookinfo's root, nor bookinfo its) to productpage, and the demo client straight to
/// ratings (its AuthorizationPolicy lets only reviews call it).
async fn denials(mesh: &Mesh) -> Denied {
    let mut denials = BTreeMap::new();
    let mut from_client: u32 = 0;
    let calls = [
        (
            crate::topology::GUEST,
            mesh.plan.guest_proxy,
            "productpage",
            Mesh::productpage_url("/productpage"),
        ),
        (
            crate::topology::CLIENT,
            mesh.plan.client_proxy,
            "ratings",
            format!("http://{}:{SERVICE_PORT}/ratings/0", host("ratings")),
        ),
    ];
    for (who, proxy, target, url) in calls {
        let client = ProxyClient::new(mesh.plan.reach(who, proxy), Duration::from_secs(5));
        for _ in 0..DENIALS {
            let mut outcome = String::new();
            for _ in 0..DENIAL_TRIES {
                if who == crate::topology::CLIENT {
                    from_client += 1;
                }
                let (flags, o) = refused(&client, &url).await;
                outcome = o;
                if flags != "FI" {
                    break;
                }
            }
            *denials
                .entry((who.to_owned(), target.to_owned(), outcome))
                .or_default() += 1;
        }
    }
    Denied {
        denials,
        from_client: f64::from(from_client),
    }
}

/// One call the mesh should refuse: the response flags, and the outcome as the summary shows
/// it (`403 "RBAC: access denied"`, `503 UF`, ...).
async fn refused(client: &ProxyClient, url: &str) -> (String, String) {
    match client.get(url, &HeaderMap::new()).await {
        Ok(r) => {
            let flags = r
                .headers
                .get("x-hypha-response-flags")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let body = r.text();
            let body = if body.len() < 40 {
                format!(" \"{}\"", body.trim())
            } else {
                String::new()
            };
            let shown = if flags.is_empty() {
                String::new()
            } else {
                format!(" {flags}")
            };
            let outcome = format!("{}{shown}{body}", r.status.as_u16());
            (flags, outcome)
        }
        Err(e) => (String::new(), format!("error: {e}")),
    }
}

/// The requests the client's sidecar has counted.
async fn client_counted(mesh: &Mesh) -> f64 {
    let admin = mesh
        .plan
        .reach(crate::topology::CLIENT, mesh.plan.client_admin);
    let text = client::get_at(&admin, "/metrics", Duration::from_secs(5))
        .await
        .map(|r| r.text())
        .unwrap_or_default();
    metrics::samples(&text, "istio_requests_total")
        .iter()
        .map(|x| x.value)
        .sum()
}

/// Each CA signer and where its key lives, from the control plane's start-up log lines
/// (`signer=... token=... key=...` for a token-held key, `dir=...` for a key file).
fn signers(log: &str) -> Vec<(String, String)> {
    let mut out = BTreeMap::new();
    for line in log.lines() {
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
                .map(str::to_owned)
        };
        if line.contains("CA key") && line.contains("token") {
            if let (Some(signer), Some(token), Some(key)) =
                (field("signer"), field("token"), field("key"))
            {
                out.insert(signer, format!("PKCS#11 token {token:?}, key {key:?}"));
            }
        } else if line.contains("CA key and root") {
            if let Some(dir) = field("dir") {
                let signer = dir.rsplit('/').next().unwrap_or(&dir).to_owned();
                out.insert(signer, format!("software, key file (0600) in {dir}"));
            }
        }
    }
    out.into_iter().collect()
}

/// Reads every sidecar's `/metrics` into the summary. Each request is counted when its
/// response body ends, which the sidecar may see an instant after the client: first waits
/// (bounded) until the client's sidecar has counted `expected` requests.
async fn scrape(mesh: &Mesh, s: &mut Summary, expected: f64) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while client_counted(mesh).await < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (name, admin) in mesh.admins() {
        let certs = client::get_at(&admin, "/certs", Duration::from_secs(5))
            .await
            .map(|r| r.text())
            .unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&certs).unwrap_or_default();
        let field = |x: &serde_json::Value| x.as_str().unwrap_or("-").to_owned();
        s.identities.push((
            name,
            field(&v["identity"]),
            field(&v["roots"][0]),
            field(&v["key"]),
        ));
    }
    s.keys = mesh.keys;
    // The lines are the log's first: read from the start (it is small).
    let log = std::fs::read_to_string(mesh.log_dir().join("control.log")).unwrap_or_default();
    s.signers = signers(&log);
    s.control_key = log
        .lines()
        .filter(|l| l.contains("control plane certificate issued"))
        .find_map(|l| l.split(" key=").nth(1))
        .unwrap_or("-")
        .trim()
        .to_owned();
    let mut texts = Vec::new();
    for (_, admin) in mesh.admins() {
        let text = client::get_at(&admin, "/metrics", Duration::from_secs(5))
            .await
            .map(|r| r.text())
            .unwrap_or_default();
        texts.push(text);
    }
    for text in &texts {
        for x in metrics::samples(text, "istio_requests_total") {
            let l = |k: &str| Sample::label(&x, k).to_owned();
            let ok = x.label("response_code").starts_with('2');
            if x.label("reporter") == "source" {
                let key = (
                    l("source_workload"),
                    l("destination_service"),
                    l("destination_version"),
                    l("response_code"),
                    l("response_flags"),
                );
                *s.source_metrics.entry(key).or_default() += x.value;
                let service = x.label("destination_service");
                let app = service.strip_suffix(&format!(".{NAMESPACE}.svc.cluster.local"));
                if let (Some(app), false) = (app, x.label("response_flags") == "FI") {
                    let c = s.calls.entry(app.to_owned()).or_default();
                    c.requests += x.value;
                    if !ok {
                        c.errors += x.value;
                    }
                }
            } else {
                let key = (
                    l("destination_workload"),
                    l("response_code"),
                    l("response_flags"),
                );
                *s.destination_metrics.entry(key).or_default() += x.value;
                let key = (
                    l("destination_workload"),
                    l("source_principal"),
                    l("connection_security_policy"),
                );
                *s.security.entry(key).or_default() += x.value;
                let c = s.calls.entry(l("destination_app")).or_default();
                c.tries += x.value;
                if !ok {
                    c.failed_tries += x.value;
                }
            }
        }
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn counts(c: &Counts, total: usize) -> String {
    c.iter()
        .map(|(k, n)| {
            if total > 0 && c.len() > 1 {
                format!("{k} {n} ({:.0} %)", *n as f64 * 100.0 / total as f64)
            } else {
                format!("{k} {n}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sent: usize = self.sent.values().sum();
        let codes = |kind: &str| {
            self.statuses
                .get(kind)
                .map(|c| {
                    c.iter()
                        .map(|(code, n)| format!("{code} ×{n}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default()
        };
        let n = |kind: &str| self.sent.get(kind).copied().unwrap_or(0);
        writeln!(
            f,
            "Traffic: {sent} requests into the {CLIENT} sidecar, {} at a time, in {:.2} s",
            self.concurrency,
            self.elapsed.as_secs_f64()
        )?;
        writeln!(
            f,
            "  /productpage        {:>4}   success {:.1} %   latency p50 {}   p99 {}",
            self.pages,
            self.success_rate() * 100.0,
            ms(self.p50),
            ms(self.p99)
        )?;
        let jason: usize = self.jason.values().sum();
        let anonymous: usize = self.anonymous.values().sum();
        writeln!(
            f,
            "    end-user: jason   {:>4}   reviews: {}   (route jason-gets-v2)",
            n("page (jason)"),
            counts(&self.jason, jason)
        )?;
        writeln!(
            f,
            "    anyone else       {:>4}   reviews: {}   (route canary: v1 80 %, v3 20 %)",
            n("page"),
            counts(&self.anonymous, anonymous)
        )?;
        if jason + anonymous < self.pages {
            writeln!(
                f,
                "    failed pages: {} / {}",
                codes("page (jason)"),
                codes("page")
            )?;
        }
        let first = |c: &Counts| c.keys().next().cloned().unwrap_or_default();
        writeln!(
            f,
            "  /healthz            {:>4}   {}   body {:?} (direct response from the sidecar)",
            n("/healthz"),
            codes("/healthz"),
            first(&self.health)
        )?;
        writeln!(
            f,
            "  /index.html         {:>4}   {}   → {} (redirect)",
            n("/index.html"),
            codes("/index.html"),
            first(&self.redirects)
        )?;
        writeln!(
            f,
            "  /legacy/productpage {:>4}   {}   rewritten to /productpage, x-legacy: true on {}",
            n("/legacy/productpage"),
            codes("/legacy/productpage"),
            self.legacy_rewritten
        )?;
        writeln!(
            f,
            "  trace headers (x-request-id, traceparent, x-b3-*) reached every service on {} of {} pages",
            self.traced, self.pages_ok
        )?;
        writeln!(
            f,
            "Faults on ratings (delay 100 ms on 10 %, abort 503 on 5 %), as reviews v2/v3 saw them:"
        )?;
        writeln!(
            f,
            "  {} gRPC calls to ratings: {} delayed, {} aborted (gRPC UNAVAILABLE, flag FI), {} other errors",
            self.ratings_calls, self.ratings_delayed, self.ratings_aborted, self.ratings_failed
        )?;
        writeln!(
            f,
            "Retries: details fails one request in ten on purpose, and its route retries 5xx:"
        )?;
        for (app, c) in &self.calls {
            if app == CLIENT || app == "productpage" {
                continue;
            }
            writeln!(
                f,
                "  {app:<8} {:>4} requests, {:>4} tries ({} retries, {} failed tries), {} errors returned to the caller",
                c.requests,
                c.tries,
                c.retries(),
                c.failed_tries,
                c.errors
            )?;
        }
        if self.kubernetes {
            writeln!(
                f,
                "Identities: each sidecar's certificate from the mesh CA (a pod's: its service-account token, checked by TokenReview; the clients outside the cluster: a join token; renewal at half life; xDS over mutual TLS)"
            )?;
        } else {
            writeln!(
                f,
                "Identities: each sidecar's certificate from the mesh CA (join token, then renewal at half life; xDS over mutual TLS)"
            )?;
        }
        for (signer, key) in &self.signers {
            writeln!(f, "  CA signer {signer:<9} key: {key}")?;
        }
        writeln!(
            f,
            "  control plane's own TLS key (xDS and the CA API): {}",
            self.control_key
        )?;
        for (workload, id, root, key) in &self.identities {
            writeln!(f, "  {workload:<15} {id:<58} issued by {root}; key: {key}")?;
        }
        writeln!(
            f,
            "Mesh metrics: istio_requests_total from every sidecar's /metrics, by the caller's sidecar"
        )?;
        writeln!(
            f,
            "  {:<15} {:<40} {:<8} {:<5} {:<6} {:>8}",
            "source", "destination_service", "version", "code", "flags", "requests"
        )?;
        for ((src, svc, version, code, flags), v) in &self.source_metrics {
            writeln!(
                f,
                "  {src:<15} {svc:<40} {version:<8} {code:<5} {flags:<6} {v:>8}"
            )?;
        }
        writeln!(f, "  and by the serving sidecar (reporter=destination):")?;
        let mut line = Vec::new();
        for ((workload, code, flags), v) in &self.destination_metrics {
            let flags = if flags == "-" {
                String::new()
            } else {
                format!(" {flags}")
            };
            line.push(format!("{workload} {code}{flags} ×{v}"));
        }
        for chunk in line.chunks(4) {
            writeln!(f, "  {}", chunk.join(", "))?;
        }
        writeln!(f, "Refused, as the mesh config says:")?;
        for ((who, target, outcome), n) in &self.denials {
            let why = match target.as_str() {
                "productpage" => {
                    "another tenant: neither trusts the other's root, the handshake fails"
                }
                "ratings" => {
                    "AuthorizationPolicy ratings-from-reviews: only reviews may call ratings"
                }
                _ => "",
            };
            writeln!(f, "  {who:<15} → {target:<12} {outcome} ×{n}   ({why})")?;
        }
        writeln!(
            f,
            "Between sidecars, as each serving sidecar saw its callers (verified client certificate):"
        )?;
        for ((workload, principal, policy), v) in &self.security {
            let caller = principal.rsplit("/sa/").next().unwrap_or(principal);
            writeln!(f, "  {workload:<15} ← {caller:<22} {policy:<11} ×{v}")?;
        }
        if let Some(pods) = &self.pods {
            write!(f, "{pods}")?;
        }
        if let Some(rotation) = &self.rotation {
            write!(f, "{rotation}")?;
        }
        Ok(())
    }
}
