//! The control plane end to end: a config directory on disk, the ADS server on loopback, real
//! tonic clients (delta and state of the world) acting as proxies.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::{lb_endpoint, ClusterLoadAssignment};
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::{route, route_action, RouteConfiguration};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use hypha_control::{ControlPlane, ProxyInfo};
use hypha_xds::{type_url, DeltaClient, SotwClient, Update};
use prost::Message;

const WAIT: Duration = Duration::from_secs(10);

fn copy_examples() -> tempdir::Dir {
    let dir = tempdir::Dir::new("hypha-control-ads");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/bookinfo");
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    dir
}

/// A tiny self-cleaning temp dir (no extra dependency).
mod tempdir {
    use std::path::{Path, PathBuf};

    pub struct Dir(PathBuf);

    impl Dir {
        pub fn new(prefix: &str) -> Dir {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let p = std::env::temp_dir().join(format!("{prefix}-{}-{nanos}", std::process::id()));
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

async fn start(dir: &Path) -> (ControlPlane, String) {
    let cfg = hypha_control::initial_config(Some(dir)).expect("example config is valid");
    let cp = ControlPlane::new(cfg);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let uri = format!("http://{}", l.local_addr().unwrap());
    let serving = cp.clone();
    tokio::spawn(async move { serving.serve(l).await });
    let watching = cp.clone();
    let d: PathBuf = dir.to_path_buf();
    tokio::spawn(async move { watching.watch_dir(d, Duration::from_millis(20)).await });
    (cp, uri)
}

fn reviews_proxy() -> ProxyInfo {
    ProxyInfo {
        id: "sidecar~10.10.0.31~reviews-v1.bookinfo~bookinfo.svc.cluster.local".into(),
        namespace: "bookinfo".into(),
        service_account: "bookinfo-reviews".into(),
        workload_name: "reviews-v1".into(),
        labels: BTreeMap::from([
            ("app".into(), "reviews".into()),
            ("version".into(), "v1".into()),
        ]),
        ips: vec![
            "10.10.0.31".parse().unwrap(),
            "fd00:10::31".parse().unwrap(),
        ],
    }
}

async fn next(c: &mut DeltaClient) -> Update {
    let u = tokio::time::timeout(WAIT, c.next())
        .await
        .expect("update within the deadline")
        .expect("stream ok")
        .expect("stream open");
    c.ack_or_nack(&u, Ok(())).await.unwrap();
    u
}

/// Reads updates until one of each wanted type has arrived; returns resources by type.
async fn collect(c: &mut DeltaClient, want: &[&str]) -> HashMap<String, Update> {
    let mut got = HashMap::new();
    while !want.iter().all(|t| got.contains_key(*t)) {
        let u = next(c).await;
        got.insert(u.type_url.clone(), u);
    }
    got
}

fn decode<M: Message + Default>(u: &Update, name: &str) -> M {
    let r = u
        .resources
        .iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("{name} not in {:?}", names(u)));
    M::decode(&*r.body.value).unwrap()
}

fn names(u: &Update) -> Vec<&str> {
    u.resources.iter().map(|r| r.name.as_str()).collect()
}

fn weights(rc: &RouteConfiguration, vhost: &str, route_name: &str) -> Vec<(String, u32)> {
    let vh = rc.virtual_hosts.iter().find(|v| v.name == vhost).unwrap();
    let r = vh.routes.iter().find(|r| r.name == route_name).unwrap();
    let Some(route::Action::Route(ra)) = &r.action else {
        panic!("not a route action")
    };
    match ra.cluster_specifier.as_ref().unwrap() {
        route_action::ClusterSpecifier::WeightedClusters(w) => w
            .clusters
            .iter()
            .map(|c| (c.name.clone(), c.weight.as_ref().unwrap().value))
            .collect(),
        route_action::ClusterSpecifier::Cluster(c) => vec![(c.clone(), 100)],
        _ => panic!("unexpected cluster specifier"),
    }
}

#[tokio::test]
async fn delta_fetch_change_reject_and_remove() {
    let dir = copy_examples();
    let (cp, uri) = start(dir.path()).await;
    let mut c = DeltaClient::connect(uri.clone(), reviews_proxy().to_node())
        .await
        .unwrap();
    c.subscribe(type_url::ROUTE, ["9080"]).await.unwrap();
    let reviews_v1 = "outbound|9080|v1|reviews.bookinfo.svc.cluster.local";
    let ratings = "outbound|9080||ratings.bookinfo.svc.cluster.local";
    c.subscribe(type_url::ENDPOINT, [reviews_v1, ratings])
        .await
        .unwrap();

    // First fetch: every type arrives, with the bookinfo resources in it.
    let first = collect(
        &mut c,
        &[
            type_url::CLUSTER,
            type_url::LISTENER,
            type_url::ROUTE,
            type_url::ENDPOINT,
        ],
    )
    .await;
    let clusters = &first[type_url::CLUSTER];
    for name in [reviews_v1, ratings, "inbound|9080||", "PassthroughCluster"] {
        assert!(
            names(clusters).contains(&name),
            "{name} missing: {:?}",
            names(clusters)
        );
    }
    let cluster: Cluster = decode(clusters, reviews_v1);
    assert_eq!(
        cluster
            .outlier_detection
            .unwrap()
            .consecutive_5xx
            .unwrap()
            .value,
        3
    );
    let listeners = &first[type_url::LISTENER];
    for name in [
        "0.0.0.0_9080",
        "virtualInbound",
        "virtualOutbound",
        "ratings.bookinfo.svc.cluster.local:9080",
    ] {
        assert!(
            names(listeners).contains(&name),
            "{name} missing: {:?}",
            names(listeners)
        );
    }
    let l: Listener = decode(listeners, "0.0.0.0_9080");
    assert_eq!(
        l.additional_addresses.len(),
        1,
        "dual-stack listener has an IPv6 address too"
    );

    // Dual stack: reviews-v1 has both families; ratings is IPv6-only.
    let mut endpoints = first[type_url::ENDPOINT].clone();
    if endpoints.resources.len() < 2 {
        endpoints.resources.extend(next(&mut c).await.resources);
    }
    let addrs = |cla: &ClusterLoadAssignment| -> Vec<String> {
        let mut out = Vec::new();
        for lle in &cla.endpoints {
            for e in &lle.lb_endpoints {
                let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                    continue;
                };
                let mut all = vec![ep.address.clone().unwrap()];
                all.extend(
                    ep.additional_addresses
                        .iter()
                        .filter_map(|a| a.address.clone()),
                );
                for a in all {
                    if let Some(
                        envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(
                            s,
                        ),
                    ) = a.address
                    {
                        out.push(s.address);
                    }
                }
            }
        }
        out
    };
    let v1: ClusterLoadAssignment = decode(&endpoints, reviews_v1);
    assert_eq!(addrs(&v1), vec!["10.10.0.31", "fd00:10::31"]);
    let r: ClusterLoadAssignment = decode(&endpoints, ratings);
    assert_eq!(addrs(&r), vec!["fd00:10::40"]);

