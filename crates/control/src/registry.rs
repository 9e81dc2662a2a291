//! The service registry: services and their endpoints, built from ServiceEntry (hosts, VIPs,
//! ports) and WorkloadEntry / inline endpoints (addresses of both families, labels, identity).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;

use hypha_config::networking::{Location, Resolution, WorkloadEntry};
use hypha_config::{Config, ADDRESSES_ANNOTATION};

/// How a port's traffic is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http,
    /// HTTP/2 and gRPC: upstream connections speak HTTP/2.
    Http2,
    /// TLS (and HTTPS): opaque bytes, told apart by the ClientHello's server name.
    Tls,
    /// TCP and anything else opaque.
    Tcp,
}

impl Protocol {
    pub fn from_port(protocol: Option<&str>, name: &str) -> Protocol {
        // Istio's rule: an explicit protocol, else a `<protocol>[-suffix]` port name.
        let p = protocol.unwrap_or_else(|| name.split('-').next().unwrap_or(""));
        match hypha_config::protocol_kind(p) {
            Some("http") => Protocol::Http,
            Some("http2") => Protocol::Http2,
            Some("tls") => Protocol::Tls,
            _ => Protocol::Tcp,
        }
    }

    pub fn is_http(self) -> bool {
        matches!(self, Protocol::Http | Protocol::Http2)
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
    /// The instance's name: a WorkloadEntry's, a pod's.
    pub workload_name: String,
    /// A pod's workload (its Deployment's name, see `PodRef::workload`); empty elsewhere.
    pub owner: String,
    /// The endpoint runs a sidecar that speaks the mesh's mutual TLS: a WorkloadEntry, unless
    /// its label `security.istio.io/tlsMode` says otherwise (`istio` marks a ServiceEntry's
    /// inline endpoint as one too).
    pub sidecar: bool,
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

/// Every service, by host, built once per config generation, with the indexes translation
/// needs so that no per-proxy or per-namespace step scans every service or workload.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    /// Sorted by hostname.
    pub services: Vec<Service>,
    /// Workloads (WorkloadEntry resources), for finding a proxy's own instances.
    pub workloads: Vec<Endpoint>,
    /// Indexes into `services` of wildcard hosts (`*.example.com`).
    wildcards: Vec<usize>,
    /// (namespace, workload name) → indexes into `workloads`.
    workloads_by_name: HashMap<(String, String), Vec<usize>>,
    /// Address → indexes into `workloads`.
    workloads_by_ip: HashMap<IpAddr, Vec<usize>>,
    /// (namespace, workload name) → (index into `services`, index of the workload among that
    /// service's endpoints), for every service that has it as an endpoint.
    services_by_workload: HashMap<(String, String), Vec<(usize, usize)>>,
}

impl Registry {
    pub fn build(cfg: &Config) -> Registry {
        let workloads: Vec<Endpoint> = cfg
            .workload_entries
            .iter()
            .map(|we| {
                let extra = we.annotations.get(ADDRESSES_ANNOTATION).map(String::as_str);
                endpoint(&we.spec, extra, &we.namespace, &we.name, true)
            })
            .collect();
        // (namespace, label, value) → workloads, so a selector looks at its candidates only.
        let mut by_label: HashMap<(&str, &str, &str), Vec<usize>> = HashMap::new();
        let mut by_namespace: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, w) in workloads.iter().enumerate() {
            by_namespace.entry(&w.namespace).or_default().push(i);
            for (k, v) in &w.labels {
                by_label.entry((&w.namespace, k, v)).or_default().push(i);
            }
        }
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
                .map(|(i, ep)| {
                    endpoint(ep, None, &se.namespace, &format!("{}-{i}", se.name), false)
                })
                .collect();
            if let Some(sel) = &s.workload_selector {
                let ns = se.namespace.as_str();
                let candidates = match sel.labels.iter().next() {
                    Some((k, v)) => by_label.get(&(ns, k.as_str(), v.as_str())),
                    None => by_namespace.get(ns),
                };
                endpoints.extend(
                    candidates
                        .into_iter()
                        .flatten()
                        .map(|&i| &workloads[i])
                        .filter(|w| hypha_config::types::labels_match(&sel.labels, &w.labels))
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
        let wildcards = (0..services.len())
            .filter(|&i| services[i].hostname.starts_with('*'))
            .collect();
        let mut workloads_by_name: HashMap<_, Vec<usize>> = HashMap::new();
        let mut workloads_by_ip: HashMap<_, Vec<usize>> = HashMap::new();
        for (i, w) in workloads.iter().enumerate() {
            workloads_by_name
                .entry((w.namespace.clone(), w.workload_name.clone()))
                .or_default()
                .push(i);
            for ip in w.addresses.iter().filter_map(|a| a.parse::<IpAddr>().ok()) {
                let entry = workloads_by_ip.entry(ip).or_default();
                if entry.last() != Some(&i) {
                    entry.push(i);
                }
            }
        }
        let mut services_by_workload: HashMap<_, Vec<(usize, usize)>> = HashMap::new();
        for (i, s) in services.iter().enumerate() {
            for (j, e) in s.endpoints.iter().enumerate() {
                let entry = services_by_workload
                    .entry((e.namespace.clone(), e.workload_name.clone()))
                    .or_default();
                if entry.last().is_none_or(|&(last, _)| last != i) {
                    entry.push((i, j));
                }
            }
        }
        Registry {
            services,
            workloads,
            wildcards,
            workloads_by_name,
            workloads_by_ip,
            services_by_workload,
        }
    }

    /// A proxy's own workloads, in config order: the ones in `ns` called `name` when the
    /// proxy names its workload, else the ones in `ns` with one of its `ips`. (A named proxy
    /// never takes a workload by address: several workloads can share an address, as on one
    /// host or in the demo on loopback.)
    pub fn workloads_of(&self, ns: &str, name: &str, ips: &[IpAddr]) -> Vec<&Endpoint> {
        let mut found: Vec<usize> = Vec::new();
        if !name.is_empty() {
            let key = (ns.to_owned(), name.to_owned());
            found.extend(self.workloads_by_name.get(&key).into_iter().flatten());
        } else {
            for ip in ips {
                found.extend(self.workloads_by_ip.get(ip).into_iter().flatten());
            }
        }
        found.sort_unstable();
        found.dedup();
        found
            .into_iter()
            .map(|i| &self.workloads[i])
            .filter(|w| w.namespace == ns)
            .collect()
    }

    /// The services that have `workload` as an endpoint, each with its own entry for it: that
    /// entry says which port the workload serves each service port on (a pod's come from its
    /// EndpointSlice, not from the pod).
    pub fn services_backed_by(
        &self,
        workload: &Endpoint,
    ) -> impl Iterator<Item = (&Service, &Endpoint)> {
        let key = (workload.namespace.clone(), workload.workload_name.clone());
        self.services_by_workload
            .get(&key)
            .into_iter()
            .flatten()
            .map(|&(i, j)| (&self.services[i], &self.services[i].endpoints[j]))
    }

    /// The index in `services` of the service of exactly this host and namespace.
    pub fn index_of(&self, host: &str, ns: &str) -> Option<usize> {
        let from = self
            .services
            .partition_point(|s| s.hostname.as_str() < host);
        (from..self.services.len())
            .take_while(|&i| self.services[i].hostname == host)
            .find(|&i| self.services[i].namespace == ns)
    }

    /// The service `host` (fully qualified) names, as seen from `ns`; wildcard hosts match.
    pub fn service(&self, host: &str, ns: &str) -> Option<&Service> {
        let visible = |s: &&Service| s.visibility.visible_to(ns);
        let from = self
            .services
            .partition_point(|s| s.hostname.as_str() < host);
        self.services[from..]
            .iter()
            .take_while(|s| s.hostname == host)
            .find(visible)
            .or_else(|| {
                self.wildcards
                    .iter()
                    .map(|&i| &self.services[i])
                    .filter(visible)
                    .find(|s| {
                        s.hostname
                            .strip_prefix('*')
                            .is_some_and(|suffix| host.ends_with(suffix))
                    })
            })
    }
}

/// The label Istio marks endpoints with sidecars by.
const TLS_MODE_LABEL: &str = "security.istio.io/tlsMode";

fn endpoint(
    w: &WorkloadEntry,
    extra: Option<&str>,
    ns: &str,
    name: &str,
    workload_entry: bool,
) -> Endpoint {
    let mut addresses = vec![w.address.clone()];
    if let Some(pod) = &w.pod {
        addresses.clone_from(&pod.addresses);
    }
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
        workload_name: w.pod.as_ref().map_or(name, |p| &p.name).to_string(),
        owner: w
            .pod
            .as_ref()
            .map(|p| p.workload.clone())
            .unwrap_or_default(),
        sidecar: w
            .labels
            .get(TLS_MODE_LABEL)
            .map_or(workload_entry && w.pod.is_none(), |m| m == "istio"),
    }
}
