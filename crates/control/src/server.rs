//! The running control plane: holds the current config generation, hands each connecting
//! proxy a watch of its snapshot, and on every accepted config change recomputes and pushes
//! the snapshots. A config change with errors is reported in full and never replaces the last
//! good generation.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use envoy_types::pb::envoy::config::core::v3::Node;
use hypha_config::{Config, Diagnostics, LoadCache, Severity};
use hypha_xds::{AdsServer, Snapshot, SnapshotSource};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::translate::Translation;
use hypha_xds::ProxyInfo;

/// The bookinfo example, compiled in: what `hypha control` serves without `--config`.
pub const EMBEDDED_CONFIG: &[(&str, &str)] = &[
    (
        "embedded:mesh.yaml",
        include_str!("../../../examples/bookinfo/mesh.yaml"),
    ),
    (
        "embedded:services.yaml",
        include_str!("../../../examples/bookinfo/services.yaml"),
    ),
    (
        "embedded:workloads.yaml",
        include_str!("../../../examples/bookinfo/workloads.yaml"),
    ),
    (
        "embedded:routing.yaml",
        include_str!("../../../examples/bookinfo/routing.yaml"),
    ),
    (
        "embedded:destinations.yaml",
        include_str!("../../../examples/bookinfo/destinations.yaml"),
    ),
    (
        "embedded:security.yaml",
        include_str!("../../../examples/bookinfo/security.yaml"),
    ),
];

/// What an accepted config change did.
#[derive(Debug, Clone)]
pub struct Generation {
    pub number: u64,
    pub resources: usize,
    pub proxies: usize,
    /// Proxies whose view changed (the others were not sent anything).
    pub changed: usize,
    pub took: Duration,
}

struct Subscriber {
    proxy: ProxyInfo,
    tx: watch::Sender<Arc<Snapshot>>,
}

/// The control plane's state, shared by the xDS server and the config watcher.
#[derive(Clone)]
pub struct ControlPlane {
    inner: Arc<Inner>,
}

struct Inner {
    current: RwLock<Arc<Translation>>,
    generation: AtomicU64,
    rejected: AtomicU64,
    subscribers: Mutex<Vec<Subscriber>>,
    /// Whether a SPIFFE ID is revoked (set by the CA's secure endpoint): checked for every
    /// xDS stream, so a revoked identity cannot open a new one on a connection it already has.
    revoked: std::sync::OnceLock<Revoked>,
    /// Whether the config served is the sources' (see [`ControlPlane::set_ready`]).
    ready: std::sync::atomic::AtomicBool,
    /// Per node id, the secrets (name → version) its proxy last acknowledged: whether a new
    /// trust bundle is in force everywhere ([`ControlPlane::trust_acknowledged`]).
    acked_secrets: Mutex<HashMap<String, HashMap<String, String>>>,
    /// More of `/metrics` (the CA's rotation gauges), set once by whoever runs the CA.
    metrics: std::sync::OnceLock<Metrics>,
}

/// A part of `/metrics` in Prometheus' text format, made when scraped.
pub type Metrics = Arc<dyn Fn() -> String + Send + Sync>;

/// Whether the proxies connected have acknowledged the trust bundle they were last sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustAcknowledged {
    /// Proxies sent a trust bundle.
    pub proxies: usize,
    /// Node ids of those that have not acknowledged theirs yet.
    pub waiting: Vec<String>,
}

impl TrustAcknowledged {
    pub fn everywhere(&self) -> bool {
        self.waiting.is_empty()
    }
}

/// Whether a SPIFFE ID is revoked.
pub type Revoked = Arc<dyn Fn(&str) -> bool + Send + Sync>;

impl ControlPlane {
    /// Starts from a validated config, for sidecars without workload certificates.
    pub fn new(cfg: Config) -> ControlPlane {
        ControlPlane::start(Translation::new(Arc::new(cfg), "1"))
    }

    /// Starts from a validated config, for sidecars with workload certificates from the
    /// control plane's CA: traffic between them is mutual TLS (PeerAuthentication decides),
    /// each trusting its namespace's bundle.
    pub fn with_mtls(cfg: Config, signer_roots: crate::mtls::SignerRoots) -> ControlPlane {
        ControlPlane::start(Translation::with_mtls(
            Arc::new(cfg),
            "1",
            Arc::new(signer_roots),
        ))
    }

