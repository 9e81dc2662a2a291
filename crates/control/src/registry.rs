//! The service registry: services and their endpoints, built from ServiceEntry (hosts, VIPs,
//! ports) and WorkloadEntry / inline endpoints (addresses of both families, labels, identity).

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;

use hypha_config::networking::{Location, Resolution, WorkloadEntry};
use hypha_config::{Config, ADDRESSES_ANNOTATION};

/// How a port's traffic is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http,
    /// HTTP/2 and gRPC: upstream connections speak HTTP/2.
    Http2,
    /// TCP, TLS, and anything opaque.
    Tcp,
}

impl Protocol {
    pub fn from_port(protocol: Option<&str>, name: &str) -> Protocol {
        // Istio's rule: an explicit protocol, else a `<protocol>[-suffix]` port name.
        let p = protocol.unwrap_or_else(|| name.split('-').next().unwrap_or(""));
        match hypha_config::protocol_kind(p) {
            Some("http") => Protocol::Http,
            Some("http2") => Protocol::Http2,
            _ => Protocol::Tcp,
        }
    }

    pub fn is_http(self) -> bool {
        self != Protocol::Tcp
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Port {
    pub number: u32,
    pub name: String,
    pub protocol: Protocol,
    pub target_port: Option<u32>,
}

/// Who may see a resource, from `exportTo`.
#[derive(Debug, Clone, PartialEq)]
pub enum Visibility {
    All,
    Namespaces(HashSet<String>),
}

impl Visibility {
    pub fn from_export_to(export_to: &[String], own_ns: &str) -> Visibility {
        if export_to.is_empty() || export_to.iter().any(|e| e == "*") {
            return Visibility::All;
        }
        Visibility::Namespaces(
            export_to
                .iter()
                .filter(|e| *e != "~")
                .map(|e| {
                    if e == "." {
                        own_ns.to_string()
                    } else {
                        e.clone()
                    }
                })
                .collect(),
        )
    }

    pub fn visible_to(&self, ns: &str) -> bool {
        match self {
            Visibility::All => true,
            Visibility::Namespaces(set) => set.contains(ns),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    /// Fully qualified host, e.g. `reviews.bookinfo.svc.cluster.local`.
    pub hostname: String,
    pub namespace: String,
    /// Virtual IPs, any family.
    pub vips: Vec<IpAddr>,
    pub ports: Vec<Port>,
    pub location: Location,
    pub resolution: Resolution,
    pub visibility: Visibility,
    pub endpoints: Vec<Endpoint>,
}

impl Service {
    pub fn port(&self, number: u32) -> Option<&Port> {
        self.ports.iter().find(|p| p.number == number)
    }
}

/// One instance of a service.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    /// IP addresses (primary first) or a single DNS name.
    pub addresses: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub namespace: String,
    pub service_account: String,
    /// Port name → port the workload listens on.
    pub ports: BTreeMap<String, u32>,
    pub weight: Option<u32>,
    pub locality: String,
    pub workload_name: String,
}

impl Endpoint {
    /// The port this endpoint serves `port` of its service on.
    pub fn port_for(&self, port: &Port) -> u32 {
        self.ports
            .get(&port.name)
            .copied()
            .or(port.target_port)
            .unwrap_or(port.number)
    }
}

/// Every service, by host, built once per config generation.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    pub services: Vec<Service>,
    /// Workloads (WorkloadEntry resources), for finding a proxy's own instances.
    pub workloads: Vec<Endpoint>,
}

impl Registry {
    pub fn build(cfg: &Config) -> Registry {
        let workloads: Vec<Endpoint> = cfg
            .workload_entries
            .iter()
            .map(|we| {
                let extra = we.annotations.get(ADDRESSES_ANNOTATION).map(String::as_str);
                endpoint(&we.spec, extra, &we.namespace, &we.name)
            })
            .collect();
        let mut services = Vec::new();
        for se in &cfg.service_entries {
            let s = &se.spec;
            let ports: Vec<Port> = s
                .ports
                .iter()
                .map(|p| Port {
                    number: p.number,
                    name: p.name.clone(),
                    protocol: Protocol::from_port(p.protocol.as_deref(), &p.name),
                    target_port: p.target_port,
                })
                .collect();
            let mut endpoints: Vec<Endpoint> = s
                .endpoints
                .iter()
                .enumerate()
                .map(|(i, ep)| endpoint(ep, None, &se.namespace, &format!("{}-{i}", se.name)))
                .collect();
            if let Some(sel) = &s.workload_selector {
                endpoints.extend(
                    workloads
                        .iter()
                        .filter(|w| {
                            w.namespace == se.namespace
                                && hypha_config::types::labels_match(&sel.labels, &w.labels)
                        })
                        .cloned(),
                );
            }
            let vips: Vec<IpAddr> = s.addresses.iter().filter_map(|a| a.parse().ok()).collect();
            for host in &s.hosts {
                services.push(Service {
                    hostname: cfg.resolve_host(host, &se.namespace),
                    namespace: se.namespace.clone(),
                    vips: vips.clone(),
                    ports: ports.clone(),
                    location: s.location,
                    resolution: s.resolution,
                    visibility: Visibility::from_export_to(&s.export_to, &se.namespace),
                    endpoints: endpoints.clone(),
                });
            }
        }
        services.sort_by(|a, b| a.hostname.cmp(&b.hostname));
        Registry {
            services,
            workloads,
        }
    }

    /// The service `host` (fully qualified) names, as seen from `ns`; wildcard hosts match.
    pub fn service(&self, host: &str, ns: &str) -> Option<&Service> {
        let visible = |s: &&Service| s.visibility.visible_to(ns);
        self.services
            .iter()
            .filter(visible)
            .find(|s| s.hostname == host)
            .or_else(|| {
                self.services.iter().filter(visible).find(|s| {
                    s.hostname
                        .strip_prefix('*')
                        .is_some_and(|suffix| host.ends_with(suffix))
                })
            })
    }
}

fn endpoint(w: &WorkloadEntry, extra: Option<&str>, ns: &str, name: &str) -> Endpoint {
    let mut addresses = vec![w.address.clone()];
    for a in extra.unwrap_or_default().split(',').map(str::trim) {
        if !a.is_empty() && !addresses.iter().any(|x| x == a) {
            addresses.push(a.to_string());
        }
    }
    Endpoint {
        addresses,
        labels: w.labels.clone(),
        namespace: ns.to_string(),
        service_account: if w.service_account.is_empty() {
            "default".into()
        } else {
            w.service_account.clone()
        },
        ports: w.ports.clone(),
        weight: w.weight,
        locality: w.locality.clone(),
        workload_name: name.to_string(),
    }
}
