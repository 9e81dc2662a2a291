//! Discovery, as kubectl and client libraries find what the server serves: `/version`, the
//! legacy and aggregated (`apidiscovery.k8s.io/v2`) group lists, each group-version's
//! resources, and the minimal OpenAPI v3 kubectl's default validation asks for.

use http::{Response, StatusCode};
use serde_json::{json, Value};

use crate::kinds::Kind;
use crate::serve::{failure, ok, respond, Body};
use crate::{lock, Shared, State};

pub(crate) fn version() -> Value {
    json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0", "gitCommit": "0000000000000000000000000000000000000000",
           "gitTreeState": "clean", "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.23.0", "compiler": "gc",
           "platform": "linux/amd64"})
}

/// The group-versions served, each with its kinds, core first, then by group.
pub(crate) fn group_versions(state: &State) -> Vec<(String, String, Vec<Kind>)> {
    let mut out: Vec<(String, String, Vec<Kind>)> = Vec::new();
    for k in &state.kinds {
        match out
            .iter_mut()
            .find(|(g, v, _)| *g == k.group && *v == k.version)
        {
            Some((_, _, kinds)) => kinds.push(k.clone()),
            None => out.push((k.group.clone(), k.version.clone(), vec![k.clone()])),
        }
    }
    out
}

const AGGREGATED: &str = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

pub(crate) fn aggregated_list(gvs: &[(String, String, Vec<Kind>)], core: bool) -> Value {
    let mut items: Vec<Value> = Vec::new();
    for (g, v, kinds) in gvs.iter().filter(|(g, _, _)| g.is_empty() == core) {
        let version = json!({"version": v, "freshness": "Current",
                             "resources": kinds.iter().map(Kind::discovery_entry).collect::<Vec<_>>()});
        match items.iter_mut().find(|i| i["metadata"]["name"] == json!(g)) {
            Some(item) => item["versions"]
                .as_array_mut()
                .expect("versions")
                .push(version),
            None => items.push(
                json!({"metadata": {"name": g, "creationTimestamp": null}, "versions": [version]}),
            ),
        }
    }
    json!({"kind": "APIGroupDiscoveryList", "apiVersion": "apidiscovery.k8s.io/v2", "metadata": {}, "items": items})
}

pub(crate) fn discovery_core(shared: &Shared, aggregated: bool) -> Response<Body> {
    let state = lock(shared);
    if aggregated {
        return respond(
            StatusCode::OK,
            AGGREGATED,
            &aggregated_list(&group_versions(&state), true),
        );
    }
    ok(&json!({"kind": "APIVersions", "versions": ["v1"],
               "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}))
}

pub(crate) fn discovery_groups(shared: &Shared, aggregated: bool) -> Response<Body> {
    let state = lock(shared);
    let gvs = group_versions(&state);
    if aggregated {
        return respond(StatusCode::OK, AGGREGATED, &aggregated_list(&gvs, false));
    }
    let mut groups: Vec<Value> = Vec::new();
    for (g, v, _) in gvs.iter().filter(|(g, _, _)| !g.is_empty()) {
        let gv = json!({"groupVersion": format!("{g}/{v}"), "version": v});
        match groups.iter_mut().find(|x| x["name"] == json!(g)) {
            Some(x) => x["versions"].as_array_mut().expect("versions").push(gv),
            None => {
                groups.push(json!({"name": g, "versions": [gv.clone()], "preferredVersion": gv}))
            }
        }
    }
    ok(&json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}))
}

pub(crate) fn resource_list(shared: &Shared, group: &str, version: &str) -> Response<Body> {
    let state = lock(shared);
    let kinds: Vec<&Kind> = state
        .kinds
        .iter()
        .filter(|k| k.group == group && k.version == version)
        .collect();
    if kinds.is_empty() {
        return failure(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        );
    }
    let gv = kinds[0].api_version();
    let resources: Vec<Value> = kinds
        .iter()
        .flat_map(|k| k.resource_list_entries())
        .collect();
    ok(
        &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
    )
}

/// kubectl's default validation asks whether the server takes `fieldValidation` for a kind:
/// one PATCH operation per kind that lists the parameter, and nothing else.
pub(crate) fn openapi_index(shared: &Shared) -> Value {
    let state = lock(shared);
    let mut paths = serde_json::Map::new();
    for (g, v, _) in group_versions(&state) {
        let p = if g.is_empty() {
            format!("api/{v}")
        } else {
            format!("apis/{g}/{v}")
        };
        paths.insert(
            p.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{p}?hash=0")}),
        );
    }
    json!({"paths": paths})
}

pub(crate) fn openapi_doc(shared: &Shared, rest: &[&str]) -> Response<Body> {
    let (group, version) = match rest {
        ["api", v] => ("", *v),
        ["apis", g, v] => (*g, *v),
        _ => {
            return failure(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the server could not find the requested resource",
            )
        }
    };
    let state = lock(shared);
    let mut paths = serde_json::Map::new();
    for k in state
        .kinds
        .iter()
        .filter(|k| k.group == group && k.version == version)
    {
        let path = if k.namespaced {
            format!(
                "{}/namespaces/{{namespace}}/{}/{{name}}",
                k.prefix(),
                k.resource
            )
        } else {
            format!("{}/{}/{{name}}", k.prefix(), k.resource)
        };
        paths.insert(path, json!({"patch": {
            "x-kubernetes-group-version-kind": {"group": k.group, "version": k.version, "kind": k.kind},
            "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}},
                           {"name": "fieldManager", "in": "query", "schema": {"type": "string"}},
                           {"name": "dryRun", "in": "query", "schema": {"type": "string"}}],
            "responses": {"200": {"description": "OK"}}}}));
    }
    if paths.is_empty() {
        return failure(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        );
    }
    ok(
        &json!({"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.33.0"},
               "paths": paths, "components": {"schemas": {}}}),
    )
}
