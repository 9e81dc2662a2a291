//! The patches kubectl sends: JSON merge patch (RFC 7386) for custom resources and
//! subresources, and strategic merge patch for built-in kinds (lists of objects merged by
//! their merge key, with the `$patch`, `$setElementOrder`, `$retainKeys` and
//! `$deleteFromPrimitiveList` directives).

use serde_json::{Map, Value};

/// RFC 7386: objects merge, `null` removes, anything else replaces.
pub fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let t = target.as_object_mut().expect("an object");
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// The merge key of a list field of the built-in kinds (from their Go types'
/// `patchMergeKey` tags), for the lists Hypha's tests and kubectl's flows touch; other lists
/// are replaced whole.
fn merge_key(field: &str, items: &[Value]) -> Option<&'static str> {
    let has = |k: &str| items.iter().any(|i| i.get(k).is_some());
    match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "env"
        | "imagePullSecrets"
        | "envFrom" => Some("name"),
        "volumeMounts" => Some("mountPath"),
        "volumeDevices" => Some("devicePath"),
        "hostAliases" => Some("ip"),
        "topologySpreadConstraints" => Some("topologyKey"),
        "conditions" => Some("type"),
        // Container ports merge by `containerPort`, Service ports by `port`.
        "ports" if has("containerPort") => Some("containerPort"),
        "ports" if has("port") => Some("port"),
        _ => None,
    }
}

/// Strategic merge patch of `patch` into `target`.
pub fn strategic(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let t = target.as_object_mut().expect("an object");
    if p.get("$patch").and_then(Value::as_str) == Some("replace") {
        let mut replaced = p.clone();
        replaced.remove("$patch");
        *t = replaced;
        return;
    }
    if let Some(keep) = p.get("$retainKeys").and_then(Value::as_array) {
        let keep: Vec<&str> = keep.iter().filter_map(Value::as_str).collect();
        t.retain(|k, _| keep.contains(&k.as_str()));
    }
    for (k, v) in p {
        if k.starts_with('$') {
            continue;
        }
        if let Some(field) = k.strip_prefix("$setElementOrder/") {
            let _ = field; // applied after the field itself, below
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Value::Array(gone)) = (t.get_mut(field), v) {
                list.retain(|x| !gone.contains(x));
            }
            continue;
        }
        match v {
            Value::Null => {
                t.remove(k);
            }
            Value::Array(items) => match merge_key(k, items) {
                Some(key) => {
                    let list = t
                        .entry(k.clone())
                        .or_insert_with(|| Value::Array(Vec::new()));
                    if !list.is_array() {
                        *list = Value::Array(Vec::new());
                    }
                    merge_list(list.as_array_mut().expect("a list"), items, key);
                }
                None => {
                    t.insert(k.clone(), v.clone());
                }
            },
            Value::Object(_) => strategic(t.entry(k.clone()).or_insert(Value::Null), v),
            _ => {
                t.insert(k.clone(), v.clone());
            }
        }
    }
    // `$setElementOrder/<field>`: the list's order as the manifest has it.
    for (k, order) in p {
        let Some(field) = k.strip_prefix("$setElementOrder/") else {
            continue;
        };
        let (Some(Value::Array(list)), Value::Array(order)) = (t.get_mut(field), order) else {
            continue;
        };
        let Some(key) = merge_key(field, order) else {
            continue;
        };
        let rank = |item: &Value| {
            order
                .iter()
                .position(|o| o.get(key) == item.get(key))
                .unwrap_or(usize::MAX)
        };
        list.sort_by_key(rank);
    }
}

fn merge_list(list: &mut Vec<Value>, items: &[Value], key: &str) {
    for item in items {
        let id = item.get(key);
        let at = list.iter().position(|x| x.get(key) == id);
        if item.get("$patch").and_then(Value::as_str) == Some("delete") {
            if let Some(i) = at {
                list.remove(i);
            }
            continue;
        }
        match at {
            Some(i) => strategic(&mut list[i], item),
            None => {
                let mut new = Value::Null;
                strategic(&mut new, item);
                list.push(new);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_is_rfc_7386() {
        let mut t = json!({"a": 1, "b": {"c": 2, "d": 3}, "l": [1, 2]});
        merge(
            &mut t,
            &json!({"a": null, "b": {"c": 5}, "l": [9], "n": "x"}),
        );
        assert_eq!(t, json!({"b": {"c": 5, "d": 3}, "l": [9], "n": "x"}));
    }

    #[test]
    fn strategic_merge_patch_does_what_kubectl_asks() {
        // The patch kubectl sent for a Deployment update (see the crate's notes).
        let mut t = json!({"metadata": {"labels": {"a": "1", "b": "2"}},
            "spec": {"strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}},
              "template": {"spec": {
                "containers": [{"name": "a", "image": "a:1", "args": ["x"], "ports": [{"containerPort": 80}, {"containerPort": 81}]},
                               {"name": "b", "image": "b:1"}],
                "volumes": [{"name": "v1", "emptyDir": {}}]}}}});
        let patch = json!({"metadata": {"labels": {"b": null}},
            "spec": {"strategy": {"$retainKeys": ["type"], "rollingUpdate": null, "type": "Recreate"},
              "template": {"spec": {"$setElementOrder/containers": [{"name": "c"}, {"name": "a"}],
                "containers": [{"image": "c:1", "name": "c"},
                               {"$setElementOrder/ports": [{"containerPort": 81}], "args": ["y"], "name": "a",
                                "ports": [{"$patch": "delete", "containerPort": 80}]},
                               {"$patch": "delete", "name": "b"}],
                "volumes": [{"$retainKeys": ["configMap", "name"], "configMap": {"name": "cm"}, "emptyDir": null, "name": "v1"}]}}}});
        strategic(&mut t, &patch);
        assert_eq!(
            t,
            json!({"metadata": {"labels": {"a": "1"}},
                "spec": {"strategy": {"type": "Recreate"},
                  "template": {"spec": {
                    "containers": [{"name": "c", "image": "c:1"},
                                   {"name": "a", "image": "a:1", "args": ["y"], "ports": [{"containerPort": 81}]}],
                    "volumes": [{"name": "v1", "configMap": {"name": "cm"}}]}}}})
        );
    }
}
