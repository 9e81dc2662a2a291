//! Outbound listeners (per service port, `virtualOutbound`, `api_listener`s) with their
//! RouteConfigurations, and the filter chain and HTTP connection manager builders.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::{cluster, Cluster};
use envoy_types::pb::envoy::config::core::v3::TrafficDirection;
use envoy_types::pb::envoy::config::listener::v3::{
    filter, ApiListener, Filter, FilterChain, FilterChainMatch, Listener,
};
use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, VirtualHost};
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::{CodecType, PathWithEscapedSlashesAction, RouteSpecifier},
    http_filter, HttpConnectionManager, HttpFilter, Rds,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{tcp_proxy, TcpProxy};
use hypha_config::mesh::{IpFamily, Normalization};
use hypha_config::networking::VirtualService;
use hypha_config::Resource;
use hypha_xds::{Resource as XdsResource, Snapshot};

use super::cluster::passthrough_cluster;
use super::{
    cluster::outbound_cluster_name, lock, Outbound, Translation, BLACKHOLE, PASSTHROUGH,
    VIRTUAL_OUTBOUND_PORT,
};
use crate::envoy::{self, any, boolv, secs, socket};
use crate::registry::{Protocol, Service};
use crate::routes::{catch_all, http_routes};
use hypha_xds::ProxyInfo;

/// What one HTTP service port contributes to the outbound routes.
pub(super) struct ServiceRoutes {
    /// `<host>:<port>`: the virtual host's name.
    name: String,
    routes: Vec<envoy_types::pb::envoy::config::route::v3::Route>,
    /// The `<host>:<port>` RouteConfiguration and Listener (proxyless gRPC).
    route_config: Arc<XdsResource>,
    api_listener: Arc<XdsResource>,
}

impl Translation {
    /// How the mesh normalizes request paths.
    pub(super) fn normalization(&self) -> Normalization {
        self.cfg.mesh.path_normalization.normalization
    }

    fn families(&self) -> (bool, bool) {
        let f = &self.cfg.mesh.ip_families;
        (f.contains(&IpFamily::IPv4), f.contains(&IpFamily::IPv6))
    }

    /// A listener address on every configured family: the first is the primary, the rest go to
    /// `additional_addresses`.
    pub(super) fn wildcard_listener(
        &self,
        name: String,
        port: u32,
        direction: TrafficDirection,
    ) -> Listener {
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
    pub(super) fn outbound(&self, proxy: &ProxyInfo, out: &mut Snapshot) {
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
                    let clusters = ctx.tcp_clusters(s, port.number);
                    let default = tcp_chain_to(
                        &format!("{}_{}", s.hostname, port.number),
                        &outbound_cluster_name(&s.hostname, port.number, None),
                        &clusters,
                    );
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
                    config_type: Some(filter::ConfigType::TypedConfig(any(&hcm(
                        &lname,
                        &name,
                        self.normalization(),
                    )))),
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

    /// The routes of one service port, and the route table and `api_listener` proxyless gRPC
    /// clients use for it. When no rule depends on the namespace looking (see
    /// [`namespace_independent`](super::namespace_independent)), built once per generation for
    /// every namespace.
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
        if let Some(carried) = self.carried_routes(service, vs, port) {
            lock(&self.service_routes).insert((service, port), carried.clone());
            return carried;
        }
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
                    api_listener: Some(any(&hcm(&name, &name, self.normalization()))),
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
}

impl Translation {
    /// The routes the generation before built for service `service`'s `port`, when they
    /// depend on nothing that changed: the same services (but endpoints) in the same order,
    /// mesh and DestinationRules, no rule that depends on the namespace looking, and the same
    /// VirtualService for the host.
    fn carried_routes(
        &self,
        service: usize,
        vs: Option<&Resource<VirtualService>>,
        port: u32,
    ) -> Option<Arc<ServiceRoutes>> {
        let before = self.before();
        let before = before.as_ref().filter(|b| b.same_services)?;
        let old = &before.t;
        let hit = lock(&old.service_routes).get(&(service, port)).cloned()?;
        let ctx = Outbound {
            cfg: &old.cfg,
            reg: &old.registry,
            rules: &old.rules,
            ns: &old.registry.services[service].namespace,
        };
        let old_vs = ctx.virtual_service(&old.registry.services[service].hostname);
        let same = match (vs, old_vs) {
            (None, None) => true,
            (Some(a), Some(b)) => {
                super::same_resources(std::slice::from_ref(a), std::slice::from_ref(b))
            }
            _ => false,
        };
        same.then_some(hit)
    }
}

impl Outbound<'_> {
    /// The chains of a TLS service port's VirtualService `tls` routes, in order: each takes the
    /// server names of its matches that apply to `port`, to its destinations by weight.
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
                let clusters = self.weighted(&r.route, port, &vs.namespace);
                if names.is_empty() || clusters.is_empty() {
                    continue;
                }
                let name = format!("{}_{port}_tls{i}_{}", s.hostname, vs.name);
                let service = outbound_cluster_name(&s.hostname, port, None);
                chains.push(with_server_names(
                    tcp_chain_to(&name, &service, &clusters),
                    names,
                ));
            }
        }
        chains
    }
}

