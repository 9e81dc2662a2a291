//! xDS resources → the runtime [`model`](crate::model). Each resource is decoded and checked on
//! its own, so a bad one is refused (NACKed) with a reason that names the resource and the
//! Envoy field Hypha does not support, and never half-applied. Fields Hypha does not act on are
//! refused rather than silently ignored, except the ones listed as informational.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::{cluster, Cluster as EnvoyCluster};
use envoy_types::pb::envoy::config::core::v3::{
    address, socket_address, Address, HeaderValueOption,
};
use envoy_types::pb::envoy::config::endpoint::v3::{lb_endpoint, ClusterLoadAssignment};
use envoy_types::pb::envoy::config::listener::v3::{filter, Filter, FilterChain, Listener};
use envoy_types::pb::envoy::config::route::v3::{
    header_matcher::HeaderMatchSpecifier, query_parameter_matcher::QueryParameterMatchSpecifier,
    redirect_action, route, route_action, route_match::PathSpecifier, HeaderMatcher,
    Route as EnvoyRoute, RouteConfiguration, VirtualHost as EnvoyVirtualHost,
};
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::RouteSpecifier, HttpConnectionManager,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{tcp_proxy, TcpProxy};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    http_protocol_options::{explicit_http_config::ProtocolConfig, UpstreamProtocolOptions},
    HttpProtocolOptions,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{string_matcher::MatchPattern, StringMatcher};
use envoy_types::pb::envoy::r#type::v3::FractionalPercent;
use hypha_matcher::{Attr, Condition, Pattern, Rule, StringMatch, Table, Test};
use prost::Message;

use crate::model::{
    Action, Cluster, ClusterKind, Endpoint, Fault, Forward, HashKey, HeaderAdd, HeaderAppend,
    HeaderOps, Inbound, Lb, Limits, ListenAddr, Outbound, OutlierPolicy, Redirect, RetryPolicy,
    Route, RouteTable, VirtualHost, WeightedCluster,
};

const HCM: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const TCP_PROXY: &str =
    "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
const FAULT: &str = "envoy.filters.http.fault";
const ROUTER: &str = "envoy.filters.http.router";
const UPSTREAM_HTTP_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// Why a resource was refused: its name and the reason, for the NACK's error detail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {name:?}: {reason}")]
pub struct Refused {
    pub kind: &'static str,
    pub name: String,
    pub reason: String,
}

type Result<T> = std::result::Result<T, String>;

fn decode<M: Message + Default>(bytes: &[u8], what: &str) -> Result<M> {
    M::decode(bytes).map_err(|e| format!("cannot decode {what}: {e}"))
}

fn refuse<'a>(kind: &'static str, name: &'a str) -> impl FnOnce(String) -> Refused + 'a {
    move |reason| Refused {
        kind,
        name: name.to_owned(),
        reason,
    }
}

fn unsupported(field: &str) -> String {
    format!("field `{field}` is not supported by Hypha")
}

fn dur(d: &envoy_types::pb::google::protobuf::Duration) -> Duration {
    Duration::new(
        u64::try_from(d.seconds).unwrap_or(0),
        u32::try_from(d.nanos).unwrap_or(0),
    )
}

// ---------------------------------------------------------------------------------------------
// Clusters and endpoints.

/// A Cluster.
pub fn cluster(name: &str, bytes: &[u8]) -> std::result::Result<Cluster, Refused> {
    cluster_inner(bytes).map_err(refuse("cluster", name))
}

