//! The Kubernetes CSR signer: a `certificates.k8s.io/v1` CertificateSigningRequest addressed to
//! one of Hypha's signers (`hypha.dev/<tenant>`, or a name the tenant lists in `signerNames`,
//! such as istiod's `K8S_SIGNER`) is signed, once approved, by that tenant's signer (a file key
//! or a PKCS#11 token): the chain goes in `status.certificate`, or a `Failed` condition says why
//! not. Pending and denied requests are never signed. Each answer replaces the status of the
//! request as it was read (its `resourceVersion`): a request another writer answered first is
//! left as that writer left it, never signed twice.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use kube::api::{Api, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Client;
use serde_json::{json, Value};

use hypha_ca::Ca;
use hypha_config::MeshConfig;

/// The prefix of the signer names Hypha answers by default: `hypha.dev/<tenant>`.
pub const SIGNER_PREFIX: &str = "hypha.dev/";

/// Signer name → tenant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SignerNames(BTreeMap<String, String>);

impl SignerNames {
    /// `hypha.dev/<tenant>` for every tenant, and the names each lists in `signerNames`.
    pub fn from_mesh(mesh: &MeshConfig) -> SignerNames {
        let mut names = BTreeMap::new();
        for t in &mesh.tenants {
            names.insert(format!("{SIGNER_PREFIX}{}", t.name), t.name.clone());
            for n in &t.signer_names {
                names.insert(n.clone(), t.name.clone());
            }
        }
        SignerNames(names)
    }

    pub fn tenant(&self, signer_name: &str) -> Option<&str> {
        self.0.get(signer_name).map(String::as_str)
    }
}

/// What is to be done with a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Not one of Hypha's signers.
    NotOurs,
    /// Waiting for approval.
    Pending,
    /// Denied, failed or already answered: nothing more.
    Done,
    /// Approved and unanswered: sign it with this tenant's signer.
    Sign(String),
}

/// What `csr` needs from the signer.
pub fn next(csr: &CertificateSigningRequest, names: &SignerNames) -> Next {
    let Some(tenant) = names.tenant(&csr.spec.signer_name) else {
        return Next::NotOurs;
    };
    let status = csr.status.as_ref();
    if status
        .and_then(|s| s.certificate.as_ref())
        .is_some_and(|c| !c.0.is_empty())
    {
        return Next::Done;
    }
    let holds = |kind: &str| {
        status
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .any(|c| c.type_ == kind && c.status == "True")
    };
    if holds("Denied") || holds("Failed") {
        Next::Done
    } else if holds("Approved") {
        Next::Sign(tenant.to_owned())
    } else {
        Next::Pending
    }
}

/// The status `csr` gets from `tenant`'s signer: the certificate, or the `Failed` condition.
/// May wait for a token signer: call it off the async runtime.
pub fn answer(ca: &Ca, tenant: &str, csr: &CertificateSigningRequest) -> Value {
    let requested = csr
        .spec
        .expiration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map_or(Duration::ZERO, Duration::from_secs);
    let usages = csr.spec.usages.clone().unwrap_or_default();
    let mut status =
        serde_json::to_value(csr.status.clone().unwrap_or_default()).unwrap_or_else(|_| json!({}));
    match ca.sign_kubernetes(tenant, &csr.spec.request.0, &usages, requested) {
        Ok(issued) => {
            use base64::Engine as _;
            let chain = issued.chain.concat();
            status["certificate"] = base64::engine::general_purpose::STANDARD
                .encode(chain)
                .into();
            tracing::info!(csr = ?csr.metadata.name, %tenant, validity_s = issued.validity.as_secs(), "signed a Kubernetes CSR");
        }
        Err(e) => {
            let now = serde_json::to_value(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ))
            .unwrap_or_default();
            let failed = json!({"type": "Failed", "status": "True",
                "reason": "SignerValidationFailure", "message": e.to_string(),
                "lastUpdateTime": now, "lastTransitionTime": now});
            match status.get_mut("conditions").and_then(Value::as_array_mut) {
                Some(c) => c.push(failed),
                None => status["conditions"] = json!([failed]),
            }
            tracing::warn!(csr = ?csr.metadata.name, %tenant, error = %e, "refused a Kubernetes CSR");
        }
    }
    status
}

/// Every CSR as it is listed, then as it changes.
fn csr_events(
    api: &Api<CertificateSigningRequest>,
) -> futures::stream::BoxStream<'static, Result<CertificateSigningRequest, watcher::Error>> {
    watcher::watcher(api.clone(), watcher::Config::default())
        .default_backoff()
        .applied_objects()
        .boxed()
}

