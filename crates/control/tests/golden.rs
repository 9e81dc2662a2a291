//! Golden test: the xDS resources the example mesh gives the productpage sidecar, rendered as a
//! compact, reviewable text (`tests/golden/bookinfo-productpage.txt`). The file was reviewed by
//! hand against Istio's behaviour; regenerate with `UPDATE_GOLDEN=1` only after reviewing the
//! diff.

use std::fmt::Write;
use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::{cluster, Cluster};
use envoy_types::pb::envoy::config::core::v3::address;
use envoy_types::pb::envoy::config::endpoint::v3::{lb_endpoint, ClusterLoadAssignment};
use envoy_types::pb::envoy::config::listener::v3::{filter, Listener};
use envoy_types::pb::envoy::config::route::v3::{
    header_matcher::HeaderMatchSpecifier, redirect_action, route, route_action,
    route_match::PathSpecifier, RouteConfiguration,
};
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{fault_abort, HttpFault};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::RouteSpecifier, HttpConnectionManager,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{tcp_proxy, TcpProxy};
use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern;
use hypha_control::{ProxyInfo, Translation};
use hypha_xds::{type_url, Snapshot};
use prost::Message;

fn addr(a: &Option<envoy_types::pb::envoy::config::core::v3::Address>) -> String {
    match a.as_ref().and_then(|a| a.address.as_ref()) {
        Some(address::Address::SocketAddress(s)) => {
            let port = match s.port_specifier {
                Some(envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(p)) => p,
                _ => 0,
            };
            if s.address.contains(':') {
                format!("[{}]:{port}", s.address)
            } else {
                format!("{}:{port}", s.address)
            }
        }
        _ => "-".into(),
    }
}

fn dur(d: &Option<envoy_types::pb::google::protobuf::Duration>) -> String {
    d.as_ref().map_or("-".into(), |d| {
        format!("{}ms", d.seconds * 1000 + i64::from(d.nanos) / 1_000_000)
    })
}