    fn start(first: Translation) -> ControlPlane {
        ControlPlane {
            inner: Arc::new(Inner {
                current: RwLock::new(Arc::new(first)),
                generation: AtomicU64::new(1),
                rejected: AtomicU64::new(0),
                subscribers: Mutex::new(Vec::new()),
                revoked: std::sync::OnceLock::new(),
                ready: std::sync::atomic::AtomicBool::new(true),
                acked_secrets: Mutex::default(),
                metrics: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Says whether the config served is complete: a source that pushes its first generation
    /// later (the cluster, once every kind is listed) clears it at start and sets it then.
    pub fn set_ready(&self, ready: bool) {
        self.inner.ready.store(ready, Ordering::SeqCst);
    }

    /// Adds `more` to `/metrics` of `hypha control --health`. Set once; later calls change
    /// nothing.
    pub fn add_metrics(&self, more: Metrics) {
        let _ = self.inner.metrics.set(more);
    }

    /// `/metrics` of `hypha control --health`: the config generation, proxies connected,
    /// changes refused, and what [`ControlPlane::add_metrics`] added.
    pub fn metrics(&self) -> String {
        let mut out = format!(
            "# HELP hypha_control_generation The config generation served.\n\
             # TYPE hypha_control_generation gauge\n\
             hypha_control_generation {}\n\
             # HELP hypha_control_proxies Proxies with an xDS stream open.\n\
             # TYPE hypha_control_proxies gauge\n\
             hypha_control_proxies {}\n\
             # HELP hypha_control_rejected_changes_total Config changes refused for their errors.\n\
             # TYPE hypha_control_rejected_changes_total counter\n\
             hypha_control_rejected_changes_total {}\n",
            self.inner.generation.load(Ordering::SeqCst),
            self.subscribers(),
            self.rejected_changes()
        );
        if let Some(more) = self.inner.metrics.get() {
            out.push_str(&more());
        }
        out
    }

    /// What `/ready` of `hypha control --health` answers.
    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::SeqCst)
    }

    pub fn current(&self) -> Arc<Translation> {
        self.inner
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How many config changes were rejected for errors (the old config kept serving).
    pub fn rejected_changes(&self) -> u64 {
        self.inner.rejected.load(Ordering::SeqCst)
    }

    /// A readable account of what is being served: services, endpoints by address family, and
    /// what one sidecar of each namespace receives.
    pub fn describe(&self) -> String {
        use std::fmt::Write;
        let t = self.current();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "generation {}: {} resources, trust domain {}, {} tenant(s)",
            t.version(),
            t.cfg.resource_count(),
            t.cfg.mesh.trust_domain,
            t.cfg.mesh.tenants.len()
        );
        let mut namespaces = std::collections::BTreeSet::new();
        for s in &t.registry.services {
            namespaces.insert(s.namespace.clone());
            let (mut v4, mut v6) = (0, 0);
            for e in &s.endpoints {
                for a in &e.addresses {
                    match a.parse::<std::net::IpAddr>() {
                        Ok(std::net::IpAddr::V4(_)) => v4 += 1,
                        Ok(std::net::IpAddr::V6(_)) => v6 += 1,
                        Err(_) => {}
                    }
                }
            }
            let ports: Vec<String> = s
                .ports
                .iter()
                .map(|p| format!("{}/{:?}", p.number, p.protocol))
                .collect();
            let _ = writeln!(
                out,
                "  service {} ports {} endpoints {} (IPv4 addresses {v4}, IPv6 {v6})",
                s.hostname,
                ports.join(","),
                s.endpoints.len()
            );
        }
        for ns in namespaces {
            let proxy = ProxyInfo {
                id: format!("sidecar~0.0.0.0~describe.{ns}~{ns}.svc"),
                namespace: ns.clone(),
                ..Default::default()
            };
            let snap = t.snapshot(&proxy);
            let count = |u: &str| snap.resources(u).map_or(0, |m| m.len());
            let _ = writeln!(
                out,
                "  a sidecar in namespace {ns} gets {} listeners, {} routes, {} clusters, {} endpoint sets",
                count(hypha_xds::type_url::LISTENER),
                count(hypha_xds::type_url::ROUTE),
                count(hypha_xds::type_url::CLUSTER),
                count(hypha_xds::type_url::ENDPOINT)
            );
        }
        out
    }

    /// The subscriber list, locked, with closed streams dropped.
    fn live_subscribers(&self) -> std::sync::MutexGuard<'_, Vec<Subscriber>> {
        let mut subs = self
            .inner
            .subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let before = subs.len();
        subs.retain(|s| !s.tx.is_closed());
        if subs.len() != before {
            // What the proxies gone acknowledged goes with them (the subscriber list is always
            // locked before this map, never after).
            let live: HashSet<&str> = subs.iter().map(|s| s.proxy.id.as_str()).collect();
            self.inner
                .acked_secrets
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|id, _| live.contains(id.as_str()));
        }
        subs
    }

