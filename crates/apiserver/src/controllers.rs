//! What the rest of a cluster does, played for tests and the demo: Service cluster IPs
//! allocated when a Service is stored (as the API server's allocator does, dual stack by
//! `ipFamilyPolicy`), Deployments turned into ready Pods with addresses of both families (the
//! ReplicaSet controller, the scheduler and the kubelet together; with the kubelet stand-in,
//! Pending pods it starts), Jobs run one pod until it succeeds, and EndpointSlices from the
//! Services' selectors (the EndpointSlice controller). Each writes only what changed, so they
//! settle.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde_json::{json, Value};

use crate::store::{Event, Key};
use crate::{lock, Shared, State};

/// Gives a Service without one its cluster IPs (IPv4 from `10.96.0.0/16`, IPv6 from
/// `fd00:10:96::/112` where the policy asks for both), as the API server does on create.
pub(crate) fn allocate_cluster_ip(state: &mut State, k: &Key, svc: &mut Value) {
    if !k.0.is_empty() || k.1 != "services" {
        return;
    }
    let spec = &svc["spec"];
    if spec.get("type").and_then(Value::as_str) == Some("ExternalName")
        || spec.get("clusterIP").and_then(Value::as_str).is_some()
    {
        return;
    }
    state.next_ip += 1;
    let n = state.next_ip;
    let v4 = format!("10.96.{}.{}", n / 250, n % 250 + 1);
    let v6 = format!("fd00:10:96::{n:x}");
    let policy = spec
        .get("ipFamilyPolicy")
        .and_then(Value::as_str)
        .unwrap_or("SingleStack")
        .to_owned();
    let families: Vec<String> = crate::kinds::strings(spec.get("ipFamilies"));
    let first_v6 = families.first().is_some_and(|f| f == "IPv6");
    let (ips, fams) = match (policy.as_str(), first_v6) {
        ("SingleStack", false) => (vec![v4], vec!["IPv4"]),
        ("SingleStack", true) => (vec![v6], vec!["IPv6"]),
        (_, false) => (vec![v4, v6], vec!["IPv4", "IPv6"]),
        (_, true) => (vec![v6, v4], vec!["IPv6", "IPv4"]),
    };
    svc["spec"]["clusterIP"] = json!(ips[0]);
    svc["spec"]["clusterIPs"] = json!(ips);
    svc["spec"]["ipFamilies"] = json!(fams);
    svc["spec"]["ipFamilyPolicy"] = json!(policy);
}

/// What the controllers have to look at again: the Deployments and Services named by the
/// changes since their last pass, or everything (the first pass, or after falling behind the
/// feed).
#[derive(Default)]
struct Dirty {
    all: bool,
    /// (namespace, name) of Deployments whose pods may be wrong.
    deployments: BTreeSet<(String, String)>,
    /// (namespace, name) of Services whose slices may be wrong.
    services: BTreeSet<(String, String)>,
    /// (namespace, name, labels) of pods that changed: the Services selecting them now, and
    /// those whose slices list them (they may have selected them before), are redone.
    pods: Vec<(String, String, Value)>,
    /// Namespaces with a pod that has no owner any more (or never had one): all their
    /// Deployments are looked at, one of them may have lost a pod.
    orphans: BTreeSet<String>,
    /// A Job or a Job's pod changed.
    jobs: bool,
}

impl Dirty {
    fn everything() -> Dirty {
        Dirty {
            all: true,
            ..Dirty::default()
        }
    }