fn render(snap: &Snapshot) -> String {
    let mut out = String::new();
    let each = |t: &str| snap.resources(t).into_iter().flat_map(|m| m.iter());
    writeln!(out, "# clusters").unwrap();
    for r in each(type_url::CLUSTER) {
        let c = Cluster::decode(&*r.body.value).unwrap();
        let kind = match c.cluster_discovery_type {
            Some(cluster::ClusterDiscoveryType::Type(t)) => {
                format!("{:?}", cluster::DiscoveryType::try_from(t).unwrap())
            }
            _ => "-".into(),
        };
        let lb = format!("{:?}", cluster::LbPolicy::try_from(c.lb_policy).unwrap());
        let mut line = format!(
            "{} type={kind} lb={lb} connect={}",
            c.name,
            dur(&c.connect_timeout)
        );
        if let Some(t) = c
            .circuit_breakers
            .as_ref()
            .and_then(|cb| cb.thresholds.first())
        {
            let v = |x: &Option<envoy_types::pb::google::protobuf::UInt32Value>| {
                x.as_ref().map_or("-".into(), |v| {
                    if v.value == u32::MAX {
                        "max".to_string()
                    } else {
                        v.value.to_string()
                    }
                })
            };
            write!(
                line,
                " limits(conn={} pending={} req={} retries={})",
                v(&t.max_connections),
                v(&t.max_pending_requests),
                v(&t.max_requests),
                v(&t.max_retries)
            )
            .unwrap();
        }
        if let Some(o) = &c.outlier_detection {
            write!(
                line,
                " outlier(5xx={} gw={} interval={} base={} max%={})",
                o.consecutive_5xx.as_ref().map_or(0, |v| v.value),
                o.consecutive_gateway_failure
                    .as_ref()
                    .map_or(0, |v| v.value),
                dur(&o.interval),
                dur(&o.base_ejection_time),
                o.max_ejection_percent
                    .as_ref()
                    .map_or("-".into(), |v| v.value.to_string())
            )
            .unwrap();
        }
        if let Some(opts) = c.typed_extension_protocol_options.values().next() {
            let h = envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions::decode(&*opts.value).unwrap();
            let h2 = format!("{:?}", h.upstream_protocol_options).contains("Http2ProtocolOptions");
            write!(line, " upstream={}", if h2 { "h2" } else { "http/1.1" }).unwrap();
        }
        if let Some(la) = &c.load_assignment {
            write!(line, " static={}", endpoints(la)).unwrap();
        }
        writeln!(out, "{line}").unwrap();
    }
    writeln!(out, "\n# endpoints").unwrap();
    for r in each(type_url::ENDPOINT) {
        let cla = ClusterLoadAssignment::decode(&*r.body.value).unwrap();
        writeln!(out, "{} -> {}", cla.cluster_name, endpoints(&cla)).unwrap();
    }
    writeln!(out, "\n# listeners").unwrap();
    for r in each(type_url::LISTENER) {
        let l = Listener::decode(&*r.body.value).unwrap();
        let mut addrs = vec![addr(&l.address)];
        addrs.extend(l.additional_addresses.iter().map(|a| addr(&a.address)));
        let mut line = format!("{} [{}]", l.name, addrs.join(" "));
        if l.bind_to_port.as_ref().is_some_and(|b| !b.value) {
            line.push_str(" bind=false");
        }
        if l.use_original_dst.as_ref().is_some_and(|b| b.value) {
            line.push_str(" original-dst");
        }
        if let Some(api) = l
            .api_listener
            .as_ref()
            .and_then(|a| a.api_listener.as_ref())
        {
            let h = HttpConnectionManager::decode(&*api.value).unwrap();
            write!(line, " api_listener {}", hcm_summary(&h)).unwrap();
        }
        for ch in l.filter_chains.iter().chain(l.default_filter_chain.iter()) {
            let port = ch
                .filter_chain_match
                .as_ref()
                .and_then(|m| m.destination_port.as_ref())
                .map(|p| format!("port {} ", p.value))
                .unwrap_or_default();
            for f in &ch.filters {
                let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
                    continue;
                };
                let what = if any.type_url.ends_with("HttpConnectionManager") {
                    hcm_summary(&HttpConnectionManager::decode(&*any.value).unwrap())
                } else {
                    let t = TcpProxy::decode(&*any.value).unwrap();
                    match t.cluster_specifier {
                        Some(tcp_proxy::ClusterSpecifier::Cluster(c)) => format!("tcp -> {c}"),
                        _ => "tcp -> ?".into(),
                    }
                };
                write!(line, "\n    chain {}: {port}{what}", ch.name).unwrap();
            }
        }
        writeln!(out, "{line}").unwrap();
    }
    writeln!(out, "\n# routes").unwrap();
    for r in each(type_url::ROUTE) {
        let rc = RouteConfiguration::decode(&*r.body.value).unwrap();
        render_routes(&mut out, &rc);
    }
    out
}

fn endpoints(cla: &ClusterLoadAssignment) -> String {
    let mut eps = Vec::new();
    for lle in &cla.endpoints {
        for e in &lle.lb_endpoints {
            if let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier {
                let mut a = addr(&ep.address);
                for extra in &ep.additional_addresses {
                    write!(a, "+{}", addr(&extra.address)).unwrap();
                }
                eps.push(a);
            }
        }
    }
    eps.join(", ")
}

fn hcm_summary(h: &HttpConnectionManager) -> String {
    let filters: Vec<&str> = h
        .http_filters
        .iter()
        .map(|f| f.name.rsplit('.').next().unwrap())
        .collect();
    match &h.route_specifier {
        Some(RouteSpecifier::Rds(rds)) => format!(
            "http rds={} filters={}",
            rds.route_config_name,
            filters.join(",")
        ),
        Some(RouteSpecifier::RouteConfig(rc)) => {
            let mut s = format!("http inline filters={}\n", filters.join(","));
            render_routes(&mut s, rc);
            s.trim_end().replace('\n', "\n        ")
        }
        _ => "http ?".into(),
    }
}

