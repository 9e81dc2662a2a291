//! `hypha demo`: bookinfo on one machine, no root and no setup. The control plane, one app and
//! one sidecar per bookinfo workload, and a client sidecar run as separate processes of the
//! `hypha` binary on loopback; the demo drives traffic through them and prints what the mesh
//! did (routes, canary split, faults, retries, metrics). With `--pods` (root), each workload
//! and client runs in a pod of its own with its traffic captured, and the eBPF bypass on.
//!
//! - [`topology`]: the workloads and the ports every process listens on.
//! - [`config`]: `examples/bookinfo` with WorkloadEntries pointing at the sidecars.
//! - [`app`]: the sample app (`hypha demo-app --role ...`), ratings in gRPC.
//! - [`mesh`]: starting the processes and waiting for them; [`process`]: each child, killed
//!   when dropped; [`pods`]: the pods, their capture and the bypass.
//! - [`hsm`]: with `--keys pkcs11`, a SoftHSM2 token per process for every private key.
//! - [`kubernetes`]: with `--kubernetes`, the cluster (the test API server in-process) the
//!   control plane reads and the sidecars prove their identity to.
//! - [`traffic`]: the load and the [`Summary`].
//! - [`rotation`]: with `--rotate-root`, a tenant's root rotated while page views flow.

#![forbid(unsafe_code)]

pub mod app;
pub mod client;
pub mod config;
pub mod hsm;
pub mod kubernetes;
pub mod mesh;
pub mod metrics;
pub mod pods;
pub mod process;
pub mod rotation;
pub mod topology;
pub mod traffic;

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

pub use crate::mesh::Mesh;
pub use crate::topology::Role;
pub use crate::traffic::Summary;

/// Where progress lines go (the binary prints them; tests may collect them).
pub type Progress = Arc<dyn Fn(&str) + Send + Sync>;

/// Where the mesh's private keys live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Keys {
    /// In each process's memory; the CA's signer keys in 0600 files.
    #[default]
    Software,
    /// Generated inside a SoftHSM2 token per process and never leaving it: the CA's signer
    /// keys and every sidecar's workload key.
    Pkcs11,
    /// Software keys, the sidecars' RSA-2048 with their handshake signatures computed eight
    /// at a time by the multi-buffer engine (Istio's `privateKeyProvider.cryptomb`; BoringSSL
    /// on a CPU without AVX-512 IFMA).
    Cryptomb,
}

impl FromStr for Keys {
    type Err = String;

    fn from_str(s: &str) -> Result<Keys, String> {
        match s {
            "software" => Ok(Keys::Software),
            "pkcs11" => Ok(Keys::Pkcs11),
            "cryptomb" => Ok(Keys::Cryptomb),
            _ => Err(format!(
                "unknown key store {s:?}: expected software, pkcs11 or cryptomb"
            )),
        }
    }
}

/// Where the workloads run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Placement {
    /// Processes on loopback, each app reaching the mesh through its sidecar's HTTP proxy
    /// listener (no root).
    #[default]
    Loopback,
    /// Each workload and client in a pod of its own, its TCP captured by iptables (root).
    Pods,
    /// Pods, and the eBPF bypass attached with every pod registered (root).
    PodsWithBypass,
}

