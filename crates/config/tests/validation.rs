//! Validation: each kind of problem is reported with its exact file, line, column and field
//! path, all at once, and good config passes.

use hypha_config::{load, load_str, Severity};

/// (code, line, column, path) of every error.
fn errors(src: &str) -> Vec<(&'static str, usize, usize, String)> {
    let loaded = load_str("test.yaml", src);
    loaded
        .diagnostics
        .into_sorted()
        .into_iter()
        .filter(|d| d.severity == Severity::Error)
        .map(|d| {
            assert_eq!(&*d.file, "test.yaml");
            (d.code, d.line, d.column, d.path)
        })
        .collect()
}

fn e(
    code: &'static str,
    line: usize,
    column: usize,
    path: &str,
) -> (&'static str, usize, usize, String) {
    (code, line, column, path.to_string())
}

const SERVICES: &str = "\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web, namespace: shop}
spec:
  hosts: [web.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {number: 80, name: http, protocol: HTTP}
  - {number: 81, name: admin, protocol: HTTP}
  workloadSelector: {labels: {app: web}}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: web, namespace: shop}
spec:
  host: web
  subsets:
  - {name: v1, labels: {version: v1}}
---
";

#[test]
fn the_example_mesh_is_valid() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/bookinfo");
    let loaded = load(std::path::Path::new(dir));
    let problems: Vec<String> = loaded.diagnostics.iter().map(ToString::to_string).collect();
    assert!(problems.is_empty(), "{problems:#?}");
    let c = &loaded.config;
    assert_eq!(c.service_entries.len(), 4);
    assert_eq!(c.workload_entries.len(), 6);
    assert_eq!(c.virtual_services.len(), 4);
    assert_eq!(c.destination_rules.len(), 3);
    assert_eq!(c.authorization_policies.len(), 1);
    assert_eq!(c.peer_authentications.len(), 1);
    assert_eq!(c.mesh.tenants.len(), 2);
    assert_eq!(c.mesh.tenant_of("bookinfo").unwrap().signer, "bookinfo");
    assert_eq!(c.mesh.tenant_of("elsewhere").unwrap().name, "default");
}

