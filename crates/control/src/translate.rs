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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use envoy_types::pb::envoy::config::cluster::v3::{
    circuit_breakers::Thresholds, cluster, CircuitBreakers, Cluster,
    OutlierDetection as EnvoyOutlier,
};
use envoy_types::pb::envoy::config::core::v3::{
    Http1ProtocolOptions, Http2ProtocolOptions, HttpProtocolOptions as CoreHttpOptions, Locality,
    TrafficDirection,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    endpoint, lb_endpoint, ClusterLoadAssignment, Endpoint as EnvoyEndpoint, LbEndpoint,
    LocalityLbEndpoints,
};
use envoy_types::pb::envoy::config::listener::v3::{
    filter, ApiListener, Filter, FilterChain, FilterChainMatch, Listener,
};
use envoy_types::pb::envoy::config::route::v3::{
    route_action::{hash_policy, HashPolicy},
    RouteConfiguration, VirtualHost,
};
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::{CodecType, RouteSpecifier},
    http_filter, HttpConnectionManager, HttpFilter, Rds,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{tcp_proxy, TcpProxy};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    http_protocol_options::{
        explicit_http_config::ProtocolConfig, ExplicitHttpConfig, UpstreamProtocolOptions,
    },
    HttpProtocolOptions,
};
use hypha_config::mesh::IpFamily;
use hypha_config::networking::{
    ClientTlsSettings, ConnectionPoolSettings, DestinationRule, LoadBalancerSettings, Location,
    OutlierDetection, Resolution, SimpleLb, TlsMode, TrafficPolicy, VirtualService,
};
use hypha_config::security::MtlsMode;
use hypha_config::{Config, Resource};
use hypha_xds::{Resource as XdsResource, Snapshot};

use crate::envoy::{self, any, boolv, secs, socket, u32v};
use crate::registry::{Endpoint, Port, Protocol, Registry, Service};
use crate::routes::{catch_all, http_routes, labels_key};
use hypha_xds::ProxyInfo;

pub const PASSTHROUGH: &str = "PassthroughCluster";
pub const BLACKHOLE: &str = "BlackHoleCluster";
pub const VIRTUAL_OUTBOUND_PORT: u32 = 15001;
pub const VIRTUAL_INBOUND_PORT: u32 = 15006;

/// `outbound|<port>|<subset>|<host>`.
pub fn outbound_cluster_name(host: &str, port: u32, subset: Option<&str>) -> String {
    format!("outbound|{port}|{}|{host}", subset.unwrap_or(""))
}

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

/// What one HTTP service port contributes to the outbound routes.
struct ServiceRoutes {
    /// `<host>:<port>`: the virtual host's name.
    name: String,
    routes: Vec<envoy_types::pb::envoy::config::route::v3::Route>,
    /// The `<host>:<port>` RouteConfiguration and Listener (proxyless gRPC).
    route_config: Arc<XdsResource>,
    api_listener: Arc<XdsResource>,
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
    /// The previous generation's shared outbound snapshots, whose unchanged parts new ones
    /// take over (see [`Snapshot::reuse`]); emptied by [`Translation::forget_previous`].
    previous: Mutex<HashMap<String, Arc<Snapshot>>>,
    /// Sidecars have workload certificates (the control plane runs the CA): traffic between
    /// them is mutual TLS as PeerAuthentication and DestinationRules say (see `mtls`).
    mtls: bool,
    /// The CA's signer roots, and the trust bundles made from them and this generation's
    /// tenants, sent as the `ROOTCA` secret.
    signer_roots: Option<Arc<crate::mtls::SignerRoots>>,
    trust: Option<Arc<crate::mtls::TrustBundles>>,
}

