//! The Istio CRDs Hypha reads, with structural schemas derived from `hypha-config`'s types: the
//! API server then checks each field's type, `kubectl apply` (strict field validation, kubectl's
//! default) refuses a field Hypha would not read, and `kubectl explain` describes them. The
//! schema of a kind is exactly what Hypha's loader accepts for it; an Istio field Hypha takes as
//! a raw value to warn about keeps whatever it holds (`x-kubernetes-preserve-unknown-fields`).
//! `manifests/base/istio-crds.yaml` is [`istio`] written out (a test keeps them equal).

use schemars::generate::SchemaSettings;
use schemars::JsonSchema;
use serde_json::{json, Map, Value};

use hypha_config::networking::{DestinationRule, ServiceEntry, VirtualService, WorkloadEntry};
use hypha_config::security::{AuthorizationPolicy, PeerAuthentication};

/// One kind: its names, the versions served (the first is stored) and its spec's schema.
struct Kind {
    group: &'static str,
    kind: &'static str,
    plural: &'static str,
    /// `""`: none.
    short: &'static str,
    /// `Namespaced` or `Cluster`.
    scope: &'static str,
    versions: &'static [&'static str],
    /// `None` for a kind Hypha refuses to serve (its objects are reported, never read).
    spec: Option<fn() -> Value>,
    /// Columns `kubectl get` shows beside the name: (name, JSON path, type).
    columns: &'static [(&'static str, &'static str, &'static str)],
}

const NETWORKING: &[&str] = &["v1", "v1beta1", "v1alpha3"];
const SECURITY: &[&str] = &["v1", "v1beta1"];

const KINDS: &[Kind] = &[
    Kind {
        group: "networking.istio.io",
        kind: "ServiceEntry",
        plural: "serviceentries",
        short: "se",
        scope: "Namespaced",
        versions: NETWORKING,
        spec: Some(spec::<ServiceEntry>),
        columns: &[
            ("Hosts", ".spec.hosts", "string"),
            ("Location", ".spec.location", "string"),
            ("Resolution", ".spec.resolution", "string"),
        ],
    },
    Kind {
        group: "networking.istio.io",
        kind: "WorkloadEntry",
        plural: "workloadentries",
        short: "we",
        scope: "Namespaced",
        versions: NETWORKING,
        spec: Some(spec::<WorkloadEntry>),
        columns: &[("Address", ".spec.address", "string")],
    },
    Kind {
        group: "networking.istio.io",
        kind: "VirtualService",
        plural: "virtualservices",
        short: "vs",
        scope: "Namespaced",
        versions: NETWORKING,
        spec: Some(spec::<VirtualService>),
        columns: &[
            ("Gateways", ".spec.gateways", "string"),
            ("Hosts", ".spec.hosts", "string"),
        ],
    },
    Kind {
        group: "networking.istio.io",
        kind: "DestinationRule",
        plural: "destinationrules",
        short: "dr",
        scope: "Namespaced",
        versions: NETWORKING,
        spec: Some(spec::<DestinationRule>),
        columns: &[("Host", ".spec.host", "string")],
    },
    Kind {
        group: "security.istio.io",
        kind: "AuthorizationPolicy",
        plural: "authorizationpolicies",
        short: "ap",
        scope: "Namespaced",
        versions: SECURITY,
        spec: Some(spec::<AuthorizationPolicy>),
        columns: &[("Action", ".spec.action", "string")],
    },
    Kind {
        group: "security.istio.io",
        kind: "PeerAuthentication",
        plural: "peerauthentications",
        short: "pa",
        scope: "Namespaced",
        versions: SECURITY,
        spec: Some(spec::<PeerAuthentication>),
        columns: &[("Mode", ".spec.mtls.mode", "string")],
    },
    Kind {
        group: "security.istio.io",
        kind: "RequestAuthentication",
        plural: "requestauthentications",
        short: "ra",
        scope: "Namespaced",
        versions: SECURITY,
        spec: None,
        columns: &[],
    },
];

/// Hypha's own kinds: the cert-manager external issuers (`crate::issuer`).
const HYPHA: &[Kind] = &[
    Kind {
        group: "hypha.dev",
        kind: "Issuer",
        plural: "issuers",
        short: "",
        scope: "Namespaced",
        versions: &["v1alpha1"],
        spec: Some(spec::<crate::issuer::IssuerSpec>),
        columns: ISSUER_COLUMNS,
    },
    Kind {
        group: "hypha.dev",
        kind: "ClusterIssuer",
        plural: "clusterissuers",
        short: "",
        scope: "Cluster",
        versions: &["v1alpha1"],
        spec: Some(spec::<crate::issuer::IssuerSpec>),
        columns: ISSUER_COLUMNS,
    },
];

const ISSUER_COLUMNS: &[(&str, &str, &str)] = &[
    ("Tenant", ".spec.tenant", "string"),
    (
        "Ready",
        ".status.conditions[?(@.type==\"Ready\")].status",
        "string",
    ),
];

/// The Istio CRDs, in the order to apply them.
pub fn istio() -> Vec<Value> {
    KINDS.iter().map(crd).collect()
}

/// Hypha's own CRDs (`manifests/base/hypha-crds.yaml`).
pub fn hypha() -> Vec<Value> {
    HYPHA.iter().map(crd).collect()
}

