//! Envoy xDS v3 plumbing over the Aggregated Discovery Service (ADS).
//!
//! The control plane computes one immutable [`Snapshot`] per connected proxy and hands it over
//! through a [`SnapshotSource`]; [`AdsServer`] does all protocol work on top of it: state of the
//! world (SotW) and delta streams, versions, nonces, ACK/NACK, and never resending content a
//! node has rejected. [`DeltaClient`] is the other end, for the sidecar proxy and load tests;
//! [`SotwClient`] is a small state-of-the-world client for tests and tools.
//!
//! Protos come from `envoy-types`, the transport is tonic.

mod client;
mod delta;
mod node;
mod resource;
mod server;
mod sotw;

pub use client::{ClientError, DeltaClient, SotwClient, Update, Versions};
pub use node::ProxyInfo;
pub use resource::{Resource, ResourceMap, Resources, Snapshot};
pub use server::{AdsServer, AdsStats, SnapshotSource};

/// Type URLs of the resource types Hypha serves.
pub mod type_url {
    /// Listener Discovery Service (LDS).
    pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
    /// Route Discovery Service (RDS).
    pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
    /// Cluster Discovery Service (CDS).
    pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    /// Endpoint Discovery Service (EDS).
    pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
    /// Secret Discovery Service (SDS).
    pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

    /// Whether an empty subscription on the first request of this type means "everything"
    /// (the xDS "legacy wildcard" rule, which applies to LDS and CDS only).
    pub(crate) fn is_legacy_wildcard(type_url: &str) -> bool {
        type_url == LISTENER || type_url == CLUSTER
    }
}
