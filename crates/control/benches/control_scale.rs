//! `control-scale`: how long one VirtualService change takes to reach every proxy, and what
//! the control plane costs meanwhile (see `docs/benchmarks.md`, run with `bench/control-scale`).
//!
//! Generates a mesh config (N services in 10 namespaces, E dual-stack workload entries each, a
//! VirtualService and a DestinationRule for every 10th service), starts `hypha control` on it as
//! a child process, connects M simulated delta-ADS proxies (in this process), then rewrites one
//! VirtualService K times and measures, per proxy, the time from the write until the proxy
//! holds the new route configuration `8080`. The time includes the control plane noticing the
//! file change (it polls the directory every 100 ms and waits for one quiet poll).
//!
//! Parameters (environment): `SERVICES` (1000), `ENDPOINTS_PER_SERVICE` (5), `SUBSCRIBERS`
//! (1000), `CHANGES` (5), `CHANGE_TIMEOUT_S` (30), `SETUP_TIMEOUT_S` (600),
//! `CONNECT_PARALLELISM` (64), `HYPHA_BIN` (default: `hypha` next to this benchmark's
//! `target/<profile>`), `KEEP_BENCH_DIR` (set: keep the config dir and control-plane log).

#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write as _};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use hypha_control::ProxyInfo;
use hypha_xds::{type_url, DeltaClient};
use serde_json::json;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;

const NAMESPACES: usize = 10;
const HTTP_PORT: u16 = 8080;
/// The route configuration every proxy subscribes to: one virtual host per service on 8080.
const ROUTE_NAME: &str = "8080";
/// Quiet time between changes, so each change starts from an idle control plane.
const PAUSE: Duration = Duration::from_secs(1);
/// Window over which the idle control plane's CPU is sampled.
const IDLE_WINDOW: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy)]
struct Params {
    services: usize,
    endpoints: usize,
    subscribers: usize,
    changes: usize,
    change_timeout: Duration,
    setup_timeout: Duration,
    connect_parallelism: usize,
}

impl Params {
    fn from_env() -> Result<Params> {
        let p = Params {
            services: env_usize("SERVICES", 1000)?,
            endpoints: env_usize("ENDPOINTS_PER_SERVICE", 5)?,
            subscribers: env_usize("SUBSCRIBERS", 1000)?,
            changes: env_usize("CHANGES", 5)?,
            change_timeout: Duration::from_secs(env_usize("CHANGE_TIMEOUT_S", 30)? as u64),
            setup_timeout: Duration::from_secs(env_usize("SETUP_TIMEOUT_S", 600)? as u64),
            connect_parallelism: env_usize("CONNECT_PARALLELISM", 64)?.max(1),
        };
        if p.services == 0 || p.endpoints == 0 || p.subscribers == 0 {
            bail!("SERVICES, ENDPOINTS_PER_SERVICE and SUBSCRIBERS must be at least 1");
        }
        if p.services * p.endpoints >= 1 << 24 {
            bail!("at most 16M endpoints (addresses are 10.x.y.z)");
        }
        Ok(p)
    }
}

fn env_usize(name: &str, default: usize) -> Result<usize> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .with_context(|| format!("{name}={v:?} is not a number")),
        Err(_) => Ok(default),
    }
}

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; there is nothing else to parse.
    let params = Params::from_env()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(run(params))
}

// ---------------------------------------------------------------------------------------------
// The generated config.

fn namespace(service: usize) -> String {
    format!("bench-{}", service % NAMESPACES)
}

/// Endpoint `g` (global index) has 10.x.y.z and fd00:10::x:y.
fn endpoint_v4(g: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x0a00_0000 | (g as u32 + 1))
}

fn endpoint_v6(g: usize) -> Ipv6Addr {
    let g = g as u32 + 1;
    Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, (g >> 16) as u16, g as u16)
}

