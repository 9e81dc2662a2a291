//! xDS resources → the runtime [`model`](crate::model). Each resource is decoded and checked on
//! its own, so a bad one is refused (NACKed) with a reason that names the resource and the
//! Envoy field Hypha does not support, and never half-applied.
//!
//! Nothing is ignored silently: every message read here goes through [`only`], which refuses
//! each field that is set (differs from its default) but that the code neither acts on nor
//! lists as informational, by its Envoy name. Informational fields (names, stats prefixes,
//! metadata no Hypha feature reads) are listed per message with the reason they change nothing.
//! A field added to the Envoy API later is refused the same way until someone decides what it
//! means here. (The well-known wrappers, `Duration`, `UInt32Value`, `BoolValue`, are read whole.)

use std::any::TypeId;
use std::collections::HashMap;
use std::fmt::Debug;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::{
    circuit_breakers, cluster, Cluster as EnvoyCluster, OutlierDetection,
};
use envoy_types::pb::envoy::config::core::v3::{
    address, config_source, socket_address, Address, ApiVersion, ConfigSource, DataSource,
    HeaderValueOption, HealthStatus, Http2ProtocolOptions,
    HttpProtocolOptions as CommonHttpOptions,
};
use envoy_types::pb::envoy::config::core::v3::{transport_socket, TransportSocket};
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint, ClusterLoadAssignment, Endpoint as EnvoyEndpoint,
};
use envoy_types::pb::envoy::config::listener::v3::{
    filter, listener_filter, FilterChain, FilterChainMatch, Listener,
};
use envoy_types::pb::envoy::config::rbac::v3::{
    permission, principal, rbac as envoy_rbac, Permission, Principal, Rbac as EnvoyRbac,
};
use envoy_types::pb::envoy::config::route::v3::{
    header_matcher::HeaderMatchSpecifier, query_parameter_matcher::QueryParameterMatchSpecifier,
    redirect_action, retry_policy, route, route_action, route_match::PathSpecifier, HeaderMatcher,
    RedirectAction, Route as EnvoyRoute, RouteAction, RouteConfiguration, RouteMatch,
    VirtualHost as EnvoyVirtualHost,
};
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::RouteSpecifier, http_filter, HttpConnectionManager, HttpFilter,
};
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{tcp_proxy, TcpProxy};
use envoy_types::pb::envoy::extensions::retry::host::previous_hosts::v3::PreviousHostsPredicate;
use envoy_types::pb::envoy::extensions::transport_sockets::raw_buffer::v3::RawBuffer;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    common_tls_context::ValidationContextType, secret, subject_alt_name_matcher::SanType,
    CommonTlsContext, DownstreamTlsContext, SdsSecretConfig, Secret, UpstreamTlsContext,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    http_protocol_options::{explicit_http_config::ProtocolConfig, UpstreamProtocolOptions},
    HttpProtocolOptions,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    string_matcher::MatchPattern, RegexMatcher, StringMatcher,
};
use envoy_types::pb::envoy::r#type::v3::FractionalPercent;
use envoy_types::pb::google::protobuf::Any;
use hypha_matcher::{Attr, Condition, Pattern, Rule, StringMatch, Table, Test};
use prost::{Message, Name};

use crate::authz::{self, Authz};
use crate::model::{
    Action, Cluster, ClusterKind, Endpoint, Fault, Forward, HashKey, HeaderAdd, HeaderAppend,
    HeaderOps, Inbound, Lb, Limits, ListenAddr, Outbound, OutlierPolicy, Redirect, RetryPolicy,
    Route, RouteTable, TcpRoutes, UpstreamTls, VirtualHost, WeightedCluster,
};

const HCM: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const TCP_PROXY: &str =
    "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
const HTTP_RBAC: &str = "envoy.filters.http.rbac";
const FAULT: &str = "envoy.filters.http.fault";
const ROUTER: &str = "envoy.filters.http.router";
const UPSTREAM_HTTP_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
const PREVIOUS_HOSTS: &str = "envoy.retry_host_predicates.previous_hosts";
/// The ORIGINAL_DST cluster Istio and Hypha's control plane pass unmatched traffic to.
const PASSTHROUGH: &str = "PassthroughCluster";

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

/// The message in a typed config, which must be of type `M`.
fn typed<M: Message + Default + Name>(any: &Any, at: &str) -> Result<M> {
    if any.type_url != M::type_url() {
        return Err(format!(
            "{at}: a {} is expected, not {:?}",
            M::full_name(),
            any.type_url
        ));
    }
    decode(&any.value, &M::full_name())
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

/// A field Hypha reads, set to a value it does not support.
fn unsupported_value(field: &str, value: impl std::fmt::Display) -> String {
    format!("field `{field}` = {value} is not supported by Hypha")
}

/// `field` inside the message at `at` (`""` at the top of a resource).
fn path(at: &str, field: &str) -> String {
    if at.is_empty() {
        field.to_owned()
    } else {
        format!("{at}.{field}")
    }
}

fn dur(d: &envoy_types::pb::google::protobuf::Duration) -> Duration {
    Duration::new(
        u64::try_from(d.seconds).unwrap_or(0),
        u32::try_from(d.nanos).unwrap_or(0),
    )
}

// ---------------------------------------------------------------------------------------------
// Fields nobody acts on.

/// Refuses every field of `msg` that is set but not in `known`: the fields the caller acts on
/// and the informational ones it accepts, by Rust field name (a oneof by the oneof's name).
/// `at` is where the message sits in the resource, for the reason.
fn only<M: Debug + Default + 'static>(msg: &M, at: &str, known: &[&str]) -> Result<()> {
    let rest: Vec<String> = set_fields(msg, known)
        .iter()
        .map(|f| format!("`{}`", path(at, f)))
        .collect();
    match rest.as_slice() {
        [] => Ok(()),
        [one] => Err(format!("field {one} is not supported by Hypha")),
        many => Err(format!(
            "fields {} are not supported by Hypha",
            many.join(", ")
        )),
    }
}

/// The fields of `msg` that differ from `M::default()`, minus `known`. prost messages have no
/// reflection, but the `Debug` prost derives lists every field by name, in declaration order,
/// so the renderings of the message and of its default are compared field by field. A set
/// oneof is named by its variant, as the Envoy API names it (`ring_hash_lb_config`, not
/// `lb_config`).
fn set_fields<M: Debug + Default + 'static>(msg: &M, known: &[&str]) -> Vec<String> {
    let set = format!("{msg:?}");
    let default = default_fields::<M>();
    debug_assert!(
        known.iter().all(|k| default.iter().any(|(n, _)| n == k)),
        "a known field is not a field of {}: {known:?}",
        std::any::type_name::<M>()
    );
    changed(&set, &default)
        .into_iter()
        .filter(|(name, _)| !known.contains(name))
        .map(|(name, value)| oneof_variant(value).unwrap_or_else(|| name.to_owned()))
        .collect()
}

/// The fields of `M::default()`'s `Debug` rendering, split once per message type (a route
/// table checks the same few types thousands of times).
fn default_fields<M: Debug + Default + 'static>() -> Arc<[(String, String)]> {
    type Fields = Arc<[(String, String)]>;
    static DEFAULTS: OnceLock<Mutex<HashMap<TypeId, Fields>>> = OnceLock::new();
    let mut defaults = DEFAULTS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    defaults
        .entry(TypeId::of::<M>())
        .or_insert_with(|| {
            debug_fields(&format!("{:?}", M::default()))
                .into_iter()
                .map(|(n, v)| (n.to_owned(), v.to_owned()))
                .collect()
        })
        .clone()
}

/// The `(name, value)` of each field in `set` (a `Debug` rendering) that differs from the
/// default's, walking both field by field: a field at its default is passed over with one
/// comparison, and only a set one is scanned for its end.
fn changed<'a>(set: &'a str, default: &[(String, String)]) -> Vec<(&'a str, &'a str)> {
    let mut rest = debug_body(set);
    let mut out = Vec::new();
    for (name, value) in default {
        let raw = rest.strip_prefix("r#").unwrap_or(rest);
        let Some(after) = raw
            .strip_prefix(name.as_str())
            .and_then(|r| r.strip_prefix(": "))
        else {
            return changed_slowly(set, default);
        };
        let at_default = after.starts_with(value.as_str())
            && (after.len() == value.len() || after[value.len()..].starts_with(", "));
        let len = if at_default {
            value.len()
        } else {
            let len = value_len(after);
            out.push((&raw[..name.len()], &after[..len]));
            len
        };
        rest = after[len..].strip_prefix(", ").unwrap_or("");
    }
    if !rest.is_empty() {
        return changed_slowly(set, default);
    }
    out
}

/// [`changed`] for a rendering that is not what was expected (prost's never is): every field
/// compared with the default's in the same place, a misplaced or extra one counted as set, so
/// nothing slips through.
fn changed_slowly<'a>(set: &'a str, default: &[(String, String)]) -> Vec<(&'a str, &'a str)> {
    debug_fields(set)
        .into_iter()
        .zip(default.iter().map(Some).chain(std::iter::repeat(None)))
        .filter(|((n, v), d)| d.is_none_or(|(dn, dv)| n != dn || v != dv))
        .map(|(field, _)| field)
        .collect()
}

/// The top-level `(name, value)` pairs of a struct's `Debug` rendering
/// (`Name { a: 1, r#b: Some(B { c: "x, y" }) }`), raw identifiers without their `r#`.
fn debug_fields(debug: &str) -> Vec<(&str, &str)> {
    let mut rest = debug_body(debug);
    let mut out = Vec::new();
    while let Some((name, after)) = rest.split_once(": ") {
        let len = value_len(after);
        out.push((name.trim_start_matches("r#"), &after[..len]));
        rest = after[len..].strip_prefix(", ").unwrap_or("");
    }
    out
}

/// The fields of `Name { .. }`, without the braces; empty for `Name` (no fields).
fn debug_body(debug: &str) -> &str {
    debug
        .split_once(" { ")
        .and_then(|(_, body)| body.strip_suffix(" }"))
        .unwrap_or("")
}

