//! Listeners: filter chains and what they are (HTTP by RDS, inline HTTP, TCP), network
//! filters, the HTTP connection manager and its HTTP filters, and outbound TCP routes.

use std::fmt::Debug;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Address;
use envoy_types::pb::envoy::config::listener::v3::{
    filter, listener_filter, FilterChain, FilterChainMatch, Listener,
};
use envoy_types::pb::envoy::config::route::v3::{
    route, route_action, route_match::PathSpecifier, Route as EnvoyRoute, RouteAction,
    RouteConfiguration, RouteMatch,
};
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::{PathWithEscapedSlashesAction, RouteSpecifier},
    http_filter, HttpConnectionManager, HttpFilter,
};
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{tcp_proxy, TcpProxy};
use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};

use super::endpoint::socket_addr;
use super::rbac::rbac;
use super::route::{host_table, route_table_inner};
use super::tls::downstream_tls;
use super::{
    ads_source, decode, dur, only, path, refuse, typed, unsupported, variant, Refused, Result,
    FAULT,
};
use crate::authz::Authz;
use crate::model::{
    EscapedSlashes, Inbound, ListenAddr, Outbound, PathNormalization, TcpRoutes, Weighted,
};

const HCM: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const TCP_PROXY: &str =
    "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
const HTTP_RBAC: &str = "envoy.filters.http.rbac";
const ROUTER: &str = "envoy.filters.http.router";

