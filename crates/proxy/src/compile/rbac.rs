//! RBAC filters (network and HTTP) compiled into [`crate::authz`] policies: permissions,
//! principals, and the alternatives among them folded into matcher tables.

use std::net::IpAddr;

use envoy_types::pb::envoy::config::rbac::v3::{
    permission, principal, rbac as envoy_rbac, Permission, Principal, Rbac as EnvoyRbac,
};
use hypha_matcher::{Attr, Condition, Test};

use super::route::{header_conditions, string_match};
use super::{only, path, unsupported, unsupported_value, variant, Result};
use crate::authz;

/// An RBAC filter's rules.
pub(super) fn rbac(rules: Option<&EnvoyRbac>, at: &str) -> Result<authz::Rbac> {
    let Some(r) = rules else {
        return Err(format!(
            "{at}: rules are required (shadow rules and matchers are not supported)"
        ));
    };
    only(r, at, &["action", "policies"])?;
    let action = match envoy_rbac::Action::try_from(r.action) {
        Ok(envoy_rbac::Action::Allow) => authz::Action::Allow,
        Ok(envoy_rbac::Action::Deny) => authz::Action::Deny,
        Ok(envoy_rbac::Action::Log) => authz::Action::Log,
        Err(_) => return Err(unsupported_value(&path(at, "action"), r.action)),
    };
    let mut names: Vec<&String> = r.policies.keys().collect();
    names.sort();
    let mut policies = Vec::new();
    for name in names {
        let p = &r.policies[name];
        let at = format!("{at}.policies[{name:?}]");
        only(p, &at, &["permissions", "principals"])?;
        let perms = any_permission(&p.permissions, &path(&at, "permissions"))?;
        let princs = any_principal(&p.principals, &path(&at, "principals"))?;
        policies.push((
            name.clone(),
            authz::Permission::Or(perms),
            authz::Principal::Or(princs),
        ));
    }
    Ok(authz::Rbac { action, policies })
}

fn permission(p: &Permission, at: &str) -> Result<authz::Permission> {
    use authz::Permission as P;
    only(p, at, &["rule"])?;
    let all = |v: &[Permission]| {
        v.iter()
            .map(|x| permission(x, at))
            .collect::<Result<Vec<_>>>()
    };
    Ok(match &p.rule {
        Some(permission::Rule::AndRules(set)) => P::And(all(&set.rules)?),
        Some(permission::Rule::OrRules(set)) => P::Or(any_permission(&set.rules, at)?),
        Some(permission::Rule::Any(true)) => P::Any,
        Some(permission::Rule::NotRule(inner)) => P::Not(Box::new(permission(inner, at)?)),
        Some(permission::Rule::Header(h)) => {
            P::Http(authz::Leaf::request(header_conditions(h.clone())?)?)
        }
        Some(permission::Rule::UrlPath(pm)) => P::Http(authz::Leaf::request(url_path(pm, at)?)?),
        Some(permission::Rule::DestinationPort(port)) => {
            P::DestinationPort(u16::try_from(*port).map_err(|_| unsupported_value(at, port))?)
        }
        Some(permission::Rule::DestinationIp(c)) => P::DestinationIp(cidr(c, at)?),
        Some(permission::Rule::RequestedServerName(sm)) => {
            P::ServerName(authz::Leaf::value(string_match(sm.clone(), at)?)?)
        }
        Some(other) => return Err(unsupported(&path(at, &variant(other)))),
        None => return Err(format!("{at}: a rule is required")),
    })
}

