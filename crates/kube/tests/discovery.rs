//! The control plane reading a cluster, driven as a user drives one: manifests applied with
//! the machine's kubectl to the test API server (whose controllers turn Deployments into
//! Pods and EndpointSlices), and the mesh the control plane then serves checked: services
//! with their dual-stack VIPs and pod endpoints, headless and ExternalName Services, scaling,
//! an invalid VirtualService reported on the object while the rest is served, and watches
//! that survive the API server closing them and compacting its history.

mod common;

use std::time::Duration;

use common::{eventually, TestCluster};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use hypha_config::networking::Resolution;
use hypha_config::Config;
use hypha_control::{ControlPlane, ProxyInfo};
use hypha_xds::{type_url, DeltaClient};
use serde_json::{json, Value};

const APP: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: reviews, namespace: shop}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec:
  ipFamilyPolicy: PreferDualStack
  selector: {app: reviews}
  ports:
  - {name: http, port: 9080, targetPort: web}
  - {name: metrics, port: 9090, appProtocol: http}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: reviews, namespace: shop}
spec:
  replicas: 2
  selector: {matchLabels: {app: reviews}}
  template:
    metadata: {labels: {app: reviews, version: v1, security.istio.io/tlsMode: istio}}
    spec:
      serviceAccountName: reviews
      containers:
      - name: reviews
        image: example/reviews:1
        ports: [{name: web, containerPort: 8080}, {containerPort: 9090}]
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec:
  clusterIP: None
  selector: {app: db}
  ports: [{name: tcp-db, port: 5432}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: db, namespace: shop}
spec:
  replicas: 1
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec:
      containers: [{name: db, image: example/db:1, ports: [{containerPort: 5432}]}]
---
apiVersion: v1
kind: Service
metadata: {name: payments, namespace: shop}
spec:
  type: ExternalName
  externalName: payments.example.com
  ports: [{name: https, port: 443}]
---
# Istio's older versions are served too (the same objects).
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  subsets: [{name: v1, labels: {version: v1}}]
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http: [{route: [{destination: {host: reviews, subset: v1}}]}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db-replicas, namespace: shop}
spec:
  hosts: [replicas.db.internal]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 5432, name: tcp-db}]
  workloadSelector: {labels: {app: db}}
";

const BAD: &str = "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: broken, namespace: shop}
spec:
  hosts: [ratings]
  http: [{route: [{destination: {host: ratings, subset: v9}}]}]
";

