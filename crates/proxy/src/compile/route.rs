//! Route tables: RouteConfigurations, virtual hosts and their domains, routes, matches,
//! header operations, forwarding (weights, rewrites, hashing, retries), redirects and faults.

use std::collections::HashMap;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{DataSource, HeaderValueOption};
use envoy_types::pb::envoy::config::route::v3::{
    header_matcher::HeaderMatchSpecifier, query_parameter_matcher::QueryParameterMatchSpecifier,
    redirect_action, retry_policy, route, route_action, route_match::PathSpecifier, HeaderMatcher,
    RedirectAction, Route as EnvoyRoute, RouteAction, RouteConfiguration, RouteMatch,
    VirtualHost as EnvoyVirtualHost,
};
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault;
use envoy_types::pb::envoy::extensions::retry::host::previous_hosts::v3::PreviousHostsPredicate;
use envoy_types::pb::envoy::r#type::matcher::v3::{
    string_matcher::MatchPattern, RegexMatcher, StringMatcher,
};
use envoy_types::pb::envoy::r#type::v3::FractionalPercent;
use hypha_matcher::{Attr, Condition, Pattern, Rule, StringMatch, Table, Test};

use super::{
    decode, dur, only, path, refuse, typed, unsupported, unsupported_value, variant, Refused,
    Result, FAULT,
};
use crate::model::{
    Action, Fault, Forward, HashKey, HeaderAdd, HeaderAppend, HeaderOps, Redirect, RetryPolicy,
    Route, RouteTable, VirtualHost, WeightedCluster,
};

const PREVIOUS_HOSTS: &str = "envoy.retry_host_predicates.previous_hosts";

/// A RouteConfiguration.
pub fn route_table(name: &str, bytes: &[u8]) -> std::result::Result<RouteTable, Refused> {
    decode::<RouteConfiguration>(bytes, "RouteConfiguration")
        .and_then(route_table_inner)
        .map_err(refuse("route table", name))
}

pub(super) fn route_table_inner(mut rc: RouteConfiguration) -> Result<RouteTable> {
    // Taken out first, so the check does not render every route.
    let virtual_hosts = std::mem::take(&mut rc.virtual_hosts);
    only(&rc, "", &["name", "virtual_hosts", "validate_clusters"])?;
    // `false` is what the proxy does: a route to a cluster it does not have fails at request
    // time (no cluster), the table is not refused for it.
    if rc.validate_clusters.is_some_and(|v| v.value) {
        return Err(unsupported_value("validate_clusters", true));
    }
    let mut domains = Vec::new();
    let mut hosts = Vec::new();
    for vh in virtual_hosts {
        let i = hosts.len();
        domains.extend(vh.domains.iter().map(|d| (d.to_ascii_lowercase(), i)));
        let name = vh.name.clone();
        hosts.push(virtual_host(vh).map_err(|e| format!("virtual host {name:?}: {e}"))?);
    }
    let (domains, holders) =
        host_table(domains, "virtual hosts").map_err(|e| format!("domains: {e}"))?;
    let domain_hosts = holders.into_iter().map(|(_, i)| i).collect();
    Ok(RouteTable {
        name: rc.name,
        virtual_hosts: hosts,
        domains,
        domain_hosts,
    })
}