/// How to run the demo.
#[derive(Clone)]
pub struct Options {
    /// The `hypha` binary every process runs (the demo's own, normally).
    pub exe: PathBuf,
    /// Page views of productpage to send (plus a few other requests).
    pub requests: usize,
    pub concurrency: usize,
    /// Keep the mesh running after the traffic, until Ctrl-C.
    pub serve: bool,
    pub keys: Keys,
    pub placement: Placement,
    /// Bookinfo on a Kubernetes cluster (the test API server, in-process) instead of files.
    pub kubernetes: bool,
    /// After the traffic, rotate this tenant's root while page views keep flowing (every
    /// certificate then lives [`rotation::CERTIFICATE_TTL`]).
    pub rotate_root: Option<String>,
    /// Where the config, logs (and tokens) go, kept afterwards for the caller to look at;
    /// `None`: a fresh directory under the system's temp dir, removed on success.
    pub dir: Option<PathBuf>,
    pub progress: Progress,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("no free loopback port: {0}")]
    Ports(std::io::Error),
    #[error("the generated config is invalid:\n{0}")]
    Config(String),
    #[error("cannot start {name} ({exe}): {source}")]
    Spawn {
        name: String,
        exe: PathBuf,
        source: std::io::Error,
    },
    #[error("{name} exited ({status}); the end of {log}:\n{tail}", log = .log.display())]
    Exited {
        name: String,
        status: String,
        log: PathBuf,
        tail: String,
    },
    #[error("{name} not ready after {waited:?}; the end of {log}:\n{tail}", log = .log.display())]
    NotReady {
        name: String,
        waited: Duration,
        log: PathBuf,
        tail: String,
    },
    #[error("productpage did not answer through the mesh within {waited:?} (last: {last}); logs in {logs}", logs = .logs.display())]
    NoTraffic {
        waited: Duration,
        last: String,
        logs: PathBuf,
    },
    #[error("--keys pkcs11 needs SoftHSM2: {0}; run scripts/setup (it installs softhsm2)")]
    NoSoftHsm(String),
    #[error("SoftHSM2 token {label:?}: {reason}")]
    Token { label: String, reason: String },
    #[error("cannot watch for signals: {0}")]
    Signal(std::io::Error),
    #[error("interrupted")]
    Interrupted,
    #[error(
        "--pods needs root (network namespaces, iptables, eBPF): run it as root, or without --pods"
    )]
    NotRoot,
    #[error(transparent)]
    Pod(#[from] hypha_pod::PodError),
    #[error("kubernetes: {0}")]
    Kubernetes(String),
}

/// Resolves on Ctrl-C or SIGTERM.
async fn interrupted() -> Result<(), DemoError> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(DemoError::Signal)?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}

