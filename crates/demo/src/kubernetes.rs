//! `hypha demo --kubernetes`: bookinfo on a cluster. The test API server runs in the demo's
//! process (no real one can run here); its controllers turn Deployments into Pods, which its
//! network plugin (here: the demo's plan) puts on loopback, and Services into EndpointSlices.
//! Bookinfo's Kubernetes manifests (Namespace, ServiceAccounts, Services, Deployments) and its
//! Istio config are applied with kubectl, as a user would; the control plane reads the cluster
//! (`hypha control --kubernetes`) with only the permissions of `manifests/base/rbac.yaml`, and each
//! workload's sidecar starts with nothing but its pod's service-account token, which the CA
//! checks with TokenReview. The kubelet's part, starting each pod's processes, is the demo's.
//!
//! On loopback every pod has 127.0.0.1 and/or ::1, so each Deployment's container port named
//! after its Service's port is the sidecar's inbound port of the plan, and the Services' named
//! `targetPort` resolves per pod (one EndpointSlice per port, as the real controller makes).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hypha_apiserver::{ApiServer, Token};
use serde_json::Value;

use crate::topology::{Plan, Planned, Workload, NAMESPACE, SERVICE_PORT};
use crate::DemoError;

/// The Istio config files of `examples/bookinfo` applied to the cluster (the mesh config stays
/// a file of the control plane; services and workloads are the cluster's own).
const ISTIO_FILES: &[&str] = &["routing.yaml", "destinations.yaml", "security.yaml"];

/// The label injection puts on a pod with a sidecar (Istio's).
const TLS_MODE: &str = "security.istio.io/tlsMode: istio";

/// How long a pod may take to appear after its Deployment is applied.
const POD_TIMEOUT: Duration = Duration::from_secs(20);

/// The demo's cluster.
pub struct Cluster {
    pub api: ApiServer,
    /// kubectl's kubeconfig and cache (the user, an administrator).
    dir: PathBuf,
    /// The control plane's kubeconfig: the `hypha-control` service account's token.
    pub control_kubeconfig: PathBuf,
}

impl Cluster {
    /// Starts the API server and applies, as a user would: the control plane's RBAC and the
    /// Istio CRDs, then bookinfo's manifests and Istio config.
    pub async fn start(plan: &Plan, dir: &Path) -> Result<Cluster, DemoError> {
        let io = |p: &Path, e| DemoError::Io(p.to_path_buf(), e);
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let api = ApiServer::start().await.map_err(|e| io(dir, e))?;
        // The network plugin: each pod at its workload's loopback addresses.
        let addresses: Vec<((String, String), Vec<String>)> = plan
            .workloads
            .iter()
            .map(|w| {
                let key = (w.workload.app.to_owned(), w.workload.version.to_owned());
                (key, w.ips().iter().map(ToString::to_string).collect())
            })
            .collect();
        api.run_controllers_with(Arc::new(move |pod: &Value| {
            let label = |k: &str| {
                pod.pointer(&format!("/metadata/labels/{k}"))
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned()
            };
            let key = (label("app"), label("version"));
            addresses
                .iter()
                .find(|(k, _)| *k == key)
                .map_or_else(|| vec!["127.0.0.1".to_owned()], |(_, ips)| ips.clone())
        }));
        api.write_kubeconfig(dir).map_err(|e| io(dir, e))?;
        let cluster = Cluster {
            control_kubeconfig: dir.join("control.kubeconfig"),
            api,
            dir: dir.to_path_buf(),
        };
        let platform = format!(
            "{}\n---\n{}---\n{}",
            hypha_kube::NAMESPACES,
            hypha_kube::RBAC,
            hypha_kube::ISTIO_CRDS
        );
        cluster.apply("platform.yaml", &platform).await?;
        cluster.apply("bookinfo.yaml", &manifests(plan)).await?;
        cluster.apply("istio.yaml", &istio_config()).await?;
        let token = cluster
            .api
            .issue_account_token(hypha_kube::CONTROL_NAMESPACE, "hypha-control");
        cluster
            .api
            .write_kubeconfig_as(&cluster.control_kubeconfig, &token)
            .map_err(|e| io(&cluster.control_kubeconfig, e))?;
        Ok(cluster)
    }

    /// Writes `yaml` to `name` and `kubectl apply`s it (off the runtime's threads: the API
    /// server answering it runs on them).
    pub async fn apply(&self, name: &str, yaml: &str) -> Result<(), DemoError> {
        let path = self.dir.join(name);
        std::fs::write(&path, yaml).map_err(|e| DemoError::Io(path.clone(), e))?;
        let dir = self.dir.clone();
        let file = path.display().to_string();
        tokio::task::spawn_blocking(move || hypha_apiserver::kubectl(&dir, &["apply", "-f", &file]))
            .await
            .map_err(|e| DemoError::Kubernetes(e.to_string()))?
            .map(drop)
            .map_err(DemoError::Kubernetes)
    }

