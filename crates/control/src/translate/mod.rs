//! Config → Envoy xDS resources for one proxy, named the way istiod names them:
//!
//! - Clusters `outbound|<port>|<subset>|<host>` (EDS, with the DestinationRule's load balancer,
//!   connection pool and outlier detection) and `inbound|<port>||` (the local app), plus
//!   `PassthroughCluster` and `BlackHoleCluster`;
//! - ClusterLoadAssignments for every EDS cluster, endpoints carrying all their addresses;
//! - Listeners: `0.0.0.0_<port>` per HTTP service port (RDS route `<port>`), `<vip>_<port>` per
//!   TCP service port, `virtualOutbound` (15001) and `virtualInbound` (15006) for captured
//!   traffic, and `api_listener`s named `<host>:<port>` for proxyless gRPC clients;
//! - RouteConfigurations `<port>` (one virtual host per service) and `<host>:<port>`.
//!
//! The outbound half depends only on the proxy's namespace (and labels, when a VirtualService
//! matches on `sourceLabels`), so it is computed once per generation and shared by every proxy
//! with the same key; the inbound half is per workload.
//!
//! The code is split by what it builds; this module holds [`Translation`] (generations, shared
//! outbound snapshots, caches) and the rule lookups the submodules share:
//!
//! - `listener`: outbound listeners, `virtualOutbound`, `api_listener`s and their routes;
//! - `inbound`: the proxy's own `inbound|<port>||` clusters and its `virtualInbound` listener;
//! - `cluster`: outbound clusters and the DestinationRule policy they carry;
//! - `endpoint`: ClusterLoadAssignments.

mod cluster;
mod endpoint;
mod inbound;
mod listener;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};

use hypha_config::networking::{DestinationRule, VirtualService};
use hypha_config::{Config, Resource};
use hypha_xds::{Resource as XdsResource, Snapshot};

use crate::registry::{Registry, Service};
use crate::routes::labels_key;
use hypha_xds::ProxyInfo;

pub use cluster::outbound_cluster_name;
use listener::ServiceRoutes;

pub const PASSTHROUGH: &str = "PassthroughCluster";
pub const BLACKHOLE: &str = "BlackHoleCluster";
/// Inbound traffic for ports no service declares, to its original destination (Istio's).
pub const INBOUND_PASSTHROUGH: &str = "InboundPassthroughCluster";
/// The source addresses `INBOUND_PASSTHROUGH` connects from (Istio's: "6 is the magical
/// number for inbound"); `hypha_pod::Capture` leaves them alone and puts `::6` on `lo`.
pub const INBOUND_PASSTHROUGH_SOURCE_V4: &str = "127.0.0.6";
pub const INBOUND_PASSTHROUGH_SOURCE_V6: &str = "::6";
pub const VIRTUAL_OUTBOUND_PORT: u32 = 15001;
pub const VIRTUAL_INBOUND_PORT: u32 = 15006;

/// DestinationRules and VirtualServices by the fully qualified host they name, in config
/// order, so a lookup per service does not resolve every rule's hosts again.
#[derive(Default)]
pub(crate) struct RuleIndex {
    destination_rules: HashMap<String, Vec<usize>>,
    virtual_services: HashMap<String, Vec<usize>>,
    /// The wildcard hosts (`*.example.com`, `*`) either map holds, the most specific (longest)
    /// first.
    wildcards: Vec<String>,
}

impl RuleIndex {
    fn build(cfg: &Config) -> RuleIndex {
        let mut index = RuleIndex::default();
        for (i, dr) in cfg.destination_rules.iter().enumerate() {
            let host = cfg.resolve_host(&dr.spec.host, &dr.namespace);
            index.destination_rules.entry(host).or_default().push(i);
        }
        for (i, vs) in cfg.virtual_services.iter().enumerate() {
            for h in &vs.spec.hosts {
                let entry = index
                    .virtual_services
                    .entry(cfg.resolve_host(h, &vs.namespace))
                    .or_default();
                if entry.last() != Some(&i) {
                    entry.push(i);
                }
            }
        }
        let mut wildcards: Vec<String> = (index.destination_rules.keys())
            .chain(index.virtual_services.keys())
            .filter(|h| h.starts_with('*'))
            .cloned()
            .collect();
        wildcards.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        wildcards.dedup();
        index.wildcards = wildcards;
        index
    }

