//! What the control plane knows of the cluster (slim objects by kind), and the registry model
//! it becomes: each Service a ServiceEntry (host `<name>.<ns>.svc.<domain>`, VIPs from
//! `clusterIPs`, endpoints from its ready EndpointSlice endpoints with their pod's addresses,
//! labels, service account and node locality), each live Pod a WorkloadEntry. Both are marked
//! derived: the API server validated them, so Hypha's validation only indexes them.

use std::collections::BTreeMap;
use std::sync::Arc;

use hypha_config::networking::{
    Location, PodRef, Resolution, ServiceEntry, ServicePort, WorkloadEntry,
};
use hypha_config::yaml::Document;
use hypha_config::{MeshConfig, Resource, Source};
use serde_json::Value;

use crate::objects::{Key, Pod, Service, Slice};

/// The objects of every kind watched, as last seen.
#[derive(Debug, Default, Clone)]
pub struct Cluster {
    pub services: BTreeMap<Key, Service>,
    pub slices: BTreeMap<Key, Slice>,
    pub pods: BTreeMap<Key, Pod>,
    /// Node name → locality (`region/zone`).
    pub nodes: BTreeMap<String, String>,
    /// Namespace → its labels.
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// Istio config objects by (kind, namespace, name), stripped (see `istio::strip`).
    pub istio: BTreeMap<(&'static str, String, String), Value>,
}

/// One endpoint's parts, gathered from the slices of every address family.
#[derive(Default)]
struct Gathered<'a> {
    addresses: Vec<String>,
    ports: BTreeMap<String, u32>,
    node: Option<&'a str>,
}

/// The registry part of the cluster, in the config model.
#[derive(Debug, Default)]
pub struct Derived {
    pub service_entries: Vec<Resource<ServiceEntry>>,
    pub workload_entries: Vec<Resource<WorkloadEntry>>,
}

impl Cluster {
    /// Services and Pods as ServiceEntries and WorkloadEntries. Objects in namespaces that
    /// belong to no tenant of `mesh` are outside the mesh and left out.
    pub fn derive(&self, mesh: &MeshConfig) -> Derived {
        let doc = Arc::new(Document::unpositioned(Value::Null));
        let file: Arc<str> = crate::ORIGIN.into();
        let source = |kind: &str, (ns, name): &Key| Source {
            file: file.clone(),
            doc: doc.clone(),
            resource: format!("{kind} {ns}/{name}"),
            derived: true,
        };
        let in_mesh = |ns: &str| mesh.tenant_of(ns).is_some();
        let mut out = Derived::default();
        for (k, pod) in &self.pods {
            if !in_mesh(&k.0) || !pod.live || pod.ips.is_empty() {
                continue;
            }
            out.workload_entries.push(Resource {
                name: k.1.clone(),
                namespace: k.0.clone(),
                labels: pod.labels.clone(),
                annotations: BTreeMap::new(),
                spec: self.workload(&k.1, pod, pod.ips.clone()),
                source: source("Pod", k),
            });
        }
        // EndpointSlices by their Service.
        let mut slices: BTreeMap<(&str, &str), Vec<&Slice>> = BTreeMap::new();
        for ((ns, _), s) in &self.slices {
            slices.entry((ns, &s.service)).or_default().push(s);
        }
        for (k, svc) in &self.services {
            if !in_mesh(&k.0) {
                continue;
            }
            let own = slices.get(&(k.0.as_str(), k.1.as_str()));
            let spec = self.service_entry(k, svc, own.map_or(&[][..], Vec::as_slice), mesh);
            out.service_entries.push(Resource {
                name: k.1.clone(),
                namespace: k.0.clone(),
                labels: BTreeMap::new(),
                annotations: BTreeMap::new(),
                spec,
                source: source("Service", k),
            });
        }
        out
    }

