//! A Kubernetes API server in memory, for Hypha's tests and its Kubernetes demo. No real
//! kube-apiserver can run where Hypha is built, so this one speaks the real protocol, as far
//! as kubectl and list/watch clients use it: discovery (legacy and aggregated), a minimal
//! OpenAPI v3 (what kubectl's default validation asks), list with `resourceVersion` and
//! selectors, watch streams with bookmarks and `410 Gone` once the history is compacted,
//! create / update / JSON merge and strategic merge patch / delete, the `status` and `scale`
//! subresources, CRDs registered when applied (their custom resources checked against the
//! structural schema and pruned, `schema`), and TokenReview answered from the tokens the
//! test issued, mutating admission webhooks called on create (`admission`). Plain HTTP on
//! loopback; any bearer token is accepted.
//!
//! The controllers of a real cluster (Deployment → Pods → EndpointSlices, the kubelet) are not
//! here: tests play them through [`ApiServer`]'s methods or with kubectl.
//!
//! Deletion is graceful where a cluster's is: a deleted pod is Terminating (its
//! `deletionTimestamp` set, its endpoints not ready) for its grace period, at most the time its
//! emulated containers take to stop ([`ApiServer::set_pod_shutdown`], 2 s), then removed; a Namespace is Terminating for
//! 50 ms, then emptied and removed.
//!
//! Not yet: lists continued from a consistent snapshot (a `continue` page shows the objects as
//! they are now), server-side apply, JSON patch and protobuf bodies but those of CSRs and Namespaces
//! (`protobuf`; `kubectl create token` sends one: issue tokens with [`ApiServer::issue_token`]).

mod admission;
mod controllers;
mod discovery;
mod kinds;
pub mod kubelet;
mod patch;
mod protobuf;
mod rbac;
mod schema;
mod select;
mod serve;
mod store;
mod tokenreview;
mod watch;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::Value;

pub use kinds::Kind;
pub use select::Selector;
pub use store::Event;

/// A service-account token the server issued, as the kubelet's projected volume holds one.
#[derive(Debug, Clone)]
pub struct Token {
    pub namespace: String,
    pub service_account: String,
    /// The pod the token is bound to (name, uid): it stops authenticating once that pod is
    /// gone or replaced.
    pub pod: Option<(String, String)>,
    pub audiences: Vec<String>,
    /// Seconds since the Unix epoch.
    pub expires: u64,
}

pub(crate) struct State {
    pub kinds: Vec<Kind>,
    pub store: store::Store,
    pub tokens: Vec<(String, Token)>,
    pub next_uid: u64,
    /// The last address handed out (cluster IPs, pod IPs).
    pub next_ip: u64,
    /// Where new pods get their addresses (the cluster's network plugin); `None`: one of
    /// each family from the pod network.
    pub pod_addresses: Option<PodAddresses>,
    /// How long a deleted pod's containers take to stop, at most its grace period.
    pub pod_shutdown: std::time::Duration,
    /// Where Services are served (webhooks' `clientConfig.service`).
    pub routes: admission::Routes,
    /// Pods the controllers made, to go through admission before they are stored.
    pub pending_pods: Vec<(store::Key, Value)>,
    /// A kubelet stand-in runs the pods: new pods are Pending, without addresses, until it
    /// starts them.
    pub kubelet: bool,
}

/// Chooses a new pod's addresses (primary first) from the pod as the Deployment controller
/// made it: what a cluster's network plugin does.
pub type PodAddresses = Arc<dyn Fn(&Value) -> Vec<String> + Send + Sync>;

pub(crate) type Shared = Arc<Mutex<State>>;

pub(crate) fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, State> {
    shared
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A running server; stops when dropped.
pub struct ApiServer {
    addr: SocketAddr,
    shared: Shared,
    close_watches: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
    controllers: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.task.abort();
        for c in self
            .controllers
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
        {
            c.abort();
        }
    }
}

