//! Sidecar injection, as Istio's injector does it, for the webhook `hypha control` serves and
//! for `hypha inject -f` (offline, like `istioctl kube-inject`): one code path for both.
//!
//! A pod in, the same pod out with
//! - `istio-init`: an init container running `hypha capture` (Istio's iptables/ip6tables
//!   rules, the pod's `traffic.sidecar.istio.io/*` annotations), the only one with
//!   `NET_ADMIN`/`NET_RAW`;
//! - `istio-proxy`: `hypha proxy` as a native sidecar (an init container with
//!   `restartPolicy: Always` whose startup probe holds the app until it is ready, and which
//!   stops after the app, so Jobs complete) or, for clusters before 1.29, a classic container;
//!   its identity from a projected service-account token (audience `istio-ca`), its roots from
//!   the namespace's `istio-ca-root-cert` ConfigMap, its labels from a downward API file, its
//!   `ProxyConfig` from `proxy.istio.io/config` over the mesh's defaults;
//! - the app's HTTP, TCP and gRPC probes sent to the sidecar's health port
//!   (`/app-health/<container>/livez|readyz|startupz`), which forwards them, so STRICT mutual
//!   TLS does not fail the kubelet's probes;
//!
//! and the RFC 6902 JSON Patch between the two, which is what an admission webhook answers.
//! The names (containers, volumes, `sidecar.istio.io/status`) are Istio's, so the tools and
//! habits of Istio users (`kubectl logs -c istio-proxy`) carry over.

#![forbid(unsafe_code)]

pub mod manifest;
mod pod;
pub mod podinfo;
pub mod probes;
mod select;
pub mod wait;
pub mod webhooks;

pub use pod::{capture_annotations, inject, workload_name, Injected, Outcome, Skip, Target};
pub use select::{pod_choice, revision_of, selected};

use hypha_config::proxy::ProxyConfig;

/// The capture init container's name (Istio's).
pub const INIT_CONTAINER: &str = "istio-init";
/// The sidecar's container name (Istio's).
pub const PROXY_CONTAINER: &str = "istio-proxy";
/// The annotation an injected pod carries: what was added, and by which revision.
pub const STATUS_ANNOTATION: &str = "sidecar.istio.io/status";
/// The sidecar's health port: `/healthz/ready` and the app probes it forwards.
pub const HEALTH_PORT: u16 = 15021;
/// The group id the sidecar runs as, whose traffic the capture leaves alone.
pub const PROXY_GID: u32 = 1337;
/// Where the injected sidecar finds its projected service-account token.
pub const TOKEN_PATH: &str = "/var/run/secrets/tokens/istio-token";
/// Where it finds the namespace's roots (the `istio-ca-root-cert` ConfigMap).
pub const ROOT_CERT_PATH: &str = "/var/run/secrets/istio/root-cert.pem";
/// Where it finds the pod's labels (a downward API file).
pub const LABELS_PATH: &str = "/etc/istio/pod/labels";
/// The sidecar's environment variable holding the rewritten probes (Istio's name).
pub const APP_PROBERS_ENV: &str = "ISTIO_KUBE_APP_PROBERS";

/// How the sidecar is added to a pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SidecarKind {
    /// An init container with `restartPolicy: Always` (Kubernetes 1.29 and later): started and
    /// ready before the app, stopped after it.
    Native,
    /// A container beside the app, for older clusters. A Job's pod never completes while it
    /// runs, as with Istio's classic sidecar.
    Classic,
}

/// What every injected pod gets: the injector's settings (flags of `hypha inject` and
/// `hypha control`, the mesh's `defaultConfig`).
#[derive(Debug, Clone)]
pub struct Settings {
    /// The image that runs `hypha` (its entrypoint), for both injected containers.
    pub image: String,
    pub image_pull_policy: Option<String>,
    /// The control plane's xDS and CA address for sidecars (TLS).
    pub control_plane: String,
    /// The mesh's root namespace, in the control plane's SPIFFE identity.
    pub root_namespace: String,
    pub trust_domain: String,
    pub sidecar: SidecarKind,
    /// The mesh's `defaultConfig`, under each pod's `proxy.istio.io/config`.
    pub defaults: ProxyConfig,
    /// The revision this injector is (`default` unless installed with `--revision`).
    pub revision: String,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            image: format!("hypha:{}", env!("CARGO_PKG_VERSION")),
            image_pull_policy: None,
            control_plane: "https://hypha.hypha-system.svc:15012".into(),
            root_namespace: "istio-system".into(),
            trust_domain: "cluster.local".into(),
            sidecar: SidecarKind::Native,
            defaults: ProxyConfig::default(),
            revision: "default".into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("not a pod: {0}")]
    NotAPod(String),
    #[error("annotation {annotation}: {message}")]
    Annotation { annotation: String, message: String },
    #[error("{0}")]
    Manifest(String),
}
