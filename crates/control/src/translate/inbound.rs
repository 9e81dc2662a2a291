//! The proxy's own inbound side: `inbound|<port>||` clusters, `InboundPassthroughCluster` and
//! the `virtualInbound` listener (a chain per declared port, passthrough chains for the rest).

use std::collections::BTreeMap;
use std::net::IpAddr;

use envoy_types::pb::envoy::config::cluster::v3::{cluster, Cluster};
use envoy_types::pb::envoy::config::core::v3::{
    socket_address, BindConfig, ExtraSourceAddress, SocketAddress, TrafficDirection,
};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, LocalityLbEndpoints};
use envoy_types::pb::envoy::config::listener::v3::{filter, Filter, FilterChain, FilterChainMatch};
use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, VirtualHost};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::RouteSpecifier,
};
use hypha_config::security::MtlsMode;
use hypha_xds::Resource as XdsResource;

use super::cluster::{passthrough_cluster, upstream_http_options};
use super::endpoint::lb_endpoint;
use super::listener::{hcm_base, tcp_chain};
use super::{
    Translation, BLACKHOLE, INBOUND_PASSTHROUGH, INBOUND_PASSTHROUGH_SOURCE_V4,
    INBOUND_PASSTHROUGH_SOURCE_V6, VIRTUAL_INBOUND_PORT,
};
use crate::envoy::{self, any, boolv, secs, u32v};
use crate::registry::Protocol;
use crate::routes::catch_all;
use hypha_xds::ProxyInfo;

impl Translation {
    /// The proxy's own instances: inbound clusters and the `virtualInbound` listener.
    pub(super) fn inbound(&self, proxy: &ProxyInfo) -> Vec<XdsResource> {
        let mine = self
            .registry
            .workloads_of(&proxy.namespace, proxy.instance(), &proxy.ips);
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
            for (s, entry) in self.registry.services_backed_by(w) {
                for p in &s.ports {
                    ports.entry(entry.port_for(p)).or_insert(p.protocol);
                }
            }
        }
        let mut out = Vec::new();
        let mut chains = Vec::new();
        let labels = &proxy.labels;
        let ns = &proxy.namespace;
        // Authorization runs first on every chain: a denied request or connection goes no
        // further. The same policies, as HTTP rules and as TCP rules.
        let http_rbac =
            crate::authz::http_filters(crate::authz::rbac(&self.cfg, ns, labels, false));
        let tcp_rbac =
            crate::authz::network_filters(crate::authz::rbac(&self.cfg, ns, labels, true));
        let mode_of = |port: Option<u32>| match port {
            _ if !self.mtls => MtlsMode::Disable,
            Some(port) => crate::mtls::mode(&self.cfg, ns, labels, port),
            None => crate::mtls::workload_mode(&self.cfg, ns, labels),
        };
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
                let mut h = hcm_base(&format!("inbound_0.0.0.0_{port}"), self.normalization());
                h.route_specifier = Some(RouteSpecifier::RouteConfig(rc));
                h.http_filters.splice(0..0, http_rbac.iter().cloned());
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
                chain.filters.splice(0..0, tcp_rbac.iter().cloned());
                chain
            };
            by_mode(chain, mode_of(Some(port)), &mut chains);
        }
        // Istio's passthrough chains: what arrives for a port no service declares goes, under
        // the workload's mutual-TLS mode and its TCP authorization rules, to where it was
        // going (the pod's address, from 127.0.0.6 / ::6), never to loopback. A port that the
        // workload's PeerAuthentication names in `portLevelMtls` gets chains of its own.
        let passthrough = |name: &str, port: Option<u32>| {
            let mut chain = tcp_chain(name, INBOUND_PASSTHROUGH);
            chain.filter_chain_match = Some(FilterChainMatch {
                destination_port: port.map(u32v),
                ..Default::default()
            });
            chain.filters.splice(0..0, tcp_rbac.iter().cloned());
            chain
        };
        for port in crate::mtls::port_level_ports(&self.cfg, ns, labels) {
            if !ports.contains_key(&port) && port != VIRTUAL_INBOUND_PORT {
                let chain = passthrough(&format!("virtualInbound-passthrough-{port}"), Some(port));
                by_mode(chain, mode_of(Some(port)), &mut chains);
            }
        }
        by_mode(
            passthrough("virtualInbound-passthrough", None),
            mode_of(None),
            &mut chains,
        );
        // A connection to the capture port itself would be handed back to it for ever.
        let mut blackhole = tcp_chain("virtualInbound-blackhole", BLACKHOLE);
        blackhole.filter_chain_match = Some(FilterChainMatch {
            destination_port: Some(u32v(VIRTUAL_INBOUND_PORT)),
            ..Default::default()
        });
        chains.insert(0, blackhole);
        out.push(XdsResource::encode(
            INBOUND_PASSTHROUGH,
            &inbound_passthrough_cluster(),
        ));
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
        out.push(XdsResource::encode("virtualInbound", &vi));
        out
    }
}

/// A chain as PeerAuthentication `mode` has it: PERMISSIVE, a TLS chain and a plaintext one,
/// told apart by the first bytes; STRICT, TLS only (plaintext is refused); DISABLE, plaintext
/// only.
fn by_mode(chain: FilterChain, mode: MtlsMode, chains: &mut Vec<FilterChain>) {
    if matches!(mode, MtlsMode::Permissive | MtlsMode::Strict) {
        let mut tls = chain.clone();
        tls.name = format!("{}_mtls", chain.name);
        tls.filter_chain_match
            .get_or_insert_with(Default::default)
            .transport_protocol = "tls".into();
        tls.transport_socket = Some(crate::mtls::downstream());
        chains.push(tls);
    }
    if matches!(mode, MtlsMode::Permissive | MtlsMode::Disable) {
        let mut plain = chain;
        if mode == MtlsMode::Permissive {
            plain
                .filter_chain_match
                .get_or_insert_with(Default::default)
                .transport_protocol = "raw_buffer".into();
        }
        chains.push(plain);
    }
}

/// Istio's `InboundPassthroughCluster`: to the connection's original destination, from a
/// source address of its own (127.0.0.6, or ::6 for IPv6), which the capture rules leave
/// alone and the app can tell from its own loopback clients.
fn inbound_passthrough_cluster() -> Cluster {
    let source = |ip: &str| SocketAddress {
        address: ip.into(),
        port_specifier: Some(socket_address::PortSpecifier::PortValue(0)),
        ..Default::default()
    };
    Cluster {
        name: INBOUND_PASSTHROUGH.into(),
        upstream_bind_config: Some(BindConfig {
            source_address: Some(source(INBOUND_PASSTHROUGH_SOURCE_V4)),
            extra_source_addresses: vec![ExtraSourceAddress {
                address: Some(source(INBOUND_PASSTHROUGH_SOURCE_V6)),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..passthrough_cluster()
    }
}
