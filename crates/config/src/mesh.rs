//! Hypha's mesh-wide settings (`apiVersion: hypha.dev/v1alpha1`, `kind: MeshConfig`): trust
//! domain, certificate signers, tenants and the roots they share, and default IP families.
//!
//! The schema is built for many tenants from the start: every namespace belongs to exactly one
//! tenant, every tenant names one signer (its own CA and root), and a tenant trusts other
//! tenants' roots only where `trustTenants` says so. One tenant covering `*` is the default.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::types::Duration;

pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
pub const DEFAULT_DOMAIN_SUFFIX: &str = "cluster.local";

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshConfig {
    /// SPIFFE trust domain: identities are `spiffe://<trustDomain>/ns/<ns>/sa/<sa>`.
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// DNS suffix of service hosts: short names resolve to `<name>.<ns>.svc.<domainSuffix>`.
    #[serde(default = "default_domain_suffix")]
    pub domain_suffix: String,
    /// Namespace whose policies apply mesh-wide (Istio's root namespace).
    #[serde(default = "default_root_namespace")]
    pub root_namespace: String,
    /// Address families listeners bind and endpoints carry, in order of preference.
    #[serde(default = "default_ip_families")]
    pub ip_families: Vec<IpFamily>,
    #[serde(default = "default_signers")]
    pub signers: Vec<Signer>,
    #[serde(default = "default_tenants")]
    pub tenants: Vec<Tenant>,
    /// How sidecars normalize request paths before routing and authorization (Istio's
    /// `meshConfig.pathNormalization`).
    #[serde(default)]
    pub path_normalization: PathNormalization,
    /// The sidecars' `ProxyConfig` where a pod's `proxy.istio.io/config` says nothing (Istio's
    /// `meshConfig.defaultConfig`): what the injector gives every pod.
    #[serde(default)]
    pub default_config: crate::proxy::ProxyConfig,
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            trust_domain: default_trust_domain(),
            domain_suffix: default_domain_suffix(),
            root_namespace: default_root_namespace(),
            ip_families: default_ip_families(),
            signers: default_signers(),
            tenants: default_tenants(),
            path_normalization: PathNormalization::default(),
            default_config: crate::proxy::ProxyConfig::default(),
        }
    }
}

/// Istio's `ProxyPathNormalization`: `{normalization: BASE}` by default.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathNormalization {
    #[serde(default)]
    pub normalization: Normalization,
}

/// What is done to a request path before routing and authorization see it (and the app gets
/// it), in Envoy's terms.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Normalization {
    /// The same as `Base`.
    #[default]
    Default,
    /// Nothing: the path goes as the client sent it.
    None,
    /// RFC 3986 normalization: `%XX` of unreserved characters decoded, backslashes as
    /// slashes, dot segments removed; `%00` refused.
    Base,
    /// `Base`, then repeated slashes merged.
    MergeSlashes,
    /// `%2F` and `%5C` decoded first, then `MergeSlashes`.
    DecodeAndMergeSlashes,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Hash)]
pub enum IpFamily {
    IPv4,
    IPv6,
}

/// A certificate authority: its key (where it lives) and its limits.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Signer {
    pub name: String,
    #[serde(default)]
    pub key: SignerKey,
    /// Upper bound on the validity of issued workload certificates.
    #[serde(default = "default_max_ttl")]
    pub max_certificate_ttl: Duration,
}

