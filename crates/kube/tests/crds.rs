//! The Istio CRDs `hypha install` writes: their schemas are structural (an API server takes
//! them), each field in them is one Hypha's loader reads with the type it reads, every Istio
//! object of the examples passes kubectl's strict validation whole, and a misspelled or
//! mistyped field is refused at `kubectl apply` with its path. The base file is the code's
//! output (`UPDATE_GOLDEN=1` rewrites it).

use std::path::Path;

use hypha_apiserver::ApiServer;
use hypha_kube::{crds, install};
use serde_json::{json, Map, Value};

fn base_file() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../manifests/base/istio-crds.yaml")
}

const HYPHA_HEADER: &str = "\
# Hypha's own CRDs: the cert-manager external issuers (written by `hypha_kube::crds::hypha`:
# regenerate with `UPDATE_GOLDEN=1 cargo test -p hypha-kube --test crds`).
";

const HEADER: &str = "\
# The Istio CRDs Hypha reads, with the schemas of what it accepts (written by
# `hypha_kube::crds::istio`: regenerate with `UPDATE_GOLDEN=1 cargo test -p hypha-kube --test crds`).
";

#[test]
fn the_base_files_are_what_the_code_makes() {
    for (file, made, header) in [
        ("istio-crds.yaml", crds::istio(), HEADER),
        ("hypha-crds.yaml", crds::hypha(), HYPHA_HEADER),
    ] {
        let path = base_file().with_file_name(file);
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, format!("{header}{}", install::yaml(&made))).unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let objects: Vec<Value> = hypha_config::yaml::parse_documents(&text)
            .unwrap()
            .into_iter()
            .map(|d| d.value)
            .collect();
        assert_eq!(
            objects, made,
            "manifests/base/{file} is stale: UPDATE_GOLDEN=1"
        );
    }
    let text = std::fs::read_to_string(base_file()).unwrap();
    assert_eq!(hypha_kube::ISTIO_CRDS, text);
}

/// The keys a structural schema may hold, as apiextensions-apiserver checks them.
const ALLOWED: &[&str] = &[
    "type",
    "description",
    "properties",
    "additionalProperties",
    "items",
    "required",
    "enum",
    "format",
    "minimum",
    "maximum",
    "nullable",
    "x-kubernetes-preserve-unknown-fields",
];

fn structural(s: &Value, path: &str) {
    let m = s
        .as_object()
        .unwrap_or_else(|| panic!("{path}: not an object"));
    for k in m.keys() {
        assert!(
            ALLOWED.contains(&k.as_str()),
            "{path}: {k} in a structural schema"
        );
    }
    let free = m.get("x-kubernetes-preserve-unknown-fields") == Some(&json!(true));
    assert!(m.contains_key("type") || free, "{path}: no type");
    assert!(
        !(m.contains_key("properties") && m.contains_key("additionalProperties")),
        "{path}: properties and additionalProperties"
    );
    if let Some(e) = m.get("enum") {
        assert!(e.as_array().unwrap().iter().all(Value::is_string), "{path}");
    }
    if m.get("type") == Some(&json!("array")) {
        assert!(m.contains_key("items"), "{path}: an array without items");
    }
    for (k, v) in m
        .get("properties")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        structural(v, &format!("{path}.{k}"));
    }
    for k in ["items", "additionalProperties"] {
        if let Some(v) = m.get(k) {
            structural(v, &format!("{path}.{k}"));
        }
    }
}

fn schemas() -> Vec<(String, String, Value)> {
    crds::istio()
        .into_iter()
        .chain(crds::hypha())
        .map(|crd| {
            let v = &crd["spec"]["versions"][0];
            (
                format!(
                    "{}/{}",
                    crd["spec"]["group"].as_str().unwrap(),
                    v["name"].as_str().unwrap()
                ),
                crd["spec"]["names"]["kind"].as_str().unwrap().to_owned(),
                v["schema"]["openAPIV3Schema"].clone(),
            )
        })
        .collect()
}

