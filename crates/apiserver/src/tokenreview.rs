//! `authentication.k8s.io/v1` TokenReview, answered from the tokens the test issued.

use http::{Response, StatusCode};
use serde_json::{json, Value};

use crate::serve::{respond, Body};
use crate::{lock, Shared};

/// `authentication.k8s.io/v1` TokenReview: a token the server issued, unexpired, for one of
/// the audiences asked (or any, when none are), whose bound pod still exists with its uid.
pub(crate) fn token_review(shared: &Shared, review: Value) -> Response<Body> {
    let state = lock(shared);
    let token = review
        .pointer("/spec/token")
        .and_then(Value::as_str)
        .unwrap_or("");
    let asked = crate::kinds::strings(review.pointer("/spec/audiences"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let found = state
        .tokens
        .iter()
        .find(|(secret, _)| secret == token)
        .map(|(_, t)| t);
    let status = match found {
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
        Some(t) if t.expires <= now => {
            json!({"authenticated": false, "error": "token has expired"})
        }
        Some(t) => {
            let audiences: Vec<&String> = if asked.is_empty() {
                t.audiences.iter().collect()
            } else {
                t.audiences.iter().filter(|a| asked.contains(a)).collect()
            };
            let pod_ok = t.pod.as_ref().is_none_or(|(name, uid)| {
                state
                    .store
                    .objects
                    .get(&(
                        String::new(),
                        "pods".into(),
                        t.namespace.clone(),
                        name.clone(),
                    ))
                    .and_then(|p| p.pointer("/metadata/uid"))
                    .and_then(Value::as_str)
                    == Some(uid.as_str())
            });
            if audiences.is_empty() {
                json!({"authenticated": false, "error": "token audiences do not match"})
            } else if !pod_ok {
                json!({"authenticated": false, "error": "the pod the token is bound to no longer exists"})
            } else {
                let mut extra = serde_json::Map::new();
                if let Some((name, uid)) = &t.pod {
                    extra.insert(
                        "authentication.kubernetes.io/pod-name".into(),
                        json!([name]),
                    );
                    extra.insert("authentication.kubernetes.io/pod-uid".into(), json!([uid]));
                }
                json!({"authenticated": true,
                       "user": {"username": format!("system:serviceaccount:{}:{}", t.namespace, t.service_account),
                                "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{}", t.namespace), "system:authenticated"],
                                "extra": extra},
                       "audiences": audiences})
            }
        }
    };
    let mut out = review;
    out["status"] = status;
    out["apiVersion"] = json!("authentication.k8s.io/v1");
    out["kind"] = json!("TokenReview");
    respond(StatusCode::CREATED, "application/json", &out)
}
