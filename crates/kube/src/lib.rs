//! The Kubernetes source: the control plane reading a cluster as istiod does. Services,
//! EndpointSlices, Pods, Nodes, Namespaces and the Istio CRDs are watched (`kube-runtime`) and
//! become the same config model the file source produces (ServiceEntry and WorkloadEntry
//! resources, Istio objects parsed and validated by `hypha-config`), merged with the files and
//! pushed through [`hypha_control::ControlPlane`]. Translation never sees a `kube` type.
//!
//! - `node`: the node agent's pod watch, registering injected pods with the eBPF bypass
//! - `objects`: slim copies of the objects read (only the fields discovery needs)
//! - `cluster`: the cluster's state and the registry model it becomes
//! - `crds`: the Istio CRDs Hypha reads, their schemas derived from its config types
//! - `csr`: the Kubernetes CSR signer (approved CSRs to `hypha.dev/<tenant>` signed by its signer)
//! - `issuer`: the cert-manager external issuer (`Issuer`/`ClusterIssuer` of group `hypha.dev`)
//! - `lease`: leader election on a Lease (the signers run on one replica at a time)
//! - `install`: `hypha install` / `uninstall`, the manifests of `manifests/base`
//! - `istio`: the Istio kinds watched, and the config assembled with invalid objects left out
//! - `report`: Events and `status.validationMessages` on invalid objects
//! - `review`: the CA's check of service-account tokens (TokenReview)
//! - `roots`: each namespace's trust bundle in a ConfigMap `istio-ca-root-cert`, as istiod does
//! - `rotation`: root rotation across replicas (shared state, reports, the leader moves it on)
//! - `signers`: the CA's file signers shared by every replica through Secrets
//! - `watch`: the watchers, the debounce, the push
//! - `webhook`: the sidecar injection webhook (TLS from the mesh CA, its `caBundle` kept)

#![forbid(unsafe_code)]

pub mod cluster;
pub mod crds;
pub mod csr;
pub mod install;
pub mod issuer;
pub mod istio;
pub mod lease;
pub mod node;
pub mod objects;
mod report;
mod review;
pub mod roots;
pub mod rotation;
pub mod signers;
mod watch;
pub mod webhook;

use std::path::Path;

pub use report::COMPONENT;
pub use review::{TokenReviewer, AUDIENCES};
pub use signers::share_signers;
pub use watch::{run, snapshot, DEBOUNCE_AFTER, DEBOUNCE_MAX};

/// `hypha check --kubernetes`: the cluster's Istio config (and `files`) validated as the
/// control plane would serve it; every diagnostic, those of objects it would leave out too.
pub async fn check(
    client: kube::Client,
    files: &hypha_config::Config,
) -> hypha_config::Diagnostics {
    let cluster = snapshot(client).await;
    let assembled = istio::assemble(files, &cluster);
    let mut diags = assembled.diagnostics;
    // The objects left out, with what left them out.
    for d in assembled.invalid.into_values().flatten() {
        diags.push(d);
    }
    diags
}

/// The control plane's service account, ClusterRole and binding (`manifests/base/rbac.yaml`):
/// every permission `hypha control --kubernetes` needs, in one place.
pub const RBAC: &str = include_str!("../../../manifests/base/rbac.yaml");

/// Hypha's namespace (`hypha-system`, where the control plane runs) and the mesh's root
/// namespace (`istio-system`), which [`RBAC`] refers to.
pub const NAMESPACES: &str = include_str!("../../../manifests/base/namespaces.yaml");

/// The namespace the control plane runs in, as `hypha install` puts it.
pub const CONTROL_NAMESPACE: &str = "hypha-system";

/// The Istio CRDs Hypha reads (`manifests/base/istio-crds.yaml`, [`crds::istio`] written out),
/// with the schemas of what Hypha accepts.
pub const ISTIO_CRDS: &str = include_str!("../../../manifests/base/istio-crds.yaml");

/// What diagnostics about objects read from the API server name as their file.
pub const ORIGIN: &str = "kubernetes";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the kubeconfig {0}: {1}")]
    Kubeconfig(String, kube::config::KubeconfigError),
    #[error("no cluster to talk to (neither KUBECONFIG nor in-cluster config): {0}")]
    Infer(#[from] kube::config::InferConfigError),
    #[error("cannot make a Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// A client for the cluster `kubeconfig` names, else the one `KUBECONFIG` (or
/// `~/.kube/config`) names, else the pod's own (in-cluster config).
pub async fn connect(kubeconfig: Option<&Path>) -> Result<kube::Client, Error> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| Error::Kubeconfig(path.display().to_string(), e))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| Error::Kubeconfig(path.display().to_string(), e))?
        }
        None => kube::Config::infer().await?,
    };
    Ok(kube::Client::try_from(config)?)
}