/// Host names (lower-case) of the things at their indexes, compiled into one rule each on the
/// authority, in the order Envoy prefers them: exact names, then suffix wildcards
/// (`*.example.com`) longest first, then prefix wildcards (`example.*`) longest first, then
/// `*`; for each rule, its name and the index it stands for. An exact name in two of them
/// (`holders`) is an error; for a wildcard, the first holder wins.
pub(super) fn host_table(
    names: Vec<(String, usize)>,
    holders: &str,
) -> Result<(Table, Vec<(String, usize)>)> {
    let mut exact = HashMap::new();
    let (mut suffixes, mut prefixes, mut any) = (Vec::new(), Vec::new(), None);
    for (d, i) in names {
        if d == "*" {
            any.get_or_insert(i);
        } else if let Some(suffix) = d.strip_prefix('*') {
            suffixes.push((suffix.to_owned(), i));
        } else if let Some(prefix) = d.strip_suffix('*') {
            prefixes.push((prefix.to_owned(), i));
        } else if exact.insert(d.clone(), i).is_some() {
            return Err(format!("{d:?} is in two {holders}"));
        }
    }
    suffixes.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
    prefixes.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
    let on_authority = |pattern: Pattern, invert: bool| Condition {
        attr: Attr::Authority,
        test: Test::Matches(StringMatch {
            pattern,
            ignore_case: false,
        }),
        invert,
    };
    // A wildcard stands for at least one character: the authority is longer than the rest.
    let wildcard = |pattern: Pattern, rest: String| Rule {
        conditions: vec![
            on_authority(pattern, false),
            on_authority(Pattern::Exact(rest), true),
        ],
    };
    let mut exact: Vec<(String, usize)> = exact.into_iter().collect();
    exact.sort_unstable();
    let mut rules = Vec::new();
    let mut holder = Vec::new();
    for (d, i) in exact {
        rules.push(Rule {
            conditions: vec![on_authority(Pattern::Exact(d.clone()), false)],
        });
        holder.push((d, i));
    }
    for (s, i) in suffixes {
        holder.push((format!("*{s}"), i));
        rules.push(wildcard(Pattern::Suffix(s.clone()), s));
    }
    for (p, i) in prefixes {
        holder.push((format!("{p}*"), i));
        rules.push(wildcard(Pattern::Prefix(p.clone()), p));
    }
    if let Some(i) = any {
        rules.push(Rule {
            conditions: vec![on_authority(Pattern::Prefix(String::new()), false)],
        });
        holder.push(("*".into(), i));
    }
    let table = Table::compile(rules).map_err(|e| e.to_string())?;
    Ok((table, holder))
}

fn virtual_host(mut vh: EnvoyVirtualHost) -> Result<VirtualHost> {
    let envoy_routes = std::mem::take(&mut vh.routes);
    only(&vh, "", &["name", "domains", "routes"])?;
    let mut routes = Vec::new();
    let mut rules = Vec::new();
    for r in envoy_routes {
        let name = r.name.clone();
        let (rule, route) = compile_route(r).map_err(|e| format!("route {name:?}: {e}"))?;
        rules.push(rule);
        routes.push(route);
    }
    let table = Table::compile(rules).map_err(|e| e.to_string())?;
    Ok(VirtualHost {
        name: vh.name,
        routes,
        table,
    })
}

fn compile_route(mut r: EnvoyRoute) -> Result<(Rule, Route)> {
    let m = r.r#match.take().ok_or("a route needs a match")?;
    let action = r.action.take().ok_or("a route needs an action")?;
    only(
        &r,
        "",
        &[
            "name",
            "request_headers_to_add",
            "request_headers_to_remove",
            "response_headers_to_add",
            "response_headers_to_remove",
            "typed_per_filter_config",
            // Informational: no filter Hypha accepts reads route metadata.
            "metadata",
        ],
    )?;
    let (conditions, matched_prefix) = route_match(m)?;
    let headers = HeaderOps {
        request_add: header_adds(&r.request_headers_to_add, "request_headers_to_add")?,
        request_remove: header_names(&r.request_headers_to_remove)?,
        response_add: header_adds(&r.response_headers_to_add, "response_headers_to_add")?,
        response_remove: header_names(&r.response_headers_to_remove)?,
    };
    let action = match action {
        route::Action::Route(ra) => Action::Forward(forward(ra, matched_prefix)?),
        route::Action::Redirect(rd) => Action::Redirect(redirect(rd)?),
        route::Action::DirectResponse(d) => {
            only(&d, "direct_response", &["status", "body"])?;
            let body = match d.body {
                Some(b) => data_source(b, "direct_response.body")?,
                None => bytes::Bytes::new(),
            };
            Action::Direct {
                status: u16::try_from(d.status)
                    .ok()
                    .filter(|s| (200..600).contains(s))
                    .ok_or_else(|| format!("direct response status {} is invalid", d.status))?,
                body,
            }
        }
        other => return Err(unsupported(&variant(&other))),
    };
    let mut fault = None;
    for (filter, any) in &r.typed_per_filter_config {
        if filter != FAULT {
            return Err(format!(
                "typed_per_filter_config[{filter:?}] is not supported"
            ));
        }
        let at = format!("typed_per_filter_config[{filter:?}]");
        fault = Some(http_fault(&typed::<HttpFault>(any, &at)?, &at)?);
    }
    Ok((
        Rule { conditions },
        Route {
            name: r.name,
            action,
            headers,
            fault,
        },
    ))
}