fn crd(k: &Kind) -> Value {
    let spec = match k.spec {
        Some(spec) => spec(),
        // Hypha refuses these objects with a diagnostic naming the kind: keep them whole.
        None => json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}),
    };
    let schema = json!({
        "type": "object",
        "properties": {
            "spec": spec,
            "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
        },
    });
    let mut columns: Vec<Value> = k
        .columns
        .iter()
        .map(|(name, path, ty)| json!({"name": name, "jsonPath": path, "type": ty}))
        .collect();
    columns.push(json!({"name": "Age", "jsonPath": ".metadata.creationTimestamp", "type": "date"}));
    let versions: Vec<Value> = k
        .versions
        .iter()
        .enumerate()
        .map(|(i, v)| {
            json!({
                "name": v,
                "served": true,
                "storage": i == 0,
                "subresources": {"status": {}},
                "additionalPrinterColumns": columns,
                "schema": {"openAPIV3Schema": schema},
            })
        })
        .collect();
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": format!("{}.{}", k.plural, k.group),
            "labels": {"app.kubernetes.io/part-of": "hypha"},
        },
        "spec": {
            "group": k.group,
            "names": {
                "kind": k.kind,
                "listKind": format!("{}List", k.kind),
                "plural": k.plural,
                "singular": k.kind.to_ascii_lowercase(),
                "shortNames": if k.short.is_empty() { vec![] } else { vec![k.short] },
                "categories": if k.group.ends_with(".istio.io") {
                    vec!["istio-io".to_owned(), k.group.replace('.', "-")]
                } else {
                    vec!["hypha".to_owned()]
                },
            },
            "scope": k.scope,
            "versions": versions,
        },
    })
}

/// The structural schema of a spec type.
pub fn spec<T: JsonSchema>() -> Value {
    let generator = SchemaSettings::draft2020_12()
        .with(|s| {
            s.inline_subschemas = true;
            s.meta_schema = None;
        })
        .into_generator();
    structural(generator.into_root_schema_for::<T>().to_value())
}

/// A JSON Schema as schemars writes it, made a Kubernetes structural schema: every node typed
/// (or explicitly free), no references, no `const`/`anyOf` for optional values and enums, no
/// defaults (the API server would write them into stored objects, which Istio's never does).
fn structural(schema: Value) -> Value {
    let mut m = match schema {
        // Any value: an Istio field Hypha keeps raw to report on.
        Value::Bool(true) => Map::new(),
        Value::Object(m) => m,
        other => panic!("schema {other} has no structural form"),
    };
    for alt in ["anyOf", "oneOf"] {
        let Some(Value::Array(options)) = m.remove(alt) else {
            continue;
        };
        let options: Vec<Value> = options.into_iter().filter(|o| !is_null(o)).collect();
        // Each option's constants (schemars lists a variant with a doc comment alone).
        let constants: Option<Vec<Value>> = options
            .iter()
            .map(|o| match (o.get("const"), o.get("enum")) {
                (Some(c), _) => Some(vec![c.clone()]),
                (_, Some(Value::Array(names))) => Some(names.clone()),
                _ => None,
            })
            .collect::<Option<Vec<Vec<Value>>>>()
            .map(|names| names.concat());
        match (options.len(), constants) {
            // `Option<T>`: T.
            (1, _) => {
                let Value::Object(inner) = structural(options.into_iter().next().unwrap()) else {
                    unreachable!()
                };
                for (k, v) in inner {
                    m.entry(k).or_insert(v);
                }
            }
            // An enum whose variants carry doc comments: its names.
            (_, Some(names)) if names.iter().all(Value::is_string) => {
                m.insert("type".into(), "string".into());
                m.insert("enum".into(), names.into());
            }
            _ => panic!("{alt} of {options:?} has no structural form"),
        }
    }
    if let Some(Value::Array(types)) = m.get("type") {
        let types: Vec<&Value> = types.iter().filter(|t| *t != "null").collect();
        assert_eq!(types.len(), 1, "a field of several types: {types:?}");
        m.insert("type".into(), types[0].clone());
    }
    if let Some(c) = m.remove("const") {
        m.insert("enum".into(), json!([c]));
    }
    if let Some(Value::Array(names)) = m.get_mut("enum") {
        names.retain(|n| !n.is_null());
    }
    // Descriptions too: the types' doc comments are written for Hypha's developers.
    for drop in [
        "$schema",
        "title",
        "description",
        "default",
        "examples",
        "$defs",
    ] {
        m.remove(drop);
    }
    if m.get("additionalProperties") == Some(&Value::Bool(false)) {
        m.remove("additionalProperties");
    }
    if let Some(Value::String(format)) = m.get("format") {
        let format = match format.as_str() {
            "int8" | "int16" | "int32" | "uint8" | "uint16" | "uint32" => Some("int32"),
            "int64" | "uint64" | "int" | "uint" => Some("int64"),
            "float" | "double" => Some(format.as_str()),
            _ => None,
        }
        .map(str::to_owned);
        match format {
            Some(f) => m.insert("format".into(), f.into()),
            None => m.remove("format"),
        };
    }
    if let Some(Value::Object(props)) = m.get_mut("properties") {
        for v in props.values_mut() {
            *v = structural(v.take());
        }
    }
    for key in ["items", "additionalProperties"] {
        if let Some(v) = m.get_mut(key) {
            *v = structural(v.take());
        }
    }
    if !m.contains_key("type") {
        m.insert("x-kubernetes-preserve-unknown-fields".into(), true.into());
    }
    Value::Object(m)
}

fn is_null(schema: &Value) -> bool {
    schema.get("type") == Some(&Value::from("null"))
}
