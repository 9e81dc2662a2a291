//! DestinationRule: host, subsets and traffic policies (load balancer, pool, outlier detection).

use std::collections::HashSet;

use super::{is_dns_label, is_host, port, Validator};
use crate::diag::{Diagnostics, Source};
use crate::networking::{
    ClientTlsSettings, ConnectionPoolSettings, DestinationRule, LoadBalancerSettings,
    OutlierDetection, TlsMode, TrafficPolicy,
};
use crate::Resource;

impl Validator<'_> {
    pub(super) fn destination_rule(&self, r: &Resource<DestinationRule>, diags: &mut Diagnostics) {
        let (s, src) = (&r.spec, &r.source);
        let host = self.cfg.resolve_host(&s.host, &r.namespace);
        if !is_host(&s.host) {
            diags.error(
                "invalid-host",
                src,
                "spec.host",
                format!("{:?} is not a valid host name", s.host),
            );
        } else if !self.names_a_service(&host) {
            diags.warning(
                "unknown-host",
                src,
                "spec.host",
                format!(
                    "host {:?} ({host}) matches no ServiceEntry; this rule has no effect",
                    s.host
                ),
            );
        }
        if let Some(tp) = &s.traffic_policy {
            traffic_policy(src, "spec.trafficPolicy", tp, diags);
        }
        let mut names = HashSet::new();
        for (i, sub) in s.subsets.iter().enumerate() {
            let sp = format!("spec.subsets[{i}]");
            if sub.name.is_empty() || !is_dns_label(&sub.name) {
                diags.error(
                    "invalid-name",
                    src,
                    format!("{sp}.name"),
                    format!("subset name {:?} is not a valid DNS label", sub.name),
                );
            }
            if !names.insert(sub.name.as_str()) {
                diags.error(
                    "duplicate-name",
                    src,
                    format!("{sp}.name"),
                    format!("subset {:?} is defined twice", sub.name),
                );
            }
            if let Some(tp) = &sub.traffic_policy {
                traffic_policy(src, &format!("{sp}.trafficPolicy"), tp, diags);
            }
        }
        if s.workload_selector.is_some() {
            diags.warning("unsupported", src, "spec.workloadSelector", "workloadSelector on DestinationRule is not supported yet; the rule applies to every client");
        }
    }
}

fn traffic_policy(src: &Source, path: &str, tp: &TrafficPolicy, diags: &mut Diagnostics) {
    if let Some(lb) = &tp.load_balancer {
        load_balancer(src, &format!("{path}.loadBalancer"), lb, diags);
    }
    if let Some(cp) = &tp.connection_pool {
        connection_pool(src, &format!("{path}.connectionPool"), cp, diags);
    }
    if let Some(od) = &tp.outlier_detection {
        outlier(src, &format!("{path}.outlierDetection"), od, diags);
    }
    if let Some(t) = &tp.tls {
        tls(src, &format!("{path}.tls"), t, diags);
    }
    ignored(
        src,
        path,
        &[
            ("tunnel", tp.tunnel.is_some()),
            ("proxyProtocol", tp.proxy_protocol.is_some()),
        ],
        diags,
    );
    let mut ports = HashSet::new();
    for (i, pl) in tp.port_level_settings.iter().enumerate() {
        let pp = format!("{path}.portLevelSettings[{i}]");
        match pl.port {
            None => diags.error(
                "missing-field",
                src,
                format!("{pp}.port"),
                "`port` is required",
            ),
            Some(p) => {
                if port(src, &format!("{pp}.port.number"), p.number, diags)
                    && !ports.insert(p.number)
                {
                    diags.error(
                        "duplicate-port",
                        src,
                        format!("{pp}.port.number"),
                        format!("port {} has two settings", p.number),
                    );
                }
            }
        }
        if let Some(lb) = &pl.load_balancer {
            load_balancer(src, &format!("{pp}.loadBalancer"), lb, diags);
        }
        if let Some(cp) = &pl.connection_pool {
            connection_pool(src, &format!("{pp}.connectionPool"), cp, diags);
        }
        if let Some(od) = &pl.outlier_detection {
            outlier(src, &format!("{pp}.outlierDetection"), od, diags);
        }
        if let Some(t) = &pl.tls {
            tls(src, &format!("{pp}.tls"), t, diags);
        }
    }
}

