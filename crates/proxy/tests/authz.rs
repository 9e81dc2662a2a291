//! The authorization matrix: Istio AuthorizationPolicies, translated by the control plane into
//! the RBAC filters of a workload's inbound chains, compiled by the proxy, and checked against
//! requests: every `from`, `to` and `when` field, their `not` forms, Istio's wildcards, each
//! action and Istio's evaluation order, selectors and the root namespace, and TCP chains.

use std::net::SocketAddr;
use std::sync::Arc;

use hypha_control::{ProxyInfo, Translation};
use hypha_matcher::SimpleRequest;
use hypha_proxy::authz::{Authz, Ctx, Decision, Permission, Principal};
use hypha_proxy::model::Inbound;
use hypha_xds::type_url;

mod common;
use common::config;

const MESH: &str = "apiVersion: hypha.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: m}\nspec: {trustDomain: cluster.local}\n";

/// `web.shop`: HTTP on 8080 and TCP on 9000, served by `web-1` (labels `app: web`).
const SERVICE: &str = r#"
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web, namespace: shop}
spec:
  hosts: [web.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 8080, name: http, protocol: HTTP}, {number: 9000, name: tcp, protocol: TCP}]
  workloadSelector: {labels: {app: web}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: web-1, namespace: shop}
spec: {address: 10.0.0.5, serviceAccount: web, labels: {app: web}}
"#;

/// The RBAC of web-1's inbound chain for `port` under `policies` (YAML documents).
fn authz(policies: &str, port: u16) -> Arc<Authz> {
    let cfg = config(&format!("{MESH}{SERVICE}{policies}"));
    let t = Translation::new(Arc::new(cfg), "1");
    let snap = t.snapshot(&ProxyInfo {
        id: "sidecar~10.0.0.5~web-1.shop~shop.svc.cluster.local".into(),
        namespace: "shop".into(),
        service_account: "web".into(),
        workload_name: "web-1".into(),
        labels: [("app".to_owned(), "web".to_owned())].into(),
        ips: vec!["10.0.0.5".parse().unwrap()],
    });
    let vi = snap
        .resources(type_url::LISTENER)
        .unwrap()
        .get("virtualInbound")
        .unwrap()
        .clone();
    let parts = hypha_proxy::compile::listener("virtualInbound", &vi.body.value)
        .unwrap_or_else(|e| panic!("{e}"));
    parts
        .inbound
        .into_iter()
        .find(|(p, tls, _)| *p == Some(port) && !tls)
        .map(|(_, _, chain)| match chain {
            Inbound::Http { authz, .. } | Inbound::Tcp { authz, .. } => authz,
        })
        .unwrap_or_else(|| panic!("no chain for {port}"))
}

/// A request to web-1 and who sends it.
#[derive(Clone)]
struct Req {
    method: &'static str,
    path: &'static str,
    host: &'static str,
    headers: Vec<(&'static str, &'static str)>,
    port: u16,
    from: &'static str,
    principal: Option<&'static str>,
}

impl Default for Req {
    fn default() -> Req {
        Req {
            method: "GET",
            path: "/",
            host: "web.shop.svc.cluster.local",
            headers: vec![],
            port: 8080,
            from: "10.1.2.3",
            principal: Some("spiffe://cluster.local/ns/shop/sa/client"),
        }
    }
}

fn decide(a: &Authz, r: &Req, http: bool) -> Decision {
    let headers: Vec<(&str, &[u8])> = r.headers.iter().map(|(k, v)| (*k, v.as_bytes())).collect();
    let req = SimpleRequest {
        target: r.path.as_bytes(),
        authority: r.host.as_bytes(),
        method: r.method.as_bytes(),
        scheme: b"http",
        headers: &headers,
    };
    a.check(&Ctx {
        http: http.then_some(&req),
        source: SocketAddr::new(r.from.parse().unwrap(), 40000),
        destination: SocketAddr::new("10.0.0.5".parse().unwrap(), r.port),
        principal: r.principal,
        sni: None,
    })
}

fn allowed(policies: &str, r: &Req) -> bool {
    decide(&authz(policies, r.port), r, true).allowed
}

/// Whether validation refuses `policies` (an error: the control plane would keep its last
/// good config, and no proxy would see them).
fn refused(policies: &str) -> bool {
    hypha_config::load_str("mesh.yaml", &format!("{MESH}{SERVICE}{policies}")).has_errors()
}

fn policy(action: &str, rules: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p-{}, namespace: shop}}\nspec:\n  selector: {{matchLabels: {{app: web}}}}\n  action: {action}\n{rules}",
        action.to_ascii_lowercase()
    )
}

