//! ADS clients. [`DeltaClient`] is what the sidecar proxy (and load tests) use to consume a
//! control plane; [`SotwClient`] is a small state-of-the-world client for tests and tools.
//!
//! Both are driven by the caller as an async loop; neither reconnects by itself. After a
//! stream fails, the caller backs off and reconnects, passing
//! [`DeltaClient::accepted_versions`] to [`DeltaClient::connect_with_versions`] so the server
//! only sends what changed meanwhile.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Status, Streaming};

use crate::resource::Resource;
use crate::type_url::{CLUSTER, LISTENER};

/// Requests queued before the client waits for the transport.
const REQUEST_QUEUE: usize = 16;
/// `google.rpc.Code.INVALID_ARGUMENT`, the code of a NACK's `error_detail`.
const INVALID_ARGUMENT: i32 = 3;

/// Errors of the ADS clients.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The endpoint URI is invalid or the connection failed.
    #[error("cannot connect to xDS server {uri}: {source}")]
    Connect {
        uri: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// The server ended the stream with an error status.
    #[error("xDS stream failed: {0}")]
    Stream(Box<Status>),
    /// The request side of the stream is gone (the stream ended).
    #[error("xDS stream closed")]
    Closed,
}

impl From<Status> for ClientError {
    fn from(status: Status) -> Self {
        ClientError::Stream(Box::new(status))
    }
}

/// One delta response, as handed to the caller to apply.
#[derive(Debug, Clone)]
pub struct Update {
    pub type_url: String,
    /// The server's `system_version_info` (for logs).
    pub system_version: String,
    /// Nonce to acknowledge; [`DeltaClient::ack_or_nack`] uses it.
    pub nonce: String,
    /// Added or changed resources.
    pub resources: Vec<Resource>,
    /// Names that no longer exist (or never did).
    pub removed: Vec<String>,
}

/// Versions the client has, per type URL: name → version.
pub type Versions = HashMap<String, HashMap<String, String>>;

/// A delta ADS client subscribed wildcard to clusters and listeners, and to whichever routes
/// and endpoints the caller asks for.
///
/// ```no_run
/// # async fn run(node: envoy_types::pb::envoy::config::core::v3::Node) -> Result<(), hypha_xds::ClientError> {
/// use hypha_xds::{type_url, DeltaClient, Update};
/// fn apply(update: &Update) -> Result<(), String> { Ok(()) }
///
/// let mut client = DeltaClient::connect("http://127.0.0.1:15010", node).await?;
/// client.subscribe(type_url::ENDPOINT, ["backend"]).await?;
/// while let Some(update) = client.next().await? {
///     let result = apply(&update);
///     client.ack_or_nack(&update, result).await?;
/// }
/// # Ok(()) }
/// ```
pub struct DeltaClient {
    requests: mpsc::Sender<DeltaDiscoveryRequest>,
    responses: Streaming<DeltaDiscoveryResponse>,
    /// `initial_resource_versions` not yet sent, for types not yet subscribed.
    initial: Versions,
    accepted: Versions,
}

impl DeltaClient {
    /// Connects to `uri` (e.g. `http://[::1]:15010`) as `node` with nothing cached.
    pub async fn connect(uri: impl Into<String>, node: Node) -> Result<Self, ClientError> {
        Self::connect_with_versions(uri, node, Versions::new()).await
    }

    /// Connects, telling the server which resource versions the client already has (from
    /// [`accepted_versions`](Self::accepted_versions) of the previous stream), so that those
    /// are not sent again.
    pub async fn connect_with_versions(
        uri: impl Into<String>,
        node: Node,
        versions: Versions,
    ) -> Result<Self, ClientError> {
        let channel = channel(uri.into()).await?;
        Self::over(channel, node, versions).await
    }

