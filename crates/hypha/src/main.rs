//! `hypha`: the one binary. Parses the command line and hands over to the library crates.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "hypha",
    version,
    about = "Hypha service mesh: control plane and sidecar proxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a directory (or file) of Istio YAML, like `istioctl analyze`; with
    /// --kubernetes, the cluster's Istio config as the control plane would serve it (with the
    /// directory's, if given).
    Check {
        /// Directory or file to check.
        #[arg(required_unless_present = "kubernetes")]
        path: Option<PathBuf>,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = Output::Human)]
        output: Output,
        /// Check the cluster of --kubeconfig (else KUBECONFIG, or in-cluster).
        #[arg(long)]
        kubernetes: bool,
        #[arg(long, requires = "kubernetes")]
        kubeconfig: Option<PathBuf>,
    },
    /// Run the control plane: watch a config directory and serve Envoy xDS over ADS.
    Control(Box<ControlArgs>),
    /// The mesh CA, offline.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Run a sidecar proxy: delta ADS from the control plane, the app's outbound traffic
    /// (HTTP proxy mode or a local port per service port), and inbound traffic to the app.
    Proxy(Box<ProxyArgs>),
    /// Run bookinfo on this machine: the control plane, each app behind its own sidecar and a
    /// client sidecar as separate processes on loopback (no root), or in pods with their
    /// traffic captured (--pods, root); drive traffic and print what the mesh did.
    Demo {
        /// Keep the mesh running after the traffic, with URLs to try, until Ctrl-C.
        #[arg(long)]
        serve: bool,
        /// Page views of productpage to send (a third as `end-user: jason`).
        #[arg(long, default_value_t = 300)]
        requests: usize,
        /// Requests in flight at once.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Where private keys live: software (in memory; the CA's in 0600 files), pkcs11 (the
        /// CA's signer keys and every sidecar's key generated in a SoftHSM2 token per process,
        /// never leaving it) or cryptomb (software, the sidecars' RSA-2048 signatures computed
        /// eight at a time with AVX-512 IFMA).
        #[arg(long, default_value = "software", value_parser = |s: &str| s.parse::<hypha_demo::Keys>())]
        keys: hypha_demo::Keys,
        /// Root: each workload and client in a pod of its own (network namespace on a bridge,
        /// IPv4 and IPv6) with Istio's transparent capture, the apps unmodified, and the eBPF
        /// bypass attached with every pod registered.
        #[arg(long)]
        pods: bool,
        /// With --pods: iptables capture only, no eBPF bypass.
        #[arg(long, requires = "pods")]
        no_bypass: bool,
        /// Bookinfo on Kubernetes: a test API server in the demo's process, bookinfo's
        /// Services, ServiceAccounts, Deployments and Istio config applied with kubectl, the
        /// control plane reading the cluster, each sidecar starting with nothing but its pod's
        /// service-account token.
        #[arg(long, conflicts_with = "pods")]
        kubernetes: bool,
        /// After the traffic, rotate this tenant's root (`hypha ca rotate`) while page views
        /// keep flowing, and show each phase and what the traffic saw. Certificates live 20 s
        /// in this mode, so the old root retires within a minute.
        #[arg(long, value_name = "TENANT")]
        rotate_root: Option<String>,
    },
    /// The node agent for the same-host TCP/IP bypass (root): attach the eBPF sockops +
    /// sk_msg programs to a cgroup v2, serve their counters on /metrics, detach on SIGINT or
    /// SIGTERM. Connections established afterwards between two sockets of the cgroup skip the
    /// TCP/IP stack.
    Bypass {
        /// The cgroup v2 directory (e.g. /sys/fs/cgroup, or /sys/fs/cgroup/unified on a hybrid
        /// system, for every process on the machine).
        #[arg(long)]
        cgroup: PathBuf,
        /// Where to serve the counters (`GET /metrics`, Prometheus text).
        #[arg(long, default_value = "127.0.0.1:15092")]
        metrics: SocketAddr,
        /// A pod (network namespace name, or path) whose TCP connections are captured when
        /// they are made (app → its sidecar's 15001, sidecar → another such pod's 15006), so
        /// captured connections are bypassed too; its iptables rules stay for the rest.
        /// Repeat for each pod; the exclusions below must be the ones its capture has.
        #[arg(long = "pod", value_name = "NETNS")]
        pods: Vec<String>,
        /// A destination port the pods' apps reach directly (repeatable, at most 8).
        #[arg(long)]
        exclude_outbound_port: Vec<u16>,
        /// A port of the pods reached directly (repeatable, at most 8).
        #[arg(long)]
        exclude_inbound_port: Vec<u16>,
        /// A destination range the pods' apps reach directly, e.g. 10.0.0.0/8 (repeatable, at
        /// most 8).
        #[arg(long, value_parser = |s: &str| s.parse::<hypha_bypass::IpRange>())]
        exclude_outbound_cidr: Vec<hypha_bypass::IpRange>,
        /// On Kubernetes (the node agent DaemonSet): watch the pods of --node and register
        /// each injected pod while it runs, with its own capture's exclusions.
        #[arg(long, requires = "node")]
        kubernetes: bool,
        /// This node's name (the DaemonSet gives `spec.nodeName` as NODE_NAME).
        #[arg(long, env = "NODE_NAME")]
        node: Option<String>,
        /// The kubeconfig for --kubernetes (else KUBECONFIG, or in-cluster).
        #[arg(long, requires = "kubernetes")]
        kubeconfig: Option<PathBuf>,
    },
    /// Transparent capture in this network namespace, as Istio's init container sets it up
    /// (a pod's init container with NET_ADMIN and NET_RAW; root): the TCP the app opens goes
    /// to the sidecar's outbound port, TCP arriving goes to its inbound port, the sidecar's
    /// own connections (its group id) are left alone. The lists take the values of Istio's
    /// `traffic.sidecar.istio.io/*` annotations: comma-separated, `*` for all.
    Capture {
        /// The sidecar's `--capture-outbound` port.
        #[arg(long, default_value_t = 15001)]
        outbound_port: u16,
        /// The sidecar's `--capture-inbound` port.
        #[arg(long, default_value_t = 15006)]
        inbound_port: u16,
        /// The sidecar's group id, whose connections are not captured.
        #[arg(long, default_value_t = hypha_pod::PROXY_GID)]
        proxy_gid: u32,
        /// `includeOutboundIPRanges`: the destination CIDRs captured.
        #[arg(long, default_value = "*")]
        include_outbound_ip_ranges: String,
        /// `excludeOutboundIPRanges`: destination CIDRs never captured.
        #[arg(long, default_value = "")]
        exclude_outbound_ip_ranges: String,
        /// `excludeOutboundPorts`: destination ports never captured.
        #[arg(long, default_value = "")]
        exclude_outbound_ports: String,
        /// `includeInboundPorts`: the inbound ports captured (empty: none).
        #[arg(long, default_value = "*")]
        include_inbound_ports: String,
        /// `excludeInboundPorts`: inbound ports never captured.
        #[arg(long, default_value = "")]
        exclude_inbound_ports: String,
    },
    /// Pods on this machine (root): network namespaces on a bridge with an IPv4 and an IPv6
    /// address each, optionally with Istio's transparent capture. Run the app with
    /// `ip netns exec <netns> ...` and its sidecar the same way with group id 1337 and
    /// `hypha proxy --capture-outbound 15001 --capture-inbound 15006`.
    #[command(subcommand)]
    Pod(PodCommand),
    /// Add the sidecar to the workloads of a YAML file, offline, as the injection webhook
    /// does (`istioctl kube-inject`): Pods, Deployments, StatefulSets, DaemonSets, Jobs,
    /// CronJobs; everything else passes through. The output goes to `kubectl apply -f -`.
    Inject {
        /// The YAML to inject (`-`: standard input).
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// Where to write the result (default: standard output).
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
        /// The mesh's config (a directory or file with its MeshConfig): root namespace and
        /// trust domain (default: Hypha's defaults).
        #[arg(long)]
        mesh_config: Option<PathBuf>,
        #[command(flatten)]
        settings: InjectArgs,
    },
    /// Print the manifests that install Hypha on a Kubernetes cluster (the same as
    /// `kubectl apply -k manifests/base`), or apply them: the Istio CRDs, the hypha-system
    /// namespace, RBAC, the control plane (2 replicas, xDS and CA on 15012, the injection
    /// webhook), the MutatingWebhookConfiguration and the node agent.
    Install {
        #[command(flatten)]
        target: InstallArgs,
        /// Apply them with kubectl instead of printing them.
        #[arg(long)]
        apply: bool,
        /// Leave out the CRDs (Istio's and Hypha's issuers': a cluster that has Istio's keeps
        /// their schemas).
        #[arg(long)]
        skip_crds: bool,
    },
    /// Remove what `hypha install` made: for a revision, its control plane and webhook only;
    /// for the default one everything, the Istio CRDs (and with them every Istio object)
    /// included unless --keep-crds.
    Uninstall {
        #[command(flatten)]
        target: InstallArgs,
        #[arg(long)]
        keep_crds: bool,
        /// Print what would be deleted instead of deleting it.
        #[arg(long)]
        dry_run: bool,
    },
    /// Wait until a sidecar is ready (the classic sidecar's postStart hook for Istio's
    /// `holdApplicationUntilProxyStarts`).
    Wait {
        #[arg(long, default_value = "http://127.0.0.1:15021/healthz/ready")]
        url: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 60)]
        timeout_secs: u64,
    },
    /// One of the demo's sample apps (started by `hypha demo`).
    #[command(hide = true)]
    DemoApp {
        #[arg(long, value_parser = |s: &str| s.parse::<hypha_demo::Role>())]
        role: hypha_demo::Role,
        /// Where to listen.
        #[arg(long)]
        listen: SocketAddr,
        /// The sidecar's HTTP proxy listener, for calls to other services (without: calls go
        /// to the services' names, for a pod whose traffic is captured).
        #[arg(long)]
        proxy: Option<SocketAddr>,
    },
}