fn service_yaml(i: usize) -> String {
    let ns = namespace(i);
    let vip4 = Ipv4Addr::from(0xf000_0000 | (i as u32 + 1));
    let vip6 = Ipv6Addr::new(
        0x2001,
        0xdb8,
        0x240,
        0,
        0,
        0,
        (i >> 16) as u16,
        i as u16 + 1,
    );
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: svc-{i}
  namespace: {ns}
spec:
  hosts: [svc-{i}.{ns}.svc.cluster.local]
  addresses: [{vip4}, \"{vip6}\"]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {{number: {HTTP_PORT}, name: http, protocol: HTTP}}
  workloadSelector:
    labels: {{app: svc-{i}}}
"
    )
}

fn workload_name(i: usize, e: usize) -> String {
    format!("svc-{i}-{e}")
}

fn workload_version(e: usize) -> &'static str {
    if e.is_multiple_of(2) {
        "v1"
    } else {
        "v2"
    }
}

fn workload_yaml(i: usize, e: usize, endpoints: usize) -> String {
    let ns = namespace(i);
    let g = i * endpoints + e;
    let name = workload_name(i, e);
    let version = workload_version(e);
    format!(
        "apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: {name}
  namespace: {ns}
  annotations:
    hypha.dev/addresses: \"{v6}\"
spec:
  address: {v4}
  labels: {{app: svc-{i}, version: {version}}}
  serviceAccount: svc-{i}
  ports: {{http: {HTTP_PORT}}}
",
        v4 = endpoint_v4(g),
        v6 = endpoint_v6(g),
    )
}

fn virtual_service_yaml(i: usize, timeout_s: u64) -> String {
    let ns = namespace(i);
    format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: svc-{i}
  namespace: {ns}
spec:
  hosts: [svc-{i}]
  http:
  - name: canary
    route:
    - destination: {{host: svc-{i}, subset: v1}}
      weight: 90
    - destination: {{host: svc-{i}, subset: v2}}
      weight: 10
    timeout: {timeout_s}s
"
    )
}

fn destination_rule_yaml(i: usize) -> String {
    let ns = namespace(i);
    format!(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: svc-{i}
  namespace: {ns}
spec:
  host: svc-{i}
  trafficPolicy:
    loadBalancer: {{simple: LEAST_REQUEST}}
  subsets:
  - name: v1
    labels: {{version: v1}}
  - name: v2
    labels: {{version: v2}}
"
    )
}

/// The VirtualService that the change phase rewrites, and its initial timeout.
const CHANGED_SERVICE: usize = 0;
const INITIAL_TIMEOUT_S: u64 = 2;

/// A scratch directory holding the config (`config/`) and the control plane's log; removed on
/// drop unless `KEEP_BENCH_DIR` is set.
struct BenchDir {
    root: PathBuf,
    keep: bool,
}