    /// Has every new xDS stream refused when `revoked` says its identity is (the CA's deny
    /// list). Set once; later calls change nothing.
    pub fn check_revocation(&self, revoked: Revoked) {
        let _ = self.inner.revoked.set(revoked);
    }

    /// Ends the xDS streams of the proxies `gone` picks (their identities were revoked): they
    /// get no more config, and a new stream is refused.
    pub fn disconnect(&self, gone: impl Fn(&ProxyInfo) -> bool) -> usize {
        let mut subs = self.live_subscribers();
        let before = subs.len();
        subs.retain(|s| !gone(&s.proxy));
        before - subs.len()
    }

    /// Counts a config change refused for its errors (the old generation keeps serving), by
    /// a source other than the directory watch.
    pub fn reject(&self) {
        self.inner.rejected.fetch_add(1, Ordering::SeqCst);
    }

    /// Connected proxy streams.
    pub fn subscribers(&self) -> usize {
        self.live_subscribers().len()
    }

    /// Replaces the config with a new validated one and pushes every proxy's new snapshot.
    pub fn update(&self, cfg: Config) -> Generation {
        self.push(Arc::new(cfg), None)
    }

    /// Pushes the current config with new signer roots (a signer rotating its root): every
    /// tenant's trust bundle made again from them.
    pub fn set_signer_roots(&self, roots: crate::mtls::SignerRoots) -> Generation {
        let cfg = self.current().cfg.clone();
        self.push(cfg, Some(Arc::new(roots)))
    }

    /// Whether every connected proxy has acknowledged the `ROOTCA` bundle its current
    /// snapshot holds.
    pub fn trust_acknowledged(&self) -> TrustAcknowledged {
        let subs = self.live_subscribers();
        let acked = self
            .inner
            .acked_secrets
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut out = TrustAcknowledged::default();
        for s in subs.iter() {
            let snap = s.tx.borrow();
            let Some(bundle) = snap
                .resources(hypha_xds::type_url::SECRET)
                .and_then(|r| r.get(crate::mtls::ROOTCA))
            else {
                continue;
            };
            out.proxies += 1;
            let has = acked
                .get(&s.proxy.id)
                .and_then(|m| m.get(crate::mtls::ROOTCA));
            if has != Some(&bundle.version) {
                out.waiting.push(s.proxy.id.clone());
            }
        }
        out
    }

    fn push(&self, cfg: Arc<Config>, roots: Option<Arc<crate::mtls::SignerRoots>>) -> Generation {
        let start = Instant::now();
        let number = self.inner.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let resources = cfg.resource_count();
        let previous = self.current();
        let t = Arc::new(Translation::after_with_roots(
            cfg,
            number.to_string(),
            Some(&previous),
            roots,
        ));
        drop(previous);
        let built = start.elapsed();
        *self
            .inner
            .current
            .write()
            .unwrap_or_else(|e| e.into_inner()) = t.clone();
        let subs = self.live_subscribers();
        t.prepare(subs.iter().map(|s| &s.proxy));
        let prepared = start.elapsed();
        let mut changed = 0;
        for s in subs.iter() {
            let mut snap = t.snapshot(&s.proxy);
            // Unchanged parts keep their identity, so streams skip them without a diff, and
            // a proxy whose view did not change is not woken at all.
            let old = s.tx.borrow().clone();
            snap.reuse_own(&old);
            if !snap.same_as(&old) {
                s.tx.send_replace(Arc::new(snap));
                changed += 1;
            }
        }
        t.forget_previous();
        let g = Generation {
            number,
            resources,
            proxies: subs.len(),
            changed,
            took: start.elapsed(),
        };
        tracing::info!(
            generation = g.number,
            resources = g.resources,
            proxies = g.proxies,
            changed = g.changed,
            registry_ms = built.as_millis() as u64,
            outbound_ms = (prepared - built).as_millis() as u64,
            took_ms = g.took.as_millis() as u64,
            "config generation {} pushed to {} proxies ({} changed)",
            g.number,
            g.proxies,
            g.changed
        );
        g
    }

