//! The injection webhook as a cluster calls it: the test API server calls its mutating
//! webhooks over HTTPS as kube-apiserver does (the configuration's selectors, its caBundle,
//! its Service's DNS name), the control plane's webhook answers with its certificate from the
//! mesh CA, and the control plane keeps the caBundle itself. A user labels a namespace and
//! applies a Deployment with kubectl; its pods come out injected.

mod common;

use std::sync::Arc;

use base64::Engine as _;
use common::{eventually, TestCluster};
use hypha_config::MeshConfig;
use hypha_control::security::Secure;
use hypha_inject::webhooks::{configuration, WebhookTarget};
use serde_json::Value;

const APP: &str = "\
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {istio-injection: enabled}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: reviews, namespace: shop}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: reviews-v1, namespace: shop}
spec:
  replicas: 1
  selector: {matchLabels: {app: reviews, version: v1}}
  template:
    metadata: {labels: {app: reviews, version: v1}}
    spec:
      serviceAccountName: reviews
      containers:
      - name: reviews
        image: example/reviews:1
        ports: [{name: http, containerPort: 9080}]
        readinessProbe: {httpGet: {path: /ready, port: http}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: plain}
spec:
  replicas: 1
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: web, image: example/web:1}]
";

fn pod(name: &str, ns: &str, extra_meta: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}{extra_meta}}}\n\
         spec: {{containers: [{{name: app, image: example/app:1}}]}}\n"
    )
}

