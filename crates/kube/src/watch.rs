//! The watches and the push loop: one `kube-runtime` watcher per kind (initial list, resume
//! from the last resourceVersion, relist after `410 Gone`, bookmarks, backoff on errors) feeds
//! slim objects to one task that owns the [`Cluster`]; changes are debounced as istiod does
//! (100 ms of quiet, at most 10 s) before the config is assembled and pushed. Nothing is
//! pushed before every kind has been listed once.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::time::Duration;

use futures::StreamExt;
use hypha_config::Config;
use hypha_control::ControlPlane;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Client;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::cluster::Cluster;
use crate::istio::{self, IstioKind, ObjectKey};
use crate::objects::{self, Key, Pod, Service, Slice};

/// istiod's `PILOT_DEBOUNCE_AFTER` and `PILOT_DEBOUNCE_MAX`.
pub const DEBOUNCE_AFTER: Duration = Duration::from_millis(100);
pub const DEBOUNCE_MAX: Duration = Duration::from_secs(10);

/// One object as the cluster state keeps it.
#[derive(Debug)]
enum Entry {
    Service(Key, Service),
    Slice(Key, Slice),
    Pod(Key, Pod),
    Node(String, String),
    Namespace(String, BTreeMap<String, String>),
    Istio(ObjectKey, Value),
}

/// Which watch an update comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Watched {
    Services,
    Slices,
    Pods,
    Nodes,
    Namespaces,
    Istio(&'static str),
}

#[derive(Debug)]
enum Update {
    Apply(Entry),
    Delete(Entry),
    /// A complete list: what it does not hold is gone.
    Replace(Watched, Vec<Entry>),
}

impl Cluster {
    /// Applies an update; whether anything Hypha reads changed.
    fn apply(&mut self, u: Update) -> bool {
        match u {
            Update::Apply(e) => self.put(e),
            Update::Delete(e) => self.remove(&e),
            Update::Replace(w, entries) => {
                let mut fresh = Cluster::default();
                for e in entries {
                    fresh.put(e);
                }
                match w {
                    Watched::Services => swap(&mut self.services, fresh.services),
                    Watched::Slices => swap(&mut self.slices, fresh.slices),
                    Watched::Pods => swap(&mut self.pods, fresh.pods),
                    Watched::Nodes => swap(&mut self.nodes, fresh.nodes),
                    Watched::Namespaces => swap(&mut self.namespaces, fresh.namespaces),
                    Watched::Istio(kind) => {
                        // Both in key order: compared as they are, nothing copied.
                        let changed = !self
                            .istio
                            .iter()
                            .filter(|(k, _)| k.0 == kind)
                            .eq(fresh.istio.iter());
                        self.istio.retain(|k, _| k.0 != kind);
                        self.istio.extend(fresh.istio);
                        changed
                    }
                }
            }
        }
    }

    fn put(&mut self, e: Entry) -> bool {
        match e {
            Entry::Service(k, v) => insert(&mut self.services, k, v),
            Entry::Slice(k, v) => insert(&mut self.slices, k, v),
            Entry::Pod(k, v) => insert(&mut self.pods, k, v),
            Entry::Node(k, v) => insert(&mut self.nodes, k, v),
            Entry::Namespace(k, v) => insert(&mut self.namespaces, k, v),
            Entry::Istio(k, v) => insert(&mut self.istio, k, v),
        }
    }

    fn remove(&mut self, e: &Entry) -> bool {
        match e {
            Entry::Service(k, _) => self.services.remove(k).is_some(),
            Entry::Slice(k, _) => self.slices.remove(k).is_some(),
            Entry::Pod(k, _) => self.pods.remove(k).is_some(),
            Entry::Node(k, _) => self.nodes.remove(k).is_some(),
            Entry::Namespace(k, _) => self.namespaces.remove(k).is_some(),
            Entry::Istio(k, _) => self.istio.remove(k).is_some(),
        }
    }
}

/// Inserts `v`; whether it differs from what was there.
fn insert<K: Ord, V: PartialEq>(m: &mut BTreeMap<K, V>, k: K, v: V) -> bool {
    if m.get(&k) == Some(&v) {
        return false;
    }
    m.insert(k, v);
    true
}

/// Replaces `m` by `fresh`; whether they differed.
fn swap<K: Ord, V: PartialEq>(m: &mut BTreeMap<K, V>, fresh: BTreeMap<K, V>) -> bool {
    let changed = *m != fresh;
    *m = fresh;
    changed
}