    /// The rules of `map` that apply to `host`, one list per host they name, in Istio's order
    /// of precedence: those naming it exactly, then those whose wildcard covers it, the most
    /// specific wildcard first.
    fn candidates<'a>(
        &'a self,
        map: &'a HashMap<String, Vec<usize>>,
        host: &'a str,
    ) -> impl Iterator<Item = &'a [usize]> {
        let covering = self
            .wildcards
            .iter()
            .filter(move |w| w.as_str() != host && hypha_config::host_covers(w, host))
            .filter_map(move |w| map.get(w.as_str()));
        map.get(host).into_iter().chain(covering).map(Vec::as_slice)
    }
}

/// Whether every namespace sees the same routes for a service: every service, DestinationRule
/// and VirtualService is exported everywhere, no host has two DestinationRules or two
/// VirtualServices to choose between by namespace, and no route matches on its source.
fn namespace_independent(cfg: &Config, registry: &Registry, rules: &RuleIndex) -> bool {
    use crate::registry::Visibility;
    let everywhere = |export_to: &[String], ns: &str| {
        Visibility::from_export_to(export_to, ns) == Visibility::All
    };
    registry
        .services
        .iter()
        .all(|s| s.visibility == Visibility::All)
        && cfg
            .destination_rules
            .iter()
            .all(|d| everywhere(&d.spec.export_to, &d.namespace))
        && cfg.virtual_services.iter().all(|vs| {
            everywhere(&vs.spec.export_to, &vs.namespace)
                && vs
                    .spec
                    .http
                    .iter()
                    .flat_map(|r| &r.matches)
                    .all(|m| m.source_labels.is_empty() && m.source_namespace.is_none())
        })
        && rules.destination_rules.values().all(|v| v.len() <= 1)
        && rules.virtual_services.values().all(|v| v.len() <= 1)
}

/// (service index, port, subset, DestinationRule index): what an outbound cluster depends on.
type ClusterKey = (usize, u32, Option<String>, Option<usize>);

/// A Cluster and, for EDS, its ClusterLoadAssignment.
type ClusterPair = (Arc<XdsResource>, Option<Arc<XdsResource>>);

/// The generation before this one, and how much of what it built still holds.
struct Before {
    t: Arc<Translation>,
    /// The mesh, PeerAuthentications and DestinationRules are unchanged: an outbound cluster
    /// depends on nothing else but its service, which is compared cluster by cluster.
    same_policy: bool,
    /// Besides, the services are the same but for their endpoints, in the same order, and
    /// both generations are namespace independent: a service's routes depend on nothing else
    /// but the VirtualService for its host, which is compared service by service.
    same_services: bool,
}

impl Before {
    fn new(t: &Arc<Translation>, cfg: &Config, registry: &Registry, independent: bool) -> Before {
        let (old, new) = (&t.cfg, cfg);
        let same_policy = old.mesh == new.mesh
            && same_resources(&old.peer_authentications, &new.peer_authentications)
            && same_resources(&old.destination_rules, &new.destination_rules);
        let same_services = same_policy
            && independent
            && t.namespace_independent
            && t.registry.services.len() == registry.services.len()
            && (t.registry.services.iter())
                .zip(&registry.services)
                .all(|(a, b)| same_but_endpoints(a, b));
        Before {
            t: t.clone(),
            same_policy,
            same_services,
        }
    }
}

/// Whether two lists hold the same resources (names, labels, annotations and specs; where
/// they were read from does not count), in the same order.
fn same_resources<T: PartialEq>(a: &[Resource<T>], b: &[Resource<T>]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(a, b)| {
            a.name == b.name
                && a.namespace == b.namespace
                && a.spec == b.spec
                && a.labels == b.labels
                && a.annotations == b.annotations
        })
}

/// Whether two services are the same but for their endpoints.
fn same_but_endpoints(a: &Service, b: &Service) -> bool {
    a.hostname == b.hostname
        && a.namespace == b.namespace
        && a.vips == b.vips
        && a.ports == b.ports
        && a.location == b.location
        && a.resolution == b.resolution
        && a.visibility == b.visibility
}

