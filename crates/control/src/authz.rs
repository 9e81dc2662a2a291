//! AuthorizationPolicy → Envoy RBAC filters for a workload's inbound chains, as Istio builds
//! them: the policies of the workload's namespace and of the root namespace that select it, one
//! RBAC filter per action in Istio's order (AUDIT → LOG, DENY, then ALLOW). With an ALLOW
//! filter present (any ALLOW policy selects the workload), a request no ALLOW rule matches is
//! denied; without one, everything DENY leaves is allowed.
//!
//! Within a rule, `from`, `to` and `when` must all match; each lists alternatives (any source,
//! any operation), each field of a source or operation must match, and a field matches when
//! any of its values does (`not*` fields when none does). On TCP chains, HTTP-only fields
//! (hosts, methods, paths, request headers, request principals) cannot be checked: an ALLOW
//! rule using one never matches, and a DENY rule drops it (denying more), as Istio does.
//! Request principals need JWT authentication, which Hypha does not do yet: they match no
//! request (their `not` form every request).

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::CidrRange;
use envoy_types::pb::envoy::config::listener::v3::{filter, Filter};
use envoy_types::pb::envoy::config::rbac::v3::{
    permission, principal, rbac, Permission, Policy, Principal, Rbac,
};
use envoy_types::pb::envoy::config::route::v3::{header_matcher, HeaderMatcher};
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_filter, HttpFilter,
};
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use envoy_types::pb::envoy::r#type::matcher::v3::{
    path_matcher, string_matcher::MatchPattern, PathMatcher, RegexMatcher, StringMatcher,
};
use hypha_config::security::{Action, AuthorizationPolicy, Condition, Operation, Source};
use hypha_config::types::labels_match;
use hypha_config::{Config, Resource};

use envoy_types::pb::google::protobuf::Any;
use prost::Message;

use crate::envoy::u32v;

pub const HTTP_RBAC: &str = "envoy.filters.http.rbac";
pub const NETWORK_RBAC: &str = "envoy.filters.network.rbac";

/// The policies that apply to a workload: its namespace's and the root namespace's, without a
/// selector or with one that matches its labels.
fn applicable<'a>(
    cfg: &'a Config,
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> Vec<&'a Resource<AuthorizationPolicy>> {
    let root = cfg.mesh.root_namespace.as_str();
    let mut out: Vec<_> = cfg
        .authorization_policies
        .iter()
        .filter(|p| p.namespace == namespace || p.namespace == root)
        .filter(|p| {
            p.spec
                .selector
                .as_ref()
                .is_none_or(|s| labels_match(&s.match_labels, labels))
        })
        .collect();
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    out
}

/// The RBAC configs for a workload's chain, in the order they run (empty: no policy).
pub fn rbac(
    cfg: &Config,
    namespace: &str,
    labels: &BTreeMap<String, String>,
    tcp: bool,
) -> Vec<Rules> {
    let policies = applicable(cfg, namespace, labels);
    let mut out = Vec::new();
    for (action, envoy) in [
        (Action::Audit, rbac::Action::Log),
        (Action::Deny, rbac::Action::Deny),
        (Action::Allow, rbac::Action::Allow),
    ] {
        let of_action: Vec<_> = policies
            .iter()
            .filter(|p| p.spec.action == action)
            .collect();
        if of_action.is_empty() {
            continue;
        }
        let mut map = BTreeMap::new();
        for p in of_action {
            for (i, rule) in p.spec.rules.iter().enumerate() {
                let name = format!("ns[{}]-policy[{}]-rule[{i}]", p.namespace, p.name);
                if let Some(policy) = translate_rule(rule, tcp, action == Action::Deny) {
                    map.insert(name, policy);
                }
            }
        }
        out.push(Rules {
            action: envoy,
            policies: map,
        });
    }
    out
}