/// Where a signer's private key lives.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SignerKey {
    /// Key and root in files under the control plane's data dir (0600), created on first start.
    #[serde(default)]
    pub file: Option<FileKey>,
    /// Key generated inside, and never leaving, a PKCS#11 token.
    #[serde(default)]
    pub pkcs11: Option<Pkcs11Key>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileKey {
    /// Directory for this signer's key and certificate; defaults to `<data dir>/<signer name>`.
    #[serde(default)]
    pub dir: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Pkcs11Key {
    pub module: String,
    pub token_label: String,
    #[serde(default)]
    pub pin_file: Option<String>,
    #[serde(default)]
    pub pin_env: Option<String>,
    pub key_label: String,
    /// How the token is approved before the CA uses it. Required: without one the signer is
    /// refused (default deny).
    #[serde(default)]
    pub attestation: Option<Attestation>,
}

/// An attestation policy for a token: exactly one of `allow` and `command`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Attestation {
    #[serde(default)]
    pub allow: Option<AllowList>,
    #[serde(default)]
    pub command: Option<AttestationCommand>,
}

/// Tokens the CA may use, by what they report (`C_GetTokenInfo`): a token passes if it matches
/// every list that is not empty.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AllowList {
    #[serde(default)]
    pub labels: Vec<String>,
    #[serde(default)]
    pub serial_numbers: Vec<String>,
    #[serde(default)]
    pub manufacturers: Vec<String>,
}

/// A program that judges the token (an SGX quote verifier, for instance): given the token's
/// details and a nonce as JSON on stdin, it approves by exiting 0 with the nonce on stdout.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AttestationCommand {
    /// Absolute path of the program.
    pub path: String,
    #[serde(default)]
    pub args: Vec<String>,
    /// How long the program may take before it is killed and the token refused.
    #[serde(default = "default_attestation_timeout")]
    pub timeout: Duration,
}

/// A set of namespaces with one signer.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Tenant {
    pub name: String,
    /// Namespace names; `*` matches every namespace no other tenant lists.
    pub namespaces: Vec<String>,
    pub signer: String,
    /// Tenants whose roots this tenant's workloads also trust (one direction; list both sides for
    /// mutual trust). Authorization policy still decides what is allowed.
    #[serde(default)]
    pub trust_tenants: Vec<String>,
    /// Kubernetes CSR signer names this tenant's signer answers besides `hypha.dev/<name>`
    /// (istiod's `K8S_SIGNER`, `caCertificates[].certSigners`).
    #[serde(default)]
    pub signer_names: Vec<String>,
}

impl MeshConfig {
    /// The tenant a namespace belongs to: an exact listing wins over `*`.
    pub fn tenant_of(&self, namespace: &str) -> Option<&Tenant> {
        self.tenants
            .iter()
            .find(|t| t.namespaces.iter().any(|n| n == namespace))
            .or_else(|| {
                self.tenants
                    .iter()
                    .find(|t| t.namespaces.iter().any(|n| n == "*"))
            })
    }

    pub fn signer(&self, name: &str) -> Option<&Signer> {
        self.signers.iter().find(|s| s.name == name)
    }

    /// The SPIFFE identity of a workload.
    pub fn spiffe_id(&self, namespace: &str, service_account: &str) -> String {
        format!(
            "spiffe://{}/ns/{namespace}/sa/{service_account}",
            self.trust_domain
        )
    }
}

fn default_trust_domain() -> String {
    DEFAULT_TRUST_DOMAIN.into()
}

fn default_domain_suffix() -> String {
    DEFAULT_DOMAIN_SUFFIX.into()
}

fn default_root_namespace() -> String {
    "istio-system".into()
}

fn default_ip_families() -> Vec<IpFamily> {
    vec![IpFamily::IPv4, IpFamily::IPv6]
}

fn default_max_ttl() -> Duration {
    Duration(std::time::Duration::from_secs(24 * 3600))
}

fn default_attestation_timeout() -> Duration {
    Duration(std::time::Duration::from_secs(10))
}

fn default_signers() -> Vec<Signer> {
    vec![Signer {
        name: "default".into(),
        key: SignerKey::default(),
        max_certificate_ttl: default_max_ttl(),
    }]
}

fn default_tenants() -> Vec<Tenant> {
    vec![Tenant {
        name: "default".into(),
        namespaces: vec!["*".into()],
        signer: "default".into(),
        trust_tenants: vec![],
        signer_names: vec![],
    }]
}
