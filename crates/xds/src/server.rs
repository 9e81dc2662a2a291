//! The ADS gRPC service: accepts SotW and delta streams, asks the [`SnapshotSource`] for the
//! connecting proxy's snapshots, and runs one task per stream that feeds requests and snapshot
//! changes into the protocol state machines in `sotw.rs` and `delta.rs`.
//!
//! Shared here: statistics, the per-node memory of rejected content (which outlives streams,
//! so a reconnecting proxy is never handed what it already NACKed), and the stream loop.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

use crate::delta::Delta;
use crate::resource::Snapshot;
use crate::sotw::Sotw;

/// Responses queued per stream before the stream task waits for the client to read.
const RESPONSE_QUEUE: usize = 16;
/// Rejected contents remembered per node; the oldest are forgotten first.
const REJECTIONS_PER_NODE: usize = 1024;
/// Nodes with remembered rejections; bounds memory when node ids churn.
const REJECTION_NODES: usize = 16 * 1024;
/// Type URLs one stream may subscribe to; bounds per-stream state against a client that
/// invents type URLs. Real clients use five or six.
const TYPES_PER_STREAM: usize = 64;

/// Refuses a stream's first request of a new type once it already tracks the maximum.
pub(crate) fn check_type_limit(tracked: usize, is_new: bool) -> Result<(), Status> {
    if is_new && tracked >= TYPES_PER_STREAM {
        return Err(Status::resource_exhausted(format!(
            "more than {TYPES_PER_STREAM} type URLs on one xDS stream"
        )));
    }
    Ok(())
}

/// What the control plane provides to the xDS server.
pub trait SnapshotSource: Send + Sync + 'static {
    /// Given the `Node` of the first request on a stream, a receiver of that proxy's
    /// snapshots. An error status ends the stream with that status. `connection` holds what
    /// the transport knows of the caller (e.g. its verified TLS identity), to authorize the
    /// node against.
    fn watch(
        &self,
        node: &Node,
        connection: &tonic::Extensions,
    ) -> Result<watch::Receiver<Arc<Snapshot>>, Status>;

    /// Whose memory of rejected content a stream's NACKs go to (and which it is spared):
    /// by default the node id. A source that authenticates callers makes it their verified
    /// identity too, so a caller can only ever mute content for itself, never for another
    /// workload whose node id it claims.
    fn rejection_key(&self, node: &Node, _connection: &tonic::Extensions) -> String {
        node.id.clone()
    }

    /// The proxy `node` (its id) acknowledged these resources (name, version) of `type_url`:
    /// for a source that waits until a push is in force everywhere. Ignored by default.
    fn acknowledged(&self, _node: &str, _type_url: &str, _resources: &[(&str, &str)]) {}
}

/// Where a stream reports what its proxy acknowledged (see [`SnapshotSource::acknowledged`]).
pub(crate) type AckSink = Arc<dyn Fn(&str, &[(&str, &str)]) + Send + Sync>;

/// Counters of the xDS server, for metrics and tests.
#[derive(Debug, Default)]
pub struct AdsStats {
    streams_active: AtomicU64,
    responses_sent: AtomicU64,
    resources_sent: AtomicU64,
    acks: AtomicU64,
    nacks: AtomicU64,
}

impl AdsStats {
    /// Streams currently open (SotW and delta).
    pub fn streams_active(&self) -> u64 {
        self.streams_active.load(Ordering::Relaxed)
    }
    /// Discovery responses sent.
    pub fn responses_sent(&self) -> u64 {
        self.responses_sent.load(Ordering::Relaxed)
    }
    /// Resources sent, summed over responses.
    pub fn resources_sent(&self) -> u64 {
        self.resources_sent.load(Ordering::Relaxed)
    }
    /// Requests that acknowledged the latest response of their type.
    pub fn acks(&self) -> u64 {
        self.acks.load(Ordering::Relaxed)
    }
    /// Requests that rejected a response.
    pub fn nacks(&self) -> u64 {
        self.nacks.load(Ordering::Relaxed)
    }
}

/// Decrements `streams_active` however the stream task ends.
struct ActiveStream(Arc<AdsStats>);

