//! Custom resources checked against their CRD's structural schema, as kube-apiserver does on
//! create and update: wrong types and values outside an enum are refused (422 Invalid), fields
//! the schema does not know are pruned, and with `fieldValidation=Strict` (kubectl's default)
//! refused (400), with `Warn` (the default) reported in `Warning` headers.

use serde_json::{Map, Value};

/// What a request asked done with fields the schema does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FieldValidation {
    Ignore,
    Warn,
    Strict,
}

impl FieldValidation {
    pub(crate) fn from_query(v: Option<&str>) -> FieldValidation {
        match v {
            Some("Strict") => FieldValidation::Strict,
            Some("Ignore") => FieldValidation::Ignore,
            _ => FieldValidation::Warn,
        }
    }
}

/// Why an object was refused: the HTTP status's reason and each problem found.
#[derive(Debug)]
pub(crate) enum Refused {
    /// Unknown fields under `Strict`.
    Strict(Vec<String>),
    /// Values of the wrong type, outside their enum, or missing where required.
    Invalid(Vec<String>),
}

/// Checks `obj` against `schema` (a CRD version's `openAPIV3Schema`) and prunes what it does
/// not know; the warnings to send back.
pub(crate) fn admit(
    schema: &Value,
    obj: &mut Value,
    fields: FieldValidation,
) -> Result<Vec<String>, Refused> {
    let mut walk = Walk::default();
    if let Some(root) = obj.as_object_mut() {
        // apiVersion, kind and metadata are the API server's, whatever the schema says.
        let own: Vec<(String, Value)> = ["apiVersion", "kind", "metadata"]
            .into_iter()
            .filter_map(|k| Some((k.to_owned(), root.remove(k)?)))
            .collect();
        walk.object(schema, root, "");
        root.extend(own);
    }
    let Walk { unknown, invalid } = walk;
    if !invalid.is_empty() {
        return Err(Refused::Invalid(invalid));
    }
    let unknown: Vec<String> = unknown
        .into_iter()
        .map(|f| format!("unknown field \"{f}\""))
        .collect();
    match fields {
        FieldValidation::Strict if !unknown.is_empty() => Err(Refused::Strict(unknown)),
        FieldValidation::Warn => Ok(unknown),
        _ => Ok(Vec::new()),
    }
}

#[derive(Default)]
struct Walk {
    unknown: Vec<String>,
    invalid: Vec<String>,
}

impl Walk {
    fn value(&mut self, schema: &Value, v: &mut Value, path: &str) {
        let ty = schema.get("type").and_then(Value::as_str);
        let int_or_string = schema
            .get("x-kubernetes-int-or-string")
            .and_then(Value::as_bool)
            == Some(true);
        let nullable = schema.get("nullable").and_then(Value::as_bool) == Some(true);
        if v.is_null() && (nullable || ty.is_none()) {
            return;
        }
        let fits = match ty {
            _ if int_or_string => v.is_string() || v.is_i64() || v.is_u64(),
            None => true,
            Some("object") => v.is_object(),
            Some("array") => v.is_array(),
            Some("string") => v.is_string(),
            Some("integer") => v.is_i64() || v.is_u64(),
            Some("number") => v.is_number(),
            Some("boolean") => v.is_boolean(),
            Some(_) => true,
        };
        if !fits {
            self.invalid.push(format!(
                "{path}: Invalid value: \"{}\": {path} in body must be of type {}: \"{}\"",
                type_name(v),
                ty.unwrap_or("integer or string"),
                type_name(v)
            ));
            return;
        }
        if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
            if !allowed.contains(v) {
                let list: Vec<String> = allowed.iter().map(Value::to_string).collect();
                self.invalid.push(format!(
                    "{path}: Unsupported value: {v}: supported values: {}",
                    list.join(", ")
                ));
            }
        }
        match v {
            Value::Object(m) => self.object(schema, m, path),
            Value::Array(items) => {
                if let Some(item) = schema.get("items") {
                    for (i, x) in items.iter_mut().enumerate() {
                        self.value(item, x, &format!("{path}[{i}]"));
                    }
                }
            }
            _ => {}
        }
    }

    fn object(&mut self, schema: &Value, m: &mut Map<String, Value>, path: &str) {
        for r in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if !m.contains_key(r) {
                self.invalid
                    .push(format!("{}: Required value", child(path, r)));
            }
        }
        if let Some(props) = schema.get("properties").and_then(Value::as_object) {
            for (k, x) in m.iter_mut() {
                match props.get(k) {
                    Some(s) => self.value(s, x, &child(path, k)),
                    None if !preserves(schema) => self.unknown.push(child(path, k)),
                    None => {}
                }
            }
            if !preserves(schema) {
                m.retain(|k, _| props.contains_key(k));
            }
        } else if let Some(each) = schema.get("additionalProperties").filter(|s| s.is_object()) {
            for (k, x) in m.iter_mut() {
                self.value(each, x, &child(path, k));
            }
        } else if !preserves(schema) && !m.is_empty() {
            // An object with neither properties nor free fields keeps nothing.
            self.unknown.extend(m.keys().map(|k| child(path, k)));
            m.clear();
        }
    }
}