    /// Notes what `e` may have put out of date; returns whether it is anything.
    fn note(&mut self, e: &Event) -> bool {
        let meta = |field: &str| e.meta(field);
        match (e.group.as_str(), e.resource.as_str()) {
            ("apps", "deployments") => {
                self.deployments.insert((meta("namespace"), meta("name")));
            }
            ("batch", "jobs") => self.jobs = true,
            ("", "services") => {
                self.services.insert((meta("namespace"), meta("name")));
            }
            ("", "pods") => {
                if e.object.pointer("/metadata/ownerReferences/0/kind") == Some(&json!("Job")) {
                    self.jobs = true;
                }
                match e
                    .object
                    .pointer("/metadata/ownerReferences/0/name")
                    .and_then(Value::as_str)
                {
                    Some(owner) => self
                        .deployments
                        .insert((meta("namespace"), owner.to_owned())),
                    None => self.orphans.insert(meta("namespace")),
                };
                let labels = e.object.pointer("/metadata/labels").cloned();
                self.pods.push((
                    meta("namespace"),
                    meta("name"),
                    labels.unwrap_or(Value::Null),
                ));
            }
            _ => return false,
        }
        true
    }

    /// Whether the Service `k` (with `selector`) is to be redone.
    fn has_service(&self, k: &Key, selector: Option<&serde_json::Map<String, Value>>) -> bool {
        self.all
            || self.services.contains(&(k.2.clone(), k.3.clone()))
            || selector.is_some_and(|selector| {
                self.pods.iter().any(|(ns, _, labels)| {
                    *ns == k.2 && selector.iter().all(|(key, v)| labels.get(key) == Some(v))
                })
            })
    }
}

/// Runs the controllers until the server stops: after every change, Pods for the Deployments
/// it concerns, then EndpointSlices for the Services whose pods or selector it touched (a
/// scale costs a pass over one namespace, not the cluster).
pub(crate) async fn run(shared: Shared) {
    let mut feed = lock(&shared).store.feed.subscribe();
    let mut dirty = Dirty::everything();
    loop {
        {
            let mut state = lock(&shared);
            deployments(&mut state, &dirty);
            if dirty.all || dirty.jobs {
                let webhooks = has_webhooks(&state);
                jobs(&mut state, webhooks);
            }
            // The pods just made or deleted are on the feed already, with whatever changed
            // since the last wait: their Services' slices are redone in the same pass.
            let mut then = Dirty {
                all: dirty.all,
                ..Dirty::default()
            };
            drain(&mut feed, &mut then);
            then.services.append(&mut dirty.services);
            then.pods.append(&mut dirty.pods);
            then.orphans.append(&mut dirty.orphans);
            endpoint_slices(&mut state, &then);
            // A Deployment changed by someone else before the lock was taken, and not looked
            // at in this pass, is in the next.
            let done = std::mem::take(&mut dirty);
            dirty.deployments = then
                .deployments
                .into_iter()
                .filter(|d| !done.all && !done.deployments.contains(d))
                .collect();
            // What this pass wrote itself (slices, Deployments' status) needs no other pass.
            let mut ours = Dirty::default();
            drain(&mut feed, &mut ours);
            // Having fallen behind the feed before the slices, Deployment changes may have
            // been missed too: everything again.
            dirty.all = ours.all || (then.all && !done.all);
        }
        // The pods made in this pass go through admission (webhooks are called without the
        // lock), then are stored; one refused is made again a little later, as the
        // ReplicaSet controller retries.
        let pending = std::mem::take(&mut lock(&shared).pending_pods);
        let mut refused = false;
        for (pk, pod) in pending {
            let request = crate::admission::Request {
                group: "",
                version: "v1",
                resource: "pods",
                kind: "Pod",
                namespace: &pk.2,
                namespaced: true,
                username: "system:serviceaccount:kube-system:replicaset-controller",
            };
            match crate::admission::admit(&shared, &request, pod.clone()).await {
                Ok(admitted) => {
                    lock(&shared).store.record(&pk, "ADDED", admitted);
                }
                Err(r) => {
                    tracing::warn!(pod = %pk.3, namespace = %pk.2, "pod not created: {}", r.message);
                    if pod.pointer("/metadata/ownerReferences/0/kind") == Some(&json!("Job")) {
                        dirty.jobs = true;
                    } else if let Some(owner) = pod
                        .pointer("/metadata/ownerReferences/0/name")
                        .and_then(Value::as_str)
                    {
                        dirty.deployments.insert((pk.2.clone(), owner.to_owned()));
                    }
                    refused = true;
                }
            }
        }
        if refused {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
        let mut wanted = dirty.all || dirty.jobs || !dirty.deployments.is_empty();
        while !wanted {
            match feed.recv().await {
                Ok(e) => wanted = dirty.note(&e),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    dirty = Dirty::everything();
                    wanted = true;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
        // Take what else arrived with it in one go.
        drain(&mut feed, &mut dirty);
    }
}

/// Notes every change waiting on `feed`; having fallen behind it, everything.
fn drain(feed: &mut tokio::sync::broadcast::Receiver<Arc<Event>>, dirty: &mut Dirty) {
    loop {
        match feed.try_recv() {
            Ok(e) => {
                dirty.note(&e);
            }
            Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => dirty.all = true,
            Err(_) => return,
        }
    }
}

/// The objects of one kind in namespace `ns`, in name order.
fn in_namespace<'a>(
    state: &'a State,
    group: &'a str,
    resource: &'a str,
    ns: &'a str,
) -> impl Iterator<Item = (&'a Key, &'a Value)> {
    range(state, group, resource, Some(ns))
}

/// The objects of one kind.
fn objects<'a>(
    state: &'a State,
    group: &'a str,
    resource: &'a str,
) -> impl Iterator<Item = (&'a Key, &'a Value)> {
    range(state, group, resource, None)
}

fn range<'a>(
    state: &'a State,
    group: &'a str,
    resource: &'a str,
    ns: Option<&'a str>,
) -> impl Iterator<Item = (&'a Key, &'a Value)> {
    // The store is ordered by group, resource and namespace first: one range, not a scan.
    let from = (
        group.to_owned(),
        resource.to_owned(),
        ns.unwrap_or_default().to_owned(),
        String::new(),
    );
    state
        .store
        .objects
        .range(from..)
        .take_while(move |((g, r, n, _), _)| {
            g == group && r == resource && ns.is_none_or(|ns| n == ns)
        })
}

