//! The proxy compiles everything Hypha's control plane sends a bookinfo sidecar, and refuses
//! what it does not support with the resource and field named, leaving its state unchanged.

use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::TransportSocket;
use envoy_types::pb::envoy::config::route::v3::{route_match, RouteConfiguration};
use hypha_control::{ProxyInfo, Translation};
use hypha_matcher::SimpleRequest;
use hypha_proxy::model::{Action, ClusterKind, Inbound, ListenAddr, Outbound};
use hypha_proxy::state::State;
use hypha_xds::{type_url, Resource, Snapshot};
use prost::Message;

fn bookinfo_snapshot() -> Snapshot {
    let cfg = hypha_control::initial_config(None).unwrap();
    let t = Translation::new(Arc::new(cfg), "1");
    t.snapshot(&ProxyInfo {
        id: "sidecar~10.10.0.10~productpage-v1.bookinfo~bookinfo.svc.cluster.local".into(),
        namespace: "bookinfo".into(),
        service_account: "bookinfo-productpage".into(),
        workload_name: "productpage-v1".into(),
        labels: [("app".to_string(), "productpage".to_string())].into(),
        ips: vec!["10.10.0.10".parse().unwrap()],
    })
}

fn all(snap: &Snapshot, t: &str) -> Vec<Resource> {
    snap.resources(t)
        .map(|r| r.iter().map(|r| (**r).clone()).collect())
        .unwrap_or_default()
}

fn loaded() -> State {
    let snap = bookinfo_snapshot();
    let mut state = State::default();
    for t in [
        type_url::CLUSTER,
        type_url::ENDPOINT,
        type_url::LISTENER,
        type_url::ROUTE,
    ] {
        state
            .apply(t, &all(&snap, t), &[])
            .unwrap_or_else(|e| panic!("{t}: {e:?}"));
    }
    state
}

#[test]
fn compiles_the_bookinfo_sidecar_config() {
    let applied = loaded().assemble();
    let cfg = &applied.config;
    assert_eq!(
        cfg.outbound.get("0.0.0.0_9080"),
        Some(&(
            ListenAddr::AnyOn(9080),
            Outbound::Http {
                route_table: "9080".into()
            }
        ))
    );
    assert_eq!(
        cfg.inbound.get(&9080),
        Some(&Inbound::Http {
            cluster: "inbound|9080||".into()
        })
    );
    assert!(applied.wanted_routes.contains("9080"));
    assert!(applied
        .wanted_endpoints
        .contains("outbound|9080|v2|reviews.bookinfo.svc.cluster.local"));

    // Dual-stack endpoints keep both addresses; ratings is IPv6 only.
    let reviews = &cfg.endpoints["outbound|9080|v1|reviews.bookinfo.svc.cluster.local"];
    assert_eq!(
        reviews[0].addresses,
        vec![
            "10.10.0.31:9080".parse().unwrap(),
            "[fd00:10::31]:9080".parse().unwrap()
        ]
    );
    let ratings = &cfg.clusters["outbound|9080||ratings.bookinfo.svc.cluster.local"];
    assert!(ratings.http2, "ratings is gRPC");
    assert!(matches!(ratings.kind, ClusterKind::Eds));

    // Route selection: authority → virtual host, then the first route that matches.
    let table = &cfg.routes["9080"];
    let pick = |authority: &str, path: &str, headers: &[(&str, &[u8])]| {
        let vh = table.virtual_host(authority).expect("a virtual host");
        let req = SimpleRequest {
            target: path.as_bytes(),
            authority: authority.as_bytes(),
            method: b"GET",
            scheme: b"http",
            headers,
        };
        let i = vh.table.first_match(&req).expect("a route");
        let r = &vh.routes[i];
        match &r.action {
            Action::Forward(f) => f
                .clusters
                .iter()
                .map(|c| format!("{}={}", c.name, c.weight))
                .collect::<Vec<_>>()
                .join(","),
            Action::Direct { status, .. } => format!("direct {status}"),
            Action::Redirect(rd) => format!("redirect {} {:?}", rd.status, rd.path),
        }
    };
    assert_eq!(
        pick("reviews:9080", "/reviews/1", &[("end-user", b"jason")]),
        "outbound|9080|v2|reviews.bookinfo.svc.cluster.local=1"
    );
    assert_eq!(
        pick("reviews.bookinfo.svc.cluster.local", "/reviews/1", &[]),
        "outbound|9080|v1|reviews.bookinfo.svc.cluster.local=80,outbound|9080|v3|reviews.bookinfo.svc.cluster.local=20"
    );
    assert_eq!(pick("productpage:9080", "/healthz", &[]), "direct 200");
    assert!(pick("productpage:9080", "/index.html", &[]).starts_with("redirect 301"));
    // An unknown host falls through to the `*` virtual host (allow_any → passthrough).
    assert_eq!(pick("example.com", "/", &[]), "PassthroughCluster=1");
}