fn cluster_inner(bytes: &[u8]) -> Result<Cluster> {
    let c: EnvoyCluster = decode(bytes, "Cluster")?;
    if c.transport_socket.is_some() {
        return Err(unsupported("transport_socket"));
    }
    if c.lb_subset_config.is_some() {
        return Err(unsupported("lb_subset_config"));
    }
    let kind = match c.cluster_discovery_type {
        Some(cluster::ClusterDiscoveryType::Type(t)) => {
            match cluster::DiscoveryType::try_from(t).map_err(|_| format!("unknown type {t}"))? {
                cluster::DiscoveryType::Eds => ClusterKind::Eds,
                cluster::DiscoveryType::Static => ClusterKind::Static(
                    c.load_assignment
                        .as_ref()
                        .map(endpoints_of)
                        .transpose()?
                        .unwrap_or_default(),
                ),
                cluster::DiscoveryType::OriginalDst => ClusterKind::OriginalDst,
                cluster::DiscoveryType::StrictDns | cluster::DiscoveryType::LogicalDns => {
                    ClusterKind::Dns(dns_targets(c.load_assignment.as_ref())?)
                }
            }
        }
        Some(cluster::ClusterDiscoveryType::ClusterType(ct)) => {
            return Err(format!(
                "custom cluster type {:?} is not supported",
                ct.name
            ))
        }
        None => ClusterKind::Eds,
    };
    let lb = match cluster::LbPolicy::try_from(c.lb_policy)
        .map_err(|_| format!("unknown lb_policy {}", c.lb_policy))?
    {
        cluster::LbPolicy::RoundRobin => Lb::RoundRobin,
        cluster::LbPolicy::LeastRequest => Lb::LeastRequest,
        cluster::LbPolicy::Random => Lb::Random,
        cluster::LbPolicy::RingHash => Lb::RingHash,
        cluster::LbPolicy::Maglev => Lb::Maglev,
        cluster::LbPolicy::ClusterProvided => Lb::RoundRobin,
        other => return Err(format!("lb_policy {other:?} is not supported")),
    };
    let mut http2 = false;
    for (key, any) in &c.typed_extension_protocol_options {
        if key != UPSTREAM_HTTP_OPTIONS {
            return Err(format!(
                "typed_extension_protocol_options[{key:?}] is not supported"
            ));
        }
        let o: HttpProtocolOptions = decode(&any.value, "HttpProtocolOptions")?;
        http2 = match o.upstream_protocol_options {
            Some(UpstreamProtocolOptions::ExplicitHttpConfig(e)) => {
                matches!(
                    e.protocol_config,
                    Some(ProtocolConfig::Http2ProtocolOptions(_))
                )
            }
            Some(UpstreamProtocolOptions::UseDownstreamProtocolConfig(_)) => {
                return Err(unsupported("use_downstream_protocol_config"))
            }
            Some(UpstreamProtocolOptions::AutoConfig(_)) => return Err(unsupported("auto_config")),
            None => false,
        };
    }
    let mut limits = Limits::default();
    if let Some(cb) = &c.circuit_breakers {
        match cb.thresholds.as_slice() {
            [] => {}
            [t] if t.priority == 0 => {
                let v = |w: &Option<envoy_types::pb::google::protobuf::UInt32Value>, d: u32| {
                    w.as_ref().map_or(d, |w| w.value)
                };
                limits = Limits {
                    max_connections: v(&t.max_connections, limits.max_connections),
                    max_pending_requests: v(&t.max_pending_requests, limits.max_pending_requests),
                    max_requests: v(&t.max_requests, limits.max_requests),
                    max_retries: v(&t.max_retries, limits.max_retries),
                };
            }
            _ => {
                return Err(unsupported(
                    "circuit_breakers.thresholds (non-default priority)",
                ))
            }
        }
    }
    let outlier = c.outlier_detection.as_ref().map(|od| {
        type U32 = Option<envoy_types::pb::google::protobuf::UInt32Value>;
        let enforced = |n: &U32, enforcing: &U32, default: u32| {
            if enforcing.as_ref().is_some_and(|e| e.value == 0) {
                0
            } else {
                n.as_ref().map_or(default, |n| n.value)
            }
        };
        OutlierPolicy {
            consecutive_5xx: enforced(&od.consecutive_5xx, &od.enforcing_consecutive_5xx, 5),
            // Envoy enforces gateway failures at 0 % unless told otherwise.
            consecutive_gateway: if od.enforcing_consecutive_gateway_failure.is_none() {
                0
            } else {
                enforced(
                    &od.consecutive_gateway_failure,
                    &od.enforcing_consecutive_gateway_failure,
                    5,
                )
            },
            base_ejection: od
                .base_ejection_time
                .as_ref()
                .map_or(Duration::from_secs(30), dur),
            max_ejection_percent: od
                .max_ejection_percent
                .as_ref()
                .map_or(10, |p| p.value.min(100)),
        }
    });
    Ok(Cluster {
        name: c.name,
        kind,
        lb,
        connect_timeout: c
            .connect_timeout
            .as_ref()
            .map_or(Duration::from_secs(5), dur),
        http2,
        limits,
        outlier,
    })
}

/// A ClusterLoadAssignment's endpoints.
pub fn endpoints(name: &str, bytes: &[u8]) -> std::result::Result<Arc<[Endpoint]>, Refused> {
    decode::<ClusterLoadAssignment>(bytes, "ClusterLoadAssignment")
        .and_then(|cla| endpoints_of(&cla))
        .map_err(refuse("endpoints", name))
}

