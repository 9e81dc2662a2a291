//! Pods on one machine: each workload in its own network namespace with an IPv4 and an IPv6
//! address on a bridge, its sidecar inside, and its TCP captured the way Istio's init
//! container does it (iptables and ip6tables `nat` rules that REDIRECT outbound connections
//! to the sidecar's outbound port and inbound ones to its inbound port, the sidecar's own
//! traffic excluded by its group id). Everything goes through Debian's `ip` (iproute2) and
//! `iptables`/`ip6tables` (the nftables backend on Debian 12), as an operator would type it;
//! root only.
//!
//! A [`Node`] is the bridge (`10.77.<n>.1/24`, `fd77:0:0:<n in hex>::1/64`), a [`Pod`] a namespace
//! with a veth on it (`.2`, `.3`, ... of both subnets); both are removed on drop. What runs in
//! a pod runs through [`Pod::command`] (`ip netns exec`); the sidecar through
//! [`Pod::sidecar_command`], with the group id [`Capture`] exempts. [`Pod::hosts`] gives a pod
//! its own `/etc/hosts` (names of services to their VIPs, as cluster DNS would answer), and
//! [`Cgroup`] puts the calling process (and so everything it starts) in a cgroup v2 of its own,
//! what the eBPF bypass attaches to. [`connect_in`] reaches, from the node, what a pod serves
//! on its loopback only.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU8, Ordering};

/// The group id a pod's sidecar runs with: its connections are never captured (Istio's
/// proxy uid/gid, 1337).
pub const PROXY_GID: u32 = 1337;

/// Why a pod or node could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("cannot run `{0}`: {1} (are iproute2 and iptables installed? `scripts/setup` installs them)")]
    Spawn(String, #[source] std::io::Error),
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("node {0} has no addresses left for another pod")]
    Full(u8),
    #[error("no free node index in {0:?}: bridges hypha<N> exist for all")]
    NoFreeNode(std::ops::RangeInclusive<u8>),
    #[error("{0}: {1}")]
    Io(PathBuf, #[source] std::io::Error),
}

/// Connects to `addr` from inside the network namespace `netns` (a name under `/run/netns`):
/// how the node reaches what a pod serves on its loopback only (its sidecar's admin, its app's
/// proxy listener). A thread that enters the namespace makes the connection and ends; the
/// connection stays in the namespace. Blocking.
pub fn connect_in(
    netns: &str,
    addr: std::net::SocketAddr,
    timeout: std::time::Duration,
) -> std::io::Result<std::net::TcpStream> {
    let file = std::fs::File::open(Path::new("/run/netns").join(netns))?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                use std::os::fd::AsFd;
                rustix::thread::move_into_link_name_space(
                    file.as_fd(),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )?;
                std::net::TcpStream::connect_timeout(&addr, timeout)
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the namespace thread panicked")))
    })
}

/// Whether this process runs as root (effective uid 0), from `/proc/self/status`: pods,
/// capture and the bypass need it.
pub fn is_root() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .is_some_and(|euid| euid == "0")
}

