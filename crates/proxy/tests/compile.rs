//! The proxy compiles everything Hypha's control plane sends, and refuses what it does not
//! support with the resource and field named, leaving its state unchanged.

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::{cluster, Cluster};
use envoy_types::pb::envoy::config::core::v3::{
    HttpProtocolOptions as CommonHttpOptions, TransportSocket,
};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::{filter, Listener};
use envoy_types::pb::envoy::config::route::v3::{
    retry_policy, route, route_action, route_match, RouteAction, RouteConfiguration,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::RouteSpecifier, HttpConnectionManager,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
use envoy_types::pb::google::protobuf::{Any, UInt32Value};
use hypha_control::{ProxyInfo, Translation};
use hypha_matcher::SimpleRequest;
use hypha_proxy::compile::Refused;
use hypha_proxy::model::{
    Action, ClusterKind, EscapedSlashes, HashKey, Inbound, Lb, ListenAddr, Outbound,
    PathNormalization, UpstreamTls,
};
use hypha_proxy::state::{nack_message, State};
use hypha_xds::{type_url, Resource, Snapshot};
use prost::Message;

const UPSTREAM_HTTP_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

fn bookinfo_snapshot() -> Snapshot {
    let cfg = hypha_control::initial_config(None).unwrap();
    productpage_view(&Translation::new(Arc::new(cfg), "1"))
}

/// What productpage's sidecar gets from a control plane whose sidecars have certificates.
fn bookinfo_mtls_snapshot() -> Snapshot {
    let cfg = hypha_control::initial_config(None).unwrap();
    let roots = Arc::new(hypha_control::mtls::SignerRoots::new());
    productpage_view(&Translation::with_mtls(Arc::new(cfg), "1", roots))
}

fn productpage_view(t: &Translation) -> Snapshot {
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
    load(&bookinfo_snapshot(), State::default())
}

fn load(snap: &Snapshot, mut state: State) -> State {
    for t in [
        type_url::CLUSTER,
        type_url::ENDPOINT,
        type_url::LISTENER,
        type_url::ROUTE,
    ] {
        state
            .apply(t, &all(snap, t), &[])
            .unwrap_or_else(|e| panic!("{t}: {e:?}"));
    }
    state
}

#[test]
fn compiles_mutual_tls_between_sidecars() {
    let snap = bookinfo_mtls_snapshot();
    let cfg = load(&snap, State::new(true)).assemble().config;
    // Auto mTLS to reviews: only endpoints marked `tlsMode: istio` (all of bookinfo's), and
    // the server must be reviews' identity.
    let reviews = &cfg.clusters["outbound|9080||reviews.bookinfo.svc.cluster.local"];
    let Some(UpstreamTls::Mesh(tls)) = &reviews.tls else {
        panic!("reviews speaks mutual TLS: {:?}", reviews.tls)
    };
    assert!(tls.only_istio_endpoints);
    assert_eq!(
        &*tls.identities,
        ["spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews".to_owned()]
    );
    assert_eq!(&*tls.alpn, b"\x08http/1.1");
    let eps = &cfg.endpoint_sets["outbound|9080||reviews.bookinfo.svc.cluster.local"];
    assert!(eps.endpoints.iter().all(|e| e.istio_tls));
    // gRPC to ratings offers h2.
    let ratings = &cfg.clusters["outbound|9080||ratings.bookinfo.svc.cluster.local"];
    let Some(UpstreamTls::Mesh(tls)) = &ratings.tls else {
        panic!("ratings speaks mutual TLS")
    };
    assert_eq!(&*tls.alpn, b"\x02h2");
    // External services and the passthrough cluster stay plaintext.
    assert!(cfg.clusters["PassthroughCluster"].tls.is_none());
    // Bookinfo's mesh-wide PeerAuthentication is STRICT: a TLS chain only.
    assert!(
        cfg.inbound_tls.by_port.contains_key(&9080),
        "{:?}",
        cfg.inbound_tls
    );
    assert!(!cfg.inbound.by_port.contains_key(&9080));

    // A proxy without a workload certificate refuses what needs one, by name and reason.
    let mut plain = State::default();
    let err = plain
        .apply(type_url::CLUSTER, &all(&snap, type_url::CLUSTER), &[])
        .unwrap_err();
    assert!(
        err.iter().any(|r| r
            .reason
            .contains("needs mutual TLS with the workload certificate")),
        "{err:?}"
    );
}

#[test]
fn tls_shapes_hypha_does_not_serve_are_refused_by_name() {
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
        common_tls_context::ValidationContextType, CertificateValidationContext, UpstreamTlsContext,
    };
    let snap = bookinfo_mtls_snapshot();
    let name = "outbound|9080||reviews.bookinfo.svc.cluster.local";
    let sent: Cluster = Message::decode(
        &*snap
            .resources(type_url::CLUSTER)
            .unwrap()
            .get(name)
            .unwrap()
            .body
            .value,
    )
    .unwrap();
    let with_context = |edit: &dyn Fn(&mut UpstreamTlsContext)| {
        let mut c = sent.clone();
        let ts = c.transport_socket_matches[0]
            .transport_socket
            .as_mut()
            .unwrap();
        let Some(
            envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(
                any,
            ),
        ) = &mut ts.config_type
        else {
            panic!("typed config")
        };
        let mut ctx = UpstreamTlsContext::decode(&*any.value).unwrap();
        edit(&mut ctx);
        any.value = ctx.encode_to_vec();
        cluster_refusal(&c)
    };
    // Inline certificates: Hypha presents the workload certificate only.
    let e = with_context(&|ctx| {
        ctx.common_tls_context.as_mut().unwrap().tls_certificates = vec![Default::default()];
    });
    assert!(e.contains("tls_certificates"), "{e}");
    // Another SDS secret name.
    let e = with_context(&|ctx| {
        ctx.common_tls_context
            .as_mut()
            .unwrap()
            .tls_certificate_sds_secret_configs[0]
            .name = "file-cert".into();
    });
    assert!(e.contains("\"file-cert\""), "{e}");
    // Inline roots instead of the trust bundle.
    let e = with_context(&|ctx| {
        ctx.common_tls_context
            .as_mut()
            .unwrap()
            .validation_context_type = Some(ValidationContextType::ValidationContext(
            CertificateValidationContext::default(),
        ));
    });
    assert!(e.contains("validation_context"), "{e}");
    // A match on anything but Istio's tlsMode.
    let mut c = sent.clone();
    c.transport_socket_matches.swap(0, 1);
    let e = cluster_refusal(&c);
    assert!(e.contains("auto-mTLS"), "{e}");
}

