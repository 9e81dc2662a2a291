//! `hypha install` and `uninstall` against a cluster, as a user runs them: the manifests are
//! the Kustomize base's (`kubectl kustomize manifests/base` gives the same objects), kubectl
//! takes them (client dry run, then for real, the Istio CRDs registered on the way), a second
//! revision installs beside the first, and uninstalling removes exactly what was made.

mod common;

use std::path::Path;

use common::eventually;
use hypha_apiserver::ApiServer;
use hypha_kube::install::{self, Install};
use serde_json::Value;

fn key(v: &Value) -> (String, String, String, String) {
    let s = |p: &str| {
        v.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    (
        s("/apiVersion"),
        s("/kind"),
        s("/metadata/namespace"),
        s("/metadata/name"),
    )
}

fn sorted(mut v: Vec<Value>) -> Vec<Value> {
    v.sort_by_key(key);
    v
}

fn base() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../manifests/base")
}

#[test]
fn the_kustomize_base_is_what_hypha_install_prints() {
    let out = std::process::Command::new("kubectl")
        .args(["kustomize", base().to_str().unwrap()])
        .output()
        .expect("kubectl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kustomized: Vec<Value> =
        hypha_config::yaml::parse_documents(&String::from_utf8_lossy(&out.stdout))
            .unwrap()
            .into_iter()
            .map(|d| d.value)
            .collect();
    let ours = install::objects(&Install::default()).unwrap();
    assert_eq!(kustomized.len(), ours.len());
    assert_eq!(sorted(kustomized), sorted(ours));
    // The injector's configuration in the base is the one the code makes for a revision.
    let injector = install::objects(&Install::default())
        .unwrap()
        .into_iter()
        .find(|o| o["kind"] == "MutatingWebhookConfiguration")
        .unwrap();
    assert_eq!(
        injector,
        hypha_inject::webhooks::configuration(&Default::default())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_a_second_revision_and_uninstall_everything() {
    let api = ApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.write_kubeconfig(dir.path()).unwrap();
    let k = Some(kubeconfig.as_path());
    let default = Install::default();
    let canary = Install {
        revision: "canary".into(),
        ..Install::default()
    };
    let everything = install::yaml(&install::objects(&default).unwrap());

    // `hypha install | kubectl apply --dry-run=client -f -`, then for real.
    install::kubectl(&everything, &["apply", "--dry-run=client"], k).unwrap();
    assert!(api.list("apps", "deployments").is_empty(), "a dry run");
    install::kubectl(&everything, &["apply"], k).unwrap();
    let present = |o: &Value| {
        let (av, _, ns, name) = key(o);
        let group = av.rsplit_once('/').map_or("", |(g, _)| g).to_owned();
        let resource = plural(o["kind"].as_str().unwrap());
        api.get(&group, &resource, &ns, &name).is_some()
    };
    for o in install::objects(&default).unwrap() {
        assert!(present(&o), "{:?} not made", key(&o));
    }
    // The CRDs are served: Istio objects can be applied.
    let vs = dir.path().join("vs.yaml");
    std::fs::write(
        &vs,
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r, namespace: istio-system}\nspec: {hosts: [r]}\n",
    )
    .unwrap();
    hypha_apiserver::kubectl(dir.path(), &["apply", "-f", vs.to_str().unwrap()]).unwrap();

    // A second revision beside it.
    install::kubectl(
        &install::yaml(&install::objects(&canary).unwrap()),
        &["apply"],
        k,
    )
    .unwrap();
    let canary_own = install::revision_objects(&canary).unwrap();
    assert_eq!(
        canary_own.len(),
        4,
        "Deployment, PDB, Service, webhook configuration"
    );
    for o in &canary_own {
        assert!(present(o), "{:?}", key(o));
    }
    let d = api
        .get("apps", "deployments", "hypha-system", "hypha-canary")
        .unwrap();
    let args = d.pointer("/spec/template/spec/containers/0/args").unwrap();
    assert!(args.to_string().contains("--revision=canary"), "{args}");
    let hook = api
        .get(
            "admissionregistration.k8s.io",
            "mutatingwebhookconfigurations",
            "",
            "hypha-sidecar-injector-canary",
        )
        .unwrap();
    assert_eq!(
        hook.pointer("/webhooks/0/clientConfig/service/name"),
        Some(&Value::from("hypha-canary"))
    );

    // Uninstalling the canary leaves the default revision as it was.
    install::kubectl(
        &install::yaml(&install::uninstall_objects(&canary, false).unwrap()),
        &["delete", "--ignore-not-found", "--wait=false"],
        k,
    )
    .unwrap();
    for o in &canary_own {
        assert!(!present(o), "{:?} left", key(o));
    }
    for o in install::objects(&default).unwrap() {
        assert!(present(&o), "{:?} removed with the canary", key(&o));
    }

    // Uninstalling everything removes everything install made.
    install::kubectl(
        &install::yaml(&install::uninstall_objects(&default, false).unwrap()),
        &["delete", "--ignore-not-found", "--wait=false"],
        k,
    )
    .unwrap();
    let objects = install::objects(&default).unwrap();
    eventually("every object gone", || objects.iter().all(|o| !present(o))).await;
}

/// The resource of a kind, as the API server names it.
fn plural(kind: &str) -> String {
    match kind {
        "PodDisruptionBudget" => "poddisruptionbudgets".into(),
        "CustomResourceDefinition" => "customresourcedefinitions".into(),
        k => format!("{}s", k.to_ascii_lowercase()),
    }
}

/// `hypha check --kubernetes`: the cluster's Istio objects, validated as the control plane
/// would serve them, problems named by object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clusters_istio_config_is_checked() {
    let api = ApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.write_kubeconfig(dir.path()).unwrap();
    let k = Some(kubeconfig.as_path());
    install::kubectl(hypha_kube::ISTIO_CRDS, &["apply"], k).unwrap();
    let config = "\
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: external, namespace: shop}
spec:
  hosts: [web.example.com, api.example.com]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: good, namespace: shop}
spec:
  hosts: [web.example.com]
  http: [{route: [{destination: {host: web.example.com}}]}]
";
    install::kubectl(config, &["apply"], k).unwrap();
    let client = hypha_kube::connect(Some(&kubeconfig)).await.unwrap();
    let files = hypha_config::Config::default();
    let diags = hypha_kube::check(client.clone(), &files).await;
    assert!(!diags.has_errors(), "{:?}", diags.into_sorted());

    let bad = "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bad, namespace: shop}
spec:
  hosts: [api.example.com]
  http: [{match: [{uri: {regex: \"(unclosed\"}}], route: [{destination: {host: api.example.com}}]}]
";
    install::kubectl(bad, &["apply"], k).unwrap();
    let diags = hypha_kube::check(client, &files).await;
    let errors: Vec<String> = diags.errors().map(ToString::to_string).collect();
    assert!(!errors.is_empty());
    assert!(
        errors.iter().all(|e| e.contains("bad")),
        "only the bad object: {errors:?}"
    );
}