#[test]
fn bad_regex() {
    let src = format!(
        "{SERVICES}apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web, namespace: shop}}
spec:
  hosts: [web]
  http:
  - match:
    - uri: {{regex: \"/a(b\"}}
    route:
    - destination: {{host: web}}
"
    );
    assert_eq!(
        errors(&src),
        vec![e(
            "invalid-regex",
            28,
            13,
            "spec.http[0].match[0].uri.regex"
        )]
    );
}

/// Match regexes are checked by the proxy's own matcher: RE2's ASCII `\\w` makes
/// `\\w{500}` small enough (the Unicode `\\w` of the `regex` crate would not be), while a
/// Unicode class repeated as often is too large for the proxy and refused here too.
#[test]
fn regexes_are_checked_as_the_proxy_compiles_them() {
    let src = format!(
        "{SERVICES}apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web, namespace: shop}}
spec:
  hosts: [web]
  http:
  - match:
    - uri: {{regex: \"/t/\\\\w{{500}}\"}}
    route:
    - destination: {{host: web}}
  - match:
    - uri: {{regex: \"/t/\\\\pL{{500}}\"}}
    route:
    - destination: {{host: web}}
"
    );
    assert!(
        regex::RegexBuilder::new(r"\w{500}")
            .size_limit(1 << 20)
            .build()
            .is_err(),
        "the test needs a pattern that Unicode `\\w` makes too large"
    );
    assert_eq!(
        errors(&src),
        vec![e(
            "invalid-regex",
            32,
            13,
            "spec.http[1].match[0].uri.regex"
        )]
    );
}

#[test]
fn weights_must_sum_to_100_and_stay_in_range() {
    let src = format!(
        "{SERVICES}apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {{name: web, namespace: shop}}
spec:
  hosts: [web]
  http:
  - route:
    - destination: {{host: web, subset: v1}}
      weight: 60
    - destination: {{host: web}}
      weight: 30
  - route:
    - destination: {{host: web}}
      weight: 101
    - destination: {{host: web}}
      weight: -1
"
    );
    assert_eq!(
        errors(&src),
        vec![
            e("weights-sum", 31, 7, "spec.http[0].route[1].weight"),
            e("invalid-weight", 34, 7, "spec.http[1].route[0].weight"),
            e("invalid-weight", 36, 7, "spec.http[1].route[1].weight"),
        ]
    );
}

#[test]
fn unknown_hosts_subsets_and_ports() {
    let src = format!(
        "{SERVICES}apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web, namespace: shop}}
spec:
  hosts: [web]
  http:
  - route:
    - destination:
        host: nowhere
      weight: 50
    - destination:
        host: web.shop.svc.cluster.local
        subset: v9
        port: {{number: 8080}}
      weight: 50
"
    );
    assert_eq!(
        errors(&src),
        vec![
            e(
                "unknown-host",
                29,
                9,
                "spec.http[0].route[0].destination.host"
            ),
            e(
                "unknown-subset",
                33,
                9,
                "spec.http[0].route[1].destination.subset"
            ),
            e(
                "unknown-port",
                34,
                16,
                "spec.http[0].route[1].destination.port.number"
            ),
        ]
    );
}

#[test]
fn duplicate_names() {
    let src = format!(
        "{SERVICES}apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: web
  namespace: shop
spec:
  host: web
  subsets:
  - {{name: v2}}
  - {{name: v2}}
"
    );
    assert_eq!(
        errors(&src),
        vec![
            e("duplicate-name", 24, 3, "metadata.name"),
            e("duplicate-name", 30, 6, "spec.subsets[1].name"),
        ]
    );
}

#[test]
fn bad_ports_addresses_and_cidrs() {
    let src = "\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: shop}
spec:
  hosts: [db.example.com]
  addresses: [10.0.0.300, \"fd00::/129\", 10.1.0.0/16, \"fd00:1::/64\"]
  ports:
  - {number: 0, name: a}
  - {number: 70000, name: b}
  - {number: 5432, name: c, targetPort: 99999}
  resolution: STATIC
  endpoints:
  - address: 1.2.3
  - address: \"fd00::zz\"
  - address: \"fd00::1\"
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: shop}
spec:
  rules:
  - from:
    - source:
        ipBlocks: [10.0.0.0/8, 300.1.1.1]
        notRemoteIpBlocks: [\"::1/200\"]
    to:
    - operation:
        ports: [\"8080\", \"http\", \"0\"]
";
    assert_eq!(
        errors(src),
        vec![
            e("invalid-address", 6, 15, "spec.addresses[0]"),
            e("invalid-address", 6, 27, "spec.addresses[1]"),
            e("invalid-port", 8, 6, "spec.ports[0].number"),
            e("invalid-port", 9, 6, "spec.ports[1].number"),
            e("invalid-port", 10, 29, "spec.ports[2].targetPort"),
            e("invalid-address", 13, 5, "spec.endpoints[0].address"),
            e("invalid-address", 14, 5, "spec.endpoints[1].address"),
            e(
                "invalid-cidr",
                24,
                32,
                "spec.rules[0].from[0].source.ipBlocks[1]"
            ),
            e(
                "invalid-cidr",
                25,
                29,
                "spec.rules[0].from[0].source.notRemoteIpBlocks[0]"
            ),
            e(
                "invalid-port",
                28,
                25,
                "spec.rules[0].to[0].operation.ports[1]"
            ),
            e(
                "invalid-port",
                28,
                33,
                "spec.rules[0].to[0].operation.ports[2]"
            ),
        ]
    );
}

#[test]
fn workload_in_no_tenant() {
    let src = "\
apiVersion: hypha.dev/v1alpha1
kind: MeshConfig
metadata: {name: mesh}
spec:
  signers: [{name: a}]
  tenants:
  - {name: shop, namespaces: [shop], signer: a}
  - {name: pay, namespaces: [shop], signer: nope, trustTenants: [ghost]}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: w
  namespace: lost
  annotations: {hypha.dev/addresses: \"fd00::5, 10.0.0.5, bogus\"}
spec:
  address: 10.0.0.5
";
    assert_eq!(
        errors(src),
        vec![
            e(
                "namespace-in-two-tenants",
                8,
                30,
                "spec.tenants[1].namespaces[0]"
            ),
            e("unknown-signer", 8, 37, "spec.tenants[1].signer"),
            e("unknown-tenant", 8, 66, "spec.tenants[1].trustTenants[0]"),
            e("no-tenant", 14, 3, "metadata.namespace"),
            e(
                "duplicate-address",
                15,
                17,
                "metadata.annotations.hypha.dev/addresses"
            ),
            e(
                "invalid-address",
                15,
                17,
                "metadata.annotations.hypha.dev/addresses"
            ),
        ]
    );
}

#[test]
fn unknown_fields_and_wrong_types_are_errors() {
    let src = "\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: d}
spec:
  host: x.example.com
  trafficPolicy:
    loadBalancer:
      simpel: ROUND_ROBIN
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: w}
spec:
  address: 10.0.0.1
  weight: heavy
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: v}
spec:
  hosts: [x]
  http:
  - timeout: soon
    route: [{destination: {host: x}}]
";
    let got = errors(src);
    assert_eq!(
        got,
        vec![
            e(
                "unknown-field",
                8,
                7,
                "spec.trafficPolicy.loadBalancer.simpel"
            ),
            e("invalid-value", 15, 3, "spec.weight"),
            e("invalid-value", 23, 5, "spec.http[0].timeout"),
        ]
    );
}

#[test]
fn other_kinds_are_skipped_with_a_note_and_bad_versions_rejected() {
    let src = "\
apiVersion: v1
kind: Service
metadata: {name: s}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: g}
---
apiVersion: security.istio.io/v1alpha3
kind: PeerAuthentication
metadata: {name: p}
spec: {}
";
    let loaded = load_str("test.yaml", src);
    let all: Vec<_> = loaded.diagnostics.into_sorted();
    let summary: Vec<_> = all.iter().map(|d| (d.severity, d.code, d.line)).collect();
    assert_eq!(
        summary,
        vec![
            (Severity::Info, "skipped-kind", 2),
            // An Istio kind Hypha does not implement: its effect is missing, said loudly.
            (Severity::Warning, "unimplemented-kind", 6),
            (Severity::Error, "api-version", 9),
        ]
    );
}

/// `hypha check` helps with common slips: a kind misspelt in an Istio group (an error naming
/// the kind meant), an Istio kind under another group, an unknown Istio kind, a duration
/// written as a number.
#[test]
fn common_mistakes_get_a_hint() {
    let src = "\
apiVersion: networking.istio.io/v1
kind: VirtualServce
metadata: {name: a}
---
apiVersion: networking.istio.io/v1
kind: virtualservice
metadata: {name: b}
---
apiVersion: v1
kind: DestinationRule
metadata: {name: c}
---
apiVersion: networking.istio.io/v1
kind: Frobnicator
metadata: {name: d}
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: e}
---
apiVersion: install.istio.io/v1alpha1
kind: IstioOperator
metadata: {name: f}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: g, namespace: shop}
spec:
  hosts: [web]
  http:
  - route: [{destination: {host: web}}]
    timeout: 3
";
    let loaded = load_str("test.yaml", src);
    let all: Vec<_> = loaded.diagnostics.into_sorted();
    let got: Vec<(Severity, &str, usize, &str)> = all
        .iter()
        .map(|d| (d.severity, d.code, d.line, d.message.as_str()))
        .collect();
    let find = |line: usize| {
        got.iter()
            .find(|g| g.2 == line)
            .unwrap_or_else(|| panic!("nothing at line {line}: {got:#?}"))
    };
    let (sev, code, _, msg) = find(2);
    assert_eq!((*sev, *code), (Severity::Error, "unknown-kind"));
    assert!(msg.ends_with("did you mean VirtualService?"), "{msg}");
    let (sev, _, _, msg) = find(6);
    assert_eq!(*sev, Severity::Error);
    assert!(msg.ends_with("did you mean VirtualService?"), "{msg}");
    let (sev, code, _, msg) = find(10);
    assert_eq!((*sev, *code), (Severity::Info, "skipped-kind"));
    assert!(
        msg.contains("DestinationRule is read from networking.istio.io"),
        "{msg}"
    );
    let (sev, code, _, msg) = find(14);
    assert_eq!((*sev, *code), (Severity::Warning, "unimplemented-kind"));
    assert!(msg.contains("not an Istio kind Hypha knows"), "{msg}");
    let (sev, code, _, _) = find(18);
    assert_eq!((*sev, *code), (Severity::Warning, "unimplemented-kind"));
    let (sev, _, _, _) = find(22);
    assert_eq!(
        *sev,
        Severity::Info,
        "an installer's config is no mesh config"
    );
    let (sev, _, _, msg) = find(32);
    assert_eq!(*sev, Severity::Error);
    assert!(msg.contains("\"3s\" for 3 seconds"), "{msg}");
}

#[test]
fn routes_and_policies_checked_field_by_field() {
    let src = format!(
        "{SERVICES}apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web, namespace: shop}}
spec:
  hosts: [web]
  http:
  - match:
    - uri: {{exact: /a, prefix: /b}}
      headers:
        X-Upper: {{exact: v}}
      queryParams:
        q: {{prefix: x}}
    route: [{{destination: {{host: web}}}}]
    redirect: {{uri: /x}}
    retries: {{attempts: 2, retryOn: \"5xx,sometimes\"}}
    fault:
      abort: {{httpStatus: 700, percentage: {{value: 150}}}}
  - directResponse: {{status: 42}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: pa, namespace: shop}}
spec:
  portLevelMtls:
    \"8080\": {{mode: DISABLE}}
"
    );
    let codes: Vec<_> = errors(&src)
        .into_iter()
        .map(|(c, l, _, p)| (c, l, p))
        .collect();
    assert_eq!(
        codes,
        vec![
            ("route-action", 27, "spec.http[0]".to_string()),
            ("invalid-match", 28, "spec.http[0].match[0].uri".to_string()),
            (
                "invalid-header",
                30,
                "spec.http[0].match[0].headers.X-Upper".to_string()
            ),
            (
                "invalid-match",
                32,
                "spec.http[0].match[0].queryParams.q".to_string()
            ),
            (
                "invalid-retry-on",
                35,
                "spec.http[0].retries.retryOn".to_string()
            ),
            (
                "invalid-status",
                37,
                "spec.http[0].fault.abort.httpStatus".to_string()
            ),
            (
                "invalid-percent",
                37,
                "spec.http[0].fault.abort.percentage.value".to_string()
            ),
            (
                "invalid-status",
                38,
                "spec.http[1].directResponse.status".to_string()
            ),
            ("missing-selector", 44, "spec.portLevelMtls".to_string()),
        ]
    );
}

#[test]
fn yaml_syntax_errors_have_a_position() {
    let got = errors("apiVersion: v1\nkind: [unclosed\n");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, "yaml-syntax");
    assert!(got[0].1 >= 2, "{got:?}");
}

#[test]
fn token_signers_need_an_attestation_policy_and_sane_values() {
    let src = "\
apiVersion: hypha.dev/v1alpha1
kind: MeshConfig
metadata: {name: mesh}
spec:
  signers:
  - name: bare
    key:
      pkcs11: {module: /usr/lib/softhsm/libsofthsm2.so, tokenLabel: ca, pinEnv: PIN, keyLabel: k}
  - name: both
    key:
      pkcs11:
        module: ''
        tokenLabel: ca
        pinEnv: PIN
        pinFile: /pin
        keyLabel: k
        attestation:
          allow: {labels: [ca]}
          command: {path: /bin/true}
  - name: empty
    key:
      pkcs11:
        module: /m.so
        tokenLabel: ca
        pinFile: /pin
        keyLabel: k
        attestation: {allow: {manufacturers: []}}
  - name: cmd
    key:
      pkcs11:
        module: /m.so
        tokenLabel: ca
        pinFile: /pin
        keyLabel: ''
        attestation:
          command: {path: verify-quote, timeout: 0s}
  - name: good
    key:
      pkcs11:
        module: /m.so
        tokenLabel: ca
        pinFile: /pin
        keyLabel: k
        attestation:
          allow: {labels: [ca, ''], serialNumbers: ['1234']}
  tenants:
  - {name: t, namespaces: ['*'], signer: good}
";
    assert_eq!(
        errors(src),
        vec![
            e("no-attestation", 8, 7, "spec.signers[0].key.pkcs11"),
            e("signer-key", 11, 7, "spec.signers[1].key.pkcs11"),
            e("signer-key", 12, 9, "spec.signers[1].key.pkcs11.module"),
            e(
                "attestation",
                17,
                9,
                "spec.signers[1].key.pkcs11.attestation"
            ),
            e(
                "attestation",
                27,
                23,
                "spec.signers[2].key.pkcs11.attestation.allow"
            ),
            e("signer-key", 34, 9, "spec.signers[3].key.pkcs11.keyLabel"),
            e(
                "attestation",
                36,
                21,
                "spec.signers[3].key.pkcs11.attestation.command.path"
            ),
            e(
                "invalid-value",
                36,
                41,
                "spec.signers[3].key.pkcs11.attestation.command.timeout"
            ),
            e(
                "attestation",
                45,
                32,
                "spec.signers[4].key.pkcs11.attestation.allow.labels[1]"
            ),
        ]
    );
    // Unknown fields under the new keys are refused at their position, like everywhere else.
    let typo = src.replace("command: {path: /bin/true}", "comand: {path: /bin/true}");
    assert!(errors(&typo).contains(&e(
        "unknown-field",
        19,
        11,
        "spec.signers[1].key.pkcs11.attestation.comand"
    )));
}

#[test]
fn tls_routes_need_server_names_the_virtual_service_owns() {
    let src = "\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext, namespace: shop}
spec:
  hosts: [a.example.com, b.example.com]
  ports:
  - {number: 443, name: tls, protocol: TLS}
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ext, namespace: shop}
spec:
  hosts: [\"*.example.com\"]
  tls:
  - match:
    - sniHosts: [a.example.com, \"*.b.example.com\"]
      port: 443
    route:
    - destination: {host: a.example.com}
  - match:
    - sniHosts: [a.example.org, \"*\", \"bad..name\"]
    - sniHosts: []
      port: 0
    route:
    - destination: {host: b.example.com}
  - route:
    - destination: {host: c.example.com}
";
    assert_eq!(
        errors(src),
        vec![
            e("sni-host", 22, 18, "spec.tls[1].match[0].sniHosts[0]"),
            e("invalid-host", 22, 33, "spec.tls[1].match[0].sniHosts[1]"),
            e("invalid-host", 22, 38, "spec.tls[1].match[0].sniHosts[2]"),
            e("missing-field", 23, 7, "spec.tls[1].match[1].sniHosts"),
            e("invalid-port", 24, 7, "spec.tls[1].match[1].port"),
            e("missing-field", 27, 10, "spec.tls[2].match"),
            e(
                "unknown-host",
                28,
                21,
                "spec.tls[2].route[0].destination.host"
            ),
        ]
    );
    // Selecting on the client's labels is not done yet: said, not silently dropped.
    let warned = load_str(
        "test.yaml",
        &src.replace(
            "      port: 443\n",
            "      port: 443\n      sourceLabels: {app: x}\n",
        ),
    );
    assert!(warned
        .diagnostics
        .iter()
        .any(|d| d.severity == Severity::Warning && d.path == "spec.tls[0].match[0].sourceLabels"));
}

#[test]
fn what_hypha_does_not_enforce_is_an_error_not_a_warning() {
    // Each of these, accepted, would let through what the user meant to stop (security
    // issue: fail closed), so each is an error with its line and what to do instead.
    let src = format!(
        "{SERVICES}apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: ext, namespace: shop}}
spec:
  action: CUSTOM
  provider: {{name: opa}}
  rules: [{{to: [{{operation: {{paths: [/admin]}}}}]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: waypoint, namespace: shop}}
spec:
  targetRefs: [{{kind: Service, group: '', name: web}}]
  action: DENY
  rules: [{{}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: jwt, namespace: shop}}
spec:
  rules:
  - from: [{{source: {{requestPrincipals: [\"*\"]}}}}]
    when: [{{key: \"request.auth.claims[groups]\", values: [admin]}}]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: shop}}
spec: {{jwtRules: [{{issuer: issuer}}]}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: out, namespace: shop}}
spec:
  host: web
  trafficPolicy:
    tls: {{mode: SIMPLE, credentialName: cred, caCrl: /etc/ssl/crl.pem}}
    portLevelSettings:
    - port: {{number: 80}}
      tls: {{mode: ISTIO_MUTUAL, sni: web}}
"
    );
    let loaded = load_str("test.yaml", &src);
    let found: Vec<_> = loaded
        .diagnostics
        .into_sorted()
        .into_iter()
        .filter(|d| d.severity == Severity::Error)
        .map(|d| (d.code, d.line, d.path, d.message))
        .collect();
    let summary: Vec<_> = found
        .iter()
        .map(|(c, l, p, _)| (*c, *l, p.as_str()))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("unenforced", 25, "spec.action"),
            ("unenforced", 33, "spec.targetRefs"),
            (
                "unenforced",
                42,
                "spec.rules[0].from[0].source.requestPrincipals"
            ),
            ("unenforced", 43, "spec.rules[0].when[0].key"),
            ("unenforced", 46, "kind"),
            ("unenforced", 56, "spec.trafficPolicy.tls.credentialName"),
            ("unenforced", 56, "spec.trafficPolicy.tls.caCrl"),
            (
                "invalid-value",
                59,
                "spec.trafficPolicy.portLevelSettings[0].tls.sni"
            ),
        ],
        "{found:#?}"
    );
    // Each says what to do instead.
    for (_, line, _, message) in &found {
        assert!(
            ["instead", "keep it out", "own mesh certificate"]
                .iter()
                .any(|w| message.contains(w)),
            "line {line}: {message}"
        );
    }
}

#[test]
fn tls_origination_needs_what_the_sidecar_reads() {
    let src = format!(
        "{SERVICES}apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: out, namespace: shop}}
spec:
  host: web
  trafficPolicy:
    tls: {{mode: MUTUAL, caCertificates: certs/ca.pem}}
    portLevelSettings:
    - port: {{number: 80}}
      tls: {{mode: SIMPLE, insecureSkipVerify: true, subjectAltNames: [web.example]}}
    - port: {{number: 81}}
      tls: {{mode: SIMPLE, clientCertificate: /c.pem, privateKey: /k.pem}}
"
    );
    let loaded = load_str("test.yaml", &src);
    let found: Vec<_> = loaded
        .diagnostics
        .into_sorted()
        .into_iter()
        .map(|d| (d.severity, d.code, d.path))
        .collect();
    let e = |code, path: &str| (Severity::Error, code, path.to_owned());
    assert_eq!(
        found,
        vec![
            e("missing-field", "spec.trafficPolicy.tls.clientCertificate"),
            e("missing-field", "spec.trafficPolicy.tls.privateKey"),
            e("invalid-value", "spec.trafficPolicy.tls.caCertificates"),
            e(
                "exclusive-fields",
                "spec.trafficPolicy.portLevelSettings[0].tls.subjectAltNames"
            ),
            (
                Severity::Warning,
                "ignored-field",
                "spec.trafficPolicy.portLevelSettings[1].tls".to_owned()
            ),
        ],
    );
    // Complete, it is accepted.
    let good = src
        .replace(
            "caCertificates: certs/ca.pem",
            "clientCertificate: /c.pem, privateKey: /k.pem",
        )
        .replace("insecureSkipVerify: true, ", "");
    let loaded = load_str("test.yaml", &good);
    assert!(!loaded.has_errors(), "{:?}", loaded.diagnostics);
}

#[test]
fn the_meshs_default_proxy_config_is_checked_as_a_proxy_configs() {
    let src = "\
apiVersion: hypha.dev/v1alpha1
kind: MeshConfig
metadata: {name: mesh}
spec:
  defaultConfig:
    concurrency: 2
    terminationDrainDuration: 10s
    privateKeyProvider:
      pkcs11: {module: /usr/lib/softhsm/libsofthsm2.so, tokenLabel: mesh}
";
    assert_eq!(
        errors(src),
        vec![(
            "private-key-provider",
            9,
            7,
            "spec.defaultConfig.privateKeyProvider.pkcs11".to_string()
        )]
    );
    let good = src.replace("tokenLabel: mesh}", "tokenLabel: mesh, pinEnv: PIN}");
    let loaded = load_str("test.yaml", &good);
    assert!(
        !loaded.has_errors(),
        "{:?}",
        loaded.diagnostics.into_sorted()
    );
    let d = &loaded.config.mesh.default_config;
    assert_eq!(d.concurrency, Some(2));
    assert_eq!(d.drain_duration(), std::time::Duration::from_secs(10));
    // Unknown ProxyConfig fields are refused there too.
    let unknown = src.replace("concurrency: 2", "tracing: {}");
    assert!(
        errors(&unknown)
            .iter()
            .any(|(code, _, _, path)| *code == "unknown-field"
                && path == "spec.defaultConfig.tracing")
    );
}

/// Validation refuses what the sidecar would refuse (NACK), with the reason, rather than let
/// one proxy's config freeze: a generated hash cookie (`ttl`) and local-origin outlier
/// counting, until they are implemented.
#[test]
fn what_the_sidecar_would_refuse_is_refused_here() {
    let src = format!(
        "{SERVICES}apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: web-lb, namespace: shop}}
spec:
  host: web
  trafficPolicy:
    loadBalancer:
      consistentHash:
        httpCookie: {{name: session, ttl: 60s}}
    outlierDetection:
      splitExternalLocalOriginErrors: true
      consecutiveLocalOriginFailures: 3
"
    );
    let got: Vec<String> = errors(&src).into_iter().map(|e| e.3).collect();
    assert_eq!(
        got,
        [
            "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.ttl",
            "spec.trafficPolicy.outlierDetection.splitExternalLocalOriginErrors",
            "spec.trafficPolicy.outlierDetection.consecutiveLocalOriginFailures",
        ]
    );
    // Without them, the same rule is fine.
    let fine = src
        .replace(", ttl: 60s", "")
        .replace("      splitExternalLocalOriginErrors: true\n", "")
        .replace(
            "      consecutiveLocalOriginFailures: 3\n",
            "      consecutive5xxErrors: 3\n",
        );
    assert!(errors(&fine).is_empty(), "{:?}", errors(&fine));
}

/// Istio fields Hypha does not act on yet are never accepted in silence: each set one is a
/// warning naming it (the config still applies, without it).
#[test]
fn fields_hypha_ignores_are_named() {
    let src = format!(
        "{SERVICES}apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: web-pool, namespace: shop}}
spec:
  host: web
  trafficPolicy:
    loadBalancer: {{simple: ROUND_ROBIN, warmupDurationSecs: 30s}}
    connectionPool:
      tcp: {{tcpKeepalive: {{time: 10s}}, maxConnectionDuration: 1h, idleTimeout: 5m}}
      http: {{useClientProtocol: true}}
    outlierDetection: {{minHealthPercent: 50}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web-routes, namespace: shop}}
spec:
  hosts: [web]
  http:
  - match: [{{uri: {{prefix: /a}}, statPrefix: a}}]
    route: [{{destination: {{host: web}}}}]
    retries: {{attempts: 2, retryRemoteLocalities: true}}
  - redirect: {{uri: /b, derivePort: FROM_REQUEST_PORT}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: far, namespace: shop}}
spec: {{address: 10.9.0.1, network: network-2}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: ext, namespace: shop}}
spec:
  hosts: [ext.example.com]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{{number: 443, name: tls, protocol: TLS}}]
  subjectAltNames: [ext.example.com]
"
    );
    let loaded = load_str("test.yaml", &src);
    let errors: Vec<String> = loaded
        .diagnostics
        .errors()
        .map(ToString::to_string)
        .collect();
    assert!(errors.is_empty(), "{errors:#?}");
    let warned: Vec<String> = loaded
        .diagnostics
        .into_sorted()
        .into_iter()
        .filter(|d| d.severity == Severity::Warning && d.code == "unsupported")
        .map(|d| d.path)
        .collect();
    for want in [
        "spec.trafficPolicy.loadBalancer.warmupDurationSecs",
        "spec.trafficPolicy.connectionPool.tcp.tcpKeepalive",
        "spec.trafficPolicy.connectionPool.tcp.maxConnectionDuration",
        "spec.trafficPolicy.connectionPool.tcp.idleTimeout",
        "spec.trafficPolicy.connectionPool.http.useClientProtocol",
        "spec.trafficPolicy.outlierDetection.minHealthPercent",
        "spec.http[0].match[0].statPrefix",
        "spec.http[0].retries.retryRemoteLocalities",
        "spec.http[1].redirect.derivePort",
        "spec.network",
        "spec.subjectAltNames",
    ] {
        assert!(
            warned.iter().any(|w| w == want),
            "{want} not warned: {warned:#?}"
        );
    }
}
