//! Endpoints: ClusterLoadAssignments (EDS and a cluster's own `load_assignment`), their lb
//! endpoints, a DNS cluster's host names, and socket addresses.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{address, socket_address, Address, HealthStatus};
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint, ClusterLoadAssignment, Endpoint as EnvoyEndpoint,
};

use super::{decode, only, path, refuse, unsupported, unsupported_value, Refused, Result};
use crate::model::Endpoint;

const TRANSPORT_SOCKET_MATCH: &str = "envoy.transport_socket_match";

/// A ClusterLoadAssignment's endpoints.
pub fn endpoints(name: &str, bytes: &[u8]) -> std::result::Result<Arc<[Endpoint]>, Refused> {
    decode::<ClusterLoadAssignment>(bytes, "ClusterLoadAssignment")
        .and_then(|cla| endpoints_of(cla, ""))
        .map_err(refuse("endpoints", name))
}

pub(super) fn endpoints_of(cla: ClusterLoadAssignment, at: &str) -> Result<Arc<[Endpoint]>> {
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
pub(super) fn dns_targets(cla: Option<ClusterLoadAssignment>) -> Result<Arc<[(String, u16)]>> {
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

pub(super) fn socket_addr(a: Option<&Address>, at: &str) -> Result<SocketAddr> {
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
