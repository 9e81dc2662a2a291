//! Same-host TCP/IP bypass with eBPF: Hypha's node agent (`hypha bypass`) and its library.
//!
//! Between an app and its sidecar, and between two sidecars on one host, every byte crosses
//! the kernel's TCP/IP stack on loopback (or a bridge). The BPF programs in `bpf/bypass.c`
//! (compiled by `build.rs` with clang) short-cut that: a `sockops` program attached to a
//! cgroup v2 records both ends of each TCP connection established by a process in the cgroup
//! in a SOCKHASH, keyed by addresses, ports and family (IPv4, IPv6, IPv4-mapped IPv6 counted
//! as IPv4); an `sk_msg` program attached to that map moves each message sent on a recorded
//! socket straight onto the receive queue of the connection's other end
//! (`bpf_msg_redirect_hash(.., BPF_F_INGRESS)`). Anything it cannot redirect (the other end is
//! not recorded: another host, another cgroup, a socket from before the attach) takes the
//! normal path, so attaching never breaks a connection.
//!
//! Transparent capture by iptables REDIRECT defeats the pairing (the app's socket names the
//! service, the sidecar's its capture port), so pods registered with [`Bypass::add_pod`] are
//! captured at connect instead: `cgroup/connect4|6` programs rewrite the destination before
//! the kernel connects and a `cgroup/getsockopt` program answers the sidecar's
//! `SO_ORIGINAL_DST` (see [`CapturedPod`] and `bpf/bypass.c`).
//!
//! What it cannot do, by the kernel's design: sockets created before [`Bypass::attach`] are
//! never recorded (the programs see connections as they become established), and both ends
//! must be in the cgroup (or below it).
//!
//! [`Bypass`] owns the loaded programs and maps; [`Bypass::counters`] reads the programs'
//! per-CPU counters, [`Bypass::detach`] (or drop) detaches the programs from the cgroup and
//! the map. [`serve`] is `hypha bypass`: attach, serve `/metrics`, detach on shutdown.

use std::fmt::Write as _;
use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, SockHash};
use aya::programs::cgroup_sock_addr::CgroupSockAddrLinkId;
use aya::programs::cgroup_sockopt::CgroupSockoptLinkId;
use aya::programs::sk_msg::SkMsgLinkId;
use aya::programs::sock_ops::SockOpsLinkId;
use aya::programs::{CgroupAttachMode, CgroupSockAddr, CgroupSockopt, SkMsg, SockOps};
use aya::Ebpf;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// The BPF object `build.rs` compiled from `bpf/bypass.c`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bypass.o"));

const SOCKOPS: &str = "hypha_sockops";
const SK_MSG: &str = "hypha_sk_msg";
const CONNECT4: &str = "hypha_connect4";
const CONNECT6: &str = "hypha_connect6";
const GETSOCKOPT: &str = "hypha_getsockopt";
const SOCKS: &str = "hypha_socks";
const COUNTERS: &str = "hypha_counters";
const PODS: &str = "hypha_pods";
const POD_ADDRS: &str = "hypha_pod_addrs";
const CONNECTING: &str = "hypha_connecting";
const ORIGINAL_DST: &str = "hypha_original_dst";

/// `struct key` of `bpf/bypass.c`: one end of a connection, its own address and port first.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    /// The network namespace's cookie for loopback addresses, else 0.
    pub netns: u64,
    /// 4 or 6.
    pub family: u32,
    /// Network byte order; IPv4 in the first word.
    pub local_ip: [u32; 4],
    pub remote_ip: [u32; 4],
    /// Host byte order.
    pub local_port: u32,
    pub remote_port: u32,
    pub pad: u32,
}

// SAFETY: `Key` is `repr(C)`, made of one `u64` and `u32`s laid out without padding (every
// bit pattern valid; the size is checked below), and matches `struct key` in bpf/bypass.c
// field for field, which is what `Pod` requires.
#[allow(unsafe_code)]
unsafe impl aya::Pod for Key {}

