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