    /// The Deployments again (a workload's inbound port moved): its pod is replaced.
    pub async fn apply_workloads(&self, plan: &Plan) -> Result<(), DemoError> {
        self.apply("bookinfo.yaml", &manifests(plan)).await
    }

    /// The pod of `w` whose container listens on its current inbound port, once the
    /// Deployment controller made it: (name, uid).
    pub async fn pod(&self, w: &Planned) -> Result<(String, String), DemoError> {
        let started = std::time::Instant::now();
        loop {
            let found = self.api.list("", "pods").into_iter().find(|p| {
                let label = |k: &str| {
                    p.pointer(&format!("/metadata/labels/{k}"))
                        .and_then(Value::as_str)
                };
                let port = p
                    .pointer("/spec/containers/0/ports/0/containerPort")
                    .and_then(Value::as_u64);
                label("app") == Some(w.workload.app)
                    && label("version") == Some(w.workload.version)
                    && port == Some(u64::from(w.ports.inbound))
                    && p.pointer("/metadata/deletionTimestamp").is_none()
            });
            if let Some(p) = found {
                let field = |f: &str| {
                    p.pointer(f)
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned()
                };
                return Ok((field("/metadata/name"), field("/metadata/uid")));
            }
            if started.elapsed() > POD_TIMEOUT {
                return Err(DemoError::Kubernetes(format!(
                    "no pod for Deployment {} within {POD_TIMEOUT:?}",
                    w.workload.name
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What the kubelet mounts in a pod for its sidecar: a projected service-account token,
    /// audience `istio-ca`, bound to the pod, valid for an hour; written (0600) to `path`.
    pub fn write_token(
        &self,
        w: &Workload,
        (pod, uid): &(String, String),
        path: &Path,
    ) -> Result<(), DemoError> {
        let expires = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            + 3600;
        let token = self.api.issue_token(Token {
            namespace: NAMESPACE.into(),
            service_account: w.service_account.into(),
            pod: Some((pod.clone(), uid.clone())),
            audiences: vec!["istio-ca".into()],
            expires,
        });
        crate::mesh::write_secret(path, &token)
    }
}

/// Bookinfo's Kubernetes manifests for `plan`: the namespace, a ServiceAccount per workload
/// identity, a Service per app (both families where the cluster has them, the port's
/// `targetPort` named) and a Deployment per workload (labelled as injection labels a pod with
/// a sidecar, its container port the plan's inbound port).
pub fn manifests(plan: &Plan) -> String {
    let mut out = String::from(
        "# Generated by `hypha demo --kubernetes`: bookinfo's Namespace, ServiceAccounts,\n\
         # Services and Deployments, each Deployment's container port the port its sidecar\n\
         # takes inbound traffic on (the pods share loopback).\n",
    );
    let _ = write!(
        out,
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NAMESPACE}}}\n"
    );
    let mut accounts: Vec<&str> = plan
        .workloads
        .iter()
        .map(|w| w.workload.service_account)
        .collect();
    accounts.sort_unstable();
    accounts.dedup();
    for sa in accounts {
        let _ = write!(
            out,
            "---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {sa}, namespace: {NAMESPACE}}}\n"
        );
    }
    let mut apps: Vec<(&str, &str)> = plan
        .workloads
        .iter()
        .map(|w| (w.workload.app, w.workload.port_name))
        .collect();
    apps.sort_unstable();
    apps.dedup();
    for (app, port) in apps {
        let _ = write!(
            out,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {app}, namespace: {NAMESPACE}, labels: {{app: {app}}}}}\n\
             spec:\n  ipFamilyPolicy: PreferDualStack\n  selector: {{app: {app}}}\n  \
             ports: [{{name: {port}, port: {SERVICE_PORT}, targetPort: {port}}}]\n"
        );
    }
    for w in &plan.workloads {
        let wl = &w.workload;
        let _ = write!(
            out,
            "---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}, namespace: {NAMESPACE}, labels: {{app: {app}, version: {version}}}}}\n\
             spec:\n  replicas: 1\n  selector: {{matchLabels: {{app: {app}, version: {version}}}}}\n  template:\n    \
             metadata: {{labels: {{app: {app}, version: {version}, {TLS_MODE}}}}}\n    spec:\n      \
             serviceAccountName: {sa}\n      containers:\n      - name: {app}\n        \
             image: hypha-demo-app/{role}\n        ports: [{{name: {port}, containerPort: {inbound}}}]\n",
            name = wl.name,
            app = wl.app,
            version = wl.version,
            sa = wl.service_account,
            role = wl.role,
            port = wl.port_name,
            inbound = w.ports.inbound,
        );
    }
    out
}

/// The Istio resources of `examples/bookinfo` (routing, destinations, security), as embedded
/// in the control plane.
fn istio_config() -> String {
    hypha_control::EMBEDDED_CONFIG
        .iter()
        .filter(|(name, _)| ISTIO_FILES.iter().any(|f| name.ends_with(f)))
        .map(|(_, yaml)| format!("---\n{yaml}\n"))
        .collect()
}