/// A short stable hash of a pod template (Kubernetes' `pod-template-hash`).
fn template_hash(template: &Value) -> String {
    let text = template.to_string();
    let h = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    format!("{:08x}", h as u32)
}

/// A Deployment's pod: its key, its `pod-template-hash` and its labels.
type OwnedPod = (Key, Option<String>, Value);

fn deployments(state: &mut State, dirty: &Dirty) {
    let webhooks = has_webhooks(state);
    let deploys: Vec<(Key, Value)> = if dirty.all {
        objects(state, "apps", "deployments")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    } else {
        let named = dirty.deployments.iter().filter_map(|(ns, name)| {
            let k: Key = (
                "apps".into(),
                "deployments".into(),
                ns.clone(),
                name.clone(),
            );
            let d = state.store.objects.get(&k)?.clone();
            Some((k, d))
        });
        let orphaned = (dirty.orphans.iter())
            .flat_map(|ns| in_namespace(state, "apps", "deployments", ns))
            .map(|(k, v)| (k.clone(), v.clone()));
        let mut all: BTreeMap<Key, Value> = named.collect();
        all.extend(orphaned);
        all.into_iter().collect()
    };
    // Pods by their Deployment, (namespace, name), with their template hash: found once for
    // every Deployment, in the namespaces looked at.
    let mut pods_of: BTreeMap<(String, String), Vec<OwnedPod>> = BTreeMap::new();
    let namespaces: BTreeSet<&str> = deploys.iter().map(|(k, _)| k.2.as_str()).collect();
    let pods: Box<dyn Iterator<Item = (&Key, &Value)>> = if dirty.all {
        Box::new(objects(state, "", "pods"))
    } else {
        Box::new(
            namespaces
                .into_iter()
                .flat_map(|ns| in_namespace(state, "", "pods", ns)),
        )
    };
    // A Terminating pod no longer counts (its replacement is made now), nor is it deleted again.
    let pods = pods.filter(|(_, p)| p.pointer("/metadata/deletionTimestamp").is_none());
    for (pk, p) in pods {
        if let Some(owner) = p
            .pointer("/metadata/ownerReferences/0/name")
            .and_then(Value::as_str)
        {
            let hash = p
                .pointer("/metadata/labels/pod-template-hash")
                .and_then(Value::as_str)
                .map(str::to_owned);
            pods_of
                .entry((pk.2.clone(), owner.to_owned()))
                .or_default()
                .push((pk.clone(), hash, p["metadata"]["labels"].clone()));
        }
    }
    for (k, d) in &deploys {
        let ns = &k.2;
        let name = &k.3;
        let want = d
            .pointer("/spec/replicas")
            .and_then(Value::as_u64)
            .unwrap_or(1) as usize;
        let template = d.pointer("/spec/template").cloned().unwrap_or(Value::Null);
        let hash = template_hash(&template);
        let owned = pods_of
            .remove(&(ns.clone(), name.clone()))
            .unwrap_or_default();
        // Pods of another template go; then as many as are missing are made.
        let mut current = 0;
        // A pod relabelled out of the Deployment's selector is no longer its own (the
        // ReplicaSet controller releases it and makes another), nor deleted by it.
        let selector = d
            .pointer("/spec/selector/matchLabels")
            .and_then(Value::as_object);
        let selected = |labels: &Value| {
            selector.is_none_or(|sel| sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
        };
        for (pk, pod_hash, _) in owned.into_iter().filter(|(_, _, l)| selected(l)) {
            if pod_hash.as_deref() == Some(hash.as_str()) && current < want {
                current += 1;
            } else if let Some(p) = state.store.objects.get(&pk).cloned() {
                state.store.record(&pk, "DELETED", p);
            }
        }
        for _ in current..want {
            let owner = Owner {
                kind: "Deployment",
                api_version: "apps/v1",
                name,
                uid: d.pointer("/metadata/uid"),
            };
            make_pod(state, ns, &owner, &template, Some(&hash), webhooks);
        }
        let ready = want as u64;
        if d.pointer("/status/readyReplicas").and_then(Value::as_u64) != Some(ready)
            || d.pointer("/status/replicas").and_then(Value::as_u64) != Some(ready)
        {
            let mut d = d.clone();
            d["status"] = json!({"replicas": ready, "readyReplicas": ready, "availableReplicas": ready,
                                 "updatedReplicas": ready, "observedGeneration": d.pointer("/metadata/generation")});
            state.store.record(k, "MODIFIED", d);
        }
    }
}

/// Whether new pods go through admission webhooks.
fn has_webhooks(state: &State) -> bool {
    state
        .store
        .objects
        .keys()
        .any(|k| k.0 == "admissionregistration.k8s.io" && k.1 == "mutatingwebhookconfigurations")
}

/// What a new pod's controller is.
struct Owner<'a> {
    kind: &'static str,
    api_version: &'static str,
    name: &'a str,
    uid: Option<&'a Value>,
}

