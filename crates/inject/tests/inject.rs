//! Injection as kube-apiserver asks for it (AdmissionReview-shaped pods) and as
//! `hypha inject -f` does it, checked against the Kubernetes types.

use hypha_inject::{
    inject, manifest, probes, Injected, Outcome, Settings, SidecarKind, Skip, Target,
};
use k8s_openapi::api::core::v1::Pod;
use serde_json::{json, Value};

fn review() -> Value {
    serde_json::from_str(include_str!("data/review-reviews-v1.json")).unwrap()
}

fn pod_of(review: &Value) -> Value {
    review["request"]["object"].clone()
}

fn target(review: &Value) -> Target {
    Target {
        namespace: review["request"]["namespace"].as_str().unwrap().to_owned(),
        workload: None,
    }
}

fn injected(pod: &Value, settings: &Settings) -> Injected {
    match inject(pod, &target(&review()), settings).unwrap() {
        Outcome::Injected(i) => i,
        Outcome::Skipped(why) => panic!("skipped: {why}"),
    }
}

/// Every field of `v` is one the Kubernetes types know: reading it as a Pod and writing it
/// back gives it again (a misspelt field would be dropped).
fn typed_round_trip(v: &Value) -> Pod {
    let pod: Pod = serde_json::from_value(v.clone()).unwrap();
    let back = serde_json::to_value(&pod).unwrap();
    let strip = |mut v: Value| {
        // Fields the typed Pod writes out empty or in another form but means the same.
        v["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("creationTimestamp");
        let o = v.as_object_mut().unwrap();
        o.remove("apiVersion");
        o.remove("kind");
        v
    };
    assert_eq!(
        strip(back),
        strip(v.clone()),
        "a field the Pod type does not know"
    );
    pod
}

fn container<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name} in {list:#}"))
}

fn env<'a>(c: &'a Value, name: &str) -> Option<&'a Value> {
    c["env"].as_array()?.iter().find(|e| e["name"] == name)
}

fn args(c: &Value) -> Vec<&str> {
    c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect()
}

fn flag<'a>(args: &[&'a str], flag: &str) -> Option<&'a str> {
    let i = args.iter().position(|a| *a == flag)?;
    args.get(i + 1).copied()
}

