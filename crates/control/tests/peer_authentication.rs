//! PeerAuthentication modes as Istio resolves them: workload policy, then namespace, then
//! mesh-wide (root namespace); UNSET inherits; port-level overrides on the workload policy;
//! PERMISSIVE by default.

use std::collections::BTreeMap;

use hypha_config::security::MtlsMode;
use hypha_control::mtls::mode;

fn config(policies: &str) -> hypha_config::Config {
    let loaded = hypha_config::load_sources([("pa.yaml", policies)]);
    let (cfg, _) = loaded
        .into_result()
        .unwrap_or_else(|d| panic!("{:?}", d.errors().collect::<Vec<_>>()));
    cfg
}

fn pa(ns: &str, name: &str, selector: Option<&str>, mode: &str, ports: &[(u16, &str)]) -> String {
    let selector = selector.map_or(String::new(), |app| {
        format!("  selector:\n    matchLabels: {{app: {app}}}\n")
    });
    let ports = if ports.is_empty() {
        String::new()
    } else {
        let mut s = "  portLevelMtls:\n".to_owned();
        for (p, m) in ports {
            s.push_str(&format!("    {p}: {{mode: {m}}}\n"));
        }
        s
    };
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n{selector}  mtls: {{mode: {mode}}}\n{ports}"
    )
}

fn labels(app: &str) -> BTreeMap<String, String> {
    [("app".to_owned(), app.to_owned())].into_iter().collect()
}

#[test]
fn precedence_inheritance_and_port_overrides() {
    // Nothing: PERMISSIVE.
    let cfg = config("");
    assert_eq!(mode(&cfg, "shop", &labels("web"), 80), MtlsMode::Permissive);

    // Mesh-wide STRICT, a namespace DISABLE, a workload PERMISSIVE with a STRICT port.
    let cfg = config(
        &[
            pa("istio-system", "default", None, "STRICT", &[]),
            pa("legacy", "default", None, "DISABLE", &[]),
            pa(
                "shop",
                "web",
                Some("web"),
                "PERMISSIVE",
                &[(8443, "STRICT")],
            ),
            pa("shop", "api", Some("api"), "UNSET", &[(9000, "DISABLE")]),
        ]
        .concat(),
    );
    assert_eq!(mode(&cfg, "other", &labels("x"), 80), MtlsMode::Strict);
    assert_eq!(mode(&cfg, "legacy", &labels("x"), 80), MtlsMode::Disable);
    assert_eq!(mode(&cfg, "shop", &labels("web"), 80), MtlsMode::Permissive);
    assert_eq!(mode(&cfg, "shop", &labels("web"), 8443), MtlsMode::Strict);
    // A workload policy only selects its own labels, in its own namespace.
    assert_eq!(mode(&cfg, "shop", &labels("db"), 80), MtlsMode::Strict);
    assert_eq!(mode(&cfg, "other", &labels("web"), 80), MtlsMode::Strict);
    // UNSET inherits (here from the mesh), but its port level still overrides.
    assert_eq!(mode(&cfg, "shop", &labels("api"), 80), MtlsMode::Strict);
    assert_eq!(mode(&cfg, "shop", &labels("api"), 9000), MtlsMode::Disable);
}
