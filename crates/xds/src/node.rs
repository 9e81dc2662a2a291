//! Who is asking: a proxy's identity from its xDS `Node`, read the way istiod reads it
//! (metadata `NAMESPACE`, `SERVICE_ACCOUNT`, `LABELS`, `INSTANCE_IPS`, `WORKLOAD_NAME`, falling
//! back to the `sidecar~IP~name.namespace~domain` node id).

use std::collections::BTreeMap;
use std::net::IpAddr;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};

/// The facts about one proxy that translation depends on, as its xDS `Node` carries them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct ProxyInfo {
    pub id: String,
    pub namespace: String,
    pub service_account: String,
    pub workload_name: String,
    pub labels: BTreeMap<String, String>,
    pub ips: Vec<IpAddr>,
}

impl ProxyInfo {
    pub fn from_node(node: &Node) -> ProxyInfo {
        let meta = node.metadata.as_ref();
        let s = |key: &str| meta.and_then(|m| string_field(m, key));
        // sidecar~10.0.0.1~productpage-v1.bookinfo~bookinfo.svc.cluster.local
        let parts: Vec<&str> = node.id.split('~').collect();
        let (id_ip, id_name, id_ns) = if parts.len() == 4 {
            let (name, ns) = parts[2].split_once('.').unwrap_or((parts[2], ""));
            (Some(parts[1]), Some(name), Some(ns))
        } else {
            (None, None, None)
        };
        let namespace = s("NAMESPACE")
            .or_else(|| id_ns.filter(|n| !n.is_empty()).map(str::to_string))
            .unwrap_or_else(|| "default".into());
        let mut ips: Vec<IpAddr> = s("INSTANCE_IPS")
            .unwrap_or_default()
            .split(',')
            .filter_map(|ip| ip.trim().parse().ok())
            .collect();
        if ips.is_empty() {
            ips.extend(id_ip.and_then(|ip| ip.parse::<IpAddr>().ok()));
        }
        let labels = meta
            .and_then(|m| m.fields.get("LABELS"))
            .and_then(|v| match &v.kind {
                Some(Kind::StructValue(st)) => Some(
                    st.fields
                        .iter()
                        .filter_map(|(k, v)| match &v.kind {
                            Some(Kind::StringValue(s)) => Some((k.clone(), s.clone())),
                            _ => None,
                        })
                        .collect(),
                ),
                _ => None,
            })
            .unwrap_or_default();
        ProxyInfo {
            id: node.id.clone(),
            namespace,
            service_account: s("SERVICE_ACCOUNT").unwrap_or_else(|| "default".into()),
            workload_name: s("WORKLOAD_NAME")
                .or_else(|| id_name.map(str::to_string))
                .unwrap_or_default(),
            labels,
            ips,
        }
    }

    /// The proxy's own instance: the name a `sidecar~IP~<name>.<namespace>~...` node id
    /// carries (on Kubernetes the pod's, `WORKLOAD_NAME` being its Deployment's, as Istio's
    /// agent sends them), else the workload name; none (`""`, the proxy is then known by its
    /// addresses) when the proxy names no workload.
    pub fn instance(&self) -> &str {
        if self.workload_name.is_empty() {
            return "";
        }
        let mut parts = self.id.split('~');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some(_), Some(_), Some(name), Some(_), None) => {
                name.split_once('.').map_or(name, |(name, _)| name)
            }
            _ => &self.workload_name,
        }
    }

    /// Builds the `Node` a proxy with these facts sends (used by Hypha's proxy and tests).
    pub fn to_node(&self) -> Node {
        let mut fields = BTreeMap::new();
        let string = |s: &str| Value {
            kind: Some(Kind::StringValue(s.to_string())),
        };
        fields.insert("NAMESPACE".to_string(), string(&self.namespace));
        fields.insert("SERVICE_ACCOUNT".to_string(), string(&self.service_account));
        fields.insert("WORKLOAD_NAME".to_string(), string(&self.workload_name));
        let ips: Vec<String> = self.ips.iter().map(ToString::to_string).collect();
        fields.insert("INSTANCE_IPS".to_string(), string(&ips.join(",")));
        let labels = Struct {
            fields: self
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), string(v)))
                .collect(),
        };
        fields.insert(
            "LABELS".to_string(),
            Value {
                kind: Some(Kind::StructValue(labels)),
            },
        );
        Node {
            id: self.id.clone(),
            metadata: Some(Struct {
                fields: fields.into_iter().collect(),
            }),
            ..Default::default()
        }
    }
}

fn string_field(m: &Struct, key: &str) -> Option<String> {
    match &m.fields.get(key)?.kind {
        Some(Kind::StringValue(s)) if !s.is_empty() => Some(s.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_round_trip_and_id_fallback() {
        let p = ProxyInfo {
            id: "sidecar~10.0.0.1~a.ns~ns.svc.cluster.local".into(),
            namespace: "bookinfo".into(),
            service_account: "sa".into(),
            workload_name: "w".into(),
            labels: [("app".to_string(), "x".to_string())].into(),
            ips: vec!["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()],
        };
        assert_eq!(ProxyInfo::from_node(&p.to_node()), p);
        let bare = ProxyInfo::from_node(&Node {
            id: "sidecar~10.0.0.9~reviews-v1.shop~shop.svc.cluster.local".into(),
            ..Default::default()
        });
        assert_eq!(bare.namespace, "shop");
        assert_eq!(bare.workload_name, "reviews-v1");
        assert_eq!(bare.ips, vec!["10.0.0.9".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn a_pod_is_its_instance_and_its_deployment_the_workload() {
        let pod = ProxyInfo {
            id: "sidecar~10.0.0.9~reviews-v1-7d9f8-x2x.shop~shop.svc.cluster.local".into(),
            workload_name: "reviews-v1".into(),
            ..Default::default()
        };
        assert_eq!(pod.instance(), "reviews-v1-7d9f8-x2x");
        let unnamed = ProxyInfo {
            workload_name: String::new(),
            ..pod.clone()
        };
        assert_eq!(unnamed.instance(), "", "found by its addresses");
        let other_id = ProxyInfo {
            id: "router-1".into(),
            ..pod
        };
        assert_eq!(other_id.instance(), "reviews-v1");
    }
}
