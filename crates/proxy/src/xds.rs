//! The proxy's xDS client: one delta ADS stream to the control plane, wildcard for clusters
//! and listeners, and named subscriptions for the route tables and endpoint sets the config
//! refers to. Each update is compiled and applied as a whole (or NACKed with every reason);
//! the data path sees the result through one atomic pointer swap. When the control plane goes
//! away the proxy keeps serving its last good config and reconnects with backoff, telling the
//! server what it already has.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hypha_xds::{type_url, ClientError, DeltaClient, ProxyInfo, Versions};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::model::Config;
use crate::state::{nack_message, State};

const BACKOFF_START: Duration = Duration::from_millis(100);
/// The trust bundle secret's name (Istio's).
const SDS_ROOTS: &str = "ROOTCA";
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Counters of the xDS client, for metrics and tests.
#[derive(Debug, Default)]
pub struct XdsStats {
    pub updates_applied: std::sync::atomic::AtomicU64,
    pub updates_rejected: std::sync::atomic::AtomicU64,
    pub connects: std::sync::atomic::AtomicU64,
}

/// What the client shares with the rest of the proxy.
pub struct Shared {
    /// Replaced after every applied update.
    pub config: Arc<ArcSwap<Config>>,
    /// Turns true once clusters, listeners and everything they refer to have arrived.
    pub ready: watch::Sender<bool>,
    /// Changes after every applied update (open inbound connections are judged again).
    pub updated: watch::Sender<()>,
    pub stats: Arc<XdsStats>,
    /// (type URL, name, version) of every accepted resource, for `/config_dump`.
    pub versions: Arc<ArcSwap<Vec<(String, String, String)>>>,
}

/// Why a stream could not be opened or ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Xds(#[from] ClientError),
    #[error(transparent)]
    Tls(#[from] hypha_identity::IdentityError),
}

