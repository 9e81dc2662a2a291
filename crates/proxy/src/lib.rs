//! The Hypha sidecar proxy (`hypha proxy`): consumes the control plane's xDS over delta ADS,
//! compiles each update into one immutable runtime config, and carries the workload's traffic.
//!
//! - [`xds`]: the ADS client; [`compile`] turns Envoy resources into the runtime [`model`],
//!   refusing (NACKing) what Hypha does not support with the resource and field named;
//!   [`state`] holds what was accepted and assembles the config the data path reads through
//!   one atomic pointer swap (`arc-swap`), never a lock.
//! - [`outbound`]: the app's requests to the mesh (HTTP proxy mode, or a local port per service
//!   port); [`router`] picks the route and cluster; [`upstream`] sends to an endpoint.
//! - [`inbound`]: peers' requests to the local app.

#![forbid(unsafe_code)]

pub mod admin;
pub mod authz;
pub mod capture;
pub mod compile;
mod http;
pub mod identity;
pub mod inbound;
pub mod limits;
pub mod model;
pub mod origination;
pub mod outbound;
mod pool;
pub mod probe;
mod rand;
pub mod request;
pub mod router;
pub mod state;
pub mod telemetry;
pub mod upstream;
pub mod xds;

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use hypha_xds::ProxyInfo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

pub use crate::http::{Drain, DrainTrigger, Flag};

/// How to start a proxy: who it is, where the control plane is, and what to listen on. Any
/// listen port may be 0 (the OS picks one; see [`Running`]).
#[derive(Debug, Clone)]
pub struct Options {
    pub node: ProxyInfo,
    /// e.g. `http://127.0.0.1:15010`.
    pub control_plane: String,
    /// HTTP proxy listeners for the app (`HTTP_PROXY`).
    pub http_proxy: Vec<SocketAddr>,
    /// A local listener per service port: (listen address, `host:port`).
    pub services: Vec<(SocketAddr, String)>,
    /// Inbound listeners (typically the same port on IPv4 and IPv6 loopback or the pod IPs).
    pub inbound: Vec<SocketAddr>,
    /// The workload port the mesh sends inbound traffic to, which picks the inbound chain;
    /// defaults to the first inbound listener's port.
    pub inbound_port: Option<u16>,
    /// Where the app listens. With captured inbound traffic, the port is each connection's
    /// original destination port (and the address 127.0.0.1 unless this says otherwise).
    pub app: Option<SocketAddr>,
    /// Transparent capture (`hypha_pod::Capture` rules in the pod): the port of the listener
    /// the app's outbound TCP is redirected to (Istio's 15001), on every address.
    pub capture_outbound: Option<u16>,
    /// The port inbound TCP is redirected to (Istio's 15006), on every address.
    pub capture_inbound: Option<u16>,
    /// The admin listener (`/ready`, `/metrics`, `/config_dump`, `/clusters`).
    pub admin: Option<SocketAddr>,
    /// Health listeners serving `/healthz/ready` only (Istio's 15021, on the pod's addresses,
    /// for the kubelet's readiness probe; the admin stays on loopback).
    pub health: Vec<SocketAddr>,
    /// The app's probes the health listeners forward (`/app-health/<container>/livez`, ...).
    pub app_probes: probe::AppProbes,
    /// JSON access log, one line per request: a file to append to, or `-` for stdout.
    pub access_log: Option<std::path::PathBuf>,
    /// The workload identity from the control plane's CA; with it, `control_plane` is the
    /// TLS endpoint (`https://...:15012`) and xDS runs over mutual TLS.
    pub identity: Option<identity::IdentityOptions>,
    /// Timeouts and connection caps for every listener but the admin's.
    pub limits: limits::Limits,
}

/// A started proxy: the addresses it actually listens on, readiness, and counters. Dropping it
/// stops every task.
pub struct Running {
    pub http_proxy: Vec<SocketAddr>,
    pub services: Vec<SocketAddr>,
    pub inbound: Vec<SocketAddr>,
    /// The capture listeners (outbound, then inbound), IPv4 and IPv6.
    pub captured: Vec<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub health: Vec<SocketAddr>,
    /// True once the first complete config is applied.
    pub ready: watch::Receiver<bool>,
    pub xds: Arc<xds::XdsStats>,
    pub config: Arc<ArcSwap<model::Config>>,
    pub telemetry: Arc<telemetry::Telemetry>,
    /// The workload's current certificate, when it has a mesh identity.
    pub identity: Option<hypha_identity::Store>,
    pub tasks: JoinSet<()>,
    drain: http::DrainTrigger,
    /// The admin listener drains last, separately.
    _admin_drain: http::DrainTrigger,
}