fn data_source(d: DataSource, at: &str) -> Result<bytes::Bytes> {
    use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
    only(&d, at, &["specifier"])?;
    match d.specifier {
        Some(Specifier::InlineString(s)) => Ok(bytes::Bytes::from(s)),
        Some(Specifier::InlineBytes(b)) => Ok(bytes::Bytes::from(b)),
        Some(other) => Err(unsupported(&path(at, &variant(&other)))),
        None => Ok(bytes::Bytes::new()),
    }
}

/// A route's match as conditions, and the length of the prefix it matches, if it is one.
fn route_match(m: RouteMatch) -> Result<(Vec<Condition>, Option<usize>)> {
    only(
        &m,
        "match",
        &[
            "path_specifier",
            "case_sensitive",
            "headers",
            "query_parameters",
        ],
    )?;
    let ignore_case = m.case_sensitive.as_ref().is_some_and(|b| !b.value);
    let mut conditions = Vec::new();
    let mut matched_prefix = None;
    let path_pattern = match m.path_specifier {
        Some(PathSpecifier::Prefix(p)) => {
            matched_prefix = Some(p.len());
            Pattern::Prefix(p)
        }
        Some(PathSpecifier::Path(p)) => Pattern::Exact(p),
        Some(PathSpecifier::SafeRegex(re)) => Pattern::Regex(regex(re, "match.safe_regex")?),
        Some(other) => return Err(unsupported(&path("match", &variant(&other)))),
        None => return Err("a route match needs a path specifier".into()),
    };
    // Envoy applies `case_sensitive` to literal paths only, never to `safe_regex`.
    let ignore_case = ignore_case && !matches!(path_pattern, Pattern::Regex(_));
    conditions.push(Condition {
        attr: Attr::Path,
        test: Test::Matches(StringMatch {
            pattern: path_pattern,
            ignore_case,
        }),
        invert: false,
    });
    for h in m.headers {
        conditions.extend(header_conditions(h)?);
    }
    for q in m.query_parameters {
        const AT: &str = "match.query_parameters";
        only(&q, AT, &["name", "query_parameter_match_specifier"])?;
        let test = match q.query_parameter_match_specifier {
            Some(QueryParameterMatchSpecifier::PresentMatch(true)) => Test::Present,
            Some(QueryParameterMatchSpecifier::PresentMatch(false)) => Test::Absent,
            Some(QueryParameterMatchSpecifier::StringMatch(sm)) => {
                Test::Matches(string_match(sm, &path(AT, "string_match"))?)
            }
            None => Test::Present,
        };
        conditions.push(Condition {
            attr: Attr::Query(q.name),
            test,
            invert: false,
        });
    }
    Ok((conditions, matched_prefix))
}

/// A regex's pattern. `engine_type` (deprecated, RE2) is informational: the regex crate's
/// syntax is RE2's.
fn regex(re: RegexMatcher, at: &str) -> Result<String> {
    only(&re, at, &["regex", "engine_type"])?;
    Ok(re.regex)
}

