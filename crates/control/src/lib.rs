//! Hypha's control plane (istiod's job): a registry of services built from the config,
//! translation of the config into Envoy xDS resources per proxy, and the server that watches a
//! config directory and pushes every change to connected proxies over ADS.

#![forbid(unsafe_code)]

pub mod authz;
mod envoy;
pub mod mtls;
pub mod registry;
pub mod rotation;
mod routes;
pub mod security;
pub mod server;
pub mod translate;

pub use hypha_xds::ProxyInfo;
pub use server::{
    initial_config, log_diagnostics, run, run_with_health, serve_ready, ControlPlane, ExtraSource,
    ExtraTask, Generation, RunError, Security, TlsService, EMBEDDED_CONFIG,
};
pub use translate::Translation;