/// The length of the value `s` starts with: up to the first comma outside brackets and
/// string literals (whose quotes and backslashes `Debug` escapes), or all of `s`.
fn value_len(s: &str) -> usize {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    // Bytes, not chars: every byte of a multi-byte UTF-8 character is above ASCII.
    for (i, c) in s.bytes().enumerate() {
        if in_string {
            match c {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            b'"' => in_string = true,
            b'{' | b'[' | b'(' => depth += 1,
            b'}' | b']' | b')' => depth = depth.saturating_sub(1),
            b',' if depth == 0 => return i,
            _ => {}
        }
    }
    s.len()
}

/// A set oneof's variant as Envoy names it: `Some(RingHashLbConfig(..))` →
/// `ring_hash_lb_config`. (A message field reads `Some(Name { .. })`, an enum `Some(Name)`.)
fn oneof_variant(value: &str) -> Option<String> {
    let inner = value.strip_prefix("Some(")?;
    let end = inner.find(|c: char| !c.is_ascii_alphanumeric() && c != '_')?;
    (inner.starts_with(|c: char| c.is_ascii_uppercase()) && inner[end..].starts_with('('))
        .then(|| snake_case(&inner[..end]))
}

/// The Envoy name of a oneof value: `ClusterHeader("x")` → `cluster_header`.
fn variant(v: &impl Debug) -> String {
    let debug = format!("{v:?}");
    let end = debug
        .find(|c: char| !c.is_ascii_alphanumeric() && c != '_')
        .unwrap_or(debug.len());
    snake_case(&debug[..end])
}

fn snake_case(camel: &str) -> String {
    let mut out = String::with_capacity(camel.len() + 4);
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// A ConfigSource must be ADS: the proxy has one stream, to its control plane.
fn ads_source(cs: &ConfigSource, at: &str) -> Result<()> {
    only(cs, at, &["config_source_specifier", "resource_api_version"])?;
    // AUTO and V3 both mean v3, the only version the proxy (and Envoy today) speaks.
    if !matches!(
        ApiVersion::try_from(cs.resource_api_version),
        Ok(ApiVersion::Auto | ApiVersion::V3)
    ) {
        return Err(unsupported_value(
            &path(at, "resource_api_version"),
            cs.resource_api_version,
        ));
    }
    match &cs.config_source_specifier {
        Some(config_source::ConfigSourceSpecifier::Ads(_)) => Ok(()),
        Some(other) => Err(unsupported(&path(at, &variant(other)))),
        None => Err(format!("{at}: only `ads` is supported")),
    }
}

// ---------------------------------------------------------------------------------------------
// Clusters and endpoints.

/// A Cluster.
pub fn cluster(name: &str, bytes: &[u8]) -> std::result::Result<Cluster, Refused> {
    cluster_inner(bytes).map_err(refuse("cluster", name))
}

/// What a cluster's HTTP protocol options set.
#[derive(Default)]
struct UpstreamHttp {
    http2: bool,
    idle_timeout: Option<Duration>,
    max_requests_per_connection: Option<u32>,
    max_concurrent_streams: Option<u32>,
}

#[allow(deprecated)] // The Cluster-level HTTP options older control planes still send.
fn cluster_inner(bytes: &[u8]) -> Result<Cluster> {
    let mut c: EnvoyCluster = decode(bytes, "Cluster")?;
    // Taken out first, so the check does not render every endpoint.
    let load_assignment = c.load_assignment.take();
    let has_load_assignment = load_assignment.is_some();
    only(
        &c,
        "",
        &[
            "name",
            "cluster_discovery_type",
            "eds_cluster_config",
            "load_assignment",
            "connect_timeout",
            "lb_policy",
            "lb_config",
            "common_lb_config",
            "dns_lookup_family",
            "circuit_breakers",
            "outlier_detection",
            "typed_extension_protocol_options",
            "common_http_protocol_options",
            "http_protocol_options",
            "http2_protocol_options",
            "max_requests_per_connection",
            "transport_socket",
            "transport_socket_matches",
            // Informational: a stats name; metadata, which only subset load balancing reads
            // (refused); and a buffer size hint (hyper and tokio apply their own
            // backpressure).
            "alt_stat_name",
            "metadata",
            "per_connection_buffer_limit_bytes",
        ],
    )?;
    let kind = match c.cluster_discovery_type {
        Some(cluster::ClusterDiscoveryType::Type(t)) => {
            match cluster::DiscoveryType::try_from(t).map_err(|_| format!("unknown type {t}"))? {
                cluster::DiscoveryType::Eds => ClusterKind::Eds,
                cluster::DiscoveryType::Static => ClusterKind::Static(
                    load_assignment
                        .map(|cla| endpoints_of(cla, "load_assignment"))
                        .transpose()?
                        .unwrap_or_default(),
                ),
                cluster::DiscoveryType::OriginalDst => ClusterKind::OriginalDst,
                cluster::DiscoveryType::StrictDns | cluster::DiscoveryType::LogicalDns => {
                    ClusterKind::Dns(dns_targets(load_assignment)?)
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
    match &kind {
        ClusterKind::Eds => {
            if let Some(eds) = &c.eds_cluster_config {
                only(eds, "eds_cluster_config", &["eds_config", "service_name"])?;
                // Endpoints are subscribed to by the cluster's name, over ADS.
                if !eds.service_name.is_empty() && eds.service_name != c.name {
                    return Err(unsupported_value(
                        "eds_cluster_config.service_name",
                        format_args!("{:?} (not the cluster's name)", eds.service_name),
                    ));
                }
                if let Some(cs) = &eds.eds_config {
                    ads_source(cs, "eds_cluster_config.eds_config")?;
                }
            }
            if has_load_assignment {
                return Err(unsupported("load_assignment") + " on an EDS cluster");
            }
        }
        _ if c.eds_cluster_config.is_some() => {
            return Err(unsupported("eds_cluster_config") + " on a cluster that is not EDS");
        }
        ClusterKind::OriginalDst if has_load_assignment => {
            return Err(unsupported("load_assignment") + " on an ORIGINAL_DST cluster");
        }
        _ => {}
    }
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
    match &c.lb_config {
        // Informational: ring sizes, the ring's hash function and the Maglev table size shape
        // Envoy's ring and table. Hypha hashes by rendezvous (`upstream::pick`), with neither,
        // so they only change which endpoint a given key lands on, never the consistency.
        None
        | Some(cluster::LbConfig::RingHashLbConfig(_))
        | Some(cluster::LbConfig::MaglevLbConfig(_)) => {}
        Some(other) => return Err(unsupported(&variant(other))),
    }
    if let Some(common) = &c.common_lb_config {
        // Panic thresholds, locality and zone awareness, merge windows: none is implemented.
        only(common, "common_lb_config", &[])?;
    }
    // ALL: the proxy connects to every address the system resolver returns, both families, in
    // the resolver's order (RFC 6724: IPv6 first where reachable). AUTO, the default, cannot
    // be told from unset; Envoy would use only the IPv6 addresses of a name that has some.
    match cluster::DnsLookupFamily::try_from(c.dns_lookup_family) {
        Ok(cluster::DnsLookupFamily::Auto | cluster::DnsLookupFamily::All) => {}
        Ok(other) => return Err(unsupported_value("dns_lookup_family", other.as_str_name())),
        Err(_) => return Err(unsupported_value("dns_lookup_family", c.dns_lookup_family)),
    }
    let mut http = UpstreamHttp {
        idle_timeout: Some(Duration::from_secs(3600)), // Envoy's default
        ..Default::default()
    };
    let deprecated = c.common_http_protocol_options.is_some()
        || c.http_protocol_options.is_some()
        || c.http2_protocol_options.is_some()
        || c.max_requests_per_connection.is_some();
    if deprecated && !c.typed_extension_protocol_options.is_empty() {
        let both = "the deprecated Cluster HTTP options and typed_extension_protocol_options";
        return Err(format!("{both} are both set; use one"));
    }
    if let Some(o) = &c.common_http_protocol_options {
        common_http(o, "common_http_protocol_options", &mut http)?;
    }
    if let Some(n) = c.max_requests_per_connection {
        http.max_requests_per_connection = Some(n.value).filter(|n| *n > 0);
    }
    if let Some(h1) = &c.http_protocol_options {
        only(h1, "http_protocol_options", &[])?;
    }
    if let Some(h2) = &c.http2_protocol_options {
        http2(h2, "http2_protocol_options", &mut http)?;
    }
    for (key, any) in &c.typed_extension_protocol_options {
        if key != UPSTREAM_HTTP_OPTIONS {
            return Err(format!(
                "typed_extension_protocol_options[{key:?}] is not supported"
            ));
        }
        let o: HttpProtocolOptions = typed(any, "typed_extension_protocol_options")?;
        upstream_http(&o, &mut http)?;
    }
    let mut limits = Limits::default();
    if let Some(cb) = &c.circuit_breakers {
        only(cb, "circuit_breakers", &["thresholds"])?;
        match cb.thresholds.as_slice() {
            [] => {}
            [t] if t.priority == 0 => {
                limits = thresholds(t)?;
            }
            _ => {
                return Err(unsupported(
                    "circuit_breakers.thresholds (non-default priority)",
                ))
            }
        }
    }
    let outlier = c.outlier_detection.as_ref().map(outlier).transpose()?;
    let tls = upstream_tls(c.transport_socket.as_ref(), &c.transport_socket_matches)?;
    Ok(Cluster {
        name: c.name,
        kind,
        lb,
        connect_timeout: c
            .connect_timeout
            .as_ref()
            .map_or(Duration::from_secs(5), dur),
        http2: http.http2,
        limits,
        outlier,
        idle_timeout: http.idle_timeout,
        max_requests_per_connection: http.max_requests_per_connection,
        max_concurrent_streams: http.max_concurrent_streams,
        tls,
    })
}

// ---------------------------------------------------------------------------------------------
// TLS: Envoy's transport sockets, as Istio sends them for mutual TLS between sidecars.

const TRANSPORT_SOCKET_MATCH: &str = "envoy.transport_socket_match";
/// Istio's SDS names: the workload certificate, and the trust bundle.
const SDS_CERT: &str = "default";
const SDS_ROOTS: &str = "ROOTCA";

/// What a transport socket is: TLS with this context, or plaintext (`raw_buffer`).
enum Socket<T> {
    Tls(T),
    Plain,
}

fn socket<T: Message + Default + Name>(ts: &TransportSocket, at: &str) -> Result<Socket<T>> {
    // The name is a label: the typed config says what the socket is.
    only(ts, at, &["name", "config_type"])?;
    let Some(transport_socket::ConfigType::TypedConfig(any)) = &ts.config_type else {
        return Err(format!("{at}: a typed config is required"));
    };
    if any.type_url == RawBuffer::type_url() {
        let raw: RawBuffer = decode(&any.value, "RawBuffer")?;
        only(&raw, at, &[])?;
        return Ok(Socket::Plain);
    }
    typed::<T>(any, at).map(Socket::Tls)
}

/// A cluster's TLS: `transport_socket` (every endpoint), or Istio's auto-mTLS pair of
/// `transport_socket_matches` (TLS where the endpoint's metadata says `tlsMode: istio`,
/// plaintext elsewhere). Other matches are refused: Hypha matches on nothing else.
fn upstream_tls(
    ts: Option<&TransportSocket>,
    matches: &[cluster::TransportSocketMatch],
) -> Result<Option<UpstreamTls>> {
    if let Some(ts) = ts {
        if !matches.is_empty() {
            return Err("both transport_socket and transport_socket_matches are set".into());
        }
        return match socket::<UpstreamTlsContext>(ts, "transport_socket")? {
            Socket::Plain => Ok(None),
            Socket::Tls(ctx) => upstream_context(&ctx, "transport_socket").map(|mut t| {
                t.only_istio_endpoints = false;
                Some(t)
            }),
        };
    }
    let mut tls = None;
    let mut plain_fallback = false;
    for (i, m) in matches.iter().enumerate() {
        let at = format!("transport_socket_matches[{i}]");
        // The name is a stats label.
        only(m, &at, &["name", "match", "transport_socket"])?;
        let fields = m.r#match.as_ref().map(|s| &s.fields);
        let istio = fields.is_some_and(|f| {
            f.len() == 1
                && f.get("tlsMode").and_then(|v| v.kind.as_ref())
                    == Some(
                        &envoy_types::pb::google::protobuf::value::Kind::StringValue(
                            "istio".into(),
                        ),
                    )
        });
        let empty = fields.is_none_or(|f| f.is_empty());
        let Some(ts) = &m.transport_socket else {
            return Err(format!("{at}: no transport_socket"));
        };
        match (
            socket::<UpstreamTlsContext>(ts, &path(&at, "transport_socket"))?,
            istio,
            empty,
        ) {
            (Socket::Tls(ctx), true, _) if tls.is_none() && !plain_fallback => {
                tls = Some(upstream_context(&ctx, &path(&at, "transport_socket"))?);
            }
            (Socket::Plain, _, true) => plain_fallback = true,
            _ => {
                return Err(format!(
                    "{at}: only Istio's auto-mTLS matches are supported (TLS for \
                     `tlsMode: istio`, then plaintext for the rest)"
                ))
            }
        }
    }
    Ok(tls.map(|mut t| {
        t.only_istio_endpoints = true;
        t
    }))
}

/// An SDS reference, which must be `name` over ADS.
fn sds(cfg: &SdsSecretConfig, name: &str, at: &str) -> Result<()> {
    only(cfg, at, &["name", "sds_config"])?;
    if cfg.name != name {
        return Err(unsupported_value(
            &path(at, "name"),
            format_args!(
                "{:?} (Hypha serves the workload certificate as {SDS_CERT:?} and the trust \
                 bundle as {SDS_ROOTS:?})",
                cfg.name
            ),
        ));
    }
    if let Some(cs) = &cfg.sds_config {
        ads_source(cs, &path(at, "sds_config"))?;
    }
    Ok(())
}

/// The common part of both sides: the workload certificate, the trust bundle, peer SPIFFE IDs
/// and ALPN. Returns (identities, ALPN in wire format).
fn common_tls(c: Option<&CommonTlsContext>, at: &str) -> Result<(Vec<String>, Vec<u8>)> {
    let at = path(at, "common_tls_context");
    let Some(c) = c else {
        return Err(format!(
            "{at}: the workload certificate ({SDS_CERT:?}) is required"
        ));
    };
    // Informational: TLS versions and ciphers; Hypha's contexts allow TLS 1.2 and 1.3 with
    // BoringSSL's defaults.
    only(
        c,
        &at,
        &[
            "tls_certificate_sds_secret_configs",
            "validation_context_type",
            "alpn_protocols",
            "tls_params",
        ],
    )?;
    match c.tls_certificate_sds_secret_configs.as_slice() {
        [one] => sds(
            one,
            SDS_CERT,
            &path(&at, "tls_certificate_sds_secret_configs"),
        )?,
        _ => {
            return Err(format!(
                "{at}: exactly one tls_certificate_sds_secret_configs ({SDS_CERT:?}) is required"
            ))
        }
    }
    let mut identities = Vec::new();
    match &c.validation_context_type {
        Some(ValidationContextType::ValidationContextSdsSecretConfig(cfg)) => {
            sds(
                cfg,
                SDS_ROOTS,
                &path(&at, "validation_context_sds_secret_config"),
            )?;
        }
        Some(ValidationContextType::CombinedValidationContext(combined)) => {
            let at = path(&at, "combined_validation_context");
            only(
                combined,
                &at,
                &[
                    "default_validation_context",
                    "validation_context_sds_secret_config",
                ],
            )?;
            match &combined.validation_context_sds_secret_config {
                Some(cfg) => sds(
                    cfg,
                    SDS_ROOTS,
                    &path(&at, "validation_context_sds_secret_config"),
                )?,
                None => {
                    return Err(format!(
                        "{at}: the trust bundle ({SDS_ROOTS:?}) is required"
                    ))
                }
            }
            if let Some(v) = &combined.default_validation_context {
                let at = path(&at, "default_validation_context");
                only(v, &at, &["match_typed_subject_alt_names"])?;
                for m in &v.match_typed_subject_alt_names {
                    let at = path(&at, "match_typed_subject_alt_names");
                    only(m, &at, &["san_type", "matcher"])?;
                    if m.san_type != SanType::Uri as i32 {
                        return Err(unsupported_value(&path(&at, "san_type"), m.san_type));
                    }
                    match m.matcher.as_ref().and_then(|x| x.match_pattern.as_ref()) {
                        Some(MatchPattern::Exact(id))
                            if !m.matcher.as_ref().is_some_and(|x| x.ignore_case) =>
                        {
                            identities.push(id.clone());
                        }
                        _ => {
                            return Err(format!(
                                "{at}: only exact, case-sensitive SPIFFE IDs are supported"
                            ))
                        }
                    }
                }
            }
        }
        Some(ValidationContextType::ValidationContext(_)) => {
            return Err(unsupported(&path(&at, "validation_context"))
                + ": inline roots; Hypha verifies peers against the mesh trust bundle (ROOTCA)")
        }
        Some(other) => return Err(unsupported(&path(&at, &variant(other)))),
        None => {
            return Err(format!(
                "{at}: the trust bundle ({SDS_ROOTS:?}) is required"
            ))
        }
    }
    let mut alpn = Vec::new();
    for p in &c.alpn_protocols {
        match p.as_str() {
            "h2" | "http/1.1" => {
                alpn.push(u8::try_from(p.len()).unwrap_or(0));
                alpn.extend_from_slice(p.as_bytes());
            }
            // Istio's markers for its metadata exchange, which Hypha does not do: the peer's
            // identity comes from its certificate.
            "istio" | "istio-peer-exchange" | "istio-http/1.0" | "istio-http/1.1" | "istio-h2" => {}
            other => {
                return Err(unsupported_value(
                    &path(&at, "alpn_protocols"),
                    format_args!("{other:?}"),
                ))
            }
        }
    }
    Ok((identities, alpn))
}

fn upstream_context(ctx: &UpstreamTlsContext, at: &str) -> Result<UpstreamTls> {
    // Informational: SNI, which Istio sets to the cluster name for its own routing of
    // passthrough traffic; Hypha checks the server by its SPIFFE ID, not a name.
    only(ctx, at, &["common_tls_context", "sni"])?;
    let (identities, alpn) = common_tls(ctx.common_tls_context.as_ref(), at)?;
    Ok(UpstreamTls {
        identities: identities.into(),
        alpn: alpn.into(),
        only_istio_endpoints: false,
    })
}

/// The trust bundle secret (`ROOTCA`): the PEM roots in its `trusted_ca`. Hypha keeps its own
/// key and certificate, so no other secret is taken from the control plane.
pub fn trust_bundle(
    name: &str,
    bytes: &[u8],
) -> std::result::Result<Vec<boring::x509::X509>, Refused> {
    trust_bundle_inner(name, bytes).map_err(refuse("secret", name))
}

fn trust_bundle_inner(name: &str, bytes: &[u8]) -> Result<Vec<boring::x509::X509>> {
    if name != SDS_ROOTS {
        return Err(format!(
            "only {SDS_ROOTS:?} is taken from the control plane; the workload certificate \
             ({SDS_CERT:?}) comes from the proxy's own key and the CA"
        ));
    }
    let s: Secret = decode(bytes, "Secret")?;
    only(&s, "", &["name", "type"])?;
    let Some(secret::Type::ValidationContext(v)) = &s.r#type else {
        return Err("a validation_context with trusted_ca is expected".into());
    };
    only(v, "validation_context", &["trusted_ca"])?;
    let pem: &[u8] = match v.trusted_ca.as_ref().and_then(|d| d.specifier.as_ref()) {
        Some(envoy_types::pb::envoy::config::core::v3::data_source::Specifier::InlineString(s)) => {
            s.as_bytes()
        }
        Some(envoy_types::pb::envoy::config::core::v3::data_source::Specifier::InlineBytes(b)) => b,
        _ => return Err("validation_context.trusted_ca must be inline PEM".into()),
    };
    let roots = boring::x509::X509::stack_from_pem(pem)
        .map_err(|e| format!("validation_context.trusted_ca: {e}"))?;
    if roots.is_empty() {
        return Err("validation_context.trusted_ca holds no certificate".into());
    }
    Ok(roots)
}

/// An inbound chain's TLS: a DownstreamTlsContext that requires client certificates.
fn downstream_tls(ts: &TransportSocket, at: &str) -> Result<bool> {
    match socket::<DownstreamTlsContext>(ts, at)? {
        Socket::Plain => Ok(false),
        Socket::Tls(ctx) => {
            only(
                &ctx,
                at,
                &["common_tls_context", "require_client_certificate"],
            )?;
            if !ctx.require_client_certificate.is_some_and(|b| b.value) {
                return Err(format!(
                    "{at}: require_client_certificate must be true (mutual TLS only)"
                ));
            }
            let (identities, _alpn) = common_tls(ctx.common_tls_context.as_ref(), at)?;
            if !identities.is_empty() {
                return Err(unsupported(&path(at, "match_typed_subject_alt_names"))
                    + " on the server side: authorization policy decides who may call");
            }
            Ok(true)
        }
    }
}

/// `envoy.extensions.upstreams.http.v3.HttpProtocolOptions`.
fn upstream_http(o: &HttpProtocolOptions, http: &mut UpstreamHttp) -> Result<()> {
    const AT: &str = "HttpProtocolOptions";
    only(
        o,
        AT,
        &["common_http_protocol_options", "upstream_protocol_options"],
    )?;
    if let Some(common) = &o.common_http_protocol_options {
        common_http(common, &path(AT, "common_http_protocol_options"), http)?;
    }
    match &o.upstream_protocol_options {
        Some(UpstreamProtocolOptions::ExplicitHttpConfig(e)) => {
            let at = path(AT, "explicit_http_config");
            only(e, &at, &["protocol_config"])?;
            match &e.protocol_config {
                Some(ProtocolConfig::HttpProtocolOptions(h1)) => {
                    only(h1, &path(&at, "http_protocol_options"), &[])?;
                }
                Some(ProtocolConfig::Http2ProtocolOptions(h2)) => {
                    http2(h2, &path(&at, "http2_protocol_options"), http)?;
                }
                Some(other) => return Err(unsupported(&path(&at, &variant(other)))),
                None => {}
            }
        }
        Some(other) => return Err(unsupported(&path(AT, &variant(other)))),
        None => {}
    }
    Ok(())
}

/// `common_http_protocol_options`, in HttpProtocolOptions or (deprecated) the Cluster.
fn common_http(o: &CommonHttpOptions, at: &str, http: &mut UpstreamHttp) -> Result<()> {
    only(o, at, &["idle_timeout", "max_requests_per_connection"])?;
    if let Some(d) = &o.idle_timeout {
        http.idle_timeout = Some(dur(d)).filter(|d| !d.is_zero());
    }
    http.max_requests_per_connection = o
        .max_requests_per_connection
        .map(|n| n.value)
        .filter(|n| *n > 0);
    Ok(())
}

fn http2(h2: &Http2ProtocolOptions, at: &str, http: &mut UpstreamHttp) -> Result<()> {
    only(h2, at, &["max_concurrent_streams"])?;
    http.http2 = true;
    http.max_concurrent_streams = h2.max_concurrent_streams.map(|n| n.value);
    Ok(())
}

fn thresholds(t: &circuit_breakers::Thresholds) -> Result<Limits> {
    only(
        t,
        "circuit_breakers.thresholds",
        &[
            "priority",
            "max_connections",
            "max_pending_requests",
            "max_requests",
            "max_retries",
            // Informational: it only publishes `remaining_*` gauges.
            "track_remaining",
        ],
    )?;
    let d = Limits::default();
    let v = |w: &Option<envoy_types::pb::google::protobuf::UInt32Value>, d: u32| {
        w.as_ref().map_or(d, |w| w.value)
    };
    Ok(Limits {
        max_connections: v(&t.max_connections, d.max_connections),
        max_pending_requests: v(&t.max_pending_requests, d.max_pending_requests),
        max_requests: v(&t.max_requests, d.max_requests),
        max_retries: v(&t.max_retries, d.max_retries),
    })
}

fn outlier(od: &OutlierDetection) -> Result<OutlierPolicy> {
    only(
        od,
        "outlier_detection",
        &[
            "consecutive_5xx",
            "enforcing_consecutive_5xx",
            "consecutive_gateway_failure",
            "enforcing_consecutive_gateway_failure",
            "base_ejection_time",
            "max_ejection_percent",
            "interval",
            "enforcing_success_rate",
        ],
    )?;
    // Hypha has no success-rate ejection, which 0 turns off. (Envoy enforces it when unset, with
    // at least 5 hosts and 100 requests per interval; that default cannot be told apart here.)
    if let Some(e) = od.enforcing_success_rate.filter(|e| e.value != 0) {
        return Err(unsupported_value(
            "outlier_detection.enforcing_success_rate",
            e.value,
        ));
    }
    type U32 = Option<envoy_types::pb::google::protobuf::UInt32Value>;
    let enforced = |n: &U32, enforcing: &U32, default: u32| {
        if enforcing.as_ref().is_some_and(|e| e.value == 0) {
            0
        } else {
            n.as_ref().map_or(default, |n| n.value)
        }
    };
    Ok(OutlierPolicy {
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
        interval: od.interval.as_ref().map_or(Duration::from_secs(10), dur),
    })
}

/// A ClusterLoadAssignment's endpoints.
pub fn endpoints(name: &str, bytes: &[u8]) -> std::result::Result<Arc<[Endpoint]>, Refused> {
    decode::<ClusterLoadAssignment>(bytes, "ClusterLoadAssignment")
        .and_then(|cla| endpoints_of(cla, ""))
        .map_err(refuse("endpoints", name))
}

fn endpoints_of(cla: ClusterLoadAssignment, at: &str) -> Result<Arc<[Endpoint]>> {
    let mut out = Vec::new();
    for (e, weight, istio_tls) in lb_endpoints(cla, at)? {
        let at = path(at, "endpoints.lb_endpoints.endpoint");
        let mut addresses = vec![socket_addr(e.address.as_ref(), &path(&at, "address"))?];
        for extra in &e.additional_addresses {
            let at = path(&at, "additional_addresses");
            only(extra, &at, &["address"])?;
            addresses.push(socket_addr(extra.address.as_ref(), &at)?);
        }
        out.push(Endpoint {
            addresses,
            weight,
            istio_tls,
        });
    }
    Ok(out.into())
}

/// Every endpoint of a ClusterLoadAssignment, with its weight and whether its metadata says
/// it speaks Istio's mutual TLS, once every message on the way is checked.
fn lb_endpoints(
    mut cla: ClusterLoadAssignment,
    at: &str,
) -> Result<Vec<(EnvoyEndpoint, u32, bool)>> {
    // Lists are taken out before a check, so it does not render every endpoint.
    let localities = std::mem::take(&mut cla.endpoints);
    // `cluster_name` is informational: the resource's name (or the cluster's) is what counts.
    only(&cla, at, &["cluster_name", "endpoints"])?;
    let at = path(at, "endpoints");
    let mut out = Vec::new();
    for mut locality in localities {
        let lbs = std::mem::take(&mut locality.lb_endpoints);
        // Informational: the locality and its weight serve zone-aware and locality-weighted
        // load balancing only, which need `common_lb_config` settings that are refused.
        only(
            &locality,
            &at,
            &["lb_endpoints", "locality", "load_balancing_weight"],
        )?;
        let at = path(&at, "lb_endpoints");
        for mut lb in lbs {
            let host = lb.host_identifier.take();
            // Metadata: `envoy.transport_socket_match` is read below; the rest only by subset
            // load balancing (refused).
            only(
                &lb,
                &at,
                &[
                    "host_identifier",
                    "load_balancing_weight",
                    "health_status",
                    "metadata",
                ],
            )?;
            // UNKNOWN and HEALTHY endpoints take traffic alike; other statuses would not.
            match HealthStatus::try_from(lb.health_status) {
                Ok(HealthStatus::Unknown | HealthStatus::Healthy) => {}
                Ok(other) => {
                    return Err(unsupported_value(
                        &path(&at, "health_status"),
                        other.as_str_name(),
                    ))
                }
                Err(_) => {
                    return Err(unsupported_value(
                        &path(&at, "health_status"),
                        lb.health_status,
                    ))
                }
            }
            let Some(lb_endpoint::HostIdentifier::Endpoint(e)) = host else {
                return Err(unsupported("lb_endpoints.endpoint_name"));
            };
            only(
                &e,
                &path(&at, "endpoint"),
                &["address", "additional_addresses"],
            )?;
            let istio_tls = lb
                .metadata
                .as_ref()
                .and_then(|m| m.filter_metadata.get(TRANSPORT_SOCKET_MATCH))
                .and_then(|m| m.fields.get("tlsMode"))
                .and_then(|v| v.kind.as_ref())
                .is_some_and(|k| {
                    *k == envoy_types::pb::google::protobuf::value::Kind::StringValue(
                        "istio".into(),
                    )
                });
            out.push((
                e,
                lb.load_balancing_weight.map_or(1, |w| w.value.max(1)),
                istio_tls,
            ));
        }
    }
    Ok(out)
}

/// The host names and ports of a DNS cluster's endpoints.
fn dns_targets(cla: Option<ClusterLoadAssignment>) -> Result<Arc<[(String, u16)]>> {
    const AT: &str = "load_assignment";
    let mut out = Vec::new();
    for (e, _weight, _) in cla
        .map(|c| lb_endpoints(c, AT))
        .transpose()?
        .unwrap_or_default()
    {
        if !e.additional_addresses.is_empty() {
            return Err(unsupported("additional_addresses") + " on a DNS endpoint");
        }
        match e.address.as_ref().and_then(|a| a.address.as_ref()) {
            Some(address::Address::SocketAddress(s)) => {
                only(s, "socket_address", &["address", "port_specifier"])?;
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

fn socket_addr(a: Option<&Address>, at: &str) -> Result<SocketAddr> {
    match a.and_then(|a| a.address.as_ref()) {
        Some(address::Address::SocketAddress(s)) => {
            // The protocol (TCP, the default) is checked with the rest.
            only(
                s,
                &path(at, "socket_address"),
                &["address", "port_specifier"],
            )?;
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
#[derive(Debug, Default, Clone)]
pub struct ListenerParts {
    pub outbound: Option<(ListenAddr, Outbound)>,
    /// The outbound listener's further addresses (a dual-stack service's other VIPs).
    pub additional: Vec<ListenAddr>,
    /// Inbound chains: destination port, whether the chain is mutual TLS, what it does.
    pub inbound: Vec<(u16, bool, Inbound)>,
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
            if let ChainKind::Rds(rds) = network_filter("api_listener", any)? {
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
                let Some(m) = &chain.filter_chain_match else {
                    return Err(format!(
                        "inbound filter chain {:?} has no destination_port",
                        chain.name
                    ));
                };
                let tls = inbound_chain_tls(chain, m)?;
                let Some(port) = m
                    .destination_port
                    .as_ref()
                    .and_then(|p| u16::try_from(p.value).ok())
                else {
                    return Err(format!(
                        "inbound filter chain {:?} has no destination_port",
                        chain.name
                    ));
                };
                let inbound = match chain_kind(chain)? {
                    ChainKind::Inline(cluster, authz) => Inbound::Http {
                        cluster: cluster.into(),
                        authz: Arc::new(authz),
                    },
                    ChainKind::Rds(_) => {
                        return Err("an inbound HTTP chain needs an inline route".into())
                    }
                    ChainKind::Tcp(cluster, authz) => Inbound::Tcp {
                        cluster,
                        authz: Arc::new(authz),
                    },
                };
                if parts
                    .inbound
                    .iter()
                    .any(|(p, t, _)| *p == port && *t == tls)
                {
                    return Err(format!(
                        "two inbound filter chains for port {port} ({})",
                        if tls { "TLS" } else { "plaintext" }
                    ));
                }
                parts.inbound.push((port, tls, inbound));
            }
            // Inbound traffic for a port without a chain goes to the app as TCP bytes, which
            // is what a default chain passing through to the original destination does.
            if let Some(chain) = &l.default_filter_chain {
                if let Some(m) = &chain.filter_chain_match {
                    only(m, "default_filter_chain.filter_chain_match", &[])?;
                }
                plain_chain(chain)?;
                match chain_kind(chain)? {
                    ChainKind::Tcp(c, authz) if c == PASSTHROUGH && authz.is_empty() => {}
                    _ => {
                        return Err(format!(
                            "a default_filter_chain other than TCP to {PASSTHROUGH} is not \
                             supported"
                        ))
                    }
                }
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
                        ChainKind::Rds(rds) => {
                            parts.rds.push(rds.clone());
                            Outbound::Http { route_table: rds }
                        }
                        ChainKind::Inline(..) => {
                            return Err("an outbound HTTP listener needs RDS".into());
                        }
                        ChainKind::Tcp(cluster, _) => {
                            Outbound::Tcp(Arc::new(TcpRoutes::single(cluster)))
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
    for (i, chain) in chains.iter().enumerate() {
        let at = format!("filter_chains[{i}]");
        let chain_names = server_names(chain, &at)?;
        plain_chain(chain)?;
        let ChainKind::Tcp(cluster, _) = no_authz(chain_kind(chain)?)? else {
            return Err(format!(
                "{at}: an outbound listener with several filter chains tells them apart by \
                 server name, so they must be TCP proxies"
            ));
        };
        if chain_names.is_empty() {
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
    Rds(String),
    /// HTTP, with an inline route table sending everything to this cluster, behind these
    /// RBAC filters.
    Inline(String, Authz),
    /// TCP to this cluster, behind these RBAC filters.
    Tcp(String, Authz),
}

/// Authorization runs on inbound chains only: the app's own requests are not checked.
fn no_authz(kind: ChainKind) -> Result<ChainKind> {
    match &kind {
        ChainKind::Inline(_, a) | ChainKind::Tcp(_, a) if !a.is_empty() => {
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
        ChainKind::Tcp(cluster, _) => Ok(ChainKind::Tcp(
            cluster,
            Authz {
                filters: network_rbac,
            },
        )),
        _ if !network_rbac.is_empty() => Err(prefix(
            "network RBAC before an HTTP connection manager is not supported (HTTP chains \
             take envoy.filters.http.rbac)"
                .into(),
        )),
        other => Ok(other),
    }
}

/// An RBAC filter's rules.
fn rbac(rules: Option<&EnvoyRbac>, at: &str) -> Result<authz::Rbac> {
    let Some(r) = rules else {
        return Err(format!(
            "{at}: rules are required (shadow rules and matchers are not supported)"
        ));
    };
    only(r, at, &["action", "policies"])?;
    let action = match envoy_rbac::Action::try_from(r.action) {
        Ok(envoy_rbac::Action::Allow) => authz::Action::Allow,
        Ok(envoy_rbac::Action::Deny) => authz::Action::Deny,
        Ok(envoy_rbac::Action::Log) => authz::Action::Log,
        Err(_) => return Err(unsupported_value(&path(at, "action"), r.action)),
    };
    let mut names: Vec<&String> = r.policies.keys().collect();
    names.sort();
    let mut policies = Vec::new();
    for name in names {
        let p = &r.policies[name];
        let at = format!("{at}.policies[{name:?}]");
        only(p, &at, &["permissions", "principals"])?;
        let perms = any_permission(&p.permissions, &path(&at, "permissions"))?;
        let princs = any_principal(&p.principals, &path(&at, "principals"))?;
        policies.push((
            name.clone(),
            authz::Permission::Or(perms),
            authz::Principal::Or(princs),
        ));
    }
    Ok(authz::Rbac { action, policies })
}

fn permission(p: &Permission, at: &str) -> Result<authz::Permission> {
    use authz::Permission as P;
    only(p, at, &["rule"])?;
    let all = |v: &[Permission]| {
        v.iter()
            .map(|x| permission(x, at))
            .collect::<Result<Vec<_>>>()
    };
    Ok(match &p.rule {
        Some(permission::Rule::AndRules(set)) => P::And(all(&set.rules)?),
        Some(permission::Rule::OrRules(set)) => P::Or(any_permission(&set.rules, at)?),
        Some(permission::Rule::Any(true)) => P::Any,
        Some(permission::Rule::NotRule(inner)) => P::Not(Box::new(permission(inner, at)?)),
        Some(permission::Rule::Header(h)) => {
            P::Http(authz::Leaf::request(header_conditions(h.clone())?)?)
        }
        Some(permission::Rule::UrlPath(pm)) => P::Http(authz::Leaf::request(url_path(pm, at)?)?),
        Some(permission::Rule::DestinationPort(port)) => {
            P::DestinationPort(u16::try_from(*port).map_err(|_| unsupported_value(at, port))?)
        }
        Some(permission::Rule::DestinationIp(c)) => P::DestinationIp(cidr(c, at)?),
        Some(permission::Rule::RequestedServerName(sm)) => {
            P::ServerName(authz::Leaf::value(string_match(sm.clone(), at)?)?)
        }
        Some(other) => return Err(unsupported(&path(at, &variant(other)))),
        None => return Err(format!("{at}: a rule is required")),
    })
}

#[allow(deprecated)] // `source_ip`, which Envoy still reads as the direct peer's address
fn principal(p: &Principal, at: &str) -> Result<authz::Principal> {
    use authz::Principal as P;
    only(p, at, &["identifier"])?;
    let all = |v: &[Principal]| {
        v.iter()
            .map(|x| principal(x, at))
            .collect::<Result<Vec<_>>>()
    };
    Ok(match &p.identifier {
        Some(principal::Identifier::AndIds(set)) => P::And(all(&set.ids)?),
        Some(principal::Identifier::OrIds(set)) => P::Or(any_principal(&set.ids, at)?),
        Some(principal::Identifier::Any(true)) => P::Any,
        Some(principal::Identifier::NotId(inner)) => P::Not(Box::new(principal(inner, at)?)),
        Some(principal::Identifier::Authenticated(a)) => {
            only(a, &path(at, "authenticated"), &["principal_name"])?;
            P::Authenticated(
                a.principal_name
                    .clone()
                    .map(|sm| string_match(sm, at).and_then(authz::Leaf::value))
                    .transpose()?,
            )
        }
        Some(principal::Identifier::DirectRemoteIp(c) | principal::Identifier::SourceIp(c)) => {
            P::DirectRemoteIp(cidr(c, at)?)
        }
        Some(principal::Identifier::RemoteIp(c)) => P::RemoteIp(cidr(c, at)?),
        Some(principal::Identifier::Header(h)) => {
            P::Http(authz::Leaf::request(header_conditions(h.clone())?)?)
        }
        Some(principal::Identifier::UrlPath(pm)) => {
            P::Http(authz::Leaf::request(url_path(pm, at)?)?)
        }
        Some(other) => return Err(unsupported(&path(at, &variant(other)))),
        None => return Err(format!("{at}: an identifier is required")),
    })
}

/// Alternatives: every test on the request among them folded into one leaf (one table, one
/// pass over the request), the others as they are.
fn any_permission(v: &[Permission], at: &str) -> Result<Vec<authz::Permission>> {
    let mut out = Vec::new();
    let mut http = Vec::new();
    for x in v {
        match &x.rule {
            Some(permission::Rule::Header(h)) => {
                only(x, at, &["rule"])?;
                http.push(header_conditions(h.clone())?);
            }
            Some(permission::Rule::UrlPath(pm)) => {
                only(x, at, &["rule"])?;
                http.push(url_path(pm, at)?);
            }
            _ => out.push(permission(x, at)?),
        }
    }
    if !http.is_empty() {
        out.push(authz::Permission::Http(authz::Leaf::any_of(http)?));
    }
    Ok(out)
}

/// Alternatives: every test on the request among them folded into one leaf, and every
/// SPIFFE ID test into another, the others as they are.
fn any_principal(v: &[Principal], at: &str) -> Result<Vec<authz::Principal>> {
    let mut out = Vec::new();
    let (mut http, mut ids) = (Vec::new(), Vec::new());
    for x in v {
        match &x.identifier {
            Some(principal::Identifier::Header(h)) => {
                only(x, at, &["identifier"])?;
                http.push(header_conditions(h.clone())?);
            }
            Some(principal::Identifier::UrlPath(pm)) => {
                only(x, at, &["identifier"])?;
                http.push(url_path(pm, at)?);
            }
            Some(principal::Identifier::Authenticated(a)) if a.principal_name.is_some() => {
                only(x, at, &["identifier"])?;
                only(a, &path(at, "authenticated"), &["principal_name"])?;
                if let Some(sm) = &a.principal_name {
                    ids.push(string_match(sm.clone(), at)?);
                }
            }
            _ => out.push(principal(x, at)?),
        }
    }
    if !http.is_empty() {
        out.push(authz::Principal::Http(authz::Leaf::any_of(http)?));
    }
    if !ids.is_empty() {
        out.push(authz::Principal::Authenticated(Some(
            authz::Leaf::any_value(ids)?,
        )));
    }
    Ok(out)
}

/// The condition of a `url_path` test.
fn url_path(
    pm: &envoy_types::pb::envoy::r#type::matcher::v3::PathMatcher,
    at: &str,
) -> Result<Vec<Condition>> {
    use envoy_types::pb::envoy::r#type::matcher::v3::path_matcher;
    only(pm, at, &["rule"])?;
    let Some(path_matcher::Rule::Path(sm)) = &pm.rule else {
        return Err(format!("{at}: url_path needs a path"));
    };
    Ok(vec![Condition {
        attr: Attr::Path,
        test: Test::Matches(string_match(sm.clone(), at)?),
        invert: false,
    }])
}

fn cidr(c: &envoy_types::pb::envoy::config::core::v3::CidrRange, at: &str) -> Result<authz::Cidr> {
    only(c, at, &["address_prefix", "prefix_len"])?;
    let addr: IpAddr = c
        .address_prefix
        .parse()
        .map_err(|_| format!("{at}: bad address {:?}", c.address_prefix))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = c.prefix_len.as_ref().map_or(0, |l| l.value);
    if len > max {
        return Err(format!("{at}: prefix length {len} is too long for {addr}"));
    }
    Ok(authz::Cidr {
        addr,
        len: len as u8,
    })
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
                Some(tcp_proxy::ClusterSpecifier::Cluster(c)) => {
                    Ok(ChainKind::Tcp(c, Authz::default()))
                }
                Some(other) => Err(prefix(unsupported(&variant(&other)))),
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
    // timeouts, `use_remote_address`, path normalization and the rest, none of which the
    // control plane sends.
    only(&h, "", &["stat_prefix", "http_filters", "route_specifier"])?;
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
            Ok(ChainKind::Rds(rds.route_config_name))
        }
        Some(RouteSpecifier::RouteConfig(rc)) => {
            Ok(ChainKind::Inline(inline_catch_all(rc)?, authz))
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

// ---------------------------------------------------------------------------------------------
// Routes.

/// A RouteConfiguration.
pub fn route_table(name: &str, bytes: &[u8]) -> std::result::Result<RouteTable, Refused> {
    decode::<RouteConfiguration>(bytes, "RouteConfiguration")
        .and_then(route_table_inner)
        .map_err(refuse("route table", name))
}

fn route_table_inner(mut rc: RouteConfiguration) -> Result<RouteTable> {
    // Taken out first, so the check does not render every route.
    let virtual_hosts = std::mem::take(&mut rc.virtual_hosts);
    only(&rc, "", &["name", "virtual_hosts", "validate_clusters"])?;
    // `false` is what the proxy does: a route to a cluster it does not have fails at request
    // time (no cluster), the table is not refused for it.
    if rc.validate_clusters.is_some_and(|v| v.value) {
        return Err(unsupported_value("validate_clusters", true));
    }
    let mut domains = Vec::new();
    let mut hosts = Vec::new();
    for vh in virtual_hosts {
        let i = hosts.len();
        domains.extend(vh.domains.iter().map(|d| (d.to_ascii_lowercase(), i)));
        let name = vh.name.clone();
        hosts.push(virtual_host(vh).map_err(|e| format!("virtual host {name:?}: {e}"))?);
    }
    let (domains, holders) =
        host_table(domains, "virtual hosts").map_err(|e| format!("domains: {e}"))?;
    let domain_hosts = holders.into_iter().map(|(_, i)| i).collect();
    Ok(RouteTable {
        name: rc.name,
        virtual_hosts: hosts,
        domains,
        domain_hosts,
    })
}

/// Host names (lower-case) of the things at their indexes, compiled into one rule each on the
/// authority, in the order Envoy prefers them: exact names, then suffix wildcards
/// (`*.example.com`) longest first, then prefix wildcards (`example.*`) longest first, then
/// `*`; for each rule, its name and the index it stands for. An exact name in two of them
/// (`holders`) is an error; for a wildcard, the first holder wins.
fn host_table(names: Vec<(String, usize)>, holders: &str) -> Result<(Table, Vec<(String, usize)>)> {
    let mut exact = HashMap::new();
    let (mut suffixes, mut prefixes, mut any) = (Vec::new(), Vec::new(), None);
    for (d, i) in names {
        if d == "*" {
            any.get_or_insert(i);
        } else if let Some(suffix) = d.strip_prefix('*') {
            suffixes.push((suffix.to_owned(), i));
        } else if let Some(prefix) = d.strip_suffix('*') {
            prefixes.push((prefix.to_owned(), i));
        } else if exact.insert(d.clone(), i).is_some() {
            return Err(format!("{d:?} is in two {holders}"));
        }
    }
    suffixes.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
    prefixes.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
    let on_authority = |pattern: Pattern, invert: bool| Condition {
        attr: Attr::Authority,
        test: Test::Matches(StringMatch {
            pattern,
            ignore_case: false,
        }),
        invert,
    };
    // A wildcard stands for at least one character: the authority is longer than the rest.
    let wildcard = |pattern: Pattern, rest: String| Rule {
        conditions: vec![
            on_authority(pattern, false),
            on_authority(Pattern::Exact(rest), true),
        ],
    };
    let mut exact: Vec<(String, usize)> = exact.into_iter().collect();
    exact.sort_unstable();
    let mut rules = Vec::new();
    let mut holder = Vec::new();
    for (d, i) in exact {
        rules.push(Rule {
            conditions: vec![on_authority(Pattern::Exact(d.clone()), false)],
        });
        holder.push((d, i));
    }
    for (s, i) in suffixes {
        holder.push((format!("*{s}"), i));
        rules.push(wildcard(Pattern::Suffix(s.clone()), s));
    }
    for (p, i) in prefixes {
        holder.push((format!("{p}*"), i));
        rules.push(wildcard(Pattern::Prefix(p.clone()), p));
    }
    if let Some(i) = any {
        rules.push(Rule {
            conditions: vec![on_authority(Pattern::Prefix(String::new()), false)],
        });
        holder.push(("*".into(), i));
    }
    let table = Table::compile(rules).map_err(|e| e.to_string())?;
    Ok((table, holder))
}

fn virtual_host(mut vh: EnvoyVirtualHost) -> Result<VirtualHost> {
    let envoy_routes = std::mem::take(&mut vh.routes);
    only(&vh, "", &["name", "domains", "routes"])?;
    let mut routes = Vec::new();
    let mut rules = Vec::new();
    for r in envoy_routes {
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

fn compile_route(mut r: EnvoyRoute) -> Result<(Rule, Route)> {
    let m = r.r#match.take().ok_or("a route needs a match")?;
    let action = r.action.take().ok_or("a route needs an action")?;
    only(
        &r,
        "",
        &[
            "name",
            "request_headers_to_add",
            "request_headers_to_remove",
            "response_headers_to_add",
            "response_headers_to_remove",
            "typed_per_filter_config",
            // Informational: no filter Hypha accepts reads route metadata.
            "metadata",
        ],
    )?;
    let (conditions, matched_prefix) = route_match(m)?;
    let headers = HeaderOps {
        request_add: header_adds(&r.request_headers_to_add, "request_headers_to_add")?,
        request_remove: header_names(&r.request_headers_to_remove)?,
        response_add: header_adds(&r.response_headers_to_add, "response_headers_to_add")?,
        response_remove: header_names(&r.response_headers_to_remove)?,
    };
    let action = match action {
        route::Action::Route(ra) => Action::Forward(forward(ra, matched_prefix)?),
        route::Action::Redirect(rd) => Action::Redirect(redirect(rd)?),
        route::Action::DirectResponse(d) => {
            only(&d, "direct_response", &["status", "body"])?;
            let body = match d.body {
                Some(b) => data_source(b, "direct_response.body")?,
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
        other => return Err(unsupported(&variant(&other))),
    };
    let mut fault = None;
    for (filter, any) in &r.typed_per_filter_config {
        if filter != FAULT {
            return Err(format!(
                "typed_per_filter_config[{filter:?}] is not supported"
            ));
        }
        let at = format!("typed_per_filter_config[{filter:?}]");
        fault = Some(http_fault(&typed::<HttpFault>(any, &at)?, &at)?);
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

fn data_source(d: DataSource, at: &str) -> Result<bytes::Bytes> {
    use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
    only(&d, at, &["specifier"])?;
    match d.specifier {
        Some(Specifier::InlineString(s)) => Ok(bytes::Bytes::from(s)),
        Some(Specifier::InlineBytes(b)) => Ok(bytes::Bytes::from(b)),
        Some(other) => Err(unsupported(&path(at, &variant(&other)))),
        None => Ok(bytes::Bytes::new()),
    }
}

/// A route's match as conditions, and the length of the prefix it matches, if it is one.
fn route_match(m: RouteMatch) -> Result<(Vec<Condition>, Option<usize>)> {
    only(
        &m,
        "match",
        &[
            "path_specifier",
            "case_sensitive",
            "headers",
            "query_parameters",
        ],
    )?;
    let ignore_case = m.case_sensitive.as_ref().is_some_and(|b| !b.value);
    let mut conditions = Vec::new();
    let mut matched_prefix = None;
    let path_pattern = match m.path_specifier {
        Some(PathSpecifier::Prefix(p)) => {
            matched_prefix = Some(p.len());
            Pattern::Prefix(p)
        }
        Some(PathSpecifier::Path(p)) => Pattern::Exact(p),
        Some(PathSpecifier::SafeRegex(re)) => Pattern::Regex(regex(re, "match.safe_regex")?),
        Some(other) => return Err(unsupported(&path("match", &variant(&other)))),
        None => return Err("a route match needs a path specifier".into()),
    };
    // Envoy applies `case_sensitive` to literal paths only, never to `safe_regex`.
    let ignore_case = ignore_case && !matches!(path_pattern, Pattern::Regex(_));
    conditions.push(Condition {
        attr: Attr::Path,
        test: Test::Matches(StringMatch {
            pattern: path_pattern,
            ignore_case,
        }),
        invert: false,
    });
    for h in m.headers {
        conditions.extend(header_conditions(h)?);
    }
    for q in m.query_parameters {
        const AT: &str = "match.query_parameters";
        only(&q, AT, &["name", "query_parameter_match_specifier"])?;
        let test = match q.query_parameter_match_specifier {
            Some(QueryParameterMatchSpecifier::PresentMatch(true)) => Test::Present,
            Some(QueryParameterMatchSpecifier::PresentMatch(false)) => Test::Absent,
            Some(QueryParameterMatchSpecifier::StringMatch(sm)) => {
                Test::Matches(string_match(sm, &path(AT, "string_match"))?)
            }
            None => Test::Present,
        };
        conditions.push(Condition {
            attr: Attr::Query(q.name),
            test,
            invert: false,
        });
    }
    Ok((conditions, matched_prefix))
}

/// A regex's pattern. `engine_type` (deprecated, RE2) is informational: the regex crate's
/// syntax is RE2's.
fn regex(re: RegexMatcher, at: &str) -> Result<String> {
    only(&re, at, &["regex", "engine_type"])?;
    Ok(re.regex)
}

// The deprecated matchers are what older control planes still send; Envoy accepts them.
#[allow(deprecated)]
fn header_conditions(h: HeaderMatcher) -> Result<Vec<Condition>> {
    const AT: &str = "match.headers";
    only(
        &h,
        AT,
        &[
            "name",
            "header_match_specifier",
            "invert_match",
            "treat_missing_header_as_empty",
        ],
    )?;
    let attr = match h.name.as_str() {
        ":path" => Attr::Path,
        ":authority" | "host" => Attr::Authority,
        ":method" => Attr::Method,
        ":scheme" => Attr::Scheme,
        other => Attr::Header(other.to_ascii_lowercase()),
    };
    let literal = |pattern| {
        Test::Matches(StringMatch {
            pattern,
            ignore_case: false,
        })
    };
    let test = match h.header_match_specifier {
        Some(HeaderMatchSpecifier::PresentMatch(true)) | None => Test::Present,
        Some(HeaderMatchSpecifier::PresentMatch(false)) => Test::Absent,
        Some(HeaderMatchSpecifier::StringMatch(sm)) => {
            Test::Matches(string_match(sm, &path(AT, "string_match"))?)
        }
        Some(HeaderMatchSpecifier::ExactMatch(s)) => literal(Pattern::Exact(s)),
        Some(HeaderMatchSpecifier::PrefixMatch(s)) => literal(Pattern::Prefix(s)),
        Some(HeaderMatchSpecifier::SuffixMatch(s)) => literal(Pattern::Suffix(s)),
        Some(HeaderMatchSpecifier::ContainsMatch(s)) => literal(Pattern::Contains(s)),
        Some(HeaderMatchSpecifier::SafeRegexMatch(re)) => {
            literal(Pattern::Regex(regex(re, &path(AT, "safe_regex_match"))?))
        }
        Some(other) => return Err(unsupported(&path(AT, &variant(&other)))),
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

fn string_match(sm: StringMatcher, at: &str) -> Result<StringMatch> {
    only(&sm, at, &["match_pattern", "ignore_case"])?;
    let pattern = match sm.match_pattern {
        Some(MatchPattern::Exact(s)) => Pattern::Exact(s),
        Some(MatchPattern::Prefix(s)) => Pattern::Prefix(s),
        Some(MatchPattern::Suffix(s)) => Pattern::Suffix(s),
        Some(MatchPattern::Contains(s)) => Pattern::Contains(s),
        Some(MatchPattern::SafeRegex(re)) => Pattern::Regex(regex(re, &path(at, "safe_regex"))?),
        Some(other) => return Err(unsupported(&path(at, &variant(&other)))),
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
fn header_adds(ops: &[HeaderValueOption], at: &str) -> Result<Vec<HeaderAdd>> {
    ops.iter()
        .map(|o| {
            only(o, at, &["header", "append", "append_action"])?;
            let h = o
                .header
                .as_ref()
                .ok_or("header operation without a header")?;
            only(h, &path(at, "header"), &["key", "value", "raw_value"])?;
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

fn forward(mut ra: RouteAction, matched_prefix: Option<usize>) -> Result<Forward> {
    // The RouteAction is the route's `route` field.
    const AT: &str = "route";
    let cluster_specifier = ra.cluster_specifier.take();
    only(
        &ra,
        AT,
        &[
            "timeout",
            "retry_policy",
            "hash_policy",
            "prefix_rewrite",
            "regex_rewrite",
            "host_rewrite_specifier",
        ],
    )?;
    let clusters = match cluster_specifier {
        Some(route_action::ClusterSpecifier::Cluster(c)) => vec![WeightedCluster {
            name: c.into(),
            weight: 1,
            headers: HeaderOps::default(),
        }],
        Some(route_action::ClusterSpecifier::WeightedClusters(w)) => {
            let at = path(AT, "weighted_clusters");
            // `total_weight` is deprecated; where set, Envoy requires it to be the sum.
            only(&w, &at, &["clusters", "total_weight"])?;
            let clusters = w
                .clusters
                .into_iter()
                .map(|c| {
                    let at = path(&at, "clusters");
                    only(
                        &c,
                        &at,
                        &[
                            "name",
                            "weight",
                            "request_headers_to_add",
                            "request_headers_to_remove",
                            "response_headers_to_add",
                            "response_headers_to_remove",
                        ],
                    )?;
                    Ok(WeightedCluster {
                        headers: HeaderOps {
                            request_add: header_adds(
                                &c.request_headers_to_add,
                                &path(&at, "request_headers_to_add"),
                            )?,
                            request_remove: header_names(&c.request_headers_to_remove)?,
                            response_add: header_adds(
                                &c.response_headers_to_add,
                                &path(&at, "response_headers_to_add"),
                            )?,
                            response_remove: header_names(&c.response_headers_to_remove)?,
                        },
                        weight: c.weight.map_or(0, |w| w.value),
                        name: c.name.into(),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            #[allow(deprecated)]
            if let Some(total) = w.total_weight {
                let sum: u32 = clusters.iter().map(|c| c.weight).sum();
                if total.value != sum {
                    return Err(format!(
                        "weighted_clusters.total_weight {} is not the sum of the weights, {sum}",
                        total.value
                    ));
                }
            }
            clusters
        }
        Some(other) => return Err(unsupported(&path(AT, &variant(&other)))),
        None => return Err("a route action needs a cluster".into()),
    };
    let total_weight = clusters.iter().map(|c| c.weight).sum();
    if total_weight == 0 {
        return Err("weighted clusters with a total weight of 0".into());
    }
    let retry = ra
        .retry_policy
        .map(|rp| retry_policy(rp, &path(AT, "retry_policy")))
        .transpose()?;
    let regex_rewrite = match ra.regex_rewrite {
        Some(rr) => {
            let at = path(AT, "regex_rewrite");
            only(&rr, &at, &["pattern", "substitution"])?;
            let pattern = regex(
                rr.pattern.ok_or("regex_rewrite without a pattern")?,
                &path(&at, "pattern"),
            )?;
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
    for (i, hp) in ra.hash_policy.iter().enumerate() {
        use route_action::hash_policy::PolicySpecifier;
        let at = path(AT, "hash_policy");
        only(hp, &at, &["policy_specifier", "terminal"])?;
        // The proxy hashes on the first policy that yields a key, which is Envoy's `terminal`;
        // without it Envoy combines the keys of the policies that follow.
        if !hp.terminal && i + 1 < ra.hash_policy.len() {
            return Err(format!(
                "{at}: more than one policy, with one before the last not `terminal`, is not \
                 supported"
            ));
        }
        hash.push(match &hp.policy_specifier {
            Some(PolicySpecifier::Header(h)) => {
                only(h, &path(&at, "header"), &["header_name"])?;
                HashKey::Header(
                    http::HeaderName::from_bytes(h.header_name.as_bytes())
                        .map_err(|_| format!("invalid hash header {:?}", h.header_name))?,
                )
            }
            Some(PolicySpecifier::Cookie(c)) => {
                // Informational: `path` only shapes the cookie Envoy sets when it has none to
                // hash on, which needs `ttl` (refused: Hypha sets no cookie).
                only(c, &path(&at, "cookie"), &["name", "path"])?;
                HashKey::Cookie(c.name.clone())
            }
            Some(PolicySpecifier::ConnectionProperties(p)) if p.source_ip => HashKey::SourceIp,
            Some(PolicySpecifier::QueryParameter(q)) => {
                only(q, &path(&at, "query_parameter"), &["name"])?;
                HashKey::Query(q.name.clone())
            }
            Some(PolicySpecifier::ConnectionProperties(_)) => {
                return Err(unsupported_value(
                    &path(&at, "connection_properties.source_ip"),
                    false,
                ))
            }
            Some(other) => return Err(unsupported(&path(&at, &variant(other)))),
            None => return Err(format!("{at}: a hash policy needs a key")),
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
            Some(other) => return Err(unsupported(&path(AT, &variant(&other)))),
            None => None,
        },
        matched_prefix,
    })
}

fn retry_policy(
    rp: envoy_types::pb::envoy::config::route::v3::RetryPolicy,
    at: &str,
) -> Result<RetryPolicy> {
    only(
        &rp,
        at,
        &[
            "retry_on",
            "num_retries",
            "per_try_timeout",
            "retriable_status_codes",
            "retry_back_off",
            "retry_host_predicate",
            // The proxy avoids the hosts earlier attempts used while others are usable
            // (`upstream::pick`), choosing among the rest outright: it never needs a second
            // pick, whatever this allows.
            "host_selection_retry_max_attempts",
        ],
    )?;
    // `previous_hosts` is what the proxy does anyway (see above), so it is the one predicate
    // accepted. (Without it Envoy may pick a host again; the proxy still avoids it.)
    for p in &rp.retry_host_predicate {
        let at = path(at, "retry_host_predicate");
        only(p, &at, &["name", "config_type"])?;
        let previous_hosts = match &p.config_type {
            Some(retry_policy::retry_host_predicate::ConfigType::TypedConfig(any)) => {
                only(&typed::<PreviousHostsPredicate>(any, &at)?, &at, &[])?;
                true
            }
            None => p.name == PREVIOUS_HOSTS,
        };
        if !previous_hosts {
            return Err(format!(
                "{at}: only {PREVIOUS_HOSTS} is supported, not {:?}",
                p.name
            ));
        }
    }
    let backoff = match &rp.retry_back_off {
        Some(b) => {
            only(
                b,
                &path(at, "retry_back_off"),
                &["base_interval", "max_interval"],
            )?;
            Some(b)
        }
        None => None,
    };
    let base = backoff
        .and_then(|b| b.base_interval.as_ref())
        .map_or(Duration::from_millis(25), dur);
    let mut out = RetryPolicy {
        attempts: rp.num_retries.map_or(1, |n| n.value),
        per_try_timeout: rp
            .per_try_timeout
            .as_ref()
            .map(dur)
            .filter(|d| !d.is_zero()),
        on_5xx: false,
        on_gateway_error: false,
        on_connect_failure: false,
        on_reset: false,
        on_status: Vec::new(),
        base_interval: base,
        max_interval: backoff
            .and_then(|b| b.max_interval.as_ref())
            .map_or(base * 10, dur),
        on_refused_stream: false,
        on_grpc_status: 0,
    };
    for on in rp
        .retry_on
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
    {
        match on {
            "5xx" => out.on_5xx = true,
            "gateway-error" => out.on_gateway_error = true,
            "connect-failure" => out.on_connect_failure = true,
            "reset" => out.on_reset = true,
            // Envoy reads `retriable_status_codes` only with this condition.
            "retriable-status-codes" => {
                out.on_status = rp
                    .retriable_status_codes
                    .iter()
                    .filter_map(|c| u16::try_from(*c).ok())
                    .collect();
            }
            // Carried in the model, not yet acted on (see `RetryPolicy`).
            "refused-stream" => out.on_refused_stream = true,
            "cancelled" => out.on_grpc_status |= 1 << 1,
            "deadline-exceeded" => out.on_grpc_status |= 1 << 4,
            "resource-exhausted" => out.on_grpc_status |= 1 << 8,
            "internal" => out.on_grpc_status |= 1 << 13,
            "unavailable" => out.on_grpc_status |= 1 << 14,
            // Informational: about HTTP/3 upstream connections, which the proxy never makes.
            "http3-post-connect-failure" => {}
            other => {
                return Err(format!(
                    "{}: condition {other:?} is not supported by Hypha",
                    path(at, "retry_on")
                ))
            }
        }
    }
    Ok(out)
}

fn redirect(rd: RedirectAction) -> Result<Redirect> {
    const AT: &str = "redirect";
    only(
        &rd,
        AT,
        &[
            "host_redirect",
            "port_redirect",
            "response_code",
            "scheme_rewrite_specifier",
            "path_rewrite_specifier",
        ],
    )?;
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
            Some(other) => return Err(unsupported(&path(AT, &variant(&other)))),
            None => None,
        },
        status,
    })
}

fn http_fault(f: &HttpFault, at: &str) -> Result<Fault> {
    use envoy_types::pb::envoy::extensions::filters::common::fault::v3::fault_delay;
    use envoy_types::pb::envoy::extensions::filters::http::fault::v3::fault_abort;
    only(f, at, &["delay", "abort"])?;
    let delay = match &f.delay {
        Some(d) => {
            let at = path(at, "delay");
            only(d, &at, &["fault_delay_secifier", "percentage"])?;
            match &d.fault_delay_secifier {
                Some(fault_delay::FaultDelaySecifier::FixedDelay(t)) => {
                    Some((dur(t), millionths(d.percentage.as_ref(), &at)?))
                }
                Some(other) => return Err(unsupported(&path(&at, &variant(other)))),
                None => return Err(format!("{at}: a delay needs fixed_delay")),
            }
        }
        None => None,
    };
    let abort = match &f.abort {
        Some(a) => {
            let at = path(at, "abort");
            only(a, &at, &["error_type", "percentage"])?;
            match a.error_type {
                Some(fault_abort::ErrorType::HttpStatus(s)) => Some((
                    u16::try_from(s)
                        .ok()
                        .filter(|s| (200..600).contains(s))
                        .ok_or_else(|| format!("fault abort status {s} is invalid"))?,
                    millionths(a.percentage.as_ref(), &at)?,
                )),
                Some(other) => return Err(unsupported(&path(&at, &variant(&other)))),
                None => return Err(format!("{at}: an abort needs http_status")),
            }
        }
        None => None,
    };
    Ok(Fault { delay, abort })
}

/// A FractionalPercent as millionths (Envoy's default when absent: 100 %).
fn millionths(p: Option<&FractionalPercent>, at: &str) -> Result<u32> {
    use envoy_types::pb::envoy::r#type::v3::fractional_percent::DenominatorType;
    let Some(p) = p else {
        return Ok(1_000_000);
    };
    only(p, &path(at, "percentage"), &["numerator", "denominator"])?;
    let scale = match DenominatorType::try_from(p.denominator)
        .map_err(|_| format!("unknown denominator {}", p.denominator))?
    {
        DenominatorType::Hundred => 10_000,
        DenominatorType::TenThousand => 100,
        DenominatorType::Million => 1,
    };
    Ok(p.numerator.saturating_mul(scale).min(1_000_000))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    // Read through `Debug` only.
    #[allow(dead_code)]
    #[derive(Debug, Default, Clone)]
    struct Inner {
        s: String,
        n: u32,
    }

    #[allow(dead_code)]
    #[derive(Debug, Clone)]
    enum Choice {
        Plain(String),
        NestedInner(Inner),
    }

    #[allow(dead_code)]
    #[derive(Debug, Default, Clone)]
    struct Outer {
        name: String,
        inner: Option<Inner>,
        list: Vec<Inner>,
        map: BTreeMap<String, String>,
        choice: Option<Choice>,
        r#match: bool,
        pair: (u8, u8),
    }

    const TRICKY: &str = "a, b: {c} [d] (e) \"f\", 'g' \\";

    #[test]
    fn debug_fields_split_at_top_level_commas_only() {
        let o = Outer {
            name: TRICKY.into(),
            inner: Some(Inner {
                s: "x, y: }".into(),
                n: 1,
            }),
            list: vec![Inner::default(), Inner::default()],
            map: [("k, \"1\"".to_string(), "v: {".to_string())].into(),
            choice: Some(Choice::Plain("),(".into())),
            r#match: true,
            pair: (1, 2),
        };
        let text = format!("{o:?}");
        let fields = debug_fields(&text);
        let names: Vec<&str> = fields.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            ["name", "inner", "list", "map", "choice", "match", "pair"]
        );
        assert_eq!(fields[0].1, format!("{TRICKY:?}"));
        assert_eq!(fields[1].1, format!("{:?}", o.inner));
        assert_eq!(fields[3].1, format!("{:?}", o.map));
        assert_eq!(fields[4].1, format!("{:?}", o.choice));
        assert_eq!(fields[6].1, "(1, 2)");
        assert!(debug_fields("Unit").is_empty());
    }

    #[test]
    fn set_fields_names_what_differs_from_the_default() {
        assert!(set_fields(&Outer::default(), &[]).is_empty());
        let o = Outer {
            name: TRICKY.into(),
            list: vec![Inner::default()],
            pair: (0, 1),
            ..Default::default()
        };
        assert_eq!(set_fields(&o, &[]), ["name", "list", "pair"]);
        assert_eq!(set_fields(&o, &["name", "pair"]), ["list"]);
        // A set value equal to the default's is not set; `Some(default)` is.
        let o = Outer {
            inner: Some(Inner::default()),
            ..Default::default()
        };
        assert_eq!(set_fields(&o, &[]), ["inner"]);
        // Raw identifiers lose their `r#`; maps count when not empty.
        let o = Outer {
            r#match: true,
            map: [("{".to_string(), "}".to_string())].into(),
            ..Default::default()
        };
        assert_eq!(set_fields(&o, &[]), ["map", "match"]);
        assert!(set_fields(&o, &["map", "match"]).is_empty());
    }

    #[test]
    fn an_unexpected_rendering_counts_as_set() {
        let default = [("a", "1"), ("c", "3")].map(|(n, v)| (n.to_string(), v.to_string()));
        assert_eq!(changed("X { a: 1, c: 4 }", &default), [("c", "4")]);
        // `b` where `c` was expected: compared field by field, the misplaced one is set.
        assert_eq!(changed("X { a: 1, b: 3 }", &default), [("b", "3")]);
        assert_eq!(changed("X { a: 1, c: 3, d: 4 }", &default), [("d", "4")]);
    }

    #[test]
    fn a_set_oneof_is_named_by_its_variant() {
        let o = Outer {
            choice: Some(Choice::NestedInner(Inner {
                s: "Some(X(".into(),
                n: 2,
            })),
            ..Default::default()
        };
        assert_eq!(set_fields(&o, &[]), ["nested_inner"]);
        let o = Outer {
            choice: Some(Choice::Plain(String::new())),
            ..Default::default()
        };
        assert_eq!(set_fields(&o, &[]), ["plain"]);
        assert_eq!(variant(&Choice::Plain("a".into())), "plain");
        // Optional messages and enums are not oneofs.
        assert_eq!(
            oneof_variant("Some(Duration { seconds: 1, nanos: 0 })"),
            None
        );
        assert_eq!(oneof_variant("Some(V4Only)"), None);
        assert_eq!(oneof_variant("Some(\"Abc(\")"), None);
    }

    #[test]
    fn envoy_messages_are_checked_by_their_envoy_field_names() {
        let mut c = EnvoyCluster {
            name: "a".into(),
            dns_lookup_family: cluster::DnsLookupFamily::V4Only as i32,
            lb_config: Some(cluster::LbConfig::RingHashLbConfig(Default::default())),
            ..Default::default()
        };
        c.typed_extension_protocol_options
            .insert("x".into(), Any::default());
        assert_eq!(
            set_fields(&c, &["name"]),
            [
                "typed_extension_protocol_options",
                "dns_lookup_family",
                "ring_hash_lb_config"
            ]
        );
        assert_eq!(
            only(
                &c,
                "",
                &["name", "lb_config", "typed_extension_protocol_options"]
            ),
            Err("field `dns_lookup_family` is not supported by Hypha".into())
        );
        let ra = RouteAction {
            idle_timeout: Some(Default::default()),
            cluster_specifier: Some(route_action::ClusterSpecifier::ClusterHeader("x-c".into())),
            ..Default::default()
        };
        assert_eq!(
            only(&ra, "route", &[]),
            Err(
                "fields `route.idle_timeout`, `route.cluster_header` are not supported by Hypha"
                    .into()
            )
        );
    }
}
