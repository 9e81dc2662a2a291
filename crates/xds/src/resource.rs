//! Resources and snapshots: what the control plane computes for one proxy and the xDS server
//! serves from. Versions are content hashes so that identical content has the identical
//! version across control-plane processes and restarts, which lets a reconnecting proxy's
//! `initial_resource_versions` (delta) or `version_info` (SotW) be trusted.

use std::collections::BTreeMap;
use std::sync::Arc;

/// One named resource, already encoded.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    /// The resource name (e.g. the cluster name).
    pub name: String,
    /// Stable content hash: FNV-1a 64 of the type URL and the encoded bytes, in hex.
    pub version: String,
    /// The encoded resource; `body.type_url` is the resource's type URL.
    pub body: prost_types::Any,
}

impl Resource {
    /// Wraps an encoded resource, computing its content version.
    pub fn new(name: impl Into<String>, body: prost_types::Any) -> Resource {
        let mut hash = Fnv::new();
        hash.write(body.type_url.as_bytes());
        hash.write(&[0]);
        hash.write(&body.value);
        Resource {
            name: name.into(),
            version: hash.hex(),
            body,
        }
    }

    /// Encodes an Envoy proto message as a resource of type `M::type_url()`.
    pub fn encode<M: prost::Message + prost::Name>(name: impl Into<String>, msg: &M) -> Resource {
        Resource::new(
            name,
            prost_types::Any {
                type_url: M::type_url(),
                value: msg.encode_to_vec(),
            },
        )
    }

    /// The resource's type URL.
    pub fn type_url(&self) -> &str {
        &self.body.type_url
    }
}

/// Everything one proxy should see: per type URL, resources by name. Build it, then share it
/// as an `Arc<Snapshot>`; it is never mutated after that.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    version: String,
    /// Per type, shared between snapshots until one of them changes it (copy on write), so a
    /// snapshot built from a common base costs a few reference counts, not a copy.
    types: BTreeMap<String, Arc<BTreeMap<String, Arc<Resource>>>>,
}

impl Snapshot {
    /// An empty snapshot; `version` is a label for logs and delta `system_version_info`.
    pub fn new(version: impl Into<String>) -> Self {
        Snapshot {
            version: version.into(),
            types: BTreeMap::new(),
        }
    }

    /// Adds a resource under its type URL, replacing one of the same type and name.
    pub fn insert(&mut self, resource: impl Into<Arc<Resource>>) {
        let resource = resource.into();
        let map = self
            .types
            .entry(resource.type_url().to_owned())
            .or_default();
        Arc::make_mut(map).insert(resource.name.clone(), resource);
    }

    /// The resources of one type, by name.
    pub fn resources(&self, type_url: &str) -> Option<&BTreeMap<String, Arc<Resource>>> {
        self.types.get(type_url).map(|m| &**m)
    }

    /// The type URLs this snapshot has resources for.
    pub fn type_urls(&self) -> impl Iterator<Item = &str> {
        self.types.keys().map(String::as_str)
    }

    /// The snapshot's label.
    /// Renames the snapshot (a copy of a shared base gets the proxy's own version label).
    pub fn set_version(&mut self, version: impl Into<String>) {
        self.version = version.into();
    }

    pub fn version(&self) -> &str {
        &self.version
    }
}

/// FNV-1a 64: tiny, stable across processes and Rust versions (unlike `DefaultHasher`), and
/// good enough to tell content apart.
pub(crate) struct Fnv(u64);

impl Fnv {
    pub(crate) fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    pub(crate) fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    pub(crate) fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}