impl Translation {
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
    /// so proxy streams can tell at a glance that there is nothing new to push.
    pub fn after(
        cfg: Arc<Config>,
        version: impl Into<String>,
        previous: Option<&Translation>,
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
        let signer_roots = previous.and_then(|p| p.signer_roots.clone());
        let trust = signer_roots
            .as_ref()
            .map(|r| Arc::new(crate::mtls::TrustBundles::from_mesh(&cfg.mesh, r)));
        let previous = previous
            .map(|p| lock(&p.outbound_cache).clone())
            .unwrap_or_default();
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
            previous: Mutex::new(previous),
            mtls,
            signer_roots,
            trust,
        }
    }

    /// Drops the previous generation's shared snapshots once every proxy has its new one.
    pub fn forget_previous(&self) {
        lock(&self.previous).clear();
    }

    pub fn version(&self) -> &str {
        &self.version
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
        if let Some(previous) = lock(&self.previous).remove(&key) {
            snap.reuse(&previous);
        }
        let snap = Arc::new(snap);
        lock(&self.outbound_cache).insert(key, snap.clone());
        snap
    }

    fn families(&self) -> (bool, bool) {
        let f = &self.cfg.mesh.ip_families;
        (f.contains(&IpFamily::IPv4), f.contains(&IpFamily::IPv6))
    }

    /// A listener address on every configured family: the first is the primary, the rest go to
    /// `additional_addresses`.
    fn wildcard_listener(&self, name: String, port: u32, direction: TrafficDirection) -> Listener {
        let (v4, v6) = self.families();
        let mut addrs = Vec::new();
        if v4 {
            addrs.push("0.0.0.0");
        }
        if v6 {
            addrs.push("::");
        }
        Listener {
            name,
            address: Some(socket(addrs[0], port)),
            additional_addresses: addrs[1..]
                .iter()
                .map(
                    |a| envoy_types::pb::envoy::config::listener::v3::AdditionalAddress {
                        address: Some(socket(a, port)),
                        ..Default::default()
                    },
                )
                .collect(),
            traffic_direction: direction as i32,
            ..Default::default()
        }
    }

    /// Resources every proxy with this namespace (and labels) shares.
    fn outbound(&self, proxy: &ProxyInfo, out: &mut Snapshot) {
        let ctx = Outbound {
            cfg: &self.cfg,
            reg: &self.registry,
            rules: &self.rules,
            ns: &proxy.namespace,
        };
        out.insert(XdsResource::encode(PASSTHROUGH, &passthrough_cluster()));
        out.insert(XdsResource::encode(
            BLACKHOLE,
            &Cluster {
                name: BLACKHOLE.into(),
                cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
                    cluster::DiscoveryType::Static as i32,
                )),
                connect_timeout: Some(secs(10)),
                ..Default::default()
            },
        ));
        // Virtual hosts per HTTP port, and the ports TCP listeners already hold.
        let mut http_ports: BTreeMap<u32, Vec<VirtualHost>> = BTreeMap::new();
        let mut domains_used: HashMap<u32, HashSet<String>> = HashMap::new();
        let mut tcp_listeners: BTreeMap<String, Listener> = BTreeMap::new();
        let services: Vec<(usize, &Service)> = self
            .registry
            .services
            .iter()
            .enumerate()
            .filter(|(_, s)| s.visibility.visible_to(&proxy.namespace))
            .collect();
        for (si, s) in &services {
            let dri = ctx.destination_rule_index(&s.hostname);
            let dr = dri.map(|i| &self.cfg.destination_rules[i]);
            for port in &s.ports {
                let subsets: Vec<Option<&str>> = std::iter::once(None)
                    .chain(
                        dr.iter()
                            .flat_map(|d| d.spec.subsets.iter().map(|x| Some(x.name.as_str()))),
                    )
                    .collect();
                for subset in subsets {
                    let (c, cla) = self.cached_cluster(*si, s, port, subset, dri);
                    out.insert(c);
                    if let Some(cla) = cla {
                        out.insert(cla);
                    }
                }
                if port.protocol.is_http() {
                    let per_service = self.service_routes(&ctx, proxy, *si, s, port.number);
                    out.insert(per_service.route_config.clone());
                    out.insert(per_service.api_listener.clone());
                    let used = domains_used.entry(port.number).or_default();
                    let domains: Vec<String> = domains(s, port.number, &proxy.namespace)
                        .into_iter()
                        .filter(|d| used.insert(d.clone()))
                        .collect();
                    if !domains.is_empty() {
                        http_ports
                            .entry(port.number)
                            .or_default()
                            .push(VirtualHost {
                                name: per_service.name.clone(),
                                domains,
                                routes: per_service.routes.clone(),
                                ..Default::default()
                            });
                    }
                } else {
                    let cluster = ctx.tcp_cluster(s, port.number);
                    let default = tcp_chain(&format!("{}_{}", s.hostname, port.number), &cluster);
                    let mut chains = if port.protocol == Protocol::Tls {
                        ctx.sni_chains(s, port.number)
                    } else {
                        Vec::new()
                    };
                    let listener = if let Some((first, rest)) = s.vips.split_first() {
                        chains.push(default);
                        let name = format!("{first}_{}", port.number);
                        tcp_listeners.entry(name.clone()).or_insert_with(|| Listener {
                            name,
                            address: Some(socket(&first.to_string(), port.number)),
                            additional_addresses: rest
                                .iter()
                                .map(|ip| envoy_types::pb::envoy::config::listener::v3::AdditionalAddress {
                                    address: Some(socket(&ip.to_string(), port.number)),
                                    ..Default::default()
                                })
                                .collect(),
                            traffic_direction: TrafficDirection::Outbound as i32,
                            bind_to_port: Some(boolv(false)),
                            ..Default::default()
                        })
                    } else {
                        // Without a VIP the port is shared: TLS services are told apart by
                        // the server name their clients send, a TCP service takes the rest.
                        if port.protocol == Protocol::Tls {
                            chains.push(with_server_names(default, vec![s.hostname.clone()]));
                        } else {
                            chains.push(default);
                        }
                        let name = format!("0.0.0.0_{}", port.number);
                        tcp_listeners.entry(name.clone()).or_insert_with(|| {
                            let mut l = self.wildcard_listener(
                                name,
                                port.number,
                                TrafficDirection::Outbound,
                            );
                            l.bind_to_port = Some(boolv(false));
                            l
                        })
                    };
                    add_chains(listener, chains);
                }
            }
        }
        for (port, mut vhosts) in http_ports {
            vhosts.push(VirtualHost {
                name: "allow_any".into(),
                domains: vec!["*".into()],
                routes: vec![catch_all("allow_any", PASSTHROUGH.into())],
                ..Default::default()
            });
            let name = port.to_string();
            out.insert(XdsResource::encode(
                name.clone(),
                &RouteConfiguration {
                    name: name.clone(),
                    virtual_hosts: vhosts,
                    validate_clusters: Some(boolv(false)),
                    ..Default::default()
                },
            ));
            let lname = format!("0.0.0.0_{port}");
            if tcp_listeners.contains_key(&lname) {
                tracing::warn!(port, "an HTTP and a TCP service without VIPs share port {port}; the TCP service is not reachable on the wildcard listener");
            }
            let mut l = self.wildcard_listener(lname.clone(), port, TrafficDirection::Outbound);
            l.bind_to_port = Some(boolv(false));
            l.filter_chains = vec![FilterChain {
                name: lname.clone(),
                filters: vec![Filter {
                    name: envoy::HCM.into(),
                    config_type: Some(filter::ConfigType::TypedConfig(any(&hcm(&lname, &name)))),
                }],
                ..Default::default()
            }];
            tcp_listeners.insert(lname, l);
        }
        for (name, l) in tcp_listeners {
            out.insert(XdsResource::encode(name, &l));
        }
        let mut vo = self.wildcard_listener(
            "virtualOutbound".into(),
            VIRTUAL_OUTBOUND_PORT,
            TrafficDirection::Outbound,
        );
        vo.use_original_dst = Some(boolv(true));
        vo.filter_chains = vec![tcp_chain("virtualOutbound-catchall-tcp", PASSTHROUGH)];
        out.insert(XdsResource::encode("virtualOutbound", &vo));
    }

    /// The proxy's own instances: inbound clusters and the `virtualInbound` listener.
    fn inbound(&self, proxy: &ProxyInfo) -> Vec<XdsResource> {
        let mine = self
            .registry
            .workloads_of(&proxy.namespace, &proxy.workload_name, &proxy.ips);
        // target port → protocol, from every service port the workload backs.
        let mut ports: BTreeMap<u32, Protocol> = BTreeMap::new();
        let mut loopback = "127.0.0.1";
        for w in &mine {
            if w.addresses
                .iter()
                .all(|a| a.parse::<IpAddr>().is_ok_and(|ip| ip.is_ipv6()))
            {
                loopback = "::1";
            }
            for s in self.registry.services_backed_by(w) {
                for p in &s.ports {
                    ports.entry(w.port_for(p)).or_insert(p.protocol);
                }
            }
        }
        let mut out = Vec::new();
        let mut chains = Vec::new();
        let labels = &proxy.labels;
        for (&port, &protocol) in &ports {
            let cname = format!("inbound|{port}||");
            let mut c = Cluster {
                name: cname.clone(),
                cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
                    cluster::DiscoveryType::Static as i32,
                )),
                connect_timeout: Some(secs(10)),
                load_assignment: Some(ClusterLoadAssignment {
                    cluster_name: cname.clone(),
                    endpoints: vec![LocalityLbEndpoints {
                        lb_endpoints: vec![lb_endpoint(loopback, port, &[], None)],
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                ..Default::default()
            };
            if protocol == Protocol::Http2 {
                c.typed_extension_protocol_options.insert(
                    envoy::UPSTREAM_HTTP_OPTIONS.into(),
                    any(&upstream_http_options(true, None)),
                );
            }
            out.push(XdsResource::encode(cname.clone(), &c));
            let chain_match = FilterChainMatch {
                destination_port: Some(u32v(port)),
                ..Default::default()
            };
            let chain = if protocol.is_http() {
                let rc = RouteConfiguration {
                    name: format!("inbound|{port}||"),
                    virtual_hosts: vec![VirtualHost {
                        name: format!("inbound|http|{port}"),
                        domains: vec!["*".into()],
                        routes: vec![catch_all("default", cname.clone())],
                        ..Default::default()
                    }],
                    validate_clusters: Some(boolv(false)),
                    ..Default::default()
                };
                let mut h = hcm_base(&format!("inbound_0.0.0.0_{port}"));
                h.route_specifier = Some(RouteSpecifier::RouteConfig(rc));
                // Authorization runs first: a denied request goes no further.
                let rbac = crate::authz::rbac(&self.cfg, &proxy.namespace, labels, false);
                h.http_filters
                    .splice(0..0, crate::authz::http_filters(rbac));
                FilterChain {
                    name: format!("inbound_{port}"),
                    filter_chain_match: Some(chain_match),
                    filters: vec![Filter {
                        name: envoy::HCM.into(),
                        config_type: Some(filter::ConfigType::TypedConfig(any(&h))),
                    }],
                    ..Default::default()
                }
            } else {
                let mut chain = tcp_chain(&format!("inbound_{port}"), &cname);
                chain.filter_chain_match = Some(chain_match);
                let rbac = crate::authz::rbac(&self.cfg, &proxy.namespace, labels, true);
                chain
                    .filters
                    .splice(0..0, crate::authz::network_filters(rbac));
                chain
            };
            let mode = if self.mtls {
                crate::mtls::mode(&self.cfg, &proxy.namespace, labels, port)
            } else {
                MtlsMode::Disable
            };
            // PERMISSIVE: a TLS chain and a plaintext one, told apart by the first bytes;
            // STRICT: TLS only (plaintext is refused); DISABLE: plaintext only.
            if matches!(mode, MtlsMode::Permissive | MtlsMode::Strict) {
                let mut tls = chain.clone();
                tls.name = format!("{}_mtls", chain.name);
                if let Some(m) = &mut tls.filter_chain_match {
                    m.transport_protocol = "tls".into();
                }
                tls.transport_socket = Some(crate::mtls::downstream());
                chains.push(tls);
            }
            if matches!(mode, MtlsMode::Permissive | MtlsMode::Disable) {
                let mut plain = chain;
                if mode == MtlsMode::Permissive {
                    if let Some(m) = &mut plain.filter_chain_match {
                        m.transport_protocol = "raw_buffer".into();
                    }
                }
                chains.push(plain);
            }
        }
        let mut vi = self.wildcard_listener(
            "virtualInbound".into(),
            VIRTUAL_INBOUND_PORT,
            TrafficDirection::Inbound,
        );
        vi.use_original_dst = Some(boolv(true));
        if chains.iter().any(|c| c.transport_socket.is_some()) {
            vi.listener_filters = vec![crate::mtls::tls_inspector()];
        }
        vi.filter_chains = chains;
        vi.default_filter_chain = Some(tcp_chain("virtualInbound-catchall-tcp", PASSTHROUGH));
        out.push(XdsResource::encode("virtualInbound", &vi));
        out
    }

    /// The routes of one service port, and the route table and `api_listener` proxyless gRPC
    /// clients use for it. When no rule depends on the namespace looking (see
    /// [`namespace_independent`]), built once per generation for every namespace.
    fn service_routes(
        &self,
        ctx: &Outbound<'_>,
        proxy: &ProxyInfo,
        service: usize,
        s: &Service,
        port: u32,
    ) -> Arc<ServiceRoutes> {
        if self.namespace_independent {
            if let Some(hit) = lock(&self.service_routes).get(&(service, port)) {
                return hit.clone();
            }
        }
        let vs = ctx.virtual_service(&s.hostname);
        let routes = http_routes(ctx, proxy, vs, &s.hostname, port);
        let name = format!("{}:{port}", s.hostname);
        let route_config = XdsResource::encode(
            name.clone(),
            &RouteConfiguration {
                name: name.clone(),
                virtual_hosts: vec![VirtualHost {
                    name: name.clone(),
                    domains: vec![name.clone(), s.hostname.clone()],
                    routes: routes.clone(),
                    ..Default::default()
                }],
                ..Default::default()
            },
        );
        let api_listener = XdsResource::encode(
            name.clone(),
            &Listener {
                name: name.clone(),
                api_listener: Some(ApiListener {
                    api_listener: Some(any(&hcm(&name, &name))),
                }),
                ..Default::default()
            },
        );
        let built = Arc::new(ServiceRoutes {
            name,
            routes,
            route_config: Arc::new(route_config),
            api_listener: Arc::new(api_listener),
        });
        if self.namespace_independent {
            lock(&self.service_routes).insert((service, port), built.clone());
        }
        built
    }

    /// The Cluster (and its ClusterLoadAssignment, for EDS) of one service port and subset
    /// under one DestinationRule, built once per generation and shared by every namespace
    /// that sees the same rule for the service.
    fn cached_cluster(
        &self,
        service: usize,
        s: &Service,
        port: &Port,
        subset: Option<&str>,
        dr: Option<usize>,
    ) -> ClusterPair {
        let key = (service, port.number, subset.map(str::to_owned), dr);
        if let Some(hit) = lock(&self.clusters).get(&key) {
            return hit.clone();
        }
        let name = outbound_cluster_name(&s.hostname, port.number, subset);
        let dr = dr.map(|i| &self.cfg.destination_rules[i].spec);
        let policy = dr.map(|d| effective_policy(d, port.number, subset));
        let (c, cla) = self.cluster(&name, s, port, subset, dr, policy.as_ref());
        let built = (
            Arc::new(XdsResource::encode(name.clone(), &c)),
            cla.map(|cla| Arc::new(XdsResource::encode(name, &cla))),
        );
        lock(&self.clusters).insert(key, built.clone());
        built
    }

    fn cluster(
        &self,
        name: &str,
        s: &Service,
        port: &Port,
        subset: Option<&str>,
        dr: Option<&DestinationRule>,
        policy: Option<&Policy>,
    ) -> (Cluster, Option<ClusterLoadAssignment>) {
        let subset_labels = subset
            .and_then(|sub| dr?.subsets.iter().find(|x| x.name == sub))
            .map(|x| &x.labels);
        let endpoints: Vec<&Endpoint> = s
            .endpoints
            .iter()
            .filter(|e| {
                subset_labels.is_none_or(|l| hypha_config::types::labels_match(l, &e.labels))
            })
            .collect();
        let mut c = Cluster {
            name: name.to_string(),
            connect_timeout: Some(secs(10)),
            ..Default::default()
        };
        let mesh_internal = s.location == Location::MeshInternal;
        let tls_endpoint = |e: &Endpoint| {
            self.mtls
                && mesh_internal
                && e.sidecar
                && crate::mtls::mode(&self.cfg, &e.namespace, &e.labels, e.port_for(port))
                    != MtlsMode::Disable
        };
        let mut cla = load_assignment(name, &endpoints, port, tls_endpoint);
        let dns = matches!(s.resolution, Resolution::Dns | Resolution::DnsRoundRobin);
        if dns {
            c.cluster_discovery_type = Some(cluster::ClusterDiscoveryType::Type(
                if s.resolution == Resolution::Dns {
                    cluster::DiscoveryType::StrictDns as i32
                } else {
                    cluster::DiscoveryType::LogicalDns as i32
                },
            ));
            c.dns_lookup_family = cluster::DnsLookupFamily::All as i32;
            if s.endpoints.is_empty() {
                // A DNS service without endpoints resolves its own host name.
                cla.endpoints = vec![LocalityLbEndpoints {
                    lb_endpoints: vec![lb_endpoint(&s.hostname, port.number, &[], None)],
                    ..Default::default()
                }];
            }
            c.load_assignment = Some(cla.clone());
        } else if s.resolution == Resolution::None && s.endpoints.is_empty() {
            c.cluster_discovery_type = Some(cluster::ClusterDiscoveryType::Type(
                cluster::DiscoveryType::OriginalDst as i32,
            ));
            c.lb_policy = cluster::LbPolicy::ClusterProvided as i32;
        } else {
            c.cluster_discovery_type = Some(cluster::ClusterDiscoveryType::Type(
                cluster::DiscoveryType::Eds as i32,
            ));
            c.eds_cluster_config = Some(cluster::EdsClusterConfig {
                eds_config: Some(envoy::ads()),
                service_name: name.to_string(),
            });
        }
        let pool = policy.and_then(|p| p.connection_pool.as_ref());
        if let Some(t) = pool
            .and_then(|p| p.tcp.as_ref())
            .and_then(|t| t.connect_timeout)
        {
            c.connect_timeout = Some(envoy::duration(t.as_std()));
        }
        if c.lb_policy != cluster::LbPolicy::ClusterProvided as i32 {
            c.lb_policy = lb_policy(policy.and_then(|p| p.load_balancer.as_ref())) as i32;
        }
        c.circuit_breakers = Some(circuit_breakers(pool));
        let http = pool.and_then(|p| p.http.as_ref());
        if port.protocol.is_http() {
            let h2 = port.protocol == Protocol::Http2
                || http.and_then(|h| h.h2_upgrade_policy.as_deref()) == Some("UPGRADE");
            c.typed_extension_protocol_options.insert(
                envoy::UPSTREAM_HTTP_OPTIONS.into(),
                any(&upstream_http_options(h2, pool)),
            );
        }
        if let Some(od) = policy.and_then(|p| p.outlier_detection.as_ref()) {
            c.outlier_detection = Some(outlier(od));
        }
        let eds = c.eds_cluster_config.is_some();
        if self.mtls && eds && mesh_internal {
            let h2 = port.protocol == Protocol::Http2
                || http.and_then(|h| h.h2_upgrade_policy.as_deref()) == Some("UPGRADE");
            let alpn: &[&str] = match (port.protocol.is_http(), h2) {
                (false, _) => &[],
                (true, true) => &["h2"],
                (true, false) => &["http/1.1"],
            };
            let sni = format!(
                "outbound_.{}_.{}_.{}",
                port.number,
                subset.unwrap_or(""),
                s.hostname
            );
            let ids = identities(&self.cfg.mesh.trust_domain, s);
            let tls = crate::mtls::upstream(&ids, alpn, &sni);
            match policy.and_then(|p| p.tls.as_ref()).and_then(|t| t.mode) {
                Some(TlsMode::Disable) => {}
                Some(TlsMode::IstioMutual) => c.transport_socket = Some(tls),
                // Auto mTLS (SIMPLE and MUTUAL origination to external servers are for
                // MESH_EXTERNAL services, which get none here).
                _ => c.transport_socket_matches = crate::mtls::auto_matches(tls),
            }
        }
        (c, eds.then_some(cla))
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

    /// The chains of a TLS service port's VirtualService `tls` routes, in order: each takes the
    /// server names of its matches that apply to `port`, to its first destination (weighted
    /// splits use the first destination, as TCP routes do).
    pub fn sni_chains(&self, s: &Service, port: u32) -> Vec<FilterChain> {
        let mut chains = Vec::new();
        for vs in self.virtual_services_of(&s.hostname) {
            for (i, r) in vs.spec.tls.iter().enumerate() {
                let names: Vec<String> = r
                    .matches
                    .iter()
                    .filter(|m| m.port.is_none_or(|p| p == port))
                    .flat_map(|m| &m.sni_hosts)
                    .map(|h| self.cfg.resolve_host(h, &vs.namespace))
                    .collect();
                let Some(d) = r.route.first() else { continue };
                if names.is_empty() {
                    continue;
                }
                let host = self.cfg.resolve_host(&d.destination.host, &vs.namespace);
                let p = d.destination.port.map_or(port, |p| p.number);
                let cluster = self.cluster_for(&host, p, d.destination.subset.as_deref());
                let name = format!("{}_{port}_tls{i}_{}", s.hostname, vs.name);
                chains.push(with_server_names(tcp_chain(&name, &cluster), names));
            }
        }
        chains
    }

    pub fn tcp_cluster(&self, s: &Service, port: u32) -> String {
        // A TCP VirtualService's first route wins: weighted TCP splits are not expressed per
        // listener yet, so they use the first destination.
        for vs in self.virtual_services_of(&s.hostname) {
            for r in &vs.spec.tcp {
                if r.matches.iter().all(|m| m.port.is_some_and(|p| p != port))
                    && !r.matches.is_empty()
                {
                    continue;
                }
                if let Some(d) = r.route.first() {
                    let host = self.cfg.resolve_host(&d.destination.host, &vs.namespace);
                    let p = d.destination.port.map_or(port, |p| p.number);
                    return self.cluster_for(&host, p, d.destination.subset.as_deref());
                }
            }
        }
        outbound_cluster_name(&s.hostname, port, None)
    }

    /// Consistent-hash keys of the DestinationRule for `host`/`port`/`subset`.
    pub fn hash_policy(&self, host: &str, port: u32, subset: Option<&str>) -> Vec<HashPolicy> {
        let Some(dr) = self.destination_rule(host) else {
            return Vec::new();
        };
        let policy = effective_policy(&dr.spec, port, subset);
        let Some(ch) = policy
            .load_balancer
            .as_ref()
            .and_then(|lb| lb.consistent_hash.as_ref())
        else {
            return Vec::new();
        };
        let spec = if let Some(h) = &ch.http_header_name {
            hash_policy::PolicySpecifier::Header(hash_policy::Header {
                header_name: h.clone(),
                ..Default::default()
            })
        } else if let Some(c) = &ch.http_cookie {
            hash_policy::PolicySpecifier::Cookie(hash_policy::Cookie {
                name: c.name.clone(),
                path: c.path.clone().unwrap_or_default(),
                ttl: c.ttl.map(|t| envoy::duration(t.as_std())),
                ..Default::default()
            })
        } else if ch.use_source_ip == Some(true) {
            hash_policy::PolicySpecifier::ConnectionProperties(hash_policy::ConnectionProperties {
                source_ip: true,
            })
        } else if let Some(q) = &ch.http_query_parameter_name {
            hash_policy::PolicySpecifier::QueryParameter(hash_policy::QueryParameter {
                name: q.clone(),
            })
        } else {
            return Vec::new();
        };
        vec![HashPolicy {
            policy_specifier: Some(spec),
            ..Default::default()
        }]
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The traffic policy that applies to one port of one subset: subset settings override the
/// top level, port-level settings override both (Istio's merge).
#[derive(Debug, Clone, Default)]
pub(crate) struct Policy {
    pub load_balancer: Option<LoadBalancerSettings>,
    pub connection_pool: Option<ConnectionPoolSettings>,
    pub outlier_detection: Option<OutlierDetection>,
    pub tls: Option<ClientTlsSettings>,
}

fn effective_policy(dr: &DestinationRule, port: u32, subset: Option<&str>) -> Policy {
    let mut p = Policy::default();
    let mut apply = |tp: &TrafficPolicy| {
        if tp.load_balancer.is_some() {
            p.load_balancer.clone_from(&tp.load_balancer);
        }
        if tp.connection_pool.is_some() {
            p.connection_pool.clone_from(&tp.connection_pool);
        }
        if tp.outlier_detection.is_some() {
            p.outlier_detection.clone_from(&tp.outlier_detection);
        }
        if tp.tls.is_some() {
            p.tls.clone_from(&tp.tls);
        }
        if let Some(pl) = tp
            .port_level_settings
            .iter()
            .find(|pl| pl.port.is_some_and(|x| x.number == port))
        {
            if pl.load_balancer.is_some() {
                p.load_balancer.clone_from(&pl.load_balancer);
            }
            if pl.connection_pool.is_some() {
                p.connection_pool.clone_from(&pl.connection_pool);
            }
            if pl.outlier_detection.is_some() {
                p.outlier_detection.clone_from(&pl.outlier_detection);
            }
            if pl.tls.is_some() {
                p.tls.clone_from(&pl.tls);
            }
        }
    };
    if let Some(tp) = &dr.traffic_policy {
        apply(tp);
    }
    if let Some(tp) = subset
        .and_then(|s| dr.subsets.iter().find(|x| x.name == s))
        .and_then(|x| x.traffic_policy.as_ref())
    {
        apply(tp);
    }
    p
}

fn lb_policy(lb: Option<&LoadBalancerSettings>) -> cluster::LbPolicy {
    let Some(lb) = lb else {
        return cluster::LbPolicy::LeastRequest; // Istio's default since 1.14
    };
    if let Some(ch) = &lb.consistent_hash {
        return if ch.maglev.is_some() {
            cluster::LbPolicy::Maglev
        } else {
            cluster::LbPolicy::RingHash
        };
    }
    match lb.simple {
        Some(SimpleLb::RoundRobin) => cluster::LbPolicy::RoundRobin,
        Some(SimpleLb::Random) => cluster::LbPolicy::Random,
        Some(SimpleLb::Passthrough) => cluster::LbPolicy::ClusterProvided,
        _ => cluster::LbPolicy::LeastRequest,
    }
}

fn circuit_breakers(pool: Option<&ConnectionPoolSettings>) -> CircuitBreakers {
    // Istio's defaults are effectively unlimited; limits apply only where the user set them.
    let limit = |v: Option<i64>| {
        Some(u32v(
            v.and_then(|v| u32::try_from(v).ok()).unwrap_or(u32::MAX),
        ))
    };
    let tcp = pool.and_then(|p| p.tcp.as_ref());
    let http = pool.and_then(|p| p.http.as_ref());
    CircuitBreakers {
        thresholds: vec![Thresholds {
            max_connections: limit(tcp.and_then(|t| t.max_connections)),
            max_pending_requests: limit(http.and_then(|h| h.http1_max_pending_requests)),
            max_requests: limit(http.and_then(|h| h.http2_max_requests)),
            max_retries: limit(http.and_then(|h| h.max_retries)),
            track_remaining: true,
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn upstream_http_options(h2: bool, pool: Option<&ConnectionPoolSettings>) -> HttpProtocolOptions {
    let http = pool.and_then(|p| p.http.as_ref());
    let common = CoreHttpOptions {
        idle_timeout: http
            .and_then(|h| h.idle_timeout)
            .map(|d| envoy::duration(d.as_std())),
        max_requests_per_connection: http
            .and_then(|h| h.max_requests_per_connection)
            .and_then(|v| u32::try_from(v).ok())
            .map(u32v),
        ..Default::default()
    };
    let protocol = if h2 {
        ProtocolConfig::Http2ProtocolOptions(Http2ProtocolOptions {
            max_concurrent_streams: http
                .and_then(|h| h.max_concurrent_streams)
                .and_then(|v| u32::try_from(v).ok())
                .map(u32v),
            ..Default::default()
        })
    } else {
        ProtocolConfig::HttpProtocolOptions(Http1ProtocolOptions::default())
    };
    HttpProtocolOptions {
        common_http_protocol_options: Some(common),
        upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(
            ExplicitHttpConfig {
                protocol_config: Some(protocol),
            },
        )),
        ..Default::default()
    }
}

fn outlier(od: &OutlierDetection) -> EnvoyOutlier {
    let five = od.consecutive_5xx_errors.or(od.consecutive_errors);
    let gw = od.consecutive_gateway_errors;
    EnvoyOutlier {
        // An unset count disables that kind of ejection (Istio sets enforcement to 0).
        consecutive_5xx: Some(u32v(five.unwrap_or(0))),
        enforcing_consecutive_5xx: Some(u32v(if five.is_some_and(|n| n > 0) { 100 } else { 0 })),
        consecutive_gateway_failure: gw.map(u32v),
        enforcing_consecutive_gateway_failure: gw.map(|n| u32v(if n > 0 { 100 } else { 0 })),
        interval: od.interval.map(|d| envoy::duration(d.as_std())),
        base_ejection_time: od.base_ejection_time.map(|d| envoy::duration(d.as_std())),
        max_ejection_percent: od
            .max_ejection_percent
            .and_then(|v| u32::try_from(v).ok())
            .map(u32v),
        split_external_local_origin_errors: od.split_external_local_origin_errors.unwrap_or(false),
        consecutive_local_origin_failure: od.consecutive_local_origin_failures.map(u32v),
        ..Default::default()
    }
}

/// The SPIFFE IDs a service's sidecars run as: what a client checks the server against.
fn identities(trust_domain: &str, s: &Service) -> Vec<String> {
    let mut ids: Vec<String> = s
        .endpoints
        .iter()
        .filter(|e| e.sidecar)
        .map(|e| {
            format!(
                "spiffe://{trust_domain}/ns/{}/sa/{}",
                e.namespace, e.service_account
            )
        })
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// Endpoints by locality; those for which `tls` says so carry the `tlsMode: istio` metadata
/// auto mTLS matches on.
fn load_assignment(
    name: &str,
    endpoints: &[&Endpoint],
    port: &Port,
    tls: impl Fn(&Endpoint) -> bool,
) -> ClusterLoadAssignment {
    let mut by_locality: BTreeMap<&str, Vec<LbEndpoint>> = BTreeMap::new();
    for e in endpoints {
        let Some((first, rest)) = e.addresses.split_first() else {
            continue;
        };
        let mut lb = lb_endpoint(first, e.port_for(port), rest, e.weight);
        if tls(e) {
            lb.metadata = Some(crate::mtls::endpoint_metadata());
        }
        by_locality.entry(e.locality.as_str()).or_default().push(lb);
    }
    ClusterLoadAssignment {
        cluster_name: name.to_string(),
        endpoints: by_locality
            .into_iter()
            .map(|(loc, lb_endpoints)| {
                let mut parts = loc.splitn(3, '/');
                let locality = (!loc.is_empty()).then(|| Locality {
                    region: parts.next().unwrap_or_default().to_string(),
                    zone: parts.next().unwrap_or_default().to_string(),
                    sub_zone: parts.next().unwrap_or_default().to_string(),
                });
                LocalityLbEndpoints {
                    locality,
                    lb_endpoints,
                    ..Default::default()
                }
            })
            .collect(),
        ..Default::default()
    }
}

fn lb_endpoint(addr: &str, port: u32, others: &[String], weight: Option<u32>) -> LbEndpoint {
    LbEndpoint {
        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(EnvoyEndpoint {
            address: Some(socket(addr, port)),
            additional_addresses: others
                .iter()
                .map(|a| endpoint::AdditionalAddress {
                    address: Some(socket(a, port)),
                })
                .collect(),
            ..Default::default()
        })),
        load_balancing_weight: weight.filter(|w| *w > 0).map(u32v),
        ..Default::default()
    }
}

fn passthrough_cluster() -> Cluster {
    Cluster {
        name: PASSTHROUGH.into(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::OriginalDst as i32,
        )),
        lb_policy: cluster::LbPolicy::ClusterProvided as i32,
        connect_timeout: Some(secs(10)),
        ..Default::default()
    }
}

fn hcm_base(stat_prefix: &str) -> HttpConnectionManager {
    HttpConnectionManager {
        stat_prefix: stat_prefix.to_string(),
        codec_type: CodecType::Auto as i32,
        http_filters: vec![
            HttpFilter {
                name: envoy::FAULT.into(),
                config_type: Some(http_filter::ConfigType::TypedConfig(any(
                    &HttpFault::default(),
                ))),
                ..Default::default()
            },
            HttpFilter {
                name: envoy::ROUTER.into(),
                config_type: Some(http_filter::ConfigType::TypedConfig(
                    any(&Router::default()),
                )),
                ..Default::default()
            },
        ],
        ..Default::default()
    }
}

fn hcm(stat_prefix: &str, route_config: &str) -> HttpConnectionManager {
    let mut h = hcm_base(stat_prefix);
    h.route_specifier = Some(RouteSpecifier::Rds(Rds {
        config_source: Some(envoy::ads()),
        route_config_name: route_config.to_string(),
    }));
    h
}

fn tcp_chain(name: &str, cluster: &str) -> FilterChain {
    FilterChain {
        name: name.to_string(),
        filters: vec![Filter {
            name: envoy::TCP_PROXY.into(),
            config_type: Some(filter::ConfigType::TypedConfig(any(&TcpProxy {
                stat_prefix: cluster.to_string(),
                cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(cluster.to_string())),
                ..Default::default()
            }))),
        }],
        ..Default::default()
    }
}

/// `chain`, taken only for connections whose ClientHello names one of `names`.
fn with_server_names(mut chain: FilterChain, names: Vec<String>) -> FilterChain {
    chain.filter_chain_match = Some(FilterChainMatch {
        server_names: names,
        ..Default::default()
    });
    chain
}

/// The names a chain's `filter_chain_match` selects on (none: it takes any connection).
fn server_names(c: &FilterChain) -> &[String] {
    c.filter_chain_match
        .as_ref()
        .map_or(&[], |m| m.server_names.as_slice())
}

/// Adds `chains` to an outbound listener where they select connections no chain it has
/// already selects: a server name goes to the first chain that names it, and only the first
/// chain without names takes the connections no name matches. Listeners with named chains
/// read the ClientHello first (the TLS inspector).
fn add_chains(l: &mut Listener, chains: Vec<FilterChain>) {
    let mut taken: HashSet<String> = l
        .filter_chains
        .iter()
        .flat_map(server_names)
        .cloned()
        .collect();
    let mut default_taken = l.filter_chains.iter().any(|c| server_names(c).is_empty());
    for mut chain in chains {
        if server_names(&chain).is_empty() {
            if !std::mem::replace(&mut default_taken, true) {
                l.filter_chains.push(chain);
            }
            continue;
        }
        let fresh: Vec<String> = server_names(&chain)
            .iter()
            .filter(|n| taken.insert((*n).clone()))
            .cloned()
            .collect();
        if !fresh.is_empty() {
            if let Some(m) = &mut chain.filter_chain_match {
                m.server_names = fresh;
            }
            l.filter_chains.push(chain);
        }
    }
    let named = l.filter_chains.iter().any(|c| !server_names(c).is_empty());
    if named && l.listener_filters.is_empty() {
        l.listener_filters = vec![crate::mtls::tls_inspector()];
    }
}

/// Host names a request for this service may carry: the full host, the short forms Kubernetes
/// DNS allows from `proxy_ns`, and the VIPs, each with and without the port.
fn domains(s: &Service, port: u32, proxy_ns: &str) -> Vec<String> {
    let mut names = vec![s.hostname.clone()];
    let parts: Vec<&str> = s.hostname.split('.').collect();
    if parts.len() >= 3 && parts[2] == "svc" {
        names.push(format!("{}.{}.svc", parts[0], parts[1]));
        names.push(format!("{}.{}", parts[0], parts[1]));
        if parts[1] == proxy_ns {
            names.push(parts[0].to_string());
        }
    }
    let mut out = Vec::new();
    for n in names {
        out.push(format!("{n}:{port}"));
        out.push(n);
    }
    for ip in &s.vips {
        match ip {
            IpAddr::V4(v4) => {
                out.push(format!("{v4}:{port}"));
                out.push(v4.to_string());
            }
            IpAddr::V6(v6) => {
                out.push(format!("[{v6}]:{port}"));
                out.push(format!("[{v6}]"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_names() {
        assert_eq!(
            outbound_cluster_name("a.b.svc.cluster.local", 80, Some("v1")),
            "outbound|80|v1|a.b.svc.cluster.local"
        );
        assert_eq!(outbound_cluster_name("a", 80, None), "outbound|80||a");
    }
}