/// Istio's default `pathNormalization: BASE`, as the control plane sends it.
const BASE: PathNormalization = PathNormalization {
    normalize: true,
    merge_slashes: false,
    escaped_slashes: EscapedSlashes::Keep,
};

#[test]
fn compiles_the_bookinfo_sidecar_config() {
    let applied = loaded().assemble();
    let cfg = &applied.config;
    assert_eq!(
        cfg.outbound.get("0.0.0.0_9080"),
        Some(&(
            ListenAddr::AnyOn(9080),
            Outbound::Http {
                route_table: "9080".into(),
                paths: BASE,
            }
        ))
    );
    // productpage is selected by no AuthorizationPolicy: its chain has no RBAC filter.
    assert!(
        matches!(
            cfg.inbound.by_port.get(&9080),
            Some(Inbound::Http { cluster, authz, paths }) if &**cluster == "inbound|9080||" && authz.is_empty() && *paths == BASE
        ),
        "{:?}",
        cfg.inbound.by_port.get(&9080)
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
    let text = nack_message(&err);
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

/// A sidecar for each workload the control plane knows.
fn sidecars(t: &Translation) -> Vec<ProxyInfo> {
    t.registry
        .workloads
        .iter()
        .map(|w| ProxyInfo {
            id: format!(
                "sidecar~{}~{}.{}~{}.svc.cluster.local",
                w.addresses[0], w.workload_name, w.namespace, w.namespace
            ),
            namespace: w.namespace.clone(),
            service_account: w.service_account.clone(),
            workload_name: w.workload_name.clone(),
            labels: w.labels.clone(),
            ips: w.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
        })
        .collect()
}

const TYPES: [&str; 4] = [
    type_url::CLUSTER,
    type_url::ENDPOINT,
    type_url::LISTENER,
    type_url::ROUTE,
];

/// Every resource of `snap`, compiled: the refusals, and the state when there are none.
fn compile_all(snap: &Snapshot) -> (Vec<Refused>, State) {
    let mut state = State::default();
    let mut refused = Vec::new();
    for t in TYPES {
        let resources = all(snap, t);
        assert!(!resources.is_empty(), "no {t}");
        if let Err(e) = state.apply(t, &resources, &[]) {
            refused.extend(e);
        }
    }
    (refused, state)
}

/// Whatever the control plane sends a bookinfo sidecar, for every workload, is accepted: each
/// field is acted on or known to be informational, none is refused.
#[test]
fn every_resource_the_control_plane_sends_for_bookinfo_compiles() {
    let t = Translation::new(Arc::new(hypha_control::initial_config(None).unwrap()), "1");
    let mut proxies = sidecars(&t);
    assert!(proxies.len() >= 6, "{proxies:?}");
    // And a client with no workload of its own.
    proxies.push(ProxyInfo {
        id: "sidecar~10.9.0.1~client.default~default.svc.cluster.local".into(),
        namespace: "default".into(),
        ..Default::default()
    });
    for p in &proxies {
        let (refused, _) = compile_all(&t.snapshot(p));
        assert!(refused.is_empty(), "{}: {}", p.id, nack_message(&refused));
    }
}

/// Control-plane features bookinfo does not use: DNS, ORIGINAL_DST and TCP services (one with
/// a VIP per family), connection pool settings, every consistent-hash key, redirects, regex
/// rewrites, query and header matches, per-destination headers and Istio's default retries.
const FEATURES: &str = r#"
apiVersion: hypha.dev/v1alpha1
kind: MeshConfig
metadata: {name: mesh}
spec: {trustDomain: test.local, ipFamilies: [IPv4, IPv6]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: lab}
spec:
  hosts: [api.lab.svc.cluster.local]
  addresses: [240.0.0.1, "2001:db8::1"]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}, {number: 81, name: grpc, protocol: GRPC}]
  endpoints:
  - {address: 10.0.0.1, labels: {version: v1}, weight: 3, locality: r1/z1/s1}
  - {address: 10.0.0.2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: lab}
spec:
  hosts: [db.lab.svc.cluster.local]
  addresses: [240.0.0.2, "2001:db8::2"]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 5432, name: tcp, protocol: TCP}]
  endpoints: [{address: 10.0.0.3}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: cache, namespace: lab}
spec:
  hosts: [cache.lab.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 6379, name: tcp, protocol: TCP}]
  endpoints: [{address: 10.0.0.4}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext, namespace: lab}
spec:
  hosts: [ext.example.com]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{number: 8080, name: http, protocol: HTTP}]
  endpoints: [{address: ext-a.example.com}, {address: ext-b.example.com}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext-rr, namespace: lab}
spec:
  hosts: [rr.example.com]
  location: MESH_EXTERNAL
  resolution: DNS_ROUND_ROBIN
  ports: [{number: 8081, name: http, protocol: HTTP}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: anything, namespace: lab}
spec:
  hosts: [anything.example.com]
  location: MESH_EXTERNAL
  resolution: NONE
  ports: [{number: 9000, name: http, protocol: HTTP}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api, namespace: lab}
