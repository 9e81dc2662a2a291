//! The simulated proxies: delta-ADS clients that each play one workload and report when they
//! are synced and when a new route arrives.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hypha_control::ProxyInfo;
use hypha_xds::{type_url, DeltaClient};
use tokio::sync::{mpsc, Semaphore};

use crate::mesh::{endpoint_v4, endpoint_v6, namespace, workload_name, workload_version};
use crate::{Params, ROUTE_NAME};

pub(crate) enum Event {
    /// Has its initial clusters, listeners and route `8080`, which took `bytes` of resources
    /// (the largest response `largest` bytes).
    Ready {
        bytes: usize,
        largest: usize,
    },
    /// Received a new version of route `8080`, in the control plane's generation `generation`.
    Route {
        sub: usize,
        at: Instant,
        generation: Option<u64>,
    },
    /// Received a new version of the watched endpoints (`Watch::endpoints`).
    Endpoints {
        sub: usize,
        at: Instant,
    },
    Failed {
        sub: usize,
        error: String,
    },
}

/// What a proxy subscribes to besides clusters, listeners and route `8080`.
#[derive(Clone, Default)]
pub(crate) struct Watch {
    /// A ClusterLoadAssignment whose changes are reported.
    pub(crate) endpoints: Option<String>,
}

/// Proxy `sub` plays workload `svc-i-e`, so that proxies spread over namespaces like the
/// services and each gets inbound resources of its own.
pub(crate) fn proxy(sub: usize, p: &Params) -> (ProxyInfo, Watch) {
    let i = sub % p.services;
    let e = (sub / p.services) % p.endpoints;
    let g = i * p.endpoints + e;
    let ns = namespace(i);
    let v4 = endpoint_v4(g);
    let info = ProxyInfo {
        id: format!("sidecar~{v4}~svc-{i}-{e}-p{sub}.{ns}~{ns}.svc.cluster.local"),
        namespace: ns,
        service_account: format!("svc-{i}"),
        workload_name: workload_name(i, e),
        labels: [
            ("app".to_string(), format!("svc-{i}")),
            ("version".to_string(), workload_version(e).to_string()),
        ]
        .into(),
        ips: vec![v4.into(), endpoint_v6(g).into()],
    };
    (info, Watch::default())
}

pub(crate) async fn subscriber(
    sub: usize,
    uri: String,
    (info, watch): (ProxyInfo, Watch),
    gate: Arc<Semaphore>,
    connect_timeout: Duration,
    events: mpsc::UnboundedSender<Event>,
) {
    if let Err(e) = run_subscriber(sub, uri, (info, watch), gate, connect_timeout, &events).await {
        let _ = events.send(Event::Failed {
            sub,
            error: format!("{e:#}"),
        });
    }
}

pub(crate) async fn run_subscriber(
    sub: usize,
    uri: String,
    (info, watch): (ProxyInfo, Watch),
    gate: Arc<Semaphore>,
    connect_timeout: Duration,
    events: &mpsc::UnboundedSender<Event>,
) -> Result<()> {
    // Held until the initial resources are in: bounds how many proxies sync at once.
    let mut permit = Some(gate.acquire_owned().await?);
    let mut client =
        tokio::time::timeout(connect_timeout, DeltaClient::connect(uri, info.to_node()))
            .await
            .context("connect timed out")??;
    client.subscribe(type_url::ROUTE, [ROUTE_NAME]).await?;
    if let Some(eds) = &watch.endpoints {
        client.subscribe(type_url::ENDPOINT, [eds.as_str()]).await?;
    }
    let mut endpoints: Option<String> = None;
    let (mut clusters, mut listeners) = (false, false);
    let mut route: Option<String> = None;
    let (mut bytes, mut largest) = (0, 0);
    loop {
        let Some(update) = client.next().await? else {
            bail!("the control plane ended the stream");
        };
        let at = Instant::now();
        client.ack_or_nack(&update, Ok(())).await?;
        if permit.is_some() {
            let size: usize = update.resources.iter().map(|r| r.body.value.len()).sum();
            bytes += size;
            largest = largest.max(size);
        }
        match update.type_url.as_str() {
            type_url::CLUSTER => clusters = true,
            type_url::LISTENER => listeners = true,
            type_url::ROUTE => {
                if let Some(r) = update.resources.iter().find(|r| r.name == ROUTE_NAME) {
                    if route.as_deref() != Some(r.version.as_str()) {
                        route = Some(r.version.clone());
                        let _ = events.send(Event::Route {
                            sub,
                            at,
                            generation: update.system_version.parse().ok(),
                        });
                    }
                }
            }
            type_url::ENDPOINT => {
                let watched = watch.endpoints.as_deref();
                if let Some(r) = update
                    .resources
                    .iter()
                    .find(|r| Some(r.name.as_str()) == watched)
                {
                    if endpoints.as_deref() != Some(r.version.as_str()) {
                        endpoints = Some(r.version.clone());
                        let _ = events.send(Event::Endpoints { sub, at });
                    }
                }
            }
            _ => {}
        }
        if permit.is_some() && clusters && listeners && route.is_some() {
            permit = None;
            let _ = events.send(Event::Ready { bytes, largest });
        }
    }
}