fn render_routes(out: &mut String, rc: &RouteConfiguration) {
    writeln!(out, "route {}", rc.name).unwrap();
    for vh in &rc.virtual_hosts {
        writeln!(out, "  vhost {} domains={}", vh.name, vh.domains.join(",")).unwrap();
        for r in &vh.routes {
            let m = r.r#match.as_ref().unwrap();
            let mut line = match &m.path_specifier {
                Some(PathSpecifier::Prefix(p)) => format!("prefix {p}"),
                Some(PathSpecifier::Path(p)) => format!("path {p}"),
                Some(PathSpecifier::SafeRegex(re)) => format!("regex {}", re.regex),
                _ => "?".into(),
            };
            for h in &m.headers {
                let v = match &h.header_match_specifier {
                    Some(HeaderMatchSpecifier::StringMatch(sm)) => match &sm.match_pattern {
                        Some(MatchPattern::Exact(e)) => format!("={e}"),
                        Some(MatchPattern::Prefix(p)) => format!("^={p}"),
                        Some(MatchPattern::SafeRegex(r)) => format!("~={}", r.regex),
                        other => format!("{other:?}"),
                    },
                    Some(HeaderMatchSpecifier::PresentMatch(_)) => " present".into(),
                    other => format!("{other:?}"),
                };
                write!(
                    line,
                    " {}{}{v}",
                    if h.invert_match { "!" } else { "" },
                    h.name
                )
                .unwrap();
            }
            let action = match &r.action {
                Some(route::Action::Route(ra)) => {
                    let target = match &ra.cluster_specifier {
                        Some(route_action::ClusterSpecifier::Cluster(c)) => c.clone(),
                        Some(route_action::ClusterSpecifier::WeightedClusters(w)) => w
                            .clusters
                            .iter()
                            .map(|c| {
                                format!("{}@{}", c.name, c.weight.as_ref().map_or(0, |v| v.value))
                            })
                            .collect::<Vec<_>>()
                            .join(" "),
                        _ => "?".into(),
                    };
                    let mut a = format!("-> {target} timeout={}", dur(&ra.timeout));
                    if let Some(rp) = &ra.retry_policy {
                        write!(
                            a,
                            " retries={}x[{}] per_try={}",
                            rp.num_retries.as_ref().map_or(0, |v| v.value),
                            rp.retry_on,
                            dur(&rp.per_try_timeout)
                        )
                        .unwrap();
                    }
                    if !ra.prefix_rewrite.is_empty() {
                        write!(a, " rewrite={}", ra.prefix_rewrite).unwrap();
                    }
                    if !ra.hash_policy.is_empty() {
                        write!(
                            a,
                            " hash={:?}",
                            ra.hash_policy[0].policy_specifier.as_ref().unwrap()
                        )
                        .unwrap();
                    }
                    a
                }
                Some(route::Action::Redirect(rd)) => {
                    let path = match &rd.path_rewrite_specifier {
                        Some(redirect_action::PathRewriteSpecifier::PathRedirect(p)) => p.clone(),
                        _ => String::new(),
                    };
                    format!(
                        "redirect {path} code={:?}",
                        redirect_action::RedirectResponseCode::try_from(rd.response_code).unwrap()
                    )
                }
                Some(route::Action::DirectResponse(d)) => format!(
                    "direct {} {:?}",
                    d.status,
                    d.body.as_ref().and_then(|b| b.specifier.as_ref())
                ),
                _ => "?".into(),
            };
            let mut extra = String::new();
            if let Some(f) = r.typed_per_filter_config.get("envoy.filters.http.fault") {
                let f = HttpFault::decode(&*f.value).unwrap();
                if let Some(d) = &f.delay {
                    write!(
                        extra,
                        " fault.delay={}@{}ppm",
                        format!("{:?}", d.fault_delay_secifier).replace(' ', ""),
                        d.percentage.as_ref().unwrap().numerator
                    )
                    .unwrap();
                }
                if let Some(a) = &f.abort {
                    if let Some(fault_abort::ErrorType::HttpStatus(s)) = a.error_type {
                        write!(
                            extra,
                            " fault.abort={s}@{}ppm",
                            a.percentage.as_ref().unwrap().numerator
                        )
                        .unwrap();
                    }
                }
            }
            for h in &r.request_headers_to_add {
                let hv = h.header.as_ref().unwrap();
                write!(extra, " +req[{}={}]", hv.key, hv.value).unwrap();
            }
            writeln!(out, "    {} | {line} {action}{extra}", r.name).unwrap();
        }
    }
}