/// Makes a pod of `owner` from `template` on the node: stored, or queued for admission when
/// there are webhooks. With the kubelet stand-in it is Pending, without addresses; else
/// Running and ready at once.
fn make_pod(
    state: &mut State,
    ns: &str,
    owner: &Owner<'_>,
    template: &Value,
    hash: Option<&str>,
    webhooks: bool,
) {
    state.next_uid += 1;
    state.next_ip += 1;
    let (uid, n) = (state.next_uid, state.next_ip);
    let name = owner.name;
    let pod_name = match hash {
        Some(hash) => format!("{name}-{hash}-{uid:05x}"),
        None => format!("{name}-{uid:05x}"),
    };
    let mut labels = template
        .pointer("/metadata/labels")
        .cloned()
        .unwrap_or_else(|| json!({}));
    if let Some(hash) = hash {
        labels["pod-template-hash"] = json!(hash);
    }
    // The template's spec as it is (init containers, volumes, probes), on the node.
    let mut spec = template
        .pointer("/spec")
        .cloned()
        .filter(Value::is_object)
        .unwrap_or_else(|| json!({"containers": []}));
    spec["nodeName"] = json!("node-1");
    if spec.get("serviceAccountName").is_none() {
        spec["serviceAccountName"] = json!("default");
    }
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod_name, "namespace": ns, "labels": labels,
                     "uid": format!("00000000-0000-0000-0000-{uid:012x}"),
                     "creationTimestamp": crate::serve::now_rfc3339(),
                     "ownerReferences": [{"apiVersion": owner.api_version, "kind": owner.kind, "name": name,
                                          "uid": owner.uid, "controller": true}]},
        "spec": spec,
    });
    if let Some(a) = template.pointer("/metadata/annotations") {
        pod["metadata"]["annotations"] = a.clone();
    }
    pod["status"] = if state.kubelet {
        // The kubelet gives the pod its addresses and readiness when it starts it.
        json!({"phase": "Pending"})
    } else {
        let ips = match &state.pod_addresses {
            Some(choose) => choose(&pod),
            None => vec![
                format!("10.244.{}.{}", n / 250, n % 250 + 1),
                format!("fd00:10:244::{n:x}"),
            ],
        };
        json!({"phase": "Running", "hostIP": "10.0.0.1",
               "podIP": ips.first(),
               "podIPs": ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>(),
               "conditions": [{"type": "Ready", "status": "True"}]})
    };
    let pk = (String::new(), "pods".to_owned(), ns.to_owned(), pod_name);
    if webhooks {
        // Admitted (the injection webhook, say) after this pass, then stored.
        state.pending_pods.push((pk, pod));
    } else {
        state.store.record(&pk, "ADDED", pod);
    }
}

