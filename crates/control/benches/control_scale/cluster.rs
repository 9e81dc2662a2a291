//! The same mesh from a cluster (`SOURCE=kubernetes`): the test API server runs in this process
//! with its controllers, holding per service a Service and two Deployments (versions v1 and v2,
//! `ENDPOINTS_PER_SERVICE` pods between them) and their EndpointSlices, and the same
//! VirtualServices and DestinationRules as Istio objects. The control plane reads it with
//! `--kubernetes`; changes are made with kubectl, as a user makes them.

use std::ffi::OsString;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hypha_apiserver::ApiServer;
use hypha_control::ProxyInfo;
use serde_json::{json, Value};

use crate::mesh::{
    destination_rule_yaml, namespace, virtual_service_yaml, workload_version, CHANGED_SERVICE,
    INITIAL_TIMEOUT_S,
};
use crate::proxies::Watch;
use crate::{Params, HTTP_PORT, NAMESPACES};

/// The Deployment scaled by the scale changes, and its replicas before them.
pub(crate) const SCALED: &str = "svc-0-v1";

pub(crate) struct Cluster {
    pub(crate) api: ApiServer,
    /// kubectl's kubeconfig and cache, and the files it applies.
    dir: PathBuf,
    /// Per service, its pods (name, addresses, version) in name order.
    pods: Vec<Vec<(String, Vec<IpAddr>, String)>>,
}

/// Parses the YAML documents of `text` into JSON objects.
fn objects(text: &str) -> Result<Vec<Value>> {
    Ok(hypha_config::yaml::parse_documents(text)
        .map_err(|e| anyhow::anyhow!("{}", e.message))?
        .into_iter()
        .map(|d| d.value)
        .collect())
}

/// The replicas of Deployment `name` (`svc-<i>-<version>`) before any scale.
pub(crate) fn replicas_of(p: &Params, name: &str) -> usize {
    replicas(p.endpoints, name.rsplit('-').next().unwrap_or_default())
}

/// The pods of version `v` for `e` endpoints (they alternate v1, v2 as the file mesh's do).
fn replicas(endpoints: usize, version: &str) -> usize {
    (0..endpoints)
        .filter(|&e| workload_version(e) == version)
        .count()
}