/// Watches `api`, sending each object `convert` keeps (a `None` entry is skipped).
fn spawn_watch<K>(
    api: Api<K>,
    which: Watched,
    tx: mpsc::UnboundedSender<Update>,
    convert: impl Fn(&K) -> Option<Entry> + Send + 'static,
) -> tokio::task::JoinHandle<()>
where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    tokio::spawn(async move {
        let mut stream = watcher::watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        let mut listing: Vec<Entry> = Vec::new();
        let mut listed_once = false;
        while let Some(ev) = stream.next().await {
            let update = match ev {
                Ok(Event::Apply(o)) => convert(&o).map(Update::Apply),
                Ok(Event::Delete(o)) => convert(&o).map(Update::Delete),
                Ok(Event::Init) => {
                    listing.clear();
                    None
                }
                Ok(Event::InitApply(o)) => {
                    listing.extend(convert(&o));
                    None
                }
                Ok(Event::InitDone) => {
                    listed_once = true;
                    Some(Update::Replace(which, std::mem::take(&mut listing)))
                }
                Err(e) => {
                    tracing::warn!(watch = ?which, "watch failed, retrying: {e}");
                    // A kind the cluster does not serve (an Istio CRD not installed) must not
                    // hold up the rest: it counts as listed, and empty, until it appears.
                    if !listed_once && matches!(which, Watched::Istio(_)) {
                        listed_once = true;
                        Some(Update::Replace(which, Vec::new()))
                    } else {
                        None
                    }
                }
            };
            if let Some(u) = update {
                if tx.send(u).is_err() {
                    return;
                }
            }
        }
    })
}

fn spawn_watches(
    client: &Client,
    tx: &mpsc::UnboundedSender<Update>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = vec![
        spawn_watch(
            Api::<core::Service>::all(client.clone()),
            Watched::Services,
            tx.clone(),
            |s| {
                Some(Entry::Service(
                    objects::key(&s.metadata),
                    Service::from_api(s),
                ))
            },
        ),
        spawn_watch(
            Api::<discovery::EndpointSlice>::all(client.clone()),
            Watched::Slices,
            tx.clone(),
            |s| Some(Entry::Slice(objects::key(&s.metadata), Slice::from_api(s)?)),
        ),
        spawn_watch(
            Api::<core::Pod>::all(client.clone()),
            Watched::Pods,
            tx.clone(),
            |p| Some(Entry::Pod(objects::key(&p.metadata), Pod::from_api(p))),
        ),
        spawn_watch(
            Api::<core::Node>::all(client.clone()),
            Watched::Nodes,
            tx.clone(),
            |n| {
                Some(Entry::Node(
                    n.metadata.name.clone()?,
                    objects::node_locality(n),
                ))
            },
        ),
        spawn_watch(
            Api::<core::Namespace>::all(client.clone()),
            Watched::Namespaces,
            tx.clone(),
            |n| {
                Some(Entry::Namespace(
                    n.metadata.name.clone()?,
                    n.metadata.labels.clone().unwrap_or_default(),
                ))
            },
        ),
    ];
    for k in istio::KINDS {
        let ar = api_resource(k);
        let kind = k.kind;
        tasks.push(spawn_watch(
            Api::<DynamicObject>::all_with(client.clone(), &ar),
            Watched::Istio(kind),
            tx.clone(),
            move |o| {
                let (ns, name) = objects::key(&o.metadata);
                let value = serde_json::to_value(o).ok()?;
                Some(Entry::Istio((kind, ns, name), istio::strip(value)))
            },
        ));
    }
    tasks
}

pub(crate) fn api_resource(k: &IstioKind) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(k.group, k.version, k.kind), k.plural)
}

/// How many watches must list once before the first push.
fn watch_count() -> usize {
    5 + istio::KINDS.len()
}

/// The cluster as it is now: every kind listed once (`hypha check --kubernetes`).
pub async fn snapshot(client: Client) -> Cluster {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let tasks = spawn_watches(&client, &tx);
    drop(tx);
    let _abort = AbortOnDrop(tasks);
    let mut cluster = Cluster::default();
    let mut listed: BTreeSet<Watched> = BTreeSet::new();
    while listed.len() < watch_count() {
        let Some(u) = rx.recv().await else { break };
        if let Update::Replace(w, _) = &u {
            listed.insert(*w);
        }
        cluster.apply(u);
    }
    cluster
}