/// The path of field `k` of the object at `path` (`""`: the object itself).
fn child(path: &str, k: &str) -> String {
    if path.is_empty() {
        k.to_owned()
    } else {
        format!("{path}.{k}")
    }
}

fn preserves(schema: &Value) -> bool {
    schema
        .get("x-kubernetes-preserve-unknown-fields")
        .and_then(Value::as_bool)
        == Some(true)
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn schema() -> Value {
        json!({"type": "object", "properties": {
            "spec": {"type": "object", "required": ["host"], "properties": {
                "host": {"type": "string"},
                "port": {"type": "integer"},
                "mode": {"type": "string", "enum": ["A", "B"]},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "raw": {"x-kubernetes-preserve-unknown-fields": true},
                "list": {"type": "array", "items": {"type": "object", "properties": {"n": {"type": "integer"}}}},
            }},
            "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
        }})
    }

    #[test]
    fn known_fields_pass_unknown_ones_are_pruned_or_refused() {
        let good = json!({"apiVersion": "x/v1", "kind": "X", "metadata": {"name": "a"},
            "spec": {"host": "h", "port": 1, "mode": "A", "labels": {"k": "v"},
                     "raw": {"any": [1, {"thing": true}]}, "list": [{"n": 2}]},
            "status": {"whatever": 1}});
        let mut obj = good.clone();
        assert_eq!(
            admit(&schema(), &mut obj, FieldValidation::Strict).unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(obj, good);

        let mut extra = good.clone();
        extra["spec"]["list"][0]["m"] = json!(1);
        extra["spec"]["hots"] = json!("typo");
        extra["top"] = json!(1);
        let mut warned = extra.clone();
        let warnings = admit(&schema(), &mut warned, FieldValidation::Warn).unwrap();
        assert_eq!(warned, good, "pruned");
        assert_eq!(warnings.len(), 3, "{warnings:?}");
        assert!(warnings.contains(&"unknown field \"spec.hots\"".to_owned()));
        assert!(warnings.contains(&"unknown field \"spec.list[0].m\"".to_owned()));
        match admit(&schema(), &mut extra.clone(), FieldValidation::Strict) {
            Err(Refused::Strict(f)) => assert_eq!(f.len(), 3),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn wrong_types_enums_and_missing_required_fields_are_invalid() {
        for (field, value, says) in [
            (
                "port",
                json!("80"),
                "spec.port in body must be of type integer",
            ),
            (
                "port",
                json!(1.5),
                "spec.port in body must be of type integer",
            ),
            ("mode", json!("C"), "spec.mode: Unsupported value: \"C\""),
            (
                "labels",
                json!({"k": 1}),
                "spec.labels.k in body must be of type string",
            ),
            (
                "list",
                json!([{"n": "x"}]),
                "spec.list[0].n in body must be of type integer",
            ),
        ] {
            let mut obj = json!({"spec": {"host": "h"}});
            obj["spec"][field] = value;
            match admit(&schema(), &mut obj, FieldValidation::Ignore) {
                Err(Refused::Invalid(e)) => assert!(e[0].contains(says), "{e:?}"),
                other => panic!("{field}: {other:?}"),
            }
        }
        match admit(&schema(), &mut json!({"spec": {}}), FieldValidation::Ignore) {
            Err(Refused::Invalid(e)) => assert_eq!(e, ["spec.host: Required value"]),
            other => panic!("{other:?}"),
        }
    }
}