/// The caBundle of each webhook of configuration `name` (`""` where there is none).
fn ca_bundles(cluster: &TestCluster, name: &str) -> Vec<String> {
    let config = cluster.api.get(
        "admissionregistration.k8s.io",
        "mutatingwebhookconfigurations",
        "",
        name,
    );
    config
        .iter()
        .flat_map(|c| c["webhooks"].as_array().cloned().unwrap_or_default())
        .map(|w| {
            w["clientConfig"]["caBundle"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
        .collect()
}

fn injected(p: &Value) -> bool {
    p.pointer("/spec/initContainers")
        .and_then(Value::as_array)
        .is_some_and(|c| c.iter().any(|c| c["name"] == "istio-proxy"))
}

fn pods_of(cluster: &TestCluster, ns: &str, app: &str) -> Vec<Value> {
    cluster
        .api
        .list("", "pods")
        .into_iter()
        .filter(|p| p["metadata"]["namespace"] == ns && p["metadata"]["labels"]["app"] == app)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labelled_namespaces_get_sidecars_from_the_control_planes_webhook() {
    let cluster = TestCluster::start().await;
    let names = vec!["hypha.hypha-system.svc".to_owned()];
    let ca_dir = cluster.dir.path().join("ca");
    let secure =
        Arc::new(Secure::open_named(&MeshConfig::default(), &ca_dir, None, None, names).unwrap());

    // The webhook as `hypha control --webhook` serves it, with the control plane's RBAC.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    cluster
        .api
        .route_service("hypha-system", "hypha", 443, addr);
    let settings = Arc::new(hypha_inject::Settings::default());
    let serving = tokio::spawn(hypha_kube::webhook::serve(
        listener,
        secure.credentials(),
        settings,
    ));
    let target = WebhookTarget::default();
    let keeper = tokio::spawn(hypha_kube::webhook::keep_ca_bundle(
        cluster.client().await,
        target.name.clone(),
        secure.own_root(),
    ));

    // The configuration as installed, without a caBundle: the control plane writes it.
    let config_yaml = hypha_inject::manifest::to_yaml(&configuration(&target));
    let config_file = cluster.apply("injector.yaml", &config_yaml);
    let bundle = base64::engine::general_purpose::STANDARD.encode(secure.own_root());
    let ca_bundles = || ca_bundles(&cluster, &target.name);
    eventually("the caBundle written", || {
        let b = ca_bundles();
        !b.is_empty() && b.iter().all(|x| *x == bundle)
    })
    .await;

    // A user's app: the labelled namespace's pods have sidecars, the other's do not.
    cluster.apply("app.yaml", APP);
    eventually("both Deployments' pods", || {
        !pods_of(&cluster, "shop", "reviews").is_empty()
            && !pods_of(&cluster, "plain", "web").is_empty()
    })
    .await;
    let reviews = pods_of(&cluster, "shop", "reviews").remove(0);
    assert!(injected(&reviews), "{reviews:#}");
    let typed: k8s_openapi::api::core::v1::Pod = serde_json::from_value(reviews.clone()).unwrap();
    let inits: Vec<String> = typed
        .spec
        .unwrap()
        .init_containers
        .unwrap()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(inits, ["istio-init", "istio-proxy"]);
    let env = reviews
        .pointer("/spec/initContainers/1/env")
        .unwrap()
        .as_array()
        .unwrap();
    let workload = env.iter().find(|e| e["name"] == "HYPHA_WORKLOAD").unwrap();
    assert_eq!(workload["value"], "reviews-v1", "the Deployment's name");
    assert_eq!(
        reviews.pointer("/spec/containers/0/readinessProbe/httpGet/path"),
        Some(&Value::from("/app-health/reviews/readyz"))
    );
    assert!(!injected(&pods_of(&cluster, "plain", "web")[0]));

    // A pod that says no, in the labelled namespace; then the other namespace labelled.
    cluster.apply(
        "opt-out.yaml",
        &pod(
            "opt-out",
            "shop",
            ", labels: {sidecar.istio.io/inject: \"false\"}",
        ),
    );
    let opted = cluster.api.get("", "pods", "shop", "opt-out").unwrap();
    assert!(!injected(&opted));
    cluster.kubectl(&["label", "namespace", "plain", "istio-injection=enabled"]);
    cluster.apply("late.yaml", &pod("late", "plain", ""));
    assert!(injected(
        &cluster.api.get("", "pods", "plain", "late").unwrap()
    ));
    // A pod asking for it by label, in a namespace with no label.
    cluster.apply(
        "ns.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: solo}\n",
    );
    cluster.apply(
        "asks.yaml",
        &pod(
            "asks",
            "solo",
            ", labels: {sidecar.istio.io/inject: \"true\"}",
        ),
    );
    assert!(injected(
        &cluster.api.get("", "pods", "solo", "asks").unwrap()
    ));
    cluster.apply("unasked.yaml", &pod("unasked", "solo", ""));
    assert!(!injected(
        &cluster.api.get("", "pods", "solo", "unasked").unwrap()
    ));

    // A bad annotation refuses the pod with the reason.
    let bad = cluster.dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        pod(
            "bad",
            "shop",
            ", annotations: {traffic.sidecar.istio.io/excludeOutboundIPRanges: 10.0.0.0/33}",
        ),
    )
    .unwrap();
    let refused =
        hypha_apiserver::kubectl(cluster.dir.path(), &["apply", "-f", bad.to_str().unwrap()])
            .expect_err("a pod with a bad capture annotation");
    assert!(
        refused.contains("denied the request") && refused.contains("excludeOutboundIPRanges"),
        "{refused}"
    );
    assert!(cluster.api.get("", "pods", "shop", "bad").is_none());

    // Someone replaces the configuration without a caBundle: the control plane writes it back.
    cluster.kubectl(&["replace", "-f", config_file.to_str().unwrap()]);
    eventually("the caBundle written again", || {
        let b = ca_bundles();
        !b.is_empty() && b.iter().all(|x| *x == bundle)
    })
    .await;

    // The control plane down: pods of the namespaces that asked for injection wait (Fail),
    // the cluster's own namespaces and the others are not held up.
    serving.abort();
    keeper.abort();
    let _ = serving.await;
    let down = cluster.dir.path().join("down.yaml");
    std::fs::write(&down, pod("down", "shop", "")).unwrap();
    let refused =
        hypha_apiserver::kubectl(cluster.dir.path(), &["apply", "-f", down.to_str().unwrap()])
            .expect_err("no webhook, no pod in an injected namespace");
    assert!(refused.contains("failed calling webhook"), "{refused}");
    cluster.apply(
        "system.yaml",
        &format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: kube-system}}\n---\n{}",
            pod("coredns", "kube-system", "")
        ),
    );
    assert!(cluster
        .api
        .get("", "pods", "kube-system", "coredns")
        .is_some());
    cluster.apply("solo2.yaml", &pod("other", "solo", ""));
    assert!(cluster.api.get("", "pods", "solo", "other").is_some());
}

