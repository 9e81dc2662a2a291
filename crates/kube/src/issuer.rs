//! The cert-manager external issuer: `Issuer` and `ClusterIssuer` (group `hypha.dev`), each
//! naming a tenant whose signer (a file key or a PKCS#11 token) signs the `cert-manager.io/v1`
//! CertificateRequests that reference it, following cert-manager's external-issuer contract:
//! nothing is signed before the `Approved` condition, a `Denied` request is closed with `Ready`
//! False (`Denied`), a signed one gets `status.certificate`, `status.ca` and `Ready` True
//! (`Issued`), a refused one `Ready` False (`Failed`) with the reason. A namespaced Issuer signs
//! only names of its own namespace; both only names of their tenant's namespaces (workload
//! SPIFFE IDs, Service DNS names). Each issuer's own `Ready` condition says whether its tenant's
//! signer is there to sign and, under the issuer's `attestation` policy, whether the token
//! holding the key passes it (`status.signer`: the token's identity; `status.attestation`: the
//! verdict and its time); an issuer that cannot sign leaves its requests pending, saying why.

use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Client;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use hypha_ca::Ca;

/// The group of the issuers' kinds.
pub const GROUP: &str = "hypha.dev";

/// An `Issuer`'s or `ClusterIssuer`'s spec.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IssuerSpec {
    /// The tenant whose signer signs (a tenant of the mesh config).
    pub tenant: String,
    /// This issuer's own judgement of the token holding the tenant's key (an allow list or a
    /// command, as a signer's): it signs only while the token passes. A file key never does.
    #[serde(default)]
    pub attestation: Option<hypha_config::mesh::Attestation>,
}

/// What an issuer can do now, and why: its `Ready` condition and what its status says of its
/// signer and the attestation.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub ready: bool,
    pub reason: &'static str,
    pub message: String,
    /// `status.signer` and `status.attestation`.
    pub status: Value,
}

/// Judges an issuer: its tenant must exist, its signer sign (with `probe`: a test signature,
/// so a token gone or failing shows), and, under an attestation policy, the token holding the
/// tenant's key must pass it (a fresh nonce each time).
pub fn verdict(ca: &Ca, spec: &IssuerSpec, probe: bool) -> Verdict {
    let no = |reason, message: String, status| Verdict {
        ready: false,
        reason,
        message,
        status,
    };
    let Some(tenant) = ca.tenant(&spec.tenant) else {
        let message = format!("The mesh has no tenant {:?}", spec.tenant);
        return no("UnknownTenant", message, json!({}));
    };
    let attested = tenant.signer.attested();
    let mut status = json!({"signer": {"tenant": spec.tenant,
        "key": if attested.is_some() { "pkcs11" } else { "file" }}});
    if let Some(a) = attested {
        status["signer"]["token"] = json!({"label": a.token.label,
            "manufacturer": a.token.manufacturer_id, "model": a.token.model,
            "serialNumber": a.token.serial_number});
        status["signer"]["attestedBy"] = a.attestor.clone().into();
    }
    if probe {
        if let Err(e) = tenant.signer.sign(b"hypha issuer health check") {
            let message = format!("The signer of tenant {:?} cannot sign: {e}", spec.tenant);
            return no("SignerUnavailable", message, status);
        }
    }
    let signing = format!("Signing with the signer of tenant {:?}", spec.tenant);
    let Some(policy) = &spec.attestation else {
        return Verdict {
            ready: true,
            reason: "Ready",
            message: signing,
            status,
        };
    };
    let Some(attestor) = hypha_ca::attest::from_config(policy) else {
        let message = "spec.attestation needs exactly one of allow and command".to_owned();
        return no("InvalidAttestation", message, status);
    };
    let outcome = match attested {
        None => Err(format!(
            "the key of tenant {:?} is a file, not in a token: there is nothing to attest",
            spec.tenant
        )),
        Some(a) => hypha_ca::attest::nonce()
            .map_err(|e| e.to_string())
            .and_then(|nonce| attestor.attest(&a.token, &nonce)),
    };
    status["attestation"] = json!({"attestor": attestor.describe(), "time": now(),
        "verdict": if outcome.is_ok() { "Approved" } else { "Refused" }});
    match outcome {
        Ok(()) => Verdict {
            ready: true,
            reason: "Ready",
            message: format!("{signing}; its token passed the {}", attestor.describe()),
            status,
        },
        Err(why) => {
            status["attestation"]["reason"] = why.clone().into();
            let message = format!(
                "Attestation ({}) refused the token: {why}",
                attestor.describe()
            );
            no("AttestationFailed", message, status)
        }
    }
}

fn resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

fn certificate_requests() -> ApiResource {
    resource(
        "cert-manager.io",
        "v1",
        "CertificateRequest",
        "certificaterequests",
    )
}