/// What one Listener contributes: outbound entries and inbound chains.
#[derive(Debug, Default, Clone)]
pub struct ListenerParts {
    pub outbound: Option<(ListenAddr, Outbound)>,
    /// The outbound listener's further addresses (a dual-stack service's other VIPs).
    pub additional: Vec<ListenAddr>,
    /// Inbound chains: destination port (`None`: every port no other chain names), whether
    /// the chain is mutual TLS, what it does.
    pub inbound: Vec<(Option<u16>, bool, Inbound)>,
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
        only(&l, "", &["name", "api_listener"])?;
        only(api, "api_listener", &["api_listener"])?;
        if let Some(any) = &api.api_listener {
            if let ChainKind::Rds(rds, _) = network_filter("api_listener", any)? {
                parts.rds.push(rds);
            }
        }
        return Ok(parts);
    }
    only(
        &l,
        "",
        &[
            "name",
            "address",
            "additional_addresses",
            "filter_chains",
            "default_filter_chain",
            "listener_filters",
            // Informational: the proxy binds no address a listener names and captures no
            // traffic (the app reaches it explicitly, see `outbound`); a listener only says
            // what traffic for its address does. Whether Envoy would bind it, hand captured
            // connections on by original destination, or label it inbound or outbound for
            // stats changes nothing here.
            "bind_to_port",
            "use_original_dst",
            "traffic_direction",
        ],
    )?;
    let primary = listen_addr(l.address.as_ref(), "address")?;
    for extra in &l.additional_addresses {
        only(extra, "additional_addresses", &["address"])?;
        let addr = listen_addr(extra.address.as_ref(), "additional_addresses")?;
        let (ListenAddr::AnyOn(p) | ListenAddr::Vip(_, p)) = &addr;
        let (ListenAddr::AnyOn(port) | ListenAddr::Vip(_, port)) = &primary;
        if p != port {
            return Err(format!(
                "additional address on port {p}, not the listener's {port}"
            ));
        }
        if addr != primary && !parts.additional.contains(&addr) {
            parts.additional.push(addr);
        }
    }
    for (i, f) in l.listener_filters.iter().enumerate() {
        let at = format!("listener_filters[{i}]");
        // The name is a label; the typed config says what the filter is.
        only(f, &at, &["name", "config_type"])?;
        match &f.config_type {
            // Hypha tells TLS from plaintext by the first byte on every inbound connection,
            // which is what the TLS inspector is for.
            Some(listener_filter::ConfigType::TypedConfig(any))
                if any.type_url == TlsInspector::type_url() =>
            {
                let t: TlsInspector = decode(&any.value, "TlsInspector")?;
                // Informational: JA3/JA4 fingerprints for logs, and the peek buffer size.
                only(
                    &t,
                    &at,
                    &[
                        "enable_ja3_fingerprinting",
                        "enable_ja4_fingerprinting",
                        "initial_read_buffer_size",
                    ],
                )?;
            }
            _ => {
                return Err(format!(
                    "{at}: only the TLS inspector listener filter is supported"
                ))
            }
        }
    }
    match l.name.as_str() {
        "virtualInbound" => {
            for chain in &l.filter_chains {
                let m = chain.filter_chain_match.clone().unwrap_or_default();
                let tls = inbound_chain_tls(chain, &m)?;
                // No port: Istio's passthrough chain, for every port no other chain names.
                let port = m
                    .destination_port
                    .map(|p| {
                        u16::try_from(p.value).map_err(|_| format!("port {} out of range", p.value))
                    })
                    .transpose()?;
                push_inbound(&mut parts, port, tls, inbound_chain(chain)?)?;
            }
            // Envoy's chain for connections no other chain takes: a plaintext catch-all.
            if let Some(chain) = &l.default_filter_chain {
                if let Some(m) = &chain.filter_chain_match {
                    only(m, "default_filter_chain.filter_chain_match", &[])?;
                }
                plain_chain(chain)?;
                push_inbound(&mut parts, None, false, inbound_chain(chain)?)?;
            }
        }
        "virtualOutbound" => {
            // Captured outbound traffic only: Hypha captures none, so nothing reaches this
            // listener. Its chains are still checked, so a bad one does not go unnoticed.
            for chain in l.filter_chains.iter().chain(&l.default_filter_chain) {
                if let Some(m) = &chain.filter_chain_match {
                    only(m, "filter_chain_match", &["destination_port"])?;
                }
                plain_chain(chain)?;
                no_authz(chain_kind(chain)?)?;
            }
        }
        _ => {
            if l.default_filter_chain.is_some() {
                return Err(unsupported("default_filter_chain") + " on an outbound listener");
            }
            let outbound = match l.filter_chains.as_slice() {
                [] => return Err("an outbound listener needs a filter chain".into()),
                [chain] if server_names(chain, "filter_chains[0]")?.is_empty() => {
                    plain_chain(chain)?;
                    match no_authz(chain_kind(chain)?)? {
                        ChainKind::Rds(rds, paths) => {
                            parts.rds.push(rds.clone());
                            Outbound::Http {
                                route_table: rds,
                                paths,
                            }
                        }
                        ChainKind::Inline(..) => {
                            return Err("an outbound HTTP listener needs RDS".into());
                        }
                        ChainKind::Tcp(clusters, _, service) => {
                            let mut routes = TcpRoutes::to(clusters);
                            routes.service = Some(service);
                            Outbound::Tcp(Arc::new(routes))
                        }
                    }
                }
                chains => Outbound::Tcp(Arc::new(tcp_routes(chains)?)),
            };
            parts.outbound = Some((primary, outbound));
        }
    }
    Ok(parts)
}

/// What an inbound chain does: HTTP with its inline route, or TCP bytes.
fn inbound_chain(chain: &FilterChain) -> Result<Inbound> {
    Ok(match chain_kind(chain)? {
        ChainKind::Inline(cluster, authz, paths) => Inbound::Http {
            cluster: cluster.into(),
            authz: Arc::new(authz),
            paths,
        },
        ChainKind::Rds(..) => return Err("an inbound HTTP chain needs an inline route".into()),
        ChainKind::Tcp(clusters, authz, _) => Inbound::Tcp {
            cluster: clusters
                .only()
                .ok_or("an inbound TCP chain proxies to one cluster, not several by weight")?
                .to_owned(),
            authz: Arc::new(authz),
        },
    })
}