/// One RBAC filter's rules: its action and its policies by name, in name order.
#[derive(Debug, Clone)]
pub struct Rules {
    pub action: rbac::Action,
    pub policies: BTreeMap<String, Policy>,
}

impl Rules {
    /// The `RBAC` message's bytes with its policies in name order: prost encodes a map from
    /// a `HashMap`, whose order changes from one process to the next, and the resource
    /// version (a hash of the bytes) with it; a restarted control plane would re-push every
    /// chain with a policy.
    fn encoded(&self) -> Vec<u8> {
        let mut buf = Rbac {
            action: self.action as i32,
            ..Default::default()
        }
        .encode_to_vec();
        prost::encoding::btree_map::encode(
            prost::encoding::string::encode,
            prost::encoding::string::encoded_len,
            prost::encoding::message::encode,
            prost::encoding::message::encoded_len,
            RBAC_POLICIES,
            &self.policies,
            &mut buf,
        );
        buf
    }
}

/// Field numbers: `RBAC.policies`, and `rules` in both RBAC filters' configs.
const RBAC_POLICIES: u32 = 2;
const FILTER_RULES: u32 = 1;

/// A filter config (`head`, its `rules` unset) with `rules` appended as field 1, in a
/// deterministic encoding.
fn filter_config<M: prost::Message + prost::Name>(head: &M, rules: &Rules) -> Any {
    let mut value = head.encode_to_vec();
    prost::encoding::bytes::encode(FILTER_RULES, &rules.encoded(), &mut value);
    Any {
        type_url: M::type_url(),
        value,
    }
}

/// HTTP filters for the inbound HCM, before the router.
pub fn http_filters(rules: Vec<Rules>) -> Vec<HttpFilter> {
    rules
        .iter()
        .map(|r| HttpFilter {
            name: HTTP_RBAC.into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(filter_config(
                &HttpRbac::default(),
                r,
            ))),
            ..Default::default()
        })
        .collect()
}

/// Network filters for an inbound TCP chain, before the TCP proxy.
pub fn network_filters(rules: Vec<Rules>) -> Vec<Filter> {
    rules
        .iter()
        .map(|r| Filter {
            name: NETWORK_RBAC.into(),
            config_type: Some(filter::ConfigType::TypedConfig(filter_config(
                &NetworkRbac {
                    stat_prefix: "tcp.".into(),
                    ..Default::default()
                },
                r,
            ))),
        })
        .collect()
}

/// A rule as an Envoy policy; `None` when it can never match (an ALLOW rule needing HTTP on
/// a TCP chain).
fn translate_rule(rule: &hypha_config::security::Rule, tcp: bool, deny: bool) -> Option<Policy> {
    let mut perms = Vec::new();
    let mut princs = Vec::new();
    if !rule.to.is_empty() {
        let mut ops = Vec::new();
        for t in &rule.to {
            ops.push(operation(&t.operation, tcp, deny)?);
        }
        perms.push(or_perm(ops));
    }
    if !rule.from.is_empty() {
        let mut sources = Vec::new();
        for f in &rule.from {
            sources.push(source(&f.source, tcp, deny)?);
        }
        princs.push(or_princ(sources));
    }
    for c in &rule.when {
        match condition(c, tcp, deny)? {
            Some(Side::Permission(p)) => perms.push(p),
            Some(Side::Principal(p)) => princs.push(p),
            None => {}
        }
    }
    Some(Policy {
        permissions: vec![and_perm(perms)],
        principals: vec![and_princ(princs)],
        ..Default::default()
    })
}

enum Side {
    Permission(Permission),
    Principal(Principal),
}

/// A field that needs HTTP, on a TCP chain: an ALLOW rule can never match (`None`); a DENY
/// rule drops the field (`Some(None)`).
fn http_only<T>(tcp: bool, deny: bool, f: impl FnOnce() -> T) -> Option<Option<T>> {
    match (tcp, deny) {
        (false, _) => Some(Some(f())),
        (true, true) => Some(None),
        (true, false) => None,
    }
}