    fn service_entry(
        &self,
        (ns, name): &Key,
        svc: &Service,
        slices: &[&Slice],
        mesh: &MeshConfig,
    ) -> ServiceEntry {
        let ports = svc
            .ports
            .iter()
            .map(|p| ServicePort {
                number: p.port,
                protocol: p.protocol.map(str::to_string),
                name: p.name.clone(),
                target_port: p.target_port,
            })
            .collect();
        let host = format!("{name}.{ns}.svc.{}", mesh.domain_suffix);
        if let Some(external) = &svc.external_name {
            // Istio: an ExternalName Service is a DNS name outside the mesh.
            return ServiceEntry {
                hosts: vec![host],
                ports,
                location: Location::MeshExternal,
                resolution: Resolution::Dns,
                endpoints: vec![WorkloadEntry {
                    address: external.clone(),
                    ..Default::default()
                }],
                ..Default::default()
            };
        }
        // One endpoint per pod, its addresses from every family's slice (or per address for
        // endpoints that name no pod).
        let mut endpoints: BTreeMap<String, Gathered<'_>> = BTreeMap::new();
        for s in slices {
            for e in s.endpoints.iter().filter(|e| e.ready) {
                let Some(first) = e.addresses.first() else {
                    continue;
                };
                let id = e.pod.clone().unwrap_or_else(|| first.clone());
                let g = endpoints.entry(id).or_default();
                for a in &e.addresses {
                    if !g.addresses.contains(a) {
                        g.addresses.push(a.clone());
                    }
                }
                g.ports.extend(s.ports.iter().map(|(n, p)| (n.clone(), *p)));
                g.node = g.node.or(e.node.as_deref());
            }
        }
        let endpoints = endpoints
            .into_iter()
            .map(|(id, mut g)| {
                let pod = self.pods.get(&(ns.clone(), id.clone()));
                let mut w = match pod {
                    Some(pod) => {
                        // The pod's own order of families: its primary address first.
                        g.addresses
                            .sort_by_key(|a| pod.ips.iter().position(|p| p == a));
                        self.workload(&id, pod, g.addresses)
                    }
                    None => WorkloadEntry {
                        address: g.addresses[0].clone(),
                        locality: g
                            .node
                            .and_then(|n| self.nodes.get(n))
                            .cloned()
                            .unwrap_or_default(),
                        pod: Some(PodRef {
                            name: format!("{name}-{id}"),
                            addresses: g.addresses,
                            workload: String::new(),
                        }),
                        ..Default::default()
                    },
                };
                w.ports = g.ports;
                w
            })
            .collect();
        ServiceEntry {
            hosts: vec![host],
            addresses: svc.cluster_ips.clone(),
            ports,
            location: Location::MeshInternal,
            // Istio: a headless Service is passthrough, to the address the client chose.
            resolution: if svc.cluster_ips.is_empty() {
                Resolution::None
            } else {
                Resolution::Static
            },
            endpoints,
            ..Default::default()
        }
    }

    fn workload(&self, name: &str, pod: &Pod, addresses: Vec<String>) -> WorkloadEntry {
        WorkloadEntry {
            address: addresses.first().cloned().unwrap_or_default(),
            labels: pod.labels.clone(),
            locality: pod
                .node
                .as_ref()
                .and_then(|n| self.nodes.get(n))
                .cloned()
                .unwrap_or_default(),
            service_account: pod.service_account.clone(),
            pod: Some(PodRef {
                name: name.to_string(),
                addresses,
                workload: pod.workload.clone(),
            }),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::{ServicePort as Port, SliceEndpoint};

    fn pod(ips: &[&str], live: bool) -> Pod {
        Pod {
            labels: [("app".to_string(), "reviews".to_string())].into(),
            service_account: "reviews".into(),
            ips: ips.iter().map(|s| s.to_string()).collect(),
            node: Some("n1".into()),
            live,
            uid: "u".into(),
            workload: "reviews".into(),
        }
    }

    fn slice(addrs: &[(&str, &str, bool)]) -> Slice {
        Slice {
            service: "reviews".into(),
            ports: [("http".to_string(), 9080)].into(),
            endpoints: addrs
                .iter()
                .map(|(pod, a, ready)| SliceEndpoint {
                    addresses: vec![a.to_string()],
                    ready: *ready,
                    pod: Some(pod.to_string()),
                    node: Some("n1".into()),
                })
                .collect(),
        }
    }

    #[test]
    fn slices_of_both_families_make_one_endpoint_per_ready_pod() {
        let mut c = Cluster::default();
        let k = |n: &str| ("shop".to_string(), n.to_string());
        c.nodes.insert("n1".into(), "eu/eu-1".into());
        c.pods.insert(k("a"), pod(&["fd00::1", "10.0.0.1"], true));
        c.pods.insert(k("b"), pod(&["10.0.0.2", "fd00::2"], true));
        c.pods.insert(k("gone"), pod(&["10.0.0.3"], false));
        c.services.insert(
            k("reviews"),
            Service {
                cluster_ips: vec!["10.96.0.1".into(), "fd96::1".into()],
                external_name: None,
                ports: vec![Port {
                    name: "http".into(),
                    port: 80,
                    protocol: None,
                    target_port: None,
                }],
            },
        );
        c.slices.insert(
            k("reviews-ipv4"),
            slice(&[
                ("a", "10.0.0.1", true),
                ("b", "10.0.0.2", true),
                ("gone", "10.0.0.3", false),
            ]),
        );
        c.slices.insert(
            k("reviews-ipv6"),
            slice(&[("a", "fd00::1", true), ("b", "fd00::2", true)]),
        );
        let d = c.derive(&MeshConfig::default());
        assert_eq!(d.workload_entries.len(), 2, "the deleted pod is left out");
        let se = &d.service_entries[0].spec;
        assert_eq!(se.hosts, ["reviews.shop.svc.cluster.local"]);
        assert_eq!(se.addresses, ["10.96.0.1", "fd96::1"]);
        assert_eq!(se.resolution, Resolution::Static);
        let eps: Vec<_> = se
            .endpoints
            .iter()
            .map(|e| (e.pod.clone().unwrap().addresses, e.locality.as_str()))
            .collect();
        assert_eq!(
            eps,
            [
                (vec!["fd00::1".to_string(), "10.0.0.1".into()], "eu/eu-1"),
                (vec!["10.0.0.2".to_string(), "fd00::2".into()], "eu/eu-1"),
            ]
        );
        assert_eq!(se.endpoints[0].service_account, "reviews");
        assert_eq!(se.endpoints[0].ports["http"], 9080);
    }
}
