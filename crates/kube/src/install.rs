//! `hypha install` and `hypha uninstall`: the manifests of `manifests/base` (the Kustomize base
//! in the repository, which `kubectl apply -k` takes as it is), for one image and one revision.
//! A second revision (`--revision canary`) is a control plane and webhook of its own beside the
//! first (`hypha-canary`, `hypha-sidecar-injector-canary`, selecting `istio.io/rev=canary`),
//! sharing the namespaces, CRDs, RBAC, node agent and the CA's signers, so pods of both
//! revisions trust each other: namespaces move from one to the other by relabelling, as in
//! Istio's revision-based upgrades.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::{json, Value};

use hypha_inject::webhooks::{configuration, WebhookTarget};

/// The base's files, in its kustomization's order.
pub const BASE: [(&str, &str); 7] = [
    (
        "namespaces.yaml",
        include_str!("../../../manifests/base/namespaces.yaml"),
    ),
    (
        "istio-crds.yaml",
        include_str!("../../../manifests/base/istio-crds.yaml"),
    ),
    (
        "hypha-crds.yaml",
        include_str!("../../../manifests/base/hypha-crds.yaml"),
    ),
    (
        "rbac.yaml",
        include_str!("../../../manifests/base/rbac.yaml"),
    ),
    (
        "control.yaml",
        include_str!("../../../manifests/base/control.yaml"),
    ),
    (
        "injector.yaml",
        include_str!("../../../manifests/base/injector.yaml"),
    ),
    (
        "node-agent.yaml",
        include_str!("../../../manifests/base/node-agent.yaml"),
    ),
];

/// The image the base names.
pub const BASE_IMAGE: &str = "hypha:0.1.0";

#[derive(Debug, Clone)]
pub struct Install {
    /// `default`, or the name of a second control plane's revision.
    pub revision: String,
    /// The image every container runs (`hypha` with subcommands).
    pub image: String,
}

impl Default for Install {
    fn default() -> Install {
        Install {
            revision: "default".into(),
            image: BASE_IMAGE.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{file}: {message}")]
    Manifest { file: &'static str, message: String },
    #[error("revision {0:?}: a revision is a DNS label (lower case letters, digits, '-')")]
    Revision(String),
    #[error("kubectl: {0}")]
    Kubectl(String),
}

/// Every object `install` makes, in the order to apply them.
pub fn objects(o: &Install) -> Result<Vec<Value>, InstallError> {
    let rev = o.revision.as_str();
    let label = !rev.is_empty()
        && rev.len() <= 50
        && rev
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !rev.starts_with('-')
        && !rev.ends_with('-');
    if !label {
        return Err(InstallError::Revision(rev.to_owned()));
    }
    let mut out = Vec::new();
    for (file, text) in BASE {
        let docs =
            hypha_config::yaml::parse_documents(text).map_err(|e| InstallError::Manifest {
                file,
                message: format!("line {}: {}", e.pos.line, e.message),
            })?;
        for doc in docs.into_iter().filter(|d| !d.value.is_null()) {
            let mut obj = doc.value;
            set_image(&mut obj, &o.image);
            if rev != "default" && per_revision(&obj) {
                obj = revised(obj, rev);
            }
            out.push(obj);
        }
    }
    Ok(out)
}

/// The objects that belong to one revision (its control plane, Service, PDB and webhook
/// configuration), which `uninstall --revision` removes and nothing else.
pub fn revision_objects(o: &Install) -> Result<Vec<Value>, InstallError> {
    Ok(objects(o)?.into_iter().filter(per_revision).collect())
}

fn per_revision(obj: &Value) -> bool {
    obj.pointer("/metadata/labels/istio.io~1rev").is_some()
}

/// Every container of a workload runs `image`, and the control plane injects it.
fn set_image(obj: &mut Value, image: &str) {
    for c in obj
        .pointer_mut("/spec/template/spec/containers")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
    {
        c["image"] = json!(image);
        for a in c["args"].as_array_mut().into_iter().flatten() {
            if a.as_str().is_some_and(|s| s.starts_with("--image=")) {
                *a = json!(format!("--image={image}"));
            }
        }
    }
}

/// A default-revision object as revision `rev`'s.
fn revised(mut obj: Value, rev: &str) -> Value {
    let name = format!("hypha-{rev}");
    if obj["kind"] == "MutatingWebhookConfiguration" {
        return configuration(&WebhookTarget {
            name: format!("hypha-sidecar-injector-{rev}"),
            service: name,
            revision: rev.to_owned(),
            ..WebhookTarget::default()
        });
    }
    obj["metadata"]["name"] = json!(name);
    let text = obj.to_string();
    // The revision label wherever the default one is (labels, selectors).
    let text = text.replace(
        "\"istio.io/rev\":\"default\"",
        &format!("\"istio.io/rev\":\"{rev}\""),
    );
    let mut obj: Value = serde_json::from_str(&text).unwrap_or(obj);
    for c in obj
        .pointer_mut("/spec/template/spec/containers")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
    {
        for a in c["args"].as_array_mut().into_iter().flatten() {
            let Some(s) = a.as_str() else { continue };
            let new = match s.split_once('=') {
                Some(("--webhook-name", _)) => format!("--webhook-name={name}.hypha-system.svc"),
                Some(("--webhook-configuration", _)) => {
                    format!("--webhook-configuration=hypha-sidecar-injector-{rev}")
                }
                Some(("--injected-control-plane", _)) => {
                    format!("--injected-control-plane=https://{name}.hypha-system.svc:15012")
                }
                Some(("--revision", _)) => format!("--revision={rev}"),
                _ => continue,
            };
            *a = json!(new);
        }
    }
    obj
}

/// The objects as one YAML stream.
pub fn yaml(objects: &[Value]) -> String {
    objects
        .iter()
        .map(hypha_inject::manifest::to_yaml)
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// `kubectl <args> -f -` with `yaml` on its stdin (with `kubeconfig` if given); its output.
pub fn kubectl(
    yaml: &str,
    args: &[&str],
    kubeconfig: Option<&Path>,
) -> Result<String, InstallError> {
    let mut cmd = Command::new("kubectl");
    if let Some(k) = kubeconfig {
        cmd.arg("--kubeconfig").arg(k);
    }
    let mut child = cmd
        .args(args)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| InstallError::Kubectl(e.to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(yaml.as_bytes())
            .map_err(|e| InstallError::Kubectl(e.to_string()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| InstallError::Kubectl(e.to_string()))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(text)
    } else {
        Err(InstallError::Kubectl(format!(
            "{}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}

/// What `uninstall` deletes: a revision's own objects, or (the default revision) everything,
/// the CRDs (and with them every Istio object) unless `keep_crds`; in reverse order.
pub fn uninstall_objects(o: &Install, keep_crds: bool) -> Result<Vec<Value>, InstallError> {
    let mut objs = if o.revision == "default" {
        objects(o)?
    } else {
        revision_objects(o)?
    };
    if keep_crds {
        objs.retain(|v| v["kind"] != "CustomResourceDefinition");
    }
    objs.reverse();
    Ok(objs)
}