const _: () = assert!(std::mem::size_of::<Key>() == 56);

/// `struct pod` of `bpf/bypass.c`: a pod whose connections are captured at connect.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PodValue {
    outbound_port: u16,
    inbound_port: u16,
    sidecar_gid: u32,
    exclude_outbound: [u16; 8],
    exclude_inbound: [u16; 8],
    exclude_cidrs: [Cidr; 8],
}

// SAFETY: `repr(C)`, two `u16`, a `u32`, two `u16` arrays and an array of `Cidr` (all `u32`),
// no padding (size checked below), every bit pattern valid; it matches `struct pod` in
// bpf/bypass.c.
#[allow(unsafe_code)]
unsafe impl aya::Pod for PodValue {}

const _: () = assert!(std::mem::size_of::<PodValue>() == 40 + 8 * 24);

/// `struct cidr` of `bpf/bypass.c`: family 4 or 6 (0: unused), prefix length, the address as
/// [`Addr`] has it.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Cidr {
    family: u32,
    prefix: u32,
    ip: [u32; 4],
}

const _: () = assert!(std::mem::size_of::<Cidr>() == 24);

/// An address range (`10.0.0.0/8`, `fd00::/8`): the address and the prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpRange {
    pub addr: std::net::IpAddr,
    pub prefix: u8,
}

impl std::str::FromStr for IpRange {
    type Err = String;

    /// `ADDR/PREFIX`, or an address alone (the whole address).
    fn from_str(s: &str) -> Result<IpRange, String> {
        let (addr, prefix) = s.split_once('/').unwrap_or((s, ""));
        let addr: std::net::IpAddr = addr
            .parse()
            .map_err(|e| format!("{s:?}: not an address range ({e})"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = if prefix.is_empty() {
            max
        } else {
            prefix
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to {max}"))?
        };
        Ok(IpRange { addr, prefix })
    }
}

impl std::fmt::Display for IpRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Cidr {
    fn of(range: IpRange) -> Cidr {
        let a = Addr::of(range.addr);
        Cidr {
            family: a.family,
            prefix: u32::from(range.prefix),
            ip: a.ip,
        }
    }
}

/// `struct addr` of `bpf/bypass.c`: family 4 (address in the first word) or 6, network order.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Addr {
    family: u32,
    ip: [u32; 4],
}

// SAFETY: `repr(C)`, five `u32`, no padding (size checked below), every bit pattern valid;
// it matches `struct addr` in bpf/bypass.c.
#[allow(unsafe_code)]
unsafe impl aya::Pod for Addr {}

const _: () = assert!(std::mem::size_of::<Addr>() == 20);

impl Addr {
    fn of(ip: std::net::IpAddr) -> Addr {
        let ip = ip.to_canonical();
        match ip {
            std::net::IpAddr::V4(v4) => Addr {
                family: 4,
                ip: [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
            },
            std::net::IpAddr::V6(v6) => {
                let o = v6.octets();
                let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                Addr {
                    family: 6,
                    ip: [word(0), word(4), word(8), word(12)],
                }
            }
        }
    }
}

/// `struct orig` of `bpf/bypass.c`: a connection's original destination (port in network
/// byte order).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Orig {
    addr: Addr,
    port: u32,
}

// SAFETY: `repr(C)`, an `Addr` and a `u32`, no padding (size checked below), every bit
// pattern valid; it matches `struct orig` in bpf/bypass.c.
#[allow(unsafe_code)]
unsafe impl aya::Pod for Orig {}

const _: () = assert!(std::mem::size_of::<Orig>() == 24);

/// A pod whose TCP connections are captured when they are made rather than by iptables NAT,
/// so the bypass can pair them (see `bpf/bypass.c`): its app's connections go to its
/// sidecar's outbound port on loopback, and other registered pods' sidecars reach it on its
/// inbound port; the sidecar's `SO_ORIGINAL_DST` still gives the original destination. The
/// pod keeps its iptables rules for whatever this does not take. Its settings must be the
/// ones its capture rules have (`hypha_pod::Capture`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapturedPod {
    /// The pod's network namespace (e.g. `/run/netns/<name>`).
    pub netns: PathBuf,
    pub outbound_port: u16,
    pub inbound_port: u16,
    /// The sidecar's group: its own connections are not the app's.
    pub sidecar_gid: u32,
    /// At most 8 each.
    pub exclude_outbound_ports: Vec<u16>,
    pub exclude_inbound_ports: Vec<u16>,
    /// Destination ranges the app reaches directly, at most 8.
    pub exclude_outbound_cidrs: Vec<IpRange>,
}

