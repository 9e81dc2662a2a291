//! VirtualService: hosts, HTTP/TLS/TCP routes with their matches, destinations and actions.

use std::collections::BTreeMap;

use super::{grpc_code, host_covers, is_host, is_valid_cidr, port, Validator};
use crate::diag::{Diagnostics, Source};
use crate::networking::{
    Destination, HeaderOperations, Headers, HttpRoute, RouteDestination, StringMatch,
    StringMatchKind,
};
use crate::types::Percent;
use crate::Resource;

impl Validator<'_> {
    fn destination(
        &self,
        src: &Source,
        ns: &str,
        path: &str,
        d: &Destination,
        diags: &mut Diagnostics,
    ) {
        let host = self.cfg.resolve_host(&d.host, ns);
        let Some(ports) = self.service_ports(&host) else {
            diags.error(
                "unknown-host",
                src,
                format!("{path}.host"),
                format!("host {:?} ({host}) matches no ServiceEntry", d.host),
            );
            return;
        };
        if let Some(subset) = &d.subset {
            let known = self
                .subsets_of(&host)
                .is_some_and(|s| s.contains(subset.as_str()));
            if !known {
                diags.error(
                    "unknown-subset",
                    src,
                    format!("{path}.subset"),
                    format!("subset {subset:?} is not defined by any DestinationRule for {host}"),
                );
            }
        }
        if let Some(p) = &d.port {
            let pp = format!("{path}.port.number");
            if port(src, &pp, p.number, diags) && !ports.contains(&p.number) {
                diags.error(
                    "unknown-port",
                    src,
                    pp,
                    format!("{host} has no port {}", p.number),
                );
            }
        }
    }

    pub(super) fn virtual_service(
        &self,
        r: &Resource<crate::networking::VirtualService>,
        diags: &mut Diagnostics,
    ) {
        let (s, src, ns) = (&r.spec, &r.source, r.namespace.as_str());
        if s.hosts.is_empty() {
            diags.error(
                "missing-field",
                src,
                "spec.hosts",
                "at least one host is required",
            );
        }
        for (i, h) in s.hosts.iter().enumerate() {
            if !is_host(h) {
                diags.error(
                    "invalid-host",
                    src,
                    format!("spec.hosts[{i}]"),
                    format!("{h:?} is not a valid host name"),
                );
            }
        }
        if s.gateways.iter().any(|g| g != "mesh") {
            diags.warning(
                "unsupported",
                src,
                "spec.gateways",
                "gateways other than `mesh` are not supported by Hypha yet; only sidecars apply this",
            );
        }
        if s.http.is_empty() && s.tcp.is_empty() && s.tls.is_empty() {
            diags.error(
                "missing-field",
                src,
                "spec",
                "one of `http`, `tcp` or `tls` is required",
            );
        }
        for (i, route) in s.http.iter().enumerate() {
            self.http_route(src, ns, &format!("spec.http[{i}]"), route, diags);
        }
        for (i, t) in s.tls.iter().enumerate() {
            let path = format!("spec.tls[{i}]");
            if t.matches.is_empty() {
                diags.error(
                    "missing-field",
                    src,
                    format!("{path}.match"),
                    "a TLS route needs at least one match with `sniHosts`",
                );
            }
            for (j, m) in t.matches.iter().enumerate() {
                let mp = format!("{path}.match[{j}]");
                if m.sni_hosts.is_empty() {
                    diags.error(
                        "missing-field",
                        src,
                        format!("{mp}.sniHosts"),
                        "at least one server name is required",
                    );
                }
                for (k, h) in m.sni_hosts.iter().enumerate() {
                    let at = format!("{mp}.sniHosts[{k}]");
                    if h == "*" || !is_host(h) {
                        diags.error(
                            "invalid-host",
                            src,
                            at,
                            format!("{h:?} is not a server name (a DNS name, or `*.` and one)"),
                        );
                    } else if !s.hosts.iter().any(|vh| {
                        host_covers(
                            &self.cfg.resolve_host(vh, ns),
                            &self.cfg.resolve_host(h, ns),
                        )
                    }) {
                        diags.error(
                            "sni-host",
                            src,
                            at,
                            format!("server name {h:?} is not one of the VirtualService's hosts"),
                        );
                    }
                }
                self.l4_match(
                    src,
                    &mp,
                    (m.port, &m.destination_subnets),
                    (&m.source_labels, m.source_namespace.is_some(), &m.gateways),
                    diags,
                );
            }
            self.l4_route(src, ns, &path, &t.route, diags);
        }
        for (i, t) in s.tcp.iter().enumerate() {
            let path = format!("spec.tcp[{i}]");
            for (j, m) in t.matches.iter().enumerate() {
                self.l4_match(
                    src,
                    &format!("{path}.match[{j}]"),
                    (m.port, &m.destination_subnets),
                    (&m.source_labels, m.source_namespace.is_some(), &m.gateways),
                    diags,
                );
            }
            self.l4_route(src, ns, &path, &t.route, diags);
        }
    }

    /// The parts of a TCP or TLS route's match that are checked the same way: the port and the
    /// destination subnets (checked), and what sidecars do not select on yet (warned).
    fn l4_match(
        &self,
        src: &Source,
        path: &str,
        (port_number, subnets): (Option<u32>, &[String]),
        (labels, source_namespace, gateways): (&BTreeMap<String, String>, bool, &[String]),
        diags: &mut Diagnostics,
    ) {
        for (k, c) in subnets.iter().enumerate() {
            if !is_valid_cidr(c) {
                diags.error(
                    "invalid-cidr",
                    src,
                    format!("{path}.destinationSubnets[{k}]"),
                    format!("{c:?} is not an IPv4/IPv6 address or CIDR"),
                );
            }
        }
        if let Some(p) = port_number {
            port(src, &format!("{path}.port"), p, diags);
        }
        let unsupported = [
            ("destinationSubnets", !subnets.is_empty()),
            ("sourceLabels", !labels.is_empty()),
            ("sourceNamespace", source_namespace),
            ("gateways", gateways.iter().any(|g| g != "mesh")),
        ];
        for (field, set) in unsupported {
            if set {
                diags.warning(
                    "unsupported",
                    src,
                    format!("{path}.{field}"),
                    format!("`{field}` on a TCP or TLS match is not supported by Hypha yet; the match applies without it"),
                );
            }
        }
    }

    /// A TCP or TLS route's destinations.
    fn l4_route(
        &self,
        src: &Source,
        ns: &str,
        path: &str,
        route: &[RouteDestination],
        diags: &mut Diagnostics,
    ) {
        if route.is_empty() {
            diags.error(
                "missing-field",
                src,
                format!("{path}.route"),
                "at least one destination is required",
            );
        }
        let weights: Vec<Option<i64>> = route.iter().map(|d| d.weight).collect();
        self.weights(src, path, &weights, diags);
        for (j, d) in route.iter().enumerate() {
            self.destination(
                src,
                ns,
                &format!("{path}.route[{j}].destination"),
                &d.destination,
                diags,
            );
        }
    }

    fn weights(&self, src: &Source, path: &str, weights: &[Option<i64>], diags: &mut Diagnostics) {
        let mut bad = false;
        for (j, w) in weights.iter().enumerate() {
            if let Some(w) = *w {
                if !(0..=100).contains(&w) {
                    bad = true;
                    diags.error(
                        "invalid-weight",
                        src,
                        format!("{path}.route[{j}].weight"),
                        format!("weight {w} is outside 0..100"),
                    );
                }
            }
        }
        if weights.len() > 1 && !bad {
            let sum: i64 = weights.iter().map(|w| w.unwrap_or(0)).sum();
            if sum != 100 {
                let last = weights.len() - 1;
                diags.error(
                    "weights-sum",
                    src,
                    format!("{path}.route[{last}].weight"),
                    format!("route weights sum to {sum}, not 100"),
                );
            }
        }
    }

    fn http_route(
        &self,
        src: &Source,
        ns: &str,
        path: &str,
        r: &HttpRoute,
        diags: &mut Diagnostics,
    ) {
        let actions = usize::from(!r.route.is_empty())
            + usize::from(r.redirect.is_some())
            + usize::from(r.direct_response.is_some())
            + usize::from(r.delegate.is_some());
        if actions != 1 {
            diags.error(
                "route-action",
                src,
                path,
                "exactly one of `route`, `redirect`, `directResponse` or `delegate` is required",
            );
        }
        let unsupported = [
            ("delegate", r.delegate.is_some()),
            ("mirror", r.mirror.is_some()),
            ("mirrors", r.mirrors.is_some()),
            ("mirrorPercentage", r.mirror_percentage.is_some()),
            ("mirrorPercent", r.mirror_percent.is_some()),
            ("corsPolicy", r.cors_policy.is_some()),
        ];
        for (field, set) in unsupported {
            if set {
                diags.warning(
                    "unsupported",
                    src,
                    format!("{path}.{field}"),
                    format!("`{field}` is not supported by Hypha yet; ignored"),
                );
            }
        }
        for (j, m) in r.matches.iter().enumerate() {
            let mp = format!("{path}.match[{j}]");
            for (field, sm) in [
                ("uri", &m.uri),
                ("scheme", &m.scheme),
                ("method", &m.method),
                ("authority", &m.authority),
            ] {
                if let Some(sm) = sm {
                    string_match(src, &format!("{mp}.{field}"), sm, false, diags);
                }
            }
            for (field, map) in [
                ("headers", &m.headers),
                ("withoutHeaders", &m.without_headers),
            ] {
                for (name, sm) in map {
                    let hp = format!("{mp}.{field}.{name}");
                    header_name(src, &hp, name, diags);
                    string_match(src, &hp, sm, true, diags);
                }
            }
            for (name, sm) in &m.query_params {
                let qp = format!("{mp}.queryParams.{name}");
                string_match(src, &qp, sm, false, diags);
                if sm.prefix.is_some() {
                    diags.error(
                        "invalid-match",
                        src,
                        qp,
                        "query parameters match by `exact` or `regex` only",
                    );
                }
            }
            if let Some(p) = m.port {
                port(src, &format!("{mp}.port"), p, diags);
            }
            super::destination_rule::ignored(
                src,
                &mp,
                &[("statPrefix", m.stat_prefix.is_some())],
                diags,
            );
            if !m.gateways.is_empty() {
                diags.warning(
                    "unsupported",
                    src,
                    format!("{mp}.gateways"),
                    "gateway matches are not supported by Hypha yet",
                );
            }
        }
        let weights: Vec<Option<i64>> = r.route.iter().map(|d| d.weight).collect();
        self.weights(src, path, &weights, diags);
        for (j, d) in r.route.iter().enumerate() {
            let dp = format!("{path}.route[{j}]");
            self.destination(src, ns, &format!("{dp}.destination"), &d.destination, diags);
            if let Some(h) = &d.headers {
                headers(src, &format!("{dp}.headers"), h, diags);
            }
        }
        if let Some(h) = &r.headers {
            headers(src, &format!("{path}.headers"), h, diags);
        }
        if let Some(rd) = &r.redirect {
            let rp = format!("{path}.redirect");
            if let Some(code) = rd.redirect_code {
                if ![301, 302, 303, 307, 308].contains(&code) {
                    diags.error(
                        "invalid-value",
                        src,
                        format!("{rp}.redirectCode"),
                        format!("redirect code {code} is not one of 301, 302, 303, 307, 308"),
                    );
                }
            }
            if let Some(p) = rd.port {
                port(src, &format!("{rp}.port"), p, diags);
            }
            if let Some(dp) = &rd.derive_port {
                super::destination_rule::ignored(src, &rp, &[("derivePort", true)], diags);
                if dp != "FROM_PROTOCOL_DEFAULT" && dp != "FROM_REQUEST_PORT" {
                    diags.error(
                        "invalid-value",
                        src,
                        format!("{rp}.derivePort"),
                        format!(
                            "derivePort {dp:?} is not FROM_PROTOCOL_DEFAULT or FROM_REQUEST_PORT"
                        ),
                    );
                }
                if rd.port.is_some() {
                    diags.error(
                        "exclusive-fields",
                        src,
                        format!("{rp}.derivePort"),
                        "only one of `port` and `derivePort` may be set",
                    );
                }
            }
            if let Some(s) = &rd.scheme {
                if s != "http" && s != "https" {
                    diags.error(
                        "invalid-value",
                        src,
                        format!("{rp}.scheme"),
                        format!("scheme {s:?} is not http or https"),
                    );
                }
            }
        }
        if let Some(dr) = &r.direct_response {
            let dp = format!("{path}.directResponse");
            if !(200..=599).contains(&dr.status) {
                diags.error(
                    "invalid-status",
                    src,
                    format!("{dp}.status"),
                    format!("status {} is outside 200..599", dr.status),
                );
            }
            if let Some(b) = &dr.body {
                if b.string.is_some() == b.bytes.is_some() {
                    diags.error(
                        "exclusive-fields",
                        src,
                        format!("{dp}.body"),
                        "exactly one of `string` and `bytes` is required",
                    );
                }
                if let Some(bytes) = &b.bytes {
                    if !is_base64(bytes) {
                        diags.error(
                            "invalid-value",
                            src,
                            format!("{dp}.body.bytes"),
                            "`bytes` must be base64",
                        );
                    }
                }
            }
        }
        if let Some(rw) = &r.rewrite {
            let rp = format!("{path}.rewrite");
            if rw.uri.is_some() && rw.uri_regex_rewrite.is_some() {
                diags.error(
                    "exclusive-fields",
                    src,
                    format!("{rp}.uriRegexRewrite"),
                    "only one of `uri` and `uriRegexRewrite` may be set",
                );
            }
            if let Some(rr) = &rw.uri_regex_rewrite {
                rewrite_regex(
                    src,
                    &format!("{rp}.uriRegexRewrite.match"),
                    &rr.pattern,
                    diags,
                );
            }
            if r.redirect.is_some() {
                diags.error(
                    "exclusive-fields",
                    src,
                    rp,
                    "`rewrite` cannot be used with `redirect`",
                );
            }
        }
        if let Some(rt) = &r.retries {
            let rp = format!("{path}.retries");
            super::destination_rule::ignored(
                src,
                &rp,
                &[(
                    "retryRemoteLocalities",
                    rt.retry_remote_localities.is_some(),
                )],
                diags,
            );
            if rt.attempts < 0 {
                diags.error(
                    "invalid-value",
                    src,
                    format!("{rp}.attempts"),
                    "attempts must not be negative",
                );
            }
            if let Some(on) = &rt.retry_on {
                for cond in on.split(',').map(str::trim) {
                    if !is_retry_on(cond) {
                        diags.error(
                            "invalid-retry-on",
                            src,
                            format!("{rp}.retryOn"),
                            format!("unknown retry condition {cond:?}"),
                        );
                    }
                }
            }
            if let (Some(per_try), Some(total)) = (rt.per_try_timeout, r.timeout) {
                if !total.as_std().is_zero() && per_try > total {
                    diags.warning(
                        "timeouts",
                        src,
                        format!("{rp}.perTryTimeout"),
                        "perTryTimeout is longer than the route timeout",
                    );
                }
            }
        }
        if let Some(f) = &r.fault {
            let fp = format!("{path}.fault");
            if let Some(d) = &f.delay {
                if d.fixed_delay.is_none() {
                    diags.error(
                        "missing-field",
                        src,
                        format!("{fp}.delay"),
                        "`fixedDelay` is required",
                    );
                }
                if d.exponential_delay.is_some() {
                    diags.warning(
                        "unsupported",
                        src,
                        format!("{fp}.delay.exponentialDelay"),
                        "exponentialDelay is not supported; ignored",
                    );
                }
                percent(src, &format!("{fp}.delay.percentage"), d.percentage, diags);
                if let Some(p) = d.percent {
                    if !(0..=100).contains(&p) {
                        diags.error(
                            "invalid-percent",
                            src,
                            format!("{fp}.delay.percent"),
                            format!("percent {p} is outside 0..100"),
                        );
                    }
                }
            }
            if let Some(a) = &f.abort {
                let ap = format!("{fp}.abort");
                let kinds = usize::from(a.http_status.is_some())
                    + usize::from(a.grpc_status.is_some())
                    + usize::from(a.http2_error.is_some());
                if kinds != 1 {
                    diags.error(
                        "exclusive-fields",
                        src,
                        &ap,
                        "exactly one of `httpStatus`, `grpcStatus` or `http2Error` is required",
                    );
                }
                if let Some(s) = a.http_status {
                    if !(200..=599).contains(&s) {
                        diags.error(
                            "invalid-status",
                            src,
                            format!("{ap}.httpStatus"),
                            format!("status {s} is outside 200..599"),
                        );
                    }
                }
                if let Some(g) = &a.grpc_status {
                    if grpc_code(g).is_none() {
                        diags.error(
                            "invalid-value",
                            src,
                            format!("{ap}.grpcStatus"),
                            format!("unknown gRPC status {g:?}"),
                        );
                    }
                }
                if a.http2_error.is_some() {
                    diags.warning(
                        "unsupported",
                        src,
                        format!("{ap}.http2Error"),
                        "http2Error aborts are not supported; ignored",
                    );
                }
                percent(src, &format!("{ap}.percentage"), a.percentage, diags);
            }
        }
    }
}