/// Client TLS to the destination. Fails closed: what Hypha would not do is an error, since
/// accepting it would send plaintext, or trust what the rule says not to.
fn tls(src: &Source, path: &str, t: &ClientTlsSettings, diags: &mut Diagnostics) {
    let files = [
        ("clientCertificate", &t.client_certificate),
        ("privateKey", &t.private_key),
        ("caCertificates", &t.ca_certificates),
        ("credentialName", &t.credential_name),
        ("caCrl", &t.ca_crl),
    ];
    match t.mode {
        Some(mode @ (TlsMode::Simple | TlsMode::Mutual)) => origination(src, path, t, mode, diags),
        Some(TlsMode::IstioMutual) => {
            for (field, value) in files.iter().chain([&("sni", &t.sni)]) {
                if value.is_some() {
                    diags.error(
                        "invalid-value",
                        src,
                        format!("{path}.{field}"),
                        format!(
                            "`{field}` cannot be set with ISTIO_MUTUAL: the sidecar presents its \
                             own mesh certificate and trusts the mesh roots"
                        ),
                    );
                }
            }
        }
        Some(TlsMode::Disable) | None => {}
    }
}

/// TLS origination (`SIMPLE`, `MUTUAL`): the files a sidecar reads, and what it cannot honour.
fn origination(
    src: &Source,
    path: &str,
    t: &ClientTlsSettings,
    mode: TlsMode,
    diags: &mut Diagnostics,
) {
    if t.credential_name.is_some() {
        diags.error(
            "unenforced",
            src,
            format!("{path}.credentialName"),
            "Hypha does not read Kubernetes Secrets for TLS origination yet: give the files on \
             the sidecar's machine instead (`caCertificates`, and `clientCertificate` with \
             `privateKey` for MUTUAL)",
        );
    }
    if t.ca_crl.is_some() {
        diags.error(
            "unenforced",
            src,
            format!("{path}.caCrl"),
            "Hypha does not check certificate revocation lists on origination yet, so the \
             list would be ignored: remove `caCrl`, or have the app speak TLS itself instead",
        );
    }
    let files = [
        ("clientCertificate", &t.client_certificate),
        ("privateKey", &t.private_key),
        ("caCertificates", &t.ca_certificates),
    ];
    for (field, value) in files {
        if value.as_deref().is_some_and(|f| !f.starts_with('/')) {
            diags.error(
                "invalid-value",
                src,
                format!("{path}.{field}"),
                format!("`{field}` must be an absolute path (the file on the sidecar's machine)"),
            );
        }
    }
    let client = t.client_certificate.is_some() || t.private_key.is_some();
    match mode {
        TlsMode::Mutual if t.credential_name.is_none() => {
            for (field, value) in &files[..2] {
                if value.is_none() {
                    diags.error(
                        "missing-field",
                        src,
                        format!("{path}.{field}"),
                        format!(
                            "`{field}` is required with MUTUAL (the client certificate the \
                                 sidecar presents)"
                        ),
                    );
                }
            }
        }
        TlsMode::Simple if client => diags.warning(
            "ignored-field",
            src,
            path,
            "`clientCertificate` and `privateKey` are ignored with SIMPLE: use MUTUAL to \
             present a client certificate",
        ),
        _ => {}
    }
    if t.insecure_skip_verify == Some(true) {
        for (field, set) in [
            ("caCertificates", t.ca_certificates.is_some()),
            ("subjectAltNames", !t.subject_alt_names.is_empty()),
        ] {
            if set {
                diags.error(
                    "exclusive-fields",
                    src,
                    format!("{path}.{field}"),
                    format!(
                        "`{field}` cannot be set with `insecureSkipVerify: true`, which \
                             verifies nothing"
                    ),
                );
            }
        }
    }
}