fn operation(op: &Operation, tcp: bool, deny: bool) -> Option<Permission> {
    let mut and = Vec::new();
    let mut field =
        |values: &[String], not: bool, http: bool, leaf: &dyn Fn(&str) -> Permission| {
            if values.is_empty() {
                return Some(());
            }
            let make = || {
                let any = or_perm(values.iter().map(|v| leaf(v)).collect());
                if not {
                    not_perm(any)
                } else {
                    any
                }
            };
            if http {
                if let Some(p) = http_only(tcp, deny, make)? {
                    and.push(p);
                }
            } else {
                and.push(make());
            }
            Some(())
        };
    let host = |v: &str| header_perm(":authority", wildcard(v, true));
    let method = |v: &str| header_perm(":method", exact(v));
    let path = |v: &str| Permission {
        rule: Some(permission::Rule::UrlPath(PathMatcher {
            rule: Some(path_matcher::Rule::Path(wildcard(v, false))),
        })),
    };
    let port = |v: &str| Permission {
        rule: Some(permission::Rule::DestinationPort(v.parse().unwrap_or(0))),
    };
    field(&op.hosts, false, true, &host)?;
    field(&op.not_hosts, true, true, &host)?;
    field(&op.methods, false, true, &method)?;
    field(&op.not_methods, true, true, &method)?;
    field(&op.paths, false, true, &path)?;
    field(&op.not_paths, true, true, &path)?;
    field(&op.ports, false, false, &port)?;
    field(&op.not_ports, true, false, &port)?;
    Some(and_perm(and))
}

fn source(s: &Source, tcp: bool, deny: bool) -> Option<Principal> {
    let mut and = Vec::new();
    let mut field = |values: &[String], not: bool, leaf: &dyn Fn(&str) -> Principal| {
        if values.is_empty() {
            return;
        }
        let any = or_princ(values.iter().map(|v| leaf(v)).collect());
        and.push(if not { not_princ(any) } else { any });
    };
    field(&s.principals, false, &principal_id);
    field(&s.not_principals, true, &principal_id);
    field(&s.namespaces, false, &namespace_id);
    field(&s.not_namespaces, true, &namespace_id);
    field(&s.ip_blocks, false, &|v| cidr_princ(v, false));
    field(&s.not_ip_blocks, true, &|v| cidr_princ(v, false));
    field(&s.remote_ip_blocks, false, &|v| cidr_princ(v, true));
    field(&s.not_remote_ip_blocks, true, &|v| cidr_princ(v, true));
    // No request carries a request principal (no JWT authentication yet).
    if !s.request_principals.is_empty() {
        if let Some(p) = http_only(tcp, deny, || not_princ(any_princ()))? {
            and.push(p);
        }
    }
    Some(and_princ(and))
}

