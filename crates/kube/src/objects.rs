//! Slim copies of the Kubernetes objects Hypha reads: the fields discovery needs and nothing
//! else (no `managedFields`, no annotations, no container specs), so the control plane holds
//! one small copy of each object however large the API server's is.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// `(namespace, name)`.
pub type Key = (String, String);

/// The key of a namespaced object.
pub fn key(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Key {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    /// `spec.clusterIPs` (or `clusterIP`), primary family first; empty when headless.
    pub cluster_ips: Vec<String>,
    pub external_name: Option<String>,
    pub ports: Vec<ServicePort>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServicePort {
    pub name: String,
    pub port: u32,
    /// The protocol by Istio's rules for `appProtocol`, when it names one Istio knows.
    pub protocol: Option<&'static str>,
    /// A numeric `targetPort`; a named one is resolved per endpoint by its EndpointSlice.
    pub target_port: Option<u32>,
}

impl Service {
    pub fn from_api(s: &core::Service) -> Service {
        let spec = s.spec.clone().unwrap_or_default();
        let mut cluster_ips: Vec<String> = spec.cluster_ips.unwrap_or_default();
        if cluster_ips.is_empty() {
            cluster_ips.extend(spec.cluster_ip);
        }
        cluster_ips.retain(|ip| ip.parse::<std::net::IpAddr>().is_ok());
        let external_name = if spec.type_.as_deref() == Some("ExternalName") {
            spec.external_name
        } else {
            None
        };
        let ports = spec
            .ports
            .unwrap_or_default()
            .into_iter()
            // Istio serves TCP ports only (UDP and SCTP go around the mesh).
            .filter(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP"))
            .filter_map(|p| {
                Some(ServicePort {
                    name: p.name.unwrap_or_default(),
                    port: u32::try_from(p.port).ok()?,
                    protocol: p.app_protocol.as_deref().and_then(app_protocol),
                    target_port: match p.target_port {
                        Some(IntOrString::Int(n)) => u32::try_from(n).ok(),
                        _ => None,
                    },
                })
            })
            .collect();
        Service {
            cluster_ips,
            external_name,
            ports,
        }
    }
}

/// Istio's reading of a port's `appProtocol` (it wins over the port name's prefix).
fn app_protocol(p: &str) -> Option<&'static str> {
    Some(match p.to_ascii_lowercase().as_str() {
        "http" | "kubernetes.io/ws" => "HTTP",
        "http2" | "kubernetes.io/h2c" => "HTTP2",
        "grpc" | "grpc-web" => "GRPC",
        "https" | "kubernetes.io/wss" => "HTTPS",
        "tls" => "TLS",
        "tcp" | "mongo" | "mysql" | "redis" => "TCP",
        _ => return None,
    })
}

/// An EndpointSlice: the endpoints of one Service in one address family.
#[derive(Debug, Clone, PartialEq)]
pub struct Slice {
    /// Its Service (label `kubernetes.io/service-name`).
    pub service: String,
    /// Port name → the port the endpoints listen on.
    pub ports: BTreeMap<String, u32>,
    pub endpoints: Vec<SliceEndpoint>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SliceEndpoint {
    pub addresses: Vec<String>,
    /// `conditions.ready`, absent meaning ready (the API's rule); a terminating endpoint is
    /// not ready.
    pub ready: bool,
    /// The pod it is (`targetRef` of kind Pod).
    pub pod: Option<String>,
    pub node: Option<String>,
}

impl Slice {
    pub fn from_api(s: &discovery::EndpointSlice) -> Option<Slice> {
        if !matches!(s.address_type.as_str(), "IPv4" | "IPv6") {
            return None; // FQDN slices: Istio does not read them either
        }
        let service = s
            .metadata
            .labels
            .as_ref()?
            .get("kubernetes.io/service-name")?
            .clone();
        let ports = s
            .ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP"))
            .filter_map(|p| {
                Some((
                    p.name.clone().unwrap_or_default(),
                    u32::try_from(p.port?).ok()?,
                ))
            })
            .collect();
        let endpoints = s
            .endpoints
            .iter()
            .map(|e| SliceEndpoint {
                addresses: e.addresses.clone(),
                ready: e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true),
                pod: e
                    .target_ref
                    .as_ref()
                    .filter(|r| r.kind.as_deref() == Some("Pod"))
                    .and_then(|r| r.name.clone()),
                node: e.node_name.clone(),
            })
            .collect();
        Some(Slice {
            service,
            ports,
            endpoints,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Pod {
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    /// `status.podIPs`, primary first.
    pub ips: Vec<String>,
    pub node: Option<String>,
    /// Running or about to: not being deleted, not finished.
    pub live: bool,
    pub uid: String,
    /// Its workload's name, as Istio names it: the Deployment of its ReplicaSet, else its
    /// controller, else the pod itself.
    pub workload: String,
}

impl Pod {
    pub fn from_api(p: &core::Pod) -> Pod {
        let spec = p.spec.as_ref();
        let status = p.status.as_ref();
        let mut ips: Vec<String> = status
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .map(|ip| ip.ip.clone())
            .collect();
        if ips.is_empty() {
            ips.extend(status.and_then(|s| s.pod_ip.clone()));
        }
        let finished = matches!(
            status.and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        );
        Pod {
            labels: p.metadata.labels.clone().unwrap_or_default(),
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".into()),
            ips,
            node: spec.and_then(|s| s.node_name.clone()),
            live: p.metadata.deletion_timestamp.is_none() && !finished,
            uid: p.metadata.uid.clone().unwrap_or_default(),
            workload: workload_of(p),
        }
    }
}

/// Istio's workload name of a pod: a ReplicaSet owner named `<deployment>-<pod-template-hash>`
/// stands for its Deployment; any other controller is the workload; a bare pod is its own.
fn workload_of(p: &core::Pod) -> String {
    let owner = p
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true));
    let Some(owner) = owner else {
        return p.metadata.name.clone().unwrap_or_default();
    };
    let hash = p
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("pod-template-hash"));
    match (owner.kind.as_str(), hash) {
        ("ReplicaSet", Some(hash)) => owner
            .name
            .strip_suffix(hash.as_str())
            .and_then(|n| n.strip_suffix('-'))
            .unwrap_or(&owner.name)
            .to_owned(),
        _ => owner.name.clone(),
    }
}

/// A Node's locality, `region/zone`, from `topology.kubernetes.io/region|zone`.
pub fn node_locality(n: &core::Node) -> String {
    let labels = n.metadata.labels.clone().unwrap_or_default();
    let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
    let (region, zone) = (
        get("topology.kubernetes.io/region"),
        get("topology.kubernetes.io/zone"),
    );
    if region.is_empty() && zone.is_empty() {
        String::new()
    } else {
        format!("{region}/{zone}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

    fn pod(owner: Option<(&str, &str)>) -> core::Pod {
        core::Pod {
            metadata: ObjectMeta {
                name: Some("reviews-v1-7d9f8-x2x".into()),
                labels: Some([("pod-template-hash".to_string(), "7d9f8".to_string())].into()),
                owner_references: owner.map(|(kind, name)| {
                    vec![OwnerReference {
                        kind: kind.into(),
                        name: name.into(),
                        controller: Some(true),
                        ..Default::default()
                    }]
                }),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn a_pods_workload_is_named_as_istio_names_it() {
        let of = |owner| Pod::from_api(&pod(owner)).workload;
        assert_eq!(of(Some(("ReplicaSet", "reviews-v1-7d9f8"))), "reviews-v1");
        assert_eq!(of(Some(("StatefulSet", "db"))), "db");
        assert_eq!(of(None), "reviews-v1-7d9f8-x2x");
    }
}