/// An HTTP connection manager with the fault filter and the router, normalizing paths as the
/// mesh says (Istio's `pathNormalization`).
pub(super) fn hcm_base(stat_prefix: &str, normalization: Normalization) -> HttpConnectionManager {
    let (normalize, merge, unescape) = match normalization {
        Normalization::None => (false, false, false),
        Normalization::Default | Normalization::Base => (true, false, false),
        Normalization::MergeSlashes => (true, true, false),
        Normalization::DecodeAndMergeSlashes => (true, true, true),
    };
    HttpConnectionManager {
        normalize_path: Some(boolv(normalize)),
        merge_slashes: merge,
        path_with_escaped_slashes_action: if unescape {
            PathWithEscapedSlashesAction::UnescapeAndForward
        } else {
            PathWithEscapedSlashesAction::KeepUnchanged
        } as i32,
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

fn hcm(
    stat_prefix: &str,
    route_config: &str,
    normalization: Normalization,
) -> HttpConnectionManager {
    let mut h = hcm_base(stat_prefix, normalization);
    h.route_specifier = Some(RouteSpecifier::Rds(Rds {
        config_source: Some(envoy::ads()),
        route_config_name: route_config.to_string(),
    }));
    h
}

pub(super) fn tcp_chain(name: &str, cluster: &str) -> FilterChain {
    tcp_proxy_chain(
        name,
        cluster,
        tcp_proxy::ClusterSpecifier::Cluster(cluster.to_string()),
    )
}

fn tcp_proxy_chain(
    name: &str,
    stat_prefix: &str,
    cluster: tcp_proxy::ClusterSpecifier,
) -> FilterChain {
    FilterChain {
        name: name.to_string(),
        filters: vec![Filter {
            name: envoy::TCP_PROXY.into(),
            config_type: Some(filter::ConfigType::TypedConfig(any(&TcpProxy {
                stat_prefix: stat_prefix.to_string(),
                cluster_specifier: Some(cluster),
                ..Default::default()
            }))),
        }],
        ..Default::default()
    }
}

/// A TCP proxy chain of service `service` (its own cluster's name: the chain's stat prefix,
/// by which a sidecar's local port for the service finds the chain) to `clusters` by weight
/// (Envoy's `weighted_clusters`), or to the one.
pub(super) fn tcp_chain_to(name: &str, service: &str, clusters: &[(String, u32)]) -> FilterChain {
    let cluster = match clusters {
        [] => return tcp_chain(name, BLACKHOLE),
        [(one, _)] => tcp_proxy::ClusterSpecifier::Cluster(one.clone()),
        _ => tcp_proxy::ClusterSpecifier::WeightedClusters(tcp_proxy::WeightedCluster {
            clusters: clusters
                .iter()
                .map(|(c, w)| tcp_proxy::weighted_cluster::ClusterWeight {
                    name: c.clone(),
                    weight: *w,
                    ..Default::default()
                })
                .collect(),
        }),
    };
    tcp_proxy_chain(name, service, cluster)
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