#[test]
fn a_deployments_pod_gets_capture_native_sidecar_token_and_probes_through_the_sidecar() {
    let review = review();
    let original = pod_of(&review);
    let done = injected(&original, &Settings::default());

    // The patch is what a webhook answers: applied to what the API server sent, it gives
    // the injected pod, and that is a Pod the Kubernetes types read in full.
    let mut patched = original.clone();
    json_patch::patch(&mut patched, &done.patch).unwrap();
    assert_eq!(patched, done.pod);
    let pod = typed_round_trip(&patched);
    let spec = pod.spec.as_ref().unwrap();

    // Capture first, then the native sidecar, then the pod's own init containers.
    let inits: Vec<&str> = spec
        .init_containers
        .as_ref()
        .unwrap()
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(inits, ["istio-init", "istio-proxy", "migrate"]);
    let names: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        ["reviews"],
        "a native sidecar is no regular container"
    );

    let inits = &patched["spec"]["initContainers"];
    let init = container(inits, "istio-init");
    let init_args = args(init);
    assert_eq!(init_args[0], "capture");
    assert_eq!(flag(&init_args, "--exclude-outbound-ports"), Some("5432"));
    assert_eq!(
        flag(&init_args, "--exclude-inbound-ports"),
        Some("15020,15021,15090")
    );
    assert_eq!(flag(&init_args, "--include-outbound-ip-ranges"), Some("*"));
    assert_eq!(
        init["securityContext"]["capabilities"]["add"],
        json!(["NET_ADMIN", "NET_RAW"])
    );

    let proxy = container(inits, "istio-proxy");
    assert_eq!(proxy["restartPolicy"], "Always");
    assert_eq!(proxy["startupProbe"]["httpGet"]["path"], "/healthz/ready");
    assert_eq!(proxy["startupProbe"]["httpGet"]["port"], 15021);
    let sc = &proxy["securityContext"];
    assert_eq!(
        (
            sc["runAsUser"].clone(),
            sc["runAsGroup"].clone(),
            sc["runAsNonRoot"].clone()
        ),
        (json!(1337), json!(1337), json!(true))
    );
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert!(
        sc["capabilities"].get("add").is_none(),
        "only the init container adds any"
    );
    let proxy_args = args(proxy);
    assert_eq!(proxy_args[0], "proxy");
    assert_eq!(
        flag(&proxy_args, "--service-account-token"),
        Some(hypha_inject::TOKEN_PATH)
    );
    assert_eq!(flag(&proxy_args, "--capture-outbound"), Some("15001"));
    assert_eq!(flag(&proxy_args, "--capture-inbound"), Some("15006"));
    assert_eq!(env(proxy, "HYPHA_WORKLOAD").unwrap()["value"], "reviews-v1");
    assert_eq!(
        env(proxy, "INSTANCE_IPS").unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
        "status.podIPs"
    );
    assert_eq!(
        env(proxy, "HYPHA_SERVICE_ACCOUNT").unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.serviceAccountName"
    );
    // The pod's proxy.istio.io/config reaches the sidecar.
    let config = env(proxy, "PROXY_CONFIG").unwrap()["value"]
        .as_str()
        .unwrap();
    let config = hypha_config::proxy::parse_proxy_config("env".into(), config).unwrap();
    assert_eq!(config.concurrency, Some(1));

    // The token the CA takes, the namespace's roots, the labels file.
    let volumes = &patched["spec"]["volumes"];
    let token = container(volumes, "istio-token");
    assert_eq!(
        token["projected"]["sources"][0]["serviceAccountToken"]["audience"],
        "istio-ca"
    );
    assert_eq!(
        container(volumes, "istiod-ca-cert")["configMap"]["name"],
        "istio-ca-root-cert"
    );
    assert!(
        container(volumes, "tmp").is_object(),
        "the pod's own volumes stay"
    );

    // Probes: each kind to the sidecar's health port, the originals in its environment.
    let app = container(&patched["spec"]["containers"], "reviews");
    for (probe, kind) in [
        ("livenessProbe", "livez"),
        ("readinessProbe", "readyz"),
        ("startupProbe", "startupz"),
    ] {
        assert_eq!(
            app[probe]["httpGet"],
            json!({"path": format!("/app-health/reviews/{kind}"), "port": 15021, "scheme": "HTTP"})
        );
    }
    assert_eq!(app["readinessProbe"]["timeoutSeconds"], 2);
    let probers = env(proxy, hypha_inject::APP_PROBERS_ENV).unwrap()["value"]
        .as_str()
        .unwrap();
    let probers = probes::parse(probers).unwrap();
    assert_eq!(probers.len(), 3);
    let live = probers["/app-health/reviews/livez"]
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!((live.path.as_str(), live.port), ("/health", 9080));
    assert_eq!(
        probers["/app-health/reviews/readyz"]
            .tcp_socket
            .as_ref()
            .unwrap()
            .port,
        9080
    );
    assert_eq!(
        probers["/app-health/reviews/startupz"]
            .grpc
            .as_ref()
            .unwrap()
            .port,
        9090
    );

    // What Istio's tools read.
    let meta = &patched["metadata"];
    let status: Value = serde_json::from_str(
        meta["annotations"]["sidecar.istio.io/status"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        status["initContainers"],
        json!(["istio-init", "istio-proxy"])
    );
    assert_eq!(status["revision"], "default");
    assert_eq!(meta["labels"]["security.istio.io/tlsMode"], "istio");
    assert_eq!(meta["labels"]["service.istio.io/canonical-name"], "reviews");
    assert_eq!(meta["labels"]["service.istio.io/canonical-revision"], "v1");
    assert_eq!(
        meta["annotations"]["kubectl.kubernetes.io/default-container"],
        "reviews"
    );
    assert_eq!(meta["generateName"], "reviews-v1-7d8f9c6b4-");

    // Injecting again leaves it alone.
    let again = inject(&patched, &target(&review), &Settings::default()).unwrap();
    assert!(matches!(again, Outcome::Skipped(Skip::AlreadyInjected)));
}

