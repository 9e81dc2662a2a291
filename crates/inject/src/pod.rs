//! The injection itself: a pod (or a workload's pod template) in, the injected pod and the
//! JSON Patch from one to the other out. The pod is edited as JSON, so fields this build's
//! Kubernetes types do not know survive untouched; what is added is checked against them by
//! the tests.

use std::collections::BTreeMap;

use hypha_config::proxy::{parse_proxy_config, ProxyConfig};
use serde_json::{json, Map, Value};

use crate::probes::{self, AppProbers};
use crate::{InjectError, Settings, SidecarKind};

/// Where the pod lives and which workload it belongs to.
#[derive(Debug, Clone)]
pub struct Target {
    pub namespace: String,
    /// The workload's name (a Deployment's, a Job's); `None` to find it from the pod's owner
    /// (see [`workload_name`]).
    pub workload: Option<String>,
}

/// Why a pod is left as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// It shares the node's network: capturing its traffic would capture the node's.
    HostNetwork,
    /// It already has a sidecar (`sidecar.istio.io/status`, or a container named
    /// `istio-proxy`).
    AlreadyInjected,
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Skip::HostNetwork => "the pod uses the host's network",
            Skip::AlreadyInjected => "the pod already has a sidecar",
        })
    }
}

#[derive(Debug)]
pub enum Outcome {
    Injected(Injected),
    Skipped(Skip),
}

/// An injected pod and the JSON Patch (RFC 6902) that makes it from the original.
#[derive(Debug)]
pub struct Injected {
    pub pod: Value,
    pub patch: json_patch::Patch,
}

const CAPTURE_OUTBOUND: u16 = 15001;
const CAPTURE_INBOUND: u16 = 15006;
/// Inbound ports never captured: the sidecar's health port and Istio's other pod-facing ports
/// (15020 merged metrics, 15090 Envoy's Prometheus), so nothing an Istio user scrapes or
/// probes goes through the mesh.
const SIDECAR_INBOUND_PORTS: &str = "15020,15021,15090";

