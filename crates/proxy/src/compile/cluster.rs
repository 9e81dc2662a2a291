//! Clusters: discovery type, load balancing, upstream HTTP options, circuit breaker thresholds
//! and outlier detection, compiled into a [`model::Cluster`](crate::model::Cluster).

use std::net::IpAddr;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::{
    circuit_breakers, cluster, Cluster as EnvoyCluster, OutlierDetection,
};
use envoy_types::pb::envoy::config::core::v3::{
    socket_address, BindConfig, Http2ProtocolOptions, HttpProtocolOptions as CommonHttpOptions,
    SocketAddress,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    http_protocol_options::{explicit_http_config::ProtocolConfig, UpstreamProtocolOptions},
    HttpProtocolOptions,
};

use super::endpoint::{dns_targets, endpoints_of};
use super::tls::upstream_tls;
use super::{
    ads_source, decode, dur, only, path, refuse, typed, unsupported, unsupported_value, variant,
    Refused, Result,
};
use crate::model::{Cluster, ClusterKind, Lb, Limits, OutlierPolicy};

const UPSTREAM_HTTP_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

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
            "upstream_bind_config",
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
    let bind = match &c.upstream_bind_config {
        Some(b) if matches!(kind, ClusterKind::OriginalDst) => bind_config(b)?,
        Some(_) => {
            return Err(
                unsupported("upstream_bind_config") + " on a cluster that is not ORIGINAL_DST"
            )
        }
        None => Vec::new(),
    };
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
        bind,
    })
}

/// `upstream_bind_config`: a source address, and one more of the other family (Istio's
/// 127.0.0.6 and ::6 for the inbound passthrough cluster). Ports are the kernel's choice.
fn bind_config(b: &BindConfig) -> Result<Vec<IpAddr>> {
    const AT: &str = "upstream_bind_config";
    only(b, AT, &["source_address", "extra_source_addresses"])?;
    let source = |s: Option<&SocketAddress>, at: &str| -> Result<IpAddr> {
        let s = s.ok_or_else(|| format!("{at}: missing address"))?;
        only(s, at, &["address", "port_specifier"])?;
        match s.port_specifier {
            None | Some(socket_address::PortSpecifier::PortValue(0)) => {}
            _ => {
                return Err(unsupported_value(
                    &format!("{at}.port_specifier"),
                    "a fixed port",
                ))
            }
        }
        s.address
            .parse()
            .map_err(|_| format!("{at}: {:?} is not an IP address", s.address))
    };
    let mut out = vec![source(
        b.source_address.as_ref(),
        &path(AT, "source_address"),
    )?];
    for (i, extra) in b.extra_source_addresses.iter().enumerate() {
        let at = format!("{AT}.extra_source_addresses[{i}]");
        only(extra, &at, &["address"])?;
        let ip = source(extra.address.as_ref(), &path(&at, "address"))?;
        if out.iter().any(|o: &IpAddr| o.is_ipv4() == ip.is_ipv4()) {
            return Err(format!("{at}: a second source address of the same family"));
        }
        out.push(ip);
    }
    Ok(out)
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