fn run(program: &str, args: &[&str]) -> Result<Output, PodError> {
    let line = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| PodError::Spawn(line.clone(), e))?;
    if !out.status.success() {
        return Err(PodError::Failed {
            command: line,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out)
}

fn ip(args: &[&str]) -> Result<Output, PodError> {
    run("ip", args)
}

/// A bridge that pods attach to: the "node" network, routed to nothing else.
#[derive(Debug)]
pub struct Node {
    index: u8,
    bridge: String,
    next: AtomicU8,
    /// Removed on drop (made by [`Node::create`]); [`Node::ensure`]'s bridge stays.
    owned: bool,
}

impl Node {
    /// Creates bridge `hypha<index>` with `10.77.<index>.1/24` and `fd77:0:0:<index in hex>::1/64`
    /// (an old one of that name, left by a killed run, is replaced).
    pub fn create(index: u8) -> Result<Node, PodError> {
        let bridge = format!("hypha{index}");
        let _ = ip(&["link", "del", &bridge]);
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        let node = Node {
            index,
            bridge,
            next: AtomicU8::new(2),
            owned: true,
        };
        ip(&[
            "addr",
            "add",
            &format!("{}/24", node.ipv4()),
            "dev",
            &node.bridge,
        ])?;
        ip(&[
            "-6",
            "addr",
            "add",
            &format!("{}/64", node.ipv6()),
            "dev",
            &node.bridge,
            "nodad",
        ])?;
        ip(&["link", "set", &node.bridge, "up"])?;
        Ok(node)
    }

    /// A new node with the first index in `range` that has no bridge yet (a program that
    /// wants a node of its own, next to others' nodes).
    pub fn create_free(range: std::ops::RangeInclusive<u8>) -> Result<Node, PodError> {
        let index = range
            .clone()
            .find(|i| !Path::new(&format!("/sys/class/net/hypha{i}")).exists())
            .ok_or(PodError::NoFreeNode(range))?;
        Node::create(index)
    }

    /// The node's index (its bridge is `hypha<index>`).
    pub fn index(&self) -> u8 {
        self.index
    }

    /// The node `index` as it is, created if it is not there; it stays when this is dropped
    /// (`hypha pod`: pods outlive the command). Its next pod takes the lowest free address.
    pub fn ensure(index: u8) -> Result<Node, PodError> {
        let bridge = format!("hypha{index}");
        let exists = ip(&["link", "show", &bridge]).is_ok();
        let mut node = if exists {
            Node {
                index,
                bridge,
                next: AtomicU8::new(2),
                owned: false,
            }
        } else {
            Node::create(index)?
        };
        node.owned = false;
        let used = node.used_hosts()?;
        let free = (2..=254)
            .find(|h| !used.contains(h))
            .ok_or(PodError::Full(index))?;
        node.next = AtomicU8::new(free);
        Ok(node)
    }

    /// Host numbers of the pods on this node now (from their namespaces' addresses).
    fn used_hosts(&self) -> Result<Vec<u8>, PodError> {
        let list = ip(&["netns", "list"])?;
        let prefix = format!("hypha{}-", self.index);
        let mut used = Vec::new();
        for line in String::from_utf8_lossy(&list.stdout).lines() {
            let Some(ns) = line
                .split_whitespace()
                .next()
                .filter(|n| n.starts_with(&prefix))
            else {
                continue;
            };
            let Ok(addrs) = ip(&["-n", ns, "-4", "-o", "addr", "show", "dev", "eth0"]) else {
                continue;
            };
            let text = String::from_utf8_lossy(&addrs.stdout).into_owned();
            used.extend(text.split_whitespace().filter_map(|w| {
                let ip: Ipv4Addr = w.split_once('/')?.0.parse().ok()?;
                Some(ip.octets()[3])
            }));
        }
        Ok(used)
    }

    /// Removes node `index`'s bridge and every pod on it.
    pub fn remove(index: u8) -> Result<(), PodError> {
        let list = ip(&["netns", "list"])?;
        let prefix = format!("hypha{index}-");
        for line in String::from_utf8_lossy(&list.stdout).lines() {
            if let Some(ns) = line
                .split_whitespace()
                .next()
                .filter(|n| n.starts_with(&prefix))
            {
                ip(&["netns", "del", ns])?;
                remove_etc(ns);
            }
        }
        let _ = ip(&["link", "del", &format!("hypha{index}")]);
        Ok(())
    }

    /// The node's own IPv4 address on the bridge (pods' default gateway).
    pub fn ipv4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.index, 1)
    }

    /// The node's own IPv6 address on the bridge.
    pub fn ipv6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd77, 0, 0, u16::from(self.index), 0, 0, 0, 1)
    }

    /// A new pod `name` (its namespace `hypha<index>-<name>`) on this node, both families up,
    /// default routes through the bridge.
    pub fn pod(&self, name: &str) -> Result<Pod, PodError> {
        let host = self.next.fetch_add(1, Ordering::Relaxed);
        if host == 0 || host == 255 {
            return Err(PodError::Full(self.index));
        }
        let netns = format!("hypha{}-{name}", self.index);
        let _ = ip(&["netns", "del", &netns]);
        remove_etc(&netns);
        // A namespace's devices go when the kernel gets round to it, after `netns del`: a pod
        // of the same name and address removed a moment ago may still have its veth.
        let veth = format!("hyv{}x{host}", self.index);
        let _ = ip(&["link", "del", &veth]);
        ip(&["netns", "add", &netns])?;
        let pod = Pod {
            name: name.to_string(),
            veth,
            netns,
            ipv4: Ipv4Addr::new(10, 77, self.index, host),
            ipv6: Ipv6Addr::new(
                0xfd77,
                0,
                0,
                u16::from(self.index),
                0,
                0,
                0,
                u16::from(host),
            ),
        };
        ip(&[
            "link", "add", &pod.veth, "type", "veth", "peer", "name", "eth0", "netns", &pod.netns,
        ])?;
        ip(&["link", "set", &pod.veth, "master", &self.bridge])?;
        ip(&["link", "set", &pod.veth, "up"])?;
        let ns = |args: &[&str]| {
            let mut full = vec!["-n", pod.netns.as_str()];
            full.extend_from_slice(args);
            ip(&full)
        };
        ns(&["link", "set", "lo", "up"])?;
        ns(&["addr", "add", &format!("{}/24", pod.ipv4), "dev", "eth0"])?;
        ns(&[
            "-6",
            "addr",
            "add",
            &format!("{}/64", pod.ipv6),
            "dev",
            "eth0",
            "nodad",
        ])?;
        ns(&["link", "set", "eth0", "up"])?;
        ns(&["route", "add", "default", "via", &self.ipv4().to_string()])?;
        ns(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &self.ipv6().to_string(),
        ])?;
        Ok(pod)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.owned {
            let _ = ip(&["link", "del", &self.bridge]);
        }
    }
}