/// `hypha install` and `uninstall`: which revision, which image, which cluster.
#[derive(clap::Args)]
struct InstallArgs {
    /// A revision beside the default one (Istio's revision-based upgrade): its own control
    /// plane and webhook, for namespaces labelled `istio.io/rev=<revision>`.
    #[arg(long, default_value = "default")]
    revision: String,
    /// The image (`hypha` with subcommands) every container runs.
    #[arg(long, default_value = hypha_kube::install::BASE_IMAGE)]
    image: String,
    /// The kubeconfig kubectl uses (default: kubectl's).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
}

impl InstallArgs {
    fn install(&self) -> hypha_kube::install::Install {
        hypha_kube::install::Install {
            revision: self.revision.clone(),
            image: self.image.clone(),
        }
    }
}

/// `hypha install` / `hypha uninstall`.
fn install(
    target: &InstallArgs,
    apply: bool,
    skip_crds: bool,
    remove: Option<(bool, bool)>,
) -> anyhow::Result<()> {
    use hypha_kube::install;
    let o = target.install();
    let k = target.kubeconfig.as_deref();
    match remove {
        None => {
            let mut objects = install::objects(&o)?;
            objects.retain(|o| !skip_crds || o["kind"] != "CustomResourceDefinition");
            let yaml = install::yaml(&objects);
            if apply {
                print!("{}", install::kubectl(&yaml, &["apply"], k)?);
            } else {
                print!("{yaml}");
            }
        }
        Some((keep_crds, dry_run)) => {
            let yaml = install::yaml(&install::uninstall_objects(&o, keep_crds)?);
            if dry_run {
                print!("{yaml}");
            } else {
                print!(
                    "{}",
                    install::kubectl(&yaml, &["delete", "--ignore-not-found", "--wait=false"], k)?
                );
            }
        }
    }
    Ok(())
}

/// What every injected pod gets (`hypha inject`, and the webhook of `hypha control`).
#[derive(clap::Args)]
struct InjectArgs {
    /// The image that runs `hypha` (its entrypoint) in the injected containers.
    #[arg(long, default_value = concat!("hypha:", env!("CARGO_PKG_VERSION")))]
    image: String,
    /// The injected containers' imagePullPolicy.
    #[arg(long)]
    image_pull_policy: Option<String>,
    /// The control plane's TLS address, as sidecars reach it.
    #[arg(long, default_value = "https://hypha.hypha-system.svc:15012")]
    injected_control_plane: String,
    /// Classic sidecars (a container beside the app) for clusters before Kubernetes 1.29,
    /// instead of native ones.
    #[arg(long)]
    classic_sidecar: bool,
    /// The revision the injected pods belong to.
    #[arg(long, default_value = "default")]
    revision: String,
    /// A ProxyConfig file over the MeshConfig's `defaultConfig`, under each pod's
    /// `proxy.istio.io/config`.
    #[arg(long)]
    default_proxy_config: Option<PathBuf>,
}

impl InjectArgs {
    /// The settings, for a mesh of `mesh` (its root namespace and trust domain).
    fn settings(&self, mesh: &hypha_config::MeshConfig) -> anyhow::Result<hypha_inject::Settings> {
        // The mesh's defaultConfig, under this file's where it gives one.
        let defaults = match &self.default_proxy_config {
            None => mesh.default_config.clone(),
            Some(path) => hypha_config::proxy::load_proxy_config(path)
                .map_err(|diags| {
                    let lines: Vec<String> = diags.iter().map(ToString::to_string).collect();
                    anyhow::anyhow!("invalid proxy config:\n{}", lines.join("\n"))
                })?
                .over(&mesh.default_config),
        };
        Ok(hypha_inject::Settings {
            image: self.image.clone(),
            image_pull_policy: self.image_pull_policy.clone(),
            control_plane: self.injected_control_plane.clone(),
            root_namespace: mesh.root_namespace.clone(),
            trust_domain: mesh.trust_domain.clone(),
            sidecar: if self.classic_sidecar {
                hypha_inject::SidecarKind::Classic
            } else {
                hypha_inject::SidecarKind::Native
            },
            defaults,
            revision: self.revision.clone(),
        })
    }
}

