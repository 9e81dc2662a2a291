//! The kubelet of one node, as a stand-in (root): each pod scheduled to the node runs from its
//! spec in a network namespace of its own (`hypha-pod`), the way a kubelet and a container
//! runtime would run it, minus images and mount namespaces:
//!
//! - the pod's addresses (both families) and `Running` phase go into its status;
//! - its volumes are directories: a projected service-account token (issued by this server
//!   for the pod, with the volume's audience), ConfigMaps, downward API labels and
//!   annotations; a container sees them by their mount paths, which are rewritten to the
//!   directories in its command, args and environment;
//! - its environment: values and `fieldRef`s (name, namespace, uid, service account, node,
//!   `status.podIP`, `status.podIPs`);
//! - an image is a program ([`KubeletConfig::images`]; `command` replaces it, `args` follow),
//!   run with the container's `runAsUser`/`runAsGroup` (`setpriv`), output in a log file;
//! - `postStart` exec hooks, the next container started once the hook has returned;
//! - init containers in order, each to completion, except native sidecars
//!   (`restartPolicy: Always`), which are started and, when they have a startup probe, waited
//!   for until it passes; then the containers; a `Ready` condition kept from every
//!   container's readiness probe (HTTP, TCP or exec, from the node to the pod's address);
//! - `/etc/hosts` with every Service's names and cluster IPs (the cluster's DNS);
//! - deletion: SIGTERM to the containers, then, once they have stopped, to the native sidecars
//!   (in reverse order), each within the grace period, then SIGKILL; the pod object is removed
//!   when everything has stopped;
//! - a pod whose `restartPolicy` is not `Always` ends when its containers have: `Succeeded`
//!   (every one exited 0) or `Failed`, its native sidecars stopped then.
//!
//! Not here: image pulls, liveness restarts, resource limits, mount namespaces.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use std::process::Child;

use crate::store::Key;
use crate::{lock, Shared};

/// How the stand-in runs pods.
#[derive(Clone)]
pub struct KubeletConfig {
    /// The node's name (`spec.nodeName` of its pods).
    pub node_name: String,
    /// The bridge the pods are on.
    pub node: Arc<hypha_pod::Node>,
    /// Image → its entrypoint (program and leading arguments).
    pub images: HashMap<String, Vec<String>>,
    /// Where pods' volumes and logs go.
    pub dir: PathBuf,
}

impl std::fmt::Debug for KubeletConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeletConfig")
            .field("node_name", &self.node_name)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// Watches the pods of the node and runs each until it is deleted or ends.
pub(crate) async fn run(shared: Shared, config: KubeletConfig) {
    // Containers running as other users reach their volumes through it.
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::create_dir_all(&config.dir);
        let _ = std::fs::set_permissions(&config.dir, std::fs::Permissions::from_mode(0o755));
    }
    let mut feed = lock(&shared).store.feed.subscribe();
    let mut running: HashMap<Key, tokio::sync::watch::Sender<bool>> = HashMap::new();
    let mut tasks: tokio::task::JoinSet<Key> = tokio::task::JoinSet::new();
    // The pods there already, then every change.
    let existing = pods(&shared);
    let seen = |k: Key,
                pod: Value,
                deleted: bool,
                running: &mut HashMap<_, tokio::sync::watch::Sender<bool>>,
                tasks: &mut tokio::task::JoinSet<Key>| {
        if pod.pointer("/spec/nodeName").and_then(Value::as_str) != Some(&config.node_name) {
            return;
        }
        let stopping = deleted || pod.pointer("/metadata/deletionTimestamp").is_some();
        if let Some(stop) = running.get(&k) {
            if stopping {
                let _ = stop.send(true);
            }
            return;
        }
        if stopping
            || pod
                .pointer("/status/phase")
                .and_then(Value::as_str)
                .is_some_and(|p| p == "Succeeded" || p == "Failed")
        {
            return;
        }
        let (tx, rx) = tokio::sync::watch::channel(false);
        running.insert(k.clone(), tx);
        let (shared, config) = (shared.clone(), config.clone());
        tasks.spawn(async move {
            if let Err(e) = run_pod(&shared, &config, &k, pod, rx).await {
                tracing::warn!(pod = %k.3, "kubelet: {e}");
            }
            k
        });
    };
    for (k, pod) in existing {
        seen(k, pod, false, &mut running, &mut tasks);
    }
    loop {
        let received = tokio::select! {
            r = feed.recv() => r,
            Some(Ok(done)) = tasks.join_next() => {
                // A pod of that name made again later is a new one.
                running.remove(&done);
                continue;
            }
        };
        let e = match received {
            Ok(e) => e,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                // Fallen behind: what is there now, and the pods gone meanwhile stopped.
                let now = pods(&shared);
                for (k, stop) in &running {
                    if !now.iter().any(|(n, _)| n == k) {
                        let _ = stop.send(true);
                    }
                }
                for (k, pod) in now {
                    seen(k, pod, false, &mut running, &mut tasks);
                }
                continue;
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        };
        if !(e.group.is_empty() && e.resource == "pods") {
            continue;
        }
        let k: Key = (
            String::new(),
            "pods".into(),
            e.meta("namespace"),
            e.meta("name"),
        );
        seen(
            k,
            e.object.clone(),
            e.kind == "DELETED",
            &mut running,
            &mut tasks,
        );
    }
}

