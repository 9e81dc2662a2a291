//! AuthorizationPolicy: action and provider, targets, and rules (sources, operations, conditions).

use super::{is_valid_cidr, port, Validator};
use crate::diag::Diagnostics;
use crate::security::{Action, AuthorizationPolicy};
use crate::Resource;

impl Validator<'_> {
    pub(super) fn authorization_policy(
        &self,
        r: &Resource<AuthorizationPolicy>,
        diags: &mut Diagnostics,
    ) {
        let (s, src) = (&r.spec, &r.source);
        if s.action == Action::Custom {
            if s.provider.is_none() {
                diags.error(
                    "missing-field",
                    src,
                    "spec.provider",
                    "action CUSTOM needs a `provider`",
                );
            }
            diags.error(
                "unenforced",
                src,
                "spec.action",
                "CUSTOM (external authorization) is not enforced by Hypha yet, so the policy would \
                 let through what it is meant to check: write the rule as ALLOW or DENY, or keep \
                 it out of the mesh until external authorization exists",
            );
        } else if s.provider.is_some() {
            diags.error(
                "invalid-value",
                src,
                "spec.provider",
                "`provider` is only valid with action CUSTOM",
            );
        }
        if s.selector.is_some() && (s.target_ref.is_some() || s.target_refs.is_some()) {
            diags.error(
                "exclusive-fields",
                src,
                "spec.targetRef",
                "only one of `selector` and `targetRef(s)` may be set",
            );
        }
        if s.target_ref.is_some() || s.target_refs.is_some() {
            diags.error(
                "unenforced",
                src,
                if s.target_ref.is_some() {
                    "spec.targetRef"
                } else {
                    "spec.targetRefs"
                },
                "targetRef(s) attach the policy to a waypoint or gateway, which Hypha does not \
                 run, so it would be enforced nowhere: select the workloads with `selector` \
                 instead",
            );
        }
        for (i, rule) in s.rules.iter().enumerate() {
            let rp = format!("spec.rules[{i}]");
            for (j, f) in rule.from.iter().enumerate() {
                let fp = format!("{rp}.from[{j}].source");
                let x = &f.source;
                let lists = [
                    ("principals", &x.principals),
                    ("notPrincipals", &x.not_principals),
                    ("requestPrincipals", &x.request_principals),
                    ("notRequestPrincipals", &x.not_request_principals),
                    ("namespaces", &x.namespaces),
                    ("notNamespaces", &x.not_namespaces),
                    ("ipBlocks", &x.ip_blocks),
                    ("notIpBlocks", &x.not_ip_blocks),
                    ("remoteIpBlocks", &x.remote_ip_blocks),
                    ("notRemoteIpBlocks", &x.not_remote_ip_blocks),
                ];
                if lists.iter().all(|(_, l)| l.is_empty()) {
                    diags.error(
                        "empty-source",
                        src,
                        &fp,
                        "a source needs at least one field",
                    );
                }
                for (field, list) in lists {
                    if field.ends_with("equestPrincipals") && !list.is_empty() {
                        diags.error(
                            "unenforced",
                            src,
                            format!("{fp}.{field}"),
                            format!(
                                "`{field}` needs end-user (JWT) authentication, which Hypha does \
                                 not have yet (RequestAuthentication), so no request would carry \
                                 a request principal: match peer identities with `principals` \
                                 (or `notPrincipals`) instead"
                            ),
                        );
                    }
                    for (k, v) in list.iter().enumerate() {
                        let vp = format!("{fp}.{field}[{k}]");
                        if v.is_empty() {
                            diags.error("invalid-value", src, &vp, "empty value");
                        } else if field.ends_with("pBlocks") && !is_valid_cidr(v) {
                            diags.error(
                                "invalid-cidr",
                                src,
                                &vp,
                                format!("{v:?} is not an IPv4/IPv6 address or CIDR"),
                            );
                        } else if !field.ends_with("pBlocks") && !is_wildcard_ok(v) {
                            diags.error(
                                "invalid-wildcard",
                                src,
                                &vp,
                                format!("{v:?}: `*` is allowed only at the start or the end"),
                            );
                        }
                    }
                }
            }
            for (j, t) in rule.to.iter().enumerate() {
                let tp = format!("{rp}.to[{j}].operation");
                let o = &t.operation;
                let lists = [
                    ("hosts", &o.hosts),
                    ("notHosts", &o.not_hosts),
                    ("ports", &o.ports),
                    ("notPorts", &o.not_ports),
                    ("methods", &o.methods),
                    ("notMethods", &o.not_methods),
                    ("paths", &o.paths),
                    ("notPaths", &o.not_paths),
                ];
                if lists.iter().all(|(_, l)| l.is_empty()) {
                    diags.error(
                        "empty-operation",
                        src,
                        &tp,
                        "an operation needs at least one field",
                    );
                }
                for (field, list) in lists {
                    for (k, v) in list.iter().enumerate() {
                        let vp = format!("{tp}.{field}[{k}]");
                        if field.ends_with("orts") {
                            match v.parse::<u32>() {
                                Ok(p) => {
                                    port(src, &vp, p, diags);
                                }
                                Err(_) => diags.error(
                                    "invalid-port",
                                    src,
                                    &vp,
                                    format!("{v:?} is not a port number"),
                                ),
                            }
                        } else if v.is_empty() {
                            diags.error("invalid-value", src, &vp, "empty value");
                        } else if !is_wildcard_ok(v) {
                            diags.error(
                                "invalid-wildcard",
                                src,
                                &vp,
                                format!("{v:?}: `*` is allowed only at the start or the end"),
                            );
                        }
                    }
                }
            }
            for (j, c) in rule.when.iter().enumerate() {
                let cp = format!("{rp}.when[{j}]");
                if !is_condition_key(&c.key) {
                    diags.error(
                        "invalid-condition",
                        src,
                        format!("{cp}.key"),
                        format!("unknown condition key {:?}", c.key),
                    );
                } else if c.key.starts_with("request.auth.") {
                    diags.error(
                        "unenforced",
                        src,
                        format!("{cp}.key"),
                        format!(
                            "{:?} needs end-user (JWT) authentication, which Hypha does not have \
                             yet (RequestAuthentication): use `source.principal` or \
                             `request.headers[...]` conditions instead",
                            c.key
                        ),
                    );
                }
                if c.values.is_empty() && c.not_values.is_empty() {
                    diags.error(
                        "missing-field",
                        src,
                        &cp,
                        "a condition needs `values` or `notValues`",
                    );
                }
                let cidr_key =
                    matches!(c.key.as_str(), "source.ip" | "remote.ip" | "destination.ip");
                for (field, list) in [("values", &c.values), ("notValues", &c.not_values)] {
                    for (k, v) in list.iter().enumerate() {
                        let vp = format!("{cp}.{field}[{k}]");
                        if cidr_key && !is_valid_cidr(v) {
                            diags.error(
                                "invalid-cidr",
                                src,
                                vp,
                                format!("{v:?} is not an IPv4/IPv6 address or CIDR"),
                            );
                        } else if c.key == "destination.port"
                            && v.parse::<u32>().map_or(true, |p| p == 0 || p > 65535)
                        {
                            diags.error(
                                "invalid-port",
                                src,
                                vp,
                                format!("{v:?} is not a port number"),
                            );
                        }
                    }
                }
            }
        }
    }
}

fn is_wildcard_ok(s: &str) -> bool {
    if s == "*" {
        return true;
    }
    let inner = s
        .strip_prefix('*')
        .or_else(|| s.strip_suffix('*'))
        .unwrap_or(s);
    !inner.contains('*')
}

fn is_condition_key(k: &str) -> bool {
    let bracketed = |prefix: &str| {
        k.strip_prefix(prefix)
            .and_then(|r| r.strip_prefix('['))
            .is_some_and(|r| r.len() > 1 && r.ends_with(']'))
    };
    matches!(
        k,
        "source.ip"
            | "remote.ip"
            | "source.namespace"
            | "source.principal"
            | "request.auth.principal"
            | "request.auth.audiences"
            | "request.auth.presenter"
            | "destination.ip"
            | "destination.port"
            | "connection.sni"
    ) || bracketed("request.headers")
        || bracketed("request.auth.claims")
        || k.starts_with("experimental.envoy.filters.")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        for ok in ["*", "/api/*", "*.example.com", "/exact"] {
            assert!(is_wildcard_ok(ok), "{ok}");
        }
        for bad in ["/a/*/b", "*mid*", "**"] {
            assert!(!is_wildcard_ok(bad), "{bad}");
        }
    }
}
