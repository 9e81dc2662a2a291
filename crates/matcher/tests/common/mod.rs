//! Route tables and request paths shaped like a real mesh's, shared by the tests and the
//! benchmarks: every route names its own service, regexes use the classes people write in
//! Istio VirtualServices, and request paths are about 34 bytes.

#![allow(dead_code)] // each test and bench uses a part

use hypha_matcher::{Attr, Condition, Pattern, Rule, SimpleRequest, StringMatch, Table, Test};
use regex::Regex;

/// SplitMix64: tiny, deterministic.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Which kinds of rule a table mixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mix {
    /// Every route a regex.
    Regex,
    /// A third each of exact, prefix and regex routes.
    Mixed,
}

const RESOURCES: &[&str] = &["items", "orders", "users", "carts", "reviews"];
const ACTIONS: &[&str] = &["edit", "view", "list"];

/// Route `i` of a table: its pattern, and a function of a seed giving a path it matches.
pub fn route(i: usize, mix: Mix) -> Pattern {
    let kind = match mix {
        Mix::Regex => 2,
        Mix::Mixed => i % 3,
    };
    let svc = format!("svc{i:05}");
    match (kind, i % 4) {
        (0, _) => Pattern::Exact(format!("/api/v1/{svc}/health")),
        (1, _) => Pattern::Prefix(format!("/static/{svc}/")),
        (_, 0) => Pattern::Regex(format!(r"/api/v[1-3]/{svc}/(items|orders|users)/\d+")),
        (_, 1) => Pattern::Regex(format!(r"/{svc}/[a-z]+/\d{{1,8}}/(edit|view|list)")),
        (_, 2) => Pattern::Regex(format!(r"/api/{svc}/[0-9a-f]{{8}}(/.*)?")),
        (_, _) => Pattern::Regex(format!(r"/v\d/{svc}/\w+\.(json|xml)")),
    }
}

/// A path that route `i` matches (a later route may match it too; an earlier one never does,
/// since each route names its own service).
pub fn path_for(i: usize, mix: Mix, rng: &mut Rng) -> String {
    let svc = format!("svc{i:05}");
    let n = rng.next() % 100_000_000;
    let res = RESOURCES[rng.below(3)];
    match route(i, mix) {
        Pattern::Exact(p) => p,
        Pattern::Prefix(p) => format!("{p}app-{n}.js"),
        Pattern::Regex(_) => match i % 4 {
            0 => format!("/api/v{}/{svc}/{res}/{n}", 1 + rng.below(3)),
            1 => format!("/{svc}/{res}/{}/{}", n % 1_000_000, ACTIONS[rng.below(3)]),
            2 => format!("/api/{svc}/{:08x}/{res}", rng.next() as u32),
            _ => format!("/v{}/{svc}/{res}.json", rng.below(10)),
        },
        _ => unreachable!("routes are exact, prefix or regex"),
    }
}

/// `n` routes on the path, in order.
pub fn table(n: usize, mix: Mix) -> Vec<Rule> {
    (0..n)
        .map(|i| Rule {
            conditions: vec![Condition {
                attr: Attr::Path,
                test: Test::Matches(StringMatch {
                    pattern: route(i, mix),
                    ignore_case: false,
                }),
                invert: false,
            }],
        })
        .collect()
}

/// `count` request paths for a table of `n` routes: eight in ten match a random route, the
/// rest match none (an unknown service, or a known one with a wrong shape).
pub fn paths(n: usize, mix: Mix, count: usize, seed: u64) -> Vec<String> {
    let mut rng = Rng(seed);
    (0..count)
        .map(|_| {
            let i = rng.below(n);
            match rng.below(10) {
                0 => format!("/api/v1/svc{:05}/nothing/{}", n + i, rng.below(1000)),
                1 => format!("/api/v9/svc{i:05}/items/{}", rng.below(1000)),
                _ => path_for(i, mix, &mut rng),
            }
        })
        .collect()
}

/// One regex (or literal test) per route, tried in order: Envoy's route matching, the answer
/// a table must give and the peer it is measured against.
pub enum Route {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

pub fn sequential(rules: &[Rule]) -> Vec<Route> {
    rules
        .iter()
        .map(|r| {
            let Test::Matches(m) = &r.conditions[0].test else {
                unreachable!("the tables test the path")
            };
            match m.pattern.clone() {
                Pattern::Exact(l) => Route::Exact(l),
                Pattern::Prefix(l) => Route::Prefix(l),
                Pattern::Regex(re) => Route::Regex(Regex::new(&format!("^(?:{re})$")).unwrap()),
                _ => unreachable!("the tables use exact, prefix and regex routes"),
            }
        })
        .collect()
}

pub fn first_sequential(routes: &[Route], path: &str) -> Option<usize> {
    routes.iter().position(|r| match r {
        Route::Exact(l) => path == l,
        Route::Prefix(l) => path.starts_with(l.as_str()),
        Route::Regex(re) => re.is_match(path),
    })
}

/// The table's answer for a GET of `path`.
pub fn first_match(table: &Table, path: &str) -> Option<usize> {
    table.first_match(&SimpleRequest {
        target: path.as_bytes(),
        method: b"GET",
        scheme: b"http",
        authority: b"shop",
        headers: &[],
    })
}