// The deprecated matchers are what older control planes still send; Envoy accepts them.
#[allow(deprecated)]
pub(super) fn header_conditions(h: HeaderMatcher) -> Result<Vec<Condition>> {
    const AT: &str = "match.headers";
    only(
        &h,
        AT,
        &[
            "name",
            "header_match_specifier",
            "invert_match",
            "treat_missing_header_as_empty",
        ],
    )?;
    let attr = match h.name.as_str() {
        ":path" => Attr::Path,
        ":authority" | "host" => Attr::Authority,
        ":method" => Attr::Method,
        ":scheme" => Attr::Scheme,
        other => Attr::Header(other.to_ascii_lowercase()),
    };
    let literal = |pattern| {
        Test::Matches(StringMatch {
            pattern,
            ignore_case: false,
        })
    };
    let test = match h.header_match_specifier {
        Some(HeaderMatchSpecifier::PresentMatch(true)) | None => Test::Present,
        Some(HeaderMatchSpecifier::PresentMatch(false)) => Test::Absent,
        Some(HeaderMatchSpecifier::StringMatch(sm)) => {
            Test::Matches(string_match(sm, &path(AT, "string_match"))?)
        }
        Some(HeaderMatchSpecifier::ExactMatch(s)) => literal(Pattern::Exact(s)),
        Some(HeaderMatchSpecifier::PrefixMatch(s)) => literal(Pattern::Prefix(s)),
        Some(HeaderMatchSpecifier::SuffixMatch(s)) => literal(Pattern::Suffix(s)),
        Some(HeaderMatchSpecifier::ContainsMatch(s)) => literal(Pattern::Contains(s)),
        Some(HeaderMatchSpecifier::SafeRegexMatch(re)) => {
            literal(Pattern::Regex(regex(re, &path(AT, "safe_regex_match"))?))
        }
        Some(other) => return Err(unsupported(&path(AT, &variant(&other)))),
    };
    let mut out = vec![Condition {
        attr: attr.clone(),
        test: test.clone(),
        invert: h.invert_match,
    }];
    // Envoy's `invert_match` never matches a missing header (Istio `withoutHeaders` too).
    if h.invert_match && !h.treat_missing_header_as_empty {
        out.push(Condition {
            attr,
            test: Test::Present,
            invert: false,
        });
    }
    Ok(out)
}

pub(super) fn string_match(sm: StringMatcher, at: &str) -> Result<StringMatch> {
    only(&sm, at, &["match_pattern", "ignore_case"])?;
    let pattern = match sm.match_pattern {
        Some(MatchPattern::Exact(s)) => Pattern::Exact(s),
        Some(MatchPattern::Prefix(s)) => Pattern::Prefix(s),
        Some(MatchPattern::Suffix(s)) => Pattern::Suffix(s),
        Some(MatchPattern::Contains(s)) => Pattern::Contains(s),
        Some(MatchPattern::SafeRegex(re)) => Pattern::Regex(regex(re, &path(at, "safe_regex"))?),
        Some(other) => return Err(unsupported(&path(at, &variant(&other)))),
        None => return Err("a string match needs a pattern".into()),
    };
    // Envoy ignores `ignore_case` for `safe_regex`.
    let ignore_case = sm.ignore_case && !matches!(pattern, Pattern::Regex(_));
    Ok(StringMatch {
        pattern,
        ignore_case,
    })
}

