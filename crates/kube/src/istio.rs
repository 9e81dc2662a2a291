//! Istio config from the API server: the CRD kinds watched, the objects stripped to what
//! Hypha reads, and the config assembled from files, the cluster's registry and those
//! objects. An invalid object is left out (with what is wrong with it) and the rest of the
//! mesh is served: one bad object never freezes the others.

use std::collections::BTreeMap;
use std::sync::Arc;

use hypha_config::{Config, Diagnostic, Diagnostics, Severity};
use serde_json::Value;

use crate::cluster::{Cluster, Derived};

/// An Istio kind Hypha reads from the API server.
#[derive(Debug, Clone, Copy)]
pub struct IstioKind {
    pub group: &'static str,
    /// The version watched: every kind is served at v1 since Istio 1.22 (the object's own
    /// apiVersion does not matter, the API server converts).
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
}

const fn kind(group: &'static str, kind: &'static str, plural: &'static str) -> IstioKind {
    IstioKind {
        group,
        version: "v1",
        kind,
        plural,
    }
}

/// Every kind watched. RequestAuthentication is watched so that it is reported on the object:
/// Hypha does not enforce end-user JWTs yet, and says so rather than ignore it silently.
pub const KINDS: &[IstioKind] = &[
    kind("networking.istio.io", "ServiceEntry", "serviceentries"),
    kind("networking.istio.io", "WorkloadEntry", "workloadentries"),
    kind("networking.istio.io", "VirtualService", "virtualservices"),
    kind("networking.istio.io", "DestinationRule", "destinationrules"),
    kind(
        "security.istio.io",
        "AuthorizationPolicy",
        "authorizationpolicies",
    ),
    kind(
        "security.istio.io",
        "PeerAuthentication",
        "peerauthentications",
    ),
    kind(
        "security.istio.io",
        "RequestAuthentication",
        "requestauthentications",
    ),
];

