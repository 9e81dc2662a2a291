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
//! With `SOURCE=kubernetes` the same mesh is in the test API server instead (in this process,
//! with its controllers: a Service and two Deployments per service, their pods and
//! EndpointSlices, the Istio objects), `hypha control --kubernetes` reads it, the changes are
//! `kubectl apply`s of the VirtualService, and K more are `kubectl scale`s of one Deployment,
//! timed until every proxy (all watching that service's endpoints) has the new endpoints.
//!
//! Parameters (environment): `SOURCE` (`files` or `kubernetes`), `SERVICES` (1000),
//! `ENDPOINTS_PER_SERVICE` (5), `SUBSCRIBERS`
//! (1000), `CHANGES` (5), `CHANGE_TIMEOUT_S` (30), `SETUP_TIMEOUT_S` (600),
//! `CONNECT_PARALLELISM` (64), `HYPHA_BIN` (default: `hypha` next to this benchmark's
//! `target/<profile>`), `KEEP_BENCH_DIR` (set: keep the config dir and control-plane log).

#![forbid(unsafe_code)]

mod cluster;
mod control;
mod measure;
mod mesh;
mod proxies;

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;

use control::{free_port, hypha_bin, ControlPlane};
use measure::{clock_ticks, cpu_time, memory, mib, ms, percentile, r1, Memory};
use mesh::BenchDir;
use proxies::{proxy, subscriber, Event};