/// Runs the Kubernetes source until `cp` is dropped or the task is: watches the cluster and
/// pushes, on each debounced change, the config assembled from `files` (the latest valid
/// file config) and the cluster.
pub async fn run(client: Client, cp: ControlPlane, mut files: watch::Receiver<Config>) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let tasks = spawn_watches(&client, &tx);
    drop(tx);
    let _abort = AbortOnDrop(tasks);
    let mut roots = crate::roots::Roots::new(client.clone());
    let mut reporter = crate::report::Reporter::new(client);
    let mut cluster = Cluster::default();
    // The registry derived from the cluster and the file config, kept until either changes.
    let mut derived: Option<std::sync::Arc<crate::cluster::Derived>> = None;
    let mut listed: BTreeSet<Watched> = BTreeSet::new();
    // Diagnostics logged at the last push: each is logged once, not at every push.
    let mut logged: BTreeSet<String> = BTreeSet::new();
    // First and last change since the last push.
    let mut pending: Option<(Instant, Instant)> = None;
    loop {
        let ready = listed.len() == watch_count();
        let deadline =
            pending.map(|(first, last)| (last + DEBOUNCE_AFTER).min(first + DEBOUNCE_MAX));
        tokio::select! {
            u = rx.recv() => {
                let Some(u) = u else { return };
                if let Update::Replace(w, _) = &u {
                    listed.insert(*w);
                }
                let now = Instant::now();
                let registry = !matches!(&u, Update::Apply(Entry::Istio(..)) | Update::Delete(Entry::Istio(..)) | Update::Replace(Watched::Istio(_), _));
                let changed = cluster.apply(u);
                if changed && registry {
                    derived = None;
                }
                if changed || (pending.is_none() && listed.len() == watch_count() && !ready) {
                    pending = Some((pending.map_or(now, |p| p.0), now));
                }
            }
            changed = files.changed() => {
                if changed.is_err() {
                    return;
                }
                let now = Instant::now();
                pending = Some((pending.map_or(now, |p| p.0), now));
                derived = None;
            }
            () = sleep_until(deadline), if ready && deadline.is_some() => {
                let since = pending.take().map(|(first, _)| first.elapsed());
                let started = Instant::now();
                let files = files.borrow_and_update().clone();
                let c = std::mem::take(&mut cluster);
                let cached = derived.clone();
                let Ok((c, d, assembled)) = tokio::task::spawn_blocking(move || {
                    let d = cached.unwrap_or_else(|| std::sync::Arc::new(c.derive(&files.mesh)));
                    let a = istio::assemble_with(&files, &c, &d);
                    (c, d, a)
                })
                .await else {
                    tracing::error!("assembling the cluster's config panicked");
                    return;
                };
                cluster = c;
                derived = Some(d);
                let assembled_in = started.elapsed();
                let now: BTreeSet<String> =
                    assembled.diagnostics.iter().map(ToString::to_string).collect();
                let mut fresh = hypha_config::Diagnostics::default();
                for d in assembled.diagnostics.iter() {
                    if !logged.contains(&d.to_string()) {
                        fresh.push(d.clone());
                    }
                }
                hypha_control::log_diagnostics(&fresh);
                logged = now;
                if assembled.diagnostics.has_errors() {
                    cp.reject();
                    tracing::error!(
                        "the config from files and the cluster has errors (see above); still serving generation {}",
                        cp.current().version()
                    );
                } else {
                    let cp2 = cp.clone();
                    let config = assembled.config;
                    let _ = tokio::task::spawn_blocking(move || cp2.update(config)).await;
                    // The cluster's config is served: ready (the control plane's /ready).
                    cp.set_ready(true);
                    tracing::info!(
                        waited_ms = since.map_or(0, |d| d.as_millis() as u64),
                        assemble_ms = assembled_in.as_millis() as u64,
                        total_ms = started.elapsed().as_millis() as u64,
                        left_out = assembled.invalid.len(),
                        "kubernetes: the cluster's changes pushed"
                    );
                }
                // Where the control plane runs the CA: each namespace's roots for its pods.
                let t = cp.current();
                roots
                    .publish(cluster.namespaces.keys(), |ns| {
                        t.trust_bundle(ns).map(str::to_owned)
                    })
                    .await;
                drop(t);
                reporter.report(&assembled.invalid, &cluster).await;
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}
