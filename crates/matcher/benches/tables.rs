//! `cargo bench -p hypha-matcher --bench tables` (what `bench/matcher` runs): route tables of
//! 100 / 1,000 / 10,000 rules, all regex or mixed (a third each exact, prefix, regex), looked up
//! with 100k request paths of about 34 bytes, first match wins. Hypha's compiled table against
//! one regex per route tried in order (Envoy's way), in the same run, alternating, and, when
//! built with `--features hyperscan`, Hyperscan with every route in one block-mode database.
//! Every engine must give the same answers (checked). Prints a Markdown table for
//! docs/benchmarks.md.
//!
//! Environment: `MATCHER_BENCH_SIZES` (default "100,1000,10000"), `MATCHER_BENCH_PATHS`
//! (100000), `MATCHER_BENCH_REPS` (3), `MATCHER_BENCH_SEQUENTIAL_WORK` (route tests the
//! sequential peer may run per repetition, default 20 million: 20,000 paths at 1,000 routes,
//! 2,000 at 10,000, where one path costs it about 6 ms).

#[path = "../tests/common/mod.rs"]
mod common;

use std::hint::black_box;
use std::time::Instant;

use common::{first_match, first_sequential, sequential, Mix};
use hypha_matcher::Table;

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Nanoseconds per path, and a checksum of the answers.
fn time(paths: &[String], mut f: impl FnMut(&str) -> Option<usize>) -> (f64, usize) {
    let start = Instant::now();
    let mut sum = 0usize;
    for p in paths {
        sum = sum.wrapping_add(black_box(f(black_box(p))).map_or(usize::MAX, |i| i));
    }
    (start.elapsed().as_nanos() as f64 / paths.len() as f64, sum)
}

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

/// Hyperscan, as Envoy's `hyperscan` regex engine uses it: every route one expression of one
/// database, anchored at both ends, each reported once; the lowest route reported wins.
#[cfg(feature = "hyperscan")]
mod hs {
    use hyperscan::prelude::*;
    use hypha_matcher::{Pattern as P, Rule, Test};

    pub struct Hs {
        db: BlockDatabase,
        scratch: Scratch,
    }

    impl Hs {
        pub fn compile(rules: &[Rule]) -> Hs {
            let patterns: Patterns = rules
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let Test::Matches(m) = &r.conditions[0].test else {
                        unreachable!("the tables test the path")
                    };
                    let expression = match &m.pattern {
                        P::Exact(l) => format!(r"\A{}\z", regex::escape(l)),
                        P::Prefix(l) => format!(r"\A{}", regex::escape(l)),
                        P::Regex(re) => format!(r"\A(?:{re})\z"),
                        _ => unreachable!("the tables use exact, prefix and regex routes"),
                    };
                    Pattern {
                        id: Some(i),
                        ..Pattern::with_flags(expression, CompileFlags::SINGLEMATCH).unwrap()
                    }
                })
                .collect();
            let db: BlockDatabase = patterns.build().expect("Hyperscan compiles the routes");
            let scratch = db.alloc_scratch().unwrap();
            Hs { db, scratch }
        }

        pub fn first_match(&self, path: &str) -> Option<usize> {
            let mut best = u32::MAX;
            self.db
                .scan(path, &self.scratch, |id, _, _, _| {
                    best = best.min(id);
                    Matching::Continue
                })
                .unwrap();
            (best != u32::MAX).then_some(best as usize)
        }

        pub fn bytes(&self) -> usize {
            self.db.size().unwrap()
        }
    }
}

/// Hyperscan's ns/lookup, compile ms and MiB, when built with it.
#[cfg(feature = "hyperscan")]
fn hyperscan(rules: &[hypha_matcher::Rule], paths: &[String], expect: usize) -> (f64, f64, f64) {
    let start = Instant::now();
    let hs = hs::Hs::compile(rules);
    let compile = start.elapsed().as_secs_f64() * 1e3;
    let (ns, sum) = time(paths, |p| hs.first_match(p));
    assert_eq!(sum, expect, "Hyperscan and Hypha disagree");
    (ns, compile, hs.bytes() as f64 / f64::from(1 << 20))
}

#[cfg(not(feature = "hyperscan"))]
fn hyperscan(_: &[hypha_matcher::Rule], _: &[String], _: usize) -> (f64, f64, f64) {
    (f64::NAN, f64::NAN, f64::NAN)
}

fn main() {
    let sizes: Vec<usize> = env::<String>("MATCHER_BENCH_SIZES", "100,1000,10000".into())
        .split(',')
        .map(|s| s.trim().parse().expect("MATCHER_BENCH_SIZES: numbers"))
        .collect();
    let n_paths = env("MATCHER_BENCH_PATHS", 100_000usize);
    let reps = env("MATCHER_BENCH_REPS", 3usize).max(1);
    let seq_work = env("MATCHER_BENCH_SEQUENTIAL_WORK", 20_000_000usize);

    println!("| routes | mix | Hypha ns/lookup | one regex per route ns/lookup | ratio | Hyperscan ns/lookup | ratio | Hypha compile ms | Hyperscan compile ms | Hypha MiB | Hyperscan MiB | shape |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for mix in [Mix::Regex, Mix::Mixed] {
        for &n in &sizes {
            let rules = common::table(n, mix);
            let paths = common::paths(n, mix, n_paths, 7);
            let few = &paths[..(seq_work / n).clamp(1, paths.len())];
            let (mut ours, mut theirs, mut compile) = (Vec::new(), Vec::new(), Vec::new());
            let (mut hs_ns, mut hs_compile, mut hs_mib) = (Vec::new(), Vec::new(), 0.0);
            let mut table = None;
            let routes = sequential(&rules);
            for _ in 0..reps {
                let start = Instant::now();
                let t = Table::compile(rules.clone()).unwrap();
                compile.push(start.elapsed().as_secs_f64() * 1e3);
                let (ns, sum) = time(&paths, |p| first_match(&t, p));
                ours.push(ns);
                let (ns_seq, sum_seq) = time(few, |p| first_sequential(&routes, p));
                theirs.push(ns_seq);
                let (_, sum_few) = time(few, |p| first_match(&t, p));
                assert_eq!(sum_few, sum_seq, "the engines disagree");
                let (ns, ms, mib) = hyperscan(&rules, &paths, sum);
                hs_ns.push(ns);
                hs_compile.push(ms);
                hs_mib = mib;
                black_box(sum);
                table = Some(t);
            }
            let stats = table.unwrap().stats();
            let (o, o_min, o_max) = median(ours);
            let (s, s_min, s_max) = median(theirs);
            let (c, c_min, c_max) = median(compile);
            let (h, h_min, h_max) = median(hs_ns);
            let (hc, hc_min, hc_max) = median(hs_compile);
            let mib = (stats.dfa_bytes + stats.lazy_cache_bytes) as f64 / f64::from(1 << 20);
            println!(
                "| {n} | {mix:?} | {o:.0} ({o_min:.0}–{o_max:.0}) | {s:.0} ({s_min:.0}–{s_max:.0}) | {:.0}× | {h:.0} ({h_min:.0}–{h_max:.0}) | {:.1}× | {c:.0} ({c_min:.0}–{c_max:.0}) | {hc:.0} ({hc_min:.0}–{hc_max:.0}) | {mib:.1} | {hs_mib:.1} | {} dense, {} split, {} lazy, {} literals |",
                s / o,
                h / o,
                stats.dense_dfas,
                stats.splits,
                stats.lazy_dfas,
                stats.exact_literals,
            );
        }
    }
}
