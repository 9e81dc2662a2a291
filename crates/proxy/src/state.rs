//! What the proxy has accepted from xDS, per type, already compiled; and the runtime config
//! assembled from it. An update is applied to a copy and only replaces the state when every
//! resource in it compiled, so a refused update changes nothing.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use hypha_xds::{type_url, Resource};

use crate::compile::{self, ListenerParts, Refused};
use crate::model::{
    Cluster, ClusterKind, ClusterRuntime, Config, Endpoint, EndpointSet, EndpointState, FastMap,
    ListenAddr, Outbound, RouteTable, UpstreamTls,
};

/// The accepted resources, compiled.
#[derive(Debug, Default, Clone)]
pub struct State {
    clusters: FastMap<String, Arc<Cluster>>,
    endpoints: HashMap<String, Arc<[Endpoint]>>,
    listeners: HashMap<String, ListenerParts>,
    routes: FastMap<String, Arc<RouteTable>>,
    /// Live state carried from one assembled config to the next: per cluster, and per
    /// endpoint by (cluster, primary address).
    cluster_runtime: HashMap<String, Arc<ClusterRuntime>>,
    endpoint_states: HashMap<(String, SocketAddr), Arc<EndpointState>>,
    /// Whether the proxy has a workload certificate: without one, resources that need mutual
    /// TLS are refused.
    identity: bool,
    /// The resource types an update of which has been applied.
    seen: BTreeSet<String>,
    /// A complete config has been assembled once (see [`Config::complete`]).
    complete: bool,
}

/// The outcome of applying one update.
#[derive(Debug)]
pub struct Applied {
    pub config: Arc<Config>,
    /// Route tables and EDS clusters the config now refers to, for RDS/EDS subscriptions.
    pub wanted_routes: BTreeSet<String>,
    pub wanted_endpoints: BTreeSet<String>,
}

impl State {
    /// An empty state for a proxy with (or without) a workload certificate.
    pub fn new(identity: bool) -> State {
        State {
            identity,
            ..State::default()
        }
    }