/// A workload's network namespace on a [`Node`]; deleted (with its veth) on drop.
#[derive(Debug)]
pub struct Pod {
    pub name: String,
    pub netns: String,
    /// The node's end of the pod's veth pair (`hyv<node>x<host>`).
    veth: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
}

impl Pod {
    /// `program` run inside the pod's namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.netns]).arg(program);
        c
    }

    /// `program` run inside the pod as its sidecar: group id [`PROXY_GID`], so the capture
    /// rules let its own connections through.
    pub fn sidecar_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        use std::os::unix::process::CommandExt;
        let mut c = self.command(program);
        c.gid(PROXY_GID);
        c
    }

    /// Gives the pod its own `/etc/hosts` with `names` (address, name) after the loopback
    /// entries: `ip netns exec` shows `/etc/netns/<netns>/hosts` as `/etc/hosts` to what runs
    /// in the pod. Removed with the pod.
    pub fn hosts(&self, names: &[(IpAddr, String)]) -> Result<(), PodError> {
        let dir = etc_dir(&self.netns);
        std::fs::create_dir_all(&dir).map_err(|e| PodError::Io(dir.clone(), e))?;
        let mut text = String::from(
            "# Written by hypha for this pod: its services' names, as cluster DNS would answer.\n\
             127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
        );
        for (ip, name) in names {
            text.push_str(&format!("{ip}\t{name}\n"));
        }
        let path = dir.join("hosts");
        std::fs::write(&path, text).map_err(|e| PodError::Io(path, e))
    }

    /// Installs `capture`'s rules in the pod (IPv4 and IPv6), and puts the inbound
    /// passthrough source `::6` on its loopback (`127.0.0.6` is there already).
    pub fn capture(&self, capture: &Capture) -> Result<(), PodError> {
        capture.install(Some(&self.netns))
    }
}

impl Pod {
    /// Leaves the pod in place when this is dropped (`hypha pod up`); [`Pod::remove`] or
    /// [`Node::remove`] takes it away.
    pub fn keep(self) {
        std::mem::forget(self);
    }

    /// Removes pod `name` of node `index`.
    pub fn remove(index: u8, name: &str) -> Result<(), PodError> {
        let netns = format!("hypha{index}-{name}");
        ip(&["netns", "del", &netns])?;
        remove_etc(&netns);
        Ok(())
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        // The veth first, at once (with the namespace it would go later, asynchronously).
        let _ = ip(&["link", "del", &self.veth]);
        let _ = ip(&["netns", "del", &self.netns]);
        remove_etc(&self.netns);
    }
}

/// The files `ip netns exec` shows a namespace in place of `/etc`'s.
fn etc_dir(netns: &str) -> PathBuf {
    Path::new("/etc/netns").join(netns)
}

/// Removes a namespace's `/etc/netns` files, if [`Pod::hosts`] wrote any.
fn remove_etc(netns: &str) {
    let _ = std::fs::remove_dir_all(etc_dir(netns));
}