#[test]
fn the_webhook_and_hypha_inject_give_the_same_sidecar() {
    let settings = Settings::default();
    let from_webhook = injected(&pod_of(&review()), &settings).pod;
    let (yaml, notes) =
        manifest::inject_yaml(include_str!("data/reviews-v1.yaml"), &settings).unwrap();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert_eq!(notes[0].object, "Deployment/bookinfo/reviews-v1");
    assert_eq!(notes[0].skipped, None);
    let docs = hypha_config::yaml::parse_documents(&yaml).unwrap();
    assert_eq!(docs.len(), 2, "the ServiceAccount passes through:\n{yaml}");
    assert_eq!(docs[0].value["kind"], "ServiceAccount");
    let template = &docs[1].value["spec"]["template"];
    typed_round_trip(&json!({"metadata": template["metadata"], "spec": template["spec"]}));
    for name in ["istio-init", "istio-proxy"] {
        assert_eq!(
            container(&template["spec"]["initContainers"], name),
            container(&from_webhook["spec"]["initContainers"], name),
            "{name}"
        );
    }
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        assert_eq!(
            container(&template["spec"]["containers"], "reviews")[probe]["httpGet"],
            container(&from_webhook["spec"]["containers"], "reviews")[probe]["httpGet"],
        );
    }
    for volume in ["istio-token", "istiod-ca-cert", "istio-podinfo"] {
        assert_eq!(
            container(&template["spec"]["volumes"], volume),
            container(&from_webhook["spec"]["volumes"], volume)
        );
    }
    assert_eq!(
        template["metadata"]["annotations"]["sidecar.istio.io/status"],
        from_webhook["metadata"]["annotations"]["sidecar.istio.io/status"]
    );
}

#[test]
fn pods_on_the_hosts_network_are_left_alone() {
    let mut pod = pod_of(&review());
    pod["spec"]["hostNetwork"] = json!(true);
    let outcome = inject(&pod, &target(&review()), &Settings::default()).unwrap();
    assert!(matches!(outcome, Outcome::Skipped(Skip::HostNetwork)));
    let mut pod = pod_of(&review());
    pod["spec"]["containers"][0]["name"] = json!("istio-proxy");
    let outcome = inject(&pod, &target(&review()), &Settings::default()).unwrap();
    assert!(matches!(outcome, Outcome::Skipped(Skip::AlreadyInjected)));
}

#[test]
fn a_pod_with_nothing_gets_every_list_it_needs() {
    let pod = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "bare", "namespace": "default"},
        "spec": {"containers": [{"name": "app", "image": "busybox"}]}});
    let target = Target {
        namespace: "default".into(),
        workload: None,
    };
    let Outcome::Injected(done) = inject(&pod, &target, &Settings::default()).unwrap() else {
        panic!("skipped");
    };
    let mut patched = pod.clone();
    json_patch::patch(&mut patched, &done.patch).unwrap();
    typed_round_trip(&patched);
    assert_eq!(
        patched["spec"]["initContainers"].as_array().unwrap().len(),
        2
    );
    assert_eq!(patched["spec"]["volumes"].as_array().unwrap().len(), 3);
    assert!(
        patched["spec"].get("securityContext").is_none(),
        "the pod's own security context is left alone"
    );
    let proxy = container(&patched["spec"]["initContainers"], "istio-proxy");
    assert_eq!(env(proxy, "HYPHA_WORKLOAD").unwrap()["value"], "bare");
    assert!(env(proxy, hypha_inject::APP_PROBERS_ENV).is_none());
    assert_eq!(
        patched["metadata"]["labels"]["service.istio.io/canonical-name"],
        "bare"
    );
    assert_eq!(
        patched["metadata"]["labels"]["service.istio.io/canonical-revision"],
        "latest"
    );
}

