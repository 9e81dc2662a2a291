//! `cargo bench -p hypha-rsa-mb --bench rsa_engine`: RSA private-key operations per second on
//! one core, the engine (batches of 8) against BoringSSL (what Envoy and Hypha's TLS use) and
//! `openssl speed` (OpenSSL 3, AVX-512 IFMA here), alternating in the same run.
//!
//! Options (environment): `RSA_BENCH_SECONDS` per measurement (default 2), `RSA_BENCH_REPS`
//! repetitions (default 3), `RSA_BENCH_SIZES` (default "2048,3072,4096"),
//! `RSA_BENCH_OPENSSL=0` to skip `openssl speed`, `RSA_BENCH_PEERS=0` to run the engine
//! alone (for a profiler). Prints a Markdown table of medians with
//! min–max and the ratios, for docs/benchmarks.md.

use std::process::Command;
use std::time::{Duration, Instant};

use boring::pkey::Private;
use boring::rsa::{Padding, Rsa};
use hypha_rsa_mb::{Engine, Key, Op, BATCH};

#[path = "../tests/common/mod.rs"]
mod common;

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `f` (which performs `per_call` operations) for `secs` and returns operations/s.
fn rate(secs: f64, per_call: usize, mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    let mut calls = 0usize;
    while start.elapsed() < Duration::from_secs_f64(secs) {
        f();
        calls += 1;
    }
    (calls * per_call) as f64 / start.elapsed().as_secs_f64()
}

/// `openssl speed`'s private-key operations per second for `bits`, on one core.
fn openssl_speed(bits: usize, secs: f64) -> Option<f64> {
    let out = Command::new("openssl")
        .args([
            "speed",
            "-seconds",
            &format!("{}", secs.ceil() as u64),
            "-mr",
        ])
        .arg(format!("rsa{bits}"))
        .output()
        .ok()?;
    // Machine-readable: "+F2:<n>:<bits>:<private ops/s>:<public ops/s>" (OpenSSL 3.0).
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&"+F2") && f.get(2) == Some(&bits.to_string().as_str()))
            .then(|| f.get(3)?.parse::<f64>().ok())
            .flatten()
    })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; a plain `cargo test` build of benches passes nothing.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let secs: f64 = env("RSA_BENCH_SECONDS", 2.0);
    let reps: usize = env("RSA_BENCH_REPS", 3);
    let sizes: String = env("RSA_BENCH_SIZES", "2048,3072,4096".to_string());
    let with_peers = env("RSA_BENCH_PEERS", 1) == 1;
    let with_openssl = with_peers && env("RSA_BENCH_OPENSSL", 1) == 1;
    let engine = Engine::detect();
    let portable = Engine::portable();
    println!(
        "engine kernel: {}; {secs} s per measurement, {reps} repetitions",
        engine.name()
    );
    println!();
    println!("| RSA | engine ops/s | portable ops/s | BoringSSL ops/s | openssl speed ops/s | engine / BoringSSL | engine / OpenSSL |");
    println!("|---|---|---|---|---|---|---|");
    for bits in sizes
        .split(',')
        .filter_map(|s| s.trim().parse::<usize>().ok())
    {
        // Eight different keys, as a busy gateway with several certificates would have.
        let rsas: Vec<Rsa<Private>> = (0..BATCH)
            .map(|_| Rsa::generate(bits as u32).unwrap())
            .collect();
        let keys: Vec<Key> = rsas
            .iter()
            .map(|r| common::load(&engine, r).unwrap())
            .collect();
        // The portable kernel's key set-up is slow: only when it is measured.
        let pkeys: Vec<Key> = if with_peers {
            rsas.iter()
                .map(|r| common::load(&portable, r).unwrap())
                .collect()
        } else {
            Vec::new()
        };
        let len = bits / 8;
        let mut input = vec![0u8; len];
        boring::rand::rand_bytes(&mut input[1..]).unwrap();
        let mut outs = vec![vec![0u8; len]; BATCH];
        let mut batch = |engine: &Engine, keys: &[Key]| {
            let mut ops: Vec<Op> = keys
                .iter()
                .zip(outs.iter_mut())
                .map(|(k, o)| Op::new(k, &input, o))
                .collect();
            engine.private_batch(&mut ops);
            assert!(ops.iter().all(|o| o.result().is_ok()));
        };
        let mut out = vec![0u8; len];
        let (mut e, mut p, mut b, mut o) = (vec![], vec![], vec![], vec![]);
        for _ in 0..reps {
            e.push(rate(secs, BATCH, || batch(&engine, &keys)));
            if !with_peers {
                continue;
            }
            p.push(rate(secs / 4.0, BATCH, || batch(&portable, &pkeys)));
            b.push(rate(secs, 1, || {
                rsas[0]
                    .private_decrypt(&input, &mut out, Padding::NONE)
                    .unwrap();
            }));
            if with_openssl {
                if let Some(r) = openssl_speed(bits, secs) {
                    o.push(r);
                }
            }
        }
        let span = |v: &mut Vec<f64>| {
            if v.is_empty() {
                return ("n/a".to_string(), None);
            }
            let m = median(v);
            (
                format!("{m:.0} ({:.0}–{:.0})", v[0], v[v.len() - 1]),
                Some(m),
            )
        };
        let (es, em) = span(&mut e);
        let (ps, _) = span(&mut p);
        let (bs, bm) = span(&mut b);
        let (os, om) = span(&mut o);
        let ratio = |x: Option<f64>| match (em, x) {
            (Some(a), Some(b)) => format!("{:.2}", a / b),
            _ => "n/a".to_string(),
        };
        println!(
            "| {bits} | {es} | {ps} | {bs} | {os} | {} | {} |",
            ratio(bm),
            ratio(om)
        );
    }
}