    /// Applies an update of one type: changed resources and removed names. On error nothing
    /// changes and the reasons (every refused resource) are returned for the NACK.
    pub fn apply(
        &mut self,
        type_url: &str,
        resources: &[Resource],
        removed: &[String],
    ) -> Result<(), Vec<Refused>> {
        let mut refused = Vec::new();
        macro_rules! update {
            ($map:expr, $compile:expr) => {{
                let mut compiled = Vec::new();
                for r in resources {
                    match $compile(&r.name, &r.body.value) {
                        Ok(c) => compiled.push((r.name.clone(), c)),
                        Err(e) => refused.push(e),
                    }
                }
                if refused.is_empty() {
                    for name in removed {
                        $map.remove(name);
                    }
                    $map.extend(compiled);
                }
            }};
        }
        let identity = self.identity;
        let no_identity = |kind: &'static str, name: &str| Refused {
            kind,
            name: name.to_owned(),
            reason: "needs mutual TLS with the workload certificate, and this proxy has none \
                     (start it with --ca-root and a join token)"
                .into(),
        };
        match type_url {
            type_url::CLUSTER => update!(self.clusters, |n: &str, b: &[u8]| compile::cluster(n, b)
                .and_then(|c| match c.tls {
                    Some(UpstreamTls::Mesh(_)) if !identity => Err(no_identity("cluster", n)),
                    _ => Ok(Arc::new(c)),
                })),
            type_url::ENDPOINT => update!(self.endpoints, compile::endpoints),
            type_url::LISTENER => {
                update!(self.listeners, |n: &str, b: &[u8]| compile::listener(n, b)
                    .and_then(|l| {
                        if !identity && l.inbound.iter().any(|(_, tls, _)| *tls) {
                            Err(no_identity("listener", n))
                        } else {
                            Ok(l)
                        }
                    }))
            }
            type_url::ROUTE => update!(self.routes, |n: &str, b: &[u8]| compile::route_table(n, b)
                .map(Arc::new)),
            other => refused.push(Refused {
                kind: "type",
                name: other.to_owned(),
                reason: "resource type not supported by the Hypha proxy".into(),
            }),
        }
        if refused.is_empty() {
            self.seen.insert(type_url.to_owned());
            Ok(())
        } else {
            Err(refused)
        }
    }

    /// The runtime config for the current state. Live state (requests in flight, ejections)
    /// of clusters and endpoints that still exist carries over.
    pub fn assemble(&mut self) -> Applied {
        let mut runtime = HashMap::new();
        let mut states = HashMap::new();
        let mut config = Config {
            routes: self.routes.clone(),
            clusters: self.clusters.clone(),
            endpoints: self.endpoints.clone(),
            ..Default::default()
        };
        let mut wanted_routes = BTreeSet::new();
        for (name, c) in &self.clusters {
            let endpoints = match &c.kind {
                ClusterKind::Eds => self.endpoints.get(name).cloned(),
                ClusterKind::Static(e) => Some(e.clone()),
                ClusterKind::OriginalDst | ClusterKind::Dns(_) => None,
            };
            if let Some(endpoints) = endpoints {
                let rt = self.cluster_runtime.get(name).cloned().unwrap_or_default();
                runtime.insert(name.clone(), rt.clone());
                let endpoint_states = endpoints
                    .iter()
                    .map(|e| {
                        let key = (name.clone(), e.addresses[0]);
                        let st = self.endpoint_states.get(&key).cloned().unwrap_or_default();
                        states.insert(key, st.clone());
                        st
                    })
                    .collect();
                config.endpoint_sets.insert(
                    name.clone(),
                    Arc::new(EndpointSet {
                        endpoints,
                        states: endpoint_states,
                        runtime: rt,
                        next: Default::default(),
                    }),
                );
            }
        }
        self.cluster_runtime = runtime;
        self.endpoint_states = states;
        for (name, parts) in &self.listeners {
            if let Some((addr, o)) = &parts.outbound {
                match o {
                    Outbound::Http { route_table, paths } => {
                        let (ListenAddr::AnyOn(port) | ListenAddr::Vip(_, port)) = addr;
                        config
                            .http_by_port
                            .insert(*port, (route_table.clone(), *paths));
                    }
                    Outbound::Tcp(routes) => {
                        for a in std::iter::once(addr).chain(&parts.additional) {
                            config.tcp.insert(a.clone(), routes.clone());
                        }
                        if let Some(service) = &routes.service {
                            config
                                .tcp_by_service
                                .insert(service.clone(), routes.clone());
                        }
                    }
                }
                config
                    .outbound
                    .insert(name.clone(), (addr.clone(), o.clone()));
            }
            for (port, tls, chain) in &parts.inbound {
                let chains = if *tls {
                    &mut config.inbound_tls
                } else {
                    &mut config.inbound
                };
                match port {
                    Some(port) => {
                        chains.by_port.insert(*port, chain.clone());
                    }
                    None => chains.any = Some(chain.clone()),
                }
            }
            wanted_routes.extend(parts.rds.iter().cloned());
        }
        let wanted_endpoints: BTreeSet<String> = self
            .clusters
            .iter()
            .filter(|(_, c)| matches!(c.kind, ClusterKind::Eds))
            .map(|(n, _)| n.clone())
            .collect();
        self.complete = self.complete
            || (self.seen.contains(type_url::CLUSTER)
                && self.seen.contains(type_url::LISTENER)
                && wanted_routes.iter().all(|r| config.routes.contains_key(r))
                && wanted_endpoints
                    .iter()
                    .all(|e| config.endpoints.contains_key(e)));
        config.complete = self.complete;
        Applied {
            config: Arc::new(config),
            wanted_routes,
            wanted_endpoints,
        }
    }
}

/// A NACK's error detail: every refused resource, one per line.
pub fn nack_message(refused: &[Refused]) -> String {
    refused
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}