/// Runs the demo: start the mesh, drive traffic, print the summary (and with `serve`, keep
/// running until Ctrl-C). Every process is stopped when this returns, error or not. The temp
/// directory (config and logs) is removed on success and kept on failure; one the caller
/// chose (`opts.dir`) is always kept.
pub async fn run(opts: Options) -> Result<Summary, DemoError> {
    let say = opts.progress.clone();
    // Before anything starts: a missing SoftHSM2 or root is the user's to fix, not a failed
    // demo.
    if opts.keys == Keys::Pkcs11 {
        hsm::check_installed()?;
    }
    if opts.placement != Placement::Loopback && !hypha_pod::is_root() {
        return Err(DemoError::NotRoot);
    }
    let dir = opts.dir.clone().unwrap_or_else(|| {
        let dir = std::env::temp_dir().join(format!("hypha-demo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    });
    say(&format!(
        "hypha demo: bookinfo as {} processes {}; config and logs in {}",
        topology::WORKLOADS.len() * 2 + 3, // the apps and their sidecars, control, two clients
        if opts.placement == Placement::Loopback {
            "on loopback"
        } else {
            "in pods, the control plane on the node"
        },
        dir.display()
    ));
    let work = async {
        let mut mesh = Mesh::start(
            &opts.exe,
            dir.clone(),
            opts.keys,
            opts.placement,
            opts.kubernetes,
            opts.rotate_root.as_ref().map(|_| rotation::CERTIFICATE_TTL),
            &say,
        )
        .await?;
        let mut summary = traffic::drive(&mesh, opts.requests, opts.concurrency).await;
        if let Some(tenant) = &opts.rotate_root {
            say(&format!(
                "rotation: certificates live {} in this mode (renewed every half of it)",
                rotation::CERTIFICATE_TTL
            ));
            summary.rotation =
                Some(rotation::run(&mesh, &opts.exe, tenant, opts.concurrency, &say).await?);
        }
        if let Some(pods) = &mesh.pods {
            summary.pods = Some(pods.report(&Mesh::productpage_url("/productpage")).await);
        }
        mesh.check_alive()?;
        Ok::<_, DemoError>((mesh, summary))
    };
    let result = tokio::select! {
        biased;
        r = interrupted() => r.and(Err(DemoError::Interrupted)),
        r = work => r,
    };
    let (mut mesh, summary) = match result {
        Ok(done) => done,
        Err(e) => {
            say(&format!("logs kept in {}", dir.join("logs").display()));
            return Err(e);
        }
    };
    say("");
    say(summary.to_string().trim_end());
    if opts.serve {
        say("");
        say(&serve_help(&mesh));
        let stop = interrupted();
        tokio::pin!(stop);
        tokio::select! {
            r = &mut stop => r?,
            e = watch(&mut mesh) => {
                // Ctrl-C in a terminal reaches the children too (one process group): one of
                // them exiting just before the demo sees the signal is no failure.
                match tokio::time::timeout(Duration::from_millis(500), &mut stop).await {
                    Ok(r) => r?,
                    Err(_) => return Err(e),
                }
            }
        }
        say("stopping");
    }
    drop(mesh);
    if opts.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(summary)
}

/// Resolves with an error when a process of the mesh exits.
async fn watch(mesh: &mut Mesh) -> DemoError {
    loop {
        if let Err(e) = mesh.check_alive() {
            return e;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// What to try while the mesh runs.
fn serve_help(mesh: &Mesh) -> String {
    let client = mesh.plan.reach(topology::CLIENT, mesh.plan.client_proxy);
    let guest = mesh.plan.reach(topology::GUEST, mesh.plan.guest_proxy);
    let admin = mesh.plan.reach(topology::CLIENT, mesh.plan.client_admin);
    // In pods, the proxies listen on their pod's loopback: curl runs in the pod.
    let inside = |r: &client::Reach| match &r.netns {
        Some(ns) => format!("ip netns exec {ns} "),
        None => String::new(),
    };
    let (proxy, on_client, on_guest) = (client.addr, inside(&client), inside(&guest));
    let page = Mesh::productpage_url("/productpage");
    let mut out = format!(
        "The mesh keeps running until Ctrl-C. Try (the {} sidecar is the HTTP proxy):\n",
        topology::CLIENT
    );
    if let Some(pods) = &mesh.pods {
        out.push_str("  # in the client pod, unmodified: the capture takes it to the sidecar\n");
        for headers in [" -H 'end-user: jason'", ""] {
            out.push_str(&format!("  {}\n", pods.curl_in_client(&page, headers)));
        }
    }
    for line in [
        format!("{on_client}curl -x http://{proxy} {page} -H 'end-user: jason'"),
        format!("{on_client}curl -x http://{proxy} {page}"),
        format!(
            "{on_client}curl -x http://{proxy} {}",
            Mesh::productpage_url("/healthz")
        ),
        format!(
            "{on_client}curl -i -x http://{proxy} {}",
            Mesh::productpage_url("/index.html")
        ),
        admin.curl("/metrics"),
        admin.curl("/certs"),
        format!(
            "{on_client}curl -i -x http://{proxy} http://{}:{}/ratings/0   # 403: only reviews may call ratings",
            topology::host("ratings"),
            topology::SERVICE_PORT
        ),
        format!(
            "{on_guest}curl -i -x http://{} {page}   # 503 UF: another tenant, no shared root",
            guest.addr
        ),
    ] {
        out.push_str(&format!("  {line}\n"));
    }
    out.push_str("Sidecar admin endpoints (/ready /metrics /clusters /config_dump /certs):\n");
    for (name, admin) in mesh.admins() {
        out.push_str(&format!("  {name:<15} http://{admin}\n"));
    }
    out.push_str(&format!(
        "Edit the config live in {} (e.g. the canary weights in routing.yaml): the control\n\
         plane pushes each valid change to the sidecars. Logs: {}",
        mesh.config_dir().display(),
        mesh.log_dir().display()
    ));
    out
}