spec:
  host: api
  trafficPolicy:
    loadBalancer: {consistentHash: {httpCookie: {name: session, path: /}, maglev: {tableSize: 65537}}}
    connectionPool:
      tcp: {maxConnections: 10, connectTimeout: 2s}
      http:
        http1MaxPendingRequests: 5
        http2MaxRequests: 50
        maxRequestsPerConnection: 100
        maxRetries: 4
        idleTimeout: 30s
        maxConcurrentStreams: 20
    outlierDetection:
      consecutive5xxErrors: 2
      consecutiveGatewayErrors: 3
      interval: 2s
      baseEjectionTime: 5s
      maxEjectionPercent: 30
    portLevelSettings:
    - port: {number: 81}
      loadBalancer: {consistentHash: {useSourceIp: true}}
  subsets:
  - {name: v1, labels: {version: v1}}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      loadBalancer: {consistentHash: {httpQueryParameterName: user}}
      connectionPool: {http: {h2UpgradePolicy: UPGRADE, maxConcurrentStreams: 20}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api, namespace: lab}
spec:
  hosts: [api]
  http:
  - name: query
    match:
    - uri: {prefix: /Debug}
      ignoreUriCase: true
      queryParams: {debug: {exact: "1"}, trace: {regex: ".*"}}
      withoutHeaders: {x-skip: {exact: "yes"}}
    route: [{destination: {host: api, subset: v2}}]
  - name: moved
    match: [{uri: {regex: "/old/.*"}}]
    redirect: {uri: /new, authority: new.example.com, port: 8443, scheme: https, redirectCode: 308}
  - name: rewrite
    match: [{uri: {prefix: /v1/}, method: {exact: POST}, authority: {prefix: api}, scheme: {exact: http}}]
    rewrite: {uriRegexRewrite: {match: "^/v1/(.*)$", rewrite: "/\\1"}, authority: api-internal}
    route: [{destination: {host: api, subset: v1}}]
  - name: blob
    match: [{uri: {exact: /blob}}]
    directResponse: {status: 503, body: {bytes: aGVsbG8=}}
  - name: split
    fault: {delay: {fixedDelay: 1s, percentage: {value: 0.5}}}
    timeout: 5s
    route:
    - destination: {host: api, subset: v1}
      weight: 90
      headers: {request: {set: {x-v: "1"}}, response: {remove: [x-internal]}}
    - destination: {host: api, subset: v2}
      weight: 10
    retries:
      attempts: 4
      perTryTimeout: 1s
      retryOn: gateway-error,refused-stream,unavailable,cancelled,deadline-exceeded,internal,resource-exhausted,http3-post-connect-failure,503,retriable-4xx,envoy-ratelimited,reset-before-request,retriable-headers
"#;

fn features() -> (Translation, ProxyInfo) {
    let loaded = hypha_config::load_str("features.yaml", FEATURES);
    assert!(!loaded.has_errors(), "{:?}", loaded.diagnostics);
    let t = Translation::new(Arc::new(loaded.config), "1");
    (t, lab_client())
}

/// A sidecar in namespace `lab`.
fn lab_client() -> ProxyInfo {
    ProxyInfo {
        id: "sidecar~10.0.0.9~client.lab~lab.svc.cluster.local".into(),
        namespace: "lab".into(),
        ..Default::default()
    }
}

/// What the control plane sends for features bookinfo does not use is accepted too, and what
/// the proxy does not act on yet is carried in the model rather than dropped.
#[test]
fn every_control_plane_feature_compiles_and_is_carried() {
    let (t, client) = features();
    let (refused, mut state) = compile_all(&t.snapshot(&client));
    assert!(refused.is_empty(), "{}", nack_message(&refused));
    let cfg = state.assemble().config;

    let api = &cfg.clusters["outbound|80||api.lab.svc.cluster.local"];
    assert_eq!(api.lb, Lb::Maglev);
    assert_eq!(api.idle_timeout, Some(Duration::from_secs(30)));
    assert_eq!(api.max_requests_per_connection, Some(100));
    assert_eq!(api.outlier.unwrap().interval, Duration::from_secs(2));
    let v2 = &cfg.clusters["outbound|80|v2|api.lab.svc.cluster.local"];
    assert!(v2.http2, "h2UpgradePolicy: UPGRADE");
    assert_eq!(v2.max_concurrent_streams, Some(20));
    // Envoy's default idle timeout where none is set.
    let ext = &cfg.clusters["outbound|8080||ext.example.com"];
    assert_eq!(ext.idle_timeout, Some(Duration::from_secs(3600)));
    assert!(matches!(&ext.kind, ClusterKind::Dns(hosts) if hosts.len() == 2));
    assert!(matches!(
        cfg.clusters["outbound|9000||anything.example.com"].kind,
        ClusterKind::OriginalDst
    ));

    // The TCP service answers on both of its VIPs.
    let db = "outbound|5432||db.lab.svc.cluster.local";
    for vip in ["240.0.0.2", "2001:db8::2"] {
        assert_eq!(
            cfg.tcp
                .get(&ListenAddr::Vip(vip.parse().unwrap(), 5432))
                .and_then(|r| r.pick(None)),
            Some(db)
        );
    }

    let table = &cfg.routes["80"];
    let vh = table.virtual_host("api.lab.svc.cluster.local").unwrap();
    let split = vh.routes.iter().find(|r| r.name == "split").unwrap();
    let Action::Forward(f) = &split.action else {
        panic!("split forwards")
    };
    let retry = f.retry.as_ref().unwrap();
    assert!(retry.on_gateway_error && retry.on_refused_stream);
    assert!(retry.on_ratelimited && retry.on_reset_before_request);
    let grpc: Vec<u32> = (0..17).filter(|c| retry.on_grpc(*c)).collect();
    assert_eq!(grpc, [1, 4, 8, 13, 14]);
    // 503 from the status list, 409 for retriable-4xx (Envoy's only retriable 4xx).
    let mut statuses = retry.on_status.clone();
    statuses.sort_unstable();
    assert_eq!(statuses, [409, 503]);
    assert_eq!(f.hash, [HashKey::Cookie("session".into())]);
    // No VirtualService: Istio's default retries, which include gRPC `unavailable`.
    let default = &cfg.routes["8080"]
        .virtual_host("ext.example.com")
        .unwrap()
        .routes[0];
    let Action::Forward(f) = &default.action else {
        panic!("default forwards")
    };
    let retry = f.retry.as_ref().unwrap();
    assert!(retry.on_connect_failure && retry.on_refused_stream && !retry.on_5xx);
    let grpc: Vec<u32> = (0..17).filter(|c| retry.on_grpc(*c)).collect();
    assert_eq!(grpc, [1, 14], "cancelled, unavailable");
    assert_eq!(retry.on_status, [503]);
}