#[test]
fn schemas_are_structural_and_detailed() {
    for (_, kind, schema) in schemas() {
        structural(&schema, &kind);
        if kind == "RequestAuthentication" || kind.ends_with("Issuer") {
            continue;
        }
        // Typed, not a free object: the fields Hypha reads are spelled out.
        let spec = &schema["properties"]["spec"];
        assert!(
            spec["properties"].as_object().is_some_and(|p| p.len() >= 2),
            "{kind}: {spec}"
        );
    }
    // A few of Istio's fields, with their types and values as Istio publishes them.
    let by_kind = |k: &str| schemas().into_iter().find(|s| s.1 == k).unwrap().2;
    let vs = by_kind("VirtualService");
    let route = &vs["properties"]["spec"]["properties"]["http"]["items"]["properties"];
    assert_eq!(route["timeout"]["type"], "string");
    assert_eq!(
        route["match"]["items"]["properties"]["uri"]["properties"]["prefix"]["type"],
        "string"
    );
    assert_eq!(
        route["route"]["items"]["properties"]["weight"]["type"],
        "integer"
    );
    assert_eq!(
        route["corsPolicy"]["x-kubernetes-preserve-unknown-fields"],
        true
    );
    let pa = by_kind("PeerAuthentication");
    let mut modes: Vec<Value> = pa["properties"]["spec"]["properties"]["mtls"]["properties"]
        ["mode"]["enum"]
        .as_array()
        .unwrap()
        .clone();
    modes.sort_by_key(Value::to_string);
    assert_eq!(
        modes,
        json!(["DISABLE", "PERMISSIVE", "STRICT", "UNSET"])
            .as_array()
            .unwrap()[..]
    );
    let se = by_kind("ServiceEntry");
    assert_eq!(
        se["properties"]["spec"]["properties"]["ports"]["items"]["required"],
        json!(["number"])
    );
}

/// A value with every field the schema has, each of its type.
fn sample(s: &Value) -> Value {
    if let Some(first) = s.get("enum").and_then(|e| e.get(0)) {
        return first.clone();
    }
    match s.get("type").and_then(Value::as_str) {
        Some("object") => match (s.get("properties"), s.get("additionalProperties")) {
            (Some(Value::Object(props)), _) => Value::Object(
                props
                    .iter()
                    .map(|(k, v)| (k.clone(), sample(v)))
                    .collect::<Map<_, _>>(),
            ),
            (_, Some(each)) => json!({"k": sample(each)}),
            _ => json!({}),
        },
        Some("array") => json!([sample(&s["items"])]),
        // Every string field takes a duration's spelling.
        Some("string") => json!("1s"),
        Some("integer") => json!(1),
        Some("number") => json!(1.5),
        Some("boolean") => json!(true),
        _ => json!({"anything": [1]}),
    }
}

#[test]
fn every_field_in_a_schema_is_one_hypha_reads_with_its_type() {
    for (api_version, kind, schema) in schemas() {
        if kind == "RequestAuthentication" || kind.ends_with("Issuer") {
            continue;
        }
        let spec = sample(&schema["properties"]["spec"]);
        let object = json!({"apiVersion": api_version, "kind": kind,
                            "metadata": {"name": "all", "namespace": "default"}, "spec": spec});
        let loaded = hypha_config::parse_objects([("all.yaml".into(), object)]);
        let unread: Vec<_> = loaded
            .diagnostics
            .iter()
            .filter(|d| matches!(d.code, "unknown-field" | "missing-field" | "invalid-value"))
            .collect();
        assert!(unread.is_empty(), "{kind}: {unread:?}");
    }
}

