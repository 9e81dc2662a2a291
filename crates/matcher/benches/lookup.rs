//! `cargo bench -p hypha-matcher --bench lookup`: criterion micro-benchmarks of one lookup and
//! of compiling a table, for 1,000 regex routes and 1,000 mixed routes.

#[path = "../tests/common/mod.rs"]
mod common;

use std::hint::black_box;

use common::Mix;
use criterion::{criterion_group, criterion_main, Criterion};
use hypha_matcher::{SimpleRequest, Table};

fn bench(c: &mut Criterion) {
    for (name, mix) in [("regex", Mix::Regex), ("mixed", Mix::Mixed)] {
        let rules = common::table(1_000, mix);
        let table = Table::compile(rules.clone()).unwrap();
        let paths = common::paths(1_000, mix, 100_000, 7);
        let mut i = 0;
        c.bench_function(&format!("lookup/1000 {name} routes"), |b| {
            b.iter(|| {
                i = (i + 1) % paths.len();
                table.first_match(&SimpleRequest {
                    target: black_box(paths[i].as_bytes()),
                    method: b"GET",
                    scheme: b"http",
                    authority: b"shop",
                    headers: &[],
                })
            });
        });
        let mut g = c.benchmark_group("compile");
        g.sample_size(10);
        g.bench_function(format!("1000 {name} routes"), |b| {
            b.iter(|| Table::compile(black_box(rules.clone())).unwrap());
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