const NAMESPACES: usize = 10;
const HTTP_PORT: u16 = 8080;
/// The route configuration every proxy subscribes to: one virtual host per service on 8080.
const ROUTE_NAME: &str = "8080";
/// Quiet time between changes, so each change starts from an idle control plane.
const PAUSE: Duration = Duration::from_secs(1);
/// Window over which the idle control plane's CPU is sampled.
const IDLE_WINDOW: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy)]
pub(crate) struct Params {
    services: usize,
    endpoints: usize,
    subscribers: usize,
    changes: usize,
    change_timeout: Duration,
    setup_timeout: Duration,
    connect_parallelism: usize,
    /// `SOURCE=kubernetes`: the mesh from the test API server instead of files.
    kubernetes: bool,
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
            kubernetes: match std::env::var("SOURCE").as_deref() {
                Ok("kubernetes") => true,
                Ok("files") | Err(_) => false,
                Ok(other) => bail!("SOURCE={other:?}: expected files or kubernetes"),
            },
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

struct ChangeResult {
    /// What changed: `timeout 3s`, `replicas 6`.
    what: String,
    /// How long making the change took (the file write, or kubectl's run).
    trigger: Duration,
    delivered: usize,
    samples: Vec<Duration>,
    /// From the write until this process read the control plane's `pushed` log line.
    to_generation_log: Option<Duration>,
    /// The control plane's own time for translating and handing out snapshots.
    update_took_ms: Option<u64>,
    generation: Option<u64>,
    /// On a cluster: when the changed service's objects first changed in the API server, by
    /// resource (`virtualservices`, `deployments`, `pods`, `endpointslices`).
    cluster_side: Vec<(String, Duration)>,
}

async fn run(p: Params) -> Result<()> {
    let bin = hypha_bin()?;
    let ticks = clock_ticks();
    let dir = BenchDir::create()?;
    let started = Instant::now();
    let cluster = if p.kubernetes {
        Some(cluster::Cluster::start(&p, dir.root()).await?)
    } else {
        dir.generate(&p)?;
        None
    };
    let generate_time = started.elapsed();
    let source: Vec<std::ffi::OsString> = match &cluster {
        Some(c) => c.control_args(),
        None => vec!["--config".into(), dir.config().into_os_string()],
    };
    eprintln!(
        "control-scale: {} services, {} endpoints, {} subscribers, {} changes; {} ({:.0} ms)",
        p.services,
        p.services * p.endpoints,
        p.subscribers,
        p.changes,
        match &cluster {
            Some(c) => format!("in the test API server at {}", c.api.url()),
            None => format!("config in {}", dir.config().display()),
        },
        ms(generate_time)
    );

    let addr = free_port()?;
    let started = Instant::now();
    let mut cp = ControlPlane::spawn(&bin, &source, addr, &dir.log())?;
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
            match &cluster {
                Some(c) => c.proxy(sub, &p),
                None => proxy(sub, &p),
            },
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
            Ok(Some(Event::Endpoints { .. })) => {}
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
    let mut scales = Vec::new();
    let mut failures = Vec::new();
    let mut measuring = Phase {
        rx: &mut rx,
        generation_seen: &mut generation_seen,
        failures: &mut failures,
        p: &p,
        cluster: cluster.as_ref(),
    };
    for k in 0..p.changes {
        let timeout_s = if k.is_multiple_of(2) { 3 } else { 4 };
        let what = format!("timeout {timeout_s}s");
        let result = match &cluster {
            Some(c) => {
                measuring
                    .measure(
                        &cp,
                        Awaited::Route,
                        what,
                        c.apply_virtual_service(timeout_s),
                    )
                    .await?
            }
            None => {
                let write = async { dir.rewrite_virtual_service(timeout_s) };
                measuring.measure(&cp, Awaited::Route, what, write).await?
            }
        };
        changes.push(result);
        cp.check_alive()?;
        if k + 1 < p.changes {
            tokio::time::sleep(PAUSE).await;
        }
    }
    // On a cluster, a Deployment scaled up by one pod and back, each time to every proxy.
    if let Some(c) = &cluster {
        let base = cluster::replicas_of(&p, cluster::SCALED);
        for k in 0..p.changes {
            tokio::time::sleep(PAUSE).await;
            let replicas = if k.is_multiple_of(2) { base + 1 } else { base };
            let what = format!("{} replicas {replicas}", cluster::SCALED);
            let result = measuring
                .measure(&cp, Awaited::Endpoints, what, c.scale(replicas))
                .await?;
            scales.push(result);
            cp.check_alive()?;
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
        scales,
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

/// What a change is waited for as, at every proxy.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Awaited {
    /// A new version of route `8080`, from a generation after the change.
    Route,
    /// A new version of the watched endpoints.
    Endpoints,
}

/// The change phase's state: the proxies' events and what they have seen so far.
struct Phase<'a> {
    rx: &'a mut mpsc::UnboundedReceiver<Event>,
    generation_seen: &'a mut Vec<Option<u64>>,
    failures: &'a mut Vec<(usize, String)>,
    p: &'a Params,
    /// On a cluster: its change feed times the cluster's side of each change.
    cluster: Option<&'a cluster::Cluster>,
}

impl Phase<'_> {
    /// Makes a change (`trigger`), timed from just before it, and waits until every proxy has
    /// it (or the change timeout).
    async fn measure(
        &mut self,
        cp: &ControlPlane,
        awaited: Awaited,
        what: String,
        trigger: impl std::future::Future<Output = Result<()>>,
    ) -> Result<ChangeResult> {
        let p = self.p;
        // Anything still arriving from an earlier change only moves the floor.
        while let Ok(ev) = self.rx.try_recv() {
            match ev {
                Event::Route {
                    sub, generation, ..
                } => self.generation_seen[sub] = generation.max(self.generation_seen[sub]),
                Event::Failed { sub, error } => self.failures.push((sub, error)),
                Event::Ready { .. } | Event::Endpoints { .. } => {}
            }
        }
        let floor = self.generation_seen.iter().flatten().copied().max();
        let feed = self.cluster.map(|c| c.api.changes());
        let t0 = Instant::now();
        trigger.await?;
        let triggered = t0.elapsed();
        let mut got: Vec<Option<Duration>> = vec![None; p.subscribers];
        let mut delivered = 0;
        let deadline = tokio::time::Instant::from_std(t0 + p.change_timeout);
        while delivered < p.subscribers {
            let ev = match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(ev)) => ev,
                Ok(None) | Err(_) => break,
            };
            let arrived = match ev {
                Event::Route {
                    sub,
                    at,
                    generation,
                } => {
                    let newer = match (generation, floor) {
                        (Some(g), Some(f)) => g > f,
                        _ => true,
                    };
                    self.generation_seen[sub] = generation.max(self.generation_seen[sub]);
                    (awaited == Awaited::Route && newer).then_some((sub, at))
                }
                Event::Endpoints { sub, at } => {
                    (awaited == Awaited::Endpoints).then_some((sub, at))
                }
                Event::Failed { sub, error } => {
                    self.failures.push((sub, error));
                    None
                }
                Event::Ready { .. } => None,
            };
            if let Some((sub, at)) = arrived {
                if got[sub].is_none() {
                    got[sub] = Some(at.saturating_duration_since(t0));
                    delivered += 1;
                }
            }
        }
        let generation = {
            let log = cp.log();
            log.generations.iter().find(|g| g.at >= t0).cloned()
        };
        let mut samples: Vec<Duration> = got.into_iter().flatten().collect();
        samples.sort();
        let cluster_side = feed
            .map(|f| cluster::first_changes(f, t0))
            .unwrap_or_default();
        let result = ChangeResult {
            what,
            trigger: triggered,
            delivered,
            to_generation_log: generation
                .as_ref()
                .map(|g| g.at.saturating_duration_since(t0)),
            update_took_ms: generation.as_ref().map(|g| g.took_ms),
            generation: generation.as_ref().map(|g| g.generation),
            samples,
            cluster_side,
        };
        eprintln!(
            "{}: {delivered}/{} delivered, p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; generation {:?} logged after {:?} ms (update took {:?} ms, {} proxies)",
            result.what,
            p.subscribers,
            ms(percentile(&result.samples, 0.50)),
            ms(percentile(&result.samples, 0.99)),
            ms(result.samples.last().copied().unwrap_or_default()),
            result.generation,
            result.to_generation_log.map(|d| ms(d).round()),
            result.update_took_ms,
            generation.as_ref().map_or(0, |g| g.proxies),
        );
        if !result.cluster_side.is_empty() {
            let side: Vec<String> = (result.cluster_side.iter())
                .map(|(resource, at)| format!("{resource} +{:.0} ms", ms(*at)))
                .collect();
            eprintln!("  in the API server: {}", side.join(", "));
        }
        Ok(result)
    }
}