/// `(kind, namespace, name)` of an Istio object.
pub type ObjectKey = (&'static str, String, String);

/// `object` with only what config reads (`apiVersion`, `kind`, `metadata` name, namespace,
/// labels, annotations but kubectl's copy of the last applied object, and uid for Events;
/// `spec`), so one small copy is kept and a status update is not a change.
pub fn strip(mut object: Value) -> Value {
    if let Some(o) = object.as_object_mut() {
        o.retain(|k, _| matches!(k.as_str(), "apiVersion" | "kind" | "metadata" | "spec"));
        if let Some(m) = o.get_mut("metadata").and_then(Value::as_object_mut) {
            m.retain(|k, _| {
                matches!(
                    k.as_str(),
                    "name" | "namespace" | "labels" | "annotations" | "uid"
                )
            });
            if let Some(a) = m.get_mut("annotations").and_then(Value::as_object_mut) {
                a.remove("kubectl.kubernetes.io/last-applied-configuration");
            }
        }
    }
    object
}

/// The config to serve and what was left out of it.
#[derive(Debug, Default)]
pub struct Assembled {
    pub config: Config,
    /// Every diagnostic of the last validation (warnings included).
    pub diagnostics: Diagnostics,
    /// Objects left out for errors, with them.
    pub invalid: BTreeMap<ObjectKey, Vec<Diagnostic>>,
}

/// Files + the cluster's registry + its Istio objects, validated as one config. Objects with
/// errors are left out and the rest validated again, until what remains has no error that
/// belongs to a cluster object. Errors left then (in files) make the whole change invalid, as
/// for files alone.
pub fn assemble(files: &Config, cluster: &Cluster) -> Assembled {
    assemble_with(files, cluster, &cluster.derive(&files.mesh))
}

/// [`assemble`] with the cluster's registry already derived (it changes less often than the
/// Istio objects: a VirtualService edit need not derive 10,000 pods again).
pub fn assemble_with(files: &Config, cluster: &Cluster, derived: &Derived) -> Assembled {
    let origin: Arc<str> = crate::ORIGIN.into();
    let mut invalid: BTreeMap<ObjectKey, Vec<Diagnostic>> = BTreeMap::new();
    loop {
        let objects = cluster
            .istio
            .iter()
            .filter(|(k, _)| !invalid.contains_key(*k))
            .map(|(_, v)| (origin.clone(), v.clone()));
        let parsed = hypha_config::parse_objects(objects);
        let mut cfg = files.clone();
        cfg.service_entries
            .extend(derived.service_entries.iter().cloned());
        cfg.workload_entries
            .extend(derived.workload_entries.iter().cloned());
        let p = parsed.config;
        cfg.service_entries.extend(p.service_entries);
        cfg.workload_entries.extend(p.workload_entries);
        cfg.virtual_services.extend(p.virtual_services);
        cfg.destination_rules.extend(p.destination_rules);
        cfg.authorization_policies.extend(p.authorization_policies);
        cfg.peer_authentications.extend(p.peer_authentications);
        // A file's object made invalid by the cluster (a route to a Service deleted) is left
        // out too; the cluster's are not parsed at all.
        drop_invalid(&mut cfg.service_entries, "ServiceEntry", &invalid);
        drop_invalid(&mut cfg.workload_entries, "WorkloadEntry", &invalid);
        drop_invalid(&mut cfg.virtual_services, "VirtualService", &invalid);
        drop_invalid(&mut cfg.destination_rules, "DestinationRule", &invalid);
        drop_invalid(
            &mut cfg.authorization_policies,
            "AuthorizationPolicy",
            &invalid,
        );
        drop_invalid(
            &mut cfg.peer_authentications,
            "PeerAuthentication",
            &invalid,
        );
        let mut diags = parsed.diagnostics;
        hypha_config::validate(&cfg, &mut diags);
        let mut left_out = 0;
        for d in diags.iter().filter(|d| d.severity == Severity::Error) {
            // Only Istio objects are left out: a MeshConfig's error, or a file's own (YAML),
            // rejects the whole change, as with files alone.
            if let Some(key) = d.resource.as_deref().and_then(object_key) {
                invalid.entry(key).or_default().push(d.clone());
                left_out += 1;
            }
        }
        if left_out == 0 {
            return Assembled {
                config: cfg,
                diagnostics: diags,
                invalid,
            };
        }
    }
}

/// Removes the resources of `kind` that `invalid` names.
fn drop_invalid<T>(
    resources: &mut Vec<hypha_config::Resource<T>>,
    kind: &'static str,
    invalid: &BTreeMap<ObjectKey, Vec<Diagnostic>>,
) {
    if invalid.keys().any(|k| k.0 == kind) {
        resources.retain(|r| {
            r.source.derived || !invalid.contains_key(&(kind, r.namespace.clone(), r.name.clone()))
        });
    }
}

/// The object a diagnostic's `Kind namespace/name` names, if it is an Istio kind.
fn object_key(resource: &str) -> Option<ObjectKey> {
    let (kind, rest) = resource.split_once(' ')?;
    let (ns, name) = rest.split_once('/')?;
    let kind = KINDS.iter().find(|k| k.kind == kind)?.kind;
    Some((kind, ns.to_string(), name.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vs(name: &str, host: &str) -> Value {
        json!({
            "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": name, "namespace": "shop", "uid": "1",
                         "managedFields": [{"manager": "kubectl"}], "resourceVersion": "7"},
            "spec": {"hosts": [host], "http": [{"route": [{"destination": {"host": host}}]}]},
            "status": {"validationMessages": []}
        })
    }

    #[test]
    fn a_bad_object_is_left_out_and_the_rest_is_served() {
        let mut c = Cluster::default();
        c.services.insert(
            ("shop".into(), "reviews".into()),
            crate::objects::Service {
                cluster_ips: vec!["10.96.0.1".into()],
                external_name: None,
                ports: vec![crate::objects::ServicePort {
                    name: "http".into(),
                    port: 9080,
                    protocol: None,
                    target_port: None,
                }],
            },
        );
        let good = strip(vs("good", "reviews"));
        assert!(good.get("status").is_none());
        assert!(good.pointer("/metadata/managedFields").is_none());
        c.istio
            .insert(("VirtualService", "shop".into(), "good".into()), good);
        c.istio.insert(
            ("VirtualService", "shop".into(), "bad".into()),
            strip(vs("bad", "nowhere")),
        );
        let a = assemble(&Config::default(), &c);
        let names: Vec<&str> = a
            .config
            .virtual_services
            .iter()
            .map(|v| v.name.as_str())
            .collect();
        assert_eq!(names, ["good"]);
        let bad = &a.invalid[&("VirtualService", "shop".to_string(), "bad".to_string())];
        assert!(bad.iter().any(|d| d.path.starts_with("spec.")), "{bad:?}");
        assert!(!a.diagnostics.has_errors());
    }
}