    let rc: RouteConfiguration = decode(&first[type_url::ROUTE], "9080");
    let vhost = "reviews.bookinfo.svc.cluster.local:9080";
    assert_eq!(
        weights(&rc, vhost, "canary"),
        vec![
            (reviews_v1.to_string(), 80),
            (
                "outbound|9080|v3|reviews.bookinfo.svc.cluster.local".to_string(),
                20
            )
        ]
    );

    // A change to one VirtualService pushes exactly the route table it changes.
    let routing = dir.path().join("routing.yaml");
    let text = std::fs::read_to_string(&routing).unwrap();
    std::fs::write(
        &routing,
        text.replace("weight: 80", "weight: 50")
            .replace("weight: 20", "weight: 50"),
    )
    .unwrap();
    let u = next(&mut c).await;
    assert_eq!(u.type_url, type_url::ROUTE);
    assert_eq!(names(&u), vec!["9080"]);
    assert!(u.removed.is_empty());
    let rc: RouteConfiguration = decode(&u, "9080");
    assert_eq!(weights(&rc, vhost, "canary")[0].1, 50);
    let generation = cp.current().version().to_string();

    // An invalid change is rejected: nothing is pushed and the old generation keeps serving.
    std::fs::write(dir.path().join("broken.yaml"), "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: bad, namespace: bookinfo}\nspec:\n  hosts: [details]\n  http:\n  - match: [{uri: {regex: \"(\"}}]\n    route: [{destination: {host: details}}]\n").unwrap();
    tokio::time::timeout(WAIT, async {
        while cp.rejected_changes() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the broken change is noticed and rejected");
    assert_eq!(cp.current().version(), generation);
    std::fs::remove_file(dir.path().join("broken.yaml")).unwrap();

    // So is ISTIO_MUTUAL on this control plane, which runs no CA: its sidecars have no
    // certificates, and the rule would go out as plaintext.
    std::fs::write(dir.path().join("mutual.yaml"), "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: mutual, namespace: bookinfo}\nspec:\n  host: details\n  trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}\n").unwrap();
    tokio::time::timeout(WAIT, async {
        while cp.rejected_changes() < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("ISTIO_MUTUAL without a CA is rejected");
    assert_eq!(cp.current().version(), generation);
    let needs = hypha_control::initial_config(Some(dir.path())).unwrap();
    let d = hypha_config::needs_the_ca(&needs);
    let e = d.errors().next().expect("an error");
    assert!(
        e.file.ends_with("mutual.yaml") && e.line == 6 && e.path == "spec.trafficPolicy.tls.mode",
        "{e}"
    );
    std::fs::remove_file(dir.path().join("mutual.yaml")).unwrap();

    // A new service appears as new clusters; removing it removes them.
    std::fs::write(dir.path().join("extra.yaml"), "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: extra, namespace: bookinfo}\nspec:\n  hosts: [extra.example.com]\n  ports: [{number: 7000, name: tcp, protocol: TCP}]\n  resolution: DNS\n").unwrap();
    let extra = "outbound|7000||extra.example.com";
    let mut seen = false;
    while !seen {
        let u = next(&mut c).await;
        seen = u.type_url == type_url::CLUSTER && names(&u).contains(&extra);
        if u.type_url == type_url::CLUSTER {
            assert!(
                !names(&u).contains(&reviews_v1),
                "unchanged clusters are not resent: {:?}",
                names(&u)
            );
        }
    }
    std::fs::remove_file(dir.path().join("extra.yaml")).unwrap();
    let mut removed = false;
    while !removed {
        let u = next(&mut c).await;
        removed = u.type_url == type_url::CLUSTER && u.removed.iter().any(|n| n == extra);
    }
    assert!(cp.subscribers() >= 1);
}

#[tokio::test]
async fn sotw_and_proxyless_grpc_api_listener() {
    let dir = copy_examples();
    let (_cp, uri) = start(dir.path()).await;
    let node = ProxyInfo {
        id: "grpc-client-1".into(),
        namespace: "bookinfo".into(),
        ..Default::default()
    }
    .to_node();
    let mut c = SotwClient::connect(uri, node).await.unwrap();
    let host = "ratings.bookinfo.svc.cluster.local:9080";
    c.subscribe(type_url::LISTENER, vec![host.to_string()])
        .await
        .unwrap();
    let resp = tokio::time::timeout(WAIT, c.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(resp.type_url, type_url::LISTENER);
    assert_eq!(
        resp.resources.len(),
        1,
        "a named subscription gets only that listener"
    );
    let l = Listener::decode(&*resp.resources[0].value).unwrap();
    assert_eq!(l.name, host);
    assert!(
        l.api_listener.is_some(),
        "proxyless gRPC needs an api_listener"
    );
    c.ack(&resp).await.unwrap();
    c.subscribe(type_url::ROUTE, vec![host.to_string()])
        .await
        .unwrap();
    let resp = tokio::time::timeout(WAIT, c.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(resp.type_url, type_url::ROUTE);
    let rc = RouteConfiguration::decode(&*resp.resources[0].value).unwrap();
    assert_eq!(rc.name, host);
    assert!(rc.virtual_hosts[0].domains.contains(&host.to_string()));
    // A NACK is accepted without breaking the stream: a new request still gets answered.
    c.nack(&resp, "test rejects this").await.unwrap();
    c.send(DiscoveryRequest {
        type_url: "type.googleapis.com/hypha.test.Unknown".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let resp = tokio::time::timeout(WAIT, c.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(resp.type_url, "type.googleapis.com/hypha.test.Unknown");
}