    /// Serves ADS (delta and state of the world) on `listener` until the task is dropped.
    pub async fn serve(&self, listener: TcpListener) -> Result<(), tonic::transport::Error> {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        tonic::transport::Server::builder()
            .add_service(AdsServer::new(Arc::new(self.clone())).into_service())
            .serve_with_incoming(incoming)
            .await
    }

    /// Watches `dir` (polling; works on every filesystem and in containers) and applies each
    /// change once it has settled. Invalid changes are logged with every problem and ignored.
    pub async fn watch_dir(&self, dir: PathBuf, poll: Duration) {
        self.watch_dir_with(dir, poll, true, |cp, cfg| {
            let cp = cp.clone();
            async move {
                let _ = tokio::task::spawn_blocking(move || cp.update(cfg)).await;
            }
        })
        .await;
    }

    /// [`ControlPlane::watch_dir`], handing each valid config to `apply` (another source
    /// merges it with its own) instead of installing it. Unless `alone`, the files are only
    /// parsed here: the other source validates them with its own config, which they may refer
    /// to (a VirtualService in a file on a Kubernetes Service).
    pub async fn watch_dir_with<F, Fut>(&self, dir: PathBuf, poll: Duration, alone: bool, apply: F)
    where
        F: Fn(&ControlPlane, Config) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let mut last = fingerprint(&dir);
        // Parsed files, so that a change re-parses only the files it touched. Filled here
        // (off the path of any change) rather than threaded through from the initial load.
        let d = dir.clone();
        let mut cache = tokio::task::spawn_blocking(move || {
            let mut cache = LoadCache::default();
            hypha_config::load_cached(&d, &mut cache);
            cache
        })
        .await
        .unwrap_or_default();
        loop {
            tokio::time::sleep(poll).await;
            let now = fingerprint(&dir);
            if now == last {
                continue;
            }
            // Debounce: wait until a whole poll interval passes with no further change.
            let mut settled = now;
            loop {
                tokio::time::sleep(poll).await;
                let again = fingerprint(&dir);
                if again == settled {
                    break;
                }
                settled = again;
            }
            last = settled;
            let d = dir.clone();
            let mut c = std::mem::take(&mut cache);
            let load = move || {
                let loaded = if alone {
                    hypha_config::load_cached(&d, &mut c)
                } else {
                    hypha_config::parse_cached(&d, &mut c)
                };
                (loaded, c)
            };
            let loaded = match tokio::task::spawn_blocking(load).await {
                Ok((l, c)) => {
                    cache = c;
                    l
                }
                Err(e) => {
                    tracing::error!("config load panicked: {e}");
                    continue;
                }
            };
            log_diagnostics(&loaded.diagnostics);
            // Without the CA, config that needs it would go out as plaintext: refused too.
            let needs = if self.current().mtls() {
                Diagnostics::default()
            } else {
                hypha_config::needs_the_ca(&loaded.config)
            };
            log_diagnostics(&needs);
            if loaded.has_errors() || needs.has_errors() {
                let n = loaded.diagnostics.errors().count() + needs.errors().count();
                self.inner.rejected.fetch_add(1, Ordering::SeqCst);
                tracing::error!(
                    errors = n,
                    "config change in {} rejected; still serving generation {}",
                    dir.display(),
                    self.current().version()
                );
                continue;
            }
            apply(self, loaded.config).await;
        }
    }
}