impl BenchDir {
    fn create() -> Result<BenchDir> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let root = std::env::temp_dir().join(format!(
            "hypha-control-scale-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir(&root).with_context(|| format!("cannot create {}", root.display()))?;
        Ok(BenchDir {
            root,
            keep: std::env::var_os("KEEP_BENCH_DIR").is_some(),
        })
    }

    fn config(&self) -> PathBuf {
        self.root.join("config")
    }

    fn log(&self) -> PathBuf {
        self.root.join("control-plane.log")
    }

    fn virtual_service_path(&self, i: usize) -> PathBuf {
        self.config()
            .join(namespace(i))
            .join(format!("virtualservice-svc-{i}.yaml"))
    }

    /// Writes the whole config: per namespace one file of services, one of workloads, one of
    /// destination rules, and one file per VirtualService (so that one can be rewritten).
    fn generate(&self, p: &Params) -> Result<()> {
        for n in 0..NAMESPACES {
            std::fs::create_dir_all(self.config().join(format!("bench-{n}")))?;
        }
        let mut services = vec![String::new(); NAMESPACES];
        let mut workloads = vec![String::new(); NAMESPACES];
        let mut rules = vec![String::new(); NAMESPACES];
        for i in 0..p.services {
            let n = i % NAMESPACES;
            services[n].push_str("---\n");
            services[n].push_str(&service_yaml(i));
            for e in 0..p.endpoints {
                workloads[n].push_str("---\n");
                workloads[n].push_str(&workload_yaml(i, e, p.endpoints));
            }
            if i.is_multiple_of(10) {
                rules[n].push_str("---\n");
                rules[n].push_str(&destination_rule_yaml(i));
                std::fs::write(
                    self.virtual_service_path(i),
                    virtual_service_yaml(i, INITIAL_TIMEOUT_S),
                )?;
            }
        }
        for n in 0..NAMESPACES {
            let dir = self.config().join(format!("bench-{n}"));
            for (file, text) in [
                ("services.yaml", &services[n]),
                ("workloads.yaml", &workloads[n]),
                ("destinationrules.yaml", &rules[n]),
            ] {
                if !text.is_empty() {
                    std::fs::write(dir.join(file), text)?;
                }
            }
        }
        Ok(())
    }

    /// Replaces the changed VirtualService atomically (write elsewhere, rename into place), so
    /// the control plane never reads a half-written file.
    fn rewrite_virtual_service(&self, timeout_s: u64) -> Result<()> {
        let tmp = self.root.join("virtualservice.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(virtual_service_yaml(CHANGED_SERVICE, timeout_s).as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, self.virtual_service_path(CHANGED_SERVICE))?;
        Ok(())
    }
}

impl Drop for BenchDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("kept {}", self.root.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The control plane, as a child process.

/// A `config generation N pushed to M proxies` line, when this process read it.
#[derive(Debug, Clone)]
struct GenerationLog {
    at: Instant,
    generation: u64,
    proxies: u64,
    took_ms: u64,
}

#[derive(Default)]
struct LogState {
    generations: Vec<GenerationLog>,
    /// WARN and ERROR lines (the first 100).
    problems: Vec<String>,
    problem_count: usize,
    /// The last lines, to show when the control plane dies.
    tail: std::collections::VecDeque<String>,
}

/// Kills and reaps the control plane when dropped (also on error or panic).
struct ControlPlane {
    child: Child,
    log: Arc<Mutex<LogState>>,
}

impl ControlPlane {
    fn spawn(bin: &Path, config: &Path, addr: SocketAddr, log_path: &Path) -> Result<Self> {
        let mut child = Command::new(bin)
            .arg("control")
            .arg("--config")
            .arg(config)
            .arg("--listen")
            .arg(addr.to_string())
            .env("HYPHA_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let log = Arc::new(Mutex::new(LogState::default()));
        let file = Arc::new(Mutex::new(
            std::fs::File::create(log_path)
                .with_context(|| format!("cannot create {}", log_path.display()))?,
        ));
        let stdout = child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>);
        let stderr = child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>);
        for stream in [stdout, stderr].into_iter().flatten() {
            let (log, file) = (log.clone(), file.clone());
            std::thread::spawn(move || read_log(stream, &log, &file));
        }
        Ok(ControlPlane { child, log })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let tail: Vec<String> = self.log().tail.iter().cloned().collect();
            bail!(
                "the control plane exited ({status}); its last lines:\n{}",
                tail.join("\n")
            );
        }
        Ok(())
    }

    fn log(&self) -> std::sync::MutexGuard<'_, LogState> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until the control plane accepts TCP on `addr`.
    async fn wait_listening(&mut self, addr: SocketAddr, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            self.check_alive()?;
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the control plane did not listen on {addr} within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_log(
    stream: Box<dyn std::io::Read + Send>,
    log: &Mutex<LogState>,
    file: &Mutex<std::fs::File>,
) {
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { break };
        let at = Instant::now();
        let line = strip_ansi(&line);
        if let Ok(mut f) = file.lock() {
            let _ = writeln!(f, "{line}");
        }
        let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
        if line.contains("config generation") && line.contains("pushed") {
            log.generations.push(GenerationLog {
                at,
                generation: field(&line, "generation=").unwrap_or(0),
                proxies: field(&line, "proxies=").unwrap_or(0),
                took_ms: field(&line, "took_ms=").unwrap_or(0),
            });
        }
        if line.contains(" WARN ") || line.contains(" ERROR ") {
            log.problem_count += 1;
            if log.problems.len() < 100 {
                log.problems.push(line.clone());
            }
        }
        if log.tail.len() == 50 {
            log.tail.pop_front();
        }
        log.tail.push_back(line);
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ params final-byte (0x40..=0x7e).
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The number after `key` (e.g. `took_ms=`) in a log line.
fn field(line: &str, key: &str) -> Option<u64> {
    let at = line.find(key)? + key.len();
    let digits: String = line[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

fn hypha_bin() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("HYPHA_BIN") {
        return Ok(PathBuf::from(bin));
    }
    // This benchmark runs as target/<profile>/deps/control_scale-<hash>; the binary is built
    // by `cargo build --release -p hypha` into target/release.
    let exe = std::env::current_exe()?;
    let target = exe
        .parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .context("cannot locate the target directory")?;
    let bin = target.join("release").join("hypha");
    if !bin.exists() {
        bail!(
            "{} not found: run `cargo build --release -p hypha` or set HYPHA_BIN",
            bin.display()
        );
    }
    Ok(bin)
}

fn free_port() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

// ---------------------------------------------------------------------------------------------
// /proc readings.

#[derive(Debug, Clone, Copy, Default)]
struct Memory {
    rss_kib: u64,
    peak_kib: u64,
}

fn memory(pid: u32) -> Result<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    Ok(Memory {
        rss_kib: kib("VmRSS:"),
        peak_kib: kib("VmHWM:"),
    })
}

/// User plus system CPU time of a process, from `/proc/<pid>/stat` (`self` for this one).
fn cpu_time(pid: &str, ticks_per_s: u64) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces; count fields after its closing parenthesis.
    let rest = &stat[stat.rfind(')').context("malformed stat")? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 (state) is fields[0]: utime (14) and stime (15) are fields[11] and fields[12].
    let ticks: u64 = fields
        .get(11..13)
        .context("short stat")?
        .iter()
        .map(|f| f.parse::<u64>().unwrap_or(0))
        .sum();
    Ok(Duration::from_micros(ticks * 1_000_000 / ticks_per_s))
}

fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Rounds to 0.1, for the JSON.
fn r1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

// ---------------------------------------------------------------------------------------------
// The simulated proxies.

enum Event {
    /// Has its initial clusters, listeners and route `8080`, which took `bytes` of resources
    /// (the largest response `largest` bytes).
    Ready {
        bytes: usize,
        largest: usize,
    },
    /// Received a new version of route `8080`, in the control plane's generation `generation`.
    Route {
        sub: usize,
        at: Instant,
        generation: Option<u64>,
    },
    Failed {
        sub: usize,
        error: String,
    },
}

/// Proxy `sub` plays workload `svc-i-e`, so that proxies spread over namespaces like the
/// services and each gets inbound resources of its own.
fn proxy(sub: usize, p: &Params) -> ProxyInfo {
    let i = sub % p.services;
    let e = (sub / p.services) % p.endpoints;
    let g = i * p.endpoints + e;
    let ns = namespace(i);
    let v4 = endpoint_v4(g);
    ProxyInfo {
        id: format!("sidecar~{v4}~svc-{i}-{e}-p{sub}.{ns}~{ns}.svc.cluster.local"),
        namespace: ns,
        service_account: format!("svc-{i}"),
        workload_name: workload_name(i, e),
        labels: [
            ("app".to_string(), format!("svc-{i}")),
            ("version".to_string(), workload_version(e).to_string()),
        ]
        .into(),
        ips: vec![v4.into(), endpoint_v6(g).into()],
    }
}

async fn subscriber(
    sub: usize,
    uri: String,
    info: ProxyInfo,
    gate: Arc<Semaphore>,
    connect_timeout: Duration,
    events: mpsc::UnboundedSender<Event>,
) {
    if let Err(e) = run_subscriber(sub, uri, info, gate, connect_timeout, &events).await {
        let _ = events.send(Event::Failed {
            sub,
            error: format!("{e:#}"),
        });
    }
}

async fn run_subscriber(
    sub: usize,
    uri: String,
    info: ProxyInfo,
    gate: Arc<Semaphore>,
    connect_timeout: Duration,
    events: &mpsc::UnboundedSender<Event>,
) -> Result<()> {
    // Held until the initial resources are in: bounds how many proxies sync at once.
    let mut permit = Some(gate.acquire_owned().await?);
    let mut client =
        tokio::time::timeout(connect_timeout, DeltaClient::connect(uri, info.to_node()))
            .await
            .context("connect timed out")??;
    client.subscribe(type_url::ROUTE, [ROUTE_NAME]).await?;
    let (mut clusters, mut listeners) = (false, false);
    let mut route: Option<String> = None;
    let (mut bytes, mut largest) = (0, 0);
    loop {
        let Some(update) = client.next().await? else {
            bail!("the control plane ended the stream");
        };
        let at = Instant::now();
        client.ack_or_nack(&update, Ok(())).await?;
        if permit.is_some() {
            let size: usize = update.resources.iter().map(|r| r.body.value.len()).sum();
            bytes += size;
            largest = largest.max(size);
        }
        match update.type_url.as_str() {
            type_url::CLUSTER => clusters = true,
            type_url::LISTENER => listeners = true,
            type_url::ROUTE => {
                if let Some(r) = update.resources.iter().find(|r| r.name == ROUTE_NAME) {
                    if route.as_deref() != Some(r.version.as_str()) {
                        route = Some(r.version.clone());
                        let _ = events.send(Event::Route {
                            sub,
                            at,
                            generation: update.system_version.parse().ok(),
                        });
                    }
                }
            }
            _ => {}
        }
        if permit.is_some() && clusters && listeners && route.is_some() {
            permit = None;
            let _ = events.send(Event::Ready { bytes, largest });
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The run.

struct ChangeResult {
    timeout_s: u64,
    delivered: usize,
    samples: Vec<Duration>,
    /// From the write until this process read the control plane's `pushed` log line.
    to_generation_log: Option<Duration>,
    /// The control plane's own time for translating and handing out snapshots.
    update_took_ms: Option<u64>,
    generation: Option<u64>,
}

async fn run(p: Params) -> Result<()> {
    let bin = hypha_bin()?;
    let ticks = clock_ticks();
    let dir = BenchDir::create()?;
    let started = Instant::now();
    dir.generate(&p)?;
    let generate_time = started.elapsed();
    eprintln!(
        "control-scale: {} services, {} endpoints, {} subscribers, {} changes; config in {} ({:.0} ms)",
        p.services,
        p.services * p.endpoints,
        p.subscribers,
        p.changes,
        dir.config().display(),
        ms(generate_time)
    );

    let addr = free_port()?;
    let started = Instant::now();
    let mut cp = ControlPlane::spawn(&bin, &dir.config(), addr, &dir.log())?;
    cp.wait_listening(addr, p.setup_timeout).await?;
    let startup = started.elapsed();
    let pid = cp.pid();
    let pid_s = pid.to_string();
    let mem_started = memory(pid)?;
    eprintln!(
        "control plane pid {pid} listening on {addr} after {:.0} ms, RSS {:.1} MiB",
        ms(startup),
        mib(mem_started.rss_kib)
    );

    // Connect every proxy and wait for its initial resources.
    let uri = format!("http://{addr}");
    let (tx, mut rx) = mpsc::unbounded_channel();
    let gate = Arc::new(Semaphore::new(p.connect_parallelism));
    let mut tasks = JoinSet::new();
    let started = Instant::now();
    let cpu_connect_start = cpu_time(&pid_s, ticks)?;
    for sub in 0..p.subscribers {
        tasks.spawn(subscriber(
            sub,
            uri.clone(),
            proxy(sub, &p),
            gate.clone(),
            p.setup_timeout,
            tx.clone(),
        ));
    }
    drop(tx);
    let mut generation_seen = vec![None::<u64>; p.subscribers];
    let mut ready = 0;
    let (mut initial_bytes, mut largest_response) = (0, 0);
    let deadline = tokio::time::Instant::now() + p.setup_timeout;
    while ready < p.subscribers {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(Event::Ready { bytes, largest })) => {
                ready += 1;
                initial_bytes = initial_bytes.max(bytes);
                largest_response = largest_response.max(largest);
            }
            Ok(Some(Event::Route {
                sub, generation, ..
            })) => generation_seen[sub] = generation,
            Ok(Some(Event::Failed { sub, error })) => {
                cp.check_alive()?;
                bail!("subscriber {sub} failed while connecting: {error}");
            }
            Ok(None) => bail!("every subscriber ended"),
            Err(_) => bail!(
                "only {ready} of {} subscribers synced within {:?}",
                p.subscribers,
                p.setup_timeout
            ),
        }
    }
    let connect_time = started.elapsed();
    let cpu_connect = cpu_time(&pid_s, ticks)? - cpu_connect_start;
    let mem_connected = memory(pid)?;
    eprintln!(
        "{} subscribers synced in {:.0} ms; control plane RSS {:.1} MiB, CPU {:.0} ms; \
         initial resources per proxy {:.0} KiB (largest response {:.0} KiB)",
        p.subscribers,
        ms(connect_time),
        mib(mem_connected.rss_kib),
        ms(cpu_connect),
        initial_bytes as f64 / 1024.0,
        largest_response as f64 / 1024.0,
    );

    // Idle cost: the directory poll and open streams.
    let cpu_idle_start = cpu_time(&pid_s, ticks)?;
    tokio::time::sleep(IDLE_WINDOW).await;
    let cpu_idle = cpu_time(&pid_s, ticks)? - cpu_idle_start;

    // The change phase.
    let cpu_changes_start = cpu_time(&pid_s, ticks)?;
    let cpu_self_start = cpu_time("self", ticks)?;
    let phase_start = Instant::now();
    let mut changes = Vec::new();
    let mut failures = Vec::new();
    for k in 0..p.changes {
        // Anything still arriving from an earlier change only moves the floor.
        while let Ok(ev) = rx.try_recv() {
            match ev {
                Event::Route {
                    sub, generation, ..
                } => generation_seen[sub] = generation.max(generation_seen[sub]),
                Event::Failed { sub, error } => failures.push((sub, error)),
                Event::Ready { .. } => {}
            }
        }
        let floor = generation_seen.iter().flatten().copied().max();
        let timeout_s = if k.is_multiple_of(2) { 3 } else { 4 };
        let t0 = Instant::now();
        dir.rewrite_virtual_service(timeout_s)?;
        let mut got: Vec<Option<Duration>> = vec![None; p.subscribers];
        let mut delivered = 0;
        let deadline = tokio::time::Instant::from_std(t0 + p.change_timeout);
        while delivered < p.subscribers {
            let ev = match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(ev)) => ev,
                Ok(None) | Err(_) => break,
            };
            match ev {
                Event::Route {
                    sub,
                    at,
                    generation,
                } => {
                    let newer = match (generation, floor) {
                        (Some(g), Some(f)) => g > f,
                        _ => true,
                    };
                    generation_seen[sub] = generation.max(generation_seen[sub]);
                    if newer && got[sub].is_none() {
                        got[sub] = Some(at.saturating_duration_since(t0));
                        delivered += 1;
                    }
                }
                Event::Failed { sub, error } => failures.push((sub, error)),
                Event::Ready { .. } => {}
            }
        }
        let generation = {
            let log = cp.log();
            log.generations.iter().find(|g| g.at >= t0).cloned()
        };
        let mut samples: Vec<Duration> = got.into_iter().flatten().collect();
        samples.sort();
        let result = ChangeResult {
            timeout_s,
            delivered,
            to_generation_log: generation
                .as_ref()
                .map(|g| g.at.saturating_duration_since(t0)),
            update_took_ms: generation.as_ref().map(|g| g.took_ms),
            generation: generation.as_ref().map(|g| g.generation),
            samples,
        };
        eprintln!(
            "change {}/{} (timeout {timeout_s}s): {delivered}/{} delivered, p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; generation {:?} logged after {:?} ms (update took {:?} ms, {} proxies)",
            k + 1,
            p.changes,
            p.subscribers,
            ms(percentile(&result.samples, 0.50)),
            ms(percentile(&result.samples, 0.99)),
            ms(result.samples.last().copied().unwrap_or_default()),
            result.generation,
            result.to_generation_log.map(|d| ms(d).round()),
            result.update_took_ms,
            generation.as_ref().map_or(0, |g| g.proxies),
        );
        changes.push(result);
        cp.check_alive()?;
        if k + 1 < p.changes {
            tokio::time::sleep(PAUSE).await;
        }
    }
    let phase = phase_start.elapsed();
    let cpu_changes = cpu_time(&pid_s, ticks)? - cpu_changes_start;
    let cpu_self = cpu_time("self", ticks)? - cpu_self_start;
    let mem_end = memory(pid)?;
    let (problem_count, problems) = {
        let log = cp.log();
        (log.problem_count, log.problems.clone())
    };
    tasks.abort_all();
    drop(cp);

    report(&Report {
        p,
        changes,
        failures,
        mem_started,
        mem_connected,
        mem_end,
        startup,
        connect_time,
        cpu_connect,
        cpu_idle,
        cpu_changes,
        cpu_self,
        phase,
        problem_count,
        problems,
        initial_bytes,
        largest_response,
    });
    Ok(())
}

struct Report {
    p: Params,
    changes: Vec<ChangeResult>,
    failures: Vec<(usize, String)>,
    mem_started: Memory,
    mem_connected: Memory,
    mem_end: Memory,
    startup: Duration,
    connect_time: Duration,
    cpu_connect: Duration,
    cpu_idle: Duration,
    cpu_changes: Duration,
    cpu_self: Duration,
    phase: Duration,
    problem_count: usize,
    problems: Vec<String>,
    /// The most any proxy received before it was synced, and the largest single response.
    initial_bytes: usize,
    largest_response: usize,
}

fn report(r: &Report) {
    let p = &r.p;
    let mut all: Vec<Duration> = r.changes.iter().flat_map(|c| c.samples.clone()).collect();
    all.sort();
    let expected = p.subscribers * p.changes;
    let share = if expected == 0 {
        0.0
    } else {
        all.len() as f64 / expected as f64
    };
    let (p50, p99, max) = (
        percentile(&all, 0.50),
        percentile(&all, 0.99),
        all.last().copied().unwrap_or_default(),
    );
    let floor_met = share >= 1.0 && p99 <= Duration::from_secs(1);
    // Idle polling is part of the phase; the pauses between changes are too.
    let mut md = String::new();
    let _ = writeln!(
        md,
        "| services | endpoints | subscribers | changes | push p50 / p99 / max (ms) | delivered | control-plane peak RSS (MiB) | control-plane CPU-ms, change phase |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
    let _ = writeln!(
        md,
        "| {} | {} | {} | {} | {:.0} / {:.0} / {:.0} | {:.1} % | {:.1} | {:.0} |",
        p.services,
        p.services * p.endpoints,
        p.subscribers,
        p.changes,
        ms(p50),
        ms(p99),
        ms(max),
        share * 100.0,
        mib(r.mem_end.peak_kib),
        ms(r.cpu_changes),
    );
    let _ = writeln!(md);
    let _ = writeln!(
        md,
        "| change | new timeout | delivered | p50 / p99 / max (ms) | write → `pushed` log (ms) | update took (ms) |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    for (k, c) in r.changes.iter().enumerate() {
        let opt = |v: Option<f64>| v.map_or("—".to_string(), |v| format!("{v:.0}"));
        let _ = writeln!(
            md,
            "| {} | {}s | {}/{} | {:.0} / {:.0} / {:.0} | {} | {} |",
            k + 1,
            c.timeout_s,
            c.delivered,
            p.subscribers,
            ms(percentile(&c.samples, 0.50)),
            ms(percentile(&c.samples, 0.99)),
            ms(c.samples.last().copied().unwrap_or_default()),
            opt(c.to_generation_log.map(ms)),
            opt(c.update_took_ms.map(|v| v as f64)),
        );
    }
    let _ = writeln!(md);
    let _ = writeln!(
        md,
        "Control plane: started in {:.0} ms (RSS {:.1} MiB); {} subscribers synced in {:.0} ms \
         (CPU {:.0} ms; RSS {:.1} MiB, peak {:.1} MiB); idle {:.0} CPU-ms/s; change phase {:.1} s \
         ({:.0} CPU-ms incl. {:.0} s of pauses; RSS {:.1} MiB at the end). Simulated proxies \
         (this process): {:.0} CPU-ms in the change phase. Floor (p99 ≤ 1 s, all delivered): {}.",
        ms(r.startup),
        mib(r.mem_started.rss_kib),
        p.subscribers,
        ms(r.connect_time),
        ms(r.cpu_connect),
        mib(r.mem_connected.rss_kib),
        mib(r.mem_connected.peak_kib),
        ms(r.cpu_idle) / IDLE_WINDOW.as_secs_f64(),
        r.phase.as_secs_f64(),
        ms(r.cpu_changes),
        (PAUSE * p.changes.saturating_sub(1) as u32).as_secs_f64(),
        mib(r.mem_end.rss_kib),
        ms(r.cpu_self),
        if floor_met { "met" } else { "MISSED" },
    );
    println!("{md}");

    let json = json!({
        "benchmark": "control-scale",
        "services": p.services,
        "endpoints": p.services * p.endpoints,
        "subscribers": p.subscribers,
        "changes": p.changes,
        "push_ms": {"p50": r1(ms(p50)), "p99": r1(ms(p99)), "max": r1(ms(max))},
        "delivered_share": share,
        "floor_met": floor_met,
        "per_change": r.changes.iter().map(|c| json!({
            "timeout_s": c.timeout_s,
            "delivered": c.delivered,
            "p50_ms": r1(ms(percentile(&c.samples, 0.50))),
            "p99_ms": r1(ms(percentile(&c.samples, 0.99))),
            "max_ms": r1(ms(c.samples.last().copied().unwrap_or_default())),
            "generation": c.generation,
            "write_to_pushed_log_ms": c.to_generation_log.map(|d| r1(ms(d))),
            "update_took_ms": c.update_took_ms,
        })).collect::<Vec<_>>(),
        "control_plane": {
            "startup_ms": r1(ms(r.startup)),
            "rss_mib_started": r1(mib(r.mem_started.rss_kib)),
            "rss_mib_connected": r1(mib(r.mem_connected.rss_kib)),
            "rss_mib_end": r1(mib(r.mem_end.rss_kib)),
            "peak_rss_mib": r1(mib(r.mem_end.peak_kib)),
            "connect_phase_ms": r1(ms(r.connect_time)),
            "connect_phase_cpu_ms": r1(ms(r.cpu_connect)),
            "idle_cpu_ms_per_s": r1(ms(r.cpu_idle) / IDLE_WINDOW.as_secs_f64()),
            "change_phase_s": r1(r.phase.as_secs_f64()),
            "change_phase_cpu_ms": r1(ms(r.cpu_changes)),
            "warn_or_error_lines": r.problem_count,
            "initial_kib_per_proxy": r1(r.initial_bytes as f64 / 1024.0),
            "largest_response_kib": r1(r.largest_response as f64 / 1024.0),
        },
        "clients_change_phase_cpu_ms": r1(ms(r.cpu_self)),
        "subscriber_failures": r.failures.len(),
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&json).unwrap_or_default()
    );

    if !r.failures.is_empty() {
        eprintln!("{} subscriber(s) failed, e.g.:", r.failures.len());
        for (sub, error) in r.failures.iter().take(5) {
            eprintln!("  subscriber {sub}: {error}");
        }
    }
    if r.problem_count > 0 {
        eprintln!(
            "the control plane logged {} WARN/ERROR line(s), e.g.:",
            r.problem_count
        );
        for line in r.problems.iter().take(10) {
            eprintln!("  {line}");
        }
    }
}
