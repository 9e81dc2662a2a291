//! VirtualService → Envoy routes: matches (uri, headers, method, authority, scheme, query),
//! weighted destinations, rewrite, redirect, direct response, timeout, retries, fault
//! injection and header manipulation, in the VirtualService's order (first match wins).

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::{
    data_source, header_value_option::HeaderAppendAction, DataSource, HeaderValue,
    HeaderValueOption,
};
use envoy_types::pb::envoy::config::route::v3::{
    header_matcher::HeaderMatchSpecifier, query_parameter_matcher::QueryParameterMatchSpecifier,
    redirect_action, route, route_action, route_match::PathSpecifier,
    weighted_cluster::ClusterWeight, DirectResponseAction, HeaderMatcher, QueryParameterMatcher,
    RedirectAction, RetryPolicy, Route, RouteAction, RouteMatch, WeightedCluster,
};
use envoy_types::pb::envoy::extensions::filters::common::fault::v3::{
    fault_delay::FaultDelaySecifier, FaultDelay,
};
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{
    fault_abort::ErrorType, FaultAbort, HttpFault,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    string_matcher::MatchPattern, RegexMatchAndSubstitute,
};
use hypha_config::networking::{
    Destination, HeaderOperations, Headers, HttpMatchRequest, HttpRoute, StringMatch,
    StringMatchKind, VirtualService,
};
use hypha_config::Resource;

use crate::envoy::{self, any, boolv, duration, u32v};
use crate::translate::Outbound;
use hypha_xds::ProxyInfo;

/// Istio's default retry policy, used when a route says nothing about retries.
const DEFAULT_RETRY_ON: &str =
    "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes";

/// The routes of one virtual host: the VirtualService's HTTP routes that apply to `port` and to
/// this proxy, in order; or a single default route to the service when there is no
/// VirtualService.
pub(crate) fn http_routes(
    ctx: &Outbound<'_>,
    proxy: &ProxyInfo,
    vs: Option<&Resource<VirtualService>>,
    host: &str,
    port: u32,
) -> Vec<Route> {
    let Some(vs) = vs else {
        let mut route = catch_all("default", ctx.cluster_for(host, port, None));
        if let Some(route::Action::Route(ra)) = &mut route.action {
            ra.retry_policy = Some(retry(None));
            ra.hash_policy = ctx.hash_policy(host, port, None);
        }
        return vec![route];
    };
    let mut out = Vec::new();
    for (i, r) in vs.spec.http.iter().enumerate() {
        let name = r
            .name
            .clone()
            .unwrap_or_else(|| format!("{}.{}.{i}", vs.namespace, vs.name));
        let matches: Vec<Option<&HttpMatchRequest>> = if r.matches.is_empty() {
            vec![None]
        } else {
            r.matches.iter().map(Some).collect()
        };
        for m in matches {
            if let Some(m) = m {
                if m.port.is_some_and(|p| p != port)
                    || !hypha_config::types::labels_match(&m.source_labels, &proxy.labels)
                    || m.source_namespace
                        .as_ref()
                        .is_some_and(|ns| *ns != proxy.namespace)
                {
                    continue;
                }
            }
            let Some(action) = action(ctx, &vs.namespace, r, port) else {
                continue; // every destination weighted 0
            };
            let mut route = Route {
                name: name.clone(),
                r#match: Some(m.map_or_else(|| prefix_match("/"), route_match)),
                action: Some(action),
                ..Default::default()
            };
            if let Some(h) = &r.headers {
                apply_headers(h, &mut route);
            }
            // A single destination's headers apply to the whole route.
            let live: Vec<_> = r.route.iter().filter(|d| d.weight != Some(0)).collect();
            if let [only] = live.as_slice() {
                if let Some(h) = &only.headers {
                    apply_headers(h, &mut route);
                }
            }
            if let Some(fault) = &r.fault {
                route
                    .typed_per_filter_config
                    .insert(envoy::FAULT.to_string(), any(&http_fault(fault)));
            }
            out.push(route);
        }
    }
    out
}