#[allow(deprecated)] // `source_ip`, which Envoy still reads as the direct peer's address
fn principal(p: &Principal, at: &str) -> Result<authz::Principal> {
    use authz::Principal as P;
    only(p, at, &["identifier"])?;
    let all = |v: &[Principal]| {
        v.iter()
            .map(|x| principal(x, at))
            .collect::<Result<Vec<_>>>()
    };
    Ok(match &p.identifier {
        Some(principal::Identifier::AndIds(set)) => P::And(all(&set.ids)?),
        Some(principal::Identifier::OrIds(set)) => P::Or(any_principal(&set.ids, at)?),
        Some(principal::Identifier::Any(true)) => P::Any,
        Some(principal::Identifier::NotId(inner)) => P::Not(Box::new(principal(inner, at)?)),
        Some(principal::Identifier::Authenticated(a)) => {
            only(a, &path(at, "authenticated"), &["principal_name"])?;
            P::Authenticated(
                a.principal_name
                    .clone()
                    .map(|sm| string_match(sm, at).and_then(authz::Leaf::value))
                    .transpose()?,
            )
        }
        Some(principal::Identifier::DirectRemoteIp(c) | principal::Identifier::SourceIp(c)) => {
            P::DirectRemoteIp(cidr(c, at)?)
        }
        Some(principal::Identifier::RemoteIp(c)) => P::RemoteIp(cidr(c, at)?),
        Some(principal::Identifier::Header(h)) => {
            P::Http(authz::Leaf::request(header_conditions(h.clone())?)?)
        }
        Some(principal::Identifier::UrlPath(pm)) => {
            P::Http(authz::Leaf::request(url_path(pm, at)?)?)
        }
        Some(other) => return Err(unsupported(&path(at, &variant(other)))),
        None => return Err(format!("{at}: an identifier is required")),
    })
}

/// Alternatives: every test on the request among them folded into one leaf (one table, one
/// pass over the request), the others as they are.
fn any_permission(v: &[Permission], at: &str) -> Result<Vec<authz::Permission>> {
    let mut out = Vec::new();
    let mut http = Vec::new();
    for x in v {
        match &x.rule {
            Some(permission::Rule::Header(h)) => {
                only(x, at, &["rule"])?;
                http.push(header_conditions(h.clone())?);
            }
            Some(permission::Rule::UrlPath(pm)) => {
                only(x, at, &["rule"])?;
                http.push(url_path(pm, at)?);
            }
            _ => out.push(permission(x, at)?),
        }
    }
    if !http.is_empty() {
        out.push(authz::Permission::Http(authz::Leaf::any_of(http)?));
    }
    Ok(out)
}

/// Alternatives: every test on the request among them folded into one leaf, and every
/// SPIFFE ID test into another, the others as they are.
fn any_principal(v: &[Principal], at: &str) -> Result<Vec<authz::Principal>> {
    let mut out = Vec::new();
    let (mut http, mut ids) = (Vec::new(), Vec::new());
    for x in v {
        match &x.identifier {
            Some(principal::Identifier::Header(h)) => {
                only(x, at, &["identifier"])?;
                http.push(header_conditions(h.clone())?);
            }
            Some(principal::Identifier::UrlPath(pm)) => {
                only(x, at, &["identifier"])?;
                http.push(url_path(pm, at)?);
            }
            Some(principal::Identifier::Authenticated(a)) if a.principal_name.is_some() => {
                only(x, at, &["identifier"])?;
                only(a, &path(at, "authenticated"), &["principal_name"])?;
                if let Some(sm) = &a.principal_name {
                    ids.push(string_match(sm.clone(), at)?);
                }
            }
            _ => out.push(principal(x, at)?),
        }
    }
    if !http.is_empty() {
        out.push(authz::Principal::Http(authz::Leaf::any_of(http)?));
    }
    if !ids.is_empty() {
        out.push(authz::Principal::Authenticated(Some(
            authz::Leaf::any_value(ids)?,
        )));
    }
    Ok(out)
}

/// The condition of a `url_path` test.
fn url_path(
    pm: &envoy_types::pb::envoy::r#type::matcher::v3::PathMatcher,
    at: &str,
) -> Result<Vec<Condition>> {
    use envoy_types::pb::envoy::r#type::matcher::v3::path_matcher;
    only(pm, at, &["rule"])?;
    let Some(path_matcher::Rule::Path(sm)) = &pm.rule else {
        return Err(format!("{at}: url_path needs a path"));
    };
    Ok(vec![Condition {
        attr: Attr::Path,
        test: Test::Matches(string_match(sm.clone(), at)?),
        invert: false,
    }])
}

fn cidr(c: &envoy_types::pb::envoy::config::core::v3::CidrRange, at: &str) -> Result<authz::Cidr> {
    only(c, at, &["address_prefix", "prefix_len"])?;
    let addr: IpAddr = c
        .address_prefix
        .parse()
        .map_err(|_| format!("{at}: bad address {:?}", c.address_prefix))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = c.prefix_len.as_ref().map_or(0, |l| l.value);
    if len > max {
        return Err(format!("{at}: prefix length {len} is too long for {addr}"));
    }
    Ok(authz::Cidr {
        addr,
        len: len as u8,
    })
}