/// `hypha inject`: the file (or stdin) injected, to `output` (or stdout); skipped objects
/// said on stderr.
fn inject(
    file: &Path,
    output: Option<&Path>,
    mesh: Option<&Path>,
    args: &InjectArgs,
) -> anyhow::Result<()> {
    use std::io::Read;
    let mesh = match mesh {
        Some(dir) => mesh_of(dir)?,
        None => hypha_config::MeshConfig::default(),
    };
    let settings = args.settings(&mesh)?;
    let mut text = String::new();
    if file == Path::new("-") {
        std::io::stdin().read_to_string(&mut text)?;
    } else {
        text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))?;
    }
    let (out, notes) = hypha_inject::manifest::inject_yaml(&text, &settings)
        .with_context(|| format!("cannot inject {}", file.display()))?;
    for n in &notes {
        if let Some(why) = &n.skipped {
            eprintln!("hypha inject: {} left as it is: {why}", n.object);
        }
    }
    match output {
        Some(path) => {
            std::fs::write(path, out).with_context(|| format!("cannot write {}", path.display()))?
        }
        None => print!("{out}"),
    }
    Ok(())
}

#[derive(Subcommand)]
enum PodCommand {
    /// Create pod NAME on node N (its bridge made if missing) and print its namespace and
    /// addresses: `netns=... ipv4=... ipv6=...`.
    Up {
        name: String,
        #[arg(long, default_value_t = 1)]
        node: u8,
        /// Redirect the pod's TCP to its sidecar (outbound 15001, inbound 15006), the
        /// sidecar's own traffic (group id 1337) exempt.
        #[arg(long)]
        capture: bool,
        /// Inbound destination ports left alone; repeatable.
        #[arg(long)]
        exclude_inbound_port: Vec<u16>,
        /// Outbound destination ports left alone; repeatable.
        #[arg(long)]
        exclude_outbound_port: Vec<u16>,
        /// Outbound destination CIDRs left alone; repeatable.
        #[arg(long)]
        exclude_outbound_cidr: Vec<String>,
    },
    /// Remove pod NAME of node N.
    Down {
        name: String,
        #[arg(long, default_value_t = 1)]
        node: u8,
    },
    /// Remove node N: its bridge and every pod on it.
    Clean {
        #[arg(long, default_value_t = 1)]
        node: u8,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Issue a key and certificate for one identity into files (for peers that are not Hypha,
    /// e.g. HAProxy or nginx in a benchmark): key.pem (0600), cert-chain.pem, root-cert.pem.
    Issue {
        #[command(flatten)]
        who: CaIdentity,
        #[arg(long, default_value_t = 24 * 3600)]
        validity_secs: u64,
        /// The key: ecdsa-p256, rsa-2048 or rsa-3072.
        #[arg(long, default_value = "ecdsa-p256", value_parser = |s: &str| s.parse::<hypha_identity::KeyKind>().map_err(|e| e.to_string()))]
        key: hypha_identity::KeyKind,
        /// Where to write the files.
        #[arg(long)]
        out: PathBuf,
    },
    /// Revoke one identity: a running control plane with this data directory reads the deny
    /// list within a second; from then on the identity gets no certificate (by join token or
    /// renewal), its certificates are refused at the control plane and its xDS streams end.
    /// Certificates already issued stay valid for other sidecars until they expire (at most
    /// the signer's maxCertificateTtl): there is no CRL.
    Revoke {
        #[command(flatten)]
        who: CaIdentity,
    },
    /// Rotate a tenant's root without downtime: makes the signer's next key (in its token, or
    /// a key file) and root; a running control plane with this data directory then adds the new
    /// root to every bundle that trusts the old one, moves issuance to it once every proxy has
    /// acknowledged its bundle, and drops the old root once the last certificate it signed has
    /// expired (the signer's maxCertificateTtl after the switch). Tenants sharing the signer
    /// rotate together. Follow it with `hypha ca status`.
    Rotate {
        /// Mesh config directory (defaults to the embedded example).
        #[arg(long)]
        config: Option<PathBuf>,
        /// The CA's data directory (as `hypha control --data-dir`).
        #[arg(long, required_unless_present = "kubernetes")]
        data_dir: Option<PathBuf>,
        #[arg(long)]
        tenant: String,
        /// The control plane runs on a cluster (`hypha control --kubernetes`): the new
        /// generation goes to the cluster (the signer's Secret, or its token), every replica
        /// takes it, and the one holding the Lease `hypha-ca-rotation` moves it on. Run it
        /// where the token is reachable for a token-held signer (`kubectl exec` into a replica).
        #[arg(long, conflicts_with = "data_dir")]
        kubernetes: bool,
        /// With --kubernetes: the kubeconfig (else $KUBECONFIG, ~/.kube/config, or in-cluster).
        #[arg(long, requires = "kubernetes")]
        kubeconfig: Option<PathBuf>,
    },
    /// Each tenant's signer: where its key lives, its Kubernetes signer names, and the root it
    /// signs with (subject, SHA-256 fingerprint, validity), from the config and the data
    /// directory alone (no key or token is opened).
    Status {
        /// Mesh config directory (defaults to the embedded example).
        #[arg(long)]
        config: Option<PathBuf>,
        /// The CA's data directory (as `hypha control --data-dir`).
        #[arg(long)]
        data_dir: PathBuf,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// The CA and the identity a `hypha ca` command is about.
#[derive(clap::Args)]
struct CaIdentity {
    /// Mesh config directory (defaults to the embedded example), for the trust domain,
    /// tenants and signers.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The CA's data directory (as `hypha control --data-dir`; created if new).
    #[arg(long)]
    data_dir: PathBuf,
    #[arg(long)]
    namespace: String,
    #[arg(long)]
    service_account: String,
}

impl CaIdentity {
    fn caller(&self) -> hypha_ca::Caller {
        hypha_ca::Caller::new(self.namespace.clone(), self.service_account.clone())
    }
}

#[derive(clap::Args)]
struct ControlArgs {
    /// Directory of Istio YAML (defaults to the embedded bookinfo example, or with
    /// --kubernetes to nothing but the default MeshConfig).
    #[arg(long, env = "HYPHA_CONFIG")]
    config: Option<PathBuf>,
    /// Read the mesh from a Kubernetes cluster as istiod does (Services, EndpointSlices,
    /// Pods, Nodes, Namespaces, the Istio CRDs), merged with --config: the cluster of
    /// --kubeconfig, else of KUBECONFIG (or ~/.kube/config), else the pod's own.
    #[arg(long)]
    kubernetes: bool,
    /// The kubeconfig for --kubernetes.
    #[arg(long, requires = "kubernetes")]
    kubeconfig: Option<PathBuf>,
    /// Address to serve plaintext xDS on (Istio's 15010); repeat for several (IPv4 and
    /// IPv6). Defaults to 127.0.0.1:15010 unless --listen-tls is given: a mesh on mutual TLS
    /// opens no plaintext port it did not ask for.
    #[arg(long)]
    listen: Vec<SocketAddr>,
    /// Address to serve xDS and the CA API over TLS on (Istio's 15012); repeatable.
    /// Needs --data-dir.
    #[arg(long, requires = "data_dir")]
    listen_tls: Vec<SocketAddr>,
    /// Where the CA keeps its signer keys (created on first start, 0600) and writes
    /// `root-cert.pem`, the root proxies verify the control plane with.
    #[arg(long, env = "HYPHA_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Directory of join tokens, `<namespace>.<service account>.token` (0600): the
    /// credential a workload presents for its first certificate.
    #[arg(long)]
    join_tokens: Option<PathBuf>,
    /// Keep the control plane's own serving key (xDS and the CA API over TLS) in this
    /// PKCS#11 module's token instead of memory: generated there, never extractable.
    #[arg(long, requires_all = ["pkcs11_token", "data_dir"])]
    pkcs11_module: Option<PathBuf>,
    /// The token's label.
    #[arg(long)]
    pkcs11_token: Option<String>,
    /// A file holding the token's user PIN (first line).
    #[arg(long)]
    pkcs11_pin_file: Option<PathBuf>,
    /// The environment variable holding the token's user PIN.
    #[arg(long, conflicts_with = "pkcs11_pin_file")]
    pkcs11_pin_env: Option<String>,
    /// Serve `/ready` here (plain HTTP, for a readiness probe): 200 once the config served is
    /// complete (with --kubernetes, once the cluster has been read); repeatable.
    #[arg(long)]
    health: Vec<SocketAddr>,
    /// Serve the sidecar injection webhook here (Istio's 15017), over TLS with the
    /// control plane's certificate; needs --kubernetes and --data-dir.
    #[arg(long, requires_all = ["kubernetes", "data_dir"])]
    webhook: Option<SocketAddr>,
    /// A DNS name the API server calls the webhook by (its Service's); repeatable.
    #[arg(long = "webhook-name", default_value = "hypha.hypha-system.svc")]
    webhook_names: Vec<String>,
    /// The MutatingWebhookConfiguration whose caBundle the control plane keeps.
    #[arg(long, default_value = "hypha-sidecar-injector")]
    webhook_configuration: String,
    /// Approve each CSR to Hypha's signers that asks for its requester's own service-account
    /// identity (Istio's rule); needs `approve` on the signers. Others wait for an approver.
    #[arg(long, alias = "approve-istio-csrs", requires = "kubernetes")]
    approve_own_csrs: bool,
    #[command(flatten)]
    inject: InjectArgs,
}

#[derive(clap::Args)]
struct ProxyArgs {
    /// The control plane's xDS address.
    #[arg(
        long,
        env = "HYPHA_CONTROL_PLANE",
        default_value = "http://127.0.0.1:15010"
    )]
    control_plane: String,
    /// The workload's namespace.
    #[arg(long, env = "HYPHA_NAMESPACE", default_value = "default")]
    namespace: String,
    /// The workload's service account.
    #[arg(long, env = "HYPHA_SERVICE_ACCOUNT", default_value = "default")]
    service_account: String,
    /// The workload's name (its WorkloadEntry; on Kubernetes its Deployment's): the
    /// `WORKLOAD_NAME` its telemetry carries.
    #[arg(long, env = "HYPHA_WORKLOAD")]
    workload: String,
    /// On Kubernetes: the pod's name (Istio's `POD_NAME`, from the downward API), which the
    /// node id carries and the control plane finds the pod by; the workload's name otherwise.
    #[arg(long, env = "POD_NAME")]
    pod: Option<String>,
    /// A workload label, `key=value`; repeat for several.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Workload labels from a file in the downward API's format (`key="value"` lines; an
    /// injected sidecar's `/etc/istio/pod/labels`), besides any --label.
    #[arg(long)]
    labels_file: Option<PathBuf>,
    /// The workload's IP addresses; repeat for several, or comma-separated (an injected
    /// sidecar has the pod's `status.podIPs` in `INSTANCE_IPS`).
    #[arg(long = "ip", env = "INSTANCE_IPS", value_delimiter = ',')]
    ips: Vec<std::net::IpAddr>,
    /// The xDS node id (default `sidecar~<ip>~<workload>.<namespace>~<namespace>.svc.cluster.local`).
    #[arg(long, env = "HYPHA_NODE_ID")]
    node_id: Option<String>,
    /// Serve the app's outbound traffic as an HTTP proxy here (`HTTP_PROXY`); repeatable.
    #[arg(long)]
    http_proxy: Vec<SocketAddr>,
    /// A local port for one service port, `HOST:PORT=LISTEN_ADDR`; repeatable.
    #[arg(long = "service", value_parser = parse_service)]
    services: Vec<(String, SocketAddr)>,
    /// Accept the mesh's traffic for the app here; repeatable (IPv4 and IPv6).
    #[arg(long)]
    inbound: Vec<SocketAddr>,
    /// The workload port the mesh addresses (defaults to the first --inbound port).
    #[arg(long)]
    inbound_port: Option<u16>,
    /// Where the app listens. With --capture-inbound only its address counts (default
    /// 127.0.0.1): each connection goes to its original destination port there.
    #[arg(long)]
    app: Option<SocketAddr>,
    /// Transparent capture, inside a pod whose rules redirect to these ports (`hypha pod`):
    /// listen for the app's redirected outbound TCP on this port of every address (Istio's
    /// 15001) and route each connection by its original destination.
    #[arg(long)]
    capture_outbound: Option<u16>,
    /// Listen for redirected inbound TCP on this port of every address (Istio's 15006); each
    /// connection's original destination port picks its inbound chain and the app's port.
    #[arg(long)]
    capture_inbound: Option<u16>,
    /// Admin listener: /ready, /metrics, /config_dump, /clusters.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin: Option<SocketAddr>,
    /// A health listener serving `/healthz/ready` only, for the kubelet's readiness probe
    /// (Istio's 15021 on the pod's addresses: `--health 0.0.0.0:15021 --health [::]:15021`);
    /// repeatable.
    #[arg(long)]
    health: Vec<SocketAddr>,
    /// The app's probes to forward from the health listeners, JSON by path (what the
    /// injector writes: `{"/app-health/web/livez": {"httpGet": {...}}}`).
    #[arg(long, env = "ISTIO_KUBE_APP_PROBERS")]
    app_probers: Option<String>,
    /// JSON access log, one line per request: a file, or `-` for stdout.
    #[arg(long)]
    access_log: Option<PathBuf>,
    /// The root certificate that verifies the control plane (its data dir's `root-cert.pem`).
    /// With it, the proxy gets its workload certificate from the control plane's CA and
    /// `--control-plane` is the TLS endpoint (`https://...:15012`), spoken over mutual TLS.
    #[arg(long, env = "HYPHA_CA_ROOT")]
    ca_root: Option<PathBuf>,
    /// The join token file for the first certificate.
    #[arg(long, env = "HYPHA_JOIN_TOKEN", requires = "ca_root")]
    join_token: Option<PathBuf>,
    /// On Kubernetes: the pod's projected service-account token (audience `istio-ca`, as
    /// Istio's sidecar has it, or `hypha-ca`), which the CA checks with TokenReview. Read
    /// again at every renewal, since the kubelet rotates it.
    #[arg(
        long,
        env = "HYPHA_SERVICE_ACCOUNT_TOKEN",
        requires = "ca_root",
        conflicts_with = "join_token"
    )]
    service_account_token: Option<PathBuf>,
    /// The mesh's trust domain (SPIFFE IDs are `spiffe://<trust domain>/ns/<ns>/sa/<sa>`).
    #[arg(long, env = "HYPHA_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// The control plane's namespace (the mesh's root namespace): the control plane must
    /// prove it is `spiffe://<trust domain>/ns/<this>/sa/hypha-control`.
    #[arg(
        long,
        env = "HYPHA_CONTROL_PLANE_NAMESPACE",
        default_value = "istio-system"
    )]
    control_plane_namespace: String,
    /// The workload key: ecdsa-p256, rsa-2048 or rsa-3072.
    #[arg(long, default_value = "ecdsa-p256", value_parser = |s: &str| s.parse::<hypha_identity::KeyKind>().map_err(|e| e.to_string()))]
    key: hypha_identity::KeyKind,
    /// Keep the workload key in this PKCS#11 module's token (e.g.
    /// /usr/lib/softhsm/libsofthsm2.so): generated there, never extractable.
    #[arg(long, requires_all = ["pkcs11_token", "ca_root"])]
    pkcs11_module: Option<PathBuf>,
    /// The token's label.
    #[arg(long)]
    pkcs11_token: Option<String>,
    /// The environment variable holding the token's user PIN.
    #[arg(long, conflicts_with = "pkcs11_pin_file")]
    pkcs11_pin_env: Option<String>,
    /// A file holding the token's user PIN (first line).
    #[arg(long)]
    pkcs11_pin_file: Option<PathBuf>,
    /// Threads (one token session each) doing the token's blocking calls.
    #[arg(long, default_value_t = 2)]
    pkcs11_threads: usize,
    /// The label of the key generated in the token (default `hypha <SPIFFE ID>`).
    #[arg(long, requires = "pkcs11_module")]
    pkcs11_key_label: Option<String>,
    /// Istio-style ProxyConfig YAML (the `proxy.istio.io/config` fields): its
    /// `privateKeyProvider.pkcs11` keeps the workload key in a token, like the --pkcs11-* flags.
    #[arg(long, env = "HYPHA_PROXY_CONFIG")]
    proxy_config: Option<PathBuf>,
    /// The same ProxyConfig as text (YAML or JSON): what an injected sidecar gets in
    /// `PROXY_CONFIG`, the pod's `proxy.istio.io/config` over the mesh's defaults.
    #[arg(long, env = "PROXY_CONFIG", conflicts_with = "proxy_config")]
    proxy_config_text: Option<String>,
    /// Certificate validity to ask for, in seconds (the CA caps it; renewed at half life).
    #[arg(long, default_value_t = 24 * 3600)]
    cert_validity_secs: u64,
    /// Worker threads (Istio's sidecar concurrency; default: the ProxyConfig's `concurrency`,
    /// else 2; 0 for one per CPU). With 1, the proxy runs on a single-threaded runtime, the
    /// cheapest per request.
    #[arg(long, env = "HYPHA_WORKERS")]
    workers: Option<usize>,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected key=value, got {s:?}"))
}