/// A route sending everything to `cluster`, with no route timeout (Istio's default).
pub(crate) fn catch_all(name: &str, cluster: String) -> Route {
    Route {
        name: name.to_string(),
        r#match: Some(prefix_match("/")),
        action: Some(route::Action::Route(RouteAction {
            cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster)),
            timeout: Some(envoy::secs(0)),
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn prefix_match(p: &str) -> RouteMatch {
    RouteMatch {
        path_specifier: Some(PathSpecifier::Prefix(p.to_string())),
        ..Default::default()
    }
}

fn route_match(m: &HttpMatchRequest) -> RouteMatch {
    let path_specifier = match m.uri.as_ref().map(StringMatch::kind) {
        Some(StringMatchKind::Exact(p)) => PathSpecifier::Path(p.to_string()),
        Some(StringMatchKind::Prefix(p)) => PathSpecifier::Prefix(p.to_string()),
        Some(StringMatchKind::Regex(r)) => PathSpecifier::SafeRegex(envoy::regex(r)),
        Some(StringMatchKind::Present) | None => PathSpecifier::Prefix("/".into()),
    };
    let mut headers = Vec::new();
    for (name, sm) in [
        (":method", &m.method),
        (":authority", &m.authority),
        (":scheme", &m.scheme),
    ] {
        if let Some(sm) = sm {
            headers.push(header_matcher(name, sm, false));
        }
    }
    headers.extend(m.headers.iter().map(|(n, sm)| header_matcher(n, sm, false)));
    headers.extend(
        m.without_headers
            .iter()
            .map(|(n, sm)| header_matcher(n, sm, true)),
    );
    let query_parameters = m
        .query_params
        .iter()
        .map(|(name, sm)| QueryParameterMatcher {
            name: name.clone(),
            query_parameter_match_specifier: Some(match sm.kind() {
                StringMatchKind::Present => QueryParameterMatchSpecifier::PresentMatch(true),
                k => QueryParameterMatchSpecifier::StringMatch(envoy::string_matcher(pattern(&k))),
            }),
        })
        .collect();
    RouteMatch {
        path_specifier: Some(path_specifier),
        case_sensitive: m.ignore_uri_case.then(|| boolv(false)),
        headers,
        query_parameters,
        ..Default::default()
    }
}

fn pattern(k: &StringMatchKind<'_>) -> MatchPattern {
    match k {
        StringMatchKind::Exact(s) => MatchPattern::Exact(s.to_string()),
        StringMatchKind::Prefix(s) => MatchPattern::Prefix(s.to_string()),
        StringMatchKind::Regex(r) => MatchPattern::SafeRegex(envoy::regex(r)),
        StringMatchKind::Present => MatchPattern::SafeRegex(envoy::regex(".*")),
    }
}

fn header_matcher(name: &str, sm: &StringMatch, invert: bool) -> HeaderMatcher {
    let spec = match sm.kind() {
        StringMatchKind::Present => HeaderMatchSpecifier::PresentMatch(true),
        k => HeaderMatchSpecifier::StringMatch(envoy::string_matcher(pattern(&k))),
    };
    HeaderMatcher {
        name: name.to_string(),
        invert_match: invert,
        header_match_specifier: Some(spec),
        ..Default::default()
    }
}

fn action(ctx: &Outbound<'_>, vs_ns: &str, r: &HttpRoute, port: u32) -> Option<route::Action> {
    if let Some(d) = &r.direct_response {
        return Some(route::Action::DirectResponse(DirectResponseAction {
            status: d.status,
            body: d.body.as_ref().map(|b| DataSource {
                specifier: Some(match (&b.string, &b.bytes) {
                    (Some(s), _) => data_source::Specifier::InlineString(s.clone()),
                    (None, b) => data_source::Specifier::InlineBytes(decode_base64(
                        b.as_deref().unwrap_or(""),
                    )),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }));
    }
    if let Some(rd) = &r.redirect {
        let response_code = match rd.redirect_code.unwrap_or(301) {
            302 => redirect_action::RedirectResponseCode::Found,
            303 => redirect_action::RedirectResponseCode::SeeOther,
            307 => redirect_action::RedirectResponseCode::TemporaryRedirect,
            308 => redirect_action::RedirectResponseCode::PermanentRedirect,
            _ => redirect_action::RedirectResponseCode::MovedPermanently,
        };
        return Some(route::Action::Redirect(RedirectAction {
            host_redirect: rd.authority.clone().unwrap_or_default(),
            port_redirect: rd.port.unwrap_or(0),
            response_code: response_code as i32,
            scheme_rewrite_specifier: rd
                .scheme
                .clone()
                .map(redirect_action::SchemeRewriteSpecifier::SchemeRedirect),
            path_rewrite_specifier: rd
                .uri
                .clone()
                .map(redirect_action::PathRewriteSpecifier::PathRedirect),
            ..Default::default()
        }));
    }
    // Istio drops zero-weight destinations; a route whose weights are all zero has nowhere to go.
    let dests: Vec<_> = r.route.iter().filter(|d| d.weight != Some(0)).collect();
    if dests.is_empty() {
        return None;
    }
    let first_host = ctx.cfg.resolve_host(&dests[0].destination.host, vs_ns);
    let cluster_specifier = if dests.len() == 1 {
        route_action::ClusterSpecifier::Cluster(destination_cluster(
            ctx,
            vs_ns,
            &dests[0].destination,
            port,
        ))
    } else {
        route_action::ClusterSpecifier::WeightedClusters(WeightedCluster {
            clusters: dests
                .iter()
                .map(|d| {
                    let mut cw = ClusterWeight {
                        name: destination_cluster(ctx, vs_ns, &d.destination, port),
                        weight: Some(u32v(u32::try_from(d.weight.unwrap_or(0)).unwrap_or(0))),
                        ..Default::default()
                    };
                    if let Some(h) = &d.headers {
                        let (add, remove) = header_ops(h.request.as_ref());
                        cw.request_headers_to_add = add;
                        cw.request_headers_to_remove = remove;
                        let (add, remove) = header_ops(h.response.as_ref());
                        cw.response_headers_to_add = add;
                        cw.response_headers_to_remove = remove;
                    }
                    cw
                })
                .collect(),
            ..Default::default()
        })
    };
    let mut ra = RouteAction {
        cluster_specifier: Some(cluster_specifier),
        // Istio's default: no route timeout unless the VirtualService sets one.
        timeout: Some(
            r.timeout
                .map_or_else(|| envoy::secs(0), |t| duration(t.as_std())),
        ),
        retry_policy: match &r.retries {
            Some(rt) if rt.attempts == 0 => None,
            rt => Some(retry(rt.as_ref())),
        },
        hash_policy: ctx.hash_policy(
            &first_host,
            dest_port(
                ctx,
                &first_host,
                dests[0].destination.port.map(|p| p.number),
                port,
            ),
            dests[0].destination.subset.as_deref(),
        ),
        ..Default::default()
    };
    if let Some(rw) = &r.rewrite {
        if let Some(uri) = &rw.uri {
            ra.prefix_rewrite = uri.clone();
        }
        if let Some(rr) = &rw.uri_regex_rewrite {
            ra.regex_rewrite = Some(RegexMatchAndSubstitute {
                pattern: Some(envoy::regex(&rr.pattern)),
                substitution: rr.rewrite.clone(),
            });
        }
        if let Some(a) = &rw.authority {
            ra.host_rewrite_specifier = Some(
                route_action::HostRewriteSpecifier::HostRewriteLiteral(a.clone()),
            );
        }
    }
    Some(route::Action::Route(ra))
}

fn dest_port(ctx: &Outbound<'_>, host: &str, explicit: Option<u32>, listener_port: u32) -> u32 {
    explicit.unwrap_or_else(|| match ctx.service(host) {
        Some(s) if s.ports.len() == 1 => s.ports[0].number,
        _ => listener_port,
    })
}

fn destination_cluster(
    ctx: &Outbound<'_>,
    vs_ns: &str,
    d: &Destination,
    listener_port: u32,
) -> String {
    let host = ctx.cfg.resolve_host(&d.host, vs_ns);
    let port = dest_port(ctx, &host, d.port.map(|p| p.number), listener_port);
    ctx.cluster_for(&host, port, d.subset.as_deref())
}

fn retry(r: Option<&hypha_config::networking::HttpRetry>) -> RetryPolicy {
    let (attempts, retry_on, per_try) = match r {
        Some(r) => (
            u32::try_from(r.attempts).unwrap_or(0),
            r.retry_on
                .clone()
                .unwrap_or_else(|| DEFAULT_RETRY_ON.to_string()),
            r.per_try_timeout,
        ),
        None => (2, DEFAULT_RETRY_ON.to_string(), None),
    };
    let mut conditions = Vec::new();
    let mut codes = Vec::new();
    for c in retry_on.split(',').map(str::trim).filter(|c| !c.is_empty()) {
        match c.parse::<u32>() {
            Ok(code) => codes.push(code),
            Err(_) => conditions.push(c),
        }
    }
    if r.is_none() {
        codes.push(503);
    }
    if !codes.is_empty() && !conditions.contains(&"retriable-status-codes") {
        conditions.push("retriable-status-codes");
    }
    RetryPolicy {
        retry_on: conditions.join(","),
        num_retries: Some(u32v(attempts)),
        per_try_timeout: per_try.map(|d| duration(d.as_std())),
        retriable_status_codes: codes,
        host_selection_retry_max_attempts: 5,
        ..Default::default()
    }
}

fn http_fault(f: &hypha_config::networking::HttpFaultInjection) -> HttpFault {
    HttpFault {
        delay: f.delay.as_ref().and_then(|d| {
            let pct = d
                .percentage
                .map(|p| p.value)
                .or(d.percent.map(|p| p as f64))
                .unwrap_or(100.0);
            Some(FaultDelay {
                percentage: Some(envoy::percent(pct)),
                fault_delay_secifier: Some(FaultDelaySecifier::FixedDelay(duration(
                    d.fixed_delay?.as_std(),
                ))),
            })
        }),
        abort: f.abort.as_ref().and_then(|a| {
            let error_type = if let Some(s) = a.http_status {
                ErrorType::HttpStatus(u32::try_from(s).ok()?)
            } else {
                ErrorType::GrpcStatus(hypha_config::grpc_code(a.grpc_status.as_deref()?)?)
            };
            Some(FaultAbort {
                percentage: Some(envoy::percent(a.percentage.map_or(100.0, |p| p.value))),
                error_type: Some(error_type),
                ..Default::default()
            })
        }),
        ..Default::default()
    }
}

fn header_ops(op: Option<&HeaderOperations>) -> (Vec<HeaderValueOption>, Vec<String>) {
    let Some(op) = op else {
        return (Vec::new(), Vec::new());
    };
    let opt = |(k, v): (&String, &String), action: HeaderAppendAction| HeaderValueOption {
        header: Some(HeaderValue {
            key: k.clone(),
            value: v.clone(),
            ..Default::default()
        }),
        append_action: action as i32,
        ..Default::default()
    };
    let mut add: Vec<HeaderValueOption> = op
        .set
        .iter()
        .map(|kv| opt(kv, HeaderAppendAction::OverwriteIfExistsOrAdd))
        .collect();
    add.extend(
        op.add
            .iter()
            .map(|kv| opt(kv, HeaderAppendAction::AppendIfExistsOrAdd)),
    );
    (add, op.remove.clone())
}

fn apply_headers(h: &Headers, route: &mut Route) {
    let (add, remove) = header_ops(h.request.as_ref());
    route.request_headers_to_add.extend(add);
    route.request_headers_to_remove.extend(remove);
    let (add, remove) = header_ops(h.response.as_ref());
    route.response_headers_to_add.extend(add);
    route.response_headers_to_remove.extend(remove);
}

fn decode_base64(s: &str) -> Vec<u8> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter_map(val) {
        acc = (acc << 6) | c;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// Labels → a stable key, for caching per-label route tables.
pub(crate) fn labels_key(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64() {
        assert_eq!(decode_base64("aGVsbG8="), b"hello");
        assert_eq!(decode_base64(""), b"");
    }
}