/// Adds an inbound chain; two for the same port and transport cannot be told apart.
fn push_inbound(
    parts: &mut ListenerParts,
    port: Option<u16>,
    tls: bool,
    inbound: Inbound,
) -> Result<()> {
    if parts
        .inbound
        .iter()
        .any(|(p, t, _)| *p == port && *t == tls)
    {
        let on = port.map_or("every other port".to_owned(), |p| format!("port {p}"));
        let transport = if tls { "TLS" } else { "plaintext" };
        return Err(format!("two inbound filter chains for {on} ({transport})"));
    }
    if port.is_none() && matches!(inbound, Inbound::Http { .. }) {
        return Err(
            "an inbound chain without destination_port must be TCP (it takes \
                    connections to ports no service declares)"
                .into(),
        );
    }
    parts.inbound.push((port, tls, inbound));
    Ok(())
}

/// A chain's `filter_chain_match.server_names` (lower-case), the only thing an outbound chain
/// may match on: exact names and `*.` wildcards, as Envoy's.
fn server_names(chain: &FilterChain, at: &str) -> Result<Vec<String>> {
    let Some(m) = &chain.filter_chain_match else {
        return Ok(Vec::new());
    };
    only(m, &format!("{at}.filter_chain_match"), &["server_names"])?;
    m.server_names
        .iter()
        .map(|n| {
            let inner = n.strip_prefix("*.").unwrap_or(n);
            if inner.is_empty() || inner.contains('*') {
                return Err(format!(
                    "{at}.filter_chain_match.server_names: {n:?} is neither a name nor `*.` and \
                     one"
                ));
            }
            Ok(n.to_ascii_lowercase())
        })
        .collect()
}

/// The TCP chains of an outbound listener told apart by server name; at most one has none.
fn tcp_routes(chains: &[FilterChain]) -> Result<TcpRoutes> {
    let mut names = Vec::new();
    let mut clusters = Vec::new();
    let mut default = None;
    let mut service = None;
    for (i, chain) in chains.iter().enumerate() {
        let at = format!("filter_chains[{i}]");
        let chain_names = server_names(chain, &at)?;
        plain_chain(chain)?;
        let ChainKind::Tcp(cluster, _, prefix) = no_authz(chain_kind(chain)?)? else {
            return Err(format!(
                "{at}: an outbound listener with several filter chains tells them apart by \
                 server name, so they must be TCP proxies"
            ));
        };
        if chain_names.is_empty() {
            service = Some(prefix);
            if default.replace(cluster).is_some() {
                return Err("two outbound filter chains without server names".into());
            }
        } else {
            names.extend(chain_names.into_iter().map(|n| (n, clusters.len())));
            clusters.push(cluster);
        }
    }
    let (table, holders) = host_table(names, "filter chains (server names)")?;
    let named = holders
        .into_iter()
        .map(|(name, i)| (name, clusters[i].clone()))
        .collect();
    Ok(TcpRoutes {
        names: Some(table),
        named,
        default,
        service,
    })
}

/// Outbound chains and the inbound default chain carry no TLS of their own: the app speaks
/// plaintext to its sidecar, and the sidecar's TLS to upstreams is the cluster's.
fn plain_chain(chain: &FilterChain) -> Result<()> {
    match &chain.transport_socket {
        Some(_) => Err(format!(
            "filter chain {:?}: {} outside virtualInbound's chains",
            chain.name,
            unsupported("transport_socket")
        )),
        None => Ok(()),
    }
}

