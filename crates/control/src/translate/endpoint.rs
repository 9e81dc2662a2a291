//! ClusterLoadAssignments: a cluster's endpoints by locality, with all their addresses.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::Locality;
use envoy_types::pb::envoy::config::endpoint::v3::{
    endpoint, lb_endpoint, ClusterLoadAssignment, Endpoint as EnvoyEndpoint, LbEndpoint,
    LocalityLbEndpoints,
};

use crate::envoy::{socket, u32v};
use crate::registry::{Endpoint, Port};

/// Endpoints by locality; those for which `tls` says so carry the `tlsMode: istio` metadata
/// auto mTLS matches on.
pub(super) fn load_assignment(
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

pub(super) fn lb_endpoint(
    addr: &str,
    port: u32,
    others: &[String],
    weight: Option<u32>,
) -> LbEndpoint {
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