/// Jobs: one pod at a time until one succeeds (`Complete`), or more than `backoffLimit` (6)
/// have failed (`Failed`), as the Job controller runs a Job of one completion.
fn jobs(state: &mut State, webhooks: bool) {
    let all: Vec<(Key, Value)> = objects(state, "batch", "jobs")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (k, job) in all {
        let done = job
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .is_some_and(|c| c.iter().any(|c| c["status"] == "True"));
        if done {
            continue;
        }
        let (ns, name) = (&k.2, &k.3);
        let owned: Vec<Value> = in_namespace(state, "", "pods", ns)
            .filter(|(_, p)| {
                p.pointer("/metadata/ownerReferences/0/kind") == Some(&json!("Job"))
                    && p.pointer("/metadata/ownerReferences/0/name") == Some(&json!(name))
            })
            .map(|(_, p)| p.clone())
            .collect();
        let phase = |p: &Value| {
            p.pointer("/status/phase")
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        let succeeded = owned
            .iter()
            .filter(|p| phase(p).as_deref() == Some("Succeeded"))
            .count();
        let failed = owned
            .iter()
            .filter(|p| phase(p).as_deref() == Some("Failed"))
            .count();
        let active = owned.len() - succeeded - failed;
        let limit = job
            .pointer("/spec/backoffLimit")
            .and_then(Value::as_u64)
            .unwrap_or(6) as usize;
        let now = crate::serve::now_rfc3339();
        let condition = if succeeded > 0 {
            Some(json!({"type": "Complete", "status": "True", "lastTransitionTime": now}))
        } else if failed > limit {
            Some(
                json!({"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                        "lastTransitionTime": now}),
            )
        } else {
            None
        };
        let mut status = json!({"active": active, "succeeded": succeeded, "failed": failed});
        if let Some(c) = condition {
            status["conditions"] = json!([c]);
            status["active"] = json!(0);
            if succeeded > 0 {
                status["completionTime"] = json!(now);
            }
        } else if active == 0 {
            let template = job
                .pointer("/spec/template")
                .cloned()
                .unwrap_or(Value::Null);
            let owner = Owner {
                kind: "Job",
                api_version: "batch/v1",
                name,
                uid: job.pointer("/metadata/uid"),
            };
            make_pod(state, ns, &owner, &template, None, webhooks);
            status["active"] = json!(1);
        }
        if job.get("status") != Some(&status) {
            let mut job = job.clone();
            job["status"] = status;
            state.store.record(&k, "MODIFIED", job);
        }
    }
}

fn labels_match(selector: &serde_json::Map<String, Value>, pod: &Value) -> bool {
    selector
        .iter()
        .all(|(k, v)| pod.pointer("/metadata/labels").and_then(|l| l.get(k)) == Some(v))
}

/// The container port a Service's `targetPort` names (a number, or a container port's name).
fn target_port(port: &Value, pod: &Value) -> Option<u64> {
    match port.get("targetPort").or_else(|| port.get("port"))? {
        Value::Number(n) => n.as_u64(),
        Value::String(name) => pod
            .pointer("/spec/containers")?
            .as_array()?
            .iter()
            .flat_map(|c| {
                c.get("ports")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
            })
            .find(|p| p.get("name").and_then(Value::as_str) == Some(name))?
            .get("containerPort")?
            .as_u64(),
        _ => None,
    }
}

fn endpoint_slices(state: &mut State, dirty: &Dirty) {
    // The Services whose slices list a changed pod: it may have left their selector.
    let changed: BTreeSet<(&str, &str)> = (dirty.pods.iter())
        .map(|(ns, name, _)| (ns.as_str(), name.as_str()))
        .collect();
    let namespaces: BTreeSet<&str> = changed.iter().map(|(ns, _)| *ns).collect();
    let listing: BTreeSet<(String, String)> = (namespaces.into_iter())
        .flat_map(|ns| in_namespace(state, "discovery.k8s.io", "endpointslices", ns))
        .filter(|(k, slice)| {
            (slice["endpoints"].as_array().into_iter().flatten()).any(|ep| {
                ep.pointer("/targetRef/name")
                    .and_then(Value::as_str)
                    .is_some_and(|pod| changed.contains(&(k.2.as_str(), pod)))
            })
        })
        .filter_map(|(k, slice)| {
            let svc = slice.pointer("/metadata/labels/kubernetes.io~1service-name")?;
            Some((k.2.clone(), svc.as_str()?.to_owned()))
        })
        .collect();
    let services: Vec<(Key, Value)> = objects(state, "", "services")
        .filter(|(k, svc)| {
            dirty.has_service(k, svc.pointer("/spec/selector").and_then(Value::as_object))
                || listing.contains(&(k.2.clone(), k.3.clone()))
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    // The Services whose slices this pass owns: those redone, and those deleted.
    let mut done: BTreeSet<(&str, &str)> = services
        .iter()
        .map(|(k, _)| (k.2.as_str(), k.3.as_str()))
        .collect();
    done.extend(
        dirty
            .services
            .iter()
            .map(|(ns, n)| (ns.as_str(), n.as_str())),
    );
    let mut wanted: BTreeMap<Key, Value> = BTreeMap::new();
    // Pods by namespace, found once for every Service.
    let mut in_namespace: BTreeMap<&str, Vec<&Value>> = BTreeMap::new();
    let namespaces: BTreeSet<&str> = services.iter().map(|(k, _)| k.2.as_str()).collect();
    for ns in namespaces {
        in_namespace.insert(
            ns,
            self::in_namespace(state, "", "pods", ns)
                .map(|(_, p)| p)
                .collect(),
        );
    }
    for (k, svc) in &services {
        let Some(selector) = svc.pointer("/spec/selector").and_then(Value::as_object) else {
            continue;
        };
        let pods: Vec<&Value> = in_namespace
            .get(k.2.as_str())
            .into_iter()
            .flatten()
            .copied()
            .filter(|p| labels_match(selector, p))
            .collect();
        let ports: Vec<Value> = svc
            .pointer("/spec/ports")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for family in ["IPv4", "IPv6"] {
            // As the real controller does, one slice per set of ports: pods whose named
            // targetPort resolves to different numbers are in different slices.
            let mut groups: BTreeMap<String, (Vec<Value>, Vec<Value>)> = BTreeMap::new();
            for p in &pods {
                let Some(ip) = p
                    .pointer("/status/podIPs")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|i| i.get("ip")?.as_str())
                    .find(|ip| ip.contains(':') == (family == "IPv6"))
                else {
                    continue;
                };
                let ready = p
                    .pointer("/status/conditions")
                    .and_then(Value::as_array)
                    .is_some_and(|c| {
                        c.iter()
                            .any(|c| c["type"] == "Ready" && c["status"] == "True")
                    });
                let terminating = p.pointer("/metadata/deletionTimestamp").is_some();
                let slice_ports: Vec<Value> = ports
                    .iter()
                    .map(|port| {
                        json!({"name": port.get("name").cloned().unwrap_or_else(|| json!("")),
                               "port": target_port(port, p),
                               "protocol": port.get("protocol").cloned().unwrap_or_else(|| json!("TCP")),
                               "appProtocol": port.get("appProtocol")})
                    })
                    .collect();
                let group = groups
                    .entry(Value::Array(slice_ports.clone()).to_string())
                    .or_insert_with(|| (slice_ports, Vec::new()));
                group.1.push(json!({"addresses": [ip],
                            "conditions": {"ready": ready && !terminating, "serving": ready, "terminating": terminating},
                            "nodeName": p.pointer("/spec/nodeName"),
                            "targetRef": {"kind": "Pod", "namespace": k.2, "name": p.pointer("/metadata/name"),
                                          "uid": p.pointer("/metadata/uid")}}));
            }
            for (i, (slice_ports, endpoints)) in groups.into_values().enumerate() {
                let mut name = format!("{}-{}", k.3, family.to_ascii_lowercase());
                if i > 0 {
                    name.push_str(&format!("-{i}"));
                }
                wanted.insert(
                    ("discovery.k8s.io".into(), "endpointslices".into(), k.2.clone(), name.clone()),
                    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                           "metadata": {"name": name, "namespace": k.2,
                                        "labels": {"kubernetes.io/service-name": k.3,
                                                   "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
                           "addressType": family, "endpoints": endpoints, "ports": slice_ports}),
                );
            }
        }
    }
    // Ours that are no longer wanted go; changed ones are rewritten.
    let ours: Vec<(Key, Value)> = objects(state, "discovery.k8s.io", "endpointslices")
        .filter(|(k, s)| {
            let label = |name: &str| {
                s.pointer(&format!("/metadata/labels/{name}"))
                    .and_then(Value::as_str)
            };
            label("endpointslice.kubernetes.io~1managed-by")
                == Some("endpointslice-controller.k8s.io")
                && (dirty.all
                    || label("kubernetes.io~1service-name")
                        .is_some_and(|svc| done.contains(&(k.2.as_str(), svc))))
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (k, old) in ours {
        if !wanted.contains_key(&k) {
            state.store.record(&k, "DELETED", old);
        }
    }
    for (k, mut slice) in wanted {
        match state.store.objects.get(&k) {
            Some(old)
                if old["endpoints"] == slice["endpoints"] && old["ports"] == slice["ports"] => {}
            Some(old) => {
                slice["metadata"]["uid"] = old["metadata"]["uid"].clone();
                slice["metadata"]["creationTimestamp"] =
                    old["metadata"]["creationTimestamp"].clone();
                state.store.record(&k, "MODIFIED", slice);
            }
            None => {
                state.next_uid += 1;
                slice["metadata"]["uid"] =
                    json!(format!("00000000-0000-0000-0000-{:012x}", state.next_uid));
                slice["metadata"]["creationTimestamp"] = json!(crate::serve::now_rfc3339());
                state.store.record(&k, "ADDED", slice);
            }
        }
    }
}
