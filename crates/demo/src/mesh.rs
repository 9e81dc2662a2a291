//! Starting the demo mesh as separate processes of the `hypha` binary: the control plane on
//! the generated config, then per workload its app (`hypha demo-app`) and its sidecar
//! (`hypha proxy`), then the traffic client's sidecar; each waited for (TCP for the control
//! plane and the apps, the admin `/ready` for sidecars), then one page through the whole mesh.
//! A process that lost a port picked up front to someone else is restarted on new ports (for a
//! sidecar's inbound port that means rewriting its WorkloadEntry; the control plane watches).
//! With `--pods` ([`crate::pods`]) every process but the control plane runs in its pod, on
//! fixed ports there, the apps with no proxy settings.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue};
use tokio::net::TcpStream;

use crate::client::{self, ProxyClient, Reach};
use crate::hsm;
use crate::pods::Pods;
use crate::process::Proc;
use crate::topology::{
    host, Plan, Planned, CLIENT, GUEST, GUEST_NAMESPACE, NAMESPACE, SERVICE_PORT,
};
use crate::{config, DemoError, Keys, Placement, Progress};

/// How long a process may take to be ready (debug builds on a busy machine included).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// The traffic client's service account.
const CLIENT_SERVICE_ACCOUNT: &str = "default";
/// How often a process is restarted on new ports before giving up.
const ATTEMPTS: usize = 3;
/// The control plane's name among the processes that get a token.
const CONTROL: &str = "control";
/// What a demo app logs once it listens (its readiness in a pod, where the node cannot
/// connect to it: the capture hands such connections to the sidecar).
const APP_SERVING: &str = "demo app serving";
/// The sidecars' capture ports in a pod (Istio's).
const CAPTURE_OUTBOUND: u16 = 15001;
const CAPTURE_INBOUND: u16 = 15006;

/// The running mesh. Dropping it kills every process.
pub struct Mesh {
    pub plan: Plan,
    /// Config (`config/`) and logs (`logs/`).
    pub dir: PathBuf,
    /// Where the private keys live.
    pub keys: Keys,
    /// With `--keys pkcs11`: each process's own token, by process (`control`, workload names,
    /// the client sidecars).
    tokens: BTreeMap<String, hsm::Token>,
    // Dropped (killed) in this order: traffic first, control plane last.
    client: Option<Proc>,
    guest: Option<Proc>,
    workloads: Vec<(Proc, Proc)>,
    control: Option<Proc>,
    /// With `--pods`: the node, the pods and the bypass, removed after every process is gone.
    pub pods: Option<Pods>,
    /// With `--kubernetes`: the cluster (its API server stops after every process is gone).
    pub cluster: Option<crate::kubernetes::Cluster>,
    /// With `--kubernetes`: each workload's pod and the service-account token file its
    /// sidecar starts with, by workload name.
    pod_tokens: BTreeMap<String, (String, PathBuf)>,
    /// Every signer's `maxCertificateTtl`, when shorter than the example's (`--rotate-root`).
    certificate_ttl: Option<String>,
}

impl Mesh {
    pub fn config_dir(&self) -> PathBuf {
        self.dir.join("config")
    }

    pub fn log_dir(&self) -> PathBuf {
        self.dir.join("logs")
    }

    /// The CA's data directory (signer keys, `root-cert.pem`).
    pub fn ca_dir(&self) -> PathBuf {
        self.dir.join("ca")
    }

    /// With `--keys pkcs11`: the SoftHSM2 tokens, their configs and PIN files.
    pub fn hsm_dir(&self) -> PathBuf {
        self.dir.join("hsm")
    }

    /// A process's token and the environment that shows it that token (none without one).
    fn token_env(&self, name: &str) -> Vec<(String, PathBuf)> {
        self.tokens
            .get(name)
            .map(hsm::Token::env)
            .unwrap_or_default()
    }

    /// The control plane's token, which holds every CA signer's key.
    pub fn ca_token(&self) -> Option<&hsm::Token> {
        self.tokens.get(CONTROL)
    }

    /// Writes the config (from files) and validates it.
    fn write_config(&self) -> Result<hypha_config::Config, DemoError> {
        let cfg = config::write(&self.config_dir(), &self.plan, self.ca_token())?;
        match &self.certificate_ttl {
            Some(ttl) => config::set_certificate_ttl(&self.config_dir(), ttl),
            None => Ok(cfg),
        }
    }

