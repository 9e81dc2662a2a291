//! Which pods a revision's injector takes, as Istio's webhooks select them (their
//! `namespaceSelector`s and `objectSelector`s, which `hypha install` writes the same way):
//!
//! 1. a pod labelled (or, the old way, annotated) `sidecar.istio.io/inject: "false"`: none;
//! 2. a namespace labelled `istio-injection` (or `hypha-injection`): `enabled` means the
//!    default revision, anything else none, whatever the pod says;
//! 3. else the namespace's `istio.io/rev`, else the pod's;
//! 4. else a pod with `sidecar.istio.io/inject: "true"`: the default revision.

use std::collections::BTreeMap;

/// The revision that injects a pod, if any.
pub fn revision_of(
    namespace_labels: &BTreeMap<String, String>,
    pod_labels: &BTreeMap<String, String>,
    pod_annotations: &BTreeMap<String, String>,
) -> Option<String> {
    const REV: &str = "istio.io/rev";
    let pod_says = pod_choice(pod_labels, pod_annotations);
    if pod_says == Some(false) {
        return None;
    }
    let namespace_says = ["istio-injection", "hypha-injection"]
        .iter()
        .find_map(|k| namespace_labels.get(*k));
    if let Some(v) = namespace_says {
        return (v == "enabled").then(|| "default".to_owned());
    }
    if let Some(rev) = namespace_labels.get(REV).or_else(|| pod_labels.get(REV)) {
        return Some(rev.clone());
    }
    (pod_says == Some(true)).then(|| "default".to_owned())
}

/// What the pod itself says, as Istio reads `sidecar.istio.io/inject` (the label, else the
/// old annotation): `y`, `yes`, `true`, `on` (any case) ask for a sidecar, an empty value
/// says nothing, any other value refuses one.
pub fn pod_choice(
    pod_labels: &BTreeMap<String, String>,
    pod_annotations: &BTreeMap<String, String>,
) -> Option<bool> {
    const INJECT: &str = "sidecar.istio.io/inject";
    let v = pod_labels
        .get(INJECT)
        .or_else(|| pod_annotations.get(INJECT))?
        .to_ascii_lowercase();
    match v.as_str() {
        "" => None,
        "y" | "yes" | "true" | "on" => Some(true),
        _ => Some(false),
    }
}

/// Whether the injector of `revision` takes this pod.
pub fn selected(
    revision: &str,
    namespace_labels: &BTreeMap<String, String>,
    pod_labels: &BTreeMap<String, String>,
    pod_annotations: &BTreeMap<String, String>,
) -> bool {
    revision_of(namespace_labels, pod_labels, pod_annotations).as_deref() == Some(revision)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn selects_as_istios_webhooks_do() {
        let none = map(&[]);
        let enabled = map(&[("istio-injection", "enabled")]);
        let hypha = map(&[("hypha-injection", "enabled")]);
        let disabled = map(&[("istio-injection", "disabled")]);
        let canary_ns = map(&[("istio.io/rev", "canary")]);
        let opt_out = map(&[("sidecar.istio.io/inject", "false")]);
        let opt_in = map(&[("sidecar.istio.io/inject", "true")]);
        let canary_pod = map(&[("istio.io/rev", "canary")]);
        let rev = |ns, pod, ann| revision_of(ns, pod, ann);
        assert_eq!(rev(&enabled, &none, &none).as_deref(), Some("default"));
        assert_eq!(rev(&hypha, &none, &none).as_deref(), Some("default"));
        assert_eq!(rev(&enabled, &opt_out, &none), None);
        assert_eq!(rev(&enabled, &none, &opt_out), None, "the old annotation");
        assert_eq!(rev(&disabled, &opt_in, &none), None);
        assert_eq!(rev(&none, &none, &none), None);
        assert_eq!(rev(&none, &opt_in, &none).as_deref(), Some("default"));
        assert_eq!(rev(&none, &none, &opt_in).as_deref(), Some("default"));
        assert_eq!(rev(&canary_ns, &none, &none).as_deref(), Some("canary"));
        assert_eq!(rev(&none, &canary_pod, &none).as_deref(), Some("canary"));
        // The namespace's label wins over the pod's revision, istio-injection over istio.io/rev.
        assert_eq!(
            rev(&enabled, &canary_pod, &none).as_deref(),
            Some("default")
        );
        let both = map(&[("istio-injection", "enabled"), ("istio.io/rev", "canary")]);
        assert_eq!(rev(&both, &none, &none).as_deref(), Some("default"));
        let stable_ns = map(&[("istio.io/rev", "stable")]);
        assert_eq!(
            rev(&stable_ns, &canary_pod, &none).as_deref(),
            Some("stable")
        );
        assert!(selected("canary", &canary_ns, &none, &none));
        // Istio's reading of the pod's value: yes/on/True ask, anything else refuses.
        let yes = map(&[("sidecar.istio.io/inject", "Yes")]);
        let no = map(&[("sidecar.istio.io/inject", "no")]);
        let upper = map(&[("sidecar.istio.io/inject", "False")]);
        assert_eq!(rev(&none, &yes, &none).as_deref(), Some("default"));
        assert_eq!(rev(&enabled, &no, &none), None);
        assert_eq!(rev(&enabled, &upper, &none), None);
        // The label wins over the annotation.
        assert_eq!(rev(&enabled, &opt_in, &opt_out).as_deref(), Some("default"));
        assert!(!selected("default", &canary_ns, &none, &none));
    }
}