fn condition(c: &Condition, tcp: bool, deny: bool) -> Option<Option<Side>> {
    let key = c.key.as_str();
    let side = |values: &[String], leaf: &dyn Fn(&str) -> Side| -> Vec<Side> {
        values.iter().map(|v| leaf(v)).collect()
    };
    let build = |leaf: &dyn Fn(&str) -> Side| -> Side {
        let pos = side(&c.values, leaf);
        let neg = side(&c.not_values, leaf);
        combine(pos, neg)
    };
    if let Some(header) = key
        .strip_prefix("request.headers[")
        .and_then(|r| r.strip_suffix(']'))
    {
        let name = header.to_ascii_lowercase();
        return http_only(tcp, deny, || {
            build(&|v| Side::Principal(header_princ(&name, wildcard(v, false))))
        });
    }
    if key.starts_with("request.auth.") {
        // No request is authenticated by JWT: `values` match nothing, `notValues` all.
        let never = if c.values.is_empty() {
            any_princ()
        } else {
            not_princ(any_princ())
        };
        return http_only(tcp, deny, || Side::Principal(never));
    }
    let side = match key {
        "source.ip" => build(&|v| Side::Principal(cidr_princ(v, false))),
        "remote.ip" => build(&|v| Side::Principal(cidr_princ(v, true))),
        "source.namespace" => build(&|v| Side::Principal(namespace_id(v))),
        "source.principal" => build(&|v| Side::Principal(principal_id(v))),
        "destination.ip" => build(&|v| {
            Side::Permission(Permission {
                rule: Some(permission::Rule::DestinationIp(cidr(v))),
            })
        }),
        "destination.port" => build(&|v| {
            Side::Permission(Permission {
                rule: Some(permission::Rule::DestinationPort(v.parse().unwrap_or(0))),
            })
        }),
        "connection.sni" => build(&|v| {
            Side::Permission(Permission {
                rule: Some(permission::Rule::RequestedServerName(wildcard(v, false))),
            })
        }),
        // `experimental.envoy.filters.*`: nothing Hypha can evaluate. An ALLOW rule with it
        // never matches; a DENY rule ignores it.
        _ => return if deny { Some(None) } else { None },
    };
    Some(Some(side))
}

/// `values` (any) and `notValues` (none) of one condition, on one side.
fn combine(pos: Vec<Side>, neg: Vec<Side>) -> Side {
    let principal = matches!(pos.first().or(neg.first()), Some(Side::Principal(_)));
    if principal {
        let unwrap = |v: Vec<Side>| -> Vec<Principal> {
            v.into_iter()
                .filter_map(|s| match s {
                    Side::Principal(p) => Some(p),
                    Side::Permission(_) => None,
                })
                .collect()
        };
        let (pos, neg) = (unwrap(pos), unwrap(neg));
        let mut and = Vec::new();
        if !pos.is_empty() {
            and.push(or_princ(pos));
        }
        if !neg.is_empty() {
            and.push(not_princ(or_princ(neg)));
        }
        Side::Principal(and_princ(and))
    } else {
        let unwrap = |v: Vec<Side>| -> Vec<Permission> {
            v.into_iter()
                .filter_map(|s| match s {
                    Side::Permission(p) => Some(p),
                    Side::Principal(_) => None,
                })
                .collect()
        };
        let (pos, neg) = (unwrap(pos), unwrap(neg));
        let mut and = Vec::new();
        if !pos.is_empty() {
            and.push(or_perm(pos));
        }
        if !neg.is_empty() {
            and.push(not_perm(or_perm(neg)));
        }
        Side::Permission(and_perm(and))
    }
}

/// Istio's value wildcards: `*` alone (present), `*suffix`, `prefix*`, else exact.
fn wildcard(v: &str, ignore_case: bool) -> StringMatcher {
    let pattern = if v == "*" {
        MatchPattern::SafeRegex(RegexMatcher {
            regex: ".+".into(),
            ..Default::default()
        })
    } else if let Some(s) = v.strip_prefix('*') {
        MatchPattern::Suffix(s.into())
    } else if let Some(p) = v.strip_suffix('*') {
        MatchPattern::Prefix(p.into())
    } else {
        MatchPattern::Exact(v.into())
    };
    StringMatcher {
        match_pattern: Some(pattern),
        ignore_case,
    }
}

fn exact(v: &str) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(MatchPattern::Exact(v.into())),
        ignore_case: false,
    }
}

/// Istio principals are SPIFFE IDs without the scheme (`cluster.local/ns/x/sa/y`), with the
/// same wildcards; `*` is any authenticated peer.
fn principal_id(v: &str) -> Principal {
    let name = if v == "*" {
        None
    } else {
        let mut m = wildcard(v, false);
        m.match_pattern = match m.match_pattern {
            Some(MatchPattern::Exact(s)) => Some(MatchPattern::Exact(format!("spiffe://{s}"))),
            Some(MatchPattern::Prefix(s)) => Some(MatchPattern::Prefix(format!("spiffe://{s}"))),
            other => other,
        };
        Some(m)
    };
    Principal {
        identifier: Some(principal::Identifier::Authenticated(
            principal::Authenticated {
                principal_name: name,
            },
        )),
    }
}