/// Injects `pod` (a Pod, or a pod template: `metadata` and `spec`) with `settings`.
pub fn inject(pod: &Value, target: &Target, settings: &Settings) -> Result<Outcome, InjectError> {
    let typed: k8s_openapi::api::core::v1::Pod =
        serde_json::from_value(pod.clone()).map_err(|e| InjectError::NotAPod(e.to_string()))?;
    let spec = typed
        .spec
        .as_ref()
        .ok_or_else(|| InjectError::NotAPod("it has no spec".into()))?;
    let meta = &typed.metadata;
    let annotations = meta.annotations.clone().unwrap_or_default();
    let labels = meta.labels.clone().unwrap_or_default();
    if spec.host_network == Some(true) {
        return Ok(Outcome::Skipped(Skip::HostNetwork));
    }
    let has_proxy = |cs: Option<&Vec<k8s_openapi::api::core::v1::Container>>| {
        cs.into_iter()
            .flatten()
            .any(|c| c.name == crate::PROXY_CONTAINER)
    };
    if annotations.contains_key(crate::STATUS_ANNOTATION)
        || has_proxy(Some(&spec.containers))
        || has_proxy(spec.init_containers.as_ref())
    {
        return Ok(Outcome::Skipped(Skip::AlreadyInjected));
    }

    let config = proxy_config(&annotations, &settings.defaults)?;
    // Istio's per-pod choice of the sidecar's form.
    let kind = match annotations
        .get("sidecar.istio.io/nativeSidecar")
        .map(String::as_str)
    {
        Some("true") => SidecarKind::Native,
        Some("false") => SidecarKind::Classic,
        None => settings.sidecar,
        Some(other) => {
            return Err(InjectError::Annotation {
                annotation: "sidecar.istio.io/nativeSidecar".into(),
                message: format!("{other:?} is neither \"true\" nor \"false\""),
            })
        }
    };
    let capture = capture_args(&annotations)?;
    let workload = target
        .workload
        .clone()
        .unwrap_or_else(|| workload_name(pod));

    let mut out = pod.clone();
    let mut probers = AppProbers::new();
    let rewrite = annotations
        .get("sidecar.istio.io/rewriteAppHTTPProbers")
        .is_none_or(|v| v != "false");
    if rewrite {
        for c in out["spec"]["containers"]
            .as_array_mut()
            .into_iter()
            .flatten()
        {
            probes::rewrite(c, crate::HEALTH_PORT, &mut probers);
        }
    }
    let sidecar = sidecar(settings, kind, &annotations, &config, &workload, &probers)?;
    let init = capture_container(settings, capture);
    let first_app = spec.containers.first().map(|c| c.name.clone());

    let spec_out = out["spec"]
        .as_object_mut()
        .ok_or_else(|| InjectError::NotAPod("its spec is not an object".into()))?;
    let hold = config.hold_application_until_proxy_starts.unwrap_or(false);
    let (init_names, container_names) = match kind {
        SidecarKind::Native => {
            prepend(spec_out, "initContainers", vec![init, sidecar]);
            (vec![crate::INIT_CONTAINER, crate::PROXY_CONTAINER], vec![])
        }
        SidecarKind::Classic => {
            prepend(spec_out, "initContainers", vec![init]);
            if hold {
                prepend(spec_out, "containers", vec![sidecar]);
            } else {
                append(spec_out, "containers", vec![sidecar]);
            }
            (vec![crate::INIT_CONTAINER], vec![crate::PROXY_CONTAINER])
        }
    };
    let volumes = volumes();
    let volume_names: Vec<&str> = volumes
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect::<Vec<_>>();
    let status = json!({
        "initContainers": init_names,
        "containers": container_names,
        "volumes": volume_names,
        "imagePullSecrets": null,
        "revision": settings.revision,
    })
    .to_string();
    // No pod-wide fsGroup: it would change the group of every volume of the app's too.
    append(spec_out, "volumes", volumes);

    let meta_out = out
        .as_object_mut()
        .ok_or_else(|| InjectError::NotAPod("not an object".into()))?
        .entry("metadata")
        .or_insert_with(|| json!({}));
    let meta_out = meta_out
        .as_object_mut()
        .ok_or_else(|| InjectError::NotAPod("its metadata is not an object".into()))?;
    let ann = object(meta_out, "annotations");
    ann.insert(crate::STATUS_ANNOTATION.into(), json!(status));
    if let Some(app) = first_app {
        ann.entry("kubectl.kubernetes.io/default-container")
            .or_insert(json!(app));
    }
    let canonical_name = [
        "service.istio.io/canonical-name",
        "app.kubernetes.io/name",
        "app",
    ]
    .iter()
    .find_map(|k| labels.get(*k))
    .cloned()
    .unwrap_or_else(|| workload.clone());
    let canonical_revision = [
        "service.istio.io/canonical-revision",
        "app.kubernetes.io/version",
        "version",
    ]
    .iter()
    .find_map(|k| labels.get(*k))
    .cloned()
    .unwrap_or_else(|| "latest".into());
    let lab = object(meta_out, "labels");
    lab.insert("security.istio.io/tlsMode".into(), json!("istio"));
    lab.insert(
        "service.istio.io/canonical-name".into(),
        json!(canonical_name),
    );
    lab.insert(
        "service.istio.io/canonical-revision".into(),
        json!(canonical_revision),
    );

    let patch = json_patch::diff(pod, &out);
    Ok(Outcome::Injected(Injected { pod: out, patch }))
}

/// The workload a pod belongs to, as Istio names it: its Deployment (the ReplicaSet that owns
/// it, less the template hash), or another controlling owner, else its `generateName` or name.
pub fn workload_name(pod: &Value) -> String {
    let meta = &pod["metadata"];
    let controller = meta["ownerReferences"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|o| o["controller"] == json!(true));
    if let Some(owner) = controller {
        let name = owner["name"].as_str().unwrap_or_default();
        if owner["kind"] == "ReplicaSet" {
            let hash = meta["labels"]["pod-template-hash"]
                .as_str()
                .unwrap_or_default();
            if let Some(deployment) = name
                .strip_suffix(hash)
                .and_then(|n| n.strip_suffix('-'))
                .filter(|_| !hash.is_empty())
            {
                return deployment.to_owned();
            }
        }
        if !name.is_empty() {
            return name.to_owned();
        }
    }
    if let Some(g) = meta["generateName"].as_str().filter(|g| !g.is_empty()) {
        return g.trim_end_matches('-').to_owned();
    }
    meta["name"].as_str().unwrap_or_default().to_owned()
}