fn headers(src: &Source, path: &str, h: &Headers, diags: &mut Diagnostics) {
    let ops: [(&str, &Option<HeaderOperations>); 2] =
        [("request", &h.request), ("response", &h.response)];
    for (dir, op) in ops {
        let Some(op) = op else { continue };
        let names: BTreeMap<&str, ()> = op
            .set
            .keys()
            .chain(op.add.keys())
            .chain(op.remove.iter())
            .map(|k| (k.as_str(), ()))
            .collect();
        for name in names.keys() {
            if !is_header_name(name) {
                diags.error(
                    "invalid-header",
                    src,
                    format!("{path}.{dir}"),
                    format!("{name:?} is not a valid header name"),
                );
            }
        }
    }
}

fn header_name(src: &Source, path: &str, name: &str, diags: &mut Diagnostics) {
    if !is_header_name(name) || name.chars().any(|c| c.is_ascii_uppercase()) {
        diags.error(
            "invalid-header",
            src,
            path,
            format!("header name {name:?} must be a lowercase HTTP token"),
        );
    }
}

fn string_match(
    src: &Source,
    path: &str,
    m: &StringMatch,
    empty_ok: bool,
    diags: &mut Diagnostics,
) {
    match m.set_count() {
        0 if !empty_ok => diags.error(
            "invalid-match",
            src,
            path,
            "one of `exact`, `prefix` or `regex` is required",
        ),
        0 | 1 => {}
        _ => diags.error(
            "invalid-match",
            src,
            path,
            "only one of `exact`, `prefix` or `regex` may be set",
        ),
    }
    if let StringMatchKind::Regex(r) = m.kind() {
        regex(src, &format!("{path}.regex"), r, diags);
    }
}