/// Whether an inbound chain is for mutual-TLS connections: `transport_protocol: tls` with a
/// DownstreamTlsContext; plaintext with neither (or `raw_buffer`). Its match may name the
/// destination port and the transport protocol, nothing else.
fn inbound_chain_tls(chain: &FilterChain, m: &FilterChainMatch) -> Result<bool> {
    only(
        m,
        "filter_chain_match",
        &["destination_port", "transport_protocol"],
    )?;
    let tls_socket = match &chain.transport_socket {
        Some(ts) => downstream_tls(
            ts,
            &format!("filter chain {:?}: transport_socket", chain.name),
        )?,
        None => false,
    };
    match (m.transport_protocol.as_str(), tls_socket) {
        ("tls", true) => Ok(true),
        ("" | "raw_buffer", false) => Ok(false),
        (proto, _) => Err(format!(
            "filter chain {:?}: transport_protocol {proto:?} with{} a TLS transport socket",
            chain.name,
            if tls_socket { "" } else { "out" }
        )),
    }
}

/// A listener address: any address on a port (`0.0.0.0`, `::`), or one VIP and port.
fn listen_addr(a: Option<&Address>, at: &str) -> Result<ListenAddr> {
    let addr = socket_addr(a, at)?;
    Ok(if addr.ip().is_unspecified() {
        ListenAddr::AnyOn(addr.port())
    } else {
        ListenAddr::Vip(addr.ip(), addr.port())
    })
}

enum ChainKind {
    /// HTTP, routed by the RDS route table of this name.
    Rds(String, PathNormalization),
    /// HTTP, with an inline route table sending everything to this cluster, behind these
    /// RBAC filters.
    Inline(String, Authz, PathNormalization),
    /// TCP to these clusters (one, or several by weight), behind these RBAC filters; the TCP
    /// proxy's stat prefix (the service's own cluster, as Istio names it).
    Tcp(Weighted, Authz, String),
}

/// Authorization runs on inbound chains only: the app's own requests are not checked.
fn no_authz(kind: ChainKind) -> Result<ChainKind> {
    match &kind {
        ChainKind::Inline(_, a, _) | ChainKind::Tcp(_, a, _) if !a.is_empty() => {
            Err("RBAC filters are only supported on virtualInbound's chains".into())
        }
        _ => Ok(kind),
    }
}

/// A filter chain's network filters: RBAC filters, then one terminal filter (HTTP connection
/// manager or TCP proxy). Its `filter_chain_match` is for the caller to check.
fn chain_kind(chain: &FilterChain) -> Result<ChainKind> {
    let prefix = |e: String| format!("filter chain {:?}: {e}", chain.name);
    // The chain's name is a label (`config_dump`, stats).
    // `transport_socket` is the caller's to check (inbound chains only; see below).
    only(
        chain,
        "",
        &["name", "filters", "filter_chain_match", "transport_socket"],
    )
    .map_err(prefix)?;
    let Some((last, before)) = chain.filters.split_last() else {
        return Err(format!(
            "filter chain {:?} must end with one typed network filter",
            chain.name
        ));
    };
    let mut network_rbac = Vec::new();
    for (i, f) in before.iter().enumerate() {
        let at = format!("filters[{i}]");
        only(f, &at, &["name", "config_type"]).map_err(prefix)?;
        let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
            return Err(prefix(format!("{at}: a typed config is required")));
        };
        let r: NetworkRbac = typed(any, &at).map_err(prefix)?;
        // `stat_prefix` names stats.
        only(&r, &at, &["rules", "stat_prefix"]).map_err(prefix)?;
        network_rbac.push(rbac(r.rules.as_ref(), &path(&at, "rules")).map_err(prefix)?);
    }
    // The filter's name is a label: its typed config's type says what it is.
    only(last, "filters", &["name", "config_type"]).map_err(prefix)?;
    let Some(filter::ConfigType::TypedConfig(any)) = &last.config_type else {
        return Err(format!(
            "filter chain {:?} must end with one typed network filter",
            chain.name
        ));
    };
    match network_filter(&last.name, any)? {
        ChainKind::Tcp(cluster, _, prefix) => Ok(ChainKind::Tcp(
            cluster,
            Authz {
                filters: network_rbac,
            },
            prefix,
        )),
        _ if !network_rbac.is_empty() => Err(prefix(
            "network RBAC before an HTTP connection manager is not supported (HTTP chains \
             take envoy.filters.http.rbac)"
                .into(),
        )),
        other => Ok(other),
    }
}