/// The pod's `proxy.istio.io/config` over the mesh's defaults.
fn proxy_config(
    annotations: &BTreeMap<String, String>,
    defaults: &ProxyConfig,
) -> Result<ProxyConfig, InjectError> {
    const ANNOTATION: &str = "proxy.istio.io/config";
    let Some(text) = annotations.get(ANNOTATION) else {
        return Ok(defaults.clone());
    };
    let own = parse_proxy_config(ANNOTATION.into(), text).map_err(|diags| {
        let lines: Vec<String> = diags.iter().map(ToString::to_string).collect();
        InjectError::Annotation {
            annotation: ANNOTATION.into(),
            message: lines.join("; "),
        }
    })?;
    Ok(own.over(defaults))
}

/// The capture an injected pod has: its `traffic.sidecar.istio.io/*` annotations, Istio's
/// defaults where it has none, and the sidecar's own inbound ports excluded; each checked, the
/// error naming the annotation. The init container's flags, and what the node agent's bypass
/// must leave alone for the pod.
pub fn capture_annotations(
    annotations: &BTreeMap<String, String>,
) -> Result<hypha_pod::Annotations, InjectError> {
    let get = |name: &str, default: &str| {
        annotations
            .get(&format!("traffic.sidecar.istio.io/{name}"))
            .map_or_else(|| default.to_owned(), |v| v.trim().to_owned())
    };
    let mut excluded_inbound = get("excludeInboundPorts", "");
    if !excluded_inbound.is_empty() {
        excluded_inbound.push(',');
    }
    excluded_inbound.push_str(SIDECAR_INBOUND_PORTS);
    let a = hypha_pod::Annotations {
        include_outbound_ip_ranges: get("includeOutboundIPRanges", "*"),
        exclude_outbound_ip_ranges: get("excludeOutboundIPRanges", ""),
        exclude_outbound_ports: get("excludeOutboundPorts", ""),
        include_inbound_ports: get("includeInboundPorts", "*"),
        exclude_inbound_ports: excluded_inbound,
    };
    // Each on its own, so the error names the annotation.
    let defaults = hypha_pod::Annotations::default();
    let one = |f: &dyn Fn(&mut hypha_pod::Annotations)| {
        let mut only = defaults.clone();
        f(&mut only);
        only
    };
    let checks: [(&str, hypha_pod::Annotations); 5] = [
        (
            "includeOutboundIPRanges",
            one(&|x| x.include_outbound_ip_ranges = a.include_outbound_ip_ranges.clone()),
        ),
        (
            "excludeOutboundIPRanges",
            one(&|x| x.exclude_outbound_ip_ranges = a.exclude_outbound_ip_ranges.clone()),
        ),
        (
            "excludeOutboundPorts",
            one(&|x| x.exclude_outbound_ports = a.exclude_outbound_ports.clone()),
        ),
        (
            "includeInboundPorts",
            one(&|x| x.include_inbound_ports = a.include_inbound_ports.clone()),
        ),
        (
            "excludeInboundPorts",
            one(&|x| x.exclude_inbound_ports = a.exclude_inbound_ports.clone()),
        ),
    ];
    for (name, only) in checks {
        hypha_pod::Capture::default()
            .with_annotations(&only)
            .map_err(|message| InjectError::Annotation {
                annotation: format!("traffic.sidecar.istio.io/{name}"),
                message,
            })?;
    }
    Ok(a)
}