/// Runs the client until the task is dropped. With `mesh`, over mutual TLS with the proxy's
/// current certificate (each reconnection uses the latest).
pub async fn run(
    control_plane: String,
    proxy: ProxyInfo,
    mesh: Option<crate::identity::Mesh>,
    shared: Shared,
) {
    let mut state = State::new(mesh.is_some());
    let mut versions = Versions::new();
    let mut backoff = BACKOFF_START;
    loop {
        shared
            .stats
            .connects
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let session = session(
            &control_plane,
            mesh.as_ref(),
            &proxy,
            &mut state,
            &mut versions,
            &shared,
        );
        match session.await {
            Ok(()) => {
                info!(
                    control_plane,
                    "control plane ended the xDS stream; reconnecting"
                );
                backoff = BACKOFF_START;
            }
            Err((e, got_updates)) => {
                if got_updates {
                    backoff = BACKOFF_START;
                }
                warn!(control_plane, error = %e, retry_in_ms = backoff.as_millis() as u64,
                    "xDS stream failed; serving the last good config");
            }
        }
        tokio::time::sleep(jitter(backoff)).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// One stream: until it ends or fails. The error carries whether any update arrived.
async fn session(
    control_plane: &str,
    mesh: Option<&crate::identity::Mesh>,
    proxy: &ProxyInfo,
    state: &mut State,
    versions: &mut Versions,
    shared: &Shared,
) -> Result<(), (SessionError, bool)> {
    let Shared {
        config,
        ready,
        updated,
        stats,
        versions: dump,
    } = shared;
    let connected = match mesh {
        Some(mesh) => {
            let channel = mesh
                .control_plane(control_plane)
                .await
                .map_err(|e| (e.into(), false))?;
            DeltaClient::over(channel, proxy.to_node(), versions.clone()).await
        }
        None => {
            DeltaClient::connect_with_versions(control_plane, proxy.to_node(), versions.clone())
                .await
        }
    };
    let mut client = connected.map_err(|e| (e.into(), false))?;
    if mesh.is_some() {
        // The trust bundle: the roots this workload trusts (its tenant's and those shared
        // with it), updated without a restart.
        client
            .subscribe(type_url::SECRET, vec![SDS_ROOTS.to_owned()])
            .await
            .map_err(|e| (e.into(), false))?;
    }
    // What the current state refers to, subscribed again on the new stream.
    let applied = state.assemble();
    let mut routes = BTreeSet::new();
    let mut endpoints = BTreeSet::new();
    let mut got = false;
    follow(&mut client, &mut routes, &mut endpoints, &applied)
        .await
        .map_err(|e| (e.into(), got))?;
    loop {
        let update = match client.next().await {
            Ok(Some(u)) => u,
            Ok(None) => return Ok(()),
            Err(e) => return Err((e.into(), got)),
        };
        got = true;
        if update.type_url == type_url::SECRET {
            let result = match mesh {
                Some(m) => m.trust(&update.resources),
                None => Err("this proxy has no workload identity for secrets".into()),
            };
            if let Err(reason) = &result {
                warn!(%reason, "trust bundle rejected (NACK); keeping the last good one");
            }
            client
                .ack_or_nack(&update, result)
                .await
                .map_err(|e| (e.into(), got))?;
            continue;
        }
        // Compiling an update (a thousand regex routes take a few hundred milliseconds, and
        // allocate far more than they keep) runs on the blocking pool, not on the runtime
        // threads that serve requests.
        let mut next = state.clone();
        let compile = tokio::task::spawn_blocking(move || {
            let outcome = next
                .apply(&update.type_url, &update.resources, &update.removed)
                .map(|()| next.assemble())
                .map_err(|refused| nack_message(&refused));
            (next, update, outcome)
        });
        let (next, update, outcome) = match compile.await {
            Ok(done) => done,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // The runtime is shutting down.
            Err(_) => return Ok(()),
        };
        let result = match outcome {
            Ok(applied) => {
                *state = next;
                config.store(applied.config.clone());
                updated.send_replace(());
                stats
                    .updates_applied
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                info!(type_url = %update.type_url, version = %update.system_version,
                    resources = update.resources.len(), removed = update.removed.len(),
                    "xDS update applied");
                follow(&mut client, &mut routes, &mut endpoints, &applied)
                    .await
                    .map_err(|e| (e.into(), got))?;
                let complete = applied.config.complete;
                if complete && !*ready.borrow() {
                    info!("xDS config complete; proxy ready");
                    ready.send_replace(true);
                }
                Ok(())
            }
            Err(reason) => {
                stats
                    .updates_rejected
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                warn!(type_url = %update.type_url, version = %update.system_version, %reason,
                    "xDS update rejected (NACK); keeping the last good config");
                Err(reason)
            }
        };
        client
            .ack_or_nack(&update, result)
            .await
            .map_err(|e| (e.into(), got))?;
        *versions = client.accepted_versions().clone();
        let mut list: Vec<(String, String, String)> = versions
            .iter()
            .flat_map(|(t, names)| {
                names
                    .iter()
                    .map(move |(n, v)| (t.clone(), n.clone(), v.clone()))
            })
            .collect();
        list.sort();
        dump.store(Arc::new(list));
    }
}

/// Keeps the RDS and EDS subscriptions in line with what the applied config refers to.
async fn follow(
    client: &mut DeltaClient,
    routes: &mut BTreeSet<String>,
    endpoints: &mut BTreeSet<String>,
    applied: &crate::state::Applied,
) -> Result<(), ClientError> {
    resubscribe(client, routes, &applied.wanted_routes, type_url::ROUTE).await?;
    resubscribe(
        client,
        endpoints,
        &applied.wanted_endpoints,
        type_url::ENDPOINT,
    )
    .await
}

/// Brings the named subscription of one type in line with what the config refers to.
async fn resubscribe(
    client: &mut DeltaClient,
    current: &mut BTreeSet<String>,
    wanted: &BTreeSet<String>,
    type_url: &str,
) -> Result<(), ClientError> {
    let add: Vec<String> = wanted.difference(current).cloned().collect();
    let remove: Vec<String> = current.difference(wanted).cloned().collect();
    if !add.is_empty() {
        client.subscribe(type_url, add).await?;
    }
    if !remove.is_empty() {
        client.unsubscribe(type_url, remove).await?;
    }
    current.clone_from(wanted);
    Ok(())
}

/// ±25 % so that many proxies do not reconnect in lockstep.
fn jitter(d: Duration) -> Duration {
    let r = crate::rand::below(500) as u32; // 0..500 → 0.75..1.25
    d * (750 + r) / 1000
}