impl SnapshotSource for ControlPlane {
    fn watch(
        &self,
        node: &Node,
        connection: &tonic::Extensions,
    ) -> Result<watch::Receiver<Arc<Snapshot>>, tonic::Status> {
        if node.id.is_empty() {
            return Err(tonic::Status::invalid_argument("node.id is required"));
        }
        // Before the sources' first config (the cluster still being read), a proxy would get
        // an empty mesh and call itself ready: it is asked to come back (its client retries).
        if !self.is_ready() {
            return Err(tonic::Status::unavailable(
                "the control plane is not ready: its config sources are still being read",
            ));
        }
        let proxy = ProxyInfo::from_node(node);
        crate::security::authorize_node(&proxy, connection, &self.current().registry)?;
        if let (Some(revoked), Some(id)) = (
            self.inner.revoked.get(),
            crate::security::verified_identity(connection),
        ) {
            if revoked(id) {
                return Err(tonic::Status::permission_denied(format!("{id} is revoked")));
            }
        }
        let snap = Arc::new(self.current().snapshot(&proxy));
        let (tx, rx) = watch::channel(snap);
        tracing::info!(
            node = %proxy.id,
            namespace = %proxy.namespace,
            workload = %proxy.workload_name,
            "proxy connected"
        );
        let mut subs = self.live_subscribers();
        // A generation may have been installed between the snapshot above and this lock.
        let current = self.current();
        if current.version() != rx.borrow().version() {
            tx.send_replace(Arc::new(current.snapshot(&proxy)));
        }
        subs.push(Subscriber { proxy, tx });
        Ok(rx)
    }

    fn rejection_key(&self, node: &Node, connection: &tonic::Extensions) -> String {
        crate::security::rejection_key(node, connection)
    }

    fn acknowledged(&self, node: &str, type_url: &str, resources: &[(&str, &str)]) {
        if type_url != hypha_xds::type_url::SECRET {
            return;
        }
        let mut acked = self
            .inner
            .acked_secrets
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let entry = acked.entry(node.to_owned()).or_default();
        for (name, version) in resources {
            entry.insert((*name).to_owned(), (*version).to_owned());
        }
    }
}

/// Logs every diagnostic at its severity.
pub fn log_diagnostics(diags: &Diagnostics) {
    for d in diags.iter() {
        match d.severity {
            Severity::Error => tracing::error!("{d}"),
            Severity::Warning => tracing::warn!("{d}"),
            Severity::Info => tracing::debug!("{d}"),
        }
    }
}

/// Paths, sizes and modification times of every file under `dir`.
fn fingerprint(dir: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(p),
                Ok(m) => out.push((p, m.len(), m.modified().ok())),
                Err(_) => {}
            }
        }
    }
    out.sort();
    out
}

/// Loads the initial config: `dir`, or the embedded example. Errors list every problem.
pub fn initial_config(dir: Option<&Path>) -> Result<Config, Diagnostics> {
    let loaded = match dir {
        Some(d) => hypha_config::load(d),
        None => hypha_config::load_sources(EMBEDDED_CONFIG.iter().copied()),
    };
    log_diagnostics(&loaded.diagnostics);
    loaded.into_result().map(|(cfg, _)| cfg)
}

/// The files when another source validates them with its own config: parse errors and the
/// MeshConfig's are fatal, the rest is that source's to judge.
fn files_for_another_source(dir: &Path) -> Result<Config, RunError> {
    let mut loaded = hypha_config::parse_cached(dir, &mut LoadCache::default());
    let mut all = loaded.diagnostics.clone();
    hypha_config::validate(&loaded.config, &mut all);
    let mesh_errors = all.iter().filter(|d| {
        d.severity == Severity::Error
            && d.resource
                .as_deref()
                .is_some_and(|r| r.starts_with("MeshConfig"))
    });
    for d in mesh_errors {
        loaded.diagnostics.push(d.clone());
    }
    log_diagnostics(&loaded.diagnostics);
    loaded
        .into_result()
        .map(|(cfg, _)| cfg)
        .map_err(|d| RunError::Config(d.errors().count()))
}

/// The secure endpoint's settings (`hypha control --listen-tls`).
#[derive(Debug, Clone)]
pub struct Security {
    /// CA signer keys (created on first start) and `root-cert.pem`.
    pub data_dir: PathBuf,
    /// Join tokens, `<namespace>.<service account>.token`.
    pub join_tokens: Option<PathBuf>,
    /// Addresses serving xDS and the CA API over TLS.
    pub listen: Vec<SocketAddr>,
    /// The token holding the control plane's own serving key, instead of its memory.
    pub own_key: Option<hypha_keys::pkcs11::TokenConfig>,
    /// Checks bearer tokens that are no join token: service-account tokens, by TokenReview
    /// (`hypha-kube`).
    pub token_review: Option<Arc<dyn hypha_ca::TokenReview>>,
    /// DNS names on the control plane's certificates besides its SPIFFE ID (its Service's,
    /// for the injection webhook).
    pub server_names: Vec<String>,
    /// More servers on the control plane's credentials, started once the CA is open (the
    /// injection webhook of `hypha-kube`).
    pub services: Vec<TlsService>,
    /// Root rotations are moved on by someone else (a cluster's leader, `hypha_kube::rotation`):
    /// this control plane only puts in force what it reads, from its first step.
    pub rotate_elsewhere: bool,
}