/// Every pod in the store.
fn pods(shared: &Shared) -> Vec<(Key, Value)> {
    let state = lock(shared);
    state
        .store
        .objects
        .iter()
        .filter(|(k, _)| k.0.is_empty() && k.1 == "pods")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// A started container.
struct Running {
    name: String,
    child: Child,
}

async fn run_pod(
    shared: &Shared,
    config: &KubeletConfig,
    k: &Key,
    pod: Value,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), String> {
    let (ns, name) = (k.2.clone(), k.3.clone());
    let node = config.node.clone();
    // A namespace's name has no dot, so `<ns>.<name>` names one pod only.
    let net_name = format!("{ns}.{name}");
    let netns = tokio::task::spawn_blocking(move || node.pod(&net_name))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let ips = [netns.ipv4.to_string(), netns.ipv6.to_string()];
    let mut pod = pod;
    update_status(shared, k, |status| {
        status["phase"] = json!("Pending");
        status["hostIP"] = json!(config.node.ipv4().to_string());
        status["podIP"] = json!(ips[0]);
        status["podIPs"] = json!(ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>());
        status["conditions"] = json!([{"type": "Ready", "status": "False"}]);
    });
    if let Some(p) = lock(shared).store.objects.get(k) {
        pod = p.clone();
    }
    let dir = config.dir.join(format!("{ns}_{name}"));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    netns
        .hosts(&service_hosts(shared))
        .map_err(|e| e.to_string())?;
    // A volume's ConfigMap may not be there yet (the control plane writes the roots'): tried
    // again until it is, as the kubelet does.
    let volumes = loop {
        match volumes(shared, &pod, &dir) {
            Ok(v) => break v,
            Err(e) if !*stop.borrow() => {
                tracing::debug!(pod = %name, "volumes not ready: {e}");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = stop.changed() => {}
                }
            }
            // Deleted while waiting: nothing to start, on to the clean-up.
            Err(_) => break HashMap::new(),
        }
    };
    let spec = pod["spec"].clone();
    let grace = Duration::from_secs(spec["terminationGracePeriodSeconds"].as_u64().unwrap_or(30));

    // Init containers, in order; native sidecars keep running.
    let mut sidecars: Vec<Running> = Vec::new();
    let mut ready_probes: Vec<Value> = Vec::new();
    for c in spec["initContainers"].as_array().into_iter().flatten() {
        if *stop.borrow() {
            break;
        }
        let cname = c["name"].as_str().unwrap_or_default().to_owned();
        let mut child = start(config, &netns, &pod, c, &volumes, &dir, None)?;
        if c["restartPolicy"] == "Always" {
            if let Some(probe) = c.get("startupProbe") {
                if !wait_probe(probe, &netns, &ips[0], &mut stop).await {
                    sidecars.push(Running { name: cname, child });
                    if *stop.borrow() {
                        break;
                    }
                    // Never started: the pod's containers are not run without it.
                    tracing::warn!(pod = %name, container = ?c["name"], "startup probe failed");
                    update_status(shared, k, |s| s["phase"] = json!("Failed"));
                    stop_all(&mut sidecars, grace).await;
                    return Ok(());
                }
            }
            if let Some(r) = c.get("readinessProbe") {
                ready_probes.push(r.clone());
            }
            sidecars.push(Running { name: cname, child });
            continue;
        }
        let Some(status) = exited(&mut child, &mut stop).await else {
            let _ = child.kill();
            let _ = child.wait();
            break;
        };
        if !status.success() {
            tracing::warn!(pod = %name, container = %cname, %status, "init container failed");
            update_status(shared, k, |s| s["phase"] = json!("Failed"));
            stop_all(&mut sidecars, grace).await;
            return Ok(());
        }
    }

    // The containers.
    let mut apps: Vec<Running> = Vec::new();
    if !*stop.borrow() {
        for c in spec["containers"].as_array().into_iter().flatten() {
            let child = start(config, &netns, &pod, c, &volumes, &dir, None)?;
            let readiness = c.get("readinessProbe").cloned();
            apps.push(Running {
                name: c["name"].as_str().unwrap_or_default().to_owned(),
                child,
            });
            // The next container starts only once this one's postStart hook has returned.
            if let Some(hook) = c.pointer("/lifecycle/postStart/exec/command") {
                let mut h = start(config, &netns, &pod, c, &volumes, &dir, Some(hook))?;
                match exited(&mut h, &mut stop).await {
                    Some(s) if !s.success() => {
                        tracing::warn!(pod = %name, container = ?c["name"], %s, "postStart hook failed");
                    }
                    Some(_) => {}
                    None => {
                        let _ = h.kill();
                        let _ = h.wait();
                    }
                }
            }
            if let Some(r) = readiness {
                ready_probes.push(r);
            }
        }
        update_status(shared, k, |s| s["phase"] = json!("Running"));
    }
    let restart_always = spec["restartPolicy"].as_str().is_none_or(|p| p == "Always");
    let mut ready = false;
    let mut exits: BTreeMap<String, i32> = BTreeMap::new();
    while !*stop.borrow() {
        // Readiness, about once a second.
        let now_ready = !apps.is_empty() && {
            let mut all = true;
            for p in &ready_probes {
                if !probe(p, &netns, &ips[0]).await {
                    all = false;
                    break;
                }
            }
            all
        };
        if now_ready != ready {
            ready = now_ready;
            let status = if ready { "True" } else { "False" };
            update_status(shared, k, |s| {
                s["conditions"] = json!([{"type": "Ready", "status": status}]);
            });
        }
        // Containers that ended.
        for a in &mut apps {
            if exits.contains_key(&a.name) {
                continue;
            }
            if let Ok(Some(s)) = a.child.try_wait() {
                exits.insert(a.name.clone(), s.code().unwrap_or(-1));
            }
        }
        if !restart_always && !apps.is_empty() && exits.len() == apps.len() {
            // A Job's pod: done when its containers are; its sidecars go then.
            stop_all(&mut sidecars, grace).await;
            let phase = if exits.values().all(|c| *c == 0) {
                "Succeeded"
            } else {
                "Failed"
            };
            update_status(shared, k, |s| {
                s["phase"] = json!(phase);
                s["conditions"] = json!([{"type": "Ready", "status": "False"}]);
            });
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.changed() => {}
        }
    }

    // Deleted: the containers, then the native sidecars, within the grace period.
    let deadline = Instant::now() + grace;
    stop_all(&mut apps, grace).await;
    sidecars.reverse();
    stop_all(
        &mut sidecars,
        deadline.saturating_duration_since(Instant::now()),
    )
    .await;
    drop(netns);
    let mut state = lock(shared);
    if let Some(p) = state.store.objects.get(k).cloned() {
        state.store.record(k, "DELETED", p);
    }
    Ok(())
}