#[test]
fn unsupported_fields_are_refused_by_name_and_change_nothing() {
    let mut state = loaded();
    let before = state.assemble().config.clusters.len();

    let mut c = Cluster {
        name: "tls".into(),
        ..Default::default()
    };
    c.transport_socket = Some(TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        ..Default::default()
    });
    let good = Resource::encode(
        "fine",
        &Cluster {
            name: "fine".into(),
            ..Default::default()
        },
    );
    let bad = Resource::encode("tls", &c);
    let err = state
        .apply(type_url::CLUSTER, &[good, bad], &[])
        .unwrap_err();
    assert_eq!(err.len(), 1);
    assert_eq!(err[0].name, "tls");
    assert!(err[0].reason.contains("transport_socket"), "{}", err[0]);
    // The good cluster of the refused update was not applied either.
    let after = state.assemble().config;
    assert_eq!(after.clusters.len(), before);
    assert!(!after.clusters.contains_key("fine"));

    // A route using a match Hypha does not support, and a regex that does not compile.
    let snap = bookinfo_snapshot();
    let mut rc = RouteConfiguration::decode(
        &*snap
            .resources(type_url::ROUTE)
            .unwrap()
            .get("9080")
            .unwrap()
            .body
            .value,
    )
    .unwrap();
    rc.virtual_hosts[0].routes[0]
        .r#match
        .as_mut()
        .unwrap()
        .runtime_fraction = Some(Default::default());
    let mut rc2 = rc.clone();
    rc2.name = "other".into();
    rc2.virtual_hosts[0].routes[0]
        .r#match
        .as_mut()
        .unwrap()
        .runtime_fraction = None;
    rc2.virtual_hosts[0].routes[0]
        .r#match
        .as_mut()
        .unwrap()
        .path_specifier = Some(route_match::PathSpecifier::SafeRegex(
        envoy_types::pb::envoy::r#type::matcher::v3::RegexMatcher {
            regex: "(unclosed".into(),
            ..Default::default()
        },
    ));
    let err = state
        .apply(
            type_url::ROUTE,
            &[
                Resource::encode("9080", &rc),
                Resource::encode("other", &rc2),
            ],
            &[],
        )
        .unwrap_err();
    let text = hypha_proxy::state::nack_message(&err);
    assert!(
        text.contains("route table \"9080\"") && text.contains("match.runtime_fraction"),
        "{text}"
    );
    assert!(
        text.contains("route table \"other\"") && text.contains("(unclosed"),
        "{text}"
    );
    // The old route table still serves.
    let cfg = state.assemble().config;
    assert!(cfg.routes["9080"].virtual_host("reviews:9080").is_some());
    assert!(!cfg.routes.contains_key("other"));

    // Garbage bytes are refused, not a panic.
    let garbage = Resource::new(
        "junk",
        prost_types::Any {
            type_url: type_url::LISTENER.into(),
            value: vec![0xff, 0xff, 0xff],
        },
    );
    let err = state
        .apply(type_url::LISTENER, &[garbage], &[])
        .unwrap_err();
    assert!(err[0].reason.contains("cannot decode"), "{}", err[0]);
}