    /// Makes a token for every process (`--keys pkcs11`).
    async fn create_tokens(&mut self, say: &Progress) -> Result<(), DemoError> {
        let mut names: Vec<String> = vec![CONTROL.to_owned()];
        names.extend(
            self.plan
                .workloads
                .iter()
                .map(|w| w.workload.name.to_owned()),
        );
        names.extend([CLIENT.to_owned(), GUEST.to_owned()]);
        let dir = self.hsm_dir();
        let started = Instant::now();
        let made = {
            let (dir, names) = (dir.clone(), names.clone());
            tokio::task::spawn_blocking(move || {
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                hsm::create(&dir, &names)
            })
            .await
            .map_err(|e| DemoError::Token {
                label: "(all)".into(),
                reason: e.to_string(),
            })??
        };
        say(&format!(
            "keys: {} SoftHSM2 tokens created in {} ({} ms), one per process: the CA's signer \
             keys and each sidecar's workload key are generated inside and never leave; PINs \
             in 0600 files, never printed",
            made.len(),
            dir.display(),
            started.elapsed().as_millis()
        ));
        self.tokens = names.into_iter().zip(made).collect();
        Ok(())
    }

    /// Join tokens, one per service account (`<namespace>.<service account>.token`).
    pub fn token_dir(&self) -> PathBuf {
        self.dir.join("tokens")
    }

    fn token(&self, namespace: &str, service_account: &str) -> PathBuf {
        self.token_dir()
            .join(format!("{namespace}.{service_account}.token"))
    }