/// A DestinationRule cookie with a `ttl` asks Envoy to set the cookie when a request has
/// none; the proxy sets no cookie, so it refuses the route rather than hash on nothing, and
/// validation refuses the rule first.
#[test]
fn a_generated_hash_cookie_is_refused_by_name() {
    let yaml = FEATURES.replace(
        "httpCookie: {name: session, path: /}",
        "httpCookie: {name: session, path: /, ttl: 60s}",
    );
    let loaded = hypha_config::load_str("features.yaml", &yaml);
    // Validation refuses what the sidecar would: the config never reaches it.
    let refusal: Vec<String> = loaded
        .diagnostics
        .errors()
        .map(|d| format!("{} {}", d.path, d.message))
        .collect();
    assert_eq!(refusal.len(), 1, "{refusal:?}");
    assert!(refusal[0].contains("httpCookie.ttl"), "{refusal:?}");
    let t = Translation::new(Arc::new(loaded.config), "1");
    let (_, client) = features();
    let (refused, _) = compile_all(&t.snapshot(&client));
    let text = nack_message(&refused);
    assert!(
        text.contains("field `route.hash_policy.cookie.ttl` is not supported by Hypha"),
        "{text}"
    );
}

/// A resource the control plane sends for bookinfo, decoded from the snapshot.
fn sent<M: Message + Default>(t: &str, name: &str) -> M {
    let snap = bookinfo_snapshot();
    M::decode(&*snap.resources(t).unwrap().get(name).unwrap().body.value).unwrap()
}

fn cluster_refusal(c: &Cluster) -> String {
    hypha_proxy::compile::cluster(&c.name, &c.encode_to_vec())
        .map(|_| ())
        .unwrap_err()
        .to_string()
}

fn route_refusal(rc: &RouteConfiguration) -> String {
    hypha_proxy::compile::route_table(&rc.name, &rc.encode_to_vec())
        .map(|_| ())
        .unwrap_err()
        .to_string()
}

fn listener_refusal(l: &Listener) -> String {
    hypha_proxy::compile::listener(&l.name, &l.encode_to_vec())
        .map(|_| ())
        .unwrap_err()
        .to_string()
}

