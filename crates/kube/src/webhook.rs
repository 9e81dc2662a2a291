//! The sidecar injection webhook (`hypha control --kubernetes --webhook ADDR`): a mutating
//! admission webhook (`admission.k8s.io/v1` AdmissionReview in, JSON Patch out) on TLS with
//! the control plane's own certificate from the mesh CA, whose Service names it carries
//! (`--webhook-name`), and the CA's root written by the control plane itself into the
//! `caBundle` of its MutatingWebhookConfiguration, and written again whenever someone
//! changes it (a re-applied manifest has none). The injection is `hypha-inject`'s, the one
//! `hypha inject -f` runs.
//!
//! Which pods are sent here is the MutatingWebhookConfiguration's business (Istio's
//! namespace and object selectors, `hypha install` writes them); this answers every pod it is
//! sent, leaving alone those that say `sidecar.istio.io/inject: "false"`, the system
//! namespaces, host-network pods and pods already injected. An injection error (a bad
//! annotation) refuses the pod with the reason, as Istio's webhook does.

use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use futures::StreamExt;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::api::{Api, PostParams};
use kube::runtime::watcher;
use kube::runtime::WatchStreamExt;
use kube::Client;
use serde_json::{json, Value};

use hypha_inject::{Outcome, Settings, Target};

/// Where the webhook serves AdmissionReviews (Istio's path).
pub const PATH: &str = "/inject";
/// Namespaces never injected, whatever the selectors say.
pub const SYSTEM_NAMESPACES: [&str; 3] = ["kube-system", "kube-public", "kube-node-lease"];
/// The largest AdmissionReview read (the API server caps objects at 3 MiB).
const MAX_REVIEW: usize = 4 << 20;

/// The webhook's settings.
#[derive(Debug, Clone)]
pub struct Webhook {
    pub listen: SocketAddr,
    /// What injected pods get.
    pub settings: Settings,
    /// The MutatingWebhookConfiguration whose `caBundle` the control plane keeps.
    pub configuration: String,
}

/// The answer to one AdmissionReview (its JSON), or why the request is no AdmissionReview.
pub fn review(body: &[u8], settings: &Settings) -> Result<Value, String> {
    let review: Value =
        serde_json::from_slice(body).map_err(|e| format!("not an AdmissionReview: {e}"))?;
    let request = &review["request"];
    let uid = request["uid"]
        .as_str()
        .ok_or("an AdmissionReview without request.uid")?;
    let api_version = review["apiVersion"]
        .as_str()
        .unwrap_or("admission.k8s.io/v1");
    let mut response = json!({"uid": uid, "allowed": true});
    let is_pod = request["kind"]["kind"] == "Pod" && request["kind"]["group"] == "";
    let creates = request["operation"] == "CREATE";
    let namespace = request["namespace"]
        .as_str()
        .or_else(|| request["object"]["metadata"]["namespace"].as_str())
        .unwrap_or("default");
    if is_pod && creates && !SYSTEM_NAMESPACES.contains(&namespace) {
        let pod = &request["object"];
        let target = Target {
            namespace: namespace.to_owned(),
            workload: None,
        };
        let strings = |m: &str| -> std::collections::BTreeMap<String, String> {
            pod["metadata"][m]
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        };
        let opted_out =
            hypha_inject::pod_choice(&strings("labels"), &strings("annotations")) == Some(false);
        if !opted_out {
            match hypha_inject::inject(pod, &target, settings) {
                Ok(Outcome::Injected(done)) => {
                    let patch = serde_json::to_vec(&done.patch).map_err(|e| e.to_string())?;
                    response["patchType"] = json!("JSONPatch");
                    response["patch"] =
                        json!(base64::engine::general_purpose::STANDARD.encode(patch));
                    tracing::info!(namespace, pod = %describe(pod), "sidecar injected");
                }
                Ok(Outcome::Skipped(why)) => {
                    tracing::debug!(namespace, pod = %describe(pod), %why, "not injected");
                }
                Err(e) => {
                    tracing::warn!(namespace, pod = %describe(pod), error = %e, "pod refused");
                    response["allowed"] = json!(false);
                    response["status"] = json!({
                        "status": "Failure",
                        "code": 400,
                        "reason": "BadRequest",
                        "message": format!("sidecar injection: {e}"),
                    });
                }
            }
        }
    }
    Ok(json!({
        "apiVersion": api_version,
        "kind": "AdmissionReview",
        "response": response,
    }))
}