fn endpoints_of(cla: &ClusterLoadAssignment) -> Result<Arc<[Endpoint]>> {
    let mut out = Vec::new();
    for locality in &cla.endpoints {
        for lb in &locality.lb_endpoints {
            let Some(lb_endpoint::HostIdentifier::Endpoint(e)) = &lb.host_identifier else {
                return Err(unsupported("lb_endpoints.endpoint_name"));
            };
            let mut addresses = vec![socket_addr(e.address.as_ref())?];
            for extra in &e.additional_addresses {
                addresses.push(socket_addr(extra.address.as_ref())?);
            }
            out.push(Endpoint {
                addresses,
                weight: lb.load_balancing_weight.map_or(1, |w| w.value.max(1)),
            });
        }
    }
    Ok(out.into())
}

/// The host names and ports of a DNS cluster's endpoints.
fn dns_targets(cla: Option<&ClusterLoadAssignment>) -> Result<Arc<[(String, u16)]>> {
    let mut out = Vec::new();
    for lb in cla
        .iter()
        .flat_map(|c| &c.endpoints)
        .flat_map(|l| &l.lb_endpoints)
    {
        let Some(lb_endpoint::HostIdentifier::Endpoint(e)) = &lb.host_identifier else {
            return Err(unsupported("lb_endpoints.endpoint_name"));
        };
        match e.address.as_ref().and_then(|a| a.address.as_ref()) {
            Some(address::Address::SocketAddress(s)) => {
                let port = match s.port_specifier {
                    Some(socket_address::PortSpecifier::PortValue(p)) => {
                        u16::try_from(p).map_err(|_| format!("port {p} out of range"))?
                    }
                    _ => return Err(unsupported("socket_address.named_port")),
                };
                if s.address.is_empty() {
                    return Err("a DNS endpoint needs a host name".into());
                }
                out.push((s.address.clone(), port));
            }
            _ => return Err("only socket addresses are supported".into()),
        }
    }
    if out.is_empty() {
        return Err("a DNS cluster needs at least one endpoint in load_assignment".into());
    }
    Ok(out.into())
}

fn socket_addr(a: Option<&Address>) -> Result<SocketAddr> {
    match a.and_then(|a| a.address.as_ref()) {
        Some(address::Address::SocketAddress(s)) => {
            let ip: IpAddr = s
                .address
                .parse()
                .map_err(|_| format!("address {:?} is not an IP address", s.address))?;
            let port = match s.port_specifier {
                Some(socket_address::PortSpecifier::PortValue(p)) => {
                    u16::try_from(p).map_err(|_| format!("port {p} out of range"))?
                }
                _ => return Err(unsupported("socket_address.named_port")),
            };
            Ok(SocketAddr::new(ip, port))
        }
        Some(_) => Err("only socket addresses are supported".into()),
        None => Err("missing address".into()),
    }
}

// ---------------------------------------------------------------------------------------------
// Listeners.

/// What one Listener contributes: outbound entries and inbound chains.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ListenerParts {
    pub outbound: Option<(ListenAddr, Outbound)>,
    pub inbound: Vec<(u16, Inbound)>,
    /// Route tables the listener refers to (to subscribe to over RDS).
    pub rds: Vec<String>,
}

/// A Listener.
pub fn listener(name: &str, bytes: &[u8]) -> std::result::Result<ListenerParts, Refused> {
    listener_inner(bytes).map_err(refuse("listener", name))
}

