//! The MutatingWebhookConfiguration that sends pods to a revision's injector, with Istio's
//! selectors, so that the API server sends exactly the pods [`crate::revision_of`] gives that
//! revision:
//!
//! - the default revision: namespaces labelled `istio-injection=enabled` (or
//!   `hypha-injection=enabled`), except pods labelled `sidecar.istio.io/inject: "false"`; and
//!   pods labelled `sidecar.istio.io/inject: "true"` in namespaces with no injection label;
//! - every revision (the default one too, as `istio.io/rev=default`): namespaces labelled
//!   `istio.io/rev=<revision>` without `istio-injection`, and pods labelled so in namespaces
//!   with neither label.
//!
//! Failure policy: `Fail`, so a pod that should have a sidecar never starts without one (its
//! traffic would bypass the mesh's policy); the selectors keep the system namespaces
//! (`kube-system`, `kube-public`, `kube-node-lease`) and the control plane's own namespace out
//! entirely, so a control plane that is down blocks only the pods of namespaces that asked for
//! injection, never the cluster's own or its own replicas. Each call is bounded by 10 s.

use serde_json::{json, Value};

/// What the webhook configuration points at.
#[derive(Debug, Clone)]
pub struct WebhookTarget {
    /// The MutatingWebhookConfiguration's name.
    pub name: String,
    /// The control plane's namespace and Service, and the Service's webhook port.
    pub namespace: String,
    pub service: String,
    pub port: u16,
    /// The revision whose pods these are.
    pub revision: String,
}

impl Default for WebhookTarget {
    fn default() -> WebhookTarget {
        WebhookTarget {
            name: "hypha-sidecar-injector".into(),
            namespace: "hypha-system".into(),
            service: "hypha".into(),
            port: 443,
            revision: "default".into(),
        }
    }
}

/// The MutatingWebhookConfiguration (JSON), without `caBundle`: the control plane writes it.
pub fn configuration(t: &WebhookTarget) -> Value {
    let exists = |key: &str| json!({"key": key, "operator": "DoesNotExist"});
    let is = |key: &str, v: &str| json!({"key": key, "operator": "In", "values": [v]});
    let not = |key: &str, v: &str| json!({"key": key, "operator": "NotIn", "values": [v]});
    let system = json!({"key": "kubernetes.io/metadata.name", "operator": "NotIn",
        "values": ["kube-system", "kube-public", "kube-node-lease", t.namespace]});
    let hook = |name: &str, namespace: Vec<Value>, object: Vec<Value>| {
        let mut ns = namespace;
        ns.push(system.clone());
        json!({
            "name": format!("{name}.{}", t.name),
            "clientConfig": {"service": {"name": t.service, "namespace": t.namespace,
                                         "path": "/inject", "port": t.port}},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                       "resources": ["pods"], "scope": "Namespaced"}],
            "namespaceSelector": {"matchExpressions": ns},
            "objectSelector": {"matchExpressions": object},
            "failurePolicy": "Fail",
            "matchPolicy": "Equivalent",
            "sideEffects": "None",
            "timeoutSeconds": 10,
            "reinvocationPolicy": "Never",
            "admissionReviewVersions": ["v1"],
        })
    };
    let rev = t.revision.as_str();
    let mut hooks = vec![
        hook(
            "rev.namespace",
            vec![
                is("istio.io/rev", rev),
                exists("istio-injection"),
                exists("hypha-injection"),
            ],
            vec![not("sidecar.istio.io/inject", "false")],
        ),
        hook(
            "rev.object",
            vec![
                exists("istio.io/rev"),
                exists("istio-injection"),
                exists("hypha-injection"),
            ],
            vec![
                not("sidecar.istio.io/inject", "false"),
                is("istio.io/rev", rev),
            ],
        ),
    ];
    if rev == "default" {
        hooks.extend([
            hook(
                "namespace",
                vec![is("istio-injection", "enabled")],
                vec![not("sidecar.istio.io/inject", "false")],
            ),
            hook(
                "hypha-namespace",
                vec![is("hypha-injection", "enabled"), exists("istio-injection")],
                vec![not("sidecar.istio.io/inject", "false")],
            ),
            hook(
                "object",
                vec![
                    exists("istio-injection"),
                    exists("hypha-injection"),
                    exists("istio.io/rev"),
                ],
                vec![
                    is("sidecar.istio.io/inject", "true"),
                    exists("istio.io/rev"),
                ],
            ),
        ]);
    }
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": t.name, "labels": {"app": "hypha", "istio.io/rev": rev}},
        "webhooks": hooks,
    })
}