/// The example mesh's Istio objects (MeshConfig is Hypha's own file kind, not a CRD).
fn examples() -> Vec<Value> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/bookinfo");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for d in hypha_config::yaml::parse_documents(&text).unwrap() {
            if d.value["apiVersion"]
                .as_str()
                .is_some_and(|a| a.contains(".istio.io/"))
            {
                out.push(d.value);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_applies_the_examples_whole_and_refuses_typos() {
    let api = ApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    api.write_kubeconfig(dir.path()).unwrap();
    let kubectl = |args: &[&str]| hypha_apiserver::kubectl(dir.path(), args);
    let file = |name: &str, body: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        p.to_str().unwrap().to_owned()
    };
    kubectl(&["apply", "-f", &file("crds.yaml", hypha_kube::ISTIO_CRDS)]).unwrap();

    let examples = examples();
    let kinds: std::collections::BTreeSet<&str> =
        examples.iter().filter_map(|o| o["kind"].as_str()).collect();
    assert!(kinds.len() >= 5, "{kinds:?}");
    let mut namespaces: Vec<&str> = examples
        .iter()
        .filter_map(|o| o.pointer("/metadata/namespace").and_then(Value::as_str))
        .collect();
    namespaces.sort_unstable();
    namespaces.dedup();
    for ns in &namespaces {
        let body = format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n");
        kubectl(&["apply", "-f", &file("ns.yaml", &body)]).unwrap();
    }
    // kubectl's default validation is the server's, strict: any field the schema lacks fails.
    let all = install::yaml(&examples);
    kubectl(&["apply", "-f", &file("examples.yaml", &all)]).unwrap();
    for o in &examples {
        let crd = crds::istio()
            .into_iter()
            .find(|c| c["spec"]["names"]["kind"] == o["kind"])
            .unwrap();
        let stored = api
            .get(
                crd["spec"]["group"].as_str().unwrap(),
                crd["spec"]["names"]["plural"].as_str().unwrap(),
                o.pointer("/metadata/namespace")
                    .and_then(Value::as_str)
                    .unwrap_or("default"),
                o["metadata"]["name"].as_str().unwrap(),
            )
            .unwrap();
        assert_eq!(
            stored["spec"], o["spec"],
            "{} pruned",
            o["metadata"]["name"]
        );
    }

    // A misspelled field, a mistyped one, a value outside its enum: refused with their paths.
    let vs = |http: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: typo\n  \
             namespace: default\nspec:\n  hosts: [reviews]\n  http:\n  - {http}\n    route:\n    \
             - destination: {{host: reviews}}\n"
        )
    };
    for (http, says) in [
        ("timout: 5s", "unknown field \"spec.http[0].timout\""),
        (
            "timeout: 5",
            "spec.http[0].timeout in body must be of type string",
        ),
        (
            "retries: {attempts: three}",
            "spec.http[0].retries.attempts in body must be of type integer",
        ),
    ] {
        let err = kubectl(&["apply", "-f", &file("typo.yaml", &vs(http))]).unwrap_err();
        assert!(err.contains(says), "{http}: {err}");
        assert!(api
            .get("networking.istio.io", "virtualservices", "default", "typo")
            .is_none());
    }
    let pa = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: \
              bad\n  namespace: default\nspec:\n  mtls: {mode: STRICTER}\n";
    let err = kubectl(&["apply", "-f", &file("pa.yaml", pa)]).unwrap_err();
    assert!(
        err.contains("spec.mtls.mode: Unsupported value: \"STRICTER\""),
        "{err}"
    );
    // The same typo with validation off is pruned, as a real API server prunes it.
    kubectl(&[
        "apply",
        "--validate=false",
        "-f",
        &file("typo.yaml", &vs("timout: 5s")),
    ])
    .unwrap();
    let stored = api
        .get("networking.istio.io", "virtualservices", "default", "typo")
        .unwrap();
    assert!(stored.pointer("/spec/http/0/timout").is_none(), "{stored}");
    assert_eq!(
        stored.pointer("/spec/http/0/route/0/destination/host"),
        Some(&json!("reviews"))
    );
}
