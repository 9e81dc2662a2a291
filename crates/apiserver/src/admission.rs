//! Mutating admission webhooks, called as kube-apiserver calls them: on every create, each
//! webhook of the MutatingWebhookConfigurations (in name order) whose rules take the
//! resource and operation and whose `namespaceSelector` and `objectSelector` select the
//! object gets an `admission.k8s.io/v1` AdmissionReview over HTTPS, verified against its
//! `caBundle` and its Service's DNS name (`<name>.<namespace>.svc`); an answer that does not
//! allow the object refuses the create with its message, a JSON Patch in the answer is applied
//! before the next webhook, and a webhook that cannot be called refuses the create unless its
//! `failurePolicy` is `Ignore` (its `timeoutSeconds`, default 10, bound the call). The objects
//! the controllers create (a Deployment's pods) go through the same.
//!
//! A Service has no endpoints here: tests say where it is with
//! [`crate::ApiServer::route_service`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

use crate::select::Selector;
use crate::{lock, Shared};

/// Where a Service's port is served: (namespace, name, port) → address.
pub(crate) type Routes = HashMap<(String, String, u16), SocketAddr>;

/// Why a create was refused, as the API server answers it.
#[derive(Debug)]
pub(crate) struct Refused {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
}

/// What is being admitted.
pub(crate) struct Request<'a> {
    pub group: &'a str,
    pub version: &'a str,
    pub resource: &'a str,
    pub kind: &'a str,
    pub namespace: &'a str,
    pub namespaced: bool,
    pub username: &'a str,
}

/// `obj` after every webhook that takes it, or why it is refused.
pub(crate) async fn admit(shared: &Shared, r: &Request<'_>, obj: Value) -> Result<Value, Refused> {
    let (hooks, namespace, routes, uid) = {
        let mut state = lock(shared);
        let hooks: Vec<Value> = state
            .store
            .objects
            .iter()
            .filter(|(k, _)| {
                k.0 == "admissionregistration.k8s.io" && k.1 == "mutatingwebhookconfigurations"
            })
            .flat_map(|(_, c)| c["webhooks"].as_array().cloned().unwrap_or_default())
            .collect();
        if hooks.is_empty() {
            return Ok(obj);
        }
        let ns_key = (
            String::new(),
            "namespaces".to_owned(),
            String::new(),
            r.namespace.to_owned(),
        );
        let namespace = state.store.objects.get(&ns_key).cloned();
        state.next_uid += 1;
        let uid = format!("7e5e0000-0000-4000-8000-{:012x}", state.next_uid);
        (hooks, namespace, state.routes.clone(), uid)
    };
    let mut obj = obj;
    for hook in &hooks {
        if !takes(hook, r) {
            continue;
        }
        let selects = |field: &str, target: &Value| {
            Selector::from_object(&hook[field]).is_ok_and(|s| s.matches(target))
        };
        let ns = namespace.clone().unwrap_or_else(|| json!({"metadata": {}}));
        if r.namespaced && !selects("namespaceSelector", &ns) {
            continue;
        }
        if !selects("objectSelector", &obj) {
            continue;
        }
        let name = hook["name"].as_str().unwrap_or_default();
        let review = json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": uid,
                "kind": {"group": r.group, "version": r.version, "kind": r.kind},
                "resource": {"group": r.group, "version": r.version, "resource": r.resource},
                "requestKind": {"group": r.group, "version": r.version, "kind": r.kind},
                "requestResource": {"group": r.group, "version": r.version, "resource": r.resource},
                "namespace": r.namespace,
                "operation": "CREATE",
                "userInfo": {"username": r.username, "groups": ["system:authenticated"]},
                "object": obj,
                "oldObject": null,
                "dryRun": false,
                "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"},
            },
        });
        let timeout = Duration::from_secs(hook["timeoutSeconds"].as_u64().unwrap_or(10));
        let called = tokio::time::timeout(timeout, call(hook, &routes, &review)).await;
        let answer = match called {
            Ok(Ok(a)) => a,
            Ok(Err(e)) if hook["failurePolicy"] == "Ignore" => {
                tracing::warn!(webhook = name, error = %e, "webhook failed, ignored");
                continue;
            }
            Err(_) if hook["failurePolicy"] == "Ignore" => {
                tracing::warn!(webhook = name, "webhook timed out, ignored");
                continue;
            }
            Ok(Err(e)) => return Err(failed(name, &e)),
            Err(_) => return Err(failed(name, "context deadline exceeded")),
        };
        let response = &answer["response"];
        if response["uid"] != json!(uid) {
            return Err(failed(name, "the response's uid is not the request's"));
        }
        if response["allowed"] != json!(true) {
            let status = &response["status"];
            return Err(Refused {
                code: status["code"]
                    .as_u64()
                    .and_then(|c| u16::try_from(c).ok())
                    .unwrap_or(400),
                reason: "BadRequest",
                message: format!(
                    "admission webhook \"{name}\" denied the request: {}",
                    status["message"].as_str().unwrap_or("without explanation")
                ),
            });
        }
        if let Some(patch) = response["patch"].as_str() {
            if response["patchType"] != "JSONPatch" {
                return Err(failed(name, "a patch that is not a JSONPatch"));
            }
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(patch)
                .map_err(|e| failed(name, &format!("patch: {e}")))?;
            let patch: json_patch::Patch =
                serde_json::from_slice(&bytes).map_err(|e| failed(name, &format!("patch: {e}")))?;
            json_patch::patch(&mut obj, &patch)
                .map_err(|e| failed(name, &format!("patch: {e}")))?;
        }
    }
    Ok(obj)
}

