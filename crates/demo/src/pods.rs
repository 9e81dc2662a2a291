//! `hypha demo --pods` (root): bookinfo the way a sidecar injector runs it. Each workload and
//! each client in its own pod ([`hypha_pod`]: a network namespace on a bridge, IPv4 and IPv6)
//! with Istio's capture rules, its app unmodified (it calls services by name, the pod's
//! `/etc/hosts` naming their VIPs as cluster DNS would), its sidecar beside it with the group
//! id the capture exempts; the control plane on the node. With the bypass, the demo moves
//! itself (and so everything it starts) into a cgroup of its own first and starts
//! `hypha bypass` on it with every pod registered, before any pod's process exists: sockets
//! created before the attach are never bypassed.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use hypha_pod::{Capture, Cgroup, Node, Pod};

use crate::client;
use crate::process::Proc;
use crate::topology::{PodAddrs, CLIENT, GUEST, POD_ADMIN_PORT, POD_PROXY_PORT, WORKLOADS};
use crate::{DemoError, Progress};

/// Node indexes the demo picks from (its bridge is `hypha<index>`; tests use 200 and up).
const NODES: std::ops::RangeInclusive<u8> = 100..=199;
/// How long `hypha bypass` may take to attach.
const BYPASS_READY: Duration = Duration::from_secs(15);
/// The bypass counters the summary shows, in order.
pub const BYPASS_COUNTERS: [&str; 5] = [
    "hypha_bypass_connects_outbound_total",
    "hypha_bypass_connects_inbound_total",
    "hypha_bypass_original_dst_answered_total",
    "hypha_bypass_messages_redirected_total",
    "hypha_bypass_bytes_redirected_total",
];

/// The node, its pods, and the bypass. Dropping it stops the bypass, then removes the pods,
/// the bridge and the cgroup (the mesh's processes must be gone by then: [`crate::Mesh`] drops
/// this last).
pub struct Pods {
    bypass: Option<Proc>,
    /// The bypass's `/metrics`, once it attached.
    bypass_metrics: Option<SocketAddr>,
    /// Why there is no bypass, when there is none.
    pub bypass_missing: Option<String>,
    pods: BTreeMap<String, Pod>,
    node: Node,
    cgroup: Option<Cgroup>,
}

impl Pods {
    /// The node and a captured pod per process of the mesh but the control plane; with
    /// `bypass`, this process in a cgroup of its own first.
    pub fn create(bypass: bool, say: &Progress) -> Result<Pods, DemoError> {
        let mut bypass_missing = (!bypass).then(|| "--no-bypass".to_owned());
        let cgroup = if bypass {
            match Cgroup::enter(&format!("hypha-demo-{}", std::process::id())) {
                Ok(c) => Some(c),
                Err(e) => {
                    bypass_missing = Some(format!("no cgroup v2 of its own: {e}"));
                    None
                }
            }
        } else {
            None
        };
        let node = Node::create_free(NODES)?;
        let mut pods = BTreeMap::new();
        let names = WORKLOADS
            .iter()
            .map(|w| (w.name, vec![POD_ADMIN_PORT]))
            .chain([CLIENT, GUEST].map(|c| (c, vec![POD_ADMIN_PORT, POD_PROXY_PORT])));
        for (name, exclude_inbound_ports) in names {
            let pod = node.pod(name)?;
            pod.capture(&Capture {
                exclude_inbound_ports,
                ..Capture::default()
            })?;
            pods.insert(name.to_owned(), pod);
        }
        say(&format!(
            "pods: {} network namespaces on bridge hypha{} ({}/24, {}/64), each with Istio's \
             capture rules (iptables and ip6tables: outbound to 15001, inbound to 15006, group \
             {} exempt)",
            pods.len(),
            node.index(),
            node.ipv4(),
            node.ipv6(),
            hypha_pod::PROXY_GID,
        ));
        Ok(Pods {
            bypass: None,
            bypass_metrics: None,
            bypass_missing,
            pods,
            node,
            cgroup,
        })
    }

    /// Every pod's namespace and addresses, by process name.
    pub fn addrs(&self) -> BTreeMap<String, PodAddrs> {
        self.pods
            .iter()
            .map(|(name, pod)| {
                let addrs = PodAddrs {
                    netns: pod.netns.clone(),
                    ipv4: pod.ipv4,
                    ipv6: pod.ipv6,
                };
                (name.clone(), addrs)
            })
            .collect()
    }

    /// The node's address on the bridge, where the control plane listens.
    pub fn node_ipv4(&self) -> Ipv4Addr {
        self.node.ipv4()
    }

