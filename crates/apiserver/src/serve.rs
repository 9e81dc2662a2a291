//! HTTP: routing by the API's URL scheme, and each verb.

use std::convert::Infallible;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::discovery::{
    discovery_core, discovery_groups, openapi_doc, openapi_index, resource_list, version,
};
use crate::kinds::Kind;
use crate::schema::{FieldValidation, Refused};
use crate::select::Selector;
use crate::tokenreview::token_review;
use crate::watch::watch;
use crate::{lock, Shared, State};

pub(crate) async fn run(
    listener: tokio::net::TcpListener,
    shared: Shared,
    closed: tokio::sync::watch::Receiver<u64>,
) {
    // Connections end with the server (dropping the set aborts them): a stopped server
    // answers nothing, even on a client's pooled connection.
    let mut connections = tokio::task::JoinSet::new();
    while let Ok((stream, _)) = listener.accept().await {
        while connections.try_join_next().is_some() {}
        let shared = shared.clone();
        let closed = closed.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                let closed = closed.clone();
                async move { Ok::<_, Infallible>(handle(req, shared, closed).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Response bodies: whole, or a watch stream.
pub(crate) enum Body {
    Full(Full<Bytes>),
    Stream(mpsc::Receiver<Bytes>),
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Body::Full(f) => std::pin::Pin::new(f).poll_frame(cx),
            Body::Stream(rx) => rx
                .poll_recv(cx)
                .map(|b| b.map(|b| Ok(hyper::body::Frame::data(b)))),
        }
    }
}

pub(crate) fn respond(status: StatusCode, content_type: &str, body: &Value) -> Response<Body> {
    let mut r = Response::new(Body::Full(Full::new(Bytes::from(body.to_string()))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_str(content_type)
            .unwrap_or(http::HeaderValue::from_static("application/json")),
    );
    r
}

pub(crate) fn ok(body: &Value) -> Response<Body> {
    respond(StatusCode::OK, "application/json", body)
}

/// A `Status` error, as the API server sends them.
pub(crate) fn failure(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    respond(
        code,
        "application/json",
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code.as_u16()}),
    )
}

fn not_found(kind: &Kind, name: &str) -> Response<Body> {
    failure(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("{} \"{name}\" not found", kind.qualified()),
    )
}

/// How a create or update is to be done: `fieldValidation` and `dryRun=All` (checked, admitted,
/// answered, not stored).
#[derive(Debug, Clone, Copy)]
struct Write {
    fields: FieldValidation,
    dry_run: bool,
}

/// What the URL names.
pub(crate) struct Target {
    pub(crate) kind: Kind,
    pub(crate) namespace: String,
    pub(crate) name: Option<String>,
    pub(crate) subresource: Option<String>,
}

fn query(req: &Request<Incoming>) -> Vec<(String, String)> {
    let q = req.uri().query().unwrap_or("");
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// Form decoding: `+` is a space, `%XX` a byte.
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'+', _) => out.push(b' '),
            (b'%', Some(v)) => {
                out.push(v);
                i += 2;
            }
            (c, _) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn handle(
    req: Request<Incoming>,
    shared: Shared,
    closed: tokio::sync::watch::Receiver<u64>,
) -> Response<Body> {
    let path = req.uri().path().trim_end_matches('/').to_owned();
    let q = query(&req);
    let param = |k: &str| q.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let write = Write {
        fields: FieldValidation::from_query(param("fieldValidation")),
        dry_run: param("dryRun") == Some("All"),
    };
    let aggregated = req
        .headers()
        .get(http::header::ACCEPT)
        .and_then(|a| a.to_str().ok())
        .is_some_and(|a| a.contains("as=APIGroupDiscoveryList") && a.contains("v=v2;"));
    let method = req.method().clone();
    let bearer = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_owned());
    let content_type = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_owned();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return failure(StatusCode::BAD_REQUEST, "BadRequest", "unreadable body"),
    };
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segments.as_slice() {
        ["version"] => return ok(&version()),
        ["api"] => return discovery_core(&shared, aggregated),
        ["apis"] => return discovery_groups(&shared, aggregated),
        ["openapi", "v3"] => return ok(&openapi_index(&shared)),
        ["openapi", "v3", rest @ ..] => return openapi_doc(&shared, rest),
        ["openapi", ..] => {
            return failure(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the server could not find the requested resource",
            )
        }
        _ => {}
    }
    let (group, version, rest) = match segments.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => {
            return failure(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the server could not find the requested resource",
            )
        }
    };
    if rest.is_empty() {
        return resource_list(&shared, group, version);
    }
    let target = {
        let state = lock(&shared);
        let find = |r: &str| {
            state
                .kinds
                .iter()
                .find(|k| k.group == group && k.version == version && k.resource == r)
                .cloned()
        };
        let t = match rest {
            ["namespaces", ns, r, more @ ..] if find(r).is_some_and(|k| k.namespaced) => {
                find(r).map(|kind| (kind, ns.to_string(), more))
            }
            [r, more @ ..] => find(r).map(|kind| (kind, String::new(), more)),
            [] => None,
        };
        t.and_then(|(kind, namespace, more)| match more {
            [] => Some(Target {
                kind,
                namespace,
                name: None,
                subresource: None,
            }),
            [name] => Some(Target {
                kind,
                namespace,
                name: Some(name.to_string()),
                subresource: None,
            }),
            [name, sub] => Some(Target {
                kind,
                namespace,
                name: Some(name.to_string()),
                subresource: Some(sub.to_string()),
            }),
            _ => None,
        })
    };
    let Some(t) = target else {
        return failure(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        );
    };
    if let Some(refused) = authorize(&shared, bearer.as_deref(), &method, &t, param("watch")) {
        return refused;
    }
    let selector = match Selector::parse(param("labelSelector"), param("fieldSelector")) {
        Ok(s) => s,
        Err(e) => return failure(StatusCode::BAD_REQUEST, "BadRequest", &e.0),
    };
    let parsed = || -> Result<Value, String> {
        if content_type.starts_with("application/vnd.kubernetes.protobuf") {
            return crate::protobuf::decode(&body);
        }
        serde_json::from_slice(&body).map_err(|e| format!("the body is not JSON: {e}"))
    };
    let bad = |e: String| failure(StatusCode::BAD_REQUEST, "BadRequest", &e);
    match (&method, &t.name, t.subresource.as_deref()) {
        (&Method::GET, None, _) if matches!(param("watch"), Some("true" | "1")) => {
            watch(&shared, &t, selector, &q, closed)
        }
        (&Method::GET, None, _) => list(&shared, &t, &selector, &q),
        (&Method::POST, None, _) if t.kind.resource == "tokenreviews" => match parsed() {
            Ok(review) => token_review(&shared, review),
            Err(e) => bad(e),
        },
        (&Method::POST, None, _) => match parsed() {
            Ok(mut obj) => {
                // Mutating admission sees the object as sent (a pod's generateName, no name
                // yet), in the namespace of the request.
                if t.kind.namespaced {
                    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
                        meta.entry("namespace")
                            .or_insert_with(|| Value::String(t.namespace.clone()));
                    }
                }
                // A CSR names who asked for it, whatever its body said.
                if t.kind.resource == "certificatesigningrequests" && obj["spec"].is_object() {
                    let (user, groups) = requester(&shared, bearer.as_deref());
                    obj["spec"]["username"] = user.into();
                    obj["spec"]["groups"] = groups.into();
                }
                let request = crate::admission::Request {
                    group: &t.kind.group,
                    version: &t.kind.version,
                    resource: &t.kind.resource,
                    kind: &t.kind.kind,
                    namespace: &t.namespace,
                    namespaced: t.kind.namespaced,
                    username: "kubernetes-admin",
                };
                match crate::admission::admit(&shared, &request, obj).await {
                    Ok(obj) => create(&shared, &t, obj, write),
                    Err(r) => failure(
                        StatusCode::from_u16(r.code).unwrap_or(StatusCode::BAD_REQUEST),
                        r.reason,
                        &r.message,
                    ),
                }
            }
            Err(e) => bad(e),
        },
        // The object, or its `status` or `scale` where the kind has them.
        (&Method::GET, Some(name), sub)
            if sub.is_none_or(|sub| t.kind.subresources.contains(&sub)) =>
        {
            let state = lock(&shared);
            match state.store.objects.get(&key(&t, name)) {
                Some(obj) if sub == Some("scale") => ok(&scale_of(obj)),
                Some(obj) => ok(&shown(&t.kind, obj)),
                None => not_found(&t.kind, name),
            }
        }
        (&Method::PUT, Some(name), sub) => match parsed() {
            Ok(obj) => update(&shared, &t, name, sub, Change::Replace(obj), write),
            Err(e) => bad(e),
        },
        (&Method::PATCH, Some(name), sub) => {
            let how: fn(Value) -> Change =
                if content_type.starts_with("application/merge-patch+json") {
                    Change::Merge
                } else if content_type.starts_with("application/strategic-merge-patch+json") {
                    Change::Strategic
                } else {
                    return failure(
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        "UnsupportedMediaType",
                        &format!("the patch type {content_type:?} is not supported"),
                    );
                };
            match parsed() {
                Ok(p) => update(&shared, &t, name, sub, how(p), write),
                Err(e) => bad(e),
            }
        }
        (&Method::DELETE, Some(name), None) => {
            // DeleteOptions' grace period, in the body (kubectl) or the query.
            let grace = parsed()
                .ok()
                .and_then(|o| o.get("gracePeriodSeconds")?.as_u64())
                .or_else(|| param("gracePeriodSeconds")?.parse().ok());
            delete(&shared, &t, name, grace)
        }
        _ => failure(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        ),
    }
}

