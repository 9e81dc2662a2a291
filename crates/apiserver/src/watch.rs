//! Watch streams: one JSON event per line, from a resource version (the history) or from now
//! (every object as `ADDED`), then live; bookmarks each second when asked; `ERROR` with
//! `410 Gone` in the stream once that version is compacted away.

use bytes::Bytes;
use http::{Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::kinds::Kind;
use crate::select::Selector;
use crate::serve::{respond, shown, Body, Target};
use crate::store::Event;
use crate::{lock, Shared};

pub(crate) fn watch(
    shared: &Shared,
    t: &Target,
    selector: Selector,
    q: &[(String, String)],
    mut closed: tokio::sync::watch::Receiver<u64>,
) -> Response<Body> {
    let param = |k: &str| q.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let bookmarks = param("allowWatchBookmarks") == Some("true");
    let timeout = param("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .map(std::time::Duration::from_secs);
    let (tx, rx) = mpsc::channel::<Bytes>(1024);
    let kind = t.kind.clone();
    let namespace = t.namespace.clone();
    let line = |kind_: &str, object: &Value| {
        Bytes::from(format!("{}\n", json!({"type": kind_, "object": object})))
    };
    let (initial, mut live, mut rv) = {
        let state = lock(shared);
        let live = state.store.feed.subscribe();
        let from = param("resourceVersion").filter(|v| !v.is_empty() && *v != "0");
        let initial: Result<Vec<Bytes>, ()> = match from.map(str::parse::<u64>) {
            // From now: every object as ADDED, then the changes.
            None => Ok(state
                .store
                .objects
                .iter()
                .filter(|((g, r, ns, _), obj)| {
                    *g == kind.group
                        && *r == kind.resource
                        && (namespace.is_empty() || *ns == namespace)
                        && selector.matches(obj)
                })
                .map(|(_, obj)| line("ADDED", &shown(&kind, obj)))
                .collect()),
            Some(Ok(rv)) => match state.store.since(rv) {
                Some(events) => Ok(events
                    .iter()
                    .filter(|e| matches_event(e, &kind, &namespace, &selector))
                    .map(|e| line(e.kind, &shown(&kind, &e.object)))
                    .collect()),
                None => Err(()),
            },
            Some(Err(_)) => Err(()),
        };
        (initial, live, state.store.rv)
    };
    closed.mark_unchanged();
    let api_version = kind.api_version();
    tokio::spawn(async move {
        let initial = match initial {
            Ok(lines) => lines,
            Err(()) => {
                let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
                    "status": "Failure", "message": "too old resource version", "reason": "Expired", "code": 410}});
                let _ = tx.send(Bytes::from(format!("{gone}\n"))).await;
                return;
            }
        };
        for l in initial {
            if tx.send(l).await.is_err() {
                return;
            }
        }
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let second = std::time::Duration::from_secs(1);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + second, second);
        loop {
            let until_deadline = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                e = live.recv() => match e {
                    Ok(e) => {
                        rv = rv.max(e.rv);
                        if matches_event(&e, &kind, &namespace, &selector)
                            && tx.send(line(e.kind, &shown(&kind, &e.object))).await.is_err()
                        {
                            return;
                        }
                    }
                    // Fell behind the feed: end the stream; the client resumes or relists.
                    Err(_) => return,
                },
                _ = tick.tick(), if bookmarks => {
                    let b = json!({"kind": kind.kind, "apiVersion": api_version, "metadata": {"resourceVersion": rv.to_string()}});
                    if tx.send(line("BOOKMARK", &b)).await.is_err() {
                        return;
                    }
                }
                _ = closed.changed() => return,
                () = until_deadline => return,
            }
        }
    });
    respond(StatusCode::OK, "application/json", &Value::Null).map(|_| Body::Stream(rx))
}

fn matches_event(e: &Event, kind: &Kind, namespace: &str, selector: &Selector) -> bool {
    e.group == kind.group
        && e.resource == kind.resource
        && (namespace.is_empty()
            || e.object
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                == Some(namespace))
        && selector.matches(&e.object)
}