/// One validated config generation, ready to produce snapshots for proxies.
pub struct Translation {
    pub cfg: Arc<Config>,
    pub registry: Registry,
    rules: RuleIndex,
    version: String,
    uses_source_labels: bool,
    outbound_cache: Mutex<HashMap<String, Arc<Snapshot>>>,
    clusters: Mutex<HashMap<ClusterKey, ClusterPair>>,
    /// See [`namespace_independent`].
    namespace_independent: bool,
    /// (service index, port) → routes, when namespace independent.
    service_routes: Mutex<HashMap<(usize, u32), Arc<ServiceRoutes>>>,
    /// The generation before, while this one is prepared: what it built is taken over where
    /// what it was built from is unchanged. Dropped by [`Translation::forget_previous`].
    before: RwLock<Option<Before>>,
    /// Sidecars have workload certificates (the control plane runs the CA): traffic between
    /// them is mutual TLS as PeerAuthentication and DestinationRules say (see `mtls`).
    mtls: bool,
    /// The CA's signer roots, and the trust bundles made from them and this generation's
    /// tenants, sent as the `ROOTCA` secret.
    signer_roots: Option<Arc<crate::mtls::SignerRoots>>,
    trust: Option<Arc<crate::mtls::TrustBundles>>,
}

impl Translation {
    /// Whether sidecars have workload certificates (the control plane runs the CA).
    pub fn mtls(&self) -> bool {
        self.mtls
    }

    pub fn new(cfg: Arc<Config>, version: impl Into<String>) -> Translation {
        Translation::after(cfg, version, None)
    }

    /// A first generation for sidecars with workload certificates (mutual TLS between them),
    /// trusting what the tenants make of these signer roots; the generations
    /// [`after`](Self::after) it keep both.
    pub fn with_mtls(
        cfg: Arc<Config>,
        version: impl Into<String>,
        signer_roots: Arc<crate::mtls::SignerRoots>,
    ) -> Translation {
        let trust = crate::mtls::TrustBundles::from_mesh(&cfg.mesh, &signer_roots);
        Translation {
            mtls: true,
            signer_roots: Some(signer_roots),
            trust: Some(Arc::new(trust)),
            ..Translation::after(cfg, version, None)
        }
    }

    /// Like [`Translation::new`], but what did not change since `previous` keeps its identity,
    /// so proxy streams can tell at a glance that there is nothing new to push, and what
    /// `previous` built from inputs that did not change is taken over rather than built again.
    pub fn after(
        cfg: Arc<Config>,
        version: impl Into<String>,
        previous: Option<&Arc<Translation>>,
    ) -> Translation {
        Translation::after_with_roots(cfg, version, previous, None)
    }

    /// [`Translation::after`] with new signer roots (a rotating signer's), or `previous`'s
    /// when `None`.
    pub fn after_with_roots(
        cfg: Arc<Config>,
        version: impl Into<String>,
        previous: Option<&Arc<Translation>>,
        signer_roots: Option<Arc<crate::mtls::SignerRoots>>,
    ) -> Translation {
        let registry = Registry::build(&cfg);
        let rules = RuleIndex::build(&cfg);
        let namespace_independent = namespace_independent(&cfg, &registry, &rules);
        let uses_source_labels = cfg.virtual_services.iter().any(|vs| {
            vs.spec
                .http
                .iter()
                .flat_map(|r| &r.matches)
                .any(|m| !m.source_labels.is_empty())
        });
        let mtls = previous.is_some_and(|p| p.mtls);
        let signer_roots = signer_roots.or_else(|| previous.and_then(|p| p.signer_roots.clone()));
        let trust = signer_roots
            .as_ref()
            .map(|r| Arc::new(crate::mtls::TrustBundles::from_mesh(&cfg.mesh, r)));
        let before = previous.map(|p| Before::new(p, &cfg, &registry, namespace_independent));
        Translation {
            cfg,
            registry,
            rules,
            namespace_independent,
            version: version.into(),
            uses_source_labels,
            outbound_cache: Mutex::new(HashMap::new()),
            clusters: Mutex::new(HashMap::new()),
            service_routes: Mutex::new(HashMap::new()),
            before: RwLock::new(before),
            mtls,
            signer_roots,
            trust,
        }
    }

