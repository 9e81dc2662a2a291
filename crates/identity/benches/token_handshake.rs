//! Handshakes per second with the server's key in a PKCS#11 token, against the same key kind
//! in memory and against the token's raw sign rate, all in one run (issue 5's benchmark).
//!
//! Three measurements, alternated per repetition so drift hits them alike:
//! - `raw`: RSA-2048 PSS signatures through the token's thread pool, `--concurrency` in flight;
//! - `pkcs11`: full mutual-TLS 1.3 handshakes against a server whose RSA-2048 key is in the
//!   token (its context holds no key: every CertificateVerify is a token signature);
//! - `software`: the same handshakes with an RSA-2048 key in memory (BoringSSL signing).
//!
//! Clients use an ECDSA P-256 key in memory and never resume sessions. The server runs on a
//! one-thread runtime (as a sidecar with `--workers 1`), the clients on another, the token on
//! `--pkcs11-threads` threads.
//!
//! Run through `bench/token-handshake`, which makes the SoftHSM2 token; directly:
//! `SOFTHSM2_CONF=… HYPHA_BENCH_PIN=… cargo bench -p hypha-identity --bench token_handshake --
//! --token LABEL [--seconds 5] [--reps 3] [--concurrency 16] [--pkcs11-threads 1] [--json FILE]`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boring::ssl::{SslAcceptor, SslConnector, SslSignatureAlgorithm};
use hypha_ca::{Ca, Caller, FileSigner, TenantCa};
use hypha_identity::tls::{self, ClientCert, Peer, ALPN_H2_HTTP11};
use hypha_identity::{issue_local_for, Identity, KeyKind};
use hypha_keys::pkcs11::{PinSource, Token, TokenConfig, TokenKeyKind};
use hypha_keys::{KeyProvider, SoftwareKey};
use tokio::net::{TcpListener, TcpStream};

const TD: &str = "bench.local";

struct Args {
    module: String,
    token: String,
    pin_env: String,
    seconds: u64,
    reps: usize,
    concurrency: usize,
    threads: usize,
    json: Option<String>,
}

fn args() -> Args {
    let mut a = Args {
        module: "/usr/lib/softhsm/libsofthsm2.so".into(),
        token: String::new(),
        pin_env: "HYPHA_BENCH_PIN".into(),
        seconds: 5,
        reps: 3,
        concurrency: 16,
        threads: 1,
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        // cargo bench passes `--bench`; ignore flags that are not ours.
        let mut value = || it.next().expect("flag needs a value");
        match flag.as_str() {
            "--module" => a.module = value(),
            "--token" => a.token = value(),
            "--pin-env" => a.pin_env = value(),
            "--seconds" => a.seconds = value().parse().expect("--seconds N"),
            "--reps" => a.reps = value().parse().expect("--reps N"),
            "--concurrency" => a.concurrency = value().parse().expect("--concurrency N"),
            "--pkcs11-threads" => a.threads = value().parse().expect("--pkcs11-threads N"),
            "--json" => a.json = Some(value()),
            _ => {}
        }
    }
    assert!(!a.token.is_empty(), "--token LABEL is required");
    a
}

/// A mesh identity for `key`: a CSR signed by the key itself, issued by `ca`.
async fn identity(ca: &Ca, key: Arc<dyn KeyProvider>, sa: &str) -> Identity {
    let roots = ca.all_roots().unwrap();
    let caller = Caller::new("bench", sa);
    issue_local_for(ca, &caller, Duration::from_secs(3600), &roots, key)
        .await
        .unwrap()
}

/// Accepts and completes handshakes until the runtime is dropped.
async fn serve(listener: TcpListener, acceptor: Arc<SslAcceptor>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _ = tls::accept(&acceptor, stream).await;
        });
    }
}

#[derive(Default, Clone, Copy)]
struct Result_ {
    per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
}