/// RBAC for requests made with a service-account token the test issued (401 once it has
/// expired, 403 where no role allows it); `None` lets the request through.
fn authorize(
    shared: &Shared,
    bearer: Option<&str>,
    method: &Method,
    t: &Target,
    watch: Option<&str>,
) -> Option<Response<Body>> {
    let state = lock(shared);
    let token = state
        .tokens
        .iter()
        .find(|(secret, _)| Some(secret.as_str()) == bearer)
        .map(|(_, t)| t)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if token.expires <= now {
        return Some(failure(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "Unauthorized",
        ));
    }
    let verb = match (method, &t.name) {
        (&Method::GET, None) if matches!(watch, Some("true" | "1")) => "watch",
        (&Method::GET, None) => "list",
        (&Method::GET, Some(_)) => "get",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, _) => "delete",
        _ => "unknown",
    };
    let a = crate::rbac::Attributes {
        verb,
        group: &t.kind.group,
        resource: match &t.subresource {
            Some(sub) => format!("{}/{sub}", t.kind.resource),
            None => t.kind.resource.clone(),
        },
        namespace: &t.namespace,
        name: t.name.as_deref(),
    };
    if !crate::rbac::allowed(&state, &token.namespace, &token.service_account, &a) {
        return Some(failure(
            StatusCode::FORBIDDEN,
            "Forbidden",
            &crate::rbac::forbidden_message(&token.namespace, &token.service_account, &a),
        ));
    }
    // Answering a CSR (its status) takes `sign`, approving it `approve`, on its signer: the
    // signer's name or `<domain>/*` (the certificates API's own authorization).
    let signer_verb = match (t.kind.resource.as_str(), t.subresource.as_deref(), verb) {
        ("certificatesigningrequests", Some("status"), "update" | "patch") => "sign",
        ("certificatesigningrequests", Some("approval"), "update" | "patch") => "approve",
        _ => return None,
    };
    let signer = state
        .store
        .objects
        .get(&key(t, t.name.as_deref().unwrap_or_default()))
        .and_then(|csr| csr.pointer("/spec/signerName"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let wildcard = signer
        .split_once('/')
        .map(|(domain, _)| format!("{domain}/*"))
        .unwrap_or_default();
    let may = |name: &str| {
        let on = crate::rbac::Attributes {
            verb: signer_verb,
            group: "certificates.k8s.io",
            resource: "signers".into(),
            namespace: "",
            name: Some(name),
        };
        crate::rbac::allowed(&state, &token.namespace, &token.service_account, &on)
    };
    if may(&signer) || may(&wildcard) {
        return None;
    }
    Some(failure(
        StatusCode::FORBIDDEN,
        "Forbidden",
        &format!("user not permitted to {signer_verb} requests with signerName \"{signer}\"",),
    ))
}

/// Who a request is from, as the API server names users: a service account of a token it
/// issued, else the administrator.
fn requester(shared: &Shared, bearer: Option<&str>) -> (String, Vec<String>) {
    let state = lock(shared);
    match state
        .tokens
        .iter()
        .find(|(s, _)| Some(s.as_str()) == bearer)
    {
        Some((_, t)) => (
            format!(
                "system:serviceaccount:{}:{}",
                t.namespace, t.service_account
            ),
            vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{}", t.namespace),
                "system:authenticated".into(),
            ],
        ),
        None => (
            "kubernetes-admin".into(),
            vec!["system:masters".into(), "system:authenticated".into()],
        ),
    }
}

