//! A config change wakes only the proxies whose view changed, and what did not change keeps
//! its identity, so the xDS streams skip it without comparing.

use envoy_types::pb::envoy::config::core::v3::Node;
use hypha_control::{initial_config, ControlPlane};
use hypha_xds::{type_url, SnapshotSource};

fn node(ns: &str, workload: &str) -> Node {
    let mut n = Node {
        id: format!("sidecar~10.9.0.1~{workload}.{ns}~{ns}.svc.cluster.local"),
        ..Default::default()
    };
    let meta = [("NAMESPACE", ns), ("WORKLOAD_NAME", workload)];
    n.metadata = Some(prost_types_struct(&meta));
    n
}

fn prost_types_struct(fields: &[(&str, &str)]) -> envoy_types::pb::google::protobuf::Struct {
    use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
    Struct {
        fields: fields
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    Value {
                        kind: Some(Kind::StringValue(v.to_string())),
                    },
                )
            })
            .collect(),
    }
}

#[test]
fn unchanged_views_are_not_pushed_and_unchanged_types_keep_identity() {
    let cfg = initial_config(None).unwrap();
    let cp = ControlPlane::new(cfg.clone());
    let plaintext = tonic::Extensions::default();
    let mut rx = cp
        .watch(&node("bookinfo", "productpage-v1"), &plaintext)
        .unwrap();
    let before = rx.borrow_and_update().clone();

    let same = cp.update(cfg.clone());
    assert_eq!((same.proxies, same.changed), (1, 0));
    assert!(!rx.has_changed().unwrap());

    // A longer timeout on the reviews route: only RouteConfigurations change.
    let mut changed_cfg = cfg;
    let vs = changed_cfg
        .virtual_services
        .iter_mut()
        .find(|vs| vs.name == "reviews")
        .expect("bookinfo has a reviews VirtualService");
    vs.spec.http[0].timeout = Some(hypha_config::types::Duration::parse("7s").unwrap());
    let changed = cp.update(changed_cfg);
    assert_eq!((changed.proxies, changed.changed), (1, 1));
    assert!(rx.has_changed().unwrap());
    let after = rx.borrow_and_update().clone();
    for t in [type_url::CLUSTER, type_url::ENDPOINT, type_url::LISTENER] {
        let (a, b) = (after.resources(t).unwrap(), before.resources(t).unwrap());
        assert!(a.same_as(b), "{t} should keep its identity");
    }
    let (a, b) = (
        after.resources(type_url::ROUTE).unwrap(),
        before.resources(type_url::ROUTE).unwrap(),
    );
    assert!(!a.same_as(b));
    let differs: Vec<&str> = a
        .iter()
        .filter(|r| b.get(&r.name).is_none_or(|old| old.version != r.version))
        .map(|r| r.name.as_str())
        .collect();
    assert!(!differs.is_empty());
    assert!(
        differs
            .iter()
            .all(|n| n.starts_with("reviews.") || n.parse::<u32>().is_ok()),
        "only the reviews routes changed, got {differs:?}"
    );
}

/// What one proxy sees, as names and content versions by type.
fn view(
    t: &hypha_control::Translation,
    proxy: &hypha_control::ProxyInfo,
) -> Vec<(String, String, String)> {
    let snap = t.snapshot(proxy);
    let mut all = Vec::new();
    for type_url in snap.type_urls() {
        for r in snap.resources(type_url).unwrap().iter() {
            all.push((type_url.to_owned(), r.name.clone(), r.version.clone()));
        }
    }
    all
}

type Edit = Box<dyn Fn(&mut hypha_config::Config)>;

/// The spec of the resource called `name`.
fn spec<'a, T>(list: &'a mut [hypha_config::Resource<T>], name: &str) -> &'a mut T {
    &mut list.iter_mut().find(|r| r.name == name).unwrap().spec
}

