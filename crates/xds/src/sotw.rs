//! State-of-the-world xDS: per type URL, the client's subscription and the version last sent.
//! Every response carries all subscribed resources that exist; its `version_info` is a hash
//! over the (name, version) pairs it carries, so "did the content change" is a string compare
//! and a client reconnecting with the same `version_info` is not sent the same content again.

use std::collections::{BTreeSet, HashMap};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::protobuf::Any;
use tonic::Status;
use tracing::debug;

use crate::resource::{Fnv, Resources, Snapshot};
use crate::server::{check_type_limit, Protocol, StreamCtx};
use crate::type_url::is_legacy_wildcard;

/// Which resources of a type the client wants.
#[derive(Debug, PartialEq, Eq)]
enum Subscription {
    Wildcard,
    Names(BTreeSet<String>),
}

impl Subscription {
    /// `current` is `None` on the stream's first request of the type: an empty list then means
    /// wildcard for LDS and CDS, and keeps meaning it while the list stays empty.
    fn from_request(type_url: &str, names: &[String], current: Option<&Subscription>) -> Self {
        let was_wildcard = current.is_none_or(|s| *s == Subscription::Wildcard);
        if names.iter().any(|n| n == "*")
            || (names.is_empty() && was_wildcard && is_legacy_wildcard(type_url))
        {
            Subscription::Wildcard
        } else {
            Subscription::Names(names.iter().cloned().collect())
        }
    }
}

struct TypeState {
    subscription: Subscription,
    /// Version of the content last sent, or the client's `version_info` before that.
    version: String,
    /// Nonce of the latest response; requests carrying another one are stale.
    nonce: String,
    /// The resources the last push looked at (see the delta state machine).
    pushed: Option<Resources>,
    /// What the latest response held (name, version), reported when it is acknowledged.
    sent: Vec<(String, String)>,
}

pub(crate) struct Sotw {
    ctx: StreamCtx,
    types: HashMap<String, TypeState>,
}

impl Protocol for Sotw {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;
    const NAME: &'static str = "sotw";

    fn new(ctx: StreamCtx) -> Self {
        Sotw {
            ctx,
            types: HashMap::new(),
        }
    }

    fn node(request: &DiscoveryRequest) -> Option<&Node> {
        request.node.as_ref()
    }

    fn on_request(
        &mut self,
        request: DiscoveryRequest,
        snapshot: &Snapshot,
        out: &mut Vec<DiscoveryResponse>,
    ) -> Result<(), Status> {
        let type_url = request.type_url;
        check_type_limit(self.types.len(), !self.types.contains_key(&type_url))?;
        let Some(state) = self.types.get_mut(&type_url) else {
            let state = TypeState {
                subscription: Subscription::from_request(&type_url, &request.resource_names, None),
                version: request.version_info,
                nonce: String::new(),
                pushed: None,
                sent: Vec::new(),
            };
            let state = self.types.entry(type_url.clone()).or_insert(state);
            push(&mut self.ctx, &type_url, state, snapshot, out);
            return Ok(());
        };
        if !request.response_nonce.is_empty() {
            if request.response_nonce != state.nonce {
                debug!(node = %self.ctx.node_id, type_url, nonce = request.response_nonce, "stale xDS request");
            } else if let Some(error) = &request.error_detail {
                self.ctx
                    .nack(&type_url, &[(None, &state.version)], &error.message);
            } else {
                self.ctx.count_ack();
                let acked: Vec<(&str, &str)> = state
                    .sent
                    .iter()
                    .map(|(name, version)| (name.as_str(), version.as_str()))
                    .collect();
                self.ctx.acknowledged(&type_url, &acked);
            }
        }
        // Subscription changes count even in stale requests: the client's latest word on
        // what it wants is that request.
        let subscription = Subscription::from_request(
            &type_url,
            &request.resource_names,
            Some(&state.subscription),
        );
        if subscription != state.subscription {
            state.subscription = subscription;
            push(&mut self.ctx, &type_url, state, snapshot, out);
        }
        Ok(())
    }

    fn on_snapshot(&mut self, snapshot: &Snapshot, out: &mut Vec<DiscoveryResponse>) {
        for (type_url, state) in &mut self.types {
            if !snapshot.still_holds(type_url, state.pushed.as_ref()) {
                push(&mut self.ctx, type_url, state, snapshot, out);
            }
        }
    }
}

/// Sends the subscribed content of one type unless the client has it or rejected it.
fn push(
    ctx: &mut StreamCtx,
    type_url: &str,
    state: &mut TypeState,
    snapshot: &Snapshot,
    out: &mut Vec<DiscoveryResponse>,
) {
    let all = snapshot.resources(type_url);
    state.pushed = all.cloned();
    let resources: Vec<_> = match (&state.subscription, all) {
        (_, None) => Vec::new(),
        (Subscription::Wildcard, Some(all)) => all.iter().collect(),
        (Subscription::Names(names), Some(all)) => {
            names.iter().filter_map(|name| all.get(name)).collect()
        }
    };
    let mut hash = Fnv::new();
    for r in &resources {
        hash.write(r.name.as_bytes());
        hash.write(&[0]);
        hash.write(r.version.as_bytes());
        hash.write(&[0]);
    }
    let version = hash.hex();
    if version == state.version {
        return;
    }
    if ctx.is_rejected(type_url, None, &version) {
        debug!(node = %ctx.node_id, type_url, version, "not resending rejected content");
        return;
    }
    let nonce = ctx.next_nonce().to_string();
    debug!(node = %ctx.node_id, type_url, resources = resources.len(), version, nonce, "xDS push (sotw)");
    state.sent = resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect();
    ctx.count_response(resources.len());
    out.push(DiscoveryResponse {
        version_info: version.clone(),
        resources: resources
            .iter()
            .map(|r| Any {
                type_url: r.body.type_url.clone(),
                value: r.body.value.clone(),
            })
            .collect(),
        type_url: type_url.to_owned(),
        nonce: nonce.clone(),
        ..Default::default()
    });
    state.version = version;
    state.nonce = nonce;
}
