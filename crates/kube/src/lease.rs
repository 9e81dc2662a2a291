//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go's leaderelection does it:
//! a replica takes the Lease when it is free or its holder has not renewed it within
//! `leaseDurationSeconds`, renews it while it leads, and stops its work the moment a renewal
//! fails (another replica may take over once the lease time has passed). Every write names the
//! Lease's `resourceVersion`, so two replicas never both believe they took it. Work done as
//! leader must still tolerate a brief overlap (a paused leader waking after losing the Lease):
//! the signers write their answers over the request as read, so none is answered twice.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};
use kube::Client;

/// Which Lease, held by whom, for how long.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica (its pod's name).
    pub identity: String,
    /// How long a holder that stopped renewing keeps the Lease (client-go's default: 15 s).
    pub duration: Duration,
    /// How often the holder renews it, and others try to take it (a third of `duration`).
    pub retry: Duration,
}

impl LeaseConfig {
    pub fn new(namespace: &str, name: &str, identity: &str, duration: Duration) -> LeaseConfig {
        LeaseConfig {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            duration,
            retry: duration / 3,
        }
    }
}

/// Whether a Lease, as read at `now`, may be taken by `me`.
pub fn takeable(lease: &Lease, me: &str, now: Timestamp) -> bool {
    let Some(spec) = &lease.spec else {
        return true;
    };
    match spec.holder_identity.as_deref() {
        None | Some("") => return true,
        Some(holder) if holder == me => return true,
        Some(_) => {}
    }
    let renewed = spec.renew_time.as_ref().or(spec.acquire_time.as_ref());
    let seconds = spec.lease_duration_seconds.unwrap_or(15);
    match renewed {
        Some(MicroTime(at)) => {
            now.duration_since(*at) > SignedDuration::from_secs(i64::from(seconds))
        }
        None => true,
    }
}

/// Takes or renews the Lease once; whether this replica holds it now.
pub async fn try_hold(api: &Api<Lease>, cfg: &LeaseConfig) -> bool {
    let now = Timestamp::now();
    let seconds = i32::try_from(cfg.duration.as_secs().max(1)).unwrap_or(i32::MAX);
    let current = match api.get_opt(&cfg.name).await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(lease = %cfg.name, error = %e, "reading the lease");
            return false;
        }
    };
    let Some(mut lease) = current else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(cfg.name.clone()),
                namespace: Some(cfg.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(cfg.identity.clone()),
                lease_duration_seconds: Some(seconds),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        return api.create(&PostParams::default(), &lease).await.is_ok();
    };
    if !takeable(&lease, &cfg.identity, now) {
        return false;
    }
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    if spec.holder_identity.as_deref() != Some(cfg.identity.as_str()) {
        spec.holder_identity = Some(cfg.identity.clone());
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.renew_time = Some(MicroTime(now));
    spec.lease_duration_seconds = Some(seconds);
    // The Lease as read: a concurrent taker's write makes this one conflict.
    api.replace(&cfg.name, &PostParams::default(), &lease)
        .await
        .is_ok()
}

/// Runs `work` whenever this replica leads: waits to take the Lease, runs `work` while renewing
/// it, and drops `work` as soon as a renewal fails, then waits again. Runs until dropped.
pub async fn while_leader<F, Fut>(client: Client, cfg: LeaseConfig, work: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = ()>,
{
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    loop {
        if !try_hold(&api, &cfg).await {
            tokio::time::sleep(cfg.retry).await;
            continue;
        }
        tracing::info!(lease = %cfg.name, identity = %cfg.identity, "leading");
        let renew = async {
            loop {
                tokio::time::sleep(cfg.retry).await;
                if !try_hold(&api, &cfg).await {
                    return;
                }
            }
        };
        tokio::select! {
            () = work() => {}
            () = renew => tracing::warn!(lease = %cfg.name, identity = %cfg.identity, "lost the lease; stopped leading"),
        }
    }
}