fn allow(rules: &str) -> String {
    policy("ALLOW", rules)
}

fn from(source: &str) -> String {
    format!("  rules:\n  - from:\n    - source: {{{source}}}\n")
}

fn to(op: &str) -> String {
    format!("  rules:\n  - to:\n    - operation: {{{op}}}\n")
}

fn when(key: &str, field: &str, values: &str) -> String {
    format!("  rules:\n  - when:\n    - key: {key}\n      {field}: {values}\n")
}

#[test]
fn no_policy_allows_everything() {
    assert!(authz("", 8080).is_empty());
    assert!(allowed("", &Req::default()));
}

#[test]
fn from_fields() {
    let me = Req::default();
    let other = Req {
        principal: Some("spiffe://cluster.local/ns/other/sa/x"),
        ..Req::default()
    };
    let plaintext = Req {
        principal: None,
        ..Req::default()
    };
    let p = allow(&from("principals: [cluster.local/ns/shop/sa/client]"));
    assert!(allowed(&p, &me));
    assert!(!allowed(&p, &other));
    assert!(!allowed(&p, &plaintext));
    // Wildcards: prefix, suffix, and `*` (any authenticated peer).
    let p = allow(&from("principals: [cluster.local/ns/shop/*]"));
    assert!(allowed(&p, &me) && !allowed(&p, &other));
    let p = allow(&from("principals: [\"*/sa/x\"]"));
    assert!(!allowed(&p, &me) && allowed(&p, &other));
    let p = allow(&from("principals: [\"*\"]"));
    assert!(allowed(&p, &me) && allowed(&p, &other) && !allowed(&p, &plaintext));
    let p = allow(&from("notPrincipals: [cluster.local/ns/shop/sa/client]"));
    assert!(!allowed(&p, &me) && allowed(&p, &other) && allowed(&p, &plaintext));
    // Namespaces, from the SPIFFE ID.
    let p = allow(&from("namespaces: [shop]"));
    assert!(allowed(&p, &me) && !allowed(&p, &other) && !allowed(&p, &plaintext));
    let p = allow(&from("notNamespaces: [shop]"));
    assert!(!allowed(&p, &me) && allowed(&p, &other));
    // Addresses: the peer's, IPv4 and IPv6.
    let p = allow(&from("ipBlocks: [10.1.0.0/16, \"fd00::/8\"]"));
    assert!(allowed(&p, &me));
    assert!(!allowed(
        &p,
        &Req {
            from: "10.2.0.1",
            ..Req::default()
        }
    ));
    assert!(allowed(
        &p,
        &Req {
            from: "fd00::7",
            ..Req::default()
        }
    ));
    let p = allow(&from("notIpBlocks: [10.1.2.3]"));
    assert!(
        !allowed(&p, &me)
            && allowed(
                &p,
                &Req {
                    from: "10.1.2.4",
                    ..Req::default()
                }
            )
    );
    let p = allow(&from("remoteIpBlocks: [10.1.2.0/24]"));
    assert!(allowed(&p, &me));
    let p = allow(&from("notRemoteIpBlocks: [10.1.2.0/24]"));
    assert!(!allowed(&p, &me));
    // Request principals need JWT authentication, which Hypha does not have: validation
    // refuses the policy (it would otherwise be enforced as "never matches").
    assert!(refused(&allow(&from("requestPrincipals: [\"*\"]"))));
    // All fields of a source must match.
    let p = allow(&from(
        "principals: [cluster.local/ns/shop/sa/client], ipBlocks: [10.9.0.0/16]",
    ));
    assert!(!allowed(&p, &me));
}