fn issuers(cluster: bool) -> ApiResource {
    match cluster {
        true => resource(GROUP, "v1alpha1", "ClusterIssuer", "clusterissuers"),
        false => resource(GROUP, "v1alpha1", "Issuer", "issuers"),
    }
}

/// A condition of `obj`'s status by type.
fn condition<'a>(obj: &'a Value, kind: &str) -> Option<&'a Value> {
    obj.pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
}

fn holds(obj: &Value, kind: &str) -> bool {
    condition(obj, kind).is_some_and(|c| c["status"] == "True")
}

fn now() -> Value {
    serde_json::to_value(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::now(),
    ))
    .unwrap_or_default()
}

/// `status` with its `Ready` condition set (the transition time kept when the status is the
/// same).
fn set_ready(status: &mut Value, ready: bool, reason: &str, message: &str) {
    let flag = if ready { "True" } else { "False" };
    let previous = status["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
        .cloned();
    let since = match &previous {
        Some(p) if p["status"] == flag => p["lastTransitionTime"].clone(),
        _ => now(),
    };
    let ready = json!({"type": "Ready", "status": flag, "reason": reason, "message": message,
                       "lastTransitionTime": since});
    match status.get_mut("conditions").and_then(Value::as_array_mut) {
        Some(all) => {
            all.retain(|c| c["type"] != "Ready");
            all.push(ready);
        }
        None => status["conditions"] = json!([ready]),
    }
}

/// Whether `obj`'s `Ready` condition already says this.
fn ready_is(obj: &Value, ready: bool, reason: &str, message: &str) -> bool {
    condition(obj, "Ready").is_some_and(|c| {
        c["status"] == if ready { "True" } else { "False" }
            && c["reason"] == reason
            && c["message"] == message
    })
}

/// What a CertificateRequest needs from Hypha's issuers.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Not addressed to a `hypha.dev` issuer, or already closed.
    Nothing,
    /// Close it as denied.
    Deny,
    /// Waiting for approval.
    Pending,
    /// Approved: sign it with the issuer of this kind (`true`: a ClusterIssuer) and name.
    Sign { cluster: bool, name: String },
}

pub fn step(request: &Value) -> Step {
    let r = &request["spec"]["issuerRef"];
    if r["group"] != GROUP {
        return Step::Nothing;
    }
    let cluster = match r["kind"].as_str().unwrap_or("Issuer") {
        "Issuer" | "" => false,
        "ClusterIssuer" => true,
        _ => return Step::Nothing,
    };
    let answered = request
        .pointer("/status/certificate")
        .and_then(Value::as_str)
        .is_some_and(|c| !c.is_empty());
    let closed = condition(request, "Ready")
        .is_some_and(|c| matches!(c["reason"].as_str(), Some("Issued" | "Failed" | "Denied")));
    if answered || closed {
        Step::Nothing
    } else if holds(request, "Denied") {
        Step::Deny
    } else if holds(request, "Approved") {
        Step::Sign {
            cluster,
            name: r["name"].as_str().unwrap_or_default().to_owned(),
        }
    } else {
        Step::Pending
    }
}

/// The status a request gets from `tenant`'s signer (for an Issuer of namespace `scope`, or a
/// ClusterIssuer): certificate, CA and `Ready` True, or `Ready` False (`Failed`). May wait for a
/// token signer: call it off the async runtime.
pub fn answer(ca: &Ca, tenant: &str, scope: Option<&str>, request: &Value) -> Value {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut status = request.get("status").cloned().unwrap_or_else(|| json!({}));
    let spec = &request["spec"];
    let outcome = (|| {
        if spec["isCA"] == true {
            return Err("Hypha's issuers sign no CA certificates".to_owned());
        }
        let csr = b64
            .decode(spec["request"].as_str().unwrap_or_default())
            .map_err(|e| format!("spec.request is not base64: {e}"))?;
        let requested = match spec["duration"].as_str() {
            Some(d) => hypha_config::types::Duration::parse(d)?.as_std(),
            None => Duration::ZERO,
        };
        // cert-manager's default usages.
        let usages: Vec<String> = match spec["usages"].as_array() {
            Some(u) => u
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect(),
            None => vec!["digital signature".into(), "key encipherment".into()],
        };
        ca.sign_for_issuer(tenant, scope, &csr, &usages, requested)
            .map_err(|e| e.to_string())
    })();
    match outcome {
        Ok(issued) => {
            let (leaf, rest) = issued.chain.split_first().expect("a chain has a leaf");
            status["certificate"] = b64.encode(leaf).into();
            // The tenant's roots: mid-rotation both generations', so what trusts status.ca
            // (istio-csr's bundle) takes the new root before it signs and keeps the old one
            // while its certificates live.
            let roots: String = ca
                .tenant(tenant)
                .map(|t| {
                    t.own_roots()
                        .filter_map(|r| r.to_pem().ok())
                        .map(|p| String::from_utf8_lossy(&p).into_owned())
                        .collect()
                })
                .unwrap_or_else(|| rest.concat());
            status["ca"] = b64.encode(roots).into();
            let message = format!("Certificate issued by the signer of tenant {tenant:?}");
            set_ready(&mut status, true, "Issued", &message);
        }
        Err(why) => {
            status["failureTime"] = now();
            set_ready(&mut status, false, "Failed", &why);
        }
    }
    status
}

