//! `hypha check` on config whose enforcement Hypha lacks (issue 24, item 10): each such field
//! is an error with its file, line and what to write instead, and the command fails.

use std::process::Command;

const POLICIES: &str = "\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web, namespace: shop}
spec:
  hosts: [web.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints: [{address: 10.0.0.5}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: shop}
spec:
  action: CUSTOM
  provider: {name: opa}
  rules: [{to: [{operation: {paths: [/admin]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: waypoint, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: '', name: web}]
  action: DENY
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: jwt, namespace: shop}
spec:
  rules:
  - from: [{source: {requestPrincipals: ['*']}}]
    when: [{key: 'request.auth.claims[groups]', values: [admin]}]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: shop}
spec: {jwtRules: [{issuer: issuer}]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: shop}
spec:
  host: web.shop.svc.cluster.local
  trafficPolicy:
    tls: {mode: MUTUAL, credentialName: web-client, caCrl: /etc/crl.pem}
";

#[test]
fn check_names_every_unenforced_field_with_its_line_and_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policies.yaml");
    std::fs::write(&file, POLICIES).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hypha"))
        .arg("check")
        .arg(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "hypha check accepted it:\n{text}");
    let file = file.display().to_string();
    for (line, path) in [
        (15, "spec.action"),
        (23, "spec.targetRefs"),
        (32, "spec.rules[0].from[0].source.requestPrincipals"),
        (33, "spec.rules[0].when[0].key"),
        (36, "kind"),
        (46, "spec.trafficPolicy.tls.credentialName"),
        (46, "spec.trafficPolicy.tls.caCrl"),
    ] {
        let found = text.lines().find(|l| {
            l.starts_with(&format!("{file}:{line}:"))
                && l.contains("error[unenforced]")
                && l.contains(&format!(" {path}:"))
        });
        let Some(found) = found else {
            panic!("no error for {path} at line {line}:\n{text}");
        };
        assert!(
            ["instead", "keep it out"].iter().any(|w| found.contains(w)),
            "{found}"
        );
    }
    assert!(text.contains("error(s) in"), "{text}");
}