#[test]
fn to_fields() {
    let get = Req::default();
    let post = Req {
        method: "POST",
        ..Req::default()
    };
    let p = allow(&to("methods: [GET, HEAD]"));
    assert!(allowed(&p, &get) && !allowed(&p, &post));
    let p = allow(&to("notMethods: [GET]"));
    assert!(!allowed(&p, &get) && allowed(&p, &post));
    // Paths: exact, prefix and suffix wildcards.
    let api = Req {
        path: "/api/v1/items?x=1",
        ..Req::default()
    };
    let png = Req {
        path: "/img/a.png",
        ..Req::default()
    };
    let p = allow(&to("paths: [/api/*]"));
    assert!(allowed(&p, &api) && !allowed(&p, &png));
    let p = allow(&to("paths: [\"*.png\"]"));
    assert!(!allowed(&p, &api) && allowed(&p, &png));
    let p = allow(&to("paths: [/api/v1/items]"));
    assert!(
        allowed(&p, &api),
        "the query string is not part of the path"
    );
    let p = allow(&to("notPaths: [/api/*]"));
    assert!(!allowed(&p, &api) && allowed(&p, &png));
    // Hosts, case-insensitively, with wildcards.
    let p = allow(&to("hosts: [\"*.shop.svc.cluster.local\"]"));
    assert!(allowed(&p, &get));
    let p = allow(&to("hosts: [WEB.shop.svc.cluster.local]"));
    assert!(allowed(&p, &get));
    let p = allow(&to("notHosts: [\"web.*\"]"));
    assert!(!allowed(&p, &get));
    // Ports: the workload port the request came to.
    let p = allow(&to("ports: [\"8080\"]"));
    assert!(allowed(&p, &get));
    let p = allow(&to("notPorts: [\"8080\"]"));
    assert!(!allowed(&p, &get));
    // Operations are alternatives; the fields of one must all match.
    let p = allow("  rules:\n  - to:\n    - operation: {methods: [POST]}\n    - operation: {paths: [/api/*]}\n");
    assert!(allowed(&p, &post) && allowed(&p, &api) && !allowed(&p, &png));
    let p = allow(&to("methods: [GET], paths: [/api/*]"));
    assert!(allowed(&p, &api) && !allowed(&p, &png));
}

#[test]
fn when_conditions() {
    let alice = Req {
        headers: vec![("x-user", "alice")],
        ..Req::default()
    };
    let bob = Req {
        headers: vec![("x-user", "bob")],
        ..Req::default()
    };
    let nobody = Req::default();
    let p = allow(&when(
        "request.headers[X-User]",
        "values",
        "[alice, \"carol*\"]",
    ));
    assert!(allowed(&p, &alice) && !allowed(&p, &bob) && !allowed(&p, &nobody));
    let p = allow(&when("request.headers[x-user]", "notValues", "[alice]"));
    assert!(!allowed(&p, &alice) && allowed(&p, &bob));
    let p = allow(&when("source.ip", "values", "[10.1.0.0/16]"));
    assert!(allowed(&p, &nobody));
    let p = allow(&when("source.namespace", "values", "[other]"));
    assert!(!allowed(&p, &nobody));
    let p = allow(&when(
        "source.principal",
        "values",
        "[cluster.local/ns/shop/sa/client]",
    ));
    assert!(allowed(&p, &nobody));
    let p = allow(&when("destination.port", "values", "[\"9999\"]"));
    assert!(!allowed(&p, &nobody));
    // No request carries JWT claims yet: refused by validation, as above.
    assert!(refused(&allow(&when(
        "request.auth.claims[iss]",
        "values",
        "[me]"
    ))));
    // from, to and when must all match.
    let p = allow(
        "  rules:\n  - from:\n    - source: {namespaces: [shop]}\n    to:\n    - operation: {methods: [GET]}\n    when:\n    - key: request.headers[x-user]\n      values: [alice]\n",
    );
    assert!(allowed(&p, &alice) && !allowed(&p, &bob));
}

#[test]
fn actions_and_their_order() {
    let r = Req::default();
    let admin = Req {
        path: "/admin",
        ..Req::default()
    };
    // ALLOW without rules allows nothing; with one empty rule, everything.
    assert!(!allowed(&allow(""), &r));
    assert!(allowed(&allow("  rules:\n  - {}\n"), &r));
    // DENY first: a matching DENY wins over a matching ALLOW.
    let both = format!(
        "{}{}",
        policy("DENY", &to("paths: [/admin]")),
        allow("  rules:\n  - {}\n")
    );
    assert!(allowed(&both, &r) && !allowed(&both, &admin));
    // DENY alone: what it does not match is allowed.
    let deny = policy("DENY", &to("paths: [/admin]"));
    assert!(allowed(&deny, &r) && !allowed(&deny, &admin));
    // A DENY without rules denies nothing.
    assert!(allowed(&policy("DENY", ""), &r));
    // AUDIT never denies, but says it matched.
    let audit = policy("AUDIT", &to("paths: [/admin]"));
    let d = decide(&authz(&audit, 8080), &admin, true);
    assert!(d.allowed && d.audited);
    let d = decide(&authz(&audit, 8080), &r, true);
    assert!(d.allowed && !d.audited);
}

