//! Validate step: checks every value and cross-reference of a loaded [`Config`] and records
//! every problem (never only the first) with its field path. Istio features Hypha does not
//! implement yet are reported as warnings, so nothing is silently ignored.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;

use crate::diag::{Diagnostics, Source};
use crate::mesh::Pkcs11Key;
use crate::networking::{
    ConnectionPoolSettings, Destination, DestinationRule, HeaderOperations, Headers, HttpRoute,
    LoadBalancerSettings, OutlierDetection, Resolution, RouteDestination, ServiceEntry,
    StringMatch, StringMatchKind, TrafficPolicy, WorkloadEntry,
};
use crate::security::{Action, AuthorizationPolicy, PeerAuthentication};
use crate::types::Percent;
use crate::{Config, Resource, ADDRESSES_ANNOTATION};

/// Validates `cfg`, appending every problem to `diags`.
pub fn validate(cfg: &Config, diags: &mut Diagnostics) {
    let v = Validator::new(cfg);
    v.mesh(diags);
    v.duplicates(diags);
    for se in &cfg.service_entries {
        v.service_entry(se, diags);
    }
    for we in &cfg.workload_entries {
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

    fn mesh(&self, diags: &mut Diagnostics) {
        let Some(src) = &self.cfg.mesh_source else {
            return;
        };
        let m = &self.cfg.mesh;
        if !is_dns_name(&m.trust_domain) {
            diags.error(
                "invalid-trust-domain",
                src,
                "spec.trustDomain",
                format!("trust domain {:?} is not a valid DNS name", m.trust_domain),
            );
        }
        if m.ip_families.is_empty() {
            diags.error(
                "ip-families",
                src,
                "spec.ipFamilies",
                "at least one IP family is required",
            );
        }
        if m.ip_families.len() == 2 && m.ip_families[0] == m.ip_families[1] {
            diags.error(
                "ip-families",
                src,
                "spec.ipFamilies[1]",
                "IP family listed twice",
            );
        }
        let mut signers = HashSet::new();
        for (i, s) in m.signers.iter().enumerate() {
            let path = format!("spec.signers[{i}]");
            if !signers.insert(s.name.as_str()) {
                diags.error(
                    "duplicate-name",
                    src,
                    format!("{path}.name"),
                    format!("signer {:?} defined twice", s.name),
                );
            }
            if s.key.file.is_some() && s.key.pkcs11.is_some() {
                diags.error(
                    "signer-key",
                    src,
                    format!("{path}.key"),
                    "a signer key is either `file` or `pkcs11`, not both",
                );
            }
            if let Some(p) = &s.key.pkcs11 {
                pkcs11_key(p, src, &format!("{path}.key.pkcs11"), diags);
            }
            if s.max_certificate_ttl.as_std().is_zero() {
                diags.error(
                    "invalid-value",
                    src,
                    format!("{path}.maxCertificateTtl"),
                    "maxCertificateTtl must be positive",
                );
            }
        }
        let tenant_names: HashSet<&str> = m.tenants.iter().map(|t| t.name.as_str()).collect();
        let mut seen_tenants = HashSet::new();
        let mut ns_owner: HashMap<&str, &str> = HashMap::new();
        for (i, t) in m.tenants.iter().enumerate() {
            let path = format!("spec.tenants[{i}]");
            if !seen_tenants.insert(t.name.as_str()) {
                diags.error(
                    "duplicate-name",
                    src,
                    format!("{path}.name"),
                    format!("tenant {:?} defined twice", t.name),
                );
            }
            if !signers.contains(t.signer.as_str()) {
                diags.error(
                    "unknown-signer",
                    src,
                    format!("{path}.signer"),
                    format!(
                        "tenant {:?} names signer {:?}, which is not in spec.signers",
                        t.name, t.signer
                    ),
                );
            }
            if t.namespaces.is_empty() {
                diags.error(
                    "empty-tenant",
                    src,
                    format!("{path}.namespaces"),
                    "a tenant needs at least one namespace",
                );
            }
            for (j, ns) in t.namespaces.iter().enumerate() {
                if let Some(other) = ns_owner.insert(ns, &t.name) {
                    diags.error(
                        "namespace-in-two-tenants",
                        src,
                        format!("{path}.namespaces[{j}]"),
                        format!("namespace {ns:?} is already in tenant {other:?}"),
                    );
                }
            }
            for (j, other) in t.trust_tenants.iter().enumerate() {
                if !tenant_names.contains(other.as_str()) {
                    diags.error(
                        "unknown-tenant",
                        src,
                        format!("{path}.trustTenants[{j}]"),
                        format!("unknown tenant {other:?}"),
                    );
                }
            }
        }
    }

    fn duplicates(&self, diags: &mut Diagnostics) {
        fn check<T>(kind: &str, items: &[Resource<T>], diags: &mut Diagnostics) {
            let mut seen: HashMap<String, &Source> = HashMap::new();
            for r in items {
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

    fn service_entry(&self, r: &Resource<ServiceEntry>, diags: &mut Diagnostics) {
        let (s, src) = (&r.spec, &r.source);
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

    fn workload_entry_resource(&self, r: &Resource<WorkloadEntry>, diags: &mut Diagnostics) {
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

    fn destination(
        &self,
        src: &Source,
        ns: &str,
        path: &str,
        d: &Destination,
        diags: &mut Diagnostics,
    ) {
        let host = self.cfg.resolve_host(&d.host, ns);
        let Some(ports) = self.service_ports(&host) else {
            diags.error(
                "unknown-host",
                src,
                format!("{path}.host"),
                format!("host {:?} ({host}) matches no ServiceEntry", d.host),
            );
            return;
        };
        if let Some(subset) = &d.subset {
            let known = self
                .subsets_of(&host)
                .is_some_and(|s| s.contains(subset.as_str()));
            if !known {
                diags.error(
                    "unknown-subset",
                    src,
                    format!("{path}.subset"),
                    format!("subset {subset:?} is not defined by any DestinationRule for {host}"),
                );
            }
        }
        if let Some(p) = &d.port {
            let pp = format!("{path}.port.number");
            if port(src, &pp, p.number, diags) && !ports.contains(&p.number) {
                diags.error(
                    "unknown-port",
                    src,
                    pp,
                    format!("{host} has no port {}", p.number),
                );
            }
        }
    }

    fn virtual_service(
        &self,
        r: &Resource<crate::networking::VirtualService>,
        diags: &mut Diagnostics,
    ) {
        let (s, src, ns) = (&r.spec, &r.source, r.namespace.as_str());
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
        if s.gateways.iter().any(|g| g != "mesh") {
            diags.warning(
                "unsupported",
                src,
                "spec.gateways",
                "gateways other than `mesh` are not supported by Hypha yet; only sidecars apply this",
            );
        }
        if s.http.is_empty() && s.tcp.is_empty() && s.tls.is_empty() {
            diags.error(
                "missing-field",
                src,
                "spec",
                "one of `http`, `tcp` or `tls` is required",
            );
        }
        for (i, route) in s.http.iter().enumerate() {
            self.http_route(src, ns, &format!("spec.http[{i}]"), route, diags);
        }
        for (i, t) in s.tls.iter().enumerate() {
            let path = format!("spec.tls[{i}]");
            if t.matches.is_empty() {
                diags.error(
                    "missing-field",
                    src,
                    format!("{path}.match"),
                    "a TLS route needs at least one match with `sniHosts`",
                );
            }
            for (j, m) in t.matches.iter().enumerate() {
                let mp = format!("{path}.match[{j}]");
                if m.sni_hosts.is_empty() {
                    diags.error(
                        "missing-field",
                        src,
                        format!("{mp}.sniHosts"),
                        "at least one server name is required",
                    );
                }
                for (k, h) in m.sni_hosts.iter().enumerate() {
                    let at = format!("{mp}.sniHosts[{k}]");
                    if h == "*" || !is_host(h) {
                        diags.error(
                            "invalid-host",
                            src,
                            at,
                            format!("{h:?} is not a server name (a DNS name, or `*.` and one)"),
                        );
                    } else if !s.hosts.iter().any(|vh| {
                        host_covers(
                            &self.cfg.resolve_host(vh, ns),
                            &self.cfg.resolve_host(h, ns),
                        )
                    }) {
                        diags.error(
                            "sni-host",
                            src,
                            at,
                            format!("server name {h:?} is not one of the VirtualService's hosts"),
                        );
                    }
                }
                self.l4_match(
                    src,
                    &mp,
                    (m.port, &m.destination_subnets),
                    (&m.source_labels, m.source_namespace.is_some(), &m.gateways),
                    diags,
                );
            }
            self.l4_route(src, ns, &path, &t.route, diags);
        }
        for (i, t) in s.tcp.iter().enumerate() {
            let path = format!("spec.tcp[{i}]");
            for (j, m) in t.matches.iter().enumerate() {
                self.l4_match(
                    src,
                    &format!("{path}.match[{j}]"),
                    (m.port, &m.destination_subnets),
                    (&m.source_labels, m.source_namespace.is_some(), &m.gateways),
                    diags,
                );
            }
            self.l4_route(src, ns, &path, &t.route, diags);
        }
    }

    /// The parts of a TCP or TLS route's match that are checked the same way: the port and the
    /// destination subnets (checked), and what sidecars do not select on yet (warned).
    fn l4_match(
        &self,
        src: &Source,
        path: &str,
        (port_number, subnets): (Option<u32>, &[String]),
        (labels, source_namespace, gateways): (&BTreeMap<String, String>, bool, &[String]),
        diags: &mut Diagnostics,
    ) {
        for (k, c) in subnets.iter().enumerate() {
            if !is_valid_cidr(c) {
                diags.error(
                    "invalid-cidr",
                    src,
                    format!("{path}.destinationSubnets[{k}]"),
                    format!("{c:?} is not an IPv4/IPv6 address or CIDR"),
                );
            }
        }
        if let Some(p) = port_number {
            port(src, &format!("{path}.port"), p, diags);
        }
        let unsupported = [
            ("destinationSubnets", !subnets.is_empty()),
            ("sourceLabels", !labels.is_empty()),
            ("sourceNamespace", source_namespace),
            ("gateways", gateways.iter().any(|g| g != "mesh")),
        ];
        for (field, set) in unsupported {
            if set {
                diags.warning(
                    "unsupported",
                    src,
                    format!("{path}.{field}"),
                    format!("`{field}` on a TCP or TLS match is not supported by Hypha yet; the match applies without it"),
                );
            }
        }
    }

    /// A TCP or TLS route's destinations.
    fn l4_route(
        &self,
        src: &Source,
        ns: &str,
        path: &str,
        route: &[RouteDestination],
        diags: &mut Diagnostics,
    ) {
        if route.is_empty() {
            diags.error(
                "missing-field",
                src,
                format!("{path}.route"),
                "at least one destination is required",
            );
        }
        let weights: Vec<Option<i64>> = route.iter().map(|d| d.weight).collect();
        self.weights(src, path, &weights, diags);
        for (j, d) in route.iter().enumerate() {
            self.destination(
                src,
                ns,
                &format!("{path}.route[{j}].destination"),
                &d.destination,
                diags,
            );
        }
    }

    fn weights(&self, src: &Source, path: &str, weights: &[Option<i64>], diags: &mut Diagnostics) {
        let mut bad = false;
        for (j, w) in weights.iter().enumerate() {
            if let Some(w) = *w {
                if !(0..=100).contains(&w) {
                    bad = true;
                    diags.error(
                        "invalid-weight",
                        src,
                        format!("{path}.route[{j}].weight"),
                        format!("weight {w} is outside 0..100"),
                    );
                }
            }
        }
        if weights.len() > 1 && !bad {
            let sum: i64 = weights.iter().map(|w| w.unwrap_or(0)).sum();
            if sum != 100 {
                let last = weights.len() - 1;
                diags.error(
                    "weights-sum",
                    src,
                    format!("{path}.route[{last}].weight"),
                    format!("route weights sum to {sum}, not 100"),
                );
            }
        }
    }

    fn http_route(
        &self,
        src: &Source,
        ns: &str,
        path: &str,
        r: &HttpRoute,
        diags: &mut Diagnostics,
    ) {
        let actions = usize::from(!r.route.is_empty())
            + usize::from(r.redirect.is_some())
            + usize::from(r.direct_response.is_some())
            + usize::from(r.delegate.is_some());
        if actions != 1 {
            diags.error(
                "route-action",
                src,
                path,
                "exactly one of `route`, `redirect`, `directResponse` or `delegate` is required",
            );
        }
        let unsupported = [
            ("delegate", r.delegate.is_some()),
            ("mirror", r.mirror.is_some()),
            ("mirrors", r.mirrors.is_some()),
            ("mirrorPercentage", r.mirror_percentage.is_some()),
            ("mirrorPercent", r.mirror_percent.is_some()),
            ("corsPolicy", r.cors_policy.is_some()),
        ];
        for (field, set) in unsupported {
            if set {
                diags.warning(
                    "unsupported",
                    src,
                    format!("{path}.{field}"),
                    format!("`{field}` is not supported by Hypha yet; ignored"),
                );
            }
        }
        for (j, m) in r.matches.iter().enumerate() {
            let mp = format!("{path}.match[{j}]");
            for (field, sm) in [
                ("uri", &m.uri),
                ("scheme", &m.scheme),
                ("method", &m.method),
                ("authority", &m.authority),
            ] {
                if let Some(sm) = sm {
                    string_match(src, &format!("{mp}.{field}"), sm, false, diags);
                }
            }
            for (field, map) in [
                ("headers", &m.headers),
                ("withoutHeaders", &m.without_headers),
            ] {
                for (name, sm) in map {
                    let hp = format!("{mp}.{field}.{name}");
                    header_name(src, &hp, name, diags);
                    string_match(src, &hp, sm, true, diags);
                }
            }
            for (name, sm) in &m.query_params {
                let qp = format!("{mp}.queryParams.{name}");
                string_match(src, &qp, sm, false, diags);
                if sm.prefix.is_some() {
                    diags.error(
                        "invalid-match",
                        src,
                        qp,
                        "query parameters match by `exact` or `regex` only",
                    );
                }
            }
            if let Some(p) = m.port {
                port(src, &format!("{mp}.port"), p, diags);
            }
            if !m.gateways.is_empty() {
                diags.warning(
                    "unsupported",
                    src,
                    format!("{mp}.gateways"),
                    "gateway matches are not supported by Hypha yet",
                );
            }
        }
        let weights: Vec<Option<i64>> = r.route.iter().map(|d| d.weight).collect();
        self.weights(src, path, &weights, diags);
        for (j, d) in r.route.iter().enumerate() {
            let dp = format!("{path}.route[{j}]");
            self.destination(src, ns, &format!("{dp}.destination"), &d.destination, diags);
            if let Some(h) = &d.headers {
                headers(src, &format!("{dp}.headers"), h, diags);
            }
        }
        if let Some(h) = &r.headers {
            headers(src, &format!("{path}.headers"), h, diags);
        }
        if let Some(rd) = &r.redirect {
            let rp = format!("{path}.redirect");
            if let Some(code) = rd.redirect_code {
                if ![301, 302, 303, 307, 308].contains(&code) {
                    diags.error(
                        "invalid-value",
                        src,
                        format!("{rp}.redirectCode"),
                        format!("redirect code {code} is not one of 301, 302, 303, 307, 308"),
                    );
                }
            }
            if let Some(p) = rd.port {
                port(src, &format!("{rp}.port"), p, diags);
            }
            if let Some(dp) = &rd.derive_port {
                if dp != "FROM_PROTOCOL_DEFAULT" && dp != "FROM_REQUEST_PORT" {
                    diags.error(
                        "invalid-value",
                        src,
                        format!("{rp}.derivePort"),
                        format!(
                            "derivePort {dp:?} is not FROM_PROTOCOL_DEFAULT or FROM_REQUEST_PORT"
                        ),
                    );
                }
                if rd.port.is_some() {
                    diags.error(
                        "exclusive-fields",
                        src,
                        format!("{rp}.derivePort"),
                        "only one of `port` and `derivePort` may be set",
                    );
                }
            }
            if let Some(s) = &rd.scheme {
                if s != "http" && s != "https" {
                    diags.error(
                        "invalid-value",
                        src,
                        format!("{rp}.scheme"),
                        format!("scheme {s:?} is not http or https"),
                    );
                }
            }
        }
        if let Some(dr) = &r.direct_response {
            let dp = format!("{path}.directResponse");
            if !(200..=599).contains(&dr.status) {
                diags.error(
                    "invalid-status",
                    src,
                    format!("{dp}.status"),
                    format!("status {} is outside 200..599", dr.status),
                );
            }
            if let Some(b) = &dr.body {
                if b.string.is_some() == b.bytes.is_some() {
                    diags.error(
                        "exclusive-fields",
                        src,
                        format!("{dp}.body"),
                        "exactly one of `string` and `bytes` is required",
                    );
                }
                if let Some(bytes) = &b.bytes {
                    if !is_base64(bytes) {
                        diags.error(
                            "invalid-value",
                            src,
                            format!("{dp}.body.bytes"),
                            "`bytes` must be base64",
                        );
                    }
                }
            }
        }
        if let Some(rw) = &r.rewrite {
            let rp = format!("{path}.rewrite");
            if rw.uri.is_some() && rw.uri_regex_rewrite.is_some() {
                diags.error(
                    "exclusive-fields",
                    src,
                    format!("{rp}.uriRegexRewrite"),
                    "only one of `uri` and `uriRegexRewrite` may be set",
                );
            }
            if let Some(rr) = &rw.uri_regex_rewrite {
                rewrite_regex(
                    src,
                    &format!("{rp}.uriRegexRewrite.match"),
                    &rr.pattern,
                    diags,
                );
            }
            if r.redirect.is_some() {
                diags.error(
                    "exclusive-fields",
                    src,
                    rp,
                    "`rewrite` cannot be used with `redirect`",
                );
            }
        }
        if let Some(rt) = &r.retries {
            let rp = format!("{path}.retries");
            if rt.attempts < 0 {
                diags.error(
                    "invalid-value",
                    src,
                    format!("{rp}.attempts"),
                    "attempts must not be negative",
                );
            }
            if let Some(on) = &rt.retry_on {
                for cond in on.split(',').map(str::trim) {
                    if !is_retry_on(cond) {
                        diags.error(
                            "invalid-retry-on",
                            src,
                            format!("{rp}.retryOn"),
                            format!("unknown retry condition {cond:?}"),
                        );
                    }
                }
            }
            if let (Some(per_try), Some(total)) = (rt.per_try_timeout, r.timeout) {
                if !total.as_std().is_zero() && per_try > total {
                    diags.warning(
                        "timeouts",
                        src,
                        format!("{rp}.perTryTimeout"),
                        "perTryTimeout is longer than the route timeout",
                    );
                }
            }
        }
        if let Some(f) = &r.fault {
            let fp = format!("{path}.fault");
            if let Some(d) = &f.delay {
                if d.fixed_delay.is_none() {
                    diags.error(
                        "missing-field",
                        src,
                        format!("{fp}.delay"),
                        "`fixedDelay` is required",
                    );
                }
                if d.exponential_delay.is_some() {
                    diags.warning(
                        "unsupported",
                        src,
                        format!("{fp}.delay.exponentialDelay"),
                        "exponentialDelay is not supported; ignored",
                    );
                }
                percent(src, &format!("{fp}.delay.percentage"), d.percentage, diags);
                if let Some(p) = d.percent {
                    if !(0..=100).contains(&p) {
                        diags.error(
                            "invalid-percent",
                            src,
                            format!("{fp}.delay.percent"),
                            format!("percent {p} is outside 0..100"),
                        );
                    }
                }
            }
            if let Some(a) = &f.abort {
                let ap = format!("{fp}.abort");
                let kinds = usize::from(a.http_status.is_some())
                    + usize::from(a.grpc_status.is_some())
                    + usize::from(a.http2_error.is_some());
                if kinds != 1 {
                    diags.error(
                        "exclusive-fields",
                        src,
                        &ap,
                        "exactly one of `httpStatus`, `grpcStatus` or `http2Error` is required",
                    );
                }
                if let Some(s) = a.http_status {
                    if !(200..=599).contains(&s) {
                        diags.error(
                            "invalid-status",
                            src,
                            format!("{ap}.httpStatus"),
                            format!("status {s} is outside 200..599"),
                        );
                    }
                }
                if let Some(g) = &a.grpc_status {
                    if grpc_code(g).is_none() {
                        diags.error(
                            "invalid-value",
                            src,
                            format!("{ap}.grpcStatus"),
                            format!("unknown gRPC status {g:?}"),
                        );
                    }
                }
                if a.http2_error.is_some() {
                    diags.warning(
                        "unsupported",
                        src,
                        format!("{ap}.http2Error"),
                        "http2Error aborts are not supported; ignored",
                    );
                }
                percent(src, &format!("{ap}.percentage"), a.percentage, diags);
            }
        }
    }

    fn destination_rule(&self, r: &Resource<DestinationRule>, diags: &mut Diagnostics) {
        let (s, src) = (&r.spec, &r.source);
        let host = self.cfg.resolve_host(&s.host, &r.namespace);
        if !is_host(&s.host) {
            diags.error(
                "invalid-host",
                src,
                "spec.host",
                format!("{:?} is not a valid host name", s.host),
            );
        } else if !self.names_a_service(&host) {
            diags.warning(
                "unknown-host",
                src,
                "spec.host",
                format!(
                    "host {:?} ({host}) matches no ServiceEntry; this rule has no effect",
                    s.host
                ),
            );
        }
        if let Some(tp) = &s.traffic_policy {
            traffic_policy(src, "spec.trafficPolicy", tp, diags);
        }
        let mut names = HashSet::new();
        for (i, sub) in s.subsets.iter().enumerate() {
            let sp = format!("spec.subsets[{i}]");
            if sub.name.is_empty() || !is_dns_label(&sub.name) {
                diags.error(
                    "invalid-name",
                    src,
                    format!("{sp}.name"),
                    format!("subset name {:?} is not a valid DNS label", sub.name),
                );
            }
            if !names.insert(sub.name.as_str()) {
                diags.error(
                    "duplicate-name",
                    src,
                    format!("{sp}.name"),
                    format!("subset {:?} is defined twice", sub.name),
                );
            }
            if let Some(tp) = &sub.traffic_policy {
                traffic_policy(src, &format!("{sp}.trafficPolicy"), tp, diags);
            }
        }
        if s.workload_selector.is_some() {
            diags.warning("unsupported", src, "spec.workloadSelector", "workloadSelector on DestinationRule is not supported yet; the rule applies to every client");
        }
    }

    fn authorization_policy(&self, r: &Resource<AuthorizationPolicy>, diags: &mut Diagnostics) {
        let (s, src) = (&r.spec, &r.source);
        if s.action == Action::Custom {
            if s.provider.is_none() {
                diags.error(
                    "missing-field",
                    src,
                    "spec.provider",
                    "action CUSTOM needs a `provider`",
                );
            }
            diags.warning(
                "unsupported",
                src,
                "spec.action",
                "CUSTOM (external authorization) is not supported by Hypha yet",
            );
        } else if s.provider.is_some() {
            diags.error(
                "invalid-value",
                src,
                "spec.provider",
                "`provider` is only valid with action CUSTOM",
            );
        }
        if s.selector.is_some() && (s.target_ref.is_some() || s.target_refs.is_some()) {
            diags.error(
                "exclusive-fields",
                src,
                "spec.targetRef",
                "only one of `selector` and `targetRef(s)` may be set",
            );
        }
        if s.target_ref.is_some() || s.target_refs.is_some() {
            diags.warning(
                "unsupported",
                src,
                "spec.targetRef",
                "targetRef applies to waypoints and gateways; not supported by Hypha yet",
            );
        }
        for (i, rule) in s.rules.iter().enumerate() {
            let rp = format!("spec.rules[{i}]");
            for (j, f) in rule.from.iter().enumerate() {
                let fp = format!("{rp}.from[{j}].source");
                let x = &f.source;
                let lists = [
                    ("principals", &x.principals),
                    ("notPrincipals", &x.not_principals),
                    ("requestPrincipals", &x.request_principals),
                    ("notRequestPrincipals", &x.not_request_principals),
                    ("namespaces", &x.namespaces),
                    ("notNamespaces", &x.not_namespaces),
                    ("ipBlocks", &x.ip_blocks),
                    ("notIpBlocks", &x.not_ip_blocks),
                    ("remoteIpBlocks", &x.remote_ip_blocks),
                    ("notRemoteIpBlocks", &x.not_remote_ip_blocks),
                ];
                if lists.iter().all(|(_, l)| l.is_empty()) {
                    diags.error(
                        "empty-source",
                        src,
                        &fp,
                        "a source needs at least one field",
                    );
                }
                for (field, list) in lists {
                    for (k, v) in list.iter().enumerate() {
                        let vp = format!("{fp}.{field}[{k}]");
                        if v.is_empty() {
                            diags.error("invalid-value", src, &vp, "empty value");
                        } else if field.ends_with("pBlocks") && !is_valid_cidr(v) {
                            diags.error(
                                "invalid-cidr",
                                src,
                                &vp,
                                format!("{v:?} is not an IPv4/IPv6 address or CIDR"),
                            );
                        } else if !field.ends_with("pBlocks") && !is_wildcard_ok(v) {
                            diags.error(
                                "invalid-wildcard",
                                src,
                                &vp,
                                format!("{v:?}: `*` is allowed only at the start or the end"),
                            );
                        }
                    }
                }
            }
            for (j, t) in rule.to.iter().enumerate() {
                let tp = format!("{rp}.to[{j}].operation");
                let o = &t.operation;
                let lists = [
                    ("hosts", &o.hosts),
                    ("notHosts", &o.not_hosts),
                    ("ports", &o.ports),
                    ("notPorts", &o.not_ports),
                    ("methods", &o.methods),
                    ("notMethods", &o.not_methods),
                    ("paths", &o.paths),
                    ("notPaths", &o.not_paths),
                ];
                if lists.iter().all(|(_, l)| l.is_empty()) {
                    diags.error(
                        "empty-operation",
                        src,
                        &tp,
                        "an operation needs at least one field",
                    );
                }
                for (field, list) in lists {
                    for (k, v) in list.iter().enumerate() {
                        let vp = format!("{tp}.{field}[{k}]");
                        if field.ends_with("orts") {
                            match v.parse::<u32>() {
                                Ok(p) => {
                                    port(src, &vp, p, diags);
                                }
                                Err(_) => diags.error(
                                    "invalid-port",
                                    src,
                                    &vp,
                                    format!("{v:?} is not a port number"),
                                ),
                            }
                        } else if v.is_empty() {
                            diags.error("invalid-value", src, &vp, "empty value");
                        } else if !is_wildcard_ok(v) {
                            diags.error(
                                "invalid-wildcard",
                                src,
                                &vp,
                                format!("{v:?}: `*` is allowed only at the start or the end"),
                            );
                        }
                    }
                }
            }
            for (j, c) in rule.when.iter().enumerate() {
                let cp = format!("{rp}.when[{j}]");
                if !is_condition_key(&c.key) {
                    diags.error(
                        "invalid-condition",
                        src,
                        format!("{cp}.key"),
                        format!("unknown condition key {:?}", c.key),
                    );
                }
                if c.values.is_empty() && c.not_values.is_empty() {
                    diags.error(
                        "missing-field",
                        src,
                        &cp,
                        "a condition needs `values` or `notValues`",
                    );
                }
                let cidr_key =
                    matches!(c.key.as_str(), "source.ip" | "remote.ip" | "destination.ip");
                for (field, list) in [("values", &c.values), ("notValues", &c.not_values)] {
                    for (k, v) in list.iter().enumerate() {
                        let vp = format!("{cp}.{field}[{k}]");
                        if cidr_key && !is_valid_cidr(v) {
                            diags.error(
                                "invalid-cidr",
                                src,
                                vp,
                                format!("{v:?} is not an IPv4/IPv6 address or CIDR"),
                            );
                        } else if c.key == "destination.port"
                            && v.parse::<u32>().map_or(true, |p| p == 0 || p > 65535)
                        {
                            diags.error(
                                "invalid-port",
                                src,
                                vp,
                                format!("{v:?} is not a port number"),
                            );
                        }
                    }
                }
            }
        }
    }

    fn peer_authentication(&self, r: &Resource<PeerAuthentication>, diags: &mut Diagnostics) {
        let (s, src) = (&r.spec, &r.source);
        if !s.port_level_mtls.is_empty()
            && s.selector
                .as_ref()
                .is_none_or(|sel| sel.match_labels.is_empty())
        {
            diags.error(
                "missing-selector",
                src,
                "spec.portLevelMtls",
                "portLevelMtls needs a workload selector",
            );
        }
        for key in s.port_level_mtls.keys() {
            let p = format!("spec.portLevelMtls.{key}");
            match key.parse::<u32>() {
                Ok(n) => {
                    port(src, &p, n, diags);
                }
                Err(_) => diags.error(
                    "invalid-port",
                    src,
                    p,
                    format!("{key:?} is not a port number"),
                ),
            }
        }
        if s.selector.is_some() && r.namespace == self.cfg.mesh.root_namespace {
            diags.warning(
                "selector-in-root",
                src,
                "spec.selector",
                "a selector in the root namespace applies to matching workloads in every namespace",
            );
        }
    }
}

fn traffic_policy(src: &Source, path: &str, tp: &TrafficPolicy, diags: &mut Diagnostics) {
    if let Some(lb) = &tp.load_balancer {
        load_balancer(src, &format!("{path}.loadBalancer"), lb, diags);
    }
    if let Some(cp) = &tp.connection_pool {
        connection_pool(src, &format!("{path}.connectionPool"), cp, diags);
    }
    if let Some(od) = &tp.outlier_detection {
        outlier(src, &format!("{path}.outlierDetection"), od, diags);
    }
    for (field, set) in [
        ("tunnel", tp.tunnel.is_some()),
        ("proxyProtocol", tp.proxy_protocol.is_some()),
    ] {
        if set {
            diags.warning(
                "unsupported",
                src,
                format!("{path}.{field}"),
                format!("`{field}` is not supported by Hypha yet; ignored"),
            );
        }
    }
    let mut ports = HashSet::new();
    for (i, pl) in tp.port_level_settings.iter().enumerate() {
        let pp = format!("{path}.portLevelSettings[{i}]");
        match pl.port {
            None => diags.error(
                "missing-field",
                src,
                format!("{pp}.port"),
                "`port` is required",
            ),
            Some(p) => {
                if port(src, &format!("{pp}.port.number"), p.number, diags)
                    && !ports.insert(p.number)
                {
                    diags.error(
                        "duplicate-port",
                        src,
                        format!("{pp}.port.number"),
                        format!("port {} has two settings", p.number),
                    );
                }
            }
        }
        if let Some(lb) = &pl.load_balancer {
            load_balancer(src, &format!("{pp}.loadBalancer"), lb, diags);
        }
        if let Some(cp) = &pl.connection_pool {
            connection_pool(src, &format!("{pp}.connectionPool"), cp, diags);
        }
        if let Some(od) = &pl.outlier_detection {
            outlier(src, &format!("{pp}.outlierDetection"), od, diags);
        }
    }
}

fn load_balancer(src: &Source, path: &str, lb: &LoadBalancerSettings, diags: &mut Diagnostics) {
    if lb.simple.is_some() && lb.consistent_hash.is_some() {
        diags.error(
            "exclusive-fields",
            src,
            path,
            "only one of `simple` and `consistentHash` may be set",
        );
    }
    if let Some(ch) = &lb.consistent_hash {
        let keys = usize::from(ch.http_header_name.is_some())
            + usize::from(ch.http_cookie.is_some())
            + usize::from(ch.use_source_ip == Some(true))
            + usize::from(ch.http_query_parameter_name.is_some());
        if keys != 1 {
            diags.error(
                "exclusive-fields",
                src,
                format!("{path}.consistentHash"),
                "exactly one of `httpHeaderName`, `httpCookie`, `useSourceIp` or `httpQueryParameterName` is required",
            );
        }
        if ch.ring_hash.is_some() && ch.maglev.is_some() {
            diags.error(
                "exclusive-fields",
                src,
                format!("{path}.consistentHash"),
                "only one of `ringHash` and `maglev` may be set",
            );
        }
    }
    if lb.locality_lb_setting.is_some() {
        diags.warning(
            "unsupported",
            src,
            format!("{path}.localityLbSetting"),
            "locality load balancing is not supported by Hypha yet; ignored",
        );
    }
}

fn connection_pool(src: &Source, path: &str, cp: &ConnectionPoolSettings, diags: &mut Diagnostics) {
    let mut positive = |field: &str, v: Option<i64>| {
        if let Some(v) = v {
            if v <= 0 {
                diags.error(
                    "invalid-value",
                    src,
                    format!("{path}.{field}"),
                    format!("{v} must be positive"),
                );
            }
        }
    };
    if let Some(t) = &cp.tcp {
        positive("tcp.maxConnections", t.max_connections);
    }
    if let Some(h) = &cp.http {
        positive("http.http1MaxPendingRequests", h.http1_max_pending_requests);
        positive("http.http2MaxRequests", h.http2_max_requests);
        positive(
            "http.maxRequestsPerConnection",
            h.max_requests_per_connection,
        );
        positive("http.maxConcurrentStreams", h.max_concurrent_streams);
        if let Some(r) = h.max_retries {
            if r < 0 {
                diags.error(
                    "invalid-value",
                    src,
                    format!("{path}.http.maxRetries"),
                    "maxRetries must not be negative",
                );
            }
        }
        if let Some(p) = &h.h2_upgrade_policy {
            if !matches!(p.as_str(), "DEFAULT" | "DO_NOT_UPGRADE" | "UPGRADE") {
                diags.error(
                    "invalid-value",
                    src,
                    format!("{path}.http.h2UpgradePolicy"),
                    format!("unknown policy {p:?}"),
                );
            }
        }
    }
}

fn outlier(src: &Source, path: &str, od: &OutlierDetection, diags: &mut Diagnostics) {
    for (field, v) in [
        ("maxEjectionPercent", od.max_ejection_percent),
        ("minHealthPercent", od.min_health_percent),
    ] {
        if let Some(v) = v {
            if !(0..=100).contains(&v) {
                diags.error(
                    "invalid-percent",
                    src,
                    format!("{path}.{field}"),
                    format!("{v} is outside 0..100"),
                );
            }
        }
    }
    if od.interval.is_some_and(|i| i.as_std().is_zero()) {
        diags.error(
            "invalid-value",
            src,
            format!("{path}.interval"),
            "interval must be positive",
        );
    }
}

fn workload(
    src: &Source,
    path: &str,
    w: &WorkloadEntry,
    ip_required: bool,
    diags: &mut Diagnostics,
) {
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

fn headers(src: &Source, path: &str, h: &Headers, diags: &mut Diagnostics) {
    let ops: [(&str, &Option<HeaderOperations>); 2] =
        [("request", &h.request), ("response", &h.response)];
    for (dir, op) in ops {
        let Some(op) = op else { continue };
        let names: BTreeMap<&str, ()> = op
            .set
            .keys()
            .chain(op.add.keys())
            .chain(op.remove.iter())
            .map(|k| (k.as_str(), ()))
            .collect();
        for name in names.keys() {
            if !is_header_name(name) {
                diags.error(
                    "invalid-header",
                    src,
                    format!("{path}.{dir}"),
                    format!("{name:?} is not a valid header name"),
                );
            }
        }
    }
}

fn header_name(src: &Source, path: &str, name: &str, diags: &mut Diagnostics) {
    if !is_header_name(name) || name.chars().any(|c| c.is_ascii_uppercase()) {
        diags.error(
            "invalid-header",
            src,
            path,
            format!("header name {name:?} must be a lowercase HTTP token"),
        );
    }
}

fn string_match(
    src: &Source,
    path: &str,
    m: &StringMatch,
    empty_ok: bool,
    diags: &mut Diagnostics,
) {
    match m.set_count() {
        0 if !empty_ok => diags.error(
            "invalid-match",
            src,
            path,
            "one of `exact`, `prefix` or `regex` is required",
        ),
        0 | 1 => {}
        _ => diags.error(
            "invalid-match",
            src,
            path,
            "only one of `exact`, `prefix` or `regex` may be set",
        ),
    }
    if let StringMatchKind::Regex(r) = m.kind() {
        regex(src, &format!("{path}.regex"), r, diags);
    }
}

/// A match regex: checked by the proxy's matcher itself (`hypha-matcher`, RE2 semantics and
/// size limits), so a pattern that passes here is not refused by the proxy, and the reverse.
fn regex(src: &Source, path: &str, pattern: &str, diags: &mut Diagnostics) {
    if let Err(e) = hypha_matcher::check_regex(pattern) {
        let last = e.lines().last().unwrap_or("").trim().to_string();
        diags.error(
            "invalid-regex",
            src,
            path,
            format!("regex {pattern:?} does not compile (RE2 syntax): {last}"),
        );
    }
}

/// A rewrite regex: the proxy compiles it with the `regex` crate's defaults, and so does this.
fn rewrite_regex(src: &Source, path: &str, pattern: &str, diags: &mut Diagnostics) {
    if let Err(e) = regex::Regex::new(pattern) {
        let detail = e.to_string();
        let last = detail.lines().last().unwrap_or("").trim().to_string();
        diags.error(
            "invalid-regex",
            src,
            path,
            format!("regex {pattern:?} does not compile: {last}"),
        );
    }
}

fn percent(src: &Source, path: &str, p: Option<Percent>, diags: &mut Diagnostics) {
    if let Some(p) = p {
        if !(0.0..=100.0).contains(&p.value) || p.value.is_nan() {
            diags.error(
                "invalid-percent",
                src,
                format!("{path}.value"),
                format!("{} is outside 0..100", p.value),
            );
        }
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

fn looks_like_ip(s: &str) -> bool {
    s.contains(':') || s.chars().all(|c| c.is_ascii_digit() || c == '.')
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A token-held signer key: where the token is, and the attestation policy that must approve it
/// (none is an error: a token nobody vouched for is never used).
fn pkcs11_key(p: &Pkcs11Key, src: &Source, path: &str, diags: &mut Diagnostics) {
    if p.pin_file.is_some() == p.pin_env.is_some() {
        diags.error(
            "signer-key",
            src,
            path,
            "exactly one of `pinFile` and `pinEnv` is required",
        );
    }
    for (field, value) in [
        ("module", &p.module),
        ("tokenLabel", &p.token_label),
        ("keyLabel", &p.key_label),
    ] {
        if value.trim().is_empty() {
            diags.error(
                "signer-key",
                src,
                format!("{path}.{field}"),
                format!("`{field}` must not be empty"),
            );
        }
    }
    let Some(a) = &p.attestation else {
        diags.error(
            "no-attestation",
            src,
            path,
            "a pkcs11 signer needs an `attestation` policy (`allow` or `command`) that approves \
             the token before the CA uses it",
        );
        return;
    };
    let path = format!("{path}.attestation");
    if a.allow.is_some() == a.command.is_some() {
        diags.error(
            "attestation",
            src,
            &path,
            "exactly one of `allow` and `command` is required",
        );
    }
    if let Some(allow) = &a.allow {
        if allow.labels.is_empty()
            && allow.serial_numbers.is_empty()
            && allow.manufacturers.is_empty()
        {
            diags.error(
                "attestation",
                src,
                format!("{path}.allow"),
                "an allow list needs at least one of `labels`, `serialNumbers`, `manufacturers`",
            );
        }
        for (field, list) in [
            ("labels", &allow.labels),
            ("serialNumbers", &allow.serial_numbers),
            ("manufacturers", &allow.manufacturers),
        ] {
            for (i, v) in list.iter().enumerate() {
                if v.trim().is_empty() {
                    diags.error(
                        "attestation",
                        src,
                        format!("{path}.allow.{field}[{i}]"),
                        "an empty entry matches no token",
                    );
                }
            }
        }
    }
    if let Some(c) = &a.command {
        if !c.path.starts_with('/') {
            diags.error(
                "attestation",
                src,
                format!("{path}.command.path"),
                format!("{:?} is not an absolute path", c.path),
            );
        }
        if c.timeout.as_std().is_zero() {
            diags.error(
                "invalid-value",
                src,
                format!("{path}.command.timeout"),
                "timeout must be positive",
            );
        }
    }
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

fn is_header_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn is_wildcard_ok(s: &str) -> bool {
    if s == "*" {
        return true;
    }
    let inner = s
        .strip_prefix('*')
        .or_else(|| s.strip_suffix('*'))
        .unwrap_or(s);
    !inner.contains('*')
}

fn is_base64(s: &str) -> bool {
    let t = s.trim_end_matches('=');
    s.len().is_multiple_of(4)
        && s.len() - t.len() <= 2
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

fn is_retry_on(c: &str) -> bool {
    matches!(
        c,
        "5xx"
            | "gateway-error"
            | "reset"
            | "reset-before-request"
            | "connect-failure"
            | "envoy-ratelimited"
            | "retriable-4xx"
            | "refused-stream"
            | "retriable-status-codes"
            | "retriable-headers"
            | "http3-post-connect-failure"
            | "cancelled"
            | "deadline-exceeded"
            | "internal"
            | "resource-exhausted"
            | "unavailable"
    ) || c.parse::<u16>().is_ok_and(|s| (100..=599).contains(&s))
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

fn is_condition_key(k: &str) -> bool {
    let bracketed = |prefix: &str| {
        k.strip_prefix(prefix)
            .and_then(|r| r.strip_prefix('['))
            .is_some_and(|r| r.len() > 1 && r.ends_with(']'))
    };
    matches!(
        k,
        "source.ip"
            | "remote.ip"
            | "source.namespace"
            | "source.principal"
            | "request.auth.principal"
            | "request.auth.audiences"
            | "request.auth.presenter"
            | "destination.ip"
            | "destination.port"
            | "connection.sni"
    ) || bracketed("request.headers")
        || bracketed("request.auth.claims")
        || k.starts_with("experimental.envoy.filters.")
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
    fn wildcards() {
        for ok in ["*", "/api/*", "*.example.com", "/exact"] {
            assert!(is_wildcard_ok(ok), "{ok}");
        }
        for bad in ["/a/*/b", "*mid*", "**"] {
            assert!(!is_wildcard_ok(bad), "{bad}");
        }
    }

    #[test]
    fn grpc_codes() {
        assert_eq!(grpc_code("UNAVAILABLE"), Some(14));
        assert_eq!(grpc_code("nope"), None);
    }
}