/// A pod's name for the log (`generateName…` before it has one).
fn describe(pod: &Value) -> String {
    let meta = &pod["metadata"];
    match (meta["name"].as_str(), meta["generateName"].as_str()) {
        (Some(n), _) if !n.is_empty() => n.to_owned(),
        (_, Some(g)) => format!("{g}…"),
        _ => "(unnamed)".into(),
    }
}

/// Serves the webhook on `listener` over TLS with `credentials` (read for each connection, so
/// a renewed certificate serves at once) until dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    credentials: hypha_identity::Store,
    settings: Arc<Settings>,
) {
    let mut incoming = hypha_identity::grpc::incoming(listener, move || credentials.load());
    while let Some(conn) = incoming.next().await {
        let Ok(conn) = conn else { continue };
        let settings = settings.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let settings = settings.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(req, &settings).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(conn), svc)
                .await;
        });
    }
}

async fn handle(req: Request<hyper::body::Incoming>, settings: &Settings) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: String, json: bool| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        if json {
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
        }
        r
    };
    if req.uri().path() != PATH {
        return reply(StatusCode::NOT_FOUND, format!("webhook: {PATH}\n"), false);
    }
    if req.method() != http::Method::POST {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "POST only\n".into(), false);
    }
    let body = match Limited::new(req.into_body(), MAX_REVIEW).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return reply(StatusCode::BAD_REQUEST, format!("{e}\n"), false),
    };
    match review(&body, settings) {
        Ok(answer) => reply(StatusCode::OK, answer.to_string(), true),
        Err(e) => reply(StatusCode::BAD_REQUEST, format!("{e}\n"), false),
    }
}

/// Keeps `caBundle` of every webhook of MutatingWebhookConfiguration `name` equal to
/// `ca_pem`: written when the configuration appears and again whenever it changes. Runs until
/// dropped.
pub async fn keep_ca_bundle(client: Client, name: String, ca_pem: String) {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher::watcher(api.clone(), config)
        .default_backoff()
        .boxed();
    while let Some(event) = events.next().await {
        let seen = match event {
            Ok(watcher::Event::Apply(c) | watcher::Event::InitApply(c)) => c,
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!(configuration = %name, error = %e, "watching the webhook configuration");
                continue;
            }
        };
        let mut wanted = seen.clone();
        for w in wanted.webhooks.iter_mut().flatten() {
            w.client_config.ca_bundle = Some(k8s_openapi::ByteString(ca_pem.clone().into_bytes()));
        }
        if wanted.webhooks == seen.webhooks {
            continue;
        }
        // The object as seen (its resourceVersion): a concurrent change wins, and its event
        // brings this back.
        match api.replace(&name, &PostParams::default(), &wanted).await {
            Ok(_) => tracing::info!(configuration = %name, "webhook caBundle written"),
            Err(e) => {
                tracing::warn!(configuration = %name, error = %e, "webhook caBundle not written")
            }
        }
    }
}

/// The webhook as a server of the control plane's ([`hypha_control::TlsService`]): it
/// listens, and keeps the configuration's `caBundle` equal to the control plane's root.
pub fn service(client: Client, webhook: Webhook) -> hypha_control::TlsService {
    hypha_control::TlsService(Arc::new(move |secure| {
        let (client, webhook) = (client.clone(), webhook.clone());
        Box::pin(async move {
            let listener = match tokio::net::TcpListener::bind(webhook.listen).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(addr = %webhook.listen, error = %e, "the injection webhook cannot listen");
                    return;
                }
            };
            tracing::info!(
                "serving the injection webhook on {} ({PATH})",
                listener.local_addr().map_or(webhook.listen, |a| a)
            );
            let keep = keep_ca_bundle(client, webhook.configuration.clone(), secure.own_root());
            tokio::join!(
                serve(listener, secure.credentials(), Arc::new(webhook.settings)),
                keep
            );
        })
    }))
}