fn listener_inner(bytes: &[u8]) -> Result<ListenerParts> {
    let l: Listener = decode(bytes, "Listener")?;
    let mut parts = ListenerParts::default();
    if let Some(api) = &l.api_listener {
        // Proxyless gRPC clients read these; the sidecar has nothing to do with them, but a
        // route table they name must still be well formed when it arrives.
        if let Some(any) = &api.api_listener {
            let h: HttpConnectionManager = decode(&any.value, "HttpConnectionManager")?;
            if let Some(RouteSpecifier::Rds(rds)) = &h.route_specifier {
                parts.rds.push(rds.route_config_name.clone());
            }
        }
        return Ok(parts);
    }
    if !l.listener_filters.is_empty() {
        return Err(unsupported("listener_filters"));
    }
    let port = u16::try_from(match l.address.as_ref().and_then(|a| a.address.as_ref()) {
        Some(address::Address::SocketAddress(s)) => match s.port_specifier {
            Some(socket_address::PortSpecifier::PortValue(p)) => p,
            _ => return Err(unsupported("address.named_port")),
        },
        _ => return Err("listener without a socket address".into()),
    })
    .map_err(|_| "port out of range".to_string())?;
    match l.name.as_str() {
        "virtualInbound" => {
            for chain in &l.filter_chains {
                let Some(port) = chain
                    .filter_chain_match
                    .as_ref()
                    .and_then(|m| m.destination_port.as_ref())
                    .and_then(|p| u16::try_from(p.value).ok())
                else {
                    return Err(format!(
                        "inbound filter chain {:?} has no destination_port",
                        chain.name
                    ));
                };
                let inbound = match chain_kind(chain)? {
                    ChainKind::Http { cluster, .. } => Inbound::Http {
                        cluster: cluster
                            .ok_or("an inbound HTTP chain needs an inline route")?
                            .into(),
                    },
                    ChainKind::Tcp(cluster) => Inbound::Tcp { cluster },
                };
                parts.inbound.push((port, inbound));
            }
        }
        "virtualOutbound" => {}
        name => {
            let [chain] = l.filter_chains.as_slice() else {
                return Err("outbound listeners must have exactly one filter chain".into());
            };
            let addr = match name.split_once('_') {
                Some(("0.0.0.0", _)) => ListenAddr::AnyOn(port),
                Some((ip, _)) => ListenAddr::Vip(
                    ip.parse()
                        .map_err(|_| format!("listener name {name:?} is not <ip>_<port>"))?,
                    port,
                ),
                None => return Err(format!("listener name {name:?} is not <ip>_<port>")),
            };
            let outbound = match chain_kind(chain)? {
                ChainKind::Http { rds, .. } => {
                    let rds = rds.ok_or("an outbound HTTP listener needs RDS")?;
                    parts.rds.push(rds.clone());
                    Outbound::Http { route_table: rds }
                }
                ChainKind::Tcp(cluster) => Outbound::Tcp { cluster },
            };
            parts.outbound = Some((addr, outbound));
        }
    }
    Ok(parts)
}

enum ChainKind {
    /// RDS name, or for an inline route table its single cluster.
    Http {
        rds: Option<String>,
        cluster: Option<String>,
    },
    Tcp(String),
}