/// `hypha capture`'s flags from the pod's annotations, checked now so a bad one fails the
/// pod's admission rather than its init container.
fn capture_args(annotations: &BTreeMap<String, String>) -> Result<Vec<String>, InjectError> {
    let a = capture_annotations(annotations)?;
    Ok([
        "capture",
        "--outbound-port",
        &CAPTURE_OUTBOUND.to_string(),
        "--inbound-port",
        &CAPTURE_INBOUND.to_string(),
        "--proxy-gid",
        &crate::PROXY_GID.to_string(),
        "--include-outbound-ip-ranges",
        &a.include_outbound_ip_ranges,
        "--exclude-outbound-ip-ranges",
        &a.exclude_outbound_ip_ranges,
        "--exclude-outbound-ports",
        &a.exclude_outbound_ports,
        "--include-inbound-ports",
        &a.include_inbound_ports,
        "--exclude-inbound-ports",
        &a.exclude_inbound_ports,
    ]
    .map(str::to_owned)
    .to_vec())
}

/// The init container that writes the pod's capture rules: root with `NET_ADMIN` and
/// `NET_RAW`, nothing else, and gone before the app starts.
fn capture_container(settings: &Settings, args: Vec<String>) -> Value {
    let mut c = json!({
        "name": crate::INIT_CONTAINER,
        "image": settings.image,
        "args": args,
        "resources": {
            "requests": {"cpu": "10m", "memory": "10Mi"},
            "limits": {"cpu": "2", "memory": "1Gi"},
        },
        "securityContext": {
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": false,
            "privileged": false,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": false,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
    });
    pull_policy(&mut c, settings);
    c
}

/// The sidecar container.
fn sidecar(
    settings: &Settings,
    kind: SidecarKind,
    annotations: &BTreeMap<String, String>,
    config: &ProxyConfig,
    workload: &str,
    probers: &AppProbers,
) -> Result<Value, InjectError> {
    let health = crate::HEALTH_PORT;
    let args: Vec<String> = [
        "proxy",
        "--control-plane",
        &settings.control_plane,
        "--control-plane-namespace",
        &settings.root_namespace,
        "--trust-domain",
        &settings.trust_domain,
        "--ca-root",
        crate::ROOT_CERT_PATH,
        "--service-account-token",
        crate::TOKEN_PATH,
        "--labels-file",
        crate::LABELS_PATH,
        "--capture-outbound",
        &CAPTURE_OUTBOUND.to_string(),
        "--capture-inbound",
        &CAPTURE_INBOUND.to_string(),
        "--health",
        &format!("0.0.0.0:{health}"),
        "--health",
        &format!("[::]:{health}"),
    ]
    .map(str::to_owned)
    .to_vec();
    let field = |path: &str| json!({"fieldRef": {"fieldPath": path}});
    let config_json = serde_json::to_string(config).unwrap_or_else(|_| "{}".into());
    let mut env = vec![
        json!({"name": "POD_NAME", "valueFrom": field("metadata.name")}),
        json!({"name": "HYPHA_NAMESPACE", "valueFrom": field("metadata.namespace")}),
        json!({"name": "HYPHA_SERVICE_ACCOUNT", "valueFrom": field("spec.serviceAccountName")}),
        json!({"name": "INSTANCE_IPS", "valueFrom": field("status.podIPs")}),
        json!({"name": "HYPHA_WORKLOAD", "value": workload}),
        json!({"name": "PROXY_CONFIG", "value": config_json}),
    ];
    if !probers.is_empty() {
        let probers = serde_json::to_string(probers).unwrap_or_default();
        env.push(json!({"name": crate::APP_PROBERS_ENV, "value": probers}));
    }
    let resources = resources(annotations)?;
    let ready = json!({"path": "/healthz/ready", "port": health, "scheme": "HTTP"});
    let mut c = json!({
        "name": crate::PROXY_CONTAINER,
        "image": settings.image,
        "args": args,
        "env": env,
        "readinessProbe": {
            "httpGet": ready,
            "periodSeconds": 15,
            "timeoutSeconds": 3,
            "failureThreshold": 4,
        },
        "resources": resources,
        "securityContext": {
            "runAsUser": crate::PROXY_GID,
            "runAsGroup": crate::PROXY_GID,
            "runAsNonRoot": true,
            "privileged": false,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "istio-token", "mountPath": "/var/run/secrets/tokens", "readOnly": true},
            {"name": "istiod-ca-cert", "mountPath": "/var/run/secrets/istio", "readOnly": true},
            {"name": "istio-podinfo", "mountPath": "/etc/istio/pod", "readOnly": true},
        ],
    });
    match kind {
        SidecarKind::Native => {
            // The kubelet starts the next container only when this probe passes: the app
            // never runs before its sidecar is ready.
            c["restartPolicy"] = json!("Always");
            c["startupProbe"] = json!({
                "httpGet": ready,
                "periodSeconds": 1,
                "timeoutSeconds": 3,
                "failureThreshold": 600,
            });
        }
        SidecarKind::Classic => {
            if config.hold_application_until_proxy_starts == Some(true) {
                // The kubelet starts the next container only once this hook returns.
                c["lifecycle"] = json!({"postStart": {"exec": {"command": [
                    "hypha", "wait", "--url",
                    format!("http://127.0.0.1:{health}/healthz/ready"),
                ]}}});
            }
        }
    }
    pull_policy(&mut c, settings);
    Ok(c)
}