    /// Writes a random join token (0600) for every service account of the mesh: what an
    /// operator hands each workload for its first certificate.
    fn write_tokens(&self) -> Result<(), DemoError> {
        use std::os::unix::fs::PermissionsExt;
        let dir = self.token_dir();
        std::fs::create_dir_all(&dir).map_err(|e| DemoError::Io(dir.clone(), e))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| DemoError::Io(dir.clone(), e))?;
        // On the cluster the workloads have their pods' service-account tokens instead: only
        // the clients, outside it, get join tokens.
        let mut accounts: Vec<(&str, &str)> = self
            .plan
            .workloads
            .iter()
            .filter(|_| self.cluster.is_none())
            .map(|w| (NAMESPACE, w.workload.service_account))
            .collect();
        accounts.push((NAMESPACE, CLIENT_SERVICE_ACCOUNT));
        accounts.push((GUEST_NAMESPACE, CLIENT_SERVICE_ACCOUNT));
        accounts.sort_unstable();
        accounts.dedup();
        for (ns, sa) in accounts {
            write_secret(&self.token(ns, sa), &random_hex(24)?)?;
        }
        Ok(())
    }

    /// The flags that give a sidecar its identity: the CA's root, its join token, TLS to
    /// the control plane.
    fn identity_args(&self, namespace: &str, service_account: &str) -> Vec<String> {
        let token = self.token(namespace, service_account);
        self.credential_args(("--join-token", &token), service_account)
    }

    /// A pod's sidecar's identity flags: its service-account token instead of a join token.
    fn pod_identity_args(&self, w: &Planned, token: &Path) -> Vec<String> {
        let sa = w.workload.service_account;
        self.credential_args(("--service-account-token", token), sa)
    }

    /// The CA's root, the credential (`flag file`), the service account, TLS to the control
    /// plane.
    fn credential_args(&self, (flag, file): (&str, &Path), service_account: &str) -> Vec<String> {
        vec![
            "--control-plane".into(),
            self.control_url(),
            "--ca-root".into(),
            self.ca_dir().join("root-cert.pem").display().to_string(),
            flag.into(),
            file.display().to_string(),
            "--service-account".into(),
            service_account.into(),
        ]
    }

    /// With `--kubernetes`: finds workload `i`'s pod (the one of its current Deployment) and
    /// writes the token the kubelet would mount for its sidecar.
    async fn pod_token(&mut self, i: usize) -> Result<(), DemoError> {
        let Some(cluster) = &self.cluster else {
            return Ok(());
        };
        let w = &self.plan.workloads[i];
        let pod = cluster.pod(w).await?;
        let path = self.token_dir().join(format!("{}.istio-token", pod.0));
        cluster.write_token(&w.workload, &pod, &path)?;
        self.pod_tokens
            .insert(w.workload.name.to_owned(), (pod.0, path));
        Ok(())
    }

    /// The flags that put a sidecar's workload key in its token, or its RSA operations in
    /// the multi-buffer batcher (none for a software key).
    fn key_args(&self, name: &str) -> Vec<String> {
        if self.keys == Keys::Cryptomb && name != CONTROL {
            return vec![
                "--key".into(),
                "rsa-2048".into(),
                "--proxy-config".into(),
                self.cryptomb_config().display().to_string(),
            ];
        }
        self.tokens
            .get(name)
            .map(hsm::Token::proxy_args)
            .unwrap_or_default()
    }

    /// The sidecars' `ProxyConfig` with `--keys cryptomb`.
    fn cryptomb_config(&self) -> PathBuf {
        self.dir.join("cryptomb.yaml")
    }

    /// Every sidecar's admin address, by workload name (the client last).
    pub fn admins(&self) -> Vec<(String, Reach)> {
        let mut out: Vec<(String, Reach)> = self
            .plan
            .workloads
            .iter()
            .map(|w| {
                let name = w.workload.name;
                (name.to_owned(), self.plan.reach(name, w.ports.admin))
            })
            .collect();
        out.push((
            CLIENT.to_owned(),
            self.plan.reach(CLIENT, self.plan.client_admin),
        ));
        out.push((
            GUEST.to_owned(),
            self.plan.reach(GUEST, self.plan.guest_admin),
        ));
        out
    }

    /// Starts everything and waits until a page goes through the whole mesh.
    pub async fn start(
        exe: &Path,
        dir: PathBuf,
        keys: Keys,
        placement: Placement,
        kubernetes: bool,
        certificate_ttl: Option<&str>,
        say: &Progress,
    ) -> Result<Mesh, DemoError> {
        if kubernetes && placement != Placement::Loopback {
            return Err(DemoError::Kubernetes(
                "--kubernetes runs on loopback; with --pods it is not done yet".into(),
            ));
        }
        let pods = match placement {
            Placement::Loopback => None,
            Placement::Pods => Some(Pods::create(false, say)?),
            Placement::PodsWithBypass => Some(Pods::create(true, say)?),
        };
        let plan = match &pods {
            None => Plan::allocate().map_err(DemoError::Ports)?,
            Some(p) => {
                let control = std::net::TcpListener::bind((p.node_ipv4(), 0))
                    .and_then(|l| l.local_addr())
                    .map_err(DemoError::Ports)?;
                Plan::in_pods(control, p.addrs())
            }
        };
        let mut mesh = Mesh {
            plan,
            dir,
            keys,
            tokens: BTreeMap::new(),
            client: None,
            guest: None,
            workloads: Vec::new(),
            control: None,
            pods,
            cluster: None,
            pod_tokens: BTreeMap::new(),
            certificate_ttl: certificate_ttl.map(str::to_owned),
        };
        std::fs::create_dir_all(mesh.log_dir()).map_err(|e| DemoError::Io(mesh.log_dir(), e))?;
        if keys == Keys::Pkcs11 {
            mesh.create_tokens(say).await?;
        }
        if keys == Keys::Cryptomb {
            // A short poll delay: the demo's traffic is light; fallback so that a CPU without
            // AVX-512 IFMA runs the demo too (its sidecars then say "software RSA-2048").
            let path = mesh.cryptomb_config();
            std::fs::write(
                &path,
                "privateKeyProvider:\n  cryptomb:\n    pollDelay: 2ms\n    fallback: true\n",
            )
            .map_err(|e| DemoError::Io(path.clone(), e))?;
            say(
                "keys: sidecars use RSA-2048, signed in batches of 8 (privateKeyProvider.cryptomb)",
            );
        }
        let cfg = if kubernetes {
            let mut mesh_cfg = config::write_mesh_only(&mesh.config_dir(), mesh.ca_token())?;
            if let Some(ttl) = &mesh.certificate_ttl {
                mesh_cfg = config::set_certificate_ttl(&mesh.config_dir(), ttl)?;
            }
            let cluster =
                crate::kubernetes::Cluster::start(&mesh.plan, &mesh.dir.join("kube")).await?;
            say(&format!(
                "kubernetes: test API server at {}; applied with kubectl (files in {}): the \
                 control plane's RBAC, Istio's CRDs, bookinfo's Namespace, ServiceAccounts, \
                 Services and Deployments, and its routing, destinations and security",
                cluster.api.url(),
                mesh.dir.join("kube").display()
            ));
            say(&format!(
                "config: the mesh config from a file ({} tenants), everything else from the \
                 cluster; workloads on loopback ({})",
                mesh_cfg.mesh.tenants.len(),
                families(&mesh.plan)
            ));
            mesh.cluster = Some(cluster);
            mesh_cfg
        } else {
            let cfg = mesh.write_config()?;
            say(&format!(
                "config: {} resources from examples/bookinfo, workloads {} ({}), valid",
                cfg.resource_count(),
                if mesh.plan.has_pods() {
                    "in their pods"
                } else {
                    "on loopback"
                },
                families(&mesh.plan)
            ));
            cfg
        };
        mesh.write_tokens()?;
        let log_dir = mesh.log_dir();
        if let Some(pods) = &mut mesh.pods {
            pods.write_hosts(&cfg)?;
            say("pods: each pod's /etc/hosts names the services' VIPs, as cluster DNS would");
            // Before any process of a pod exists: sockets from before the attach are never
            // bypassed.
            pods.start_bypass(exe, &log_dir, say).await?;
        }
        mesh.start_control(exe, say).await?;
        mesh.start_workloads(exe, say).await?;
        mesh.start_client(exe, say).await?;
        mesh.wait_for_traffic(say).await?;
        Ok(mesh)
    }

    async fn start_control(&mut self, exe: &Path, say: &Progress) -> Result<(), DemoError> {
        for attempt in 1..=ATTEMPTS {
            let args = vec![
                "control".into(),
                "--config".into(),
                self.config_dir().display().to_string(),
                "--listen-tls".into(),
                self.plan.control.to_string(),
                "--data-dir".into(),
                self.ca_dir().display().to_string(),
                "--join-tokens".into(),
                self.token_dir().display().to_string(),
            ]
            .into_iter()
            // The cluster as its source too, with the control plane's own account.
            .chain(self.cluster.iter().flat_map(|c| {
                [
                    "--kubernetes".to_owned(),
                    "--kubeconfig".to_owned(),
                    c.control_kubeconfig.display().to_string(),
                ]
            }))
            // Its own serving key in its token too (the same flags as a sidecar's).
            .chain(self.key_args(CONTROL))
            .collect::<Vec<String>>();
            let log = self.log_dir().join("control.log");
            let mut p =
                Proc::spawn_with_env("control plane", exe, &args, &self.token_env(CONTROL), &log)?;
            say(&format!(
                "started control plane         pid {:<7} xDS and CA over TLS on {}",
                p.pid(),
                self.plan.control
            ));
            let started = Instant::now();
            let addr = self.plan.control;
            match wait(&mut [&mut p], |_| connects(addr)).await {
                Ok(()) => {
                    say(&ready_line("control plane", started));
                    self.control = Some(p);
                    return Ok(());
                }
                // (In pods its port on the node's bridge address is not contested.)
                Err(e) if attempt < ATTEMPTS && p.lost_a_port() && !self.plan.has_pods() => {
                    say(&format!(
                        "control plane lost its port ({e}); trying other ports"
                    ));
                    self.plan.reallocate_control().map_err(DemoError::Ports)?;
                }
                Err(e) => return Err(e),
            }
        }
        unreachable!("the last attempt returns")
    }

    fn control_url(&self) -> String {
        format!("https://{}", self.plan.control)
    }

    fn spawn_workload(
        &self,
        exe: &Path,
        w: &Planned,
        say: &Progress,
    ) -> Result<(Proc, Proc), DemoError> {
        let name = w.workload.name;
        let mut app_args = vec![
            "demo-app".into(),
            "--role".into(),
            w.workload.role.to_string(),
            "--listen".into(),
            w.ports.app.to_string(),
        ];
        if let Some(proxy) = w.ports.http_proxy {
            app_args.extend(["--proxy".into(), proxy.to_string()]);
        }
        let app = Proc::spawn_command(
            &format!("{name} app"),
            self.command(name, exe, false, &app_args),
            &[],
            &self.log_dir().join(format!("{name}.app.log")),
        )?;
        say(&format!(
            "started {:<21} pid {:<7} {} on {}",
            format!("{name} app"),
            app.pid(),
            w.workload.role,
            w.ports.app
        ));
        let mut args: Vec<String> = vec!["proxy".into()];
        // On the cluster: its pod's name and service-account token, nothing else.
        match self.pod_tokens.get(name) {
            Some((pod, token)) => {
                args.extend(self.pod_identity_args(w, token));
                args.extend(["--pod".into(), pod.clone()]);
            }
            None => args.extend(self.identity_args(NAMESPACE, w.workload.service_account)),
        }
        args.extend([
            "--namespace".into(),
            NAMESPACE.into(),
            "--workload".into(),
            name.into(),
            "--label".into(),
            format!("app={}", w.workload.app),
            "--label".into(),
            format!("version={}", w.workload.version),
        ]);
        for ip in w.ips() {
            args.extend(["--ip".into(), ip.to_string()]);
        }
        let ways = match (w.ports.http_proxy, &w.pod) {
            (Some(proxy), _) => {
                args.extend(["--http-proxy".into(), proxy.to_string()]);
                for addr in w.inbound() {
                    args.extend(["--inbound".into(), addr.to_string()]);
                }
                args.extend(["--app".into(), w.ports.app.to_string()]);
                let inbound: Vec<String> = w.inbound().iter().map(ToString::to_string).collect();
                format!("inbound {}, proxy {proxy}", inbound.join(" "))
            }
            (None, pod) => {
                args.extend(capture_args());
                let place = pod.as_ref().map_or("", |p| p.netns.as_str());
                format!("in pod {place}, captured")
            }
        };
        args.extend(["--admin".into(), w.ports.admin.to_string()]);
        args.extend(self.key_args(name));
        let sidecar = Proc::spawn_command(
            &format!("{name} sidecar"),
            self.command(name, exe, true, &args),
            &self.token_env(name),
            &self.log_dir().join(format!("{name}.sidecar.log")),
        )?;
        say(&format!(
            "started {:<21} pid {:<7} {ways}, admin {}",
            format!("{name} sidecar"),
            sidecar.pid(),
            w.ports.admin
        ));
        Ok((app, sidecar))
    }

    /// `exe args` for process `name`: in its pod with `--pods` (as its sidecar with the group
    /// id the capture exempts if `sidecar`), else as it is.
    fn command(&self, name: &str, exe: &Path, sidecar: bool, args: &[String]) -> Command {
        let mut cmd = match &self.pods {
            Some(pods) if sidecar => pods.pod(name).sidecar_command(exe),
            Some(pods) => pods.pod(name).command(exe),
            None => Command::new(exe),
        };
        cmd.args(args);
        cmd
    }

    async fn start_workloads(&mut self, exe: &Path, say: &Progress) -> Result<(), DemoError> {
        // Start them all, then wait for each: they come up in parallel.
        let started = Instant::now();
        if self.cluster.is_some() {
            for i in 0..self.plan.workloads.len() {
                self.pod_token(i).await?;
            }
            say(&format!(
                "pods: {} made by the Deployment controller; each sidecar gets its pod's name and \
                 a projected service-account token (audience istio-ca, bound to the pod), which \
                 the CA checks with TokenReview",
                self.pod_tokens.len()
            ));
        }
        let mut pairs = Vec::new();
        for w in &self.plan.workloads {
            pairs.push(self.spawn_workload(exe, w, say)?);
        }
        for (i, (mut app, mut sidecar)) in pairs.into_iter().enumerate() {
            let mut attempt = 1;
            loop {
                let w = &self.plan.workloads[i];
                let (app_addr, admin) =
                    (w.ports.app, self.plan.reach(w.workload.name, w.ports.admin));
                let in_pod = w.pod.is_some();
                let r = wait(&mut [&mut app, &mut sidecar], |procs| {
                    // In a pod the app's own log says it listens (see APP_SERVING).
                    let app_logged = procs[0].logged(APP_SERVING);
                    let admin = admin.clone();
                    async move {
                        let app_up = if in_pod {
                            app_logged
                        } else {
                            connects(app_addr).await
                        };
                        app_up && sidecar_ready(&admin).await
                    }
                })
                .await;
                match r {
                    Ok(()) => break,
                    Err(_)
                        if !in_pod
                            && attempt < ATTEMPTS
                            && (app.lost_a_port() || sidecar.lost_a_port()) =>
                    {
                        let name = w.workload.name;
                        say(&format!(
                            "{name}: a port was taken meanwhile; trying others"
                        ));
                        drop((app, sidecar));
                        self.plan.reallocate(i).map_err(DemoError::Ports)?;
                        match &self.cluster {
                            // A new container port: the Deployment's pod is replaced.
                            Some(cluster) => {
                                cluster.apply_workloads(&self.plan).await?;
                                self.pod_token(i).await?;
                            }
                            None => {
                                self.write_config()?;
                            }
                        }
                        (app, sidecar) = self.spawn_workload(exe, &self.plan.workloads[i], say)?;
                        attempt += 1;
                    }
                    Err(e) => return Err(e),
                }
            }
            say(&ready_line(
                &format!("{} app and sidecar", self.plan.workloads[i].workload.name),
                started,
            ));
            self.workloads.push((app, sidecar));
        }
        Ok(())
    }

    /// The traffic client's sidecar, then the guest's (another tenant).
    async fn start_client(&mut self, exe: &Path, say: &Progress) -> Result<(), DemoError> {
        for attempt in 1..=ATTEMPTS {
            match self.start_clients(exe, say).await {
                Ok((client, guest)) => {
                    self.client = Some(client);
                    self.guest = Some(guest);
                    return Ok(());
                }
                Err((e, true)) if attempt < ATTEMPTS && !self.plan.has_pods() => {
                    say(&format!(
                        "client sidecars: a port was taken meanwhile ({e}); trying others"
                    ));
                    self.plan.reallocate_client().map_err(DemoError::Ports)?;
                }
                Err((e, _)) => return Err(e),
            }
        }
        unreachable!("the last attempt returns")
    }

    /// Both client sidecars; an error says whether one lost a port.
    async fn start_clients(
        &self,
        exe: &Path,
        say: &Progress,
    ) -> Result<(Proc, Proc), (DemoError, bool)> {
        let client = self
            .client_sidecar(
                exe,
                say,
                CLIENT,
                NAMESPACE,
                (self.plan.client_proxy, self.plan.client_admin),
                "the traffic goes in here",
            )
            .await?;
        let guest = self
            .client_sidecar(
                exe,
                say,
                GUEST,
                GUEST_NAMESPACE,
                (self.plan.guest_proxy, self.plan.guest_admin),
                "another tenant, to show what it cannot reach",
            )
            .await?;
        Ok((client, guest))
    }

    async fn client_sidecar(
        &self,
        exe: &Path,
        say: &Progress,
        name: &str,
        namespace: &str,
        (proxy, admin): (SocketAddr, SocketAddr),
        role: &str,
    ) -> Result<Proc, (DemoError, bool)> {
        let mut args: Vec<String> = vec!["proxy".into()];
        args.extend(self.identity_args(namespace, CLIENT_SERVICE_ACCOUNT));
        args.extend([
            "--namespace".into(),
            namespace.into(),
            "--workload".into(),
            name.into(),
            "--label".into(),
            format!("app={name}"),
            "--label".into(),
            "version=v1".into(),
            "--http-proxy".into(),
            proxy.to_string(),
            "--admin".into(),
            admin.to_string(),
        ]);
        if let Some(pod) = self.plan.pods.get(name) {
            // What else runs in its pod (curl, say) is captured to it too.
            args.extend(["--ip".into(), pod.ipv4.to_string()]);
            args.extend(["--ip".into(), pod.ipv6.to_string()]);
            args.extend(capture_args());
        }
        args.extend(self.key_args(name));
        let log = self.log_dir().join(format!("{name}.sidecar.log"));
        let mut p = Proc::spawn_command(
            &format!("{name} sidecar"),
            self.command(name, exe, true, &args),
            &self.token_env(name),
            &log,
        )
        .map_err(|e| (e, false))?;
        say(&format!(
            "started {:<21} pid {:<7} proxy {proxy}, admin {admin} ({role})",
            format!("{name} sidecar"),
            p.pid(),
        ));
        let started = Instant::now();
        let admin = self.plan.reach(name, admin);
        match wait(&mut [&mut p], |_| {
            let admin = admin.clone();
            async move { sidecar_ready(&admin).await }
        })
        .await
        {
            Ok(()) => {
                say(&ready_line(&format!("{name} sidecar"), started));
                Ok(p)
            }
            Err(e) => {
                let lost = p.lost_a_port();
                Err((e, lost))
            }
        }
    }

    /// The URL of a productpage path, as the client asks for it.
    pub fn productpage_url(path: &str) -> String {
        format!("http://{}:{SERVICE_PORT}{path}", host("productpage"))
    }

    /// Waits until productpage answers 200 through the mesh, for jason and for anyone.
    async fn wait_for_traffic(&mut self, say: &Progress) -> Result<(), DemoError> {
        let started = Instant::now();
        let client = ProxyClient::new(
            self.plan.reach(CLIENT, self.plan.client_proxy),
            Duration::from_secs(5),
        );
        let url = Mesh::productpage_url("/productpage");
        let mut jason = HeaderMap::new();
        jason.insert("end-user", HeaderValue::from_static("jason"));
        let mut last = String::new();
        while started.elapsed() < READY_TIMEOUT {
            self.check_alive()?;
            let mut ok = true;
            for headers in [&jason, &HeaderMap::new()] {
                match client.get(&url, headers).await {
                    Ok(r) if r.status.is_success() => {}
                    Ok(r) => {
                        ok = false;
                        last = format!("{}: {}", r.status, r.text().trim());
                    }
                    Err(e) => {
                        ok = false;
                        last = e.to_string();
                    }
                }
            }
            if ok {
                say(&format!(
                    "mesh ready: productpage answers through the {CLIENT} sidecar ({} ms)",
                    started.elapsed().as_millis()
                ));
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(DemoError::NoTraffic {
            waited: READY_TIMEOUT,
            last,
            logs: self.log_dir(),
        })
    }

    /// An error if any process has exited.
    pub fn check_alive(&mut self) -> Result<(), DemoError> {
        let all = self
            .control
            .iter_mut()
            .chain(self.workloads.iter_mut().flat_map(|(a, s)| [a, s]))
            .chain(self.client.iter_mut())
            .chain(self.guest.iter_mut());
        for p in all {
            if let Some(status) = p.exited() {
                return Err(p.exit_error(status));
            }
        }
        self.pods.as_mut().map_or(Ok(()), Pods::check_alive)
    }
}

/// The address families the workloads have here.
fn families(plan: &Plan) -> &'static str {
    if plan.ipv6 {
        "IPv4 and IPv6"
    } else {
        "IPv4 only: ::1 is not available here"
    }
}