/// A server that runs on the control plane's own credentials
/// ([`crate::security::Secure::credentials`]).
#[derive(Clone)]
#[allow(clippy::type_complexity)]
pub struct TlsService(pub Arc<dyn Fn(Arc<crate::security::Secure>) -> ExtraTask + Send + Sync>);

impl std::fmt::Debug for TlsService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsService")
    }
}

/// A source of config besides the files (the Kubernetes source, `hypha-kube`): it gets the
/// control plane and the latest valid file config, merges that with its own and installs the
/// generations itself.
pub type ExtraSource = Box<dyn FnOnce(ControlPlane, watch::Receiver<Config>) -> ExtraTask + Send>;

/// What an [`ExtraSource`] runs until the control plane stops.
pub type ExtraTask = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// `/ready` (200 once the config served is the sources', else 503) for a readiness probe; any
/// other path 404. One request per connection, its head read for at most 10 s.
pub async fn serve_ready(cp: ControlPlane, listener: TcpListener) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let cp = cp.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            let mut n = 0;
            let read = async {
                while n < buf.len() {
                    let got = stream.read(&mut buf[n..]).await.ok()?;
                    if got == 0 {
                        return None;
                    }
                    n += got;
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        return Some(());
                    }
                }
                None
            };
            if tokio::time::timeout(Duration::from_secs(10), read).await != Ok(Some(())) {
                return;
            }
            let mut content_type = "text/plain; charset=utf-8";
            let (status, body) = if buf.starts_with(b"GET /ready ") {
                if cp.is_ready() {
                    ("200 OK", "ready\n".to_owned())
                } else {
                    ("503 Service Unavailable", "not ready\n".to_owned())
                }
            } else if buf.starts_with(b"GET /metrics ") {
                // Prometheus' text format, which Prometheus 3 requires to be named.
                content_type = "text/plain; version=0.0.4; charset=utf-8";
                ("200 OK", cp.metrics())
            } else {
                ("404 Not Found", "/ready /metrics\n".to_owned())
            };
            let reply = format!(
                "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(reply.as_bytes()).await;
        });
    }
}

/// `hypha control`: load, serve on every address, watch the directory (and `extra`).
pub async fn run(
    dir: Option<PathBuf>,
    listen: &[SocketAddr],
    security: Option<Security>,
    extra: Option<ExtraSource>,
) -> Result<(), RunError> {
    run_with_health(dir, listen, security, extra, &[]).await
}

