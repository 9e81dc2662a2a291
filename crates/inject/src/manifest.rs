//! `hypha inject -f`: every workload in a YAML stream gets its pod template injected, the
//! rest passes through; the result is YAML `kubectl apply -f` takes.

use serde_json::Value;
use yaml_rust2::{Yaml, YamlEmitter};

use crate::{inject, InjectError, Outcome, Settings, Target};

/// What injecting a stream did to one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// `Kind/namespace/name`.
    pub object: String,
    /// Why it was left as it was, when it was.
    pub skipped: Option<crate::Skip>,
}

/// Injects every Pod, Deployment, ReplicaSet, StatefulSet, DaemonSet, Job and CronJob in
/// `yaml` (documents and `List`s of them); other objects are written back unchanged.
pub fn inject_yaml(yaml: &str, settings: &Settings) -> Result<(String, Vec<Note>), InjectError> {
    let docs = hypha_config::yaml::parse_documents(yaml).map_err(|e| {
        InjectError::Manifest(format!(
            "line {}, column {}: {}",
            e.pos.line, e.pos.column, e.message
        ))
    })?;
    let mut notes = Vec::new();
    let mut out = String::new();
    for doc in docs {
        if doc.value.is_null() {
            continue;
        }
        let mut value = doc.value;
        inject_object(&mut value, settings, &mut notes)?;
        out.push_str(&to_yaml(&value));
        out.push('\n');
    }
    Ok((out, notes))
}

/// Injects one object in place (each item of a `List`).
pub fn inject_object(
    obj: &mut Value,
    settings: &Settings,
    notes: &mut Vec<Note>,
) -> Result<(), InjectError> {
    let kind = obj["kind"].as_str().unwrap_or_default().to_owned();
    if kind.ends_with("List") {
        for item in obj["items"].as_array_mut().into_iter().flatten() {
            inject_object(item, settings, notes)?;
        }
        return Ok(());
    }
    let name = obj["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let namespace = obj["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default")
        .to_owned();
    let (template, workload) = match kind.as_str() {
        "Pod" => (&mut *obj, None),
        "Deployment" | "ReplicaSet" | "StatefulSet" | "DaemonSet" | "Job" => {
            (&mut obj["spec"]["template"], Some(name.clone()))
        }
        "CronJob" => (
            &mut obj["spec"]["jobTemplate"]["spec"]["template"],
            Some(name.clone()),
        ),
        _ => return Ok(()),
    };
    if !template.is_object() {
        return Err(InjectError::Manifest(format!(
            "{kind}/{namespace}/{name} has no pod template"
        )));
    }
    let target = Target {
        namespace: namespace.clone(),
        workload,
    };
    let object = format!("{kind}/{namespace}/{name}");
    let outcome = inject(template, &target, settings).map_err(|e| match e {
        InjectError::NotAPod(why) => InjectError::Manifest(format!("{object}: {why}")),
        e => InjectError::Manifest(format!("{object}: {e}")),
    })?;
    match outcome {
        Outcome::Injected(done) => {
            *template = done.pod;
            notes.push(Note {
                object,
                skipped: None,
            });
        }
        Outcome::Skipped(why) => notes.push(Note {
            object,
            skipped: Some(why),
        }),
    }
    Ok(())
}

/// A JSON value as a YAML document (`---` first).
pub fn to_yaml(v: &Value) -> String {
    let mut out = String::new();
    let mut emitter = YamlEmitter::new(&mut out);
    // Writing into a String cannot fail.
    let _ = emitter.dump(&yaml(v));
    out
}

fn yaml(v: &Value) -> Yaml {
    match v {
        Value::Null => Yaml::Null,
        Value::Bool(b) => Yaml::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Yaml::Integer(i),
            None => Yaml::Real(n.to_string()),
        },
        Value::String(s) => Yaml::String(s.clone()),
        Value::Array(a) => Yaml::Array(a.iter().map(yaml).collect()),
        Value::Object(o) => {
            let mut h = yaml_rust2::yaml::Hash::new();
            for (k, v) in o {
                h.insert(Yaml::String(k.clone()), yaml(v));
            }
            Yaml::Hash(h)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn yaml_output_reads_back_as_the_same_values() {
        let v = json!({
            "a": ["true", "1", "0755", "1e3", "", " x", "null", "~", "yes", "a: b", "#c",
                  "- d", "{e}", "multi\nline", "tab\there", "\"q\"", "0x1f", ".5"],
            "n": [1, -2, 1.5, true, null],
            "nested": {"empty": {}, "list": []},
        });
        let text = to_yaml(&v);
        let back = hypha_config::yaml::parse_documents(&text).unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].value, v, "{text}");
    }
}
