//! `cargo bench -p hypha-rsa-mb --bench dudect`: a dudect-style timing check (Reparaz, Balasch,
//! Verbauwhede, "Dude, is my code constant time?", 2017) of the engine on this machine.
//!
//! Two experiments, each timing full batches of eight 2048-bit private-key operations, the
//! two classes interleaved in random order so drift affects both alike:
//! - inputs: one fixed input against fresh random inputs, same keys;
//! - keys: eight operations with key A against eight with key B (different secret exponents),
//!   random inputs.
//!
//! For each, Welch's t statistic between the classes, on all samples and on the samples below
//! several percentiles (dudect's cropping, which removes interrupts and other long tails).
//! |t| above 4.5 would be evidence of a timing difference; the run prints the largest |t|.
//! This is a measurement, not a test: it is recorded in docs/benchmarks.md.
//!
//! Environment: `DUDECT_SAMPLES` per class and experiment (default 3000).

use std::time::Instant;

use boring::rsa::Rsa;
use hypha_rsa_mb::{Engine, Key, Op, BATCH};

#[path = "../tests/common/mod.rs"]
mod common;

/// Welch's t statistic of two samples.
fn welch(a: &[f64], b: &[f64]) -> f64 {
    let stats = |v: &[f64]| {
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
        (n, mean, var)
    };
    let (na, ma, va) = stats(a);
    let (nb, mb, vb) = stats(b);
    (ma - mb) / (va / na + vb / nb).sqrt()
}

/// The largest |t| over all samples and the samples below each cropping percentile.
fn max_t(class: &[Vec<f64>; 2]) -> (f64, Vec<(f64, f64)>) {
    let mut all: Vec<f64> = class[0].iter().chain(&class[1]).copied().collect();
    all.sort_by(f64::total_cmp);
    let mut rows = vec![(100.0, welch(&class[0], &class[1]))];
    for pct in [99.0, 90.0, 75.0, 50.0] {
        let cut = all[((all.len() as f64) * pct / 100.0) as usize - 1];
        let a: Vec<f64> = class[0].iter().copied().filter(|x| *x <= cut).collect();
        let b: Vec<f64> = class[1].iter().copied().filter(|x| *x <= cut).collect();
        if a.len() > 10 && b.len() > 10 {
            rows.push((pct, welch(&a, &b)));
        }
    }
    let worst = rows.iter().map(|(_, t)| t.abs()).fold(0.0, f64::max);
    (worst, rows)
}

fn random_below_top(len: usize) -> Vec<u8> {
    let mut x = vec![0u8; len];
    common::random(&mut x[1..]);
    x
}

/// Times `samples` batches per class; `keys(class)` picks the keys, class 0 takes
/// `fixed_input` when given (else both classes take random inputs).
fn experiment<'k>(
    engine: &Engine,
    samples: usize,
    keys: &dyn Fn(usize) -> [&'k Key; BATCH],
    fixed_input: Option<&[u8]>,
) -> [Vec<f64>; 2] {
    let mut times = [Vec::with_capacity(samples), Vec::with_capacity(samples)];
    let mut coin = [0u8; 1];
    let mut outs = vec![vec![0u8; 256]; BATCH];
    while times[0].len() < samples || times[1].len() < samples {
        common::random(&mut coin);
        let class = usize::from(coin[0] & 1);
        if times[class].len() >= samples {
            continue;
        }
        let inputs: Vec<Vec<u8>> = (0..BATCH)
            .map(|_| match (class, fixed_input) {
                (0, Some(x)) => x.to_vec(),
                _ => random_below_top(256),
            })
            .collect();
        let ks = keys(class);
        let mut ops: Vec<Op> = ks
            .iter()
            .zip(&inputs)
            .zip(outs.iter_mut())
            .map(|((k, x), o)| Op::new(k, x, o))
            .collect();
        let start = Instant::now();
        engine.private_batch(&mut ops);
        let ns = start.elapsed().as_nanos() as f64;
        assert!(ops.iter().all(|o| o.result().is_ok()));
        times[class].push(ns);
    }
    times
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let samples: usize = std::env::var("DUDECT_SAMPLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    let engine = Engine::detect();
    let (ra, rb) = (Rsa::generate(2048).unwrap(), Rsa::generate(2048).unwrap());
    let (ka, kb) = (
        common::load(&engine, &ra).unwrap(),
        common::load(&engine, &rb).unwrap(),
    );
    let fixed = random_below_top(256);
    // Warm up.
    experiment(&engine, 50, &|_| [&ka; BATCH], None);
    println!(
        "dudect on the {} kernel, {samples} batches of {BATCH} RSA-2048 operations per class",
        engine.name()
    );
    let inputs = experiment(&engine, samples, &|_| [&ka; BATCH], Some(&fixed));
    let keys = experiment(
        &engine,
        samples,
        &|class| {
            if class == 0 {
                [&ka; BATCH]
            } else {
                [&kb; BATCH]
            }
        },
        None,
    );
    for (name, data) in [
        ("fixed vs random input", &inputs),
        ("key A vs key B", &keys),
    ] {
        let (worst, rows) = max_t(data);
        let med = |v: &[f64]| {
            let mut v = v.to_vec();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2] / 1000.0
        };
        println!(
            "{name}: median {:.1} / {:.1} µs per batch; max |t| = {worst:.2} ({})",
            med(&data[0]),
            med(&data[1]),
            if worst > 4.5 {
                "above 4.5: look closer"
            } else {
                "below 4.5: no evidence of a difference"
            }
        );
        for (pct, t) in rows {
            println!("    samples <= p{pct:.0}: t = {t:+.2}");
        }
    }
}
