//! ServiceEntry and WorkloadEntry: hosts, addresses, ports, endpoints and their tenants.

use std::collections::HashSet;
use std::net::IpAddr;

use super::{is_dns_label, is_dns_name, is_host, is_valid_cidr, port, protocol_kind, Validator};
use crate::diag::{Diagnostics, Source};
use crate::networking::{Resolution, ServiceEntry, WorkloadEntry};
use crate::{Resource, ADDRESSES_ANNOTATION};

impl Validator<'_> {
    fn tenant(&self, src: &Source, namespace: &str, path: &str, diags: &mut Diagnostics) {
        if self.cfg.mesh.tenant_of(namespace).is_none() {
            diags.error(
                "no-tenant",
                src,
                path,
                format!(
                    "workload in namespace {namespace:?}, which belongs to no tenant of the MeshConfig"
                ),
            );
        }
    }

    pub(super) fn service_entry(&self, r: &Resource<ServiceEntry>, diags: &mut Diagnostics) {
        let (s, src) = (&r.spec, &r.source);
        super::destination_rule::ignored(
            src,
            "spec",
            &[("subjectAltNames", !s.subject_alt_names.is_empty())],
            diags,
        );
        if s.hosts.is_empty() {
            diags.error(
                "missing-field",
                src,
                "spec.hosts",
                "at least one host is required",
            );
        }
        for (i, h) in s.hosts.iter().enumerate() {
            if !is_host(h) {
                diags.error(
                    "invalid-host",
                    src,
                    format!("spec.hosts[{i}]"),
                    format!("{h:?} is not a valid host name"),
                );
            }
        }
        for (i, a) in s.addresses.iter().enumerate() {
            if !is_valid_cidr(a) {
                diags.error(
                    "invalid-address",
                    src,
                    format!("spec.addresses[{i}]"),
                    format!("{a:?} is not an IPv4/IPv6 address or CIDR"),
                );
            }
        }
        if s.ports.is_empty() {
            diags.error(
                "missing-field",
                src,
                "spec.ports",
                "at least one port is required",
            );
        }
        let mut numbers = HashSet::new();
        let mut names = HashSet::new();
        for (i, p) in s.ports.iter().enumerate() {
            let path = format!("spec.ports[{i}]");
            port(src, &format!("{path}.number"), p.number, diags);
            if let Some(t) = p.target_port {
                port(src, &format!("{path}.targetPort"), t, diags);
            }
            if !numbers.insert(p.number) {
                diags.error(
                    "duplicate-port",
                    src,
                    format!("{path}.number"),
                    format!("port {} is listed twice", p.number),
                );
            }
            if !p.name.is_empty() && !names.insert(p.name.as_str()) {
                diags.error(
                    "duplicate-port",
                    src,
                    format!("{path}.name"),
                    format!("port name {:?} is listed twice", p.name),
                );
            }
            if let Some(proto) = &p.protocol {
                if protocol_kind(proto).is_none() {
                    diags.error(
                        "invalid-protocol",
                        src,
                        format!("{path}.protocol"),
                        format!(
                            "unknown protocol {proto:?}; expected HTTP, HTTP2, HTTPS, GRPC, TCP, TLS or MONGO"
                        ),
                    );
                }
            }
        }
        if s.workload_selector.is_some() && !s.endpoints.is_empty() {
            diags.error(
                "exclusive-fields",
                src,
                "spec.workloadSelector",
                "only one of `workloadSelector` and `endpoints` may be set",
            );
        }
        if s.resolution == Resolution::Static
            && s.endpoints.is_empty()
            && s.workload_selector.is_none()
        {
            diags.error(
                "missing-endpoints",
                src,
                "spec.endpoints",
                "resolution STATIC needs `endpoints` or a `workloadSelector`",
            );
        }
        if !s.endpoints.is_empty() {
            self.tenant(src, &r.namespace, "spec.endpoints", diags);
        }
        let port_names: HashSet<&str> = s.ports.iter().map(|p| p.name.as_str()).collect();
        for (i, ep) in s.endpoints.iter().enumerate() {
            let path = format!("spec.endpoints[{i}]");
            workload(src, &path, ep, s.resolution == Resolution::Static, diags);
            for name in ep.ports.keys() {
                if !port_names.contains(name.as_str()) {
                    diags.error(
                        "unknown-port",
                        src,
                        format!("{path}.ports.{name}"),
                        format!("endpoint port {name:?} names no port of this ServiceEntry"),
                    );
                }
            }
        }
    }

    pub(super) fn workload_entry_resource(
        &self,
        r: &Resource<WorkloadEntry>,
        diags: &mut Diagnostics,
    ) {
        let src = &r.source;
        workload(src, "spec", &r.spec, false, diags);
        self.tenant(src, &r.namespace, "metadata.namespace", diags);
        if let Some(extra) = r.annotations.get(ADDRESSES_ANNOTATION) {
            let path = format!("metadata.annotations.{ADDRESSES_ANNOTATION}");
            let mut seen: HashSet<IpAddr> = r.spec.address.parse().into_iter().collect();
            for a in extra.split(',').map(str::trim).filter(|a| !a.is_empty()) {
                match a.parse::<IpAddr>() {
                    Ok(ip) if !seen.insert(ip) => diags.error(
                        "duplicate-address",
                        src,
                        &path,
                        format!("address {a} is listed twice"),
                    ),
                    Ok(_) => {}
                    Err(_) => diags.error(
                        "invalid-address",
                        src,
                        &path,
                        format!("{a:?} is not an IPv4 or IPv6 address"),
                    ),
                }
            }
        }
    }
}

fn workload(
    src: &Source,
    path: &str,
    w: &WorkloadEntry,
    ip_required: bool,
    diags: &mut Diagnostics,
) {
    super::destination_rule::ignored(src, path, &[("network", !w.network.is_empty())], diags);
    let ap = format!("{path}.address");
    if w.address.is_empty() {
        diags.error("missing-field", src, &ap, "`address` is required");
    } else if w.address.parse::<IpAddr>().is_err() && !w.address.starts_with("unix://") {
        if ip_required || looks_like_ip(&w.address) {
            diags.error(
                "invalid-address",
                src,
                &ap,
                format!("{:?} is not an IPv4 or IPv6 address", w.address),
            );
        } else if !is_dns_name(&w.address) {
            diags.error(
                "invalid-address",
                src,
                &ap,
                format!("{:?} is neither an IP address nor a host name", w.address),
            );
        }
    }
    for (name, p) in &w.ports {
        port(src, &format!("{path}.ports.{name}"), *p, diags);
    }
    if !w.service_account.is_empty()
        && !is_dns_label(&w.service_account)
        && !is_dns_name(&w.service_account)
    {
        diags.error(
            "invalid-name",
            src,
            format!("{path}.serviceAccount"),
            format!(
                "{:?} is not a valid service account name",
                w.service_account
            ),
        );
    }
}

fn looks_like_ip(s: &str) -> bool {
    s.contains(':') || s.chars().all(|c| c.is_ascii_digit() || c == '.')
}
