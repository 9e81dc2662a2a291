//! Validate step: checks every value and cross-reference of a loaded [`Config`] and records
//! every problem (never only the first) with its field path. Istio features Hypha does not
//! implement yet are reported as warnings, so nothing is silently ignored.
//!
//! This module holds the entry point, the cross-reference indexes (service hosts and ports,
//! DestinationRule subsets), the duplicate-name check and the checks several kinds share (hosts,
//! ports, addresses and CIDRs, DNS names). Each kind's own checks are in a submodule:
//! - `mesh`: MeshConfig (trust domain, IP families, signers and their keys, tenants)
//! - `service_entry`: ServiceEntry and WorkloadEntry
//! - `virtual_service`: VirtualService (HTTP, TLS and TCP routes)
//! - `destination_rule`: DestinationRule (subsets, traffic policies)
//! - `authorization`: AuthorizationPolicy
//! - `peer_authentication`: PeerAuthentication

mod authorization;
mod destination_rule;
pub use destination_rule::needs_the_ca;
mod mesh;
mod peer_authentication;
mod service_entry;
mod virtual_service;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use crate::diag::{Diagnostics, Source};
use crate::{Config, Resource};

/// Validates `cfg`, appending every problem to `diags`.
pub fn validate(cfg: &Config, diags: &mut Diagnostics) {
    let v = Validator::new(cfg);
    v.mesh(diags);
    v.duplicates(diags);
    for se in cfg.service_entries.iter().filter(|r| !r.source.derived) {
        v.service_entry(se, diags);
    }
    for we in cfg.workload_entries.iter().filter(|r| !r.source.derived) {
        v.workload_entry_resource(we, diags);
    }
    for vs in &cfg.virtual_services {
        v.virtual_service(vs, diags);
    }
    for dr in &cfg.destination_rules {
        v.destination_rule(dr, diags);
    }
    for ap in &cfg.authorization_policies {
        v.authorization_policy(ap, diags);
    }
    for pa in &cfg.peer_authentications {
        v.peer_authentication(pa, diags);
    }
}

/// The cross-reference indexes every kind's checks consult. Each submodule adds the methods for
/// its kind in an `impl` block of its own.
struct Validator<'a> {
    cfg: &'a Config,
    /// Every service host (fully qualified) with its port numbers.
    hosts: HashMap<String, Vec<u32>>,
    /// Subset names per fully qualified host, from every DestinationRule.
    subsets: HashMap<String, HashSet<&'a str>>,
}

impl<'a> Validator<'a> {
    fn new(cfg: &'a Config) -> Self {
        let mut hosts: HashMap<String, Vec<u32>> = HashMap::new();
        for se in &cfg.service_entries {
            for h in &se.spec.hosts {
                let e = hosts.entry(cfg.resolve_host(h, &se.namespace)).or_default();
                e.extend(se.spec.ports.iter().map(|p| p.number));
            }
        }
        let mut subsets: HashMap<String, HashSet<&str>> = HashMap::new();
        for dr in &cfg.destination_rules {
            let e = subsets
                .entry(cfg.resolve_host(&dr.spec.host, &dr.namespace))
                .or_default();
            e.extend(dr.spec.subsets.iter().map(|s| s.name.as_str()));
        }
        Validator {
            cfg,
            hosts,
            subsets,
        }
    }

    /// Ports of the service `host` names, matching wildcard service hosts too.
    fn service_ports(&self, host: &str) -> Option<&Vec<u32>> {
        self.hosts.get(host).or_else(|| {
            self.hosts
                .iter()
                .find(|(h, _)| {
                    h.strip_prefix('*')
                        .is_some_and(|suffix| host.ends_with(suffix) && host.len() > suffix.len())
                })
                .map(|(_, p)| p)
        })
    }

    /// Whether `host` names a service, or is a wildcard covering one.
    fn names_a_service(&self, host: &str) -> bool {
        self.service_ports(host).is_some()
            || (host.starts_with('*') && self.hosts.keys().any(|h| host_covers(host, h)))
    }