#[test]
fn bookinfo_productpage_sidecar() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/bookinfo");
    let cfg = hypha_control::initial_config(Some(std::path::Path::new(dir))).unwrap();
    let t = Translation::new(Arc::new(cfg), "1");
    let proxy = ProxyInfo {
        id: "sidecar~10.10.0.10~productpage-v1.bookinfo~bookinfo.svc.cluster.local".into(),
        namespace: "bookinfo".into(),
        service_account: "bookinfo-productpage".into(),
        workload_name: "productpage-v1".into(),
        labels: [("app".to_string(), "productpage".to_string())].into(),
        ips: vec!["10.10.0.10".parse().unwrap()],
    };
    let got = render(&t.snapshot(&proxy));
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/bookinfo-productpage.txt"
    );
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(path, &got).unwrap();
    }
    let want = std::fs::read_to_string(path)
        .expect("golden file (UPDATE_GOLDEN=1 to create, then review)");
    assert_eq!(
        got, want,
        "xDS output changed; review, then UPDATE_GOLDEN=1"
    );
}

/// The same config translates to the same bytes, so the same resource versions: a restarted
/// control plane re-pushes nothing. (RBAC policies are a protobuf map, which prost encodes in
/// a `HashMap`'s order, different in every map.)
#[test]
fn the_same_config_translates_to_the_same_versions() {
    let rules: String = (0..8)
        .map(|i| format!("  - to: [{{operation: {{paths: [/p{i}]}}}}]\n"))
        .collect();
    let yaml = format!(
        "apiVersion: hypha.dev/v1alpha1
kind: MeshConfig
metadata: {{name: m}}
spec: {{trustDomain: cluster.local}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: web, namespace: shop}}
spec:
  hosts: [web.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}, {{number: 90, name: tcp, protocol: TCP}}]
  workloadSelector: {{labels: {{app: web}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: web-1, namespace: shop}}
spec: {{address: 10.0.0.1, serviceAccount: web, labels: {{app: web}}}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: many, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  rules:
{rules}---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-some, namespace: shop}}
spec:
  action: DENY
  rules:
{rules}"
    );
    let loaded = hypha_config::load_str("mesh.yaml", &yaml);
    assert!(!loaded.has_errors(), "{:?}", loaded.diagnostics);
    let proxy = ProxyInfo {
        id: "sidecar~10.0.0.1~web-1.shop~shop.svc.cluster.local".into(),
        namespace: "shop".into(),
        service_account: "web".into(),
        workload_name: "web-1".into(),
        labels: [("app".to_string(), "web".to_string())].into(),
        ips: vec!["10.0.0.1".parse().unwrap()],
    };
    let versions = || {
        let t = Translation::new(Arc::new(loaded.config.clone()), "1");
        let snap = t.snapshot(&proxy);
        let mut out: Vec<(String, String, String)> = Vec::new();
        for type_url in [type_url::LISTENER, type_url::CLUSTER, type_url::ROUTE] {
            for r in snap
                .resources(type_url)
                .into_iter()
                .flat_map(|rs| rs.iter())
            {
                out.push((type_url.to_owned(), r.name.clone(), r.version.clone()));
            }
        }
        out.sort();
        out
    };
    let first = versions();
    assert!(first.iter().any(|(_, name, _)| name == "virtualInbound"));
    for _ in 0..3 {
        assert_eq!(versions(), first);
    }
}