struct Report {
    p: Params,
    changes: Vec<ChangeResult>,
    /// On a cluster: the Deployment scales.
    scales: Vec<ChangeResult>,
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
    // Every change counts: the VirtualService's and, on a cluster, the scales.
    let every = || r.changes.iter().chain(&r.scales);
    let mut all: Vec<Duration> = every().flat_map(|c| c.samples.clone()).collect();
    all.sort();
    let expected = p.subscribers * (r.changes.len() + r.scales.len());
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
        "| source | services | endpoints | subscribers | changes | push p50 / p99 / max (ms) | delivered | control-plane peak RSS (MiB) | control-plane CPU-ms, change phase |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|");
    let _ = writeln!(
        md,
        "| {} | {} | {} | {} | {} | {:.0} / {:.0} / {:.0} | {:.1} % | {:.1} | {:.0} |",
        if p.kubernetes { "kubernetes" } else { "files" },
        p.services,
        p.services * p.endpoints,
        p.subscribers,
        r.changes.len() + r.scales.len(),
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
        "| change | what | made in (ms) | delivered | p50 / p99 / max (ms) | p99 once made (ms) | change → `pushed` log (ms) | update took (ms) |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
    for (k, c) in every().enumerate() {
        let opt = |v: Option<f64>| v.map_or("—".to_string(), |v| format!("{v:.0}"));
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {}/{} | {:.0} / {:.0} / {:.0} | {:.0} | {} | {} |",
            k + 1,
            c.what,
            ms(c.trigger),
            c.delivered,
            p.subscribers,
            ms(percentile(&c.samples, 0.50)),
            ms(percentile(&c.samples, 0.99)),
            ms(c.samples.last().copied().unwrap_or_default()),
            ms(percentile(&c.samples, 0.99).saturating_sub(c.trigger)),
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
        "source": if p.kubernetes { "kubernetes" } else { "files" },
        "per_change": every().map(|c| json!({
            "change": c.what,
            "made_in_ms": r1(ms(c.trigger)),
            "p99_once_made_ms": r1(ms(percentile(&c.samples, 0.99).saturating_sub(c.trigger))),
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