fn chain_kind(chain: &FilterChain) -> Result<ChainKind> {
    if chain.transport_socket.is_some() {
        return Err(format!(
            "filter chain {:?}: {}",
            chain.name,
            unsupported("transport_socket")
        ));
    }
    let [Filter {
        name,
        config_type: Some(filter::ConfigType::TypedConfig(any)),
    }] = chain.filters.as_slice()
    else {
        return Err(format!(
            "filter chain {:?} must have exactly one typed network filter",
            chain.name
        ));
    };
    match any.type_url.as_str() {
        HCM => {
            let h: HttpConnectionManager = decode(&any.value, "HttpConnectionManager")?;
            for f in &h.http_filters {
                if f.name != FAULT && f.name != ROUTER {
                    return Err(format!("HTTP filter {:?} is not supported", f.name));
                }
            }
            match h.route_specifier {
                Some(RouteSpecifier::Rds(rds)) => Ok(ChainKind::Http {
                    rds: Some(rds.route_config_name),
                    cluster: None,
                }),
                Some(RouteSpecifier::RouteConfig(rc)) => {
                    let cluster = rc
                        .virtual_hosts
                        .iter()
                        .flat_map(|vh| &vh.routes)
                        .find_map(|r| match &r.action {
                            Some(route::Action::Route(ra)) => match &ra.cluster_specifier {
                                Some(route_action::ClusterSpecifier::Cluster(c)) => Some(c.clone()),
                                _ => None,
                            },
                            _ => None,
                        });
                    Ok(ChainKind::Http { rds: None, cluster })
                }
                _ => Err(format!("filter {name:?}: {}", unsupported("scoped_routes"))),
            }
        }
        TCP_PROXY => {
            let t: TcpProxy = decode(&any.value, "TcpProxy")?;
            match t.cluster_specifier {
                Some(tcp_proxy::ClusterSpecifier::Cluster(c)) => Ok(ChainKind::Tcp(c)),
                _ => Err(format!(
                    "filter {name:?}: {}",
                    unsupported("weighted_clusters")
                )),
            }
        }
        other => Err(format!(
            "network filter {name:?} ({other}) is not supported"
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Routes.

/// A RouteConfiguration.
pub fn route_table(name: &str, bytes: &[u8]) -> std::result::Result<RouteTable, Refused> {
    decode::<RouteConfiguration>(bytes, "RouteConfiguration")
        .and_then(route_table_inner)
        .map_err(refuse("route table", name))
}

fn route_table_inner(rc: RouteConfiguration) -> Result<RouteTable> {
    if !rc.request_headers_to_add.is_empty() || !rc.response_headers_to_add.is_empty() {
        return Err(unsupported("route configuration level header operations"));
    }
    let mut table = RouteTable {
        name: rc.name,
        virtual_hosts: Vec::new(),
        exact: Default::default(),
        suffixes: Vec::new(),
        prefixes: Vec::new(),
        any: None,
    };
    for vh in rc.virtual_hosts {
        let i = table.virtual_hosts.len();
        for d in &vh.domains {
            let d = d.to_ascii_lowercase();
            if d == "*" {
                table.any.get_or_insert(i);
            } else if let Some(suffix) = d.strip_prefix('*') {
                table.suffixes.push((suffix.to_owned(), i));
            } else if let Some(prefix) = d.strip_suffix('*') {
                table.prefixes.push((prefix.to_owned(), i));
            } else if table.exact.insert(d.clone(), i).is_some() {
                return Err(format!("domain {d:?} is in two virtual hosts"));
            }
        }
        let name = vh.name.clone();
        table
            .virtual_hosts
            .push(virtual_host(vh).map_err(|e| format!("virtual host {name:?}: {e}"))?);
    }
    table
        .suffixes
        .sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
    table
        .prefixes
        .sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
    Ok(table)
}

fn virtual_host(vh: EnvoyVirtualHost) -> Result<VirtualHost> {
    if vh.require_tls != 0 {
        return Err(unsupported("require_tls"));
    }
    if vh.retry_policy.is_some() {
        return Err(unsupported("virtual_host.retry_policy"));
    }
    let mut routes = Vec::new();
    let mut rules = Vec::new();
    for r in vh.routes {
        let name = r.name.clone();
        let (rule, route) = compile_route(r).map_err(|e| format!("route {name:?}: {e}"))?;
        rules.push(rule);
        routes.push(route);
    }
    let table = Table::compile(rules).map_err(|e| e.to_string())?;
    Ok(VirtualHost {
        name: vh.name,
        routes,
        table,
    })
}

fn compile_route(r: EnvoyRoute) -> Result<(Rule, Route)> {
    let m = r.r#match.ok_or("a route needs a match")?;
    if m.grpc.is_some() {
        return Err(unsupported("match.grpc"));
    }
    if m.tls_context.is_some() {
        return Err(unsupported("match.tls_context"));
    }
    if m.runtime_fraction.is_some() {
        return Err(unsupported("match.runtime_fraction"));
    }
    if !m.dynamic_metadata.is_empty() {
        return Err(unsupported("match.dynamic_metadata"));
    }
    let ignore_case = m.case_sensitive.as_ref().is_some_and(|b| !b.value);
    let mut conditions = Vec::new();
    let mut matched_prefix = None;
    let path = match m.path_specifier {
        Some(PathSpecifier::Prefix(p)) => {
            matched_prefix = Some(p.len());
            Pattern::Prefix(p)
        }
        Some(PathSpecifier::Path(p)) => Pattern::Exact(p),
        Some(PathSpecifier::SafeRegex(re)) => Pattern::Regex(re.regex),
        Some(other) => return Err(format!("path match {other:?} is not supported")),
        None => return Err("a route match needs a path specifier".into()),
    };
    // Envoy applies `case_sensitive` to literal paths only, never to `safe_regex`.
    let ignore_case = ignore_case && !matches!(path, Pattern::Regex(_));
    conditions.push(Condition {
        attr: Attr::Path,
        test: Test::Matches(StringMatch {
            pattern: path,
            ignore_case,
        }),
        invert: false,
    });
    for h in m.headers {
        conditions.extend(header_conditions(h)?);
    }
    for q in m.query_parameters {
        let test = match q.query_parameter_match_specifier {
            Some(QueryParameterMatchSpecifier::PresentMatch(true)) => Test::Present,
            Some(QueryParameterMatchSpecifier::PresentMatch(false)) => Test::Absent,
            Some(QueryParameterMatchSpecifier::StringMatch(sm)) => Test::Matches(string_match(sm)?),
            None => Test::Present,
        };
        conditions.push(Condition {
            attr: Attr::Query(q.name),
            test,
            invert: false,
        });
    }
    let headers = HeaderOps {
        request_add: header_adds(&r.request_headers_to_add)?,
        request_remove: header_names(&r.request_headers_to_remove)?,
        response_add: header_adds(&r.response_headers_to_add)?,
        response_remove: header_names(&r.response_headers_to_remove)?,
    };
    let action = match r.action.ok_or("a route needs an action")? {
        route::Action::Route(ra) => Action::Forward(forward(ra, matched_prefix)?),
        route::Action::Redirect(rd) => Action::Redirect(redirect(rd)?),
        route::Action::DirectResponse(d) => {
            use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
            let body = match d.body.and_then(|b| b.specifier) {
                Some(Specifier::InlineString(s)) => bytes::Bytes::from(s),
                Some(Specifier::InlineBytes(b)) => bytes::Bytes::from(b),
                Some(_) => return Err(unsupported("direct_response.body.filename")),
                None => bytes::Bytes::new(),
            };
            Action::Direct {
                status: u16::try_from(d.status)
                    .ok()
                    .filter(|s| (200..600).contains(s))
                    .ok_or_else(|| format!("direct response status {} is invalid", d.status))?,
                body,
            }
        }
        other => return Err(format!("route action {other:?} is not supported")),
    };
    let mut fault = None;
    for (filter, any) in r.typed_per_filter_config {
        if filter != FAULT {
            return Err(format!(
                "typed_per_filter_config[{filter:?}] is not supported"
            ));
        }
        fault = Some(http_fault(&decode::<HttpFault>(&any.value, "HttpFault")?)?);
    }
    Ok((
        Rule { conditions },
        Route {
            name: r.name,
            action,
            headers,
            fault,
        },
    ))
}

// The deprecated matchers are what older control planes still send; Envoy accepts them.
#[allow(deprecated)]
fn header_conditions(h: HeaderMatcher) -> Result<Vec<Condition>> {
    let attr = match h.name.as_str() {
        ":path" => Attr::Path,
        ":authority" | "host" => Attr::Authority,
        ":method" => Attr::Method,
        ":scheme" => Attr::Scheme,
        other => Attr::Header(other.to_ascii_lowercase()),
    };
    let test = match h.header_match_specifier {
        Some(HeaderMatchSpecifier::PresentMatch(true)) | None => Test::Present,
        Some(HeaderMatchSpecifier::PresentMatch(false)) => Test::Absent,
        Some(HeaderMatchSpecifier::StringMatch(sm)) => Test::Matches(string_match(sm)?),
        Some(HeaderMatchSpecifier::ExactMatch(s)) => Test::Matches(StringMatch {
            pattern: Pattern::Exact(s),
            ignore_case: false,
        }),
        Some(HeaderMatchSpecifier::PrefixMatch(s)) => Test::Matches(StringMatch {
            pattern: Pattern::Prefix(s),
            ignore_case: false,
        }),
        Some(HeaderMatchSpecifier::SuffixMatch(s)) => Test::Matches(StringMatch {
            pattern: Pattern::Suffix(s),
            ignore_case: false,
        }),
        Some(HeaderMatchSpecifier::ContainsMatch(s)) => Test::Matches(StringMatch {
            pattern: Pattern::Contains(s),
            ignore_case: false,
        }),
        Some(HeaderMatchSpecifier::SafeRegexMatch(re)) => Test::Matches(StringMatch {
            pattern: Pattern::Regex(re.regex),
            ignore_case: false,
        }),
        Some(other) => return Err(format!("header match {other:?} is not supported")),
    };
    let mut out = vec![Condition {
        attr: attr.clone(),
        test: test.clone(),
        invert: h.invert_match,
    }];
    // Envoy's `invert_match` never matches a missing header (Istio `withoutHeaders` too).
    if h.invert_match && !h.treat_missing_header_as_empty {
        out.push(Condition {
            attr,
            test: Test::Present,
            invert: false,
        });
    }
    Ok(out)
}

fn string_match(sm: StringMatcher) -> Result<StringMatch> {
    let pattern = match sm.match_pattern {
        Some(MatchPattern::Exact(s)) => Pattern::Exact(s),
        Some(MatchPattern::Prefix(s)) => Pattern::Prefix(s),
        Some(MatchPattern::Suffix(s)) => Pattern::Suffix(s),
        Some(MatchPattern::Contains(s)) => Pattern::Contains(s),
        Some(MatchPattern::SafeRegex(re)) => Pattern::Regex(re.regex),
        Some(MatchPattern::Custom(_)) => return Err(unsupported("string_match.custom")),
        None => return Err("a string match needs a pattern".into()),
    };
    // Envoy ignores `ignore_case` for `safe_regex`.
    let ignore_case = sm.ignore_case && !matches!(pattern, Pattern::Regex(_));
    Ok(StringMatch {
        pattern,
        ignore_case,
    })
}

#[allow(deprecated)] // `append`, see below
fn header_adds(ops: &[HeaderValueOption]) -> Result<Vec<HeaderAdd>> {
    ops.iter()
        .map(|o| {
            let h = o
                .header
                .as_ref()
                .ok_or("header operation without a header")?;
            let name = http::HeaderName::from_bytes(h.key.as_bytes())
                .map_err(|_| format!("invalid header name {:?}", h.key))?;
            let value = if h.raw_value.is_empty() {
                http::HeaderValue::from_str(&h.value)
            } else {
                http::HeaderValue::from_bytes(&h.raw_value)
            }
            .map_err(|_| format!("invalid value for header {:?}", h.key))?;
            let append = match o.append_action {
                // The deprecated `append: false` still means overwrite when the action is unset.
                0 if o.append.as_ref().is_some_and(|a| !a.value) => HeaderAppend::Overwrite,
                0 => HeaderAppend::Append,
                1 => HeaderAppend::AddIfAbsent,
                2 => HeaderAppend::Overwrite,
                3 => HeaderAppend::OverwriteIfExists,
                other => return Err(format!("header append_action {other} is unknown")),
            };
            Ok((name, value, append))
        })
        .collect()
}

fn header_names(names: &[String]) -> Result<Vec<http::HeaderName>> {
    names
        .iter()
        .map(|n| {
            http::HeaderName::from_bytes(n.as_bytes())
                .map_err(|_| format!("invalid header name {n:?}"))
        })
        .collect()
}

#[allow(deprecated)] // `cors` is refused whichever way it comes.
fn forward(
    ra: envoy_types::pb::envoy::config::route::v3::RouteAction,
    matched_prefix: Option<usize>,
) -> Result<Forward> {
    if ra.request_mirror_policies.iter().any(|_| true) {
        return Err(unsupported("request_mirror_policies"));
    }
    if ra.cors.is_some() {
        return Err(unsupported("cors"));
    }
    let clusters = match ra.cluster_specifier {
        Some(route_action::ClusterSpecifier::Cluster(c)) => vec![WeightedCluster {
            name: c.into(),
            weight: 1,
            headers: HeaderOps::default(),
        }],
        Some(route_action::ClusterSpecifier::WeightedClusters(w)) => w
            .clusters
            .into_iter()
            .map(|c| {
                Ok(WeightedCluster {
                    headers: HeaderOps {
                        request_add: header_adds(&c.request_headers_to_add)?,
                        request_remove: header_names(&c.request_headers_to_remove)?,
                        response_add: header_adds(&c.response_headers_to_add)?,
                        response_remove: header_names(&c.response_headers_to_remove)?,
                    },
                    weight: c.weight.map_or(0, |w| w.value),
                    name: c.name.into(),
                })
            })
            .collect::<Result<Vec<_>>>()?,
        Some(other) => return Err(format!("cluster specifier {other:?} is not supported")),
        None => return Err("a route action needs a cluster".into()),
    };
    let total_weight = clusters.iter().map(|c| c.weight).sum();
    if total_weight == 0 {
        return Err("weighted clusters with a total weight of 0".into());
    }
    let retry = ra.retry_policy.map(|rp| {
        let on: Vec<&str> = rp.retry_on.split(',').map(str::trim).collect();
        let backoff = rp.retry_back_off.as_ref();
        let base = backoff
            .and_then(|b| b.base_interval.as_ref())
            .map_or(Duration::from_millis(25), dur);
        RetryPolicy {
            attempts: rp.num_retries.map_or(1, |n| n.value),
            per_try_timeout: rp
                .per_try_timeout
                .as_ref()
                .map(dur)
                .filter(|d| !d.is_zero()),
            on_5xx: on.contains(&"5xx"),
            on_gateway_error: on.contains(&"gateway-error"),
            on_connect_failure: on.contains(&"connect-failure"),
            on_reset: on.contains(&"reset"),
            on_status: rp
                .retriable_status_codes
                .iter()
                .filter_map(|c| u16::try_from(*c).ok())
                .collect(),
            base_interval: base,
            max_interval: backoff
                .and_then(|b| b.max_interval.as_ref())
                .map_or(base * 10, dur),
        }
    });
    let regex_rewrite = match ra.regex_rewrite {
        Some(rr) => {
            let pattern = rr.pattern.ok_or("regex_rewrite without a pattern")?.regex;
            let re = regex::Regex::new(&pattern)
                .map_err(|e| format!("regex_rewrite pattern {pattern:?}: {e}"))?;
            // Envoy's substitution uses \1; the regex crate uses ${1}.
            let sub = rr
                .substitution
                .replace('$', "$$")
                .chars()
                .fold((String::new(), false), |(mut s, esc), c| {
                    if esc && c.is_ascii_digit() {
                        s.push_str(&format!("${{{c}}}"));
                        (s, false)
                    } else if c == '\\' && !esc {
                        (s, true)
                    } else {
                        if esc {
                            s.push('\\');
                        }
                        s.push(c);
                        (s, false)
                    }
                })
                .0;
            Some((re, sub))
        }
        None => None,
    };
    let mut hash = Vec::new();
    for hp in &ra.hash_policy {
        use route_action::hash_policy::PolicySpecifier;
        hash.push(match &hp.policy_specifier {
            Some(PolicySpecifier::Header(h)) => HashKey::Header(
                http::HeaderName::from_bytes(h.header_name.as_bytes())
                    .map_err(|_| format!("invalid hash header {:?}", h.header_name))?,
            ),
            Some(PolicySpecifier::Cookie(c)) => HashKey::Cookie(c.name.clone()),
            Some(PolicySpecifier::ConnectionProperties(p)) if p.source_ip => HashKey::SourceIp,
            Some(PolicySpecifier::QueryParameter(q)) => HashKey::Query(q.name.clone()),
            other => return Err(format!("hash policy {other:?} is not supported")),
        });
    }
    Ok(Forward {
        hash,
        clusters,
        total_weight,
        timeout: ra.timeout.as_ref().map(dur).filter(|d| !d.is_zero()),
        retry,
        prefix_rewrite: Some(ra.prefix_rewrite).filter(|p| !p.is_empty()),
        regex_rewrite,
        host_rewrite: match ra.host_rewrite_specifier {
            Some(route_action::HostRewriteSpecifier::HostRewriteLiteral(h)) => Some(h),
            Some(other) => return Err(format!("host rewrite {other:?} is not supported")),
            None => None,
        },
        matched_prefix,
    })
}

fn redirect(rd: envoy_types::pb::envoy::config::route::v3::RedirectAction) -> Result<Redirect> {
    let status = match redirect_action::RedirectResponseCode::try_from(rd.response_code)
        .map_err(|_| format!("unknown redirect code {}", rd.response_code))?
    {
        redirect_action::RedirectResponseCode::MovedPermanently => 301,
        redirect_action::RedirectResponseCode::Found => 302,
        redirect_action::RedirectResponseCode::SeeOther => 303,
        redirect_action::RedirectResponseCode::TemporaryRedirect => 307,
        redirect_action::RedirectResponseCode::PermanentRedirect => 308,
    };
    Ok(Redirect {
        scheme: match rd.scheme_rewrite_specifier {
            Some(redirect_action::SchemeRewriteSpecifier::SchemeRedirect(s)) => Some(s),
            Some(redirect_action::SchemeRewriteSpecifier::HttpsRedirect(true)) => {
                Some("https".into())
            }
            _ => None,
        },
        host: Some(rd.host_redirect).filter(|h| !h.is_empty()),
        port: match rd.port_redirect {
            0 => None,
            p => Some(u16::try_from(p).map_err(|_| format!("redirect port {p} out of range"))?),
        },
        path: match rd.path_rewrite_specifier {
            Some(redirect_action::PathRewriteSpecifier::PathRedirect(p)) => Some(p),
            Some(other) => return Err(format!("redirect {other:?} is not supported")),
            None => None,
        },
        status,
    })
}

fn http_fault(f: &HttpFault) -> Result<Fault> {
    use envoy_types::pb::envoy::extensions::filters::common::fault::v3::fault_delay;
    use envoy_types::pb::envoy::extensions::filters::http::fault::v3::fault_abort;
    let delay = match &f.delay {
        Some(d) => match &d.fault_delay_secifier {
            Some(fault_delay::FaultDelaySecifier::FixedDelay(t)) => {
                Some((dur(t), millionths(d.percentage.as_ref())?))
            }
            _ => return Err(unsupported("fault.delay.header_delay")),
        },
        None => None,
    };
    let abort = match &f.abort {
        Some(a) => match a.error_type {
            Some(fault_abort::ErrorType::HttpStatus(s)) => Some((
                u16::try_from(s)
                    .ok()
                    .filter(|s| (200..600).contains(s))
                    .ok_or_else(|| format!("fault abort status {s} is invalid"))?,
                millionths(a.percentage.as_ref())?,
            )),
            _ => return Err(unsupported("fault.abort.grpc_status / header_abort")),
        },
        None => None,
    };
    Ok(Fault { delay, abort })
}

/// A FractionalPercent as millionths (Envoy's default when absent: 100 %).
fn millionths(p: Option<&FractionalPercent>) -> Result<u32> {
    use envoy_types::pb::envoy::r#type::v3::fractional_percent::DenominatorType;
    let Some(p) = p else {
        return Ok(1_000_000);
    };
    let scale = match DenominatorType::try_from(p.denominator)
        .map_err(|_| format!("unknown denominator {}", p.denominator))?
    {
        DenominatorType::Hundred => 10_000,
        DenominatorType::TenThousand => 100,
        DenominatorType::Million => 1,
    };
    Ok(p.numerator.saturating_mul(scale).min(1_000_000))
}
