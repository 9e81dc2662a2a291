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

use aya::maps::{MapData, PerCpuArray, SockHash};
use aya::programs::sk_msg::SkMsgLinkId;
use aya::programs::sock_ops::SockOpsLinkId;
use aya::programs::{CgroupAttachMode, SkMsg, SockOps};
use aya::Ebpf;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// The BPF object `build.rs` compiled from `bpf/bypass.c`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bypass.o"));

const SOCKOPS: &str = "hypha_sockops";
const SK_MSG: &str = "hypha_sk_msg";
const SOCKS: &str = "hypha_socks";
const COUNTERS: &str = "hypha_counters";

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
    /// Connection ends in the map now (closed sockets leave it).
    pub sockets: u64,
}

/// The loaded and attached programs. Dropping it detaches them.
pub struct Bypass {
    ebpf: Ebpf,
    cgroup: PathBuf,
    sockops: Option<SockOpsLinkId>,
    sk_msg: Option<SkMsgLinkId>,
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
        tracing::info!(cgroup = %cgroup.display(), "bypass attached");
        Ok(Bypass {
            ebpf,
            cgroup: cgroup.to_path_buf(),
            sockops: Some(sockops),
            sk_msg: Some(sk_msg),
        })
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
        Ok(Counters {
            sockets_recorded: get(0)?,
            sockets_refused: get(1)?,
            messages_redirected: get(2)?,
            bytes_redirected: get(3)?,
            messages_passed: get(4)?,
            sockets,
        })
    }

    /// Detaches both programs (the message program first, so no message is redirected
    /// after this returns), then frees the maps. Connections keep working on the normal path.
    pub fn detach(mut self) -> Result<(), BypassError> {
        self.detach_links()
    }

    fn detach_links(&mut self) -> Result<(), BypassError> {
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
            "hypha_bypass_sockets",
            "gauge",
            "TCP connection ends in the socket map now.",
            c.sockets,
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

/// `hypha bypass`: attaches to `cgroup`, serves the counters on `metrics` (`GET /metrics`)
/// until `shutdown` completes, then detaches.
pub async fn serve(
    cgroup: &Path,
    metrics: Option<SocketAddr>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServeError> {
    let bypass = std::sync::Arc::new(Bypass::attach(cgroup)?);
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
        () = shutdown => {}
    }
    match std::sync::Arc::try_unwrap(bypass) {
        Ok(b) => b.detach()?,
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
async fn answer(mut stream: tokio::net::TcpStream, bypass: &Bypass) -> io::Result<()> {
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
        match bypass.render_metrics() {
            Ok(text) => ("200 OK", text),
            Err(e) => ("500 Internal Server Error", format!("{e}\n")),
        }
    } else {
        ("404 Not Found", "not found: try /metrics\n".to_string())
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