#[allow(deprecated)] // `append`, see below
fn header_adds(ops: &[HeaderValueOption], at: &str) -> Result<Vec<HeaderAdd>> {
    ops.iter()
        .map(|o| {
            only(o, at, &["header", "append", "append_action"])?;
            let h = o
                .header
                .as_ref()
                .ok_or("header operation without a header")?;
            only(h, &path(at, "header"), &["key", "value", "raw_value"])?;
            let name = http::HeaderName::from_bytes(h.key.as_bytes())
                .map_err(|_| format!("invalid header name {:?}", h.key))?;
            let value = if h.raw_value.is_empty() {
                http::HeaderValue::from_str(&h.value)
            } else {
                http::HeaderValue::from_bytes(&h.raw_value)
            }
            .map_err(|_| format!("invalid value for header {:?}", h.key))?;
            let append = match o.append_action {
                // The deprecated `append: false` still means overwrite when the action is unset.
                0 if o.append.as_ref().is_some_and(|a| !a.value) => HeaderAppend::Overwrite,
                0 => HeaderAppend::Append,
                1 => HeaderAppend::AddIfAbsent,
                2 => HeaderAppend::Overwrite,
                3 => HeaderAppend::OverwriteIfExists,
                other => return Err(format!("header append_action {other} is unknown")),
            };
            Ok((name, value, append))
        })
        .collect()
}

fn header_names(names: &[String]) -> Result<Vec<http::HeaderName>> {
    names
        .iter()
        .map(|n| {
            http::HeaderName::from_bytes(n.as_bytes())
                .map_err(|_| format!("invalid header name {n:?}"))
        })
        .collect()
}