/// How the child exited, polled; `None` if `stop` came first.
async fn exited(
    child: &mut Child,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Option<std::process::ExitStatus> {
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if *stop.borrow() {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGTERM to each, then SIGKILL to those still running after `grace`.
async fn stop_all(containers: &mut [Running], grace: Duration) {
    for c in containers.iter() {
        let pid = i32::try_from(c.child.id()).ok();
        if let Some(pid) = pid.and_then(rustix::process::Pid::from_raw) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
    }
    let deadline = Instant::now() + grace;
    for c in containers.iter_mut() {
        loop {
            if let Ok(Some(_)) = c.child.try_wait() {
                break;
            }
            if Instant::now() >= deadline {
                tracing::warn!(container = %c.name, "not stopped in the grace period: killed");
                let _ = c.child.kill();
                let _ = c.child.wait();
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Merges `f`'s changes into the pod's status.
fn update_status(shared: &Shared, k: &Key, f: impl FnOnce(&mut Value)) {
    let mut state = lock(shared);
    let Some(mut pod) = state.store.objects.get(k).cloned() else {
        return;
    };
    if !pod["status"].is_object() {
        pod["status"] = json!({});
    }
    f(&mut pod["status"]);
    state.store.record(k, "MODIFIED", pod);
}

/// Every Service's names and cluster IPs, as the cluster's DNS answers them.
fn service_hosts(shared: &Shared) -> Vec<(std::net::IpAddr, String)> {
    let state = lock(shared);
    let mut out = Vec::new();
    for (k, svc) in &state.store.objects {
        if !(k.0.is_empty() && k.1 == "services") {
            continue;
        }
        for ip in svc["spec"]["clusterIPs"].as_array().into_iter().flatten() {
            let Some(ip) = ip.as_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            let names = format!(
                "{n}.{ns}.svc.cluster.local {n}.{ns}.svc {n}.{ns}",
                n = k.3,
                ns = k.2
            );
            out.push((ip, names));
        }
    }
    out
}

/// Makes each volume's directory; (mount name → directory).
fn volumes(shared: &Shared, pod: &Value, dir: &Path) -> Result<HashMap<String, PathBuf>, String> {
    let mut out = HashMap::new();
    let ns = pod["metadata"]["namespace"].as_str().unwrap_or_default();
    let fs_group = pod["spec"]["securityContext"]["fsGroup"].as_u64();
    for v in pod["spec"]["volumes"].as_array().into_iter().flatten() {
        let name = v["name"].as_str().unwrap_or_default();
        let vdir = dir.join("volumes").join(name);
        std::fs::create_dir_all(&vdir).map_err(|e| format!("{}: {e}", vdir.display()))?;
        let mut files: Vec<(String, String)> = Vec::new();
        for src in v["projected"]["sources"].as_array().into_iter().flatten() {
            if let Some(t) = src.get("serviceAccountToken") {
                files.push((
                    t["path"].as_str().unwrap_or("token").to_owned(),
                    token(shared, pod, t),
                ));
            }
        }
        if let Some(cm) = v["configMap"]["name"].as_str() {
            let state = lock(shared);
            let key = (
                String::new(),
                "configmaps".to_owned(),
                ns.to_owned(),
                cm.to_owned(),
            );
            match state.store.objects.get(&key) {
                Some(obj) => {
                    for (k, val) in obj["data"].as_object().into_iter().flatten() {
                        files.push((k.clone(), val.as_str().unwrap_or_default().to_owned()));
                    }
                }
                None if v["configMap"]["optional"] == true => {}
                None => return Err(format!("configmap \"{cm}\" not found")),
            }
        }
        for item in v["downwardAPI"]["items"].as_array().into_iter().flatten() {
            let path = item["path"].as_str().unwrap_or_default().to_owned();
            let text = match item["fieldRef"]["fieldPath"].as_str() {
                Some("metadata.labels") => quoted_map(&pod["metadata"]["labels"]),
                Some("metadata.annotations") => quoted_map(&pod["metadata"]["annotations"]),
                Some(f) => field(pod, f),
                None => String::new(),
            };
            files.push((path, text));
        }
        for (path, text) in files {
            let p = vdir.join(path);
            std::fs::write(&p, text).map_err(|e| format!("{}: {e}", p.display()))?;
            // As the kubelet sets volumes up: owned by the pod's fsGroup and readable by it,
            // else readable by every user of the pod (the projected volumes' 0644).
            use std::os::unix::fs::PermissionsExt;
            let mode = match fs_group.and_then(|g| u32::try_from(g).ok()) {
                Some(g) => {
                    let _ = std::os::unix::fs::chown(&p, None, Some(g));
                    0o640
                }
                None => 0o644,
            };
            let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode));
        }
        out.insert(name.to_owned(), vdir);
    }
    Ok(out)
}

/// A token for the pod's service account with the projection's audience, bound to the pod.
fn token(shared: &Shared, pod: &Value, projection: &Value) -> String {
    let mut state = lock(shared);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    state.next_uid += 1;
    let secret = format!("tok-kubelet-{:016x}", crate::rand_u64() ^ state.next_uid);
    let t = crate::Token {
        namespace: pod["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        service_account: pod["spec"]["serviceAccountName"]
            .as_str()
            .unwrap_or("default")
            .to_owned(),
        pod: Some((
            pod["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            pod["metadata"]["uid"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        )),
        audiences: vec![projection["audience"]
            .as_str()
            .unwrap_or("https://kubernetes.default.svc")
            .to_owned()],
        expires: now + projection["expirationSeconds"].as_u64().unwrap_or(3600),
    };
    state.tokens.push((secret.clone(), t));
    secret
}

/// A map as the downward API writes it: `key="value"` lines, sorted, values quoted.
fn quoted_map(m: &Value) -> String {
    let mut out = String::new();
    let sorted: BTreeMap<&String, &Value> = m.as_object().into_iter().flatten().collect();
    for (k, v) in sorted {
        let v = v.as_str().unwrap_or_default();
        out.push_str(&format!("{k}={}\n", go_quote(v)));
    }
    out
}

/// Go's `%q` for the characters label and annotation values hold.
fn go_quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A `fieldRef` of the pod.
fn field(pod: &Value, path: &str) -> String {
    match path {
        "status.podIPs" => pod["status"]["podIPs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["ip"].as_str())
            .collect::<Vec<_>>()
            .join(","),
        p => {
            let pointer = format!("/{}", p.replace('.', "/"));
            match pod.pointer(&pointer) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(v) => v.to_string(),
            }
        }
    }
}

/// Starts container `c` in the pod, or, with `exec`, that command in it (a `postStart` hook:
/// a program named like the image's entrypoint's is that one).
fn start(
    config: &KubeletConfig,
    netns: &hypha_pod::Pod,
    pod: &Value,
    c: &Value,
    volumes: &HashMap<String, PathBuf>,
    dir: &Path,
    exec: Option<&Value>,
) -> Result<Child, String> {
    let cname = c["name"].as_str().unwrap_or_default();
    let image = c["image"].as_str().unwrap_or_default();
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect()
    };
    let entrypoint = config.images.get(image);
    let argv = match exec {
        Some(cmd) => {
            let mut argv = strings(cmd);
            let program = entrypoint.and_then(|e| e.first());
            if let (Some(first), Some(program)) = (argv.first_mut(), program) {
                let named = Path::new(program.as_str()).file_name();
                if !first.contains('/') && named.is_some_and(|n| n == first.as_str()) {
                    first.clone_from(program);
                }
            }
            argv
        }
        None => {
            let mut argv = match c.get("command") {
                Some(cmd) if cmd.is_array() => strings(cmd),
                _ => entrypoint
                    .cloned()
                    .ok_or_else(|| format!("container {cname}: no program for image {image:?}"))?,
            };
            argv.extend(strings(&c["args"]));
            argv
        }
    };
    // Mount paths → the volumes' directories.
    let mounts: Vec<(String, PathBuf)> = c["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| {
            let dir = volumes.get(m["name"].as_str()?)?;
            Some((m["mountPath"].as_str()?.to_owned(), dir.clone()))
        })
        .collect();
    let mount = |s: &str| -> String {
        for (path, dir) in &mounts {
            if let Some(rest) = s.strip_prefix(path.as_str()) {
                if rest.is_empty() || rest.starts_with('/') {
                    return format!("{}{rest}", dir.display());
                }
            }
        }
        s.to_owned()
    };
    let argv: Vec<String> = argv.iter().map(|a| mount(a)).collect();
    let sc = &c["securityContext"];
    let psc = &pod["spec"]["securityContext"];
    let uid = sc["runAsUser"].as_u64().or(psc["runAsUser"].as_u64());
    let gid = sc["runAsGroup"].as_u64().or(psc["runAsGroup"].as_u64());
    let mut cmd = netns.command("setpriv");
    match uid {
        Some(u) => cmd.arg(format!("--reuid={u}")),
        None => cmd.arg("--reuid=0"),
    };
    match gid {
        Some(g) => cmd.arg(format!("--regid={g}")),
        None => cmd.arg("--regid=0"),
    };
    match psc["fsGroup"].as_u64() {
        Some(g) => cmd.arg(format!("--groups={g}")),
        None => cmd.arg("--clear-groups"),
    };
    cmd.arg("--").args(&argv);
    cmd.env_clear();
    cmd.env("PATH", std::env::var("PATH").unwrap_or_default());
    for e in c["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().unwrap_or_default();
        let value = match (
            e.get("value"),
            e["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        ) {
            (Some(Value::String(v)), _) => mount(v),
            (_, Some(f)) => field(pod, f),
            _ => String::new(),
        };
        cmd.env(name, value);
    }
    let log = match exec {
        Some(_) => dir.join(format!("{cname}.poststart.log")),
        None => dir.join(format!("{cname}.log")),
    };
    let out = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    cmd.stdout(out)
        .stderr(err)
        .stdin(std::process::Stdio::null());
    cmd.spawn().map_err(|e| format!("container {cname}: {e}"))
}

/// Runs `probe` until it passes (true) or fails `failureThreshold` times (false).
async fn wait_probe(
    p: &Value,
    netns: &hypha_pod::Pod,
    ip: &str,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> bool {
    let period =
        Duration::from_millis((p["periodSeconds"].as_u64().unwrap_or(10) * 1000).min(1000));
    let tries = p["failureThreshold"].as_u64().unwrap_or(3).max(1);
    for _ in 0..tries {
        if *stop.borrow() {
            return false;
        }
        if probe(p, netns, ip).await {
            return true;
        }
        tokio::time::sleep(period).await;
    }
    false
}

/// One probe, from the node to the pod's address (exec: in the pod).
async fn probe(p: &Value, netns: &hypha_pod::Pod, ip: &str) -> bool {
    let timeout = Duration::from_secs(p["timeoutSeconds"].as_u64().unwrap_or(1));
    let port = |v: &Value| v["port"].as_u64().and_then(|p| u16::try_from(p).ok());
    let host = |v: &Value| v["host"].as_str().unwrap_or(ip).to_owned();
    if let Some(h) = p.get("httpGet") {
        let Some(port) = port(h) else { return false };
        let path = h["path"].as_str().unwrap_or("/").to_owned();
        let host = host(h);
        let get = async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let addr = if host.contains(':') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            };
            let mut s = tokio::net::TcpStream::connect(&addr).await.ok()?;
            let req = format!(
                "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: kube-probe/1.33\r\nConnection: close\r\n\r\n"
            );
            s.write_all(req.as_bytes()).await.ok()?;
            let mut head = [0u8; 12];
            s.read_exact(&mut head).await.ok()?;
            std::str::from_utf8(&head[9..12]).ok()?.parse::<u16>().ok()
        };
        return matches!(
            tokio::time::timeout(timeout, get).await,
            Ok(Some(200..=399))
        );
    }
    if let Some(t) = p.get("tcpSocket") {
        let Some(port) = port(t) else { return false };
        let addr = format!("{}:{port}", host(t));
        return matches!(
            tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await,
            Ok(Ok(_))
        );
    }
    if let Some(e) = p.get("exec") {
        let argv: Vec<&str> = e["command"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let Some((prog, args)) = argv.split_first() else {
            return false;
        };
        let mut cmd = netns.command(prog);
        cmd.args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let Ok(mut child) = cmd.spawn() else {
            return false;
        };
        let (_never, mut no_stop) = tokio::sync::watch::channel(false);
        return match tokio::time::timeout(timeout, exited(&mut child, &mut no_stop)).await {
            Ok(Some(s)) => s.success(),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                false
            }
        };
    }
    // gRPC probes are not run here: counted as passing.
    true
}