/// The cgroup v2 mount point (`/sys/fs/cgroup` on a unified system, `/sys/fs/cgroup/unified`
/// on a hybrid one), from `/proc/self/mountinfo`.
pub fn cgroup2_root() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mount_point = left.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(mount_point))
    })
}

/// A cgroup v2 of its own with this whole process in it while it lives: everything the
/// process starts meanwhile is in it too, and so are the sockets they create (what the
/// bypass's programs, attached to the cgroup, see). Moved back and removed on drop, which
/// needs every process started meanwhile to have exited.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
    was: PathBuf,
}

impl Cgroup {
    /// Creates `<cgroup2 root>/<name>` (an old empty one of that name is replaced) and moves
    /// this process into it.
    pub fn enter(name: &str) -> Result<Cgroup, PodError> {
        let mountinfo = PathBuf::from("/proc/self/mountinfo");
        let root = cgroup2_root().ok_or_else(|| {
            PodError::Io(
                mountinfo,
                std::io::Error::other("no cgroup v2 mount (cgroup2)"),
            )
        })?;
        let own_path = PathBuf::from("/proc/self/cgroup");
        let own =
            std::fs::read_to_string(&own_path).map_err(|e| PodError::Io(own_path.clone(), e))?;
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .ok_or_else(|| PodError::Io(own_path, std::io::Error::other("no cgroup v2 line")))?;
        let was = root.join(rel.trim_start_matches('/'));
        let path = root.join(name);
        let _ = std::fs::remove_dir(&path);
        std::fs::create_dir(&path).map_err(|e| PodError::Io(path.clone(), e))?;
        let procs = path.join("cgroup.procs");
        if let Err(e) = std::fs::write(&procs, std::process::id().to_string()) {
            let _ = std::fs::remove_dir(&path);
            return Err(PodError::Io(procs, e));
        }
        Ok(Cgroup { path, was })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let pid = std::process::id().to_string();
        if std::fs::write(self.was.join("cgroup.procs"), &pid).is_err() {
            if let Some(root) = cgroup2_root() {
                let _ = std::fs::write(root.join("cgroup.procs"), &pid);
            }
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// The source address of the sidecar's connections to the pod's own address for inbound
/// traffic no service declares (Istio's `::6`; IPv4's `127.0.0.6` is on every loopback).
pub const PASSTHROUGH_SOURCE_V6: &str = "::6/128";

/// Transparent capture as Istio's init container sets it up (`istio-iptables`), with the
/// same default ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capture {
    /// Where the app's outbound TCP goes (the sidecar's `--capture-outbound`).
    pub outbound_port: u16,
    /// Where inbound TCP goes (the sidecar's `--capture-inbound`).
    pub inbound_port: u16,
    /// Connections of processes with this group id are never captured: the sidecar's.
    pub proxy_gid: u32,
    /// Inbound destination ports left alone (e.g. an admin port reachable from the node).
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound destination ports left alone.
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound destination CIDRs left alone (each applies to its own family).
    pub exclude_outbound_cidrs: Vec<String>,
    /// The inbound destination ports captured: `None` for all of them (Istio's `*`), else
    /// only these (none: no inbound capture).
    pub include_inbound_ports: Option<Vec<u16>>,
    /// The outbound destination CIDRs captured: `None` for all (Istio's `*`), else only these
    /// (each applies to its own family; the exclusions come first).
    pub include_outbound_cidrs: Option<Vec<String>>,
}

impl Default for Capture {
    fn default() -> Capture {
        Capture {
            outbound_port: 15001,
            inbound_port: 15006,
            proxy_gid: PROXY_GID,
            exclude_inbound_ports: Vec::new(),
            exclude_outbound_ports: Vec::new(),
            exclude_outbound_cidrs: Vec::new(),
            include_inbound_ports: None,
            include_outbound_cidrs: None,
        }
    }
}

impl Capture {
    /// The `nat` table rules for one family, as `iptables -t nat` arguments, in order.
    pub fn rules(&self, v6: bool) -> Vec<Vec<String>> {
        let words = |rule: String| rule.split_whitespace().map(String::from).collect();
        let mut r: Vec<Vec<String>> = [
            "HYPHA_INBOUND",
            "HYPHA_IN_REDIRECT",
            "HYPHA_OUTPUT",
            "HYPHA_REDIRECT",
        ]
        .into_iter()
        .map(|chain| words(format!("-N {chain}")))
        .collect();
        let (out, inb) = (self.outbound_port, self.inbound_port);
        r.push(words(format!(
            "-A HYPHA_REDIRECT -p tcp -j REDIRECT --to-ports {out}"
        )));
        r.push(words(format!(
            "-A HYPHA_IN_REDIRECT -p tcp -j REDIRECT --to-ports {inb}"
        )));
        // Inbound: every TCP connection arriving from outside the pod, but excluded ports.
        r.push(words("-A PREROUTING -p tcp -j HYPHA_INBOUND".into()));
        for p in &self.exclude_inbound_ports {
            r.push(words(format!(
                "-A HYPHA_INBOUND -p tcp --dport {p} -j RETURN"
            )));
        }
        match &self.include_inbound_ports {
            None => r.push(words("-A HYPHA_INBOUND -p tcp -j HYPHA_IN_REDIRECT".into())),
            Some(ports) => {
                for p in ports {
                    r.push(words(format!(
                        "-A HYPHA_INBOUND -p tcp --dport {p} -j HYPHA_IN_REDIRECT"
                    )));
                }
            }
        }
        // Outbound: every TCP connection the pod opens, but the sidecar's own, loopback and
        // excluded destinations.
        r.push(words("-A OUTPUT -p tcp -j HYPHA_OUTPUT".into()));
        let gid = self.proxy_gid;
        r.push(words(format!(
            "-A HYPHA_OUTPUT -m owner --gid-owner {gid} -j RETURN"
        )));
        let loopback = if v6 { "::1/128" } else { "127.0.0.1/32" };
        r.push(words(format!("-A HYPHA_OUTPUT -d {loopback} -j RETURN")));
        for p in &self.exclude_outbound_ports {
            r.push(words(format!(
                "-A HYPHA_OUTPUT -p tcp --dport {p} -j RETURN"
            )));
        }
        // A CIDR is the user's text: one argument, never split.
        let to = |cidr: &String, target: &str| {
            let mut rule: Vec<String> = words("-A HYPHA_OUTPUT -d".into());
            rule.push(cidr.clone());
            rule.extend(words(format!("-j {target}")));
            rule
        };
        let family = |c: &&String| c.contains(':') == v6;
        for cidr in self.exclude_outbound_cidrs.iter().filter(family) {
            r.push(to(cidr, "RETURN"));
        }
        match &self.include_outbound_cidrs {
            None => r.push(words("-A HYPHA_OUTPUT -j HYPHA_REDIRECT".into())),
            Some(cidrs) => r.extend(cidrs.iter().filter(family).map(|c| to(c, "HYPHA_REDIRECT"))),
        }
        r
    }

    /// Installs the rules (IPv4 and IPv6) in network namespace `netns`, or in the one this
    /// process is in (a pod's init container, `hypha capture`), and puts the inbound
    /// passthrough source `::6` on its loopback (`127.0.0.6` is there already).
    pub fn install(&self, netns: Option<&str>) -> Result<(), PodError> {
        let inside = |args: &[&str]| match netns {
            Some(ns) => {
                let mut all = vec!["netns", "exec", ns];
                all.extend_from_slice(args);
                ip(&all)
            }
            None => run(args[0], &args[1..]),
        };
        match inside(&[
            "ip",
            "-6",
            "addr",
            "add",
            PASSTHROUGH_SOURCE_V6,
            "dev",
            "lo",
        ]) {
            Err(PodError::Failed { stderr, .. }) if stderr.contains("File exists") => {}
            other => {
                other?;
            }
        }
        for (tool, v6) in [("iptables", false), ("ip6tables", true)] {
            for rule in self.rules(v6) {
                let mut args = vec![tool, "-w", "-t", "nat"];
                args.extend(rule.iter().map(String::as_str));
                inside(&args)?;
            }
        }
        Ok(())
    }
}

/// The values of Istio's capture annotations (`traffic.sidecar.istio.io/<field>`), as written:
/// comma-separated, `*` for all. For `hypha capture`'s flags, and the injector's pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Annotations {
    pub include_outbound_ip_ranges: String,
    pub exclude_outbound_ip_ranges: String,
    pub exclude_outbound_ports: String,
    pub include_inbound_ports: String,
    pub exclude_inbound_ports: String,
}

impl Default for Annotations {
    /// Istio's defaults: everything captured, nothing excluded.
    fn default() -> Annotations {
        Annotations {
            include_outbound_ip_ranges: "*".into(),
            exclude_outbound_ip_ranges: String::new(),
            exclude_outbound_ports: String::new(),
            include_inbound_ports: "*".into(),
            exclude_inbound_ports: String::new(),
        }
    }
}

impl Capture {
    /// This capture with the lists `a` gives (replacing its own); an error names the list and
    /// the item that is not a port or a CIDR.
    pub fn with_annotations(self, a: &Annotations) -> Result<Capture, String> {
        let capture = Capture {
            include_outbound_cidrs: annotation_list(
                "includeOutboundIPRanges",
                &a.include_outbound_ip_ranges,
            )?,
            exclude_outbound_cidrs: annotation_list(
                "excludeOutboundIPRanges",
                &a.exclude_outbound_ip_ranges,
            )?
            .unwrap_or_default(),
            exclude_outbound_ports: annotation_list(
                "excludeOutboundPorts",
                &a.exclude_outbound_ports,
            )?
            .unwrap_or_default(),
            include_inbound_ports: annotation_list(
                "includeInboundPorts",
                &a.include_inbound_ports,
            )?,
            exclude_inbound_ports: annotation_list(
                "excludeInboundPorts",
                &a.exclude_inbound_ports,
            )?
            .unwrap_or_default(),
            ..self
        };
        let cidrs = (capture.include_outbound_cidrs.iter().flatten())
            .chain(&capture.exclude_outbound_cidrs);
        for cidr in cidrs {
            check_cidr(cidr)?;
        }
        Ok(capture)
    }
}

/// A list of Istio's capture annotations (`traffic.sidecar.istio.io/...`): comma-separated
/// items, `*` for all (`None`), empty for none.
fn annotation_list<T: std::str::FromStr>(what: &str, text: &str) -> Result<Option<Vec<T>>, String> {
    let text = text.trim();
    if text == "*" {
        return Ok(None);
    }
    text.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| {
            item.parse()
                .map_err(|_| format!("{what}: {item:?} is not valid"))
        })
        .collect::<Result<Vec<T>, String>>()
        .map(Some)
}

