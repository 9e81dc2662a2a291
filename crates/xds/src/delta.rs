//! Incremental (delta) xDS: per type URL, the client's subscription and what the client has
//! (name → version). Only resources whose version differs from the client's are sent; names
//! the client has that no longer exist, and explicitly subscribed names that never existed,
//! go out once in `removed_resources`.
//!
//! The client's versions are updated when a response is sent, and rolled back for the
//! resources of a response it NACKs (it keeps its old ones); the rejected versions are
//! remembered so they are not offered again.

use std::collections::{BTreeSet, HashMap, VecDeque};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource as PbResource,
};
use envoy_types::pb::google::protobuf::Any;
use tonic::Status;
use tracing::debug;

use crate::resource::{Resources, Snapshot};
use crate::server::{check_type_limit, Protocol, StreamCtx};
use crate::type_url::is_legacy_wildcard;

/// Unacknowledged responses remembered per type for rollback on NACK. Clients ACK each
/// response promptly; older ones only lose the rollback, not correctness of later pushes.
const IN_FLIGHT: usize = 32;

/// A sent resource: name, version sent, and what the client had before (`None`: nothing,
/// `Some(None)`: told it does not exist).
type Sent = (String, String, Option<Option<String>>);

#[derive(Default)]
struct TypeState {
    wildcard: bool,
    explicit: BTreeSet<String>,
    /// What the client has: a version, or `None` once told the name does not exist.
    known: HashMap<String, Option<String>>,
    in_flight: VecDeque<(u64, Vec<Sent>)>,
    /// The resources the last push looked at; while a new snapshot holds the same layers,
    /// there is nothing new for this client.
    pushed: Option<Resources>,
}

impl TypeState {
    /// Applies a request's subscription changes; returns whether anything changed.
    fn subscribe(&mut self, type_url: &str, request: &DeltaDiscoveryRequest, first: bool) -> bool {
        let was_wildcard = self.wildcard;
        let mut changed = false;
        if first && request.resource_names_subscribe.is_empty() && is_legacy_wildcard(type_url) {
            self.wildcard = true;
        }
        for name in &request.resource_names_subscribe {
            if name == "*" {
                self.wildcard = true;
            } else {
                changed |= self.explicit.insert(name.clone());
            }
        }
        for name in &request.resource_names_unsubscribe {
            if name == "*" {
                self.wildcard = false;
            } else {
                changed |= self.explicit.remove(name);
            }
        }
        // The client drops what it unsubscribes from; forget it so a resubscription resends.
        let (wildcard, explicit) = (self.wildcard, &self.explicit);
        self.known
            .retain(|name, _| wildcard || explicit.contains(name));
        changed || was_wildcard != self.wildcard
    }

    /// Handles the ACK or NACK of response `nonce`.
    fn acknowledge(&mut self, ctx: &StreamCtx, type_url: &str, request: &DeltaDiscoveryRequest) {
        let nonce = request.response_nonce.parse::<u64>().ok();
        let sent = nonce.and_then(|nonce| {
            let at = self.in_flight.iter().position(|(n, _)| *n == nonce)?;
            // Responses are acknowledged in order: older unacknowledged ones are settled.
            let mut settled = self.in_flight.drain(..=at);
            settled.next_back().map(|(_, sent)| sent)
        });
        let Some(error) = &request.error_detail else {
            if let Some(sent) = &sent {
                ctx.count_ack();
                let acked: Vec<(&str, &str)> = sent
                    .iter()
                    .map(|(name, version, _)| (name.as_str(), version.as_str()))
                    .collect();
                ctx.acknowledged(type_url, &acked);
            }
            return;
        };
        let sent = sent.unwrap_or_default();
        let rejected: Vec<_> = sent
            .iter()
            .map(|(name, version, _)| (Some(name.as_str()), version.as_str()))
            .collect();
        ctx.nack(type_url, &rejected, &error.message);
        self.pushed = None;
        for (name, version, previous) in sent {
            // Roll back only if no later response has replaced this version meanwhile.
            if self.known.get(&name) == Some(&Some(version)) {
                match previous {
                    Some(previous) => self.known.insert(name, previous),
                    None => self.known.remove(&name),
                };
            }
        }
    }
}

pub(crate) struct Delta {
    ctx: StreamCtx,
    types: HashMap<String, TypeState>,
}