fn network_filter(name: &str, any: &Any) -> Result<ChainKind> {
    let prefix = |e: String| format!("filter {name:?}: {e}");
    match any.type_url.as_str() {
        HCM => {
            http_connection_manager(decode(&any.value, "HttpConnectionManager")?).map_err(prefix)
        }
        TCP_PROXY => {
            let t: TcpProxy = decode(&any.value, "TcpProxy")?;
            // `stat_prefix` names stats.
            only(&t, "", &["stat_prefix", "cluster_specifier"]).map_err(prefix)?;
            match t.cluster_specifier {
                Some(tcp_proxy::ClusterSpecifier::Cluster(c)) => Ok(ChainKind::Tcp(
                    Weighted::one(c),
                    Authz::default(),
                    t.stat_prefix,
                )),
                Some(tcp_proxy::ClusterSpecifier::WeightedClusters(w)) => {
                    let mut clusters = Vec::new();
                    for (i, c) in w.clusters.into_iter().enumerate() {
                        only(
                            &c,
                            &format!("weighted_clusters.clusters[{i}]"),
                            &["name", "weight"],
                        )
                        .map_err(prefix)?;
                        clusters.push((c.name, c.weight));
                    }
                    let w = Weighted::new(clusters).ok_or_else(|| {
                        prefix("weighted_clusters needs a cluster with a weight above 0".into())
                    })?;
                    Ok(ChainKind::Tcp(w, Authz::default(), t.stat_prefix))
                }
                None => Err(prefix("a TCP proxy needs a cluster".into())),
            }
        }
        other => Err(format!(
            "network filter {name:?} ({other}) is not supported"
        )),
    }
}

fn http_connection_manager(h: HttpConnectionManager) -> Result<ChainKind> {
    // `stat_prefix` names stats. `codec_type` AUTO, the default, is what the proxy does (HTTP/1.1
    // or HTTP/2, whichever the client speaks); another codec is refused as a set field. So are
    // timeouts, `use_remote_address` and the rest, none of which the control plane sends.
    only(
        &h,
        "",
        &[
            "stat_prefix",
            "http_filters",
            "route_specifier",
            "normalize_path",
            "merge_slashes",
            "path_with_escaped_slashes_action",
        ],
    )?;
    let paths = PathNormalization {
        normalize: h.normalize_path.is_some_and(|b| b.value),
        merge_slashes: h.merge_slashes,
        escaped_slashes: match PathWithEscapedSlashesAction::try_from(
            h.path_with_escaped_slashes_action,
        ) {
            Ok(
                PathWithEscapedSlashesAction::ImplementationSpecificDefault
                | PathWithEscapedSlashesAction::KeepUnchanged,
            ) => EscapedSlashes::Keep,
            Ok(PathWithEscapedSlashesAction::RejectRequest) => EscapedSlashes::Reject,
            Ok(PathWithEscapedSlashesAction::UnescapeAndForward) => EscapedSlashes::Unescape,
            other => {
                return Err(format!(
                    "path_with_escaped_slashes_action {other:?} is not supported (KEEP_UNCHANGED, \
                     REJECT_REQUEST and UNESCAPE_AND_FORWARD are)"
                ))
            }
        },
    };
    // RBAC filters, the fault filter, then the router, which must come last: the order the
    // proxy runs them.
    match h.http_filters.as_slice() {
        [.., last] if last.name == ROUTER => {}
        _ => return Err("the last HTTP filter must be the router".into()),
    }
    let mut rbac_filters = Vec::new();
    let mut past_rbac = false;
    for (i, f) in h.http_filters.iter().enumerate() {
        match f.name.as_str() {
            HTTP_RBAC if !past_rbac => {
                let at = format!("http_filters[{i}]");
                only(f, &at, &["name", "config_type"])?;
                let Some(http_filter::ConfigType::TypedConfig(any)) = &f.config_type else {
                    return Err(format!("{at}: a typed config is required"));
                };
                let r: HttpRbac = typed(any, &at)?;
                // `rules_stat_prefix` names stats.
                only(&r, &at, &["rules", "rules_stat_prefix"])?;
                rbac_filters.push(rbac(r.rules.as_ref(), &path(&at, "rules"))?);
            }
            ROUTER if i + 1 == h.http_filters.len() => http_filter::<Router>(f)?,
            FAULT if !past_rbac || i == rbac_filters.len() => {
                past_rbac = true;
                http_filter::<HttpFault>(f)?;
            }
            other => return Err(format!("HTTP filter {other:?} is not supported here")),
        }
    }
    let authz = Authz {
        filters: rbac_filters,
    };
    match h.route_specifier {
        Some(RouteSpecifier::Rds(rds)) => {
            only(&rds, "rds", &["config_source", "route_config_name"])?;
            if let Some(cs) = &rds.config_source {
                ads_source(cs, "rds.config_source")?;
            }
            if !authz.is_empty() {
                return Err("RBAC filters are only supported on virtualInbound's chains".into());
            }
            Ok(ChainKind::Rds(rds.route_config_name, paths))
        }
        Some(RouteSpecifier::RouteConfig(rc)) => {
            Ok(ChainKind::Inline(inline_catch_all(rc)?, authz, paths))
        }
        Some(other) => Err(unsupported(&variant(&other))),
        None => Err("an HTTP connection manager needs routes".into()),
    }
}