impl CapturedPod {
    /// Istio's defaults (15001, 15006, group 1337, nothing excluded) for the pod in `netns`.
    pub fn new(netns: impl Into<PathBuf>) -> CapturedPod {
        CapturedPod {
            netns: netns.into(),
            outbound_port: 15001,
            inbound_port: 15006,
            sidecar_gid: 1337,
            exclude_outbound_ports: Vec::new(),
            exclude_inbound_ports: Vec::new(),
            exclude_outbound_cidrs: Vec::new(),
        }
    }
}

/// A network namespace's cookie (what `bpf_get_netns_cookie` returns in it) and its
/// addresses other than loopback, read from a thread that enters it.
fn netns_identity(netns: &Path) -> io::Result<(u64, Vec<std::net::IpAddr>)> {
    let file = File::open(netns)?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                use std::os::fd::AsRawFd;
                // SAFETY: setns on a descriptor we own; it moves only this thread (spawned
                // for this and ended right after) into the namespace.
                #[allow(unsafe_code)]
                let entered = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                if entered != 0 {
                    return Err(io::Error::last_os_error());
                }
                let sock =
                    socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                let mut cookie: u64 = 0;
                let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
                // SAFETY: SO_NETNS_COOKIE writes one u64 into `cookie`, whose size `len` gives.
                #[allow(unsafe_code)]
                let got = unsafe {
                    libc::getsockopt(
                        sock.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_NETNS_COOKIE,
                        (&mut cookie as *mut u64).cast(),
                        &mut len,
                    )
                };
                if got != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok((cookie, interface_addresses()?))
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the namespace thread panicked")))
    })
}