impl Protocol for Delta {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;
    const NAME: &'static str = "delta";

    fn new(ctx: StreamCtx) -> Self {
        Delta {
            ctx,
            types: HashMap::new(),
        }
    }

    fn node(request: &DeltaDiscoveryRequest) -> Option<&Node> {
        request.node.as_ref()
    }

    fn on_request(
        &mut self,
        mut request: DeltaDiscoveryRequest,
        snapshot: &Snapshot,
        out: &mut Vec<DeltaDiscoveryResponse>,
    ) -> Result<(), Status> {
        let type_url = std::mem::take(&mut request.type_url);
        let first = !self.types.contains_key(&type_url);
        check_type_limit(self.types.len(), first)?;
        let state = self.types.entry(type_url.clone()).or_default();
        if first {
            state.known = std::mem::take(&mut request.initial_resource_versions)
                .into_iter()
                .map(|(name, version)| (name, Some(version)))
                .collect();
        } else if !request.response_nonce.is_empty() {
            state.acknowledge(&self.ctx, &type_url, &request);
        }
        if state.subscribe(&type_url, &request, first) || first {
            push(&mut self.ctx, &type_url, state, snapshot, first, out);
        }
        Ok(())
    }

    fn on_snapshot(&mut self, snapshot: &Snapshot, out: &mut Vec<DeltaDiscoveryResponse>) {
        for (type_url, state) in &mut self.types {
            if !snapshot.still_holds(type_url, state.pushed.as_ref()) {
                push(&mut self.ctx, type_url, state, snapshot, false, out);
            }
        }
    }
}

/// Sends what the client lacks and the removals it has not heard of. The first response of a
/// type is sent even when empty: it tells the client its subscription was processed, which
/// Envoy's initialization waits for when a wildcard type has no resources.
fn push(
    ctx: &mut StreamCtx,
    type_url: &str,
    state: &mut TypeState,
    snapshot: &Snapshot,
    first: bool,
    out: &mut Vec<DeltaDiscoveryResponse>,
) {
    let all = snapshot.resources(type_url).cloned().unwrap_or_default();
    let in_scope: Vec<_> = if state.wildcard {
        all.iter().collect()
    } else {
        state.explicit.iter().filter_map(|n| all.get(n)).collect()
    };
    let mut sent = Vec::new();
    let mut resources = Vec::new();
    for r in in_scope {
        let previous = state.known.get(&r.name);
        if matches!(previous, Some(Some(v)) if *v == r.version)
            || ctx.is_rejected(type_url, Some(&r.name), &r.version)
        {
            continue;
        }
        sent.push((r.name.clone(), r.version.clone(), previous.cloned()));
        resources.push(PbResource {
            name: r.name.clone(),
            version: r.version.clone(),
            resource: Some(Any {
                type_url: r.body.type_url.clone(),
                value: r.body.value.clone(),
            }),
            ..Default::default()
        });
    }
    let mut removed: Vec<String> = state
        .known
        .iter()
        .filter(|(name, version)| version.is_some() && !all.contains_key(name))
        .map(|(name, _)| name.clone())
        .collect();
    removed.extend(
        state
            .explicit
            .iter()
            .filter(|name| !all.contains_key(name) && !state.known.contains_key(*name))
            .cloned(),
    );
    state.pushed = Some(all.clone());
    if resources.is_empty() && removed.is_empty() && !first {
        return;
    }
    for (name, version, _) in &sent {
        state.known.insert(name.clone(), Some(version.clone()));
    }
    for name in &removed {
        if state.explicit.contains(name) {
            state.known.insert(name.clone(), None);
        } else {
            state.known.remove(name);
        }
    }
    let nonce = ctx.next_nonce();
    debug!(node = %ctx.node_id, type_url, resources = resources.len(), removed = removed.len(),
        version = snapshot.version(), nonce, "xDS push (delta)");
    ctx.count_response(resources.len());
    if state.in_flight.len() == IN_FLIGHT {
        state.in_flight.pop_front();
    }
    state.in_flight.push_back((nonce, sent));
    removed.sort();
    out.push(DeltaDiscoveryResponse {
        system_version_info: snapshot.version().to_owned(),
        resources,
        type_url: type_url.to_owned(),
        removed_resources: removed,
        nonce: nonce.to_string(),
        ..Default::default()
    });
}