/// Fields that used to be ignored without a word are refused by name: on a resource the
/// control plane sends, set one more field and the proxy must say which.
#[test]
fn fields_nobody_acts_on_are_refused_by_name() {
    const REVIEWS: &str = "outbound|9080||reviews.bookinfo.svc.cluster.local";
    let reviews: Cluster = sent(type_url::CLUSTER, REVIEWS);
    hypha_proxy::compile::cluster(REVIEWS, &reviews.encode_to_vec()).unwrap();
    let with = |f: &dyn Fn(&mut Cluster)| {
        let mut c = reviews.clone();
        f(&mut c);
        c
    };
    let expect = |c: Cluster, field: &str| {
        let e = cluster_refusal(&c);
        assert_eq!(
            e,
            format!("cluster {REVIEWS:?}: field `{field}` is not supported by Hypha"),
        );
    };
    // Source addresses only where the connection's destination is its own (Istio's inbound
    // passthrough from 127.0.0.6).
    assert_eq!(
        cluster_refusal(&with(&|c| c.upstream_bind_config = Some(Default::default()))),
        format!(
            "cluster {REVIEWS:?}: field `upstream_bind_config` is not supported by Hypha on a \
             cluster that is not ORIGINAL_DST"
        ),
    );
    expect(
        with(&|c| c.wait_for_warm_on_init = Some(Default::default())),
        "wait_for_warm_on_init",
    );
    expect(
        with(&|c| {
            c.common_lb_config = Some(cluster::CommonLbConfig {
                healthy_panic_threshold: Some(Default::default()),
                ..Default::default()
            })
        }),
        "common_lb_config.healthy_panic_threshold",
    );
    expect(
        with(&|c| c.lb_config = Some(cluster::LbConfig::LeastRequestLbConfig(Default::default()))),
        "least_request_lb_config",
    );
    // A value the proxy cannot honour is named with the field.
    let e = cluster_refusal(&with(&|c| {
        c.dns_lookup_family = cluster::DnsLookupFamily::V4Only as i32
    }));
    assert!(
        e.contains("field `dns_lookup_family` = V4_ONLY is not supported"),
        "{e}"
    );
    // Inside the upstream HTTP options.
    let mut options = HttpProtocolOptions::decode(
        &*reviews.typed_extension_protocol_options[UPSTREAM_HTTP_OPTIONS].value,
    )
    .unwrap();
    options
        .common_http_protocol_options
        .get_or_insert_default()
        .max_connection_duration = Some(Default::default());
    let e = cluster_refusal(&with(&|c| {
        c.typed_extension_protocol_options
            .get_mut(UPSTREAM_HTTP_OPTIONS)
            .unwrap()
            .value = options.encode_to_vec();
    }));
    assert!(
        e.contains(
            "field `HttpProtocolOptions.common_http_protocol_options.max_connection_duration`"
        ),
        "{e}"
    );

    // Ring and table sizes are informational: rendezvous hashing has neither.
    let ring = with(&|c| {
        c.lb_policy = cluster::LbPolicy::RingHash as i32;
        c.lb_config = Some(cluster::LbConfig::RingHashLbConfig(
            cluster::RingHashLbConfig {
                minimum_ring_size: Some(envoy_types::pb::google::protobuf::UInt64Value {
                    value: 1024,
                }),
                ..Default::default()
            },
        ));
    });
    hypha_proxy::compile::cluster(REVIEWS, &ring.encode_to_vec()).unwrap();
    // The deprecated Cluster-level HTTP options are read like the new ones.
    #[allow(deprecated)]
    let old = with(&|c| {
        c.typed_extension_protocol_options.clear();
        c.http2_protocol_options = Some(Default::default());
        c.common_http_protocol_options = Some(CommonHttpOptions {
            idle_timeout: Some(envoy_types::pb::google::protobuf::Duration {
                seconds: 7,
                nanos: 0,
            }),
            ..Default::default()
        });
        c.max_requests_per_connection = Some(UInt32Value { value: 9 });
    });
    let old = hypha_proxy::compile::cluster(REVIEWS, &old.encode_to_vec()).unwrap();
    assert!(old.http2);
    assert_eq!(old.idle_timeout, Some(Duration::from_secs(7)));
    assert_eq!(old.max_requests_per_connection, Some(9));

    // Endpoints: a priority would mean failover, which the proxy does not do.
    let mut cla: ClusterLoadAssignment = sent(type_url::ENDPOINT, REVIEWS);
    cla.endpoints[0].priority = 1;
    let e = hypha_proxy::compile::endpoints(REVIEWS, &cla.encode_to_vec())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("field `endpoints.priority` is not supported"),
        "{e}"
    );

    // Routes: RouteAction, RetryPolicy and RouteMatch fields.
    let rc: RouteConfiguration = sent(type_url::ROUTE, "9080");
    let route_with = |f: &dyn Fn(&mut RouteAction)| {
        let mut rc = rc.clone();
        let Some(route::Action::Route(ra)) = &mut rc.virtual_hosts[0].routes[0].action else {
            panic!("the first route forwards")
        };
        f(ra);
        rc
    };
    let e = route_refusal(&route_with(&|ra| {
        ra.idle_timeout = Some(Default::default())
    }));
    assert!(
        e.contains("field `route.idle_timeout` is not supported by Hypha"),
        "{e}"
    );
    let e = route_refusal(&route_with(&|ra| {
        ra.cluster_specifier = Some(route_action::ClusterSpecifier::ClusterHeader(
            "x-cluster".into(),
        ))
    }));
    assert!(
        e.contains("field `route.cluster_header` is not supported by Hypha"),
        "{e}"
    );
    let e = route_refusal(&route_with(&|ra| {
        ra.retry_policy.get_or_insert_default().retry_priority = Some(Default::default())
    }));
    assert!(
        e.contains("field `route.retry_policy.retry_priority` is not supported"),
        "{e}"
    );
    let e = route_refusal(&route_with(&|ra| {
        ra.retry_policy.get_or_insert_default().retry_on = "5xx,previous-moon-phase".into()
    }));
    assert!(
        e.contains(
            "route.retry_policy.retry_on: condition \"previous-moon-phase\" is not supported"
        ),
        "{e}"
    );
    // The previous_hosts predicate is what the proxy does; any other is refused.
    let predicate = |name: &str, config: Option<Any>| {
        route_with(&|ra| {
            let rp = ra.retry_policy.get_or_insert_default();
            rp.host_selection_retry_max_attempts = 3;
            rp.retry_host_predicate = vec![retry_policy::RetryHostPredicate {
                name: name.into(),
                config_type: config
                    .clone()
                    .map(retry_policy::retry_host_predicate::ConfigType::TypedConfig),
            }];
        })
    };
    let previous_hosts = Any {
        type_url: "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate".into(),
        value: Vec::new(),
    };
    for ok in [
        predicate("envoy.retry_host_predicates.previous_hosts", None),
        predicate("anything", Some(previous_hosts)),
    ] {
        hypha_proxy::compile::route_table("9080", &ok.encode_to_vec()).unwrap();
    }
    let e = route_refusal(&predicate(
        "envoy.retry_host_predicates.omit_canary_hosts",
        None,
    ));
    assert!(
        e.contains("only envoy.retry_host_predicates.previous_hosts is supported"),
        "{e}"
    );
    let mut strip = rc.clone();
    strip.virtual_hosts[0].routes[0]
        .r#match
        .as_mut()
        .unwrap()
        .filter_state = vec![Default::default()];
    let e = route_refusal(&strip);
    assert!(e.contains("field `match.filter_state`"), "{e}");
    let mut vh = rc.clone();
    vh.virtual_hosts[0].include_request_attempt_count = true;
    let e = route_refusal(&vh);
    assert!(e.contains("field `include_request_attempt_count`"), "{e}");

    // Listeners: the HTTP connection manager's timeouts and address handling.
    let listener: Listener = sent(type_url::LISTENER, "0.0.0.0_9080");
    let hcm_with = |f: &dyn Fn(&mut HttpConnectionManager)| {
        let mut l = listener.clone();
        let Some(filter::ConfigType::TypedConfig(any)) =
            &mut l.filter_chains[0].filters[0].config_type
        else {
            panic!("a typed filter")
        };
        let mut h = HttpConnectionManager::decode(&*any.value).unwrap();
        f(&mut h);
        any.value = h.encode_to_vec();
        l
    };
    let e = listener_refusal(&hcm_with(&|h| {
        h.stream_idle_timeout = Some(Default::default())
    }));
    assert!(
        e.contains("field `stream_idle_timeout` is not supported by Hypha"),
        "{e}"
    );
    let e = listener_refusal(&hcm_with(&|h| {
        h.use_remote_address = Some(Default::default());
        h.request_timeout = Some(Default::default());
    }));
    assert!(
        e.contains("fields `request_timeout`, `use_remote_address` are not supported"),
        "{e}"
    );
    let mut l = listener.clone();
    l.listener_filters = vec![Default::default()];
    let e = listener_refusal(&l);
    assert!(
        e.contains("listener_filters[0]: only the TLS inspector"),
        "{e}"
    );

    // The inbound chains' inline route goes straight to the app: a timeout there would be
    // ignored, so it is refused.
    let mut inbound: Listener = sent(type_url::LISTENER, "virtualInbound");
    let chain = inbound
        .filter_chains
        .iter_mut()
        .find(|c| c.name.starts_with("inbound_"))
        .expect("a chain for a declared port");
    let Some(filter::ConfigType::TypedConfig(any)) = &mut chain.filters[0].config_type else {
        panic!("a typed filter")
    };
    let mut h = HttpConnectionManager::decode(&*any.value).unwrap();
    let Some(RouteSpecifier::RouteConfig(rc)) = &mut h.route_specifier else {
        panic!("an inline route table")
    };
    let Some(route::Action::Route(ra)) = &mut rc.virtual_hosts[0].routes[0].action else {
        panic!("the inline route forwards")
    };
    ra.timeout = Some(envoy_types::pb::google::protobuf::Duration {
        seconds: 5,
        nanos: 0,
    });
    any.value = h.encode_to_vec();
    let e = listener_refusal(&inbound);
    assert!(
        e.contains("an inline route table other than one route to one cluster"),
        "{e}"
    );
}