/// Istio's rule for a workload's own CSR: whether `csr`, pending and addressed to one of
/// Hypha's signers, asks for exactly the SPIFFE ID of the service account that created it.
pub fn is_own_identity(
    csr: &CertificateSigningRequest,
    names: &SignerNames,
    trust_domain: &str,
) -> bool {
    if next(csr, names) != Next::Pending {
        return false;
    }
    let Some(account) = csr
        .spec
        .username
        .as_deref()
        .and_then(|u| u.strip_prefix("system:serviceaccount:"))
        .and_then(|rest| rest.split_once(':'))
    else {
        return false;
    };
    let own = format!("spiffe://{trust_domain}/ns/{}/sa/{}", account.0, account.1);
    hypha_ca::issue::requested_identity(&csr.spec.request.0).is_ok_and(|id| id == own)
}

/// `--approve-own-csrs`: approves each pending CSR to Hypha's signers that asks for its
/// requester's own identity ([`is_own_identity`]), leaving every other to a person or another
/// approver; runs until dropped.
pub async fn approve_own_csrs(client: Client, trust_domain: String, names: SignerNames) {
    let api: Api<CertificateSigningRequest> = Api::all(client);
    let mut events = csr_events(&api);
    while let Some(event) = events.next().await {
        let Ok(csr) = event else { continue };
        if !is_own_identity(&csr, &names, &trust_domain) {
            continue;
        }
        let name = csr.metadata.name.clone().unwrap_or_default();
        let mut approved = csr;
        approved
            .status
            .get_or_insert_with(Default::default)
            .conditions
            .get_or_insert_with(Vec::new)
            .push(
                k8s_openapi::api::certificates::v1::CertificateSigningRequestCondition {
                    type_: "Approved".into(),
                    status: "True".into(),
                    reason: Some("HyphaOwnIdentity".into()),
                    message: Some(
                        "The request is for its requester's own service account identity".into(),
                    ),
                    last_update_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                        k8s_openapi::jiff::Timestamp::now(),
                    )),
                    ..Default::default()
                },
            );
        match api
            .replace_subresource("approval", &name, &PostParams::default(), &approved)
            .await
        {
            Ok(_) => tracing::info!(csr = %name, "approved a CSR for its requester's own identity"),
            Err(e) => tracing::warn!(csr = %name, error = %e, "CSR not approved"),
        }
    }
}

/// Watches the cluster's CSRs and answers those addressed to Hypha's signers; runs until
/// dropped.
pub async fn sign_csrs(client: Client, ca: Arc<Ca>, names: SignerNames) {
    let api: Api<CertificateSigningRequest> = Api::all(client);
    let mut events = csr_events(&api);
    while let Some(event) = events.next().await {
        let csr = match event {
            Ok(csr) => csr,
            Err(e) => {
                tracing::warn!(error = %e, "watching CertificateSigningRequests");
                continue;
            }
        };
        let Next::Sign(tenant) = next(&csr, &names) else {
            continue;
        };
        let name = csr.metadata.name.clone().unwrap_or_default();
        let (ca, read) = (ca.clone(), csr.clone());
        let status = match tokio::task::spawn_blocking(move || answer(&ca, &tenant, &read)).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(csr = %name, error = %e, "signing a Kubernetes CSR");
                continue;
            }
        };
        let mut written = match serde_json::to_value(&csr) {
            Ok(v) => v,
            Err(_) => continue,
        };
        written["status"] = status;
        let Ok(written) = serde_json::from_value::<CertificateSigningRequest>(written) else {
            continue;
        };
        match api
            .replace_status(&name, &PostParams::default(), &written)
            .await
        {
            Ok(_) => {}
            // Answered meanwhile (another replica, a denial): its event shows it done.
            Err(kube::Error::Api(e)) if e.code == 409 => {
                tracing::info!(csr = %name, "CSR changed while being signed; left as it is now")
            }
            Err(e) => tracing::warn!(csr = %name, error = %e, "CSR answer not written"),
        }
    }
}

/// The certificate services of the cluster (this CSR signer and the cert-manager issuer,
/// [`crate::issuer`]) as a task of the control plane's, given its CA
/// ([`hypha_control::TlsService`]): run by one replica at a time, the holder of `lease`.
/// With `approve_own`, also [`approve_own_csrs`].
pub fn service(
    client: Client,
    names: SignerNames,
    lease: crate::lease::LeaseConfig,
    approve_own: bool,
) -> hypha_control::TlsService {
    hypha_control::TlsService(Arc::new(move |secure| {
        let (client, names, lease) = (client.clone(), names.clone(), lease.clone());
        Box::pin(async move {
            let ca = secure.ca();
            crate::lease::while_leader(client.clone(), lease, || {
                let (client, ca, names) = (client.clone(), ca.clone(), names.clone());
                async move {
                    let approver = async {
                        if approve_own {
                            let td = ca.trust_domain().to_owned();
                            approve_own_csrs(client.clone(), td, names.clone()).await;
                        }
                    };
                    tokio::join!(
                        sign_csrs(client.clone(), ca.clone(), names.clone()),
                        crate::issuer::run(client.clone(), ca.clone()),
                        approver
                    );
                }
            })
            .await;
        })
    }))
}