#[test]
fn selectors_and_the_root_namespace() {
    let r = Req::default();
    // A policy for other workloads does not apply.
    let elsewhere = allow("").replace("{app: web}", "{app: db}");
    assert!(allowed(&elsewhere, &r));
    // A policy in another namespace does not apply...
    let other_ns = allow("").replace("namespace: shop", "namespace: other");
    assert!(allowed(&other_ns, &r));
    // ...unless it is the root namespace (mesh-wide).
    let mesh_wide =
        policy("DENY", "  rules:\n  - {}\n").replace("namespace: shop", "namespace: istio-system");
    assert!(!allowed(&mesh_wide, &r));
    // No selector: every workload of the namespace.
    let namespace_wide = allow("").replace("  selector: {matchLabels: {app: web}}\n", "");
    assert!(!allowed(&namespace_wide, &r));
}

#[test]
fn tcp_chains_check_what_a_connection_has() {
    let conn = Req {
        port: 9000,
        ..Req::default()
    };
    let tcp = |policies: &str| decide(&authz(policies, 9000), &conn, false).allowed;
    // Principals, namespaces, addresses and ports apply to connections.
    assert!(tcp(&allow(&from(
        "principals: [cluster.local/ns/shop/sa/client]"
    ))));
    assert!(!tcp(&allow(&from("namespaces: [other]"))));
    assert!(tcp(&allow(&to("ports: [\"9000\"]"))));
    // An ALLOW rule that needs HTTP never matches a connection...
    assert!(!tcp(&allow(&to("methods: [GET]"))));
    // ...and a DENY rule drops what it cannot check, denying more.
    assert!(!tcp(&policy("DENY", &to("paths: [/admin]"))));
}

/// The alternatives of each leaf of a permission or principal, in tree order.
fn leaves(perm: Option<&Permission>, princ: Option<&Principal>, out: &mut Vec<usize>) {
    match perm {
        Some(Permission::And(v) | Permission::Or(v)) => {
            v.iter().for_each(|p| leaves(Some(p), None, out));
        }
        Some(Permission::Not(p)) => leaves(Some(p), None, out),
        Some(Permission::Http(l) | Permission::ServerName(l)) => out.push(l.alternatives()),
        _ => {}
    }
    match princ {
        Some(Principal::And(v) | Principal::Or(v)) => {
            v.iter().for_each(|p| leaves(None, Some(p), out));
        }
        Some(Principal::Not(p)) => leaves(None, Some(p), out),
        Some(Principal::Http(l) | Principal::Authenticated(Some(l))) => {
            out.push(l.alternatives());
        }
        _ => {}
    }
}

/// Lists of alternatives (paths, hosts, principals) are one matcher table each, one pass over
/// the request, with the answers of the tests one by one.
#[test]
fn alternatives_are_one_table() {
    let paths = (0..100)
        .map(|i| format!("/api/v{i}/*"))
        .collect::<Vec<_>>()
        .join(", ");
    let rules = format!(
        "  rules:\n  - from:\n    - source: {{principals: [cluster.local/ns/shop/sa/a, cluster.local/ns/shop/sa/client, \"*/sa/admin\"]}}\n    to:\n    - operation: {{paths: [{paths}, \"*.png\"], hosts: [web.shop.svc.cluster.local, \"*.example.com\"]}}\n"
    );
    let p = allow(&rules);
    let a = authz(&p, 8080);
    let mut found = Vec::new();
    for f in &a.filters {
        for (_, perm, princ) in &f.policies {
            leaves(Some(perm), Some(princ), &mut found);
        }
    }
    found.sort_unstable();
    assert_eq!(
        found,
        [2, 3, 101],
        "paths, hosts and principals, one leaf each"
    );

    let req = |path: &'static str, host: &'static str, principal| Req {
        path,
        host,
        principal: Some(principal),
        ..Req::default()
    };
    let client = "spiffe://cluster.local/ns/shop/sa/client";
    assert!(allowed(
        &p,
        &req("/api/v42/x", "web.shop.svc.cluster.local", client)
    ));
    assert!(allowed(&p, &req("/img/a.png", "shop.example.com", client)));
    assert!(allowed(
        &p,
        &req(
            "/api/v99/",
            "web.shop.svc.cluster.local",
            "spiffe://other/sa/admin"
        )
    ));
    assert!(!allowed(
        &p,
        &req("/api/v100/x", "web.shop.svc.cluster.local", client)
    ));
    assert!(!allowed(&p, &req("/api/v1/x", "other.shop", client)));
    assert!(!allowed(
        &p,
        &req(
            "/api/v1/x",
            "web.shop.svc.cluster.local",
            "spiffe://cluster.local/ns/shop/sa/b"
        )
    ));
}