/// Checks that `cidr` is an address and a prefix length within its family.
fn check_cidr(cidr: &str) -> Result<(), String> {
    let (addr, len) = cidr.split_once('/').unwrap_or((cidr, ""));
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("{cidr:?} is not a CIDR (address/length)"))?;
    let max = if addr.is_ipv6() { 128 } else { 32 };
    match len.parse::<u8>() {
        Ok(n) if n <= max => Ok(()),
        _ => Err(format!(
            "{cidr:?} is not a CIDR (address/length, length at most {max})"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_redirect_both_ways_and_exempt_the_sidecar() {
        let c = Capture {
            exclude_inbound_ports: vec![15021],
            exclude_outbound_cidrs: vec!["10.0.0.0/8".into(), "fd00::/8".into()],
            ..Capture::default()
        };
        let v4: Vec<String> = c.rules(false).iter().map(|r| r.join(" ")).collect();
        let v6: Vec<String> = c.rules(true).iter().map(|r| r.join(" ")).collect();
        for rules in [&v4, &v6] {
            assert!(rules.contains(&"-A HYPHA_REDIRECT -p tcp -j REDIRECT --to-ports 15001".into()));
            assert!(
                rules.contains(&"-A HYPHA_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006".into())
            );
            assert!(rules.contains(&"-A HYPHA_INBOUND -p tcp --dport 15021 -j RETURN".into()));
            let exempt = rules
                .iter()
                .position(|r| r == "-A HYPHA_OUTPUT -m owner --gid-owner 1337 -j RETURN")
                .expect("the sidecar's group is exempt");
            let redirect = rules
                .iter()
                .position(|r| r == "-A HYPHA_OUTPUT -j HYPHA_REDIRECT")
                .unwrap();
            assert!(exempt < redirect, "the exemption comes before the redirect");
            assert_eq!(rules.last().unwrap(), "-A HYPHA_OUTPUT -j HYPHA_REDIRECT");
        }
        assert!(v4.contains(&"-A HYPHA_OUTPUT -d 10.0.0.0/8 -j RETURN".into()));
        assert!(!v4.iter().any(|r| r.contains("fd00::/8")));
        assert!(v6.contains(&"-A HYPHA_OUTPUT -d fd00::/8 -j RETURN".into()));
        assert!(v6.contains(&"-A HYPHA_OUTPUT -d ::1/128 -j RETURN".into()));
    }

    #[test]
    fn included_ranges_and_ports_are_the_only_ones_captured() {
        let c = Capture {
            exclude_outbound_cidrs: vec!["10.96.0.10/32".into()],
            include_outbound_cidrs: Some(vec!["10.96.0.0/12".into(), "fd00:10:96::/112".into()]),
            include_inbound_ports: Some(vec![8080, 9090]),
            ..Capture::default()
        };
        let v4: Vec<String> = c.rules(false).iter().map(|r| r.join(" ")).collect();
        let v6: Vec<String> = c.rules(true).iter().map(|r| r.join(" ")).collect();
        // Outbound: the exclusion first, then only the included range; no catch-all.
        let tail: Vec<&str> = v4.iter().rev().take(2).rev().map(String::as_str).collect();
        assert_eq!(
            tail,
            [
                "-A HYPHA_OUTPUT -d 10.96.0.10/32 -j RETURN",
                "-A HYPHA_OUTPUT -d 10.96.0.0/12 -j HYPHA_REDIRECT"
            ]
        );
        assert!(v6.contains(&"-A HYPHA_OUTPUT -d fd00:10:96::/112 -j HYPHA_REDIRECT".into()));
        for rules in [&v4, &v6] {
            assert!(!rules.contains(&"-A HYPHA_OUTPUT -j HYPHA_REDIRECT".into()));
            assert!(!rules.contains(&"-A HYPHA_INBOUND -p tcp -j HYPHA_IN_REDIRECT".into()));
            for port in [8080, 9090] {
                let rule = format!("-A HYPHA_INBOUND -p tcp --dport {port} -j HYPHA_IN_REDIRECT");
                assert!(rules.contains(&rule));
            }
        }
        // No inbound ports: nothing arriving is captured.
        let none = Capture {
            include_inbound_ports: Some(Vec::new()),
            ..Capture::default()
        };
        assert!(!none
            .rules(false)
            .iter()
            .any(|r| r.join(" ").contains("HYPHA_IN_REDIRECT") && r[1] == "HYPHA_INBOUND"));
    }

    #[test]
    fn annotation_lists_read_as_istio_writes_them() {
        assert_eq!(annotation_list::<u16>("ports", "*"), Ok(None));
        assert_eq!(annotation_list::<u16>("ports", ""), Ok(Some(Vec::new())));
        assert_eq!(
            annotation_list::<u16>("ports", "8080, 9090"),
            Ok(Some(vec![8080, 9090]))
        );
        assert!(annotation_list::<u16>("ports", "80,http").is_err());
        assert!(check_cidr("10.0.0.0/8").is_ok() && check_cidr("fd00::/8").is_ok());
        for bad in ["10.0.0.0", "10.0.0.0/33", "fd00::/129", "example.com/8"] {
            assert!(check_cidr(bad).is_err(), "{bad}");
        }
        // Read into a capture, its own ports kept; a bad CIDR refused by name.
        let c = Capture {
            outbound_port: 16001,
            ..Capture::default()
        }
        .with_annotations(&Annotations {
            exclude_inbound_ports: "15021".into(),
            include_outbound_ip_ranges: "10.96.0.0/12".into(),
            ..Annotations::default()
        })
        .unwrap();
        assert_eq!(c.outbound_port, 16001);
        assert_eq!(c.exclude_inbound_ports, [15021]);
        assert_eq!(
            c.include_outbound_cidrs,
            Some(vec!["10.96.0.0/12".to_owned()])
        );
        assert_eq!(c.include_inbound_ports, None);
        let bad = Capture::default().with_annotations(&Annotations {
            exclude_outbound_ip_ranges: "10.0.0.0/40".into(),
            ..Annotations::default()
        });
        assert!(bad.unwrap_err().contains("10.0.0.0/40"));
    }
}