fn failed(name: &str, why: &str) -> Refused {
    Refused {
        code: 500,
        reason: "InternalError",
        message: format!("Internal error occurred: failed calling webhook \"{name}\": {why}"),
    }
}

/// Whether one of the webhook's rules takes a CREATE of this resource.
fn takes(hook: &Value, r: &Request<'_>) -> bool {
    let has = |list: &Value, want: &str| {
        list.as_array()
            .is_some_and(|l| l.iter().any(|v| v == "*" || v == want))
    };
    hook["rules"].as_array().into_iter().flatten().any(|rule| {
        has(&rule["operations"], "CREATE")
            && has(&rule["apiGroups"], r.group)
            && has(&rule["apiVersions"], r.version)
            && has(&rule["resources"], r.resource)
            && match rule["scope"].as_str() {
                Some("Namespaced") => r.namespaced,
                Some("Cluster") => !r.namespaced,
                _ => true,
            }
    })
}

/// POSTs `review` to the webhook; its answer.
async fn call(hook: &Value, routes: &Routes, review: &Value) -> Result<Value, String> {
    let cc = &hook["clientConfig"];
    let (addr, host, path) = if let Some(url) = cc["url"].as_str() {
        let rest = url
            .strip_prefix("https://")
            .ok_or("the webhook's url is not https")?;
        let (authority, path) = rest.find('/').map_or((rest, "/"), |i| rest.split_at(i));
        let addr = tokio::net::lookup_host(authority)
            .await
            .map_err(|e| e.to_string())?
            .next()
            .ok_or("no address")?;
        let host = authority
            .rsplit_once(':')
            .map_or(authority, |(h, _)| h)
            .to_owned();
        (addr, host, path.to_owned())
    } else {
        let svc = &cc["service"];
        let (ns, name) = (
            svc["namespace"].as_str().unwrap_or_default(),
            svc["name"].as_str().unwrap_or_default(),
        );
        let port = svc["port"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or(443);
        let addr = routes
            .get(&(ns.to_owned(), name.to_owned(), port))
            .copied()
            .ok_or_else(|| format!("service \"{name}\" not found"))?;
        let path = svc["path"].as_str().unwrap_or("/").to_owned();
        (addr, format!("{name}.{ns}.svc"), path)
    };
    let bundle = match cc["caBundle"].as_str() {
        Some(b) => base64::engine::general_purpose::STANDARD
            .decode(b)
            .map_err(|e| format!("caBundle: {e}"))?,
        None => Vec::new(),
    };
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("dial tcp {addr}: {e}"))?;
    let tls = tls(&bundle, &host, tcp).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    let conn = tokio::spawn(conn);
    let req = http::Request::post(path)
        .header(http::header::HOST, host.as_str())
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(review.to_string())))
        .map_err(|e| e.to_string())?;
    let result = async {
        let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        if !status.is_success() {
            return Err(format!(
                "the server responded {status}: {}",
                String::from_utf8_lossy(&body).trim()
            ));
        }
        serde_json::from_slice(&body).map_err(|e| format!("the answer is not JSON: {e}"))
    }
    .await;
    conn.abort();
    result
}

/// A TLS connection that trusts only `bundle` and checks the server's name is `host`.
async fn tls(
    bundle: &[u8],
    host: &str,
    tcp: tokio::net::TcpStream,
) -> Result<tokio_boring::SslStream<tokio::net::TcpStream>, String> {
    use boring::ssl::{SslConnector, SslMethod, SslVerifyMode};
    use boring::x509::store::X509StoreBuilder;
    use boring::x509::X509;
    let mut b = SslConnector::builder(SslMethod::tls()).map_err(|e| e.to_string())?;
    let mut store = X509StoreBuilder::new().map_err(|e| e.to_string())?;
    if !bundle.is_empty() {
        for cert in X509::stack_from_pem(bundle).map_err(|e| format!("caBundle: {e}"))? {
            store.add_cert(cert).map_err(|e| e.to_string())?;
        }
    }
    b.set_verify_cert_store(store.build())
        .map_err(|e| e.to_string())?;
    b.set_verify(SslVerifyMode::PEER);
    let config = b.build().configure().map_err(|e| e.to_string())?;
    tokio_boring::connect(config, host, tcp)
        .await
        .map_err(|e| format!("tls: {e}"))
}