    /// Drops the previous generation once every proxy has its new snapshot.
    pub fn forget_previous(&self) {
        *self.before.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// The generation before, with what of it still holds; `None` once forgotten.
    fn before(&self) -> std::sync::RwLockReadGuard<'_, Option<Before>> {
        self.before.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    /// The roots a workload of namespace `ns` trusts (PEM), when the control plane runs the CA.
    pub fn trust_bundle(&self, ns: &str) -> Option<&str> {
        self.trust.as_ref()?.of(ns)
    }

    /// Everything `proxy` should see: the shared outbound snapshot of its namespace plus its
    /// own inbound resources (copy on write, so the shared part is not copied).
    pub fn snapshot(&self, proxy: &ProxyInfo) -> Snapshot {
        let mut snap = (*self.outbound_shared(proxy)).clone();
        for r in self.inbound(proxy) {
            snap.insert(r);
        }
        if let Some(secret) = self.trust.as_ref().and_then(|t| t.secret(&proxy.namespace)) {
            snap.insert(XdsResource::encode(crate::mtls::ROOTCA, &secret));
        }
        snap
    }

    /// Computes the shared outbound snapshots of these proxies up front, on every core.
    pub fn prepare<'a>(&self, proxies: impl IntoIterator<Item = &'a ProxyInfo>) {
        let mut todo: HashMap<String, &ProxyInfo> = HashMap::new();
        for p in proxies {
            todo.entry(self.outbound_key(p)).or_insert(p);
        }
        let todo: Vec<&ProxyInfo> = todo.into_values().collect();
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let next = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..threads.min(todo.len()) {
                scope.spawn(|| {
                    while let Some(p) = todo.get(next.fetch_add(1, Ordering::Relaxed)) {
                        self.outbound_shared(p);
                    }
                });
            }
        });
    }

    /// Proxies with the same key share their outbound resources.
    fn outbound_key(&self, proxy: &ProxyInfo) -> String {
        let mut key = proxy.namespace.clone();
        if self.uses_source_labels {
            key.push('|');
            key.push_str(&labels_key(&proxy.labels));
        }
        key
    }

    fn outbound_shared(&self, proxy: &ProxyInfo) -> Arc<Snapshot> {
        let key = self.outbound_key(proxy);
        if let Some(hit) = lock(&self.outbound_cache).get(&key) {
            return hit.clone();
        }
        let mut snap = Snapshot::new(self.version.clone());
        self.outbound(proxy, &mut snap);
        let mut snap = snap.into_shared();
        // The previous generation's snapshot for the same key: its unchanged parts are taken
        // over (see [`Snapshot::reuse`]).
        let previous =
            (self.before().as_ref()).and_then(|b| lock(&b.t.outbound_cache).get(&key).cloned());
        if let Some(previous) = previous {
            snap.reuse(&previous);
        }
        let snap = Arc::new(snap);
        lock(&self.outbound_cache).insert(key, snap.clone());
        snap
    }
}

/// Context for translating one namespace's view of the mesh.
pub(crate) struct Outbound<'a> {
    pub cfg: &'a Config,
    pub reg: &'a Registry,
    pub rules: &'a RuleIndex,
    pub ns: &'a str,
}