    /// Like [`connect_with_versions`](Self::connect_with_versions), over a channel the caller
    /// made (e.g. mutual TLS).
    pub async fn over(
        channel: Channel,
        node: Node,
        versions: Versions,
    ) -> Result<Self, ClientError> {
        let mut ads = AggregatedDiscoveryServiceClient::new(channel);
        let (requests, rx) = mpsc::channel(REQUEST_QUEUE);
        let mut initial = versions.clone();
        // Queued before the call so the server sees the node as soon as the stream opens.
        for (type_url, node) in [(CLUSTER, Some(node)), (LISTENER, None)] {
            let request = subscribe_request(&mut initial, type_url, vec!["*".to_owned()], node);
            requests
                .send(request)
                .await
                .map_err(|_| ClientError::Closed)?;
        }
        let responses = ads
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(DeltaClient {
            requests,
            responses,
            initial,
            accepted: versions,
        })
    }

    /// Subscribes to named resources of a type (e.g. routes or endpoints).
    pub async fn subscribe<I: Into<String>>(
        &mut self,
        type_url: &str,
        names: impl IntoIterator<Item = I>,
    ) -> Result<(), ClientError> {
        let names = names.into_iter().map(Into::into).collect();
        let request = subscribe_request(&mut self.initial, type_url, names, None);
        self.send(request).await
    }

    /// Unsubscribes from named resources; the caller drops them from its own state.
    pub async fn unsubscribe<I: Into<String>>(
        &mut self,
        type_url: &str,
        names: impl IntoIterator<Item = I>,
    ) -> Result<(), ClientError> {
        let names: Vec<String> = names.into_iter().map(Into::into).collect();
        if let Some(accepted) = self.accepted.get_mut(type_url) {
            for name in &names {
                accepted.remove(name);
            }
        }
        self.send(DeltaDiscoveryRequest {
            type_url: type_url.to_owned(),
            resource_names_unsubscribe: names,
            ..Default::default()
        })
        .await
    }

    /// The next update from the server; `None` when the server ended the stream cleanly.
    pub async fn next(&mut self) -> Result<Option<Update>, ClientError> {
        let Some(response) = self.responses.message().await? else {
            return Ok(None);
        };
        Ok(Some(Update {
            type_url: response.type_url,
            system_version: response.system_version_info,
            nonce: response.nonce,
            resources: response
                .resources
                .into_iter()
                .map(|r| {
                    let body = r.resource.unwrap_or_default();
                    Resource {
                        name: r.name,
                        version: r.version,
                        body: prost_types::Any {
                            type_url: body.type_url,
                            value: body.value,
                        },
                    }
                })
                .collect(),
            removed: response.removed_resources,
        }))
    }

    /// ACKs `update` if the caller applied it, or NACKs it with the caller's reason, which
    /// the server logs. Only ACKed updates change [`accepted_versions`](Self::accepted_versions).
    pub async fn ack_or_nack(
        &mut self,
        update: &Update,
        result: Result<(), String>,
    ) -> Result<(), ClientError> {
        let error_detail = match result {
            Ok(()) => {
                let accepted = self.accepted.entry(update.type_url.clone()).or_default();
                for r in &update.resources {
                    accepted.insert(r.name.clone(), r.version.clone());
                }
                for name in &update.removed {
                    accepted.remove(name);
                }
                None
            }
            Err(message) => Some(RpcStatus {
                code: INVALID_ARGUMENT,
                message,
                details: Vec::new(),
            }),
        };
        self.send(DeltaDiscoveryRequest {
            type_url: update.type_url.clone(),
            response_nonce: update.nonce.clone(),
            error_detail,
            ..Default::default()
        })
        .await
    }

    /// Versions of the resources the client has ACKed (or started with), per type URL.
    pub fn accepted_versions(&self) -> &Versions {
        &self.accepted
    }

    async fn send(&self, request: DeltaDiscoveryRequest) -> Result<(), ClientError> {
        self.requests
            .send(request)
            .await
            .map_err(|_| ClientError::Closed)
    }
}