    /// The pod `name` (a workload, [`CLIENT`] or [`GUEST`]).
    pub fn pod(&self, name: &str) -> &Pod {
        &self.pods[name]
    }

    /// Gives every pod an `/etc/hosts` naming each service of `cfg` with its VIPs.
    pub fn write_hosts(&self, cfg: &hypha_config::Config) -> Result<(), DemoError> {
        let mut names: Vec<(IpAddr, String)> = Vec::new();
        for se in &cfg.service_entries {
            let vips = se
                .spec
                .addresses
                .iter()
                .filter_map(|a| a.parse::<IpAddr>().ok());
            for vip in vips {
                for host in &se.spec.hosts {
                    names.push((vip, cfg.resolve_host(host, &se.namespace)));
                }
            }
        }
        for pod in self.pods.values() {
            pod.hosts(&names)?;
        }
        Ok(())
    }

    /// Starts `hypha bypass` on the cgroup with every pod registered, and waits until it has
    /// attached; if it cannot (no BPF here, say), says why and goes on without it.
    pub async fn start_bypass(
        &mut self,
        exe: &Path,
        log_dir: &Path,
        say: &Progress,
    ) -> Result<(), DemoError> {
        let Some(cgroup) = &self.cgroup else {
            if let Some(why) = &self.bypass_missing {
                say(&format!("bypass: off ({why}); iptables capture only"));
            }
            return Ok(());
        };
        let metrics = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .map_err(DemoError::Ports)?;
        let mut args: Vec<String> = vec![
            "bypass".into(),
            "--cgroup".into(),
            cgroup.path().display().to_string(),
            "--metrics".into(),
            metrics.to_string(),
        ];
        for pod in self.pods.values() {
            args.extend(["--pod".into(), pod.netns.clone()]);
        }
        // The ports the pods' capture leaves alone, for the capture at connect too.
        for port in [POD_ADMIN_PORT, POD_PROXY_PORT] {
            args.extend(["--exclude-inbound-port".into(), port.to_string()]);
        }
        let log = log_dir.join("bypass.log");
        let mut p = Proc::spawn("bypass", exe, &args, &log)?;
        say(&format!(
            "started {:<21} pid {:<7} eBPF sockops + sk_msg + connect4/6 on cgroup {}, {} pods registered",
            "bypass",
            p.pid(),
            cgroup.path().display(),
            self.pods.len()
        ));
        let started = Instant::now();
        let url = format!("http://{metrics}/metrics");
        while started.elapsed() < BYPASS_READY {
            if let Some(status) = p.exited() {
                let why = p.tail(1);
                say(&format!(
                    "bypass: exited ({status}): {why}; going on with iptables capture only"
                ));
                self.bypass_missing = Some(format!("hypha bypass exited: {why}"));
                return Ok(());
            }
            if client::get(&url, Duration::from_secs(1))
                .await
                .is_ok_and(|r| r.status.is_success())
            {
                say(&format!(
                    "ready   {:<21} ({} ms)",
                    "bypass",
                    started.elapsed().as_millis()
                ));
                self.bypass = Some(p);
                self.bypass_metrics = Some(metrics);
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(DemoError::NotReady {
            name: "bypass".into(),
            waited: BYPASS_READY,
            log: p.log.clone(),
            tail: p.tail(15),
        })
    }

    /// An error if the bypass has exited.
    pub fn check_alive(&mut self) -> Result<(), DemoError> {
        match self.bypass.as_mut() {
            Some(p) => match p.exited() {
                Some(status) => Err(p.exit_error(status)),
                None => Ok(()),
            },
            None => Ok(()),
        }
    }

    /// What the pods did: an unmodified `curl` in the client pod to productpage by name, and
    /// the bypass's counters.
    pub async fn report(&self, url: &str) -> PodsReport {
        let mut curl = self.pod(CLIENT).command("curl");
        curl.args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-m",
            "10",
            url,
        ])
        .stdin(std::process::Stdio::null());
        // Off the runtime's threads: it may wait ten seconds.
        let out = tokio::task::spawn_blocking(move || curl.output())
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        let curl = match out {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_owned(),
            Ok(o) => format!(
                "failed ({}): {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => format!("cannot run curl: {e}"),
        };
        let mut bypass = BTreeMap::new();
        if let Some(addr) = self.bypass_metrics {
            if let Ok(r) =
                client::get(&format!("http://{addr}/metrics"), Duration::from_secs(5)).await
            {
                bypass = counters(&r.text());
            }
        }
        // Admin and the client proxies listen on their pod's loopback: from the node, the
        // pod addresses answer on none of those ports.
        let probes: Vec<(String, SocketAddr)> = self
            .pods
            .iter()
            .flat_map(|(name, pod)| {
                let ports: &[u16] = if name == CLIENT || name == GUEST {
                    &[POD_ADMIN_PORT, POD_PROXY_PORT]
                } else {
                    &[POD_ADMIN_PORT]
                };
                ports
                    .iter()
                    .map(move |&port| (name.clone(), SocketAddr::from((pod.ipv4, port))))
            })
            .collect();
        let open_on_pod_addresses = tokio::task::spawn_blocking(move || {
            probes
                .into_iter()
                .filter(|(_, at)| {
                    std::net::TcpStream::connect_timeout(at, Duration::from_secs(1)).is_ok()
                })
                .map(|(name, at)| format!("{name} {at}"))
                .collect()
        })
        .await
        .unwrap_or_default();
        PodsReport {
            open_on_pod_addresses,
            bridge: format!("hypha{}", self.node.index()),
            pods: self
                .addrs()
                .into_iter()
                .map(|(name, a)| (name, a.netns, a.ipv4, a.ipv6))
                .collect(),
            curl_url: url.to_owned(),
            curl,
            bypass_cgroup: self
                .bypass
                .as_ref()
                .and(self.cgroup.as_ref())
                .map(|c| c.path().display().to_string()),
            bypass_missing: self.bypass_missing.clone(),
            bypass,
        }
    }

    /// The `curl` line to try in the client pod.
    pub fn curl_in_client(&self, url: &str, headers: &str) -> String {
        format!(
            "ip netns exec {} curl {url}{headers}",
            self.pod(CLIENT).netns
        )
    }
}

/// The [`BYPASS_COUNTERS`] in a `/metrics` text.
fn counters(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (name, value) = l.split_once(' ')?;
            if !BYPASS_COUNTERS.contains(&name) {
                return None;
            }
            Some((name.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

/// What the summary says about the pods.
#[derive(Debug, Clone, Default)]
pub struct PodsReport {
    /// The node's bridge.
    pub bridge: String,
    /// (process, network namespace, IPv4, IPv6) of each pod.
    pub pods: Vec<(String, String, Ipv4Addr, std::net::Ipv6Addr)>,
    /// What the unmodified `curl` in the client pod asked for, and its status code (or why it
    /// failed).
    pub curl_url: String,
    pub curl: String,
    /// The bypass's cgroup while it was attached, or why there was no bypass.
    pub bypass_cgroup: Option<String>,
    pub bypass_missing: Option<String>,
    /// The bypass's counters ([`BYPASS_COUNTERS`]) after the traffic.
    pub bypass: BTreeMap<String, u64>,
    /// Sidecar admin and client proxy ports that answered the node on a pod's address
    /// (`<pod> <address>`): none, as they listen on the pod's loopback.
    pub open_on_pod_addresses: Vec<String>,
}

impl PodsReport {
    /// A bypass counter (0 if absent).
    pub fn counter(&self, name: &str) -> u64 {
        self.bypass.get(name).copied().unwrap_or(0)
    }
}

impl fmt::Display for PodsReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "Pods: each process in its own network namespace on bridge {}, its TCP captured to its sidecar (Istio's iptables rules)",
            self.bridge
        )?;
        for (name, netns, v4, v6) in &self.pods {
            writeln!(f, "  {name:<15} {netns:<24} {v4:<14} {v6}")?;
        }
        writeln!(
            f,
            "  an unmodified curl in the {CLIENT} pod (no proxy settings): {} → {}",
            self.curl_url, self.curl
        )?;
        writeln!(
            f,
            "  sidecar admin and client proxy ports open on pod addresses from the node: {}",
            if self.open_on_pod_addresses.is_empty() {
                "none (they listen on each pod's loopback)".to_owned()
            } else {
                self.open_on_pod_addresses.join(", ")
            }
        )?;
        match (&self.bypass_cgroup, &self.bypass_missing) {
            (Some(cgroup), _) => {
                writeln!(f, "eBPF bypass on cgroup {cgroup}:")?;
                writeln!(
                    f,
                    "  captured at connect: {} app → sidecar, {} sidecar → pod; {} original destinations answered",
                    self.counter(BYPASS_COUNTERS[0]),
                    self.counter(BYPASS_COUNTERS[1]),
                    self.counter(BYPASS_COUNTERS[2]),
                )?;
                writeln!(
                    f,
                    "  handed socket to socket, past the TCP/IP stack: {} messages, {:.1} MB",
                    self.counter(BYPASS_COUNTERS[3]),
                    self.counter(BYPASS_COUNTERS[4]) as f64 / 1e6,
                )?;
            }
            (None, Some(why)) => writeln!(f, "eBPF bypass: off ({why})")?,
            (None, None) => {}
        }
        Ok(())
    }
}