/// The endpoints of ClusterLoadAssignment `name` in the sidecar's updates (acknowledged), once
/// there are `want` of them, or whatever there are after 10 s.
async fn sidecar_endpoints(sidecar: &mut DeltaClient, name: &str, want: usize) -> usize {
    use prost::Message;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut count = 0;
    while count != want {
        let Ok(update) = tokio::time::timeout_at(deadline, sidecar.next()).await else {
            break;
        };
        let update = update.unwrap().expect("the stream stays open");
        sidecar.ack_or_nack(&update, Ok(())).await.unwrap();
        if update.type_url != type_url::ENDPOINT {
            continue;
        }
        for r in update.resources.iter().filter(|r| r.name == name) {
            let cla = ClusterLoadAssignment::decode(r.body.value.as_slice()).unwrap();
            count = cla.endpoints.iter().map(|l| l.lb_endpoints.len()).sum();
        }
    }
    count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_follows_the_cluster() {
    let cluster = TestCluster::start().await;
    let api = &cluster.api;
    api.put(
        "",
        "nodes",
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1",
               "labels": {"topology.kubernetes.io/region": "eu", "topology.kubernetes.io/zone": "eu-1"}}}),
    );
    let manifests = cluster.dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    // The CRDs first, as on a cluster: kubectl validates objects against the kinds it knows.
    cluster.apply("crds.yaml", hypha_kube::ISTIO_CRDS);
    std::fs::write(manifests.join("1-app.yaml"), APP).unwrap();
    let apply_all = || cluster.kubectl(&["apply", "-f", manifests.to_str().unwrap()]);
    apply_all();

    let cp = ControlPlane::new(Config::default());
    let (file_config, files) = tokio::sync::watch::channel(Config::default());
    // The control plane with only the permissions of manifests/base/rbac.yaml.
    let source = tokio::spawn(hypha_kube::run(cluster.client().await, cp.clone(), files));

    let reviews = "reviews.shop.svc.cluster.local";
    let endpoints = |host: &str| {
        cp.current()
            .registry
            .service(host, "shop")
            .map_or(0, |s| s.endpoints.len())
    };
    eventually("the reviews pods as endpoints", || endpoints(reviews) == 2).await;
    let t = cp.current();
    let s = t.registry.service(reviews, "shop").unwrap();
    assert_eq!(s.vips.len(), 2, "dual-stack VIPs: {:?}", s.vips);
    assert!(s.vips[0].is_ipv4() && s.vips[1].is_ipv6());
    for e in &s.endpoints {
        assert_eq!(e.addresses.len(), 2, "both families: {:?}", e.addresses);
        assert_eq!(e.service_account, "reviews");
        assert_eq!(e.labels["version"], "v1");
        assert_eq!(e.locality, "eu/eu-1");
        assert!(e.sidecar, "labelled tlsMode istio");
        assert_eq!(e.port_for(&s.ports[0]), 8080, "named targetPort resolved");
        assert!(
            e.workload_name.starts_with("reviews-"),
            "{}",
            e.workload_name
        );
    }
    assert!(s.ports[1].protocol.is_http(), "appProtocol: http");
    // The pods are workloads too, found by name as a sidecar's own.
    let pod = &s.endpoints[0].workload_name;
    assert_eq!(t.registry.workloads_of("shop", pod, &[]).len(), 1);
    let db = t
        .registry
        .service("db.shop.svc.cluster.local", "shop")
        .unwrap();
    assert!(db.vips.is_empty(), "headless");
    assert_eq!(db.resolution, Resolution::None);
    assert_eq!(db.endpoints.len(), 1);
    assert!(!db.endpoints[0].sidecar, "no tlsMode label: no sidecar");
    let payments = t
        .registry
        .service("payments.shop.svc.cluster.local", "shop")
        .unwrap();
    assert_eq!(payments.resolution, Resolution::Dns);
    assert_eq!(payments.endpoints[0].addresses, ["payments.example.com"]);
    assert_eq!(t.cfg.virtual_services.len(), 1, "applied as v1beta1");
    assert_eq!(t.cfg.destination_rules.len(), 1, "applied as v1alpha3");
    // A ServiceEntry's workloadSelector selects pods, as WorkloadEntries.
    let replicas = t.registry.service("replicas.db.internal", "shop").unwrap();
    assert_eq!(replicas.endpoints.len(), 1);
    assert_eq!(
        replicas.endpoints[0].workload_name,
        db.endpoints[0].workload_name
    );
    drop(t);

    // A sidecar of the shop namespace, watching the reviews endpoints.
    let uri = common::serve(&cp).await;
    let proxy = ProxyInfo {
        id: "sidecar~10.0.0.9~client.shop~shop.svc.cluster.local".into(),
        namespace: "shop".into(),
        ..Default::default()
    };
    let mut sidecar = DeltaClient::connect(uri, proxy.to_node()).await.unwrap();
    let cla = format!("outbound|9080||{reviews}");
    sidecar
        .subscribe(type_url::ENDPOINT, [cla.as_str()])
        .await
        .unwrap();
    assert_eq!(sidecar_endpoints(&mut sidecar, &cla, 2).await, 2);

    cluster.kubectl(&["scale", "-n", "shop", "deployment/reviews", "--replicas=3"]);
    eventually("a scaled Deployment's endpoints", || {
        endpoints(reviews) == 3
    })
    .await;
    assert_eq!(
        sidecar_endpoints(&mut sidecar, &cla, 3).await,
        3,
        "at the sidecar"
    );

    // A pod deleted gracefully is Terminating first: its endpoint leaves the mesh while the
    // pod still exists; then the pod goes, and its replacement is an endpoint.
    api.set_pod_shutdown(Duration::from_secs(4));
    let pod_names = || -> Vec<String> {
        (cp.current()
            .registry
            .service(reviews, "shop")
            .unwrap()
            .endpoints
            .iter())
        .map(|e| e.workload_name.clone())
        .collect()
    };
    let victim = pod_names()[0].clone();
    cluster.kubectl(&["delete", "pod", "-n", "shop", &victim, "--wait=false"]);
    eventually(
        "a terminating pod's endpoint gone while the pod is not",
        || {
            let terminating = api
                .get("", "pods", "shop", &victim)
                .is_some_and(|p| p.pointer("/metadata/deletionTimestamp").is_some());
            terminating && !pod_names().contains(&victim)
        },
    )
    .await;
    eventually("the pod removed, its replacement an endpoint", || {
        api.get("", "pods", "shop", &victim).is_none()
            && pod_names().len() == 3
            && !pod_names().contains(&victim)
    })
    .await;

    // An invalid VirtualService: reported on the object, left out, the rest still served.
    std::fs::write(manifests.join("2-bad.yaml"), BAD).unwrap();
    apply_all();
    eventually("validationMessages on the invalid object", || {
        api.get("networking.istio.io", "virtualservices", "shop", "broken")
            .and_then(|o| {
                o.pointer("/status/validationMessages/0/description")
                    .cloned()
            })
            .is_some()
    })
    .await;
    let events = api.list("", "events");
    assert!(
        events
            .iter()
            .any(|e| e["involvedObject"]["name"] == "broken"
                && e["type"] == "Warning"
                && e["message"].as_str().unwrap_or("").contains("spec.")),
        "{events:?}"
    );
    cluster.kubectl(&["scale", "-n", "shop", "deployment/reviews", "--replicas=1"]);
    eventually("changes pushed beside an invalid object", || {
        endpoints(reviews) == 1
    })
    .await;
    let names: Vec<String> = cp
        .current()
        .cfg
        .virtual_services
        .iter()
        .map(|v| v.name.clone())
        .collect();
    assert_eq!(names, ["reviews"]);
    assert_eq!(cp.rejected_changes(), 0);

    // Files combine with the cluster: a VirtualService from a file on a Kubernetes Service,
    // parsed only, as `hypha control --config DIR --kubernetes` hands them over (alone, it
    // would name no service).
    let config_dir = cluster.dir.path().join("config");
    std::fs::create_dir(&config_dir).unwrap();
    std::fs::write(
        config_dir.join("ratings.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\n\
         metadata: {name: from-file, namespace: shop}\n\
         spec: {hosts: [db], tcp: [{route: [{destination: {host: db}}]}]}\n",
    )
    .unwrap();
    assert!(
        hypha_config::load(&config_dir).has_errors(),
        "alone, it is invalid"
    );
    let from_file =
        hypha_config::parse_cached(&config_dir, &mut hypha_config::LoadCache::default());
    assert!(!from_file.has_errors(), "{:?}", from_file.diagnostics);
    file_config.send_replace(from_file.config);
    eventually("a file's VirtualService on a cluster's Service", || {
        cp.current()
            .cfg
            .virtual_services
            .iter()
            .any(|v| v.name == "from-file")
    })
    .await;

    // Fixed: it is served, and its messages go.
    std::fs::write(
        manifests.join("2-bad.yaml"),
        BAD.replace("ratings", "reviews").replace("v9", "v1"),
    )
    .unwrap();
    apply_all();
    eventually("the fixed object served, its messages gone", || {
        cp.current()
            .cfg
            .virtual_services
            .iter()
            .any(|v| v.name == "broken")
            && api
                .get("networking.istio.io", "virtualservices", "shop", "broken")
                .is_some_and(|o| {
                    o.pointer("/status/validationMessages")
                        .is_none_or(Value::is_null)
                })
    })
    .await;

    // The API server ends every watch and forgets its history: the watches relist (410 Gone)
    // and nothing is lost.
    let before = cp.current().version().parse::<u64>().unwrap();
    api.compact();
    api.close_watches();
    cluster.kubectl(&["scale", "-n", "shop", "deployment/reviews", "--replicas=2"]);
    cluster.kubectl(&["delete", "-n", "shop", "service", "db"]);
    eventually("changes made while the watches were down", || {
        endpoints(reviews) == 2
            && cp
                .current()
                .registry
                .service("db.shop.svc.cluster.local", "shop")
                .is_none()
    })
    .await;
    // The file's VirtualService on the deleted Service is left out; the rest moved on.
    assert!(!cp
        .current()
        .cfg
        .virtual_services
        .iter()
        .any(|v| v.name == "from-file"));
    assert_eq!(cp.rejected_changes(), 0);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = cp.current().version().parse::<u64>().unwrap();
    assert!(
        after - before <= 4,
        "a relist pushes what changed, not a storm: {before} → {after}"
    );
    source.abort();
}