impl Drop for ActiveStream {
    fn drop(&mut self) {
        self.0.streams_active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Identifies rejected content: SotW rejects a whole response (`name` is `None`, `version`
/// is the response's `version_info`), delta rejects single resources.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Rejected {
    type_url: String,
    name: Option<String>,
    version: String,
}

#[derive(Default)]
struct NodeRejections {
    order: VecDeque<Rejected>,
    set: HashSet<Rejected>,
}

/// Per rejection key (see [`SnapshotSource::rejection_key`]), the content rejected.
#[derive(Default)]
pub(crate) struct Rejections(Mutex<HashMap<String, NodeRejections>>);

impl Rejections {
    fn record(&self, node: &str, key: Rejected) {
        let mut nodes = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !nodes.contains_key(node) && nodes.len() >= REJECTION_NODES {
            // Any victim will do: a forgotten rejection costs one resend, not correctness.
            if let Some(victim) = nodes.keys().next().cloned() {
                nodes.remove(&victim);
            }
        }
        let entry = nodes.entry(node.to_owned()).or_default();
        if entry.set.insert(key.clone()) {
            entry.order.push_back(key);
            if entry.order.len() > REJECTIONS_PER_NODE {
                if let Some(old) = entry.order.pop_front() {
                    entry.set.remove(&old);
                }
            }
        }
    }

    fn contains(&self, node: &str, type_url: &str, name: Option<&str>, version: &str) -> bool {
        let nodes = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // Nodes without rejections are the common case: answer without allocating.
        nodes.get(node).is_some_and(|n| {
            n.set.contains(&Rejected {
                type_url: type_url.to_owned(),
                name: name.map(str::to_owned),
                version: version.to_owned(),
            })
        })
    }
}

/// What a protocol state machine needs from its stream: identity, counters, nonces and the
/// shared rejection memory.
pub(crate) struct StreamCtx {
    pub(crate) node_id: String,
    /// Where this stream's rejections are remembered.
    rejection_key: String,
    stats: Arc<AdsStats>,
    rejections: Arc<Rejections>,
    nonce: u64,
    acks: AckSink,
}

impl StreamCtx {
    /// Reports resources the proxy acknowledged to the source.
    pub(crate) fn acknowledged(&self, type_url: &str, resources: &[(&str, &str)]) {
        (self.acks)(type_url, resources);
    }

    /// Nonces count up per stream; delta relies on their order.
    pub(crate) fn next_nonce(&mut self) -> u64 {
        self.nonce += 1;
        self.nonce
    }

    pub(crate) fn count_response(&self, resources: usize) {
        self.stats.responses_sent.fetch_add(1, Ordering::Relaxed);
        self.stats
            .resources_sent
            .fetch_add(resources as u64, Ordering::Relaxed);
    }

    pub(crate) fn count_ack(&self) {
        self.stats.acks.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts and logs a NACK; `rejected` lists (name, version) pairs, with no name for a SotW
    /// response, and each is remembered so it is never sent to this node again.
    pub(crate) fn nack(&self, type_url: &str, rejected: &[(Option<&str>, &str)], message: &str) {
        self.stats.nacks.fetch_add(1, Ordering::Relaxed);
        let versions: Vec<String> = rejected
            .iter()
            .map(|(name, version)| match name {
                Some(name) => format!("{name}@{version}"),
                None => (*version).to_owned(),
            })
            .collect();
        warn!(node = %self.node_id, type_url, rejected = ?versions, error = message, "xDS NACK");
        for (name, version) in rejected {
            self.rejections.record(
                &self.rejection_key,
                Rejected {
                    type_url: type_url.to_owned(),
                    name: name.map(str::to_owned),
                    version: (*version).to_owned(),
                },
            );
        }
    }

    pub(crate) fn is_rejected(&self, type_url: &str, name: Option<&str>, version: &str) -> bool {
        self.rejections
            .contains(&self.rejection_key, type_url, name, version)
    }
}

/// One xDS protocol variant (SotW or delta) as a synchronous state machine: it turns requests
/// and snapshot changes into responses and never awaits, so it holds no lock across an await.
pub(crate) trait Protocol: Send + 'static {
    type Request: Send + 'static;
    type Response: Send + 'static;
    const NAME: &'static str;

    fn new(ctx: StreamCtx) -> Self;
    fn node(request: &Self::Request) -> Option<&Node>;
    /// An error ends the stream with that status.
    fn on_request(
        &mut self,
        request: Self::Request,
        snapshot: &Snapshot,
        out: &mut Vec<Self::Response>,
    ) -> Result<(), Status>;
    fn on_snapshot(&mut self, snapshot: &Snapshot, out: &mut Vec<Self::Response>);
}

/// The ADS gRPC service over a [`SnapshotSource`].
pub struct AdsServer<S: SnapshotSource> {
    source: Arc<S>,
    stats: Arc<AdsStats>,
    rejections: Arc<Rejections>,
}

impl<S: SnapshotSource> AdsServer<S> {
    /// A server that asks `source` for each connecting proxy's snapshots.
    pub fn new(source: Arc<S>) -> Self {
        AdsServer {
            source,
            stats: Arc::default(),
            rejections: Arc::default(),
        }
    }

    /// The server's counters.
    pub fn stats(&self) -> Arc<AdsStats> {
        self.stats.clone()
    }

    /// The tonic service, ready for `tonic::transport::Server::add_service`.
    pub fn into_service(self) -> AggregatedDiscoveryServiceServer<Self> {
        AggregatedDiscoveryServiceServer::new(self)
    }

    /// Spawns the task serving one stream and returns its response stream at once, so the
    /// client gets response headers before it has sent anything.
    fn spawn<P: Protocol>(
        &self,
        request: Request<Streaming<P::Request>>,
    ) -> ReceiverStream<Result<P::Response, Status>> {
        let (tx, rx) = mpsc::channel(RESPONSE_QUEUE);
        let (_, connection, inbound) = request.into_parts();
        tokio::spawn(run_stream::<P, S>(
            self.source.clone(),
            self.stats.clone(),
            self.rejections.clone(),
            (inbound, connection),
            tx,
        ));
        ReceiverStream::new(rx)
    }
}

#[tonic::async_trait]
impl<S: SnapshotSource> AggregatedDiscoveryService for AdsServer<S> {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        Ok(Response::new(self.spawn::<Sotw>(request)))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Ok(Response::new(self.spawn::<Delta>(request)))
    }
}

/// Serves one stream until the client goes away or the snapshot source closes.
async fn run_stream<P: Protocol, S: SnapshotSource>(
    source: Arc<S>,
    stats: Arc<AdsStats>,
    rejections: Arc<Rejections>,
    (mut inbound, connection): (Streaming<P::Request>, tonic::Extensions),
    tx: mpsc::Sender<Result<P::Response, Status>>,
) {
    let first = match inbound.message().await {
        Ok(Some(first)) => first,
        Ok(None) | Err(_) => return,
    };
    let Some(node) = P::node(&first) else {
        let status =
            Status::invalid_argument("the first request on an xDS stream must carry a node");
        let _ = tx.send(Err(status)).await;
        return;
    };
    let mut snapshots = match source.watch(node, &connection) {
        Ok(rx) => rx,
        Err(status) => {
            let _ = tx.send(Err(status)).await;
            return;
        }
    };
    let node_id = node.id.clone();
    let rejection_key = source.rejection_key(node, &connection);
    stats.streams_active.fetch_add(1, Ordering::Relaxed);
    let _active = ActiveStream(stats.clone());
    info!(node = %node_id, protocol = P::NAME, "xDS stream opened");

    let mut snapshot = snapshots.borrow_and_update().clone();
    let acks: AckSink = {
        let (source, node) = (source.clone(), node_id.clone());
        Arc::new(move |type_url, resources| source.acknowledged(&node, type_url, resources))
    };
    let mut proto = P::new(StreamCtx {
        node_id: node_id.clone(),
        rejection_key,
        stats,
        rejections,
        nonce: 0,
        acks,
    });
    let mut out = Vec::new();
    let mut handled = proto.on_request(first, &snapshot, &mut out);
    let reason = loop {
        if let Some(reason) = flush(&tx, &mut out, std::mem::replace(&mut handled, Ok(()))).await {
            break reason;
        }
        tokio::select! {
            request = inbound.message() => match request {
                Ok(Some(request)) => handled = proto.on_request(request, &snapshot, &mut out),
                Ok(None) => break "client closed the stream".to_owned(),
                Err(status) => break format!("stream error: {}", status.message()),
            },
            changed = snapshots.changed() => match changed {
                // Only the latest snapshot matters: intermediate ones were never queued.
                Ok(()) => {
                    snapshot = snapshots.borrow_and_update().clone();
                    proto.on_snapshot(&snapshot, &mut out);
                }
                Err(_) => handled = Err(Status::unavailable("snapshot source closed")),
            },
            () = tx.closed() => break "client went away".to_owned(),
        }
    };
    info!(node = %node_id, protocol = P::NAME, reason, "xDS stream closed");
}

/// Sends queued responses, then the status that ends the stream if handling failed; returns
/// why the stream ends, if it does.
async fn flush<R>(
    tx: &mpsc::Sender<Result<R, Status>>,
    out: &mut Vec<R>,
    handled: Result<(), Status>,
) -> Option<String> {
    for response in out.drain(..) {
        if tx.send(Ok(response)).await.is_err() {
            return Some("client went away".to_owned());
        }
    }
    let Err(status) = handled else {
        return None;
    };
    let reason = format!("ended by server: {}", status.message());
    let _ = tx.send(Err(status)).await;
    Some(reason)
}