fn load_balancer(src: &Source, path: &str, lb: &LoadBalancerSettings, diags: &mut Diagnostics) {
    ignored(
        src,
        path,
        &[("warmupDurationSecs", lb.warmup_duration_secs.is_some())],
        diags,
    );
    if lb.simple.is_some() && lb.consistent_hash.is_some() {
        diags.error(
            "exclusive-fields",
            src,
            path,
            "only one of `simple` and `consistentHash` may be set",
        );
    }
    if let Some(ch) = &lb.consistent_hash {
        let keys = usize::from(ch.http_header_name.is_some())
            + usize::from(ch.http_cookie.is_some())
            + usize::from(ch.use_source_ip == Some(true))
            + usize::from(ch.http_query_parameter_name.is_some());
        if keys != 1 {
            diags.error(
                "exclusive-fields",
                src,
                format!("{path}.consistentHash"),
                "exactly one of `httpHeaderName`, `httpCookie`, `useSourceIp` or `httpQueryParameterName` is required",
            );
        }
        if ch.http_cookie.as_ref().is_some_and(|c| c.ttl.is_some()) {
            // What the sidecar would refuse (NACK) is refused here, with the reason.
            diags.error(
                "unsupported",
                src,
                format!("{path}.consistentHash.httpCookie.ttl"),
                "a cookie with `ttl` asks the sidecar to generate one for requests that carry \
                 none, which Hypha does not do yet (its sidecar would refuse the route); without \
                 `ttl` the cookie requests carry is hashed",
            );
        }
        if ch.ring_hash.is_some() && ch.maglev.is_some() {
            diags.error(
                "exclusive-fields",
                src,
                format!("{path}.consistentHash"),
                "only one of `ringHash` and `maglev` may be set",
            );
        }
    }
    if lb.locality_lb_setting.is_some() {
        diags.warning(
            "unsupported",
            src,
            format!("{path}.localityLbSetting"),
            "locality load balancing is not supported by Hypha yet; ignored",
        );
    }
}

/// A warning for each of Istio's `fields` that is set and that Hypha does not act on yet: never
/// accepted in silence.
pub(super) fn ignored(src: &Source, path: &str, fields: &[(&str, bool)], diags: &mut Diagnostics) {
    for (field, set) in fields {
        if *set {
            diags.warning(
                "unsupported",
                src,
                format!("{path}.{field}"),
                format!("`{field}` is not supported by Hypha yet; ignored"),
            );
        }
    }
}

fn connection_pool(src: &Source, path: &str, cp: &ConnectionPoolSettings, diags: &mut Diagnostics) {
    ignored(
        src,
        path,
        &[
            (
                "tcp.tcpKeepalive",
                cp.tcp.as_ref().is_some_and(|t| t.tcp_keepalive.is_some()),
            ),
            (
                "tcp.maxConnectionDuration",
                cp.tcp
                    .as_ref()
                    .is_some_and(|t| t.max_connection_duration.is_some()),
            ),
            (
                "tcp.idleTimeout",
                cp.tcp.as_ref().is_some_and(|t| t.idle_timeout.is_some()),
            ),
            (
                "http.useClientProtocol",
                cp.http
                    .as_ref()
                    .is_some_and(|h| h.use_client_protocol == Some(true)),
            ),
        ],
        diags,
    );
    let mut positive = |field: &str, v: Option<i64>| {
        if let Some(v) = v {
            if v <= 0 {
                diags.error(
                    "invalid-value",
                    src,
                    format!("{path}.{field}"),
                    format!("{v} must be positive"),
                );
            }
        }
    };
    if let Some(t) = &cp.tcp {
        positive("tcp.maxConnections", t.max_connections);
    }
    if let Some(h) = &cp.http {
        positive("http.http1MaxPendingRequests", h.http1_max_pending_requests);
        positive("http.http2MaxRequests", h.http2_max_requests);
        positive(
            "http.maxRequestsPerConnection",
            h.max_requests_per_connection,
        );
        positive("http.maxConcurrentStreams", h.max_concurrent_streams);
        if let Some(r) = h.max_retries {
            if r < 0 {
                diags.error(
                    "invalid-value",
                    src,
                    format!("{path}.http.maxRetries"),
                    "maxRetries must not be negative",
                );
            }
        }
        if let Some(p) = &h.h2_upgrade_policy {
            if !matches!(p.as_str(), "DEFAULT" | "DO_NOT_UPGRADE" | "UPGRADE") {
                diags.error(
                    "invalid-value",
                    src,
                    format!("{path}.http.h2UpgradePolicy"),
                    format!("unknown policy {p:?}"),
                );
            }
        }
    }
}