impl Outbound<'_> {
    pub fn service(&self, host: &str) -> Option<&Service> {
        self.reg.service(host, self.ns)
    }

    /// The DestinationRule for `host` as this namespace sees it: its own namespace's first,
    /// then the service's namespace, then any other visible one (Istio's lookup order).
    pub fn destination_rule(&self, host: &str) -> Option<&Resource<DestinationRule>> {
        self.destination_rule_index(host)
            .map(|i| &self.cfg.destination_rules[i])
    }

    /// The index in `cfg.destination_rules` of [`Outbound::destination_rule`]: among the
    /// rules naming `host` exactly, else among those of the most specific wildcard covering it.
    pub fn destination_rule_index(&self, host: &str) -> Option<usize> {
        let svc_ns = self.service(host).map(|s| s.namespace.as_str());
        let rules = &self.cfg.destination_rules;
        let candidates: Vec<usize> = self
            .rules
            .candidates(&self.rules.destination_rules, host)
            .map(|list| {
                list.iter()
                    .copied()
                    .filter(|&i| {
                        let d = &rules[i];
                        crate::registry::Visibility::from_export_to(&d.spec.export_to, &d.namespace)
                            .visible_to(self.ns)
                    })
                    .collect::<Vec<usize>>()
            })
            .find(|visible| !visible.is_empty())
            .unwrap_or_default();
        candidates
            .iter()
            .find(|&&i| rules[i].namespace == self.ns)
            .or_else(|| {
                candidates
                    .iter()
                    .find(|&&i| Some(rules[i].namespace.as_str()) == svc_ns)
            })
            .or_else(|| candidates.first())
            .copied()
    }

    /// The VirtualService with HTTP routes for `host` as this namespace sees it: among those
    /// naming it exactly, else among those of the most specific wildcard covering it; this
    /// namespace's own first.
    pub fn virtual_service(&self, host: &str) -> Option<&Resource<VirtualService>> {
        let all: Vec<&Resource<VirtualService>> = self
            .rules
            .candidates(&self.rules.virtual_services, host)
            .map(|list| {
                list.iter()
                    .map(|&i| &self.cfg.virtual_services[i])
                    .filter(|vs| {
                        crate::registry::Visibility::from_export_to(
                            &vs.spec.export_to,
                            &vs.namespace,
                        )
                        .visible_to(self.ns)
                            && (vs.spec.gateways.is_empty()
                                || vs.spec.gateways.iter().any(|g| g == "mesh"))
                            && !vs.spec.http.is_empty()
                    })
                    .collect::<Vec<_>>()
            })
            .find(|visible| !visible.is_empty())
            .unwrap_or_default();
        all.iter()
            .find(|vs| vs.namespace == self.ns)
            .or_else(|| all.first())
            .copied()
    }

    /// The VirtualServices for `host`, in config order: those naming it exactly, else those of
    /// the most specific wildcard covering it.
    fn virtual_services_of<'s>(
        &'s self,
        host: &'s str,
    ) -> impl Iterator<Item = &'s Resource<VirtualService>> {
        self.rules
            .candidates(&self.rules.virtual_services, host)
            .next()
            .into_iter()
            .flatten()
            .map(|&i| &self.cfg.virtual_services[i])
    }

    pub fn cluster_for(&self, host: &str, port: u32, subset: Option<&str>) -> String {
        if self.service(host).is_none() {
            return BLACKHOLE.into();
        }
        outbound_cluster_name(host, port, subset)
    }

    /// The clusters a TCP service port's connections go to, with their weights: the
    /// destinations of the first VirtualService `tcp` route that applies to `port`, else the
    /// service itself.
    pub fn tcp_clusters(&self, s: &Service, port: u32) -> Vec<(String, u32)> {
        for vs in self.virtual_services_of(&s.hostname) {
            for r in &vs.spec.tcp {
                if r.matches.iter().all(|m| m.port.is_some_and(|p| p != port))
                    && !r.matches.is_empty()
                {
                    continue;
                }
                let clusters = self.weighted(&r.route, port, &vs.namespace);
                if !clusters.is_empty() {
                    return clusters;
                }
            }
        }
        vec![(outbound_cluster_name(&s.hostname, port, None), 100)]
    }

    /// A route's destinations as clusters with weights (one destination: all of it).
    pub fn weighted(
        &self,
        route: &[hypha_config::networking::RouteDestination],
        port: u32,
        namespace: &str,
    ) -> Vec<(String, u32)> {
        route
            .iter()
            .map(|d| {
                let host = self.cfg.resolve_host(&d.destination.host, namespace);
                let p = d.destination.port.map_or(port, |p| p.number);
                let weight = match (route.len(), d.weight) {
                    (1, _) => 100,
                    (_, w) => u32::try_from(w.unwrap_or(0)).unwrap_or(0),
                };
                (
                    self.cluster_for(&host, p, d.destination.subset.as_deref()),
                    weight,
                )
            })
            .collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
