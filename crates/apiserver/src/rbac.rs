//! RBAC for the service-account tokens the test issued, as Kubernetes' authorizer decides: a
//! request is allowed when a rule of a Role or ClusterRole bound to the account (by a
//! RoleBinding in the request's namespace, or a ClusterRoleBinding) names its API group,
//! resource (`pods`, `virtualservices/status`), verb and, if the rule lists names, the object.
//! Any other bearer token (the kubeconfig's) is an administrator.

use serde_json::Value;

use crate::State;

/// What a request does, in RBAC's terms.
pub(crate) struct Attributes<'a> {
    pub verb: &'a str,
    pub group: &'a str,
    /// `pods`, or `pods/status` for a subresource.
    pub resource: String,
    /// Empty at the cluster scope.
    pub namespace: &'a str,
    pub name: Option<&'a str>,
}

/// Whether `namespace/account` may do `a`.
pub(crate) fn allowed(state: &State, namespace: &str, account: &str, a: &Attributes<'_>) -> bool {
    let objects = |resource: &'static str| {
        state
            .store
            .objects
            .iter()
            .filter(move |(k, _)| k.0 == "rbac.authorization.k8s.io" && k.1 == resource)
            .map(|(k, v)| (k.2.as_str(), v))
    };
    let names_us = |binding: &Value| {
        binding["subjects"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| {
                s["kind"] == "ServiceAccount" && s["name"] == account && s["namespace"] == namespace
            })
    };
    let role = |binding: &Value, ns: &str| -> Option<&Value> {
        let r = &binding["roleRef"];
        let (resource, in_ns) = match r["kind"].as_str()? {
            "ClusterRole" => ("clusterroles", ""),
            "Role" => ("roles", ns),
            _ => return None,
        };
        let name = r["name"].as_str()?;
        state.store.objects.get(&(
            "rbac.authorization.k8s.io".into(),
            resource.into(),
            in_ns.into(),
            name.into(),
        ))
    };
    let grants = |role: &Value| {
        role["rules"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|rule| rule_allows(rule, a))
    };
    objects("clusterrolebindings")
        .filter(|(_, b)| names_us(b))
        .any(|(_, b)| role(b, "").is_some_and(grants))
        || (!a.namespace.is_empty()
            && objects("rolebindings")
                .filter(|(ns, b)| *ns == a.namespace && names_us(b))
                .any(|(ns, b)| role(b, ns).is_some_and(grants)))
}

fn rule_allows(rule: &Value, a: &Attributes<'_>) -> bool {
    let has = |field: &str, want: &str| {
        rule[field]
            .as_array()
            .is_some_and(|l| l.iter().any(|v| v == "*" || v == want))
    };
    // `*/status`: that subresource of every resource.
    let any_resource_sub = a.resource.split_once('/').is_some_and(|(_, sub)| {
        rule["resources"]
            .as_array()
            .is_some_and(|l| l.iter().any(|v| v.as_str() == Some(&format!("*/{sub}"))))
    });
    let names_ok = match rule["resourceNames"].as_array() {
        Some(names) if !names.is_empty() => a.name.is_some_and(|n| names.iter().any(|v| v == n)),
        _ => true,
    };
    has("apiGroups", a.group)
        && (has("resources", &a.resource) || any_resource_sub)
        && has("verbs", a.verb)
        && names_ok
}

/// The message the API server gives with a 403.
pub(crate) fn forbidden_message(namespace: &str, account: &str, a: &Attributes<'_>) -> String {
    let scope = if a.namespace.is_empty() {
        "at the cluster scope".to_owned()
    } else {
        format!("in the namespace \"{}\"", a.namespace)
    };
    format!(
        "{resource} is forbidden: User \"system:serviceaccount:{namespace}:{account}\" cannot {verb} resource \"{resource}\" in API group \"{group}\" {scope}",
        resource = a.resource,
        verb = a.verb,
        group = a.group,
    )
}