fn outlier(src: &Source, path: &str, od: &OutlierDetection, diags: &mut Diagnostics) {
    ignored(
        src,
        path,
        &[("minHealthPercent", od.min_health_percent.is_some())],
        diags,
    );
    for (field, v) in [
        ("maxEjectionPercent", od.max_ejection_percent),
        ("minHealthPercent", od.min_health_percent),
    ] {
        if let Some(v) = v {
            if !(0..=100).contains(&v) {
                diags.error(
                    "invalid-percent",
                    src,
                    format!("{path}.{field}"),
                    format!("{v} is outside 0..100"),
                );
            }
        }
    }
    for (field, set) in [
        (
            "splitExternalLocalOriginErrors",
            od.split_external_local_origin_errors == Some(true),
        ),
        (
            "consecutiveLocalOriginFailures",
            od.consecutive_local_origin_failures.is_some(),
        ),
    ] {
        if set {
            diags.error(
                "unsupported",
                src,
                format!("{path}.{field}"),
                "counting local-origin errors apart is not implemented by Hypha yet (its sidecar \
                 would refuse the cluster); connect failures, resets and timeouts count with 5xx",
            );
        }
    }
    if od.interval.is_some_and(|i| i.as_std().is_zero()) {
        diags.error(
            "invalid-value",
            src,
            format!("{path}.interval"),
            "interval must be positive",
        );
    }
}

/// What only a control plane running the mesh CA can serve: `ISTIO_MUTUAL` needs workload
/// certificates, and without them the sidecar would send plaintext. `hypha control` without
/// `--data-dir` refuses such config, at start and on every change.
pub fn needs_the_ca(cfg: &crate::Config) -> Diagnostics {
    let mut diags = Diagnostics::default();
    for r in &cfg.destination_rules {
        let mut policies: Vec<(String, &TrafficPolicy)> = Vec::new();
        if let Some(tp) = &r.spec.traffic_policy {
            policies.push(("spec.trafficPolicy".into(), tp));
        }
        for (i, sub) in r.spec.subsets.iter().enumerate() {
            if let Some(tp) = &sub.traffic_policy {
                policies.push((format!("spec.subsets[{i}].trafficPolicy"), tp));
            }
        }
        for (path, tp) in policies {
            let mut tls: Vec<(String, &ClientTlsSettings)> = Vec::new();
            if let Some(t) = &tp.tls {
                tls.push((format!("{path}.tls"), t));
            }
            for (j, p) in tp.port_level_settings.iter().enumerate() {
                if let Some(t) = &p.tls {
                    tls.push((format!("{path}.portLevelSettings[{j}].tls"), t));
                }
            }
            for (at, t) in tls {
                if t.mode == Some(TlsMode::IstioMutual) {
                    diags.error(
                        "needs-ca",
                        &r.source,
                        format!("{at}.mode"),
                        "ISTIO_MUTUAL needs the mesh CA, and this control plane runs without \
                         one (the sidecars would send plaintext): start `hypha control` with \
                         `--data-dir` (and `--listen-tls`), or leave `tls` unset",
                    );
                }
            }
        }
    }
    diags
}