/// A match regex: checked by the proxy's matcher itself (`hypha-matcher`, RE2 semantics and
/// size limits), so a pattern that passes here is not refused by the proxy, and the reverse.
fn regex(src: &Source, path: &str, pattern: &str, diags: &mut Diagnostics) {
    if let Err(e) = hypha_matcher::check_regex(pattern) {
        let last = e.lines().last().unwrap_or("").trim().to_string();
        diags.error(
            "invalid-regex",
            src,
            path,
            format!("regex {pattern:?} does not compile (RE2 syntax): {last}"),
        );
    }
}

/// A rewrite regex: the proxy compiles it with the `regex` crate's defaults, and so does this.
fn rewrite_regex(src: &Source, path: &str, pattern: &str, diags: &mut Diagnostics) {
    if let Err(e) = regex::Regex::new(pattern) {
        let detail = e.to_string();
        let last = detail.lines().last().unwrap_or("").trim().to_string();
        diags.error(
            "invalid-regex",
            src,
            path,
            format!("regex {pattern:?} does not compile: {last}"),
        );
    }
}

fn percent(src: &Source, path: &str, p: Option<Percent>, diags: &mut Diagnostics) {
    if let Some(p) = p {
        if !(0.0..=100.0).contains(&p.value) || p.value.is_nan() {
            diags.error(
                "invalid-percent",
                src,
                format!("{path}.value"),
                format!("{} is outside 0..100", p.value),
            );
        }
    }
}

fn is_header_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn is_base64(s: &str) -> bool {
    let t = s.trim_end_matches('=');
    s.len().is_multiple_of(4)
        && s.len() - t.len() <= 2
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

fn is_retry_on(c: &str) -> bool {
    matches!(
        c,
        "5xx"
            | "gateway-error"
            | "reset"
            | "reset-before-request"
            | "connect-failure"
            | "envoy-ratelimited"
            | "retriable-4xx"
            | "refused-stream"
            | "retriable-status-codes"
            | "retriable-headers"
            | "http3-post-connect-failure"
            | "cancelled"
            | "deadline-exceeded"
            | "internal"
            | "resource-exhausted"
            | "unavailable"
    ) || c.parse::<u16>().is_ok_and(|s| (100..=599).contains(&s))
}