/// Virtual host selection by authority, through the matcher's domain table, in Envoy's order:
/// an exact domain, then the longest suffix wildcard, then the longest prefix wildcard, then
/// `*`; a wildcard stands for at least one character.
#[test]
fn virtual_hosts_are_chosen_in_envoys_order() {
    use envoy_types::pb::envoy::config::route::v3::VirtualHost;
    let vh = |name: &str, domains: &[&str]| VirtualHost {
        name: name.into(),
        domains: domains.iter().map(|d| (*d).into()).collect(),
        ..Default::default()
    };
    let rc = RouteConfiguration {
        name: "80".into(),
        virtual_hosts: vec![
            vh("any", &["*"]),
            vh("prefix", &["api.*"]),
            vh("longer-prefix", &["api.shop.*"]),
            vh("suffix", &["*.example.com"]),
            vh("longer-suffix", &["*.api.example.com"]),
            vh("exact", &["api.example.com", "Shop:8080"]),
        ],
        ..Default::default()
    };
    let table = hypha_proxy::compile::route_table("80", &rc.encode_to_vec()).unwrap();
    let pick = |authority: &str| table.virtual_host(authority).map(|v| v.name.as_str());
    assert_eq!(pick("api.example.com"), Some("exact"));
    assert_eq!(
        pick("shop:8080"),
        Some("exact"),
        "domains compare lower-case"
    );
    assert_eq!(pick("v1.api.example.com"), Some("longer-suffix"));
    assert_eq!(pick("x.example.com"), Some("suffix"));
    assert_eq!(
        pick(".example.com"),
        Some("any"),
        "a wildcard is never empty"
    );
    assert_eq!(pick("api.shop.local"), Some("longer-prefix"));
    assert_eq!(pick("api.other"), Some("prefix"));
    assert_eq!(pick("api."), Some("any"));
    assert_eq!(pick("www.example.org"), Some("any"));
    assert_eq!(
        pick("api.foo.example.com"),
        Some("suffix"),
        "suffix before prefix"
    );

    // Without `*`, an authority no domain takes has no virtual host.
    let mut rc = rc;
    rc.virtual_hosts.remove(0);
    let table = hypha_proxy::compile::route_table("80", &rc.encode_to_vec()).unwrap();
    assert!(table.virtual_host("www.example.org").is_none());
    assert!(table
        .virtual_host("api.shop.")
        .is_some_and(|v| v.name == "prefix"));
}

const TLS_SERVICES: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: a, namespace: lab}
spec:
  hosts: [a.example.com]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{number: 443, name: tls, protocol: TLS}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: b, namespace: lab}
spec:
  hosts: [b.example.com]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{number: 443, name: https, protocol: HTTPS}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: cdn, namespace: lab}
spec:
  hosts: ["*.cdn.example.com"]
  location: MESH_EXTERNAL
  resolution: NONE
  ports: [{number: 443, name: tls, protocol: TLS}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: legacy, namespace: lab}
spec:
  hosts: [legacy.example.com]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{number: 443, name: tcp, protocol: TCP}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: vip, namespace: lab}
spec:
  hosts: [vip.example.com]
  addresses: [240.0.0.9, "2001:db8::9"]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{number: 8443, name: tls, protocol: TLS}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vip, namespace: lab}
spec:
  hosts: [vip.example.com, "*.vip.example.com"]
  tls:
  - match:
    - sniHosts: [v2.vip.example.com]
      port: 8443
    - sniHosts: [elsewhere.vip.example.com]
      port: 9999
    route:
    - destination: {host: b.example.com, port: {number: 443}}
"#;