    /// The subsets of the DestinationRules that apply to `host`: those naming it exactly, else
    /// those of the most specific wildcard covering it (the control plane's order).
    fn subsets_of(&self, host: &str) -> Option<&HashSet<&'a str>> {
        self.subsets.get(host).or_else(|| {
            self.subsets
                .iter()
                .filter(|(h, _)| h.starts_with('*') && host_covers(h, host))
                .max_by_key(|(h, _)| h.len())
                .map(|(_, s)| s)
        })
    }

    fn duplicates(&self, diags: &mut Diagnostics) {
        fn check<T>(kind: &str, items: &[Resource<T>], diags: &mut Diagnostics) {
            let mut seen: HashMap<String, &Source> = HashMap::new();
            for r in items.iter().filter(|r| !r.source.derived) {
                if let Some(first) = seen.insert(r.key(), &r.source) {
                    diags.error(
                        "duplicate-name",
                        &r.source,
                        "metadata.name",
                        format!(
                            "{kind} {} is defined twice; the other is at {}:{}",
                            r.key(),
                            first.file,
                            first.pos("metadata.name").line
                        ),
                    );
                }
            }
        }
        let c = self.cfg;
        check("ServiceEntry", &c.service_entries, diags);
        check("WorkloadEntry", &c.workload_entries, diags);
        check("VirtualService", &c.virtual_services, diags);
        check("DestinationRule", &c.destination_rules, diags);
        check("AuthorizationPolicy", &c.authorization_policies, diags);
        check("PeerAuthentication", &c.peer_authentications, diags);
    }
}

/// Records an error unless `p` is a valid TCP port; returns whether it is.
fn port(src: &Source, path: &str, p: u32, diags: &mut Diagnostics) -> bool {
    let ok = (1..=65535).contains(&p);
    if !ok {
        diags.error(
            "invalid-port",
            src,
            path,
            format!("port {p} is outside 1..65535"),
        );
    }
    ok
}

/// The protocol family Istio infers from a port's protocol name.
pub fn protocol_kind(p: &str) -> Option<&'static str> {
    match p.to_ascii_uppercase().as_str() {
        "HTTP" | "HTTP_PROXY" => Some("http"),
        "HTTP2" | "GRPC" | "GRPC-WEB" => Some("http2"),
        "HTTPS" | "TLS" => Some("tls"),
        "TCP" | "MONGO" | "MYSQL" | "REDIS" | "UDP" => Some("tcp"),
        _ => None,
    }
}

/// An IPv4 or IPv6 address, or a CIDR block of either family.
pub fn is_valid_cidr(s: &str) -> bool {
    match s.split_once('/') {
        None => s.parse::<IpAddr>().is_ok(),
        Some((ip, len)) => match (ip.parse::<IpAddr>(), len.parse::<u8>()) {
            (Ok(IpAddr::V4(_)), Ok(l)) => l <= 32 && !len.starts_with('+'),
            (Ok(IpAddr::V6(_)), Ok(l)) => l <= 128 && !len.starts_with('+'),
            _ => false,
        },
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_name(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// A service host: a DNS name, optionally with a leading `*.` wildcard, or `*`.
fn is_host(s: &str) -> bool {
    s == "*"
        || s.strip_prefix("*.")
            .map_or_else(|| is_dns_name(s), is_dns_name)
}

/// Whether every name `inner` stands for is one `outer` stands for: equal, or covered by
/// `outer`'s `*.` wildcard (or `*`), as Istio matches a rule's hosts against services.
pub fn host_covers(outer: &str, inner: &str) -> bool {
    outer == "*"
        || outer == inner
        || outer
            .strip_prefix('*')
            .is_some_and(|suffix| inner.ends_with(suffix) && inner.len() > suffix.len())
}

/// The numeric gRPC status for a name such as `UNAVAILABLE`.
pub fn grpc_code(name: &str) -> Option<u32> {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    NAMES
        .iter()
        .position(|n| *n == name)
        .and_then(|i| u32::try_from(i).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        for ok in [
            "10.0.0.1",
            "10.0.0.0/8",
            "::1",
            "fd00::/8",
            "0.0.0.0/0",
            "::/0",
        ] {
            assert!(is_valid_cidr(ok), "{ok}");
        }
        for bad in [
            "10.0.0.256",
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0.0/",
            "x",
            "10.0.0.0/+8",
            "::1::2",
        ] {
            assert!(!is_valid_cidr(bad), "{bad}");
        }
    }

    #[test]
    fn grpc_codes() {
        assert_eq!(grpc_code("UNAVAILABLE"), Some(14));
        assert_eq!(grpc_code("nope"), None);
    }
}
