//! The proxy's own inbound side: `inbound|<port>||` clusters and the `virtualInbound` listener.

use std::collections::BTreeMap;
use std::net::IpAddr;

use envoy_types::pb::envoy::config::cluster::v3::{cluster, Cluster};
use envoy_types::pb::envoy::config::core::v3::TrafficDirection;
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, LocalityLbEndpoints};
use envoy_types::pb::envoy::config::listener::v3::{filter, Filter, FilterChain, FilterChainMatch};
use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, VirtualHost};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::RouteSpecifier,
};
use hypha_config::security::MtlsMode;
use hypha_xds::Resource as XdsResource;

use super::cluster::upstream_http_options;
use super::endpoint::lb_endpoint;
use super::listener::{hcm_base, tcp_chain};
use super::{Translation, PASSTHROUGH, VIRTUAL_INBOUND_PORT};
use crate::envoy::{self, any, boolv, secs, u32v};
use crate::registry::Protocol;
use crate::routes::catch_all;
use hypha_xds::ProxyInfo;

impl Translation {
    /// The proxy's own instances: inbound clusters and the `virtualInbound` listener.
    pub(super) fn inbound(&self, proxy: &ProxyInfo) -> Vec<XdsResource> {
        let mine = self
            .registry
            .workloads_of(&proxy.namespace, &proxy.workload_name, &proxy.ips);
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
            for s in self.registry.services_backed_by(w) {
                for p in &s.ports {
                    ports.entry(w.port_for(p)).or_insert(p.protocol);
                }
            }
        }
        let mut out = Vec::new();
        let mut chains = Vec::new();
        let labels = &proxy.labels;
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
                let mut h = hcm_base(&format!("inbound_0.0.0.0_{port}"));
                h.route_specifier = Some(RouteSpecifier::RouteConfig(rc));
                // Authorization runs first: a denied request goes no further.
                let rbac = crate::authz::rbac(&self.cfg, &proxy.namespace, labels, false);
                h.http_filters
                    .splice(0..0, crate::authz::http_filters(rbac));
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
                let rbac = crate::authz::rbac(&self.cfg, &proxy.namespace, labels, true);
                chain
                    .filters
                    .splice(0..0, crate::authz::network_filters(rbac));
                chain
            };
            let mode = if self.mtls {
                crate::mtls::mode(&self.cfg, &proxy.namespace, labels, port)
            } else {
                MtlsMode::Disable
            };
            // PERMISSIVE: a TLS chain and a plaintext one, told apart by the first bytes;
            // STRICT: TLS only (plaintext is refused); DISABLE: plaintext only.
            if matches!(mode, MtlsMode::Permissive | MtlsMode::Strict) {
                let mut tls = chain.clone();
                tls.name = format!("{}_mtls", chain.name);
                if let Some(m) = &mut tls.filter_chain_match {
                    m.transport_protocol = "tls".into();
                }
                tls.transport_socket = Some(crate::mtls::downstream());
                chains.push(tls);
            }
            if matches!(mode, MtlsMode::Permissive | MtlsMode::Disable) {
                let mut plain = chain;
                if mode == MtlsMode::Permissive {
                    if let Some(m) = &mut plain.filter_chain_match {
                        m.transport_protocol = "raw_buffer".into();
                    }
                }
                chains.push(plain);
            }
        }
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
        vi.default_filter_chain = Some(tcp_chain("virtualInbound-catchall-tcp", PASSTHROUGH));
        out.push(XdsResource::encode("virtualInbound", &vi));
        out
    }
}