fn key(t: &Target, name: &str) -> crate::store::Key {
    (
        t.kind.group.clone(),
        t.kind.resource.clone(),
        t.namespace.clone(),
        name.to_owned(),
    )
}

/// The object as `kind`'s version shows it.
pub(crate) fn shown(kind: &Kind, obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Some(m) = o.as_object_mut() {
        m.insert("apiVersion".into(), Value::String(kind.api_version()));
        m.insert("kind".into(), Value::String(kind.kind.clone()));
    }
    o
}

fn in_scope(t: &Target, namespace: &str) -> bool {
    t.namespace.is_empty() || t.namespace == namespace
}

/// A list, in pages of `limit` when asked: the `continue` token names the list's resource
/// version and the last key sent; once that version is compacted away, `410 Expired` (the
/// client lists again from the start).
fn list(
    shared: &Shared,
    t: &Target,
    selector: &Selector,
    q: &[(String, String)],
) -> Response<Body> {
    let param = |k: &str| q.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let limit = param("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|&l| l > 0);
    let state = lock(shared);
    let (rv, after) = match param("continue").filter(|c| !c.is_empty()) {
        None => (state.store.rv, None),
        Some(token) => match parse_continue(token) {
            Some((rv, ns, name)) if state.store.current(rv) => (rv, Some((ns, name))),
            Some(_) => {
                return failure(StatusCode::GONE, "Expired",
                    "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.")
            }
            None => return failure(StatusCode::BAD_REQUEST, "BadRequest", "invalid continue token"),
        },
    };
    let mut matching = state
        .store
        .objects
        .iter()
        .filter(|((g, r, ns, name), obj)| {
            *g == t.kind.group
                && *r == t.kind.resource
                && in_scope(t, ns)
                && after
                    .as_ref()
                    .is_none_or(|(a_ns, a_name)| (ns, name) > (a_ns, a_name))
                && selector.matches(obj)
        });
    let mut items = Vec::new();
    let mut last = None;
    for ((_, _, ns, name), obj) in matching.by_ref() {
        if limit.is_some_and(|l| items.len() == l) {
            break;
        }
        items.push(shown(&t.kind, obj));
        last = Some(format!("{ns}/{name}"));
    }
    let more = limit.is_some_and(|l| items.len() == l) && matching.next().is_some();
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if more {
        if let Some(last) = last {
            metadata["continue"] = json!(format!("{rv}/{last}"));
        }
    }
    ok(
        &json!({"kind": format!("{}List", t.kind.kind), "apiVersion": t.kind.api_version(),
               "metadata": metadata, "items": items}),
    )
}

/// A `continue` token: `<resource version>/<namespace>/<name>` of the last item sent.
fn parse_continue(token: &str) -> Option<(u64, String, String)> {
    let (rv, rest) = token.split_once('/')?;
    let (ns, name) = rest.split_once('/')?;
    Some((rv.parse().ok()?, ns.to_owned(), name.to_owned()))
}

/// RFC 3339 UTC, to the second.
pub(crate) fn now_rfc3339() -> String {
    rfc3339(std::time::SystemTime::now())
}

/// `at` as RFC 3339 in UTC, to the second.
pub(crate) fn rfc3339(at: std::time::SystemTime) -> String {
    let secs = at
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days to civil date (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn create(shared: &Shared, t: &Target, mut obj: Value, w: Write) -> Response<Body> {
    let warnings = match checked(&t.kind, &mut obj, w.fields) {
        Ok(w) => w,
        Err(r) => return *r,
    };
    let mut state = lock(shared);
    let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) else {
        return failure(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the object has no metadata",
        );
    };
    if t.kind.namespaced {
        match meta.get("namespace").and_then(Value::as_str) {
            Some(ns) if ns != t.namespace => {
                return failure(StatusCode::BAD_REQUEST, "BadRequest",
                    "the namespace of the provided object does not match the namespace sent on the request")
            }
            _ => {
                meta.insert("namespace".into(), Value::String(t.namespace.clone()));
            }
        }
    }
    state.next_uid += 1;
    let uid = state.next_uid;
    if meta
        .get("name")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        match meta.get("generateName").and_then(Value::as_str) {
            Some(prefix) => {
                meta.insert("name".into(), Value::String(format!("{prefix}{uid:05x}")));
            }
            None => {
                return failure(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "name or generateName is required",
                )
            }
        }
    }
    let name = meta["name"].as_str().unwrap_or_default().to_owned();
    if t.kind.resource == "namespaces" && t.kind.group.is_empty() {
        // Every namespace is labelled with its name, so selectors can name namespaces.
        let labels = meta
            .entry("labels")
            .or_insert_with(|| Value::Object(Default::default()));
        if let Some(l) = labels.as_object_mut() {
            l.insert(
                "kubernetes.io/metadata.name".into(),
                Value::String(name.clone()),
            );
        }
    }
    let terminating = state
        .store
        .objects
        .get(&(
            String::new(),
            "namespaces".into(),
            String::new(),
            t.namespace.clone(),
        ))
        .is_some_and(|ns| ns.pointer("/metadata/deletionTimestamp").is_some());
    if t.kind.namespaced && terminating {
        return failure(
            StatusCode::FORBIDDEN,
            "Forbidden",
            &format!(
                "unable to create new content in namespace {} because it is being terminated",
                t.namespace
            ),
        );
    }
    let k = key(t, &name);
    if state.store.objects.contains_key(&k) {
        return failure(
            StatusCode::CONFLICT,
            "AlreadyExists",
            &format!("{} \"{name}\" already exists", t.kind.qualified()),
        );
    }
    meta.insert(
        "uid".into(),
        Value::String(format!("00000000-0000-0000-0000-{uid:012x}")),
    );
    meta.insert("creationTimestamp".into(), Value::String(now_rfc3339()));
    meta.insert("generation".into(), json!(1));
    let obj = shown(&t.kind, &obj);
    if w.dry_run {
        return warned(
            respond(StatusCode::CREATED, "application/json", &obj),
            &warnings,
        );
    }
    let stored = store_object(&mut state, &k, "ADDED", obj);
    warned(
        respond(
            StatusCode::CREATED,
            "application/json",
            &shown(&t.kind, &stored),
        ),
        &warnings,
    )
}

/// A custom resource checked against its schema and pruned (`schema::admit`); the warnings to
/// send, or the refusal.
fn checked(
    kind: &Kind,
    obj: &mut Value,
    fields: FieldValidation,
) -> Result<Vec<String>, Box<Response<Body>>> {
    let Some(schema) = &kind.schema else {
        return Ok(Vec::new());
    };
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    crate::schema::admit(schema, obj, fields).map_err(|refused| {
        Box::new(match refused {
            Refused::Strict(unknown) => failure(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &format!("strict decoding error: {}", unknown.join(", ")),
            ),
            Refused::Invalid(problems) => failure(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                &format!(
                    "{} \"{name}\" is invalid: [{}]",
                    kind.qualified(),
                    problems.join(", ")
                ),
            ),
        })
    })
}

/// `Warning` headers, as kube-apiserver sends them (kubectl prints each).
fn warned(mut r: Response<Body>, warnings: &[String]) -> Response<Body> {
    for w in warnings {
        let text = format!("299 - {:?}", w);
        if let Ok(v) = http::HeaderValue::from_str(&text) {
            r.headers_mut().append("warning", v);
        }
    }
    r
}

/// Stores an object (after the API server's own side effects: CRDs register their kinds).
fn store_object(
    state: &mut State,
    k: &crate::store::Key,
    event: &'static str,
    mut obj: Value,
) -> Value {
    if k.1 == "customresourcedefinitions" && k.0 == "apiextensions.k8s.io" {
        if let Some(kinds) = Kind::from_crd(&obj) {
            forget(state, &kinds);
            let names = obj.pointer("/spec/names").cloned().unwrap_or(Value::Null);
            state.kinds.extend(kinds);
            obj["status"] = json!({"acceptedNames": names, "conditions": [
                {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found"},
                {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted"}]});
        }
    }
    crate::controllers::allocate_cluster_ip(state, k, &mut obj);
    state.store.record(k, event, obj)
}

/// Stops serving the resources of `kinds` (a CRD replaced or deleted).
fn forget(state: &mut State, kinds: &[Kind]) {
    state.kinds.retain(|x| {
        !kinds
            .iter()
            .any(|n| n.group == x.group && n.resource == x.resource)
    });
}

/// For controllers (`ApiServer::put`): create or replace, no checks.
pub(crate) fn put_object(state: &mut State, group: &str, resource: &str, mut obj: Value) -> Value {
    let namespace = obj
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let k = (group.to_owned(), resource.to_owned(), namespace, name);
    let old = state.store.objects.get(&k).cloned();
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        match &old {
            Some(old) => {
                for f in ["uid", "creationTimestamp"] {
                    if let Some(v) = old.pointer(&format!("/metadata/{f}")) {
                        meta.insert(f.into(), v.clone());
                    }
                }
            }
            None => {
                state.next_uid += 1;
                meta.insert(
                    "uid".into(),
                    Value::String(format!("00000000-0000-0000-0000-{:012x}", state.next_uid)),
                );
                meta.insert("creationTimestamp".into(), Value::String(now_rfc3339()));
            }
        }
    }
    let event = if old.is_some() { "MODIFIED" } else { "ADDED" };
    store_object(state, &k, event, obj)
}

enum Change {
    Replace(Value),
    Merge(Value),
    Strategic(Value),
}

impl Change {
    fn apply(self, target: &mut Value) {
        match self {
            Change::Replace(v) => *target = v,
            Change::Merge(p) => crate::patch::merge(target, &p),
            Change::Strategic(p) => crate::patch::strategic(target, &p),
        }
    }
}

fn update(
    shared: &Shared,
    t: &Target,
    name: &str,
    sub: Option<&str>,
    change: Change,
    w: Write,
) -> Response<Body> {
    let mut state = lock(shared);
    let k = key(t, name);
    let Some(old) = state.store.objects.get(&k).cloned() else {
        return not_found(&t.kind, name);
    };
    let conflict = || {
        failure(StatusCode::CONFLICT, "Conflict", &format!(
            "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
            t.kind.qualified()))
    };
    let expected = |v: &Value| {
        v.pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    // A replacement names the version it was read at; an older one conflicts.
    if let Change::Replace(v) = &change {
        if expected(v).is_some_and(|rv| Some(rv) != expected(&old)) {
            return conflict();
        }
    }
    let mut new = old.clone();
    match sub {
        Some("scale") if t.kind.subresources.contains(&"scale") => {
            let mut scale = scale_of(&old);
            change.apply(&mut scale);
            new["spec"]["replicas"] = scale.pointer("/spec/replicas").cloned().unwrap_or(json!(1));
        }
        Some("status") if t.kind.subresources.contains(&"status") => {
            let mut whole = old.clone();
            change.apply(&mut whole);
            new["status"] = whole.get("status").cloned().unwrap_or(Value::Null);
        }
        // A CSR's approval: its conditions only (`kubectl certificate approve/deny`).
        Some("approval") if t.kind.subresources.contains(&"approval") => {
            let mut whole = old.clone();
            change.apply(&mut whole);
            new["status"]["conditions"] = whole
                .pointer("/status/conditions")
                .cloned()
                .unwrap_or(Value::Null);
        }
        Some(_) => {
            return failure(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the server could not find the requested resource",
            )
        }
        None => {
            change.apply(&mut new);
            // What the server owns stays as it was.
            for f in [
                "uid",
                "creationTimestamp",
                "namespace",
                "name",
                "generation",
            ] {
                match old.pointer(&format!("/metadata/{f}")) {
                    Some(v) => new["metadata"][f] = v.clone(),
                    None => {
                        if let Some(m) = new.get_mut("metadata").and_then(Value::as_object_mut) {
                            m.remove(f);
                        }
                    }
                }
            }
            if t.kind.subresources.contains(&"status") {
                new["status"] = old.get("status").cloned().unwrap_or(Value::Null);
                if new["status"].is_null() {
                    if let Some(m) = new.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
        }
    }
    let warnings = match checked(&t.kind, &mut new, w.fields) {
        Ok(w) => w,
        Err(r) => return *r,
    };
    if old.get("spec") != new.get("spec") {
        let g = old
            .pointer("/metadata/generation")
            .and_then(Value::as_u64)
            .unwrap_or(1);
        new["metadata"]["generation"] = json!(g + 1);
    }
    if new == old {
        return ok(&if sub == Some("scale") {
            scale_of(&old)
        } else {
            shown(&t.kind, &old)
        });
    }
    if w.dry_run {
        return warned(ok(&shown(&t.kind, &new)), &warnings);
    }
    let stored = store_object(&mut state, &k, "MODIFIED", shown(&t.kind, &new));
    warned(
        ok(&if sub == Some("scale") {
            scale_of(&stored)
        } else {
            shown(&t.kind, &stored)
        }),
        &warnings,
    )
}

fn scale_of(obj: &Value) -> Value {
    let labels = obj
        .pointer("/spec/selector/matchLabels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    json!({"kind": "Scale", "apiVersion": "autoscaling/v1",
           "metadata": {"name": obj.pointer("/metadata/name"), "namespace": obj.pointer("/metadata/namespace"),
                        "uid": obj.pointer("/metadata/uid"), "resourceVersion": obj.pointer("/metadata/resourceVersion"),
                        "creationTimestamp": obj.pointer("/metadata/creationTimestamp")},
           "spec": {"replicas": obj.pointer("/spec/replicas").cloned().unwrap_or(json!(1))},
           "status": {"replicas": obj.pointer("/status/replicas").cloned().unwrap_or(json!(0)), "selector": labels}})
}

fn delete(shared: &Shared, t: &Target, name: &str, grace: Option<u64>) -> Response<Body> {
    let mut state = lock(shared);
    let k = key(t, name);
    let Some(obj) = state.store.objects.get(&k).cloned() else {
        return not_found(&t.kind, name);
    };
    if k.1 == "customresourcedefinitions" && k.0 == "apiextensions.k8s.io" {
        if let Some(kinds) = Kind::from_crd(&obj) {
            forget(&mut state, &kinds);
        }
    }
    // A namespace is Terminating first, then (as the namespace controller does) emptied and
    // removed; what is in it can still be deleted meanwhile, nothing new created.
    if k.0.is_empty() && k.1 == "namespaces" {
        if obj.pointer("/metadata/deletionTimestamp").is_none() {
            let mut terminating = obj;
            terminating["metadata"]["deletionTimestamp"] = json!(now_rfc3339());
            terminating["status"] = json!({"phase": "Terminating"});
            let shown_now = store_object(&mut state, &k, "MODIFIED", terminating);
            let shared = shared.clone();
            tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                let mut state = lock(&shared);
                let inside: Vec<(crate::store::Key, Value)> = state
                    .store
                    .objects
                    .iter()
                    .filter(|((_, _, ns, _), _)| *ns == k.3)
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                for (key, obj) in inside {
                    state.store.record(&key, "DELETED", obj);
                }
                if let Some(ns) = state.store.objects.get(&k).cloned() {
                    state.store.record(&k, "DELETED", ns);
                }
            });
            return ok(&shown(&t.kind, &shown_now));
        }
        return ok(&shown(&t.kind, &obj));
    }
    // A pod on a node is deleted gracefully: Terminating (a `deletionTimestamp`) until the
    // kubelet has stopped its containers, then removed. One on no node, one whose containers
    // have ended, and a grace period of 0 remove it at once (the API server's rules).
    let running = obj.pointer("/spec/nodeName").is_some_and(|n| n != "")
        && !matches!(
            obj.pointer("/status/phase").and_then(Value::as_str),
            Some("Succeeded" | "Failed")
        );
    if k.0.is_empty() && k.1 == "pods" && running {
        let grace = grace
            .or_else(|| obj.pointer("/spec/terminationGracePeriodSeconds")?.as_u64())
            .unwrap_or(30);
        if grace > 0 && obj.pointer("/metadata/deletionTimestamp").is_none() {
            let mut terminating = obj;
            let at = std::time::SystemTime::now() + std::time::Duration::from_secs(grace);
            terminating["metadata"]["deletionTimestamp"] = json!(rfc3339(at));
            terminating["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
            let uid = terminating.pointer("/metadata/uid").cloned();
            let shown_now = store_object(&mut state, &k, "MODIFIED", terminating);
            // The kubelet stops the containers (their app draining after SIGTERM), at most
            // for the grace period.
            let stop = state
                .pod_shutdown
                .min(std::time::Duration::from_secs(grace));
            let shared = shared.clone();
            tokio::spawn(async move {
                tokio::time::sleep(stop).await;
                let mut state = lock(&shared);
                let same = (state.store.objects.get(&k))
                    .filter(|p| p.pointer("/metadata/uid").cloned() == uid)
                    .cloned();
                if let Some(pod) = same {
                    state.store.record(&k, "DELETED", pod);
                }
            });
            return ok(&shown(&t.kind, &shown_now));
        }
        if grace > 0 {
            return ok(&shown(&t.kind, &obj));
        }
    }
    let gone = state.store.record(&k, "DELETED", obj);
    ok(&shown(&t.kind, &gone))
}