fn forward(mut ra: RouteAction, matched_prefix: Option<usize>) -> Result<Forward> {
    // The RouteAction is the route's `route` field.
    const AT: &str = "route";
    let cluster_specifier = ra.cluster_specifier.take();
    only(
        &ra,
        AT,
        &[
            "timeout",
            "retry_policy",
            "hash_policy",
            "prefix_rewrite",
            "regex_rewrite",
            "host_rewrite_specifier",
        ],
    )?;
    let clusters = match cluster_specifier {
        Some(route_action::ClusterSpecifier::Cluster(c)) => vec![WeightedCluster {
            name: c.into(),
            weight: 1,
            headers: HeaderOps::default(),
        }],
        Some(route_action::ClusterSpecifier::WeightedClusters(w)) => {
            let at = path(AT, "weighted_clusters");
            // `total_weight` is deprecated; where set, Envoy requires it to be the sum.
            only(&w, &at, &["clusters", "total_weight"])?;
            let clusters = w
                .clusters
                .into_iter()
                .map(|c| {
                    let at = path(&at, "clusters");
                    only(
                        &c,
                        &at,
                        &[
                            "name",
                            "weight",
                            "request_headers_to_add",
                            "request_headers_to_remove",
                            "response_headers_to_add",
                            "response_headers_to_remove",
                        ],
                    )?;
                    Ok(WeightedCluster {
                        headers: HeaderOps {
                            request_add: header_adds(
                                &c.request_headers_to_add,
                                &path(&at, "request_headers_to_add"),
                            )?,
                            request_remove: header_names(&c.request_headers_to_remove)?,
                            response_add: header_adds(
                                &c.response_headers_to_add,
                                &path(&at, "response_headers_to_add"),
                            )?,
                            response_remove: header_names(&c.response_headers_to_remove)?,
                        },
                        weight: c.weight.map_or(0, |w| w.value),
                        name: c.name.into(),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            #[allow(deprecated)]
            if let Some(total) = w.total_weight {
                let sum: u32 = clusters.iter().map(|c| c.weight).sum();
                if total.value != sum {
                    return Err(format!(
                        "weighted_clusters.total_weight {} is not the sum of the weights, {sum}",
                        total.value
                    ));
                }
            }
            clusters
        }
        Some(other) => return Err(unsupported(&path(AT, &variant(&other)))),
        None => return Err("a route action needs a cluster".into()),
    };
    let total_weight = clusters.iter().map(|c| c.weight).sum();
    if total_weight == 0 {
        return Err("weighted clusters with a total weight of 0".into());
    }
    let retry = ra
        .retry_policy
        .map(|rp| retry_policy(rp, &path(AT, "retry_policy")))
        .transpose()?;
    let regex_rewrite = match ra.regex_rewrite {
        Some(rr) => {
            let at = path(AT, "regex_rewrite");
            only(&rr, &at, &["pattern", "substitution"])?;
            let pattern = regex(
                rr.pattern.ok_or("regex_rewrite without a pattern")?,
                &path(&at, "pattern"),
            )?;
            let re = regex::Regex::new(&pattern)
                .map_err(|e| format!("regex_rewrite pattern {pattern:?}: {e}"))?;
            // Envoy's substitution uses \1; the regex crate uses ${1}.
            let sub = rr
                .substitution
                .replace('$', "$$")
                .chars()
                .fold((String::new(), false), |(mut s, esc), c| {
                    if esc && c.is_ascii_digit() {
                        s.push_str(&format!("${{{c}}}"));
                        (s, false)
                    } else if c == '\\' && !esc {
                        (s, true)
                    } else {
                        if esc {
                            s.push('\\');
                        }
                        s.push(c);
                        (s, false)
                    }
                })
                .0;
            Some((re, sub))
        }
        None => None,
    };
    let mut hash = Vec::new();
    for (i, hp) in ra.hash_policy.iter().enumerate() {
        use route_action::hash_policy::PolicySpecifier;
        let at = path(AT, "hash_policy");
        only(hp, &at, &["policy_specifier", "terminal"])?;
        // The proxy hashes on the first policy that yields a key, which is Envoy's `terminal`;
        // without it Envoy combines the keys of the policies that follow.
        if !hp.terminal && i + 1 < ra.hash_policy.len() {
            return Err(format!(
                "{at}: more than one policy, with one before the last not `terminal`, is not \
                 supported"
            ));
        }
        hash.push(match &hp.policy_specifier {
            Some(PolicySpecifier::Header(h)) => {
                only(h, &path(&at, "header"), &["header_name"])?;
                HashKey::Header(
                    http::HeaderName::from_bytes(h.header_name.as_bytes())
                        .map_err(|_| format!("invalid hash header {:?}", h.header_name))?,
                )
            }
            Some(PolicySpecifier::Cookie(c)) => {
                // Informational: `path` only shapes the cookie Envoy sets when it has none to
                // hash on, which needs `ttl` (refused: Hypha sets no cookie).
                only(c, &path(&at, "cookie"), &["name", "path"])?;
                HashKey::Cookie(c.name.clone())
            }
            Some(PolicySpecifier::ConnectionProperties(p)) if p.source_ip => HashKey::SourceIp,
            Some(PolicySpecifier::QueryParameter(q)) => {
                only(q, &path(&at, "query_parameter"), &["name"])?;
                HashKey::Query(q.name.clone())
            }
            Some(PolicySpecifier::ConnectionProperties(_)) => {
                return Err(unsupported_value(
                    &path(&at, "connection_properties.source_ip"),
                    false,
                ))
            }
            Some(other) => return Err(unsupported(&path(&at, &variant(other)))),
            None => return Err(format!("{at}: a hash policy needs a key")),
        });
    }
    Ok(Forward {
        hash,
        clusters,
        total_weight,
        timeout: ra.timeout.as_ref().map(dur).filter(|d| !d.is_zero()),
        retry,
        prefix_rewrite: Some(ra.prefix_rewrite).filter(|p| !p.is_empty()),
        regex_rewrite,
        host_rewrite: match ra.host_rewrite_specifier {
            Some(route_action::HostRewriteSpecifier::HostRewriteLiteral(h)) => Some(h),
            Some(other) => return Err(unsupported(&path(AT, &variant(&other)))),
            None => None,
        },
        matched_prefix,
    })
}

fn retry_policy(
    rp: envoy_types::pb::envoy::config::route::v3::RetryPolicy,
    at: &str,
) -> Result<RetryPolicy> {
    only(
        &rp,
        at,
        &[
            "retry_on",
            "num_retries",
            "per_try_timeout",
            "retriable_status_codes",
            "retry_back_off",
            "retry_host_predicate",
            // The proxy avoids the hosts earlier attempts used while others are usable
            // (`upstream::pick`), choosing among the rest outright: it never needs a second
            // pick, whatever this allows.
            "host_selection_retry_max_attempts",
        ],
    )?;
    // `previous_hosts` is what the proxy does anyway (see above), so it is the one predicate
    // accepted. (Without it Envoy may pick a host again; the proxy still avoids it.)
    for p in &rp.retry_host_predicate {
        let at = path(at, "retry_host_predicate");
        only(p, &at, &["name", "config_type"])?;
        let previous_hosts = match &p.config_type {
            Some(retry_policy::retry_host_predicate::ConfigType::TypedConfig(any)) => {
                only(&typed::<PreviousHostsPredicate>(any, &at)?, &at, &[])?;
                true
            }
            None => p.name == PREVIOUS_HOSTS,
        };
        if !previous_hosts {
            return Err(format!(
                "{at}: only {PREVIOUS_HOSTS} is supported, not {:?}",
                p.name
            ));
        }
    }
    let backoff = match &rp.retry_back_off {
        Some(b) => {
            only(
                b,
                &path(at, "retry_back_off"),
                &["base_interval", "max_interval"],
            )?;
            Some(b)
        }
        None => None,
    };
    let base = backoff
        .and_then(|b| b.base_interval.as_ref())
        .map_or(Duration::from_millis(25), dur);
    let mut out = RetryPolicy {
        attempts: rp.num_retries.map_or(1, |n| n.value),
        per_try_timeout: rp
            .per_try_timeout
            .as_ref()
            .map(dur)
            .filter(|d| !d.is_zero()),
        on_5xx: false,
        on_gateway_error: false,
        on_connect_failure: false,
        on_reset: false,
        on_status: Vec::new(),
        on_ratelimited: false,
        on_reset_before_request: false,
        base_interval: base,
        max_interval: backoff
            .and_then(|b| b.max_interval.as_ref())
            .map_or(base * 10, dur),
        on_refused_stream: false,
        on_grpc_status: 0,
    };
    for on in rp
        .retry_on
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
    {
        match on {
            "5xx" => out.on_5xx = true,
            "gateway-error" => out.on_gateway_error = true,
            "connect-failure" => out.on_connect_failure = true,
            "reset" => out.on_reset = true,
            // Envoy reads `retriable_status_codes` only with this condition.
            "retriable-status-codes" => out.on_status.extend(
                rp.retriable_status_codes
                    .iter()
                    .filter_map(|c| u16::try_from(*c).ok()),
            ),
            // Envoy's one retriable 4xx.
            "retriable-4xx" => out.on_status.push(409),
            "envoy-ratelimited" => out.on_ratelimited = true,
            "reset-before-request" => out.on_reset_before_request = true,
            // Envoy retries on it only when a response matches `retriable_headers`, which
            // Istio has no field for and the route refuses: never, as here.
            "retriable-headers" => {}
            // Carried in the model, not yet acted on (see `RetryPolicy`).
            "refused-stream" => out.on_refused_stream = true,
            "cancelled" => out.on_grpc_status |= 1 << 1,
            "deadline-exceeded" => out.on_grpc_status |= 1 << 4,
            "resource-exhausted" => out.on_grpc_status |= 1 << 8,
            "internal" => out.on_grpc_status |= 1 << 13,
            "unavailable" => out.on_grpc_status |= 1 << 14,
            // Informational: about HTTP/3 upstream connections, which the proxy never makes.
            "http3-post-connect-failure" => {}
            other => {
                return Err(format!(
                    "{}: condition {other:?} is not supported by Hypha",
                    path(at, "retry_on")
                ))
            }
        }
    }
    Ok(out)
}

fn redirect(rd: RedirectAction) -> Result<Redirect> {
    const AT: &str = "redirect";
    only(
        &rd,
        AT,
        &[
            "host_redirect",
            "port_redirect",
            "response_code",
            "scheme_rewrite_specifier",
            "path_rewrite_specifier",
        ],
    )?;
    let status = match redirect_action::RedirectResponseCode::try_from(rd.response_code)
        .map_err(|_| format!("unknown redirect code {}", rd.response_code))?
    {
        redirect_action::RedirectResponseCode::MovedPermanently => 301,
        redirect_action::RedirectResponseCode::Found => 302,
        redirect_action::RedirectResponseCode::SeeOther => 303,
        redirect_action::RedirectResponseCode::TemporaryRedirect => 307,
        redirect_action::RedirectResponseCode::PermanentRedirect => 308,
    };
    Ok(Redirect {
        scheme: match rd.scheme_rewrite_specifier {
            Some(redirect_action::SchemeRewriteSpecifier::SchemeRedirect(s)) => Some(s),
            Some(redirect_action::SchemeRewriteSpecifier::HttpsRedirect(true)) => {
                Some("https".into())
            }
            _ => None,
        },
        host: Some(rd.host_redirect).filter(|h| !h.is_empty()),
        port: match rd.port_redirect {
            0 => None,
            p => Some(u16::try_from(p).map_err(|_| format!("redirect port {p} out of range"))?),
        },
        path: match rd.path_rewrite_specifier {
            Some(redirect_action::PathRewriteSpecifier::PathRedirect(p)) => Some(p),
            Some(other) => return Err(unsupported(&path(AT, &variant(&other)))),
            None => None,
        },
        status,
    })
}

fn http_fault(f: &HttpFault, at: &str) -> Result<Fault> {
    use envoy_types::pb::envoy::extensions::filters::common::fault::v3::fault_delay;
    use envoy_types::pb::envoy::extensions::filters::http::fault::v3::fault_abort;
    only(f, at, &["delay", "abort"])?;
    let delay = match &f.delay {
        Some(d) => {
            let at = path(at, "delay");
            only(d, &at, &["fault_delay_secifier", "percentage"])?;
            match &d.fault_delay_secifier {
                Some(fault_delay::FaultDelaySecifier::FixedDelay(t)) => {
                    Some((dur(t), millionths(d.percentage.as_ref(), &at)?))
                }
                Some(other) => return Err(unsupported(&path(&at, &variant(other)))),
                None => return Err(format!("{at}: a delay needs fixed_delay")),
            }
        }
        None => None,
    };
    let abort = match &f.abort {
        Some(a) => {
            let at = path(at, "abort");
            only(a, &at, &["error_type", "percentage"])?;
            match a.error_type {
                Some(fault_abort::ErrorType::HttpStatus(s)) => Some((
                    u16::try_from(s)
                        .ok()
                        .filter(|s| (200..600).contains(s))
                        .ok_or_else(|| format!("fault abort status {s} is invalid"))?,
                    millionths(a.percentage.as_ref(), &at)?,
                )),
                Some(other) => return Err(unsupported(&path(&at, &variant(&other)))),
                None => return Err(format!("{at}: an abort needs http_status")),
            }
        }
        None => None,
    };
    Ok(Fault { delay, abort })
}

/// A FractionalPercent as millionths (Envoy's default when absent: 100 %).
fn millionths(p: Option<&FractionalPercent>, at: &str) -> Result<u32> {
    use envoy_types::pb::envoy::r#type::v3::fractional_percent::DenominatorType;
    let Some(p) = p else {
        return Ok(1_000_000);
    };
    only(p, &path(at, "percentage"), &["numerator", "denominator"])?;
    let scale = match DenominatorType::try_from(p.denominator)
        .map_err(|_| format!("unknown denominator {}", p.denominator))?
    {
        DenominatorType::Hundred => 10_000,
        DenominatorType::TenThousand => 100,
        DenominatorType::Million => 1,
    };
    Ok(p.numerator.saturating_mul(scale).min(1_000_000))
}