impl Running {
    /// Graceful shutdown: stop accepting, let requests in flight finish and connections
    /// close, for at most `deadline`. Returns how many connections were still open.
    pub async fn drain(&self, deadline: std::time::Duration) -> usize {
        self.drain.drain(deadline).await
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error("a service listener needs `host:port`, got {0:?}")]
    ServiceAuthority(String),
    #[error("inbound listeners need the app's address (--app)")]
    NoApp,
    #[error("cannot watch for SIGTERM: {0}")]
    Signal(std::io::Error),
    #[error("cannot open the access log {0}: {1}")]
    AccessLog(std::path::PathBuf, std::io::Error),
    #[error(transparent)]
    Identity(#[from] identity::IdentityStartError),
}

async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), StartError> {
    let l = TcpListener::bind(addr)
        .await
        .map_err(|e| StartError::Bind(addr, e))?;
    let local = l.local_addr().map_err(|e| StartError::Bind(addr, e))?;
    Ok((l, local))
}

/// Binds every listener, starts the xDS client, and serves until the result is dropped.
pub async fn start(opts: Options) -> Result<Running, StartError> {
    let mut tasks = JoinSet::new();
    let mesh = match &opts.identity {
        Some(id) => {
            let (mesh, rotation) = identity::bootstrap(
                &opts.control_plane,
                &opts.node.namespace,
                &opts.node.service_account,
                id,
            )
            .await?;
            tasks.spawn(rotation);
            Some(mesh)
        }
        None => None,
    };
    let config = Arc::new(ArcSwap::from_pointee(model::Config::default()));
    let upstreams = upstream::Upstreams {
        identity: mesh.as_ref().map(|m| m.store.clone()),
        tcp_idle_timeout: opts.limits.tcp_idle_timeout,
    };
    let (ready_tx, ready) = watch::channel(false);
    let (updated_tx, updates) = watch::channel(());
    let own_ports = Arc::new(std::sync::OnceLock::new());
    let stats = Arc::new(xds::XdsStats::default());
    let (drain_trigger, drain) = http::DrainTrigger::with_limits(opts.limits);
    let (admin_trigger, admin_drain) = http::DrainTrigger::new();
    let label = |k: &str| {
        opts.node
            .labels
            .get(k)
            .cloned()
            .unwrap_or_else(|| "unknown".into())
    };
    let access_log = match &opts.access_log {
        None => None,
        Some(p) if p.as_os_str() == "-" => Some(telemetry::AccessLog::start(std::io::stdout())),
        Some(p) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| StartError::AccessLog(p.clone(), e))?;
            Some(telemetry::AccessLog::start(std::io::BufWriter::new(file)))
        }
    };
    let telemetry = Arc::new(telemetry::Telemetry {
        access_log,
        metrics: telemetry::Metrics::default(),
        me: telemetry::Identity {
            workload: opts.node.workload_name.clone(),
            namespace: opts.node.namespace.clone(),
            app: label("app"),
            version: label("version"),
        },
        token: mesh.as_ref().and_then(|m| m.token.clone()),
        batcher: mesh.as_ref().and_then(|m| m.batcher.clone()),
    });
    let out = outbound::Outbound {
        config: config.clone(),
        upstreams: upstreams.clone(),
        telemetry: telemetry.clone(),
    };
    let mut running = Running {
        http_proxy: Vec::new(),
        services: Vec::new(),
        inbound: Vec::new(),
        captured: Vec::new(),
        admin: None,
        health: Vec::new(),
        ready: ready.clone(),
        xds: stats.clone(),
        config: config.clone(),
        telemetry: telemetry.clone(),
        identity: None,
        tasks: JoinSet::new(),
        drain: drain_trigger,
        _admin_drain: admin_trigger,
    };
    let versions = Arc::new(ArcSwap::from_pointee(Vec::new()));
    let admin = admin::Admin {
        config: config.clone(),
        telemetry: telemetry.clone(),
        ready,
        versions: versions.clone(),
        draining: drain.clone(),
        identity: mesh.as_ref().map(|m| m.store.clone()),
    };
    let probes = Arc::new(opts.app_probes.clone());
    for addr in &opts.health {
        // `[::]` beside `0.0.0.0` on the same port: IPv6-only, and skipped where the pod has
        // no IPv6.
        let l = if addr.is_ipv6() && addr.ip().is_unspecified() {
            match capture::bind(*addr) {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(%addr, error = %e, "no IPv6 health listener");
                    continue;
                }
            }
        } else {
            bind(*addr).await?.0
        };
        let local = l.local_addr().map_err(|e| StartError::Bind(*addr, e))?;
        running.health.push(local);
        tasks.spawn(admin::serve_health(
            admin.clone(),
            probes.clone(),
            l,
            admin_drain.clone(),
        ));
    }
    if let Some(addr) = opts.admin {
        let (l, local) = bind(addr).await?;
        running.admin = Some(local);
        tasks.spawn(admin::serve(admin, l, admin_drain));
    }
    for addr in &opts.http_proxy {
        let (l, local) = bind(*addr).await?;
        running.http_proxy.push(local);
        tasks.spawn(outbound::serve(
            out.clone(),
            l,
            outbound::Mode::HttpProxy,
            drain.clone(),
        ));
    }
    for (addr, authority) in &opts.services {
        let port = authority
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .ok_or_else(|| StartError::ServiceAuthority(authority.clone()))?;
        let (l, local) = bind(*addr).await?;
        running.services.push(local);
        let mode = outbound::Mode::service(authority, port)
            .ok_or_else(|| StartError::ServiceAuthority(authority.clone()))?;
        tasks.spawn(outbound::serve(out.clone(), l, mode, drain.clone()));
    }
    if let Some(port) = opts.capture_outbound {
        for l in
            capture::bind_all(port).map_err(|e| StartError::Bind(([0, 0, 0, 0], port).into(), e))?
        {
            running.captured.extend(l.local_addr().ok());
            tasks.spawn(outbound::serve_captured(out.clone(), l, drain.clone()));
        }
    }
    if let Some(port) = opts.capture_inbound {
        let app = opts
            .app
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        let inbound = inbound::Inbound {
            config: config.clone(),
            upstreams: upstreams.clone(),
            telemetry: telemetry.clone(),
            port: 0,
            app,
            identity: mesh.as_ref().map(|m| m.store.clone()),
            captured: true,
            updates: updates.clone(),
            own_ports: own_ports.clone(),
        };
        for l in
            capture::bind_all(port).map_err(|e| StartError::Bind(([0, 0, 0, 0], port).into(), e))?
        {
            running.captured.extend(l.local_addr().ok());
            tasks.spawn(inbound::serve(inbound.clone(), l, drain.clone()));
        }
    }
    if !opts.inbound.is_empty() {
        let app = opts.app.ok_or(StartError::NoApp)?;
        let mut port = opts.inbound_port;
        for addr in &opts.inbound {
            let (l, local) = bind(*addr).await?;
            running.inbound.push(local);
            let port = *port.get_or_insert(local.port());
            let inbound = inbound::Inbound {
                config: config.clone(),
                upstreams: upstreams.clone(),
                telemetry: telemetry.clone(),
                port,
                app,
                identity: mesh.as_ref().map(|m| m.store.clone()),
                captured: false,
                updates: updates.clone(),
                own_ports: own_ports.clone(),
            };
            tasks.spawn(inbound::serve(inbound, l, drain.clone()));
        }
    }
    running.identity = mesh.as_ref().map(|m| m.store.clone());
    // Everything the sidecar listens on: captured connections there are closed, not looped.
    let mut own: Vec<u16> = running
        .admin
        .iter()
        .chain(&running.http_proxy)
        .chain(&running.services)
        .chain(&running.inbound)
        .chain(&running.captured)
        .map(SocketAddr::port)
        .collect();
    own.sort_unstable();
    own.dedup();
    let _ = own_ports.set(own.into_boxed_slice());
    tasks.spawn(xds::run(
        opts.control_plane.clone(),
        opts.node.clone(),
        mesh,
        xds::Shared {
            config,
            ready: ready_tx,
            updated: updated_tx,
            stats,
            versions,
        },
    ));
    running.tasks = tasks;
    Ok(running)
}