impl Cluster {
    pub(crate) async fn start(p: &Params, dir: &Path) -> Result<Cluster> {
        let api = ApiServer::start().await?;
        api.write_kubeconfig(dir)?;
        let crds = include_str!("../../../../manifests/base/istio-crds.yaml");
        for crd in objects(crds)? {
            api.put("apiextensions.k8s.io", "customresourcedefinitions", crd);
        }
        for n in 0..NAMESPACES {
            api.put(
                "",
                "namespaces",
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": format!("bench-{n}")}}),
            );
        }
        for i in 0..p.services {
            let ns = namespace(i);
            let app = format!("svc-{i}");
            api.put(
                "",
                "services",
                json!({"apiVersion": "v1", "kind": "Service",
                       "metadata": {"name": app, "namespace": ns},
                       "spec": {"ipFamilyPolicy": "PreferDualStack", "selector": {"app": app},
                                "ports": [{"name": "http", "port": HTTP_PORT, "targetPort": "http"}]}}),
            );
            for version in ["v1", "v2"] {
                api.put(
                    "apps",
                    "deployments",
                    json!({"apiVersion": "apps/v1", "kind": "Deployment",
                           "metadata": {"name": format!("{app}-{version}"), "namespace": ns},
                           "spec": {"replicas": replicas(p.endpoints, version),
                                    "selector": {"matchLabels": {"app": app, "version": version}},
                                    "template": {"metadata": {"labels": {"app": app, "version": version,
                                                                         "security.istio.io/tlsMode": "istio"}},
                                                 "spec": {"serviceAccountName": app,
                                                          "containers": [{"name": "app", "image": "bench",
                                                                          "ports": [{"name": "http", "containerPort": HTTP_PORT}]}]}}}}),
                );
            }
            if i.is_multiple_of(10) {
                for obj in objects(&destination_rule_yaml(i))? {
                    api.put("networking.istio.io", "destinationrules", obj);
                }
                for obj in objects(&virtual_service_yaml(i, INITIAL_TIMEOUT_S))? {
                    api.put("networking.istio.io", "virtualservices", obj);
                }
            }
        }
        api.run_controllers();
        let want = p.services * p.endpoints;
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let pods = api.list("", "pods").len();
            let slices = api.list("discovery.k8s.io", "endpointslices").len();
            if pods == want && slices == 2 * p.services {
                break;
            }
            if Instant::now() > deadline {
                bail!("the cluster has {pods} of {want} pods and {slices} slices after 600 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let mut pods = vec![Vec::new(); p.services];
        for pod in api.list("", "pods") {
            let s = |path: &str| {
                pod.pointer(path)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
            };
            let Some(i) = s("/metadata/labels/app")
                .strip_prefix("svc-")
                .and_then(|i| i.parse::<usize>().ok())
            else {
                continue;
            };
            let ips = pod
                .pointer("/status/podIPs")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|ip| ip["ip"].as_str()?.parse().ok())
                .collect();
            pods[i].push((
                s("/metadata/name").to_owned(),
                ips,
                s("/metadata/labels/version").to_owned(),
            ));
        }
        for list in &mut pods {
            list.sort();
        }
        let cluster = Cluster {
            api,
            dir: dir.to_path_buf(),
            pods,
        };
        // kubectl's first run fetches the API's discovery and OpenAPI documents, which a
        // user's kubectl has cached: fetched now, before the control plane starts (the same
        // VirtualService, so the changes measured are the same as from a warm kubectl).
        cluster.apply_virtual_service(INITIAL_TIMEOUT_S).await?;
        Ok(cluster)
    }

    /// `hypha control`'s source flags.
    pub(crate) fn control_args(&self) -> Vec<OsString> {
        vec![
            "--kubernetes".into(),
            "--kubeconfig".into(),
            self.dir.join("kubeconfig").into_os_string(),
        ]
    }

    /// Proxy `sub` plays a pod of service `sub % services` (its pod name in the node id, its
    /// Deployment as the workload) and watches the scaled Deployment's service's endpoints.
    pub(crate) fn proxy(&self, sub: usize, p: &Params) -> (ProxyInfo, Watch) {
        let i = sub % p.services;
        let (pod, ips, version) = &self.pods[i][(sub / p.services) % self.pods[i].len()];
        let ns = namespace(i);
        let first = ips.first().map(ToString::to_string).unwrap_or_default();
        let info = ProxyInfo {
            id: format!("sidecar~{first}~{pod}.{ns}~{ns}.svc.cluster.local"),
            namespace: ns,
            service_account: format!("svc-{i}"),
            workload_name: format!("svc-{i}-{version}"),
            labels: [
                ("app".to_string(), format!("svc-{i}")),
                ("version".to_string(), version.clone()),
                ("security.istio.io/tlsMode".to_string(), "istio".to_string()),
            ]
            .into(),
            ips: ips.clone(),
        };
        let watch = Watch {
            endpoints: Some(format!(
                "outbound|{HTTP_PORT}||svc-{CHANGED_SERVICE}.{}.svc.cluster.local",
                namespace(CHANGED_SERVICE)
            )),
        };
        (info, watch)
    }

    /// `kubectl apply` of the changed VirtualService with a new timeout.
    pub(crate) async fn apply_virtual_service(&self, timeout_s: u64) -> Result<()> {
        let file = self.dir.join("virtualservice.yaml");
        std::fs::write(&file, virtual_service_yaml(CHANGED_SERVICE, timeout_s))?;
        self.kubectl(vec![
            "apply".into(),
            "-f".into(),
            file.display().to_string(),
        ])
        .await
    }

    /// `kubectl scale` of the scaled Deployment. The time to every proxy includes the test
    /// cluster's controllers making the pod and the EndpointSlice ([`first_changes`] tells
    /// when, from the API server's own timestamps).
    pub(crate) async fn scale(&self, replicas: usize) -> Result<()> {
        self.kubectl(vec![
            "scale".into(),
            "-n".into(),
            namespace(CHANGED_SERVICE),
            format!("deployment/{SCALED}"),
            format!("--replicas={replicas}"),
        ])
        .await
    }

    async fn kubectl(&self, args: Vec<String>) -> Result<()> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            hypha_apiserver::kubectl(&dir, &args)
        })
        .await
        .context("kubectl's thread")?
        .map_err(|e| anyhow::anyhow!(e))?;
        Ok(())
    }
}

/// The first change to each kind of the changed service's objects on `feed` (its Service,
/// Deployments, pods, slices, VirtualService), timed from `t0`, in the order they came.
pub(crate) fn first_changes(
    mut feed: tokio::sync::broadcast::Receiver<std::sync::Arc<hypha_apiserver::Event>>,
    t0: Instant,
) -> Vec<(String, Duration)> {
    let ns = namespace(CHANGED_SERVICE);
    let name = format!("svc-{CHANGED_SERVICE}");
    let mut first: Vec<(String, Duration)> = Vec::new();
    while let Ok(e) = feed.try_recv() {
        let meta = |field: &str| e.meta(field);
        let n = meta("name");
        let ours = meta("namespace") == ns && (n == name || n.starts_with(&format!("{name}-")));
        if ours && !first.iter().any(|(r, _)| *r == e.resource) {
            first.push((e.resource.clone(), e.at.saturating_duration_since(t0)));
        }
    }
    first
}
