//! The mesh's roots in every namespace, as istiod publishes them: a ConfigMap
//! `istio-ca-root-cert` (key `root-cert.pem`) holding the namespace's trust bundle (its tenant's
//! root and the roots that tenant trusts), which a pod mounts for its sidecar's `--ca-root`.
//! Written after a push wherever it differs from what this replica last wrote (a new namespace,
//! a rotated root, a tenant moved); a write that fails is tried again at the next push.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::Client;

/// The ConfigMap's name, Istio's.
pub const CONFIGMAP: &str = "istio-ca-root-cert";
/// The key of the bundle in it, Istio's.
pub const KEY: &str = "root-cert.pem";

/// Publishes the roots; remembers what it wrote.
pub struct Roots {
    client: Client,
    /// Namespace → the bundle last written there.
    written: BTreeMap<String, String>,
}

impl Roots {
    pub fn new(client: Client) -> Roots {
        Roots {
            client,
            written: BTreeMap::new(),
        }
    }

    /// Writes `bundle(ns)` into each namespace's ConfigMap where it changed.
    pub async fn publish<'a>(
        &mut self,
        namespaces: impl Iterator<Item = &'a String>,
        bundle: impl Fn(&str) -> Option<String>,
    ) {
        let mut now = BTreeMap::new();
        for ns in namespaces {
            let Some(pem) = bundle(ns) else { continue };
            if self.written.get(ns) != Some(&pem) {
                if let Err(e) = self.write(ns, &pem).await {
                    tracing::warn!(namespace = %ns, "ConfigMap {CONFIGMAP} not written: {e}");
                    continue;
                }
            }
            now.insert(ns.clone(), pem);
        }
        self.written = now;
    }

    async fn write(&self, ns: &str, pem: &str) -> Result<(), kube::Error> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
        let data = BTreeMap::from([(KEY.to_owned(), pem.to_owned())]);
        match api.get_opt(CONFIGMAP).await? {
            Some(cm) if cm.data.as_ref() == Some(&data) => return Ok(()),
            Some(_) => {}
            None => {
                let cm = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(CONFIGMAP.into()),
                        namespace: Some(ns.into()),
                        ..Default::default()
                    },
                    data: Some(data.clone()),
                    ..Default::default()
                };
                match api.create(&PostParams::default(), &cm).await {
                    Ok(_) => return Ok(()),
                    // Another replica made it first: brought up to date below.
                    Err(kube::Error::Api(s)) if s.code == 409 => {}
                    Err(e) => return Err(e),
                }
            }
        }
        let patch = serde_json::json!({"data": data});
        api.patch(CONFIGMAP, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        Ok(())
    }
}