/// A delta subscription request, carrying the versions the client has of that type the first
/// time the type is subscribed.
fn subscribe_request(
    initial: &mut Versions,
    type_url: &str,
    names: Vec<String>,
    node: Option<Node>,
) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node,
        type_url: type_url.to_owned(),
        resource_names_subscribe: names,
        initial_resource_versions: initial.remove(type_url).unwrap_or_default(),
        ..Default::default()
    }
}

/// A state-of-the-world ADS client that keeps the protocol's bookkeeping (node on the first
/// request, subscribed names and accepted version repeated in every ACK/NACK) and leaves the
/// rest to the caller.
pub struct SotwClient {
    requests: mpsc::Sender<DiscoveryRequest>,
    responses: Streaming<DiscoveryResponse>,
    node: Option<Node>,
    names: HashMap<String, Vec<String>>,
    accepted: HashMap<String, String>,
}

impl SotwClient {
    /// Opens a stream to `uri`; `node` is sent with the first [`subscribe`](Self::subscribe).
    pub async fn connect(uri: impl Into<String>, node: Node) -> Result<Self, ClientError> {
        let mut ads = ads_client(uri.into()).await?;
        let (tx, rx) = mpsc::channel(REQUEST_QUEUE);
        let responses = ads
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(SotwClient {
            requests: tx,
            responses,
            node: Some(node),
            names: HashMap::new(),
            accepted: HashMap::new(),
        })
    }

    /// Sets the subscription of a type (empty for wildcard LDS/CDS).
    pub async fn subscribe(
        &mut self,
        type_url: &str,
        names: Vec<String>,
    ) -> Result<(), ClientError> {
        self.names.insert(type_url.to_owned(), names);
        self.request(type_url, String::new(), None).await
    }

    /// The next response; `None` when the server ended the stream cleanly.
    pub async fn next(&mut self) -> Result<Option<DiscoveryResponse>, ClientError> {
        Ok(self.responses.message().await?)
    }

    /// Accepts `response`.
    pub async fn ack(&mut self, response: &DiscoveryResponse) -> Result<(), ClientError> {
        self.accepted
            .insert(response.type_url.clone(), response.version_info.clone());
        self.request(&response.type_url, response.nonce.clone(), None)
            .await
    }

    /// Rejects `response` with `message`.
    pub async fn nack(
        &mut self,
        response: &DiscoveryResponse,
        message: impl Into<String>,
    ) -> Result<(), ClientError> {
        let error = RpcStatus {
            code: INVALID_ARGUMENT,
            message: message.into(),
            details: Vec::new(),
        };
        self.request(&response.type_url, response.nonce.clone(), Some(error))
            .await
    }

    /// Sends a raw request, exactly as given.
    pub async fn send(&mut self, request: DiscoveryRequest) -> Result<(), ClientError> {
        self.requests
            .send(request)
            .await
            .map_err(|_| ClientError::Closed)
    }

    async fn request(
        &mut self,
        type_url: &str,
        response_nonce: String,
        error_detail: Option<RpcStatus>,
    ) -> Result<(), ClientError> {
        let request = DiscoveryRequest {
            version_info: self.accepted.get(type_url).cloned().unwrap_or_default(),
            node: self.node.take(),
            resource_names: self.names.get(type_url).cloned().unwrap_or_default(),
            type_url: type_url.to_owned(),
            response_nonce,
            error_detail,
            ..Default::default()
        };
        self.send(request).await
    }
}

async fn channel(uri: String) -> Result<Channel, ClientError> {
    async { Endpoint::from_shared(uri.clone())?.connect().await }
        .await
        .map_err(|source| ClientError::Connect { uri, source })
}

async fn ads_client(uri: String) -> Result<AggregatedDiscoveryServiceClient<Channel>, ClientError> {
    Ok(AggregatedDiscoveryServiceClient::new(channel(uri).await?))
}