/// [`run`], with `/ready` served on each of `health` (the Deployment's readiness probe).
pub async fn run_with_health(
    dir: Option<PathBuf>,
    listen: &[SocketAddr],
    security: Option<Security>,
    extra: Option<ExtraSource>,
    health: &[SocketAddr],
) -> Result<(), RunError> {
    // With another source, no files means an empty mesh config rather than the example, and
    // files are validated with that source's config (they may refer to it): only their parse
    // and their MeshConfig, which the CA opens with, must be right on their own.
    let cfg = match (&dir, &extra) {
        (None, Some(_)) => Config::default(),
        (Some(d), Some(_)) => files_for_another_source(d)?,
        _ => initial_config(dir.as_deref()).map_err(|d| RunError::Config(d.errors().count()))?,
    };
    let (files_tx, files_rx) = watch::channel(cfg.clone());
    if security.is_none() {
        let needs = hypha_config::needs_the_ca(&cfg);
        log_diagnostics(&needs);
        if needs.has_errors() {
            return Err(RunError::Config(needs.errors().count()));
        }
    }
    let mut security = security;
    let services = security
        .as_mut()
        .map(|s| std::mem::take(&mut s.services))
        .unwrap_or_default();
    let secure = match &security {
        Some(s) => {
            std::fs::create_dir_all(&s.data_dir)
                .map_err(|e| RunError::DataDir(s.data_dir.clone(), e))?;
            // A token-held signer waits for its token while the CA opens and issues the
            // control plane's certificate: not on this runtime's threads.
            let (mesh, data_dir, tokens, own_key, names) = (
                cfg.mesh.clone(),
                s.data_dir.clone(),
                s.join_tokens.clone(),
                s.own_key.clone(),
                s.server_names.clone(),
            );
            let secure = tokio::task::spawn_blocking(move || {
                let own_key = own_key
                    .map(|t| hypha_keys::pkcs11::Token::open(&t))
                    .transpose()
                    .map_err(|e| {
                        crate::security::SecurityError::Identity(
                            hypha_identity::IdentityError::Key(e),
                        )
                    })?;
                crate::security::Secure::open_named(
                    &mesh,
                    &data_dir,
                    tokens.as_deref(),
                    own_key,
                    names,
                )
            })
            .await
            .map_err(|e| RunError::Start(e.to_string()))??;
            if let Some(review) = &s.token_review {
                secure.review_tokens_with(review.clone());
            }
            if s.rotate_elsewhere {
                secure.rotate_elsewhere();
            }
            Some(Arc::new(secure))
        }
        None => None,
    };
    let cp = if let Some(secure) = &secure {
        ControlPlane::with_mtls(cfg, secure.signer_roots().clone())
    } else {
        ControlPlane::new(cfg)
    };
    for line in cp.describe().lines() {
        tracing::info!("{line}");
    }
    let mut tasks = tokio::task::JoinSet::new();
    // With another source, what is served is complete once that source has pushed.
    if extra.is_some() {
        cp.set_ready(false);
    }
    for addr in health {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|e| RunError::Bind(*addr, e))?;
        tracing::info!(
            "serving /ready on {}",
            l.local_addr().map_err(|e| RunError::Bind(*addr, e))?
        );
        tasks.spawn(serve_ready(cp.clone(), l));
    }
    if let Some(secure) = &secure {
        for service in services {
            tasks.spawn((service.0)(secure.clone()));
        }
    }
    for addr in listen {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|e| RunError::Bind(*addr, e))?;
        tracing::info!(
            "serving xDS (ADS, delta and state of the world) on {}",
            l.local_addr().map_err(|e| RunError::Bind(*addr, e))?
        );
        let cp = cp.clone();
        tasks.spawn(async move {
            if let Err(e) = cp.serve(l).await {
                tracing::error!("xDS server stopped: {e}");
            }
        });
    }
    if let (Some(secure), Some(security)) = (&secure, &security) {
        for addr in &security.listen {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|e| RunError::Bind(*addr, e))?;
            tracing::info!(
                "serving xDS and the CA over TLS on {}",
                l.local_addr().map_err(|e| RunError::Bind(*addr, e))?
            );
            let (cp, secure) = (cp.clone(), secure.clone());
            tasks.spawn(async move {
                if let Err(e) = secure.serve(&cp, l).await {
                    tracing::error!("secure xDS/CA server stopped: {e}");
                }
            });
        }
        let secure2 = secure.clone();
        tasks.spawn(async move { secure2.rotate_own().await });
        let secure3 = secure.clone();
        cp.add_metrics(Arc::new(move || {
            crate::rotation::metrics(&secure3.rotations())
        }));
        let (secure, cp) = (secure.clone(), cp.clone());
        tasks.spawn(async move { secure.watch(&cp, Duration::from_secs(1)).await });
    }
    let extra = extra.is_some_and(|source| {
        tasks.spawn(source(cp.clone(), files_rx));
        true
    });
    match dir {
        Some(d) if extra => {
            tracing::info!("watching {} for changes", d.display());
            let cp = cp.clone();
            tasks.spawn(async move {
                cp.watch_dir_with(d, Duration::from_millis(100), false, |_, cfg| {
                    files_tx.send_replace(cfg);
                    std::future::ready(())
                })
                .await;
            });
        }
        Some(d) => {
            tracing::info!("watching {} for changes", d.display());
            let cp = cp.clone();
            tasks.spawn(async move { cp.watch_dir(d, Duration::from_millis(100)).await });
        }
        None if extra => {}
        None => {
            tracing::info!("serving the embedded bookinfo example (use --config DIR for your own)")
        }
    }
    tokio::select! {
        _ = tasks.join_next() => Ok(()),
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("shutting down");
            Ok(())
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("the config has {0} error(s); see above")]
    Config(usize),
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error("data directory {0}: {1}")]
    DataDir(PathBuf, std::io::Error),
    #[error(transparent)]
    Security(#[from] crate::security::SecurityError),
    #[error("start-up task failed: {0}")]
    Start(String),
}
