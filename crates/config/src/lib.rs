//! Hypha's config model: Istio resources and Hypha's `MeshConfig` loaded from YAML files, with
//! every problem reported at its file, line, column and field path.
//!
//! Three steps, as in the rest of Hypha: [`load`] parses a directory (or file) into typed
//! resources, [`validate()`] checks every cross-reference and value and reports all problems at
//! once, and the control plane compiles the validated [`Config`] into xDS. Nothing downstream
//! sees raw YAML.

#![forbid(unsafe_code)]

pub mod diag;
mod load;
pub mod mesh;
pub mod networking;
pub mod proxy;
pub mod security;
pub mod types;
mod validate;
pub mod yaml;

use std::collections::BTreeMap;

pub use diag::{Diagnostic, Diagnostics, Severity, Source};
pub use load::{
    load, load_cached, load_sources, load_str, parse_cached, parse_objects, LoadCache, Loaded,
};
pub use mesh::MeshConfig;
pub use validate::{grpc_code, host_covers, is_valid_cidr, needs_the_ca, protocol_kind, validate};

/// Annotation on a WorkloadEntry listing its other addresses (comma-separated), so a dual-stack
/// workload stays valid Istio YAML: `address: 10.0.0.5` plus `hypha.dev/addresses: fd00::5`.
pub const ADDRESSES_ANNOTATION: &str = "hypha.dev/addresses";

/// The `apiVersion` of Hypha's own documents.
pub const HYPHA_API_VERSION: &str = "hypha.dev/v1alpha1";

/// A loaded resource: identity, metadata, typed spec and where it came from.
#[derive(Debug, Clone)]
pub struct Resource<T> {
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub spec: T,
    pub source: Source,
}

impl<T> Resource<T> {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Everything Hypha read from one config source.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub mesh: MeshConfig,
    /// Where the MeshConfig came from; `None` means the built-in default.
    pub mesh_source: Option<Source>,
    pub service_entries: Vec<Resource<networking::ServiceEntry>>,
    pub workload_entries: Vec<Resource<networking::WorkloadEntry>>,
    pub virtual_services: Vec<Resource<networking::VirtualService>>,
    pub destination_rules: Vec<Resource<networking::DestinationRule>>,
    pub authorization_policies: Vec<Resource<security::AuthorizationPolicy>>,
    pub peer_authentications: Vec<Resource<security::PeerAuthentication>>,
}

impl Config {
    /// Resolves a host as written in a resource of `namespace` the way Istio does: a short name
    /// without dots (`reviews`) means `reviews.<ns>.svc.<domainSuffix>`; anything else is taken
    /// as written.
    pub fn resolve_host(&self, host: &str, namespace: &str) -> String {
        if host.contains('.') || host.starts_with('*') {
            host.to_string()
        } else {
            format!("{host}.{namespace}.svc.{}", self.mesh.domain_suffix)
        }
    }

    pub fn resource_count(&self) -> usize {
        self.service_entries.len()
            + self.workload_entries.len()
            + self.virtual_services.len()
            + self.destination_rules.len()
            + self.authorization_policies.len()
            + self.peer_authentications.len()
    }
}