/// The sidecar's requests and limits: Istio's defaults, or the pod's
/// `sidecar.istio.io/proxyCPU`, `proxyMemory`, `proxyCPULimit`, `proxyMemoryLimit`.
fn resources(annotations: &BTreeMap<String, String>) -> Result<Value, InjectError> {
    let get = |name: &'static str, default: &str| -> Result<String, InjectError> {
        match annotations.get(&format!("sidecar.istio.io/{name}")) {
            None => Ok(default.to_owned()),
            Some(v) if quantity(v) => Ok(v.trim().to_owned()),
            Some(v) => Err(InjectError::Annotation {
                annotation: format!("sidecar.istio.io/{name}"),
                message: format!("{v:?} is not a Kubernetes quantity"),
            }),
        }
    };
    Ok(json!({
        "requests": {"cpu": get("proxyCPU", "100m")?, "memory": get("proxyMemory", "128Mi")?},
        "limits": {"cpu": get("proxyCPULimit", "2")?, "memory": get("proxyMemoryLimit", "1Gi")?},
    }))
}

/// A Kubernetes quantity: a decimal number and an optional suffix.
fn quantity(v: &str) -> bool {
    let v = v.trim();
    let digits = v.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let suffix = &v[digits.len()..];
    let number = digits.parse::<f64>().is_ok_and(|n| n >= 0.0);
    let known = [
        "", "m", "k", "M", "G", "T", "P", "E", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei",
    ];
    number && known.contains(&suffix)
}

/// The sidecar's volumes: its token, the namespace's roots, and the pod's labels.
fn volumes() -> Vec<Value> {
    vec![
        json!({"name": "istio-token", "projected": {"sources": [{"serviceAccountToken": {
            "audience": "istio-ca", "expirationSeconds": 43200, "path": "istio-token"}}]}}),
        json!({"name": "istiod-ca-cert", "configMap": {"name": "istio-ca-root-cert"}}),
        json!({"name": "istio-podinfo", "downwardAPI": {"items": [
            {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
            {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}},
        ]}}),
    ]
}

fn pull_policy(c: &mut Value, settings: &Settings) {
    if let Some(p) = &settings.image_pull_policy {
        c["imagePullPolicy"] = json!(p);
    }
}

fn prepend(spec: &mut Map<String, Value>, field: &str, mut items: Vec<Value>) {
    let list = spec.entry(field).or_insert_with(|| json!([]));
    if let Some(existing) = list.as_array() {
        items.extend(existing.iter().cloned());
    }
    *list = Value::Array(items);
}

fn append(spec: &mut Map<String, Value>, field: &str, items: Vec<Value>) {
    let list = spec.entry(field).or_insert_with(|| json!([]));
    match list.as_array_mut() {
        Some(a) => a.extend(items),
        None => *list = Value::Array(items),
    }
}

/// The object at `field`, made if it is missing or null.
fn object<'a>(parent: &'a mut Map<String, Value>, field: &str) -> &'a mut Map<String, Value> {
    let v = parent.entry(field).or_insert_with(|| json!({}));
    if !v.is_object() {
        *v = json!({});
    }
    v.as_object_mut().expect("made an object above")
}
