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

/// Resources of one type, by name.
pub type ResourceMap = BTreeMap<String, Arc<Resource>>;

/// The resources of one type in a [`Snapshot`], in two layers: `shared`, which many proxies'
/// snapshots hold by reference (the outbound view of a namespace), and `own`, what one proxy
/// adds (its inbound resources). A name in `own` shadows the same name in `shared`.
///
/// Layers are compared by identity: when a new snapshot holds the very layers a stream last
/// pushed, that type cannot have changed and the stream skips it without looking inside.
#[derive(Debug, Clone, Default)]
pub struct Resources {
    shared: Arc<ResourceMap>,
    own: Arc<ResourceMap>,
}

impl Resources {
    /// The resource called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Resource>> {
        self.own.get(name).or_else(|| self.shared.get(name))
    }

    pub fn contains_key(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// All resources, by name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Resource>> {
        let mut own = self.own.values().peekable();
        let mut shared = self.shared.values().peekable();
        std::iter::from_fn(move || match (own.peek(), shared.peek()) {
            (Some(o), Some(s)) => match o.name.cmp(&s.name) {
                std::cmp::Ordering::Less => own.next(),
                std::cmp::Ordering::Equal => {
                    shared.next();
                    own.next()
                }
                std::cmp::Ordering::Greater => shared.next(),
            },
            (Some(_), None) => own.next(),
            (None, _) => shared.next(),
        })
    }

    pub fn len(&self) -> usize {
        if self.own.is_empty() {
            self.shared.len()
        } else {
            self.iter().count()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.own.is_empty() && self.shared.is_empty()
    }

    /// Whether both hold the very same layers (not merely equal content).
    pub fn same_as(&self, other: &Resources) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared) && Arc::ptr_eq(&self.own, &other.own)
    }
}

/// Whether two maps hold the same names at the same versions.
fn same_content(a: &ResourceMap, b: &ResourceMap) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|((an, ar), (bn, br))| an == bn && ar.version == br.version)
}

/// Everything one proxy should see: per type URL, resources by name. Build it, then share it
/// as an `Arc<Snapshot>`; it is never mutated after that.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    version: String,
    types: BTreeMap<String, Resources>,
}

impl Snapshot {
    /// An empty snapshot; `version` is a label for logs and delta `system_version_info`.
    pub fn new(version: impl Into<String>) -> Self {
        Snapshot {
            version: version.into(),
            types: BTreeMap::new(),
        }
    }

    /// Adds a resource under its type URL, replacing one of the same type and name. It goes
    /// into the snapshot's own layer: a copy of a shared base copies none of the base's maps.
    pub fn insert(&mut self, resource: impl Into<Arc<Resource>>) {
        let resource = resource.into();
        let layers = self
            .types
            .entry(resource.type_url().to_owned())
            .or_default();
        Arc::make_mut(&mut layers.own).insert(resource.name.clone(), resource);
    }

