//! MeshConfig: trust domain, IP families, CA signers (file or PKCS#11 keys) and tenants.

use std::collections::{HashMap, HashSet};

use super::{is_dns_name, Validator};
use crate::diag::{Diagnostics, Source};
use crate::mesh::Pkcs11Key;

impl Validator<'_> {
    pub(super) fn mesh(&self, diags: &mut Diagnostics) {
        let Some(src) = &self.cfg.mesh_source else {
            return;
        };
        let m = &self.cfg.mesh;
        crate::proxy::check(&m.default_config, src, "spec.defaultConfig.", diags);
        if !is_dns_name(&m.trust_domain) {
            diags.error(
                "invalid-trust-domain",
                src,
                "spec.trustDomain",
                format!("trust domain {:?} is not a valid DNS name", m.trust_domain),
            );
        }
        if m.ip_families.is_empty() {
            diags.error(
                "ip-families",
                src,
                "spec.ipFamilies",
                "at least one IP family is required",
            );
        }
        if m.ip_families.len() == 2 && m.ip_families[0] == m.ip_families[1] {
            diags.error(
                "ip-families",
                src,
                "spec.ipFamilies[1]",
                "IP family listed twice",
            );
        }
        let mut signers = HashSet::new();
        for (i, s) in m.signers.iter().enumerate() {
            let path = format!("spec.signers[{i}]");
            if !signers.insert(s.name.as_str()) {
                diags.error(
                    "duplicate-name",
                    src,
                    format!("{path}.name"),
                    format!("signer {:?} defined twice", s.name),
                );
            }
            if s.key.file.is_some() && s.key.pkcs11.is_some() {
                diags.error(
                    "signer-key",
                    src,
                    format!("{path}.key"),
                    "a signer key is either `file` or `pkcs11`, not both",
                );
            }
            if let Some(p) = &s.key.pkcs11 {
                pkcs11_key(p, src, &format!("{path}.key.pkcs11"), diags);
            }
            if s.max_certificate_ttl.as_std().is_zero() {
                diags.error(
                    "invalid-value",
                    src,
                    format!("{path}.maxCertificateTtl"),
                    "maxCertificateTtl must be positive",
                );
            }
        }
        let tenant_names: HashSet<&str> = m.tenants.iter().map(|t| t.name.as_str()).collect();
        let mut seen_tenants = HashSet::new();
        let mut ns_owner: HashMap<&str, &str> = HashMap::new();
        for (i, t) in m.tenants.iter().enumerate() {
            let path = format!("spec.tenants[{i}]");
            if !seen_tenants.insert(t.name.as_str()) {
                diags.error(
                    "duplicate-name",
                    src,
                    format!("{path}.name"),
                    format!("tenant {:?} defined twice", t.name),
                );
            }
            if !signers.contains(t.signer.as_str()) {
                diags.error(
                    "unknown-signer",
                    src,
                    format!("{path}.signer"),
                    format!(
                        "tenant {:?} names signer {:?}, which is not in spec.signers",
                        t.name, t.signer
                    ),
                );
            }
            if t.namespaces.is_empty() {
                diags.error(
                    "empty-tenant",
                    src,
                    format!("{path}.namespaces"),
                    "a tenant needs at least one namespace",
                );
            }
            for (j, ns) in t.namespaces.iter().enumerate() {
                if let Some(other) = ns_owner.insert(ns, &t.name) {
                    diags.error(
                        "namespace-in-two-tenants",
                        src,
                        format!("{path}.namespaces[{j}]"),
                        format!("namespace {ns:?} is already in tenant {other:?}"),
                    );
                }
            }
            for (j, other) in t.trust_tenants.iter().enumerate() {
                if !tenant_names.contains(other.as_str()) {
                    diags.error(
                        "unknown-tenant",
                        src,
                        format!("{path}.trustTenants[{j}]"),
                        format!("unknown tenant {other:?}"),
                    );
                }
            }
        }
    }
}

/// A token-held signer key: where the token is, and the attestation policy that must approve it
/// (none is an error: a token nobody vouched for is never used).
fn pkcs11_key(p: &Pkcs11Key, src: &Source, path: &str, diags: &mut Diagnostics) {
    if p.pin_file.is_some() == p.pin_env.is_some() {
        diags.error(
            "signer-key",
            src,
            path,
            "exactly one of `pinFile` and `pinEnv` is required",
        );
    }
    for (field, value) in [
        ("module", &p.module),
        ("tokenLabel", &p.token_label),
        ("keyLabel", &p.key_label),
    ] {
        if value.trim().is_empty() {
            diags.error(
                "signer-key",
                src,
                format!("{path}.{field}"),
                format!("`{field}` must not be empty"),
            );
        }
    }
    let Some(a) = &p.attestation else {
        diags.error(
            "no-attestation",
            src,
            path,
            "a pkcs11 signer needs an `attestation` policy (`allow` or `command`) that approves \
             the token before the CA uses it",
        );
        return;
    };
    let path = format!("{path}.attestation");
    if a.allow.is_some() == a.command.is_some() {
        diags.error(
            "attestation",
            src,
            &path,
            "exactly one of `allow` and `command` is required",
        );
    }
    if let Some(allow) = &a.allow {
        if allow.labels.is_empty()
            && allow.serial_numbers.is_empty()
            && allow.manufacturers.is_empty()
        {
            diags.error(
                "attestation",
                src,
                format!("{path}.allow"),
                "an allow list needs at least one of `labels`, `serialNumbers`, `manufacturers`",
            );
        }
        for (field, list) in [
            ("labels", &allow.labels),
            ("serialNumbers", &allow.serial_numbers),
            ("manufacturers", &allow.manufacturers),
        ] {
            for (i, v) in list.iter().enumerate() {
                if v.trim().is_empty() {
                    diags.error(
                        "attestation",
                        src,
                        format!("{path}.allow.{field}[{i}]"),
                        "an empty entry matches no token",
                    );
                }
            }
        }
    }
    if let Some(c) = &a.command {
        if !c.path.starts_with('/') {
            diags.error(
                "attestation",
                src,
                format!("{path}.command.path"),
                format!("{:?} is not an absolute path", c.path),
            );
        }
        if c.timeout.as_std().is_zero() {
            diags.error(
                "invalid-value",
                src,
                format!("{path}.command.timeout"),
                "timeout must be positive",
            );
        }
    }
}
