//! Problems reported where a cluster's user looks: each invalid Istio object gets a Warning
//! Event and its `status.validationMessages` (where Istio's analysis writes), and loses them
//! once it is valid again. Written only when what is wrong with an object changes, so a
//! status write (itself a watch event) never loops.

use std::collections::BTreeMap;

use hypha_config::Diagnostic;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::Client;
use serde_json::{json, Value};

use crate::cluster::Cluster;
use crate::istio::{self, ObjectKey};

/// The component Events name as their source.
pub const COMPONENT: &str = "hypha-control";

pub(crate) struct Reporter {
    client: Client,
    /// What was last reported per object.
    reported: BTreeMap<ObjectKey, Vec<String>>,
}

impl Reporter {
    pub fn new(client: Client) -> Reporter {
        Reporter {
            client,
            reported: BTreeMap::new(),
        }
    }

    /// Reports `invalid` (objects left out and why) where it differs from the last report.
    pub async fn report(
        &mut self,
        invalid: &BTreeMap<ObjectKey, Vec<Diagnostic>>,
        cluster: &Cluster,
    ) {
        let now: BTreeMap<ObjectKey, Vec<String>> = invalid
            .iter()
            .map(|(k, ds)| (k.clone(), ds.iter().map(message).collect()))
            .collect();
        for (key, messages) in &now {
            if self.reported.get(key) == Some(messages) {
                continue;
            }
            for m in messages {
                tracing::error!("{} {}/{} left out of the mesh: {m}", key.0, key.1, key.2);
            }
            // A file's object: the log is where it is reported.
            if !cluster.istio.contains_key(key) {
                continue;
            }
            let uid = cluster
                .istio
                .get(key)
                .and_then(|o| o.pointer("/metadata/uid"))
                .and_then(Value::as_str)
                .map(str::to_string);
            if let Err(e) = self.event(key, uid, messages).await {
                tracing::warn!(
                    "cannot record an Event on {} {}/{}: {e}",
                    key.0,
                    key.1,
                    key.2
                );
            }
            let status = json!({"status": {"validationMessages": invalid[key].iter().map(|d| json!({
                "level": "ERROR",
                "type": {"code": d.code, "name": "InvalidConfig"},
                "description": message(d),
            })).collect::<Vec<_>>()}});
            self.status(key, &status).await;
        }
        for key in self.reported.keys() {
            if !now.contains_key(key) && cluster.istio.contains_key(key) {
                self.status(key, &json!({"status": {"validationMessages": null}}))
                    .await;
            }
        }
        self.reported = now;
    }

    async fn status(&self, key: &ObjectKey, patch: &Value) {
        let Some(kind) = istio::KINDS.iter().find(|k| k.kind == key.0) else {
            return;
        };
        let api: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            &key.1,
            &crate::watch::api_resource(kind),
        );
        if let Err(e) = api
            .patch_status(&key.2, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            tracing::warn!(
                "cannot write the status of {} {}/{}: {e}",
                key.0,
                key.1,
                key.2
            );
        }
    }

    async fn event(
        &self,
        key: &ObjectKey,
        uid: Option<String>,
        messages: &[String],
    ) -> Result<core::Event, kube::Error> {
        let kind = istio::KINDS.iter().find(|k| k.kind == key.0);
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let event = core::Event {
            metadata: ObjectMeta {
                generate_name: Some(format!("{}.", key.2)),
                namespace: Some(key.1.clone()),
                ..Default::default()
            },
            involved_object: core::ObjectReference {
                api_version: kind.map(|k| format!("{}/{}", k.group, k.version)),
                kind: Some(key.0.to_string()),
                name: Some(key.2.clone()),
                namespace: Some(key.1.clone()),
                uid,
                ..Default::default()
            },
            reason: Some("InvalidConfig".into()),
            message: Some(format!(
                "left out of the mesh, the rest is served: {}",
                messages.join("; ")
            )),
            type_: Some("Warning".into()),
            source: Some(core::EventSource {
                component: Some(COMPONENT.into()),
                ..Default::default()
            }),
            reporting_component: Some(COMPONENT.into()),
            first_timestamp: Some(now.clone()),
            last_timestamp: Some(now),
            count: Some(1),
            ..Default::default()
        };
        Api::<core::Event>::namespaced(self.client.clone(), &key.1)
            .create(&PostParams::default(), &event)
            .await
    }
}

/// `path: message`, what a user needs to find the field.
fn message(d: &Diagnostic) -> String {
    if d.path.is_empty() {
        d.message.clone()
    } else {
        format!("{}: {}", d.path, d.message)
    }
}