/// Writes `status` over `obj` as it was read (its `resourceVersion`): a request changed
/// meanwhile is left as it is now (its event brings it back).
async fn write_status(api: &Api<DynamicObject>, obj: &DynamicObject, status: Value) {
    let name = obj.metadata.name.clone().unwrap_or_default();
    let mut written = obj.clone();
    written.data["status"] = status;
    match api
        .replace_status(&name, &PostParams::default(), &written)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {
            tracing::debug!(object = %name, "changed while answered; left as it is now")
        }
        Err(e) => tracing::warn!(object = %name, error = %e, "status not written"),
    }
}

/// Answers every CertificateRequest addressed to a `hypha.dev` issuer and keeps the issuers'
/// `Ready` conditions; runs until dropped.
pub async fn run(client: Client, ca: Arc<Ca>) {
    run_with(client, ca, RECHECK).await;
}

/// How often every issuer is judged again (its signer probed, its token attested), besides
/// whenever it changes.
pub const RECHECK: Duration = Duration::from_secs(30);

/// [`run`], judging the issuers again every `recheck`.
pub async fn run_with(client: Client, ca: Arc<Ca>, recheck: Duration) {
    let (resync_tx, resync_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    tokio::select! {
        () = keep_issuers_ready(client.clone(), ca.clone(), resync_tx, recheck) => {}
        () = sign_requests(client, ca, resync_rx) => {}
    }
}

/// Watches the objects of `ar` (all namespaces), logging a missing kind (cert-manager not
/// installed) once.
fn watch(client: Client, ar: &ApiResource) -> impl Stream<Item = DynamicObject> + Send {
    let api: Api<DynamicObject> = Api::all_with(client, ar);
    let kind = ar.kind.clone();
    let mut warned = false;
    watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .applied_objects()
        .filter_map(move |e| {
            let out = match e {
                Ok(o) => Some(o),
                Err(e) if !warned => {
                    warned = true;
                    tracing::warn!(%kind, error = %e, "cannot watch (is its CRD installed?); retrying");
                    None
                }
                Err(_) => None,
            };
            std::future::ready(out)
        })
}

async fn keep_issuers_ready(
    client: Client,
    ca: Arc<Ca>,
    resync: tokio::sync::mpsc::UnboundedSender<()>,
    recheck: Duration,
) {
    let mut events = futures::stream::select(
        watch(client.clone(), &issuers(false)).map(|o| (false, o)),
        watch(client.clone(), &issuers(true)).map(|o| (true, o)),
    )
    .boxed();
    let mut ticks = tokio::time::interval(recheck);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let judged: Vec<(bool, DynamicObject)> = tokio::select! {
            Some(one) = events.next() => vec![one],
            _ = ticks.tick() => {
                let mut all = Vec::new();
                for cluster in [false, true] {
                    let api: Api<DynamicObject> = Api::all_with(client.clone(), &issuers(cluster));
                    if let Ok(list) = api.list(&ListParams::default()).await {
                        all.extend(list.items.into_iter().map(|i| (cluster, i)));
                    }
                }
                all
            }
            else => return,
        };
        for (cluster, issuer) in judged {
            refresh(&client, &ca, cluster, &issuer, &resync).await;
        }
    }
}

/// Judges one issuer and writes its status where the verdict changed.
async fn refresh(
    client: &Client,
    ca: &Arc<Ca>,
    cluster: bool,
    issuer: &DynamicObject,
    resync: &tokio::sync::mpsc::UnboundedSender<()>,
) {
    let v = judge(ca, issuer, true).await;
    let seen = serde_json::to_value(issuer).unwrap_or_default();
    if ready_is(&seen, v.ready, v.reason, &v.message) {
        return;
    }
    let mut status = issuer
        .data
        .get("status")
        .cloned()
        .unwrap_or_else(|| json!({}));
    for (k, x) in v.status.as_object().into_iter().flatten() {
        status[k] = x.clone();
    }
    set_ready(&mut status, v.ready, v.reason, &v.message);
    let api: Api<DynamicObject> = match (cluster, issuer.metadata.namespace.as_deref()) {
        (false, Some(ns)) => Api::namespaced_with(client.clone(), ns, &issuers(false)),
        _ => Api::all_with(client.clone(), &issuers(true)),
    };
    write_status(&api, issuer, status).await;
    // Requests waiting for this issuer are looked at again.
    let _ = resync.send(());
}