/// A namespace, as Istio matches it: in the peer's SPIFFE ID (`.../ns/<ns>/...`).
fn namespace_id(v: &str) -> Principal {
    let ns = if v == "*" {
        "[^/]+".to_owned()
    } else if let Some(s) = v.strip_prefix('*') {
        format!("[^/]*{}", regex_escape(s))
    } else if let Some(p) = v.strip_suffix('*') {
        format!("{}[^/]*", regex_escape(p))
    } else {
        regex_escape(v)
    };
    Principal {
        identifier: Some(principal::Identifier::Authenticated(
            principal::Authenticated {
                principal_name: Some(StringMatcher {
                    match_pattern: Some(MatchPattern::SafeRegex(RegexMatcher {
                        regex: format!(".*/ns/{ns}/.*"),
                        ..Default::default()
                    })),
                    ignore_case: false,
                }),
            },
        )),
    }
}

fn regex_escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn cidr(v: &str) -> CidrRange {
    let (ip, len) = match v.split_once('/') {
        Some((ip, len)) => (ip, len.parse().ok()),
        None => (v, None),
    };
    let full = if ip.contains(':') { 128 } else { 32 };
    CidrRange {
        address_prefix: ip.into(),
        prefix_len: Some(u32v(len.unwrap_or(full))),
    }
}

fn cidr_princ(v: &str, remote: bool) -> Principal {
    let c = cidr(v);
    Principal {
        identifier: Some(if remote {
            principal::Identifier::RemoteIp(c)
        } else {
            principal::Identifier::DirectRemoteIp(c)
        }),
    }
}

fn header_matcher(name: &str, m: StringMatcher) -> HeaderMatcher {
    HeaderMatcher {
        name: name.into(),
        header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(m)),
        ..Default::default()
    }
}

fn header_perm(name: &str, m: StringMatcher) -> Permission {
    Permission {
        rule: Some(permission::Rule::Header(header_matcher(name, m))),
    }
}

fn header_princ(name: &str, m: StringMatcher) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::Header(header_matcher(name, m))),
    }
}

fn any_perm() -> Permission {
    Permission {
        rule: Some(permission::Rule::Any(true)),
    }
}

fn any_princ() -> Principal {
    Principal {
        identifier: Some(principal::Identifier::Any(true)),
    }
}

fn and_perm(mut v: Vec<Permission>) -> Permission {
    match v.len() {
        0 => any_perm(),
        1 => v.remove(0),
        _ => Permission {
            rule: Some(permission::Rule::AndRules(permission::Set { rules: v })),
        },
    }
}

fn or_perm(mut v: Vec<Permission>) -> Permission {
    match v.len() {
        1 => v.remove(0),
        _ => Permission {
            rule: Some(permission::Rule::OrRules(permission::Set { rules: v })),
        },
    }
}

fn not_perm(p: Permission) -> Permission {
    Permission {
        rule: Some(permission::Rule::NotRule(Box::new(p))),
    }
}

fn and_princ(mut v: Vec<Principal>) -> Principal {
    match v.len() {
        0 => any_princ(),
        1 => v.remove(0),
        _ => Principal {
            identifier: Some(principal::Identifier::AndIds(principal::Set { ids: v })),
        },
    }
}

fn or_princ(mut v: Vec<Principal>) -> Principal {
    match v.len() {
        1 => v.remove(0),
        _ => Principal {
            identifier: Some(principal::Identifier::OrIds(principal::Set { ids: v })),
        },
    }
}

fn not_princ(p: Principal) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::NotId(Box::new(p))),
    }
}
