//! The resource kinds the server serves: the built-in ones Hypha reads or kubectl needs, and
//! each CustomResourceDefinition applied to it.

use serde_json::{json, Value};

/// One resource kind at one group and version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kind {
    /// `""` for the core group.
    pub group: String,
    pub version: String,
    /// The plural in URLs (`deployments`).
    pub resource: String,
    pub singular: String,
    pub kind: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    /// Subresources served (`status`, `scale`).
    pub subresources: Vec<&'static str>,
    /// A custom resource's structural schema (its CRD version's `openAPIV3Schema`).
    pub schema: Option<std::sync::Arc<Value>>,
}

impl Kind {
    fn builtin(
        group: &str,
        version: &str,
        resource: &str,
        kind: &str,
        namespaced: bool,
        short: &[&str],
        subresources: &[&'static str],
    ) -> Kind {
        Kind {
            group: group.to_owned(),
            version: version.to_owned(),
            resource: resource.to_owned(),
            singular: kind.to_ascii_lowercase(),
            kind: kind.to_owned(),
            namespaced,
            short_names: short.iter().map(|s| (*s).to_owned()).collect(),
            subresources: subresources.to_vec(),
            schema: None,
        }
    }

    /// `apps/v1`, or `v1` for the core group.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `deployments.apps`, or `services` for the core group: how errors name the resource.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.resource.clone()
        } else {
            format!("{}.{}", self.resource, self.group)
        }
    }

    /// The URL prefix of its group and version: `/api/v1` or `/apis/apps/v1`.
    pub fn prefix(&self) -> String {
        if self.group.is_empty() {
            format!("/api/{}", self.version)
        } else {
            format!("/apis/{}/{}", self.group, self.version)
        }
    }

    const VERBS: [&'static str; 8] = [
        "create",
        "delete",
        "deletecollection",
        "get",
        "list",
        "patch",
        "update",
        "watch",
    ];

    /// Its entries in a legacy `APIResourceList`.
    pub fn resource_list_entries(&self) -> Vec<Value> {
        let mut out = vec![json!({
            "name": self.resource,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": Self::VERBS,
            "shortNames": self.short_names,
        })];
        for sub in &self.subresources {
            let (group, version, kind) = self.subresource_kind(sub);
            out.push(json!({
                "name": format!("{}/{sub}", self.resource),
                "singularName": "",
                "namespaced": self.namespaced,
                "group": group,
                "version": version,
                "kind": kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        out
    }

    /// Its entry in aggregated discovery (`apidiscovery.k8s.io/v2`).
    pub fn discovery_entry(&self) -> Value {
        let subresources: Vec<Value> = self
            .subresources
            .iter()
            .map(|sub| {
                let (group, version, kind) = self.subresource_kind(sub);
                json!({
                    "subresource": sub,
                    "responseKind": {"group": group, "version": version, "kind": kind},
                    "verbs": ["get", "patch", "update"],
                })
            })
            .collect();
        json!({
            "resource": self.resource,
            "responseKind": {"group": self.group, "version": self.version, "kind": self.kind},
            "scope": if self.namespaced { "Namespaced" } else { "Cluster" },
            "singularResource": self.singular,
            "verbs": Self::VERBS,
            "shortNames": self.short_names,
            "subresources": subresources,
        })
    }

    fn subresource_kind(&self, sub: &str) -> (String, String, String) {
        if sub == "scale" {
            ("autoscaling".into(), "v1".into(), "Scale".into())
        } else {
            (self.group.clone(), self.version.clone(), self.kind.clone())
        }
    }

    /// The kinds a CustomResourceDefinition (`apiextensions.k8s.io/v1`) declares, one per
    /// served version; `None` when it is not one kubectl could have applied.
    pub fn from_crd(crd: &Value) -> Option<Vec<Kind>> {
        let spec = crd.get("spec")?;
        let names = spec.get("names")?;
        let group = spec.get("group")?.as_str()?;
        let plural = names.get("plural")?.as_str()?;
        let kind = names.get("kind")?.as_str()?;
        let singular = names
            .get("singular")
            .and_then(Value::as_str)
            .map_or_else(|| kind.to_ascii_lowercase(), str::to_owned);
        let short_names = strings(names.get("shortNames"));
        let namespaced = spec.get("scope").and_then(Value::as_str) != Some("Cluster");
        let versions = spec.get("versions")?.as_array()?;
        let kinds: Vec<Kind> = versions
            .iter()
            .filter(|v| v.get("served").and_then(Value::as_bool).unwrap_or(true))
            .filter_map(|v| {
                let status = v
                    .pointer("/subresources/status")
                    .is_some()
                    .then_some("status");
                Some(Kind {
                    group: group.to_owned(),
                    version: v.get("name")?.as_str()?.to_owned(),
                    resource: plural.to_owned(),
                    singular: singular.clone(),
                    kind: kind.to_owned(),
                    namespaced,
                    short_names: short_names.clone(),
                    subresources: status.into_iter().collect(),
                    schema: v
                        .pointer("/schema/openAPIV3Schema")
                        .cloned()
                        .map(std::sync::Arc::new),
                })
            })
            .collect();
        (!kinds.is_empty()).then_some(kinds)
    }
}

/// The strings of a JSON list (none when it is not one).
pub(crate) fn strings(list: Option<&Value>) -> Vec<String> {
    list.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// The built-in kinds: what Hypha's control plane watches, what kubectl's flows touch
/// (Deployments and their scale, CRDs), and TokenReview.
pub fn builtin() -> Vec<Kind> {
    vec![
        Kind::builtin(
            "",
            "v1",
            "namespaces",
            "Namespace",
            false,
            &["ns"],
            &["status"],
        ),
        Kind::builtin("", "v1", "nodes", "Node", false, &["no"], &["status"]),
        Kind::builtin("", "v1", "pods", "Pod", true, &["po"], &["status"]),
        Kind::builtin("", "v1", "services", "Service", true, &["svc"], &["status"]),
        Kind::builtin(
            "",
            "v1",
            "serviceaccounts",
            "ServiceAccount",
            true,
            &["sa"],
            &[],
        ),
        Kind::builtin("", "v1", "configmaps", "ConfigMap", true, &["cm"], &[]),
        Kind::builtin("", "v1", "secrets", "Secret", true, &[], &[]),
        Kind::builtin("", "v1", "events", "Event", true, &["ev"], &[]),
        Kind::builtin(
            "apps",
            "v1",
            "deployments",
            "Deployment",
            true,
            &["deploy"],
            &["status", "scale"],
        ),
        Kind::builtin(
            "apps",
            "v1",
            "daemonsets",
            "DaemonSet",
            true,
            &["ds"],
            &["status"],
        ),
        Kind::builtin("batch", "v1", "jobs", "Job", true, &[], &["status"]),
        Kind::builtin(
            "policy",
            "v1",
            "poddisruptionbudgets",
            "PodDisruptionBudget",
            true,
            &["pdb"],
            &["status"],
        ),
        Kind::builtin(
            "discovery.k8s.io",
            "v1",
            "endpointslices",
            "EndpointSlice",
            true,
            &[],
            &[],
        ),
        Kind::builtin(
            "certificates.k8s.io",
            "v1",
            "certificatesigningrequests",
            "CertificateSigningRequest",
            false,
            &["csr"],
            &["status", "approval"],
        ),
        Kind::builtin(
            "coordination.k8s.io",
            "v1",
            "leases",
            "Lease",
            true,
            &[],
            &[],
        ),
        Kind::builtin(
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            false,
            &["crd", "crds"],
            &["status"],
        ),
        Kind::builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "clusterroles",
            "ClusterRole",
            false,
            &[],
            &[],
        ),
        Kind::builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "clusterrolebindings",
            "ClusterRoleBinding",
            false,
            &[],
            &[],
        ),
        Kind::builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "roles",
            "Role",
            true,
            &[],
            &[],
        ),
        Kind::builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "rolebindings",
            "RoleBinding",
            true,
            &[],
            &[],
        ),
        Kind::builtin(
            "admissionregistration.k8s.io",
            "v1",
            "mutatingwebhookconfigurations",
            "MutatingWebhookConfiguration",
            false,
            &[],
            &[],
        ),
        Kind::builtin(
            "authentication.k8s.io",
            "v1",
            "tokenreviews",
            "TokenReview",
            false,
            &[],
            &[],
        ),
    ]
}