fn summarize(n: u64, secs: f64, mut lat: Vec<Duration>, errors: u64) -> Result_ {
    lat.sort_unstable();
    let q = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    Result_ {
        per_s: n as f64 / secs,
        p50_ms: q(0.50),
        p99_ms: q(0.99),
        errors,
    }
}

/// `concurrency` tasks each running `op(task, iteration)` back to back for `secs`; an
/// operation that returns `false` counts as an error, not in the rate or latencies.
async fn load<F, Fut>(concurrency: usize, secs: u64, op: F) -> Result_
where
    F: Fn(usize, u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for task in 0..concurrency {
        let (stop, errors, op) = (stop.clone(), errors.clone(), op.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                if op(task, n).await {
                    lat.push(t.elapsed());
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                n += 1;
            }
            lat
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let n = lat.len() as u64;
    summarize(n, elapsed, lat, errors.load(Ordering::Relaxed))
}

/// `concurrency` loops of new connection + full handshake against `addr` for `secs`.
async fn handshakes(
    addr: SocketAddr,
    connector: Arc<SslConnector>,
    concurrency: usize,
    secs: u64,
) -> Result_ {
    load(concurrency, secs, move |_, _| {
        let connector = connector.clone();
        async move {
            let Ok(stream) = TcpStream::connect(addr).await else {
                return false;
            };
            let _ = stream.set_nodelay(true);
            tls::connect(&connector, stream, &Peer::Any, ALPN_H2_HTTP11)
                .await
                .is_ok()
        }
    })
    .await
}

/// `concurrency` loops of one RSA-PSS signature each through `key` for `secs`.
async fn signs(key: Arc<dyn KeyProvider>, concurrency: usize, secs: u64) -> Result_ {
    load(concurrency, secs, move |task, n| {
        let key = key.clone();
        async move {
            let mut msg = [0u8; 32];
            msg[..8].copy_from_slice(&(n ^ (task as u64) << 40).to_le_bytes());
            key.sign(SslSignatureAlgorithm::RSA_PSS_RSAE_SHA256, &msg)
                .await
                .is_ok()
        }
    })
    .await
}

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn main() {
    let a = args();
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let signer = FileSigner::open_or_create(&dir.path().join("ca"), TD, "bench").unwrap();
    let ca = Ca::new(
        TD,
        vec![TenantCa {
            name: "default".into(),
            namespaces: vec!["*".into()],
            trust_tenants: vec![],
            signer: Arc::new(signer),
            also_trusted: Vec::new(),
            max_validity: Duration::from_secs(3600),
        }],
    )
    .unwrap();

    let token = Token::open(&TokenConfig {
        module: a.module.clone().into(),
        label: a.token.clone(),
        pin: PinSource::Env(a.pin_env.clone()),
        threads: a.threads,
    })
    .expect("open the token");
    let (token_key, soft_key, client) = client_rt.block_on(async {
        let token_key: Arc<dyn KeyProvider> = Arc::new(
            token
                .generate(TokenKeyKind::Rsa(2048), "bench-server", false)
                .await
                .unwrap(),
        );
        let soft_key: Arc<dyn KeyProvider> =
            Arc::new(SoftwareKey::new(KeyKind::Rsa2048.generate().unwrap()).unwrap());
        let client_key: Arc<dyn KeyProvider> =
            Arc::new(SoftwareKey::new(KeyKind::EcdsaP256.generate().unwrap()).unwrap());
        let client = identity(&ca, client_key, "client").await;
        (token_key, soft_key, client)
    });
    let connector = Arc::new(tls::client(Some(&client), client.roots()).unwrap());

    // One server per key kind, each on its own one-thread runtime (a sidecar with one worker).
    let mut servers = Vec::new();
    let mut addrs = Vec::new();
    for key in [token_key.clone(), soft_key] {
        let id = client_rt.block_on(identity(&ca, key, "server"));
        let acceptor = Arc::new(tls::server(&id, ClientCert::Require).unwrap());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).expect("bind");
        addrs.push(listener.local_addr().unwrap());
        rt.spawn(serve(listener, acceptor));
        servers.push(rt);
    }

    println!(
        "token {:?}, {} pkcs11 thread(s), {} in flight, {} s x {} reps; nproc {}",
        a.token,
        a.threads,
        a.concurrency,
        a.seconds,
        a.reps,
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get)
    );
    // Warm-up: a second of each, not counted.
    client_rt.block_on(async {
        signs(token_key.clone(), a.concurrency, 1).await;
        handshakes(addrs[0], connector.clone(), a.concurrency, 1).await;
        handshakes(addrs[1], connector.clone(), a.concurrency, 1).await;
    });
    let names = [
        "raw token RSA-2048 signs",
        "handshakes, PKCS#11 key",
        "handshakes, software key",
    ];
    let mut runs: Vec<Vec<Result_>> = vec![Vec::new(); 3];
    for rep in 0..a.reps {
        let r = client_rt.block_on(async {
            [
                signs(token_key.clone(), a.concurrency, a.seconds).await,
                handshakes(addrs[0], connector.clone(), a.concurrency, a.seconds).await,
                handshakes(addrs[1], connector.clone(), a.concurrency, a.seconds).await,
            ]
        });
        for (i, x) in r.iter().enumerate() {
            println!(
                "rep {} {:<26} {:>8.0}/s  p50 {:>6.2} ms  p99 {:>6.2} ms  errors {}",
                rep + 1,
                names[i],
                x.per_s,
                x.p50_ms,
                x.p99_ms,
                x.errors
            );
            runs[i].push(*x);
        }
    }
    let ratios: Vec<f64> = (0..a.reps)
        .map(|r| runs[1][r].per_s / runs[0][r].per_s)
        .collect();
    let soft: Vec<f64> = (0..a.reps)
        .map(|r| runs[1][r].per_s / runs[2][r].per_s)
        .collect();
    let (rm, rlo, rhi) = median(ratios);
    let (sm, slo, shi) = median(soft);
    println!();
    for (i, name) in names.iter().enumerate() {
        let (m, lo, hi) = median(runs[i].iter().map(|x| x.per_s).collect());
        let (p50, _, _) = median(runs[i].iter().map(|x| x.p50_ms).collect());
        let (p99, _, _) = median(runs[i].iter().map(|x| x.p99_ms).collect());
        println!(
            "{name:<26} median {m:>8.0}/s ({lo:.0}–{hi:.0})  p50 {p50:.2} ms  p99 {p99:.2} ms"
        );
    }
    println!("PKCS#11 handshakes / raw token signs: {rm:.2} ({rlo:.2}–{rhi:.2}); floor 0.80");
    println!("PKCS#11 handshakes / software-key handshakes: {sm:.2} ({slo:.2}–{shi:.2})");
    if let Some(path) = a.json {
        let series = |i: usize| {
            runs[i]
                .iter()
                .map(|x| {
                    format!(
                        "{{\"per_s\":{:.1},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\"errors\":{}}}",
                        x.per_s, x.p50_ms, x.p99_ms, x.errors
                    )
                })
                .collect::<Vec<_>>()
                .join(",")
        };
        let json = format!(
            "{{\"token\":{:?},\"pkcs11_threads\":{},\"concurrency\":{},\"seconds\":{},\"raw_signs\":[{}],\"pkcs11_handshakes\":[{}],\"software_handshakes\":[{}],\"ratio_pkcs11_to_raw\":{{\"median\":{rm:.3},\"min\":{rlo:.3},\"max\":{rhi:.3}}},\"ratio_pkcs11_to_software\":{{\"median\":{sm:.3},\"min\":{slo:.3},\"max\":{shi:.3}}}}}\n",
            a.token, a.threads, a.concurrency, a.seconds, series(0), series(1), series(2)
        );
        std::fs::write(&path, json).expect("write --json");
    }
    drop(servers);
}