impl ApiServer {
    /// Serves on an ephemeral loopback port.
    pub async fn start() -> std::io::Result<ApiServer> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared: Shared = Arc::new(Mutex::new(State {
            kinds: kinds::builtin(),
            store: store::Store::default(),
            tokens: Vec::new(),
            next_uid: 1,
            next_ip: 0,
            pod_addresses: None,
            pod_shutdown: std::time::Duration::from_secs(2),
            routes: Default::default(),
            pending_pods: Vec::new(),
            kubelet: false,
        }));
        let (close_watches, closed) = tokio::sync::watch::channel(0);
        let task = tokio::spawn(serve::run(listener, shared.clone(), closed));
        Ok(ApiServer {
            addr,
            shared,
            close_watches,
            task,
            controllers: Mutex::default(),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig for this server into `dir` and returns its path (for `KUBECONFIG`
    /// or `kubectl --kubeconfig`). Its user is an administrator.
    pub fn write_kubeconfig(&self, dir: &Path) -> std::io::Result<PathBuf> {
        self.write_kubeconfig_as(&dir.join("kubeconfig"), "test")
    }

    /// Writes a kubeconfig at `path` whose user presents `token`: one [`ApiServer::issue_token`]
    /// issued makes its service account's RBAC roles (applied like any object) all it may do.
    pub fn write_kubeconfig_as(&self, path: &Path, token: &str) -> std::io::Result<PathBuf> {
        let config = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster: {{server: \"{}\"}}\n\
             users:\n- name: test\n  user: {{token: \"{token}\"}}\ncontexts:\n- name: test\n  \
             context: {{cluster: test, user: test, namespace: default}}\ncurrent-context: test\n",
            self.url()
        );
        std::fs::write(path, config)?;
        Ok(path.to_path_buf())
    }

    /// Says where port `port` of Service `namespace/name` is served: the address the server
    /// calls a webhook whose `clientConfig.service` names it at (a cluster's Service routing).
    pub fn route_service(&self, namespace: &str, name: &str, port: u16, addr: SocketAddr) {
        lock(&self.shared)
            .routes
            .insert((namespace.to_owned(), name.to_owned(), port), addr);
    }

    /// A token of service account `namespace/service_account` for the API server itself
    /// (bound to no pod, never expiring): what a controller running as that account presents.
    pub fn issue_account_token(&self, namespace: &str, service_account: &str) -> String {
        self.issue_token(Token {
            namespace: namespace.into(),
            service_account: service_account.into(),
            pod: None,
            audiences: vec!["https://kubernetes.default.svc".into()],
            expires: u64::MAX,
        })
    }

    /// Issues a service-account token, as the kubelet asks the TokenRequest API for one.
    pub fn issue_token(&self, token: Token) -> String {
        let mut state = lock(&self.shared);
        state.next_uid += 1;
        let secret = format!("tok-{:016x}-{}", rand_u64(), state.next_uid);
        state.tokens.push((secret.clone(), token));
        secret
    }

    /// The object at `api_version`/`resource`, `namespace` (`""` for cluster-scoped) and
    /// `name`.
    pub fn get(&self, group: &str, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        let state = lock(&self.shared);
        state
            .store
            .objects
            .get(&(group.into(), resource.into(), namespace.into(), name.into()))
            .cloned()
    }

    /// The objects of `group`/`resource` (every namespace).
    pub fn list(&self, group: &str, resource: &str) -> Vec<Value> {
        let state = lock(&self.shared);
        state
            .store
            .objects
            .iter()
            .filter(|((g, r, _, _), _)| g == group && r == resource)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Creates or replaces an object as a controller would (no conflict check); returns it
    /// as stored.
    pub fn put(&self, group: &str, resource: &str, object: Value) -> Value {
        let mut state = lock(&self.shared);
        serve::put_object(&mut state, group, resource, object)
    }

    /// Deletes an object as a controller would; whether it was there.
    pub fn delete(&self, group: &str, resource: &str, namespace: &str, name: &str) -> bool {
        let mut state = lock(&self.shared);
        let key = (group.into(), resource.into(), namespace.into(), name.into());
        match state.store.objects.get(&key).cloned() {
            Some(obj) => {
                state.store.record(&key, "DELETED", obj);
                true
            }
            None => false,
        }
    }

    /// [`ApiServer::run_controllers`], new pods getting the addresses `addresses` picks (the
    /// demo's pods are processes on loopback).
    pub fn run_controllers_with(&self, addresses: PodAddresses) {
        lock(&self.shared).pod_addresses = Some(addresses);
        self.run_controllers();
    }

    /// Runs the pods scheduled to `config.node_name` with a kubelet stand-in (root; see
    /// [`kubelet`]): from now on new pods start Pending, get their addresses and readiness
    /// from it, and a deleted pod is removed when its containers have stopped.
    pub fn run_kubelet(&self, config: kubelet::KubeletConfig) {
        {
            let mut state = lock(&self.shared);
            state.kubelet = true;
            // The kubelet removes a deleted pod itself, within its grace period.
            state.pod_shutdown = std::time::Duration::from_secs(3600);
        }
        let task = tokio::spawn(kubelet::run(self.shared.clone(), config));
        self.controllers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(task);
    }

    /// How long a deleted pod stays Terminating (its containers stopping) before it is removed,
    /// at most its grace period; 2 s unless set.
    pub fn set_pod_shutdown(&self, shutdown: std::time::Duration) {
        lock(&self.shared).pod_shutdown = shutdown;
    }

    /// Plays the rest of the cluster from now on (see the `controllers` module): Deployments
    /// get ready Pods with IPv4 and IPv6 addresses, Services their EndpointSlices.
    pub fn run_controllers(&self) {
        let task = tokio::spawn(controllers::run(self.shared.clone()));
        self.controllers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(task);
    }

    /// Every change from now on, as watches get them, each with the instant it was recorded.
    pub fn changes(&self) -> tokio::sync::broadcast::Receiver<Arc<Event>> {
        lock(&self.shared).store.feed.subscribe()
    }

    /// The current resource version.
    pub fn resource_version(&self) -> u64 {
        lock(&self.shared).store.rv
    }

    /// Forgets the change history: watches resuming from before now get `410 Gone`.
    pub fn compact(&self) {
        lock(&self.shared).store.compact();
    }

    /// Ends every open watch stream, as an API server does when it restarts or times them out.
    pub fn close_watches(&self) {
        self.close_watches.send_modify(|n| *n += 1);
    }
}

/// Runs the machine's kubectl against the server whose kubeconfig [`ApiServer::write_kubeconfig`]
/// wrote into `dir`, with a discovery cache of its own there (a cache shared between servers on
/// the same port would hide resources): its stdout, or everything it printed when it failed.
pub fn kubectl(dir: &Path, args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(dir.join("kubeconfig"))
        .arg("--cache-dir")
        .arg(dir.join("cache"))
        .args(args)
        .output()
        .map_err(|e| format!("kubectl (on every machine of this kind): {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "kubectl {args:?}: {}\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Not for secrets that matter: token names for a test server.
fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}