/// The calling thread's network namespace's addresses, loopback left out.
fn interface_addresses() -> io::Result<Vec<std::net::IpAddr>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list we free below with freeifaddrs.
    #[allow(unsafe_code)]
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut at = list;
    while !at.is_null() {
        // SAFETY: `at` is a node of the list getifaddrs returned, not yet freed; `ifa_addr`
        // is null or points to a sockaddr of the family it names, sized for it.
        #[allow(unsafe_code)]
        unsafe {
            let ifa = &*at;
            if !ifa.ifa_addr.is_null() {
                match i32::from((*ifa.ifa_addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*ifa.ifa_addr.cast::<libc::sockaddr_in>();
                        out.push(std::net::IpAddr::from(
                            u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                        ));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*ifa.ifa_addr.cast::<libc::sockaddr_in6>();
                        out.push(std::net::IpAddr::from(sin6.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            at = ifa.ifa_next;
        }
    }
    // SAFETY: the list getifaddrs allocated, freed once, not used after.
    #[allow(unsafe_code)]
    unsafe {
        libc::freeifaddrs(list)
    };
    out.retain(|ip| !ip.is_loopback());
    Ok(out)
}

/// Why the bypass could not be set up or read.
#[derive(Debug, thiserror::Error)]
pub enum BypassError {
    #[error("cannot open the cgroup {0}: {1}")]
    Cgroup(PathBuf, #[source] io::Error),
    #[error("{0} is not a cgroup v2 directory (no cgroup.procs)")]
    NotCgroup(PathBuf),
    #[error("loading the BPF programs: {0} (needs root or CAP_BPF + CAP_NET_ADMIN)")]
    Load(#[from] aya::EbpfError),
    #[error("BPF program {0}: {1}")]
    Program(&'static str, #[source] aya::programs::ProgramError),
    #[error("BPF map {0}: {1}")]
    Map(&'static str, #[source] aya::maps::MapError),
    #[error("duplicating the socket map's descriptor: {0}")]
    MapFd(#[source] io::Error),
    #[error("the BPF object has no {0}")]
    Missing(&'static str),
    #[error("pod {0}: {1}")]
    Pod(PathBuf, #[source] io::Error),
    #[error("pod {0}: at most 8 excluded ports each way and 8 excluded ranges")]
    TooManyExcluded(PathBuf),
}

/// The programs' counters, summed over CPUs (see `bpf/bypass.c`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Connection ends recorded by `sockops` since the attach.
    pub sockets_recorded: u64,
    /// Connection ends the map refused (full, or a socket type it cannot hold).
    pub sockets_refused: u64,
    /// Messages `sk_msg` handed straight to the peer socket.
    pub messages_redirected: u64,
    pub bytes_redirected: u64,
    /// Messages on recorded sockets whose peer was not recorded: the normal path.
    pub messages_passed: u64,
    /// Connections of registered pods rewritten at connect: an app's to its sidecar, a
    /// sidecar's to another pod's inbound port.
    pub connects_outbound: u64,
    pub connects_inbound: u64,
    /// `SO_ORIGINAL_DST` questions answered for connections rewritten at connect.
    pub original_dst_answered: u64,
    /// Connection ends in the map now (closed sockets leave it).
    pub sockets: u64,
    /// Connections rewritten at connect that the programs keep an original destination for
    /// now: connecting, or open (they are forgotten when the connecting end closes).
    pub rewritten: u64,
}

/// The loaded and attached programs. Dropping it detaches them.
pub struct Bypass {
    ebpf: Ebpf,
    cgroup: PathBuf,
    sockops: Option<SockOpsLinkId>,
    sk_msg: Option<SkMsgLinkId>,
    connect: Vec<(&'static str, CgroupSockAddrLinkId)>,
    getsockopt: Option<CgroupSockoptLinkId>,
    /// Registered pods: namespace path → (cookie, addresses).
    pods: std::collections::HashMap<PathBuf, (u64, Vec<std::net::IpAddr>)>,
}

impl std::fmt::Debug for Bypass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bypass")
            .field("cgroup", &self.cgroup)
            .field("attached", &self.sockops.is_some())
            .finish()
    }
}

impl Bypass {
    /// Loads the programs and attaches them: `sockops` to the cgroup v2 directory `cgroup`
    /// (next to any other programs there), `sk_msg` to the socket map.
    pub fn attach(cgroup: &Path) -> Result<Bypass, BypassError> {
        if !cgroup.join("cgroup.procs").exists() {
            return Err(BypassError::NotCgroup(cgroup.to_path_buf()));
        }
        let dir = File::open(cgroup).map_err(|e| BypassError::Cgroup(cgroup.to_path_buf(), e))?;
        // On an error below, dropping `ebpf` detaches whatever was attached.
        let mut ebpf = Ebpf::load(OBJECT)?;
        // The message program first: a socket recorded before it is attached would otherwise
        // miss it (it applies to sockets added to the map afterwards as well as before).
        let socks = ebpf.map(SOCKS).ok_or(BypassError::Missing(SOCKS))?;
        let socks: SockHash<&MapData, Key> =
            SockHash::try_from(socks).map_err(|e| BypassError::Map(SOCKS, e))?;
        let socks_fd = socks.fd().try_clone().map_err(BypassError::MapFd)?;
        let msg: &mut SkMsg = program(&mut ebpf, SK_MSG)?;
        msg.load().map_err(|e| BypassError::Program(SK_MSG, e))?;
        let sk_msg = msg
            .attach(&socks_fd)
            .map_err(|e| BypassError::Program(SK_MSG, e))?;
        let ops: &mut SockOps = program(&mut ebpf, SOCKOPS)?;
        ops.load().map_err(|e| BypassError::Program(SOCKOPS, e))?;
        // A BPF link (kernel 5.7+): it coexists with other programs on the cgroup whatever
        // the mode, and the kernel refuses the multi-attach flags on link creation.
        let sockops = ops
            .attach(&dir, CgroupAttachMode::Single)
            .map_err(|e| BypassError::Program(SOCKOPS, e))?;
        let mut bypass = Bypass {
            ebpf,
            cgroup: cgroup.to_path_buf(),
            sockops: Some(sockops),
            sk_msg: Some(sk_msg),
            connect: Vec::new(),
            getsockopt: None,
            pods: Default::default(),
        };
        // The connect-time capture: the original-destination answer first, so that no
        // rewritten connection reaches a sidecar that cannot learn where it was going. They act
        // only for registered pods.
        let get: &mut CgroupSockopt = program(&mut bypass.ebpf, GETSOCKOPT)?;
        get.load()
            .map_err(|e| BypassError::Program(GETSOCKOPT, e))?;
        bypass.getsockopt = Some(
            get.attach(&dir, CgroupAttachMode::Single)
                .map_err(|e| BypassError::Program(GETSOCKOPT, e))?,
        );
        for name in [CONNECT4, CONNECT6] {
            let p: &mut CgroupSockAddr = program(&mut bypass.ebpf, name)?;
            p.load().map_err(|e| BypassError::Program(name, e))?;
            let link = p
                .attach(&dir, CgroupAttachMode::Single)
                .map_err(|e| BypassError::Program(name, e))?;
            bypass.connect.push((name, link));
        }
        tracing::info!(cgroup = %cgroup.display(), "bypass attached");
        Ok(bypass)
    }

    /// Registers a pod for the connect-time capture (see [`CapturedPod`]); registering it
    /// again updates it.
    pub fn add_pod(&mut self, pod: &CapturedPod) -> Result<(), BypassError> {
        let ports = |list: &[u16]| -> Result<[u16; 8], BypassError> {
            let mut out = [0u16; 8];
            if list.len() > out.len() {
                return Err(BypassError::TooManyExcluded(pod.netns.clone()));
            }
            out[..list.len()].copy_from_slice(list);
            Ok(out)
        };
        let mut exclude_cidrs = [Cidr::default(); 8];
        if pod.exclude_outbound_cidrs.len() > exclude_cidrs.len() {
            return Err(BypassError::TooManyExcluded(pod.netns.clone()));
        }
        for (slot, range) in exclude_cidrs.iter_mut().zip(&pod.exclude_outbound_cidrs) {
            *slot = Cidr::of(*range);
        }
        let value = PodValue {
            outbound_port: pod.outbound_port,
            inbound_port: pod.inbound_port,
            sidecar_gid: pod.sidecar_gid,
            exclude_outbound: ports(&pod.exclude_outbound_ports)?,
            exclude_inbound: ports(&pod.exclude_inbound_ports)?,
            exclude_cidrs,
        };
        let (cookie, addrs) =
            netns_identity(&pod.netns).map_err(|e| BypassError::Pod(pod.netns.clone(), e))?;
        self.remove_pod(&pod.netns)?;
        let mut by_addr: BpfHashMap<&mut MapData, Addr, u64> = self.hash_map(POD_ADDRS)?;
        for ip in &addrs {
            by_addr
                .insert(Addr::of(*ip), cookie, 0)
                .map_err(|e| BypassError::Map(POD_ADDRS, e))?;
        }
        let mut pods: BpfHashMap<&mut MapData, u64, PodValue> = self.hash_map(PODS)?;
        pods.insert(cookie, value, 0)
            .map_err(|e| BypassError::Map(PODS, e))?;
        tracing::info!(netns = %pod.netns.display(), addresses = ?addrs, "bypass: pod captured at connect");
        self.pods.insert(pod.netns.clone(), (cookie, addrs));
        Ok(())
    }

    /// Takes a registered pod out (its connections keep the iptables path).
    pub fn remove_pod(&mut self, netns: &Path) -> Result<(), BypassError> {
        let Some((cookie, addrs)) = self.pods.remove(netns) else {
            return Ok(());
        };
        let mut pods: BpfHashMap<&mut MapData, u64, PodValue> = self.hash_map(PODS)?;
        let _ = pods.remove(&cookie);
        let mut by_addr: BpfHashMap<&mut MapData, Addr, u64> = self.hash_map(POD_ADDRS)?;
        for ip in addrs {
            let _ = by_addr.remove(&Addr::of(ip));
        }
        Ok(())
    }

    fn hash_map<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<BpfHashMap<&mut MapData, K, V>, BypassError> {
        let map = self.ebpf.map_mut(name).ok_or(BypassError::Missing(name))?;
        BpfHashMap::try_from(map).map_err(|e| BypassError::Map(name, e))
    }

    /// The cgroup the programs are attached to.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Reads the counters and the number of sockets in the map.
    pub fn counters(&self) -> Result<Counters, BypassError> {
        let map = self
            .ebpf
            .map(COUNTERS)
            .ok_or(BypassError::Missing(COUNTERS))?;
        let array: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map).map_err(|e| BypassError::Map(COUNTERS, e))?;
        let get = |i: u32| -> Result<u64, BypassError> {
            let values = array
                .get(&i, 0)
                .map_err(|e| BypassError::Map(COUNTERS, e))?;
            Ok(values.iter().sum())
        };
        let socks = self.ebpf.map(SOCKS).ok_or(BypassError::Missing(SOCKS))?;
        let socks: SockHash<&MapData, Key> =
            SockHash::try_from(socks).map_err(|e| BypassError::Map(SOCKS, e))?;
        let sockets = socks.keys().filter(Result::is_ok).count() as u64;
        let connecting = self.entries::<u64, Orig>(CONNECTING)?;
        let rewritten = self.entries::<Key, Orig>(ORIGINAL_DST)?;
        Ok(Counters {
            sockets_recorded: get(0)?,
            sockets_refused: get(1)?,
            messages_redirected: get(2)?,
            bytes_redirected: get(3)?,
            messages_passed: get(4)?,
            connects_outbound: get(5)?,
            connects_inbound: get(6)?,
            original_dst_answered: get(7)?,
            sockets,
            rewritten: connecting + rewritten,
        })
    }

    /// How many entries the hash map `name` holds now.
    fn entries<K: aya::Pod, V: aya::Pod>(&self, name: &'static str) -> Result<u64, BypassError> {
        let map = self.ebpf.map(name).ok_or(BypassError::Missing(name))?;
        let map: BpfHashMap<&MapData, K, V> =
            BpfHashMap::try_from(map).map_err(|e| BypassError::Map(name, e))?;
        Ok(map.keys().filter(Result::is_ok).count() as u64)
    }

    /// Detaches both programs (the message program first, so no message is redirected
    /// after this returns), then frees the maps. Connections keep working on the normal path.
    pub fn detach(mut self) -> Result<(), BypassError> {
        self.detach_links()
    }

    fn detach_links(&mut self) -> Result<(), BypassError> {
        // Connections stop being rewritten before their original destinations stop being
        // answered.
        for (name, id) in std::mem::take(&mut self.connect) {
            let p: &mut CgroupSockAddr = program(&mut self.ebpf, name)?;
            p.detach(id).map_err(|e| BypassError::Program(name, e))?;
        }
        if let Some(id) = self.getsockopt.take() {
            let p: &mut CgroupSockopt = program(&mut self.ebpf, GETSOCKOPT)?;
            p.detach(id)
                .map_err(|e| BypassError::Program(GETSOCKOPT, e))?;
        }
        if let Some(id) = self.sk_msg.take() {
            let msg: &mut SkMsg = program(&mut self.ebpf, SK_MSG)?;
            msg.detach(id)
                .map_err(|e| BypassError::Program(SK_MSG, e))?;
        }
        if let Some(id) = self.sockops.take() {
            let ops: &mut SockOps = program(&mut self.ebpf, SOCKOPS)?;
            ops.detach(id)
                .map_err(|e| BypassError::Program(SOCKOPS, e))?;
            tracing::info!(cgroup = %self.cgroup.display(), "bypass detached");
        }
        Ok(())
    }

    /// The counters in Prometheus text format.
    pub fn render_metrics(&self) -> Result<String, BypassError> {
        let c = self.counters()?;
        let mut out = String::new();
        let mut family = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {value}");
        };
        family(
            "hypha_bypass_sockets_recorded_total",
            "counter",
            "TCP connection ends recorded in the socket map.",
            c.sockets_recorded,
        );
        family(
            "hypha_bypass_sockets_refused_total",
            "counter",
            "TCP connection ends the socket map refused.",
            c.sockets_refused,
        );
        family(
            "hypha_bypass_messages_redirected_total",
            "counter",
            "Messages handed straight to the peer socket.",
            c.messages_redirected,
        );
        family(
            "hypha_bypass_bytes_redirected_total",
            "counter",
            "Bytes handed straight to the peer socket.",
            c.bytes_redirected,
        );
        family(
            "hypha_bypass_messages_passed_total",
            "counter",
            "Messages on recorded sockets sent the normal way (peer not recorded).",
            c.messages_passed,
        );
        family(
            "hypha_bypass_connects_outbound_total",
            "counter",
            "App connections of registered pods sent to their sidecar at connect.",
            c.connects_outbound,
        );
        family(
            "hypha_bypass_connects_inbound_total",
            "counter",
            "Sidecar connections sent to another registered pod's inbound port at connect.",
            c.connects_inbound,
        );
        family(
            "hypha_bypass_original_dst_answered_total",
            "counter",
            "SO_ORIGINAL_DST questions answered for connections rewritten at connect.",
            c.original_dst_answered,
        );
        family(
            "hypha_bypass_sockets",
            "gauge",
            "TCP connection ends in the socket map now.",
            c.sockets,
        );
        family(
            "hypha_bypass_rewritten_connections",
            "gauge",
            "Connections rewritten at connect whose original destination is kept now.",
            c.rewritten,
        );
        Ok(out)
    }
}

impl Drop for Bypass {
    fn drop(&mut self) {
        if let Err(e) = self.detach_links() {
            tracing::warn!(error = %e, "bypass: detaching on drop failed");
        }
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, BypassError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let p = ebpf.program_mut(name).ok_or(BypassError::Missing(name))?;
    p.try_into().map_err(|e| BypassError::Program(name, e))
}

/// A blocking read that tolerates the redirect's one quirk: on a socket in the socket map,
/// the kernel's receive path for redirected data (`tcp_bpf_recvmsg`) can return EAGAIN to a
/// *blocking* read woken without data (e.g. by write space on the same socket). Event-driven
/// readers (epoll, tokio: the sidecars) retry anyway; blocking ones need this.
pub fn read_some(s: &mut std::net::TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    use std::io::Read;
    loop {
        match s.read(buf) {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                std::thread::yield_now();
            }
            r => return r,
        }
    }
}

/// A pod coming or going while `hypha bypass` runs (the node agent's pod watch on Kubernetes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodChange {
    Add(CapturedPod),
    /// The network namespace it was added with.
    Remove(PathBuf),
}

/// `hypha bypass`: attaches to `cgroup`, registers `pods` for the connect-time capture, and
/// those `changes` bring (added or removed as they come), serves the counters on `metrics`
/// (`GET /metrics`) until `shutdown` completes, then detaches.
pub async fn serve(
    cgroup: &Path,
    metrics: Option<SocketAddr>,
    pods: &[CapturedPod],
    changes: Option<tokio::sync::mpsc::UnboundedReceiver<PodChange>>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServeError> {
    let mut bypass = Bypass::attach(cgroup)?;
    for pod in pods {
        bypass.add_pod(pod)?;
    }
    let bypass = std::sync::Arc::new(std::sync::Mutex::new(bypass));
    // The lock is held for a map update or a metrics read, never across an await.
    let follow = {
        let bypass = bypass.clone();
        async move {
            let Some(mut changes) = changes else {
                return std::future::pending::<()>().await;
            };
            while let Some(change) = changes.recv().await {
                let bypass = bypass.clone();
                // Entering the pod's namespace blocks: off the runtime's thread.
                let _ = tokio::task::spawn_blocking(move || {
                    let mut b = bypass
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    let r = match &change {
                        PodChange::Add(pod) => b.add_pod(pod),
                        PodChange::Remove(netns) => b.remove_pod(netns),
                    };
                    if let Err(e) = r {
                        tracing::warn!(?change, error = %e, "bypass: pod not (un)registered");
                    }
                })
                .await;
            }
            std::future::pending::<()>().await
        }
    };
    let listener = match metrics {
        Some(addr) => {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|e| ServeError::Bind(addr, e))?;
            tracing::info!(addr = %l.local_addr().map_err(|e| ServeError::Bind(addr, e))?, "bypass metrics");
            Some(l)
        }
        None => None,
    };
    let accept = async {
        let Some(l) = listener else {
            return std::future::pending::<()>().await;
        };
        loop {
            let Ok((stream, _)) = l.accept().await else {
                // Out of descriptors, most likely: let some close before trying again.
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            };
            let bypass = bypass.clone();
            tokio::spawn(async move {
                let _ = answer(stream, &bypass).await;
            });
        }
    };
    tokio::select! {
        () = accept => {}
        () = follow => {}
        () = shutdown => {}
    }
    match std::sync::Arc::try_unwrap(bypass) {
        Ok(b) => b
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .detach()?,
        // A metrics answer still holds it: dropping the last reference detaches.
        Err(shared) => drop(shared),
    }
    Ok(())
}

/// Why `hypha bypass` stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Bypass(#[from] BypassError),
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, #[source] io::Error),
}

/// One HTTP/1.x request on a metrics connection: `GET /metrics` gets the counters, anything
/// else a 404; a request that does not fit 8 KiB or does not arrive loses its connection.
async fn answer(
    mut stream: tokio::net::TcpStream,
    bypass: &std::sync::Mutex<Bypass>,
) -> io::Result<()> {
    let mut buf = vec![0u8; 8192];
    let mut n = 0;
    let head = loop {
        if n == buf.len() {
            return Ok(());
        }
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            stream.read(&mut buf[n..]),
        )
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
        if read == 0 {
            return Ok(());
        }
        n += read;
        if let Some(end) = buf[..n].windows(4).position(|w| w == b"\r\n\r\n") {
            break &buf[..end];
        }
    };
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let (status, body) = if line.starts_with(b"GET /metrics ") {
        let rendered = bypass
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .render_metrics();
        match rendered {
            Ok(text) => ("200 OK", text),
            Err(e) => ("500 Internal Server Error", format!("{e}\n")),
        }
    } else {
        ("404 Not Found", "not found: try /metrics\n".to_string())
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_in_both_families_and_bad_ones_are_refused() {
        let r: IpRange = "10.77.1.4/30".parse().unwrap();
        assert_eq!(r.to_string(), "10.77.1.4/30");
        let c = Cidr::of(r);
        assert_eq!((c.family, c.prefix), (4, 30));
        assert_eq!(c.ip[0], u32::from_ne_bytes([10, 77, 1, 4]));
        let r: IpRange = "fd00::/8".parse().unwrap();
        assert_eq!((Cidr::of(r).family, r.prefix), (6, 8));
        // An address alone is the whole address.
        assert_eq!("10.0.0.1".parse::<IpRange>().unwrap().prefix, 32);
        assert_eq!("::1".parse::<IpRange>().unwrap().prefix, 128);
        for bad in [
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0/8",
            "x/8",
            "10.0.0.0/-1",
            "",
        ] {
            let err = bad.parse::<IpRange>().unwrap_err();
            assert!(err.contains(&format!("{bad:?}")), "{bad}: {err}");
        }
    }
}