/// An HTTP filter whose config, if any, must be of type `M` and empty: faults come from the
/// routes (`typed_per_filter_config`), and the router has no settings Hypha acts on.
fn http_filter<M: Message + Default + Name + Debug + 'static>(f: &HttpFilter) -> Result<()> {
    let at = format!("http_filters[{:?}]", f.name);
    only(f, &at, &["name", "config_type"])?;
    match &f.config_type {
        Some(http_filter::ConfigType::TypedConfig(any)) => only(&typed::<M>(any, &at)?, &at, &[]),
        Some(other) => Err(unsupported(&path(&at, &variant(other)))),
        None => Ok(()),
    }
}

/// An inbound chain's inline route table must be what the control plane sends: one `*` virtual
/// host with one route sending everything (`/`) to one cluster, with no timeout. The proxy
/// sends inbound requests straight to the app, so anything more would be ignored.
fn inline_catch_all(rc: RouteConfiguration) -> Result<String> {
    route_table_inner(rc.clone())?; // every field, checked as for RDS
    let shape = || "an inline route table other than one route to one cluster is not supported";
    let [vh] = rc.virtual_hosts.as_slice() else {
        return Err(shape().into());
    };
    let [r] = vh.routes.as_slice() else {
        return Err(shape().into());
    };
    let Some(route::Action::Route(ra)) = &r.action else {
        return Err(shape().into());
    };
    let Some(route_action::ClusterSpecifier::Cluster(cluster)) = &ra.cluster_specifier else {
        return Err(shape().into());
    };
    let everything = Some(RouteMatch {
        path_specifier: Some(PathSpecifier::Prefix("/".into())),
        ..Default::default()
    });
    let bare_route = EnvoyRoute {
        name: String::new(),
        action: None,
        ..r.clone()
    } == EnvoyRoute {
        r#match: everything,
        ..Default::default()
    };
    let bare_action = RouteAction {
        cluster_specifier: None,
        timeout: None,
        ..ra.clone()
    } == RouteAction::default();
    let no_timeout = ra.timeout.as_ref().is_none_or(|t| dur(t).is_zero());
    if vh.domains != ["*"] || !bare_route || !bare_action || !no_timeout {
        return Err(shape().into());
    }
    Ok(cluster.clone())
}
