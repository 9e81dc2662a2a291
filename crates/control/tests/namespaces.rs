//! Which rules a sidecar applies to a host. What one namespace's sidecars see must not leak
//! into another's: routes that depend on the source namespace, and services exported to one
//! namespace only, are translated per namespace even though the translation shares everything
//! it can between namespaces. Rules whose host is a wildcard apply to the services it covers,
//! after those naming a service exactly, the most specific wildcard first (Istio's order).

use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::{cluster::LbPolicy, Cluster};
use envoy_types::pb::envoy::config::route::v3::{route, route_action, RouteConfiguration};
use hypha_control::{ProxyInfo, Translation};
use hypha_xds::{type_url, Snapshot};
use prost::Message;

const CONFIG: &str = "\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web, namespace: shop}
spec:
  hosts: [web.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints: [{address: 10.0.0.1, labels: {version: v1}}, {address: 10.0.0.2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: secret, namespace: shop}
spec:
  hosts: [secret.shop.svc.cluster.local]
  exportTo: [\".\"]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints: [{address: 10.0.0.3}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: shop}
spec:
  host: web
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: shop}
spec:
  hosts: [web]
  http:
  - match: [{sourceNamespace: canary}]
    route: [{destination: {host: web, subset: v2}}]
  - route: [{destination: {host: web, subset: v1}}]
";

fn proxy(ns: &str) -> ProxyInfo {
    ProxyInfo {
        id: format!("sidecar~10.9.0.1~client.{ns}~{ns}.svc.cluster.local"),
        namespace: ns.into(),
        ..Default::default()
    }
}

fn route_config(snap: &Snapshot, name: &str) -> RouteConfiguration {
    let routes = snap.resources(type_url::ROUTE).unwrap();
    let r = routes
        .get(name)
        .unwrap_or_else(|| panic!("no route table {name}"));
    RouteConfiguration::decode(&*r.body.value).unwrap()
}

/// The clusters route table `name`'s first virtual host sends to, in order.
fn route_clusters(snap: &Snapshot, name: &str) -> Vec<String> {
    route_config(snap, name).virtual_hosts[0]
        .routes
        .iter()
        .map(|r| match &r.action {
            Some(route::Action::Route(ra)) => match &ra.cluster_specifier {
                Some(route_action::ClusterSpecifier::Cluster(c)) => c.clone(),
                other => format!("{other:?}"),
            },
            other => format!("{other:?}"),
        })
        .collect()
}

/// The clusters the `web.shop.svc.cluster.local:80` route table sends to, in order, and
/// whether the port-80 table has a virtual host for `secret`.
fn view(t: &Translation, ns: &str) -> (Vec<String>, bool) {
    let snap = t.snapshot(&proxy(ns));
    let clusters = route_clusters(&snap, "web.shop.svc.cluster.local:80");
    let secret = route_config(&snap, "80")
        .virtual_hosts
        .iter()
        .any(|vh| vh.name.starts_with("secret."));
    (clusters, secret)
}

#[test]
fn source_namespace_routes_and_export_to_stay_per_namespace() {
    let loaded = hypha_config::load_str("ns.yaml", CONFIG);
    assert!(!loaded.has_errors(), "{:?}", loaded.diagnostics);
    let t = Translation::new(Arc::new(loaded.config), "1");
    let v1 = "outbound|80|v1|web.shop.svc.cluster.local".to_string();
    let v2 = "outbound|80|v2|web.shop.svc.cluster.local".to_string();
    // Asked in an order where a translation shared between namespaces would hand the first
    // namespace's answer to the next.
    assert_eq!(view(&t, "canary"), (vec![v2, v1.clone()], false));
    assert_eq!(view(&t, "other"), (vec![v1.clone()], false));
    assert_eq!(view(&t, "shop"), (vec![v1], true));
}

/// A sidecar finds its own workload by name; by address only when it names none (two
/// workloads on one host share addresses).
#[test]
fn own_workload_by_name_then_by_address() {
    let cfg = hypha_control::initial_config(None).unwrap();
    let t = Translation::new(Arc::new(cfg), "1");
    let inbound_clusters = |p: &ProxyInfo| -> Vec<String> {
        let snap = t.snapshot(p);
        snap.resources(type_url::CLUSTER)
            .unwrap()
            .iter()
            .filter(|r| r.name.starts_with("inbound|"))
            .map(|r| r.name.clone())
            .collect()
    };
    let details_ip = ProxyInfo {
        id: "sidecar~10.10.0.20~x.bookinfo~bookinfo.svc.cluster.local".into(),
        namespace: "bookinfo".into(),
        ips: vec!["10.10.0.20".parse().unwrap()],
        ..Default::default()
    };
    // No name: the workload at its address (details).
    assert_eq!(inbound_clusters(&details_ip), ["inbound|9080||"]);
    // A name that has no WorkloadEntry: nothing, even at details' address.
    let named = ProxyInfo {
        workload_name: "a-client".into(),
        ..details_ip.clone()
    };
    assert!(inbound_clusters(&named).is_empty());
}

const WILDCARDS: &str = "\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: shop, namespace: shop}
spec:
  hosts: [reviews.shop.svc.cluster.local, ratings.shop.svc.cluster.local, details.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints: [{address: 10.0.0.1, labels: {version: v1}}, {address: 10.0.0.2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: other, namespace: other}
spec:
  hosts: [other.other.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints: [{address: 10.0.1.1}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: shop-wide, namespace: shop}
spec:
  host: \"*.shop.svc.cluster.local\"
  trafficPolicy: {loadBalancer: {simple: RANDOM}}
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings, namespace: shop}
spec:
  host: ratings
  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
  subsets: [{name: v1, labels: {version: v1}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: everything, namespace: shop}
spec:
  hosts: [\"*.svc.cluster.local\"]
  http: [{route: [{destination: {host: reviews.shop.svc.cluster.local, subset: v1}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: shop-wide, namespace: shop}
spec:
  hosts: [\"*.shop.svc.cluster.local\"]
  http: [{route: [{destination: {host: reviews.shop.svc.cluster.local, subset: v2}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings, namespace: shop}
spec:
  hosts: [ratings]
  http: [{route: [{destination: {host: ratings, subset: v1}}]}]
";

#[test]
fn wildcard_hosts_apply_after_exact_ones_most_specific_first() {
    let loaded = hypha_config::load_str("wildcards.yaml", WILDCARDS);
    assert!(!loaded.has_errors(), "{:?}", loaded.diagnostics);
    let t = Translation::new(Arc::new(loaded.config), "1");
    let snap = t.snapshot(&proxy("client"));
    let routes = |host: &str| route_clusters(&snap, &format!("{host}:80"));
    let to = |subset: &str, host: &str| vec![format!("outbound|80|{subset}|{host}")];

    // Named exactly: its own VirtualService.
    assert_eq!(
        routes("ratings.shop.svc.cluster.local"),
        to("v1", "ratings.shop.svc.cluster.local")
    );
    // Covered by both wildcards: the more specific one's.
    for host in ["reviews", "details"] {
        assert_eq!(
            routes(&format!("{host}.shop.svc.cluster.local")),
            to("v2", "reviews.shop.svc.cluster.local"),
            "{host}"
        );
    }
    // Covered by the broad one only.
    assert_eq!(
        routes("other.other.svc.cluster.local"),
        to("v1", "reviews.shop.svc.cluster.local")
    );

    // DestinationRules alike: the wildcard's policy and subsets where no rule names the
    // service, the exact rule where one does, none outside the wildcard.
    let clusters: std::collections::HashMap<String, Cluster> = snap
        .resources(type_url::CLUSTER)
        .unwrap()
        .iter()
        .map(|r| (r.name.clone(), Cluster::decode(&*r.body.value).unwrap()))
        .collect();
    let lb = |name: &str| {
        let c = clusters
            .get(name)
            .unwrap_or_else(|| panic!("no cluster {name}"));
        LbPolicy::try_from(c.lb_policy).unwrap()
    };
    assert_eq!(
        lb("outbound|80||details.shop.svc.cluster.local"),
        LbPolicy::Random
    );
    assert_eq!(
        lb("outbound|80|v2|details.shop.svc.cluster.local"),
        LbPolicy::Random
    );
    assert_eq!(
        lb("outbound|80||ratings.shop.svc.cluster.local"),
        LbPolicy::RoundRobin
    );
    assert!(!clusters.contains_key("outbound|80|v2|ratings.shop.svc.cluster.local"));
    // Istio's default.
    assert_eq!(
        lb("outbound|80||other.other.svc.cluster.local"),
        LbPolicy::LeastRequest
    );
    assert!(!clusters.contains_key("outbound|80|v1|other.other.svc.cluster.local"));
}