/// [`verdict`] for an issuer object, off the async runtime (an attestation command may run, a
/// token may be slow) and within [`JUDGE_TIMEOUT`].
async fn judge(ca: &Arc<Ca>, issuer: &DynamicObject, probe: bool) -> Verdict {
    let spec = serde_json::from_value::<IssuerSpec>(issuer.data["spec"].clone());
    let ca = ca.clone();
    let judging = tokio::task::spawn_blocking(move || match spec {
        Ok(spec) => verdict(&ca, &spec, probe),
        Err(e) => Verdict {
            ready: false,
            reason: "InvalidSpec",
            message: format!("spec: {e}"),
            status: json!({}),
        },
    });
    let failed = |reason, message: String| Verdict {
        ready: false,
        reason,
        message,
        status: json!({}),
    };
    match tokio::time::timeout(JUDGE_TIMEOUT, judging).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => failed("Internal", e.to_string()),
        Err(_) => failed(
            "SignerUnavailable",
            format!("no verdict within {} s", JUDGE_TIMEOUT.as_secs()),
        ),
    }
}

/// How long judging an issuer may take (a token's test signature, an attestation command).
pub const JUDGE_TIMEOUT: Duration = Duration::from_secs(10);

async fn sign_requests(
    client: Client,
    ca: Arc<Ca>,
    mut resync: tokio::sync::mpsc::UnboundedReceiver<()>,
) {
    let ar = certificate_requests();
    let all: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    let mut events = watch(client.clone(), &ar).boxed();
    loop {
        let requests = tokio::select! {
            Some(r) = events.next() => vec![r],
            Some(()) = resync.recv() => match all.list(&ListParams::default()).await {
                Ok(list) => list.items,
                Err(_) => continue,
            },
            else => return,
        };
        for request in requests {
            handle(&client, &ca, request).await;
        }
    }
}

async fn handle(client: &Client, ca: &Arc<Ca>, request: DynamicObject) {
    let seen = serde_json::to_value(&request).unwrap_or_default();
    let namespace = request.metadata.namespace.clone().unwrap_or_default();
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &namespace, &certificate_requests());
    let mut status = seen.get("status").cloned().unwrap_or_else(|| json!({}));
    let (cluster, name) = match step(&seen) {
        Step::Nothing => return,
        Step::Deny => {
            status["failureTime"] = now();
            set_ready(
                &mut status,
                false,
                "Denied",
                "The CertificateRequest was denied by an approval controller",
            );
            return write_status(&api, &request, status).await;
        }
        Step::Pending => {
            let message = "Waiting for the CertificateRequest to be approved";
            if !ready_is(&seen, false, "Pending", message) {
                set_ready(&mut status, false, "Pending", message);
                write_status(&api, &request, status).await;
            }
            return;
        }
        Step::Sign { cluster, name } => (cluster, name),
    };
    let issuer_api: Api<DynamicObject> = match cluster {
        true => Api::all_with(client.clone(), &issuers(true)),
        false => Api::namespaced_with(client.clone(), &namespace, &issuers(false)),
    };
    let issuer = match issuer_api.get_opt(&name).await {
        Ok(Some(i)) => i,
        Ok(None) | Err(_) => {
            let kind = if cluster { "ClusterIssuer" } else { "Issuer" };
            let message = format!("{kind} {name:?} ({GROUP}) not found");
            if !ready_is(&seen, false, "Pending", &message) {
                set_ready(&mut status, false, "Pending", &message);
                write_status(&api, &request, status).await;
            }
            return;
        }
    };
    // Judged now, not from the issuer's status: nothing is signed for an issuer that cannot.
    // Its signature fails the request with the reason if the signer does: no probe here.
    let v = judge(ca, &issuer, false).await;
    if !v.ready {
        let message = format!("The issuer {name:?} cannot sign: {}", v.message);
        if !ready_is(&seen, false, "Pending", &message) {
            set_ready(&mut status, false, "Pending", &message);
            write_status(&api, &request, status).await;
        }
        return;
    }
    let tenant = issuer.data["spec"]["tenant"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let scope = (!cluster).then_some(namespace);
    let ca = ca.clone();
    let answered =
        tokio::task::spawn_blocking(move || answer(&ca, &tenant, scope.as_deref(), &seen)).await;
    match answered {
        Ok(status) => write_status(&api, &request, status).await,
        Err(e) => tracing::error!(error = %e, "signing a CertificateRequest"),
    }
}