#[test]
fn classic_sidecars_for_older_clusters() {
    let settings = Settings {
        sidecar: SidecarKind::Classic,
        ..Settings::default()
    };
    let mut pod = pod_of(&review());
    let done = injected(&pod, &settings).pod;
    let names: Vec<&str> = done["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["reviews", "istio-proxy"]);
    let proxy = container(&done["spec"]["containers"], "istio-proxy");
    assert!(proxy.get("restartPolicy").is_none());
    assert!(proxy.get("lifecycle").is_none());
    typed_round_trip(&done);

    // holdApplicationUntilProxyStarts: the sidecar first, and the kubelet waits for its hook.
    pod["metadata"]["annotations"]["proxy.istio.io/config"] =
        json!("holdApplicationUntilProxyStarts: true");
    let done = injected(&pod, &settings).pod;
    let first = &done["spec"]["containers"][0];
    assert_eq!(first["name"], "istio-proxy");
    let hook = first["lifecycle"]["postStart"]["exec"]["command"]
        .as_array()
        .unwrap();
    assert_eq!(hook[..2], [json!("hypha"), json!("wait")]);
    typed_round_trip(&done);
}

#[test]
fn a_pod_chooses_its_sidecars_form() {
    let mut pod = pod_of(&review());
    pod["metadata"]["annotations"]["sidecar.istio.io/nativeSidecar"] = json!("false");
    let done = injected(&pod, &Settings::default()).pod;
    assert_eq!(
        container(&done["spec"]["containers"], "istio-proxy")["name"],
        "istio-proxy"
    );
    let classic = Settings {
        sidecar: SidecarKind::Classic,
        ..Settings::default()
    };
    pod["metadata"]["annotations"]["sidecar.istio.io/nativeSidecar"] = json!("true");
    let done = injected(&pod, &classic).pod;
    let proxy = container(&done["spec"]["initContainers"], "istio-proxy");
    assert_eq!(proxy["restartPolicy"], "Always");
    pod["metadata"]["annotations"]["sidecar.istio.io/nativeSidecar"] = json!("maybe");
    assert!(inject(&pod, &target(&review()), &classic).is_err());
}

#[test]
fn bad_annotations_fail_the_pod_with_the_reason() {
    let cases = [
        (
            "traffic.sidecar.istio.io/excludeOutboundIPRanges",
            "10.0.0.0/33",
        ),
        ("traffic.sidecar.istio.io/includeInboundPorts", "http"),
        ("proxy.istio.io/config", "tracing: {}"),
        ("proxy.istio.io/config", "concurrency: [1]"),
        ("sidecar.istio.io/proxyCPU", "lots"),
    ];
    for (annotation, value) in cases {
        let mut pod = pod_of(&review());
        pod["metadata"]["annotations"][annotation] = json!(value);
        let err = inject(&pod, &target(&review()), &Settings::default())
            .expect_err(annotation)
            .to_string();
        assert!(err.contains(annotation), "{annotation}={value}: {err}");
    }
    // A pod's resources annotation is used when it is a quantity.
    let mut pod = pod_of(&review());
    pod["metadata"]["annotations"]["sidecar.istio.io/proxyMemory"] = json!("64Mi");
    let done = injected(&pod, &Settings::default()).pod;
    let proxy = container(&done["spec"]["initContainers"], "istio-proxy");
    assert_eq!(proxy["resources"]["requests"]["memory"], "64Mi");
    assert_eq!(proxy["resources"]["requests"]["cpu"], "100m");
}

#[test]
fn the_mesh_defaults_are_under_the_pods_own_config() {
    let defaults = hypha_config::proxy::parse_proxy_config(
        "mesh".into(),
        "concurrency: 4\nterminationDrainDuration: 9s\n",
    )
    .unwrap();
    let settings = Settings {
        defaults,
        ..Settings::default()
    };
    let done = injected(&pod_of(&review()), &settings).pod;
    let proxy = container(&done["spec"]["initContainers"], "istio-proxy");
    let text = env(proxy, "PROXY_CONFIG").unwrap()["value"]
        .as_str()
        .unwrap();
    let config = hypha_config::proxy::parse_proxy_config("env".into(), text).unwrap();
    assert_eq!(config.concurrency, Some(1), "the pod's annotation wins");
    assert_eq!(config.drain_duration(), std::time::Duration::from_secs(9));
}

#[test]
fn probes_stay_when_the_pod_says_so() {
    let mut pod = pod_of(&review());
    pod["metadata"]["annotations"]["sidecar.istio.io/rewriteAppHTTPProbers"] = json!("false");
    let done = injected(&pod, &Settings::default()).pod;
    assert_eq!(
        done["spec"]["containers"][0]["livenessProbe"],
        pod["spec"]["containers"][0]["livenessProbe"]
    );
}