/// Sets the timeout of the reviews VirtualService's first route.
fn reviews_timeout(timeout: &'static str) -> Edit {
    Box::new(move |c| {
        let vs = spec(&mut c.virtual_services, "reviews");
        vs.http[0].timeout = Some(hypha_config::types::Duration::parse(timeout).unwrap());
    })
}

#[test]
fn a_generation_made_from_the_one_before_equals_one_made_from_scratch() {
    use hypha_config::security::MtlsMode;
    use hypha_control::{mtls::SignerRoots, ProxyInfo, Translation};
    use std::sync::Arc;

    let proxies: Vec<ProxyInfo> = [
        ("productpage-v1", "10.10.0.10"),
        ("reviews-v2", "10.10.0.32"),
    ]
    .iter()
    .map(|(w, ip)| {
        ProxyInfo::from_node(&Node {
            id: format!("sidecar~{ip}~{w}.bookinfo~bookinfo.svc.cluster.local"),
            ..node("bookinfo", w)
        })
    })
    .collect();
    let roots = Arc::new(SignerRoots::new());
    let mut cfg = initial_config(None).unwrap();
    let mut t = Arc::new(Translation::with_mtls(
        Arc::new(cfg.clone()),
        "1",
        roots.clone(),
    ));
    t.prepare(&proxies);
    // Each edit goes through a generation made from the one before (which takes over what
    // still holds) and one made from scratch: every proxy's view must be the same.
    let edits: Vec<(&str, Edit)> = vec![
        ("a VirtualService's timeout", reviews_timeout("7s")),
        (
            "an endpoint's address",
            Box::new(|c| {
                let we = spec(&mut c.workload_entries, "reviews-v1");
                we.address = "10.10.0.99".into();
            }),
        ),
        (
            "an endpoint's labels (another subset)",
            Box::new(|c| {
                let we = spec(&mut c.workload_entries, "reviews-v1");
                we.labels.insert("version".into(), "v3".into());
            }),
        ),
        (
            "a DestinationRule's load balancer",
            Box::new(|c| {
                let dr = spec(&mut c.destination_rules, "ratings");
                dr.traffic_policy.as_mut().unwrap().load_balancer = None;
            }),
        ),
        (
            "the mesh-wide PeerAuthentication",
            Box::new(|c| {
                let pa = spec(&mut c.peer_authentications, "default");
                pa.mtls.as_mut().unwrap().mode = MtlsMode::Disable;
            }),
        ),
        (
            "details routed to ratings",
            Box::new(|c| {
                let vs = spec(&mut c.virtual_services, "details");
                let last = vs.http.last_mut().unwrap();
                last.route[0].destination.host = "ratings".into();
            }),
        ),
        // The details routes, unchanged, now lead to another port of ratings.
        (
            "another service's port",
            Box::new(|c| {
                let se = spec(&mut c.service_entries, "ratings");
                se.ports[0].number = 9090;
            }),
        ),
        (
            "a port's protocol",
            Box::new(|c| {
                let se = spec(&mut c.service_entries, "details");
                se.ports[0].protocol = Some("TCP".into());
            }),
        ),
        ("a VirtualService after all that", reviews_timeout("9s")),
    ];
    for (n, (what, edit)) in edits.iter().enumerate() {
        edit(&mut cfg);
        let version = (n + 2).to_string();
        let next = Arc::new(Translation::after(
            Arc::new(cfg.clone()),
            version.clone(),
            Some(&t),
        ));
        next.prepare(&proxies);
        let fresh = Translation::with_mtls(Arc::new(cfg.clone()), version, roots.clone());
        for p in &proxies {
            let (got, want) = (view(&next, p), view(&fresh, p));
            assert_eq!(got.len(), want.len(), "{what}: {} sees another set", p.id);
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(g, w, "{what}: {} sees a stale resource", p.id);
            }
            assert_ne!(
                view(&t, p),
                got,
                "{what}: the edit changed nothing {} sees",
                p.id
            );
        }
        next.forget_previous();
        t = next;
    }
}
