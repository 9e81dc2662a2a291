//! Outbound clusters with the DestinationRule policy they carry (load balancer, connection
//! pool, outlier detection, TLS), and `PassthroughCluster`.

use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::{
    circuit_breakers::Thresholds, cluster, CircuitBreakers, Cluster,
    OutlierDetection as EnvoyOutlier,
};
use envoy_types::pb::envoy::config::core::v3::{
    Http1ProtocolOptions, Http2ProtocolOptions, HttpProtocolOptions as CoreHttpOptions,
};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, LocalityLbEndpoints};
use envoy_types::pb::envoy::config::route::v3::route_action::{hash_policy, HashPolicy};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    http_protocol_options::{
        explicit_http_config::ProtocolConfig, ExplicitHttpConfig, UpstreamProtocolOptions,
    },
    HttpProtocolOptions,
};
use hypha_config::networking::{
    ClientTlsSettings, ConnectionPoolSettings, DestinationRule, LoadBalancerSettings, Location,
    OutlierDetection, Resolution, SimpleLb, TlsMode, TrafficPolicy,
};
use hypha_config::security::MtlsMode;
use hypha_xds::Resource as XdsResource;

use super::endpoint::{lb_endpoint, load_assignment};
use super::{lock, ClusterKey, ClusterPair, Outbound, Translation, PASSTHROUGH};
use crate::envoy::{self, any, secs, u32v};
use crate::registry::{Endpoint, Port, Protocol, Service};

/// `outbound|<port>|<subset>|<host>`.
pub fn outbound_cluster_name(host: &str, port: u32, subset: Option<&str>) -> String {
    format!("outbound|{port}|{}|{host}", subset.unwrap_or(""))
}

impl Translation {
    /// The Cluster (and its ClusterLoadAssignment, for EDS) of one service port and subset
    /// under one DestinationRule, built once per generation and shared by every namespace
    /// that sees the same rule for the service.
    pub(super) fn cached_cluster(
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
        let built = self.carried_cluster(s, &key).unwrap_or_else(|| {
            let name = outbound_cluster_name(&s.hostname, port.number, subset);
            let dr = dr.map(|i| &self.cfg.destination_rules[i].spec);
            let policy = dr.map(|d| effective_policy(d, port.number, subset));
            let (c, cla) = self.cluster(&name, s, port, subset, dr, policy.as_ref());
            (
                Arc::new(XdsResource::encode(name.clone(), &c)),
                cla.map(|cla| Arc::new(XdsResource::encode(name, &cla))),
            )
        });
        lock(&self.clusters).insert(key, built.clone());
        built
    }

    /// The cluster the generation before built for the same service port, subset and
    /// DestinationRule, if nothing it was built from changed: the mesh, PeerAuthentications
    /// and DestinationRules (the same list, so the rule index means the same rule) and the
    /// service with its endpoints.
    fn carried_cluster(&self, s: &Service, key: &ClusterKey) -> Option<ClusterPair> {
        let before = self.before();
        let before = before.as_ref().filter(|b| b.same_policy)?;
        let old = before.t.registry.index_of(&s.hostname, &s.namespace)?;
        if before.t.registry.services[old] != *s {
            return None;
        }
        let old_key = (old, key.1, key.2.clone(), key.3);
        let hit = lock(&before.t.clusters).get(&old_key).cloned();
        hit
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
        let h2 = port.protocol == Protocol::Http2
            || http.and_then(|h| h.h2_upgrade_policy.as_deref()) == Some("UPGRADE");
        if port.protocol.is_http() {
            c.typed_extension_protocol_options.insert(
                envoy::UPSTREAM_HTTP_OPTIONS.into(),
                any(&upstream_http_options(h2, pool)),
            );
        }
        if let Some(od) = policy.and_then(|p| p.outlier_detection.as_ref()) {
            c.outlier_detection = Some(outlier(od));
        }
        let eds = c.eds_cluster_config.is_some();
        let tls = policy.and_then(|p| p.tls.as_ref());
        if let Some(t) = tls.filter(|t| matches!(t.mode, Some(TlsMode::Simple | TlsMode::Mutual))) {
            // Origination to a server that speaks TLS itself, inside the mesh or out.
            let alpn: &[&str] = if port.protocol.is_http() && h2 {
                &["h2"]
            } else {
                &[]
            };
            c.transport_socket = Some(crate::mtls::origination(t, &s.hostname, alpn));
        } else if self.mtls && eds && mesh_internal {
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
            let mesh = crate::mtls::upstream(&ids, alpn, &sni);
            match tls.and_then(|t| t.mode) {
                Some(TlsMode::Disable) => {}
                Some(TlsMode::IstioMutual) => c.transport_socket = Some(mesh),
                _ => c.transport_socket_matches = crate::mtls::auto_matches(mesh),
            }
        }
        (c, eds.then_some(cla))
    }
}

impl Outbound<'_> {
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

pub(super) fn upstream_http_options(
    h2: bool,
    pool: Option<&ConnectionPoolSettings>,
) -> HttpProtocolOptions {
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

pub(super) fn passthrough_cluster() -> Cluster {
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