/// `hypha proxy`: starts, says where it listens, and runs until SIGINT or SIGTERM, then stops
/// accepting, lets requests in flight finish and stays for `drain` (Istio's
/// `terminationDrainDuration`) before it exits.
pub async fn run(opts: Options, drain: std::time::Duration) -> Result<(), StartError> {
    let mut running = start(opts.clone()).await?;
    tracing::info!(
        node = %opts.node.id,
        control_plane = %opts.control_plane,
        http_proxy = ?running.http_proxy,
        services = ?running.services,
        inbound = ?running.inbound,
        captured = ?running.captured,
        admin = ?running.admin,
        app = ?opts.app,
        "proxy started"
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(StartError::Signal)?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        _ = running.tasks.join_next() => {}
    }
    tracing::info!(
        deadline_ms = drain.as_millis(),
        "proxy draining: no new connections, finishing requests in flight"
    );
    let started = std::time::Instant::now();
    let left = running.drain(drain).await;
    // The whole drain time, even once every connection has closed (Istio's default): until
    // every peer has heard from the control plane that this pod is going, the pod must stay
    // to refuse their connections (which they retry elsewhere); gone, it would leave them
    // waiting on an address that answers nothing.
    tokio::time::sleep(drain.saturating_sub(started.elapsed())).await;
    tracing::info!(connections_left = left, "proxy stopped");
    Ok(())
}