/// Revision-based upgrade, as Istio's: a canary control plane's webhook beside the default
/// one; relabelling a namespace from `istio-injection=enabled` to `istio.io/rev=canary` moves
/// its new pods to the canary's sidecar.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relabelling_a_namespace_moves_its_pods_to_another_revision() {
    let cluster = TestCluster::start().await;
    let ca_dir = cluster.dir.path().join("ca");
    let names = vec![
        "hypha.hypha-system.svc".to_owned(),
        "hypha-canary.hypha-system.svc".to_owned(),
    ];
    let secure =
        Arc::new(Secure::open_named(&MeshConfig::default(), &ca_dir, None, None, names).unwrap());
    let mut tasks = Vec::new();
    for (rev, service, image) in [
        ("default", "hypha", "hypha:1"),
        ("canary", "hypha-canary", "hypha:2"),
    ] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        cluster
            .api
            .route_service("hypha-system", service, 443, listener.local_addr().unwrap());
        let settings = hypha_inject::Settings {
            image: image.into(),
            revision: rev.into(),
            ..hypha_inject::Settings::default()
        };
        tasks.push(tokio::spawn(hypha_kube::webhook::serve(
            listener,
            secure.credentials(),
            Arc::new(settings),
        )));
        let target = WebhookTarget {
            name: if rev == "default" {
                "hypha-sidecar-injector".into()
            } else {
                format!("hypha-sidecar-injector-{rev}")
            },
            service: service.into(),
            revision: rev.into(),
            ..WebhookTarget::default()
        };
        tasks.push(tokio::spawn(hypha_kube::webhook::keep_ca_bundle(
            cluster.client().await,
            target.name.clone(),
            secure.own_root(),
        )));
        cluster.apply(
            &format!("injector-{rev}.yaml"),
            &hypha_inject::manifest::to_yaml(&configuration(&target)),
        );
    }
    eventually("both caBundles written", || {
        ["hypha-sidecar-injector", "hypha-sidecar-injector-canary"]
            .iter()
            .all(|n| {
                let b = ca_bundles(&cluster, n);
                !b.is_empty() && b.iter().all(|x| !x.is_empty())
            })
    })
    .await;
    let sidecar_image = |name: &str| {
        let p = cluster.api.get("", "pods", "shop", name).unwrap();
        let proxy = p["spec"]["initContainers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "istio-proxy")
            .cloned()
            .unwrap_or_else(|| panic!("{name} not injected: {p:#}"));
        let status: Value = serde_json::from_str(
            p["metadata"]["annotations"]["sidecar.istio.io/status"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        (
            proxy["image"].as_str().unwrap().to_owned(),
            status["revision"].as_str().unwrap().to_owned(),
        )
    };
    cluster.apply(
        "ns.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio-injection: enabled}}\n",
    );
    cluster.apply("before.yaml", &pod("before", "shop", ""));
    assert_eq!(
        sidecar_image("before"),
        ("hypha:1".into(), "default".into())
    );

    cluster.kubectl(&[
        "label",
        "namespace",
        "shop",
        "istio.io/rev=canary",
        "istio-injection-",
    ]);
    cluster.apply("after.yaml", &pod("after", "shop", ""));
    assert_eq!(sidecar_image("after"), ("hypha:2".into(), "canary".into()));
    // The pod that was there keeps the sidecar it had until it is replaced.
    assert_eq!(
        sidecar_image("before"),
        ("hypha:1".into(), "default".into())
    );
    for t in tasks {
        t.abort();
    }
}