    /// Turns everything inserted so far into the shared layer, so that clones of this snapshot
    /// share it and their own inserts stay in their own small layer.
    pub fn into_shared(mut self) -> Snapshot {
        for layers in self.types.values_mut() {
            if layers.own.is_empty() {
                continue;
            }
            let own = std::mem::take(&mut layers.own);
            if layers.shared.is_empty() {
                layers.shared = own;
            } else {
                let shared = Arc::make_mut(&mut layers.shared);
                shared.extend(own.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
        }
        self
    }

    /// Where a layer of this snapshot has the same content as the same layer of `previous`,
    /// takes `previous`'s layer instead. A stream that pushed `previous` then skips those
    /// types outright (see [`Resources::same_as`]), and unchanged content is stored once.
    pub fn reuse(&mut self, previous: &Snapshot) {
        self.reuse_layers(previous, true);
    }

    /// [`Snapshot::reuse`] for the own layers only: for a snapshot whose shared layers were
    /// already reused where they could be (the shared base went through `reuse`), which spares
    /// comparing the large shared maps once per proxy.
    pub fn reuse_own(&mut self, previous: &Snapshot) {
        self.reuse_layers(previous, false);
    }

    fn reuse_layers(&mut self, previous: &Snapshot, shared: bool) {
        for (type_url, layers) in &mut self.types {
            let Some(old) = previous.types.get(type_url) else {
                continue;
            };
            if shared
                && !Arc::ptr_eq(&layers.shared, &old.shared)
                && same_content(&layers.shared, &old.shared)
            {
                layers.shared = old.shared.clone();
            }
            if !Arc::ptr_eq(&layers.own, &old.own) && same_content(&layers.own, &old.own) {
                layers.own = old.own.clone();
            }
        }
    }

    /// Whether every type holds the very same layers as in `other`: nothing to push.
    pub fn same_as(&self, other: &Snapshot) -> bool {
        self.types.len() == other.types.len()
            && self
                .types
                .iter()
                .zip(&other.types)
                .all(|((at, a), (bt, b))| at == bt && a.same_as(b))
    }

    /// Whether this snapshot's `type_url` resources are the very layers `pushed` holds.
    pub(crate) fn still_holds(&self, type_url: &str, pushed: Option<&Resources>) -> bool {
        pushed
            .zip(self.types.get(type_url))
            .is_some_and(|(p, now)| p.same_as(now))
    }

    /// The resources of one type.
    pub fn resources(&self, type_url: &str) -> Option<&Resources> {
        self.types.get(type_url)
    }

    /// The type URLs this snapshot has resources for.
    pub fn type_urls(&self) -> impl Iterator<Item = &str> {
        self.types.keys().map(String::as_str)
    }

    /// Renames the snapshot (a copy of a shared base gets the proxy's own version label).
    pub fn set_version(&mut self, version: impl Into<String>) {
        self.version = version.into();
    }

    /// The snapshot's label.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn res(name: &str, body: &[u8]) -> Resource {
        Resource::new(
            name,
            prost_types::Any {
                type_url: "t".into(),
                value: body.to_vec(),
            },
        )
    }

    fn names(s: &Snapshot) -> Vec<(String, Vec<u8>)> {
        s.resources("t")
            .unwrap()
            .iter()
            .map(|r| (r.name.clone(), r.body.value.clone()))
            .collect()
    }

    #[test]
    fn own_layer_shadows_shared_and_iterates_in_name_order() {
        let mut base = Snapshot::new("1");
        base.insert(res("b", b"1"));
        base.insert(res("d", b"1"));
        let base = base.into_shared();
        let mut mine = base.clone();
        mine.insert(res("a", b"2"));
        mine.insert(res("d", b"2"));
        mine.insert(res("e", b"2"));
        let got = names(&mine);
        let want: Vec<(String, Vec<u8>)> = [("a", "2"), ("b", "1"), ("d", "2"), ("e", "2")]
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect();
        assert_eq!(got, want);
        let all = mine.resources("t").unwrap();
        assert_eq!(all.len(), 4);
        assert_eq!(all.get("d").unwrap().body.value, b"2");
        // The base was not copied into the proxy's snapshot, nor changed by its inserts.
        assert_eq!(names(&base).len(), 2);
        assert!(Arc::ptr_eq(
            &base.resources("t").unwrap().shared,
            &all.shared
        ));
    }

    #[test]
    fn reuse_keeps_identity_only_for_equal_content() {
        let build = |d: &[u8], own: &[u8]| {
            let mut s = Snapshot::new("x");
            s.insert(res("a", b"1"));
            s.insert(res("d", d));
            let mut s = s.into_shared();
            s.insert(res("in", own));
            s
        };
        let old = build(b"1", b"1");
        let mut same = build(b"1", b"1");
        assert!(!same.same_as(&old));
        same.reuse(&old);
        assert!(same.same_as(&old));

        let mut changed = build(b"2", b"1");
        changed.reuse(&old);
        let (now, before) = (changed.resources("t").unwrap(), old.resources("t").unwrap());
        assert!(!now.same_as(before));
        assert!(Arc::ptr_eq(&now.own, &before.own));
        assert!(!Arc::ptr_eq(&now.shared, &before.shared));
        assert_eq!(now.get("d").unwrap().body.value, b"2");
    }
}