/// A sidecar's flags for transparent capture in its pod.
fn capture_args() -> [String; 4] {
    [
        "--capture-outbound".into(),
        CAPTURE_OUTBOUND.to_string(),
        "--capture-inbound".into(),
        CAPTURE_INBOUND.to_string(),
    ]
}

/// `bytes` random bytes from the system, in hex.
pub(crate) fn random_hex(bytes: usize) -> Result<String, DemoError> {
    use std::io::Read;
    let mut raw = vec![0u8; bytes];
    let urandom = Path::new("/dev/urandom");
    std::fs::File::open(urandom)
        .and_then(|mut f| f.read_exact(&mut raw))
        .map_err(|e| DemoError::Io(urandom.into(), e))?;
    Ok(raw.iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes a new file readable by its owner only (0600 from the start, never wider).
pub(crate) fn write_secret(path: &Path, secret: &str) -> Result<(), DemoError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, secret.as_bytes()))
        .map_err(|e| DemoError::Io(path.to_path_buf(), e))
}

fn ready_line(what: &str, since: Instant) -> String {
    format!("ready   {what:<21} ({} ms)", since.elapsed().as_millis())
}

/// Polls `ready` (which may look at `procs`) until it says yes; an error as soon as one of
/// `procs` exits, or after [`READY_TIMEOUT`].
async fn wait<F, Fut>(procs: &mut [&mut Proc], mut ready: F) -> Result<(), DemoError>
where
    F: FnMut(&[&mut Proc]) -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        for p in procs.iter_mut() {
            if let Some(status) = p.exited() {
                return Err(p.exit_error(status));
            }
        }
        if ready(&*procs).await {
            return Ok(());
        }
        if Instant::now() > deadline {
            let p = &procs[procs.len() - 1];
            return Err(DemoError::NotReady {
                name: p.name.clone(),
                waited: READY_TIMEOUT,
                log: p.log.clone(),
                tail: p.tail(15),
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn connects(addr: SocketAddr) -> bool {
    TcpStream::connect(addr).await.is_ok()
}

async fn sidecar_ready(admin: &Reach) -> bool {
    client::get_at(admin, "/ready", Duration::from_secs(2))
        .await
        .is_ok_and(|r| r.status.is_success())
}