/// TLS service ports are told apart by the server name of the ClientHello, as Envoy's filter
/// chains with `server_names` (and Istio's TLS routes) do: exact names first, then the longest
/// `*.` wildcard, then the chain without names, if any.
#[test]
fn tls_ports_choose_their_cluster_by_server_name() {
    let compiled = |yaml: &str| {
        let loaded = hypha_config::load_str("tls.yaml", yaml);
        assert!(!loaded.has_errors(), "{:?}", loaded.diagnostics);
        let t = Translation::new(Arc::new(loaded.config), "1");
        let (_, client) = features();
        let snap = t.snapshot(&client);
        let mut state = State::default();
        for t in TYPES {
            // No service here has EDS endpoints.
            if let Err(refused) = state.apply(t, &all(&snap, t), &[]) {
                panic!("{}", nack_message(&refused));
            }
        }
        state.assemble().config
    };
    let cfg = compiled(TLS_SERVICES);
    let shared = &cfg.tcp[&ListenAddr::AnyOn(443)];
    let pick = |name: Option<&str>| shared.pick(name);
    assert_eq!(
        pick(Some("a.example.com")),
        Some("outbound|443||a.example.com")
    );
    assert_eq!(
        pick(Some("b.example.com")),
        Some("outbound|443||b.example.com")
    );
    assert_eq!(
        pick(Some("img.cdn.example.com")),
        Some("outbound|443||*.cdn.example.com")
    );
    // The TCP service on the same port takes what no name does.
    for other in [Some("c.example.com"), Some("cdn.example.com"), None] {
        assert_eq!(
            pick(other),
            Some("outbound|443||legacy.example.com"),
            "{other:?}"
        );
    }
    // A service with VIPs: its TLS route's names first, the rest to the service, on both VIPs.
    for vip in ["240.0.0.9", "2001:db8::9"] {
        let routes = &cfg.tcp[&ListenAddr::Vip(vip.parse().unwrap(), 8443)];
        assert_eq!(
            routes.pick(Some("v2.vip.example.com")),
            Some("outbound|443||b.example.com")
        );
        assert_eq!(
            routes.pick(Some("elsewhere.vip.example.com")),
            Some("outbound|8443||vip.example.com"),
            "a match for another port does not apply"
        );
        assert_eq!(routes.pick(None), Some("outbound|8443||vip.example.com"));
    }
    // Without the TCP service, a name no chain takes has nowhere to go.
    let cfg = compiled(&TLS_SERVICES.replace("protocol: TCP", "protocol: TLS"));
    let shared = &cfg.tcp[&ListenAddr::AnyOn(443)];
    assert_eq!(shared.pick(Some("c.example.com")), None);
    assert_eq!(shared.pick(None), None);
    assert_eq!(
        shared.pick(Some("legacy.example.com")),
        Some("outbound|443||legacy.example.com")
    );
}

/// Outbound chains told apart by anything but server names, or not told apart at all, are
/// refused with the reason.
#[test]
fn outbound_chains_the_proxy_cannot_tell_apart_are_refused() {
    use envoy_types::pb::envoy::config::listener::v3::FilterChainMatch;
    let loaded = hypha_config::load_str("tls.yaml", TLS_SERVICES);
    let t = Translation::new(Arc::new(loaded.config), "1");
    let (_, client) = features();
    let snap = t.snapshot(&client);
    let shared: Listener = Listener::decode(
        &*snap
            .resources(type_url::LISTENER)
            .unwrap()
            .get("0.0.0.0_443")
            .unwrap()
            .body
            .value,
    )
    .unwrap();
    assert_eq!(shared.filter_chains.len(), 4);
    hypha_proxy::compile::listener("0.0.0.0_443", &shared.encode_to_vec()).unwrap();
    let with = |f: &dyn Fn(&mut Listener)| {
        let mut l = shared.clone();
        f(&mut l);
        listener_refusal(&l)
    };
    // The chain for `name` (`""`: the one without names).
    fn names<'a>(l: &'a mut Listener, name: &str) -> &'a mut FilterChainMatch {
        let i = l
            .filter_chains
            .iter()
            .position(|c| {
                let names = c
                    .filter_chain_match
                    .as_ref()
                    .map_or(&[][..], |m| &m.server_names[..]);
                names.first().map_or("", |n| n.as_str()) == name
            })
            .unwrap();
        l.filter_chains[i]
            .filter_chain_match
            .get_or_insert_default()
    }
    let e = with(&|l| names(l, "a.example.com").server_names.clear());
    assert!(
        e.contains("two outbound filter chains without server names"),
        "{e}"
    );
    let e = with(&|l| names(l, "a.example.com").server_names = vec!["a.*".into()]);
    assert!(e.contains("\"a.*\" is neither a name"), "{e}");
    let e = with(&|l| names(l, "b.example.com").server_names = vec!["A.example.com".into()]);
    assert!(
        e.contains("\"a.example.com\" is in two filter chains"),
        "{e}"
    );
    let e = with(&|l| names(l, "").transport_protocol = "tls".into());
    assert!(e.contains(".filter_chain_match.transport_protocol"), "{e}");
    let http = bookinfo_snapshot();
    let http: Listener = Listener::decode(
        &*http
            .resources(type_url::LISTENER)
            .unwrap()
            .get("0.0.0.0_9080")
            .unwrap()
            .body
            .value,
    )
    .unwrap();
    let e = with(&|l| l.filter_chains.push(http.filter_chains[0].clone()));
    assert!(e.contains("must be TCP proxies"), "{e}");
}