fn parse_service(s: &str) -> Result<(String, SocketAddr), String> {
    let (authority, listen) = s
        .split_once('=')
        .ok_or_else(|| format!("expected HOST:PORT=LISTEN_ADDR, got {s:?}"))?;
    let listen = listen
        .parse()
        .map_err(|e| format!("bad listen address {listen:?}: {e}"))?;
    Ok((authority.to_owned(), listen))
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Human,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check {
            path,
            output,
            kubernetes,
            kubeconfig,
        } => match (kubernetes, path) {
            (true, path) => check_cluster(path.as_deref(), kubeconfig.as_deref(), output),
            (false, Some(path)) => check(&path, output),
            (false, None) => ExitCode::FAILURE,
        },
        Command::Ca(CaCommand::Issue {
            who,
            validity_secs,
            key,
            out,
        }) => ca_issue(
            who.config.as_deref(),
            &who.data_dir,
            who.caller(),
            std::time::Duration::from_secs(validity_secs),
            key,
            &out,
        ),
        Command::Ca(CaCommand::Revoke { who }) => {
            ca_revoke(who.config.as_deref(), &who.data_dir, &who.caller())
        }
        Command::Ca(CaCommand::Rotate {
            config,
            data_dir,
            tenant,
            kubernetes,
            kubeconfig,
        }) => match (data_dir, kubernetes) {
            (Some(dir), false) => ca_rotate(config.as_deref(), &dir, &tenant),
            (_, _) => ca_rotate_in_cluster(config.as_deref(), kubeconfig.as_deref(), &tenant),
        },
        Command::Ca(CaCommand::Status {
            config,
            data_dir,
            json,
        }) => match ca_config(config.as_deref()) {
            Some(cfg) => {
                let statuses = hypha_ca::status::status(&cfg.mesh, &data_dir);
                if json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&statuses).unwrap_or_default()
                    );
                } else {
                    print!("{}", hypha_ca::status::render(&statuses));
                }
                ExitCode::SUCCESS
            }
            None => ExitCode::FAILURE,
        },
        Command::Control(args) => {
            let ControlArgs {
                config,
                kubernetes,
                kubeconfig,
                listen,
                listen_tls,
                data_dir,
                join_tokens,
                pkcs11_module,
                pkcs11_token,
                pkcs11_pin_file,
                pkcs11_pin_env,
                health,
                webhook,
                webhook_names,
                webhook_configuration,
                approve_own_csrs,
                inject,
            } = *args;
            let own_key = pkcs11_module.map(|module| hypha_keys::pkcs11::TokenConfig {
                module,
                label: pkcs11_token.unwrap_or_default(),
                pin: pin_source(pkcs11_pin_file, pkcs11_pin_env),
                threads: 1,
            });
            let listen = if listen.is_empty() && listen_tls.is_empty() {
                vec![SocketAddr::from(([127, 0, 0, 1], 15010))]
            } else {
                listen
            };
            let security = data_dir.map(|data_dir| hypha_control::Security {
                data_dir,
                join_tokens,
                listen: listen_tls,
                own_key,
                token_review: None,
                server_names: Vec::new(),
                services: Vec::new(),
                rotate_elsewhere: false,
            });
            let cluster = kubernetes.then_some(kubeconfig);
            let webhook = webhook.map(|listen| WebhookArgs {
                listen,
                names: webhook_names,
                configuration: webhook_configuration,
                inject,
            });
            let csrs = CsrArgs {
                approve_own: approve_own_csrs,
            };
            run(control(
                config, cluster, listen, security, webhook, health, csrs,
            ))
        }
        Command::Proxy(args) => match proxy_config(&args) {
            Ok(config) => {
                let workers = args
                    .workers
                    .or(config.concurrency.map(|c| c as usize))
                    .unwrap_or(2);
                run_on(workers, proxy(*args, config, workers))
            }
            Err(e) => {
                eprintln!("hypha proxy: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Demo {
            serve,
            requests,
            concurrency,
            keys,
            pods,
            no_bypass,
            kubernetes,
            rotate_root,
        } => {
            let placement = match (pods, no_bypass) {
                (false, _) => hypha_demo::Placement::Loopback,
                (true, true) => hypha_demo::Placement::Pods,
                (true, false) => hypha_demo::Placement::PodsWithBypass,
            };
            demo(
                serve,
                requests,
                concurrency,
                keys,
                (placement, kubernetes),
                rotate_root,
            )
        }
        Command::Pod(command) => pod(command),
        Command::Inject {
            file,
            output,
            mesh_config,
            settings,
        } => match inject(&file, output.as_deref(), mesh_config.as_deref(), &settings) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("hypha inject: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Install {
            target,
            apply,
            skip_crds,
        } => match install(&target, apply, skip_crds, None) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("hypha install: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Uninstall {
            target,
            keep_crds,
            dry_run,
        } => match install(&target, false, false, Some((keep_crds, dry_run))) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("hypha uninstall: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Wait { url, timeout_secs } => {
            let timeout = std::time::Duration::from_secs(timeout_secs);
            let every = std::time::Duration::from_millis(200);
            match hypha_inject::wait::wait_ready(&url, timeout, every) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("hypha wait: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Capture {
            outbound_port,
            inbound_port,
            proxy_gid,
            include_outbound_ip_ranges,
            exclude_outbound_ip_ranges,
            exclude_outbound_ports,
            include_inbound_ports,
            exclude_inbound_ports,
        } => {
            let capture = hypha_pod::Capture {
                outbound_port,
                inbound_port,
                proxy_gid,
                ..hypha_pod::Capture::default()
            }
            .with_annotations(&hypha_pod::Annotations {
                include_outbound_ip_ranges,
                exclude_outbound_ip_ranges,
                exclude_outbound_ports,
                include_inbound_ports,
                exclude_inbound_ports,
            });
            let done = capture.and_then(|c| c.install(None).map_err(|e| e.to_string()));
            match done {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("hypha capture: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Bypass {
            cgroup,
            metrics,
            pods,
            exclude_outbound_port,
            exclude_inbound_port,
            exclude_outbound_cidr,
            kubernetes,
            node,
            kubeconfig,
        } => run_on(1, async move {
            let pods: Vec<hypha_bypass::CapturedPod> = pods
                .iter()
                .map(|name| {
                    let path = if name.contains('/') {
                        PathBuf::from(name)
                    } else {
                        Path::new("/run/netns").join(name)
                    };
                    hypha_bypass::CapturedPod {
                        exclude_outbound_ports: exclude_outbound_port.clone(),
                        exclude_inbound_ports: exclude_inbound_port.clone(),
                        exclude_outbound_cidrs: exclude_outbound_cidr.clone(),
                        ..hypha_bypass::CapturedPod::new(path)
                    }
                })
                .collect();
            let changes = match (kubernetes, node) {
                (true, Some(node)) => {
                    let client = hypha_kube::connect(kubeconfig.as_deref()).await?;
                    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                    tokio::spawn(hypha_kube::node::watch_pods(client, node, tx));
                    Some(rx)
                }
                _ => None,
            };
            hypha_bypass::serve(&cgroup, Some(metrics), &pods, changes, stop_signal()).await?;
            Ok(())
        }),
        Command::DemoApp {
            role,
            listen,
            proxy,
        } => run(async move { Ok(hypha_demo::app::run(role, listen, proxy).await?) }),
    }
}

/// `hypha pod`: pods outlive the command; `down` and `clean` take them away.
fn pod(command: PodCommand) -> ExitCode {
    let done = match command {
        PodCommand::Up {
            name,
            node,
            capture,
            exclude_inbound_port,
            exclude_outbound_port,
            exclude_outbound_cidr,
        } => hypha_pod::Node::ensure(node)
            .and_then(|n| n.pod(&name))
            .and_then(|pod| {
                if capture {
                    pod.capture(&hypha_pod::Capture {
                        exclude_inbound_ports: exclude_inbound_port,
                        exclude_outbound_ports: exclude_outbound_port,
                        exclude_outbound_cidrs: exclude_outbound_cidr,
                        ..hypha_pod::Capture::default()
                    })?;
                }
                println!("netns={} ipv4={} ipv6={}", pod.netns, pod.ipv4, pod.ipv6);
                pod.keep();
                Ok(())
            }),
        PodCommand::Down { name, node } => hypha_pod::Pod::remove(node, &name),
        PodCommand::Clean { node } => hypha_pod::Node::remove(node),
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hypha pod: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `hypha demo`: every process is this binary; progress and summary go to stdout.
fn demo(
    serve: bool,
    requests: usize,
    concurrency: usize,
    keys: hypha_demo::Keys,
    (placement, kubernetes): (hypha_demo::Placement, bool),
    rotate_root: Option<String>,
) -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("hypha: cannot find the hypha binary itself: {e}");
            return ExitCode::FAILURE;
        }
    };
    let opts = hypha_demo::Options {
        exe,
        requests,
        concurrency,
        serve,
        keys,
        placement,
        kubernetes,
        rotate_root,
        dir: None,
        // Not `println!`: a closed stdout (`hypha demo | head`) must not panic the demo.
        progress: std::sync::Arc::new(|line: &str| {
            use std::io::Write as _;
            let _ = writeln!(std::io::stdout(), "{line}");
        }),
    };
    run(async move {
        hypha_demo::run(opts).await?;
        Ok(())
    })
}

/// `hypha check --kubernetes`: the cluster's objects validated with the files in `path`.
fn check_cluster(path: Option<&Path>, kubeconfig: Option<&Path>, output: Output) -> ExitCode {
    let files = match path.map(|p| hypha_control::initial_config(Some(p))) {
        None => hypha_config::Config::default(),
        Some(Ok(c)) => c,
        Some(Err(d)) => {
            for line in d.into_sorted() {
                println!("{line}");
            }
            return ExitCode::FAILURE;
        }
    };
    let checked = run_value(async move {
        let client = hypha_kube::connect(kubeconfig.map(Path::to_path_buf).as_deref()).await?;
        Ok(hypha_kube::check(client, &files).await)
    });
    match checked {
        Some(diags) => report_check("the cluster", None, diags, output),
        None => ExitCode::FAILURE,
    }
}

/// `f` on a runtime: its value, or None (the error said on stderr).
fn run_value<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> Option<T> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .ok()?;
    match rt.block_on(f) {
        Ok(v) => Some(v),
        Err(e) => {
            eprintln!("hypha: {e:#}");
            None
        }
    }
}

fn check(path: &std::path::Path, output: Output) -> ExitCode {
    let loaded = hypha_config::load(path);
    let count = loaded.config.resource_count();
    report_check(
        &path.display().to_string(),
        Some(count),
        loaded.diagnostics,
        output,
    )
}

/// Prints a check's diagnostics; failure if any is an error.
fn report_check(
    what: &str,
    resources: Option<usize>,
    diags: hypha_config::Diagnostics,
    output: Output,
) -> ExitCode {
    let failed = diags.has_errors();
    let diags = diags.into_sorted();
    match output {
        Output::Json => {
            let doc = serde_json::json!({
                "path": what,
                "resources": resources,
                "errors": diags.iter().filter(|d| d.severity == hypha_config::Severity::Error).count(),
                "diagnostics": diags,
            });
            println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
        }
        Output::Human => {
            for d in &diags {
                println!("{d}");
            }
            let errors = diags
                .iter()
                .filter(|d| d.severity == hypha_config::Severity::Error)
                .count();
            match resources {
                _ if failed => println!("\n{errors} error(s) in {what}"),
                Some(n) => println!("✔ {what}: {n} resources, no errors"),
                None => println!("✔ {what}: no errors"),
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn run(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    run_on(0, fut)
}

/// Completes on SIGINT or SIGTERM (never, if the handlers cannot be installed: said once).
async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "no SIGTERM handler; stop with Ctrl-C");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Runs `fut` on a runtime with `workers` threads (0: one per core; 1: single-threaded).
fn run_on(workers: usize, fut: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    init_tracing();
    let built = match workers {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        0 => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    };
    let rt = match built {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hypha: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hypha: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HYPHA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .init();
}

/// The config a `hypha ca` command reads (the embedded example without `--config`); its
/// errors counted on stderr.
fn ca_config(config: Option<&std::path::Path>) -> Option<hypha_config::Config> {
    match hypha_control::initial_config(config) {
        Ok(c) => Some(c),
        Err(d) => {
            eprintln!("hypha: the config has {} error(s)", d.errors().count());
            None
        }
    }
}

fn ca_issue(
    config: Option<&std::path::Path>,
    data_dir: &std::path::Path,
    caller: hypha_ca::Caller,
    validity: std::time::Duration,
    key: hypha_identity::KeyKind,
    out: &std::path::Path,
) -> ExitCode {
    let Some(cfg) = ca_config(config) else {
        return ExitCode::FAILURE;
    };
    match hypha_control::security::issue_files(&cfg.mesh, data_dir, &caller, validity, key, out) {
        Ok(id) => {
            println!("{id}: {}", out.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("hypha: {e}");
            ExitCode::FAILURE
        }
    }
}

fn ca_rotate(
    config: Option<&std::path::Path>,
    data_dir: &std::path::Path,
    tenant: &str,
) -> ExitCode {
    let Some(cfg) = ca_config(config) else {
        return ExitCode::FAILURE;
    };
    match hypha_ca::rotation::start(&cfg.mesh, data_dir, tenant) {
        Ok(s) => {
            println!(
                "{}the control plane adds the new root to every trust bundle; `hypha ca status \
                 --data-dir {}` follows it",
                rotation_started(&s),
                data_dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("hypha: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What `hypha ca rotate` says it began, up to who carries it on.
fn rotation_started(s: &hypha_ca::rotation::Started) -> String {
    format!(
        "signer {} (tenants {}): generation {} -> {}\n  old root {}\n  new root {}\n\
         phase 1, distributing: ",
        s.signer,
        s.tenants.join(", "),
        s.from,
        s.to,
        s.old_root,
        s.new_root
    )
}

/// `hypha ca rotate --kubernetes`.
fn ca_rotate_in_cluster(
    config: Option<&Path>,
    kubeconfig: Option<&Path>,
    tenant: &str,
) -> ExitCode {
    let Some(cfg) = ca_config(config) else {
        return ExitCode::FAILURE;
    };
    run(async move {
        let client = hypha_kube::connect(kubeconfig).await?;
        // The new file key passes through here (0700) on its way to its Secret.
        let scratch = std::env::temp_dir().join(format!("hypha-ca-rotate-{}", std::process::id()));
        let started = hypha_kube::rotation::start(&client, &cfg.mesh, tenant, &scratch).await;
        let _ = std::fs::remove_dir_all(&scratch);
        let s = started?;
        println!(
            "{}every replica adds the new root to every trust bundle; the one holding the Lease \
             {} moves it on (ConfigMap {} in {})",
            rotation_started(&s),
            hypha_kube::rotation::LEASE,
            hypha_kube::rotation::CONFIGMAP,
            cfg.mesh.root_namespace
        );
        Ok(())
    })
}

fn ca_revoke(
    config: Option<&std::path::Path>,
    data_dir: &std::path::Path,
    caller: &hypha_ca::Caller,
) -> ExitCode {
    let Some(cfg) = ca_config(config) else {
        return ExitCode::FAILURE;
    };
    match hypha_control::security::revoke(&cfg.mesh, data_dir, caller) {
        Ok(id) => {
            println!("revoked {id}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("hypha: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `hypha control --webhook`'s flags.
struct WebhookArgs {
    listen: SocketAddr,
    names: Vec<String>,
    configuration: String,
    inject: InjectArgs,
}

/// The MeshConfig of a config directory (or file).
fn mesh_of(dir: &Path) -> anyhow::Result<hypha_config::MeshConfig> {
    Ok(hypha_control::initial_config(Some(dir))
        .map_err(|d| anyhow::anyhow!("the config has {} error(s)", d.errors().count()))?
        .mesh)
}

/// What the control plane does with Kubernetes CSRs besides signing approved ones.
struct CsrArgs {
    approve_own: bool,
}

/// `cluster`: with --kubernetes, the kubeconfig named (if any).
async fn control(
    config: Option<PathBuf>,
    cluster: Option<Option<PathBuf>>,
    listen: Vec<SocketAddr>,
    mut security: Option<hypha_control::Security>,
    webhook: Option<WebhookArgs>,
    health: Vec<SocketAddr>,
    csrs: CsrArgs,
) -> anyhow::Result<()> {
    let extra = match cluster {
        Some(kubeconfig) => {
            let client = hypha_kube::connect(kubeconfig.as_deref()).await?;
            if let Some(s) = &mut security {
                // The CA takes the pods' service-account tokens, checked by TokenReview.
                s.token_review = Some(std::sync::Arc::new(hypha_kube::TokenReviewer::new(
                    client.clone(),
                )));
                // Every replica signs with the same keys (Secrets in the root namespace).
                let mesh = match &config {
                    Some(dir) => mesh_of(dir)?,
                    None => hypha_config::MeshConfig::default(),
                };
                std::fs::create_dir_all(&s.data_dir)?;
                hypha_kube::share_signers(&client, &mesh, &s.data_dir).await?;
                // Kubernetes CSRs addressed to the tenants' signers, and cert-manager
                // CertificateRequests to hypha.dev issuers: on the holder of a Lease only.
                let identity = std::env::var("POD_NAME")
                    .unwrap_or_else(|_| format!("hypha-control-{}", std::process::id()));
                let namespace = std::env::var("POD_NAMESPACE")
                    .unwrap_or_else(|_| hypha_kube::CONTROL_NAMESPACE.to_owned());
                s.services.push(hypha_kube::csr::service(
                    client.clone(),
                    hypha_kube::csr::SignerNames::from_mesh(&mesh),
                    hypha_kube::lease::LeaseConfig::new(
                        &namespace,
                        "hypha-signers",
                        &identity,
                        std::time::Duration::from_secs(15),
                    ),
                    csrs.approve_own,
                ));
                // Root rotations: every replica copies and reports, one moves them on.
                s.rotate_elsewhere = true;
                s.services.push(hypha_kube::rotation::service(
                    client.clone(),
                    mesh.clone(),
                    s.data_dir.clone(),
                    hypha_kube::lease::LeaseConfig::new(
                        &namespace,
                        hypha_kube::rotation::LEASE,
                        &identity,
                        std::time::Duration::from_secs(15),
                    ),
                ));
                if let Some(w) = webhook {
                    s.server_names.extend(w.names.iter().cloned());
                    let hook = hypha_kube::webhook::Webhook {
                        listen: w.listen,
                        settings: w.inject.settings(&mesh)?,
                        configuration: w.configuration,
                    };
                    s.services
                        .push(hypha_kube::webhook::service(client.clone(), hook));
                }
            }
            let source: hypha_control::ExtraSource =
                Box::new(move |cp, files| Box::pin(hypha_kube::run(client, cp, files)));
            Some(source)
        }
        None => None,
    };
    Ok(hypha_control::run_with_health(config, &listen, security, extra, &health).await?)
}

/// A PIN from a file, else from an environment variable (`HYPHA_PKCS11_PIN` by default).
fn pin_source(file: Option<PathBuf>, env: Option<String>) -> hypha_keys::pkcs11::PinSource {
    match (file, env) {
        (Some(f), _) => hypha_keys::pkcs11::PinSource::File(f),
        (None, var) => {
            hypha_keys::pkcs11::PinSource::Env(var.unwrap_or_else(|| "HYPHA_PKCS11_PIN".to_owned()))
        }
    }
}

/// Where the workload key lives, from `--proxy-config` or the `--pkcs11-*` flags (not both).
#[derive(Default)]
struct KeyProviderArgs {
    /// In a PKCS#11 token, with this key label.
    pkcs11: Option<hypha_keys::pkcs11::TokenConfig>,
    key_label: Option<String>,
    /// In memory, RSA operations batched (Istio's `cryptomb`).
    batch: Option<hypha_keys::batch::BatchConfig>,
}

/// The sidecar's `ProxyConfig`: from `--proxy-config` or `PROXY_CONFIG`, else the defaults.
fn proxy_config(a: &ProxyArgs) -> anyhow::Result<hypha_config::proxy::ProxyConfig> {
    use hypha_config::proxy::{load_proxy_config, parse_proxy_config};
    let read = match (&a.proxy_config, &a.proxy_config_text) {
        (Some(path), _) => load_proxy_config(path),
        (None, Some(text)) => parse_proxy_config("PROXY_CONFIG".into(), text),
        (None, None) => return Ok(Default::default()),
    };
    read.map_err(|diags| {
        let lines: Vec<String> = diags.iter().map(ToString::to_string).collect();
        anyhow::anyhow!("invalid proxy config:\n{}", lines.join("\n"))
    })
}

fn key_provider(
    a: &ProxyArgs,
    config: &hypha_config::proxy::ProxyConfig,
    workers: usize,
) -> anyhow::Result<KeyProviderArgs> {
    use hypha_keys::pkcs11::{PinSource, TokenConfig};
    let from_file = config.private_key_provider.clone();
    let (file_pkcs11, file_cryptomb) = match from_file {
        Some(p) => (p.pkcs11, p.cryptomb),
        None => (None, None),
    };
    if (file_pkcs11.is_some() || file_cryptomb.is_some()) && a.ca_root.is_none() {
        anyhow::bail!(
            "a private key provider needs a mesh identity: give --ca-root (and --join-token)"
        );
    }
    if let Some(c) = file_cryptomb {
        if a.pkcs11_module.is_some() {
            anyhow::bail!(
                "two private key providers: cryptomb in --proxy-config and PKCS#11 by --pkcs11-module"
            );
        }
        let queues = match workers {
            0 => std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
            n => n,
        };
        return Ok(KeyProviderArgs {
            batch: Some(hypha_keys::batch::BatchConfig {
                poll_delay: c
                    .poll_delay
                    .map_or(hypha_keys::batch::DEFAULT_POLL_DELAY, |d| d.as_std()),
                fallback: c.fallback.unwrap_or(false),
                queues,
            }),
            ..KeyProviderArgs::default()
        });
    }
    match (file_pkcs11, &a.pkcs11_module) {
        (Some(_), Some(_)) => anyhow::bail!(
            "the PKCS#11 key provider is given twice: in --proxy-config and by --pkcs11-module"
        ),
        (Some(p), None) => Ok(KeyProviderArgs {
            pkcs11: Some(TokenConfig {
                module: p.module.into(),
                label: p.token_label,
                pin: match (p.pin_file, p.pin_env) {
                    (Some(f), _) => PinSource::File(f.into()),
                    (None, var) => PinSource::Env(var.unwrap_or_default()),
                },
                threads: p.threads.unwrap_or(a.pkcs11_threads),
            }),
            key_label: p.key_label,
            batch: None,
        }),
        (None, Some(module)) => Ok(KeyProviderArgs {
            pkcs11: Some(TokenConfig {
                module: module.clone(),
                label: a.pkcs11_token.clone().unwrap_or_default(),
                pin: pin_source(a.pkcs11_pin_file.clone(), a.pkcs11_pin_env.clone()),
                threads: a.pkcs11_threads,
            }),
            key_label: a.pkcs11_key_label.clone(),
            batch: None,
        }),
        (None, None) => Ok(KeyProviderArgs::default()),
    }
}

/// The injector's probes (`ISTIO_KUBE_APP_PROBERS`) as the proxy runs them.
fn app_probes(
    json: &str,
    app: Option<std::net::IpAddr>,
) -> anyhow::Result<hypha_proxy::probe::AppProbes> {
    use hypha_proxy::probe::{Action, AppProbe};
    let probers = hypha_inject::probes::parse(json).context("bad app probers")?;
    let mut by_path = std::collections::HashMap::new();
    for (path, p) in probers {
        let action = match (p.http_get, p.tcp_socket, p.grpc) {
            (Some(h), _, _) => Action::Http {
                port: h.port,
                path: h.path,
                https: h.scheme.eq_ignore_ascii_case("https"),
                host: h.host,
                headers: h
                    .http_headers
                    .into_iter()
                    .map(|x| (x.name, x.value))
                    .collect(),
            },
            (None, Some(t), _) => Action::Tcp {
                port: t.port,
                host: t.host,
            },
            (None, None, Some(g)) => Action::Grpc {
                port: g.port,
                service: g.service,
            },
            (None, None, None) => anyhow::bail!("app prober {path} has no action"),
        };
        let timeout = std::time::Duration::from_secs(u64::from(p.timeout_seconds.max(1)));
        by_path.insert(path, AppProbe { action, timeout });
    }
    Ok(hypha_proxy::probe::AppProbes { app, by_path })
}

async fn proxy(
    a: ProxyArgs,
    config: hypha_config::proxy::ProxyConfig,
    workers: usize,
) -> anyhow::Result<()> {
    let keys = key_provider(&a, &config, workers)?;
    let mut labels: std::collections::BTreeMap<String, String> = match &a.labels_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the labels file {}", path.display()))?;
            hypha_inject::podinfo::parse(&text)
                .with_context(|| format!("bad labels file {}", path.display()))?
        }
        None => Default::default(),
    };
    labels.extend(a.labels);
    let app_probes = match &a.app_probers {
        None => Default::default(),
        Some(json) => app_probes(json, a.ips.first().copied())?,
    };
    let ip = a
        .ips
        .first()
        .map_or("127.0.0.1".to_owned(), ToString::to_string);
    let node = hypha_xds::ProxyInfo {
        id: a.node_id.unwrap_or_else(|| {
            format!(
                "sidecar~{ip}~{}.{ns}~{ns}.svc.cluster.local",
                a.pod.as_deref().unwrap_or(&a.workload),
                ns = a.namespace
            )
        }),
        namespace: a.namespace,
        service_account: a.service_account,
        workload_name: a.workload,
        labels,
        ips: a.ips,
    };
    let opts = hypha_proxy::Options {
        node,
        control_plane: a.control_plane,
        http_proxy: a.http_proxy,
        services: a.services.into_iter().map(|(h, l)| (l, h)).collect(),
        inbound: a.inbound,
        inbound_port: a.inbound_port,
        app: a.app,
        capture_outbound: a.capture_outbound,
        capture_inbound: a.capture_inbound,
        admin: a.admin,
        health: a.health,
        app_probes,
        access_log: a.access_log,
        identity: a
            .ca_root
            .map(|ca_root| hypha_proxy::identity::IdentityOptions {
                ca_root,
                join_token: a.join_token,
                service_account_token: a.service_account_token,
                trust_domain: a.trust_domain,
                control_plane_namespace: a.control_plane_namespace,
                key_kind: a.key,
                pkcs11: keys.pkcs11,
                key_label: keys.key_label,
                batch: keys.batch,
                validity: std::time::Duration::from_secs(a.cert_validity_secs),
            }),
        limits: Default::default(),
    };
    Ok(hypha_proxy::run(opts, config.drain_duration()).await?)
}