/// For random sets of server names and random ClientHello names, the chain the matcher table
/// picks is the one Envoy's lookup picks: the exact name, else the wildcard of the longest
/// suffix, walking up the labels (`*.b.c`, then `*.c`), else the chain without names.
#[test]
fn server_names_pick_what_envoys_label_walk_picks() {
    use envoy_types::pb::envoy::config::core::v3::{address, socket_address, SocketAddress};
    use envoy_types::pb::envoy::config::listener::v3::{FilterChain, FilterChainMatch};
    use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{
        tcp_proxy, TcpProxy,
    };
    let mut state = 0x5eed_u64;
    let mut next = move |n: u64| {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (state >> 33) % n
    };
    let labels = ["a", "b", "c", "xy"];
    let name = |next: &mut dyn FnMut(u64) -> u64| {
        (0..1 + next(3))
            .map(|_| labels[next(4) as usize])
            .collect::<Vec<_>>()
            .join(".")
    };
    let chain = |cluster: String, names: Vec<String>| FilterChain {
        filter_chain_match: (!names.is_empty()).then(|| FilterChainMatch {
            server_names: names,
            ..Default::default()
        }),
        filters: vec![envoy_types::pb::envoy::config::listener::v3::Filter {
            name: "envoy.filters.network.tcp_proxy".into(),
            config_type: Some(filter::ConfigType::TypedConfig(Any {
                type_url:
                    "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
                        .into(),
                value: TcpProxy {
                    stat_prefix: cluster.clone(),
                    cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(cluster)),
                    ..Default::default()
                }
                .encode_to_vec(),
            })),
        }],
        ..Default::default()
    };
    for round in 0..200 {
        // Chains of distinct names, some wildcards; half the listeners have a default chain.
        let mut taken = std::collections::HashSet::new();
        let mut chains = Vec::new();
        let mut owner = std::collections::HashMap::new();
        for c in 0..1 + next(6) {
            let mut names = Vec::new();
            for _ in 0..1 + next(3) {
                let n = name(&mut next);
                let n = if next(3) == 0 { format!("*.{n}") } else { n };
                if taken.insert(n.clone()) {
                    owner.insert(n.clone(), format!("c{c}"));
                    names.push(n);
                }
            }
            if !names.is_empty() {
                chains.push(chain(format!("c{c}"), names));
            }
        }
        let default = (round % 2 == 0).then(|| "default".to_string());
        if let Some(d) = &default {
            chains.push(chain(d.clone(), Vec::new()));
        }
        let l = Listener {
            name: "0.0.0.0_443".into(),
            address: Some(envoy_types::pb::envoy::config::core::v3::Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: "0.0.0.0".into(),
                    port_specifier: Some(socket_address::PortSpecifier::PortValue(443)),
                    ..Default::default()
                })),
            }),
            filter_chains: chains,
            ..Default::default()
        };
        let parts = hypha_proxy::compile::listener(&l.name, &l.encode_to_vec()).unwrap();
        let Some((_, Outbound::Tcp(routes))) = parts.outbound else {
            panic!("a TCP listener")
        };
        for _ in 0..50 {
            let sni = name(&mut next);
            let labels: Vec<&str> = sni.split('.').collect();
            let envoy = owner
                .get(&sni)
                .or_else(|| {
                    (1..labels.len())
                        .find_map(|i| owner.get(&format!("*.{}", labels[i..].join("."))))
                })
                .or(default.as_ref())
                .map(String::as_str);
            assert_eq!(routes.pick(Some(&sni)), envoy, "{sni} with {owner:?}");
        }
        assert_eq!(routes.pick(None), default.as_deref());
    }
}

/// A VirtualService's weighted `tcp` and `tls` routes reach the sidecar as Envoy's
/// `weighted_clusters`, and each connection picks a cluster in proportion to the weights (was:
/// 100 % to the first destination).
#[test]
fn weighted_tcp_and_tls_routes_split_connections() {
    // `api` (HTTP) only so that every resource type is sent.
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: lab}
spec:
  hosts: [api.lab.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints: [{address: 10.0.0.1}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: lab}
spec:
  hosts: [db.lab.svc.cluster.local]
  addresses: [240.0.0.2]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 5432, name: tcp, protocol: TCP}, {number: 6443, name: tls, protocol: TLS}]
  endpoints: [{address: 10.0.0.3, labels: {version: v1}}, {address: 10.0.0.4, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: db, namespace: lab}
spec:
  host: db.lab.svc.cluster.local
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: db, namespace: lab}
spec:
  hosts: [db.lab.svc.cluster.local]
  tcp:
  - match: [{port: 5432}]
    route:
    - {destination: {host: db.lab.svc.cluster.local, subset: v1}, weight: 80}
    - {destination: {host: db.lab.svc.cluster.local, subset: v2}, weight: 20}
  tls:
  - match: [{port: 6443, sniHosts: [db.lab.svc.cluster.local]}]
    route:
    - {destination: {host: db.lab.svc.cluster.local, subset: v1}, weight: 30}
    - {destination: {host: db.lab.svc.cluster.local, subset: v2}, weight: 70}
"#;
    let loaded = hypha_config::load_str("weighted.yaml", yaml);
    assert!(!loaded.has_errors(), "{:?}", loaded.diagnostics);
    let t = Translation::new(Arc::new(loaded.config), "1");
    let (refused, mut state) = compile_all(&t.snapshot(&lab_client()));
    assert!(refused.is_empty(), "{}", nack_message(&refused));
    let cfg = state.assemble().config;
    let v1 = "outbound|5432|v1|db.lab.svc.cluster.local";
    let v2 = "outbound|5432|v2|db.lab.svc.cluster.local";
    // Where 10,000 connections go.
    let split = |sni: Option<&str>, port: u16| {
        let routes = &cfg.tcp[&ListenAddr::Vip("240.0.0.2".parse().unwrap(), port)];
        let mut by = std::collections::BTreeMap::<String, usize>::new();
        for _ in 0..10_000 {
            *by.entry(routes.pick(sni).unwrap().to_owned()).or_default() += 1;
        }
        by
    };
    // 80/20: the standard deviation is 40 connections, so ±300 is far outside chance and far
    // from "100 % to the first".
    let tcp = split(None, 5432);
    assert_eq!(tcp.len(), 2, "{tcp:?}");
    assert!((7_700..=8_300).contains(&tcp[v1]), "{tcp:?}");
    assert_eq!(tcp[v1] + tcp[v2], 10_000);
    let tls = split(Some("db.lab.svc.cluster.local"), 6443);
    let tls_v2 = tls["outbound|6443|v2|db.lab.svc.cluster.local"];
    assert!(
        (6_700..=7_300).contains(&tls_v2),
        "{tls_v2} of 10,000 to v2"
    );
}
